//! Every metric the agent exposes, defined once: name, type, unit, help,
//! labels and buckets. `docs/metrics.md` is checked against this list by a
//! test, the exporter's buckets come from it, and the cached handle structs
//! below are the only places that create metric handles.
//!
//! The names, types and labels are a contract with operators' dashboards
//! and alerts: never rename them.

use metrics::{Counter, Gauge, KeyName, SharedString, Unit};

use super::clock::DurationHistogram;
use crate::protocol::FailReason;

pub const PROCESS_CPU_USAGE: &str = "process_cpu_usage";
pub const PROCESS_MEMORY_BYTES: &str = "process_memory_bytes";
pub const AGENT_PEERS_CONNECTED: &str = "agent_peers_connected";
pub const AGENT_CONNECTIONS_REJECTED_TOTAL: &str = "agent_connections_rejected_total";
pub const AGENT_PEERS_CONFIGURED: &str = "agent_peers_configured";
pub const AGENT_PEER_CONNECTIONS_DENIED_TOTAL: &str = "agent_peer_connections_denied_total";
pub const AGENT_HTTP_REQUESTS_UNAUTHORIZED_TOTAL: &str = "agent_http_requests_unauthorized_total";
pub const AGENT_HTTP_TLS_HANDSHAKE_FAILURES_TOTAL: &str = "agent_http_tls_handshake_failures_total";
pub const AGENT_METRICS_SCRAPES_TOTAL: &str = "agent_metrics_scrapes_total";
pub const MESSAGES_RECEIVED_TOTAL: &str = "messages_received_total";
pub const MESSAGES_FAILED_TOTAL: &str = "messages_failed_total";
pub const MESSAGE_PROCESSING_DURATION_SECONDS: &str = "message_processing_duration_seconds";
pub const STORAGE_OPERATIONS_TOTAL: &str = "storage_operations_total";
pub const STORAGE_OPERATION_ERRORS_TOTAL: &str = "storage_operation_errors_total";
pub const STORAGE_OPERATION_DURATION_SECONDS: &str = "storage_operation_duration_seconds";
pub const AGENT_STORAGE_UP: &str = "agent_storage_up";
pub const AGENT_STORAGE_PANICS_TOTAL: &str = "agent_storage_panics_total";
pub const AGENT_BUILD_INFO: &str = "agent_build_info";

/// Upper bounds in seconds, from a local read (tens of microseconds) to a
/// Redis timeout (seconds). Explicit buckets make the exporter render real
/// histograms, which aggregate across agents; without them it renders
/// summaries, which do not.
pub const LATENCY_BUCKETS: &[f64] = &[
    0.000_01, 0.000_025, 0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025,
    0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Counter,
    Gauge,
    Histogram,
}

impl Kind {
    /// The Prometheus `# TYPE` word.
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Counter => "counter",
            Kind::Gauge => "gauge",
            Kind::Histogram => "histogram",
        }
    }
}

/// Who registers the metric's description.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    Agent,
    /// The standard process set from `metrics-process`.
    MetricsProcess,
}

#[derive(Debug, Clone, Copy)]
pub struct MetricDef {
    pub name: &'static str,
    pub kind: Kind,
    pub unit: Option<Unit>,
    pub help: &'static str,
    pub labels: &'static [&'static str],
    pub buckets: Option<&'static [f64]>,
    pub source: Source,
}

const fn agent(
    name: &'static str,
    kind: Kind,
    unit: Option<Unit>,
    help: &'static str,
    labels: &'static [&'static str],
) -> MetricDef {
    let buckets = match kind {
        Kind::Histogram => Some(LATENCY_BUCKETS),
        _ => None,
    };
    MetricDef {
        name,
        kind,
        unit,
        help,
        labels,
        buckets,
        source: Source::Agent,
    }
}

const fn process(
    name: &'static str,
    kind: Kind,
    unit: Option<Unit>,
    help: &'static str,
) -> MetricDef {
    MetricDef {
        name,
        kind,
        unit,
        help,
        labels: &[],
        buckets: None,
        source: Source::MetricsProcess,
    }
}

