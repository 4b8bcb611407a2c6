//! `pushrelay probe`: the tool an admin runs when pushes stop. For each destination it walks the
//! upstream path step by step (name resolution or connect_to, TCP to the proxy or origin, the
//! CONNECT answer, TLS to the origin, HTTP/2 SETTINGS, PING round-trip), timing each step and
//! stopping at the first failure with a hint. This module owns only the diagnosis and its wording:
//! the route, the CONNECT handshake and the TLS client come from `upstream` and `tls::client`, so
//! the probe takes the way `serve` takes.

use std::future::Future;
use std::io::{self, Write};
use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use h2::{Ping, PingPong};
use rustls::{CertificateError, ClientConfig, ClientConnection};
use tokio::net::TcpStream;
use tokio::task::JoinHandle;
use tokio::time::{Instant, timeout};
use tokio_rustls::client::TlsStream;

use crate::config::{Config, ProxyUrl};
use crate::policy::Authority;
use crate::upstream::connect::{ConnectError, Connector, H2Send, Route};
use crate::upstream::tunnel::{self, TunnelError};

/// Runs the probe for `only` (a `host:port` from destinations or tunnels, or a host alone) or
/// every destination and tunnel. A tunnel is walked up to TLS: what lies inside is the client's.
/// Exit 0 when every probed destination is reachable, 1 when one is not, 2 when `only` is not a
/// destination or tunnel.
pub fn run(config: &Config, only: Option<&str>) -> ExitCode {
    let known: Vec<Authority> = config
        .destinations
        .iter()
        .chain(&config.tunnels)
        .cloned()
        .collect();
    let dests = match select(&known, only) {
        Ok(d) => d,
        Err(message) => return fail_early(&message, 2),
    };
    let tls = match crate::tls::client::build(&config.upstream.extra_roots, None) {
        Ok(t) => t,
        Err(e) => return fail_early(&format!("invalid configuration: {e}"), 2),
    };
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => return fail_early(&format!("cannot start the runtime: {e}"), 1),
    };
    let mut report = Report {
        out: io::stdout().lock(),
    };
    let mut all_ok = true;
    for dest in &dests {
        let tunnel = config.tunnels.contains(dest);
        all_ok &= runtime.block_on(probe(config, dest, tunnel, &tls, &mut report));
    }
    if all_ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    }
}

fn fail_early(message: &str, code: u8) -> ExitCode {
    let _ = writeln!(io::stderr(), "pushrelay probe: {message}");
    ExitCode::from(code)
}

/// The destinations to probe: all, or those matching `only` (a host alone matches every port).
fn select(destinations: &[Authority], only: Option<&str>) -> Result<Vec<Authority>, String> {
    if destinations.is_empty() {
        return Err("destinations and tunnels are empty: nothing to probe".into());
    }
    let Some(only) = only else {
        return Ok(destinations.to_vec());
    };
    let chosen: Vec<Authority> = match Authority::split_host_port(only) {
        Ok((host, port)) => destinations
            .iter()
            .filter(|d| d.host() == host && port.is_none_or(|p| p == d.port()))
            .cloned()
            .collect(),
        Err(_) => Vec::new(),
    };
    if chosen.is_empty() {
        let allowed: Vec<String> = destinations.iter().map(ToString::to_string).collect();
        return Err(format!(
            "{only:?} is not in destinations or tunnels; probe one of: {}",
            allowed.join(", ")
        ));
    }
    Ok(chosen)
}

/// Probes one destination and prints its verdict; true when it is reachable.
async fn probe<W: Write>(
    config: &Config,
    dest: &Authority,
    tunnel: bool,
    tls: &Arc<ClientConfig>,
    report: &mut Report<W>,
) -> bool {
    if tunnel {
        let _ = writeln!(report.out, "{dest} (tunnel: TCP, CONNECT, TLS)");
    } else {
        let _ = writeln!(report.out, "{dest}");
    }
    let verdict = walk(config, dest, tunnel, tls, report).await;
    match verdict {
        Ok(()) => report.line("verdict", "OK", None),
        Err(step) => report.line("verdict", &format!("FAILED at {step}"), None),
    }
    let _ = writeln!(report.out);
    verdict.is_ok()
}

