//! Upstream HTTP/2 connections, shared by every client: per destination (and identity) a small set
//! of long-lived connections, each carrying as many streams as the origin's live
//! SETTINGS_MAX_CONCURRENT_STREAMS allows. A new connection opens only when every open one is full
//! and none is being opened, so a burst of pushes shares one connection instead of stampeding Apple.
//! A connection counts as ready after its first PING answer, which also means the origin's SETTINGS
//! have been applied. PINGs keep it alive; an unanswered one closes it. Failed connects back off
//! exponentially with jitter, and while a destination is backing off requests fail fast.
//! With worker threads (`crate::workers`) each worker has a shard of all this to itself, chosen
//! by the thread a request runs on, so its requests never touch another worker's connections.

use std::collections::HashMap;
use std::hash::{BuildHasher, Hasher};
use std::pin::pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use h2::client::ResponseFuture;
use h2::{Ping, SendStream};
use http::Request;
use rustls::ClientConfig;
use tokio::sync::{Notify, oneshot, watch};
use tokio::time::{Instant, sleep, timeout, timeout_at};
use tokio_util::sync::CancellationToken;

use super::connect::{ConnectError, Connector, H2Connection, H2Send, Route};
use super::decision::{Decision, Limits, View, decide};
use crate::config::UpstreamConfig;
use crate::fasthash::FastMap;
use crate::metrics::{DestinationGauges, Metrics, PoolGauges};
use crate::policy::Authority;
use crate::upstream::tunnel::TunnelError;

/// Which connections a request may share: same destination, same upstream identity.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct PoolKey {
    pub dest: Authority,
    /// The identity the connection presents or carries (`None`: anonymous, token auth unknown).
    pub identity: Option<Arc<str>>,
}

/// Why no stream could be had.
#[derive(Debug, Clone, thiserror::Error)]
pub enum PoolError {
    #[error("connecting to {dest} failed: {source}")]
    Connect {
        dest: String,
        #[source]
        source: Arc<ConnectError>,
    },
    #[error("{dest} is backing off after failures ({remaining:?} left); last error: {source}")]
    BackingOff {
        dest: String,
        remaining: Duration,
        #[source]
        source: Arc<ConnectError>,
    },
    #[error("{dest} is down and another worker is trying to reconnect now; last error: {source}")]
    Reconnecting {
        dest: String,
        #[source]
        source: Arc<ConnectError>,
    },
    #[error("all connections to {dest} are full and {queued} requests already wait")]
    QueueFull { dest: String, queued: usize },
    #[error(
        "{dest} already has connections for {max} token identities, none of them idle \
         (upstream.max_token_identities)"
    )]
    TooManyIdentities { dest: String, max: usize },
    #[error("no stream to {dest} became free in time")]
    WaitTimeout { dest: String },
}

#[derive(Debug, Clone)]
pub struct PoolSettings {
    pub max_connections: usize,
    pub max_queued: usize,
    /// JWT issuer/key identities with connections of their own, per destination. Identities come
    /// from unverified claims, so without a bound any client could make the relay open
    /// connections to Apple for as many made-up issuers as it likes.
    pub max_identities: usize,
    pub connect_timeout: Duration,
    pub keepalive_interval: Duration,
    pub keepalive_timeout: Duration,
    pub backoff_base: Duration,
    pub backoff_max: Duration,
    /// Worker threads: each has a shard of the pool (connections, limits) of its own, so a
    /// request and the connection it uses stay on one thread. `max_connections` and `max_queued`
    /// are shared out among the shards, at least one each. Back-off is shared (`Health`).
    pub shards: usize,
}

impl PoolSettings {
    pub fn from_config(upstream: &UpstreamConfig) -> Self {
        PoolSettings {
            max_connections: upstream.max_connections_per_destination,
            max_queued: upstream.max_queued_requests,
            max_identities: upstream.max_token_identities,
            connect_timeout: upstream.connect_timeout,
            keepalive_interval: upstream.keepalive_interval,
            keepalive_timeout: upstream.keepalive_timeout,
            backoff_base: Duration::from_secs(1),
            backoff_max: Duration::from_secs(60),
            shards: 1,
        }
    }
}

