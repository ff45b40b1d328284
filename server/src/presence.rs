//! Presence shared by both protocols: one y-protocols awareness table per room, and which
//! connection controls which awareness client.
//!
//! Native connections and Yjs clients see each other's presence, so both write into the same
//! [`AwarenessTable`]. A Yjs client names itself with its Yjs client id and keeps its own clock; a
//! native connection uses its session id as client id and the room keeps its clock. Knowing which
//! connection controls which client lets the room remove and announce every state of a connection
//! that leaves, so no ghost remains, whatever protocol the watchers speak. States not refreshed
//! for [`PRESENCE_TIMEOUT`] are removed and announced by a per-server sweeper
//! ([`run_sweeper`]).
//!
//! Everything here is sans-IO: methods take the current time and return the room events to
//! broadcast; the room holds its lock around them.

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use driftsync_engine::store::Store;
use driftsync_protocol::yjs::{AwarenessEntry, AwarenessTable};
use driftsync_protocol::DocId;

use crate::room::RoomEvent;
use crate::Shared;

/// A presence state not refreshed for this long is removed and announced (y-protocols' value).
pub(crate) const PRESENCE_TIMEOUT: Duration = Duration::from_secs(30);

/// How often the sweeper looks for expired states: a state lives at most this much longer than
/// [`PRESENCE_TIMEOUT`].
const PRESENCE_SWEEP: Duration = Duration::from_secs(5);

/// The most awareness clients one connection may control in one room. A Yjs client controls one
/// (its own), a native connection one (its session); the bound keeps a misbehaving client from
/// filling the table with invented ids.
const MAX_CLIENTS_PER_CONNECTION: usize = 8;

/// Milliseconds on a monotonic clock shared by every room of the process.
pub(crate) fn now_ms() -> u64 {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    let epoch = EPOCH.get_or_init(Instant::now);
    u64::try_from(epoch.elapsed().as_millis()).unwrap_or(u64::MAX)
}

/// A presence state that is not JSON: peers (Yjs clients `JSON.parse` it) would fail on it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct InvalidState;

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
}

/// One room's presence.
#[derive(Debug, Default)]
pub(crate) struct Presence {
    table: AwarenessTable,
    /// Per session that set presence here.
    owners: HashMap<u64, Owner>,
    /// Per awareness client with a controller: the controlling session.
    controllers: HashMap<u64, u64>,
}

impl Presence {
    /// Applies awareness entries sent by connection `session` (a Yjs client) and returns the
    /// events announcing the applied ones.
    ///
    /// An entry that sets a state makes `session` the client's controller (a reconnected Yjs
    /// client keeps its client id, so the newest connection wins). Removals of clients `session`
    /// does not control, states that are not JSON, and clients beyond
    /// [`MAX_CLIENTS_PER_CONNECTION`] are ignored.
    pub(crate) fn apply(
        &mut self,
        doc: &DocId,
        session: u64,
        user: &str,
        entries: &[AwarenessEntry],
        now_ms: u64,
    ) -> Vec<RoomEvent> {
        let owner = self.owner(session, user);
        let mut room_for = MAX_CLIENTS_PER_CONNECTION.saturating_sub(owner.clients.len());
        let mut accepted = Vec::with_capacity(entries.len());
        for entry in entries {
            let controlled = owner.clients.contains(&entry.client_id);
            if !controlled && entry.state.is_none() {
                continue;
            }
            if !controlled {
                if room_for == 0 {
                    tracing::info!(doc = %doc, session, "too many awareness clients on one connection; entry ignored");
                    continue;
                }
                room_for -= 1;
            }
            match normalize(entry.state.clone()) {
                Ok(state) => accepted.push(AwarenessEntry {
                    client_id: entry.client_id,
                    clock: entry.clock,
                    state,
                }),
                Err(InvalidState) => tracing::info!(doc = %doc, session, "awareness state is not JSON; entry ignored"),
            }
        }
        let applied = self.table.apply(&accepted, now_ms);
        for entry in &applied {
            if entry.state.is_some() {
                self.control(session, entry.client_id);
            }
        }
        applied.into_iter().map(|entry| event(doc, user, entry)).collect()
    }

    /// Sets (or with `None`, clears) the presence of native connection `session`: client id
    /// `session`, the connection's next clock. Returns the events to announce it.
    pub(crate) fn set_native(
        &mut self,
        doc: &DocId,
        session: u64,
        user: &str,
        state: Option<String>,
        now_ms: u64,
    ) -> Result<Vec<RoomEvent>, InvalidState> {
        let state = normalize(state)?;
        let owner = self.owner(session, user);
        owner.clock += 1;
        let entry = AwarenessEntry {
            client_id: session,
            clock: owner.clock,
            state,
        };
        self.control(session, session);
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
        let clients: Vec<u64> = std::mem::take(&mut owner.clients).into_iter().collect();
        let user = owner.user.clone();
        for client in &clients {
            self.controllers.remove(client);
        }
        self.table
            .remove(&clients)
            .into_iter()
            .map(|entry| event(doc, &user, entry))
            .collect()
    }

