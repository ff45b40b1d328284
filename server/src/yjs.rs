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
//! * Typing events of native connections are not sent: y-protocols has no typing indicator, and
//!   Yjs applications that want one keep it in their awareness state.

use std::collections::HashMap;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use axum::extract::rejection::QueryRejection;
use axum::extract::{Query, State};
use axum::http::Uri;
use axum::response::IntoResponse;
use driftsync_engine::doc::{decode_state_vector, decode_update, is_empty_update, state_vector};
use driftsync_engine::store::Store;
use driftsync_engine::sync::missing_for;
use driftsync_protocol::yjs::{AuthMessage, AwarenessEntry, YMessage};
use driftsync_protocol::{DocId, ErrorCode, CLOSE_GOING_AWAY, CLOSE_PROTOCOL_ERROR, CLOSE_RESYNC, CLOSE_UNAUTHORIZED};
use yrs::{Doc, ReadTxn, Transact};

use crate::auth::{Access, Grant};
use crate::limits::Limiter;
use crate::room::{ConnCtl, Outbound, Outgoing, Protocol, Room, RoomEvent, Subscriber};
use crate::socket::{next_incoming, Incoming, Reader, Socket, Upgrade, DRAIN_BYTES, DRAIN_TIME};
use crate::Shared;

/// The path the route is mounted at; the document id follows it.
const ROUTE_PREFIX: &str = "/yjs/";

/// What one connection is, once it is subscribed.
struct Conn {
    session: u64,
    user: String,
    access: Access,
    /// The verified token's grant (checked for expiry at every write).
    grant: Grant,
}

/// Upgrades `GET /yjs/{doc}?token=…` to a y-websocket connection, with the same frame limits and
/// small write buffer as the native endpoint.
pub(crate) async fn upgrade<S: Store>(
    State(shared): State<Arc<Shared<S>>>,
    uri: Uri,
    query: Result<Query<HashMap<String, String>>, QueryRejection>,
    ws: Upgrade,
) -> impl IntoResponse {
    // The raw path, not axum's percent-decoded capture: the reference server names the room by
    // the raw path too, so both servers agree on which document a client opens.
    let raw_doc = uri.path().strip_prefix(ROUTE_PREFIX).unwrap_or_default().to_owned();
    let token = query.ok().and_then(|Query(mut params)| params.remove("token"));
    let max = shared.config.max_frame_size;
    ws.on_upgrade(max, move |socket| run(shared, socket, raw_doc, token))
}

/// What a connection presenting `token` may do with `doc`: the token's grant and its access to
/// `doc`, or why it is refused (no token, a bad or expired one, or no access to `doc`).
fn authorize<S: Store>(shared: &Shared<S>, token: Option<&str>, doc: &DocId) -> Result<(Grant, Access), ErrorCode> {
    let grant = shared.config.auth.verify(token.unwrap_or_default())?;
    let access = grant.access(doc).ok_or(ErrorCode::Forbidden)?;
    Ok((grant, access))
}

async fn run<S: Store>(shared: Arc<Shared<S>>, socket: Socket, raw_doc: String, token: Option<String>) {
    let ctl = Arc::new(ConnCtl::new(shared.shutdown.child_token(), Arc::clone(&shared.metrics)));
    let (mut stream, out, writer) = socket.start(shared.config.outbound_queue, ctl, Protocol::Yjs, encode);
    out.tx.set_max_bytes(shared.config.outbound_queue_bytes);

    let session = shared.next_session.fetch_add(1, Ordering::Relaxed);
    // Boxed: store queries make large futures, which the idle connection must not keep.
    match Box::pin(open(&shared, &out, session, raw_doc, token.as_deref())).await {
        Ok((room, conn)) => {
            read_loop(&shared, &mut stream, &out, &room, &conn).await;
            room.leave(conn.session).await;
            out.ctl.close(CLOSE_GOING_AWAY);
        }
        Err(code) => out.ctl.close(code),
    }
    // The reader holds a handle to the queue too (for pongs).
    drop(out);
    let _ = writer.await;
    // Not at shutdown: the process is about to go, and closing fast matters more then.
    if !shared.shutdown.is_cancelled() {
        stream.drain(DRAIN_BYTES, DRAIN_TIME).await;
    }
}

