//! The `driftsync` binary.
//!
//! `driftsync serve` runs the sync server with the embedded SQLite store in `./driftsync-data`
//! by default (`--database-url postgres://…` for PostgreSQL). With `--secret` (or
//! `DRIFTSYNC_SECRET`) every connection needs a token; without one the server runs open and only
//! listens on a loopback address. `driftsync token` mints a token signed with the secret.
//! `driftsync client --store FILE --user USER …` works on a local client store: `chat send|list|read`,
//! `text append|insert|show`, and `sync --server URL --once`. Errors are one line on stderr and a
//! non-zero exit.

use std::cell::Cell;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::{Parser, Subcommand};
use driftsync_engine::store::AnyStore;
use tikv_jemalloc_ctl::{Access, AsName};

mod chat;

/// jemalloc instead of the system allocator: glibc malloc kept the memory of evicted documents
/// resident (freed chunks between live ones are never returned to the OS). jemalloc's
/// background thread (enabled in `serve`) returns pages freed for about ten
/// seconds. Chosen here, in the binary: the server library leaves the allocator to its embedder.
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

#[derive(Parser)]
#[command(name = "driftsync", version, about = "Offline-first sync engine: server and client")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the sync server.
    Serve(Box<ServeArgs>),
    /// Mint an access token (HS256, signed with the server's secret) and print it.
    Token(TokenArgs),
    /// Work on a local client store: chat, text and sync.
    Client(ClientArgs),
    /// An interactive terminal chat in ROOM: live messages, typing, presence and read receipts;
    /// keeps working offline and catches up on reconnect.
    Chat(chat::ChatArgs),
}

#[derive(clap::Args)]
struct ClientArgs {
    /// The client's SQLite store file (created if missing).
    #[arg(long, env = "DRIFTSYNC_STORE")]
    store: PathBuf,
    /// The user this client acts for.
    #[arg(long, env = "DRIFTSYNC_USER")]
    user: String,
    #[command(subcommand)]
    command: ClientCommand,
}

#[derive(Subcommand)]
enum ClientCommand {
    /// Chat rooms (documents named `chat/…`).
    #[command(subcommand)]
    Chat(ChatCommand),
    /// The root text of a document.
    #[command(subcommand)]
    Text(TextCommand),
    /// Synchronise every known document with a server (and, first, every chat room the user
    /// belongs to: a fresh device finds its rooms from its token alone).
    Sync(SyncArgs),
    /// The user's chat rooms, most recently active first, with the last message and the unread
    /// count: from the server's inbox with --server, else from this device's store.
    Rooms(RoomsArgs),
}

#[derive(clap::Args)]
struct RoomsArgs {
    /// Ask the server at this URL (`ws://host:port`); without it, list the rooms this device
    /// holds, as it knows them.
    #[arg(long, env = "DRIFTSYNC_SERVER")]
    server: Option<String>,
    /// A CA certificate (PEM) to trust for `wss://`.
    #[arg(long, env = "DRIFTSYNC_CA_CERT")]
    ca_cert: Option<PathBuf>,
    /// The access token (empty for an open server).
    #[arg(long, env = "DRIFTSYNC_TOKEN", default_value = "", hide_env_values = true)]
    token: String,
    /// One JSON array of objects (room, joined, unread, last: {id, author, kind, text, time,
    /// deleted}).
    #[arg(long)]
    json: bool,
}

