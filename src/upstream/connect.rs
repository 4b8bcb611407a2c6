//! Opens one upstream HTTP/2 connection: the route (direct, or through the CONNECT proxy, with
//! `connect_to` overriding the address), TLS with SNI = the destination host, then the HTTP/2
//! handshake. One budget (`connect_timeout`) bounds the whole attempt; each step has its own
//! error, and a timeout names the step it cut, so a failure names the hop.

use std::collections::{BTreeMap, HashMap};
use std::io;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use rustls::ClientConfig;
use rustls::pki_types::ServerName;
use tokio::net::TcpStream;
use tokio::time::{Instant, timeout_at};
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;

use super::tunnel::{self, TunnelError};
use crate::coalesce::Coalesce;
use crate::config::{Config, ProxyUrl, UpstreamConfig};
use crate::metrics::Metrics;
use crate::policy::Authority;
use crate::tls::ALPN_H2;

pub type H2Send = h2::client::SendRequest<Bytes>;
pub type H2Connection = h2::client::Connection<Coalesce<TlsStream<TcpStream>>, Bytes>;

/// Our receive windows: large enough that an APNs answer never waits for a WINDOW_UPDATE.
const STREAM_WINDOW: u32 = 1024 * 1024;
const CONNECTION_WINDOW: u32 = 8 * 1024 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("cannot resolve {host}: {source}")]
    Resolve {
        host: String,
        #[source]
        source: io::Error,
    },
    #[error("resolving {host} timed out after {after:?}")]
    ResolveTimeout { host: String, after: Duration },
    #[error("TCP connect to {addr} failed: {source}")]
    Tcp {
        addr: String,
        #[source]
        source: io::Error,
    },
    #[error("TCP connect to {addr} timed out after {after:?}")]
    TcpTimeout { addr: String, after: Duration },
    #[error(transparent)]
    Tunnel(#[from] TunnelError),
    #[error("TLS handshake with {host} failed: {source}")]
    Tls {
        host: String,
        #[source]
        source: io::Error,
    },
    #[error("TLS handshake with {host} timed out after {after:?}")]
    TlsTimeout { host: String, after: Duration },
    /// The peer's TLS refused our client certificate once our side of the handshake was done:
    /// TLS 1.3 says so only at the first read, so this is seen on the connection's first
    /// exchange and recorded as its connect's failure.
    #[error("{host} refused our client certificate after the TLS handshake: {reason}")]
    CertificateRefused { host: String, reason: String },
    #[error("{host} selected ALPN {alpn:?} instead of h2")]
    NoH2 { host: String, alpn: String },
    #[error("HTTP/2 handshake with {host} failed: {source}")]
    H2 {
        host: String,
        #[source]
        source: h2::Error,
    },
    #[error("HTTP/2 handshake with {host} timed out after {after:?}")]
    H2Timeout { host: String, after: Duration },
    /// The native HTTP/2 client's connection ended before it was ready, in the codec's words.
    #[error("HTTP/2 with {host} failed: {reason}")]
    Http2 { host: String, reason: String },
    /// In a relay chain, a step on the way to the DMZ relay (DNS, TCP, the proxy's CONNECT, TLS)
    /// failed: `source` says which.
    #[error("DMZ relay {relay}: {source}")]
    Relay {
        relay: String,
        #[source]
        source: Box<ConnectError>,
    },
}

impl ConnectError {
    /// Whether a retry cannot fix it: the proxy refused us (407: credentials, 403: policy), the
    /// name does not resolve, or the origin's certificate does not verify. Requests fail at once
    /// on these instead of waiting for the destination to come back.
    pub fn is_lasting(&self) -> bool {
        match self {
            ConnectError::Relay { source, .. } => source.is_lasting(),
            ConnectError::Tunnel(TunnelError::Refused { status, .. }) => {
                matches!(status, 403 | 407)
            }
            ConnectError::Resolve { .. } | ConnectError::CertificateRefused { .. } => true,
            ConnectError::Tls { source, .. } => source
                .get_ref()
                .and_then(|e| e.downcast_ref::<rustls::Error>())
                .is_some_and(|e| {
                    matches!(
                        e,
                        rustls::Error::InvalidCertificate(_)
                            | rustls::Error::NoCertificatesPresented
                    )
                }),
            _ => false,
        }
    }

    /// Whether the step that failed was a timeout.
    pub fn is_timeout(&self) -> bool {
        if let ConnectError::Relay { source, .. } = self {
            return source.is_timeout();
        }
        matches!(
            self,
            ConnectError::ResolveTimeout { .. }
                | ConnectError::TcpTimeout { .. }
                | ConnectError::TlsTimeout { .. }
                | ConnectError::H2Timeout { .. }
                | ConnectError::Tunnel(
                    TunnelError::ConnectTimeout { .. } | TunnelError::ReplyTimeout { .. }
                )
        )
    }

