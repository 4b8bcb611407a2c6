//! Configuration end to end: shipped files parse, bad values fail naming key, value and source,
//! environment overrides work, and `pushrelay check` never shows a secret.

use std::path::Path;
use std::process::{Command, Output};

fn pushrelay(dir: &Path, args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_pushrelay"));
    cmd.args(args).current_dir(dir).env_remove("RUST_LOG");
    for (k, _) in std::env::vars() {
        if k.starts_with("PUSHRELAY_")
            || k.eq_ignore_ascii_case("https_proxy")
            || k.eq_ignore_ascii_case("no_proxy")
        {
            cmd.env_remove(k);
        }
    }
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output().unwrap()
}

fn text(out: &Output) -> (String, String) {
    (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// A directory with a CA in certs/, so configs that name certs/ca.pem are valid there.
fn dir_with_ca() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    pushrelay::tls::pki::init_dir(&dir.path().join("certs"), false, &[]).unwrap();
    dir
}

/// config.example.yaml, which documents every key, is a valid configuration.
#[test]
fn example_config_is_valid() {
    let dir = dir_with_ca();
    let example = Path::new(env!("CARGO_MANIFEST_DIR")).join("config.example.yaml");
    let out = pushrelay(
        dir.path(),
        &["check", "--config", example.to_str().unwrap()],
        &[],
    );
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "{stderr}");
    assert!(
        stdout.contains("api.development.push.apple.com:443"),
        "{stdout}"
    );
    assert!(stderr.contains("configuration is valid"));
}

/// Built-in defaults are valid where the default CA exists.
#[test]
fn defaults_are_valid() {
    let dir = dir_with_ca();
    let out = pushrelay(dir.path(), &["check"], &[]);
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "{stderr}");
    assert!(stdout.contains("127.0.0.1:8443"), "{stdout}");
}

/// Each bad value stops start-up with the key, the value and where it came from.
#[test]
fn bad_values_name_key_value_and_file() {
    let dir = dir_with_ca();
    let table = [
        (
            "listeners:\n  - {name: a, mode: pre-proxy, bind: 127.0.0.1:1, tls: {ca_cert: certs/ca.pem, ca_key: certs/ca.key}, colour: red}\n",
            "listeners.0.colour",
            "colour",
        ),
        (
            "listeners:\n  - {name: a, mode: sideways, bind: 127.0.0.1:1}\n",
            "listeners.0.mode",
            "sideways",
        ),
        (
            "listeners:\n  - {name: a, mode: post-proxy, bind: nowhere}\n",
            "listeners.0.bind",
            "nowhere",
        ),
        (
            "listeners:\n  - {name: a, mode: post-proxy, bind: 127.0.0.1:1, allow_sources: [127.0.0.0/33]}\n",
            "listeners.0.allow_sources",
            "127.0.0.0/33",
        ),
        (
            "upstream:\n  connect_timeout: 10\n",
            "upstream.connect_timeout",
            "10",
        ),
        (
            "upstream:\n  request_timeout: soon\n",
            "upstream.request_timeout",
            "soon",
        ),
        (
            "upstream:\n  proxy: https://proxy:3128\n",
            "upstream.proxy",
            "https",
        ),
        (
            "destinations: [api.push.apple.com]\n",
            "destinations",
            "api.push.apple.com",
        ),
        (
            "listeners:\n  - {name: a, mode: pre-proxy, bind: 127.0.0.1:1, tls: {ca_cert: certs/missing.pem, ca_key: certs/ca.key}}\n",
            "listeners[0].tls.ca_cert",
            "certs/missing.pem",
        ),
        (
            "listeners:\n  - {name: a, mode: pre-proxy, bind: 127.0.0.1:1}\n",
            "listeners[0].tls",
            "pre-proxy",
        ),
        (
            "upstream:\n  extra_roots: [nothere.pem]\n",
            "upstream.extra_roots[0]",
            "nothere.pem",
        ),
        ("log:\n  format: xml\n", "log.format", "xml"),
        (
            "upstream:\n  http2_client: nghttp2\n",
            "upstream.http2_client",
            "nghttp2",
        ),
    ];
    for (yaml, key, value) in table {
        let file = dir.path().join("bad.yaml");
        std::fs::write(&file, yaml).unwrap();
        let out = pushrelay(dir.path(), &["check", "--config", "bad.yaml"], &[]);
        let (_, stderr) = text(&out);
        assert_eq!(out.status.code(), Some(2), "{yaml}: {stderr}");
        assert!(
            stderr.contains(key),
            "{yaml}: key {key} not named in: {stderr}"
        );
        assert!(
            stderr.contains(value),
            "{yaml}: value {value} not named in: {stderr}"
        );
        assert!(
            stderr.contains("bad.yaml"),
            "{yaml}: file not named in: {stderr}"
        );
    }
}

