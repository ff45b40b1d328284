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
    Serve(ServeArgs),
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
    /// Synchronise every known document with a server.
    Sync(SyncArgs),
}

#[derive(Subcommand)]
enum ChatCommand {
    /// Send a message and print its id.
    Send { room: String, text: String },
    /// List the messages: id, author, time, delivery state, readers and text.
    List {
        room: String,
        /// One JSON array of objects (id, author, text, time, edited, deleted, delivery, read_by).
        #[arg(long)]
        json: bool,
    },
    /// Mark the room read up to a message (by default the latest).
    Read { room: String, message: Option<String> },
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
    /// The server's base URL (`ws://host:port`).
    #[arg(long, env = "DRIFTSYNC_SERVER")]
    server: String,
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
    /// A database URL (postgres://… or sqlite:…) instead of the embedded store.
    #[arg(long, env = "DRIFTSYNC_DATABASE_URL")]
    database_url: Option<String>,
    /// The secret tokens are signed with. Without it the server runs open, on loopback only.
    #[arg(long, env = "DRIFTSYNC_SECRET", hide_env_values = true)]
    secret: Option<String>,
}

#[derive(clap::Args)]
struct TokenArgs {
    /// The server's secret.
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
            Command::Serve(args) => serve(args).await,
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
    if args.secret.is_empty() {
        bail!("the secret is empty");
    }
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

/// Refuses to serve open connections on anything but a loopback address.
fn check_listen(listen: SocketAddr, secret: Option<&str>) -> anyhow::Result<()> {
    match secret {
        Some("") => bail!("the secret is empty"),
        Some(_) => Ok(()),
        None if listen.ip().is_loopback() => Ok(()),
        None => bail!(
            "refusing to listen on {listen} without a secret: open connections are served on loopback only (pass --secret or set DRIFTSYNC_SECRET)"
        ),
    }
}

async fn serve(args: ServeArgs) -> anyhow::Result<()> {
    check_listen(args.listen, args.secret.as_deref())?;
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
    let store = AnyStore::open(&target)
        .await
        .with_context(|| format!("cannot open the store at {target}"))?;
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("cannot listen on {}", args.listen))?;
    let local = listener.local_addr().context("cannot read the listening address")?;
    // One plain line on stdout, for scripts and tests that start the server on port 0.
    println!("driftsync listening on {local}");
    let config = driftsync_server::Config {
        auth: driftsync_server::Auth::new(args.secret.as_deref()),
        ..Default::default()
    };
    let auth = if config.auth.is_open() {
        "open (no secret)"
    } else {
        "tokens"
    };
    tracing::info!(listen = %local, store = %target, auth, "driftsync serving");
    driftsync_server::serve(listener, store, config, shutdown_signal()).await?;
    tracing::info!("driftsync stopped");
    Ok(())
}

async fn client(args: ClientArgs) -> anyhow::Result<()> {
    let mut client = driftsync_client::Client::open(&args.store, &args.user)
        .await
        .with_context(|| format!("cannot open the client store {}", args.store.display()))?;
    match args.command {
        ClientCommand::Chat(ChatCommand::Send { room, text }) => {
            println!("{}", client.chat_send(&room, &text).await?);
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
                println!(
                    "{}\t{}\t{}\t{}\tread_by={}\t{}",
                    m.id,
                    m.author,
                    m.created_ms,
                    entry.delivery(),
                    entry.read_by.join(","),
                    text
                );
            }
        }
        ClientCommand::Chat(ChatCommand::Read { room, message }) => {
            if client.chat_mark_read(&room, message.as_deref()).await?.is_none() {
                bail!("room {room} has no messages");
            }
        }
        ClientCommand::Text(TextCommand::Append { doc, text }) => client.text_append(&doc, &text).await?,
        ClientCommand::Text(TextCommand::Insert { doc, pos, text }) => client.text_insert(&doc, pos, &text).await?,
        ClientCommand::Text(TextCommand::Delete { doc, pos, len }) => client.text_delete(&doc, pos, len).await?,
        ClientCommand::Text(TextCommand::Show { doc }) => println!("{}", client.text(&doc).await?),
        ClientCommand::Sync(sync) => {
            for doc in sync.docs.iter().map(|d| d.trim()).filter(|d| !d.is_empty()) {
                client.document(doc).await?;
            }
            if sync.once {
                let report = client.sync_once(&sync.server, &sync.token).await?;
                println!("{}", report.to_json());
            } else {
                sync_live(client, &sync).await?;
            }
        }
    }
    Ok(())
}

/// Keeps syncing until interrupted, one JSON line per event on stdout.
async fn sync_live(client: driftsync_client::Client, args: &SyncArgs) -> anyhow::Result<()> {
    use driftsync_client::{Options, Session};
    let session = Session::start(client, Options::new(&args.server).token(&args.token));
    let mut events = session.events();
    let stop = shutdown_signal();
    tokio::pin!(stop);
    loop {
        tokio::select! {
            () = &mut stop => break,
            event = events.recv() => match event {
                Some(event) => println!("{}", chat::event_json(&event)),
                None => bail!("the session stopped"),
            },
        }
    }
    session.shutdown().await?;
    Ok(())
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
        assert!(check_listen(public, Some("s3cret")).is_ok());
        assert!(check_listen(local, Some("")).is_err());
    }
}
