//! Validation: what serde cannot check (ranges, address syntax, files that
//! must be readable), one function per section, and the string-typed
//! values parsed once into [`Resolved`]. The first mistake found is the
//! one reported, sections in the order of the file: network, storage,
//! metrics, log.

use std::net::{IpAddr, SocketAddr};

use ipnet::IpNet;

use super::remote_write::{self, RemoteWrite};
use super::{
    invalid, Config, ConfigError, ExporterKind, NativeHistogramsConfig, PeerTls, SecretUrl,
    WebConfig, HEALTH_PATH, MIN_CACHE_SIZE, READY_PATH,
};

/// Values derived from a validated [`Config`], parsed once so the rest of
/// the agent never re-parses strings.
#[derive(Debug, Clone)]
pub struct Resolved {
    /// `network.listen`, parsed.
    pub listen: SocketAddr,
    /// `network.allowed_networks`, parsed.
    pub peer_networks: Vec<IpNet>,
    /// `network.tls`, loaded and checked; None for plain TCP.
    pub peer_tls: Option<PeerTls>,
    /// `metrics.address` and `metrics.port`, parsed.
    pub metrics_addr: SocketAddr,
    /// `metrics.allowed_networks`, parsed.
    pub allowed_networks: Vec<IpNet>,
    /// `metrics.web_config_file`, loaded and checked (default: plain HTTP).
    pub web: WebConfig,
    /// `storage.redis.url` with the password from `password_file` applied.
    pub redis_url: SecretUrl,
    /// `storage.redis_cluster.nodes`, checked, with the password from its
    /// `password_file` applied to each.
    pub redis_cluster_nodes: Vec<SecretUrl>,
    /// `metrics.remote_write`, loaded; None when its `url` is empty.
    pub remote_write: Option<RemoteWrite>,
}

impl Config {
    /// Checks what serde cannot and parses the string-typed values.
    pub fn validate(&self) -> Result<Resolved, ConfigError> {
        let network = self.validate_network()?;
        let storage = self.validate_storage()?;
        let metrics = self.validate_metrics()?;
        check_log_level(&self.log.level)?;
        Ok(Resolved {
            listen: network.listen,
            peer_networks: network.peer_networks,
            peer_tls: network.peer_tls,
            metrics_addr: metrics.addr,
            allowed_networks: metrics.allowed_networks,
            web: metrics.web,
            redis_url: storage.redis_url,
            redis_cluster_nodes: storage.redis_cluster_nodes,
            remote_write: metrics.remote_write,
        })
    }

    /// `network`: the peer listener, its limits and TLS, and the peers to dial.
    fn validate_network(&self) -> Result<NetworkParts, ConfigError> {
        let network = &self.network;
        let listen: SocketAddr = network.listen.parse().map_err(|_| {
            invalid(
                "network.listen",
                format!("{:?} is not an IP:port address", network.listen),
            )
        })?;
        for (i, peer) in network.peers.iter().enumerate() {
            check_host_port(&format!("network.peers[{i}]"), peer)?;
        }
        if network.max_connections == 0 {
            return Err(invalid(
                "network.max_connections",
                "must be at least 1, got 0",
            ));
        }
        if network.idle_timeout.is_zero() {
            return Err(invalid("network.idle_timeout", "must be greater than 0"));
        }
        if network.max_message_bytes == 0 {
            return Err(invalid(
                "network.max_message_bytes",
                "must be at least 1, got 0",
            ));
        }
        if network.max_buffered_bytes < network.max_message_bytes {
            return Err(invalid(
                "network.max_buffered_bytes",
                format!(
                    "must be at least network.max_message_bytes ({}), got {}",
                    network.max_message_bytes, network.max_buffered_bytes
                ),
            ));
        }
        if network.ping_interval.is_zero() {
            return Err(invalid("network.ping_interval", "must be greater than 0"));
        }
        if network.max_redial_backoff.is_zero() {
            return Err(invalid(
                "network.max_redial_backoff",
                "must be greater than 0",
            ));
        }
        let peer_networks = parse_networks("network.allowed_networks", &network.allowed_networks)?;
        Ok(NetworkParts {
            listen,
            peer_networks,
            peer_tls: self.validate_peer_tls()?,
        })
    }

