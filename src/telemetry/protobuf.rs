//! The protobuf exposition: length-delimited `io.prometheus.client.MetricFamily`
//! messages, which Prometheus asks for when it ingests native histograms
//! (every version reads them only from this format).
//!
//! The messages are the part of client_model's `metrics.proto` the agent
//! writes, declared with prost's derive: no generated code, no `protoc` at
//! build time, and prost's encoder, which the ecosystem (tonic,
//! metrics-exporter-prometheus) relies on. Fields keep the proto's numbers
//! and proto2's optional presence, so a field the agent leaves out is absent
//! on the wire, as Prometheus expects.

use metrics_exporter_prometheus::formatting::{sanitize_label_key, sanitize_metric_name};
use prost::Message;

use super::defs::Kind;
use super::native::{spans_and_deltas, NativeSnapshot};

/// What a scraper's `Accept` must name to get this format.
pub const PROTOBUF_CONTENT_TYPE: &str =
    "application/vnd.google.protobuf; proto=io.prometheus.client.MetricFamily; encoding=delimited";

/// `LabelPair`.
#[derive(Clone, PartialEq, Message)]
pub struct LabelPair {
    /// The label's name.
    #[prost(string, optional, tag = "1")]
    pub name: Option<String>,
    /// Its value, unescaped.
    #[prost(string, optional, tag = "2")]
    pub value: Option<String>,
}

/// `MetricType`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, prost::Enumeration)]
#[repr(i32)]
pub enum MetricType {
    /// A counter.
    Counter = 0,
    /// A gauge.
    Gauge = 1,
    /// A histogram, classic and/or native.
    Histogram = 4,
}

/// `Gauge` and `Counter` carry one value under the same field number.
#[derive(Clone, PartialEq, Message)]
pub struct Value {
    /// The value.
    #[prost(double, optional, tag = "1")]
    pub value: Option<f64>,
}

/// `Bucket`: one classic bucket.
#[derive(Clone, PartialEq, Message)]
pub struct Bucket {
    /// Observations at or below `upper_bound`.
    #[prost(uint64, optional, tag = "1")]
    pub cumulative_count: Option<u64>,
    /// The bucket's `le`.
    #[prost(double, optional, tag = "2")]
    pub upper_bound: Option<f64>,
}

/// `BucketSpan`: a run of consecutive native buckets.
#[derive(Clone, PartialEq, Message)]
pub struct BucketSpan {
    /// Gap to the previous span, or the first bucket's index.
    #[prost(sint32, optional, tag = "1")]
    pub offset: Option<i32>,
    /// Buckets in the run.
    #[prost(uint32, optional, tag = "2")]
    pub length: Option<u32>,
}

/// `Histogram`: classic buckets, and the native fields when kept.
#[derive(Clone, PartialEq, Message)]
pub struct Histogram {
    /// Observations, NaN included.
    #[prost(uint64, optional, tag = "1")]
    pub sample_count: Option<u64>,
    /// Their sum.
    #[prost(double, optional, tag = "2")]
    pub sample_sum: Option<f64>,
    /// Classic buckets, ascending, without +Inf.
    #[prost(message, repeated, tag = "3")]
    pub bucket: Vec<Bucket>,
    /// Native resolution.
    #[prost(sint32, optional, tag = "5")]
    pub schema: Option<i32>,
    /// Native zero bucket's half-width.
    #[prost(double, optional, tag = "6")]
    pub zero_threshold: Option<f64>,
    /// Native zero bucket's count.
    #[prost(uint64, optional, tag = "7")]
    pub zero_count: Option<u64>,
    /// Negative native buckets' spans.
    #[prost(message, repeated, tag = "9")]
    pub negative_span: Vec<BucketSpan>,
    /// Their counts, each as the difference from the one before.
    #[prost(sint64, repeated, tag = "10")]
    pub negative_delta: Vec<i64>,
    /// Positive native buckets' spans.
    #[prost(message, repeated, tag = "12")]
    pub positive_span: Vec<BucketSpan>,
    /// Their counts, each as the difference from the one before.
    #[prost(sint64, repeated, tag = "13")]
    pub positive_delta: Vec<i64>,
}

/// `Metric`: one series.
#[derive(Clone, PartialEq, Message)]
pub struct Metric {
    /// Its labels.
    #[prost(message, repeated, tag = "1")]
    pub label: Vec<LabelPair>,
    /// A gauge's value.
    #[prost(message, optional, tag = "2")]
    pub gauge: Option<Value>,
    /// A counter's value.
    #[prost(message, optional, tag = "3")]
    pub counter: Option<Value>,
    /// A histogram's buckets.
    #[prost(message, optional, tag = "7")]
    pub histogram: Option<Histogram>,
}

