//! One sync pass over the native protocol: hello, one resume of every known document, pushes of
//! the outbox, and acknowledgements.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use driftsync_engine::doc::{is_empty_update, state_vector};
use driftsync_engine::store::Store;
use driftsync_engine::sync::{apply_remote, plan_pushes, Limits, PlannedPush, MERGED_PUSH_BYTES};
use driftsync_protocol::{
    ClientFrame, DocId, DocResumed, ResumeDoc, ServerFrame, DEFAULT_MAX_FRAME_SIZE, PROTOCOL_VERSION,
};
use futures_util::{SinkExt, StreamExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message as WsMessage;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

use crate::{Client, Error, Result};

/// How long one sync pass may take before it gives up.
pub const SYNC_TIMEOUT: Duration = Duration::from_secs(30);

/// What one sync pass did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SyncReport {
    /// Documents resumed.
    pub documents: usize,
    /// Bytes of frames sent (frame payloads, without WebSocket framing).
    pub bytes_sent: u64,
    /// Bytes of frames received.
    pub bytes_received: u64,
    /// Round trips waited for: one for the resume (pushes are pipelined).
    pub round_trips: u32,
    /// Pushes sent (an outbox of many batches goes up merged, see `Client::sync_once`).
    pub pushes: usize,
}

impl SyncReport {
    /// The report as one line of JSON.
    pub fn to_json(&self) -> String {
        serde_json::json!({
            "documents": self.documents,
            "bytes_sent": self.bytes_sent,
            "bytes_received": self.bytes_received,
            "round_trips": self.round_trips,
            "pushes": self.pushes,
        })
        .to_string()
    }
}

/// A WebSocket that counts the bytes of the frames it carries.
struct Connection {
    ws: WebSocketStream<MaybeTlsStream<TcpStream>>,
    report: SyncReport,
}

impl Connection {
    async fn send(&mut self, frame: &ClientFrame) -> Result<()> {
        let bytes = frame.encode();
        self.report.bytes_sent += bytes.len() as u64;
        self.ws.send(WsMessage::Binary(bytes.into())).await?;
        Ok(())
    }

    /// The next frame, answering pings; `Error::Closed` when the connection ends.
    async fn recv(&mut self) -> Result<ServerFrame> {
        loop {
            match self.ws.next().await {
                Some(Ok(WsMessage::Binary(bytes))) => {
                    self.report.bytes_received += bytes.len() as u64;
                    let frame = ServerFrame::decode(&bytes, DEFAULT_MAX_FRAME_SIZE)
                        .map_err(|e| Error::Protocol(format!("undecodable frame: {e}")))?;
                    match frame {
                        ServerFrame::Ping { nonce } => self.send(&ClientFrame::Pong { nonce }).await?,
                        ServerFrame::Error { code, doc, batch } => return Err(Error::Server { code, doc, batch }),
                        other => return Ok(other),
                    }
                }
                Some(Ok(WsMessage::Close(_))) | None => return Err(Error::Closed),
                Some(Ok(_)) => continue,
                Some(Err(e)) => return Err(e.into()),
            }
        }
    }
}

impl Client {
    /// Connects to `url` (`ws://host:port`), resumes every known document, pushes the outbox and
    /// returns once every pushed batch is acknowledged. Gives up after [`SYNC_TIMEOUT`].
    pub async fn sync_once(&mut self, url: &str, token: &str) -> Result<SyncReport> {
        match tokio::time::timeout(SYNC_TIMEOUT, self.sync_pass(url, token)).await {
            Ok(result) => result,
            Err(_) => Err(Error::Timeout(SYNC_TIMEOUT)),
        }
    }