#[derive(Subcommand)]
enum ChatCommand {
    /// Send a message and print its id.
    Send {
        room: String,
        text: String,
        /// text, image, video or file (system messages are the server's).
        #[arg(long, default_value = "text")]
        kind: String,
        /// A metadata entry KEY=VALUE (repeatable).
        #[arg(long = "meta", value_name = "KEY=VALUE")]
        meta: Vec<String>,
        /// An attachment by reference: URL,MIME,SIZE[,SHA256[,WIDTHxHEIGHT]] (repeatable).
        #[arg(long = "attach", value_name = "URL,MIME,SIZE")]
        attach: Vec<String>,
        /// The id of the message this one answers.
        #[arg(long)]
        reply_to: Option<String>,
    },
    /// Add a reaction (an emoji) to a message, or take it back with --remove.
    React {
        room: String,
        message: String,
        reaction: String,
        #[arg(long)]
        remove: bool,
    },
    /// List the messages: id, author, time, delivery state, readers and text.
    List {
        room: String,
        /// One JSON array of objects (id, author, kind, text, time, edited, deleted, metadata,
        /// attachments, reply_to, reactions, delivery, delivered_to, read_by).
        #[arg(long)]
        json: bool,
    },
    /// Mark the room read up to a message (by default the latest).
    Read { room: String, message: Option<String> },
    /// Join a room (works offline; the server announces it with a system message).
    Join { room: String },
    /// Leave a room.
    Leave { room: String },
    /// The room's members as this device knows them: user, joined or left, since when.
    Members {
        room: String,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
enum TextCommand {
    /// Append text.
    Append { doc: String, text: String },
    /// Insert text at a position (UTF-16 code units).
    Insert { doc: String, pos: u32, text: String },
    /// Delete LEN code units at a position (UTF-16 code units).
    Delete { doc: String, pos: u32, len: u32 },
    /// Print the text.
    Show { doc: String },
}

#[derive(clap::Args)]
struct SyncArgs {
    /// The server's base URL (`ws://host:port`, or `wss://host:port` for TLS).
    #[arg(long, env = "DRIFTSYNC_SERVER")]
    server: String,
    /// A CA certificate (PEM) to trust for `wss://`, besides Mozilla's roots: a private
    /// deployment's CA or a self-signed server certificate.
    #[arg(long, env = "DRIFTSYNC_CA_CERT")]
    ca_cert: Option<PathBuf>,
    /// The access token (empty for an open server).
    #[arg(long, env = "DRIFTSYNC_TOKEN", default_value = "", hide_env_values = true)]
    token: String,
    /// Exit once every local change is acknowledged and every remote change received, after
    /// printing one JSON line (documents, bytes_sent, bytes_received, round_trips). Without it,
    /// keep syncing until interrupted, printing one JSON line per event.
    #[arg(long)]
    once: bool,
    /// Also subscribe to these documents (comma-separated), e.g. ones this store never saw.
    #[arg(long = "doc", value_delimiter = ',')]
    docs: Vec<String>,
}

#[derive(clap::Args)]
struct ServeArgs {
    /// Address to listen on.
    #[arg(long, env = "DRIFTSYNC_LISTEN", default_value = "127.0.0.1:8787")]
    listen: SocketAddr,
    /// Directory of the embedded SQLite store (used unless --database-url is given).
    #[arg(long, env = "DRIFTSYNC_DATA_DIR", default_value = "./driftsync-data")]
    data_dir: PathBuf,
    /// A database URL (postgres://… or sqlite:…) instead of the embedded store. Its password
    /// never appears in logs or errors.
    #[arg(long, env = "DRIFTSYNC_DATABASE_URL", hide_env_values = true)]
    database_url: Option<String>,
    /// The secret tokens are signed with, at least 32 bytes (e.g. `openssl rand -base64 32`).
    /// Without it the server runs open, on loopback only.
    #[arg(long, env = "DRIFTSYNC_SECRET", hide_env_values = true)]
    secret: Option<String>,
    /// Most connections open at once (WebSockets and plain HTTP); one more is answered 503 and
    /// closed. Default: the open-files limit (`ulimit -n`) less 128 for the store and listener.
    #[arg(long, env = "DRIFTSYNC_MAX_CONNECTIONS")]
    max_connections: Option<usize>,
    /// How long a request's head may take to arrive, also the longest a keep-alive connection
    /// waits for its next request: a number with s, m, h or d [default: 10s].
    #[arg(long, env = "DRIFTSYNC_HEADER_READ_TIMEOUT", value_parser = parse_ttl)]
    header_read_timeout: Option<Duration>,
    /// A connection that has not upgraded to a WebSocket is closed after this long without a
    /// byte read or written [default: 30s].
    #[arg(long, env = "DRIFTSYNC_IDLE_TIMEOUT", value_parser = parse_ttl)]
    idle_timeout: Option<Duration>,
    /// Web origins whose pages may open WebSockets here, comma-separated and exact
    /// (`https://app.example`), `*` for any. Default: any with a secret; without one only
    /// http(s)://localhost, 127.0.0.1 and [::1] (any port).
    #[arg(long, env = "DRIFTSYNC_ALLOWED_ORIGINS", value_delimiter = ',', value_parser = parse_origin)]
    allowed_origins: Vec<String>,
    /// Largest frame accepted on /v1/sync before the hello is, in bytes [default: 16384].
    #[arg(long, env = "DRIFTSYNC_MAX_HELLO_FRAME")]
    max_hello_frame: Option<usize>,
    /// Largest a document may grow, in stored bytes; a push beyond it is refused with
    /// DocumentTooLarge [default: 16 MiB].
    #[arg(long, env = "DRIFTSYNC_MAX_DOCUMENT_BYTES")]
    max_document_bytes: Option<u64>,
    /// Bytes queued for one connection before it counts as a slow consumer and is told to
    /// resync [default: 8 MiB].
    #[arg(long, env = "DRIFTSYNC_OUTBOUND_QUEUE_BYTES")]
    outbound_queue_bytes: Option<usize>,
    /// How far ahead of the server's clock a chat message's stamp may be: a number with s, m, h
    /// or d [default: 5m].
    #[arg(long, env = "DRIFTSYNC_MAX_CLOCK_SKEW", value_parser = parse_ttl)]
    max_clock_skew: Option<Duration>,
    /// Redis, to share rooms live with the other instances on the same PostgreSQL:
    /// redis://[user:password@]host[:port][/db]. Without it, other instances' updates reach
    /// this one's live rooms only by the head check.
    #[arg(long, env = "DRIFTSYNC_REDIS_URL", hide_env_values = true)]
    redis_url: Option<String>,
    /// Prefix of the Redis channel names; the instances of one deployment share it.
    #[arg(long, env = "DRIFTSYNC_REDIS_PREFIX", default_value = "driftsync")]
    redis_prefix: String,
    /// How often the live rooms are compared with the store, to catch up on what other
    /// instances stored and Redis did not bring: a number with s, m, h or d [default: 1s with
    /// PostgreSQL or Redis, never for the embedded store alone].
    #[arg(long, env = "DRIFTSYNC_HEAD_CHECK_INTERVAL", value_parser = parse_ttl)]
    head_check_interval: Option<Duration>,
    /// Terminate TLS here with this certificate chain (PEM, the server's certificate first);
    /// needs --tls-key. Every endpoint is then HTTPS/WSS only.
    #[arg(long, env = "DRIFTSYNC_TLS_CERT", requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// The private key (PEM: PKCS#8, PKCS#1 or SEC1) of --tls-cert.
    #[arg(long, env = "DRIFTSYNC_TLS_KEY", requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// Push notifications: POST a signed webhook (Standard Webhooks) here when members who are
    /// offline have new chat messages (http:// or https://); needs --push-webhook-secret.
    #[arg(
        long,
        env = "DRIFTSYNC_PUSH_WEBHOOK_URL",
        hide_env_values = true,
        requires = "push_webhook_secret"
    )]
    push_webhook_url: Option<String>,
    /// The webhook signing secret, whsec_<base64> (at least 16 bytes); several, separated by
    /// spaces, while rotating (each signs every webhook).
    #[arg(
        long,
        env = "DRIFTSYNC_PUSH_WEBHOOK_SECRET",
        hide_env_values = true,
        requires = "push_webhook_url"
    )]
    push_webhook_secret: Option<String>,
    /// How long a member's notification waits after the message (one who comes back meanwhile
    /// gets none): a number with ms, s or m [default: 3s].
    #[arg(long, env = "DRIFTSYNC_PUSH_GRACE", value_parser = parse_short_duration)]
    push_grace: Option<Duration>,
    /// Put the latest message's text in the webhook (otherwise only its id and sender).
    #[arg(long, env = "DRIFTSYNC_PUSH_INCLUDE_TEXT")]
    push_include_text: bool,
    /// How long one webhook attempt may take [default: 10s].
    #[arg(long, env = "DRIFTSYNC_PUSH_TIMEOUT", value_parser = parse_short_duration)]
    push_timeout: Option<Duration>,
    /// The first retry's delay bound, doubled per attempt up to an hour [default: 1s].
    #[arg(long, env = "DRIFTSYNC_PUSH_BACKOFF", value_parser = parse_short_duration, hide = true)]
    push_backoff: Option<Duration>,
}

