//! The request pipeline shared by every front door: destination policy, header rewriting, the
//! upstream exchange, and the one log line per request. Front doors (one file each) decide which
//! destination a request is for; everything after that is here, so both modes behave the same.

pub mod body;
pub mod door;
pub mod forward_proxy;
pub mod h2_server;
pub mod headers;
pub mod http1;
pub mod http1_server;
pub mod post_proxy;
pub mod pre_proxy;

use std::borrow::Cow;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, header};
use http_body::Body;
use hyper_util::server::graceful::GracefulConnection;
use tokio::sync::Semaphore;
use tokio::time::{Instant, timeout_at};
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::error::ReadError;
use crate::error::{Fault, RelayError, hop_of};
use crate::metrics::Metrics;
use crate::policy::{Authority, DestinationPolicy};
use crate::swap::Swap;
use crate::upstream::identity::{Identities, Sender};
use crate::upstream::{Asker, BoxError, Pool, PoolKey, Upstream};
use body::{RelayBody, read_whole};
use h2_server::{CLIENT_MAX_STREAMS, Committed};

/// Who is asking: for the log line, for the identities a request may use, and the client
/// connection's share of upstream streams.
#[derive(Debug, Clone)]
pub struct Ctx {
    pub listener: Arc<str>,
    pub client: SocketAddr,
    /// The subject common name of the client's TLS certificate, when it presented one.
    pub client_subject: Option<Arc<str>>,
    /// Requests of this client connection upstream at once (HTTP/2 connections; HTTP/1.1 has
    /// one at a time anyway).
    pub upstream_slots: Option<Arc<Semaphore>>,
}

impl Ctx {
    pub fn new(listener: Arc<str>, client: SocketAddr) -> Self {
        Ctx {
            listener,
            client,
            client_subject: None,
            upstream_slots: None,
        }
    }
}

/// The largest answer body read from the origin: APNs answers are a short JSON reason, FCM's a
/// few KiB.
const MAX_ANSWER_BODY: usize = 64 * 1024;
const APNS_ID: &str = "apns-id";

/// The shared pipeline.
pub struct Relay {
    upstream: Upstream,
    destinations: Swap<DestinationPolicy>,
    /// Which upstream identity each request travels under.
    identities: Identities,
    metrics: Arc<Metrics>,
    max_request_body: usize,
    body_timeout: Duration,
    request_timeout: Duration,
}

impl Relay {
    pub fn new(config: &Config, upstream: Upstream, metrics: Arc<Metrics>) -> Self {
        Relay {
            upstream,
            destinations: Swap::new(DestinationPolicy::new(config.destinations.iter().cloned())),
            identities: Identities::new(&config.upstream.identities),
            metrics,
            max_request_body: config.limits.max_request_body,
            body_timeout: config.limits.request_body_timeout,
            request_timeout: config.upstream.request_timeout,
        }
    }

    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    pub fn metrics_handle(&self) -> Arc<Metrics> {
        self.metrics.clone()
    }

    pub fn pool(&self) -> &Pool {
        self.upstream.pool()
    }

    pub fn upstream(&self) -> &Upstream {
        &self.upstream
    }

    pub fn destinations(&self) -> Arc<DestinationPolicy> {
        self.destinations.load()
    }

    pub fn set_destinations(&self, destinations: DestinationPolicy) {
        self.destinations.store(destinations);
    }

