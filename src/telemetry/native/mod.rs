//! Native (sparse, exponential) histogram buckets, kept beside a histogram's
//! classic ones and, like them, sharded by thread and lock-free.
//!
//! Placement follows Prometheus's definition: at schema `s`, bucket `i`
//! covers `(2^((i-1)·2^-s), 2^(i·2^-s)]`; values with `|v| <= zero_threshold`
//! count in the zero bucket; negative values are placed by magnitude in
//! their own buckets; NaN counts in no bucket (only in the count, as in
//! client_golang), with client_golang's table of bounds (`bounds.rs`);
//! `placement.rs` computes it directly, and `golden.rs` checks the record
//! path against vectors that client_golang generated
//! (`tools/native-histogram-vectors`).
//!
//! How samples are kept. Within one binary octave `[2^k, 2^(k+1))` (one
//! value of an f64's sign and exponent bits, a "row") the buckets at schema
//! `s >= 0` are `k·2^s + j`, `j` in `0..=2^s`, where `j = 0` only for `2^k`
//! exactly. So each row gets one block, allocated the first time a sample
//! falls in it: a header, then for each shard a cell per bucket, two where
//! a classic bound falls inside the bucket, so that each cell belongs to
//! one native and one classic bucket. A sample is the row's block, one
//! table lookup (and, rarely, a compare) on the mantissa for `j`, one
//! compare with the header's split, and an add to the calling thread's own
//! cell; the classic counts are summed from the cells at the scrape.
//! Nothing is allocated for a bucket whose row was seen before. A row whose
//! every value is within the zero threshold is a row like the others, whose
//! cells count in the zero bucket at the scrape.
//!
//! A sample that needs a new bucket takes the cold path: the first sample
//! of a row allocates the row's block (once per row and series, under a
//! mutex). At most `max_buckets` rows get blocks. A sample in a row past
//! them, in the row that holds the zero threshold itself, or subnormal
//! above the threshold, or infinite, goes into a small map under a mutex,
//! whose own resolution halves when it holds more than `max_buckets`
//! buckets. Every sample is counted exactly either way; only these rare
//! ones pay for a lock.
//!
//! The bucket count stays bounded where Prometheus sees it: a scrape merges
//! the shards, and while there are more than `max_buckets` populated buckets
//! it halves the resolution (schema `s` to `s - 1`, merging bucket pairs),
//! down to schema -4, as client_golang does. Counts only grow, so the
//! schema a scrape reports never rises again. Negative schemas are recorded
//! at schema 0 and merged down at the scrape, which is exact.
//!
//! Cost: docs/performance.md ("Native histograms").

mod bounds;
mod placement;

use std::collections::BTreeMap;
use std::sync::atomic::{
    AtomicPtr, AtomicU64, Ordering::Acquire, Ordering::Relaxed, Ordering::Release,
};
use std::sync::{Mutex, PoisonError};

use placement::mantissa_bounds;
pub use placement::{coarser, placement, schema_for_factor, Placement};

/// Adds to a cell that only the calling thread writes: a load and a store,
/// which readers see whole, instead of a locked read-modify-write. The
/// recorder's classic cells use it too; it lives here, below the recorder,
/// so that the recorder imports native buckets and not the reverse.
#[inline(always)]
pub(crate) fn owner_add(cell: &AtomicU64, value: u64) {
    cell.store(cell.load(Relaxed).wrapping_add(value), Relaxed);
}

/// The finest resolution Prometheus defines: 256 buckets per octave.
pub const MAX_SCHEMA: i32 = 8;
/// The coarsest: one bucket per 2^16.
pub const MIN_SCHEMA: i32 = -4;

/// Sign and exponent bits: one row per value.
const ROWS: usize = 4096;
const MANTISSA: u64 = (1 << 52) - 1;
#[cfg(test)]
const SIGN: u64 = 1 << 63;

/// What `metrics.native_histograms` sets for every histogram.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct NativeSettings {
    /// The finest schema reported, from the bucket factor.
    pub schema: i32,
    /// Most populated buckets a scrape reports before halving the schema.
    pub max_buckets: u32,
    /// Magnitudes at or below it count in the zero bucket (above 0).
    pub zero_threshold: f64,
}