/// A duration with ms, s or m, e.g. `500ms`, `3s`.
fn parse_short_duration(text: &str) -> Result<Duration, String> {
    let bad = || format!("invalid duration {text:?}: use a number with ms, s or m, e.g. 500ms, 3s");
    let (number, unit_ms) = if let Some(number) = text.strip_suffix("ms") {
        (number, 1)
    } else if let Some(number) = text.strip_suffix('s') {
        (number, 1000)
    } else if let Some(number) = text.strip_suffix('m') {
        (number, 60_000)
    } else {
        return Err(bad());
    };
    let number: u64 = number.parse().map_err(|_| bad())?;
    number.checked_mul(unit_ms).map(Duration::from_millis).ok_or_else(bad)
}

#[derive(clap::Args)]
struct TokenArgs {
    /// The server's secret (at least 32 bytes).
    #[arg(long, env = "DRIFTSYNC_SECRET", hide_env_values = true)]
    secret: String,
    /// The user id (the token's subject).
    #[arg(long)]
    user: String,
    /// Comma-separated document patterns: exact ids, prefixes ending in `*` (`chat/*`), or `*`.
    #[arg(long, value_delimiter = ',', required = true)]
    docs: Vec<String>,
    /// Read-only: the token's connections receive updates but may not write.
    #[arg(long)]
    read_only: bool,
    /// How long the token is valid: a number with s, m, h or d (`90m`, `24h`, `7d`).
    #[arg(long, default_value = "24h", value_parser = parse_ttl)]
    ttl: Duration,
}

fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .on_thread_park(flush_thread_cache_now_and_then)
        .build();
    let runtime = match runtime {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("driftsync: cannot start the runtime: {e}");
            std::process::exit(1);
        }
    };
    let result = runtime.block_on(async {
        match cli.command {
            Command::Serve(args) => serve(*args).await,
            Command::Token(args) => token(args),
            Command::Client(args) => client(args).await,
            Command::Chat(args) => chat::run(args, shutdown_signal()).await,
        }
    });
    if let Err(e) = result {
        eprintln!("driftsync: {e:#}");
        std::process::exit(1);
    }
}

/// How often, at most, a runtime worker gives back what its jemalloc thread cache holds.
const THREAD_CACHE_FLUSH_EVERY: Duration = Duration::from_millis(100);

