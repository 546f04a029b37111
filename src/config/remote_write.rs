//! `metrics.remote_write`: where the agent pushes its metrics with
//! Prometheus remote write 1.0, for agents no Prometheus can scrape.
//!
//! Everything is checked and loaded here, at load time: the URL, the
//! credentials (read from their files, never from the configuration
//! itself, so `check-config` and logs have nothing to hide but the URL's
//! own password, which is refused) and the TLS material. The sender in
//! `telemetry::remote_write` gets a [`RemoteWrite`] it cannot misread.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio_rustls::rustls::{ClientConfig, RootCertStore};

use super::secrets::read_password_file;
use super::tls::{load_pair, load_roots, provider};
use super::{invalid, redact_url, ConfigError, ExporterKind};

/// The `job` label a pushed series gets unless `external_labels` names
/// one: the job name docs/monitoring.md gives the scrape, so the same
/// queries and alerts find pushed and scraped agents alike.
pub const DEFAULT_JOB: &str = "agent";

/// Shortest `interval` accepted: below it a snapshot (every series, read
/// and copied) would be taken faster than a receiver can usefully store.
pub const MIN_INTERVAL: Duration = Duration::from_millis(100);

/// `metrics.remote_write`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct RemoteWriteConfig {
    /// `metrics.remote_write.url`: the receiver's write endpoint
    /// (`http://` or `https://`, e.g. `…/api/v1/write`); empty: off.
    pub url: String,
    /// `metrics.remote_write.interval`: how often every series is read
    /// and queued; the timestamps the samples carry are these moments.
    #[serde(with = "humantime_serde")]
    pub interval: Duration,
    /// `metrics.remote_write.timeout`: one request, from connecting to the
    /// last byte of the answer; past it the request is retried.
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
    /// `metrics.remote_write.external_labels`: added to every pushed series
    /// that does not carry the label itself. `instance` defaults to the
    /// node id and `job` to [`DEFAULT_JOB`]; an empty value removes one.
    pub external_labels: BTreeMap<String, String>,
    /// `metrics.remote_write.basic_auth`.
    pub basic_auth: BasicAuthConfig,
    /// `metrics.remote_write.bearer_token_file`: a file holding the token
    /// sent as `Authorization: Bearer`; exclusive with `basic_auth`.
    pub bearer_token_file: PathBuf,
    /// `metrics.remote_write.tls`: for an `https://` URL.
    pub tls: RemoteTlsConfig,
    /// `metrics.remote_write.max_pending`: samples held while the receiver
    /// is away; beyond it the oldest are dropped (and counted).
    pub max_pending: usize,
}

impl Default for RemoteWriteConfig {
    fn default() -> Self {
        Self {
            url: String::new(),
            interval: Duration::from_secs(15),
            timeout: Duration::from_secs(10),
            external_labels: BTreeMap::new(),
            basic_auth: BasicAuthConfig::default(),
            bearer_token_file: PathBuf::new(),
            tls: RemoteTlsConfig::default(),
            max_pending: 500_000,
        }
    }
}

/// `metrics.remote_write.basic_auth`: both keys or neither.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct BasicAuthConfig {
    /// `metrics.remote_write.basic_auth.username`.
    pub username: String,
    /// `metrics.remote_write.basic_auth.password_file`: the password is
    /// read from this file at load, so it never sits in the configuration.
    pub password_file: PathBuf,
}

/// `metrics.remote_write.tls`: the CA that signs the receiver's
/// certificate (default: the system's trust store) and, for a receiver
/// that asks for one, the agent's client certificate.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct RemoteTlsConfig {
    /// `metrics.remote_write.tls.ca_file`.
    pub ca_file: PathBuf,
    /// `metrics.remote_write.tls.cert_file`: with `key_file`.
    pub cert_file: PathBuf,
    /// `metrics.remote_write.tls.key_file`: with `cert_file`.
    pub key_file: PathBuf,
}

/// `metrics.remote_write`, checked and loaded: what the sender runs with.
#[derive(Clone)]
pub struct RemoteWrite {
    /// The write endpoint, `http` or `https`, without credentials.
    pub url: url::Url,
    /// How often every series is queued.
    pub interval: Duration,
    /// One request's deadline.
    pub timeout: Duration,
    /// The external labels, sorted by name, empty values removed.
    pub external_labels: Vec<(String, String)>,
    /// The `Authorization` header value, when one is configured.
    pub authorization: Option<Secret>,
    /// For `https` URLs.
    pub tls: Option<Arc<ClientConfig>>,
    /// Samples held at most.
    pub max_pending: usize,
}

