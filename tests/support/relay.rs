//! The relay, in-process: configuration through the real YAML loader, listeners bound on
//! 127.0.0.1:0 by the test, shutdown by a oneshot.

use std::net::SocketAddr;

use pushrelay::App;
use pushrelay::config;
use pushrelay::workers::Workers;
use tokio::net::TcpListener;
use tokio::sync::oneshot;

use super::origin::FakeApns;
use super::pki::TestPki;

pub struct RunningRelay {
    pub addrs: Vec<SocketAddr>,
    /// The relay's pipeline, for pool statistics and change notifications.
    pub relay: std::sync::Arc<pushrelay::relay::Relay>,
    /// Applies a configuration (or renews certificates) as SIGHUP does.
    pub reloader: std::sync::Arc<pushrelay::reload::Reloader>,
    shutdown: Option<oneshot::Sender<()>>,
    pub task: Option<tokio::task::JoinHandle<()>>,
    /// Worker threads serving the connections, when started with `start_on_workers`.
    workers: Option<Workers>,
    /// The admin listener, when started with `start_with_admin`.
    pub admin: Option<SocketAddr>,
}

impl RunningRelay {
    pub fn addr(&self) -> SocketAddr {
        self.addrs[0]
    }

    /// Starts shutdown and waits for `run` to return.
    pub async fn stop(mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
        if let Some(workers) = self.workers.take() {
            workers.stop();
        }
    }

    pub fn begin_shutdown(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
    }
}

impl Drop for RunningRelay {
    fn drop(&mut self) {
        if let Some(task) = &self.task {
            task.abort();
        }
    }
}

/// Starts the relay from YAML; each listener's `bind` is replaced by 127.0.0.1:0.
pub async fn start(yaml: &str) -> RunningRelay {
    start_with(yaml, None, false).await
}

/// As `start`, with connections served on `n` worker threads, as `pushrelay serve` does.
pub async fn start_on_workers(yaml: &str, n: usize) -> RunningRelay {
    start_with(yaml, Some(n), false).await
}

/// As `start`, with the admin listener (status page, metrics) on 127.0.0.1:0 too.
pub async fn start_with_admin(yaml: &str) -> RunningRelay {
    start_with(yaml, None, true).await
}

/// As `start`, on listening sockets the test bound (a relay restarted on the same port).
pub async fn start_on(yaml: &str, sockets: Vec<TcpListener>) -> RunningRelay {
    start_with_sockets(yaml, None, false, Some(sockets)).await
}

async fn start_with(yaml: &str, workers: Option<usize>, with_admin: bool) -> RunningRelay {
    start_with_sockets(yaml, workers, with_admin, None).await
}

thread_local! {
    /// The `upstream.http2_client` of relays started on this thread (`for_each_http2_client!`).
    /// A test's runtime, and every task it spawns, runs on the test's own thread.
    static HTTP2_CLIENT: std::cell::Cell<Option<&'static str>> = const { std::cell::Cell::new(None) };
}

/// Runs `test` with every relay it starts on `client` (`h2` or `native`).
pub async fn with_http2_client<F: std::future::Future>(client: &'static str, test: F) -> F::Output {
    HTTP2_CLIENT.with(|c| c.set(Some(client)));
    test.await
}

/// A pool built straight from its parts (no relay) on this thread's `upstream.http2_client`
/// (`for_each_http2_client!`), or on the default (`native`) outside it.
pub fn pool_for_current_client(
    connector: pushrelay::upstream::connect::Connector,
    tls: std::collections::HashMap<
        Option<std::sync::Arc<str>>,
        std::sync::Arc<rustls::ClientConfig>,
    >,
    mut settings: pushrelay::upstream::pool::PoolSettings,
    metrics: std::sync::Arc<pushrelay::metrics::Metrics>,
) -> pushrelay::upstream::pool::Pool {
    use pushrelay::config::Http2Client;
    settings.http2_client = match HTTP2_CLIENT.with(|c| c.get()) {
        Some("h2") => Http2Client::H2,
        _ => Http2Client::Native,
    };
    pushrelay::upstream::pool::Pool::new(connector, tls, settings, metrics)
}

/// `yaml` with the `upstream.http2_client` of this task's test, when it runs per client and the
/// YAML does not name one itself. Reloads of a relay go through it too.
pub fn for_current_client(yaml: &str) -> String {
    let Some(client) = HTTP2_CLIENT.with(|c| c.get()) else {
        return yaml.to_owned();
    };
    if yaml.contains("http2_client:") {
        return yaml.to_owned();
    }
    let line = format!("  http2_client: {client}\n");
    if let Some(rest) = yaml.strip_prefix("upstream:\n") {
        return format!("upstream:\n{line}{rest}");
    }
    match yaml.find("\nupstream:\n") {
        Some(at) => {
            let (head, tail) = yaml.split_at(at + "\nupstream:\n".len());
            format!("{head}{line}{tail}")
        }
        None => format!("{yaml}\nupstream:\n{line}"),
    }
}

