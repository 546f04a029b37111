//! The inbound connection cap (`network.max_connections`) with eviction.
//!
//! Refusing every newcomer at the cap would let a few hundred silent
//! connections lock out every peer until they close (issue #15: 1,024 idle
//! sockets held the agent indefinitely). So, as the metrics endpoint does, a
//! newcomer at the cap is still admitted when some open connection has never
//! completed a request: the oldest such one gives way. When every open
//! connection has been served, the peer listener refuses the newcomer
//! ([`WhenAllServed::Refuse`]); the metrics endpoint, whose connections are
//! short-lived scrapes, closes the oldest instead
//! ([`WhenAllServed::EvictOldest`]), so a scraper always gets in. Idle
//! connections are also closed by each server's own timeout.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use tokio_util::sync::CancellationToken;

/// What happens to a newcomer at the cap when every open connection has
/// completed a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WhenAllServed {
    /// It is refused (the peer listener: served peers keep their place).
    Refuse,
    /// The oldest connection gives way (the metrics endpoint).
    EvictOldest,
}

/// The open inbound connections, oldest first.
pub struct Admission {
    /// The cap (`network.max_connections`, `metrics.max_connections`).
    max: usize,
    /// The policy when no open connection is evictable.
    when_all_served: WhenAllServed,
    open: Mutex<Open>,
}

struct Open {
    /// Id of the next admitted connection; ids only grow, so `slots` stays
    /// sorted by id.
    next_id: u64,
    slots: VecDeque<Arc<Slot>>,
}

/// One admitted connection, as the cap sees it.
struct Slot {
    id: u64,
    /// Set once the connection completed a request; from then on it is
    /// never evicted.
    served: AtomicBool,
    /// Cancelled when the connection must give way to a newcomer.
    evict: CancellationToken,
}

/// What [`Admission::admit`] decided.
pub enum Admitted {
    /// Room was free.
    Yes(Ticket),
    /// At the cap: the oldest never-served connection was told to close.
    Evicting(Ticket),
    /// At the cap, and every open connection has been served.
    Refused,
}

#[cfg(test)]
impl Admitted {
    /// The ticket of an admitted connection; panics when it was refused.
    pub(crate) fn ticket(self) -> Ticket {
        match self {
            Admitted::Yes(t) | Admitted::Evicting(t) => t,
            Admitted::Refused => panic!("refused"),
        }
    }
}

/// Holds a place under the cap for one connection; gives it back on drop.
pub struct Ticket {
    admission: Arc<Admission>,
    slot: Arc<Slot>,
}

impl Admission {
    /// An empty cap admitting `max` connections at once (`network.max_connections`).
    pub fn new(max: usize) -> Arc<Self> {
        Self::with_policy(max, WhenAllServed::Refuse)
    }

    /// An empty cap with the given policy for a cap full of served connections.
    pub fn with_policy(max: usize, when_all_served: WhenAllServed) -> Arc<Self> {
        Arc::new(Self {
            max,
            when_all_served,
            open: Mutex::new(Open {
                next_id: 0,
                slots: VecDeque::new(),
            }),
        })
    }

    /// Admits a new connection, evicting the oldest never-served one at the
    /// cap, or refuses it when every open connection has been served.
    pub fn admit(self: &Arc<Self>) -> Admitted {
        // A poisoned lock only means another thread panicked mid-update of
        // plain data; the queue is still usable.
        let mut open = self.open.lock().unwrap_or_else(|e| e.into_inner());
        let mut evicted = false;
        if open.slots.len() >= self.max {
            let unserved = open
                .slots
                .iter()
                .position(|s| !s.served.load(Ordering::Relaxed));
            let victim = match (unserved, self.when_all_served) {
                (Some(i), _) => Some(i),
                (None, WhenAllServed::EvictOldest) => Some(0),
                (None, WhenAllServed::Refuse) => None,
            };
            match victim.and_then(|i| open.slots.remove(i)) {
                Some(v) => {
                    v.evict.cancel();
                    evicted = true;
                }
                None => return Admitted::Refused,
            }
        }
        let slot = Arc::new(Slot {
            id: open.next_id,
            served: AtomicBool::new(false),
            evict: CancellationToken::new(),
        });
        open.next_id += 1;
        open.slots.push_back(Arc::clone(&slot));
        let ticket = Ticket {
            admission: Arc::clone(self),
            slot,
        };
        if evicted {
            Admitted::Evicting(ticket)
        } else {
            Admitted::Yes(ticket)
        }
    }