impl std::fmt::Debug for RemoteWrite {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RemoteWrite")
            .field("url", &self.url.as_str())
            .field("interval", &self.interval)
            .field("timeout", &self.timeout)
            .field("external_labels", &self.external_labels)
            .field("authorization", &self.authorization)
            .field("tls", &self.tls.is_some())
            .field("max_pending", &self.max_pending)
            .finish()
    }
}

/// A credential: `Debug` shows `***`, so no stray `{:?}` can print it;
/// [`Secret::expose`] is the one way to the text, for the request header.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    /// The credential itself, for the header only.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("***")
    }
}

/// What the rest of the metrics configuration says about remote write.
pub(super) struct Context<'a> {
    /// `metrics.enabled`.
    pub(super) enabled: bool,
    /// `metrics.exporter`.
    pub(super) exporter: ExporterKind,
    /// `metrics.listen`.
    pub(super) listen: bool,
    /// The node id, the default `instance`.
    pub(super) node_id: &'a str,
}

impl RemoteWriteConfig {
    /// Checks and loads the section; None when `url` is empty.
    pub(super) fn resolve(&self, ctx: Context<'_>) -> Result<Option<RemoteWrite>, ConfigError> {
        if self.url.is_empty() {
            if !ctx.listen && ctx.enabled && ctx.exporter == ExporterKind::Prometheus {
                return Err(invalid(
                    "metrics.listen",
                    "false opens no metrics port, so metrics.remote_write.url must be set for \
                     anything to read the metrics (set metrics.enabled: false to turn them off)",
                ));
            }
            return Ok(None);
        }
        const URL: &str = "metrics.remote_write.url";
        if !ctx.enabled {
            // Turning metrics off must be one switch: remote write goes
            // with them (startup logs that it is ignored).
            return Ok(None);
        }
        if ctx.exporter != ExporterKind::Prometheus {
            return Err(invalid(
                URL,
                "needs metrics.exporter: prometheus (remote write reads the agent's own recorder)",
            ));
        }
        let url = url::Url::parse(&self.url).map_err(|e| {
            invalid(
                URL,
                format!("{:?} is not a URL: {e}", redact_url(&self.url)),
            )
        })?;
        if !matches!(url.scheme(), "http" | "https") || url.host_str().is_none() {
            return Err(invalid(
                URL,
                format!(
                    "{:?} must be an http:// or https:// URL with a host",
                    redact_url(&self.url)
                ),
            ));
        }
        if !url.username().is_empty() || url.password().is_some() {
            return Err(invalid(
                URL,
                "must not hold credentials: use metrics.remote_write.basic_auth or \
                 bearer_token_file, which read them from a file",
            ));
        }
        if self.interval < MIN_INTERVAL {
            return Err(invalid(
                "metrics.remote_write.interval",
                format!("{:?} is below the minimum of 100ms", self.interval),
            ));
        }
        if self.timeout.is_zero() {
            return Err(invalid(
                "metrics.remote_write.timeout",
                "must be greater than 0",
            ));
        }
        if self.max_pending == 0 {
            return Err(invalid(
                "metrics.remote_write.max_pending",
                "must be at least 1 (the default is 500000)",
            ));
        }
        let external_labels = self.external_labels(ctx.node_id)?;
        let authorization = self.authorization()?;
        let tls = self.tls(&url)?;
        Ok(Some(RemoteWrite {
            url,
            interval: self.interval,
            timeout: self.timeout,
            external_labels,
            authorization,
            tls,
            max_pending: self.max_pending,
        }))
    }

    fn external_labels(&self, node_id: &str) -> Result<Vec<(String, String)>, ConfigError> {
        let mut labels = BTreeMap::from([
            ("instance".to_string(), node_id.to_string()),
            ("job".to_string(), DEFAULT_JOB.to_string()),
        ]);
        for (name, value) in &self.external_labels {
            let valid = name
                .chars()
                .enumerate()
                .all(|(i, c)| c == '_' || c.is_ascii_alphabetic() || (i > 0 && c.is_ascii_digit()));
            if name.is_empty() || !valid || name.starts_with("__") {
                return Err(invalid(
                    &format!("metrics.remote_write.external_labels.{name}"),
                    "a label name is [a-zA-Z_][a-zA-Z0-9_]* and does not start with \"__\"",
                ));
            }
            labels.insert(name.clone(), value.clone());
        }
        Ok(labels.into_iter().filter(|(_, v)| !v.is_empty()).collect())
    }

