//! The pre-proxy relay end to end: a real HTTP/2 client reaches the relay as `api.push.apple.com`,
//! and the push reaches a fake APNs origin directly or through a CONNECT proxy.

mod support;

use std::sync::Arc;

use bytes::Bytes;
use futures_util::future::join_all;
use http::StatusCode;
use support::client::{Connect, H2Client, push_request};
use support::http1::RawConn;
use support::origin::{FakeApns, OriginOptions};
use support::pki::TestPki;
use support::proxy::{Behaviour, TestProxy};
use support::relay::{self, Via};
use support::{token, within};

const PAYLOAD: &str =
    r#"{"aps":{"alert":{"title":"Hi","body":"A message for you"},"sound":"default"},"ack_id":"x"}"#;

/// Sends one push with every APNs header and checks what the origin saw and what came back.
async fn push_arrives_unaltered(via: Via) -> (FakeApns, TestPki) {
    let pki = TestPki::new();
    let origin = FakeApns::start(&pki).await;
    let relay = relay::start(&relay::pre_proxy_yaml(&pki, &origin, via)).await;
    let client = H2Client::connect(&pki, relay.addr()).await;

    let mut req = push_request("api.push.apple.com", &token(1));
    let headers = req.headers_mut();
    headers.insert(
        "apns-id",
        "123e4567-e89b-12d3-a456-426614174000".parse().unwrap(),
    );
    headers.insert("apns-collapse-id", "thread-7".parse().unwrap());
    let answer = within(10, "push", client.send(req.clone(), Bytes::from(PAYLOAD)))
        .await
        .unwrap();

    assert_eq!(answer.status, StatusCode::OK);
    assert_eq!(
        answer.headers["apns-id"],
        "123e4567-e89b-12d3-a456-426614174000"
    );
    assert!(
        answer.body.is_empty(),
        "APNs answers 200 with an empty body"
    );

    let received = origin.received();
    assert_eq!(received.len(), 1);
    let got = &received[0];
    assert_eq!(got.method, "POST");
    assert_eq!(got.path, format!("/3/device/{}", token(1)));
    assert_eq!(got.authority.as_deref(), Some("api.push.apple.com"));
    assert_eq!(got.body, PAYLOAD.as_bytes());
    for (name, value) in req.headers() {
        assert_eq!(
            got.headers.get(name),
            Some(value),
            "header {name} changed or missing"
        );
    }
    assert!(
        got.headers.get("host").is_none(),
        "origin must not receive a stray host header"
    );
    relay.stop().await;
    (origin, pki)
}

/// A push with every apns-* header and its body arrive byte-identical, directly.
#[tokio::test]
async fn push_arrives_unaltered_direct() {
    push_arrives_unaltered(Via::Direct).await;
}

/// The same through a CONNECT proxy with Basic auth; one tunnel carries it.
#[tokio::test]
async fn push_arrives_unaltered_through_proxy_with_basic_auth() {
    let proxy = TestProxy::start(Behaviour::Auth {
        user: "relay".into(),
        pass: "s3cret".into(),
    })
    .await;
    push_arrives_unaltered(Via::Proxy(proxy.url_with("relay", "s3cret"))).await;
    assert_eq!(proxy.tunnel_count(), 1);
    let heads = proxy.heads.lock().unwrap().clone();
    assert!(
        heads[0].starts_with("CONNECT api.push.apple.com:"),
        "{}",
        heads[0]
    );
}

