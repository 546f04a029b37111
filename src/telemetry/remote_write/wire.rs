//! The remote-write 1.0 wire format: Prometheus's `prompb.WriteRequest`,
//! protobuf then snappy's block format, as the receiver's
//! `/api/v1/write` handler decodes it.
//!
//! The messages are the part of `prompb/types.proto` and `remote.proto`
//! the agent sends, declared with prost's derive like the scrape's
//! `MetricFamily` (no generated code, no `protoc`). proto3's scalars are
//! left out on the wire when zero, as Go's encoder does; the two `oneof`
//! counts are `optional`, which puts them on the wire even at zero, as a
//! set `oneof` member is.

use prost::Message;

/// `Content-Type` of a write request.
pub const CONTENT_TYPE: &str = "application/x-protobuf";
/// `Content-Encoding` of a write request.
pub const CONTENT_ENCODING: &str = "snappy";
/// `X-Prometheus-Remote-Write-Version`: remote write 1.0.
pub const VERSION: &str = "0.1.0";

/// `prometheus.WriteRequest`: one request's series.
#[derive(Clone, PartialEq, Message)]
pub struct WriteRequest {
    /// The series, each with its samples or histograms.
    #[prost(message, repeated, tag = "1")]
    pub timeseries: Vec<TimeSeries>,
}

/// `prometheus.TimeSeries`: one label set and its points, oldest first.
#[derive(Clone, PartialEq, Message)]
pub struct TimeSeries {
    /// `__name__` and the other labels, sorted by name.
    #[prost(message, repeated, tag = "1")]
    pub labels: Vec<Label>,
    /// Float samples, sorted by timestamp.
    #[prost(message, repeated, tag = "2")]
    pub samples: Vec<Sample>,
    /// Native histograms, sorted by timestamp.
    #[prost(message, repeated, tag = "4")]
    pub histograms: Vec<Histogram>,
}

/// `prometheus.Label`.
#[derive(Clone, PartialEq, Eq, Hash, Message)]
pub struct Label {
    /// The label's name.
    #[prost(string, tag = "1")]
    pub name: String,
    /// Its value.
    #[prost(string, tag = "2")]
    pub value: String,
}

/// `prometheus.Sample`.
#[derive(Clone, PartialEq, Message)]
pub struct Sample {
    /// The value.
    #[prost(double, tag = "1")]
    pub value: f64,
    /// Milliseconds since the Unix epoch.
    #[prost(int64, tag = "2")]
    pub timestamp: i64,
}

/// `prometheus.BucketSpan`: a run of consecutive native buckets.
#[derive(Clone, PartialEq, Message)]
pub struct BucketSpan {
    /// Gap to the previous span, or the first bucket's index.
    #[prost(sint32, tag = "1")]
    pub offset: i32,
    /// Buckets in the run.
    #[prost(uint32, tag = "2")]
    pub length: u32,
}

/// `prometheus.Histogram`: a native histogram with integer counts.
#[derive(Clone, PartialEq, Message)]
pub struct Histogram {
    /// `count_int` of the `count` oneof: observations.
    #[prost(uint64, optional, tag = "1")]
    pub count_int: Option<u64>,
    /// Their sum.
    #[prost(double, tag = "3")]
    pub sum: f64,
    /// The resolution.
    #[prost(sint32, tag = "4")]
    pub schema: i32,
    /// The zero bucket's half-width.
    #[prost(double, tag = "5")]
    pub zero_threshold: f64,
    /// `zero_count_int` of the `zero_count` oneof.
    #[prost(uint64, optional, tag = "6")]
    pub zero_count_int: Option<u64>,
    /// Negative buckets' spans.
    #[prost(message, repeated, tag = "8")]
    pub negative_spans: Vec<BucketSpan>,
    /// Their counts, each as the difference from the one before.
    #[prost(sint64, repeated, tag = "9")]
    pub negative_deltas: Vec<i64>,
    /// Positive buckets' spans.
    #[prost(message, repeated, tag = "11")]
    pub positive_spans: Vec<BucketSpan>,
    /// Their counts, each as the difference from the one before.
    #[prost(sint64, repeated, tag = "12")]
    pub positive_deltas: Vec<i64>,
    /// `ResetHint`: 0, unknown (the receiver detects resets itself).
    #[prost(int32, tag = "14")]
    pub reset_hint: i32,
    /// Milliseconds since the Unix epoch.
    #[prost(int64, tag = "15")]
    pub timestamp: i64,
}

/// The request body: the protobuf encoding, snappy-compressed.
pub fn encode(request: &WriteRequest) -> Vec<u8> {
    let raw = request.encode_to_vec();
    // The block format (not the framed one) is what remote write specifies.
    // Compressing only fails above 2^32 - 1 bytes of input, far beyond
    // any request the queue forms.
    snap::raw::Encoder::new()
        .compress_vec(&raw)
        .unwrap_or_default()
}

/// A request body back to its message: the test receivers' half.
pub fn decode(body: &[u8]) -> Result<WriteRequest, String> {
    let raw = snap::raw::Decoder::new()
        .decompress_vec(body)
        .map_err(|e| format!("not snappy: {e}"))?;
    WriteRequest::decode(raw.as_slice()).map_err(|e| format!("not a WriteRequest: {e}"))
}
