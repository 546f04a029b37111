//! The samples waiting for the receiver: snapshots in the order they were
//! taken, bounded by `max_pending` samples.
//!
//! The collector pushes a snapshot every interval; the sender reads the
//! oldest ones, sends them, and acknowledges them. Both take the one
//! mutex here, which recording never touches. While a request is on the
//! wire its snapshots are left whole: a drop then takes the oldest
//! samples behind them, so that a sample is counted exactly once, as
//! sent, failed or dropped.

use std::collections::VecDeque;
use std::sync::Arc;

use super::wire;

/// A label set, sorted by name, `__name__` included: shared by every
/// snapshot that holds the series.
pub(super) type Labels = Arc<[wire::Label]>;

/// One series' value at a snapshot.
#[derive(Clone)]
pub(super) enum Value {
    /// A counter, a gauge, or one series of a classic histogram.
    Float(f64),
    /// A native histogram (its `timestamp` is set when sent).
    Native(Arc<wire::Histogram>),
}

/// One series' point in a snapshot.
#[derive(Clone)]
pub(super) struct Point {
    /// Whose point.
    pub(super) labels: Labels,
    /// Its value.
    pub(super) value: Value,
}

/// Every series, read at one moment.
pub(super) struct Snapshot {
    /// Milliseconds since the Unix epoch: every point's timestamp.
    pub(super) timestamp_ms: i64,
    /// The points, each one sample (a native histogram counts as one).
    pub(super) points: Vec<Point>,
}

/// The oldest snapshots, ready to send: what [`Queue::ack`] needs back.
pub(super) struct Batch {
    /// Snapshots taken from the front.
    pub(super) snapshots: usize,
    /// Samples in them.
    pub(super) samples: usize,
    /// The request body.
    pub(super) request: wire::WriteRequest,
}

/// Snapshots waiting, oldest first.
pub(super) struct Queue {
    snapshots: VecDeque<Snapshot>,
    /// Samples in `snapshots`.
    samples: usize,
    /// `max_pending`.
    max: usize,
    /// Snapshots at the front that a request holds now; drops skip them.
    in_flight: usize,
}

impl Queue {
    /// An empty queue holding at most `max` samples.
    pub(super) fn new(max: usize) -> Self {
        Self {
            snapshots: VecDeque::new(),
            samples: 0,
            max,
            in_flight: 0,
        }
    }

    /// Samples waiting, those on the wire included.
    pub(super) fn samples(&self) -> usize {
        self.samples
    }

    /// Queues a snapshot, then drops the oldest samples beyond `max`
    /// (those not on the wire); returns how many it dropped.
    pub(super) fn push(&mut self, snapshot: Snapshot) -> usize {
        self.samples += snapshot.points.len();
        self.snapshots.push_back(snapshot);
        let mut dropped = 0;
        let mut i = self.in_flight;
        while self.samples > self.max && i < self.snapshots.len() {
            let Some(snapshot) = self.snapshots.get_mut(i) else {
                break;
            };
            let take = (self.samples - self.max).min(snapshot.points.len());
            snapshot.points.drain(..take);
            self.samples -= take;
            dropped += take;
            if snapshot.points.is_empty() {
                self.snapshots.remove(i);
            } else {
                i += 1;
            }
        }
        dropped
    }

    /// The oldest snapshots as one request: whole snapshots up to
    /// `max_samples` samples, at least one. They stay queued, and are not
    /// dropped, until [`Queue::ack`] or [`Queue::release`].
    pub(super) fn take(&mut self, max_samples: usize) -> Option<Batch> {
        let mut snapshots = 0;
        let mut samples = 0;
        for s in &self.snapshots {
            if snapshots > 0 && samples + s.points.len() > max_samples {
                break;
            }
            snapshots += 1;
            samples += s.points.len();
        }
        if snapshots == 0 {
            return None;
        }
        self.in_flight = snapshots;
        let request = build(self.snapshots.iter().take(snapshots));
        Some(Batch {
            snapshots,
            samples,
            request,
        })
    }

    /// The batch is done with (sent, or refused for good): removes it.
    pub(super) fn ack(&mut self, batch: &Batch) {
        for _ in 0..batch.snapshots {
            if let Some(s) = self.snapshots.pop_front() {
                self.samples -= s.points.len();
            }
        }
        self.in_flight = 0;
    }

    /// The batch will be tried again: it may be dropped from now on.
    pub(super) fn release(&mut self) {
        self.in_flight = 0;
    }
}

