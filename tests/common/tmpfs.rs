//! A real, small filesystem for the full-disk tests.

use std::io::Write;
use std::path::Path;
use std::process::Command;

/// A tmpfs mounted on a temporary directory for one test, so it can fill a
/// real filesystem without touching the machine's. Unmounted on drop.
pub struct Tmpfs {
    dir: tempfile::TempDir,
}

impl Tmpfs {
    /// Mounts a tmpfs of `size` (`mount -o size=`, e.g. `8m`). Mounting needs
    /// root: without it, under CI (`CI` set) the test fails; locally it
    /// returns None and says why.
    pub fn mount(size: &str) -> Option<Tmpfs> {
        let dir = tempfile::tempdir().expect("tempdir");
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir.path())
            .output();
        let why = match out {
            Ok(o) if o.status.success() => return Some(Tmpfs { dir }),
            Ok(o) => String::from_utf8_lossy(&o.stderr).trim().to_string(),
            Err(e) => format!("cannot run mount: {e}"),
        };
        if std::env::var_os("CI").is_some() {
            panic!("mounting a tmpfs is required under CI (run the tests as root): {why}");
        }
        eprintln!("SKIPPED: cannot mount a tmpfs ({why}); run the tests as root to run this test");
        None
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// Fills the filesystem with `name` until it is full; returns the bytes
    /// written.
    pub fn fill(&self, name: &str) -> u64 {
        let mut file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.path().join(name))
            .expect("create filler");
        let chunk = vec![0x5a_u8; 4096];
        let mut written = 0u64;
        loop {
            match file.write(&chunk) {
                Ok(0) => break,
                Ok(n) => written += n as u64,
                Err(e) if e.raw_os_error() == Some(libc::ENOSPC) => break,
                Err(e) => panic!("filling the tmpfs: {e}"),
            }
        }
        written
    }

    /// Bytes still free.
    pub fn free_bytes(&self) -> u64 {
        let st = rustix::fs::statvfs(self.path()).expect("statvfs");
        st.f_bfree * st.f_frsize
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let unmounted = Command::new("umount")
            .arg(self.dir.path())
            .status()
            .is_ok_and(|s| s.success());
        if !unmounted {
            // Still busy (an agent that outlived the test): detach it now,
            // the kernel frees it when the last file closes.
            let _ = Command::new("umount")
                .arg("-l")
                .arg(self.dir.path())
                .status();
        }
    }
}
