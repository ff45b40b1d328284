//! The Hocuspocus endpoint, `/hocuspocus`: the framing `@hocuspocus/provider` (Tiptap's
//! collaboration extensions) speaks, on the same rooms as the native and y-websocket endpoints,
//! so a Tiptap app switches servers without changing code. The wire format is in
//! [`driftsync_protocol::hocuspocus`]; what the provider expects, and why this does what it
//! does:
//!
//! * One socket carries many documents, each behind its *address*: the document name, or
//!   `name + "\0" + sessionId` for a provider with `sessionAwareness`. Every frame for an address
//!   is answered behind that exact address; a document followed under several addresses gets
//!   each room event once per address (the connection's writer re-addresses them).
//! * Auth is per address: each provider sends its token first (then its SyncStep1 and
//!   awareness without waiting). Frames of an address whose token has not come are held (a
//!   bounded number) until it does. A token is checked like the other endpoints' (signature,
//!   expiry, the document's pattern, read-only scope); a refusal is `PermissionDenied` for that
//!   address only, the socket stays. One socket serves one user: a token of another user is
//!   refused (authorship and the chat rules need one identity per connection).
//! * SyncStep1 is answered with the server's SyncStep1, then SyncStep2 (what the provider lacks).
//! * Every SyncStep2 or Update gets exactly one `SyncStatus` — the provider counts its unsynced
//!   changes with them — sent **after the durable commit**: when a Hocuspocus provider says
//!   "synced" here, the change is stored (Hocuspocus itself answers before its debounced store).
//!   `SyncStatus(0)` for a refused write (read-only, chat rules, …); a refusal a fresh sync
//!   repairs (the store failed) closes the socket, and the provider reconnects and syncs again.
//! * Awareness goes into the room's presence table (shared with native and Yjs connections) and
//!   is echoed to the sender, as Hocuspocus does; every heartbeat also sends an empty awareness
//!   message, because a provider drops a socket that brought no message for 30 s and a 3.x
//!   provider cannot read a bare Ping (so none is sent; bare Pings received are answered).
//! * Stateless messages go to the document's other Hocuspocus connections.
//! * `Close` from a provider leaves that document (the socket stays). At its token's expiry a
//!   document is asked for a fresh token (an empty `Token` message); without one within the
//!   grace, it is refused and left.

use std::collections::{BTreeMap, VecDeque};
use std::time::Duration;

use driftsync_engine::doc::{decode_state_vector, is_empty_update};
use driftsync_protocol::hocuspocus::{
    encode_message, split_address, HpFrame, HpMessage, PONG, SCOPE_READ_ONLY, SCOPE_READ_WRITE,
};
use driftsync_protocol::yjs::AwarenessEntry;
use driftsync_protocol::{DocId, ErrorCode, CLOSE_RESYNC};
use tokio::time::Instant;

use crate::auth::{Access, Auth, Grant};
use crate::event::{Codec, Refused, RoomEvent};
use crate::handler::{Action, Actions, Handler, Now, Reply, Request};

/// Most frames held for addresses whose token has not come.
const MAX_WAITING_FRAMES: usize = 64;

/// Most bytes of those frames.
const MAX_WAITING_BYTES: usize = 1024 * 1024;

/// Most addresses one socket follows one document under (`sessionAwareness` providers of the
/// same document on one socket): each room event is sent once per address.
const MAX_ADDRESSES_PER_DOC: usize = 8;

/// Encodes a room event as a Hocuspocus frame behind the document's name (re-addressed by the
/// writer for `sessionAwareness` providers).
fn encode(event: &RoomEvent) -> Option<Vec<u8>> {
    let message = match event {
        RoomEvent::Update { update, .. } => HpMessage::Update(update.clone()),
        RoomEvent::Presence { peer, clock, state, .. } => HpMessage::Awareness(vec![AwarenessEntry {
            client_id: *peer,
            clock: *clock,
            state: state.clone(),
        }]),
        RoomEvent::Stateless { payload, .. } => HpMessage::Stateless(payload.clone()),
        // No typing indicator (the room mirrors it into awareness), and acknowledgements are SyncStatus
        // messages sent by the handler.
        RoomEvent::Typing { .. } | RoomEvent::Ack { .. } => return None,
    };
    Some(encode_message(event.doc().as_str(), &message))
}

