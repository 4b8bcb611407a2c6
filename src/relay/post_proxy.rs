//! The post-proxy front door: a legacy corporate proxy that speaks only HTTP/1.1 hands requests to
//! pushrelay (plain, or TLS with optional client certificates), and each is relayed as HTTP/2 by
//! the shared pipeline. The destination comes from the absolute-form target or `Host` (a port
//! written there wins, else the listener's `upstream_port`); `CONNECT` is refused, so this door can
//! never tunnel anywhere. Requests on a connection are answered in order (pipelining); a request
//! whose body is not fully read, or whose framing is in doubt, ends the connection.

use std::future::poll_fn;
use std::net::SocketAddr;
use std::pin::{Pin, pin};
use std::sync::Arc;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Method, Request, Response, StatusCode, Uri, Version, header};
use http_body::{Body, Frame};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, BufWriter};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot};
use tokio::time::{Instant, sleep, timeout};
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;

use super::body::RelayBody;
use super::door::{Commit, Door, Serving, listener_at};
use super::headers::named_host;
use super::http1::{self, ChunkState, Framing, ReadError, Reader, RequestHead};
use super::{Ctx, Relay};
use crate::config::{ListenerConfig, ServerTls, ValidConfig};
use crate::error::{RelayError, relay_response};
use crate::policy::Authority;
use crate::swap::Swap;
use crate::tls::{self, TlsSetupError};
use crate::upstream::BoxError;

/// Where a request naming `named` (its host as written, port included) goes.
struct Route {
    named: Box<str>,
    dest: Authority,
    authority: http::uri::Authority,
}

pub struct PostProxy {
    /// Its listener's place in `listeners`, to find it in a reloaded configuration.
    index: usize,
    name: Arc<str>,
    acceptor: Arc<Swap<Option<TlsAcceptor>>>,
    upstream_port: u16,
    relay: Arc<Relay>,
    max_header_bytes: usize,
    idle_timeout: Duration,
    head_timeout: Duration,
}

/// What is left of a connection after one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Next {
    KeepAlive,
    Close,
}

impl Door for PostProxy {
    fn serve(
        self: Arc<Self>,
        stream: TcpStream,
        peer: SocketAddr,
        shutdown: CancellationToken,
    ) -> Serving {
        Box::pin(self.serve_connection(stream, peer, shutdown))
    }

    fn reload(&self, config: &ValidConfig) -> Result<Commit, TlsSetupError> {
        let listener = listener_at(config, self.index)?;
        let tls = config.listener_tls(self.index);
        let acceptor = Self::tls_for(self.index, listener, tls, &self.relay)?;
        let swap = self.acceptor.clone();
        Ok(Box::new(move || swap.store(acceptor)))
    }
}

impl PostProxy {
    /// The TLS acceptor for `listener`, if it has `tls`: one certificate whatever the SNI.
    pub fn tls_for(
        index: usize,
        listener: &ListenerConfig,
        tls: Option<&ServerTls>,
        relay: &Relay,
    ) -> Result<Option<TlsAcceptor>, TlsSetupError> {
        let Some(t) = tls else {
            return Ok(None);
        };
        let mut names = vec!["localhost".to_owned()];
        if !listener.bind.ip().is_unspecified() {
            names.push(listener.bind.ip().to_string());
        }
        let key = format!("listeners[{index}].tls");
        let (config, expiries) = tls::server::build(t, tls::server::Names::Any(&names), &key)?;
        relay.metrics().certificates(&listener.name, &expiries);
        Ok(Some(TlsAcceptor::from(config)))
    }

    pub fn new(
        index: usize,
        listener: &ListenerConfig,
        config: &ValidConfig,
        relay: Arc<Relay>,
    ) -> Result<Self, TlsSetupError> {
        let acceptor = Self::tls_for(index, listener, config.listener_tls(index), &relay)?;
        Ok(PostProxy {
            index,
            name: listener.name.as_str().into(),
            acceptor: Arc::new(Swap::new(acceptor)),
            upstream_port: listener.upstream_port,
            relay,
            max_header_bytes: config.limits.max_header_bytes,
            idle_timeout: config.limits.idle_timeout,
            head_timeout: config.limits.handshake_timeout,
        })
    }

    async fn serve_connection(
        self: Arc<Self>,
        stream: TcpStream,
        peer: SocketAddr,
        shutdown: CancellationToken,
    ) {
        let ctx = Ctx {
            listener: self.name.clone(),
            client: peer,
        };
        match self.acceptor.load().as_ref() {
            None => self.serve_http(stream, &ctx, &shutdown).await,
            Some(acceptor) => match timeout(self.head_timeout, acceptor.accept(stream)).await {
                Ok(Ok(tls_stream)) => self.serve_http(tls_stream, &ctx, &shutdown).await,
                Ok(Err(e)) => {
                    self.relay.metrics().tls_failure("client");
                    tracing::info!(listener = %self.name, client.addr = %peer, error = %e, "client TLS handshake failed")
                }
                Err(_) => {
                    self.relay.metrics().tls_failure("client");
                    tracing::info!(listener = %self.name, client.addr = %peer, "client TLS handshake timed out")
                }
            },
        }
    }

