//! The database file: opening it without ever turning an existing file
//! into an empty store, knowing whether its path still names it, and how
//! much space its filesystem has left.

use std::fs::File;
use std::io::ErrorKind;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};

use redb::{Database, TableDefinition};

use super::super::StorageError;
use super::queue::panic_message;

/// Device and inode: what a path names. The agent holds the file open, so
/// the inode cannot be freed and reused while it compares.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct FileId {
    /// `st_dev`: the filesystem.
    dev: u64,
    /// `st_ino`: the file within it.
    ino: u64,
}

impl FileId {
    fn of(meta: &std::fs::Metadata) -> Self {
        Self {
            dev: meta.dev(),
            ino: meta.ino(),
        }
    }
}

/// An open database and the identity of its file.
pub(super) struct Opened {
    /// The database handle.
    pub db: Database,
    /// A descriptor of our own on the file (redb's is not reachable): it pins
    /// the inode, so [`FileId`] comparisons cannot be fooled by reuse.
    pub anchor: File,
    pub id: FileId,
}

fn open_err(path: &Path, what: impl std::fmt::Display) -> StorageError {
    StorageError::Open(format!("database file {}: {what}", path.display()))
}

/// Opens the database at `path`. An existing file must be a redb database:
/// an empty file or any other file is refused, never reinitialised, since
/// that would silently start an empty store in place of lost data. A new
/// database is created only where no file exists, and atomically, so a
/// crash while creating it never leaves a half-written file at `path`.
pub(super) fn open_or_create(
    path: &Path,
    table: TableDefinition<&str, &str>,
) -> Result<Opened, StorageError> {
    match std::fs::metadata(path) {
        Ok(meta) if !meta.is_file() => return Err(open_err(path, "is not a regular file")),
        Ok(meta) if meta.len() == 0 => {
            return Err(open_err(
                path,
                "is empty, not a redb database; refusing to start with an empty store \
                 (a new database is created only where no file exists: move the file away to start afresh)",
            ))
        }
        Ok(_) => {}
        Err(e) if e.kind() == ErrorKind::NotFound => create(path, table)?,
        Err(e) => return Err(open_err(path, e)),
    }
    let opened = open_existing(path).map_err(|e| open_err(path, e))?;
    // Create the table up front so readers never see it missing.
    let ensure = || -> Result<(), redb::Error> {
        let txn = opened.db.begin_write()?;
        txn.open_table(table)?;
        txn.commit()?;
        Ok(())
    };
    ensure().map_err(|e| open_err(path, e))?;
    Ok(opened)
}

/// Why [`open_existing`] failed.
pub(super) struct OpenError {
    /// The file is damaged (redb found corruption, or panicked on it):
    /// reopening it again would not help.
    pub damaged: bool,
    /// Completes "database file <path> ..." (lowercase, no path).
    pub message: String,
}

impl std::fmt::Display for OpenError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

/// Opens the existing database at `path` (also used to reopen it after a
/// write error). A panic inside redb, which a damaged file can cause, is an
/// error here, not a crash.
pub(super) fn open_existing(path: &Path) -> Result<Opened, OpenError> {
    let other = |message: String| OpenError {
        damaged: false,
        message,
    };
    let anchor = File::open(path).map_err(|e| other(format!("cannot be opened: {e}")))?;
    let meta = anchor
        .metadata()
        .map_err(|e| other(format!("cannot be read: {e}")))?;
    let id = FileId::of(&meta);
    let db = match catch_unwind(AssertUnwindSafe(|| Database::open(path))) {
        Ok(Ok(db)) => db,
        Ok(Err(e)) => return Err(not_a_database(e)),
        Err(payload) => {
            return Err(OpenError {
                damaged: true,
                message: format!(
                    "is damaged: opening it panicked ({})",
                    panic_message(payload.as_ref())
                ),
            })
        }
    };
    // redb opened the path after us: make sure it is the same file.
    if !names(path, id) {
        return Err(other("was replaced while it was being opened".into()));
    }
    Ok(Opened { db, anchor, id })
}

fn not_a_database(e: redb::DatabaseError) -> OpenError {
    use redb::{DatabaseError, StorageError as Redb};
    let (damaged, message) = match e {
        DatabaseError::DatabaseAlreadyOpen => (
            false,
            "is already open in another process (another agent on the same storage.local.path?)"
                .to_string(),
        ),
        DatabaseError::Storage(Redb::Io(e)) if e.kind() == ErrorKind::InvalidData => {
            let e = e.to_string();
            let detail = e.strip_prefix("Not a redb database: ").unwrap_or(&e);
            (
                false,
                format!(
                    "is not a redb database ({detail}); refusing to start, the file is left as it is"
                ),
            )
        }
        DatabaseError::Storage(Redb::Corrupted(e)) => (true, format!("is damaged: {e}")),
        e => (false, format!("cannot be opened: {e}")),
    };
    OpenError { damaged, message }
}

