//! The forward-proxy front door: pushrelay as the push server's `HTTPS_PROXY`. It speaks the
//! HTTP/1.1 proxy protocol, CONNECT only. A CONNECT to a destination is intercepted: `200`, then
//! TLS with pushrelay's certificate for that host (the SNI must be the CONNECT host), then the
//! very same serving as pre-proxy (`TlsServer`: ALPN h2 whenever offered, HTTP/1.1, or HTTP/2 by
//! preface) and the shared upstream pool, so a burst of client tunnels never becomes a burst of
//! upstream connections and an upstream GOAWAY never reaches a client. A CONNECT to a `tunnels`
//! entry is a blind byte pipe, reached the way the pool reaches origins (`upstream.proxy`,
//! `no_proxy`, `connect_to`). Anything else is refused with a `Relay…` reason before anything is
//! contacted, and the connection closes.
//!
//! Plain `http://` requests in absolute form are refused (405) rather than relayed: a push
//! server never sends APNs or FCM traffic in clear text, and relaying them would make this door a
//! general forward proxy; the post-proxy door is the one that relays HTTP/1.1 requests.
//!
//! Everything before the tunnel opens (the CONNECT head, the TLS handshake) must finish within
//! `limits.handshake_timeout` of the accept.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::Engine;
use bytes::{Bytes, BytesMut};
use http::{Method, StatusCode, header};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use rustls::ServerConfig;
use tokio::io::{AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::{Instant, sleep, timeout, timeout_at};
use tokio_rustls::LazyConfigAcceptor;
use tokio_util::sync::CancellationToken;

use super::Relay;
use super::door::{Commit, Door, Serving, listener_at};
use super::h2_server::Rewind;
use super::http1::{self, Framing, Http1Error, RequestHead};
use super::pre_proxy::{Target, TlsServer, tls_for_hosts};
use crate::config::{ListenerConfig, Secret, ServerTls, ValidConfig, read_proxy_users};
use crate::error::{Refusal, RelayError};
use crate::policy::{Authority, DestinationPolicy, normalize_host};
use crate::swap::Swap;
use crate::tls::TlsSetupError;
use crate::upstream::connect::Connector;

const ESTABLISHED: &[u8] = b"HTTP/1.1 200 Connection established\r\n\r\n";
/// After a refusal, bytes the client already sent are read and dropped (so closing does not
/// reset the connection before the answer is read), up to this many, for this long.
const LINGER_BYTES: usize = 64 * 1024;
const LINGER: Duration = Duration::from_secs(1);
/// Read buffer of each direction of a blind tunnel.
const TUNNEL_BUFFER: usize = 16 * 1024;
/// CONNECT targets are the client's words: logs show this much of them.
const LOGGED_TARGET: usize = 256;

/// Basic credentials accepted from clients.
struct ProxyAuth {
    users: Vec<(String, Secret)>,
    challenge: String,
}

impl ProxyAuth {
    /// Whether `headers` carry a `Proxy-Authorization: Basic` of a known user. Every user is
    /// compared, each byte of each, so the time taken does not tell how close a guess was.
    fn allows(&self, headers: &http::HeaderMap) -> bool {
        let Some(decoded) = headers
            .get(header::PROXY_AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| {
                let (scheme, token) = v.trim().split_once(' ')?;
                scheme.eq_ignore_ascii_case("basic").then_some(token)
            })
            .and_then(|t| {
                base64::engine::general_purpose::STANDARD
                    .decode(t.trim())
                    .ok()
            })
        else {
            return false;
        };
        let Some(colon) = decoded.iter().position(|&b| b == b':') else {
            return false;
        };
        let (user, pass) = (&decoded[..colon], &decoded[colon + 1..]);
        let mut found = false;
        for (u, p) in &self.users {
            found |= constant_time_eq(u.as_bytes(), user)
                & constant_time_eq(p.expose().as_bytes(), pass);
        }
        found
    }
}

/// Equal bytes, in a time that depends on the lengths only.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    let diff = a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y));
    std::hint::black_box(diff) == 0
}

