//! A native client as the simulation runs it: the client library's own protocol state machine
//! ([`driftsync_client::machine::Machine`], live mode) with an in-memory implementation of its
//! effects that mirrors `Client::perform` (`client/src/sync.rs`) — the yrs documents, the outbox
//! of (batch, update), the stored server cursor per document — using
//! `engine::sync::{apply_remote, plan_pushes, merge_outbox}` exactly as it does.
//!
//! So the simulation tests the client's handshake, resume, push pipelining, acknowledgement,
//! refusal and retry, heartbeat and presence logic, not a copy of it. What the sim adds around
//! it: the connection (its [`crate::net::Link`]), the clock (virtual ms), re-sends of pushes (a
//! fault), and the checks of what the server sends (cursors never decrease on one connection;
//! every update applies).

use std::collections::{BTreeMap, VecDeque};
use std::time::Duration;

use driftsync_client::machine::{Action, Effect, End, Machine, MachineOptions, Outcome as Fed};
use driftsync_client::Event;
use driftsync_engine::chat::{Author, ChatRoom};
use driftsync_engine::doc::{is_empty_update, new_doc, state_vector};
use driftsync_engine::store::OutboxEntry;
use driftsync_engine::sync::{apply_remote, merge_outbox, plan_pushes, Limits, PlannedPush};
use driftsync_protocol::{ClientFrame, Cursor, DocId, DocResumed, ResumeDoc, ServerFrame};
use yrs::Doc;

/// A document as a client holds it: plain, or a chat room (whose clock observes the document).
#[derive(Debug)]
pub enum Replica {
    /// A text document.
    Text(Doc),
    /// A chat room.
    Chat(ChatRoom),
}

impl Replica {
    /// Creates the replica of `doc` for a client id: a chat room when the id says so.
    pub fn new(doc: &str, client_id: u64) -> Replica {
        // The client id was checked when the client was made.
        let d = new_doc(client_id).unwrap_or_else(|_| Doc::new());
        if doc.starts_with(driftsync_server::CHAT_PREFIX) {
            Replica::Chat(ChatRoom::new(d))
        } else {
            Replica::Text(d)
        }
    }

    /// The underlying yrs document.
    pub fn doc(&self) -> &Doc {
        match self {
            Replica::Text(doc) => doc,
            Replica::Chat(room) => room.doc(),
        }
    }
}

/// Presence states a client shows: (doc, peer) → state.
pub type PresenceView = BTreeMap<(String, u64), String>;

/// What the client wants after an input.
#[derive(Debug, Default)]
pub struct Outcome {
    /// Frames to send, in order.
    pub send: Vec<ClientFrame>,
    /// The machine ended the connection: close it and reconnect (after a pause).
    pub end: Option<Ended>,
    /// Something the server did broke a protocol rule (the simulation reports it).
    pub violation: Option<String>,
}

/// How the machine ended a connection, as far as the driver cares.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ended {
    /// The server asked for a resync (close 4000): reconnect almost at once.
    Resync,
    /// It failed (a lost connection, a silent server, an expired token…): reconnect after a
    /// backoff.
    Failed(String),
}

/// One connection's bookkeeping the simulation does besides the machine.
#[derive(Debug, Default)]
struct Conn {
    /// Pushes sent on this connection (doc, batch, update), for re-sends and for explaining a
    /// `MissingDependencies`.
    sent: Vec<(String, u64, Vec<u8>)>,
    /// The last cursor received per document (any frame), to check they never decrease.
    seen: BTreeMap<String, (Cursor, &'static str)>,
}

/// A native client (see the module documentation).
#[derive(Debug)]
pub struct NativeClient {
    /// The yrs client id of every local change.
    pub client_id: u64,
    /// Who writes (user and device).
    pub author: Author,
    machine: Machine,
    docs: BTreeMap<String, Replica>,
    /// The stored server cursor per document.
    cursors: BTreeMap<String, Cursor>,
    /// Unacknowledged local changes, oldest first.
    outbox: Vec<OutboxEntry>,
    /// The next batch id (`Store::record_local` hands out increasing ids).
    next_batch: u64,
    /// Every batch the server acknowledged (directly or by a later one): (doc, batch, update).
    acked: Vec<(String, u64, Vec<u8>)>,
    conn: Option<Conn>,
    presence: PresenceView,
}

impl NativeClient {
    /// A client of `docs` writing as `client_id` (1..2^53), in a live session.
    pub fn new(client_id: u64, author: Author, docs: &[String]) -> NativeClient {
        let mut machine = Machine::new(client_id, MachineOptions::live());
        for doc in docs {
            // Not connected: this only notes the document.
            let _ = machine.subscribe(doc);
        }
        NativeClient {
            client_id,
            author,
            machine,
            docs: docs.iter().map(|d| (d.clone(), Replica::new(d, client_id))).collect(),
            cursors: BTreeMap::new(),
            outbox: Vec::new(),
            next_batch: 1,
            acked: Vec::new(),
            conn: None,
            presence: BTreeMap::new(),
        }
    }

