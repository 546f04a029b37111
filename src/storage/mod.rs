//! Key-value storage behind one async trait, with three backends and one
//! instrumentation wrapper.
//!
//! The agent holds an `Instrumented<AnyBackend>`: the wrapper records the
//! storage metrics for whatever backend it wraps, so a new backend is
//! measured the same way without a line of metrics code of its own. Each
//! backend keeps a [`Health`]: whether it can serve right now, which
//! `/ready` and `agent_storage_up` report.

mod health;
mod instrumented;
mod local;
mod redis;
mod redis_cluster;

use std::future::Future;
use std::sync::Arc;

pub use self::health::{Health, HealthObserver};
pub use self::instrumented::Instrumented;
pub use self::local::{DatabaseFault, FileError, LocalStore, OpenError};
pub use self::redis::RedisStore;
pub use self::redis_cluster::RedisClusterStore;

use crate::config::{BackendKind, Resolved, StorageConfig};

/// Why a storage operation failed. The text is sent to the peer.
#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    /// The backend did not answer in time (Redis).
    #[error("storage timed out after {0:?}")]
    Timeout(std::time::Duration),
    /// Redis, or the cluster node serving the key, could not be reached, or
    /// the cluster has no master for the key (failing over).
    #[error("storage unavailable: {0}")]
    RedisUnavailable(#[source] ::redis::RedisError),
    /// Redis answered the command with an error.
    #[error("storage failed: {0}")]
    Redis(#[source] ::redis::RedisError),
    /// The Redis URL or cluster nodes could not make a client (startup).
    #[error("storage unavailable: bad Redis URL: {0}")]
    RedisConfig(#[source] ::redis::RedisError),
    /// The local store refuses requests for now; the reason is the one
    /// `/ready` gives (a full disk, a deleted or damaged file). Text, not a
    /// typed cause: it is the sentence [`Health`] holds for operators,
    /// composed from whatever put the store down (a write error and a
    /// failed reopen together, a panicked thread, a deleted file), and the
    /// peer is told exactly that sentence. The request that met a database
    /// error got it typed, as [`StorageError::Database`].
    #[error("storage unavailable: {0}")]
    Refused(String),
    /// The local database failed this operation. Shared, as one failure
    /// answers every request of its batch; so the error's `source()` is the
    /// `Arc<DatabaseFault>` (whose own `source()` is redb's error).
    #[error("storage failed: {0}")]
    Database(#[source] Arc<DatabaseFault>),
    /// The local store's threads have stopped (the agent is shutting down).
    #[error("storage unavailable: database is closed")]
    Closed,
    /// The local storage thread serving this request panicked.
    #[error("storage failed: the storage thread serving this request panicked")]
    Panicked,
    /// The local store could not be opened at startup; the text names the
    /// file and the cause, and is the whole line the operator sees.
    #[error("{0}")]
    Open(#[from] OpenError),
}

/// An async key-value store. Keys are 1 to 1024 bytes of UTF-8 (the protocol
/// checks that), values are UTF-8 strings.
pub trait Storage: Send + Sync + 'static {
    /// The `backend` metric label.
    fn backend(&self) -> BackendKind;
    /// Whether the store can serve right now.
    fn health(&self) -> &Health;
    /// The key's value; None when it is absent.
    fn get(&self, key: &str) -> impl Future<Output = Result<Option<String>, StorageError>> + Send;
    /// Stores the value, replacing any; returns once it is as durable as the backend makes it.
    fn put(&self, key: &str, value: &str) -> impl Future<Output = Result<(), StorageError>> + Send;
    /// Returns whether the key existed.
    fn delete(&self, key: &str) -> impl Future<Output = Result<bool, StorageError>> + Send;
    /// Flushes and releases the backend; called once at shutdown.
    fn close(&self) -> impl Future<Output = ()> + Send;
}

/// The backend chosen by `storage.backend`, as one concrete type so the hot
/// path needs no dynamic dispatch or boxed futures.
pub enum AnyBackend {
    /// `backend: local`: a redb file.
    Local(LocalStore),
    /// `backend: redis`: one Redis server.
    Redis(RedisStore),
    /// `backend: redis_cluster`: a Redis Cluster.
    RedisCluster(RedisClusterStore),
}

impl AnyBackend {
    /// Opens the configured backend. A local database that cannot be opened
    /// (or an empty or foreign file in its place) is fatal; an unreachable
    /// Redis or Redis Cluster is not (it is retried per operation). The
    /// Redis URLs come from `resolved`, with their passwords applied.
    pub async fn open(cfg: &StorageConfig, resolved: &Resolved) -> Result<Self, StorageError> {
        match cfg.backend {
            BackendKind::Local => Ok(AnyBackend::Local(
                LocalStore::open(&cfg.local.path, cfg.local.cache_size).await?,
            )),
            BackendKind::Redis => Ok(AnyBackend::Redis(
                RedisStore::open(&cfg.redis, &resolved.redis_url).await?,
            )),
            BackendKind::RedisCluster => Ok(AnyBackend::RedisCluster(
                RedisClusterStore::open(&cfg.redis_cluster, &resolved.redis_cluster_nodes).await?,
            )),
        }
    }
}

impl Storage for AnyBackend {
    fn backend(&self) -> BackendKind {
        match self {
            AnyBackend::Local(s) => s.backend(),
            AnyBackend::Redis(s) => s.backend(),
            AnyBackend::RedisCluster(s) => s.backend(),
        }
    }

    fn health(&self) -> &Health {
        match self {
            AnyBackend::RedisCluster(s) => s.health(),
            AnyBackend::Local(s) => s.health(),
            AnyBackend::Redis(s) => s.health(),
        }
    }

    async fn get(&self, key: &str) -> Result<Option<String>, StorageError> {
        match self {
            AnyBackend::Local(s) => s.get(key).await,
            AnyBackend::Redis(s) => s.get(key).await,
            AnyBackend::RedisCluster(s) => s.get(key).await,
        }
    }

    async fn put(&self, key: &str, value: &str) -> Result<(), StorageError> {
        match self {
            AnyBackend::Local(s) => s.put(key, value).await,
            AnyBackend::Redis(s) => s.put(key, value).await,
            AnyBackend::RedisCluster(s) => s.put(key, value).await,
        }
    }

    async fn delete(&self, key: &str) -> Result<bool, StorageError> {
        match self {
            AnyBackend::Local(s) => s.delete(key).await,
            AnyBackend::Redis(s) => s.delete(key).await,
            AnyBackend::RedisCluster(s) => s.delete(key).await,
        }
    }

    async fn close(&self) {
        match self {
            AnyBackend::Local(s) => s.close().await,
            AnyBackend::Redis(s) => s.close().await,
            AnyBackend::RedisCluster(s) => s.close().await,
        }
    }
}
