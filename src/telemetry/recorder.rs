//! The recorder behind the `metrics` facade when `metrics.exporter` is
//! `prometheus`: thread-sharded counters and histograms, merged only when
//! `/metrics` is scraped.
//!
//! Written by hand for speed. `metrics-exporter-prometheus`'s own recorder
//! costs about 280 instructions per histogram sample (it stamps each sample
//! with the clock, pins a crossbeam-epoch guard, queues 24 bytes and drains
//! them later), and every message records two samples: 6% of a local get.
//! Here a sample is a bucket index found by a table lookup on the value's
//! binary exponent and two adds to the calling thread's shard: 28
//! instructions with the owner check, as callgrind places them in the agent;
//! a counter increment is one add, 10. Shards are padded apart, so
//! threads recording the same series do not bounce a cache line between
//! cores.
//!
//! A shard is written only by the thread that owns it, so its adds are a
//! plain load and store of an atomic, not a locked read-modify-write. On
//! x86 every locked instruction is a full barrier, and a message made six
//! (two counters; a bucket and a sum per histogram). Measured with criterion
//! on an Intel Xeon VM: the metric work of a message went from 127.6 to
//! 74.6 ns, a counter increment from 9.4 to 3.2 ns and a histogram sample
//! from 16.9 to 3.6 ns, for 8 more instructions per message (the owner
//! check). A thread whose shard another live thread owns records into the
//! series' shared cell with locked adds instead, so every count stays
//! exact.
//! The measurements, and the candidates compared, are in
//! docs/performance.md.
//!
//! Gauges are one atomic cell, not sharded: `set` needs a single value, and
//! no gauge is on the message path.
//!
//! The exposition is written with `metrics_exporter_prometheus::formatting`,
//! so names, escaping and layout stay the library's.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use metrics::{
    Counter, CounterFn, Gauge, Histogram, HistogramFn, Key, KeyName, Metadata, Recorder,
    SharedString, Unit,
};
use metrics_exporter_prometheus::formatting::{
    sanitize_metric_name, write_help_line, write_metric_line, write_type_line,
};
use metrics_exporter_prometheus::LabelSet;

use super::defs::{LATENCY_BUCKETS, METRICS};
use super::native::{NativeBuckets, NativeSettings, NativeSnapshot};
use super::protobuf::{self, MetricType};

/// Shards per counter and histogram. A power of two, so the shard index is a
/// mask; 16 covers the tokio workers, storage threads and helpers of a busy
/// agent with few threads sharing a shard.
const SHARDS: usize = 16;

/// Bucket slots per histogram shard: the bounds, then +Inf. A power of two,
/// so the bucket search indexes with a mask instead of bounds checks.
const SLOTS: usize = 32;

/// Most bucket bounds a histogram may have (the catalog uses 19).
pub(crate) const MAX_BOUNDS: usize = SLOTS - 1;

/// Top bits of a sample that index [`ShardedHistogram::skip`]: sign,
/// exponent and two mantissa bits.
const SKIP_BITS: u32 = 14;

/// The calling thread: an identity no other live thread has (never 0), and
/// the shard it records into when it owns that shard.
///
/// On x86_64 Linux both come from the thread pointer, which `%fs:0` holds
/// (the x86-64 ELF TLS ABI): one load, no call. Thread stacks, and the
/// thread pointer at their top, are mapped about 2 MiB apart (Rust's default
/// thread stack), so bits 21 and up give threads created one after another
/// consecutive shards. Reading a `thread_local!` instead measured 12 more
/// instructions per record: the library is compiled position-independent,
/// so LLVM assumes a `__tls_get_addr` call and saves registers around it,
/// even after the linker relaxes the call away.
///
/// A thread that exits leaves its shard owned by its identity. A later
/// thread given the same thread pointer (glibc reuses stacks) takes the
/// shard over, which is safe: the owner is gone, and its exit happened
/// before the new thread began (the argument is at the `unsafe` block
/// below). A later thread with another identity that maps to that shard
/// uses the shared cell: slower, still exact. So does the first thread a
/// process spawns when the main thread has recorded the same series first:
/// its stack is mapped just below the main thread's thread pointer (about
/// 4 KiB apart here), so the two share a shard.
///
/// Elsewhere (aarch64, or an OS other than Linux) the identity is the
/// address of a thread-local and the shard comes from a counter: a few
/// instructions more, the same guarantees.
#[inline(always)]
#[allow(unsafe_code)]
fn this_thread() -> (usize, usize) {
    #[cfg(all(target_arch = "x86_64", target_os = "linux"))]
    {
        let thread_pointer: usize;
        // SAFETY: on x86_64 Linux, glibc and musl alike, %fs:0 holds the
        // thread control block's pointer to itself, set before any Rust
        // code runs on the thread and never changed while the thread lives
        // (the x86-64 ELF TLS ABI, which thread-locals rely on too). The
        // load reads 8 bytes the thread owns and writes nothing.
        //
        // `pure` with `readonly` lets the compiler merge repeated reads or
        // drop unused ones. That is sound because the value is constant for
        // as long as one function body runs: a body runs on one thread (an
        // async task changes threads only between polls, and no caller
        // keeps the value across an `.await`).
        //
        // Why owner-only adds stay exact when a new thread inherits an
        // exited one's identity: the new thread gets the same thread
        // pointer only when the C library reuses the old thread's stack and
        // control block, which it does only after the kernel has cleared
        // the old thread's tid at exit, so after the old thread's last
        // store. The library takes that block from its stack cache under
        // a lock and then creates the new thread, and thread creation
        // synchronizes with the new thread's start. So the old owner's
        // stores happen before the new owner's first load, which sees
        // them, and no increment is lost. The thread-local fallback below
        // rests on the same chain, through the reuse of the TLS block.
        unsafe {
            std::arch::asm!(
                "mov {}, qword ptr fs:[0]",
                out(reg) thread_pointer,
                options(nostack, readonly, preserves_flags, pure)
            );
        }
        (thread_pointer, (thread_pointer >> 21) & (SHARDS - 1))
    }
    #[cfg(not(all(target_arch = "x86_64", target_os = "linux")))]
    {
        static NEXT_SHARD: AtomicUsize = AtomicUsize::new(0);
        thread_local! {
            static SHARD: usize = NEXT_SHARD.fetch_add(1, Relaxed) % SHARDS;
        }
        // A live thread-local's address is unique among live threads.
        SHARD.with(|s| (s as *const usize as usize, *s))
    }
}