/// Mantissa bits that pick a sample's entry in [`NativeBuckets::start`]:
/// 12, so that no entry's range holds two bounds even at schema 8 (the
/// closest bounds there are 2^43.5 apart in mantissa units, an entry spans
/// 2^40), and few hold one at all (8 of 4,096 at schema 3).
const START_BITS: u32 = 12;

/// Marks an entry of [`NativeBuckets::start`] whose range holds a bound:
/// the mantissa must be compared with it.
const HOLDS_A_BOUND: u16 = 0x8000;

/// The native half of a histogram with `shards` owned shards and one shared
/// one (the last), indexed as the classic shards are.
///
/// The tables are inline, not boxed apart, and the histogram holds this
/// inline too: a sample reaches a table with no pointer to load first.
pub(crate) struct NativeBuckets {
    /// Per row (an f64's sign and exponent bits), its block: a header
    /// with an entry per native bucket ([`RowHeader`]), then `(shards + 1)
    /// × stride` cells, shard `i`'s at `header + i × stride`. Null until a
    /// sample falls in the row (and for rows that never get one).
    rows: [AtomicPtr<AtomicU64>; ROWS],
    /// For each value of a mantissa's top [`START_BITS`] bits, how many
    /// bounds lie below every mantissa with those bits: the bucket, or,
    /// with [`HOLDS_A_BOUND`], the bucket or the next one.
    start: [u16; 1 << START_BITS],
    /// [`mantissa_bounds`], then `u64::MAX` up to the end, so the compare
    /// after the last bound never moves on.
    bounds: [u64; 512],
    /// Native buckets in a row: `2^schema + 1`.
    buckets: usize,
    /// Entries before the first shard's cells in a row block: one per
    /// bucket, then at least 8 more (64 bytes), so that no shard's cells
    /// share a cache line with the header every recording thread reads.
    header: usize,
    /// Cells per shard in a row: one per native bucket, plus one for each
    /// classic bound inside the row, then at least 8 more (64 bytes), so
    /// that no two shards write the same cache line whatever the block's
    /// alignment. Without the gaps, two threads on one series cost more per
    /// sample than one (`native_contention`; measured: docs/performance.md,
    /// "What is decided, and why").
    stride: usize,
    /// The histogram's classic bounds, which split cells.
    classic_bounds: &'static [f64],
    /// Zero-bucket samples of the cold path, per shard, `stride` apart.
    zero: Box<[AtomicU64]>,
    /// Owns every row block (`rows` points into them, so they are never
    /// freed while `self` lives); at most `max_buckets`. Also serializes
    /// allocating them.
    owned_rows: Mutex<Vec<OwnedRow>>,
    /// Samples with no row of their own: see the module comment.
    overflow: Mutex<Overflow>,
    settings: NativeSettings,
    /// The schema samples are placed at: `settings.schema`, or 0 for a
    /// negative one (merged down at the scrape).
    schema: u32,
}

/// A row block's header entry for native bucket `j`: where its first cell
/// is in a shard's part of the block (the top 12 bits: the header, `j`, and
/// one more for each bucket before `j` that a classic bound splits), and
/// the largest mantissa of `j` in the classic bucket of its smallest one,
/// or [`MANTISSA`] when the whole bucket is in one classic bucket. A sample
/// with mantissa `m` goes to cell `first + (m > split)`.
struct RowHeader;

impl RowHeader {
    const UNSPLIT: u64 = MANTISSA;

    fn entry(first_cell: usize, split: u64) -> u64 {
        (first_cell as u64) << 52 | split
    }
}

/// A row block and what its cells count.
struct OwnedRow {
    /// The row's sign and exponent bits.
    row: usize,
    /// Header and cells, as [`NativeBuckets::rows`] describes.
    block: Box<[AtomicU64]>,
    /// For each cell of a shard (from the first after the header): its
    /// native bucket `j` and its classic bucket.
    cells: Vec<(usize, usize)>,
}

/// Buckets of samples that have no row, at their own (possibly coarser)
/// schema.
struct Overflow {
    schema: i32,
    positive: BTreeMap<i32, u64>,
    negative: BTreeMap<i32, u64>,
}