thread_local! {
    static WORKER: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

/// Marks this thread as worker `index`: requests made on it use the pool's shard `index`.
pub fn set_worker(index: usize) {
    WORKER.with(|w| w.set(index));
}

/// The wait before connect attempt number `failures + 1`: base·2^(failures-1), capped, then
/// scaled by `jitter` in [0.5, 1.0] so relays that failed together do not retry together.
pub fn backoff_delay(settings: &PoolSettings, failures: u32, jitter: f64) -> Duration {
    if failures == 0 {
        return Duration::ZERO;
    }
    let exp = settings
        .backoff_base
        .saturating_mul(1u32 << (failures - 1).min(16))
        .min(settings.backoff_max);
    exp.mul_f64(jitter.clamp(0.5, 1.0))
}

fn random_jitter() -> f64 {
    let bits = std::collections::hash_map::RandomState::new()
        .build_hasher()
        .finish();
    0.5 + (bits % 1000) as f64 / 2000.0
}

/// One upstream HTTP/2 connection.
pub struct Conn {
    id: u64,
    send: H2Send,
    in_flight: AtomicUsize,
    open: AtomicBool,
    route: Route,
    /// Ends the connection (its identity evicted; a child of the pool's shutdown token).
    close: CancellationToken,
}

impl Conn {
    fn has_room(&self) -> bool {
        self.open.load(Ordering::Acquire)
            && self.in_flight.load(Ordering::SeqCst) < self.send.current_max_send_streams()
    }

    pub fn id(&self) -> u64 {
        self.id
    }

    pub fn route(&self) -> &Route {
        &self.route
    }
}

/// Whether a destination (for one identity) is reachable, shared by every worker's shard: a
/// failure seen by one worker makes them all back off, and while it is down only one connect
/// attempt is made at a time, so N workers do not try N times as often as Apple allows.
#[derive(Default)]
struct Health {
    failures: u32,
    retry_at: Option<Instant>,
    last_error: Option<Arc<ConnectError>>,
    /// A worker is making the attempt that tells whether the destination is back.
    probing: bool,
    /// When the first of the `failures` in a row happened (for the status page).
    down_since: Option<SystemTime>,
}

#[derive(Default)]
struct DestState {
    conns: Vec<Arc<Conn>>,
    connecting: bool,
    queued: usize,
    /// When a request last took a stream here: the least recently used idle identity goes first.
    last_used: Option<Instant>,
    /// Requests between finding this entry and leaving `checkout`: it is not idle meanwhile.
    checkouts: usize,
}

impl DestState {
    /// Nothing in flight, waiting or connecting: the entry can go without anyone noticing.
    fn idle(&self) -> bool {
        self.checkouts == 0
            && !self.connecting
            && self.queued == 0
            && self
                .conns
                .iter()
                .all(|c| c.in_flight.load(Ordering::SeqCst) == 0)
    }
}

struct Dest {
    key: PoolKey,
    /// Locked after `state` when both are held, never before.
    health: Arc<Mutex<Health>>,
    state: Mutex<DestState>,
    changed: Notify,
    /// Requests waiting on `changed`; a freed stream slot wakes nobody when there are none.
    waiting: AtomicUsize,
}

impl Dest {
    fn lock(&self) -> MutexGuard<'_, DestState> {
        // A panic while holding this lock cannot leave the state half-written in a harmful way.
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn health(&self) -> MutexGuard<'_, Health> {
        self.health
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// A stream slot on a connection, held from request start until the response body ends.
pub struct Lease {
    conn: Arc<Conn>,
    dest: Arc<Dest>,
}

impl Lease {
    pub fn conn_id(&self) -> u64 {
        self.conn.id
    }

    pub fn route(&self) -> &Route {
        &self.conn.route
    }

    /// Opens a stream. An error here means nothing was sent: the caller may try another lease.
    pub fn send_request(
        &self,
        request: Request<()>,
        end_of_stream: bool,
    ) -> Result<(ResponseFuture, SendStream<Bytes>), h2::Error> {
        // A handle of its own, so a stream h2 holds back (the origin lowered its limit under us)
        // never blocks another request's handle. The pool's accounting stands in for `ready()`.
        let result = self.conn.send.clone().send_request(request, end_of_stream);
        if result.is_err() {
            self.retire();
        }
        result
    }

    /// Takes the connection out of rotation (GOAWAY seen, or it failed): streams on it finish,
    /// new ones go elsewhere.
    pub fn retire(&self) {
        if self.conn.open.swap(false, Ordering::AcqRel) {
            tracing::debug!(upstream.conn = self.conn.id, "upstream connection retired");
        }
        self.dest.changed.notify_waiters();
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        // SeqCst pairs with `QueueSlot::new`: either a new waiter sees this slot free when it
        // checks again, or this sees the waiter and wakes it.
        self.conn.in_flight.fetch_sub(1, Ordering::SeqCst);
        if self.dest.waiting.load(Ordering::SeqCst) > 0 {
            self.dest.changed.notify_waiters();
        }
    }
}

/// A checkout in progress on a destination entry (counted while the shard's map was locked, so
/// the entry cannot be evicted between being found and being used).
struct Checkout<'a>(&'a Dest);

impl Drop for Checkout<'_> {
    fn drop(&mut self) {
        self.0.lock().checkouts -= 1;
    }
}