    /// Removes slot `id` from the queue; false if it was already gone
    /// (evicted, or left before).
    fn remove(&self, id: u64) -> bool {
        // Poisoned or not, as in `admit`.
        let mut open = self.open.lock().unwrap_or_else(|e| e.into_inner());
        match open.slots.binary_search_by_key(&id, |s| s.id) {
            Ok(i) => {
                open.slots.remove(i);
                true
            }
            Err(_) => false,
        }
    }
}

/// Marks a connection served from where the [`Ticket`] cannot go (an HTTP
/// service closure that must own what it uses).
#[derive(Clone)]
pub struct ServedMark(Arc<Slot>);

impl ServedMark {
    /// The connection completed a request: it is no longer evictable.
    pub fn served(&self) {
        self.0.served.store(true, Ordering::Relaxed);
    }
}

impl Ticket {
    /// The connection completed a request: it is no longer evictable.
    pub fn served(&self) {
        self.slot.served.store(true, Ordering::Relaxed);
    }

    /// A handle that marks this connection served.
    pub fn served_mark(&self) -> ServedMark {
        ServedMark(Arc::clone(&self.slot))
    }

    /// Resolves when the connection must close to make room.
    pub async fn evicted(&self) {
        self.slot.evict.cancelled().await
    }

    /// Gives the place up now, for a connection that is closing for its own
    /// reason (the idle timeout). Returns false when a newcomer evicted it
    /// first: that close is already counted as an eviction, and counting
    /// it again would make one connection two.
    ///
    /// Without this, a connection still flushing its idle close kept its
    /// unserved place, and a newcomer at the cap could pick it: the
    /// reliability test then counted 2,001 closes for 2,000 connections.
    pub fn leave(&self) -> bool {
        self.admission.remove(self.slot.id)
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        // An evicted or departed slot is already gone from the queue.
        self.admission.remove(self.slot.id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn is_evicted(t: &Ticket) -> bool {
        t.slot.evict.is_cancelled()
    }

    #[test]
    fn evicts_the_oldest_never_served_then_refuses_when_all_are_served() {
        let admission = Admission::new(3);
        let a = admission.admit().ticket();
        let b = admission.admit().ticket();
        let c = admission.admit().ticket();
        a.served();
        // At the cap: b is the oldest that never completed a request.
        let d = match admission.admit() {
            Admitted::Evicting(t) => t,
            _ => panic!("expected an eviction"),
        };
        assert!(is_evicted(&b) && !is_evicted(&a) && !is_evicted(&c));
        drop(b); // its task ends; the slot was already given away
        let e = admission.admit().ticket();
        assert!(is_evicted(&c));
        d.served();
        e.served();
        assert!(matches!(admission.admit(), Admitted::Refused));
        // A served connection that closes frees its place.
        drop(a);
        let f = admission.admit().ticket();
        assert!(matches!(admission.admit(), Admitted::Evicting(_)));
        assert!(is_evicted(&f));
        drop((c, d, e));
        assert!(admission.open.lock().unwrap().slots.is_empty());
        drop(f);
    }

    #[test]
    fn a_connection_leaving_is_told_whether_an_eviction_came_first() {
        let admission = Admission::new(2);
        let a = admission.admit().ticket();
        let b = admission.admit().ticket();
        // a closes for its own reason before any newcomer: its place is
        // free at once, so the next newcomer evicts nobody.
        assert!(a.leave());
        let c = match admission.admit() {
            Admitted::Yes(t) => t,
            _ => panic!("a's place should have been free"),
        };
        // b is evicted first, then its idle close comes: not its to count.
        let d = match admission.admit() {
            Admitted::Evicting(t) => t,
            _ => panic!("expected an eviction"),
        };
        assert!(is_evicted(&b));
        assert!(!b.leave());
        // Leaving twice, or dropping after leaving, frees nothing more.
        assert!(!a.leave());
        drop((a, b));
        assert_eq!(admission.open.lock().unwrap().slots.len(), 2);
        drop((c, d));
    }

    #[test]
    fn evict_oldest_policy_never_refuses() {
        let admission = Admission::with_policy(2, WhenAllServed::EvictOldest);
        let a = admission.admit().ticket();
        let b = admission.admit().ticket();
        a.served_mark().served();
        // b never served: it goes first.
        let c = admission.admit().ticket();
        assert!(is_evicted(&b) && !is_evicted(&a));
        c.served();
        // All served: the oldest, a, gives way instead of a refusal.
        let d = admission.admit().ticket();
        assert!(is_evicted(&a) && !is_evicted(&c));
        drop((a, b, c, d));
    }
}
