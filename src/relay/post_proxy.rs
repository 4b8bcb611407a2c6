//! The post-proxy front door: a legacy corporate proxy that speaks only HTTP/1.1 hands requests to
//! pushrelay (plain, or TLS with optional client certificates), and each is relayed as HTTP/2 by
//! the shared pipeline. The destination comes from the absolute-form target or `Host` (a port
//! written there wins, else the listener's `upstream_port`); `CONNECT` is refused, so this door can
//! never tunnel anywhere. The connection itself is served by `http1_server`, the parser and framing
//! rules every HTTP/1.1 door shares; this door says where each request goes.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use http::{HeaderMap, Response, StatusCode, Uri};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio::time::timeout;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;

use super::body::RelayBody;
use super::door::{Commit, Door, Serving, listener_at};
use super::headers::{NamedHost, named_host};
use super::http1::{self, RequestHead};
use super::http1_server::{Http1Server, Route, Routes, request_target};
use super::{Ctx, Relay};
use crate::config::{ListenerConfig, Secret, ServerTls, ValidConfig, read_secret};
use crate::error::{HeadError, RelayError, relay_response};
use crate::policy::Authority;
use crate::swap::Swap;
use crate::tls::{self, TlsSetupError};
use crate::upstream::chain::{DESTINATION_HEADER, DMZ_HEADER, SECRET_HEADER};
use subtle::ConstantTimeEq;

pub struct PostProxy {
    /// Its listener's place in `listeners`, to find it in a reloaded configuration.
    index: usize,
    name: Arc<str>,
    acceptor: Arc<Swap<Option<TlsAcceptor>>>,
    upstream_port: u16,
    relay: Arc<Relay>,
    http1: Http1Server,
    /// The TLS handshake's bound.
    head_timeout: Duration,
    /// How this listener knows the inside relay of a relay chain, if it is a DMZ relay.
    inside: Arc<Swap<InsideRelay>>,
}

/// How a DMZ relay knows its inside relay: the shared secret every request must carry
/// (`relay_secret_file`), and/or the client certificate every TLS client must present
/// (`tls.client_ca`). Either makes the listener a DMZ relay: it heeds `pushrelay-destination`
/// and marks its answers.
struct InsideRelay {
    secret: Option<Secret>,
    client_certs: bool,
}

impl InsideRelay {
    fn new(secret: Option<Secret>, tls: Option<&ServerTls>) -> Self {
        InsideRelay {
            secret,
            client_certs: tls.is_some_and(|t| t.client_ca.is_some()),
        }
    }

    fn known(&self) -> bool {
        self.secret.is_some() || self.client_certs
    }
}

impl Door for PostProxy {
    fn serve(
        self: Arc<Self>,
        stream: TcpStream,
        peer: SocketAddr,
        shutdown: CancellationToken,
    ) -> Serving {
        Box::pin(self.serve_connection(stream, peer, shutdown))
    }

    /// A 503 for a connection above `max_connections`, on a plain listener (with TLS the client
    /// could not read it before the handshake).
    fn busy_answer(&self) -> Option<Vec<u8>> {
        if self.acceptor.load().is_some() {
            return None;
        }
        let (parts, body) = relay_response::<String>(
            StatusCode::SERVICE_UNAVAILABLE,
            "RelayTooManyConnections",
            None,
        )
        .into_parts();
        let mut answer = http1::response_head(parts.status, &parts.headers, false, false);
        answer.extend_from_slice(body.as_bytes());
        Some(answer)
    }

    fn reload(&self, config: &ValidConfig) -> Result<Commit, TlsSetupError> {
        let listener = listener_at(config, self.index)?;
        let tls = config.listener_tls(self.index);
        let acceptor = Self::tls_for(self.index, listener, tls, &self.relay)?;
        let inside = InsideRelay::new(Self::secret_for(self.index, listener)?, tls);
        let (swap, inside_swap) = (self.acceptor.clone(), self.inside.clone());
        Ok(Box::new(move || {
            swap.store(acceptor);
            inside_swap.store(inside);
        }))
    }
}

impl PostProxy {
    /// The TLS acceptor for `listener`, if it has `tls`: one certificate whatever the SNI.
    pub fn tls_for(
        index: usize,
        listener: &ListenerConfig,
        tls: Option<&ServerTls>,
        relay: &Relay,
    ) -> Result<Option<TlsAcceptor>, TlsSetupError> {
        let Some(t) = tls else {
            return Ok(None);
        };
        let mut names = vec!["localhost".to_owned()];
        if !listener.bind.ip().is_unspecified() {
            names.push(listener.bind.ip().to_string());
        }
        let key = format!("listeners[{index}].tls");
        let (config, expiries) = tls::server::build(t, tls::server::Names::Any(&names), &key)?;
        relay.metrics().certificates(&listener.name, &expiries);
        Ok(Some(TlsAcceptor::from(config)))
    }

    /// The shared secret in `relay_secret_file`, if the listener has one.
    fn secret_for(
        index: usize,
        listener: &ListenerConfig,
    ) -> Result<Option<Secret>, TlsSetupError> {
        let Some(file) = &listener.relay_secret_file else {
            return Ok(None);
        };
        read_secret(file).map(Some).map_err(|e| {
            TlsSetupError::new(&format!("listeners[{index}].relay_secret_file"), file, e)
        })
    }

