//! Per-connection rate limiting: a token bucket over frames and one over bytes.
//!
//! A frame that finds either bucket empty is refused with `ErrorCode::RateLimited` and not
//! processed (a refused push is not stored; the client retries it from its outbox later).

use tokio::time::Instant;

/// A token bucket: `rate` tokens per second, holding at most `burst`.
#[derive(Debug, Clone)]
pub(crate) struct TokenBucket {
    rate: f64,
    burst: f64,
    tokens: f64,
    last: Instant,
}

impl TokenBucket {
    pub(crate) fn new(rate: f64, burst: f64, now: Instant) -> Self {
        TokenBucket {
            rate,
            burst,
            tokens: burst,
            last: now,
        }
    }

    /// Takes `cost` tokens at `now`, going below zero if need be (at most one burst deep).
    pub(crate) fn take_debt(&mut self, cost: f64, now: Instant) {
        self.refill(now);
        self.tokens = (self.tokens - cost).max(-self.burst);
    }

    fn refill(&mut self, now: Instant) {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.last = now;
        self.tokens = (self.tokens + elapsed * self.rate).min(self.burst);
    }

    /// Takes `cost` tokens if there are enough at `now`.
    pub(crate) fn try_take(&mut self, cost: f64, now: Instant) -> bool {
        self.refill(now);
        if self.tokens >= cost {
            self.tokens -= cost;
            true
        } else {
            false
        }
    }
}

/// Rate limits of one connection.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RateLimit {
    /// Frames per second allowed on average.
    pub frames_per_sec: f64,
    /// Frames allowed in a burst.
    pub frame_burst: f64,
    /// Bytes per second allowed on average.
    pub bytes_per_sec: f64,
    /// Bytes allowed in a burst.
    pub byte_burst: f64,
}

impl Default for RateLimit {
    fn default() -> Self {
        // Generous for people typing and for a resuming client pushing its outbox; a flood is cut.
        RateLimit {
            frames_per_sec: 500.0,
            frame_burst: 2000.0,
            bytes_per_sec: 4.0 * 1024.0 * 1024.0,
            byte_burst: 16.0 * 1024.0 * 1024.0,
        }
    }
}

/// How fast rooms may be opened (documents subscribed): per connection, and per authenticated
/// user across all of their connections (twice as fast). Opening a room loads a document, so a
/// token for `chat/*` must not be able to load every room of the server in a minute.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RoomOpens {
    /// Rooms per second on average.
    pub per_sec: f64,
    /// Rooms at once (a reconnecting client resumes all of its documents together).
    pub burst: f64,
}

impl Default for RoomOpens {
    fn default() -> Self {
        RoomOpens {
            per_sec: 20.0,
            burst: 1024.0,
        }
    }
}

/// The most users whose room-open buckets are kept; beyond it the table starts over (a user
/// then gets a full burst again, once per 64 Ki other users).
const MAX_USERS_TRACKED: usize = 64 * 1024;

/// Room-open buckets per user, shared by every connection of the server.
#[derive(Default)]
pub(crate) struct UserOpens {
    buckets: std::sync::Mutex<std::collections::HashMap<String, TokenBucket>>,
}

impl UserOpens {
    /// Whether `user` may open one more room now.
    pub(crate) fn allow(&self, limit: &RoomOpens, user: &str, now: Instant) -> bool {
        let mut buckets = self.buckets.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if !buckets.contains_key(user) && buckets.len() >= MAX_USERS_TRACKED {
            buckets.clear();
        }
        buckets
            .entry(user.to_string())
            .or_insert_with(|| TokenBucket::new(2.0 * limit.per_sec, 2.0 * limit.burst, now))
            .try_take(1.0, now)
    }
}

/// The buckets of one connection.
#[derive(Debug, Clone)]
pub(crate) struct Limiter {
    frames: TokenBucket,
    bytes: TokenBucket,
    /// Rooms opened.
    opens: TokenBucket,
    /// Refused updates that made a room reload its document.
    reloads: TokenBucket,
}

/// Refused updates that cost a reload of their document, per connection: a few at once, then
/// one per [`RELOAD_EVERY_SECS`]. A connection beyond that is closed.
const RELOAD_BURST: f64 = 5.0;
const RELOAD_EVERY_SECS: f64 = 10.0;

impl Limiter {
    pub(crate) fn new(limit: &RateLimit, opens: &RoomOpens, now: Instant) -> Self {
        Limiter {
            frames: TokenBucket::new(limit.frames_per_sec, limit.frame_burst, now),
            bytes: TokenBucket::new(limit.bytes_per_sec, limit.byte_burst, now),
            opens: TokenBucket::new(opens.per_sec, opens.burst, now),
            reloads: TokenBucket::new(1.0 / RELOAD_EVERY_SECS, RELOAD_BURST, now),
        }
    }

