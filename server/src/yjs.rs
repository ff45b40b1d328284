//! The y-websocket endpoint, `/yjs/{doc}`: one WebSocket per document speaking y-protocols, as
//! the stock `y-websocket` 3.x client expects, on the same rooms as the native protocol, so that
//! Yjs and native clients edit one document together and see each other's presence.
//!
//! What the client expects, and why the endpoint does what it does (see PROTOCOL-NOTES.md):
//! * The room name is the rest of the path, `/` included, used raw: the client appends it to the
//!   URL unencoded and the reference server does not decode it either.
//! * The server speaks first: SyncStep1, then the known awareness states. Every message goes in
//!   its own WebSocket frame, because the 3.x client reads only the first message of a frame.
//! * Updates from the client (its SyncStep2 and every `[0,2]`) go through [`Room::push`]: applied,
//!   broadcast, then durably stored. y-protocols has no acknowledgement, so a refusal the client
//!   cannot act on is only logged; one that a fresh sync repairs (the store failed, the room was
//!   reloaded under it) closes the connection with [`CLOSE_RESYNC`], and the client reconnects and
//!   sends, in its SyncStep2, whatever the server lacks. A SyncStep2 that adds nothing (the usual
//!   reconnect: it still carries the client's whole delete set) is not stored at all.
//! * Read-only connections get an auth "permission denied" message for every write.
//! * Awareness goes into the room's presence table, shared with native connections, and is echoed
//!   to the sender as the reference server does. A y-websocket client closes a connection that
//!   received no message for 30 s, and WebSocket pings never reach it as messages: besides the
//!   ping (which keeps proxies and our own liveness check going), every heartbeat also sends an
//!   awareness message with no entries, which the client applies as nothing.
//! * Typing events of native connections are not sent as such: y-protocols has no typing
//!   indicator, and Yjs applications keep it in their awareness state. The room mirrors a native
//!   connection's typing into its awareness state instead (`"typing": true`), and a Yjs client's
//!   `typing` field into typing events for native connections (`presence.rs`).

//!
//! [`YjsHandler`] is the endpoint's sans-IO state machine (see [`crate::handler`]); the route in
//! `lib.rs` hands the upgraded socket to the connection driver with it.

use driftsync_engine::doc::{decode_state_vector, is_empty_update};
use driftsync_protocol::yjs::{AuthMessage, AwarenessEntry, YMessage};
use driftsync_protocol::{DocId, ErrorCode, CLOSE_PROTOCOL_ERROR, CLOSE_RESYNC, CLOSE_UNAUTHORIZED};
use tokio::time::Instant;

use crate::auth::{Access, Auth, Grant};
use crate::event::{Codec, Refused, RoomEvent};
use crate::handler::{Action, Actions, Handler, Now, Reply, Request};

/// Encodes a room event as a y-protocols message, one per frame.
fn encode(event: &RoomEvent) -> Option<Vec<u8>> {
    match event {
        RoomEvent::Update { update, .. } => Some(YMessage::Update(update.clone()).encode()),
        RoomEvent::Presence { peer, clock, state, .. } => Some(
            YMessage::Awareness(vec![AwarenessEntry {
                client_id: *peer,
                clock: *clock,
                state: state.clone(),
            }])
            .encode(),
        ),
        // y-protocols has no typing indicator: it is mirrored into awareness (module docs).
        RoomEvent::Typing { .. } => None,
        // y-protocols has no acknowledgements, nor stateless messages.
        RoomEvent::Ack { .. } | RoomEvent::Stateless { .. } => None,
    }
}

/// The y-protocols "permission denied" message for a refusal.
fn permission_denied(code: ErrorCode) -> Vec<u8> {
    YMessage::Auth(AuthMessage::PermissionDenied {
        reason: format!("{code:?}"),
    })
    .encode()
}

/// One y-websocket connection's protocol state.
pub(crate) struct YjsHandler {
    auth: Auth,
    max_frame_size: usize,
    session: u64,
    /// The raw document id and token, until `start` checks them.
    opening: Option<(String, Option<String>)>,
    /// The document, its grant and access, once checked.
    conn: Option<Conn>,
    /// Whether the room was joined (and must be left).
    joined: bool,
    /// When the token expires.
    expiry: Option<Instant>,
}

