//! The pre-proxy front door: an APNs client that resolves the APNs host to pushrelay connects with
//! TLS. The certificate is chosen by SNI from the destinations on the listener's upstream port, so
//! the SNI names the destination; the request's own host must agree (else 421). HTTP/2 is served
//! with ALPN h2 and also without ALPN (pushy and aioapns start HTTP/2 straight away), HTTP/1.1
//! with ALPN http/1.1.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use http::{Request, Response};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::net::TcpStream;
use tokio::time::timeout;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;

use super::body::RelayBody;
use super::headers::{HeadError, named_host};
use super::{Ctx, Relay};
use crate::coalesce::Coalesce;
use crate::config::{Config, ListenerConfig};
use crate::error::RelayError;
use crate::policy::{Authority, DestinationPolicy, normalize_host};
use crate::reload::Swap;
use crate::tls::{self, TlsSetupError};

/// HTTP/2 streams a client may have open at once on one connection, as APNs allows about 1000.
const CLIENT_MAX_STREAMS: u32 = 1000;

pub struct PreProxy {
    name: Arc<str>,
    acceptor: Swap<TlsAcceptor>,
    upstream_port: u16,
    relay: Arc<Relay>,
    http: auto::Builder<TokioExecutor>,
    handshake_timeout: Duration,
}

/// The HTTP server settings both front doors share.
pub fn http_builder(config: &Config) -> auto::Builder<TokioExecutor> {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(config.limits.idle_timeout)
        .max_buf_size(config.limits.max_header_bytes.max(8192))
        .auto_date_header(false);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_header_list_size(config.limits.max_header_bytes as u32)
        .max_concurrent_streams(CLIENT_MAX_STREAMS)
        .auto_date_header(false);
    builder
}

impl PreProxy {
    /// The TLS acceptor for `listener`: a certificate per destination host on its upstream port.
    pub fn tls_for(
        index: usize,
        listener: &ListenerConfig,
        destinations: &DestinationPolicy,
        relay: &Relay,
    ) -> Result<TlsAcceptor, TlsSetupError> {
        let key = format!("listeners[{index}].tls");
        let hosts = destinations.hosts_on_port(listener.upstream_port);
        let Some(tls_config) = &listener.tls else {
            return Err(TlsSetupError::new(
                &key,
                std::path::Path::new("-"),
                "pre-proxy needs tls",
            ));
        };
        let (server_config, expiries) =
            tls::server::build(tls_config, tls::server::Names::Only(&hosts), &key)?;
        relay.metrics().certificates(&listener.name, &expiries);
        Ok(TlsAcceptor::from(server_config))
    }

    pub fn set_tls(&self, acceptor: TlsAcceptor) {
        self.acceptor.store(acceptor);
    }

    pub fn new(
        index: usize,
        listener: &ListenerConfig,
        config: &Config,
        relay: Arc<Relay>,
    ) -> Result<Self, TlsSetupError> {
        let acceptor = Self::tls_for(index, listener, &relay.destinations(), &relay)?;
        Ok(PreProxy {
            name: listener.name.as_str().into(),
            acceptor: Swap::new(acceptor),
            upstream_port: listener.upstream_port,
            relay,
            http: http_builder(config),
            handshake_timeout: config.limits.handshake_timeout,
        })
    }

    pub async fn serve(
        self: Arc<Self>,
        stream: TcpStream,
        peer: SocketAddr,
        shutdown: CancellationToken,
    ) {
        let acceptor = self.acceptor.load();
        let tls_stream = match timeout(self.handshake_timeout, acceptor.accept(stream)).await {
            Ok(Ok(s)) => s,
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
        let ctx = Ctx {
            listener: self.name.clone(),
            client: peer,
        };
        let this = self.clone();
        let sni: Arc<str> = sni.into();
        let service = service_fn(move |req| {
            let this = this.clone();
            let ctx = ctx.clone();
            let sni = sni.clone();
            async move { Ok::<_, Infallible>(this.handle(&ctx, &sni, req).await) }
        });
        let conn = self
            .http
            .serve_connection(TokioIo::new(Coalesce::new(tls_stream)), service);
        if let Err(e) = super::drive(conn, &shutdown).await {
            tracing::debug!(listener = %self.name, client.addr = %peer, error = %e, "client connection ended with an error");
        }
    }

    async fn handle(&self, ctx: &Ctx, sni: &str, req: Request<Incoming>) -> Response<RelayBody> {
        let named = match named_host(req.uri(), req.headers()) {
            Ok(n) => Some(n),
            // SNI already names the host; a request without one is for it.
            Err(HeadError::NoHost) => None,
            Err(e) => return self.refuse(ctx, &req, e.into()),
        };
        if let Some(named) = &named
            && named.host != sni
        {
            let e = RelayError::Misdirected {
                sni: sni.to_owned(),
                authority: named.raw.clone(),
            };
            return self.refuse(ctx, &req, e);
        }
        let dest = match Authority::new(sni, self.upstream_port) {
            Ok(d) => d,
            Err(e) => return self.refuse(ctx, &req, RelayError::BadRequest(e.to_string())),
        };
        // The client's port (if any) was the relay's; the origin is told its own.
        let authority = match named.and_then(|n| n.port) {
            Some(_) => dest.to_string(),
            None => sni.to_owned(),
        };
        self.relay.forward(ctx, dest, &authority, req).await
    }

    fn refuse(&self, ctx: &Ctx, req: &Request<Incoming>, e: RelayError) -> Response<RelayBody> {
        let path = super::loggable_path(req.uri().path());
        self.relay
            .record_failure(ctx, req.method(), None, &path, &e, Duration::ZERO);
        e.to_response()
    }
}
