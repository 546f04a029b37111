//! Remote write: every series, pushed to a Prometheus remote-write 1.0
//! receiver (Prometheus, Mimir, Thanos Receive, Cortex, VictoriaMetrics),
//! for agents that no Prometheus can scrape.
//!
//! Two tasks, apart from the message path and sharing no lock with
//! recording:
//! - the collector reads the recorder every `interval`, as a scrape does,
//!   and queues the snapshot with its timestamp;
//! - the sender sends the oldest snapshots, retrying 5xx, 429, timeouts
//!   and connection failures with capped exponential backoff (or the
//!   receiver's `Retry-After`), and gives up on any other answer.
//!
//! Snapshots taken while the receiver is away wait in the [`queue`], up
//! to `max_pending` samples, and go out oldest first when it is back, each
//! with the timestamp it was taken at. At shutdown the sender pushes a
//! last snapshot, within [`FLUSH_DEADLINE`].

mod client;
mod queue;
pub mod wire;

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use metrics::{Counter, Gauge};
use tokio::sync::Notify;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use self::client::{Client, Outcome, Retry};
use self::queue::{Labels, Point, Queue, Snapshot, Value};
use super::defs::*;
use super::protobuf::{MetricFamily, MetricType};
use super::throttle::Throttle;
use super::Exposition;
use crate::config::RemoteWrite;

/// The first retry's delay; it doubles per failure up to [`MAX_BACKOFF`].
/// Prometheus's queue manager uses 30 ms; 100 ms spares a receiver that
/// answers 500 at once from a burst of retries.
pub const MIN_BACKOFF: Duration = Duration::from_millis(100);
/// The longest delay between retries without `Retry-After`, Prometheus's
/// default `max_backoff`.
pub const MAX_BACKOFF: Duration = Duration::from_secs(5);
/// The longest `Retry-After` honoured: a receiver's mistake (a date far
/// ahead) must not silence the sender for days.
pub const MAX_RETRY_AFTER: Duration = Duration::from_secs(600);
/// Most samples in one request. A backlog goes out in requests of this
/// size: a receiver takes them one at a time, and a refused one loses no
/// more than this.
pub const MAX_SAMPLES_PER_REQUEST: usize = 10_000;
/// How long shutdown waits for the last snapshot and the backlog to go out.
pub const FLUSH_DEADLINE: Duration = Duration::from_secs(5);
/// Shortest time between two warnings of one kind.
const WARN_PERIOD: Duration = Duration::from_secs(60);

/// The running sender; [`Handle::shutdown`] flushes and stops it.
pub struct Handle {
    stop: CancellationToken,
    collector: JoinHandle<()>,
    sender: JoinHandle<()>,
}

impl Handle {
    /// Takes a last snapshot and sends what is pending, for at most
    /// [`FLUSH_DEADLINE`]; what is still pending then is lost.
    pub async fn shutdown(self) {
        self.stop.cancel();
        let Handle {
            collector,
            mut sender,
            ..
        } = self;
        let flushed = tokio::time::timeout(FLUSH_DEADLINE, async {
            let _ = collector.await;
            let _ = (&mut sender).await;
        })
        .await;
        if flushed.is_err() {
            sender.abort();
            tracing::warn!(
                deadline = ?FLUSH_DEADLINE,
                "remote write: samples still pending at shutdown are lost"
            );
        }
    }
}

/// What both tasks share: the queue, and the sender's wake-up.
struct Shared {
    queue: Mutex<Queue>,
    /// Rung when a snapshot is queued.
    wake: Notify,
    /// Set once the collector has queued its last snapshot.
    collector_done: AtomicBool,
    metrics: RemoteWriteMetrics,
}

impl Shared {
    fn queue(&self) -> std::sync::MutexGuard<'_, Queue> {
        self.queue.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Removes a batch that is sent or given up, and updates the gauge.
    fn done_with(&self, batch: &queue::Batch) {
        let pending = {
            let mut queue = self.queue();
            queue.ack(batch);
            queue.samples()
        };
        self.metrics.pending.set(pending as f64);
    }
}

/// Starts the collector and the sender for `exposition`'s series.
pub fn spawn(exposition: Exposition, cfg: RemoteWrite) -> Handle {
    let stop = CancellationToken::new();
    let shared = Arc::new(Shared {
        queue: Mutex::new(Queue::new(cfg.max_pending)),
        wake: Notify::new(),
        collector_done: AtomicBool::new(false),
        metrics: RemoteWriteMetrics::new(),
    });
    let client = Client::new(&cfg);
    tracing::info!(
        url = client.url(),
        interval = ?cfg.interval,
        max_pending = cfg.max_pending,
        "remote write: pushing metrics"
    );
    let collector = tokio::spawn(collect(
        exposition,
        cfg.interval,
        cfg.external_labels,
        Arc::clone(&shared),
        stop.clone(),
    ));
    let sender = tokio::spawn(send(client, shared, stop.clone()));
    Handle {
        stop,
        collector,
        sender,
    }
}

