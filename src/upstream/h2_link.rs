//! The HTTP/2 connection kind (the `h2` crate): a connection to the origin through
//! `connect::Connector` (direct or through the CONNECT proxy), ready once its first PING is
//! answered (the origin's SETTINGS are applied by then), kept alive by PINGs, carrying as many
//! streams at once as the origin's live SETTINGS_MAX_CONCURRENT_STREAMS allows. The pool
//! (`pool.rs`) holds these through `link::Link`; everything h2 about a connection is here.

use std::pin::pin;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use h2::{Ping, RecvStream};
use http::{HeaderMap, Request, Response};
use tokio::sync::oneshot;
use tokio::time::{Instant, sleep, timeout, timeout_at};
use tokio_util::sync::CancellationToken;

use super::connect::OriginSetup;
use super::connect::{ConnectError, H2Connection, H2Send, Route};
use crate::metrics::Metrics;
use crate::policy::Authority;

/// Opens HTTP/2 connections, presenting the client certificate of the request's identity.
pub struct H2Kind(OriginSetup);

/// The request side of one HTTP/2 connection.
pub struct H2Link {
    send: H2Send,
}

/// Why a request failed on an HTTP/2 connection.
#[derive(Debug)]
pub enum H2Failure {
    /// The stream could not be opened: nothing went out on the wire.
    NotOpened(h2::Error),
    /// The stream failed after it was opened (reset, GOAWAY, the connection broke).
    Stream(h2::Error),
}

impl H2Failure {
    /// Whether the origin provably never processed the request (RFC 9113 §8.7): the stream
    /// never opened, a REFUSED_STREAM reset, or a stream above a GOAWAY's last-stream-id.
    pub fn never_processed(&self) -> bool {
        match self {
            H2Failure::NotOpened(_) => true,
            H2Failure::Stream(e) => {
                e.is_remote()
                    && (e.is_go_away()
                        || (e.is_reset() && e.reason() == Some(h2::Reason::REFUSED_STREAM)))
            }
        }
    }

    /// Whether the connection takes no more streams after this (GOAWAY, I/O failure).
    pub fn ends_connection(&self) -> bool {
        match self {
            H2Failure::NotOpened(_) => true,
            H2Failure::Stream(e) => e.is_go_away() || e.is_io(),
        }
    }

    pub fn into_h2(self) -> h2::Error {
        match self {
            H2Failure::NotOpened(e) | H2Failure::Stream(e) => e,
        }
    }
}

impl H2Kind {
    pub fn new(setup: OriginSetup) -> Self {
        H2Kind(setup)
    }

    /// Connects, starts the driver task, and waits for the first PING answer, all by
    /// `deadline`. The driver ends the connection when `close` is cancelled, and says why it
    /// ended on the returned receiver (`None`: closed by `close`).
    pub async fn open(
        &self,
        dest: &Authority,
        identity: &Option<Arc<str>>,
        deadline: Instant,
        close: CancellationToken,
    ) -> Result<(H2Link, Route, oneshot::Receiver<Option<String>>), ConnectError> {
        let tls = self.0.tls_for(dest, identity)?;
        let host = dest.host().to_owned();
        let mut connected = self.0.connector.connect(dest, tls, deadline).await?;
        let ping_pong = connected.connection.ping_pong();
        let (ready_tx, ready_rx) = oneshot::channel();
        let (ended_tx, ended_rx) = oneshot::channel();
        tokio::spawn(drive(Driven {
            connection: connected.connection,
            ping_pong,
            ready: ready_tx,
            ready_by: deadline,
            ended: ended_tx,
            close,
            keepalive_interval: self.0.keepalive_interval,
            keepalive_timeout: self.0.keepalive_timeout,
            metrics: self.0.metrics.clone(),
            dest: dest.to_string(),
        }));
        match ready_rx.await {
            Ok(Ok(())) => Ok((
                H2Link {
                    send: connected.send,
                },
                connected.route,
                ended_rx,
            )),
            Ok(Err(ReadyError::Timeout)) => Err(ConnectError::H2Timeout {
                host,
                after: self.0.connector.budget(),
            }),
            Ok(Err(ReadyError::H2(source))) => Err(ConnectError::H2 { host, source }),
            Err(_) => Err(ConnectError::H2 {
                host,
                source: h2::Error::from(h2::Reason::INTERNAL_ERROR),
            }),
        }
    }
}

