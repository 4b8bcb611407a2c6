//! Configuration: a YAML file plus `PUSHRELAY_` environment overrides (`__` between levels), parsed
//! into types and validated before anything binds. Every problem names the key, the value and where
//! it came from (file or environment variable); all problems are reported at once, not one per run.
//! Relative paths are relative to the working directory.

use std::collections::{BTreeMap, HashSet};
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use figment::providers::{Env, Format};
use figment::{Figment, Metadata};
use ipnet::IpNet;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::policy::Authority;

/// Where the APNs hosts are, by default: the only destinations a fresh install may reach.
pub const APNS_HOSTS: [&str; 3] = [
    "api.push.apple.com",
    "api.sandbox.push.apple.com",
    "api.development.push.apple.com",
];

const ENV_PREFIX: &str = "PUSHRELAY_";

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Front doors. Default: one pre-proxy listener on 127.0.0.1:8443 with a CA in ./certs.
    pub listeners: Vec<ListenerConfig>,
    /// The only `host:port` pairs pushrelay ever connects to. Default: the APNs hosts on 443.
    pub destinations: Vec<Authority>,
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

/// Where a listener's server certificates come from, once validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CertSource<'a> {
    Mint { ca_cert: &'a Path, ca_key: &'a Path },
    Fixed { cert: &'a Path, key: &'a Path },
}

impl ListenerTls {
    pub fn cert_source(&self) -> Option<CertSource<'_>> {
        match (&self.ca_cert, &self.ca_key, &self.cert, &self.key) {
            (Some(ca_cert), Some(ca_key), None, None) => Some(CertSource::Mint { ca_cert, ca_key }),
            (None, None, Some(cert), Some(key)) => Some(CertSource::Fixed { cert, key }),
            _ => None,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
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
    /// Bound on each step of opening an upstream connection (TCP, CONNECT reply, TLS, HTTP/2).
    #[serde(with = "duration")]
    pub connect_timeout: Duration,
    /// Bound on waiting for an upstream answer's head, including waiting for a connection.
    #[serde(with = "duration")]
    pub request_timeout: Duration,
    /// HTTP/2 PING interval on idle and busy upstream connections.
    #[serde(with = "duration")]
    pub keepalive_interval: Duration,
    /// A PING unanswered for this long closes the connection.
    #[serde(with = "duration")]
    pub keepalive_timeout: Duration,
    /// Upstream HTTP/2 connections per destination (and identity) at most.
    pub max_connections_per_destination: usize,
    /// Requests that may wait for a free stream per destination before 503 RelayOverloaded.
    pub max_queued_requests: usize,
    /// Token-auth identities (JWT issuer + key id) with connections of their own, per
    /// destination; beyond, the least recently used idle one is dropped, or with none idle the
    /// request gets 503 RelayTooManyIdentities.
    pub max_token_identities: usize,
    /// Certificate-based APNs auth: requests whose `apns-topic` is `topic` (or it plus `.voip`,
    /// `.complication`, `.pushkit.fileprovider`) use connections that present this certificate.
    pub identities: Vec<IdentityConfig>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IdentityConfig {
    pub topic: String,
    /// PEM chain (the app's APNs certificate first).
    pub cert: PathBuf,
    /// PEM private key of that certificate.
    pub key: PathBuf,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    /// Client connections open at once, per listener; more wait in the kernel's backlog.
    pub max_connections: usize,
    /// Bound on the client's TLS handshake.
    #[serde(with = "duration")]
    pub handshake_timeout: Duration,
    /// Largest request body in bytes (413 above). APNs allows 4096 (5120 for VoIP), FCM 4096 of
    /// data in a message of a few KiB: 64 KiB leaves room and bounds what a request may buffer.
    pub max_request_body: usize,
    /// Largest HTTP/1.1 request head or HTTP/2 header list in bytes (431 above).
    pub max_header_bytes: usize,
    /// Idle client connections are closed after this long: HTTP/1.1 between requests, HTTP/2
    /// with no stream open (GOAWAY first).
    #[serde(with = "duration")]
    pub idle_timeout: Duration,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    pub format: LogFormat,
    /// A tracing filter such as `info` or `pushrelay=debug`; RUST_LOG wins when set.
    pub level: String,
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
            }],
            destinations: APNS_HOSTS
                .iter()
                .filter_map(|h| Authority::new(h, 443).ok())
                .collect(),
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
            request_timeout: Duration::from_secs(30),
            keepalive_interval: Duration::from_secs(30),
            keepalive_timeout: Duration::from_secs(10),
            max_connections_per_destination: 8,
            max_queued_requests: 1024,
            max_token_identities: 64,
            identities: Vec::new(),
        }
    }
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_connections: 4096,
            handshake_timeout: Duration::from_secs(10),
            max_request_body: 64 * 1024,
            max_header_bytes: 16 * 1024,
            idle_timeout: Duration::from_secs(300),
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

