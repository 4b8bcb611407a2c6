//! TLS on both sides: the server side that clients reach (certificates by SNI), the client side
//! that reaches the origin (web PKI plus extra roots, ALPN h2), and the private CA that mints the
//! server certificates. rustls with the ring provider only, so no global provider is ever needed.

pub mod client;
pub mod pki;
pub mod server;

use std::path::Path;
use std::sync::Arc;

use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

/// Failure to load TLS material, naming the config key and file.
#[derive(Debug, thiserror::Error)]
#[error("{key}: {path}: {message}")]
pub struct TlsSetupError {
    pub key: String,
    pub path: String,
    pub message: String,
}

impl TlsSetupError {
    pub fn new(key: &str, path: &Path, message: impl ToString) -> Self {
        TlsSetupError {
            key: key.to_owned(),
            path: path.display().to_string(),
            message: message.to_string(),
        }
    }
}

pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Every certificate in a PEM file; an empty file is an error.
pub fn load_certs(key: &str, path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsSetupError> {
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| TlsSetupError::new(key, path, e))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsSetupError::new(key, path, format!("not a PEM certificate file: {e}")))?;
    if certs.is_empty() {
        return Err(TlsSetupError::new(
            key,
            path,
            "no certificate found in the file",
        ));
    }
    Ok(certs)
}

/// The first private key in a PEM file (PKCS#8, PKCS#1 or SEC1). The error never shows key bytes.
pub fn load_key(key: &str, path: &Path) -> Result<PrivateKeyDer<'static>, TlsSetupError> {
    PrivateKeyDer::from_pem_file(path).map_err(|e| {
        let message = match e {
            rustls::pki_types::pem::Error::Io(io) => io.to_string(),
            _ => "no readable private key in the file (PEM PKCS#8, PKCS#1 or SEC1 expected)".into(),
        };
        TlsSetupError::new(key, path, message)
    })
}

/// The subject common name of the certificate a TLS client presented (verified against
/// `tls.client_ca` by the handshake), if any.
pub fn client_subject(conn: &rustls::ServerConnection) -> Option<Arc<str>> {
    let leaf = conn.peer_certificates()?.first()?;
    let (_, cert) = x509_parser::parse_x509_certificate(leaf).ok()?;
    let cn = cert.subject().iter_common_name().next()?.as_str().ok()?;
    Some(cn.into())
}

pub const ALPN_H2: &[u8] = b"h2";
pub const ALPN_HTTP11: &[u8] = b"http/1.1";
