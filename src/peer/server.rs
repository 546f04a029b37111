//! The peer listener: admits connections (the allow-list, then the
//! connection limit, evicting never-served connections first, see
//! [`crate::net`], then the TLS handshake), closes idle ones, and
//! serves each connection in its own task.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use ipnet::IpNet;
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::rustls;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::budget::{Budget, Reservation};
use super::connection::{self, Connection, Frame, PeerStream, FIXED_BUFFER};
use super::handler::Handler;
use super::peers::Peers;
use super::protocol;
use crate::net::{accept, allowed, Admission, Admitted, SocketBudget, Ticket};
use crate::storage::Storage;
use crate::telemetry::Throttle;
use crate::telemetry::{sockets_full_alarm, DenyReason};

/// The target of these log lines: the module's path before the move into
/// a folder, kept so that operators' filters still match (`log.level: info,agent::server=debug` shows each connection).
const LOG_TARGET: &str = "agent::server";

/// At most one warning about refused connections per this period.
const REJECTION_LOG_PERIOD: Duration = Duration::from_secs(60);
/// How long a closing connection may take to deliver its last replies.
const FINAL_FLUSH: Duration = Duration::from_secs(5);
/// How long input is drained after a too-large message before closing.
const TOO_LARGE_DRAIN: Duration = Duration::from_secs(1);
/// A reply's bytes besides its value: the id (at most
/// `protocol::MAX_ID_BYTES`) and the reply's own fields, with room to spare.
const REPLY_OVERHEAD: usize = 1024;
/// How long an idle connection may take to deliver what it still holds
/// before it is reset (its peer has not been reading).
const IDLE_CLOSE_FLUSH: Duration = Duration::from_secs(1);

/// The inbound side of the peer protocol: accepts, admits and serves connections.
pub struct Server<S> {
    /// Bound to `network.listen`.
    pub listener: TcpListener,
    /// Answers every request, shared by all connections.
    pub handler: Arc<Handler<S>>,
    /// Keeps the peer connection metrics.
    pub peers: Peers,
    /// `network.max_connections`.
    pub max_connections: usize,
    /// `network.max_message_bytes`: the longest request line.
    pub max_line: usize,
    /// `network.idle_timeout`.
    pub idle_timeout: Duration,
    /// `network.max_buffered_bytes`, shared by every connection.
    pub budget: Arc<Budget>,
    /// `network.allowed_networks`; empty admits every address.
    pub allowed_networks: Vec<IpNet>,
    /// Mutual TLS, when `network.tls` is set.
    pub tls: Option<PeerTlsAcceptor>,
    /// Cancelled when the drain time of a shutdown is up: requests still
    /// waiting on storage are answered `shutting down`, not dropped.
    pub drain_deadline: CancellationToken,
}

/// The inbound half of peer TLS.
#[derive(Clone)]
pub struct PeerTlsAcceptor {
    /// Requires a client certificate from the configured CA.
    pub acceptor: TlsAcceptor,
    /// `network.tls.handshake_timeout`.
    pub handshake_timeout: Duration,
}

