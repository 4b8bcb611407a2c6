//! `pushrelay probe` as an admin runs it: the real binary against a fake APNs origin and an in-test
//! CONNECT proxy on 127.0.0.1, one configuration file per test. No external host is ever contacted:
//! every destination is pinned by connect_to or reached through the test proxy, which maps every
//! name to 127.0.0.1.

mod support;

use std::process::Output;
use std::time::{Duration, Instant};

use support::origin::FakeApns;
use support::pki::TestPki;
use support::proxy::{Behaviour, TestProxy};
use support::relay::{Via, forward_proxy_yaml, pre_proxy_yaml};
use support::tls_echo::TlsEcho;
use support::within;

/// What a probe run printed and how it ended.
struct Probe {
    code: Option<i32>,
    stdout: String,
    stderr: String,
    took: Duration,
}

impl Probe {
    fn all(&self) -> String {
        format!("{}{}", self.stdout, self.stderr)
    }
}

/// Runs `pushrelay probe --config <yaml> [args]` with a clean environment plus `env`.
async fn probe(yaml: &str, args: &[&str], env: &[(&str, &str)]) -> Probe {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("pushrelay.yaml");
    std::fs::write(&file, yaml).unwrap();
    let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_pushrelay"));
    cmd.arg("probe").arg("--config").arg(&file).args(args);
    for (key, _) in std::env::vars() {
        if key.starts_with("PUSHRELAY_") {
            cmd.env_remove(key);
        }
    }
    for key in ["HTTPS_PROXY", "https_proxy", "NO_PROXY", "no_proxy"] {
        cmd.env_remove(key);
    }
    cmd.envs(env.iter().copied()).kill_on_drop(true);
    let start = Instant::now();
    let Output {
        status,
        stdout,
        stderr,
    } = within(30, "pushrelay probe", cmd.output()).await.unwrap();
    Probe {
        code: status.code(),
        stdout: String::from_utf8_lossy(&stdout).into_owned(),
        stderr: String::from_utf8_lossy(&stderr).into_owned(),
        took: start.elapsed(),
    }
}

/// Both APNs destinations, reached directly through connect_to, are OK with the origin's SETTINGS.
#[tokio::test]
async fn direct_with_connect_to_is_ok() {
    let pki = TestPki::new();
    let origin = FakeApns::start(&pki).await;
    let run = probe(&pre_proxy_yaml(&pki, &origin, Via::Direct), &[], &[]).await;
    let out = &run.stdout;
    assert_eq!(run.code, Some(0), "{}", run.all());
    let port = origin.port();
    for host in ["api.push.apple.com", "api.sandbox.push.apple.com"] {
        assert!(out.contains(&format!("{host}:{port}\n")), "{out}");
    }
    assert!(
        out.contains(&format!(
            "connect_to 127.0.0.1:{port} resolves to 127.0.0.1:{port}"
        )),
        "{out}"
    );
    assert!(out.contains("TLSv1.3, ALPN h2"), "{out}");
    assert!(out.contains("subject CN=api.push.apple.com"), "{out}");
    assert_eq!(
        out.matches("max concurrent streams 1000").count(),
        2,
        "{out}"
    );
    assert_eq!(out.matches("round-trip").count(), 2, "{out}");
    assert_eq!(out.matches("verdict   OK").count(), 2, "{out}");
    assert_eq!(origin.connection_count(), 2);
}

/// Through an open CONNECT proxy the proxy's answer is shown and the verdict is OK.
#[tokio::test]
async fn through_open_proxy_shows_the_proxy_answer() {
    let pki = TestPki::new();
    let origin = FakeApns::start(&pki).await;
    let proxy = TestProxy::start(Behaviour::Open).await;
    let yaml = pre_proxy_yaml(&pki, &origin, Via::Proxy(proxy.url()));
    let dest = format!("api.push.apple.com:{}", origin.port());
    let run = probe(&yaml, &[&dest], &[]).await;
    let out = &run.stdout;
    assert_eq!(run.code, Some(0), "{}", run.all());
    assert!(out.contains(&format!("via proxy {}", proxy.url())), "{out}");
    assert!(
        out.contains(&format!("connected to proxy {}", proxy.addr)),
        "{out}"
    );
    assert!(
        out.contains("proxy answered 200 Connection established"),
        "{out}"
    );
    assert!(out.contains("verdict   OK"), "{out}");
    assert!(
        !out.contains("api.sandbox"),
        "only {dest} was asked for: {out}"
    );
    assert_eq!(proxy.tunnel_count(), 1);
    let heads = proxy.heads.lock().unwrap().clone();
    assert!(
        heads[0].starts_with(&format!("CONNECT {dest} ")),
        "{heads:?}"
    );
}

