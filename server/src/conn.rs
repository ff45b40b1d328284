//! One WebSocket connection of the native protocol: a reader loop (this task) and a writer task
//! draining the connection's bounded outbound queue. When either ends, the other is stopped.

use std::collections::HashSet;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use axum::extract::ws::{CloseFrame, Message, WebSocket};
use driftsync_engine::store::{Append, Appended, LogTail, Origin, Store};
use driftsync_engine::sync::{answer_resume, apply_remote, Applied};
use driftsync_protocol::{
    ClientFrame, DocId, DocResumed, ErrorCode, ResumeDoc, ServerFrame, CLOSE_PROTOCOL_ERROR, CLOSE_UNSUPPORTED_VERSION,
    PROTOCOL_VERSION,
};
use futures_util::{SinkExt, StreamExt};
use tokio::sync::mpsc;

use crate::room::{ConnCtl, Outbound, Subscriber};
use crate::Shared;

/// What the connection knows about its peer after the hello.
struct Peer {
    session: u64,
    client_id: u64,
    user: String,
    docs: HashSet<DocId>,
}

pub(crate) async fn run<S: Store>(shared: Arc<Shared<S>>, socket: WebSocket) {
    let (mut sink, mut stream) = socket.split();
    let (tx, mut rx) = mpsc::channel::<Vec<u8>>(shared.config.outbound_queue);
    let ctl = Arc::new(ConnCtl::new(shared.shutdown.child_token()));
    let out = Outbound {
        tx,
        ctl: Arc::clone(&ctl),
    };

    let writer_ctl = Arc::clone(&ctl);
    let writer = tokio::spawn(async move {
        loop {
            tokio::select! {
                biased;
                frame = rx.recv() => match frame {
                    Some(bytes) => {
                        if sink.send(Message::Binary(bytes.into())).await.is_err() {
                            writer_ctl.close(driftsync_protocol::CLOSE_GOING_AWAY);
                            return;
                        }
                    }
                    None => break,
                },
                () = writer_ctl.token.cancelled() => break,
            }
        }
        // Flush what is queued (acknowledgements matter), then say why we close.
        while let Ok(bytes) = rx.try_recv() {
            if sink.send(Message::Binary(bytes.into())).await.is_err() {
                return;
            }
        }
        let frame = CloseFrame {
            code: writer_ctl.code(),
            reason: "".into(),
        };
        let _ = sink.send(Message::Close(Some(frame))).await;
    });

    let session = shared.next_session.fetch_add(1, Ordering::Relaxed);
    let mut peer = None;
    match hello(&shared, &mut stream, &out, session).await {
        Ok(p) => peer = Some(p),
        Err(code) => ctl.close(code),
    }
    if let Some(peer) = peer.as_mut() {
        read_loop(&shared, &mut stream, &out, peer).await;
        leave_all(&shared, peer).await;
    }
    ctl.close(driftsync_protocol::CLOSE_GOING_AWAY);
    drop(out);
    let _ = writer.await;
}

async fn hello<S: Store>(
    shared: &Shared<S>,
    stream: &mut futures_util::stream::SplitStream<WebSocket>,
    out: &Outbound,
    session: u64,
) -> Result<Peer, u16> {
    let first = tokio::time::timeout(shared.config.hello_timeout, next_binary(stream)).await;
    let Ok(Some(bytes)) = first else {
        return Err(CLOSE_PROTOCOL_ERROR);
    };
    match ClientFrame::decode(&bytes, shared.config.max_frame_size) {
        Ok(ClientFrame::Hello { version, client_id, .. }) => {
            if version != PROTOCOL_VERSION {
                out.send(&error(ErrorCode::UnsupportedVersion, None, None));
                return Err(CLOSE_UNSUPPORTED_VERSION);
            }
            out.send(&ServerFrame::Welcome {
                version: PROTOCOL_VERSION,
                max_frame_size: u32::try_from(shared.config.max_frame_size).unwrap_or(u32::MAX),
                session,
                heartbeat_ms: u32::try_from(shared.config.heartbeat.as_millis()).unwrap_or(u32::MAX),
            });
            // This minimal server runs open: everyone is "anonymous" unless tokens say otherwise.
            Ok(Peer {
                session,
                client_id,
                user: format!("anonymous-{session}"),
                docs: HashSet::new(),
            })
        }
        Ok(_) => {
            out.send(&error(ErrorCode::Malformed, None, None));
            Err(CLOSE_PROTOCOL_ERROR)
        }
        Err(e) => {
            tracing::info!(session, error = %e, "bad hello");
            out.send(&error(ErrorCode::Malformed, None, None));
            Err(CLOSE_PROTOCOL_ERROR)
        }
    }
}

/// The next binary message, skipping WebSocket pings; `None` at close or error.
async fn next_binary(stream: &mut futures_util::stream::SplitStream<WebSocket>) -> Option<Vec<u8>> {
    loop {
        match stream.next().await? {
            Ok(Message::Binary(bytes)) => return Some(bytes.to_vec()),
            Ok(Message::Close(_)) | Err(_) => return None,
            Ok(_) => continue,
        }
    }
}