pub const METRICS: &[MetricDef] = &[
    agent(
        PROCESS_CPU_USAGE,
        Kind::Gauge,
        Some(Unit::Percent),
        "CPU used by the agent over the last sampling interval, in percent of one core.",
        &[],
    ),
    agent(
        PROCESS_MEMORY_BYTES,
        Kind::Gauge,
        Some(Unit::Bytes),
        "Resident set size of the agent, in bytes.",
        &[],
    ),
    agent(
        AGENT_PEERS_CONNECTED,
        Kind::Gauge,
        Some(Unit::Count),
        "Open peer connections, inbound plus outbound.",
        &[],
    ),
    agent(
        AGENT_PEERS_CONFIGURED,
        Kind::Gauge,
        Some(Unit::Count),
        "Outbound peers in network.peers: where AgentNoPeers expects connections.",
        &[],
    ),
    agent(
        AGENT_CONNECTIONS_REJECTED_TOTAL,
        Kind::Counter,
        Some(Unit::Count),
        "Inbound peer connections closed at once because network.max_connections was reached.",
        &[],
    ),
    agent(
        AGENT_PEER_CONNECTIONS_DENIED_TOTAL,
        Kind::Counter,
        Some(Unit::Count),
        "Inbound peer connections closed before any request was read: outside network.allowed_networks, or a failed TLS handshake, by reason.",
        &["reason"],
    ),
    agent(
        AGENT_HTTP_REQUESTS_UNAUTHORIZED_TOTAL,
        Kind::Counter,
        Some(Unit::Count),
        "Requests to the metrics endpoint answered 401: a missing, unknown or wrong basic-auth credential.",
        &[],
    ),
    agent(
        AGENT_HTTP_TLS_HANDSHAKE_FAILURES_TOTAL,
        Kind::Counter,
        Some(Unit::Count),
        "Connections to the metrics endpoint closed because the TLS handshake failed or timed out.",
        &[],
    ),
    agent(
        AGENT_METRICS_SCRAPES_TOTAL,
        Kind::Counter,
        Some(Unit::Count),
        "Requests to metrics.path, by HTTP status code; a served scrape counts itself.",
        &["code"],
    ),
    agent(
        MESSAGES_RECEIVED_TOTAL,
        Kind::Counter,
        Some(Unit::Count),
        "Messages received from peers, including those answered with an error.",
        &[],
    ),
    agent(
        MESSAGES_FAILED_TOTAL,
        Kind::Counter,
        Some(Unit::Count),
        "Messages answered with an error, by reason.",
        &["reason"],
    ),
    agent(
        MESSAGE_PROCESSING_DURATION_SECONDS,
        Kind::Histogram,
        Some(Unit::Seconds),
        "Time from a complete message read to its reply ready.",
        &[],
    ),
    agent(
        STORAGE_OPERATIONS_TOTAL,
        Kind::Counter,
        Some(Unit::Count),
        "Storage operations completed, successful or not.",
        &["operation", "backend"],
    ),
    agent(
        STORAGE_OPERATION_ERRORS_TOTAL,
        Kind::Counter,
        Some(Unit::Count),
        "Storage operations that failed.",
        &["operation", "backend"],
    ),
    agent(
        STORAGE_OPERATION_DURATION_SECONDS,
        Kind::Histogram,
        Some(Unit::Seconds),
        "Duration of each storage operation.",
        &["operation", "backend"],
    ),
    agent(
        AGENT_STORAGE_UP,
        Kind::Gauge,
        None,
        "1 when the storage backend can serve requests, 0 when it cannot; /ready says why.",
        &["backend"],
    ),
    agent(
        AGENT_STORAGE_PANICS_TOTAL,
        Kind::Counter,
        Some(Unit::Count),
        "Panics caught in storage threads; the local store refuses service after one.",
        &["backend"],
    ),
    agent(
        AGENT_BUILD_INFO,
        Kind::Gauge,
        None,
        "Always 1; the version label names the running build.",
        &["version"],
    ),
    process(
        "process_cpu_seconds_total",
        Kind::Counter,
        Some(Unit::Seconds),
        "Total user and system CPU time spent in seconds.",
    ),
    process(
        "process_resident_memory_bytes",
        Kind::Gauge,
        Some(Unit::Bytes),
        "Resident memory size in bytes.",
    ),
    process(
        "process_virtual_memory_bytes",
        Kind::Gauge,
        Some(Unit::Bytes),
        "Virtual memory size in bytes.",
    ),
    process(
        "process_virtual_memory_max_bytes",
        Kind::Gauge,
        Some(Unit::Bytes),
        "Maximum amount of virtual memory available in bytes.",
    ),
    process(
        "process_open_fds",
        Kind::Gauge,
        Some(Unit::Count),
        "Number of open file descriptors.",
    ),
    process(
        "process_max_fds",
        Kind::Gauge,
        Some(Unit::Count),
        "Maximum number of open file descriptors.",
    ),
    process(
        "process_start_time_seconds",
        Kind::Gauge,
        Some(Unit::Seconds),
        "Start time of the process since unix epoch in seconds.",
    ),
    process(
        "process_threads",
        Kind::Gauge,
        Some(Unit::Count),
        "Number of OS threads in the process.",
    ),
];

