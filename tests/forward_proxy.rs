//! The forward-proxy door end to end: a client that does what MPNS does with `HTTPS_PROXY` (CONNECT
//! with Basic credentials up front, TLS offering `h2, http/1.1` inside the tunnel, HTTP/2) reaches
//! the fake APNs origin through pushrelay; a CONNECT to a `tunnels` entry is a blind tunnel to a
//! TLS server of another CA; everything else is refused before anything is contacted.

mod support;

use std::sync::Arc;

use bytes::Bytes;
use futures_util::future::join_all;
use http::{Request, StatusCode};
use rustls::client::{ClientSessionMemoryCache, Resumption};
use support::client::{H2Client, push_request};
use support::forward::{Tunnel, connect_head, h2_through};
use support::http1::RawConn;
use support::origin::{FakeApns, OriginOptions};
use support::pki::TestPki;
use support::proxy::{Behaviour, TestProxy};
use support::relay::{self, Via, forward_proxy_yaml, proxy_auth_yaml};
use support::tls_echo::TlsEcho;
use support::{token, within};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const PAYLOAD: &str =
    r#"{"aps":{"alert":{"title":"Hi","body":"Through the forward proxy"}},"ack_id":"f1"}"#;
const USER: &str = "mpns";
const PASS: &str = "pa55:word";

fn go_tls(pki: &TestPki) -> Arc<rustls::ClientConfig> {
    pki.client_config(&[b"h2", b"http/1.1"])
}

fn apns_target(origin: &FakeApns) -> String {
    format!("api.push.apple.com:{}", origin.port())
}

/// A push as MPNS builds it: its headers in an order that changes from one request to the next,
/// and the JSON content type Go's client sets.
fn mpns_push(i: usize) -> Request<()> {
    let mut fields = vec![
        ("apns-topic", "com.mattermost.rn".to_owned()),
        ("apns-push-type", "alert".to_owned()),
        ("apns-priority", "10".to_owned()),
        ("apns-expiration", "0".to_owned()),
        ("apns-id", format!("00000000-0000-4000-8000-{i:012}")),
        ("content-type", "application/json; charset=utf-8".to_owned()),
        (
            "authorization",
            "bearer eyJhbGciOiJFUzI1NiIsImtpZCI6IkFCQzEyMyJ9.eyJpc3MiOiJERUYxMjMifQ.c2ln"
                .to_owned(),
        ),
    ];
    fields.rotate_left(i % 7);
    let mut req = Request::builder()
        .method("POST")
        .uri(format!("https://api.push.apple.com/3/device/{}", token(i)));
    for (k, v) in fields {
        req = req.header(k, v);
    }
    req.body(()).unwrap()
}

/// A forward-proxy relay with no proxy_auth and no tunnels, reaching the origin directly.
async fn door(pki: &TestPki, origin: &FakeApns) -> relay::RunningRelay {
    relay::start(&forward_proxy_yaml(pki, origin, Via::Direct, "", "")).await
}

/// How many CONNECTs the relay counted with `outcome`.
fn connects(relay: &relay::RunningRelay, outcome: &str) -> u64 {
    let metrics = relay.relay.metrics().render(relay.relay.pool());
    let prefix = format!(
        "pushrelay_forward_proxy_connects_total{{listener=\"fwd\",outcome=\"{outcome}\"}} "
    );
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(prefix.as_str()))
        .map_or(0, |n| n.parse().unwrap())
}

