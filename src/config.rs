//! Configuration: built-in defaults, then the YAML file, then `AGENT_*`
//! environment variables (later sources win).
//!
//! Loading is split in two steps so that every mistake is reported the same
//! way: figment/serde catch unknown keys and ill-typed values, then
//! [`Config::validate`] checks what types cannot (ranges, address syntax, URLs).
//! Either way the operator gets one [`ConfigError`] naming the key.

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use figment::providers::{Env, Format, Serialized, Yaml};
use figment::Figment;
use ipnet::IpNet;
use serde::{Deserialize, Serialize};

/// Prefix of environment overrides; `__` separates key path segments.
pub const ENV_PREFIX: &str = "AGENT_";
/// File used when `--config` is not given, if it exists.
pub const DEFAULT_CONFIG_FILE: &str = "agent.yaml";

/// A configuration mistake, reported to the operator as one line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    /// Dotted key path (`metrics.port`), or empty when the file itself is at fault.
    pub key: String,
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

fn invalid(key: &str, message: impl Into<String>) -> ConfigError {
    ConfigError {
        key: key.to_string(),
        message: message.into(),
    }
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub node: NodeConfig,
    pub network: NetworkConfig,
    pub storage: StorageConfig,
    pub metrics: MetricsConfig,
    pub log: LogConfig,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct NodeConfig {
    /// Empty means the hostname.
    pub id: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct NetworkConfig {
    pub listen: String,
    pub peers: Vec<String>,
    pub max_connections: usize,
    /// An inbound connection with no complete request for this long is
    /// closed, so silent connections cannot hold every slot.
    #[serde(with = "humantime_serde")]
    pub idle_timeout: Duration,
    pub max_message_bytes: usize,
    /// Bytes all inbound connections together may buffer beyond their fixed
    /// 64 KiB buffers: long request lines, and replies waiting for peers
    /// that do not read them. At the limit, connections wait.
    pub max_buffered_bytes: usize,
    #[serde(with = "humantime_serde")]
    pub ping_interval: Duration,
    #[serde(with = "humantime_serde")]
    pub max_redial_backoff: Duration,
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
        }
    }
}

#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum BackendKind {
    #[default]
    Local,
    Redis,
}

