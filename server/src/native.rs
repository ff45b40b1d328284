//! The native endpoint, `/v1/sync`: the postcard protocol of `driftsync-protocol`, one WebSocket
//! multiplexing any number of documents. [`NativeHandler`] is its sans-IO state machine (see
//! [`crate::handler`]): hello and authentication, resumes answered document by document (large
//! answers in pieces), pipelined pushes acknowledged in order, presence, typing, reauth and
//! token expiry.

use std::collections::{BTreeSet, HashSet, VecDeque};
use std::time::Duration;

use driftsync_engine::doc::MAX_CLIENT_ID;
use driftsync_engine::store::Origin;
use driftsync_protocol::{
    ClientFrame, DocId, DocResumed, ErrorCode, ResumeDoc, ServerFrame, CLOSE_PROTOCOL_ERROR, CLOSE_RESYNC,
    CLOSE_UNAUTHORIZED, CLOSE_UNSUPPORTED_VERSION, PROTOCOL_VERSION,
};
use tokio::time::Instant;

use crate::auth::{Access, Auth, Grant};
use crate::event::{Codec, RoomEvent};
use crate::handler::{Action, Actions, Handler, Now, Reply, Request};
use crate::owners::Ownership;

/// What a `Resumed` frame holding one document needs besides the document's update (its id,
/// cursor, state vector, framing), with room to spare.
const RESUMED_OVERHEAD: usize = 64 * 1024;

/// Encodes a room event as a native frame.
fn encode(event: &RoomEvent) -> Option<Vec<u8>> {
    let frame = match event {
        RoomEvent::Update { doc, cursor, update } => ServerFrame::Update {
            doc: doc.clone(),
            cursor: *cursor,
            update: update.clone(),
        },
        RoomEvent::Presence {
            doc, peer, user, state, ..
        } => ServerFrame::Presence {
            doc: doc.clone(),
            peer: *peer,
            user: user.clone(),
            state: state.clone(),
        },
        RoomEvent::Typing {
            doc,
            peer,
            user,
            typing,
        } => ServerFrame::Typing {
            doc: doc.clone(),
            peer: *peer,
            user: user.clone(),
            typing: *typing,
        },
        RoomEvent::Ack { doc, batch, cursor } => ServerFrame::Ack {
            doc: doc.clone(),
            batch: *batch,
            cursor: *cursor,
        },
        // Hocuspocus providers' application messages mean nothing to a native client.
        RoomEvent::Stateless { .. } => return None,
    };
    Some(frame.encode())
}

fn error(code: ErrorCode, doc: Option<DocId>, batch: Option<u64>) -> Vec<u8> {
    ServerFrame::Error { code, doc, batch }.encode()
}

/// What the native handler needs of the server's configuration.
#[derive(Clone)]
pub(crate) struct Settings {
    pub(crate) auth: Auth,
    pub(crate) max_frame_size: usize,
    pub(crate) heartbeat: Duration,
    pub(crate) hello_timeout: Duration,
    pub(crate) token_grace: Duration,
    pub(crate) max_docs_per_connection: usize,
}

impl Settings {
    pub(crate) fn of(config: &crate::config::Config) -> Settings {
        Settings {
            auth: config.auth.clone(),
            max_frame_size: config.max_frame_size,
            heartbeat: config.heartbeat,
            hello_timeout: config.hello_timeout,
            token_grace: config.token_grace,
            max_docs_per_connection: config.max_docs_per_connection,
        }
    }
}

/// One native connection's protocol state.
pub(crate) struct NativeHandler {
    settings: std::sync::Arc<Settings>,
    session: u64,
    phase: Phase,
}

enum Phase {
    /// Waiting for the hello, until `deadline`.
    Hello { deadline: Instant },
    /// The hello's client id is being bound to its user.
    Claiming { grant: Grant, client_id: u64 },
    /// Accepted.
    Open(Box<Peer>),
    /// Closing: nothing more is done.
    Closed,
}

/// What the connection knows about its peer after the hello.
struct Peer {
    client_id: u64,
    /// What the peer's token allows (replaced by a `Reauth`).
    grant: Grant,
    /// The documents subscribed (ordered: they are left in one order, run after run).
    docs: BTreeSet<DocId>,
    /// Documents a push of which was refused here for a passing reason (the rate limit): their
    /// later pushes are refused too until the client resumes them (see `rate_limited`).
    fenced: BTreeSet<DocId>,
    nonce: u64,
    /// When the token expires or, once it has, when the grace for a `Reauth` ends.
    expiry: Option<Instant>,
    /// Whether the token has expired (and the connection waits for a `Reauth`).
    expired: bool,
    /// The resume being answered, if any.
    resume: Option<Resume>,
    /// The inbox the peer follows, once it asked for it.
    inbox: Option<InboxFollow>,
}

