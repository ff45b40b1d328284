//! Rooms: one live yrs document per active document id, shared by every connection subscribed
//! to it whatever its protocol, with the document's head cursor and its subscribers' queues.
//!
//! Everything done to a document goes through its room's async mutex, so updates are applied,
//! broadcast and stored in cursor order (an update reaches the other subscribers before its
//! commit; see [`Room::push`]). The room also holds the document's presence (see
//! [`crate::presence`]), shared by native and Yjs connections.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU16, Ordering};
use std::sync::{Arc, Mutex, OnceLock, PoisonError};
use std::time::Instant;

use axum::body::Bytes;
use driftsync_engine::chat::ChatGuard;
use driftsync_engine::doc::load_document;
use driftsync_engine::store::{Append, Appended, CompactionPolicy, LogEntry, LogTail, Origin, Store};
use driftsync_engine::sync::{apply_checked, apply_remote, check_push, Applied, Limits, MAX_SQUASH_WORK};
use driftsync_protocol::yjs::AwarenessEntry;
use driftsync_protocol::{Cursor, DocId, ErrorCode, CLOSE_RESYNC};
use tokio_util::sync::CancellationToken;
use yrs::Doc;

use crate::commit::Committer;
use crate::fanout::{Fanout, FanoutEvent};
use crate::metrics::Metrics;
use crate::owners::{Owners, Ownership};
use crate::presence::{now_ms, InvalidState, Presence};
use crate::queue;

/// The server's documents never edit; any valid client id will do for them.
const SERVER_CLIENT_ID: u64 = 1;

/// A session id no connection has (they start at 1): broadcasting "to everyone but it" reaches
/// every subscriber.
const NO_SESSION: u64 = 0;

/// The "session" of events that came from another instance: broadcasting them reaches every
/// local subscriber and never publishes them again (no loops between instances).
const REMOTE_SESSION: u64 = u64::MAX;

/// The registry of rooms.
pub(crate) struct Rooms {
    map: Mutex<HashMap<String, Arc<Room>>>,
    /// What every room shares with the rest of the server.
    ctx: Arc<RoomCtx>,
}

/// What rooms share: metrics, the fan-out to other instances, client id ownership.
pub(crate) struct RoomCtx {
    pub(crate) metrics: Arc<Metrics>,
    pub(crate) fanout: Arc<dyn Fanout>,
    /// This instance's id on the fan-out.
    pub(crate) instance: u64,
    /// Who owns which yrs client id (see [`crate::owners`]).
    pub(crate) owners: Arc<Owners>,
    /// The largest a document may grow, in stored bytes (snapshot and log); a push beyond it is
    /// refused with [`ErrorCode::DocumentTooLarge`].
    pub(crate) max_document_bytes: u64,
    /// How far ahead of the server's clock a new chat message's stamp may be.
    pub(crate) max_clock_skew_ms: u64,
}

impl Rooms {
    pub(crate) fn new(ctx: RoomCtx) -> Self {
        Rooms {
            map: Mutex::default(),
            ctx: Arc::new(ctx),
        }
    }

    /// What every room shares.
    pub(crate) fn ctx(&self) -> &RoomCtx {
        &self.ctx
    }

    /// The room for `id`, created (not yet loaded) on first use.
    pub(crate) fn get(&self, id: &DocId) -> Arc<Room> {
        let mut map = self.map.lock().unwrap_or_else(PoisonError::into_inner);
        Arc::clone(map.entry(id.as_str().to_string()).or_insert_with(|| {
            Arc::new(Room {
                id: id.clone(),
                state: Default::default(),
                ctx: Arc::clone(&self.ctx),
            })
        }))
    }

    /// The room for `id` if it exists.
    fn existing(&self, id: &DocId) -> Option<Arc<Room>> {
        self.map
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(id.as_str())
            .cloned()
    }

    /// Takes in an update another instance stored (see [`crate::fanout`]). Only a loaded room
    /// cares: an unloaded one will read it from the store when it loads.
    pub(crate) async fn remote_update<S: Store>(&self, store: &S, doc: &DocId, cursor: Cursor, update: &[u8]) {
        let Some(room) = self.existing(doc) else { return };
        let mut guard = room.state.lock().await;
        let Some(state) = guard.as_mut() else { return };
        if cursor <= state.head {
            return;
        }
        // Updates between our head and this one were missed (or are still on their way): read
        // them from the shared store, so subscribers get every update in cursor order.
        let entries = if cursor == state.head + 1 {
            vec![LogEntry {
                cursor,
                update: update.to_vec(),
            }]
        } else {
            match store.log_after(doc.as_str(), state.head).await {
                Ok(LogTail::Entries(entries)) => entries,
                Ok(LogTail::Pruned) | Err(_) => {
                    tracing::warn!(doc = %doc, "fan-out gap not in the log: reloading the room");
                    room.reload(&mut guard, store).await;
                    if let Some(state) = guard.as_mut() {
                        for sub in state.subscribers.values() {
                            sub.out.ctl.close(CLOSE_RESYNC);
                        }
                    }
                    return;
                }
            }
        };
        state.take_stored(doc, entries);
    }

    /// Passes presence from another instance to the local subscribers of a loaded room.
    pub(crate) async fn remote_presence(
        &self,
        doc: &DocId,
        peer: u64,
        user: String,
        clock: u64,
        state: Option<String>,
    ) {
        let Some(room) = self.existing(doc) else { return };
        let mut guard = room.state.lock().await;
        if let Some(local) = guard.as_mut() {
            let event = RoomEvent::Presence {
                doc: doc.clone(),
                peer,
                user,
                clock,
                state,
            };
            local.broadcast(REMOTE_SESSION, event);
        }
    }