fn payload(i: usize) -> String {
    format!(r#"{{"aps":{{"alert":"push {i}"}},"ack_id":"{i}"}}"#)
}

/// An MPNS-like client sends 200 pushes through one CONNECT tunnel: all 200, HTTP/2 on both
/// sides, and the origin sees every header and body exactly as sent.
#[tokio::test]
async fn mpns_like_client_sends_200_pushes_that_arrive_byte_identical() {
    let pki = TestPki::new();
    let origin = FakeApns::start(&pki).await;
    let yaml = forward_proxy_yaml(
        &pki,
        &origin,
        Via::Direct,
        &proxy_auth_yaml(&pki, USER, PASS),
        "",
    );
    let relay = relay::start(&yaml).await;
    let client = within(
        10,
        "CONNECT + TLS + h2",
        h2_through(
            relay.addr(),
            &apns_target(&origin),
            Some((USER, PASS)),
            go_tls(&pki),
        ),
    )
    .await;
    assert_eq!(
        client.alpn.as_deref(),
        Some(&b"h2"[..]),
        "h2 must be selected"
    );

    // 100 in flight at a time: under the 128 streams the door announces, even before the client
    // has read that SETTINGS frame (streams above it would be refused, as RFC 9113 allows).
    let mut answers = Vec::new();
    for batch in [0..100, 100..200] {
        answers.extend(
            within(
                30,
                "100 pushes",
                join_all(batch.map(|i| client.send(mpns_push(i), Bytes::from(payload(i))))),
            )
            .await,
        );
    }
    for (i, a) in answers.into_iter().enumerate() {
        let a = a.unwrap();
        assert_eq!(a.status, StatusCode::OK, "push {i}");
        assert_eq!(
            a.headers["apns-id"],
            format!("00000000-0000-4000-8000-{i:012}")
        );
    }
    let received = origin.received();
    assert_eq!(received.len(), 200);
    for got in &received {
        let i: usize = got.headers["apns-id"].to_str().unwrap()[24..]
            .parse()
            .unwrap();
        let sent = mpns_push(i);
        assert_eq!(got.method, "POST");
        assert_eq!(got.path, format!("/3/device/{}", token(i)));
        assert_eq!(got.authority.as_deref(), Some("api.push.apple.com"));
        assert_eq!(got.body, payload(i).as_bytes());
        assert_eq!(got.headers.len(), sent.headers().len(), "{:?}", got.headers);
        for (name, value) in sent.headers() {
            assert_eq!(
                got.headers.get(name),
                Some(value),
                "push {i}: header {name}"
            );
        }
    }
    assert_eq!(origin.connection_count(), 1);
    assert_eq!(connects(&relay, "intercepted"), 1);
    relay.stop().await;
}

/// A client that offers only http/1.1 is served HTTP/1.1 inside the tunnel and relayed as HTTP/2.
#[tokio::test]
async fn http11_only_client_in_the_tunnel_is_relayed_as_http2() {
    let pki = TestPki::new();
    let origin = FakeApns::start(&pki).await;
    let relay = door(&pki, &origin).await;
    let tunnel = Tunnel::open(relay.addr(), &apns_target(&origin), None).await;
    let tls = tunnel
        .tls("api.push.apple.com", pki.client_config(&[b"http/1.1"]))
        .await
        .unwrap();
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"http/1.1"[..]));
    let answer = support::http1::push_over(tls, &token(3), PAYLOAD).await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert_eq!(origin.received()[0].body, PAYLOAD.as_bytes());
    relay.stop().await;
}

/// TLS without ALPN that starts with the HTTP/2 preface is served HTTP/2.
#[tokio::test]
async fn client_without_alpn_in_the_tunnel_is_served_http2() {
    let pki = TestPki::new();
    let origin = FakeApns::start(&pki).await;
    let relay = door(&pki, &origin).await;
    let client = h2_through(
        relay.addr(),
        &apns_target(&origin),
        None,
        pki.client_config(&[]),
    )
    .await;
    assert_eq!(client.alpn, None);
    assert_eq!(client.push(&token(5), PAYLOAD).await.status, StatusCode::OK);
    relay.stop().await;
}

/// MPNS's cold start: 50 tunnels open at once with a push each, 49 close right away, then 1000
/// pushes on the one left. All 200, and the origin sees the one upstream connection the pool
/// needs, not one per tunnel.
#[tokio::test]
async fn burst_of_50_tunnels_then_1000_pushes_needs_one_upstream_connection() {
    let pki = TestPki::new();
    let origin = FakeApns::start(&pki).await;
    let relay = door(&pki, &origin).await;
    burst_then_load(&pki, &origin, &relay).await;
    assert_eq!(
        origin.connection_count(),
        1,
        "50 tunnels must share the pool's one upstream connection"
    );
    relay.stop().await;
}

/// The same burst served on two worker threads (as `serve` runs): at most one upstream
/// connection per worker.
#[tokio::test]
async fn burst_of_50_tunnels_on_two_workers_needs_one_upstream_connection_per_worker() {
    let pki = TestPki::new();
    let origin = FakeApns::start(&pki).await;
    let yaml = forward_proxy_yaml(&pki, &origin, Via::Direct, "", "");
    let relay = relay::start_on_workers(&yaml, 2).await;
    burst_then_load(&pki, &origin, &relay).await;
    assert!(
        (1..=2).contains(&origin.connection_count()),
        "{} upstream connections for 50 tunnels on 2 workers",
        origin.connection_count()
    );
    relay.stop().await;
}

