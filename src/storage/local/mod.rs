//! The `local` backend: one redb database file.
//!
//! All database work runs on dedicated threads, so disk I/O never stalls the
//! async runtime, and each thread takes whatever has queued up as one batch:
//! - one writer commits a batch in one durable transaction (group commit):
//!   each acknowledged put is on disk before its reply, yet many peers
//!   writing at once share one fsync instead of queueing for one each;
//! - a few readers answer a batch of gets from one read transaction. Under
//!   load a batch costs one thread wake-up instead of one per get, which is
//!   what handing each get to tokio's blocking pool cost (most of the CPU
//!   per message; docs/performance-history.md, "Reader threads");
//! - a watchdog checks that the file is still there and probes whether
//!   writes work again after a failure.
//!
//! How faults are handled (full disk, I/O errors, damaged or deleted file,
//! panics) is described in [`engine`].

mod engine;
mod error;
mod file;
mod queue;
mod watch;

use std::path::Path;
use std::sync::{Arc, Mutex, PoisonError};

pub use self::error::{DatabaseFault, FileError, OpenError};

use self::engine::{Engine, ReadRequest, WriteOp, WriteRequest, TABLE};
use self::queue::BatchQueue;
use self::watch::Watchdog;
use super::{Health, Storage, StorageError};
use crate::config::BackendKind;

/// Reader threads: reads run in parallel, and a slow disk read does not hold up every other one.
const READERS: usize = 2;

/// Handle to the local database; cheap to share.
pub struct LocalStore {
    /// State shared with the threads.
    engine: Arc<Engine>,
    /// One writer thread: group commits.
    writes: BatchQueue<WriteRequest>,
    /// [`READERS`] reader threads: batched gets.
    reads: BatchQueue<ReadRequest>,
    /// Stopped first at close, since it holds a sender to `writes`.
    watchdog: Mutex<Watchdog>,
}

impl LocalStore {
    /// Opens the database at `path`, or creates it (and its parent
    /// directories) when nothing exists there. An empty or foreign file is
    /// refused, never replaced. redb keeps at most `cache_size` bytes of
    /// pages in memory (`storage.local.cache_size`).
    pub async fn open(path: &Path, cache_size: usize) -> Result<Self, StorageError> {
        let path = path.to_path_buf();
        let engine = tokio::task::spawn_blocking(move || {
            let opened = file::open_or_create(&path, TABLE, cache_size)?;
            Ok::<_, OpenError>(Engine::new(path, cache_size, opened))
        })
        .await
        .map_err(OpenError::OpenTask)??;
        let engine = Arc::new(engine);
        let on_panic = |engine: &Arc<Engine>| {
            let engine = Arc::clone(engine);
            move |thread: &str, message: &str| engine.panicked(thread, message)
        };
        let writer = Arc::clone(&engine);
        let writes = BatchQueue::start(
            "agent-db-writer",
            1,
            move |batch| writer.write_batch(batch),
            on_panic(&engine),
        )?;
        let reader = Arc::clone(&engine);
        let reads = BatchQueue::start(
            "agent-db-reader",
            READERS,
            move |batch| reader.read_batch(batch),
            on_panic(&engine),
        )?;
        let probes = writes.sender().ok_or(OpenError::WriterStopped)?;
        let watchdog = Watchdog::start(Arc::clone(&engine), probes)?;
        Ok(Self {
            engine,
            writes,
            reads,
            watchdog: Mutex::new(watchdog),
        })
    }
}

impl Storage for LocalStore {
    fn backend(&self) -> BackendKind {
        BackendKind::Local
    }

    fn health(&self) -> &Health {
        &self.engine.health
    }

    async fn get(&self, key: &str) -> Result<Option<String>, StorageError> {
        let key = key.to_owned();
        self.reads.call(|reply| ReadRequest { key, reply }).await
    }

    async fn put(&self, key: &str, value: &str) -> Result<(), StorageError> {
        let op = WriteOp::Put(key.to_owned(), value.to_owned());
        self.writes
            .call(|reply| WriteRequest { op, reply })
            .await
            .map(|_| ())
    }

    async fn delete(&self, key: &str) -> Result<bool, StorageError> {
        let op = WriteOp::Delete(key.to_owned());
        self.writes.call(|reply| WriteRequest { op, reply }).await
    }

    async fn close(&self) {
        // The watchdog holds a sender to the writer's queue: stop it first,
        // so the writer can drain and exit.
        let watchdog = self
            .watchdog
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .stop();
        if let Some(thread) = watchdog {
            let _ = tokio::task::spawn_blocking(move || thread.join()).await;
        }
        // Queued requests are still served; then the threads exit.
        self.writes.close().await;
        self.reads.close().await;
        let engine = Arc::clone(&self.engine);
        let _ = tokio::task::spawn_blocking(move || engine.close()).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::DEFAULT_CACHE_SIZE;

    #[tokio::test]
    async fn put_get_delete_and_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("nested/dir/agent.db");
        let store = LocalStore::open(&path, DEFAULT_CACHE_SIZE).await.unwrap();
        assert_eq!(store.get("k").await.unwrap(), None);
        store.put("k", "v1").await.unwrap();
        store.put("k", "v2").await.unwrap();
        assert_eq!(store.get("k").await.unwrap().as_deref(), Some("v2"));
        store.put("gone", "x").await.unwrap();
        assert!(store.delete("gone").await.unwrap());
        assert!(!store.delete("gone").await.unwrap());
        store.close().await;
        assert!(
            store.put("k", "v3").await.is_err(),
            "closed store refuses writes"
        );
        drop(store);

        let store = LocalStore::open(&path, DEFAULT_CACHE_SIZE).await.unwrap();
        assert_eq!(store.get("k").await.unwrap().as_deref(), Some("v2"));
        assert_eq!(store.get("gone").await.unwrap(), None);
        store.close().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_writers_share_commits() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(
            LocalStore::open(&dir.path().join("a.db"), DEFAULT_CACHE_SIZE)
                .await
                .unwrap(),
        );
        let mut tasks = Vec::new();
        for t in 0..8 {
            let store = Arc::clone(&store);
            tasks.push(tokio::spawn(async move {
                for i in 0..50 {
                    store
                        .put(&format!("{t}-{i}"), &i.to_string())
                        .await
                        .unwrap();
                }
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
        for t in 0..8 {
            for i in 0..50 {
                assert_eq!(
                    store.get(&format!("{t}-{i}")).await.unwrap(),
                    Some(i.to_string())
                );
            }
        }
        store.close().await;
    }

    #[tokio::test]
    async fn a_put_into_a_deleted_file_is_refused_not_acknowledged() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.db");
        let store = LocalStore::open(&path, DEFAULT_CACHE_SIZE).await.unwrap();
        store.put("k", "v").await.unwrap();
        assert_eq!(store.health().readiness(), Ok(()));
        std::fs::remove_file(&path).unwrap();
        let err = store.put("k2", "v").await.unwrap_err().to_string();
        assert!(err.contains("was deleted or replaced while open"), "{err}");
        let reason = store.health().readiness().unwrap_err();
        assert!(reason.contains("a.db"), "{reason}");
        assert!(store.get("k").await.is_err(), "reads refused too");
        store.close().await;
        assert!(!path.exists());
    }
}
