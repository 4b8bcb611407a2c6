//! The relay chain: an HTTP/2 client → inside relay (pre-proxy) → CONNECT proxy → DMZ relay
//! (post-proxy, TLS, shared secret) → fake origin. Pushes cross it once each, unchanged; the DMZ
//! relay lets in only the inside relay; every failure is named by the hop that failed.

mod support;

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use bytes::Bytes;
use support::chain::{self, SECRET};
use support::client::{H2Client, push_request, tcp_from};
use support::origin::FakeApns;
use support::pki::TestPki;
use support::proxy::{Behaviour, TestProxy};
use support::relay;
use support::{token, within};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const PAYLOAD: &str = r#"{"aps":{"alert":"hello"}}"#;

/// One request over TLS straight to the DMZ relay, from `from`, with `secret` (if any) in the
/// relay's header; the answer as text, or the I/O error that ended the connection.
async fn to_dmz(
    pki: &TestPki,
    dmz: SocketAddr,
    from: Option<IpAddr>,
    secret: Option<&str>,
) -> std::io::Result<String> {
    let tcp = tcp_from(from, dmz).await?;
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    let mut tls = tokio_rustls::TlsConnector::from(pki.client_config(&[]))
        .connect(name, tcp)
        .await?;
    let secret = secret
        .map(|s| format!("pushrelay-relay-secret: {s}\r\n"))
        .unwrap_or_default();
    let request = format!(
        "POST /3/device/{} HTTP/1.1\r\nHost: api.push.apple.com\r\napns-topic: com.example.app\r\n\
         {secret}content-length: {}\r\nconnection: close\r\n\r\n{PAYLOAD}",
        token(1),
        PAYLOAD.len()
    );
    tls.write_all(request.as_bytes()).await?;
    let mut answer = Vec::new();
    tls.read_to_end(&mut answer).await?;
    Ok(String::from_utf8_lossy(&answer).into_owned())
}

/// The DMZ relay refuses a request without the shared secret or with a wrong one, and nothing
/// reaches the origin; with the secret the same request goes through.
#[tokio::test]
async fn dmz_relay_refuses_requests_without_the_secret_or_with_a_wrong_one() {
    let pki = TestPki::new();
    let origin = FakeApns::start(&pki).await;
    let secret = chain::secret_file(&pki, "relay.secret", SECRET);
    let dmz = relay::start(&chain::dmz_yaml(&pki, &origin, &secret, "\"127.0.0.1/32\"")).await;
    for (given, what) in [
        (None, "missing"),
        (Some("0123456789abcdef0123456789abcdeX"), "wrong"),
    ] {
        let answer = within(10, what, to_dmz(&pki, dmz.addr(), None, given))
            .await
            .unwrap();
        assert!(answer.starts_with("HTTP/1.1 403 "), "{what}: {answer}");
        assert!(
            answer.contains("{\"reason\":\"RelayChainSecretRejected\"}"),
            "{what}: {answer}"
        );
    }
    assert!(
        origin.received().is_empty(),
        "a refused request reached the origin"
    );
    let answer = within(
        10,
        "right secret",
        to_dmz(&pki, dmz.addr(), None, Some(SECRET)),
    )
    .await
    .unwrap();
    assert!(answer.starts_with("HTTP/1.1 200 "), "{answer}");
    let received = origin.received();
    assert_eq!(received.len(), 1);
    assert!(
        !received[0].headers.contains_key("pushrelay-relay-secret"),
        "the secret went to Apple: {:?}",
        received[0].headers
    );
}

/// A source outside the DMZ relay's `allow_sources` gets no answer at all, secret or not; one
/// inside it is served.
#[tokio::test]
async fn dmz_relay_refuses_sources_outside_allow_sources() {
    let pki = TestPki::new();
    let origin = FakeApns::start(&pki).await;
    let secret = chain::secret_file(&pki, "relay.secret", SECRET);
    let dmz = relay::start(&chain::dmz_yaml(&pki, &origin, &secret, "\"127.0.0.2/32\"")).await;
    let outside = within(10, "outside", to_dmz(&pki, dmz.addr(), None, Some(SECRET))).await;
    assert!(
        outside.as_ref().map_or(true, |a| a.is_empty()),
        "a source outside allow_sources was answered: {outside:?}"
    );
    assert!(origin.received().is_empty());
    let inside = within(
        10,
        "inside",
        to_dmz(&pki, dmz.addr(), Some([127, 0, 0, 2].into()), Some(SECRET)),
    )
    .await
    .unwrap();
    assert!(inside.starts_with("HTTP/1.1 200 "), "{inside}");
}

