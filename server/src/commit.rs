//! Group commit: many batches from many connections share one store transaction.
//!
//! Rooms hand their appends to one committer task per server. The task takes every request
//! waiting (up to [`MAX_GROUP`]), writes them with one `Store::append` call — one transaction,
//! one fsync — and answers each request. Durability therefore costs one commit per group, not
//! one per batch, and does not cap throughput.

use std::sync::Arc;

use driftsync_engine::store::{Append, Appended, Store};
use tokio::sync::{mpsc, oneshot};

/// The most appends written in one transaction.
const MAX_GROUP: usize = 512;
/// Requests that may wait for the committer; senders wait when it is full (back-pressure).
const QUEUE: usize = 4096;

type Reply = oneshot::Sender<Result<Appended, Arc<driftsync_engine::Error>>>;

/// A handle to the committer task.
#[derive(Clone)]
pub(crate) struct Committer {
    tx: mpsc::Sender<(Append, Reply)>,
}

impl Committer {
    /// Starts the committer task; it ends when every handle is dropped, after writing what
    /// was queued.
    pub(crate) fn start<S: Store>(store: Arc<S>) -> (Committer, tokio::task::JoinHandle<()>) {
        let (tx, rx) = mpsc::channel(QUEUE);
        let task = tokio::spawn(run(store, rx));
        (Committer { tx }, task)
    }

    /// Appends one update durably; returns once its transaction has committed.
    pub(crate) async fn append(&self, append: Append) -> Result<Appended, Arc<driftsync_engine::Error>> {
        let (reply, answer) = oneshot::channel();
        let closed = || Arc::new(driftsync_engine::Error::Invalid("the committer has stopped".into()));
        self.tx.send((append, reply)).await.map_err(|_| closed())?;
        answer.await.map_err(|_| closed())?
    }
}

async fn run<S: Store>(store: Arc<S>, mut rx: mpsc::Receiver<(Append, Reply)>) {
    let mut group: Vec<(Append, Reply)> = Vec::with_capacity(MAX_GROUP);
    while rx.recv_many(&mut group, MAX_GROUP).await > 0 {
        let (appends, replies): (Vec<Append>, Vec<Reply>) = group.drain(..).unzip();
        match store.append(&appends).await {
            Ok(results) => {
                for (reply, result) in replies.into_iter().zip(results) {
                    let _ = reply.send(Ok(result));
                }
            }
            Err(e) => {
                tracing::error!(error = %e, batches = appends.len(), "group commit failed");
                let e = Arc::new(e);
                for reply in replies {
                    let _ = reply.send(Err(Arc::clone(&e)));
                }
            }
        }
    }
}
