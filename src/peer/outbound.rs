//! Outbound peers: dial each configured peer, ping it every
//! `network.ping_interval`, and redial with capped backoff when it is lost.
//! Each open connection is counted through a
//! [`PeerGuard`](super::PeerGuard).

use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpStream;
use tokio_rustls::rustls::pki_types::ServerName;
use tokio_rustls::rustls::ClientConfig;
use tokio_rustls::TlsConnector;
use tokio_util::sync::CancellationToken;

use super::connection::{self, Connection, Frame, PeerStream};
use super::peers::Peers;
use super::protocol;
use crate::net::preview;
use crate::telemetry::Throttle;

/// How outbound peers are kept alive.
#[derive(Debug, Clone)]
pub struct DialPolicy {
    /// `network.ping_interval`: time between pings, and the deadline for each reply.
    pub ping_interval: Duration,
    /// `network.max_redial_backoff`: cap on the doubling wait between redials.
    pub max_backoff: Duration,
    /// Mutual TLS (`network.tls`): present our certificate, verify the
    /// peer's against the CA and the host name we dialed.
    pub tls: Option<Arc<ClientConfig>>,
}

/// The log target these lines had before dialling moved out of
/// `peers.rs`: operators filter on it (`log.level: info,agent::peers=debug`,
/// docs/reliability.md).
const LOG_TARGET: &str = "agent::peers";

const MIN_BACKOFF: Duration = Duration::from_millis(100);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Longest reply to our ping we read. A correct one is about 30 bytes; a
/// peer answering with a huge line is cut off here instead of buffered.
const MAX_PING_REPLY: usize = 1024;
/// At most one warning per peer per this period; the rest go to debug.
const WARN_PERIOD: Duration = Duration::from_secs(60);

