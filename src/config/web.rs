//! `metrics.web_config_file`: the exporter-toolkit web configuration that
//! node_exporter takes with `--web.config.file`, so operators can reuse
//! theirs. Supported:
//!
//! - `tls_server_config`: `cert_file`, `key_file`, `client_auth_type`
//!   (`NoClientCert`, `VerifyClientCertIfGiven`, `RequireAndVerifyClientCert`),
//!   `client_ca_file`, `min_version` and `max_version` (`TLS12`, `TLS13`);
//! - `basic_auth_users`: user name to bcrypt hash.
//!
//! Relative paths are relative to the web config file, as in the toolkit.
//! The toolkit's other fields are refused by name rather than ignored: a
//! setting the operator wrote but the agent does not apply would be a
//! silent security gap.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::Deserialize;
use tokio_rustls::rustls::server::WebPkiClientVerifier;
use tokio_rustls::rustls::ServerConfig;

use super::tls::{load_pair, load_roots, provider, versions};
use super::{invalid, ConfigError};

/// The metrics endpoint's TLS and authentication, loaded and checked.
/// The default is plain HTTP without authentication.
#[derive(Clone, Default)]
pub struct WebConfig {
    /// Serve HTTPS with this configuration; None serves plain HTTP.
    pub tls: Option<WebTls>,
    /// User name to bcrypt hash; empty means no authentication.
    pub users: BTreeMap<String, String>,
}

/// The endpoint's rustls configuration.
#[derive(Debug, Clone)]
pub struct WebTls {
    /// Certificate, key, client-certificate policy and protocol versions.
    pub server: Arc<ServerConfig>,
}

impl std::fmt::Debug for WebConfig {
    // The hashes are left out: they are not needed to debug, and a bcrypt
    // hash is still something to keep off logs.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WebConfig")
            .field("tls", &self.tls.is_some())
            .field("users", &self.users.keys().collect::<Vec<_>>())
            .finish()
    }
}

/// The file, as the toolkit spells it.
#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct File {
    #[serde(default)]
    tls_server_config: Option<TlsFile>,
    #[serde(default)]
    basic_auth_users: BTreeMap<String, String>,
    /// Toolkit field the agent does not implement (HTTP/2, headers).
    #[serde(default)]
    http_server_config: Option<serde_yaml::Value>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct TlsFile {
    #[serde(default)]
    cert_file: PathBuf,
    #[serde(default)]
    key_file: PathBuf,
    #[serde(default)]
    client_auth_type: String,
    #[serde(default)]
    client_ca_file: PathBuf,
    #[serde(default)]
    min_version: String,
    #[serde(default)]
    max_version: String,
    // Toolkit fields the agent does not implement; named so the error can
    // say so rather than "unknown field".
    #[serde(default)]
    cert: Option<serde_yaml::Value>,
    #[serde(default)]
    key: Option<serde_yaml::Value>,
    #[serde(default)]
    client_allowed_sans: Option<serde_yaml::Value>,
    #[serde(default)]
    cipher_suites: Option<serde_yaml::Value>,
    #[serde(default)]
    curve_preferences: Option<serde_yaml::Value>,
    #[serde(default)]
    prefer_server_cipher_suites: Option<serde_yaml::Value>,
}

/// What a client must present, in the toolkit's words.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ClientAuth {
    NoClientCert,
    VerifyClientCertIfGiven,
    RequireAndVerifyClientCert,
}

impl WebConfig {
    /// Reads and checks the file. Errors name `metrics.web_config_file` and
    /// the field at fault.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        const KEY: &str = "metrics.web_config_file";
        let text = std::fs::read_to_string(path)
            .map_err(|e| invalid(KEY, format!("cannot read {}: {e}", path.display())))?;
        let file: File = if text.trim().is_empty() {
            File::default()
        } else {
            serde_yaml::from_str(&text).map_err(|e| {
                // serde_yaml's message can span lines (it quotes the input).
                let msg = e.to_string().replace('\n', " ");
                invalid(KEY, format!("{}: {msg}", path.display()))
            })?
        };
        let field =
            |name: &str, msg: String| invalid(KEY, format!("{}: {name}: {msg}", path.display()));
        if file.http_server_config.is_some() {
            return Err(field(
                "http_server_config",
                "is not supported by the agent".into(),
            ));
        }
        let dir = path.parent().unwrap_or(Path::new("."));
        let tls = match file.tls_server_config {
            Some(t) => t.build(dir, &field)?,
            None => None,
        };
        for (user, hash) in &file.basic_auth_users {
            if hash.parse::<bcrypt::HashParts>().is_err() {
                return Err(field(
                    &format!("basic_auth_users.{user}"),
                    "is not a bcrypt hash (make one with `agent hash-password`)".into(),
                ));
            }
        }
        Ok(Self {
            tls,
            users: file.basic_auth_users,
        })
    }
}