impl<S: Storage> Server<S> {
    /// Accepts until `cancel` fires; connection tasks join `tracker`.
    pub async fn run(self, tracker: TaskTracker, cancel: CancellationToken) {
        let admission = Admission::new(self.max_connections);
        let sockets = SocketBudget::for_cap(
            self.max_connections,
            sockets_full_alarm("peer", "network.max_connections", self.max_connections),
        );
        let mut rejections = Throttle::new(REJECTION_LOG_PERIOD);
        loop {
            let Some((stream, remote, permit)) =
                accept(&self.listener, &sockets, &cancel, "peer listener").await
            else {
                return;
            };
            // Before a slot and before any byte is read: an address outside
            // the allow-list costs the agent nothing but the accept.
            if !allowed(&self.allowed_networks, remote.ip()) {
                self.peers.denied(DenyReason::NotAllowed);
                tracing::debug!(target: LOG_TARGET, %remote, "not in network.allowed_networks; closing connection");
                continue;
            }
            let ticket = match admission.admit() {
                Admitted::Yes(ticket) => ticket,
                Admitted::Evicting(ticket) => {
                    self.peers.evicted();
                    tracing::debug!(target: LOG_TARGET, %remote, "network.max_connections reached; a connection that never completed a request makes room");
                    ticket
                }
                Admitted::Refused => {
                    self.peers.rejected();
                    // At the cap every new connection is refused: one line
                    // a minute says so, with how many since the last one.
                    match rejections.allow() {
                        Some(suppressed) => tracing::warn!(target: LOG_TARGET,
                            %remote,
                            max_connections = self.max_connections,
                            suppressed,
                            "network.max_connections reached: closing new peer connections"
                        ),
                        None => {
                            tracing::debug!(target: LOG_TARGET, %remote, "network.max_connections reached; closing connection")
                        }
                    }
                    continue;
                }
            };
            let handler = Arc::clone(&self.handler);
            let peers = self.peers.clone();
            let cancel = cancel.clone();
            let budget = Arc::clone(&self.budget);
            let deadline = self.drain_deadline.clone();
            let (max_line, idle_timeout) = (self.max_line, self.idle_timeout);
            let Some(tls) = self.tls.clone() else {
                let conn = Connection::tcp(stream, max_line)
                    .with_idle_timeout(idle_timeout)
                    .with_budget(Arc::clone(&budget));
                tracker.spawn(async move {
                    let _permit = permit;
                    let _guard = peers.connected();
                    let mut log = ConnLog::open(remote, false);
                    let stop = Stop {
                        cancel: &cancel,
                        deadline: &deadline,
                    };
                    serve(conn, &handler, &peers, &budget, &ticket, stop, &mut log).await;
                    drop(ticket);
                });
                continue;
            };
            tracker.spawn(async move {
                let _permit = permit;
                connection::prepare(&stream);
                // A connection still in its handshake has completed no
                // request, so it may be evicted at the cap like any other.
                let stream = tokio::select! {
                    s = handshake(stream, remote, &tls, &peers, &ticket, &cancel) => s,
                    _ = ticket.evicted() => None,
                };
                if let Some(stream) = stream {
                    let conn = Connection::new(stream, max_line)
                        .with_idle_timeout(idle_timeout)
                        .with_budget(Arc::clone(&budget));
                    let _guard = peers.connected();
                    let mut log = ConnLog::open(remote, true);
                    let stop = Stop {
                        cancel: &cancel,
                        deadline: &deadline,
                    };
                    serve(conn, &handler, &peers, &budget, &ticket, stop, &mut log).await;
                }
                drop(ticket);
            });
        }
    }
}

/// An inbound connection's life in the debug log: one line when it opens,
/// one when it closes (however it ends), with its duration and messages.
struct ConnLog {
    remote: SocketAddr,
    opened: std::time::Instant,
    /// Complete requests read, including one too large.
    messages: u64,
}

impl ConnLog {
    fn open(remote: SocketAddr, tls: bool) -> Self {
        tracing::debug!(target: LOG_TARGET, %remote, tls, "peer connection open");
        Self {
            remote,
            opened: std::time::Instant::now(),
            messages: 0,
        }
    }
}

impl Drop for ConnLog {
    fn drop(&mut self) {
        tracing::debug!(target: LOG_TARGET,
            remote = %self.remote,
            duration = ?self.opened.elapsed(),
            messages = self.messages,
            "peer connection closed"
        );
    }
}

/// Runs the server side of the TLS handshake, bounded by the handshake
/// timeout (a client that stalls mid-handshake would otherwise hold its
/// connection slot) and by shutdown. A failure is counted by reason
/// ([`deny_after_handshake`]).
async fn handshake(
    stream: TcpStream,
    remote: SocketAddr,
    tls: &PeerTlsAcceptor,
    peers: &Peers,
    ticket: &Ticket,
    cancel: &CancellationToken,
) -> Option<tokio_rustls::server::TlsStream<TcpStream>> {
    let accepted = tokio::select! {
        _ = cancel.cancelled() => return None,
        r = tokio::time::timeout(tls.handshake_timeout, tls.acceptor.accept(stream)) => r,
    };
    let (reason, error) = match accepted {
        Ok(Ok(stream)) => return Some(stream),
        Ok(Err(e)) => (classify(&e), e.to_string()),
        Err(_) => (DenyReason::TlsTimeout, "handshake timed out".to_string()),
    };
    deny_after_handshake(peers, ticket, reason);
    // Debug, not warn: anyone who can reach the port can trigger this, and
    // the counter is what to alert on. The dialing side logs the cause.
    tracing::debug!(target: LOG_TARGET, %remote, reason = reason.as_str(), %error, "peer TLS handshake failed");
    None
}

