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

#[allow(dead_code)]
#[path = "squid/host_tools.rs"]
mod host_tools;

/// The APNs hosts `ca init` permits by default.
const APNS_HOSTS: [&str; 3] = [
    "api.push.apple.com",
    "api.sandbox.push.apple.com",
    "api.development.push.apple.com",
];

/// The CA's name constraints: whether critical, the permitted DNS names, and how many IP
/// subtrees are excluded.
fn name_constraints(ca_pem: &Path) -> Option<(bool, Vec<String>, usize)> {
    use x509_parser::extensions::{GeneralName, ParsedExtension};
    let der = CertificateDer::from_pem_file(ca_pem).unwrap();
    let (_, cert) = x509_parser::parse_x509_certificate(&der).unwrap();
    cert.extensions()
        .iter()
        .find_map(|e| match e.parsed_extension() {
            ParsedExtension::NameConstraints(nc) => {
                let dns = nc
                    .permitted_subtrees
                    .iter()
                    .flatten()
                    .filter_map(|s| match s.base {
                        GeneralName::DNSName(d) => Some(d.to_owned()),
                        _ => None,
                    })
                    .collect();
                let excluded_ips = nc
                    .excluded_subtrees
                    .iter()
                    .flatten()
                    .filter(|s| matches!(s.base, GeneralName::IPAddress(_)))
                    .count();
                Some((e.critical, dns, excluded_ips))
            }
            _ => None,
        })
}

/// A leaf for `host` signed with the CA's key by openssl alone, as a thief with ca.key would.
fn openssl_leaf(openssl: &Path, dir: &Path, host: &str) -> std::path::PathBuf {
    let run = |args: &[&str]| {
        let out = Command::new(openssl)
            .args(args)
            .current_dir(dir)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "openssl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    let (key, csr, pem, ext) = (
        format!("{host}.key"),
        format!("{host}.csr"),
        format!("{host}.pem"),
        format!("{host}.ext"),
    );
    std::fs::write(
        dir.join(&ext),
        format!(
            "subjectAltName=DNS:{host}\nextendedKeyUsage=serverAuth\nkeyUsage=digitalSignature\n"
        ),
    )
    .unwrap();
    run(&[
        "ecparam",
        "-name",
        "prime256v1",
        "-genkey",
        "-noout",
        "-out",
        &key,
    ]);
    run(&[
        "req",
        "-new",
        "-key",
        &key,
        "-subj",
        &format!("/CN={host}"),
        "-out",
        &csr,
    ]);
    run(&[
        "x509",
        "-req",
        "-in",
        &csr,
        "-CA",
        "ca.pem",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-days",
        "30",
        "-extfile",
        &ext,
        "-out",
        &pem,
    ]);
    dir.join(pem)
}

/// Whether `openssl verify` accepts `leaf` against the CA in `dir`.
fn openssl_verifies(openssl: &Path, dir: &Path, leaf: &Path) -> bool {
    let out = Command::new(openssl)
        .args(["verify", "-CAfile", "ca.pem"])
        .arg(leaf)
        .current_dir(dir)
        .output()
        .unwrap();
    out.status.success()
}

/// Whether rustls's verifier accepts `leaf` (chain PEM, leaf first) for `host` against the CA.
fn rustls_verifies(dir: &Path, leaf: &Path, host: &str) -> Result<(), rustls::Error> {
    use rustls::client::danger::ServerCertVerifier;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(CertificateDer::from_pem_file(dir.join("ca.pem")).unwrap())
        .unwrap();
    let verifier =
        rustls::client::WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider)
            .build()
            .unwrap();
    let chain: Vec<_> = CertificateDer::pem_file_iter(leaf)
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    verifier
        .verify_server_cert(
            &chain[0],
            &chain[1..],
            &ServerName::try_from(host.to_owned()).unwrap(),
            &[],
            rustls::pki_types::UnixTime::now(),
        )
        .map(|_| ())
}