/// One document of the connection, once its first address is authenticated and joined.
struct Followed {
    /// The addresses it is followed under, in the order they were authenticated.
    addresses: Vec<String>,
    access: Access,
    grant: Grant,
    /// The server's state vector when joined (the SyncStep1 the handler answers with).
    state_vector: Vec<u8>,
    /// When the token expires (tokio time).
    expires: Option<Instant>,
    /// When the provider was asked for a fresh token, if it was.
    asked_at: Option<Instant>,
}

/// A join in flight: its reply comes before the next message is read.
struct Joining {
    doc: DocId,
    address: String,
    access: Access,
    grant: Grant,
}

/// One Hocuspocus connection's protocol state.
pub(crate) struct HocuspocusHandler {
    auth: Auth,
    max_frame_size: usize,
    max_docs: usize,
    token_grace: Duration,
    session: u64,
    docs: BTreeMap<DocId, Followed>,
    joining: Option<Joining>,
    /// Frames of addresses whose token has not come, in arrival order, and their bytes.
    waiting: VecDeque<(String, HpMessage, usize)>,
    waiting_bytes: usize,
    /// The address to answer each push in flight with `SyncStatus`, by tag.
    pushes: BTreeMap<u64, String>,
    next_tag: u64,
    /// The addresses the next `Diff` and `AwarenessSnapshot` replies go to, in order.
    answers: VecDeque<String>,
    /// The user of the first accepted token, and its grant's identity.
    user: Option<(String, Option<String>)>,
}

impl HocuspocusHandler {
    pub(crate) fn new(
        auth: Auth,
        max_frame_size: usize,
        max_docs: usize,
        token_grace: Duration,
        session: u64,
    ) -> HocuspocusHandler {
        HocuspocusHandler {
            auth,
            max_frame_size,
            max_docs,
            token_grace,
            session,
            docs: BTreeMap::new(),
            joining: None,
            waiting: VecDeque::new(),
            waiting_bytes: 0,
            pushes: BTreeMap::new(),
            next_tag: 1,
            answers: VecDeque::new(),
            user: None,
        }
    }

    fn send(out: &mut Actions, address: &str, message: &HpMessage) {
        out.push_back(Action::Send(encode_message(address, message)));
    }

    fn deny(out: &mut Actions, address: &str, reason: &str) {
        Self::send(
            out,
            address,
            &HpMessage::PermissionDenied {
                reason: reason.to_owned(),
            },
        );
    }

    /// Checks a token for `address`; joins the document or adds the address.
    fn authenticate(&mut self, address: String, doc: DocId, token: &str, now: Now, out: &mut Actions) {
        let session = self.session;
        let checked = self.auth.verify_at(token, now.unix).and_then(|grant| {
            let access = grant.access(&doc).ok_or(ErrorCode::Forbidden)?;
            match &self.user {
                Some((user, _)) if *user != grant.user => Err(ErrorCode::Forbidden),
                _ => Ok((access, grant)),
            }
        });
        let (access, grant) = match checked {
            Ok(checked) => checked,
            Err(code) => {
                tracing::info!(session, doc = %doc, ?code, "Hocuspocus document refused");
                Self::deny(out, &address, &format!("{code:?}"));
                self.waiting.retain(|(a, _, _)| *a != address);
                self.recount_waiting();
                self.drop_address(&doc, &address, out);
                return;
            }
        };
        if self.user.is_none() {
            self.user = Some((grant.user.clone(), grant.identity().map(str::to_owned)));
        }
        let expires = grant.expires_at.map(|exp| {
            let left = (exp + 1).saturating_sub(now.unix);
            now.at + Duration::from_secs(left)
        });
        if let Some(followed) = self.docs.get_mut(&doc) {
            // A fresh token (asked for, or a provider re-sending it), or a second address.
            followed.access = access;
            followed.grant = grant;
            followed.expires = expires;
            followed.asked_at = None;
            if !followed.addresses.contains(&address) {
                if followed.addresses.len() >= MAX_ADDRESSES_PER_DOC {
                    tracing::info!(session, doc = %doc, "Hocuspocus address refused: too many for one document");
                    Self::deny(out, &address, "TooManyAddresses");
                    return;
                }
                followed.addresses.push(address.clone());
                let addresses = followed.addresses.clone();
                self.set_addresses(&doc, addresses, out);
            }
            Self::send(out, &address, &authenticated(access));
            self.answers.push_back(address.clone());
            out.push_back(Action::Request(Request::AwarenessSnapshot { doc: doc.clone() }));
            self.drain_waiting(&address, now, out);
            return;
        }
        if self.docs.len() >= self.max_docs {
            Self::deny(out, &address, "TooManyDocuments");
            return;
        }
        self.joining = Some(Joining {
            doc: doc.clone(),
            address,
            access,
            grant,
        });
        out.push_back(Action::Request(Request::Join { doc }));
    }