    async fn sync_pass(&mut self, url: &str, token: &str) -> Result<SyncReport> {
        let endpoint = format!("{}/v1/sync", url.trim_end_matches('/'));
        let (ws, _) = tokio_tungstenite::connect_async(endpoint).await?;
        let mut conn = Connection {
            ws,
            report: SyncReport::default(),
        };
        conn.send(&ClientFrame::Hello {
            version: PROTOCOL_VERSION,
            token: token.to_string(),
            client_id: self.identity.client_id,
        })
        .await?;
        let max_push_bytes = match conn.recv().await? {
            ServerFrame::Welcome { max_frame_size, .. } => push_budget(max_frame_size),
            other => return Err(Error::Protocol(format!("expected a welcome, got {other:?}"))),
        };

        self.reset_parts();
        let ids = self.documents().await?;
        let resume = self.resume_request(&ids).await?;
        conn.report.documents = resume.len();
        if resume.is_empty() {
            let _ = conn.ws.close(None).await;
            return Ok(conn.report);
        }
        conn.send(&ClientFrame::Resume { docs: resume }).await?;
        conn.report.round_trips = 1;

        let limits = Limits::default();
        let mut resumed = false;
        let mut resumed_docs: HashSet<String> = HashSet::new();
        // Pushed batches not acknowledged yet, per document.
        let mut unacked: HashMap<String, HashSet<u64>> = HashMap::new();
        loop {
            if resumed && unacked.values().all(HashSet::is_empty) {
                break;
            }
            match conn.recv().await? {
                ServerFrame::Resumed { docs } => {
                    for answer in docs {
                        let id = answer.doc.as_str().to_string();
                        let doc = answer.doc.clone();
                        let (_, pushes) = self.take_resumed(answer, &limits, max_push_bytes).await?;
                        for (batch, update) in pushes {
                            unacked.entry(id.clone()).or_default().insert(batch);
                            conn.report.pushes += 1;
                            conn.send(&ClientFrame::Push {
                                doc: doc.clone(),
                                batch,
                                update,
                            })
                            .await?;
                        }
                        resumed_docs.insert(id);
                    }
                    resumed = true;
                }
                ServerFrame::Update {
                    doc: id,
                    cursor,
                    update,
                } => {
                    let id = id.as_str().to_string();
                    let answered = resumed_docs.contains(&id);
                    self.take_update(&id, cursor, update, answered, &limits).await?;
                }
                ServerFrame::ResumePart { doc, bytes } => self.take_part(doc.as_str(), &bytes)?,
                ServerFrame::Ack { doc: id, batch, cursor } => {
                    let id = id.as_str().to_string();
                    self.take_ack(&id, batch, cursor, resumed_docs.contains(&id)).await?;
                    if let Some(pending) = unacked.get_mut(&id) {
                        // An acknowledgement covers the batch and every older one.
                        pending.retain(|&b| b > batch);
                    }
                }
                // Presence, typing and pongs do not concern a one-shot sync.
                _ => {}
            }
        }
        let _ = conn.ws.close(None).await;
        Ok(conn.report)
    }
}

impl Client {
    /// Like [`sync_once`](Self::sync_once), retried with `backoff` while the failure is
    /// retryable, at most `max_attempts` times.
    pub async fn sync_with_retry(
        &mut self,
        url: &str,
        token: &str,
        backoff: &mut crate::Backoff,
        max_attempts: u32,
    ) -> Result<SyncReport> {
        let mut tries = 0u32;
        loop {
            match self.sync_once(url, token).await {
                Ok(report) => {
                    backoff.reset();
                    return Ok(report);
                }
                Err(e) => {
                    tries += 1;
                    if !e.is_retryable() || tries >= max_attempts {
                        return Err(e);
                    }
                    tracing::debug!(error = %e, tries, "sync failed; retrying");
                    tokio::time::sleep(backoff.next_delay()).await;
                }
            }
        }
    }
}

/// The steps both the one-shot sync and the live session take on the client's documents and
/// store; they do no network I/O.
impl Client {
    /// One resume entry (server cursor and state vector) per document in `ids`.
    pub(crate) async fn resume_request(&mut self, ids: &[String]) -> Result<Vec<ResumeDoc>> {
        let mut resume = Vec::with_capacity(ids.len());
        for id in ids {
            let doc = self.document(id).await?;
            resume.push(ResumeDoc {
                doc: DocId::new(id.as_str()).map_err(Error::DocId)?,
                cursor: self.store.server_cursor(id).await?,
                state_vector: state_vector(&doc),
            });
        }
        Ok(resume)
    }

    /// Applies the server's resume answer for one document and returns whether it changed the
    /// document, and the pushes to send next (batch, update), oldest first: the outbox merged
    /// into pushes of at most `max_push_bytes` bytes of batches.
    pub(crate) async fn take_resumed(
        &mut self,
        mut answer: DocResumed,
        limits: &Limits,
        max_push_bytes: usize,
    ) -> Result<(bool, Vec<(u64, Vec<u8>)>)> {
        let id = answer.doc.as_str().to_string();
        let assembled = self.parts.remove(&id);
        if let Some(update) = answer.update.as_mut().filter(|update| update.is_empty()) {
            // The answer came ahead in pieces.
            *update = assembled
                .filter(|whole| !whole.is_empty())
                .ok_or_else(|| Error::Protocol(format!("the answer for {id} came in pieces, but none arrived")))?;
        }
        let doc = self.document(&id).await?;
        let changed = match answer.update {
            Some(update) => {
                let changed = !is_empty_update(&update);
                apply_remote(&doc, &update, limits)?;
                self.store.record_remote(&id, answer.cursor, &[update]).await?;
                changed
            }
            None => {
                self.store.record_remote(&id, answer.cursor, &[]).await?;
                false
            }
        };
        let outbox = self.store.outbox(Some(&id)).await?;
        let mut pushes = Vec::new();
        for push in plan_pushes(&doc, outbox, answer.state_vector.as_deref(), max_push_bytes)? {
            pushes.push(match push {
                PlannedPush::Outbox(entry) => (entry.batch, entry.update),
                PlannedPush::Recovery(update) => (self.store.record_local(&id, &update).await?, update),
            });
        }
        Ok((changed, pushes))
    }