    // ----- queries -----

    /// The replica of a document.
    pub fn replica(&self, doc: &str) -> Option<&Replica> {
        self.docs.get(doc)
    }

    /// The documents, by id.
    pub fn docs(&self) -> &BTreeMap<String, Replica> {
        &self.docs
    }

    /// Unacknowledged batches.
    pub fn outbox(&self) -> &[OutboxEntry] {
        &self.outbox
    }

    /// Every acknowledged batch (doc, batch, update).
    pub fn acked(&self) -> &[(String, u64, Vec<u8>)] {
        &self.acked
    }

    /// The stored server cursor of a document.
    pub fn cursor(&self, doc: &str) -> Cursor {
        self.cursors.get(doc).copied().unwrap_or(0)
    }

    /// The presence states this client currently shows: (doc, peer) → state.
    pub fn presence(&self) -> &PresenceView {
        &self.presence
    }

    /// This connection's session id (0 before the welcome or offline).
    pub fn session_id(&self) -> u64 {
        self.machine.session().unwrap_or(0)
    }

    /// Whether the server welcomed the current connection.
    pub fn online(&self) -> bool {
        self.machine.is_connected()
    }

    /// Whether nothing is waiting for the server: every document resumed and every push
    /// acknowledged on this connection (the machine's view), and the outbox empty.
    pub fn synced(&self) -> bool {
        self.machine.is_synced() && self.outbox.is_empty()
    }

    /// The last update pushed on this connection as `batch` of `doc`.
    pub fn sent_update(&self, doc: &str, batch: u64) -> Option<Vec<u8>> {
        let conn = self.conn.as_ref()?;
        conn.sent
            .iter()
            .rev()
            .find(|(d, b, _)| d == doc && *b == batch)
            .map(|(_, _, u)| u.clone())
    }

    /// A re-send of a push already sent on this connection (`pick` chooses which), as a client
    /// that lost track would do. Outside the machine: a fault.
    pub fn resend(&self, pick: usize) -> Option<ClientFrame> {
        let conn = self.conn.as_ref()?;
        let (doc, batch, update) = conn.sent.get(pick % conn.sent.len().max(1))?;
        Some(ClientFrame::Push {
            doc: DocId::new(doc.as_str()).ok()?,
            batch: *batch,
            update: update.clone(),
        })
    }

    // ----- inputs -----

    /// A new connection is open at `now`: the frames that start it.
    pub fn connect(&mut self, token: &str, now: Duration) -> Outcome {
        self.conn = Some(Conn::default());
        self.presence.clear();
        let actions = self.machine.connected(token.to_string(), now);
        self.drive(actions, true)
    }

    /// The connection is gone (cut, abandoned or closed).
    pub fn disconnect(&mut self) {
        self.machine.disconnected();
        self.conn = None;
        // What a client shows of others' presence is only valid while it is connected.
        self.presence.clear();
    }

    /// The server closed the connection with `code`.
    pub fn closed(&mut self, code: Option<u16>) -> Outcome {
        let actions = self.machine.closed(code);
        self.drive(actions, true)
    }

