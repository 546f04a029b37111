//! The `redis_cluster` backend: the `redis` crate's async cluster client.
//!
//! Sharding is the cluster's own: the client hashes each key to its slot,
//! sends the command to the master that serves the slot, follows `MOVED` and
//! `ASK` redirects, and reloads the slot map when the cluster changes (a
//! failover, a resharding). The agent adds only what the single-node backend
//! has: a key prefix, and a bound on every operation.
//!
//! The connection is created pending, so an agent started while the cluster
//! is unreachable still starts; the client connects to the seed nodes on
//! first use and again after losing them.
//!
//! Health, as for the single-node backend: an operation that finds no
//! master marks the store down at once; `CLUSTER INFO` every
//! [`PROBE_INTERVAL`] marks it up when a node says `cluster_state:ok` (every
//! slot has a master), down otherwise.

use std::time::Duration;

use redis::cluster::{ClusterClient, ClusterClientBuilder, ClusterConfig};
use redis::cluster_async::ClusterConnection;
use tokio_util::sync::{CancellationToken, DropGuard};

use super::redis::{bounded, ops, probe};
use super::{Health, Storage, StorageError};
use crate::config::{BackendKind, RedisClusterConfig, SecretUrl};

/// Retries inside one operation start this soon (the crate's default is
/// over a second, longer than a whole operation may take)...
const MIN_RETRY_WAIT_MS: u64 = 10;
/// ...and back off to at most this, so that several fit in `timeout`.
const MAX_RETRY_WAIT_MS: u64 = 200;

/// A Redis Cluster, shared by many agents.
pub struct RedisClusterStore {
    /// Cheap to clone: a handle on the client's one background task, which
    /// owns the node connections and the slot map.
    conn: ClusterConnection,
    /// `storage.redis_cluster.key_prefix`: keeps the agents' keys apart from
    /// whatever else the cluster holds.
    prefix: String,
    /// `storage.redis_cluster.timeout`: no peer waits longer than this for
    /// an answer, whatever the cluster is doing.
    timeout: Duration,
    /// Up, or down with the reason `/ready` gives.
    health: Health,
    /// Stops the health probe when the store is closed or dropped.
    probe: std::sync::Mutex<Option<DropGuard>>,
}

impl RedisClusterStore {
    /// Builds the store without needing the cluster to be up; only malformed
    /// node URLs fail. `nodes` are `storage.redis_cluster.nodes` with the
    /// password file applied.
    pub async fn open(cfg: &RedisClusterConfig, nodes: &[SecretUrl]) -> Result<Self, StorageError> {
        let client = client(cfg, nodes)?;
        // The pending connection connects in the background, and reconnects
        // to the seeds whenever it has no node left: it never needs replacing.
        let conn = client.get_pending_async_connection_with_config(
            ClusterConfig::new()
                .set_connection_timeout(cfg.timeout)
                .set_response_timeout(cfg.timeout),
        );
        let shown = nodes
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join(",");
        let health = match cluster_state(&conn, cfg.timeout).await {
            Ok(()) => {
                tracing::info!(nodes = %shown, "connected to Redis Cluster");
                Health::new(BackendKind::RedisCluster)
            }
            Err(reason) => {
                tracing::warn!(
                    nodes = %shown,
                    error = %reason,
                    "Redis Cluster is unreachable; starting anyway, operations fail until it is back"
                );
                Health::starting_down(BackendKind::RedisCluster, &reason)
            }
        };
        let cancel = CancellationToken::new();
        let (probe_conn, timeout) = (conn.clone(), cfg.timeout);
        tokio::spawn(probe(
            move || {
                let conn = probe_conn.clone();
                async move { cluster_state(&conn, timeout).await }
            },
            health.clone(),
            cancel.clone(),
        ));
        Ok(Self {
            conn,
            prefix: cfg.key_prefix.clone(),
            timeout: cfg.timeout,
            health,
            probe: std::sync::Mutex::new(Some(cancel.drop_guard())),
        })
    }

    /// Runs one call within the timeout; a cluster that cannot serve it
    /// marks the store down until the probe finds it whole again.
    async fn bounded<T>(
        &self,
        fut: impl std::future::Future<Output = redis::RedisResult<T>>,
    ) -> Result<T, StorageError> {
        let result = bounded(self.timeout, fut).await;
        if let Err(e @ (StorageError::Timeout(_) | StorageError::RedisUnavailable(_))) = &result {
            self.health
                .set_down(&format!("Redis Cluster cannot serve: {e}"));
        }
        result
    }

    fn key(&self, key: &str) -> String {
        let mut k = String::with_capacity(self.prefix.len() + key.len());
        k.push_str(&self.prefix);
        k.push_str(key);
        k
    }
}

/// `Ok` when a node reports `cluster_state:ok`; else the reason `/ready`
/// gives (text: it is only ever a [`Health`] reason and a log field).
async fn cluster_state(conn: &ClusterConnection, timeout: Duration) -> Result<(), String> {
    let mut conn = conn.clone();
    let info = bounded(timeout, async move {
        redis::cmd("CLUSTER")
            .arg("INFO")
            .query_async::<String>(&mut conn)
            .await
    })
    .await
    .map_err(|e| format!("Redis Cluster unreachable: {e}"))?;
    if info.lines().any(|l| l.trim() == "cluster_state:ok") {
        Ok(())
    } else {
        Err("Redis Cluster state is not ok: a slot has no master".to_string())
    }
}

/// The cluster client: timeouts for each connection and each reply, and
/// retries (after a redirect, a refused connection, `TRYAGAIN`) spaced so
/// that several fit in one operation. The outer bound on the operation is
/// [`bounded`]'s, so a failover costs a peer at most `timeout` per request.
fn client(cfg: &RedisClusterConfig, nodes: &[SecretUrl]) -> Result<ClusterClient, StorageError> {
    ClusterClientBuilder::new(nodes.iter().map(SecretUrl::expose))
        .connection_timeout(cfg.timeout)
        .response_timeout(cfg.timeout)
        .min_retry_wait(MIN_RETRY_WAIT_MS)
        .max_retry_wait(MAX_RETRY_WAIT_MS)
        .build()
        .map_err(StorageError::RedisConfig)
}

impl Storage for RedisClusterStore {
    fn backend(&self) -> BackendKind {
        BackendKind::RedisCluster
    }

    fn health(&self) -> &Health {
        &self.health
    }

    async fn get(&self, key: &str) -> Result<Option<String>, StorageError> {
        self.bounded(ops::get(self.conn.clone(), self.key(key)))
            .await
    }

    async fn put(&self, key: &str, value: &str) -> Result<(), StorageError> {
        self.bounded(ops::put(self.conn.clone(), self.key(key), value))
            .await
    }

    async fn delete(&self, key: &str) -> Result<bool, StorageError> {
        self.bounded(ops::delete(self.conn.clone(), self.key(key)))
            .await
    }

    async fn close(&self) {
        // Nothing buffered: every acknowledged write was answered by its master.
        if let Ok(mut probe) = self.probe.lock() {
            probe.take();
        }
    }
}