    /// Compacts the logs of loaded rooms that grew, evicts the live documents of subscribed rooms
    /// unused since the previous sweep, and unloads rooms nobody has been subscribed to for two
    /// sweeps in a row. Only a room nothing else holds is removed (checked under the
    /// map lock), so a document never has two live rooms. Every acknowledged write is already
    /// committed, so unloading flushes nothing.
    pub(crate) async fn sweep<S: Store>(&self, store: &S, policy: &CompactionPolicy) {
        let rooms: Vec<Arc<Room>> = self
            .map
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .values()
            .cloned()
            .collect();
        for room in rooms {
            let grown = {
                let Ok(mut guard) = room.state.try_lock() else { continue };
                if let Err(e) = room.flush_unstored(&mut guard, store).await {
                    tracing::warn!(doc = %room.id, error = %e, "storing changes whose commit failed earlier failed again");
                }
                let Some(state) = guard.as_mut() else { continue };
                if !state.subscribers.is_empty() {
                    if state.active {
                        state.active = false;
                    } else if state.live.is_some() && state.unstored.is_empty() {
                        // Subscribed, but nobody wrote to it or resumed it for a whole sweep
                        // interval. (A room without subscribers is unloaded below instead.)
                        state.evict();
                        tracing::debug!(doc = %room.id, "evicted the live document of an idle room");
                    }
                }
                if state.head > state.checked_head {
                    state.checked_head = state.head;
                    true
                } else {
                    false
                }
            };
            if grown {
                compact_if_due(store, room.id.as_str(), policy, &self.ctx.metrics).await;
            }
        }
        let mut unloaded = Vec::new();
        self.map
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .retain(|_, room| {
                if Arc::strong_count(room) > 1 {
                    return true;
                }
                let Ok(mut guard) = room.state.try_lock() else {
                    return true;
                };
                match guard.as_mut() {
                    None => false,
                    Some(state) if state.subscribers.is_empty() && state.unstored.is_empty() => {
                        state.idle_sweeps += 1;
                        if state.idle_sweeps >= 2 {
                            *guard = None;
                            self.ctx.metrics.rooms.dec();
                            unloaded.push(room.id.clone());
                            false
                        } else {
                            true
                        }
                    }
                    Some(state) => {
                        state.idle_sweeps = 0;
                        true
                    }
                }
            });
        // A room going idle is the moment to fold its log: the next load reads the snapshot.
        for id in unloaded {
            compact_grown(store, &id, policy).await;
        }
    }

    /// At shutdown: folds into its snapshot the log of every room in memory that grew by at
    /// least `policy.min_log_bytes` since its snapshot (whether or not the log outgrew the
    /// snapshot, which is when the sweeps compact), so that the next start loads snapshots
    /// instead of replaying logs. Rooms unloaded by a sweep were compacted the same way.
    pub(crate) async fn compact_at_shutdown<S: Store>(&self, store: &S, policy: &CompactionPolicy) {
        let ids: Vec<DocId> = self
            .map
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .values()
            .map(|room| room.id.clone())
            .collect();
        for id in ids {
            compact_grown(store, &id, policy).await;
        }
    }

    /// Removes and announces the presence states of every loaded room not refreshed in time.
    /// A room busy right now (a commit in flight) is left for the next sweep.
    pub(crate) async fn expire_presence(&self, now_ms: u64) {
        let rooms: Vec<Arc<Room>> = self
            .map
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .values()
            .cloned()
            .collect();
        for room in rooms {
            let Ok(mut guard) = room.state.try_lock() else { continue };
            if let Some(state) = guard.as_mut() {
                for event in state.presence.expire(&room.id, now_ms) {
                    state.broadcast(NO_SESSION, event);
                }
            }
        }
    }
}

/// One document's live state.
pub(crate) struct Room {
    pub(crate) id: DocId,
    pub(crate) state: tokio::sync::Mutex<Option<RoomState>>,
    ctx: Arc<RoomCtx>,
}

/// A loaded room.
pub(crate) struct RoomState {
    /// The live document; `None` while evicted: a subscribed room nobody wrote to or resumed
    /// for a whole sweep interval keeps its subscribers and presence but not its yrs document
    /// (whose heap is 10-15 times its encoded size), and reloads it from the store on next use.
    live: Option<Doc>,
    /// The newest stored updates, oldest first, contiguous and ending at `head`: resumes of
    /// clients slightly behind are answered from here instead of reading the log.
    recent: VecDeque<LogEntry>,
    /// Bytes of update in `recent`.
    recent_bytes: usize,
    /// Whether the room was used since the last sweep.
    active: bool,
    /// Cursor of the last update stored for this document.
    pub(crate) head: Cursor,
    /// Stored bytes of the document (its snapshot and log when loaded, plus what was stored
    /// since): checked against [`RoomCtx::max_document_bytes`] before a push is applied.
    stored_bytes: u64,
    /// Updates the live document holds that were broadcast but whose commit failed, oldest
    /// first: the room stores them itself, before anything else, at its next use or sweep (see
    /// [`Room::flush_unstored`]). At most [`MAX_UNSTORED_BYTES`].
    unstored: Vec<Vec<u8>>,
    pub(crate) subscribers: HashMap<u64, Subscriber>,
    /// Presence and awareness states of both protocols' connections.
    pub(crate) presence: Presence,
    /// In a chat room ([`crate::CHAT_PREFIX`]), the guard watching `doc` for the chat rules.
    pub(crate) chat: Option<ChatGuard>,
    /// What the room shares with the server (fan-out, metrics).
    pub(crate) ctx: Arc<RoomCtx>,
    /// The head when the sweeper last considered compacting the log.
    pub(crate) checked_head: Cursor,
    /// Consecutive sweeps that found the room without subscribers.
    pub(crate) idle_sweeps: u8,
}