/// A scrape's view of the native buckets.
#[derive(Debug, Clone, PartialEq)]
pub struct NativeSnapshot {
    /// The schema the buckets are at (may be below the configured one).
    pub schema: i32,
    /// As configured.
    pub zero_threshold: f64,
    /// Samples in the zero bucket.
    pub zero_count: u64,
    /// Populated positive buckets, by index, ascending.
    pub positive: Vec<(i32, u64)>,
    /// Populated negative buckets, by index of the magnitude, ascending.
    pub negative: Vec<(i32, u64)>,
}

/// Whether every value of a row (sign and exponent bits) has a magnitude
/// at most `zero_threshold`.
fn row_is_zero(row: usize, zero_threshold: f64) -> bool {
    let exponent = (row & 0x7FF) as u64;
    exponent < 0x7FF && f64::from_bits(((exponent + 1) << 52) - 1) <= zero_threshold
}

/// The value of a row with mantissa `m`.
fn value_of(row: usize, m: u64) -> f64 {
    f64::from_bits((row as u64) << 52 | m)
}

/// The classic bucket of `value`: the first bound at or above it.
fn classic_bucket(bounds: &[f64], value: f64) -> usize {
    bounds.partition_point(|&b| b < value)
}

impl NativeBuckets {
    /// Native buckets as `settings` asks, beside classic `classic_bounds`.
    pub(crate) fn new(
        settings: NativeSettings,
        shards: usize,
        classic_bounds: &'static [f64],
    ) -> Self {
        let schema = settings.schema.clamp(0, MAX_SCHEMA) as u32;
        let mut bounds = [u64::MAX; 512];
        let native = mantissa_bounds(schema);
        bounds[..native.len()].copy_from_slice(&native);
        let mut start = [0u16; 1 << START_BITS];
        for (t, entry) in start.iter_mut().enumerate() {
            let lowest = (t as u64) << (52 - START_BITS);
            let highest = lowest + (1 << (52 - START_BITS)) - 1;
            let below = native.partition_point(|&b| b < lowest);
            // The bucket changes inside the range when a bound is in
            // [lowest, highest): the next mantissa after it is in the next.
            let holds = native.get(below).is_some_and(|&b| b < highest);
            *entry = below as u16 | if holds { HOLDS_A_BOUND } else { 0 };
        }
        // A cell split needs a classic bound inside the row: room for the
        // most bounds any row holds.
        let mut per_row = std::collections::HashMap::new();
        for b in classic_bounds {
            *per_row.entry(b.to_bits() >> 52).or_insert(0usize) += 1;
        }
        let most_in_a_row = per_row.values().copied().max().unwrap_or(0);
        let buckets = (1usize << schema) + 1;
        let header = (buckets + 8).next_multiple_of(8);
        let stride = (buckets + most_in_a_row + 8).next_multiple_of(8);
        Self {
            rows: std::array::from_fn(|_| AtomicPtr::new(std::ptr::null_mut())),
            start,
            bounds,
            buckets,
            header,
            stride,
            classic_bounds,
            zero: (0..(shards + 1) * stride)
                .map(|_| AtomicU64::new(0))
                .collect(),
            owned_rows: Mutex::new(Vec::new()),
            overflow: Mutex::new(Overflow {
                schema: schema as i32,
                positive: BTreeMap::new(),
                negative: BTreeMap::new(),
            }),
            settings,
            schema,
        }
    }

    /// Counts a sample for a thread that owns `shard` (a plain load and
    /// store), or for any thread into the shared shard (`owned` false: a
    /// locked add), in a cell that gives both its native and its classic
    /// bucket. False when the sample has no such cell (the cold path, which
    /// counts its native bucket): the caller then counts its classic one.
    pub(crate) fn add(&self, shard: usize, owned: bool, value: f64) -> bool {
        let row = self.row(value.to_bits());
        if row.is_null() {
            return self.add_cold(shard, owned, value);
        }
        let cell = self.cell(row, shard, value.to_bits());
        if owned {
            owner_add(cell, 1);
        } else {
            cell.fetch_add(1, Relaxed);
        }
        true
    }

    /// The block of the row a sample with these bits falls in; null when
    /// it has none (yet): see [`Self::add_cold`].
    #[inline(always)]
    pub(crate) fn row(&self, bits: u64) -> *const AtomicU64 {
        self.rows[(bits >> 52) as usize].load(Acquire)
    }