    /// Relays `req` to `dest`, sending `authority` as `:authority`. Never fails: errors become
    /// pushrelay's own JSON answers, which come only once the request was read. Logs one line.
    /// `committed` is set as the request goes on an upstream connection (see [`Committed`]).
    pub async fn forward<B>(
        &self,
        ctx: &Ctx,
        committed: &Committed,
        dest: Authority,
        authority: http::uri::Authority,
        req: Request<B>,
    ) -> Response<RelayBody>
    where
        B: Body<Data = Bytes> + Unpin,
        B::Error: Into<BoxError>,
    {
        let started = Instant::now();
        let (mut parts, body) = req.into_parts();
        let apns_id = parts.headers.get(APNS_ID).cloned();
        let result = self
            .exchange(ctx, committed, &dest, authority, &mut parts, body)
            .await;
        let elapsed = started.elapsed();
        match result {
            Ok((response, conn)) => {
                self.metrics.request(
                    &ctx.listener,
                    dest.as_shared_str(),
                    response.status().as_u16(),
                    elapsed,
                );
                // Fields are worked out only when the line is written.
                tracing::info!(
                    listener = %ctx.listener,
                    client.addr = %ctx.client,
                    method = %parts.method,
                    authority = %dest,
                    path = %loggable_path(parts.uri.path()),
                    status = response.status().as_u16(),
                    apns_id = response
                        .headers()
                        .get(APNS_ID)
                        .and_then(|v| v.to_str().ok())
                        .unwrap_or(""),
                    upstream.conn = conn,
                    duration_ms = elapsed.as_secs_f64() * 1000.0,
                    "relayed"
                );
                response
            }
            Err(e) => {
                let response = e.to_response(apns_id.as_ref());
                let path = loggable_path(parts.uri.path());
                self.record_failure(ctx, &parts.method, Some(&dest), &path, &e, elapsed);
                response
            }
        }
    }

    /// Answers a request refused before it had a destination, once its body was read (bounded
    /// as any body): an answer that overtakes the request ends its stream with a reset, which
    /// some clients (curl 7.88) take for a failure and drop the answer.
    pub async fn refuse<B>(&self, ctx: &Ctx, req: Request<B>, e: RelayError) -> Response<RelayBody>
    where
        B: Body<Data = Bytes> + Unpin,
        B::Error: Into<BoxError>,
    {
        let (parts, body) = req.into_parts();
        let started = Instant::now();
        // The refusal is the answer whatever the body; a body that fails to come ends the wait.
        let _ = read_whole(body, self.max_request_body, self.body_timeout).await;
        let path = loggable_path(parts.uri.path());
        self.record_failure(ctx, &parts.method, None, &path, &e, started.elapsed());
        e.to_response(parts.headers.get(APNS_ID))
    }

    /// Logs and counts a request that ended in pushrelay's own answer, at a level by whose fault
    /// it was.
    pub fn record_failure(
        &self,
        ctx: &Ctx,
        method: &http::Method,
        dest: Option<&Authority>,
        path: &str,
        e: &RelayError,
        elapsed: Duration,
    ) {
        let elapsed_ms = elapsed.as_secs_f64() * 1000.0;
        let (status, reason, fault) = e.classify();
        let (hop, proxy_status) = hop_of(e);
        // A refused destination is counted without its name: clients choose it, and one series
        // per made-up host would grow without bound.
        let no_dest: Arc<str> = Arc::from("");
        let label = match (dest, e) {
            (_, RelayError::DestinationNotAllowed(_)) | (None, _) => &no_dest,
            (Some(d), _) => d.as_shared_str(),
        };
        self.metrics
            .request(&ctx.listener, label, status.as_u16(), elapsed);
        let dest = dest.map(ToString::to_string).unwrap_or_default();
        self.metrics.relay_error(reason);
        macro_rules! line {
            ($level:ident) => {
                tracing::$level!(
                    listener = %ctx.listener,
                    client.addr = %ctx.client,
                    method = %method,
                    authority = %dest,
                    path = %path,
                    status = status.as_u16(),
                    reason,
                    hop,
                    proxy.status = proxy_status,
                    duration_ms = elapsed_ms,
                    error = %e,
                    "refused"
                )
            };
        }
        match fault {
            Fault::Client | Fault::Policy => line!(info),
            Fault::Upstream | Fault::Relay => line!(warn),
        }
    }