    /// Tells the driver under which addresses `doc`'s events go out.
    fn set_addresses(&self, doc: &DocId, addresses: Vec<String>, out: &mut Actions) {
        let plain = addresses.len() == 1 && addresses[0] == doc.as_str();
        out.push_back(Action::Addresses {
            doc: doc.clone(),
            addresses: if plain { Vec::new() } else { addresses },
        });
    }

    /// Stops following `doc` under `address`; leaves the room when no address is left.
    fn drop_address(&mut self, doc: &DocId, address: &str, out: &mut Actions) {
        let Some(followed) = self.docs.get_mut(doc) else { return };
        followed.addresses.retain(|a| a != address);
        if followed.addresses.is_empty() {
            self.docs.remove(doc);
            out.push_back(Action::Addresses {
                doc: doc.clone(),
                addresses: Vec::new(),
            });
            out.push_back(Action::Request(Request::Leave { doc: doc.clone() }));
        } else {
            let addresses = followed.addresses.clone();
            self.set_addresses(doc, addresses, out);
        }
    }

    fn recount_waiting(&mut self) {
        self.waiting_bytes = self.waiting.iter().map(|(_, _, size)| size).sum();
    }

    /// Handles the frames held for `address`, now authenticated.
    fn drain_waiting(&mut self, address: &str, now: Now, out: &mut Actions) {
        let held: Vec<(String, HpMessage, usize)> =
            self.waiting.iter().filter(|(a, _, _)| a == address).cloned().collect();
        if held.is_empty() {
            return;
        }
        self.waiting.retain(|(a, _, _)| a != address);
        self.recount_waiting();
        for (address, message, _) in held {
            self.handle(address, message, now, out);
        }
    }

