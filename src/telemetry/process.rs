//! Process metrics: the standard `process_*` set, plus the agent's own
//! `process_cpu_usage` and `process_memory_bytes`.
//!
//! With the Prometheus exporter they are read from `/proc` when `/metrics`
//! is scraped, as client_golang's process collector does, so a scrape is
//! never older than the request and an idle agent has no sampling timer.
//! They are written straight into the exposition rather than through the
//! facade, because the facade's counters are integers and
//! `process_cpu_seconds_total` is fractional (clock-tick resolution).
//!
//! DogStatsD has no scrape, so with that exporter [`ProcessSampler`] pushes
//! the same set through the facade every `metrics.process_interval`, the
//! standard set by `metrics-process`.

use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

use metrics::Gauge;
use metrics_exporter_prometheus::formatting::write_metric_line;
use rustix::process::Resource;
use tokio_util::sync::CancellationToken;

use super::defs::*;
use super::protobuf;
use super::recorder::{family_header, label_set};

/// `process_cpu_usage`: CPU time over wall time since the previous refresh.
///
/// The first window starts when the meter is created (when the agent is
/// ready), not when the process started, so startup work does not show as a
/// spike on the first scrape.
pub struct CpuMeter {
    /// A reading is refreshed only when at least this much time has passed,
    /// so frequent scrapes do not shrink the window to noise.
    min_window: Duration,
    since: Instant,
    cpu_then: Duration,
    value: Option<f64>,
}

impl CpuMeter {
    /// Starts the first window now.
    pub fn new(min_window: Duration) -> Self {
        Self {
            min_window,
            since: Instant::now(),
            cpu_then: process_cpu_time(),
            value: None,
        }
    }

    /// Percent of one core used over the last window. The window is closed
    /// and a new one started on the first call and whenever `min_window`
    /// has passed; otherwise the last value is returned.
    pub fn read(&mut self) -> f64 {
        let now = Instant::now();
        let wall = now.duration_since(self.since);
        if (self.value.is_none() || wall >= self.min_window) && !wall.is_zero() {
            let cpu = process_cpu_time();
            let used = cpu.saturating_sub(self.cpu_then);
            self.value = Some(used.as_secs_f64() / wall.as_secs_f64() * 100.0);
            self.since = now;
            self.cpu_then = cpu;
        }
        self.value.unwrap_or(0.0)
    }
}

/// The standard process set, as read from `/proc` and `getrlimit`. A value
/// that could not be read is `None` and its series is left out.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct ProcessStats {
    /// User plus system CPU, to clock-tick resolution.
    pub cpu_seconds: Option<f64>,
    /// Resident set size.
    pub resident_bytes: Option<f64>,
    /// Virtual memory size.
    pub virtual_bytes: Option<f64>,
    /// Soft address-space limit; unlimited reads as 2^64, as client_golang
    /// reports it.
    pub virtual_max_bytes: Option<f64>,
    /// Open file descriptors.
    pub open_fds: Option<f64>,
    /// Soft limit on open file descriptors.
    pub max_fds: Option<f64>,
    /// Start time, seconds since the Unix epoch, to clock-tick resolution.
    pub start_time_seconds: Option<f64>,
    /// OS threads.
    pub threads: Option<f64>,
}

impl ProcessStats {
    /// Reads the set now.
    pub fn read() -> Self {
        let mut stats = ProcessStats {
            max_fds: soft_limit(Resource::Nofile),
            virtual_max_bytes: soft_limit(Resource::As),
            ..Self::default()
        };
        #[cfg(target_os = "linux")]
        stats.read_proc();
        stats
    }

    /// The figures only Linux's `/proc` has; elsewhere they are left out.
    #[cfg(target_os = "linux")]
    fn read_proc(&mut self) {
        self.open_fds = std::fs::read_dir("/proc/self/fd")
            .ok()
            .map(|d| d.count() as f64);
        let hz = rustix::param::clock_ticks_per_second() as f64;
        let page = rustix::param::page_size() as f64;
        if let Some(stat) = std::fs::read_to_string("/proc/self/stat")
            .ok()
            .and_then(|s| StatFields::parse(&s))
        {
            if hz > 0.0 {
                self.cpu_seconds = Some((stat.utime + stat.stime) as f64 / hz);
                self.start_time_seconds =
                    boot_time().map(|boot| boot as f64 + stat.starttime as f64 / hz);
            }
            self.threads = Some(stat.num_threads as f64);
            self.virtual_bytes = Some(stat.vsize as f64);
            if page > 0.0 {
                self.resident_bytes = Some(stat.rss_pages as f64 * page);
            }
        }
    }

