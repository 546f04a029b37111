//! Configuration: built-in defaults, then the YAML file, then `AGENT_*`
//! environment variables (later sources win).
//!
//! Loading is split in two steps so that every mistake is reported the same
//! way: figment/serde catch unknown keys and ill-typed values, then
//! [`Config::validate`] checks what types cannot (ranges, address syntax, URLs).
//! Either way the operator gets one [`ConfigError`] naming the key.
//!
//! Files the configuration names (certificates, keys, the web config file,
//! the Redis password file) are read here too, so that `check-config`
//! catches an unreadable or mismatched file before a restart does.

mod tls;
pub mod web;

pub use tls::PeerTls;
pub use web::{WebConfig, WebTls};

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use figment::providers::{Env, Format, Serialized, Yaml};
use figment::Figment;
use ipnet::IpNet;
use serde::{Deserialize, Serialize};

/// Prefix of environment overrides; `__` separates key path segments.
pub const ENV_PREFIX: &str = "AGENT_";
/// The metrics endpoint's liveness path: answers OK while the process runs.
/// Reserved: `metrics.path` may not take it.
pub const HEALTH_PATH: &str = "/health";
/// The metrics endpoint's readiness path: 200 when storage is usable, 503
/// with the reason when not. Reserved like [`HEALTH_PATH`].
pub const READY_PATH: &str = "/ready";
/// File used when `--config` is not given, if it exists.
pub const DEFAULT_CONFIG_FILE: &str = "agent.yaml";

/// A configuration mistake, reported to the operator as one line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    /// Dotted key path (`metrics.port`), or empty when the file itself is at fault.
    pub key: String,
    /// What is wrong and, where it helps, what is allowed instead.
    pub message: String,
}

impl std::fmt::Display for ConfigError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.key.is_empty() {
            write!(f, "invalid configuration: {}", self.message)
        } else {
            write!(f, "invalid configuration: {}: {}", self.key, self.message)
        }
    }
}

impl std::error::Error for ConfigError {}

pub(crate) fn invalid(key: &str, message: impl Into<String>) -> ConfigError {
    ConfigError {
        key: key.to_string(),
        message: message.into(),
    }
}

/// The whole configuration, one field per top-level key; `check-config` prints it.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// `node`: this agent's identity.
    pub node: NodeConfig,
    /// `network`: the peer port, the peers to dial, and their limits.
    pub network: NetworkConfig,
    /// `storage`: where keys and values are kept.
    pub storage: StorageConfig,
    /// `metrics`: how metrics leave the agent.
    pub metrics: MetricsConfig,
    /// `log`: what goes to stderr, and how.
    pub log: LogConfig,
}

/// `node`: who this agent is.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct NodeConfig {
    /// Empty means the hostname.
    pub id: String,
}

/// `network`: the peer protocol, inbound and outbound.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct NetworkConfig {
    /// `network.listen`: IP:port of the peer protocol.
    pub listen: String,
    /// `network.peers`: `host:port` of peers to dial, keep alive with pings, and redial.
    pub peers: Vec<String>,
    /// `network.max_connections`: inbound connections at once; at the cap a
    /// never-served one is evicted, or else the newcomer is closed.
    pub max_connections: usize,
    /// An inbound connection with no complete request for this long is
    /// closed, so silent connections cannot hold every slot.
    #[serde(with = "humantime_serde")]
    pub idle_timeout: Duration,
    /// `network.max_message_bytes`: longest request line; a longer one gets an
    /// error reply and the connection is closed.
    pub max_message_bytes: usize,
    /// Bytes all inbound connections together may buffer beyond their fixed
    /// 64 KiB buffers: long request lines, and replies waiting for peers
    /// that do not read them. At the limit, connections wait.
    pub max_buffered_bytes: usize,
    /// `network.ping_interval`: how often outbound peers are pinged, and how
    /// long a reply may take before the peer is redialed.
    #[serde(with = "humantime_serde")]
    pub ping_interval: Duration,
    /// `network.max_redial_backoff`: cap on the doubling wait between redials.
    #[serde(with = "humantime_serde")]
    pub max_redial_backoff: Duration,
    /// CIDRs (or bare IPs) allowed to connect; empty allows everyone.
    /// Others are closed at accept, before a byte is read.
    pub allowed_networks: Vec<String>,
    /// Mutual TLS between peers; all three files empty means plain TCP.
    pub tls: PeerTlsConfig,
}

/// Mutual TLS for the peer port, inbound and outbound.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct PeerTlsConfig {
    /// This node's certificate chain (PEM), presented as server and as client.
    pub cert_file: PathBuf,
    /// The private key of `cert_file` (PEM).
    pub key_file: PathBuf,
    /// The CA (PEM) that signs every peer's certificate, both directions.
    pub ca_file: PathBuf,
    /// A handshake not finished within this is dropped, so a client that
    /// stalls mid-handshake cannot hold a connection slot.
    #[serde(with = "humantime_serde")]
    pub handshake_timeout: Duration,
}