/// A string that never shows itself in `Debug`, `Display` or serialized output.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

/// An HTTP CONNECT proxy: `http://[user[:password]@]host:port`. Displays with the password masked.
#[derive(Clone, PartialEq, Eq)]
pub struct ProxyUrl {
    pub host: String,
    pub port: u16,
    pub username: Option<String>,
    pub password: Option<Secret>,
}

impl ProxyUrl {
    /// `host:port` to open a TCP connection to (IPv6 in brackets).
    pub fn address(&self) -> String {
        if self.host.contains(':') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }
}

impl FromStr for ProxyUrl {
    type Err = String;

    /// Errors never repeat the password.
    fn from_str(s: &str) -> Result<Self, String> {
        let rest = match s.split_once("://") {
            Some((scheme, rest)) if scheme.eq_ignore_ascii_case("http") => rest,
            Some((scheme, _)) => {
                return Err(format!(
                    "proxy URL scheme {scheme:?} is not supported: pushrelay speaks plain HTTP CONNECT \
                     to the proxy, write http://host:port"
                ));
            }
            None => s,
        };
        let rest = rest.strip_suffix('/').unwrap_or(rest);
        let (userinfo, hostport) = match rest.rsplit_once('@') {
            Some((u, h)) => (Some(u), h),
            None => (None, rest),
        };
        let shown = match userinfo {
            Some(_) => format!("http://***@{hostport}"),
            None => format!("http://{hostport}"),
        };
        if hostport.contains('/') || hostport.contains('?') {
            return Err(format!("proxy URL {shown:?} must not have a path"));
        }
        let (host, port) = Authority::split_host_port(hostport)
            .map_err(|_| format!("proxy URL {shown:?} has an invalid host or port"))?;
        let port =
            port.ok_or_else(|| format!("proxy URL {shown:?} has no port: write http://host:port"))?;
        let (username, password) = match userinfo {
            None => (None, None),
            Some(u) => {
                let (user, pass) = match u.split_once(':') {
                    Some((user, pass)) => (user, Some(pass)),
                    None => (u, None),
                };
                let user = percent_decode(user)
                    .ok_or_else(|| format!("proxy URL {shown:?}: bad %-escape in user"))?;
                let pass = match pass {
                    Some(p) => Some(Secret(percent_decode(p).ok_or_else(|| {
                        format!("proxy URL {shown:?}: bad %-escape in password")
                    })?)),
                    None => None,
                };
                (Some(user), pass)
            }
        };
        Ok(ProxyUrl {
            host: host.into_owned(),
            port,
            username,
            password,
        })
    }
}

fn percent_decode(s: &str) -> Option<String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = s.get(i + 1..i + 3)?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

impl fmt::Display for ProxyUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("http://")?;
        if let Some(user) = &self.username {
            f.write_str(user)?;
            if self.password.is_some() {
                f.write_str(":***")?;
            }
            f.write_str("@")?;
        }
        f.write_str(&self.address())
    }
}