/// The steps in order; the first failure ends the walk with the step's name. A tunnel ends at
/// TLS.
async fn walk<W: Write>(
    config: &Config,
    dest: &Authority,
    tunnel: bool,
    tls: &Arc<ClientConfig>,
    report: &mut Report<W>,
) -> Result<(), &'static str> {
    let wait = config.upstream.connect_timeout;
    let connector = Connector::new(&config.upstream);
    // The first hop is the proxy, or the destination (at its connect_to address, if any).
    let (hop, proxy) = match (connector.route(dest), &config.upstream.proxy) {
        (Route::Proxy { target, .. }, Some(p)) => (p.address(), Some((p, target))),
        (Route::Direct { addr }, _) | (Route::Proxy { target: addr, .. }, None) => (addr, None),
    };
    let via = proxy.as_ref().map(|(p, target)| (*p, target.as_str()));
    let addrs = report
        .step("route", route(config, dest, &hop, via, wait))
        .await?;
    let mut tcp = report
        .step("tcp", tcp(&addrs, via.map(|(p, _)| p), wait))
        .await?;
    if let Some((proxy, target)) = via {
        report
            .step("connect", connect(&mut tcp, proxy, target, wait))
            .await?;
    }
    let tls_stream = report
        .step("tls", handshake_tls(&connector, tcp, dest, tls))
        .await?;
    if tunnel {
        return Ok(());
    }
    let mut session = report.step("http2", http2(tls_stream, wait)).await?;
    report.step("ping", ping(&mut session, wait)).await?;
    session.close().await;
    Ok(())
}

/// Room for a step's first line before its duration (80 columns in all).
const DETAIL_WIDTH: usize = 56;

/// Plain aligned text on stdout: one line per step, its detail, its duration.
struct Report<W> {
    out: W,
}

/// A failed step: what happened, and what to check.
struct Failure {
    what: String,
    hint: Option<String>,
}

impl Failure {
    fn new(what: impl Into<String>) -> Self {
        Failure {
            what: what.into(),
            hint: None,
        }
    }

    fn hint(mut self, hint: impl Into<String>) -> Self {
        self.hint = Some(hint.into());
        self
    }
}

/// What a step that worked gives to the next one, and the line it prints.
type Done<T> = Result<(T, String), Failure>;

impl<W: Write> Report<W> {
    /// `label`, the first line of `text` and the duration; further lines of `text` below it.
    fn line(&mut self, label: &str, text: &str, took: Option<Duration>) {
        let mut lines = text.lines();
        let first = lines.next().unwrap_or("");
        let _ = match took {
            Some(took) => writeln!(
                self.out,
                "  {label:<9} {first:<DETAIL_WIDTH$} {:>9}",
                ms(took)
            ),
            None => writeln!(self.out, "  {label:<9} {first}"),
        };
        for more in lines {
            let _ = writeln!(self.out, "  {:<9}   {more}", "");
        }
    }

    /// Runs and times one step, prints its line (and hint), and passes on its result.
    async fn step<T>(
        &mut self,
        name: &'static str,
        work: impl Future<Output = Done<T>>,
    ) -> Result<T, &'static str> {
        let start = Instant::now();
        let result = work.await;
        let took = start.elapsed();
        match result {
            Ok((value, detail)) => {
                self.line(name, &detail, Some(took));
                Ok(value)
            }
            Err(failure) => {
                let mut text = format!("FAILED: {}", failure.what);
                if text.len() > DETAIL_WIDTH {
                    text = format!("FAILED\n{}", failure.what);
                }
                self.line(name, &text, Some(took));
                if let Some(hint) = failure.hint {
                    self.line("hint", &hint, None);
                }
                Err(name)
            }
        }
    }
}