/// A connection subscribed to a room.
pub(crate) struct Subscriber {
    pub(crate) out: Outbound,
}

/// What a room sends its subscribers. Each connection's writer encodes it for its protocol.
#[derive(Debug)]
pub(crate) enum RoomEvent {
    /// An update stored at `cursor`.
    Update {
        doc: DocId,
        cursor: Cursor,
        update: Vec<u8>,
    },
    /// An awareness client's presence changed (`None`: it left or expired). `peer` is the
    /// awareness client id: a native connection's session id, or a Yjs client id; `clock` is its
    /// awareness clock.
    Presence {
        doc: DocId,
        peer: u64,
        user: String,
        clock: u64,
        state: Option<String>,
    },
    /// A connection started or stopped typing.
    Typing {
        doc: DocId,
        peer: u64,
        user: String,
        typing: bool,
    },
}

/// The protocols a room event is encoded for; indexes [`SharedEvent`]'s cache.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Protocol {
    Native = 0,
    Yjs = 1,
}

/// A room event as every subscriber shares it, with its encoding cached per protocol: a
/// broadcast to N connections encodes the frame once per protocol, not N times, and every
/// connection's writer sends the same bytes.
#[derive(Debug)]
pub(crate) struct SharedEvent {
    pub(crate) event: RoomEvent,
    encoded: [OnceLock<Option<Bytes>>; 2],
}

impl SharedEvent {
    pub(crate) fn new(event: RoomEvent) -> Arc<Self> {
        Arc::new(SharedEvent {
            event,
            encoded: [OnceLock::new(), OnceLock::new()],
        })
    }

    /// The event encoded by `encode` for `protocol` (`None`: not sent in that protocol),
    /// encoded on first use.
    pub(crate) fn encoded(&self, protocol: Protocol, encode: fn(&RoomEvent) -> Option<Vec<u8>>) -> Option<Bytes> {
        self.encoded[protocol as usize]
            .get_or_init(|| encode(&self.event).map(Bytes::from))
            .clone()
    }
}

/// What goes into a connection's queue.
#[derive(Debug)]
pub(crate) enum Outgoing {
    /// Bytes already encoded for this connection's protocol.
    Frame(Vec<u8>),
    /// A room event, shared by every subscriber.
    Event(Arc<SharedEvent>),
    /// A WebSocket ping frame: Yjs clients answer those, not protocol pings.
    Ping,
    /// A WebSocket pong frame answering the peer's ping, with its payload.
    Pong(Vec<u8>),
}

/// Why a push was refused.
#[derive(Debug)]
pub(crate) struct Refused {
    pub(crate) code: ErrorCode,
    /// The stored bytes of the document the room had to reload because of the refused update
    /// (0: no reload). A reload costs the whole document, so the sender pays for it: the
    /// connection charges it to its rate limit and closes a peer that keeps causing them.
    pub(crate) reload_cost: u64,
}

impl Refused {
    fn new(code: ErrorCode) -> Self {
        Refused { code, reload_cost: 0 }
    }
}