/// The request for `snapshots` (oldest first): one time series per label
/// set, its samples in snapshot order, hence sorted by timestamp.
fn build<'a>(snapshots: impl Iterator<Item = &'a Snapshot>) -> wire::WriteRequest {
    let mut index: std::collections::HashMap<*const [wire::Label], usize> = Default::default();
    let mut timeseries: Vec<wire::TimeSeries> = Vec::new();
    for snapshot in snapshots {
        for point in &snapshot.points {
            let i = *index.entry(Arc::as_ptr(&point.labels)).or_insert_with(|| {
                timeseries.push(wire::TimeSeries {
                    labels: point.labels.to_vec(),
                    ..wire::TimeSeries::default()
                });
                timeseries.len() - 1
            });
            let series = &mut timeseries[i];
            match &point.value {
                Value::Float(value) => series.samples.push(wire::Sample {
                    value: *value,
                    timestamp: snapshot.timestamp_ms,
                }),
                Value::Native(h) => {
                    let mut h = wire::Histogram::clone(h);
                    h.timestamp = snapshot.timestamp_ms;
                    series.histograms.push(h);
                }
            }
        }
    }
    wire::WriteRequest { timeseries }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(name: &str) -> Labels {
        Arc::from(vec![wire::Label {
            name: "__name__".into(),
            value: name.into(),
        }])
    }

    fn snapshot(ts: i64, series: &[&Labels]) -> Snapshot {
        Snapshot {
            timestamp_ms: ts,
            points: series
                .iter()
                .map(|l| Point {
                    labels: Arc::clone(l),
                    value: Value::Float(ts as f64),
                })
                .collect(),
        }
    }

    #[test]
    fn drops_exactly_the_oldest_samples_beyond_max() {
        let (a, b) = (labels("a"), labels("b"));
        let mut q = Queue::new(5);
        assert_eq!(q.push(snapshot(1, &[&a, &b])), 0);
        assert_eq!(q.push(snapshot(2, &[&a, &b])), 0);
        assert_eq!(q.push(snapshot(3, &[&a, &b])), 1);
        assert_eq!(q.samples(), 5);
        // Snapshot 1 lost its first point (a); b@1 is the oldest left.
        let batch = q.take(100).unwrap();
        assert_eq!(batch.samples, 5);
        let ts: Vec<(String, Vec<i64>)> = batch
            .request
            .timeseries
            .iter()
            .map(|s| {
                (
                    s.labels[0].value.clone(),
                    s.samples.iter().map(|x| x.timestamp).collect(),
                )
            })
            .collect();
        assert_eq!(
            ts,
            vec![("b".into(), vec![1, 2, 3]), ("a".into(), vec![2, 3])]
        );
    }

    #[test]
    fn a_request_on_the_wire_is_not_dropped_and_the_bound_holds() {
        let a = labels("a");
        let mut q = Queue::new(3);
        q.push(snapshot(1, &[&a]));
        q.push(snapshot(2, &[&a]));
        let batch = q.take(1).unwrap();
        assert_eq!((batch.snapshots, batch.samples), (1, 1));
        q.push(snapshot(3, &[&a]));
        // Over the bound: the oldest not on the wire (ts 2) goes.
        assert_eq!(q.push(snapshot(4, &[&a])), 1);
        assert_eq!(q.samples(), 3);
        q.ack(&batch);
        assert_eq!(q.samples(), 2);
        let next = q.take(100).unwrap();
        let ts: Vec<i64> = next.request.timeseries[0]
            .samples
            .iter()
            .map(|s| s.timestamp)
            .collect();
        assert_eq!(ts, vec![3, 4]);
        q.release();
        // Released: the oldest may go again.
        assert_eq!(q.push(snapshot(5, &[&a])), 0);
        assert_eq!(q.push(snapshot(6, &[&a])), 1);
        assert_eq!(
            q.take(100).unwrap().request.timeseries[0].samples[0].timestamp,
            4
        );
    }

    #[test]
    fn a_pending_sample_takes_32_bytes() {
        // README and docs/monitoring.md size `max_pending` with this.
        assert_eq!(std::mem::size_of::<Point>(), 32);
    }

    #[test]
    fn take_keeps_whole_snapshots_and_at_least_one() {
        let (a, b, c) = (labels("a"), labels("b"), labels("c"));
        let mut q = Queue::new(100);
        q.push(snapshot(1, &[&a, &b, &c]));
        q.push(snapshot(2, &[&a, &b, &c]));
        let batch = q.take(2).unwrap();
        assert_eq!((batch.snapshots, batch.samples), (1, 3));
        q.release();
        let batch = q.take(6).unwrap();
        assert_eq!((batch.snapshots, batch.samples), (2, 6));
        q.ack(&batch);
        assert!(q.take(6).is_none());
        assert_eq!(q.samples(), 0);
    }
}