/// Apple's error answers (status, apns-id and JSON reason) come back unchanged.
#[tokio::test]
async fn apple_error_answers_come_back_unchanged() {
    let pki = TestPki::new();
    let origin = FakeApns::start(&pki).await;
    let relay = relay::start(&relay::pre_proxy_yaml(&pki, &origin, Via::Direct)).await;
    let client = H2Client::connect(&pki, relay.addr()).await;

    let bad = client.push("not-a-token", PAYLOAD).await;
    assert_eq!(bad.status, StatusCode::BAD_REQUEST);
    assert_eq!(bad.body, r#"{"reason":"BadDeviceToken"}"#);
    assert!(bad.headers.contains_key("apns-id"));

    let gone_token = format!("dead{}", &token(2)[4..]);
    let gone = client.push(&gone_token, PAYLOAD).await;
    assert_eq!(gone.status, StatusCode::GONE);
    assert_eq!(
        gone.body,
        r#"{"reason":"Unregistered","timestamp":1700000000000}"#
    );
    assert_eq!(gone.headers["content-type"], "application/json");
    relay.stop().await;
}

/// A client that offers no ALPN but speaks HTTP/2 (pushy, aioapns) is served HTTP/2.
#[tokio::test]
async fn client_without_alpn_is_served_http2() {
    let pki = TestPki::new();
    let origin = FakeApns::start(&pki).await;
    let relay = relay::start(&relay::pre_proxy_yaml(&pki, &origin, Via::Direct)).await;
    let mut connect = Connect::new(relay.addr());
    connect.alpn = false;
    let client = H2Client::connect_with(&pki, connect).await.unwrap();
    assert_eq!(client.alpn, None, "no ALPN was negotiated");
    let answer = client.push(&token(3), PAYLOAD).await;
    assert_eq!(answer.status, StatusCode::OK);
    assert_eq!(origin.received().len(), 1);
    relay.stop().await;
}

/// An HTTP/2 client connection with no stream open for `limits.idle_timeout` is sent GOAWAY and
/// closed; one whose stream stays open longer than that is not cut, and takes new pushes after.
#[tokio::test]
async fn idle_http2_client_is_closed_but_an_open_stream_keeps_its_connection() {
    let pki = TestPki::new();
    let (origin, hold) = FakeApns::start_holding(&pki, OriginOptions::default()).await;
    let yaml = format!(
        "{}limits:\n  idle_timeout: 1s\n",
        relay::pre_proxy_yaml(&pki, &origin, Via::Direct)
    );
    let relay = relay::start(&yaml).await;
    let busy = Arc::new(H2Client::connect(&pki, relay.addr()).await);
    let held = tokio::spawn({
        let busy = busy.clone();
        async move { busy.push(&token(70), PAYLOAD).await }
    });
    origin.wait_received(1).await;
    // This one connects after the push above started and stays idle; when the relay has closed
    // it, the busy connection has had its stream open for longer than the idle timeout.
    let mut idle = H2Client::connect(&pki, relay.addr()).await;
    let started = std::time::Instant::now();
    within(10, "the idle connection closed", idle.closed()).await;
    assert!(started.elapsed() >= std::time::Duration::from_millis(900));
    assert!(!busy.is_closed(), "a connection with a stream open is kept");
    hold.add_permits(2);
    let answer = within(10, "the held push answered", held).await.unwrap();
    assert_eq!(answer.status, StatusCode::OK);
    let next = within(10, "a push after", busy.push(&token(71), PAYLOAD)).await;
    assert_eq!(
        next.status,
        StatusCode::OK,
        "no GOAWAY for the busy connection"
    );
    assert_eq!(origin.received().len(), 2);
    relay.stop().await;
}

/// 100 concurrent pushes from four clients share one upstream connection.
#[tokio::test]
async fn hundred_concurrent_pushes_share_one_upstream_connection() {
    let pki = TestPki::new();
    let origin = FakeApns::start(&pki).await;
    let relay = relay::start(&relay::pre_proxy_yaml(&pki, &origin, Via::Direct)).await;
    let mut clients = Vec::new();
    for _ in 0..4 {
        clients.push(Arc::new(H2Client::connect(&pki, relay.addr()).await));
    }
    let pushes = (0..100).map(|i| {
        let client = clients[i % 4].clone();
        async move { client.push(&token(100 + i), PAYLOAD).await }
    });
    let answers = within(20, "100 pushes", join_all(pushes)).await;
    assert!(answers.iter().all(|a| a.status == StatusCode::OK));
    assert_eq!(origin.received().len(), 100);
    assert_eq!(
        origin.connection_count(),
        1,
        "every push must share one upstream connection"
    );
    relay.stop().await;
}

/// A client whose address is outside allow_sources is closed before TLS; nothing reaches the origin.
#[tokio::test]
async fn source_outside_allow_sources_is_refused() {
    let pki = TestPki::new();
    let origin = FakeApns::start(&pki).await;
    let relay = relay::start(&relay::pre_proxy_yaml(&pki, &origin, Via::Direct)).await;
    let mut connect = Connect::new(relay.addr());
    connect.from = Some("127.0.0.2".parse().unwrap());
    let result = within(10, "refused connect", H2Client::connect_with(&pki, connect)).await;
    assert!(
        result.is_err(),
        "a client from 127.0.0.2 must not complete TLS"
    );
    // The same relay still serves an allowed client.
    let client = H2Client::connect(&pki, relay.addr()).await;
    assert_eq!(client.push(&token(4), PAYLOAD).await.status, StatusCode::OK);
    assert_eq!(origin.received().len(), 1);
    relay.stop().await;
}

/// SNI for a host outside destinations gets no certificate: the handshake fails.
#[tokio::test]
async fn sni_outside_destinations_is_refused() {
    let pki = TestPki::new();
    let origin = FakeApns::start(&pki).await;
    let relay = relay::start(&relay::pre_proxy_yaml(&pki, &origin, Via::Direct)).await;
    let mut connect = Connect::new(relay.addr());
    connect.sni = "www.example.com";
    let result = within(10, "handshake", H2Client::connect_with(&pki, connect)).await;
    let err = result
        .err()
        .expect("handshake for www.example.com must fail");
    assert!(
        err.to_string().contains("alert") || err.to_string().contains("Handshake"),
        "{err}"
    );
    assert!(origin.received().is_empty());
    relay.stop().await;
}

/// A request whose :authority is not the SNI host is answered 421 by the relay.
#[tokio::test]
async fn authority_outside_sni_is_misdirected() {
    let pki = TestPki::new();
    let origin = FakeApns::start(&pki).await;
    let relay = relay::start(&relay::pre_proxy_yaml(&pki, &origin, Via::Direct)).await;
    let client = H2Client::connect(&pki, relay.addr()).await;
    let answer = client
        .send(
            push_request("evil.example.com", &token(5)),
            Bytes::from(PAYLOAD),
        )
        .await
        .unwrap();
    assert_eq!(answer.status, StatusCode::MISDIRECTED_REQUEST);
    assert_eq!(answer.reason().as_deref(), Some("RelayMisdirectedRequest"));
    assert!(origin.received().is_empty());
    relay.stop().await;
}

/// `:authority` with the port (curl) and the sandbox host both work; sandbox answers keep apns-unique-id.
#[tokio::test]
async fn authority_with_port_and_sandbox_host_work() {
    let pki = TestPki::new();
    let origin = FakeApns::start(&pki).await;
    let relay = relay::start(&relay::pre_proxy_yaml(&pki, &origin, Via::Direct)).await;
    let mut connect = Connect::new(relay.addr());
    connect.sni = "api.sandbox.push.apple.com";
    let client = H2Client::connect_with(&pki, connect).await.unwrap();
    let answer = client
        .send(
            push_request("api.sandbox.push.apple.com:443", &token(6)),
            Bytes::from(PAYLOAD),
        )
        .await
        .unwrap();
    assert_eq!(answer.status, StatusCode::OK);
    assert!(answer.headers.contains_key("apns-unique-id"));
    let got = origin.received();
    assert_eq!(
        got[0].authority.as_deref(),
        Some(format!("api.sandbox.push.apple.com:{}", origin.port()).as_str())
    );
    relay.stop().await;
}

/// Every way of writing `:authority` (and `Host`) is judged against the SNI host, the quick exact
/// match included: what goes upstream, and what is refused.
#[tokio::test]
async fn authority_forms_are_judged_against_the_sni_host() {
    let pki = TestPki::new();
    let origin = FakeApns::start(&pki).await;
    let relay = relay::start(&relay::pre_proxy_yaml(&pki, &origin, Via::Direct)).await;
    let client = H2Client::connect(&pki, relay.addr()).await;
    let with_port = format!("api.push.apple.com:{}", origin.port());
    // (authority, Host header, status, :authority at the origin)
    let cases: [(&str, Option<&str>, StatusCode, Option<&str>); 8] = [
        (
            "api.push.apple.com",
            None,
            StatusCode::OK,
            Some("api.push.apple.com"),
        ),
        (
            "api.push.apple.com:443",
            None,
            StatusCode::OK,
            Some(&with_port),
        ),
        (
            "API.Push.Apple.com",
            None,
            StatusCode::OK,
            Some("api.push.apple.com"),
        ),
        (
            "api.push.apple.com.",
            None,
            StatusCode::OK,
            Some("api.push.apple.com"),
        ),
        (
            "api.push.apple.com.evil.example",
            None,
            StatusCode::MISDIRECTED_REQUEST,
            None,
        ),
        ("api.push.apple.com:0", None, StatusCode::BAD_REQUEST, None),
        (
            "api.push.apple.com",
            Some("evil.example"),
            StatusCode::BAD_REQUEST,
            None,
        ),
        (
            "api.push.apple.com",
            Some("api.push.apple.com"),
            StatusCode::OK,
            Some("api.push.apple.com"),
        ),
    ];
    let mut expected = Vec::new();
    for (i, (authority, host, status, upstream)) in cases.into_iter().enumerate() {
        let mut req = push_request(authority, &token(60 + i));
        if let Some(host) = host {
            req.headers_mut().insert("host", host.parse().unwrap());
        }
        let answer = client.send(req, Bytes::from(PAYLOAD)).await.unwrap();
        assert_eq!(answer.status, status, "{authority} with Host {host:?}");
        expected.extend(upstream.map(str::to_owned));
    }
    let got: Vec<_> = origin
        .received()
        .into_iter()
        .map(|r| r.authority.unwrap_or_default())
        .collect();
    assert_eq!(got, expected);
    relay.stop().await;
}

/// The proxy answers 407 to wrong credentials: the relay answers 502 with a relay reason.
#[tokio::test]
async fn proxy_407_becomes_502_with_relay_reason() {
    let pki = TestPki::new();
    let origin = FakeApns::start(&pki).await;
    let proxy = TestProxy::start(Behaviour::Auth {
        user: "relay".into(),
        pass: "right".into(),
    })
    .await;
    let yaml = relay::pre_proxy_yaml(&pki, &origin, Via::Proxy(proxy.url_with("relay", "wrong")));
    let relay = relay::start(&yaml).await;
    let client = H2Client::connect(&pki, relay.addr()).await;
    let answer = client.push(&token(7), PAYLOAD).await;
    assert_eq!(answer.status, StatusCode::BAD_GATEWAY);
    assert_eq!(
        answer.reason().as_deref(),
        Some("RelayProxyAuthenticationRequired")
    );
    assert!(origin.received().is_empty());
    relay.stop().await;
}

/// The proxy refuses the tunnel (403): 502 RelayProxyRefused.
#[tokio::test]
async fn proxy_403_becomes_502_proxy_refused() {
    let pki = TestPki::new();
    let origin = FakeApns::start(&pki).await;
    let proxy = TestProxy::start(Behaviour::Forbid).await;
    let relay = relay::start(&relay::pre_proxy_yaml(
        &pki,
        &origin,
        Via::Proxy(proxy.url()),
    ))
    .await;
    let client = H2Client::connect(&pki, relay.addr()).await;
    let answer = client.push(&token(8), PAYLOAD).await;
    assert_eq!(answer.status, StatusCode::BAD_GATEWAY);
    assert_eq!(answer.reason().as_deref(), Some("RelayProxyRefused"));
    relay.stop().await;
}

/// No ride-out (`reconnect_wait: 0s`).
fn failing_fast(yaml: String) -> String {
    yaml.replace(
        "connect_timeout: 2s",
        "connect_timeout: 2s\n  reconnect_wait: 0s",
    )
}

/// A proxy that never answers CONNECT, no ride-out: 504 within the configured connect timeout
/// (2 s here).
#[tokio::test]
async fn silent_proxy_becomes_504_within_the_timeout() {
    let pki = TestPki::new();
    let origin = FakeApns::start(&pki).await;
    let proxy = TestProxy::start(Behaviour::Silent).await;
    let relay = relay::start(&failing_fast(relay::pre_proxy_yaml(
        &pki,
        &origin,
        Via::Proxy(proxy.url()),
    )))
    .await;
    let client = H2Client::connect(&pki, relay.addr()).await;
    let started = std::time::Instant::now();
    let answer = within(10, "silent proxy", client.push(&token(9), PAYLOAD)).await;
    assert_eq!(answer.status, StatusCode::GATEWAY_TIMEOUT);
    assert_eq!(answer.reason().as_deref(), Some("RelayProxyTimeout"));
    let waited = started.elapsed();
    assert!(
        waited < std::time::Duration::from_secs(4),
        "took {waited:?}, timeout is 2s"
    );
    relay.stop().await;
}

/// An unreachable origin gives 502 RelayUpstreamUnreachable, and with no ride-out, while it
/// stays down the next request fails fast with the same answer.
#[tokio::test]
async fn unreachable_origin_is_502_and_fails_fast_while_down() {
    let pki = TestPki::new();
    // A port with nothing listening: bind, read the port, close.
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let relay = relay::start(&failing_fast(relay::pre_proxy_yaml_on(
        &pki,
        port,
        Via::Direct,
    )))
    .await;
    let client = H2Client::connect(&pki, relay.addr()).await;
    let first = client.push(&token(10), PAYLOAD).await;
    assert_eq!(first.status, StatusCode::BAD_GATEWAY);
    assert_eq!(first.reason().as_deref(), Some("RelayUpstreamUnreachable"));
    let second = client.push(&token(11), PAYLOAD).await;
    assert_eq!(second.status, StatusCode::BAD_GATEWAY);
    assert_eq!(second.reason().as_deref(), Some("RelayUpstreamUnreachable"));
    relay.stop().await;
}

/// HPACK "literal without indexing, new name", no Huffman: enough to send any header by hand.
fn hpack_literal(out: &mut Vec<u8>, name: &str, value: &str) {
    assert!(name.len() < 127 && value.len() < 127);
    out.push(0x00);
    out.push(name.len() as u8);
    out.extend_from_slice(name.as_bytes());
    out.push(value.len() as u8);
    out.extend_from_slice(value.as_bytes());
}

fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = payload.len() as u32;
    let mut f = vec![(len >> 16) as u8, (len >> 8) as u8, len as u8, kind, flags];
    f.extend_from_slice(&stream.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

/// An aioapns-shaped request (`:scheme`, `:path`, a `host` header and no `:authority`, which the
/// h2 client crate cannot send) is relayed with `:authority` from `host` and no stray `host`.
#[tokio::test]
async fn request_with_host_header_and_no_authority_is_relayed() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let pki = TestPki::new();
    let origin = FakeApns::start(&pki).await;
    let relay = relay::start(&relay::pre_proxy_yaml(&pki, &origin, Via::Direct)).await;
    let tcp = tokio::net::TcpStream::connect(relay.addr()).await.unwrap();
    let name = rustls::pki_types::ServerName::try_from("api.push.apple.com").unwrap();
    let mut tls = tokio_rustls::TlsConnector::from(pki.client_config(&[b"h2"]))
        .connect(name, tcp)
        .await
        .unwrap();
    let mut block = Vec::new();
    for (k, v) in [
        (":method", "POST"),
        (":scheme", "https"),
        (":path", &*format!("/3/device/{}", token(90))),
        ("host", "api.push.apple.com"),
        ("apns-topic", "com.example.app"),
    ] {
        hpack_literal(&mut block, k, v);
    }
    let mut out = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    out.extend(frame(0x4, 0, 0, &[]));
    out.extend(frame(0x1, 0x4, 1, &block));
    out.extend(frame(0x0, 0x1, 1, PAYLOAD.as_bytes()));
    tls.write_all(&out).await.unwrap();

    // Read frames until the answer's HEADERS on stream 1; ACK the relay's SETTINGS on the way.
    let first_byte = within(10, "answer headers", async {
        loop {
            let mut head = [0u8; 9];
            tls.read_exact(&mut head).await.unwrap();
            let len = ((head[0] as usize) << 16) | ((head[1] as usize) << 8) | head[2] as usize;
            let mut payload = vec![0u8; len];
            tls.read_exact(&mut payload).await.unwrap();
            let stream = u32::from_be_bytes([head[5], head[6], head[7], head[8]]) & 0x7fff_ffff;
            if head[3] == 0x4 && head[4] & 0x1 == 0 {
                tls.write_all(&frame(0x4, 0x1, 0, &[])).await.unwrap();
            }
            if head[3] == 0x1 && stream == 1 {
                // Skip dynamic-table size updates (001xxxxx) before the first field.
                return payload.into_iter().find(|b| b & 0xe0 != 0x20).unwrap();
            }
        }
    })
    .await;
    assert_eq!(first_byte, 0x88, "HPACK static index 8 is :status 200");
    let got = origin.received();
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].authority.as_deref(), Some("api.push.apple.com"));
    assert!(got[0].headers.get("host").is_none());
    assert_eq!(got[0].body, PAYLOAD.as_bytes());
}

