//! The client side of the native protocol as one sans-IO state machine, driven by both
//! [`Client::sync_once`](crate::Client::sync_once) and [`Session`](crate::Session).
//!
//! The machine does no network and no store I/O and reads no clock: the driver feeds it what
//! happened — the connection is up ([`Machine::connected`]), a frame arrived
//! ([`Machine::receive`]), the connection closed ([`Machine::closed`]), time passed
//! ([`Machine::tick`], with `now` counted from any epoch the driver likes), the application asked
//! for something ([`Machine::local_changes`], [`Machine::subscribe`], [`Machine::presence`],
//! [`Machine::typing`]) — and performs the [`Action`]s it answers with, in order. An
//! [`Effect`] is work on the client's documents and store; the driver performs it (see
//! `Client::perform`) and feeds the [`Outcome`] back ([`Machine::feed`]), whose actions come
//! before the ones that followed the effect. Deterministic: the same inputs give the same
//! actions, so a simulation can drive it.
//!
//! The machine owns, once for both drivers: the handshake, the per-connection bookkeeping (which
//! documents are resumed, awaited, to be resumed again; the highest batch pushed and the batches
//! not acknowledged, per document), refusals (a passing one — `RateLimited`, `StoreUnavailable`,
//! … — resumes that document again after a delay; a lasting one for a document stops waiting
//! for it and is reported while the others carry on; `TokenExpired` ends the connection), the
//! assembly of resume answers sent in pieces, heartbeats and silence detection, and when
//! everything is synced.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::Duration;

use driftsync_protocol::{
    ClientFrame, DocId, DocResumed, ErrorCode, ResumeDoc, ServerFrame, CLOSE_RESYNC, CLOSE_UNAUTHORIZED,
    CLOSE_UNSUPPORTED_VERSION, PROTOCOL_VERSION,
};

use crate::sync::push_budget;
use crate::{Error, Event, SyncReport, MAX_ASSEMBLED_ANSWER};

/// How long the hello may take to be welcomed.
pub const HELLO_TIMEOUT: Duration = Duration::from_secs(10);
/// How soon a live session resumes a document again after a refusal for a passing reason.
pub const LIVE_RETRY_DELAY: Duration = Duration::from_secs(1);
/// How soon one sync pass resumes a document again after a refusal for a passing reason.
pub const PASS_RETRY_DELAY: Duration = Duration::from_millis(250);
/// How often one sync pass resumes a document again after refusals for passing reasons before
/// it reports the document refused.
pub const PASS_RETRIES: u32 = 5;
/// The shortest heartbeat a live session accepts from a server's `Welcome`.
const MIN_HEARTBEAT: Duration = Duration::from_millis(500);

/// What drives the machine, which decides what ends a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// One sync pass: it ends ([`End::Done`]) once every document was answered or refused and
    /// every push acknowledged or refused; a refusal naming no document fails it.
    Pass,
    /// A live session: it never ends by itself, pings the server every heartbeat, announces
    /// [`Event::Synced`] and reconnects after a resync close.
    Live,
}

/// How a [`Machine`] behaves.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MachineOptions {
    /// One pass or a live session.
    pub mode: Mode,
    /// How soon a document refused for a passing reason is resumed again.
    pub retry_delay: Duration,
    /// How often a document is resumed again on one connection before it counts as refused
    /// (`None`: without end).
    pub max_retries: Option<u32>,
    /// How long the hello may wait for the server's `Welcome`.
    pub hello_timeout: Duration,
}

impl MachineOptions {
    /// The options of one sync pass ([`Client::sync_once`](crate::Client::sync_once)).
    pub fn pass() -> MachineOptions {
        MachineOptions {
            mode: Mode::Pass,
            retry_delay: PASS_RETRY_DELAY,
            max_retries: Some(PASS_RETRIES),
            hello_timeout: HELLO_TIMEOUT,
        }
    }

    /// The options of a live session ([`Session`](crate::Session)).
    pub fn live() -> MachineOptions {
        MachineOptions {
            mode: Mode::Live,
            retry_delay: LIVE_RETRY_DELAY,
            max_retries: None,
            hello_timeout: HELLO_TIMEOUT,
        }
    }
}

/// What the driver does next, in order.
#[derive(Debug)]
pub enum Action {
    /// Send this frame.
    Send(ClientFrame),
    /// Perform this work on the client's documents and store, then [`Machine::feed`] its outcome.
    Effect(Effect),
    /// Report this event to the application.
    Emit(Event),
    /// The connection is over: close it. Nothing after this is meant to be performed.
    End(End),
}

/// Work on the client's documents and store that the machine asks its driver for. Each one is
/// answered by feeding its [`Outcome`] back to [`Machine::feed`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Effect {
    /// List every known document: answered by [`Outcome::Documents`].
    ListDocuments,
    /// Build the resume entries (cursor, state vector) of these documents: answered by
    /// [`Outcome::ResumeRequest`].
    ResumeRequest {
        /// The documents.
        docs: Vec<String>,
    },
    /// Apply the server's resume answer for one document (assembled already when it came in
    /// pieces) and plan the pushes that follow it (outbox merged into pushes of at most
    /// `max_push_bytes` bytes of batches, plus any recovery): answered by [`Outcome::Resumed`].
    ApplyResumed {
        /// The answer.
        answer: DocResumed,
        /// The most bytes of outbox batches one push may merge.
        max_push_bytes: usize,
    },
    /// Apply an update the server broadcast; move the document's cursor only when `answered`
    /// (its resume answer arrived on this connection). Answered by [`Outcome::Done`].
    ApplyUpdate {
        /// The document.
        doc: String,
        /// The cursor the update comes with.
        cursor: u64,
        /// The update (yrs v1).
        update: Vec<u8>,
        /// Whether the document's resume answer arrived on this connection.
        answered: bool,
    },
    /// Remove `batch` and every older batch of the document from the outbox; move the cursor
    /// only when `answered`. Answered by [`Outcome::Done`].
    Acknowledge {
        /// The document.
        doc: String,
        /// The batch acknowledged.
        batch: u64,
        /// The cursor it was stored at.
        cursor: u64,
        /// Whether the document's resume answer arrived on this connection.
        answered: bool,
    },
    /// Read the document's outbox entries with a batch above `after_batch`, merged into pushes
    /// of at most `max_push_bytes` bytes of batches: answered by [`Outcome::Pushes`].
    PushOutbox {
        /// The document.
        doc: String,
        /// The highest batch pushed on this connection already (0: none).
        after_batch: u64,
        /// The most bytes of outbox batches one push may merge.
        max_push_bytes: usize,
    },
}