/// Step 1: which way the connection goes, and what the first hop's name resolves to.
async fn route(
    config: &Config,
    dest: &Authority,
    hop: &str,
    proxy: Option<(&ProxyUrl, &str)>,
    wait: Duration,
) -> Done<Vec<SocketAddr>> {
    let addrs: Vec<SocketAddr> = match timeout(wait, tokio::net::lookup_host(hop)).await {
        Err(_) => {
            return Err(
                Failure::new(format!("resolving {hop} took longer than {wait:?}"))
                    .hint("check this machine's DNS (/etc/resolv.conf)"),
            );
        }
        Ok(Err(e)) => {
            let hint = match proxy {
                Some(_) => {
                    "check the host in upstream.proxy (or HTTPS_PROXY) and this machine's DNS"
                }
                None => {
                    "without outside DNS, set upstream.proxy (or HTTPS_PROXY), or pin the address \
                     with upstream.connect_to"
                }
            };
            return Err(Failure::new(format!("cannot resolve {hop}: {e}")).hint(hint));
        }
        Ok(Ok(addrs)) => addrs.collect(),
    };
    if addrs.is_empty() {
        return Err(Failure::new(format!("{hop} resolves to no address")));
    }
    let resolved = list(&addrs);
    if let Some((p, target)) = proxy {
        let detail = format!("via proxy {p}\nproxy resolves to {resolved}\ntunnel to {target}");
        return Ok((addrs, detail));
    }
    let bypass = match config.upstream.proxy {
        Some(_) => format!(" (upstream.no_proxy matches {})", dest.host()),
        None => String::new(),
    };
    let detail = if config.upstream.connect_to.contains_key(dest) {
        format!("direct{bypass}\nconnect_to {hop} resolves to {resolved}")
    } else {
        format!("direct{bypass}\n{} resolves to {resolved}", dest.host())
    };
    Ok((addrs, detail))
}

/// Step 2: TCP to the first address that answers.
async fn tcp(addrs: &[SocketAddr], proxy: Option<&ProxyUrl>, wait: Duration) -> Done<TcpStream> {
    let whom = if proxy.is_some() { "proxy " } else { "" };
    let attempt = async {
        let mut last = None;
        for addr in addrs {
            match TcpStream::connect(addr).await {
                Ok(stream) => return Ok((stream, *addr)),
                Err(e) => last = Some((*addr, e)),
            }
        }
        Err(last)
    };
    let blocked =
        "direct outbound traffic is probably blocked: set upstream.proxy (or HTTPS_PROXY)";
    match timeout(wait, attempt).await {
        Ok(Ok((stream, addr))) => {
            let _ = stream.set_nodelay(true);
            Ok((stream, format!("connected to {whom}{addr}")))
        }
        Ok(Err(None)) => Err(Failure::new("no address to connect to")),
        Ok(Err(Some((addr, e)))) => {
            let failure = Failure::new(format!("connecting to {whom}{addr} failed: {e}"));
            Err(match (e.kind(), proxy) {
                (io::ErrorKind::ConnectionRefused, Some(_)) => failure.hint(format!(
                    "nothing listens at {addr}: is upstream.proxy the right address/port?"
                )),
                (io::ErrorKind::ConnectionRefused, None) => failure.hint(format!(
                    "{addr} refused the connection: check the port (and upstream.connect_to)"
                )),
                (_, Some(_)) => failure,
                (_, None) => failure.hint(blocked),
            })
        }
        Err(_) => {
            let failure = Failure::new(format!(
                "no TCP answer from {whom}{} within {wait:?}",
                list(addrs)
            ));
            Err(match proxy {
                Some(_) => failure.hint(
                    "is upstream.proxy the right address/port? Is a firewall dropping packets?",
                ),
                None => failure.hint(blocked),
            })
        }
    }
}

