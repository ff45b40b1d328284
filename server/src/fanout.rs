//! The fan-out seam: how rooms of several server instances sharing one store share their events.
//!
//! The store is the one source of truth; the fan-out is only the fast path. A room publishes
//! every stored update with its store-assigned cursor, and every presence change, through a
//! [`Fanout`]; each instance receives the others' events ([`Inbound`]) and hands them to its own
//! rooms. Nothing here decides durability: a push is acknowledged after its commit, whether or
//! not the fan-out works, and publishing never waits (it only queues).
//!
//! The repair paths, which make a lossy fan-out enough:
//! - a room that receives cursor `head + 1` applies it; an older one is ignored; one further
//!   ahead (a gap) makes the room read the missing entries from the store, in cursor order;
//! - a lost *last* update leaves no gap behind it: each instance checks the heads of its live
//!   rooms against the store periodically (`Config::head_check`) and catches up those behind;
//! - when events may have been lost in bulk (a reconnect to Redis, a full inbound queue) the
//!   fan-out says [`Inbound::Resync`] and the instance catches up every live room at once;
//! - once a document's subscription is active ([`Inbound::Subscribed`]) the room catches up and
//!   asks the other instances to re-announce their connections' presence
//!   ([`FanoutEvent::PresenceQuery`]), so a client joining on one instance sees who is on the
//!   others;
//! - every instance announces itself every [`HEARTBEAT`]; an instance silent for
//!   [`INSTANCE_TIMEOUT`] is dead for the others, which remove its connections' presence.
//!
//! [`LocalFanout`] connects instances in one process (tests, the simulation, embedding);
//! [`crate::redis_fanout::RedisFanout`] connects processes through Redis pub/sub.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use driftsync_protocol::{Cursor, DocId};
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

/// Events of one document published between instances.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FanoutEvent {
    /// An update stored at `cursor`.
    Update {
        /// Its cursor in the shared store.
        cursor: Cursor,
        /// The yrs v1 update; `None` when it is larger than [`MAX_CARRIED_UPDATE`]: receivers
        /// read it from the store.
        update: Option<Arc<[u8]>>,
    },
    /// A connection's presence changed (`None`: it left).
    Presence {
        /// The connection (session) or Yjs awareness client id.
        peer: u64,
        /// The user.
        user: String,
        /// The awareness clock.
        clock: u64,
        /// The state (JSON), or `None` when it left.
        state: Option<String>,
        /// How long ago its connection last set or refreshed it (0 for a change; more for a
        /// state re-announced): receivers expire it on its owner's time, not the announcement's.
        age_ms: u64,
    },
    /// An instance took up the document: the others re-announce their own connections'
    /// presence in it.
    PresenceQuery,
    /// A connection started or stopped typing (ephemeral: nothing repairs a lost one).
    Typing {
        /// The connection's session id.
        peer: u64,
        /// Its user.
        user: String,
        /// Whether it is typing.
        typing: bool,
    },
    /// A Hocuspocus provider's stateless message (ephemeral).
    Stateless {
        /// The payload.
        payload: String,
    },
}

/// What an instance receives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Inbound {
    /// An event another instance published.
    Event {
        /// The instance that published it.
        origin: u64,
        /// The document.
        doc: DocId,
        /// The event.
        event: FanoutEvent,
    },
    /// Another instance is alive (see [`HEARTBEAT`]).
    Alive {
        /// The instance.
        origin: u64,
    },
    /// The subscription to a document's events is active: what was published before it may
    /// have been missed.
    Subscribed {
        /// The document.
        doc: DocId,
    },
    /// Events may have been lost (a reconnect, a full queue): catch up every live room.
    Resync,
    /// These users' inboxes may have changed (see `crate::inbox`).
    Inbox {
        /// The instance that published it.
        origin: u64,
        /// The users.
        users: Vec<String>,
    },
}