async fn start_with_sockets(
    yaml: &str,
    workers: Option<usize>,
    with_admin: bool,
    given: Option<Vec<TcpListener>>,
) -> RunningRelay {
    let yaml = &for_current_client(yaml);
    let loaded =
        config::from_yaml(yaml).unwrap_or_else(|e| panic!("test config invalid: {e}\n{yaml}"));
    let mut sockets = Vec::new();
    let mut addrs = Vec::new();
    match given {
        Some(given) => {
            for socket in given {
                addrs.push(socket.local_addr().unwrap());
                sockets.push(socket);
            }
        }
        None => {
            for _ in &loaded.config.listeners {
                let socket = TcpListener::bind("127.0.0.1:0").await.unwrap();
                addrs.push(socket.local_addr().unwrap());
                sockets.push(socket);
            }
        }
    }
    let admin_socket = match with_admin {
        true => Some(TcpListener::bind("127.0.0.1:0").await.unwrap()),
        false => None,
    };
    let admin = admin_socket.as_ref().map(|s| s.local_addr().unwrap());
    let app = App::with_workers(loaded.config, workers.unwrap_or(1))
        .unwrap_or_else(|e| panic!("relay setup failed: {e}"));
    let workers = workers.map(|n| Workers::start(n).unwrap());
    let handles = workers
        .as_ref()
        .map(|w| w.handles().to_vec())
        .unwrap_or_default();
    let relay = app.relay().clone();
    let reloader = app.reloader();
    let (tx, rx) = oneshot::channel::<()>();
    let task = tokio::spawn(async move {
        app.run_on(&handles, sockets, admin_socket, async {
            let _ = rx.await;
        })
        .await
        .unwrap();
    });
    RunningRelay {
        addrs,
        relay,
        reloader,
        shutdown: Some(tx),
        task: Some(task),
        workers,
        admin,
    }
}

/// How the relay reaches the origin.
pub enum Via {
    /// Direct, with `connect_to` pinning the APNs host to the origin's address.
    Direct,
    /// Through a CONNECT proxy at this URL.
    Proxy(String),
}

/// A pre-proxy relay for the APNs hosts on the origin's port, with the test CA.
pub fn pre_proxy_yaml(pki: &TestPki, origin: &FakeApns, via: Via) -> String {
    pre_proxy_yaml_on(pki, origin.port(), via)
}

pub fn pre_proxy_yaml_on(pki: &TestPki, port: u16, via: Via) -> String {
    format!(
        r#"listeners:
  - name: apns
    mode: pre-proxy
    bind: "127.0.0.1:0"
    upstream_port: {port}
    tls:
      ca_cert: "{ca_cert}"
      ca_key: "{ca_key}"
    allow_sources: ["127.0.0.1/32"]
{rest}"#,
        ca_cert = pki.ca_cert.display(),
        ca_key = pki.ca_key.display(),
        rest = destinations_and_upstream(pki, port, via),
    )
}

/// A forward-proxy relay: the APNs hosts on the origin's port are intercepted, `listener_extra`
/// goes into the listener (e.g. `proxy_auth:`, indented four spaces), `extra` at the top level
/// (e.g. `tunnels:`, `limits:`).
pub fn forward_proxy_yaml(
    pki: &TestPki,
    origin: &FakeApns,
    via: Via,
    listener_extra: &str,
    extra: &str,
) -> String {
    let port = origin.port();
    format!(
        r#"listeners:
  - name: fwd
    mode: forward-proxy
    bind: "127.0.0.1:0"
    tls:
      ca_cert: "{ca_cert}"
      ca_key: "{ca_key}"
    allow_sources: ["127.0.0.1/32"]
{listener_extra}{rest}{extra}"#,
        ca_cert = pki.ca_cert.display(),
        ca_key = pki.ca_key.display(),
        rest = destinations_and_upstream(pki, port, via),
    )
}

/// `proxy_auth` for a forward-proxy listener, with one user written to a file in the PKI dir.
pub fn proxy_auth_yaml(pki: &TestPki, user: &str, pass: &str) -> String {
    let path = pki.path("proxy-users");
    std::fs::write(&path, format!("# test users\n{user}:{pass}\n")).unwrap();
    format!(
        "    proxy_auth:\n      users_file: \"{}\"\n",
        path.display()
    )
}

/// A post-proxy relay (plain HTTP/1.1 front door) for the APNs hosts on the origin's port;
/// `extra` is appended (top-level keys such as `limits:`).
pub fn post_proxy_yaml(pki: &TestPki, origin: &FakeApns, extra: &str) -> String {
    post_proxy_yaml_on(pki, origin.port(), extra)
}

pub fn post_proxy_yaml_on(pki: &TestPki, port: u16, extra: &str) -> String {
    format!(
        r#"listeners:
  - name: legacy
    mode: post-proxy
    bind: "127.0.0.1:0"
    upstream_port: {port}
    allow_sources: ["127.0.0.1/32"]
{rest}{extra}"#,
        rest = destinations_and_upstream(pki, port, Via::Direct),
    )
}

/// The APNs hosts on `port` as destinations, and an upstream that trusts the test CA and reaches
/// the origin directly (pinned by `connect_to`) or through a proxy.
fn destinations_and_upstream(pki: &TestPki, port: u16, via: Via) -> String {
    let route = match via {
        Via::Direct => format!(
            "  connect_to:\n    \"api.push.apple.com:{port}\": \"127.0.0.1:{port}\"\n    \"api.sandbox.push.apple.com:{port}\": \"127.0.0.1:{port}\"\n"
        ),
        Via::Proxy(url) => format!("  proxy: \"{url}\"\n"),
    };
    format!(
        r#"destinations:
  - "api.push.apple.com:{port}"
  - "api.sandbox.push.apple.com:{port}"
upstream:
  extra_roots: ["{ca_cert}"]
  connect_timeout: 2s
  request_timeout: 5s
{route}"#,
        ca_cert = pki.ca_cert.display(),
    )
}
