//! Per-connection rate limiting: a token bucket over frames and one over bytes.
//!
//! A frame that finds either bucket empty is refused with `ErrorCode::RateLimited` and not
//! processed (a refused push is not stored; the client retries it from its outbox later).

use std::time::Instant;

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

    /// Takes `cost` tokens if there are enough at `now`.
    pub(crate) fn try_take(&mut self, cost: f64, now: Instant) -> bool {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.last = now;
        self.tokens = (self.tokens + elapsed * self.rate).min(self.burst);
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

/// The buckets of one connection.
#[derive(Debug, Clone)]
pub(crate) struct Limiter {
    frames: TokenBucket,
    bytes: TokenBucket,
}

impl Limiter {
    pub(crate) fn new(limit: &RateLimit, now: Instant) -> Self {
        Limiter {
            frames: TokenBucket::new(limit.frames_per_sec, limit.frame_burst, now),
            bytes: TokenBucket::new(limit.bytes_per_sec, limit.byte_burst, now),
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
        let mut l = Limiter::new(&limit, t0);
        assert!(!l.allow(101, t0), "too many bytes");
        assert!(l.allow(50, t0));
        assert!(l.allow(50, t0));
        assert!(!l.allow(1, t0), "the byte bucket is empty");
        assert!(l.allow(0, t0), "an empty frame only costs a frame token");
        assert!(!l.allow(0, t0), "the frame bucket is empty");
    }
}
