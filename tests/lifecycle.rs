//! The relay as admins run it: the real binary, real signals, the admin listener and the log.
//! SIGTERM drains in-flight pushes and refuses new connections; SIGHUP reloads allow_sources
//! without dropping connections and refuses a bad configuration; /metrics moves; the log carries
//! one line per request and never a secret.

mod support;

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::StatusCode;
use support::client::{Connect, H2Client, push_request};
use support::http1::RawConn;
use support::origin::{FakeApns, OriginOptions};
use support::pki::TestPki;
use support::proxy::{Behaviour, TestProxy};
use support::relay::{Via, pre_proxy_yaml};
use support::{token, within};
use tokio::io::AsyncWriteExt;

/// The relay binary, started by this test and ended by PID.
struct Relay {
    child: Child,
    lines: Arc<Mutex<Vec<String>>>,
    new_line: mpsc::Receiver<()>,
    pub addr: SocketAddr,
    pub admin: SocketAddr,
    config: std::path::PathBuf,
}

impl Drop for Relay {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn bind_of(line: &str) -> Option<SocketAddr> {
    let start = line.find("\"bind\":\"")? + 8;
    let end = line[start..].find('"')? + start;
    line[start..end].parse().ok()
}

impl Relay {
    fn start(dir: &std::path::Path, yaml: &str) -> Relay {
        let config = dir.join("relay.yaml");
        let yaml = format!(
            "{yaml}\nadmin:\n  bind: \"127.0.0.1:0\"\nlog:\n  format: json\n  level: info\n"
        );
        std::fs::write(&config, yaml).unwrap();
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_pushrelay"));
        cmd.args(["serve", "--config"])
            .arg(&config)
            .stderr(Stdio::piped())
            .stdout(Stdio::null());
        for (k, _) in std::env::vars() {
            if k.starts_with("PUSHRELAY_")
                || k.eq_ignore_ascii_case("https_proxy")
                || k == "RUST_LOG"
            {
                cmd.env_remove(k);
            }
        }
        let mut child = cmd.spawn().unwrap();
        let stderr = child.stderr.take().unwrap();
        let lines = Arc::new(Mutex::new(Vec::new()));
        let (tx, new_line) = mpsc::channel();
        let sink = lines.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                sink.lock().unwrap().push(line);
                let _ = tx.send(());
            }
        });
        let mut relay = Relay {
            child,
            lines,
            new_line,
            addr: "127.0.0.1:1".parse().unwrap(),
            admin: "127.0.0.1:1".parse().unwrap(),
            config,
        };
        let listening = relay.wait_for("\"listening\"");
        relay.addr = bind_of(&listening).unwrap();
        let admin = relay.wait_for("admin listening");
        relay.admin = bind_of(&admin).unwrap();
        relay.wait_for("\"message\":\"ready\"");
        relay
    }

    /// Waits (bounded) for a log line containing `needle`, and returns it.
    fn wait_for(&self, needle: &str) -> String {
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            if let Some(line) = self
                .lines
                .lock()
                .unwrap()
                .iter()
                .find(|l| l.contains(needle))
            {
                return line.clone();
            }
            let left = deadline.saturating_duration_since(Instant::now());
            assert!(
                !left.is_zero(),
                "no log line with {needle:?}; log:\n{}",
                self.log()
            );
            let _ = self.new_line.recv_timeout(left);
        }
    }

    fn log(&self) -> String {
        self.lines.lock().unwrap().join("\n")
    }

    fn signal(&self, sig: &str) {
        let ok = Command::new("kill")
            .args([sig, &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(ok.success());
    }

    /// Waits (bounded) for the process to exit; its exit code.
    fn wait_exit(&mut self) -> Option<i32> {
        let deadline = Instant::now() + Duration::from_secs(15);
        while Instant::now() < deadline {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status.code();
            }
            let _ = self.new_line.recv_timeout(Duration::from_millis(100));
        }
        panic!("relay did not exit; log:\n{}", self.log());
    }
}

