//! The peer listener: accepts connections, enforces the connection limit
//! (evicting never-served connections first, see [`crate::admission`]),
//! closes idle ones, and serves each connection in its own task.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::admission::{Admission, Admitted, Ticket};
use crate::connection::{self, Connection, Frame, PeerStream};
use crate::handler::Handler;
use crate::peers::Peers;
use crate::protocol;
use crate::storage::Storage;

/// How long a closing connection may take to deliver its last replies.
const FINAL_FLUSH: Duration = Duration::from_secs(5);
/// How long input is drained after a too-large message before closing.
const TOO_LARGE_DRAIN: Duration = Duration::from_secs(1);
/// How long an idle connection may take to flush what it still holds
/// before it is closed anyway (its peer has not been reading).
const IDLE_CLOSE_FLUSH: Duration = Duration::from_secs(1);

pub struct Server<S> {
    pub listener: TcpListener,
    pub handler: Arc<Handler<S>>,
    pub peers: Peers,
    pub max_connections: usize,
    pub max_line: usize,
    /// `network.idle_timeout`.
    pub idle_timeout: Duration,
}

impl<S: Storage> Server<S> {
    /// Accepts until `cancel` fires; connection tasks join `tracker`.
    pub async fn run(self, tracker: TaskTracker, cancel: CancellationToken) {
        let admission = Admission::new(self.max_connections);
        loop {
            let Some((stream, remote)) = accept(&self.listener, &cancel, "peer listener").await
            else {
                return;
            };
            let ticket = match admission.admit() {
                Admitted::Yes(ticket) => ticket,
                Admitted::Evicting(ticket) => {
                    self.peers.evicted();
                    tracing::debug!(%remote, "network.max_connections reached; a connection that never completed a request makes room");
                    ticket
                }
                Admitted::Refused => {
                    self.peers.rejected();
                    tracing::debug!(%remote, "network.max_connections reached; closing connection");
                    continue;
                }
            };
            let handler = Arc::clone(&self.handler);
            let peers = self.peers.clone();
            let cancel = cancel.clone();
            let max_line = self.max_line;
            let conn = Connection::tcp(stream, max_line).with_idle_timeout(self.idle_timeout);
            tracker.spawn(async move {
                let _guard = peers.connected();
                serve(conn, &handler, &peers, &ticket, &cancel).await;
                drop(ticket);
            });
        }
    }
}

/// Accepts the next connection, or None once `cancel` fires. A failed
/// accept (usually EMFILE) is logged and retried after a pause instead of
/// spinning. `what` names the listener in the log.
pub async fn accept(
    listener: &TcpListener,
    cancel: &CancellationToken,
    what: &str,
) -> Option<(TcpStream, SocketAddr)> {
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return None,
            accepted = listener.accept() => match accepted {
                Ok(pair) => return Some(pair),
                Err(e) => {
                    tracing::warn!(error = %e, "{what}: accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            },
        }
    }
}

/// Serves one connection: one reply per request line, in order.
async fn serve<S: Storage, T: PeerStream>(
    mut conn: Connection<T>,
    handler: &Handler<S>,
    peers: &Peers,
    ticket: &Ticket,
    cancel: &CancellationToken,
) {
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
            // Counted at admission; it never completed a request, so no
            // reply is owed.
            _ = ticket.evicted() => return,
        };
        out.clear();
        match frame {
            Ok(Frame::Line) => {
                if protocol::is_blank(conn.line()) {
                    continue;
                }
                ticket.served();
                conn.restart_idle_timer();
                handler.handle(conn.line(), &mut out).await;
            }
            Ok(Frame::Closed) => return,
            Err(e) if connection::is_idle_timeout(&e) => return close_idle(conn, peers).await,
            Err(_) => return,
            Ok(Frame::TooLarge) => {
                handler.too_large(conn.max_line(), &mut out);
                let _ = conn.write(&out).await;
                let _ = tokio::time::timeout(FINAL_FLUSH, conn.shutdown()).await;
                conn.discard_input(TOO_LARGE_DRAIN).await;
                return;
            }
        }
        match conn.write(&out).await {
            Ok(()) => {}
            Err(e) if connection::is_idle_timeout(&e) => return close_idle(conn, peers).await,
            Err(_) => return,
        }
    }
    let deadline = tokio::time::Instant::now() + FINAL_FLUSH;
    let _ = tokio::time::timeout_at(deadline, conn.shutdown()).await;
    // The peer may still be sending; closing now would reset the connection
    // and drop replies it has not received yet.
    conn.wait_delivered(deadline).await;
}

/// Closes a connection whose peer completed no request within
/// `network.idle_timeout`, and counts it.
async fn close_idle<T: PeerStream>(mut conn: Connection<T>, peers: &Peers) {
    peers.idle_closed();
    tracing::debug!("closing a peer connection idle for network.idle_timeout");
    let _ = tokio::time::timeout(IDLE_CLOSE_FLUSH, conn.shutdown()).await;
}
