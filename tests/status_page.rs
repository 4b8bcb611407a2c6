//! The admin listener's status page as an admin sees it: loaded in a real browser (headless
//! Chromium, `--dump-dom`), it shows a destination that works and one whose proxy answers 407,
//! each in its state, the hop that failed, the error counts, and no secret. `/status.json`
//! carries the same data.

mod support;

#[path = "squid/host_tools.rs"]
#[allow(dead_code)]
mod host_tools;

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use http::StatusCode;
use support::client::{Connect, H2Client, push_request};
use support::origin::FakeApns;
use support::pki::TestPki;
use support::proxy::{Behaviour, TestProxy};
use support::relay::Via;
use support::{http1, relay, token, within};

const PAYLOAD: &str = r#"{"aps":{"alert":"hi"}}"#;
/// The proxy password the relay is configured with (a wrong one): it must never be shown.
const PROXY_PASSWORD: &str = "hunter2-not-for-eyes";

/// Loads `url` in headless Chromium and returns the DOM it rendered; None after a SKIP note
/// where Chromium is not installed (a failure under CI=true).
async fn rendered_dom(url: &str) -> Option<String> {
    let chromium = host_tools::require("chromium", "chromium")?;
    let profile = tempfile::tempdir().unwrap();
    let mut cmd = tokio::process::Command::new(chromium);
    cmd.args(browser_flags(profile.path()))
        .arg("--dump-dom")
        .arg(url)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true);
    let child = cmd.spawn().unwrap();
    let pid = child.id();
    // kill_on_drop ends the browser (by its PID) if it does not finish in time.
    let out = match tokio::time::timeout(Duration::from_secs(60), child.wait_with_output()).await {
        Ok(out) => out.unwrap(),
        Err(_) => panic!("chromium (pid {pid:?}) did not render {url} within 60s"),
    };
    assert!(
        out.status.success(),
        "chromium failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Some(String::from_utf8(out.stdout).unwrap())
}

/// Headless, as root in a container: no sandbox, no GPU, nothing fetched but the page.
fn browser_flags(profile: &Path) -> Vec<String> {
    [
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
    ]
    .iter()
    .map(|s| s.to_string())
    .chain([format!("--user-data-dir={}", profile.display())])
    .collect()
}

/// The text a reader sees: tags dropped, entities read, whitespace collapsed.
fn visible_text(html: &str) -> String {
    let mut text = String::new();
    let mut in_tag = false;
    for c in html.chars() {
        match c {
            '<' => in_tag = true,
            '>' => {
                in_tag = false;
                text.push(' ');
            }
            c if !in_tag => text.push(c),
            _ => {}
        }
    }
    let text = text
        .replace("&lt;", "<")
        .replace("&gt;", ">")
        .replace("&quot;", "\"")
        .replace("&#39;", "'")
        .replace("&amp;", "&");
    text.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// The visible text of the table row that mentions `what`.
fn row_with<'a>(rows: &'a [String], what: &str) -> &'a str {
    rows.iter()
        .find(|r| r.contains(what))
        .unwrap_or_else(|| panic!("no row mentions {what:?}: {rows:#?}"))
}

fn rows(dom: &str) -> Vec<String> {
    dom.split("<tr")
        .skip(1)
        .map(|r| visible_text(&format!("<tr{}", r.split("</tr>").next().unwrap_or(""))))
        .collect()
}

/// Two destinations: `api.push.apple.com` goes direct to the origin and works;
/// `api.sandbox.push.apple.com` goes through a proxy that answers 407 to the relay's password.
/// One certificate identity, for a topic the test's pushes do not use.
fn yaml(pki: &TestPki, origin: &FakeApns, proxy: &TestProxy) -> String {
    let port = origin.port();
    let (cert, key) = pki.write_client_cert("com.example.other");
    let through_proxy = relay::pre_proxy_yaml(
        pki,
        origin,
        Via::Proxy(proxy.url_with("relay", PROXY_PASSWORD)),
    );
    // `upstream:` is the last section: these keys join it.
    format!(
        r#"{through_proxy}  no_proxy: ["api.push.apple.com"]
  connect_to:
    "api.push.apple.com:{port}": "127.0.0.1:{port}"
  identities:
    - topic: com.example.other
      cert: "{cert}"
      key: "{key}"
"#,
        cert = cert.display(),
        key = key.display(),
    )
}