/// With ALPN http/1.1 the pre-proxy door serves HTTP/1.1 and still relays over HTTP/2.
#[tokio::test]
async fn http11_client_over_tls_is_relayed() {
    let pki = TestPki::new();
    let origin = FakeApns::start(&pki).await;
    let relay = relay::start(&relay::pre_proxy_yaml(&pki, &origin, Via::Direct)).await;
    let tcp = tokio::net::TcpStream::connect(relay.addr()).await.unwrap();
    let name = rustls::pki_types::ServerName::try_from("api.push.apple.com").unwrap();
    let tls = tokio_rustls::TlsConnector::from(pki.client_config(&[b"http/1.1"]))
        .connect(name, tcp)
        .await
        .unwrap();
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"http/1.1"[..]));
    let answer = support::http1::push_over(tls, &token(91), PAYLOAD).await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(answer.to_ascii_lowercase().contains("apns-id:"), "{answer}");
    assert_eq!(origin.received()[0].body, PAYLOAD.as_bytes());
}

/// TLS with ALPN http/1.1 to the pre-proxy door, for the tests below.
async fn http11_over_tls(
    pki: &TestPki,
    addr: std::net::SocketAddr,
) -> tokio_rustls::client::TlsStream<tokio::net::TcpStream> {
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let name = rustls::pki_types::ServerName::try_from("api.push.apple.com").unwrap();
    let tls = tokio_rustls::TlsConnector::from(pki.client_config(&[b"http/1.1"]))
        .connect(name, tcp)
        .await
        .unwrap();
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"http/1.1"[..]));
    tls
}

