//! The upstream pool against a scripted origin and a proxy that cuts tunnels: GOAWAY and
//! REFUSED_STREAM are survived without loss or duplicates, stream limits open more connections,
//! dead connections are replaced, identities never share a connection, and back-off is spaced.

mod support;

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use bytes::Bytes;
use futures_util::future::join_all;
use http::StatusCode;
use support::client::{H2Client, bearer, push_request};
use support::origin::{FakeApns, OriginOptions, Script};
use support::pki::TestPki;
use support::proxy::{Behaviour, TestProxy};
use support::relay::{self, Via};
use support::{token, within};

const PAYLOAD: &str = r#"{"aps":{"alert":"pool"}}"#;

fn yaml_with(pki: &TestPki, origin: &FakeApns, via: Via, upstream_extra: &str) -> String {
    let base = relay::pre_proxy_yaml(pki, origin, via);
    base.replace("upstream:\n", &format!("upstream:\n{upstream_extra}"))
}

fn apns_id(i: usize) -> String {
    format!("00000000-0000-4000-8000-{i:012}")
}

async fn push_with_id(client: &H2Client, i: usize) -> StatusCode {
    let mut req = push_request("api.push.apple.com", &token(i));
    req.headers_mut()
        .insert("apns-id", apns_id(i).parse().unwrap());
    client.send(req, Bytes::from(PAYLOAD)).await.unwrap().status
}

for_each_http2_client! {
/// GOAWAY in the middle of 200 concurrent pushes: every push is answered 200 and reaches the
/// origin exactly once; later pushes use a new connection.
async fn goaway_during_200_concurrent_pushes_loses_none_and_duplicates_none() {
    let pki = TestPki::new();
    let origin = FakeApns::start_with(
        &pki,
        OriginOptions {
            goaway_after: Some(60),
            ..Default::default()
        },
    )
    .await;
    let relay = relay::start(&relay::pre_proxy_yaml(&pki, &origin, Via::Direct)).await;
    let clients: Vec<Arc<H2Client>> = {
        let mut v = Vec::new();
        for _ in 0..4 {
            v.push(Arc::new(H2Client::connect(&pki, relay.addr()).await));
        }
        v
    };
    let pushes = (0..200).map(|i| {
        let c = clients[i % 4].clone();
        async move { push_with_id(&c, i).await }
    });
    let statuses = within(30, "200 pushes", join_all(pushes)).await;
    assert!(
        statuses.iter().all(|s| *s == StatusCode::OK),
        "{statuses:?}"
    );
    let mut seen: HashMap<String, usize> = HashMap::new();
    for r in origin.received() {
        *seen
            .entry(r.headers["apns-id"].to_str().unwrap().to_owned())
            .or_default() += 1;
    }
    assert_eq!(seen.len(), 200, "every push arrived");
    assert!(
        seen.values().all(|n| *n == 1),
        "no push arrived twice: {:?}",
        seen.iter().filter(|(_, n)| **n > 1).collect::<Vec<_>>()
    );
    assert_eq!(push_with_id(&clients[0], 999).await, StatusCode::OK);
    assert!(
        origin.connection_count() >= 2,
        "the connection that went away was replaced"
    );
}
}

for_each_http2_client! {
/// An origin's answer trailers reach the HTTP/2 client after the answer, on either upstream
/// client (the own one reads answers whole, trailers included).
async fn answer_trailers_reach_the_client() {
    let pki = TestPki::new();
    let mut trailers = http::HeaderMap::new();
    trailers.insert("x-origin-checksum", "c0ffee".parse().unwrap());
    let origin = FakeApns::start_with(
        &pki,
        OriginOptions {
            trailers: Some(trailers),
            ..Default::default()
        },
    )
    .await;
    let relay = relay::start(&relay::pre_proxy_yaml(&pki, &origin, Via::Direct)).await;
    let client = H2Client::connect(&pki, relay.addr()).await;
    let answer = within(10, "the push", client.push(&token(1), PAYLOAD)).await;
    assert_eq!(answer.status, StatusCode::OK, "{:?}", answer.body);
    let got = answer.trailers.expect("the answer ends with trailers");
    assert_eq!(got["x-origin-checksum"], "c0ffee");
}
}

for_each_http2_client! {
/// A stream reset with REFUSED_STREAM was never processed: it is sent once more and succeeds.
async fn refused_stream_is_sent_again_once() {
    let pki = TestPki::new();
    let origin = FakeApns::start_with(
        &pki,
        OriginOptions {
            refuse_first: 1,
            ..Default::default()
        },
    )
    .await;
    let relay = relay::start(&relay::pre_proxy_yaml(&pki, &origin, Via::Direct)).await;
    let client = H2Client::connect(&pki, relay.addr()).await;
    assert_eq!(push_with_id(&client, 1).await, StatusCode::OK);
    assert_eq!(origin.received().len(), 1);
    assert_eq!(
        origin.streams.load(Ordering::SeqCst),
        2,
        "one refused stream, one processed"
    );
}
}

for_each_http2_client! {
/// Refused twice: the relay gives up with its own 502 instead of sending a third time.
async fn refused_twice_is_not_sent_a_third_time() {
    let pki = TestPki::new();
    let origin = FakeApns::start_with(
        &pki,
        OriginOptions {
            refuse_first: 2,
            ..Default::default()
        },
    )
    .await;
    let relay = relay::start(&relay::pre_proxy_yaml(&pki, &origin, Via::Direct)).await;
    let client = H2Client::connect(&pki, relay.addr()).await;
    let answer = client.push(&token(2), PAYLOAD).await;
    assert_eq!(answer.status, StatusCode::BAD_GATEWAY);
    assert_eq!(answer.reason().as_deref(), Some("RelayUpstreamReset"));
    assert_eq!(origin.streams.load(Ordering::SeqCst), 2);
    assert!(origin.received().is_empty());
}
}

for_each_http2_client! {
/// An origin that allows one stream per connection gets one connection per concurrent push.
async fn max_streams_one_leads_to_several_connections() {
    let pki = TestPki::new();
    let options = OriginOptions {
        max_concurrent_streams: Some(1),
        ..Default::default()
    };
    let (origin, hold) = FakeApns::start_holding(&pki, options).await;
    let relay = relay::start(&yaml_with(
        &pki,
        &origin,
        Via::Direct,
        "  max_connections_per_destination: 3\n",
    ))
    .await;
    let client = Arc::new(H2Client::connect(&pki, relay.addr()).await);
    let pushes: Vec<_> = (0..3)
        .map(|i| {
            let c = client.clone();
            tokio::spawn(async move { push_with_id(&c, i).await })
        })
        .collect();
    origin.wait_received(3).await;
    assert_eq!(
        origin.connection_count(),
        3,
        "three held pushes need three connections"
    );
    hold.add_permits(3);
    for p in pushes {
        assert_eq!(within(10, "held push", p).await.unwrap(), StatusCode::OK);
    }
}
}

for_each_http2_client! {
/// SETTINGS_MAX_CONCURRENT_STREAMS lowered at run time is respected: new pushes open connections
/// instead of queueing behind the limit.
async fn max_streams_lowered_at_run_time_is_respected() {
    let pki = TestPki::new();
    let script = Script::new();
    let options = OriginOptions {
        script: Some(script.clone()),
        ..Default::default()
    };
    let (origin, hold) = FakeApns::start_holding(&pki, options).await;
    let relay = relay::start(&yaml_with(
        &pki,
        &origin,
        Via::Direct,
        "  max_connections_per_destination: 3\n",
    ))
    .await;
    let client = Arc::new(H2Client::connect(&pki, relay.addr()).await);
    hold.add_permits(1);
    assert_eq!(push_with_id(&client, 0).await, StatusCode::OK);
    assert_eq!(origin.connection_count(), 1);

    script.set_max_streams(1);
    within(10, "SETTINGS acknowledged", script.acked.acquire())
        .await
        .unwrap()
        .forget();
    let pushes: Vec<_> = (1..4)
        .map(|i| {
            let c = client.clone();
            tokio::spawn(async move { push_with_id(&c, i).await })
        })
        .collect();
    origin.wait_received(4).await;
    let conns: Vec<usize> = origin.received().iter().map(|r| r.conn).collect();
    assert_eq!(
        origin.connection_count(),
        3,
        "one stream per connection after the change: {conns:?}"
    );
    hold.add_permits(3);
    for p in pushes {
        assert_eq!(within(10, "held push", p).await.unwrap(), StatusCode::OK);
    }
}
}