impl fmt::Debug for ProxyUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// Serde through `FromStr` / `Display`, for the string-shaped config types.
macro_rules! serde_via_str {
    ($ty:ty) => {
        impl<'de> Deserialize<'de> for $ty {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let s = String::deserialize(d)?;
                s.parse().map_err(serde::de::Error::custom)
            }
        }
        impl Serialize for $ty {
            fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.collect_str(self)
            }
        }
    };
}
serde_via_str!(ProxyUrl);
serde_via_str!(Authority);

/// Values written as text (addresses, networks), parsed with an error that repeats the value.
mod text {
    use std::fmt::Display;
    use std::str::FromStr;

    use serde::{Deserialize, Deserializer};

    fn parse<T: FromStr, E: serde::de::Error>(s: &str) -> Result<T, E>
    where
        T::Err: Display,
    {
        s.trim()
            .parse()
            .map_err(|e| E::custom(format!("invalid value {s:?}: {e}")))
    }

    pub fn one<'de, D: Deserializer<'de>, T: FromStr>(d: D) -> Result<T, D::Error>
    where
        T::Err: Display,
    {
        parse(&String::deserialize(d)?)
    }

    pub fn list<'de, D: Deserializer<'de>, T: FromStr>(d: D) -> Result<Vec<T>, D::Error>
    where
        T::Err: Display,
    {
        Vec::<String>::deserialize(d)?
            .iter()
            .map(|s| parse(s))
            .collect()
    }
}

/// Durations are written with a unit: `250ms`, `10s`, `5m`, `1h`.
pub mod duration {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    pub fn parse(s: &str) -> Result<Duration, String> {
        let s = s.trim();
        let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
        let (num, unit) = s.split_at(split);
        let n: u64 = num.parse().map_err(|_| {
            format!("invalid duration {s:?}: write a whole number and a unit, e.g. 10s, 250ms, 5m")
        })?;
        let d = match unit.trim() {
            "ms" => Duration::from_millis(n),
            "s" => Duration::from_secs(n),
            "m" => Duration::from_secs(n.saturating_mul(60)),
            "h" => Duration::from_secs(n.saturating_mul(3600)),
            "" => {
                return Err(format!(
                    "invalid duration {s:?}: a unit is needed (ms, s, m or h), e.g. {n}s"
                ));
            }
            other => {
                return Err(format!(
                    "invalid duration {s:?}: unknown unit {other:?} (ms, s, m or h)"
                ));
            }
        };
        Ok(d)
    }

    pub fn format(d: &Duration) -> String {
        let ms = d.as_millis();
        if !ms.is_multiple_of(1000) {
            format!("{ms}ms")
        } else if ms.is_multiple_of(3_600_000) && ms > 0 {
            format!("{}h", ms / 3_600_000)
        } else if ms.is_multiple_of(60_000) && ms > 0 {
            format!("{}m", ms / 60_000)
        } else {
            format!("{}s", ms / 1000)
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Text(String),
            Number(u64),
        }
        match Raw::deserialize(d)? {
            Raw::Text(s) => parse(&s).map_err(serde::de::Error::custom),
            Raw::Number(n) => Err(serde::de::Error::custom(format!(
                "invalid duration {n}: a unit is needed (ms, s, m or h), e.g. \"{n}s\""
            ))),
        }
    }

    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&format(d))
    }
}

/// The YAML format for figment, over serde-saphyr (safe Rust, with limits against YAML bombs).
struct Yaml;

impl Format for Yaml {
    type Error = serde_saphyr::Error;
    const NAME: &'static str = "YAML";

    fn from_str<T: serde::de::DeserializeOwned>(string: &str) -> Result<T, Self::Error> {
        serde_saphyr::from_str(string)
    }
}

/// One thing wrong with the configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub key: String,
    pub message: String,
    pub origin: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {} (from {})", self.key, self.message, self.origin)
    }
}

