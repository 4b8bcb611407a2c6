//! The client side of TLS towards the origin: the public web PKI (webpki-roots, which holds APNs's
//! USERTrust root) plus `upstream.extra_roots` for TLS-inspecting proxies, SNI = the destination
//! host (never the `connect_to` address), ALPN h2 only.

use std::path::PathBuf;
use std::sync::Arc;

use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::{ClientConfig, RootCertStore};

use super::{ALPN_H2, TlsSetupError, load_certs, provider};

/// A client certificate presented upstream (certificate-based APNs auth).
pub struct ClientIdentity {
    pub chain: Vec<CertificateDer<'static>>,
    pub key: PrivateKeyDer<'static>,
}

/// Builds the upstream client config. `extra_roots` are added to the web PKI.
pub fn build(
    extra_roots: &[PathBuf],
    identity: Option<ClientIdentity>,
) -> Result<Arc<ClientConfig>, TlsSetupError> {
    let mut roots = RootCertStore {
        roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
    };
    for (i, path) in extra_roots.iter().enumerate() {
        let key = format!("upstream.extra_roots[{i}]");
        for cert in load_certs(&key, path)? {
            roots
                .add(cert)
                .map_err(|e| TlsSetupError::new(&key, path, e))?;
        }
    }
    let builder = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsSetupError::new("upstream", std::path::Path::new("-"), e))?
        .with_root_certificates(roots);
    let mut config = match identity {
        Some(id) => builder
            .with_client_auth_cert(id.chain, id.key)
            .map_err(|e| TlsSetupError::new("upstream.identities", std::path::Path::new("-"), e))?,
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = vec![ALPN_H2.to_vec()];
    Ok(Arc::new(config))
}