    /// The hop that failed, for logs and metrics.
    pub fn hop(&self) -> &'static str {
        match self {
            ConnectError::Resolve { .. } | ConnectError::ResolveTimeout { .. } => "dns",
            ConnectError::Tcp { .. } | ConnectError::TcpTimeout { .. } => "tcp",
            ConnectError::Tunnel(_) => "proxy",
            ConnectError::Tls { .. }
            | ConnectError::TlsTimeout { .. }
            | ConnectError::CertificateRefused { .. }
            | ConnectError::NoH2 { .. } => "tls",
            ConnectError::H2 { .. }
            | ConnectError::H2Timeout { .. }
            | ConnectError::Http2 { .. } => "h2",
            ConnectError::Relay { source, .. } => match source.as_ref() {
                ConnectError::Tunnel(_) => "proxy",
                ConnectError::Resolve { .. } | ConnectError::ResolveTimeout { .. } => "dns",
                ConnectError::Tls { .. }
                | ConnectError::TlsTimeout { .. }
                | ConnectError::CertificateRefused { .. } => "relay-tls",
                _ => "relay",
            },
        }
    }

    /// The proxy's refusal or failure behind this, on the way to the origin or the DMZ relay.
    pub fn tunnel(&self) -> Option<&TunnelError> {
        match self {
            ConnectError::Tunnel(t) => Some(t),
            ConnectError::Relay { source, .. } => source.tunnel(),
            _ => None,
        }
    }

    /// Whether TLS (to the origin or the DMZ relay) is what failed.
    pub fn is_tls(&self) -> bool {
        match self {
            ConnectError::Tls { .. }
            | ConnectError::TlsTimeout { .. }
            | ConnectError::CertificateRefused { .. }
            | ConnectError::NoH2 { .. } => true,
            ConnectError::Relay { source, .. } => source.is_tls(),
            _ => false,
        }
    }
}

/// How a destination is reached.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Route {
    Direct { addr: String },
    Proxy { proxy: String, target: String },
}

/// A fresh upstream connection, not yet driven.
pub struct Connected {
    pub send: H2Send,
    pub connection: H2Connection,
    pub route: Route,
}

/// What both HTTP/2 kinds (the h2 crate's client and the native one) open connections with:
/// the connector (DNS, the CONNECT proxy, TLS), the client config that presents each identity
/// (None: anonymous), keepalive, and the metrics their drivers count GOAWAYs in.
pub struct OriginSetup {
    pub connector: Connector,
    pub tls: HashMap<Option<Arc<str>>, Arc<ClientConfig>>,
    pub keepalive_interval: Duration,
    pub keepalive_timeout: Duration,
    pub metrics: Arc<Metrics>,
}

impl OriginSetup {
    /// The client config for `identity`, else the anonymous one.
    pub fn tls_for(
        &self,
        dest: &Authority,
        identity: &Option<Arc<str>>,
    ) -> Result<&Arc<ClientConfig>, ConnectError> {
        self.tls
            .get(identity)
            .or_else(|| self.tls.get(&None))
            .ok_or_else(|| ConnectError::Tls {
                host: dest.host().to_owned(),
                source: std::io::Error::other("no TLS configuration for this identity"),
            })
    }
}

/// Opens upstream connections. Cheap to clone.
#[derive(Clone)]
pub struct Connector {
    proxy: Option<ProxyUrl>,
    no_proxy: Vec<String>,
    connect_to: BTreeMap<Authority, String>,
    /// Bounds a whole attempt (`upstream.connect_timeout`).
    budget: Duration,
}

impl Connector {
    pub fn new(upstream: &UpstreamConfig) -> Self {
        Connector {
            proxy: upstream.proxy.clone(),
            no_proxy: upstream.no_proxy.clone(),
            connect_to: upstream.connect_to.clone(),
            budget: upstream.connect_timeout,
        }
    }

    pub fn route(&self, dest: &Authority) -> Route {
        let addr = self
            .connect_to
            .get(dest)
            .cloned()
            .unwrap_or_else(|| dest.to_string());
        match &self.proxy {
            Some(proxy) if !Config::bypasses_proxy(&self.no_proxy, dest.host()) => Route::Proxy {
                proxy: proxy.to_string(),
                target: addr,
            },
            _ => Route::Direct { addr },
        }
    }

    /// The end of an attempt starting now.
    pub fn deadline(&self) -> Instant {
        Instant::now() + self.budget
    }

    /// The whole attempt's budget, as timeouts report it.
    pub fn budget(&self) -> Duration {
        self.budget
    }

    /// TCP (direct or tunnelled) to `dest`.
    pub async fn tcp(&self, dest: &Authority) -> Result<(TcpStream, Route), ConnectError> {
        self.tcp_until(dest, self.deadline()).await
    }

