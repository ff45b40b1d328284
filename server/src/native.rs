//! The native endpoint, `/v1/sync`: one WebSocket connection speaking the postcard protocol of
//! `driftsync-protocol`, multiplexing any number of documents.

use std::collections::HashSet;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use driftsync_engine::doc::MAX_CLIENT_ID;
use driftsync_engine::store::{LogTail, Origin, Store};
use driftsync_engine::sync::{answer_resume, ResumeAnswer};
use driftsync_protocol::{
    ClientFrame, Cursor, DocId, DocResumed, ErrorCode, ResumeDoc, ServerFrame, CLOSE_PROTOCOL_ERROR, CLOSE_RESYNC,
    CLOSE_UNAUTHORIZED, CLOSE_UNSUPPORTED_VERSION, PROTOCOL_VERSION,
};

use crate::auth::{Access, Grant};
use crate::limits::Limiter;
use crate::owners::Ownership;
use crate::room::{ConnCtl, Outbound, Protocol, RoomEvent, Subscriber};
use crate::socket::{next_binary, Reader, Socket, DRAIN_BYTES, DRAIN_TIME};
use crate::Shared;

/// What a `Resumed` frame holding one document needs besides the document's update (its id,
/// cursor, state vector, framing), with room to spare.
const RESUMED_OVERHEAD: usize = 64 * 1024;

/// The most log entries a resume reads; a client further behind gets a state-vector diff (the
/// default compaction keeps 1,024 entries in the log for resumes).
const MAX_TAIL_ENTRIES: u64 = 1024;

/// What the connection knows about its peer after the hello.
struct Peer {
    session: u64,
    client_id: u64,
    user: String,
    /// What the peer's token allows (replaced by a `Reauth`).
    grant: Grant,
    docs: HashSet<DocId>,
}

impl Peer {
    /// Whether the peer may open `doc` now: its token has not expired and covers `doc`.
    fn may_read(&self, doc: &DocId) -> Result<Access, ErrorCode> {
        if self.grant.is_expired() {
            return Err(ErrorCode::TokenExpired);
        }
        self.grant.access(doc).ok_or(ErrorCode::Forbidden)
    }

    /// Whether the peer may write `doc` now: as [`Peer::may_read`], and the token is not
    /// read-only.
    fn may_write(&self, doc: &DocId) -> Result<(), ErrorCode> {
        match self.may_read(doc)? {
            Access::Write => Ok(()),
            Access::Read => Err(ErrorCode::ReadOnly),
        }
    }
}

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
    };
    Some(frame.encode())
}

fn error(code: ErrorCode, doc: Option<DocId>, batch: Option<u64>) -> Vec<u8> {
    ServerFrame::Error { code, doc, batch }.encode()
}