impl Default for PeerTlsConfig {
    fn default() -> Self {
        Self {
            cert_file: PathBuf::new(),
            key_file: PathBuf::new(),
            ca_file: PathBuf::new(),
            handshake_timeout: Duration::from_secs(10),
        }
    }
}

impl PeerTlsConfig {
    /// Whether any of the three files is set (all must be, then).
    pub fn enabled(&self) -> bool {
        [&self.cert_file, &self.key_file, &self.ca_file]
            .iter()
            .any(|p| !p.as_os_str().is_empty())
    }
}

impl Default for NetworkConfig {
    fn default() -> Self {
        Self {
            listen: "0.0.0.0:7070".into(),
            peers: Vec::new(),
            max_connections: 1024,
            idle_timeout: Duration::from_secs(5 * 60),
            max_message_bytes: 1024 * 1024,
            max_buffered_bytes: 64 * 1024 * 1024,
            ping_interval: Duration::from_secs(10),
            max_redial_backoff: Duration::from_secs(30),
            allowed_networks: Vec::new(),
            tls: PeerTlsConfig::default(),
        }
    }
}

/// `storage.backend`: which store holds the data.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum BackendKind {
    /// A redb file on this node; a put is acknowledged once durable.
    #[default]
    Local,
    /// One Redis server.
    Redis,
    /// Redis Cluster, through the `redis` crate's cluster client.
    #[serde(rename = "redis_cluster")]
    RedisCluster,
}

impl BackendKind {
    /// The value of the `backend` metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            BackendKind::Local => "local",
            BackendKind::Redis => "redis",
            BackendKind::RedisCluster => "redis_cluster",
        }
    }
}

/// `storage`: the backend, and the settings of each kind (only the chosen one is used).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct StorageConfig {
    /// `storage.backend`: which of the sections below is used.
    pub backend: BackendKind,
    /// `storage.local`: for `backend: local`.
    pub local: LocalConfig,
    /// `storage.redis`: for `backend: redis`.
    pub redis: RedisConfig,
    /// `storage.redis_cluster`: for `backend: redis_cluster`.
    pub redis_cluster: RedisClusterConfig,
}

/// `storage.local`: the redb database.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct LocalConfig {
    /// `storage.local.path`: the redb file; parent directories are created.
    pub path: PathBuf,
    /// `storage.local.cache_size`: bytes of database pages redb keeps in
    /// memory. redb's own default, 1 GiB, let a large database take a
    /// healthy idle agent over the 1 GiB `HighMemory` alert; pages beyond
    /// the cache are read through the kernel's page cache instead.
    pub cache_size: usize,
}

/// `storage.local.cache_size` by default: 64 MiB, enough for the hot keys
/// of a node agent, and small beside what the alert allows.
pub const DEFAULT_CACHE_SIZE: usize = 64 * 1024 * 1024;

/// The smallest `storage.local.cache_size`: below a megabyte redb rereads
/// its own index pages on almost every operation.
const MIN_CACHE_SIZE: usize = 1024 * 1024;

impl Default for LocalConfig {
    fn default() -> Self {
        Self {
            path: PathBuf::from("./data/agent.db"),
            cache_size: DEFAULT_CACHE_SIZE,
        }
    }
}

/// `storage.redis`: one Redis server.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct RedisConfig {
    /// `storage.redis.url`: `redis://[:password@]host:port/db`; the password is
    /// redacted wherever the configuration is shown.
    pub url: String,
    /// A file holding the Redis password, read at startup, so the secret
    /// need not sit in the YAML or the environment. Exclusive with a
    /// password in `url`.
    pub password_file: PathBuf,
    /// `storage.redis.key_prefix`: prepended to every key, to keep the agent's
    /// keys apart from others in the same database.
    pub key_prefix: String,
    /// `storage.redis.timeout`: bound on every command and connection attempt.
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
}

impl Default for RedisConfig {
    fn default() -> Self {
        Self {
            url: "redis://127.0.0.1:6379/0".into(),
            password_file: PathBuf::new(),
            key_prefix: "agent:".into(),
            timeout: Duration::from_secs(2),
        }
    }
}

/// `storage.redis_cluster`: a Redis Cluster shared by a fleet of agents.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct RedisClusterConfig {
    /// Seed nodes (`redis://[:password@]host:port`). One reachable seed is
    /// enough: the client learns the rest of the cluster, and follows its
    /// changes, from the cluster itself. More seeds let the agent (re)start
    /// while some nodes are down.
    pub nodes: Vec<String>,
    /// A file holding the password of every node, read at startup, as for
    /// `storage.redis.password_file`. Exclusive with passwords in `nodes`.
    pub password_file: PathBuf,
    /// `storage.redis_cluster.key_prefix`: prepended to every key.
    pub key_prefix: String,
    /// Bound on every operation, redirects and retries included.
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
}

