//! Opens one upstream HTTP/2 connection: the route (direct, or through the CONNECT proxy, with
//! `connect_to` overriding the address), TLS with SNI = the destination host, then the HTTP/2
//! handshake. Each step has its own timeout and its own error, so a failure names the hop.

use std::collections::BTreeMap;
use std::io;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use rustls::ClientConfig;
use rustls::pki_types::ServerName;
use tokio::net::TcpStream;
use tokio::time::timeout;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;

use super::tunnel::{self, TunnelError};
use crate::coalesce::Coalesce;
use crate::config::{Config, ProxyUrl, UpstreamConfig};
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
}

impl ConnectError {
    /// Whether the step that failed was a timeout.
    pub fn is_timeout(&self) -> bool {
        matches!(
            self,
            ConnectError::TcpTimeout { .. }
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
            ConnectError::Resolve { .. } => "dns",
            ConnectError::Tcp { .. } | ConnectError::TcpTimeout { .. } => "tcp",
            ConnectError::Tunnel(_) => "proxy",
            ConnectError::Tls { .. }
            | ConnectError::TlsTimeout { .. }
            | ConnectError::NoH2 { .. } => "tls",
            ConnectError::H2 { .. } | ConnectError::H2Timeout { .. } => "h2",
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

/// Opens upstream connections. Cheap to clone.
#[derive(Clone)]
pub struct Connector {
    proxy: Option<ProxyUrl>,
    no_proxy: Vec<String>,
    connect_to: BTreeMap<Authority, String>,
    step_timeout: Duration,
}

impl Connector {
    pub fn new(upstream: &UpstreamConfig) -> Self {
        Connector {
            proxy: upstream.proxy.clone(),
            no_proxy: upstream.no_proxy.clone(),
            connect_to: upstream.connect_to.clone(),
            step_timeout: upstream.connect_timeout,
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

    /// TCP (direct or tunnelled) to `dest`.
    pub async fn tcp(&self, dest: &Authority) -> Result<(TcpStream, Route), ConnectError> {
        let route = self.route(dest);
        let stream = match (&route, &self.proxy) {
            (Route::Proxy { target, .. }, Some(proxy)) => {
                tunnel::open(proxy, target, self.step_timeout).await?.0
            }
            (Route::Direct { addr }, _) | (Route::Proxy { target: addr, .. }, None) => {
                let addrs: Vec<_> = tokio::net::lookup_host(addr.as_str())
                    .await
                    .map_err(|source| ConnectError::Resolve {
                        host: addr.clone(),
                        source,
                    })?
                    .collect();
                match timeout(self.step_timeout, connect_any(&addrs)).await {
                    Err(_) => {
                        return Err(ConnectError::TcpTimeout {
                            addr: addr.clone(),
                            after: self.step_timeout,
                        });
                    }
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
        let host = dest.host().to_owned();
        let server_name = ServerName::try_from(host.clone()).map_err(|e| ConnectError::Tls {
            host: host.clone(),
            source: io::Error::new(io::ErrorKind::InvalidInput, e),
        })?;
        let connector = TlsConnector::from(tls.clone());
        let tls_stream =
            match timeout(self.step_timeout, connector.connect(server_name, stream)).await {
                Err(_) => {
                    return Err(ConnectError::TlsTimeout {
                        host,
                        after: self.step_timeout,
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

    /// The whole way: route, TLS and the HTTP/2 handshake.
    pub async fn connect(
        &self,
        dest: &Authority,
        tls: &Arc<ClientConfig>,
    ) -> Result<Connected, ConnectError> {
        let (tcp, route) = self.tcp(dest).await?;
        let tls_stream = self.tls(tcp, dest, tls).await?;
        let handshake = h2::client::Builder::new()
            .enable_push(false)
            .initial_window_size(STREAM_WINDOW)
            .initial_connection_window_size(CONNECTION_WINDOW)
            .handshake::<_, Bytes>(Coalesce::new(tls_stream));
        let host = dest.host().to_owned();
        let (send, connection) = match timeout(self.step_timeout, handshake).await {
            Err(_) => {
                return Err(ConnectError::H2Timeout {
                    host,
                    after: self.step_timeout,
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
