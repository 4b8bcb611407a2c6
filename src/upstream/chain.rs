//! The HTTP/1.1 route of a relay chain: every destination is reached through one DMZ pushrelay
//! (a post-proxy listener), over keep-alive connections that carry one request at a time, at most
//! `upstream.relay.max_connections` of them. `https://`: a CONNECT tunnel through the proxy, TLS to
//! the DMZ relay, requests in origin form with `Host` naming the DMZ relay and the APNs host in
//! `pushrelay-destination`. `http://`: requests in absolute form for the APNs host to the proxy
//! (whose parent is the DMZ relay), or to the DMZ relay when there is no proxy. HTTP/1.1 cannot say a request
//! went unprocessed, so once a byte of a push was written it is never sent again; an idle
//! connection found dead before the write is replaced, and the push goes once on the new one.
//! Failed connects back off as the HTTP/2 pool's do, one attempt at a time while the relay is down.

use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use base64::Engine;
use bytes::Bytes;
use http::header::HeaderName;
use http::{Request, Response};
use rustls::ClientConfig;
use rustls::pki_types::ServerName;
use tokio::net::TcpStream;
use tokio::sync::Semaphore;
use tokio::time::{Instant, timeout, timeout_at};
use tokio_rustls::TlsConnector;
use tokio_util::sync::CancellationToken;

use super::connect::{ConnectError, Connector};
pub use super::http1_client::WireError;
use super::http1_client::{self, Io};
use super::pool::{PoolKey, PoolSettings, backoff_delay};
use super::tunnel::TunnelError;
use crate::config::{Config, ProxyUrl, RelayUpstreamConfig, Secret, UpstreamConfig};
use crate::metrics::Metrics;
use crate::policy::Authority;

/// The header that carries the shared secret to the DMZ relay; pushrelay's own, stripped there
/// before anything goes to Apple (and by every pipeline, so a client can never forward one).
pub const SECRET_HEADER: HeaderName = HeaderName::from_static("pushrelay-relay-secret");

/// Over TLS, the destination (the APNs host, as the client named it) travels in this header of
/// pushrelay's own, and `Host` names the DMZ relay: a TLS-inspecting proxy (Squid ssl-bump)
/// forwards a bumped request only when its `Host` is the host it opened the tunnel to, and would
/// otherwise send it to the APNs host itself, past the DMZ relay.
pub const DESTINATION_HEADER: HeaderName = HeaderName::from_static("pushrelay-destination");

/// Set by a DMZ relay on every answer: one without it came from the proxy in between (its error
/// page for a request it refused), and is answered as the proxy's failure, never passed on as if
/// it were Apple's.
pub const DMZ_HEADER: HeaderName = HeaderName::from_static("pushrelay-dmz");

/// Why a connection to the DMZ relay could not be opened; each names its hop.
#[derive(Debug, thiserror::Error)]
pub enum ChainConnectError {
    /// DNS, TCP, or the proxy's CONNECT (the HTTP/2 pool's own steps).
    #[error(transparent)]
    Route(#[from] ConnectError),
    #[error("TLS handshake with DMZ relay {relay} failed: {source}")]
    Tls {
        relay: String,
        #[source]
        source: io::Error,
    },
    #[error("TLS handshake with DMZ relay {relay} timed out after {after:?}")]
    TlsTimeout { relay: String, after: Duration },
}

impl ChainConnectError {
    /// The hop that failed, for logs.
    pub fn hop(&self) -> &'static str {
        match self {
            ChainConnectError::Route(ConnectError::Tunnel(_)) => "proxy",
            ChainConnectError::Route(ConnectError::Resolve { .. }) => "dns",
            ChainConnectError::Route(_) => "relay",
            ChainConnectError::Tls { .. } | ChainConnectError::TlsTimeout { .. } => "relay-tls",
        }
    }

    pub fn proxy_status(&self) -> Option<u16> {
        match self {
            ChainConnectError::Route(ConnectError::Tunnel(t)) => t.proxy_status(),
            _ => None,
        }
    }
}