/// What performing an [`Effect`] gave.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// For [`Effect::ListDocuments`]: every known document.
    Documents(Vec<String>),
    /// For [`Effect::ResumeRequest`]: one entry per document.
    ResumeRequest(Vec<ResumeDoc>),
    /// For [`Effect::ApplyResumed`].
    Resumed {
        /// The document.
        doc: String,
        /// Whether the answer changed the document.
        changed: bool,
        /// The pushes to send, oldest first: (batch, update).
        pushes: Vec<(u64, Vec<u8>)>,
    },
    /// For [`Effect::PushOutbox`].
    Pushes {
        /// The document.
        doc: String,
        /// The pushes to send, oldest first: (batch, update).
        pushes: Vec<(u64, Vec<u8>)>,
    },
    /// For an effect that gives nothing back.
    Done,
}

/// How a connection ended.
#[derive(Debug)]
pub enum End {
    /// The pass is complete (only in [`Mode::Pass`]).
    Done,
    /// The server asked for a resync (close 4000): reconnect at once and resume.
    Resync,
    /// It failed.
    Failed(Error),
}

/// One connection's state.
#[derive(Debug, Default)]
struct Conn {
    /// The `Welcome` arrived.
    welcomed: bool,
    /// The documents were listed and the first resume planned.
    listed: bool,
    /// Effects handed out whose outcome was not fed back yet.
    effects: usize,
    /// The server's session id.
    session: u64,
    /// The most bytes of outbox batches merged into one push.
    max_push_bytes: usize,
    /// When the hello times out, until the `Welcome`.
    hello_deadline: Option<Duration>,
    /// The heartbeat interval (live sessions only).
    heartbeat: Option<Duration>,
    /// When the next ping is due.
    next_ping: Option<Duration>,
    /// When the server was last heard from.
    last_heard: Duration,
    /// Documents whose resume answer arrived on this connection.
    resumed: BTreeSet<String>,
    /// Documents resumed on this connection whose answer has not arrived.
    awaiting: BTreeSet<String>,
    /// The highest batch pushed per document on this connection.
    pushed: HashMap<String, u64>,
    /// Pushed batches not acknowledged yet, per document.
    unacked: HashMap<String, BTreeSet<u64>>,
    /// Documents to resume again at `retry_at`, after a refusal for a passing reason.
    retry: BTreeSet<String>,
    /// When the documents in `retry` are resumed again.
    retry_at: Option<Duration>,
    /// How often each document was resumed again on this connection.
    retries: HashMap<String, u32>,
    /// Pieces of resume answers too large for one frame, per document, until the document's
    /// `Resumed` entry arrives.
    parts: HashMap<String, Vec<u8>>,
    /// Whether everything was synced after the last input.
    synced: bool,
    /// Whether this connection was ever synced.
    was_synced: bool,
    /// An [`End`] was handed out: the connection is over.
    ended: bool,
}

impl Conn {
    fn synced(&self) -> bool {
        self.welcomed
            && self.listed
            && self.effects == 0
            && self.awaiting.is_empty()
            && self.retry.is_empty()
            && self.unacked.values().all(BTreeSet::is_empty)
    }

    /// Whether `doc` is resumed or being resumed on this connection.
    fn follows(&self, doc: &str) -> bool {
        self.resumed.contains(doc) || self.awaiting.contains(doc) || self.retry.contains(doc)
    }
}

/// The client protocol state machine. See the [module documentation](self).
#[derive(Debug)]
pub struct Machine {
    client_id: u64,
    options: MachineOptions,
    /// Documents followed beyond the stored ones.
    subscribed: BTreeSet<String>,
    /// This device's presence per document, restored after every reconnect.
    presence: BTreeMap<String, Option<String>>,
    /// The inbox followed, and the version of the last inbox frame (asked again from it after
    /// every reconnect).
    inbox: Option<u64>,
    /// The last ping's nonce.
    nonce: u64,
    /// The current connection, if any.
    conn: Option<Conn>,
    /// What the connections did (documents, pushes, round trips, refusals).
    report: SyncReport,
}

impl Machine {
    /// A machine for the replica with yrs client id `client_id`.
    pub fn new(client_id: u64, options: MachineOptions) -> Machine {
        Machine {
            client_id,
            options,
            subscribed: BTreeSet::new(),
            presence: BTreeMap::new(),
            inbox: None,
            nonce: 0,
            conn: None,
            report: SyncReport::default(),
        }
    }

    // ----- queries -----

    /// Whether the server welcomed the current connection.
    pub fn is_connected(&self) -> bool {
        self.conn.as_ref().is_some_and(|c| c.welcomed && !c.ended)
    }

    /// Whether every document is resumed and every push acknowledged (or refused) on the
    /// current connection.
    pub fn is_synced(&self) -> bool {
        self.conn.as_ref().is_some_and(Conn::synced)
    }

    /// Whether the current connection was ever synced.
    pub fn was_synced(&self) -> bool {
        self.conn.as_ref().is_some_and(|c| c.was_synced)
    }

    /// Whether answers or acknowledgements are still awaited on the current connection (a
    /// document refused for a passing reason and waiting to be resumed again is not).
    pub fn pending(&self) -> bool {
        self.conn.as_ref().is_some_and(|c| {
            !c.ended && (c.effects > 0 || !c.awaiting.is_empty() || c.unacked.values().any(|b| !b.is_empty()))
        })
    }

    /// The server's session id of the current connection.
    pub fn session(&self) -> Option<u64> {
        self.conn.as_ref().filter(|c| c.welcomed).map(|c| c.session)
    }

    /// When [`tick`](Self::tick) has something to do next (hello timeout, heartbeat, retry).
    pub fn next_deadline(&self) -> Option<Duration> {
        let conn = self.conn.as_ref().filter(|c| !c.ended)?;
        [conn.hello_deadline, conn.next_ping, conn.retry_at]
            .into_iter()
            .flatten()
            .min()
    }

    /// What the connections did so far: documents resumed, pushes, round trips, and the
    /// documents refused (bytes are the driver's to count).
    pub fn report(&self) -> &SyncReport {
        &self.report
    }