#[derive(Debug, thiserror::Error)]
pub struct ConfigError {
    pub problems: Vec<Problem>,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "invalid configuration")?;
        for p in &self.problems {
            write!(f, "\n  - {p}")?;
        }
        Ok(())
    }
}

/// A validated configuration and the warnings to log at start-up.
#[derive(Debug, Clone)]
pub struct Loaded {
    pub config: Config,
    pub warnings: Vec<String>,
    /// Where the configuration came from, for the start-up log line.
    pub origin: String,
}

/// Environment variables that feed the configuration besides `PUSHRELAY_*`.
#[derive(Debug, Clone, Default)]
pub struct ProxyEnv {
    pub https_proxy: Option<(String, String)>,
    pub no_proxy: Option<String>,
}

impl ProxyEnv {
    pub fn from_process() -> Self {
        let pick = |names: &[&str]| {
            names.iter().find_map(|n| {
                std::env::var(n)
                    .ok()
                    .filter(|v| !v.is_empty())
                    .map(|v| (n.to_string(), v))
            })
        };
        ProxyEnv {
            https_proxy: pick(&["HTTPS_PROXY", "https_proxy"]),
            no_proxy: pick(&["NO_PROXY", "no_proxy"]).map(|(_, v)| v),
        }
    }
}

/// Loads `file` (when given; it must exist) and the process environment.
pub fn load(file: Option<&Path>) -> Result<Loaded, ConfigError> {
    let mut figment = Figment::new();
    let origin = match file {
        Some(path) => {
            if let Err(e) = std::fs::metadata(path) {
                return Err(ConfigError {
                    problems: vec![Problem {
                        key: "--config".into(),
                        message: format!("cannot read {}: {e}", path.display()),
                        origin: "command line".into(),
                    }],
                });
            }
            figment = figment.merge(Yaml::file_exact(path));
            format!("{} and {ENV_PREFIX}* environment", path.display())
        }
        None => format!("built-in defaults and {ENV_PREFIX}* environment"),
    };
    figment = figment.merge(
        Env::prefixed(ENV_PREFIX)
            .split("__")
            .filter(|key| key.as_str() != "config"),
    );
    extract(figment, &ProxyEnv::from_process(), origin)
}

/// Parses YAML text alone, without the environment: for tests and embedded use.
pub fn from_yaml(text: &str) -> Result<Loaded, ConfigError> {
    let figment = Figment::new().merge(Yaml::string(text));
    extract(figment, &ProxyEnv::default(), "YAML text".into())
}

fn extract(figment: Figment, proxy_env: &ProxyEnv, origin: String) -> Result<Loaded, ConfigError> {
    let mut config: Config = figment.extract().map_err(|e| ConfigError {
        problems: e.into_iter().map(problem_from_figment).collect(),
    })?;
    let mut problems = Vec::new();
    if config.upstream.proxy.is_none()
        && let Some((var, value)) = &proxy_env.https_proxy
    {
        match value.parse::<ProxyUrl>() {
            Ok(url) => {
                config.upstream.proxy = Some(url);
                if let Some(no_proxy) = &proxy_env.no_proxy {
                    config.upstream.no_proxy.extend(
                        no_proxy
                            .split(',')
                            .map(str::trim)
                            .filter(|s| !s.is_empty())
                            .map(str::to_owned),
                    );
                }
            }
            Err(message) => problems.push(Problem {
                key: "upstream.proxy".into(),
                message,
                origin: format!("environment variable {var}"),
            }),
        }
    }
    let warnings = validate(&config, &figment, &mut problems);
    if problems.is_empty() {
        Ok(Loaded {
            config,
            warnings,
            origin,
        })
    } else {
        Err(ConfigError { problems })
    }
}

