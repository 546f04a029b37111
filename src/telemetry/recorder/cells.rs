//! The cells: counters and histograms split into per-thread shards, and a
//! histogram that keeps native buckets too. The module comment of
//! `recorder` says why they are written by hand.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::Relaxed};

use metrics::{CounterFn, HistogramFn};

use crate::telemetry::native::{owner_add, NativeBuckets};

/// Shards per counter and histogram. A power of two, so the shard index is a
/// mask; 16 covers the tokio workers, storage threads and helpers of a busy
/// agent with few threads sharing a shard.
pub(super) const SHARDS: usize = 16;

/// Bucket slots per histogram shard: the bounds, then +Inf. A power of two,
/// so the bucket search indexes with a mask instead of bounds checks.
pub(super) const SLOTS: usize = 32;

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
/// consecutive shards. Reading a `thread_local!` instead measured more
/// instructions per record (docs/performance.md, "What is decided, and
/// why"): the library is compiled position-independent,
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

/// One thread's cell of a counter, padded to 128 bytes so that no two
/// shards share a cache line, whatever the allocation's alignment.
///
/// Padding rather than an over-aligned type (`#[repr(align(128))]`,
/// crossbeam's `CachePadded`): over-aligned allocations go through
/// `memalign`, whose leftover fragments then sit in malloc's free lists, and
/// the message path's own small allocations measured more instructions per
/// message in `_int_malloc` with them (docs/performance.md, "What is
/// decided, and why").
#[repr(C)]
pub(super) struct CounterShard {
    pub(super) value: AtomicU64,
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
    pub(super) shared: CounterShard,
    /// The floor set by `absolute`, for counters mirrored from elsewhere.
    absolute: AtomicU64,
}

impl ShardedCounter {
    pub(super) fn new() -> Self {
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
    /// and restore three registers (docs/performance-history.md, "The
    /// recorder candidates").
    #[cold]
    #[inline(never)]
    fn increment_unowned(&self, value: u64, me: usize, shard: &CounterShard) {
        if claim(&shard.owner, me) {
            owner_add(&shard.value, value);
        } else {
            self.shared.value.fetch_add(value, Relaxed);
        }
    }

    pub(super) fn value(&self) -> u64 {
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
pub(super) struct HistogramShard {
    /// The identity of the thread that writes this shard ([`this_thread`]);
    /// 0 until one claims it.
    owner: AtomicUsize,
    sum: AtomicU64,
    pub(super) counts: [AtomicU64; SLOTS],
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
    pub(super) bounds: &'static [f64],
    /// `bounds`, then +Inf up to the end: a value above every bound stops
    /// the bucket search at `bounds.len()`, the +Inf slot.
    padded: [f64; SLOTS],
    /// For each value of a sample's top [`SKIP_BITS`] bits (sign, binary
    /// exponent and the first two mantissa bits), how many bounds lie below
    /// every value with those bits. The search for a sample's bucket starts
    /// there, so it compares against at most the bounds in a quarter of a
    /// binary octave (at most one of the 1-2.5-5 latency buckets) instead
    /// of searching all of them. 14 bits step past fewer bounds per sample
    /// than 12 (whole octaves) on local gets (callgrind's line counts of the
    /// loop; docs/performance-history.md, "The recorder candidates").
    ///
    /// In the struct rather than boxed: a sample then loads its entry
    /// directly instead of a pointer first, one instruction and one cache
    /// line fewer. With the shard order of [`HistogramShard`], this reduced
    /// the cache lines that one message's metric work misses after other
    /// work has evicted L1 (callgrind's cache simulation of
    /// `instrumentation_cold/evict_l1`; docs/performance-history.md, "Cold
    /// caches").
    skip: [u8; 1 << SKIP_BITS],
    /// Keeps the shards' cells out of the cache lines of the fields above,
    /// which every recording thread reads (`repr(C)` keeps this order).
    /// Without it the owner of shard 0 wrote into a line the other threads
    /// read: two threads on one series cost more per record than one,
    /// beyond what threads sharing nothing at all cost
    /// (`contention/private_cells`); with it, the two are alike (measured:
    /// docs/performance-history.md, "Criterion: two threads on one series").
    _gap: [u64; 16],
    shards: [HistogramShard; SHARDS],
    /// For threads whose shard another thread owns: locked adds.
    pub(super) shared: HistogramShard,
}

impl ShardedHistogram {
    pub(super) fn new(bounds: &'static [f64]) -> Self {
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
    pub(super) fn bucket(&self, value: f64) -> usize {
        // A NaN's top bits are those of an infinity: a negative NaN would
        // start at -Inf's row and stop in the lowest bucket. A compare and
        // a branch per sample.
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
    pub(super) fn merged_with(&self, extra: &[u64]) -> (Vec<u64>, f64) {
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
/// Recording both kinds apart cost more than twice the extra instructions
/// per message of this way (measured: docs/performance.md, "What is
/// decided, and why").
///
/// A type of its own rather than an optional field, so that neither kind
/// checks the setting per sample.
pub(crate) struct NativeHistogram {
    pub(super) classic: ShardedHistogram,
    pub(super) native: NativeBuckets,
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