    // ----- inputs -----

    /// A new connection is up at `now`: say hello with `token`. Forgets the previous
    /// connection's state (documents followed and presence are kept).
    pub fn connected(&mut self, token: String, now: Duration) -> Vec<Action> {
        self.conn = Some(Conn {
            hello_deadline: Some(now + self.options.hello_timeout),
            last_heard: now,
            ..Conn::default()
        });
        vec![Action::Send(ClientFrame::Hello {
            version: PROTOCOL_VERSION,
            token,
            client_id: self.client_id,
        })]
    }

    /// The connection is gone (the driver closed it or lost it).
    pub fn disconnected(&mut self) {
        self.conn = None;
    }

    /// The connection closed with close code `code`.
    pub fn closed(&mut self, code: Option<u16>) -> Vec<Action> {
        let end = match code {
            Some(CLOSE_RESYNC) if self.options.mode == Mode::Live => End::Resync,
            _ => End::Failed(closed_error(code)),
        };
        self.finish(vec![Action::End(end)])
    }

    /// Time is `now`: the hello's timeout, heartbeats and silence, documents to resume again.
    pub fn tick(&mut self, now: Duration) -> Vec<Action> {
        let mut actions = Vec::new();
        let Some(conn) = self.conn.as_mut().filter(|c| !c.ended) else {
            return actions;
        };
        if conn.hello_deadline.is_some_and(|d| now >= d) {
            actions.push(Action::End(End::Failed(Error::Timeout(self.options.hello_timeout))));
            return self.finish(actions);
        }
        if let (Some(heartbeat), Some(due)) = (conn.heartbeat, conn.next_ping) {
            if now >= due {
                let silent = now.saturating_sub(conn.last_heard);
                if silent > heartbeat * 2 {
                    actions.push(Action::End(End::Failed(Error::Silent(silent))));
                    return self.finish(actions);
                }
                conn.next_ping = Some(now + heartbeat);
                self.nonce += 1;
                actions.push(Action::Send(ClientFrame::Ping { nonce: self.nonce }));
                // The server forgets presence not refreshed for 30 s (as y-protocols peers do);
                // the heartbeat (15 s by default) renews it, like a Yjs client's awareness.
                if self.options.mode == Mode::Live && conn.listed {
                    for (doc, state) in &self.presence {
                        if state.is_some() {
                            let state = state.clone();
                            push_frame(&mut actions, doc, |doc| ClientFrame::Presence { doc, state });
                        }
                    }
                }
            }
        }
        if conn.retry_at.is_some_and(|at| now >= at) {
            conn.retry_at = None;
            let docs: Vec<String> = std::mem::take(&mut conn.retry).into_iter().collect();
            self.resume_docs(docs, &mut actions);
        }
        self.finish(actions)
    }

    /// Follows `doc` (resumed now when connected), even before any change is made to it.
    pub fn subscribe(&mut self, doc: &str) -> Vec<Action> {
        self.subscribed.insert(doc.to_string());
        let mut actions = Vec::new();
        if self.listed() && !self.follows(doc) {
            self.resume_docs(vec![doc.to_string()], &mut actions);
        }
        self.finish(actions)
    }

    /// Sets (or with `None`, clears) this device's presence in `doc`: sent now when connected
    /// (the document is resumed first if needed) and again after every reconnect.
    pub fn presence(&mut self, doc: &str, state: Option<String>) -> Vec<Action> {
        self.presence.insert(doc.to_string(), state.clone());
        let mut actions = Vec::new();
        if self.listed() {
            if !self.follows(doc) {
                self.resume_docs(vec![doc.to_string()], &mut actions);
            }
            push_frame(&mut actions, doc, |doc| ClientFrame::Presence { doc, state });
        }
        self.finish(actions)
    }

    /// Announces that this device started or stopped typing in `doc`, if the document is
    /// followed on the current connection (typing is not worth delivering late).
    pub fn typing(&mut self, doc: &str, typing: bool) -> Vec<Action> {
        let mut actions = Vec::new();
        if self.listed() && self.follows(doc) {
            push_frame(&mut actions, doc, |doc| ClientFrame::Typing { doc, typing });
        }
        self.finish(actions)
    }

    /// The documents `docs` have new local changes in the store: the outbox entries not pushed on
    /// this connection are pushed; a document not resumed yet is resumed (its answer pushes the
    /// outbox). Nothing happens before the first resume (it covers them).
    pub fn local_changes<I: IntoIterator<Item = String>>(&mut self, docs: I) -> Vec<Action> {
        let mut actions = Vec::new();
        if !self.listed() {
            return actions;
        }
        let mut resume = Vec::new();
        if let Some(conn) = self.conn.as_mut() {
            for doc in docs {
                if conn.awaiting.contains(&doc) || conn.retry.contains(&doc) {
                    continue;
                }
                if !conn.resumed.contains(&doc) {
                    resume.push(doc);
                    continue;
                }
                let after_batch = conn.pushed.get(&doc).copied().unwrap_or(0);
                conn.effects += 1;
                actions.push(Action::Effect(Effect::PushOutbox {
                    doc,
                    after_batch,
                    max_push_bytes: conn.max_push_bytes,
                }));
            }
        }
        self.resume_docs(resume, &mut actions);
        self.finish(actions)
    }