/// Step 3 (with a proxy): CONNECT and the proxy's answer.
async fn connect(tcp: &mut TcpStream, proxy: &ProxyUrl, target: &str, wait: Duration) -> Done<()> {
    match timeout(wait, tunnel::handshake(tcp, proxy, target)).await {
        Ok(Ok(reply)) => {
            let mut detail = format!("proxy answered {} {}", reply.status, reply.reason);
            for (name, value) in &reply.headers {
                detail.push_str(&format!("\n{name}: {value}"));
            }
            Ok(((), detail))
        }
        Ok(Err(e)) => Err(tunnel_failure(&e, proxy, target)),
        Err(_) => Err(
            Failure::new(format!("no answer to CONNECT {target} within {wait:?}"))
                .hint("proxy did not answer: is upstream.proxy the right address/port?"),
        ),
    }
}

fn tunnel_failure(e: &TunnelError, proxy: &ProxyUrl, target: &str) -> Failure {
    let not_http = "is upstream.proxy an HTTP CONNECT proxy (not SOCKS, not HTTPS)?";
    match e {
        TunnelError::Refused {
            status,
            reason,
            headers,
            ..
        } => {
            let shown: Vec<String> = headers.iter().map(|(k, v)| format!("{k}: {v}")).collect();
            let failure = Failure::new(if shown.is_empty() {
                format!("proxy answered {status} {reason}")
            } else {
                format!("proxy answered {status} {reason}; {}", shown.join("; "))
            });
            match status {
                407 if proxy.username.is_none() => failure.hint(
                    "proxy answered 407: check upstream.proxy credentials (none are set: \
                     http://user:password@host:port)",
                ),
                407 => failure.hint("proxy answered 407: check upstream.proxy credentials"),
                403 => failure.hint(format!(
                    "proxy refused the tunnel: ask the proxy admin to allow CONNECT to {target}"
                )),
                502..=504 => failure.hint(format!(
                    "the proxy could not reach {target}: its DNS or its own way out fails"
                )),
                _ => failure,
            }
        }
        TunnelError::Closed { .. } | TunnelError::Malformed { .. } => {
            Failure::new(e.to_string()).hint(not_http)
        }
        _ => Failure::new(e.to_string()),
    }
}

/// Step 4: TLS with SNI = the destination host, as the relay does it.
async fn handshake_tls(
    connector: &Connector,
    tcp: TcpStream,
    dest: &Authority,
    tls: &Arc<ClientConfig>,
) -> Done<TlsStream<TcpStream>> {
    match connector.tls(tcp, dest, tls).await {
        Ok(stream) => {
            let detail = describe_tls(stream.get_ref().1);
            Ok((stream, detail))
        }
        Err(e) => {
            let failure = Failure::new(e.to_string());
            Err(match tls_hint(&e, dest.host()) {
                Some(hint) => failure.hint(hint),
                None => failure,
            })
        }
    }
}

/// Version, ALPN and the leaf certificate's subject, issuer and expiry.
fn describe_tls(conn: &ClientConnection) -> String {
    let version = conn
        .protocol_version()
        .map_or_else(|| "TLS".to_owned(), |v| format!("{v:?}").replace('_', "."));
    let alpn = match conn.alpn_protocol() {
        Some(p) => format!("ALPN {}", String::from_utf8_lossy(p)),
        None => "no ALPN (HTTP/2 by prior knowledge)".to_owned(),
    };
    let leaf = conn
        .peer_certificates()
        .and_then(|chain| chain.first())
        .and_then(|der| x509_parser::parse_x509_certificate(der).ok());
    let cert = match leaf {
        Some((_, cert)) => {
            let validity = cert.validity();
            let left = match validity.time_to_expiration() {
                Some(left) => format!("in {} days", left.whole_days()),
                None => "EXPIRED".to_owned(),
            };
            format!(
                "subject {}\nissuer  {}\nexpires {} ({left})",
                cert.subject(),
                cert.issuer(),
                validity.not_after.to_datetime().date()
            )
        }
        None => "certificate unreadable".to_owned(),
    };
    format!("{version}, {alpn}\n{cert}")
}

