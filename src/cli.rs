//! The command line: `serve`, `check`, `ca init`, `ca issue`. Each command reports problems in plain
//! words on stderr and exits non-zero: 2 for bad configuration or arguments, 1 for failures at run
//! time. What a command produces (the effective configuration, file paths) goes to stdout.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};

use crate::config::{self, CertSource, Config, LogFormat, Mode};
use crate::tls::pki;

#[derive(Debug, Parser)]
#[command(
    name = "pushrelay",
    version,
    about = "Relay that carries APNs / FCM HTTP/2 push traffic out of locked-down networks",
    long_about = "pushrelay relays push notifications (Apple APNs, Google FCM) through corporate networks.\n\n\
        pre-proxy:  an /etc/hosts entry points api.push.apple.com at pushrelay, which presents a \
        certificate from a private CA, and forwards each HTTP/2 request through the corporate CONNECT proxy.\n\
        post-proxy: a legacy HTTP/1.1 proxy hands requests to pushrelay, which relays them as HTTP/2.\n\n\
        Start with `pushrelay serve`: without a configuration file it serves APNs on 127.0.0.1:8443 \
        and creates a private CA in ./certs."
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the relay. Without --config: built-in defaults (APNs pre-proxy on 127.0.0.1:8443, CA in
    /// ./certs created if absent), plus PUSHRELAY_* environment overrides.
    Serve(ConfigArg),
    /// Validate the configuration (including certificates and keys) and print the effective
    /// configuration with secrets masked. Exit 0 when valid, 2 when not.
    Check(ConfigArg),
    /// Create the private CA and issue certificates from it.
    #[command(subcommand)]
    Ca(CaCommand),
    /// Diagnose the way to each destination step by step (DNS, proxy, CONNECT, TLS, HTTP/2, PING)
    /// and stop at the first failure with a hint. Exit 0 when every destination is reachable.
    Probe {
        #[command(flatten)]
        config: ConfigArg,
        /// Probe only this destination (host:port from `destinations`).
        #[arg(value_name = "DESTINATION")]
        destination: Option<String>,
    },
}

#[derive(Debug, Args)]
pub struct ConfigArg {
    /// YAML configuration file; environment variables PUSHRELAY_SECTION__KEY override its values
    /// (e.g. PUSHRELAY_UPSTREAM__PROXY=http://proxy:3128).
    #[arg(short, long, env = "PUSHRELAY_CONFIG", value_name = "FILE")]
    pub config: Option<PathBuf>,
}

#[derive(Debug, Subcommand)]
pub enum CaCommand {
    /// Create DIR/ca.pem and DIR/ca.key (mode 0600). Refuses to replace an existing CA without --force.
    /// The CA carries critical name constraints: it can sign only for the --permit names, else the
    /// hosts of --config's destinations, else the APNs hosts; a stolen ca.key then cannot
    /// impersonate any other host to the push servers that trust it.
    Init {
        /// Directory for the CA files.
        #[arg(long, default_value = "certs", value_name = "DIR")]
        dir: PathBuf,
        /// Replace an existing CA (every certificate it issued stops being trusted).
        #[arg(long)]
        force: bool,
        /// A DNS name (with every name under it) or IP address the CA may sign for; repeat for
        /// several.
        #[arg(long = "permit", value_name = "NAME")]
        permit: Vec<String>,
        /// Permit the hosts of this configuration's `destinations` (when no --permit is given).
        #[arg(long, value_name = "FILE")]
        config: Option<PathBuf>,
    },
    /// Issue a server certificate (chain + key) signed by the CA in DIR, for admins who keep the CA
    /// key off the relay: configure it as tls.cert / tls.key.
    Issue {
        /// A DNS name or IP address for the certificate; repeat for several.
        #[arg(long = "host", required = true, value_name = "NAME")]
        hosts: Vec<String>,
        /// Directory holding ca.pem and ca.key; the leaf is written there too.
        #[arg(long, default_value = "certs", value_name = "DIR")]
        dir: PathBuf,
        /// File name stem: writes DIR/NAME.pem (leaf, then CA) and DIR/NAME.key.
        #[arg(long, default_value = "relay", value_name = "NAME")]
        name: String,
    },
}