/// Why a request could not be exchanged with the DMZ relay.
#[derive(Debug, thiserror::Error)]
pub enum ChainError {
    #[error("connecting to DMZ relay {relay} failed: {source}")]
    Connect {
        relay: String,
        #[source]
        source: Arc<ChainConnectError>,
    },
    #[error(
        "DMZ relay {relay} is backing off after failures ({remaining:?} left); last error: {source}"
    )]
    BackingOff {
        relay: String,
        remaining: Duration,
        #[source]
        source: Arc<ChainConnectError>,
    },
    #[error(
        "DMZ relay {relay} is down and another request is reconnecting now; last error: {source}"
    )]
    Reconnecting {
        relay: String,
        #[source]
        source: Arc<ChainConnectError>,
    },
    #[error(
        "all {max} connections to DMZ relay {relay} stayed busy (upstream.relay.max_connections)"
    )]
    Busy { relay: String, max: usize },
    #[error("DMZ relay {relay} did not answer within {after:?} (the push may have been delivered)")]
    Timeout { relay: String, after: Duration },
    #[error("the proxy answered {status} instead of DMZ relay {relay} (connection {conn})")]
    ProxyAnswered {
        relay: String,
        conn: u64,
        status: u16,
    },
    #[error("exchange with DMZ relay {relay} on connection {conn} failed{}: {source}", if .source.nothing_written() { " (nothing was sent)" } else { " (the push may have been delivered; not sent again)" })]
    Exchange {
        relay: String,
        conn: u64,
        #[source]
        source: WireError,
    },
}

impl ChainError {
    /// The connect error behind a connect failure or a fail-fast, if that is what this is.
    pub fn connect_error(&self) -> Option<&ChainConnectError> {
        match self {
            ChainError::Connect { source, .. }
            | ChainError::BackingOff { source, .. }
            | ChainError::Reconnecting { source, .. } => Some(source),
            _ => None,
        }
    }

    /// The proxy's own status, when it answered in the DMZ relay's place or refused a tunnel.
    pub fn proxy_status(&self) -> Option<u16> {
        match self {
            ChainError::ProxyAnswered { status, .. } => Some(*status),
            _ => self
                .connect_error()
                .and_then(ChainConnectError::proxy_status),
        }
    }

    /// The hop that failed, for logs.
    pub fn hop(&self) -> &'static str {
        match self {
            ChainError::Busy { .. } => "pool",
            ChainError::ProxyAnswered { .. } => "proxy",
            ChainError::Timeout { .. } | ChainError::Exchange { .. } => "relay",
            _ => self.connect_error().map_or("relay", ChainConnectError::hop),
        }
    }
}

/// One keep-alive connection to the DMZ relay.
struct Conn {
    id: u64,
    io: Box<dyn Io>,
}

struct Idle {
    conn: Conn,
    since: Instant,
}

/// Whether the DMZ relay is reachable, as the HTTP/2 pool's `Health`.
#[derive(Default)]
struct Health {
    failures: u32,
    retry_at: Option<Instant>,
    last_error: Option<Arc<ChainConnectError>>,
    probing: bool,
}

/// How requests are written for this route.
enum Form {
    /// TLS to the DMZ relay (through a CONNECT tunnel when there is a proxy), origin-form.
    Tls {
        tls: Arc<ClientConfig>,
        connector: Connector,
    },
    /// Plain TCP to `to` (the proxy, or the DMZ relay), absolute-form; `proxy_auth` from the proxy URL.
    Plain {
        to: Authority,
        via_proxy: Option<ProxyUrl>,
        proxy_auth: Option<Secret>,
    },
}

/// The HTTP/1.1 route to the DMZ relay. Cheap to clone.
#[derive(Clone)]
pub struct Chain {
    inner: Arc<Inner>,
}

struct Inner {
    relay: Authority,
    form: Form,
    secret: Secret,
    max_connections: usize,
    idle_timeout: Duration,
    step_timeout: Duration,
    backoff: PoolSettings,
    /// One per connection in use: bounds the connections, idle ones included (see `checkout`).
    permits: Semaphore,
    idle: Mutex<Vec<Idle>>,
    health: Mutex<Health>,
    next_id: AtomicU64,
    metrics: Arc<Metrics>,
    closing: CancellationToken,
}

/// A connection in use, with its permit; dropped without `release`, the connection closes.
struct InUse<'a> {
    conn: Conn,
    _permit: tokio::sync::SemaphorePermit<'a>,
}

