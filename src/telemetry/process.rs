//! Process metrics: the standard set from `metrics-process`, plus the
//! agent's own `process_cpu_usage` and `process_memory_bytes`.
//!
//! `process_cpu_seconds_total` counts whole seconds, too coarse to tell 3%
//! from 30% over a few seconds, so CPU usage is computed here from the
//! nanosecond process CPU clock.

use std::time::{Duration, Instant};

use metrics::Gauge;
use tokio_util::sync::CancellationToken;

use super::defs::{PROCESS_CPU_USAGE, PROCESS_MEMORY_BYTES};

/// Refreshes process metrics; holds the previous CPU reading between samples.
pub struct ProcessSampler {
    collector: metrics_process::Collector,
    cpu_usage: Gauge,
    memory: Gauge,
    last: (Instant, Duration),
}

impl ProcessSampler {
    /// Describes the process metrics to the installed recorder. The first
    /// sample's CPU usage covers the process's whole life so far, rather
    /// than the instant between construction and the first sample.
    pub fn new() -> Self {
        let collector = metrics_process::Collector::default();
        collector.describe();
        let now = Instant::now();
        let started = process_age()
            .and_then(|age| now.checked_sub(age))
            .unwrap_or(now);
        Self {
            collector,
            cpu_usage: metrics::gauge!(PROCESS_CPU_USAGE),
            memory: metrics::gauge!(PROCESS_MEMORY_BYTES),
            last: (started, Duration::ZERO),
        }
    }

    /// Takes one sample. CPU usage covers the time since the previous call.
    pub fn sample(&mut self) {
        self.collector.collect();
        let now = (Instant::now(), process_cpu_time());
        let wall = now.0.duration_since(self.last.0);
        if !wall.is_zero() {
            let cpu = now.1.saturating_sub(self.last.1);
            self.cpu_usage
                .set(cpu.as_secs_f64() / wall.as_secs_f64() * 100.0);
        }
        self.last = now;
        if let Some(rss) = resident_bytes() {
            self.memory.set(rss as f64);
        }
    }

    /// Samples every `interval` until cancelled (call [`Self::sample`]
    /// first for a value at startup).
    pub async fn run(mut self, interval: Duration, cancel: CancellationToken) {
        let mut ticker = tokio::time::interval_at(tokio::time::Instant::now() + interval, interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = ticker.tick() => self.sample(),
            }
        }
    }
}

impl Default for ProcessSampler {
    fn default() -> Self {
        Self::new()
    }
}

/// CPU time (user + system) of the whole process, to the nanosecond.
pub fn process_cpu_time() -> Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec; the clock id is a constant.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_PROCESS_CPUTIME_ID, &mut ts) };
    if rc != 0 {
        return Duration::ZERO;
    }
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

/// How long ago this process started, from /proc (clock-tick resolution).
fn process_age() -> Option<Duration> {
    let uptime: f64 = std::fs::read_to_string("/proc/uptime")
        .ok()?
        .split_whitespace()
        .next()?
        .parse()
        .ok()?;
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // Fields after the parenthesised command name; `starttime` is field 22.
    let start_ticks: f64 = stat
        .rsplit_once(')')?
        .1
        .split_whitespace()
        .nth(19)?
        .parse()
        .ok()?;
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    (hz > 0).then(|| Duration::from_secs_f64((uptime - start_ticks / hz as f64).max(0.0)))
}

/// Resident set size from /proc/self/statm, in bytes.
pub fn resident_bytes() -> Option<u64> {
    let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
    let pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    // SAFETY: sysconf has no preconditions.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    (page > 0).then(|| pages * page as u64)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_support::gauge;
    use metrics_util::debugging::DebuggingRecorder;

    #[test]
    fn samples_cpu_and_memory() {
        let recorder = DebuggingRecorder::new();
        let snapshotter = recorder.snapshotter();
        let mut sampler = metrics::with_local_recorder(&recorder, ProcessSampler::new);
        // The first sample averages over the process's life; this one is measured from here.
        metrics::with_local_recorder(&recorder, || sampler.sample());
        let wall = Instant::now();
        // Burn 200 ms of CPU time. On a loaded machine that takes longer
        // than 200 ms of wall time, so the bound below uses the wall time.
        let burn = Duration::from_millis(200);
        let cpu_start = process_cpu_time();
        let mut x = 0u64;
        while process_cpu_time().saturating_sub(cpu_start) < burn {
            x = x.wrapping_mul(31).wrapping_add(7);
        }
        std::hint::black_box(x);
        metrics::with_local_recorder(&recorder, || sampler.sample());
        let wall = wall.elapsed();
        let snap = snapshotter.snapshot().into_vec();
        let cpu = gauge(&snap, PROCESS_CPU_USAGE, &[]);
        let at_least = burn.as_secs_f64() / wall.as_secs_f64() * 100.0;
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get()) as f64;
        assert!(
            cpu >= at_least * 0.99 && cpu <= cores * 100.0 * 1.05,
            "burned {burn:?} of CPU in {wall:?}: expected {at_least:.1}% to {}%, got {cpu}%",
            cores * 100.0
        );
        let mem = gauge(&snap, PROCESS_MEMORY_BYTES, &[]);
        assert!(mem > 1_000_000.0, "rss {mem}");
        assert!(gauge(&snap, "process_threads", &[]) >= 1.0);
    }

    #[test]
    fn first_sample_averages_over_the_process_life() {
        let age = process_age().expect("process age from /proc");
        let cpu = process_cpu_time();
        let recorder = DebuggingRecorder::new();
        let snapshotter = recorder.snapshotter();
        let mut sampler = metrics::with_local_recorder(&recorder, ProcessSampler::new);
        metrics::with_local_recorder(&recorder, || sampler.sample());
        let got = gauge(&snapshotter.snapshot().into_vec(), PROCESS_CPU_USAGE, &[]);
        // Bounds from readings taken just before: at least the CPU used until
        // then over an age at least as long (clock ticks are 10 ms).
        let tick = Duration::from_millis(10);
        let lower = cpu.as_secs_f64() / (age + Duration::from_secs(5)).as_secs_f64() * 100.0;
        let upper = (process_cpu_time() + tick).as_secs_f64()
            / age.saturating_sub(tick).max(tick).as_secs_f64()
            * 100.0;
        assert!(
            got >= lower && got <= upper,
            "{got}% not in [{lower}, {upper}]"
        );
    }
}
