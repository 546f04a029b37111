//! The peer listener: admits connections (the allow-list, then the
//! connection limit, evicting never-served connections first, see
//! [`crate::net`], then the TLS handshake), and hands each admitted
//! connection to its own task, where a [`Conversation`] serves it. As mini-redis's
//! `Listener`, it owns nothing of a connection once it is handed over.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use ipnet::IpNet;
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::rustls;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::budget::Budget;
use super::connection::{self, Connection};
use super::conversation::{Conversation, Shared, LOG_TARGET};
use super::handler::Handler;
use super::peers::Peers;
use crate::net::{accept, allowed, Admission, Admitted, SocketBudget, Ticket};
use crate::storage::Storage;
use crate::telemetry::{sockets_full_alarm, DenyReason, Throttle};

/// At most one warning about refused connections per this period.
const REJECTION_LOG_PERIOD: Duration = Duration::from_secs(60);

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
        let shared = Shared {
            handler: Arc::clone(&self.handler),
            peers: self.peers.clone(),
            budget: Arc::clone(&self.budget),
            max_line: self.max_line,
            idle_timeout: self.idle_timeout,
            cancel: cancel.clone(),
            deadline: self.drain_deadline.clone(),
        };
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
            let shared = shared.clone();
            let Some(tls) = self.tls.clone() else {
                let conn = shared.frame(Connection::tcp(stream, shared.max_line));
                tracker.spawn(async move {
                    Conversation::open(conn, remote, false, ticket, permit, shared)
                        .run()
                        .await;
                });
                continue;
            };
            tracker.spawn(async move {
                connection::prepare(&stream);
                // A connection still in its handshake has completed no
                // request, so it may be evicted at the cap like any other.
                let stream = tokio::select! {
                    s = handshake(stream, remote, &tls, &shared.peers, &ticket, &shared.cancel) => s,
                    _ = ticket.evicted() => None,
                };
                match stream {
                    Some(stream) => {
                        let conn = shared.frame(Connection::new(stream, shared.max_line));
                        Conversation::open(conn, remote, true, ticket, permit, shared)
                            .run()
                            .await;
                    }
                    // Its place first, then its socket's share, as a
                    // conversation gives them back.
                    None => drop((ticket, permit)),
                }
            });
        }
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