for_each_http2_client! {
/// A PING that goes unanswered closes the connection; the next push opens a new one and succeeds.
async fn unanswered_ping_replaces_the_connection() {
    let pki = TestPki::new();
    let script = Script::new();
    let origin = FakeApns::start_with(
        &pki,
        OriginOptions {
            script: Some(script.clone()),
            ..Default::default()
        },
    )
    .await;
    let yaml = yaml_with(
        &pki,
        &origin,
        Via::Direct,
        "  keepalive_interval: 200ms\n  keepalive_timeout: 300ms\n",
    );
    let relay = relay::start(&yaml).await;
    let client = H2Client::connect(&pki, relay.addr()).await;
    assert_eq!(push_with_id(&client, 1).await, StatusCode::OK);
    script.drop_pings.store(true, Ordering::SeqCst);
    within(
        10,
        "relay closes the silent connection",
        script.closed.acquire(),
    )
    .await
    .unwrap()
    .forget();
    script.drop_pings.store(false, Ordering::SeqCst);
    assert_eq!(push_with_id(&client, 2).await, StatusCode::OK);
    assert_eq!(origin.connection_count(), 2);
}
}

for_each_http2_client! {
/// A firewall cuts the tunnel: the next push succeeds on a new tunnel.
async fn cut_tunnel_is_replaced_by_a_new_one() {
    let pki = TestPki::new();
    let origin = FakeApns::start(&pki).await;
    let proxy = TestProxy::start(Behaviour::Open).await;
    let relay = relay::start(&relay::pre_proxy_yaml(
        &pki,
        &origin,
        Via::Proxy(proxy.url()),
    ))
    .await;
    let client = H2Client::connect(&pki, relay.addr()).await;
    assert_eq!(push_with_id(&client, 1).await, StatusCode::OK);
    assert_eq!(proxy.tunnel_count(), 1);
    let mut changes = relay.relay.pool().changes();
    changes.mark_unchanged();
    proxy.cut_tunnels();
    let pool = relay.relay.pool().clone();
    within(
        10,
        "relay notices the cut",
        changes.wait_for(|_| pool.stats().iter().all(|(_, s)| s.open_connections == 0)),
    )
    .await
    .unwrap();
    assert_eq!(push_with_id(&client, 2).await, StatusCode::OK);
    assert_eq!(proxy.tunnel_count(), 2);
}
}

for_each_http2_client! {
/// Different JWT issuers and different certificate identities never share an upstream connection;
/// certificate identities present their own certificate, also for the app's .voip topic.
async fn identities_never_share_a_connection() {
    let pki = TestPki::new();
    let origin = FakeApns::start_with(
        &pki,
        OriginOptions {
            client_auth: true,
            ..Default::default()
        },
    )
    .await;
    let (cert_a, key_a) = pki.write_client_cert("app-one");
    let (cert_b, key_b) = pki.write_client_cert("app-two");
    let identities = identities_yaml(&[
        ("com.example.one", &cert_a, &key_a, "listeners: [apns]"),
        ("com.example.two", &cert_b, &key_b, "listeners: [apns]"),
    ]);
    let relay = relay::start(&yaml_with(&pki, &origin, Via::Direct, &identities)).await;
    let client = Arc::new(H2Client::connect(&pki, relay.addr()).await);
    // (label, apns-topic, authorization)
    let kinds: [(&str, &str, Option<String>); 5] = [
        ("team1", "com.example.token", Some(bearer("TEAM1"))),
        ("team2", "com.example.token", Some(bearer("TEAM2"))),
        ("cert-one", "com.example.one", None),
        ("cert-one", "com.example.one.voip", None),
        ("cert-two", "com.example.two", None),
    ];
    let pushes = (0..40).map(|i| {
        let (label, topic, auth) = kinds[i % kinds.len()].clone();
        let c = client.clone();
        async move {
            let mut req = push_request("api.push.apple.com", &token(i));
            req.headers_mut()
                .insert("apns-topic", topic.parse().unwrap());
            req.headers_mut()
                .insert("apns-id", apns_id(i).parse().unwrap());
            match auth {
                Some(a) => req
                    .headers_mut()
                    .insert("authorization", a.parse().unwrap()),
                None => req.headers_mut().remove("authorization"),
            };
            assert_eq!(
                c.send(req, Bytes::from(PAYLOAD)).await.unwrap().status,
                StatusCode::OK
            );
            (apns_id(i), label)
        }
    });
    let labels: HashMap<String, &str> = within(20, "pushes", join_all(pushes))
        .await
        .into_iter()
        .collect();
    let mut conns_by_label: HashMap<&str, HashSet<usize>> = HashMap::new();
    for r in origin.received() {
        let label = labels[r.headers["apns-id"].to_str().unwrap()];
        conns_by_label.entry(label).or_default().insert(r.conn);
        let expected_cn = match label {
            "cert-one" => Some("app-one"),
            "cert-two" => Some("app-two"),
            _ => None,
        };
        assert_eq!(
            r.client_cn.as_deref(),
            expected_cn,
            "{label} presented the wrong certificate"
        );
    }
    let all: Vec<(&&str, &HashSet<usize>)> = conns_by_label.iter().collect();
    for (i, (a, ca)) in all.iter().enumerate() {
        for (b, cb) in &all[i + 1..] {
            assert!(ca.is_disjoint(cb), "{a} and {b} shared a connection");
        }
    }
    assert_eq!(conns_by_label.len(), 4);
}
}

for_each_http2_client! {
/// Token identities are bounded (upstream.max_token_identities, 2 here): a new issuer takes the
/// place of the least recently used idle one, whose connection goes; with every identity busy, a
/// new one is refused with 503 RelayTooManyIdentities and nothing reaches the origin for it.
async fn token_identities_are_bounded_and_the_idlest_makes_room() {
    let pki = TestPki::new();
    let (origin, hold) = FakeApns::start_holding(&pki, OriginOptions::default()).await;
    let upstream = "  max_token_identities: 2\n";
    let relay = relay::start(&yaml_with(&pki, &origin, Via::Direct, upstream)).await;
    let client = Arc::new(H2Client::connect(&pki, relay.addr()).await);
    let push_as = |iss: &'static str, i: usize| {
        let c = client.clone();
        tokio::spawn(async move {
            let mut req = push_request("api.push.apple.com", &token(i));
            req.headers_mut()
                .insert("authorization", bearer(iss).parse().unwrap());
            c.send(req, Bytes::from(PAYLOAD)).await.unwrap()
        })
    };
    let identities = |relay: &relay::RunningRelay| {
        let mut ids: Vec<String> = relay
            .relay
            .pool()
            .stats()
            .into_iter()
            .filter(|(_, s)| s.open_connections > 0)
            .filter_map(|(k, _)| k.identity.map(|i| i.to_string()))
            .collect();
        ids.sort();
        ids
    };
    hold.add_permits(3);
    for (i, iss) in ["TEAM1", "TEAM2", "TEAM3"].into_iter().enumerate() {
        let answer = within(10, iss, push_as(iss, i)).await.unwrap();
        assert_eq!(answer.status, StatusCode::OK, "{iss}");
    }
    // TEAM1 was the least recently used when TEAM3 came: it went, with its connection.
    assert_eq!(identities(&relay), ["jwt:TEAM2/K1", "jwt:TEAM3/K1"]);
    assert_eq!(origin.connection_count(), 3);

    // Both identities busy: a fourth issuer is refused, and never reaches the origin.
    let busy = [push_as("TEAM2", 10), push_as("TEAM3", 11)];
    within(10, "both held", origin.wait_received(5)).await;
    let refused = within(10, "TEAM4", push_as("TEAM4", 12)).await.unwrap();
    assert_eq!(refused.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(refused.reason().as_deref(), Some("RelayTooManyIdentities"));
    hold.add_permits(2);
    for b in busy {
        assert_eq!(within(10, "held", b).await.unwrap().status, StatusCode::OK);
    }
    assert_eq!(origin.received().len(), 5);
    assert_eq!(origin.connection_count(), 3);
}
}