impl Room {
    /// Loads the room from the store if it is not loaded yet. A load failure refuses the room:
    /// it is never served (nor later stored) as an empty document.
    pub(crate) async fn ensure_loaded<'a, S: Store>(
        &self,
        state: &'a mut Option<RoomState>,
        store: &S,
    ) -> driftsync_engine::Result<&'a mut RoomState> {
        if state.is_none() {
            let (doc, head, stored_bytes) = self.load(store).await?;
            let chat = self.chat_guard(&doc);
            *state = Some(RoomState {
                live: Some(doc),
                recent: VecDeque::new(),
                recent_bytes: 0,
                active: true,
                head,
                stored_bytes,
                unstored: Vec::new(),
                subscribers: HashMap::new(),
                presence: Presence::default(),
                chat,
                checked_head: head,
                idle_sweeps: 0,
                ctx: Arc::clone(&self.ctx),
            });
            self.ctx.metrics.rooms.inc();
        }
        let loaded = state
            .as_mut()
            .ok_or_else(|| driftsync_engine::Error::Invalid("room state vanished".into()))?;
        loaded.active = true;
        if loaded.live.is_none() {
            // Evicted while idle: every update is stored, so the store has exactly the document.
            let (doc, head, stored_bytes) = self.load(store).await?;
            self.install(loaded, doc, head, stored_bytes);
        }
        if !loaded.unstored.is_empty() {
            // Broadcast changes whose commit failed: store them before anything else happens.
            if let Err(e) = self.flush_unstored(state, store).await {
                tracing::warn!(doc = %self.id, error = %e, "storing changes whose commit failed earlier failed again");
            }
        }
        state
            .as_mut()
            .ok_or_else(|| driftsync_engine::Error::Invalid("room state vanished".into()))
    }

    /// Loads the document: its yrs document, head cursor and stored bytes.
    async fn load<S: Store>(&self, store: &S) -> driftsync_engine::Result<(Doc, Cursor, u64)> {
        let stored = store.load(self.id.as_str()).await?.unwrap_or_default();
        let bytes = stored.snapshot.as_ref().map_or(0, Vec::len)
            + stored.tail.iter().map(|entry| entry.update.len()).sum::<usize>();
        let doc = load_document(self.id.as_str(), &stored, SERVER_CLIENT_ID)?;
        Ok((doc, stored.head, bytes as u64))
    }

    /// Makes `doc`, loaded from the store at `head`, the room's live document. The window of
    /// recent updates stays only if the store holds nothing newer than it.
    fn install(&self, state: &mut RoomState, doc: Doc, head: Cursor, stored_bytes: u64) {
        state.chat = self.chat_guard(&doc);
        state.live = Some(doc);
        state.stored_bytes = stored_bytes;
        // What the store holds replaces everything: changes it lacks are gone from the room.
        state.unstored.clear();
        if head != state.head {
            state.recent.clear();
            state.recent_bytes = 0;
            state.head = head;
        }
    }

    /// The guard of a chat room's live document; `None` for other documents.
    fn chat_guard(&self, doc: &Doc) -> Option<ChatGuard> {
        self.id
            .as_str()
            .starts_with(crate::CHAT_PREFIX)
            .then(|| ChatGuard::attach(doc).with_max_clock_skew(self.ctx.max_clock_skew_ms))
    }

    /// Replaces the live document with what the store holds, keeping the subscribers. Used when
    /// the live document may hold something that is not stored (a refused update, a failed
    /// commit). If the reload fails, every subscriber is told to resync and the room is unloaded.
    pub(crate) async fn reload<S: Store>(&self, state: &mut Option<RoomState>, store: &S) {
        match (self.load(store).await, state.as_mut()) {
            (Ok((doc, head, bytes)), Some(live)) => self.install(live, doc, head, bytes),
            (Ok(_), None) => {}
            (Err(e), _) => {
                tracing::error!(doc = %self.id, error = %e, "reload failed; unloading the room");
                if let Some(live) = state.take() {
                    for sub in live.subscribers.values() {
                        sub.out.ctl.close(CLOSE_RESYNC);
                    }
                }
            }
        }
    }

    /// Validates, durably stores and broadcasts one update from connection `session`, written
    /// by `user` (`None`: not authenticated, on an open server). Returns the cursor it is stored
    /// at (for a re-sent batch, the original's or a later one).
    ///
    /// Nothing is stored unless yrs integrates the update completely and, in a chat room, the
    /// update follows the chat rules for `user` (else it is refused whole with
    /// [`ErrorCode::SchemaViolation`]). The other subscribers get it once it is validated, before
    /// its commit; nothing is acknowledged before the group commit that stores it has finished.
    #[allow(clippy::too_many_arguments)]
    pub(crate) async fn push<S: Store>(
        &self,
        store: &S,
        committer: &Committer,
        session: u64,
        user: Option<&str>,
        origin: Option<Origin>,
        update: Vec<u8>,
    ) -> Result<Cursor, Refused> {
        let received = Instant::now();
        self.ctx.metrics.updates_in.inc();
        self.ctx.metrics.bytes_in.inc_by(update.len() as u64);
        let result = self.push_inner(store, committer, session, user, origin, update).await;
        match &result {
            Ok(_) => self.ctx.metrics.ack_latency.observe(received.elapsed().as_secs_f64()),
            Err(_) => {
                self.ctx.metrics.refused.inc();
            }
        }
        result
    }

    #[allow(clippy::too_many_arguments)]
    async fn push_inner<S: Store>(
        &self,
        store: &S,
        committer: &Committer,
        session: u64,
        user: Option<&str>,
        origin: Option<Origin>,
        update: Vec<u8>,
    ) -> Result<Cursor, Refused> {
        let mut guard = self.state.lock().await;
        let state = match self.ensure_loaded(&mut guard, store).await {
            Ok(state) => state,
            Err(e) => {
                tracing::error!(doc = %self.id, error = %e, "document failed to load");
                self.ctx.metrics.store_errors.inc();
                return Err(Refused::new(ErrorCode::LoadFailed));
            }
        };
        if !state.unstored.is_empty() {
            // A change broadcast earlier is still not stored (ensure_loaded just failed to store
            // it): nothing may be stored after it, and the store is failing anyway.
            return Err(Refused::new(ErrorCode::StoreUnavailable));
        }
        // Refused before anything is applied: a refusal after applying costs a reload.
        if state.stored_bytes + update.len() as u64 > self.ctx.max_document_bytes {
            // Compaction may have shrunk it since it was loaded: look again before refusing.
            if let Ok(Some(meta)) = store.meta(self.id.as_str()).await {
                state.stored_bytes = meta.snapshot_bytes + meta.log_bytes;
            }
        }
        if state.stored_bytes + update.len() as u64 > self.ctx.max_document_bytes {
            tracing::info!(doc = %self.id, bytes = state.stored_bytes, "refusing an update: the document is at its maximum size");
            return Err(Refused::new(ErrorCode::DocumentTooLarge));
        }
        let Some(doc) = state.live.as_ref() else {
            return Err(Refused::new(ErrorCode::LoadFailed));
        };
        // Decoded and checked before anything is applied: a refusal here costs nobody else.
        let checked = check_push(doc, &update).map_err(|e| {
            tracing::info!(doc = %self.id, error = %e, "refusing an invalid update");
            Refused::new(ErrorCode::InvalidUpdate)
        })?;
        if checked.squash_work > MAX_SQUASH_WORK {
            // Integrating it would cost yrs quadratic time and memory (see MAX_SQUASH_WORK).
            tracing::info!(doc = %self.id, work = checked.squash_work, "refusing an update too costly to integrate");
            return Err(Refused::new(ErrorCode::InvalidUpdate));
        }
        if !checked.complete {
            tracing::info!(doc = %self.id, "refusing an update with missing dependencies");
            return Err(Refused::new(ErrorCode::MissingDependencies));
        }
        if let Some(user) = user {
            // Authorship: new structs under a client id only from its owner.
            for &client in &checked.writers {
                match self.ctx.owners.claim(store, client, user).await {
                    Ok(Ownership::Mine) => {}
                    Ok(Ownership::Taken) => {
                        tracing::info!(doc = %self.id, user, client, "refusing an update under another user's client id");
                        return Err(Refused::new(ErrorCode::ClientIdTaken));
                    }
                    Err(e) => {
                        tracing::error!(doc = %self.id, error = %e, "store failed binding a client id");
                        self.ctx.metrics.store_errors.inc();
                        return Err(Refused::new(ErrorCode::StoreUnavailable));
                    }
                }
            }
        }
        if let Some(chat) = &state.chat {
            chat.reset();
        }
        let Some(doc) = state.live.as_ref() else {
            return Err(Refused::new(ErrorCode::LoadFailed));
        };
        let changed = match apply_checked(doc, &update) {
            Ok(Applied::Integrated) => true,
            Ok(Applied::Unchanged) => false,
            Ok(Applied::Pending { missing, .. }) => {
                // The server never holds updates with missing dependencies (see engine::sync):
                // refuse it and reload the live document, which now holds it, from the store.
                tracing::info!(doc = %self.id, ?missing, "refusing an update with missing dependencies");
                let reload_cost = state.stored_bytes;
                self.reload(&mut guard, store).await;
                return Err(Refused {
                    code: ErrorCode::MissingDependencies,
                    reload_cost,
                });
            }
            Err(e) => {
                tracing::info!(doc = %self.id, error = %e, "refusing an update");
                return Err(match e {
                    driftsync_engine::Error::TooManyPending { .. } => Refused::new(ErrorCode::TooManyPending),
                    // yrs may have applied part of it before failing: reload what is stored.
                    _ => {
                        let reload_cost = state.stored_bytes;
                        self.reload(&mut guard, store).await;
                        Refused {
                            code: ErrorCode::InvalidUpdate,
                            reload_cost,
                        }
                    }
                });
            }
        };
        if let Some(Err(violation)) = state
            .chat
            .as_ref()
            .map(|chat| chat.check(user, crate::presence::unix_ms()))
        {
            // The live document holds the refused update: reload it from the store.
            tracing::info!(doc = %self.id, ?user, %violation, "refusing an update that breaks the chat rules");
            let reload_cost = state.stored_bytes;
            self.reload(&mut guard, store).await;
            return Err(Refused {
                code: ErrorCode::SchemaViolation,
                reload_cost,
            });
        }
        if !changed {
            // The document held all of it already (a re-sent batch, an echo), and the store
            // holds everything the live document does: nothing to store, nothing to pass on.
            // Acknowledged at the head, which covers it.
            return Ok(state.head);
        }
        // The other local subscribers get the update now, while it is being committed: the
        // durable commit (an fsync) stays out of their latency. Only the pusher's `Ack` waits
        // for it. The cursor they get is the head before this update — every update logged up
        // to it has been sent to them — so a subscriber never holds a cursor the store has not
        // assigned; it reaches this update's cursor with the next update or resume. Should the
        // commit fail, the room keeps the update and stores it itself before anything else
        // (`unstored`): they never hold a change the server will not store while it runs.
        let event = RoomEvent::Update {
            doc: self.id.clone(),
            cursor: state.head,
            update: update.clone(),
        };
        state.broadcast(session, event);
        let append = Append {
            doc: self.id.as_str().to_string(),
            origin,
            update,
        };
        match committer.append(append.clone()).await {
            Ok(Appended::Stored(cursor)) => {
                self.stored(&mut guard, store, cursor, append.update).await;
                Ok(cursor)
            }
            Ok(Appended::Duplicate(cursor)) => Ok(cursor),
            Err(e) => {
                tracing::error!(doc = %self.id, error = %e, "store failed; update not acknowledged");
                self.ctx.metrics.store_errors.inc();
                match guard.as_mut() {
                    Some(state) if append.update.len() <= MAX_UNSTORED_BYTES => {
                        // Broadcast already: the room stores it itself at its next use or sweep,
                        // so that readers never keep a change the server never stores. The
                        // pusher gets no `Ack` and re-sends it; that re-send changes nothing.
                        state.unstored.push(append.update);
                    }
                    _ => {
                        // The live document holds an update the store does not: reload it, so
                        // that nothing unacknowledged is ever served as stored.
                        self.reload(&mut guard, store).await;
                    }
                }
                Err(Refused::new(ErrorCode::StoreUnavailable))
            }
        }
    }

    /// Bookkeeping after this room's `update` was stored at `cursor`: the head moves, the update
    /// is remembered for resumes and published to the other instances.
    async fn stored<S: Store>(&self, slot: &mut Option<RoomState>, store: &S, cursor: Cursor, update: Vec<u8>) {
        let Some(state) = slot.as_mut() else { return };
        state.stored_bytes += update.len() as u64;
        if cursor > state.head + 1 {
            // Another instance stored updates of this document in between, and their fan-in
            // has not arrived (or never will: no fan-out is configured). Once this commit moves
            // the head past them, fan-in would skip them: read them from the shared store now,
            // before the pusher's `Ack`.
            match store.log_after(self.id.as_str(), state.head).await {
                Ok(LogTail::Entries(entries)) => {
                    let gap = entries.into_iter().filter(|e| e.cursor < cursor).collect();
                    state.take_stored(&self.id, gap);
                }
                Ok(LogTail::Pruned) | Err(_) => {
                    tracing::warn!(doc = %self.id, "updates of another instance not in the log: reloading the room");
                    self.reload(slot, store).await;
                    if let Some(state) = slot.as_mut() {
                        for sub in state.subscribers.values() {
                            sub.out.ctl.close(CLOSE_RESYNC);
                        }
                    }
                    let shared = FanoutEvent::Update {
                        cursor,
                        update: Arc::from(update),
                    };
                    self.ctx.fanout.publish(self.ctx.instance, &self.id, shared);
                    return;
                }
            }
        }
        state.head = cursor;
        state.remember(cursor, &update);
        // Other instances get what is stored only, with its cursor.
        let shared = FanoutEvent::Update {
            cursor,
            update: Arc::from(update),
        };
        self.ctx.fanout.publish(self.ctx.instance, &self.id, shared);
    }

    /// Stores the changes the room broadcast but failed to commit (see `RoomState::unstored`),
    /// in one transaction, as the server's own (no client batch). On failure they stay.
    pub(crate) async fn flush_unstored<S: Store>(
        &self,
        slot: &mut Option<RoomState>,
        store: &S,
    ) -> driftsync_engine::Result<()> {
        let Some(state) = slot.as_mut() else { return Ok(()) };
        if state.unstored.is_empty() {
            return Ok(());
        }
        let appends: Vec<Append> = state
            .unstored
            .iter()
            .map(|update| Append {
                doc: self.id.as_str().to_string(),
                origin: None,
                update: update.clone(),
            })
            .collect();
        let appended = store.append(&appends).await?;
        let updates = std::mem::take(&mut state.unstored);
        tracing::info!(doc = %self.id, count = updates.len(), "stored changes whose commit had failed");
        for (appended, update) in appended.into_iter().zip(updates) {
            if let Appended::Stored(cursor) = appended {
                Box::pin(self.stored(slot, store, cursor, update)).await;
            }
        }
        Ok(())
    }

    /// Sends an ephemeral event (presence, typing) to every other subscriber.
    pub(crate) async fn relay(&self, session: u64, event: RoomEvent) {
        let mut guard = self.state.lock().await;
        if let Some(state) = guard.as_mut() {
            state.broadcast(session, event);
        }
    }

    /// Removes a subscriber, and removes and announces every presence state it set, so no ghost
    /// remains for either protocol.
    pub(crate) async fn leave(&self, session: u64) {
        let mut guard = self.state.lock().await;
        if let Some(state) = guard.as_mut() {
            state.subscribers.remove(&session);
            // Also when the subscriber is gone already (dropped as a slow consumer): its states
            // must not outlive it.
            for event in state.presence.leave(&self.id, session, now_ms()) {
                state.broadcast(session, event);
            }
        }
    }

    /// Applies awareness entries from Yjs connection `session` and sends the applied ones to
    /// every subscriber, the sender included: the reference server echoes them too, and the
    /// echo of its own 15 s renewal is what keeps a y-websocket client's 30 s watchdog quiet.
    pub(crate) async fn awareness(&self, session: u64, user: &str, entries: &[AwarenessEntry]) {
        let mut guard = self.state.lock().await;
        if let Some(state) = guard.as_mut() {
            // A Yjs connection may not introduce the session id of a subscriber: native
            // connections use theirs as their awareness client id.
            let subscribers = &state.subscribers;
            let events = state.presence.apply(&self.id, session, user, entries, now_ms(), |id| {
                subscribers.contains_key(&id)
            });
            for event in events {
                state.broadcast(NO_SESSION, event);
            }
        }
    }

    /// Sets (or with `None`, clears) native connection `session`'s presence and sends it to the
    /// other subscribers. A state that is not JSON (`Malformed`), larger than
    /// `presence::MAX_STATE_BYTES` (`FrameTooLarge`) or beyond the room's presence bytes
    /// (`Unavailable`) is refused.
    pub(crate) async fn presence(&self, session: u64, user: &str, presence: Option<String>) -> Result<(), Refused> {
        let mut guard = self.state.lock().await;
        if let Some(state) = guard.as_mut() {
            let events = state
                .presence
                .set_native(&self.id, session, user, presence, now_ms())
                .map_err(|invalid| {
                    Refused::new(match invalid {
                        InvalidState::NotJson => ErrorCode::Malformed,
                        InvalidState::TooLarge => ErrorCode::FrameTooLarge,
                        InvalidState::RoomFull => ErrorCode::Unavailable,
                    })
                })?;
            for event in events {
                state.broadcast(session, event);
            }
        }
        Ok(())
    }

    /// Queues, for subscriber `session`, one presence event per current state of the other
    /// connections. Done under the room lock, so no later change can be overtaken by it.
    pub(crate) async fn send_presence(&self, session: u64) {
        let guard = self.state.lock().await;
        if let Some(state) = guard.as_ref() {
            if let Some(sub) = state.subscribers.get(&session) {
                for event in state.presence.snapshot_for(&self.id, session) {
                    if !sub.out.send(Outgoing::Event(SharedEvent::new(event))) {
                        break;
                    }
                }
            }
        }
    }
}

