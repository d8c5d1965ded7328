//! Exponential backoff with jitter for retried calls, so many workers retrying against a
//! restarted peer do not arrive in lockstep.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Delays that double from `initial` up to `max`, each scaled by a random factor in [0.5, 1].
#[derive(Debug, Clone)]
pub struct Backoff {
    initial: Duration,
    max: Duration,
    next: Duration,
    failures: u32,
}

impl Backoff {
    /// A backoff starting at `initial` and capped at `max`.
    pub fn new(initial: Duration, max: Duration) -> Self {
        let initial = initial.max(Duration::from_millis(1));
        Backoff { initial, max: max.max(initial), next: initial, failures: 0 }
    }

    /// The delay before the next try; each call doubles the one after.
    pub fn next_delay(&mut self) -> Duration {
        let base = self.next;
        self.next = (self.next * 2).min(self.max);
        self.failures = self.failures.saturating_add(1);
        base.mul_f64(0.5 + 0.5 * jitter_unit())
    }

    /// Failures since the last reset.
    pub fn failures(&self) -> u32 {
        self.failures
    }

    /// Back to the initial delay after a success.
    pub fn reset(&mut self) {
        self.next = self.initial;
        self.failures = 0;
    }
}

/// A number in [0, 1) from the clock's nanoseconds: enough to spread retries, no RNG needed.
fn jitter_unit() -> f64 {
    let nanos = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.subsec_nanos()).unwrap_or(0);
    // Multiply by an odd constant to spread consecutive readings over the whole range.
    let mixed = nanos.wrapping_mul(2_654_435_761);
    f64::from(mixed) / (f64::from(u32::MAX) + 1.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_double_up_to_the_cap_and_reset() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_millis(350));
        let d: Vec<Duration> = (0..4).map(|_| b.next_delay()).collect();
        for (got, base) in d.iter().zip([100u64, 200, 350, 350]) {
            assert!(*got >= Duration::from_millis(base / 2) && *got <= Duration::from_millis(base), "{got:?} vs {base}");
        }
        assert_eq!(b.failures(), 4);
        b.reset();
        assert!(b.next_delay() <= Duration::from_millis(100));
    }
}