/// Every `interval`, and once more at shutdown: all series, queued.
async fn collect(
    exposition: Exposition,
    interval: Duration,
    external: Vec<(String, String)>,
    shared: Arc<Shared>,
    stop: CancellationToken,
) {
    let mut ticks = tokio::time::interval(interval);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut interner = Interner::default();
    let mut dropped_warn = Throttle::new(WARN_PERIOD);
    loop {
        let last = tokio::select! {
            _ = ticks.tick() => false,
            _ = stop.cancelled() => true,
        };
        let timestamp_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as i64);
        let points = points(&exposition.families(), &external, &mut interner);
        let taken = points.len();
        let (dropped, pending) = {
            let mut queue = shared.queue();
            let dropped = queue.push(Snapshot {
                timestamp_ms,
                points,
            });
            (dropped, queue.samples())
        };
        interner.prune();
        let m = &shared.metrics;
        m.samples.increment(taken as u64);
        m.dropped.increment(dropped as u64);
        m.pending.set(pending as f64);
        if dropped > 0 {
            if let Some(held_back) = dropped_warn.allow() {
                tracing::warn!(
                    dropped,
                    held_back,
                    "remote write: metrics.remote_write.max_pending reached; dropped the oldest samples"
                );
            }
        }
        if last {
            shared.collector_done.store(true, Ordering::Release);
        }
        shared.wake.notify_one();
        if last {
            return;
        }
    }
}

/// Sends the oldest pending snapshots until shutdown, then flushes.
async fn send(mut client: Client, shared: Arc<Shared>, stop: CancellationToken) {
    let mut backoff = MIN_BACKOFF;
    let mut retry_warn = Throttle::new(WARN_PERIOD);
    let mut reject_warn = Throttle::new(WARN_PERIOD);
    let mut failing = false;
    let m = &shared.metrics;
    loop {
        let batch = shared.queue().take(MAX_SAMPLES_PER_REQUEST);
        let Some(batch) = batch else {
            if shared.collector_done.load(Ordering::Acquire) {
                return;
            }
            shared.wake.notified().await;
            continue;
        };
        let body = Bytes::from(wire::encode(&batch.request));
        m.request_bytes.increment(body.len() as u64);
        let outcome = client.send(body).await;
        match outcome {
            Outcome::Sent => {
                shared.done_with(&batch);
                m.requests(Result::Success).increment(1);
                m.sent.increment(batch.samples as u64);
                m.last_success.set(unix_seconds());
                backoff = MIN_BACKOFF;
                if std::mem::take(&mut failing) {
                    tracing::info!(
                        url = client.url(),
                        "remote write: the receiver takes samples again"
                    );
                }
            }
            Outcome::Rejected { detail } => {
                shared.done_with(&batch);
                m.requests(Result::Rejected).increment(1);
                m.failed.increment(batch.samples as u64);
                if let Some(held_back) = reject_warn.allow() {
                    tracing::warn!(
                        url = client.url(),
                        samples = batch.samples,
                        answer = %detail,
                        held_back,
                        "remote write: the receiver refused samples; they are dropped, not retried"
                    );
                }
            }
            Outcome::Retry { why, after, detail } => {
                shared.queue().release();
                m.requests(Result::from(why)).increment(1);
                failing = true;
                let delay = after.map_or(backoff, |a| a.min(MAX_RETRY_AFTER));
                backoff = (backoff * 2).min(MAX_BACKOFF);
                if let Some(held_back) = retry_warn.allow() {
                    tracing::warn!(
                        url = client.url(),
                        error = %detail,
                        retry_in = ?delay,
                        held_back,
                        "remote write: cannot send; keeping the samples and retrying"
                    );
                }
                if stop.is_cancelled() {
                    // Flushing at shutdown: one try per batch, no waiting.
                    return;
                }
                tokio::select! {
                    _ = tokio::time::sleep(delay) => {}
                    _ = stop.cancelled() => {}
                }
            }
        }
    }
}

fn unix_seconds() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

/// Label sets shared across snapshots, so a backlog holds each series'
/// labels once rather than once per snapshot.
#[derive(Default)]
struct Interner {
    sets: HashSet<Labels>,
}