pub struct ForwardProxy {
    /// Its listener's place in `listeners`, to find it in a reloaded configuration.
    index: usize,
    name: Arc<str>,
    tls: Arc<Swap<Arc<ServerConfig>>>,
    server: Arc<TlsServer>,
    relay: Arc<Relay>,
    tunnels: Arc<Swap<DestinationPolicy>>,
    connector: Connector,
    /// Replaced on reload, as the certificates are.
    auth: Arc<Swap<Option<ProxyAuth>>>,
    handshake_timeout: Duration,
    max_header_bytes: usize,
    tunnel_idle_timeout: Duration,
    max_tunnels_per_source: usize,
    per_source: Arc<Mutex<HashMap<IpAddr, usize>>>,
}

/// What a CONNECT head asks for, once checked.
enum Verdict {
    Intercept(Authority),
    Tunnel(Authority),
}

impl Door for ForwardProxy {
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
        let server_config = Self::tls_for(self.index, listener, tls, &destinations, &self.relay)?;
        let auth = Self::auth_for(self.index, listener)?;
        let tunnels = DestinationPolicy::new(config.tunnels.iter().cloned());
        let swaps = (self.tls.clone(), self.auth.clone(), self.tunnels.clone());
        Ok(Box::new(move || {
            swaps.0.store(server_config);
            swaps.1.store(auth);
            swaps.2.store(tunnels);
        }))
    }
}

impl ForwardProxy {
    /// The TLS config for `listener`: a certificate for every destination host.
    pub fn tls_for(
        index: usize,
        listener: &ListenerConfig,
        tls: Option<&ServerTls>,
        destinations: &DestinationPolicy,
        relay: &Relay,
    ) -> Result<Arc<ServerConfig>, TlsSetupError> {
        tls_for_hosts(index, listener, tls, &destinations.hosts(), relay)
    }

    /// The listener's `proxy_auth`, its users file read now.
    fn auth_for(
        index: usize,
        listener: &ListenerConfig,
    ) -> Result<Option<ProxyAuth>, TlsSetupError> {
        let Some(a) = &listener.proxy_auth else {
            return Ok(None);
        };
        let users = read_proxy_users(&a.users_file).map_err(|e| {
            let key = format!("listeners[{index}].proxy_auth.users_file");
            TlsSetupError::new(&key, &a.users_file, e)
        })?;
        Ok(Some(ProxyAuth {
            users,
            challenge: format!("Basic realm=\"{}\"", a.realm),
        }))
    }

    pub fn new(
        index: usize,
        listener: &ListenerConfig,
        config: &ValidConfig,
        relay: Arc<Relay>,
    ) -> Result<Self, TlsSetupError> {
        let tls_config = config.listener_tls(index);
        let tls = Self::tls_for(index, listener, tls_config, &relay.destinations(), &relay)?;
        let auth = Self::auth_for(index, listener)?;
        Ok(ForwardProxy {
            index,
            name: listener.name.as_str().into(),
            tls: Arc::new(Swap::new(tls)),
            server: Arc::new(TlsServer::new(listener, config, relay.clone())),
            relay,
            tunnels: Arc::new(Swap::new(DestinationPolicy::new(
                config.tunnels.iter().cloned(),
            ))),
            connector: Connector::new(&config.upstream),
            auth: Arc::new(Swap::new(auth)),
            handshake_timeout: config.limits.handshake_timeout,
            max_header_bytes: config.limits.max_header_bytes,
            tunnel_idle_timeout: config.limits.tunnel_idle_timeout,
            max_tunnels_per_source: config.limits.max_tunnels_per_source,
            per_source: Arc::default(),
        })
    }

    async fn serve_connection(
        self: Arc<Self>,
        mut stream: TcpStream,
        peer: SocketAddr,
        shutdown: CancellationToken,
    ) {
        let deadline = Instant::now() + self.handshake_timeout;
        let (head, rest) = match timeout_at(deadline, read_head(&mut stream, self.max_header_bytes))
            .await
        {
            Ok(Ok(Some(pair))) => pair,
            // The client went away, or its socket failed, before a whole head: nothing to answer.
            Ok(Ok(None)) => return,
            Ok(Err(e)) => {
                let (status, reason, _) = e.refusal().classify();
                tracing::info!(listener = %self.name, client.addr = %peer, status = status.as_u16(), error = %e, "refused CONNECT head");
                self.answer_and_close(stream, status, reason).await;
                return;
            }
            Err(_) => {
                tracing::info!(listener = %self.name, client.addr = %peer, "no CONNECT head within the handshake timeout");
                let (status, reason, _) = Refusal::HeadTimeout.classify();
                self.answer_and_close(stream, status, reason).await;
                return;
            }
        };
        let verdict = match self.judge(&head) {
            Ok(v) => v,
            Err(e) => {
                self.refuse(stream, peer, &head.target, e).await;
                return;
            }
        };
        let Some(_slot) = self.take_slot(peer.ip()) else {
            let e = RelayError::TooManyTunnels(self.max_tunnels_per_source);
            self.refuse(stream, peer, &head.target, e).await;
            return;
        };
        match verdict {
            Verdict::Intercept(dest) => {
                self.intercept(stream, rest, peer, dest, deadline, shutdown)
                    .await
            }
            Verdict::Tunnel(dest) => self.tunnel(stream, rest, peer, dest).await,
        }
    }

