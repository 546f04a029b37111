//! Peer accounting: the connection counters every listener and dialer
//! shares.
//!
//! A peer is any open connection, inbound or outbound. Each holds a
//! [`PeerGuard`] for exactly as long as it is open, so
//! `agent_peers_connected` returns to its previous value however the
//! connection ends: close, reset, error, or shutdown. Outbound peers are
//! dialled and kept alive by [`maintain`](super::maintain).

use crate::telemetry::{DenyReason, PeerMetrics};

/// Hands out guards that keep `agent_peers_connected` exact.
#[derive(Clone)]
pub struct Peers {
    metrics: PeerMetrics,
}

impl Peers {
    /// Binds the peer metrics of the recorder installed now.
    pub fn new() -> Self {
        Self {
            metrics: PeerMetrics::new(),
        }
    }

    /// Counts a newly opened connection in `agent_peers_connected` until the guard drops.
    pub fn connected(&self) -> PeerGuard {
        self.metrics.connected.increment(1.0);
        PeerGuard {
            metrics: self.metrics.clone(),
        }
    }

    /// Counts an inbound connection closed at once at the connection cap.
    pub fn rejected(&self) {
        self.metrics.rejected.increment(1);
    }

    /// An inbound connection that never completed a request gave way to a
    /// newcomer at the connection cap.
    pub fn evicted(&self) {
        self.metrics.evicted.increment(1);
    }

    /// An inbound connection was closed after `network.idle_timeout`.
    pub fn idle_closed(&self) {
        self.metrics.idle_closed.increment(1);
    }

    /// Sets `agent_peers_configured`: how many outbound peers are configured.
    pub fn configured(&self, n: usize) {
        self.metrics.configured.set(n as f64);
    }

    /// Counts an inbound connection closed before any request was read.
    pub fn denied(&self, reason: DenyReason) {
        self.metrics.denied(reason).increment(1);
    }
}

impl Default for Peers {
    fn default() -> Self {
        Self::new()
    }
}

/// One open peer connection, for as long as it lives.
pub struct PeerGuard {
    metrics: PeerMetrics,
}

impl Drop for PeerGuard {
    fn drop(&mut self) {
        self.metrics.connected.decrement(1.0);
    }
}
