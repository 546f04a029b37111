//! A warning that could repeat without end (a misbehaving peer, a storage
//! outage at 100,000 errors a second) goes through a [`Throttle`]: at most
//! one line per period, and the next line says how many were held back.

use std::time::{Duration, Instant};

/// Lets a warning through at most once per period; the next one that gets
/// through says how many were held back (those go to debug level).
#[derive(Debug)]
pub(crate) struct Throttle {
    /// Shortest time between two warnings.
    period: Duration,
    /// When the last warning got through.
    last: Option<Instant>,
    /// Warnings held back since then.
    held_back: u64,
}

impl Throttle {
    /// Lets the first warning through, then at most one per `period`.
    pub(crate) fn new(period: Duration) -> Self {
        Self {
            period,
            last: None,
            held_back: 0,
        }
    }

    /// Whether a warning may be logged now: `Some(held back since the last
    /// one)`, or None when it must be held back.
    pub(crate) fn allow(&mut self) -> Option<u64> {
        self.allow_at(Instant::now())
    }

    pub(crate) fn allow_at(&mut self, now: Instant) -> Option<u64> {
        match self.last {
            Some(last) if now.saturating_duration_since(last) < self.period => {
                self.held_back += 1;
                None
            }
            _ => {
                self.last = Some(now);
                Some(std::mem::take(&mut self.held_back))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn throttle_lets_one_through_per_period_and_counts_the_rest() {
        let period = Duration::from_secs(60);
        let mut t = Throttle::new(period);
        let t0 = Instant::now();
        assert_eq!(t.allow_at(t0), Some(0));
        assert_eq!(t.allow_at(t0 + Duration::from_secs(1)), None);
        assert_eq!(t.allow_at(t0 + Duration::from_secs(59)), None);
        assert_eq!(t.allow_at(t0 + period), Some(2));
        assert_eq!(t.allow_at(t0 + period), None);
        assert_eq!(t.allow_at(t0 + 3 * period), Some(1));
    }
}
