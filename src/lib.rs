//! pushrelay: a relay appliance that carries APNs / FCM HTTP/2 push traffic out of locked-down
//! networks. Data flows one way: listener → restrictions → protocol → upstream; imports follow
//! it (listen → policy → relay's doors → relay's pipeline → upstream, with config, metrics and
//! swap as leaves), and tests/architecture.rs fails on any import cycle.
//!
//! - `cli`: the command line (serve, check, ca init, ca issue, probe).
//! - `coalesce`: write coalescing so a burst of pushes shares TLS records and syscalls; a
//!   deadline on client writes that make no progress.
//! - `config`: YAML + `PUSHRELAY_` env into typed, validated configuration, before any bind.
//! - `admin`: /healthz, /readyz, /metrics and the status page on the admin listener.
//! - `log`: the log sink (one writer thread, lines batched).
//! - `metrics`: Prometheus metrics with stable names; `metrics::recent`, the status page's hour of
//!   history.
//! - `listen`: accept loop, connection limit, source allowlist before any TLS work.
//! - `policy`: pure allowlists (source CIDRs, destination host:port).
//! - `tls`: server certificates by SNI, the upstream client config, the private CA.
//! - `relay`: the shared request pipeline, header rewriting, the one strict HTTP/1.1 parser and
//!   connection server every HTTP/1.1 door uses, one file per front door; `listen` and `reload`
//!   know a door only as a `relay::door::DoorHandle`.
//! - `reload`: swaps certificates and allowlists into a running relay (each door reloads its own);
//!   mints listener leaves again before they expire.
//! - `status`: the status page as HTML and JSON, from a `metrics::recent::Snapshot`.
//! - `swap`: the cell a reloadable value lives in (a leaf: everything may use it).
//! - `upstream`: CONNECT tunnel, connections, the shared HTTP/2 pool, safe resend.
//! - `h2_body`: an HTTP/2 stream as a body, for the front door and the upstream alike (a leaf).
//! - `h2client`: pushrelay's own HTTP/2 client codec (frames, HPACK, connection, driver); not
//!   yet used by the pool.
//! - `error`: the one place an error becomes an HTTP answer.
//! - `probe`: step-by-step diagnosis of the upstream path (`pushrelay probe`).
//! - `workers`: one single-threaded runtime per core; a connection stays on the one that took it.

// Library code handles every failure; tests may unwrap. Each place allowed says why.
#![cfg_attr(
    not(test),
    deny(
        clippy::unwrap_used,
        clippy::expect_used,
        clippy::panic,
        clippy::print_stdout,
        clippy::print_stderr,
        clippy::todo,
        clippy::unreachable,
        clippy::unimplemented
    )
)]

pub mod admin;
pub mod cli;
mod coalesce;
pub mod config;
mod error;
mod fasthash;
mod h2_body;
pub mod h2client;
mod listen;
pub mod log;
pub mod metrics;
pub mod policy;
mod probe;
pub mod relay;
pub mod reload;
mod status;
mod swap;
pub mod tls;
pub mod upstream;
pub mod workers;

use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use config::{Config, Mode, ValidConfig};
use listen::Listener;
use policy::SourcePolicy;
use relay::Relay;
use relay::door::DoorHandle;
use relay::forward_proxy::ForwardProxy;
use relay::post_proxy::PostProxy;
use relay::pre_proxy::PreProxy;
use reload::Reloader;
use swap::Swap;
use tls::TlsSetupError;
use upstream::chain::ChainKind;
use upstream::connect::Connector;
use upstream::pool::PoolSettings;
use upstream::{Pool, Upstream};

#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    #[error(transparent)]
    Tls(#[from] TlsSetupError),
    #[error("{given} listening sockets given for {configured} configured listeners")]
    ListenerCount { given: usize, configured: usize },
}

/// Everything built from a configuration, ready to serve: TLS material loaded, pool created.
pub struct App {
    config: ValidConfig,
    relay: Arc<Relay>,
    listeners: Vec<Listener>,
    reloader: Arc<Reloader>,
    ready: Arc<admin::Readiness>,
    /// Tells the status page each destination's route (upstream settings need a restart).
    routes: Connector,
    workers: usize,
}

impl App {
    /// Builds the relay from a validated configuration. Fails on unreadable TLS material, naming
    /// the key and the file; nothing is bound yet.
    pub fn build(config: ValidConfig) -> Result<App, SetupError> {
        App::with_workers(config, 1)
    }