    /// The cell of `shard` in `row` (non-null, from [`Self::row`]) for a
    /// sample with these bits.
    ///
    /// The row's block is reached through a raw pointer: with a safe
    /// `OnceLock<Box<[AtomicU64]>>` per row, its state check, the slice's
    /// length and bounds checks and a separate zero-threshold test, native
    /// buckets cost several times the instructions per message they cost
    /// now (callgrind, local gets; measured: docs/performance.md, "What is
    /// decided, and why").
    #[inline(always)]
    #[allow(unsafe_code)]
    pub(crate) fn cell(&self, row: *const AtomicU64, shard: usize, bits: u64) -> &AtomicU64 {
        debug_assert!(!row.is_null());
        let m = bits & MANTISSA;
        let j = self.slot(m);
        // SAFETY: a non-null row from `self.row` points at a block of
        // `header + (shards + 1) × stride` counters that `self.owned_rows`
        // owns and never frees or moves while `self` lives (a box's heap
        // memory stays put when the Vec grows). The Acquire load pairs with
        // the Release store that published the pointer after the block was
        // written. `j` is below `buckets`, so its entry is in the header;
        // `shard` is at most `shards`; and a bucket's cells, `first` and
        // the one after a split, lie in the shard's `stride` after the
        // header (`row_block` checked that they fit).
        unsafe {
            let entry = (*row.add(j)).load(Relaxed);
            let first = (entry >> 52) as usize;
            let split = usize::from(m > entry & MANTISSA);
            &*row.add(shard * self.stride + first + split)
        }
    }

    /// The bucket `j` (0 to 2^schema) of a mantissa within its row.
    #[inline(always)]
    fn slot(&self, mantissa: u64) -> usize {
        let entry = self.start[(mantissa >> (52 - START_BITS)) as usize];
        let j = usize::from(entry & !HOLDS_A_BOUND);
        if entry & HOLDS_A_BOUND == 0 {
            return j;
        }
        j + usize::from(mantissa > self.bounds[j & 511])
    }

    /// The mantissas of native bucket `j` within a row: `(lowest, highest)`.
    fn bucket_range(&self, j: usize) -> (u64, u64) {
        let lowest = if j == 0 { 0 } else { self.bounds[j - 1] + 1 };
        let highest = if j == 1 << self.schema {
            MANTISSA
        } else {
            self.bounds[j]
        };
        (lowest, highest)
    }

    /// A row's block, zeroed but for its header, and what its cells count;
    /// None when some native bucket of it spans more than two classic
    /// buckets (or the splits do not fit in `stride`): such a row's
    /// samples take the cold path.
    fn row_block(&self, row: usize) -> Option<OwnedRow> {
        let mut header = vec![0u64; self.header];
        let mut cells = Vec::with_capacity(self.stride);
        for (j, entry) in header.iter_mut().enumerate().take(self.buckets) {
            let (lowest, highest) = self.bucket_range(j);
            let bucket = |m| classic_bucket(self.classic_bounds, value_of(row, m));
            let (first, last) = (bucket(lowest), bucket(highest));
            let first_cell = self.header + cells.len();
            if first == last {
                *entry = RowHeader::entry(first_cell, RowHeader::UNSPLIT);
                cells.push((j, first));
                continue;
            }
            if first.abs_diff(last) > 1 {
                return None;
            }
            // The classic bucket is monotonic in the mantissa: find the
            // last mantissa still in the first one.
            let (mut inside, mut outside) = (lowest, highest);
            while outside - inside > 1 {
                let mid = inside + (outside - inside) / 2;
                if bucket(mid) == first {
                    inside = mid;
                } else {
                    outside = mid;
                }
            }
            *entry = RowHeader::entry(first_cell, inside);
            cells.extend([(j, first), (j, last)]);
        }
        if cells.len() > self.stride {
            return None;
        }
        let block = header
            .into_iter()
            .chain(std::iter::repeat_n(0, self.zero.len()))
            .map(AtomicU64::new)
            .collect();
        Some(OwnedRow { row, block, cells })
    }

