//! The configuration's secrets: the Redis passwords, read from their files
//! and applied to the URLs, and kept out of every output. A URL that may
//! hold a password travels as a [`SecretUrl`], whose `Debug` and `Display`
//! redact it; `check-config` and error messages show URLs through
//! [`redact_url`]. Kept apart from validation so that everything that
//! touches a password can be read, and audited, in one file.

use std::path::Path;

use super::{invalid, BackendKind, Config, ConfigError};

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
    /// The Redis URL to connect with: `storage.redis.url`, checked, with the
    /// password from `storage.redis.password_file` when one is named.
    pub(super) fn redis_url(&self) -> Result<SecretUrl, ConfigError> {
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
    pub(super) fn redis_cluster_nodes(&self) -> Result<Vec<SecretUrl>, ConfigError> {
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
        shown.metrics.remote_write.url = redact_url(&shown.metrics.remote_write.url);
        serde_yaml::to_string(&shown).unwrap_or_else(|e| format!("# cannot render: {e}\n"))
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
pub(super) fn read_password_file(key: &str, path: &Path) -> Result<String, ConfigError> {
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
