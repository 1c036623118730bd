//! Exponential backoff with jitter, for every retry of the subnet manager
//! (etcd or the API server).
//!
//! The jitter matters when the store comes back: every agent of the cluster lost
//! it at the same moment, and without jitter they would all come back in
//! the same instant, every time.

use std::time::Duration;

use rand::Rng;

/// Delays that double from `min` up to `max`, each drawn at random from the
/// upper half of the current step (so never below half of it).
#[derive(Clone, Debug)]
pub struct Backoff {
    min: Duration,
    max: Duration,
    cur: Duration,
}

impl Backoff {
    pub fn new(min: Duration, max: Duration) -> Backoff {
        let max = max.max(min);
        Backoff { min, max, cur: min }
    }

    /// The delay to wait now; the step doubles, up to `max`.
    pub fn next_delay(&mut self) -> Duration {
        let step = self.cur;
        self.cur = (self.cur * 2).min(self.max);
        let half = step / 2;
        half + half.mul_f64(rand::rng().random::<f64>())
    }

    /// Back to `min`, after a success.
    pub fn reset(&mut self) {
        self.cur = self.min;
    }
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff::new(Duration::from_millis(100), Duration::from_secs(5))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn doubles_up_to_the_cap_with_jitter_and_resets() {
        let ms = Duration::from_millis;
        let mut b = Backoff::new(ms(100), ms(700));
        for step in [100, 200, 400, 700, 700, 700] {
            let d = b.next_delay();
            assert!(d >= ms(step / 2) && d <= ms(step), "{d:?} for step {step}");
        }
        b.reset();
        assert!(b.next_delay() <= ms(100));
    }

    #[test]
    fn delays_differ() {
        let mut seen: Vec<Duration> = (0..8)
            .map(|_| Backoff::new(Duration::from_secs(1), Duration::from_secs(1)).next_delay())
            .collect();
        seen.dedup();
        assert!(seen.len() > 1, "no jitter: {seen:?}");
    }
}
