//! Outages, as push clients meet them: a connect belongs to the destination (clients giving up
//! neither cancel it nor start more), and a restart of the origin or the proxy of a few seconds
//! costs no push except those in flight at the cut.

mod support;

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http::StatusCode;
use support::client::{H2Client, push_request};
use support::origin::{FakeApns, OriginOptions};
use support::pki::TestPki;
use support::proxy::{Behaviour, TestProxy};
use support::relay::{self, Via};
use support::{token, within};
use tokio::net::TcpListener;

const PAYLOAD: &str = r#"{"aps":{"alert":"outage"}}"#;

for_each_http2_client! {
/// An origin that accepts TCP and never answers TLS (connect_timeout 1 s), and a client that gives
/// up on each push after 200 ms and sends the next: the origin sees one connect attempt per
/// back-off step (not one per push), and each failure is logged naming the hop.
async fn frozen_origin_sees_one_connect_per_backoff_step_while_clients_give_up() {
    let logs = support::logs::capture_global();
    let pki = TestPki::new();
    let frozen = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = frozen.local_addr().unwrap().port();
    let attempts = Arc::new(AtomicUsize::new(0));
    let counted = attempts.clone();
    let held = tokio::spawn(async move {
        let mut open = Vec::new();
        while let Ok((s, _)) = frozen.accept().await {
            counted.fetch_add(1, Ordering::SeqCst);
            open.push(s);
        }
    });
    let yaml = relay::pre_proxy_yaml_on(&pki, port, Via::Direct)
        .replace("connect_timeout: 2s", "connect_timeout: 1s");
    let relay = relay::start(&yaml).await;
    let client = H2Client::connect(&pki, relay.addr()).await;

    let started = std::time::Instant::now();
    let mut pushes = 0;
    let mut pace = tokio::time::interval(Duration::from_millis(250));
    while started.elapsed() < Duration::from_millis(3900) {
        pace.tick().await;
        let gave_up = tokio::time::timeout(
            Duration::from_millis(200),
            client.push(&token(pushes), PAYLOAD),
        )
        .await;
        assert!(gave_up.is_err(), "push {pushes} cannot be answered yet");
        pushes += 1;
    }
    // In 3.9 s: attempt 1 fails at 1 s, attempt 2 starts 0.5–1 s later and fails 1 s after, and
    // attempt 3 starts by 4 s at the earliest 3 s.
    let seen = attempts.load(Ordering::SeqCst);
    assert!(pushes >= 15, "{pushes}");
    assert!(
        (2..=3).contains(&seen),
        "{seen} connect attempts for {pushes} pushes given up"
    );
    let ours = || {
        logs.text()
            .lines()
            .filter(|l| l.contains("upstream connect failed"))
            .filter(|l| l.contains(&format!("api.push.apple.com:{port}")))
            .map(str::to_owned)
            .collect::<Vec<_>>()
    };
    within(5, "every attempt's failure logged", async {
        while ours().len() < seen - 1 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    for line in ours() {
        assert!(line.contains("upstream.hop=\"tls\""), "{line}");
        assert!(line.contains("retry_in_ms="), "{line}");
    }
    held.abort();
}
}

fn apns_id(sender: usize, n: usize) -> String {
    format!("00000000-0000-4000-8000-{sender:04}{n:08}")
}

/// What each push got: its apns-id, status and reason.
type Outcome = (String, StatusCode, Option<String>);

/// `senders` loops, each with one push in flight at a time (every 20 ms at most), until `stop`.
fn load(
    client: &Arc<H2Client>,
    senders: usize,
    stop: &Arc<AtomicBool>,
) -> Vec<tokio::task::JoinHandle<Vec<Outcome>>> {
    (0..senders)
        .map(|s| {
            let (client, stop) = (client.clone(), stop.clone());
            tokio::spawn(async move {
                let mut outcomes = Vec::new();
                let mut pace = tokio::time::interval(Duration::from_millis(20));
                let mut n = 0;
                while !stop.load(Ordering::SeqCst) {
                    pace.tick().await;
                    let id = apns_id(s, n);
                    let mut req = push_request("api.push.apple.com", &token(s * 100_000 + n));
                    req.headers_mut().insert("apns-id", id.parse().unwrap());
                    let answer = client.send(req, Bytes::from(PAYLOAD)).await.unwrap();
                    outcomes.push((id, answer.status, answer.reason()));
                    n += 1;
                }
                outcomes
            })
        })
        .collect()
}

/// Every push was delivered (answered 200 and seen by an origin, by apns-id) except at most one
/// per sender, in flight at the cut, answered 502 RelayUpstreamReset.
fn assert_only_in_flight_lost(outcomes: &[Outcome], delivered: &HashSet<String>, senders: usize) {
    let mut reset = 0;
    for (id, status, reason) in outcomes {
        if *status == StatusCode::OK {
            assert!(delivered.contains(id), "{id} answered 200, never delivered");
        } else {
            assert_eq!(
                (*status, reason.as_deref()),
                (StatusCode::BAD_GATEWAY, Some("RelayUpstreamReset")),
                "{id}: only pushes in flight at the cut may fail"
            );
            reset += 1;
        }
    }
    assert!(
        reset <= senders,
        "{reset} pushes lost for {senders} in flight"
    );
}

fn delivered(origins: &[&FakeApns]) -> HashSet<String> {
    origins
        .iter()
        .flat_map(|o| o.received())
        .filter_map(|r| Some(r.headers.get("apns-id")?.to_str().ok()?.to_owned()))
        .collect()
}

const SENDERS: usize = 16;

for_each_http2_client! {
/// The origin dies under load and comes back on the same port 2 s later: requests wait for it
/// (upstream.reconnect_wait, 5 s by default) instead of failing fast.
async fn origin_restart_under_load_loses_only_pushes_in_flight_at_the_cut() {
    let pki = TestPki::new();
    let origin = FakeApns::start(&pki).await;
    let port = origin.port();
    let yaml = relay::pre_proxy_yaml(&pki, &origin, Via::Direct)
        .replace("request_timeout: 5s", "request_timeout: 8s");
    let relay = relay::start(&yaml).await;
    let client = Arc::new(H2Client::connect(&pki, relay.addr()).await);
    let stop = Arc::new(AtomicBool::new(false));
    let senders = load(&client, SENDERS, &stop);
    origin.wait_received(100).await;
    origin.kill();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let back = FakeApns::start_with(
        &pki,
        OriginOptions {
            port,
            ..Default::default()
        },
    )
    .await;
    back.wait_received(100).await;
    stop.store(true, Ordering::SeqCst);
    let mut outcomes = Vec::new();
    for s in senders {
        outcomes.extend(within(15, "senders", s).await.unwrap());
    }
    assert_only_in_flight_lost(&outcomes, &delivered(&[&origin, &back]), SENDERS);
    relay.stop().await;
}
}

for_each_http2_client! {
/// The same for the corporate proxy: it dies (every tunnel cut) and is back on its port 2 s later.
async fn proxy_restart_under_load_loses_only_pushes_in_flight_at_the_cut() {
    let pki = TestPki::new();
    let origin = FakeApns::start(&pki).await;
    let proxy = TestProxy::start(Behaviour::Open).await;
    let proxy_port = proxy.addr.port();
    let yaml = relay::pre_proxy_yaml(&pki, &origin, Via::Proxy(proxy.url()))
        .replace("request_timeout: 5s", "request_timeout: 8s");
    let relay = relay::start(&yaml).await;
    let client = Arc::new(H2Client::connect(&pki, relay.addr()).await);
    let stop = Arc::new(AtomicBool::new(false));
    let senders = load(&client, SENDERS, &stop);
    origin.wait_received(100).await;
    proxy.kill();
    let before = origin.received().len();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let back = TestProxy::start_on(Behaviour::Open, proxy_port).await;
    origin.wait_received(before + 100).await;
    stop.store(true, Ordering::SeqCst);
    let mut outcomes = Vec::new();
    for s in senders {
        outcomes.extend(within(15, "senders", s).await.unwrap());
    }
    assert!(back.tunnel_count() >= 1);
    assert_only_in_flight_lost(&outcomes, &delivered(&[&origin]), SENDERS);
    relay.stop().await;
}
}
