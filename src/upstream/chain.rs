//! The HTTP/1.1 connection kind of a relay chain: every destination is reached through one DMZ
//! pushrelay (a post-proxy listener), over keep-alive connections that carry one request at a
//! time (capacity 1 in the pool), at most `upstream.relay.max_connections` of them per
//! destination. `https://`: a CONNECT tunnel through the proxy, TLS to the DMZ relay, requests in
//! origin form with `Host` naming the DMZ relay and the APNs host in `pushrelay-destination`.
//! `http://`: requests in absolute form for the APNs host to the proxy (whose parent is the DMZ
//! relay), or to the DMZ relay when there is no proxy. Each connection has a driver task that owns
//! the socket: it writes a request and reads its answer whole, notices a connection closed while
//! idle (and tells the pool at once), and closes it after `upstream.relay.idle_timeout` unused.
//! HTTP/1.1 cannot say a request went unprocessed, so once a byte of a push was written it is
//! never sent again; a connection found dead before the write says "nothing written", and the
//! pool sends the push once on another. The DMZ relay knows the inside relay by the shared secret
//! (a header of pushrelay's own) and/or the client certificate presented in the TLS handshake;
//! TLS 1.3 refuses a certificate only after our side finished the handshake, so that refusal
//! shows as a TLS alert on the connection's first read and is named as the TLS hop (nothing of
//! the request was taken as HTTP). The pool (`pool.rs`) does the rest, as for HTTP/2:
//! checkout, queue, fairness, back-off, riding out an outage, metrics, the status page.

use std::io;
use std::sync::Arc;
use std::time::Duration;

use base64::Engine;
use bytes::Bytes;
use http::header::HeaderName;
use http::{Method, Request, Response};
use rustls::ClientConfig;
use rustls::pki_types::ServerName;
use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot};
use tokio::time::{Instant, sleep, timeout_at};
use tokio_rustls::TlsConnector;
use tokio_util::sync::CancellationToken;

use super::connect::{ConnectError, Connector, Route};
pub use super::http1_client::WireError;
use super::http1_client::{self, Io};
use super::tunnel::TunnelError;
use crate::config::{Config, ProxyUrl, RelayUpstreamConfig, Secret, UpstreamConfig};
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

/// Why a request failed on a connection to the DMZ relay.
#[derive(Debug)]
pub enum ChainFailure {
    /// The proxy in between answered in the DMZ relay's place.
    ProxyAnswered {
        status: u16,
    },
    /// The DMZ relay's TLS refused the handshake after our side had finished it (TLS 1.3 checks
    /// a client certificate only then): it never read the request as HTTP.
    TlsRefused(io::Error),
    Wire(WireError),
}

