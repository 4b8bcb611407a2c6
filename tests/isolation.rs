//! Delivery and isolation at the front door: a request goes upstream only once complete, every
//! client reads pushrelay's own answers (with `apns-id`), one client cannot take the shared
//! upstream (or Apple's patience) from the others, and connections beyond the limits are closed
//! at once.

mod support;

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use bytes::Bytes;
use futures_util::future::join_all;
use http::StatusCode;
use support::client::{Connect, H2Client, push_request, read_answer};
use support::http1::RawConn;
use support::origin::{FakeApns, OriginOptions};
use support::pki::TestPki;
use support::relay::{self, Via};
use support::{token, within};
use tokio::io::AsyncReadExt;

const PAYLOAD: &str = r#"{"aps":{"alert":"hi"}}"#;

/// A port nothing listens on: the destination is unreachable and the relay answers 502 itself.
async fn closed_port() -> u16 {
    let socket = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    socket.local_addr().unwrap().port()
}

fn is_uuid_v4(id: &str) -> bool {
    let groups: Vec<usize> = id.split('-').map(str::len).collect();
    groups == [8, 4, 4, 4, 12]
        && id.bytes().all(|c| c == b'-' || c.is_ascii_hexdigit())
        && &id[14..15] == "4"
}

for_each_http2_client! {
/// pushrelay's own answers carry the client's `apns-id`, or a new UUID when it sent none.
async fn relay_made_answers_carry_the_clients_apns_id_or_a_new_one() {
    let pki = TestPki::new();
    let relay = relay::start(&relay::pre_proxy_yaml_on(
        &pki,
        closed_port().await,
        Via::Direct,
    ))
    .await;
    let client = H2Client::connect(&pki, relay.addr()).await;

    let mut req = push_request("api.push.apple.com", &token(1));
    let theirs = "5a7c1e0b-3c2d-4e5f-8a9b-0c1d2e3f4a5b";
    req.headers_mut().insert("apns-id", theirs.parse().unwrap());
    let answer = within(10, "push", client.send(req, Bytes::from(PAYLOAD)))
        .await
        .unwrap();
    assert_eq!(answer.status, StatusCode::BAD_GATEWAY);
    assert_eq!(answer.headers["apns-id"], theirs);

    let answer = within(10, "push", client.push(&token(2), PAYLOAD)).await;
    assert_eq!(answer.status, StatusCode::BAD_GATEWAY);
    let id = answer.headers["apns-id"].to_str().unwrap();
    assert!(is_uuid_v4(id), "{id}");

    // Refused before a destination is known (421): the same.
    let answer = within(
        10,
        "misdirected",
        client.send(
            push_request("api.sandbox.push.apple.com", &token(3)),
            Bytes::from(PAYLOAD),
        ),
    )
    .await
    .unwrap();
    assert_eq!(answer.status, StatusCode::MISDIRECTED_REQUEST);
    assert!(is_uuid_v4(answer.headers["apns-id"].to_str().unwrap()));
    relay.stop().await;
}
}

for_each_http2_client! {
/// A client that sends its body well after its headers still reads the 502 and its reason: the
/// answer waits for the request, so the stream is never reset under the client.
async fn a_client_that_sends_its_body_late_still_reads_the_502_and_its_reason() {
    let pki = TestPki::new();
    let relay = relay::start(&relay::pre_proxy_yaml_on(
        &pki,
        closed_port().await,
        Via::Direct,
    ))
    .await;
    let client = H2Client::connect(&pki, relay.addr()).await;

    let (response, mut body) = client
        .open(push_request("api.push.apple.com", &token(1)))
        .await
        .unwrap();
    // Late on purpose: a relay that answers before the body has long answered and reset by now.
    tokio::time::sleep(Duration::from_millis(500)).await;
    body.send_data(Bytes::from(PAYLOAD), true)
        .expect("the stream is still open when the body comes");
    let answer = within(10, "answer", read_answer(response)).await.unwrap();
    assert_eq!(answer.status, StatusCode::BAD_GATEWAY);
    assert_eq!(answer.reason().as_deref(), Some("RelayUpstreamUnreachable"));
    assert!(answer.headers.contains_key("apns-id"));
    relay.stop().await;
}
}