/// The inbox a peer follows (see `crate::inbox`).
#[derive(Default)]
struct InboxFollow {
    /// The index version of the last inbox frame sent (or the peer's `since`).
    version: u64,
    /// The `since` of the read of the store in flight.
    reading: Option<u64>,
    /// The read in flight answers the peer's own request: answered even if nothing changed.
    asked: bool,
    /// A request of the peer's that came while a read was in flight: answered after it.
    requested: Option<u64>,
    /// It may have changed while reading: read again after.
    again: bool,
    /// When the last read started, and when a wake-up that came too soon after it is due.
    last_read: Option<Instant>,
    due: Option<Instant>,
}

/// The least time between two reads of a connection's inbox, whether a change (a busy room of
/// the user's wakes it at every message) or the peer's own request causes them: requests
/// repeated faster are answered together, once.
const INBOX_READ_EVERY: Duration = Duration::from_millis(250);

impl InboxFollow {
    fn start_read(&mut self, since: u64, asked: bool, now: Instant, out: &mut Actions) {
        self.reading = Some(since);
        self.asked = asked;
        self.last_read = Some(now);
        out.push_back(Action::Request(Request::Inbox { since }));
    }

    /// The inbox may have changed: read it now, after the read in flight, or once the pace
    /// allows.
    fn changed(&mut self, now: Instant, out: &mut Actions) {
        self.again = true;
        self.next(now, out);
    }

    /// The peer asks for what changed after `since`: answered like a change, paced alike (a
    /// peer repeating its request costs one read per [`INBOX_READ_EVERY`], not one per frame).
    fn asked(&mut self, since: u64, now: Instant, out: &mut Actions) {
        self.requested = Some(since);
        self.next(now, out);
    }

    /// Starts the read wanted (a request first, else a change), unless one is in flight or
    /// the last started less than [`INBOX_READ_EVERY`] ago (then it is due then).
    fn next(&mut self, now: Instant, out: &mut Actions) {
        if self.reading.is_some() || (self.requested.is_none() && !self.again) {
            return;
        }
        if let Some(next) = self
            .last_read
            .map(|at| at + INBOX_READ_EVERY)
            .filter(|&next| next > now)
        {
            self.due.get_or_insert(next);
            return;
        }
        self.due = None;
        // A request reads from its own version, which covers every change since: `again` too.
        self.again = false;
        match self.requested.take() {
            Some(since) => self.start_read(since, true, now, out),
            None => self.start_read(self.version, false, now, out),
        }
    }
}

/// The largest inbox frame: an answer goes in pieces of about this size (each a frame).
const INBOX_PIECE_BYTES: usize = 256 * 1024;

/// A resume being answered, document by document.
struct Resume {
    todo: VecDeque<ResumeDoc>,
    listed: HashSet<DocId>,
    /// Entries of the `Resumed` frame being built, and its size.
    answers: Vec<DocResumed>,
    size: usize,
    /// Documents resumed, whose presence is sent once the answer is complete.
    resumed: BTreeSet<DocId>,
}

impl Peer {
    /// Whether the peer may open `doc` now: its token has not expired and covers `doc`.
    fn may_read(&self, doc: &DocId, now: Now) -> Result<Access, ErrorCode> {
        if self.grant.is_expired_at(now.unix) {
            return Err(ErrorCode::TokenExpired);
        }
        self.grant.access(doc).ok_or(ErrorCode::Forbidden)
    }

    /// Whether the peer may write `doc` now: as [`Peer::may_read`], and the token is not
    /// read-only.
    fn may_write(&self, doc: &DocId, now: Now) -> Result<(), ErrorCode> {
        match self.may_read(doc, now)? {
            Access::Write => Ok(()),
            Access::Read => Err(ErrorCode::ReadOnly),
        }
    }
}

/// When `grant` expires (it is valid through its `exp` second), on tokio's clock.
fn expiry_deadline(grant: &Grant, now: Now) -> Option<Instant> {
    let exp = grant.expires_at?;
    let left = (exp + 1).saturating_sub(now.unix);
    Some(now.at + Duration::from_secs(left))
}

impl NativeHandler {
    pub(crate) fn new(settings: std::sync::Arc<Settings>, session: u64) -> NativeHandler {
        NativeHandler {
            settings,
            session,
            // Set for real by `start`.
            phase: Phase::Hello {
                deadline: Instant::now(),
            },
        }
    }

    fn refuse(&mut self, code: ErrorCode, close: u16, out: &mut Actions) {
        out.push_back(Action::Send(error(code, None, None)));
        out.push_back(Action::Close(close));
        self.phase = Phase::Closed;
    }