/// Called by each runtime worker before it parks: gives the thread's jemalloc cache back to the
/// arenas, at most every [`THREAD_CACHE_FLUSH_EVERY`]. A thread cache is flushed only as the
/// thread goes on allocating, so a worker that went idle right after freeing much (the sweep
/// evicting a thousand rooms' documents) kept up to a few hundred freed objects per size class,
/// and the slab pages under them, for as long as it stayed idle: 1.7 MB of the server's RSS
/// with 1,000 idle connections, one per room (measured with `tcache:false`). Busy, a worker
/// parks many times a second and flushes ten times a second at most, keeping the cache's speed.
fn flush_thread_cache_now_and_then() {
    thread_local!(static LAST: Cell<Option<Instant>> = const { Cell::new(None) });
    LAST.with(|last| {
        let now = Instant::now();
        if last
            .get()
            .is_some_and(|at| now.duration_since(at) < THREAD_CACHE_FLUSH_EVERY)
        {
            return;
        }
        last.set(Some(now));
        // Turning the thread's cache off flushes it into the arenas and frees it; on again, it
        // starts empty. (`thread.tcache.flush` would do it in one call but needs `unsafe`.)
        let enabled = b"thread.tcache.enabled\0".name();
        if enabled.write(false).is_ok() {
            let _ = enabled.write(true);
        }
    });
}

/// A token lifetime: a positive number followed by `s`, `m`, `h` or `d`.
fn parse_ttl(text: &str) -> Result<Duration, String> {
    let bad = || format!("invalid duration {text:?}: use a number with s, m, h or d, e.g. 90m, 24h, 7d");
    let split = text
        .len()
        .checked_sub(1)
        .filter(|&i| text.is_char_boundary(i))
        .ok_or_else(bad)?;
    let (number, unit) = text.split_at(split);
    let unit_secs = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        _ => return Err(bad()),
    };
    let number: u64 = number.parse().map_err(|_| bad())?;
    match number.checked_mul(unit_secs) {
        Some(0) => Err(format!("invalid duration {text:?}: it must be longer than zero")),
        Some(secs) => Ok(Duration::from_secs(secs)),
        None => Err(bad()),
    }
}

fn token(args: TokenArgs) -> anyhow::Result<()> {
    check_secret(&args.secret)?;
    if args.user.is_empty() {
        bail!("the user id is empty");
    }
    let docs: Vec<String> = args
        .docs
        .iter()
        .map(|d| d.trim().to_string())
        .filter(|d| !d.is_empty())
        .collect();
    if docs.is_empty() {
        bail!("no document patterns: pass --docs, e.g. --docs 'chat/*,notes/1'");
    }
    let token = driftsync_server::mint(&args.secret, &args.user, &docs, !args.read_only, args.ttl)?;
    println!("{token}");
    Ok(())
}

/// The shortest secret accepted, in bytes: HS256 tokens signed with a short secret can be forged
/// by guessing it offline from any one token.
const MIN_SECRET_BYTES: usize = 32;

/// Refuses a secret shorter than [`MIN_SECRET_BYTES`].
fn check_secret(secret: &str) -> anyhow::Result<()> {
    match secret.len() {
        0 => bail!("the secret is empty"),
        n if n < MIN_SECRET_BYTES => bail!(
            "the secret is {n} bytes long: use at least {MIN_SECRET_BYTES} random bytes (e.g. `openssl rand -base64 32`)"
        ),
        _ => Ok(()),
    }
}

/// A web origin as browsers send it: `*`, or `http(s)://host[:port]` (lowercased, no path).
fn parse_origin(text: &str) -> Result<String, String> {
    let origin = text.trim().trim_end_matches('/').to_ascii_lowercase();
    if origin == "*" {
        return Ok(origin);
    }
    let host = origin
        .strip_prefix("https://")
        .or_else(|| origin.strip_prefix("http://"))
        .unwrap_or_default();
    if host.is_empty() || host.contains(['/', '?', '#', '@', ' ']) {
        return Err(format!(
            "invalid origin {text:?}: use scheme://host[:port], e.g. https://app.example, or *"
        ));
    }
    Ok(origin)
}

/// `url` with its password, if any, replaced by `***` (`postgres://user:***@host/db`).
fn redact_url(url: &str) -> String {
    match url_password(url) {
        Some((start, end)) => format!("{}***{}", &url[..start], &url[end..]),
        None => url.to_string(),
    }
}

/// Where the password of `url` is (`scheme://user:PASSWORD@host…`), if it has one.
fn url_password(url: &str) -> Option<(usize, usize)> {
    let authority_start = url.find("://")? + 3;
    let authority_len = url[authority_start..]
        .find(['/', '?', '#'])
        .unwrap_or(url.len() - authority_start);
    let authority = &url[authority_start..authority_start + authority_len];
    let userinfo = &authority[..authority.rfind('@')?];
    let colon = userinfo.find(':')?;
    let start = authority_start + colon + 1;
    let end = authority_start + userinfo.len();
    (end > start).then_some((start, end))
}

/// `text` (an error from opening `url`) with the password of `url` replaced by `***` wherever it
/// appears.
fn redact_password(text: &str, url: &str) -> String {
    match url_password(url) {
        Some((start, end)) => text.replace(&url[start..end], "***"),
        None => text.to_string(),
    }
}

/// Refuses to serve open connections on anything but a loopback address.
fn check_listen(listen: SocketAddr, secret: Option<&str>) -> anyhow::Result<()> {
    match secret {
        Some(secret) => check_secret(secret),
        None if listen.ip().is_loopback() => Ok(()),
        None => bail!(
            "refusing to listen on {listen} without a secret: open connections are served on loopback only (pass --secret or set DRIFTSYNC_SECRET)"
        ),
    }
}

