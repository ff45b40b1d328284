//! Hybrid logical clocks (HLC): physical milliseconds plus a logical counter.
//!
//! Every chat message carries an HLC stamp. A replica's clock advances on each local send and on
//! each message it receives, so a reply always carries a larger stamp than every message its
//! author had seen — even when the author's wall clock runs behind. A wall clock that runs ahead
//! can only push its own messages later (never before what their author had seen), and every
//! replica that sees such a stamp adopts it, so the order stays causal and deterministic.
//!
//! Bounds keep a wrong or forged stamp from breaking this for everyone: a clock never overflows
//! (the counter carries into the next millisecond at [`MAX_COUNTER`]); it follows an observed
//! stamp only while that stamp is at most [`MAX_OBSERVED_AHEAD_MS`] ahead of its wall clock; and
//! a chat server refuses new messages stamped more than [`DEFAULT_MAX_CLOCK_SKEW_MS`] (its
//! configured bound) ahead of its own clock, or with an invalid stamp.
//!
//! The stamp's string form ([`Hlc::key`]) is fixed-width and sorts like the stamp itself, so
//! JavaScript clients can order messages with a plain string comparison.

use std::fmt;

/// Largest wall-clock value a stamp may carry (15 decimal digits of milliseconds: year 33658).
pub const MAX_WALL_MS: u64 = 999_999_999_999_999;

/// Largest counter a valid stamp carries: 2^31 − 1.
///
/// The counter only counts events within one millisecond of the largest wall time a replica has
/// seen, so legitimate use stays many orders of magnitude below it (it would take two billion
/// messages while the wall clock stands still). A clock whose counter reaches it carries into the
/// next millisecond instead ([`HlcClock::tick`]), and a chat server refuses messages whose stamp
/// is beyond it (`chat::ChatGuard`). It leaves room below `u32::MAX`, which the 10-digit key
/// could still express, so that no valid stamp is ever one step from wrapping.
pub const MAX_COUNTER: u32 = (1 << 31) - 1;

/// The default bound a chat server puts on how far ahead of its own clock a new message's
/// stamp may be (5 minutes; `chat::ChatGuard`). Devices synchronised by NTP are well within it.
pub const DEFAULT_MAX_CLOCK_SKEW_MS: u64 = 5 * 60 * 1000;

/// How far ahead of the local wall clock an observed stamp may be and still move a clock
/// (24 hours; see [`HlcClock`]). Larger than [`DEFAULT_MAX_CLOCK_SKEW_MS`] on purpose: a
/// replica whose own clock runs behind the server's (by an hour, say) must still follow the
/// stamps the server accepted, or its replies would sort before the messages they answer.
pub const MAX_OBSERVED_AHEAD_MS: u64 = 24 * 60 * 60 * 1000;

/// One HLC stamp. Orders by wall time, then counter.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Hlc {
    /// Milliseconds since the Unix epoch (the largest physical time seen).
    pub wall_ms: u64,
    /// Logical counter that orders events within one millisecond.
    pub counter: u32,
}

impl Hlc {
    /// The largest valid stamp.
    pub const MAX: Hlc = Hlc {
        wall_ms: MAX_WALL_MS,
        counter: MAX_COUNTER,
    };

    /// The fixed-width string form: 15 decimal digits of `wall_ms`, a `.`, 10 digits of
    /// `counter` — e.g. `001732363200000.0000000003`. Sorts exactly like the stamp.
    pub fn key(&self) -> String {
        format!("{:015}.{:010}", self.wall_ms.min(MAX_WALL_MS), self.counter)
    }

    /// Parses [`Hlc::key`]'s form; `None` for anything else. A parsed stamp may still be beyond
    /// the valid range (a counter above [`MAX_COUNTER`]): see [`Hlc::is_valid`].
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

    /// Whether the stamp is within the range a clock issues: wall time at most [`MAX_WALL_MS`],
    /// counter at most [`MAX_COUNTER`].
    pub fn is_valid(&self) -> bool {
        self.wall_ms <= MAX_WALL_MS && self.counter <= MAX_COUNTER
    }