    fn hello(&mut self, bytes: &[u8], now: Now, out: &mut Actions) {
        let session = self.session;
        let frame = match ClientFrame::decode(bytes, self.settings.max_frame_size) {
            Ok(ClientFrame::Hello {
                version,
                token,
                client_id,
            }) => (version, token, client_id),
            Ok(_) => return self.refuse(ErrorCode::Malformed, CLOSE_PROTOCOL_ERROR, out),
            Err(e) => {
                tracing::info!(session, error = %e, "bad hello");
                return self.refuse(ErrorCode::Malformed, CLOSE_PROTOCOL_ERROR, out);
            }
        };
        let (version, token, client_id) = frame;
        if version != PROTOCOL_VERSION {
            return self.refuse(ErrorCode::UnsupportedVersion, CLOSE_UNSUPPORTED_VERSION, out);
        }
        let grant = match self.settings.auth.verify_at(&token, now.unix) {
            Ok(grant) => grant,
            Err(code) => {
                tracing::info!(session, ?code, "hello refused");
                return self.refuse(code, CLOSE_UNAUTHORIZED, out);
            }
        };
        if client_id == 0 || client_id >= MAX_CLIENT_ID {
            tracing::info!(session, client_id, "hello refused: client id not in 1..2^53");
            return self.refuse(ErrorCode::Malformed, CLOSE_PROTOCOL_ERROR, out);
        }
        // The client id keys the deduplication of this connection's batches: it must be the
        // user's own, or anyone could make another's batches look like re-sends.
        match grant.identity().map(str::to_owned) {
            Some(user) => {
                out.push_back(Action::Request(Request::Claim { client_id, user }));
                self.phase = Phase::Claiming { grant, client_id };
            }
            None => self.welcome(grant, client_id, now, out),
        }
    }

    fn welcome(&mut self, grant: Grant, client_id: u64, now: Now, out: &mut Actions) {
        // Authenticated: from here on frames up to the full size (the hello's limit was
        // `max_hello_frame`). Raised before the welcome, after which the client may send.
        out.push_back(Action::FrameLimit(self.settings.max_frame_size));
        out.push_back(Action::Send(
            ServerFrame::Welcome {
                version: PROTOCOL_VERSION,
                max_frame_size: u32::try_from(self.settings.max_frame_size).unwrap_or(u32::MAX),
                session: self.session,
                heartbeat_ms: u32::try_from(self.settings.heartbeat.as_millis()).unwrap_or(u32::MAX),
            }
            .encode(),
        ));
        self.phase = Phase::Open(Box::new(Peer {
            client_id,
            expiry: expiry_deadline(&grant, now),
            grant,
            docs: BTreeSet::new(),
            fenced: BTreeSet::new(),
            nonce: 0,
            expired: false,
            resume: None,
            inbox: None,
        }));
    }

    fn frame(&mut self, bytes: &[u8], now: Now, out: &mut Actions) {
        let session = self.session;
        let settings = std::sync::Arc::clone(&self.settings);
        let Phase::Open(peer) = &mut self.phase else { return };
        let frame = match ClientFrame::decode(bytes, settings.max_frame_size) {
            Ok(frame) => frame,
            Err(e) => {
                tracing::info!(session, error = %e, "malformed frame");
                out.push_back(Action::Send(error(ErrorCode::Malformed, None, None)));
                return;
            }
        };
        match frame {
            ClientFrame::Hello { .. } => out.push_back(Action::Send(error(ErrorCode::Malformed, None, None))),
            ClientFrame::Resume { docs } => {
                peer.resume = Some(Resume {
                    todo: docs.into(),
                    listed: HashSet::new(),
                    answers: Vec::new(),
                    size: 0,
                    resumed: BTreeSet::new(),
                });
                resume_next(peer, &settings, now, out);
            }
            ClientFrame::Push { doc, batch, update } => {
                if !peer.docs.contains(&doc) {
                    out.push_back(Action::Send(error(ErrorCode::NotSubscribed, Some(doc), Some(batch))));
                    return;
                }
                if peer.fenced.contains(&doc) {
                    out.push_back(Action::Send(error(ErrorCode::RateLimited, Some(doc), Some(batch))));
                    return;
                }
                // Checked at every push: the token may have expired since the hello.
                if let Err(code) = peer.may_write(&doc, now) {
                    out.push_back(Action::Send(error(code, Some(doc), Some(batch))));
                    return;
                }
                let origin = Some(Origin {
                    client_id: peer.client_id,
                    batch,
                });
                out.push_back(Action::Request(Request::Push {
                    doc,
                    origin,
                    update,
                    skip_redundant: false,
                    tag: batch,
                }));
            }
            ClientFrame::Unsubscribe { doc } => {
                if peer.docs.remove(&doc) {
                    out.push_back(Action::Request(Request::Leave { doc }));
                }
            }
            ClientFrame::Presence { doc, state } => {
                if !peer.docs.contains(&doc) {
                    out.push_back(Action::Send(error(ErrorCode::NotSubscribed, Some(doc), None)));
                    return;
                }
                // Presence lives in the room's awareness table, shared with Yjs clients: it
                // expires unless refreshed and is removed when this connection leaves.
                out.push_back(Action::Request(Request::Presence { doc, state }));
            }
            ClientFrame::Typing { doc, typing } => {
                if !peer.docs.contains(&doc) {
                    out.push_back(Action::Send(error(ErrorCode::NotSubscribed, Some(doc), None)));
                    return;
                }
                let event = RoomEvent::Typing {
                    doc: doc.clone(),
                    peer: session,
                    user: peer.grant.user.clone(),
                    typing,
                };
                out.push_back(Action::Request(Request::Relay { doc, event }));
            }
            ClientFrame::Ping { nonce } => out.push_back(Action::Send(ServerFrame::Pong { nonce }.encode())),
            ClientFrame::Reauth { token } => {
                if let Err(code) = reauth(peer, &settings, &token, now, out) {
                    tracing::info!(session, ?code, "reauth refused");
                    self.refuse(code, CLOSE_UNAUTHORIZED, out);
                }
            }
            ClientFrame::Inbox { since } => {
                if peer.grant.is_expired_at(now.unix) {
                    out.push_back(Action::Send(error(ErrorCode::TokenExpired, None, None)));
                    return;
                }
                peer.inbox
                    .get_or_insert_with(InboxFollow::default)
                    .asked(since, now.at, out);
            }
            ClientFrame::Members { room } => {
                if peer.grant.is_expired_at(now.unix) {
                    out.push_back(Action::Send(error(ErrorCode::TokenExpired, Some(room), None)));
                } else if peer.grant.access(&room).is_none() {
                    out.push_back(Action::Send(error(ErrorCode::Forbidden, Some(room), None)));
                } else {
                    out.push_back(Action::Request(Request::Members { room }));
                }
            }
            ClientFrame::Pong { .. } => {}
        }
    }
}

