//! scripts/bootstrap-ca.sh, run for real against the pushrelay binary in a temporary directory:
//! it creates the CA once, reuses it afterwards, issues a leaf for the APNs hosts that openssl
//! verifies, and prints what the push server needs. `--install-trust` changes the machine, so it is
//! not run here.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use tempfile::TempDir;

const APNS_HOSTS: [&str; 3] = [
    "api.push.apple.com",
    "api.sandbox.push.apple.com",
    "api.development.push.apple.com",
];

fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/bootstrap-ca.sh")
}

/// Runs the script in `cwd` with `--pushrelay` pointing at the binary under test.
fn bootstrap(cwd: &Path, args: &[&str]) -> Output {
    Command::new(script())
        .current_dir(cwd)
        .arg("--pushrelay")
        .arg(env!("CARGO_BIN_EXE_pushrelay"))
        .args(args)
        .output()
        .expect("run scripts/bootstrap-ca.sh")
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn assert_success(out: &Output) {
    assert!(
        out.status.success(),
        "bootstrap-ca.sh failed ({}):\nstdout:\n{}\nstderr:\n{}",
        out.status,
        stdout(out),
        stderr(out)
    );
}

/// openssl, or None (with a SKIP note) where it is missing; CI=true makes a missing openssl fatal.
fn openssl() -> Option<&'static str> {
    let found = Command::new("openssl")
        .arg("version")
        .output()
        .is_ok_and(|o| o.status.success());
    if found {
        return Some("openssl");
    }
    if std::env::var("CI").as_deref() == Ok("true") {
        panic!("openssl is not installed, but CI=true: .ci/run must install it");
    }
    eprintln!("SKIP: openssl is not installed; install it to check the issued certificates");
    None
}

fn hosts_line(ip: &str) -> String {
    format!("{ip} {}", APNS_HOSTS.join(" "))
}