/// A missing --config file is an error, not silently the defaults.
#[test]
fn missing_config_file_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let out = pushrelay(dir.path(), &["check", "--config", "nope.yaml"], &[]);
    let (_, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr.contains("nope.yaml"), "{stderr}");
}

/// PUSHRELAY_SECTION__KEY overrides the file; a bad override names the variable.
#[test]
fn environment_overrides_work_and_are_named_when_wrong() {
    let dir = dir_with_ca();
    let out = pushrelay(
        dir.path(),
        &["check"],
        &[
            ("PUSHRELAY_UPSTREAM__CONNECT_TIMEOUT", "3s"),
            ("PUSHRELAY_LOG__FORMAT", "json"),
        ],
    );
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "{stderr}");
    assert!(stdout.contains("connect_timeout: 3s"), "{stdout}");
    assert!(stdout.contains("format: json"), "{stdout}");

    let out = pushrelay(
        dir.path(),
        &["check"],
        &[("PUSHRELAY_UPSTREAM__CONNECT_TIMEOUT", "soon")],
    );
    let (_, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr.contains("upstream.connect_timeout"), "{stderr}");
    assert!(stderr.contains("soon"), "{stderr}");
    assert!(
        stderr.contains("PUSHRELAY_UPSTREAM__CONNECT_TIMEOUT"),
        "{stderr}"
    );
}

/// HTTPS_PROXY is the upstream proxy when the configuration names none.
#[test]
fn https_proxy_environment_is_honoured() {
    let dir = dir_with_ca();
    let out = pushrelay(
        dir.path(),
        &["check"],
        &[
            (
                "HTTPS_PROXY",
                "http://envuser:envpass@proxy.corp.example:3128",
            ),
            ("NO_PROXY", ".internal"),
        ],
    );
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "{stderr}");
    assert!(
        stdout.contains("http://envuser:***@proxy.corp.example:3128"),
        "{stdout}"
    );
    assert!(stdout.contains(".internal"), "{stdout}");
    assert!(!stdout.contains("envpass") && !stderr.contains("envpass"));
}

/// `check` masks the proxy password, from the file and from the environment.
#[test]
fn check_never_prints_secrets() {
    let dir = dir_with_ca();
    std::fs::write(
        dir.path().join("c.yaml"),
        "upstream:\n  proxy: http://relay:Sup3rS3cret@proxy:3128\n",
    )
    .unwrap();
    let out = pushrelay(dir.path(), &["check", "--config", "c.yaml"], &[]);
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "{stderr}");
    assert!(stdout.contains("http://relay:***@proxy:3128"), "{stdout}");
    assert!(!stdout.contains("Sup3rS3cret") && !stderr.contains("Sup3rS3cret"));

    let out = pushrelay(
        dir.path(),
        &["check"],
        &[("PUSHRELAY_UPSTREAM__PROXY", "socks5://u:EnvS3cret@p:1")],
    );
    let (stdout, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        !stdout.contains("EnvS3cret") && !stderr.contains("EnvS3cret"),
        "{stderr}"
    );
}

/// A key file that holds no key is named as such, with its config key.
#[test]
fn unreadable_key_is_named() {
    let dir = dir_with_ca();
    std::fs::write(dir.path().join("certs/broken.key"), "not a key\n").unwrap();
    std::fs::write(
        dir.path().join("c.yaml"),
        "listeners:\n  - {name: a, mode: pre-proxy, bind: 127.0.0.1:1, tls: {ca_cert: certs/ca.pem, ca_key: certs/broken.key}}\n",
    )
    .unwrap();
    let out = pushrelay(dir.path(), &["check", "--config", "c.yaml"], &[]);
    let (_, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr.contains("listeners[0].tls.ca_key") && stderr.contains("broken.key"),
        "{stderr}"
    );
    assert!(
        !stderr.contains("not a key"),
        "key file contents must not be echoed"
    );
}