    async fn serve_http<IO>(&self, io: IO, ctx: &Ctx, shutdown: &CancellationToken)
    where
        IO: AsyncRead + AsyncWrite + Unpin,
    {
        let (rd, wr) = tokio::io::split(io);
        let mut reader = Reader::new(rd);
        let mut writer = BufWriter::new(wr);
        let mut cancelled = pin!(shutdown.cancelled());
        // One idle timer per connection, moved on only when it fires: a fresh timer per request
        // costs a timer-wheel insertion and removal every time.
        let mut idle = pin!(sleep(self.idle_timeout));
        let mut last_route = None;
        loop {
            if !reader.has_buffered() {
                if writer.flush().await.is_err() {
                    return;
                }
                let deadline = Instant::now() + self.idle_timeout;
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
                        &self.name,
                        &Arc::from(""),
                        e.status().as_u16(),
                        Duration::ZERO,
                    );
                    tracing::info!(listener = %self.name, client.addr = %ctx.client, status = e.status().as_u16(), error = %e, "refused request head");
                    let _ = write_response(
                        &mut writer,
                        relay_response(e.status(), e.reason()),
                        &Method::GET,
                        Version::HTTP_11,
                        false,
                    )
                    .await;
                    break;
                }
                Ok(Err(_)) => break,
                Err(_) => {
                    let response =
                        relay_response(StatusCode::REQUEST_TIMEOUT, "RelayRequestTimeout");
                    let _ = write_response(
                        &mut writer,
                        response,
                        &Method::GET,
                        Version::HTTP_11,
                        false,
                    )
                    .await;
                    break;
                }
            };
            if self
                .exchange(
                    &mut reader,
                    &mut writer,
                    head,
                    &mut last_route,
                    ctx,
                    shutdown,
                )
                .await
                == Next::Close
            {
                break;
            }
        }
        let _ = writer.flush().await;
        let _ = writer.shutdown().await;
    }

    /// The destination, the `:authority` to send, and the target as a URI. `last` is this
    /// connection's previous route: its requests usually name the same host, which then needs
    /// no new `Authority`.
    fn route(
        &self,
        head: &RequestHead,
        last: &mut Option<Route>,
    ) -> Result<(Authority, http::uri::Authority, Uri), RelayError> {
        if head.method == Method::CONNECT {
            return Err(RelayError::MethodNotAllowed("CONNECT".into()));
        }
        let uri: Uri = head.target.parse().map_err(|_| {
            RelayError::BadRequest(format!("invalid request target {:?}", head.target))
        })?;
        match uri.scheme_str() {
            None if head.target.starts_with('/') => {}
            Some(s) if s.eq_ignore_ascii_case("http") || s.eq_ignore_ascii_case("https") => {}
            _ => {
                return Err(RelayError::BadRequest(format!(
                    "unsupported request target {:?}",
                    head.target
                )));
            }
        }
        if head.version == Version::HTTP_11 && !head.headers.contains_key(header::HOST) {
            return Err(RelayError::BadRequest(
                "HTTP/1.1 request without Host".into(),
            ));
        }
        let named = named_host(&uri, &head.headers)?;
        if let Some(route) = last.as_ref().filter(|r| *r.named == *named.raw) {
            return Ok((route.dest.clone(), route.authority.clone(), uri));
        }
        let port = named.port.unwrap_or(self.upstream_port);
        let dest =
            Authority::new(&named.host, port).map_err(|e| RelayError::BadRequest(e.to_string()))?;
        let authority = match named.port {
            Some(_) => http::uri::Authority::try_from(dest.to_string()),
            None => http::uri::Authority::try_from(named.host.as_ref()),
        }
        .map_err(|e| RelayError::BadRequest(format!("invalid host: {e}")))?;
        *last = Some(Route {
            named: named.raw.into(),
            dest: dest.clone(),
            authority: authority.clone(),
        });
        Ok((dest, authority, uri))
    }

    async fn exchange<R, W>(
        &self,
        reader: &mut Reader<R>,
        writer: &mut W,
        head: RequestHead,
        last_route: &mut Option<Route>,
        ctx: &Ctx,
        shutdown: &CancellationToken,
    ) -> Next
    where
        R: AsyncRead + Unpin,
        W: AsyncWrite + Unpin,
    {
        let mut keep_alive = head.keep_alive && !shutdown.is_cancelled();
        let (method, version, framing) = (head.method.clone(), head.version, head.framing);
        let (dest, authority, uri) = match self.route(&head, last_route) {
            Ok(r) => r,
            Err(e) => {
                let path = super::loggable_path(head.target.as_str()).into_owned();
                self.relay
                    .record_failure(ctx, &method, None, &path, &e, Duration::ZERO);
                // An unread body would be taken for the next request: close instead.
                let keep = keep_alive && framing == Framing::Empty;
                return finish(
                    write_response(writer, e.to_response(), &method, version, keep).await,
                    keep,
                );
            }
        };
        let mut request = Request::new(());
        *request.method_mut() = head.method;
        *request.uri_mut() = uri;
        *request.version_mut() = head.version;
        *request.headers_mut() = head.headers;

        let direct_length = match framing {
            Framing::Empty => Some(0),
            Framing::Length(n) if !head.expect_continue => Some(n),
            _ => None,
        };
        let (response, fed) = match direct_length {
            // The common case: the pipeline reads the body straight from the connection as it
            // sends it upstream, so a slow origin slows the client down; no channel, no select.
            Some(mut left) => {
                let body = RequestBody::Direct(DirectBody {
                    reader: &mut *reader,
                    left: &mut left,
                    broken: false,
                });
                let request = request.map(|()| body);
                let response = self.relay.forward(ctx, dest, authority, request).await;
                (response, left == 0)
            }
            // Chunked, or `Expect: 100-continue` (`100 Continue` only once the relay wants the
            // body): fed from the connection through a small channel.
            None => {
                let (tx, wanted_rx, body) = ChannelBody::new(framing);
                let request = request.map(|()| RequestBody::<R>::Channel(body));
                let mut forward = pin!(self.relay.forward(ctx, dest, authority, request));
                let mut feed = pin!(feed_body(
                    reader,
                    writer,
                    framing,
                    head.expect_continue,
                    tx,
                    wanted_rx
                ));
                let mut fed = false;
                let mut feeding = true;
                let response = loop {
                    tokio::select! {
                        response = forward.as_mut() => break response,
                        ok = feed.as_mut(), if feeding => {
                            feeding = false;
                            fed = ok;
                        }
                    }
                };
                (response, fed)
            }
        };
        // A body not read to its end (early answer, or a broken body) leaves the connection's
        // framing unknown.
        if !fed {
            keep_alive = false;
        }
        finish(
            write_response(writer, response, &method, version, keep_alive).await,
            keep_alive,
        )
    }
}