/// A first run creates certs/ca.pem and a 0600 certs/ca.key and prints the /etc/hosts line.
#[test]
fn first_run_creates_the_ca_with_a_private_key() {
    let cwd = TempDir::new().unwrap();
    let out = bootstrap(cwd.path(), &[]);
    assert_success(&out);
    let certs = cwd.path().join("certs");
    let ca_pem = std::fs::read_to_string(certs.join("ca.pem")).unwrap();
    assert!(
        ca_pem.starts_with("-----BEGIN CERTIFICATE-----"),
        "{ca_pem}"
    );
    let key_mode = std::fs::metadata(certs.join("ca.key"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(key_mode & 0o777, 0o600, "ca.key mode is {key_mode:o}");
    let text = stdout(&out);
    assert!(text.lines().any(|l| l == hosts_line("127.0.0.1")), "{text}");
    assert!(text.contains("SSL_CERT_FILE"), "{text}");
}

/// A second run reuses the CA: ca.pem and ca.key are byte-for-byte unchanged.
#[test]
fn second_run_reuses_the_ca_unchanged() {
    let cwd = TempDir::new().unwrap();
    assert_success(&bootstrap(cwd.path(), &[]));
    let certs = cwd.path().join("certs");
    let read = |name: &str| std::fs::read(certs.join(name)).unwrap();
    let (pem, key) = (read("ca.pem"), read("ca.key"));

    let again = bootstrap(cwd.path(), &[]);
    assert_success(&again);
    assert!(
        stdout(&again).contains("reusing the existing CA"),
        "{}",
        stdout(&again)
    );
    assert_eq!(read("ca.pem"), pem, "ca.pem changed on the second run");
    assert_eq!(read("ca.key"), key, "ca.key changed on the second run");
}

/// --issue-leaf writes relay.pem that openssl verifies against ca.pem, naming the APNs hosts, and a
/// second run keeps that leaf.
#[test]
fn issued_leaf_verifies_against_the_ca_and_names_the_apns_hosts() {
    let Some(openssl) = openssl() else { return };
    let cwd = TempDir::new().unwrap();
    let out = bootstrap(cwd.path(), &["--dir", "pki", "--issue-leaf"]);
    assert_success(&out);
    let dir = cwd.path().join("pki");

    let verify = Command::new(openssl)
        .current_dir(&dir)
        .args(["verify", "-CAfile", "ca.pem", "relay.pem"])
        .output()
        .unwrap();
    assert!(
        verify.status.success(),
        "openssl verify: {}{}",
        stdout(&verify),
        stderr(&verify)
    );
    assert_eq!(stdout(&verify).trim(), "relay.pem: OK");

    let san = Command::new(openssl)
        .current_dir(&dir)
        .args([
            "x509",
            "-in",
            "relay.pem",
            "-noout",
            "-ext",
            "subjectAltName",
        ])
        .output()
        .unwrap();
    assert!(san.status.success(), "{}", stderr(&san));
    let san = stdout(&san);
    for host in APNS_HOSTS {
        assert!(
            san.contains(&format!("DNS:{host}")),
            "{host} missing from {san}"
        );
    }
    let key_mode = std::fs::metadata(dir.join("relay.key"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(key_mode & 0o777, 0o600, "relay.key mode is {key_mode:o}");

    let leaf = std::fs::read(dir.join("relay.pem")).unwrap();
    let again = bootstrap(cwd.path(), &["--dir", "pki", "--issue-leaf"]);
    assert_success(&again);
    assert!(stdout(&again).contains("keeping"), "{}", stdout(&again));
    assert_eq!(std::fs::read(dir.join("relay.pem")).unwrap(), leaf);
}

/// --relay-ip puts the relay's address in the /etc/hosts line; a host name there is refused.
#[test]
fn relay_ip_goes_into_the_hosts_line() {
    let cwd = TempDir::new().unwrap();
    let out = bootstrap(cwd.path(), &["--relay-ip", "127.0.0.53"]);
    assert_success(&out);
    let text = stdout(&out);
    assert!(
        text.lines().any(|l| l == hosts_line("127.0.0.53")),
        "{text}"
    );

    let bad = bootstrap(cwd.path(), &["--relay-ip", "relay.corp.example"]);
    assert_eq!(bad.status.code(), Some(2), "{}", stderr(&bad));
    assert!(
        stderr(&bad).contains("is not an IP address"),
        "{}",
        stderr(&bad)
    );
}

/// Half a CA (ca.pem without ca.key) is refused with a message, and nothing is written.
#[test]
fn half_a_ca_is_refused_and_left_alone() {
    let cwd = TempDir::new().unwrap();
    let certs = cwd.path().join("certs");
    std::fs::create_dir(&certs).unwrap();
    std::fs::write(certs.join("ca.pem"), "old CA\n").unwrap();
    let out = bootstrap(cwd.path(), &[]);
    assert_eq!(out.status.code(), Some(1), "{}", stdout(&out));
    assert!(
        stderr(&out).contains("found certs/ca.pem but not certs/ca.key"),
        "{}",
        stderr(&out)
    );
    assert_eq!(
        std::fs::read_to_string(certs.join("ca.pem")).unwrap(),
        "old CA\n"
    );
    assert!(!certs.join("ca.key").exists());
}

/// --help exits 0 and lists every option; an unknown option exits 2 and says which.
#[test]
fn help_lists_the_options_and_unknown_options_are_usage_errors() {
    let cwd = TempDir::new().unwrap();
    let help = Command::new(script())
        .current_dir(cwd.path())
        .arg("--help")
        .output()
        .unwrap();
    assert_success(&help);
    let text = stdout(&help);
    for option in [
        "--dir",
        "--pushrelay",
        "--issue-leaf",
        "--relay-ip",
        "--install-trust",
    ] {
        assert!(text.contains(option), "--help does not mention {option}");
    }
    assert!(
        std::fs::read_dir(cwd.path()).unwrap().next().is_none(),
        "--help must not create anything"
    );

    let bad = bootstrap(cwd.path(), &["--frobnicate"]);
    assert_eq!(bad.status.code(), Some(2));
    assert!(
        stderr(&bad).contains("unknown option: --frobnicate"),
        "{}",
        stderr(&bad)
    );
}

/// A --pushrelay path that does not exist is named in the error.
#[test]
fn missing_pushrelay_binary_is_named() {
    let cwd = TempDir::new().unwrap();
    let out = Command::new(script())
        .current_dir(cwd.path())
        .args(["--pushrelay", "/nonexistent/pushrelay"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("--pushrelay /nonexistent/pushrelay: no such file"),
        "{}",
        stderr(&out)
    );
    assert!(!cwd.path().join("certs").exists());
}

/// The CA the script creates carries critical name constraints (the APNs hosts, or --permit);
/// reusing an old CA without them warns.
#[test]
fn the_ca_is_name_constrained_and_an_unconstrained_one_is_warned_about() {
    let Some(openssl) = openssl() else { return };
    let cwd = TempDir::new().unwrap();
    let constraints = |dir: &str| {
        let out = Command::new(openssl)
            .current_dir(cwd.path().join(dir))
            .args(["x509", "-in", "ca.pem", "-noout", "-ext", "nameConstraints"])
            .output()
            .unwrap();
        stdout(&out)
    };
    assert_success(&bootstrap(cwd.path(), &["--dir", "a"]));
    let text = constraints("a");
    assert!(text.contains("critical"), "{text}");
    for host in APNS_HOSTS {
        assert!(
            text.contains(&format!("DNS:{host}")),
            "{host} missing: {text}"
        );
    }
    assert_success(&bootstrap(
        cwd.path(),
        &["--dir", "b", "--permit", "push.example.net"],
    ));
    let text = constraints("b");
    assert!(text.contains("DNS:push.example.net"), "{text}");
    assert!(!text.contains("apple"), "{text}");

    pushrelay::tls::pki::init_dir(&cwd.path().join("old"), false, &[]).unwrap();
    let out = bootstrap(cwd.path(), &["--dir", "old"]);
    assert_success(&out);
    assert!(
        stderr(&out).contains("no name constraints"),
        "{}",
        stderr(&out)
    );
}