/// Why a request could not be exchanged with the DMZ relay (connecting is the pool's, and
/// fails with a `ConnectError::Relay`).
#[derive(Debug, thiserror::Error)]
pub enum ChainError {
    #[error("DMZ relay {relay} did not answer within {after:?} (the push may have been delivered)")]
    Timeout { relay: String, after: Duration },
    #[error("the proxy answered {status} instead of DMZ relay {relay} (connection {conn})")]
    ProxyAnswered {
        relay: String,
        conn: u64,
        status: u16,
    },
    #[error(
        "DMZ relay {relay} refused the TLS handshake on connection {conn} (nothing was sent; a client certificate it does not accept?): {source}"
    )]
    TlsRefused {
        relay: String,
        conn: u64,
        #[source]
        source: io::Error,
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
    pub fn new(relay: String, conn: u64, failure: ChainFailure) -> Self {
        match failure {
            ChainFailure::ProxyAnswered { status } => ChainError::ProxyAnswered {
                relay,
                conn,
                status,
            },
            ChainFailure::TlsRefused(source) => ChainError::TlsRefused {
                relay,
                conn,
                source,
            },
            ChainFailure::Wire(source) => ChainError::Exchange {
                relay,
                conn,
                source,
            },
        }
    }

    /// Whether nothing of the request was written.
    pub fn never_processed(&self) -> bool {
        match self {
            ChainError::Exchange { source, .. } => source.nothing_written(),
            ChainError::TlsRefused { .. } => true,
            ChainError::Timeout { .. } | ChainError::ProxyAnswered { .. } => false,
        }
    }

    /// A TLS refusal as the failed connect it is (for the destination's back-off).
    pub fn connect_refusal(&self) -> Option<ConnectError> {
        let ChainError::TlsRefused { relay, source, .. } = self else {
            return None;
        };
        Some(ConnectError::Relay {
            relay: relay.clone(),
            source: Box::new(ConnectError::CertificateRefused {
                host: relay.clone(),
                reason: source.to_string(),
            }),
        })
    }

    /// The proxy's own status, when it answered in the DMZ relay's place.
    pub fn proxy_status(&self) -> Option<u16> {
        match self {
            ChainError::ProxyAnswered { status, .. } => Some(*status),
            _ => None,
        }
    }

    /// The hop that failed, for logs.
    pub fn hop(&self) -> &'static str {
        match self {
            ChainError::ProxyAnswered { .. } => "proxy",
            ChainError::TlsRefused { .. } => "relay-tls",
            ChainError::Timeout { .. } | ChainError::Exchange { .. } => "relay",
        }
    }
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

/// What every connection to the DMZ relay shares: where it goes and how requests are written.
struct DmzRelay {
    relay: Authority,
    form: Form,
    /// Sent in `SECRET_HEADER` when set (`upstream.relay.secret_file`).
    secret: Option<Secret>,
    idle_timeout: Duration,
}

/// Opens HTTP/1.1 connections to the DMZ relay, whatever the destination.
pub struct ChainKind {
    relay: Arc<DmzRelay>,
}

/// The request side of one connection to the DMZ relay: a request goes to its driver.
pub struct ChainLink {
    relay: Arc<DmzRelay>,
    jobs: mpsc::Sender<Job>,
}

/// One request for the driver, and where its answer goes.
struct Job {
    bytes: Vec<u8>,
    method: Method,
    answer: oneshot::Sender<Result<Response<Bytes>, ChainFailure>>,
}

impl ChainKind {
    /// The route for `relay` (validated configuration), with `secret` read from its file (if it
    /// has one); `tls` holds its client certificate (if it has one).
    pub fn new(
        relay: &RelayUpstreamConfig,
        secret: Option<Secret>,
        upstream: &UpstreamConfig,
        tls: Arc<ClientConfig>,
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
        ChainKind {
            relay: Arc::new(DmzRelay {
                relay: dmz,
                form,
                secret,
                idle_timeout: relay.idle_timeout,
            }),
        }
    }

    /// The DMZ relay, as errors name it.
    pub fn relay_name(&self) -> String {
        self.relay.relay.to_string()
    }