/// A client that chose ALPN http/1.1 is served HTTP/1.1 only: the HTTP/2 preface after it is
/// not taken as a switch to HTTP/2.
#[tokio::test]
async fn alpn_http11_client_is_never_switched_to_http2() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let pki = TestPki::new();
    let origin = FakeApns::start(&pki).await;
    let relay = relay::start(&relay::pre_proxy_yaml(&pki, &origin, Via::Direct)).await;
    let mut tls = http11_over_tls(&pki, relay.addr()).await;
    // The preface and an empty SETTINGS frame.
    tls.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\0\0\0\x04\0\0\0\0\0")
        .await
        .unwrap();
    let mut answer = Vec::new();
    let _ = within(10, "answer or close", tls.read_to_end(&mut answer)).await;
    assert!(
        answer.is_empty() || answer.starts_with(b"HTTP/1.1 "),
        "an HTTP/2 answer to an http/1.1 client: {answer:?}"
    );
    assert_eq!(origin.connection_count(), 0);
}

/// The HTTP/1.1 head read on the pre-proxy door is bounded by `handshake_timeout`, not by the
/// much longer `idle_timeout`: a client trickling a head is answered 408 and cut off.
#[tokio::test]
async fn http11_head_read_is_bounded_by_handshake_timeout() {
    let pki = TestPki::new();
    let origin = FakeApns::start(&pki).await;
    let yaml = relay::pre_proxy_yaml(&pki, &origin, Via::Direct)
        + "limits:\n  handshake_timeout: 300ms\n  idle_timeout: 300s\n";
    let relay = relay::start(&yaml).await;
    let mut conn = RawConn::over(http11_over_tls(&pki, relay.addr()).await);
    conn.send(b"POST /3/device/x HTTP/1.1\r\nHost: api.push.apple.com\r\n")
        .await;
    let started = std::time::Instant::now();
    let answer = within(5, "the relay answers", conn.read_answer())
        .await
        .expect("an answer before close");
    assert_eq!(answer.status, 408);
    assert_eq!(answer.reason().as_deref(), Some("RelayRequestTimeout"));
    assert!(started.elapsed() < std::time::Duration::from_secs(3));
    assert!(within(5, "closed", conn.closed()).await);
    assert_eq!(origin.connection_count(), 0);
}

