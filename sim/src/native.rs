//! A native-protocol client replica, sans-IO: a small, faithful copy of the client's protocol
//! logic (`client/src/sync.rs` and `live.rs`) driven by the simulation.
//!
//! Its whole interface is [`NativeReplica::connect`], [`NativeReplica::receive`],
//! [`NativeReplica::write`], [`NativeReplica::disconnect`] and a few read-only accessors, so that
//! the client crate's sans-IO state machine can replace it later.
//!
//! The rules it follows:
//! * every local change goes to the outbox with a new batch id (increasing over the replica)
//!   before anything is sent;
//! * on a connection: `Hello`, and after the `Welcome` one `Resume` of every document with the
//!   stored server cursor and the state vector;
//! * a document's answer (its `ResumePart` pieces assembled) is applied, the cursor stored, and
//!   the outbox planned with `engine::sync::plan_pushes` (merged; a recovery update gets a new
//!   batch id first) and pushed;
//! * a local change to a document already answered on this connection is pushed at once;
//! * an `Ack` removes the batch and every older batch of the document from the outbox;
//! * `Update`s are applied; the cursor moves (never backwards) on an `Update` or `Ack` only once
//!   the document's answer arrived on this connection, and on the answer itself;
//! * an error naming a batch (the store failed, dependencies missing, …) makes the replica ask
//!   for a new connection, whose resume re-plans what to push.

use std::collections::{BTreeMap, BTreeSet};

use driftsync_engine::chat::{Author, ChatRoom};
use driftsync_engine::doc::{new_doc, state_vector};
use driftsync_engine::store::OutboxEntry;
use driftsync_engine::sync::{apply_remote, plan_pushes, Limits, PlannedPush, MERGED_PUSH_BYTES};
use driftsync_protocol::{ClientFrame, Cursor, DocId, DocResumed, ErrorCode, ResumeDoc, ServerFrame, PROTOCOL_VERSION};
use yrs::Doc;

/// A document as a replica holds it: plain, or a chat room (whose clock observes the document).
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
        // The client id was checked when the replica was made.
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

/// What the replica wants after an event.
#[derive(Debug, Default)]
pub struct Outcome {
    /// Frames to send, in order.
    pub send: Vec<ClientFrame>,
    /// The connection should be dropped and a new one made (after a pause).
    pub reconnect: bool,
    /// Something the server did broke a protocol rule (the simulation reports it).
    pub violation: Option<String>,
}

/// A presence state seen by a replica: the peer and its state.
pub type PresenceView = BTreeMap<(String, u64), String>;

/// One connection's state.
#[derive(Debug, Default)]
struct Session {
    welcomed: bool,
    session_id: u64,
    max_push: usize,
    /// Documents whose resume answer arrived on this connection.
    answered: BTreeSet<String>,
    /// Pieces of resume answers, per document.
    parts: BTreeMap<String, Vec<u8>>,
    /// Pushes sent on this connection (doc, batch, update), for re-sends.
    sent: Vec<(String, u64, Vec<u8>)>,
    /// The last cursor received per document (any frame), to check they never decrease.
    seen: BTreeMap<String, (Cursor, &'static str)>,
}

/// A native client replica.
#[derive(Debug)]
pub struct NativeReplica {
    /// The yrs client id of every local change.
    pub client_id: u64,
    /// Who writes (user and device).
    pub author: Author,
    docs: BTreeMap<String, Replica>,
    cursors: BTreeMap<String, Cursor>,
    outbox: Vec<OutboxEntry>,
    next_batch: u64,
    /// Every batch the server acknowledged (directly or by a later one): (doc, batch, update).
    acked: Vec<(String, u64, Vec<u8>)>,
    session: Option<Session>,
    presence: PresenceView,
}

impl NativeReplica {
    /// A replica of `docs` writing as `client_id` (1..2^53).
    pub fn new(client_id: u64, author: Author, docs: &[String]) -> NativeReplica {
        NativeReplica {
            client_id,
            author,
            docs: docs.iter().map(|d| (d.clone(), Replica::new(d, client_id))).collect(),
            cursors: BTreeMap::new(),
            outbox: Vec::new(),
            next_batch: 1,
            acked: Vec::new(),
            session: None,
            presence: BTreeMap::new(),
        }
    }

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

    /// The presence states this replica currently shows: (doc, peer) → state.
    pub fn presence(&self) -> &PresenceView {
        &self.presence
    }

    /// This connection's session id (0 before the welcome or offline).
    pub fn session_id(&self) -> u64 {
        self.session.as_ref().map_or(0, |s| s.session_id)
    }

    /// Whether the connection is up and every document answered.
    pub fn online(&self) -> bool {
        self.session
            .as_ref()
            .is_some_and(|s| s.welcomed && self.docs.keys().all(|d| s.answered.contains(d)))
    }

    /// Whether nothing is waiting for the server: online, every document answered, the outbox
    /// empty.
    pub fn synced(&self) -> bool {
        self.online() && self.outbox.is_empty()
    }

