//! The configuration's shape: one struct per section, its keys as fields
//! with their documentation, and the built-in defaults. Nothing here reads
//! a file or checks a value: serde's derives, together with
//! `deny_unknown_fields`, already refuse unknown keys and ill-typed values
//! while loading ([`super::load`]); what types cannot express is checked in
//! [`super::validate`].

use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::remote_write::RemoteWriteConfig;

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
pub(super) const MIN_CACHE_SIZE: usize = 1024 * 1024;

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
    /// `metrics.listen`: false opens no metrics port (no scrape, no
    /// `/health` or `/ready`), for an agent that only pushes with
    /// `remote_write`.
    pub listen: bool,
    /// `metrics.remote_write`: pushes every series to a Prometheus
    /// remote-write receiver; off while its `url` is empty.
    pub remote_write: RemoteWriteConfig,
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
            listen: true,
            remote_write: RemoteWriteConfig::default(),
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

impl Config {
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
