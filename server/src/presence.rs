//! Presence shared by both protocols: one y-protocols awareness table per room, and which
//! connection controls which awareness client.
//!
//! Native connections and Yjs clients see each other's presence, so both write into the same
//! [`AwarenessTable`]. A Yjs client names itself with its Yjs client id and keeps its own clock; a
//! native connection uses its session id as client id and the room keeps its clock. Knowing which
//! connection controls which client lets the room remove and announce every state of a connection
//! that leaves, so no ghost remains, whatever protocol the watchers speak. States not refreshed
//! for [`PRESENCE_TIMEOUT`] are removed and announced by a per-server sweeper (every
//! [`PRESENCE_SWEEP`]).
//!
//! # Who may set what
//! A connection sets and clears only the awareness entries it introduced:
//! * A native connection has exactly one entry, its session id, with a clock the room keeps. It
//!   always wins that id: should a Yjs connection hold it (it cannot while the session is
//!   subscribed, see below), the native state replaces it with a clock above it.
//! * A Yjs connection owns the client ids it announces first. While the table remembers such an
//!   id (its state, or after a removal its clock, until [`PRESENCE_TIMEOUT`] after the last
//!   change), it belongs to the announcing connection's *user*: a new connection of the same user
//!   takes it over by setting a state (a reconnecting y-websocket client keeps its client id, and
//!   its old connection may not be closed yet), a connection of another user may not set it, and
//!   only the connection controlling it clears it. A Yjs connection never sets an id that is a
//!   native entry or the session id of one of the room's subscribers.
//! * Clocks are bounded, so that they stay exact in JavaScript (below 2^53) and nobody freezes an
//!   entry: a new id, or one whose state was removed, is announced with a clock of at most
//!   [`MAX_FIRST_CLOCK`] (y-protocols clients start at 0 and add one per change); an entry with
//!   a state moves at most [`MAX_CLOCK_STEP`] above the clock the table knows.
//! * States are bounded in bytes: [`MAX_STATE_BYTES`] per entry, [`MAX_CONNECTION_STATE_BYTES`]
//!   per connection, [`MAX_ROOM_STATE_BYTES`] per room, and a connection controls at most
//!   [`MAX_CLIENTS_PER_CONNECTION`] ids. [`Presence::snapshot_bytes`] tells what answering a
//!   query for every state costs.
//!
//! An entry that breaks a rule is dropped: not applied, not broadcast, and logged (one line per
//! message). Removals of entries a connection does not control are dropped silently: stock Yjs
//! clients send them for every peer they timed out. Read-only connections set their own
//! presence like any other: presence is not document content, and a viewer's cursor is normal.
//!
//! Presence of other server instances does not enter this table: it arrives through the
//! fan-out (`Room::remote_presence`) and is kept beside it ([`Presence::remote`]): relayed to
//! the local subscribers, shown to new ones, and expired like local states when not refreshed
//! for [`PRESENCE_TIMEOUT`] — an instance that crashed announces no departures, and its
//! connections' states must not outlive it. The rules are not applied again: every instance
//! applies them to its own connections before broadcasting (and so publishing) anything, so
//! what arrives was checked there. (An instance cannot see, though, the ids that connections of
//! *other* instances own.) The remote states of a room are bounded by
//! [`MAX_ROOM_STATE_BYTES`] too.
//!
//! Everything here is sans-IO: methods take the current time and return the room events to
//! broadcast; the room holds its lock around them.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use driftsync_protocol::yjs::{AwarenessEntry, AwarenessTable};
use driftsync_protocol::DocId;

use crate::event::RoomEvent;

/// A presence state not refreshed for this long is removed and announced (y-protocols' value).
pub(crate) const PRESENCE_TIMEOUT: Duration = Duration::from_secs(30);

/// How often the sweeper looks for expired states: a state lives at most this much longer than
/// [`PRESENCE_TIMEOUT`].
pub(crate) const PRESENCE_SWEEP: Duration = Duration::from_secs(5);

/// The most awareness clients one connection may control in one room. A Yjs client controls one
/// (its own), a native connection one (its session); the bound keeps a misbehaving client from
/// filling the table with invented ids.
const MAX_CLIENTS_PER_CONNECTION: usize = 8;

/// The largest presence state, in bytes of JSON text. Stock awareness states (a user's name and
/// colour, a cursor) take a few hundred bytes.
pub(crate) const MAX_STATE_BYTES: usize = 64 * 1024;

/// The most bytes of states the clients one connection controls may hold in one room together.
pub(crate) const MAX_CONNECTION_STATE_BYTES: usize = 256 * 1024;

/// The most bytes of states one room's table holds: room for thousands of ordinary states, and a
/// bound on what one answer to "every state" (a Yjs greeting, a `QueryAwareness`, a native
/// resume) costs.
pub(crate) const MAX_ROOM_STATE_BYTES: usize = 2 * 1024 * 1024;

/// The largest native state that typing is mirrored into (a name and a colour take a few dozen
/// bytes). Mirroring re-sends the whole state to every subscriber for a typing frame of a few
/// bytes: without the bound, a big state would turn each cheap frame into a large broadcast.
const MAX_MIRRORED_STATE_BYTES: usize = 4 * 1024;

/// A native connection's typing starts to be mirrored at most once per this interval (clients
/// announce typing every few seconds); "stopped" always is. So a connection flipping typing as
/// fast as its rate limit allows causes at most two mirrored states per interval.
const TYPING_MIRROR_INTERVAL_MS: u64 = 1000;

/// The most states of other instances' connections one room keeps (each instance already bounds
/// its own; this bounds what small or empty states could add up to).
const MAX_REMOTE_STATES: usize = 4096;

/// The largest clock a client id may be announced with when the table knows no state of it (a
/// new id, or one whose state was removed). y-protocols clients start at 0 and add one per
/// change, so legitimate clocks stay far below it.
pub(crate) const MAX_FIRST_CLOCK: u64 = 1 << 32;

/// How far above the clock the table knows a client's next clock may be while the client has a
/// state. One per change is the norm; the slack covers the changes a client made while its
/// connection was dead but not yet detected (up to 45 s). With it, and the rate limit, a clock
/// needs centuries to reach 2^53.
pub(crate) const MAX_CLOCK_STEP: u64 = 10_000;

/// Wall-clock milliseconds since the Unix epoch (0 if the clock is before it): the server's
/// clock for the chat rules' stamp bound.
pub(crate) fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// Why a native connection's presence was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum InvalidState {
    /// The state is not JSON: peers (Yjs clients `JSON.parse` it) would fail on it.
    NotJson,
    /// The state is larger than [`MAX_STATE_BYTES`].
    TooLarge,
    /// The room's states would exceed [`MAX_ROOM_STATE_BYTES`].
    RoomFull,
}

