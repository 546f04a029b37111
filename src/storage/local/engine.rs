//! What the local store's threads do, and what happens when the disk or the
//! file fails under them.
//!
//! - The writer commits a batch in one durable transaction, and
//!   acknowledges it only if the path still names the file it wrote to.
//! - Readers answer a batch of gets from one read transaction.
//! - A failed commit (a full disk, an I/O error) leaves redb refusing every
//!   later write on that handle, and every read of a page it has not cached
//!   ("Previous I/O error occurred. Please close and re-open the
//!   database."). The store reopens the database at once, so gets go on
//!   reading the file, and retries writes on the new handle: after a full
//!   disk once the filesystem has room again, otherwise with exponential
//!   backoff. Until then puts are refused without touching the disk. The
//!   watchdog probes when no writes come, so readiness recovers on an idle
//!   agent too.
//! - A damaged file, a panic in a storage thread, or the file deleted or
//!   replaced under the agent fail the store for good: reads and writes are
//!   refused (never a wrong value, never a lost acknowledgement) until the
//!   operator restarts the agent.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, RwLock};
use std::time::{Duration, Instant};

use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use tokio::sync::{mpsc, oneshot};

use super::super::{Health, StorageError};
use super::error::DatabaseFault;
use super::file::{self, FileId, Opened};
use super::queue::Reply;
use crate::config::BackendKind;

pub(super) const TABLE: TableDefinition<&str, &str> = TableDefinition::new("kv");
/// Written by write probes only, so user keys are never touched by them.
const PROBE_TABLE: TableDefinition<&str, u64> = TableDefinition::new("agent_write_probe");
/// Wait before the first retry after an I/O error (not a full disk).
const FIRST_RETRY: Duration = Duration::from_millis(100);
/// Longest wait between write retries.
const MAX_RETRY: Duration = Duration::from_secs(5);
/// After a full disk, writes are retried once the filesystem has this much
/// room: less than that is full for practical purposes, and retrying on a
/// still-full disk would only fail again.
pub(super) const MIN_FREE_BYTES: u64 = 1024 * 1024;

/// What a write request asks for.
pub(super) enum WriteOp {
    /// Key and value.
    Put(String, String),
    /// Key.
    Delete(String),
    /// Proves that writes work again; sent by the watchdog while retrying.
    Probe,
}

/// A queued write and where its answer goes.
pub(super) struct WriteRequest {
    pub op: WriteOp,
    /// `true` when a deleted key existed; always `true` for puts.
    pub reply: Reply<bool>,
}

/// A queued get and where its answer goes.
pub(super) struct ReadRequest {
    pub key: String,
    /// The value, or `None` when the key does not exist.
    pub reply: Reply<Option<String>>,
}

/// Whether writes are being accepted.
enum Mode {
    /// Serving reads and writes.
    Up,
    /// Writes failed: refused until a retry succeeds; reads go on.
    Retrying(Retry),
    /// For good: nothing is served until restart.
    Failed,
}

/// Writes failed; when to try again.
struct Retry {
    /// The error that stopped writes.
    cause: Arc<DatabaseFault>,
    /// The filesystem was full: retry only once it has room again.
    no_space: bool,
    /// Not before this.
    at: Instant,
    /// The wait after the next failed attempt.
    backoff: Duration,
    /// The handle must be replaced (redb refuses every write, and every
    /// uncached read, on a handle that met an I/O error): when to try, and
    /// why the last try failed.
    reopen: Option<(Instant, Option<Arc<DatabaseFault>>)>,
}

impl Retry {
    /// Whether to retry writes now (on a handle that needs no reopening).
    fn due(&self, path: &Path) -> bool {
        self.reopen.is_none()
            && Instant::now() >= self.at
            && (!self.no_space || file::free_bytes(path).is_none_or(|b| b >= MIN_FREE_BYTES))
    }

    fn reopen_due(&self) -> bool {
        self.reopen
            .as_ref()
            .is_some_and(|(at, _)| Instant::now() >= *at)
    }