/// Many pushes with many in flight cross the chain: all 200, each seen once at the origin, with
/// the headers and body the client sent and nothing of the secret; they share a few tunnels.
#[tokio::test]
async fn pushes_cross_the_chain_once_each_with_headers_and_body_unchanged() {
    let pki = TestPki::new();
    let origin = FakeApns::start(&pki).await;
    let proxy = TestProxy::start(Behaviour::Open).await;
    let (inside, dmz) = chain::start(&pki, &origin, Some(&proxy.url())).await;
    // Three client connections, each with fewer streams open than the front door allows (128).
    let mut clients = Vec::new();
    for _ in 0..3 {
        clients.push(Arc::new(H2Client::connect(&pki, inside.addr()).await));
    }
    let n = 300;
    let mut tasks = Vec::new();
    for i in 0..n {
        let client = clients[i % 3].clone();
        tasks.push(tokio::spawn(async move {
            let id = format!("00000000-0000-4000-8000-{i:012x}");
            let mut req = push_request("api.push.apple.com", &token(i));
            req.headers_mut().insert("apns-id", id.parse().unwrap());
            req.headers_mut()
                .insert("apns-collapse-id", format!("c{i}").parse().unwrap());
            let answer = client
                .send(
                    req,
                    Bytes::from(format!("{{\"aps\":{{\"alert\":\"{i}\"}}}}")),
                )
                .await
                .unwrap();
            (id, answer)
        }));
    }
    for t in tasks {
        let (id, answer) = within(30, "push", t).await.unwrap();
        assert_eq!(answer.status, 200, "{id}: {:?}", answer.body);
        assert_eq!(answer.headers["apns-id"], id.as_str());
        assert!(
            !answer.headers.contains_key("pushrelay-dmz"),
            "the chain's own header reached the client"
        );
    }
    let received = origin.received();
    assert_eq!(received.len(), n, "each push reaches the origin once");
    let mut seen = HashMap::new();
    let sent = push_request("api.push.apple.com", &token(0));
    for r in &received {
        let id = r.headers["apns-id"].to_str().unwrap().to_owned();
        let i = usize::from_str_radix(&id[24..], 16).unwrap();
        assert!(seen.insert(id.clone(), ()).is_none(), "{id} seen twice");
        assert_eq!(r.path, format!("/3/device/{}", token(i)));
        assert_eq!(
            r.body,
            format!("{{\"aps\":{{\"alert\":\"{i}\"}}}}").as_bytes()
        );
        let mut names: Vec<&str> = r.headers.keys().map(|k| k.as_str()).collect();
        names.sort_unstable();
        assert_eq!(
            names,
            [
                "apns-collapse-id",
                "apns-expiration",
                "apns-id",
                "apns-priority",
                "apns-push-type",
                "apns-topic",
                "authorization",
                "content-length"
            ],
            "only what the client sent (and the body's length) reaches the origin"
        );
        for name in [
            "apns-topic",
            "apns-push-type",
            "apns-priority",
            "authorization",
        ] {
            assert_eq!(r.headers[name], sent.headers()[name], "{name}");
        }
        assert_eq!(r.headers["apns-collapse-id"], format!("c{i}").as_str());
        assert_eq!(r.authority.as_deref(), Some("api.push.apple.com"));
        assert!(
            !format!("{:?}", r.headers).contains(SECRET),
            "the secret reached the origin"
        );
    }
    let tunnels = proxy.tunnel_count();
    assert!(
        (1..=64).contains(&tunnels),
        "keep-alive connections are reused and bounded: {tunnels} tunnels for {n} pushes"
    );
    let heads = proxy.heads.lock().unwrap().clone();
    let target = format!("CONNECT localhost:{} HTTP/1.1", dmz.addr().port());
    assert!(heads.iter().all(|h| h.starts_with(&target)), "{heads:?}");
}