/// The most bytes of broadcast changes whose commit failed that a room keeps to store later;
/// a larger one makes the room reload from the store instead.
const MAX_UNSTORED_BYTES: usize = 4 * 1024 * 1024;

/// The most updates kept in a room's `recent` (as many as compaction keeps in the log).
const RECENT_ENTRIES: usize = 1024;
/// The most bytes of updates kept in a room's `recent`.
const RECENT_BYTES: usize = 256 * 1024;

impl RoomState {
    /// The live document, loaded by [`Room::ensure_loaded`]; `None` only while evicted.
    pub(crate) fn doc(&self) -> Option<&Doc> {
        self.live.as_ref()
    }

    /// Drops the live document and the recent updates of an idle room.
    fn evict(&mut self) {
        self.live = None;
        self.chat = None;
        self.recent = VecDeque::new();
        self.recent_bytes = 0;
    }

    /// Takes in updates the shared store holds beyond the head (written by other instances), in
    /// cursor order: applied to the live document, remembered, and sent to every subscriber
    /// with their own cursors.
    fn take_stored(&mut self, doc: &DocId, entries: Vec<LogEntry>) {
        for entry in entries {
            if entry.cursor <= self.head {
                continue;
            }
            // An evicted document is not applied to: it reloads from the store, which has this.
            if let Some(live) = self.live.as_ref() {
                if let Err(e) = apply_remote(
                    live,
                    &entry.update,
                    &Limits {
                        max_pending_bytes: usize::MAX,
                    },
                ) {
                    tracing::error!(doc = %doc, error = %e, "an update from the shared store did not apply");
                }
            }
            self.head = entry.cursor;
            self.remember(entry.cursor, &entry.update);
            let event = RoomEvent::Update {
                doc: doc.clone(),
                cursor: entry.cursor,
                update: entry.update,
            };
            self.broadcast(NO_SESSION, event);
        }
    }

