//! A fake APNs origin: TLS (certificate for the APNs hosts from the test CA) and HTTP/2 through the
//! `h2` server API, answering as Apple does: 200 with `apns-id` and an empty body; 400 / 404 / 405
//! / 410 / 413 with a JSON reason. It records every request it receives, and can send GOAWAY or
//! hold answers when a test wants it.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use h2::server::SendResponse;
use http::{HeaderMap, Method, Request, Response, StatusCode};
use tokio::net::TcpListener;
use tokio::sync::{Notify, Semaphore};
use tokio_rustls::TlsAcceptor;

use super::pki::TestPki;

pub const APNS_HOSTS: [&str; 3] = [
    "api.push.apple.com",
    "api.sandbox.push.apple.com",
    "api.development.push.apple.com",
];

/// One request as the origin saw it.
#[derive(Debug, Clone)]
pub struct Received {
    pub conn: usize,
    pub method: Method,
    pub path: String,
    pub authority: Option<String>,
    pub headers: HeaderMap,
    pub body: Bytes,
}

#[derive(Clone)]
pub struct OriginOptions {
    pub max_concurrent_streams: Option<u32>,
    pub alpn: Vec<Vec<u8>>,
    /// When set, each answer waits for a permit: tests release answers when they want.
    pub hold: Option<Arc<Semaphore>>,
    /// Send a graceful GOAWAY after this many requests on a connection.
    pub goaway_after: Option<usize>,
}

impl Default for OriginOptions {
    fn default() -> Self {
        OriginOptions {
            max_concurrent_streams: Some(1000),
            alpn: vec![b"h2".to_vec()],
            hold: None,
            goaway_after: None,
        }
    }
}

pub struct FakeApns {
    pub addr: SocketAddr,
    pub received: Arc<Mutex<Vec<Received>>>,
    pub connections: Arc<AtomicUsize>,
    /// Notified whenever a request has been recorded.
    pub arrived: Arc<Notify>,
    /// Gets a permit when the first DATA frame of a request arrives, before its body ends.
    pub first_data: Arc<Semaphore>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for FakeApns {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl FakeApns {
    pub async fn start(pki: &TestPki) -> Self {
        Self::start_with(pki, OriginOptions::default()).await
    }

    pub async fn start_with(pki: &TestPki, options: OriginOptions) -> Self {
        let alpn: Vec<&[u8]> = options.alpn.iter().map(|p| p.as_slice()).collect();
        let tls = TlsAcceptor::from(pki.server_config(&APNS_HOSTS, &alpn));
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let received = Arc::new(Mutex::new(Vec::new()));
        let connections = Arc::new(AtomicUsize::new(0));
        let arrived = Arc::new(Notify::new());
        let first_data = Arc::new(Semaphore::new(0));
        let (rec, conns, arr, first) = (
            received.clone(),
            connections.clone(),
            arrived.clone(),
            first_data.clone(),
        );
        let task = tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    return;
                };
                let conn_id = conns.fetch_add(1, Ordering::SeqCst) + 1;
                let (tls, rec, arr, options, first) = (
                    tls.clone(),
                    rec.clone(),
                    arr.clone(),
                    options.clone(),
                    first.clone(),
                );
                tokio::spawn(async move {
                    let Ok(stream) = tls.accept(tcp).await else {
                        return;
                    };
                    let mut builder = h2::server::Builder::new();
                    if let Some(n) = options.max_concurrent_streams {
                        builder.max_concurrent_streams(n);
                    }
                    let Ok(mut conn) = builder.handshake::<_, Bytes>(stream).await else {
                        return;
                    };
                    let mut served = 0usize;
                    while let Some(Ok((req, respond))) = conn.accept().await {
                        served += 1;
                        let (rec, arr, hold, first) = (
                            rec.clone(),
                            arr.clone(),
                            options.hold.clone(),
                            first.clone(),
                        );
                        tokio::spawn(handle(conn_id, req, respond, rec, arr, hold, first));
                        if options.goaway_after == Some(served) {
                            conn.graceful_shutdown();
                        }
                    }
                });
            }
        });
        FakeApns {
            addr,
            received,
            connections,
            arrived,
            first_data,
            task,
        }
    }

    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    pub fn received(&self) -> Vec<Received> {
        self.received.lock().unwrap().clone()
    }

    pub fn connection_count(&self) -> usize {
        self.connections.load(Ordering::SeqCst)
    }
}