fn tls_hint(e: &ConnectError, host: &str) -> Option<String> {
    let source = match e {
        ConnectError::Tls { source, .. } => source,
        ConnectError::TlsTimeout { .. } => {
            return Some("no TLS answer: is the far end a TLS server at all?".into());
        }
        ConnectError::NoH2 { .. } => {
            return Some(
                "HTTP/2 was refused: a TLS-inspecting proxy that speaks only HTTP/1.1? Ask for \
                 an inspection exemption for this host"
                    .into(),
            );
        }
        _ => return None,
    };
    let hint = match source
        .get_ref()
        .and_then(|i| i.downcast_ref::<rustls::Error>())
    {
        Some(rustls::Error::InvalidCertificate(cert)) => match cert {
            CertificateError::UnknownIssuer => {
                "certificate issued by an unknown CA: a TLS-inspecting proxy? add its CA to \
                 upstream.extra_roots"
                    .into()
            }
            CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. } => {
                format!(
                    "the certificate is not for {host}: the connection reached another server \
                     (check upstream.connect_to), or something answers in its place"
                )
            }
            CertificateError::Expired | CertificateError::ExpiredContext { .. } => {
                "the certificate has expired (or this machine's clock is wrong)".into()
            }
            CertificateError::NotValidYet | CertificateError::NotValidYetContext { .. } => {
                "the certificate is not valid yet: is this machine's clock right?".into()
            }
            _ => return None,
        },
        Some(rustls::Error::InvalidMessage(_)) => {
            "the far end does not speak TLS: a wrong port in upstream.connect_to?".into()
        }
        Some(_) => return None,
        None => match source.kind() {
            io::ErrorKind::UnexpectedEof | io::ErrorKind::ConnectionReset => format!(
                "the connection was cut during the handshake: a firewall or proxy blocking TLS \
                 to {host}?"
            ),
            _ => return None,
        },
    };
    Some(hint)
}

/// An HTTP/2 connection driven by its own task, which ends when the session is dropped.
struct Session {
    send: H2Send,
    ping_pong: PingPong,
    task: AbortOnDrop,
}