    /// A request from the inside relay carries the shared secret; checked in constant time, so
    /// the time taken says nothing of how much of a guess was right.
    fn check_secret(&self, headers: &HeaderMap) -> Result<(), RelayError> {
        let loaded = self.inside.load();
        let Some(secret) = loaded.secret.as_ref() else {
            return Ok(());
        };
        let mut given = headers.get_all(SECRET_HEADER).iter();
        match (given.next(), given.next()) {
            (None, _) => Err(RelayError::ChainSecret { missing: true }),
            (Some(v), None) if bool::from(v.as_bytes().ct_eq(secret.expose().as_bytes())) => Ok(()),
            _ => Err(RelayError::ChainSecret { missing: false }),
        }
    }

    /// The destination an inside relay names in `pushrelay-destination` (its `Host` names this
    /// relay, as TLS-inspecting proxies require), heeded only on a listener that checked the
    /// relay secret or the client's certificate: anyone else's is stripped as hop-by-hop and
    /// never read.
    fn chain_destination<'a>(
        &self,
        headers: &'a HeaderMap,
    ) -> Result<Option<NamedHost<'a>>, RelayError> {
        if !self.inside.load().known() {
            return Ok(None);
        }
        let Some(value) = headers.get(DESTINATION_HEADER) else {
            return Ok(None);
        };
        let raw = value.to_str().map_err(|_| {
            HeadError::BadHost(String::from_utf8_lossy(value.as_bytes()).into_owned())
        })?;
        let (host, port) =
            Authority::split_host_port(raw).map_err(|_| HeadError::BadHost(raw.to_owned()))?;
        Ok(Some(NamedHost { host, port, raw }))
    }

    pub fn new(
        index: usize,
        listener: &ListenerConfig,
        config: &ValidConfig,
        relay: Arc<Relay>,
    ) -> Result<Self, TlsSetupError> {
        let acceptor = Self::tls_for(index, listener, config.listener_tls(index), &relay)?;
        let inside = InsideRelay::new(
            Self::secret_for(index, listener)?,
            config.listener_tls(index),
        );
        Ok(PostProxy {
            index,
            name: listener.name.as_str().into(),
            acceptor: Arc::new(Swap::new(acceptor)),
            upstream_port: listener.upstream_port,
            http1: Http1Server::new(config, relay.clone()),
            relay,
            head_timeout: config.limits.handshake_timeout,
            inside: Arc::new(Swap::new(inside)),
        })
    }

    async fn serve_connection(
        self: Arc<Self>,
        stream: TcpStream,
        peer: SocketAddr,
        shutdown: CancellationToken,
    ) {
        let mut ctx = Ctx::new(self.name.clone(), peer);
        match self.acceptor.load().as_ref() {
            None => self.serve_http(stream, &ctx, &shutdown).await,
            Some(acceptor) => match timeout(self.head_timeout, acceptor.accept(stream)).await {
                Ok(Ok(tls_stream)) => {
                    ctx.client_subject = tls::client_subject(tls_stream.get_ref().1);
                    self.serve_http(tls_stream, &ctx, &shutdown).await
                }
                Ok(Err(e)) => {
                    self.relay.metrics().tls_failure("client");
                    tracing::info!(listener = %self.name, client.addr = %peer, error = %e, "client TLS handshake failed")
                }
                Err(_) => {
                    self.relay.metrics().tls_failure("client");
                    tracing::info!(listener = %self.name, client.addr = %peer, "client TLS handshake timed out")
                }
            },
        }
    }

    async fn serve_http<IO>(&self, io: IO, ctx: &Ctx, shutdown: &CancellationToken)
    where
        IO: AsyncRead + AsyncWrite + Unpin,
    {
        self.http1.serve(io, ctx, self, shutdown).await
    }
}

impl Routes for PostProxy {
    /// From the absolute-form target or `Host` (or, from an inside relay that showed the shared
    /// secret, `pushrelay-destination`); a port written there wins, else `upstream_port`.
    fn route(
        &self,
        head: &RequestHead,
        last: &mut Option<Route>,
    ) -> Result<(Authority, http::uri::Authority, Uri), RelayError> {
        self.check_secret(&head.headers)?;
        let uri = request_target(head)?;
        let named = match self.chain_destination(&head.headers)? {
            Some(named) => named,
            None => named_host(&uri, &head.headers)?,
        };
        if let Some(route) = last.as_ref().filter(|r| *r.named == *named.raw) {
            return Ok((route.dest.clone(), route.authority.clone(), uri));
        }
        let port = named.port.unwrap_or(self.upstream_port);
        let dest =
            Authority::new(&named.host, port).map_err(|e| RelayError::BadRequest(e.to_string()))?;
        let authority = match named.port {
            Some(_) => http::uri::Authority::try_from(dest.to_string()),
            None => http::uri::Authority::try_from(named.host.as_ref()),
        }
        .map_err(|e| RelayError::BadRequest(format!("invalid host: {e}")))?;
        *last = Some(Route {
            named: named.raw.into(),
            dest: dest.clone(),
            authority: authority.clone(),
        });
        Ok((dest, authority, uri))
    }

    /// A DMZ relay marks its answers, so the inside relay tells them from its proxy's own (an
    /// error page for a request the proxy refused).
    fn mark(&self, mut response: Response<RelayBody>) -> Response<RelayBody> {
        if self.inside.load().known() {
            response
                .headers_mut()
                .insert(DMZ_HEADER, http::HeaderValue::from_static("1"));
        }
        response
    }
}
