//! The post-proxy relay end to end: HTTP/1.1 as a legacy corporate proxy sends it, relayed as
//! HTTP/2 to a fake APNs origin; hostile request shapes are refused with the right status.

mod support;

use std::time::Duration;

use tokio::io::AsyncWriteExt;

use support::http1::{RawConn, exchange};
use support::origin::{FakeApns, OriginOptions};
use support::pki::TestPki;
use support::relay;
use support::{token, within};

const PAYLOAD: &str = r#"{"aps":{"alert":"hello from the DMZ"}}"#;

struct Setup {
    _pki: TestPki,
    origin: FakeApns,
    relay: relay::RunningRelay,
}

async fn setup_with(options: OriginOptions, extra: &str) -> Setup {
    let pki = TestPki::new();
    let origin = FakeApns::start_with(&pki, options).await;
    let relay = relay::start(&relay::post_proxy_yaml(&pki, &origin, extra)).await;
    Setup {
        _pki: pki,
        origin,
        relay,
    }
}

async fn setup() -> Setup {
    setup_with(OriginOptions::default(), "").await
}

fn push(target: &str, host: &str, extra: &str, body: &str) -> Vec<u8> {
    format!(
        "POST {target} HTTP/1.1\r\nHost: {host}\r\napns-topic: com.example.app\r\napns-push-type: alert\r\n\
         apns-id: 11111111-2222-4333-8444-555555555555\r\nauthorization: bearer eyJ.x.y\r\n{extra}\
         Content-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

/// An HTTP/1.1 push is relayed as HTTP/2: headers and body arrive unaltered, Apple's answer comes back.
#[tokio::test]
async fn http11_request_is_forwarded_as_http2() {
    let s = setup().await;
    let target = format!("/3/device/{}", token(1));
    let answer = within(
        10,
        "push",
        exchange(
            s.relay.addr(),
            &push(&target, "api.push.apple.com", "", PAYLOAD),
        ),
    )
    .await;
    assert_eq!(answer.status, 200);
    assert_eq!(
        answer.header("apns-id"),
        Some("11111111-2222-4333-8444-555555555555")
    );
    assert_eq!(
        answer.header("content-length"),
        Some("0"),
        "an empty 200 keeps explicit framing"
    );
    let got = s.origin.received();
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].path, target);
    assert_eq!(got[0].body, PAYLOAD.as_bytes());
    for (name, value) in [
        ("apns-topic", "com.example.app"),
        ("apns-push-type", "alert"),
        ("apns-id", "11111111-2222-4333-8444-555555555555"),
        ("authorization", "bearer eyJ.x.y"),
    ] {
        assert_eq!(
            got[0].headers.get(name).map(|v| v.to_str().unwrap()),
            Some(value),
            "{name}"
        );
    }
}