/// Claims a shard for `me` when no thread has yet: the first record of a
/// series on each thread. Only the owner adds to a shard's cells without a
/// locked instruction; everyone else uses the shared cell.
///
/// A shard with an owner is not tried again: a locked compare-exchange on
/// every record would make the shared cell's users slower still.
#[inline(always)]
fn claim(owner: &AtomicUsize, me: usize) -> bool {
    owner.load(Relaxed) == 0 && owner.compare_exchange(0, me, Relaxed, Relaxed).is_ok()
}

/// Adds to a cell that only the calling thread writes: a load and a store,
/// which readers see whole, instead of a locked read-modify-write.
#[inline(always)]
pub(crate) fn owner_add(cell: &AtomicU64, value: u64) {
    cell.store(cell.load(Relaxed).wrapping_add(value), Relaxed);
}

/// One thread's cell of a counter, padded to 128 bytes so that no two
/// shards share a cache line, whatever the allocation's alignment.
///
/// Padding rather than an over-aligned type (`#[repr(align(128))]`,
/// crossbeam's `CachePadded`): over-aligned allocations go through
/// `memalign`, whose leftover fragments then sit in malloc's free lists, and
/// the message path's own small allocations measured 40 to 50 more
/// instructions per message in `_int_malloc` with them.
#[repr(C)]
struct CounterShard {
    value: AtomicU64,
    /// The identity of the thread that writes `value` ([`this_thread`]);
    /// 0 until one claims it.
    owner: AtomicUsize,
    _pad: [u64; 14],
}

impl CounterShard {
    fn new() -> Self {
        Self {
            value: AtomicU64::new(0),
            owner: AtomicUsize::new(0),
            _pad: [0; 14],
        }
    }
}

/// A counter split into per-thread cells; its value is their sum.
pub(crate) struct ShardedCounter {
    shards: [CounterShard; SHARDS],
    /// For threads whose shard another thread owns: locked adds.
    shared: CounterShard,
    /// The floor set by `absolute`, for counters mirrored from elsewhere.
    absolute: AtomicU64,
}

impl ShardedCounter {
    fn new() -> Self {
        Self {
            shards: std::array::from_fn(|_| CounterShard::new()),
            shared: CounterShard::new(),
            absolute: AtomicU64::new(0),
        }
    }

    /// The slow path of [`CounterFn::increment`]: a thread that does not
    /// own its shard yet.
    ///
    /// A separate cold function that the record path calls last, with only
    /// the owner check inline: a call in the middle made the fast path save
    /// and restore three registers (6 of its instructions).
    #[cold]
    #[inline(never)]
    fn increment_unowned(&self, value: u64, me: usize, shard: &CounterShard) {
        if claim(&shard.owner, me) {
            owner_add(&shard.value, value);
        } else {
            self.shared.value.fetch_add(value, Relaxed);
        }
    }

    fn value(&self) -> u64 {
        let sum = self
            .shards
            .iter()
            .chain([&self.shared])
            .fold(0u64, |acc, s| acc.wrapping_add(s.value.load(Relaxed)));
        sum.max(self.absolute.load(Relaxed))
    }
}