/// The serial number of the leaf the relay presents for api.push.apple.com.
async fn served_serial(pki: &TestPki, addr: std::net::SocketAddr) -> Vec<u8> {
    let tls = http11_over_tls(pki, addr).await;
    let leaf = tls.get_ref().1.peer_certificates().unwrap()[0].clone();
    let (_, cert) = x509_parser::parse_x509_certificate(&leaf).unwrap();
    cert.raw_serial().to_vec()
}

/// Minted leaves are minted again when certificates are renewed (which the running relay does
/// `REMINT_AFTER` after the last minting, well inside their validity): new handshakes get the
/// new leaf.
#[tokio::test]
async fn minted_leaves_are_minted_again_on_renewal() {
    let pki = TestPki::new();
    let origin = FakeApns::start(&pki).await;
    let relay = relay::start(&relay::pre_proxy_yaml(&pki, &origin, Via::Direct)).await;
    let before = served_serial(&pki, relay.addr()).await;
    assert_eq!(
        served_serial(&pki, relay.addr()).await,
        before,
        "stable between renewals"
    );
    assert!(!relay.reloader.remint_due(), "not due right after start");
    relay.reloader.renew_certificates().unwrap();
    assert_ne!(served_serial(&pki, relay.addr()).await, before);
    const {
        assert!(
            pushrelay::reload::REMINT_AFTER.as_secs()
                < pushrelay::tls::pki::LEAF_VALIDITY_DAYS as u64 * 86_400
        )
    };
}