pub(crate) async fn run<S: Store>(shared: Arc<Shared<S>>, socket: Socket) {
    let ctl = Arc::new(ConnCtl::new(shared.shutdown.child_token(), Arc::clone(&shared.metrics)));
    let (mut stream, out, writer) = socket.start(shared.config.outbound_queue, ctl, Protocol::Native, encode);
    out.tx.set_max_bytes(shared.config.outbound_queue_bytes);

    let session = shared.next_session.fetch_add(1, Ordering::Relaxed);
    match Box::pin(hello(&shared, &mut stream, &out, session)).await {
        Ok(mut peer) => {
            read_loop(&shared, &mut stream, &out, &mut peer).await;
            for doc in &peer.docs {
                shared.rooms.get(doc).leave(peer.session).await;
            }
            out.ctl.close(driftsync_protocol::CLOSE_GOING_AWAY);
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

async fn hello<S: Store>(shared: &Shared<S>, stream: &mut Reader, out: &Outbound, session: u64) -> Result<Peer, u16> {
    let first = tokio::time::timeout(shared.config.hello_timeout, next_binary(stream)).await;
    let Ok(Some(bytes)) = first else {
        return Err(CLOSE_PROTOCOL_ERROR);
    };
    match ClientFrame::decode(&bytes, shared.config.max_frame_size) {
        Ok(ClientFrame::Hello {
            version,
            token,
            client_id,
        }) => {
            if version != PROTOCOL_VERSION {
                out.frame(error(ErrorCode::UnsupportedVersion, None, None));
                return Err(CLOSE_UNSUPPORTED_VERSION);
            }
            let grant = shared.config.auth.verify(&token).map_err(|code| {
                tracing::info!(session, ?code, "hello refused");
                out.frame(error(code, None, None));
                CLOSE_UNAUTHORIZED
            })?;
            if client_id == 0 || client_id >= MAX_CLIENT_ID {
                tracing::info!(session, client_id, "hello refused: client id not in 1..2^53");
                out.frame(error(ErrorCode::Malformed, None, None));
                return Err(CLOSE_PROTOCOL_ERROR);
            }
            // The client id keys the deduplication of this connection's batches: it must be the
            // user's own, or anyone could make another's batches look like re-sends.
            if let Some(user) = grant.identity() {
                match shared.rooms.ctx().owners.claim(&*shared.store, client_id, user).await {
                    Ok(Ownership::Mine) => {}
                    Ok(Ownership::Taken) => {
                        tracing::info!(
                            session,
                            client_id,
                            user,
                            "hello refused: the client id is another user's"
                        );
                        out.frame(error(ErrorCode::ClientIdTaken, None, None));
                        return Err(CLOSE_UNAUTHORIZED);
                    }
                    Err(e) => {
                        tracing::error!(session, error = %e, "store failed binding a client id");
                        out.frame(error(ErrorCode::StoreUnavailable, None, None));
                        return Err(CLOSE_RESYNC);
                    }
                }
            }
            // Authenticated: from here on frames up to the full size (the hello's limit was
            // `max_hello_frame`). Raised before the welcome, after which the client may send.
            stream.set_max_size(shared.config.max_frame_size);
            out.frame(
                ServerFrame::Welcome {
                    version: PROTOCOL_VERSION,
                    max_frame_size: u32::try_from(shared.config.max_frame_size).unwrap_or(u32::MAX),
                    session,
                    heartbeat_ms: u32::try_from(shared.config.heartbeat.as_millis()).unwrap_or(u32::MAX),
                }
                .encode(),
            );
            Ok(Peer {
                session,
                client_id,
                user: grant.user.clone(),
                grant,
                docs: HashSet::new(),
            })
        }
        Ok(_) => {
            out.frame(error(ErrorCode::Malformed, None, None));
            Err(CLOSE_PROTOCOL_ERROR)
        }
        Err(e) => {
            tracing::info!(session, error = %e, "bad hello");
            out.frame(error(ErrorCode::Malformed, None, None));
            Err(CLOSE_PROTOCOL_ERROR)
        }
    }
}

async fn read_loop<S: Store>(shared: &Shared<S>, stream: &mut Reader, out: &Outbound, peer: &mut Peer) {
    let heartbeat = shared.config.heartbeat;
    // The first tick one interval from now. (`interval` + a first `tick().await` cost every
    // new connection up to a millisecond: an elapsed deadline still waits for the timer wheel's
    // next tick, and the first message was read only after it.)
    let mut ticker = tokio::time::interval_at(tokio::time::Instant::now() + heartbeat, heartbeat);
    let mut last_heard = Instant::now();
    let mut limiter = Limiter::new(&shared.config.rate_limit, &shared.config.room_opens, last_heard);
    let mut nonce = 0u64;
    // When the token expires, and then when the grace for a `Reauth` ends.
    let expiry = tokio::time::sleep_until(expiry_deadline(&peer.grant).unwrap_or_else(far_future));
    tokio::pin!(expiry);
    let mut expired = false;
    loop {
        let bytes = tokio::select! {
            () = out.ctl.token.cancelled() => return,
            () = &mut expiry, if peer.grant.expires_at.is_some() => {
                if expired {
                    tracing::info!(session = peer.session, "token expired and not renewed: closing");
                    out.ctl.close(CLOSE_UNAUTHORIZED);
                    return;
                }
                // Access ends with the token: nothing more is delivered (every document is
                // left), and the client gets a short grace to `Reauth` (then resume) before
                // the connection closes.
                tracing::info!(session = peer.session, "token expired: unsubscribing, waiting for a reauth");
                expired = true;
                for doc in std::mem::take(&mut peer.docs) {
                    shared.rooms.get(&doc).leave(peer.session).await;
                }
                out.frame(error(ErrorCode::TokenExpired, None, None));
                expiry.as_mut().reset(tokio::time::Instant::now() + shared.config.token_grace);
                continue;
            }
            _ = ticker.tick() => {
                if last_heard.elapsed() > heartbeat * 3 {
                    tracing::info!(session = peer.session, "peer silent for three heartbeats: closing");
                    return;
                }
                nonce += 1;
                out.frame(ServerFrame::Ping { nonce }.encode());
                continue;
            }
            bytes = next_binary(stream) => match bytes {
                Some(bytes) => bytes,
                None => return,
            },
        };
        last_heard = Instant::now();
        limiter.charge_uncounted(stream.take_uncounted(), last_heard);
        if !limiter.allow(bytes.len(), last_heard) {
            // Refused, not silently dropped: a refused push is retried from the client's outbox.
            tracing::debug!(session = peer.session, "rate limited");
            out.frame(error(ErrorCode::RateLimited, None, None));
            continue;
        }
        let frame = match ClientFrame::decode(&bytes, shared.config.max_frame_size) {
            Ok(frame) => frame,
            Err(e) => {
                tracing::info!(session = peer.session, error = %e, "malformed frame");
                out.frame(error(ErrorCode::Malformed, None, None));
                continue;
            }
        };
        match frame {
            ClientFrame::Hello { .. } => {
                out.frame(error(ErrorCode::Malformed, None, None));
            }
            // Boxed, as every rarely used future holding store queries: a connection's task is
            // allocated at the size of its largest await, and sqlx futures are large, so
            // inlining them would make every idle connection pay for them.
            ClientFrame::Resume { docs } => Box::pin(resume(shared, out, peer, &mut limiter, docs)).await,
            ClientFrame::Push { doc, batch, update } => {
                if !peer.docs.contains(&doc) {
                    out.frame(error(ErrorCode::NotSubscribed, Some(doc), Some(batch)));
                    continue;
                }
                // Checked at every push: the token may have expired since the hello.
                if let Err(code) = peer.may_write(&doc) {
                    out.frame(error(code, Some(doc), Some(batch)));
                    continue;
                }
                let origin = Some(Origin {
                    client_id: peer.client_id,
                    batch,
                });
                let room = shared.rooms.get(&doc);
                let user = peer.grant.identity();
                match Box::pin(room.push(&*shared.store, &shared.committer, peer.session, user, origin, update)).await {
                    Ok(cursor) => out.frame(ServerFrame::Ack { doc, batch, cursor }.encode()),
                    Err(refused) => {
                        out.frame(error(refused.code, Some(doc), Some(batch)));
                        // A refusal that made the room reload its document: the sender pays.
                        if refused.reload_cost > 0 && !limiter.pay_reload(refused.reload_cost, Instant::now()) {
                            tracing::info!(
                                session = peer.session,
                                "too many refused updates costing reloads: closing"
                            );
                            out.ctl.close(CLOSE_PROTOCOL_ERROR);
                            return;
                        }
                        true
                    }
                };
            }
            ClientFrame::Unsubscribe { doc } => {
                if peer.docs.remove(&doc) {
                    shared.rooms.get(&doc).leave(peer.session).await;
                }
            }
            ClientFrame::Presence { doc, state } => {
                if !peer.docs.contains(&doc) {
                    out.frame(error(ErrorCode::NotSubscribed, Some(doc), None));
                    continue;
                }
                // Presence lives in the room's awareness table, shared with Yjs clients: it
                // expires unless refreshed and is removed when this connection leaves.
                if let Err(refused) = shared.rooms.get(&doc).presence(peer.session, &peer.user, state).await {
                    out.frame(error(refused.code, Some(doc), None));
                }
            }
            ClientFrame::Typing { doc, typing } => {
                let event = RoomEvent::Typing {
                    doc: doc.clone(),
                    peer: peer.session,
                    user: peer.user.clone(),
                    typing,
                };
                relay(shared, out, peer, doc, event).await;
            }
            ClientFrame::Ping { nonce } => {
                out.frame(ServerFrame::Pong { nonce }.encode());
            }
            ClientFrame::Reauth { token } => {
                if let Err(code) = reauth(shared, out, peer, &token).await {
                    tracing::info!(session = peer.session, ?code, "reauth refused");
                    out.frame(error(code, None, None));
                    out.ctl.close(CLOSE_UNAUTHORIZED);
                    return;
                }
                expired = false;
                expiry
                    .as_mut()
                    .reset(expiry_deadline(&peer.grant).unwrap_or_else(far_future));
            }
            ClientFrame::Pong { .. } => {}
        }
    }
}

/// When `grant` expires (it is valid through its `exp` second), on tokio's clock.
fn expiry_deadline(grant: &Grant) -> Option<tokio::time::Instant> {
    let exp = grant.expires_at?;
    let left = (exp + 1).saturating_sub(crate::auth::now_secs());
    Some(tokio::time::Instant::now() + std::time::Duration::from_secs(left))
}

/// A deadline that never comes in practice (a year away).
fn far_future() -> tokio::time::Instant {
    tokio::time::Instant::now() + std::time::Duration::from_secs(365 * 24 * 3600)
}

/// Replaces the peer's grant with `token`'s, which must name the same user. Documents the new
/// grant does not cover are unsubscribed, each with a `Forbidden` error.
async fn reauth<S: Store>(shared: &Shared<S>, out: &Outbound, peer: &mut Peer, token: &str) -> Result<(), ErrorCode> {
    let grant = shared.config.auth.verify(token)?;
    if grant.user != peer.grant.user {
        return Err(ErrorCode::Unauthorized);
    }
    peer.grant = grant;
    let lost: Vec<DocId> = peer
        .docs
        .iter()
        .filter(|doc| peer.grant.access(doc).is_none())
        .cloned()
        .collect();
    for doc in lost {
        peer.docs.remove(&doc);
        shared.rooms.get(&doc).leave(peer.session).await;
        out.frame(error(ErrorCode::Forbidden, Some(doc), None));
    }
    Ok(())
}

async fn relay<S: Store>(shared: &Shared<S>, out: &Outbound, peer: &Peer, doc: DocId, event: RoomEvent) {
    if peer.docs.contains(&doc) {
        shared.rooms.get(&doc).relay(peer.session, event).await;
    } else {
        out.frame(error(ErrorCode::NotSubscribed, Some(doc), None));
    }
}

/// One document of a resume, under its room's lock: what the client lacks, and the connection
/// subscribed to the room; or why the document is refused.
async fn answer_one<S: Store>(
    shared: &Shared<S>,
    out: &Outbound,
    session: u64,
    doc: &DocId,
    cursor: Cursor,
    state_vector: &[u8],
) -> Result<ResumeAnswer, ErrorCode> {
    let room = shared.rooms.get(doc);
    let mut guard = room.state.lock().await;
    let state = room.ensure_loaded(&mut guard, &*shared.store).await.map_err(|e| {
        tracing::error!(doc = %doc, error = %e, "refusing a document that failed to load");
        ErrorCode::LoadFailed
    })?;
    // The log is read only when the client is behind: an unchanged document costs nothing.
    // A client far behind gets the state diff straight away, as if the log were compacted:
    // reading and merging thousands of entries took over 100 ms for 10,000 B4 operations,
    // and the merged tail would exceed the diff anyway (answer_resume sends the smaller).
    let tail = if cursor == 0 || cursor >= state.head {
        Some(Vec::new())
    } else if state.head - cursor > MAX_TAIL_ENTRIES {
        None
    } else if let Some(entries) = state.recent_after(cursor) {
        Some(entries)
    } else {
        match shared.store.log_after(doc.as_str(), cursor).await {
            Ok(LogTail::Entries(entries)) => Some(entries),
            Ok(LogTail::Pruned) => None,
            Err(e) => {
                tracing::error!(doc = %doc, error = %e, "store failed reading the log");
                return Err(ErrorCode::StoreUnavailable);
            }
        }
    };
    let live = state.doc().ok_or(ErrorCode::LoadFailed)?;
    let answer = answer_resume(live, state.head, cursor, state_vector, tail.as_deref()).map_err(|e| {
        tracing::info!(doc = %doc, error = %e, "bad resume entry");
        ErrorCode::Malformed
    })?;
    state.subscribers.insert(session, Subscriber { out: out.clone() });
    Ok(answer)
}

/// Answers a resume: every listed document in one `Resumed` frame (split only if it would
/// exceed the frame size), subscribing the connection to each.
///
/// Updates to a document may be queued before the `Resumed` frame that covers it; clients apply
/// them at once but advance their stored cursor only once the document's `Resumed` arrived.
async fn resume<S: Store>(
    shared: &Shared<S>,
    out: &Outbound,
    peer: &mut Peer,
    limiter: &mut Limiter,
    docs: Vec<ResumeDoc>,
) {
    let mut answers = Vec::new();
    let mut resumed = Vec::new();
    let mut listed: HashSet<DocId> = HashSet::new();
    let mut size = 0usize;
    // The answer is sent as it is built, each frame — refusals of single documents included —
    // once the connection's queue has room: a peer that does not read stalls its own resume,
    // not the server's memory, and a long list of refusals never overflows the queue.
    let patience = shared.config.heartbeat * 3;
    for ResumeDoc {
        doc,
        cursor,
        state_vector,
    } in docs
    {
        // A document the token does not cover is refused alone; the others proceed.
        if let Err(code) = peer.may_read(&doc) {
            if !out.answer(error(code, Some(doc), None), patience).await {
                return;
            }
            continue;
        }
        // Listed twice in one resume: answering it twice would only cost the server.
        if !listed.insert(doc.clone()) {
            if !out.answer(error(ErrorCode::Malformed, Some(doc), None), patience).await {
                return;
            }
            continue;
        }
        if !peer.docs.contains(&doc) {
            if peer.docs.len() >= shared.config.max_docs_per_connection {
                if !out
                    .answer(error(ErrorCode::TooManyDocuments, Some(doc), None), patience)
                    .await
                {
                    return;
                }
                continue;
            }
            // Opening a room loads a document: paced per connection and per user.
            let now = Instant::now();
            let user_allows = |user| shared.opens.allow(&shared.config.room_opens, user, now);
            if !limiter.allow_open(now) || !peer.grant.identity().is_none_or(user_allows) {
                if !out
                    .answer(error(ErrorCode::RateLimited, Some(doc), None), patience)
                    .await
                {
                    return;
                }
                continue;
            }
        }
        // Under the room's lock; the answer (or refusal) is queued after it is released.
        let answer = match Box::pin(answer_one(shared, out, peer.session, &doc, cursor, &state_vector)).await {
            Ok(answer) => answer,
            Err(code) => {
                if !out.answer(error(code, Some(doc), None), patience).await {
                    return;
                }
                continue;
            }
        };
        peer.docs.insert(doc.clone());
        resumed.push(doc.clone());
        let mut entry = DocResumed {
            doc,
            cursor: answer.cursor,
            update: answer.update,
            state_vector: answer.state_vector,
        };
        // An answer too large for one frame goes ahead in pieces (`ResumePart`), each once the
        // queue has room; the entry then carries an empty update. (Only then: a client from
        // before `ResumePart` still gets every answer that fits a frame whole.)
        let piece = shared.config.max_frame_size / 2;
        let whole_fits = shared.config.max_frame_size.saturating_sub(RESUMED_OVERHEAD);
        if let Some(update) = entry.update.as_mut().filter(|update| update.len() > whole_fits) {
            let whole = std::mem::take(update);
            for bytes in whole.chunks(piece) {
                let frame = ServerFrame::ResumePart {
                    doc: entry.doc.clone(),
                    bytes: bytes.to_vec(),
                }
                .encode();
                limiter.charge(frame.len(), Instant::now());
                if !out.answer(frame, patience).await {
                    return;
                }
            }
        }
        let entry_size = entry.update.as_ref().map_or(0, Vec::len)
            + entry.state_vector.as_ref().map_or(0, Vec::len)
            + entry.doc.as_str().len()
            + 32;
        if size + entry_size > shared.config.max_frame_size / 2 && !answers.is_empty() {
            let frame = ServerFrame::Resumed {
                docs: std::mem::take(&mut answers),
            }
            .encode();
            // What the answer costs is charged to the asker's rate limit.
            limiter.charge(frame.len(), Instant::now());
            if !out.answer(frame, patience).await {
                return;
            }
            size = 0;
        }
        size += entry_size;
        answers.push(entry);
    }
    let frame = ServerFrame::Resumed { docs: answers }.encode();
    limiter.charge(frame.len(), Instant::now());
    if !out.answer(frame, patience).await {
        return;
    }
    // Then who is there: the current presence states of the resumed documents.
    for doc in resumed {
        shared.rooms.get(&doc).send_presence(peer.session).await;
    }
}
