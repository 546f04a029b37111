//! Reloading the configuration on SIGHUP.
//!
//! The file (and the `AGENT_*` environment, as at startup) is loaded and
//! validated again. An invalid configuration is logged and the running one
//! kept: a typo must not take a serving agent down. Of a valid one, what can
//! change safely while serving is applied at once:
//!
//! - `log.level`;
//! - `network.peers`: new peers are dialled, removed ones dropped;
//! - `metrics.allowed_networks`.
//!
//! Any other changed key is logged as needing a restart and left as it is,
//! so the running configuration stays what the agent really does (and the
//! next reload names it again).

use std::collections::BTreeMap;
use std::path::PathBuf;

use tokio::sync::mpsc;

use crate::config::{Config, ConfigError};

/// Sets the log filter at runtime; Err says why it cannot.
pub type SetLogLevel = Box<dyn Fn(&str) -> Result<(), String> + Send + Sync>;

/// What `app::run` needs to reload on request.
pub struct Reload {
    /// The file the agent was started with (None: `./agent.yaml` when present).
    pub config_file: Option<PathBuf>,
    /// One message per SIGHUP.
    pub requests: mpsc::Receiver<()>,
    /// Applies a new `log.level`.
    pub set_log_level: SetLogLevel,
}

impl Reload {
    /// Loads the configuration again, as at startup.
    pub fn load(&self) -> Result<Config, ConfigError> {
        Config::load(self.config_file.as_deref()).map(|(config, _)| config)
    }
}

/// The keys applied without a restart. A key is named by its dotted path;
/// lists count as one key.
pub const LIVE_KEYS: [&str; 3] = ["log.level", "network.peers", "metrics.allowed_networks"];

/// The dotted keys whose values differ between `old` and `new`, sorted.
pub fn changed_keys(old: &Config, new: &Config) -> Vec<String> {
    let (mut a, mut b) = (BTreeMap::new(), BTreeMap::new());
    flatten("", &serde_json::to_value(old).unwrap_or_default(), &mut a);
    flatten("", &serde_json::to_value(new).unwrap_or_default(), &mut b);
    let mut keys: Vec<String> = a
        .keys()
        .chain(b.keys())
        .filter(|k| a.get(*k) != b.get(*k))
        .cloned()
        .collect();
    keys.sort();
    keys.dedup();
    keys
}

fn flatten(prefix: &str, value: &serde_json::Value, out: &mut BTreeMap<String, serde_json::Value>) {
    match value {
        serde_json::Value::Object(map) => {
            for (k, v) in map {
                let key = if prefix.is_empty() {
                    k.clone()
                } else {
                    format!("{prefix}.{k}")
                };
                flatten(&key, v, out);
            }
        }
        leaf => {
            out.insert(prefix.to_string(), leaf.clone());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn changed_keys_names_each_changed_leaf_and_lists_as_one_key() {
        let old = Config::default();
        let mut new = old.clone();
        assert!(changed_keys(&old, &new).is_empty());
        new.log.level = "debug".into();
        new.network.peers = vec!["a:1".into()];
        new.metrics.port = 9100;
        new.storage.redis.timeout = std::time::Duration::from_secs(5);
        assert_eq!(
            changed_keys(&old, &new),
            [
                "log.level",
                "metrics.port",
                "network.peers",
                "storage.redis.timeout"
            ]
        );
    }
}