impl Default for RedisClusterConfig {
    fn default() -> Self {
        Self {
            // No guess at an address: `backend: redis_cluster` requires the
            // operator to name the cluster.
            nodes: Vec::new(),
            password_file: PathBuf::new(),
            key_prefix: "agent:".into(),
            timeout: Duration::from_secs(2),
        }
    }
}

/// `metrics.exporter`: how metrics leave the agent.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum ExporterKind {
    /// An HTTP endpoint for Prometheus to scrape, with `/health` and `/ready`.
    #[default]
    Prometheus,
    /// UDP push to `metrics.dogstatsd.address`; no HTTP endpoint.
    Dogstatsd,
}

/// `metrics`: the exporter, and the endpoint Prometheus scrapes.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct MetricsConfig {
    /// `metrics.enabled`: false installs a no-op recorder and opens no port.
    pub enabled: bool,
    /// `metrics.exporter`: Prometheus endpoint or DogStatsD push.
    pub exporter: ExporterKind,
    /// `metrics.address`: IP the metrics endpoint listens on.
    pub address: String,
    /// `metrics.port`: port of the metrics endpoint.
    pub port: u16,
    /// `metrics.path`: the path serving metrics; may not be [`HEALTH_PATH`] or
    /// [`READY_PATH`].
    pub path: String,
    /// CIDRs (or bare IPs) allowed to scrape; empty allows everyone.
    pub allowed_networks: Vec<String>,
    /// `metrics.process_interval`: shortest window of `process_cpu_usage`; with
    /// DogStatsD, how often process metrics are pushed.
    #[serde(with = "humantime_serde")]
    pub process_interval: Duration,
    /// Concurrent connections to the metrics endpoint; at the cap the oldest
    /// that has not completed a request (or else the oldest) gives way.
    pub max_connections: usize,
    /// An exporter-toolkit web config file (TLS, basic auth) for the
    /// metrics endpoint; empty serves plain HTTP without authentication.
    pub web_config_file: PathBuf,
    /// `metrics.dogstatsd`: used with `exporter: dogstatsd` only.
    pub dogstatsd: DogstatsdConfig,
    /// `metrics.native_histograms`: exponential buckets beside the classic
    /// ones, served in the protobuf scrape format.
    pub native_histograms: NativeHistogramsConfig,
}

impl Default for MetricsConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            exporter: ExporterKind::Prometheus,
            address: "0.0.0.0".into(),
            port: 8080,
            path: "/metrics".into(),
            allowed_networks: Vec::new(),
            process_interval: Duration::from_secs(5),
            max_connections: 64,
            web_config_file: PathBuf::new(),
            dogstatsd: DogstatsdConfig::default(),
            native_histograms: NativeHistogramsConfig::default(),
        }
    }
}

/// `metrics.native_histograms`: Prometheus native histograms, with
/// client_golang's settings and defaults.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct NativeHistogramsConfig {
    /// `metrics.native_histograms.enabled`. Off by default: a Prometheus
    /// that ingests native histograms stores a histogram sent with native
    /// buckets only as a native one, so turning them on changes which
    /// series the classic `_bucket` queries of existing dashboards find.
    pub enabled: bool,
    /// `metrics.native_histograms.bucket_factor`: the largest ratio allowed
    /// between a bucket's bounds (> 1); picks the schema as client_golang's
    /// `NativeHistogramBucketFactor` does (1.1 gives schema 3, 8 buckets per
    /// power of two).
    pub bucket_factor: f64,
    /// `metrics.native_histograms.max_buckets`: past this many populated
    /// buckets a histogram halves its resolution (at least 1).
    pub max_buckets: u32,
    /// `metrics.native_histograms.zero_threshold`: magnitudes at or below
    /// it count in the zero bucket (above 0; default 2^-128).
    pub zero_threshold: f64,
}

impl Default for NativeHistogramsConfig {
    fn default() -> Self {
        Self {
            enabled: false,
            bucket_factor: 1.1,
            max_buckets: 160,
            zero_threshold: 2f64.powi(-128),
        }
    }
}

/// `metrics.dogstatsd`: where DogStatsD pushes go.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct DogstatsdConfig {
    /// host:port of the DogStatsD agent (UDP).
    pub address: String,
}

impl Default for DogstatsdConfig {
    fn default() -> Self {
        Self {
            address: "127.0.0.1:8125".into(),
        }
    }
}

/// `log.format`: how lines on stderr are written.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines, for a terminal or the journal.
    #[default]
    Text,
    /// One JSON object per line, for log shippers.
    Json,
}

/// `log`: what the agent writes to stderr.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    /// `log.level`: a level or filter (`agent=debug,info`); `RUST_LOG` wins when set.
    pub level: String,
    /// `log.format`: text or JSON.
    pub format: LogFormat,
}