/// Apple's JSON error answers go back as HTTP/1.1 with their status and body unchanged.
#[tokio::test]
async fn apple_error_answer_keeps_status_and_json_body() {
    let s = setup().await;
    let answer = exchange(
        s.relay.addr(),
        &push("/3/device/nothex", "api.push.apple.com", "", PAYLOAD),
    )
    .await;
    assert_eq!(answer.status, 400);
    assert_eq!(answer.body, br#"{"reason":"BadDeviceToken"}"#);
    assert!(answer.header("apns-id").is_some());
}

/// Absolute-form targets, as a proxy sends them to its parent, name the destination and its port.
#[tokio::test]
async fn absolute_form_from_a_parent_proxy_is_accepted() {
    let s = setup().await;
    let port = s.origin.port();
    for scheme in ["http", "https"] {
        let target = format!("{scheme}://api.push.apple.com:{port}/3/device/{}", token(2));
        let answer = exchange(
            s.relay.addr(),
            &push(&target, &format!("api.push.apple.com:{port}"), "", PAYLOAD),
        )
        .await;
        assert_eq!(answer.status, 200, "{scheme}");
    }
    let got = s.origin.received();
    assert_eq!(got.len(), 2);
    assert_eq!(
        got[0].authority.as_deref(),
        Some(format!("api.push.apple.com:{port}").as_str())
    );
}

/// `Host` becomes `:authority`, and no `host` header reaches the origin.
#[tokio::test]
async fn host_becomes_authority() {
    let s = setup().await;
    let target = format!("/3/device/{}", token(3));
    let answer = exchange(
        s.relay.addr(),
        &push(&target, "API.Sandbox.Push.Apple.com", "", PAYLOAD),
    )
    .await;
    assert_eq!(answer.status, 200);
    let got = s.origin.received();
    assert_eq!(
        got[0].authority.as_deref(),
        Some("api.sandbox.push.apple.com")
    );
    assert!(got[0].headers.get("host").is_none());
    assert!(
        answer.header("apns-unique-id").is_some(),
        "sandbox answer headers are kept"
    );
}

/// An absolute target and a `Host` naming different hosts are refused.
#[tokio::test]
async fn absolute_uri_differing_from_host_is_rejected() {
    let s = setup().await;
    let target = format!("http://api.push.apple.com/3/device/{}", token(4));
    let answer = exchange(
        s.relay.addr(),
        &push(&target, "evil.example.com", "", PAYLOAD),
    )
    .await;
    assert_eq!(answer.status, 400);
    assert_eq!(answer.reason().as_deref(), Some("RelayBadRequest"));
    assert!(s.origin.received().is_empty());
}

/// Hop-by-hop headers, and every header `Connection` names, stay on the client's hop.
#[tokio::test]
async fn removes_connection_headers_and_those_it_names() {
    let s = setup().await;
    let extra = "Connection: keep-alive, X-Hop-Secret\r\nX-Hop-Secret: 1\r\nKeep-Alive: timeout=5\r\n\
                 Proxy-Connection: keep-alive\r\nProxy-Authorization: Basic dXNlcjpwYXNz\r\nTE: trailers, deflate\r\n\
                 Upgrade: h2c\r\nX-End-To-End: kept\r\n";
    let answer = exchange(
        s.relay.addr(),
        &push(
            &format!("/3/device/{}", token(5)),
            "api.push.apple.com",
            extra,
            PAYLOAD,
        ),
    )
    .await;
    assert_eq!(answer.status, 200);
    let headers = &s.origin.received()[0].headers;
    for gone in [
        "connection",
        "x-hop-secret",
        "keep-alive",
        "proxy-connection",
        "proxy-authorization",
        "upgrade",
        "host",
    ] {
        assert!(
            headers.get(gone).is_none(),
            "{gone} must not reach the origin"
        );
    }
    assert_eq!(headers["te"], "trailers");
    assert_eq!(headers["x-end-to-end"], "kept");
}

/// A chunked body reaches the origin only once complete, in one piece, however the client
/// spreads it over time.
#[tokio::test]
async fn chunked_body_reaches_the_origin_only_when_complete() {
    let s = setup().await;
    let mut conn = RawConn::connect(s.relay.addr()).await;
    let head = format!(
        "POST /3/device/{} HTTP/1.1\r\nHost: api.push.apple.com\r\napns-topic: t\r\nTransfer-Encoding: chunked\r\n\r\n",
        token(6)
    );
    conn.send(head.as_bytes()).await;
    conn.send(b"10\r\n{\"aps\":{\"alert\":\r\n").await;
    conn.send(b"5\r\n\"hi\"}\r\n1\r\n}\r\n0\r\n\r\n").await;
    let answer = conn.read_answer().await.unwrap();
    assert_eq!(answer.status, 200);
    assert_eq!(
        s.origin.received()[0].body,
        &b"{\"aps\":{\"alert\":\"hi\"}}"[..]
    );
    // A first DATA frame without END_STREAM would have added a permit.
    assert_eq!(
        s.origin.first_data.available_permits(),
        0,
        "the body went upstream in parts"
    );
}

/// `Expect: 100-continue` gets `100 Continue` before the body is sent, then the real answer.
#[tokio::test]
async fn expect_100_continue_is_honoured() {
    let s = setup().await;
    let mut conn = RawConn::connect(s.relay.addr()).await;
    let head = format!(
        "POST /3/device/{} HTTP/1.1\r\nHost: api.push.apple.com\r\napns-topic: t\r\nExpect: 100-continue\r\nContent-Length: {}\r\n\r\n",
        token(7),
        PAYLOAD.len()
    );
    conn.send(head.as_bytes()).await;
    let interim = conn.read_answer().await.unwrap();
    assert_eq!(interim.status, 100);
    conn.send(PAYLOAD.as_bytes()).await;
    let answer = conn.read_answer().await.unwrap();
    assert_eq!(answer.status, 200);
    let got = s.origin.received();
    assert_eq!(got[0].body, PAYLOAD.as_bytes());
    assert!(got[0].headers.get("expect").is_none());
}

/// A `Content-Length` body that arrives in pieces is relayed whole, and the connection goes on
/// with the next request.
#[tokio::test]
async fn body_in_pieces_is_relayed_whole_and_the_connection_kept() {
    let s = setup().await;
    let mut conn = RawConn::connect(s.relay.addr()).await;
    let first = push(
        &format!("/3/device/{}", token(40)),
        "api.push.apple.com",
        "",
        PAYLOAD,
    );
    let (a, b) = first.split_at(first.len() - PAYLOAD.len() / 2);
    conn.send(a).await;
    conn.stream.flush().await.unwrap();
    let mut rest = b.to_vec();
    rest.extend_from_slice(&push(
        &format!("/3/device/{}", token(41)),
        "api.push.apple.com",
        "",
        PAYLOAD,
    ));
    conn.send(&rest).await;
    for _ in 0..2 {
        let answer = within(10, "answer", conn.read_answer()).await.unwrap();
        assert_eq!(answer.status, 200);
        assert!(answer.header("connection").is_none());
    }
    let got = s.origin.received();
    assert_eq!(got.len(), 2);
    assert!(got.iter().all(|r| r.body == PAYLOAD.as_bytes()));
}

/// A client that goes away inside its `Content-Length` body never gets a truncated push relayed
/// as complete.
#[tokio::test]
async fn body_that_breaks_off_is_never_relayed_as_complete() {
    let s = setup().await;
    let mut conn = RawConn::connect(s.relay.addr()).await;
    let broken = push(
        &format!("/3/device/{}", token(42)),
        "api.push.apple.com",
        "",
        PAYLOAD,
    );
    conn.send(&broken[..broken.len() - 5]).await;
    conn.stream.shutdown().await.unwrap();
    if let Some(answer) = within(10, "answer", conn.read_answer()).await {
        assert!(answer.status >= 400, "{}", answer.status);
    }
    assert!(conn.closed().await);
    // A whole push after it, on the same upstream connection, is the only one the origin sees.
    let target = format!("/3/device/{}", token(43));
    let answer = exchange(
        s.relay.addr(),
        &push(&target, "api.push.apple.com", "", PAYLOAD),
    )
    .await;
    assert_eq!(answer.status, 200);
    s.origin.wait_received(1).await;
    let got = s.origin.received();
    assert_eq!(got.len(), 1, "{got:?}");
    assert_eq!(got[0].path, target);
}

/// Pipelined requests are answered in the order they were sent.
#[tokio::test]
async fn pipelined_requests_answer_in_order() {
    let s = setup().await;
    let mut conn = RawConn::connect(s.relay.addr()).await;
    let mut bytes = Vec::new();
    for i in 0..5 {
        let req = format!(
            "POST /3/device/{} HTTP/1.1\r\nHost: api.push.apple.com\r\napns-topic: t\r\napns-id: 00000000-0000-4000-8000-00000000000{i}\r\nContent-Length: {}\r\n\r\n{PAYLOAD}",
            token(10 + i),
            PAYLOAD.len()
        );
        bytes.extend_from_slice(req.as_bytes());
    }
    conn.send(&bytes).await;
    for i in 0..5 {
        let answer = conn.read_answer().await.expect("an answer per request");
        assert_eq!(answer.status, 200);
        assert_eq!(
            answer.header("apns-id"),
            Some(format!("00000000-0000-4000-8000-00000000000{i}").as_str())
        );
    }
    assert_eq!(s.origin.received().len(), 5);
}

/// Each request on a kept-alive connection is routed by its own Host: the previous request's
/// route is reused only for the same host as written, and a refused host between allowed ones
/// changes nothing for them.
#[tokio::test]
async fn each_request_on_a_connection_is_routed_by_its_own_host() {
    let s = setup().await;
    let port = s.origin.port();
    let with_port = format!("api.push.apple.com:{port}");
    let hosts = [
        "api.push.apple.com",
        "fcm.googleapis.com",
        "api.push.apple.com",
        with_port.as_str(),
        "api.sandbox.push.apple.com",
        "api.push.apple.com:2197",
        "api.push.apple.com",
    ];
    let mut conn = RawConn::connect(s.relay.addr()).await;
    for (i, host) in hosts.iter().enumerate() {
        let refused = host.starts_with("fcm.") || host.ends_with(":2197");
        // Refused pushes go without a body: one left unread would close the connection.
        let body = if refused { "" } else { PAYLOAD };
        conn.send(&push(
            &format!("/3/device/{}", token(20 + i)),
            host,
            "",
            body,
        ))
        .await;
        let answer = conn.read_answer().await.expect("an answer per request");
        let want = if refused { 403 } else { 200 };
        assert_eq!(answer.status, want, "request {i} to {host}");
    }
    let authorities: Vec<_> = s
        .origin
        .received()
        .into_iter()
        .map(|r| r.authority.unwrap_or_default())
        .collect();
    assert_eq!(
        authorities,
        [
            "api.push.apple.com",
            "api.push.apple.com",
            with_port.as_str(),
            "api.sandbox.push.apple.com",
            "api.push.apple.com",
        ]
    );
}

/// CONNECT is refused: this door never tunnels.
#[tokio::test]
async fn connect_is_refused() {
    let s = setup().await;
    let port = s.origin.port();
    let req = format!(
        "CONNECT api.push.apple.com:{port} HTTP/1.1\r\nHost: api.push.apple.com:{port}\r\n\r\n"
    );
    let answer = exchange(s.relay.addr(), req.as_bytes()).await;
    assert_eq!(answer.status, 405);
    assert_eq!(answer.reason().as_deref(), Some("RelayMethodNotAllowed"));
    assert_eq!(s.origin.connection_count(), 0);
}

/// A host:port outside `destinations` gets 403 with a relay reason; nothing is connected.
#[tokio::test]
async fn destination_outside_allowlist_is_403() {
    let s = setup().await;
    let answers = [
        exchange(
            s.relay.addr(),
            &push("/3/device/x", "fcm.googleapis.com", "", PAYLOAD),
        )
        .await,
        exchange(
            s.relay.addr(),
            &push(
                "http://api.push.apple.com:2197/3/device/x",
                "api.push.apple.com:2197",
                "",
                PAYLOAD,
            ),
        )
        .await,
    ];
    for answer in answers {
        assert_eq!(answer.status, 403);
        assert_eq!(
            answer.reason().as_deref(),
            Some("RelayDestinationNotAllowed")
        );
    }
    assert_eq!(s.origin.connection_count(), 0);
    // Counted, but not under the names the client made up: series must not grow without bound.
    let metrics = s.relay.relay.metrics().render(s.relay.relay.pool());
    assert!(!metrics.contains("fcm.googleapis.com"), "{metrics}");
    assert!(!metrics.contains(":2197"), "{metrics}");
    assert!(
        metrics.contains("destination=\"\",status_class=\"4xx\"} 2"),
        "{metrics}"
    );
}

/// The origin's GOAWAY after a push is not the client's problem: the next push succeeds.
#[tokio::test]
async fn upstream_goaway_is_not_a_client_error() {
    let options = OriginOptions {
        goaway_after: Some(1),
        ..OriginOptions::default()
    };
    let s = setup_with(options, "").await;
    let mut conn = RawConn::connect(s.relay.addr()).await;
    for i in 0..3 {
        conn.send(&push(
            &format!("/3/device/{}", token(20 + i)),
            "api.push.apple.com",
            "",
            PAYLOAD,
        ))
        .await;
        let answer = conn.read_answer().await.unwrap();
        assert_eq!(answer.status, 200, "push {i}");
    }
    assert_eq!(s.origin.received().len(), 3);
    assert!(
        s.origin.connection_count() >= 2,
        "a new upstream connection replaced the one that went away"
    );
}

/// A body over `limits.max_request_body` is 413, declared or chunked.
#[tokio::test]
async fn body_over_the_limit_is_413() {
    let s = setup_with(
        OriginOptions::default(),
        "limits:\n  max_request_body: 64\n",
    )
    .await;
    let big = "x".repeat(100);
    let declared = exchange(
        s.relay.addr(),
        &push(
            &format!("/3/device/{}", token(30)),
            "api.push.apple.com",
            "",
            &big,
        ),
    )
    .await;
    assert_eq!(declared.status, 413);
    assert_eq!(declared.reason().as_deref(), Some("RelayRequestTooLarge"));
    let chunked = format!(
        "POST /3/device/{} HTTP/1.1\r\nHost: api.push.apple.com\r\napns-topic: t\r\nTransfer-Encoding: chunked\r\n\r\n64\r\n{big}\r\n0\r\n\r\n",
        token(31)
    );
    let answer = exchange(s.relay.addr(), chunked.as_bytes()).await;
    assert_eq!(answer.status, 413);
}

/// Idle keep-alive connections are closed after `limits.idle_timeout`.
#[tokio::test]
async fn idle_keepalive_connection_is_closed() {
    let s = setup_with(OriginOptions::default(), "limits:\n  idle_timeout: 300ms\n").await;
    let mut conn = RawConn::connect(s.relay.addr()).await;
    conn.send(&push(
        &format!("/3/device/{}", token(40)),
        "api.push.apple.com",
        "",
        PAYLOAD,
    ))
    .await;
    assert_eq!(conn.read_answer().await.unwrap().status, 200);
    let started = std::time::Instant::now();
    assert!(
        within(5, "idle close", conn.closed()).await,
        "the relay closes an idle connection"
    );
    assert!(started.elapsed() >= Duration::from_millis(250));
}

/// Shutdown closes a keep-alive connection waiting for its next request, and the relay stops.
#[tokio::test]
async fn shutdown_closes_idle_keepalive_connection() {
    let s = setup().await;
    let mut conn = RawConn::connect(s.relay.addr()).await;
    conn.send(&push(
        &format!("/3/device/{}", token(44)),
        "api.push.apple.com",
        "",
        PAYLOAD,
    ))
    .await;
    assert_eq!(conn.read_answer().await.unwrap().status, 200);
    within(10, "relay stop", s.relay.stop()).await;
    assert!(within(10, "close", conn.closed()).await);
}

/// Malformed and hostile request shapes, each with the status the relay must answer.
#[tokio::test]
async fn hostile_request_shapes_are_refused() {
    let s = setup().await;
    let t = format!("/3/device/{}", token(50));
    let big_header = format!(
        "POST {t} HTTP/1.1\r\nHost: api.push.apple.com\r\nX-Big: {}\r\n\r\n",
        "a".repeat(20_000)
    );
    let many_headers = format!(
        "GET / HTTP/1.1\r\nHost: api.push.apple.com\r\n{}\r\n",
        (0..200)
            .map(|i| format!("X-H{i}: v\r\n"))
            .collect::<String>()
    );
    let table: Vec<(&str, String, u16)> = vec![
        (
            "CL and TE",
            format!(
                "POST {t} HTTP/1.1\r\nHost: api.push.apple.com\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"
            ),
            400,
        ),
        (
            "TE and CL",
            format!(
                "POST {t} HTTP/1.1\r\nHost: api.push.apple.com\r\nTransfer-Encoding: chunked\r\nContent-Length: 4\r\n\r\n0\r\n\r\n"
            ),
            400,
        ),
        (
            "differing CLs",
            format!(
                "POST {t} HTTP/1.1\r\nHost: api.push.apple.com\r\nContent-Length: 4\r\nContent-Length: 5\r\n\r\nabcde"
            ),
            400,
        ),
        (
            "CL list",
            format!(
                "POST {t} HTTP/1.1\r\nHost: api.push.apple.com\r\nContent-Length: 4, 5\r\n\r\nabcde"
            ),
            400,
        ),
        (
            "negative CL",
            format!("POST {t} HTTP/1.1\r\nHost: api.push.apple.com\r\nContent-Length: -1\r\n\r\n"),
            400,
        ),
        (
            "hex CL",
            format!(
                "POST {t} HTTP/1.1\r\nHost: api.push.apple.com\r\nContent-Length: 0x10\r\n\r\n"
            ),
            400,
        ),
        (
            "TE gzip",
            format!(
                "POST {t} HTTP/1.1\r\nHost: api.push.apple.com\r\nTransfer-Encoding: gzip\r\n\r\n"
            ),
            400,
        ),
        (
            "TE chunked then gzip",
            format!(
                "POST {t} HTTP/1.1\r\nHost: api.push.apple.com\r\nTransfer-Encoding: chunked, gzip\r\n\r\n"
            ),
            400,
        ),
        (
            "TE identity",
            format!(
                "POST {t} HTTP/1.1\r\nHost: api.push.apple.com\r\nTransfer-Encoding: identity\r\n\r\n"
            ),
            400,
        ),
        (
            "TE twice",
            format!(
                "POST {t} HTTP/1.1\r\nHost: api.push.apple.com\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"
            ),
            400,
        ),
        (
            "TE in HTTP/1.0",
            format!(
                "POST {t} HTTP/1.0\r\nHost: api.push.apple.com\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"
            ),
            400,
        ),
        (
            "obs-fold",
            format!(
                "POST {t} HTTP/1.1\r\nHost: api.push.apple.com\r\nX-Folded: a\r\n b\r\nContent-Length: 0\r\n\r\n"
            ),
            400,
        ),
        (
            "space in header name",
            format!("POST {t} HTTP/1.1\r\nHost: api.push.apple.com\r\nBad Name: x\r\n\r\n"),
            400,
        ),
        (
            "space before colon",
            format!("POST {t} HTTP/1.1\r\nHost: api.push.apple.com\r\nContent-Length : 0\r\n\r\n"),
            400,
        ),
        (
            "NUL in value",
            format!("POST {t} HTTP/1.1\r\nHost: api.push.apple.com\r\nX-A: a\0b\r\n\r\n"),
            400,
        ),
        (
            "bare CR in value",
            format!("POST {t} HTTP/1.1\r\nHost: api.push.apple.com\r\nX-A: a\rb\r\n\r\n"),
            400,
        ),
        (
            "HTTP/1.1 without Host",
            format!("POST {t} HTTP/1.1\r\nContent-Length: 0\r\n\r\n"),
            400,
        ),
        (
            "HTTP/1.0 without Host",
            format!("POST {t} HTTP/1.0\r\nContent-Length: 0\r\n\r\n"),
            400,
        ),
        (
            "two Hosts",
            format!(
                "POST {t} HTTP/1.1\r\nHost: api.push.apple.com\r\nHost: evil.example\r\nContent-Length: 0\r\n\r\n"
            ),
            400,
        ),
        (
            "absolute vs Host",
            format!(
                "POST http://api.push.apple.com{t} HTTP/1.1\r\nHost: other.example\r\nContent-Length: 0\r\n\r\n"
            ),
            400,
        ),
        (
            "userinfo in target",
            format!(
                "POST http://u@api.push.apple.com{t} HTTP/1.1\r\nHost: api.push.apple.com\r\nContent-Length: 0\r\n\r\n"
            ),
            400,
        ),
        (
            "ftp target",
            format!(
                "POST ftp://api.push.apple.com{t} HTTP/1.1\r\nHost: api.push.apple.com\r\nContent-Length: 0\r\n\r\n"
            ),
            400,
        ),
        (
            "asterisk target",
            "OPTIONS * HTTP/1.1\r\nHost: api.push.apple.com\r\n\r\n".to_string(),
            400,
        ),
        (
            "HTTP/2.0 version",
            format!("POST {t} HTTP/2.0\r\nHost: api.push.apple.com\r\n\r\n"),
            400,
        ),
        (
            "bad chunk size",
            format!(
                "POST {t} HTTP/1.1\r\nHost: api.push.apple.com\r\napns-topic: t\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nabc\r\n0\r\n\r\n"
            ),
            400,
        ),
        (
            "chunk size with space",
            format!(
                "POST {t} HTTP/1.1\r\nHost: api.push.apple.com\r\napns-topic: t\r\nTransfer-Encoding: chunked\r\n\r\n3 \r\nabc\r\n0\r\n\r\n"
            ),
            400,
        ),
        (
            "chunk longer than size",
            format!(
                "POST {t} HTTP/1.1\r\nHost: api.push.apple.com\r\napns-topic: t\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabcdef\r\n0\r\n\r\n"
            ),
            400,
        ),
        (
            "Expect other",
            format!(
                "POST {t} HTTP/1.1\r\nHost: api.push.apple.com\r\nExpect: magic\r\nContent-Length: 0\r\n\r\n"
            ),
            417,
        ),
        (
            "CONNECT",
            "CONNECT evil.example:443 HTTP/1.1\r\nHost: evil.example:443\r\n\r\n".to_string(),
            405,
        ),
        ("header too large", big_header, 431),
        ("too many headers", many_headers, 431),
        (
            "disallowed destination",
            "POST http://internal.example:80/ HTTP/1.1\r\nHost: internal.example:80\r\nContent-Length: 0\r\n\r\n"
                .to_string(),
            403,
        ),
    ];
    assert!(table.len() >= 20);
    for (name, raw, status) in &table {
        let answer = within(10, name, exchange(s.relay.addr(), raw.as_bytes())).await;
        assert_eq!(
            answer.status,
            *status,
            "{name}: {:?}",
            String::from_utf8_lossy(&answer.body)
        );
        assert!(
            answer.reason().is_some_and(|r| r.starts_with("Relay")),
            "{name}: relay reason"
        );
    }
    assert!(
        s.origin.received().is_empty(),
        "no hostile shape may reach the origin"
    );
}

/// After a refused head the connection is closed, so nothing smuggled behind it is ever read.
#[tokio::test]
async fn smuggled_request_behind_a_refused_one_is_never_relayed() {
    let s = setup().await;
    let mut conn = RawConn::connect(s.relay.addr()).await;
    let smuggled = format!(
        "POST /3/device/{} HTTP/1.1\r\nHost: api.push.apple.com\r\nContent-Length: 6\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\nPOST /3/device/{} HTTP/1.1\r\nHost: api.push.apple.com\r\napns-topic: t\r\nContent-Length: 0\r\n\r\n",
        token(60),
        token(61)
    );
    conn.send(smuggled.as_bytes()).await;
    assert_eq!(conn.read_answer().await.unwrap().status, 400);
    assert!(conn.closed().await);
    assert!(s.origin.received().is_empty());
}

/// A TLS post-proxy listener with `client_ca` requires client certificates: a proxy without one
/// is refused, one with a certificate from that CA is served.
#[tokio::test]
async fn tls_listener_with_client_ca_requires_client_certificates() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let pki = TestPki::new();
    let origin = FakeApns::start(&pki).await;
    let tls = format!(
        "    tls:\n      ca_cert: \"{0}\"\n      ca_key: \"{1}\"\n      client_ca: \"{0}\"\n",
        pki.ca_cert.display(),
        pki.ca_key.display()
    );
    let yaml = relay::post_proxy_yaml(&pki, &origin, "").replace(
        "    allow_sources: [\"127.0.0.1/32\"]\n",
        &format!("{tls}    allow_sources: [\"127.0.0.1/32\"]\n"),
    );
    let relay = relay::start(&yaml).await;
    let request = push(
        &format!("/3/device/{}", token(70)),
        "api.push.apple.com",
        "",
        PAYLOAD,
    );
    let addr = relay.addr();
    let exchange_tls = |config: std::sync::Arc<rustls::ClientConfig>| {
        let request = request.clone();
        async move {
            let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
            let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
            let mut tls = tokio_rustls::TlsConnector::from(config)
                .connect(name, tcp)
                .await?;
            tls.write_all(&request).await?;
            let mut buf = vec![0u8; 4096];
            let n = tls.read(&mut buf).await?;
            Ok::<String, std::io::Error>(String::from_utf8_lossy(&buf[..n]).into_owned())
        }
    };
    let without = within(10, "no client cert", exchange_tls(pki.client_config(&[]))).await;
    assert!(
        without.is_err() || without.as_ref().is_ok_and(|s| s.is_empty()),
        "{without:?}"
    );
    let with = within(
        10,
        "client cert",
        exchange_tls(pki.client_config_with_cert("corp-proxy", &[])),
    )
    .await;
    assert!(
        with.as_ref().unwrap().starts_with("HTTP/1.1 200"),
        "{with:?}"
    );
    assert_eq!(origin.received().len(), 1);
}