    /// A frame for an address.
    fn handle(&mut self, address: String, message: HpMessage, now: Now, out: &mut Actions) {
        let session = self.session;
        let (name, _) = split_address(&address);
        let Ok(doc) = DocId::new(name) else {
            tracing::info!(session, "Hocuspocus frame for an invalid document name");
            Self::deny(out, &address, "InvalidDocumentName");
            return;
        };
        if let HpMessage::Token { token, .. } = &message {
            let token = token.clone();
            self.authenticate(address, doc, &token, now, out);
            return;
        }
        let followed = self.docs.get(&doc).filter(|f| f.addresses.contains(&address));
        let Some(followed) = followed else {
            // Its token has not come yet (a provider sends it first; frames of another provider
            // may come between): held, within bounds.
            if matches!(message, HpMessage::Close(_)) {
                self.waiting.retain(|(a, _, _)| *a != address);
                self.recount_waiting();
                return;
            }
            let size = address.len() + message_size(&message);
            if self.waiting.len() >= MAX_WAITING_FRAMES || self.waiting_bytes + size > MAX_WAITING_BYTES {
                tracing::info!(session, doc = %doc, "Hocuspocus frame before its token dropped: too many held");
                return;
            }
            self.waiting_bytes += size;
            self.waiting.push_back((address, message, size));
            return;
        };
        let (access, expired) = (followed.access, followed.grant.is_expired_at(now.unix));
        let state_vector = followed.state_vector.clone();
        match message {
            HpMessage::SyncStep1(sv) => match decode_state_vector(&sv) {
                Ok(state_vector_in) => {
                    Self::send(out, &address, &HpMessage::SyncStep1(state_vector));
                    self.answers.push_back(address);
                    out.push_back(Action::Request(Request::Diff {
                        doc,
                        state_vector: state_vector_in,
                    }));
                }
                Err(e) => tracing::info!(session, doc = %doc, error = %e, "bad state vector in a SyncStep1"),
            },
            HpMessage::SyncStep2(update) | HpMessage::Update(update) if access != Access::Write || expired => {
                // Nothing is stored; a read-only provider's handshake Step2 (nothing new) is
                // still "applied", as Hocuspocus answers it, or it would never count as synced.
                let applied = access != Access::Write && is_empty_update(&update);
                Self::send(out, &address, &HpMessage::SyncStatus(applied));
                if expired {
                    Self::send(out, &address, &token_request());
                }
            }
            HpMessage::SyncStep2(update) if is_empty_update(&update) => {
                Self::send(out, &address, &HpMessage::SyncStatus(true));
            }
            HpMessage::Update(update) if is_empty_update(&update) => {
                Self::send(out, &address, &HpMessage::SyncStatus(true));
            }
            HpMessage::SyncStep2(update) => self.push(doc, address, update, true, out),
            HpMessage::Update(update) => self.push(doc, address, update, false, out),
            HpMessage::Awareness(entries) => out.push_back(Action::Request(Request::Awareness { doc, entries })),
            HpMessage::QueryAwareness => {
                self.answers.push_back(address);
                out.push_back(Action::Request(Request::AwarenessSnapshot { doc }));
            }
            HpMessage::Stateless(payload) => {
                // The other addresses of this socket for the document, then the other
                // connections.
                if let Some(followed) = self.docs.get(&doc) {
                    for other in followed.addresses.iter().filter(|a| **a != address) {
                        Self::send(out, other, &HpMessage::Stateless(payload.clone()));
                    }
                }
                let event = RoomEvent::Stateless {
                    doc: doc.clone(),
                    payload,
                };
                out.push_back(Action::Request(Request::Relay { doc, event }));
            }
            HpMessage::Close(_) => self.drop_address(&doc, &address, out),
            HpMessage::Token { .. } => {}
            HpMessage::PermissionDenied { .. } | HpMessage::Authenticated { .. } | HpMessage::SyncStatus(_) => {
                tracing::info!(session, "ignoring a server message from a Hocuspocus provider");
            }
        }
    }

    fn push(&mut self, doc: DocId, address: String, update: Vec<u8>, skip_redundant: bool, out: &mut Actions) {
        let tag = self.next_tag;
        self.next_tag += 1;
        self.pushes.insert(tag, address);
        out.push_back(Action::Request(Request::Push {
            doc,
            origin: None,
            update,
            skip_redundant,
            tag,
        }));
    }

    /// A refused write: `SyncStatus(0)` when resending cannot help; a close for a resync when a
    /// fresh sync repairs it.
    fn refused(&self, address: &str, refused: Refused, out: &mut Actions) {
        let session = self.session;
        if refused.reload_cost > 0 {
            out.push_back(Action::ChargeReload(refused.reload_cost));
        }
        match refused.code {
            code @ (ErrorCode::StoreUnavailable
            | ErrorCode::LoadFailed
            | ErrorCode::MissingDependencies
            | ErrorCode::TooManyPending
            | ErrorCode::Unavailable
            | ErrorCode::Internal) => {
                // The provider believes the server may get it yet; a new sync (its SyncStep2
                // against the server's state vector) is how it is repaired.
                tracing::warn!(session, address, ?code, "update not stored; closing for a resync");
                out.push_back(Action::Close(CLOSE_RESYNC));
            }
            code => {
                tracing::info!(session, address, ?code, "update from a Hocuspocus provider refused");
                Self::send(out, address, &HpMessage::SyncStatus(false));
            }
        }
    }
}

/// The bytes a held message keeps.
fn message_size(message: &HpMessage) -> usize {
    16 + match message {
        HpMessage::SyncStep1(b) | HpMessage::SyncStep2(b) | HpMessage::Update(b) => b.len(),
        HpMessage::Awareness(entries) => entries
            .iter()
            .map(|e| 24 + e.state.as_ref().map_or(0, String::len))
            .sum(),
        HpMessage::Token { token, version } => token.len() + version.as_ref().map_or(0, String::len),
        HpMessage::PermissionDenied { reason } => reason.len(),
        HpMessage::Authenticated { scope } => scope.len(),
        HpMessage::Stateless(payload) => payload.len(),
        HpMessage::Close(reason) => reason.as_ref().map_or(0, String::len),
        HpMessage::QueryAwareness | HpMessage::SyncStatus(_) => 0,
    }
}