    /// Reads the request whole, then sends it upstream, then reads the answer whole and gives
    /// the upstream stream back, all before the client is written to.
    async fn exchange<B>(
        &self,
        ctx: &Ctx,
        committed: &Committed,
        dest: &Authority,
        authority: http::uri::Authority,
        parts: &mut http::request::Parts,
        body: B,
    ) -> Result<(Response<RelayBody>, u64), RelayError>
    where
        B: Body<Data = Bytes> + Unpin,
        B::Error: Into<BoxError>,
    {
        let declared = parts
            .headers
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        let limit = self.max_request_body;
        if declared.is_some_and(|n| n > limit as u64) {
            return Err(RelayError::RequestBody(ReadError::TooLarge { limit }));
        }
        let body = read_whole(body, limit, self.body_timeout)
            .await
            .map_err(RelayError::RequestBody)?;
        if !self.destinations.load().allows(dest) {
            return Err(RelayError::DestinationNotAllowed(dest.clone()));
        }
        let deadline = Instant::now() + self.request_timeout;
        // This connection's share of upstream streams; held until the answer is read.
        let _slot = match &ctx.upstream_slots {
            None => None,
            Some(slots) => match timeout_at(deadline, slots.acquire()).await {
                Ok(Ok(permit)) => Some(permit),
                _ => {
                    return Err(RelayError::ConnectionBusy {
                        limit: CLIENT_MAX_STREAMS as usize,
                    });
                }
            },
        };
        let sender = Sender {
            listener: &ctx.listener,
            client_subject: ctx.client_subject.as_deref(),
        };
        let key = PoolKey {
            dest: dest.clone(),
            identity: self.identities.identity_for(&parts.headers, sender)?,
        };
        // The headers go upstream; the log line only needs the method and path.
        let head = headers::upstream_head(
            parts.method.clone(),
            &parts.uri,
            std::mem::take(&mut parts.headers),
            authority,
        )
        .map_err(|e| RelayError::BadRequest(e.to_string()))?;
        let (data, trailers) = body.into_parts();
        let request = head.map(|()| data.unwrap_or_default());
        // Set by the upstream as the request goes on a connection: until then a client's reset
        // drops it (waiting in the queue or for a connect), after that it runs to its end.
        let ex = self
            .upstream
            .exchange(
                &key,
                Asker {
                    client: ctx.client,
                    committed,
                },
                request,
                trailers,
                deadline,
                self.request_timeout,
            )
            .await?;
        let conn = ex.conn;
        // Read whole, the answer's body gives its upstream slot back as it ends.
        let (mut parts, recv) = ex.response.into_parts();
        let left = deadline.saturating_duration_since(Instant::now());
        let answer = read_whole(recv, MAX_ANSWER_BODY, left)
            .await
            .map_err(|e| match e {
                ReadError::Timeout { .. } => {
                    RelayError::Upstream(self.upstream.timeout(self.request_timeout))
                }
                source => RelayError::AnswerBody { conn, source },
            })?;
        headers::downstream_headers(&mut parts.headers);
        parts.version = http::Version::HTTP_11;
        Ok((Response::from_parts(parts, answer), conn))
    }
}

/// The path (or a whole request target, absolute form included) with an APNs device token cut
/// to its first 8 characters: enough to correlate, not enough to address a device. Whatever
/// follows the token (a query, a fragment) goes with it.
pub fn loggable_path(path: &str) -> Cow<'_, str> {
    const DEVICE: &str = "/3/device/";
    let Some(at) = path.find(DEVICE) else {
        return Cow::Borrowed(path);
    };
    let (before, token) = path.split_at(at + DEVICE.len());
    match token.char_indices().nth(8) {
        Some((cut, _)) => Cow::Owned(format!("{before}{}…", &token[..cut])),
        None => Cow::Borrowed(path),
    }
}

/// Drives an HTTP connection until it ends; on shutdown, asks it to finish gracefully (GOAWAY for
/// HTTP/2, `Connection: close` for HTTP/1.1) and lets in-flight requests complete.
pub async fn drive<C>(conn: C, shutdown: &CancellationToken) -> Result<(), C::Error>
where
    C: GracefulConnection,
{
    let mut conn = std::pin::pin!(conn);
    tokio::select! {
        r = conn.as_mut() => r,
        _ = shutdown.cancelled() => {
            conn.as_mut().graceful_shutdown();
            conn.await
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_tokens_are_shortened_in_logs() {
        let token = "a".repeat(64);
        assert_eq!(
            loggable_path(&format!("/3/device/{token}")),
            "/3/device/aaaaaaaa…"
        );
        assert_eq!(loggable_path("/3/device/abc"), "/3/device/abc");
        assert_eq!(
            loggable_path(&format!("http://api.push.apple.com:80/3/device/{token}?x")),
            "http://api.push.apple.com:80/3/device/aaaaaaaa…"
        );
        assert_eq!(
            loggable_path(&format!("/3/device/{token}/3/device/{token}")),
            "/3/device/aaaaaaaa…"
        );
        assert_eq!(
            loggable_path("/v1/projects/x/messages:send"),
            "/v1/projects/x/messages:send"
        );
    }
}
