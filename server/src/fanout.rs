//! The fan-out seam: how rooms of several server instances share their events.
//!
//! A room publishes every stored update (with its cursor) and every presence change through a
//! [`Fanout`]; each instance receives the others' events and hands them to its own rooms, which
//! apply them and pass them to their local subscribers. [`LocalFanout`] connects instances in
//! one process (tests, embedding); a Redis or NATS implementation plugs in behind the same trait
//! without touching the rooms.
//!
//! Correctness does not rest on the fan-out delivering everything in order: updates carry their
//! store-assigned cursors, and a room that sees a gap reads the missing entries from the shared
//! store before applying. Fan-out queues are bounded; an instance that falls behind loses events
//! from the queue (logged), and the next update it does receive fills the gap from the store.

use std::sync::{Arc, Mutex, PoisonError};

use driftsync_protocol::{Cursor, DocId};
use tokio::sync::mpsc;

/// Events published between instances.
#[derive(Debug, Clone)]
pub enum FanoutEvent {
    /// An update stored at `cursor`.
    Update {
        /// Its cursor in the shared store.
        cursor: Cursor,
        /// The yrs v1 update.
        update: Arc<[u8]>,
    },
    /// A connection's presence changed (`None`: it left).
    Presence {
        /// The connection (session) or Yjs awareness client id.
        peer: u64,
        /// The user.
        user: String,
        /// The awareness clock.
        clock: u64,
        /// The state (JSON), or `None` when it left.
        state: Option<String>,
    },
}

/// Where an instance receives the events of the others.
pub type FanoutReceiver = mpsc::Receiver<(DocId, FanoutEvent)>;

/// Connects the rooms of several server instances.
pub trait Fanout: std::fmt::Debug + Send + Sync + 'static {
    /// Registers an instance; events published by the others arrive on the returned receiver.
    fn join(&self, instance: u64) -> FanoutReceiver;
    /// Publishes an event of a room to every other instance.
    fn publish(&self, instance: u64, doc: &DocId, event: FanoutEvent);
}

/// A random id for a server instance on the fan-out.
pub(crate) fn instance_id() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    // RandomState is seeded randomly per process; mixing in a counter separates instances of
    // one process.
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed));
    h.finish()
}

/// Capacity of an instance's inbound fan-out queue.
pub const FANOUT_QUEUE: usize = 4096;

/// One instance alone: nothing to share.
#[derive(Debug, Default, Clone, Copy)]
pub struct NoFanout;

impl Fanout for NoFanout {
    fn join(&self, _instance: u64) -> FanoutReceiver {
        // A receiver whose sender is gone: it yields nothing and ends at once.
        mpsc::channel(1).1
    }

    fn publish(&self, _instance: u64, _doc: &DocId, _event: FanoutEvent) {}
}

/// Where one instance of a [`LocalFanout`] receives: its id and its channel.
type Inbox = (u64, mpsc::Sender<(DocId, FanoutEvent)>);

/// Instances in one process, connected by bounded channels.
#[derive(Debug, Default, Clone)]
pub struct LocalFanout {
    instances: Arc<Mutex<Vec<Inbox>>>,
}

impl Fanout for LocalFanout {
    fn join(&self, instance: u64) -> FanoutReceiver {
        let (tx, rx) = mpsc::channel(FANOUT_QUEUE);
        self.instances
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push((instance, tx));
        rx
    }

    fn publish(&self, instance: u64, doc: &DocId, event: FanoutEvent) {
        let mut instances = self.instances.lock().unwrap_or_else(PoisonError::into_inner);
        instances.retain(|(id, tx)| {
            if *id == instance {
                return true;
            }
            match tx.try_send((doc.clone(), event.clone())) {
                Ok(()) => true,
                Err(mpsc::error::TrySendError::Full(_)) => {
                    tracing::warn!(instance = id, doc = %doc, "fan-out queue full: the instance will fill the gap from the store");
                    true
                }
                // The instance stopped.
                Err(mpsc::error::TrySendError::Closed(_)) => false,
            }
        });
    }
}
