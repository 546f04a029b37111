//! The local store's typed errors: why it could not be opened, and why the
//! database failed an operation.
//!
//! Their Display is the text operators and peers have always seen (the
//! startup line, the `storage failed: ...` reply, the `/ready` reason):
//! the types add the cause, not new wording.

use std::io;
use std::path::PathBuf;

/// Why the local store could not be opened at startup. Its Display is the
/// whole line the operator sees after `agent: cannot open storage: `.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    /// Opening or creating the database file failed.
    #[error("database file {}: {error}", path.display())]
    File {
        /// `storage.local.path`.
        path: PathBuf,
        /// The step that failed.
        #[source]
        error: FileError,
    },
    /// The directory to create a new database in could not be created.
    #[error("cannot create {}: {source}", dir.display())]
    CreateDir {
        /// The database file's parent directory.
        dir: PathBuf,
        /// Why `create_dir_all` failed.
        source: io::Error,
    },
    /// The blocking task opening the file did not finish: it panicked
    /// outside the panics the file code catches, or the runtime is
    /// shutting down.
    #[error("opening the database failed: {0}")]
    OpenTask(#[source] tokio::task::JoinError),
    /// A writer or reader thread could not be started.
    #[error("cannot start {name} thread: {source}")]
    Thread {
        /// The thread's name without its number (`agent-db-writer`).
        name: &'static str,
        /// Why the OS refused the thread.
        source: io::Error,
    },
    /// The watchdog thread could not be started.
    #[error("cannot start the database watchdog: {0}")]
    Watchdog(#[source] io::Error),
    /// The writer's queue was closed before the watchdog could be given a
    /// sender to it.
    #[error("the database writer stopped at once")]
    WriterStopped,
}

/// Why the database file could not be opened (at startup, or when the
/// store reopens it after a failed write). Its Display completes
/// `database file <path>: ` (lowercase, no path), which is how the reopen
/// reasons in `/ready` quote it.
#[derive(Debug, thiserror::Error)]
pub enum FileError {
    /// Something other than a regular file is at the path.
    #[error("is not a regular file")]
    NotRegularFile,
    /// A 0-byte file is at the path: never reinitialised, since that would
    /// silently start an empty store in place of lost data.
    #[error(
        "is empty, not a redb database; refusing to start with an empty store \
         (a new database is created only where no file exists: move the file away to start afresh)"
    )]
    Empty,
    /// Looking at the path failed for a reason other than nothing being there.
    #[error("{0}")]
    PathMetadata(#[source] io::Error),
    /// The file could not be opened for the store's own descriptor on it.
    #[error("cannot be opened: {0}")]
    Open(#[source] io::Error),
    /// The opened file's metadata could not be read.
    #[error("cannot be read: {0}")]
    FileMetadata(#[source] io::Error),
    /// Another process holds redb's lock on the file.
    #[error("is already open in another process (another agent on the same storage.local.path?)")]
    AlreadyOpen,
    /// The file is not a redb database; it is left as it is.
    #[error(
        "is not a redb database ({}); refusing to start, the file is left as it is",
        not_redb_detail(.0)
    )]
    NotRedb(#[source] io::Error),
    /// redb found the file damaged while opening it.
    #[error("is damaged: {}", corruption(.0))]
    Corrupted(#[source] redb::StorageError),
    /// redb panicked while opening the file, which a damaged file causes.
    #[error("is damaged: opening it panicked ({message})")]
    Panicked {
        /// The panic's message: a panic carries text, not an error value.
        message: String,
    },
    /// redb refused to open the file for another reason.
    #[error("cannot be opened: {0}")]
    Redb(#[source] redb::DatabaseError),
    /// The path named another file by the time redb opened it.
    #[error("was replaced while it was being opened")]
    Replaced,
    /// Building the new database under its temporary name failed.
    #[error("cannot be created: {0}")]
    Create(#[source] redb::Error),
    /// The new database could not be moved to the path (neither linked nor
    /// renamed; the rename's error is the one kept).
    #[error("cannot be created: {0}")]
    MoveIntoPlace(#[source] io::Error),
    /// Creating the table up front (so readers never see it missing) failed.
    #[error("{0}")]
    CreateTable(#[source] redb::Error),
}

impl FileError {
    /// Whether the file itself is damaged, so that opening it again would
    /// not help.
    pub fn damaged(&self) -> bool {
        matches!(self, FileError::Corrupted(_) | FileError::Panicked { .. })
    }
}

/// What redb says about a file that is not a database, without its
/// "Not a redb database: " prefix (the message already says so).
fn not_redb_detail(e: &io::Error) -> String {
    let e = e.to_string();
    match e.strip_prefix("Not a redb database: ") {
        Some(detail) => detail.to_string(),
        None => e,
    }
}

/// redb's description of the damage, without its "DB corrupted: " prefix
/// (the message already says "is damaged").
fn corruption(e: &redb::StorageError) -> &dyn std::fmt::Display {
    match e {
        redb::StorageError::Corrupted(detail) => detail,
        other => other,
    }
}

/// Why the local database failed an operation. One failure answers every
/// request of its batch, so it is shared behind an `Arc`
/// ([`StorageError::Database`](super::super::StorageError::Database)).
#[derive(Debug, thiserror::Error)]
pub enum DatabaseFault {
    /// redb failed the operation (an I/O error, a full disk, a damaged file).
    #[error("{0}")]
    Redb(#[source] redb::Error),
    /// The handle was closed after an earlier failure, and opening the file
    /// again failed.
    #[error("{0}")]
    Reopen(#[source] FileError),
    /// There is no handle: the last reopen failed, or the store was closed.
    #[error("local database is not open")]
    NotOpen,
}

#[cfg(test)]
mod tests {
    use std::error::Error as _;
    use std::path::Path;
    use std::sync::Arc;

    use super::*;
    use crate::storage::StorageError;

    fn file(error: FileError) -> StorageError {
        StorageError::Open(OpenError::File {
            path: Path::new("/var/lib/agent/agent.db").to_path_buf(),
            error,
        })
    }

    /// The startup lines are the ones the operator has always seen.
    #[test]
    fn open_errors_read_as_before() {
        assert_eq!(
            file(FileError::NotRegularFile).to_string(),
            "database file /var/lib/agent/agent.db: is not a regular file"
        );
        assert_eq!(
            file(FileError::AlreadyOpen).to_string(),
            "database file /var/lib/agent/agent.db: is already open in another process \
             (another agent on the same storage.local.path?)"
        );
        let not_redb = io::Error::new(io::ErrorKind::InvalidData, "Not a redb database: bad magic");
        assert_eq!(
            file(FileError::NotRedb(not_redb)).to_string(),
            "database file /var/lib/agent/agent.db: is not a redb database (bad magic); \
             refusing to start, the file is left as it is"
        );
        let corrupted = redb::StorageError::Corrupted("page 7 is out of range".into());
        assert_eq!(
            file(FileError::Corrupted(corrupted)).to_string(),
            "database file /var/lib/agent/agent.db: is damaged: page 7 is out of range"
        );
        let denied = io::Error::from_raw_os_error(libc::EACCES);
        assert_eq!(
            file(FileError::Open(denied)).to_string(),
            "database file /var/lib/agent/agent.db: cannot be opened: \
             Permission denied (os error 13)"
        );
        let full = redb::Error::Io(io::Error::from_raw_os_error(libc::ENOSPC));
        assert_eq!(
            file(FileError::Create(full)).to_string(),
            "database file /var/lib/agent/agent.db: cannot be created: \
             I/O error: No space left on device (os error 28)"
        );
        let denied = io::Error::from_raw_os_error(libc::EACCES);
        let err = StorageError::from(OpenError::CreateDir {
            dir: PathBuf::from("/var/lib/agent"),
            source: denied,
        });
        assert_eq!(
            err.to_string(),
            "cannot create /var/lib/agent: Permission denied (os error 13)"
        );
        let again = io::Error::from_raw_os_error(libc::EAGAIN);
        let err = StorageError::from(OpenError::Thread {
            name: "agent-db-writer",
            source: again,
        });
        assert_eq!(
            err.to_string(),
            "cannot start agent-db-writer thread: Resource temporarily unavailable (os error 11)"
        );
        assert_eq!(
            StorageError::from(OpenError::WriterStopped).to_string(),
            "the database writer stopped at once"
        );
    }

    /// The failing step and its I/O error stay reachable under the text.
    #[test]
    fn open_errors_keep_their_cause() {
        let err = file(FileError::PathMetadata(io::Error::from_raw_os_error(
            libc::EIO,
        )));
        assert_eq!(
            err.to_string(),
            "database file /var/lib/agent/agent.db: Input/output error (os error 5)"
        );
        let open = err.source().and_then(|e| e.downcast_ref::<OpenError>());
        let step = open.and_then(|e| e.source()?.downcast_ref::<FileError>());
        assert!(matches!(step, Some(FileError::PathMetadata(_))), "{step:?}");
        let io = step.and_then(|e| e.source()?.downcast_ref::<io::Error>());
        assert_eq!(io.and_then(io::Error::raw_os_error), Some(libc::EIO));

        assert!(FileError::Panicked {
            message: "boom".into()
        }
        .damaged());
        assert!(FileError::Corrupted(redb::StorageError::Corrupted("x".into())).damaged());
        assert!(!FileError::Replaced.damaged());
        assert!(!FileError::AlreadyOpen.damaged());
    }

    /// A failed operation's reply reads as before, and exposes redb's error.
    #[test]
    fn database_faults_read_as_before_and_keep_their_cause() {
        let full = io::Error::from_raw_os_error(libc::ENOSPC);
        let before = format!("storage failed: I/O error: {full}");
        let err = StorageError::Database(Arc::new(DatabaseFault::Redb(redb::Error::Io(full))));
        assert_eq!(err.to_string(), before);
        let fault = err.source().expect("a Database error has a source");
        assert!(
            matches!(
                fault.downcast_ref::<Arc<DatabaseFault>>().map(|f| &**f),
                Some(DatabaseFault::Redb(_))
            ),
            "{fault:?}"
        );
        assert_eq!(
            fault.to_string(),
            "I/O error: No space left on device (os error 28)"
        );
        let redb = fault.source().and_then(|e| e.downcast_ref::<redb::Error>());
        assert!(
            matches!(redb, Some(redb::Error::Io(e)) if e.raw_os_error() == Some(libc::ENOSPC)),
            "{redb:?}"
        );

        assert_eq!(
            StorageError::Database(Arc::new(DatabaseFault::NotOpen)).to_string(),
            "storage failed: local database is not open"
        );
        let reopen = DatabaseFault::Reopen(FileError::Panicked {
            message: "index out of bounds".into(),
        });
        assert_eq!(
            reopen.to_string(),
            "is damaged: opening it panicked (index out of bounds)"
        );
    }
}