impl BackendKind {
    /// The value of the `backend` metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            BackendKind::Local => "local",
            BackendKind::Redis => "redis",
        }
    }
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct StorageConfig {
    pub backend: BackendKind,
    pub local: LocalConfig,
    pub redis: RedisConfig,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct LocalConfig {
    pub path: PathBuf,
}

impl Default for LocalConfig {
    fn default() -> Self {
        Self {
            path: PathBuf::from("./data/agent.db"),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct RedisConfig {
    pub url: String,
    pub key_prefix: String,
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
}

impl Default for RedisConfig {
    fn default() -> Self {
        Self {
            url: "redis://127.0.0.1:6379/0".into(),
            key_prefix: "agent:".into(),
            timeout: Duration::from_secs(2),
        }
    }
}

#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum ExporterKind {
    #[default]
    Prometheus,
    Dogstatsd,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct MetricsConfig {
    pub enabled: bool,
    pub exporter: ExporterKind,
    pub address: String,
    pub port: u16,
    pub path: String,
    /// CIDRs (or bare IPs) allowed to scrape; empty allows everyone.
    pub allowed_networks: Vec<String>,
    #[serde(with = "humantime_serde")]
    pub process_interval: Duration,
    /// Concurrent connections to the metrics endpoint; more are closed at once.
    pub max_connections: usize,
    pub dogstatsd: DogstatsdConfig,
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
            dogstatsd: DogstatsdConfig::default(),
        }
    }
}

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

#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    pub level: String,
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
    pub listen: SocketAddr,
    pub metrics_addr: SocketAddr,
    pub allowed_networks: Vec<IpNet>,
}

impl Config {
    /// Loads defaults, then `file` (or `./agent.yaml` when present), then the
    /// `AGENT_*` environment, and validates the result.
    pub fn load(file: Option<&Path>) -> Result<(Config, Resolved), ConfigError> {
        let mut figment = Figment::from(Serialized::defaults(Config::default()));
        match file {
            Some(path) => {
                // figment silently skips a missing file; an operator who named
                // one must hear about it.
                std::fs::read_to_string(path).map_err(|e| {
                    invalid(
                        "",
                        format!("cannot read config file {}: {e}", path.display()),
                    )
                })?;
                figment = figment.merge(Yaml::file_exact(path));
            }
            None => {
                if Path::new(DEFAULT_CONFIG_FILE).exists() {
                    figment = figment.merge(Yaml::file_exact(DEFAULT_CONFIG_FILE));
                }
            }
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
        if self.network.max_redial_backoff.is_zero() {
            return Err(invalid(
                "network.max_redial_backoff",
                "must be greater than 0",
            ));
        }
        if self.storage.local.path.as_os_str().is_empty() {
            return Err(invalid("storage.local.path", "must not be empty"));
        }
        if self.storage.backend == BackendKind::Redis || !self.storage.redis.url.is_empty() {
            redis::Client::open(self.storage.redis.url.as_str()).map_err(|e| {
                invalid(
                    "storage.redis.url",
                    format!("{:?} is not a valid Redis URL: {e}", self.storage.redis.url),
                )
            })?;
        }
        if self.storage.redis.timeout.is_zero() {
            return Err(invalid("storage.redis.timeout", "must be greater than 0"));
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
        if self.metrics.path == crate::telemetry::http::HEALTH_PATH {
            return Err(invalid(
                "metrics.path",
                format!("{:?} is reserved for the health check", self.metrics.path),
            ));
        }
        let mut allowed_networks = Vec::new();
        for (i, net) in self.metrics.allowed_networks.iter().enumerate() {
            let parsed = net
                .parse::<IpNet>()
                .or_else(|_| net.parse::<IpAddr>().map(IpNet::from))
                .map_err(|_| {
                    invalid(
                        &format!("metrics.allowed_networks[{i}]"),
                        format!("{net:?} is not a CIDR network or IP address"),
                    )
                })?;
            allowed_networks.push(parsed);
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
        tracing_subscriber::EnvFilter::try_new(&self.log.level).map_err(|e| {
            invalid(
                "log.level",
                format!("{:?} is not a valid level or filter: {e}", self.log.level),
            )
        })?;
        Ok(Resolved {
            listen,
            metrics_addr: SocketAddr::new(ip, self.metrics.port),
            allowed_networks,
        })
    }

    /// The effective configuration as YAML, as `check-config` prints it.
    pub fn to_yaml(&self) -> String {
        serde_yaml::to_string(self).unwrap_or_else(|e| format!("# cannot render: {e}\n"))
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

fn from_figment(err: figment::Error) -> ConfigError {
    use figment::error::Kind;
    let key = err.path.join(".");
    let message = match &err.kind {
        // figment's path already ends with the unknown key.
        Kind::UnknownField(..) => format!("unknown key{}", source_suffix(&err)),
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
        let (cfg, resolved) = load_yaml("").unwrap();
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
            ("network:\n  idle_timeout: soon\n", "network.idle_timeout"),
            ("network:\n  peers: [\"nohost\"]\n", "network.peers[0]"),
            ("metrics:\n  prot: 8080\n", "metrics.prot"),
            ("bogus: 1\n", "bogus"),
            ("log:\n  format: xml\n", "log.format"),
        ];
        for (yaml, key) in cases {
            let err = load_yaml(yaml).expect_err(yaml);
            assert_eq!(&err.key, key, "{yaml} gave {err}");
            assert!(!err.to_string().contains('\n'), "one line: {err}");
        }
    }

    #[test]
    fn missing_named_file_is_an_error() {
        let err = Config::load(Some(Path::new("/nonexistent/agent.yaml"))).unwrap_err();
        assert!(err.to_string().contains("/nonexistent/agent.yaml"), "{err}");
    }
}
