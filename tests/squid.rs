//! End to end with real programs instead of in-test fixtures: a real Squid as the corporate CONNECT
//! proxy (open, and with Basic auth), curl as the APNs client (ALPN h2, and no ALPN with prior
//! knowledge), and the /etc/hosts override done for real inside a network namespace. Everything
//! stays on loopback addresses; nothing contacts Apple or any other outside host.
//!
//! A missing program (squid, htpasswd, curl, ip) or a machine where namespaces cannot be made skips
//! a test with a SKIP note, except under CI=true, where it fails.

mod support;

#[path = "squid/host_tools.rs"]
mod host_tools;
#[path = "squid/netns.rs"]
mod netns;
#[path = "squid/relay_at.rs"]
mod relay_at;
#[path = "squid/squid_proxy.rs"]
mod squid_proxy;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Output;

use bytes::Bytes;
use http::StatusCode;
use squid_proxy::{BasicAuth, Forward, Squid, SquidOptions};
use support::client::{Answer, H2Client, push_request};
use support::origin::{APNS_HOSTS, FakeApns};
use support::pki::TestPki;
use support::relay::{self, Via};
use support::tls_echo::TlsEcho;
use support::{token, within};
use tokio::runtime::Runtime;

const PAYLOAD: &str = r#"{"aps":{"alert":{"title":"Hi","body":"Through Squid"}},"ack_id":"s1"}"#;
const APNS_ID: &str = "7f1e2d3c-4b5a-4c6d-8e7f-0123456789ab";
const USER: &str = "relay";
const PASS: &str = "s3cret-Pw";

/// The fake origin on a runtime of its own, so the relay's runtime can end while the origin lives:
/// Squid must know the origin's port before it starts (it tunnels to that port only).
struct Origin {
    apns: FakeApns,
    _runtime: Runtime,
}

impl Origin {
    fn start(pki: &TestPki) -> Origin {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let apns = runtime.block_on(FakeApns::start(pki));
        Origin {
            apns,
            _runtime: runtime,
        }
    }
}

/// Pushes once (every apns-* header, an apns-id) through a pre-proxy relay whose upstream proxy is
/// `proxy_url`, then ends the relay's runtime. That closes the relay's pooled upstream connection,
/// so Squid closes the tunnel and writes its access log line.
fn push_through(pki: &TestPki, origin: &Origin, proxy_url: String) -> Answer {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let answer = runtime.block_on(async {
        let yaml = relay::pre_proxy_yaml(pki, &origin.apns, Via::Proxy(proxy_url));
        let relay = relay::start(&yaml).await;
        let client = H2Client::connect(pki, relay.addr()).await;
        let mut req = push_request("api.push.apple.com", &token(1));
        req.headers_mut()
            .insert("apns-id", APNS_ID.parse().unwrap());
        let answer = within(
            20,
            "push through squid",
            client.send(req, Bytes::from(PAYLOAD)),
        )
        .await
        .unwrap();
        relay.stop().await;
        answer
    });
    drop(runtime);
    answer
}

fn basic_auth() -> Option<BasicAuth> {
    Some(BasicAuth {
        helper: host_tools::require("basic_ncsa_auth", "squid")?,
        htpasswd: host_tools::require("htpasswd", "apache2-utils")?,
        user: USER.into(),
        pass: PASS.into(),
    })
}

/// A push through a real Squid arrives unaltered, and Squid's access log shows the CONNECT tunnel.
#[test]
fn push_through_real_squid_arrives_unaltered_and_squid_logs_the_tunnel() {
    let Some(squid_bin) = host_tools::require("squid", "squid") else {
        return;
    };
    let pki = TestPki::new();
    let origin = Origin::start(&pki);
    let squid = Squid::start(
        &squid_bin,
        &SquidOptions {
            forward: Forward::Tunnel(origin.apns.port()),
            basic_auth: None,
        },
    );

    let answer = push_through(&pki, &origin, squid.url());
    assert_eq!(answer.status, StatusCode::OK, "{}", squid.logs());
    assert_eq!(answer.headers["apns-id"], APNS_ID);
    assert!(answer.body.is_empty());

    let received = origin.apns.received();
    assert_eq!(received.len(), 1, "{}", squid.logs());
    let got = &received[0];
    assert_eq!(got.path, format!("/3/device/{}", token(1)));
    assert_eq!(got.authority.as_deref(), Some("api.push.apple.com"));
    assert_eq!(got.body, PAYLOAD.as_bytes());
    let sent = push_request("api.push.apple.com", &token(1));
    for (name, value) in sent.headers() {
        assert_eq!(got.headers.get(name), Some(value), "header {name}");
    }
    assert_eq!(got.headers["apns-id"], APNS_ID);
    assert!(got.headers.get("host").is_none());

    let connect = format!("CONNECT api.push.apple.com:{}", origin.apns.port());
    let line = squid.wait_for_access_line("the tunnel", |l| l.contains(&connect));
    assert!(line.contains("TCP_TUNNEL/200"), "{line}");
    assert!(line.contains("HIER_DIRECT/127.0.0.1"), "{line}");
}

