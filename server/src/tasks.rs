//! Every task a server instance spawns goes through [`Tasks`]: connections (and their writers)
//! are tracked, so that shutdown can wait for them to finish their in-flight batches; and every
//! task, connection or background, can be aborted at once, which is what a crash is in the
//! deterministic simulation (`crate::sim`).

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex, PoisonError};

use tokio::task::{AbortHandle, JoinHandle};
use tokio_util::task::TaskTracker;

/// The tasks of one server instance.
#[derive(Default)]
pub(crate) struct Tasks {
    /// Connections and their writers.
    connections: TaskTracker,
    /// Every running task, to abort at a crash.
    running: Mutex<HashMap<tokio::task::Id, AbortHandle>>,
}

impl Tasks {
    /// Spawns a connection's task (tracked: shutdown waits for it).
    pub(crate) fn spawn_connection<F>(self: &Arc<Self>, task: F) -> JoinHandle<()>
    where
        F: Future<Output = ()> + Send + 'static,
    {
        let tracked = self.connections.track_future(task);
        self.spawn(tracked)
    }

    /// Spawns a background task (not tracked: it ends with the shutdown token).
    pub(crate) fn spawn<F>(self: &Arc<Self>, task: F) -> JoinHandle<()>
    where
        F: Future<Output = ()> + Send + 'static,
    {
        let tasks = Arc::clone(self);
        // Registered under the lock the task takes to unregister: it cannot finish first.
        let mut running = self.running.lock().unwrap_or_else(PoisonError::into_inner);
        let handle = tokio::spawn(async move {
            task.await;
            tasks
                .running
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .remove(&tokio::task::id());
        });
        running.insert(handle.id(), handle.abort_handle());
        handle
    }

    /// Waits (after shutdown was asked for) until every connection task has ended.
    pub(crate) async fn connections_ended(&self) {
        self.connections.close();
        self.connections.wait().await;
    }

    /// Aborts every task at once: nothing is flushed, nothing more runs.
    pub(crate) fn abort_all(&self) {
        let running = std::mem::take(&mut *self.running.lock().unwrap_or_else(PoisonError::into_inner));
        for handle in running.into_values() {
            handle.abort();
        }
    }
}