impl CounterFn for ShardedCounter {
    #[inline]
    fn increment(&self, value: u64) {
        let (me, i) = this_thread();
        let shard = &self.shards[i];
        if shard.owner.load(Relaxed) == me {
            owner_add(&shard.value, value);
        } else {
            self.increment_unowned(value, me, shard);
        }
    }

    fn absolute(&self, value: u64) {
        self.absolute.fetch_max(value, Relaxed);
    }
}

/// One thread's share of a histogram: a count per bucket (the last one for
/// values above every bound) and the sum of the values, as `f64` bits.
/// The padding keeps 64 bytes between the cells that two shards write per
/// sample, so they never share a cache line
/// (see [`CounterShard`] for why not alignment).
///
/// The owner and the sum, which every sample reads, come first, so the
/// lowest buckets (where a fast backend's durations fall) often share their
/// cache line.
#[repr(C)]
struct HistogramShard {
    /// The identity of the thread that writes this shard ([`this_thread`]);
    /// 0 until one claims it.
    owner: AtomicUsize,
    sum: AtomicU64,
    counts: [AtomicU64; SLOTS],
    _pad: [u64; 7],
}

impl HistogramShard {
    fn new() -> Self {
        Self {
            counts: std::array::from_fn(|_| AtomicU64::new(0)),
            sum: AtomicU64::new(0),
            owner: AtomicUsize::new(0),
            _pad: [0; 7],
        }
    }

    /// Adds a sample to a shard that only the calling thread writes.
    #[inline(always)]
    fn add(&self, bucket: usize, value: f64) {
        self.add_sum(value);
        owner_add(&self.counts[bucket], 1);
    }

    /// Adds to the sum of a shard that only the calling thread writes.
    #[inline(always)]
    fn add_sum(&self, value: f64) {
        let sum = f64::from_bits(self.sum.load(Relaxed)) + value;
        self.sum.store(sum.to_bits(), Relaxed);
    }

    /// Adds to the sum of a shard that any thread writes.
    fn add_sum_shared(&self, value: f64) {
        let mut old = self.sum.load(Relaxed);
        loop {
            let new = (f64::from_bits(old) + value).to_bits();
            match self.sum.compare_exchange_weak(old, new, Relaxed, Relaxed) {
                Ok(_) => break,
                Err(current) => old = current,
            }
        }
    }
}

/// A histogram with fixed bucket bounds, split into per-thread shards.
/// Its count is the sum of its buckets, so a sample is two adds.
#[repr(C)]
pub(crate) struct ShardedHistogram {
    bounds: &'static [f64],
    /// `bounds`, then +Inf up to the end: a value above every bound stops
    /// the bucket search at `bounds.len()`, the +Inf slot.
    padded: [f64; SLOTS],
    /// For each value of a sample's top [`SKIP_BITS`] bits (sign, binary
    /// exponent and the first two mantissa bits), how many bounds lie below
    /// every value with those bits. The search for a sample's bucket starts
    /// there, so it compares against at most the bounds in a quarter of a
    /// binary octave (at most one of the 1-2.5-5 latency buckets) instead
    /// of searching all of them. With 12 bits (whole octaves) the search
    /// stepped past 1.9 bounds per sample on local gets, with 14 bits 1.2
    /// (callgrind's line counts of the loop).
    ///
    /// In the struct rather than boxed: a sample then loads its entry
    /// directly instead of a pointer first, one instruction and one cache
    /// line fewer. With the shard order of [`HistogramShard`], this took
    /// the cache lines that one message's metric work misses after other
    /// work has evicted L1 from 21.1 to 17.8 (callgrind's cache simulation
    /// of `instrumentation_cold/evict_l1`, docs/performance.md).
    skip: [u8; 1 << SKIP_BITS],
    /// Keeps the shards' cells out of the cache lines of the fields above,
    /// which every recording thread reads (`repr(C)` keeps this order).
    /// Without it the owner of shard 0 wrote into a line the other threads
    /// read: two threads on one series cost 4% to 11% more per record than
    /// one, against 1% to 3% for threads sharing nothing at all
    /// (`contention/private_cells`, criterion, eight runs each); with it, the
    /// two are alike.
    _gap: [u64; 16],
    shards: [HistogramShard; SHARDS],
    /// For threads whose shard another thread owns: locked adds.
    shared: HistogramShard,
}

impl ShardedHistogram {
    fn new(bounds: &'static [f64]) -> Self {
        assert!(
            !bounds.is_empty()
                && bounds.len() <= MAX_BOUNDS
                && bounds.windows(2).all(|w| w[0] < w[1]),
            "a histogram takes 1 to {MAX_BOUNDS} increasing bounds"
        );
        let mut padded = [f64::INFINITY; SLOTS];
        padded[..bounds.len()].copy_from_slice(bounds);
        let mut skip = [0u8; 1 << SKIP_BITS];
        for (top, below) in skip.iter_mut().enumerate() {
            *below = bounds.partition_point(|&b| b < row_floor(top as u64)) as u8;
        }
        Self {
            bounds,
            padded,
            skip,
            _gap: [0; 16],
            shards: std::array::from_fn(|_| HistogramShard::new()),
            shared: HistogramShard::new(),
        }
    }