    /// Decides what a CONNECT head may do: credentials first (a stranger learns nothing about
    /// which hosts are allowed), then the target against the two lists.
    fn judge(&self, head: &RequestHead) -> Result<Verdict, RelayError> {
        if head.method != Method::CONNECT {
            return Err(RelayError::MethodNotAllowed(head.method.to_string()));
        }
        if head.framing != Framing::Empty {
            return Err(RelayError::BadRequest(
                "a CONNECT request has no body".into(),
            ));
        }
        if let Some(auth) = self.auth.load().as_ref()
            && !auth.allows(&head.headers)
        {
            return Err(RelayError::ProxyCredentials);
        }
        let dest: Authority = head
            .target
            .parse()
            .map_err(|e| RelayError::BadRequest(format!("CONNECT target: {e}")))?;
        if self.relay.destinations().allows(&dest) {
            Ok(Verdict::Intercept(dest))
        } else if self.tunnels.load().allows(&dest) {
            Ok(Verdict::Tunnel(dest))
        } else {
            Err(RelayError::DestinationNotAllowed(dest))
        }
    }

    /// A place among this source's tunnels, given back when dropped; `None` when it has all it
    /// may have.
    fn take_slot(&self, ip: IpAddr) -> Option<SourceSlot> {
        let mut map = self.per_source.lock().unwrap_or_else(|p| p.into_inner());
        let n = map.entry(ip).or_insert(0);
        if *n >= self.max_tunnels_per_source {
            return None;
        }
        *n += 1;
        Some(SourceSlot {
            map: self.per_source.clone(),
            ip,
        })
    }

    async fn intercept(
        &self,
        mut stream: TcpStream,
        rest: Bytes,
        peer: SocketAddr,
        dest: Authority,
        deadline: Instant,
        shutdown: CancellationToken,
    ) {
        if stream.write_all(ESTABLISHED).await.is_err() {
            return;
        }
        let acceptor = LazyConfigAcceptor::new(
            rustls::server::Acceptor::default(),
            Rewind::new(rest, stream),
        );
        // An error is the outcome's metric label and what went wrong.
        let handshake = async {
            let start = acceptor.await.map_err(|e| ("tls_failed", e.to_string()))?;
            let sni = start.client_hello().server_name().and_then(normalize_host);
            if sni.as_deref() != Some(dest.host()) {
                // Refused before any certificate is chosen: a name other than the CONNECT host
                // would let a client reach one destination through another's tunnel.
                return Err((
                    "sni_mismatch",
                    format!("SNI {sni:?} is not the CONNECT host"),
                ));
            }
            let config = Arc::clone(&*self.tls.load());
            start
                .into_stream(config)
                .await
                .map_err(|e| ("tls_failed", e.to_string()))
        };
        let tls = match timeout_at(deadline, handshake).await {
            Ok(Ok(tls)) => tls,
            Ok(Err((outcome, error))) => {
                self.tls_failed(peer, &dest, outcome, error);
                return;
            }
            Err(_) => {
                let error = format!("not done within {:?} of the accept", self.handshake_timeout);
                self.tls_failed(peer, &dest, "tls_timeout", error);
                return;
            }
        };
        self.relay.metrics().connect(&self.name, "intercepted");
        let _open = OpenGauge::new(self.relay.metrics().tunnels_open(&self.name, "intercept"));
        let target = match Target::new(dest.host().to_owned(), dest.port()) {
            Ok(t) => t,
            Err(e) => {
                tracing::info!(listener = %self.name, client.addr = %peer, error = %e, "no destination for this CONNECT");
                return;
            }
        };
        self.server
            .serve(Box::new(tls), peer, target, &shutdown)
            .await;
    }

