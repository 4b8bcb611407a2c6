//! The log never holds up a worker: with the log writer stalled (a pipe nobody reads), the relay
//! keeps serving, and the lines it could not write are counted. Its own test binary, as it
//! installs the process-wide log subscriber.

mod support;

use std::io::{self, Write};
use std::sync::mpsc;

use http::StatusCode;
use support::client::H2Client;
use support::origin::FakeApns;
use support::pki::TestPki;
use support::relay::{self, Via};
use support::{token, within};

/// A writer that blocks on its first write until the test ends.
struct Stalled(mpsc::Receiver<()>);

impl Write for Stalled {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        let _ = self.0.recv();
        Ok(data.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// With the log writer stalled, two workers serve 300 pushes (a log line each) and the dropped
/// lines are counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workers_keep_serving_while_the_log_writer_is_stalled() {
    let (_release, stalled) = mpsc::channel();
    let (sink, _guard) = pushrelay::log::sink_with_queue(Stalled(stalled), 16);
    tracing_subscriber::fmt()
        .with_env_filter("info")
        .with_writer(sink)
        .init();

    let pki = TestPki::new();
    let origin = FakeApns::start(&pki).await;
    let relay =
        relay::start_on_workers(&relay::pre_proxy_yaml(&pki, &origin, Via::Direct), 2).await;
    let client = H2Client::connect(&pki, relay.addr()).await;
    for i in 0..300 {
        let answer = within(
            10,
            "push with the log stalled",
            client.push(&token(i), "{}"),
        )
        .await;
        assert_eq!(answer.status, StatusCode::OK);
    }
    // What /metrics exports as pushrelay_log_lines_dropped_total.
    let dropped = pushrelay::log::dropped_lines();
    assert!(dropped >= 300 - 2 * 16 - 1, "{dropped} lines dropped");
    drop(client);
    relay.stop().await;
}