    /// As `build`, for serving on `workers` worker threads (`run_on`): the pool gets a shard per
    /// worker.
    pub fn with_workers(config: ValidConfig, workers: usize) -> Result<App, SetupError> {
        let mut tls_by_identity = HashMap::new();
        tls_by_identity.insert(
            None,
            tls::client::build(&config.upstream.extra_roots, None)?,
        );
        let metrics = Arc::new(metrics::Metrics::new());
        let mut client_identities = Vec::new();
        for (i, id) in config.upstream.identities.iter().enumerate() {
            let key = format!("upstream.identities[{i}]");
            let identity = Arc::new(tls::client::ClientIdentity::load(&key, &id.cert, &id.key)?);
            metrics.identity_certificate(&id.topic, identity.not_after());
            let tls = tls::client::build(&config.upstream.extra_roots, Some(identity.clone()))?;
            tls_by_identity.insert(
                Some(upstream::identity::certificate_identity(&id.topic)),
                tls,
            );
            client_identities.push(identity);
        }
        metrics.status().config_origin("given in-process");
        metrics.status().config_loaded(config.to_yaml(), false);
        let routes = Connector::new(&config.upstream);
        let settings = PoolSettings {
            shards: workers.max(1),
            ..PoolSettings::from_config(&config.upstream)
        };
        let mut chain_identity = None;
        let upstream = match &config.upstream.relay {
            // A relay chain: the pool's connections are HTTP/1.1 to the DMZ relay.
            Some(r) => {
                let secret =
                    match &r.secret_file {
                        None => None,
                        Some(file) => Some(config::read_secret(file).map_err(|e| {
                            TlsSetupError::new("upstream.relay.secret_file", file, e)
                        })?),
                    };
                if let (Some(cert), Some(key)) = (&r.client_cert, &r.client_key) {
                    chain_identity = Some(Arc::new(tls::client::ClientIdentity::load_as(
                        ("upstream.relay.client_cert", cert),
                        ("upstream.relay.client_key", key),
                    )?));
                }
                let tls = tls::client::build_http11(
                    &config.upstream.extra_roots,
                    chain_identity.clone(),
                )?;
                let kind = ChainKind::new(r, secret, &config.upstream, tls);
                let relay = kind.relay_name();
                let settings = PoolSettings {
                    max_connections: r.max_connections,
                    ..settings
                };
                Upstream::new(Pool::chain(kind, settings, metrics.clone()), Some(relay))
            }
            None => {
                let pool = Pool::new(routes.clone(), tls_by_identity, settings, metrics.clone());
                Upstream::new(pool, None)
            }
        };
        let relay = Arc::new(Relay::new(&config, upstream, metrics));
        let mut listeners = Vec::new();
        for (i, l) in config.listeners.iter().enumerate() {
            // The front doors, by mode: adding one adds an arm here.
            let door: DoorHandle = match l.mode {
                Mode::PreProxy => Arc::new(PreProxy::new(i, l, &config, relay.clone())?),
                Mode::PostProxy => Arc::new(PostProxy::new(i, l, &config, relay.clone())?),
                Mode::ForwardProxy => Arc::new(ForwardProxy::new(i, l, &config, relay.clone())?),
            };
            listeners.push(Listener {
                name: l.name.as_str().into(),
                sources: Arc::new(Swap::new(SourcePolicy::new(l.allow_sources.clone()))),
                door,
                connections: Arc::new(tokio::sync::Semaphore::new(config.limits.max_connections)),
                connections_limit: config.limits.max_connections,
                metrics: relay.metrics_handle(),
            });
        }
        let reloader = Arc::new(Reloader::new(
            config.clone(),
            relay.clone(),
            listeners.iter().map(|l| l.door.clone()).collect(),
            listeners.iter().map(|l| l.sources.clone()).collect(),
            client_identities,
            chain_identity,
        ));
        Ok(App {
            config,
            relay,
            listeners,
            reloader,
            ready: Arc::default(),
            routes,
            workers: workers.max(1),
        })
    }

    /// What the status page has recorded, and where the configuration came from
    /// (`status().config_origin`).
    pub fn status(&self) -> &Arc<metrics::recent::Book> {
        self.relay.metrics().status()
    }

    pub fn config(&self) -> &Config {
        &self.config
    }

    pub fn relay(&self) -> &Arc<Relay> {
        &self.relay
    }

    /// Applies a new configuration to the running relay (SIGHUP, changed certificate files).
    pub fn reloader(&self) -> Arc<Reloader> {
        self.reloader.clone()
    }

    /// Serves on `sockets` (one per configured listener, in order) until `shutdown` completes.
    pub async fn run(
        self,
        sockets: Vec<TcpListener>,
        shutdown: impl Future<Output = ()>,
    ) -> Result<(), SetupError> {
        self.run_with_admin(sockets, None, shutdown).await
    }

    /// As `run`, with the admin endpoints on `admin`. At shutdown: /readyz turns 503, listeners
    /// stop accepting, HTTP/2 clients get GOAWAY and HTTP/1.1 clients `Connection: close`,
    /// in-flight requests finish for up to `shutdown_grace`, then upstream connections close.
    pub async fn run_with_admin(
        self,
        sockets: Vec<TcpListener>,
        admin: Option<TcpListener>,
        shutdown: impl Future<Output = ()>,
    ) -> Result<(), SetupError> {
        self.run_on(&[], sockets, admin, shutdown).await
    }