/// Why an awareness entry from a Yjs connection was dropped (logged).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Refusal {
    /// The state is not JSON.
    NotJson,
    /// The state is larger than [`MAX_STATE_BYTES`].
    TooLarge,
    /// The connection's states would exceed [`MAX_CONNECTION_STATE_BYTES`].
    ConnectionFull,
    /// The room's states would exceed [`MAX_ROOM_STATE_BYTES`].
    RoomFull,
    /// The connection controls [`MAX_CLIENTS_PER_CONNECTION`] ids already.
    TooManyClients,
    /// The id is a native connection's entry.
    NativeClient,
    /// The id is the session id of a subscriber of the room.
    SessionId,
    /// The id belongs to another user.
    OtherUser,
    /// The clock is above [`MAX_FIRST_CLOCK`] for an id without a state.
    FirstClock,
    /// The clock is more than [`MAX_CLOCK_STEP`] above the known one.
    ClockJump,
}

/// What the room knows about one connection that set presence in it.
#[derive(Debug, Default)]
struct Owner {
    /// Its user id, carried by every presence event of its clients.
    user: String,
    /// The awareness clients it controls: removed and announced when it leaves.
    clients: BTreeSet<u64>,
    /// The clock of its native presence entry (client id = session id). It survives a leave so
    /// that a later re-subscription continues above the clock the table still remembers.
    clock: u64,
    /// When it left the room; the record is forgotten [`PRESENCE_TIMEOUT`] later, once the
    /// table has forgotten its clients too.
    left_ms: Option<u64>,
    /// Whether its native connection is typing: mirrored into its state as `"typing": true`.
    typing: bool,
    /// When its typing was last mirrored as started (ms).
    typing_mirrored_ms: Option<u64>,
}

/// Who an awareness client id belongs to, as long as the table remembers the id.
#[derive(Debug)]
struct Client {
    /// The user of the connection that introduced it (or last took it over).
    user: String,
    /// The connection controlling it: the only one that may clear it, and whose departure
    /// removes it. `None` once that connection left.
    controller: Option<u64>,
    /// Whether it is a native connection's entry (client id = its session id).
    native: bool,
}

/// One room's presence.
#[derive(Debug, Default)]
pub(crate) struct Presence {
    table: AwarenessTable,
    /// Per session that set presence here.
    owners: BTreeMap<u64, Owner>,
    /// Per awareness client id the table remembers: its owner. (Every id the table remembers
    /// was applied through this type, so every one has an entry.)
    clients: BTreeMap<u64, Client>,
    /// States of other instances' connections, by awareness client id.
    remote: BTreeMap<u64, Remote>,
    /// Remote peers removed recently: their clock at removal and when (ms). A state at or
    /// below that clock arriving late (a reordering fan-out) does not bring them back; kept
    /// for [`PRESENCE_TIMEOUT`], at most [`MAX_REMOTE_STATES`].
    remote_removed: BTreeMap<u64, (u64, u64)>,
    /// Bytes of state in `remote`.
    remote_bytes: usize,
}

/// A state set through another instance.
#[derive(Debug)]
struct Remote {
    /// The instance its connection is on.
    origin: u64,
    user: String,
    clock: u64,
    state: String,
    /// When it was last set or refreshed here.
    seen_ms: u64,
}

impl Presence {
    /// Applies awareness entries sent by Yjs connection `session` of `user` and returns the
    /// events announcing the applied ones.
    ///
    /// `is_session` tells whether an id is the session id of a subscriber of the room (a native
    /// connection there uses it as its client id): a Yjs connection may not introduce such an
    /// id. Entries breaking the rules of the module docs are dropped and logged; removals of
    /// clients `session` does not control are dropped silently.
    pub(crate) fn apply(
        &mut self,
        doc: &DocId,
        session: u64,
        user: &str,
        entries: &[AwarenessEntry],
        now_ms: u64,
        is_session: impl Fn(u64) -> bool,
    ) -> Vec<RoomEvent> {
        self.owner(session, user);
        let mut events = Vec::new();
        let mut refused = 0usize;
        let mut first_refused = None;
        for entry in entries {
            match self.judge(session, user, entry, &is_session) {
                Ok(Some(entry)) => {
                    let was_typing = is_typing(self.table.state(entry.client_id));
                    for applied in self.table.apply(&[entry], now_ms) {
                        if applied.state.is_some() {
                            self.control(session, user, applied.client_id, false);
                        }
                        let typing = is_typing(applied.state.as_deref());
                        let peer = applied.client_id;
                        events.push(event(doc, user, applied));
                        if typing != was_typing {
                            // Native clients learn typing from typing events, not from states.
                            events.push(RoomEvent::Typing {
                                doc: doc.clone(),
                                peer,
                                user: user.to_owned(),
                                typing,
                            });
                        }
                    }
                }
                Ok(None) => {}
                Err(reason) => {
                    refused += 1;
                    first_refused.get_or_insert((entry.client_id, entry.clock, reason));
                }
            }
        }
        if let Some((client, clock, reason)) = first_refused {
            tracing::info!(
                doc = %doc,
                session,
                user,
                refused,
                client,
                clock,
                ?reason,
                "awareness entries refused (the first one shown)"
            );
        }
        events
    }

    /// Decides on one entry of Yjs connection `session`: `Ok(Some(entry))` to apply (its state
    /// normalised), `Ok(None)` to drop silently (a stale entry, a removal of a client it does
    /// not control), `Err` to refuse.
    fn judge(
        &self,
        session: u64,
        user: &str,
        entry: &AwarenessEntry,
        is_session: &impl Fn(u64) -> bool,
    ) -> Result<Option<AwarenessEntry>, Refusal> {
        let id = entry.client_id;
        if entry.state.as_ref().is_some_and(|state| state.len() > MAX_STATE_BYTES) {
            return Err(Refusal::TooLarge);
        }
        let state = normalize(entry.state.clone()).map_err(|_| Refusal::NotJson)?;
        let controls = match self.clients.get(&id) {
            Some(client) => {
                let own = !client.native && client.user == user;
                if state.is_none() && (!own || client.controller != Some(session)) {
                    return Ok(None);
                }
                if client.native {
                    return Err(Refusal::NativeClient);
                }
                if !own {
                    return Err(Refusal::OtherUser);
                }
                client.controller == Some(session)
            }
            None => {
                if state.is_none() {
                    return Ok(None);
                }
                if is_session(id) {
                    return Err(Refusal::SessionId);
                }
                false
            }
        };
        if !controls && self.owners.get(&session).map_or(0, |o| o.clients.len()) >= MAX_CLIENTS_PER_CONNECTION {
            return Err(Refusal::TooManyClients);
        }
        let known_state = self.table.state(id);
        match self.table.clock(id) {
            Some(known) => {
                // What the table would not apply anyway (y-protocols: a greater clock, or an
                // equal one removing a state) is stale, not an offence.
                let newer = entry.clock > known || (entry.clock == known && state.is_none() && known_state.is_some());
                if !newer {
                    return Ok(None);
                }
                let most = if known_state.is_some() {
                    known.saturating_add(MAX_CLOCK_STEP)
                } else {
                    known.saturating_add(MAX_CLOCK_STEP).max(MAX_FIRST_CLOCK)
                };
                if entry.clock > most {
                    return Err(Refusal::ClockJump);
                }
            }
            None if entry.clock > MAX_FIRST_CLOCK => return Err(Refusal::FirstClock),
            None => {}
        }
        if let Some(new) = &state {
            let old = known_state.map_or(0, str::len);
            if self.table.state_bytes() - old + new.len() > MAX_ROOM_STATE_BYTES {
                return Err(Refusal::RoomFull);
            }
            let held: usize = self
                .owners
                .get(&session)
                .map(|owner| {
                    owner
                        .clients
                        .iter()
                        .filter_map(|&c| self.table.state(c))
                        .map(str::len)
                        .sum()
                })
                .unwrap_or(0);
            let held_here = if controls { old } else { 0 };
            if held - held_here + new.len() > MAX_CONNECTION_STATE_BYTES {
                return Err(Refusal::ConnectionFull);
            }
        }
        Ok(Some(AwarenessEntry {
            client_id: id,
            clock: entry.clock,
            state,
        }))
    }