    pub async fn tcp_until(
        &self,
        dest: &Authority,
        deadline: Instant,
    ) -> Result<(TcpStream, Route), ConnectError> {
        let route = self.route(dest);
        let stream = match (&route, &self.proxy) {
            (Route::Proxy { target, .. }, Some(proxy)) => {
                let left = deadline.saturating_duration_since(Instant::now());
                tunnel::open(proxy, target, left).await?.0
            }
            (Route::Direct { addr }, _) | (Route::Proxy { target: addr, .. }, None) => {
                let timed_out = || ConnectError::TcpTimeout {
                    addr: addr.clone(),
                    after: self.budget,
                };
                let addrs: Vec<_> = timeout_at(deadline, tokio::net::lookup_host(addr.as_str()))
                    .await
                    .map_err(|_| ConnectError::ResolveTimeout {
                        host: addr.clone(),
                        after: self.budget,
                    })?
                    .map_err(|source| ConnectError::Resolve {
                        host: addr.clone(),
                        source,
                    })?
                    .collect();
                match timeout_at(deadline, connect_any(&addrs)).await {
                    Err(_) => return Err(timed_out()),
                    Ok(Err(source)) => {
                        return Err(ConnectError::Tcp {
                            addr: addr.clone(),
                            source,
                        });
                    }
                    Ok(Ok(s)) => s,
                }
            }
        };
        let _ = stream.set_nodelay(true);
        Ok((stream, route))
    }

    /// TLS over `stream` with SNI = `dest`'s host; ALPN must not be anything but h2.
    pub async fn tls(
        &self,
        stream: TcpStream,
        dest: &Authority,
        tls: &Arc<ClientConfig>,
    ) -> Result<TlsStream<TcpStream>, ConnectError> {
        self.tls_until(stream, dest, tls, self.deadline()).await
    }

    async fn tls_until(
        &self,
        stream: TcpStream,
        dest: &Authority,
        tls: &Arc<ClientConfig>,
        deadline: Instant,
    ) -> Result<TlsStream<TcpStream>, ConnectError> {
        let host = dest.host().to_owned();
        let server_name = ServerName::try_from(host.clone()).map_err(|e| ConnectError::Tls {
            host: host.clone(),
            source: io::Error::new(io::ErrorKind::InvalidInput, e),
        })?;
        let connector = TlsConnector::from(tls.clone());
        let tls_stream = match timeout_at(deadline, connector.connect(server_name, stream)).await {
            Err(_) => {
                return Err(ConnectError::TlsTimeout {
                    host,
                    after: self.budget,
                });
            }
            Ok(Err(source)) => return Err(ConnectError::Tls { host, source }),
            Ok(Ok(s)) => s,
        };
        match tls_stream.get_ref().1.alpn_protocol() {
            // No ALPN at all: some inspecting proxies strip it; HTTP/2 by prior knowledge still works.
            None => {}
            Some(ALPN_H2) => {}
            Some(other) => {
                return Err(ConnectError::NoH2 {
                    host,
                    alpn: String::from_utf8_lossy(other).into_owned(),
                });
            }
        }
        Ok(tls_stream)
    }

    /// Route and TLS by `deadline`, for a client that runs HTTP/2 itself.
    pub async fn tls_stream(
        &self,
        dest: &Authority,
        tls: &Arc<ClientConfig>,
        deadline: Instant,
    ) -> Result<(TlsStream<TcpStream>, Route), ConnectError> {
        let (tcp, route) = self.tcp_until(dest, deadline).await?;
        let tls_stream = self.tls_until(tcp, dest, tls, deadline).await?;
        Ok((tls_stream, route))
    }

    /// The whole way, all by `deadline`: route, TLS and the HTTP/2 handshake.
    pub async fn connect(
        &self,
        dest: &Authority,
        tls: &Arc<ClientConfig>,
        deadline: Instant,
    ) -> Result<Connected, ConnectError> {
        let (tcp, route) = self.tcp_until(dest, deadline).await?;
        let tls_stream = self.tls_until(tcp, dest, tls, deadline).await?;
        let handshake = h2::client::Builder::new()
            .enable_push(false)
            .initial_window_size(STREAM_WINDOW)
            .initial_connection_window_size(CONNECTION_WINDOW)
            .handshake::<_, Bytes>(Coalesce::new(tls_stream));
        let host = dest.host().to_owned();
        let (send, connection) = match timeout_at(deadline, handshake).await {
            Err(_) => {
                return Err(ConnectError::H2Timeout {
                    host,
                    after: self.budget,
                });
            }
            Ok(Err(source)) => return Err(ConnectError::H2 { host, source }),
            Ok(Ok(pair)) => pair,
        };
        Ok(Connected {
            send,
            connection,
            route,
        })
    }
}

/// Tries each resolved address in turn; the last error is the one reported.
async fn connect_any(addrs: &[std::net::SocketAddr]) -> io::Result<TcpStream> {
    let mut last = io::Error::new(io::ErrorKind::NotFound, "no address");
    for addr in addrs {
        match TcpStream::connect(addr).await {
            Ok(s) => return Ok(s),
            Err(e) => last = e,
        }
    }
    Err(last)
}