    /// Opens one connection to the DMZ relay by `deadline`: TCP (through the tunnel for
    /// https://), then TLS for https://; starts its driver, which ends the connection when
    /// `close` is cancelled and says why it ended on the returned receiver (`None`: closed by
    /// `close`).
    pub async fn open(
        &self,
        deadline: Instant,
        close: CancellationToken,
    ) -> Result<(ChainLink, Route, oneshot::Receiver<Option<String>>), ConnectError> {
        let relay = &self.relay;
        let name = relay.relay.to_string();
        let wrap = |source: ConnectError| ConnectError::Relay {
            relay: name.clone(),
            source: Box::new(source),
        };
        let (io, route): (Box<dyn Io>, Route) = match &relay.form {
            Form::Tls { tls, connector } => {
                let (tcp, route) = connector
                    .tcp_until(&relay.relay, deadline)
                    .await
                    .map_err(wrap)?;
                let host = relay.relay.host().to_owned();
                let server = ServerName::try_from(host.clone()).map_err(|e| {
                    wrap(ConnectError::Tls {
                        host: host.clone(),
                        source: io::Error::new(io::ErrorKind::InvalidInput, e),
                    })
                })?;
                match timeout_at(
                    deadline,
                    TlsConnector::from(tls.clone()).connect(server, tcp),
                )
                .await
                {
                    Err(_) => {
                        return Err(wrap(ConnectError::TlsTimeout {
                            host,
                            after: connector.budget(),
                        }));
                    }
                    Ok(Err(source)) => return Err(wrap(ConnectError::Tls { host, source })),
                    Ok(Ok(stream)) => (Box::new(stream), route),
                }
            }
            Form::Plain { to, via_proxy, .. } => {
                let tcp = tcp(to, via_proxy.as_ref(), deadline).await.map_err(wrap)?;
                let route = match via_proxy {
                    Some(p) => Route::Proxy {
                        proxy: p.to_string(),
                        target: name.clone(),
                    },
                    None => Route::Direct {
                        addr: to.to_string(),
                    },
                };
                (Box::new(tcp), route)
            }
        };
        let (jobs, queue) = mpsc::channel(1);
        let (ended_tx, ended_rx) = oneshot::channel();
        tokio::spawn(drive(io, queue, relay.idle_timeout, close, ended_tx));
        Ok((
            ChainLink {
                relay: relay.clone(),
                jobs,
            },
            route,
            ended_rx,
        ))
    }
}

impl ChainLink {
    /// Sends one request for `dest` (its body whole) and reads the answer whole.
    pub async fn send(
        &self,
        dest: &Authority,
        head: &Request<()>,
        body: &[u8],
    ) -> Result<Response<Bytes>, ChainFailure> {
        let nothing_written = || {
            ChainFailure::Wire(WireError::Write {
                written: 0,
                source: io::ErrorKind::NotConnected.into(),
            })
        };
        let (answer, answered) = oneshot::channel();
        let job = Job {
            bytes: self.relay.request_bytes(dest, head, body),
            method: head.method().clone(),
            answer,
        };
        // The driver gone: the connection ended before anything of this was written.
        if self.jobs.try_send(job).is_err() {
            return Err(nothing_written());
        }
        answered
            .await
            .unwrap_or_else(|_| Err(ChainFailure::Wire(WireError::Closed)))
    }
}