    /// Sets (or with `None`, clears) the presence of native connection `session`: client id
    /// `session`, the connection's next clock. Returns the events to announce it.
    ///
    /// The id is the session's own: should a Yjs connection hold it, it is taken over with a
    /// clock above the one the table knows.
    pub(crate) fn set_native(
        &mut self,
        doc: &DocId,
        session: u64,
        user: &str,
        state: Option<String>,
        now_ms: u64,
    ) -> Result<Vec<RoomEvent>, InvalidState> {
        if state.as_ref().is_some_and(|state| state.len() > MAX_STATE_BYTES) {
            return Err(InvalidState::TooLarge);
        }
        let mut state = normalize(state)?;
        if state.is_some() && self.owners.get(&session).is_some_and(|owner| owner.typing) {
            state = with_typing(state, user, true);
        }
        self.set_native_entry(doc, session, user, state, now_ms)
    }

    /// Mirrors native connection `session`'s typing into its presence state (`"typing": true`,
    /// removed when it stops), so that Yjs clients, which keep typing in their awareness, see
    /// it. A connection without a state gets `{"user": …, "typing": true}`. Returns the events
    /// announcing the change: none if nothing changed, the room's states are full, the state is
    /// larger than [`MAX_MIRRORED_STATE_BYTES`], or typing started again within
    /// [`TYPING_MIRROR_INTERVAL_MS`] of the last start (native connections still get the typing
    /// event itself).
    pub(crate) fn set_native_typing(
        &mut self,
        doc: &DocId,
        session: u64,
        user: &str,
        typing: bool,
        now_ms: u64,
    ) -> Vec<RoomEvent> {
        let owner = self.owner(session, user);
        if owner.typing == typing {
            return Vec::new();
        }
        if typing
            && owner
                .typing_mirrored_ms
                .is_some_and(|at| now_ms.saturating_sub(at) < TYPING_MIRROR_INTERVAL_MS)
        {
            return Vec::new();
        }
        let own = self
            .clients
            .get(&session)
            .is_some_and(|c| c.native && c.controller == Some(session));
        let current = if own { self.table.state(session) } else { None };
        if current.is_some_and(|state| state.len() > MAX_MIRRORED_STATE_BYTES) {
            return Vec::new();
        }
        let owner = self.owner(session, user);
        owner.typing = typing;
        if typing {
            owner.typing_mirrored_ms = Some(now_ms);
        }
        let current = if own { self.table.state(session) } else { None };
        if current.is_none() && !typing {
            return Vec::new();
        }
        let state = with_typing(current.map(str::to_owned), user, typing);
        if state.as_deref() == current {
            return Vec::new();
        }
        self.set_native_entry(doc, session, user, state, now_ms)
            .unwrap_or_default()
    }

    /// Sets native connection `session`'s entry to `state` (checked JSON): the next clock.
    fn set_native_entry(
        &mut self,
        doc: &DocId,
        session: u64,
        user: &str,
        state: Option<String>,
        now_ms: u64,
    ) -> Result<Vec<RoomEvent>, InvalidState> {
        if state.as_ref().is_some_and(|state| state.len() > MAX_STATE_BYTES) {
            return Err(InvalidState::TooLarge);
        }
        let old = self.table.state(session).map_or(0, str::len);
        let new = state.as_ref().map_or(0, String::len);
        if self.table.state_bytes() - old + new > MAX_ROOM_STATE_BYTES {
            return Err(InvalidState::RoomFull);
        }
        let known = self.table.clock(session).unwrap_or(0);
        let owner = self.owner(session, user);
        owner.clock = owner.clock.max(known) + 1;
        let entry = AwarenessEntry {
            client_id: session,
            clock: owner.clock,
            state,
        };
        self.control(session, user, session, true);
        let applied = self.table.apply(&[entry], now_ms);
        Ok(applied.into_iter().map(|entry| event(doc, user, entry)).collect())
    }

    /// Removes every state connection `session` controls and returns the events announcing the
    /// removals.
    pub(crate) fn leave(&mut self, doc: &DocId, session: u64, now_ms: u64) -> Vec<RoomEvent> {
        let Some(owner) = self.owners.get_mut(&session) else {
            return Vec::new();
        };
        owner.left_ms = Some(now_ms);
        owner.typing = false;
        let clients: Vec<u64> = std::mem::take(&mut owner.clients).into_iter().collect();
        let user = owner.user.clone();
        for client in &clients {
            if let Some(client) = self.clients.get_mut(client) {
                client.controller = None;
            }
        }
        // Yjs clients that were typing stop: native clients hear it as a typing event.
        let typing: Vec<u64> = clients
            .iter()
            .copied()
            .filter(|&c| !self.clients.get(&c).is_some_and(|c| c.native) && is_typing(self.table.state(c)))
            .collect();
        let mut events: Vec<RoomEvent> = self
            .table
            .remove(&clients)
            .into_iter()
            .map(|entry| event(doc, &user, entry))
            .collect();
        events.extend(typing.into_iter().map(|peer| RoomEvent::Typing {
            doc: doc.clone(),
            peer,
            user: user.clone(),
            typing: false,
        }));
        events
    }

    /// Removes the states not refreshed for [`PRESENCE_TIMEOUT`] and returns the events
    /// announcing the removals; forgets connections that left that long ago, and the owners of
    /// the ids the table forgot.
    pub(crate) fn expire(&mut self, doc: &DocId, now_ms: u64) -> Vec<RoomEvent> {
        let timeout = u64::try_from(PRESENCE_TIMEOUT.as_millis()).unwrap_or(u64::MAX);
        let removed = self.table.expire(now_ms, timeout);
        // The table forgets a client without a state once its last change is `timeout` old; a
        // departed connection's last change is no later than its departure, so its record can
        // go now too: nothing remembers a clock it would have to stay above.
        self.owners
            .retain(|_, owner| owner.left_ms.is_none_or(|left| now_ms.saturating_sub(left) < timeout));
        // An id the table forgot is free again: its owner is forgotten with it.
        let table = &self.table;
        self.clients.retain(|&id, _| table.clock(id).is_some());
        for owner in self.owners.values_mut() {
            owner.clients.retain(|&id| table.clock(id).is_some());
        }
        removed
            .into_iter()
            .map(|entry| {
                let user = self.user_of(entry.client_id);
                event(doc, &user, entry)
            })
            .collect()
    }