/// Connects the rooms of several server instances.
pub trait Fanout: std::fmt::Debug + Send + Sync + 'static {
    /// Registers an instance; what the others publish arrives on the returned receiver.
    fn join(&self, instance: u64) -> mpsc::Receiver<Inbound>;
    /// Publishes an event of a document to every other instance subscribed to it. Never waits.
    fn publish(&self, instance: u64, doc: &DocId, event: FanoutEvent);
    /// Tells the other instances that `instance` is alive. Never waits.
    fn heartbeat(&self, instance: u64);
    /// Tells every other instance that these users' inboxes may have changed. Never waits.
    fn publish_inbox(&self, instance: u64, users: &[String]) {
        let _ = (instance, users);
    }
    /// Starts receiving a document's events; [`Inbound::Subscribed`] follows once active.
    fn subscribe(&self, instance: u64, doc: &DocId);
    /// Stops receiving a document's events.
    fn unsubscribe(&self, instance: u64, doc: &DocId);
    /// Whether other instances may exist (a store shared by instances without a fan-out
    /// relies on the head check alone).
    fn connects_instances(&self) -> bool {
        true
    }
    /// The fan-out's own metrics, in the Prometheus text format (appended to `/metrics`).
    fn metrics_text(&self) -> String {
        String::new()
    }
}

/// How often an instance announces that it is alive.
pub const HEARTBEAT: Duration = Duration::from_secs(1);

/// An instance not heard from for this long is dead for the others: its connections' presence
/// is removed.
pub const INSTANCE_TIMEOUT: Duration = Duration::from_secs(5);

/// The largest update carried in a fan-out message; a larger one is announced by its cursor
/// alone and read from the store by the receivers.
pub const MAX_CARRIED_UPDATE: usize = 256 * 1024;

/// Capacity of an instance's inbound fan-out queue, in messages. Beyond it messages are dropped
/// and the instance resynchronises from the store ([`Inbound::Resync`]).
pub const FANOUT_QUEUE: usize = 4096;

/// A random id for a server instance on the fan-out.
pub(crate) fn instance_id() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    // RandomState is seeded randomly per process; mixing in a counter separates instances of
    // one process.
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed));
    h.finish()
}

/// The other instances an instance has heard from, and when last.
#[derive(Debug, Default)]
pub(crate) struct Peers {
    last: std::collections::BTreeMap<u64, tokio::time::Instant>,
}

impl Peers {
    /// Records a message from `origin`; returns whether it is new (or back after it was found
    /// dead), which is when presence is exchanged with it.
    pub(crate) fn seen(&mut self, origin: u64, now: tokio::time::Instant) -> bool {
        self.last.insert(origin, now).is_none()
    }

    /// Forgets and returns the instances silent for [`INSTANCE_TIMEOUT`].
    pub(crate) fn expire(&mut self, now: tokio::time::Instant) -> Vec<u64> {
        let mut dead = Vec::new();
        self.last.retain(|&origin, last| {
            let alive = now.saturating_duration_since(*last) < INSTANCE_TIMEOUT;
            if !alive {
                dead.push(origin);
            }
            alive
        });
        dead
    }

    /// How many instances are alive.
    pub(crate) fn len(&self) -> usize {
        self.last.len()
    }
}

/// The sending side of an instance's inbound queue: bounded, never waits; when a message does
/// not fit, the instance is owed an [`Inbound::Resync`], delivered as soon as there is room.
#[derive(Debug, Clone)]
pub struct Inbox {
    tx: mpsc::Sender<Inbound>,
    lagged: Arc<AtomicBool>,
}

impl Inbox {
    /// A new inbox and the receiver an instance reads.
    pub fn new() -> (Inbox, mpsc::Receiver<Inbound>) {
        let (tx, rx) = mpsc::channel(FANOUT_QUEUE);
        (
            Inbox {
                tx,
                lagged: Arc::default(),
            },
            rx,
        )
    }