impl Default for LogConfig {
    fn default() -> Self {
        Self {
            level: "info".into(),
            format: LogFormat::Text,
        }
    }
}

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
}

/// A URL that may hold a password. `Debug` and `Display` redact it, so a
/// stray `{:?}` cannot leak the secret; [`SecretUrl::expose`] is the one way
/// to the real text, for the client that connects with it.
#[derive(Clone, PartialEq, Eq)]
pub struct SecretUrl(String);

impl SecretUrl {
    /// The URL with its password, for connecting only.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for SecretUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:?}", redact_url(&self.0))
    }
}

impl std::fmt::Display for SecretUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&redact_url(&self.0))
    }
}

impl Config {
    /// Loads defaults, then `file` (or `./agent.yaml` when present), then the
    /// `AGENT_*` environment, and validates the result.
    pub fn load(file: Option<&Path>) -> Result<(Config, Resolved), ConfigError> {
        let mut figment = Figment::from(Serialized::defaults(Config::default()));
        // figment silently skips a missing file; an operator who named one
        // must hear about it.
        let file = file.or_else(|| {
            let default = Path::new(DEFAULT_CONFIG_FILE);
            default.exists().then_some(default)
        });
        if let Some(path) = file {
            check_holds_keys(path)?;
            figment = figment.merge(Yaml::file_exact(path));
        }
        figment = figment.merge(Env::prefixed(ENV_PREFIX).split("__"));
        let config: Config = figment.extract().map_err(from_figment)?;
        let resolved = config.validate()?;
        Ok((config, resolved))
    }

