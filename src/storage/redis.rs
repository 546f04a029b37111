//! The `redis` backend: an auto-reconnecting connection manager.
//!
//! The manager is created lazily, so an agent started while Redis is down
//! still starts; it connects on first use and reconnects after an outage.
//! Every command is bounded by `storage.redis.timeout`, so an outage turns
//! into prompt error replies instead of stuck peers.
//!
//! Health: an operation that cannot reach Redis marks the store down at
//! once; a PING every [`PROBE_INTERVAL`] marks it down or up, so readiness
//! follows Redis on an idle agent too, and comes back only once Redis
//! answers (a flapping connection does not flap readiness per request).

use std::future::Future;
use std::time::Duration;

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use tokio_util::sync::{CancellationToken, DropGuard};

use super::{Health, Storage, StorageError};
use crate::config::{BackendKind, RedisConfig, SecretUrl};

/// How often Redis is pinged for the store's health.
pub(crate) const PROBE_INTERVAL: Duration = Duration::from_secs(1);

/// Handle to Redis; cheap to share.
pub struct RedisStore {
    conn: ConnectionManager,
    /// `storage.redis.key_prefix`, prepended to every key.
    prefix: String,
    /// `storage.redis.timeout`, the bound on every command.
    timeout: Duration,
    /// Down on a connection error or a failed PING, up on an answered PING.
    health: Health,
    /// Stops the health probe when the store is closed or dropped.
    probe: std::sync::Mutex<Option<DropGuard>>,
}

impl RedisStore {
    /// Builds the store without needing Redis to be up; only a malformed URL fails.
    /// `url` is `storage.redis.url` with the password file applied.
    pub async fn open(cfg: &RedisConfig, url: &SecretUrl) -> Result<Self, StorageError> {
        let client = redis::Client::open(url.expose()).map_err(StorageError::RedisConfig)?;
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(cfg.timeout))
            .set_response_timeout(Some(cfg.timeout))
            // Reconnects are retried by the next operation, not in a long
            // loop inside one: an operation must fail within the timeout.
            .set_number_of_retries(1)
            .set_max_delay(Duration::from_millis(500));
        let conn = ConnectionManager::new_lazy_with_config(client, config)
            .map_err(StorageError::RedisConfig)?;
        // Pinged outside `Self::bounded`, which would log the outage as a
        // transition: the warning below says it once, at the right level.
        let mut first = conn.clone();
        let health = match bounded(cfg.timeout, async move {
            redis::cmd("PING").query_async::<String>(&mut first).await
        })
        .await
        {
            Ok(_) => {
                tracing::info!(%url, "connected to Redis");
                Health::new(BackendKind::Redis)
            }
            Err(e) => {
                tracing::warn!(
                    %url,
                    error = %e,
                    "Redis is unreachable; starting anyway, operations fail until it is back"
                );
                Health::starting_down(BackendKind::Redis, &unreachable(&e))
            }
        };
        let mut store = Self {
            conn,
            prefix: cfg.key_prefix.clone(),
            timeout: cfg.timeout,
            health,
            probe: std::sync::Mutex::new(None),
        };
        let cancel = CancellationToken::new();
        let (conn, timeout) = (store.conn.clone(), store.timeout);
        tokio::spawn(probe(
            move || {
                let mut conn = conn.clone();
                async move {
                    bounded(timeout, async move {
                        redis::cmd("PING").query_async::<String>(&mut conn).await
                    })
                    .await
                    .map(|_| ())
                    .map_err(|e| unreachable(&e))
                }
            },
            store.health.clone(),
            cancel.clone(),
        ));
        store.probe = std::sync::Mutex::new(Some(cancel.drop_guard()));
        Ok(store)
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
        let result = bounded(self.timeout, fut).await;
        if let Err(e @ (StorageError::Timeout(_) | StorageError::RedisUnavailable(_))) = &result {
            self.health.set_down(&unreachable(e));
        }
        result
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

/// The readiness reason for a failed PING or operation.
fn unreachable(e: &StorageError) -> String {
    match e {
        StorageError::Timeout(t) => format!("Redis did not answer within {t:?}"),
        StorageError::RedisUnavailable(e) => format!("Redis unreachable: {e}"),
        other => format!("Redis error: {other}"),
    }
}

/// Checks the store's health every [`PROBE_INTERVAL`] until cancelled:
/// up exactly when the last check passed (or an operation failed since).
/// `check` gives the reason `/ready` shows when it fails: text, since it
/// goes nowhere but [`Health`], whose reasons are sentences for operators.
/// Shared by the Redis backends, which differ only in what they ask.
pub(super) async fn probe<F, Fut>(check: F, health: Health, cancel: CancellationToken)
where
    F: Fn() -> Fut,
    Fut: Future<Output = Result<(), String>>,
{
    let mut tick = tokio::time::interval(PROBE_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tick.tick() => {}
        }
        let result = tokio::select! {
            _ = cancel.cancelled() => return,
            result = check() => result,
        };
        match result {
            Ok(()) => health.set_up(),
            Err(reason) => health.set_down(&reason),
        }
    }
}

/// GET, SET and DEL on any Redis connection, a server's or a cluster's:
/// the backends differ in how they connect, not in what they send.
pub(super) mod ops {
    use redis::aio::ConnectionLike;
    use redis::RedisResult;

    /// The value of `key`, if any.
    pub(crate) async fn get<C: ConnectionLike>(
        mut conn: C,
        key: String,
    ) -> RedisResult<Option<String>> {
        redis::cmd("GET").arg(key).query_async(&mut conn).await
    }

    /// Sets `key` to `value`.
    pub(crate) async fn put<C: ConnectionLike>(
        mut conn: C,
        key: String,
        value: &str,
    ) -> RedisResult<()> {
        redis::cmd("SET")
            .arg(key)
            .arg(value)
            .query_async(&mut conn)
            .await
    }

    /// Deletes `key`; whether it existed.
    pub(crate) async fn delete<C: ConnectionLike>(mut conn: C, key: String) -> RedisResult<bool> {
        let n: i64 = redis::cmd("DEL").arg(key).query_async(&mut conn).await?;
        Ok(n > 0)
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
        StorageError::RedisUnavailable(e)
    } else {
        StorageError::Redis(e)
    }
}

impl Storage for RedisStore {
    fn backend(&self) -> BackendKind {
        BackendKind::Redis
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
        // Nothing buffered: every acknowledged write was already answered by Redis.
        if let Ok(mut probe) = self.probe.lock() {
            probe.take();
        }
    }
}
