//! The native HTTP/2 connection kind (`upstream.http2_client: native`): pushrelay's own client
//! codec (`crate::h2client`) over the same way as `h2_link.rs` (`connect::Connector`: direct or
//! through the CONNECT proxy, TLS with ALPN h2), ready once the origin's SETTINGS came and the
//! first PING was answered, kept alive by PINGs, carrying as many streams at once as the
//! origin's live SETTINGS_MAX_CONCURRENT_STREAMS allows. Answers come back whole (APNs answers
//! are a short JSON reason at most), so the pool's stream is free before the client is written.

use std::sync::Arc;

use bytes::Bytes;
use http::{HeaderMap, Request, Response};
use tokio::sync::oneshot;
use tokio::time::{Instant, timeout_at};
use tokio_util::sync::CancellationToken;

use super::connect::OriginSetup;
use super::connect::{ConnectError, Route};
use crate::h2client::conn::{Config as ConnConfig, Failure, OpenError};
use crate::h2client::driver::{self, Client, DriverConfig, RequestError};
use crate::policy::Authority;

/// Most answer body the codec keeps per request. Above the pipeline's own limit on answers, so
/// an oversized answer fails there the same way whichever client carried it.
const MAX_ANSWER_BODY: usize = 1 << 20;

/// Opens native HTTP/2 connections, presenting the client certificate of the request's identity.
pub struct NativeKind(OriginSetup);

/// The request side of one native HTTP/2 connection.
pub struct NativeLink {
    client: Client,
}

/// Why a request failed on a native HTTP/2 connection.
#[derive(Debug, thiserror::Error)]
#[error(transparent)]
pub struct NativeFailure(#[from] RequestError);

impl NativeFailure {
    /// Whether the origin provably never processed the request (RFC 9113 §8.7): the stream
    /// never opened, a REFUSED_STREAM reset, or a stream above a GOAWAY's last-stream-id.
    pub fn never_processed(&self) -> bool {
        self.0.never_processed()
    }

    /// Whether the connection takes no more streams after this (GOAWAY, a connection error).
    pub fn ends_connection(&self) -> bool {
        match &self.0 {
            RequestError::NotStarted(OpenError::AtCapacity) | RequestError::NoAuthority => false,
            RequestError::NotStarted(_) | RequestError::ConnectionLost(_) => true,
            RequestError::Stream(f) => {
                matches!(f, Failure::AfterGoAway { .. } | Failure::Connection(_))
            }
            RequestError::BodyTooLarge(_) => false,
        }
    }
}

impl NativeKind {
    pub fn new(setup: OriginSetup) -> Self {
        NativeKind(setup)
    }

    /// Connects, starts the driver task, and waits until the connection is ready, all by
    /// `deadline`. The task ends the connection when `close` is cancelled, and says why it
    /// ended on the returned receiver (`None`: closed by `close`).
    pub async fn open(
        &self,
        dest: &Authority,
        identity: &Option<Arc<str>>,
        deadline: Instant,
        close: CancellationToken,
    ) -> Result<(NativeLink, Route, oneshot::Receiver<Option<String>>), ConnectError> {
        let tls = self.0.tls_for(dest, identity)?;
        let host = dest.host().to_owned();
        let (stream, route) = self.0.connector.tls_stream(dest, tls, deadline).await?;
        let cfg = DriverConfig {
            conn: ConnConfig::default(),
            ping_interval: Some(self.0.keepalive_interval),
            // The first PING (readiness) is bounded by the connect deadline as well.
            ping_timeout: self.0.keepalive_timeout,
            max_body: MAX_ANSWER_BODY,
        };
        let (client, driving) = driver::connect(stream, cfg);
        let (ended_tx, ended_rx) = oneshot::channel();
        let (early_tx, early_rx) = oneshot::channel();
        let metrics = self.0.metrics.clone();
        let name = dest.to_string();
        let ready_client = client.clone();
        tokio::spawn(async move {
            let reason = tokio::select! {
                ended = driving => {
                    if ended.goaway.is_some() {
                        metrics.goaway(&name);
                    }
                    Some(ended.to_string())
                }
                () = close.cancelled() => None,
            };
            // Before readiness the opener hears it; after, the pool does.
            if let Some(why) = &reason {
                let _ = early_tx.send(why.clone());
            }
            let _ = ended_tx.send(reason);
        });
        match timeout_at(deadline, ready_client.ready()).await {
            Ok(true) => Ok((NativeLink { client }, route, ended_rx)),
            Ok(false) => {
                let reason = early_rx
                    .await
                    .unwrap_or_else(|_| "the connection closed".to_owned());
                Err(ConnectError::Http2 { host, reason })
            }
            // Dropping the last handle ends the driver.
            Err(_) => Err(ConnectError::H2Timeout {
                host,
                after: self.0.connector.budget(),
            }),
        }
    }
}

impl NativeLink {
    /// Streams the origin lets this connection carry at once, as it says now.
    pub fn capacity(&self) -> usize {
        self.client.max_concurrent_streams() as usize
    }

    /// Sends one request, its body whole (and trailers), and waits for the whole answer and
    /// its trailers.
    pub async fn send(
        &self,
        head: Request<()>,
        body: Bytes,
        trailers: Option<HeaderMap>,
    ) -> Result<(Response<Bytes>, Option<HeaderMap>), NativeFailure> {
        let (parts, ()) = head.into_parts();
        let answer = self
            .client
            .send_with_trailers(Request::from_parts(parts, body), trailers)
            .await?;
        let mut response = Response::new(answer.body);
        *response.status_mut() = answer.status;
        *response.version_mut() = http::Version::HTTP_2;
        *response.headers_mut() = answer.headers;
        Ok((response, answer.trailers))
    }
}
