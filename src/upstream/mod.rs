//! The upstream side: CONNECT tunnels, connections, the shared pool, and one request's exchange,
//! on an HTTP/2 stream to the origin (`h2_link` on the h2 crate, or `native_link` on pushrelay's
//! own codec, by `upstream.http2_client`) or, in a relay chain (`upstream.relay`), over
//! HTTP/1.1 to a DMZ relay (`chain`): connection kinds behind one seam (`link`), held by one pool
//! (`pool`) that does checkout, queueing, fairness, back-off and health for all of them. The pipeline sees only `Upstream`, `Exchange`, `ResponseBody` and
//! `UpstreamError`, whatever the protocol. A request is sent again only when the origin provably
//! never processed it (RFC 9113 §8.7: a REFUSED_STREAM reset, or a stream above a GOAWAY's
//! last-stream-id; over HTTP/1.1, nothing of it written), and only once; nothing else is ever
//! re-sent, so a push never reaches Apple twice.

pub mod chain;
pub mod connect;
mod decision;
mod h2_link;
mod http1_client;
pub(crate) mod identity;
mod link;
pub mod native_link;
pub mod pool;
pub mod tunnel;

use std::error::Error as StdError;
use std::future::poll_fn;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use h2::SendStream;
use http::{HeaderMap, Request, Response};
use http_body::{Body, Frame, SizeHint};
use tokio::time::{Instant, timeout_at};

use crate::h2_body::H2Body;
use chain::ChainError;
use link::{LinkAnswer, LinkError};
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
        /// The origin provably never processed it (RFC 9113 §8.7).
        never_processed: bool,
        #[source]
        source: h2::Error,
    },
    #[error("upstream stream failed on connection {conn}: {source}")]
    NativeStream {
        conn: u64,
        #[source]
        source: native_link::NativeFailure,
    },
    #[error(transparent)]
    Chain(#[from] ChainError),
}

impl UpstreamError {
    /// Whether the request provably never reached (or was never processed by) the upstream, so
    /// that sending it again cannot deliver it twice: no connection was had, the HTTP/2 stream
    /// never opened, was refused (REFUSED_STREAM) or was above a GOAWAY's last-stream-id, or
    /// nothing of it was written on an HTTP/1.1 connection.
    pub fn never_processed(&self) -> bool {
        match self {
            UpstreamError::Pool(_) => true,
            UpstreamError::Timeout { .. } => false,
            UpstreamError::Stream {
                never_processed, ..
            } => *never_processed,
            UpstreamError::NativeStream { source, .. } => source.never_processed(),
            UpstreamError::Chain(e) => e.never_processed(),
        }
    }
}

/// Set once a request is written to an upstream connection (the door makes one per request and
/// the pipeline hands it to `Upstream::exchange`): from then on a client that goes away no
/// longer cancels it. Until then (read, waiting in the queue, waiting for a connect) a client's
/// reset drops the request and it is never sent. Once sent, the origin may have delivered it
/// already; a cancel would not take the push back, and a burst of cancels is what Apple's abuse
/// detection punishes.
#[derive(Debug, Clone, Default)]
pub struct Committed(Arc<AtomicBool>);

impl Committed {
    pub fn set(&self) {
        self.0.store(true, Ordering::Relaxed);
    }

    pub fn is_set(&self) -> bool {
        self.0.load(Ordering::Relaxed)
    }
}

/// Whose request an exchange carries: the client connection, whose fair share of the pool it
/// takes, and the request's [`Committed`] flag.
#[derive(Debug, Clone, Copy)]
pub struct Asker<'a> {
    pub client: std::net::SocketAddr,
    pub committed: &'a Committed,
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

/// An upstream answer's body: the origin's HTTP/2 stream (its stream slot held until the body
/// is dropped), or an answer already read whole (the own HTTP/2 client's, or HTTP/1.1 from a
/// DMZ relay), its data then its trailers.
pub struct ResponseBody(Answer);

enum Answer {
    Whole {
        data: Option<Bytes>,
        trailers: Option<HeaderMap>,
    },
    H2 {
        body: H2Body,
        _lease: Lease,
    },
}