async fn get(addr: SocketAddr, path: &str) -> http1::RawAnswer {
    http1::exchange(
        addr,
        format!("GET {path} HTTP/1.1\r\nHost: admin\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .await
}

/// With one destination working and one whose proxy answers 407, the page a browser renders
/// shows each with its state and route, the 407 hop, the error counts per listener, destination
/// and reason, and neither the proxy password nor a push's credentials.
#[tokio::test]
async fn status_page_shows_a_working_and_a_failing_destination() {
    let pki = TestPki::new();
    let origin = FakeApns::start(&pki).await;
    let proxy = TestProxy::start(Behaviour::Auth {
        user: "relay".into(),
        pass: "right".into(),
    })
    .await;
    let relay = relay::start_with_admin(&yaml(&pki, &origin, &proxy)).await;
    let admin = relay.admin.unwrap();
    let port = origin.port();
    let client = H2Client::connect(&pki, relay.addr()).await;
    for n in 0..2 {
        let answer = within(
            10,
            "a push to the working destination",
            client.push(&token(n), PAYLOAD),
        )
        .await;
        assert_eq!(answer.status, StatusCode::OK);
    }
    let sandbox = format!("api.sandbox.push.apple.com:{port}");
    let sandbox_client = H2Client::connect_with(
        &pki,
        Connect {
            sni: "api.sandbox.push.apple.com",
            ..Connect::new(relay.addr())
        },
    )
    .await
    .unwrap();
    for n in 0..3 {
        let answer = within(
            10,
            "a push to the failing destination",
            sandbox_client.send(
                push_request("api.sandbox.push.apple.com", &token(10 + n)),
                PAYLOAD.into(),
            ),
        )
        .await
        .unwrap();
        assert_eq!(answer.status, StatusCode::BAD_GATEWAY);
        assert_eq!(
            answer.reason().as_deref(),
            Some("RelayProxyAuthenticationRequired")
        );
    }

    let url = format!("http://{admin}/");
    let Some(dom) = within(90, "chromium renders the status page", rendered_dom(&url)).await else {
        relay.stop().await;
        return;
    };
    let text = visible_text(&dom);
    let rows = rows(&dom);

    let working = row_with(&rows, &format!("api.push.apple.com:{port} direct to"));
    assert!(
        working.contains(&format!("direct to 127.0.0.1:{port} up")),
        "{working}"
    );
    let failing = row_with(
        &rows,
        &format!("api.sandbox.push.apple.com:{port} via proxy"),
    );
    assert!(failing.contains("via proxy http://relay:***@"), "{failing}");
    assert!(
        failing.contains("backing off since 20") && failing.contains(" failed connect"),
        "the destination is backing off, since when and after how many failures: {failing}"
    );
    assert!(
        failing.contains("proxy answered 407 Proxy Authentication Required"),
        "the hop that failed, in the proxy's words: {failing}"
    );
    // Requests in the last 5 minutes: 3, all errors.
    assert!(
        failing.contains(" 0 0 3 / 3 "),
        "three requests, three errors: {failing}"
    );
    let listener = row_with(&rows, "pre-proxy");
    assert!(
        listener.contains("apns pre-proxy 127.0.0.1:"),
        "the listener by name, mode and bind: {listener}"
    );
    assert!(listener.contains("minted from CA"), "{listener}");
    assert!(
        listener.contains(" 5 3 5 3"),
        "5 requests and 3 errors in the last 5 and 60 minutes: {listener}"
    );
    let identity = row_with(&rows, "identity");
    assert!(
        identity.starts_with("upstream identity com.example.other "),
        "the identity's certificate with its expiry: {identity}"
    );
    let ca = row_with(&rows, "apns ca ");
    assert!(ca.contains(&pki.ca_cert.display().to_string()), "{ca}");
    let reason = row_with(&rows, "RelayProxyAuthenticationRequired");
    assert_eq!(reason, "RelayProxyAuthenticationRequired 3 3");
    assert!(text.contains("Effective configuration"), "{text}");
    assert!(text.contains("no_proxy: - api.push.apple.com"), "{text}");

    for secret in [
        PROXY_PASSWORD,
        "bearer",
        "eyJhbGciOiJFUzI1NiIsImtpZCI6IkFCQzEyMyJ9",
    ] {
        assert!(
            !dom.contains(secret),
            "{secret:?} shown on the page:\n{text}"
        );
    }

    let json = get(admin, "/status.json").await;
    assert_eq!(json.status, 200);
    assert_eq!(json.header("content-type"), Some("application/json"));
    let status: serde_json::Value = serde_json::from_slice(&json.body).unwrap();
    assert_eq!(status["listeners"][0]["last_5m"]["errors"], 3);
    let dests = status["destinations"].as_array().unwrap();
    let by_name = |name: &str| {
        dests
            .iter()
            .find(|d| d["name"] == name)
            .unwrap_or_else(|| panic!("{name} in {dests:?}"))
    };
    assert_eq!(
        by_name(&format!("api.push.apple.com:{port}"))["state"],
        "up"
    );
    let failing = by_name(&sandbox);
    assert_eq!(failing["last_5m"]["errors"], 3);
    assert_eq!(failing["state"], "backing_off", "{failing}");
    assert_eq!(
        failing["last_failure"]["hop"],
        "proxy answered 407 Proxy Authentication Required"
    );
    assert!(!String::from_utf8_lossy(&json.body).contains(PROXY_PASSWORD));
    relay.stop().await;
}