/// Each shape that once carried a second request (or a hidden header) past the parser: the
/// relay answers 400 and closes, and the origin sees nothing of it.
#[tokio::test]
async fn smuggling_shapes_never_reach_the_origin() {
    let s = setup().await;
    let hidden = format!(
        "POST /3/device/{} HTTP/1.1\r\nHost: api.push.apple.com\r\napns-topic: t\r\nContent-Length: 0\r\n\r\n",
        token(81)
    );
    let chunked = |chunk: &str| {
        format!(
            "POST /3/device/{} HTTP/1.1\r\nHost: api.push.apple.com\r\napns-topic: t\r\nTransfer-Encoding: chunked\r\n\r\n{chunk}0\r\n\r\n{hidden}",
            token(80)
        )
    };
    let table = [
        // A lenient reader ends the size line at the LF (or CR) and takes `XX` as the data;
        // the relay used to read `2;…XX` as one line and `ab` as the data.
        ("LF in a chunk extension", chunked("2;\nXX\r\nab\r\n")),
        ("CR in a chunk extension", chunked("2;\rXX\r\nab\r\n")),
        ("bare LF after a chunk", chunked("2\r\nXX\n")),
        (
            "head ending in LF LF",
            format!(
                "GET /3/device/{} HTTP/1.1\r\nHost: api.push.apple.com\n\n{hidden}",
                token(82)
            ),
        ),
        (
            "header behind a bare LF",
            format!(
                "POST /3/device/{} HTTP/1.1\r\nHost: api.push.apple.com\r\nVisible: v\nSmuggled: 1\r\nContent-Length: 0\r\n\r\n",
                token(83)
            ),
        ),
    ];
    for (name, raw) in &table {
        let mut conn = RawConn::connect(s.relay.addr()).await;
        conn.send(raw.as_bytes()).await;
        let answer = within(10, name, conn.read_answer()).await.expect(name);
        assert_eq!(answer.status, 400, "{name}");
        // A bad head is `RelayBadRequest`; a bad chunk line, read once relaying began,
        // `RelayClientBodyFailed`.
        assert!(
            answer.reason().is_some_and(|r| r.starts_with("Relay")),
            "{name}: {:?}",
            answer.reason()
        );
        assert!(
            within(10, name, conn.closed()).await,
            "{name}: connection closed"
        );
    }
    // A chunked push's stream may have opened before its bad line arrived; none completed.
    assert!(s.origin.received().is_empty(), "{:?}", s.origin.received());
}

