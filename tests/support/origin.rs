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
    /// Common name of the client certificate on this connection, when one was presented.
    pub client_cn: Option<String>,
}

#[derive(Clone)]
pub struct OriginOptions {
    pub max_concurrent_streams: Option<u32>,
    pub alpn: Vec<Vec<u8>>,
    /// When set, each answer waits for a permit: tests release answers when they want.
    pub hold: Option<Arc<Semaphore>>,
    /// Send a graceful GOAWAY after this many requests on a connection.
    pub goaway_after: Option<usize>,
    /// Reset the first this many streams (over all connections) with REFUSED_STREAM, unprocessed.
    pub refuse_first: usize,
    /// Frame-level control between TLS and the HTTP/2 server (SETTINGS injection, PING black hole).
    pub script: Option<Arc<Script>>,
    /// Ask for client certificates (optional) and record their common name.
    pub client_auth: bool,
    /// As Apple's abuse protection: a connection whose client resets more than this many
    /// streams gets GOAWAY ENHANCE_YOUR_CALM.
    pub calm_after_resets: Option<usize>,
    /// Listen on this port (0: any free one), e.g. to come back where a killed origin was.
    pub port: u16,
    /// Answer requests with this `apns-topic` only after this long (a slow tenant).
    pub slow_topic: Option<(String, std::time::Duration)>,
    /// End each 200 with these trailers (APNs sends none; other HTTP/2 origins may).
    pub trailers: Option<HeaderMap>,
}

impl Default for OriginOptions {
    fn default() -> Self {
        OriginOptions {
            max_concurrent_streams: Some(1000),
            alpn: vec![b"h2".to_vec()],
            hold: None,
            goaway_after: None,
            refuse_first: 0,
            script: None,
            client_auth: false,
            calm_after_resets: None,
            port: 0,
            slow_topic: None,
            trailers: None,
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
    /// Streams opened towards the origin, refused ones included.
    pub streams: Arc<AtomicUsize>,
    /// RST_STREAMs received from the client, over all connections.
    pub resets: Arc<AtomicUsize>,
    /// GOAWAY ENHANCE_YOUR_CALM sent (`calm_after_resets`).
    pub calm_goaways: Arc<AtomicUsize>,
    /// A permit per request that ended: answered, or reset by the client.
    pub ended: Arc<Semaphore>,
    task: tokio::task::JoinHandle<()>,
    /// Cancelled by `kill`: every connection is dropped where it stands.
    killed: tokio_util::sync::CancellationToken,
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
        let server_config = if options.client_auth {
            pki.server_config_with_optional_client_auth(&APNS_HOSTS, &alpn)
        } else {
            pki.server_config(&APNS_HOSTS, &alpn)
        };
        let tls = TlsAcceptor::from(server_config);
        let listener = TcpListener::bind(("127.0.0.1", options.port))
            .await
            .unwrap();
        let addr = listener.local_addr().unwrap();
        let killed = tokio_util::sync::CancellationToken::new();
        let shared = Shared {
            received: Arc::new(Mutex::new(Vec::new())),
            arrived: Arc::new(Notify::new()),
            first_data: Arc::new(Semaphore::new(0)),
            refused: Arc::new(AtomicUsize::new(0)),
            resets: Arc::new(AtomicUsize::new(0)),
            calm_goaways: Arc::new(AtomicUsize::new(0)),
            ended: Arc::new(Semaphore::new(0)),
            options,
        };
        let connections = Arc::new(AtomicUsize::new(0));
        let (conns, state, kill) = (connections.clone(), shared.clone(), killed.clone());
        let task = tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    return;
                };
                let conn_id = conns.fetch_add(1, Ordering::SeqCst) + 1;
                let (tls, state) = (tls.clone(), state.clone());
                let kill = kill.clone();
                tokio::spawn(kill.run_until_cancelled_owned(async move {
                    let Ok(stream) = tls.accept(tcp).await else {
                        return;
                    };
                    let client_cn = stream
                        .get_ref()
                        .1
                        .peer_certificates()
                        .and_then(|c| c.first())
                        .and_then(|c| common_name(c));
                    match state.options.script.clone() {
                        None => serve_h2(stream, conn_id, client_cn, state).await,
                        Some(script) => {
                            let (near, far) = tokio::io::duplex(256 * 1024);
                            tokio::spawn(splice(stream, far, script));
                            serve_h2(near, conn_id, client_cn, state).await;
                        }
                    }
                }));
            }
        });
        FakeApns {
            addr,
            received: shared.received,
            connections,
            arrived: shared.arrived,
            first_data: shared.first_data,
            streams: shared.refused,
            resets: shared.resets,
            calm_goaways: shared.calm_goaways,
            ended: shared.ended,
            task,
            killed,
        }
    }

    /// Stops the origin as a crash or restart would: the port is closed and every connection
    /// dropped without GOAWAY.
    pub fn kill(&self) {
        self.task.abort();
        self.killed.cancel();
    }

    /// An origin whose answers wait until the test adds permits to the returned semaphore, one
    /// per answer; `options` may set anything else.
    pub async fn start_holding(pki: &TestPki, options: OriginOptions) -> (Self, Arc<Semaphore>) {
        let hold = Arc::new(Semaphore::new(0));
        let origin = Self::start_with(
            pki,
            OriginOptions {
                hold: Some(hold.clone()),
                ..options
            },
        )
        .await;
        (origin, hold)
    }

    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    /// Waits (bounded) until at least `n` requests have been recorded.
    pub async fn wait_received(&self, n: usize) {
        super::within(10, "requests at the origin", async {
            loop {
                let mut notified = std::pin::pin!(self.arrived.notified());
                notified.as_mut().enable();
                if self.received.lock().unwrap().len() >= n {
                    return;
                }
                notified.await;
            }
        })
        .await
    }

    pub fn received(&self) -> Vec<Received> {
        self.received.lock().unwrap().clone()
    }

    pub fn connection_count(&self) -> usize {
        self.connections.load(Ordering::SeqCst)
    }
}

