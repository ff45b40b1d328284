//! A room: one document's live state, shared by every connection subscribed to it whatever its
//! protocol — the live yrs document (loaded on demand), the head cursor, a window of recent
//! updates for resumes, the subscribers' queues, presence, and the commits in flight.
//!
//! Every method takes the room's lock itself and holds it only for what must not interleave:
//! a push is validated, applied, broadcast and queued for its commit under the lock, and its
//! commit is awaited outside it (pipelined commits: a busy room has several commits in flight,
//! settled strictly in the order they were queued). Connections never see the lock or the state.

use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::hash::{BuildHasherDefault, DefaultHasher};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::pin::Pin;
use std::sync::Arc;
use std::time::Instant;

use driftsync_engine::chat::{joined_members, system_message, ChatFacts, ChatGuard};
use driftsync_engine::doc::{decode_update, is_empty_update, load_document, state_vector};
use driftsync_engine::store::{Append, Appended, LogEntry, LogTail, Origin, Store};
use driftsync_engine::sync::{
    answer_resume, answer_resume_from_state, apply_checked, apply_remote, check_push, missing_for, Applied, Limits,
    ResumeAnswer, MAX_SQUASH_WORK,
};
use driftsync_protocol::yjs::AwarenessEntry;
use driftsync_protocol::{Cursor, DocId, ErrorCode, CLOSE_RESYNC};
use futures_util::future::{FutureExt, Shared};
use tokio::sync::oneshot;
use yrs::{Doc, ReadTxn, StateVector, Transact};

use crate::commit::{CommitResult, Committer, Gate};
use crate::event::{Joined, Outbound, Outgoing, Refused, RoomEvent, SharedEvent};
use crate::fanout::{Fanout, FanoutEvent, MAX_CARRIED_UPDATE};
use crate::inbox::Inboxes;
use crate::metrics::Metrics;
use crate::owners::{Owners, Ownership};
use crate::presence::{InvalidState, Presence};
use crate::tasks::Tasks;

/// The server's documents never edit; any valid client id will do for them.
const SERVER_CLIENT_ID: u64 = 1;

/// A session id no connection has (they start at 1): broadcasting "to everyone but it" reaches
/// every subscriber.
pub(crate) const NO_SESSION: u64 = 0;

/// The "session" of events that came from another instance: broadcasting them reaches every
/// local subscriber and never publishes them again (no loops between instances).
pub(crate) const REMOTE_SESSION: u64 = u64::MAX;

/// The most bytes of broadcast changes whose commit failed that a room keeps to store later;
/// a larger one makes the room reload from the store instead.
const MAX_UNSTORED_BYTES: usize = 4 * 1024 * 1024;

/// The most membership changes of one push the room announces with system messages.
const MAX_ANNOUNCED_PER_PUSH: usize = 8;

/// The most updates kept in a room's `recent` (as many as compaction keeps in the log).
const RECENT_ENTRIES: usize = 1024;
/// The most bytes of updates kept in a room's `recent`.
const RECENT_BYTES: usize = 256 * 1024;

/// The most log entries a resume reads; a client further behind gets a state-vector diff (the
/// default compaction keeps 1,024 entries in the log for resumes).
const MAX_TAIL_ENTRIES: u64 = 1024;

/// What rooms share: metrics, the fan-out to other instances, client id ownership, limits, and
/// the instance's monotonic clock.
pub(crate) struct RoomCtx {
    pub(crate) metrics: Arc<Metrics>,
    pub(crate) fanout: Arc<dyn Fanout>,
    /// This instance's id on the fan-out.
    pub(crate) instance: u64,
    /// Who owns which yrs client id (see [`crate::owners`]).
    pub(crate) owners: Arc<Owners>,
    /// The largest a document may grow, in stored bytes (snapshot and log); a push beyond it is
    /// refused with `ErrorCode::DocumentTooLarge`.
    pub(crate) max_document_bytes: u64,
    /// How far ahead of the server's clock a new chat message's stamp may be.
    pub(crate) max_clock_skew_ms: u64,
    /// The instance's tasks: a push's commit is settled by a task of its own.
    pub(crate) tasks: Arc<Tasks>,
    /// The connections following users' inboxes here, woken when a chat room stores a change
    /// to an inbox (see [`crate::inbox`]).
    pub(crate) inboxes: Arc<Inboxes>,
    /// When the instance started, on tokio's clock (virtual in a simulation).
    epoch: tokio::time::Instant,
}

impl RoomCtx {
    pub(crate) fn new(
        metrics: Arc<Metrics>,
        fanout: Arc<dyn Fanout>,
        instance: u64,
        max_document_bytes: u64,
        max_clock_skew_ms: u64,
        tasks: Arc<Tasks>,
    ) -> RoomCtx {
        RoomCtx {
            metrics,
            fanout,
            instance,
            owners: Arc::default(),
            max_document_bytes,
            max_clock_skew_ms,
            tasks,
            inboxes: Arc::default(),
            epoch: tokio::time::Instant::now(),
        }
    }

    /// Milliseconds since the instance started, on tokio's monotonic clock: presence timing.
    pub(crate) fn now_ms(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX)
    }
}

/// One document's live state.
pub(crate) struct Room {
    pub(crate) id: DocId,
    state: tokio::sync::Mutex<Option<RoomState>>,
    /// The document's commit gate (see [`crate::commit`]): it outlives unloads, since commits
    /// queued before one may still be answered after it.
    gate: Arc<Gate>,
    ctx: Arc<RoomCtx>,
}

/// A loaded room.
struct RoomState {
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
    /// Cursor of the last update stored for this document and settled here.
    head: Cursor,
    /// Stored bytes of the document (its snapshot and log when loaded, plus what was stored
    /// since): checked against [`RoomCtx::max_document_bytes`] before a push is applied.
    stored_bytes: u64,
    /// Updates applied to the live document and broadcast, whose commits are in flight, in the
    /// order they were queued (which is the order the store assigns their cursors).
    inflight: VecDeque<InFlight>,
    /// Bytes of update in `inflight`.
    inflight_bytes: u64,
    /// The epoch this room's appends are queued in (see [`crate::commit`]); a new one begins
    /// once the room has recovered from a failed commit.
    epoch: u64,
    /// Counts the live documents installed (loads and reloads): an in-flight update applied to
    /// an earlier one is not in the current one.
    generation: u64,
    /// Updates the live document holds that were broadcast but whose commit failed, oldest
    /// first: the room stores them itself, before anything else, at its next use or sweep (see
    /// [`Room::recover`]). At most [`MAX_UNSTORED_BYTES`].
    unstored: Vec<(Vec<u8>, Option<Box<ChatFacts>>)>,
    /// Native sessions a push of which was refused for a passing reason (or whose failed commit
    /// the room could not keep), with that reason: none of their later pushes of this document
    /// is stored until they resume it (each is refused for the same reason). A client's `Ack` covers its batch and every older one of the document,
    /// and the store takes a batch at or below the last one stored for a re-send: a later batch
    /// stored after a refused one would lose the refused one for good (found by the simulation:
    /// a refused deletion, acknowledged by the next batch's `Ack`, never stored). The client
    /// resumes the document after such a refusal and pushes its whole outbox again, in order.
    fenced: HashMap<u64, ErrorCode, BuildHasherDefault<DefaultHasher>>,
    /// The connections subscribed, by session id. A fixed hasher: the same subscriptions give
    /// the same broadcast order, run after run (the simulation replays seeds).
    subscribers: HashMap<u64, Outbound, BuildHasherDefault<DefaultHasher>>,
    /// Presence and awareness states of every protocol's connections.
    presence: Presence,
    /// In a chat room ([`crate::config::CHAT_PREFIX`]), the guard watching the live document.
    chat: Option<ChatGuard>,
    /// The head when the sweeper last considered compacting the log.
    checked_head: Cursor,
    /// Consecutive sweeps that found the room without subscribers.
    idle_sweeps: u8,
}

/// An update whose commit is in flight.
struct InFlight {
    /// The committer's answer, which whoever settles the room first reads.
    commit: Shared<oneshot::Receiver<CommitResult>>,
    update: Vec<u8>,
    /// What it does to a chat room that the chat index keeps (stored with it).
    chat: Option<Box<ChatFacts>>,
    /// The native session that pushed it and its batch: acknowledged once stored, fenced
    /// should its commit fail and the room not keep it (see [`RoomState::fenced`]).
    pusher: Option<(u64, u64)>,
    /// The live document it was applied to (see [`RoomState::generation`]).
    generation: u64,
    /// Where the pusher waits for the outcome.
    outcome: oneshot::Sender<Result<Cursor, Refused>>,
}