/// A place in the wait queue (the caller counted it in `queued`); decrements both counts however
/// the wait ends.
struct QueueSlot<'a>(&'a Dest);

impl<'a> QueueSlot<'a> {
    fn new(dest: &'a Dest) -> Self {
        dest.waiting.fetch_add(1, Ordering::SeqCst);
        QueueSlot(dest)
    }
}

impl Drop for QueueSlot<'_> {
    fn drop(&mut self) {
        self.0.waiting.fetch_sub(1, Ordering::SeqCst);
        self.0.lock().queued -= 1;
    }
}

/// Clears the connecting flag however the connect ends (including cancellation).
/// A connect attempt in progress; `probe` when it is the one attempt made while the destination
/// is down. Dropped (done, or the request gave up), it lets the next attempt start.
struct ConnectingGuard<'a> {
    dest: &'a Dest,
    probe: bool,
}

impl Drop for ConnectingGuard<'_> {
    fn drop(&mut self) {
        let mut st = self.dest.lock();
        st.connecting = false;
        if self.probe {
            self.dest.health().probing = false;
        }
        drop(st);
        self.dest.changed.notify_waiters();
    }
}

/// The upstream pool. Cheap to clone.
#[derive(Clone)]
pub struct Pool {
    inner: Arc<Inner>,
}

struct Inner {
    connector: Connector,
    tls: HashMap<Option<Arc<str>>, Arc<ClientConfig>>,
    /// Limits per shard.
    settings: PoolSettings,
    /// One map per shard (worker thread).
    dests: Vec<Mutex<FastMap<PoolKey, Arc<Dest>>>>,
    /// Each key's `Health`, held by the shards' entries for it; gone when they all are.
    health: Mutex<FastMap<PoolKey, Weak<Mutex<Health>>>>,
    next_id: AtomicU64,
    /// Bumped whenever a connection opens or ends: for metrics and tests that wait on it.
    events: watch::Sender<u64>,
    /// Cancelled at shutdown: every connection driver closes its connection.
    closing: CancellationToken,
    metrics: Arc<Metrics>,
}

/// What the pool holds for one destination, for metrics and tests.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DestStats {
    pub open_connections: usize,
    pub streams_in_flight: usize,
}

/// Whether one destination (for one identity) is reachable, as the status page shows it.
#[derive(Debug, Clone)]
pub struct DestHealth {
    /// A connect is under way in some shard.
    pub connecting: bool,
    /// Failed connects in a row (0: none since the last success).
    pub failures: u32,
    pub down_since: Option<SystemTime>,
    /// Until the next attempt may start; zero once it is due.
    pub retry_in: Option<Duration>,
    pub last_error: Option<Arc<ConnectError>>,
}

impl PoolGauges for Pool {
    fn gauges(&self) -> Vec<DestinationGauges> {
        self.stats()
            .into_iter()
            .map(|(key, stats)| DestinationGauges {
                destination: key.dest.to_string(),
                open_connections: stats.open_connections,
                streams_in_flight: stats.streams_in_flight,
            })
            .collect()
    }
}