/// Runs the command line; `main` only calls this.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Serve(arg) => serve(arg.config.as_deref()),
        Command::Check(arg) => check(arg.config.as_deref()),
        Command::Ca(CaCommand::Init {
            dir,
            force,
            permit,
            config,
        }) => ca_init(&dir, force, permit, config.as_deref()),
        Command::Ca(CaCommand::Issue { hosts, dir, name }) => ca_issue(&dir, &hosts, &name),
        Command::Probe {
            config,
            destination,
        } => match load_or_report(config.config.as_deref()) {
            Ok(loaded) => crate::probe::run(&loaded.config, destination.as_deref()),
            Err(code) => code,
        },
    }
}

fn out(text: &str) {
    let _ = std::io::stdout().write_all(text.as_bytes());
}

fn err(text: &str) {
    let _ = std::io::stderr().write_all(text.as_bytes());
}

fn load_or_report(file: Option<&Path>) -> Result<config::Loaded, ExitCode> {
    config::load(file).map_err(|e| {
        err(&format!("pushrelay: {e}\n"));
        ExitCode::from(2)
    })
}

fn check(file: Option<&Path>) -> ExitCode {
    let loaded = match load_or_report(file) {
        Ok(l) => l,
        Err(code) => return code,
    };
    for w in loaded.warnings.iter().chain(&ca_warnings(&loaded.config)) {
        err(&format!("warning: {w}\n"));
    }
    let yaml = loaded.config.to_yaml();
    if let Err(e) = crate::App::build(loaded.config) {
        err(&format!("pushrelay: invalid configuration\n  - {e}\n"));
        return ExitCode::from(2);
    }
    out(&format!(
        "# effective configuration (from {})\n{yaml}",
        loaded.origin
    ));
    err("configuration is valid\n");
    ExitCode::SUCCESS
}

/// The names a new CA may sign for: the given ones, else the hosts of `config`'s destinations,
/// else those of the built-in configuration (the APNs hosts).
fn permitted_hosts(permit: Vec<String>, config: Option<&Path>) -> Result<Vec<String>, ExitCode> {
    if !permit.is_empty() {
        return Ok(permit);
    }
    let destinations = match config {
        Some(file) => config::destinations_in(file).map_err(|e| {
            err(&format!("pushrelay ca init: {e}\n"));
            ExitCode::from(2)
        })?,
        None => Config::default().destinations,
    };
    let mut hosts: Vec<String> = destinations.iter().map(|d| d.host().to_owned()).collect();
    hosts.sort();
    hosts.dedup();
    if hosts.is_empty() {
        hosts = pki::APNS_HOSTS.iter().map(|h| h.to_string()).collect();
    }
    Ok(hosts)
}

fn ca_init(dir: &Path, force: bool, permit: Vec<String>, config: Option<&Path>) -> ExitCode {
    let permit = match permitted_hosts(permit, config) {
        Ok(p) => p,
        Err(code) => return code,
    };
    match pki::init_dir(dir, force, &permit) {
        Ok((cert, key)) => {
            out(&format!(
                "created CA certificate {}\ncreated CA key         {} (mode 0600; keep it secret)\n\
                 The CA may sign only for: {} (name constraints; `ca init --force --permit …` to change)\n\
                 Trust {} on the push server; pushrelay mints per-host certificates from it.\n",
                cert.display(),
                key.display(),
                permit.join(", "),
                cert.display()
            ));
            ExitCode::SUCCESS
        }
        Err(e) => {
            err(&format!("pushrelay ca init: {e}\n"));
            ExitCode::from(1)
        }
    }
}