    /// As `run_with_admin`, with client connections served on `workers` (see `workers`); the
    /// accept loops stay on the current runtime. No workers: everything on the current runtime.
    pub async fn run_on(
        self,
        workers: &[tokio::runtime::Handle],
        sockets: Vec<TcpListener>,
        admin: Option<TcpListener>,
        shutdown: impl Future<Output = ()>,
    ) -> Result<(), SetupError> {
        if sockets.len() != self.listeners.len() {
            return Err(SetupError::ListenerCount {
                given: sockets.len(),
                configured: self.listeners.len(),
            });
        }
        let token = CancellationToken::new();
        let admin_token = CancellationToken::new();
        let tracker = TaskTracker::new();
        if let Some(socket) = admin {
            if let Ok(addr) = socket.local_addr() {
                tracing::info!(bind = %addr, "admin listening (/healthz, /readyz, /metrics, status page /)");
            }
            let limits = admin::Limits {
                head_timeout: self.config.limits.handshake_timeout,
                max_connections: admin::MAX_CONNECTIONS,
            };
            tokio::spawn(admin::serve(
                socket,
                self.relay.clone(),
                self.ready.clone(),
                limits,
                Arc::new(self.status_sources(&sockets)),
                admin_token.clone(),
            ));
        }
        let placement = workers::Placement::new(workers);
        let mut loops = Vec::new();
        for (socket, listener) in sockets.into_iter().zip(self.listeners) {
            if let Ok(addr) = socket.local_addr() {
                tracing::info!(listener = %listener.name, bind = %addr, "listening");
            }
            loops.push(tokio::spawn(listen::accept_loop(
                socket,
                listener,
                token.clone(),
                tracker.clone(),
                placement.clone(),
            )));
        }
        tokio::spawn(reload::remint_loop(self.reloader.clone(), token.clone()));
        self.ready.set(true);
        tracing::info!("ready");
        shutdown.await;
        self.ready.set(false);
        tracing::info!(grace = ?self.config.shutdown_grace, "shutting down: no new connections, draining");
        token.cancel();
        for l in loops {
            let _ = l.await;
        }
        tracing::info!(
            connections = tracker.len(),
            "listeners closed; draining client connections"
        );
        tracker.close();
        if tokio::time::timeout(self.config.shutdown_grace, tracker.wait())
            .await
            .is_err()
        {
            tracing::warn!("shutdown grace elapsed with requests still in flight");
        }
        self.relay.upstream().close();
        admin_token.cancel();
        Ok(())
    }
}

impl App {
    /// What the status page reads besides the relay's records: the listeners as bound on
    /// `sockets` (in order), their connection limits, the routes.
    pub fn status_sources(&self, sockets: &[TcpListener]) -> admin::StatusSources {
        let listeners = self
            .config
            .listeners
            .iter()
            .zip(sockets)
            .map(|(l, socket)| {
                let tls = match l.tls.as_ref() {
                    None => "none (plain HTTP)".to_owned(),
                    Some(t) => {
                        let source = match t.cert_source() {
                            Some(config::CertSource::Mint { ca_cert, .. }) => {
                                format!("minted from CA {}", ca_cert.display())
                            }
                            Some(config::CertSource::Fixed { cert, .. }) => {
                                format!("fixed {}", cert.display())
                            }
                            None => "invalid".to_owned(),
                        };
                        match &t.client_ca {
                            Some(ca) => {
                                format!("{source}; client certificates from {}", ca.display())
                            }
                            None => source,
                        }
                    }
                };
                metrics::recent::ListenerAbout {
                    name: l.name.clone(),
                    // As the configuration spells it (`pre-proxy`, …), for every mode there is.
                    mode: serde_json::to_value(l.mode)
                        .ok()
                        .and_then(|v| v.as_str().map(str::to_owned))
                        .unwrap_or_default(),
                    bind: socket
                        .local_addr()
                        .map_or_else(|_| l.bind.to_string(), |a| a.to_string()),
                    tls,
                }
            })
            .collect();
        admin::StatusSources {
            about: metrics::recent::About {
                version: env!("CARGO_PKG_VERSION").to_owned(),
                workers: self.workers,
                listeners,
            },
            connections: self
                .listeners
                .iter()
                .map(|l| (l.name.to_string(), l.connections.clone()))
                .collect(),
            max_connections: self.config.limits.max_connections,
            routes: self.routes.clone(),
            chain: self
                .config
                .upstream
                .relay
                .as_ref()
                .map(|r| r.url.to_string()),
        }
    }
}

/// Sockets for the configured listeners (in order) and the admin listener.
pub struct Bound {
    pub listeners: Vec<TcpListener>,
    pub admin: Option<TcpListener>,
}

/// Binds every configured listener, in order, and the admin listener.
pub async fn bind(config: &Config) -> std::io::Result<Bound> {
    let bind = |name: String, addr: std::net::SocketAddr| async move {
        TcpListener::bind(addr)
            .await
            .map_err(|e| std::io::Error::new(e.kind(), format!("{name}: cannot bind {addr}: {e}")))
    };
    let mut listeners = Vec::new();
    for l in &config.listeners {
        listeners.push(bind(format!("listener {:?}", l.name), l.bind).await?);
    }
    let admin = match &config.admin {
        Some(a) => Some(bind("admin".into(), a.bind).await?),
        None => None,
    };
    Ok(Bound { listeners, admin })
}