    /// Waits longer after each failed attempt.
    fn back_off(&mut self) -> Instant {
        let at = Instant::now() + self.backoff;
        self.backoff = (self.backoff * 2).min(MAX_RETRY);
        at
    }

    fn reason(&self) -> String {
        if let Some((_, Some(e))) = &self.reopen {
            return format!(
                "local database cannot write ({}) and cannot be reopened ({e}); \
                 reads and writes are refused, retrying with backoff",
                self.cause
            );
        }
        let when = if self.no_space {
            format!(
                "retrying once {} MiB is free on its filesystem",
                MIN_FREE_BYTES / (1024 * 1024)
            )
        } else {
            "retrying with backoff".to_string()
        };
        format!("local database cannot write ({}); {when}", self.cause)
    }
}

/// What went wrong with the database, and what the store does about it.
/// The cause is shared: one fault answers every request of a batch.
#[derive(Clone)]
enum Fault {
    /// The filesystem is full.
    NoSpace(Arc<DatabaseFault>),
    /// Any other failure a reopen may clear (I/O errors in particular).
    Transient(Arc<DatabaseFault>),
    /// The file is damaged: serving from it again could return wrong values.
    Damaged(Arc<DatabaseFault>),
    /// The path no longer names the file the store has open.
    Gone,
}

fn fault(e: impl Into<redb::Error>) -> Fault {
    let e = e.into();
    let kind = match &e {
        redb::Error::Io(io) if io.raw_os_error() == Some(libc::ENOSPC) => Fault::NoSpace,
        redb::Error::Corrupted(_) | redb::Error::LockPoisoned(_) => Fault::Damaged,
        _ => Fault::Transient,
    };
    kind(Arc::new(DatabaseFault::Redb(e)))
}

/// The local store's shared state.
pub(super) struct Engine {
    path: PathBuf,
    /// `storage.local.cache_size`, for reopening.
    cache_size: usize,
    /// The file opened at startup; a reopen must find the same one.
    id: FileId,
    /// Keeps that file's inode from being reused while `id` is compared.
    _anchor: File,
    /// The open database. Readers hold the read lock for a batch; a reopen
    /// takes the write lock. `None` when a reopen failed, or after close.
    db: RwLock<Option<Database>>,
    /// Changed by the writer (and by readers that meet a fault); read by the
    /// watchdog.
    mode: Mutex<Mode>,
    /// `mode` is `Failed`: the readers' check, without the lock.
    failed: AtomicBool,
    /// A probe is queued; the watchdog does not queue another.
    probe_queued: AtomicBool,
    /// What `/ready` and `agent_storage_up` report.
    pub health: Health,
}

impl Engine {
    pub(super) fn new(path: PathBuf, cache_size: usize, opened: Opened) -> Self {
        Self {
            path,
            cache_size,
            id: opened.id,
            _anchor: opened.anchor,
            db: RwLock::new(Some(opened.db)),
            mode: Mutex::new(Mode::Up),
            failed: AtomicBool::new(false),
            probe_queued: AtomicBool::new(false),
            health: Health::new(BackendKind::Local),
        }
    }

    fn mode(&self) -> MutexGuard<'_, Mode> {
        self.mode.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The error for a request the store will not serve now: the reason
    /// `/ready` gives, so the peer and the operator read the same words.
    fn refusal(&self) -> StorageError {
        StorageError::Refused(
            self.health
                .readiness()
                .err()
                .unwrap_or_else(|| DatabaseFault::NotOpen.to_string()),
        )
    }