impl H2Link {
    /// Streams the origin lets this connection carry at once, as it says now.
    pub fn capacity(&self) -> usize {
        self.send.current_max_send_streams()
    }

    /// Sends one request, its body whole, and waits for the answer's head. The body is handed
    /// to h2 without waiting for flow-control credit: h2 holds what the window does not yet
    /// allow, and that is bounded by the body limit.
    pub async fn send(
        &self,
        head: Request<()>,
        body: Bytes,
        trailers: Option<HeaderMap>,
    ) -> Result<Response<RecvStream>, H2Failure> {
        let end = body.is_empty() && trailers.is_none();
        // A handle of its own, so a stream h2 holds back (the origin lowered its limit under us)
        // never blocks another request's handle. The pool's accounting stands in for `ready()`.
        let (response, mut stream) = self
            .send
            .clone()
            .send_request(head, end)
            .map_err(H2Failure::NotOpened)?;
        if !end {
            // A failure here means the stream was reset or closed: its answer says why.
            let sent = if body.is_empty() {
                Ok(())
            } else {
                stream.send_data(body, trailers.is_none())
            };
            if sent.is_ok()
                && let Some(trailers) = trailers
            {
                let _ = stream.send_trailers(trailers);
            }
        }
        response.await.map_err(H2Failure::Stream)
    }
}

enum ReadyError {
    Timeout,
    H2(h2::Error),
}

/// A new connection as its driver gets it.
struct Driven {
    connection: H2Connection,
    ping_pong: Option<h2::PingPong>,
    ready: oneshot::Sender<Result<(), ReadyError>>,
    /// The end of the connect attempt: the first PING must be answered by then.
    ready_by: Instant,
    ended: oneshot::Sender<Option<String>>,
    close: CancellationToken,
    keepalive_interval: Duration,
    keepalive_timeout: Duration,
    metrics: Arc<Metrics>,
    dest: String,
}

/// Drives one connection: first PING (readiness), then keepalive PINGs until the connection ends,
/// a PING goes unanswered, or `close` is cancelled; then says why on `ended`.
async fn drive(driven: Driven) {
    let Driven {
        connection,
        mut ping_pong,
        ready,
        ready_by,
        ended,
        close,
        keepalive_interval,
        keepalive_timeout,
        metrics,
        dest,
    } = driven;
    let mut connection = pin!(connection);
    let first_ping = async {
        match ping_pong.as_mut() {
            Some(pp) => match timeout_at(ready_by, pp.ping(Ping::opaque())).await {
                Ok(Ok(_)) => Ok(()),
                Ok(Err(e)) => Err(ReadyError::H2(e)),
                Err(_) => Err(ReadyError::Timeout),
            },
            None => Ok(()),
        }
    };
    let ready_result = tokio::select! {
        r = connection.as_mut() => Err(match r {
            Ok(()) => ReadyError::H2(h2::Error::from(h2::Reason::NO_ERROR)),
            Err(e) => ReadyError::H2(e),
        }),
        r = first_ping => r,
    };
    let failed = ready_result.is_err();
    if ready.send(ready_result).is_err() || failed {
        return;
    }

    let keepalive = async {
        let Some(pp) = ping_pong.as_mut() else {
            return std::future::pending().await;
        };
        loop {
            sleep(keepalive_interval).await;
            match timeout(keepalive_timeout, pp.ping(Ping::opaque())).await {
                Ok(Ok(_)) => continue,
                Ok(Err(e)) => return format!("PING failed: {e}"),
                Err(_) => return format!("PING unanswered for {keepalive_timeout:?}"),
            }
        }
    };
    let reason = tokio::select! {
        r = connection.as_mut() => Some(match r {
            // A clean HTTP/2 close from the origin always comes with its GOAWAY.
            Ok(()) => {
                metrics.goaway(&dest);
                "closed by the origin (GOAWAY)".to_owned()
            }
            Err(e) if e.is_go_away() && e.is_remote() => {
                metrics.goaway(&dest);
                format!("GOAWAY {:?}", e.reason())
            }
            Err(e) => format!("error: {e}"),
        }),
        why = keepalive => Some(why),
        () = close.cancelled() => None,
    };
    let _ = ended.send(reason);
}
