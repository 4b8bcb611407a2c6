//! HTTP/2 clients served with the `h2` server API directly. Every stream of a connection is
//! answered inside the connection's own task (no task per request): a burst of pushes is decoded,
//! handed upstream and answered with one wake-up and, through `Coalesce`, one TLS record and one
//! write, where a task per stream would cost a spawn, a wake-up and a write each.
//!
//! Also here: telling an HTTP/2 client that sent no ALPN from an HTTP/1.1 one, by its preface.

use std::future::{Future, poll_fn};
use std::io;
use std::pin::{Pin, pin};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Buf, Bytes};
use futures_util::StreamExt;
use futures_util::stream::FuturesUnordered;
use h2::RecvStream;
use h2::server::SendResponse;
use http::{Request, Response};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};
use tokio::time::{Instant, sleep, timeout};
use tokio_util::sync::CancellationToken;

use super::body::RelayBody;
use crate::coalesce::Coalesce;
pub use crate::upstream::Committed;
use crate::upstream::send_flow_controlled;

/// HTTP/2 streams a client may have open at once on one connection, announced as
/// SETTINGS_MAX_CONCURRENT_STREAMS, and the same number of its requests upstream at once (a stream
/// the client reset whose request already went upstream keeps its place until it finishes). As
/// nghttpx and HAProxy (100): one connection cannot take the shared upstream's streams from the
/// others, and the pushes of a busy client still fit a few connections.
pub const CLIENT_MAX_STREAMS: u32 = 128;
/// Receive windows towards clients: a push (≤ 5 KiB) never waits for credit.
const STREAM_WINDOW: u32 = 1024 * 1024;
const CONNECTION_WINDOW: u32 = 1024 * 1024;
/// Client resets (RST_STREAM) a connection may send in a burst, and per second after that,
/// before it is closed with GOAWAY ENHANCE_YOUR_CALM: cancelling every open stream at once is
/// allowed, a flood of open-then-reset (CVE-2023-44487) is not.
const RESET_BURST: f64 = CLIENT_MAX_STREAMS as f64;
const RESETS_PER_SECOND: f64 = 10.0;

/// The connection preface every HTTP/2 client sends first (RFC 9113 §3.4).
const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

#[derive(Debug, Clone)]
pub struct Settings {
    pub max_header_list_size: u32,
    /// Bound on the client's preface and SETTINGS.
    pub handshake_timeout: Duration,
    /// A connection with no stream open for this long is closed with GOAWAY.
    pub idle_timeout: Duration,
    /// Bound on sending one answer's body as the client's flow-control window allows.
    pub write_timeout: Duration,
}

/// Why a connection ended early.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("HTTP/2 handshake timed out after {0:?}")]
    HandshakeTimeout(Duration),
    #[error(transparent)]
    H2(#[from] h2::Error),
}

/// How one stream ended.
enum Ended {
    Answered,
    /// The client reset the stream before its answer.
    ClientReset,
}

/// The client's reset budget: a token bucket.
struct ResetBudget {
    tokens: f64,
    last: Instant,
}

impl ResetBudget {
    fn new() -> Self {
        ResetBudget {
            tokens: RESET_BURST,
            last: Instant::now(),
        }
    }

    /// Takes one reset; `false` once the client has used up its budget.
    fn take(&mut self) -> bool {
        let now = Instant::now();
        let refill = now.duration_since(self.last).as_secs_f64() * RESETS_PER_SECOND;
        self.tokens = (self.tokens + refill).min(RESET_BURST);
        self.last = now;
        self.tokens -= 1.0;
        self.tokens >= 0.0
    }
}