    fn tls_failed(&self, peer: SocketAddr, dest: &Authority, outcome: &'static str, error: String) {
        self.relay.metrics().tls_failure("client");
        self.relay.metrics().connect(&self.name, outcome);
        tracing::info!(listener = %self.name, client.addr = %peer, connect.target = %dest, outcome, error, "client TLS handshake failed");
    }

    async fn tunnel(&self, mut stream: TcpStream, rest: Bytes, peer: SocketAddr, dest: Authority) {
        let (mut upstream, route) = match self.connector.tcp(&dest).await {
            Ok(pair) => pair,
            Err(source) => {
                let target = dest.to_string();
                self.refuse(
                    stream,
                    peer,
                    &target,
                    RelayError::Tunnel {
                        dest,
                        source: Box::new(source),
                    },
                )
                .await;
                return;
            }
        };
        if stream.write_all(ESTABLISHED).await.is_err() {
            return;
        }
        if !rest.is_empty() && upstream.write_all(&rest).await.is_err() {
            return;
        }
        self.relay.metrics().connect(&self.name, "tunnelled");
        let _open = OpenGauge::new(self.relay.metrics().tunnels_open(&self.name, "blind"));
        tracing::info!(listener = %self.name, client.addr = %peer, connect.target = %dest, route = ?route, "tunnel open");
        let metrics = self.relay.metrics();
        let counters = [
            metrics.tunnel_bytes(&self.name, "to_upstream"),
            metrics.tunnel_bytes(&self.name, "to_client"),
        ];
        counters[0].inc_by(rest.len() as u64);
        let (up, down, idle) = pipe(
            &mut stream,
            &mut upstream,
            self.tunnel_idle_timeout,
            &counters,
        )
        .await;
        tracing::info!(listener = %self.name, client.addr = %peer, connect.target = %dest, bytes.to_upstream = up + rest.len() as u64, bytes.to_client = down, idle_closed = idle, "tunnel closed");
    }

    /// Answers a CONNECT with pushrelay's refusal and closes.
    async fn refuse(&self, stream: TcpStream, peer: SocketAddr, target: &str, e: RelayError) {
        let (status, reason, _) = e.classify();
        let (hop, proxy_status) = crate::error::hop_of(&e);
        self.relay.metrics().connect(&self.name, reason);
        self.relay.metrics().relay_error(reason);
        let shown: String = target.chars().take(LOGGED_TARGET).collect();
        tracing::info!(listener = %self.name, client.addr = %peer, connect.target = %shown, status = status.as_u16(), reason, hop, proxy.status = proxy_status, error = %e, "refused CONNECT");
        self.answer_and_close(stream, status, reason).await;
    }

    async fn answer_and_close(&self, mut stream: TcpStream, status: StatusCode, reason: &str) {
        let body = format!("{{\"reason\":\"{reason}\"}}");
        let mut head = format!(
            "HTTP/1.1 {} {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n",
            status.as_u16(),
            status.canonical_reason().unwrap_or(""),
            body.len()
        );
        if status == StatusCode::PROXY_AUTHENTICATION_REQUIRED
            && let Some(auth) = self.auth.load().as_ref()
        {
            head.push_str("Proxy-Authenticate: ");
            head.push_str(&auth.challenge);
            head.push_str("\r\n");
        }
        head.push_str("\r\n");
        head.push_str(&body);
        if stream.write_all(head.as_bytes()).await.is_err() {
            return;
        }
        // Nothing the client sent after the head is ever relayed: it is read here and dropped.
        let _ = stream.shutdown().await;
        let mut sink = [0u8; 4096];
        let mut drained = 0;
        let _ = timeout(LINGER, async {
            while drained < LINGER_BYTES {
                match stream.read(&mut sink).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => drained += n,
                }
            }
        })
        .await;
    }
}

/// Reads one request head; the bytes after it (a ClientHello sent without waiting for the
/// answer) are returned with it. `Ok(None)`: the client closed or failed first.
async fn read_head(
    stream: &mut TcpStream,
    max: usize,
) -> Result<Option<(RequestHead, Bytes)>, Http1Error> {
    let mut buf = BytesMut::with_capacity(1024);
    loop {
        if let Some(head) = http1::parse_head(&mut buf, max)? {
            return Ok(Some((head, buf.freeze())));
        }
        match stream.read_buf(&mut buf).await {
            Ok(0) | Err(_) => return Ok(None),
            Ok(_) => {}
        }
    }
}