/// A push the room accepted and is committing: resolves once its commit settled, to the
/// cursor it is stored at, or to why it was refused.
pub(crate) type PushOutcome<'a> = Pin<Box<dyn Future<Output = Result<Cursor, Refused>> + Send + 'a>>;

/// Who pushes: the connection, the user its token names (`None` on an open server), and for a
/// native batch, its origin (client id and batch) for deduplication.
pub(crate) struct Pusher<'a> {
    pub(crate) session: u64,
    pub(crate) user: Option<&'a str>,
    pub(crate) origin: Option<Origin>,
}

/// Logs a failure to load, and gives the code a connection reports.
fn load_failed(doc: &DocId, e: &driftsync_engine::Error) -> ErrorCode {
    tracing::error!(doc = %doc, error = %e, "refusing a document that failed to load");
    ErrorCode::LoadFailed
}

type Guard<'a> = tokio::sync::MutexGuard<'a, Option<RoomState>>;

impl Room {
    pub(crate) fn new(id: DocId, ctx: Arc<RoomCtx>) -> Room {
        Room {
            id,
            state: tokio::sync::Mutex::default(),
            gate: Arc::default(),
            ctx,
        }
    }

    // ----- loading -----

    /// Loads the room from the store if it is not loaded (or its document was evicted), and
    /// stores what a failed commit left unstored. A load failure refuses the room: it is never
    /// served (nor later stored) as an empty document.
    async fn ensure_loaded<S: Store>(&self, slot: &mut Option<RoomState>, store: &S) -> driftsync_engine::Result<()> {
        if slot.is_none() {
            let (doc, head, stored_bytes) = self.load(store).await?;
            let epoch = self.gate.failed_through() + 1;
            *slot = Some(RoomState {
                live: None,
                recent: VecDeque::new(),
                recent_bytes: 0,
                active: true,
                head,
                stored_bytes,
                inflight: VecDeque::new(),
                inflight_bytes: 0,
                epoch,
                generation: 0,
                unstored: Vec::new(),
                fenced: HashMap::default(),
                subscribers: HashMap::default(),
                presence: Presence::default(),
                chat: None,
                checked_head: head,
                idle_sweeps: 0,
            });
            if let Some(state) = slot.as_mut() {
                self.install(state, doc, head, stored_bytes);
            }
            self.ctx.metrics.rooms.inc();
        }
        let needs_doc = match slot.as_mut() {
            Some(state) => {
                state.active = true;
                state.live.is_none()
            }
            None => return Err(driftsync_engine::Error::Invalid("room state vanished".into())),
        };
        if needs_doc {
            // Evicted while idle: every update is stored, so the store has exactly the document
            // (and maybe more: what other instances stored that the fan-out has not brought).
            let (doc, head, stored_bytes) = self.load(store).await?;
            if let Some(state) = slot.as_mut() {
                self.adopt(state, store, doc, head, stored_bytes).await;
            }
        }
        if let Err(e) = self.recover(slot, store).await {
            tracing::warn!(doc = %self.id, error = %e, "storing changes whose commit failed earlier failed again");
        }
        Ok(())
    }

    /// Loads the document: its yrs document, head cursor and stored bytes.
    async fn load<S: Store>(&self, store: &S) -> driftsync_engine::Result<(Doc, Cursor, u64)> {
        let stored = store.load(self.id.as_str()).await?.unwrap_or_default();
        let bytes = stored.snapshot.as_ref().map_or(0, Vec::len)
            + stored.tail.iter().map(|entry| entry.update.len()).sum::<usize>();
        let doc = load_document(self.id.as_str(), &stored, SERVER_CLIENT_ID)?;
        Ok((doc, stored.head, bytes as u64))
    }

    /// Makes `doc`, loaded from the store at `head`, the live document of a room that may have
    /// subscribers. They first get the stored updates between the room's head and `head`:
    /// what other instances stored that the fan-out has not brought (lost, or still on its
    /// way), which nothing would bring them afterwards — every later broadcast carries a cursor
    /// at or past `head`, and fan-in ignores cursors at or below it. If the log no longer holds
    /// those updates, the subscribers are told to resync.
    async fn adopt<S: Store>(&self, state: &mut RoomState, store: &S, doc: Doc, head: Cursor, stored_bytes: u64) {
        if head > state.head && !state.subscribers.is_empty() {
            match store.log_after(self.id.as_str(), state.head).await {
                Ok(LogTail::Entries(entries)) => {
                    let missed: Vec<LogEntry> = entries.into_iter().filter(|e| e.cursor <= head).collect();
                    // Sent, not applied: the loaded document replaces the live one.
                    state.live = None;
                    state.take_stored(&self.ctx, &self.id, missed);
                }
                Ok(LogTail::Pruned) | Err(_) => {
                    tracing::warn!(doc = %self.id, "updates of another instance not in the log: subscribers resync");
                    for out in state.subscribers.values() {
                        out.ctl.close(CLOSE_RESYNC);
                    }
                }
            }
        }
        self.install(state, doc, head, stored_bytes);
    }

    /// Makes `doc`, loaded from the store at `head`, the room's live document (see
    /// [`Room::adopt`] for a room with subscribers). The window of recent updates stays only if
    /// the store holds nothing newer than it.
    fn install(&self, state: &mut RoomState, doc: Doc, head: Cursor, stored_bytes: u64) {
        state.chat = self
            .id
            .as_str()
            .starts_with(crate::config::CHAT_PREFIX)
            .then(|| ChatGuard::attach(&doc).with_max_clock_skew(self.ctx.max_clock_skew_ms));
        state.live = Some(doc);
        state.stored_bytes = stored_bytes;
        state.generation += 1;
        // What the store holds replaces everything: changes it lacks are gone from the room.
        state.unstored.clear();
        state.epoch = state.epoch.max(self.gate.failed_through()) + 1;
        if head != state.head {
            state.recent.clear();
            state.recent_bytes = 0;
            state.head = head;
        }
    }

    /// Replaces the live document with what the store holds, keeping the subscribers, once
    /// every commit in flight has settled (else the store would later hold an update the new
    /// live document lacks). Used when the live document may hold something that is not stored
    /// (a refused update, a failed commit). If the reload fails, every subscriber is told to
    /// resync and the room is unloaded.
    async fn reload<S: Store>(&self, slot: &mut Option<RoomState>, store: &S) {
        self.settle(slot, store, true).await;
        self.reload_now(slot, store).await;
    }

    /// [`Room::reload`] without waiting for the commits in flight: only for when those are
    /// bound to fail (a commit before them failed).
    async fn reload_now<S: Store>(&self, slot: &mut Option<RoomState>, store: &S) {
        match (self.load(store).await, slot.as_mut()) {
            (Ok((doc, head, bytes)), Some(live)) => self.adopt(live, store, doc, head, bytes).await,
            (Ok(_), None) => {}
            (Err(e), _) => {
                tracing::error!(doc = %self.id, error = %e, "reload failed; unloading the room");
                if let Some(live) = slot.take() {
                    self.ctx.metrics.rooms.dec();
                    for out in live.subscribers.values() {
                        out.ctl.close(CLOSE_RESYNC);
                    }
                    for entry in live.inflight {
                        let _ = entry.outcome.send(Err(Refused::new(ErrorCode::StoreUnavailable)));
                    }
                }
            }
        }
    }

    // ----- pushes -----