async fn serve(args: ServeArgs) -> anyhow::Result<()> {
    check_listen(args.listen, args.secret.as_deref())?;
    if args.max_connections == Some(0) {
        bail!("--max-connections must be at least 1");
    }
    if args.max_hello_frame.is_some_and(|n| n < 1024) {
        bail!("--max-hello-frame must be at least 1024 bytes: a hello carries the token");
    }
    // Every connection is a file descriptor: use the hard limit, not the (often 1,024) soft one.
    driftsync_server::raise_open_files_limit();
    // Return freed memory (evicted documents, closed connections) to the OS in the background.
    if let Err(e) = tikv_jemalloc_ctl::background_thread::write(true) {
        tracing::warn!(error = %e, "cannot start jemalloc's background thread");
    }
    let target = match &args.database_url {
        Some(url) => url.clone(),
        None => {
            std::fs::create_dir_all(&args.data_dir)
                .with_context(|| format!("cannot create data directory {}", args.data_dir.display()))?;
            args.data_dir.join("driftsync.db").to_string_lossy().into_owned()
        }
    };
    // The URL as it may be shown: without its password.
    let shown = redact_url(&target);
    let store = AnyStore::open(&target).await.map_err(|e| {
        anyhow::anyhow!(
            "cannot open the store at {shown}: {}",
            redact_password(&format!("{e:#}"), &target)
        )
    })?;
    let tls = match (&args.tls_cert, &args.tls_key) {
        (Some(cert), Some(key)) => {
            let cert_pem = std::fs::read(cert).with_context(|| format!("cannot read --tls-cert {}", cert.display()))?;
            let key_pem = std::fs::read(key).with_context(|| format!("cannot read --tls-key {}", key.display()))?;
            Some(driftsync_server::tls_server_config(&cert_pem, &key_pem)?)
        }
        _ => None,
    };
    // Push notifications, checked before anything listens.
    let push = match (&args.push_webhook_url, &args.push_webhook_secret) {
        (Some(url), Some(secret)) => {
            let secret = driftsync_server::push::PushSecret::parse(secret)
                .map_err(|e| anyhow::anyhow!("invalid --push-webhook-secret: {e}"))?;
            let mut push = driftsync_server::push::PushConfig::new(url, secret)
                .map_err(|e| anyhow::anyhow!("invalid --push-webhook-url: {e}"))?;
            push.grace = args.push_grace.unwrap_or(push.grace);
            push.include_text = args.push_include_text;
            push.timeout = args.push_timeout.unwrap_or(push.timeout);
            if push.timeout.is_zero() {
                anyhow::bail!("--push-timeout must be longer than zero");
            }
            push.backoff_base = args.push_backoff.unwrap_or(push.backoff_base);
            if push.grace < 2 * push.poll {
                tracing::warn!(
                    grace = ?push.grace,
                    "--push-grace is shorter than twice the outbox poll ({:?}): with several instances a member \
                     connected to another one may still be notified",
                    push.poll
                );
            }
            Some(push)
        }
        _ => None,
    };
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("cannot listen on {}", args.listen))?;
    let local = listener.local_addr().context("cannot read the listening address")?;
    // One plain line on stdout, for scripts and tests that start the server on port 0.
    println!("driftsync listening on {local}");
    let defaults = driftsync_server::Config::default();
    let shared_store = matches!(store, AnyStore::Postgres(_));
    let fanout: std::sync::Arc<dyn driftsync_server::Fanout> = match &args.redis_url {
        Some(url) => {
            let fanout = driftsync_server::RedisFanout::new(url, &args.redis_prefix).map_err(|e| {
                anyhow::anyhow!(
                    "invalid --redis-url {}: {}",
                    redact_url(url),
                    redact_password(&e.to_string(), url)
                )
            })?;
            tracing::info!(redis = %redact_url(url), prefix = %args.redis_prefix, "sharing rooms with other instances through Redis");
            std::sync::Arc::new(fanout)
        }
        None => {
            if shared_store {
                tracing::warn!(
                    "a shared PostgreSQL store without --redis-url: if other instances serve it, their \
                     updates reach this instance's clients only by the head check (every second), and \
                     presence does not cross instances; give every instance the same --redis-url"
                );
            }
            std::sync::Arc::new(driftsync_server::NoFanout)
        }
    };
    let head_check = args
        .head_check_interval
        .or_else(|| (shared_store || args.redis_url.is_some()).then_some(driftsync_server::DEFAULT_HEAD_CHECK));
    let config = driftsync_server::Config {
        push,
        fanout,
        head_check,
        auth: driftsync_server::Auth::new(args.secret.as_deref()),
        max_connections: args.max_connections.unwrap_or(defaults.max_connections),
        header_read_timeout: args.header_read_timeout.unwrap_or(defaults.header_read_timeout),
        idle_timeout: args.idle_timeout.unwrap_or(defaults.idle_timeout),
        allowed_origins: (!args.allowed_origins.is_empty()).then_some(args.allowed_origins),
        max_hello_frame: args.max_hello_frame.unwrap_or(defaults.max_hello_frame),
        max_document_bytes: args.max_document_bytes.unwrap_or(defaults.max_document_bytes),
        outbound_queue_bytes: args.outbound_queue_bytes.unwrap_or(defaults.outbound_queue_bytes),
        max_clock_skew: args.max_clock_skew.unwrap_or(defaults.max_clock_skew),
        tls,
        ..defaults
    };
    let auth = if config.auth.is_open() {
        "open (no secret)"
    } else {
        "tokens"
    };
    tracing::info!(
        listen = %local,
        tls = config.tls.is_some(),
        store = %shown,
        auth,
        max_connections = config.max_connections,
        "driftsync serving"
    );
    driftsync_server::serve(listener, store, config, shutdown_signal()).await?;
    tracing::info!("driftsync stopped");
    Ok(())
}

