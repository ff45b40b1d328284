//! The server's settings ([`Config`]) and their defaults.

use std::sync::Arc;
use std::time::Duration;

use driftsync_engine::store::CompactionPolicy;

use crate::auth::Auth;
use crate::fanout::{Fanout, NoFanout};
use crate::limits::{RateLimit, RoomOpens};

/// Documents whose id starts with this are chat rooms: updates to them must follow the chat
/// rules of `driftsync_engine::chat` (ARCHITECTURE.md, "Chat and receipts schema").
pub const CHAT_PREFIX: &str = "chat/";

/// The default [`Config::header_read_timeout`].
pub const DEFAULT_HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);

/// The default [`Config::idle_timeout`].
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(30);

/// The default [`Config::max_hello_frame`]: a hello with its token is a few hundred bytes (a
/// token listing many documents one by one a few KiB; patterns such as `notes/*` keep it short).
pub const DEFAULT_MAX_HELLO_FRAME: usize = 16 * 1024;

/// File descriptors [`default_max_connections`] leaves to everything but connections: the
/// listener, the store (an SQLite file with its WAL and pooled readers, or a PostgreSQL pool),
/// the runtime, logs.
pub const FD_RESERVE: usize = 128;

/// The default [`Config::max_connections`]: the process's soft limit on open files less
/// [`FD_RESERVE`] (half the limit if that is small), so that connections alone cannot exhaust
/// the descriptors the store and `/healthz` need. 1,024 less the reserve where the limit cannot
/// be read; at most 1,048,576.
pub fn default_max_connections() -> usize {
    let limit = open_files_limit().unwrap_or(1024).min(1 << 20);
    if limit > 2 * FD_RESERVE {
        limit - FD_RESERVE
    } else {
        (limit / 2).max(1)
    }
}

/// Raises the process's soft limit on open files to its hard limit (call it before building a
/// [`Config`], whose default [`Config::max_connections`] follows the soft limit). Failures are
/// logged: the server then runs with the limit it has.
pub fn raise_open_files_limit() {
    #[cfg(unix)]
    {
        use rustix::process::{getrlimit, setrlimit, Resource};
        let limit = getrlimit(Resource::Nofile);
        if limit.current < limit.maximum {
            let raised = rustix::process::Rlimit {
                current: limit.maximum,
                maximum: limit.maximum,
            };
            if let Err(e) = setrlimit(Resource::Nofile, raised) {
                tracing::warn!(error = %e, "cannot raise the open-files limit");
            }
        }
    }
}

/// The soft limit on open files (`RLIMIT_NOFILE`), if there is one.
#[cfg(unix)]
fn open_files_limit() -> Option<usize> {
    let limit = rustix::process::getrlimit(rustix::process::Resource::Nofile).current?;
    Some(usize::try_from(limit).unwrap_or(usize::MAX))
}

#[cfg(not(unix))]
fn open_files_limit() -> Option<usize> {
    None
}