    /// The next stamp after this one: the counter plus one, or, once the counter reached
    /// [`MAX_COUNTER`], the next millisecond with counter 0. Never wraps: at [`Hlc::MAX`] (year
    /// 33658) it stays there.
    fn successor(self) -> Hlc {
        if self.counter < MAX_COUNTER {
            Hlc {
                wall_ms: self.wall_ms,
                counter: self.counter + 1,
            }
        } else if self.wall_ms < MAX_WALL_MS {
            Hlc {
                wall_ms: self.wall_ms + 1,
                counter: 0,
            }
        } else {
            Hlc::MAX
        }
    }

    /// The smallest valid stamp not below this one (itself when valid): a counter beyond
    /// [`MAX_COUNTER`] carries into the next millisecond; beyond [`MAX_WALL_MS`], [`Hlc::MAX`].
    fn normalized(self) -> Hlc {
        if self.wall_ms > MAX_WALL_MS {
            Hlc::MAX
        } else if self.counter > MAX_COUNTER {
            Hlc {
                wall_ms: self.wall_ms,
                counter: MAX_COUNTER,
            }
            .successor()
        } else {
            self
        }
    }
}

impl fmt::Display for Hlc {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.key())
    }
}

/// A replica's clock: the last stamp it issued, and the largest one it observed.
///
/// What a clock takes from observed stamps is bounded: at each [`tick`](HlcClock::tick), the
/// largest observed stamp counts only if it is at most `max_ahead` ([`MAX_OBSERVED_AHEAD_MS`]
/// unless set otherwise) ahead of the wall clock. A message stamped far in the future (a
/// device whose clock is badly wrong, or a forged stamp such as `999999999999999.4294967295`,
/// which a server refuses today but may hold from before it did) thus cannot drag this
/// replica's stamps along: not to the year 33658, and not to a fixed `now + max_ahead` either,
/// where every later message of this replica would be refused by a server. Once the wall clock
/// is within `max_ahead` of such a stamp, the clock follows it again.
///
/// The price: a reply sorts after every message its author had seen, except a message stamped
/// more than `max_ahead` ahead of the replier's wall clock, and, while the largest stamp seen is
/// such a message, the messages seen before it that were ahead of the replier's wall clock.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HlcClock {
    /// The last stamp this clock issued.
    issued: Hlc,
    /// The largest stamp observed (normalised, not yet bounded).
    seen: Hlc,
    /// How far ahead of the wall clock an observed stamp may be and still move the clock.
    max_ahead_ms: u64,
}

impl Default for HlcClock {
    fn default() -> Self {
        HlcClock {
            issued: Hlc::default(),
            seen: Hlc::default(),
            max_ahead_ms: MAX_OBSERVED_AHEAD_MS,
        }
    }
}

impl HlcClock {
    /// A clock that has seen nothing yet, following observed stamps up to
    /// [`MAX_OBSERVED_AHEAD_MS`] ahead of the wall clock.
    pub fn new() -> Self {
        Self::default()
    }

    /// The same clock following observed stamps up to `max_ahead_ms` ahead of the wall clock.
    pub fn with_max_ahead(mut self, max_ahead_ms: u64) -> Self {
        self.max_ahead_ms = max_ahead_ms;
        self
    }

    /// The larger of the last stamp issued and the largest stamp observed.
    pub fn last(&self) -> Hlc {
        self.issued.max(self.seen)
    }

    /// Issues a stamp for a local event at physical time `now_ms`: larger than every stamp this
    /// clock has issued, and than the largest stamp it observed unless that one is more than
    /// `max_ahead` ahead of `now_ms` (see the type docs). Never overflows: a counter at
    /// [`MAX_COUNTER`] carries into the next millisecond.
    pub fn tick(&mut self, now_ms: u64) -> Hlc {
        let now_ms = now_ms.min(MAX_WALL_MS);
        let bound = now_ms.saturating_add(self.max_ahead_ms);
        let base = if self.seen.wall_ms <= bound {
            self.issued.max(self.seen)
        } else {
            self.issued
        };
        self.issued = if now_ms > base.wall_ms {
            Hlc {
                wall_ms: now_ms,
                counter: 0,
            }
        } else {
            base.successor()
        };
        self.issued
    }