for_each_http2_client! {
/// A body that never completes is answered 408 after `request_body_timeout`, and nothing of it
/// reaches the origin.
async fn a_body_that_never_completes_is_answered_408_and_never_reaches_the_origin() {
    let pki = TestPki::new();
    let origin = FakeApns::start(&pki).await;
    let yaml = relay::pre_proxy_yaml(&pki, &origin, Via::Direct)
        + "limits:\n  request_body_timeout: 300ms\n";
    let relay = relay::start(&yaml).await;
    let client = H2Client::connect(&pki, relay.addr()).await;

    let (response, mut body) = client
        .open(push_request("api.push.apple.com", &token(1)))
        .await
        .unwrap();
    body.send_data(Bytes::from_static(b"{\"aps\":"), false)
        .unwrap();
    let answer = within(10, "answer", read_answer(response)).await.unwrap();
    assert_eq!(answer.status, StatusCode::REQUEST_TIMEOUT);
    assert_eq!(answer.reason().as_deref(), Some("RelayRequestTimeout"));
    assert_eq!(
        origin.streams.load(Ordering::SeqCst),
        0,
        "a half-sent request reached the origin"
    );

    // The connection still serves complete pushes.
    assert_eq!(
        within(10, "push", client.push(&token(2), PAYLOAD))
            .await
            .status,
        StatusCode::OK
    );
    relay.stop().await;
}
}

for_each_http2_client! {
/// Two attackers next to a normal client, all on the same destination and JWT issuer, on an
/// upstream of one connection with 20 streams: one holds 120 half-open streams (headers, no
/// body), one never reads its answers (window 0). The normal client gets every push through.
async fn attackers_holding_streams_or_not_reading_leave_the_normal_client_every_push() {
    let pki = TestPki::new();
    let origin = FakeApns::start_with(
        &pki,
        OriginOptions {
            max_concurrent_streams: Some(20),
            ..Default::default()
        },
    )
    .await;
    let yaml = relay::pre_proxy_yaml(&pki, &origin, Via::Direct)
        + "  max_connections_per_destination: 1\n  max_queued_requests: 10\n"
        + "limits:\n  client_write_timeout: 1s\n";
    let relay = relay::start(&yaml).await;

    // Half-open streams; a complete push behind them on the same connection is answered only
    // once the relay has taken every stream before it.
    let holder = H2Client::connect(&pki, relay.addr()).await;
    let mut held = Vec::new();
    for i in 0..120 {
        held.push(
            holder
                .open(push_request("api.push.apple.com", &token(i)))
                .await
                .unwrap(),
        );
    }
    within(10, "holder's own push", holder.push(&token(999), PAYLOAD)).await;

    // Answers with a body (400 BadDeviceToken) that the client never takes.
    let mut c = Connect::new(relay.addr());
    c.window = Some(0);
    let stalled = H2Client::connect_with(&pki, c).await.unwrap();
    let mut unread = Vec::new();
    for _ in 0..25 {
        let (response, mut body) = stalled
            .open(push_request("api.push.apple.com", "not-a-token"))
            .await
            .unwrap();
        body.send_data(Bytes::from(PAYLOAD), true).unwrap();
        unread.push(response);
    }
    // Their heads arrive (no window needed); their bodies stay unread.
    let heads = within(10, "stalled heads", join_all(unread)).await;
    assert!(
        heads
            .iter()
            .all(|r| r.as_ref().unwrap().status() == StatusCode::BAD_REQUEST)
    );

    // Ten at a time: the upstream (20 streams, 10 queued) has room for all of them.
    let normal = H2Client::connect(&pki, relay.addr()).await;
    let mut answers = Vec::new();
    for batch in 0..6 {
        let tokens: Vec<String> = (0..10).map(|i| token(1000 + batch * 10 + i)).collect();
        let pushes = tokens.iter().map(|t| normal.push(t, PAYLOAD));
        answers.extend(within(20, "normal client's pushes", join_all(pushes)).await);
    }
    let ok = answers
        .iter()
        .filter(|a| a.status == StatusCode::OK)
        .count();
    let other: Vec<_> = answers
        .iter()
        .filter(|a| a.status != StatusCode::OK)
        .map(|a| (a.status, a.reason()))
        .collect();
    assert_eq!(ok, 60, "normal client's failures: {other:?}");
    // The answers the stalled client never took are cut off after `client_write_timeout`.
    let mut body = heads.into_iter().next().unwrap().unwrap().into_body();
    let cut = within(10, "stalled answer cut off", body.data()).await;
    let reason = cut.and_then(|r| r.err()).and_then(|e| e.reason());
    assert_eq!(reason, Some(h2::Reason::CANCEL));
    drop(held);
    relay.stop().await;
}
}