/// Server settings; [`Config::default`] is what `driftsync serve` uses.
#[derive(Debug, Clone)]
pub struct Config {
    /// Largest frame accepted, in bytes.
    pub max_frame_size: usize,
    /// Frames queued for one connection before it counts as a slow consumer and is told to
    /// resync.
    pub outbound_queue: usize,
    /// Bytes queued for one connection (frames and the updates and presence states of its
    /// rooms' events) before it counts as a slow consumer; the connection's answers to its own
    /// requests wait for room instead, so a large answer is paced by the peer's reading.
    pub outbound_queue_bytes: usize,
    /// Rooms one connection may open (subscribe in a `Resume`), and, per authenticated user
    /// across connections, twice as many: a token bucket per second with its burst.
    pub room_opens: RoomOpens,
    /// How long a connection keeps going after its token expired, for a `Reauth`, before it is
    /// closed with 4001. Nothing is delivered to it meanwhile.
    pub token_grace: Duration,
    /// How often the server pings; a connection silent for three intervals is closed. Keep it
    /// below 30 s: y-websocket clients drop a connection that brought them nothing for 30 s.
    pub heartbeat: Duration,
    /// How long a new connection may take to send its hello.
    pub hello_timeout: Duration,
    /// Largest number of documents one connection may subscribe.
    pub max_docs_per_connection: usize,
    /// The largest a document may grow, in stored bytes (snapshot plus log); a push beyond it
    /// is refused with `DocumentTooLarge` ([`DEFAULT_MAX_DOCUMENT_BYTES`]). Resume answers
    /// larger than a frame are sent in pieces, so every accepted document stays syncable.
    pub max_document_bytes: u64,
    /// How far ahead of the server's clock a new chat message's HLC stamp may be; one further
    /// ahead is refused (`SchemaViolation`), so that nobody can make a message sort after every
    /// later reply. A device whose clock runs further ahead has its messages accepted once the
    /// server's clock has caught up to within this bound (they wait in its outbox).
    pub max_clock_skew: Duration,
    /// Token verification; the default has no secret and runs open.
    pub auth: Auth,
    /// Per-connection rate limit.
    pub rate_limit: RateLimit,
    /// When to fold a document's log into its snapshot.
    pub compaction: CompactionPolicy,
    /// How often idle rooms are unloaded (after two sweeps without subscribers), the live
    /// documents of rooms unused for a whole interval evicted (reloaded from the store on next
    /// use), and grown logs compacted.
    pub sweep_interval: Duration,
    /// How rooms reach the other instances sharing the store (none by default).
    pub fanout: Arc<dyn Fanout>,
    /// How often the heads of the live rooms are compared with the store's, to catch up on
    /// what other instances stored and the fan-out did not bring (a lost last message, a broker
    /// down or absent). `None`: never (one instance alone on its store). `serve` sets it for a
    /// store other instances may share.
    pub head_check: Option<Duration>,
    /// Most connections open at once, WebSockets and plain HTTP alike; one more is answered
    /// `503` and closed at once. Default: [`default_max_connections`] (the open-files limit less
    /// [`FD_RESERVE`]).
    pub max_connections: usize,
    /// How long a request's head (request line and headers) may take to arrive, also the
    /// longest a keep-alive connection waits for its next request ([`DEFAULT_HEADER_READ_TIMEOUT`]).
    pub header_read_timeout: Duration,
    /// A connection that has not upgraded to a WebSocket is closed after this long without
    /// reading or writing a byte ([`DEFAULT_IDLE_TIMEOUT`]).
    pub idle_timeout: Duration,
    /// Web origins (`https://app.example`, exact, as browsers send them; `*` for any) whose pages
    /// may open WebSockets here: a browser upgrade with another `Origin` is refused with 403.
    /// `None`: any origin with a secret; on an open server only loopback origins
    /// (`http(s)://localhost`, `127.0.0.1`, `[::1]`, any port). An open server also answers only
    /// requests whose `Host` is a loopback name (against DNS rebinding), whatever this says.
    pub allowed_origins: Option<Vec<String>>,
    /// Largest frame accepted on `/v1/sync` before the hello is accepted, in bytes
    /// ([`DEFAULT_MAX_HELLO_FRAME`]); then `max_frame_size`. A larger one is refused from its
    /// header with close 1009, so an unauthenticated peer cannot make the server hold much.
    pub max_hello_frame: usize,
    /// TLS, terminated by the server itself (rustls): every connection must then speak TLS
    /// ([`tls_server_config`](crate::tls_server_config) makes one from PEM). `None`: plain
    /// TCP, for loopback or behind a proxy that terminates TLS.
    pub tls: Option<Arc<rustls::ServerConfig>>,
    /// Push notifications for members who are offline: a signed webhook per user and room
    /// (`serve --push-webhook-url`; see `push.rs`). `None`: off, and the store keeps no outbox.
    pub push: Option<crate::webhook::PushConfig>,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            max_frame_size: driftsync_protocol::DEFAULT_MAX_FRAME_SIZE,
            outbound_queue: 1024,
            outbound_queue_bytes: DEFAULT_OUTBOUND_QUEUE_BYTES,
            room_opens: RoomOpens::default(),
            token_grace: Duration::from_secs(10),
            heartbeat: Duration::from_secs(15),
            hello_timeout: Duration::from_secs(10),
            max_docs_per_connection: 1024,
            max_document_bytes: DEFAULT_MAX_DOCUMENT_BYTES,
            max_clock_skew: Duration::from_millis(driftsync_engine::clock::DEFAULT_MAX_CLOCK_SKEW_MS),
            auth: Auth::default(),
            rate_limit: RateLimit::default(),
            compaction: CompactionPolicy::default(),
            sweep_interval: Duration::from_secs(10),
            fanout: Arc::new(NoFanout),
            head_check: None,
            max_connections: default_max_connections(),
            header_read_timeout: DEFAULT_HEADER_READ_TIMEOUT,
            idle_timeout: DEFAULT_IDLE_TIMEOUT,
            allowed_origins: None,
            max_hello_frame: DEFAULT_MAX_HELLO_FRAME,
            tls: None,
            push: None,
        }
    }
}

/// The default [`Config::head_check`] for a store other instances may share.
pub const DEFAULT_HEAD_CHECK: Duration = Duration::from_secs(1);

/// The default [`Config::max_document_bytes`]: 16 MiB of stored bytes. A live yrs document
/// takes 10–15 times its encoded size in memory, so this keeps one room well below memory; a
/// resume answer larger than a frame goes in pieces (`ServerFrame::ResumePart`).
pub const DEFAULT_MAX_DOCUMENT_BYTES: u64 = 16 * 1024 * 1024;

/// The default [`Config::outbound_queue_bytes`]: two frames of the default size.
pub const DEFAULT_OUTBOUND_QUEUE_BYTES: usize = 2 * driftsync_protocol::DEFAULT_MAX_FRAME_SIZE;
