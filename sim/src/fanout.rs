//! The simulated fan-out between server instances: in-process delivery, like
//! [`driftsync_server::LocalFanout`], into each instance's bounded inbox
//! ([`driftsync_server::fanout::Inbox`]), but lossy, as pub/sub between processes is.
//!
//! Every message to every receiving instance (document events — `Update`, `Presence`,
//! `PresenceQuery` — and `Alive` heartbeats) draws from one seeded generator whether it is
//! * dropped (any message, the last one of a run included: nothing is special-cased);
//! * duplicated (the copy delivered right after it, or late);
//! * reordered: held back, and delivered right after the next message to that instance (or at
//!   its deadline, if none comes), or simply late (up to [`MAX_HOLD`]).
//!
//! Decisions are made when a message is published or heartbeats are sent, which happens on
//! server tasks of the simulation's current-thread runtime in one order for one seed; held
//! messages are released in the order they were held, when due (checked at every publish and
//! at every tick of the driver). `Subscribed` is delivered at once and never lost (it is the
//! fan-out's own answer to a subscription, not a message between instances).
//!
//! What repairs the faults is the server's: a gap in cursors is filled from the store, an old
//! cursor is ignored, and the head check (`Config::head_check`) catches a room up when the last
//! update of a run was lost; presence is refreshed by its owners and expires.

use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use driftsync_protocol::DocId;
use driftsync_server::fanout::Inbox;
use driftsync_server::{Fanout, FanoutEvent, Inbound};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokio::sync::mpsc;
use tokio::time::Instant;

/// The longest a message is held back.
pub const MAX_HOLD: Duration = Duration::from_millis(3000);

/// How often each fault happens, per message and receiving instance.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Faults {
    /// A message is lost.
    pub drop: f64,
    /// A message arrives twice.
    pub duplicate: f64,
    /// A message is held back (delivered after a later one, or late).
    pub reorder: f64,
}

impl Faults {
    /// No faults: the fan-out delivers every message once, in order, at once.
    pub const NONE: Faults = Faults {
        drop: 0.0,
        duplicate: 0.0,
        reorder: 0.0,
    };
}

impl std::fmt::Display for Faults {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "drop {:.1}%, duplicate {:.1}%, reorder {:.1}%",
            self.drop * 100.0,
            self.duplicate * 100.0,
            self.reorder * 100.0
        )
    }
}

/// What the fan-out did, counted.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct FanoutStats {
    /// Messages handed to an inbox (copies and late ones included).
    pub delivered: u64,
    /// Messages lost on purpose.
    pub dropped: u64,
    /// Messages sent twice.
    pub duplicated: u64,
    /// Messages held back.
    pub held: u64,
}

/// A message held back for one instance.
#[derive(Debug)]
struct Held {
    to: u64,
    message: Inbound,
    /// Delivered at this time at the latest.
    until: Instant,
    /// Delivered right after the next message to `to`, if one comes before `until`.
    after_next: bool,
}

#[derive(Debug)]
struct Inner {
    rng: StdRng,
    faults: Faults,
    start: Instant,
    /// The instances, in the order they joined.
    instances: Vec<(u64, Inbox)>,
    /// Held messages, in the order they were held.
    held: Vec<Held>,
    /// Fault events not yet taken by the driver: (virtual ms, line).
    log: Vec<(u64, String)>,
    stats: FanoutStats,
}

/// The lossy fan-out (see the module documentation). Clones share one fan-out.
#[derive(Debug, Clone)]
pub struct LossyFanout {
    inner: Arc<Mutex<Inner>>,
}