    /// A frame from the server, at `now`.
    pub fn receive(&mut self, frame: ServerFrame, now: Duration) -> Outcome {
        let actions = self.machine.receive(frame, now);
        self.drive(actions, true)
    }

    /// Time is `now`: heartbeats (which renew presence; dropped when `renew` is false, as for a
    /// frozen tab), silence, documents to resume again.
    pub fn tick(&mut self, now: Duration, renew: bool) -> Outcome {
        let actions = self.machine.tick(now);
        self.drive(actions, renew)
    }

    /// A local change to `doc`, already applied to its replica: recorded in the outbox with a
    /// new batch id (as `Store::record_local` does), then the machine is told.
    pub fn write(&mut self, doc: &str, update: Vec<u8>) -> Outcome {
        if is_empty_update(&update) {
            return Outcome::default();
        }
        self.record_local(doc, update);
        let actions = self.machine.local_changes([doc.to_string()]);
        self.drive(actions, true)
    }

    /// Sets or clears this client's presence in every document.
    pub fn set_presence(&mut self, state: Option<String>) -> Outcome {
        let docs: Vec<String> = self.docs.keys().cloned().collect();
        let mut actions = Vec::new();
        for doc in docs {
            actions.extend(self.machine.presence(&doc, state.clone()));
        }
        self.drive(actions, true)
    }

    // ----- the driver -----

    fn record_local(&mut self, doc: &str, update: Vec<u8>) -> u64 {
        let batch = self.next_batch;
        self.next_batch += 1;
        self.outbox.push(OutboxEntry {
            doc: doc.to_string(),
            batch,
            update,
        });
        batch
    }

    /// Performs `actions` in order as `client::sync::drive` does: frames are collected, effects
    /// performed and their outcomes fed back (their actions first), events handled, until an
    /// [`End`]. Presence renewals are dropped unless `renew`.
    fn drive(&mut self, actions: Vec<Action>, renew: bool) -> Outcome {
        let mut out = Outcome::default();
        let mut queue: VecDeque<Action> = actions.into();
        while let Some(action) = queue.pop_front() {
            match action {
                Action::Send(frame) => {
                    if !renew && matches!(frame, ClientFrame::Presence { state: Some(_), .. }) {
                        continue;
                    }
                    if let (ClientFrame::Push { doc, batch, update }, Some(conn)) = (&frame, self.conn.as_mut()) {
                        conn.sent.push((doc.as_str().to_string(), *batch, update.clone()));
                    }
                    out.send.push(frame);
                }
                Action::Effect(effect) => match self.perform(effect, &mut out) {
                    Ok(fed) => {
                        for next in self.machine.feed(fed).into_iter().rev() {
                            queue.push_front(next);
                        }
                    }
                    Err(violation) => {
                        out.violation.get_or_insert(violation);
                        return out;
                    }
                },
                Action::Emit(event) => self.emit(event),
                Action::End(end) => {
                    out.end = Some(match end {
                        End::Resync => Ended::Resync,
                        End::Done => Ended::Failed("a live session ended as done".into()),
                        End::Failed(error) => Ended::Failed(error.to_string()),
                    });
                    return out;
                }
            }
        }
        out
    }

    fn emit(&mut self, event: Event) {
        if let Event::Presence { doc, peer, state, .. } = event {
            let key = (doc, peer);
            match state {
                Some(state) => {
                    self.presence.insert(key, state);
                }
                None => {
                    self.presence.remove(&key);
                }
            }
        }
    }

    /// Records a cursor received on this connection; a decrease is a violation.
    fn saw(&mut self, doc: &str, cursor: Cursor, what: &'static str, out: &mut Outcome) {
        let session = self.session_id();
        let Some(conn) = self.conn.as_mut() else { return };
        if let Some(&(last, last_what)) = conn.seen.get(doc) {
            if cursor < last && out.violation.is_none() {
                out.violation = Some(format!(
                    "cursor decreased on one connection (client {}, session {session}): {doc} got {what} {cursor} after {last_what} {last}",
                    self.client_id
                ));
            }
        }
        let entry = conn.seen.entry(doc.to_string()).or_insert((cursor, what));
        if cursor >= entry.0 {
            *entry = (cursor, what);
        }
    }