/// A pool with `shards` worker shards towards api.push.apple.com pinned to 127.0.0.1:`port`,
/// backing off from 1 s up to 8 s, with requests failing as soon as the destination is down
/// (`reconnect_wait` 0).
fn backoff_pool(
    port: u16,
    shards: usize,
) -> (
    pushrelay::upstream::pool::Pool,
    pushrelay::upstream::pool::PoolKey,
) {
    backoff_pool_with(port, shards, |_| {})
}

/// As `backoff_pool`, with `tweak` applied to the settings.
fn backoff_pool_with(
    port: u16,
    shards: usize,
    tweak: impl FnOnce(&mut pushrelay::upstream::pool::PoolSettings),
) -> (
    pushrelay::upstream::pool::Pool,
    pushrelay::upstream::pool::PoolKey,
) {
    use pushrelay::upstream::connect::Connector;
    use pushrelay::upstream::pool::{PoolKey, PoolSettings};
    let dest: pushrelay::policy::Authority = format!("api.push.apple.com:{port}").parse().unwrap();
    let mut upstream = pushrelay::config::UpstreamConfig::default();
    upstream
        .connect_to
        .insert(dest.clone(), format!("127.0.0.1:{port}"));
    let tls = pushrelay::tls::client::build(&[], None).unwrap();
    let mut settings = PoolSettings::from_config(&upstream);
    settings.backoff_base = Duration::from_secs(1);
    settings.backoff_max = Duration::from_secs(8);
    settings.reconnect_wait = Duration::ZERO;
    settings.shards = shards;
    tweak(&mut settings);
    let pool = support::relay::pool_for_current_client(
        Connector::new(&upstream),
        HashMap::from([(None, tls)]),
        settings,
        Arc::new(pushrelay::metrics::Metrics::new()),
    );
    let key = PoolKey {
        dest,
        identity: None,
    };
    (pool, key)
}

for_each_http2_client! { paused:
/// Reconnects back off exponentially with jitter, and requests fail fast in between (paused time).
async fn reconnect_backoff_is_spaced_exponentially() {
    use pushrelay::upstream::pool::PoolError;
    let closed_port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let (pool, key) = backoff_pool(closed_port, 1);
    let far = || tokio::time::Instant::now() + Duration::from_secs(3600);

    let mut waits = Vec::new();
    for attempt in 1..=5u32 {
        let err = pool
            .checkout(&key, far())
            .await
            .err()
            .expect("nothing listens there");
        assert!(
            matches!(err, PoolError::Connect { .. }),
            "attempt {attempt} tried to connect: {err}"
        );
        let remaining = match pool.checkout(&key, far()).await.err().expect("still down") {
            PoolError::BackingOff { remaining, .. } => remaining,
            other => panic!("attempt {attempt}: expected fail-fast back-off, got {other}"),
        };
        let cap = Duration::from_secs(1 << (attempt - 1)).min(Duration::from_secs(8));
        assert!(
            remaining <= cap && remaining >= cap / 2,
            "attempt {attempt}: wait {remaining:?} not in [{:?}, {cap:?}]",
            cap / 2
        );
        waits.push(remaining);
        tokio::time::advance(remaining).await;
    }
    assert!(waits[3] > waits[0], "waits grow: {waits:?}");
}
}

for_each_http2_client! { paused:
/// Worker threads share a destination's back-off: a failure seen by one makes the others fail
/// fast, and while it is down only one connect attempt runs at a time (paused time).
async fn workers_share_backoff_and_reconnect_one_at_a_time() {
    use pushrelay::upstream::pool::{PoolError, set_worker};
    // Accepts TCP (in the kernel's backlog) and never answers TLS: each attempt hangs until the
    // connect timeout.
    let hole = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let (pool, key) = backoff_pool(hole.local_addr().unwrap().port(), 2);
    let far = || tokio::time::Instant::now() + Duration::from_secs(3600);
    let backing_off = |e: Option<PoolError>| match e {
        Some(PoolError::BackingOff { remaining, .. }) => remaining,
        other => panic!("expected fail-fast back-off, got {other:?}"),
    };

    set_worker(0);
    let first = pool.checkout(&key, far()).await.err();
    assert!(
        matches!(first, Some(PoolError::Connect { .. })),
        "{first:?}"
    );
    // Worker 1 has never tried, yet it backs off too.
    set_worker(1);
    let wait = backing_off(pool.checkout(&key, far()).await.err());
    assert!(wait <= Duration::from_secs(1) && wait >= Duration::from_millis(500));
    tokio::time::advance(wait).await;

    // Worker 0 makes the next attempt; while it runs, worker 1 does not make its own.
    set_worker(0);
    let mut probe = std::pin::pin!(pool.checkout(&key, far()));
    tokio::select! {
        biased;
        r = &mut probe => panic!("the attempt cannot end before its timeout: {:?}", r.err()),
        _ = std::future::ready(()) => {}
    }
    set_worker(1);
    let during = pool.checkout(&key, far()).await.err();
    assert!(
        matches!(during, Some(PoolError::Reconnecting { .. })),
        "{during:?}"
    );
    set_worker(0);
    let second = probe.await.err();
    assert!(
        matches!(second, Some(PoolError::Connect { .. })),
        "{second:?}"
    );
    // Two failures in all: the wait doubled for worker 1 as well.
    set_worker(1);
    let wait = backing_off(pool.checkout(&key, far()).await.err());
    assert!(
        wait <= Duration::from_secs(2) && wait >= Duration::from_secs(1),
        "{wait:?}"
    );
    set_worker(0);
    drop(hole);
}
}

for_each_http2_client! {
/// With every connection full and the queue full, a push is answered 503 RelayOverloaded at once;
/// the queued one still succeeds when a stream frees.
async fn full_queue_answers_503_relay_overloaded() {
    let pki = TestPki::new();
    let options = OriginOptions {
        max_concurrent_streams: Some(1),
        ..Default::default()
    };
    let (origin, hold) = FakeApns::start_holding(&pki, options).await;
    let upstream = "  max_connections_per_destination: 1\n  max_queued_requests: 1\n";
    let relay = relay::start(&yaml_with(&pki, &origin, Via::Direct, upstream)).await;
    let client = Arc::new(H2Client::connect(&pki, relay.addr()).await);
    let first = {
        let c = client.clone();
        tokio::spawn(async move { c.push(&token(1), PAYLOAD).await })
    };
    origin.wait_received(1).await;
    let (b, c) = {
        let (c1, c2) = (client.clone(), client.clone());
        (
            tokio::spawn(async move { c1.push(&token(2), PAYLOAD).await }),
            tokio::spawn(async move { c2.push(&token(3), PAYLOAD).await }),
        )
    };
    // One of the two waits in the queue; the other finds it full and is answered at once.
    let (mut b, mut c) = (b, c);
    let overloaded = tokio::select! {
        r = &mut b => (r.unwrap(), c),
        r = &mut c => (r.unwrap(), b),
    };
    let (answer, queued) = overloaded;
    assert_eq!(answer.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(answer.reason().as_deref(), Some("RelayOverloaded"));
    hold.add_permits(2);
    assert_eq!(
        within(10, "first", first).await.unwrap().status,
        StatusCode::OK
    );
    assert_eq!(
        within(10, "queued", queued).await.unwrap().status,
        StatusCode::OK
    );
    assert_eq!(origin.connection_count(), 1);
}
}

for_each_http2_client! {
/// An origin that accepts TCP but never speaks TLS, with no ride-out (`reconnect_wait: 0s`): 504
/// RelayUpstreamTimeout within connect_timeout (1 s here), not a hang.
async fn silent_origin_tls_times_out_with_504() {
    let pki = TestPki::new();
    let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = silent.local_addr().unwrap().port();
    let held = tokio::spawn(async move {
        let mut open = Vec::new();
        while let Ok((s, _)) = silent.accept().await {
            open.push(s);
        }
    });
    let yaml = relay::pre_proxy_yaml_on(&pki, port, Via::Direct).replace(
        "connect_timeout: 2s",
        "connect_timeout: 1s\n  reconnect_wait: 0s",
    );
    let relay = relay::start(&yaml).await;
    let client = H2Client::connect(&pki, relay.addr()).await;
    let started = std::time::Instant::now();
    let answer = within(10, "silent origin", client.push(&token(1), PAYLOAD)).await;
    assert_eq!(answer.status, StatusCode::GATEWAY_TIMEOUT);
    assert_eq!(answer.reason().as_deref(), Some("RelayUpstreamTimeout"));
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "{:?}",
        started.elapsed()
    );
    held.abort();
}
}

