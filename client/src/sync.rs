//! One sync pass over the native protocol — hello, one resume of every known document, pushes
//! of the outbox, acknowledgements — driven by the [`Machine`] over a [`Transport`]; and the
//! steps on the client's documents and store that the machine asks its drivers for
//! ([`Client::perform`]).

use std::borrow::BorrowMut;
use std::collections::VecDeque;
use std::time::Duration;

use driftsync_engine::doc::{is_empty_update, state_vector};
use driftsync_engine::store::Store;
use driftsync_engine::sync::{apply_remote, merge_outbox, plan_pushes, Limits, PlannedPush, MERGED_PUSH_BYTES};
use driftsync_protocol::{DocId, DocResumed, ErrorCode, ResumeDoc, ServerFrame, DEFAULT_MAX_FRAME_SIZE};
use tokio::sync::Mutex;
use tokio::time::Instant;

use crate::machine::{Action, Effect, End, Machine, MachineOptions, Outcome};
use crate::transport::{Incoming, Transport, WebSocketTransport};
use crate::{Client, Error, Event, Result, Tls};

/// How long one sync pass may take before it gives up.
pub const SYNC_TIMEOUT: Duration = Duration::from_secs(30);

/// What one sync pass did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SyncReport {
    /// Documents resumed (a document resumed again after a passing refusal counts again).
    pub documents: usize,
    /// Bytes of frames sent (frame payloads, without WebSocket framing).
    pub bytes_sent: u64,
    /// Bytes of frames received.
    pub bytes_received: u64,
    /// Round trips waited for: one for the resume (pushes are pipelined).
    pub round_trips: u32,
    /// Pushes sent (an outbox of many batches goes up merged, see `Client::sync_once`).
    pub pushes: usize,
    /// Documents (or pushes of them) the server refused during the pass, with its reason: the
    /// pass completed the other documents. A refused document's changes stay in the outbox.
    pub refused: Vec<(String, ErrorCode)>,
}

impl SyncReport {
    /// The report as one line of JSON.
    pub fn to_json(&self) -> String {
        let refused: Vec<serde_json::Value> = self
            .refused
            .iter()
            .map(|(doc, code)| serde_json::json!({ "doc": doc, "code": format!("{code:?}") }))
            .collect();
        serde_json::json!({
            "documents": self.documents,
            "bytes_sent": self.bytes_sent,
            "bytes_received": self.bytes_received,
            "round_trips": self.round_trips,
            "pushes": self.pushes,
            "refused": refused,
        })
        .to_string()
    }
}

