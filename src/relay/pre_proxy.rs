//! The pre-proxy front door: an APNs client that resolves the APNs host to pushrelay connects with
//! TLS. The certificate is chosen by SNI from the destinations on the listener's upstream port, so
//! the SNI names the destination; the request's own host must agree (else 421). HTTP/2 is served
//! with ALPN h2 and also without ALPN (pushy and aioapns start HTTP/2 straight away; the preface
//! tells them apart), by `h2_server`; HTTP/1.1 (ALPN http/1.1, or no ALPN and no preface) by
//! `http1_server`, with the very parser and framing rules of the post-proxy door, and nothing but
//! HTTP/1.1 on that connection from then on.
//!
//! The TLS accept (`PreProxy`) and the serving of an accepted TLS stream (`TlsServer`) are apart:
//! the forward-proxy door accepts TLS its own way, inside a CONNECT tunnel, and then serves it
//! with the same `TlsServer`.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use http::{HeaderMap, Request, Response, Uri};
use http_body::Body;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio::sync::Semaphore;
use tokio::time::timeout;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;
use tokio_util::sync::CancellationToken;

use super::body::{H2Body, RelayBody};
use super::door::{Commit, Door, Serving, listener_at};
use super::h2_server::{self, CLIENT_MAX_STREAMS, Committed};
use super::headers::named_host;
use super::http1::RequestHead;
use super::http1_server::{Http1Server, Route, Routes, request_target};
use super::{Ctx, Relay};
use crate::coalesce::WriteDeadline;
use crate::config::{Config, ListenerConfig, ServerTls, ValidConfig};
use crate::error::HeadError;
use crate::error::RelayError;
use crate::policy::{Authority, DestinationPolicy, normalize_host, normalized_host};
use crate::swap::Swap;
use crate::tls::{self, TlsSetupError};
use crate::upstream::BoxError;

pub struct PreProxy {
    /// Its listener's place in `listeners`, to find it in a reloaded configuration.
    index: usize,
    name: Arc<str>,
    acceptor: Arc<Swap<TlsAcceptor>>,
    upstream_port: u16,
    relay: Arc<Relay>,
    server: Arc<TlsServer>,
    handshake_timeout: Duration,
    /// A client that stops reading its socket is cut off after this (`limits.client_write_timeout`).
    write_timeout: Duration,
}

/// Serves APNs requests on a client TLS connection that is already accepted: by ALPN (or, with
/// none, by the HTTP/2 preface) as HTTP/2 or HTTP/1.1, every request checked against the
/// connection's `Target` and handed to the pipeline. Pre-proxy and forward-proxy share it.
pub struct TlsServer {
    name: Arc<str>,
    relay: Arc<Relay>,
    /// HTTP/1.1 only: a client that chose it by ALPN, or sent no HTTP/2 preface, is never
    /// switched to HTTP/2 after all.
    http1: Http1Server,
    h2: h2_server::Settings,
    handshake_timeout: Duration,
}

impl Door for PreProxy {
    fn serve(
        self: Arc<Self>,
        stream: TcpStream,
        peer: SocketAddr,
        shutdown: CancellationToken,
    ) -> Serving {
        Box::pin(self.serve_connection(stream, peer, shutdown))
    }

    fn reload(&self, config: &ValidConfig) -> Result<Commit, TlsSetupError> {
        let listener = listener_at(config, self.index)?;
        let destinations = DestinationPolicy::new(config.destinations.iter().cloned());
        let tls = config.listener_tls(self.index);
        let acceptor = Self::tls_for(self.index, listener, tls, &destinations, &self.relay)?;
        let swap = self.acceptor.clone();
        Ok(Box::new(move || swap.store(acceptor)))
    }
}

impl PreProxy {
    /// The TLS acceptor for `listener`: a certificate per destination host on its upstream port.
    pub fn tls_for(
        index: usize,
        listener: &ListenerConfig,
        tls: Option<&ServerTls>,
        destinations: &DestinationPolicy,
        relay: &Relay,
    ) -> Result<TlsAcceptor, TlsSetupError> {
        let hosts = destinations.hosts_on_port(listener.upstream_port);
        tls_for_hosts(index, listener, tls, &hosts, relay).map(TlsAcceptor::from)
    }