impl Chain {
    /// The route for `relay` (validated configuration), with `secret` read from its file.
    pub fn new(
        relay: &RelayUpstreamConfig,
        secret: Secret,
        upstream: &UpstreamConfig,
        tls: Arc<ClientConfig>,
        metrics: Arc<Metrics>,
    ) -> Self {
        let dmz = relay.url.authority.clone();
        let form = if relay.url.tls {
            Form::Tls {
                tls,
                connector: Connector::new(upstream),
            }
        } else {
            let via_proxy = upstream
                .proxy
                .clone()
                .filter(|_| !Config::bypasses_proxy(&upstream.no_proxy, dmz.host()));
            let proxy_auth = via_proxy.as_ref().and_then(|p| {
                let user = p.username.as_ref()?;
                let pass = p.password.as_ref().map(Secret::expose).unwrap_or("");
                let token =
                    base64::engine::general_purpose::STANDARD.encode(format!("{user}:{pass}"));
                Some(Secret::new(format!("Basic {token}")))
            });
            let to = match &via_proxy {
                Some(p) => Authority::new(&p.host, p.port).unwrap_or_else(|_| dmz.clone()),
                None => upstream
                    .connect_to
                    .get(&dmz)
                    .and_then(|a| a.parse().ok())
                    .unwrap_or_else(|| dmz.clone()),
            };
            Form::Plain {
                to,
                via_proxy,
                proxy_auth,
            }
        };
        let closing = CancellationToken::new();
        let chain = Chain {
            inner: Arc::new(Inner {
                relay: dmz,
                form,
                secret,
                max_connections: relay.max_connections,
                idle_timeout: relay.idle_timeout,
                step_timeout: upstream.connect_timeout,
                backoff: PoolSettings::from_config(upstream),
                permits: Semaphore::new(relay.max_connections),
                idle: Mutex::new(Vec::new()),
                health: Mutex::new(Health::default()),
                next_id: AtomicU64::new(1),
                metrics,
                closing: closing.clone(),
            }),
        };
        // Idle connections close after `idle_timeout` even when no request comes to notice.
        let weak = Arc::downgrade(&chain.inner);
        let every = relay.idle_timeout / 2;
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(async move {
                loop {
                    tokio::select! {
                        _ = closing.cancelled() => break,
                        _ = tokio::time::sleep(every) => {}
                    }
                    let Some(inner) = weak.upgrade() else { break };
                    inner
                        .lock_idle()
                        .retain(|i| i.since.elapsed() < inner.idle_timeout);
                }
                if let Some(inner) = weak.upgrade() {
                    inner.lock_idle().clear();
                }
            });
        }
        chain
    }

    /// Closes every idle connection and stops keeping any (at shutdown).
    pub fn close(&self) {
        self.inner.closing.cancel();
        self.inner.lock_idle().clear();
    }

    /// Sends one request (its body whole) through the DMZ relay and reads the answer whole,
    /// until `deadline`: the answer, the connection that carried it, and whether it was sent on
    /// a second connection because the first was found dead before the write.
    pub async fn exchange(
        &self,
        key: &PoolKey,
        head: &Request<()>,
        body: &[u8],
        deadline: Instant,
        request_timeout: Duration,
    ) -> Result<(Response<Bytes>, u64, bool), ChainError> {
        let inner = &self.inner;
        let bytes = inner.request_bytes(key, head, body);
        let relay = inner.relay.to_string();
        let permit = match timeout_at(deadline, inner.permits.acquire()).await {
            Ok(Ok(permit)) => permit,
            Ok(Err(_)) | Err(_) => {
                return Err(ChainError::Busy {
                    relay,
                    max: inner.max_connections,
                });
            }
        };
        let attempts = async {
            let mut resent = false;
            let mut in_use = InUse {
                conn: inner.checkout().await?,
                _permit: permit,
            };
            loop {
                let conn = in_use.conn.id;
                let wrote = http1_client::write_request(&mut in_use.conn.io, &bytes).await;
                let result = match wrote {
                    Ok(()) => http1_client::read_answer(&mut in_use.conn.io, head.method()).await,
                    Err(e) => Err(e),
                };
                match result {
                    Ok(answer) if !answer.response.headers().contains_key(DMZ_HEADER) => {
                        return Err(ChainError::ProxyAnswered {
                            relay: relay.clone(),
                            conn,
                            status: answer.response.status().as_u16(),
                        });
                    }
                    Ok(answer) => {
                        if answer.reusable && !inner.closing.is_cancelled() {
                            inner.lock_idle().push(Idle {
                                conn: in_use.conn,
                                since: Instant::now(),
                            });
                        }
                        return Ok((answer.response, conn, resent));
                    }
                    // Nothing of it left: one more connection may take it.
                    Err(e) if e.nothing_written() && !resent => {
                        tracing::debug!(upstream.conn = conn, error = %e, "connection to the DMZ relay dead before the write; sending on a new one");
                        resent = true;
                        in_use.conn = inner.checkout().await?;
                    }
                    Err(source) => {
                        return Err(ChainError::Exchange {
                            relay: relay.clone(),
                            conn,
                            source,
                        });
                    }
                }
            }
        };
        match timeout_at(deadline, attempts).await {
            Ok(r) => r,
            Err(_) => Err(ChainError::Timeout {
                relay,
                after: request_timeout,
            }),
        }
    }
}