fn problem_from_figment(e: figment::Error) -> Problem {
    let mut path = e.path.clone();
    if let figment::error::Kind::UnknownField(field, _) = &e.kind
        && path.last() != Some(field)
    {
        path.push(field.clone());
    }
    let origin = match &e.metadata {
        Some(md) => describe_origin(md, &path),
        None => "built-in default".into(),
    };
    Problem {
        key: if path.is_empty() {
            "(top level)".into()
        } else {
            path.join(".")
        },
        message: e.kind.to_string(),
        origin,
    }
}

fn describe_origin(md: &Metadata, path: &[String]) -> String {
    match &md.source {
        Some(source) => source.to_string(),
        None if md.name.contains("environment") => {
            let var: Vec<String> = path.iter().map(|p| p.to_ascii_uppercase()).collect();
            format!("environment variable {ENV_PREFIX}{}", var.join("__"))
        }
        None => md.name.to_string(),
    }
}

fn origin_of(figment: &Figment, path: &[&str]) -> String {
    // figment finds metadata by dotted dictionary keys; list items are looked up by their list.
    let dict_path: Vec<&str> = path
        .iter()
        .take_while(|p| p.parse::<usize>().is_err())
        .copied()
        .collect();
    for len in (1..=dict_path.len()).rev() {
        if let Some(md) = figment.find_metadata(&dict_path[..len].join(".")) {
            let owned: Vec<String> = path.iter().map(|s| s.to_string()).collect();
            return describe_origin(md, &owned);
        }
    }
    "built-in default".into()
}