/// `Content-Length: N, N`, repeats and leading zeros are one length: the push is relayed with a
/// single canonical `content-length`, never a 502.
#[tokio::test]
async fn content_length_lists_go_upstream_as_one_canonical_value() {
    let s = setup().await;
    let n = PAYLOAD.len();
    for (i, cl) in [
        format!("Content-Length: {n}, {n}\r\n"),
        format!("Content-Length: {n}\r\nContent-Length: {n}\r\n"),
        format!("Content-Length: 00{n}\r\n"),
    ]
    .iter()
    .enumerate()
    {
        let raw = format!(
            "POST /3/device/{} HTTP/1.1\r\nHost: api.push.apple.com\r\napns-topic: t\r\n{cl}\r\n{PAYLOAD}",
            token(90 + i)
        );
        let answer = within(10, cl, exchange(s.relay.addr(), raw.as_bytes())).await;
        assert_eq!(answer.status, 200, "{cl:?}: {:?}", answer.reason());
    }
    let got = s.origin.received();
    assert_eq!(got.len(), 3);
    for r in got {
        let values: Vec<_> = r.headers.get_all("content-length").iter().collect();
        assert_eq!(values, [n.to_string().as_str()]);
        assert_eq!(r.body, PAYLOAD.as_bytes());
    }
}

