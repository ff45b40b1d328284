//! TLS termination for `serve` (rustls with the ring provider): the server's certificate chain
//! and private key from PEM files, HTTP/1.1 over TLS. Every endpoint — `/v1/sync`, `/yjs`,
//! `/hocuspocus`, `/healthz`, `/metrics` — is then served over TLS only.

use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::ServerConfig;

/// Why a TLS configuration could not be made.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// The certificate PEM holds no usable certificate.
    #[error("the TLS certificate is not usable: {0}")]
    Certificate(String),
    /// The key PEM holds no usable private key.
    #[error("the TLS private key is not usable: {0}")]
    Key(String),
    /// The key does not fit the certificate, or rustls refused the pair.
    #[error("the TLS certificate and key do not go together: {0}")]
    Mismatch(String),
}

/// A server configuration from a certificate chain (`CERTIFICATE` blocks, the server's own
/// first) and its private key (PKCS#8, PKCS#1 or SEC1 PEM).
pub fn server_config(cert_pem: &[u8], key_pem: &[u8]) -> Result<Arc<ServerConfig>, TlsError> {
    let chain = CertificateDer::pem_slice_iter(cert_pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::Certificate(e.to_string()))?;
    if chain.is_empty() {
        return Err(TlsError::Certificate("no CERTIFICATE block in the PEM".into()));
    }
    let key = PrivateKeyDer::from_pem_slice(key_pem).map_err(|e| TlsError::Key(e.to_string()))?;
    // ring: the one provider compiled in (see the workspace Cargo.toml); named explicitly, so no
    // process-wide default is needed. Deprecated in rustls 0.23.48 for its lack of post-quantum
    // key exchange, which aws-lc-rs has at the price of cmake and nasm in every build.
    #[allow(deprecated)]
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Mismatch(e.to_string()))?
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .map_err(|e| TlsError::Mismatch(e.to_string()))?;
    // HTTP/1.1 only: WebSocket upgrades are HTTP/1.1.
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn garbage_is_refused_with_a_reason() {
        assert!(matches!(server_config(b"", b""), Err(TlsError::Certificate(_))));
        let err = server_config(b"-----BEGIN CERTIFICATE-----\n!!\n-----END CERTIFICATE-----\n", b"");
        assert!(matches!(err, Err(TlsError::Certificate(_))), "{err:?}");
    }
}