/// HTTPS_PROXY in the environment is followed when the configuration names no proxy.
#[tokio::test]
async fn https_proxy_from_the_environment_is_followed() {
    let pki = TestPki::new();
    let origin = FakeApns::start(&pki).await;
    let proxy = TestProxy::start(Behaviour::Open).await;
    let yaml = pre_proxy_yaml(&pki, &origin, Via::Direct);
    let run = probe(&yaml, &[], &[("HTTPS_PROXY", &proxy.url())]).await;
    assert_eq!(run.code, Some(0), "{}", run.all());
    assert_eq!(run.stdout.matches("via proxy").count(), 2, "{}", run.stdout);
    assert_eq!(proxy.tunnel_count(), 2);
}

/// NO_PROXY sends a matching destination directly even though the proxy never answers.
#[tokio::test]
async fn no_proxy_bypasses_the_proxy() {
    let pki = TestPki::new();
    let origin = FakeApns::start(&pki).await;
    let proxy = TestProxy::start(Behaviour::Silent).await;
    let yaml = pre_proxy_yaml(&pki, &origin, Via::Direct);
    let dest = format!("api.push.apple.com:{}", origin.port());
    let env = [
        ("HTTPS_PROXY", proxy.url()),
        ("NO_PROXY", "api.push.apple.com".to_owned()),
    ];
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let run = probe(&yaml, &[&dest], &env).await;
    assert_eq!(run.code, Some(0), "{}", run.all());
    assert!(
        run.stdout
            .contains("direct (upstream.no_proxy matches api.push.apple.com)"),
        "{}",
        run.stdout
    );
    assert!(proxy.heads.lock().unwrap().is_empty());
}

/// Wrong proxy credentials: 407, the credentials hint, exit 1, and the password is never shown.
#[tokio::test]
async fn wrong_proxy_credentials_get_the_407_hint() {
    let pki = TestPki::new();
    let origin = FakeApns::start(&pki).await;
    let proxy = TestProxy::start(Behaviour::Auth {
        user: "relay".into(),
        pass: "right-password".into(),
    })
    .await;
    let url = proxy.url_with("relay", "Wr0ngPassw0rd");
    let run = probe(&pre_proxy_yaml(&pki, &origin, Via::Proxy(url)), &[], &[]).await;
    let all = run.all();
    assert_eq!(run.code, Some(1), "{all}");
    assert!(
        run.stdout
            .contains("proxy answered 407 Proxy Authentication Required"),
        "{all}"
    );
    assert!(
        run.stdout.contains("check upstream.proxy credentials"),
        "{all}"
    );
    assert_eq!(run.stdout.matches("FAILED at connect").count(), 2, "{all}");
    assert!(run.stdout.contains("relay:***@"), "{all}");
    assert!(!all.contains("Wr0ngPassw0rd"), "password leaked: {all}");
    assert_eq!(origin.connection_count(), 0);
}

/// A proxy that refuses the tunnel gets the ask-the-admin hint naming the target.
#[tokio::test]
async fn forbidding_proxy_gets_the_403_hint() {
    let pki = TestPki::new();
    let origin = FakeApns::start(&pki).await;
    let proxy = TestProxy::start(Behaviour::Forbid).await;
    let yaml = pre_proxy_yaml(&pki, &origin, Via::Proxy(proxy.url()));
    let dest = format!("api.push.apple.com:{}", origin.port());
    let run = probe(&yaml, &[&dest], &[]).await;
    assert_eq!(run.code, Some(1), "{}", run.all());
    assert!(
        run.stdout
            .contains(&format!("ask the proxy admin to allow CONNECT to {dest}")),
        "{}",
        run.stdout
    );
}

/// A proxy that accepts TCP but never answers CONNECT fails within connect_timeout (2s).
#[tokio::test]
async fn silent_proxy_times_out_with_a_hint() {
    let pki = TestPki::new();
    let origin = FakeApns::start(&pki).await;
    let proxy = TestProxy::start(Behaviour::Silent).await;
    let yaml = pre_proxy_yaml(&pki, &origin, Via::Proxy(proxy.url()));
    let dest = format!("api.push.apple.com:{}", origin.port());
    let run = probe(&yaml, &[&dest], &[]).await;
    assert_eq!(run.code, Some(1), "{}", run.all());
    assert!(
        run.took >= Duration::from_secs(2) && run.took < Duration::from_secs(10),
        "took {:?}",
        run.took
    );
    assert!(
        run.stdout
            .contains(&format!("no answer to CONNECT {dest} within 2s")),
        "{}",
        run.stdout
    );
    assert!(
        run.stdout
            .contains("proxy did not answer: is upstream.proxy the right address/port?"),
        "{}",
        run.stdout
    );
    assert!(run.stdout.contains("FAILED at connect"), "{}", run.stdout);
}