/// Whether the CA in `dir` may sign for `host` (a CA without name constraints may sign for any).
fn ca_permits(dir: &Path, host: &str) -> bool {
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject;
    let Ok(der) = CertificateDer::from_pem_file(dir.join(pki::CA_CERT_FILE)) else {
        return true;
    };
    match pki::permitted_names(&der) {
        None => true,
        Some(permitted) => match host.parse::<std::net::IpAddr>() {
            Ok(ip) => permitted.contains(&ip.to_string()),
            Err(_) => pki::permits(&permitted, host),
        },
    }
}

fn ca_issue(dir: &Path, hosts: &[String], name: &str) -> ExitCode {
    for host in hosts {
        if crate::policy::normalize_host(host).is_none() {
            err(&format!(
                "pushrelay ca issue: --host {host:?} is not a DNS name or IP address\n"
            ));
            return ExitCode::from(2);
        }
    }
    if name.is_empty() || name.contains('/') {
        err(&format!(
            "pushrelay ca issue: --name {name:?} must be a plain file name stem\n"
        ));
        return ExitCode::from(2);
    }
    match pki::issue_to_dir(dir, hosts, name) {
        Ok((cert, key)) => {
            for host in hosts.iter().filter(|h| !ca_permits(dir, h)) {
                err(&format!(
                    "warning: the CA's name constraints do not permit {host}: clients will \
                     refuse this certificate for it\n"
                ));
            }
            out(&format!(
                "issued certificate {} for {}\nkey                {} (mode 0600)\n\
                 Use them as tls.cert and tls.key of a listener.\n",
                cert.display(),
                hosts.join(", "),
                key.display()
            ));
            ExitCode::SUCCESS
        }
        Err(e) => {
            err(&format!("pushrelay ca issue: {e}\n"));
            ExitCode::from(1)
        }
    }
}

fn init_tracing(config: &Config) -> crate::log::LogGuard {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .or_else(|_| tracing_subscriber::EnvFilter::try_new(&config.log.level))
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let (sink, guard) = crate::log::sink(std::io::stderr());
    let builder = tracing_subscriber::fmt()
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_env_filter(filter)
        .with_writer(sink);
    match config.log.format {
        LogFormat::Json => builder.json().flatten_event(true).init(),
        LogFormat::Text => builder.init(),
    }
    guard
}

/// With no configuration file, the built-in listener's CA is created on first start.
fn ensure_default_ca() -> Result<(), String> {
    let defaults = Config::default();
    for l in &defaults.listeners {
        if let Some(CertSource::Mint { ca_cert, ca_key }) =
            l.tls.as_ref().and_then(|t| t.cert_source())
            && !ca_cert.exists()
            && !ca_key.exists()
        {
            let dir = ca_cert.parent().unwrap_or(Path::new("."));
            let hosts: Vec<String> = defaults
                .destinations
                .iter()
                .map(|d| d.host().to_owned())
                .collect();
            pki::init_dir(dir, false, &hosts).map_err(|e| e.to_string())?;
            err(&format!(
                "created a private CA in {} (first start with built-in defaults)\n",
                dir.display()
            ));
        }
    }
    Ok(())
}