/// Apple's error answers reach the client unchanged through both relays: status, `apns-id` and
/// the JSON reason, `Unregistered` with its timestamp.
#[tokio::test]
async fn apple_errors_cross_the_chain_unchanged() {
    let pki = TestPki::new();
    let origin = FakeApns::start(&pki).await;
    let proxy = TestProxy::start(Behaviour::Open).await;
    let (inside, _dmz) = chain::start(&pki, &origin, Some(&proxy.url())).await;
    let client = H2Client::connect(&pki, inside.addr()).await;
    let bad = client.push("not-a-token", PAYLOAD).await;
    assert_eq!(bad.status, 400);
    assert_eq!(bad.body.as_ref(), br#"{"reason":"BadDeviceToken"}"#);
    assert!(bad.headers.contains_key("apns-id"));
    let gone = client
        .push(&format!("dead{}", &token(5)[4..]), PAYLOAD)
        .await;
    assert_eq!(gone.status, 410);
    assert_eq!(
        gone.body.as_ref(),
        br#"{"reason":"Unregistered","timestamp":1700000000000}"#
    );
}

/// A failure of the DMZ relay itself (it cannot reach Apple) reaches the client with the DMZ
/// relay's own reason, not one the inside relay made up.
#[tokio::test]
async fn a_dmz_relay_failure_reaches_the_client_with_the_dmz_relays_reason() {
    let pki = TestPki::new();
    // The DMZ relay's origin is a port nobody listens on.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = closed.local_addr().unwrap().port();
    drop(closed);
    let secret = chain::secret_file(&pki, "relay.secret", SECRET);
    // The DMZ relay fails at once instead of riding out the outage past the inside relay's timeout.
    let dmz_yaml = chain::dmz_yaml_on(&pki, port, &secret, "\"127.0.0.1/32\"").replace(
        "  request_timeout: 5s\n",
        "  request_timeout: 5s\n  reconnect_wait: 0s\n",
    );
    assert!(dmz_yaml.contains("reconnect_wait: 0s"));
    let dmz = relay::start(&dmz_yaml).await;
    let url = format!("https://localhost:{}", dmz.addr().port());
    let inside = relay::start(&chain::inside_yaml(&pki, port, None, &url, &secret)).await;
    let client = H2Client::connect(&pki, inside.addr()).await;
    let answer = client.push(&token(1), PAYLOAD).await;
    assert_eq!(answer.status, 502);
    assert_eq!(answer.reason().as_deref(), Some("RelayUpstreamUnreachable"));
}

/// The inside relay's own failures name its hop: the proxy refusing the tunnel, TLS to a DMZ
/// relay it does not trust, a wrong secret answered by the DMZ relay.
#[tokio::test]
async fn inside_relay_failures_name_the_hop_that_failed() {
    let pki = TestPki::new();
    let origin = FakeApns::start(&pki).await;
    let secret = chain::secret_file(&pki, "relay.secret", SECRET);
    let dmz = relay::start(&chain::dmz_yaml(&pki, &origin, &secret, "\"127.0.0.1/32\"")).await;
    let url = format!("https://localhost:{}", dmz.addr().port());

    let forbid = TestProxy::start(Behaviour::Forbid).await;
    let inside = relay::start(&chain::inside_yaml(
        &pki,
        origin.port(),
        Some(&forbid.url()),
        &url,
        &secret,
    ))
    .await;
    let client = H2Client::connect(&pki, inside.addr()).await;
    let answer = client.push(&token(1), PAYLOAD).await;
    assert_eq!(
        (answer.status.as_u16(), answer.reason().as_deref()),
        (502, Some("RelayProxyRefused"))
    );

    // A DMZ relay with a certificate the inside relay does not trust.
    let other = TestPki::new();
    let other_secret = chain::secret_file(&other, "relay.secret", SECRET);
    let untrusted = relay::start(&chain::dmz_yaml(
        &other,
        &origin,
        &other_secret,
        "\"127.0.0.1/32\"",
    ))
    .await;
    let url_untrusted = format!("https://localhost:{}", untrusted.addr().port());
    let inside = relay::start(&chain::inside_yaml(
        &pki,
        origin.port(),
        None,
        &url_untrusted,
        &secret,
    ))
    .await;
    let client = H2Client::connect(&pki, inside.addr()).await;
    let answer = client.push(&token(2), PAYLOAD).await;
    assert_eq!(
        (answer.status.as_u16(), answer.reason().as_deref()),
        (502, Some("RelayChainTlsFailed"))
    );

    let wrong = chain::secret_file(&pki, "wrong.secret", "not-the-secret-at-all-0123456789");
    let inside = relay::start(&chain::inside_yaml(&pki, origin.port(), None, &url, &wrong)).await;
    let client = H2Client::connect(&pki, inside.addr()).await;
    let answer = client.push(&token(3), PAYLOAD).await;
    assert_eq!(
        (answer.status.as_u16(), answer.reason().as_deref()),
        (403, Some("RelayChainSecretRejected"))
    );
    assert!(origin.received().is_empty());
}

/// Over `http://` the inside relay sends absolute-form requests, and they arrive as over TLS.
#[tokio::test]
async fn plain_http_chain_carries_pushes_in_absolute_form() {
    let pki = TestPki::new();
    let origin = FakeApns::start(&pki).await;
    let secret = chain::secret_file(&pki, "relay.secret", SECRET);
    let dmz_yaml = relay::post_proxy_yaml(&pki, &origin, "").replace(
        "    allow_sources:",
        &format!(
            "    relay_secret_file: \"{}\"\n    allow_sources:",
            secret.display()
        ),
    );
    let dmz = relay::start(&dmz_yaml).await;
    let url = format!("http://127.0.0.1:{}", dmz.addr().port());
    let inside = relay::start(&chain::inside_yaml(
        &pki,
        origin.port(),
        None,
        &url,
        &secret,
    ))
    .await;
    let client = H2Client::connect(&pki, inside.addr()).await;
    for i in 0..5 {
        let answer = client.push(&token(i), PAYLOAD).await;
        assert_eq!(answer.status, 200, "{:?}", answer.body);
    }
    let received = origin.received();
    assert_eq!(received.len(), 5);
    assert!(
        received
            .iter()
            .all(|r| r.body == PAYLOAD.as_bytes()
                && !r.headers.contains_key("pushrelay-relay-secret"))
    );
}

/// An idle connection to the DMZ relay cut by the network is found dead before the next push is
/// written: the push goes once, on a new connection.
#[tokio::test]
async fn an_idle_connection_cut_by_the_network_is_replaced_and_the_push_sent_once() {
    let pki = TestPki::new();
    let origin = FakeApns::start(&pki).await;
    let proxy = TestProxy::start(Behaviour::Open).await;
    let (inside, _dmz) = chain::start(&pki, &origin, Some(&proxy.url())).await;
    let client = H2Client::connect(&pki, inside.addr()).await;
    assert_eq!(client.push(&token(1), PAYLOAD).await.status, 200);
    assert_eq!(proxy.tunnel_count(), 1);
    proxy.cut_tunnels();
    within(10, "tunnel closed", proxy.wait_closed()).await;
    let answer = client.push(&token(2), PAYLOAD).await;
    assert_eq!(answer.status, 200, "{:?}", answer.body);
    assert_eq!(
        proxy.tunnel_count(),
        2,
        "a new tunnel replaced the dead one"
    );
    assert_eq!(
        origin.received().len(),
        2,
        "each push reached the origin once"
    );
}

/// A proxy that answers in the DMZ relay's place (its own error page for a request it refused)
/// is a proxy failure: 502 RelayProxyRefused, 407 RelayProxyAuthenticationRequired, never its
/// page passed on as if Apple had answered.
#[tokio::test]
async fn a_proxys_own_answer_is_named_a_proxy_failure_not_passed_on() {
    let pki = TestPki::new();
    let origin = FakeApns::start(&pki).await;
    let secret = chain::secret_file(&pki, "relay.secret", SECRET);
    for (status, reason) in [
        ("403 Forbidden", "RelayProxyRefused"),
        (
            "407 Proxy Authentication Required",
            "RelayProxyAuthenticationRequired",
        ),
    ] {
        // A legacy proxy that refuses every request with an error page, keeping the connection.
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let proxy = listener.local_addr().unwrap();
        let page = format!(
            "HTTP/1.1 {status}\r\ncontent-type: text/html\r\ncontent-length: 11\r\n\r\n<h1>no</h1>"
        );
        let server = tokio::spawn(async move {
            let (mut conn, _) = listener.accept().await.unwrap();
            let mut buf = vec![0u8; 8192];
            let _ = conn.read(&mut buf).await;
            conn.write_all(page.as_bytes()).await.unwrap();
            let _ = conn.read(&mut buf).await;
        });
        let url = "http://dmz.corp.example:8080";
        let yaml = chain::inside_yaml(
            &pki,
            origin.port(),
            Some(&format!("http://{proxy}")),
            url,
            &secret,
        );
        let inside = relay::start(&yaml).await;
        let client = H2Client::connect(&pki, inside.addr()).await;
        let answer = client.push(&token(1), PAYLOAD).await;
        assert_eq!(answer.status, 502, "{status}: {:?}", answer.body);
        assert_eq!(answer.reason().as_deref(), Some(reason), "{status}");
        server.abort();
    }
    assert!(origin.received().is_empty());
}

/// The DMZ relay restarted (drained, then started again on the same port) while pushes flow: no
/// push reaches the origin twice, every answer is a 200 whose push arrived or one of pushrelay's
/// own named failures, and pushes flow again once it is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dmz_relay_restarted_under_load_delivers_no_push_twice_and_names_every_failure() {
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    let pki = TestPki::new();
    let origin = FakeApns::start(&pki).await;
    let proxy = TestProxy::start(Behaviour::Open).await;
    let secret = chain::secret_file(&pki, "relay.secret", SECRET);
    let dmz_yaml = format!(
        "{}shutdown_grace: 2s\n",
        chain::dmz_yaml(&pki, &origin, &secret, "\"127.0.0.1/32\"")
    );
    let socket = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let dmz_addr = socket.local_addr().unwrap();
    let dmz = relay::start_on(&dmz_yaml, vec![socket]).await;
    let url = format!("https://localhost:{}", dmz_addr.port());
    let inside = relay::start(&chain::inside_yaml(
        &pki,
        origin.port(),
        Some(&proxy.url()),
        &url,
        &secret,
    ))
    .await;
    let client = Arc::new(H2Client::connect(&pki, inside.addr()).await);

    let stop = Arc::new(AtomicBool::new(false));
    let next = Arc::new(AtomicUsize::new(0));
    let mut workers = Vec::new();
    for _ in 0..20 {
        let (client, stop, next) = (client.clone(), stop.clone(), next.clone());
        workers.push(tokio::spawn(async move {
            let mut answers = Vec::new();
            // Bounded in time as well as by `stop`.
            let until = tokio::time::Instant::now() + std::time::Duration::from_secs(60);
            while !stop.load(Ordering::SeqCst) && tokio::time::Instant::now() < until {
                let i = next.fetch_add(1, Ordering::SeqCst);
                let id = format!("00000000-0000-4000-8000-{i:012x}");
                let mut req = push_request("api.push.apple.com", &token(i));
                req.headers_mut().insert("apns-id", id.parse().unwrap());
                let answer = client.send(req, Bytes::from(PAYLOAD)).await.unwrap();
                answers.push((id, answer.status.as_u16(), answer.reason()));
            }
            answers
        }));
    }
    let received_at_least = |n: usize| {
        let origin = &origin;
        async move {
            while origin.received().len() < n {
                origin.arrived.notified().await;
            }
        }
    };
    within(20, "pushes before the restart", received_at_least(200)).await;
    within(10, "DMZ relay drained", dmz.stop()).await;
    let before = origin.received().len();
    let socket = tokio::net::TcpListener::bind(dmz_addr).await.unwrap();
    let dmz = relay::start_on(&dmz_yaml, vec![socket]).await;
    within(
        30,
        "pushes after the restart",
        received_at_least(before + 200),
    )
    .await;
    stop.store(true, Ordering::SeqCst);
    let mut answers = Vec::new();
    for w in workers {
        answers.extend(within(30, "workers", w).await.unwrap());
    }

    let mut at_origin = HashMap::new();
    for r in origin.received() {
        let id = r.headers["apns-id"].to_str().unwrap().to_owned();
        *at_origin.entry(id).or_insert(0) += 1;
    }
    let twice: Vec<_> = at_origin.iter().filter(|(_, n)| **n > 1).collect();
    assert!(twice.is_empty(), "pushes delivered twice: {twice:?}");
    let mut failures: HashMap<String, usize> = HashMap::new();
    for (id, status, reason) in &answers {
        if *status == 200 {
            assert!(
                at_origin.contains_key(id),
                "{id} answered 200 but never reached the origin"
            );
        } else {
            let reason = reason.clone().unwrap_or_default();
            assert!(
                matches!(status, 502..=504) && reason.starts_with("Relay"),
                "{id}: unnamed failure {status} {reason:?}"
            );
            *failures.entry(reason).or_insert(0) += 1;
        }
    }
    let ok = answers.iter().filter(|a| a.1 == 200).count();
    assert!(ok >= 400, "{ok} pushes answered 200");
    eprintln!(
        "{} pushes: {ok} ok, failures by reason: {failures:?}",
        answers.len()
    );
    dmz.stop().await;
}

