//! The database file: opening it without ever turning an existing file
//! into an empty store, knowing whether its path still names it, and how
//! much space its filesystem has left.

use std::fs::File;
use std::io::ErrorKind;
use std::os::unix::fs::MetadataExt;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};

use redb::{Database, TableDefinition};

use super::error::{FileError, OpenError};
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

fn file_err(path: &Path, error: FileError) -> OpenError {
    OpenError::File {
        path: path.to_path_buf(),
        error,
    }
}

/// Opens the database at `path`. An existing file must be a redb database:
/// an empty file or any other file is refused, never reinitialised, since
/// that would silently start an empty store in place of lost data. A new
/// database is created only where no file exists, and atomically, so a
/// crash while creating it never leaves a half-written file at `path`.
pub(super) fn open_or_create(
    path: &Path,
    table: TableDefinition<&str, &str>,
    cache_size: usize,
) -> Result<Opened, OpenError> {
    match std::fs::metadata(path) {
        Ok(meta) if !meta.is_file() => return Err(file_err(path, FileError::NotRegularFile)),
        Ok(meta) if meta.len() == 0 => return Err(file_err(path, FileError::Empty)),
        Ok(_) => {}
        Err(e) if e.kind() == ErrorKind::NotFound => create(path, table)?,
        Err(e) => return Err(file_err(path, FileError::PathMetadata(e))),
    }
    let opened = open_existing(path, cache_size).map_err(|e| file_err(path, e))?;
    // Create the table up front so readers never see it missing.
    let ensure = || -> Result<(), redb::Error> {
        let txn = opened.db.begin_write()?;
        txn.open_table(table)?;
        txn.commit()?;
        Ok(())
    };
    ensure().map_err(|e| file_err(path, FileError::CreateTable(e)))?;
    Ok(opened)
}

/// Opens the existing database at `path` (also used to reopen it after a
/// write error). A panic inside redb, which a damaged file can cause, is an
/// error here, not a crash.
pub(super) fn open_existing(path: &Path, cache_size: usize) -> Result<Opened, FileError> {
    let anchor = File::open(path).map_err(FileError::Open)?;
    let meta = anchor.metadata().map_err(FileError::FileMetadata)?;
    let id = FileId::of(&meta);
    let open = || Database::builder().set_cache_size(cache_size).open(path);
    let db = match catch_unwind(AssertUnwindSafe(open)) {
        Ok(Ok(db)) => db,
        Ok(Err(e)) => return Err(not_a_database(e)),
        Err(payload) => {
            return Err(FileError::Panicked {
                message: panic_message(payload.as_ref()),
            })
        }
    };
    // redb opened the path after us: make sure it is the same file.
    if !names(path, id) {
        return Err(FileError::Replaced);
    }
    Ok(Opened { db, anchor, id })
}

/// Which of redb's refusals to open the file it was.
fn not_a_database(e: redb::DatabaseError) -> FileError {
    use redb::{DatabaseError, StorageError as Redb};
    match e {
        DatabaseError::DatabaseAlreadyOpen => FileError::AlreadyOpen,
        DatabaseError::Storage(Redb::Io(e)) if e.kind() == ErrorKind::InvalidData => {
            FileError::NotRedb(e)
        }
        DatabaseError::Storage(e @ Redb::Corrupted(_)) => FileError::Corrupted(e),
        e => FileError::Redb(e),
    }
}