fn error(code: ErrorCode, doc: Option<DocId>, batch: Option<u64>) -> ServerFrame {
    ServerFrame::Error { code, doc, batch }
}

async fn read_loop<S: Store>(
    shared: &Shared<S>,
    stream: &mut futures_util::stream::SplitStream<WebSocket>,
    out: &Outbound,
    peer: &mut Peer,
) {
    let heartbeat = shared.config.heartbeat;
    let mut ticker = tokio::time::interval(heartbeat);
    ticker.tick().await;
    let mut last_heard = Instant::now();
    let mut nonce = 0u64;
    loop {
        let bytes = tokio::select! {
            () = out.ctl.token.cancelled() => return,
            _ = ticker.tick() => {
                if last_heard.elapsed() > heartbeat * 3 {
                    tracing::info!(session = peer.session, "peer silent for three heartbeats: closing");
                    return;
                }
                nonce += 1;
                out.send(&ServerFrame::Ping { nonce });
                continue;
            }
            bytes = next_binary(stream) => match bytes {
                Some(bytes) => bytes,
                None => return,
            },
        };
        last_heard = Instant::now();
        let frame = match ClientFrame::decode(&bytes, shared.config.max_frame_size) {
            Ok(frame) => frame,
            Err(e) => {
                tracing::info!(session = peer.session, error = %e, "malformed frame");
                out.send(&error(ErrorCode::Malformed, None, None));
                continue;
            }
        };
        match frame {
            ClientFrame::Hello { .. } => {
                out.send(&error(ErrorCode::Malformed, None, None));
            }
            ClientFrame::Resume { docs } => resume(shared, out, peer, docs).await,
            ClientFrame::Push { doc, batch, update } => push(shared, out, peer, doc, batch, update).await,
            ClientFrame::Unsubscribe { doc } => {
                if peer.docs.remove(&doc) {
                    leave(shared, peer.session, &doc).await;
                }
            }
            ClientFrame::Presence { doc, state } => {
                relay(
                    shared,
                    out,
                    peer,
                    &doc,
                    ServerFrame::Presence {
                        doc: doc.clone(),
                        peer: peer.session,
                        user: peer.user.clone(),
                        state,
                    },
                )
                .await
            }
            ClientFrame::Typing { doc, typing } => {
                relay(
                    shared,
                    out,
                    peer,
                    &doc,
                    ServerFrame::Typing {
                        doc: doc.clone(),
                        peer: peer.session,
                        user: peer.user.clone(),
                        typing,
                    },
                )
                .await
            }
            ClientFrame::Ping { nonce } => {
                out.send(&ServerFrame::Pong { nonce });
            }
            ClientFrame::Pong { .. } | ClientFrame::Reauth { .. } => {}
        }
    }
}

/// Answers a resume: every listed document in one `Resumed` frame (split only if it would
/// exceed the frame size), subscribing the connection to each.
async fn resume<S: Store>(shared: &Shared<S>, out: &Outbound, peer: &mut Peer, docs: Vec<ResumeDoc>) {
    let mut answers = Vec::with_capacity(docs.len());
    let mut size = 0usize;
    for ResumeDoc {
        doc,
        cursor,
        state_vector,
    } in docs
    {
        if !peer.docs.contains(&doc) && peer.docs.len() >= shared.config.max_docs_per_connection {
            out.send(&error(ErrorCode::TooManyDocuments, Some(doc), None));
            continue;
        }
        let room = shared.rooms.get(doc.as_str());
        let mut guard = room.state.lock().await;
        let state = match room.ensure_loaded(&mut guard, &shared.store).await {
            Ok(state) => state,
            Err(e) => {
                tracing::error!(doc = %doc, error = %e, "refusing a document that failed to load");
                out.send(&error(ErrorCode::LoadFailed, Some(doc), None));
                continue;
            }
        };
        let tail = if cursor == state.head || cursor == 0 || cursor > state.head {
            Some(Vec::new())
        } else {
            match shared.store.log_after(doc.as_str(), cursor).await {
                Ok(LogTail::Entries(entries)) => Some(entries),
                Ok(LogTail::Pruned) => None,
                Err(e) => {
                    tracing::error!(doc = %doc, error = %e, "store failed reading the log");
                    out.send(&error(ErrorCode::StoreUnavailable, Some(doc), None));
                    continue;
                }
            }
        };
        let answer = match answer_resume(&state.doc, state.head, cursor, &state_vector, tail.as_deref()) {
            Ok(answer) => answer,
            Err(e) => {
                tracing::info!(doc = %doc, error = %e, "bad resume entry");
                out.send(&error(ErrorCode::Malformed, Some(doc), None));
                continue;
            }
        };
        state.subscribers.insert(
            peer.session,
            Subscriber {
                user: peer.user.clone(),
                out: out.clone(),
            },
        );
        drop(guard);
        peer.docs.insert(doc.clone());
        let entry = DocResumed {
            doc,
            cursor: answer.cursor,
            update: answer.update,
            state_vector: answer.state_vector,
        };
        let entry_size = entry.update.as_ref().map_or(0, Vec::len) + entry.doc.as_str().len() + 32;
        if size + entry_size > shared.config.max_frame_size / 2 && !answers.is_empty() {
            out.send(&ServerFrame::Resumed {
                docs: std::mem::take(&mut answers),
            });
            size = 0;
        }
        size += entry_size;
        answers.push(entry);
    }
    out.send(&ServerFrame::Resumed { docs: answers });
}