    pub fn new(
        index: usize,
        listener: &ListenerConfig,
        config: &ValidConfig,
        relay: Arc<Relay>,
    ) -> Result<Self, TlsSetupError> {
        let tls = config.listener_tls(index);
        let acceptor = Self::tls_for(index, listener, tls, &relay.destinations(), &relay)?;
        Ok(PreProxy {
            index,
            name: listener.name.as_str().into(),
            acceptor: Arc::new(Swap::new(acceptor)),
            upstream_port: listener.upstream_port,
            server: Arc::new(TlsServer::new(listener, config, relay.clone())),
            relay,
            write_timeout: config.limits.client_write_timeout,
            handshake_timeout: config.limits.handshake_timeout,
        })
    }

    async fn serve_connection(
        self: Arc<Self>,
        stream: TcpStream,
        peer: SocketAddr,
        shutdown: CancellationToken,
    ) {
        // Each phase's state is boxed, so a connection keeps only what its current phase needs:
        // the handshake's is freed once done, and an HTTP/2 client carries no HTTP/1.1 server.
        // An idle connection is mostly this state, and there may be thousands.
        let acceptor = self.acceptor.load();
        // A client that stops reading its socket is cut off, whichever protocol it speaks.
        let stream = WriteDeadline::new(stream, self.write_timeout);
        let accept = Box::pin(timeout(self.handshake_timeout, acceptor.accept(stream)));
        let tls_stream = match accept.await {
            // On the heap from here: the stream moves into the phase that serves it.
            Ok(Ok(s)) => Box::new(s),
            Ok(Err(e)) => {
                self.relay.metrics().tls_failure("client");
                tracing::info!(listener = %self.name, client.addr = %peer, error = %e, "client TLS handshake failed");
                return;
            }
            Err(_) => {
                self.relay.metrics().tls_failure("client");
                tracing::info!(listener = %self.name, client.addr = %peer, "client TLS handshake timed out");
                return;
            }
        };
        // The resolver served a certificate only for an allowed host, so SNI is present here.
        let Some(sni) = tls_stream
            .get_ref()
            .1
            .server_name()
            .and_then(normalize_host)
        else {
            return;
        };
        let target = match Target::new(sni, self.upstream_port) {
            Ok(t) => t,
            Err(e) => {
                tracing::info!(listener = %self.name, client.addr = %peer, error = %e, "no destination for this SNI");
                return;
            }
        };
        self.server.serve(tls_stream, peer, target, &shutdown).await;
    }
}

/// A TLS server config with a certificate for each of `hosts` (minted or fixed, from the
/// listener's validated `tls`), its expiries recorded in the metrics.
pub fn tls_for_hosts(
    index: usize,
    listener: &ListenerConfig,
    tls: Option<&ServerTls>,
    hosts: &[String],
    relay: &Relay,
) -> Result<Arc<rustls::ServerConfig>, TlsSetupError> {
    let key = format!("listeners[{index}].tls");
    let Some(tls_config) = tls else {
        return Err(TlsSetupError::new(
            &key,
            std::path::Path::new("-"),
            "this listener needs tls",
        ));
    };
    let (server_config, expiries) =
        tls::server::build(tls_config, tls::server::Names::Only(hosts), &key)?;
    relay.metrics().certificates(&listener.name, &expiries);
    Ok(server_config)
}

impl TlsServer {
    pub fn new(listener: &ListenerConfig, config: &Config, relay: Arc<Relay>) -> Self {
        TlsServer {
            name: listener.name.as_str().into(),
            http1: Http1Server::new(config, relay.clone()),
            relay,
            h2: h2_server::Settings {
                max_header_list_size: config.limits.max_header_bytes as u32,
                handshake_timeout: config.limits.handshake_timeout,
                idle_timeout: config.limits.idle_timeout,
                write_timeout: config.limits.client_write_timeout,
            },
            handshake_timeout: config.limits.handshake_timeout,
        }
    }

