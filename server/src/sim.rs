//! A server instance without HTTP, for the deterministic simulation (`driftsync-sim`): it runs
//! the real rooms, committer, sweepers and connection driver with both protocol handlers, on
//! in-memory byte streams instead of upgraded TCP connections, on whatever runtime (and clock)
//! the caller runs. Not a public API.

use std::sync::Arc;

use driftsync_engine::store::Store;
use tokio::io::DuplexStream;
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::driver;
use crate::instance::{start_instance, Shared};
use crate::native::NativeHandler;
use crate::socket::Socket;
use crate::tasks::Tasks;
use crate::yjs::YjsHandler;

/// Bytes buffered in each direction of an in-memory connection.
const PIPE_BYTES: usize = 64 * 1024;

/// One server instance (see the module documentation).
pub struct Instance {
    connect: Box<dyn Connect>,
    token: CancellationToken,
}

/// Opens connections on an instance, whatever its store type.
trait Connect: Send + Sync {
    fn native(&self) -> DuplexStream;
    fn yjs(&self, doc: &str, token: Option<&str>) -> DuplexStream;
    fn abort(&self);
}

impl<S: Store> Connect for Arc<Shared<S>> {
    fn native(&self) -> DuplexStream {
        let (client, server) = tokio::io::duplex(PIPE_BYTES);
        let shared = Arc::clone(self);
        let max = shared.config.max_hello_frame.min(shared.config.max_frame_size);
        let socket = Socket::new(Box::new(server), max);
        let settings = Arc::clone(&shared.native);
        let tasks = Arc::clone(&shared.tasks);
        tasks.spawn_connection(driver::run(shared, socket, move |session| {
            NativeHandler::new(settings, session)
        }));
        client
    }

    fn yjs(&self, doc: &str, token: Option<&str>) -> DuplexStream {
        let (client, server) = tokio::io::duplex(PIPE_BYTES);
        let shared = Arc::clone(self);
        let max = shared.config.max_frame_size;
        let socket = Socket::new(Box::new(server), max);
        let auth = shared.config.auth.clone();
        let (doc, token) = (doc.to_owned(), token.map(str::to_owned));
        let tasks = Arc::clone(&shared.tasks);
        tasks.spawn_connection(driver::run(shared, socket, move |session| {
            YjsHandler::new(auth, max, session, doc, token)
        }));
        client
    }

    fn abort(&self) {
        self.tasks.abort_all();
    }
}

impl Instance {
    /// Starts an instance on `store` with `config` (several instances may share one store;
    /// give them one fan-out to share rooms), with a fan-out id derived from nothing random.
    /// Must be called within a tokio runtime.
    pub fn start<S: Store>(store: Arc<S>, config: Config) -> Instance {
        Instance::start_with_id(store, config, 1)
    }

    /// [`Instance::start`] with this instance's id on the fan-out (distinct per instance; it
    /// also keeps the instances' session ids apart).
    pub fn start_with_id<S: Store>(store: Arc<S>, config: Config, instance: u64) -> Instance {
        let token = CancellationToken::new();
        let (shared, _committer) = start_instance(store, config, instance, token.clone(), Tasks::abortable());
        Instance {
            connect: Box::new(shared),
            token,
        }
    }

    /// A new native (`/v1/sync`) connection, already upgraded: the client end of an in-memory
    /// byte stream on which the client speaks RFC 6455 client framing.
    pub fn connect_native(&self) -> DuplexStream {
        self.connect.native()
    }

    /// A new y-websocket connection to `doc` (the raw room name), with `?token=` if given.
    pub fn connect_yjs(&self, doc: &str, token: Option<&str>) -> DuplexStream {
        self.connect.yjs(doc, token)
    }

    /// Kills the instance: every task it spawned is aborted at once and its in-memory state
    /// dropped; what the store committed stays.
    pub fn crash(self) {
        self.connect.abort();
        self.token.cancel();
    }

    /// Stops the instance as `serve` does at shutdown: every connection is closed with "going
    /// away" (after its writer flushed what was queued).
    pub fn shutdown(self) {
        self.token.cancel();
    }
}

impl std::fmt::Debug for Instance {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Instance").finish_non_exhaustive()
    }
}