/// Checks what types cannot: combinations, uniqueness and files. Returns warnings.
fn validate(config: &Config, figment: &Figment, problems: &mut Vec<Problem>) -> Vec<String> {
    let mut warnings = Vec::new();
    let mut problem = |path: &[&str], message: String| {
        let key = path
            .iter()
            .map(|p| {
                if p.parse::<usize>().is_ok() {
                    format!("[{p}]")
                } else {
                    format!(".{p}")
                }
            })
            .collect::<String>()
            .trim_start_matches('.')
            .to_owned();
        problems.push(Problem {
            key,
            message,
            origin: origin_of(figment, path),
        });
    };

    if config.listeners.is_empty() {
        problem(
            &["listeners"],
            "no listener is configured: pushrelay would do nothing".into(),
        );
    }
    let mut names = HashSet::new();
    let mut binds = HashSet::new();
    for (i, l) in config.listeners.iter().enumerate() {
        let idx = i.to_string();
        let at = |key: &'static str| ["listeners", idx.as_str(), key];
        if !names.insert(l.name.as_str()) {
            problem(
                &at("name"),
                format!("listener name {:?} is used twice", l.name),
            );
        }
        // Port 0 asks the kernel for a free port each time, so it never collides.
        if l.bind.port() != 0 && !binds.insert(l.bind) {
            problem(
                &at("bind"),
                format!("address {} is bound by two listeners", l.bind),
            );
        }
        if l.upstream_port == 0 {
            problem(
                &at("upstream_port"),
                "port 0 is not a port to connect to".into(),
            );
        }
        if l.allow_sources.is_empty() {
            warnings.push(format!(
                "listener {:?}: allow_sources is empty, so every connection will be refused",
                l.name
            ));
        }
        match (&l.tls, l.mode) {
            (None, Mode::PreProxy) => problem(
                &at("tls"),
                "a pre-proxy listener needs tls (ca_cert + ca_key, or cert + key)".into(),
            ),
            (None, Mode::PostProxy) => {}
            (Some(tls), _) => {
                let tls_key = |key: &'static str| ["listeners", idx.as_str(), "tls", key];
                if tls.cert_source().is_none() {
                    problem(
                        &at("tls"),
                        "give either ca_cert and ca_key (certificates minted per host) or cert and key \
                         (a fixed chain), not a mix"
                            .into(),
                    );
                }
                let files = [
                    ("ca_cert", &tls.ca_cert),
                    ("ca_key", &tls.ca_key),
                    ("cert", &tls.cert),
                    ("key", &tls.key),
                    ("client_ca", &tls.client_ca),
                ];
                for (key, path) in files {
                    if let Some(path) = path
                        && let Err(e) = std::fs::File::open(path)
                    {
                        problem(
                            &tls_key(key),
                            format!("cannot read {}: {e}", path.display()),
                        );
                    }
                }
            }
        }
        if l.mode == Mode::PreProxy {
            let hosts: Vec<&Authority> = config
                .destinations
                .iter()
                .filter(|d| d.port() == l.upstream_port)
                .collect();
            if hosts.is_empty() && !config.destinations.is_empty() {
                warnings.push(format!(
                    "listener {:?}: no destination uses port {}, so every TLS handshake will be refused",
                    l.name, l.upstream_port
                ));
            }
        }
    }
    if let Some(admin) = &config.admin
        && admin.bind.port() != 0
        && !binds.insert(admin.bind)
    {
        problem(
            &["admin", "bind"],
            format!("address {} is also bound by a listener", admin.bind),
        );
    }
    if config.destinations.is_empty() {
        warnings.push("destinations is empty, so every request will be refused".into());
    }
    for (i, path) in config.upstream.extra_roots.iter().enumerate() {
        if let Err(e) = std::fs::File::open(path) {
            let idx = i.to_string();
            problem(
                &["upstream", "extra_roots", idx.as_str()],
                format!("cannot read {}: {e}", path.display()),
            );
        }
    }
    let mut topics = HashSet::new();
    for (i, id) in config.upstream.identities.iter().enumerate() {
        let idx = i.to_string();
        if !topics.insert(id.topic.as_str()) {
            problem(
                &["upstream", "identities", idx.as_str(), "topic"],
                format!("topic {:?} has two identities", id.topic),
            );
        }
        for (key, path) in [("cert", &id.cert), ("key", &id.key)] {
            if let Err(e) = std::fs::File::open(path) {
                problem(
                    &["upstream", "identities", idx.as_str(), key],
                    format!("cannot read {}: {e}", path.display()),
                );
            }
        }
    }
    for (dest, addr) in &config.upstream.connect_to {
        if !matches!(Authority::split_host_port(addr), Ok((_, Some(_)))) {
            problem(
                &["upstream", "connect_to"],
                format!("{dest}: address {addr:?} must be host:port"),
            );
        }
        if !config.destinations.contains(dest) {
            warnings.push(format!(
                "upstream.connect_to names {dest}, which is not in destinations"
            ));
        }
    }
    let timeouts = [
        ("connect_timeout", config.upstream.connect_timeout),
        ("request_timeout", config.upstream.request_timeout),
        ("keepalive_interval", config.upstream.keepalive_interval),
        ("keepalive_timeout", config.upstream.keepalive_timeout),
    ];
    for (key, value) in timeouts {
        if value.is_zero() {
            problem(&["upstream", key], "must be longer than 0".into());
        }
    }
    if config.upstream.max_connections_per_destination == 0 {
        problem(
            &["upstream", "max_connections_per_destination"],
            "must be at least 1".into(),
        );
    }
    if config.upstream.max_token_identities == 0 {
        problem(
            &["upstream", "max_token_identities"],
            "must be at least 1".into(),
        );
    }
    let limits = [
        ("max_connections", config.limits.max_connections == 0),
        (
            "handshake_timeout",
            config.limits.handshake_timeout.is_zero(),
        ),
        ("max_request_body", config.limits.max_request_body == 0),
        ("max_header_bytes", config.limits.max_header_bytes < 1024),
        ("idle_timeout", config.limits.idle_timeout.is_zero()),
    ];
    for (key, bad) in limits {
        if bad {
            let why = if key == "max_header_bytes" {
                "must be at least 1024"
            } else {
                "must be more than 0"
            };
            problem(&["limits", key], why.into());
        }
    }
    if config.workers > 1024 {
        problem(&["workers"], "must be at most 1024 (0: one per CPU)".into());
    }
    if config.reload_poll_interval < Duration::from_millis(100) {
        problem(&["reload_poll_interval"], "must be at least 100ms".into());
    }
    if let Err(e) = tracing_subscriber::EnvFilter::try_new(&config.log.level) {
        problem(
            &["log", "level"],
            format!("invalid filter {:?}: {e}", config.log.level),
        );
    }
    warnings
}