/// The message `chat send` describes.
fn new_message(
    text: String,
    kind: &str,
    meta: &[String],
    attach: &[String],
    reply_to: Option<String>,
) -> anyhow::Result<driftsync_engine::chat::NewMessage> {
    use driftsync_engine::chat::{Kind, NewMessage};
    let kind = match Kind::parse(kind) {
        Some(Kind::System) => bail!("system messages are written by the server only"),
        Some(kind) => kind,
        None => bail!("unknown kind {kind:?}: text, image, video or file"),
    };
    let mut metadata = std::collections::BTreeMap::new();
    for entry in meta {
        let Some((key, value)) = entry.split_once('=') else {
            bail!("--meta takes KEY=VALUE, not {entry:?}");
        };
        metadata.insert(key.to_string(), value.to_string());
    }
    let mut attachments = Vec::new();
    for spec in attach {
        attachments.push(parse_attachment(spec)?);
    }
    let message = NewMessage {
        text,
        kind,
        metadata,
        attachments,
        reply_to,
    };
    message.check().map_err(anyhow::Error::msg)?;
    Ok(message)
}

/// `URL,MIME,SIZE[,SHA256][,WIDTHxHEIGHT]`, read from the right (a URL may hold commas).
fn parse_attachment(spec: &str) -> anyhow::Result<driftsync_engine::chat::Attachment> {
    let usage = || anyhow::anyhow!("--attach takes URL,MIME,SIZE[,SHA256][,WIDTHxHEIGHT], not {spec:?}");
    let mut parts: Vec<&str> = spec.split(',').collect();
    let mut attachment = driftsync_engine::chat::Attachment::default();
    if let Some((w, h)) = parts.last().and_then(|p| p.split_once('x')) {
        if let (Ok(w), Ok(h)) = (w.parse(), h.parse()) {
            attachment.width = Some(w);
            attachment.height = Some(h);
            parts.pop();
        }
    }
    if parts
        .last()
        .is_some_and(|p| p.len() == 64 && p.bytes().all(|b| b.is_ascii_hexdigit()))
    {
        attachment.sha256 = parts.pop().map(str::to_ascii_lowercase);
    }
    attachment.size = parts.pop().and_then(|p| p.parse().ok()).ok_or_else(usage)?;
    attachment.mime = parts.pop().ok_or_else(usage)?.to_string();
    attachment.url = parts.join(",");
    attachment.check().map_err(|e| anyhow::anyhow!("{e} (in {spec:?})"))?;
    Ok(attachment)
}