    /// `Store::record_remote`'s cursor: never backwards.
    fn advance(&mut self, doc: &str, cursor: Cursor) {
        let stored = self.cursors.entry(doc.to_string()).or_insert(0);
        *stored = (*stored).max(cursor);
    }

    /// `Client::perform` on memory. An error the real client would end the connection with is
    /// a violation here: the server sent something a client cannot take.
    fn perform(&mut self, effect: Effect, out: &mut Outcome) -> Result<Fed, String> {
        let limits = Limits::default();
        Ok(match effect {
            Effect::ListDocuments => Fed::Documents(self.docs.keys().cloned().collect()),
            Effect::ResumeRequest { docs } => {
                let mut resume = Vec::with_capacity(docs.len());
                for id in docs {
                    let Some(replica) = self.docs.get(&id) else {
                        return Err(format!("the machine resumes {id}, which the client does not hold"));
                    };
                    resume.push(ResumeDoc {
                        doc: DocId::new(id.as_str()).map_err(|e| e.to_string())?,
                        cursor: self.cursor(&id),
                        state_vector: state_vector(replica.doc()),
                    });
                }
                Fed::ResumeRequest(resume)
            }
            Effect::ApplyResumed { answer, max_push_bytes } => {
                let DocResumed {
                    doc,
                    cursor,
                    update,
                    state_vector,
                } = answer;
                let id = doc.as_str().to_string();
                let replica = self
                    .docs
                    .get(&id)
                    .ok_or_else(|| format!("an answer for {id}, never resumed"))?;
                let changed = match update {
                    Some(update) => {
                        apply_remote(replica.doc(), &update, &limits)
                            .map_err(|e| format!("the resume answer for {id} does not apply: {e}"))?;
                        !is_empty_update(&update)
                    }
                    None => false,
                };
                self.saw(&id, cursor, "Resumed", out);
                self.advance(&id, cursor);
                let replica = self
                    .docs
                    .get(&id)
                    .ok_or_else(|| format!("an answer for {id}, never resumed"))?;
                let outbox: Vec<OutboxEntry> = self.outbox.iter().filter(|e| e.doc == id).cloned().collect();
                let plan = plan_pushes(replica.doc(), outbox, state_vector.as_deref(), max_push_bytes)
                    .map_err(|e| format!("planning pushes for {id} failed: {e}"))?;
                let mut pushes = Vec::new();
                for push in plan {
                    pushes.push(match push {
                        PlannedPush::Outbox(entry) => (entry.batch, entry.update),
                        PlannedPush::Recovery(update) => (self.record_local(&id, update.clone()), update),
                    });
                }
                Fed::Resumed {
                    doc: id,
                    changed,
                    pushes,
                }
            }
            Effect::ApplyUpdate {
                doc,
                cursor,
                update,
                answered,
            } => {
                let replica = self
                    .docs
                    .get(&doc)
                    .ok_or_else(|| format!("an update of {doc}, never resumed"))?;
                apply_remote(replica.doc(), &update, &limits)
                    .map_err(|e| format!("the server sent an update of {doc} the client cannot apply: {e}"))?;
                if answered {
                    self.saw(&doc, cursor, "Update", out);
                    self.advance(&doc, cursor);
                }
                Fed::Done
            }
            Effect::Acknowledge {
                doc,
                batch,
                cursor,
                answered,
            } => {
                let (done, kept): (Vec<OutboxEntry>, Vec<OutboxEntry>) = std::mem::take(&mut self.outbox)
                    .into_iter()
                    .partition(|e| e.doc == doc && e.batch <= batch);
                self.outbox = kept;
                self.acked.extend(done.into_iter().map(|e| (e.doc, e.batch, e.update)));
                if answered {
                    self.saw(&doc, cursor, "Ack", out);
                    self.advance(&doc, cursor);
                }
                Fed::Done
            }
            Effect::PushOutbox {
                doc,
                after_batch,
                max_push_bytes,
            } => {
                let new: Vec<OutboxEntry> = self
                    .outbox
                    .iter()
                    .filter(|e| e.doc == doc && e.batch > after_batch)
                    .cloned()
                    .collect();
                let pushes = merge_outbox(new, max_push_bytes)
                    .map_err(|e| format!("merging the outbox of {doc} failed: {e}"))?
                    .into_iter()
                    .map(|entry| (entry.batch, entry.update))
                    .collect();
                Fed::Pushes { doc, pushes }
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use driftsync_engine::doc::{text, text_insert};
    use driftsync_engine::sync::answer_resume;
    use driftsync_protocol::PROTOCOL_VERSION;

    /// The smallest server that follows the protocol: one document per id, a cursor per update,
    /// acknowledgements at once. Enough to drive the client, not to check the server.
    #[derive(Default)]
    struct FakeServer {
        docs: BTreeMap<String, (Doc, Vec<Vec<u8>>)>,
    }

    impl FakeServer {
        fn answer(&mut self, frame: ClientFrame) -> Vec<ServerFrame> {
            match frame {
                ClientFrame::Hello { .. } => vec![ServerFrame::Welcome {
                    version: PROTOCOL_VERSION,
                    max_frame_size: 1 << 20,
                    session: 1,
                    heartbeat_ms: 15_000,
                }],
                ClientFrame::Resume { docs } => {
                    let answers = docs
                        .into_iter()
                        .map(|d| {
                            let (doc, log) = self
                                .docs
                                .entry(d.doc.as_str().to_string())
                                .or_insert_with(|| (new_doc(1).expect("doc"), Vec::new()));
                            let a =
                                answer_resume(doc, log.len() as u64, d.cursor, &d.state_vector, None).expect("answer");
                            DocResumed {
                                doc: d.doc,
                                cursor: a.cursor,
                                update: a.update,
                                state_vector: a.state_vector,
                            }
                        })
                        .collect();
                    vec![ServerFrame::Resumed { docs: answers }]
                }
                ClientFrame::Push { doc, batch, update } => {
                    let (d, log) = self.docs.get_mut(doc.as_str()).expect("resumed first");
                    apply_remote(d, &update, &Limits::default()).expect("apply");
                    log.push(update);
                    vec![ServerFrame::Ack {
                        doc,
                        batch,
                        cursor: log.len() as u64,
                    }]
                }
                _ => Vec::new(),
            }
        }
    }

    fn sync(server: &mut FakeServer, client: &mut NativeClient) {
        let mut queue: Vec<ClientFrame> = client.connect("", Duration::ZERO).send;
        while !queue.is_empty() {
            let mut next = Vec::new();
            for frame in queue {
                for answer in server.answer(frame) {
                    let outcome = client.receive(answer, Duration::ZERO);
                    assert!(outcome.violation.is_none(), "{:?}", outcome.violation);
                    assert!(outcome.end.is_none(), "{:?}", outcome.end);
                    next.extend(outcome.send);
                }
            }
            queue = next;
        }
        assert!(client.synced());
        client.disconnect();
    }

    #[test]
    fn offline_writers_converge_and_outboxes_empty() {
        let docs = vec!["notes/1".to_string()];
        let author = |u: &str| Author {
            user: u.into(),
            device: format!("{u}-phone"),
        };
        let mut a = NativeClient::new(11, author("ada"), &docs);
        let mut b = NativeClient::new(22, author("bob"), &docs);
        let mut server = FakeServer::default();
        for (client, word) in [(&mut a, "ada "), (&mut b, "bob ")] {
            let update = text_insert(client.replica("notes/1").expect("doc").doc(), 0, word).expect("insert");
            client.write("notes/1", update);
        }
        sync(&mut server, &mut a);
        sync(&mut server, &mut b);
        sync(&mut server, &mut a);
        let ta = text(a.replica("notes/1").expect("doc").doc());
        assert_eq!(ta, text(b.replica("notes/1").expect("doc").doc()));
        assert_eq!(ta.len(), 8);
        assert!(a.outbox().is_empty() && b.outbox().is_empty());
        assert_eq!(a.acked().len(), 1);
        assert_eq!(a.cursor("notes/1"), 2);
    }
}
