//! The recorder behind the `metrics` facade when `metrics.exporter` is
//! `prometheus`: thread-sharded counters and histograms, merged only when
//! `/metrics` is scraped.
//!
//! Written by hand for speed. `metrics-exporter-prometheus`'s own recorder
//! stamps each histogram sample with the clock, pins a crossbeam-epoch
//! guard, queues the sample and drains it later: many times the
//! instructions per sample of this recorder, and every message records two.
//! Here a sample is a bucket index found by a table lookup on the value's
//! binary exponent and two adds to the calling thread's shard; a counter
//! increment is one add. Shards are padded apart, so threads recording the
//! same series do not bounce a cache line between cores.
//!
//! A shard is written only by the thread that owns it, so its adds are a
//! plain load and store of an atomic, not a locked read-modify-write. On
//! x86 every locked instruction is a full barrier, and a message made six
//! (two counters; a bucket and a sum per histogram): dropping them made a
//! message's metric work markedly faster in time, for the few instructions
//! of the owner check. A thread whose shard another live thread owns
//! records into the series' shared cell with locked adds instead, so every
//! count stays exact.
//! (measured: docs/performance.md, "What is decided, and why"; the
//! candidates compared: docs/performance-history.md, "The recorder
//! candidates".)
//!
//! Gauges are one atomic cell, not sharded: `set` needs a single value, and
//! no gauge is on the message path.
//!
//! The exposition is written with `metrics_exporter_prometheus::formatting`,
//! so names, escaping and layout stay the library's.
//!
//! The cells are in `cells.rs`, the scrape (text and protobuf) in
//! `render.rs`; this file holds the registry of series and the `Recorder`
//! the facade calls.

mod cells;
mod render;
#[cfg(test)]
mod tests;

use std::collections::HashMap;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use metrics::{Counter, Gauge, Histogram, Key, KeyName, Metadata, Recorder, SharedString, Unit};
use metrics_exporter_prometheus::formatting::sanitize_metric_name;

use super::defs::{LATENCY_BUCKETS, METRICS};
use super::native::{NativeBuckets, NativeSettings, NativeSnapshot};
#[cfg(test)]
pub(crate) use cells::MAX_BOUNDS;
use cells::{NativeHistogram, ShardedCounter, ShardedHistogram, SHARDS};
pub(crate) use render::{family_header, label_set};

/// A registered histogram, of either kind.
#[derive(Clone)]
enum HistogramSeries {
    Classic(Arc<ShardedHistogram>),
    Native(Arc<NativeHistogram>),
}

impl HistogramSeries {
    /// Bucket bounds, cumulative classic counts, the sum and the native
    /// buckets (when kept), read now. The native buckets are read first,
    /// so a sample recorded in between shows in the sum (and, through its
    /// row, in both kinds of buckets) rather than in one kind only.
    /// `native` false skips merging the native buckets (a text scrape):
    /// the classic counts still include the samples counted in rows.
    fn read(&self, native: bool) -> (&'static [f64], Vec<u64>, f64, Option<NativeSnapshot>) {
        match self {
            Self::Classic(h) => {
                let (counts, sum) = h.merged();
                (h.bounds, counts, sum, None)
            }
            Self::Native(h) if native => {
                let (native, classic) = h.native.snapshot();
                let (counts, sum) = h.classic.merged_with(&classic);
                (h.classic.bounds, counts, sum, Some(native))
            }
            Self::Native(h) => {
                let (counts, sum) = h.classic.merged_with(&h.native.classic_counts());
                (h.classic.bounds, counts, sum, None)
            }
        }
    }

    fn handle(&self) -> Histogram {
        match self {
            Self::Classic(h) => Histogram::from_arc(Arc::clone(h)),
            Self::Native(h) => Histogram::from_arc(Arc::clone(h)),
        }
    }
}

/// Every series recorded so far, and the HELP text of every described name.
#[derive(Default)]
struct Registry {
    counters: Mutex<HashMap<Key, Arc<ShardedCounter>>>,
    gauges: Mutex<HashMap<Key, Arc<AtomicU64>>>,
    histograms: Mutex<HashMap<Key, HistogramSeries>>,
    descriptions: Mutex<HashMap<String, SharedString>>,
    /// Native buckets for every histogram, when enabled.
    native: Option<NativeSettings>,
}

/// Registration and rendering tolerate a poisoned lock: the maps hold no
/// invariant that a panicking thread could have broken half-way.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// The agent's recorder. Cloning it gives another handle on the same series,
/// which is how the `/metrics` endpoint reads what the facade records.
#[derive(Clone, Default)]
pub struct ShardedRecorder {
    registry: Arc<Registry>,
}

impl ShardedRecorder {
    /// A recorder with no series yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// A recorder whose histograms keep native buckets too, as `native`
    /// sets (None: classic buckets only, as [`Self::new`]).
    pub fn with_native(native: Option<NativeSettings>) -> Self {
        Self {
            registry: Arc::new(Registry {
                native,
                ..Registry::default()
            }),
        }
    }

    fn describe(&self, key: KeyName, description: SharedString) {
        lock(&self.registry.descriptions).insert(sanitize_metric_name(key.as_str()), description);
    }
}

/// The bucket bounds the catalog gives a histogram; the latency buckets for
/// a name it does not know, so every histogram renders as one.
fn bounds_for(name: &str) -> &'static [f64] {
    METRICS
        .iter()
        .find(|d| d.name == name)
        .and_then(|d| d.buckets)
        .unwrap_or(LATENCY_BUCKETS)
}

impl Recorder for ShardedRecorder {
    fn describe_counter(&self, key: KeyName, _unit: Option<Unit>, description: SharedString) {
        self.describe(key, description);
    }

    fn describe_gauge(&self, key: KeyName, _unit: Option<Unit>, description: SharedString) {
        self.describe(key, description);
    }

    fn describe_histogram(&self, key: KeyName, _unit: Option<Unit>, description: SharedString) {
        self.describe(key, description);
    }

    fn register_counter(&self, key: &Key, _metadata: &Metadata<'_>) -> Counter {
        let mut counters = lock(&self.registry.counters);
        let counter = counters
            .entry(key.clone())
            .or_insert_with(|| Arc::new(ShardedCounter::new()));
        Counter::from_arc(Arc::clone(counter))
    }

    fn register_gauge(&self, key: &Key, _metadata: &Metadata<'_>) -> Gauge {
        let mut gauges = lock(&self.registry.gauges);
        let gauge = gauges
            .entry(key.clone())
            .or_insert_with(|| Arc::new(AtomicU64::new(0f64.to_bits())));
        Gauge::from_arc(Arc::clone(gauge))
    }

    fn register_histogram(&self, key: &Key, _metadata: &Metadata<'_>) -> Histogram {
        let mut histograms = lock(&self.registry.histograms);
        let series = histograms.entry(key.clone()).or_insert_with(|| {
            let bounds = bounds_for(key.name());
            let classic = ShardedHistogram::new(bounds);
            match self.registry.native {
                None => HistogramSeries::Classic(Arc::new(classic)),
                Some(settings) => HistogramSeries::Native(Arc::new(NativeHistogram {
                    classic,
                    native: NativeBuckets::new(settings, SHARDS, bounds),
                })),
            }
        });
        series.handle()
    }
}