    /// A sample whose row has no block yet, or never will: the row that
    /// holds the zero threshold, subnormals above it, infinities, NaN, rows
    /// past `max_buckets`, and rows whose buckets the classic bounds split
    /// too finely. True when it was counted in a new row block.
    #[cold]
    #[inline(never)]
    fn add_cold(&self, shard: usize, owned: bool, value: f64) -> bool {
        let add = |cell: &AtomicU64| {
            if owned {
                owner_add(cell, 1);
            } else {
                cell.fetch_add(1, Relaxed);
            }
        };
        if value.is_nan() {
            return false;
        }
        let bits = value.to_bits();
        let row = (bits >> 52) as usize;
        let exponent = row & 0x7FF;
        let zero_threshold = self.settings.zero_threshold;
        let whole_row_on_one_side = row_is_zero(row, zero_threshold)
            || f64::from_bits((exponent as u64) << 52) > zero_threshold;
        if exponent != 0 && exponent != 0x7FF && whole_row_on_one_side {
            let mut owned_rows = self
                .owned_rows
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            if owned_rows.len() < self.settings.max_buckets as usize
                && !owned_rows.iter().any(|r| r.row == row)
            {
                if let Some(new_row) = self.row_block(row) {
                    self.rows[row].store(new_row.block.as_ptr().cast_mut(), Release);
                    owned_rows.push(new_row);
                    drop(owned_rows);
                    return self.add(shard, owned, value);
                }
            }
        }
        let placed = placement(value, self.schema as i32, zero_threshold);
        let mut overflow = self.overflow.lock().unwrap_or_else(PoisonError::into_inner);
        let halvings = (self.schema as i32 - overflow.schema) as u32;
        let (map, key) = match placed {
            Placement::Positive(key) => (&mut overflow.positive, key),
            Placement::Negative(key) => (&mut overflow.negative, key),
            Placement::Zero => {
                add(&self.zero[shard * self.stride]);
                return false;
            }
            Placement::Nowhere => return false,
        };
        *map.entry(coarser(key, halvings)).or_default() += 1;
        let max = self.settings.max_buckets as usize;
        while overflow.positive.len() + overflow.negative.len() > max
            && overflow.schema > MIN_SCHEMA
        {
            overflow.schema -= 1;
            overflow.positive = halve(&overflow.positive);
            overflow.negative = halve(&overflow.negative);
        }
        false
    }

    /// Where the record path puts `value`, at the schema it records at:
    /// the same tables and compare as [`Self::add`], for the golden tests.
    #[cfg(test)]
    fn locate(&self, value: f64) -> Placement {
        let bits = value.to_bits();
        let row = (bits >> 52) as usize;
        let exponent = (row & 0x7FF) as i32;
        if row_is_zero(row, self.settings.zero_threshold) {
            return Placement::Zero;
        }
        let edge = exponent == 0
            || exponent == 0x7FF
            || f64::from_bits((exponent as u64) << 52) <= self.settings.zero_threshold;
        if edge {
            return placement(value, self.schema as i32, self.settings.zero_threshold);
        }
        let key = ((exponent - 1023) << self.schema) + self.slot(bits & MANTISSA) as i32;
        if bits & SIGN == 0 {
            Placement::Positive(key)
        } else {
            Placement::Negative(key)
        }
    }

    /// The samples the row cells hold per classic bucket (not cumulative;
    /// one more than the bounds, for +Inf): what a text scrape needs, with
    /// none of the native buckets' merging.
    pub(crate) fn classic_counts(&self) -> Vec<u64> {
        let mut classic = vec![0u64; self.classic_bounds.len() + 1];
        let owned_rows = self
            .owned_rows
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        for OwnedRow { block, cells, .. } in owned_rows.iter() {
            for (cell, &(_, classic_bucket)) in cells.iter().enumerate() {
                classic[classic_bucket] += block[self.header + cell..]
                    .iter()
                    .step_by(self.stride)
                    .map(|c| c.load(Relaxed))
                    .sum::<u64>();
            }
        }
        classic
    }