impl DmzRelay {
    /// The request as written on this route: origin form over TLS (`Host` the DMZ relay, the
    /// destination in its own header), absolute form in plain; the relay secret (and proxy
    /// credentials) added.
    fn request_bytes(&self, dest: &Authority, head: &Request<()>, body: &[u8]) -> Vec<u8> {
        let host = head
            .uri()
            .authority()
            .map_or_else(|| dest.as_shared_str().as_ref(), |a| a.as_str());
        let path = head.uri().path_and_query().map_or("/", |p| p.as_str());
        let mut extra = Vec::with_capacity(3);
        if let Some(secret) = &self.secret {
            extra.push((SECRET_HEADER, secret.expose()));
        }
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
}

/// Owns one connection: waits for a request while watching the idle socket (a close, stray
/// bytes, `idle_timeout`, `close`), exchanges it, and goes on while the connection may be
/// reused; then says why it ended. A request whose caller left before its answer ends the
/// connection (the answer could no longer be told from the next one's).
async fn drive(
    mut io: Box<dyn Io>,
    mut jobs: mpsc::Receiver<Job>,
    idle_timeout: Duration,
    close: CancellationToken,
    ended: oneshot::Sender<Option<String>>,
) {
    // Nothing read on this connection yet: a TLS 1.3 refusal of our certificate can still come.
    let mut fresh = true;
    let mut refused = None;
    let why = loop {
        let mut byte = [0u8; 1];
        let job = tokio::select! {
            job = jobs.recv() => match job {
                Some(job) => job,
                None => break Some("no longer used".to_owned()),
            },
            read = io.read(&mut byte), if refused.is_none() => break Some(match read {
                // Kept for the request this connection was opened for, so that it learns why.
                Err(e) if fresh && http1_client::is_handshake_refusal(&e) => {
                    refused = Some(e);
                    continue;
                }
                Ok(0) => "closed by the peer while idle".to_owned(),
                Ok(_) => "the peer sent bytes nobody asked for".to_owned(),
                Err(e) => format!("error while idle: {e}"),
            }),
            () = sleep(idle_timeout) => break Some(format!("unused for {idle_timeout:?}")),
            () = close.cancelled() => break None,
        };
        let Job {
            bytes,
            method,
            mut answer,
        } = job;
        // Closed meanwhile: nothing of the request goes out, another connection may take it.
        let idle = match refused.take() {
            Some(e) => Some(Err(e)),
            None => http1_client::idle_read(&mut io),
        };
        match idle {
            None => {}
            Some(Err(e)) if fresh && http1_client::is_handshake_refusal(&e) => {
                let why = format!("the DMZ relay refused the TLS handshake: {e}");
                let _ = answer.send(Err(ChainFailure::TlsRefused(e)));
                break Some(why);
            }
            Some(_) => {
                let _ = answer.send(Err(ChainFailure::Wire(WireError::Write {
                    written: 0,
                    source: io::ErrorKind::ConnectionReset.into(),
                })));
                break Some("found closed before a write".to_owned());
            }
        }
        let exchange = async {
            http1_client::write_request(&mut io, &bytes).await?;
            http1_client::read_answer(&mut io, &method).await
        };
        let result = tokio::select! {
            r = exchange => r,
            () = answer.closed() => break Some("its request left before the answer".to_owned()),
        };
        let first = std::mem::replace(&mut fresh, false);
        match result {
            // Only the first bytes on a connection can meet a refused handshake.
            Err(WireError::Read(e)) if first && http1_client::is_handshake_refusal(&e) => {
                let why = format!("the DMZ relay refused the TLS handshake: {e}");
                let _ = answer.send(Err(ChainFailure::TlsRefused(e)));
                break Some(why);
            }
            Ok(a) if !a.response.headers().contains_key(DMZ_HEADER) => {
                let status = a.response.status().as_u16();
                let _ = answer.send(Err(ChainFailure::ProxyAnswered { status }));
                break Some(format!(
                    "the proxy answered {status} in the DMZ relay's place"
                ));
            }
            Ok(a) => {
                let reusable = a.reusable;
                let _ = answer.send(Ok(a.response));
                if !reusable {
                    break Some("the DMZ relay closes it after this answer".to_owned());
                }
            }
            Err(e) => {
                let why = format!("exchange failed: {e}");
                let _ = answer.send(Err(ChainFailure::Wire(e)));
                break Some(why);
            }
        }
    };
    // A request that came in as the connection ended was never written: say so.
    jobs.close();
    while let Ok(job) = jobs.try_recv() {
        let _ = job.answer.send(Err(ChainFailure::Wire(WireError::Write {
            written: 0,
            source: io::ErrorKind::NotConnected.into(),
        })));
    }
    let _ = ended.send(why);
}

/// Plain TCP to `to` by `deadline`; a failure names the proxy when `to` is the proxy.
async fn tcp(
    to: &Authority,
    proxy: Option<&ProxyUrl>,
    deadline: Instant,
) -> Result<TcpStream, ConnectError> {
    let addr = to.to_string();
    let after = deadline.saturating_duration_since(Instant::now());
    let connected = timeout_at(deadline, TcpStream::connect(addr.as_str())).await;
    let stream = match (connected, proxy) {
        (Ok(Ok(s)), _) => s,
        (Err(_), Some(p)) => {
            return Err(TunnelError::ConnectTimeout {
                proxy: p.to_string(),
                after,
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
        (Err(_), None) => return Err(ConnectError::TcpTimeout { addr, after }),
        (Ok(Err(source)), None) => return Err(ConnectError::Tcp { addr, source }),
    };
    let _ = stream.set_nodelay(true);
    Ok(stream)
}
