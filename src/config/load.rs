//! Loading: the built-in defaults, then the YAML file, then the `AGENT_*`
//! environment, merged by figment, then validated. A mistake figment or
//! serde finds (an unknown key, an ill-typed value) is turned into the
//! same [`ConfigError`] as one validation finds, naming the key, with a
//! hint when an unknown key looks like a typo of a known one.

use std::path::Path;

use figment::providers::{Env, Format, Serialized, Yaml};
use figment::Figment;

use super::{invalid, Config, ConfigError, Resolved, DEFAULT_CONFIG_FILE, ENV_PREFIX};

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