/// What one connection is, once its token and document are checked.
struct Conn {
    doc: DocId,
    access: Access,
    /// The verified token's grant (checked for expiry at every write).
    grant: Grant,
}

impl YjsHandler {
    pub(crate) fn new(
        auth: Auth,
        max_frame_size: usize,
        session: u64,
        raw_doc: String,
        token: Option<String>,
    ) -> YjsHandler {
        YjsHandler {
            auth,
            max_frame_size,
            session,
            opening: Some((raw_doc, token)),
            conn: None,
            joined: false,
            expiry: None,
        }
    }

    /// Whether the connection may write now; if not, tells the client why.
    fn may_write(&self, now: Now, out: &mut Actions) -> bool {
        let Some(conn) = &self.conn else { return false };
        if conn.access != Access::Write {
            out.push_back(Action::Send(permission_denied(ErrorCode::ReadOnly)));
            return false;
        }
        if conn.grant.is_expired_at(now.unix) {
            out.push_back(Action::Send(permission_denied(ErrorCode::TokenExpired)));
            return false;
        }
        true
    }

    fn push(&self, update: Vec<u8>, skip_redundant: bool, out: &mut Actions) {
        if let Some(conn) = &self.conn {
            out.push_back(Action::Request(Request::Push {
                doc: conn.doc.clone(),
                origin: None,
                update,
                skip_redundant,
                tag: 0,
            }));
        }
    }

    /// A refused update: y-protocols has no acknowledgement, so a refusal the client cannot act
    /// on is only said; one that a fresh sync repairs closes the connection for a resync.
    fn refused(&self, refused: Refused, out: &mut Actions) {
        let session = self.session;
        let doc = self.conn.as_ref().map(|c| c.doc.as_str()).unwrap_or_default();
        if refused.reload_cost > 0 {
            out.push_back(Action::ChargeReload(refused.reload_cost));
        }
        match refused.code {
            code @ (ErrorCode::Forbidden
            | ErrorCode::ReadOnly
            | ErrorCode::ClientIdTaken
            | ErrorCode::DocumentTooLarge
            | ErrorCode::SchemaViolation) => {
                // Resyncing would only send the same content again: say why, keep the connection.
                tracing::info!(session, doc, ?code, "update from a y-websocket client refused");
                out.push_back(Action::Send(permission_denied(code)));
            }
            code @ (ErrorCode::StoreUnavailable
            | ErrorCode::LoadFailed
            | ErrorCode::MissingDependencies
            | ErrorCode::TooManyPending
            | ErrorCode::Unavailable
            | ErrorCode::Internal) => {
                // The client believes the server has the update. A new sync (its SyncStep2
                // against the server's state vector) is how y-protocols repairs that.
                tracing::warn!(session, doc, ?code, "update not stored; closing for a resync");
                out.push_back(Action::Close(CLOSE_RESYNC));
            }
            code => {
                // Resyncing would only send the same bad content again.
                tracing::info!(session, doc, ?code, "update from a y-websocket client refused");
            }
        }
    }
}

impl Handler for YjsHandler {
    const CODEC: Codec = Codec { slot: 1, encode };

    /// Checks the document id and the token, then joins the room; the greeting (SyncStep1,
    /// then the awareness states) follows the join.
    fn start(&mut self, now: Now, out: &mut Actions) {
        let Some((raw_doc, token)) = self.opening.take() else {
            return;
        };
        let session = self.session;
        let doc = match DocId::new(raw_doc) {
            Ok(doc) => doc,
            Err(e) => {
                tracing::info!(session, error = %e, "bad y-websocket document id");
                out.push_back(Action::Close(CLOSE_PROTOCOL_ERROR));
                return;
            }
        };
        let checked = self
            .auth
            .verify_at(token.as_deref().unwrap_or_default(), now.unix)
            .and_then(|grant| Ok((grant.access(&doc).ok_or(ErrorCode::Forbidden)?, grant)));
        let (access, grant) = match checked {
            Ok(checked) => checked,
            Err(code) => {
                tracing::info!(session, doc = %doc, ?code, "y-websocket connection refused");
                out.push_back(Action::Send(permission_denied(code)));
                out.push_back(Action::Close(CLOSE_UNAUTHORIZED));
                return;
            }
        };
        // Access ends with the token: y-protocols has no reauth, so the connection is closed
        // with 4001 when it expires (a y-websocket client reconnects, with a fresh token if its
        // app gives one in its params).
        self.expiry = grant.expires_at.map(|exp| {
            let left = (exp + 1).saturating_sub(now.unix);
            now.at + std::time::Duration::from_secs(left)
        });
        out.push_back(Action::Request(Request::Join { doc: doc.clone() }));
        self.conn = Some(Conn { doc, access, grant });
    }