impl Inner {
    fn lock_idle(&self) -> MutexGuard<'_, Vec<Idle>> {
        // A panic while holding this lock leaves at worst a connection too many or too few.
        self.idle.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn lock_health(&self) -> MutexGuard<'_, Health> {
        self.health.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The request as written on this route: origin form over TLS (`Host` the DMZ relay, the
    /// destination in its own header), absolute form in plain; the relay secret (and proxy
    /// credentials) added.
    fn request_bytes(&self, key: &PoolKey, head: &Request<()>, body: &[u8]) -> Vec<u8> {
        let host = head
            .uri()
            .authority()
            .map_or_else(|| key.dest.as_shared_str().as_ref(), |a| a.as_str());
        let path = head.uri().path_and_query().map_or("/", |p| p.as_str());
        let mut extra = vec![(SECRET_HEADER, self.secret.expose())];
        match &self.form {
            Form::Tls { .. } => {
                extra.push((DESTINATION_HEADER, host));
                let relay = self.relay.as_shared_str();
                http1_client::encode_request(
                    head.method(),
                    path,
                    relay,
                    head.headers(),
                    &extra,
                    body,
                )
            }
            Form::Plain { proxy_auth, .. } => {
                if let Some(auth) = proxy_auth {
                    extra.push((http::header::PROXY_AUTHORIZATION, auth.expose()));
                }
                let target = format!("http://{host}{path}");
                http1_client::encode_request(
                    head.method(),
                    &target,
                    host,
                    head.headers(),
                    &extra,
                    body,
                )
            }
        }
    }

    /// A live idle connection, or a new one (subject to back-off). Idle connections found dead
    /// (closed by the DMZ relay or the proxy meanwhile) are dropped on the way.
    async fn checkout(&self) -> Result<Conn, ChainError> {
        loop {
            let Some(mut idle) = self.lock_idle().pop() else {
                break;
            };
            if idle.since.elapsed() < self.idle_timeout && !http1_client::is_dead(&mut idle.conn.io)
            {
                return Ok(idle.conn);
            }
            tracing::debug!(
                upstream.conn = idle.conn.id,
                "idle connection to the DMZ relay closed; dropped"
            );
        }
        let relay = self.relay.to_string();
        let probe = {
            let mut health = self.lock_health();
            let now = Instant::now();
            if let Some(error) = health.last_error.clone() {
                if let Some(at) = health.retry_at.filter(|at| *at > now) {
                    return Err(ChainError::BackingOff {
                        relay,
                        remaining: at - now,
                        source: error,
                    });
                }
                if health.probing {
                    return Err(ChainError::Reconnecting {
                        relay,
                        source: error,
                    });
                }
                health.probing = true;
                true
            } else {
                false
            }
        };
        // Cleared however the attempt ends, cancellation (the request's deadline) included: a
        // flag left set would make every later request fail fast for good.
        let probe_guard = probe.then_some(ProbeGuard(self));
        let result = self.open().await;
        drop(probe_guard);
        let mut health = self.lock_health();
        match result {
            Ok(conn) => {
                *health = Health::default();
                tracing::info!(upstream.relay = %self.relay, upstream.conn = conn.id, "connection to the DMZ relay ready");
                Ok(conn)
            }
            Err(e) => {
                // Connects made together while the relay was healthy fail together: they are one
                // failure, not many, or a short outage would back off for a minute. After that,
                // only the one probe at a time counts.
                if probe || health.last_error.is_none() {
                    health.failures = health.failures.saturating_add(1);
                    let delay = backoff_delay(&self.backoff, health.failures, jitter());
                    health.retry_at = Some(Instant::now() + delay);
                }
                let delay = health.retry_at.map_or(Duration::ZERO, |at| {
                    at.saturating_duration_since(Instant::now())
                });
                match &e {
                    ChainConnectError::Route(ConnectError::Tunnel(t)) => {
                        self.metrics.proxy_failure(&match t {
                            TunnelError::Refused { status, .. } => status.to_string(),
                            TunnelError::ConnectTimeout { .. }
                            | TunnelError::ReplyTimeout { .. } => "timeout".into(),
                            TunnelError::Connect { .. } => "unreachable".into(),
                            _ => "malformed".into(),
                        })
                    }
                    ChainConnectError::Tls { .. } | ChainConnectError::TlsTimeout { .. } => {
                        self.metrics.tls_failure("upstream")
                    }
                    ChainConnectError::Route(_) => {}
                }
                let e = Arc::new(e);
                health.last_error = Some(e.clone());
                tracing::warn!(
                    upstream.relay = %self.relay,
                    upstream.hop = e.hop(),
                    proxy.status = e.proxy_status(),
                    retry_in_ms = delay.as_millis() as u64,
                    error = %e,
                    "connect to the DMZ relay failed"
                );
                Err(ChainError::Connect { relay, source: e })
            }
        }
    }

    /// Opens one connection: TCP (through the tunnel for https://), then TLS for https://.
    async fn open(&self) -> Result<Conn, ChainConnectError> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let io: Box<dyn Io> = match &self.form {
            Form::Tls { tls, connector } => {
                let (tcp, _route) = connector.tcp(&self.relay).await?;
                let relay = self.relay.to_string();
                let name = ServerName::try_from(self.relay.host().to_owned()).map_err(|e| {
                    ChainConnectError::Tls {
                        relay: relay.clone(),
                        source: io::Error::new(io::ErrorKind::InvalidInput, e),
                    }
                })?;
                match timeout(
                    self.step_timeout,
                    TlsConnector::from(tls.clone()).connect(name, tcp),
                )
                .await
                {
                    Err(_) => {
                        return Err(ChainConnectError::TlsTimeout {
                            relay,
                            after: self.step_timeout,
                        });
                    }
                    Ok(Err(source)) => return Err(ChainConnectError::Tls { relay, source }),
                    Ok(Ok(stream)) => Box::new(stream),
                }
            }
            Form::Plain { to, via_proxy, .. } => Box::new(self.tcp(to, via_proxy.as_ref()).await?),
        };
        Ok(Conn { id, io })
    }

