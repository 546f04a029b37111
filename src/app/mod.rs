//! Startup and shutdown: wires configuration, metrics, storage, the peer
//! listener and outbound peers together, and tears them down in order.

mod reload;

pub use reload::{changed_keys, Reload, SetLogLevel, LIVE_KEYS};

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::{Config, Resolved};
use crate::peer::{self, Budget, DialPolicy, Handler, PeerTlsAcceptor, Peers, Server};
use crate::storage::{AnyBackend, Instrumented, Storage, StorageError};
use crate::telemetry::{self, TelemetryError};

/// Connections get this long to answer what they have read.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(6);
/// After the drain time, requests still waiting on storage are answered
/// `shutting down`: connections get this long to write those replies, and
/// every other one they hold. The rest of the 10 s shutdown budget goes to
/// closing storage.
const DEADLINE_FLUSH: Duration = Duration::from_secs(2);

/// A failure that stops startup.
#[derive(Debug, thiserror::Error)]
pub enum StartupError {
    /// The metrics exporter could not start (port taken, recorder already set).
    #[error(transparent)]
    Metrics(#[from] TelemetryError),
    /// The storage backend could not be opened; fatal for a local database.
    #[error("cannot open storage: {0}")]
    Storage(#[from] StorageError),
    /// The peer port could not be bound.
    #[error("cannot listen for peers on {addr}: {source}")]
    Listen {
        /// `network.listen`.
        addr: std::net::SocketAddr,
        /// Why binding failed (in use, no permission, no such address).
        source: std::io::Error,
    },
}

/// Runs the agent until `shutdown` resolves, then stops gracefully.
pub async fn run(
    config: Config,
    resolved: Resolved,
    shutdown: impl Future<Output = ()>,
    reload: Reload,
) -> Result<(), StartupError> {
    tracing::info!(node = %config.node_id(), version = env!("CARGO_PKG_VERSION"), "starting agent");
    raise_fd_limit();
    let cancel = CancellationToken::new();
    let drain_deadline = CancellationToken::new();

    let installed = telemetry::install(&config.metrics, &resolved).await?;
    let listener =
        TcpListener::bind(resolved.listen)
            .await
            .map_err(|source| StartupError::Listen {
                addr: resolved.listen,
                source,
            })?;
    let backend = AnyBackend::open(&config.storage, &resolved).await?;
    tracing::info!(backend = backend.backend().as_str(), "storage ready");
    let handler = Arc::new(Handler::new(Instrumented::new(backend)));
    let health = handler.storage().health().clone();
    let ready = Arc::new(move || health.readiness());
    let metrics_networks = Arc::new(RwLock::new(resolved.allowed_networks.clone()));
    let remote_write = telemetry::spawn(
        installed,
        &config.metrics,
        &resolved,
        &cancel,
        ready,
        Arc::clone(&metrics_networks),
    );

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
        allowed_networks: resolved.peer_networks.clone(),
        tls: resolved.peer_tls.as_ref().map(|tls| PeerTlsAcceptor {
            acceptor: TlsAcceptor::from(Arc::clone(&tls.server)),
            handshake_timeout: config.network.tls.handshake_timeout,
        }),
        idle_timeout: config.network.idle_timeout,
        budget: Budget::new(config.network.max_buffered_bytes),
        drain_deadline: drain_deadline.clone(),
    };
    warn_if_open(&resolved);
    tracker.spawn(server.run(tracker.clone(), cancel.clone()));
    let policy = DialPolicy {
        ping_interval: config.network.ping_interval,
        max_backoff: config.network.max_redial_backoff,
        tls: resolved
            .peer_tls
            .as_ref()
            .map(|tls| Arc::clone(&tls.client)),
    };
    let mut live = Live {
        config,
        dialers: HashMap::new(),
        policy,
        peers: peers.clone(),
        tracker: tracker.clone(),
        cancel: cancel.clone(),
        metrics_networks,
    };
    live.dial(live.config.network.peers.clone());
    if !live.config.network.peers.is_empty()
        && live.config.network.idle_timeout <= live.config.network.ping_interval
    {
        // Another agent with the same settings would close our keepalive
        // connections between two pings, and we theirs.
        tracing::warn!(
            idle_timeout = ?live.config.network.idle_timeout,
            ping_interval = ?live.config.network.ping_interval,
            "network.idle_timeout is not longer than network.ping_interval: peers with these settings close each other's connections between pings"
        );
    }
    tracing::info!("agent ready");
    // systemd's Type=notify: started means listening, storage open. Without
    // NOTIFY_SOCKET (not under systemd) this does nothing.
    if let Err(e) = sd_notify::notify(&[sd_notify::NotifyState::Ready]) {
        tracing::warn!(error = %e, "cannot notify systemd that the agent is ready");
    }

    let mut reload = reload;
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        tokio::select! {
            _ = &mut shutdown => break,
            Some(()) = reload.requests.recv() => live.reload(&reload),
        }
    }
    let _ = sd_notify::notify(&[sd_notify::NotifyState::Stopping]);
    tracing::info!("shutting down: no new connections, answering requests already read");
    cancel.cancel();
    tracker.close();
    if tokio::time::timeout(DRAIN_TIMEOUT, tracker.wait())
        .await
        .is_err()
    {
        tracing::warn!(
            timeout = ?DRAIN_TIMEOUT,
            "requests still wait on storage after the drain time; answering them 'shutting down'"
        );
        drain_deadline.cancel();
        if tokio::time::timeout(DEADLINE_FLUSH, tracker.wait())
            .await
            .is_err()
        {
            tracing::warn!(
                timeout = ?DEADLINE_FLUSH,
                "some connections did not take their last replies in time; closing them"
            );
        }
    }
    // After the drain, so the last push carries every reply's count.
    if let Some(remote_write) = remote_write {
        remote_write.shutdown().await;
    }
    handler.storage().close().await;
    tracing::info!("agent stopped");
    Ok(())
}

