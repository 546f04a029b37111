//! The peer listener: admits connections (allow-list, connection limit,
//! TLS handshake), and serves each connection in its own task.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use ipnet::IpNet;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio_rustls::rustls;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::connection::{self, Connection, Frame, PeerStream};
use crate::handler::Handler;
use crate::net::{accept, allowed};
use crate::peers::Peers;
use crate::protocol;
use crate::storage::Storage;
use crate::telemetry::DenyReason;

/// How long a closing connection may take to deliver its last replies.
const FINAL_FLUSH: Duration = Duration::from_secs(5);
/// How long input is drained after a too-large message before closing.
const TOO_LARGE_DRAIN: Duration = Duration::from_secs(1);

pub struct Server<S> {
    pub listener: TcpListener,
    pub handler: Arc<Handler<S>>,
    pub peers: Peers,
    pub max_connections: usize,
    pub max_line: usize,
    /// `network.allowed_networks`; empty admits every address.
    pub allowed_networks: Vec<IpNet>,
    /// Mutual TLS, when `network.tls` is set.
    pub tls: Option<PeerTlsAcceptor>,
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
        let slots = Arc::new(Semaphore::new(self.max_connections));
        loop {
            let Some((stream, remote)) = accept(&self.listener, &cancel, "peer listener").await
            else {
                return;
            };
            // Before a slot and before any byte is read: an address outside
            // the allow-list costs the agent nothing but the accept.
            if !allowed(&self.allowed_networks, remote.ip()) {
                self.peers.denied(DenyReason::NotAllowed);
                tracing::debug!(%remote, "not in network.allowed_networks; closing connection");
                continue;
            }
            let Ok(slot) = Arc::clone(&slots).try_acquire_owned() else {
                self.peers.rejected();
                tracing::debug!(%remote, "network.max_connections reached; closing connection");
                continue;
            };
            let handler = Arc::clone(&self.handler);
            let peers = self.peers.clone();
            let cancel = cancel.clone();
            let max_line = self.max_line;
            let tls = self.tls.clone();
            tracker.spawn(async move {
                connection::prepare(&stream);
                match tls {
                    None => {
                        let _guard = peers.connected();
                        serve(stream, &handler, max_line, &cancel).await;
                    }
                    Some(tls) => {
                        if let Some(stream) = handshake(stream, remote, &tls, &peers, &cancel).await
                        {
                            let _guard = peers.connected();
                            serve(stream, &handler, max_line, &cancel).await;
                        }
                    }
                }
                drop(slot);
            });
        }
    }
}

/// Runs the server side of the TLS handshake, bounded by the handshake
/// timeout (a client that stalls mid-handshake would otherwise hold its
/// connection slot) and by shutdown. A failure is counted by reason.
async fn handshake(
    stream: TcpStream,
    remote: SocketAddr,
    tls: &PeerTlsAcceptor,
    peers: &Peers,
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
    peers.denied(reason);
    // Debug, not warn: anyone who can reach the port can trigger this, and
    // the counter is what to alert on. The dialing side logs the cause.
    tracing::debug!(%remote, reason = reason.as_str(), %error, "peer TLS handshake failed");
    None
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

/// Serves one connection: one reply per request line, in order.
async fn serve<S: Storage, IO: PeerStream>(
    stream: IO,
    handler: &Handler<S>,
    max_line: usize,
    cancel: &CancellationToken,
) {
    let mut conn = Connection::new(stream, max_line);
    let mut out = Vec::with_capacity(256);
    loop {
        // At shutdown, requests already received are answered; nothing more is read.
        if cancel.is_cancelled() && !conn.has_buffered_line() {
            break;
        }
        let frame = tokio::select! {
            biased;
            frame = conn.read_line() => frame,
            _ = cancel.cancelled() => break,
        };
        out.clear();
        match frame {
            Ok(Frame::Line) => {
                if protocol::is_blank(conn.line()) {
                    continue;
                }
                handler.handle(conn.line(), &mut out).await;
            }
            Ok(Frame::Closed) | Err(_) => return,
            Ok(Frame::TooLarge) => {
                handler.too_large(max_line, &mut out);
                let _ = conn.write(&out).await;
                let _ = tokio::time::timeout(FINAL_FLUSH, conn.shutdown()).await;
                conn.discard_input(TOO_LARGE_DRAIN).await;
                return;
            }
        }
        if conn.write(&out).await.is_err() {
            return;
        }
    }
    let deadline = tokio::time::Instant::now() + FINAL_FLUSH;
    let _ = tokio::time::timeout_at(deadline, conn.shutdown()).await;
    // The peer may still be sending; closing now would reset the connection
    // and drop replies it has not received yet.
    conn.wait_delivered(deadline).await;
}