async fn get(addr: SocketAddr, path: &str) -> (u16, String) {
    let mut conn = RawConn::connect(addr).await;
    conn.send(
        format!("GET {path} HTTP/1.1\r\nHost: admin\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .await;
    let answer = conn.read_answer().await.unwrap();
    (
        answer.status,
        String::from_utf8_lossy(&answer.body).into_owned(),
    )
}

fn metric(text: &str, prefix: &str) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(prefix))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// SIGTERM: /readyz turns 503 and new connections are refused, but the push in flight completes;
/// then the process exits 0.
#[tokio::test]
async fn sigterm_drains_the_push_in_flight_and_refuses_new_connections() {
    let pki = TestPki::new();
    let (origin, hold) = FakeApns::start_holding(&pki, OriginOptions::default()).await;
    let mut relay = Relay::start(pki.dir.path(), &pre_proxy_yaml(&pki, &origin, Via::Direct));
    assert_eq!(get(relay.admin, "/readyz").await.0, 200);
    let client = Arc::new(H2Client::connect(&pki, relay.addr).await);
    let in_flight = {
        let c = client.clone();
        tokio::spawn(async move { c.push(&token(1), "{}").await })
    };
    origin.wait_received(1).await;

    relay.signal("-TERM");
    relay.wait_for("listeners closed");
    assert!(
        tokio::net::TcpStream::connect(relay.addr).await.is_err(),
        "new connections are refused while draining"
    );
    assert_eq!(
        get(relay.admin, "/readyz").await.0,
        503,
        "not ready while draining"
    );
    hold.add_permits(1);
    let answer = within(10, "in-flight push", in_flight).await.unwrap();
    assert_eq!(
        answer.status,
        StatusCode::OK,
        "the push in flight completed"
    );
    assert_eq!(relay.wait_exit(), Some(0));
}

/// SIGHUP reloads allow_sources: a refused address is let in, the open connection keeps working,
/// and a bad configuration is refused with a log line while the running one stays.
#[tokio::test]
async fn sighup_reloads_allow_sources_and_refuses_a_bad_config() {
    let pki = TestPki::new();
    let origin = FakeApns::start(&pki).await;
    let yaml = pre_proxy_yaml(&pki, &origin, Via::Direct);
    let relay = Relay::start(pki.dir.path(), &yaml);
    let kept = H2Client::connect(&pki, relay.addr).await;
    assert_eq!(kept.push(&token(1), "{}").await.status, StatusCode::OK);
    let from_2 = || {
        let mut c = Connect::new(relay.addr);
        c.from = Some("127.0.0.2".parse().unwrap());
        c
    };
    assert!(
        H2Client::connect_with(&pki, from_2()).await.is_err(),
        "127.0.0.2 is not allowed yet"
    );

    let wider = yaml.replace(
        "allow_sources: [\"127.0.0.1/32\"]",
        "allow_sources: [\"127.0.0.0/8\"]",
    );
    assert_ne!(wider, yaml);
    let full = |y: &str| {
        format!("{y}\nadmin:\n  bind: \"127.0.0.1:0\"\nlog:\n  format: json\n  level: info\n")
    };
    std::fs::write(&relay.config, full(&wider)).unwrap();
    relay.signal("-HUP");
    relay.wait_for("configuration reloaded");
    let newcomer = H2Client::connect_with(&pki, from_2())
        .await
        .expect("127.0.0.2 allowed after reload");
    assert_eq!(newcomer.push(&token(2), "{}").await.status, StatusCode::OK);
    assert_eq!(
        kept.push(&token(3), "{}").await.status,
        StatusCode::OK,
        "the open connection survived"
    );

    std::fs::write(&relay.config, "listeners: [oops\n").unwrap();
    relay.signal("-HUP");
    relay.wait_for("reload refused");
    assert_eq!(
        kept.push(&token(4), "{}").await.status,
        StatusCode::OK,
        "still serving on the old configuration"
    );
    // The status page tells the same story: the reloaded configuration, the refusal and why.
    let (code, status) = get(relay.admin, "/status.json").await;
    assert_eq!(code, 200);
    let status: serde_json::Value = serde_json::from_str(&status).unwrap();
    let config = &status["config"];
    assert!(
        config["origin"]
            .as_str()
            .unwrap()
            .contains(&relay.config.display().to_string()),
        "{config}"
    );
    assert_eq!(config["last_reload"]["outcome"], "refused", "{config}");
    assert!(
        config["last_reload"]["error"]
            .as_str()
            .unwrap()
            .contains("invalid configuration"),
        "{config}"
    );
    assert!(
        config["effective"]
            .as_str()
            .unwrap()
            .contains("127.0.0.0/8"),
        "the reloaded configuration is the one in use: {config}"
    );
}

/// /healthz and /metrics answer, and the request and error counters move with traffic.
#[tokio::test]
async fn metrics_move_with_traffic() {
    let pki = TestPki::new();
    let origin = FakeApns::start(&pki).await;
    let relay = Relay::start(pki.dir.path(), &pre_proxy_yaml(&pki, &origin, Via::Direct));
    assert_eq!(get(relay.admin, "/healthz").await.0, 200);
    let (_, before) = get(relay.admin, "/metrics").await;
    let ok = "pushrelay_requests_total{listener=\"apns\"";
    let client = H2Client::connect(&pki, relay.addr).await;
    for i in 0..3 {
        assert_eq!(client.push(&token(i), "{}").await.status, StatusCode::OK);
    }
    let misdirected = client
        .send(push_request("evil.example.com", &token(9)), Bytes::new())
        .await
        .unwrap();
    assert_eq!(misdirected.status, StatusCode::MISDIRECTED_REQUEST);
    let (status, after) = get(relay.admin, "/metrics").await;
    assert_eq!(status, 200);
    assert_eq!(metric(&after, ok) - metric(&before, ok), 4.0, "{after}");
    assert_eq!(
        metric(
            &after,
            "pushrelay_relay_errors_total{reason=\"RelayMisdirectedRequest\"}"
        ),
        1.0,
        "{after}"
    );
    assert!(
        metric(&after, "pushrelay_request_duration_seconds_count") >= 4.0,
        "{after}"
    );
    assert_eq!(
        metric(&after, "pushrelay_upstream_connections{"),
        1.0,
        "{after}"
    );
    assert!(
        metric(&after, "pushrelay_certificate_expiry_timestamp_seconds{") > 1.7e9,
        "{after}"
    );
}

/// The log has one line per push with the token cut to 8 characters, and never the payload, the
/// whole token, the authorization value or the proxy password.
#[tokio::test]
async fn log_has_one_line_per_request_and_no_secrets() {
    let pki = TestPki::new();
    let origin = FakeApns::start(&pki).await;
    let proxy = TestProxy::start(Behaviour::Auth {
        user: "relay".into(),
        pass: "Pr0xyS3cret".into(),
    })
    .await;
    let relay = Relay::start(
        pki.dir.path(),
        &pre_proxy_yaml(
            &pki,
            &origin,
            Via::Proxy(proxy.url_with("relay", "Pr0xyS3cret")),
        ),
    );
    let client = H2Client::connect(&pki, relay.addr).await;
    let device = token(77);
    let payload = r#"{"aps":{"alert":"PayloadSecretText"}}"#;
    let mut req = push_request("api.push.apple.com", &device);
    req.headers_mut().insert(
        "authorization",
        "bearer AuthSecretJWT.claims.sig".parse().unwrap(),
    );
    req.headers_mut().insert(
        "apns-id",
        "12345678-1234-4234-8234-123456789012".parse().unwrap(),
    );
    assert_eq!(
        client.send(req, Bytes::from(payload)).await.unwrap().status,
        StatusCode::OK
    );
    let line = relay.wait_for("\"relayed\"");
    assert!(
        line.contains(&format!("/3/device/{}", &device[..8])),
        "{line}"
    );
    assert!(
        line.contains("12345678-1234-4234-8234-123456789012"),
        "apns-id logged: {line}"
    );
    assert!(line.contains("\"status\":200"), "{line}");
    let log = relay.log();
    for secret in [
        "Pr0xyS3cret",
        "AuthSecretJWT",
        "PayloadSecretText",
        device.as_str(),
    ] {
        assert!(
            !log.contains(secret),
            "{secret} leaked into the log:\n{log}"
        );
    }
}

/// CA files replaced on disk (a Kubernetes secret swap) are picked up without a signal: new
/// clients get certificates from the new CA.
#[tokio::test]
async fn replaced_certificate_files_are_picked_up_without_a_signal() {
    let pki = TestPki::new();
    let origin = FakeApns::start(&pki).await;
    let yaml = format!(
        "{}reload_poll_interval: 200ms\n",
        pre_proxy_yaml(&pki, &origin, Via::Direct)
    );
    let relay = Relay::start(pki.dir.path(), &yaml);
    let old = H2Client::connect(&pki, relay.addr).await;
    assert_eq!(old.push(&token(1), "{}").await.status, StatusCode::OK);

    // A new CA in the same files; clients trusting only it must be served after the reload.
    pushrelay::tls::pki::init_dir(pki.dir.path(), true, &[]).unwrap();
    relay.wait_for("changed on disk");
    relay.wait_for("configuration reloaded");
    let new_ca = pushrelay::tls::pki::Ca::from_files(&pki.ca_cert, &pki.ca_key).unwrap();
    let mut roots = rustls::RootCertStore::empty();
    use rustls::pki_types::pem::PemObject;
    roots
        .add(
            rustls::pki_types::CertificateDer::from_pem_slice(new_ca.cert_pem().as_bytes())
                .unwrap(),
        )
        .unwrap();
    let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    config.alpn_protocols = vec![b"h2".to_vec()];
    let fresh = H2Client::connect_tls(Arc::new(config), Connect::new(relay.addr))
        .await
        .expect("a client trusting the new CA is served");
    assert_eq!(fresh.push(&token(2), "{}").await.status, StatusCode::OK);
    assert_eq!(
        old.push(&token(3), "{}").await.status,
        StatusCode::OK,
        "the open connection survived"
    );
}

/// A reload notices an upstream change that is only a new proxy password (masked wherever it is
/// printed), and says that it needs a restart; the same configuration again changes nothing.
#[tokio::test]
async fn reload_notices_a_password_only_change_of_the_proxy() {
    let (logs, _guard) = support::logs::capture();
    let pki = TestPki::new();
    let yaml = |password: &str| {
        support::relay::pre_proxy_yaml_on(
            &pki,
            443,
            Via::Proxy(format!("http://relay:{password}@127.0.0.1:9")),
        )
    };
    let load = |text: String| pushrelay::config::from_yaml(&text).unwrap().config;
    let app = pushrelay::App::build(load(yaml("first"))).unwrap();
    app.reloader().reload(load(yaml("first"))).unwrap();
    assert!(
        !logs.text().contains("upstream settings changed"),
        "{}",
        logs.text()
    );
    app.reloader().reload(load(yaml("second"))).unwrap();
    let text = logs.text();
    assert!(text.contains("upstream settings changed"), "{text}");
    assert!(
        !text.contains("second") && !text.contains("first"),
        "a password was logged: {text}"
    );
}

/// The admin listener, in-process, with `limits`.
async fn admin_with(limits: pushrelay::admin::Limits) -> (SocketAddr, TestPki) {
    let pki = TestPki::new();
    let yaml = support::relay::pre_proxy_yaml_on(&pki, 443, Via::Direct);
    let app = pushrelay::App::build(pushrelay::config::from_yaml(&yaml).unwrap().config).unwrap();
    let socket = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = socket.local_addr().unwrap();
    let ready = Arc::new(pushrelay::admin::Readiness::default());
    tokio::spawn(pushrelay::admin::serve(
        socket,
        app.relay().clone(),
        ready,
        limits,
        Arc::new(app.status_sources(&[])),
        tokio_util::sync::CancellationToken::new(),
    ));
    (addr, pki)
}

/// The admin listener closes a client that does not finish its request head within the head
/// timeout, as the front doors do.
#[tokio::test]
async fn admin_listener_closes_a_client_that_trickles_its_head() {
    let limits = pushrelay::admin::Limits {
        head_timeout: Duration::from_millis(300),
        max_connections: 4,
    };
    let (addr, _pki) = admin_with(limits).await;
    let mut conn = RawConn::connect(addr).await;
    conn.send(b"GET /metrics HTTP/1.1\r\nHost: admin\r\n").await;
    let started = Instant::now();
    assert!(within(5, "admin closes", conn.closed()).await);
    assert!(started.elapsed() >= Duration::from_millis(250));
}

/// Beyond `max_connections` open admin connections a new one is closed at once; when one of them
/// goes, the listener serves again.
#[tokio::test]
async fn admin_listener_caps_its_connections() {
    let limits = pushrelay::admin::Limits {
        head_timeout: Duration::from_secs(30),
        max_connections: 2,
    };
    let (addr, _pki) = admin_with(limits).await;
    let healthz = b"GET /healthz HTTP/1.1\r\nHost: admin\r\n\r\n";
    let mut held = Vec::new();
    for _ in 0..2 {
        let mut conn = RawConn::connect(addr).await;
        conn.send(healthz).await;
        assert_eq!(
            within(5, "healthz", conn.read_answer())
                .await
                .unwrap()
                .status,
            200
        );
        held.push(conn);
    }
    let mut over = RawConn::connect(addr).await;
    let _ = over.stream.write_all(healthz).await;
    assert!(
        within(5, "refused", over.closed()).await,
        "a third connection is closed"
    );
    drop(held.pop());
    // The freed slot is seen once the relay notices the close: retry for a bounded time.
    let mut served = false;
    for _ in 0..50 {
        let mut conn = RawConn::connect(addr).await;
        let _ = conn.stream.write_all(healthz).await;
        if let Some(answer) = within(5, "healthz", conn.read_answer()).await {
            assert_eq!(answer.status, 200);
            served = true;
            break;
        }
        tokio::task::yield_now().await;
    }
    assert!(served, "the listener serves again below the cap");
}

/// A forward-proxy users file replaced on disk is picked up without a restart: the old password
/// gets 407, the new one opens the tunnel.
#[tokio::test]
async fn replaced_proxy_users_file_is_picked_up_without_a_restart() {
    use support::forward::Tunnel;
    let pki = TestPki::new();
    let origin = FakeApns::start(&pki).await;
    let yaml = format!(
        "{}reload_poll_interval: 200ms\n",
        support::relay::forward_proxy_yaml(
            &pki,
            &origin,
            Via::Direct,
            &support::relay::proxy_auth_yaml(&pki, "mpns", "old-pw"),
            "",
        )
    );
    let relay = Relay::start(pki.dir.path(), &yaml);
    let target = format!("api.push.apple.com:{}", origin.port());
    let open = |pass: &'static str| Tunnel::open(relay.addr, &target, Some(("mpns", pass)));
    assert_eq!(open("old-pw").await.status, 200);

    std::fs::write(pki.path("proxy-users"), "mpns:new-pw\n").unwrap();
    relay.wait_for("changed on disk");
    relay.wait_for("configuration reloaded");
    assert_eq!(open("old-pw").await.status, 407);
    assert_eq!(open("new-pw").await.status, 200);
}

/// SIGHUP applies a new `tunnels` list to a running forward-proxy listener: a host refused
/// before is tunnelled after, to its own server.
#[tokio::test]
async fn sighup_adds_a_tunnel_without_a_restart() {
    use support::forward::Tunnel;
    use support::tls_echo::TlsEcho;
    let pki = TestPki::new();
    let origin = FakeApns::start(&pki).await;
    let fcm = TlsEcho::start().await;
    // The route is in place from the start (upstream changes need a restart); the list is not.
    let yaml = support::relay::forward_proxy_yaml(&pki, &origin, Via::Direct, "", "").replace(
        "  connect_to:\n",
        &format!(
            "  connect_to:\n    \"{}\": \"127.0.0.1:{}\"\n",
            fcm.target(),
            fcm.port()
        ),
    );
    let relay = Relay::start(pki.dir.path(), &yaml);
    assert_eq!(
        Tunnel::open(relay.addr, &fcm.target(), None).await.status,
        403
    );

    let with_tunnel = format!(
        "{yaml}tunnels:\n  - \"{}\"\nadmin:\n  bind: \"127.0.0.1:0\"\nlog:\n  format: json\n  level: info\n",
        fcm.target()
    );
    std::fs::write(&relay.config, with_tunnel).unwrap();
    relay.signal("-HUP");
    relay.wait_for("configuration reloaded");
    fcm.exchange_through(relay.addr).await;
    assert_eq!(fcm.connection_count(), 1);
}