fn serve(file: Option<&Path>) -> ExitCode {
    if file.is_none()
        && let Err(e) = ensure_default_ca()
    {
        err(&format!("pushrelay: cannot create the default CA: {e}\n"));
        return ExitCode::from(1);
    }
    let loaded = match load_or_report(file) {
        Ok(l) => l,
        Err(code) => return code,
    };
    let _log = init_tracing(&loaded.config);
    tracing::info!(version = env!("CARGO_PKG_VERSION"), config = %loaded.origin, "pushrelay starting");
    for w in &loaded.warnings {
        tracing::warn!("{w}");
    }
    announce(&loaded.config);
    let loaded_files = files_fingerprint(file, &loaded.config);
    // This thread keeps the control work (signals, reloads, admin); connections go to workers.
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            err(&format!("pushrelay: cannot start the runtime: {e}\n"));
            return ExitCode::from(1);
        }
    };
    let count = crate::workers::count(loaded.config.workers);
    let workers = match crate::workers::Workers::start(count) {
        Ok(w) => w,
        Err(e) => {
            err(&format!(
                "pushrelay: cannot start {count} worker threads: {e}\n"
            ));
            return ExitCode::from(1);
        }
    };
    tracing::info!(workers = count, "worker threads started");
    let code = runtime.block_on(async {
        let app = match crate::App::with_workers(loaded.config, count) {
            Ok(app) => app,
            Err(e) => {
                tracing::error!(error = %e, "invalid configuration");
                return ExitCode::from(2);
            }
        };
        let bound = match crate::bind(app.config()).await {
            Ok(b) => b,
            Err(e) => {
                tracing::error!(error = %e, "cannot listen");
                return ExitCode::from(1);
            }
        };
        app.status().config_origin(&loaded.origin);
        let poll_every = app.config().reload_poll_interval;
        tokio::spawn(watch_for_reload(
            file.map(Path::to_path_buf),
            app.reloader(),
            app.status().clone(),
            loaded_files,
            poll_every,
        ));
        match app
            .run_on(
                workers.handles(),
                bound.listeners,
                bound.admin,
                shutdown_signal(),
            )
            .await
        {
            Ok(()) => {
                tracing::info!("stopped");
                ExitCode::SUCCESS
            }
            Err(e) => {
                tracing::error!(error = %e, "stopped with an error");
                ExitCode::from(1)
            }
        }
    });
    workers.stop();
    code
}

/// What is weak about the CAs listeners mint from: a CA without name constraints can sign for
/// any host, so its key in the wrong hands impersonates any site to every push server that trusts
/// it; a pre-proxy host the constraints do not permit gets a certificate the push server refuses.
fn ca_warnings(config: &Config) -> Vec<String> {
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject;
    let mut warnings = Vec::new();
    for (i, l) in config.listeners.iter().enumerate() {
        let Some(CertSource::Mint { ca_cert, .. }) = l.tls.as_ref().and_then(|t| t.cert_source())
        else {
            continue;
        };
        let Ok(der) = CertificateDer::from_pem_file(&ca_cert) else {
            continue;
        };
        let key = format!("listeners[{i}].tls.ca_cert {}", ca_cert.display());
        match pki::permitted_names(&der) {
            None => warnings.push(format!(
                "{key}: the CA has no name constraints, so its key can sign for any host; \
                 re-create it with `pushrelay ca init --force` (see README, Security notes)"
            )),
            // Pre-proxy mints for the destinations on its port, forward-proxy for all of them.
            Some(permitted) if l.mode != Mode::PostProxy => {
                for d in config
                    .destinations
                    .iter()
                    .filter(|d| l.mode == Mode::ForwardProxy || d.port() == l.upstream_port)
                {
                    if !pki::permits(&permitted, d.host()) {
                        warnings.push(format!(
                            "{key}: the CA's name constraints do not permit {}: push servers \
                             will refuse its certificate (permitted: {})",
                            d.host(),
                            permitted.join(", ")
                        ));
                    }
                }
            }
            Some(_) => {}
        }
    }
    warnings
}

