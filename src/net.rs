//! Listening sockets, shared by the peer listener and the metrics endpoint:
//! the accept loop and the address allow-list. Ground floor: it imports
//! nothing of the agent.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use ipnet::IpNet;
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

/// Whether `ip` may connect. An IPv4 client on a dual-stack socket shows
/// up as `::ffff:a.b.c.d` and is matched as IPv4.
pub(crate) fn allowed(networks: &[IpNet], ip: IpAddr) -> bool {
    let ip = match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(ip),
        v4 => v4,
    };
    networks.is_empty() || networks.iter().any(|n| n.contains(&ip))
}

/// Accepts the next connection, or None once `cancel` fires. A failed
/// accept (usually EMFILE) is logged and retried after a pause instead of
/// spinning. `what` names the listener in the log.
pub(crate) async fn accept(
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