/// `--help` explains the commands.
#[test]
fn help_explains_itself() {
    let dir = tempfile::tempdir().unwrap();
    let (stdout, _) = text(&pushrelay(dir.path(), &["--help"], &[]));
    for word in ["serve", "check", "ca", "pre-proxy", "post-proxy"] {
        assert!(
            stdout.contains(word),
            "{word} missing from --help: {stdout}"
        );
    }
}

/// Durations have an upper bound: an absurd timeout, which would overflow deadline arithmetic on
/// the request path, is refused naming the key and the value.
#[test]
fn absurd_durations_are_refused() {
    let dir = dir_with_ca();
    for (var, key) in [
        (
            "PUSHRELAY_UPSTREAM__REQUEST_TIMEOUT",
            "upstream.request_timeout",
        ),
        (
            "PUSHRELAY_UPSTREAM__CONNECT_TIMEOUT",
            "upstream.connect_timeout",
        ),
        (
            "PUSHRELAY_UPSTREAM__KEEPALIVE_INTERVAL",
            "upstream.keepalive_interval",
        ),
        ("PUSHRELAY_LIMITS__IDLE_TIMEOUT", "limits.idle_timeout"),
        (
            "PUSHRELAY_LIMITS__HANDSHAKE_TIMEOUT",
            "limits.handshake_timeout",
        ),
        ("PUSHRELAY_SHUTDOWN_GRACE", "shutdown_grace"),
    ] {
        let out = pushrelay(dir.path(), &["check"], &[(var, "5124095576030431h")]);
        let (_, stderr) = text(&out);
        assert_eq!(out.status.code(), Some(2), "{var}: {stderr}");
        assert!(
            stderr.contains(key) && stderr.contains("24h"),
            "{var}: {stderr}"
        );
    }
    let out = pushrelay(
        dir.path(),
        &["check"],
        &[("PUSHRELAY_UPSTREAM__REQUEST_TIMEOUT", "24h")],
    );
    assert!(out.status.success(), "24h itself is fine: {:?}", text(&out));
}

/// Identity bindings are checked: a listener name that does not exist, or client subjects on a
/// listener without client certificates, is an error naming the key; no binding is a warning.
#[test]
fn identity_bindings_are_validated() {
    let dir = dir_with_ca();
    std::fs::write(dir.path().join("app.pem"), "x").unwrap();
    std::fs::write(dir.path().join("app.key"), "x").unwrap();
    let listener = "listeners:\n  - {name: legacy, mode: post-proxy, bind: \"127.0.0.1:1\", allow_sources: [\"127.0.0.1/32\"]}\n";
    for (identity, expect, ok) in [
        (
            "listeners: [nope]",
            "upstream.identities[0].listeners",
            false,
        ),
        (
            "listeners: [legacy], client_subjects: [corp]",
            "upstream.identities[0].client_subjects",
            false,
        ),
        ("listeners: []", "names no listeners", true),
    ] {
        let yaml = format!(
            "{listener}upstream:\n  identities:\n    - {{topic: com.example.app, cert: app.pem, key: app.key, {identity}}}\n"
        );
        std::fs::write(dir.path().join("c.yaml"), yaml).unwrap();
        let out = pushrelay(dir.path(), &["check", "--config", "c.yaml"], &[]);
        let (_, stderr) = text(&out);
        assert!(stderr.contains(expect), "{identity}: {stderr}");
        if !ok {
            assert_eq!(out.status.code(), Some(2), "{identity}: {stderr}");
        }
    }
}

