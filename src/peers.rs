//! Peer accounting and outbound peers.
//!
//! A peer is any open connection, inbound or outbound. Each holds a
//! [`PeerGuard`] for exactly as long as it is open, so
//! `agent_peers_connected` returns to its previous value however the
//! connection ends: close, reset, error, or shutdown.

use std::time::Duration;

use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

use crate::connection::{Connection, Frame};
use crate::telemetry::PeerMetrics;

/// Hands out guards that keep `agent_peers_connected` exact.
#[derive(Clone)]
pub struct Peers {
    metrics: PeerMetrics,
}

impl Peers {
    pub fn new() -> Self {
        Self {
            metrics: PeerMetrics::new(),
        }
    }

    pub fn connected(&self) -> PeerGuard {
        self.metrics.connected.increment(1.0);
        PeerGuard {
            metrics: self.metrics.clone(),
        }
    }

    pub fn rejected(&self) {
        self.metrics.rejected.increment(1);
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

/// How outbound peers are kept alive.
#[derive(Debug, Clone)]
pub struct DialPolicy {
    pub ping_interval: Duration,
    pub max_backoff: Duration,
    pub max_line: usize,
}

const MIN_BACKOFF: Duration = Duration::from_millis(100);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Keeps one configured peer connected until cancelled: dial, ping every
/// `ping_interval`, and redial with capped exponential backoff when lost.
pub async fn maintain(addr: String, policy: DialPolicy, peers: Peers, cancel: CancellationToken) {
    let mut backoff = MIN_BACKOFF;
    let mut failures = 0u32;
    loop {
        let dialed = tokio::select! {
            _ = cancel.cancelled() => return,
            r = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(&addr)) => r,
        };
        match dialed {
            Ok(Ok(stream)) => {
                tracing::info!(peer = %addr, "connected to peer");
                failures = 0;
                backoff = MIN_BACKOFF;
                let reason = keepalive(stream, &policy, &peers, &cancel).await;
                if cancel.is_cancelled() {
                    return;
                }
                tracing::warn!(peer = %addr, reason = %reason, "lost peer; redialing");
            }
            Ok(Err(e)) => log_dial_failure(&addr, &e.to_string(), &mut failures, backoff),
            Err(_) => log_dial_failure(&addr, "connect timed out", &mut failures, backoff),
        }
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep(backoff) => {}
        }
        backoff = (backoff * 2).min(policy.max_backoff);
    }
}

fn log_dial_failure(addr: &str, error: &str, failures: &mut u32, backoff: Duration) {
    *failures += 1;
    // Warn once per outage, not on every retry.
    if *failures == 1 {
        tracing::warn!(peer = %addr, error, "cannot reach peer; retrying with backoff");
    } else {
        tracing::debug!(peer = %addr, error, attempt = *failures, ?backoff, "cannot reach peer");
    }
}

/// Pings until the connection fails; returns why.
async fn keepalive(
    stream: TcpStream,
    policy: &DialPolicy,
    peers: &Peers,
    cancel: &CancellationToken,
) -> String {
    let _guard = peers.connected();
    let mut conn = Connection::new(stream, policy.max_line);
    let mut seq: u64 = 0;
    loop {
        seq += 1;
        let ping = format!("{{\"id\":{seq},\"op\":\"ping\"}}\n");
        if let Err(e) = conn.write(ping.as_bytes()).await {
            return e.to_string();
        }
        let reply = tokio::select! {
            _ = cancel.cancelled() => return "shutdown".into(),
            r = tokio::time::timeout(policy.ping_interval, conn.read_line()) => r,
        };
        match reply {
            Ok(Ok(Frame::Line)) => {
                let line = conn.line();
                let expected = format!("{{\"id\":{seq},\"ok\":true}}");
                if line != expected.as_bytes() {
                    return format!("unexpected ping reply: {}", String::from_utf8_lossy(line));
                }
            }
            Ok(Ok(Frame::Closed)) => return "closed by peer".into(),
            Ok(Ok(Frame::TooLarge)) => return "reply too large".into(),
            Ok(Err(e)) => return e.to_string(),
            Err(_) => return format!("no ping reply within {:?}", policy.ping_interval),
        }
        // Between pings, watch the socket: a peer that closes or resets is
        // noticed (and redialed) now, not at the next ping.
        let idle = tokio::select! {
            _ = cancel.cancelled() => return "shutdown".into(),
            _ = tokio::time::sleep(policy.ping_interval) => None,
            r = conn.read_line() => Some(r),
        };
        match idle {
            None => {}
            Some(Ok(Frame::Closed)) => return "closed by peer".into(),
            Some(Ok(_)) => return "unexpected data from peer between pings".into(),
            Some(Err(e)) => return e.to_string(),
        }
    }
}
