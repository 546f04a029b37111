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
//!   per message, see docs/performance.md).

mod file;

use std::path::Path;
use std::sync::{Arc, Mutex};

use redb::{Database, ReadableDatabase, TableDefinition};
use tokio::sync::{mpsc, oneshot};

use super::{Health, Storage, StorageError};
use crate::config::BackendKind;

const TABLE: TableDefinition<&str, &str> = TableDefinition::new("kv");
/// Requests queued beyond this make callers wait: back-pressure, not memory growth.
const QUEUE: usize = 4096;
/// Most requests taken as one batch.
const MAX_BATCH: usize = 1024;
/// Reader threads: reads run in parallel, and a slow disk read does not hold up every other one.
const READERS: usize = 2;

enum WriteOp {
    Put(String, String),
    Delete(String),
}

/// Where a queued request's answer goes.
type Reply<T> = oneshot::Sender<Result<T, StorageError>>;

struct WriteRequest {
    op: WriteOp,
    /// `true` when a deleted key existed; always `true` for puts.
    reply: Reply<bool>,
}

struct ReadRequest {
    key: String,
    reply: Reply<Option<String>>,
}

/// A bounded queue served by dedicated threads, each taking what has queued
/// up as one batch. Closing lets the threads drain the queue and exit.
struct BatchQueue<R> {
    tx: Mutex<Option<mpsc::Sender<R>>>,
    threads: Mutex<Vec<std::thread::JoinHandle<()>>>,
}

impl<R: Send + 'static> BatchQueue<R> {
    fn start(
        name: &str,
        threads: usize,
        serve: impl Fn(&mut Vec<R>) + Send + Sync + 'static,
    ) -> Result<Self, StorageError> {
        let (tx, rx) = mpsc::channel(QUEUE);
        let rx = Arc::new(Mutex::new(rx));
        let serve = Arc::new(serve);
        let mut handles = Vec::with_capacity(threads);
        for n in 0..threads {
            let (rx, serve) = (Arc::clone(&rx), Arc::clone(&serve));
            let handle = std::thread::Builder::new()
                .name(format!("{name}-{n}"))
                .spawn(move || {
                    let mut batch = Vec::with_capacity(MAX_BATCH);
                    while next_batch(&rx, &mut batch) {
                        serve(&mut batch);
                        batch.clear();
                    }
                })
                .map_err(backend_err)?;
            handles.push(handle);
        }
        Ok(Self {
            tx: Mutex::new(Some(tx)),
            threads: Mutex::new(handles),
        })
    }

    /// Queues the request built around a reply channel and waits for its answer.
    async fn call<T>(&self, request: impl FnOnce(Reply<T>) -> R) -> Result<T, StorageError> {
        let stopped = || StorageError::Unavailable("database is closed".into());
        let tx = self
            .tx
            .lock()
            .map_err(backend_err)?
            .clone()
            .ok_or_else(stopped)?;
        let (reply, answer) = oneshot::channel();
        tx.send(request(reply)).await.map_err(|_| stopped())?;
        answer.await.map_err(|_| stopped())?
    }

    async fn close(&self) {
        if let Ok(mut tx) = self.tx.lock() {
            tx.take();
        }
        let handles = self
            .threads
            .lock()
            .map(|mut h| std::mem::take(&mut *h))
            .unwrap_or_default();
        let _ = tokio::task::spawn_blocking(move || {
            for h in handles {
                let _ = h.join();
            }
        })
        .await;
    }
}

/// Waits for a request, then takes whatever else is queued. False once the
/// queue is closed and empty.
fn next_batch<R>(rx: &Mutex<mpsc::Receiver<R>>, batch: &mut Vec<R>) -> bool {
    let Ok(mut rx) = rx.lock() else {
        return false;
    };
    let Some(first) = rx.blocking_recv() else {
        return false;
    };
    batch.push(first);
    while batch.len() < MAX_BATCH {
        match rx.try_recv() {
            Ok(req) => batch.push(req),
            Err(_) => break,
        }
    }
    true
}