impl Pool {
    /// `tls` maps each identity (None: anonymous) to the client config that presents it.
    pub fn new(
        connector: Connector,
        tls: HashMap<Option<Arc<str>>, Arc<ClientConfig>>,
        mut settings: PoolSettings,
        metrics: Arc<Metrics>,
    ) -> Self {
        let shards = settings.shards.max(1);
        settings.max_connections = settings.max_connections.div_ceil(shards).max(1);
        settings.max_queued = settings.max_queued.div_ceil(shards).max(1);
        settings.max_identities = settings.max_identities.div_ceil(shards).max(1);
        Pool {
            inner: Arc::new(Inner {
                connector,
                tls,
                settings,
                dests: (0..shards)
                    .map(|_| Mutex::new(FastMap::default()))
                    .collect(),
                health: Mutex::new(FastMap::default()),
                next_id: AtomicU64::new(1),
                events: watch::Sender::new(0),
                closing: CancellationToken::new(),
                metrics,
            }),
        }
    }

    /// The entry for `key` in this worker's shard, counted as in a checkout (see `Checkout`).
    fn dest(&self, key: &PoolKey) -> Result<Arc<Dest>, PoolError> {
        let shard = WORKER.with(|w| w.get()) % self.inner.dests.len();
        let mut dests = self.inner.dests[shard]
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if let Some(d) = dests.get(key) {
            d.lock().checkouts += 1;
            return Ok(d.clone());
        }
        if key.identity.is_some() {
            self.make_room_for_identity(&mut dests, key)?;
        }
        let dest = Arc::new(Dest {
            key: key.clone(),
            health: self.shared_health(key),
            state: Mutex::new(DestState {
                checkouts: 1,
                ..DestState::default()
            }),
            changed: Notify::new(),
            waiting: AtomicUsize::new(0),
        });
        dests.insert(key.clone(), dest.clone());
        Ok(dest)
    }

    /// The `Health` the shards share for `key`, made when no shard holds one.
    fn shared_health(&self, key: &PoolKey) -> Arc<Mutex<Health>> {
        let mut all = self.inner.health.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(h) = all.get(key).and_then(Weak::upgrade) {
            return h;
        }
        // Entries are made rarely (a new destination or identity): drop the dead ones then.
        all.retain(|_, h| h.strong_count() > 0);
        let h = Arc::new(Mutex::new(Health::default()));
        all.insert(key.clone(), Arc::downgrade(&h));
        h
    }

    /// Keeps the identities towards `key.dest` under `max_identities` before `key` joins them:
    /// the least recently used idle one is dropped and its connections closed; with none idle,
    /// the new identity is refused.
    fn make_room_for_identity(
        &self,
        dests: &mut FastMap<PoolKey, Arc<Dest>>,
        key: &PoolKey,
    ) -> Result<(), PoolError> {
        let max = self.inner.settings.max_identities;
        let mut count = 0;
        let mut victim: Option<(Option<Instant>, PoolKey)> = None;
        for (k, d) in dests.iter() {
            if k.dest != key.dest || k.identity.is_none() {
                continue;
            }
            count += 1;
            let st = d.lock();
            if st.idle() && victim.as_ref().is_none_or(|(used, _)| st.last_used < *used) {
                victim = Some((st.last_used, k.clone()));
            }
        }
        if count < max {
            return Ok(());
        }
        let Some((_, victim)) = victim else {
            return Err(PoolError::TooManyIdentities {
                dest: key.dest.to_string(),
                max,
            });
        };
        if let Some(d) = dests.remove(&victim) {
            for c in &d.lock().conns {
                c.open.store(false, Ordering::Release);
                c.close.cancel();
            }
            tracing::info!(
                upstream.authority = %victim.dest,
                upstream.identity = victim.identity.as_deref().unwrap_or(""),
                max,
                "idle token identity dropped to make room (upstream.max_token_identities)"
            );
        }
        Ok(())
    }

    /// Closes every upstream connection (at shutdown, once clients are drained).
    pub fn close(&self) {
        self.inner.closing.cancel();
    }

    /// A receiver that sees a new value whenever a connection opens or ends.
    pub fn changes(&self) -> watch::Receiver<u64> {
        self.inner.events.subscribe()
    }

    /// Open connections and streams in flight per key, summed over the shards.
    pub fn stats(&self) -> Vec<(PoolKey, DestStats)> {
        let mut by_key: HashMap<PoolKey, DestStats> = HashMap::new();
        for shard in &self.inner.dests {
            let dests = shard.lock().unwrap_or_else(|p| p.into_inner());
            for d in dests.values() {
                let st = d.lock();
                let e = by_key.entry(d.key.clone()).or_insert(DestStats {
                    open_connections: 0,
                    streams_in_flight: 0,
                });
                e.open_connections += st
                    .conns
                    .iter()
                    .filter(|c| c.open.load(Ordering::Acquire))
                    .count();
                e.streams_in_flight += st
                    .conns
                    .iter()
                    .map(|c| c.in_flight.load(Ordering::Acquire))
                    .sum::<usize>();
            }
        }
        by_key.into_iter().collect()
    }

