//! The configuration as written: the serde shape of the YAML file, its defaults, and what the rest
//! of pushrelay asks of it. Validation (validate.rs) checks what these types cannot.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

use super::values::{ProxyUrl, RelayUrl};
use super::{duration, text};
use crate::policy::Authority;

/// Where the APNs hosts are, by default: the only destinations a fresh install may reach.
pub const APNS_HOSTS: [&str; 3] = [
    "api.push.apple.com",
    "api.sandbox.push.apple.com",
    "api.development.push.apple.com",
];

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Front doors. Default: one pre-proxy listener on 127.0.0.1:8443 with a CA in ./certs.
    pub listeners: Vec<ListenerConfig>,
    /// The only `host:port` pairs pushrelay ever connects to. Default: the APNs hosts on 443.
    pub destinations: Vec<Authority>,
    /// `host:port` pairs a forward-proxy listener tunnels blindly (no TLS termination), e.g.
    /// `fcm.googleapis.com:443`. Never also a destination. Reloadable. Default: none.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub tunnels: Vec<Authority>,
    pub upstream: UpstreamConfig,
    pub limits: Limits,
    pub log: LogConfig,
    /// Admin listener (/healthz, /readyz, /metrics). Absent: off.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub admin: Option<AdminConfig>,
    /// How long in-flight requests may take to finish after SIGTERM. Default 15s.
    #[serde(with = "duration")]
    pub shutdown_grace: Duration,
    /// How often the configuration and certificate files are checked for changes (Kubernetes
    /// secret swaps); a change reloads as SIGHUP does. Default 30s.
    #[serde(with = "duration")]
    pub reload_poll_interval: Duration,
    /// Worker threads serving connections, each with its own event loop and its own share of the
    /// upstream connections; 0 means one per CPU. Default 0.
    pub workers: usize,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdminConfig {
    /// Default 127.0.0.1:9901. Keep it off the client networks: metrics name destinations.
    #[serde(default = "default_admin_bind", deserialize_with = "text::one")]
    pub bind: SocketAddr,
}

fn default_admin_bind() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 9901))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Mode {
    /// TLS + HTTP/2 from an APNs client that resolves the APNs host to pushrelay.
    PreProxy,
    /// HTTP/1.1 from a legacy corporate proxy, relayed as HTTP/2.
    PostProxy,
    /// The push server's HTTPS_PROXY: CONNECT to a destination is intercepted (TLS, then the
    /// pipeline), CONNECT to a `tunnels` entry is a blind tunnel, anything else is refused.
    ForwardProxy,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListenerConfig {
    /// Used in logs and metrics.
    pub name: String,
    pub mode: Mode,
    #[serde(deserialize_with = "text::one")]
    pub bind: SocketAddr,
    /// Port of the upstream host a request is forwarded to when the request names none. Default 443.
    #[serde(default = "default_upstream_port")]
    pub upstream_port: u16,
    /// Required for pre-proxy; optional for post-proxy (plain HTTP/1.1 when absent).
    #[serde(default)]
    pub tls: Option<ListenerTls>,
    /// Client networks allowed to connect. Empty or missing: nobody (with a startup warning).
    #[serde(default, deserialize_with = "text::list")]
    pub allow_sources: Vec<IpNet>,
    /// forward-proxy only: Basic credentials every CONNECT must carry. Absent: only
    /// `allow_sources` applies.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub proxy_auth: Option<ProxyAuthConfig>,
    /// Post-proxy only (a DMZ relay in a relay chain): every request must carry the shared secret
    /// in this file (the inside relay's `upstream.relay.secret_file`); others are refused with
    /// 403 RelayChainSecretRejected and nothing is sent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub relay_secret_file: Option<PathBuf>,
}

/// forward-proxy client authentication (`listeners[].proxy_auth`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProxyAuthConfig {
    /// One `user:password` per line (`#` starts a comment). A secret: keep it mode 0600.
    /// Reloaded like the certificates (SIGHUP, or a change on disk).
    pub users_file: PathBuf,
    /// Sent in `Proxy-Authenticate`. Default `pushrelay`.
    #[serde(default = "default_realm")]
    pub realm: String,
}

fn default_realm() -> String {
    "pushrelay".into()
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListenerTls {
    /// Mint a certificate per allowed host from this CA (with `ca_key`)…
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_cert: Option<PathBuf>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_key: Option<PathBuf>,
    /// …or serve this fixed chain and key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cert: Option<PathBuf>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<PathBuf>,
    /// Require client certificates signed by a CA in this file.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_ca: Option<PathBuf>,
}

/// Where a listener's server certificates come from: a CA that mints one per host, or a fixed
/// chain. The one reading of `ListenerTls`'s four paths.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CertSource {
    Mint { ca_cert: PathBuf, ca_key: PathBuf },
    Fixed { cert: PathBuf, key: PathBuf },
}