/// Tells the admin what the push server needs: which CA to trust and the /etc/hosts line (or,
/// for a forward-proxy listener, the HTTPS_PROXY value).
fn announce(config: &Config) {
    for w in ca_warnings(config) {
        tracing::warn!("{w}");
    }
    for l in config
        .listeners
        .iter()
        .filter(|l| l.mode == Mode::ForwardProxy)
    {
        let addr = if l.bind.ip().is_unspecified() {
            format!("<this-relay's-address>:{}", l.bind.port())
        } else {
            l.bind.to_string()
        };
        let user = if l.proxy_auth.is_some() {
            "<user>:<password>@"
        } else {
            ""
        };
        if let Some(CertSource::Mint { ca_cert, .. }) = l.tls.as_ref().and_then(|t| t.cert_source())
        {
            tracing::info!(listener = %l.name, ca = %ca_cert.display(), "push server must trust this CA certificate");
        }
        tracing::info!(listener = %l.name, "push server environment: HTTPS_PROXY=http://{user}{addr}");
    }
    for l in config.listeners.iter().filter(|l| l.mode == Mode::PreProxy) {
        let hosts: Vec<String> = config
            .destinations
            .iter()
            .filter(|d| d.port() == l.upstream_port)
            .map(|d| d.host().to_owned())
            .collect();
        let ip = if l.bind.ip().is_unspecified() {
            "<this-relay's-address>".to_owned()
        } else {
            l.bind.ip().to_string()
        };
        if let Some(CertSource::Mint { ca_cert, .. }) = l.tls.as_ref().and_then(|t| t.cert_source())
        {
            tracing::info!(listener = %l.name, ca = %ca_cert.display(), "push server must trust this CA certificate");
        }
        tracing::info!(
            listener = %l.name,
            "/etc/hosts line for the push server: {ip} {}{}",
            hosts.join(" "),
            if l.bind.port() == 443 { String::new() } else { format!("  (and use port {})", l.bind.port()) }
        );
    }
}

/// A fingerprint of the configuration file and every certificate and key it names.
fn files_fingerprint(file: Option<&Path>, config: &Config) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    let mut paths: Vec<PathBuf> = file.map(Path::to_path_buf).into_iter().collect();
    paths.extend(config.tls_files());
    for path in paths {
        path.hash(&mut hasher);
        std::fs::read(&path).ok().hash(&mut hasher);
    }
    hasher.finish()
}

/// Reloads on SIGHUP, and when the configuration or certificate files change on disk.
async fn watch_for_reload(
    file: Option<PathBuf>,
    reloader: std::sync::Arc<crate::reload::Reloader>,
    status: std::sync::Arc<crate::metrics::recent::Book>,
    mut seen: u64,
    every: std::time::Duration,
) {
    use tokio::signal::unix::{SignalKind, signal};
    let mut hup = match signal(SignalKind::hangup()) {
        Ok(s) => Some(s),
        Err(e) => {
            tracing::warn!(error = %e, "cannot listen for SIGHUP; file polling only");
            None
        }
    };
    let mut poll = tokio::time::interval(every);
    poll.tick().await;
    loop {
        let by_signal = tokio::select! {
            _ = async { match hup.as_mut() { Some(h) => h.recv().await, None => std::future::pending().await } } => true,
            _ = poll.tick() => false,
        };
        let loaded = match config::load(file.as_deref()) {
            Ok(l) => l,
            Err(e) => {
                // The status page first: whoever reads the log line then finds it there too.
                status.reload_refused(&e.to_string());
                tracing::error!(error = %e, "reload refused: the new configuration is invalid; the running one stays");
                continue;
            }
        };
        let now = files_fingerprint(file.as_deref(), &loaded.config);
        if !by_signal && now == seen {
            continue;
        }
        if !by_signal {
            tracing::info!("configuration or certificate files changed on disk; reloading");
        }
        let yaml = loaded.config.to_yaml();
        match reloader.reload(loaded.config) {
            Ok(()) => {
                seen = now;
                status.config_loaded(yaml, true);
            }
            Err(e) => {
                status.reload_refused(&e.to_string());
                tracing::error!(error = %e, "reload refused; the running configuration stays");
            }
        }
    }
}

async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        tracing::warn!("cannot install signal handlers; stop with SIGKILL");
        return std::future::pending().await;
    };
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM received"),
        _ = int.recv() => tracing::info!("SIGINT received"),
    }
}