    /// Checks what serde cannot and parses the string-typed values.
    pub fn validate(&self) -> Result<Resolved, ConfigError> {
        let listen: SocketAddr = self.network.listen.parse().map_err(|_| {
            invalid(
                "network.listen",
                format!("{:?} is not an IP:port address", self.network.listen),
            )
        })?;
        for (i, peer) in self.network.peers.iter().enumerate() {
            check_host_port(&format!("network.peers[{i}]"), peer)?;
        }
        if self.network.max_connections == 0 {
            return Err(invalid(
                "network.max_connections",
                "must be at least 1, got 0",
            ));
        }
        if self.network.idle_timeout.is_zero() {
            return Err(invalid("network.idle_timeout", "must be greater than 0"));
        }
        if self.network.max_message_bytes == 0 {
            return Err(invalid(
                "network.max_message_bytes",
                "must be at least 1, got 0",
            ));
        }
        if self.network.max_buffered_bytes < self.network.max_message_bytes {
            return Err(invalid(
                "network.max_buffered_bytes",
                format!(
                    "must be at least network.max_message_bytes ({}), got {}",
                    self.network.max_message_bytes, self.network.max_buffered_bytes
                ),
            ));
        }
        if self.network.ping_interval.is_zero() {
            return Err(invalid("network.ping_interval", "must be greater than 0"));
        }
        if self.storage.local.cache_size < MIN_CACHE_SIZE {
            return Err(invalid(
                "storage.local.cache_size",
                format!(
                    "must be at least {MIN_CACHE_SIZE} (1 MiB), got {}",
                    self.storage.local.cache_size
                ),
            ));
        }
        if self.network.max_redial_backoff.is_zero() {
            return Err(invalid(
                "network.max_redial_backoff",
                "must be greater than 0",
            ));
        }
        let peer_networks =
            parse_networks("network.allowed_networks", &self.network.allowed_networks)?;
        if self.network.tls.handshake_timeout.is_zero() {
            return Err(invalid(
                "network.tls.handshake_timeout",
                "must be greater than 0",
            ));
        }
        let peer_tls = if self.network.tls.enabled() {
            for (i, peer) in self.network.peers.iter().enumerate() {
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
            Some(PeerTls::load(&self.network.tls)?)
        } else {
            None
        };
        if self.storage.local.path.as_os_str().is_empty() {
            return Err(invalid("storage.local.path", "must not be empty"));
        }
        let redis_url = self.redis_url()?;
        if self.storage.redis.timeout.is_zero() {
            return Err(invalid("storage.redis.timeout", "must be greater than 0"));
        }
        let redis_cluster_nodes = self.redis_cluster_nodes()?;
        if self.storage.redis_cluster.timeout.is_zero() {
            return Err(invalid(
                "storage.redis_cluster.timeout",
                "must be greater than 0",
            ));
        }
        let ip: IpAddr = self.metrics.address.parse().map_err(|_| {
            invalid(
                "metrics.address",
                format!("{:?} is not an IP address", self.metrics.address),
            )
        })?;
        if self.metrics.port == 0 {
            return Err(invalid(
                "metrics.port",
                "must be between 1 and 65535, got 0",
            ));
        }
        if !self.metrics.path.starts_with('/') {
            return Err(invalid(
                "metrics.path",
                format!("{:?} must start with '/'", self.metrics.path),
            ));
        }
        if [HEALTH_PATH, READY_PATH].contains(&self.metrics.path.as_str()) {
            return Err(invalid(
                "metrics.path",
                format!(
                    "{:?} is reserved for the health and readiness checks",
                    self.metrics.path
                ),
            ));
        }
        let allowed_networks =
            parse_networks("metrics.allowed_networks", &self.metrics.allowed_networks)?;
        let web = if self.metrics.web_config_file.as_os_str().is_empty() {
            WebConfig::default()
        } else {
            WebConfig::load(&self.metrics.web_config_file)?
        };
        let native = &self.metrics.native_histograms;
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
        if self.metrics.process_interval.is_zero() {
            return Err(invalid(
                "metrics.process_interval",
                "must be greater than 0",
            ));
        }
        if self.metrics.max_connections == 0 {
            return Err(invalid(
                "metrics.max_connections",
                "must be at least 1, got 0",
            ));
        }
        if self.metrics.exporter == ExporterKind::Dogstatsd {
            check_host_port("metrics.dogstatsd.address", &self.metrics.dogstatsd.address)?;
        }
        check_log_level(&self.log.level)?;
        Ok(Resolved {
            listen,
            peer_networks,
            peer_tls,
            metrics_addr: SocketAddr::new(ip, self.metrics.port),
            allowed_networks,
            web,
            redis_url,
            redis_cluster_nodes,
        })
    }

    /// The Redis URL to connect with: `storage.redis.url`, checked, with the
    /// password from `storage.redis.password_file` when one is named.
    fn redis_url(&self) -> Result<SecretUrl, ConfigError> {
        let redis = &self.storage.redis;
        let checked = self.storage.backend == BackendKind::Redis || !redis.url.is_empty();
        if checked {
            redis::Client::open(redis.url.as_str()).map_err(|e| {
                invalid(
                    "storage.redis.url",
                    // The URL is not echoed: it may hold a password.
                    format!("{:?} is not a valid Redis URL: {e}", redact_url(&redis.url)),
                )
            })?;
        }
        if redis.password_file.as_os_str().is_empty() {
            return Ok(SecretUrl(redis.url.clone()));
        }
        let password = read_password_file("storage.redis.password_file", &redis.password_file)?;
        with_password(
            "storage.redis.url",
            &redis.url,
            "storage.redis.password_file",
            &password,
        )
    }

    /// The Redis Cluster seed nodes to connect with: each URL checked (TCP,
    /// database 0, one password for all, as the cluster client requires),
    /// with the password from `storage.redis_cluster.password_file` applied.
    /// Checked whenever nodes are listed, so a wrong URL is caught before
    /// the backend is switched over.
    fn redis_cluster_nodes(&self) -> Result<Vec<SecretUrl>, ConfigError> {
        let cluster = &self.storage.redis_cluster;
        if cluster.nodes.is_empty() && self.storage.backend == BackendKind::RedisCluster {
            return Err(invalid(
                "storage.redis_cluster.nodes",
                "must list at least one node (redis://host:port) with backend redis_cluster",
            ));
        }
        for (i, node) in cluster.nodes.iter().enumerate() {
            let key = format!("storage.redis_cluster.nodes[{i}]");
            // The URL is not echoed: it may hold a password.
            let shown = redact_url(node);
            let info = redis::IntoConnectionInfo::into_connection_info(node.as_str())
                .map_err(|e| invalid(&key, format!("{shown:?} is not a valid Redis URL: {e}")))?;
            if matches!(info.addr(), redis::ConnectionAddr::Unix(_)) {
                return Err(invalid(
                    &key,
                    format!("{shown:?}: cluster nodes are reached over TCP (redis://host:port), not a Unix socket"),
                ));
            }
            if info.redis_settings().db() != 0 {
                return Err(invalid(
                    &key,
                    format!("{shown:?}: Redis Cluster has only database 0"),
                ));
            }
        }
        let nodes = if cluster.password_file.as_os_str().is_empty() {
            cluster.nodes.iter().cloned().map(SecretUrl).collect()
        } else {
            let file_key = "storage.redis_cluster.password_file";
            let password = read_password_file(file_key, &cluster.password_file)?;
            cluster
                .nodes
                .iter()
                .enumerate()
                .map(|(i, node)| {
                    with_password(
                        &format!("storage.redis_cluster.nodes[{i}]"),
                        node,
                        file_key,
                        &password,
                    )
                })
                .collect::<Result<Vec<_>, _>>()?
        };
        if !nodes.is_empty() {
            // What the client checks across nodes: one password, one user, one TLS mode.
            redis::cluster::ClusterClient::new(nodes.iter().map(SecretUrl::expose)).map_err(
                |e| {
                    invalid(
                        "storage.redis_cluster.nodes",
                        format!("the nodes must share one password, user and TLS mode: {e}"),
                    )
                },
            )?;
        }
        Ok(nodes)
    }

    /// The effective configuration as YAML, as `check-config` prints it,
    /// with any password in the Redis URL redacted.
    pub fn to_yaml(&self) -> String {
        let mut shown = self.clone();
        shown.storage.redis.url = redact_url(&shown.storage.redis.url);
        for node in &mut shown.storage.redis_cluster.nodes {
            *node = redact_url(node);
        }
        serde_yaml::to_string(&shown).unwrap_or_else(|e| format!("# cannot render: {e}\n"))
    }

    /// `node.id`, or the hostname when it is empty.
    pub fn node_id(&self) -> String {
        if !self.node.id.is_empty() {
            return self.node.id.clone();
        }
        std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|s| s.trim().to_string())
            .ok()
            .filter(|s| !s.is_empty())
            .unwrap_or_else(|| "unknown".to_string())
    }
}