    /// `network.tls`: loaded and checked when enabled, with each peer's host
    /// a name a certificate can carry.
    fn validate_peer_tls(&self) -> Result<Option<PeerTls>, ConfigError> {
        let network = &self.network;
        if network.tls.handshake_timeout.is_zero() {
            return Err(invalid(
                "network.tls.handshake_timeout",
                "must be greater than 0",
            ));
        }
        if !network.tls.enabled() {
            return Ok(None);
        }
        for (i, peer) in network.peers.iter().enumerate() {
            // The host is the name the peer's certificate must carry.
            let host = peer.rsplit_once(':').map_or("", |(h, _)| h);
            let host = host.trim_start_matches('[').trim_end_matches(']');
            if tokio_rustls::rustls::pki_types::ServerName::try_from(host).is_err() {
                return Err(invalid(
                    &format!("network.peers[{i}]"),
                    format!("{host:?} is not a DNS name or IP address a certificate can carry"),
                ));
            }
        }
        Ok(Some(PeerTls::load(&network.tls)?))
    }

    /// `storage`: every backend's settings, not only the selected one's, so
    /// that a mistake is caught before the backend is switched over.
    fn validate_storage(&self) -> Result<StorageParts, ConfigError> {
        let storage = &self.storage;
        if storage.local.cache_size < MIN_CACHE_SIZE {
            return Err(invalid(
                "storage.local.cache_size",
                format!(
                    "must be at least {MIN_CACHE_SIZE} (1 MiB), got {}",
                    storage.local.cache_size
                ),
            ));
        }
        if storage.local.path.as_os_str().is_empty() {
            return Err(invalid("storage.local.path", "must not be empty"));
        }
        let redis_url = self.redis_url()?;
        if storage.redis.timeout.is_zero() {
            return Err(invalid("storage.redis.timeout", "must be greater than 0"));
        }
        let redis_cluster_nodes = self.redis_cluster_nodes()?;
        if storage.redis_cluster.timeout.is_zero() {
            return Err(invalid(
                "storage.redis_cluster.timeout",
                "must be greater than 0",
            ));
        }
        Ok(StorageParts {
            redis_url,
            redis_cluster_nodes,
        })
    }

    /// `metrics`: the endpoint's address, path, allow-list and web config,
    /// then each exporter's settings.
    fn validate_metrics(&self) -> Result<MetricsParts, ConfigError> {
        let metrics = &self.metrics;
        let ip: IpAddr = metrics.address.parse().map_err(|_| {
            invalid(
                "metrics.address",
                format!("{:?} is not an IP address", metrics.address),
            )
        })?;
        if metrics.port == 0 {
            return Err(invalid(
                "metrics.port",
                "must be between 1 and 65535, got 0",
            ));
        }
        if !metrics.path.starts_with('/') {
            return Err(invalid(
                "metrics.path",
                format!("{:?} must start with '/'", metrics.path),
            ));
        }
        if [HEALTH_PATH, READY_PATH].contains(&metrics.path.as_str()) {
            return Err(invalid(
                "metrics.path",
                format!(
                    "{:?} is reserved for the health and readiness checks",
                    metrics.path
                ),
            ));
        }
        let allowed_networks =
            parse_networks("metrics.allowed_networks", &metrics.allowed_networks)?;
        let web = if metrics.web_config_file.as_os_str().is_empty() {
            WebConfig::default()
        } else {
            WebConfig::load(&metrics.web_config_file)?
        };
        validate_native_histograms(&metrics.native_histograms)?;
        if metrics.process_interval.is_zero() {
            return Err(invalid(
                "metrics.process_interval",
                "must be greater than 0",
            ));
        }
        if metrics.max_connections == 0 {
            return Err(invalid(
                "metrics.max_connections",
                "must be at least 1, got 0",
            ));
        }
        if metrics.exporter == ExporterKind::Dogstatsd {
            check_host_port("metrics.dogstatsd.address", &metrics.dogstatsd.address)?;
        }
        let remote_write = metrics.remote_write.resolve(remote_write::Context {
            enabled: metrics.enabled,
            exporter: metrics.exporter,
            listen: metrics.listen,
            node_id: &self.node_id(),
        })?;
        Ok(MetricsParts {
            addr: SocketAddr::new(ip, metrics.port),
            allowed_networks,
            web,
            remote_write,
        })
    }
}