fn finish(written: std::io::Result<bool>, keep_alive: bool) -> Next {
    match written {
        Ok(true) if keep_alive => Next::KeepAlive,
        _ => Next::Close,
    }
}

/// Reads the client's body into the channel; answers `100 Continue` first when the client asked
/// and the relay wants the body. `true` when the body was read to its end.
async fn feed_body<R, W>(
    reader: &mut Reader<R>,
    writer: &mut W,
    framing: Framing,
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
                let mut state = ChunkState::Size;
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
            let _ = tx.send(Err(Box::new(e))).await;
            false
        }
    }
}

/// The client's body as the pipeline reads it.
enum RequestBody<'a, IO> {
    Direct(DirectBody<'a, IO>),
    Channel(ChannelBody),
}

impl<IO: AsyncRead + Unpin> Body for RequestBody<'_, IO> {
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
            RequestBody::Direct(b) => b.broken || *b.left == 0,
            RequestBody::Channel(b) => b.is_end_stream(),
        }
    }
}

/// A `Content-Length` body (no `Expect`) read straight from the connection when the pipeline
/// polls it. `left` stays above zero unless the body was read to its end; a body that breaks off
/// yields an `Err` frame, so it is never sent upstream as complete.
struct DirectBody<'a, IO> {
    reader: &'a mut Reader<IO>,
    left: &'a mut u64,
    broken: bool,
}

impl<IO: AsyncRead + Unpin> DirectBody<'_, IO> {
    fn poll_frame(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        if self.broken || *self.left == 0 {
            return Poll::Ready(None);
        }
        match ready!(self.reader.poll_read_some(cx, *self.left)) {
            Ok(data) => {
                *self.left -= data.len() as u64;
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
    keep_alive: bool,
) -> std::io::Result<bool>
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
    // Our own answers know their size even without the header.
    if length.is_none() && !no_body && body.is_end_stream() {
        length = Some(0);
        headers.insert(header::CONTENT_LENGTH, http::HeaderValue::from_static("0"));
    }
    if let (None, RelayBody::Full(Some(bytes))) = (length, &body) {
        length = Some(bytes.len() as u64);
        headers.insert(header::CONTENT_LENGTH, http::HeaderValue::from(bytes.len()));
    }
    let mut keep_alive = keep_alive;
    let chunked = !no_body && length.is_none() && version == Version::HTTP_11;
    if !no_body && length.is_none() && !chunked {
        // HTTP/1.0 without a length: the end of the body is the end of the connection.
        keep_alive = false;
    }
    writer
        .write_all(&http1::response_head(status, &headers, keep_alive, chunked))
        .await?;
    if no_body {
        writer.flush().await?;
        return Ok(true);
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
                return Ok(false);
            }
        }
    }
    if chunked {
        writer.write_all(b"0\r\n\r\n").await?;
    }
    writer.flush().await?;
    Ok(length.is_none_or(|n| n == written) && keep_alive)
}