for_each_http2_client! {
/// An origin that takes the push but never answers: 504 RelayUpstreamTimeout after
/// request_timeout, and the push is not sent a second time.
async fn unanswered_push_times_out_with_504_and_is_not_resent() {
    let pki = TestPki::new();
    let (origin, hold) = FakeApns::start_holding(&pki, OriginOptions::default()).await;
    let yaml = relay::pre_proxy_yaml(&pki, &origin, Via::Direct)
        .replace("request_timeout: 5s", "request_timeout: 500ms");
    let relay = relay::start(&yaml).await;
    let client = H2Client::connect(&pki, relay.addr()).await;
    let answer = within(10, "unanswered push", client.push(&token(2), PAYLOAD)).await;
    assert_eq!(answer.status, StatusCode::GATEWAY_TIMEOUT);
    assert_eq!(answer.reason().as_deref(), Some("RelayUpstreamTimeout"));
    assert_eq!(origin.received().len(), 1, "sent once, never again");
    hold.add_permits(1);
}
}

for_each_http2_client! {
/// An identity is used only from the listeners it is bound to: a push whose apns-topic names an
/// identity bound elsewhere (or nowhere) gets 403 RelayIdentityNotAllowed and nothing is sent,
/// not even with a bearer token that would otherwise pass through.
async fn identity_topics_are_refused_outside_their_listeners() {
    let pki = TestPki::new();
    let origin = FakeApns::start_with(
        &pki,
        OriginOptions {
            client_auth: true,
            ..Default::default()
        },
    )
    .await;
    let (cert_a, key_a) = pki.write_client_cert("app-one");
    let (cert_b, key_b) = pki.write_client_cert("app-two");
    let identities = identities_yaml(&[
        ("com.example.one", &cert_a, &key_a, "listeners: [apns]"),
        (
            "com.example.other",
            &cert_b,
            &key_b,
            "listeners: [elsewhere]",
        ),
        ("com.example.unbound", &cert_b, &key_b, ""),
    ]);
    // A second listener named `elsewhere`, so the binding itself is valid.
    let yaml = yaml_with(&pki, &origin, Via::Direct, &identities).replace(
        "listeners:\n",
        "listeners:\n  - {name: elsewhere, mode: post-proxy, bind: \"127.0.0.1:0\", allow_sources: [\"127.0.0.1/32\"]}\n",
    );
    let relay = relay::start(&yaml).await;
    // Listeners in order: `elsewhere`, then `apns`.
    let client = H2Client::connect(&pki, relay.addrs[1]).await;
    let send = |topic: &str| {
        let mut req = push_request("api.push.apple.com", &token(7));
        req.headers_mut()
            .insert("apns-topic", topic.parse().unwrap());
        req.headers_mut()
            .insert("authorization", bearer("TEAM1").parse().unwrap());
        client.send(req, Bytes::from(PAYLOAD))
    };
    for topic in [
        "com.example.other",
        "com.example.other.voip",
        "com.example.unbound",
    ] {
        let answer = within(10, topic, send(topic)).await.unwrap();
        assert_eq!(answer.status, StatusCode::FORBIDDEN, "{topic}");
        assert_eq!(
            answer.reason().as_deref(),
            Some("RelayIdentityNotAllowed"),
            "{topic}"
        );
    }
    assert_eq!(
        origin.connection_count(),
        0,
        "nothing is sent for a refused identity"
    );
    let answer = within(10, "bound", send("com.example.one")).await.unwrap();
    assert_eq!(answer.status, StatusCode::OK);
    let got = origin.received();
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].client_cn.as_deref(), Some("app-one"));
}
}

for_each_http2_client! {
/// On a listener with `tls.client_ca`, an identity with `client_subjects` is used only by
/// clients whose certificate has one of those subject names.
async fn identity_with_client_subjects_needs_that_client_certificate() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let pki = TestPki::new();
    let origin = FakeApns::start_with(
        &pki,
        OriginOptions {
            client_auth: true,
            ..Default::default()
        },
    )
    .await;
    let (cert, key) = pki.write_client_cert("app-one");
    let tls = format!(
        "    tls:\n      ca_cert: \"{0}\"\n      ca_key: \"{1}\"\n      client_ca: \"{0}\"\n",
        pki.ca_cert.display(),
        pki.ca_key.display()
    );
    let identities = identities_yaml(&[(
        "com.example.one",
        &cert,
        &key,
        "listeners: [legacy], client_subjects: [corp-proxy]",
    )]);
    let yaml = relay::post_proxy_yaml(&pki, &origin, "")
        .replace(
            "    allow_sources: [\"127.0.0.1/32\"]\n",
            &format!("{tls}    allow_sources: [\"127.0.0.1/32\"]\n"),
        )
        .replace("upstream:\n", &format!("upstream:\n{identities}"));
    let relay = relay::start(&yaml).await;
    let request = format!(
        "POST /3/device/{} HTTP/1.1\r\nHost: api.push.apple.com\r\napns-topic: com.example.one\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{PAYLOAD}",
        token(8),
        PAYLOAD.len()
    );
    let addr = relay.addr();
    let exchange_as = |name: &'static str| {
        let config = pki.client_config_with_cert(name, &[]);
        let request = request.clone();
        async move {
            let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
            let server = rustls::pki_types::ServerName::try_from("localhost").unwrap();
            let mut tls = tokio_rustls::TlsConnector::from(config)
                .connect(server, tcp)
                .await
                .unwrap();
            tls.write_all(request.as_bytes()).await.unwrap();
            let mut answer = String::new();
            let _ = tls.read_to_string(&mut answer).await;
            answer
        }
    };
    let refused = within(10, "other proxy", exchange_as("other-proxy")).await;
    assert!(refused.starts_with("HTTP/1.1 403"), "{refused}");
    assert!(refused.contains("RelayIdentityNotAllowed"), "{refused}");
    assert_eq!(origin.connection_count(), 0);
    let served = within(10, "corp proxy", exchange_as("corp-proxy")).await;
    assert!(served.starts_with("HTTP/1.1 200"), "{served}");
    assert_eq!(origin.received()[0].client_cn.as_deref(), Some("app-one"));
}
}

