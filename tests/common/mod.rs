//! Shared test harness: external binaries, free ports, waits; the modules
//! hold the real agent binary, peers, Redis, Prometheus, HTTP and PromQL
//! helpers, and everything is re-exported so tests `use common::*`.
// Each test binary uses only part of the harness: what it leaves unused is
// neither dead nor a stray import.
#![allow(dead_code, unused_imports)]
// Each test binary includes this harness as a private `mod common`, so its
// `pub` items are never reachable from outside; `pub` marks what tests use.
#![allow(unreachable_pub)]

use std::net::TcpListener;
use std::path::PathBuf;
use std::time::{Duration, Instant};

mod agent;
pub mod cluster;
mod http;
mod peer;
pub mod pki;
mod proc;
mod prometheus;
mod promql;
mod receiver;
mod redis;
mod tmpfs;

pub use agent::*;
pub use http::*;
pub use peer::*;
pub use proc::*;
pub use prometheus::*;
pub use promql::*;
pub use receiver::*;
pub use redis::*;
pub use tmpfs::*;

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

/// Generous bound for anything a test waits on: a loaded 2-core CI machine
/// can be slow, and a wait ends as soon as its condition holds.
pub const WAIT: Duration = Duration::from_secs(30);

/// A port that was free a moment ago.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("bind an ephemeral port")
}

/// Polls `cond` until it holds or `WAIT` passes; returns whether it held.
pub fn wait_until(mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + WAIT;
    while Instant::now() < deadline {
        if cond() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    cond()
}