    /// Keeps a stored update for resumes, dropping the oldest beyond the bounds.
    fn remember(&mut self, cursor: Cursor, update: &[u8]) {
        if self.recent.back().is_some_and(|last| last.cursor + 1 != cursor) {
            self.recent.clear();
            self.recent_bytes = 0;
        }
        self.recent.push_back(LogEntry {
            cursor,
            update: update.to_vec(),
        });
        self.recent_bytes += update.len();
        while self.recent.len() > RECENT_ENTRIES || self.recent_bytes > RECENT_BYTES {
            match self.recent.pop_front() {
                Some(old) => self.recent_bytes -= old.update.len(),
                None => break,
            }
        }
    }

    /// The stored updates after `cursor` up to the head, if `recent` holds all of them.
    pub(crate) fn recent_after(&self, cursor: Cursor) -> Option<Vec<LogEntry>> {
        let first = self.recent.front()?;
        let last = self.recent.back()?;
        if last.cursor != self.head || first.cursor > cursor + 1 {
            return None;
        }
        Some(self.recent.iter().filter(|e| e.cursor > cursor).cloned().collect())
    }

    /// Sends `event` to every subscriber but `except`. A subscriber whose queue is full is told
    /// to resync and dropped from the room: never silently left behind.
    pub(crate) fn broadcast(&mut self, except: u64, event: RoomEvent) {
        // Presence is shared with the other instances here, where every presence change of the
        // room passes; updates are published by `Room::push` after their commit.
        if let (
            RoomEvent::Presence {
                doc,
                peer,
                user,
                clock,
                state,
            },
            true,
        ) = (&event, except != REMOTE_SESSION)
        {
            let shared = FanoutEvent::Presence {
                peer: *peer,
                user: user.clone(),
                clock: *clock,
                state: state.clone(),
            };
            self.ctx.fanout.publish(self.ctx.instance, doc, shared);
        }
        let event = SharedEvent::new(event);
        self.subscribers
            .retain(|session, sub| *session == except || sub.out.send(Outgoing::Event(Arc::clone(&event))));
    }
}