/// The inside relay's status page names the DMZ relay as each destination's route, and never
/// the shared secret.
#[tokio::test]
async fn status_page_names_the_dmz_relay_as_the_route() {
    let pki = TestPki::new();
    let origin = FakeApns::start(&pki).await;
    let secret = chain::secret_file(&pki, "relay.secret", SECRET);
    let url = "https://localhost:1";
    let inside =
        relay::start_with_admin(&chain::inside_yaml(&pki, origin.port(), None, url, &secret)).await;
    let admin = inside.admin.unwrap();
    let answer = support::http1::exchange(
        admin,
        b"GET /status.json HTTP/1.1\r\nHost: admin\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(answer.status, 200);
    let body = String::from_utf8_lossy(&answer.body);
    assert!(
        body.contains(&format!("\"route\": \"via relay {url}\""))
            || body.contains(&format!("\"route\":\"via relay {url}\"")),
        "{body}"
    );
    assert!(!body.contains(SECRET), "the secret must not show: {body}");
}

/// The DMZ relay goes down under load (drained and stopped, its port closed for about a second)
/// and comes back on the same port: the inside relay rides it out as it rides out an origin
/// outage (`upstream.reconnect_wait`), so requests wait instead of failing fast. No push is lost
/// except those in flight at the cut (at most one per sender, `RelayChainReset`), and none
/// reaches the origin twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dmz_relay_outage_is_ridden_out_like_an_origin_outage() {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::time::Duration;
    const SENDERS: usize = 16;
    let pki = TestPki::new();
    let origin = FakeApns::start(&pki).await;
    let secret = chain::secret_file(&pki, "relay.secret", SECRET);
    let dmz_yaml = format!(
        "{}shutdown_grace: 1s\n",
        chain::dmz_yaml(&pki, &origin, &secret, "\"127.0.0.1/32\"")
    );
    let socket = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let dmz_addr = socket.local_addr().unwrap();
    let dmz = relay::start_on(&dmz_yaml, vec![socket]).await;
    let url = format!("https://localhost:{}", dmz_addr.port());
    let inside_yaml = chain::inside_yaml(&pki, origin.port(), None, &url, &secret)
        .replace("request_timeout: 5s", "request_timeout: 8s");
    assert!(inside_yaml.contains("request_timeout: 8s"));
    let inside = relay::start(&inside_yaml).await;
    let client = Arc::new(H2Client::connect(&pki, inside.addr()).await);

    let stop = Arc::new(AtomicBool::new(false));
    let senders: Vec<_> = (0..SENDERS)
        .map(|s| {
            let (client, stop) = (client.clone(), stop.clone());
            tokio::spawn(async move {
                let mut outcomes = Vec::new();
                let mut pace = tokio::time::interval(Duration::from_millis(20));
                let until = tokio::time::Instant::now() + Duration::from_secs(60);
                let mut n = 0;
                while !stop.load(Ordering::SeqCst) && tokio::time::Instant::now() < until {
                    pace.tick().await;
                    let id = format!("00000000-0000-4000-8000-{s:04}{n:08}");
                    let mut req = push_request("api.push.apple.com", &token(s * 100_000 + n));
                    req.headers_mut().insert("apns-id", id.parse().unwrap());
                    let answer = client.send(req, Bytes::from(PAYLOAD)).await.unwrap();
                    outcomes.push((id, answer.status.as_u16(), answer.reason()));
                    n += 1;
                }
                outcomes
            })
        })
        .collect();
    within(20, "pushes before the outage", origin.wait_received(100)).await;
    within(10, "DMZ relay stopped", dmz.stop()).await;
    let before = origin.received().len();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let socket = tokio::net::TcpListener::bind(dmz_addr).await.unwrap();
    let dmz = relay::start_on(&dmz_yaml, vec![socket]).await;
    within(
        20,
        "pushes after the outage",
        origin.wait_received(before + 100),
    )
    .await;
    stop.store(true, Ordering::SeqCst);
    let mut outcomes = Vec::new();
    for s in senders {
        outcomes.extend(within(20, "senders", s).await.unwrap());
    }

    let mut at_origin: HashMap<String, usize> = HashMap::new();
    for r in origin.received() {
        let id = r.headers["apns-id"].to_str().unwrap().to_owned();
        *at_origin.entry(id).or_insert(0) += 1;
    }
    let twice: Vec<_> = at_origin.iter().filter(|(_, n)| **n > 1).collect();
    assert!(twice.is_empty(), "pushes delivered twice: {twice:?}");
    let mut lost = Vec::new();
    for (id, status, reason) in &outcomes {
        if *status == 200 {
            assert!(
                at_origin.contains_key(id),
                "{id} answered 200, never delivered"
            );
        } else {
            lost.push((id.clone(), *status, reason.clone()));
        }
    }
    assert!(
        lost.len() <= SENDERS
            && lost.iter().all(|(_, status, reason)| *status == 502
                && reason.as_deref() == Some("RelayChainReset")),
        "only pushes in flight at the cut may fail, {} of {}: {lost:?}",
        lost.len(),
        outcomes.len()
    );
    eprintln!(
        "{} pushes, {} lost at the cut: {lost:?}",
        outcomes.len(),
        lost.len()
    );
    dmz.stop().await;
}

