//! A thin tokio driver over [`Connection`]: one task owns the I/O stream (TLS or TCP) and the
//! connection state; [`Client`] handles send whole requests to it and get whole answers back.
//! Requests beyond the peer's live SETTINGS_MAX_CONCURRENT_STREAMS wait in the task, in order,
//! and start as streams close. A PING goes out at once and then every `ping_interval`; no ACK
//! within `ping_timeout` ends the connection (a black-holed tunnel looks exactly like that). The
//! connection is ready ([`Client::ready`]) once the server's SETTINGS came and that first PING
//! was answered: the peer is then known to be an HTTP/2 server that reads what we send. Writes
//! are coalesced: before each one the task yields once, so that requests sent meanwhile go out
//! in the same write.

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicUsize, Ordering};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http::{HeaderMap, StatusCode};
use rustc_hash::FxHashMap;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;

use super::conn::{Config, Connection, Event, Failure, OpenError, RequestHead};
use super::frame::{ErrorCode, H2Error};

#[derive(Debug, Clone)]
pub struct DriverConfig {
    pub conn: Config,
    pub ping_interval: Option<Duration>,
    pub ping_timeout: Duration,
    /// Most bytes of answer body kept per request; more resets the stream (CANCEL).
    pub max_body: usize,
}

impl Default for DriverConfig {
    fn default() -> Self {
        DriverConfig {
            conn: Config::default(),
            ping_interval: None,
            ping_timeout: Duration::from_secs(10),
            max_body: 64 << 10,
        }
    }
}

/// A whole answer.
#[derive(Debug)]
pub struct Answer {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
    pub trailers: Option<HeaderMap>,
}

#[derive(Debug, thiserror::Error)]
pub enum RequestError {
    #[error("the request could not start: {0}")]
    NotStarted(OpenError),
    #[error("the stream failed: {0:?}")]
    Stream(Failure),
    #[error("the answer body is larger than {0} bytes")]
    BodyTooLarge(usize),
    #[error("the connection ended: {0}")]
    ConnectionLost(String),
    #[error("the request has no authority")]
    NoAuthority,
}