    /// Plain TCP to `to`; a failure names the proxy when `to` is the proxy.
    async fn tcp(
        &self,
        to: &Authority,
        proxy: Option<&ProxyUrl>,
    ) -> Result<TcpStream, ConnectError> {
        let addr = to.to_string();
        let connected = timeout(self.step_timeout, TcpStream::connect(addr.as_str())).await;
        let stream = match (connected, proxy) {
            (Ok(Ok(s)), _) => s,
            (Err(_), Some(p)) => {
                return Err(TunnelError::ConnectTimeout {
                    proxy: p.to_string(),
                    after: self.step_timeout,
                }
                .into());
            }
            (Ok(Err(source)), Some(p)) => {
                return Err(TunnelError::Connect {
                    proxy: p.to_string(),
                    source,
                }
                .into());
            }
            (Err(_), None) => {
                return Err(ConnectError::TcpTimeout {
                    addr,
                    after: self.step_timeout,
                });
            }
            (Ok(Err(source)), None) => return Err(ConnectError::Tcp { addr, source }),
        };
        let _ = stream.set_nodelay(true);
        Ok(stream)
    }
}

/// The one connect attempt made while the DMZ relay is down; dropped, it lets the next start.
struct ProbeGuard<'a>(&'a Inner);

impl Drop for ProbeGuard<'_> {
    fn drop(&mut self) {
        self.0.lock_health().probing = false;
    }
}

/// In [0.5, 1.0], so relays that failed together do not retry together (the clock's nanoseconds
/// are random enough for that).
fn jitter() -> f64 {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    0.5 + f64::from(nanos % 1000) / 2000.0
}