    fn message(&mut self, bytes: Vec<u8>, now: Now, out: &mut Actions) {
        if !self.joined {
            return;
        }
        let session = self.session;
        let message = match YMessage::decode(&bytes, self.max_frame_size) {
            Ok(message) => message,
            Err(e) => {
                // The reference server ignores what it cannot read, and so do we.
                tracing::info!(session, error = %e, "malformed y-websocket message");
                return;
            }
        };
        let Some(doc) = self.conn.as_ref().map(|conn| conn.doc.clone()) else {
            return;
        };
        match message {
            YMessage::SyncStep1(sv) => match decode_state_vector(&sv) {
                // The answer is the whole document the client lacks: charged to its rate
                // limit, and queued only as fast as the client reads.
                Ok(state_vector) => out.push_back(Action::Request(Request::Diff { doc, state_vector })),
                Err(e) => tracing::info!(session, doc = %doc, error = %e, "bad state vector in a SyncStep1"),
            },
            // Permissions first: nothing a connection may not send is decoded.
            YMessage::SyncStep2(update) | YMessage::Update(update) if !self.may_write(now, out) => drop(update),
            // A SyncStep2 that adds nothing (the usual reconnect: it still carries the client's
            // whole delete set) is answered at once, not stored.
            YMessage::SyncStep2(update) => self.push(update, true, out),
            YMessage::Update(update) => {
                if !is_empty_update(&update) {
                    self.push(update, false, out);
                }
            }
            YMessage::Awareness(entries) => out.push_back(Action::Request(Request::Awareness { doc, entries })),
            YMessage::QueryAwareness => out.push_back(Action::Request(Request::AwarenessSnapshot { doc })),
            YMessage::Auth(AuthMessage::PermissionDenied { .. }) => {
                tracing::info!(session, "ignoring an auth message from a y-websocket client");
            }
        }
    }

    fn reply(&mut self, reply: Reply, _now: Now, out: &mut Actions) {
        match reply {
            Reply::Joined(Ok(joined)) => {
                self.joined = true;
                out.push_back(Action::Send(YMessage::SyncStep1(joined.state_vector).encode()));
                if !joined.awareness.is_empty() {
                    out.push_back(Action::Send(YMessage::Awareness(joined.awareness).encode()));
                }
            }
            Reply::Joined(Err(ErrorCode::RateLimited)) => {
                // Opening rooms too fast: the client reconnects later with its own backoff.
                out.push_back(Action::Send(permission_denied(ErrorCode::RateLimited)));
                out.push_back(Action::Close(CLOSE_RESYNC));
            }
            Reply::Joined(Err(_)) | Reply::Diff(Err(_)) => out.push_back(Action::Close(CLOSE_RESYNC)),
            Reply::Diff(Ok(update)) => out.push_back(Action::Answer {
                bytes: YMessage::SyncStep2(update).encode(),
                charge: true,
            }),
            Reply::Pushed {
                result: Err(refused), ..
            } => self.refused(refused, out),
            // A flood of queries pays for every answer.
            Reply::AwarenessSnapshot(Some(entries)) => out.push_back(Action::Answer {
                bytes: YMessage::Awareness(entries).encode(),
                charge: true,
            }),
            Reply::Pushed { result: Ok(_), .. }
            | Reply::AwarenessSnapshot(None)
            | Reply::Claimed(_)
            | Reply::Resumed { .. }
            | Reply::Presence { .. }
            | Reply::Inbox(_)
            | Reply::Members { .. }
            | Reply::Done => {}
        }
    }