/// The connections to the DMZ relay are the pool's like any other: counted in
/// `pushrelay_upstream_connections` and shown on the status page, per destination.
#[tokio::test]
async fn chain_connections_show_in_the_metrics_and_on_the_status_page() {
    let pki = TestPki::new();
    let origin = FakeApns::start(&pki).await;
    let secret = chain::secret_file(&pki, "relay.secret", SECRET);
    let dmz = relay::start(&chain::dmz_yaml(&pki, &origin, &secret, "\"127.0.0.1/32\"")).await;
    let url = format!("https://localhost:{}", dmz.addr().port());
    let inside = relay::start_with_admin(&chain::inside_yaml(
        &pki,
        origin.port(),
        None,
        &url,
        &secret,
    ))
    .await;
    let client = H2Client::connect(&pki, inside.addr()).await;
    assert_eq!(client.push(&token(1), PAYLOAD).await.status, 200);
    let dest = format!("api.push.apple.com:{}", origin.port());
    let metrics = inside.relay.metrics().render(inside.relay.pool());
    let line = metrics
        .lines()
        .find(|l| l.starts_with("pushrelay_upstream_connections{") && l.contains(&dest))
        .unwrap_or_else(|| panic!("no upstream_connections for {dest}:\n{metrics}"));
    assert!(line.ends_with(" 1"), "{line}");
    let answer = support::http1::exchange(
        inside.admin.unwrap(),
        b"GET /status.json HTTP/1.1\r\nHost: admin\r\nConnection: close\r\n\r\n",
    )
    .await;
    let status: serde_json::Value = serde_json::from_slice(&answer.body).unwrap();
    let entry = status["destinations"]
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["name"] == dest.as_str())
        .unwrap_or_else(|| panic!("{dest} in {status}"))
        .clone();
    assert_eq!(entry["connections"], 1, "{entry}");
    assert_eq!(entry["state"], "up", "{entry}");
}