/// What every connection of the origin shares.
#[derive(Clone)]
struct Shared {
    received: Arc<Mutex<Vec<Received>>>,
    arrived: Arc<Notify>,
    first_data: Arc<Semaphore>,
    refused: Arc<AtomicUsize>,
    resets: Arc<AtomicUsize>,
    calm_goaways: Arc<AtomicUsize>,
    ended: Arc<Semaphore>,
    options: OriginOptions,
}

/// One connection's count of client resets, and the signal to send GOAWAY ENHANCE_YOUR_CALM.
#[derive(Default)]
struct ConnResets {
    count: AtomicUsize,
    calm: Notify,
}

fn common_name(cert: &rustls::pki_types::CertificateDer<'_>) -> Option<String> {
    let (_, parsed) = x509_parser::parse_x509_certificate(cert).ok()?;
    let cn = parsed.subject().iter_common_name().next()?;
    cn.as_str().ok().map(str::to_owned)
}

async fn serve_h2<IO>(io: IO, conn_id: usize, client_cn: Option<String>, state: Shared)
where
    IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let mut builder = h2::server::Builder::new();
    if let Some(n) = state.options.max_concurrent_streams {
        builder.max_concurrent_streams(n);
    }
    let Ok(mut conn) = builder.handshake::<_, Bytes>(io).await else {
        return;
    };
    let mut served = 0usize;
    let resets = Arc::new(ConnResets::default());
    loop {
        let (req, mut respond) = tokio::select! {
            next = conn.accept() => match next {
                Some(Ok(pair)) => pair,
                _ => break,
            },
            _ = resets.calm.notified() => {
                state.calm_goaways.fetch_add(1, Ordering::SeqCst);
                conn.abrupt_shutdown(h2::Reason::ENHANCE_YOUR_CALM);
                // Flush the GOAWAY, then the connection ends.
                let _ = std::future::poll_fn(|cx| conn.poll_closed(cx)).await;
                break;
            }
        };
        let refused = state.refused.fetch_add(1, Ordering::SeqCst) < state.options.refuse_first;
        if refused {
            respond.send_reset(h2::Reason::REFUSED_STREAM);
            continue;
        }
        served += 1;
        tokio::spawn(handle(
            conn_id,
            client_cn.clone(),
            req,
            respond,
            state.clone(),
            resets.clone(),
        ));
        if state.options.goaway_after == Some(served) {
            conn.graceful_shutdown();
        }
    }
}

