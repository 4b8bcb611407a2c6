//! Serving one HTTP/1.1 client connection, for every front door that speaks HTTP/1.1 (post-proxy,
//! and pre-proxy and forward-proxy once ALPN chose `http/1.1` or no HTTP/2 preface came): the
//! strict parser of `http1` for every head and body, requests answered one at a time in order
//! (pipelining), each head bounded by `handshake_timeout`, the wait for the next one by
//! `idle_timeout` (the first by `handshake_timeout`: a connection that sends nothing does not hold
//! a place). A request whose body is not fully read, whose framing is in doubt, or a refused
//! `CONNECT` ends the connection. Once a request's body is read, the connection is watched for the
//! client closing it: a request not yet `Committed` upstream (queued, or waiting for a connect) is
//! then dropped and never sent, as an HTTP/2 client's reset drops it. The door only says where
//! each request goes (`Routes`).

use std::future::{Future, poll_fn};
use std::pin::{Pin, pin};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Method, Request, Response, StatusCode, Uri, Version, header};
use http_body::{Body, Frame};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, BufWriter};
use tokio::sync::{mpsc, oneshot};
use tokio::time::{Instant, sleep, timeout};
use tokio_util::sync::CancellationToken;

use super::body::RelayBody;
use super::http1::{self, ChunkState, Framing, ReadError, Reader, RequestHead};
use super::{Ctx, Relay};
use crate::config::Config;
use crate::error::{Refusal, RelayError};
use crate::policy::Authority;
use crate::upstream::{BoxError, Committed};

/// What a front door decides for each request on its HTTP/1.1 connections.
pub trait Routes {
    /// The destination of the request with `head`, the `:authority` to send and the target as a
    /// URI, or why it is refused (answered once its body was read). `last` is this connection's
    /// previous route, for a door that can reuse it. Never called for `CONNECT`.
    fn route(
        &self,
        head: &RequestHead,
        last: &mut Option<Route>,
    ) -> Result<(Authority, http::uri::Authority, Uri), RelayError>;

    /// The answer as the door sends it.
    fn mark(&self, response: Response<RelayBody>) -> Response<RelayBody> {
        response
    }
}

/// Where a request naming `named` (its host as written, port included) went: a connection's
/// requests usually name the same host, which then needs no new `Authority`.
pub struct Route {
    pub named: Box<str>,
    pub dest: Authority,
    pub authority: http::uri::Authority,
}

/// The request target as a URI: origin form, or absolute form with `http`/`https`; an HTTP/1.1
/// request must carry `Host` (RFC 9112 §3.2). Echoed cut: it may carry a device token.
pub fn request_target(head: &RequestHead) -> Result<Uri, RelayError> {
    let shown = || super::loggable_path(&head.target);
    let uri: Uri = head
        .target
        .parse()
        .map_err(|_| RelayError::BadRequest(format!("invalid request target {:?}", shown())))?;
    match uri.scheme_str() {
        None if head.target.starts_with('/') => {}
        Some(s) if s.eq_ignore_ascii_case("http") || s.eq_ignore_ascii_case("https") => {}
        _ => {
            return Err(RelayError::BadRequest(format!(
                "unsupported request target {:?}",
                shown()
            )));
        }
    }
    if head.version == Version::HTTP_11 && !head.headers.contains_key(header::HOST) {
        return Err(RelayError::BadRequest(
            "HTTP/1.1 request without Host".into(),
        ));
    }
    Ok(uri)
}

/// What every exchange on one connection shares.
struct Conn<'a, D> {
    ctx: &'a Ctx,
    routes: &'a D,
    shutdown: &'a CancellationToken,
}

/// The bounds every HTTP/1.1 connection is served with, from `limits`.
pub struct Http1Server {
    relay: Arc<Relay>,
    max_header_bytes: usize,
    max_request_body: u64,
    idle_timeout: Duration,
    head_timeout: Duration,
    write_timeout: Duration,
}

/// What is left of a connection after one exchange, and if it closes, why. Decided here alone:
/// `Outcome::of_request` before answering, `Outcome::unless` as the answer is written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome {
    KeepAlive,
    Close(Why),
}

