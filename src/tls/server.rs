//! The server side of TLS that clients reach: a certificate chosen by SNI. Pre-proxy listeners hold
//! one certificate per allowed destination host (minted from the private CA, or a fixed chain) and
//! refuse the handshake for any other name, so nothing is minted on a client's say-so. ALPN offers
//! h2 and http/1.1; a client that offers none is still served (HTTP/2 is then detected by preface).

use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;

use rustls::server::{ClientHello, ResolvesServerCert, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;
use rustls::{RootCertStore, ServerConfig};

use super::pki::{Ca, PkiError};
use super::{ALPN_H2, ALPN_HTTP11, TlsSetupError, load_certs, load_key, provider};
use crate::config::{CertSource, ServerTls};
use crate::metrics::CertExpiry;
use crate::policy::normalize_host;

/// Which SNI names get a certificate.
pub enum Names<'a> {
    /// Only these hosts (pre-proxy: the destinations on the listener's upstream port).
    Only(&'a [String]),
    /// Any name, or none, gets the one certificate (post-proxy: the proxy names pushrelay itself);
    /// a minted one covers these names.
    Any(&'a [String]),
}

/// Certificates by normalised SNI host, plus an optional one for any name.
struct ByHost {
    hosts: HashMap<String, Arc<CertifiedKey>>,
    fallback: Option<Arc<CertifiedKey>>,
}

impl fmt::Debug for ByHost {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ByHost")
            .field("hosts", &self.hosts.keys())
            .finish()
    }
}

impl ResolvesServerCert for ByHost {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let by_name = hello
            .server_name()
            .and_then(normalize_host)
            .and_then(|name| self.hosts.get(&name).cloned());
        by_name.or_else(|| self.fallback.clone())
    }
}

fn expiry(
    kind: &'static str,
    name: &str,
    chain: &[rustls::pki_types::CertificateDer<'_>],
) -> Option<CertExpiry> {
    let not_after = super::pki::not_after_unix(chain.first()?)?;
    Some(CertExpiry {
        kind,
        name: name.to_owned(),
        not_after,
    })
}

/// Builds the listener's TLS server config, and the expiry of what it serves. `key_prefix` (e.g.
/// `listeners[0].tls`) names the keys in errors.
pub fn build(
    tls: &ServerTls,
    names: Names<'_>,
    key_prefix: &str,
) -> Result<(Arc<ServerConfig>, Vec<CertExpiry>), TlsSetupError> {
    let provider = provider();
    let key = |k: &str| format!("{key_prefix}.{k}");
    let certified = |chain, private_key, name: &str, path: &std::path::Path| {
        CertifiedKey::from_der(chain, private_key, &provider)
            .map(Arc::new)
            .map_err(|e| {
                TlsSetupError::new(
                    &key(name),
                    path,
                    format!("certificate and key do not fit: {e}"),
                )
            })
    };
    let mut resolver = ByHost {
        hosts: HashMap::new(),
        fallback: None,
    };
    let mut expiries = Vec::new();
    match &tls.source {
        CertSource::Mint { ca_cert, ca_key } => {
            let ca = Ca::from_files(ca_cert, ca_key).map_err(|e| match e {
                PkiError::Invalid { path, message } if path == *ca_key => {
                    TlsSetupError::new(&key("ca_key"), &path, message)
                }
                other => TlsSetupError::new(&key("ca_cert"), ca_cert, other),
            })?;
            if let Ok(ca_chain) = super::load_certs(&key("ca_cert"), ca_cert) {
                expiries.extend(expiry("ca", &ca_cert.display().to_string(), &ca_chain));
            }
            let mut mint = |hosts: &[String]| {
                let leaf = ca
                    .issue(hosts)
                    .map_err(|e| TlsSetupError::new(&key("ca_cert"), ca_cert, e))?;
                expiries.extend(expiry("served", &hosts.join(","), &leaf.chain));
                certified(leaf.chain, leaf.key, "ca_key", ca_key)
            };
            match names {
                Names::Only(hosts) => {
                    for host in hosts {
                        resolver
                            .hosts
                            .insert(host.clone(), mint(std::slice::from_ref(host))?);
                    }
                }
                Names::Any(names) => resolver.fallback = Some(mint(names)?),
            }
        }
        CertSource::Fixed {
            cert,
            key: key_path,
        } => {
            let chain = load_certs(&key("cert"), cert)?;
            expiries.extend(expiry("served", &cert.display().to_string(), &chain));
            let private_key = load_key(&key("key"), key_path)?;
            let ck = certified(chain, private_key, "key", key_path)?;
            match names {
                Names::Only(hosts) => {
                    for host in hosts {
                        resolver.hosts.insert(host.clone(), ck.clone());
                    }
                }
                Names::Any(_) => resolver.fallback = Some(ck),
            }
        }
    }

    let builder = ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsSetupError::new(key_prefix, std::path::Path::new("-"), e))?;
    let builder = match &tls.client_ca {
        Some(path) => {
            let mut roots = RootCertStore::empty();
            for cert in load_certs(&key("client_ca"), path)? {
                roots
                    .add(cert)
                    .map_err(|e| TlsSetupError::new(&key("client_ca"), path, e))?;
            }
            let verifier =
                WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
                    .build()
                    .map_err(|e| TlsSetupError::new(&key("client_ca"), path, e))?;
            builder.with_client_cert_verifier(verifier)
        }
        None => builder.with_no_client_auth(),
    };
    let mut config = builder.with_cert_resolver(Arc::new(resolver));
    config.alpn_protocols = vec![ALPN_H2.to_vec(), ALPN_HTTP11.to_vec()];
    // Stateless session tickets: a client that reconnects (MPNS opens tunnels by the dozen)
    // resumes without a full handshake. The ticket key is new per build, so a reload ends them.
    config.ticketer = rustls::crypto::ring::Ticketer::new()
        .map_err(|e| TlsSetupError::new(key_prefix, std::path::Path::new("-"), e))?;
    Ok((Arc::new(config), expiries))
}