/// Creates a new, empty database at `path` (which did not exist): builds it
/// under a temporary name and links it into place, which fails rather than
/// replace a file that appeared meanwhile.
fn create(path: &Path, table: TableDefinition<&str, &str>) -> Result<(), StorageError> {
    let parent = path.parent().filter(|p| !p.as_os_str().is_empty());
    if let Some(parent) = parent {
        std::fs::create_dir_all(parent)
            .map_err(|e| StorageError::Open(format!("cannot create {}: {e}", parent.display())))?;
    }
    let tmp = temporary_name(path);
    let _ = std::fs::remove_file(&tmp);
    let build = || -> Result<(), redb::Error> {
        let db = Database::create(&tmp)?;
        let txn = db.begin_write()?;
        txn.open_table(table)?;
        txn.commit()?;
        Ok(())
    };
    let created = build().map_err(|e| open_err(path, format_args!("cannot be created: {e}")));
    let linked = created.and_then(|()| match std::fs::hard_link(&tmp, path) {
        Ok(()) => Ok(()),
        // Someone else created it meanwhile: open theirs.
        Err(e) if e.kind() == ErrorKind::AlreadyExists => Ok(()),
        // A filesystem without hard links: rename, which is atomic too but
        // would replace a file created in the last instant.
        Err(_) => std::fs::rename(&tmp, path)
            .map_err(|e| open_err(path, format_args!("cannot be created: {e}"))),
    });
    let _ = std::fs::remove_file(&tmp);
    linked?;
    // Make the new name durable before the first acknowledged write.
    if let Some(dir) = parent
        .map(Path::to_path_buf)
        .or_else(|| Some(PathBuf::from(".")))
    {
        if let Ok(dir) = File::open(dir) {
            let _ = dir.sync_all();
        }
    }
    Ok(())
}

/// `.<name>.creating` next to `path`.
fn temporary_name(path: &Path) -> PathBuf {
    let mut name = std::ffi::OsString::from(".");
    name.push(path.file_name().unwrap_or_default());
    name.push(".creating");
    path.with_file_name(name)
}

/// Whether `path` still names the file `id` (false when it was deleted,
/// renamed away or replaced). A `stat` that fails for another reason (the
/// filesystem is failing) counts as "still ours": the I/O errors will say
/// what is wrong.
pub(super) fn names(path: &Path, id: FileId) -> bool {
    match std::fs::metadata(path) {
        Ok(meta) => FileId::of(&meta) == id,
        Err(e) => e.kind() != ErrorKind::NotFound,
    }
}

/// Bytes the agent could still write on the filesystem holding `path`:
/// what is free for unprivileged users, or everything free when the agent
/// runs as root (which may use the reserved blocks). `None` if unknown.
pub(super) fn free_bytes(path: &Path) -> Option<u64> {
    let dir = match path.parent().filter(|p| !p.as_os_str().is_empty()) {
        Some(dir) => dir,
        None => Path::new("."),
    };
    let c_path = std::ffi::CString::new(dir.as_os_str().as_bytes()).ok()?;
    // SAFETY: statvfs is plain old data; all zeroes is a valid value.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: a valid NUL-terminated path and a valid, writable statvfs.
    if unsafe { libc::statvfs(c_path.as_ptr(), &mut st) } != 0 {
        return None;
    }
    // SAFETY: geteuid cannot fail.
    let blocks = if unsafe { libc::geteuid() } == 0 {
        st.f_bfree
    } else {
        st.f_bavail
    };
    Some((blocks as u64).saturating_mul(st.f_frsize as u64))
}

#[cfg(test)]
mod tests {
    use super::*;

    const TABLE: TableDefinition<&str, &str> = TableDefinition::new("kv");

    #[test]
    fn refuses_empty_and_foreign_files_and_leaves_them_alone() {
        let dir = tempfile::tempdir().unwrap();
        let empty = dir.path().join("empty.db");
        std::fs::write(&empty, b"").unwrap();
        let err = open_or_create(&empty, TABLE).err().unwrap().to_string();
        assert!(
            err.contains("empty.db") && err.contains("is empty"),
            "{err}"
        );
        assert_eq!(std::fs::metadata(&empty).unwrap().len(), 0);

        let foreign = dir.path().join("foreign.db");
        std::fs::write(&foreign, vec![b'x'; 10_000]).unwrap();
        let err = open_or_create(&foreign, TABLE).err().unwrap().to_string();
        assert!(
            err.contains("foreign.db") && err.contains("is not a redb database"),
            "{err}"
        );
        assert_eq!(std::fs::read(&foreign).unwrap(), vec![b'x'; 10_000]);

        let err = open_or_create(dir.path(), TABLE).err().unwrap().to_string();
        assert!(err.contains("not a regular file"), "{err}");
    }

    #[test]
    fn creates_only_where_nothing_exists_and_leaves_no_temporary_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/new.db");
        let opened = open_or_create(&path, TABLE).unwrap();
        assert!(names(&path, opened.id));
        let entries: Vec<_> = std::fs::read_dir(dir.path().join("sub"))
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(entries, vec![std::ffi::OsString::from("new.db")]);
        assert!(free_bytes(&path).is_some_and(|b| b > 0));

        std::fs::rename(&path, dir.path().join("moved.db")).unwrap();
        assert!(!names(&path, opened.id), "renamed away");
        std::fs::write(&path, b"x").unwrap();
        assert!(!names(&path, opened.id), "replaced");
    }
}