    /// Commits the batch in one durable transaction and answers it.
    pub(super) fn write_batch(&self, batch: &mut Vec<WriteRequest>) {
        self.probe_queued.store(false, Ordering::Relaxed);
        if matches!(&*self.mode(), Mode::Retrying(r) if r.reopen_due()) {
            self.reopen_now();
        }
        let retrying = match &*self.mode() {
            Mode::Up => false,
            Mode::Retrying(r) if r.due(&self.path) => true,
            Mode::Retrying(_) | Mode::Failed => {
                return answer_writes(batch, || Err(self.refusal()))
            }
        };
        let committed = {
            let db = self.db.read().unwrap_or_else(PoisonError::into_inner);
            match db.as_ref() {
                Some(db) => commit(db, batch),
                None => Err(Fault::Transient(Arc::new(DatabaseFault::NotOpen))),
            }
        };
        match committed {
            // What was committed to a file the path no longer names is lost
            // at restart: it must not be acknowledged.
            Ok(_) if !file::names(&self.path, self.id) => {
                self.on_fault(Fault::Gone);
                answer_writes(batch, || Err(self.refusal()));
            }
            Ok(results) => {
                if retrying {
                    self.recovered();
                }
                let mut results = results.into_iter();
                answer_writes(batch, || Ok(results.next().unwrap_or(true)));
            }
            Err(f) => {
                self.on_fault(f.clone());
                answer_writes(batch, || Err(self.error_for(&f)));
                // At once, so gets are served from a handle that reads the
                // file rather than only what the failed one had cached.
                if matches!(&*self.mode(), Mode::Retrying(r) if r.reopen_due()) {
                    self.reopen_now();
                }
            }
        }
    }

    /// Answers every get in the batch from one read transaction. Each
    /// request was queued before the transaction began, so it sees every
    /// put that was acknowledged before it was sent.
    pub(super) fn read_batch(&self, batch: &mut Vec<ReadRequest>) {
        let refuse = |batch: &mut Vec<ReadRequest>| {
            for req in batch.drain(..) {
                let _ = req.reply.send(Err(self.refusal()));
            }
        };
        if self.failed.load(Ordering::Acquire) {
            return refuse(batch);
        }
        let mut seen: Option<Fault> = None;
        {
            let db = self.db.read().unwrap_or_else(PoisonError::into_inner);
            let Some(db) = db.as_ref() else {
                // Being reopened, and the last attempt failed.
                return refuse(batch);
            };
            let table = db
                .begin_read()
                .map_err(fault)
                .and_then(|txn| txn.open_table(TABLE).map_err(fault));
            // Every answer first, then the replies: should redb panic, no
            // request has left the batch yet, so no caller learns of the
            // panic (and sends the next request) before the store acts on it.
            let results: Vec<_> = batch
                .iter()
                .map(|req| match &table {
                    Ok(table) => table
                        .get(req.key.as_str())
                        .map(|v| v.map(|v| v.value().to_owned()))
                        .map_err(fault),
                    Err(f) => Err(f.clone()),
                })
                .collect();
            for (req, result) in batch.drain(..).zip(results) {
                if let Err(f) = &result {
                    if !matches!(seen, Some(Fault::Damaged(_))) {
                        seen = Some(f.clone());
                    }
                }
                let _ = req.reply.send(result.map_err(|f| self.error_for(&f)));
            }
        }
        match seen {
            Some(f @ Fault::Damaged(_)) => self.on_fault(f),
            // A failed read leaves redb's handle refusing uncached reads and
            // every write: have the writer reopen it, unless it already is.
            Some(f) if matches!(*self.mode(), Mode::Up) => self.on_fault(f),
            _ => {}
        }
    }

    /// The reply to a request that failed with `f`.
    fn error_for(&self, f: &Fault) -> StorageError {
        match f {
            Fault::NoSpace(e) | Fault::Transient(e) | Fault::Damaged(e) => {
                StorageError::Database(Arc::clone(e))
            }
            Fault::Gone => self.refusal(),
        }
    }

    /// A retried write succeeded: writes work again.
    fn recovered(&self) {
        let mut mode = self.mode();
        if matches!(*mode, Mode::Retrying(_)) {
            *mode = Mode::Up;
            drop(mode);
            self.health.set_up();
        }
    }