/// `upstream.relay` (a relay chain) is checked before anything runs: the secret file readable
/// and non-empty, the URL's scheme; `http://` is warned about; a pre-proxy listener cannot take
/// a relay secret; `check` shows the secret file's name but never the secret.
#[test]
fn relay_chain_keys_are_validated_and_the_secret_never_shown() {
    let dir = dir_with_ca();
    let listener = "listeners:\n  - name: apns\n    mode: pre-proxy\n    bind: 127.0.0.1:0\n    tls: {ca_cert: certs/ca.pem, ca_key: certs/ca.key}\n    allow_sources: [127.0.0.1/32]\n";
    std::fs::write(
        dir.path().join("relay.secret"),
        "s3cret-s3cret-s3cret-s3cret\n",
    )
    .unwrap();
    std::fs::write(dir.path().join("empty.secret"), "\n").unwrap();
    let check = |yaml: &str| {
        std::fs::write(dir.path().join("c.yaml"), yaml).unwrap();
        let out = pushrelay(dir.path(), &["check", "--config", "c.yaml"], &[]);
        let (stdout, stderr) = text(&out);
        (out.status.success(), format!("{stdout}{stderr}"))
    };
    let with_relay = |relay: &str| format!("{listener}upstream:\n  relay: {relay}\n");

    let (ok, out) = check(&with_relay(
        "{url: \"https://dmz.corp.example:8443\", secret_file: relay.secret}",
    ));
    assert!(ok, "{out}");
    assert!(
        out.contains("https://dmz.corp.example:8443") && out.contains("relay.secret"),
        "{out}"
    );
    assert!(!out.contains("s3cret"), "the secret was shown: {out}");
    assert!(!out.contains("in clear"), "{out}");

    let (ok, out) = check(&with_relay(
        "{url: \"http://dmz.corp.example:8080\", secret_file: relay.secret}",
    ));
    assert!(ok, "{out}");
    assert!(
        out.contains("warning: upstream.relay.url http://dmz.corp.example:8080 is plain http://"),
        "{out}"
    );
    assert!(out.contains("in clear"), "{out}");

    let table = [
        (
            "{url: \"https://dmz:8443\", secret_file: missing.secret}",
            "upstream.relay.secret_file",
            "cannot read missing.secret",
        ),
        (
            "{url: \"https://dmz:8443\", secret_file: empty.secret}",
            "upstream.relay.secret_file",
            "is empty",
        ),
        (
            "{url: \"ftp://dmz:21\", secret_file: relay.secret}",
            "upstream.relay",
            "must start with https://",
        ),
        (
            "{url: \"https://dmz:8443/path\", secret_file: relay.secret}",
            "upstream.relay",
            "must not have a path",
        ),
        (
            "{url: \"https://dmz:0\", secret_file: relay.secret}",
            "upstream.relay",
            "invalid host or port",
        ),
    ];
    for (relay, key, message) in table {
        let (ok, out) = check(&with_relay(relay));
        assert!(!ok, "{relay}: accepted\n{out}");
        assert!(
            out.contains(key) && out.contains(message),
            "{relay}:\n{out}"
        );
    }

    let pre_with_secret = listener.replace(
        "    allow_sources",
        "    relay_secret_file: relay.secret\n    allow_sources",
    );
    let (ok, out) = check(&pre_with_secret);
    assert!(!ok);
    assert!(
        out.contains("listeners[0].relay_secret_file")
            && out.contains("only a post-proxy listener"),
        "{out}"
    );
}

/// The inside relay's client certificate towards its DMZ relay: accepted alone over https://,
/// warned about over http:// (there is no handshake to present it in), its key required with it,
/// and an inside relay known by neither a secret nor a certificate refused.
#[test]
fn relay_chain_client_certificate_keys_are_validated() {
    let dir = dir_with_ca();
    let listener = "listeners:\n  - name: apns\n    mode: pre-proxy\n    bind: 127.0.0.1:0\n    tls: {ca_cert: certs/ca.pem, ca_key: certs/ca.key}\n    allow_sources: [127.0.0.1/32]\n";
    std::fs::write(
        dir.path().join("relay.secret"),
        "s3cret-s3cret-s3cret-s3cret\n",
    )
    .unwrap();
    let check = |relay: &str| {
        let yaml = format!("{listener}upstream:\n  relay: {relay}\n");
        std::fs::write(dir.path().join("c.yaml"), yaml).unwrap();
        let out = pushrelay(dir.path(), &["check", "--config", "c.yaml"], &[]);
        let (stdout, stderr) = text(&out);
        (out.status.success(), format!("{stdout}{stderr}"))
    };
    let cert = "client_cert: certs/ca.pem, client_key: certs/ca.key";

    let (ok, out) = check(&format!("{{url: \"https://dmz:8443\", {cert}}}"));
    assert!(ok, "{out}");
    assert!(out.contains("client_cert: certs/ca.pem"), "{out}");
    assert!(!out.contains("not used"), "{out}");

    let (ok, out) = check(&format!(
        "{{url: \"http://dmz:8080\", secret_file: relay.secret, {cert}}}"
    ));
    assert!(ok, "{out}");
    assert!(
        out.contains("warning: upstream.relay.client_cert is set but upstream.relay.url http://dmz:8080 is plain http://")
            && out.contains("not used"),
        "{out}"
    );

    let table = [
        (
            "{url: \"https://dmz:8443\", client_cert: certs/ca.pem}".to_owned(),
            "upstream.relay.client_key",
            "client_cert needs its client_key",
        ),
        (
            "{url: \"https://dmz:8443\", client_cert: missing.pem, client_key: certs/ca.key}"
                .to_owned(),
            "upstream.relay.client_cert",
            "cannot read missing.pem",
        ),
        (
            "{url: \"https://dmz:8443\"}".to_owned(),
            "upstream.relay.secret_file",
            "the DMZ relay must know the inside relay",
        ),
        (
            format!("{{url: \"http://dmz:8080\", {cert}}}"),
            "upstream.relay.secret_file",
            "the DMZ relay must know the inside relay",
        ),
    ];
    for (relay, key, message) in table {
        let (ok, out) = check(&relay);
        assert!(!ok, "{relay}: accepted\n{out}");
        assert!(
            out.contains(key) && out.contains(message),
            "{relay}:\n{out}"
        );
    }
}