fn authenticated(access: Access) -> HpMessage {
    HpMessage::Authenticated {
        scope: if access == Access::Write {
            SCOPE_READ_WRITE
        } else {
            SCOPE_READ_ONLY
        }
        .to_owned(),
    }
}

/// "Send your token again."
fn token_request() -> HpMessage {
    HpMessage::Token {
        token: String::new(),
        version: None,
    }
}

impl Handler for HocuspocusHandler {
    const CODEC: Codec = Codec { slot: 2, encode };

    fn start(&mut self, _now: Now, _out: &mut Actions) {}

    fn message(&mut self, bytes: Vec<u8>, now: Now, out: &mut Actions) {
        match HpFrame::decode(&bytes, self.max_frame_size) {
            Ok(HpFrame::Ping) => out.push_back(Action::Send(vec![PONG])),
            Ok(HpFrame::Pong) => {}
            Ok(HpFrame::Message { address, message }) => self.handle(address, message, now, out),
            // Hocuspocus ignores what it cannot read, and so do we.
            Err(e) => tracing::info!(session = self.session, error = %e, "malformed Hocuspocus frame"),
        }
    }

    fn reply(&mut self, reply: Reply, now: Now, out: &mut Actions) {
        match reply {
            Reply::Joined(Ok(joined)) => {
                let Some(Joining {
                    doc,
                    address,
                    access,
                    grant,
                }) = self.joining.take()
                else {
                    return;
                };
                let expires = grant.expires_at.map(|exp| {
                    let left = (exp + 1).saturating_sub(now.unix);
                    now.at + Duration::from_secs(left)
                });
                self.docs.insert(
                    doc.clone(),
                    Followed {
                        addresses: vec![address.clone()],
                        access,
                        grant,
                        state_vector: joined.state_vector,
                        expires,
                        asked_at: None,
                    },
                );
                self.set_addresses(&doc, vec![address.clone()], out);
                Self::send(out, &address, &authenticated(access));
                if !joined.awareness.is_empty() {
                    Self::send(out, &address, &HpMessage::Awareness(joined.awareness));
                }
                self.drain_waiting(&address, now, out);
            }
            Reply::Joined(Err(code)) => {
                if let Some(joining) = self.joining.take() {
                    tracing::info!(session = self.session, doc = %joining.doc, ?code, "Hocuspocus document not joined");
                    Self::deny(out, &joining.address, &format!("{code:?}"));
                    self.waiting.retain(|(a, _, _)| *a != joining.address);
                    self.recount_waiting();
                }
            }
            Reply::Diff(Ok(update)) => {
                if let Some(address) = self.answers.pop_front() {
                    out.push_back(Action::Answer {
                        bytes: encode_message(&address, &HpMessage::SyncStep2(update)),
                        charge: true,
                    });
                }
            }
            Reply::Diff(Err(_)) => {
                self.answers.pop_front();
                out.push_back(Action::Close(CLOSE_RESYNC));
            }
            Reply::AwarenessSnapshot(entries) => {
                let address = self.answers.pop_front();
                if let (Some(address), Some(entries)) = (address, entries) {
                    if !entries.is_empty() {
                        out.push_back(Action::Answer {
                            bytes: encode_message(&address, &HpMessage::Awareness(entries)),
                            charge: true,
                        });
                    }
                }
            }
            Reply::Pushed { tag, result, .. } => {
                let Some(address) = self.pushes.remove(&tag) else {
                    return;
                };
                match result {
                    Ok(_) => Self::send(out, &address, &HpMessage::SyncStatus(true)),
                    Err(refused) => self.refused(&address, refused, out),
                }
            }
            Reply::Claimed(_)
            | Reply::Resumed { .. }
            | Reply::Presence { .. }
            | Reply::Inbox(_)
            | Reply::Members { .. }
            | Reply::Done => {}
        }
    }

    /// An empty awareness message behind one followed address: a provider drops a socket that
    /// brought it no message for 30 s, and a 3.x provider cannot read a bare Ping. Also a
    /// WebSocket ping, for proxies and the driver's liveness check.
    fn heartbeat(&mut self, out: &mut Actions) {
        if let Some(address) = self.docs.values().find_map(|f| f.addresses.first()) {
            out.push_back(Action::Ping);
            Self::send(out, address, &HpMessage::Awareness(Vec::new()));
        }
    }