/// Sends an inbox read from the store: only the rooms the token covers, in pieces of at most
/// about [`INBOX_PIECE_BYTES`]; nothing for a change the peer did not ask about that holds
/// no room it may see. Then answers a request that came meanwhile, or reads again if the
/// inbox changed meanwhile.
fn inbox_answered(peer: &mut Peer, inbox: driftsync_engine::store::Inbox, now: Instant, out: &mut Actions) {
    let Some(follow) = peer.inbox.as_mut() else { return };
    let since = follow.reading.take().unwrap_or(0);
    let asked = std::mem::take(&mut follow.asked);
    if since > inbox.version {
        // Asked from a version this store never reached (restored from a backup, say): the
        // whole inbox instead, or the device would wait for changes that never come.
        follow.start_read(0, true, now, out);
        return;
    }
    follow.version = inbox.version;
    let version = follow.version;
    let mut rooms: Vec<driftsync_protocol::InboxRoom> = Vec::new();
    for room in inbox.rooms {
        let Ok(id) = DocId::new(room.room) else { continue };
        if peer.grant.access(&id).is_none() {
            continue;
        }
        rooms.push(driftsync_protocol::InboxRoom {
            room: id,
            joined: room.joined,
            at_ms: room.at_ms,
            last: room.last.map(|last| driftsync_protocol::InboxMessage {
                id: last.id,
                sort: last.sort,
                author: last.author,
                kind: last.kind,
                text: last.text,
                deleted: last.deleted,
                at_ms: last.at_ms,
            }),
            unread: room.unread,
            read_sort: room.read_sort,
        });
    }
    if asked || !rooms.is_empty() {
        let mut piece: Vec<driftsync_protocol::InboxRoom> = Vec::new();
        let mut size = 0;
        let mut rooms = rooms.into_iter().peekable();
        loop {
            let next = rooms.next();
            let last = rooms.peek().is_none();
            if let Some(room) = next {
                size += 64
                    + room.room.as_str().len()
                    + room.read_sort.len()
                    + room.last.as_ref().map_or(0, |m| {
                        m.id.len() + m.sort.len() + m.author.len() + m.text.len() + m.kind.len()
                    });
                piece.push(room);
            }
            if last || size >= INBOX_PIECE_BYTES {
                out.push_back(Action::Answer {
                    bytes: ServerFrame::Inbox {
                        version,
                        rooms: std::mem::take(&mut piece),
                        more: !last,
                    }
                    .encode(),
                    charge: true,
                });
                size = 0;
            }
            if last {
                break;
            }
        }
    }
    if let Some(follow) = peer.inbox.as_mut() {
        follow.next(now, out);
    }
}

/// Replaces the peer's grant with `token`'s, which must name the same user. Documents the new
/// grant does not cover are unsubscribed, each with a `Forbidden` error.
fn reauth(peer: &mut Peer, settings: &Settings, token: &str, now: Now, out: &mut Actions) -> Result<(), ErrorCode> {
    let grant = settings.auth.verify_at(token, now.unix)?;
    if grant.user != peer.grant.user {
        return Err(ErrorCode::Unauthorized);
    }
    peer.grant = grant;
    peer.expired = false;
    peer.expiry = expiry_deadline(&peer.grant, now);
    let lost: Vec<DocId> = peer
        .docs
        .iter()
        .filter(|doc| peer.grant.access(doc).is_none())
        .cloned()
        .collect();
    for doc in lost {
        peer.docs.remove(&doc);
        out.push_back(Action::Request(Request::Leave { doc: doc.clone() }));
        out.push_back(Action::Send(error(ErrorCode::Forbidden, Some(doc), None)));
    }
    Ok(())
}