    fn by_name(&self) -> [(&'static str, Option<f64>); 8] {
        [
            (PROCESS_CPU_SECONDS_TOTAL, self.cpu_seconds),
            (PROCESS_RESIDENT_MEMORY_BYTES, self.resident_bytes),
            (PROCESS_VIRTUAL_MEMORY_BYTES, self.virtual_bytes),
            (PROCESS_VIRTUAL_MEMORY_MAX_BYTES, self.virtual_max_bytes),
            (PROCESS_OPEN_FDS, self.open_fds),
            (PROCESS_MAX_FDS, self.max_fds),
            (PROCESS_START_TIME_SECONDS, self.start_time_seconds),
            (PROCESS_THREADS, self.threads),
        ]
    }
}

/// The fields of `/proc/self/stat` the set needs.
struct StatFields {
    utime: u64,
    stime: u64,
    num_threads: u64,
    starttime: u64,
    vsize: u64,
    rss_pages: u64,
}

impl StatFields {
    fn parse(stat: &str) -> Option<Self> {
        // Fields after the parenthesised command name, which may contain
        // spaces; field 3 (`state`) is index 0 here.
        let rest: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
        let field = |n: usize| rest.get(n - 3)?.parse::<u64>().ok();
        Some(Self {
            utime: field(14)?,
            stime: field(15)?,
            num_threads: field(20)?,
            starttime: field(22)?,
            vsize: field(23)?,
            rss_pages: field(24)?,
        })
    }
}

/// Boot time, seconds since the Unix epoch, from `/proc/stat`.
fn boot_time() -> Option<u64> {
    std::fs::read_to_string("/proc/stat")
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix("btime "))?
        .trim()
        .parse()
        .ok()
}

/// A soft resource limit; unlimited reads as 2^64 - 1 (`RLIM_INFINITY`),
/// which renders as 1.8446744073709552e19 like client_golang's.
fn soft_limit(resource: Resource) -> Option<f64> {
    Some(
        rustix::process::getrlimit(resource)
            .current
            .unwrap_or(u64::MAX) as f64,
    )
}

/// Writes the process families into a scrape.
pub struct ProcessCollector {
    cpu: Mutex<CpuMeter>,
}

impl ProcessCollector {
    /// `process_cpu_usage` windows are at least `min_window` long; the
    /// first starts now.
    pub fn new(min_window: Duration) -> Self {
        Self {
            cpu: Mutex::new(CpuMeter::new(min_window)),
        }
    }

    /// Appends every process family, read now.
    pub fn render_into(&self, out: &mut String) {
        for (name, value) in self.read() {
            write_family(out, name, value);
        }
    }

    /// Appends every process family, read now, as length-delimited
    /// protobuf `MetricFamily` messages.
    pub fn render_protobuf_into(&self, out: &mut Vec<u8>) {
        for family in self.protobuf_families() {
            protobuf::write_delimited(out, &family);
        }
    }

    /// Every process family, read now, as protobuf `MetricFamily` messages.
    pub fn protobuf_families(&self) -> Vec<protobuf::MetricFamily> {
        self.read()
            .into_iter()
            .filter_map(|(name, value)| {
                let def = METRICS.iter().find(|d| d.name == name)?;
                Some(protobuf::unlabelled(def.name, def.help, def.kind, value?))
            })
            .collect()
    }

    /// Every process family's value, in the order of the page.
    fn read(&self) -> Vec<(&'static str, Option<f64>)> {
        let cpu_usage = self
            .cpu
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .read();
        let stats = ProcessStats::read();
        let mut values = vec![
            (PROCESS_CPU_USAGE, Some(cpu_usage)),
            (PROCESS_MEMORY_BYTES, stats.resident_bytes),
        ];
        values.extend(stats.by_name());
        values
    }
}

/// One unlabelled family with the catalog's HELP and TYPE.
fn write_family(out: &mut String, name: &str, value: Option<f64>) {
    let (Some(value), Some(def)) = (value, METRICS.iter().find(|d| d.name == name)) else {
        return;
    };
    family_header(out, name, Some(def.help), def.kind.as_str());
    let no_labels = label_set(&metrics::Key::from_static_name(def.name));
    write_metric_line::<&str, f64>(out, name, None, &no_labels, None, value, None);
    out.push('\n');
}

/// Pushes process metrics through the facade, for exporters without a
/// scrape (DogStatsD).
pub struct ProcessSampler {
    collector: metrics_process::Collector,
    cpu: CpuMeter,
    cpu_usage: Gauge,
    memory: Gauge,
}

impl ProcessSampler {
    /// Describes the process metrics to the installed recorder; the first
    /// CPU window starts now.
    pub fn new() -> Self {
        let collector = metrics_process::Collector::default();
        collector.describe();
        Self {
            collector,
            cpu: CpuMeter::new(Duration::ZERO),
            cpu_usage: metrics::gauge!(PROCESS_CPU_USAGE),
            memory: metrics::gauge!(PROCESS_MEMORY_BYTES),
        }
    }