    /// A new connection is open: the frames that start it.
    pub fn connect(&mut self, token: &str) -> Outcome {
        self.session = Some(Session::default());
        self.presence.clear();
        Outcome {
            send: vec![ClientFrame::Hello {
                version: PROTOCOL_VERSION,
                token: token.to_string(),
                client_id: self.client_id,
            }],
            ..Outcome::default()
        }
    }

    /// The connection is gone.
    pub fn disconnect(&mut self) {
        self.session = None;
        // What a replica shows of others' presence is only valid while it is connected.
        self.presence.clear();
    }

    /// A local change to `doc` (already applied to its replica): recorded in the outbox, and
    /// pushed at once when the document is answered on the current connection.
    pub fn write(&mut self, doc: &str, update: Vec<u8>) -> Outcome {
        let mut out = Outcome::default();
        if driftsync_engine::doc::is_empty_update(&update) {
            return out;
        }
        let batch = self.next_batch;
        self.next_batch += 1;
        self.outbox.push(OutboxEntry {
            doc: doc.to_string(),
            batch,
            update: update.clone(),
        });
        if let Some(session) = self.session.as_mut().filter(|s| s.answered.contains(doc)) {
            if let Ok(id) = DocId::new(doc) {
                session.sent.push((doc.to_string(), batch, update.clone()));
                out.send.push(ClientFrame::Push { doc: id, batch, update });
            }
        }
        out
    }

    /// A re-send of a push already sent on this connection (`pick` chooses which), as a client
    /// that lost track would do.
    pub fn resend(&self, pick: usize) -> Option<ClientFrame> {
        let session = self.session.as_ref()?;
        let (doc, batch, update) = session.sent.get(pick % session.sent.len().max(1))?;
        Some(ClientFrame::Push {
            doc: DocId::new(doc.as_str()).ok()?,
            batch: *batch,
            update: update.clone(),
        })
    }

    /// The last update pushed on this connection as `batch` of `doc`.
    pub fn sent_update(&self, doc: &str, batch: u64) -> Option<Vec<u8>> {
        let session = self.session.as_ref()?;
        session
            .sent
            .iter()
            .rev()
            .find(|(d, b, _)| d == doc && *b == batch)
            .map(|(_, _, u)| u.clone())
    }

    /// Sets or clears this replica's presence in a document.
    pub fn presence_frame(&self, doc: &str, state: Option<String>) -> Option<ClientFrame> {
        let session = self.session.as_ref()?;
        if !session.answered.contains(doc) {
            return None;
        }
        Some(ClientFrame::Presence {
            doc: DocId::new(doc).ok()?,
            state,
        })
    }

    fn advance(&mut self, doc: &str, cursor: Cursor) {
        let stored = self.cursors.entry(doc.to_string()).or_insert(0);
        *stored = (*stored).max(cursor);
    }

    /// Records a cursor received on this connection; a decrease is a violation.
    fn saw(&mut self, doc: &str, cursor: Cursor, what: &'static str, out: &mut Outcome) {
        let Some(session) = self.session.as_mut() else { return };
        if let Some(&(last, last_what)) = session.seen.get(doc) {
            if cursor < last && out.violation.is_none() {
                out.violation = Some(format!(
                    "cursor decreased on one connection (client {}, session {}): {doc} got {what} {cursor} after {last_what} {last}",
                    self.client_id, session.session_id
                ));
            }
        }
        let entry = session.seen.entry(doc.to_string()).or_insert((cursor, what));
        if cursor >= entry.0 {
            *entry = (cursor, what);
        }
    }

    /// A frame from the server.
    pub fn receive(&mut self, frame: ServerFrame) -> Outcome {
        let mut out = Outcome::default();
        let Some(session) = self.session.as_mut() else {
            return out;
        };
        match frame {
            ServerFrame::Welcome {
                session: id,
                max_frame_size,
                ..
            } => {
                session.welcomed = true;
                session.session_id = id;
                session.max_push = MERGED_PUSH_BYTES.min(usize::try_from(max_frame_size).unwrap_or(usize::MAX) / 2);
                let docs = self
                    .docs
                    .iter()
                    .filter_map(|(id, replica)| {
                        Some(ResumeDoc {
                            doc: DocId::new(id.as_str()).ok()?,
                            cursor: self.cursors.get(id).copied().unwrap_or(0),
                            state_vector: state_vector(replica.doc()),
                        })
                    })
                    .collect();
                out.send.push(ClientFrame::Resume { docs });
            }
            ServerFrame::Resumed { docs } => {
                for answer in docs {
                    self.take_resumed(answer, &mut out);
                }
            }
            ServerFrame::ResumePart { doc, bytes } => {
                session
                    .parts
                    .entry(doc.as_str().to_string())
                    .or_default()
                    .extend_from_slice(&bytes);
            }
            ServerFrame::Update { doc, cursor, update } => {
                let id = doc.as_str().to_string();
                let answered = session.answered.contains(&id);
                if let Some(replica) = self.docs.get(&id) {
                    if let Err(e) = apply_remote(replica.doc(), &update, &Limits::default()) {
                        out.violation = Some(format!("the server sent an update the client cannot apply: {e}"));
                    }
                }
                if answered {
                    self.saw(&id, cursor, "Update", &mut out);
                    self.advance(&id, cursor);
                }
            }
            ServerFrame::Ack { doc, batch, cursor } => {
                let id = doc.as_str().to_string();
                let answered = session.answered.contains(&id);
                let (done, kept): (Vec<OutboxEntry>, Vec<OutboxEntry>) = std::mem::take(&mut self.outbox)
                    .into_iter()
                    .partition(|e| e.doc == id && e.batch <= batch);
                self.outbox = kept;
                self.acked.extend(done.into_iter().map(|e| (e.doc, e.batch, e.update)));
                if answered {
                    self.saw(&id, cursor, "Ack", &mut out);
                    self.advance(&id, cursor);
                }
            }
            ServerFrame::Error { code, doc, batch } => {
                // Errors about a batch or a document leave things unsent: resume again.
                let fatal = matches!(
                    code,
                    ErrorCode::Unauthorized | ErrorCode::UnsupportedVersion | ErrorCode::Malformed
                );
                if fatal || batch.is_some() || doc.is_some() {
                    out.reconnect = true;
                }
            }
            ServerFrame::Ping { nonce } => out.send.push(ClientFrame::Pong { nonce }),
            ServerFrame::Presence { doc, peer, state, .. } => {
                let key = (doc.as_str().to_string(), peer);
                match state {
                    Some(state) => {
                        self.presence.insert(key, state);
                    }
                    None => {
                        self.presence.remove(&key);
                    }
                }
            }
            ServerFrame::Typing { .. } | ServerFrame::Pong { .. } => {}
        }
        out
    }