impl Interner {
    fn intern(&mut self, labels: Vec<wire::Label>) -> Labels {
        if let Some(shared) = self.sets.get(labels.as_slice()) {
            return Arc::clone(shared);
        }
        let shared: Labels = Arc::from(labels);
        self.sets.insert(Arc::clone(&shared));
        shared
    }

    /// Forgets the label sets no queued snapshot holds.
    fn prune(&mut self) {
        self.sets.retain(|l| Arc::strong_count(l) > 1);
    }
}

/// The families as remote-write points: counters and gauges one sample
/// each; a classic histogram its `_bucket` (one per `le`, `+Inf` last),
/// `_sum` and `_count` samples, named and labelled as the text scrape
/// names them; a histogram with native buckets one native histogram.
fn points(
    families: &[MetricFamily],
    external: &[(String, String)],
    interner: &mut Interner,
) -> Vec<Point> {
    let mut out = Vec::new();
    for family in families {
        let name = family.name.as_deref().unwrap_or_default();
        for metric in &family.metric {
            let labels = |suffix: &str, extra: Option<(&str, String)>| {
                let mut set: Vec<wire::Label> = metric
                    .label
                    .iter()
                    .map(|l| wire::Label {
                        name: l.name.clone().unwrap_or_default(),
                        value: l.value.clone().unwrap_or_default(),
                    })
                    .collect();
                set.push(wire::Label {
                    name: "__name__".into(),
                    value: format!("{name}{suffix}"),
                });
                if let Some((n, v)) = extra {
                    set.push(wire::Label {
                        name: n.into(),
                        value: v,
                    });
                }
                for (n, v) in external {
                    if !set.iter().any(|l| &l.name == n) {
                        set.push(wire::Label {
                            name: n.clone(),
                            value: v.clone(),
                        });
                    }
                }
                set.sort_by(|a, b| a.name.cmp(&b.name));
                set
            };
            let mut float = |set: Vec<wire::Label>, value: f64| {
                out.push(Point {
                    labels: interner.intern(set),
                    value: Value::Float(value),
                })
            };
            match family.r#type.and_then(|t| MetricType::try_from(t).ok()) {
                Some(MetricType::Counter) => {
                    let value = metric.counter.as_ref().and_then(|c| c.value);
                    float(labels("", None), value.unwrap_or(0.0));
                }
                Some(MetricType::Gauge) => {
                    let value = metric.gauge.as_ref().and_then(|g| g.value);
                    float(labels("", None), value.unwrap_or(0.0));
                }
                Some(MetricType::Histogram) => {
                    let Some(h) = &metric.histogram else { continue };
                    let count = h.sample_count.unwrap_or(0);
                    if let Some(schema) = h.schema {
                        let native = native(h, schema, count);
                        out.push(Point {
                            labels: interner.intern(labels("", None)),
                            value: Value::Native(Arc::new(native)),
                        });
                        continue;
                    }
                    for b in &h.bucket {
                        let le = b.upper_bound.unwrap_or(f64::INFINITY);
                        // As the text scrape writes it (`{}` of the f64).
                        let set = labels("_bucket", Some(("le", format!("{le}"))));
                        float(set, b.cumulative_count.unwrap_or(0) as f64);
                    }
                    float(labels("_bucket", Some(("le", "+Inf".into()))), count as f64);
                    float(labels("_sum", None), h.sample_sum.unwrap_or(0.0));
                    float(labels("_count", None), count as f64);
                }
                None => {}
            }
        }
    }
    out
}

/// A scrape histogram's native fields in remote write's message.
fn native(h: &super::protobuf::Histogram, schema: i32, count: u64) -> wire::Histogram {
    let spans = |spans: &[super::protobuf::BucketSpan]| {
        spans
            .iter()
            .map(|s| wire::BucketSpan {
                offset: s.offset.unwrap_or(0),
                length: s.length.unwrap_or(0),
            })
            .collect()
    };
    wire::Histogram {
        count_int: Some(count),
        sum: h.sample_sum.unwrap_or(0.0),
        schema,
        zero_threshold: h.zero_threshold.unwrap_or(0.0),
        zero_count_int: Some(h.zero_count.unwrap_or(0)),
        negative_spans: spans(&h.negative_span),
        negative_deltas: h.negative_delta.clone(),
        positive_spans: spans(&h.positive_span),
        positive_deltas: h.positive_delta.clone(),
        reset_hint: 0,
        timestamp: 0,
    }
}

/// `agent_remote_write_requests_total`'s `result` label.
#[derive(Debug, Clone, Copy)]
enum Result {
    Success,
    ServerError,
    Throttled,
    Timeout,
    ConnectionError,
    Rejected,
}

