//! Every metric the agent exposes, defined once: name, type, unit, help,
//! labels and buckets. `docs/metrics.md` is checked against this list by a
//! test, and the exporter's buckets come from it. Pure data: it imports
//! nothing of the agent; the handles that record into these metrics are in
//! [`super::handles`].
//!
//! The names, types and labels are a contract with operators' dashboards
//! and alerts: never rename them.

use metrics::{KeyName, SharedString, Unit};

/// Gauge: the agent's CPU use over the last window, in percent of one core.
pub const PROCESS_CPU_USAGE: &str = "process_cpu_usage";
/// Gauge: the agent's resident set size, in bytes.
pub const PROCESS_MEMORY_BYTES: &str = "process_memory_bytes";
/// Gauge: open peer connections, inbound plus outbound.
pub const AGENT_PEERS_CONNECTED: &str = "agent_peers_connected";
/// Counter: inbound connections closed at once at `network.max_connections`.
pub const AGENT_CONNECTIONS_REJECTED_TOTAL: &str = "agent_connections_rejected_total";
/// Gauge: outbound peers in `network.peers`.
pub const AGENT_PEERS_CONFIGURED: &str = "agent_peers_configured";
/// Counter: inbound connections closed before a request was read, by reason.
pub const AGENT_PEER_CONNECTIONS_DENIED_TOTAL: &str = "agent_peer_connections_denied_total";
/// Counter: metrics endpoint requests answered 401.
pub const AGENT_HTTP_REQUESTS_UNAUTHORIZED_TOTAL: &str = "agent_http_requests_unauthorized_total";
/// Counter: metrics endpoint connections whose TLS handshake failed.
pub const AGENT_HTTP_TLS_HANDSHAKE_FAILURES_TOTAL: &str = "agent_http_tls_handshake_failures_total";
/// Counter: requests to `metrics.path`, by status code.
pub const AGENT_METRICS_SCRAPES_TOTAL: &str = "agent_metrics_scrapes_total";
/// Counter: never-served inbound connections closed to make room at the cap.
pub const AGENT_CONNECTIONS_EVICTED_TOTAL: &str = "agent_connections_evicted_total";
/// Counter: inbound connections closed after `network.idle_timeout`.
pub const AGENT_CONNECTIONS_IDLE_CLOSED_TOTAL: &str = "agent_connections_idle_closed_total";
/// Counter: messages received from peers, failed ones included.
pub const MESSAGES_RECEIVED_TOTAL: &str = "messages_received_total";
/// Counter: messages answered with an error, by reason.
pub const MESSAGES_FAILED_TOTAL: &str = "messages_failed_total";
/// Histogram: seconds from a complete message read to its reply ready.
pub const MESSAGE_PROCESSING_DURATION_SECONDS: &str = "message_processing_duration_seconds";
/// Counter: storage operations completed, by operation and backend.
pub const STORAGE_OPERATIONS_TOTAL: &str = "storage_operations_total";
/// Counter: storage operations that failed, by operation and backend.
pub const STORAGE_OPERATION_ERRORS_TOTAL: &str = "storage_operation_errors_total";
/// Histogram: seconds per storage operation, by operation and backend.
pub const STORAGE_OPERATION_DURATION_SECONDS: &str = "storage_operation_duration_seconds";
/// Gauge: 1 while the storage backend can serve, 0 when not.
pub const AGENT_STORAGE_UP: &str = "agent_storage_up";
/// Counter: panics caught in storage threads.
pub const AGENT_STORAGE_PANICS_TOTAL: &str = "agent_storage_panics_total";
/// Gauge: always 1; its `version` label names the running build.
pub const AGENT_BUILD_INFO: &str = "agent_build_info";

/// Upper bounds in seconds, from a local read (tens of microseconds) to a
/// Redis timeout (seconds). Explicit buckets make the exporter render real
/// histograms, which aggregate across agents; without them it renders
/// summaries, which do not.
pub const LATENCY_BUCKETS: &[f64] = &[
    0.000_01, 0.000_025, 0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025,
    0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// A metric's Prometheus type, which fixes how it may be recorded and queried.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Only goes up (restarts reset it); query with `rate()`.
    Counter,
    /// A value that goes up and down.
    Gauge,
    /// Observations in the explicit buckets [`LATENCY_BUCKETS`].
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
    /// The agent's own code.
    Agent,
    /// The standard process set from `metrics-process`.
    MetricsProcess,
}

/// One metric as operators see it: the contract `docs/metrics.md` is checked against.
#[derive(Debug, Clone, Copy)]
pub struct MetricDef {
    /// The series name, without labels.
    pub name: &'static str,
    /// Counter, gauge or histogram.
    pub kind: Kind,
    /// The unit; None for a dimensionless value (a 0/1 gauge).
    pub unit: Option<Unit>,
    /// The `# HELP` text.
    pub help: &'static str,
    /// Label names, in the order handles build them.
    pub labels: &'static [&'static str],
    /// Bucket bounds in seconds, for histograms only.
    pub buckets: Option<&'static [f64]>,
    /// Who describes it: the agent or `metrics-process`.
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

/// Every metric the agent exposes; the one list docs and exporter setup read.
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
        AGENT_CONNECTIONS_EVICTED_TOTAL,
        Kind::Counter,
        Some(Unit::Count),
        "Inbound peer connections that had never completed a request, closed at network.max_connections to make room for a new one.",
        &[],
    ),
    agent(
        AGENT_CONNECTIONS_IDLE_CLOSED_TOTAL,
        Kind::Counter,
        Some(Unit::Count),
        "Inbound peer connections closed because no complete request arrived within network.idle_timeout.",
        &[],
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

/// The definition of `name`; panics on a name not in [`METRICS`] (a
/// programming error the catalog tests would catch first).
pub fn def(name: &str) -> &'static MetricDef {
    METRICS
        .iter()
        .find(|d| d.name == name)
        .unwrap_or_else(|| panic!("{name} is not in the metric catalog"))
}

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