/// `url` with its password replaced by `***`, for output: `check-config`,
/// logs and error messages. Covers the password in the authority
/// (`redis://:secret@host`) and in the query of Unix-socket URLs (`pass=`).
/// A string that does not parse as a URL is shown only up to its last `@`.
pub fn redact_url(url: &str) -> String {
    const MASK: &str = "***";
    let Ok(mut parsed) = url::Url::parse(url) else {
        return match url.rfind('@') {
            Some(at) => format!("{MASK}{}", &url[at..]),
            None => url.to_string(),
        };
    };
    let mut changed = false;
    if parsed.password().is_some() {
        changed |= parsed.set_password(Some(MASK)).is_ok();
    }
    if parsed
        .query_pairs()
        .any(|(k, _)| k == "pass" || k == "password")
    {
        let pairs: Vec<(String, String)> = parsed
            .query_pairs()
            .map(|(k, v)| {
                let v = if k == "pass" || k == "password" {
                    MASK.to_string()
                } else {
                    v.into_owned()
                };
                (k.into_owned(), v)
            })
            .collect();
        parsed.query_pairs_mut().clear().extend_pairs(pairs);
        changed = true;
    }
    if changed {
        parsed.to_string()
    } else {
        url.to_string()
    }
}

/// Reads a password file: its whole text less one trailing newline, which
/// is what `echo secret > file` leaves; an empty password is an error.
fn read_password_file(key: &str, path: &Path) -> Result<String, ConfigError> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| invalid(key, format!("cannot read {}: {e}", path.display())))?;
    let password = text.strip_suffix('\n').unwrap_or(&text);
    let password = password.strip_suffix('\r').unwrap_or(password);
    if password.is_empty() {
        return Err(invalid(key, format!("{} is empty", path.display())));
    }
    Ok(password.to_string())
}

/// `url` (the value of `url_key`) with `password` (from the file named by
/// `file_key`) applied, refusing a URL that already holds one.
fn with_password(
    url_key: &str,
    url: &str,
    file_key: &str,
    password: &str,
) -> Result<SecretUrl, ConfigError> {
    let mut parsed = url::Url::parse(url).map_err(|e| {
        invalid(
            url_key,
            format!("cannot apply a password file to this URL: {e}"),
        )
    })?;
    if parsed.password().is_some()
        || parsed
            .query_pairs()
            .any(|(k, _)| k == "pass" || k == "password")
    {
        return Err(invalid(
            file_key,
            format!("{url_key} already holds a password; set one or the other"),
        ));
    }
    if parsed.scheme().starts_with("redis+unix") || parsed.scheme() == "unix" {
        parsed.query_pairs_mut().append_pair("pass", password);
    } else if parsed.set_password(Some(password)).is_err() {
        return Err(invalid(url_key, "this URL cannot carry a password"));
    }
    Ok(SecretUrl(parsed.to_string()))
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
fn check_log_level(value: &str) -> Result<(), ConfigError> {
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

/// The known key closest to an unknown one, if it is close enough to be a
/// typo (`prot` for `port`, `alowed_networks`).
fn did_you_mean(unknown: &str, expected: &[&str]) -> Option<String> {
    expected
        .iter()
        .map(|k| (strsim::jaro_winkler(unknown, k), *k))
        .filter(|(score, _)| *score >= 0.8)
        .max_by(|a, b| a.0.total_cmp(&b.0))
        .map(|(_, k)| k.to_string())
}

/// Reads a configuration file and refuses one that holds no keys: empty or
/// only comments, as a truncated write or an editor gone wrong leaves it.
/// Taken as "all defaults", it would silently empty the allow-lists and the
/// peers, at startup and on reload alike. The built-in defaults are for an
/// agent started without a file.
fn check_holds_keys(path: &Path) -> Result<(), ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|e| {
        invalid(
            "",
            format!("cannot read config file {}: {e}", path.display()),
        )
    })?;
    let empty = match serde_yaml::from_str::<serde_yaml::Value>(&text) {
        Ok(serde_yaml::Value::Null) => true,
        Ok(serde_yaml::Value::Mapping(keys)) => keys.is_empty(),
        // Not a mapping, or not YAML: figment says what is wrong.
        _ => false,
    };
    if empty {
        return Err(invalid(
            "",
            format!(
                "config file {} holds no keys (it is empty or only comments); \
                 to run on the built-in defaults, start the agent without a config file",
                path.display()
            ),
        ));
    }
    Ok(())
}