/// Registers HELP text (and units) for the agent's own metrics with the
/// installed recorder, so every metric renders with HELP and TYPE lines.
pub fn describe_all() {
    metrics::with_recorder(|recorder| {
        for def in METRICS.iter().filter(|d| d.source == Source::Agent) {
            let name = KeyName::from_const_str(def.name);
            let help = SharedString::const_str(def.help);
            match def.kind {
                Kind::Counter => recorder.describe_counter(name, def.unit, help),
                Kind::Gauge => recorder.describe_gauge(name, def.unit, help),
                Kind::Histogram => recorder.describe_histogram(name, def.unit, help),
            }
        }
    });
}

/// Handles for the message path, created once so that recording is an
/// atomic operation rather than a registry lookup per message.
#[derive(Clone)]
pub struct MessageMetrics {
    pub received: Counter,
    pub duration: DurationHistogram,
    failed: [Counter; FailReason::ALL.len()],
}

impl MessageMetrics {
    /// Binds to the recorder installed now (global or thread-local).
    pub fn new() -> Self {
        Self {
            received: metrics::counter!(MESSAGES_RECEIVED_TOTAL),
            duration: DurationHistogram::new(metrics::histogram!(
                MESSAGE_PROCESSING_DURATION_SECONDS
            )),
            failed: FailReason::ALL
                .map(|r| metrics::counter!(MESSAGES_FAILED_TOTAL, "reason" => r.as_str())),
        }
    }

    pub fn failed(&self, reason: FailReason) -> &Counter {
        &self.failed[reason as usize]
    }
}

impl Default for MessageMetrics {
    fn default() -> Self {
        Self::new()
    }
}

/// Handles for one storage operation on one backend.
#[derive(Clone)]
pub struct StorageOpMetrics {
    pub operations: Counter,
    pub errors: Counter,
    pub duration: DurationHistogram,
}

impl StorageOpMetrics {
    pub fn new(operation: &'static str, backend: &'static str) -> Self {
        let labels = [("operation", operation), ("backend", backend)];
        Self {
            operations: metrics::counter!(STORAGE_OPERATIONS_TOTAL, &labels),
            errors: metrics::counter!(STORAGE_OPERATION_ERRORS_TOTAL, &labels),
            duration: DurationHistogram::new(metrics::histogram!(
                STORAGE_OPERATION_DURATION_SECONDS,
                &labels
            )),
        }
    }
}

/// Why an inbound peer connection was closed before a request was read:
/// the `reason` label of `agent_peer_connections_denied_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DenyReason {
    /// The address is outside `network.allowed_networks`.
    NotAllowed,
    /// TLS is on and the client presented no certificate.
    TlsNoCertificate,
    /// The client's certificate does not chain to `network.tls.ca_file`
    /// (another CA, expired, or not valid for client authentication).
    TlsBadCertificate,
    /// The handshake did not finish within `network.tls.handshake_timeout`.
    TlsTimeout,
    /// Any other handshake failure: not TLS at all, no common protocol
    /// version or cipher, or the client gave up.
    TlsError,
}

impl DenyReason {
    /// Every reason, in label order.
    pub const ALL: [DenyReason; 5] = [
        DenyReason::NotAllowed,
        DenyReason::TlsNoCertificate,
        DenyReason::TlsBadCertificate,
        DenyReason::TlsTimeout,
        DenyReason::TlsError,
    ];

    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            DenyReason::NotAllowed => "not_allowed",
            DenyReason::TlsNoCertificate => "tls_no_certificate",
            DenyReason::TlsBadCertificate => "tls_bad_certificate",
            DenyReason::TlsTimeout => "tls_timeout",
            DenyReason::TlsError => "tls_error",
        }
    }
}

