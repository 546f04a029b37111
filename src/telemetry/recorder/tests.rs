//! Unit tests of the recorder: its cells, the native histograms' classic
//! counts, and the text page.

use std::sync::atomic::Ordering::Relaxed;

use metrics::{CounterFn, HistogramFn};

use super::cells::*;
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