/// A DMZ relay that knows the inside relay by its client certificate alone (`tls.client_ca`, no
/// secret) carries pushes through a plain CONNECT proxy, once each; an inside relay without a
/// certificate, or with one from another CA, is refused in the TLS handshake: nothing reaches
/// the origin, and the client's answer names the TLS hop to the DMZ relay.
#[tokio::test]
async fn a_client_certificate_alone_lets_the_inside_relay_through_and_none_is_refused_in_tls() {
    let pki = TestPki::new();
    let origin = FakeApns::start(&pki).await;
    let proxy = TestProxy::start(Behaviour::Open).await;
    let (cert, key) = pki.write_client_cert("inside-relay");
    let (inside, dmz) =
        chain::start_with_cert(&pki, &origin, Some(&proxy.url()), (&cert, &key)).await;
    let url = format!("https://localhost:{}", dmz.addr().port());
    let client = H2Client::connect(&pki, inside.addr()).await;
    for i in 0..10 {
        let answer = client.push(&token(i), PAYLOAD).await;
        assert_eq!(answer.status, 200, "{i}: {:?}", answer.body);
        assert!(!answer.headers.contains_key("pushrelay-dmz"));
    }
    let received = origin.received();
    assert_eq!(received.len(), 10, "each push reaches the origin once");
    for r in &received {
        assert_eq!(r.authority.as_deref(), Some("api.push.apple.com"));
        assert!(
            r.headers
                .keys()
                .all(|k| !k.as_str().starts_with("pushrelay-")),
            "a chain header reached the origin: {:?}",
            r.headers
        );
    }
    assert!(
        proxy.tunnel_count() >= 1,
        "the pushes went through the proxy"
    );

    // No certificate (the inside relay needs a secret then, which this DMZ relay does not check),
    // then a certificate from a CA the DMZ relay does not trust.
    let secret = chain::secret_file(&pki, "relay.secret", SECRET);
    let other = TestPki::new();
    let (other_cert, other_key) = other.write_client_cert("stranger");
    let without = chain::inside_yaml(&pki, origin.port(), Some(&proxy.url()), &url, &secret);
    let stranger = chain::inside_yaml_with_cert(
        &pki,
        origin.port(),
        Some(&proxy.url()),
        &url,
        (&other_cert, &other_key),
    );
    for (what, yaml) in [("no certificate", without), ("another CA's", stranger)] {
        let inside = relay::start(&yaml).await;
        let client = H2Client::connect(&pki, inside.addr()).await;
        let answer = within(20, what, client.push(&token(99), PAYLOAD)).await;
        assert_eq!(
            (answer.status.as_u16(), answer.reason().as_deref()),
            (502, Some("RelayChainTlsFailed")),
            "{what}: {:?}",
            answer.body
        );
    }
    assert_eq!(
        origin.received().len(),
        10,
        "a refused inside relay's push reached the origin"
    );
}

