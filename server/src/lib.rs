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
//! overflow closes the connection with the resync code. `GET /metrics` serves Prometheus metrics.
//! Rooms publish their updates through a [`Fanout`] so that several instances sharing one store
//! can serve one document; idle rooms are unloaded and logs compacted in the background.
//!
//! Shutdown is a parameter: [`serve`] takes a future; when it resolves, every connection is
//! closed with "going away" and `serve` returns once the HTTP server has stopped. Every write is
//! committed before it is acknowledged, so nothing acknowledged is pending at exit.

pub mod auth;
mod commit;
pub mod fanout;
mod limits;
mod metrics;
mod native;
mod presence;
mod queue;
mod room;
mod socket;
mod yjs;

use std::future::Future;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::response::IntoResponse;
use axum::routing::get;
use axum::serve::ListenerExt;
use axum::Router;
use driftsync_engine::store::{CompactionPolicy, Store};
use driftsync_engine::sync::Limits;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

pub use crate::auth::{mint, Access, Auth, Claims, Grant};
use crate::commit::Committer;
pub use crate::fanout::{Fanout, LocalFanout, NoFanout};
pub use crate::limits::RateLimit;
use crate::metrics::Metrics;
use crate::room::{RoomCtx, Rooms};

/// Documents whose id starts with this are chat rooms: updates to them must follow the chat
/// rules of `driftsync_engine::chat` (ARCHITECTURE.md, "Chat and receipts schema").
pub const CHAT_PREFIX: &str = "chat/";

/// Server settings; [`Config::default`] is what `driftsync serve` uses.
#[derive(Debug, Clone)]
pub struct Config {
    /// Largest frame accepted, in bytes.
    pub max_frame_size: usize,
    /// Frames queued for one connection before it counts as a slow consumer and is told to
    /// resync.
    pub outbound_queue: usize,
    /// How often the server pings; a connection silent for three intervals is closed. Keep it
    /// below 30 s: y-websocket clients drop a connection that brought them nothing for 30 s.
    pub heartbeat: Duration,
    /// How long a new connection may take to send its hello.
    pub hello_timeout: Duration,
    /// Largest number of documents one connection may subscribe.
    pub max_docs_per_connection: usize,
    /// Bounds on updates waiting for predecessors.
    pub limits: Limits,
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
}

impl Default for Config {
    fn default() -> Self {
        Config {
            max_frame_size: driftsync_protocol::DEFAULT_MAX_FRAME_SIZE,
            outbound_queue: 1024,
            heartbeat: Duration::from_secs(15),
            hello_timeout: Duration::from_secs(10),
            max_docs_per_connection: 1024,
            limits: Limits::default(),
            auth: Auth::default(),
            rate_limit: RateLimit::default(),
            compaction: CompactionPolicy::default(),
            sweep_interval: Duration::from_secs(10),
            fanout: Arc::new(NoFanout),
        }
    }
}

/// What every connection shares.
struct Shared<S> {
    store: Arc<S>,
    /// Writes pushed updates in groups (one transaction for many batches).
    committer: Committer,
    config: Config,
    rooms: Rooms,
    /// Prometheus metrics, served at `/metrics`.
    metrics: Arc<Metrics>,
    /// Session ids, unique per process: they name connections in presence and logs.
    next_session: AtomicU64,
    /// Cancelled at shutdown; every connection's token is a child of it.
    shutdown: CancellationToken,
}

/// Serves `/healthz`, `/v1/sync` and `/yjs/{doc}` on `listener` until `shutdown` resolves.
pub async fn serve<S: Store>(
    listener: TcpListener,
    store: S,
    config: Config,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let token = CancellationToken::new();
    let store = Arc::new(store);
    let (committer, committer_task) = Committer::start(Arc::clone(&store));
    let metrics = Arc::new(Metrics::new());
    let instance = fanout::instance_id();
    let mut remote = config.fanout.join(instance);
    let rooms = Rooms::new(RoomCtx {
        metrics: Arc::clone(&metrics),
        fanout: Arc::clone(&config.fanout),
        instance,
    });
    let shared = Arc::new(Shared {
        store,
        committer,
        config,
        rooms,
        metrics,
        next_session: AtomicU64::new(1),
        shutdown: token.clone(),
    });
    // Expires silent presence until shutdown; it ends with the shutdown token.
    tokio::spawn(presence::run_sweeper(Arc::clone(&shared)));
    // Updates stored by other instances, for the rooms loaded here.
    let fan_in = Arc::clone(&shared);
    tokio::spawn(async move {
        loop {
            let next = tokio::select! {
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
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(sweeper.config.sweep_interval);
        tick.tick().await;
        loop {
            tokio::select! {
                () = sweeper.shutdown.cancelled() => break,
                _ = tick.tick() => sweeper.rooms.sweep(&*sweeper.store, &sweeper.config.compaction).await,
            }
        }
    });
    let at_shutdown = Arc::clone(&shared);
    let app = Router::new()
        .route("/healthz", get(healthz))
        .route("/metrics", get(metrics_text::<S>))
        .route("/v1/sync", get(sync::<S>))
        .route("/yjs/{*doc}", get(yjs::upgrade::<S>))
        .with_state(shared);
    let stop = token.clone();
    tokio::spawn(async move {
        shutdown.await;
        stop.cancel();
    });
    // Small frames go out at once: latency matters more than packet count here.
    let listener = listener.tap_io(|tcp| {
        let _ = tcp.set_nodelay(true);
    });
    let result = axum::serve(listener, app)
        .with_graceful_shutdown(async move { token.cancelled().await })
        .await;
    // Fold grown logs into snapshots (bounded in time), so the next start loads fast. Appends
    // still in flight are safe: compaction never deletes an update it did not fold.
    let compaction = at_shutdown
        .rooms
        .compact_at_shutdown(&*at_shutdown.store, &at_shutdown.config.compaction);
    if tokio::time::timeout(SHUTDOWN_COMPACTION, compaction).await.is_err() {
        tracing::warn!("compaction at shutdown did not finish in time");
    }
    drop(at_shutdown);
    // Connections were told to close; once they are gone, so is every handle to the committer,
    // which then finishes what is queued and stops. Nothing is acknowledged before it is
    // written, so nothing acknowledged can be lost here; the wait only lets in-flight batches land.
    if tokio::time::timeout(SHUTDOWN_GRACE, committer_task).await.is_err() {
        tracing::warn!("connections still open after the shutdown grace period");
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
    let max = shared.config.max_frame_size;
    ws.on_upgrade(max, move |socket| native::run(shared, socket))
}