/// The serial number of the leaf `tls` was served.
fn serial_of<IO>(tls: &tokio_rustls::client::TlsStream<IO>) -> Vec<u8> {
    let leaf = tls.get_ref().1.peer_certificates().unwrap()[0].clone();
    let (_, cert) = x509_parser::parse_x509_certificate(&leaf).unwrap();
    cert.raw_serial().to_vec()
}

/// A running relay mints its listener leaves again once they are due (made due through the
/// reloader's clock seam, not by waiting a year): the next TLS client is served a fresh leaf,
/// and connections opened before it (HTTP/2 and HTTP/1.1 keep-alive) go on working.
#[tokio::test]
async fn a_running_relay_mints_a_due_leaf_again_and_open_connections_keep_working() {
    let pki = TestPki::new();
    let origin = FakeApns::start(&pki).await;
    let relay = relay::start(&relay::pre_proxy_yaml(&pki, &origin, Via::Direct)).await;
    let h2 = H2Client::connect(&pki, relay.addr()).await;
    assert_eq!(h2.push(&token(120), PAYLOAD).await.status, StatusCode::OK);
    let tls = http11_over_tls(&pki, relay.addr()).await;
    let before = serial_of(&tls);
    let mut http1 = RawConn::over(tls);
    let push = |i: usize| {
        format!(
            "POST /3/device/{} HTTP/1.1\r\nHost: api.push.apple.com\r\napns-topic: t\r\n\
             Content-Length: {}\r\n\r\n{PAYLOAD}",
            token(i),
            PAYLOAD.len()
        )
    };
    http1.send(push(121).as_bytes()).await;
    let answer = within(10, "first push", http1.read_answer()).await.unwrap();
    assert_eq!(answer.status, 200);

    let mut due = relay.reloader.remint_at();
    let made_due = tokio::time::Instant::now();
    relay.reloader.make_remint_due();
    // Minted again: the next due moment is a long way off once more.
    let next = within(
        10,
        "the relay mints again",
        due.wait_for(|at| *at > made_due + std::time::Duration::from_secs(86_400)),
    )
    .await
    .map(|at| *at)
    .unwrap();
    assert!(next >= made_due + pushrelay::reload::REMINT_AFTER);
    assert!(!relay.reloader.remint_due());
    let after = served_serial(&pki, relay.addr()).await;
    assert_ne!(after, before, "a new handshake gets the fresh leaf");
    assert_eq!(
        served_serial(&pki, relay.addr()).await,
        after,
        "minted once"
    );

    assert_eq!(h2.push(&token(122), PAYLOAD).await.status, StatusCode::OK);
    http1.send(push(123).as_bytes()).await;
    let answer = within(10, "push on the old connection", http1.read_answer())
        .await
        .unwrap();
    assert_eq!(answer.status, 200);
    assert_eq!(origin.received().len(), 4);
    relay.stop().await;
}