/// Copies both ways until both sides have finished, or nothing moved for `idle`. Returns the
/// bytes each way and whether the idle timeout ended it.
async fn pipe(
    client: &mut TcpStream,
    upstream: &mut TcpStream,
    idle: Duration,
    counters: &[Counter; 2],
) -> (u64, u64, bool) {
    let (mut cr, mut cw) = client.split();
    let (mut ur, mut uw) = upstream.split();
    let (mut cbuf, mut ubuf) = (vec![0u8; TUNNEL_BUFFER], vec![0u8; TUNNEL_BUFFER]);
    let (mut up, mut down) = (0u64, 0u64);
    let (mut client_open, mut upstream_open) = (true, true);
    let timer = sleep(idle);
    tokio::pin!(timer);
    while client_open || upstream_open {
        let step = tokio::select! {
            r = cr.read(&mut cbuf), if client_open => {
                let step = pass_on(r, &cbuf, &mut uw, &mut up, &counters[0]).await;
                client_open &= step == Step::Moved;
                step
            }
            r = ur.read(&mut ubuf), if upstream_open => {
                let step = pass_on(r, &ubuf, &mut cw, &mut down, &counters[1]).await;
                upstream_open &= step == Step::Moved;
                step
            }
            _ = timer.as_mut() => return (up, down, true),
        };
        if step == Step::Failed {
            break;
        }
        timer.as_mut().reset(Instant::now() + idle);
    }
    (up, down, false)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Step {
    Moved,
    /// The reading side finished; its end was passed on.
    Ended,
    /// The writing side failed: the tunnel is over.
    Failed,
}

/// Writes what one read gave to `to`, counting it; at the end of the reading side, shuts `to`'s
/// write half so the other side sees it.
async fn pass_on<W: AsyncWrite + Unpin>(
    read: std::io::Result<usize>,
    buf: &[u8],
    to: &mut W,
    total: &mut u64,
    counter: &Counter,
) -> Step {
    match read {
        Ok(n) if n > 0 => {
            if to.write_all(&buf[..n]).await.is_err() {
                return Step::Failed;
            }
            *total += n as u64;
            counter.inc_by(n as u64);
            Step::Moved
        }
        _ => {
            let _ = to.shutdown().await;
            Step::Ended
        }
    }
}

/// One of a source's tunnels, counted while it lives.
struct SourceSlot {
    map: Arc<Mutex<HashMap<IpAddr, usize>>>,
    ip: IpAddr,
}

impl Drop for SourceSlot {
    fn drop(&mut self) {
        let mut map = self.map.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = map.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                map.remove(&self.ip);
            }
        }
    }
}

/// Holds a gauge up by one while it lives.
struct OpenGauge(Gauge);

impl OpenGauge {
    fn new(gauge: Gauge) -> Self {
        gauge.inc();
        OpenGauge(gauge)
    }
}

impl Drop for OpenGauge {
    fn drop(&mut self) {
        self.0.dec();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn auth() -> ProxyAuth {
        ProxyAuth {
            users: vec![
                ("mpns".into(), secret("s3cret")),
                ("other".into(), secret("pw")),
            ],
            challenge: "Basic realm=\"pushrelay\"".into(),
        }
    }

    fn secret(s: &str) -> Secret {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("users");
        std::fs::write(&path, format!("u:{s}\n")).unwrap();
        read_proxy_users(&path).unwrap().remove(0).1
    }

    fn with(value: &str) -> http::HeaderMap {
        let mut h = http::HeaderMap::new();
        h.insert(header::PROXY_AUTHORIZATION, value.parse().unwrap());
        h
    }

    fn basic(userpass: &str) -> String {
        format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode(userpass)
        )
    }

    #[test]
    fn proxy_credentials_are_checked_exactly() {
        let a = auth();
        assert!(a.allows(&with(&basic("mpns:s3cret"))));
        assert!(a.allows(&with(&basic("other:pw"))));
        assert!(a.allows(&with(&basic("mpns:s3cret").replace("Basic", "basic"))));
        for bad in [
            "mpns:s3cre",
            "mpns:s3cret2",
            "mpns:pw",
            "MPNS:s3cret",
            "mpns",
            "",
        ] {
            assert!(!a.allows(&with(&basic(bad))), "{bad}");
        }
        assert!(!a.allows(&with("Bearer abc")));
        assert!(!a.allows(&with("Basic !!!")));
        assert!(!a.allows(&http::HeaderMap::new()));
    }
}
