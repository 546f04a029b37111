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
//!
//! The jobs live in their own files: the shape and the defaults
//! (`schema.rs`, where each section's struct is, `MetricsConfig` among
//! them), loading (`load.rs`), validation (`validate.rs`, entry point
//! [`Config::validate`], one function per section), and the secrets
//! (`secrets.rs`: password files, [`SecretUrl`], redaction). The files
//! the configuration names are loaded beside them: `tls.rs`, `web.rs`.
//!
//! Ground floor: nothing here imports the rest of the agent, which reads
//! its settings from [`Config`] and [`Resolved`].

mod load;
pub mod remote_write;
mod schema;
mod secrets;
mod tls;
mod validate;
pub mod web;

pub use remote_write::{RemoteWrite, RemoteWriteConfig};
pub use schema::*;
pub use secrets::{redact_url, SecretUrl};
pub use tls::PeerTls;
pub use validate::Resolved;
pub use web::{WebConfig, WebTls};

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

#[cfg(test)]
// figment::Jail's API takes closures returning figment::Error by value.
#[allow(clippy::result_large_err)]
mod tests {
    use super::*;
    use std::path::Path;
    use std::time::Duration;

    use super::validate::check_log_level;

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