    /// No "slow down" message exists: close for a resync; the provider reconnects with its own
    /// backoff and syncs again. Nothing it sent is lost.
    fn rate_limited(&mut self, _bytes: Vec<u8>, out: &mut Actions) {
        tracing::info!(session = self.session, "rate limit exceeded: closing");
        out.push_back(Action::Close(CLOSE_RESYNC));
    }

    fn deadline(&self) -> Option<Instant> {
        self.docs
            .values()
            .filter_map(|f| match f.asked_at {
                Some(asked) => Some(asked + self.token_grace),
                None => f.expires,
            })
            .min()
    }

    /// Asks the providers of documents whose token expired for a fresh one; refuses and leaves
    /// those that did not send one within the grace.
    fn timer(&mut self, now: Now, out: &mut Actions) {
        let grace = self.token_grace;
        let mut gone = Vec::new();
        for (doc, followed) in &mut self.docs {
            match followed.asked_at {
                Some(asked) if asked + grace <= now.at => gone.push(doc.clone()),
                None if followed.expires.is_some_and(|at| at <= now.at) => {
                    followed.asked_at = Some(now.at);
                    for address in &followed.addresses {
                        Self::send(out, address, &token_request());
                    }
                }
                _ => {}
            }
        }
        for doc in gone {
            tracing::info!(session = self.session, doc = %doc, "token expired and not renewed: document closed");
            let addresses = self.docs.get(&doc).map(|f| f.addresses.clone()).unwrap_or_default();
            for address in &addresses {
                Self::deny(out, address, "TokenExpired");
            }
            for address in addresses {
                self.drop_address(&doc, &address, out);
            }
        }
    }

    fn identity(&self) -> Option<&str> {
        self.user.as_ref().and_then(|(_, identity)| identity.as_deref())
    }

    fn user(&self) -> &str {
        self.user.as_ref().map_or("", |(user, _)| user.as_str())
    }