/// Applies, stores, broadcasts and acknowledges one pushed batch.
async fn push<S: Store>(shared: &Shared<S>, out: &Outbound, peer: &Peer, doc: DocId, batch: u64, update: Vec<u8>) {
    if !peer.docs.contains(&doc) {
        out.send(&error(ErrorCode::NotSubscribed, Some(doc), Some(batch)));
        return;
    }
    let room = shared.rooms.get(doc.as_str());
    let mut guard = room.state.lock().await;
    let state = match room.ensure_loaded(&mut guard, &shared.store).await {
        Ok(state) => state,
        Err(e) => {
            tracing::error!(doc = %doc, error = %e, "document failed to load");
            out.send(&error(ErrorCode::LoadFailed, Some(doc), Some(batch)));
            return;
        }
    };
    // Validate by applying: an update that yrs cannot take is refused whole and never stored.
    match apply_remote(&state.doc, &update, &shared.config.limits) {
        Ok(Applied::Integrated) => {}
        Ok(Applied::Pending { missing, .. }) => {
            // The server never holds updates with missing dependencies (see engine::sync):
            // refuse it and reload the live document, which now holds it, from the store.
            tracing::info!(doc = %doc, batch, ?missing, "refusing an update with missing dependencies");
            room.reload(&mut guard, &shared.store).await;
            out.send(&error(ErrorCode::MissingDependencies, Some(doc), Some(batch)));
            return;
        }
        Err(e) => {
            tracing::info!(doc = %doc, batch, error = %e, "refusing an update");
            let code = match e {
                driftsync_engine::Error::TooManyPending { .. } => ErrorCode::TooManyPending,
                _ => ErrorCode::InvalidUpdate,
            };
            out.send(&error(code, Some(doc), Some(batch)));
            return;
        }
    }
    let append = Append {
        doc: doc.as_str().to_string(),
        origin: Some(Origin {
            client_id: peer.client_id,
            batch,
        }),
        update,
    };
    let appended = match shared.store.append(std::slice::from_ref(&append)).await {
        Ok(mut results) => results.pop(),
        Err(e) => {
            // The live document now holds an update the store does not: reload it from the
            // store, so that nothing unacknowledged is ever served as stored.
            tracing::error!(doc = %doc, error = %e, "store failed; batch not acknowledged");
            room.reload(&mut guard, &shared.store).await;
            out.send(&error(ErrorCode::StoreUnavailable, Some(doc), Some(batch)));
            return;
        }
    };
    match appended {
        Some(Appended::Stored(cursor)) => {
            state.head = cursor;
            state.broadcast(
                peer.session,
                &ServerFrame::Update {
                    doc: doc.clone(),
                    cursor,
                    update: append.update,
                },
            );
            out.send(&ServerFrame::Ack { doc, batch, cursor });
        }
        Some(Appended::Duplicate(cursor)) => {
            out.send(&ServerFrame::Ack { doc, batch, cursor });
        }
        None => {
            out.send(&error(ErrorCode::Internal, Some(doc), Some(batch)));
        }
    }
}

async fn relay<S: Store>(shared: &Shared<S>, out: &Outbound, peer: &Peer, doc: &DocId, frame: ServerFrame) {
    if !peer.docs.contains(doc) {
        out.send(&error(ErrorCode::NotSubscribed, Some(doc.clone()), None));
        return;
    }
    let room = shared.rooms.get(doc.as_str());
    let mut guard = room.state.lock().await;
    if let Some(state) = guard.as_mut() {
        state.broadcast(peer.session, &frame);
    }
}

async fn leave<S: Store>(shared: &Shared<S>, session: u64, doc: &DocId) {
    let room = shared.rooms.get(doc.as_str());
    let mut guard = room.state.lock().await;
    if let Some(state) = guard.as_mut() {
        if let Some(sub) = state.subscribers.remove(&session) {
            // Announce the departure so no ghost presence remains.
            state.broadcast(
                session,
                &ServerFrame::Presence {
                    doc: doc.clone(),
                    peer: session,
                    user: sub.user,
                    state: None,
                },
            );
        }
    }
}

async fn leave_all<S: Store>(shared: &Shared<S>, peer: &Peer) {
    for doc in &peer.docs {
        leave(shared, peer.session, doc).await;
    }
}