    /// Each key's reachability, read without changing anything (for the status page).
    pub fn health(&self) -> Vec<(PoolKey, DestHealth)> {
        let now = Instant::now();
        let mut by_key: HashMap<PoolKey, DestHealth> = HashMap::new();
        for shard in &self.inner.dests {
            let dests = shard.lock().unwrap_or_else(|p| p.into_inner());
            for d in dests.values() {
                // `state` before `health`, as everywhere.
                let connecting = d.lock().connecting;
                let h = d.health();
                let e = by_key.entry(d.key.clone()).or_insert_with(|| DestHealth {
                    connecting: false,
                    failures: h.failures,
                    down_since: h.down_since,
                    retry_in: h.retry_at.map(|at| at.saturating_duration_since(now)),
                    last_error: h.last_error.clone(),
                });
                e.connecting |= connecting;
            }
        }
        by_key.into_iter().collect()
    }

    /// A stream slot towards `key`, opening a connection when every open one is full. Waits (bounded
    /// by the queue size and `deadline`) when the destination has all the connections it may have.
    pub async fn checkout(&self, key: &PoolKey, deadline: Instant) -> Result<Lease, PoolError> {
        let dest = self.dest(key)?;
        let _checkout = Checkout(&dest);
        let limits = Limits {
            max_connections: self.inner.settings.max_connections,
            max_queued: self.inner.settings.max_queued,
        };
        let mut slot: Option<QueueSlot<'_>> = None;
        loop {
            let mut notified = pin!(dest.changed.notified());
            notified.as_mut().enable();
            let connect_now = {
                let mut st = dest.lock();
                st.conns.retain(|c| {
                    c.open.load(Ordering::Acquire) || c.in_flight.load(Ordering::Acquire) > 0
                });
                let mut health = dest.health();
                let view = View {
                    room: st.conns.iter().position(|c| c.has_room()),
                    open: st
                        .conns
                        .iter()
                        .filter(|c| c.open.load(Ordering::Acquire))
                        .count(),
                    connecting: st.connecting,
                    queued: st.queued,
                    in_queue: slot.is_some(),
                    failures: health.failures,
                    retry_at: health.retry_at,
                    last_error: health.last_error.as_ref(),
                    probing: health.probing,
                    now: Instant::now(),
                };
                match decide(&view, limits) {
                    Decision::Use(i) => {
                        let conn = st.conns[i].clone();
                        conn.in_flight.fetch_add(1, Ordering::AcqRel);
                        st.last_used = Some(view.now);
                        return Ok(Lease {
                            conn,
                            dest: dest.clone(),
                        });
                    }
                    Decision::BackingOff { remaining, error } => {
                        return Err(PoolError::BackingOff {
                            dest: key.dest.to_string(),
                            remaining,
                            source: error.clone(),
                        });
                    }
                    Decision::Reconnecting { error } => {
                        return Err(PoolError::Reconnecting {
                            dest: key.dest.to_string(),
                            source: error.clone(),
                        });
                    }
                    Decision::QueueFull => {
                        return Err(PoolError::QueueFull {
                            dest: key.dest.to_string(),
                            queued: st.queued,
                        });
                    }
                    Decision::Enqueue => {
                        st.queued += 1;
                        slot = Some(QueueSlot::new(&dest));
                        continue;
                    }
                    Decision::Connect { probe } => {
                        st.connecting = true;
                        health.probing = probe;
                        Some(probe)
                    }
                    Decision::Wait => None,
                }
            };
            if let Some(probe) = connect_now {
                // Boxed: connecting is rare, and inline it would triple every request's future.
                return Box::pin(self.connect(&dest, probe)).await;
            }
            // Wake at the back-off's end too, so a queued request can start the reconnect.
            let retry_at = dest.health().retry_at;
            let wake_at = retry_at.filter(|at| *at < deadline).unwrap_or(deadline);
            if timeout_at(wake_at, notified).await.is_err() && Instant::now() >= deadline {
                return Err(PoolError::WaitTimeout {
                    dest: key.dest.to_string(),
                });
            }
        }
    }

