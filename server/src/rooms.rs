//! The registry of rooms: finds or creates the room of a document, passes in what other
//! instances stored or announced, and sweeps — unloading idle rooms, evicting the live documents
//! of subscribed rooms unused for a sweep interval, compacting logs that grew.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, PoisonError};

use driftsync_engine::store::{CompactionPolicy, Store};
use driftsync_protocol::{Cursor, DocId};

use crate::metrics::Metrics;
use crate::room::{Room, RoomCtx};

/// How many rooms one store query of the head check covers.
const HEAD_CHECK_CHUNK: usize = 500;

/// The registry of rooms.
pub(crate) struct Rooms {
    /// Ordered, so that sweeps visit rooms in one order.
    map: Mutex<BTreeMap<String, Arc<Room>>>,
    /// What every room shares with the rest of the server.
    ctx: Arc<RoomCtx>,
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
        if let Some(room) = map.get(id.as_str()) {
            return Arc::clone(room);
        }
        let room = Arc::new(Room::new(id.clone(), Arc::clone(&self.ctx)));
        map.insert(id.as_str().to_string(), Arc::clone(&room));
        // Before the room loads: whatever another instance stores after the subscription is
        // active arrives through the fan-out, what it stored before is in the store.
        self.ctx.fanout.subscribe(self.ctx.instance, id);
        room
    }

    /// The room for `id` if it exists.
    pub(crate) fn existing(&self, id: &DocId) -> Option<Arc<Room>> {
        self.map
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(id.as_str())
            .cloned()
    }

    /// Whether a live connection of `user` here is subscribed to `room` (push notifications).
    pub(crate) async fn user_in_room(&self, room: &str, user: &str) -> bool {
        let room = self
            .map
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(room)
            .cloned();
        match room {
            Some(room) => room.has_subscriber(user).await,
            None => false,
        }
    }

    /// The users with a live connection here subscribed to any room.
    pub(crate) async fn users_subscribed(&self) -> std::collections::BTreeSet<String> {
        let mut users = std::collections::BTreeSet::new();
        for room in self.all() {
            room.subscribed_users(&mut users).await;
        }
        users
    }

    /// Every room, in id order.
    fn all(&self) -> Vec<Arc<Room>> {
        self.map
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .values()
            .cloned()
            .collect()
    }

    /// Takes in an update another instance stored at `cursor` (see [`crate::fanout`]). Only a
    /// loaded room cares: an unloaded one will read it from the store when it loads.
    pub(crate) async fn remote_update<S: Store>(&self, store: &S, doc: &DocId, cursor: Cursor, update: Option<&[u8]>) {
        if let Some(room) = self.existing(doc) {
            room.remote_update(store, cursor, update).await;
        }
    }

    /// Passes presence from instance `origin` to the local subscribers of a loaded room.
    #[allow(clippy::too_many_arguments)] // One event's fields, passed through.
    pub(crate) async fn remote_presence(
        &self,
        doc: &DocId,
        origin: u64,
        peer: u64,
        user: String,
        clock: u64,
        state: Option<String>,
        age_ms: u64,
    ) {
        if let Some(room) = self.existing(doc) {
            room.remote_presence(origin, peer, user, clock, state, age_ms).await;
        }
    }

    /// Passes an ephemeral event of another instance's connection (typing, a stateless
    /// message) to the local subscribers of a loaded room.
    pub(crate) async fn remote_relay(&self, doc: &DocId, event: crate::event::RoomEvent) {
        if let Some(room) = self.existing(doc) {
            room.relay(crate::room::REMOTE_SESSION, event).await;
        }
    }

    /// Another instance took up `doc`: announce this instance's connections in it.
    pub(crate) async fn presence_query(&self, doc: &DocId) {
        if let Some(room) = self.existing(doc) {
            room.announce_presence().await;
        }
    }

    /// The subscription to `doc`'s events became active: the room catches up with the store
    /// (what was published before may have been missed) and asks the other instances for the
    /// presence of their connections in it.
    pub(crate) async fn subscribed<S: Store>(&self, store: &S, doc: &DocId) {
        let Some(room) = self.existing(doc) else { return };
        if let Ok(heads) = store.heads(&[doc.as_str()]).await {
            if let Some(&head) = heads.first() {
                if room.catch_up(store, head).await {
                    self.ctx.metrics.head_check_repairs.inc();
                }
            }
        }
        self.ctx
            .fanout
            .publish(self.ctx.instance, doc, crate::fanout::FanoutEvent::PresenceQuery);
    }

    /// Instance `origin` is dead: its connections' presence is removed from every room.
    pub(crate) async fn drop_origin(&self, origin: u64) {
        for room in self.all() {
            room.drop_origin(origin).await;
        }
    }

    /// After events may have been lost in bulk (a reconnect, a full queue), or when an instance
    /// thought dead is back: every room re-announces its connections and asks for the others'.
    pub(crate) async fn exchange_presence(&self) {
        for room in self.all() {
            room.announce_presence().await;
            self.ctx
                .fanout
                .publish(self.ctx.instance, &room.id, crate::fanout::FanoutEvent::PresenceQuery);
        }
    }

    /// Compares the heads of the loaded rooms without commits in flight with the store's, in
    /// one query per few hundred rooms, and catches up those behind: the repair path for a
    /// lost last message or a fan-out that is down. Returns how many were behind.
    pub(crate) async fn catch_up_all<S: Store>(&self, store: &S) -> usize {
        let live: Vec<(Arc<Room>, Cursor)> = self
            .all()
            .into_iter()
            .filter_map(|room| room.idle_head().map(|head| (room, head)))
            .collect();
        let mut behind = 0;
        for chunk in live.chunks(HEAD_CHECK_CHUNK) {
            let ids: Vec<&str> = chunk.iter().map(|(room, _)| room.id.as_str()).collect();
            let heads = match store.heads(&ids).await {
                Ok(heads) => heads,
                Err(e) => {
                    tracing::warn!(error = %e, "head check: reading the store's heads failed");
                    self.ctx.metrics.store_errors.inc();
                    return behind;
                }
            };
            for ((room, head), store_head) in chunk.iter().zip(heads) {
                if store_head > *head && room.catch_up(store, store_head).await {
                    tracing::debug!(doc = %room.id, from = head, to = store_head, "caught up with the store");
                    self.ctx.metrics.head_check_repairs.inc();
                    behind += 1;
                }
            }
        }
        behind
    }

    /// Sweeps every room (see [`Room::sweep`]), compacts the logs of loaded rooms that grew,
    /// and unloads rooms nobody has been subscribed to for two sweeps in a row. Only a room
    /// nothing else holds is removed (checked under the map lock), so a document never has two
    /// live rooms. Every acknowledged write is already committed, so unloading flushes nothing.
    pub(crate) async fn sweep<S: Store>(&self, store: &S, policy: &CompactionPolicy) {
        for room in self.all() {
            if room.sweep(store).await {
                compact_if_due(store, room.id.as_str(), policy, &self.ctx.metrics).await;
            }
        }
        let mut unloaded = Vec::new();
        self.map
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .retain(|_, room| {
                if Arc::strong_count(room) > 1 || !room.try_unload() {
                    return true;
                }
                self.ctx.fanout.unsubscribe(self.ctx.instance, &room.id);
                unloaded.push(room.id.clone());
                false
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
        for room in self.all() {
            compact_grown(store, &room.id, policy).await;
        }
    }

    /// Removes and announces the presence states of every loaded room not refreshed in time.
    /// A room busy right now is left for the next sweep.
    pub(crate) fn expire_presence(&self) {
        let now = self.ctx.now_ms();
        for room in self.all() {
            room.expire_presence(now);
        }
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