    /// The first bound >= `value` (Prometheus buckets are `le`), or
    /// `bounds.len()` (+Inf) for values above every bound and for NaN, as
    /// client_golang's `sort.SearchFloat64s` places them.
    #[inline]
    fn bucket(&self, value: f64) -> usize {
        // A NaN's top bits are those of an infinity: a negative NaN would
        // start at -Inf's row and stop in the lowest bucket. Two
        // instructions (compare, branch) per sample.
        if value.is_nan() {
            return self.bounds.len();
        }
        // `padded[bounds.len()]` is +Inf, so the search stops there at the
        // latest: the masks never change an index.
        let mut i = self.skip[(value.to_bits() >> (64 - SKIP_BITS)) as usize] as usize;
        while self.padded[i & (SLOTS - 1)] < value {
            i += 1;
        }
        i & (SLOTS - 1)
    }

    /// The slow path of [`HistogramFn::record`]: a thread that does not own
    /// its shard yet. Cold and called last, for the reason given at
    /// [`ShardedCounter::increment_unowned`].
    #[cold]
    #[inline(never)]
    fn record_unowned(&self, value: f64, me: usize, i: usize) {
        let shard = &self.shards[i];
        let bucket = self.bucket(value);
        if claim(&shard.owner, me) {
            return shard.add(bucket, value);
        }
        self.shared.add_sum_shared(value);
        self.shared.counts[bucket].fetch_add(1, Relaxed);
    }

    /// Cumulative bucket counts (one per bound, then +Inf) and the sum.
    pub(crate) fn merged(&self) -> (Vec<u64>, f64) {
        self.merged_with(&[])
    }

    /// [`Self::merged`], with `extra` samples per bucket (not cumulative)
    /// counted elsewhere: a native histogram's rows.
    fn merged_with(&self, extra: &[u64]) -> (Vec<u64>, f64) {
        let mut counts = vec![0u64; self.bounds.len() + 1];
        for (total, extra) in counts.iter_mut().zip(extra) {
            *total += extra;
        }
        let mut sum = 0.0;
        for shard in self.shards.iter().chain([&self.shared]) {
            for (total, c) in counts.iter_mut().zip(&shard.counts) {
                *total += c.load(Relaxed);
            }
            sum += f64::from_bits(shard.sum.load(Relaxed));
        }
        for i in 1..counts.len() {
            counts[i] += counts[i - 1];
        }
        (counts, sum)
    }
}

/// A number no value whose top [`SKIP_BITS`] bits are `top` is below:
/// every bound under it is under every such value, so the bucket search may
/// skip it.
///
/// A positive row starts at its own bits with the rest zero (0 for the
/// first zero and subnormal row, +Inf for the infinity's). A negative row
/// holds magnitudes below the next row's start, so it lies above minus
/// that; the negative rows of the all-ones exponent are -Inf (their NaNs
/// never reach the table).
fn row_floor(top: u64) -> f64 {
    let shift = 64 - SKIP_BITS;
    let magnitude = top & ((1 << (SKIP_BITS - 1)) - 1);
    if top >> (SKIP_BITS - 1) == 0 {
        f64::from_bits(magnitude << shift)
    } else if magnitude >> (SKIP_BITS - 12) == 0x7FF {
        f64::NEG_INFINITY
    } else {
        -f64::from_bits((magnitude + 1) << shift)
    }
}

impl HistogramFn for ShardedHistogram {
    /// A NaN sample counts in +Inf and makes the sum NaN, as in
    /// client_golang.
    #[inline]
    fn record(&self, value: f64) {
        let (me, i) = this_thread();
        let shard = &self.shards[i];
        if shard.owner.load(Relaxed) == me {
            shard.add(self.bucket(value), value);
        } else {
            self.record_unowned(value, me, i);
        }
    }
}

/// A histogram that keeps native buckets beside its classic ones
/// (`metrics.native_histograms.enabled`).
///
/// A sample is counted once, in a cell of its native bucket's row that
/// also tells its classic bucket ([`NativeBuckets::add`]); the classic
/// counts are summed from those cells at the scrape. Only samples without
/// such a cell (the native cold path) go through the classic bucket search.
/// Recording both kinds apart cost 52 more instructions per message than
/// classic buckets alone on local gets; this way 22 (docs/performance.md,
/// "Native histograms").
///
/// A type of its own rather than an optional field, so that neither kind
/// checks the setting per sample.
pub(crate) struct NativeHistogram {
    classic: ShardedHistogram,
    native: NativeBuckets,
}

