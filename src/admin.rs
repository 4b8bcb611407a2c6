//! The admin listener: `/healthz` (the process answers), `/readyz` (listeners bound and
//! configuration loaded; never depends on Apple being reachable, so a proxy outage does not make
//! every replica unready at once), `/metrics` (Prometheus text), and the status page: `/` (HTML)
//! and `/status.json`, one `recent::Snapshot` gathered per request from what the relay recorded
//! and what the listeners and the pool hold now. Plain HTTP/1.1, GET only.
//! Bounded like the front doors: a head must arrive within a timeout, and connections beyond a
//! small cap are closed at once, so a stray client cannot hold the probes' listener.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, header};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use crate::metrics::recent::{self, DestinationLive, DestinationState, Failure, Live};
use crate::relay::Relay;
use crate::relay::body::RelayBody;
use crate::status;
use crate::upstream::connect::{ConnectError, Connector, Route};
use crate::upstream::pool::DestHealth;
use crate::upstream::tunnel::TunnelError;

/// What the status page reads besides the relay's own records.
pub struct StatusSources {
    pub about: recent::About,
    /// Each listener's connection limit, by name: connections now are the permits taken.
    pub connections: Vec<(String, Arc<Semaphore>)>,
    pub max_connections: usize,
    /// The route each destination takes (upstream settings change only with a restart).
    pub routes: Connector,
    /// `upstream.relay`'s URL: with a relay chain every destination goes through the DMZ relay.
    pub chain: Option<String>,
}

impl StatusSources {
    fn live(&self, relay: &Relay) -> Live {
        let connections = self
            .connections
            .iter()
            .map(|(name, limit)| {
                let used = self
                    .max_connections
                    .saturating_sub(limit.available_permits());
                (name.clone(), used)
            })
            .collect();
        let mut pool: BTreeMap<String, (usize, usize)> = BTreeMap::new();
        for (key, stats) in relay.pool().stats() {
            let e = pool.entry(key.dest.to_string()).or_default();
            e.0 += stats.open_connections;
            e.1 += stats.streams_in_flight;
        }
        // One destination may have several identities; the one down the longest speaks for it.
        let mut health: BTreeMap<String, DestHealth> = BTreeMap::new();
        for (key, h) in relay.pool().health() {
            let e = health
                .entry(key.dest.to_string())
                .or_insert_with(|| h.clone());
            e.connecting |= h.connecting;
            if h.failures > 0 && (e.failures == 0 || h.down_since < e.down_since) {
                *e = DestHealth {
                    connecting: e.connecting,
                    ..h
                };
            }
        }
        let destinations = relay
            .destinations()
            .allowed()
            .into_iter()
            .map(|dest| {
                let name = dest.to_string();
                let (connections, streams_in_flight) = pool.get(&name).copied().unwrap_or_default();
                let route = match (&self.chain, self.routes.route(dest)) {
                    (Some(relay), Route::Proxy { proxy, .. }) => {
                        format!("via relay {relay} (through proxy {proxy})")
                    }
                    (Some(relay), Route::Direct { .. }) => format!("via relay {relay}"),
                    (None, Route::Direct { addr }) => format!("direct to {addr}"),
                    (None, Route::Proxy { proxy, target }) => {
                        format!("via proxy {proxy} (CONNECT {target})")
                    }
                };
                let state = state_of(connections, health.get(&name));
                DestinationLive {
                    name,
                    route,
                    connections,
                    streams_in_flight,
                    state,
                }
            })
            .collect();
        Live {
            connections,
            destinations,
        }
    }

    fn snapshot(&self, relay: &Relay) -> recent::Snapshot {
        relay
            .metrics()
            .status()
            .snapshot(&self.about, &self.live(relay), SystemTime::now())
    }
}

/// Admin connections open at once at most: probes and a scraper or two need a handful.
pub const MAX_CONNECTIONS: usize = 32;

/// How the admin listener bounds its clients.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// A request head (and the wait for the next one on a kept-alive connection) at most.
    pub head_timeout: Duration,
    pub max_connections: usize,
}

/// Whether the relay takes traffic: set once listeners run, cleared when draining starts.
#[derive(Default)]
pub struct Readiness(AtomicBool);

impl Readiness {
    pub fn set(&self, ready: bool) {
        self.0.store(ready, Ordering::Release);
    }

    pub fn get(&self) -> bool {
        self.0.load(Ordering::Acquire)
    }
}

/// Up with a connection open; otherwise as the pool's health says.
fn state_of(open: usize, health: Option<&DestHealth>) -> DestinationState {
    let Some(h) = health.filter(|_| open == 0) else {
        return match open {
            0 => DestinationState::Idle,
            _ => DestinationState::Up,
        };
    };
    let last_failure = h.last_error.as_deref().map(failure);
    match (h.connecting, last_failure) {
        (true, last_failure) => DestinationState::Connecting {
            failures: h.failures,
            last_failure,
        },
        (false, Some(last_failure)) if h.failures > 0 => DestinationState::BackingOff {
            since: h
                .down_since
                .map_or_else(|| "–".to_owned(), |t| recent::utc(recent::unix_seconds(t))),
            failures: h.failures,
            retry_in_seconds: h.retry_in.map_or(0, |d| d.as_secs_f64().ceil() as u64),
            last_failure,
        },
        _ => DestinationState::Idle,
    }
}

/// The hop that failed, in the other side's words where it gave some (`proxy answered 407 …`).
fn failure(e: &ConnectError) -> Failure {
    let hop = match e {
        ConnectError::Tunnel(TunnelError::Refused { status, reason, .. }) => {
            format!("proxy answered {status} {reason}")
        }
        e if e.is_timeout() => format!("{} timed out", e.hop()),
        e => format!("{} failed", e.hop()),
    };
    Failure {
        hop,
        error: e.to_string(),
    }
}

