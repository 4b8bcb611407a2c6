//! Validation: what types cannot check (combinations, uniqueness, files), one function per
//! section. Only a configuration that passed is a `ValidConfig`, and only that builds an `App`.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::ops::Deref;
use std::time::Duration;

use figment::Figment;

use super::load::{Problem, origin_of};
use super::shape::{Config, ListenerConfig, Mode, ServerTls};
use super::values::read_proxy_users;
use crate::policy::Authority;

/// A configuration that passed validation, with each listener's TLS source settled. Reads as a
/// `Config`; only `validate` makes one.
#[derive(Debug, Clone)]
pub struct ValidConfig {
    config: Config,
    /// By listener index: where its server certificates come from (None: plain, post-proxy only).
    tls: Vec<Option<ServerTls>>,
}

impl ValidConfig {
    /// Listener `index`'s TLS: exactly one certificate source, as validated.
    pub fn listener_tls(&self, index: usize) -> Option<&ServerTls> {
        self.tls.get(index).and_then(Option::as_ref)
    }
}

impl Deref for ValidConfig {
    type Target = Config;

    fn deref(&self) -> &Config {
        &self.config
    }
}

/// Problems and warnings as the sections are checked; each problem names the key and its origin.
struct Report<'a> {
    figment: &'a Figment,
    problems: &'a mut Vec<Problem>,
    warnings: Vec<String>,
}

impl Report<'_> {
    fn problem(&mut self, path: &[&str], message: String) {
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
        self.problems.push(Problem {
            key,
            message,
            origin: origin_of(self.figment, path),
        });
    }

    fn warn(&mut self, warning: String) {
        self.warnings.push(warning);
    }

    /// A shared-secret file: readable, one line of visible ASCII; a short secret is warned about.
    fn secret(&mut self, path: &[&str], file: &std::path::Path) {
        match super::values::read_secret(file) {
            Err(e) => self.problem(path, e),
            Ok(s) if s.expose().len() < 16 => self.warn(format!(
                "{}: the secret in {} is shorter than 16 characters; use e.g. `openssl rand -hex 32`",
                path.join("."),
                file.display()
            )),
            Ok(_) => {}
        }
    }

    fn readable(&mut self, path: &[&str], file: &std::path::Path) {
        if let Err(e) = std::fs::File::open(file) {
            self.problem(path, format!("cannot read {}: {e}", file.display()));
        }
    }
}

/// Checks what types cannot: combinations, uniqueness and files. The valid configuration and the
/// warnings to log, or every problem found (in `problems`, after any found before).
pub(super) fn validate(
    config: Config,
    figment: &Figment,
    problems: &mut Vec<Problem>,
) -> Option<(ValidConfig, Vec<String>)> {
    let mut report = Report {
        figment,
        problems,
        warnings: Vec::new(),
    };
    let mut binds = HashSet::new();
    let tls = listeners(&config, &mut binds, &mut report);
    admin(&config, &mut binds, &mut report);
    destinations(&config, &mut report);
    upstream(&config, &mut report);
    limits(&config, &mut report);
    forward_proxy(&config, &mut report);
    process(&config, &mut report);
    durations(&config, &mut report);
    let warnings = report.warnings;
    problems
        .is_empty()
        .then_some((ValidConfig { config, tls }, warnings))
}

