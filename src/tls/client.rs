//! The client side of TLS towards the origin: the public web PKI (webpki-roots, which holds APNs's
//! USERTrust root) plus `upstream.extra_roots` for TLS-inspecting proxies, SNI = the destination
//! host (never the `connect_to` address), ALPN h2 only (towards the DMZ relay of a relay chain,
//! http/1.1). A client certificate (certificate-based APNs auth, or the inside relay's towards its
//! DMZ relay) is read through a resolver that
//! a reload can point at a renewed certificate: each new handshake takes the current one,
//! connections already open keep theirs until they drain.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use rustls::client::ResolvesClientCert;
use rustls::sign::CertifiedKey;
use rustls::{ClientConfig, RootCertStore, SignatureScheme};

use super::{ALPN_H2, ALPN_HTTP11, TlsSetupError, load_certs, load_key, provider};

/// The client certificate presented upstream for one identity, replaceable while it is in use.
pub struct ClientIdentity {
    current: RwLock<(Arc<CertifiedKey>, i64)>,
}

impl fmt::Debug for ClientIdentity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ClientIdentity")
    }
}

impl ClientIdentity {
    /// Reads the chain and key; `key_prefix` (e.g. `upstream.identities[0]`) names them in errors.
    pub fn load(key_prefix: &str, cert: &Path, key: &Path) -> Result<Self, TlsSetupError> {
        Self::load_as(
            (&format!("{key_prefix}.cert"), cert),
            (&format!("{key_prefix}.key"), key),
        )
    }

    /// Reads the chain and key, each named in errors by its own config key (e.g.
    /// `upstream.relay.client_cert`).
    pub fn load_as(cert: (&str, &Path), key: (&str, &Path)) -> Result<Self, TlsSetupError> {
        Ok(ClientIdentity {
            current: RwLock::new(read_identity(cert, key)?),
        })
    }

    /// Presents `next`'s certificate from the next handshake on; whether the certificate chain
    /// (or key) differs from the one presented so far.
    pub fn replace(&self, next: ClientIdentity) -> bool {
        let next = next.current.into_inner().unwrap_or_else(|p| p.into_inner());
        let mut current = self.current.write().unwrap_or_else(|p| p.into_inner());
        let changed =
            current.0.cert != next.0.cert || current.0.key.public_key() != next.0.key.public_key();
        *current = next;
        changed
    }

    /// The current certificate's not-after, as a Unix timestamp (0 when unreadable).
    pub fn not_after(&self) -> i64 {
        self.current.read().unwrap_or_else(|p| p.into_inner()).1
    }
}

fn read_identity(
    (cert_name, cert): (&str, &Path),
    (key_name, key): (&str, &Path),
) -> Result<(Arc<CertifiedKey>, i64), TlsSetupError> {
    let chain = load_certs(cert_name, cert)?;
    let private_key = load_key(key_name, key)?;
    let not_after = chain
        .first()
        .and_then(super::pki::not_after_unix)
        .unwrap_or(0);
    let certified = CertifiedKey::from_der(chain, private_key, &provider()).map_err(|e| {
        TlsSetupError::new(
            key_name,
            key,
            format!("certificate and key do not fit: {e}"),
        )
    })?;
    Ok((Arc::new(certified), not_after))
}

impl ResolvesClientCert for ClientIdentity {
    fn resolve(
        &self,
        _root_hint_subjects: &[&[u8]],
        _sigschemes: &[SignatureScheme],
    ) -> Option<Arc<CertifiedKey>> {
        Some(
            self.current
                .read()
                .unwrap_or_else(|p| p.into_inner())
                .0
                .clone(),
        )
    }

    fn has_certs(&self) -> bool {
        true
    }
}

/// Builds the upstream client config. `extra_roots` are added to the web PKI.
pub fn build(
    extra_roots: &[PathBuf],
    identity: Option<Arc<ClientIdentity>>,
) -> Result<Arc<ClientConfig>, TlsSetupError> {
    build_for(extra_roots, identity, ALPN_H2)
}

/// The client config towards the DMZ relay of a relay chain: the same roots, ALPN http/1.1
/// (a TLS-inspecting proxy in between re-signs with its own CA, which `extra_roots` then holds),
/// and the inside relay's client certificate when it has one (`upstream.relay.client_cert`).
pub fn build_http11(
    extra_roots: &[PathBuf],
    identity: Option<Arc<ClientIdentity>>,
) -> Result<Arc<ClientConfig>, TlsSetupError> {
    build_for(extra_roots, identity, ALPN_HTTP11)
}

fn build_for(
    extra_roots: &[PathBuf],
    identity: Option<Arc<ClientIdentity>>,
    alpn: &[u8],
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
        Some(id) => {
            let mut config = builder.with_client_cert_resolver(id);
            // A resumed session keeps the certificate it was made with, so a renewed one would
            // never be shown; upstream connections are long-lived, resumption saves little.
            config.resumption = rustls::client::Resumption::disabled();
            config
        }
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = vec![alpn.to_vec()];
    Ok(Arc::new(config))
}