/// 50 tunnels at once with a push each, 49 closed, 1000 pushes on the last: all 200.
async fn burst_then_load(pki: &TestPki, origin: &FakeApns, relay: &relay::RunningRelay) {
    let target = apns_target(origin);
    let config = go_tls(pki);
    let mut clients = within(
        20,
        "50 tunnels",
        join_all((0..50).map(|_| h2_through(relay.addr(), &target, None, config.clone()))),
    )
    .await;
    let first = within(
        20,
        "a push on each tunnel",
        join_all(
            clients
                .iter()
                .enumerate()
                .map(|(i, c)| c.send(mpns_push(i), Bytes::from(payload(i)))),
        ),
    )
    .await;
    assert!(
        first
            .iter()
            .all(|a| a.as_ref().unwrap().status == StatusCode::OK)
    );
    let kept = clients.pop().unwrap();
    drop(clients);
    for batch in 0..10 {
        let answers = within(
            30,
            "100 pushes",
            join_all((0..100).map(|i| {
                let n = 1000 + batch * 100 + i;
                kept.send(mpns_push(n), Bytes::from(payload(n)))
            })),
        )
        .await;
        assert!(
            answers
                .iter()
                .all(|a| a.as_ref().unwrap().status == StatusCode::OK)
        );
    }
    assert_eq!(origin.received().len(), 1050);
}

/// A second connection from the same client resumes its TLS session (session tickets), so the
/// tunnels MPNS opens by the dozen cost no full handshake each.
#[tokio::test]
async fn second_tunnel_from_the_same_client_resumes_its_tls_session() {
    let pki = TestPki::new();
    let origin = FakeApns::start(&pki).await;
    let relay = door(&pki, &origin).await;
    let mut config = (*go_tls(&pki)).clone();
    config.resumption = Resumption::store(Arc::new(ClientSessionMemoryCache::new(8)));
    let config = Arc::new(config);
    let mut kinds = Vec::new();
    for i in 0..2 {
        let tunnel = Tunnel::open(relay.addr(), &apns_target(&origin), None).await;
        let tls = tunnel
            .tls("api.push.apple.com", config.clone())
            .await
            .unwrap();
        kinds.push(tls.get_ref().1.handshake_kind());
        // A push reads the server's flight after the handshake, session tickets included.
        let client = H2Client::over(tls, Some(b"h2".to_vec())).await.unwrap();
        assert_eq!(client.push(&token(i), PAYLOAD).await.status, StatusCode::OK);
    }
    use rustls::HandshakeKind;
    assert_eq!(
        kinds,
        [Some(HandshakeKind::Full), Some(HandshakeKind::Resumed)]
    );
    relay.stop().await;
}

/// Apple's GOAWAY (every 100 requests here) ends upstream connections, never the client's: the
/// one client connection carries 1000 pushes and stays open.
#[tokio::test]
async fn upstream_goaway_during_load_never_reaches_the_client_connection() {
    let pki = TestPki::new();
    let origin = FakeApns::start_with(
        &pki,
        OriginOptions {
            goaway_after: Some(100),
            ..OriginOptions::default()
        },
    )
    .await;
    let relay = door(&pki, &origin).await;
    let client = h2_through(relay.addr(), &apns_target(&origin), None, go_tls(&pki)).await;
    for batch in 0..10 {
        let answers = within(
            30,
            "100 pushes",
            join_all((0..100).map(|i| {
                let n = batch * 100 + i;
                client.send(mpns_push(n), Bytes::from(payload(n)))
            })),
        )
        .await;
        for a in answers {
            let a = a.expect("no client stream may fail");
            assert_eq!(a.status, StatusCode::OK);
        }
        assert!(
            !client.is_closed(),
            "client connection ended after batch {batch}"
        );
    }
    assert!(
        origin.connection_count() >= 5,
        "the origin's GOAWAYs replaced upstream connections ({})",
        origin.connection_count()
    );
    // Still the same connection, still serving.
    assert_eq!(client.push(&token(7), PAYLOAD).await.status, StatusCode::OK);
    relay.stop().await;
}