/// `ca init` makes a CA with critical name constraints permitting only the APNs hosts (and no
/// IP address): a leaf for a permitted host verifies in openssl and rustls, a leaf for any other
/// host made with the same key outside pushrelay fails in both.
#[test]
fn ca_init_constrains_the_ca_to_the_push_hosts() {
    let Some(openssl) = host_tools::require("openssl", "openssl") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let out = pushrelay(dir.path(), &["ca", "init", "--dir", "."]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("api.push.apple.com"));
    let (critical, permitted, excluded_ips) = name_constraints(&dir.path().join("ca.pem")).unwrap();
    assert!(critical, "name constraints must be critical");
    let mut want: Vec<_> = APNS_HOSTS.iter().map(|h| h.to_string()).collect();
    want.sort();
    assert_eq!(permitted, want);
    assert_eq!(excluded_ips, 2, "every IPv4 and IPv6 address excluded");

    let issue = pushrelay(
        dir.path(),
        &["ca", "issue", "--dir", ".", "--host", "api.push.apple.com"],
    );
    assert!(
        issue.status.success(),
        "{}",
        String::from_utf8_lossy(&issue.stderr)
    );
    let good = dir.path().join("relay.pem");
    assert!(openssl_verifies(&openssl, dir.path(), &good));
    rustls_verifies(dir.path(), &good, "api.push.apple.com").unwrap();

    let sandbox = openssl_leaf(&openssl, dir.path(), "api.sandbox.push.apple.com");
    assert!(openssl_verifies(&openssl, dir.path(), &sandbox));
    for host in ["evil.example", "push.apple.com", "xapi.push.apple.com"] {
        let stolen = openssl_leaf(&openssl, dir.path(), host);
        assert!(
            !openssl_verifies(&openssl, dir.path(), &stolen),
            "openssl accepted a leaf for {host}"
        );
        let err = rustls_verifies(dir.path(), &stolen, host).unwrap_err();
        assert!(
            format!("{err:?}").contains("NameConstraint"),
            "{host}: {err:?}"
        );
    }
}