/// Without the test CA in extra_roots the origin's certificate is from an unknown CA.
#[tokio::test]
async fn unknown_ca_gets_the_extra_roots_hint() {
    let pki = TestPki::new();
    let origin = FakeApns::start(&pki).await;
    let yaml = pre_proxy_yaml(&pki, &origin, Via::Direct);
    let roots_line = format!("  extra_roots: [\"{}\"]\n", pki.ca_cert.display());
    assert!(yaml.contains(&roots_line), "{yaml}");
    let yaml = yaml.replace(&roots_line, "  extra_roots: []\n");
    let run = probe(&yaml, &[], &[]).await;
    assert_eq!(run.code, Some(1), "{}", run.all());
    assert_eq!(
        run.stdout.matches("certificate issued by an unknown CA: a TLS-inspecting proxy? add its CA to upstream.extra_roots").count(),
        2,
        "{}",
        run.stdout
    );
    assert_eq!(
        run.stdout.matches("FAILED at tls").count(),
        2,
        "{}",
        run.stdout
    );
}

/// A destination whose name the origin's certificate does not carry fails on the name.
#[tokio::test]
async fn certificate_for_another_name_is_called_out() {
    let pki = TestPki::new();
    let origin = FakeApns::start(&pki).await;
    let port = origin.port();
    // Via::Direct's YAML ends inside upstream.connect_to: one more pin goes at the end.
    let yaml = format!(
        "{}    \"push.example.net:{port}\": \"127.0.0.1:{port}\"\n",
        pre_proxy_yaml(&pki, &origin, Via::Direct).replace(
            "destinations:\n",
            &format!("destinations:\n  - \"push.example.net:{port}\"\n")
        )
    );
    let run = probe(&yaml, &[&format!("push.example.net:{port}")], &[]).await;
    assert_eq!(run.code, Some(1), "{}\n{yaml}", run.all());
    assert!(
        run.stdout
            .contains("the certificate is not for push.example.net"),
        "{}",
        run.stdout
    );
}

/// A DESTINATION not in destinations is refused, naming the allowed ones, before any connection.
#[tokio::test]
async fn unknown_destination_names_the_allowed_ones() {
    let pki = TestPki::new();
    let origin = FakeApns::start(&pki).await;
    let yaml = pre_proxy_yaml(&pki, &origin, Via::Direct);
    let run = probe(&yaml, &["fcm.googleapis.com:443"], &[]).await;
    let port = origin.port();
    assert_eq!(run.code, Some(2), "{}", run.all());
    assert!(
        run.stderr
            .contains("\"fcm.googleapis.com:443\" is not in destinations"),
        "{}",
        run.stderr
    );
    assert!(
        run.stderr.contains(&format!(
            "api.push.apple.com:{port}, api.sandbox.push.apple.com:{port}"
        )),
        "{}",
        run.stderr
    );
    assert!(run.stdout.is_empty(), "{}", run.stdout);
    assert_eq!(origin.connection_count(), 0);
}

/// A `tunnels` entry is walked through the proxy up to TLS (its certificate shown), with no
/// HTTP/2 step: what runs inside a blind tunnel is the client's business.
#[tokio::test]
async fn tunnel_is_walked_through_the_proxy_up_to_tls() {
    let pki = TestPki::new();
    let origin = FakeApns::start(&pki).await;
    let fcm = TlsEcho::start().await;
    let proxy = TestProxy::start(Behaviour::Open).await;
    let roots = format!("extra_roots: [\"{}\"]", pki.ca_cert.display());
    let both = format!(
        "extra_roots: [\"{}\", \"{}\"]",
        pki.ca_cert.display(),
        fcm.pki.ca_cert.display()
    );
    let tunnels = format!("tunnels:\n  - \"{}\"\n", fcm.target());
    let yaml = forward_proxy_yaml(&pki, &origin, Via::Proxy(proxy.url()), "", &tunnels)
        .replace(&roots, &both);
    let target = fcm.target();
    let run = probe(&yaml, &[&target], &[]).await;
    let out = &run.stdout;
    assert_eq!(run.code, Some(0), "{}", run.all());
    assert!(
        out.contains(&format!("{target} (tunnel: TCP, CONNECT, TLS)\n")),
        "{out}"
    );
    assert!(
        out.contains("proxy answered 200 Connection established"),
        "{out}"
    );
    assert!(out.contains("subject CN=fcm.googleapis.com"), "{out}");
    assert!(!out.contains("round-trip"), "{out}");
    assert!(out.contains("verdict   OK"), "{out}");
    assert_eq!(fcm.connection_count(), 1);
    let heads = proxy.heads.lock().unwrap().clone();
    assert!(
        heads[0].starts_with(&format!("CONNECT {target} ")),
        "{heads:?}"
    );
}