/// Why a connection closes after an exchange.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Why {
    /// `Connection: close`, or HTTP/1.0 without keep-alive.
    ClientAsked,
    /// The relay is shutting down: in-flight requests finish, connections do not carry on.
    ShuttingDown,
    /// The request body was not read to its end (an early answer, a broken body): whatever
    /// follows on the connection cannot be told apart from it.
    BodyUnread,
    /// The head was refused, or did not arrive in time: the connection's framing is unknown.
    HeadRefused,
    /// A refused CONNECT: its sender may take what follows for tunnel bytes, never a request.
    RefusedConnect,
    /// An HTTP/1.0 answer without a length ends where the connection ends.
    AnswerUntilClose,
    /// The answer could not be written whole (the write failed, or the origin's body broke off
    /// or was shorter than its length).
    AnswerIncomplete,
    /// The client closed its connection while its request was handled: a request not yet sent
    /// upstream is dropped (never sent), one already sent finishes there and its answer is
    /// dropped.
    ClientGone,
}

impl Outcome {
    /// Before answering: the connection carries on only if the client asked for it, the relay is
    /// not shutting down, and the request was read to its end.
    fn of_request(client_keep_alive: bool, shutting_down: bool, body_read: bool) -> Outcome {
        if !client_keep_alive {
            Outcome::Close(Why::ClientAsked)
        } else if shutting_down {
            Outcome::Close(Why::ShuttingDown)
        } else if !body_read {
            Outcome::Close(Why::BodyUnread)
        } else {
            Outcome::KeepAlive
        }
    }

    /// Closes for `why` unless `ok`; a connection already closing keeps its first reason.
    fn unless(self, ok: bool, why: Why) -> Outcome {
        match self {
            Outcome::KeepAlive if !ok => Outcome::Close(why),
            other => other,
        }
    }

    fn keep_alive(self) -> bool {
        self == Outcome::KeepAlive
    }
}

impl Http1Server {
    pub fn new(config: &Config, relay: Arc<Relay>) -> Self {
        Http1Server {
            relay,
            max_header_bytes: config.limits.max_header_bytes,
            max_request_body: config.limits.max_request_body as u64,
            idle_timeout: config.limits.idle_timeout,
            head_timeout: config.limits.handshake_timeout,
            write_timeout: config.limits.client_write_timeout,
        }
    }

    /// Serves `io` until the client closes, a request ends the connection, or `shutdown`; every
    /// request goes where `routes` says.
    pub async fn serve<IO, R>(&self, io: IO, ctx: &Ctx, routes: &R, shutdown: &CancellationToken)
    where
        IO: AsyncRead + AsyncWrite + Unpin,
        R: Routes,
    {
        let (rd, wr) = tokio::io::split(io);
        let mut reader = Reader::new(rd);
        let mut writer = BufWriter::new(wr);
        let mut cancelled = pin!(shutdown.cancelled());
        // One idle timer per connection, moved on only when it fires: a fresh timer per request
        // costs a timer-wheel insertion and removal every time.
        // A new connection's first request must start within the handshake timeout: a
        // connection that sends nothing does not hold a place for the idle timeout.
        let mut idle = pin!(sleep(self.head_timeout));
        let mut wait = self.head_timeout;
        let mut last_route = None;
        loop {
            if !reader.has_buffered() {
                if writer.flush().await.is_err() {
                    return;
                }
                let deadline = Instant::now() + std::mem::replace(&mut wait, self.idle_timeout);
                if idle.deadline() > deadline {
                    idle.as_mut().reset(deadline);
                }
                let arrived = loop {
                    tokio::select! {
                        biased;
                        _ = cancelled.as_mut() => break false,
                        waited = reader.wait_for_request() => break matches!(waited, Ok(true)),
                        _ = idle.as_mut() => {
                            if idle.deadline() >= deadline {
                                break false;
                            }
                            idle.as_mut().reset(deadline);
                        }
                    }
                };
                if !arrived {
                    break;
                }
            }
            // A head already buffered whole needs no timer.
            let head = match reader.buffered_head(self.max_header_bytes) {
                Ok(Some(head)) => Ok(Ok(head)),
                Ok(None) => {
                    timeout(self.head_timeout, reader.read_head(self.max_header_bytes)).await
                }
                Err(e) => Ok(Err(ReadError::Http(e))),
            };
            let head = match head {
                Ok(Ok(head)) => head,
                Ok(Err(ReadError::Http(e))) => {
                    self.relay.metrics().relay_error(e.reason());
                    self.relay.metrics().request(
                        &ctx.listener,
                        &Arc::from(""),
                        e.status().as_u16(),
                        Duration::ZERO,
                    );
                    tracing::info!(listener = %ctx.listener, client.addr = %ctx.client, status = e.status().as_u16(), error = %e, "refused request head");
                    let _ = write_response(
                        &mut writer,
                        e.refusal().to_response(),
                        &Method::GET,
                        Version::HTTP_11,
                        Outcome::Close(Why::HeadRefused),
                    )
                    .await;
                    break;
                }
                Ok(Err(_)) => break,
                Err(_) => {
                    let _ = write_response(
                        &mut writer,
                        Refusal::HeadTimeout.to_response(),
                        &Method::GET,
                        Version::HTTP_11,
                        Outcome::Close(Why::HeadRefused),
                    )
                    .await;
                    break;
                }
            };
            let outcome = self
                .exchange(
                    &mut reader,
                    &mut writer,
                    head,
                    &mut last_route,
                    &Conn {
                        ctx,
                        routes,
                        shutdown,
                    },
                )
                .await;
            if let Outcome::Close(why) = outcome {
                tracing::debug!(listener = %ctx.listener, client.addr = %ctx.client, why = ?why, "client connection closes after this answer");
                break;
            }
        }
        let _ = writer.flush().await;
        let _ = writer.shutdown().await;
    }