    /// Every shard merged: the native buckets, at the finest schema that
    /// keeps the populated ones within `max_buckets` (and no finer than
    /// configured), and the samples the row cells hold per classic bucket
    /// (not cumulative; one more than the bounds, for +Inf).
    pub(crate) fn snapshot(&self) -> (NativeSnapshot, Vec<u64>) {
        let shard_sum = |block: &[AtomicU64], cell: usize| -> u64 {
            block[cell..]
                .iter()
                .step_by(self.stride)
                .map(|c| c.load(Relaxed))
                .sum()
        };
        let mut classic = vec![0u64; self.classic_bounds.len() + 1];
        let mut positive = BTreeMap::new();
        let mut negative = BTreeMap::new();
        let mut zero_count: u64 = (0..self.stride)
            .map(|cell| {
                self.zero[cell..]
                    .iter()
                    .step_by(self.stride)
                    .map(|c| c.load(Relaxed))
                    .sum::<u64>()
            })
            .sum();
        let owned_rows = self
            .owned_rows
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        for OwnedRow { row, block, cells } in owned_rows.iter() {
            let row = *row;
            let base = (((row & 0x7FF) as i32) - 1023) << self.schema;
            let zero_row = row_is_zero(row, self.settings.zero_threshold);
            for (cell, &(j, classic_bucket)) in cells.iter().enumerate() {
                let count = shard_sum(block, self.header + cell);
                if count == 0 {
                    continue;
                }
                classic[classic_bucket] += count;
                if zero_row {
                    zero_count += count;
                } else if row & 0x800 == 0 {
                    *positive.entry(base + j as i32).or_insert(0u64) += count;
                } else {
                    *negative.entry(base + j as i32).or_insert(0u64) += count;
                }
            }
        }
        drop(owned_rows);

        let overflow = self.overflow.lock().unwrap_or_else(PoisonError::into_inner);
        let mut schema = self.settings.schema.min(overflow.schema);
        let halvings = (self.schema as i32 - schema) as u32;
        let mut positive = at_coarser(&positive, halvings);
        let mut negative = at_coarser(&negative, halvings);
        let overflow_halvings = (overflow.schema - schema) as u32;
        for (key, count) in &overflow.positive {
            *positive
                .entry(coarser(*key, overflow_halvings))
                .or_insert(0) += count;
        }
        for (key, count) in &overflow.negative {
            *negative
                .entry(coarser(*key, overflow_halvings))
                .or_insert(0) += count;
        }
        drop(overflow);

        while positive.len() + negative.len() > self.settings.max_buckets as usize
            && schema > MIN_SCHEMA
        {
            schema -= 1;
            positive = halve(&positive);
            negative = halve(&negative);
        }
        let snapshot = NativeSnapshot {
            schema,
            zero_threshold: self.settings.zero_threshold,
            zero_count,
            positive: positive.into_iter().collect(),
            negative: negative.into_iter().collect(),
        };
        (snapshot, classic)
    }
}

/// Buckets at one schema lower.
fn halve(buckets: &BTreeMap<i32, u64>) -> BTreeMap<i32, u64> {
    at_coarser(buckets, 1)
}

fn at_coarser(buckets: &BTreeMap<i32, u64>, halvings: u32) -> BTreeMap<i32, u64> {
    if halvings == 0 {
        return buckets.clone();
    }
    let mut out = BTreeMap::new();
    for (&key, &count) in buckets {
        *out.entry(coarser(key, halvings)).or_insert(0) += count;
    }
    out
}

/// Spans and delta-encoded counts of populated buckets, as client_golang
/// writes them: a gap of one or two empty buckets continues the span with
/// zero counts; a longer one starts a new span.
pub fn spans_and_deltas(buckets: &[(i32, u64)]) -> (Vec<(i32, u32)>, Vec<i64>) {
    let mut spans: Vec<(i32, u32)> = Vec::new();
    let mut deltas = Vec::with_capacity(buckets.len());
    let mut previous = 0i64;
    let mut next = 0i32;
    for (n, &(key, count)) in buckets.iter().enumerate() {
        let gap = key - next;
        match spans.last_mut() {
            Some(span) if n > 0 && gap <= 2 => {
                for _ in 0..gap {
                    span.1 += 1;
                    deltas.push(-previous);
                    previous = 0;
                }
            }
            _ => spans.push((gap, 0)),
        }
        if let Some(span) = spans.last_mut() {
            span.1 += 1;
        }
        let count = count as i64;
        deltas.push(count - previous);
        previous = count;
        next = key + 1;
    }
    (spans, deltas)
}

#[cfg(test)]
mod golden;
#[cfg(test)]
mod tests;