/// A chunk size over `limits.max_request_body` is 413 at once, not a request left waiting for
/// data until `request_timeout`.
#[tokio::test]
async fn chunk_size_over_the_limit_is_413_at_once() {
    let s = setup_with(
        OriginOptions::default(),
        "limits:\n  max_request_body: 64\n",
    )
    .await;
    let mut conn = RawConn::connect(s.relay.addr()).await;
    let raw = format!(
        "POST /3/device/{} HTTP/1.1\r\nHost: api.push.apple.com\r\napns-topic: t\r\nTransfer-Encoding: chunked\r\n\r\nfffffffffffffff\r\nabc",
        token(95)
    );
    conn.send(raw.as_bytes()).await;
    // request_timeout is 30 s: an answer within 5 s is the refusal, not a timeout.
    let answer = within(5, "413", conn.read_answer()).await.unwrap();
    assert_eq!(answer.status, 413);
    assert_eq!(answer.reason().as_deref(), Some("RelayRequestTooLarge"));
    assert!(within(10, "close", conn.closed()).await);
}

/// After each refusal, what follows on the connection: a 403 for a destination (no body) keeps
/// the connection and the next push is relayed; after 405 (CONNECT), 417 and 431 the connection
/// closes and the pipelined request behind is never read.
#[tokio::test]
async fn pipelining_after_403_405_417_431() {
    let s = setup().await;
    let next = push(
        &format!("/3/device/{}", token(100)),
        "api.push.apple.com",
        "",
        PAYLOAD,
    );
    let big = "a".repeat(20_000);
    let table: [(u16, String, bool); 4] = [
        (
            403,
            "POST /3/device/x HTTP/1.1\r\nHost: fcm.googleapis.com\r\nContent-Length: 0\r\n\r\n".into(),
            true,
        ),
        (
            405,
            "CONNECT api.push.apple.com:443 HTTP/1.1\r\nHost: api.push.apple.com:443\r\n\r\n".into(),
            false,
        ),
        (
            417,
            "POST /3/device/x HTTP/1.1\r\nHost: api.push.apple.com\r\nExpect: magic\r\nContent-Length: 0\r\n\r\n".into(),
            false,
        ),
        (
            431,
            format!("POST /3/device/x HTTP/1.1\r\nHost: api.push.apple.com\r\nX-Big: {big}\r\n\r\n"),
            false,
        ),
    ];
    let mut relayed = 0;
    for (status, first, kept) in &table {
        let mut conn = RawConn::connect(s.relay.addr()).await;
        let mut bytes = first.clone().into_bytes();
        bytes.extend_from_slice(&next);
        conn.send(&bytes).await;
        let answer = within(10, "first answer", conn.read_answer())
            .await
            .unwrap();
        assert_eq!(answer.status, *status);
        if *kept {
            let second = within(10, "second", conn.read_answer()).await.unwrap();
            assert_eq!(second.status, 200, "after {status}");
            relayed += 1;
        } else {
            assert_eq!(answer.header("connection"), Some("close"), "after {status}");
            assert!(within(10, "close", conn.closed()).await, "after {status}");
        }
    }
    assert_eq!(s.origin.received().len(), relayed);
}