    async fn exchange<R, W, D>(
        &self,
        reader: &mut Reader<R>,
        writer: &mut W,
        head: RequestHead,
        last_route: &mut Option<Route>,
        conn: &Conn<'_, D>,
    ) -> Outcome
    where
        R: AsyncRead + Unpin,
        W: AsyncWrite + Unpin,
        D: Routes,
    {
        let Conn {
            ctx,
            routes,
            shutdown,
        } = *conn;
        let (client_keep_alive, shutting_down) = (head.keep_alive, shutdown.is_cancelled());
        let (method, version, framing) = (head.method.clone(), head.version, head.framing);
        let refused_connect = method == Method::CONNECT;
        // A refused request is answered, as any, once its body was read.
        let routed = match refused_connect {
            true => Err(RelayError::MethodNotAllowed("CONNECT".into())),
            false => routes.route(&head, last_route),
        };
        let (routed, uri) = match routed {
            Ok((dest, authority, uri)) => (Ok((dest, authority)), uri),
            Err(e) => (Err(e), head.target.parse().unwrap_or_default()),
        };
        let relay = &self.relay;
        // Set by the upstream as the request goes on a connection: until then a client that
        // closes its connection drops it (waiting in the queue or for a connect).
        let committed = Committed::default();
        let sent = &committed;
        let respond = |request| async move {
            match routed {
                Ok((dest, authority)) => relay.forward(ctx, sent, dest, authority, request).await,
                Err(e) => relay.refuse(ctx, request, e).await,
            }
        };
        let mut request = Request::new(());
        *request.method_mut() = head.method;
        *request.uri_mut() = uri;
        *request.version_mut() = head.version;
        *request.headers_mut() = head.headers;
        let watch_limit = self.max_header_bytes;

        let direct_length = match framing {
            Framing::Empty => Some(0),
            Framing::Length(n) if !head.expect_continue => Some(n),
            _ => None,
        };
        let (response, fed) = match direct_length {
            // The common case: the pipeline reads the body straight from the connection as it
            // sends it upstream, so a slow origin slows the client down; no channel, no select.
            // Once the body is read, the connection is watched for the client closing it.
            Some(left) => {
                // Shared within this one task (atomics and a lock never contended: the futures
                // need `Send`).
                let left = AtomicU64::new(left);
                let shared = Mutex::new(&mut *reader);
                let body = RequestBody::Direct(DirectBody {
                    reader: &shared,
                    left: &left,
                    broken: false,
                });
                let gone = poll_fn(|cx| {
                    if left.load(Ordering::Relaxed) > 0 {
                        // Still being read by the pipeline, which wakes the task as it reads.
                        return Poll::Pending;
                    }
                    match shared.try_lock() {
                        Ok(mut reader) => reader.poll_closed(cx, watch_limit),
                        Err(_) => Poll::Pending,
                    }
                });
                let response =
                    unless_client_left(respond(request.map(|()| body)), gone, &committed).await;
                (response, left.load(Ordering::Relaxed) == 0)
            }
            // Chunked, or `Expect: 100-continue` (`100 Continue` only once the relay wants the
            // body): fed from the connection through a small channel.
            None => {
                let (tx, wanted_rx, body) = ChannelBody::new(framing);
                let request = request.map(|()| RequestBody::<R>::Channel(body));
                let fed = AtomicBool::new(false);
                // Feeds the body, then watches the connection for the client closing it.
                let feed_then_watch = async {
                    let ok = feed_body(
                        &mut *reader,
                        &mut *writer,
                        framing,
                        self.max_request_body,
                        head.expect_continue,
                        tx,
                        wanted_rx,
                    )
                    .await;
                    fed.store(ok, Ordering::Relaxed);
                    if !ok {
                        return std::future::pending().await;
                    }
                    poll_fn(|cx| reader.poll_closed(cx, watch_limit)).await
                };
                let response =
                    unless_client_left(respond(request), feed_then_watch, &committed).await;
                (response, fed.load(Ordering::Relaxed))
            }
        };
        let Some(response) = response else {
            tracing::debug!(listener = %ctx.listener, client.addr = %ctx.client, sent = committed.is_set(), "client closed its connection while its request was handled");
            return Outcome::Close(Why::ClientGone);
        };
        // A body not read to its end (early answer, or a broken body) leaves the connection's
        // framing unknown.
        // After a refused CONNECT, whatever follows is taken for tunnel bytes by its sender.
        let outcome = Outcome::of_request(client_keep_alive, shutting_down, fed)
            .unless(!refused_connect, Why::RefusedConnect);
        let written = write_response(writer, routes.mark(response), &method, version, outcome);
        match timeout(self.write_timeout, written).await {
            Ok(outcome) => outcome,
            Err(_) => {
                tracing::info!(listener = %ctx.listener, client.addr = %ctx.client, write_timeout = ?self.write_timeout, "client did not read its answer in time; closing");
                Outcome::Close(Why::AnswerIncomplete)
            }
        }
    }
}