async fn client(args: ClientArgs) -> anyhow::Result<()> {
    let mut client = driftsync_client::Client::open(&args.store, &args.user)
        .await
        .with_context(|| format!("cannot open the client store {}", args.store.display()))?;
    match args.command {
        ClientCommand::Chat(ChatCommand::Send {
            room,
            text,
            kind,
            meta,
            attach,
            reply_to,
        }) => {
            let message = new_message(text, &kind, &meta, &attach, reply_to)?;
            println!("{}", client.chat_send_message(&room, &message).await?);
        }
        ClientCommand::Chat(ChatCommand::React {
            room,
            message,
            reaction,
            remove,
        }) => {
            client.chat_react(&room, &message, &reaction, !remove).await?;
        }
        ClientCommand::Chat(ChatCommand::List { room, json }) => {
            let entries = client.chat_list(&room).await?;
            if json {
                let array: Vec<_> = entries.iter().map(|e| e.to_json()).collect();
                println!("{}", serde_json::Value::Array(array));
            }
            for entry in entries.iter().filter(|_| !json) {
                let m = &entry.message;
                let text = if m.deleted { "(deleted)" } else { m.text.as_str() };
                let reactions: Vec<String> = entry
                    .reactions
                    .iter()
                    .map(|(r, users)| format!("{r}{}", users.len()))
                    .collect();
                println!(
                    "{}\t{}\t{}\t{}\t{}\tread_by={}\treactions={}\t{}{}",
                    m.id,
                    m.author,
                    m.created_ms,
                    m.kind,
                    entry.delivery(),
                    entry.read_by.join(","),
                    reactions.join(","),
                    m.reply_to
                        .as_ref()
                        .map(|r| format!("(reply to {r}) "))
                        .unwrap_or_default(),
                    text
                );
            }
        }
        ClientCommand::Chat(ChatCommand::Read { room, message }) => {
            if client.chat_mark_read(&room, message.as_deref()).await?.is_none() {
                bail!("room {room} has no messages");
            }
        }
        ClientCommand::Chat(ChatCommand::Join { room }) => {
            if !client.chat_join(&room).await? {
                eprintln!("{} is a member of {room} already", args.user);
            }
        }
        ClientCommand::Chat(ChatCommand::Leave { room }) => {
            if !client.chat_leave(&room).await? {
                eprintln!("{} is not a member of {room}", args.user);
            }
        }
        ClientCommand::Chat(ChatCommand::Members { room, json }) => {
            let members = client.chat_members(&room).await?;
            if json {
                let array: Vec<_> = members
                    .iter()
                    .map(|m| serde_json::json!({"user": m.user, "joined": m.joined, "at": m.at_ms}))
                    .collect();
                println!("{}", serde_json::Value::Array(array));
            } else {
                for m in &members {
                    println!("{}\t{}\t{}", m.user, if m.joined { "joined" } else { "left" }, m.at_ms);
                }
            }
        }
        ClientCommand::Rooms(rooms) => list_rooms(&mut client, &rooms).await?,
        ClientCommand::Text(TextCommand::Append { doc, text }) => client.text_append(&doc, &text).await?,
        ClientCommand::Text(TextCommand::Insert { doc, pos, text }) => client.text_insert(&doc, pos, &text).await?,
        ClientCommand::Text(TextCommand::Delete { doc, pos, len }) => client.text_delete(&doc, pos, len).await?,
        ClientCommand::Text(TextCommand::Show { doc }) => println!("{}", client.text(&doc).await?),
        ClientCommand::Sync(sync) => {
            for doc in sync.docs.iter().map(|d| d.trim()).filter(|d| !d.is_empty()) {
                client.document(doc).await?;
            }
            if sync.once {
                let tls = client_tls(sync.ca_cert.as_deref())?;
                // The rooms the user belongs to first (one round trip): a fresh device given
                // only a token finds them, and the sync below resumes them all at once.
                match client.fetch_inbox(&sync.server, &sync.token, tls.as_ref(), 0).await {
                    Ok((rooms, _)) => {
                        for room in rooms.iter().filter(|r| r.joined) {
                            client.document(room.room.as_str()).await?;
                        }
                    }
                    Err(e) => eprintln!("could not read the inbox ({e}); syncing the documents known here"),
                }
                let report = client.sync_once_with(&sync.server, &sync.token, tls.as_ref()).await?;
                println!("{}", report.to_json());
            } else {
                sync_live(client, &sync).await?;
            }
        }
    }
    Ok(())
}

/// `client rooms`: the inbox from the server, or what this device knows offline.
async fn list_rooms(client: &mut driftsync_client::Client, args: &RoomsArgs) -> anyhow::Result<()> {
    let rooms: Vec<serde_json::Value> = match &args.server {
        Some(server) => {
            let tls = client_tls(args.ca_cert.as_deref())?;
            let (rooms, _) = client.fetch_inbox(server, &args.token, tls.as_ref(), 0).await?;
            rooms
                .iter()
                .map(|r| {
                    serde_json::json!({
                        "room": r.room.as_str(),
                        "joined": r.joined,
                        "unread": r.unread,
                        "last": r.last.as_ref().map(|m| serde_json::json!({
                            "id": m.id, "author": m.author, "kind": m.kind, "text": m.text,
                            "time": m.at_ms, "deleted": m.deleted,
                        })),
                    })
                })
                .collect()
        }
        None => {
            let mut local = Vec::new();
            for room in client.documents().await? {
                if !room.starts_with(driftsync_client::CHAT_PREFIX) {
                    continue;
                }
                let members = client.chat_members(&room).await?;
                let joined = members.iter().any(|m| m.user == client.user() && m.joined);
                let unread = client.chat_unread_count(&room).await?;
                let last = client.chat_messages(&room).await?.into_iter().last().map(|(m, _)| m);
                local.push((
                    last.as_ref().map(|m| m.sort.clone()).unwrap_or_default(),
                    serde_json::json!({
                        "room": room,
                        "joined": joined,
                        "unread": unread,
                        "last": last.map(|m| serde_json::json!({
                            "id": m.id, "author": m.author, "kind": m.kind.as_str(), "text": m.text,
                            "time": m.created_ms, "deleted": m.deleted,
                        })),
                    }),
                ));
            }
            local.sort_by(|a, b| b.0.cmp(&a.0));
            local.into_iter().map(|(_, room)| room).collect()
        }
    };
    if args.json {
        println!("{}", serde_json::Value::Array(rooms));
        return Ok(());
    }
    for room in &rooms {
        let last = &room["last"];
        let preview = if last.is_null() {
            String::new()
        } else if last["deleted"] == true {
            format!("{}: (deleted)", last["author"].as_str().unwrap_or(""))
        } else {
            format!(
                "{}: {}",
                last["author"].as_str().unwrap_or(""),
                last["text"].as_str().unwrap_or("")
            )
        };
        println!(
            "{}\t{}\tunread={}\t{}",
            room["room"].as_str().unwrap_or(""),
            if room["joined"] == true { "joined" } else { "left" },
            room["unread"],
            preview
        );
    }
    Ok(())
}