/// Closes a connection from anywhere, with a WebSocket close code.
pub(crate) struct ConnCtl {
    pub(crate) token: CancellationToken,
    code: AtomicU16,
    /// The server's metrics (frames and bytes out, slow consumers).
    pub(crate) metrics: Arc<Metrics>,
}

impl ConnCtl {
    pub(crate) fn new(token: CancellationToken, metrics: Arc<Metrics>) -> Self {
        metrics.connections.inc();
        ConnCtl {
            token,
            code: AtomicU16::new(driftsync_protocol::CLOSE_GOING_AWAY),
            metrics,
        }
    }

    /// Asks the connection to close with `code` (the first code asked for wins).
    pub(crate) fn close(&self, code: u16) {
        if !self.token.is_cancelled() {
            self.code.store(code, Ordering::Relaxed);
            self.token.cancel();
        }
    }

    pub(crate) fn code(&self) -> u16 {
        self.code.load(Ordering::Relaxed)
    }
}

/// A connection's bounded outbound queue.
#[derive(Clone)]
pub(crate) struct Outbound {
    pub(crate) tx: queue::Sender<Outgoing>,
    pub(crate) ctl: Arc<ConnCtl>,
}

impl Outbound {
    /// Queues an item; on overflow (in frames or bytes) closes the connection with
    /// [`CLOSE_RESYNC`] and returns false: a slow consumer is disconnected with a reason, never
    /// silently left behind.
    pub(crate) fn send(&self, item: Outgoing) -> bool {
        let weight = item.weight();
        match self.tx.try_send_weighted(item, weight) {
            Ok(()) => true,
            Err(queue::TrySendError::Full) => {
                tracing::warn!("slow consumer: outbound queue full, closing with resync");
                self.ctl.metrics.slow_consumers.inc();
                self.ctl.close(CLOSE_RESYNC);
                false
            }
            Err(queue::TrySendError::Closed) => false,
        }
    }

    /// Queues an encoded frame.
    pub(crate) fn frame(&self, bytes: Vec<u8>) -> bool {
        self.send(Outgoing::Frame(bytes))
    }

    /// Queues the answer to this connection's own request once its queue has room (see
    /// [`queue::Sender::send_waiting`]): a large answer goes out as fast as the peer reads it,
    /// never all at once into memory, and never crowds out broadcasts. A peer that reads
    /// nothing for `patience` is closed with [`CLOSE_RESYNC`]. Returns false if the frame was
    /// not queued (the connection is closing).
    pub(crate) async fn answer(&self, bytes: Vec<u8>, patience: std::time::Duration) -> bool {
        let weight = bytes.len() + ITEM_OVERHEAD;
        tokio::select! {
            () = self.ctl.token.cancelled() => false,
            sent = tokio::time::timeout(patience, self.tx.send_waiting(Outgoing::Frame(bytes), weight)) => match sent {
                Ok(Ok(())) => true,
                Ok(Err(_)) => false,
                Err(_) => {
                    tracing::info!("peer reads none of its answers: closing with resync");
                    self.ctl.metrics.slow_consumers.inc();
                    self.ctl.close(CLOSE_RESYNC);
                    false
                }
            }
        }
    }
}