    /// Serves `tls_stream` until it ends, every request for `target`.
    pub async fn serve<IO>(
        self: &Arc<Self>,
        tls_stream: Box<TlsStream<IO>>,
        peer: SocketAddr,
        target: Target,
        shutdown: &CancellationToken,
    ) where
        IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let mut ctx = Ctx::new(self.name.clone(), peer);
        ctx.client_subject = tls::client_subject(tls_stream.get_ref().1);
        // Each phase is boxed so an idle connection keeps only the state of the one it is in.
        let served = match tls_stream.get_ref().1.alpn_protocol() {
            Some(b"h2") => Box::pin(self.serve_h2(tls_stream, &ctx, &target, shutdown)).await,
            Some(_) => Box::pin(self.serve_http1(tls_stream, &ctx, &target, shutdown)).await,
            // No ALPN: pushy and aioapns start HTTP/2 straight away; anything else is HTTP/1.1.
            None => {
                let sniff = timeout(self.handshake_timeout, h2_server::sniff_preface(tls_stream));
                match Box::pin(sniff).await {
                    Ok(Ok((true, io))) => {
                        Box::pin(self.serve_h2(io, &ctx, &target, shutdown)).await
                    }
                    Ok(Ok((false, io))) => {
                        Box::pin(self.serve_http1(io, &ctx, &target, shutdown)).await
                    }
                    Ok(Err(e)) => Err(e.into()),
                    Err(_) => Err("no request within the handshake timeout".into()),
                }
            }
        };
        if let Err(e) = served {
            tracing::debug!(listener = %self.name, client.addr = %peer, error = %e, "client connection ended with an error");
        }
    }

    async fn serve_h2<IO>(
        &self,
        io: IO,
        ctx: &Ctx,
        target: &Target,
        shutdown: &CancellationToken,
    ) -> Result<(), BoxError>
    where
        IO: AsyncRead + AsyncWrite + Unpin,
    {
        let ctx = Ctx {
            upstream_slots: Some(Arc::new(Semaphore::new(CLIENT_MAX_STREAMS as usize))),
            ..ctx.clone()
        };
        let ctx = &ctx;
        h2_server::serve(
            io,
            &self.h2,
            shutdown,
            |req: Request<h2::RecvStream>, committed| {
                self.handle(ctx, target, committed, req.map(H2Body::new))
            },
        )
        .await
        .map_err(Into::into)
    }

    async fn serve_http1<IO>(
        &self,
        io: IO,
        ctx: &Ctx,
        target: &Target,
        shutdown: &CancellationToken,
    ) -> Result<(), BoxError>
    where
        IO: AsyncRead + AsyncWrite + Unpin,
    {
        self.http1.serve(io, ctx, target, shutdown).await;
        Ok(())
    }

    async fn handle<B>(
        &self,
        ctx: &Ctx,
        target: &Target,
        committed: Committed,
        req: Request<B>,
    ) -> Response<RelayBody>
    where
        B: Body<Data = bytes::Bytes> + Unpin,
        B::Error: Into<BoxError>,
    {
        match target.route(req.uri(), req.headers()) {
            Ok((dest, authority)) => {
                self.relay
                    .forward(ctx, &committed, dest, authority, req)
                    .await
            }
            Err(e) => self.relay.refuse(ctx, req, e).await,
        }
    }
}

/// Where a client connection's requests go, worked out once from its SNI (or CONNECT host).
pub struct Target {
    sni: String,
    dest: Authority,
    /// `:authority` upstream when the client wrote a port, and when it did not.
    with_port: http::uri::Authority,
    bare: http::uri::Authority,
    /// The SNI host is in normal form (lowercase, no trailing dot): an `:authority` that is
    /// exactly it, with or without a port, names it without being parsed.
    sni_normal: bool,
}

impl Target {
    pub fn new(sni: String, upstream_port: u16) -> Result<Self, BoxError> {
        let dest = Authority::new(&sni, upstream_port)?;
        Ok(Target {
            with_port: http::uri::Authority::try_from(dest.to_string())?,
            bare: http::uri::Authority::try_from(sni.as_str())?,
            sni_normal: !sni.contains(':')
                && normalized_host(&sni).is_some_and(|h| h == sni.as_str()),
            dest,
            sni,
        })
    }