    /// Validates, applies, broadcasts and queues for its commit one update; the returned
    /// outcome resolves once the commit settled (see the module documentation). Refusals come
    /// back as an outcome too, so that a connection answers its pushes in order.
    ///
    /// Nothing is stored unless yrs integrates the update completely and, in a chat room, it
    /// follows the chat rules for the pusher's user (else it is refused whole with
    /// [`ErrorCode::SchemaViolation`]). The other subscribers get it once it is validated,
    /// before its commit; nothing is acknowledged before the group commit that stores it has
    /// finished. With `skip_redundant`, an update whose every insertion and deletion the
    /// document holds already (a Yjs SyncStep2 on reconnect) is answered at once, unchecked.
    pub(crate) async fn push<'a, S: Store>(
        self: &Arc<Self>,
        store: &'a Arc<S>,
        committer: &Committer,
        pusher: Pusher<'_>,
        update: Vec<u8>,
        skip_redundant: bool,
    ) -> PushOutcome<'a> {
        let received = Instant::now();
        self.ctx.metrics.updates_in.inc();
        self.ctx.metrics.bytes_in.inc_by(update.len() as u64);
        let ready = |result: Result<Cursor, Refused>| -> PushOutcome<'a> { Box::pin(std::future::ready(result)) };
        let begun = {
            let mut guard = self.state.lock().await;
            let (session, origin) = (pusher.session, pusher.origin);
            let begun = self
                .begin_push(&mut guard, &**store, committer, pusher, update, skip_redundant)
                .await;
            match (&begun, guard.as_mut()) {
                (Err(refused) | Ok(Begun::Done(Err(refused))), Some(state))
                    if origin.is_some() && refused.code.is_transient() =>
                {
                    state.fenced.entry(session).or_insert(refused.code);
                }
                (Ok(Begun::Done(Ok(cursor))), Some(state)) => {
                    // Acknowledged at once (it changed nothing): in order with the broadcasts.
                    state.ack(&self.id, origin.map(|o| (session, o.batch)), *cursor);
                }
                _ => {}
            }
            begun
        };
        let outcome = match begun {
            Ok(Begun::Done(result)) => ready(result),
            Err(refused) => ready(Err(refused)),
            Ok(Begun::Committing { commit, outcome, also }) => {
                // Settled by a task of its own, which is always polled. Were the pusher's
                // connection to settle it, a connection busy elsewhere — waiting for this room's
                // lock for its next request — would leave the lock granted to its unpolled
                // settle, and the room would deadlock (simulation seed 859).
                let (room, store) = (Arc::clone(self), Arc::clone(store));
                let settled = self.ctx.tasks.spawn(async move {
                    let _ = commit.await;
                    let mut guard = room.state.lock().await;
                    room.settle(&mut guard, &*store, false).await;
                    drop(guard);
                    for commit in also {
                        commit.await;
                        let mut guard = room.state.lock().await;
                        room.settle(&mut guard, &*store, false).await;
                    }
                });
                Box::pin(async move {
                    let _ = settled.await;
                    outcome
                        .await
                        .unwrap_or_else(|_| Err(Refused::new(ErrorCode::StoreUnavailable)))
                })
            }
        };
        let metrics = Arc::clone(&self.ctx.metrics);
        Box::pin(outcome.map(move |result| {
            match &result {
                Ok(_) => metrics.ack_latency.observe(received.elapsed().as_secs_f64()),
                Err(_) => {
                    metrics.refused.inc();
                }
            }
            result
        }))
    }

    /// The part of a push done under the lock.
    async fn begin_push<S: Store>(
        &self,
        guard: &mut Guard<'_>,
        store: &S,
        committer: &Committer,
        pusher: Pusher<'_>,
        update: Vec<u8>,
        skip_redundant: bool,
    ) -> Result<Begun, Refused> {
        let slot: &mut Option<RoomState> = guard;
        if let Err(e) = self.ensure_loaded(slot, store).await {
            self.ctx.metrics.store_errors.inc();
            return Err(Refused::new(load_failed(&self.id, &e)));
        }
        let state = slot.as_mut().ok_or(Refused::new(ErrorCode::LoadFailed))?;
        if let Some(&code) = pusher.origin.and(state.fenced.get(&pusher.session)) {
            // An earlier push of this connection was refused and not stored: nothing of its may
            // be stored before the client has resumed and pushed again (see `fenced`). Refused
            // for the same reason, which the client retries.
            return Err(Refused::new(code));
        }
        if state.needs_recovery(&self.gate) {
            // A change broadcast earlier is still not stored (`recover` just failed to store
            // it): nothing may be stored after it, and the store is failing anyway.
            return Err(Refused::new(ErrorCode::StoreUnavailable));
        }
        if skip_redundant
            && (is_empty_update(&update) || state.live.as_ref().is_some_and(|doc| already_integrated(doc, &update)))
        {
            return Ok(Begun::Done(Ok(state.head)));
        }
        // Refused before anything is applied: a refusal after applying costs a reload.
        let size = |state: &RoomState| state.stored_bytes + state.inflight_bytes + update.len() as u64;
        if size(state) > self.ctx.max_document_bytes {
            // Compaction may have shrunk it since it was loaded: look again before refusing.
            if let Ok(Some(meta)) = store.meta(self.id.as_str()).await {
                state.stored_bytes = meta.snapshot_bytes + meta.log_bytes;
            }
        }
        if size(state) > self.ctx.max_document_bytes {
            tracing::info!(doc = %self.id, bytes = state.stored_bytes, "refusing an update: the document is at its maximum size");
            return Err(Refused::new(ErrorCode::DocumentTooLarge));
        }
        let doc = state.live.as_ref().ok_or(Refused::new(ErrorCode::LoadFailed))?;
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
        if let Some(user) = pusher.user {
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
        let slot: &mut Option<RoomState> = guard;
        let state = slot.as_mut().ok_or(Refused::new(ErrorCode::LoadFailed))?;
        if let Some(chat) = &state.chat {
            chat.reset();
        }
        let doc = state.live.as_ref().ok_or(Refused::new(ErrorCode::LoadFailed))?;
        let reload_cost = state.stored_bytes;
        let changed = match apply_checked(doc, &update) {
            Ok(Applied::Integrated) => true,
            Ok(Applied::Unchanged) => false,
            Ok(Applied::Pending { missing, .. }) => {
                // The server never holds updates with missing dependencies (see engine::sync):
                // refuse it and reload the live document, which now holds it, from the store.
                tracing::info!(doc = %self.id, ?missing, "refusing an update with missing dependencies");
                self.reload(slot, store).await;
                return Err(Refused {
                    code: ErrorCode::MissingDependencies,
                    reload_cost,
                });
            }
            Err(driftsync_engine::Error::TooManyPending { .. }) => {
                return Err(Refused::new(ErrorCode::TooManyPending));
            }
            Err(e) => {
                // yrs may have applied part of it before failing: reload what is stored.
                tracing::info!(doc = %self.id, error = %e, "refusing an update");
                self.reload(slot, store).await;
                return Err(Refused {
                    code: ErrorCode::InvalidUpdate,
                    reload_cost,
                });
            }
        };
        let now_ms = crate::presence::unix_ms();
        if let Some(Err(violation)) = state.chat.as_ref().map(|chat| chat.check(pusher.user, now_ms)) {
            // The live document holds the refused update: reload it from the store.
            tracing::info!(doc = %self.id, user = ?pusher.user, %violation, "refusing an update that breaks the chat rules");
            self.reload(slot, store).await;
            return Err(Refused {
                code: ErrorCode::SchemaViolation,
                reload_cost,
            });
        }
        if !changed {
            // The document held all of it already (a re-sent batch, an echo). Once every
            // commit in flight has settled, the store holds everything the live document does:
            // nothing to store, nothing to pass on; acknowledged at the head, which covers it.
            if !state.inflight.is_empty() {
                self.settle(slot, store, true).await;
            }
            return match slot.as_ref() {
                Some(state) if !state.needs_recovery(&self.gate) => Ok(Begun::Done(Ok(state.head))),
                _ => Err(Refused::new(ErrorCode::StoreUnavailable)),
            };
        }
        // The other local subscribers get the update now, while it is being committed: the
        // durable commit (an fsync) stays out of their latency. Only the pusher's `Ack` waits
        // for it. The cursor they get is the settled head — every update logged up to it has
        // been sent to them — so a subscriber never holds a cursor the store has not assigned;
        // it reaches this update's cursor with a later update or resume. Should the commit
        // fail, the room keeps the update and stores it itself before anything else
        // (`unstored`): they never hold a change the server will not store while it runs.
        let facts = state
            .chat
            .as_ref()
            .map(ChatGuard::take_facts)
            .filter(|facts| !facts.is_empty());
        // With a secret a push changes one membership at most (its user's own); an open server
        // checks no owner, so one push could flip thousands: announced up to a few.
        let joins: Vec<(String, bool, u64)> = facts
            .iter()
            .flat_map(|facts| &facts.members)
            .take(MAX_ANNOUNCED_PER_PUSH)
            .map(|member| (member.user.clone(), member.joined, member.at_ms.min(now_ms)))
            .collect();
        let (commit, outcome) = self
            .queue_commit(state, committer, pusher.session, pusher.origin, update, facts)
            .await;
        // Joins and leaves are announced by the server: a system message each, written after
        // the change (see `chat::system_message`), broadcast to everyone, the pusher included.
        let mut also = Vec::new();
        for (user, joined, at_ms) in joins {
            let Some(doc) = state.live.as_ref() else { break };
            let written = system_message(&user, if joined { "joined" } else { "left" }, at_ms);
            let (_, system) = match written {
                Ok(written) => written,
                Err(e) => {
                    tracing::warn!(doc = %self.id, %user, error = %e, "cannot write a system message");
                    continue;
                }
            };
            if let Some(chat) = &state.chat {
                chat.reset();
            }
            if !matches!(apply_checked(doc, &system), Ok(Applied::Integrated)) {
                tracing::error!(doc = %self.id, %user, "a system message did not apply to its room");
                continue;
            }
            let facts = state.chat.as_ref().map(ChatGuard::take_facts);
            let (commit, _) = self
                .queue_commit(state, committer, NO_SESSION, None, system, facts)
                .await;
            also.push(commit);
        }
        Ok(Begun::Committing { commit, outcome, also })
    }

    /// Broadcasts an update applied to the live document to every subscriber but `session`
    /// and queues its commit (under the lock: the store assigns cursors in the order updates
    /// were applied), recording it among the commits in flight.
    async fn queue_commit(
        &self,
        state: &mut RoomState,
        committer: &Committer,
        session: u64,
        origin: Option<Origin>,
        update: Vec<u8>,
        facts: Option<ChatFacts>,
    ) -> (
        futures_util::future::BoxFuture<'static, ()>,
        oneshot::Receiver<Result<Cursor, Refused>>,
    ) {
        let event = RoomEvent::Update {
            doc: self.id.clone(),
            cursor: state.head,
            update: update.clone(),
        };
        state.broadcast(&self.ctx, session, event);
        let chat = facts.map(Box::new);
        let append = Append {
            doc: self.id.as_str().to_string(),
            origin,
            update: update.clone(),
            chat: chat.clone(),
        };
        let commit = committer
            .enqueue(append, Arc::clone(&self.gate), state.epoch)
            .await
            .shared();
        let (tx, outcome) = oneshot::channel();
        state.inflight_bytes += update.len() as u64;
        state.inflight.push_back(InFlight {
            commit: commit.clone(),
            update,
            chat,
            pusher: origin.map(|origin| (session, origin.batch)),
            generation: state.generation,
            outcome: tx,
        });
        (commit.map(|_| ()).boxed(), outcome)
    }

    /// Wakes the inboxes a stored chat change touched (see [`crate::inbox`]): a new, edited or
    /// deleted message those of every member, a read receipt its reader's, a membership
    /// change that member's — on this instance and, through the fan-out, the others.
    fn wake_inboxes(&self, state: Option<&RoomState>, facts: Option<&ChatFacts>) {
        let Some(facts) = facts else { return };
        let mut users: Vec<String> = Vec::new();
        if !facts.messages.is_empty() || !facts.edits.is_empty() {
            if let Some(doc) = state.and_then(|state| state.live.as_ref()) {
                users.extend(joined_members(doc));
            }
        }
        users.extend(facts.reads.iter().map(|read| read.user.clone()));
        users.extend(facts.members.iter().map(|member| member.user.clone()));
        users.sort_unstable();
        users.dedup();
        if users.is_empty() {
            return;
        }
        self.ctx.inboxes.wake(&users);
        self.ctx.fanout.publish_inbox(self.ctx.instance, &users);
    }

    /// Settles the commits in flight, in the order they were queued: every one whose commit
    /// has finished (with `wait`, every one, waiting for their commits). A stored update moves
    /// the head, is remembered for resumes and published to the other instances; a failed one
    /// is kept to be stored by the room itself (or, too large, makes the room reload).
    async fn settle<S: Store>(&self, slot: &mut Option<RoomState>, store: &S, wait: bool) {
        loop {
            let Some(state) = slot.as_mut() else { return };
            let Some(front) = state.inflight.front() else { return };
            let result = if wait {
                front.commit.clone().await
            } else {
                match front.commit.clone().now_or_never() {
                    Some(result) => result,
                    None => return,
                }
            };
            let Some(entry) = state.inflight.pop_front() else {
                return;
            };
            state.inflight_bytes -= entry.update.len() as u64;
            let current = entry.generation == state.generation;
            let result = result.unwrap_or_else(|_| {
                Err(Arc::new(driftsync_engine::Error::Invalid(
                    "the committer has stopped".into(),
                )))
            });
            let outcome = match result {
                Ok(Appended::Stored(cursor)) => {
                    if current {
                        self.wake_inboxes(slot.as_ref(), entry.chat.as_deref());
                        Box::pin(self.stored(slot, store, cursor, entry.update)).await;
                        if let Some(state) = slot.as_ref() {
                            state.ack(&self.id, entry.pusher, cursor);
                        }
                    } else {
                        // Cannot happen (a reload waits for every commit in flight, and those
                        // after a failed one fail), but if it did, the store would hold what
                        // the live document lacks.
                        tracing::error!(doc = %self.id, cursor, "an update was stored after its room reloaded; reloading again");
                        self.reload_now(slot, store).await;
                    }
                    Ok(cursor)
                }
                Ok(Appended::Duplicate(cursor)) => {
                    // The batch id was stored before, yet this update changed the live document
                    // (only a client re-using a batch id for other content does that): the store
                    // lacks what readers got. The room stores it itself, as for a failed commit,
                    // so that the live document never holds more than the store will.
                    if current {
                        state.unstored.push((entry.update, entry.chat));
                    }
                    state.ack(&self.id, entry.pusher, cursor);
                    Ok(cursor)
                }
                Err(e) => {
                    tracing::error!(doc = %self.id, error = %e, "store failed; update not acknowledged");
                    self.ctx.metrics.store_errors.inc();
                    let unstored: usize = state.unstored.iter().map(|(update, _)| update.len()).sum();
                    let kept = current && unstored + entry.update.len() <= MAX_UNSTORED_BYTES;
                    if let (false, Some((session, _))) = (kept, entry.pusher) {
                        // Dropped, not stored by the room: the pusher's later pushes wait for
                        // its resume (see `RoomState::fenced`).
                        state.fenced.entry(session).or_insert(ErrorCode::StoreUnavailable);
                    }
                    if current {
                        if kept {
                            // Broadcast already: the room stores it itself at its next use or
                            // sweep, so that readers never keep a change the server never
                            // stores. The pusher gets no `Ack` and re-sends it; that re-send
                            // changes nothing.
                            state.unstored.push((entry.update, entry.chat));
                        } else {
                            // The live document holds an update the store does not: reload it,
                            // so that nothing unacknowledged is ever served as stored. (The
                            // commits still in flight are bound to fail: see `crate::commit`.)
                            self.reload_now(slot, store).await;
                        }
                    }
                    Err(Refused::new(ErrorCode::StoreUnavailable))
                }
            };
            let _ = entry.outcome.send(outcome);
            if let Some(state) = slot.as_mut().filter(|state| state.inflight.is_empty()) {
                // An idle room keeps no queue of commits in flight.
                state.inflight = VecDeque::new();
            }
        }
    }

    /// Bookkeeping after this room's `update` was stored at `cursor`: the head moves, the update
    /// is remembered for resumes and published to the other instances.
    async fn stored<S: Store>(&self, slot: &mut Option<RoomState>, store: &S, cursor: Cursor, update: Vec<u8>) {
        let Some(state) = slot.as_mut() else { return };
        state.stored_bytes += update.len() as u64;
        let publish = |update: Vec<u8>| {
            // Other instances get what is stored only, with its cursor.
            let shared = FanoutEvent::Update {
                cursor,
                update: (update.len() <= MAX_CARRIED_UPDATE).then(|| Arc::from(update)),
            };
            self.ctx.fanout.publish(self.ctx.instance, &self.id, shared);
        };
        if cursor <= state.head {
            // Fan-in from another instance read it from the store already.
            publish(update);
            return;
        }
        if cursor > state.head + 1 {
            // Another instance stored updates of this document in between, and their fan-in
            // has not arrived (or never will: no fan-out is configured). Once this commit moves
            // the head past them, fan-in would skip them: read them from the shared store now,
            // before the pusher's `Ack`.
            self.ctx.metrics.fanout_repairs.inc();
            match store.log_after(self.id.as_str(), state.head).await {
                Ok(LogTail::Entries(entries)) => {
                    let gap = entries.into_iter().filter(|e| e.cursor < cursor).collect();
                    state.take_stored(&self.ctx, &self.id, gap);
                }
                Ok(LogTail::Pruned) | Err(_) => {
                    tracing::warn!(doc = %self.id, "updates of another instance not in the log: reloading the room");
                    self.reload_now(slot, store).await;
                    if let Some(state) = slot.as_mut() {
                        for out in state.subscribers.values() {
                            out.ctl.close(CLOSE_RESYNC);
                        }
                    }
                    publish(update);
                    return;
                }
            }
        }
        let Some(state) = slot.as_mut() else { return };
        state.head = cursor;
        state.remember(cursor, &update);
        publish(update);
    }

    /// Stores the changes the room broadcast but failed to commit (see `RoomState::unstored`),
    /// in one transaction, as the server's own (no client batch), once every commit in flight
    /// has settled (those after a failed one fail too, and join them). Then the room queues
    /// its appends in a new epoch. On failure they stay.
    async fn recover<S: Store>(&self, slot: &mut Option<RoomState>, store: &S) -> driftsync_engine::Result<()> {
        if !slot.as_ref().is_some_and(|state| state.needs_recovery(&self.gate)) {
            return Ok(());
        }
        self.settle(slot, store, true).await;
        let Some(state) = slot.as_mut() else { return Ok(()) };
        if !state.unstored.is_empty() {
            let appends: Vec<Append> = state
                .unstored
                .iter()
                .map(|(update, chat)| Append {
                    doc: self.id.as_str().to_string(),
                    origin: None,
                    update: update.clone(),
                    chat: chat.clone(),
                })
                .collect();
            let appended = store.append(&appends).await?;
            let updates = std::mem::take(&mut state.unstored);
            tracing::info!(doc = %self.id, count = updates.len(), "stored changes whose commit had failed");
            for (appended, (update, chat)) in appended.into_iter().zip(updates) {
                if let Appended::Stored(cursor) = appended {
                    self.wake_inboxes(slot.as_ref(), chat.as_deref());
                    Box::pin(self.stored(slot, store, cursor, update)).await;
                }
            }
        }
        if let Some(state) = slot.as_mut() {
            state.epoch = state.epoch.max(self.gate.failed_through()) + 1;
        }
        Ok(())
    }

    // ----- subscribing -----

    /// Answers one document of a native resume — what the client lacks after `cursor` given
    /// its state vector — and subscribes connection `session` (queue `out`) to the room.
    pub(crate) async fn resume<S: Store>(
        &self,
        store: &S,
        session: u64,
        out: &Outbound,
        cursor: Cursor,
        client_sv: &[u8],
    ) -> Result<ResumeAnswer, ErrorCode> {
        let mut guard = self.state.lock().await;
        let slot: &mut Option<RoomState> = &mut guard;
        self.ensure_loaded(slot, store)
            .await
            .map_err(|e| load_failed(&self.id, &e))?;
        // Commits in flight first: their updates are in the live document but not yet at a
        // cursor, and were broadcast before this connection subscribed. Settled, they are in
        // the log and the head: the answer covers them.
        self.settle(slot, store, true).await;
        let state = slot.as_mut().ok_or(ErrorCode::LoadFailed)?;
        // The client resumes: what it pushes next is planned from its whole outbox.
        state.fenced.remove(&session);
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
            match store.log_after(self.id.as_str(), cursor).await {
                Ok(LogTail::Entries(entries)) => Some(entries),
                Ok(LogTail::Pruned) => None,
                Err(e) => {
                    tracing::error!(doc = %self.id, error = %e, "store failed reading the log");
                    return Err(ErrorCode::StoreUnavailable);
                }
            }
        };
        let live = state.live.as_ref().ok_or(ErrorCode::LoadFailed)?;
        let answer = if state.needs_recovery(&self.gate) {
            // The live document holds updates whose commit failed and that the room could not
            // store yet (`recover` failed again): they were broadcast before this connection
            // subscribed, and the log does not hold them. The state diff does; once the room
            // stores them, the client holds them already (found by the simulation: a client
            // answered from the log here never got them).
            answer_resume_from_state(live, state.head, client_sv)
        } else {
            answer_resume(live, state.head, cursor, client_sv, tail.as_deref())
        }
        .map_err(|e| {
            tracing::info!(doc = %self.id, error = %e, "bad resume entry");
            ErrorCode::Malformed
        })?;
        state.subscribers.insert(session, out.clone());
        Ok(answer)
    }

    /// Subscribes Yjs connection `session` (queue `out`) and returns its greeting: the
    /// document's state vector and the awareness states.
    pub(crate) async fn join<S: Store>(&self, store: &S, session: u64, out: &Outbound) -> Result<Joined, ErrorCode> {
        let mut guard = self.state.lock().await;
        let slot: &mut Option<RoomState> = &mut guard;
        self.ensure_loaded(slot, store)
            .await
            .map_err(|e| load_failed(&self.id, &e))?;
        let state = slot.as_mut().ok_or(ErrorCode::LoadFailed)?;
        let live = state.live.as_ref().ok_or(ErrorCode::LoadFailed)?;
        let joined = Joined {
            state_vector: state_vector(live),
            awareness: state.presence.snapshot(),
        };
        state.subscribers.insert(session, out.clone());
        Ok(joined)
    }

    /// What a client with state vector `sv` lacks (a y-protocols SyncStep2 payload). Commits
    /// in flight are in the live document already: Yjs clients have no cursors to keep.
    pub(crate) async fn diff<S: Store>(&self, store: &S, sv: &StateVector) -> Result<Vec<u8>, ErrorCode> {
        let mut guard = self.state.lock().await;
        let slot: &mut Option<RoomState> = &mut guard;
        if slot.is_none() {
            // Unloaded under the connection: a reload failed and it has been told to resync.
            return Err(ErrorCode::LoadFailed);
        }
        self.ensure_loaded(slot, store).await.map_err(|e| {
            tracing::error!(doc = %self.id, error = %e, "reloading an evicted document failed");
            ErrorCode::LoadFailed
        })?;
        let live = slot
            .as_ref()
            .and_then(|state| state.live.as_ref())
            .ok_or(ErrorCode::LoadFailed)?;
        Ok(missing_for(live, sv))
    }

    /// Whether a live connection of `user` is subscribed to the room.
    pub(crate) async fn has_subscriber(&self, user: &str) -> bool {
        let guard = self.state.lock().await;
        guard.as_ref().is_some_and(|state| {
            state
                .subscribers
                .values()
                .any(|out| !out.ctl.token.is_cancelled() && out.ctl.user.get().is_some_and(|u| &**u == user))
        })
    }

    /// The users of the live connections subscribed to the room.
    pub(crate) async fn subscribed_users(&self, into: &mut std::collections::BTreeSet<String>) {
        let guard = self.state.lock().await;
        if let Some(state) = guard.as_ref() {
            for out in state.subscribers.values() {
                if let Some(user) = out.ctl.user.get() {
                    if !out.ctl.token.is_cancelled() && !into.contains(&**user) {
                        into.insert(user.to_string());
                    }
                }
            }
        }
    }

    /// Removes a subscriber, and removes and announces every presence state it set, so no ghost
    /// remains for either protocol.
    pub(crate) async fn leave(&self, session: u64) {
        let mut guard = self.state.lock().await;
        if let Some(state) = guard.as_mut() {
            state.subscribers.remove(&session);
            state.fenced.remove(&session);
            // Also when the subscriber is gone already (dropped as a slow consumer): its states
            // must not outlive it.
            for event in state.presence.leave(&self.id, session, self.ctx.now_ms()) {
                state.broadcast(&self.ctx, session, event);
            }
        }
    }

    // ----- presence and ephemeral events -----

    /// Sends an ephemeral event (typing, a stateless message) to every other subscriber. A
    /// native connection's typing is also mirrored into its presence state, for Yjs clients.
    pub(crate) async fn relay(&self, session: u64, event: RoomEvent) {
        let mut guard = self.state.lock().await;
        if let Some(state) = guard.as_mut() {
            let mirrored = match &event {
                RoomEvent::Typing { peer, user, typing, .. } if *peer == session && session != REMOTE_SESSION => state
                    .presence
                    .set_native_typing(&self.id, session, user, *typing, self.ctx.now_ms()),
                _ => Vec::new(),
            };
            state.broadcast(&self.ctx, session, event);
            for event in mirrored {
                state.broadcast(&self.ctx, session, event);
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
            let events = state
                .presence
                .apply(&self.id, session, user, entries, self.ctx.now_ms(), |id| {
                    subscribers.contains_key(&id)
                });
            for event in events {
                state.broadcast(&self.ctx, NO_SESSION, event);
            }
        }
    }

    /// The presence status of each user present in the room (see `Presence::statuses`).
    pub(crate) async fn statuses(&self) -> std::collections::BTreeMap<String, String> {
        let guard = self.state.lock().await;
        guard
            .as_ref()
            .map(|state| state.presence.statuses())
            .unwrap_or_default()
    }

    /// The current awareness states and their size in bytes (`None`: the room is not loaded).
    pub(crate) async fn awareness_snapshot(&self) -> Option<(Vec<AwarenessEntry>, usize)> {
        let guard = self.state.lock().await;
        guard
            .as_ref()
            .map(|state| (state.presence.snapshot(), state.presence.snapshot_bytes()))
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
                .set_native(&self.id, session, user, presence, self.ctx.now_ms())
                .map_err(|invalid| {
                    Refused::new(match invalid {
                        InvalidState::NotJson => ErrorCode::Malformed,
                        InvalidState::TooLarge => ErrorCode::FrameTooLarge,
                        InvalidState::RoomFull => ErrorCode::Unavailable,
                    })
                })?;
            for event in events {
                state.broadcast(&self.ctx, session, event);
            }
        }
        Ok(())
    }

    /// Queues, for subscriber `session`, one presence event per current state of the other
    /// connections. Done under the room lock, so no later change can be overtaken by it.
    pub(crate) async fn send_presence(&self, session: u64) {
        let guard = self.state.lock().await;
        if let Some(state) = guard.as_ref() {
            if let Some(out) = state.subscribers.get(&session) {
                for event in state.presence.snapshot_for(&self.id, session) {
                    if !out.send(Outgoing::Event(SharedEvent::new(event))) {
                        break;
                    }
                }
            }
        }
    }

    // ----- what the registry does to rooms -----

    /// Takes in an update another instance stored at `cursor` (`None`: announced without its
    /// bytes, read from the store). Only a loaded room cares: an unloaded one will read it
    /// from the store when it loads. An old cursor is ignored; `head + 1` is applied; anything
    /// further ahead is a gap, filled from the store in cursor order.
    pub(crate) async fn remote_update<S: Store>(&self, store: &S, cursor: Cursor, update: Option<&[u8]>) {
        let mut guard = self.state.lock().await;
        let slot: &mut Option<RoomState> = &mut guard;
        let Some(state) = slot.as_mut() else { return };
        if cursor <= state.head {
            return;
        }
        let entries = match update {
            Some(update) if cursor == state.head + 1 => vec![LogEntry {
                cursor,
                update: update.to_vec(),
            }],
            _ => {
                self.ctx.metrics.fanout_repairs.inc();
                match self.read_after_head(slot, store).await {
                    Some(entries) => entries,
                    None => return,
                }
            }
        };
        if let Some(state) = slot.as_mut() {
            state.take_stored(&self.ctx, &self.id, entries);
        }
    }

    /// The room's head, if it is loaded and has no commit in flight (its own commits settling
    /// move the head and fill any gap before them): what the periodic head check compares with
    /// the store. A busy room is skipped.
    pub(crate) fn idle_head(&self) -> Option<Cursor> {
        let guard = self.state.try_lock().ok()?;
        guard
            .as_ref()
            .filter(|state| state.inflight.is_empty())
            .map(|state| state.head)
    }

    /// Catches the room up with the store, whose head for this document is `store_head`: reads
    /// and applies what other instances stored that the fan-out has not brought (a lost last
    /// message, a lost subscription, a dead broker). Returns whether it was behind.
    pub(crate) async fn catch_up<S: Store>(&self, store: &S, store_head: Cursor) -> bool {
        let mut guard = self.state.lock().await;
        let slot: &mut Option<RoomState> = &mut guard;
        let Some(state) = slot.as_ref() else { return false };
        if store_head <= state.head || !state.inflight.is_empty() {
            return false;
        }
        if let Some(entries) = self.read_after_head(slot, store).await {
            if let Some(state) = slot.as_mut() {
                state.take_stored(&self.ctx, &self.id, entries);
            }
        }
        true
    }

    /// The stored entries after the room's head. When the store no longer has them (compacted
    /// meanwhile) or cannot be read, the room reloads and tells its subscribers to resync.
    async fn read_after_head<S: Store>(&self, slot: &mut Option<RoomState>, store: &S) -> Option<Vec<LogEntry>> {
        let head = slot.as_ref()?.head;
        match store.log_after(self.id.as_str(), head).await {
            Ok(LogTail::Entries(entries)) => Some(entries),
            Ok(LogTail::Pruned) | Err(_) => {
                tracing::warn!(doc = %self.id, "updates of another instance not in the log: reloading the room");
                self.reload(slot, store).await;
                if let Some(state) = slot.as_mut() {
                    for out in state.subscribers.values() {
                        out.ctl.close(CLOSE_RESYNC);
                    }
                }
                None
            }
        }
    }

    /// Takes in presence from instance `origin`, if the room is loaded: kept (expired unless
    /// refreshed, see `Presence::remote`) and passed to the local subscribers.
    #[allow(clippy::too_many_arguments)] // One event's fields, passed through.
    pub(crate) async fn remote_presence(
        &self,
        origin: u64,
        peer: u64,
        user: String,
        clock: u64,
        presence: Option<String>,
        age_ms: u64,
    ) {
        let mut guard = self.state.lock().await;
        if let Some(state) = guard.as_mut() {
            let now = self.ctx.now_ms();
            if let Some(event) = state
                .presence
                .remote(&self.id, origin, peer, user, clock, presence, age_ms, now)
            {
                state.broadcast(&self.ctx, REMOTE_SESSION, event);
            }
        }
    }

    /// Removes the presence of instance `origin`'s connections (the instance is dead) and
    /// tells the local subscribers.
    pub(crate) async fn drop_origin(&self, origin: u64) {
        let mut guard = self.state.lock().await;
        if let Some(state) = guard.as_mut() {
            for event in state.presence.drop_origin(&self.id, origin) {
                state.broadcast(&self.ctx, REMOTE_SESSION, event);
            }
        }
    }

    /// Publishes the presence of this instance's own connections in the room to the other
    /// instances (asked by one that just took the room up, or after a reconnect).
    pub(crate) async fn announce_presence(&self) {
        let guard = self.state.lock().await;
        if let Some(state) = guard.as_ref() {
            for (user, entry, age_ms) in state.presence.local_states(self.ctx.now_ms()) {
                let shared = FanoutEvent::Presence {
                    peer: entry.client_id,
                    user,
                    clock: entry.clock,
                    state: entry.state,
                    age_ms,
                };
                self.ctx.fanout.publish(self.ctx.instance, &self.id, shared);
            }
        }
    }

    /// Removes and announces the presence states not refreshed in time. A room busy right now
    /// is left for the next sweep.
    pub(crate) fn expire_presence(&self, now_ms: u64) {
        let Ok(mut guard) = self.state.try_lock() else { return };
        if let Some(state) = guard.as_mut() {
            for event in state.presence.expire(&self.id, now_ms) {
                state.broadcast(&self.ctx, NO_SESSION, event);
            }
            // Each instance expires its own copy of the other instances' states.
            for event in state.presence.expire_remote(&self.id, now_ms) {
                state.broadcast(&self.ctx, REMOTE_SESSION, event);
            }
        }
    }

    /// One sweep of the room (skipped if it is busy): settles finished commits, stores what
    /// failed commits left, and evicts the live document of a subscribed room unused since the
    /// previous sweep. Returns whether the log grew since the last sweep (time to consider
    /// compacting it).
    pub(crate) async fn sweep<S: Store>(&self, store: &S) -> bool {
        let Ok(mut guard) = self.state.try_lock() else {
            return false;
        };
        let slot: &mut Option<RoomState> = &mut guard;
        self.settle(slot, store, false).await;
        if let Err(e) = self.recover(slot, store).await {
            tracing::warn!(doc = %self.id, error = %e, "storing changes whose commit failed earlier failed again");
        }
        let Some(state) = slot.as_mut() else { return false };
        if !state.subscribers.is_empty() {
            if state.active {
                state.active = false;
            } else if state.live.is_some() && state.unstored.is_empty() && state.inflight.is_empty() {
                // Subscribed, but nobody wrote to it or resumed it for a whole sweep interval.
                // (A room without subscribers is unloaded instead.)
                state.evict();
                tracing::debug!(doc = %self.id, "evicted the live document of an idle room");
            }
        }
        if state.head > state.checked_head {
            state.checked_head = state.head;
            true
        } else {
            false
        }
    }

    /// Unloads the room if nobody has been subscribed to it for two sweeps in a row and it
    /// holds nothing unstored. Returns whether the room may be removed from the registry
    /// (unloaded now, or never loaded). Never waits: a busy room stays.
    pub(crate) fn try_unload(&self) -> bool {
        let Ok(mut guard) = self.state.try_lock() else {
            return false;
        };
        match guard.as_mut() {
            None => true,
            Some(state) if state.subscribers.is_empty() && state.unstored.is_empty() && state.inflight.is_empty() => {
                state.idle_sweeps += 1;
                if state.idle_sweeps >= 2 {
                    *guard = None;
                    self.ctx.metrics.rooms.dec();
                    true
                } else {
                    false
                }
            }
            Some(state) => {
                state.idle_sweeps = 0;
                false
            }
        }
    }
}