    /// Takes in a state another instance announced (`None`: removed) and returns the event to
    /// pass to the local subscribers, if it changes what they see. A state older than the one
    /// known (a lower clock) is ignored; one that would take the room's remote states beyond
    /// [`MAX_ROOM_STATE_BYTES`] too.
    #[allow(clippy::too_many_arguments)] // One event's fields, passed through.
    pub(crate) fn remote(
        &mut self,
        doc: &DocId,
        origin: u64,
        peer: u64,
        user: String,
        clock: u64,
        state: Option<String>,
        age_ms: u64,
        now_ms: u64,
    ) -> Option<RoomEvent> {
        if self.remote.get(&peer).is_some_and(|known| clock < known.clock) {
            return None;
        }
        // Expired on its owner's time: a re-announced state is as old as its last refresh.
        let seen_ms = now_ms.saturating_sub(age_ms);
        if let (Some(&(removed_at_clock, _)), true) = (self.remote_removed.get(&peer), state.is_some()) {
            if clock <= removed_at_clock {
                // Older than its removal, arriving late: it stays removed.
                return None;
            }
        }
        if let (Some(known), Some(state)) = (self.remote.get_mut(&peer), state.as_ref()) {
            if known.clock == clock && known.state == *state {
                // Re-announced (an answer to a presence query): still there, nothing new.
                known.seen_ms = known.seen_ms.max(seen_ms);
                known.origin = origin;
                return None;
            }
        }
        match &state {
            Some(_) => {
                self.remote_removed.remove(&peer);
            }
            None => {
                if self.remote_removed.len() < MAX_REMOTE_STATES || self.remote_removed.contains_key(&peer) {
                    self.remote_removed.insert(peer, (clock, now_ms));
                }
            }
        }
        let old = self.remote.remove(&peer);
        let old_bytes = old.as_ref().map_or(0, |old| old.state.len());
        self.remote_bytes -= old_bytes;
        match state {
            Some(state) => {
                let full = old.is_none() && self.remote.len() >= MAX_REMOTE_STATES;
                if full || self.remote_bytes + state.len() > MAX_ROOM_STATE_BYTES {
                    tracing::info!(doc = %doc, peer, "presence from another instance dropped: the room's remote states are full");
                    if let Some(old) = old {
                        self.remote_bytes += old.state.len();
                        self.remote.insert(peer, old);
                    }
                    return None;
                }
                self.remote_bytes += state.len();
                self.remote.insert(
                    peer,
                    Remote {
                        origin,
                        user: user.clone(),
                        clock,
                        state: state.clone(),
                        seen_ms,
                    },
                );
                Some(event(
                    doc,
                    &user,
                    AwarenessEntry {
                        client_id: peer,
                        clock,
                        state: Some(state),
                    },
                ))
            }
            None => old.map(|_| {
                event(
                    doc,
                    &user,
                    AwarenessEntry {
                        client_id: peer,
                        clock,
                        state: None,
                    },
                )
            }),
        }
    }

    /// Removes the remote states not refreshed for [`PRESENCE_TIMEOUT`] and returns the events
    /// announcing the removals to the local subscribers (each instance expires its own copy).
    pub(crate) fn expire_remote(&mut self, doc: &DocId, now_ms: u64) -> Vec<RoomEvent> {
        let timeout = u64::try_from(PRESENCE_TIMEOUT.as_millis()).unwrap_or(u64::MAX);
        self.remote_removed
            .retain(|_, &mut (_, at)| now_ms.saturating_sub(at) < timeout);
        let mut removed = Vec::new();
        let mut freed = 0;
        self.remote.retain(|&peer, remote| {
            if now_ms.saturating_sub(remote.seen_ms) < timeout {
                return true;
            }
            freed += remote.state.len();
            removed.push(event(
                doc,
                &remote.user,
                AwarenessEntry {
                    client_id: peer,
                    clock: remote.clock,
                    state: None,
                },
            ));
            false
        });
        self.remote_bytes -= freed;
        removed
    }

    /// Removes the remote states of connections on instance `origin` (found dead) and returns
    /// the events announcing the removals to the local subscribers.
    pub(crate) fn drop_origin(&mut self, doc: &DocId, origin: u64) -> Vec<RoomEvent> {
        let mut removed = Vec::new();
        let mut freed = 0;
        self.remote.retain(|&peer, remote| {
            if remote.origin != origin {
                return true;
            }
            freed += remote.state.len();
            removed.push(event(
                doc,
                &remote.user,
                AwarenessEntry {
                    client_id: peer,
                    clock: remote.clock,
                    state: None,
                },
            ));
            false
        });
        self.remote_bytes -= freed;
        removed
    }

    /// The states of this instance's own connections, with their users: what it re-announces
    /// to the other instances.
    /// With each, how long ago it was last set or refreshed (ms).
    pub(crate) fn local_states(&self, now_ms: u64) -> Vec<(String, AwarenessEntry, u64)> {
        self.table
            .snapshot()
            .into_iter()
            .map(|entry| {
                let age = self
                    .table
                    .last_seen(entry.client_id)
                    .map_or(0, |seen| now_ms.saturating_sub(seen));
                (self.user_of(entry.client_id), entry, age)
            })
            .collect()
    }

    /// The remote states as awareness entries.
    fn remote_entries(&self) -> impl Iterator<Item = AwarenessEntry> + '_ {
        self.remote.iter().map(|(&client_id, remote)| AwarenessEntry {
            client_id,
            clock: remote.clock,
            state: Some(remote.state.clone()),
        })
    }

    /// Every current state, local and remote, as one awareness entry list (for Yjs clients).
    pub(crate) fn snapshot(&self) -> Vec<AwarenessEntry> {
        let mut entries = self.table.snapshot();
        entries.extend(self.remote_entries());
        entries
    }

    /// The size in bytes of the awareness message holding every current state, as
    /// [`snapshot`](Self::snapshot) encoded for a Yjs client (exact), without building it: what
    /// answering a `QueryAwareness` (or greeting a Yjs connection) puts in the asker's queue.
    /// At most about [`MAX_ROOM_STATE_BYTES`] plus a few bytes per state. For a native
    /// connection, [`snapshot_for`](Self::snapshot_for) sends the same states as one frame each,
    /// a few dozen bytes more per state (document id, user).
    pub(crate) fn snapshot_bytes(&self) -> usize {
        // Remote states: their bytes and, per entry, at most 10 + 10 bytes of varints and 5 of
        // length (an upper bound; the table's own part is exact).
        self.table.snapshot_encoded_len() + self.remote_bytes + 25 * self.remote.len()
    }

    /// Every current state not controlled by `session`, as presence events (for a native
    /// connection that just resumed the document).
    pub(crate) fn snapshot_for(&self, doc: &DocId, session: u64) -> Vec<RoomEvent> {
        let local = self
            .table
            .snapshot()
            .into_iter()
            .filter(|entry| self.clients.get(&entry.client_id).and_then(|c| c.controller) != Some(session))
            .map(|entry| {
                let user = self.user_of(entry.client_id);
                event(doc, &user, entry)
            });
        let remote = self.remote.iter().map(|(&client_id, remote)| {
            event(
                doc,
                &remote.user,
                AwarenessEntry {
                    client_id,
                    clock: remote.clock,
                    state: Some(remote.state.clone()),
                },
            )
        });
        local.chain(remote).collect()
    }

    /// The record of `session`, created on first use; it is present again if it had left.
    fn owner(&mut self, session: u64, user: &str) -> &mut Owner {
        let owner = self.owners.entry(session).or_default();
        if owner.user != user {
            owner.user = user.to_owned();
        }
        owner.left_ms = None;
        owner
    }

    /// Makes `session` (of `user`) the controller of `client`, taking it from any previous
    /// controller.
    fn control(&mut self, session: u64, user: &str, client: u64, native: bool) {
        let record = self.clients.entry(client).or_insert_with(|| Client {
            user: user.to_owned(),
            controller: None,
            native,
        });
        if let Some(previous) = record.controller.replace(session) {
            if previous != session {
                if let Some(owner) = self.owners.get_mut(&previous) {
                    owner.clients.remove(&client);
                }
            }
        }
        if record.user != user {
            record.user = user.to_owned();
        }
        record.native = native;
        self.owners.entry(session).or_default().clients.insert(client);
    }

    /// Each user present in the room (any protocol, any instance) with their status: the
    /// `status` field of their states (`"away"`, `"busy"`; anything else, or none, is
    /// `"online"`), the most available one when they have several.
    pub(crate) fn statuses(&self) -> BTreeMap<String, String> {
        let mut out: BTreeMap<String, String> = BTreeMap::new();
        let local = self
            .table
            .snapshot()
            .into_iter()
            .filter_map(|entry| Some((self.user_of(entry.client_id), entry.state?)));
        let remote = self
            .remote
            .values()
            .map(|remote| (remote.user.clone(), remote.state.clone()));
        for (user, state) in local.chain(remote) {
            if user.is_empty() {
                continue;
            }
            let status = status_of(&state);
            let entry = out.entry(user).or_insert_with(|| status.to_string());
            if rank(status) < rank(entry) {
                *entry = status.to_string();
            }
        }
        out
    }

    /// The user owning `client` (empty when the table does not know it).
    fn user_of(&self, client: u64) -> String {
        self.clients.get(&client).map(|c| c.user.clone()).unwrap_or_default()
    }
}