/// The inside relay's client certificate is read again by a reload: refused while its files hold
/// a certificate the DMZ relay does not accept, let through once they hold one it does.
#[tokio::test]
async fn a_renewed_client_certificate_drains_the_connections_that_presented_the_old_one() {
    let pki = TestPki::new();
    let origin = FakeApns::start(&pki).await;
    let proxy = TestProxy::start(Behaviour::Open).await;
    let (cert, key) = pki.write_client_cert("inside-relay");
    let (inside, _dmz) =
        chain::start_with_cert(&pki, &origin, Some(&proxy.url()), (&cert, &key)).await;
    let client = H2Client::connect(&pki, inside.addr()).await;
    let first = within(20, "first", client.push(&token(1), PAYLOAD)).await;
    assert_eq!(first.status, 200, "{:?}", first.body);
    assert_eq!(proxy.tunnel_count(), 1);
    let (renewed_cert, renewed_key) = pki.write_client_cert("inside-relay-renewed");
    std::fs::copy(&renewed_cert, &cert).unwrap();
    std::fs::copy(&renewed_key, &key).unwrap();
    inside.reloader.renew_certificates().unwrap();
    let second = within(20, "after the reload", client.push(&token(2), PAYLOAD)).await;
    assert_eq!(second.status, 200, "{:?}", second.body);
    assert_eq!(
        proxy.tunnel_count(),
        2,
        "the push after the reload goes on a new connection, which presents the new certificate"
    );
    // The old connection, done with its pushes, closes; the new one stays.
    within(10, "old connection closed", proxy.wait_open_at_most(1)).await;
    let third = within(20, "third", client.push(&token(3), PAYLOAD)).await;
    assert_eq!(third.status, 200, "{:?}", third.body);
    assert_eq!(proxy.tunnel_count(), 2);
    assert_eq!(origin.received().len(), 3);
}

