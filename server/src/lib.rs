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
mod config;
mod driver;
mod event;
pub mod fanout;
mod handler;
mod hocuspocus;
mod http;
mod inbox;
mod instance;
mod limits;
mod metrics;
mod native;
mod owners;
mod presence;
pub mod push;
mod queue;
pub mod redis_fanout;
mod room;
mod rooms;
#[doc(hidden)]
pub mod sim;
mod socket;
mod tasks;
mod tls;
mod web;
mod webhook;
mod yjs;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use std::collections::HashMap;

use axum::extract::rejection::QueryRejection;
use axum::extract::{Query, State};
use axum::http::Uri;
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;
use driftsync_engine::store::Store;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

pub use crate::auth::{mint, Access, Auth, Claims, Grant};
pub use crate::config::{
    default_max_connections, raise_open_files_limit, Config, CHAT_PREFIX, DEFAULT_HEADER_READ_TIMEOUT,
    DEFAULT_HEAD_CHECK, DEFAULT_IDLE_TIMEOUT, DEFAULT_MAX_DOCUMENT_BYTES, DEFAULT_MAX_HELLO_FRAME,
    DEFAULT_OUTBOUND_QUEUE_BYTES, FD_RESERVE,
};
pub use crate::fanout::{Fanout, FanoutEvent, Inbound, LocalFanout, NoFanout};
use crate::instance::{start_instance, Shared};
pub use crate::limits::{RateLimit, RoomOpens};
pub use crate::redis_fanout::RedisFanout;
pub use crate::tls::{server_config as tls_server_config, TlsError};
pub use crate::web::page_weight_gzipped;

/// Serves the web app at `/`, `/healthz`, `/metrics`, `/v1/sync`, `/yjs/{doc}` and `/hocuspocus` on
/// `listener` until `shutdown` resolves.
pub async fn serve<S: Store>(
    listener: TcpListener,
    store: S,
    config: Config,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let token = CancellationToken::new();
    let http_limits = http::Limits::of(&config);
    let open = config.auth.is_open();
    let (shared, committer_task) = start_instance(
        Arc::new(store),
        config,
        fanout::instance_id(),
        token.clone(),
        tasks::Tasks::default(),
    );
    // Push notifications: the store's outbox turned on, and this instance's delivery task.
    push::start(&shared);
    let at_shutdown = Arc::clone(&shared);
    let info = info_body(open);
    let mut app = Router::new()
        .route("/", get(web::index))
        .route("/assets/{file}", get(web::asset))
        .route(
            "/v1/info",
            get(move || async move { ([(axum::http::header::CONTENT_TYPE, "application/json")], info) }),
        )
        .route("/healthz", get(healthz))
        .route("/metrics", get(metrics_text::<S>))
        .route("/v1/sync", get(sync::<S>))
        .route("/yjs/{*doc}", get(yjs_upgrade::<S>))
        .route("/hocuspocus", get(hocuspocus_upgrade::<S>))
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

/// Upgrades `GET /yjs/{doc}?token=…` to a y-websocket connection, with the same frame limits and
/// small write buffer as the native endpoint.
async fn yjs_upgrade<S: Store>(
    State(shared): State<Arc<Shared<S>>>,
    uri: Uri,
    query: Result<Query<HashMap<String, String>>, QueryRejection>,
    ws: socket::Upgrade,
) -> impl IntoResponse {
    // The raw path, not axum's percent-decoded capture: the reference server names the room by
    // the raw path too, so both servers agree on which document a client opens.
    let raw_doc = uri.path().strip_prefix(ROUTE_PREFIX).unwrap_or_default().to_owned();
    let token = query.ok().and_then(|Query(mut params)| params.remove("token"));
    let max = shared.config.max_frame_size;
    let tasks = Arc::clone(&shared.tasks);
    ws.on_upgrade(&tasks, max, move |socket| {
        let auth = shared.config.auth.clone();
        crate::driver::run(shared, socket, move |session| {
            yjs::YjsHandler::new(auth, max, session, raw_doc, token)
        })
    })
}

/// Upgrades `GET /hocuspocus` to a connection speaking the Hocuspocus provider protocol: many
/// documents, each with its own token inside the protocol.
async fn hocuspocus_upgrade<S: Store>(State(shared): State<Arc<Shared<S>>>, ws: socket::Upgrade) -> impl IntoResponse {
    let max = shared.config.max_frame_size;
    let tasks = Arc::clone(&shared.tasks);
    ws.on_upgrade(&tasks, max, move |socket| {
        let auth = shared.config.auth.clone();
        let (max_docs, grace) = (shared.config.max_docs_per_connection, shared.config.token_grace);
        crate::driver::run(shared, socket, move |session| {
            hocuspocus::HocuspocusHandler::new(auth, max, max_docs, grace, session)
        })
    })
}

/// The path the y-websocket route is mounted at; the document id follows it.
const ROUTE_PREFIX: &str = "/yjs/";

/// `GET /v1/info`: what a web page needs to know before it connects.
fn info_body(open: bool) -> String {
    serde_json::json!({ "version": env!("CARGO_PKG_VERSION"), "auth": !open }).to_string()
}

async fn healthz() -> &'static str {
    "ok"
}

async fn metrics_text<S: Store>(State(shared): State<Arc<Shared<S>>>) -> impl IntoResponse {
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        {
            let mut text = shared.metrics.render();
            // The registry ends with "# EOF": the fan-out's lines go before it.
            let fanout = shared.config.fanout.metrics_text();
            if let Some(body) = text.strip_suffix("# EOF\n") {
                text = format!("{body}{fanout}# EOF\n");
            } else {
                text.push_str(&fanout);
            }
            text
        },
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