/// Performs `actions` in order — sending frames over `transport` (their bytes counted in
/// `bytes_sent`), performing effects on the client (locked for each effect only) and feeding
/// their outcomes back, the actions those give first, and handing events to `emit` — until they
/// run out (`None`) or one ends the connection.
pub(crate) async fn drive<C: BorrowMut<Client> + Send>(
    client: &Mutex<C>,
    machine: &mut Machine,
    transport: &mut (dyn Transport + '_),
    actions: Vec<Action>,
    bytes_sent: &mut u64,
    emit: &mut (dyn FnMut(Event) + Send + '_),
) -> Result<Option<End>> {
    let mut queue: VecDeque<Action> = actions.into();
    while let Some(action) = queue.pop_front() {
        match action {
            Action::Send(frame) => {
                let bytes = frame.encode();
                *bytes_sent += bytes.len() as u64;
                transport.send(bytes).await?;
            }
            Action::Effect(effect) => {
                let (outcome, own) = {
                    let mut guard = client.lock().await;
                    let client: &mut Client = (*guard).borrow_mut();
                    let outcome = Box::pin(client.perform(effect)).await?;
                    (outcome, client.take_own_changes())
                };
                for next in machine.feed(outcome).into_iter().rev() {
                    queue.push_front(next);
                }
                // Changes the client made by itself (delivery receipts) are pushed like the
                // app's own.
                if !own.is_empty() {
                    queue.extend(machine.local_changes(own));
                }
            }
            Action::Emit(event) => emit(event),
            Action::End(end) => return Ok(Some(end)),
        }
    }
    Ok(None)
}

/// Decodes one server frame.
pub(crate) fn decode(bytes: &[u8]) -> Result<ServerFrame> {
    ServerFrame::decode(bytes, DEFAULT_MAX_FRAME_SIZE).map_err(|e| Error::Protocol(format!("undecodable frame: {e}")))
}

/// Sleeps until `deadline`, or forever without one.
pub(crate) async fn sleep_until_opt(deadline: Option<Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}

impl Client {
    /// Connects to `url` (`ws://host:port` or `wss://host:port`), resumes every known document, pushes the outbox and
    /// returns once every document was answered or refused and every pushed batch acknowledged
    /// or refused. A document the server refuses (forbidden, say) is listed in
    /// [`SyncReport::refused`] while the pass completes the others; one refused for a passing
    /// reason (rate limited…) is resumed again after a short delay, a few times. A refusal of
    /// the connection itself (bad token, unsupported version) or a lost connection fails the
    /// pass. Gives up after [`SYNC_TIMEOUT`].
    pub async fn sync_once(&mut self, url: &str, token: &str) -> Result<SyncReport> {
        self.sync_once_with(url, token, None).await
    }

    /// Like [`sync_once`](Self::sync_once), verifying a `wss://` server with `tls` (Mozilla's
    /// roots when `None`).
    pub async fn sync_once_with(&mut self, url: &str, token: &str, tls: Option<&Tls>) -> Result<SyncReport> {
        let pass = async {
            let transport = WebSocketTransport::connect_with(url, tls).await?;
            self.sync_pass(Box::new(transport), token).await
        };
        match tokio::time::timeout(SYNC_TIMEOUT, pass).await {
            Ok(result) => result,
            Err(_) => Err(Error::Timeout(SYNC_TIMEOUT)),
        }
    }

    /// Like [`sync_once`](Self::sync_once), over a connection made already (an in-memory one in
    /// tests and simulations, say).
    pub async fn sync_over(&mut self, transport: impl Transport + 'static, token: &str) -> Result<SyncReport> {
        match tokio::time::timeout(SYNC_TIMEOUT, self.sync_pass(Box::new(transport), token)).await {
            Ok(result) => result,
            Err(_) => Err(Error::Timeout(SYNC_TIMEOUT)),
        }
    }

    /// One pass over `transport`: the machine in [`Mode::Pass`](crate::machine::Mode::Pass).
    async fn sync_pass(&mut self, mut transport: Box<dyn Transport>, token: &str) -> Result<SyncReport> {
        let mut machine = Machine::new(self.identity.client_id, MachineOptions::pass());
        let epoch = Instant::now();
        let (mut sent, mut received) = (0u64, 0u64);
        let client = Mutex::new(self);
        let mut actions = machine.connected(token.to_string(), Duration::ZERO);
        let result = loop {
            match drive(&client, &mut machine, &mut *transport, actions, &mut sent, &mut |_| {}).await {
                Ok(None) => {}
                Ok(Some(End::Done)) => break Ok(()),
                Ok(Some(End::Resync)) => break Err(Error::Closed),
                Ok(Some(End::Failed(error))) | Err(error) => break Err(error),
            }
            let deadline = machine.next_deadline().map(|d| epoch + d);
            actions = tokio::select! {
                incoming = transport.recv() => match incoming {
                    Ok(Incoming::Binary(bytes)) => {
                        received += bytes.len() as u64;
                        match decode(&bytes) {
                            Ok(frame) => machine.receive(frame, epoch.elapsed()),
                            Err(error) => break Err(error),
                        }
                    }
                    Ok(Incoming::Closed(code)) => machine.closed(code),
                    Err(error) => break Err(error),
                },
                () = sleep_until_opt(deadline) => machine.tick(epoch.elapsed()),
            };
        };
        transport.close().await;
        result?;
        let mut report = machine.report().clone();
        report.bytes_sent = sent;
        report.bytes_received = received;
        Ok(report)
    }
}

impl Client {
    /// The user's inbox from the server at `url`: the chat rooms they belong to, most recently
    /// active first, with the last message and the unread count of each — in one round trip
    /// after the handshake. Asked with `since` = 0 it lists every room; with the `version` of
    /// an earlier answer, only the rooms that changed since (a room left shows
    /// `joined: false`). Returns the rooms and the version to ask from next time.
    pub async fn fetch_inbox(
        &self,
        url: &str,
        token: &str,
        tls: Option<&Tls>,
        since: u64,
    ) -> Result<(Vec<driftsync_protocol::InboxRoom>, u64)> {
        let fetch = async {
            let mut transport = WebSocketTransport::connect_with(url, tls).await?;
            let result = self.fetch_inbox_over(&mut transport, token, since).await;
            transport.close().await;
            result
        };
        match tokio::time::timeout(SYNC_TIMEOUT, fetch).await {
            Ok(result) => result,
            Err(_) => Err(Error::Timeout(SYNC_TIMEOUT)),
        }
    }

    /// [`fetch_inbox`](Self::fetch_inbox) over a connection made already.
    pub async fn fetch_inbox_over(
        &self,
        transport: &mut dyn Transport,
        token: &str,
        since: u64,
    ) -> Result<(Vec<driftsync_protocol::InboxRoom>, u64)> {
        use driftsync_protocol::{ClientFrame, PROTOCOL_VERSION};
        let hello = ClientFrame::Hello {
            version: PROTOCOL_VERSION,
            token: token.to_string(),
            client_id: self.identity.client_id,
        };
        transport.send(hello.encode()).await?;
        // Sent at once, without waiting for the welcome: one round trip.
        transport.send(ClientFrame::Inbox { since }.encode()).await?;
        let mut rooms = Vec::new();
        loop {
            let frame = match transport.recv().await? {
                Incoming::Binary(bytes) => decode(&bytes)?,
                Incoming::Closed(_) => return Err(Error::Closed),
            };
            match frame {
                ServerFrame::Inbox {
                    version,
                    rooms: piece,
                    more,
                } => {
                    rooms.extend(piece);
                    if !more {
                        return Ok((rooms, version));
                    }
                }
                ServerFrame::Error { code, doc, batch } => return Err(Error::Server { code, doc, batch }),
                ServerFrame::Ping { nonce } => transport.send(ClientFrame::Pong { nonce }.encode()).await?,
                _ => {}
            }
        }
    }

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
/// store, as the [`Machine`] asks for them; they do no network I/O.
impl Client {
    /// Performs one effect the [`Machine`] asked for; its outcome goes back to
    /// [`Machine::feed`]. A simulation performs them on its own replica instead.
    #[doc(hidden)]
    pub async fn perform(&mut self, effect: Effect) -> Result<Outcome> {
        let limits = Limits::default();
        Ok(match effect {
            Effect::ListDocuments => Outcome::Documents(self.documents().await?),
            Effect::ResumeRequest { docs } => Outcome::ResumeRequest(self.resume_request(&docs).await?),
            Effect::ApplyResumed { answer, max_push_bytes } => {
                let doc = answer.doc.as_str().to_string();
                let (changed, pushes) = self.take_resumed(answer, &limits, max_push_bytes).await?;
                Outcome::Resumed { doc, changed, pushes }
            }
            Effect::ApplyUpdate {
                doc,
                cursor,
                update,
                answered,
            } => {
                self.take_update(&doc, cursor, update, answered, &limits).await?;
                Outcome::Done
            }
            Effect::Acknowledge {
                doc,
                batch,
                cursor,
                answered,
            } => {
                self.take_ack(&doc, batch, cursor, answered).await?;
                Outcome::Done
            }
            Effect::PushOutbox {
                doc,
                after_batch,
                max_push_bytes,
            } => {
                let outbox = self.store.outbox(Some(&doc)).await?;
                let new: Vec<_> = outbox.into_iter().filter(|e| e.batch > after_batch).collect();
                let pushes = merge_outbox(new, max_push_bytes)?
                    .into_iter()
                    .map(|entry| (entry.batch, entry.update))
                    .collect();
                Outcome::Pushes { doc, pushes }
            }
        })
    }

    /// One resume entry (server cursor and state vector) per document in `ids`.
    async fn resume_request(&mut self, ids: &[String]) -> Result<Vec<ResumeDoc>> {
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

    /// Applies the server's resume answer for one document (assembled by the machine when it
    /// came in pieces) and returns whether it changed the document, and the pushes to send next
    /// (batch, update), oldest first: the outbox merged into pushes of at most `max_push_bytes`
    /// bytes of batches.
    async fn take_resumed(
        &mut self,
        answer: DocResumed,
        limits: &Limits,
        max_push_bytes: usize,
    ) -> Result<(bool, Vec<(u64, Vec<u8>)>)> {
        let id = answer.doc.as_str().to_string();
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
        if changed {
            // Recorded before the outbox is read: pushed with it.
            self.note_delivered(&id).await?;
            self.take_own_changes();
        }
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

    /// Applies an update the server broadcast. Before the document's resume answer (`answered`
    /// false) the cursor must not move: the answer may still carry older entries. The update is
    /// kept either way.
    async fn take_update(
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
        self.note_delivered(id).await?;
        Ok(())
    }

    /// Records the server's acknowledgement of `batch` (and every older batch of the document).
    async fn take_ack(&mut self, id: &str, batch: u64, cursor: u64, answered: bool) -> Result<()> {
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
    use driftsync_engine::doc::{new_doc, text_insert};
    use driftsync_protocol::{ClientFrame, DocResumed, PROTOCOL_VERSION};

    use super::*;
    use crate::MemoryTransport;

    /// A scripted server on the other end of an in-memory transport.
    struct FakeServer(MemoryTransport);

    impl FakeServer {
        async fn recv(&mut self) -> ClientFrame {
            match self.0.recv().await.unwrap() {
                Incoming::Binary(bytes) => ClientFrame::decode(&bytes, DEFAULT_MAX_FRAME_SIZE).unwrap(),
                Incoming::Closed(code) => panic!("closed ({code:?})"),
            }
        }

        async fn send(&mut self, frame: ServerFrame) {
            self.0.send(frame.encode()).await.unwrap();
        }

        async fn welcome(&mut self) {
            assert!(matches!(
                self.recv().await,
                ClientFrame::Hello {
                    version: PROTOCOL_VERSION,
                    ..
                }
            ));
            self.send(ServerFrame::Welcome {
                version: PROTOCOL_VERSION,
                max_frame_size: DEFAULT_MAX_FRAME_SIZE as u32,
                session: 1,
                heartbeat_ms: 15_000,
            })
            .await;
        }
    }

    fn id(s: &str) -> DocId {
        DocId::new(s).unwrap()
    }

    #[tokio::test]
    async fn a_forbidden_document_does_not_fail_the_pass() {
        let dir = tempfile::tempdir().unwrap();
        let mut client = Client::open(dir.path().join("c.db"), "ada").await.unwrap();
        client.text_append("secret/1", "hidden").await.unwrap();
        client.text_append("notes/1", "mine").await.unwrap();
        let (near, far) = MemoryTransport::pair();
        let mut server = FakeServer(far);
        let script = tokio::spawn(async move {
            server.welcome().await;
            let ClientFrame::Resume { docs } = server.recv().await else {
                panic!("expected a resume")
            };
            let mut names: Vec<&str> = docs.iter().map(|d| d.doc.as_str()).collect();
            names.sort();
            assert_eq!(names, ["notes/1", "secret/1"]);
            server
                .send(ServerFrame::Error {
                    code: ErrorCode::Forbidden,
                    doc: Some(id("secret/1")),
                    batch: None,
                })
                .await;
            // The answer for notes/1 comes in two pieces: somebody else's text.
            let theirs = text_insert(&new_doc(77).unwrap(), 0, "theirs ").unwrap();
            let (a, b) = theirs.split_at(theirs.len() / 2);
            for piece in [a, b] {
                server
                    .send(ServerFrame::ResumePart {
                        doc: id("notes/1"),
                        bytes: piece.to_vec(),
                    })
                    .await;
            }
            server
                .send(ServerFrame::Resumed {
                    docs: vec![DocResumed {
                        doc: id("notes/1"),
                        cursor: 1,
                        update: Some(Vec::new()),
                        state_vector: None,
                    }],
                })
                .await;
            // The push is rate limited once, then acknowledged after the resume that follows.
            let ClientFrame::Push { doc, batch, .. } = server.recv().await else {
                panic!("expected a push")
            };
            assert_eq!(doc.as_str(), "notes/1");
            server
                .send(ServerFrame::Error {
                    code: ErrorCode::RateLimited,
                    doc: Some(doc.clone()),
                    batch: Some(batch),
                })
                .await;
            let ClientFrame::Resume { docs } = server.recv().await else {
                panic!("expected a second resume")
            };
            assert_eq!(docs.len(), 1);
            assert_eq!(docs[0].cursor, 1, "the first answer moved the cursor");
            server
                .send(ServerFrame::Resumed {
                    docs: vec![DocResumed {
                        doc: doc.clone(),
                        cursor: 1,
                        update: None,
                        state_vector: None,
                    }],
                })
                .await;
            let ClientFrame::Push { batch: again, .. } = server.recv().await else {
                panic!("expected the push again")
            };
            assert_eq!(again, batch);
            server.send(ServerFrame::Ack { doc, batch, cursor: 2 }).await;
            // The client closes once everything is answered.
            assert_eq!(server.0.recv().await.unwrap(), Incoming::Closed(None));
        });
        let report = client.sync_over(near, "").await.unwrap();
        script.await.unwrap();
        assert_eq!(report.refused, vec![("secret/1".to_string(), ErrorCode::Forbidden)]);
        assert_eq!((report.documents, report.pushes, report.round_trips), (3, 2, 1));
        let json: serde_json::Value = serde_json::from_str(&report.to_json()).unwrap();
        assert_eq!(
            json["refused"],
            serde_json::json!([{ "doc": "secret/1", "code": "Forbidden" }])
        );
        assert!(report.bytes_sent > 0 && report.bytes_received > 0);
        assert_eq!(client.text("notes/1").await.unwrap().len(), "theirs mine".len());
        assert!(client.text("notes/1").await.unwrap().contains("theirs"));
        // notes/1 is acknowledged; the forbidden document keeps its change for later.
        let outbox = client.store().outbox(None).await.unwrap();
        assert_eq!(outbox.len(), 1);
        assert_eq!(outbox[0].doc, "secret/1");
    }

    #[tokio::test]
    async fn a_refusal_of_the_connection_fails_the_pass() {
        let dir = tempfile::tempdir().unwrap();
        let mut client = Client::open(dir.path().join("c.db"), "ada").await.unwrap();
        client.text_append("notes/1", "x").await.unwrap();
        let (near, far) = MemoryTransport::pair();
        let mut server = FakeServer(far);
        let script = tokio::spawn(async move {
            assert!(matches!(server.recv().await, ClientFrame::Hello { .. }));
            server
                .send(ServerFrame::Error {
                    code: ErrorCode::Unauthorized,
                    doc: None,
                    batch: None,
                })
                .await;
            server.0.close_with(Some(driftsync_protocol::CLOSE_UNAUTHORIZED)).await;
        });
        let error = client.sync_over(near, "bad").await.unwrap_err();
        assert!(
            matches!(
                error,
                Error::Server {
                    code: ErrorCode::Unauthorized,
                    ..
                }
            ),
            "{error}"
        );
        script.await.unwrap();
        assert_eq!(client.store().outbox(None).await.unwrap().len(), 1);
    }
}