/// A listener's TLS as validated: one certificate source, optional client certificates.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerTls {
    pub source: CertSource,
    /// Require client certificates signed by a CA in this file.
    pub client_ca: Option<PathBuf>,
}

impl ListenerTls {
    /// The certificate source, when exactly one is given.
    pub fn cert_source(&self) -> Option<CertSource> {
        match (&self.ca_cert, &self.ca_key, &self.cert, &self.key) {
            (Some(ca_cert), Some(ca_key), None, None) => Some(CertSource::Mint {
                ca_cert: ca_cert.clone(),
                ca_key: ca_key.clone(),
            }),
            (None, None, Some(cert), Some(key)) => Some(CertSource::Fixed {
                cert: cert.clone(),
                key: key.clone(),
            }),
            _ => None,
        }
    }

    /// As validated: `None` when the certificate source is not exactly one.
    pub fn server_tls(&self) -> Option<ServerTls> {
        Some(ServerTls {
            source: self.cert_source()?,
            client_ca: self.client_ca.clone(),
        })
    }
}

// PartialEq compares secrets as they are: a reload must notice a password-only change.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct UpstreamConfig {
    /// HTTP CONNECT proxy, `http://[user:password@]host:port`. Absent: HTTPS_PROXY / https_proxy
    /// from the environment, else direct.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub proxy: Option<ProxyUrl>,
    /// Hosts reached directly even when a proxy is set: exact names, `.suffix` / `suffix` for a
    /// domain and its subdomains, or `*`. Taken from NO_PROXY / no_proxy when the proxy came from
    /// the environment.
    pub no_proxy: Vec<String>,
    /// PEM files whose certificates are trusted in addition to the public web PKI.
    pub extra_roots: Vec<PathBuf>,
    /// Fixed address for a destination, like curl's --connect-to: `"host:port": "addr:port"`.
    /// With a proxy, the CONNECT request names this address.
    pub connect_to: BTreeMap<Authority, String>,
    /// Bound on a whole upstream connect attempt (DNS, TCP, CONNECT reply, TLS, HTTP/2, first
    /// PING); a timeout names the step it cut.
    #[serde(with = "duration")]
    pub connect_timeout: Duration,
    /// While a destination that went down reconnects, requests wait this long for it before
    /// failing (at once for failures a retry cannot fix: proxy 407/403, certificate, DNS name).
    #[serde(with = "duration")]
    pub reconnect_wait: Duration,
    /// Bound on waiting for an upstream answer's head, including waiting for a connection.
    #[serde(with = "duration")]
    pub request_timeout: Duration,
    /// Which HTTP/2 client carries requests to the origin: `h2` (the h2 crate) or `native`
    /// (pushrelay's own codec, `h2client`). Not used with `relay` (HTTP/1.1 to the DMZ relay).
    pub http2_client: Http2Client,
    /// HTTP/2 PING interval on idle and busy upstream connections.
    #[serde(with = "duration")]
    pub keepalive_interval: Duration,
    /// A PING unanswered for this long closes the connection.
    #[serde(with = "duration")]
    pub keepalive_timeout: Duration,
    /// Upstream HTTP/2 connections per destination (and identity) at most, over all workers
    /// (a worker with none may still open one of its own).
    pub max_connections_per_destination: usize,
    /// Requests that may wait for a free stream per destination (over all workers) before 503
    /// RelayOverloaded.
    pub max_queued_requests: usize,
    /// Token-auth identities (JWT issuer + key id) with connections of their own, per
    /// destination; beyond, the least recently used idle one is dropped, or with none idle the
    /// request gets 503 RelayTooManyIdentities.
    pub max_token_identities: usize,
    /// New token identities admitted per destination per minute (also the burst): rotating
    /// made-up JWT issuers cannot churn connections to Apple faster than this.
    pub new_token_identities_per_minute: u32,
    /// Certificate-based APNs auth: requests whose `apns-topic` is `topic` (or it plus `.voip`,
    /// `.complication`, `.pushkit.fileprovider`) use connections that present this certificate.
    pub identities: Vec<IdentityConfig>,
    /// A relay chain: every destination is reached through this DMZ pushrelay (a post-proxy
    /// listener) over HTTP/1.1, instead of over HTTP/2 to the origin. Absent: HTTP/2 to the origin.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub relay: Option<RelayUpstreamConfig>,
}