/// With Basic auth in Squid, the right credentials open the tunnel, and Squid logs the user.
#[test]
fn squid_basic_auth_with_right_credentials_reaches_the_origin() {
    let Some(squid_bin) = host_tools::require("squid", "squid") else {
        return;
    };
    let Some(auth) = basic_auth() else { return };
    let pki = TestPki::new();
    let origin = Origin::start(&pki);
    let squid = Squid::start(
        &squid_bin,
        &SquidOptions {
            forward: Forward::Tunnel(origin.apns.port()),
            basic_auth: Some(auth),
        },
    );

    let answer = push_through(&pki, &origin, squid.url_with(USER, PASS));
    assert_eq!(answer.status, StatusCode::OK, "{}", squid.logs());
    assert_eq!(origin.apns.received().len(), 1);

    let connect = format!("CONNECT api.push.apple.com:{}", origin.apns.port());
    let line = squid.wait_for_access_line("the authenticated tunnel", |l| {
        l.contains(&connect) && l.contains("TCP_TUNNEL/200")
    });
    assert!(line.contains(&format!(" {USER} ")), "user missing: {line}");
}

/// Squid's 407 for wrong credentials becomes 502 RelayProxyAuthenticationRequired; nothing is sent.
#[test]
fn squid_407_for_wrong_credentials_becomes_502_proxy_authentication_required() {
    let Some(squid_bin) = host_tools::require("squid", "squid") else {
        return;
    };
    let Some(auth) = basic_auth() else { return };
    let pki = TestPki::new();
    let origin = Origin::start(&pki);
    let squid = Squid::start(
        &squid_bin,
        &SquidOptions {
            forward: Forward::Tunnel(origin.apns.port()),
            basic_auth: Some(auth),
        },
    );

    let answer = push_through(&pki, &origin, squid.url_with(USER, "wrong-password"));
    assert_eq!(answer.status, StatusCode::BAD_GATEWAY, "{}", squid.logs());
    assert_eq!(
        answer.reason().as_deref(),
        Some("RelayProxyAuthenticationRequired")
    );
    assert!(origin.apns.received().is_empty());
    let line = squid.wait_for_access_line("the refused CONNECT", |l| l.contains("CONNECT "));
    assert!(line.contains("TCP_DENIED/407"), "{line}");
}

/// curl's answer: the status line, the headers with lower-case names, and the body.
struct CurlAnswer {
    status_line: String,
    headers: HashMap<String, String>,
    body: String,
}

fn parse_curl(out: &Output) -> CurlAnswer {
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "curl failed ({}):\n{text}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let mut lines = text.lines();
    let status_line = lines.next().unwrap_or_default().trim().to_owned();
    let headers = lines
        .take_while(|l| !l.trim().is_empty())
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, body)| body.to_owned())
        .unwrap_or_default();
    CurlAnswer {
        status_line,
        headers,
        body,
    }
}

/// curl arguments for one push to `url`, trusting only `ca`, never using a proxy.
fn curl_push_args(ca: &Path, url: &str) -> Vec<String> {
    [
        "--silent",
        "--show-error",
        "--include",
        "--noproxy",
        "*",
        "--max-time",
        "15",
        "--cacert",
    ]
    .iter()
    .map(|s| s.to_string())
    .chain([ca.display().to_string(), url.to_owned()])
    .chain(
        [
            "-H",
            "apns-topic: com.example.app",
            "-H",
            "apns-push-type: alert",
            "-H",
            "apns-priority: 10",
            "--data-binary",
            PAYLOAD,
        ]
        .iter()
        .map(|s| s.to_string()),
    )
    .collect()
}

