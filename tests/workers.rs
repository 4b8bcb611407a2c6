//! `pushrelay serve` runs connections on worker threads, each with its own share of the upstream
//! pool: a client connection and the upstream connection its pushes use stay on one thread.

mod support;

use std::sync::Arc;

use futures_util::future::join_all;
use http::StatusCode;
use support::client::{H2Client, bearer, push_request};
use support::origin::{FakeApns, OriginOptions};
use support::pki::TestPki;
use support::relay::{self, Via};
use support::{token, within};

const PAYLOAD: &str = r#"{"aps":{"alert":"hi"}}"#;

/// Client connections are shared out evenly between two workers; pushes from all of them arrive
/// once each, each worker has exactly one upstream connection of its own, and shutdown drains
/// and returns.
#[tokio::test]
async fn clients_are_shared_out_and_each_worker_has_its_own_upstream_connection() {
    let pki = TestPki::new();
    let origin = FakeApns::start(&pki).await;
    let relay =
        relay::start_on_workers(&relay::pre_proxy_yaml(&pki, &origin, Via::Direct), 2).await;
    let mut clients = Vec::new();
    for _ in 0..8 {
        clients.push(Arc::new(H2Client::connect(&pki, relay.addr()).await));
    }
    let pushes = (0..200).map(|i| {
        let client = clients[i % clients.len()].clone();
        async move { client.push(&token(i), PAYLOAD).await }
    });
    let answers = within(20, "200 pushes", join_all(pushes)).await;
    assert!(answers.iter().all(|a| a.status == StatusCode::OK));
    let mut tokens: Vec<String> = origin.received().iter().map(|r| r.path.clone()).collect();
    tokens.sort();
    tokens.dedup();
    assert_eq!(tokens.len(), 200, "every push arrives exactly once");
    assert_eq!(origin.received().len(), 200);
    // Four clients on each worker: both relay pushes, each over a connection of its own.
    assert_eq!(
        origin.connection_count(),
        2,
        "one upstream connection per worker"
    );
    let stats = relay.relay.pool().stats();
    assert_eq!(stats.len(), 1, "{stats:?}");
    assert_eq!(stats[0].1.open_connections, 2, "{stats:?}");
    drop(clients);
    within(10, "shutdown with workers", relay.stop()).await;
}

/// `upstream.max_token_identities` (2) holds per destination whatever the number of workers, not
/// per worker: two issuers busy on worker 0 (clients 0 and 2; connections go to the worker with
/// fewest) leave no room for a third on worker 1, and both of worker 0's are admitted.
#[tokio::test]
async fn max_token_identities_holds_per_destination_across_workers() {
    let pki = TestPki::new();
    let (origin, hold) = FakeApns::start_holding(&pki, OriginOptions::default()).await;
    let yaml = relay::pre_proxy_yaml(&pki, &origin, Via::Direct)
        .replace("upstream:\n", "upstream:\n  max_token_identities: 2\n");
    let relay = relay::start_on_workers(&yaml, 2).await;
    let mut clients = Vec::new();
    for _ in 0..3 {
        clients.push(Arc::new(H2Client::connect(&pki, relay.addr()).await));
    }
    let push_as = |client: &Arc<H2Client>, iss: &str, n: usize| {
        let client = client.clone();
        let mut req = push_request("api.push.apple.com", &token(n));
        req.headers_mut()
            .insert("authorization", bearer(iss).parse().unwrap());
        async move { client.send(req, bytes::Bytes::from(PAYLOAD)).await.unwrap() }
    };
    let first = tokio::spawn(push_as(&clients[0], "TEAMA", 1));
    origin.wait_received(1).await;
    let second = tokio::spawn(push_as(&clients[2], "TEAMB", 2));
    origin.wait_received(2).await;
    let third = within(10, "third issuer", push_as(&clients[1], "TEAMC", 3)).await;
    assert_eq!(third.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(third.reason().as_deref(), Some("RelayTooManyIdentities"));
    hold.add_permits(2);
    for held in [first, second] {
        assert_eq!(
            within(10, "held", held).await.unwrap().status,
            StatusCode::OK
        );
    }
    assert_eq!(origin.received().len(), 2);
    drop(clients);
    within(10, "shutdown with workers", relay.stop()).await;
}