/// `upstream.relay`: the DMZ relay of a relay chain.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RelayUpstreamConfig {
    /// `https://host:port`: CONNECT through `upstream.proxy` (when set), TLS to the DMZ relay
    /// (trusted through `upstream.extra_roots`; behind a TLS-inspecting proxy, the proxy's CA).
    /// `http://host:port`: plain requests in absolute form through `upstream.proxy`: push contents
    /// cross the network in clear.
    pub url: RelayUrl,
    /// The shared secret the DMZ relay's `relay_secret_file` holds (one line). Needed unless
    /// `client_cert` is set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret_file: Option<PathBuf>,
    /// PEM chain presented to the DMZ relay (https:// only), whose listener checks it against its
    /// `tls.client_ca`. Only where the proxy in between does not inspect TLS (a bumping proxy
    /// ends the handshake itself). Renewed files are picked up by a reload for new connections.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_cert: Option<PathBuf>,
    /// PEM private key of `client_cert`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_key: Option<PathBuf>,
    /// HTTP/1.1 connections to the DMZ relay at most, per destination (in place of
    /// `max_connections_per_destination`); each carries one request at a time. Default 64.
    #[serde(default = "default_relay_connections")]
    pub max_connections: usize,
    /// An unused connection is closed after this long. Keep it below the proxy's idle timeout
    /// (Squid: client_idle_pconn_timeout, 2m) and the DMZ relay's limits.idle_timeout. Default 50s.
    #[serde(default = "default_relay_idle", with = "duration")]
    pub idle_timeout: Duration,
}

fn default_relay_connections() -> usize {
    64
}

fn default_relay_idle() -> Duration {
    Duration::from_secs(50)
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IdentityConfig {
    pub topic: String,
    /// PEM chain (the app's APNs certificate first).
    pub cert: PathBuf,
    /// PEM private key of that certificate.
    pub key: PathBuf,
    /// Names of the listeners whose clients may push with this certificate. None: no client may
    /// (the topic alone never grants it: any allowed client can send any `apns-topic`).
    #[serde(default)]
    pub listeners: Vec<String>,
    /// When not empty: only clients whose TLS client certificate (on a listener with
    /// `tls.client_ca`) has one of these subject common names.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub client_subjects: Vec<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    /// Client connections open at once, per listener; a connection above it is closed at once
    /// (plain HTTP/1.1 listeners answer 503 first), counted and logged.
    pub max_connections: usize,
    /// Bound on the client's TLS handshake, and on a new connection's first request: a
    /// connection that sends nothing is closed this long after accept.
    #[serde(with = "duration")]
    pub handshake_timeout: Duration,
    /// A request's body must arrive whole within this long after its head (408 otherwise); the
    /// request goes upstream only once it is complete.
    #[serde(with = "duration")]
    pub request_body_timeout: Duration,
    /// Bound on a client that does not read: an HTTP/2 answer waiting this long for flow-control
    /// credit is reset; a connection whose socket takes nothing for this long, or an HTTP/1.1
    /// answer not written within it, closes.
    #[serde(with = "duration")]
    pub client_write_timeout: Duration,
    /// Largest request body in bytes (413 above). APNs allows 4096 (5120 for VoIP), FCM 4096 of
    /// data in a message of a few KiB: 64 KiB leaves room and bounds what a request may buffer.
    pub max_request_body: usize,
    /// Largest HTTP/1.1 request head or HTTP/2 header list in bytes (431 above).
    pub max_header_bytes: usize,
    /// Idle client connections are closed after this long: HTTP/1.1 between requests, HTTP/2
    /// with no stream open (GOAWAY first).
    #[serde(with = "duration")]
    pub idle_timeout: Duration,
    /// forward-proxy: CONNECT tunnels (intercepted or blind) one client address may hold open.
    pub max_tunnels_per_source: usize,
    /// forward-proxy: a blind tunnel with no byte either way for this long is closed.
    #[serde(with = "duration")]
    pub tunnel_idle_timeout: Duration,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    pub format: LogFormat,
    /// A tracing filter such as `info` or `pushrelay=debug`; RUST_LOG wins when set.
    pub level: String,
}

/// `upstream.http2_client`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Http2Client {
    /// The h2 crate's client.
    H2,
    /// pushrelay's own HTTP/2 client codec (`crate::h2client`), written for the APNs side: the
    /// default (fewer instructions and less CPU per push than `h2`, docs/benchmarks.md).
    #[default]
    Native,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Text,
    Json,
}

fn default_upstream_port() -> u16 {
    443
}

