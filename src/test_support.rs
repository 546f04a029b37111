//! Reading values back from a `DebuggingRecorder` snapshot in unit tests.

use metrics_util::debugging::DebugValue;
use metrics_util::CompositeKey;

pub(crate) type Snapshot = Vec<(
    CompositeKey,
    Option<metrics::Unit>,
    Option<metrics::SharedString>,
    DebugValue,
)>;

fn find<'a>(snap: &'a Snapshot, name: &str, labels: &[(&str, &str)]) -> Option<&'a DebugValue> {
    snap.iter().find_map(|(key, _, _, value)| {
        let key = key.key();
        let mut got: Vec<(&str, &str)> = key.labels().map(|l| (l.key(), l.value())).collect();
        let mut want = labels.to_vec();
        got.sort();
        want.sort();
        (key.name() == name && got == want).then_some(value)
    })
}

/// The counter's value; 0 when it was never registered.
pub(crate) fn counter(snap: &Snapshot, name: &str, labels: &[(&str, &str)]) -> u64 {
    match find(snap, name, labels) {
        Some(DebugValue::Counter(v)) => *v,
        Some(other) => panic!("{name} is not a counter: {other:?}"),
        None => 0,
    }
}

/// How many samples the histogram recorded.
pub(crate) fn histogram_count(snap: &Snapshot, name: &str, labels: &[(&str, &str)]) -> usize {
    match find(snap, name, labels) {
        Some(DebugValue::Histogram(v)) => v.len(),
        Some(other) => panic!("{name} is not a histogram: {other:?}"),
        None => 0,
    }
}

/// The gauge's value; 0 when it was never registered.
pub(crate) fn gauge(snap: &Snapshot, name: &str, labels: &[(&str, &str)]) -> f64 {
    match find(snap, name, labels) {
        Some(DebugValue::Gauge(v)) => v.into_inner(),
        Some(other) => panic!("{name} is not a gauge: {other:?}"),
        None => panic!("{name} {labels:?} was never set"),
    }
}