/// A refused request in absolute form is logged with its device token cut, in the path and in
/// the error text, as every other request is.
#[tokio::test]
async fn refused_absolute_form_request_logs_a_cut_device_token() {
    let (logs, _guard) = support::logs::capture();
    let s = setup().await;
    let device = "0123456789abcdef".repeat(4);
    let port = s.origin.port();
    for (target, host) in [
        // Refused by the destination allowlist.
        (
            format!("http://fcm.googleapis.com/3/device/{device}"),
            "fcm.googleapis.com".to_owned(),
        ),
        // Refused as a target (scheme), echoed into the error text.
        (
            format!("ftp://api.push.apple.com/3/device/{device}"),
            "api.push.apple.com".to_owned(),
        ),
        // Refused because target and Host differ.
        (
            format!("http://api.push.apple.com:{port}/3/device/{device}"),
            "other.example".to_owned(),
        ),
    ] {
        let answer = exchange(s.relay.addr(), &push(&target, &host, "", "")).await;
        assert!(answer.status >= 400, "{target}");
    }
    let text = logs.text();
    assert_eq!(text.matches("refused").count(), 3, "{text}");
    assert!(
        text.contains(&format!("/3/device/{}…", &device[..8])),
        "{text}"
    );
    assert!(
        !text.contains(&device[..9]),
        "a whole device token was logged: {text}"
    );
}