async fn handle(
    conn: usize,
    client_cn: Option<String>,
    req: Request<h2::RecvStream>,
    mut respond: SendResponse<Bytes>,
    state: Shared,
    resets: Arc<ConnResets>,
) {
    let (parts, mut body) = req.into_parts();
    let mut data = Vec::new();
    while let Some(chunk) = body.data().await {
        let Ok(chunk) = chunk else { return };
        let _ = body.flow_control().release_capacity(chunk.len());
        if data.is_empty() && !chunk.is_empty() && !body.is_end_stream() {
            state.first_data.add_permits(1);
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
        client_cn,
    };
    state.received.lock().unwrap().push(record.clone());
    state.arrived.notify_waiters();
    if let Some((topic, after)) = &state.options.slow_topic
        && record
            .headers
            .get("apns-topic")
            .is_some_and(|t| t == topic.as_str())
    {
        tokio::time::sleep(*after).await;
    }
    if let Some(hold) = &state.options.hold {
        // Each permit releases exactly one answer; a client reset while held is counted.
        tokio::select! {
            permit = hold.acquire() => if let Ok(permit) = permit {
                permit.forget();
            },
            reset = std::future::poll_fn(|cx| respond.poll_reset(cx)) => {
                if reset.is_ok() {
                    state.resets.fetch_add(1, Ordering::SeqCst);
                    let n = resets.count.fetch_add(1, Ordering::SeqCst) + 1;
                    if state.options.calm_after_resets.is_some_and(|max| n > max) {
                        resets.calm.notify_one();
                    }
                }
                state.ended.add_permits(1);
                return;
            }
        }
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
    state.ended.add_permits(1);
    match reason {
        None => match &state.options.trailers {
            None => {
                let _ = respond.send_response(response.body(()).unwrap(), true);
            }
            Some(trailers) => {
                if let Ok(mut stream) = respond.send_response(response.body(()).unwrap(), false) {
                    let _ = stream.send_trailers(trailers.clone());
                }
            }
        },
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

/// Frame-level control of one side of the origin's connections: SETTINGS injected towards the
/// client, PINGs from the client dropped. Works on frame headers only (no HPACK).
pub struct Script {
    max_streams: tokio::sync::watch::Sender<Option<u32>>,
    /// A permit each time the client acknowledges an injected SETTINGS frame.
    pub acked: Semaphore,
    /// Drop the client's PINGs, as a black-holed tunnel would.
    pub drop_pings: std::sync::atomic::AtomicBool,
    /// A permit each time a client connection ends.
    pub closed: Semaphore,
}

impl Script {
    pub fn new() -> Arc<Self> {
        Arc::new(Script {
            max_streams: tokio::sync::watch::Sender::new(None),
            acked: Semaphore::new(0),
            drop_pings: std::sync::atomic::AtomicBool::new(false),
            closed: Semaphore::new(0),
        })
    }

    /// Sends SETTINGS_MAX_CONCURRENT_STREAMS = `n` on every connection, now and later.
    pub fn set_max_streams(&self, n: u32) {
        self.max_streams.send_replace(Some(n));
    }
}

const FRAME_SETTINGS: u8 = 0x4;
const FRAME_PING: u8 = 0x6;
const FLAG_ACK: u8 = 0x1;

/// SETTINGS with SETTINGS_MAX_CONCURRENT_STREAMS (0x3) = `n`.
fn settings_frame(n: u32) -> Vec<u8> {
    let mut frame = vec![0, 0, 6, FRAME_SETTINGS, 0, 0, 0, 0, 0, 0, 3];
    frame.extend_from_slice(&n.to_be_bytes());
    frame
}

async fn read_frame<R: tokio::io::AsyncRead + Unpin>(r: &mut R) -> Option<Vec<u8>> {
    use tokio::io::AsyncReadExt;
    let mut frame = vec![0u8; 9];
    r.read_exact(&mut frame).await.ok()?;
    let len = ((frame[0] as usize) << 16) | ((frame[1] as usize) << 8) | frame[2] as usize;
    frame.resize(9 + len, 0);
    r.read_exact(&mut frame[9..]).await.ok()?;
    Some(frame)
}

async fn splice<C>(client: C, server: tokio::io::DuplexStream, script: Arc<Script>)
where
    C: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    use std::collections::VecDeque;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (mut cr, cw) = tokio::io::split(client);
    let (mut sr, mut sw) = tokio::io::split(server);
    let cw = Arc::new(tokio::sync::Mutex::new(cw));
    // For each SETTINGS frame sent to the client, in order: whether we injected it.
    let sent: Arc<Mutex<VecDeque<bool>>> = Arc::default();

    let to_client = {
        let (cw, sent, script_now) = (cw.clone(), sent.clone(), script.clone());
        async move {
            let mut first_settings = true;
            while let Some(frame) = read_frame(&mut sr).await {
                let mut w = cw.lock().await;
                let is_settings = frame[3] == FRAME_SETTINGS && frame[4] & FLAG_ACK == 0;
                if is_settings {
                    sent.lock().unwrap().push_back(false);
                }
                if w.write_all(&frame).await.is_err() {
                    return;
                }
                // A connection opened after a change sees it straight after the server's SETTINGS.
                if is_settings && std::mem::take(&mut first_settings) {
                    let current = *script_now.max_streams.borrow();
                    if let Some(n) = current {
                        sent.lock().unwrap().push_back(true);
                        if w.write_all(&settings_frame(n)).await.is_err() {
                            return;
                        }
                    }
                }
            }
        }
    };
    let inject = {
        let (cw, sent, script) = (cw.clone(), sent.clone(), script.clone());
        async move {
            let mut rx = script.max_streams.subscribe();
            loop {
                if rx.changed().await.is_err() {
                    return std::future::pending().await;
                }
                let Some(n) = *rx.borrow_and_update() else {
                    continue;
                };
                let mut w = cw.lock().await;
                sent.lock().unwrap().push_back(true);
                if w.write_all(&settings_frame(n)).await.is_err() {
                    return;
                }
            }
        }
    };
    let to_server = async {
        let mut preface = [0u8; 24];
        if cr.read_exact(&mut preface).await.is_err() || sw.write_all(&preface).await.is_err() {
            return;
        }
        while let Some(frame) = read_frame(&mut cr).await {
            let (kind, ack) = (frame[3], frame[4] & FLAG_ACK != 0);
            if kind == FRAME_SETTINGS && ack {
                let injected = sent.lock().unwrap().pop_front().unwrap_or(false);
                if injected {
                    script.acked.add_permits(1);
                    continue;
                }
            }
            if kind == FRAME_PING && !ack && script.drop_pings.load(Ordering::SeqCst) {
                continue;
            }
            if sw.write_all(&frame).await.is_err() {
                return;
            }
        }
    };
    tokio::select! {
        _ = to_client => {}
        _ = to_server => {}
        _ = inject => {}
    }
    script.closed.add_permits(1);
}