async fn run_curl(mut cmd: tokio::process::Command) -> Output {
    cmd.kill_on_drop(true)
        .env_remove("https_proxy")
        .env_remove("HTTPS_PROXY")
        .env_remove("all_proxy")
        .env_remove("ALL_PROXY");
    within(30, "curl", cmd.output()).await.unwrap()
}

/// curl with `--http2` (ALPN h2) or `--http2-prior-knowledge --no-alpn` pushes through the relay.
async fn curl_pushes(curl: PathBuf, extra: &[&str]) {
    let pki = TestPki::new();
    let origin = FakeApns::start(&pki).await;
    let relay = relay::start(&relay::pre_proxy_yaml(&pki, &origin, Via::Direct)).await;
    let port = relay.addr().port();
    let url = format!("https://api.push.apple.com:{port}/3/device/{}", token(2));

    let mut cmd = tokio::process::Command::new(curl);
    cmd.args(extra)
        .arg("--resolve")
        .arg(format!("api.push.apple.com:{port}:127.0.0.1"))
        .args(curl_push_args(&pki.ca_cert, &url));
    let answer = parse_curl(&run_curl(cmd).await);

    assert_eq!(answer.status_line, "HTTP/2 200");
    let apns_id = answer
        .headers
        .get("apns-id")
        .expect("apns-id in the answer");
    assert_eq!(apns_id.len(), 36, "{apns_id}");
    let received = origin.received();
    assert_eq!(received.len(), 1);
    assert_eq!(received[0].path, format!("/3/device/{}", token(2)));
    assert_eq!(received[0].headers["apns-topic"], "com.example.app");
    assert_eq!(received[0].body, PAYLOAD.as_bytes());
    relay.stop().await;
}

/// curl --http2 (ALPN h2, :authority with the port) gets 200 with an apns-id from the origin.
#[tokio::test]
async fn curl_with_alpn_h2_pushes_through_the_relay() {
    let Some(curl) = host_tools::require("curl", "curl") else {
        return;
    };
    curl_pushes(curl, &["--http2"]).await;
}

/// curl --http2-prior-knowledge --no-alpn (HTTP/2 without ALPN, as pushy does) gets 200 too.
#[tokio::test]
async fn curl_without_alpn_with_prior_knowledge_pushes_through_the_relay() {
    let Some(curl) = host_tools::require("curl", "curl") else {
        return;
    };
    curl_pushes(curl, &["--http2-prior-knowledge", "--no-alpn"]).await;
}