/// Gives a connection's place up as its handshake fails, and counts the
/// denial unless a newcomer evicted it first: that close is already
/// counted as an eviction, and one connection must not be two. Without
/// this, the place stayed taken until the task dropped its ticket, and a
/// newcomer at the cap could evict a connection already counted as denied.
fn deny_after_handshake(peers: &Peers, ticket: &Ticket, reason: DenyReason) {
    if ticket.leave() {
        peers.denied(reason);
    }
}

/// Maps a handshake error to its deny reason.
fn classify(e: &std::io::Error) -> DenyReason {
    match e
        .get_ref()
        .and_then(|inner| inner.downcast_ref::<rustls::Error>())
    {
        Some(rustls::Error::NoCertificatesPresented) => DenyReason::TlsNoCertificate,
        Some(rustls::Error::InvalidCertificate(_)) => DenyReason::TlsBadCertificate,
        _ => DenyReason::TlsError,
    }
}

/// The two moments of a shutdown a connection acts on.
#[derive(Clone, Copy)]
struct Stop<'a> {
    /// Stop reading; answer what was read.
    cancel: &'a CancellationToken,
    /// The drain time is up: what still waits on storage is answered
    /// `shutting down`.
    deadline: &'a CancellationToken,
}

/// Serves one connection: one reply per request line, in order.
///
/// Replies are batched into one write while storage answers, and sent at
/// once after a request that storage failed, so a stalled backend never
/// holds back an error reply behind the next request's wait.
///
/// Memory beyond the connection's fixed buffers comes from `budget`: for a
/// long line (reserved by the connection as it reads, and kept while what
/// was decoded from the line is in use), and for a reply that may be long
/// (a get: reserved for the longest possible reply before it runs, then cut
/// to the actual size until the peer has taken it). Both buffers shrink
/// back afterwards.
async fn serve<S: Storage, T: PeerStream>(
    mut conn: Connection<T>,
    handler: &Handler<S>,
    peers: &Peers,
    budget: &Budget,
    ticket: &Ticket,
    stop: Stop<'_>,
    log: &mut ConnLog,
) {
    let cancel = stop.cancel;
    // The longest reply beyond the fixed write buffer: a value as long as
    // the longest request, plus the id and the reply's own fields.
    let longest_reply = (conn.max_line() + REPLY_OVERHEAD).saturating_sub(FIXED_BUFFER);
    let mut out = Vec::with_capacity(256);
    loop {
        // At shutdown, requests already received are answered; nothing more is read.
        let stopping = cancel.is_cancelled();
        if stopping && !conn.has_buffered_line() {
            break;
        }
        let frame = tokio::select! {
            biased;
            frame = conn.read_line() => frame,
            _ = cancel.cancelled() => break,
            // Counted at admission; it never completed a request, so no
            // reply is owed.
            _ = ticket.evicted() => return,
        };
        out.clear();
        match frame {
            Ok(Frame::Line) => {}
            Ok(Frame::Closed) => return,
            Err(e) if connection::is_idle_timeout(&e) => {
                return close_idle(conn, peers, ticket).await
            }
            Err(_) => return,
            Ok(Frame::TooLarge) => {
                log.messages += 1;
                handler.too_large(conn.max_line(), &mut out);
                let _ = conn.write(&out).await;
                let _ = tokio::time::timeout(FINAL_FLUSH, conn.shutdown()).await;
                conn.discard_input(TOO_LARGE_DRAIN).await;
                return;
            }
        }
        if protocol::is_blank(conn.line()) {
            // Not a request; a long one gives its memory back all the same.
            drop(conn.release_line());
            continue;
        }
        ticket.served();
        log.messages += 1;
        conn.restart_idle_timer();
        let request = handler.decode(conn.line());
        let mut hold = conn.release_line();
        if request.reply_may_be_large() && longest_reply > 0 {
            // One reservation at a time: the line's goes back first.
            drop(hold);
            hold = match reserve_reply(&mut conn, budget, longest_reply).await {
                Ok(reply_hold) => Some(reply_hold),
                Err(e) if connection::is_idle_timeout(&e) => {
                    return close_idle(conn, peers, ticket).await
                }
                Err(_) => return,
            };
        }
        // During a shutdown, a request that may wait on storage is cut
        // short by the drain deadline. Before it, every request is bounded
        // by its backend (storage.redis.timeout); racing each one against
        // the deadline cost 4.7% more instructions per Redis message
        // (docs/performance.md).
        let storage_failed = if stopping && handler.may_wait(&request) {
            handler
                .execute_until(request, &mut out, stop.deadline)
                .await
        } else {
            handler.execute(request, &mut out).await
        };
        if let Some(hold) = &mut hold {
            hold.shrink_to(out.capacity().saturating_sub(FIXED_BUFFER));
        }
        let mut written = conn.write(&out).await;
        if storage_failed && written.is_ok() {
            // Storage failed this request (timed out, unreachable, refused):
            // the next one may wait as long again, so the replies made so
            // far go out now rather than behind it. While storage answers,
            // replies share writes: sending them before every request that
            // waits on storage cost 13% of the throughput of pipelined local
            // puts (docs/performance.md).
            written = conn.flush().await;
        }
        match written {
            Ok(()) => {}
            Err(e) if connection::is_idle_timeout(&e) => {
                return close_idle(conn, peers, ticket).await
            }
            Err(_) => return,
        }
        // The reply is with the kernel, or in the fixed write buffer: its
        // memory goes back, and the budget with it.
        if out.capacity() > FIXED_BUFFER {
            out = Vec::with_capacity(256);
        }
        drop(hold);
    }
    let deadline = tokio::time::Instant::now() + FINAL_FLUSH;
    let _ = tokio::time::timeout_at(deadline, conn.shutdown()).await;
    // The peer may still be sending; closing now would reset the connection
    // and drop replies it has not received yet.
    conn.wait_delivered(deadline).await;
}