    /// Records a fault: retry it (on a reopened handle), or fail the store.
    fn on_fault(&self, f: Fault) {
        let (cause, no_space) = match f {
            Fault::Damaged(e) => {
                return self.fail(&format!(
                    "local database file {} is damaged ({e}); reads and writes are refused until restart",
                    self.path.display()
                ))
            }
            Fault::Gone => return self.file_gone(),
            Fault::NoSpace(e) => (e, true),
            Fault::Transient(e) => (e, false),
        };
        let mut mode = self.mode();
        let reason = match &mut *mode {
            Mode::Failed => return,
            Mode::Up => {
                let retry = Retry {
                    cause,
                    no_space,
                    // The free-space check paces the first retry on a full disk.
                    at: Instant::now()
                        + if no_space {
                            Duration::ZERO
                        } else {
                            FIRST_RETRY
                        },
                    backoff: FIRST_RETRY,
                    reopen: Some((Instant::now(), None)),
                };
                let reason = retry.reason();
                *mode = Mode::Retrying(retry);
                reason
            }
            Mode::Retrying(r) => {
                r.at = r.back_off();
                r.cause = cause;
                r.no_space = no_space;
                r.reopen.get_or_insert((Instant::now(), None));
                r.reason()
            }
        };
        drop(mode);
        self.health.set_down(&reason);
    }

    /// Replaces the handle now, recording the outcome.
    fn reopen_now(&self) {
        let result = self.reopen();
        let mut mode = self.mode();
        let Mode::Retrying(r) = &mut *mode else {
            return;
        };
        let reason = match result {
            Ok(()) => {
                r.reopen = None;
                r.reason()
            }
            Err(Fault::Transient(e) | Fault::NoSpace(e)) => {
                r.reopen = Some((r.back_off(), Some(e)));
                r.reason()
            }
            Err(f) => {
                drop(mode);
                return self.on_fault(f);
            }
        };
        drop(mode);
        self.health.set_down(&reason);
    }

    /// Fails the store for good (logged once, by `Health`).
    pub(super) fn fail(&self, reason: &str) {
        *self.mode() = Mode::Failed;
        self.failed.store(true, Ordering::Release);
        self.health.set_failed(reason);
    }

    fn file_gone(&self) {
        self.fail(&format!(
            "local database file {} was deleted or replaced while open; writes are refused \
             since they could not be saved (restart the agent to start a new database)",
            self.path.display()
        ));
    }

    /// A storage thread panicked while serving: the file may be damaged.
    pub(super) fn panicked(&self, thread: &str, message: &str) {
        self.health.record_panic();
        self.fail(&format!(
            "a local database thread ({thread}) panicked: {message}; the database file may be \
             damaged, so reads and writes are refused until restart"
        ));
    }

    /// Replaces the database handle with a freshly opened one. Readers
    /// wait for it (the write lock); without a handle they are refused.
    fn reopen(&self) -> Result<(), Fault> {
        let mut slot = self.db.write().unwrap_or_else(PoisonError::into_inner);
        if let Some(old) = slot.take() {
            close_quietly(old);
        }
        if !file::names(&self.path, self.id) {
            return Err(Fault::Gone);
        }
        match file::open_existing(&self.path, self.cache_size) {
            Ok(opened) if opened.id == self.id => {
                *slot = Some(opened.db);
                Ok(())
            }
            Ok(opened) => {
                close_quietly(opened.db);
                Err(Fault::Gone)
            }
            Err(e) if e.damaged() => Err(Fault::Damaged(Arc::new(DatabaseFault::Reopen(e)))),
            Err(e) => Err(Fault::Transient(Arc::new(DatabaseFault::Reopen(e)))),
        }
    }

    /// The watchdog's periodic check: is the file still there, and is it
    /// time to probe whether writes work again?
    pub(super) fn tick(&self, probes: &mpsc::Sender<WriteRequest>) {
        if self.failed.load(Ordering::Acquire) {
            return;
        }
        if !file::names(&self.path, self.id) {
            return self.file_gone();
        }
        let due = matches!(&*self.mode(), Mode::Retrying(r) if r.reopen_due() || r.due(&self.path));
        if due && !self.probe_queued.swap(true, Ordering::Relaxed) {
            let (reply, _) = oneshot::channel();
            let probe = WriteRequest {
                op: WriteOp::Probe,
                reply,
            };
            if probes.try_send(probe).is_err() {
                // The queue is full of writes, which will retry anyway.
                self.probe_queued.store(false, Ordering::Relaxed);
            }
        }
    }

    /// Closes the database (at shutdown).
    pub(super) fn close(&self) {
        let db = self
            .db
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        if let Some(db) = db {
            close_quietly(db);
        }
    }
}