    /// Takes one sample. CPU usage covers the time since the previous call.
    pub fn sample(&mut self) {
        self.collector.collect();
        self.cpu_usage.set(self.cpu.read());
        if let Some(rss) = ProcessStats::read().resident_bytes {
            self.memory.set(rss);
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
    let ts = rustix::time::clock_gettime(rustix::time::ClockId::ProcessCPUTime);
    Duration::new(
        u64::try_from(ts.tv_sec).unwrap_or(0),
        u32::try_from(ts.tv_nsec).unwrap_or(0),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_support::gauge;
    use metrics_util::debugging::DebuggingRecorder;

    fn burn(cpu: Duration) {
        let start = process_cpu_time();
        let mut x = 0u64;
        while process_cpu_time().saturating_sub(start) < cpu {
            x = x.wrapping_mul(31).wrapping_add(7);
        }
        std::hint::black_box(x);
    }

    #[test]
    fn samples_cpu_and_memory() {
        let recorder = DebuggingRecorder::new();
        let snapshotter = recorder.snapshotter();
        let mut sampler = metrics::with_local_recorder(&recorder, ProcessSampler::new);
        metrics::with_local_recorder(&recorder, || sampler.sample());
        let wall = Instant::now();
        // Burn 200 ms of CPU time. On a loaded machine that takes longer
        // than 200 ms of wall time, so the bound below uses the wall time.
        let cpu_burned = Duration::from_millis(200);
        burn(cpu_burned);
        metrics::with_local_recorder(&recorder, || sampler.sample());
        let wall = wall.elapsed();
        let snap = snapshotter.snapshot().into_vec();
        let cpu = gauge(&snap, PROCESS_CPU_USAGE, &[]);
        let at_least = cpu_burned.as_secs_f64() / wall.as_secs_f64() * 100.0;
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get()) as f64;
        assert!(
            cpu >= at_least * 0.99 && cpu <= cores * 100.0 * 1.05,
            "burned {cpu_burned:?} of CPU in {wall:?}: expected {at_least:.1}% to {}%, got {cpu}%",
            cores * 100.0
        );
        let mem = gauge(&snap, PROCESS_MEMORY_BYTES, &[]);
        assert!(mem > 1_000_000.0, "rss {mem}");
        assert!(gauge(&snap, "process_threads", &[]) >= 1.0);
    }

    #[test]
    fn first_cpu_window_starts_at_the_meter_not_the_process() {
        // Bounds from readings taken around the meter's creation and read.
        let (cpu0, t0) = (process_cpu_time(), Instant::now());
        let mut meter = CpuMeter::new(Duration::from_secs(3600));
        let (cpu1, t1) = (process_cpu_time(), Instant::now());
        burn(Duration::from_millis(50));
        let (cpu2, t2) = (process_cpu_time(), Instant::now());
        let got = meter.read();
        let (cpu3, t3) = (process_cpu_time(), Instant::now());
        let pct = |cpu: Duration, wall: Duration| cpu.as_secs_f64() / wall.as_secs_f64() * 100.0;
        let lower = pct(cpu2 - cpu1, t3 - t0);
        let upper = pct(cpu3 - cpu0, t2 - t1);
        assert!(
            got >= lower && got <= upper,
            "{got}% not in [{lower}, {upper}]"
        );
        // Within the minimum window the value holds.
        burn(Duration::from_millis(20));
        assert_eq!(meter.read(), got);
    }

    #[test]
    fn reads_the_standard_set_from_proc() {
        let stats = ProcessStats::read();
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs_f64();
        let start = stats.start_time_seconds.unwrap();
        assert!(start <= now + 1.0 && start > now - 3600.0, "{start}");
        let cpu = stats.cpu_seconds.unwrap();
        assert!(cpu >= 0.0 && cpu <= process_cpu_time().as_secs_f64() + 0.02);
        assert!(stats.resident_bytes.unwrap() > 1e6);
        assert!(stats.virtual_bytes.unwrap() >= stats.resident_bytes.unwrap());
        assert!(stats.open_fds.unwrap() >= 3.0);
        assert!(stats.max_fds.unwrap() >= stats.open_fds.unwrap());
        assert!(stats.threads.unwrap() >= 1.0);
        assert!(stats.virtual_max_bytes.unwrap() > 0.0);
    }

    #[test]
    fn renders_every_process_family_with_catalog_help() {
        let mut out = String::new();
        ProcessCollector::new(Duration::from_secs(5)).render_into(&mut out);
        for name in [PROCESS_CPU_USAGE, PROCESS_MEMORY_BYTES]
            .into_iter()
            .chain(ProcessStats::default().by_name().map(|(n, _)| n))
        {
            let def = METRICS.iter().find(|d| d.name == name).unwrap();
            let family = format!(
                "# HELP {name} {}\n# TYPE {name} {}\n{name} ",
                def.help,
                def.kind.as_str()
            );
            assert!(out.contains(&family), "{family} in:\n{out}");
        }
    }
}
