//! One budget, shared by every peer connection, for the bytes buffered
//! beyond each connection's fixed buffers (`network.max_buffered_bytes`).
//!
//! A connection reads and writes through fixed 64 KiB buffers. Only a
//! message larger than that needs more: a request line being read, or a
//! reply (a `get` of a large value) waiting for a peer that does not read.
//! Without a global bound, 400 peers each pipelining unread 1 MiB gets cost
//! over a gigabyte (issue #15). So such memory is reserved here first, and a
//! connection that cannot get its reservation waits, without reading from
//! its peer, until others give theirs back: back-pressure instead of growth.
//!
//! A connection holds at most one reservation at a time, and asks for the
//! most it could need in one go, so connections never wait on each other
//! while holding part of what they need: no deadlock, whatever the load.

use std::sync::Arc;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// Reservations are counted in units of this many bytes, so that the
/// semaphore's `u32` requests cover any message size.
const UNIT: usize = 1024;

/// The shared pool of bytes.
#[derive(Debug)]
pub struct Budget {
    /// `network.max_buffered_bytes`, in whole units.
    units: usize,
    permits: Arc<Semaphore>,
}

/// Bytes taken from the [`Budget`]; given back on drop.
#[derive(Debug)]
pub struct Reservation {
    permit: OwnedSemaphorePermit,
}

fn units_for(bytes: usize) -> usize {
    bytes.div_ceil(UNIT)
}

impl Budget {
    /// A budget of `bytes` (`network.max_buffered_bytes`), rounded up to whole units.
    pub fn new(bytes: usize) -> Arc<Self> {
        let units = units_for(bytes).clamp(1, Semaphore::MAX_PERMITS);
        Arc::new(Self {
            units,
            permits: Arc::new(Semaphore::new(units)),
        })
    }

    /// The most one request may ask for: never more than the whole budget,
    /// so every request can eventually be granted.
    fn units_to_ask(&self, bytes: usize) -> u32 {
        let units = units_for(bytes).clamp(1, self.units);
        u32::try_from(units).unwrap_or(u32::MAX)
    }

    /// Takes `bytes` (at most the whole budget) if they are free right now.
    pub fn try_reserve(&self, bytes: usize) -> Option<Reservation> {
        Arc::clone(&self.permits)
            .try_acquire_many_owned(self.units_to_ask(bytes))
            .ok()
            .map(|permit| Reservation { permit })
    }

    /// Takes `bytes` (at most the whole budget), waiting until they are free.
    /// Waiters are served in order: what is given back goes to the first
    /// one until it has all it asked for, so a large request is not starved
    /// by small ones.
    pub async fn reserve(&self, bytes: usize) -> Reservation {
        let permit = Arc::clone(&self.permits)
            .acquire_many_owned(self.units_to_ask(bytes))
            .await
            .unwrap_or_else(|_| unreachable!("the budget's semaphore is never closed"));
        Reservation { permit }
    }

    /// Bytes not reserved right now.
    pub fn available(&self) -> usize {
        self.permits.available_permits() * UNIT
    }
}

impl Reservation {
    /// Bytes held.
    pub fn bytes(&self) -> usize {
        self.permit.num_permits() * UNIT
    }

    /// Gives back everything beyond `bytes` (rounded up to the unit).
    pub fn shrink_to(&mut self, bytes: usize) {
        let keep = units_for(bytes);
        let held = self.permit.num_permits();
        if held > keep {
            drop(self.permit.split(held - keep));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn reservations_are_bounded_shrink_and_wait_in_turn() {
        let budget = Budget::new(8 * UNIT);
        let mut a = budget.try_reserve(5 * UNIT).expect("free");
        assert_eq!((a.bytes(), budget.available()), (5 * UNIT, 3 * UNIT));
        assert!(budget.try_reserve(4 * UNIT).is_none());
        // More than the whole budget is capped at the whole budget.
        let waiter = {
            let budget = Arc::clone(&budget);
            tokio::spawn(async move { budget.reserve(100 * UNIT).await.bytes() })
        };
        tokio::task::yield_now().await;
        assert!(!waiter.is_finished());
        a.shrink_to(UNIT + 1);
        assert_eq!(a.bytes(), 2 * UNIT);
        // What is given back goes to the first waiter, and nobody can
        // overtake it.
        assert_eq!(budget.available(), 0);
        assert!(budget.try_reserve(UNIT).is_none());
        tokio::task::yield_now().await;
        assert!(!waiter.is_finished(), "needs all 8 units");
        drop(a);
        assert_eq!(waiter.await.unwrap(), 8 * UNIT);
        assert_eq!(budget.available(), 8 * UNIT);
    }
}