/// `--permit` replaces the default list; `--config` permits that configuration's destinations.
#[test]
fn ca_init_permits_the_given_names_or_the_configured_destinations() {
    let dir = tempfile::tempdir().unwrap();
    let out = pushrelay(
        dir.path(),
        &[
            "ca",
            "init",
            "--dir",
            "a",
            "--permit",
            "push.example.net",
            "--permit",
            "10.0.0.5",
        ],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let (_, permitted, excluded_ips) = name_constraints(&dir.path().join("a/ca.pem")).unwrap();
    assert_eq!(permitted, ["push.example.net"]);
    assert_eq!(
        excluded_ips, 0,
        "an IP address given is permitted, not excluded"
    );

    std::fs::write(
        dir.path().join("c.yaml"),
        "destinations: [\"fcm.googleapis.com:443\", \"api.push.apple.com:443\", \"api.push.apple.com:2197\"]\n",
    )
    .unwrap();
    let out = pushrelay(
        dir.path(),
        &["ca", "init", "--dir", "b", "--config", "c.yaml"],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let (_, permitted, _) = name_constraints(&dir.path().join("b/ca.pem")).unwrap();
    assert_eq!(permitted, ["api.push.apple.com", "fcm.googleapis.com"]);

    let bad = pushrelay(
        dir.path(),
        &["ca", "init", "--dir", "x", "--permit", "bad host"],
    );
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("bad host"));
    assert!(
        !dir.path().join("x/ca.key").exists(),
        "nothing written for a bad --permit"
    );
}

/// `check` warns when a listener mints from a CA without name constraints, and when the
/// constraints do not cover a host it mints for; a constrained CA that covers them is quiet.
#[test]
fn check_warns_about_a_ca_without_name_constraints() {
    let dir = tempfile::tempdir().unwrap();
    pushrelay::tls::pki::init_dir(&dir.path().join("open"), false, &[]).unwrap();
    assert!(
        pushrelay(dir.path(), &["ca", "init", "--dir", "apns"])
            .status
            .success()
    );
    let config = |ca: &str, dest: &str| {
        format!(
            "listeners:\n  - name: apns\n    mode: pre-proxy\n    bind: \"127.0.0.1:0\"\n    upstream_port: 443\n    \
             tls:\n      ca_cert: {ca}/ca.pem\n      ca_key: {ca}/ca.key\n    allow_sources: [\"127.0.0.1/32\"]\n\
             destinations: [\"{dest}:443\"]\n"
        )
    };
    for (ca, dest, warning) in [
        ("open", "api.push.apple.com", Some("no name constraints")),
        (
            "apns",
            "fcm.googleapis.com",
            Some("do not permit fcm.googleapis.com"),
        ),
        ("apns", "api.push.apple.com", None),
    ] {
        std::fs::write(dir.path().join("c.yaml"), config(ca, dest)).unwrap();
        let out = pushrelay(dir.path(), &["check", "--config", "c.yaml"]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{stderr}");
        match warning {
            Some(w) => assert!(
                stderr.contains(w) && stderr.contains("warning:"),
                "{ca}: {stderr}"
            ),
            None => assert!(!stderr.contains("name constraints"), "{ca}: {stderr}"),
        }
    }
}

/// `ca issue` replaces a leaf whose key file was left 0644 with a 0600 one, atomically: a new
/// file is moved into place (a hard link to the old one still reads the old bytes, so the old
/// file was never rewritten in place), its mode is not the old file's, and no temporary file
/// stays behind.
#[test]
fn ca_issue_replaces_a_readable_key_with_a_0600_one() {
    let dir = tempfile::tempdir().unwrap();
    assert!(pushrelay(dir.path(), &["ca", "init"]).status.success());
    let key = dir.path().join("certs/relay.key");
    std::fs::write(&key, "old key").unwrap();
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
    let old = dir.path().join("old-relay.key");
    std::fs::hard_link(&key, &old).unwrap();
    let out = pushrelay(dir.path(), &["ca", "issue", "--host", "api.push.apple.com"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(mode(&key), 0o600);
    PrivateKeyDer::from_pem_file(&key).expect("the new key replaced the old one");
    assert_eq!(
        std::fs::read_to_string(&old).unwrap(),
        "old key",
        "the key file was rewritten in place, not replaced"
    );
    assert_eq!(mode(&dir.path().join("certs/relay.pem")), 0o644);
    let mut names: Vec<_> = std::fs::read_dir(dir.path().join("certs"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(names, ["ca.key", "ca.pem", "relay.key", "relay.pem"]);
}

/// Leaves have ECDSA keys, which only sign: digitalSignature, and no keyEncipherment.
#[test]
fn ecdsa_leaves_carry_no_key_encipherment() {
    let dir = tempfile::tempdir().unwrap();
    assert!(pushrelay(dir.path(), &["ca", "init"]).status.success());
    assert!(
        pushrelay(dir.path(), &["ca", "issue", "--host", "api.push.apple.com"])
            .status
            .success()
    );
    let der = CertificateDer::from_pem_file(dir.path().join("certs/relay.pem")).unwrap();
    let (_, leaf) = x509_parser::parse_x509_certificate(&der).unwrap();
    let usage = leaf.key_usage().unwrap().unwrap().value;
    assert!(usage.digital_signature());
    assert!(!usage.key_encipherment(), "{usage:?}");
}

/// `ca issue` for a host the CA's name constraints leave out warns: clients will refuse it.
#[test]
fn ca_issue_warns_about_a_host_outside_the_name_constraints() {
    let dir = tempfile::tempdir().unwrap();
    assert!(pushrelay(dir.path(), &["ca", "init"]).status.success());
    let out = pushrelay(
        dir.path(),
        &[
            "ca",
            "issue",
            "--host",
            "evil.example",
            "--host",
            "10.0.0.5",
        ],
    );
    assert!(out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("evil.example") && stderr.contains("10.0.0.5"),
        "{stderr}"
    );
    assert!(stderr.contains("name constraints"), "{stderr}");
}