/// A CONNECT whose TLS names another host than the CONNECT target is refused at the handshake,
/// even when that other host is a destination too.
#[tokio::test]
async fn sni_other_than_the_connect_host_is_refused() {
    let pki = TestPki::new();
    let origin = FakeApns::start(&pki).await;
    let relay = door(&pki, &origin).await;
    let tunnel = Tunnel::open(relay.addr(), &apns_target(&origin), None).await;
    let result = within(
        10,
        "handshake",
        tunnel.tls("api.sandbox.push.apple.com", go_tls(&pki)),
    )
    .await;
    assert!(result.is_err(), "SNI ≠ CONNECT host must not complete TLS");
    assert_eq!(connects(&relay, "sni_mismatch"), 1);
    assert!(origin.received().is_empty());
    assert_eq!(origin.connection_count(), 0);
    relay.stop().await;
}

/// A request inside the tunnel for another host than the CONNECT host is answered 421.
#[tokio::test]
async fn authority_other_than_the_connect_host_is_misdirected() {
    let pki = TestPki::new();
    let origin = FakeApns::start(&pki).await;
    let relay = door(&pki, &origin).await;
    let client = h2_through(relay.addr(), &apns_target(&origin), None, go_tls(&pki)).await;
    let answer = client
        .send(
            push_request("api.sandbox.push.apple.com", &token(8)),
            Bytes::from(PAYLOAD),
        )
        .await
        .unwrap();
    assert_eq!(answer.status, StatusCode::MISDIRECTED_REQUEST);
    assert!(origin.received().is_empty());
    relay.stop().await;
}

/// A blind tunnel to the FCM stand-in through the upstream CONNECT proxy: the client sees that
/// server's own certificate (another CA), bytes go both ways unaltered, and the tunnel is counted.
#[tokio::test]
async fn blind_tunnel_reaches_the_fcm_server_through_the_upstream_proxy_untouched() {
    let pki = TestPki::new();
    let origin = FakeApns::start(&pki).await;
    let fcm = TlsEcho::start().await;
    let proxy = TestProxy::start(Behaviour::Auth {
        user: "corp".into(),
        pass: "corp-pw".into(),
    })
    .await;
    let extra = format!("tunnels:\n  - \"{}\"\n", fcm.target());
    let yaml = forward_proxy_yaml(
        &pki,
        &origin,
        Via::Proxy(proxy.url_with("corp", "corp-pw")),
        "",
        &extra,
    );
    let relay = relay::start(&yaml).await;

    let sent = fcm.exchange_through(relay.addr()).await;
    assert_eq!(fcm.connection_count(), 1);
    assert_eq!(proxy.tunnel_count(), 1);
    let heads = proxy.heads.lock().unwrap().clone();
    assert!(
        heads[0].starts_with(&format!("CONNECT {} HTTP/1.1\r\n", fcm.target())),
        "{heads:?}"
    );
    assert!(
        heads[0].contains("Proxy-Authorization: Basic "),
        "{heads:?}"
    );
    assert!(origin.received().is_empty());
    let metrics = within(10, "tunnel closed", async {
        loop {
            let m = relay.relay.metrics().render(relay.relay.pool());
            if m.contains("pushrelay_forward_proxy_tunnels_open{listener=\"fwd\",kind=\"blind\"} 0")
            {
                break m;
            }
            tokio::task::yield_now().await;
        }
    })
    .await;
    let bytes = |direction: &str| -> u64 {
        let prefix = format!(
            "pushrelay_forward_proxy_tunnel_bytes_total{{listener=\"fwd\",direction=\"{direction}\"}} "
        );
        metrics
            .lines()
            .find_map(|l| l.strip_prefix(prefix.as_str()))
            .unwrap_or_else(|| panic!("{prefix} missing:\n{metrics}"))
            .parse()
            .unwrap()
    };
    // TLS records carry the payload each way, so each way moved more than the payload.
    assert!(bytes("to_upstream") > sent as u64, "{metrics}");
    assert!(bytes("to_client") > sent as u64, "{metrics}");
    assert_eq!(connects(&relay, "tunnelled"), 1);
    relay.stop().await;
}