/// The part of a push done under the lock: answered at once, or committing.
enum Begun {
    Done(Result<Cursor, Refused>),
    Committing {
        /// Resolves when the commit has finished (whatever its result).
        commit: futures_util::future::BoxFuture<'static, ()>,
        /// The outcome, once the room settled the commit.
        outcome: oneshot::Receiver<Result<Cursor, Refused>>,
        /// The commits of the server's own writes the push caused (system messages), queued
        /// after it: settled after it.
        also: Vec<futures_util::future::BoxFuture<'static, ()>>,
    },
}

impl RoomState {
    /// Queues, for the native session that pushed `batch` (if it is still subscribed), the
    /// `Ack` of its batch at `cursor`: under the room's lock, so that it reaches the pusher in
    /// order with the updates the room broadcasts (no later cursor overtakes it).
    fn ack(&self, doc: &DocId, pusher: Option<(u64, u64)>, cursor: Cursor) {
        let Some((session, batch)) = pusher else { return };
        if let Some(out) = self.subscribers.get(&session) {
            let ack = RoomEvent::Ack {
                doc: doc.clone(),
                batch,
                cursor,
            };
            out.send(Outgoing::Event(SharedEvent::new(ack)));
        }
    }

    /// Whether a failed commit left something to recover before anything else is stored: an
    /// update the room must store itself, or a failure not settled yet.
    fn needs_recovery(&self, gate: &Gate) -> bool {
        !self.unstored.is_empty() || gate.failed_through() >= self.epoch
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
    fn take_stored(&mut self, ctx: &RoomCtx, doc: &DocId, entries: Vec<LogEntry>) {
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
            self.stored_bytes += entry.update.len() as u64;
            self.remember(entry.cursor, &entry.update);
            let event = RoomEvent::Update {
                doc: doc.clone(),
                cursor: entry.cursor,
                update: entry.update,
            };
            self.broadcast(ctx, NO_SESSION, event);
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
    fn recent_after(&self, cursor: Cursor) -> Option<Vec<LogEntry>> {
        let first = self.recent.front()?;
        let last = self.recent.back()?;
        if last.cursor != self.head || first.cursor > cursor + 1 {
            return None;
        }
        Some(self.recent.iter().filter(|e| e.cursor > cursor).cloned().collect())
    }

    /// Sends `event` to every subscriber but `except`. A subscriber whose queue is full is told
    /// to resync and dropped from the room: never silently left behind.
    fn broadcast(&mut self, ctx: &RoomCtx, except: u64, event: RoomEvent) {
        // Presence is shared with the other instances here, where every presence change of the
        // room passes; updates are published once stored (`Room::stored`).
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
                age_ms: 0,
            };
            ctx.fanout.publish(ctx.instance, doc, shared);
        }
        // So are the ephemeral events: typing, Hocuspocus stateless messages.
        if except != REMOTE_SESSION {
            let shared = match &event {
                RoomEvent::Typing { peer, user, typing, .. } => Some(FanoutEvent::Typing {
                    peer: *peer,
                    user: user.clone(),
                    typing: *typing,
                }),
                RoomEvent::Stateless { payload, .. } => Some(FanoutEvent::Stateless {
                    payload: payload.clone(),
                }),
                _ => None,
            };
            if let Some(shared) = shared {
                ctx.fanout.publish(ctx.instance, event.doc(), shared);
            }
        }
        let event = SharedEvent::new(event);
        self.subscribers
            .retain(|session, out| *session == except || out.send(Outgoing::Event(Arc::clone(&event))));
    }
}