/// Goes on with the resume in progress: refusals of single documents are answered (once the
/// queue has room) and skipped, until a document needs its room — then that request is made
/// and the reply continues the resume ([`resume_answered`]). Once every document is done, the
/// last `Resumed` frame goes out, then the presence of the resumed documents.
///
/// Updates to a document may be queued before the `Resumed` frame that covers it; clients apply
/// them at once but advance their stored cursor only once the document's `Resumed` arrived.
fn resume_next(peer: &mut Peer, settings: &Settings, now: Now, out: &mut Actions) {
    let Some(resume) = peer.resume.as_mut() else { return };
    // Refusals are answers too: paced by the peer's reading, so that a long list of refusals
    // never overflows the queue; not charged (they cost nothing to build).
    let refuse = |out: &mut Actions, code, doc| {
        out.push_back(Action::Answer {
            bytes: error(code, Some(doc), None),
            charge: false,
        });
    };
    while let Some(ResumeDoc {
        doc,
        cursor,
        state_vector,
    }) = resume.todo.pop_front()
    {
        // A document the token does not cover is refused alone; the others proceed.
        if peer.grant.is_expired_at(now.unix) {
            refuse(out, ErrorCode::TokenExpired, doc);
            continue;
        }
        if peer.grant.access(&doc).is_none() {
            refuse(out, ErrorCode::Forbidden, doc);
            continue;
        }
        // Listed twice in one resume: answering it twice would only cost the server.
        if !resume.listed.insert(doc.clone()) {
            refuse(out, ErrorCode::Malformed, doc);
            continue;
        }
        let opening = !peer.docs.contains(&doc);
        if opening && peer.docs.len() >= settings.max_docs_per_connection {
            refuse(out, ErrorCode::TooManyDocuments, doc);
            continue;
        }
        // The client resumes it: what it pushes next is planned from its whole outbox.
        peer.fenced.remove(&doc);
        out.push_back(Action::Request(Request::Resume {
            doc,
            cursor,
            state_vector,
            opening,
        }));
        return;
    }
    let Some(resume) = peer.resume.take() else { return };
    out.push_back(Action::Answer {
        bytes: ServerFrame::Resumed { docs: resume.answers }.encode(),
        charge: true,
    });
    // Then who is there: the current presence states of the resumed documents.
    for doc in resume.resumed {
        out.push_back(Action::Request(Request::SendPresence { doc }));
    }
}

/// One document of the resume in progress was answered by its room (or refused).
fn resume_answered(
    peer: &mut Peer,
    settings: &Settings,
    doc: DocId,
    result: Result<driftsync_engine::sync::ResumeAnswer, ErrorCode>,
    now: Now,
    out: &mut Actions,
) {
    match result {
        Err(code) => out.push_back(Action::Answer {
            bytes: error(code, Some(doc), None),
            charge: false,
        }),
        Ok(answer) => {
            peer.docs.insert(doc.clone());
            let Some(resume) = peer.resume.as_mut() else { return };
            resume.resumed.insert(doc.clone());
            let mut entry = DocResumed {
                doc,
                cursor: answer.cursor,
                update: answer.update,
                state_vector: answer.state_vector,
            };
            // An answer too large for one frame goes ahead in pieces (`ResumePart`), each once
            // the queue has room; the entry then carries an empty update. (Only then: a client
            // from before `ResumePart` still gets every answer that fits a frame whole.)
            let piece = settings.max_frame_size / 2;
            let whole_fits = settings.max_frame_size.saturating_sub(RESUMED_OVERHEAD);
            if let Some(update) = entry.update.as_mut().filter(|update| update.len() > whole_fits) {
                let whole = std::mem::take(update);
                for bytes in whole.chunks(piece.max(1)) {
                    let frame = ServerFrame::ResumePart {
                        doc: entry.doc.clone(),
                        bytes: bytes.to_vec(),
                    }
                    .encode();
                    out.push_back(Action::Answer {
                        bytes: frame,
                        charge: true,
                    });
                }
            }
            let entry_size = entry.update.as_ref().map_or(0, Vec::len)
                + entry.state_vector.as_ref().map_or(0, Vec::len)
                + entry.doc.as_str().len()
                + 32;
            if resume.size + entry_size > settings.max_frame_size / 2 && !resume.answers.is_empty() {
                // What the answer costs is charged to the asker's rate limit.
                out.push_back(Action::Answer {
                    bytes: ServerFrame::Resumed {
                        docs: std::mem::take(&mut resume.answers),
                    }
                    .encode(),
                    charge: true,
                });
                resume.size = 0;
            }
            resume.size += entry_size;
            resume.answers.push(entry);
        }
    }
    resume_next(peer, settings, now, out);
}

impl Handler for NativeHandler {
    const CODEC: Codec = Codec { slot: 0, encode };

    fn start(&mut self, now: Now, _out: &mut Actions) {
        self.phase = Phase::Hello {
            deadline: now.at + self.settings.hello_timeout,
        };
    }

