//! The driftsync server: axum on tokio.
//!
//! This is the minimal server the engine needs to be exercised end to end: `/healthz` and the
//! native endpoint `/v1/sync` (hello, multi-document resume in one round trip, pushes that are
//! acknowledged only after the store committed them, broadcast to the other subscribers,
//! presence and typing relayed, ping/pong heartbeats), and the y-websocket endpoint
//! `/yjs/{doc}` for stock Yjs clients on the same documents. Presence is shared by both
//! protocols, expires after 30 s without a refresh, and is removed when a connection leaves.
//!
//! With a secret ([`Config::auth`]) every connection presents an HS256 token naming its user, the
//! documents it may open and whether it may write ([`auth`]); in chat rooms (ids starting with
//! [`CHAT_PREFIX`]) every update is also checked against the chat rules for that user. Without a
//! secret the server runs open, so the binary binds it to loopback only.
//!
//! Limits: a maximum frame size, a maximum number of documents per connection, a token-bucket
//! rate limit per connection ([`RateLimit`]), and a bounded outbound queue per connection whose
//! overflow closes the connection with the resync code. Over HTTP: a maximum number of
//! connections ([`Config::max_connections`], one more gets `503`), header-read and idle timeouts,
//! a small frame limit until the native hello is accepted, and, on an open server, only
//! loopback `Host` names and browser origins ([`Config::allowed_origins`]). `GET /metrics`
//! serves Prometheus metrics.
//! Rooms publish their updates through a [`Fanout`] so that several instances sharing one store
//! can serve one document; idle rooms are unloaded and logs compacted in the background.
//!
//! Shutdown is a parameter: [`serve`] takes a future; when it resolves, every connection is
//! closed with "going away" and `serve` returns once the HTTP server has stopped. Every write is
//! committed before it is acknowledged, so nothing acknowledged is pending at exit.

pub mod auth;
mod commit;
mod driver;
mod event;
pub mod fanout;
mod handler;
mod http;
mod limits;
mod metrics;
mod native;
mod owners;
mod presence;
mod queue;
mod room;
mod rooms;
#[doc(hidden)]
pub mod sim;
mod socket;
mod tasks;
mod yjs;

use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;
use driftsync_engine::store::{CompactionPolicy, Store};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

pub use crate::auth::{mint, Access, Auth, Claims, Grant};
use crate::commit::Committer;
pub use crate::fanout::{Fanout, LocalFanout, NoFanout};
pub use crate::limits::{RateLimit, RoomOpens};
use crate::metrics::Metrics;
use crate::rooms::{RoomCtx, Rooms};
use crate::tasks::Tasks;

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
            max_connections: default_max_connections(),
            header_read_timeout: DEFAULT_HEADER_READ_TIMEOUT,
            idle_timeout: DEFAULT_IDLE_TIMEOUT,
            allowed_origins: None,
            max_hello_frame: DEFAULT_MAX_HELLO_FRAME,
        }
    }
}

/// The default [`Config::max_document_bytes`]: 16 MiB of stored bytes. A live yrs document
/// takes 10–15 times its encoded size in memory, so this keeps one room well below memory; a
/// resume answer larger than a frame goes in pieces (`ServerFrame::ResumePart`).
pub const DEFAULT_MAX_DOCUMENT_BYTES: u64 = 16 * 1024 * 1024;

/// The default [`Config::outbound_queue_bytes`]: two frames of the default size.
pub const DEFAULT_OUTBOUND_QUEUE_BYTES: usize = 2 * driftsync_protocol::DEFAULT_MAX_FRAME_SIZE;

/// What every connection shares.
struct Shared<S> {
    store: Arc<S>,
    /// Writes pushed updates in groups (one transaction for many batches).
    committer: Committer,
    config: Config,
    /// What native connections need of `config`.
    native: Arc<native::Settings>,
    rooms: Rooms,
    /// Prometheus metrics, served at `/metrics`.
    metrics: Arc<Metrics>,
    /// Rooms opened per user, across connections.
    opens: limits::UserOpens,
    /// Session ids, unique per process: they name connections in presence and logs.
    next_session: AtomicU64,
    /// Cancelled at shutdown; every connection's token is a child of it.
    shutdown: CancellationToken,
    /// Every task of the instance (connections tracked for shutdown).
    tasks: Arc<Tasks>,
}

impl<S> Shared<S> {
    /// A new connection's session id.
    fn next_session(&self) -> u64 {
        self.next_session.fetch_add(1, Ordering::Relaxed)
    }
}

