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

use std::time::Duration;

use redis::cluster::{ClusterClient, ClusterClientBuilder, ClusterConfig};
use redis::cluster_async::ClusterConnection;

use super::redis::bounded;
use super::{Storage, StorageError};
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
        let store = Self {
            conn,
            prefix: cfg.key_prefix.clone(),
            timeout: cfg.timeout,
        };
        let shown = nodes
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join(",");
        match store.ping().await {
            Ok(()) => tracing::info!(nodes = %shown, "connected to Redis Cluster"),
            Err(e) => tracing::warn!(
                nodes = %shown,
                error = %e,
                "Redis Cluster is unreachable; starting anyway, operations fail until it is back"
            ),
        }
        Ok(store)
    }

    /// Round-trips a PING to one node, bounded by the timeout.
    pub async fn ping(&self) -> Result<(), StorageError> {
        let mut conn = self.conn.clone();
        bounded(self.timeout, async move {
            redis::cmd("PING").query_async::<String>(&mut conn).await
        })
        .await
        .map(|_| ())
    }

    fn key(&self, key: &str) -> String {
        let mut k = String::with_capacity(self.prefix.len() + key.len());
        k.push_str(&self.prefix);
        k.push_str(key);
        k
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
        .map_err(|e| StorageError::Unavailable(format!("bad Redis Cluster nodes: {e}")))
}

impl Storage for RedisClusterStore {
    fn backend(&self) -> BackendKind {
        BackendKind::RedisCluster
    }

    async fn get(&self, key: &str) -> Result<Option<String>, StorageError> {
        let mut conn = self.conn.clone();
        let key = self.key(key);
        bounded(self.timeout, async move {
            redis::cmd("GET")
                .arg(key)
                .query_async::<Option<String>>(&mut conn)
                .await
        })
        .await
    }

    async fn put(&self, key: &str, value: &str) -> Result<(), StorageError> {
        let mut conn = self.conn.clone();
        let key = self.key(key);
        bounded(self.timeout, async move {
            redis::cmd("SET")
                .arg(key)
                .arg(value)
                .query_async::<()>(&mut conn)
                .await
        })
        .await
    }

    async fn delete(&self, key: &str) -> Result<bool, StorageError> {
        let mut conn = self.conn.clone();
        let key = self.key(key);
        bounded(self.timeout, async move {
            redis::cmd("DEL")
                .arg(key)
                .query_async::<i64>(&mut conn)
                .await
        })
        .await
        .map(|n| n > 0)
    }

    async fn close(&self) {
        // Nothing buffered: every acknowledged write was answered by its master.
    }
}
