//! The cached metric handles each component records through, created once
//! so that recording is an atomic operation rather than a registry lookup.
//! Names and labels come from the catalog ([`super::defs`]); the label
//! values that name a reason (a failure reason, a deny reason) from
//! [`super::labels`], below both these handles and the code that picks
//! the reason.

use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use metrics::{Counter, Gauge};

use super::clock::DurationHistogram;
use super::defs::*;
use super::labels::{DenyReason, FailReason};
use super::throttle::Throttle;

/// The one label of a single-label metric, as the catalog names it.
fn label(name: &str) -> &'static str {
    def(name).labels[0]
}

/// Handles for the message path, created once so that recording is an
/// atomic operation rather than a registry lookup per message.
#[derive(Clone)]
pub struct MessageMetrics {
    /// `messages_received_total`.
    pub received: Counter,
    /// `message_processing_duration_seconds`.
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
                .map(|r| metrics::counter!(MESSAGES_FAILED_TOTAL, label(MESSAGES_FAILED_TOTAL) => r.as_str())),
        }
    }

    /// The `messages_failed_total` series for `reason`.
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
    /// `storage_operations_total` for this operation and backend.
    pub operations: Counter,
    /// `storage_operation_errors_total` for this operation and backend.
    pub errors: Counter,
    /// `storage_operation_duration_seconds` for this operation and backend.
    pub duration: DurationHistogram,
}

impl StorageOpMetrics {
    /// Binds to the recorder installed now, with `operation` and `backend` labels.
    pub fn new(operation: &'static str, backend: &'static str) -> Self {
        // The label names as the catalog defines them, in its order.
        let names = def(STORAGE_OPERATIONS_TOTAL).labels;
        let labels = [(names[0], operation), (names[1], backend)];
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

/// Handles for one backend's health: `agent_storage_up` and
/// `agent_storage_panics_total`.
#[derive(Clone)]
pub struct StorageHealthMetrics {
    /// `agent_storage_up` for this backend.
    pub up: Gauge,
    /// `agent_storage_panics_total` for this backend.
    pub panics: Counter,
}

impl StorageHealthMetrics {
    /// Binds to the recorder installed now, with the `backend` label.
    pub fn new(backend: &'static str) -> Self {
        Self {
            up: metrics::gauge!(AGENT_STORAGE_UP, label(AGENT_STORAGE_UP) => backend),
            panics: metrics::counter!(AGENT_STORAGE_PANICS_TOTAL, label(AGENT_STORAGE_PANICS_TOTAL) => backend),
        }
    }
}

/// `agent_peers_connected` and `agent_peers_configured`, plus the counters of
/// inbound connections the agent closed on its own: rejected, denied,
/// evicted, idle.
#[derive(Clone)]
pub struct PeerMetrics {
    /// `agent_peers_connected`.
    pub connected: Gauge,
    /// `agent_peers_configured`.
    pub configured: Gauge,
    /// `agent_connections_evicted_total`.
    pub evicted: Counter,
    /// `agent_connections_idle_closed_total`.
    pub idle_closed: Counter,
    /// `agent_connections_rejected_total`.
    pub rejected: Counter,
    denied: [Counter; DenyReason::ALL.len()],
}

impl PeerMetrics {
    /// Binds to the recorder installed now.
    pub fn new() -> Self {
        Self {
            connected: metrics::gauge!(AGENT_PEERS_CONNECTED),
            configured: metrics::gauge!(AGENT_PEERS_CONFIGURED),
            evicted: metrics::counter!(AGENT_CONNECTIONS_EVICTED_TOTAL),
            idle_closed: metrics::counter!(AGENT_CONNECTIONS_IDLE_CLOSED_TOTAL),
            rejected: metrics::counter!(AGENT_CONNECTIONS_REJECTED_TOTAL),
            denied: DenyReason::ALL.map(
                |r| metrics::counter!(AGENT_PEER_CONNECTIONS_DENIED_TOTAL, label(AGENT_PEER_CONNECTIONS_DENIED_TOTAL) => r.as_str()),
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
    /// `agent_http_requests_unauthorized_total`.
    pub unauthorized: Counter,
    /// `agent_http_tls_handshake_failures_total`.
    pub tls_handshake_failures: Counter,
    scrapes: [Counter; SCRAPE_CODES.len()],
}

impl HttpMetrics {
    /// Binds to the recorder installed now.
    pub fn new() -> Self {
        Self {
            unauthorized: metrics::counter!(AGENT_HTTP_REQUESTS_UNAUTHORIZED_TOTAL),
            tls_handshake_failures: metrics::counter!(AGENT_HTTP_TLS_HANDSHAKE_FAILURES_TOTAL),
            scrapes: SCRAPE_CODES
                .map(|c| metrics::counter!(AGENT_METRICS_SCRAPES_TOTAL, label(AGENT_METRICS_SCRAPES_TOTAL) => c.to_string())),
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
    metrics::gauge!(AGENT_BUILD_INFO, label(AGENT_BUILD_INFO) => env!("CARGO_PKG_VERSION"))
        .set(1.0);
}

/// What a listener does each time it finds its socket bound reached
/// (twice `cap_key`, its connection cap, in sockets): counts it in
/// `agent_listener_sockets_full_total{listener}` and warns, at most once a
/// minute, with how many times since the last warning. Without it,
/// connections waited in the listen backlog and nothing said why.
pub fn sockets_full_alarm(
    listener: &'static str,
    cap_key: &'static str,
    cap: usize,
) -> impl Fn() + Send + Sync + 'static {
    let full = metrics::counter!(
        AGENT_LISTENER_SOCKETS_FULL_TOTAL,
        label(AGENT_LISTENER_SOCKETS_FULL_TOTAL) => listener
    );
    let throttle = Mutex::new(Throttle::new(Duration::from_secs(60)));
    move || {
        full.increment(1);
        let allowed = throttle
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .allow();
        if let Some(suppressed) = allowed {
            tracing::warn!(
                listener,
                sockets = cap.saturating_mul(2),
                suppressed,
                "{cap_key} is reached twice over in sockets (connections open and on their way out): \
                 not accepting until some close; new connections wait in the listen backlog"
            );
        }
    }
}