    fn subscriptions(&self) -> Vec<DocId> {
        self.docs.keys().cloned().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::Joined;

    const SECRET: &str = "0123456789abcdef0123456789abcdef";

    fn open() -> HocuspocusHandler {
        HocuspocusHandler::new(Auth::open(), 1 << 20, 8, Duration::from_secs(10), 5)
    }

    fn frame(address: &str, message: HpMessage) -> Vec<u8> {
        encode_message(address, &message)
    }

    fn token(address: &str, token: &str) -> Vec<u8> {
        frame(
            address,
            HpMessage::Token {
                token: token.into(),
                version: Some("4.8.0".into()),
            },
        )
    }

    /// The frames sent, decoded, and the requests, in order.
    fn drain(out: &mut Actions) -> (Vec<HpFrame>, Vec<Request>) {
        let (mut frames, mut requests) = (Vec::new(), Vec::new());
        for action in out.drain(..) {
            match action {
                Action::Send(bytes) | Action::Answer { bytes, .. } => {
                    frames.push(HpFrame::decode(&bytes, 1 << 20).unwrap())
                }
                Action::Request(r) => requests.push(r),
                _ => {}
            }
        }
        (frames, requests)
    }

    fn joined() -> Reply {
        Reply::Joined(Ok(Joined {
            state_vector: vec![0],
            awareness: Vec::new(),
        }))
    }

    #[test]
    fn frames_before_the_token_wait_and_step1_gets_step1_then_step2() {
        let mut h = open();
        let mut out = Actions::new();
        let now = Now::read();
        // A second provider's Step1 arrives before its token: held.
        h.message(frame("b", HpMessage::SyncStep1(vec![0])), now, &mut out);
        assert!(out.is_empty());
        h.message(token("a", ""), now, &mut out);
        let (_, requests) = drain(&mut out);
        assert!(matches!(&requests[..], [Request::Join { doc }] if doc.as_str() == "a"));
        h.reply(joined(), now, &mut out);
        let (frames, _) = drain(&mut out);
        assert_eq!(
            frames,
            vec![HpFrame::message(
                "a",
                HpMessage::Authenticated {
                    scope: "read-write".into()
                }
            )]
        );
        h.message(token("b", ""), now, &mut out);
        drain(&mut out);
        h.reply(joined(), now, &mut out);
        let (frames, requests) = drain(&mut out);
        // Authenticated, then the held Step1 answered: Step1 now, Step2 once the diff comes.
        assert_eq!(
            frames,
            vec![
                HpFrame::message(
                    "b",
                    HpMessage::Authenticated {
                        scope: "read-write".into()
                    }
                ),
                HpFrame::message("b", HpMessage::SyncStep1(vec![0])),
            ]
        );
        assert!(matches!(&requests[..], [Request::Diff { doc, .. }] if doc.as_str() == "b"));
        h.reply(Reply::Diff(Ok(vec![0, 0])), now, &mut out);
        let (frames, _) = drain(&mut out);
        assert_eq!(frames, vec![HpFrame::message("b", HpMessage::SyncStep2(vec![0, 0]))]);
        assert_eq!(h.subscriptions().len(), 2);
    }

    #[test]
    fn each_write_gets_one_sync_status_after_its_commit() {
        let mut h = open();
        let mut out = Actions::new();
        let now = Now::read();
        h.message(token("a\0s1", ""), now, &mut out);
        drain(&mut out);
        h.reply(joined(), now, &mut out);
        // A session address: the driver is told to re-address the document's events.
        assert!(out
            .iter()
            .any(|a| matches!(a, Action::Addresses { addresses, .. } if addresses == &vec!["a\0s1".to_string()])));
        drain(&mut out);
        let update = vec![1, 1, 5, 0, 4, 1, 4, 116, 101, 120, 116, 1, 120, 0];
        h.message(frame("a\0s1", HpMessage::Update(update.clone())), now, &mut out);
        h.message(frame("a\0s1", HpMessage::Update(update)), now, &mut out);
        let (frames, requests) = drain(&mut out);
        assert!(frames.is_empty(), "nothing before the commits settle");
        let tags: Vec<u64> = requests
            .iter()
            .map(|r| match r {
                Request::Push { tag, .. } => *tag,
                other => panic!("{other:?}"),
            })
            .collect();
        h.reply(
            Reply::Pushed {
                doc: DocId::new("a").unwrap(),
                tag: tags[0],
                result: Ok(1),
            },
            now,
            &mut out,
        );
        h.reply(
            Reply::Pushed {
                doc: DocId::new("a").unwrap(),
                tag: tags[1],
                result: Err(Refused::new(ErrorCode::SchemaViolation)),
            },
            now,
            &mut out,
        );
        let (frames, _) = drain(&mut out);
        assert_eq!(
            frames,
            vec![
                HpFrame::message("a\0s1", HpMessage::SyncStatus(true)),
                HpFrame::message("a\0s1", HpMessage::SyncStatus(false)),
            ]
        );
        // An empty update is "applied" at once.
        h.message(frame("a\0s1", HpMessage::Update(vec![0, 0])), now, &mut out);
        let (frames, _) = drain(&mut out);
        assert_eq!(frames, vec![HpFrame::message("a\0s1", HpMessage::SyncStatus(true))]);
    }

    #[test]
    fn tokens_are_per_document_and_one_user_per_socket() {
        let auth = Auth::with_secret(SECRET);
        let mut h = HocuspocusHandler::new(auth, 1 << 20, 8, Duration::from_secs(10), 5);
        let mut out = Actions::new();
        let now = Now::read();
        let mint = |user: &str, docs: &str, write: bool| {
            crate::auth::mint(SECRET, user, &[docs.to_string()], write, Duration::from_secs(3600)).unwrap()
        };
        let (ada_notes, ada_read, bo) = (
            mint("ada", "notes/*", true),
            mint("ada", "wiki/*", false),
            mint("bo", "*", true),
        );
        // Forged, then a document the token does not name: refused, address by address.
        h.message(token("notes/1", "forged"), now, &mut out);
        h.message(token("other/1", &ada_notes), now, &mut out);
        let (frames, requests) = drain(&mut out);
        assert!(requests.is_empty());
        assert!(frames.iter().all(|f| matches!(
            f,
            HpFrame::Message {
                message: HpMessage::PermissionDenied { .. },
                ..
            }
        )));
        assert_eq!(frames.len(), 2);
        h.message(token("notes/1", &ada_notes), now, &mut out);
        drain(&mut out);
        h.reply(joined(), now, &mut out);
        h.message(token("wiki/1", &ada_read), now, &mut out);
        drain(&mut out);
        h.reply(joined(), now, &mut out);
        let (frames, _) = drain(&mut out);
        assert_eq!(
            frames,
            vec![HpFrame::message(
                "wiki/1",
                HpMessage::Authenticated {
                    scope: "readonly".into()
                }
            )]
        );
        // A read-only document's write is refused, nothing pushed.
        let update = vec![1, 1, 5, 0, 4, 1, 4, 116, 101, 120, 116, 1, 120, 0];
        h.message(frame("wiki/1", HpMessage::Update(update)), now, &mut out);
        let (frames, requests) = drain(&mut out);
        assert!(requests.is_empty());
        assert_eq!(frames, vec![HpFrame::message("wiki/1", HpMessage::SyncStatus(false))]);
        // Another user's token on the same socket.
        h.message(token("notes/2", &bo), now, &mut out);
        let (frames, requests) = drain(&mut out);
        assert!(requests.is_empty());
        assert!(matches!(
            &frames[..],
            [HpFrame::Message {
                message: HpMessage::PermissionDenied { .. },
                ..
            }]
        ));
        assert_eq!(h.identity(), Some("ada"));
    }

    #[test]
    fn close_leaves_the_document_and_pings_are_answered() {
        let mut h = open();
        let mut out = Actions::new();
        let now = Now::read();
        h.message(token("a", ""), now, &mut out);
        drain(&mut out);
        h.reply(joined(), now, &mut out);
        drain(&mut out);
        h.message(vec![driftsync_protocol::hocuspocus::PING], now, &mut out);
        assert!(matches!(out.pop_front(), Some(Action::Send(bytes)) if bytes == vec![PONG]));
        h.message(frame("a", HpMessage::Close(None)), now, &mut out);
        let (_, requests) = drain(&mut out);
        assert!(matches!(&requests[..], [Request::Leave { doc }] if doc.as_str() == "a"));
        assert!(h.subscriptions().is_empty());
        // Garbage is ignored.
        h.message(vec![200, 1, 2], now, &mut out);
        assert!(out.is_empty());
    }

    #[test]
    fn addresses_per_document_are_bounded() {
        let mut h = open();
        let mut out = Actions::new();
        let now = Now::read();
        h.message(token("a", ""), now, &mut out);
        drain(&mut out);
        h.reply(joined(), now, &mut out);
        drain(&mut out);
        let mut denied = 0;
        for i in 0..MAX_ADDRESSES_PER_DOC * 2 {
            h.message(token(&format!("a\0s{i}"), ""), now, &mut out);
            let (frames, _) = drain(&mut out);
            denied += frames
                .iter()
                .filter(|f| {
                    matches!(
                        f,
                        HpFrame::Message {
                            message: HpMessage::PermissionDenied { .. },
                            ..
                        }
                    )
                })
                .count();
        }
        assert_eq!(h.docs[&DocId::new("a").unwrap()].addresses.len(), MAX_ADDRESSES_PER_DOC);
        assert_eq!(denied, MAX_ADDRESSES_PER_DOC + 1);
    }

    #[test]
    fn held_frames_are_bounded() {
        let mut h = open();
        let mut out = Actions::new();
        for _ in 0..MAX_WAITING_FRAMES * 2 {
            h.message(frame("x", HpMessage::SyncStep1(vec![0; 1000])), Now::read(), &mut out);
        }
        assert_eq!(h.waiting.len(), MAX_WAITING_FRAMES);
        assert!(h.waiting_bytes <= MAX_WAITING_BYTES);
    }

    #[test]
    fn events_encode_behind_the_document_name() {
        let doc = DocId::new("a/b").unwrap();
        let bytes = encode(&RoomEvent::Stateless {
            doc: doc.clone(),
            payload: "hi".into(),
        })
        .unwrap();
        assert_eq!(
            HpFrame::decode(&bytes, 100),
            Ok(HpFrame::message("a/b", HpMessage::Stateless("hi".into())))
        );
        assert!(encode(&RoomEvent::Ack {
            doc,
            batch: 1,
            cursor: 1
        })
        .is_none());
    }
}
