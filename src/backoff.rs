//! How long to wait before trying again: one [`Backoff`] for every retry
//! and poll, the directory's writes, the election's reconnects, the
//! daemon's waits for the tree, the watcher and the directory, and node
//! mode's wait for group membership.
//!
//! A backoff is a ceiling that doubles from `initial` up to `max` with
//! each retry, and a [`Jitter`] that says how the delay is drawn under
//! it: many replicas or containers retrying in step would hit a server
//! together. A fixed wait is a backoff whose ceiling never grows and that
//! draws no jitter ([`Backoff::fixed`]). Delays are plain durations, slept
//! on tokio's clock by the caller, so tests pause time instead of waiting.

use std::time::Duration;

/// Exponential backoff: the ceiling doubles from `initial` to `max`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backoff {
    /// Tries per request, the first included.
    pub attempts: u32,
    /// The ceiling of the first delay.
    pub initial: Duration,
    /// The ceiling of any delay.
    pub max: Duration,
    /// How a delay is drawn under its ceiling.
    pub jitter: Jitter,
}

/// How a delay is drawn under the ceiling of its retry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Jitter {
    /// Uniform between zero and the ceiling ("full jitter").
    Full,
    /// Uniform within this many percent either side of the ceiling.
    Within(u8),
    /// Exactly the ceiling.
    None,
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff {
            attempts: 5,
            initial: Duration::from_millis(200),
            max: Duration::from_secs(10),
            jitter: Jitter::Full,
        }
    }
}

impl Backoff {
    /// The same wait every time, for as long as it takes.
    pub const fn fixed(every: Duration) -> Backoff {
        Backoff {
            attempts: u32::MAX,
            initial: every,
            max: every,
            jitter: Jitter::None,
        }
    }

    /// The ceiling of the delay before retry number `retry` (0-based):
    /// `min(max, initial * 2^retry)`.
    pub fn ceiling(&self, retry: u32) -> Duration {
        self.initial
            .saturating_mul(1u32.checked_shl(retry.min(20)).unwrap_or(u32::MAX))
            .min(self.max)
    }

    /// The delay before retry number `retry` (0-based), drawn under its
    /// ceiling as the jitter says.
    pub fn delay(&self, retry: u32) -> Duration {
        let ceiling = self.ceiling(retry);
        match self.jitter {
            Jitter::Full => ceiling.mul_f64(fastrand::f64()),
            Jitter::Within(percent) => {
                let spread = f64::from(percent.min(100)) / 100.0;
                ceiling.mul_f64(1.0 - spread + 2.0 * spread * fastrand::f64())
            }
            Jitter::None => ceiling,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn full_jitter_stays_within_its_ceiling() {
        let b = Backoff {
            attempts: 10,
            initial: Duration::from_millis(100),
            max: Duration::from_secs(1),
            jitter: Jitter::Full,
        };
        for retry in 0..40 {
            let ceiling = Duration::from_millis(100 * 2u64.pow(retry.min(10))).min(b.max);
            assert_eq!(b.ceiling(retry), ceiling, "retry {retry}");
            assert!(b.delay(retry) <= ceiling, "retry {retry}");
        }
    }

    #[test]
    fn jitter_within_a_percentage_stays_around_the_ceiling() {
        let b = Backoff {
            attempts: u32::MAX,
            initial: Duration::from_secs(1),
            max: Duration::from_secs(30),
            jitter: Jitter::Within(20),
        };
        for retry in 0..12 {
            let ceiling = b.ceiling(retry);
            for _ in 0..50 {
                let delay = b.delay(retry);
                assert!(
                    delay >= ceiling.mul_f64(0.8) && delay <= ceiling.mul_f64(1.2),
                    "retry {retry}: {delay:?} around {ceiling:?}"
                );
            }
        }
        assert_eq!(b.ceiling(11), Duration::from_secs(30), "capped");
    }

    #[test]
    fn a_fixed_wait_is_the_same_every_time() {
        let b = Backoff::fixed(Duration::from_millis(500));
        for retry in [0, 1, 7, u32::MAX] {
            assert_eq!(b.delay(retry), Duration::from_millis(500));
        }
    }
}