async fn handle(
    conn: usize,
    req: Request<h2::RecvStream>,
    mut respond: SendResponse<Bytes>,
    received: Arc<Mutex<Vec<Received>>>,
    arrived: Arc<Notify>,
    hold: Option<Arc<Semaphore>>,
    first_data: Arc<Semaphore>,
) {
    let (parts, mut body) = req.into_parts();
    let mut data = Vec::new();
    while let Some(chunk) = body.data().await {
        let Ok(chunk) = chunk else { return };
        let _ = body.flow_control().release_capacity(chunk.len());
        if data.is_empty() && !chunk.is_empty() && !body.is_end_stream() {
            first_data.add_permits(1);
        }
        data.extend_from_slice(&chunk);
    }
    let record = Received {
        conn,
        method: parts.method.clone(),
        path: parts.uri.path().to_owned(),
        authority: parts.uri.authority().map(|a| a.to_string()),
        headers: parts.headers.clone(),
        body: Bytes::from(data),
    };
    received.lock().unwrap().push(record.clone());
    arrived.notify_waiters();
    if let Some(hold) = hold {
        let _permit = hold.acquire().await;
    }
    let (status, reason) = apple_answer(&record);
    let apns_id = record
        .headers
        .get("apns-id")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
        .unwrap_or_else(|| format!("00000000-0000-4000-8000-{:012x}", conn));
    let mut response = Response::builder()
        .status(status)
        .header("apns-id", apns_id);
    if record
        .authority
        .as_deref()
        .is_some_and(|a| a.starts_with("api.sandbox"))
    {
        response = response.header("apns-unique-id", "a7b3c2d1-0000-4000-8000-000000000001");
    }
    match reason {
        None => {
            let _ = respond.send_response(response.body(()).unwrap(), true);
        }
        Some(reason) => {
            let body = if status == StatusCode::GONE {
                format!("{{\"reason\":\"{reason}\",\"timestamp\":1700000000000}}")
            } else {
                format!("{{\"reason\":\"{reason}\"}}")
            };
            let response = response
                .header("content-type", "application/json")
                .header("content-length", body.len())
                .body(())
                .unwrap();
            if let Ok(mut stream) = respond.send_response(response, false) {
                let _ = stream.send_data(Bytes::from(body), true);
            }
        }
    }
}

/// Apple's answer to a request, as documented for the provider API.
pub fn apple_answer(r: &Received) -> (StatusCode, Option<&'static str>) {
    if r.method != Method::POST {
        return (StatusCode::METHOD_NOT_ALLOWED, Some("MethodNotAllowed"));
    }
    let Some(token) = r.path.strip_prefix("/3/device/") else {
        return (StatusCode::NOT_FOUND, Some("BadPath"));
    };
    if token.is_empty() {
        return (StatusCode::BAD_REQUEST, Some("MissingDeviceToken"));
    }
    if token.len() != 64 || !token.bytes().all(|b| b.is_ascii_hexdigit()) {
        return (StatusCode::BAD_REQUEST, Some("BadDeviceToken"));
    }
    if !r.headers.contains_key("apns-topic") {
        return (StatusCode::BAD_REQUEST, Some("MissingTopic"));
    }
    if r.body.len() > 4096 {
        return (StatusCode::PAYLOAD_TOO_LARGE, Some("PayloadTooLarge"));
    }
    if token.starts_with("dead") {
        return (StatusCode::GONE, Some("Unregistered"));
    }
    (StatusCode::OK, None)
}