    fn message(&mut self, bytes: Vec<u8>, now: Now, out: &mut Actions) {
        match self.phase {
            Phase::Hello { .. } => self.hello(&bytes, now, out),
            Phase::Open(_) => self.frame(&bytes, now, out),
            // The hello's client id is being bound: the client waits for the welcome.
            Phase::Claiming { .. } => out.push_back(Action::Send(error(ErrorCode::Malformed, None, None))),
            Phase::Closed => {}
        }
    }

    fn reply(&mut self, reply: Reply, now: Now, out: &mut Actions) {
        let session = self.session;
        match reply {
            Reply::Claimed(claimed) => {
                let Phase::Claiming { grant, client_id } = std::mem::replace(&mut self.phase, Phase::Closed) else {
                    return;
                };
                match claimed {
                    Ok(Ownership::Mine) => self.welcome(grant, client_id, now, out),
                    Ok(Ownership::Taken) => {
                        tracing::info!(session, client_id, user = %grant.user, "hello refused: the client id is another user's");
                        self.refuse(ErrorCode::ClientIdTaken, CLOSE_UNAUTHORIZED, out);
                    }
                    Err(()) => self.refuse(ErrorCode::StoreUnavailable, CLOSE_RESYNC, out),
                }
            }
            Reply::Resumed { doc, result } => {
                let settings = std::sync::Arc::clone(&self.settings);
                if let Phase::Open(peer) = &mut self.phase {
                    resume_answered(peer, &settings, doc, result, now, out);
                }
            }
            Reply::Pushed { doc, tag, result } => match result {
                // The room queued the `Ack` itself, in order with its broadcasts.
                Ok(_) => {}
                Err(refused) => {
                    out.push_back(Action::Send(error(refused.code, Some(doc), Some(tag))));
                    // A refusal that made the room reload its document: the sender pays.
                    if refused.reload_cost > 0 {
                        out.push_back(Action::ChargeReload(refused.reload_cost));
                    }
                }
            },
            Reply::Presence { doc, result } => {
                if let Err(refused) = result {
                    out.push_back(Action::Send(error(refused.code, Some(doc), None)));
                }
            }
            Reply::Inbox(result) => {
                if let Phase::Open(peer) = &mut self.phase {
                    match result {
                        Ok(inbox) => inbox_answered(peer, inbox, now.at, out),
                        Err(code) => {
                            if let Some(follow) = peer.inbox.as_mut() {
                                // The peer asks again (or the next change reads again).
                                follow.reading = None;
                                follow.asked = false;
                                follow.again = false;
                                follow.requested = None;
                            }
                            out.push_back(Action::Send(error(code, None, None)));
                        }
                    }
                }
            }
            Reply::Members { room, result } => match result {
                Ok(members) => out.push_back(Action::Answer {
                    bytes: ServerFrame::Members { room, members }.encode(),
                    charge: true,
                }),
                Err(code) => out.push_back(Action::Send(error(code, Some(room), None))),
            },
            Reply::Joined(_) | Reply::Diff(_) | Reply::AwarenessSnapshot(_) | Reply::Done => {}
        }
    }

    fn heartbeat(&mut self, out: &mut Actions) {
        if let Phase::Open(peer) = &mut self.phase {
            peer.nonce += 1;
            out.push_back(Action::Send(ServerFrame::Ping { nonce: peer.nonce }.encode()));
        }
    }

    fn rate_limited(&mut self, bytes: Vec<u8>, out: &mut Actions) {
        // Refused, not silently dropped. A refused push is named (document and batch), so that
        // the client resumes the document and pushes again from its outbox; and the
        // connection's later pushes of that document are refused until then, since an `Ack`
        // covers every older batch of the document (the one refused here would be lost).
        if let (Phase::Open(peer), Ok(ClientFrame::Push { doc, batch, .. })) = (
            &mut self.phase,
            ClientFrame::decode(&bytes, self.settings.max_frame_size),
        ) {
            out.push_back(Action::Send(error(
                ErrorCode::RateLimited,
                Some(doc.clone()),
                Some(batch),
            )));
            // Only documents the connection follows: the set stays bounded by those, whatever
            // document ids a flood names.
            if peer.docs.contains(&doc) {
                peer.fenced.insert(doc);
            }
            return;
        }
        out.push_back(Action::Send(error(ErrorCode::RateLimited, None, None)));
    }