for_each_http2_client! {
/// A client that goes away with 60 pushes in flight (mass cancel) does not turn into 60 resets
/// towards the origin, whose abuse protection would GOAWAY the upstream connection every client
/// shares: the pushes finish upstream, their answers dropped.
async fn a_clients_mass_cancel_does_not_get_the_shared_upstream_connection_goawayed() {
    let pki = TestPki::new();
    let (origin, hold) = FakeApns::start_holding(
        &pki,
        OriginOptions {
            calm_after_resets: Some(10),
            ..Default::default()
        },
    )
    .await;
    let yaml = relay::pre_proxy_yaml(&pki, &origin, Via::Direct)
        + "  max_connections_per_destination: 1\n";
    let relay = relay::start(&yaml).await;
    let normal = H2Client::connect(&pki, relay.addr()).await;

    let attacker = Arc::new(H2Client::connect(&pki, relay.addr()).await);
    let pushes: Vec<_> = (0..60)
        .map(|i| {
            let a = attacker.clone();
            tokio::spawn(async move { a.push(&token(i), PAYLOAD).await })
        })
        .collect();
    origin.wait_received(60).await;
    for p in pushes {
        p.abort();
    }
    drop(attacker);
    // Nothing may end at the origin while its answers are held: a reset would, within moments
    // of the client leaving. (Waiting for something that must not happen needs a bound.)
    let early = tokio::time::timeout(Duration::from_secs(1), origin.ended.acquire()).await;
    assert!(
        early.is_err(),
        "a stream ended at the origin before its answer: the client's cancel went upstream"
    );

    hold.add_permits(61);
    let answer = within(10, "normal push", normal.push(&token(100), PAYLOAD)).await;
    assert_eq!(answer.status, StatusCode::OK);
    // Every held push has ended at the origin, answered or reset.
    let ended = within(10, "held pushes end", origin.ended.acquire_many(61))
        .await
        .unwrap();
    ended.forget();
    assert_eq!(
        origin.resets.load(Ordering::SeqCst),
        0,
        "the client's cancel reached the origin"
    );
    assert_eq!(origin.calm_goaways.load(Ordering::SeqCst), 0);
    assert_eq!(
        origin.connection_count(),
        1,
        "the shared upstream connection was replaced"
    );
    relay.stop().await;
}
}

for_each_http2_client! {
/// A client that opens streams and resets them (rapid reset) gets GOAWAY ENHANCE_YOUR_CALM once
/// it has spent its budget (one full set of streams at once, then a few a second).
async fn a_client_that_keeps_resetting_streams_gets_goaway_enhance_your_calm() {
    let pki = TestPki::new();
    let origin = FakeApns::start(&pki).await;
    let relay = relay::start(&relay::pre_proxy_yaml(&pki, &origin, Via::Direct)).await;
    let mut client = H2Client::connect(&pki, relay.addr()).await;
    for round in 0..2 {
        let mut open = Vec::new();
        for i in 0..100 {
            open.push(
                client
                    .open(push_request("api.push.apple.com", &token(i)))
                    .await
                    .unwrap(),
            );
        }
        // A complete push behind them: once it is answered, the relay has taken every one.
        let sync = client.send(
            push_request("api.push.apple.com", &token(500 + round)),
            Bytes::from(PAYLOAD),
        );
        assert_eq!(
            within(10, "sync push", sync).await.unwrap().status,
            StatusCode::OK
        );
        for (_, mut body) in open {
            body.send_reset(h2::Reason::CANCEL);
        }
    }
    within(10, "the relay closes the connection", client.closed()).await;
    let ended = client
        .ended
        .lock()
        .unwrap()
        .take()
        .expect("the connection ended with an error");
    assert!(ended.is_go_away(), "{ended}");
    assert_eq!(
        ended.reason(),
        Some(h2::Reason::ENHANCE_YOUR_CALM),
        "{ended}"
    );
    assert_eq!(
        origin.received().len(),
        2,
        "only the complete pushes reached the origin"
    );
    relay.stop().await;
}
}