    /// A frame arrived at `now`.
    pub fn receive(&mut self, frame: ServerFrame, now: Duration) -> Vec<Action> {
        let mut actions = Vec::new();
        let live = self.options.mode == Mode::Live;
        let Some(conn) = self.conn.as_mut().filter(|c| !c.ended) else {
            return actions;
        };
        conn.last_heard = now;
        if !conn.welcomed {
            match frame {
                ServerFrame::Welcome {
                    session,
                    heartbeat_ms,
                    max_frame_size,
                    ..
                } => {
                    conn.welcomed = true;
                    conn.hello_deadline = None;
                    conn.session = session;
                    conn.max_push_bytes = push_budget(max_frame_size);
                    if live {
                        let heartbeat = Duration::from_millis(u64::from(heartbeat_ms)).max(MIN_HEARTBEAT);
                        conn.heartbeat = Some(heartbeat);
                        conn.next_ping = Some(now + heartbeat);
                    }
                    conn.effects += 1;
                    actions.push(Action::Emit(Event::Connected { session }));
                    if let Some(since) = self.inbox {
                        // Ahead of the resume: a returning device learns which rooms changed.
                        actions.push(Action::Send(ClientFrame::Inbox { since }));
                    }
                    actions.push(Action::Effect(Effect::ListDocuments));
                }
                ServerFrame::Ping { nonce } => actions.push(Action::Send(ClientFrame::Pong { nonce })),
                ServerFrame::Error { code, doc, batch } => {
                    actions.push(Action::End(End::Failed(Error::Server { code, doc, batch })));
                }
                other => actions.push(Action::End(End::Failed(Error::Protocol(format!(
                    "expected a welcome, got {other:?}"
                ))))),
            }
            return self.finish(actions);
        }
        match frame {
            ServerFrame::Resumed { docs } => {
                for mut answer in docs {
                    let id = answer.doc.as_str().to_string();
                    let assembled = conn.parts.remove(&id);
                    if let Some(update) = answer.update.as_mut().filter(|update| update.is_empty()) {
                        // The answer came ahead in pieces.
                        match assembled.filter(|whole| !whole.is_empty()) {
                            Some(whole) => *update = whole,
                            None => {
                                actions.push(Action::End(End::Failed(Error::Protocol(format!(
                                    "the answer for {id} came in pieces, but none arrived"
                                )))));
                                break;
                            }
                        }
                    }
                    conn.effects += 1;
                    actions.push(Action::Effect(Effect::ApplyResumed {
                        answer,
                        max_push_bytes: conn.max_push_bytes,
                    }));
                }
            }
            ServerFrame::ResumePart { doc, bytes } => {
                let held: usize = conn.parts.values().map(Vec::len).sum();
                if held + bytes.len() > MAX_ASSEMBLED_ANSWER {
                    conn.parts = HashMap::new();
                    actions.push(Action::End(End::Failed(Error::Protocol(format!(
                        "resume answers in pieces exceed {MAX_ASSEMBLED_ANSWER} bytes"
                    )))));
                } else {
                    conn.parts
                        .entry(doc.as_str().to_string())
                        .or_default()
                        .extend_from_slice(&bytes);
                }
            }
            ServerFrame::Update { doc, cursor, update } => {
                let doc = doc.as_str().to_string();
                let answered = conn.resumed.contains(&doc);
                conn.effects += 1;
                actions.push(Action::Effect(Effect::ApplyUpdate {
                    doc: doc.clone(),
                    cursor,
                    update,
                    answered,
                }));
                actions.push(Action::Emit(Event::RemoteChange { doc }));
            }
            ServerFrame::Ack { doc, batch, cursor } => {
                let doc = doc.as_str().to_string();
                let answered = conn.resumed.contains(&doc);
                if let Some(pending) = conn.unacked.get_mut(&doc) {
                    // An acknowledgement covers the batch and every older one.
                    pending.retain(|&b| b > batch);
                }
                conn.effects += 1;
                actions.push(Action::Effect(Effect::Acknowledge {
                    doc: doc.clone(),
                    batch,
                    cursor,
                    answered,
                }));
                actions.push(Action::Emit(Event::Acknowledged { doc, batch }));
            }
            ServerFrame::Error { code, doc, batch } => self.refused(code, doc, batch, now, &mut actions),
            ServerFrame::Presence { doc, peer, user, state } => actions.push(Action::Emit(Event::Presence {
                doc: doc.as_str().to_string(),
                peer,
                user,
                state,
            })),
            ServerFrame::Typing {
                doc,
                peer,
                user,
                typing,
            } => actions.push(Action::Emit(Event::Typing {
                doc: doc.as_str().to_string(),
                peer,
                user,
                typing,
            })),
            ServerFrame::Ping { nonce } => actions.push(Action::Send(ClientFrame::Pong { nonce })),
            ServerFrame::Pong { .. } | ServerFrame::Welcome { .. } => {}
            ServerFrame::Inbox { version, rooms, more } => {
                // Only a complete answer moves the version: a connection lost between pieces
                // asks again from the version before them.
                if let Some(followed) = self.inbox.as_mut().filter(|_| !more) {
                    *followed = (*followed).max(version);
                }
                actions.push(Action::Emit(Event::Inbox { version, rooms, more }));
            }
            ServerFrame::Members { room, members } => actions.push(Action::Emit(Event::Members {
                room: room.as_str().to_string(),
                members,
            })),
        }
        self.finish(actions)
    }

    /// Follows the user's inbox from index version `since` (0: all of it): the server sends it
    /// ([`Event::Inbox`]) and then every change, on this connection and, from the last version
    /// received, on every later one.
    pub fn follow_inbox(&mut self, since: u64) -> Vec<Action> {
        self.inbox = Some(since);
        let mut actions = Vec::new();
        if self.is_connected() {
            actions.push(Action::Send(ClientFrame::Inbox { since }));
        }
        self.finish(actions)
    }

    /// Asks for the members of a chat room ([`Event::Members`]); nothing while disconnected.
    pub fn members(&mut self, room: &str) -> Vec<Action> {
        let mut actions = Vec::new();
        if self.is_connected() {
            push_frame(&mut actions, room, |room| ClientFrame::Members { room });
        }
        self.finish(actions)
    }

    /// The outcome of an effect handed out earlier.
    pub fn feed(&mut self, outcome: Outcome) -> Vec<Action> {
        let mut actions = Vec::new();
        let Some(conn) = self.conn.as_mut().filter(|c| !c.ended) else {
            return actions;
        };
        conn.effects = conn.effects.saturating_sub(1);
        match outcome {
            Outcome::Documents(mut ids) => {
                conn.listed = true;
                ids.extend(self.subscribed.iter().cloned());
                ids.extend(self.presence.keys().cloned());
                ids.sort();
                ids.dedup();
                self.resume_docs(ids, &mut actions);
                if self.options.mode == Mode::Live {
                    for (doc, state) in &self.presence {
                        let state = state.clone();
                        push_frame(&mut actions, doc, |doc| ClientFrame::Presence { doc, state });
                    }
                }
            }
            Outcome::ResumeRequest(docs) => {
                if !docs.is_empty() {
                    self.report.documents += docs.len();
                    self.report.round_trips = 1;
                    actions.push(Action::Send(ClientFrame::Resume { docs }));
                }
            }
            Outcome::Resumed { doc, changed, pushes } => {
                conn.awaiting.remove(&doc);
                conn.resumed.insert(doc.clone());
                self.push(&doc, pushes, &mut actions);
                if changed {
                    actions.push(Action::Emit(Event::RemoteChange { doc }));
                }
            }
            Outcome::Pushes { doc, pushes } => self.push(&doc, pushes, &mut actions),
            Outcome::Done => {}
        }
        self.finish(actions)
    }