impl NativeHistogram {
    /// The slow path of [`HistogramFn::record`]: a thread that does not own
    /// its shard yet, or a sample whose row has no cells yet (or never
    /// will). Cold and called last, as [`ShardedHistogram::record_unowned`],
    /// so the fast path saves no registers.
    #[cold]
    #[inline(never)]
    fn record_slow(&self, value: f64, me: usize, i: usize) {
        let shard = &self.classic.shards[i];
        if shard.owner.load(Relaxed) == me || claim(&shard.owner, me) {
            shard.add_sum(value);
            if !self.native.add(i, true, value) {
                owner_add(&shard.counts[self.classic.bucket(value)], 1);
            }
            return;
        }
        let shared = &self.classic.shared;
        shared.add_sum_shared(value);
        if !self.native.add(SHARDS, false, value) {
            shared.counts[self.classic.bucket(value)].fetch_add(1, Relaxed);
        }
    }
}

impl HistogramFn for NativeHistogram {
    /// As [`ShardedHistogram`]'s; NaN counts in no native bucket.
    #[inline]
    fn record(&self, value: f64) {
        let (me, i) = this_thread();
        let shard = &self.classic.shards[i];
        let bits = value.to_bits();
        let row = self.native.row(bits);
        if shard.owner.load(Relaxed) == me && !row.is_null() {
            shard.add_sum(value);
            return owner_add(self.native.cell(row, i, bits), 1);
        }
        self.record_slow(value, me, i);
    }
}

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

    /// Appends every series in the Prometheus text format 0.0.4: one family
    /// per name, sorted by name, its series sorted by labels.
    pub fn render_into(&self, out: &mut String) {
        let descriptions = lock(&self.registry.descriptions);
        let help = |name: &str| descriptions.get(name).map(|d| d.as_ref());

        let counters = families(&lock(&self.registry.counters), |c| c.value());
        for (name, series) in counters {
            family_header(out, &name, help(&name), "counter");
            for (labels, value) in series {
                write_metric_line::<&str, u64>(out, &name, None, &labels, None, value, None);
            }
            out.push('\n');
        }

        let gauges = families(&lock(&self.registry.gauges), |g| {
            f64::from_bits(g.load(Relaxed))
        });
        for (name, series) in gauges {
            family_header(out, &name, help(&name), "gauge");
            for (labels, value) in series {
                write_metric_line::<&str, f64>(out, &name, None, &labels, None, value, None);
            }
            out.push('\n');
        }

        let histograms = families(&lock(&self.registry.histograms), |h| {
            let (bounds, counts, sum, _) = h.read(false);
            (bounds, (counts, sum))
        });
        for (name, series) in histograms {
            family_header(out, &name, help(&name), "histogram");
            for (labels, (bounds, (counts, sum))) in series {
                for (le, count) in bounds.iter().zip(&counts) {
                    write_metric_line(
                        out,
                        &name,
                        Some("bucket"),
                        &labels,
                        Some(("le", le)),
                        count,
                        None,
                    );
                }
                let count = counts.last().copied().unwrap_or(0);
                write_metric_line(
                    out,
                    &name,
                    Some("bucket"),
                    &labels,
                    Some(("le", "+Inf")),
                    count,
                    None,
                );
                write_metric_line::<&str, f64>(out, &name, Some("sum"), &labels, None, sum, None);
                write_metric_line::<&str, u64>(
                    out,
                    &name,
                    Some("count"),
                    &labels,
                    None,
                    count,
                    None,
                );
            }
            out.push('\n');
        }
    }

    /// Appends every series as length-delimited protobuf `MetricFamily`
    /// messages, in the text format's order; histograms carry their native
    /// buckets when they keep them.
    pub fn render_protobuf_into(&self, out: &mut Vec<u8>) {
        let descriptions = lock(&self.registry.descriptions);
        let help = |name: &str| descriptions.get(name).map(|d| d.as_ref());

        for (name, series) in by_name(&lock(&self.registry.counters)) {
            let mut family = protobuf::family(&name, help(&name), MetricType::Counter);
            for (key, counter) in series {
                let metric = protobuf::counter(protobuf::labels(key), counter.value());
                family.metric.push(metric);
            }
            protobuf::write_delimited(out, &family);
        }
        for (name, series) in by_name(&lock(&self.registry.gauges)) {
            let mut family = protobuf::family(&name, help(&name), MetricType::Gauge);
            for (key, gauge) in series {
                let value = f64::from_bits(gauge.load(Relaxed));
                family
                    .metric
                    .push(protobuf::gauge(protobuf::labels(key), value));
            }
            protobuf::write_delimited(out, &family);
        }
        for (name, series) in by_name(&lock(&self.registry.histograms)) {
            let mut family = protobuf::family(&name, help(&name), MetricType::Histogram);
            for (key, histogram) in series {
                let (bounds, counts, sum, native) = histogram.read(true);
                family.metric.push(protobuf::histogram(
                    protobuf::labels(key),
                    bounds,
                    &counts,
                    sum,
                    native,
                ));
            }
            protobuf::write_delimited(out, &family);
        }
    }

    fn describe(&self, key: KeyName, description: SharedString) {
        lock(&self.registry.descriptions).insert(sanitize_metric_name(key.as_str()), description);
    }
}

