//! Shared test harness: external binaries, free ports, the real agent binary.
#![allow(dead_code)]

use std::path::PathBuf;

/// Finds an external tool (`redis-server`, `promtool`, `prometheus`) on PATH.
///
/// Under CI (`CI` set) a missing tool fails the test: a green run must mean the
/// test really ran. Locally the test may skip, and says why.
pub fn require_bin(name: &str) -> Option<PathBuf> {
    let found = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|dir| dir.join(name))
            .find(|p| p.is_file())
    });
    match found {
        Some(p) => Some(p),
        None if std::env::var_os("CI").is_some() => {
            panic!("`{name}` is required under CI but was not found on PATH")
        }
        None => {
            eprintln!("SKIPPED: `{name}` not found on PATH (install it to run this test)");
            None
        }
    }
}
