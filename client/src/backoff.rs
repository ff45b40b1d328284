//! Reconnection delays: exponential backoff with full jitter, capped.
//!
//! Attempt `n` (from 0) waits a uniformly random time in `[0, min(cap, base * 2^n)]`, so many
//! clients that lost the same server do not come back in lockstep.

use std::future::Future;
use std::time::Duration;

use crate::{Error, Result};

/// Exponential backoff with full jitter.
#[derive(Debug, Clone)]
pub struct Backoff {
    base: Duration,
    cap: Duration,
    attempt: u32,
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff::new(Duration::from_millis(250), Duration::from_secs(30))
    }
}

impl Backoff {
    /// Starts at `base` and never waits longer than `cap`.
    pub fn new(base: Duration, cap: Duration) -> Backoff {
        Backoff { base, cap, attempt: 0 }
    }

    /// The upper bound of the next delay.
    pub fn ceiling(&self) -> Duration {
        let factor = 1u32.checked_shl(self.attempt.min(31)).unwrap_or(u32::MAX);
        self.base.saturating_mul(factor).min(self.cap)
    }

    /// The next delay (random below the ceiling); each call doubles the ceiling up to the cap.
    pub fn next_delay(&mut self) -> Duration {
        let ceiling = self.ceiling();
        self.attempt = self.attempt.saturating_add(1);
        let nanos = u64::try_from(ceiling.as_nanos()).unwrap_or(u64::MAX);
        Duration::from_nanos(rand::random_range(0..=nanos))
    }

    /// Back to the first delay, after a success.
    pub fn reset(&mut self) {
        self.attempt = 0;
    }
}

impl Error {
    /// Whether trying again later may succeed (network trouble, a server going away or overloaded),
    /// as opposed to a refusal that a retry repeats (bad token, forbidden document, bad data).
    pub fn is_retryable(&self) -> bool {
        match self {
            Error::Connection(_) | Error::Closed | Error::Timeout(_) | Error::Silent(_) => true,
            Error::Server { code, .. } => code.is_transient(),
            // A certificate that is not trusted stays so until the app or the server changes.
            Error::Engine(_)
            | Error::DocId(_)
            | Error::Protocol(_)
            | Error::Invalid(_)
            | Error::Stopped
            | Error::Tls(_) => false,
        }
    }
}

/// Runs `attempt` until it succeeds, fails with an error that is not retryable, or has failed
/// `max_attempts` times, sleeping a [`Backoff`] delay between attempts.
pub async fn retry<T, F, Fut>(backoff: &mut Backoff, max_attempts: u32, mut attempt: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T>>,
{
    let mut tries = 0u32;
    loop {
        match attempt().await {
            Ok(value) => {
                backoff.reset();
                return Ok(value);
            }
            Err(e) => {
                tries += 1;
                if !e.is_retryable() || tries >= max_attempts {
                    return Err(e);
                }
                tracing::debug!(error = %e, tries, "sync failed; retrying");
                tokio::time::sleep(backoff.next_delay()).await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ceilings_double_up_to_the_cap() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_secs(1));
        let mut ceilings = Vec::new();
        for _ in 0..40 {
            let ceiling = b.ceiling();
            ceilings.push(ceiling.as_millis());
            assert!(b.next_delay() <= ceiling);
        }
        assert_eq!(&ceilings[..6], &[100, 200, 400, 800, 1000, 1000]);
        assert!(ceilings.iter().all(|&c| c <= 1000));
        b.reset();
        assert_eq!(b.ceiling(), Duration::from_millis(100));
    }

    #[tokio::test(start_paused = true)]
    async fn retries_with_backoff_until_success() {
        let mut b = Backoff::new(Duration::from_secs(1), Duration::from_secs(8));
        let start = tokio::time::Instant::now();
        let mut calls = 0;
        let value = retry(&mut b, 10, || {
            calls += 1;
            let n = calls;
            async move {
                if n < 5 {
                    Err(Error::Closed)
                } else {
                    Ok(n)
                }
            }
        })
        .await
        .unwrap();
        assert_eq!(value, 5);
        // Four sleeps, each at most 1, 2, 4 and 8 seconds.
        assert!(start.elapsed() <= Duration::from_secs(15), "{:?}", start.elapsed());
        assert_eq!(b.ceiling(), Duration::from_secs(1), "a success resets the backoff");
    }

    #[tokio::test(start_paused = true)]
    async fn gives_up_at_once_on_a_refusal_and_after_max_attempts() {
        let mut b = Backoff::default();
        let mut calls = 0;
        let refused: Result<()> = retry(&mut b, 10, || {
            calls += 1;
            async {
                Err(Error::Server {
                    code: driftsync_protocol::ErrorCode::Unauthorized,
                    doc: None,
                    batch: None,
                })
            }
        })
        .await;
        assert!(refused.is_err());
        assert_eq!(calls, 1);
        let mut calls = 0;
        let failed: Result<()> = retry(&mut b, 3, || {
            calls += 1;
            async { Err(Error::Closed) }
        })
        .await;
        assert!(matches!(failed, Err(Error::Closed)));
        assert_eq!(calls, 3);
    }
}