    // ----- the bookkeeping -----

    /// Whether the current connection listed its documents (the first resume is planned).
    fn listed(&self) -> bool {
        self.conn.as_ref().is_some_and(|c| c.listed && !c.ended)
    }

    fn follows(&self, doc: &str) -> bool {
        self.conn.as_ref().is_some_and(|c| c.follows(doc))
    }

    /// Plans one resume of `docs`: they are awaited from now on.
    fn resume_docs(&mut self, docs: Vec<String>, actions: &mut Vec<Action>) {
        let Some(conn) = self.conn.as_mut() else { return };
        if docs.is_empty() {
            return;
        }
        for doc in &docs {
            conn.awaiting.insert(doc.clone());
            conn.resumed.remove(doc);
            conn.retry.remove(doc);
        }
        conn.effects += 1;
        actions.push(Action::Effect(Effect::ResumeRequest { docs }));
    }

    /// Sends `pushes` of `doc`, each awaited until acknowledged.
    fn push(&mut self, doc: &str, pushes: Vec<(u64, Vec<u8>)>, actions: &mut Vec<Action>) {
        let Some(conn) = self.conn.as_mut() else { return };
        for (batch, update) in pushes {
            conn.unacked.entry(doc.to_string()).or_default().insert(batch);
            let pushed = conn.pushed.entry(doc.to_string()).or_default();
            *pushed = (*pushed).max(batch);
            self.report.pushes += 1;
            push_frame(actions, doc, |doc| ClientFrame::Push { doc, batch, update });
        }
    }

    /// The server refused something.
    fn refused(
        &mut self,
        code: ErrorCode,
        doc: Option<DocId>,
        batch: Option<u64>,
        now: Duration,
        actions: &mut Vec<Action>,
    ) {
        let error = Error::Server {
            code,
            doc: doc.clone(),
            batch,
        };
        tracing::info!(%error, "the server refused");
        actions.push(Action::Emit(Event::Error {
            message: error.to_string(),
            code: Some(code),
            doc: doc.as_ref().map(|d| d.as_str().to_string()),
        }));
        let Some(conn) = self.conn.as_mut() else { return };
        let id = match doc {
            // The token ran out (the server stops delivering and closes the connection after a
            // short grace): reconnect, which asks for a fresh token.
            _ if code == ErrorCode::TokenExpired => {
                actions.push(Action::End(End::Failed(error)));
                return;
            }
            Some(doc) => doc.as_str().to_string(),
            // About the connection, not a document: a pass fails; a live session reports it
            // (a fatal one is followed by a close).
            None => {
                if self.options.mode == Mode::Pass {
                    actions.push(Action::End(End::Failed(error)));
                }
                return;
            }
        };
        if code == ErrorCode::NotSubscribed && batch.is_none() {
            // Presence or typing sent for a document the server does not count this connection
            // in (its resume is being retried, or was refused): the document's own resume
            // decides what happens to it; this cancels nothing (found by the simulation: it
            // cancelled the retry of a refused resume, and the outbox waited for ever).
            return;
        }
        let retries = conn.retries.entry(id.clone()).or_default();
        if error.is_retryable() && self.options.max_retries.is_none_or(|max| *retries < max) {
            // Resume the document again shortly: the answer shows what the server has, and the
            // pushes are planned from it (recovering missing parts).
            *retries = retries.saturating_add(1);
            conn.unacked.remove(&id);
            conn.pushed.remove(&id);
            conn.resumed.remove(&id);
            conn.awaiting.remove(&id);
            conn.retry.insert(id);
            conn.retry_at.get_or_insert(now + self.options.retry_delay);
            return;
        }
        if self.options.mode == Mode::Pass {
            // A live session reports refusals as events only: its report would grow forever.
            self.report.refused.push((id.clone(), code));
        }
        match batch {
            // That push will never be acknowledged; the document's others still may be.
            Some(batch) if !error.is_retryable() => {
                if let Some(pending) = conn.unacked.get_mut(&id) {
                    pending.remove(&batch);
                }
            }
            // The document itself is refused (forbidden, too many, retried too often…): stop
            // waiting for it.
            _ => {
                conn.awaiting.remove(&id);
                conn.retry.remove(&id);
                conn.unacked.remove(&id);
            }
        }
    }

    /// Ends every input: notes an [`End`] handed out, and announces the moment everything is
    /// synced (a live session emits [`Event::Synced`]; a pass is done).
    fn finish(&mut self, mut actions: Vec<Action>) -> Vec<Action> {
        let Some(conn) = self.conn.as_mut() else {
            return actions;
        };
        if conn.ended {
            return Vec::new();
        }
        if let Some(at) = actions.iter().position(|a| matches!(a, Action::End(_))) {
            actions.truncate(at + 1);
            conn.ended = true;
            return actions;
        }
        let synced = conn.synced();
        if synced && !conn.synced {
            match self.options.mode {
                Mode::Live => actions.push(Action::Emit(Event::Synced)),
                Mode::Pass => {
                    actions.push(Action::End(End::Done));
                    conn.ended = true;
                }
            }
        }
        conn.synced = synced;
        conn.was_synced |= synced;
        actions
    }
}

/// Appends the frame `make` builds for document `doc` (a document id this machine handed out
/// is valid; one that is not ends the connection).
fn push_frame(actions: &mut Vec<Action>, doc: &str, make: impl FnOnce(DocId) -> ClientFrame) {
    match DocId::new(doc) {
        Ok(doc) => actions.push(Action::Send(make(doc))),
        Err(e) => actions.push(Action::End(End::Failed(Error::DocId(e)))),
    }
}