/// Runs `forward` (the pipeline) until its answer, unless `gone` (the client closed its
/// connection) comes first: then a request not yet `committed` upstream is dropped, never sent,
/// and one already sent runs to its end (a cancel would not take the push back); either way
/// there is no one to answer (`None`).
async fn unless_client_left<F, G>(forward: F, gone: G, committed: &Committed) -> Option<F::Output>
where
    F: Future,
    G: Future<Output = ()>,
{
    let mut forward = pin!(forward);
    tokio::select! {
        // The pipeline first: the poll that reads the body's last bytes lets `gone` start
        // watching in the same round.
        biased;
        response = forward.as_mut() => Some(response),
        () = gone => {
            if committed.is_set() {
                let _ = forward.await;
            }
            None
        }
    }
}

/// Reads the client's body into the channel; answers `100 Continue` first when the client asked
/// and the relay wants the body. `true` when the body was read to its end.
async fn feed_body<R, W>(
    reader: &mut Reader<R>,
    writer: &mut W,
    framing: Framing,
    limit: u64,
    expect_continue: bool,
    tx: mpsc::Sender<Result<Bytes, BoxError>>,
    wanted: oneshot::Receiver<()>,
) -> bool
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    if framing == Framing::Empty {
        return true;
    }
    if expect_continue {
        if wanted.await.is_err() {
            return false;
        }
        if writer
            .write_all(b"HTTP/1.1 100 Continue\r\n\r\n")
            .await
            .is_err()
            || writer.flush().await.is_err()
        {
            return false;
        }
    }
    let result: Result<(), ReadError> = async {
        match framing {
            Framing::Empty => Ok(()),
            Framing::Length(mut left) => {
                while left > 0 {
                    let data = reader.read_some(left).await?;
                    left -= data.len() as u64;
                    if tx.send(Ok(data)).await.is_err() {
                        return Err(ReadError::Closed);
                    }
                }
                Ok(())
            }
            Framing::Chunked => {
                let mut state = ChunkState::new(limit);
                while let Some(data) = reader.read_chunk(&mut state).await? {
                    if !data.is_empty() && tx.send(Ok(data)).await.is_err() {
                        return Err(ReadError::Closed);
                    }
                }
                Ok(())
            }
        }
    }
    .await;
    match result {
        Ok(()) => true,
        Err(e) => {
            // A chunk size over the limit is the pipeline's 413, as an overlong body would be.
            let e: BoxError = match e {
                ReadError::Http(http1::Http1Error::BodyTooLarge(limit)) => {
                    Box::new(crate::error::ReadError::TooLarge {
                        limit: usize::try_from(limit).unwrap_or(usize::MAX),
                    })
                }
                e => Box::new(e),
            };
            let _ = tx.send(Err(e)).await;
            false
        }
    }
}