/// Creates a new, empty database at `path` (which did not exist): builds it
/// under a temporary name and links it into place, which fails rather than
/// replace a file that appeared meanwhile.
fn create(path: &Path, table: TableDefinition<&str, &str>) -> Result<(), OpenError> {
    let parent = path.parent().filter(|p| !p.as_os_str().is_empty());
    if let Some(parent) = parent {
        std::fs::create_dir_all(parent).map_err(|source| OpenError::CreateDir {
            dir: parent.to_path_buf(),
            source,
        })?;
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
    let created = build().map_err(|e| file_err(path, FileError::Create(e)));
    let linked = created.and_then(|()| match std::fs::hard_link(&tmp, path) {
        Ok(()) => Ok(()),
        // Someone else created it meanwhile: open theirs.
        Err(e) if e.kind() == ErrorKind::AlreadyExists => Ok(()),
        // A filesystem without hard links: rename, which is atomic too but
        // would replace a file created in the last instant.
        Err(_) => {
            std::fs::rename(&tmp, path).map_err(|e| file_err(path, FileError::MoveIntoPlace(e)))
        }
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
    let st = rustix::fs::statvfs(dir).ok()?;
    let blocks = if rustix::process::geteuid().is_root() {
        st.f_bfree
    } else {
        st.f_bavail
    };
    Some(blocks.saturating_mul(st.f_frsize))
}

#[cfg(test)]
mod tests {
    use super::*;

    const TABLE: TableDefinition<&str, &str> = TableDefinition::new("kv");
    const CACHE: usize = crate::config::DEFAULT_CACHE_SIZE;

    #[test]
    fn refuses_empty_and_foreign_files_and_leaves_them_alone() {
        let dir = tempfile::tempdir().unwrap();
        let empty = dir.path().join("empty.db");
        std::fs::write(&empty, b"").unwrap();
        let err = open_or_create(&empty, TABLE, CACHE)
            .err()
            .unwrap()
            .to_string();
        assert!(
            err.contains("empty.db") && err.contains("is empty"),
            "{err}"
        );
        assert_eq!(std::fs::metadata(&empty).unwrap().len(), 0);

        let foreign = dir.path().join("foreign.db");
        std::fs::write(&foreign, vec![b'x'; 10_000]).unwrap();
        let err = open_or_create(&foreign, TABLE, CACHE)
            .err()
            .unwrap()
            .to_string();
        assert!(
            err.contains("foreign.db") && err.contains("is not a redb database"),
            "{err}"
        );
        assert_eq!(std::fs::read(&foreign).unwrap(), vec![b'x'; 10_000]);

        let err = open_or_create(dir.path(), TABLE, CACHE)
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("not a regular file"), "{err}");
    }

    /// Each refusal is its own variant, and reads exactly as it always has.
    #[test]
    fn refusals_are_typed_and_their_text_is_unchanged() {
        let dir = tempfile::tempdir().unwrap();
        let empty = dir.path().join("empty.db");
        std::fs::write(&empty, b"").unwrap();
        let err = open_or_create(&empty, TABLE, CACHE).err().unwrap();
        assert!(
            matches!(&err, OpenError::File { path, error: FileError::Empty } if *path == empty),
            "{err:?}"
        );
        assert_eq!(
            err.to_string(),
            format!(
                "database file {}: is empty, not a redb database; refusing to start with an \
                 empty store (a new database is created only where no file exists: move the \
                 file away to start afresh)",
                empty.display()
            )
        );

        let err = open_or_create(dir.path(), TABLE, CACHE).err().unwrap();
        assert!(
            matches!(
                &err,
                OpenError::File {
                    error: FileError::NotRegularFile,
                    ..
                }
            ),
            "{err:?}"
        );
        assert_eq!(
            err.to_string(),
            format!(
                "database file {}: is not a regular file",
                dir.path().display()
            )
        );

        let foreign = dir.path().join("foreign.db");
        std::fs::write(&foreign, vec![b'x'; 10_000]).unwrap();
        let err = open_or_create(&foreign, TABLE, CACHE).err().unwrap();
        let OpenError::File {
            error: FileError::NotRedb(io),
            ..
        } = &err
        else {
            panic!("{err:?}");
        };
        assert_eq!(io.kind(), ErrorKind::InvalidData);
        assert!(
            err.to_string()
                .ends_with("); refusing to start, the file is left as it is"),
            "{err}"
        );
        assert!(!err.to_string().contains("Not a redb database: "), "{err}");

        // Open twice: redb's lock refuses the second, as another agent would be.
        let path = dir.path().join("locked.db");
        let _held = open_or_create(&path, TABLE, CACHE).unwrap();
        let err = open_existing(&path, CACHE).err().unwrap();
        assert!(matches!(err, FileError::AlreadyOpen), "{err:?}");
        assert!(!err.damaged());
        assert_eq!(
            err.to_string(),
            "is already open in another process (another agent on the same storage.local.path?)"
        );
    }

    #[test]
    fn creates_only_where_nothing_exists_and_leaves_no_temporary_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/new.db");
        let opened = open_or_create(&path, TABLE, CACHE).unwrap();
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