for_each_http2_client! {
/// A renewed identity certificate (same files, new contents) is applied by a reload: the next
/// upstream connection presents it, and its expiry is exported.
async fn renewed_identity_certificate_is_presented_on_new_connections() {
    let pki = TestPki::new();
    let origin = FakeApns::start_with(
        &pki,
        OriginOptions {
            client_auth: true,
            // Each connection serves one push: the next needs a new connection.
            goaway_after: Some(1),
            ..Default::default()
        },
    )
    .await;
    let (cert, key) = pki.write_client_cert("app-one");
    let identities = identities_yaml(&[("com.example.one", &cert, &key, "listeners: [apns]")]);
    let yaml = yaml_with(&pki, &origin, Via::Direct, &identities);
    let relay = relay::start(&yaml).await;
    let client = H2Client::connect(&pki, relay.addr()).await;
    let push = |i: usize| {
        let mut req = push_request("api.push.apple.com", &token(i));
        req.headers_mut()
            .insert("apns-topic", "com.example.one".parse().unwrap());
        req.headers_mut().remove("authorization");
        client.send(req, Bytes::from(PAYLOAD))
    };
    assert_eq!(
        within(10, "first", push(1)).await.unwrap().status,
        StatusCode::OK
    );
    let expiry = "certificate_expiry_timestamp_seconds{listener=\"upstream\",kind=\"identity\",name=\"com.example.one\"}";
    let metrics = relay.relay.metrics().render(relay.relay.pool());
    assert!(
        metrics.contains(expiry),
        "exported from the start: {metrics}"
    );
    // Renew: the same paths, a new certificate (a new subject, to tell them apart).
    let renewed = pki.ca.issue_client("app-one-renewed").unwrap();
    std::fs::write(&cert, &renewed.chain_pem).unwrap();
    std::fs::write(&key, &renewed.key_pem).unwrap();
    relay
        .reloader
        .reload(
            pushrelay::config::from_yaml(&relay::for_current_client(&yaml))
                .unwrap()
                .config,
        )
        .unwrap();
    assert_eq!(
        within(10, "second", push(2)).await.unwrap().status,
        StatusCode::OK
    );
    let cns: Vec<_> = origin
        .received()
        .into_iter()
        .map(|r| r.client_cn.unwrap_or_default())
        .collect();
    assert_eq!(cns, ["app-one", "app-one-renewed"]);
    let metrics = relay.relay.metrics().render(relay.relay.pool());
    assert!(metrics.contains(expiry), "{metrics}");
}
}

crate::for_each_http2_client! {
/// A changed identity certificate reloaded while a connection presenting the old one is open and
/// carrying a push: the next push goes on a new connection presenting the new certificate, the
/// push in flight finishes on the old one, and the old one then closes.
async fn a_changed_identity_certificate_drains_the_connections_that_presented_the_old_one() {
    let pki = TestPki::new();
    let script = Script::new();
    let (origin, hold) = FakeApns::start_holding(
        &pki,
        OriginOptions {
            client_auth: true,
            script: Some(script.clone()),
            ..Default::default()
        },
    )
    .await;
    let (cert, key) = pki.write_client_cert("app-one");
    let identities = identities_yaml(&[("com.example.one", &cert, &key, "listeners: [apns]")]);
    let yaml = yaml_with(&pki, &origin, Via::Direct, &identities);
    let relay = relay::start(&yaml).await;
    let client = Arc::new(H2Client::connect(&pki, relay.addr()).await);
    let push = |i: usize| {
        let client = client.clone();
        tokio::spawn(async move {
            let mut req = push_request("api.push.apple.com", &token(i));
            req.headers_mut()
                .insert("apns-topic", "com.example.one".parse().unwrap());
            req.headers_mut().remove("authorization");
            client.send(req, Bytes::from(PAYLOAD)).await.unwrap().status
        })
    };
    hold.add_permits(1);
    assert_eq!(within(10, "first", push(1)).await.unwrap(), StatusCode::OK);
    // A second push in flight on the same connection, its answer held.
    let in_flight = push(2);
    within(10, "second at the origin", origin.wait_received(2)).await;

    // The same paths, a changed certificate (a new subject, to tell them apart).
    let renewed = pki.ca.issue_client("app-one-renewed").unwrap();
    std::fs::write(&cert, &renewed.chain_pem).unwrap();
    std::fs::write(&key, &renewed.key_pem).unwrap();
    relay
        .reloader
        .reload(pushrelay::config::from_yaml(&yaml).unwrap().config)
        .unwrap();
    let next = push(3);
    within(10, "third at the origin", origin.wait_received(3)).await;
    let received = origin.received();
    let (old, new) = (&received[1], &received[2]);
    assert_eq!(old.client_cn.as_deref(), Some("app-one"));
    assert_eq!(
        (new.client_cn.as_deref(), new.conn != old.conn),
        (Some("app-one-renewed"), true),
        "the push after the reload went on a new connection with the new certificate"
    );
    assert_eq!(
        script.closed.available_permits(),
        0,
        "the old connection stays open while it carries a push"
    );
    hold.add_permits(2);
    assert_eq!(
        within(10, "in flight", in_flight).await.unwrap(),
        StatusCode::OK
    );
    assert_eq!(within(10, "third", next).await.unwrap(), StatusCode::OK);
    // Done with its last push, the old connection closes (the new one stays).
    let closed = within(10, "old connection closed", script.closed.acquire()).await;
    closed.unwrap().forget();
    assert_eq!(origin.connection_count(), 2);
    hold.add_permits(1);
    assert_eq!(within(10, "fourth", push(4)).await.unwrap(), StatusCode::OK);
    assert_eq!(
        origin.received()[3].conn,
        new.conn,
        "the new connection is kept"
    );
    assert_eq!(script.closed.available_permits(), 0);
}
}