/// TLS to the pre-proxy door offering `alpn` (none: no ALPN, the HTTP/2 preface sniffed).
async fn tls_with_alpn(
    pki: &TestPki,
    addr: std::net::SocketAddr,
    alpn: &[&[u8]],
) -> tokio_rustls::client::TlsStream<tokio::net::TcpStream> {
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let name = rustls::pki_types::ServerName::try_from("api.push.apple.com").unwrap();
    tokio_rustls::TlsConnector::from(pki.client_config(alpn))
        .connect(name, tcp)
        .await
        .unwrap()
}

/// One raw request on a fresh connection; the answer's status and reason, and whether the relay
/// closed the connection after it.
async fn refused_on<S>(mut conn: RawConn<S>, raw: &str, name: &str) -> (u16, Option<String>, bool)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    conn.send(raw.as_bytes()).await;
    let answer = within(10, name, conn.read_answer()).await.expect(name);
    let closed =
        answer.header("connection") == Some("close") && within(10, name, conn.closed()).await;
    (answer.status, answer.reason(), closed)
}

/// HTTP/1.1 on the pre-proxy door (ALPN http/1.1, or no ALPN and no preface) is read by the same
/// strict parser as the post-proxy door: every smuggling shape gets the very answer post-proxy
/// gives (status, reason, connection closed), and none reaches the origin.
#[tokio::test]
async fn http11_hostile_shapes_are_refused_as_post_proxy_refuses_them() {
    let pki = TestPki::new();
    let origin = FakeApns::start(&pki).await;
    let pre = relay::start(&relay::pre_proxy_yaml(&pki, &origin, Via::Direct)).await;
    let post = relay::start(&relay::post_proxy_yaml(&pki, &origin, "")).await;
    let hidden = format!(
        "POST /3/device/{} HTTP/1.1\r\nHost: api.push.apple.com\r\napns-topic: t\r\nContent-Length: 0\r\n\r\n",
        token(93)
    );
    let post_head = |extra: &str| {
        format!(
            "POST /3/device/{} HTTP/1.1\r\nHost: api.push.apple.com\r\napns-topic: t\r\n{extra}",
            token(94)
        )
    };
    let chunked = |chunk: &str| {
        post_head(&format!(
            "Transfer-Encoding: chunked\r\n\r\n{chunk}0\r\n\r\n{hidden}"
        ))
    };
    let table: [(&str, String, u16, bool); 13] = [
        (
            "HTTP/1.1 without Host",
            format!(
                "POST /3/device/{} HTTP/1.1\r\napns-topic: t\r\nContent-Length: 0\r\n\r\n",
                token(94)
            ),
            400,
            false,
        ),
        (
            "Transfer-Encoding in HTTP/1.0",
            format!(
                "POST /3/device/{} HTTP/1.0\r\nHost: api.push.apple.com\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
                token(94)
            ),
            400,
            true,
        ),
        (
            "head ending in LF LF",
            format!(
                "GET /3/device/{} HTTP/1.1\r\nHost: api.push.apple.com\n\n{hidden}",
                token(95)
            ),
            400,
            true,
        ),
        (
            "bare CR in the head",
            post_head("X-A: a\rb\r\nContent-Length: 0\r\n\r\n"),
            400,
            true,
        ),
        (
            "header behind a bare LF",
            post_head("Visible: v\nSmuggled: 1\r\nContent-Length: 0\r\n\r\n"),
            400,
            true,
        ),
        (
            "LF in a chunk extension",
            chunked("2;\nXX\r\nab\r\n"),
            400,
            true,
        ),
        (
            "CR in a chunk extension",
            chunked("2;\rXX\r\nab\r\n"),
            400,
            true,
        ),
        (
            "chunk extension without a name",
            chunked("2;=v\r\nab\r\n"),
            400,
            true,
        ),
        ("bare LF after a chunk", chunked("2\r\nXX\n"), 400, true),
        (
            "Content-Length values that differ",
            post_head("Content-Length: 2, 3\r\n\r\nab"),
            400,
            true,
        ),
        (
            "Content-Length and Transfer-Encoding",
            post_head("Content-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"),
            400,
            true,
        ),
        (
            "obs-fold hiding a length",
            post_head("X-Fold: a\r\n Content-Length: 3\r\n\r\nabc"),
            400,
            true,
        ),
        (
            "chunk size over max_request_body",
            post_head("Transfer-Encoding: chunked\r\n\r\nfffffffffffffff\r\nabc"),
            413,
            true,
        ),
    ];
    // (A refusal after the head, with the body read, keeps the connection: its framing is known.)
    for (name, raw, status, closes) in &table {
        let on_post = refused_on(RawConn::connect(post.addr()).await, raw, name).await;
        assert_eq!(on_post.0, *status, "{name} on post-proxy: {on_post:?}");
        assert_eq!(
            on_post.2, *closes,
            "{name}: post-proxy closes the connection"
        );
        assert!(
            on_post.1.as_deref().is_some_and(|r| r.starts_with("Relay")),
            "{name}: {on_post:?}"
        );
        for alpn in [&[&b"http/1.1"[..]][..], &[]] {
            let tls = tls_with_alpn(&pki, pre.addr(), alpn).await;
            let on_pre = refused_on(RawConn::over(tls), raw, name).await;
            assert_eq!(on_pre, on_post, "{name} on pre-proxy, ALPN {alpn:?}");
        }
    }
    assert!(origin.received().is_empty(), "{:?}", origin.received());
    pre.stop().await;
    post.stop().await;
}