    /// Delivers `message` unless the queue is full (then a resync is owed). Returns `false`
    /// once the instance stopped reading.
    pub fn deliver(&self, message: Inbound) -> bool {
        use mpsc::error::TrySendError;
        if self.lagged.load(Ordering::Relaxed) {
            match self.tx.try_send(Inbound::Resync) {
                Ok(()) => self.lagged.store(false, Ordering::Relaxed),
                Err(TrySendError::Full(_)) => return true,
                Err(TrySendError::Closed(_)) => return false,
            }
        }
        match self.tx.try_send(message) {
            Ok(()) => true,
            Err(TrySendError::Full(_)) => {
                tracing::warn!("fan-out queue full: the instance will catch up from the store");
                self.lagged.store(true, Ordering::Relaxed);
                true
            }
            Err(TrySendError::Closed(_)) => false,
        }
    }

    /// Whether the instance stopped reading.
    pub fn is_closed(&self) -> bool {
        self.tx.is_closed()
    }
}

/// One instance alone: nothing to share.
#[derive(Debug, Default, Clone, Copy)]
pub struct NoFanout;

impl Fanout for NoFanout {
    fn join(&self, _instance: u64) -> mpsc::Receiver<Inbound> {
        // A receiver whose sender is gone: it yields nothing and ends at once.
        mpsc::channel(1).1
    }

    fn publish(&self, _instance: u64, _doc: &DocId, _event: FanoutEvent) {}

    fn heartbeat(&self, _instance: u64) {}

    fn subscribe(&self, _instance: u64, _doc: &DocId) {}

    fn unsubscribe(&self, _instance: u64, _doc: &DocId) {}

    fn connects_instances(&self) -> bool {
        false
    }
}

/// Instances in one process, connected by bounded queues. Every instance receives every
/// document's events (subscriptions are acknowledged at once and otherwise ignored).
#[derive(Debug, Default, Clone)]
pub struct LocalFanout {
    instances: Arc<Mutex<Vec<(u64, Inbox)>>>,
}

impl LocalFanout {
    /// Delivers `message` to every instance but `from`.
    fn send_all(&self, from: u64, message: &Inbound) {
        let mut instances = self.instances.lock().unwrap_or_else(PoisonError::into_inner);
        instances.retain(|(id, inbox)| *id == from || inbox.deliver(message.clone()));
    }
}

impl Fanout for LocalFanout {
    fn join(&self, instance: u64) -> mpsc::Receiver<Inbound> {
        let (inbox, rx) = Inbox::new();
        self.instances
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push((instance, inbox));
        rx
    }

    fn publish(&self, instance: u64, doc: &DocId, event: FanoutEvent) {
        let message = Inbound::Event {
            origin: instance,
            doc: doc.clone(),
            event,
        };
        self.send_all(instance, &message);
    }

    fn heartbeat(&self, instance: u64) {
        self.send_all(instance, &Inbound::Alive { origin: instance });
    }

    fn publish_inbox(&self, instance: u64, users: &[String]) {
        self.send_all(
            instance,
            &Inbound::Inbox {
                origin: instance,
                users: users.to_vec(),
            },
        );
    }

    fn subscribe(&self, instance: u64, doc: &DocId) {
        let instances = self.instances.lock().unwrap_or_else(PoisonError::into_inner);
        for (_, inbox) in instances.iter().filter(|(id, _)| *id == instance) {
            inbox.deliver(Inbound::Subscribed { doc: doc.clone() });
        }
    }

    fn unsubscribe(&self, _instance: u64, _doc: &DocId) {}
}

// ----- the wire form, for fan-outs between processes -----

/// A fan-out message between processes (postcard-encoded, after a version byte). Decoded from
/// whatever the broker hands over: a malformed message is an error, never a panic.
#[derive(Debug, Serialize, Deserialize)]
enum Wire {
    /// [`FanoutEvent::Update`].
    Update {
        origin: u64,
        doc: String,
        cursor: Cursor,
        #[serde(with = "serde_bytes")]
        update: Option<Vec<u8>>,
    },
    /// [`FanoutEvent::Presence`].
    Presence {
        origin: u64,
        doc: String,
        peer: u64,
        user: String,
        clock: u64,
        state: Option<String>,
        age_ms: u64,
    },
    /// [`FanoutEvent::PresenceQuery`].
    PresenceQuery { origin: u64, doc: String },
    /// [`FanoutEvent::Typing`].
    Typing {
        origin: u64,
        doc: String,
        peer: u64,
        user: String,
        typing: bool,
    },
    /// [`FanoutEvent::Stateless`].
    Stateless { origin: u64, doc: String, payload: String },
    /// [`Inbound::Alive`].
    Alive { origin: u64 },
    /// [`Inbound::Inbox`].
    Inbox { origin: u64, users: Vec<String> },
}

