//! Peer accounting and outbound peers.
//!
//! A peer is any open connection, inbound or outbound. Each holds a
//! [`PeerGuard`] for exactly as long as it is open, so
//! `agent_peers_connected` returns to its previous value however the
//! connection ends: close, reset, error, or shutdown.

use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpStream;
use tokio_rustls::rustls::pki_types::ServerName;
use tokio_rustls::rustls::ClientConfig;
use tokio_rustls::TlsConnector;
use tokio_util::sync::CancellationToken;

use crate::connection::{self, Connection, Frame, PeerStream};
use crate::telemetry::{DenyReason, PeerMetrics};

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

/// How outbound peers are kept alive.
#[derive(Debug, Clone)]
pub struct DialPolicy {
    pub ping_interval: Duration,
    pub max_backoff: Duration,
    pub max_line: usize,
    /// Mutual TLS (`network.tls`): present our certificate, verify the
    /// peer's against the CA and the host name we dialed.
    pub tls: Option<Arc<ClientConfig>>,
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
            r = tokio::time::timeout(CONNECT_TIMEOUT, dial(&addr, policy.tls.as_ref())) => r,
        };
        match dialed {
            Ok(Ok(stream)) => {
                tracing::info!(peer = %addr, tls = policy.tls.is_some(), "connected to peer");
                failures = 0;
                backoff = MIN_BACKOFF;
                let reason = match stream {
                    Dialed::Plain(s) => keepalive(s, &policy, &peers, &cancel).await,
                    Dialed::Tls(s) => keepalive(*s, &policy, &peers, &cancel).await,
                };
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

/// An established outbound connection.
enum Dialed {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::client::TlsStream<TcpStream>>),
}

/// Connects to `addr`, then runs the TLS handshake when `tls` is set. The
/// peer's certificate must chain to the CA and name the host we dialed.
async fn dial(addr: &str, tls: Option<&Arc<ClientConfig>>) -> std::io::Result<Dialed> {
    let stream = TcpStream::connect(addr).await?;
    connection::prepare(&stream);
    let Some(config) = tls else {
        return Ok(Dialed::Plain(stream));
    };
    let name = server_name(addr).ok_or_else(|| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "not a valid TLS server name",
        )
    })?;
    let stream = TlsConnector::from(Arc::clone(config))
        .connect(name, stream)
        .await?;
    Ok(Dialed::Tls(Box::new(stream)))
}

/// The name a peer's certificate must carry: the host part of `host:port`
/// (an IP address or a DNS name; IPv6 without its brackets).
pub fn server_name(addr: &str) -> Option<ServerName<'static>> {
    let (host, _port) = addr.rsplit_once(':')?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    ServerName::try_from(host.to_string()).ok()
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
async fn keepalive<S: PeerStream>(
    stream: S,
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
