//! The upstream side: CONNECT tunnels, connections, the shared pool, and one request's exchange,
//! on an HTTP/2 stream to the origin or, in a relay chain (`upstream.relay`), over HTTP/1.1 to a
//! DMZ relay (`chain`). The pipeline sees only `Upstream`, `Exchange`, `ResponseBody` and
//! `UpstreamError`, whatever the protocol. A request is sent again only when the origin provably
//! never processed it (RFC 9113 §8.7: a REFUSED_STREAM reset, or a stream above a GOAWAY's
//! last-stream-id; over HTTP/1.1, nothing of it written), and only once; nothing else is ever
//! re-sent, so a push never reaches Apple twice.

pub mod chain;
pub mod connect;
mod decision;
mod http1_client;
pub(crate) mod identity;
pub mod pool;
pub mod tunnel;

use std::error::Error as StdError;
use std::future::poll_fn;
use std::pin::{Pin, pin};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use h2::SendStream;
use http::{HeaderMap, Request, Response};
use http_body::{Body, Frame, SizeHint};
use tokio::time::{Instant, timeout_at};

use crate::h2_body::H2Body;
use chain::{Chain, ChainError};
pub use pool::{Lease, Pool, PoolError, PoolKey};

pub type BoxError = Box<dyn StdError + Send + Sync>;