/// Checks the document id and the token, subscribes the connection to the room and greets the
/// client: SyncStep1 with the server's state vector, then the awareness states, if any.
async fn open<S: Store>(
    shared: &Shared<S>,
    out: &Outbound,
    session: u64,
    raw_doc: String,
    token: Option<&str>,
) -> Result<(Arc<Room>, Conn), u16> {
    let doc = DocId::new(raw_doc).map_err(|e| {
        tracing::info!(session, error = %e, "bad y-websocket document id");
        CLOSE_PROTOCOL_ERROR
    })?;
    let (grant, access) = authorize(shared, token, &doc).map_err(|code| {
        tracing::info!(session, doc = %doc, ?code, "y-websocket connection refused");
        out.frame(permission_denied(code));
        CLOSE_UNAUTHORIZED
    })?;
    // Opening a room loads a document: paced per user, as on the native endpoint.
    if let Some(user) = grant.identity() {
        if !shared.opens.allow(&shared.config.room_opens, user, Instant::now()) {
            tracing::info!(session, doc = %doc, user, "y-websocket connection refused: opening rooms too fast");
            out.frame(permission_denied(ErrorCode::RateLimited));
            return Err(CLOSE_RESYNC);
        }
    }
    let conn = Conn {
        session,
        user: grant.user.clone(),
        access,
        grant,
    };
    let room = shared.rooms.get(&doc);
    {
        let mut guard = room.state.lock().await;
        let state = room.ensure_loaded(&mut guard, &*shared.store).await.map_err(|e| {
            tracing::error!(doc = %doc, error = %e, "refusing a document that failed to load");
            CLOSE_RESYNC
        })?;
        state.subscribers.insert(session, Subscriber { out: out.clone() });
        // Queued under the room lock: no broadcast can overtake the greeting.
        let sv = state.doc().map(state_vector).ok_or(CLOSE_RESYNC)?;
        out.frame(YMessage::SyncStep1(sv).encode());
        let states = state.presence.snapshot();
        if !states.is_empty() {
            out.frame(YMessage::Awareness(states).encode());
        }
    }
    Ok((room, conn))
}

async fn read_loop<S: Store>(shared: &Shared<S>, stream: &mut Reader, out: &Outbound, room: &Room, conn: &Conn) {
    let heartbeat = shared.config.heartbeat;
    // The first tick one interval from now. (`interval` + a first `tick().await` cost every
    // new connection up to a millisecond: an elapsed deadline still waits for the timer wheel's
    // next tick, and the first message was read only after it.)
    let mut ticker = tokio::time::interval_at(tokio::time::Instant::now() + heartbeat, heartbeat);
    let mut last_heard = Instant::now();
    let mut limiter = Limiter::new(&shared.config.rate_limit, &shared.config.room_opens, last_heard);
    // Access ends with the token: y-protocols has no reauth, so the connection is closed with
    // 4001 when it expires (a y-websocket client reconnects, with a fresh token if its app
    // gives one in its params).
    let expiry = conn.grant.expires_at.map(|exp| {
        let left = (exp + 1).saturating_sub(crate::auth::now_secs());
        tokio::time::Instant::now() + std::time::Duration::from_secs(left)
    });
    let expiry =
        tokio::time::sleep_until(expiry.unwrap_or_else(|| tokio::time::Instant::now() + heartbeat * 1_000_000));
    tokio::pin!(expiry);
    let patience = heartbeat * 3;
    loop {
        let incoming = tokio::select! {
            () = out.ctl.token.cancelled() => return,
            () = &mut expiry, if conn.grant.expires_at.is_some() => {
                tracing::info!(session = conn.session, doc = %room.id, "token expired: closing");
                out.frame(permission_denied(ErrorCode::TokenExpired));
                out.ctl.close(CLOSE_UNAUTHORIZED);
                return;
            }
            _ = ticker.tick() => {
                if last_heard.elapsed() > heartbeat * 3 {
                    tracing::info!(session = conn.session, "y-websocket peer silent for three heartbeats: closing");
                    return;
                }
                out.send(Outgoing::Ping);
                out.frame(YMessage::Awareness(Vec::new()).encode());
                continue;
            }
            incoming = next_incoming(stream) => match incoming {
                Some(incoming) => incoming,
                None => return,
            },
        };
        // Any message, a pong included, shows the peer is alive.
        last_heard = Instant::now();
        limiter.charge_uncounted(stream.take_uncounted(), last_heard);
        let Incoming::Binary(bytes) = incoming else { continue };
        if !limiter.allow(bytes.len(), last_heard) {
            // y-protocols has no "slow down" message: close with the resync code; the client
            // reconnects (with its own backoff) and syncs again. Nothing it sent is lost.
            tracing::info!(session = conn.session, doc = %room.id, "rate limit exceeded: closing");
            out.ctl.close(driftsync_protocol::CLOSE_RESYNC);
            return;
        }
        let message = match YMessage::decode(&bytes, shared.config.max_frame_size) {
            Ok(message) => message,
            Err(e) => {
                // The reference server ignores what it cannot read, and so do we.
                tracing::info!(session = conn.session, doc = %room.id, error = %e, "malformed y-websocket message");
                continue;
            }
        };
        match message {
            YMessage::SyncStep1(sv) => {
                // The answer is the whole document the client lacks: charged to its rate limit,
                // and queued only as fast as the client reads.
                let Some(answer) = Box::pin(sync_step2(shared, room, out, &sv)).await else {
                    continue;
                };
                limiter.charge(answer.len(), Instant::now());
                if !out.answer(answer, patience).await {
                    return;
                }
            }
            // Permissions first: nothing a connection may not send is decoded.
            YMessage::SyncStep2(update) | YMessage::Update(update) if !may_write(out, conn) => drop(update),
            YMessage::SyncStep2(update) => {
                if !Box::pin(adds_nothing(shared, room, &update)).await
                    && !Box::pin(write(shared, room, out, conn, &mut limiter, update)).await
                {
                    return;
                }
            }
            YMessage::Update(update) => {
                if !is_empty_update(&update) && !Box::pin(write(shared, room, out, conn, &mut limiter, update)).await {
                    return;
                }
            }
            YMessage::Awareness(entries) => room.awareness(conn.session, &conn.user, &entries).await,
            YMessage::QueryAwareness => {
                let answer = {
                    let guard = room.state.lock().await;
                    guard.as_ref().map(|state| {
                        // Charged before it is built: a flood of queries pays for every answer.
                        limiter.charge(state.presence.snapshot_bytes(), Instant::now());
                        YMessage::Awareness(state.presence.snapshot()).encode()
                    })
                };
                if let Some(answer) = answer {
                    if !out.answer(answer, patience).await {
                        return;
                    }
                }
            }
            YMessage::Auth(AuthMessage::PermissionDenied { .. }) => {
                tracing::info!(
                    session = conn.session,
                    "ignoring an auth message from a y-websocket client"
                );
            }
        }
    }
}