/// `MetricFamily`: a name's HELP, TYPE and series.
#[derive(Clone, PartialEq, Message)]
pub struct MetricFamily {
    /// The metric name.
    #[prost(string, optional, tag = "1")]
    pub name: Option<String>,
    /// Its HELP text, unescaped.
    #[prost(string, optional, tag = "2")]
    pub help: Option<String>,
    /// Its type.
    #[prost(enumeration = "MetricType", optional, tag = "3")]
    pub r#type: Option<i32>,
    /// Its series.
    #[prost(message, repeated, tag = "4")]
    pub metric: Vec<Metric>,
}

/// Appends one message with its varint length in front.
pub(crate) fn write_delimited(out: &mut Vec<u8>, family: &MetricFamily) {
    // Encoding into a Vec only fails when it cannot grow, which aborts first.
    let _ = family.encode_length_delimited(out);
}

/// A family with no series yet.
pub(crate) fn family(name: &str, help: Option<&str>, kind: MetricType) -> MetricFamily {
    MetricFamily {
        name: Some(sanitize_metric_name(name)),
        help: help.map(str::to_owned),
        r#type: Some(kind as i32),
        metric: Vec::new(),
    }
}

/// A series' label pairs, names sanitized as the text format's are.
pub(crate) fn labels(key: &metrics::Key) -> Vec<LabelPair> {
    key.labels()
        .map(|l| LabelPair {
            name: Some(sanitize_label_key(l.key())),
            value: Some(l.value().to_owned()),
        })
        .collect()
}

/// A counter's series.
pub(crate) fn counter(label: Vec<LabelPair>, value: u64) -> Metric {
    Metric {
        label,
        counter: Some(Value {
            value: Some(value as f64),
        }),
        ..Metric::default()
    }
}

/// A gauge's series.
pub(crate) fn gauge(label: Vec<LabelPair>, value: f64) -> Metric {
    Metric {
        label,
        gauge: Some(Value { value: Some(value) }),
        ..Metric::default()
    }
}

/// A histogram's series: its classic buckets (cumulative counts, one per
/// bound, then the total), and its native buckets when kept.
pub(crate) fn histogram(
    label: Vec<LabelPair>,
    bounds: &[f64],
    cumulative: &[u64],
    sum: f64,
    native: Option<NativeSnapshot>,
) -> Metric {
    let mut h = Histogram {
        sample_count: Some(cumulative.last().copied().unwrap_or(0)),
        sample_sum: Some(sum),
        bucket: bounds
            .iter()
            .zip(cumulative)
            .map(|(&le, &count)| Bucket {
                cumulative_count: Some(count),
                upper_bound: Some(le),
            })
            .collect(),
        ..Histogram::default()
    };
    if let Some(native) = native {
        let (negative_span, negative_delta) = spans_and_deltas(&native.negative);
        let (positive_span, positive_delta) = spans_and_deltas(&native.positive);
        let spans = |spans: Vec<(i32, u32)>| {
            spans
                .into_iter()
                .map(|(offset, length)| BucketSpan {
                    offset: Some(offset),
                    length: Some(length),
                })
                .collect()
        };
        h.schema = Some(native.schema);
        // Always above 0 (config), which is also what makes Prometheus 2.x
        // take the histogram for a native one.
        h.zero_threshold = Some(native.zero_threshold);
        h.zero_count = Some(native.zero_count);
        h.negative_span = spans(negative_span);
        h.negative_delta = negative_delta;
        h.positive_span = spans(positive_span);
        h.positive_delta = positive_delta;
    }
    Metric {
        label,
        histogram: Some(h),
        ..Metric::default()
    }
}

/// A family of one unlabelled gauge or counter (the process set).
pub(crate) fn unlabelled(name: &str, help: &str, kind: Kind, value: f64) -> MetricFamily {
    let (kind, metric) = match kind {
        Kind::Counter => (
            MetricType::Counter,
            Metric {
                counter: Some(Value { value: Some(value) }),
                ..Metric::default()
            },
        ),
        Kind::Gauge | Kind::Histogram => (MetricType::Gauge, gauge(Vec::new(), value)),
    };
    let mut family = family(name, Some(help), kind);
    family.metric.push(metric);
    family
}