/// What [`Config::validate_network`] parsed.
struct NetworkParts {
    /// `network.listen`.
    listen: SocketAddr,
    /// `network.allowed_networks`.
    peer_networks: Vec<IpNet>,
    /// `network.tls`, when enabled.
    peer_tls: Option<PeerTls>,
}

/// What [`Config::validate_storage`] resolved.
struct StorageParts {
    /// `storage.redis.url`, with its password file applied.
    redis_url: SecretUrl,
    /// `storage.redis_cluster.nodes`, with its password file applied.
    redis_cluster_nodes: Vec<SecretUrl>,
}

/// What [`Config::validate_metrics`] parsed.
struct MetricsParts {
    /// `metrics.address` and `metrics.port`.
    addr: SocketAddr,
    /// `metrics.allowed_networks`.
    allowed_networks: Vec<IpNet>,
    /// `metrics.web_config_file`, loaded.
    web: WebConfig,
    /// `metrics.remote_write`, loaded when on.
    remote_write: Option<RemoteWrite>,
}

/// `metrics.native_histograms`: the bucket schema's parameters.
fn validate_native_histograms(native: &NativeHistogramsConfig) -> Result<(), ConfigError> {
    if !(native.bucket_factor > 1.0 && native.bucket_factor.is_finite()) {
        return Err(invalid(
            "metrics.native_histograms.bucket_factor",
            format!(
                "{} must be a finite number above 1 (client_golang's default is 1.1)",
                native.bucket_factor
            ),
        ));
    }
    if native.max_buckets == 0 {
        return Err(invalid(
            "metrics.native_histograms.max_buckets",
            "must be at least 1 (the default is 160)",
        ));
    }
    if !(native.zero_threshold > 0.0 && native.zero_threshold.is_finite()) {
        return Err(invalid(
            "metrics.native_histograms.zero_threshold",
            format!(
                "{} must be a finite number above 0: Prometheus 2.x reads a histogram \
                 as native only with a zero bucket of some width (the default is 2^-128)",
                native.zero_threshold
            ),
        ));
    }
    Ok(())
}

/// Parses a list of CIDRs or bare IPs; `key` names the list in errors.
fn parse_networks(key: &str, nets: &[String]) -> Result<Vec<IpNet>, ConfigError> {
    nets.iter()
        .enumerate()
        .map(|(i, net)| {
            net.parse::<IpNet>()
                .or_else(|_| net.parse::<IpAddr>().map(IpNet::from))
                .map_err(|_| {
                    invalid(
                        &format!("{key}[{i}]"),
                        format!("{net:?} is not a CIDR network or IP address"),
                    )
                })
        })
        .collect()
}

/// A `host:port` to dial: a non-empty host and a port from 1 to 65535.
/// (Host names are resolved when dialing, so only the shape is checked.)
fn check_host_port(key: &str, value: &str) -> Result<(), ConfigError> {
    let ok = value
        .rsplit_once(':')
        .is_some_and(|(host, port)| !host.is_empty() && port.parse::<u16>().is_ok_and(|p| p > 0));
    if ok {
        Ok(())
    } else {
        Err(invalid(key, format!("{value:?} is not host:port")))
    }
}

/// `log.level` is a level, or tracing filter directives (`agent=debug,info`).
/// A bare word that is not a level is refused: the filter syntax would take
/// it as a target name (`verbose` would mean "only the `verbose` target", and
/// silence every log line), which is never what was meant.
pub(super) fn check_log_level(value: &str) -> Result<(), ConfigError> {
    const LEVELS: [&str; 6] = ["trace", "debug", "info", "warn", "error", "off"];
    let is_level = |s: &str| LEVELS.iter().any(|l| l.eq_ignore_ascii_case(s.trim()));
    for directive in value.split(',').filter(|d| !d.trim().is_empty()) {
        let level = match directive.rsplit_once('=') {
            // An `=` inside a span field filter (`[span{f=1}]`) is not the level's.
            Some((_, level)) if !level.contains([']', '}']) => level,
            _ => directive,
        };
        if !is_level(level) {
            return Err(invalid(
                "log.level",
                format!(
                    "{level:?} is not a level (trace, debug, info, warn, error, off); \
                     a filter is target=level, e.g. agent=debug,info"
                ),
            ));
        }
    }
    tracing_subscriber::EnvFilter::try_new(value).map_err(|e| {
        invalid(
            "log.level",
            format!("{value:?} is not a valid level or filter: {e}"),
        )
    })?;
    Ok(())
}