#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    #[error(transparent)]
    Pool(#[from] PoolError),
    #[error("no answer from upstream within {after:?}")]
    Timeout { after: Duration },
    #[error("upstream stream failed on connection {conn}: {source}")]
    Stream {
        conn: u64,
        #[source]
        source: h2::Error,
    },
    #[error("request body larger than {limit} bytes")]
    BodyTooLarge { limit: usize },
    #[error("reading the client's request body failed: {0}")]
    ClientBody(#[source] BoxError),
    #[error(transparent)]
    Chain(#[from] ChainError),
}

/// A request body that keeps what it has sent, so an unprocessed request can be sent again. The
/// copy is bounded by the body limit, which also answers 413.
pub struct ReplayBody<B> {
    body: B,
    sent: Vec<Bytes>,
    sent_len: usize,
    limit: usize,
    trailers: Option<HeaderMap>,
    done: bool,
}

enum PumpError {
    /// The upstream stream refused more data: its response (or reset) says why.
    Stream,
    Body(UpstreamError),
}

impl<B> ReplayBody<B>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    pub fn new(body: B, limit: usize) -> Self {
        let done = body.is_end_stream();
        ReplayBody {
            body,
            sent: Vec::new(),
            sent_len: 0,
            limit,
            trailers: None,
            done,
        }
    }

    fn is_empty(&self) -> bool {
        self.done && self.sent.is_empty() && self.trailers.is_none()
    }

    /// Reads the rest of the client's body and gives the whole of it (kept, as sent data is).
    /// Trailers are kept but not part of it: HTTP/1.1 with a length cannot carry them.
    async fn collect(&mut self) -> Result<Bytes, UpstreamError> {
        while !self.done {
            match poll_fn(|cx| Pin::new(&mut self.body).poll_frame(cx)).await {
                None => self.done = true,
                Some(Err(e)) => return Err(UpstreamError::ClientBody(e.into())),
                Some(Ok(frame)) => match frame.into_data() {
                    Ok(data) => {
                        self.sent_len += data.len();
                        if self.sent_len > self.limit {
                            return Err(UpstreamError::BodyTooLarge { limit: self.limit });
                        }
                        self.done = self.body.is_end_stream();
                        if !data.is_empty() {
                            self.sent.push(data);
                        }
                    }
                    Err(frame) => {
                        if let Ok(trailers) = frame.into_trailers() {
                            self.trailers = Some(trailers);
                            self.done = true;
                        }
                    }
                },
            }
        }
        Ok(match self.sent.as_slice() {
            [] => Bytes::new(),
            [one] => one.clone(),
            many => Bytes::from(many.concat()),
        })
    }

    /// Sends what was sent before, then the rest of the client's body. Frames are handed to h2
    /// without waiting for flow-control credit: h2 holds what the window does not yet allow, and
    /// that is bounded by the body limit, as this body keeps a copy of all of it anyway.
    async fn pump(&mut self, send: &mut SendStream<Bytes>) -> Result<(), PumpError> {
        let replayed = self.sent.len();
        for (i, chunk) in self.sent.iter().enumerate() {
            let last = self.done && self.trailers.is_none() && i + 1 == replayed;
            send.send_data(chunk.clone(), last)
                .map_err(|_| PumpError::Stream)?;
        }
        while !self.done {
            let frame = poll_fn(|cx| Pin::new(&mut self.body).poll_frame(cx)).await;
            match frame {
                None => {
                    self.done = true;
                    send.send_data(Bytes::new(), true)
                        .map_err(|_| PumpError::Stream)?;
                }
                Some(Err(e)) => {
                    // A body that finds itself too large (a chunk size over the limit) says so
                    // with this layer's own error.
                    let e = match e.into().downcast::<UpstreamError>() {
                        Ok(e) => *e,
                        Err(e) => UpstreamError::ClientBody(e),
                    };
                    return Err(PumpError::Body(e));
                }
                Some(Ok(frame)) => match frame.into_data() {
                    Ok(data) => {
                        self.sent_len += data.len();
                        if self.sent_len > self.limit {
                            return Err(PumpError::Body(UpstreamError::BodyTooLarge {
                                limit: self.limit,
                            }));
                        }
                        self.done = self.body.is_end_stream();
                        if data.is_empty() && !self.done {
                            continue;
                        }
                        if !data.is_empty() {
                            self.sent.push(data.clone());
                        }
                        send.send_data(data, self.done)
                            .map_err(|_| PumpError::Stream)?;
                    }
                    Err(frame) => {
                        if let Ok(trailers) = frame.into_trailers() {
                            self.trailers = Some(trailers);
                            self.done = true;
                        }
                    }
                },
            }
        }
        if let Some(trailers) = &self.trailers {
            send.send_trailers(trailers.clone())
                .map_err(|_| PumpError::Stream)?;
        }
        Ok(())
    }
}

/// The stream was reset or closed: nothing more can be sent on it.
#[derive(Debug)]
pub struct StreamGone;

/// Sends `data` as DATA frames as the stream's window allows, waiting for credit, so a slow reader
/// slows the sender down instead of filling memory; an empty `data` with `end` sends the closing
/// empty frame.
pub async fn send_flow_controlled(
    send: &mut SendStream<Bytes>,
    mut data: Bytes,
    end: bool,
) -> Result<(), StreamGone> {
    if data.is_empty() {
        if end {
            send.send_data(data, true).map_err(|_| StreamGone)?;
        }
        return Ok(());
    }
    while !data.is_empty() {
        send.reserve_capacity(data.len());
        let granted = match poll_fn(|cx| send.poll_capacity(cx)).await {
            Some(Ok(n)) => n,
            _ => return Err(StreamGone),
        };
        if granted == 0 {
            continue;
        }
        let chunk = data.split_to(granted.min(data.len()));
        send.send_data(chunk, end && data.is_empty())
            .map_err(|_| StreamGone)?;
    }
    Ok(())
}

/// Whether the origin provably never processed the stream (RFC 9113 §8.7).
pub fn never_processed(e: &h2::Error) -> bool {
    e.is_remote()
        && (e.is_go_away() || (e.is_reset() && e.reason() == Some(h2::Reason::REFUSED_STREAM)))
}

/// An upstream answer's body: the origin's HTTP/2 stream (its stream slot held until the body
/// is dropped), or an answer already read whole (HTTP/1.1 from a DMZ relay).
pub struct ResponseBody(Answer);

enum Answer {
    Whole(Option<Bytes>),
    H2 { body: H2Body, _lease: Lease },
}

/// The upstream answer's body broke off.
#[derive(Debug, thiserror::Error)]
#[error("upstream answer body broke off: {0}")]
pub struct BodyError(#[source] h2::Error);

impl ResponseBody {
    pub fn whole(data: Bytes) -> Self {
        ResponseBody(Answer::Whole((!data.is_empty()).then_some(data)))
    }

    fn h2(recv: h2::RecvStream, lease: Lease) -> Self {
        ResponseBody(Answer::H2 {
            body: H2Body::new(recv),
            _lease: lease,
        })
    }
}

impl Body for ResponseBody {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        match &mut self.get_mut().0 {
            Answer::Whole(data) => Poll::Ready(data.take().map(|d| Ok(Frame::data(d)))),
            Answer::H2 { body, .. } => Pin::new(body)
                .poll_frame(cx)
                .map(|f| f.map(|r| r.map_err(BodyError))),
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.0 {
            Answer::Whole(data) => data.is_none(),
            Answer::H2 { body, .. } => body.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.0 {
            Answer::Whole(data) => {
                SizeHint::with_exact(data.as_ref().map_or(0, |d| d.len() as u64))
            }
            Answer::H2 { body, .. } => body.size_hint(),
        }
    }
}

/// The answer, and which upstream connection carried it.
pub struct Exchange {
    pub response: Response<ResponseBody>,
    pub conn: u64,
    /// Whether the request had to be sent a second time.
    pub resent: bool,
}

/// Where requests go: HTTP/2 to the origin through the pool, or HTTP/1.1 to a DMZ relay when
/// `upstream.relay` is set. Cheap to clone.
#[derive(Clone)]
pub struct Upstream {
    pool: Pool,
    chain: Option<Chain>,
}

impl Upstream {
    pub fn new(pool: Pool, chain: Option<Chain>) -> Self {
        Upstream { pool, chain }
    }

    /// The HTTP/2 pool (idle, in a relay chain), for metrics and tests.
    pub fn pool(&self) -> &Pool {
        &self.pool
    }

    /// Closes every upstream connection (at shutdown, once clients are drained).
    pub fn close(&self) {
        self.pool.close();
        if let Some(chain) = &self.chain {
            chain.close();
        }
    }

    /// Sends one request of client connection `client` and waits for the answer's head, until
    /// `deadline`.
    pub async fn exchange<B>(
        &self,
        key: &PoolKey,
        client: Option<std::net::SocketAddr>,
        head: Request<()>,
        body: &mut ReplayBody<B>,
        deadline: Instant,
        request_timeout: Duration,
    ) -> Result<Exchange, UpstreamError>
    where
        B: Body<Data = Bytes> + Unpin,
        B::Error: Into<BoxError>,
    {
        match &self.chain {
            Some(chain) => {
                let data = body.collect().await?;
                let (response, conn, resent) = chain
                    .exchange(key, &head, &data, deadline, request_timeout)
                    .await?;
                Ok(Exchange {
                    response: response.map(ResponseBody::whole),
                    conn,
                    resent,
                })
            }
            None => {
                h2_exchange(
                    &self.pool,
                    key,
                    client,
                    head,
                    body,
                    deadline,
                    request_timeout,
                )
                .await
            }
        }
    }
}

/// Sends one request on an HTTP/2 stream and waits for the answer's head, until `deadline`.
async fn h2_exchange<B>(
    pool: &Pool,
    key: &PoolKey,
    client: Option<std::net::SocketAddr>,
    head: Request<()>,
    body: &mut ReplayBody<B>,
    deadline: Instant,
    request_timeout: Duration,
) -> Result<Exchange, UpstreamError>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    let attempts = async {
        let mut resent = false;
        loop {
            let lease = pool.checkout_for(key, client, deadline).await?;
            let (response, mut send) = match lease.send_request(head.clone(), body.is_empty()) {
                Ok(pair) => pair,
                // Nothing went out on the wire: another connection may take it.
                Err(e) if !resent => {
                    tracing::debug!(upstream.conn = lease.conn_id(), error = %e, "stream not opened; trying another connection");
                    resent = true;
                    continue;
                }
                Err(source) => {
                    return Err(UpstreamError::Stream {
                        conn: lease.conn_id(),
                        source,
                    });
                }
            };
            let mut response = pin!(response);
            let early = if body.is_empty() {
                None
            } else {
                tokio::select! {
                    r = response.as_mut() => Some(r),
                    pumped = body.pump(&mut send) => match pumped {
                        Ok(()) | Err(PumpError::Stream) => None,
                        Err(PumpError::Body(e)) => {
                            send.send_reset(h2::Reason::CANCEL);
                            return Err(e);
                        }
                    },
                }
            };
            let result = match early {
                Some(r) => r,
                None => response.await,
            };
            match result {
                Ok(response) => {
                    let conn = lease.conn_id();
                    let (parts, recv) = response.into_parts();
                    return Ok(Exchange {
                        response: Response::from_parts(parts, ResponseBody::h2(recv, lease)),
                        conn,
                        resent,
                    });
                }
                Err(e) if !resent && never_processed(&e) => {
                    tracing::info!(upstream.conn = lease.conn_id(), error = %e, "origin did not process the request; sending it once more");
                    if e.is_go_away() {
                        lease.retire();
                    }
                    resent = true;
                }
                Err(source) => {
                    if source.is_go_away() || source.is_io() {
                        lease.retire();
                    }
                    return Err(UpstreamError::Stream {
                        conn: lease.conn_id(),
                        source,
                    });
                }
            }
        }
    };
    match timeout_at(deadline, attempts).await {
        Ok(r) => r,
        Err(_) => Err(UpstreamError::Timeout {
            after: request_timeout,
        }),
    }
}