/// What a queued item costs besides its payload (its slot, the frame header, bookkeeping).
const ITEM_OVERHEAD: usize = 64;

impl Outgoing {
    /// What holding this item in a queue costs, in bytes, for the queue's byte bound. A shared
    /// event counts whole in every queue that holds it: each would keep it alive alone.
    fn weight(&self) -> usize {
        ITEM_OVERHEAD
            + match self {
                Outgoing::Frame(bytes) | Outgoing::Pong(bytes) => bytes.len(),
                Outgoing::Ping => 0,
                Outgoing::Event(shared) => match &shared.event {
                    RoomEvent::Update { doc, update, .. } => doc.as_str().len() + update.len(),
                    RoomEvent::Presence { doc, user, state, .. } => {
                        doc.as_str().len() + user.len() + state.as_ref().map_or(0, String::len)
                    }
                    RoomEvent::Typing { doc, user, .. } => doc.as_str().len() + user.len(),
                },
            }
    }
}

impl Drop for ConnCtl {
    fn drop(&mut self) {
        self.metrics.connections.dec();
    }
}

/// Compacts a document whose log grew by at least `policy.min_log_bytes` since its snapshot,
/// whether or not the log outgrew the snapshot (used when a room unloads and at shutdown).
async fn compact_grown<S: Store>(store: &S, doc: &DocId, policy: &CompactionPolicy) {
    match store.meta(doc.as_str()).await {
        Ok(Some(meta)) if meta.log_bytes >= policy.min_log_bytes => {
            if let Err(e) = store.compact(doc.as_str(), policy).await {
                tracing::warn!(doc = %doc, error = %e, "compaction failed");
            }
        }
        Ok(_) => {}
        Err(e) => tracing::warn!(doc = %doc, error = %e, "reading document metadata failed"),
    }
}

/// Compacts a document's log when the policy says it is due. Failures are logged and counted:
/// compaction is an optimisation, the log stays correct without it.
async fn compact_if_due<S: Store>(store: &S, doc: &str, policy: &CompactionPolicy, metrics: &Metrics) {
    match store.meta(doc).await {
        Ok(Some(meta)) if policy.due(&meta) => match store.compact(doc, policy).await {
            Ok(Some(done)) => tracing::debug!(doc, ?done, "compacted"),
            Ok(None) => {}
            Err(e) => {
                metrics.store_errors.inc();
                tracing::warn!(doc, error = %e, "compaction failed");
            }
        },
        Ok(_) => {}
        Err(e) => {
            metrics.store_errors.inc();
            tracing::warn!(doc, error = %e, "reading document metadata failed");
        }
    }
}

#[cfg(test)]
mod tests {
    use driftsync_engine::doc::{new_doc, text, text_insert};
    use driftsync_engine::store::SqliteStore;

    use super::*;
    use crate::fanout::NoFanout;

    fn rooms() -> Rooms {
        Rooms::new(RoomCtx {
            metrics: Arc::new(Metrics::new()),
            fanout: Arc::new(NoFanout),
            instance: 1,
            owners: Arc::default(),
            max_document_bytes: u64::MAX,
            max_clock_skew_ms: driftsync_engine::clock::DEFAULT_MAX_CLOCK_SKEW_MS,
        })
    }

    /// A subscriber so that sweeps keep the room (and evict its document instead of unloading it).
    fn subscribe(state: &mut RoomState, metrics: &Arc<Metrics>) -> queue::Receiver<Outgoing> {
        let (tx, rx) = queue::channel(16);
        let ctl = Arc::new(ConnCtl::new(CancellationToken::new(), Arc::clone(metrics)));
        state.subscribers.insert(
            7,
            Subscriber {
                out: Outbound { tx, ctl },
            },
        );
        rx
    }

    #[tokio::test]
    async fn an_idle_room_evicts_its_document_and_reloads_it_on_the_next_push() {
        let store = Arc::new(SqliteStore::open_in_memory().await.unwrap());
        let (committer, _task) = Committer::start(Arc::clone(&store));
        let rooms = rooms();
        let id = DocId::new("notes").unwrap();
        let room = rooms.get(&id);
        let writer = new_doc(5).unwrap();
        let a = text_insert(&writer, 0, "hello").unwrap();
        let b = text_insert(&writer, 5, " world").unwrap();
        assert_eq!(room.push(&*store, &committer, 1, None, None, a).await.unwrap(), 1);
        let _rx = {
            let mut guard = room.state.lock().await;
            let state = guard.as_mut().unwrap();
            subscribe(state, &rooms.ctx.metrics)
        };
        // The first sweep sees the push, the second finds the room unused and evicts.
        let policy = CompactionPolicy::default();
        rooms.sweep(&*store, &policy).await;
        assert!(room.state.lock().await.as_ref().unwrap().doc().is_some());
        rooms.sweep(&*store, &policy).await;
        {
            let guard = room.state.lock().await;
            let state = guard.as_ref().unwrap();
            assert!(state.doc().is_none(), "evicted");
            assert_eq!(state.head, 1);
            assert_eq!(state.subscribers.len(), 1, "subscribers stay");
        }
        // The next push reloads the document from the store and applies on top of it.
        assert_eq!(room.push(&*store, &committer, 1, None, None, b).await.unwrap(), 2);
        let guard = room.state.lock().await;
        let state = guard.as_ref().unwrap();
        assert_eq!(text(state.doc().unwrap()), "hello world");
        // Recent updates restart after an eviction: only what they hold is answered from them.
        assert_eq!(state.recent_after(1).map(|e| e.len()), Some(1));
        assert!(state.recent_after(0).is_none());
        assert_eq!(state.recent_after(2).map(|e| e.len()), Some(0));
    }
}
