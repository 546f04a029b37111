//! The `local` backend: one redb database file.
//!
//! Writes go through a single writer thread that commits whatever has queued
//! up in one durable transaction (group commit): each acknowledged put is on
//! disk before its reply, yet many peers writing at once share one fsync
//! instead of queueing for one each. Reads run on tokio's blocking pool, so
//! disk I/O never stalls the async runtime.

use std::path::Path;
use std::sync::{Arc, Mutex};

use redb::{Database, ReadableDatabase, TableDefinition};
use tokio::sync::{mpsc, oneshot};

use super::{Storage, StorageError};
use crate::config::BackendKind;

const TABLE: TableDefinition<&str, &str> = TableDefinition::new("kv");
/// Writes queued beyond this make writers wait: back-pressure, not memory growth.
const WRITE_QUEUE: usize = 4096;
/// Most writes folded into one transaction.
const MAX_BATCH: usize = 1024;

enum WriteOp {
    Put(String, String),
    Delete(String),
}

struct WriteRequest {
    op: WriteOp,
    /// `true` when a deleted key existed; always `true` for puts.
    reply: oneshot::Sender<Result<bool, StorageError>>,
}

/// Handle to the local database; cheap to share.
pub struct LocalStore {
    db: Arc<Database>,
    writes: Mutex<Option<mpsc::Sender<WriteRequest>>>,
    writer: Mutex<Option<std::thread::JoinHandle<()>>>,
}

fn backend_err(e: impl std::fmt::Display) -> StorageError {
    StorageError::Backend(e.to_string())
}

impl LocalStore {
    /// Opens (or creates) the database at `path`, creating parent directories.
    pub async fn open(path: &Path) -> Result<Self, StorageError> {
        let path = path.to_path_buf();
        let db = tokio::task::spawn_blocking(move || -> Result<Database, StorageError> {
            if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
                std::fs::create_dir_all(parent).map_err(|e| {
                    StorageError::Unavailable(format!("cannot create {}: {e}", parent.display()))
                })?;
            }
            let db = Database::create(&path).map_err(|e| {
                StorageError::Unavailable(format!("cannot open {}: {e}", path.display()))
            })?;
            // Create the table up front so readers never see it missing.
            let txn = db.begin_write().map_err(backend_err)?;
            txn.open_table(TABLE).map_err(backend_err)?;
            txn.commit().map_err(backend_err)?;
            Ok(db)
        })
        .await
        .map_err(backend_err)??;
        let db = Arc::new(db);
        let (tx, rx) = mpsc::channel(WRITE_QUEUE);
        let writer_db = Arc::clone(&db);
        let writer = std::thread::Builder::new()
            .name("agent-db-writer".into())
            .spawn(move || writer_loop(&writer_db, rx))
            .map_err(backend_err)?;
        Ok(Self {
            db,
            writes: Mutex::new(Some(tx)),
            writer: Mutex::new(Some(writer)),
        })
    }

    async fn write(&self, op: WriteOp) -> Result<bool, StorageError> {
        let sender = self
            .writes
            .lock()
            .map_err(backend_err)?
            .clone()
            .ok_or_else(|| StorageError::Unavailable("database is closed".into()))?;
        let (reply, rx) = oneshot::channel();
        sender
            .send(WriteRequest { op, reply })
            .await
            .map_err(|_| StorageError::Unavailable("database writer stopped".into()))?;
        rx.await
            .map_err(|_| StorageError::Unavailable("database writer stopped".into()))?
    }
}

fn writer_loop(db: &Database, mut rx: mpsc::Receiver<WriteRequest>) {
    let mut batch = Vec::with_capacity(MAX_BATCH);
    while let Some(first) = rx.blocking_recv() {
        batch.push(first);
        while batch.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(req) => batch.push(req),
                Err(_) => break,
            }
        }
        match commit_batch(db, &batch) {
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

    async fn get(&self, key: &str) -> Result<Option<String>, StorageError> {
        let db = Arc::clone(&self.db);
        let key = key.to_owned();
        tokio::task::spawn_blocking(move || {
            let txn = db.begin_read().map_err(backend_err)?;
            let table = txn.open_table(TABLE).map_err(backend_err)?;
            let value = redb::ReadableTable::get(&table, key.as_str()).map_err(backend_err)?;
            Ok(value.map(|v| v.value().to_owned()))
        })
        .await
        .map_err(backend_err)?
    }

    async fn put(&self, key: &str, value: &str) -> Result<(), StorageError> {
        self.write(WriteOp::Put(key.to_owned(), value.to_owned()))
            .await
            .map(|_| ())
    }

    async fn delete(&self, key: &str) -> Result<bool, StorageError> {
        self.write(WriteOp::Delete(key.to_owned())).await
    }

    async fn close(&self) {
        // Dropping the sender ends the writer once the queue is drained.
        if let Ok(mut w) = self.writes.lock() {
            w.take();
        }
        let handle = self.writer.lock().ok().and_then(|mut h| h.take());
        if let Some(handle) = handle {
            let _ = tokio::task::spawn_blocking(move || handle.join()).await;
        }
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
