//! Group commit: many batches from many connections share one store transaction.
//!
//! Rooms hand their appends to one committer task per server. The task takes every request
//! waiting (up to [`MAX_GROUP`]), writes them with one `Store::append` call — one transaction,
//! one fsync — and answers each request. Durability therefore costs one commit per group, not
//! one per batch, and does not cap throughput.
//!
//! Rooms do not wait for their commits (see `Room::push`): a document may have several appends
//! queued here, applied to its live document one after the other. If one of them fails, the
//! ones queued after it may depend on it and must not be stored without it: every append names
//! its room's [`Gate`] and the room's epoch when it was queued; a failed append closes the gate
//! up to its epoch, and the committer fails every later append of that epoch or before, until
//! the room has recovered and moved to a new epoch.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use driftsync_engine::store::{Append, Appended, Store};
use tokio::sync::{mpsc, oneshot};

/// The most appends written in one transaction.
const MAX_GROUP: usize = 512;
/// Requests that may wait for the committer; senders wait when it is full (back-pressure).
const QUEUE: usize = 4096;

/// What a commit ends with: where the update is stored, or why it is not.
pub(crate) type CommitResult = Result<Appended, Arc<driftsync_engine::Error>>;

/// A document's commit gate (see the module documentation): appends of epochs up to
/// `failed_through` fail without being written.
#[derive(Debug, Default)]
pub(crate) struct Gate {
    failed_through: AtomicU64,
}

impl Gate {
    /// The newest epoch whose appends fail.
    pub(crate) fn failed_through(&self) -> u64 {
        self.failed_through.load(Ordering::Acquire)
    }
}

struct Request {
    append: Append,
    gate: Arc<Gate>,
    epoch: u64,
    reply: oneshot::Sender<CommitResult>,
}

/// A handle to the committer task.
#[derive(Clone)]
pub(crate) struct Committer {
    tx: mpsc::Sender<Request>,
}

impl Committer {
    /// Starts the committer task with `spawn`; it ends when every handle is dropped, after
    /// writing what was queued.
    pub(crate) fn start<S: Store>(store: Arc<S>, spawn: impl FnOnce(RunCommitter<S>)) -> Committer {
        let (tx, rx) = mpsc::channel(QUEUE);
        spawn(RunCommitter { store, rx });
        Committer { tx }
    }

    /// Queues one update for a durable append (waiting while the queue is full) and returns
    /// where its result will arrive: after its transaction committed or failed.
    pub(crate) async fn enqueue(&self, append: Append, gate: Arc<Gate>, epoch: u64) -> oneshot::Receiver<CommitResult> {
        let (reply, answer) = oneshot::channel();
        // A stopped committer drops the request, and its reply with it: the receiver then
        // reports the commit as failed.
        let _ = self
            .tx
            .send(Request {
                append,
                gate,
                epoch,
                reply,
            })
            .await;
        answer
    }
}

/// The committer's loop, to be spawned (see [`Committer::start`]).
pub(crate) struct RunCommitter<S> {
    store: Arc<S>,
    rx: mpsc::Receiver<Request>,
}

impl<S: Store> RunCommitter<S> {
    /// Writes groups until every [`Committer`] handle is gone.
    pub(crate) async fn run(mut self) {
        let mut group: Vec<Request> = Vec::with_capacity(MAX_GROUP);
        while self.rx.recv_many(&mut group, MAX_GROUP).await > 0 {
            let mut appends = Vec::with_capacity(group.len());
            let mut waiting = Vec::with_capacity(group.len());
            for Request {
                append,
                gate,
                epoch,
                reply,
            } in group.drain(..)
            {
                if epoch <= gate.failed_through() {
                    // An earlier append of the same document failed and the room has not
                    // recovered: this one was applied after it and may depend on it.
                    let e = driftsync_engine::Error::Invalid("an earlier commit of this document failed".into());
                    let _ = reply.send(Err(Arc::new(e)));
                } else {
                    appends.push(append);
                    waiting.push((gate, epoch, reply));
                }
            }
            if appends.is_empty() {
                continue;
            }
            match self.store.append(&appends).await {
                Ok(results) => {
                    for ((_, _, reply), result) in waiting.into_iter().zip(results) {
                        let _ = reply.send(Ok(result));
                    }
                }
                Err(e) => {
                    tracing::error!(error = %e, batches = appends.len(), "group commit failed");
                    let e = Arc::new(e);
                    for (gate, epoch, reply) in waiting {
                        gate.failed_through.fetch_max(epoch, Ordering::AcqRel);
                        let _ = reply.send(Err(Arc::clone(&e)));
                    }
                }
            }
        }
    }
}