/// The upstream answer's body broke off.
#[derive(Debug, thiserror::Error)]
#[error("upstream answer body broke off: {0}")]
pub struct BodyError(#[source] h2::Error);

impl ResponseBody {
    pub fn whole(data: Bytes, trailers: Option<HeaderMap>) -> Self {
        ResponseBody(Answer::Whole {
            data: (!data.is_empty()).then_some(data),
            trailers,
        })
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
            Answer::Whole { data, trailers } => Poll::Ready(
                data.take()
                    .map(Frame::data)
                    .or_else(|| trailers.take().map(Frame::trailers))
                    .map(Ok),
            ),
            Answer::H2 { body, .. } => Pin::new(body)
                .poll_frame(cx)
                .map(|f| f.map(|r| r.map_err(BodyError))),
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.0 {
            Answer::Whole { data, trailers } => data.is_none() && trailers.is_none(),
            Answer::H2 { body, .. } => body.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.0 {
            Answer::Whole { data, .. } => {
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

/// Where requests go: the pool, whose connections are HTTP/2 to the origin, or HTTP/1.1 to a
/// DMZ relay when `upstream.relay` is set. Cheap to clone.
#[derive(Clone)]
pub struct Upstream {
    pool: Pool,
    /// In a relay chain, the DMZ relay (as errors name it).
    relay: Option<Arc<str>>,
}

impl Upstream {
    /// Requests through `pool`; `relay` names the DMZ relay when the pool's connections go to
    /// one.
    pub fn new(pool: Pool, relay: Option<String>) -> Self {
        Upstream {
            pool,
            relay: relay.map(Arc::from),
        }
    }

    /// The pool, for metrics, the status page and tests.
    pub fn pool(&self) -> &Pool {
        &self.pool
    }

    /// Closes every upstream connection (at shutdown, once clients are drained).
    pub fn close(&self) {
        self.pool.close();
    }

    /// Sends one request of `asker`'s (its body whole) and waits for the answer's head, until
    /// `deadline`. `asker.committed` is set as the request goes on a connection. The one resend rule for every kind of connection: a
    /// request goes again, once, only when the upstream provably never processed it.
    pub async fn exchange(
        &self,
        key: &PoolKey,
        asker: Asker<'_>,
        request: Request<Bytes>,
        trailers: Option<HeaderMap>,
        deadline: Instant,
        request_timeout: Duration,
    ) -> Result<Exchange, UpstreamError> {
        let (parts, body) = request.into_parts();
        let head = Request::from_parts(parts, ());
        // A DMZ relay's connections carry any identity's requests (tokens travel in headers).
        let chain_key;
        let key = if self.relay.is_some() && key.identity.is_some() {
            chain_key = PoolKey {
                dest: key.dest.clone(),
                identity: None,
            };
            &chain_key
        } else {
            key
        };
        let attempts = async {
            let mut resent = false;
            loop {
                let lease = self
                    .pool
                    .checkout_for(key, Some(asker.client), deadline)
                    .await?;
                let conn = lease.conn_id();
                asker.committed.set();
                let sent = lease
                    .link()
                    .send(&key.dest, head.clone(), body.clone(), trailers.clone())
                    .await;
                match sent {
                    Ok(LinkAnswer::Stream(response)) => {
                        let (parts, recv) = response.into_parts();
                        return Ok(Exchange {
                            response: Response::from_parts(parts, ResponseBody::h2(recv, lease)),
                            conn,
                            resent,
                        });
                    }
                    Ok(LinkAnswer::Whole(response, trailers)) => {
                        return Ok(Exchange {
                            response: response.map(|data| ResponseBody::whole(data, trailers)),
                            conn,
                            resent,
                        });
                    }
                    Err(e) => {
                        if e.ends_connection() {
                            lease.retire();
                        }
                        let e = self.link_error(conn, e);
                        // Refused in TLS: a failed connect after all, which a resend would only
                        // repeat (one more handshake at the far end, the same refusal).
                        if let UpstreamError::Chain(chain) = &e
                            && let Some(refused) = chain.connect_refusal()
                        {
                            self.pool.connect_refused(&lease, refused);
                            return Err(e);
                        }
                        if !resent && e.never_processed() {
                            tracing::info!(upstream.conn = conn, error = %e, "upstream did not process the request; sending it once more");
                            resent = true;
                            continue;
                        }
                        return Err(e);
                    }
                }
            }
        };
        match timeout_at(deadline, attempts).await {
            Ok(r) => r,
            Err(_) => Err(self.timeout(request_timeout)),
        }
    }

    fn link_error(&self, conn: u64, e: LinkError) -> UpstreamError {
        match e {
            LinkError::H2(e) => UpstreamError::Stream {
                conn,
                never_processed: e.never_processed(),
                source: e.into_h2(),
            },
            LinkError::Native(source) => UpstreamError::NativeStream { conn, source },
            LinkError::Chain(e) => {
                let relay = self.relay.as_deref().unwrap_or_default().to_owned();
                UpstreamError::Chain(ChainError::new(relay, conn, e))
            }
        }
    }

    /// No answer in time: named by the hop it waited for.
    pub fn timeout(&self, after: Duration) -> UpstreamError {
        match &self.relay {
            Some(relay) => UpstreamError::Chain(ChainError::Timeout {
                relay: relay.to_string(),
                after,
            }),
            None => UpstreamError::Timeout { after },
        }
    }
}
