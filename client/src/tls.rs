//! `wss://`: the rustls configuration a client connects with.
//!
//! The certificates trusted are Mozilla's roots (the `webpki-roots` crate, compiled in: the same
//! on every platform, phones included, with no system store to read) and, for private
//! deployments, any extra CA certificates given in PEM. The crypto provider is rustls's `ring`,
//! named explicitly here, so that no process-wide default provider is needed (nor can two
//! compiled-in providers make rustls refuse to choose).

use std::sync::{Arc, OnceLock};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::CertificateDer;
use rustls::{ClientConfig, RootCertStore};

use crate::{Error, Result};

/// The TLS settings of a client's connections: which certificate authorities it trusts.
#[derive(Clone, Debug)]
pub struct Tls {
    config: Arc<ClientConfig>,
}

impl Tls {
    /// Mozilla's roots only (built once, then shared).
    pub fn mozilla() -> Result<Tls> {
        static DEFAULT: OnceLock<std::result::Result<Tls, String>> = OnceLock::new();
        DEFAULT
            .get_or_init(|| {
                Ok(Tls {
                    config: Arc::new(client_config(mozilla_roots()).map_err(|e| e.to_string())?),
                })
            })
            .clone()
            .map_err(Error::Invalid)
    }

    /// Mozilla's roots and, also trusted, every certificate in `pem` (one or more `CERTIFICATE`
    /// blocks: a private deployment's CA, or a self-signed server certificate).
    pub fn with_extra_ca(pem: &[u8]) -> Result<Tls> {
        let mut roots = mozilla_roots();
        let mut added = 0;
        for cert in CertificateDer::pem_slice_iter(pem) {
            let cert = cert.map_err(|e| Error::Invalid(format!("the CA certificate is not valid PEM: {e}")))?;
            roots
                .add(cert)
                .map_err(|e| Error::Invalid(format!("the CA certificate is not usable: {e}")))?;
            added += 1;
        }
        if added == 0 {
            return Err(Error::Invalid("no CERTIFICATE block in the CA certificate PEM".into()));
        }
        Ok(Tls {
            config: Arc::new(client_config(roots)?),
        })
    }

    /// The rustls configuration.
    pub fn config(&self) -> Arc<ClientConfig> {
        self.config.clone()
    }
}

fn mozilla_roots() -> RootCertStore {
    RootCertStore {
        roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
    }
}

fn client_config(roots: RootCertStore) -> Result<ClientConfig> {
    // rustls 0.23.48 deprecates ring's provider for its lack of post-quantum key exchange;
    // aws-lc-rs has it but needs cmake (and nasm) to cross-compile for iOS and Android.
    #[allow(deprecated)]
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    // TLS 1.2 and 1.3, which ring supports: this does not fail in practice.
    let builder = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| Error::Invalid(format!("TLS: {e}")))?;
    Ok(builder.with_root_certificates(roots).with_no_client_auth())
}

/// Whether `error` is a TLS failure (certificate not trusted, name mismatch, handshake), and
/// what rustls said.
pub(crate) fn tls_failure(error: &tokio_tungstenite::tungstenite::Error) -> Option<String> {
    use tokio_tungstenite::tungstenite::Error as WsError;
    match error {
        WsError::Tls(e) => Some(e.to_string()),
        WsError::Io(io) => io
            .get_ref()
            .and_then(|inner| inner.downcast_ref::<rustls::Error>())
            .map(|e| e.to_string()),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn extra_cas_must_be_certificates() {
        assert!(Tls::with_extra_ca(b"").is_err());
        assert!(Tls::with_extra_ca(b"-----BEGIN CERTIFICATE-----\nnot base64!\n-----END CERTIFICATE-----\n").is_err());
        let roots = Tls::mozilla().unwrap().config();
        assert!(Arc::ptr_eq(&roots, &Tls::mozilla().unwrap().config()), "built once");
    }
}