/// Keeps syncing until interrupted, one JSON line per event on stdout.
async fn sync_live(client: driftsync_client::Client, args: &SyncArgs) -> anyhow::Result<()> {
    use driftsync_client::{Options, Session};
    let mut options = Options::new(&args.server).token(&args.token);
    if let Some(tls) = client_tls(args.ca_cert.as_deref())? {
        options = options.tls(tls);
    }
    let session = Session::start(client, options);
    let mut events = session.events();
    // The user's rooms follow them: every room the inbox lists (now, or joined later on
    // another device) is subscribed, so it syncs live like the documents this store knows.
    session.follow_inbox(0).await?;
    let stop = shutdown_signal();
    tokio::pin!(stop);
    loop {
        tokio::select! {
            () = &mut stop => break,
            event = events.recv() => match event {
                Some(event) => {
                    println!("{}", chat::event_json(&event));
                    if let driftsync_client::Event::Inbox { rooms, .. } = &event {
                        for room in rooms.iter().filter(|r| r.joined) {
                            session.subscribe(room.room.as_str()).await?;
                        }
                    }
                }
                None => bail!("the session stopped"),
            },
        }
    }
    session.shutdown().await?;
    Ok(())
}

/// The client's TLS settings with `--ca-cert` (Mozilla's roots and that CA), or `None` for
/// Mozilla's roots alone.
fn client_tls(ca_cert: Option<&std::path::Path>) -> anyhow::Result<Option<driftsync_client::Tls>> {
    let Some(path) = ca_cert else { return Ok(None) };
    let pem = std::fs::read(path).with_context(|| format!("cannot read --ca-cert {}", path.display()))?;
    let tls = driftsync_client::Tls::with_extra_ca(&pem).with_context(|| format!("--ca-cert {}", path.display()))?;
    Ok(Some(tls))
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {},
        () = term => {},
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ttls() {
        assert_eq!(parse_ttl("30s"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_ttl("90m"), Ok(Duration::from_secs(5400)));
        assert_eq!(parse_ttl("24h"), Ok(Duration::from_secs(86_400)));
        assert_eq!(parse_ttl("7d"), Ok(Duration::from_secs(604_800)));
        for bad in ["", "h", "24", "24x", "-1h", "0h", "1.5h", "99999999999999999999d", "é"] {
            assert!(parse_ttl(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn short_durations() {
        assert_eq!(parse_short_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_short_duration("3s"), Ok(Duration::from_secs(3)));
        assert_eq!(parse_short_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_short_duration("0s"), Ok(Duration::ZERO));
        for bad in ["", "s", "3", "3h", "-1s", "1.5s", "99999999999999999999m", "é"] {
            assert!(parse_short_duration(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn open_servers_listen_on_loopback_only() {
        let local: SocketAddr = "127.0.0.1:8787".parse().unwrap();
        let local6: SocketAddr = "[::1]:8787".parse().unwrap();
        let public: SocketAddr = "0.0.0.0:8787".parse().unwrap();
        assert!(check_listen(local, None).is_ok());
        assert!(check_listen(local6, None).is_ok());
        let refused = check_listen(public, None).unwrap_err().to_string();
        assert!(
            refused.contains("without a secret") && !refused.contains('\n'),
            "{refused}"
        );
        assert!(check_listen(public, Some("a-secret-that-is-32-bytes-long!!")).is_ok());
        assert!(check_listen(local, Some("")).is_err());
        let short = check_listen(public, Some("s3cret")).unwrap_err().to_string();
        assert!(short.contains("at least 32") && !short.contains('\n'), "{short}");
    }

    #[test]
    fn database_passwords_are_redacted() {
        assert_eq!(
            redact_url("postgres://ada:hunter2@db:5432/x"),
            "postgres://ada:***@db:5432/x"
        );
        assert_eq!(
            redact_url("postgresql://ada:p@ss@db/x?sslmode=require"),
            "postgresql://ada:***@db/x?sslmode=require"
        );
        assert_eq!(redact_url("postgres://ada@db/x"), "postgres://ada@db/x");
        assert_eq!(redact_url("postgres://db/x?user=a@b"), "postgres://db/x?user=a@b");
        assert_eq!(redact_url("/var/lib/driftsync.db"), "/var/lib/driftsync.db");
        assert_eq!(redact_url("sqlite:data.db"), "sqlite:data.db");
        assert_eq!(
            redact_password(
                "password authentication failed (hunter2)",
                "postgres://ada:hunter2@db/x"
            ),
            "password authentication failed (***)"
        );
    }

    #[test]
    fn origins() {
        assert_eq!(parse_origin("https://App.example/"), Ok("https://app.example".into()));
        assert_eq!(
            parse_origin("http://localhost:3000"),
            Ok("http://localhost:3000".into())
        );
        assert_eq!(parse_origin("*"), Ok("*".into()));
        for bad in [
            "",
            "app.example",
            "https://",
            "https://a.example/path",
            "ftp://a.example",
            "null",
        ] {
            assert!(parse_origin(bad).is_err(), "{bad:?}");
        }
    }
}