/// `listeners`: names and binds unique, ports real, TLS from exactly one source. Returns each
/// listener's settled TLS.
fn listeners(
    config: &Config,
    binds: &mut HashSet<SocketAddr>,
    report: &mut Report<'_>,
) -> Vec<Option<ServerTls>> {
    if config.listeners.is_empty() {
        report.problem(
            &["listeners"],
            "no listener is configured: pushrelay would do nothing".into(),
        );
    }
    let mut names = HashSet::new();
    let mut tls = Vec::new();
    for (i, l) in config.listeners.iter().enumerate() {
        let idx = i.to_string();
        let at = |key: &'static str| ["listeners", idx.as_str(), key];
        if !names.insert(l.name.as_str()) {
            report.problem(
                &at("name"),
                format!("listener name {:?} is used twice", l.name),
            );
        }
        // Port 0 asks the kernel for a free port each time, so it never collides.
        if l.bind.port() != 0 && !binds.insert(l.bind) {
            report.problem(
                &at("bind"),
                format!("address {} is bound by two listeners", l.bind),
            );
        }
        if l.upstream_port == 0 {
            report.problem(
                &at("upstream_port"),
                "port 0 is not a port to connect to".into(),
            );
        }
        if l.allow_sources.is_empty() {
            report.warn(format!(
                "listener {:?}: allow_sources is empty, so every connection will be refused",
                l.name
            ));
        }
        tls.push(listener_tls(l, &idx, report));
        if let Some(file) = &l.relay_secret_file {
            if l.mode == Mode::PostProxy {
                report.secret(&at("relay_secret_file"), file);
            } else {
                report.problem(
                    &at("relay_secret_file"),
                    "only a post-proxy listener (the DMZ relay of a relay chain) takes a relay secret"
                        .into(),
                );
            }
        }
        if l.mode == Mode::PreProxy {
            let hosts: Vec<&Authority> = config
                .destinations
                .iter()
                .filter(|d| d.port() == l.upstream_port)
                .collect();
            if hosts.is_empty() && !config.destinations.is_empty() {
                report.warn(format!(
                    "listener {:?}: no destination uses port {}, so every TLS handshake will be refused",
                    l.name, l.upstream_port
                ));
            }
        }
    }
    tls
}