    /// Opens a connection for `dest` (whose `connecting` flag, and `probing` when `probe`, the
    /// caller set) and takes its first stream slot.
    async fn connect(&self, dest: &Arc<Dest>, probe: bool) -> Result<Lease, PoolError> {
        let _guard = ConnectingGuard { dest, probe };
        let key = &dest.key;
        let tls = self
            .inner
            .tls
            .get(&key.identity)
            .or_else(|| self.inner.tls.get(&None))
            .cloned();
        let result = match tls {
            Some(tls) => self.open(dest, &tls).await,
            None => Err(ConnectError::Tls {
                host: key.dest.host().to_owned(),
                source: std::io::Error::other("no TLS configuration for this identity"),
            }),
        };
        let mut st = dest.lock();
        let mut health = dest.health();
        match result {
            Ok(conn) => {
                *health = Health::default();
                conn.in_flight.fetch_add(1, Ordering::AcqRel);
                st.conns.push(conn.clone());
                st.last_used = Some(Instant::now());
                Ok(Lease {
                    conn,
                    dest: dest.clone(),
                })
            }
            Err(e) => {
                health.failures = health.failures.saturating_add(1);
                health.down_since.get_or_insert_with(SystemTime::now);
                let delay = backoff_delay(&self.inner.settings, health.failures, random_jitter());
                health.retry_at = Some(Instant::now() + delay);
                match &e {
                    ConnectError::Tunnel(t) => self.inner.metrics.proxy_failure(&match t {
                        TunnelError::Refused { status, .. } => status.to_string(),
                        TunnelError::ConnectTimeout { .. } | TunnelError::ReplyTimeout { .. } => {
                            "timeout".into()
                        }
                        TunnelError::Connect { .. } => "unreachable".into(),
                        _ => "malformed".into(),
                    }),
                    ConnectError::Tls { .. } | ConnectError::NoH2 { .. } => {
                        self.inner.metrics.tls_failure("upstream")
                    }
                    _ => {}
                }
                let e = Arc::new(e);
                health.last_error = Some(e.clone());
                tracing::warn!(
                    upstream.authority = %key.dest,
                    upstream.hop = e.hop(),
                    proxy.status = e_proxy_status(&e),
                    retry_in_ms = delay.as_millis() as u64,
                    error = %e,
                    "upstream connect failed"
                );
                Err(PoolError::Connect {
                    dest: key.dest.to_string(),
                    source: e,
                })
            }
        }
    }

    /// Connects, starts the driver task, and waits for the first PING answer.
    async fn open(
        &self,
        dest: &Arc<Dest>,
        tls: &Arc<ClientConfig>,
    ) -> Result<Arc<Conn>, ConnectError> {
        let settings = &self.inner.settings;
        let key = &dest.key;
        let mut connected = self.inner.connector.connect(&key.dest, tls).await?;
        let ping_pong = connected.connection.ping_pong();
        let conn = Arc::new(Conn {
            id: self.inner.next_id.fetch_add(1, Ordering::Relaxed),
            send: connected.send,
            in_flight: AtomicUsize::new(0),
            open: AtomicBool::new(false),
            route: connected.route,
            close: self.inner.closing.child_token(),
        });
        let (ready_tx, ready_rx) = oneshot::channel();
        tokio::spawn(drive(
            connected.connection,
            ping_pong,
            ready_tx,
            conn.clone(),
            dest.clone(),
            self.inner.clone(),
        ));
        let host = key.dest.host().to_owned();
        match ready_rx.await {
            Ok(Ok(())) => {
                conn.open.store(true, Ordering::Release);
                self.inner.events.send_modify(|n| *n += 1);
                tracing::info!(
                    upstream.authority = %key.dest,
                    upstream.conn = conn.id,
                    upstream.route = ?conn.route,
                    upstream.max_streams = conn.send.current_max_send_streams(),
                    "upstream connection ready"
                );
                Ok(conn)
            }
            Ok(Err(ReadyError::Timeout)) => Err(ConnectError::H2Timeout {
                host,
                after: settings.connect_timeout,
            }),
            Ok(Err(ReadyError::H2(source))) => Err(ConnectError::H2 { host, source }),
            Err(_) => Err(ConnectError::H2 {
                host,
                source: h2::Error::from(h2::Reason::INTERNAL_ERROR),
            }),
        }
    }
}

