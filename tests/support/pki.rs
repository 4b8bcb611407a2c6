//! The test PKI: a CA made by `pki::init_dir`, as `pushrelay ca init` makes it, and leaves from it.

use std::path::PathBuf;
use std::sync::Arc;

use pushrelay::tls::pki::{self, Ca};
use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;
use tempfile::TempDir;

pub struct TestPki {
    pub dir: TempDir,
    pub ca: Ca,
    pub ca_cert: PathBuf,
    pub ca_key: PathBuf,
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

impl TestPki {
    pub fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let (ca_cert, ca_key) = pki::init_dir(dir.path(), false, &[]).unwrap();
        let ca = Ca::from_files(&ca_cert, &ca_key).unwrap();
        TestPki {
            dir,
            ca,
            ca_cert,
            ca_key,
        }
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    pub fn roots(&self) -> rustls::RootCertStore {
        let mut roots = rustls::RootCertStore::empty();
        roots
            .add(CertificateDer::from_pem_slice(self.ca.cert_pem().as_bytes()).unwrap())
            .unwrap();
        roots
    }

    /// A TLS server config for `hosts`, signed by this CA.
    pub fn server_config(&self, hosts: &[&str], alpn: &[&[u8]]) -> Arc<rustls::ServerConfig> {
        let hosts: Vec<String> = hosts.iter().map(|h| h.to_string()).collect();
        let leaf = self.ca.issue(&hosts).unwrap();
        let mut config = rustls::ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(leaf.chain, leaf.key)
            .unwrap();
        config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        Arc::new(config)
    }

    /// A TLS server config that asks for (but does not require) a client certificate from this CA.
    pub fn server_config_with_optional_client_auth(
        &self,
        hosts: &[&str],
        alpn: &[&[u8]],
    ) -> Arc<rustls::ServerConfig> {
        let hosts: Vec<String> = hosts.iter().map(|h| h.to_string()).collect();
        let leaf = self.ca.issue(&hosts).unwrap();
        let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
            Arc::new(self.roots()),
            provider(),
        )
        .allow_unauthenticated()
        .build()
        .unwrap();
        let mut config = rustls::ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_client_cert_verifier(verifier)
            .with_single_cert(leaf.chain, leaf.key)
            .unwrap();
        config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        Arc::new(config)
    }

    /// Writes a client certificate and key for `name` into the PKI dir: (cert path, key path).
    pub fn write_client_cert(&self, name: &str) -> (PathBuf, PathBuf) {
        let leaf = self.ca.issue_client(name).unwrap();
        let (cert, key) = (
            self.path(&format!("{name}.pem")),
            self.path(&format!("{name}.key")),
        );
        std::fs::write(&cert, &leaf.chain_pem).unwrap();
        std::fs::write(&key, &leaf.key_pem).unwrap();
        (cert, key)
    }

    /// A TLS client config trusting only this CA.
    pub fn client_config(&self, alpn: &[&[u8]]) -> Arc<rustls::ClientConfig> {
        let mut config = rustls::ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(self.roots())
            .with_no_client_auth();
        config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        Arc::new(config)
    }

    /// A client config that presents a client certificate issued by this CA.
    pub fn client_config_with_cert(&self, name: &str, alpn: &[&[u8]]) -> Arc<rustls::ClientConfig> {
        let leaf = self.ca.issue_client(name).unwrap();
        let mut config = rustls::ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(self.roots())
            .with_client_auth_cert(leaf.chain, leaf.key)
            .unwrap();
        config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        Arc::new(config)
    }
}