/// Serves one HTTP/2 connection until the client closes it, or until `shutdown` or
/// `idle_timeout` without an open stream (then GOAWAY, and the streams in flight finish).
/// `handle` answers each request; a request it has marked `Committed` (sent upstream) runs to its
/// end even when the client resets it or goes away, and its answer is dropped.
pub async fn serve<IO, H, F>(
    io: IO,
    settings: &Settings,
    shutdown: &CancellationToken,
    handle: H,
) -> Result<(), ServeError>
where
    IO: AsyncRead + AsyncWrite + Unpin,
    H: Fn(Request<RecvStream>, Committed) -> F,
    F: Future<Output = Response<RelayBody>>,
{
    let handshake = h2::server::Builder::new()
        .max_concurrent_streams(CLIENT_MAX_STREAMS)
        .max_header_list_size(settings.max_header_list_size)
        .initial_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
        .handshake::<_, Bytes>(Coalesce::new(io));
    let mut conn = timeout(settings.handshake_timeout, handshake)
        .await
        .map_err(|_| ServeError::HandshakeTimeout(settings.handshake_timeout))??;
    let mut streams = FuturesUnordered::new();
    let mut draining = false;
    let mut resets = ResetBudget::new();
    // One timer, moved on only when it fires: resetting it whenever the last stream ends would
    // cost a timer-wheel update per burst of pushes. `idle_until` is the real deadline.
    let mut idle_until = Instant::now() + settings.idle_timeout;
    let mut idle = pin!(sleep(settings.idle_timeout));
    let ended = loop {
        tokio::select! {
            next = conn.accept() => match next {
                Some(Ok((request, respond))) => {
                    let committed = Committed::default();
                    // The request's future is built inside `answer`, in its boxed state: built
                    // here and handed over, a future of several KiB would be copied on each move.
                    let answer = answer(&handle, request, respond, committed, settings.write_timeout);
                    streams.push(Box::pin(answer));
                }
                Some(Err(e)) => break Err(e.into()),
                None => break Ok(()),
            },
            Some(ended) = streams.next(), if !streams.is_empty() => {
                if matches!(ended, Ended::ClientReset) && !resets.take() && !draining {
                    tracing::warn!(resets_per_second = RESETS_PER_SECOND, "HTTP/2 client resets streams faster than allowed; closing with GOAWAY ENHANCE_YOUR_CALM");
                    draining = true;
                    conn.abrupt_shutdown(h2::Reason::ENHANCE_YOUR_CALM);
                }
                if streams.is_empty() {
                    idle_until = Instant::now() + settings.idle_timeout;
                }
            }
            _ = idle.as_mut(), if streams.is_empty() && !draining => {
                if idle.deadline() >= idle_until {
                    tracing::debug!(idle_timeout = ?settings.idle_timeout, "HTTP/2 client connection idle; sending GOAWAY");
                    draining = true;
                    conn.graceful_shutdown();
                } else {
                    idle.as_mut().reset(idle_until);
                }
            }
            _ = shutdown.cancelled(), if !draining => {
                draining = true;
                conn.graceful_shutdown();
            }
        }
    };
    // The client is gone: requests not yet upstream end at once (their bodies fail), those
    // already upstream finish there instead of being reset towards the origin in a burst. Each
    // is bounded by the request timeout.
    drop(conn);
    while streams.next().await.is_some() {}
    ended
}

/// Waits for `handle`'s answer to `request` and sends it on the stream. A client that resets the
/// stream before its request went upstream stops the work; after that, the request finishes
/// upstream and its answer is dropped.
async fn answer<H, F>(
    handle: &H,
    request: Request<RecvStream>,
    mut respond: SendResponse<Bytes>,
    committed: Committed,
    write_timeout: Duration,
) -> Ended
where
    H: Fn(Request<RecvStream>, Committed) -> F,
    F: Future<Output = Response<RelayBody>>,
{
    let response = {
        let mut handle = pin!(handle(request, committed.clone()));
        tokio::select! {
            biased;
            reset = poll_fn(|cx| respond.poll_reset(cx)) => {
                if committed.is_set() {
                    let _ = handle.as_mut().await;
                }
                return match reset {
                    Ok(_) => Ended::ClientReset,
                    Err(_) => Ended::Answered,
                };
            }
            response = handle.as_mut() => response,
        }
    };
    let (parts, body) = response.into_parts();
    let (data, trailers) = body.into_parts();
    let end = data.is_none() && trailers.is_none();
    let Ok(mut send) = respond.send_response(Response::from_parts(parts, ()), end) else {
        return Ended::Answered;
    };
    if let Some(data) = data {
        let last = trailers.is_none();
        match timeout(write_timeout, send_flow_controlled(&mut send, data, last)).await {
            Ok(Ok(())) => {}
            Ok(Err(_)) => return Ended::Answered,
            Err(_) => {
                tracing::info!(write_timeout = ?write_timeout, "HTTP/2 client did not read its answer in time; resetting the stream");
                send.send_reset(h2::Reason::CANCEL);
                return Ended::Answered;
            }
        }
    }
    if let Some(trailers) = trailers {
        let _ = send.send_trailers(trailers);
    }
    Ended::Answered
}