/// Whether every block `update` inserts is integrated in `doc` and every deletion it carries is
/// applied. A y-protocols SyncStep2 always carries the sender's whole delete set (deletions have
/// no clock), so without this check every reconnect of a Yjs client would be checked, applied
/// and its delete set logged again. Anything this cannot prove redundant (including undecodable
/// bytes, which the push then refuses) counts as new.
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

#[cfg(test)]
mod tests {
    use driftsync_engine::doc::{encode_state, new_doc, text, text_delete, text_insert};
    use driftsync_engine::store::{CompactionPolicy, SqliteStore};
    use tokio_util::sync::CancellationToken;

    use super::*;
    use crate::commit::RunCommitter;
    use crate::event::ConnCtl;
    use crate::fanout::NoFanout;
    use crate::queue;
    use crate::rooms::Rooms;

    fn rooms() -> Rooms {
        Rooms::new(RoomCtx::new(
            Arc::new(Metrics::new()),
            Arc::new(NoFanout),
            1,
            u64::MAX,
            driftsync_engine::clock::DEFAULT_MAX_CLOCK_SKEW_MS,
            Arc::default(),
        ))
    }

    fn committer(store: &Arc<SqliteStore>) -> Committer {
        Committer::start(Arc::clone(store), |run: RunCommitter<SqliteStore>| {
            tokio::spawn(run.run());
        })
    }