fn from_figment(err: figment::Error) -> ConfigError {
    use figment::error::Kind;
    let key = err.path.join(".");
    let message = match &err.kind {
        // figment's path already ends with the unknown key.
        Kind::UnknownField(field, expected) => match did_you_mean(field, expected) {
            Some(known) => {
                let mut path = err.path.clone();
                path.pop();
                path.push(known);
                format!(
                    "unknown key; did you mean `{}`?{}",
                    path.join("."),
                    source_suffix(&err)
                )
            }
            None => format!("unknown key{}", source_suffix(&err)),
        },
        kind => format!("{kind}{}", source_suffix(&err)),
    };
    ConfigError { key, message }
}

fn source_suffix(err: &figment::Error) -> String {
    match err.metadata.as_ref() {
        Some(md) => match &md.source {
            Some(src) => format!(" (in {src})"),
            None => format!(" (in {})", md.name),
        },
        None => String::new(),
    }
}

#[cfg(test)]
// figment::Jail's API takes closures returning figment::Error by value.
#[allow(clippy::result_large_err)]
mod tests {
    use super::*;

    /// Loads inside a figment Jail: its lock serialises tests that touch the
    /// process environment, and it scrubs `AGENT_*` variables set by others.
    fn in_jail<T>(f: impl FnOnce(&mut figment::Jail) -> T) -> T {
        let mut out = None;
        figment::Jail::expect_with(|jail| {
            jail.clear_env();
            out = Some(f(jail));
            Ok(())
        });
        out.expect("jail ran")
    }

    fn load_yaml(yaml: &str) -> Result<(Config, Resolved), ConfigError> {
        in_jail(|jail| {
            let path = jail.directory().join("test.yaml");
            std::fs::write(&path, yaml).unwrap();
            Config::load(Some(&path))
        })
    }

    #[test]
    fn defaults_are_valid() {
        // No file (an empty one is an error, see check_holds_keys).
        let (cfg, resolved) = in_jail(|_| Config::load(None)).unwrap();
        assert_eq!(cfg, Config::default());
        assert_eq!(resolved.listen, "0.0.0.0:7070".parse().unwrap());
        assert_eq!(resolved.metrics_addr, "0.0.0.0:8080".parse().unwrap());
    }