/// Handles for one backend's health: `agent_storage_up` and
/// `agent_storage_panics_total`.
#[derive(Clone)]
pub struct StorageHealthMetrics {
    pub up: Gauge,
    pub panics: Counter,
}

impl StorageHealthMetrics {
    pub fn new(backend: &'static str) -> Self {
        Self {
            up: metrics::gauge!(AGENT_STORAGE_UP, "backend" => backend),
            panics: metrics::counter!(AGENT_STORAGE_PANICS_TOTAL, "backend" => backend),
        }
    }
}

/// `agent_peers_connected` plus the rejected- and denied-connection counters.
#[derive(Clone)]
pub struct PeerMetrics {
    pub connected: Gauge,
    pub configured: Gauge,
    pub rejected: Counter,
    denied: [Counter; DenyReason::ALL.len()],
}

impl PeerMetrics {
    pub fn new() -> Self {
        Self {
            connected: metrics::gauge!(AGENT_PEERS_CONNECTED),
            configured: metrics::gauge!(AGENT_PEERS_CONFIGURED),
            rejected: metrics::counter!(AGENT_CONNECTIONS_REJECTED_TOTAL),
            denied: DenyReason::ALL.map(
                |r| metrics::counter!(AGENT_PEER_CONNECTIONS_DENIED_TOTAL, "reason" => r.as_str()),
            ),
        }
    }

    /// The counter for one deny reason.
    pub fn denied(&self, reason: DenyReason) -> &Counter {
        &self.denied[reason as usize]
    }
}

/// The status codes a request to `metrics.path` can get, in the order of
/// [`HttpMetrics`]' scrape counters.
pub const SCRAPE_CODES: [u16; 4] = [200, 401, 403, 405];

/// The metrics endpoint's own counters: scrapes by code, and security.
#[derive(Clone)]
pub struct HttpMetrics {
    pub unauthorized: Counter,
    pub tls_handshake_failures: Counter,
    scrapes: [Counter; SCRAPE_CODES.len()],
}

impl HttpMetrics {
    pub fn new() -> Self {
        Self {
            unauthorized: metrics::counter!(AGENT_HTTP_REQUESTS_UNAUTHORIZED_TOTAL),
            tls_handshake_failures: metrics::counter!(AGENT_HTTP_TLS_HANDSHAKE_FAILURES_TOTAL),
            scrapes: SCRAPE_CODES
                .map(|c| metrics::counter!(AGENT_METRICS_SCRAPES_TOTAL, "code" => c.to_string())),
        }
    }

    /// Counts one request to `metrics.path` answered with `code`.
    pub fn scraped(&self, code: u16) {
        if let Some(i) = SCRAPE_CODES.iter().position(|&c| c == code) {
            self.scrapes[i].increment(1);
        }
    }
}

impl Default for HttpMetrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Default for PeerMetrics {
    fn default() -> Self {
        Self::new()
    }
}

/// Sets `agent_build_info{version}` to 1.
pub fn record_build_info() {
    metrics::gauge!(AGENT_BUILD_INFO, "version" => env!("CARGO_PKG_VERSION")).set(1.0);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_unique_and_histograms_have_buckets() {
        let mut names: Vec<_> = METRICS.iter().map(|d| d.name).collect();
        names.sort();
        names.dedup();
        assert_eq!(names.len(), METRICS.len());
        for def in METRICS {
            assert_eq!(
                def.kind == Kind::Histogram,
                def.buckets.is_some(),
                "{}",
                def.name
            );
            if def.kind == Kind::Counter {
                assert!(def.name.ends_with("_total"), "{}", def.name);
            }
        }
        assert!(LATENCY_BUCKETS.windows(2).all(|w| w[0] < w[1]));
        // What the sharded recorder accepts (it asserts the same).
        assert!(LATENCY_BUCKETS.len() <= crate::telemetry::recorder::MAX_BOUNDS);
        assert!(LATENCY_BUCKETS[0] <= 0.000_05, "must resolve local reads");
        assert!(
            *LATENCY_BUCKETS.last().unwrap() >= 5.0,
            "must resolve Redis timeouts"
        );
    }
}