impl RequestError {
    /// True when the peer provably never processed the request: it may go on another connection.
    pub fn never_processed(&self) -> bool {
        match self {
            RequestError::NotStarted(_) | RequestError::NoAuthority => true,
            RequestError::Stream(f) => f.never_processed(),
            _ => false,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum DriverError {
    #[error("upstream I/O: {0}")]
    Io(#[from] std::io::Error),
    #[error(transparent)]
    Protocol(#[from] H2Error),
    #[error("no PING ACK within {0:?}")]
    PingTimeout(Duration),
}

struct Command {
    request: http::Request<Bytes>,
    trailers: Option<HeaderMap>,
    reply: oneshot::Sender<Result<Answer, RequestError>>,
}

/// How a connection ended, as the driver future returns it.
#[derive(Debug)]
pub struct Ended {
    /// The server's GOAWAY, when one came: its error code and debug data.
    pub goaway: Option<(ErrorCode, Bytes)>,
    /// `Ok`: closed cleanly (after GOAWAY, or by us once every handle was dropped).
    pub result: Result<(), DriverError>,
}

impl std::fmt::Display for Ended {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if let Some((code, debug)) = &self.goaway {
            write!(f, "GOAWAY {code:?}")?;
            if !debug.is_empty() {
                write!(
                    f,
                    " {:?}",
                    String::from_utf8_lossy(&debug[..debug.len().min(256)])
                )?;
            }
            if let Err(e) = &self.result {
                write!(f, ", then {e}")?;
            }
            return Ok(());
        }
        match &self.result {
            Ok(()) => f.write_str("closed"),
            Err(e) => write!(f, "{e}"),
        }
    }
}

/// What the handles can see of the connection, kept current by the task.
#[derive(Debug, Default)]
struct Shared {
    max_concurrent: AtomicU32,
    open: AtomicUsize,
    going_away: AtomicBool,
    closed: AtomicBool,
    ready: AtomicBool,
    /// Woken when `ready` or `closed` is set.
    changed: tokio::sync::Notify,
}

/// A handle for sending requests on one connection.
#[derive(Clone)]
pub struct Client {
    tx: mpsc::UnboundedSender<Command>,
    shared: Arc<Shared>,
}

impl Client {
    /// Sends `request` and waits for the whole answer.
    pub async fn send(&self, request: http::Request<Bytes>) -> Result<Answer, RequestError> {
        self.send_with_trailers(request, None).await
    }

    /// [`Self::send`], with trailers after the body.
    pub async fn send_with_trailers(
        &self,
        request: http::Request<Bytes>,
        trailers: Option<HeaderMap>,
    ) -> Result<Answer, RequestError> {
        let (reply, rx) = oneshot::channel();
        let cmd = Command {
            request,
            trailers,
            reply,
        };
        if self.tx.send(cmd).is_err() {
            return Err(RequestError::NotStarted(OpenError::GoingAway));
        }
        rx.await
            .unwrap_or(Err(RequestError::NotStarted(OpenError::GoingAway)))
    }

    /// Waits until the server's SETTINGS came and the first PING was answered (true), or the
    /// connection ended first (false).
    pub async fn ready(&self) -> bool {
        loop {
            let notified = self.shared.changed.notified();
            let mut notified = std::pin::pin!(notified);
            notified.as_mut().enable();
            if self.shared.ready.load(Ordering::Acquire) {
                return true;
            }
            if self.is_closed() {
                return false;
            }
            notified.await;
        }
    }

    /// The peer's SETTINGS_MAX_CONCURRENT_STREAMS as last seen.
    pub fn max_concurrent_streams(&self) -> u32 {
        self.shared.max_concurrent.load(Ordering::Relaxed)
    }

    /// Streams open now.
    pub fn open_streams(&self) -> usize {
        self.shared.open.load(Ordering::Relaxed)
    }

    /// The server sent GOAWAY (or the connection failed): requests sent from now on fail as
    /// never processed; those in flight below its last stream id still finish.
    pub fn is_going_away(&self) -> bool {
        self.shared.going_away.load(Ordering::Relaxed) || self.is_closed()
    }

    /// The connection takes no new requests.
    pub fn is_closed(&self) -> bool {
        self.shared.closed.load(Ordering::Relaxed) || self.tx.is_closed()
    }
}

struct InFlight {
    reply: oneshot::Sender<Result<Answer, RequestError>>,
    status: StatusCode,
    headers: HeaderMap,
    body: BytesMut,
}

/// Starts HTTP/2 on `io` (already TLS-negotiated, or plain TCP for h2c): returns the handle and
/// the future that drives the connection until it ends; spawn it on the worker that owns `io`.
pub fn connect<IO>(io: IO, cfg: DriverConfig) -> (Client, impl Future<Output = Ended>)
where
    IO: AsyncRead + AsyncWrite + Unpin,
{
    let (tx, rx) = mpsc::unbounded_channel();
    let shared = Arc::new(Shared::default());
    let client = Client {
        tx,
        shared: shared.clone(),
    };
    (client, drive(io, cfg, rx, shared))
}

/// Per-connection state of the driver loop that `dispatch` updates.
struct Progress {
    pong_due: Option<Instant>,
    goaway: Option<(ErrorCode, Bytes)>,
    pongs: u64,
}

async fn drive<IO>(
    io: IO,
    cfg: DriverConfig,
    mut rx: mpsc::UnboundedReceiver<Command>,
    shared: Arc<Shared>,
) -> Ended
where
    IO: AsyncRead + AsyncWrite + Unpin,
{
    let mut conn = Connection::new(cfg.conn.clone());
    let (mut rd, mut wr) = tokio::io::split(io);
    let mut waiting: VecDeque<Command> = VecDeque::new();
    let mut in_flight: FxHashMap<u32, InFlight> = FxHashMap::default();
    let mut handles_gone = false;
    let far = Instant::now() + Duration::from_secs(86_400 * 365);
    let mut next_ping = cfg.ping_interval.map_or(far, |i| Instant::now() + i);
    // The first PING goes out with our SETTINGS: its ACK makes the connection ready.
    let mut ping_seq = 1u64;
    conn.ping(ping_seq.to_be_bytes());
    let mut progress = Progress {
        pong_due: Some(Instant::now() + cfg.ping_timeout),
        goaway: None,
        pongs: 0,
    };
    let result = loop {
        start_waiting(&mut conn, &mut waiting, &mut in_flight);
        shared
            .max_concurrent
            .store(conn.max_concurrent_streams(), Ordering::Relaxed);
        shared.open.store(conn.open_streams(), Ordering::Relaxed);
        if conn.is_going_away() {
            shared.going_away.store(true, Ordering::Relaxed);
        }
        if conn.has_output() {
            // Pushes arrive one by one: yield once so that requests ready right now (and the
            // answers they wait for) join this write, one TLS record and one write(2) for a
            // burst instead of one each, as `crate::coalesce` does for the h2 crate.
            tokio::task::yield_now().await;
            if !handles_gone {
                loop {
                    match rx.try_recv() {
                        Ok(cmd) => waiting.push_back(cmd),
                        Err(mpsc::error::TryRecvError::Empty) => break,
                        Err(mpsc::error::TryRecvError::Disconnected) => {
                            handles_gone = true;
                            break;
                        }
                    }
                }
                start_waiting(&mut conn, &mut waiting, &mut in_flight);
            }
            let out = conn.take_output();
            if let Err(e) = async {
                wr.write_all(&out).await?;
                wr.flush().await
            }
            .await
            {
                break Err(DriverError::Io(e));
            }
        }
        if let Some(e) = conn.error() {
            break Err(DriverError::Protocol(e.clone()));
        }
        if conn.is_finished() && waiting.is_empty() {
            break Ok(());
        }
        if handles_gone && in_flight.is_empty() && waiting.is_empty() {
            conn.go_away(ErrorCode::NO_ERROR);
            let out = conn.take_output();
            let _ = wr.write_all(&out).await;
            let _ = wr.shutdown().await;
            break Ok(());
        }
        let deadline = progress.pong_due.unwrap_or(next_ping);
        let buf = conn.recv_buf();
        buf.reserve(16 << 10);
        tokio::select! {
            read = rd.read_buf(buf) => match read {
                Ok(0) => break Err(DriverError::Io(std::io::ErrorKind::UnexpectedEof.into())),
                Ok(_) => {
                    let processed = conn.process();
                    dispatch(&mut conn, &mut in_flight, &mut progress, cfg.max_body);
                    if progress.pongs > 0 && !shared.ready.load(Ordering::Relaxed) {
                        shared.ready.store(true, Ordering::Release);
                        shared.changed.notify_waiters();
                    }
                    if let Err(e) = processed {
                        let out = conn.take_output();
                        let _ = wr.write_all(&out).await;
                        break Err(DriverError::Protocol(e));
                    }
                }
                Err(e) => break Err(DriverError::Io(e)),
            },
            cmd = rx.recv(), if !handles_gone => match cmd {
                Some(cmd) => waiting.push_back(cmd),
                None => handles_gone = true,
            },
            _ = tokio::time::sleep_until(deadline) => {
                if progress.pong_due.is_some() {
                    break Err(DriverError::PingTimeout(cfg.ping_timeout));
                }
                ping_seq += 1;
                conn.ping(ping_seq.to_be_bytes());
                progress.pong_due = Some(Instant::now() + cfg.ping_timeout);
                next_ping = cfg.ping_interval.map_or(far, |i| Instant::now() + i);
            }
        }
    };
    shared.closed.store(true, Ordering::Relaxed);
    shared.going_away.store(true, Ordering::Relaxed);
    shared.changed.notify_waiters();
    let ended = Ended {
        goaway: progress.goaway,
        result,
    };
    let reason = ended.to_string();
    for (_, f) in in_flight.drain() {
        let _ = f
            .reply
            .send(Err(RequestError::ConnectionLost(reason.clone())));
    }
    rx.close();
    while let Ok(cmd) = rx.try_recv() {
        waiting.push_back(cmd);
    }
    for cmd in waiting {
        let _ = cmd
            .reply
            .send(Err(RequestError::NotStarted(OpenError::GoingAway)));
    }
    ended
}

/// Opens streams for waiting requests while the peer's limit allows. Nothing opens before the
/// server's first SETTINGS: its MAX_CONCURRENT_STREAMS may be below what is waiting (APNs starts
/// at 1), and streams above it would come back REFUSED_STREAM.
fn start_waiting(
    conn: &mut Connection,
    waiting: &mut VecDeque<Command>,
    in_flight: &mut FxHashMap<u32, InFlight>,
) {
    while conn.settings_received() && conn.can_open() {
        let Some(cmd) = waiting.pop_front() else {
            return;
        };
        let (parts, body) = cmd.request.into_parts();
        let Some(authority) = parts.uri.authority() else {
            let _ = cmd.reply.send(Err(RequestError::NoAuthority));
            continue;
        };
        let head = RequestHead {
            method: &parts.method,
            scheme: parts.uri.scheme_str().unwrap_or("https"),
            authority: authority.as_str(),
            path: parts.uri.path_and_query().map_or("/", |p| p.as_str()),
            headers: &parts.headers,
        };
        match conn.send_request_with_trailers(&head, body, cmd.trailers) {
            Ok(id) => {
                in_flight.insert(
                    id,
                    InFlight {
                        reply: cmd.reply,
                        status: StatusCode::OK,
                        headers: HeaderMap::new(),
                        body: BytesMut::new(),
                    },
                );
            }
            Err(e) => {
                let _ = cmd.reply.send(Err(RequestError::NotStarted(e)));
            }
        }
    }
    // Going away or failed: nothing waiting will ever start here, and it may go elsewhere at
    // once rather than after the streams still in flight.
    if conn.is_going_away() {
        for cmd in waiting.drain(..) {
            let _ = cmd
                .reply
                .send(Err(RequestError::NotStarted(OpenError::GoingAway)));
        }
    }
}

fn dispatch(
    conn: &mut Connection,
    in_flight: &mut FxHashMap<u32, InFlight>,
    progress: &mut Progress,
    max_body: usize,
) {
    while let Some(event) = conn.poll_event() {
        match event {
            Event::Response {
                stream,
                status,
                headers,
                end_stream,
            } => {
                if let Some(f) = in_flight.get_mut(&stream) {
                    f.status = status;
                    f.headers = headers;
                }
                if end_stream {
                    finish(in_flight, stream, None);
                }
            }
            Event::Data {
                stream,
                data,
                end_stream,
            } => {
                let Some(f) = in_flight.get_mut(&stream) else {
                    continue;
                };
                if f.body.len() + data.len() > max_body {
                    conn.cancel(stream);
                    if let Some(f) = in_flight.remove(&stream) {
                        let _ = f.reply.send(Err(RequestError::BodyTooLarge(max_body)));
                    }
                    continue;
                }
                f.body.extend_from_slice(&data);
                if end_stream {
                    finish(in_flight, stream, None);
                }
            }
            Event::Trailers { stream, trailers } => finish(in_flight, stream, Some(trailers)),
            Event::Failed { stream, failure } => {
                if let Some(f) = in_flight.remove(&stream) {
                    let _ = f.reply.send(Err(RequestError::Stream(failure)));
                }
            }
            Event::Pong { .. } => {
                progress.pong_due = None;
                progress.pongs += 1;
            }
            Event::GoAway { code, debug, .. } => progress.goaway = Some((code, debug)),
            Event::Settings => {}
        }
    }
}

fn finish(in_flight: &mut FxHashMap<u32, InFlight>, stream: u32, trailers: Option<HeaderMap>) {
    if let Some(f) = in_flight.remove(&stream) {
        let _ = f.reply.send(Ok(Answer {
            status: f.status,
            headers: f.headers,
            body: f.body.freeze(),
            trailers,
        }));
    }
}
