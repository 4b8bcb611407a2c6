//! `pushrelay serve` runs connections on worker threads, each with its own share of the upstream
//! pool: a client connection and the upstream connection its pushes use stay on one thread.

mod support;

use std::sync::Arc;

use futures_util::future::join_all;
use http::StatusCode;
use support::client::H2Client;
use support::origin::FakeApns;
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