    #[test]
    fn repository_agent_yaml_equals_defaults() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("agent.yaml");
        let (cfg, _) = in_jail(|_| Config::load(Some(&path))).unwrap();
        assert_eq!(cfg, Config::default());
    }

    #[test]
    fn env_wins_over_file() {
        in_jail(|jail| -> figment::error::Result<()> {
            jail.create_file(
                "agent.yaml",
                "metrics:\n  port: 9000\nstorage:\n  backend: local\n",
            )?;
            jail.set_env("AGENT_METRICS__PORT", "9100");
            jail.set_env("AGENT_STORAGE__BACKEND", "redis");
            jail.set_env("AGENT_STORAGE__REDIS__TIMEOUT", "500ms");
            let (cfg, _) = Config::load(None).map_err(|e| e.to_string())?;
            assert_eq!(cfg.metrics.port, 9100);
            assert_eq!(cfg.storage.backend, BackendKind::Redis);
            assert_eq!(cfg.storage.redis.timeout, Duration::from_millis(500));
            Ok(())
        })
        .unwrap();
    }

    #[test]
    fn each_bad_value_names_its_key() {
        let cases: &[(&str, &str)] = &[
            ("metrics:\n  port: 70000\n", "metrics.port"),
            ("metrics:\n  port: 0\n", "metrics.port"),
            ("metrics:\n  address: not-an-ip\n", "metrics.address"),
            ("metrics:\n  path: metrics\n", "metrics.path"),
            ("metrics:\n  path: /health\n", "metrics.path"),
            ("metrics:\n  path: /ready\n", "metrics.path"),
            (
                "metrics:\n  allowed_networks: [\"10.0.0.0/33\"]\n",
                "metrics.allowed_networks[0]",
            ),
            ("storage:\n  backend: postgres\n", "storage.backend"),
            (
                "storage:\n  redis:\n    url: \"http://x\"\n",
                "storage.redis.url",
            ),
            (
                "storage:\n  redis:\n    timeout: soon\n",
                "storage.redis.timeout",
            ),
            ("network:\n  listen: \"nowhere\"\n", "network.listen"),
            (
                "network:\n  max_connections: 0\n",
                "network.max_connections",
            ),
            (
                "network:\n  max_message_bytes: 0\n",
                "network.max_message_bytes",
            ),
            ("network:\n  idle_timeout: 0s\n", "network.idle_timeout"),
            (
                "network:\n  max_buffered_bytes: 1048575\n",
                "network.max_buffered_bytes",
            ),
            (
                "storage:\n  local:\n    cache_size: 1000\n",
                "storage.local.cache_size",
            ),
            (
                "storage:\n  local:\n    cache_size: -1\n",
                "storage.local.cache_size",
            ),
            ("network:\n  idle_timeout: soon\n", "network.idle_timeout"),
            ("network:\n  peers: [\"nohost\"]\n", "network.peers[0]"),
            ("metrics:\n  prot: 8080\n", "metrics.prot"),
            ("bogus: 1\n", "bogus"),
            ("log:\n  format: xml\n", "log.format"),
            ("log:\n  level: verbose\n", "log.level"),
            ("log:\n  level: agent=loud\n", "log.level"),
        ];
        for (yaml, key) in cases {
            let err = load_yaml(yaml).expect_err(yaml);
            assert_eq!(&err.key, key, "{yaml} gave {err}");
            assert!(!err.to_string().contains('\n'), "one line: {err}");
        }
    }

    #[test]
    fn log_levels_and_filters_are_accepted() {
        for ok in [
            "info",
            "DEBUG",
            "agent=debug,info",
            "warn,agent::server=trace",
            "off",
        ] {
            assert_eq!(check_log_level(ok), Ok(()), "{ok}");
        }
    }

    #[test]
    fn unknown_keys_get_a_hint_when_close_to_a_known_one() {
        let err = load_yaml("metrics:\n  prot: 8080\n").unwrap_err();
        assert!(
            err.message.contains("did you mean `metrics.port`?"),
            "{err}"
        );
        let err = load_yaml("network:\n  alowed_networks: []\n").unwrap_err();
        assert!(err.message.contains("`network.allowed_networks`"), "{err}");
        let err = load_yaml("bogus: 1\n").unwrap_err();
        assert!(!err.message.contains("did you mean"), "{err}");
    }

    #[test]
    fn redacts_passwords_in_urls() {
        for (url, shown) in [
            ("redis://:secret@host:6379/0", "redis://:***@host:6379/0"),
            (
                "redis://user:secret@host:6379/0",
                "redis://user:***@host:6379/0",
            ),
            ("rediss://:p%40ss@host/1", "rediss://:***@host/1"),
            ("redis://127.0.0.1:6379/0", "redis://127.0.0.1:6379/0"),
            ("redis://user@host:6379", "redis://user@host:6379"),
            (
                "redis+unix:///run/redis.sock?db=1&pass=secret",
                "redis+unix:///run/redis.sock?db=1&pass=***",
            ),
            ("not a url :secret@host", "***@host"),
        ] {
            assert_eq!(redact_url(url), shown, "{url}");
        }
    }

    #[test]
    fn password_file_is_applied_and_never_shown() {
        in_jail(|jail| {
            std::fs::write(jail.directory().join("pw"), "s3cr3t\n").unwrap();
            let yaml = "storage:\n  backend: redis\n  redis:\n    url: redis://host:6379/0\n    password_file: pw\n";
            std::fs::write(jail.directory().join("a.yaml"), yaml).unwrap();
            let (cfg, resolved) = Config::load(Some(Path::new("a.yaml"))).unwrap();
            assert_eq!(resolved.redis_url.expose(), "redis://:s3cr3t@host:6379/0");
            assert!(!format!("{resolved:?}").contains("s3cr3t"));
            assert!(!cfg.to_yaml().contains("s3cr3t"));

            let both =
                "storage:\n  redis:\n    url: redis://:x@host:6379/0\n    password_file: pw\n";
            std::fs::write(jail.directory().join("b.yaml"), both).unwrap();
            let err = Config::load(Some(Path::new("b.yaml"))).unwrap_err();
            assert_eq!(err.key, "storage.redis.password_file", "{err}");

            std::fs::write(
                jail.directory().join("c.yaml"),
                "storage:\n  redis:\n    password_file: missing\n",
            )
            .unwrap();
            let err = Config::load(Some(Path::new("c.yaml"))).unwrap_err();
            assert_eq!(err.key, "storage.redis.password_file", "{err}");
        });
    }

    #[test]
    fn missing_named_file_is_an_error() {
        let err = Config::load(Some(Path::new("/nonexistent/agent.yaml"))).unwrap_err();
        assert!(err.to_string().contains("/nonexistent/agent.yaml"), "{err}");
    }
}