/// Drops a handle; a handle redb panicked in may panic again on the way out.
fn close_quietly(db: Database) {
    let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(move || drop(db)));
}

fn answer_writes(
    batch: &mut Vec<WriteRequest>,
    mut result: impl FnMut() -> Result<bool, StorageError>,
) {
    for req in batch.drain(..) {
        let _ = req.reply.send(result());
    }
}

fn commit(db: &Database, batch: &[WriteRequest]) -> Result<Vec<bool>, Fault> {
    let txn = db.begin_write().map_err(fault)?;
    let mut results = Vec::with_capacity(batch.len());
    {
        let mut table = txn.open_table(TABLE).map_err(fault)?;
        for req in batch {
            let res = match &req.op {
                WriteOp::Put(k, v) => {
                    table.insert(k.as_str(), v.as_str()).map_err(fault)?;
                    true
                }
                WriteOp::Delete(k) => table.remove(k.as_str()).map_err(fault)?.is_some(),
                WriteOp::Probe => {
                    // A real page write: an empty commit could succeed on a full disk.
                    let mut probe = txn.open_table(PROBE_TABLE).map_err(fault)?;
                    let n = probe.get("probes").map_err(fault)?.map_or(0, |v| v.value());
                    probe.insert("probes", n + 1).map_err(fault)?;
                    true
                }
            };
            results.push(res);
        }
    }
    txn.commit().map_err(fault)?;
    Ok(results)
}

#[cfg(test)]
mod tests {
    use super::super::error::FileError;
    use super::*;

    fn cause(f: &Fault) -> &DatabaseFault {
        match f {
            Fault::NoSpace(e) | Fault::Transient(e) | Fault::Damaged(e) => e,
            Fault::Gone => panic!("no cause"),
        }
    }

    /// redb's errors are sorted into what the store does about them, and
    /// the cause reads as redb's own text, as it did when it was a string.
    #[test]
    fn faults_keep_redb_errors_and_their_text() {
        let full = std::io::Error::from_raw_os_error(libc::ENOSPC);
        let before = format!("I/O error: {full}");
        let f = fault(redb::Error::Io(full));
        assert!(matches!(f, Fault::NoSpace(_)));
        assert_eq!(cause(&f).to_string(), before);
        assert!(matches!(
            cause(&f),
            DatabaseFault::Redb(redb::Error::Io(e)) if e.raw_os_error() == Some(libc::ENOSPC)
        ));

        let f = fault(redb::StorageError::Corrupted("bad page".into()));
        assert!(matches!(f, Fault::Damaged(_)));
        assert_eq!(cause(&f).to_string(), "DB corrupted: bad page");

        let f = fault(redb::Error::PreviousIo);
        assert!(matches!(f, Fault::Transient(_)));
        assert_eq!(
            cause(&f).to_string(),
            "Previous I/O error occurred. Please close and re-open the database."
        );
    }

    /// The `/ready` reasons built from typed causes read as before.
    #[test]
    fn retry_reasons_quote_the_causes() {
        let full = std::io::Error::from_raw_os_error(libc::ENOSPC);
        let Fault::NoSpace(cause) = fault(redb::Error::Io(full)) else {
            panic!("not a full disk");
        };
        let mut retry = Retry {
            cause,
            no_space: true,
            at: Instant::now(),
            backoff: FIRST_RETRY,
            reopen: None,
        };
        assert_eq!(
            retry.reason(),
            "local database cannot write (I/O error: No space left on device (os error 28)); \
             retrying once 1 MiB is free on its filesystem"
        );
        let denied = std::io::Error::from_raw_os_error(libc::EACCES);
        retry.reopen = Some((
            Instant::now(),
            Some(Arc::new(DatabaseFault::Reopen(FileError::Open(denied)))),
        ));
        assert_eq!(
            retry.reason(),
            "local database cannot write (I/O error: No space left on device (os error 28)) \
             and cannot be reopened (cannot be opened: Permission denied (os error 13)); \
             reads and writes are refused, retrying with backoff"
        );
    }
}