/// The answer to the client's SyncStep1: a SyncStep2 with what it lacks (`None`: nothing to
/// answer — a bad state vector, or the room failed to load and the connection is closing).
async fn sync_step2<S: Store>(shared: &Shared<S>, room: &Room, out: &Outbound, sv: &[u8]) -> Option<Vec<u8>> {
    let sv = match decode_state_vector(sv) {
        Ok(sv) => sv,
        Err(e) => {
            tracing::info!(doc = %room.id, error = %e, "bad state vector in a SyncStep1");
            return None;
        }
    };
    let mut guard = room.state.lock().await;
    // Not loaded: a reload failed and the connection has been told to resync.
    guard.as_ref()?;
    match room.ensure_loaded(&mut guard, &*shared.store).await {
        Ok(state) => state
            .doc()
            .map(|doc| YMessage::SyncStep2(missing_for(doc, &sv)).encode()),
        Err(e) => {
            tracing::error!(doc = %room.id, error = %e, "reloading an evicted document failed");
            out.ctl.close(CLOSE_RESYNC);
            None
        }
    }
}

/// Whether the connection may write now; if not, tells the client why.
fn may_write(out: &Outbound, conn: &Conn) -> bool {
    if conn.access != Access::Write {
        out.frame(permission_denied(ErrorCode::ReadOnly));
        return false;
    }
    if conn.grant.is_expired() {
        out.frame(permission_denied(ErrorCode::TokenExpired));
        return false;
    }
    true
}