    fn take_resumed(&mut self, mut answer: DocResumed, out: &mut Outcome) {
        let id = answer.doc.as_str().to_string();
        let Some(session) = self.session.as_mut() else { return };
        let assembled = session.parts.remove(&id);
        let max_push = session.max_push;
        if let Some(update) = answer.update.as_mut().filter(|u| u.is_empty()) {
            match assembled.filter(|whole| !whole.is_empty()) {
                Some(whole) => *update = whole,
                None => {
                    out.violation = Some(format!("the answer for {id} came in pieces, but none arrived"));
                    return;
                }
            }
        }
        let Some(replica) = self.docs.get(&id) else { return };
        if let Some(update) = &answer.update {
            if let Err(e) = apply_remote(replica.doc(), update, &Limits::default()) {
                out.violation = Some(format!("the resume answer for {id} does not apply: {e}"));
                return;
            }
        }
        let outbox: Vec<OutboxEntry> = self.outbox.iter().filter(|e| e.doc == id).cloned().collect();
        let plan = match plan_pushes(replica.doc(), outbox, answer.state_vector.as_deref(), max_push) {
            Ok(plan) => plan,
            Err(e) => {
                out.violation = Some(format!("planning pushes for {id} failed: {e}"));
                return;
            }
        };
        if let Some(session) = self.session.as_mut() {
            session.answered.insert(id.clone());
        }
        self.saw(&id, answer.cursor, "Resumed", out);
        self.advance(&id, answer.cursor);
        let Ok(doc) = DocId::new(id.as_str()) else { return };
        for push in plan {
            let (batch, update) = match push {
                PlannedPush::Outbox(entry) => (entry.batch, entry.update),
                PlannedPush::Recovery(update) => {
                    let batch = self.next_batch;
                    self.next_batch += 1;
                    self.outbox.push(OutboxEntry {
                        doc: id.clone(),
                        batch,
                        update: update.clone(),
                    });
                    (batch, update)
                }
            };
            if let Some(session) = self.session.as_mut() {
                session.sent.push((id.clone(), batch, update.clone()));
            }
            out.send.push(ClientFrame::Push {
                doc: doc.clone(),
                batch,
                update,
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use driftsync_engine::doc::{text, text_insert};
    use driftsync_engine::sync::answer_resume;

    /// The smallest server that follows the protocol: one document per id, a cursor per update,
    /// acknowledgements at once. Enough to check the replica's rules, not the server's.
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

    fn sync(server: &mut FakeServer, replica: &mut NativeReplica) {
        let mut queue: Vec<ClientFrame> = replica.connect("").send;
        while !queue.is_empty() {
            let mut next = Vec::new();
            for frame in queue {
                for answer in server.answer(frame) {
                    let outcome = replica.receive(answer);
                    assert!(outcome.violation.is_none(), "{:?}", outcome.violation);
                    next.extend(outcome.send);
                }
            }
            queue = next;
        }
        assert!(replica.synced());
        replica.disconnect();
    }

    #[test]
    fn offline_writers_converge_and_outboxes_empty() {
        let docs = vec!["notes/1".to_string()];
        let author = |u: &str| Author {
            user: u.into(),
            device: format!("{u}-phone"),
        };
        let mut a = NativeReplica::new(11, author("ada"), &docs);
        let mut b = NativeReplica::new(22, author("bob"), &docs);
        let mut server = FakeServer::default();
        for (replica, word) in [(&mut a, "ada "), (&mut b, "bob ")] {
            let update = text_insert(replica.replica("notes/1").expect("doc").doc(), 0, word).expect("insert");
            replica.write("notes/1", update);
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
