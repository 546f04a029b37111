//! TLS material named by the configuration, loaded and checked at load
//! time: a missing file, a file without a PEM certificate or key, or a key
//! that does not belong to its certificate is a [`ConfigError`] naming the
//! key, so `check-config` finds it before a restart does.
//!
//! rustls with the `ring` provider, passed explicitly rather than installed
//! process-wide, so nothing else in the process changes its TLS defaults.

use std::path::Path;
use std::sync::Arc;

use tokio_rustls::rustls::crypto::CryptoProvider;
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::rustls::server::WebPkiClientVerifier;
use tokio_rustls::rustls::sign::CertifiedKey;
use tokio_rustls::rustls::{ClientConfig, RootCertStore, ServerConfig, SupportedProtocolVersion};

use super::{invalid, ConfigError, PeerTlsConfig};

/// Mutual TLS for the peer port, ready to use: both sides present this
/// node's certificate and trust only `network.tls.ca_file`.
#[derive(Debug, Clone)]
pub struct PeerTls {
    /// Inbound: requires a client certificate that chains to the CA.
    pub server: Arc<ServerConfig>,
    /// Outbound: presents this node's certificate, verifies the peer's.
    pub client: Arc<ClientConfig>,
}

impl PeerTls {
    /// Loads `network.tls`; the caller has checked that some file is set.
    pub(super) fn load(cfg: &PeerTlsConfig) -> Result<Self, ConfigError> {
        for (key, path) in [
            ("network.tls.cert_file", &cfg.cert_file),
            ("network.tls.key_file", &cfg.key_file),
            ("network.tls.ca_file", &cfg.ca_file),
        ] {
            if path.as_os_str().is_empty() {
                return Err(invalid(
                    key,
                    "must be set: network.tls.cert_file, key_file and ca_file go together",
                ));
            }
        }
        let provider = provider();
        let (chain, key) = load_pair(
            "network.tls.cert_file",
            &cfg.cert_file,
            "network.tls.key_file",
            &cfg.key_file,
            &provider,
        )?;
        let roots = Arc::new(load_roots("network.tls.ca_file", &cfg.ca_file)?);
        let verifier =
            WebPkiClientVerifier::builder_with_provider(Arc::clone(&roots), Arc::clone(&provider))
                .build()
                .map_err(|e| invalid("network.tls.ca_file", e.to_string()))?;
        let server = ServerConfig::builder_with_provider(Arc::clone(&provider))
            .with_safe_default_protocol_versions()
            .map_err(|e| invalid("network.tls", e.to_string()))?
            .with_client_cert_verifier(verifier)
            .with_single_cert(chain.clone(), key.clone_key())
            .map_err(|e| invalid("network.tls.key_file", e.to_string()))?;
        let client = ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| invalid("network.tls", e.to_string()))?
            .with_root_certificates(roots)
            .with_client_auth_cert(chain, key)
            .map_err(|e| invalid("network.tls.key_file", e.to_string()))?;
        Ok(Self {
            server: Arc::new(server),
            client: Arc::new(client),
        })
    }
}

/// The crypto provider for every TLS config the agent builds.
pub(super) fn provider() -> Arc<CryptoProvider> {
    Arc::new(tokio_rustls::rustls::crypto::ring::default_provider())
}

/// A certificate chain and its private key, checked to belong together.
pub(super) fn load_pair(
    cert_key: &str,
    cert_path: &Path,
    key_key: &str,
    key_path: &Path,
    provider: &CryptoProvider,
) -> Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>), ConfigError> {
    let chain = load_certs(cert_key, cert_path)?;
    let key = PrivateKeyDer::from_pem_slice(&read(key_key, key_path)?).map_err(|e| {
        invalid(
            key_key,
            format!("no PEM private key in {}: {e}", key_path.display()),
        )
    })?;
    CertifiedKey::from_der(chain.clone(), key.clone_key(), provider).map_err(|e| {
        invalid(
            key_key,
            format!(
                "{} does not match the certificate in {}: {e}",
                key_path.display(),
                cert_path.display()
            ),
        )
    })?;
    Ok((chain, key))
}

/// Every certificate in a PEM file; at least one.
pub(super) fn load_certs(
    key: &str,
    path: &Path,
) -> Result<Vec<CertificateDer<'static>>, ConfigError> {
    let pem = read(key, path)?;
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| invalid(key, format!("bad PEM in {}: {e}", path.display())))?;
    if certs.is_empty() {
        return Err(invalid(
            key,
            format!("no PEM certificate in {}", path.display()),
        ));
    }
    Ok(certs)
}

/// A trust store holding every certificate of a CA file.
pub(super) fn load_roots(key: &str, path: &Path) -> Result<RootCertStore, ConfigError> {
    let mut roots = RootCertStore::empty();
    for cert in load_certs(key, path)? {
        roots.add(cert).map_err(|e| {
            invalid(
                key,
                format!("unusable CA certificate in {}: {e}", path.display()),
            )
        })?;
    }
    Ok(roots)
}

/// The protocol versions from TLS 1.`min` to TLS 1.`max` (2 or 3).
pub(super) fn versions(min: u8, max: u8) -> Vec<&'static SupportedProtocolVersion> {
    use tokio_rustls::rustls::ProtocolVersion;
    tokio_rustls::rustls::ALL_VERSIONS
        .iter()
        .copied()
        .filter(|v| {
            let minor = match v.version {
                ProtocolVersion::TLSv1_2 => 2,
                ProtocolVersion::TLSv1_3 => 3,
                _ => return false,
            };
            (min..=max).contains(&minor)
        })
        .collect()
}

fn read(key: &str, path: &Path) -> Result<Vec<u8>, ConfigError> {
    std::fs::read(path).map_err(|e| invalid(key, format!("cannot read {}: {e}", path.display())))
}