/// The version byte every message starts with.
const WIRE_VERSION: u8 = 1;

/// Why a fan-out message was not understood.
#[derive(Debug, thiserror::Error)]
pub enum WireError {
    /// An unknown version byte (an instance of another release?) or none.
    #[error("unknown fan-out message version")]
    Version,
    /// Not a message of this version.
    #[error("malformed fan-out message: {0}")]
    Malformed(#[from] postcard::Error),
    /// A document id that is not one.
    #[error("invalid document id in a fan-out message")]
    DocId,
}

/// Encodes a document event published by `origin`.
pub fn encode_event(origin: u64, doc: &DocId, event: &FanoutEvent) -> Vec<u8> {
    let doc = doc.as_str().to_owned();
    let wire = match event {
        FanoutEvent::Update { cursor, update } => Wire::Update {
            origin,
            doc,
            cursor: *cursor,
            update: update.as_ref().map(|u| u.to_vec()),
        },
        FanoutEvent::Presence {
            peer,
            user,
            clock,
            state,
            age_ms,
        } => Wire::Presence {
            origin,
            doc,
            age_ms: *age_ms,
            peer: *peer,
            user: user.clone(),
            clock: *clock,
            state: state.clone(),
        },
        FanoutEvent::PresenceQuery => Wire::PresenceQuery { origin, doc },
        FanoutEvent::Typing { peer, user, typing } => Wire::Typing {
            origin,
            doc,
            peer: *peer,
            user: user.clone(),
            typing: *typing,
        },
        FanoutEvent::Stateless { payload } => Wire::Stateless {
            origin,
            doc,
            payload: payload.clone(),
        },
    };
    encode(&wire)
}

/// Encodes `origin`'s nudge of these users' inboxes.
pub fn encode_inbox(origin: u64, users: &[String]) -> Vec<u8> {
    encode(&Wire::Inbox {
        origin,
        users: users.to_vec(),
    })
}

/// Encodes `origin`'s heartbeat.
pub fn encode_heartbeat(origin: u64) -> Vec<u8> {
    encode(&Wire::Alive { origin })
}

fn encode(wire: &Wire) -> Vec<u8> {
    let mut out = vec![WIRE_VERSION];
    // Encoding into a Vec fails only on out-of-memory, which aborts anyway.
    out.extend(postcard::to_allocvec(wire).unwrap_or_default());
    out
}

/// Decodes a message encoded by [`encode_event`] or [`encode_heartbeat`].
pub fn decode(bytes: &[u8]) -> Result<Inbound, WireError> {
    let Some((&WIRE_VERSION, body)) = bytes.split_first() else {
        return Err(WireError::Version);
    };
    let doc_id = |doc: String| DocId::new(doc).map_err(|_| WireError::DocId);
    Ok(match postcard::from_bytes::<Wire>(body)? {
        Wire::Update {
            origin,
            doc,
            cursor,
            update,
        } => Inbound::Event {
            origin,
            doc: doc_id(doc)?,
            event: FanoutEvent::Update {
                cursor,
                update: update.map(Arc::from),
            },
        },
        Wire::Presence {
            origin,
            doc,
            peer,
            user,
            clock,
            state,
            age_ms,
        } => Inbound::Event {
            origin,
            doc: doc_id(doc)?,
            event: FanoutEvent::Presence {
                peer,
                user,
                clock,
                state,
                age_ms,
            },
        },
        Wire::PresenceQuery { origin, doc } => Inbound::Event {
            origin,
            doc: doc_id(doc)?,
            event: FanoutEvent::PresenceQuery,
        },
        Wire::Typing {
            origin,
            doc,
            peer,
            user,
            typing,
        } => Inbound::Event {
            origin,
            doc: doc_id(doc)?,
            event: FanoutEvent::Typing { peer, user, typing },
        },
        Wire::Stateless { origin, doc, payload } => Inbound::Event {
            origin,
            doc: doc_id(doc)?,
            event: FanoutEvent::Stateless { payload },
        },
        Wire::Alive { origin } => Inbound::Alive { origin },
        Wire::Inbox { origin, users } => Inbound::Inbox { origin, users },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn doc(id: &str) -> DocId {
        DocId::new(id).unwrap()
    }

    #[test]
    fn messages_round_trip() {
        let events = [
            FanoutEvent::Update {
                cursor: 7,
                update: Some(Arc::from(&b"\x00\x00"[..])),
            },
            FanoutEvent::Update {
                cursor: u64::MAX,
                update: None,
            },
            FanoutEvent::Presence {
                peer: 1 << 40,
                user: "ana".into(),
                clock: 3,
                state: Some("{\"typing\":true}".into()),
                age_ms: 0,
            },
            FanoutEvent::Presence {
                peer: 2,
                user: "bo".into(),
                clock: 4,
                state: None,
                age_ms: 12_345,
            },
            FanoutEvent::PresenceQuery,
            FanoutEvent::Typing {
                peer: 7,
                user: "cy".into(),
                typing: true,
            },
            FanoutEvent::Stateless {
                payload: "{\"kind\":\"ping\"}".into(),
            },
        ];
        for event in events {
            let bytes = encode_event(42, &doc("chat:général"), &event);
            assert_eq!(
                decode(&bytes).unwrap(),
                Inbound::Event {
                    origin: 42,
                    doc: doc("chat:général"),
                    event
                }
            );
        }
        assert_eq!(decode(&encode_heartbeat(9)).unwrap(), Inbound::Alive { origin: 9 });
    }

    #[test]
    fn malformed_messages_are_errors() {
        assert!(matches!(decode(b""), Err(WireError::Version)));
        assert!(matches!(decode(b"\x02\x00"), Err(WireError::Version)));
        let good = encode_event(1, &doc("d"), &FanoutEvent::PresenceQuery);
        for cut in 1..good.len() {
            assert!(decode(&good[..cut]).is_err(), "a message cut at {cut} decoded");
        }
        // A document id the protocol refuses.
        let bad = encode(&Wire::PresenceQuery {
            origin: 1,
            doc: String::new(),
        });
        assert!(matches!(decode(&bad), Err(WireError::DocId)));
        // Random bytes never panic.
        let mut seed = 0x9e37_79b9_7f4a_7c15_u64;
        for _ in 0..2000 {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            let len = (seed % 40) as usize;
            let bytes: Vec<u8> = (0..len).map(|i| (seed >> (i % 8 * 8)) as u8).collect();
            let mut framed = vec![WIRE_VERSION];
            framed.extend(bytes);
            let _ = decode(&framed);
        }
    }

    #[test]
    fn a_full_inbox_owes_a_resync() {
        let (inbox, mut rx) = Inbox::new();
        for _ in 0..FANOUT_QUEUE + 10 {
            assert!(inbox.deliver(Inbound::Alive { origin: 1 }));
        }
        for _ in 0..FANOUT_QUEUE {
            assert_eq!(rx.try_recv().unwrap(), Inbound::Alive { origin: 1 });
        }
        assert!(rx.try_recv().is_err());
        assert!(inbox.deliver(Inbound::Alive { origin: 2 }));
        assert_eq!(rx.try_recv().unwrap(), Inbound::Resync);
        assert_eq!(rx.try_recv().unwrap(), Inbound::Alive { origin: 2 });
        drop(rx);
        assert!(!inbox.deliver(Inbound::Resync));
    }
}
