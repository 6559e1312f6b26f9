//! Jittered exponential backoff for reconnects.

use std::time::Duration;

use rand::Rng;

/// Delays between reconnect attempts: doubling from `base` up to `max`, each
/// drawn at random from the upper half of its step so that many peers that
/// lost the same relay do not all come back in the same instant.
#[derive(Debug, Clone)]
pub struct Backoff {
    base: Duration,
    max: Duration,
    attempt: u32,
}

impl Backoff {
    /// A backoff starting at `base` and never waiting longer than `max`.
    pub fn new(base: Duration, max: Duration) -> Self {
        Backoff {
            base,
            max,
            attempt: 0,
        }
    }

    /// The delay before the next attempt.
    pub fn next_delay(&mut self) -> Duration {
        let step = self
            .base
            .saturating_mul(1u32 << self.attempt.min(16))
            .min(self.max);
        self.attempt = self.attempt.saturating_add(1);
        let half = step / 2;
        let jitter_ms = rand::rng().random_range(0..=half.as_millis().max(1) as u64);
        half + Duration::from_millis(jitter_ms)
    }

    /// Call after a connection has been healthy for a while.
    pub fn reset(&mut self) {
        self.attempt = 0;
    }
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff::new(Duration::from_millis(200), Duration::from_secs(10))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_grow_stay_bounded_and_vary() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_secs(2));
        let first = b.next_delay();
        assert!(first >= Duration::from_millis(50) && first <= Duration::from_millis(101));
        // Steps 200, 400, 800, 1600 ms, then capped at 2 s.
        let growing: Vec<_> = (0..4).map(|_| b.next_delay()).collect();
        for (d, step) in growing.iter().zip([200u64, 400, 800, 1600]) {
            assert!(*d >= Duration::from_millis(step / 2) && *d <= Duration::from_millis(step + 1));
        }
        let later: Vec<_> = (0..20).map(|_| b.next_delay()).collect();
        assert!(later.iter().all(|d| *d <= Duration::from_millis(2001)));
        assert!(later.iter().all(|d| *d >= Duration::from_millis(1000)));
        assert!(later.windows(2).any(|w| w[0] != w[1]), "no jitter");
        b.reset();
        assert!(b.next_delay() <= Duration::from_millis(101));
    }
}