impl Default for Config {
    fn default() -> Self {
        Config {
            listeners: vec![ListenerConfig {
                name: "apns".into(),
                mode: Mode::PreProxy,
                bind: SocketAddr::from(([127, 0, 0, 1], 8443)),
                upstream_port: 443,
                tls: Some(ListenerTls {
                    ca_cert: Some("certs/ca.pem".into()),
                    ca_key: Some("certs/ca.key".into()),
                    ..ListenerTls::default()
                }),
                allow_sources: vec![
                    IpNet::from(std::net::IpAddr::from([127, 0, 0, 0])),
                    IpNet::from(std::net::IpAddr::from(std::net::Ipv6Addr::LOCALHOST)),
                ]
                .into_iter()
                .map(|net| match net {
                    IpNet::V4(v4) => IpNet::V4(ipnet::Ipv4Net::new_assert(v4.addr(), 8)),
                    v6 => v6,
                })
                .collect(),
                proxy_auth: None,
                relay_secret_file: None,
            }],
            destinations: APNS_HOSTS
                .iter()
                .filter_map(|h| Authority::new(h, 443).ok())
                .collect(),
            tunnels: Vec::new(),
            upstream: UpstreamConfig::default(),
            limits: Limits::default(),
            log: LogConfig::default(),
            admin: None,
            shutdown_grace: Duration::from_secs(15),
            reload_poll_interval: Duration::from_secs(30),
            workers: 0,
        }
    }
}

impl Default for UpstreamConfig {
    fn default() -> Self {
        UpstreamConfig {
            proxy: None,
            no_proxy: Vec::new(),
            extra_roots: Vec::new(),
            connect_to: BTreeMap::new(),
            connect_timeout: Duration::from_secs(10),
            reconnect_wait: Duration::from_secs(5),
            request_timeout: Duration::from_secs(30),
            http2_client: Http2Client::Native,
            keepalive_interval: Duration::from_secs(30),
            keepalive_timeout: Duration::from_secs(10),
            max_connections_per_destination: 8,
            max_queued_requests: 1024,
            max_token_identities: 64,
            new_token_identities_per_minute: 60,
            identities: Vec::new(),
            relay: None,
        }
    }
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_connections: 4096,
            handshake_timeout: Duration::from_secs(10),
            request_body_timeout: Duration::from_secs(10),
            client_write_timeout: Duration::from_secs(10),
            max_request_body: 64 * 1024,
            max_header_bytes: 16 * 1024,
            idle_timeout: Duration::from_secs(300),
            max_tunnels_per_source: 256,
            tunnel_idle_timeout: Duration::from_secs(300),
        }
    }
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            format: LogFormat::Text,
            level: "info".into(),
        }
    }
}

impl Config {
    /// The effective configuration as YAML, secrets masked: what `pushrelay check` prints.
    pub fn to_yaml(&self) -> String {
        serde_saphyr::to_string(self)
            .unwrap_or_else(|e| format!("# cannot render configuration: {e}\n"))
    }

    /// Every certificate and key file the configuration names, and forward-proxy users files
    /// (watched for replacement).
    pub fn tls_files(&self) -> Vec<PathBuf> {
        let mut files = Vec::new();
        for l in &self.listeners {
            if let Some(t) = &l.tls {
                files.extend(
                    [&t.ca_cert, &t.ca_key, &t.cert, &t.key, &t.client_ca]
                        .into_iter()
                        .flatten()
                        .cloned(),
                );
            }
        }
        files.extend(
            self.listeners
                .iter()
                .filter_map(|l| l.proxy_auth.as_ref())
                .map(|a| a.users_file.clone()),
        );
        files.extend(self.upstream.extra_roots.iter().cloned());
        for id in &self.upstream.identities {
            files.extend([id.cert.clone(), id.key.clone()]);
        }
        if let Some(r) = &self.upstream.relay {
            files.extend(
                [&r.client_cert, &r.client_key]
                    .into_iter()
                    .flatten()
                    .cloned(),
            );
        }
        files.extend(
            self.listeners
                .iter()
                .filter_map(|l| l.relay_secret_file.clone()),
        );
        files
    }

    /// Whether `host` is reached without the proxy, by `upstream.no_proxy`.
    pub fn bypasses_proxy(no_proxy: &[String], host: &str) -> bool {
        no_proxy.iter().any(|entry| {
            let entry = entry.trim().trim_end_matches('.').to_ascii_lowercase();
            let entry = entry.strip_prefix('*').unwrap_or(&entry);
            if entry.is_empty() {
                return true;
            }
            let suffix = entry.strip_prefix('.').unwrap_or(entry);
            host == suffix || host.ends_with(&format!(".{suffix}"))
        })
    }
}
