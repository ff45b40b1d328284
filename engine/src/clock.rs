//! Hybrid logical clocks (HLC): physical milliseconds plus a logical counter.
//!
//! Every chat message carries an HLC stamp. A replica's clock advances on each local send and on
//! each message it receives, so a reply always carries a larger stamp than every message its
//! author had seen — even when the author's wall clock runs behind. A wall clock that runs ahead
//! can only push its own messages later (never before what their author had seen), and every
//! replica that sees such a stamp adopts it, so the order stays causal and deterministic.
//!
//! The stamp's string form ([`Hlc::key`]) is fixed-width and sorts like the stamp itself, so
//! JavaScript clients can order messages with a plain string comparison.

use std::fmt;

/// Largest wall-clock value a stamp may carry (15 decimal digits of milliseconds: year 33658).
pub const MAX_WALL_MS: u64 = 999_999_999_999_999;

/// One HLC stamp. Orders by wall time, then counter.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Hlc {
    /// Milliseconds since the Unix epoch (the largest physical time seen).
    pub wall_ms: u64,
    /// Logical counter that orders events within one millisecond.
    pub counter: u32,
}

impl Hlc {
    /// The fixed-width string form: 15 decimal digits of `wall_ms`, a `.`, 10 digits of
    /// `counter` — e.g. `001732363200000.0000000003`. Sorts exactly like the stamp.
    pub fn key(&self) -> String {
        format!("{:015}.{:010}", self.wall_ms.min(MAX_WALL_MS), self.counter)
    }

    /// Parses [`Hlc::key`]'s form; `None` for anything else.
    pub fn parse(key: &str) -> Option<Hlc> {
        let (wall, counter) = key.split_once('.')?;
        if wall.len() != 15 || counter.len() != 10 {
            return None;
        }
        if !wall.bytes().chain(counter.bytes()).all(|b| b.is_ascii_digit()) {
            return None;
        }
        Some(Hlc {
            wall_ms: wall.parse().ok()?,
            counter: counter.parse().ok()?,
        })
    }

    /// The next stamp after this one at the same wall time (carrying into the wall time when the
    /// counter is exhausted).
    fn successor(self) -> Hlc {
        match self.counter.checked_add(1) {
            Some(counter) => Hlc {
                wall_ms: self.wall_ms,
                counter,
            },
            None => Hlc {
                wall_ms: (self.wall_ms + 1).min(MAX_WALL_MS),
                counter: 0,
            },
        }
    }
}

impl fmt::Display for Hlc {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.key())
    }
}

/// A replica's clock: the last stamp it issued or observed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct HlcClock {
    last: Hlc,
}

impl HlcClock {
    /// A clock that has seen nothing yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// The last stamp issued or observed.
    pub fn last(&self) -> Hlc {
        self.last
    }

    /// Issues a stamp for a local event at physical time `now_ms`: larger than every stamp this
    /// clock has issued or observed.
    pub fn tick(&mut self, now_ms: u64) -> Hlc {
        let now_ms = now_ms.min(MAX_WALL_MS);
        self.last = if now_ms > self.last.wall_ms {
            Hlc {
                wall_ms: now_ms,
                counter: 0,
            }
        } else {
            self.last.successor()
        };
        self.last
    }

    /// Takes a stamp received from another replica into account: every later [`tick`] is
    /// larger than it. Stamps beyond [`MAX_WALL_MS`] are clamped.
    ///
    /// [`tick`]: HlcClock::tick
    pub fn observe(&mut self, remote: Hlc) {
        let remote = Hlc {
            wall_ms: remote.wall_ms.min(MAX_WALL_MS),
            counter: remote.counter,
        };
        if remote > self.last {
            self.last = remote;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ticks_increase_even_when_the_wall_clock_goes_back() {
        let mut c = HlcClock::new();
        let a = c.tick(1000);
        let b = c.tick(900);
        let d = c.tick(1000);
        assert!(a < b && b < d);
        assert_eq!(
            c.tick(2000),
            Hlc {
                wall_ms: 2000,
                counter: 0
            }
        );
    }

    #[test]
    fn a_reply_sorts_after_what_its_author_saw() {
        // The replier's clock is an hour behind the sender's.
        let mut sender = HlcClock::new();
        let mut replier = HlcClock::new();
        let msg = sender.tick(10_000_000);
        replier.observe(msg);
        let reply = replier.tick(10_000_000 - 3_600_000);
        assert!(reply > msg);
        assert!(reply.key() > msg.key());
    }

    #[test]
    fn key_sorts_like_the_stamp_and_parses_back() {
        let stamps = [
            Hlc {
                wall_ms: 5,
                counter: 10,
            },
            Hlc { wall_ms: 5, counter: 9 },
            Hlc {
                wall_ms: 1_732_363_200_000,
                counter: 0,
            },
            Hlc {
                wall_ms: 40,
                counter: u32::MAX,
            },
        ];
        for a in stamps {
            assert_eq!(Hlc::parse(&a.key()), Some(a));
            for b in stamps {
                assert_eq!(a.cmp(&b), a.key().cmp(&b.key()));
            }
        }
        assert_eq!(Hlc::parse("12.3"), None);
        assert_eq!(Hlc::parse("00000000000000a.0000000000"), None);
    }

    #[test]
    fn counter_overflow_carries_into_wall_time() {
        let mut c = HlcClock::new();
        c.observe(Hlc {
            wall_ms: 7,
            counter: u32::MAX,
        });
        assert_eq!(c.tick(0), Hlc { wall_ms: 8, counter: 0 });
    }
}
