//! Prometheus's native bucket definition, computed directly: the schema a
//! bucket factor picks, where a value falls, and how buckets merge when the
//! resolution halves. The record path in `mod.rs` uses tables instead, and
//! its tests check it against these.

use super::bounds::BOUNDS;
use super::{MANTISSA, MAX_SCHEMA, MIN_SCHEMA};

/// client_golang's `pickSchema`: the largest schema from -4 to 8 whose
/// bucket growth factor `2^(2^-s)` is at most `bucket_factor` (> 1).
pub fn schema_for_factor(bucket_factor: f64) -> i32 {
    let floor = bucket_factor.log2().log2().floor();
    if floor <= -8.0 {
        MAX_SCHEMA
    } else if floor >= 4.0 {
        MIN_SCHEMA
    } else {
        -(floor as i32)
    }
}

/// Where one sample goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Placement {
    /// The zero bucket: `|v| <= zero_threshold`.
    Zero,
    /// A positive bucket, by index.
    Positive(i32),
    /// A negative bucket, by index of the magnitude.
    Negative(i32),
    /// No bucket: NaN.
    Nowhere,
}

/// The bucket a value falls in at `schema`, by the definition, computed
/// without tables: the reference the record path is checked against, and
/// the cold path's own placement for subnormals and infinities.
///
/// Infinities go one bucket above the largest finite value's, as
/// client_golang places them.
pub fn placement(value: f64, schema: i32, zero_threshold: f64) -> Placement {
    if value.is_nan() {
        return Placement::Nowhere;
    }
    let magnitude = value.abs();
    if magnitude <= zero_threshold {
        return Placement::Zero;
    }
    let key = if magnitude.is_infinite() {
        key_of(f64::MAX, schema) + 1
    } else {
        key_of(magnitude, schema)
    };
    if value > 0.0 {
        Placement::Positive(key)
    } else {
        Placement::Negative(key)
    }
}

/// The index of the bucket holding a finite `magnitude > 0` at `schema`.
fn key_of(magnitude: f64, schema: i32) -> i32 {
    let (k, mantissa) = octave(magnitude);
    let at_zero = if mantissa == 0 { k } else { k + 1 };
    if schema <= 0 {
        return coarser(at_zero, -schema as u32);
    }
    let j = mantissa_bounds(schema as u32)
        .iter()
        .position(|&b| mantissa <= b)
        .unwrap_or(1 << schema);
    (k << schema) + j as i32
}

/// `magnitude = (1 + m·2^-52)·2^k`, subnormals normalized.
pub(super) fn octave(magnitude: f64) -> (i32, u64) {
    let bits = magnitude.to_bits();
    let exponent = (bits >> 52) as i32;
    if exponent != 0 {
        return (exponent - 1023, bits & MANTISSA);
    }
    let m = bits & MANTISSA;
    let shift = m.leading_zeros() - 11;
    (-1022 - shift as i32, (m << shift) & MANTISSA)
}

/// The index at `schema - halvings` of bucket `key`: each halving merges
/// buckets `2i-1` and `2i` into `i`, so this is `ceil(key / 2^halvings)`.
pub fn coarser(key: i32, halvings: u32) -> i32 {
    if halvings == 0 {
        return key;
    }
    let halvings = halvings.min(31);
    ((i64::from(key) + (1i64 << halvings) - 1) >> halvings) as i32
}

/// The mantissa bits of the bounds `2^(j·2^-s)`, `j` in `0..2^s`: a value
/// of the octave with mantissa `m` lies in bucket `j` for the first `j`
/// with `m <= bound[j]` (`2^s` when there is none). The bounds are
/// client_golang's table, which holds `2^(j·2^-s) / 2` (all of exponent
/// -1, so their mantissas compare as the values do).
pub(super) fn mantissa_bounds(schema: u32) -> Vec<u64> {
    BOUNDS[schema as usize]
        .iter()
        .map(|b| b.to_bits() & MANTISSA)
        .collect()
}