    /// The connection's update was refused after it was applied, and its room reloaded a
    /// document of `cost` stored bytes: charged to the byte bucket. Returns false when the
    /// connection causes reloads faster than it may, and must be closed.
    pub(crate) fn pay_reload(&mut self, cost: u64, now: Instant) -> bool {
        self.charge(usize::try_from(cost).unwrap_or(usize::MAX), now);
        self.reloads.try_take(1.0, now)
    }

    /// Whether the connection may open one more room now.
    pub(crate) fn allow_open(&mut self, now: Instant) -> bool {
        self.opens.try_take(1.0, now)
    }

    /// Charges `len` bytes the connection caused the server to send (an expensive answer):
    /// taken whether or not the bucket holds them, so that the next frames wait for the debt.
    pub(crate) fn charge(&mut self, len: usize, now: Instant) {
        self.bytes.take_debt(len as f64, now);
    }

    /// Charges frames the socket handled by itself (control frames, fragments; see
    /// `socket::Reader::take_uncounted`): taken whether or not the buckets hold them, so that a
    /// flood of them delays the connection's next frames instead of costing nothing.
    pub(crate) fn charge_uncounted(&mut self, (frames, bytes): (u32, usize), now: Instant) {
        if frames > 0 {
            self.frames.take_debt(f64::from(frames), now);
            self.bytes.take_debt(bytes as f64, now);
        }
    }

    /// Whether a frame of `len` bytes may be processed now.
    pub(crate) fn allow(&mut self, len: usize, now: Instant) -> bool {
        // Check both before taking from either, so a refused frame costs nothing.
        let mut frames = self.frames.clone();
        let mut bytes = self.bytes.clone();
        if frames.try_take(1.0, now) && bytes.try_take(len as f64, now) {
            self.frames = frames;
            self.bytes = bytes;
            true
        } else {
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn bucket_refills_at_its_rate_up_to_the_burst() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(10.0, 5.0, t0);
        for _ in 0..5 {
            assert!(b.try_take(1.0, t0));
        }
        assert!(!b.try_take(1.0, t0));
        assert!(b.try_take(1.0, t0 + Duration::from_millis(100)));
        assert!(!b.try_take(1.0, t0 + Duration::from_millis(100)));
        // A long pause refills only up to the burst.
        let later = t0 + Duration::from_secs(60);
        for _ in 0..5 {
            assert!(b.try_take(1.0, later));
        }
        assert!(!b.try_take(1.0, later));
    }

    #[test]
    fn limiter_counts_frames_and_bytes() {
        let t0 = Instant::now();
        let limit = RateLimit {
            frames_per_sec: 1.0,
            frame_burst: 3.0,
            bytes_per_sec: 1.0,
            byte_burst: 100.0,
        };
        let mut l = Limiter::new(&limit, &RoomOpens::default(), t0);
        assert!(!l.allow(101, t0), "too many bytes");
        assert!(l.allow(50, t0));
        assert!(l.allow(50, t0));
        assert!(!l.allow(1, t0), "the byte bucket is empty");
        assert!(l.allow(0, t0), "an empty frame only costs a frame token");
        assert!(!l.allow(0, t0), "the frame bucket is empty");
    }

    #[test]
    fn answers_are_charged_and_rooms_opened_are_counted() {
        let t0 = Instant::now();
        let limit = RateLimit {
            frames_per_sec: 100.0,
            frame_burst: 100.0,
            bytes_per_sec: 1000.0,
            byte_burst: 1000.0,
        };
        let opens = RoomOpens {
            per_sec: 1.0,
            burst: 2.0,
        };
        let mut l = Limiter::new(&limit, &opens, t0);
        // An answer of 1,500 bytes to a 10-byte request: the next frame waits for the debt.
        assert!(l.allow(10, t0));
        l.charge(1500, t0);
        assert!(!l.allow(1, t0 + Duration::from_millis(400)));
        assert!(l.allow(1, t0 + Duration::from_millis(600)));
        assert!(l.allow_open(t0) && l.allow_open(t0));
        assert!(!l.allow_open(t0));
        assert!(l.allow_open(t0 + Duration::from_secs(1)));
        assert!((0..5).all(|_| l.pay_reload(0, t0)));
        assert!(!l.pay_reload(0, t0), "a sixth reload at once closes the connection");
        let users = UserOpens::default();
        assert!((0..4).all(|_| users.allow(&opens, "ada", t0)));
        assert!(!users.allow(&opens, "ada", t0), "twice the connection's burst per user");
        assert!(users.allow(&opens, "bob", t0));
    }
}