impl Config {
    /// The effective configuration as YAML, secrets masked: what `pushrelay check` prints.
    pub fn to_yaml(&self) -> String {
        serde_saphyr::to_string(self)
            .unwrap_or_else(|e| format!("# cannot render configuration: {e}\n"))
    }

    /// Every certificate and key file the configuration names (watched for replacement).
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
        files.extend(self.upstream.extra_roots.iter().cloned());
        for id in &self.upstream.identities {
            files.extend([id.cert.clone(), id.key.clone()]);
        }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_need_units() {
        assert_eq!(duration::parse("10s"), Ok(Duration::from_secs(10)));
        assert_eq!(duration::parse("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(duration::parse("5m"), Ok(Duration::from_secs(300)));
        assert_eq!(duration::parse("1h"), Ok(Duration::from_secs(3600)));
        assert!(
            duration::parse("10")
                .unwrap_err()
                .contains("a unit is needed")
        );
        assert!(
            duration::parse("10 parsecs")
                .unwrap_err()
                .contains("unknown unit")
        );
        assert!(duration::parse("soon").unwrap_err().contains("\"soon\""));
        for d in ["250ms", "10s", "5m", "1h", "90s"] {
            assert_eq!(duration::format(&duration::parse(d).unwrap()), d);
        }
    }

    #[test]
    fn proxy_url_parses_credentials_and_masks_them() {
        let url: ProxyUrl = "http://user:s%40cret@proxy.corp.example:3128"
            .parse()
            .unwrap();
        assert_eq!(url.host, "proxy.corp.example");
        assert_eq!(url.port, 3128);
        assert_eq!(url.username.as_deref(), Some("user"));
        assert_eq!(url.password.as_ref().map(Secret::expose), Some("s@cret"));
        assert_eq!(url.to_string(), "http://user:***@proxy.corp.example:3128");
        assert_eq!(
            format!("{url:?}"),
            "http://user:***@proxy.corp.example:3128"
        );
        let bare: ProxyUrl = "proxy:8080".parse().unwrap();
        assert_eq!(bare.to_string(), "http://proxy:8080");
        let v6: ProxyUrl = "http://[::1]:3128/".parse().unwrap();
        assert_eq!(v6.address(), "[::1]:3128");
    }

    #[test]
    fn bad_proxy_urls_say_why_without_the_password() {
        let table = [
            ("https://user:pw@proxy:3128", "not supported"),
            ("socks5://proxy:1080", "not supported"),
            ("http://user:pw@proxy", "has no port"),
            ("http://proxy:3128/path", "must not have a path"),
            ("http://user:pw@pro xy:3128", "invalid host"),
        ];
        for (input, expected) in table {
            let err = input.parse::<ProxyUrl>().unwrap_err();
            assert!(err.contains(expected), "{input}: {err}");
            assert!(!err.contains("pw"), "{input}: password leaked in {err}");
        }
    }

    #[test]
    fn no_proxy_matches_hosts_and_domains() {
        let list: Vec<String> = vec![
            "apple.com".into(),
            ".example.org".into(),
            "exact.host".into(),
        ];
        assert!(Config::bypasses_proxy(&list, "api.push.apple.com"));
        assert!(Config::bypasses_proxy(&list, "apple.com"));
        assert!(Config::bypasses_proxy(&list, "a.example.org"));
        assert!(Config::bypasses_proxy(&list, "exact.host"));
        assert!(!Config::bypasses_proxy(&list, "notapple.com"));
        assert!(!Config::bypasses_proxy(&list, "fcm.googleapis.com"));
        assert!(Config::bypasses_proxy(&["*".into()], "anything"));
        assert!(!Config::bypasses_proxy(&[], "anything"));
    }

    #[test]
    fn defaults_are_a_loopback_apns_pre_proxy() {
        let c = Config::default();
        assert_eq!(c.listeners.len(), 1);
        assert_eq!(c.listeners[0].bind.to_string(), "127.0.0.1:8443");
        assert_eq!(c.listeners[0].mode, Mode::PreProxy);
        let sources: Vec<String> = c.listeners[0]
            .allow_sources
            .iter()
            .map(|n| n.to_string())
            .collect();
        assert_eq!(sources, ["127.0.0.0/8", "::1/128"]);
        let dests: Vec<String> = c.destinations.iter().map(|d| d.to_string()).collect();
        assert_eq!(
            dests,
            [
                "api.push.apple.com:443",
                "api.sandbox.push.apple.com:443",
                "api.development.push.apple.com:443"
            ]
        );
    }

    #[test]
    fn figment_errors_name_key_and_value() {
        let err = from_yaml("upstream:\n  connect_timeout: 10\n").unwrap_err();
        let text = err.to_string();
        assert!(text.contains("upstream.connect_timeout"), "{text}");
        assert!(text.contains("invalid duration 10"), "{text}");
        let err = from_yaml("listeners:\n  - name: a\n    mode: pre-proxy\n    bind: 127.0.0.1:1\n    allow_sources: [127.0.0.0/33]\n").unwrap_err();
        let text = err.to_string();
        assert!(text.contains("listeners.0.allow_sources"), "{text}");
        let err = from_yaml("upstreams: {}\n").unwrap_err();
        assert!(err.to_string().contains("upstreams"), "{err}");
    }

    const PLAIN_LISTENER: &str =
        "listeners:\n  - name: plain\n    mode: post-proxy\n    bind: 127.0.0.1:0\n";

    #[test]
    fn https_proxy_from_environment_is_used_when_config_has_none() {
        let figment = Figment::new().merge(Yaml::string(PLAIN_LISTENER));
        let env = ProxyEnv {
            https_proxy: Some(("HTTPS_PROXY".into(), "http://u:p@proxy.corp:3128".into())),
            no_proxy: Some("localhost, .corp".into()),
        };
        let config = extract(figment, &env, "test".into()).unwrap().config;
        assert_eq!(
            config.upstream.proxy.unwrap().to_string(),
            "http://u:***@proxy.corp:3128"
        );
        assert_eq!(config.upstream.no_proxy, ["localhost", ".corp"]);
    }

    #[test]
    fn configured_proxy_wins_over_https_proxy() {
        let yaml = format!("{PLAIN_LISTENER}upstream:\n  proxy: http://configured:3128\n");
        let env = ProxyEnv {
            https_proxy: Some(("HTTPS_PROXY".into(), "http://env:3128".into())),
            no_proxy: Some("apple.com".into()),
        };
        let config = extract(
            Figment::new().merge(Yaml::string(&yaml)),
            &env,
            "test".into(),
        )
        .unwrap()
        .config;
        assert_eq!(config.upstream.proxy.unwrap().host, "configured");
        assert!(config.upstream.no_proxy.is_empty());
    }

    #[test]
    fn bad_https_proxy_names_the_variable() {
        let env = ProxyEnv {
            https_proxy: Some(("https_proxy".into(), "socks5://proxy:1080".into())),
            no_proxy: None,
        };
        let err = extract(Figment::new(), &env, "test".into()).unwrap_err();
        let p = err
            .problems
            .iter()
            .find(|p| p.key == "upstream.proxy")
            .unwrap();
        assert_eq!(p.origin, "environment variable https_proxy");
    }
}