/// The status an awareness state declares: its `status` field if it is `away` or `busy`,
/// `online` otherwise.
fn status_of(state: &str) -> &'static str {
    // Only small states are parsed (like typing's): a `Members` request costs no more than the
    // answer it gets, however large the states in the room.
    if state.len() > 4 * 1024 || !state.contains("\"status\"") {
        return "online";
    }
    match serde_json::from_str::<serde_json::Value>(state)
        .ok()
        .as_ref()
        .and_then(|value| value.get("status"))
        .and_then(serde_json::Value::as_str)
    {
        Some("away") => "away",
        Some("busy") => "busy",
        _ => "online",
    }
}

/// Availability order of statuses: online before busy before away.
fn rank(status: &str) -> u8 {
    match status {
        "online" => 0,
        "busy" => 1,
        _ => 2,
    }
}

/// Whether an awareness state says its client is typing (`"typing": true`, the field the web
/// app and the mirrored native states use).
fn is_typing(state: Option<&str>) -> bool {
    state.is_some_and(|text| {
        // Cheap test first: most states say nothing of typing.
        text.contains("\"typing\"")
            && serde_json::from_str::<serde_json::Value>(text)
                .is_ok_and(|v| v.get("typing") == Some(&serde_json::Value::Bool(true)))
    })
}

/// `state` (checked JSON) with its `typing` field set (or removed); a state that is not a JSON
/// object is left as it is. No state and typing: `{"user": user, "typing": true}`.
fn with_typing(state: Option<String>, user: &str, typing: bool) -> Option<String> {
    let mut value = match state {
        Some(text) => match serde_json::from_str::<serde_json::Value>(&text) {
            Ok(serde_json::Value::Object(map)) => map,
            _ => return Some(text),
        },
        None if typing => serde_json::Map::from_iter([("user".to_owned(), serde_json::Value::from(user))]),
        None => return None,
    };
    if typing {
        value.insert("typing".to_owned(), serde_json::Value::Bool(true));
    } else {
        value.remove("typing");
    }
    Some(serde_json::Value::Object(value).to_string())
}

/// Checks that a state is JSON; the JSON `null` becomes `None` (y-protocols' "left").
fn normalize(state: Option<String>) -> Result<Option<String>, InvalidState> {
    let Some(text) = state else { return Ok(None) };
    match serde_json::from_str::<serde_json::Value>(&text) {
        Ok(serde_json::Value::Null) => Ok(None),
        Ok(_) => Ok(Some(text)),
        Err(_) => Err(InvalidState::NotJson),
    }
}

