//! The clock behind the duration histograms.
//!
//! Durations on the message path are raw counter readings turned into
//! seconds with one multiplication by a scale computed once: under
//! callgrind, raw reads and the scale cost a small fraction of what
//! `quanta::Instant::now` reads cost
//! (measured: docs/performance.md, "What is decided, and why").
//!
//! Where quanta has calibrated the TSC (x86_64 with an invariant TSC), the
//! TSC is read here directly: `quanta::Clock::raw` reads the same `rdtsc`
//! behind a match on its clock kind, which measured more instructions per
//! read (same section). Elsewhere `quanta::Clock::raw` is used as it is.
//!
//! With `metrics.enabled: false` the handle structs get no [`Timer`], so the
//! message path reads no clock at all and "metrics off" is a truly
//! uninstrumented agent.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::OnceLock;

use metrics::Histogram;

/// Whether handles created from now on time anything; cleared once, at
/// startup, when metrics are disabled.
static TIMING: AtomicBool = AtomicBool::new(true);

/// Whether handle structs created after this call read the clock. The
/// agent turns it off once, at startup, when metrics are disabled; the
/// benchmarks switch it to build "metrics off" handles beside "on" ones.
pub fn set_timing(enabled: bool) {
    TIMING.store(enabled, Ordering::Relaxed);
}

/// Reads the cheapest monotonic clock and turns differences into seconds.
/// An enum rather than a flag, so that with the `Option` around it one
/// discriminant decides off, TSC or quanta in a single branch.
#[derive(Clone)]
pub enum Timer {
    /// quanta calibrated the TSC, so `rdtsc` gives exactly its raw readings.
    Tsc {
        /// Seconds per tick.
        scale: f64,
    },
    /// quanta's other sources, read through quanta.
    Quanta {
        /// The calibrated clock.
        clock: quanta::Clock,
        /// Seconds per raw unit.
        scale: f64,
    },
}

impl Timer {
    /// The process-wide timer, or `None` when metrics are disabled.
    pub fn if_enabled() -> Option<Timer> {
        TIMING
            .load(Ordering::Relaxed)
            .then(|| TIMER.get_or_init(Timer::calibrated).clone())
    }

    fn calibrated() -> Timer {
        let clock = quanta::Clock::new();
        // quanta scales raw ticks linearly; a large span keeps the scale exact.
        const SPAN: u64 = 1 << 40;
        let nanos = clock.delta_as_nanos(0, SPAN);
        let scale = nanos as f64 / SPAN as f64 * 1e-9;
        // quanta's monotonic fallback counts nanoseconds and scales by 1;
        // its TSC source scales by the calibrated frequency.
        if cfg!(target_arch = "x86_64") && nanos != SPAN {
            Timer::Tsc { scale }
        } else {
            Timer::Quanta { clock, scale }
        }
    }

    /// A raw reading, to pass to [`Timer::seconds_since`].
    #[inline]
    pub fn now(&self) -> u64 {
        match self {
            Timer::Tsc { .. } => rdtsc(),
            Timer::Quanta { clock, .. } => clock.raw(),
        }
    }

    /// Seconds since `start`; 0 if the counter appears to have gone back
    /// (readings on different cores can differ slightly).
    #[inline]
    pub fn seconds_since(&self, start: u64) -> f64 {
        let (now, scale) = match self {
            Timer::Tsc { scale } => (rdtsc(), *scale),
            Timer::Quanta { clock, scale } => (clock.raw(), *scale),
        };
        // Through i64: one instruction, where u64 to f64 takes a branch.
        now.saturating_sub(start) as i64 as f64 * scale
    }
}

#[inline(always)]
#[allow(unsafe_code)]
fn rdtsc() -> u64 {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: rdtsc has no preconditions; x86_64 always has it.
    return unsafe { core::arch::x86_64::_rdtsc() };
    #[cfg(not(target_arch = "x86_64"))]
    unreachable!("Timer::Tsc is only chosen on x86_64")
}

static TIMER: OnceLock<Timer> = OnceLock::new();

/// A duration histogram with the timer that feeds it. Without a timer
/// (metrics disabled) starting and recording do nothing, not even read the
/// clock.
#[derive(Clone)]
pub struct DurationHistogram {
    histogram: Histogram,
    timer: Option<Timer>,
}

/// When a timed operation started, from [`DurationHistogram::start`].
#[derive(Clone, Copy, Debug)]
pub struct Start(u64);

impl DurationHistogram {
    /// Times into `histogram` unless timing is disabled.
    pub fn new(histogram: Histogram) -> Self {
        Self::with_timer(histogram, Timer::if_enabled())
    }

    fn with_timer(histogram: Histogram, timer: Option<Timer>) -> Self {
        Self { histogram, timer }
    }

    /// Reads the clock, if timing.
    #[inline]
    pub fn start(&self) -> Start {
        Start(self.timer.as_ref().map_or(0, Timer::now))
    }

    /// Records the seconds since `start`, if timing.
    #[inline]
    pub fn record_since(&self, start: Start) {
        if let Some(timer) = &self.timer {
            self.histogram.record(timer.seconds_since(start.0));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, Instant};

    #[test]
    fn reads_what_quanta_reads() {
        let timer = Timer::calibrated();
        let clock = quanta::Clock::new();
        let (a, ours, b) = (clock.raw(), timer.now(), clock.raw());
        assert!(a <= ours && ours <= b, "{a} {ours} {b}");
    }

    #[test]
    fn without_a_timer_nothing_is_read_or_recorded() {
        use crate::test_support::histogram_count;
        let recorder = metrics_util::debugging::DebuggingRecorder::new();
        let snapshotter = recorder.snapshotter();
        let (off, on) = metrics::with_local_recorder(&recorder, || {
            (
                DurationHistogram::with_timer(metrics::histogram!("off"), None),
                DurationHistogram::with_timer(metrics::histogram!("on"), Some(Timer::calibrated())),
            )
        });
        let start = off.start();
        assert_eq!(start.0, 0, "no clock read");
        off.record_since(start);
        on.record_since(on.start());
        let snap = snapshotter.snapshot().into_vec();
        assert_eq!(histogram_count(&snap, "off", &[]), 0);
        assert_eq!(histogram_count(&snap, "on", &[]), 1);
    }

    #[test]
    fn measures_seconds() {
        let timer = Timer::calibrated();
        let (start, wall) = (timer.now(), Instant::now());
        std::thread::sleep(Duration::from_millis(50));
        let measured = timer.seconds_since(start);
        let wall = wall.elapsed().as_secs_f64();
        // The raw reading is taken after the std one, so it cannot exceed it
        // by more than the calibration error.
        assert!(
            measured >= 0.050 && measured <= wall * 1.01,
            "{measured} s measured, {wall} s wall"
        );
    }
}
