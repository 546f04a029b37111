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
pub const AGENT_CONNECTIONS_EVICTED_TOTAL: &str = "agent_connections_evicted_total";
pub const AGENT_CONNECTIONS_IDLE_CLOSED_TOTAL: &str = "agent_connections_idle_closed_total";
pub const MESSAGES_RECEIVED_TOTAL: &str = "messages_received_total";
pub const MESSAGES_FAILED_TOTAL: &str = "messages_failed_total";
pub const MESSAGE_PROCESSING_DURATION_SECONDS: &str = "message_processing_duration_seconds";
pub const STORAGE_OPERATIONS_TOTAL: &str = "storage_operations_total";
pub const STORAGE_OPERATION_ERRORS_TOTAL: &str = "storage_operation_errors_total";
pub const STORAGE_OPERATION_DURATION_SECONDS: &str = "storage_operation_duration_seconds";
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
        AGENT_CONNECTIONS_REJECTED_TOTAL,
        Kind::Counter,
        Some(Unit::Count),
        "Inbound peer connections closed at once because network.max_connections was reached.",
        &[],
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

/// `agent_peers_connected` plus the counters of inbound connections the
/// agent closed on its own: rejected, evicted, idle.
#[derive(Clone)]
pub struct PeerMetrics {
    pub connected: Gauge,
    pub rejected: Counter,
    pub evicted: Counter,
    pub idle_closed: Counter,
}

impl PeerMetrics {
    pub fn new() -> Self {
        Self {
            connected: metrics::gauge!(AGENT_PEERS_CONNECTED),
            rejected: metrics::counter!(AGENT_CONNECTIONS_REJECTED_TOTAL),
            evicted: metrics::counter!(AGENT_CONNECTIONS_EVICTED_TOTAL),
            idle_closed: metrics::counter!(AGENT_CONNECTIONS_IDLE_CLOSED_TOTAL),
        }
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
