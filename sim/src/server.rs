//! The server instances of a simulation, through the server's in-process seam
//! (`driftsync_server::sim::Instance`): started on the shared store without HTTP, connected to
//! over in-memory streams, crashed at once.
//!
//! Until the seam is merged (feature `seam` off), [`Instance::start`] is a stub that panics.

use std::sync::Arc;

use driftsync_server::Config;
use tokio::io::DuplexStream;

use crate::store::MemStore;

/// One running server instance.
#[derive(Debug)]
pub struct Instance {
    #[cfg(feature = "seam")]
    inner: driftsync_server::sim::Instance,
}

#[cfg(feature = "seam")]
impl Instance {
    /// Starts an instance on `store` (its background tasks on the current runtime).
    pub fn start(store: Arc<MemStore>, config: Config) -> Instance {
        Instance {
            inner: driftsync_server::sim::Instance::start(store, config),
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

#[cfg(not(feature = "seam"))]
impl Instance {
    /// Stub: the seam is not merged yet.
    pub fn start(_store: Arc<MemStore>, _config: Config) -> Instance {
        panic!("driftsync_server::sim::Instance is not available yet (build with the `seam` feature once it is)")
    }

    /// Stub.
    pub fn connect_native(&self) -> DuplexStream {
        tokio::io::duplex(1).0
    }

    /// Stub.
    pub fn connect_yjs(&self, _doc: &str) -> DuplexStream {
        tokio::io::duplex(1).0
    }

    /// Stub.
    pub fn crash(self) {}
}