/// An instance of the server without its HTTP listener: the shared state and the background
/// tasks (committer, presence expiry, fan-in from other instances, sweeps). `serve` runs one
/// behind the accept loop; the simulation runs several on in-memory streams.
///
/// Also returns the committer's task, which ends once every handle to the committer (the
/// shared state's) is gone, after writing what was queued.
fn start_instance<S: Store>(
    store: Arc<S>,
    config: Config,
    instance: u64,
    token: CancellationToken,
) -> (Arc<Shared<S>>, tokio::task::JoinHandle<()>) {
    let tasks = Arc::new(Tasks::default());
    let mut committer_task = None;
    let committer = Committer::start(Arc::clone(&store), |run| {
        committer_task = Some(tasks.spawn(run.run()));
    });
    let committer_task = committer_task.unwrap_or_else(|| tokio::spawn(async {}));
    let metrics = Arc::new(Metrics::new());
    let mut remote = config.fanout.join(instance);
    let rooms = Rooms::new(RoomCtx::new(
        Arc::clone(&metrics),
        Arc::clone(&config.fanout),
        instance,
        config.max_document_bytes,
        u64::try_from(config.max_clock_skew.as_millis()).unwrap_or(u64::MAX),
    ));
    let shared = Arc::new(Shared {
        store,
        committer,
        native: Arc::new(native::Settings::of(&config)),
        config,
        rooms,
        metrics,
        opens: limits::UserOpens::default(),
        // Session ids name awareness clients across instances too: the instance's id in the
        // high bits keeps them apart (and below 2^53, a JavaScript number).
        next_session: AtomicU64::new(((instance & 0xF_FFFF) << 32) | 1),
        shutdown: token,
        tasks,
    });
    // Expires silent presence until shutdown.
    let expiry = Arc::clone(&shared);
    shared.tasks.spawn(async move {
        let mut ticker = tokio::time::interval(presence::PRESENCE_SWEEP);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                biased;
                () = expiry.shutdown.cancelled() => return,
                _ = ticker.tick() => expiry.rooms.expire_presence(),
            }
        }
    });
    // Updates stored by other instances, for the rooms loaded here.
    let fan_in = Arc::clone(&shared);
    shared.tasks.spawn(async move {
        loop {
            let next = tokio::select! {
                biased;
                () = fan_in.shutdown.cancelled() => break,
                next = remote.recv() => next,
            };
            match next {
                Some((doc, fanout::FanoutEvent::Update { cursor, update })) => {
                    fan_in.rooms.remote_update(&*fan_in.store, &doc, cursor, &update).await;
                }
                Some((
                    doc,
                    fanout::FanoutEvent::Presence {
                        peer,
                        user,
                        clock,
                        state,
                    },
                )) => {
                    fan_in.rooms.remote_presence(&doc, peer, user, clock, state).await;
                }
                None => break,
            }
        }
    });
    // Unloads idle rooms and compacts grown logs.
    let sweeper = Arc::clone(&shared);
    shared.tasks.spawn(async move {
        let mut tick = tokio::time::interval(sweeper.config.sweep_interval);
        tick.tick().await;
        loop {
            tokio::select! {
                biased;
                () = sweeper.shutdown.cancelled() => break,
                _ = tick.tick() => sweeper.rooms.sweep(&*sweeper.store, &sweeper.config.compaction).await,
            }
        }
    });
    (shared, committer_task)
}

/// Serves `/healthz`, `/v1/sync` and `/yjs/{doc}` on `listener` until `shutdown` resolves.
pub async fn serve<S: Store>(
    listener: TcpListener,
    store: S,
    config: Config,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let token = CancellationToken::new();
    let http_limits = http::Limits::of(&config);
    let open = config.auth.is_open();
    let (shared, committer_task) = start_instance(Arc::new(store), config, fanout::instance_id(), token.clone());
    let at_shutdown = Arc::clone(&shared);
    let mut app = Router::new()
        .route("/healthz", get(healthz))
        .route("/metrics", get(metrics_text::<S>))
        .route("/v1/sync", get(sync::<S>))
        .route("/yjs/{*doc}", get(yjs::upgrade::<S>))
        .with_state(shared);
    if open {
        // Against DNS rebinding: a web page cannot reach an open server under its own name.
        app = app.layer(axum::middleware::from_fn(http::require_loopback_host));
    }
    let stop = token.clone();
    tokio::spawn(async move {
        shutdown.await;
        stop.cancel();
    });
    // Our accept loop: timeouts, a connection limit, accept errors handled (see `http`).
    let result = http::serve(listener, app, http_limits, token).await;
    // Fold grown logs into snapshots (bounded in time), so the next start loads fast. Appends
    // still in flight are safe: compaction never deletes an update it did not fold.
    let compaction = at_shutdown
        .rooms
        .compact_at_shutdown(&*at_shutdown.store, &at_shutdown.config.compaction);
    if tokio::time::timeout(SHUTDOWN_COMPACTION, compaction).await.is_err() {
        tracing::warn!("compaction at shutdown did not finish in time");
    }
    // Connections were told to close; they finish their in-flight batches (nothing is
    // acknowledged before it is written, so nothing acknowledged can be lost here; the wait only
    // lets in-flight batches land and their acknowledgements go out).
    if tokio::time::timeout(SHUTDOWN_GRACE, at_shutdown.tasks.connections_ended())
        .await
        .is_err()
    {
        tracing::warn!("connections still open after the shutdown grace period");
    }
    // Then the committer finishes what is queued and stops, once the background tasks have
    // seen the shutdown and dropped their handles to the shared state.
    drop(at_shutdown);
    if tokio::time::timeout(SHUTDOWN_GRACE, committer_task).await.is_err() {
        tracing::warn!("the committer did not finish in time");
    }
    result
}

/// How long shutdown may spend compacting logs.
const SHUTDOWN_COMPACTION: Duration = Duration::from_secs(5);

/// How long shutdown waits for connections to finish their in-flight batches.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

async fn healthz() -> &'static str {
    "ok"
}

async fn metrics_text<S: Store>(State(shared): State<Arc<Shared<S>>>) -> impl IntoResponse {
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        shared.metrics.render(),
    )
}

async fn sync<S: Store>(State(shared): State<Arc<Shared<S>>>, ws: socket::Upgrade) -> impl IntoResponse {
    // Small until the hello is accepted; `native::hello` raises it to `max_frame_size`.
    let max = shared.config.max_hello_frame.min(shared.config.max_frame_size);
    let tasks = Arc::clone(&shared.tasks);
    ws.on_upgrade(&tasks, max, move |socket| {
        let settings = Arc::clone(&shared.native);
        driver::run(shared, socket, move |session| {
            native::NativeHandler::new(settings, session)
        })
    })
}

impl<S: Store> socket::OriginCheck for Arc<Shared<S>> {
    fn origin_allowed(&self, origin: &axum::http::HeaderValue) -> bool {
        http::origin_allowed(&self.config, origin)
    }
}