/// A CONNECT to a host in neither list is 403 with a Relay reason; nothing is contacted, the
/// connection closes.
#[tokio::test]
async fn connect_to_a_host_in_neither_list_is_403_and_nothing_is_contacted() {
    let pki = TestPki::new();
    let origin = FakeApns::start(&pki).await;
    let proxy = TestProxy::start(Behaviour::Open).await;
    let relay = relay::start(&forward_proxy_yaml(
        &pki,
        &origin,
        Via::Proxy(proxy.url()),
        "",
        "",
    ))
    .await;
    let elsewhere = format!("api.push.apple.com:{}", origin.port() ^ 1);
    for target in ["www.example.com:443", elsewhere.as_str()] {
        let mut tunnel = Tunnel::open(relay.addr(), target, None).await;
        assert_eq!(tunnel.status, 403, "{target}: {}", tunnel.head);
        assert!(tunnel.head.contains("Connection: close"), "{}", tunnel.head);
        let body = tunnel.body_until_close().await;
        assert_eq!(body, br#"{"reason":"RelayDestinationNotAllowed"}"#);
    }
    assert!(
        proxy.heads.lock().unwrap().is_empty(),
        "the proxy was contacted"
    );
    assert_eq!(origin.connection_count(), 0);
    assert_eq!(connects(&relay, "RelayDestinationNotAllowed"), 2);
    relay.stop().await;
}

/// Bytes after a refused CONNECT (a pipelined CONNECT to an allowed host, a body) are never
/// relayed: one refusal, then close.
#[tokio::test]
async fn bytes_after_a_refused_connect_are_never_relayed() {
    let pki = TestPki::new();
    let origin = FakeApns::start(&pki).await;
    let relay = door(&pki, &origin).await;
    let smuggled = format!(
        "{}{}",
        connect_head("www.example.com:443", None),
        connect_head(&apns_target(&origin), None)
    );
    let mut conn = RawConn::connect(relay.addr()).await;
    conn.send(smuggled.as_bytes()).await;
    let answer = conn.read_answer().await.unwrap();
    assert_eq!(answer.status, 403);
    assert!(
        conn.closed().await,
        "the pipelined CONNECT must not be answered"
    );

    let with_body = format!(
        "CONNECT {} HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello",
        apns_target(&origin)
    );
    let mut conn = RawConn::connect(relay.addr()).await;
    conn.send(with_body.as_bytes()).await;
    let answer = conn.read_answer().await.unwrap();
    assert_eq!(answer.status, 400);
    assert_eq!(answer.reason().as_deref(), Some("RelayBadRequest"));
    assert!(conn.closed().await);
    assert_eq!(origin.connection_count(), 0);
    relay.stop().await;
}

/// Without credentials, and with wrong ones, a CONNECT gets 407 with `Proxy-Authenticate`, and
/// nothing is contacted, even for an allowed host.
#[tokio::test]
async fn missing_or_wrong_proxy_credentials_get_407() {
    let pki = TestPki::new();
    let origin = FakeApns::start(&pki).await;
    let yaml = forward_proxy_yaml(
        &pki,
        &origin,
        Via::Direct,
        &proxy_auth_yaml(&pki, USER, PASS),
        "",
    );
    let relay = relay::start(&yaml).await;
    let target = apns_target(&origin);
    for creds in [None, Some((USER, "wrong")), Some(("nobody", PASS))] {
        let mut tunnel = Tunnel::open(relay.addr(), &target, creds).await;
        assert_eq!(tunnel.status, 407, "{creds:?}: {}", tunnel.head);
        assert!(
            tunnel
                .head
                .contains("Proxy-Authenticate: Basic realm=\"pushrelay\"\r\n"),
            "{}",
            tunnel.head
        );
        let body = tunnel.body_until_close().await;
        assert_eq!(body, br#"{"reason":"RelayProxyCredentialsRequired"}"#);
    }
    assert_eq!(origin.connection_count(), 0);
    // The right ones open the tunnel.
    let client = h2_through(relay.addr(), &target, Some((USER, PASS)), go_tls(&pki)).await;
    assert_eq!(client.push(&token(9), PAYLOAD).await.status, StatusCode::OK);
    relay.stop().await;
}

/// A client outside allow_sources is closed before a byte is read: it gets no answer at all.
#[tokio::test]
async fn source_outside_allow_sources_is_closed_without_an_answer() {
    let pki = TestPki::new();
    let origin = FakeApns::start(&pki).await;
    let yaml = forward_proxy_yaml(&pki, &origin, Via::Direct, "", "")
        .replace("127.0.0.1/32", "127.0.0.2/32");
    let relay = relay::start(&yaml).await;
    let mut tcp = tokio::net::TcpStream::connect(relay.addr()).await.unwrap();
    let _ = tcp
        .write_all(connect_head(&apns_target(&origin), None).as_bytes())
        .await;
    let mut buf = Vec::new();
    let read = within(10, "close", tcp.read_to_end(&mut buf)).await;
    assert!(
        buf.is_empty(),
        "no byte may be answered: {:?}",
        String::from_utf8_lossy(&buf)
    );
    let _ = read;
    assert_eq!(origin.connection_count(), 0);
    relay.stop().await;
}

/// Anything but a well-formed CONNECT gets a clear 4xx and the connection closes: another
/// method, plain http:// in absolute form, a missing or bad port, a malformed request line.
#[tokio::test]
async fn malformed_or_non_connect_requests_get_4xx_and_close() {
    let pki = TestPki::new();
    let origin = FakeApns::start(&pki).await;
    let relay = door(&pki, &origin).await;
    let port = origin.port();
    let cases: Vec<(String, u16, &str)> = vec![
        (
            format!(
                "GET http://api.push.apple.com:{port}/ HTTP/1.1\r\nHost: api.push.apple.com\r\n\r\n"
            ),
            405,
            "RelayMethodNotAllowed",
        ),
        (
            format!("POST /3/device/x HTTP/1.1\r\nHost: api.push.apple.com:{port}\r\n\r\n"),
            405,
            "RelayMethodNotAllowed",
        ),
        (
            "CONNECT api.push.apple.com HTTP/1.1\r\n\r\n".into(),
            400,
            "RelayBadRequest",
        ),
        (
            "CONNECT api.push.apple.com:99999 HTTP/1.1\r\n\r\n".into(),
            400,
            "RelayBadRequest",
        ),
        (
            "CONNECT api.push.apple.com:0 HTTP/1.1\r\n\r\n".into(),
            400,
            "RelayBadRequest",
        ),
        ("CONNECT\r\n\r\n".into(), 400, "RelayBadRequest"),
        (
            "\x16\x03\x01\x02\x00\x01\x00\x01\x03\x03\r\n\r\n".into(),
            400,
            "RelayBadRequest",
        ),
    ];
    for (request, status, reason) in cases {
        let mut conn = RawConn::connect(relay.addr()).await;
        conn.send(request.as_bytes()).await;
        let answer = conn.read_answer().await.unwrap();
        assert_eq!(answer.status, status, "{request:?}");
        assert_eq!(answer.reason().as_deref(), Some(reason), "{request:?}");
        assert!(conn.closed().await, "{request:?}");
    }
    assert_eq!(origin.connection_count(), 0);
    relay.stop().await;
}

/// One client address may hold `limits.max_tunnels_per_source` tunnels; one more gets 429, and a
/// closed tunnel gives its place back.
#[tokio::test]
async fn tunnels_per_source_are_capped_with_429() {
    let pki = TestPki::new();
    let origin = FakeApns::start(&pki).await;
    let yaml = forward_proxy_yaml(
        &pki,
        &origin,
        Via::Direct,
        "",
        "limits:\n  max_tunnels_per_source: 2\n",
    );
    let relay = relay::start(&yaml).await;
    let target = apns_target(&origin);
    let first = h2_through(relay.addr(), &target, None, go_tls(&pki)).await;
    let second = h2_through(relay.addr(), &target, None, go_tls(&pki)).await;
    let mut third = Tunnel::open(relay.addr(), &target, None).await;
    assert_eq!(third.status, 429, "{}", third.head);
    assert_eq!(
        third.body_until_close().await,
        br#"{"reason":"RelayTooManyTunnels"}"#
    );
    assert_eq!(second.push(&token(1), PAYLOAD).await.status, StatusCode::OK);
    drop(first);
    let reopened = within(10, "a place freed", async {
        loop {
            let t = Tunnel::open(relay.addr(), &target, None).await;
            if t.status == 200 {
                break t;
            }
            tokio::task::yield_now().await;
        }
    })
    .await;
    drop(reopened);
    assert!(connects(&relay, "RelayTooManyTunnels") >= 1);
    relay.stop().await;
}

/// The CONNECT head and the TLS handshake share one `handshake_timeout`, counted from the
/// accept: a client that is slow to send its head has that much less time for TLS.
#[tokio::test]
async fn connect_head_and_tls_share_one_handshake_timeout_from_accept() {
    let pki = TestPki::new();
    let origin = FakeApns::start(&pki).await;
    let yaml = forward_proxy_yaml(
        &pki,
        &origin,
        Via::Direct,
        "",
        "limits:\n  handshake_timeout: 2s\n",
    );
    let relay = relay::start(&yaml).await;
    let started = std::time::Instant::now();
    let mut tcp = tokio::net::TcpStream::connect(relay.addr()).await.unwrap();
    // The stimulus, not a synchronisation: the head arrives 1.2 s into the 2 s.
    tokio::time::sleep(std::time::Duration::from_millis(1200)).await;
    tcp.write_all(connect_head(&apns_target(&origin), None).as_bytes())
        .await
        .unwrap();
    let mut buf = Vec::new();
    within(10, "close", tcp.read_to_end(&mut buf))
        .await
        .unwrap();
    let elapsed = started.elapsed();
    assert!(
        String::from_utf8_lossy(&buf).starts_with("HTTP/1.1 200 "),
        "{buf:?}"
    );
    // Counted from the head it would end at 3.2 s.
    assert!(
        elapsed >= std::time::Duration::from_millis(1900)
            && elapsed < std::time::Duration::from_millis(2800),
        "closed after {elapsed:?}"
    );
    // No head at all: 408 at the timeout.
    let mut conn = RawConn::connect(relay.addr()).await;
    let answer = conn.read_answer().await.unwrap();
    assert_eq!(answer.status, 408);
    assert_eq!(answer.reason().as_deref(), Some("RelayRequestTimeout"));
    relay.stop().await;
}

/// A blind tunnel with no byte either way for `tunnel_idle_timeout` is closed.
#[tokio::test]
async fn idle_blind_tunnel_is_closed_after_its_idle_timeout() {
    let pki = TestPki::new();
    let origin = FakeApns::start(&pki).await;
    let fcm = TlsEcho::start().await;
    let proxy = TestProxy::start(Behaviour::Open).await;
    let extra = format!(
        "tunnels:\n  - \"{}\"\nlimits:\n  tunnel_idle_timeout: 300ms\n",
        fcm.target()
    );
    let yaml = forward_proxy_yaml(&pki, &origin, Via::Proxy(proxy.url()), "", &extra);
    let relay = relay::start(&yaml).await;
    let tunnel = Tunnel::open(relay.addr(), &fcm.target(), None).await;
    let mut tls = tunnel
        .tls(support::tls_echo::FCM_HOST, fcm.pki.client_config(&[]))
        .await
        .unwrap();
    tls.write_all(b"ping").await.unwrap();
    let mut back = [0u8; 4];
    tls.read_exact(&mut back).await.unwrap();
    let idle_from = std::time::Instant::now();
    let mut rest = Vec::new();
    let _ = within(10, "idle close", tls.read_to_end(&mut rest)).await;
    assert!(rest.is_empty());
    assert!(idle_from.elapsed() >= std::time::Duration::from_millis(250));
    relay.stop().await;
}

/// A tunnel whose host `upstream.no_proxy` names goes direct (to its `connect_to` address here),
/// never through the proxy.
#[tokio::test]
async fn blind_tunnel_for_a_no_proxy_host_goes_direct() {
    let pki = TestPki::new();
    let origin = FakeApns::start(&pki).await;
    let fcm = TlsEcho::start().await;
    let proxy = TestProxy::start(Behaviour::Open).await;
    // Indented: these keys continue the `upstream:` section the builder ends with.
    let extra = format!(
        "  no_proxy: [\".googleapis.com\"]\n  connect_to:\n    \"{target}\": \"127.0.0.1:{port}\"\ntunnels:\n  - \"{target}\"\n",
        target = fcm.target(),
        port = fcm.port()
    );
    let yaml = forward_proxy_yaml(&pki, &origin, Via::Proxy(proxy.url()), "", &extra);
    let relay = relay::start(&yaml).await;
    fcm.exchange_through(relay.addr()).await;
    assert_eq!(fcm.connection_count(), 1);
    assert!(
        proxy.heads.lock().unwrap().is_empty(),
        "no_proxy must bypass the proxy"
    );
    relay.stop().await;
}
