//! `pushrelay ca init` and `ca issue`: files and modes, refusal to overwrite a CA, and leaves that
//! verify for their names (a real TLS handshake) with EKU serverAuth and at most 397 days.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Output};
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn pushrelay(dir: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_pushrelay"))
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap()
}

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path).unwrap().permissions().mode() & 0o777
}

/// `ca init` writes ca.pem and a 0600 ca.key, and refuses to replace them without --force.
#[test]
fn ca_init_writes_files_and_refuses_to_overwrite() {
    let dir = tempfile::tempdir().unwrap();
    let out = pushrelay(dir.path(), &["ca", "init", "--dir", "pki"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let (cert, key) = (dir.path().join("pki/ca.pem"), dir.path().join("pki/ca.key"));
    assert_eq!(mode(&key), 0o600);
    let first = std::fs::read(&cert).unwrap();

    let again = pushrelay(dir.path(), &["ca", "init", "--dir", "pki"]);
    assert!(!again.status.success());
    let stderr = String::from_utf8_lossy(&again.stderr);
    assert!(
        stderr.contains("already exists") && stderr.contains("--force"),
        "{stderr}"
    );
    assert_eq!(
        std::fs::read(&cert).unwrap(),
        first,
        "the CA must be untouched"
    );

    let forced = pushrelay(dir.path(), &["ca", "init", "--dir", "pki", "--force"]);
    assert!(forced.status.success());
    assert_ne!(
        std::fs::read(&cert).unwrap(),
        first,
        "--force makes a new CA"
    );
    assert_eq!(mode(&key), 0o600);
}

/// The CA is a CA: basic constraints CA with path length 0, and it signs what it issues.
#[test]
fn ca_certificate_is_a_constrained_ca() {
    let dir = tempfile::tempdir().unwrap();
    assert!(
        pushrelay(dir.path(), &["ca", "init", "--dir", "."])
            .status
            .success()
    );
    let der = CertificateDer::from_pem_file(dir.path().join("ca.pem")).unwrap();
    let (_, cert) = x509_parser::parse_x509_certificate(&der).unwrap();
    let bc = cert.basic_constraints().unwrap().unwrap().value;
    assert!(bc.ca);
    assert_eq!(bc.path_len_constraint, Some(0));
}

/// `ca issue` writes a chain and a 0600 key whose leaf has the SANs, EKU serverAuth, ≤ 397 days.
#[test]
fn ca_issue_writes_a_server_leaf() {
    let dir = tempfile::tempdir().unwrap();
    assert!(
        pushrelay(dir.path(), &["ca", "init", "--dir", "certs"])
            .status
            .success()
    );
    let out = pushrelay(
        dir.path(),
        &[
            "ca",
            "issue",
            "--host",
            "api.push.apple.com",
            "--host",
            "api.sandbox.push.apple.com",
            "--host",
            "127.0.0.1",
        ],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(mode(&dir.path().join("certs/relay.key")), 0o600);
    let chain: Vec<_> = CertificateDer::pem_file_iter(dir.path().join("certs/relay.pem"))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    assert_eq!(chain.len(), 2, "leaf then CA");
    let (_, leaf) = x509_parser::parse_x509_certificate(&chain[0]).unwrap();
    let sans: Vec<String> = leaf
        .subject_alternative_name()
        .unwrap()
        .unwrap()
        .value
        .general_names
        .iter()
        .map(|n| format!("{n}"))
        .collect();
    assert!(
        sans.iter().any(|n| n.contains("api.push.apple.com")),
        "{sans:?}"
    );
    assert!(
        sans.iter()
            .any(|n| n.contains("api.sandbox.push.apple.com")),
        "{sans:?}"
    );
    assert!(sans.iter().any(|n| n.contains("7f:00:00:01")), "{sans:?}");
    let eku = leaf.extended_key_usage().unwrap().unwrap().value;
    assert!(eku.server_auth && !eku.client_auth);
    let days =
        (leaf.validity().not_after.timestamp() - leaf.validity().not_before.timestamp()) / 86_400;
    assert!(days <= 397, "validity {days} days");
    assert!(
        !leaf
            .basic_constraints()
            .ok()
            .flatten()
            .is_some_and(|bc| bc.value.ca)
    );
}

/// `ca issue` refuses a host that is not a DNS name or address, and needs an existing CA.
#[test]
fn ca_issue_refuses_bad_hosts_and_missing_ca() {
    let dir = tempfile::tempdir().unwrap();
    let no_ca = pushrelay(dir.path(), &["ca", "issue", "--host", "api.push.apple.com"]);
    assert!(!no_ca.status.success());
    assert!(String::from_utf8_lossy(&no_ca.stderr).contains("ca.pem"));
    assert!(pushrelay(dir.path(), &["ca", "init"]).status.success());
    let bad = pushrelay(dir.path(), &["ca", "issue", "--host", "not a host"]);
    assert_eq!(bad.status.code(), Some(2));
}

/// A TLS handshake against the issued leaf succeeds for its names and fails for any other.
#[tokio::test]
async fn issued_leaf_verifies_for_its_names_only() {
    let dir = tempfile::tempdir().unwrap();
    assert!(pushrelay(dir.path(), &["ca", "init"]).status.success());
    assert!(
        pushrelay(dir.path(), &["ca", "issue", "--host", "api.push.apple.com"])
            .status
            .success()
    );
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let chain: Vec<_> = CertificateDer::pem_file_iter(dir.path().join("certs/relay.pem"))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    let key = PrivateKeyDer::from_pem_file(dir.path().join("certs/relay.key")).unwrap();
    let server = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .unwrap();
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(CertificateDer::from_pem_file(dir.path().join("certs/ca.pem")).unwrap())
        .unwrap();
    let client = Arc::new(
        rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth(),
    );
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(server));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            if let Ok(mut tls) = acceptor.accept(tcp).await {
                let _ = tls.write_all(b"ok").await;
            }
        }
    });
    for (name, should_verify) in [
        ("api.push.apple.com", true),
        ("api.sandbox.push.apple.com", false),
        ("evil.example", false),
    ] {
        let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
        let connector = tokio_rustls::TlsConnector::from(client.clone());
        let result = connector
            .connect(ServerName::try_from(name).unwrap(), tcp)
            .await;
        match result {
            Ok(mut tls) => {
                assert!(should_verify, "{name} must not verify");
                let mut buf = [0u8; 2];
                tls.read_exact(&mut buf).await.unwrap();
                assert_eq!(&buf, b"ok");
            }
            Err(e) => assert!(!should_verify, "{name} must verify: {e}"),
        }
    }
}