/// Reserves `bytes` for a reply. If they are not free now, the replies
/// already due are sent first, then it waits; the peer's idle time starts
/// over afterwards, as the wait was the agent's.
async fn reserve_reply<T: PeerStream>(
    conn: &mut Connection<T>,
    budget: &Budget,
    bytes: usize,
) -> std::io::Result<Reservation> {
    if let Some(hold) = budget.try_reserve(bytes) {
        return Ok(hold);
    }
    conn.flush().await?;
    let hold = conn.reserve_unless_failed(budget, bytes).await?;
    conn.restart_idle_timer();
    Ok(hold)
}

/// Closes a connection whose peer completed no request within
/// `network.idle_timeout`, and counts it unless a newcomer evicted it first.
async fn close_idle<T: PeerStream>(mut conn: Connection<T>, peers: &Peers, ticket: &Ticket) {
    // Give the place up before the flush below, so that no newcomer
    // evicts a connection already on its way out.
    if ticket.leave() {
        peers.idle_closed();
    }
    tracing::debug!(target: LOG_TARGET, "closing a peer connection idle for network.idle_timeout");
    let deadline = tokio::time::Instant::now() + IDLE_CLOSE_FLUSH;
    let flushed = tokio::time::timeout_at(deadline, conn.shutdown()).await;
    conn.wait_delivered(deadline).await;
    if !matches!(flushed, Ok(Ok(()))) || !conn.delivered() {
        // The peer is not taking its replies. A plain close would leave
        // the kernel holding them (megabytes, for minutes) and the peer
        // reading EOF only once it had read them all; a reset frees them
        // now, and the peer's next read fails.
        conn.reset_on_close();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::telemetry::defs::AGENT_PEER_CONNECTIONS_DENIED_TOTAL;
    use crate::test_support::counter;
    use metrics_util::debugging::DebuggingRecorder;

    #[test]
    fn a_failed_handshake_frees_its_place_and_is_counted_unless_evicted_first() {
        let recorder = DebuggingRecorder::new();
        let snapshotter = recorder.snapshotter();
        let peers = metrics::with_local_recorder(&recorder, Peers::new);
        let admission = Admission::new(1);

        // Its place is free once the failure is counted: the next newcomer
        // evicts nobody.
        let failed = admission.admit().ticket();
        deny_after_handshake(&peers, &failed, DenyReason::TlsBadCertificate);
        let newcomer = match admission.admit() {
            Admitted::Yes(t) => t,
            _ => panic!("the failed connection still held its place"),
        };

        // Evicted by a newcomer before its handshake failed: that close is
        // the eviction's, not a denial.
        let _next = match admission.admit() {
            Admitted::Evicting(t) => t,
            _ => panic!("expected an eviction"),
        };
        deny_after_handshake(&peers, &newcomer, DenyReason::TlsBadCertificate);

        let snap = snapshotter.snapshot().into_vec();
        let denied = |reason| {
            counter(
                &snap,
                AGENT_PEER_CONNECTIONS_DENIED_TOTAL,
                &[("reason", reason)],
            )
        };
        assert_eq!(denied("tls_bad_certificate"), 1);
        drop(failed);
    }
}