fn text(
    status: StatusCode,
    content_type: &'static str,
    body: impl Into<Bytes>,
) -> Response<RelayBody> {
    let mut response = Response::new(RelayBody::full(body));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        http::HeaderValue::from_static(content_type),
    );
    response
}

fn answer(
    req: &Request<Incoming>,
    relay: &Relay,
    ready: &Readiness,
    sources: &StatusSources,
) -> Response<RelayBody> {
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return text(StatusCode::METHOD_NOT_ALLOWED, "text/plain", "GET only\n");
    }
    match req.uri().path() {
        "/healthz" => text(StatusCode::OK, "text/plain", "ok\n"),
        "/readyz" if ready.get() => text(StatusCode::OK, "text/plain", "ready\n"),
        "/readyz" => text(StatusCode::SERVICE_UNAVAILABLE, "text/plain", "not ready\n"),
        "/metrics" => text(
            StatusCode::OK,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
            {
                relay
                    .metrics()
                    .log_lines_dropped(crate::log::dropped_lines());
                relay.metrics().render(relay.pool())
            },
        ),
        "/" => text(
            StatusCode::OK,
            "text/html; charset=utf-8",
            status::html(&sources.snapshot(relay)),
        ),
        "/status.json" => text(
            StatusCode::OK,
            "application/json",
            status::json(&sources.snapshot(relay)),
        ),
        _ => text(
            StatusCode::NOT_FOUND,
            "text/plain",
            "not found: /, /status.json, /healthz, /readyz, /metrics\n",
        ),
    }
}

/// Serves the admin endpoints on `socket` until `shutdown`.
pub async fn serve(
    socket: TcpListener,
    relay: Arc<Relay>,
    ready: Arc<Readiness>,
    limits: Limits,
    sources: Arc<StatusSources>,
    shutdown: CancellationToken,
) {
    let slots = Arc::new(tokio::sync::Semaphore::new(limits.max_connections));
    loop {
        let (stream, peer) = tokio::select! {
            _ = shutdown.cancelled() => return,
            r = socket.accept() => match r {
                Ok(pair) => pair,
                Err(e) => {
                    tracing::warn!(error = %e, "admin accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            tracing::warn!(client.addr = %peer, limit = limits.max_connections, "admin connection refused: too many open");
            drop(stream);
            continue;
        };
        let (relay, ready, sources, shutdown) = (
            relay.clone(),
            ready.clone(),
            sources.clone(),
            shutdown.clone(),
        );
        tokio::spawn(async move {
            let _slot = slot;
            let service = service_fn(move |req| {
                let response = answer(&req, &relay, &ready, &sources);
                async move { Ok::<_, Infallible>(response) }
            });
            let conn = http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(limits.head_timeout)
                .max_buf_size(8192)
                .serve_connection(TokioIo::new(stream), service);
            if let Err(e) = crate::relay::drive(conn, &shutdown).await {
                tracing::debug!(client.addr = %peer, error = %e, "admin connection ended with an error");
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn refused_407() -> Arc<ConnectError> {
        Arc::new(ConnectError::Tunnel(TunnelError::Refused {
            proxy: "http://relay:***@127.0.0.1:3128".into(),
            target: "api.push.apple.com:443".into(),
            status: 407,
            reason: "Proxy Authentication Required".into(),
            headers: vec![],
        }))
    }

    fn down(connecting: bool, retry_in: Duration) -> DestHealth {
        DestHealth {
            connecting,
            failures: 2,
            down_since: Some(std::time::UNIX_EPOCH + Duration::from_secs(1_796_155_509)),
            retry_in: Some(retry_in),
            last_error: Some(refused_407()),
        }
    }

    /// An open connection means up whatever came before; otherwise the pool's health decides.
    #[test]
    fn destination_state_follows_the_pool() {
        assert_eq!(
            state_of(1, Some(&down(false, Duration::ZERO))),
            DestinationState::Up
        );
        assert_eq!(state_of(0, None), DestinationState::Idle);
        let healthy = DestHealth {
            connecting: false,
            failures: 0,
            down_since: None,
            retry_in: None,
            last_error: None,
        };
        assert_eq!(state_of(0, Some(&healthy)), DestinationState::Idle);
        let first = DestHealth {
            connecting: true,
            ..healthy
        };
        assert_eq!(
            state_of(0, Some(&first)),
            DestinationState::Connecting {
                failures: 0,
                last_failure: None
            }
        );
        match state_of(0, Some(&down(false, Duration::from_millis(1500)))) {
            DestinationState::BackingOff {
                since,
                failures,
                retry_in_seconds,
                last_failure,
            } => {
                assert_eq!(since, "2026-12-01 20:05:09 UTC");
                assert_eq!((failures, retry_in_seconds), (2, 2));
                assert_eq!(
                    last_failure.hop,
                    "proxy answered 407 Proxy Authentication Required"
                );
                assert!(
                    last_failure.error.contains("refused CONNECT"),
                    "{last_failure:?}"
                );
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            state_of(0, Some(&down(true, Duration::ZERO))),
            DestinationState::Connecting {
                failures: 2,
                last_failure: Some(_)
            }
        ));
    }

    #[test]
    fn failures_name_the_hop() {
        let tcp = ConnectError::TcpTimeout {
            addr: "127.0.0.1:1".into(),
            after: Duration::from_secs(2),
        };
        assert_eq!(failure(&tcp).hop, "tcp timed out");
        let tls = ConnectError::NoH2 {
            host: "api.push.apple.com".into(),
            alpn: "http/1.1".into(),
        };
        assert_eq!(failure(&tls).hop, "tls failed");
    }
}