fn event(doc: &DocId, user: &str, entry: AwarenessEntry) -> RoomEvent {
    RoomEvent::Presence {
        doc: doc.clone(),
        peer: entry.client_id,
        user: user.to_owned(),
        clock: entry.clock,
        state: entry.state,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn remote_states_are_shown_to_newcomers_and_expire_unless_refreshed() {
        let mut p = Presence::default();
        let doc = doc();
        let shown = p.remote(&doc, 1, 9, "ada".into(), 1, Some("{}".into()), 0, 0);
        assert!(shown.is_some());
        // An older clock changes nothing; a newer one refreshes.
        assert!(p.remote(&doc, 1, 9, "ada".into(), 0, None, 0, 10).is_none());
        assert_eq!(p.snapshot().len(), 1);
        assert_eq!(p.snapshot_for(&doc, 1).len(), 1);
        assert!(p
            .remote(&doc, 1, 9, "ada".into(), 2, Some("{\"x\":1}".into()), 0, 20_000)
            .is_some());
        assert!(p.expire_remote(&doc, 40_000).is_empty(), "refreshed at 20 s");
        // Its instance crashed: nothing more comes, and the state goes at the timeout.
        let gone = p.expire_remote(&doc, 50_000);
        assert_eq!(seen(&gone), vec![(9, 2, None)]);
        assert!(p.snapshot().is_empty());
        // A removal of an unknown state announces nothing.
        assert!(p.remote(&doc, 1, 9, "ada".into(), 3, None, 0, 50_001).is_none());
    }

    #[test]
    fn a_dead_instance_takes_its_states_along_and_a_reannounced_state_is_no_news() {
        let mut p = Presence::default();
        let doc = doc();
        assert!(p
            .remote(&doc, 1, 10, "ada".into(), 1, Some("{}".into()), 0, 0)
            .is_some());
        assert!(p.remote(&doc, 1, 11, "bo".into(), 1, Some("{}".into()), 0, 0).is_some());
        assert!(p.remote(&doc, 2, 20, "cy".into(), 1, Some("{}".into()), 0, 0).is_some());
        // The same state again (an answer to a presence query): refreshed, not re-broadcast.
        assert!(p
            .remote(&doc, 2, 20, "cy".into(), 1, Some("{}".into()), 0, 25_000)
            .is_none());
        let gone = p.drop_origin(&doc, 1);
        let peers: Vec<u64> = gone
            .iter()
            .map(|e| match e {
                RoomEvent::Presence { peer, state: None, .. } => *peer,
                other => panic!("not a removal: {other:?}"),
            })
            .collect();
        assert_eq!(peers, vec![10, 11]);
        assert_eq!(p.snapshot().len(), 1);
        // Refreshed at 25 s: still there at 50 s, gone at 55 s.
        assert!(p.expire_remote(&doc, 50_000).is_empty());
        assert_eq!(p.expire_remote(&doc, 55_000).len(), 1);
        assert!(p.drop_origin(&doc, 2).is_empty());
    }

    #[test]
    fn a_reannounced_state_keeps_its_age_and_a_late_state_does_not_undo_its_removal() {
        let mut p = Presence::default();
        let doc = doc();
        assert!(p
            .remote(&doc, 1, 10, "ada".into(), 1, Some("{}".into()), 0, 0)
            .is_some());
        // Re-announced at 20 s as 15 s old: it counts from 5 s, not from 20 s.
        assert!(p
            .remote(&doc, 1, 10, "ada".into(), 1, Some("{}".into()), 15_000, 20_000)
            .is_none());
        assert!(p.expire_remote(&doc, 34_999).is_empty());
        assert_eq!(p.expire_remote(&doc, 35_000).len(), 1);
        // Removed at clock 4; its states at clocks 3 and 4, arriving late, stay out.
        assert!(p
            .remote(&doc, 1, 11, "bo".into(), 3, Some("{}".into()), 0, 40_000)
            .is_some());
        assert!(p.remote(&doc, 1, 11, "bo".into(), 4, None, 0, 41_000).is_some());
        assert!(p
            .remote(&doc, 1, 11, "bo".into(), 3, Some("{}".into()), 0, 42_000)
            .is_none());
        assert!(p
            .remote(&doc, 1, 11, "bo".into(), 4, Some("{}".into()), 0, 42_000)
            .is_none());
        assert!(p.snapshot().is_empty());
        // A renewal after the removal is shown.
        assert!(p
            .remote(&doc, 1, 11, "bo".into(), 5, Some("{}".into()), 0, 43_000)
            .is_some());
        // The removal is forgotten after the presence timeout.
        assert!(p.remote(&doc, 1, 12, "cy".into(), 7, None, 0, 44_000).is_none());
        p.expire_remote(&doc, 44_000 + 30_000);
        assert!(p
            .remote(&doc, 1, 12, "cy".into(), 7, Some("{}".into()), 0, 75_000)
            .is_some());
    }

    fn doc() -> DocId {
        DocId::new("notes/a").expect("valid id")
    }

    fn entry(client_id: u64, clock: u64, state: Option<&str>) -> AwarenessEntry {
        AwarenessEntry {
            client_id,
            clock,
            state: state.map(str::to_owned),
        }
    }

    /// `(peer, clock, state)` of presence events.
    fn seen(events: &[RoomEvent]) -> Vec<(u64, u64, Option<String>)> {
        events
            .iter()
            .filter_map(|e| match e {
                RoomEvent::Presence { peer, clock, state, .. } => Some((*peer, *clock, state.clone())),
                _ => None,
            })
            .collect()
    }

    /// Entries from Yjs connection `session` of `user`, in a room without other subscribers.
    fn yjs(p: &mut Presence, session: u64, user: &str, entries: &[AwarenessEntry], now: u64) -> Vec<RoomEvent> {
        p.apply(&doc(), session, user, entries, now, |_| false)
    }

    /// A JSON string state of exactly `len` bytes.
    fn state_of(len: usize) -> String {
        format!("\"{}\"", "x".repeat(len - 2))
    }

    fn timeout() -> u64 {
        PRESENCE_TIMEOUT.as_millis() as u64
    }

    #[test]
    fn leave_removes_and_announces_what_the_connection_set() {
        let mut p = Presence::default();
        let d = doc();
        assert_eq!(
            seen(&yjs(&mut p, 7, "u7", &[entry(1000, 0, Some("{\"a\":1}"))], 0)),
            [(1000, 0, Some("{\"a\":1}".into()))]
        );
        assert_eq!(
            seen(&p.set_native(&d, 8, "u8", Some("{}".into()), 0).unwrap()),
            [(8, 1, Some("{}".into()))]
        );
        assert_eq!(p.snapshot().len(), 2);
        // The native connection sees the Yjs client but not itself.
        assert_eq!(seen(&p.snapshot_for(&d, 8)), [(1000, 0, Some("{\"a\":1}".into()))]);
        let gone = p.leave(&d, 7, 10);
        assert_eq!(seen(&gone), [(1000, 0, None)]);
        assert!(matches!(&gone[0], RoomEvent::Presence { user, .. } if user == "u7"));
        assert_eq!(seen(&p.leave(&d, 8, 10)), [(8, 1, None)]);
        assert!(p.snapshot().is_empty());
        // Leaving twice, or without presence, announces nothing.
        assert!(p.leave(&d, 8, 11).is_empty());
        assert!(p.leave(&d, 99, 11).is_empty());
    }

    /// `(peer, typing)` of typing events.
    fn typing_events(events: &[RoomEvent]) -> Vec<(u64, bool)> {
        events
            .iter()
            .filter_map(|e| match e {
                RoomEvent::Typing { peer, typing, .. } => Some((*peer, *typing)),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn native_typing_is_mirrored_into_its_state_for_yjs_clients() {
        let mut p = Presence::default();
        let d = doc();
        p.set_native(&d, 8, "ada", Some(r#"{"user":"ada"}"#.into()), 0).unwrap();
        let on = p.set_native_typing(&d, 8, "ada", true, 1);
        assert_eq!(seen(&on), [(8, 2, Some(r#"{"typing":true,"user":"ada"}"#.into()))]);
        // Nothing new: no event.
        assert!(p.set_native_typing(&d, 8, "ada", true, 2).is_empty());
        // A refresh of its state while typing keeps the flag.
        let refreshed = p.set_native(&d, 8, "ada", Some(r#"{"user":"ada"}"#.into()), 3).unwrap();
        assert_eq!(
            seen(&refreshed),
            [(8, 3, Some(r#"{"typing":true,"user":"ada"}"#.into()))]
        );
        let off = p.set_native_typing(&d, 8, "ada", false, 4);
        assert_eq!(seen(&off), [(8, 4, Some(r#"{"user":"ada"}"#.into()))]);
        // A connection without a state appears with its user while typing.
        let on = p.set_native_typing(&d, 9, "bob", true, 5);
        assert_eq!(seen(&on), [(9, 1, Some(r#"{"typing":true,"user":"bob"}"#.into()))]);
        // A state that is not an object cannot carry the flag: left as it is.
        p.set_native(&d, 10, "cy", Some("\"cy\"".into()), 6).unwrap();
        assert!(p.set_native_typing(&d, 10, "cy", true, 7).is_empty());
    }

    /// The attack: a native connection flips typing as fast as it may, with a big state. Each
    /// mirrored change re-sends its state to every subscriber, so mirroring is bounded in size
    /// and in rate, whatever the flips cost the sender.
    #[test]
    fn flipping_typing_fast_or_with_a_big_state_mirrors_little() {
        let mut p = Presence::default();
        let d = doc();
        p.set_native(&d, 8, "ada", Some(r#"{"user":"ada"}"#.into()), 0).unwrap();
        let mut mirrored = 0;
        for i in 0..1000u64 {
            // 1,000 flips in half a second.
            mirrored += seen(&p.set_native_typing(&d, 8, "ada", i % 2 == 0, i / 2)).len();
        }
        assert_eq!(mirrored, 2, "one start and one stop within the interval");
        let later = p.set_native_typing(&d, 8, "ada", true, 500 + TYPING_MIRROR_INTERVAL_MS);
        assert_eq!(seen(&later).len(), 1, "after the interval, typing is mirrored again");
        // A state above the bound is never re-sent for typing.
        let big = format!(r#"{{"user":"bob","pad":"{}"}}"#, "x".repeat(MAX_MIRRORED_STATE_BYTES));
        p.set_native(&d, 9, "bob", Some(big), 0).unwrap();
        assert!(p.set_native_typing(&d, 9, "bob", true, 10_000).is_empty());
        assert!(p.set_native_typing(&d, 9, "bob", false, 10_001).is_empty());
    }

    #[test]
    fn yjs_typing_reaches_native_clients_as_typing_events() {
        let mut p = Presence::default();
        let d = doc();
        let idle = yjs(
            &mut p,
            7,
            "ada",
            &[entry(1000, 0, Some(r#"{"user":{"name":"ada"}}"#))],
            0,
        );
        assert!(typing_events(&idle).is_empty());
        let typing = r#"{"user":{"name":"ada"},"typing":true}"#;
        let on = yjs(&mut p, 7, "ada", &[entry(1000, 1, Some(typing))], 1);
        assert_eq!(typing_events(&on), [(1000, true)]);
        // A cursor move while typing is no news.
        let moved = r#"{"user":{"name":"ada"},"typing":true,"cursor":1}"#;
        assert!(typing_events(&yjs(&mut p, 7, "ada", &[entry(1000, 2, Some(moved))], 2)).is_empty());
        // Leaving while typing stops it.
        assert_eq!(typing_events(&p.leave(&d, 7, 3)), [(1000, false)]);
        let again = yjs(&mut p, 8, "ada", &[entry(1000, 3, Some(typing))], 4);
        assert_eq!(typing_events(&again), [(1000, true)]);
        let off = yjs(&mut p, 8, "ada", &[entry(1000, 4, Some(r#"{"typing":false}"#))], 5);
        assert_eq!(typing_events(&off), [(1000, false)]);
    }

    #[test]
    fn removals_of_foreign_clients_and_bad_states_are_ignored() {
        let mut p = Presence::default();
        let d = doc();
        p.set_native(&d, 8, "u8", Some("{}".into()), 0).unwrap();
        // A Yjs connection cannot remove the native connection's state, nor set one.
        assert!(yjs(&mut p, 7, "u7", &[entry(8, 1, None)], 1).is_empty());
        assert!(yjs(&mut p, 7, "u8", &[entry(8, 5, Some("{}"))], 1).is_empty());
        assert!(yjs(&mut p, 7, "u7", &[entry(1000, 0, Some("not json"))], 1).is_empty());
        assert!(matches!(
            p.set_native(&d, 8, "u8", Some("{oops".into()), 1),
            Err(InvalidState::NotJson)
        ));
        // The JSON null is a removal.
        assert_eq!(
            seen(&p.set_native(&d, 8, "u8", Some(" null".into()), 2).unwrap()),
            [(8, 2, None)]
        );
    }

    #[test]
    fn one_connection_controls_a_bounded_number_of_clients() {
        let mut p = Presence::default();
        let many: Vec<AwarenessEntry> = (1..=100).map(|c| entry(c, 0, Some("{}"))).collect();
        assert_eq!(yjs(&mut p, 7, "u7", &many, 0).len(), MAX_CLIENTS_PER_CONNECTION);
        assert_eq!(p.snapshot().len(), MAX_CLIENTS_PER_CONNECTION);
    }

    #[test]
    fn a_reconnected_client_is_not_removed_by_its_old_connection() {
        let mut p = Presence::default();
        let d = doc();
        yjs(&mut p, 1, "u", &[entry(1000, 3, Some("{}"))], 0);
        // The same Yjs client on a new connection of the same user renews its state before the
        // old one is gone: it takes the client over.
        assert_eq!(yjs(&mut p, 2, "u", &[entry(1000, 4, Some("{}"))], 1).len(), 1);
        // The old connection no longer clears it, nor removes it when it leaves.
        assert!(yjs(&mut p, 1, "u", &[entry(1000, 4, None)], 1).is_empty());
        assert!(p.leave(&d, 1, 2).is_empty());
        assert_eq!(p.snapshot().len(), 1);
        assert_eq!(seen(&p.leave(&d, 2, 3)), [(1000, 4, None)]);
        // Reconnecting after the leave: the user's next connection announces it again.
        assert_eq!(
            seen(&yjs(&mut p, 3, "u", &[entry(1000, 5, Some("{}"))], 4)),
            [(1000, 5, Some("{}".into()))]
        );
    }

    #[test]
    fn another_user_cannot_set_freeze_or_remove_a_yjs_client() {
        let mut p = Presence::default();
        let d = doc();
        let ada = Some("{\"name\":\"ada\"}");
        assert_eq!(yjs(&mut p, 1, "ada", &[entry(1000, 1, ada)], 0).len(), 1);
        // Bob (any connection of his) tries her id: a state, a frozen clock, a removal.
        for forged in [
            entry(1000, 2, Some("{\"name\":\"bob\"}")),
            entry(1000, (1 << 53) - 1, Some("{\"name\":\"bob\"}")),
            entry(1000, 1, None),
            entry(1000, 2, None),
        ] {
            assert!(yjs(&mut p, 2, "bob", &[forged], 1).is_empty());
        }
        assert_eq!(p.snapshot(), [entry(1000, 1, ada)]);
        // Her renewals keep being applied, and her own removal works.
        assert_eq!(
            seen(&yjs(&mut p, 1, "ada", &[entry(1000, 2, ada)], 2)),
            [(1000, 2, ada.map(Into::into))]
        );
        assert_eq!(
            seen(&yjs(&mut p, 1, "ada", &[entry(1000, 3, None)], 3)),
            [(1000, 3, None)]
        );
        assert!(p.snapshot().is_empty());
        // While the table remembers the id, it stays hers: after her connection left, too.
        p.leave(&d, 1, 4);
        assert!(yjs(&mut p, 2, "bob", &[entry(1000, 9, Some("{}"))], 5).is_empty());
        // Once the table has forgotten it, the id is free.
        p.expire(&d, 4 + timeout());
        assert!(p.clients.is_empty());
        assert_eq!(
            yjs(&mut p, 2, "bob", &[entry(1000, 9, Some("{}"))], 6 + timeout()).len(),
            1
        );
        // Events carry the owner's user.
        let expired = p.expire(&d, 6 + 2 * timeout());
        assert!(matches!(&expired[..], [RoomEvent::Presence { user, .. }] if user == "bob"));
    }

    #[test]
    fn native_ids_and_session_ids_are_not_for_yjs_connections() {
        let mut p = Presence::default();
        let d = doc();
        p.set_native(&d, 8, "ada", Some("{}".into()), 0).unwrap();
        // Not even a Yjs connection of the same user sets a native entry.
        assert!(yjs(&mut p, 7, "ada", &[entry(8, 2, Some("{\"x\":1}"))], 1).is_empty());
        // A subscriber's session id is refused before its native presence exists.
        let sessions = |id: u64| id == 9 || id == 7;
        assert!(p
            .apply(&d, 7, "bob", &[entry(9, 0, Some("{}"))], 1, sessions)
            .is_empty());
        assert!(p
            .apply(&d, 7, "bob", &[entry(7, 0, Some("{}"))], 1, sessions)
            .is_empty());
        // An id claimed before a session had it is taken over by the native session, with a
        // clock above the claimed one; the Yjs connection then loses it.
        assert_eq!(
            yjs(&mut p, 7, "bob", &[entry(50, 900, Some("{\"bob\":1}"))], 2).len(),
            1
        );
        assert_eq!(
            seen(&p.set_native(&d, 50, "carol", Some("{}".into()), 3).unwrap()),
            [(50, 901, Some("{}".into()))]
        );
        assert!(yjs(&mut p, 7, "bob", &[entry(50, 902, Some("{\"bob\":2}"))], 4).is_empty());
        assert!(p.leave(&d, 7, 5).is_empty());
        assert_eq!(seen(&p.snapshot_for(&d, 8)), [(50, 901, Some("{}".into()))]);
        assert!(matches!(&p.snapshot_for(&d, 8)[0], RoomEvent::Presence { user, .. } if user == "carol"));
    }

    #[test]
    fn clocks_are_bounded() {
        let mut p = Presence::default();
        let d = doc();
        // A first announcement: at most 2^32.
        assert!(yjs(&mut p, 1, "u", &[entry(1, MAX_FIRST_CLOCK + 1, Some("{}"))], 0).is_empty());
        assert!(yjs(&mut p, 1, "u", &[entry(1, u64::MAX, Some("{}"))], 0).is_empty());
        assert_eq!(
            yjs(&mut p, 1, "u", &[entry(1, MAX_FIRST_CLOCK, Some("{}"))], 0).len(),
            1
        );
        // With a state: at most MAX_CLOCK_STEP above the known clock, removals included.
        assert_eq!(yjs(&mut p, 1, "u", &[entry(2, 5, Some("{}"))], 0).len(), 1);
        assert!(yjs(&mut p, 1, "u", &[entry(2, 5 + MAX_CLOCK_STEP + 1, Some("{}"))], 1).is_empty());
        assert!(yjs(&mut p, 1, "u", &[entry(2, (1 << 53) - 1, None)], 1).is_empty());
        assert_eq!(
            yjs(&mut p, 1, "u", &[entry(2, 5 + MAX_CLOCK_STEP, Some("{}"))], 1).len(),
            1
        );
        // Stale entries are dropped quietly (the table would not apply them anyway).
        assert!(yjs(&mut p, 1, "u", &[entry(2, 5, Some("{}"))], 2).is_empty());
        // After a removal, the next announcement may start over below 2^32 (a client that kept
        // changing its state while disconnected).
        p.leave(&d, 1, 3);
        assert_eq!(yjs(&mut p, 4, "u", &[entry(2, 1_000_000, Some("{}"))], 4).len(), 1);
        // A removal at an equal clock, by the controller, is applied.
        assert_eq!(
            seen(&yjs(&mut p, 4, "u", &[entry(2, 1_000_000, None)], 5)),
            [(2, 1_000_000, None)]
        );
    }

    #[test]
    fn states_are_bounded_in_bytes() {
        let mut p = Presence::default();
        let d = doc();
        let big = state_of(MAX_STATE_BYTES);
        let too_big = state_of(MAX_STATE_BYTES + 1);
        assert!(yjs(&mut p, 1, "u1", &[entry(1, 0, Some(&too_big))], 0).is_empty());
        assert!(matches!(
            p.set_native(&d, 100, "n", Some(too_big.clone()), 0),
            Err(InvalidState::TooLarge)
        ));
        // One connection: MAX_CONNECTION_STATE_BYTES in all.
        let per_connection = MAX_CONNECTION_STATE_BYTES / MAX_STATE_BYTES;
        let entries: Vec<AwarenessEntry> = (1..=8).map(|c| entry(c, 0, Some(&big))).collect();
        assert_eq!(yjs(&mut p, 1, "u1", &entries, 0).len(), per_connection);
        // Replacing one of its states by one as large is fine.
        assert_eq!(yjs(&mut p, 1, "u1", &[entry(1, 1, Some(&big))], 1).len(), 1);
        // The room: MAX_ROOM_STATE_BYTES in all, whoever holds them.
        let connections = (MAX_ROOM_STATE_BYTES / MAX_CONNECTION_STATE_BYTES) as u64;
        for session in 2..=connections {
            let entries: Vec<AwarenessEntry> = (0..8).map(|c| entry(session * 100 + c, 0, Some(&big))).collect();
            assert_eq!(yjs(&mut p, session, "u", &entries, 0).len(), per_connection);
        }
        assert_eq!(p.table.state_bytes(), MAX_ROOM_STATE_BYTES);
        assert!(yjs(&mut p, 99, "u99", &[entry(9_999, 0, Some("{}"))], 2).is_empty());
        assert!(matches!(
            p.set_native(&d, 100, "n", Some("{}".into()), 2),
            Err(InvalidState::RoomFull)
        ));
        // What answering a query for every state costs is known and bounded.
        let answer = driftsync_protocol::yjs::YMessage::Awareness(p.snapshot())
            .encode()
            .len();
        assert_eq!(p.snapshot_bytes(), answer);
        assert!(answer <= MAX_ROOM_STATE_BYTES + 32 * p.snapshot().len() + 16);
        // Room is made when states go.
        p.leave(&d, 2, 3);
        assert_eq!(
            seen(&p.set_native(&d, 100, "n", Some("{}".into()), 4).unwrap()),
            [(100, 1, Some("{}".into()))]
        );
    }

    #[test]
    fn silent_states_expire_and_a_native_rejoin_continues_its_clock() {
        let mut p = Presence::default();
        let d = doc();
        let timeout = timeout();
        p.set_native(&d, 8, "u8", Some("{}".into()), 0).unwrap();
        p.set_native(&d, 8, "u8", Some("{\"b\":1}".into()), 1_000).unwrap();
        assert!(p.expire(&d, timeout).is_empty());
        let expired = p.expire(&d, 1_000 + timeout);
        assert_eq!(seen(&expired), [(8, 2, None)]);
        assert!(matches!(&expired[0], RoomEvent::Presence { user, .. } if user == "u8"));
        // Leaving and coming back soon: the next state is newer than what the table remembers.
        p.leave(&d, 8, 2_000 + timeout);
        assert_eq!(
            seen(&p.set_native(&d, 8, "u8", Some("{}".into()), 3_000 + timeout).unwrap()),
            [(8, 3, Some("{}".into()))]
        );
        // Records of departed connections are forgotten after the timeout.
        p.leave(&d, 8, 4_000 + timeout);
        p.expire(&d, 4_000 + 3 * timeout);
        assert!(p.owners.is_empty());
        assert!(p.clients.is_empty());
    }
}
