//! The server instances of a simulation, through the server's in-process seam
//! (`driftsync_server::sim::Instance`): started on the shared store without HTTP, connected to
//! over in-memory streams, crashed at once.

use std::sync::Arc;

use driftsync_server::Config;
use tokio::io::DuplexStream;

use crate::store::MemStore;

/// One running server instance.
#[derive(Debug)]
pub struct Instance {
    inner: driftsync_server::sim::Instance,
}

impl Instance {
    /// Starts an instance on `store` (its background tasks on the current runtime), with a fixed
    /// instance id so that runs of one seed stay alike.
    pub fn start(store: Arc<MemStore>, config: Config, id: u64) -> Instance {
        Instance {
            inner: driftsync_server::sim::Instance::start_with_id(store, config, id),
        }
    }

    /// A new native connection.
    pub fn connect_native(&self) -> DuplexStream {
        self.inner.connect_native()
    }

    /// A new y-websocket connection to `doc`.
    pub fn connect_yjs(&self, doc: &str) -> DuplexStream {
        self.inner.connect_yjs(doc, None)
    }

    /// Kills the instance; the store keeps what it committed.
    pub fn crash(self) {
        self.inner.crash();
    }
}