/// Keeps one configured peer connected until cancelled: dial, ping every
/// `ping_interval`, and redial with capped exponential backoff when lost.
///
/// The backoff starts over only once a connection has proved healthy (a
/// ping was answered): a peer that accepts and closes at once, or answers
/// with junk, is redialled less and less often, not every 100 ms.
pub async fn maintain(addr: String, policy: DialPolicy, peers: Peers, cancel: CancellationToken) {
    let mut backoff = MIN_BACKOFF;
    let mut log = PeerLog::new(&addr);
    loop {
        let dialed = tokio::select! {
            _ = cancel.cancelled() => return,
            r = tokio::time::timeout(CONNECT_TIMEOUT, dial(&addr, policy.tls.as_ref())) => r,
        };
        match dialed {
            Ok(Ok(stream)) => {
                tracing::debug!(target: LOG_TARGET, peer = %addr, tls = policy.tls.is_some(), "connection to peer open; pinging");
                let session = match stream {
                    Dialed::Plain(s) => keepalive(s, &policy, &peers, &mut log, &cancel).await,
                    Dialed::Tls(s) => keepalive(*s, &policy, &peers, &mut log, &cancel).await,
                };
                if cancel.is_cancelled() {
                    return;
                }
                if session.healthy {
                    backoff = MIN_BACKOFF;
                    log.lost(&session.reason.to_string(), backoff);
                } else {
                    log.failed(&session.reason.to_string(), backoff);
                }
            }
            Ok(Err(e)) => log.failed(&e.to_string(), backoff),
            Err(_) => log.failed("connect timed out", backoff),
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
fn server_name(addr: &str) -> Option<ServerName<'static>> {
    let (host, _port) = addr.rsplit_once(':')?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    ServerName::try_from(host.to_string()).ok()
}

/// What an outbound peer's log says, so that a misbehaving peer cannot
/// flood it: one warning per outage or loss (then at most one per
/// [`WARN_PERIOD`], the rest at debug), and one line when it is back.
/// Reasons are logged with `%` (as they are): any peer bytes in them are
/// already an escaped [`preview`].
struct PeerLog<'a> {
    addr: &'a str,
    /// Failed attempts since the last healthy connection.
    failures: u32,
    warnings: Throttle,
    /// A warning was logged and no "connected" line since: the recovery
    /// must be logged too, or the log would say the peer is still down.
    warned_down: bool,
    /// Whether a connection has ever been healthy (the first one is logged).
    ever_up: bool,
}

impl<'a> PeerLog<'a> {
    fn new(addr: &'a str) -> Self {
        Self {
            addr,
            failures: 0,
            warnings: Throttle::new(WARN_PERIOD),
            warned_down: false,
            ever_up: false,
        }
    }

    /// The first ping was answered.
    fn up(&mut self) {
        let addr = self.addr;
        if self.warned_down || !self.ever_up {
            tracing::info!(target: LOG_TARGET, peer = %addr, "connected to peer");
        } else {
            tracing::debug!(target: LOG_TARGET, peer = %addr, "connected to peer");
        }
        self.failures = 0;
        self.warned_down = false;
        self.ever_up = true;
    }

    /// A healthy connection ended.
    fn lost(&mut self, reason: &str, backoff: Duration) {
        let addr = self.addr;
        match self.warnings.allow() {
            Some(held_back) => {
                tracing::warn!(target: LOG_TARGET, peer = %addr, reason = %reason, held_back, "lost peer; redialing");
                self.warned_down = true;
            }
            None => {
                tracing::debug!(target: LOG_TARGET, peer = %addr, reason = %reason, ?backoff, "lost peer; redialing")
            }
        }
    }

    /// An attempt failed: no connection, or one that never answered a ping.
    fn failed(&mut self, error: &str, backoff: Duration) {
        let addr = self.addr;
        self.failures += 1;
        let attempts = self.failures;
        match self.warnings.allow() {
            Some(held_back) => {
                tracing::warn!(
                    target: LOG_TARGET,
                    peer = %addr, error = %error, attempts, held_back, next_attempt_in = ?backoff,
                    "cannot reach peer; retrying with backoff"
                );
                self.warned_down = true;
            }
            None => {
                tracing::debug!(target: LOG_TARGET, peer = %addr, error = %error, attempts, ?backoff, "cannot reach peer")
            }
        }
    }
}

/// How one outbound connection went.
struct Session {
    /// At least one ping was answered correctly.
    healthy: bool,
    /// Why it ended.
    reason: Lost,
}

/// Why an outbound connection ended; its text is what the log says.
#[derive(Debug, thiserror::Error)]
enum Lost {
    /// Writing the ping failed.
    #[error("{0}")]
    Write(#[source] std::io::Error),
    /// Reading failed (a reset, a broken pipe).
    #[error("{0}")]
    Read(#[source] std::io::Error),
    /// The peer closed the connection.
    #[error("closed by peer")]
    Closed,
    /// The reply was not the ping's answer; an escaped preview of it.
    #[error("unexpected ping reply: {0}")]
    UnexpectedReply(String),
    /// The reply line was longer than any ping answer can be.
    #[error("ping reply longer than {MAX_PING_REPLY} bytes")]
    ReplyTooLong,
    /// No reply within `network.ping_interval`.
    #[error("no ping reply within {0:?}")]
    NoReply(Duration),
    /// The peer sent something while no ping was outstanding.
    #[error("unexpected data from peer between pings")]
    UnexpectedData,
    /// The agent is shutting down.
    #[error("shutdown")]
    Shutdown,
}

/// Pings until the connection fails.
async fn keepalive<S: PeerStream>(
    stream: S,
    policy: &DialPolicy,
    peers: &Peers,
    log: &mut PeerLog<'_>,
    cancel: &CancellationToken,
) -> Session {
    let _guard = peers.connected();
    let mut conn = Connection::new(stream, MAX_PING_REPLY);
    let mut healthy = false;
    let end = |healthy: bool, reason: Lost| Session { healthy, reason };
    let mut seq: u64 = 0;
    let mut ping = Vec::with_capacity(32);
    loop {
        seq += 1;
        ping.clear();
        protocol::encode_ping(&mut ping, seq);
        if let Err(e) = conn.write(&ping).await {
            return end(healthy, Lost::Write(e));
        }
        let reply = tokio::select! {
            _ = cancel.cancelled() => return end(healthy, Lost::Shutdown),
            r = tokio::time::timeout(policy.ping_interval, conn.read_line()) => r,
        };
        match reply {
            Ok(Ok(Frame::Line)) => {
                let line = conn.line();
                if !protocol::is_ping_reply(line, seq) {
                    // The peer's bytes: only an escaped preview may be logged.
                    return end(healthy, Lost::UnexpectedReply(preview(line)));
                }
                if !healthy {
                    healthy = true;
                    log.up();
                }
            }
            Ok(Ok(Frame::Closed)) => return end(healthy, Lost::Closed),
            Ok(Ok(Frame::TooLarge)) => return end(healthy, Lost::ReplyTooLong),
            Ok(Err(e)) => return end(healthy, Lost::Read(e)),
            Err(_) => return end(healthy, Lost::NoReply(policy.ping_interval)),
        }
        // Between pings, watch the socket: a peer that closes or resets is
        // noticed (and redialed) now, not at the next ping.
        let idle = tokio::select! {
            _ = cancel.cancelled() => return end(healthy, Lost::Shutdown),
            _ = tokio::time::sleep(policy.ping_interval) => None,
            r = conn.read_line() => Some(r),
        };
        match idle {
            None => {}
            Some(Ok(Frame::Closed)) => return end(healthy, Lost::Closed),
            Some(Ok(_)) => return end(healthy, Lost::UnexpectedData),
            Some(Err(e)) => return end(healthy, Lost::Read(e)),
        }
    }
}