/// HTTP/1.1 on the pre-proxy door: `Content-Length: N, N`, repeats and leading zeros are one
/// length, relayed with a single canonical `content-length`, as on post-proxy (hyper refused
/// `N, N` with 400; relayed as it arrived it ended in 502).
#[tokio::test]
async fn http11_content_length_lists_go_upstream_as_one_canonical_value() {
    let pki = TestPki::new();
    let origin = FakeApns::start(&pki).await;
    let relay = relay::start(&relay::pre_proxy_yaml(&pki, &origin, Via::Direct)).await;
    let n = PAYLOAD.len();
    let lists = [
        format!("Content-Length: {n}, {n}\r\n"),
        format!("Content-Length: {n}\r\nContent-Length: {n}\r\n"),
        format!("Content-Length: 00{n}\r\n"),
    ];
    for (i, cl) in lists.iter().enumerate() {
        let mut conn = RawConn::over(http11_over_tls(&pki, relay.addr()).await);
        conn.send(
            format!(
                "POST /3/device/{} HTTP/1.1\r\nHost: api.push.apple.com\r\napns-topic: t\r\n{cl}\r\n{PAYLOAD}",
                token(96 + i)
            )
            .as_bytes(),
        )
        .await;
        let answer = within(10, cl, conn.read_answer()).await.unwrap();
        assert_eq!(answer.status, 200, "{cl:?}: {:?}", answer.reason());
    }
    let got = origin.received();
    assert_eq!(got.len(), lists.len());
    for r in got {
        let values: Vec<_> = r.headers.get_all("content-length").iter().collect();
        assert_eq!(values, [n.to_string().as_str()]);
        assert_eq!(r.body, PAYLOAD.as_bytes());
    }
    relay.stop().await;
}

/// HTTP/1.1 on the pre-proxy door keeps its connection alive and answers pipelined pushes in
/// order (one written with `Content-Length`, one chunked), then a third sent after them.
#[tokio::test]
async fn http11_keep_alive_and_pipelining_over_tls() {
    let pki = TestPki::new();
    let origin = FakeApns::start(&pki).await;
    let relay = relay::start(&relay::pre_proxy_yaml(&pki, &origin, Via::Direct)).await;
    let mut conn = RawConn::over(http11_over_tls(&pki, relay.addr()).await);
    let push = |i: usize, id: &str| {
        format!(
            "POST /3/device/{} HTTP/1.1\r\nHost: api.push.apple.com\r\napns-topic: t\r\n\
             apns-id: {id}\r\nContent-Length: {}\r\n\r\n{PAYLOAD}",
            token(i),
            PAYLOAD.len()
        )
    };
    let ids = [
        "00000000-0000-4000-8000-000000000001",
        "00000000-0000-4000-8000-000000000002",
        "00000000-0000-4000-8000-000000000003",
    ];
    let chunked = format!(
        "POST /3/device/{} HTTP/1.1\r\nHost: api.push.apple.com\r\napns-topic: t\r\n\
         apns-id: {}\r\nTransfer-Encoding: chunked\r\n\r\n{:x}\r\n{PAYLOAD}\r\n0\r\n\r\n",
        token(98),
        ids[1],
        PAYLOAD.len()
    );
    conn.send(format!("{}{chunked}", push(97, ids[0])).as_bytes())
        .await;
    for id in &ids[..2] {
        let answer = within(10, "pipelined answer", conn.read_answer())
            .await
            .unwrap();
        assert_eq!(answer.status, 200);
        assert_eq!(answer.header("apns-id"), Some(*id), "answers in order");
        assert_eq!(answer.header("connection"), None, "kept alive");
    }
    conn.send(push(99, ids[2]).as_bytes()).await;
    let third = within(10, "third", conn.read_answer()).await.unwrap();
    assert_eq!(third.status, 200);
    assert_eq!(third.header("apns-id"), Some(ids[2]));
    let got: Vec<_> = origin
        .received()
        .into_iter()
        .map(|r| (r.path, r.body))
        .collect();
    let expected: Vec<_> = [97, 98, 99]
        .into_iter()
        .map(|i| {
            (
                format!("/3/device/{}", token(i)),
                Bytes::from_static(PAYLOAD.as_bytes()),
            )
        })
        .collect();
    assert_eq!(got, expected);
    assert_eq!(origin.connection_count(), 1);
    relay.stop().await;
}