    fn pusher() -> Pusher<'static> {
        Pusher {
            session: 1,
            user: None,
            origin: None,
        }
    }

    /// A subscriber's queue, so that sweeps keep the room (and evict its document instead of
    /// unloading it).
    fn subscriber(metrics: &Arc<Metrics>) -> (Outbound, queue::Receiver<Outgoing>) {
        let (tx, rx) = queue::channel(16);
        let ctl = Arc::new(ConnCtl::new(CancellationToken::new(), Arc::clone(metrics)));
        (Outbound { tx, ctl }, rx)
    }

    #[tokio::test]
    async fn an_idle_room_evicts_its_document_and_reloads_it_on_the_next_push() {
        let store = Arc::new(SqliteStore::open_in_memory().await.unwrap());
        let committer = committer(&store);
        let rooms = rooms();
        let id = DocId::new("notes").unwrap();
        let room = rooms.get(&id);
        let writer = new_doc(5).unwrap();
        let a = text_insert(&writer, 0, "hello").unwrap();
        let b = text_insert(&writer, 5, " world").unwrap();
        let pushed = room.push(&store, &committer, pusher(), a, false).await;
        assert_eq!(pushed.await.unwrap(), 1);
        let (out, _rx) = subscriber(&rooms.ctx().metrics);
        room.resume(&*store, 7, &out, 1, &state_vector(&new_doc(9).unwrap()))
            .await
            .unwrap();
        // The first sweep sees the push, the second finds the room unused and evicts.
        let policy = CompactionPolicy::default();
        rooms.sweep(&*store, &policy).await;
        assert!(room.state.lock().await.as_ref().unwrap().live.is_some());
        rooms.sweep(&*store, &policy).await;
        {
            let guard = room.state.lock().await;
            let state = guard.as_ref().unwrap();
            assert!(state.live.is_none(), "evicted");
            assert_eq!(state.head, 1);
            assert_eq!(state.subscribers.len(), 1, "subscribers stay");
        }
        // The next push reloads the document from the store and applies on top of it.
        let pushed = room.push(&store, &committer, pusher(), b, false).await;
        assert_eq!(pushed.await.unwrap(), 2);
        let guard = room.state.lock().await;
        let state = guard.as_ref().unwrap();
        assert_eq!(text(state.live.as_ref().unwrap()), "hello world");
        // Recent updates restart after an eviction: only what they hold is answered from them.
        assert_eq!(state.recent_after(1).map(|e| e.len()), Some(1));
        assert!(state.recent_after(0).is_none());
        assert_eq!(state.recent_after(2).map(|e| e.len()), Some(0));
    }

    #[tokio::test]
    async fn pushes_pipeline_and_settle_in_order() {
        let store = Arc::new(SqliteStore::open_in_memory().await.unwrap());
        let committer = committer(&store);
        let rooms = rooms();
        let room = rooms.get(&DocId::new("chat-ish").unwrap());
        let writer = new_doc(5).unwrap();
        let mut outcomes = Vec::new();
        // Every push is applied and queued before any commit is awaited.
        for i in 0..20u32 {
            let update = text_insert(&writer, i, "x").unwrap();
            outcomes.push(room.push(&store, &committer, pusher(), update, false).await);
        }
        assert!(
            !room.state.lock().await.as_ref().unwrap().inflight.is_empty(),
            "commits in flight"
        );
        // Awaited in reverse: whoever settles first settles everything before it.
        let mut cursors = Vec::new();
        for outcome in outcomes.into_iter().rev() {
            cursors.push(outcome.await.unwrap());
        }
        cursors.reverse();
        assert_eq!(cursors, (1..=20).collect::<Vec<_>>());
        let guard = room.state.lock().await;
        let state = guard.as_ref().unwrap();
        assert_eq!(state.head, 20);
        assert!(state.inflight.is_empty());
        assert_eq!(text(state.live.as_ref().unwrap()).len(), 20);
    }

    #[tokio::test]
    async fn a_resume_waits_for_the_commits_in_flight() {
        let store = Arc::new(SqliteStore::open_in_memory().await.unwrap());
        let committer = committer(&store);
        let rooms = rooms();
        let room = rooms.get(&DocId::new("notes").unwrap());
        let writer = new_doc(5).unwrap();
        let a = text_insert(&writer, 0, "abc").unwrap();
        let outcome = room.push(&store, &committer, pusher(), a, false).await;
        // A reader at the head before the push: its answer must hold the update in flight
        // (it was broadcast before the reader subscribed) and a cursor covering it.
        let (out, _rx) = subscriber(&rooms.ctx().metrics);
        let reader = new_doc(6).unwrap();
        let answer = room.resume(&*store, 9, &out, 0, &state_vector(&reader)).await.unwrap();
        assert_eq!(answer.cursor, 1);
        driftsync_engine::doc::apply_bytes(&reader, &answer.update.unwrap()).unwrap();
        assert_eq!(text(&reader), "abc");
        assert_eq!(outcome.await.unwrap(), 1);
    }

    /// A store whose appends can be held (until released) and made to fail.
    struct GatedStore {
        inner: SqliteStore,
        fail: std::sync::atomic::AtomicBool,
        /// Appends wait for a permit while `hold` is set.
        hold: std::sync::atomic::AtomicBool,
        permits: tokio::sync::Semaphore,
        appends: std::sync::atomic::AtomicUsize,
    }

    impl Store for GatedStore {
        async fn append(&self, batch: &[Append]) -> driftsync_engine::Result<Vec<Appended>> {
            use std::sync::atomic::Ordering::SeqCst;
            self.appends.fetch_add(1, SeqCst);
            if self.hold.load(SeqCst) {
                self.permits.acquire().await.expect("semaphore").forget();
            }
            if self.fail.load(SeqCst) {
                return Err(driftsync_engine::Error::Invalid("appends are failing (test)".into()));
            }
            self.inner.append(batch).await
        }
        async fn load(&self, doc: &str) -> driftsync_engine::Result<Option<driftsync_engine::store::StoredDoc>> {
            self.inner.load(doc).await
        }
        async fn log_after(&self, doc: &str, after: Cursor) -> driftsync_engine::Result<LogTail> {
            self.inner.log_after(doc, after).await
        }
        async fn meta(&self, doc: &str) -> driftsync_engine::Result<Option<driftsync_engine::store::DocMeta>> {
            self.inner.meta(doc).await
        }
        async fn compact(
            &self,
            doc: &str,
            policy: &CompactionPolicy,
        ) -> driftsync_engine::Result<Option<driftsync_engine::store::Compacted>> {
            self.inner.compact(doc, policy).await
        }
        async fn documents(&self) -> driftsync_engine::Result<Vec<String>> {
            self.inner.documents().await
        }
        async fn claim_client(&self, client_id: u64, owner: &str) -> driftsync_engine::Result<String> {
            self.inner.claim_client(client_id, owner).await
        }
        async fn device(&self) -> driftsync_engine::Result<driftsync_engine::store::DeviceIdentity> {
            self.inner.device().await
        }
        async fn record_local(&self, doc: &str, update: &[u8]) -> driftsync_engine::Result<u64> {
            self.inner.record_local(doc, update).await
        }
        async fn outbox(
            &self,
            doc: Option<&str>,
        ) -> driftsync_engine::Result<Vec<driftsync_engine::store::OutboxEntry>> {
            self.inner.outbox(doc).await
        }
        async fn acknowledge(&self, doc: &str, batch: u64) -> driftsync_engine::Result<()> {
            self.inner.acknowledge(doc, batch).await
        }
        async fn server_cursor(&self, doc: &str) -> driftsync_engine::Result<Cursor> {
            self.inner.server_cursor(doc).await
        }
        async fn record_remote(&self, doc: &str, cursor: Cursor, updates: &[Vec<u8>]) -> driftsync_engine::Result<()> {
            self.inner.record_remote(doc, cursor, updates).await
        }
    }

    #[tokio::test]
    async fn a_failed_commit_fails_the_later_ones_in_flight_and_the_room_stores_them_in_order() {
        use std::sync::atomic::Ordering::SeqCst;
        let store = Arc::new(GatedStore {
            inner: SqliteStore::open_in_memory().await.unwrap(),
            fail: false.into(),
            hold: false.into(),
            permits: tokio::sync::Semaphore::new(0),
            appends: 0.into(),
        });
        let committer = Committer::start(Arc::clone(&store), |run: RunCommitter<GatedStore>| {
            tokio::spawn(run.run());
        });
        let rooms = rooms();
        let room = rooms.get(&DocId::new("notes").unwrap());
        let writer = new_doc(5).unwrap();
        let a = text_insert(&writer, 0, "a").unwrap();
        let b = text_insert(&writer, 1, "b").unwrap();
        let c = text_insert(&writer, 2, "c").unwrap();
        // A's commit is held in the store; B, which builds on A, is queued behind it.
        store.hold.store(true, SeqCst);
        let first = room.push(&store, &committer, pusher(), a, false).await;
        while store.appends.load(SeqCst) == 0 {
            tokio::task::yield_now().await;
        }
        let second = room.push(&store, &committer, pusher(), b, false).await;
        // A fails. B's commit would succeed on its own, but must not be stored without A.
        store.fail.store(true, SeqCst);
        store.hold.store(false, SeqCst);
        store.permits.add_permits(1);
        let refused = |r: Result<Cursor, Refused>| {
            matches!(
                r,
                Err(Refused {
                    code: ErrorCode::StoreUnavailable,
                    ..
                })
            )
        };
        assert!(refused(first.await));
        store.fail.store(false, SeqCst);
        assert!(refused(second.await), "B must fail with A");
        assert_eq!(store.appends.load(SeqCst), 1, "B was never written");
        {
            let guard = room.state.lock().await;
            let state = guard.as_ref().unwrap();
            assert_eq!(state.unstored.len(), 2, "both kept to be stored by the room, in order");
            assert_eq!(text(state.live.as_ref().unwrap()), "ab");
        }
        // The next push stores A and B first (as the server's own), then itself.
        let third = room.push(&store, &committer, pusher(), c, false).await;
        assert_eq!(third.await.unwrap(), 3);
        let stored = store.load("notes").await.unwrap().unwrap();
        let loaded = driftsync_engine::doc::load_document("notes", &stored, 1).unwrap();
        assert_eq!(text(&loaded), "abc");
        assert_eq!(stored.head, 3);
    }

    #[tokio::test]
    async fn other_content_under_a_stored_batch_id_is_stored_by_the_room() {
        let store = Arc::new(SqliteStore::open_in_memory().await.unwrap());
        let committer = committer(&store);
        let rooms = rooms();
        let room = rooms.get(&DocId::new("notes").unwrap());
        let writer = new_doc(5).unwrap();
        let batch = |n| Pusher {
            session: 1,
            user: None,
            origin: Some(Origin { client_id: 5, batch: n }),
        };
        let a = text_insert(&writer, 0, "a").unwrap();
        let b = text_insert(&writer, 1, "b").unwrap();
        assert_eq!(
            room.push(&store, &committer, batch(1), a, false).await.await.unwrap(),
            1
        );
        // Batch 1 again, with other content: acknowledged at the original's cursor…
        assert_eq!(
            room.push(&store, &committer, batch(1), b, false).await.await.unwrap(),
            1
        );
        // …and stored by the room before anything else, so that the store holds what readers got.
        let c = text_insert(&writer, 2, "c").unwrap();
        room.push(&store, &committer, batch(2), c, false).await.await.unwrap();
        let stored = store.load("notes").await.unwrap().unwrap();
        let loaded = driftsync_engine::doc::load_document("notes", &stored, 1).unwrap();
        assert_eq!(text(&loaded), "abc");
    }

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
}
