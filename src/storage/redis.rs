//! The `redis` backend: an auto-reconnecting connection manager.
//!
//! The manager is created lazily, so an agent started while Redis is down
//! still starts; it connects on first use and reconnects after an outage.
//! Every command is bounded by `storage.redis.timeout`, so an outage turns
//! into prompt error replies instead of stuck peers.

use std::future::Future;
use std::time::Duration;

use redis::aio::{ConnectionManager, ConnectionManagerConfig};

use super::{Storage, StorageError};
use crate::config::{BackendKind, RedisConfig, SecretUrl};

pub struct RedisStore {
    conn: ConnectionManager,
    prefix: String,
    timeout: Duration,
}

impl RedisStore {
    /// Builds the store without needing Redis to be up; only a malformed URL fails.
    /// `url` is `storage.redis.url` with the password file applied.
    pub async fn open(cfg: &RedisConfig, url: &SecretUrl) -> Result<Self, StorageError> {
        let client = redis::Client::open(url.expose())
            .map_err(|e| StorageError::Unavailable(format!("bad Redis URL: {e}")))?;
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(cfg.timeout))
            .set_response_timeout(Some(cfg.timeout))
            // Reconnects are retried by the next operation, not in a long
            // loop inside one: an operation must fail within the timeout.
            .set_number_of_retries(1)
            .set_max_delay(Duration::from_millis(500));
        let conn = ConnectionManager::new_lazy_with_config(client, config)
            .map_err(|e| StorageError::Unavailable(e.to_string()))?;
        let store = Self {
            conn,
            prefix: cfg.key_prefix.clone(),
            timeout: cfg.timeout,
        };
        match store.ping().await {
            Ok(()) => tracing::info!(%url, "connected to Redis"),
            Err(e) => tracing::warn!(
                %url,
                error = %e,
                "Redis is unreachable; starting anyway, operations fail until it is back"
            ),
        }
        Ok(store)
    }

    /// Round-trips a PING, bounded by the timeout.
    pub async fn ping(&self) -> Result<(), StorageError> {
        let mut conn = self.conn.clone();
        self.bounded(async move { redis::cmd("PING").query_async::<String>(&mut conn).await })
            .await
            .map(|_| ())
    }

    fn key(&self, key: &str) -> String {
        let mut k = String::with_capacity(self.prefix.len() + key.len());
        k.push_str(&self.prefix);
        k.push_str(key);
        k
    }

    async fn bounded<T>(
        &self,
        fut: impl Future<Output = redis::RedisResult<T>>,
    ) -> Result<T, StorageError> {
        bounded(self.timeout, fut).await
    }
}

/// Runs one Redis call within `timeout`, turning its failure into the
/// [`StorageError`] the peer is told. Shared by the Redis backends so that
/// they fail alike.
pub(super) async fn bounded<T>(
    timeout: Duration,
    fut: impl Future<Output = redis::RedisResult<T>>,
) -> Result<T, StorageError> {
    match tokio::time::timeout(timeout, fut).await {
        Err(_) => Err(StorageError::Timeout(timeout)),
        Ok(Err(e)) => Err(classify(timeout, e)),
        Ok(Ok(v)) => Ok(v),
    }
}

/// A Redis error as a [`StorageError`]: its own timeout; a connection that
/// failed, or a cluster with no node reached or no master serving the key
/// (`CLUSTERDOWN`, `TRYAGAIN`, `MASTERDOWN`, or a redirect the cluster
/// client could not follow during a failover: a single server never gives
/// these), as unavailable; anything else Redis answered as a failure.
fn classify(timeout: Duration, e: redis::RedisError) -> StorageError {
    use redis::{ErrorKind, ServerErrorKind};
    let cluster_down = matches!(
        e.kind(),
        ErrorKind::ClusterConnectionNotFound
            | ErrorKind::Server(
                ServerErrorKind::ClusterDown
                    | ServerErrorKind::TryAgain
                    | ServerErrorKind::MasterDown
                    | ServerErrorKind::Moved
                    | ServerErrorKind::Ask
            )
    );
    if e.is_timeout() {
        StorageError::Timeout(timeout)
    } else if e.is_io_error()
        || e.is_connection_dropped()
        || e.is_connection_refusal()
        || cluster_down
    {
        StorageError::Unavailable(e.to_string())
    } else {
        StorageError::Backend(e.to_string())
    }
}

impl Storage for RedisStore {
    fn backend(&self) -> BackendKind {
        BackendKind::Redis
    }

    async fn get(&self, key: &str) -> Result<Option<String>, StorageError> {
        let mut conn = self.conn.clone();
        let key = self.key(key);
        self.bounded(async move {
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
        self.bounded(async move {
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
        self.bounded(async move {
            redis::cmd("DEL")
                .arg(key)
                .query_async::<i64>(&mut conn)
                .await
        })
        .await
        .map(|n| n > 0)
    }

    async fn close(&self) {
        // Nothing buffered: every acknowledged write was already answered by Redis.
    }
}