    /// Takes a stamp received from another replica into account: every later [`tick`] is
    /// larger than it, as long as it is at most `max_ahead` ahead of the wall clock then.
    /// Stamps beyond the valid range are first raised to the smallest valid stamp not below
    /// them (a counter beyond [`MAX_COUNTER`] carries into the next millisecond; a wall time
    /// beyond [`MAX_WALL_MS`] is clamped).
    ///
    /// [`tick`]: HlcClock::tick
    pub fn observe(&mut self, remote: Hlc) {
        let remote = remote.normalized();
        if remote > self.seen {
            self.seen = remote;
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
            counter: MAX_COUNTER,
        });
        assert_eq!(c.tick(0), Hlc { wall_ms: 8, counter: 0 });
        // A stamp beyond the valid range (a forged or foreign one) is raised, not wrapped.
        let forged = Hlc {
            wall_ms: 9,
            counter: u32::MAX,
        };
        assert!(!forged.is_valid());
        c.observe(forged);
        let next = c.tick(0);
        assert!(next > forged && next.is_valid());
        assert_eq!(
            next,
            Hlc {
                wall_ms: 10,
                counter: 1
            }
        );
    }

    #[test]
    fn ticks_never_overflow_or_go_back() {
        // Issuing at a standing wall clock: the counter saturates into the next millisecond.
        let mut c = HlcClock::new();
        c.observe(Hlc {
            wall_ms: 5,
            counter: MAX_COUNTER - 1,
        });
        let stamps: Vec<Hlc> = (0..3).map(|_| c.tick(5)).collect();
        assert_eq!(
            stamps,
            [
                Hlc {
                    wall_ms: 5,
                    counter: MAX_COUNTER
                },
                Hlc { wall_ms: 6, counter: 0 },
                Hlc { wall_ms: 6, counter: 1 },
            ]
        );
        // At the very end of the range the clock stays there instead of wrapping.
        let mut end = HlcClock::new();
        end.observe(Hlc {
            wall_ms: u64::MAX,
            counter: u32::MAX,
        });
        let now = MAX_WALL_MS;
        assert_eq!(end.tick(now), Hlc::MAX);
        assert_eq!(end.tick(now), Hlc::MAX);
        assert_eq!(end.tick(u64::MAX), Hlc::MAX);
        assert!(Hlc::MAX.key() == "999999999999999.2147483647");
    }

    #[test]
    fn a_far_future_stamp_does_not_drag_the_clock() {
        let now = 1_700_000_000_000;
        let mut c = HlcClock::new();
        let legit = Hlc {
            wall_ms: now - 10,
            counter: 3,
        };
        c.observe(legit);
        // The forged stamp of the attack: the largest the key can express.
        c.observe(Hlc::parse("999999999999999.4294967295").unwrap());
        let reply = c.tick(now);
        assert_eq!(
            reply,
            Hlc {
                wall_ms: now,
                counter: 0
            }
        );
        assert!(reply > legit);
        let next = c.tick(now);
        assert_eq!(
            next,
            Hlc {
                wall_ms: now,
                counter: 1
            }
        );
        // Just beyond the bound is ignored too; at the bound it is followed exactly.
        let mut d = HlcClock::new().with_max_ahead(1_000);
        d.observe(Hlc {
            wall_ms: now + 1_001,
            counter: 0,
        });
        assert_eq!(
            d.tick(now),
            Hlc {
                wall_ms: now,
                counter: 0
            }
        );
        let ahead = Hlc {
            wall_ms: now + 1_000,
            counter: 7,
        };
        let mut e = HlcClock::new().with_max_ahead(1_000);
        e.observe(ahead);
        assert_eq!(
            e.tick(now),
            Hlc {
                wall_ms: now + 1_000,
                counter: 8
            }
        );
        // Once the wall clock is within the bound, the stamp seen before is followed again.
        assert_eq!(
            d.tick(now + 1),
            Hlc {
                wall_ms: now + 1_001,
                counter: 1
            }
        );
        // The clock's own stamps never go back, whatever the bound says.
        assert!(
            d.tick(now - 5)
                > Hlc {
                    wall_ms: now + 1_001,
                    counter: 1
                }
        );
        assert_eq!(
            d.last(),
            Hlc {
                wall_ms: now + 1_001,
                counter: 2
            }
        );
    }
}