struct AbortOnDrop(JoinHandle<Result<(), h2::Error>>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

impl Session {
    /// Closes politely: with no handle left, h2 sends GOAWAY and ends the connection.
    async fn close(self) {
        let Session {
            send,
            ping_pong,
            mut task,
        } = self;
        drop((send, ping_pong));
        let _ = timeout(Duration::from_millis(500), &mut task.0).await;
    }
}

const NOT_H2: &str =
    "the far end does not speak HTTP/2: a TLS-inspecting proxy that speaks only HTTP/1.1?";

/// Step 5: the HTTP/2 handshake; after the first PONG the origin's SETTINGS are in force.
async fn http2(tls: TlsStream<TcpStream>, wait: Duration) -> Done<Session> {
    let handshake = h2::client::Builder::new()
        .enable_push(false)
        .handshake::<_, Bytes>(tls);
    let (send, mut connection) = match timeout(wait, handshake).await {
        Err(_) => return Err(Failure::new(format!("no HTTP/2 handshake within {wait:?}"))),
        Ok(Err(e)) => return Err(Failure::new(format!("HTTP/2 handshake: {e}")).hint(NOT_H2)),
        Ok(Ok(pair)) => pair,
    };
    let Some(ping_pong) = connection.ping_pong() else {
        return Err(Failure::new("HTTP/2 PING is not available"));
    };
    let mut session = Session {
        send,
        ping_pong,
        task: AbortOnDrop(tokio::spawn(connection)),
    };
    match timeout(wait, session.ping_pong.ping(Ping::opaque())).await {
        Err(_) => {
            return Err(
                Failure::new(format!("no SETTINGS / PING answer within {wait:?}")).hint(NOT_H2),
            );
        }
        Ok(Err(e)) => return Err(Failure::new(format!("HTTP/2: {e}")).hint(NOT_H2)),
        Ok(Ok(_)) => {}
    }
    let streams = match session.send.current_max_send_streams() {
        usize::MAX => "unlimited".to_owned(),
        n => n.to_string(),
    };
    Ok((session, format!("max concurrent streams {streams}")))
}

/// Step 6: one PING on the settled connection; the step's duration is the round-trip.
async fn ping(session: &mut Session, wait: Duration) -> Done<()> {
    match timeout(wait, session.ping_pong.ping(Ping::opaque())).await {
        Ok(Ok(_)) => Ok(((), "round-trip".to_owned())),
        Ok(Err(e)) => Err(Failure::new(format!("PING failed: {e}"))),
        Err(_) => Err(Failure::new(format!("no PING answer within {wait:?}"))),
    }
}

fn ms(d: Duration) -> String {
    if d < Duration::from_secs(1) {
        format!("{:.1} ms", d.as_secs_f64() * 1000.0)
    } else {
        format!("{:.2} s", d.as_secs_f64())
    }
}

/// Up to three addresses, then how many more.
fn list(addrs: &[SocketAddr]) -> String {
    let shown: Vec<String> = addrs.iter().take(3).map(ToString::to_string).collect();
    match addrs.len().saturating_sub(3) {
        0 => shown.join(", "),
        more => format!("{} and {more} more", shown.join(", ")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dests() -> Vec<Authority> {
        [
            "api.push.apple.com:443",
            "api.push.apple.com:2197",
            "fcm.googleapis.com:443",
        ]
        .iter()
        .map(|d| d.parse().unwrap())
        .collect()
    }

    /// A destination is chosen by host:port (any case), a host alone picks all its ports, and
    /// anything else is refused naming every allowed destination.
    #[test]
    fn select_matches_destinations_only() {
        let all = dests();
        assert_eq!(select(&all, None).unwrap(), all);
        assert_eq!(
            select(&all, Some("API.push.apple.com:2197")).unwrap(),
            [all[1].clone()]
        );
        assert_eq!(select(&all, Some("api.push.apple.com")).unwrap(), all[..2]);
        let err = select(&all, Some("api.push.apple.com:8443")).unwrap_err();
        assert!(
            err.contains("api.push.apple.com:443, api.push.apple.com:2197, fcm.googleapis.com:443"),
            "{err}"
        );
        assert!(select(&all, Some("not a host")).is_err());
        assert!(select(&[], None).unwrap_err().contains("empty"));
    }

    /// A TLS error from rustls inside the io::Error becomes the matching hint.
    #[test]
    fn tls_errors_get_hints() {
        let tls = |e: rustls::Error| ConnectError::Tls {
            host: "h".into(),
            source: io::Error::new(io::ErrorKind::InvalidData, e),
        };
        let cert = |c| tls(rustls::Error::InvalidCertificate(c));
        let hint = |e| tls_hint(&e, "api.push.apple.com").unwrap_or_default();
        assert!(
            hint(cert(CertificateError::UnknownIssuer))
                .contains("add its CA to upstream.extra_roots")
        );
        assert!(
            hint(cert(CertificateError::NotValidForName)).contains("not for api.push.apple.com")
        );
        assert!(hint(cert(CertificateError::Expired)).contains("expired"));
        let eof = ConnectError::Tls {
            host: "h".into(),
            source: io::Error::from(io::ErrorKind::UnexpectedEof),
        };
        assert!(hint(eof).contains("cut during the handshake"));
        assert_eq!(tls_hint(&cert(CertificateError::BadSignature), "h"), None);
    }

    /// Durations print in ms below a second, and long address lists are cut after three.
    #[test]
    fn durations_and_addresses_read_well() {
        assert_eq!(ms(Duration::from_micros(1260)), "1.3 ms");
        assert_eq!(ms(Duration::from_millis(2500)), "2.50 s");
        let addrs: Vec<SocketAddr> = (1..=5)
            .map(|p| SocketAddr::from(([127, 0, 0, 1], p)))
            .collect();
        assert_eq!(list(&addrs[..1]), "127.0.0.1:1");
        assert_eq!(
            list(&addrs),
            "127.0.0.1:1, 127.0.0.1:2, 127.0.0.1:3 and 2 more"
        );
    }
}