    /// A WebSocket ping (for proxies and our liveness check), and an empty awareness message: a
    /// y-websocket client drops a connection that brought it no message for 30 s, and pings
    /// never reach it as messages.
    fn heartbeat(&mut self, out: &mut Actions) {
        if self.joined {
            out.push_back(Action::Ping);
            out.push_back(Action::Send(YMessage::Awareness(Vec::new()).encode()));
        }
    }

    /// y-protocols has no "slow down" message: close with the resync code; the client
    /// reconnects (with its own backoff) and syncs again. Nothing it sent is lost.
    fn rate_limited(&mut self, _bytes: Vec<u8>, out: &mut Actions) {
        tracing::info!(session = self.session, "rate limit exceeded: closing");
        out.push_back(Action::Close(CLOSE_RESYNC));
    }

    fn deadline(&self) -> Option<Instant> {
        self.expiry
    }

    fn timer(&mut self, _now: Now, out: &mut Actions) {
        tracing::info!(session = self.session, "token expired: closing");
        self.expiry = None;
        out.push_back(Action::Send(permission_denied(ErrorCode::TokenExpired)));
        out.push_back(Action::Close(CLOSE_UNAUTHORIZED));
    }

    fn identity(&self) -> Option<&str> {
        self.conn.as_ref().and_then(|conn| conn.grant.identity())
    }

    fn user(&self) -> &str {
        self.conn.as_ref().map_or("", |conn| conn.grant.user.as_str())
    }

    fn subscriptions(&self) -> Vec<DocId> {
        match &self.conn {
            Some(conn) if self.joined => vec![conn.doc.clone()],
            _ => Vec::new(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn handler(token: Option<&str>) -> YjsHandler {
        YjsHandler::new(Auth::open(), 1 << 20, 5, "notes/a".into(), token.map(str::to_owned))
    }

    #[test]
    fn a_connection_joins_then_greets_with_sync_step_1() {
        let mut h = handler(None);
        let mut out = Actions::new();
        h.start(Now::read(), &mut out);
        assert!(matches!(out.pop_front(), Some(Action::Request(Request::Join { .. }))));
        // Nothing is read before the join.
        h.message(YMessage::QueryAwareness.encode(), Now::read(), &mut out);
        assert!(out.is_empty());
        let joined = crate::event::Joined {
            state_vector: vec![0],
            awareness: Vec::new(),
        };
        h.reply(Reply::Joined(Ok(joined)), Now::read(), &mut out);
        match out.pop_front() {
            Some(Action::Send(bytes)) => assert_eq!(YMessage::decode(&bytes, 100), Ok(YMessage::SyncStep1(vec![0]))),
            other => panic!("expected SyncStep1, got {other:?}"),
        }
        assert!(out.is_empty(), "no awareness message without states");
        assert_eq!(h.subscriptions(), vec![DocId::new("notes/a").unwrap()]);
    }

    #[test]
    fn a_refused_token_is_told_and_closed() {
        let mut h = YjsHandler::new(
            Auth::with_secret("0123456789abcdef0123456789abcdef"),
            1 << 20,
            5,
            "notes/a".into(),
            Some("forged".into()),
        );
        let mut out = Actions::new();
        h.start(Now::read(), &mut out);
        assert!(matches!(out.pop_front(), Some(Action::Send(_))));
        assert!(matches!(out.pop_front(), Some(Action::Close(CLOSE_UNAUTHORIZED))));
        assert!(h.subscriptions().is_empty());
    }

    #[test]
    fn room_events_encode_as_one_message_each() {
        let doc = DocId::new("a/b").unwrap();
        let update = RoomEvent::Update {
            doc: doc.clone(),
            cursor: 3,
            update: vec![0, 0],
        };
        assert_eq!(encode(&update), Some(vec![0, 2, 2, 0, 0]));
        let presence = RoomEvent::Presence {
            doc: doc.clone(),
            peer: 5,
            user: "u".into(),
            clock: 2,
            state: None,
        };
        let bytes = encode(&presence).unwrap();
        assert_eq!(
            YMessage::decode(&bytes, 100),
            Ok(YMessage::Awareness(vec![AwarenessEntry {
                client_id: 5,
                clock: 2,
                state: None
            }]))
        );
        assert_eq!(
            encode(&RoomEvent::Typing {
                doc,
                peer: 5,
                user: "u".into(),
                typing: true
            }),
            None
        );
    }
}
