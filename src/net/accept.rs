//! Listening sockets, shared by the peer listener and the metrics endpoint:
//! the accept loop, the bound on the sockets a listener holds, and the
//! address allow-list. Ground floor: it imports nothing of the agent.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use ipnet::IpNet;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;

/// The target of these log lines: the module's path before the move into
/// a folder, kept so that operators' `log.level` filters still match.
const LOG_TARGET: &str = "agent::net";

/// Whether `ip` may connect. An IPv4 client on a dual-stack socket shows
/// up as `::ffff:a.b.c.d` and is matched as IPv4.
pub(crate) fn allowed(networks: &[IpNet], ip: IpAddr) -> bool {
    let ip = match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(ip),
        v4 => v4,
    };
    networks.is_empty() || networks.iter().any(|n| n.contains(&ip))
}

/// How many accepted sockets one listener may hold at once: twice its
/// connection cap, the open connections and as many again on their way out.
///
/// The cap alone does not bound descriptors. A connection that gives way
/// to a newcomer, or closes idle, holds its socket until its task runs
/// again, and an accept loop that keeps winning the CPU can accept faster
/// than those tasks close. Under 3,000 abusive connections to the metrics
/// endpoint (cap 64) on a loaded machine, the agent held 281 descriptors,
/// 15 of them from before the abuse. With this bound the listener stops
/// accepting while the budget is spent; newcomers wait in the kernel's
/// listen backlog, and the connections on their way out, which close at
/// once or within a short flush timeout, make room. Each time the listener
/// finds the budget spent it says so through `on_full` (the listeners
/// count it and warn), so an operator can see why connections wait.
pub(crate) struct SocketBudget {
    sockets: Arc<Semaphore>,
    on_full: Box<dyn Fn() + Send + Sync>,
}

/// One accepted socket's share of a [`SocketBudget`], given back on drop;
/// the connection's task holds it until its socket is closed.
pub(crate) struct SocketPermit {
    _held: OwnedSemaphorePermit,
}

impl SocketBudget {
    /// The budget of a listener capped at `max_connections` connections;
    /// `on_full` is called each time the listener stops accepting for it.
    pub(crate) fn for_cap(
        max_connections: usize,
        on_full: impl Fn() + Send + Sync + 'static,
    ) -> Self {
        let sockets = max_connections
            .saturating_mul(2)
            .clamp(1, Semaphore::MAX_PERMITS);
        Self {
            sockets: Arc::new(Semaphore::new(sockets)),
            on_full: Box::new(on_full),
        }
    }
}

/// Accepts the next connection once `sockets` has room for it, or
/// returns None once `cancel` fires. A failed accept (usually EMFILE) is
/// logged and retried after a pause instead of spinning. `what` names the
/// listener in the log.
pub(crate) async fn accept(
    listener: &TcpListener,
    sockets: &SocketBudget,
    cancel: &CancellationToken,
    what: &str,
) -> Option<(TcpStream, SocketAddr, SocketPermit)> {
    let permit = match Arc::clone(&sockets.sockets).try_acquire_owned() {
        Ok(permit) => SocketPermit { _held: permit },
        Err(_) => {
            (sockets.on_full)();
            tokio::select! {
                _ = cancel.cancelled() => return None,
                // The semaphore is never closed, so acquiring only waits.
                permit = Arc::clone(&sockets.sockets).acquire_owned() => SocketPermit { _held: permit.ok()? },
            }
        }
    };
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return None,
            accepted = listener.accept() => match accepted {
                Ok((stream, remote)) => return Some((stream, remote, permit)),
                Err(e) => {
                    tracing::warn!(target: LOG_TARGET, error = %e, "{what}: accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn stops_accepting_while_twice_the_cap_is_held() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let full = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let told = Arc::clone(&full);
        let sockets = SocketBudget::for_cap(1, move || {
            told.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        });
        let cancel = CancellationToken::new();
        let full = move || full.load(std::sync::atomic::Ordering::Relaxed);
        // Each client's handshake is complete once connect returns: all
        // four wait in the listen backlog, ready to be accepted.
        let mut clients = Vec::new();
        for _ in 0..4 {
            clients.push(TcpStream::connect(addr).await.unwrap());
        }
        let first = accept(&listener, &sockets, &cancel, "test").await.unwrap();
        let _second = accept(&listener, &sockets, &cancel, "test").await.unwrap();
        assert_eq!(full(), 0);

        // Two sockets for a cap of one: the third stays in the backlog...
        let third = accept(&listener, &sockets, &cancel, "test");
        tokio::pin!(third);
        let waited = tokio::time::timeout(Duration::from_millis(100), &mut third).await;
        assert!(waited.is_err(), "accepted beyond the budget");
        // It said so once, when it started waiting.
        assert_eq!(full(), 1);
        // ...until a socket held is closed.
        drop(first);
        let third = tokio::time::timeout(Duration::from_secs(10), third).await;
        assert!(matches!(third, Ok(Some(_))));

        // Shutdown ends the wait for room (the budget is spent again, and
        // says so a second time).
        cancel.cancel();
        assert!(accept(&listener, &sockets, &cancel, "test").await.is_none());
        assert_eq!(full(), 2);
    }
}
