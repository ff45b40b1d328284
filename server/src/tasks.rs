//! Every task a server instance spawns goes through [`Tasks`]: connections (and their writers)
//! are tracked, so that shutdown can wait for them to finish their in-flight batches; and, in
//! the deterministic simulation (`crate::sim`), every task can be aborted at once, which is what
//! a crash is there.
//!
//! No task is wrapped in an `async` block: one that awaits a future it captured keeps room for
//! it twice (rustc lays out the captured future and the awaited one separately), and every
//! connection would pay for that for its whole life — it cost 3.7 KB per idle connection.

use std::future::Future;
use std::sync::{Mutex, PoisonError};

use tokio::task::{AbortHandle, JoinHandle};
use tokio_util::task::TaskTracker;

/// The tasks of one server instance.
#[derive(Default)]
pub(crate) struct Tasks {
    /// Connections and their writers.
    connections: TaskTracker,
    /// Only in a simulation: a handle on every task spawned, to abort them at a crash.
    abortable: Option<Mutex<Abortable>>,
}

/// Handles on the tasks spawned (finished ones are dropped now and then: a finished task's
/// memory lives as long as a handle on it).
#[derive(Default)]
struct Abortable {
    handles: Vec<AbortHandle>,
    /// Purge the finished handles once there are this many.
    purge_at: usize,
}

impl Tasks {
    /// Tasks that a crash can abort (for the simulation).
    pub(crate) fn abortable() -> Tasks {
        Tasks {
            connections: TaskTracker::new(),
            abortable: Some(Mutex::default()),
        }
    }

    /// Spawns a connection's task (tracked: shutdown waits for it).
    pub(crate) fn spawn_connection<F>(&self, task: F) -> JoinHandle<()>
    where
        F: Future<Output = ()> + Send + 'static,
    {
        self.spawn(self.connections.track_future(task))
    }

    /// Spawns a background task (not tracked: it ends with the shutdown token).
    pub(crate) fn spawn<F>(&self, task: F) -> JoinHandle<()>
    where
        F: Future<Output = ()> + Send + 'static,
    {
        let handle = tokio::spawn(task);
        if let Some(abortable) = &self.abortable {
            let mut abortable = abortable.lock().unwrap_or_else(PoisonError::into_inner);
            if abortable.handles.len() >= abortable.purge_at {
                abortable.handles.retain(|handle| !handle.is_finished());
                abortable.purge_at = (abortable.handles.len() * 2).max(64);
            }
            abortable.handles.push(handle.abort_handle());
        }
        handle
    }

    /// Waits (after shutdown was asked for) until every connection task has ended.
    pub(crate) async fn connections_ended(&self) {
        self.connections.close();
        self.connections.wait().await;
    }

    /// Aborts every task at once (only abortable tasks, see [`Tasks::abortable`]): nothing is
    /// flushed, nothing more runs.
    pub(crate) fn abort_all(&self) {
        if let Some(abortable) = &self.abortable {
            let handles = std::mem::take(&mut abortable.lock().unwrap_or_else(PoisonError::into_inner).handles);
            for handle in handles {
                handle.abort();
            }
        }
    }
}