    /// The port a request's target names, when it is exactly the SNI host (with a valid port or
    /// none) and no `Host` header comes with it: the usual request, answered as `named_host`
    /// would, without parsing. `None`: the request needs the full check.
    fn plain_port(&self, uri: &Uri, headers: &HeaderMap) -> Option<Option<u16>> {
        if !self.sni_normal || headers.contains_key(http::header::HOST) {
            return None;
        }
        let rest = uri.authority()?.as_str().strip_prefix(self.sni.as_str())?;
        if rest.is_empty() {
            return Some(None);
        }
        match rest.strip_prefix(':')?.parse::<u16>() {
            Ok(port) if port > 0 => Some(Some(port)),
            _ => None,
        }
    }

    /// The destination and `:authority` of a request on this connection: the host it names (if
    /// any) must be the SNI host, else 421.
    fn route(
        &self,
        uri: &Uri,
        headers: &HeaderMap,
    ) -> Result<(Authority, http::uri::Authority), RelayError> {
        if let Some(port) = self.plain_port(uri, headers) {
            let authority = match port {
                Some(_) => self.with_port.clone(),
                None => self.bare.clone(),
            };
            return Ok((self.dest.clone(), authority));
        }
        let named = match named_host(uri, headers) {
            Ok(n) => Some(n),
            // SNI already names the host; a request without one is for it.
            Err(HeadError::NoHost) => None,
            Err(e) => return Err(e.into()),
        };
        if let Some(named) = &named
            && named.host != self.sni
        {
            return Err(RelayError::Misdirected {
                sni: self.sni.clone(),
                authority: named.raw.to_string(),
            });
        }
        // The client's port (if any) was the relay's; the origin is told its own.
        let authority = match named.and_then(|n| n.port) {
            Some(_) => self.with_port.clone(),
            None => self.bare.clone(),
        };
        Ok((self.dest.clone(), authority))
    }
}

/// HTTP/1.1 on a connection for `Target`: every request for the SNI host.
impl Routes for Target {
    fn route(
        &self,
        head: &RequestHead,
        _last: &mut Option<Route>,
    ) -> Result<(Authority, http::uri::Authority, Uri), RelayError> {
        let uri = request_target(head)?;
        let (dest, authority) = Target::route(self, &uri, &head.headers)?;
        Ok((dest, authority, uri))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_plain_authority_shortcut_agrees_with_the_full_check() {
        let target = Target::new("api.push.apple.com".into(), 443).unwrap();
        let cases = [
            ("https://api.push.apple.com/3/device/x", true),
            ("https://api.push.apple.com:443/3/device/x", true),
            ("https://api.push.apple.com:8443/3/device/x", true),
            ("https://api.push.apple.com:0/3/device/x", false),
            ("https://api.push.apple.com:99999/3/device/x", false),
            ("https://API.push.apple.com/3/device/x", false),
            ("https://api.push.apple.com./3/device/x", false),
            ("https://api.push.apple.community/3/device/x", false),
            ("https://other.example/3/device/x", false),
            ("/3/device/x", false),
        ];
        for (uri, plain) in cases {
            let uri: Uri = uri.parse().unwrap();
            let headers = HeaderMap::new();
            let port = target.plain_port(&uri, &headers);
            assert_eq!(port.is_some(), plain, "{uri}");
            if let Some(port) = port {
                let named = named_host(&uri, &headers).unwrap();
                assert_eq!(
                    (named.host.as_ref(), named.port),
                    (target.sni.as_str(), port)
                );
            }
        }
        // A Host header is always checked in full.
        let mut headers = HeaderMap::new();
        headers.insert(http::header::HOST, "other.example".parse().unwrap());
        let uri: Uri = "https://api.push.apple.com/3/device/x".parse().unwrap();
        assert_eq!(target.plain_port(&uri, &headers), None);
        assert!(target.route(&uri, &headers).is_err());
        // An SNI host not in normal form never takes the shortcut.
        let odd = Target::new("Api.Push.Apple.com".into(), 443).unwrap();
        let uri: Uri = "https://Api.Push.Apple.com/3/device/x".parse().unwrap();
        assert_eq!(odd.plain_port(&uri, &HeaderMap::new()), None);
    }
}