impl Result {
    const ALL: [Result; 6] = [
        Result::Success,
        Result::ServerError,
        Result::Throttled,
        Result::Timeout,
        Result::ConnectionError,
        Result::Rejected,
    ];

    fn as_str(self) -> &'static str {
        match self {
            Result::Success => "success",
            Result::ServerError => "server_error",
            Result::Throttled => "throttled",
            Result::Timeout => "timeout",
            Result::ConnectionError => "connection_error",
            Result::Rejected => "rejected",
        }
    }
}

impl From<Retry> for Result {
    fn from(why: Retry) -> Self {
        match why {
            Retry::ServerError => Result::ServerError,
            Retry::Throttled => Result::Throttled,
            Retry::Timeout => Result::Timeout,
            Retry::Connection => Result::ConnectionError,
        }
    }
}

/// The sender's own series (docs/metrics.md, "Remote write"), beside it.
struct RemoteWriteMetrics {
    samples: Counter,
    sent: Counter,
    failed: Counter,
    dropped: Counter,
    pending: Gauge,
    last_success: Gauge,
    request_bytes: Counter,
    requests: [Counter; Result::ALL.len()],
}

impl RemoteWriteMetrics {
    fn new() -> Self {
        Self {
            samples: metrics::counter!(AGENT_REMOTE_WRITE_SAMPLES_TOTAL),
            sent: metrics::counter!(AGENT_REMOTE_WRITE_SAMPLES_SENT_TOTAL),
            failed: metrics::counter!(AGENT_REMOTE_WRITE_SAMPLES_FAILED_TOTAL),
            dropped: metrics::counter!(AGENT_REMOTE_WRITE_SAMPLES_DROPPED_TOTAL),
            pending: metrics::gauge!(AGENT_REMOTE_WRITE_SAMPLES_PENDING),
            last_success: metrics::gauge!(AGENT_REMOTE_WRITE_LAST_SUCCESS_TIMESTAMP_SECONDS),
            request_bytes: metrics::counter!(AGENT_REMOTE_WRITE_REQUEST_BYTES_TOTAL),
            requests: Result::ALL.map(
                |r| metrics::counter!(AGENT_REMOTE_WRITE_REQUESTS_TOTAL, "result" => r.as_str()),
            ),
        }
    }

    fn requests(&self, result: Result) -> &Counter {
        &self.requests[result as usize]
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::telemetry::protobuf;

    fn names(points: &[Point]) -> Vec<String> {
        points
            .iter()
            .map(|p| {
                p.labels
                    .iter()
                    .map(|l| format!("{}={}", l.name, l.value))
                    .collect::<Vec<_>>()
                    .join(",")
            })
            .collect()
    }

    #[test]
    fn families_become_series_named_as_the_scrape_names_them() {
        let key = metrics::Key::from_parts(
            "storage_operations_total",
            vec![metrics::Label::new("backend", "local")],
        );
        let mut counters = protobuf::family("storage_operations_total", None, MetricType::Counter);
        counters
            .metric
            .push(protobuf::counter(protobuf::labels(&key), 7));
        let mut hist = protobuf::family("lat_seconds", None, MetricType::Histogram);
        hist.metric.push(protobuf::histogram(
            Vec::new(),
            &[0.005, 1.0],
            &[2, 3],
            1.5,
            None,
        ));
        let external = vec![
            ("backend".to_string(), "ignored".to_string()),
            ("job".to_string(), "agent".to_string()),
        ];
        let mut interner = Interner::default();
        let points = points(&[counters, hist], &external, &mut interner);
        assert_eq!(
            names(&points),
            [
                "__name__=storage_operations_total,backend=local,job=agent",
                "__name__=lat_seconds_bucket,backend=ignored,job=agent,le=0.005",
                "__name__=lat_seconds_bucket,backend=ignored,job=agent,le=1",
                "__name__=lat_seconds_bucket,backend=ignored,job=agent,le=+Inf",
                "__name__=lat_seconds_sum,backend=ignored,job=agent",
                "__name__=lat_seconds_count,backend=ignored,job=agent",
            ]
        );
        let values: Vec<f64> = points
            .iter()
            .map(|p| match p.value {
                Value::Float(v) => v,
                Value::Native(_) => f64::NAN,
            })
            .collect();
        assert_eq!(values, [7.0, 2.0, 3.0, 3.0, 1.5, 3.0]);
        // A second snapshot shares the first one's label sets.
        let again = super::points(&[], &external, &mut interner);
        assert!(again.is_empty());
        interner.prune();
        assert_eq!(interner.sets.len(), 6);
        drop(points);
        interner.prune();
        assert!(interner.sets.is_empty());
    }
}