impl TlsFile {
    fn build(
        self,
        dir: &Path,
        field: &dyn Fn(&str, String) -> ConfigError,
    ) -> Result<Option<WebTls>, ConfigError> {
        const PREFIX: &str = "tls_server_config";
        for (name, set) in [
            ("cert", self.cert.is_some()),
            ("key", self.key.is_some()),
            ("client_allowed_sans", self.client_allowed_sans.is_some()),
            ("cipher_suites", self.cipher_suites.is_some()),
            ("curve_preferences", self.curve_preferences.is_some()),
            (
                "prefer_server_cipher_suites",
                self.prefer_server_cipher_suites.is_some(),
            ),
        ] {
            if set {
                let hint = match name {
                    "cert" | "key" => " (use cert_file and key_file)",
                    _ => "",
                };
                return Err(field(
                    &format!("{PREFIX}.{name}"),
                    format!("is not supported by the agent{hint}"),
                ));
            }
        }
        let client_auth = match self.client_auth_type.as_str() {
            "" | "NoClientCert" => ClientAuth::NoClientCert,
            "VerifyClientCertIfGiven" => ClientAuth::VerifyClientCertIfGiven,
            "RequireAndVerifyClientCert" => ClientAuth::RequireAndVerifyClientCert,
            "RequestClientCert" | "RequireAnyClientCert" => {
                return Err(field(
                    &format!("{PREFIX}.client_auth_type"),
                    format!(
                        "{:?} accepts certificates without verifying them and is not supported; \
                         use VerifyClientCertIfGiven or RequireAndVerifyClientCert",
                        self.client_auth_type
                    ),
                ))
            }
            other => {
                return Err(field(
                    &format!("{PREFIX}.client_auth_type"),
                    format!(
                        "{other:?} is not one of NoClientCert, VerifyClientCertIfGiven, \
                         RequireAndVerifyClientCert"
                    ),
                ))
            }
        };
        let nothing_set = self.cert_file.as_os_str().is_empty()
            && self.key_file.as_os_str().is_empty()
            && self.client_ca_file.as_os_str().is_empty()
            && self.client_auth_type.is_empty()
            && self.min_version.is_empty()
            && self.max_version.is_empty();
        if nothing_set {
            return Ok(None);
        }
        for (name, p) in [("cert_file", &self.cert_file), ("key_file", &self.key_file)] {
            if p.as_os_str().is_empty() {
                return Err(field(
                    &format!("{PREFIX}.{name}"),
                    "is required for TLS".into(),
                ));
            }
        }
        let has_ca = !self.client_ca_file.as_os_str().is_empty();
        match (client_auth, has_ca) {
            (ClientAuth::NoClientCert, true) => {
                return Err(field(
                    &format!("{PREFIX}.client_ca_file"),
                    "is set but client_auth_type is NoClientCert; set client_auth_type too".into(),
                ))
            }
            (ClientAuth::NoClientCert, false) => {}
            (_, false) => {
                return Err(field(
                    &format!("{PREFIX}.client_ca_file"),
                    format!(
                        "is required with client_auth_type {}",
                        self.client_auth_type
                    ),
                ))
            }
            (_, true) => {}
        }
        let min = version(&self.min_version, "min_version", field)?.unwrap_or(2);
        let max = version(&self.max_version, "max_version", field)?.unwrap_or(3);
        if min > max {
            return Err(field(
                &format!("{PREFIX}.min_version"),
                "is above max_version".into(),
            ));
        }
        let cert_path = dir.join(&self.cert_file);
        let key_path = dir.join(&self.key_file);
        let provider = provider();
        let (chain, key) = load_pair(
            &format!("metrics.web_config_file: {PREFIX}.cert_file"),
            &cert_path,
            &format!("metrics.web_config_file: {PREFIX}.key_file"),
            &key_path,
            &provider,
        )?;
        let builder = ServerConfig::builder_with_provider(Arc::clone(&provider))
            .with_protocol_versions(&versions(min, max))
            .map_err(|e| field(PREFIX, e.to_string()))?;
        let builder = if client_auth == ClientAuth::NoClientCert {
            builder.with_no_client_auth()
        } else {
            let ca_key = format!("metrics.web_config_file: {PREFIX}.client_ca_file");
            let roots = Arc::new(load_roots(&ca_key, &dir.join(&self.client_ca_file))?);
            let verifier = WebPkiClientVerifier::builder_with_provider(roots, provider);
            let verifier = if client_auth == ClientAuth::VerifyClientCertIfGiven {
                verifier.allow_unauthenticated()
            } else {
                verifier
            };
            builder.with_client_cert_verifier(
                verifier
                    .build()
                    .map_err(|e| field(&format!("{PREFIX}.client_ca_file"), e.to_string()))?,
            )
        };
        let mut server = builder
            .with_single_cert(chain, key)
            .map_err(|e| field(&format!("{PREFIX}.key_file"), e.to_string()))?;
        server.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(Some(WebTls {
            server: Arc::new(server),
        }))
    }
}

/// `TLS12` → 2, `TLS13` → 3 (the minor version); older versions are refused (rustls does not
/// implement them).
fn version(
    value: &str,
    name: &str,
    field: &dyn Fn(&str, String) -> ConfigError,
) -> Result<Option<u8>, ConfigError> {
    match value {
        "" => Ok(None),
        "TLS12" => Ok(Some(2)),
        "TLS13" => Ok(Some(3)),
        "TLS10" | "TLS11" => Err(field(
            &format!("tls_server_config.{name}"),
            format!("{value} is not supported (TLS12 and TLS13 are)"),
        )),
        other => Err(field(
            &format!("tls_server_config.{name}"),
            format!("{other:?} is not one of TLS12, TLS13"),
        )),
    }
}