/// Handle to the local database; cheap to share.
pub struct LocalStore {
    writes: BatchQueue<WriteRequest>,
    reads: BatchQueue<ReadRequest>,
    health: Health,
}

fn backend_err(e: impl std::fmt::Display) -> StorageError {
    StorageError::Backend(e.to_string())
}

impl LocalStore {
    /// Opens the database at `path`, or creates it (and its parent
    /// directories) when nothing exists there. An empty or foreign file is
    /// refused, never replaced.
    pub async fn open(path: &Path) -> Result<Self, StorageError> {
        let path = path.to_path_buf();
        let db = tokio::task::spawn_blocking(move || file::open_or_create(&path, TABLE))
            .await
            .map_err(|e| StorageError::Open(format!("opening the database failed: {e}")))??;
        let db = Arc::new(db);
        let writer_db = Arc::clone(&db);
        let writes = BatchQueue::start("agent-db-writer", 1, move |batch| {
            write_batch(&writer_db, batch)
        })?;
        let reads = BatchQueue::start("agent-db-reader", READERS, move |batch| {
            read_batch(&db, batch)
        })?;
        Ok(Self {
            writes,
            reads,
            health: Health::new(BackendKind::Local),
        })
    }
}

fn write_batch(db: &Database, batch: &mut Vec<WriteRequest>) {
    match commit_batch(db, batch) {
        Ok(results) => {
            for (req, res) in batch.drain(..).zip(results) {
                let _ = req.reply.send(Ok(res));
            }
        }
        Err(e) => {
            tracing::error!(error = %e, "local database commit failed");
            for req in batch.drain(..) {
                let _ = req.reply.send(Err(StorageError::Backend(e.clone())));
            }
        }
    }
}

/// Answers every get in the batch from one read transaction. Each request
/// was queued before the transaction began, so it sees every put that was
/// acknowledged before it was sent.
fn read_batch(db: &Database, batch: &mut Vec<ReadRequest>) {
    let table = db
        .begin_read()
        .map_err(|e| e.to_string())
        .and_then(|txn| txn.open_table(TABLE).map_err(|e| e.to_string()));
    for req in batch.drain(..) {
        let result = match &table {
            Ok(table) => table
                .get(req.key.as_str())
                .map(|v| v.map(|v| v.value().to_owned()))
                .map_err(backend_err),
            Err(e) => Err(StorageError::Backend(e.clone())),
        };
        let _ = req.reply.send(result);
    }
}

fn commit_batch(db: &Database, batch: &[WriteRequest]) -> Result<Vec<bool>, String> {
    let txn = db.begin_write().map_err(|e| e.to_string())?;
    let mut results = Vec::with_capacity(batch.len());
    {
        let mut table = txn.open_table(TABLE).map_err(|e| e.to_string())?;
        for req in batch {
            let res = match &req.op {
                WriteOp::Put(k, v) => {
                    table
                        .insert(k.as_str(), v.as_str())
                        .map_err(|e| e.to_string())?;
                    true
                }
                WriteOp::Delete(k) => table
                    .remove(k.as_str())
                    .map_err(|e| e.to_string())?
                    .is_some(),
            };
            results.push(res);
        }
    }
    txn.commit().map_err(|e| e.to_string())?;
    Ok(results)
}

impl Storage for LocalStore {
    fn backend(&self) -> BackendKind {
        BackendKind::Local
    }

    fn health(&self) -> &Health {
        &self.health
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
        // Queued requests are still served; then the threads exit.
        self.writes.close().await;
        self.reads.close().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn put_get_delete_and_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("nested/dir/agent.db");
        let store = LocalStore::open(&path).await.unwrap();
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

        let store = LocalStore::open(&path).await.unwrap();
        assert_eq!(store.get("k").await.unwrap().as_deref(), Some("v2"));
        assert_eq!(store.get("gone").await.unwrap(), None);
        store.close().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_writers_share_commits() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(LocalStore::open(&dir.path().join("a.db")).await.unwrap());
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
}