/// The running configuration, and what a reload can change while serving.
struct Live {
    /// What the agent runs with: keys that need a restart keep their old
    /// value here, so the next reload names them again.
    config: Config,
    /// One task per outbound peer, stopped through its token.
    dialers: HashMap<String, CancellationToken>,
    policy: DialPolicy,
    peers: Peers,
    tracker: TaskTracker,
    cancel: CancellationToken,
    metrics_networks: Arc<RwLock<Vec<ipnet::IpNet>>>,
}

impl Live {
    /// Starts keeping `addrs` connected (those not already dialled).
    fn dial(&mut self, addrs: Vec<String>) {
        for addr in addrs {
            if self.dialers.contains_key(&addr) {
                continue;
            }
            let token = self.cancel.child_token();
            self.tracker.spawn(peer::maintain(
                addr.clone(),
                self.policy.clone(),
                self.peers.clone(),
                token.clone(),
            ));
            self.dialers.insert(addr, token);
        }
        self.peers.configured(self.dialers.len());
    }

    /// Reloads the configuration (SIGHUP); see [`reload`].
    fn reload(&mut self, reload: &Reload) {
        tracing::info!("received SIGHUP: reloading the configuration");
        let new = match reload.load() {
            Ok(new) => new,
            Err(e) => {
                tracing::error!(error = %e, "configuration reload failed; keeping the running configuration");
                return;
            }
        };
        let changed = changed_keys(&self.config, &new);
        let (live, restart): (Vec<&String>, Vec<&String>) = changed
            .iter()
            .partition(|k| LIVE_KEYS.contains(&k.as_str()));
        for key in &live {
            match key.as_str() {
                "log.level" => match (reload.set_log_level)(&new.log.level) {
                    Ok(()) => self.config.log.level = new.log.level.clone(),
                    Err(why) => tracing::warn!(%why, "log.level not applied"),
                },
                "network.peers" => {
                    let wanted = &new.network.peers;
                    self.dialers.retain(|addr, token| {
                        let keep = wanted.contains(addr);
                        if !keep {
                            tracing::info!(peer = %addr, "peer removed from network.peers; disconnecting");
                            token.cancel();
                        }
                        keep
                    });
                    self.dial(wanted.clone());
                    self.config.network.peers = wanted.clone();
                }
                "metrics.allowed_networks" => match new.validate() {
                    Ok(resolved) => {
                        *self
                            .metrics_networks
                            .write()
                            .unwrap_or_else(|e| e.into_inner()) = resolved.allowed_networks;
                        self.config.metrics.allowed_networks = new.metrics.allowed_networks.clone();
                    }
                    Err(e) => tracing::warn!(error = %e, "metrics.allowed_networks not applied"),
                },
                _ => {}
            }
        }
        for key in &restart {
            tracing::warn!(key = %key, "changed in the configuration; restart the agent to apply it");
        }
        tracing::info!(
            applied = ?live,
            need_restart = ?restart,
            "configuration reloaded"
        );
    }
}

/// Says once, at startup, when the peer port is open to anyone who can
/// reach it: any such client can read, overwrite and delete every key.
fn warn_if_open(resolved: &Resolved) {
    if !resolved.listen.ip().is_loopback()
        && resolved.peer_tls.is_none()
        && resolved.peer_networks.is_empty()
    {
        tracing::warn!(
            listen = %resolved.listen,
            "peers are not authenticated: any client that can reach this address can read and \
             write every key; set network.tls or network.allowed_networks (see docs/security.md)"
        );
    }
}

/// Raises the soft open-files limit to the hard limit: every peer and every
/// metrics connection holds a descriptor, and the usual soft default (1024)
/// is far below what a busy agent needs.
fn raise_fd_limit() {
    use rustix::process::{getrlimit, setrlimit, Resource, Rlimit};
    let lim = getrlimit(Resource::Nofile);
    // `None` is unlimited; shown as such in the log line.
    let show = |v: Option<u64>| v.map_or_else(|| "unlimited".to_string(), |n| n.to_string());
    let raised = Rlimit {
        current: lim.maximum,
        ..lim
    };
    if lim.current != lim.maximum {
        if let Err(e) = setrlimit(Resource::Nofile, raised) {
            tracing::warn!(
                soft = %show(lim.current),
                hard = %show(lim.maximum),
                error = %std::io::Error::from(e),
                "cannot raise the open-files limit"
            );
            return;
        }
    }
    tracing::info!(
        soft_before = %show(lim.current),
        soft = %show(raised.current),
        hard = %show(raised.maximum),
        "open-files limit"
    );
}