fn e_proxy_status(e: &ConnectError) -> Option<u16> {
    match e {
        ConnectError::Tunnel(t) => t.proxy_status(),
        _ => None,
    }
}

enum ReadyError {
    Timeout,
    H2(h2::Error),
}

/// Drives one connection: first PING (readiness), then keepalive PINGs until the connection ends or
/// a PING goes unanswered. Marks the connection closed when it returns.
async fn drive(
    connection: H2Connection,
    mut ping_pong: Option<h2::PingPong>,
    ready: oneshot::Sender<Result<(), ReadyError>>,
    conn: Arc<Conn>,
    dest: Arc<Dest>,
    pool: Arc<Inner>,
) {
    let settings = &pool.settings;
    let mut connection = pin!(connection);
    let id = conn.id;
    let first_ping = async {
        match ping_pong.as_mut() {
            Some(pp) => match timeout(settings.connect_timeout, pp.ping(Ping::opaque())).await {
                Ok(Ok(_)) => Ok(()),
                Ok(Err(e)) => Err(ReadyError::H2(e)),
                Err(_) => Err(ReadyError::Timeout),
            },
            None => Ok(()),
        }
    };
    let ready_result = tokio::select! {
        r = connection.as_mut() => Err(match r {
            Ok(()) => ReadyError::H2(h2::Error::from(h2::Reason::NO_ERROR)),
            Err(e) => ReadyError::H2(e),
        }),
        r = first_ping => r,
    };
    let failed = ready_result.is_err();
    if ready.send(ready_result).is_err() || failed {
        return;
    }

    let keepalive = async {
        let Some(pp) = ping_pong.as_mut() else {
            return std::future::pending().await;
        };
        loop {
            sleep(settings.keepalive_interval).await;
            match timeout(settings.keepalive_timeout, pp.ping(Ping::opaque())).await {
                Ok(Ok(_)) => continue,
                Ok(Err(e)) => return format!("PING failed: {e}"),
                Err(_) => return format!("PING unanswered for {:?}", settings.keepalive_timeout),
            }
        }
    };
    let reason = tokio::select! {
        r = connection.as_mut() => match r {
            // A clean HTTP/2 close from the origin always comes with its GOAWAY.
            Ok(()) => {
                pool.metrics.goaway(&dest.key.dest.to_string());
                "closed by the origin (GOAWAY)".to_owned()
            }
            Err(e) if e.is_go_away() && e.is_remote() => {
                pool.metrics.goaway(&dest.key.dest.to_string());
                format!("GOAWAY {:?}", e.reason())
            }
            Err(e) => format!("error: {e}"),
        },
        why = keepalive => why,
        _ = conn.close.cancelled() => if pool.closing.is_cancelled() {
            "relay shutting down".to_owned()
        } else {
            "its identity was dropped (idle, over upstream.max_token_identities)".to_owned()
        },
    };
    conn.open.store(false, Ordering::Release);
    dest.changed.notify_waiters();
    pool.events.send_modify(|n| *n += 1);
    tracing::info!(upstream.authority = %dest.key.dest, upstream.conn = id, reason = %reason, "upstream connection ended");
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings() -> PoolSettings {
        PoolSettings {
            max_connections: 4,
            max_queued: 10,
            max_identities: 8,
            connect_timeout: Duration::from_secs(1),
            keepalive_interval: Duration::from_secs(30),
            keepalive_timeout: Duration::from_secs(10),
            backoff_base: Duration::from_secs(1),
            backoff_max: Duration::from_secs(60),
            shards: 1,
        }
    }

    #[test]
    fn backoff_doubles_up_to_the_cap_and_jitters_down() {
        let s = settings();
        let full: Vec<u64> = (0..10)
            .map(|f| backoff_delay(&s, f, 1.0).as_secs())
            .collect();
        assert_eq!(full, [0, 1, 2, 4, 8, 16, 32, 60, 60, 60]);
        assert_eq!(backoff_delay(&s, 3, 0.5), Duration::from_secs(2));
        assert_eq!(backoff_delay(&s, 40, 1.0), Duration::from_secs(60));
        for _ in 0..100 {
            let j = random_jitter();
            assert!((0.5..=1.0).contains(&j), "{j}");
        }
    }
}