/// forward-proxy mistakes stop start-up naming the key: a tunnel that is also a destination, a
/// tunnel without a port, proxy_auth on another door or with an unreadable or malformed users
/// file, a forward-proxy listener without tls; and `check` shows the door, never a password.
#[test]
fn forward_proxy_config_mistakes_are_named_and_check_shows_the_door() {
    let dir = dir_with_ca();
    std::fs::write(dir.path().join("users"), "mpns:pa55word\n").unwrap();
    std::fs::write(dir.path().join("bad-users"), "mpns:pa55word\njust-a-name\n").unwrap();
    let door = |extra: &str| {
        format!(
            "listeners:\n  - {{name: f, mode: forward-proxy, bind: 127.0.0.1:1, tls: {{ca_cert: certs/ca.pem, ca_key: certs/ca.key}}, allow_sources: [127.0.0.1/32]{extra}}}\n"
        )
    };
    let table = [
        (
            format!("{}tunnels: [api.push.apple.com:443]\n", door("")),
            "tunnels[0]",
            "also in destinations",
        ),
        (
            format!("{}tunnels: [fcm.googleapis.com]\n", door("")),
            "tunnels",
            "has no port",
        ),
        (
            format!(
                "{}tunnels: [fcm.googleapis.com:443, fcm.googleapis.com:443]\n",
                door("")
            ),
            "tunnels[1]",
            "listed twice",
        ),
        (
            door(", proxy_auth: {users_file: nothere}"),
            "listeners[0].proxy_auth.users_file",
            "nothere",
        ),
        (
            door(", proxy_auth: {users_file: bad-users}"),
            "listeners[0].proxy_auth.users_file",
            "line 2: expected user:password",
        ),
        (
            "listeners:\n  - {name: p, mode: post-proxy, bind: 127.0.0.1:1, proxy_auth: {users_file: users}}\n".into(),
            "listeners[0].proxy_auth",
            "only a forward-proxy listener",
        ),
        (
            "listeners:\n  - {name: f, mode: forward-proxy, bind: 127.0.0.1:1}\n".into(),
            "listeners[0].tls",
            "forward-proxy listener needs tls",
        ),
        (
            format!("{}limits: {{max_tunnels_per_source: 0}}\n", door("")),
            "limits.max_tunnels_per_source",
            "at least 1",
        ),
    ];
    for (yaml, key, message) in table {
        std::fs::write(dir.path().join("bad.yaml"), &yaml).unwrap();
        let out = pushrelay(dir.path(), &["check", "--config", "bad.yaml"], &[]);
        let (_, stderr) = text(&out);
        assert_eq!(out.status.code(), Some(2), "{yaml}: {stderr}");
        assert!(stderr.contains(key), "{yaml}: key {key} not in: {stderr}");
        assert!(
            stderr.contains(message),
            "{yaml}: {message:?} not in: {stderr}"
        );
        assert!(
            !stderr.contains("pa55word"),
            "{yaml}: password leaked: {stderr}"
        );
    }

    let good = format!(
        "{}tunnels: [fcm.googleapis.com:443]\n",
        door(", proxy_auth: {users_file: users}")
    );
    std::fs::write(dir.path().join("good.yaml"), good).unwrap();
    let out = pushrelay(dir.path(), &["check", "--config", "good.yaml"], &[]);
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "{stderr}");
    assert!(stdout.contains("mode: forward-proxy"), "{stdout}");
    assert!(stdout.contains("fcm.googleapis.com:443"), "{stdout}");
    assert!(stdout.contains("users_file: users"), "{stdout}");
    assert!(!stdout.contains("pa55word") && !stderr.contains("pa55word"));
}