for_each_http2_client! {
/// At `max_connections` a new client is closed at once (a plain HTTP/1.1 listener answers 503
/// first) and the refusal is counted; it is not left hanging in the backlog.
async fn a_client_above_max_connections_is_closed_at_once_and_counted() {
    let pki = TestPki::new();
    let origin = FakeApns::start(&pki).await;
    let yaml = relay::post_proxy_yaml(&pki, &origin, "limits:\n  max_connections: 1\n");
    let relay = relay::start(&yaml).await;
    let mut first = RawConn::connect(relay.addr()).await;
    let push = format!(
        "POST /3/device/{} HTTP/1.1\r\nHost: api.push.apple.com\r\napns-topic: t\r\nContent-Length: {}\r\n\r\n{PAYLOAD}",
        token(1),
        PAYLOAD.len()
    );
    first.send(push.as_bytes()).await;
    assert_eq!(first.read_answer().await.unwrap().status, 200);

    let mut second = RawConn::connect(relay.addr()).await;
    let answer = within(5, "refusal", second.read_answer())
        .await
        .expect("a 503 before close");
    assert_eq!(answer.status, 503);
    assert_eq!(answer.reason().as_deref(), Some("RelayTooManyConnections"));
    assert!(answer.header("apns-id").is_some());
    assert!(within(5, "close", second.closed()).await);
    let metrics = relay.relay.metrics().render(relay.relay.pool());
    assert!(
        metrics.contains(
            "pushrelay_connections_refused_total{listener=\"legacy\",reason=\"max_connections\"} 1"
        ),
        "{metrics}"
    );
    // The first client is still served.
    first.send(push.as_bytes()).await;
    assert_eq!(first.read_answer().await.unwrap().status, 200);
    relay.stop().await;
}
}

for_each_http2_client! {
/// The same on a TLS listener: the client above the limit sees its connection closed at once.
async fn a_tls_client_above_max_connections_is_closed_at_once() {
    let pki = TestPki::new();
    let origin = FakeApns::start(&pki).await;
    let yaml =
        relay::pre_proxy_yaml(&pki, &origin, Via::Direct) + "limits:\n  max_connections: 1\n";
    let relay = relay::start(&yaml).await;
    let first = H2Client::connect(&pki, relay.addr()).await;
    assert_eq!(
        within(10, "push", first.push(&token(1), PAYLOAD))
            .await
            .status,
        StatusCode::OK
    );
    let refused = within(
        5,
        "refusal",
        H2Client::connect_with(&pki, Connect::new(relay.addr())),
    )
    .await;
    assert!(refused.is_err(), "a second connection was served");
    assert_eq!(
        within(10, "push", first.push(&token(2), PAYLOAD))
            .await
            .status,
        StatusCode::OK
    );
    relay.stop().await;
}
}

/// Reads until the relay closes the connection; how long that took.
async fn time_to_close(addr: std::net::SocketAddr) -> Duration {
    let mut tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let started = std::time::Instant::now();
    let mut buf = [0u8; 64];
    let read = within(10, "close of a silent connection", tcp.read(&mut buf)).await;
    assert!(matches!(read, Ok(0) | Err(_)), "the relay sent {read:?}");
    started.elapsed()
}

for_each_http2_client! {
/// A connection that sends nothing is closed `handshake_timeout` after accept, on both doors
/// (post-proxy plain HTTP/1.1 would otherwise wait the whole idle timeout).
async fn a_silent_connection_is_closed_after_handshake_timeout_on_both_doors() {
    let pki = TestPki::new();
    let origin = FakeApns::start(&pki).await;
    let limits = "limits:\n  handshake_timeout: 300ms\n  idle_timeout: 60s\n";
    let post = relay::start(&relay::post_proxy_yaml(&pki, &origin, limits)).await;
    let pre = relay::start(&(relay::pre_proxy_yaml(&pki, &origin, Via::Direct) + limits)).await;
    for addr in [post.addr(), pre.addr()] {
        let took = time_to_close(addr).await;
        assert!(
            took >= Duration::from_millis(250),
            "{addr}: closed after {took:?}"
        );
    }
    post.stop().await;
    pre.stop().await;
}
}