    /// Removes the states not refreshed for [`PRESENCE_TIMEOUT`] and returns the events
    /// announcing the removals; forgets connections that left that long ago.
    pub(crate) fn expire(&mut self, doc: &DocId, now_ms: u64) -> Vec<RoomEvent> {
        let timeout = u64::try_from(PRESENCE_TIMEOUT.as_millis()).unwrap_or(u64::MAX);
        let removed = self.table.expire(now_ms, timeout);
        // The table forgets a client without a state once its last change is `timeout` old; a
        // departed connection's last change is no later than its departure, so its record can
        // go now too: nothing remembers a clock it would have to stay above.
        self.owners
            .retain(|_, owner| owner.left_ms.is_none_or(|left| now_ms.saturating_sub(left) < timeout));
        removed
            .into_iter()
            .map(|entry| {
                let user = self.user_of(entry.client_id);
                event(doc, &user, entry)
            })
            .collect()
    }

    /// Every current state as one awareness entry list (for Yjs clients).
    pub(crate) fn snapshot(&self) -> Vec<AwarenessEntry> {
        self.table.snapshot()
    }

    /// Every current state not controlled by `session`, as presence events (for a native
    /// connection that just resumed the document).
    pub(crate) fn snapshot_for(&self, doc: &DocId, session: u64) -> Vec<RoomEvent> {
        self.table
            .snapshot()
            .into_iter()
            .filter(|entry| self.controllers.get(&entry.client_id) != Some(&session))
            .map(|entry| {
                let user = self.user_of(entry.client_id);
                event(doc, &user, entry)
            })
            .collect()
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

    /// Makes `session` the controller of `client`, taking it from any previous controller.
    fn control(&mut self, session: u64, client: u64) {
        if let Some(previous) = self.controllers.insert(client, session) {
            if previous != session {
                if let Some(owner) = self.owners.get_mut(&previous) {
                    owner.clients.remove(&client);
                }
            }
        }
        self.owners.entry(session).or_default().clients.insert(client);
    }

    /// The user of the connection controlling `client` (empty when none does).
    fn user_of(&self, client: u64) -> String {
        self.controllers
            .get(&client)
            .and_then(|session| self.owners.get(session))
            .map(|owner| owner.user.clone())
            .unwrap_or_default()
    }
}

/// Checks that a state is JSON; the JSON `null` becomes `None` (y-protocols' "left").
fn normalize(state: Option<String>) -> Result<Option<String>, InvalidState> {
    let Some(text) = state else { return Ok(None) };
    match serde_json::from_str::<serde_json::Value>(&text) {
        Ok(serde_json::Value::Null) => Ok(None),
        Ok(_) => Ok(Some(text)),
        Err(_) => Err(InvalidState),
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

/// Removes and announces expired presence in every loaded room every [`PRESENCE_SWEEP`], until
/// the server shuts down.
pub(crate) async fn run_sweeper<S: Store>(shared: Arc<Shared<S>>) {
    let mut ticker = tokio::time::interval(PRESENCE_SWEEP);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = shared.shutdown.cancelled() => return,
            _ = ticker.tick() => shared.rooms.expire_presence(now_ms()).await,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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

    #[test]
    fn leave_removes_and_announces_what_the_connection_set() {
        let mut p = Presence::default();
        let d = doc();
        assert_eq!(
            seen(&p.apply(&d, 7, "u7", &[entry(1000, 0, Some("{\"a\":1}"))], 0)),
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

    #[test]
    fn removals_of_foreign_clients_and_bad_states_are_ignored() {
        let mut p = Presence::default();
        let d = doc();
        p.set_native(&d, 8, "u8", Some("{}".into()), 0).unwrap();
        // A Yjs connection cannot remove the native connection's state.
        assert!(p.apply(&d, 7, "u7", &[entry(8, 5, None)], 1).is_empty());
        assert!(p.apply(&d, 7, "u7", &[entry(1000, 0, Some("not json"))], 1).is_empty());
        assert!(matches!(
            p.set_native(&d, 8, "u8", Some("{oops".into()), 1),
            Err(InvalidState)
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
        let d = doc();
        let many: Vec<AwarenessEntry> = (1..=100).map(|c| entry(c, 0, Some("{}"))).collect();
        assert_eq!(p.apply(&d, 7, "u7", &many, 0).len(), MAX_CLIENTS_PER_CONNECTION);
        assert_eq!(p.snapshot().len(), MAX_CLIENTS_PER_CONNECTION);
    }

    #[test]
    fn a_reconnected_client_is_not_removed_by_its_old_connection() {
        let mut p = Presence::default();
        let d = doc();
        p.apply(&d, 1, "u", &[entry(1000, 3, Some("{}"))], 0);
        // The same Yjs client on a new connection renews its state before the old one is gone.
        assert_eq!(p.apply(&d, 2, "u", &[entry(1000, 4, Some("{}"))], 1).len(), 1);
        assert!(p.leave(&d, 1, 2).is_empty());
        assert_eq!(p.snapshot().len(), 1);
        assert_eq!(seen(&p.leave(&d, 2, 3)), [(1000, 4, None)]);
    }

    #[test]
    fn silent_states_expire_and_a_native_rejoin_continues_its_clock() {
        let mut p = Presence::default();
        let d = doc();
        let timeout = PRESENCE_TIMEOUT.as_millis() as u64;
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
        assert!(p.controllers.is_empty());
    }
}
