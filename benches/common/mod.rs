//! What the benchmarks share (each bench is its own crate; this folder is
//! not a bench target of its own).

use std::sync::Barrier;
use std::time::{Duration, Instant};

/// Runs `work` on `threads` threads released together, and returns the mean
/// of the times each measured for itself.
pub(crate) fn per_thread_time(threads: usize, work: impl Fn() + Sync) -> Duration {
    let barrier = Barrier::new(threads);
    let total: Duration = std::thread::scope(|s| {
        let timed: Vec<_> = (0..threads)
            .map(|_| {
                s.spawn(|| {
                    barrier.wait();
                    let start = Instant::now();
                    work();
                    start.elapsed()
                })
            })
            .collect();
        timed
            .into_iter()
            .map(|t| t.join().expect("bench thread"))
            .sum()
    });
    total / threads as u32
}

/// The runtime the message-path benchmarks drive the handler on: one
/// worker, as the agent's message path runs on one at a time.
pub(crate) fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("tokio runtime")
}