/// Reads until the bytes seen either are the HTTP/2 preface or cannot be, and returns the stream
/// with those bytes put back. `true`: the client speaks HTTP/2.
pub async fn sniff_preface<IO>(mut io: IO) -> io::Result<(bool, Rewind<IO>)>
where
    IO: AsyncRead + Unpin,
{
    let mut seen = Vec::with_capacity(PREFACE.len());
    while seen.len() < PREFACE.len() && PREFACE.starts_with(&seen) {
        let mut byte = [0u8; PREFACE.len()];
        let want = PREFACE.len() - seen.len();
        let n = io.read(&mut byte[..want]).await?;
        if n == 0 {
            break;
        }
        seen.extend_from_slice(&byte[..n]);
    }
    let h2 = seen.as_slice() == PREFACE;
    Ok((
        h2,
        Rewind {
            prefix: Bytes::from(seen),
            io,
        },
    ))
}

/// A stream whose first bytes, already read, are served again before the rest.
pub struct Rewind<IO> {
    prefix: Bytes,
    io: IO,
}

impl<IO> Rewind<IO> {
    /// `io` with `prefix` (bytes already read from it) served first.
    pub fn new(prefix: Bytes, io: IO) -> Self {
        Rewind { prefix, io }
    }

    pub fn get_ref(&self) -> &IO {
        &self.io
    }
}

impl<IO: AsyncRead + Unpin> AsyncRead for Rewind<IO> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if !self.prefix.is_empty() {
            let n = self.prefix.len().min(buf.remaining());
            buf.put_slice(&self.prefix[..n]);
            self.prefix.advance(n);
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for Rewind<IO> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, data)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;

    async fn sniff(sent: &[u8]) -> (bool, Vec<u8>) {
        let (mut a, b) = tokio::io::duplex(1024);
        a.write_all(sent).await.unwrap();
        drop(a);
        let (h2, mut rewound) = sniff_preface(b).await.unwrap();
        let mut all = Vec::new();
        rewound.read_to_end(&mut all).await.unwrap();
        (h2, all)
    }

    #[tokio::test]
    async fn the_preface_means_http2_and_every_byte_is_read_again() {
        let mut sent = PREFACE.to_vec();
        sent.extend_from_slice(b"\x00\x00\x00\x04\x00\x00\x00\x00\x00");
        assert_eq!(sniff(&sent).await, (true, sent.clone()));
    }

    #[tokio::test]
    async fn an_http1_request_is_told_apart_at_its_first_byte_and_kept_whole() {
        let sent = b"POST /3/device/abc HTTP/1.1\r\nHost: x\r\n\r\n".to_vec();
        assert_eq!(sniff(&sent).await, (false, sent.clone()));
        // Sharing the preface's first bytes is not enough.
        let sent = b"PRI * HTTP/1.1\r\n\r\n".to_vec();
        assert_eq!(sniff(&sent).await, (false, sent.clone()));
    }

    #[tokio::test]
    async fn a_client_that_closes_early_is_not_http2() {
        assert_eq!(sniff(b"PRI * HT").await, (false, b"PRI * HT".to_vec()));
    }
}