/// A DMZ relay that refuses the inside relay's certificate costs one TLS handshake per back-off
/// step, not two per push: the refusal (which TLS 1.3 reports only at the first read) counts as
/// the failed connect it is, is not sent again, and the pushes after it fail fast with the same
/// reason, nothing reaching the origin.
#[tokio::test]
async fn a_refused_client_certificate_backs_off_instead_of_costing_a_handshake_per_push() {
    let pki = TestPki::new();
    let origin = FakeApns::start(&pki).await;
    let proxy = TestProxy::start(Behaviour::Open).await;
    let other = TestPki::new();
    let (cert, key) = other.write_client_cert("stranger");
    let (inside, _dmz) =
        chain::start_with_cert(&pki, &origin, Some(&proxy.url()), (&cert, &key)).await;
    let client = H2Client::connect(&pki, inside.addr()).await;
    for i in 0..20 {
        let answer = within(20, "a refused push", client.push(&token(i), PAYLOAD)).await;
        assert_eq!(
            (answer.status.as_u16(), answer.reason().as_deref()),
            (502, Some("RelayChainTlsFailed")),
            "push {i}: {:?}",
            answer.body
        );
    }
    assert_eq!(
        proxy.tunnel_count(),
        1,
        "20 refused pushes inside the first back-off step: one tunnel, one handshake"
    );
    let failures = || {
        inside
            .relay
            .pool()
            .health()
            .iter()
            .map(|(_, h)| h.failures)
            .max()
    };
    assert_eq!(failures(), Some(1));
    // Once the step is over, the next push tries again, is refused again, and the back-off goes
    // on growing: the refused handshake does not count as a success that starts it afresh.
    within(5, "the first back-off step", async {
        while inside
            .relay
            .pool()
            .health()
            .iter()
            .any(|(_, h)| h.retry_in.is_some_and(|r| !r.is_zero()))
        {
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    })
    .await;
    let again = within(20, "after the step", client.push(&token(99), PAYLOAD)).await;
    assert_eq!(again.reason().as_deref(), Some("RelayChainTlsFailed"));
    assert_eq!(proxy.tunnel_count(), 2);
    assert_eq!(
        failures(),
        Some(2),
        "the second refusal is the second failure"
    );
    assert!(origin.received().is_empty());
}

#[tokio::test]
async fn a_renewed_client_certificate_is_presented_after_a_reload() {
    let pki = TestPki::new();
    let origin = FakeApns::start(&pki).await;
    let other = TestPki::new();
    let (cert, key) = other.write_client_cert("inside-relay");
    let (inside, _dmz) = chain::start_with_cert(&pki, &origin, None, (&cert, &key)).await;
    let client = H2Client::connect(&pki, inside.addr()).await;
    let refused = within(20, "refused", client.push(&token(1), PAYLOAD)).await;
    assert_eq!(refused.reason().as_deref(), Some("RelayChainTlsFailed"));
    let (good_cert, good_key) = pki.write_client_cert("renewed");
    std::fs::copy(&good_cert, &cert).unwrap();
    std::fs::copy(&good_key, &key).unwrap();
    inside.reloader.renew_certificates().unwrap();
    let answer = within(20, "after the reload", client.push(&token(2), PAYLOAD)).await;
    assert_eq!(answer.status, 200, "{:?}", answer.body);
    assert_eq!(origin.received().len(), 1);
}
