//! Unit tests of the native buckets.

use super::*;
use crate::telemetry::defs::LATENCY_BUCKETS;

fn settings(schema: i32, max_buckets: u32) -> NativeSettings {
    NativeSettings {
        schema,
        max_buckets,
        zero_threshold: 2f64.powi(-128),
    }
}

#[test]
fn schema_follows_client_golang_pick_schema() {
    for (factor, schema) in [
        (1.0001, 8),
        (1.1, 3),
        (1.2, 2),
        (1.5, 1),
        (2.0, 0),
        (3.0, 0),
        (4.0, -1),
        (65536.0, -4),
        (1e100, -4),
    ] {
        assert_eq!(schema_for_factor(factor), schema, "{factor}");
    }
}

#[test]
fn buckets_cover_the_defined_ranges() {
    // Schema 0: bucket i is (2^(i-1), 2^i].
    assert_eq!(placement(1.0, 0, 0.0), Placement::Positive(0));
    assert_eq!(placement(1.5, 0, 0.0), Placement::Positive(1));
    assert_eq!(placement(2.0, 0, 0.0), Placement::Positive(1));
    assert_eq!(placement(0.3, 0, 0.0), Placement::Positive(-1));
    // Schema -1: bucket i is (4^(i-1), 4^i]; 0.2 is in (1/16, 1/4].
    assert_eq!(placement(0.2, -1, 0.0), Placement::Positive(-1));
    assert_eq!(placement(-3.0, 1, 0.0), Placement::Negative(4));
    assert_eq!(placement(1e-40, 3, 2f64.powi(-128)), Placement::Zero);
    assert_eq!(placement(f64::NAN, 3, 1e-9), Placement::Nowhere);
    assert_eq!(placement(f64::INFINITY, 0, 0.0), Placement::Positive(1025));
}

#[test]
fn the_record_path_places_as_the_definition_at_every_schema() {
    let mut x = 0x2545_F491_4F6C_DD1Du64;
    for schema in 0..=MAX_SCHEMA {
        let n = NativeBuckets::new(settings(schema, 160), 2, LATENCY_BUCKETS);
        for _ in 0..20_000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let v = f64::from_bits(x);
            assert_eq!(
                n.locate(v),
                placement(v, schema, n.settings.zero_threshold),
                "{x:#018x} at {schema}"
            );
        }
    }
}

#[test]
fn samples_merge_across_shards_and_halve_past_max_buckets() {
    let n = NativeBuckets::new(settings(3, 160), 2, LATENCY_BUCKETS);
    for v in [1.0, 1.0, 1.05, 3.0, -3.0, 0.0, 1e-300] {
        let _ = n.add(0, true, v);
        let _ = n.add(1, true, v);
        let _ = n.add(2, false, v);
    }
    let (s, _) = n.snapshot();
    assert_eq!(s.schema, 3);
    assert_eq!(s.zero_count, 6);
    assert_eq!(s.positive, vec![(0, 6), (1, 3), (13, 3)]);
    assert_eq!(s.negative, vec![(13, 3)]);

    let n = NativeBuckets::new(settings(3, 2), 1, LATENCY_BUCKETS);
    for v in [1.0, 1.05, 3.0, 100.0] {
        let _ = n.add(0, true, v);
    }
    // Four buckets at schema 3, halved until at most 2 remain.
    let (s, _) = n.snapshot();
    assert!(s.positive.len() <= 2, "{s:?}");
    assert_eq!(s.positive.iter().map(|b| b.1).sum::<u64>(), 4);
}

#[test]
fn rows_past_the_cap_and_infinities_still_count() {
    let n = NativeBuckets::new(settings(3, 4), 1, LATENCY_BUCKETS);
    let values = [1.0, 4.0, 16.0, 64.0, 256.0, 1024.0, 4096.0, f64::INFINITY];
    let in_rows = values.map(|v| n.add(0, true, v));
    assert_eq!(
        in_rows,
        [true, true, true, true, false, false, false, false]
    );
    assert_eq!(n.owned_rows.lock().unwrap().len(), 4);
    let (s, classic) = n.snapshot();
    // The four in rows: 1 (le 1), 4 (le 5), 16 and 64 (+Inf).
    let mut want = vec![0; LATENCY_BUCKETS.len() + 1];
    want[15] = 1;
    want[17] = 1;
    want[19] = 2;
    assert_eq!(classic, want);
    assert_eq!(
        s.positive.iter().map(|b| b.1).sum::<u64>(),
        values.len() as u64
    );
    assert!(s.positive.len() <= 4, "{s:?}");
}

/// docs/metrics.md: about 47 KiB per series, and 3,456 bytes per
/// power of two at schema 3 (a header, then 16 shards and the shared
/// one) with the catalog's bounds.
#[test]
fn memory_per_series_is_as_documented() {
    let tables = std::mem::size_of::<[AtomicPtr<AtomicU64>; ROWS]>()
        + std::mem::size_of::<[u16; 1 << START_BITS]>()
        + std::mem::size_of::<[u64; 512]>();
    assert_eq!(tables, (32 + 8 + 4) * 1024);
    let n = NativeBuckets::new(settings(3, 160), 16, LATENCY_BUCKETS);
    assert_eq!((n.header, n.stride), (24, 24));
    assert_eq!(n.zero.len() * 8, 3264);
    assert!(n.add(0, true, 1.5));
    let rows = n.owned_rows.lock().unwrap();
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0].block.len() * 8, 3456);
}

#[test]
fn spans_fill_gaps_of_two_and_split_at_three() {
    let (spans, deltas) = spans_and_deltas(&[(-2, 1), (0, 3), (3, 2), (7, 2)]);
    assert_eq!(spans, vec![(-2, 6), (3, 1)]);
    assert_eq!(deltas, vec![1, -1, 3, -3, 0, 2, 0]);
    assert_eq!(spans_and_deltas(&[]), (vec![], vec![]));
}
