//! Every metric the agent exposes, defined once: name, type, unit, help,
//! labels and buckets. `docs/metrics.md` is checked against this list by a
//! test, and the exporter's buckets come from it. Pure data: it imports
//! nothing of the agent; the handles that record into these metrics are in
//! [`super::handles`].
//!
//! The names, types and labels are a contract with operators' dashboards
//! and alerts: never rename them.

use metrics::{KeyName, SharedString, Unit};

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

/// Defines each metric once: its constant (the name call sites record
/// through) and its entry in [`METRICS`] come from the same line, so the
/// two cannot drift apart.
macro_rules! catalog {
    ($(
        $(#[$doc:meta])*
        $konst:ident = $ctor:ident($name:literal $(, $arg:expr)* $(,)?);
    )*) => {
        $(
            $(#[$doc])*
            pub const $konst: &str = $name;
        )*

        /// Every metric the agent exposes; the one list docs and exporter
        /// setup read.
        pub const METRICS: &[MetricDef] = &[$($ctor($konst $(, $arg)*)),*];
    };
}

catalog! {
    /// Gauge: the agent's CPU use over the last window, in percent of one core.
    PROCESS_CPU_USAGE = agent(
        "process_cpu_usage",
        Kind::Gauge,
        Some(Unit::Percent),
        "CPU used by the agent over the last sampling interval, in percent of one core.",
        &[],
    );
    /// Gauge: the agent's resident set size, in bytes.
    PROCESS_MEMORY_BYTES = agent(
        "process_memory_bytes",
        Kind::Gauge,
        Some(Unit::Bytes),
        "Resident set size of the agent, in bytes.",
        &[],
    );
    /// Gauge: open peer connections, inbound plus outbound.
    AGENT_PEERS_CONNECTED = agent(
        "agent_peers_connected",
        Kind::Gauge,
        Some(Unit::Count),
        "Open peer connections, inbound plus outbound.",
        &[],
    );
    /// Gauge: outbound peers in `network.peers`.
    AGENT_PEERS_CONFIGURED = agent(
        "agent_peers_configured",
        Kind::Gauge,
        Some(Unit::Count),
        "Outbound peers in network.peers: where AgentNoPeers expects connections.",
        &[],
    );
    /// Counter: inbound connections closed at once at `network.max_connections`.
    AGENT_CONNECTIONS_REJECTED_TOTAL = agent(
        "agent_connections_rejected_total",
        Kind::Counter,
        Some(Unit::Count),
        "Inbound peer connections closed at once because network.max_connections was reached.",
        &[],
    );
    /// Counter: inbound connections closed before a request was read, by reason.
    AGENT_PEER_CONNECTIONS_DENIED_TOTAL = agent(
        "agent_peer_connections_denied_total",
        Kind::Counter,
        Some(Unit::Count),
        "Inbound peer connections closed before any request was read: outside network.allowed_networks, or a failed TLS handshake, by reason.",
        &["reason"],
    );
    /// Counter: metrics endpoint requests answered 401.
    AGENT_HTTP_REQUESTS_UNAUTHORIZED_TOTAL = agent(
        "agent_http_requests_unauthorized_total",
        Kind::Counter,
        Some(Unit::Count),
        "Requests to the metrics endpoint answered 401: a missing, unknown or wrong basic-auth credential.",
        &[],
    );
    /// Counter: metrics endpoint connections whose TLS handshake failed.
    AGENT_HTTP_TLS_HANDSHAKE_FAILURES_TOTAL = agent(
        "agent_http_tls_handshake_failures_total",
        Kind::Counter,
        Some(Unit::Count),
        "Connections to the metrics endpoint closed because the TLS handshake failed or timed out.",
        &[],
    );
    /// Counter: requests to `metrics.path`, by status code.
    AGENT_METRICS_SCRAPES_TOTAL = agent(
        "agent_metrics_scrapes_total",
        Kind::Counter,
        Some(Unit::Count),
        "Requests to metrics.path, by HTTP status code; a served scrape counts itself.",
        &["code"],
    );
    /// Counter: never-served inbound connections closed to make room at the cap.
    AGENT_CONNECTIONS_EVICTED_TOTAL = agent(
        "agent_connections_evicted_total",
        Kind::Counter,
        Some(Unit::Count),
        "Inbound peer connections that had never completed a request, closed at network.max_connections to make room for a new one.",
        &[],
    );
    /// Counter: inbound connections closed after `network.idle_timeout`.
    AGENT_CONNECTIONS_IDLE_CLOSED_TOTAL = agent(
        "agent_connections_idle_closed_total",
        Kind::Counter,
        Some(Unit::Count),
        "Inbound peer connections closed because no complete request arrived within network.idle_timeout.",
        &[],
    );
    /// Counter: times a listener stopped accepting at its socket bound.
    AGENT_LISTENER_SOCKETS_FULL_TOTAL = agent(
        "agent_listener_sockets_full_total",
        Kind::Counter,
        Some(Unit::Count),
        "Times a listener stopped accepting because it held twice its connection cap in sockets (open and closing); new connections wait in the kernel's listen backlog until some close. By listener: peer or metrics.",
        &["listener"],
    );
    /// Counter: messages received from peers, failed ones included.
    MESSAGES_RECEIVED_TOTAL = agent(
        "messages_received_total",
        Kind::Counter,
        Some(Unit::Count),
        "Messages received from peers, including those answered with an error.",
        &[],
    );
    /// Counter: messages answered with an error, by reason.
    MESSAGES_FAILED_TOTAL = agent(
        "messages_failed_total",
        Kind::Counter,
        Some(Unit::Count),
        "Messages answered with an error, by reason.",
        &["reason"],
    );
    /// Histogram: seconds from a complete message read to its reply ready.
    MESSAGE_PROCESSING_DURATION_SECONDS = agent(
        "message_processing_duration_seconds",
        Kind::Histogram,
        Some(Unit::Seconds),
        "Time from a complete message read to its reply ready.",
        &[],
    );
    /// Counter: storage operations completed, by operation and backend.
    STORAGE_OPERATIONS_TOTAL = agent(
        "storage_operations_total",
        Kind::Counter,
        Some(Unit::Count),
        "Storage operations completed, successful or not.",
        &["operation", "backend"],
    );
    /// Counter: storage operations that failed, by operation and backend.
    STORAGE_OPERATION_ERRORS_TOTAL = agent(
        "storage_operation_errors_total",
        Kind::Counter,
        Some(Unit::Count),
        "Storage operations that failed.",
        &["operation", "backend"],
    );
    /// Histogram: seconds per storage operation, by operation and backend.
    STORAGE_OPERATION_DURATION_SECONDS = agent(
        "storage_operation_duration_seconds",
        Kind::Histogram,
        Some(Unit::Seconds),
        "Duration of each storage operation.",
        &["operation", "backend"],
    );
    /// Gauge: 1 while the storage backend can serve, 0 when not.
    AGENT_STORAGE_UP = agent(
        "agent_storage_up",
        Kind::Gauge,
        None,
        "1 when the storage backend can serve requests, 0 when it cannot; /ready says why.",
        &["backend"],
    );
    /// Counter: panics caught in storage threads.
    AGENT_STORAGE_PANICS_TOTAL = agent(
        "agent_storage_panics_total",
        Kind::Counter,
        Some(Unit::Count),
        "Panics caught in storage threads; the local store refuses service after one.",
        &["backend"],
    );
    /// Gauge: always 1; its `version` label names the running build.
    AGENT_BUILD_INFO = agent(
        "agent_build_info",
        Kind::Gauge,
        None,
        "Always 1; the version label names the running build.",
        &["version"],
    );
    /// Counter: samples remote write read from the recorder and queued.
    AGENT_REMOTE_WRITE_SAMPLES_TOTAL = agent(
        "agent_remote_write_samples_total",
        Kind::Counter,
        Some(Unit::Count),
        "Samples remote write read from the recorder and queued for the receiver; a native histogram counts as one. Each ends as sent, failed, dropped or still pending.",
        &[],
    );
    /// Counter: samples the receiver stored.
    AGENT_REMOTE_WRITE_SAMPLES_SENT_TOTAL = agent(
        "agent_remote_write_samples_sent_total",
        Kind::Counter,
        Some(Unit::Count),
        "Samples the remote-write receiver accepted (answered 2xx).",
        &[],
    );
    /// Counter: samples given up because the receiver refused them for good.
    AGENT_REMOTE_WRITE_SAMPLES_FAILED_TOTAL = agent(
        "agent_remote_write_samples_failed_total",
        Kind::Counter,
        Some(Unit::Count),
        "Samples given up because the remote-write receiver refused their request with a status that is not retried (4xx other than 429).",
        &[],
    );
    /// Counter: the oldest samples dropped beyond `max_pending`.
    AGENT_REMOTE_WRITE_SAMPLES_DROPPED_TOTAL = agent(
        "agent_remote_write_samples_dropped_total",
        Kind::Counter,
        Some(Unit::Count),
        "Oldest pending samples dropped because more than metrics.remote_write.max_pending waited for the receiver.",
        &[],
    );
    /// Gauge: samples waiting for the receiver.
    AGENT_REMOTE_WRITE_SAMPLES_PENDING = agent(
        "agent_remote_write_samples_pending",
        Kind::Gauge,
        Some(Unit::Count),
        "Samples waiting to be sent to the remote-write receiver, those in a request on the wire included.",
        &[],
    );
    /// Gauge: when the receiver last accepted a request.
    AGENT_REMOTE_WRITE_LAST_SUCCESS_TIMESTAMP_SECONDS = agent(
        "agent_remote_write_last_success_timestamp_seconds",
        Kind::Gauge,
        Some(Unit::Seconds),
        "Unix time at which the remote-write receiver last accepted a request; 0 before the first.",
        &[],
    );
    /// Counter: write requests, by result.
    AGENT_REMOTE_WRITE_REQUESTS_TOTAL = agent(
        "agent_remote_write_requests_total",
        Kind::Counter,
        Some(Unit::Count),
        "Remote-write requests by result: success, server_error (5xx, retried), throttled (429, retried), timeout (retried), connection_error (retried) or rejected (other status, not retried).",
        &["result"],
    );
    /// Counter: compressed bytes of the write requests sent.
    AGENT_REMOTE_WRITE_REQUEST_BYTES_TOTAL = agent(
        "agent_remote_write_request_bytes_total",
        Kind::Counter,
        Some(Unit::Bytes),
        "Bytes of remote-write request bodies (snappy-compressed protobuf) sent, every attempt counted.",
        &[],
    );
    /// Counter: user plus system CPU seconds, to clock-tick resolution.
    PROCESS_CPU_SECONDS_TOTAL = process(
        "process_cpu_seconds_total",
        Kind::Counter,
        Some(Unit::Seconds),
        "Total user and system CPU time spent in seconds.",
    );
    /// Gauge: resident memory, in bytes.
    PROCESS_RESIDENT_MEMORY_BYTES = process(
        "process_resident_memory_bytes",
        Kind::Gauge,
        Some(Unit::Bytes),
        "Resident memory size in bytes.",
    );
    /// Gauge: virtual memory, in bytes.
    PROCESS_VIRTUAL_MEMORY_BYTES = process(
        "process_virtual_memory_bytes",
        Kind::Gauge,
        Some(Unit::Bytes),
        "Virtual memory size in bytes.",
    );
    /// Gauge: the address-space limit, in bytes (about 1.8e19 when unlimited).
    PROCESS_VIRTUAL_MEMORY_MAX_BYTES = process(
        "process_virtual_memory_max_bytes",
        Kind::Gauge,
        Some(Unit::Bytes),
        "Maximum amount of virtual memory available in bytes.",
    );
    /// Gauge: open file descriptors.
    PROCESS_OPEN_FDS = process(
        "process_open_fds",
        Kind::Gauge,
        Some(Unit::Count),
        "Number of open file descriptors.",
    );
    /// Gauge: the file descriptor limit.
    PROCESS_MAX_FDS = process(
        "process_max_fds",
        Kind::Gauge,
        Some(Unit::Count),
        "Maximum number of open file descriptors.",
    );
    /// Gauge: when the process started, in seconds since the Unix epoch.
    PROCESS_START_TIME_SECONDS = process(
        "process_start_time_seconds",
        Kind::Gauge,
        Some(Unit::Seconds),
        "Start time of the process since unix epoch in seconds.",
    );
    /// Gauge: OS threads in the process.
    PROCESS_THREADS = process(
        "process_threads",
        Kind::Gauge,
        Some(Unit::Count),
        "Number of OS threads in the process.",
    );
}

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