/// Stores and broadcasts one update from the client (which [`may_write`]).
///
/// Returns false when the connection must close: it keeps sending updates whose refusal costs
/// its room a reload of the document.
async fn write<S: Store>(
    shared: &Shared<S>,
    room: &Room,
    out: &Outbound,
    conn: &Conn,
    limiter: &mut Limiter,
    update: Vec<u8>,
) -> bool {
    let user = conn.grant.identity();
    let refused = match room
        .push(&*shared.store, &shared.committer, conn.session, user, None, update)
        .await
    {
        Ok(_) => return true,
        Err(refused) => refused,
    };
    if refused.reload_cost > 0 && !limiter.pay_reload(refused.reload_cost, Instant::now()) {
        tracing::info!(session = conn.session, doc = %room.id, "too many refused updates costing reloads: closing");
        out.ctl.close(CLOSE_PROTOCOL_ERROR);
        return false;
    }
    match refused.code {
        code @ (ErrorCode::Forbidden
        | ErrorCode::ReadOnly
        | ErrorCode::ClientIdTaken
        | ErrorCode::DocumentTooLarge
        | ErrorCode::SchemaViolation) => {
            // Resyncing would only send the same content again: say why, keep the connection.
            tracing::info!(session = conn.session, doc = %room.id, ?code, "update from a y-websocket client refused");
            out.frame(permission_denied(code));
        }
        code @ (ErrorCode::StoreUnavailable
        | ErrorCode::LoadFailed
        | ErrorCode::MissingDependencies
        | ErrorCode::TooManyPending
        | ErrorCode::Unavailable
        | ErrorCode::Internal) => {
            // The client believes the server has the update. A new sync (its SyncStep2 against
            // the server's state vector) is how y-protocols repairs that.
            tracing::warn!(session = conn.session, doc = %room.id, ?code, "update not stored; closing for a resync");
            out.ctl.close(CLOSE_RESYNC);
        }
        code => {
            // Resyncing would only send the same bad content again.
            tracing::info!(session = conn.session, doc = %room.id, ?code, "update from a y-websocket client refused");
        }
    }
    true
}

/// Whether storing `update` would change nothing in the room's document.
async fn adds_nothing<S: Store>(shared: &Shared<S>, room: &Room, update: &[u8]) -> bool {
    if is_empty_update(update) {
        return true;
    }
    let mut guard = room.state.lock().await;
    if guard.is_none() {
        return false;
    }
    match room.ensure_loaded(&mut guard, &*shared.store).await {
        Ok(state) => state.doc().is_some_and(|doc| already_integrated(doc, update)),
        // The push that follows reports the failure.
        Err(_) => false,
    }
}

/// Whether every block `update` inserts is integrated in `doc` and every deletion it carries is
/// applied. A y-protocols SyncStep2 always carries the sender's whole delete set (deletions have
/// no clock), so without this check every reconnect of a Yjs client would log that delete set
/// again. Anything this cannot prove redundant (including undecodable bytes, which the push then
/// refuses) counts as new.
fn already_integrated(doc: &Doc, update: &[u8]) -> bool {
    let Ok(update) = decode_update(update) else {
        return false;
    };
    catch_unwind(AssertUnwindSafe(|| {
        let txn = doc.transact();
        let have = txn.state_vector();
        let inserts_known = update
            .insertions(true)
            .iter()
            .all(|(client, ranges)| ranges.iter().all(|range| range.end <= have.get(client)));
        if !inserts_known {
            return false;
        }
        let deleted = update.delete_set();
        if deleted.is_empty() {
            return true;
        }
        let missing = deleted.diff(&txn.snapshot().delete_set);
        missing
            .iter()
            .all(|(_, ranges)| ranges.iter().all(|range| range.is_empty()))
    }))
    .unwrap_or(false)
}

/// The y-protocols "permission denied" message for a refusal.
fn permission_denied(code: ErrorCode) -> Vec<u8> {
    YMessage::Auth(AuthMessage::PermissionDenied {
        reason: format!("{code:?}"),
    })
    .encode()
}

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
        // y-protocols has no typing indicator (see the module documentation).
        RoomEvent::Typing { .. } => None,
    }
}

#[cfg(test)]
mod tests {
    use driftsync_engine::doc::{encode_state, new_doc, text_delete, text_insert};

    use super::*;

    #[test]
    fn a_resent_state_is_recognised_as_redundant() {
        let server = new_doc(1).unwrap();
        let client = new_doc(2).unwrap();
        let a = text_insert(&client, 0, "hello world").unwrap();
        let b = text_delete(&client, 0, 6).unwrap();
        driftsync_engine::doc::apply_bytes(&server, &a).unwrap();
        // The insertion is known, the deletion is not.
        assert!(!already_integrated(&server, &encode_state(&client)));
        driftsync_engine::doc::apply_bytes(&server, &b).unwrap();
        // What a reconnecting client sends: a diff against the server's state vector, which
        // still carries the whole delete set.
        let sv = server.transact().state_vector();
        let step2 = client.transact().encode_diff_v1(&sv);
        assert!(already_integrated(&server, &step2));
        assert!(already_integrated(&server, &encode_state(&client)));
        // A new insertion is not redundant, nor is garbage.
        let c = text_insert(&client, 0, "!").unwrap();
        assert!(!already_integrated(&server, &c));
        assert!(!already_integrated(&server, &[0xff, 0xff, 0x01]));
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