/// In a namespace whose /etc/hosts names the relay, curl on port 443 reaches the origin via the relay.
#[tokio::test]
async fn hosts_override_in_a_namespace_sends_curl_to_the_relay_on_443() {
    let Some(curl) = host_tools::require("curl", "curl") else {
        return;
    };
    let Some(ip) = host_tools::require("ip", "iproute2") else {
        return;
    };
    let ns = match netns::Netns::create(&ip, &APNS_HOSTS) {
        Ok(ns) => ns,
        Err(why) => {
            host_tools::skip(&format!(
                "cannot set up a network namespace (needs root): {why}"
            ));
            return;
        }
    };

    let pki = TestPki::new();
    let origin = FakeApns::start(&pki).await;
    let socket = tokio::net::TcpListener::bind((ns.host_addr, 443))
        .await
        .unwrap_or_else(|e| panic!("bind {}:443: {e}", ns.host_addr));
    let default_sources = r#"allow_sources: ["127.0.0.1/32"]"#;
    let yaml = relay::pre_proxy_yaml(&pki, &origin, Via::Direct);
    assert!(yaml.contains(default_sources), "{yaml}");
    let yaml = yaml.replace(
        default_sources,
        &format!(r#"allow_sources: ["{}/32"]"#, ns.ns_addr),
    );
    let relay = relay_at::RelayAt::start(&yaml, socket);

    let mut cmd = ns.exec(curl.to_str().unwrap());
    cmd.args(curl_push_args(
        &pki.ca_cert,
        &format!("https://api.push.apple.com/3/device/{}", token(3)),
    ));
    let answer = parse_curl(&run_curl(cmd).await);

    assert_eq!(answer.status_line, "HTTP/2 200");
    assert!(answer.headers.contains_key("apns-id"));
    let received = origin.received();
    assert_eq!(received.len(), 1);
    assert_eq!(received[0].path, format!("/3/device/{}", token(3)));
    assert_eq!(received[0].authority.as_deref(), Some("api.push.apple.com"));
    relay.stop().await;
    drop(ns);
}

/// The post-proxy path: a real Squid as the legacy proxy, with pushrelay (post-proxy listener, in
/// this process) as its only parent, and the fake origin behind pushrelay. The runtime is
/// multi-threaded so the relay and the origin keep serving while the test thread waits on Squid
/// and curl.
struct LegacyPath {
    squid: Squid,
    relay: relay::RunningRelay,
    origin: FakeApns,
    runtime: Runtime,
    curl: PathBuf,
    _pki: TestPki,
}

impl LegacyPath {
    /// None after a SKIP note when squid or curl is missing.
    fn start() -> Option<LegacyPath> {
        let squid_bin = host_tools::require("squid", "squid")?;
        let curl = host_tools::require("curl", "curl")?;
        let pki = TestPki::new();
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let (origin, relay) = runtime.block_on(async {
            let origin = FakeApns::start(&pki).await;
            let relay = relay::start(&relay::post_proxy_yaml(&pki, &origin, "")).await;
            (origin, relay)
        });
        let squid = Squid::start(
            &squid_bin,
            &SquidOptions {
                forward: Forward::Parent {
                    parent_port: relay.addr().port(),
                    // 80: URLs without a port, as a push server configured for plain HTTP writes them.
                    dest_ports: vec![80, origin.port()],
                },
                basic_auth: None,
            },
        );
        Some(LegacyPath {
            squid,
            relay,
            origin,
            runtime,
            curl,
            _pki: pki,
        })
    }

    /// One push with curl over HTTP/1.1 through Squid (`-x`), as a push server behind the legacy
    /// proxy sends it.
    fn curl_push(&self, url: &str) -> CurlAnswer {
        let mut cmd = tokio::process::Command::new(&self.curl);
        cmd.args([
            "--silent",
            "--show-error",
            "--include",
            "--http1.1",
            "--max-time",
            "15",
            "--proxy",
            &self.squid.url(),
            // Overrides any no_proxy in the environment: this request must go through Squid.
            "--noproxy",
            "",
            url,
            "-H",
            "apns-topic: com.example.app",
            "-H",
            "apns-push-type: alert",
            "-H",
            "apns-priority: 10",
            "-H",
            "apns-expiration: 0",
            "-H",
            &format!("apns-id: {APNS_ID}"),
            "-H",
            "authorization: bearer eyJhbGciOiJFUzI1NiJ9.eyJpc3MiOiJERUYxMjMifQ.c2ln",
            "-H",
            "content-type: application/json",
            "--data-binary",
            PAYLOAD,
        ])
        .env_remove("http_proxy")
        .env_remove("HTTP_PROXY");
        parse_curl(&self.runtime.block_on(run_curl(cmd)))
    }

    fn stop(self) {
        let LegacyPath {
            squid,
            relay,
            origin,
            runtime,
            ..
        } = self;
        drop(squid);
        runtime.block_on(relay.stop());
        drop(origin);
    }
}

/// post-proxy behind Squid as the legacy proxy: curl speaks HTTP/1.1 to Squid, Squid hands the
/// request to pushrelay as its parent, pushrelay relays it as HTTP/2 to the origin. Body and apns-*
/// headers arrive unaltered, no hop-by-hop header from curl or Squid reaches the origin, and
/// Apple's answer comes back through Squid.
#[test]
fn post_proxy_behind_squid_as_the_legacy_proxy_relays_http11_as_http2() {
    let Some(path) = LegacyPath::start() else {
        return;
    };
    let port = path.origin.port();
    let target = format!("/3/device/{}", token(4));
    let url = format!("http://api.push.apple.com:{port}{target}");

    let answer = path.curl_push(&url);
    assert!(
        answer.status_line.starts_with("HTTP/1.1 200"),
        "{}\n{}",
        answer.status_line,
        path.squid.logs()
    );
    assert_eq!(
        answer.headers.get("apns-id").map(String::as_str),
        Some(APNS_ID)
    );
    assert!(answer.body.is_empty(), "{:?}", answer.body);

    let received = path.origin.received();
    assert_eq!(received.len(), 1, "{}", path.squid.logs());
    let got = &received[0];
    assert_eq!(got.method, http::Method::POST);
    assert_eq!(got.path, target);
    assert_eq!(
        got.authority.as_deref(),
        Some(format!("api.push.apple.com:{port}").as_str()),
        "the port written in the URL stays in :authority"
    );
    assert_eq!(got.body, PAYLOAD.as_bytes());
    for (name, value) in [
        ("apns-topic", "com.example.app"),
        ("apns-push-type", "alert"),
        ("apns-priority", "10"),
        ("apns-expiration", "0"),
        ("apns-id", APNS_ID),
        (
            "authorization",
            "bearer eyJhbGciOiJFUzI1NiJ9.eyJpc3MiOiJERUYxMjMifQ.c2ln",
        ),
        ("content-type", "application/json"),
    ] {
        assert_eq!(
            got.headers.get(name).map(|v| v.to_str().unwrap()),
            Some(value),
            "header {name}: {:?}",
            got.headers
        );
    }
    // `Via` is end-to-end: Squid's may pass. Hop-by-hop headers (curl's Proxy-Connection, Squid's
    // Connection: keep-alive) and Host (now :authority) must not.
    for name in [
        "host",
        "connection",
        "proxy-connection",
        "keep-alive",
        "te",
        "transfer-encoding",
        "upgrade",
        "proxy-authorization",
    ] {
        assert!(
            got.headers.get(name).is_none(),
            "{name} reached the origin: {:?}",
            got.headers
        );
    }

    let logged = format!("POST http://api.push.apple.com:{port}{target}");
    let line = path
        .squid
        .wait_for_access_line("the push", |l| l.contains(&logged));
    assert!(line.contains("/200 "), "{line}");
    assert!(
        line.contains("_PARENT/127.0.0.1"),
        "not via the parent: {line}"
    );
    path.stop();
}

/// A URL without a port, as a push server configured for `http://api.push.apple.com` writes it:
/// Squid sees port 80, pushrelay sends it to the listener's `upstream_port`.
#[test]
fn post_proxy_behind_squid_sends_a_url_without_port_to_upstream_port() {
    let Some(path) = LegacyPath::start() else {
        return;
    };
    let target = format!("/3/device/{}", token(5));
    let answer = path.curl_push(&format!("http://api.sandbox.push.apple.com{target}"));
    assert!(
        answer.status_line.starts_with("HTTP/1.1 200"),
        "{}\n{}",
        answer.status_line,
        path.squid.logs()
    );
    let received = path.origin.received();
    assert_eq!(received.len(), 1, "{}", path.squid.logs());
    assert_eq!(received[0].path, target);
    assert_eq!(
        received[0].authority.as_deref(),
        Some("api.sandbox.push.apple.com")
    );
    assert_eq!(received[0].body, PAYLOAD.as_bytes());
    path.stop();
}

/// A destination not in `destinations`, through Squid (which only talks to its parent): pushrelay's
/// 403 RelayDestinationNotAllowed comes back through Squid, and nothing reaches the origin.
#[test]
fn post_proxy_behind_squid_refuses_a_destination_outside_the_allowlist() {
    let Some(path) = LegacyPath::start() else {
        return;
    };
    let answer = path.curl_push("http://fcm.googleapis.com/v1/projects/demo/messages:send");
    assert!(
        answer.status_line.starts_with("HTTP/1.1 403"),
        "{}\n{}",
        answer.status_line,
        path.squid.logs()
    );
    assert_eq!(answer.body, r#"{"reason":"RelayDestinationNotAllowed"}"#);
    assert!(path.origin.received().is_empty());
    assert_eq!(path.origin.connection_count(), 0);

    let line = path.squid.wait_for_access_line("the refused push", |l| {
        l.contains("POST http://fcm.googleapis.com/")
    });
    assert!(line.contains("/403 "), "{line}");
    assert!(
        line.contains("_PARENT/127.0.0.1"),
        "not via the parent: {line}"
    );
    path.stop();
}

/// The forward-proxy door's blind tunnel through a real Squid: the FCM stand-in's own certificate
/// (another CA) reaches the client, bytes come back unaltered, and Squid logs the tunnel.
#[test]
fn blind_tunnel_through_real_squid_reaches_the_fcm_server_untouched() {
    let Some(squid_bin) = host_tools::require("squid", "squid") else {
        return;
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let pki = TestPki::new();
    let fcm = runtime.block_on(TlsEcho::start());
    let origin = runtime.block_on(FakeApns::start(&pki));
    let squid = Squid::start(
        &squid_bin,
        &SquidOptions {
            forward: Forward::Tunnel(fcm.port()),
            basic_auth: None,
        },
    );
    runtime.block_on(async {
        let extra = format!("tunnels:\n  - \"{}\"\n", fcm.target());
        let yaml = relay::forward_proxy_yaml(&pki, &origin, Via::Proxy(squid.url()), "", &extra);
        let relay = relay::start(&yaml).await;
        fcm.exchange_through(relay.addr()).await;
        relay.stop().await;
    });
    assert_eq!(fcm.connection_count(), 1, "{}", squid.logs());
    let connect = format!("CONNECT {}", fcm.target());
    let line = squid.wait_for_access_line("the blind tunnel", |l| l.contains(&connect));
    assert!(line.contains("TCP_TUNNEL/200"), "{line}");
}

/// `n` pushes through `inside`, `in_flight` at a time, each with its own apns-id: every answer
/// must be 200 with that apns-id. Returns the ids sent.
async fn pushes_in_flight(
    inside: std::net::SocketAddr,
    pki: &TestPki,
    n: usize,
    in_flight: usize,
) -> Vec<String> {
    let client = std::sync::Arc::new(H2Client::connect(pki, inside).await);
    let mut workers = Vec::new();
    for w in 0..in_flight {
        let client = client.clone();
        workers.push(tokio::spawn(async move {
            let mut ids = Vec::new();
            for i in (w..n).step_by(in_flight) {
                let id = format!("00000000-0000-4000-8000-{i:012x}");
                let mut req = push_request("api.push.apple.com", &token(i));
                req.headers_mut().insert("apns-id", id.parse().unwrap());
                let answer = client.send(req, Bytes::from(PAYLOAD)).await.unwrap();
                assert_eq!(answer.status, StatusCode::OK, "push {i}: {:?}", answer.body);
                assert_eq!(answer.headers["apns-id"], id.as_str());
                ids.push(id);
            }
            ids
        }));
    }
    let mut ids = Vec::new();
    for w in workers {
        ids.extend(within(120, "pushes through the chain", w).await.unwrap());
    }
    ids
}

/// Every push reached the origin once, with the headers and body the client sent; `extra` names
/// the headers a hop may add (framing, a proxy's own); nothing of the relay secret.
fn assert_each_once_unchanged(origin: &FakeApns, ids: &[String], extra: &[&str]) {
    let received = origin.received();
    assert_eq!(
        received.len(),
        ids.len(),
        "each push reaches the origin once"
    );
    let mut seen = std::collections::HashSet::new();
    let sent = push_request("api.push.apple.com", &token(0));
    for r in &received {
        let id = r.headers["apns-id"].to_str().unwrap().to_owned();
        assert!(seen.insert(id.clone()), "{id} reached the origin twice");
        assert_eq!(r.body, PAYLOAD.as_bytes());
        for (name, value) in sent.headers() {
            assert_eq!(r.headers.get(name), Some(value), "header {name}");
        }
        for name in r.headers.keys() {
            assert!(
                sent.headers().contains_key(name)
                    || name == "apns-id"
                    || extra.contains(&name.as_str()),
                "{name} was added on the way: {:?}",
                r.headers
            );
        }
        assert!(!r.headers.contains_key("pushrelay-relay-secret"));
    }
    assert!(ids.iter().all(|id| seen.contains(id)));
}

/// The relay chain through a TLS-inspecting Squid (ssl-bump, its own CA, HTTP/1.1 on both sides):
/// 1000 pushes with 50 in flight all answer 200 and reach the origin once each, unchanged; the
/// inside relay trusts only Squid's CA, and Squid's access log shows the bumped requests.
#[test]
fn relay_chain_through_squid_ssl_bump_carries_1000_pushes_once_each() {
    let Some(squid_bin) = host_tools::require("squid", "squid-openssl") else {
        return;
    };
    let pki = TestPki::new();
    let squid_ca = TestPki::new();
    let origin = Origin::start(&pki);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let secret = support::chain::secret_file(&pki, "relay.secret", support::chain::SECRET);
    let dmz = runtime.block_on(relay::start(&support::chain::dmz_yaml(
        &pki,
        &origin.apns,
        &secret,
        "\"127.0.0.1/32\"",
    )));
    let dmz_port = dmz.addr().port();
    let squid = Squid::start(
        &squid_bin,
        &SquidOptions {
            forward: Forward::Bump {
                port: dmz_port,
                cert: std::fs::read_to_string(&squid_ca.ca_cert).unwrap(),
                key: std::fs::read_to_string(&squid_ca.ca_key).unwrap(),
                trust: pki.ca.cert_pem().to_owned(),
            },
            basic_auth: None,
        },
    );
    let inside_yaml = support::chain::inside_yaml(
        &pki,
        origin.apns.port(),
        Some(&squid.url()),
        &format!("https://localhost:{dmz_port}"),
        &secret,
    )
    .replace(
        &format!("extra_roots: [\"{}\"]", pki.ca_cert.display()),
        &format!("extra_roots: [\"{}\"]", squid_ca.ca_cert.display()),
    );
    assert!(inside_yaml.contains(&squid_ca.ca_cert.display().to_string()));
    let ids = runtime.block_on(async {
        let inside = relay::start(&inside_yaml).await;
        // One push first, so a setup failure shows Squid's own account of it.
        let first = H2Client::connect(&pki, inside.addr()).await;
        let mut req = push_request("api.push.apple.com", &token(100_000));
        req.headers_mut()
            .insert("apns-id", APNS_ID.parse().unwrap());
        let answer = first.send(req, Bytes::from(PAYLOAD)).await.unwrap();
        assert_eq!(
            answer.status,
            StatusCode::OK,
            "{:?}\n{}",
            answer.body,
            squid.logs()
        );
        let mut ids = vec![APNS_ID.to_owned()];
        ids.extend(pushes_in_flight(inside.addr(), &pki, 1000, 50).await);
        inside.stop().await;
        ids
    });
    assert_each_once_unchanged(&origin.apns, &ids, &["content-length"]);
    let bumped = format!("POST https://localhost:{dmz_port}/3/device/");
    let line = squid.wait_for_access_line("a bumped push", |l| l.contains(&bumped));
    assert!(line.contains("/200 "), "{line}");
    runtime.block_on(dmz.stop());
}

/// The relay chain over plain `http://` through a Squid whose parent is the DMZ relay: pushes go
/// in absolute form, every one 200 and once at the origin; Squid logs them as sent to the parent.
#[test]
fn relay_chain_through_a_plain_squid_parent_carries_pushes_once_each() {
    let Some(squid_bin) = host_tools::require("squid", "squid-openssl") else {
        return;
    };
    let pki = TestPki::new();
    let origin = Origin::start(&pki);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let secret = support::chain::secret_file(&pki, "relay.secret", support::chain::SECRET);
    let dmz_yaml = relay::post_proxy_yaml(&pki, &origin.apns, "").replace(
        "    allow_sources:",
        &format!(
            "    relay_secret_file: \"{}\"\n    allow_sources:",
            secret.display()
        ),
    );
    let dmz = runtime.block_on(relay::start(&dmz_yaml));
    let squid = Squid::start(
        &squid_bin,
        &SquidOptions {
            forward: Forward::Parent {
                parent_port: dmz.addr().port(),
                dest_ports: vec![80],
            },
            basic_auth: None,
        },
    );
    let inside_yaml = support::chain::inside_yaml(
        &pki,
        origin.apns.port(),
        Some(&squid.url()),
        &format!("http://127.0.0.1:{}", dmz.addr().port()),
        &secret,
    );
    let ids = runtime.block_on(async {
        let inside = relay::start(&inside_yaml).await;
        let ids = pushes_in_flight(inside.addr(), &pki, 300, 30).await;
        inside.stop().await;
        ids
    });
    // Squid's own end-to-end headers (README: `via off`, `forwarded_for delete` drop them).
    assert_each_once_unchanged(
        &origin.apns,
        &ids,
        &["content-length", "via", "x-forwarded-for", "cache-control"],
    );
    let line = squid.wait_for_access_line("a push to the parent", |l| {
        l.contains("POST http://api.push.apple.com/3/device/")
    });
    assert!(line.contains("FIRSTUP_PARENT/127.0.0.1"), "{line}");
    runtime.block_on(dmz.stop());
}