    fn authorization(&self) -> Result<Option<Secret>, ConfigError> {
        use base64::Engine;
        let basic = &self.basic_auth;
        let has_basic = !basic.username.is_empty() || !basic.password_file.as_os_str().is_empty();
        let has_bearer = !self.bearer_token_file.as_os_str().is_empty();
        if has_basic && has_bearer {
            return Err(invalid(
                "metrics.remote_write.bearer_token_file",
                "cannot be combined with metrics.remote_write.basic_auth: choose one",
            ));
        }
        if has_bearer {
            let token = read_password_file(
                "metrics.remote_write.bearer_token_file",
                &self.bearer_token_file,
            )?;
            return Ok(Some(Secret(format!("Bearer {token}"))));
        }
        if !has_basic {
            return Ok(None);
        }
        if basic.username.is_empty() {
            return Err(invalid(
                "metrics.remote_write.basic_auth.username",
                "must be set with basic_auth.password_file",
            ));
        }
        if basic.username.contains(':') {
            return Err(invalid(
                "metrics.remote_write.basic_auth.username",
                "must not contain ':' (basic auth separates the password with it)",
            ));
        }
        if basic.password_file.as_os_str().is_empty() {
            return Err(invalid(
                "metrics.remote_write.basic_auth.password_file",
                "must be set with basic_auth.username",
            ));
        }
        let password = read_password_file(
            "metrics.remote_write.basic_auth.password_file",
            &basic.password_file,
        )?;
        let encoded = base64::engine::general_purpose::STANDARD
            .encode(format!("{}:{password}", basic.username));
        Ok(Some(Secret(format!("Basic {encoded}"))))
    }

    fn tls(&self, url: &url::Url) -> Result<Option<Arc<ClientConfig>>, ConfigError> {
        let t = &self.tls;
        let set = |p: &PathBuf| !p.as_os_str().is_empty();
        if url.scheme() == "http" {
            if set(&t.ca_file) || set(&t.cert_file) || set(&t.key_file) {
                return Err(invalid(
                    "metrics.remote_write.tls",
                    "is set but metrics.remote_write.url is http://: use https://",
                ));
            }
            return Ok(None);
        }
        if set(&t.cert_file) != set(&t.key_file) {
            let missing = if set(&t.cert_file) {
                "metrics.remote_write.tls.key_file"
            } else {
                "metrics.remote_write.tls.cert_file"
            };
            return Err(invalid(
                missing,
                "must be set: tls.cert_file and tls.key_file go together",
            ));
        }
        let roots = if set(&t.ca_file) {
            load_roots("metrics.remote_write.tls.ca_file", &t.ca_file)?
        } else {
            system_roots()?
        };
        let provider = provider();
        let builder = ClientConfig::builder_with_provider(Arc::clone(&provider))
            .with_safe_default_protocol_versions()
            .map_err(|e| invalid("metrics.remote_write.tls", e.to_string()))?
            .with_root_certificates(roots);
        let mut config = if set(&t.cert_file) {
            let (chain, key) = load_pair(
                "metrics.remote_write.tls.cert_file",
                &t.cert_file,
                "metrics.remote_write.tls.key_file",
                &t.key_file,
                &provider,
            )?;
            builder
                .with_client_auth_cert(chain, key)
                .map_err(|e| invalid("metrics.remote_write.tls.key_file", e.to_string()))?
        } else {
            builder.with_no_client_auth()
        };
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(Some(Arc::new(config)))
    }
}

/// The system's trust store, for an `https://` receiver without `ca_file`.
fn system_roots() -> Result<RootCertStore, ConfigError> {
    let found = rustls_native_certs::load_native_certs();
    let mut roots = RootCertStore::empty();
    let (added, _) = roots.add_parsable_certificates(found.certs);
    if added == 0 {
        return Err(invalid(
            "metrics.remote_write.tls.ca_file",
            "must be set: the system trust store holds no usable certificate",
        ));
    }
    Ok(roots)
}
