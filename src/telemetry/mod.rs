//! Metrics: definitions, the sharded recorder and its clock, native
//! histogram buckets, exporter installation, the HTTP endpoint (text and
//! protobuf), remote write and process metrics; and the [`Throttle`] that keeps a warning
//! repeated without end to one log line a period, as the storage wrapper,
//! the peer side and the endpoint's socket alarm all need it beside their
//! counters.
//!
//! The endpoint accepts connections as the peer listener does, through
//! [`crate::net`]; nothing here imports the peer side or a storage backend.
//!
//! Call sites only use the `metrics` facade (through the handle structs in
//! [`handles`]); which recorder receives the values is decided here, once, at
//! startup: our [`ShardedRecorder`] for Prometheus, `metrics-exporter-dogstatsd`
//! for DogStatsD, or the no-op recorder.

mod auth;
pub mod clock;
pub mod defs;
pub mod handles;
pub mod http;
pub mod labels;
pub mod native;
pub mod process;
pub mod protobuf;
pub mod recorder;
pub mod remote_write;
mod throttle;

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::config::{ExporterKind, MetricsConfig, Resolved};

pub use clock::{DurationHistogram, Start};
pub use defs::METRICS;
pub use handles::{
    sockets_full_alarm, HttpMetrics, MessageMetrics, PeerMetrics, StorageHealthMetrics,
    StorageOpMetrics,
};
pub use labels::{DenyReason, FailReason};
pub use process::ProcessCollector;
pub use recorder::ShardedRecorder;
pub(crate) use throttle::Throttle;

/// Why the metrics exporter could not start; the agent does not start
/// either (exit 1, this one line).
#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    /// The metrics port could not be bound: in use, or not permitted.
    #[error("cannot listen for metrics on {addr}: {source}")]
    Bind {
        /// `metrics.address:metrics.port`.
        addr: SocketAddr,
        /// What the bind failed with.
        source: std::io::Error,
    },
    /// Another recorder is already installed in this process: the metrics
    /// facade takes one, once.
    #[error("cannot install the metrics recorder: a recorder is already installed")]
    AlreadyInstalled,
    /// The DogStatsD exporter could not be built (a bad address) or installed.
    #[error("cannot install the metrics recorder: {0}")]
    Dogstatsd(#[source] metrics_exporter_dogstatsd::BuildError),
}

/// The installed exporter, and what it still needs to run.
pub enum Installed {
    /// The Prometheus recorder, and the endpoint's socket still to be served.
    Prometheus {
        /// Serves the scrapes and remote write.
        recorder: ShardedRecorder,
        /// Bound to `metrics.address`:`metrics.port`; None with
        /// `metrics.listen: false`.
        listener: Option<TcpListener>,
    },
    /// Pushing to DogStatsD; nothing to serve.
    Dogstatsd,
    /// `metrics.enabled: false`: a no-op recorder.
    Disabled,
}

/// What `/metrics` serves: the recorder's series, and the process set read
/// at the moment of the scrape.
pub struct Exposition {
    /// The installed recorder (a handle on the same series).
    pub recorder: ShardedRecorder,
    /// Reads `/proc` for the process families.
    pub process: ProcessCollector,
}

impl Exposition {
    /// The whole page, in the Prometheus text format 0.0.4.
    pub fn render(&self) -> String {
        let mut out = String::with_capacity(16 * 1024);
        self.recorder.render_into(&mut out);
        self.process.render_into(&mut out);
        out
    }

    /// Every family, read now: the recorder's, then the process set; what
    /// remote write pushes.
    pub fn families(&self) -> Vec<protobuf::MetricFamily> {
        let mut families = self.recorder.protobuf_families();
        families.extend(self.process.protobuf_families());
        families
    }

    /// The whole page as length-delimited protobuf `MetricFamily`
    /// messages, native histogram buckets included when kept.
    pub fn render_protobuf(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(16 * 1024);
        self.recorder.render_protobuf_into(&mut out);
        self.process.render_protobuf_into(&mut out);
        out
    }
}

