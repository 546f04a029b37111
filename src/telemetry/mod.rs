//! Metrics: definitions, exporter installation, the HTTP endpoint and the
//! process sampler.
//!
//! Call sites only use the `metrics` facade (through the handle structs in
//! [`defs`]); which exporter receives the values is decided here, once, at
//! startup.

pub mod defs;
pub mod http;
pub mod process;

use std::net::SocketAddr;
use std::time::Duration;

use metrics_exporter_prometheus::{
    Matcher, PrometheusBuilder, PrometheusHandle, PrometheusRecorder,
};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::config::{ExporterKind, MetricsConfig, Resolved};

pub use defs::{MessageMetrics, PeerMetrics, StorageOpMetrics, METRICS};

/// How often histogram samples are drained into their buckets, so memory
/// stays flat however many messages are recorded between scrapes. The
/// exporter keeps every sample (24 bytes) until it is drained: at 370,000
/// messages a second (two samples each) a 5 s interval held ~32 MiB of
/// samples and took 8 page faults per 1,000 messages; 250 ms holds ~4 MiB
/// and costs four wake-ups a second when idle (docs/performance.md).
pub const UPKEEP_INTERVAL: Duration = Duration::from_millis(250);

#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    #[error("cannot listen for metrics on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("cannot install the metrics recorder: {0}")]
    Install(String),
}

/// The installed exporter, and what it still needs to run.
pub enum Installed {
    Prometheus {
        handle: PrometheusHandle,
        listener: TcpListener,
    },
    Dogstatsd,
    Disabled,
}

/// A Prometheus recorder configured with every histogram's buckets.
/// Exposed so benchmarks and tests render exactly what the agent renders.
pub fn prometheus_recorder() -> PrometheusRecorder {
    let mut builder = PrometheusBuilder::new();
    for def in METRICS {
        if let Some(buckets) = def.buckets {
            // Only errors on empty buckets, which the definitions never have.
            builder = builder
                .set_buckets_for_metric(Matcher::Full(def.name.to_string()), buckets)
                .unwrap_or_else(|_| unreachable!("{} has empty buckets", def.name));
        }
    }
    builder.build_recorder()
}

/// Installs the configured exporter as the global recorder and describes
/// every metric. For Prometheus the listener is bound first, so a port in
/// use fails startup before anything else happens.
pub async fn install(
    cfg: &MetricsConfig,
    resolved: &Resolved,
) -> Result<Installed, TelemetryError> {
    if !cfg.enabled {
        let _ = metrics::set_global_recorder(metrics::NoopRecorder);
        tracing::info!("Metrics endpoint disabled");
        return Ok(Installed::Disabled);
    }
    let installed = match cfg.exporter {
        ExporterKind::Prometheus => {
            let addr = resolved.metrics_addr;
            let listener = TcpListener::bind(addr)
                .await
                .map_err(|source| TelemetryError::Bind { addr, source })?;
            let recorder = prometheus_recorder();
            let handle = recorder.handle();
            metrics::set_global_recorder(recorder)
                .map_err(|e| TelemetryError::Install(e.to_string()))?;
            Installed::Prometheus { handle, listener }
        }
        ExporterKind::Dogstatsd => {
            metrics_exporter_dogstatsd::DogStatsDBuilder::default()
                .with_remote_address(&cfg.dogstatsd.address)
                .and_then(|b| b.with_telemetry(false).install())
                .map_err(|e| TelemetryError::Install(e.to_string()))?;
            Installed::Dogstatsd
        }
    };
    defs::describe_all();
    defs::record_build_info();
    Ok(installed)
}

/// Starts the background work of an installed exporter: the HTTP endpoint
/// and histogram upkeep for Prometheus, the process sampler for any enabled
/// exporter.
pub fn spawn(
    installed: Installed,
    cfg: &MetricsConfig,
    resolved: &Resolved,
    cancel: &CancellationToken,
) {
    if matches!(installed, Installed::Disabled) {
        return;
    }
    // Sample before returning, so the first scrape already sees process metrics.
    let mut sampler = process::ProcessSampler::new();
    sampler.sample();
    tokio::spawn(sampler.run(cfg.process_interval, cancel.clone()));
    if let Installed::Prometheus { handle, listener } = installed {
        if let Ok(addr) = listener.local_addr() {
            tracing::info!(%addr, path = %cfg.path, "metrics endpoint listening");
        }
        let upkeep = handle.clone();
        let upkeep_cancel = cancel.clone();
        tokio::spawn(async move {
            let mut ticker = tokio::time::interval(UPKEEP_INTERVAL);
            // A busy runtime that misses ticks should not then drain in a burst.
            ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = upkeep_cancel.cancelled() => return,
                    _ = ticker.tick() => upkeep.run_upkeep(),
                }
            }
        });
        let endpoint = http::Endpoint {
            handle,
            path: cfg.path.clone(),
            allowed_networks: resolved.allowed_networks.clone(),
            max_connections: cfg.max_connections,
        };
        tokio::spawn(http::serve(listener, endpoint, cancel.clone()));
    } else {
        tracing::info!(address = %cfg.dogstatsd.address, "sending metrics to DogStatsD");
    }
}