impl LossyFanout {
    /// A fan-out whose faults come from `seed` at the rates of `faults`; `start` is the run's
    /// virtual time zero (for its log).
    pub fn new(seed: u64, faults: Faults, start: Instant) -> LossyFanout {
        LossyFanout {
            inner: Arc::new(Mutex::new(Inner {
                rng: StdRng::seed_from_u64(seed),
                faults,
                start,
                instances: Vec::new(),
                held: Vec::new(),
                log: Vec::new(),
                stats: FanoutStats::default(),
            })),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Changes the fault rates (the driver heals with [`Faults::NONE`]); what is held stays
    /// held until its deadline.
    pub fn set_faults(&self, faults: Faults) {
        self.lock().faults = faults;
    }

    /// Delivers the held messages whose time has come.
    pub fn release_due(&self) {
        self.lock().release_due(Instant::now());
    }

    /// Whether messages are still held back.
    pub fn holds_messages(&self) -> bool {
        !self.lock().held.is_empty()
    }

    /// Takes the fault events logged since the last call, with their virtual ms.
    pub fn take_log(&self) -> Vec<(u64, String)> {
        std::mem::take(&mut self.lock().log)
    }

    /// What the fan-out did so far.
    pub fn stats(&self) -> FanoutStats {
        self.lock().stats
    }
}

/// A message in a log line.
fn describe(message: &Inbound) -> String {
    match message {
        Inbound::Event { origin, doc, event } => {
            let what = match event {
                FanoutEvent::Update { cursor, update } => format!(
                    "Update cursor {cursor}{}",
                    if update.is_none() { " (no bytes)" } else { "" }
                ),
                FanoutEvent::Presence { peer, clock, state, .. } => {
                    format!("Presence peer {peer} clock {clock} {}", state.is_some())
                }
                FanoutEvent::PresenceQuery => "PresenceQuery".to_string(),
                FanoutEvent::Typing { peer, typing, .. } => format!("Typing peer {peer} {typing}"),
                FanoutEvent::Stateless { .. } => "Stateless".to_string(),
            };
            format!("{what} of {doc} from i{origin}")
        }
        Inbound::Alive { origin } => format!("Alive from i{origin}"),
        Inbound::Subscribed { doc } => format!("Subscribed {doc}"),
        Inbound::Resync => "Resync".to_string(),
        Inbound::Inbox { origin, users } => format!("Inbox of {users:?} from i{origin}"),
    }
}

impl Inner {
    fn ms(&self, now: Instant) -> u64 {
        u64::try_from(now.saturating_duration_since(self.start).as_millis()).unwrap_or(u64::MAX)
    }

    fn log(&mut self, now: Instant, line: String) {
        let ms = self.ms(now);
        self.log.push((ms, format!("fan-out: {line}")));
    }

    /// Hands `message` to instance `to` now. An instance that stopped reading (crashed) is
    /// forgotten, with what was held for it.
    fn hand(&mut self, to: u64, message: Inbound) {
        let Some(at) = self.instances.iter().position(|(id, _)| *id == to) else {
            return;
        };
        if self.instances[at].1.deliver(message) {
            self.stats.delivered += 1;
        } else {
            self.instances.remove(at);
            self.held.retain(|held| held.to != to);
        }
    }

    /// Delivers what is held for anybody and due at `now`, in the order it was held.
    fn release_due(&mut self, now: Instant) {
        if !self.held.iter().any(|held| held.until <= now) {
            return;
        }
        let (due, kept): (Vec<Held>, Vec<Held>) = std::mem::take(&mut self.held)
            .into_iter()
            .partition(|held| held.until <= now);
        self.held = kept;
        for held in due {
            let line = format!("late to i{}: {}", held.to, describe(&held.message));
            self.log(now, line);
            self.hand(held.to, held.message);
        }
    }

    /// Delivers what was held for `to` until its next message (which was just delivered).
    fn release_after(&mut self, to: u64, now: Instant) {
        if !self.held.iter().any(|held| held.to == to && held.after_next) {
            return;
        }
        let (due, kept): (Vec<Held>, Vec<Held>) = std::mem::take(&mut self.held)
            .into_iter()
            .partition(|held| held.to == to && held.after_next);
        self.held = kept;
        for held in due {
            let line = format!("reordered to i{to}: {}", describe(&held.message));
            self.log(now, line);
            self.hand(to, held.message);
        }
    }

    /// Holds `message` for `to`: until the next message to it (or a deadline), or until a
    /// random time.
    fn hold(&mut self, to: u64, message: Inbound, now: Instant, may_wait_for_next: bool) {
        let max_ms = u64::try_from(MAX_HOLD.as_millis()).unwrap_or(u64::MAX);
        let ms = self.rng.random_range(1..=max_ms);
        let after_next = may_wait_for_next && self.rng.random_bool(0.5);
        let line = format!(
            "holds to i{to} {}: {}",
            if after_next {
                format!("until the next message (at most {ms} ms)")
            } else {
                format!("for {ms} ms")
            },
            describe(&message)
        );
        self.log(now, line);
        self.stats.held += 1;
        self.held.push(Held {
            to,
            message,
            until: now + Duration::from_millis(ms),
            after_next,
        });
    }

    /// Sends `message` to instance `to` through the faults.
    fn send(&mut self, to: u64, message: Inbound, now: Instant) {
        let faults = self.faults;
        // Three draws per message whatever the rates, so that a change of one rate does not
        // shift every later decision.
        let drop = self.rng.random_bool(faults.drop);
        let duplicate = self.rng.random_bool(faults.duplicate);
        let reorder = self.rng.random_bool(faults.reorder);
        if drop {
            self.stats.dropped += 1;
            let line = format!("drops to i{to}: {}", describe(&message));
            self.log(now, line);
            return;
        }
        let copy = duplicate.then(|| message.clone());
        if reorder {
            self.hold(to, message, now, true);
        } else {
            self.hand(to, message);
            self.release_after(to, now);
        }
        if let Some(copy) = copy {
            self.stats.duplicated += 1;
            if self.rng.random_bool(0.5) {
                let line = format!("duplicates to i{to}: {}", describe(&copy));
                self.log(now, line);
                self.hand(to, copy);
            } else {
                self.hold(to, copy, now, false);
            }
        }
    }

    /// Sends `message` from `from` to every other instance, in the order they joined.
    fn send_all(&mut self, from: u64, message: &Inbound) {
        let now = Instant::now();
        self.release_due(now);
        let to: Vec<u64> = self
            .instances
            .iter()
            .map(|(id, _)| *id)
            .filter(|&id| id != from)
            .collect();
        for id in to {
            self.send(id, message.clone(), now);
        }
    }
}

impl Fanout for LossyFanout {
    fn join(&self, instance: u64) -> mpsc::Receiver<Inbound> {
        let (inbox, rx) = Inbox::new();
        self.lock().instances.push((instance, inbox));
        rx
    }

    fn publish(&self, instance: u64, doc: &DocId, event: FanoutEvent) {
        let message = Inbound::Event {
            origin: instance,
            doc: doc.clone(),
            event,
        };
        self.lock().send_all(instance, &message);
    }

    fn heartbeat(&self, instance: u64) {
        self.lock().send_all(instance, &Inbound::Alive { origin: instance });
    }

    fn subscribe(&self, instance: u64, doc: &DocId) {
        // Every instance receives every document's events; the subscription is active at once.
        self.lock().hand(instance, Inbound::Subscribed { doc: doc.clone() });
    }

    fn unsubscribe(&self, _instance: u64, _doc: &DocId) {}
}

#[cfg(test)]
mod tests {
    use super::*;

    fn doc() -> DocId {
        DocId::new("notes/0").unwrap()
    }

    fn update(cursor: u64) -> FanoutEvent {
        FanoutEvent::Update { cursor, update: None }
    }

    fn cursors(rx: &mut mpsc::Receiver<Inbound>) -> Vec<u64> {
        let mut out = Vec::new();
        while let Ok(message) = rx.try_recv() {
            if let Inbound::Event {
                event: FanoutEvent::Update { cursor, .. },
                ..
            } = message
            {
                out.push(cursor);
            }
        }
        out
    }

    #[tokio::test(start_paused = true)]
    async fn without_faults_every_message_arrives_once_in_order() {
        let fanout = LossyFanout::new(1, Faults::NONE, Instant::now());
        let _a = fanout.join(1);
        let mut b = fanout.join(2);
        for cursor in 1..=100 {
            fanout.publish(1, &doc(), update(cursor));
        }
        assert_eq!(cursors(&mut b), (1..=100).collect::<Vec<_>>());
        assert!(fanout.take_log().is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn faults_drop_duplicate_and_reorder_and_replay_alike() {
        let run = || async {
            let fanout = LossyFanout::new(
                7,
                Faults {
                    drop: 0.2,
                    duplicate: 0.1,
                    reorder: 0.1,
                },
                Instant::now(),
            );
            let _a = fanout.join(1);
            let mut b = fanout.join(2);
            for cursor in 1..=1000 {
                fanout.publish(1, &doc(), update(cursor));
            }
            tokio::time::sleep(MAX_HOLD).await;
            fanout.release_due();
            assert!(!fanout.holds_messages());
            (cursors(&mut b), fanout.stats())
        };
        let (seen, stats) = run().await;
        assert!(
            stats.dropped > 100 && stats.duplicated > 30 && stats.held > 50,
            "{stats:?}"
        );
        let mut sorted = seen.clone();
        sorted.sort_unstable();
        assert_ne!(seen, sorted, "nothing was reordered");
        sorted.dedup();
        assert!(sorted.len() < seen.len(), "nothing was duplicated");
        assert!(sorted.len() < 1000, "nothing was dropped");
        assert_eq!(run().await, (seen, stats), "one seed, two runs");
    }
}