/// The client's body as the pipeline reads it.
enum RequestBody<'a, 'r, IO> {
    Direct(DirectBody<'a, 'r, IO>),
    Channel(ChannelBody),
}

impl<IO: AsyncRead + Unpin> Body for RequestBody<'_, '_, IO> {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self.get_mut() {
            RequestBody::Direct(b) => b.poll_frame(cx),
            RequestBody::Channel(b) => Pin::new(b).poll_frame(cx),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            RequestBody::Direct(b) => b.broken || b.left.load(Ordering::Relaxed) == 0,
            RequestBody::Channel(b) => b.is_end_stream(),
        }
    }
}

/// A `Content-Length` body (no `Expect`) read straight from the connection when the pipeline
/// polls it. `left` stays above zero unless the body was read to its end; a body that breaks off
/// yields an `Err` frame, so it is never sent upstream as complete. The reader is shared with
/// the watch for the client closing the connection, which reads only once the body is done.
struct DirectBody<'a, 'r, IO> {
    reader: &'a Mutex<&'r mut Reader<IO>>,
    left: &'a AtomicU64,
    broken: bool,
}

impl<IO: AsyncRead + Unpin> DirectBody<'_, '_, IO> {
    fn poll_frame(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let left = self.left.load(Ordering::Relaxed);
        if self.broken || left == 0 {
            return Poll::Ready(None);
        }
        // Never borrowed across a poll: the watch reads only once the body is done.
        let Ok(mut reader) = self.reader.try_lock() else {
            return Poll::Pending;
        };
        match ready!(reader.poll_read_some(cx, left)) {
            Ok(data) => {
                self.left.store(left - data.len() as u64, Ordering::Relaxed);
                Poll::Ready(Some(Ok(Frame::data(data))))
            }
            Err(e) => {
                self.broken = true;
                Poll::Ready(Some(Err(Box::new(e))))
            }
        }
    }
}

/// The client's body as the pipeline reads it, fed by `feed_body` through a small channel, so a
/// slow origin slows the client down instead of filling memory.
pub struct ChannelBody {
    rx: mpsc::Receiver<Result<Bytes, BoxError>>,
    wanted: Option<oneshot::Sender<()>>,
    remaining: Option<u64>,
    ended: bool,
}

impl ChannelBody {
    fn new(
        framing: Framing,
    ) -> (
        mpsc::Sender<Result<Bytes, BoxError>>,
        oneshot::Receiver<()>,
        Self,
    ) {
        let (tx, rx) = mpsc::channel(2);
        let (wanted_tx, wanted_rx) = oneshot::channel();
        let remaining = match framing {
            Framing::Empty => Some(0),
            Framing::Length(n) => Some(n),
            Framing::Chunked => None,
        };
        let body = ChannelBody {
            rx,
            wanted: Some(wanted_tx),
            remaining,
            ended: framing == Framing::Empty,
        };
        (tx, wanted_rx, body)
    }
}

impl Body for ChannelBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        if let Some(wanted) = this.wanted.take() {
            let _ = wanted.send(());
        }
        if this.ended {
            return Poll::Ready(None);
        }
        match this.rx.poll_recv(cx) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(Some(Ok(data))) => {
                if let Some(left) = this.remaining.as_mut() {
                    *left = left.saturating_sub(data.len() as u64);
                }
                Poll::Ready(Some(Ok(Frame::data(data))))
            }
            Poll::Ready(Some(Err(e))) => {
                this.ended = true;
                Poll::Ready(Some(Err(e)))
            }
            Poll::Ready(None) => {
                this.ended = true;
                Poll::Ready(None)
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.ended || self.remaining == Some(0)
    }
}