/// Installs the configured exporter as the global recorder and describes
/// every metric. For Prometheus the listener is bound first, so a port in
/// use fails startup before anything else happens.
pub async fn install(
    cfg: &MetricsConfig,
    resolved: &Resolved,
) -> Result<Installed, TelemetryError> {
    if !cfg.enabled {
        clock::set_timing(false);
        let _ = metrics::set_global_recorder(metrics::NoopRecorder);
        tracing::info!("Metrics endpoint disabled");
        if !cfg.remote_write.url.is_empty() {
            tracing::warn!(
                "metrics.remote_write.url is ignored: metrics.enabled is false, so nothing is pushed"
            );
        }
        return Ok(Installed::Disabled);
    }
    let installed = match cfg.exporter {
        ExporterKind::Prometheus => {
            let addr = resolved.metrics_addr;
            let listener = if cfg.listen {
                let listener = TcpListener::bind(addr)
                    .await
                    .map_err(|source| TelemetryError::Bind { addr, source })?;
                Some(listener)
            } else {
                None
            };
            let recorder = ShardedRecorder::with_native(native_settings(cfg));
            metrics::set_global_recorder(recorder.clone())
                .map_err(|_| TelemetryError::AlreadyInstalled)?;
            Installed::Prometheus { recorder, listener }
        }
        ExporterKind::Dogstatsd => {
            if cfg.native_histograms.enabled {
                tracing::warn!(
                    "metrics.native_histograms.enabled has no effect with metrics.exporter: \
                     dogstatsd; native histograms are served to Prometheus scrapes only"
                );
            }
            metrics_exporter_dogstatsd::DogStatsDBuilder::default()
                .with_remote_address(&cfg.dogstatsd.address)
                .and_then(|b| b.with_telemetry(false).install())
                .map_err(TelemetryError::Dogstatsd)?;
            Installed::Dogstatsd
        }
    };
    defs::describe_all();
    handles::record_build_info();
    Ok(installed)
}

/// What `metrics.native_histograms` asks of the recorder; None when off.
pub fn native_settings(cfg: &MetricsConfig) -> Option<native::NativeSettings> {
    let n = &cfg.native_histograms;
    n.enabled.then(|| native::NativeSettings {
        schema: native::schema_for_factor(n.bucket_factor),
        max_buckets: n.max_buckets,
        zero_threshold: n.zero_threshold,
    })
}

/// Starts the background work of an installed exporter: the HTTP endpoint
/// for Prometheus (process metrics are read at each scrape; `ready` answers
/// `/ready`) and remote write when configured, the process sampler for
/// DogStatsD. Returns the remote-write sender, which shutdown flushes.
pub fn spawn(
    installed: Installed,
    cfg: &MetricsConfig,
    resolved: &Resolved,
    cancel: &CancellationToken,
    ready: http::ReadyCheck,
    allowed_networks: http::SharedNetworks,
) -> Option<remote_write::Handle> {
    match installed {
        Installed::Disabled => None,
        Installed::Prometheus { recorder, listener } => {
            let remote = resolved.remote_write.clone().map(|rw| {
                let exposition = Exposition {
                    recorder: recorder.clone(),
                    process: ProcessCollector::new(cfg.process_interval),
                };
                remote_write::spawn(exposition, rw)
            });
            let Some(listener) = listener else {
                tracing::info!("metrics.listen is false: no metrics port, no /health or /ready");
                return remote;
            };
            if let Ok(addr) = listener.local_addr() {
                tracing::info!(
                    %addr,
                    path = %cfg.path,
                    tls = resolved.web.tls.is_some(),
                    basic_auth = !resolved.web.users.is_empty(),
                    "metrics endpoint listening"
                );
            }
            let endpoint = http::Endpoint {
                exposition: Exposition {
                    recorder,
                    process: ProcessCollector::new(cfg.process_interval),
                },
                path: cfg.path.clone(),
                allowed_networks,
                max_connections: cfg.max_connections,
                tls: resolved
                    .web
                    .tls
                    .as_ref()
                    .map(|t| tokio_rustls::TlsAcceptor::from(Arc::clone(&t.server))),
                auth: auth::BasicAuth::new(resolved.web.users.clone()),
                metrics: HttpMetrics::new(),
                ready,
            };
            if !resolved.web.users.is_empty() && resolved.web.tls.is_none() {
                tracing::warn!(
                    "metrics.web_config_file sets basic_auth_users without tls_server_config: \
                     passwords cross the network in clear"
                );
            }
            tokio::spawn(http::serve(listener, endpoint, cancel.clone()));
            remote
        }
        Installed::Dogstatsd => {
            // Sample before returning, so the first push already has process metrics.
            let mut sampler = process::ProcessSampler::new();
            sampler.sample();
            tokio::spawn(sampler.run(cfg.process_interval, cancel.clone()));
            tracing::info!(address = %cfg.dogstatsd.address, "sending metrics to DogStatsD");
            None
        }
    }
}