    /// Forgets the pieces of resume answers received so far (a new connection starts over).
    pub(crate) fn reset_parts(&mut self) {
        self.parts = HashMap::new();
    }

    /// Keeps a piece of the resume answer for `doc` (see `ServerFrame::ResumePart`), at most
    /// [`MAX_ASSEMBLED_ANSWER`] bytes for all documents together.
    pub(crate) fn take_part(&mut self, doc: &str, bytes: &[u8]) -> Result<()> {
        let held: usize = self.parts.values().map(Vec::len).sum();
        if held + bytes.len() > MAX_ASSEMBLED_ANSWER {
            self.reset_parts();
            return Err(Error::Protocol(format!(
                "resume answers in pieces exceed {MAX_ASSEMBLED_ANSWER} bytes"
            )));
        }
        self.parts.entry(doc.to_string()).or_default().extend_from_slice(bytes);
        Ok(())
    }

    /// Applies an update the server broadcast. Before the document's resume answer (`answered`
    /// false) the cursor must not move: the answer may still carry older entries. The update is
    /// kept either way.
    pub(crate) async fn take_update(
        &mut self,
        id: &str,
        cursor: u64,
        update: Vec<u8>,
        answered: bool,
        limits: &Limits,
    ) -> Result<()> {
        let doc = self.document(id).await?;
        apply_remote(&doc, &update, limits)?;
        let cursor = if answered { cursor } else { 0 };
        self.store.record_remote(id, cursor, &[update]).await?;
        Ok(())
    }

    /// Records the server's acknowledgement of `batch` (and every older batch of the document).
    pub(crate) async fn take_ack(&mut self, id: &str, batch: u64, cursor: u64, answered: bool) -> Result<()> {
        self.store.acknowledge(id, batch).await?;
        if answered {
            self.store.record_remote(id, cursor, &[]).await?;
        }
        Ok(())
    }
}

/// The most bytes of resume answers a client assembles from pieces (`ServerFrame::ResumePart`)
/// at once: far above a server's default maximum document size, and a bound on what a server
/// can make a client hold.
pub const MAX_ASSEMBLED_ANSWER: usize = 256 * 1024 * 1024;

/// The most bytes of outbox batches one push may merge ([`MERGED_PUSH_BYTES`]), within half the
/// largest frame the server accepts (its `Welcome` says which), so that a merged push fits with
/// room to spare (merged, batches come out smaller than they were apart).
pub(crate) fn push_budget(max_frame_size: u32) -> usize {
    MERGED_PUSH_BYTES.min(usize::try_from(max_frame_size).unwrap_or(usize::MAX) / 2)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn pieces_of_answers_are_bounded_and_assembled() {
        let dir = tempfile::tempdir().unwrap();
        let mut client = Client::open(dir.path().join("c.db"), "ada").await.unwrap();
        let whole = driftsync_engine::doc::text_insert(&driftsync_engine::doc::new_doc(9).unwrap(), 0, "big").unwrap();
        let (a, b) = whole.split_at(3);
        client.take_part("notes/1", a).unwrap();
        client.take_part("notes/1", b).unwrap();
        let answer = DocResumed {
            doc: DocId::new("notes/1").unwrap(),
            cursor: 1,
            update: Some(Vec::new()),
            state_vector: None,
        };
        let (changed, _) = client
            .take_resumed(answer.clone(), &Limits::default(), 1024)
            .await
            .unwrap();
        assert!(changed);
        assert_eq!(client.text("notes/1").await.unwrap(), "big");
        // An empty update without pieces is the server's mistake, reported.
        assert!(client.take_resumed(answer, &Limits::default(), 1024).await.is_err());
        // A server cannot make the client hold more than the bound.
        let piece = vec![0u8; MAX_ASSEMBLED_ANSWER / 2];
        client.take_part("a", &piece).unwrap();
        client.take_part("b", &piece).unwrap();
        assert!(client.take_part("c", &[1]).is_err());
        assert!(client.parts.is_empty(), "dropped");
    }
}