/// `listeners[i].tls`: required for pre-proxy, one certificate source, every file readable.
fn listener_tls(l: &ListenerConfig, idx: &str, report: &mut Report<'_>) -> Option<ServerTls> {
    let Some(tls) = &l.tls else {
        let mode = match l.mode {
            Mode::PreProxy => "pre-proxy",
            Mode::ForwardProxy => "forward-proxy",
            Mode::PostProxy => return None,
        };
        report.problem(
            &["listeners", idx, "tls"],
            format!("a {mode} listener needs tls (ca_cert + ca_key, or cert + key)"),
        );
        return None;
    };
    let settled = tls.server_tls();
    if settled.is_none() {
        report.problem(
            &["listeners", idx, "tls"],
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
        if let Some(path) = path {
            report.readable(&["listeners", idx, "tls", key], path);
        }
    }
    settled
}

/// `admin`: its address not also a listener's.
fn admin(config: &Config, binds: &mut HashSet<SocketAddr>, report: &mut Report<'_>) {
    if let Some(admin) = &config.admin
        && admin.bind.port() != 0
        && !binds.insert(admin.bind)
    {
        report.problem(
            &["admin", "bind"],
            format!("address {} is also bound by a listener", admin.bind),
        );
    }
}

/// `destinations`: an empty list is allowed, and said.
fn destinations(config: &Config, report: &mut Report<'_>) {
    if config.destinations.is_empty() {
        report.warn("destinations is empty, so every request will be refused".into());
    }
}

/// `upstream`: files readable, one identity per topic, `connect_to` addresses, timeouts and counts.
fn upstream(config: &Config, report: &mut Report<'_>) {
    let up = &config.upstream;
    for (i, path) in up.extra_roots.iter().enumerate() {
        report.readable(&["upstream", "extra_roots", i.to_string().as_str()], path);
    }
    let mut topics = HashSet::new();
    for (i, id) in up.identities.iter().enumerate() {
        let idx = i.to_string();
        let at = |key| ["upstream", "identities", idx.as_str(), key];
        if id.listeners.is_empty() {
            report.warn(format!(
                "upstream.identities[{i}] ({}) names no listeners: no request can use it",
                id.topic
            ));
        }
        for name in &id.listeners {
            match config.listeners.iter().find(|l| &l.name == name) {
                None => report.problem(&at("listeners"), format!("no listener is named {name:?}")),
                Some(l)
                    if !id.client_subjects.is_empty()
                        && l.tls.as_ref().is_none_or(|t| t.client_ca.is_none()) =>
                {
                    report.problem(
                        &at("client_subjects"),
                        format!("listener {name:?} has no tls.client_ca, so no client there has a certificate subject"),
                    )
                }
                Some(_) => {}
            }
        }
        if !topics.insert(id.topic.as_str()) {
            report.problem(
                &["upstream", "identities", idx.as_str(), "topic"],
                format!("topic {:?} has two identities", id.topic),
            );
        }
        for (key, path) in [("cert", &id.cert), ("key", &id.key)] {
            report.readable(&["upstream", "identities", idx.as_str(), key], path);
        }
    }
    for (dest, addr) in &up.connect_to {
        if !matches!(Authority::split_host_port(addr), Ok((_, Some(_)))) {
            report.problem(
                &["upstream", "connect_to"],
                format!("{dest}: address {addr:?} must be host:port"),
            );
        }
        if !config.destinations.contains(dest) {
            report.warn(format!(
                "upstream.connect_to names {dest}, which is not in destinations"
            ));
        }
    }
    let timeouts = [
        ("connect_timeout", up.connect_timeout),
        ("request_timeout", up.request_timeout),
        ("keepalive_interval", up.keepalive_interval),
        ("keepalive_timeout", up.keepalive_timeout),
    ];
    for (key, value) in timeouts {
        if value.is_zero() {
            report.problem(&["upstream", key], "must be longer than 0".into());
        }
    }
    if up.max_connections_per_destination == 0 {
        report.problem(
            &["upstream", "max_connections_per_destination"],
            "must be at least 1".into(),
        );
    }
    if let Some(relay) = &up.relay {
        if let Some(file) = &relay.secret_file {
            report.secret(&["upstream", "relay", "secret_file"], file);
        }
        match (&relay.client_cert, &relay.client_key) {
            (Some(cert), Some(key)) => {
                report.readable(&["upstream", "relay", "client_cert"], cert);
                report.readable(&["upstream", "relay", "client_key"], key);
                if !relay.url.tls {
                    report.warn(format!(
                        "upstream.relay.client_cert is set but upstream.relay.url {} is plain \
                         http://: there is no TLS handshake to present it in, so it is not used",
                        relay.url
                    ));
                }
            }
            (None, None) => {}
            (Some(_), None) => report.problem(
                &["upstream", "relay", "client_key"],
                "client_cert needs its client_key".into(),
            ),
            (None, Some(_)) => report.problem(
                &["upstream", "relay", "client_cert"],
                "client_key needs its client_cert".into(),
            ),
        }
        if relay.secret_file.is_none() && (relay.client_cert.is_none() || !relay.url.tls) {
            report.problem(
                &["upstream", "relay", "secret_file"],
                "the DMZ relay must know the inside relay: set secret_file, or (over https://) \
                 client_cert with client_key, or both"
                    .into(),
            );
        }
        if !relay.url.tls {
            report.warn(format!(
                "upstream.relay.url {} is plain http://: push contents (device tokens, payloads, \
                 authorization tokens) and the relay secret cross the network in clear; use https://",
                relay.url
            ));
        }
        if !up.identities.is_empty() {
            report.problem(
                &["upstream", "identities"],
                "certificate identities are presented by whoever connects to Apple: with \
                 upstream.relay, configure them on the DMZ relay"
                    .into(),
            );
        }
        if relay.max_connections == 0 {
            report.problem(
                &["upstream", "relay", "max_connections"],
                "must be at least 1".into(),
            );
        }
        if relay.idle_timeout.is_zero() {
            report.problem(
                &["upstream", "relay", "idle_timeout"],
                "must be longer than 0".into(),
            );
        }
    }
    if up.max_token_identities == 0 {
        report.problem(
            &["upstream", "max_token_identities"],
            "must be at least 1".into(),
        );
    }
    if up.new_token_identities_per_minute == 0 {
        report.problem(
            &["upstream", "new_token_identities_per_minute"],
            "must be at least 1".into(),
        );
    }
}

/// `limits`: every limit above 0, headers at least 1 KiB.
fn limits(config: &Config, report: &mut Report<'_>) {
    let l = &config.limits;
    let limits = [
        ("max_connections", l.max_connections == 0),
        ("handshake_timeout", l.handshake_timeout.is_zero()),
        ("request_body_timeout", l.request_body_timeout.is_zero()),
        ("client_write_timeout", l.client_write_timeout.is_zero()),
        ("max_request_body", l.max_request_body == 0),
        ("max_header_bytes", l.max_header_bytes < 1024),
        ("idle_timeout", l.idle_timeout.is_zero()),
    ];
    for (key, bad) in limits {
        if bad {
            let why = if key == "max_header_bytes" {
                "must be at least 1024"
            } else {
                "must be more than 0"
            };
            report.problem(&["limits", key], why.into());
        }
    }
}

/// The longest any configured duration may be.
pub const MAX_DURATION: Duration = Duration::from_secs(24 * 3600);

/// Upper bounds on every duration: a deadline is `now + duration`, which overflows (and panics)
/// for absurd values; nothing here needs more than a day.
fn durations(config: &Config, report: &mut Report<'_>) {
    let (up, l) = (&config.upstream, &config.limits);
    let durations = [
        (&["upstream", "connect_timeout"][..], up.connect_timeout),
        (&["upstream", "request_timeout"], up.request_timeout),
        (&["upstream", "keepalive_interval"], up.keepalive_interval),
        (&["upstream", "keepalive_timeout"], up.keepalive_timeout),
        (&["limits", "handshake_timeout"], l.handshake_timeout),
        (&["limits", "idle_timeout"], l.idle_timeout),
        (&["limits", "tunnel_idle_timeout"], l.tunnel_idle_timeout),
        (&["limits", "request_body_timeout"], l.request_body_timeout),
        (&["limits", "client_write_timeout"], l.client_write_timeout),
        (&["shutdown_grace"], config.shutdown_grace),
        (&["reload_poll_interval"], config.reload_poll_interval),
    ];
    for (key, value) in durations {
        if value > MAX_DURATION {
            report.problem(
                key,
                format!(
                    "{} is more than the most allowed, 24h",
                    super::duration::format(&value)
                ),
            );
        }
    }
}

/// The forward-proxy keys: `tunnels` apart from `destinations` and each once, `proxy_auth` only
/// on a forward-proxy listener and its users file readable, the tunnel limits.
fn forward_proxy(config: &Config, report: &mut Report<'_>) {
    let mut seen = HashSet::new();
    for (i, t) in config.tunnels.iter().enumerate() {
        let idx = i.to_string();
        if config.destinations.contains(t) {
            report.problem(
                &["tunnels", idx.as_str()],
                format!("{t} is also in destinations: a host is either intercepted or tunnelled"),
            );
        }
        if !seen.insert(t) {
            report.problem(&["tunnels", idx.as_str()], format!("{t} is listed twice"));
        }
    }
    let doors = config
        .listeners
        .iter()
        .filter(|l| l.mode == Mode::ForwardProxy);
    if doors.count() == 0 && !config.tunnels.is_empty() {
        report.warn("tunnels is set but no listener has mode forward-proxy".into());
    }
    for (i, l) in config.listeners.iter().enumerate() {
        let idx = i.to_string();
        let Some(auth) = &l.proxy_auth else { continue };
        if l.mode != Mode::ForwardProxy {
            report.problem(
                &["listeners", idx.as_str(), "proxy_auth"],
                "only a forward-proxy listener takes proxy_auth".into(),
            );
        } else if let Err(e) = read_proxy_users(&auth.users_file) {
            report.problem(&["listeners", idx.as_str(), "proxy_auth", "users_file"], e);
        }
        if auth.realm.is_empty() || auth.realm.contains(['"', '\\', '\r', '\n']) {
            report.problem(
                &["listeners", idx.as_str(), "proxy_auth", "realm"],
                format!(
                    "invalid realm {:?}: no quotes, backslashes or line breaks",
                    auth.realm
                ),
            );
        }
    }
    if config.limits.max_tunnels_per_source == 0 {
        report.problem(
            &["limits", "max_tunnels_per_source"],
            "must be at least 1".into(),
        );
    }
    if config.limits.tunnel_idle_timeout.is_zero() {
        report.problem(
            &["limits", "tunnel_idle_timeout"],
            "must be more than 0".into(),
        );
    }
}

/// The process-wide keys: `workers`, `reload_poll_interval`, `log`.
fn process(config: &Config, report: &mut Report<'_>) {
    if config.workers > 1024 {
        report.problem(&["workers"], "must be at most 1024 (0: one per CPU)".into());
    }
    if config.reload_poll_interval < Duration::from_millis(100) {
        report.problem(&["reload_poll_interval"], "must be at least 100ms".into());
    }
    if let Err(e) = tracing_subscriber::EnvFilter::try_new(&config.log.level) {
        report.problem(
            &["log", "level"],
            format!("invalid filter {:?}: {e}", config.log.level),
        );
    }
}
