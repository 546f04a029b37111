//! Startup and shutdown: wires configuration, metrics, storage, the peer
//! listener and outbound peers together, and tears them down in order.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::budget::Budget;
use crate::config::{Config, Resolved};
use crate::handler::Handler;
use crate::peers::{self, DialPolicy, Peers};
use crate::server::Server;
use crate::storage::{AnyBackend, Instrumented, Storage, StorageError};
use crate::telemetry::{self, TelemetryError};

/// Connections get this long to answer what they have read; the rest of
/// the 10 s shutdown budget goes to closing storage.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(7);

/// A failure that stops startup.
#[derive(Debug, thiserror::Error)]
pub enum StartupError {
    #[error(transparent)]
    Metrics(#[from] TelemetryError),
    #[error("cannot open storage: {0}")]
    Storage(#[from] StorageError),
    #[error("cannot listen for peers on {addr}: {source}")]
    Listen {
        addr: std::net::SocketAddr,
        source: std::io::Error,
    },
}

/// Runs the agent until `shutdown` resolves, then stops gracefully.
pub async fn run(
    config: Config,
    resolved: Resolved,
    shutdown: impl Future<Output = ()>,
) -> Result<(), StartupError> {
    tracing::info!(node = %config.node_id(), version = env!("CARGO_PKG_VERSION"), "starting agent");
    raise_fd_limit();
    let cancel = CancellationToken::new();

    let installed = telemetry::install(&config.metrics, &resolved).await?;
    let listener =
        TcpListener::bind(resolved.listen)
            .await
            .map_err(|source| StartupError::Listen {
                addr: resolved.listen,
                source,
            })?;
    let backend = AnyBackend::open(&config.storage).await?;
    tracing::info!(backend = backend.backend().as_str(), "storage ready");
    let handler = Arc::new(Handler::new(Instrumented::new(backend)));
    telemetry::spawn(installed, &config.metrics, &resolved, &cancel);

    let peers = Peers::new();
    let tracker = TaskTracker::new();
    if let Ok(addr) = listener.local_addr() {
        tracing::info!(%addr, "peer listener bound");
    }
    let server = Server {
        listener,
        handler: Arc::clone(&handler),
        peers: peers.clone(),
        max_connections: config.network.max_connections,
        max_line: config.network.max_message_bytes,
        idle_timeout: config.network.idle_timeout,
        budget: Budget::new(config.network.max_buffered_bytes),
    };
    tracker.spawn(server.run(tracker.clone(), cancel.clone()));
    let policy = DialPolicy {
        ping_interval: config.network.ping_interval,
        max_backoff: config.network.max_redial_backoff,
    };
    for addr in &config.network.peers {
        tracker.spawn(peers::maintain(
            addr.clone(),
            policy.clone(),
            peers.clone(),
            cancel.clone(),
        ));
    }
    if !config.network.peers.is_empty()
        && config.network.idle_timeout <= config.network.ping_interval
    {
        // Another agent with the same settings would close our keepalive
        // connections between two pings, and we theirs.
        tracing::warn!(
            idle_timeout = ?config.network.idle_timeout,
            ping_interval = ?config.network.ping_interval,
            "network.idle_timeout is not longer than network.ping_interval: peers with these settings close each other's connections between pings"
        );
    }
    tracing::info!("agent ready");

    shutdown.await;
    tracing::info!("shutting down: no new connections, answering requests already read");
    cancel.cancel();
    tracker.close();
    if tokio::time::timeout(DRAIN_TIMEOUT, tracker.wait())
        .await
        .is_err()
    {
        tracing::warn!(timeout = ?DRAIN_TIMEOUT, "some connections did not finish in time; closing them");
    }
    handler.storage().close().await;
    tracing::info!("agent stopped");
    Ok(())
}

/// Raises the soft open-files limit to the hard limit: every peer and every
/// metrics connection holds a descriptor, and the usual soft default (1024)
/// is far below what a busy agent needs.
fn raise_fd_limit() {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: `lim` is a valid, writable rlimit.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        tracing::warn!("cannot read the open-files limit");
        return;
    }
    let before = lim.rlim_cur;
    if lim.rlim_cur < lim.rlim_max {
        lim.rlim_cur = lim.rlim_max;
        // SAFETY: as above; only the soft limit changes, within the hard limit.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) } != 0 {
            tracing::warn!(
                soft = before,
                hard = lim.rlim_max,
                "cannot raise the open-files limit"
            );
            return;
        }
    }
    tracing::info!(
        soft_before = before,
        soft = lim.rlim_cur,
        hard = lim.rlim_max,
        "open-files limit"
    );
}