/// Writes a family's HELP (when described) and TYPE lines.
pub(crate) fn family_header(out: &mut String, name: &str, help: Option<&str>, kind: &str) {
    if let Some(help) = help {
        write_help_line(out, name, None, None, help);
    }
    write_type_line(out, name, None, None, kind);
}

/// The exporter's label set for a key (the agent sets no global labels).
pub(crate) fn label_set(key: &Key) -> LabelSet {
    LabelSet::from_key_and_global(key, &indexmap::IndexMap::new())
}

/// Series grouped by sanitized name, each with its label set and a value
/// read now, both levels sorted so the page is stable between scrapes.
fn families<M, V>(
    series: &HashMap<Key, M>,
    read: impl Fn(&M) -> V,
) -> BTreeMap<String, Vec<(LabelSet, V)>> {
    by_name(series)
        .into_iter()
        .map(|(name, series)| {
            let series = series
                .into_iter()
                .map(|(key, metric)| (label_set(key), read(metric)))
                .collect();
            (name, series)
        })
        .collect()
}

/// Series grouped by sanitized name, both levels sorted.
fn by_name<M>(series: &HashMap<Key, M>) -> BTreeMap<String, Vec<(&Key, &M)>> {
    let mut by_name: BTreeMap<String, Vec<(&Key, &M)>> = BTreeMap::new();
    for (key, metric) in series {
        by_name
            .entry(sanitize_metric_name(key.name()))
            .or_default()
            .push((key, metric));
    }
    for series in by_name.values_mut() {
        series.sort_by(|a, b| a.0.labels().cmp(b.0.labels()));
    }
    by_name
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

#[cfg(test)]
mod tests {
    use super::*;

    const BOUNDS: &[f64] = &[0.001, 0.01, 0.1];

    #[test]
    fn buckets_are_le_and_cumulative_across_threads() {
        let h = Arc::new(ShardedHistogram::new(BOUNDS));
        let samples = [0.0005, 0.001, 0.002, 0.01, 0.05, 0.1, 0.5, 7.0];
        std::thread::scope(|s| {
            for _ in 0..4 {
                let h = Arc::clone(&h);
                s.spawn(move || {
                    for v in samples {
                        h.record(v);
                    }
                });
            }
        });
        let (counts, sum) = h.merged();
        // le=0.001: 0.0005 and 0.001; le=0.01: +0.002, 0.01; le=0.1: +0.05, 0.1.
        assert_eq!(counts, vec![8, 16, 24, 32]);
        let want: f64 = samples.iter().sum::<f64>() * 4.0;
        assert!((sum - want).abs() < 1e-9, "{sum} vs {want}");
    }

    /// The bucket as the exposition defines it: the first bound the value
    /// is at most, else +Inf (NaN included, as client_golang places it).
    fn linear_search(bounds: &[f64], v: f64) -> usize {
        bounds.iter().position(|&b| v <= b).unwrap_or(bounds.len())
    }

    /// 2^e exactly, subnormals included.
    fn pow2(e: i32) -> f64 {
        if e >= -1022 {
            f64::from_bits(((e + 1023) as u64) << 52)
        } else {
            f64::from_bits(1 << (e + 1074))
        }
    }

    /// Values of every class of f64, for `bounds`: both zeros, subnormals,
    /// the smallest normal, each bound exactly and one ulp either side,
    /// powers of two, infinities, NaNs of both signs and with payloads, and
    /// huge values; each also negated.
    fn every_class(bounds: &[f64]) -> Vec<f64> {
        let mut values = vec![
            0.0,
            5e-324,
            f64::from_bits(0x000F_FFFF_FFFF_FFFF),
            f64::from_bits(0x0000_0000_DEAD_BEEF),
            f64::MIN_POSITIVE,
            f64::MIN_POSITIVE.next_down(),
            1.0,
            1e300,
            f64::MAX,
            f64::MAX.next_down(),
            f64::INFINITY,
            f64::NAN,
            f64::from_bits(0x7FF0_0000_0000_0001),
            f64::from_bits(0x7FF8_0000_0000_1234),
            f64::from_bits(0x7FFF_FFFF_FFFF_FFFF),
        ];
        values.extend((-1074..=1023).map(pow2));
        for &b in bounds {
            values.extend([b, b.next_down(), b.next_up(), b * 0.999, b * 1.001]);
        }
        let negated: Vec<f64> = values.iter().map(|v| -v).collect();
        values.extend(negated);
        values
    }

    /// Bound sets that reach every row of the skip table: the catalog's,
    /// one with negative, zero, subnormal and huge bounds, the most bounds
    /// a histogram may have, and a single bound.
    fn bound_sets() -> Vec<Vec<f64>> {
        vec![
            LATENCY_BUCKETS.to_vec(),
            vec![
                -1e300,
                -10.0,
                -1.0,
                -1e-300,
                -5e-324,
                0.0,
                5e-324,
                1e-310,
                1.0,
                1e300,
                f64::MAX,
            ],
            (0..MAX_BOUNDS as i32).map(|i| pow2(i * 60 - 930)).collect(),
            vec![0.5],
        ]
    }

    #[test]
    fn bucket_lookup_agrees_with_a_linear_search_for_every_class_of_f64() {
        for bounds in bound_sets() {
            let bounds: &'static [f64] = Box::leak(bounds.into_boxed_slice());
            let h = ShardedHistogram::new(bounds);
            for v in every_class(bounds) {
                assert_eq!(
                    h.bucket(v),
                    linear_search(bounds, v),
                    "{v:e} ({:#018x}) in {bounds:?}",
                    v.to_bits()
                );
            }
            // Random bit patterns, so every sign, exponent and payload is
            // met; a fixed seed keeps a failure reproducible.
            let mut x = 0x9E37_79B9_7F4A_7C15u64;
            for _ in 0..200_000 {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                let v = f64::from_bits(x);
                assert_eq!(
                    h.bucket(v),
                    linear_search(bounds, v),
                    "{x:#018x} in {bounds:?}"
                );
            }
        }
    }

    #[test]
    fn nan_of_either_sign_counts_in_inf_as_in_client_golang() {
        let h = ShardedHistogram::new(BOUNDS);
        h.record(f64::NAN);
        h.record(-f64::NAN);
        // What x86 computes for 0.0 / 0.0: the sign bit set.
        let zero = std::hint::black_box(0.0f64);
        h.record(zero / zero);
        let (counts, sum) = h.merged();
        assert_eq!(counts, vec![0, 0, 0, 3]);
        assert!(sum.is_nan());
    }

    #[test]
    fn counters_sum_their_shards_and_respect_absolute() {
        let c = Arc::new(ShardedCounter::new());
        std::thread::scope(|s| {
            for _ in 0..SHARDS + 3 {
                let c = Arc::clone(&c);
                s.spawn(move || (0..1000).for_each(|_| c.increment(1)));
            }
        });
        assert_eq!(c.value(), (SHARDS as u64 + 3) * 1000);
        c.absolute(1_000_000);
        assert_eq!(c.value(), 1_000_000);
    }

    /// More live threads than shards: by pigeonhole some find their shard
    /// owned and record into the shared cell, and every count stays exact.
    #[test]
    fn threads_beyond_the_shards_count_exactly_in_the_shared_cell() {
        const THREADS: usize = 3 * SHARDS;
        const RECORDS: u64 = 2000;
        let c = ShardedCounter::new();
        let h = ShardedHistogram::new(BOUNDS);
        // Every thread is alive before any records, so no two share an identity.
        let all_alive = std::sync::Barrier::new(THREADS);
        std::thread::scope(|s| {
            for _ in 0..THREADS {
                s.spawn(|| {
                    all_alive.wait();
                    for _ in 0..RECORDS {
                        c.increment(1);
                        h.record(0.005);
                    }
                    all_alive.wait();
                });
            }
        });
        let total = THREADS as u64 * RECORDS;
        assert_eq!(c.value(), total);
        let (counts, sum) = h.merged();
        assert_eq!(counts, vec![0, total, total, total]);
        assert!((sum - 0.005 * total as f64).abs() < 1e-6, "{sum}");
        // At most SHARDS threads own a shard of each series; the rest used
        // its shared cell.
        let least = (THREADS - SHARDS) as u64 * RECORDS;
        let shared = c.shared.value.load(Relaxed);
        assert!(shared >= least, "{shared}");
        let shared = h.shared.counts[1].load(Relaxed);
        assert!(shared >= least, "{shared}");
    }

    /// Native buckets count every sample once, owned shards and the shared
    /// one alike, and agree with the classic count.
    #[test]
    fn native_buckets_count_every_sample_beyond_the_shards() {
        const THREADS: usize = 3 * SHARDS;
        const RECORDS: u64 = 500;
        let settings = NativeSettings {
            schema: 3,
            max_buckets: 160,
            zero_threshold: 2f64.powi(-128),
        };
        let recorder = ShardedRecorder::with_native(Some(settings));
        let key = Key::from_static_name("message_processing_duration_seconds");
        let metadata = Metadata::new(module_path!(), metrics::Level::INFO, None);
        let histogram = recorder.register_histogram(&key, &metadata);
        let all_alive = std::sync::Barrier::new(THREADS);
        std::thread::scope(|s| {
            for t in 0..THREADS {
                let (histogram, all_alive) = (&histogram, &all_alive);
                s.spawn(move || {
                    all_alive.wait();
                    for r in 0..RECORDS {
                        histogram.record([0.0, 1.0, -2.5, 3e-5][(t + r as usize) % 4]);
                    }
                    all_alive.wait();
                });
            }
        });
        let series = lock(&recorder.registry.histograms)[&key].clone();
        let (_, counts, _, native) = series.read(true);
        let native = native.expect("native buckets");
        let total = THREADS as u64 * RECORDS;
        assert_eq!(counts.last(), Some(&total));
        assert_eq!(native.zero_count, total / 4);
        assert_eq!(native.negative, vec![(11, total / 4)]);
        // 1 is bucket 0; 3e-5 is in (2^(-121/8), 2^(-120/8)].
        assert_eq!(native.positive, vec![(-120, total / 4), (0, total / 4)]);
    }

    /// A native histogram's classic buckets come from its row cells and
    /// its cold path: for every class of f64 they are exactly those of a
    /// classic histogram given the same samples, whatever the settings.
    #[test]
    fn native_histograms_count_classic_buckets_exactly() {
        let mut values = every_class(LATENCY_BUCKETS);
        let mut x = 0x9E37_79B9_7F4A_7C15u64;
        for _ in 0..50_000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            values.push(f64::from_bits(x));
            // Latency-like values too, where the catalog's bounds split cells.
            values.push((x >> 11) as f64 / (1u64 << 53) as f64 * 20.0);
        }
        for (schema, max_buckets, zero_threshold) in [
            (3, 160, 2f64.powi(-128)),
            (0, 160, 2f64.powi(-128)),
            (8, 160, 2f64.powi(-128)),
            (3, 4, 2f64.powi(-128)),
            // The zero bucket holds classic bounds.
            (3, 160, 1e-3),
        ] {
            let settings = NativeSettings {
                schema,
                max_buckets,
                zero_threshold,
            };
            let classic = ShardedHistogram::new(LATENCY_BUCKETS);
            let native = HistogramSeries::Native(Arc::new(NativeHistogram {
                classic: ShardedHistogram::new(LATENCY_BUCKETS),
                native: NativeBuckets::new(settings, SHARDS, LATENCY_BUCKETS),
            }));
            let HistogramSeries::Native(handle) = &native else {
                unreachable!()
            };
            for &v in &values {
                classic.record(v);
                handle.record(v);
            }
            let (want, want_sum) = classic.merged();
            let (_, text_counts, _, _) = native.read(false);
            let (_, counts, sum, snapshot) = native.read(true);
            assert_eq!(text_counts, counts);
            assert_eq!(counts, want, "{settings:?}");
            assert_eq!(sum.to_bits(), want_sum.to_bits(), "{settings:?}");
            let snapshot = snapshot.expect("native buckets");
            let nan = values.iter().filter(|v| v.is_nan()).count() as u64;
            let in_buckets = snapshot.zero_count
                + snapshot
                    .positive
                    .iter()
                    .chain(&snapshot.negative)
                    .map(|b| b.1)
                    .sum::<u64>();
            assert_eq!(in_buckets + nan, values.len() as u64, "{settings:?}");
        }
    }

    #[test]
    fn renders_families_sorted_with_help_and_histogram_lines() {
        let recorder = ShardedRecorder::new();
        metrics::with_local_recorder(&recorder, || {
            metrics::describe_counter!("b_total", "Bees \\ \"quoted\"\nnext.");
            metrics::counter!("b_total", "x" => "2").increment(2);
            metrics::counter!("b_total", "x" => "1").increment(1);
            metrics::gauge!("a", "v" => "q\"uote").set(1.5);
            metrics::histogram!("message_processing_duration_seconds").record(0.00002);
        });
        let mut text = String::new();
        recorder.render_into(&mut text);
        let expected_start = "# HELP b_total Bees \\\\ \"quoted\"\\nnext.\n\
             # TYPE b_total counter\n\
             b_total{x=\"1\"} 1\n\
             b_total{x=\"2\"} 2\n\
             \n\
             # TYPE a gauge\n\
             a{v=\"q\\\"uote\"} 1.5\n\
             \n\
             # TYPE message_processing_duration_seconds histogram\n\
             message_processing_duration_seconds_bucket{le=\"0.00001\"} 0\n\
             message_processing_duration_seconds_bucket{le=\"0.000025\"} 1\n";
        assert!(text.starts_with(expected_start), "{text}");
        assert!(
            text.ends_with(
                "message_processing_duration_seconds_bucket{le=\"10\"} 1\n\
                 message_processing_duration_seconds_bucket{le=\"+Inf\"} 1\n\
                 message_processing_duration_seconds_sum 0.00002\n\
                 message_processing_duration_seconds_count 1\n\n"
            ),
            "{text}"
        );
    }
}