/// Writes an answer with HTTP/1.1 framing: `Content-Length` when known, chunked otherwise (close-
/// delimited for HTTP/1.0 clients). `Ok(false)`: the body broke off and the connection must close.
async fn write_response<W>(
    writer: &mut W,
    response: Response<RelayBody>,
    method: &Method,
    version: Version,
    outcome: Outcome,
) -> Outcome
where
    W: AsyncWrite + Unpin,
{
    match write_answer(writer, response, method, version, outcome).await {
        Ok(outcome) => outcome,
        Err(_) => Outcome::Close(Why::AnswerIncomplete),
    }
}

/// Writes the answer; the outcome as it stands once the answer is out.
async fn write_answer<W>(
    writer: &mut W,
    response: Response<RelayBody>,
    method: &Method,
    version: Version,
    outcome: Outcome,
) -> std::io::Result<Outcome>
where
    W: AsyncWrite + Unpin,
{
    let (parts, mut body) = response.into_parts();
    let status = parts.status;
    let mut headers: HeaderMap = parts.headers;
    let no_body = method == Method::HEAD
        || status.is_informational()
        || status == StatusCode::NO_CONTENT
        || status == StatusCode::NOT_MODIFIED;
    let mut length = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    // Answers are read whole: their size is known even without the header (trailers need
    // chunked framing).
    if length.is_none() && !no_body && !body.has_trailers() {
        length = Some(body.len() as u64);
        headers.insert(header::CONTENT_LENGTH, http::HeaderValue::from(body.len()));
    }
    let chunked = !no_body && length.is_none() && version == Version::HTTP_11;
    // HTTP/1.0 without a length: the end of the body is the end of the connection.
    let outcome = outcome.unless(
        no_body || length.is_some() || chunked,
        Why::AnswerUntilClose,
    );
    writer
        .write_all(&http1::response_head(
            status,
            &headers,
            outcome.keep_alive(),
            chunked,
        ))
        .await?;
    if no_body {
        writer.flush().await?;
        return Ok(outcome);
    }
    let mut written = 0u64;
    loop {
        match poll_fn(|cx| Pin::new(&mut body).poll_frame(cx)).await {
            None => break,
            Some(Ok(frame)) => {
                if let Ok(data) = frame.into_data() {
                    written += data.len() as u64;
                    if chunked {
                        http1::write_chunk(writer, &data).await?;
                    } else {
                        writer.write_all(&data).await?;
                    }
                }
            }
            Some(Err(e)) => {
                tracing::info!(error = %e, "origin's answer body broke off; closing the client connection");
                writer.flush().await?;
                return Ok(Outcome::Close(Why::AnswerIncomplete));
            }
        }
    }
    if chunked {
        writer.write_all(b"0\r\n\r\n").await?;
    }
    writer.flush().await?;
    Ok(outcome.unless(length.is_none_or(|n| n == written), Why::AnswerIncomplete))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_connection_carries_on_only_when_nothing_says_close_and_keeps_the_first_reason() {
        let keep = Outcome::of_request(true, false, true);
        assert_eq!(keep, Outcome::KeepAlive);
        #[rustfmt::skip]
        let table = [
            (Outcome::of_request(false, true, false), Outcome::Close(Why::ClientAsked)),
            (Outcome::of_request(true, true, false), Outcome::Close(Why::ShuttingDown)),
            (Outcome::of_request(true, false, false), Outcome::Close(Why::BodyUnread)),
            (keep.unless(true, Why::AnswerIncomplete), Outcome::KeepAlive),
            (keep.unless(false, Why::AnswerUntilClose), Outcome::Close(Why::AnswerUntilClose)),
            (Outcome::Close(Why::BodyUnread).unless(false, Why::AnswerIncomplete), Outcome::Close(Why::BodyUnread)),
        ];
        for (got, expected) in table {
            assert_eq!(got, expected);
            assert_eq!(got.keep_alive(), expected == Outcome::KeepAlive);
        }
    }
}