/// Waits (bounded) until the relay's pool holds `n` requests waiting towards any destination.
async fn wait_queued(relay: &support::relay::RunningRelay, n: usize) {
    within(10, &format!("{n} requests queued"), async {
        loop {
            let queued: usize = relay
                .relay
                .pool()
                .stats()
                .iter()
                .map(|(_, s)| s.queued)
                .sum();
            if queued == n {
                return;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await;
}

crate::for_each_http2_client! {
/// Requests queued behind a saturated destination (one connection, one stream) whose client
/// resets them while they wait are never sent: the origin sees only the ones left.
async fn requests_reset_while_queued_are_never_sent() {
    let pki = TestPki::new();
    let (origin, hold) = FakeApns::start_holding(
        &pki,
        OriginOptions {
            max_concurrent_streams: Some(1),
            ..Default::default()
        },
    )
    .await;
    let yaml = yaml_with(
        &pki,
        &origin,
        Via::Direct,
        "  max_connections_per_destination: 1\n",
    );
    let relay = relay::start(&yaml).await;
    let client = H2Client::connect(&pki, relay.addr()).await;
    let open = |i: usize| {
        let client = &client;
        async move {
            let mut req = push_request("api.push.apple.com", &token(i));
            req.headers_mut()
                .insert("apns-id", apns_id(i).parse().unwrap());
            let (response, mut stream) = client.open(req).await.unwrap();
            stream.send_data(Bytes::from(PAYLOAD), true).unwrap();
            (response, stream)
        }
    };
    // The one stream, taken and held at the origin.
    let first = open(0).await;
    within(10, "first at the origin", origin.wait_received(1)).await;
    let mut queued = Vec::new();
    for i in 1..=10 {
        queued.push((i, open(i).await));
    }
    wait_queued(&relay, 10).await;
    let mut kept = Vec::new();
    for (i, (response, mut stream)) in queued {
        if i % 2 == 1 {
            stream.send_reset(h2::Reason::CANCEL);
        } else {
            kept.push((i, response, stream));
        }
    }
    wait_queued(&relay, 5).await;
    hold.add_permits(100);
    let answer = within(10, "first", support::client::read_answer(first.0)).await;
    assert_eq!(answer.unwrap().status, StatusCode::OK);
    for (i, response, _stream) in kept {
        let answer = within(10, "kept", support::client::read_answer(response)).await;
        assert_eq!(answer.unwrap().status, StatusCode::OK, "push {i}");
    }
    let mut seen: Vec<String> = origin
        .received()
        .iter()
        .map(|r| r.headers["apns-id"].to_str().unwrap().to_owned())
        .collect();
    seen.sort();
    let expected: Vec<String> = [0, 2, 4, 6, 8, 10].into_iter().map(apns_id).collect();
    assert_eq!(seen, expected, "the reset requests never reach the origin");
}
}

crate::for_each_http2_client! {
/// HTTP/1.1 clients (post-proxy door) whose requests are queued behind a saturated destination
/// (one connection, one stream) and that close their connections while they wait are never sent:
/// the origin sees only the requests whose clients stayed. Bodies with a length and chunked ones.
async fn http1_requests_whose_client_closes_while_queued_are_never_sent() {
    use support::http1::RawConn;
    let pki = TestPki::new();
    let (origin, hold) = FakeApns::start_holding(
        &pki,
        OriginOptions {
            max_concurrent_streams: Some(1),
            ..Default::default()
        },
    )
    .await;
    let yaml = relay::post_proxy_yaml(&pki, &origin, "").replace(
        "upstream:\n",
        "upstream:\n  max_connections_per_destination: 1\n",
    );
    // Queued requests must not time out while the test looks at the queue.
    let yaml = yaml.replace("request_timeout: 5s", "request_timeout: 30s");
    assert!(yaml.contains("max_connections_per_destination: 1") && yaml.contains("30s"));
    let relay = relay::start(&yaml).await;
    let request = |i: usize| {
        let head = format!(
            "POST /3/device/{} HTTP/1.1\r\nhost: api.push.apple.com:{}\r\napns-id: {}\r\n\
             apns-topic: com.example.app\r\n",
            token(i),
            origin.port(),
            apns_id(i)
        );
        // Every other request has a chunked body (read through the feeding channel).
        if i % 4 >= 2 {
            format!(
                "{head}transfer-encoding: chunked\r\n\r\n{:x}\r\n{PAYLOAD}\r\n0\r\n\r\n",
                PAYLOAD.len()
            )
        } else {
            format!("{head}content-length: {}\r\n\r\n{PAYLOAD}", PAYLOAD.len())
        }
    };
    let mut first = RawConn::connect(relay.addr()).await;
    first.send(request(0).as_bytes()).await;
    within(10, "first at the origin", origin.wait_received(1)).await;
    let mut queued = Vec::new();
    for i in 1..=12 {
        let mut conn = RawConn::connect(relay.addr()).await;
        conn.send(request(i).as_bytes()).await;
        queued.push((i, conn));
        wait_queued(&relay, i).await;
    }
    let mut kept = Vec::new();
    for (i, conn) in queued {
        if i % 2 == 1 {
            drop(conn);
        } else {
            kept.push((i, conn));
        }
    }
    wait_queued(&relay, 6).await;
    hold.add_permits(100);
    let answer = within(10, "first", first.read_answer()).await.unwrap();
    assert_eq!(answer.status, 200);
    for (i, mut conn) in kept {
        let answer = within(10, "kept", conn.read_answer()).await.unwrap();
        assert_eq!(answer.status, 200, "push {i}: {:?}", answer.reason());
        assert_eq!(answer.header("apns-id"), Some(apns_id(i).as_str()));
    }
    let mut seen: Vec<String> = origin
        .received()
        .iter()
        .map(|r| r.headers["apns-id"].to_str().unwrap().to_owned())
        .collect();
    seen.sort();
    let expected: Vec<String> = (0..=12).step_by(2).map(apns_id).collect();
    assert_eq!(
        seen, expected,
        "requests of clients that left reach the origin"
    );
}
}

crate::for_each_http2_client! {
/// Requests waiting for a destination that is down (riding out the outage, a connect pending)
/// whose client resets them are never sent once it is back.
async fn requests_reset_while_waiting_for_a_connect_are_never_sent() {
    let pki = TestPki::new();
    // The origin's port, closed until the origin starts on it.
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let yaml = relay::pre_proxy_yaml_on(&pki, port, Via::Direct)
        .replace("request_timeout: 5s", "request_timeout: 8s");
    let relay = relay::start(&yaml).await;
    let client = H2Client::connect(&pki, relay.addr()).await;
    let mut waiting = Vec::new();
    for i in 1..=6 {
        let mut req = push_request("api.push.apple.com", &token(i));
        req.headers_mut()
            .insert("apns-id", apns_id(i).parse().unwrap());
        let (response, mut stream) = client.open(req).await.unwrap();
        stream.send_data(Bytes::from(PAYLOAD), true).unwrap();
        waiting.push((i, response, stream));
    }
    wait_queued(&relay, 6).await;
    let mut kept = Vec::new();
    for (i, response, mut stream) in waiting {
        if i % 2 == 1 {
            stream.send_reset(h2::Reason::CANCEL);
        } else {
            kept.push((i, response, stream));
        }
    }
    wait_queued(&relay, 3).await;
    let origin = FakeApns::start_with(
        &pki,
        OriginOptions {
            port,
            ..Default::default()
        },
    )
    .await;
    for (i, response, _stream) in kept {
        let answer = within(10, "kept", support::client::read_answer(response)).await;
        assert_eq!(answer.unwrap().status, StatusCode::OK, "push {i}");
    }
    let mut seen: Vec<String> = origin
        .received()
        .iter()
        .map(|r| r.headers["apns-id"].to_str().unwrap().to_owned())
        .collect();
    seen.sort();
    let expected: Vec<String> = [2, 4, 6].into_iter().map(apns_id).collect();
    assert_eq!(seen, expected, "the reset requests never reach the origin");
}
}

for_each_http2_client! {
/// A proxy that never answers CONNECT, no ride-out: the request that waited for the attempt and
/// the one failed fast after it get the same status and reason (504 RelayProxyTimeout).
async fn waiting_and_fast_failed_requests_get_the_same_status_for_the_same_cause() {
    let pki = TestPki::new();
    let origin = FakeApns::start(&pki).await;
    let proxy = TestProxy::start(Behaviour::Silent).await;
    let yaml = relay::pre_proxy_yaml(&pki, &origin, Via::Proxy(proxy.url())).replace(
        "connect_timeout: 2s",
        "connect_timeout: 1s\n  reconnect_wait: 0s",
    );
    let relay = relay::start(&yaml).await;
    let client = H2Client::connect(&pki, relay.addr()).await;
    let waited = within(10, "waited", client.push(&token(1), PAYLOAD)).await;
    let fast = within(10, "fast-failed", client.push(&token(2), PAYLOAD)).await;
    assert_eq!(
        (waited.status, waited.reason().as_deref()),
        (StatusCode::GATEWAY_TIMEOUT, Some("RelayProxyTimeout"))
    );
    assert_eq!(
        (fast.status, fast.reason()),
        (waited.status, waited.reason())
    );
    assert_eq!(origin.received().len(), 0);
}
}

fn token_key(dest: &pushrelay::policy::Authority, iss: &str) -> pushrelay::upstream::pool::PoolKey {
    pushrelay::upstream::pool::PoolKey {
        dest: dest.clone(),
        identity: Some(format!("jwt:{iss}/K1").into()),
    }
}

for_each_http2_client! { paused:
/// Made-up JWT issuers do not escape the back-off: after one issuer's connect failed, another
/// issuer's request towards the same destination fails fast instead of trying again.
async fn token_identities_share_their_destinations_backoff() {
    use pushrelay::upstream::pool::PoolError;
    let closed_port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let (pool, key) = backoff_pool(closed_port, 1);
    let far = tokio::time::Instant::now() + Duration::from_secs(3600);
    let first = pool
        .checkout(&token_key(&key.dest, "TEAM1"), far)
        .await
        .err();
    assert!(
        matches!(first, Some(PoolError::Connect { .. })),
        "{first:?}"
    );
    for iss in ["TEAM2", "TEAM3", "MADEUP"] {
        let other = pool.checkout(&token_key(&key.dest, iss), far).await.err();
        assert!(
            matches!(other, Some(PoolError::BackingOff { .. })),
            "{iss}: {other:?}"
        );
    }
}
}

for_each_http2_client! { paused:
/// New token identities towards a destination are admitted at
/// `upstream.new_token_identities_per_minute` (here 3, the burst too): the fourth new issuer in a
/// minute is refused before anything is opened for it; a known one is not; 20 s later one more
/// is admitted.
async fn new_token_identities_are_rate_limited_per_destination() {
    use pushrelay::upstream::pool::PoolError;
    let closed_port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let (pool, key) = backoff_pool_with(closed_port, 2, |s| s.new_identities_per_minute = 3);
    let far = || tokio::time::Instant::now() + Duration::from_secs(3600);
    let admitted = |e: &Option<PoolError>| {
        !matches!(
            e,
            Some(PoolError::IdentityRate { .. } | PoolError::TooManyIdentities { .. })
        )
    };
    for (worker, iss) in [(0, "T1"), (1, "T2"), (0, "T3")] {
        pushrelay::upstream::pool::set_worker(worker);
        let e = pool.checkout(&token_key(&key.dest, iss), far()).await.err();
        assert!(admitted(&e), "{iss}: {e:?}");
    }
    pushrelay::upstream::pool::set_worker(1);
    let refused = pool
        .checkout(&token_key(&key.dest, "T4"), far())
        .await
        .err();
    assert!(
        matches!(refused, Some(PoolError::IdentityRate { per_minute: 3, .. })),
        "{refused:?}"
    );
    let known = pool
        .checkout(&token_key(&key.dest, "T1"), far())
        .await
        .err();
    assert!(admitted(&known), "{known:?}");
    tokio::time::advance(Duration::from_secs(20)).await;
    let later = pool
        .checkout(&token_key(&key.dest, "T4"), far())
        .await
        .err();
    assert!(admitted(&later), "{later:?}");
    let again = pool
        .checkout(&token_key(&key.dest, "T5"), far())
        .await
        .err();
    assert!(
        matches!(again, Some(PoolError::IdentityRate { .. })),
        "{again:?}"
    );
    pushrelay::upstream::pool::set_worker(0);
}
}

use pushrelay::upstream::pool::PoolError;

/// Polls `f` once: it must still be pending (waiting for a connect that never ends, say).
async fn poll_once_pending<T, F: std::future::Future<Output = Result<T, PoolError>>>(
    f: std::pin::Pin<&mut F>,
) {
    tokio::select! {
        biased;
        r = f => panic!("expected it to wait, got {:?}", r.err()),
        _ = std::future::ready(()) => {}
    }
}

for_each_http2_client! { paused:
/// `max_token_identities` (2 here) holds per destination over 4 worker shards, not per shard:
/// with two busy identities on workers 0 and 1, a third on worker 2 is refused.
async fn max_token_identities_is_per_destination_whatever_the_workers() {
    use pushrelay::upstream::pool::{PoolError, set_worker};
    // Accepts TCP and never answers TLS: the identities' checkouts stay busy.
    let hole = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let (pool, key) = backoff_pool_with(hole.local_addr().unwrap().port(), 4, |s| {
        s.max_identities = 2
    });
    let far = tokio::time::Instant::now() + Duration::from_secs(3600);
    let (a, b) = (token_key(&key.dest, "A"), token_key(&key.dest, "B"));
    set_worker(0);
    let mut first = std::pin::pin!(pool.checkout(&a, far));
    poll_once_pending(first.as_mut()).await;
    set_worker(1);
    let mut second = std::pin::pin!(pool.checkout(&b, far));
    poll_once_pending(second.as_mut()).await;
    set_worker(2);
    let third = pool.checkout(&token_key(&key.dest, "C"), far).await.err();
    assert!(
        matches!(third, Some(PoolError::TooManyIdentities { max: 2, .. })),
        "{third:?}"
    );
    set_worker(0);
    drop(hole);
}
}

for_each_http2_client! { paused:
/// `max_queued_requests` (2 here) holds per destination over 2 worker shards: two requests wait
/// on worker 0, so worker 1's second request finds the queue full (its first, which started
/// that worker's connect, may always wait for it).
async fn max_queued_requests_is_per_destination_whatever_the_workers() {
    use pushrelay::upstream::pool::{PoolError, set_worker};
    let hole = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let (pool, key) = backoff_pool_with(hole.local_addr().unwrap().port(), 2, |s| {
        s.max_queued = 2;
        s.max_connections = 2;
    });
    let far = tokio::time::Instant::now() + Duration::from_secs(3600);
    set_worker(0);
    let mut w0a = std::pin::pin!(pool.checkout(&key, far));
    poll_once_pending(w0a.as_mut()).await;
    let mut w0b = std::pin::pin!(pool.checkout(&key, far));
    poll_once_pending(w0b.as_mut()).await;
    set_worker(1);
    let mut w1a = std::pin::pin!(pool.checkout(&key, far));
    poll_once_pending(w1a.as_mut()).await;
    let full = pool.checkout(&key, far).await.err();
    assert!(
        matches!(full, Some(PoolError::QueueFull { .. })),
        "{full:?}"
    );
    set_worker(0);
    drop(hole);
}
}

for_each_http2_client! {
/// `max_connections_per_destination` (3 here) holds over 2 worker shards: with every stream
/// busy (the origin allows one per connection), worker 0 opens two, worker 1 one, and worker 1's
/// next request waits instead of opening a fourth.
async fn max_connections_is_per_destination_whatever_the_workers() {
    use pushrelay::upstream::connect::Connector;
    use pushrelay::upstream::pool::{PoolKey, PoolSettings, set_worker};
    let pki = TestPki::new();
    let options = OriginOptions {
        max_concurrent_streams: Some(1),
        ..Default::default()
    };
    let (origin, _hold) = FakeApns::start_holding(&pki, options).await;
    let dest: pushrelay::policy::Authority = format!("api.push.apple.com:{}", origin.port())
        .parse()
        .unwrap();
    let mut upstream = pushrelay::config::UpstreamConfig::default();
    upstream
        .connect_to
        .insert(dest.clone(), origin.addr.to_string());
    upstream.max_connections_per_destination = 3;
    let tls = pushrelay::tls::client::build(std::slice::from_ref(&pki.ca_cert), None).unwrap();
    let pool = support::relay::pool_for_current_client(
        Connector::new(&upstream),
        HashMap::from([(None, tls)]),
        PoolSettings {
            shards: 2,
            ..PoolSettings::from_config(&upstream)
        },
        Arc::new(pushrelay::metrics::Metrics::new()),
    );
    let key = PoolKey {
        dest,
        identity: None,
    };
    let far = || tokio::time::Instant::now() + Duration::from_secs(30);
    let mut leases = Vec::new();
    for worker in [0, 0, 1] {
        set_worker(worker);
        leases.push(
            within(10, "a lease", pool.checkout(&key, far()))
                .await
                .unwrap(),
        );
    }
    assert_eq!(origin.connection_count(), 3);
    set_worker(1);
    let mut fourth = std::pin::pin!(pool.checkout(&key, far()));
    tokio::select! {
        r = &mut fourth => panic!("a fourth stream cannot be had: {:?}", r.map(|l| l.conn_id()).err()),
        _ = tokio::time::sleep(Duration::from_millis(300)) => {}
    }
    assert_eq!(origin.connection_count(), 3, "no fourth connection");
    // A freed stream on worker 1's connection goes to the waiting request.
    leases.pop();
    within(10, "the freed stream", fourth).await.unwrap();
    set_worker(0);
}
}

for_each_http2_client! {
/// Three client connections keep 15 pushes each in flight towards a slow tenant (answered after
/// 400 ms), more than the destination's streams and queue hold (10 + 10); a normal client on the
/// same destination and JWT issuer still gets every push through: while requests wait, each
/// client connection has a fair share, freed slots go first to clients under theirs, and one
/// under its share may wait in a full queue.
async fn clients_filling_the_pool_leave_a_normal_client_its_share() {
    let pki = TestPki::new();
    let (origin, yaml) = slow_origin_for_two_sources(&pki).await;
    let relay = relay::start(&yaml).await;
    let mut flood = Flood::default();
    for a in 0..3 {
        let client = Arc::new(H2Client::connect(&pki, relay.addr()).await);
        for t in 0..15 {
            flood.keep_one_in_flight(&client, a * 10_000 + t * 100);
        }
    }
    flood.wait_refused(&origin, "the attackers fill the pool").await;
    let normal = Arc::new(H2Client::connect(&pki, relay.addr()).await);
    // Four in flight at a time, 20 in all.
    let statuses = pushes_in_lanes(&normal, 4, 5, "the normal client's pushes").await;
    flood.stop().await;
    assert!(
        statuses.iter().all(|(s, _)| *s == StatusCode::OK),
        "normal client: {statuses:?}"
    );
}
}

/// An origin with 10 streams per connection and a slow tenant (`com.example.slow`, answered
/// after 400 ms), and a relay config for it with one upstream connection, 10 queue places and
/// clients from 127.0.0.1 and 127.0.0.2.
async fn slow_origin_for_two_sources(pki: &TestPki) -> (FakeApns, String) {
    let origin = FakeApns::start_with(
        pki,
        OriginOptions {
            max_concurrent_streams: Some(10),
            slow_topic: Some(("com.example.slow".into(), Duration::from_millis(400))),
            ..Default::default()
        },
    )
    .await;
    let upstream = "  max_connections_per_destination: 1\n  max_queued_requests: 10\n";
    let yaml = yaml_with(pki, &origin, Via::Direct, upstream)
        .replace("request_timeout: 5s", "request_timeout: 8s")
        .replace(
            "allow_sources: [\"127.0.0.1/32\"]",
            "allow_sources: [\"127.0.0.1/32\", \"127.0.0.2/32\"]",
        );
    assert!(yaml.contains("127.0.0.2/32"));
    (origin, yaml)
}

/// Pushes towards the slow tenant, each client task keeping one in flight until stopped (at
/// most 30 s), counting the 503 answers: refused at once, a task tries again a little later, as
/// a client would.
#[derive(Default)]
struct Flood {
    stop: Arc<std::sync::atomic::AtomicBool>,
    overloaded: Arc<std::sync::atomic::AtomicUsize>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Flood {
    /// One more push in flight on `client`, device tokens from `first_token` on.
    fn keep_one_in_flight(&mut self, client: &Arc<H2Client>, first_token: usize) {
        let (client, stop, overloaded) =
            (client.clone(), self.stop.clone(), self.overloaded.clone());
        self.tasks.push(tokio::spawn(async move {
            let mut n = 0;
            let until = tokio::time::Instant::now() + Duration::from_secs(30);
            while !stop.load(Ordering::SeqCst) && tokio::time::Instant::now() < until {
                let mut req = push_request("api.push.apple.com", &token(first_token + n));
                req.headers_mut()
                    .insert("apns-topic", "com.example.slow".parse().unwrap());
                let answer = client.send(req, Bytes::from(PAYLOAD)).await.unwrap();
                if answer.status == StatusCode::SERVICE_UNAVAILABLE {
                    overloaded.fetch_add(1, Ordering::SeqCst);
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                n += 1;
            }
        }));
    }

    /// Until the pool is full (every stream busy at the origin) and the flood is being refused:
    /// ten 503s counted from then on.
    async fn wait_refused(&self, origin: &FakeApns, what: &str) {
        origin.wait_received(10).await;
        self.overloaded.store(0, Ordering::SeqCst);
        within(10, what, async {
            while self.overloaded.load(Ordering::SeqCst) < 10 {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
        .await;
    }

    async fn stop(self) {
        self.stop.store(true, Ordering::SeqCst);
        for t in self.tasks {
            within(15, "the flood's end", t).await.unwrap();
        }
    }
}

/// `lanes` pushes in flight at a time on `client`, `per_lane` one after another in each: the
/// status and reason of each.
async fn pushes_in_lanes(
    client: &Arc<H2Client>,
    lanes: usize,
    per_lane: usize,
    what: &str,
) -> Vec<(StatusCode, Option<String>)> {
    let pushes = (0..lanes).map(|lane| async move {
        let mut statuses = Vec::new();
        for i in 0..per_lane {
            let answer = client.push(&token(900_000 + lane * 10 + i), PAYLOAD).await;
            statuses.push((answer.status, answer.reason()));
        }
        statuses
    });
    within(20, what, join_all(pushes))
        .await
        .into_iter()
        .flatten()
        .collect()
}

crate::for_each_http2_client! {
/// Fairness is between sources (client addresses) first: one source with ten connections, each
/// keeping four pushes in flight towards a slow tenant (answered after 400 ms), fills the
/// destination's streams and queue (10 + 10); a client from a second address (127.0.0.2) with
/// one connection and five pushes in flight at a time still gets every push through. Counted
/// per connection, that client would get one eleventh of the pool (one push at a time) and be
/// refused 503 for the rest.
async fn a_source_with_many_connections_leaves_another_source_its_share() {
    use support::client::Connect;
    let pki = TestPki::new();
    let (origin, yaml) = slow_origin_for_two_sources(&pki).await;
    let relay = relay::start(&yaml).await;
    let mut flood = Flood::default();
    for a in 0..10 {
        let client = Arc::new(H2Client::connect(&pki, relay.addr()).await);
        for t in 0..4 {
            flood.keep_one_in_flight(&client, a * 10_000 + t * 100);
        }
    }
    flood.wait_refused(&origin, "the flood fills the pool").await;
    let other = Connect {
        from: Some([127, 0, 0, 2].into()),
        ..Connect::new(relay.addr())
    };
    let other = Arc::new(H2Client::connect_with(&pki, other).await.unwrap());
    // Five in flight at a time, 20 in all.
    let statuses = pushes_in_lanes(&other, 5, 4, "the other source's pushes").await;
    flood.stop().await;
    assert!(
        statuses.iter().all(|(s, _)| *s == StatusCode::OK),
        "the other source: {statuses:?}"
    );
}
}

crate::for_each_http2_client! {
/// The queue is shared by the worker shards fairly too: one client on one worker keeps 30 slow
/// pushes in flight, filling its shard's streams and the whole shared queue (10); a client from
/// another address, served by the other worker, with 15 pushes in flight at a time (its shard's
/// 10 streams and 5 queue places) still gets every push through: a waiting request of the shard
/// holding more than its part of the queue gives up its place.
async fn the_shared_queue_is_shared_fairly_between_worker_shards() {
    use support::client::Connect;
    let pki = TestPki::new();
    let (origin, yaml) = slow_origin_for_two_sources(&pki).await;
    let relay = relay::start_on_workers(&yaml, 2).await;
    // One connection: one worker.
    let flooder = Arc::new(H2Client::connect(&pki, relay.addr()).await);
    let mut flood = Flood::default();
    for t in 0..30 {
        flood.keep_one_in_flight(&flooder, t * 100);
    }
    flood
        .wait_refused(&origin, "the flood fills its streams and the queue")
        .await;
    // The least busy worker takes the second connection.
    let other = Connect {
        from: Some([127, 0, 0, 2].into()),
        ..Connect::new(relay.addr())
    };
    let other = Arc::new(H2Client::connect_with(&pki, other).await.unwrap());
    // Its worker's upstream connection, opened by one push first.
    assert_eq!(
        other.push(&token(800_000), PAYLOAD).await.status,
        StatusCode::OK
    );
    let statuses = pushes_in_lanes(&other, 15, 2, "the other worker's pushes").await;
    flood.stop().await;
    assert!(
        statuses.iter().all(|(s, _)| *s == StatusCode::OK),
        "the other worker's client: {statuses:?}"
    );
    relay.stop().await;
}
}

/// An `upstream.identities` section: one item per (topic, certificate, key, further keys).
fn identities_yaml(items: &[(&str, &std::path::Path, &std::path::Path, &str)]) -> String {
    let mut yaml = String::from("  identities:\n");
    for (topic, cert, key, more) in items {
        let more = if more.is_empty() {
            String::new()
        } else {
            format!(", {more}")
        };
        yaml += &format!(
            "    - {{topic: {topic}, cert: \"{}\", key: \"{}\"{more}}}\n",
            cert.display(),
            key.display()
        );
    }
    yaml
}