    fn deadline(&self) -> Option<Instant> {
        match &self.phase {
            Phase::Hello { deadline } => Some(*deadline),
            Phase::Open(peer) => match (peer.expiry, peer.inbox.as_ref().and_then(|f| f.due)) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            },
            Phase::Claiming { .. } | Phase::Closed => None,
        }
    }

    fn timer(&mut self, now: Now, out: &mut Actions) {
        let session = self.session;
        let grace = self.settings.token_grace;
        if let Phase::Open(peer) = &mut self.phase {
            if let Some(follow) = peer.inbox.as_mut().filter(|f| f.due.is_some_and(|due| due <= now.at)) {
                // A paced inbox read (the token's expiry, if also due, fires next).
                follow.due = None;
                follow.next(now.at, out);
                return;
            }
            if !peer.expiry.is_some_and(|expiry| expiry <= now.at) {
                return;
            }
        }
        match &mut self.phase {
            Phase::Hello { .. } => {
                tracing::info!(session, "no hello in time: closing");
                out.push_back(Action::Close(CLOSE_PROTOCOL_ERROR));
                self.phase = Phase::Closed;
            }
            Phase::Open(peer) if peer.expired => {
                tracing::info!(session, "token expired and not renewed: closing");
                out.push_back(Action::Close(CLOSE_UNAUTHORIZED));
                self.phase = Phase::Closed;
            }
            Phase::Open(peer) => {
                // Access ends with the token: nothing more is delivered (every document is
                // left), and the client gets a short grace to `Reauth` (then resume) before
                // the connection closes.
                tracing::info!(session, "token expired: unsubscribing, waiting for a reauth");
                peer.expired = true;
                peer.expiry = Some(now.at + grace);
                for doc in std::mem::take(&mut peer.docs) {
                    out.push_back(Action::Request(Request::Leave { doc }));
                }
                out.push_back(Action::Send(error(ErrorCode::TokenExpired, None, None)));
            }
            Phase::Claiming { .. } | Phase::Closed => {}
        }
    }

    fn identity(&self) -> Option<&str> {
        match &self.phase {
            Phase::Open(peer) => peer.grant.identity(),
            Phase::Claiming { grant, .. } => grant.identity(),
            Phase::Hello { .. } | Phase::Closed => None,
        }
    }

    fn user(&self) -> &str {
        match &self.phase {
            Phase::Open(peer) => &peer.grant.user,
            Phase::Claiming { grant, .. } => &grant.user,
            Phase::Hello { .. } | Phase::Closed => "",
        }
    }

    fn subscriptions(&self) -> Vec<DocId> {
        match &self.phase {
            Phase::Open(peer) => peer.docs.iter().cloned().collect(),
            _ => Vec::new(),
        }
    }

    fn inbox_changed(&mut self, now: Now, out: &mut Actions) {
        let Phase::Open(peer) = &mut self.phase else { return };
        if let Some(follow) = peer.inbox.as_mut() {
            follow.changed(now.at, out);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;

    fn settings() -> Arc<Settings> {
        Arc::new(Settings::of(&crate::config::Config::default()))
    }

    fn now() -> Now {
        Now::read()
    }

    fn sent(out: &mut Actions) -> Vec<ServerFrame> {
        out.drain(..)
            .filter_map(|action| match action {
                Action::Send(bytes) | Action::Answer { bytes, .. } => ServerFrame::decode(&bytes, usize::MAX).ok(),
                _ => None,
            })
            .collect()
    }

    fn hello(handler: &mut NativeHandler, out: &mut Actions) {
        handler.start(now(), out);
        let frame = ClientFrame::Hello {
            version: PROTOCOL_VERSION,
            token: String::new(),
            client_id: 42,
        };
        handler.message(frame.encode(), now(), out);
    }

    #[test]
    fn an_open_server_welcomes_a_hello_without_asking_the_store() {
        let mut handler = NativeHandler::new(settings(), 3);
        let mut out = Actions::new();
        hello(&mut handler, &mut out);
        assert!(matches!(out.front(), Some(Action::FrameLimit(_))));
        assert!(matches!(
            sent(&mut out).as_slice(),
            [ServerFrame::Welcome { session: 3, .. }]
        ));
        assert!(handler.deadline().is_none(), "no hello deadline once open");
    }

    #[test]
    fn a_resume_goes_document_by_document_and_refuses_duplicates() {
        let mut handler = NativeHandler::new(settings(), 3);
        let mut out = Actions::new();
        hello(&mut handler, &mut out);
        out.clear();
        let doc = |id: &str| ResumeDoc {
            doc: DocId::new(id).unwrap(),
            cursor: 0,
            state_vector: vec![0],
        };
        let resume = ClientFrame::Resume {
            docs: vec![doc("a"), doc("a"), doc("b")],
        };
        handler.message(resume.encode(), now(), &mut out);
        // One request at a time: the first document's.
        assert!(matches!(
            out.pop_front(),
            Some(Action::Request(Request::Resume { opening: true, .. }))
        ));
        assert!(out.is_empty());
        let answer = driftsync_engine::sync::ResumeAnswer {
            cursor: 4,
            update: None,
            state_vector: None,
            from_log: true,
        };
        handler.reply(
            Reply::Resumed {
                doc: DocId::new("a").unwrap(),
                result: Ok(answer),
            },
            now(),
            &mut out,
        );
        // The duplicate is refused, then the next document is asked for.
        let refused = out.pop_front();
        assert!(matches!(refused, Some(Action::Answer { charge: false, .. })));
        assert!(matches!(out.pop_front(), Some(Action::Request(Request::Resume { .. }))));
        handler.reply(
            Reply::Resumed {
                doc: DocId::new("b").unwrap(),
                result: Err(ErrorCode::LoadFailed),
            },
            now(),
            &mut out,
        );
        let frames: Vec<ServerFrame> = out
            .iter()
            .filter_map(|action| match action {
                Action::Send(bytes) | Action::Answer { bytes, .. } => ServerFrame::decode(bytes, usize::MAX).ok(),
                _ => None,
            })
            .collect();
        assert!(matches!(
            &frames[0],
            ServerFrame::Error {
                code: ErrorCode::LoadFailed,
                ..
            }
        ));
        match &frames[1] {
            ServerFrame::Resumed { docs } => assert_eq!(docs.len(), 1),
            other => panic!("expected the resumed frame, got {other:?}"),
        }
        assert!(out
            .iter()
            .any(|a| matches!(a, Action::Request(Request::SendPresence { .. }))));
        assert_eq!(handler.subscriptions(), vec![DocId::new("a").unwrap()]);
    }

    #[test]
    fn pushes_are_acknowledged_with_their_batch_and_refusals_charged() {
        let mut handler = NativeHandler::new(settings(), 3);
        let mut out = Actions::new();
        hello(&mut handler, &mut out);
        out.clear();
        let doc = DocId::new("a").unwrap();
        // Not subscribed: refused without asking the room.
        let push = ClientFrame::Push {
            doc: doc.clone(),
            batch: 7,
            update: vec![0, 0],
        };
        handler.message(push.encode(), now(), &mut out);
        assert!(matches!(
            sent(&mut out).as_slice(),
            [ServerFrame::Error {
                code: ErrorCode::NotSubscribed,
                batch: Some(7),
                ..
            }]
        ));
        handler.reply(
            Reply::Pushed {
                doc: doc.clone(),
                tag: 7,
                result: Err(crate::event::Refused {
                    code: ErrorCode::SchemaViolation,
                    reload_cost: 100,
                }),
            },
            now(),
            &mut out,
        );
        assert!(matches!(out.back(), Some(Action::ChargeReload(100))));
    }

    #[test]
    fn a_rate_limited_push_is_named_and_fences_its_document_until_a_resume() {
        let mut handler = NativeHandler::new(settings(), 3);
        let mut out = Actions::new();
        hello(&mut handler, &mut out);
        let doc = DocId::new("a").unwrap();
        let resume = ClientFrame::Resume {
            docs: vec![ResumeDoc {
                doc: doc.clone(),
                cursor: 0,
                state_vector: vec![0],
            }],
        };
        handler.message(resume.encode(), now(), &mut out);
        let answer = driftsync_engine::sync::ResumeAnswer {
            cursor: 0,
            update: None,
            state_vector: None,
            from_log: true,
        };
        handler.reply(
            Reply::Resumed {
                doc: doc.clone(),
                result: Ok(answer),
            },
            now(),
            &mut out,
        );
        out.clear();
        let push = |batch| ClientFrame::Push {
            doc: doc.clone(),
            batch,
            update: vec![0, 0],
        };
        handler.rate_limited(push(7).encode(), &mut out);
        assert!(matches!(
            sent(&mut out).as_slice(),
            [ServerFrame::Error {
                code: ErrorCode::RateLimited,
                batch: Some(7),
                ..
            }]
        ));
        // Batch 8 was sent before the client heard of the refusal: storing it would let its
        // `Ack` cover batch 7, which was never stored.
        handler.message(push(8).encode(), now(), &mut out);
        assert!(matches!(
            sent(&mut out).as_slice(),
            [ServerFrame::Error {
                code: ErrorCode::RateLimited,
                batch: Some(8),
                ..
            }]
        ));
        // A flood naming documents the connection does not follow fences nothing more.
        for batch in 0..100 {
            let other = ClientFrame::Push {
                doc: DocId::new(format!("other/{batch}")).unwrap(),
                batch,
                update: vec![0, 0],
            };
            handler.rate_limited(other.encode(), &mut out);
        }
        out.clear();
        match &handler.phase {
            Phase::Open(peer) => assert_eq!(peer.fenced.len(), 1),
            _ => panic!("the connection is open"),
        }
        // Once the client resumes the document, its pushes go through again.
        handler.message(resume.encode(), now(), &mut out);
        out.clear();
        handler.message(push(9).encode(), now(), &mut out);
        assert!(matches!(
            out.pop_front(),
            Some(Action::Request(Request::Push { tag: 9, .. }))
        ));
    }

    #[test]
    fn a_peer_without_a_hello_in_time_is_closed() {
        let mut handler = NativeHandler::new(settings(), 3);
        let mut out = Actions::new();
        handler.start(now(), &mut out);
        assert!(handler.deadline().is_some());
        handler.timer(now(), &mut out);
        assert!(matches!(out.pop_front(), Some(Action::Close(CLOSE_PROTOCOL_ERROR))));
    }
}