/// The error a close with `code` means.
fn closed_error(code: Option<u16>) -> Error {
    let code = match code {
        Some(CLOSE_UNAUTHORIZED) => ErrorCode::Unauthorized,
        Some(CLOSE_UNSUPPORTED_VERSION) => ErrorCode::UnsupportedVersion,
        _ => return Error::Closed,
    };
    Error::Server {
        code,
        doc: None,
        batch: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const T0: Duration = Duration::ZERO;

    fn id(s: &str) -> DocId {
        DocId::new(s).unwrap()
    }

    fn welcome() -> ServerFrame {
        ServerFrame::Welcome {
            version: PROTOCOL_VERSION,
            max_frame_size: 1 << 20,
            session: 7,
            heartbeat_ms: 1_000,
        }
    }

    fn resume_doc(doc: &str) -> ResumeDoc {
        ResumeDoc {
            doc: id(doc),
            cursor: 0,
            state_vector: vec![0],
        }
    }

    fn answer(doc: &str, update: Option<Vec<u8>>) -> DocResumed {
        DocResumed {
            doc: id(doc),
            cursor: 3,
            update,
            state_vector: None,
        }
    }

    fn error(code: ErrorCode, doc: Option<&str>, batch: Option<u64>) -> ServerFrame {
        ServerFrame::Error {
            code,
            doc: doc.map(id),
            batch,
        }
    }

    /// Only the frames sent.
    fn sent(actions: &[Action]) -> Vec<ClientFrame> {
        actions
            .iter()
            .filter_map(|a| match a {
                Action::Send(frame) => Some(frame.clone()),
                _ => None,
            })
            .collect()
    }

    fn ended(actions: &[Action]) -> bool {
        matches!(actions.last(), Some(Action::End(_)))
    }

    fn done(actions: &[Action]) -> bool {
        matches!(actions.last(), Some(Action::End(End::Done)))
    }

    /// Connects, is welcomed, lists `docs` and sends their resume; returns the machine.
    fn resumed_machine(mode: MachineOptions, docs: &[&str]) -> Machine {
        let mut m = Machine::new(42, mode);
        let hello = m.connected("tok".into(), T0);
        assert_eq!(
            sent(&hello),
            vec![ClientFrame::Hello {
                version: PROTOCOL_VERSION,
                token: "tok".into(),
                client_id: 42,
            }]
        );
        assert!(!m.is_connected());
        let a = m.receive(welcome(), T0);
        assert!(matches!(
            &a[..],
            [
                Action::Emit(Event::Connected { session: 7 }),
                Action::Effect(Effect::ListDocuments)
            ]
        ));
        assert!(
            m.is_connected() && !m.is_synced(),
            "not synced before the documents are listed"
        );
        let a = m.feed(Outcome::Documents(docs.iter().map(|d| d.to_string()).collect()));
        if docs.is_empty() {
            return m;
        }
        let [Action::Effect(Effect::ResumeRequest { docs: asked })] = &a[..] else {
            panic!("{a:?}")
        };
        assert_eq!(asked, &docs.iter().map(|d| d.to_string()).collect::<Vec<_>>());
        let a = m.feed(Outcome::ResumeRequest(docs.iter().map(|d| resume_doc(d)).collect()));
        assert!(matches!(&a[..], [Action::Send(ClientFrame::Resume { docs: sent })] if sent.len() == docs.len()));
        assert!(m.pending());
        m
    }

    /// Feeds the answer of `doc` and the outcome of applying it (with `pushes`).
    fn answered(m: &mut Machine, doc: &str, pushes: Vec<(u64, Vec<u8>)>) -> Vec<Action> {
        let a = m.receive(
            ServerFrame::Resumed {
                docs: vec![answer(doc, None)],
            },
            T0,
        );
        assert!(matches!(&a[..], [Action::Effect(Effect::ApplyResumed { .. })]), "{a:?}");
        m.feed(Outcome::Resumed {
            doc: doc.into(),
            changed: false,
            pushes,
        })
    }

    /// Receives an acknowledgement and feeds back the outcome of recording it.
    fn ack(m: &mut Machine, doc: &str, batch: u64, cursor: u64) -> Vec<Action> {
        let frame = ServerFrame::Ack {
            doc: id(doc),
            batch,
            cursor,
        };
        let mut a = m.receive(frame, T0);
        assert!(
            matches!(
                &a[..],
                [
                    Action::Effect(Effect::Acknowledge { .. }),
                    Action::Emit(Event::Acknowledged { .. })
                ]
            ),
            "{a:?}"
        );
        a.extend(m.feed(Outcome::Done));
        a
    }

    #[test]
    fn handshake_and_an_empty_pass() {
        let mut m = resumed_machine(MachineOptions::pass(), &[]);
        assert!(m.is_synced());
        // Nothing to resume: the pass is over at once (the feed of the listing ended it).
        assert!(m.tick(Duration::from_secs(60)).is_empty(), "nothing after the end");
        assert_eq!(m.report().documents, 0);
    }

    #[test]
    fn the_hello_times_out_and_refusals_before_the_welcome_fail() {
        let mut m = Machine::new(1, MachineOptions::live());
        m.connected(String::new(), T0);
        assert_eq!(m.next_deadline(), Some(HELLO_TIMEOUT));
        assert!(m.tick(HELLO_TIMEOUT - Duration::from_millis(1)).is_empty());
        let a = m.tick(HELLO_TIMEOUT);
        assert!(matches!(&a[..], [Action::End(End::Failed(Error::Timeout(_)))]));

        m.connected(String::new(), T0);
        let a = m.receive(error(ErrorCode::Unauthorized, None, None), T0);
        assert!(matches!(
            &a[..],
            [Action::End(End::Failed(Error::Server {
                code: ErrorCode::Unauthorized,
                ..
            }))]
        ));
        m.connected(String::new(), T0);
        let a = m.receive(ServerFrame::Pong { nonce: 1 }, T0);
        assert!(matches!(&a[..], [Action::End(End::Failed(Error::Protocol(_)))]));
        m.connected(String::new(), T0);
        assert!(matches!(
            &m.closed(Some(CLOSE_UNSUPPORTED_VERSION))[..],
            [Action::End(End::Failed(Error::Server {
                code: ErrorCode::UnsupportedVersion,
                ..
            }))]
        ));
    }

    #[test]
    fn one_forbidden_document_does_not_fail_the_pass() {
        let mut m = resumed_machine(MachineOptions::pass(), &["notes", "secret"]);
        let a = m.receive(error(ErrorCode::Forbidden, Some("secret"), None), T0);
        assert!(
            matches!(
                &a[..],
                [Action::Emit(Event::Error {
                    code: Some(ErrorCode::Forbidden),
                    ..
                })]
            ),
            "{a:?}"
        );
        assert!(!ended(&a));
        let a = answered(&mut m, "notes", vec![(5, vec![1]), (6, vec![2])]);
        assert_eq!(sent(&a).len(), 2, "the outbox is pushed");
        assert!(!ended(&a), "the pushes are not acknowledged yet");
        let a = ack(&mut m, "notes", 6, 9);
        assert!(matches!(
            &a[0],
            Action::Effect(Effect::Acknowledge {
                batch: 6,
                cursor: 9,
                answered: true,
                ..
            })
        ));
        assert!(done(&a), "the last batch's ack covers the older one: {a:?}");
        assert_eq!(m.report().refused, vec![("secret".to_string(), ErrorCode::Forbidden)]);
        assert_eq!((m.report().documents, m.report().pushes), (2, 2));
    }

    #[test]
    fn a_refusal_without_a_document_fails_a_pass_but_not_a_session() {
        let mut m = resumed_machine(MachineOptions::pass(), &["notes"]);
        let a = m.receive(error(ErrorCode::Unavailable, None, None), T0);
        assert!(matches!(a.last(), Some(Action::End(End::Failed(Error::Server { .. })))));
        let mut m = resumed_machine(MachineOptions::live(), &["notes"]);
        assert!(!ended(&m.receive(error(ErrorCode::Unavailable, None, None), T0)));
        // An expired token ends a live connection too (its reconnect asks for a fresh token).
        let a = m.receive(error(ErrorCode::TokenExpired, Some("notes"), Some(3)), T0);
        assert!(matches!(
            a.last(),
            Some(Action::End(End::Failed(Error::Server {
                code: ErrorCode::TokenExpired,
                ..
            })))
        ));
    }

    #[test]
    fn a_rate_limited_push_is_retried() {
        let mut m = resumed_machine(MachineOptions::pass(), &["notes"]);
        answered(&mut m, "notes", vec![(3, vec![1])]);
        let now = Duration::from_secs(1);
        let a = m.receive(error(ErrorCode::RateLimited, Some("notes"), Some(3)), now);
        assert!(!ended(&a));
        assert!(!m.is_synced() && !m.pending(), "waiting to resume it again");
        assert_eq!(m.next_deadline(), Some(now + PASS_RETRY_DELAY));
        assert!(m.tick(now).is_empty(), "not yet");
        let a = m.tick(now + PASS_RETRY_DELAY);
        assert!(matches!(&a[..], [Action::Effect(Effect::ResumeRequest { docs })] if docs == &["notes"]));
        let a = m.feed(Outcome::ResumeRequest(vec![resume_doc("notes")]));
        assert_eq!(sent(&a).len(), 1);
        // The answer plans the push again; the same batch is pushed again.
        let a = answered(&mut m, "notes", vec![(3, vec![1])]);
        assert!(matches!(&sent(&a)[..], [ClientFrame::Push { batch: 3, .. }]));
        let a = ack(&mut m, "notes", 3, 4);
        assert!(done(&a));
        assert!(m.report().refused.is_empty());
        assert_eq!((m.report().documents, m.report().pushes), (2, 2));
    }

    #[test]
    fn a_pass_gives_up_on_a_document_refused_too_often() {
        let mut m = resumed_machine(MachineOptions::pass(), &["busy", "notes"]);
        answered(&mut m, "notes", Vec::new());
        let mut now = T0;
        for _ in 0..PASS_RETRIES {
            assert!(!ended(
                &m.receive(error(ErrorCode::RateLimited, Some("busy"), None), now)
            ));
            now += PASS_RETRY_DELAY;
            let a = m.tick(now);
            assert!(matches!(&a[..], [Action::Effect(Effect::ResumeRequest { .. })]));
            m.feed(Outcome::ResumeRequest(vec![resume_doc("busy")]));
        }
        let a = m.receive(error(ErrorCode::RateLimited, Some("busy"), None), now);
        assert!(done(&a), "{a:?}");
        assert_eq!(m.report().refused, vec![("busy".to_string(), ErrorCode::RateLimited)]);
    }

    #[test]
    fn a_live_session_retries_without_end() {
        let mut m = resumed_machine(MachineOptions::live(), &["notes"]);
        let mut now = T0;
        for _ in 0..PASS_RETRIES * 3 {
            m.receive(error(ErrorCode::RateLimited, Some("notes"), None), now);
            now += LIVE_RETRY_DELAY;
            let a = m.tick(now);
            assert!(a
                .iter()
                .any(|a| matches!(a, Action::Effect(Effect::ResumeRequest { .. }))));
            m.feed(Outcome::ResumeRequest(vec![resume_doc("notes")]));
        }
        assert!(m.report().refused.is_empty());
    }

    #[test]
    fn a_refused_push_is_no_longer_awaited() {
        let mut m = resumed_machine(MachineOptions::live(), &["chat/x"]);
        let a = answered(&mut m, "chat/x", vec![(1, vec![1]), (2, vec![2])]);
        assert!(!a.iter().any(|a| matches!(a, Action::Emit(Event::Synced))));
        m.receive(error(ErrorCode::SchemaViolation, Some("chat/x"), Some(1)), T0);
        assert!(!m.is_synced(), "batch 2 is still awaited");
        let a = ack(&mut m, "chat/x", 2, 8);
        assert!(matches!(a.last(), Some(Action::Emit(Event::Synced))), "{a:?}");
    }

    #[test]
    fn acks_out_of_order_and_covering_older_batches() {
        let mut m = resumed_machine(MachineOptions::live(), &["notes"]);
        answered(&mut m, "notes", vec![(1, vec![1]), (2, vec![2]), (3, vec![3])]);
        ack(&mut m, "notes", 2, 12);
        assert!(!m.is_synced(), "3 is still awaited");
        let a = ack(&mut m, "notes", 1, 11);
        assert!(!m.is_synced(), "a late, older ack changes nothing");
        assert!(matches!(&a[0], Action::Effect(Effect::Acknowledge { batch: 1, .. })));
        let a = ack(&mut m, "notes", 3, 13);
        assert!(matches!(a.last(), Some(Action::Emit(Event::Synced))));
        assert!(m.is_synced() && m.was_synced());
    }

    #[test]
    fn synced_is_announced_once_per_change() {
        let mut m = resumed_machine(MachineOptions::live(), &["a", "b"]);
        let a = answered(&mut m, "a", Vec::new());
        assert!(
            !a.iter().any(|a| matches!(a, Action::Emit(Event::Synced))),
            "b is awaited"
        );
        let a = answered(&mut m, "b", Vec::new());
        assert!(matches!(a.last(), Some(Action::Emit(Event::Synced))));
        // A local change: its outbox is read (after what was pushed), pushed, acknowledged.
        let a = m.local_changes(["a".to_string()]);
        let [Action::Effect(Effect::PushOutbox {
            doc, after_batch: 0, ..
        })] = &a[..]
        else {
            panic!("{a:?}")
        };
        assert_eq!(doc, "a");
        assert!(!m.is_synced(), "the outbox is being read");
        let a = m.feed(Outcome::Pushes {
            doc: "a".into(),
            pushes: vec![(4, vec![4])],
        });
        assert_eq!(sent(&a).len(), 1);
        assert!(!m.is_synced());
        let a = m.local_changes(["a".to_string()]);
        assert!(matches!(
            &a[..],
            [Action::Effect(Effect::PushOutbox { after_batch: 4, .. })]
        ));
        m.feed(Outcome::Pushes {
            doc: "a".into(),
            pushes: Vec::new(),
        });
        let a = ack(&mut m, "a", 4, 5);
        assert!(matches!(a.last(), Some(Action::Emit(Event::Synced))));
        // A change to a document not followed yet resumes it.
        let a = m.local_changes(["c".to_string()]);
        assert!(matches!(&a[..], [Action::Effect(Effect::ResumeRequest { docs })] if docs == &["c"]));
    }

    #[test]
    fn pieces_of_answers_are_assembled_and_bounded() {
        let mut m = resumed_machine(MachineOptions::pass(), &["big", "small"]);
        for piece in [vec![1, 2], vec![3]] {
            let part = ServerFrame::ResumePart {
                doc: id("big"),
                bytes: piece,
            };
            assert!(m.receive(part, T0).is_empty());
        }
        let a = m.receive(
            ServerFrame::Resumed {
                docs: vec![answer("big", Some(Vec::new())), answer("small", Some(vec![9]))],
            },
            T0,
        );
        let [Action::Effect(Effect::ApplyResumed { answer: big, .. }), Action::Effect(Effect::ApplyResumed { answer: small, .. })] =
            &a[..]
        else {
            panic!("{a:?}")
        };
        assert_eq!(big.update.as_deref(), Some(&[1, 2, 3][..]));
        assert_eq!(small.update.as_deref(), Some(&[9][..]));

        // An empty update without pieces is the server's mistake.
        let mut m = resumed_machine(MachineOptions::pass(), &["big"]);
        let a = m.receive(
            ServerFrame::Resumed {
                docs: vec![answer("big", Some(Vec::new()))],
            },
            T0,
        );
        assert!(matches!(&a[..], [Action::End(End::Failed(Error::Protocol(_)))]));

        // A server cannot make the client hold more than the bound, all documents together.
        let mut m = resumed_machine(MachineOptions::pass(), &["a"]);
        let piece = vec![0u8; MAX_ASSEMBLED_ANSWER / 2];
        for doc in ["a", "b"] {
            let part = ServerFrame::ResumePart {
                doc: id(doc),
                bytes: piece.clone(),
            };
            assert!(m.receive(part, T0).is_empty());
        }
        let a = m.receive(
            ServerFrame::ResumePart {
                doc: id("c"),
                bytes: vec![1],
            },
            T0,
        );
        assert!(matches!(&a[..], [Action::End(End::Failed(Error::Protocol(_)))]));
    }

    #[test]
    fn heartbeats_and_silence() {
        let mut m = resumed_machine(MachineOptions::live(), &["notes"]);
        let beat = Duration::from_secs(1);
        assert_eq!(m.next_deadline(), Some(beat));
        let a = m.tick(beat);
        assert_eq!(sent(&a), vec![ClientFrame::Ping { nonce: 1 }]);
        m.receive(ServerFrame::Pong { nonce: 1 }, beat);
        assert_eq!(sent(&m.tick(beat * 2)), vec![ClientFrame::Ping { nonce: 2 }]);
        // Nothing heard for more than two heartbeats: the connection is dead.
        let a = m.tick(beat * 4);
        assert!(matches!(&a[..], [Action::End(End::Failed(Error::Silent(_)))]), "{a:?}");
        // The server's pings are answered, in both modes.
        let mut m = resumed_machine(MachineOptions::pass(), &["notes"]);
        assert_eq!(
            sent(&m.receive(ServerFrame::Ping { nonce: 5 }, T0)),
            vec![ClientFrame::Pong { nonce: 5 }]
        );
        assert_eq!(m.next_deadline(), None, "a pass does not ping");
    }

    #[test]
    fn presence_subscriptions_and_typing_survive_reconnects() {
        let mut m = Machine::new(1, MachineOptions::live());
        assert!(m.presence("room", Some("{}".into())).is_empty(), "offline: noted");
        assert!(m.subscribe("extra").is_empty());
        m.connected(String::new(), T0);
        m.receive(welcome(), T0);
        assert!(m.typing("room", true).is_empty(), "not followed yet");
        let a = m.feed(Outcome::Documents(vec!["notes".into()]));
        let [Action::Effect(Effect::ResumeRequest { docs }), Action::Send(ClientFrame::Presence { .. })] = &a[..]
        else {
            panic!("{a:?}")
        };
        assert_eq!(docs, &["extra", "notes", "room"]);
        assert_eq!(sent(&m.typing("room", true)).len(), 1);
        // Presence in a document not followed resumes it first.
        let a = m.presence("other", None);
        assert!(matches!(
            &a[..],
            [
                Action::Effect(Effect::ResumeRequest { .. }),
                Action::Send(ClientFrame::Presence { state: None, .. })
            ]
        ));
        // A resync close reconnects; other closes fail.
        assert!(matches!(&m.closed(Some(CLOSE_RESYNC))[..], [Action::End(End::Resync)]));
        m.connected(String::new(), T0);
        m.receive(welcome(), T0);
        let a = m.feed(Outcome::Documents(Vec::new()));
        assert!(matches!(&a[0], Action::Effect(Effect::ResumeRequest { docs }) if docs == &["extra", "other", "room"]));
        assert_eq!(sent(&a).len(), 2, "both presences are restored");
    }
}
