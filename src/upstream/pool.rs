//! Upstream connections, shared by every client: per destination (and identity) a small set of
//! long-lived connections of one kind (`link.rs`: HTTP/2 to the origin, or HTTP/1.1 to a DMZ relay
//! in a relay chain), each carrying as many requests at once as its live capacity allows (HTTP/2:
//! the origin's SETTINGS_MAX_CONCURRENT_STREAMS; HTTP/1.1: one). A new connection opens only when
//! every open one is full and none is being opened, so a burst of pushes shares one connection
//! instead of stampeding Apple. Each connection's driver (the kind's) says when it ends and why;
//! the pool then takes it out of rotation. A connect is a task the
//! destination owns (the request that asked for it may leave), bounded as a whole; failures back
//! off with jitter. Requests wait for a destination that went down for up to `reconnect_wait`, then
//! fail fast. While requests wait, sources (client addresses), then the connections of each,
//! share the streams and queue fairly (`decision::shares`).
//! With worker threads (`crate::workers`) each worker has a shard of the connections to itself,
//! chosen by the thread a request runs on, so its requests never touch another worker's
//! connections; the per-destination limits and the back-off are shared by all shards.

use std::collections::HashMap;
use std::hash::{BuildHasher, Hasher};
use std::net::{IpAddr, SocketAddr};
use std::pin::pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::{Duration, SystemTime};

use rustls::ClientConfig;
use tokio::sync::{Notify, oneshot, watch};
use tokio::time::{Instant, timeout_at};
use tokio_util::sync::CancellationToken;

use super::chain::ChainKind;
use super::connect::OriginSetup;
use super::connect::{ConnectError, Connector, Route};
use super::decision::{Decision, Holds, Limits, View, decide, shares};
use super::h2_link::H2Kind;
use super::link::{Link, LinkKind, Opened};
use super::native_link::NativeKind;
use crate::config::{Http2Client, UpstreamConfig};
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
    #[error(
        "{dest} admits at most {per_minute} new token identities a minute \
         (upstream.new_token_identities_per_minute)"
    )]
    IdentityRate { dest: String, per_minute: u32 },
    #[error("no stream to {dest} became free in time")]
    WaitTimeout { dest: String },
    #[error("the connection to {dest} was still being opened when the request's time ran out")]
    Connecting { dest: String },
}

#[derive(Debug, Clone)]
pub struct PoolSettings {
    pub max_connections: usize,
    pub max_queued: usize,
    /// JWT issuer/key identities with connections of their own, per destination. Identities come
    /// from unverified claims, so without a bound any client could make the relay open
    /// connections to Apple for as many made-up issuers as it likes.
    pub max_identities: usize,
    /// New token identities admitted per destination and minute (and at once, at most).
    pub new_identities_per_minute: u32,
    /// How long requests wait for a destination that went down to come back.
    pub reconnect_wait: Duration,
    pub keepalive_interval: Duration,
    pub keepalive_timeout: Duration,
    /// Bounds a whole connect attempt (`upstream.connect_timeout`).
    pub connect_timeout: Duration,
    pub backoff_base: Duration,
    pub backoff_max: Duration,
    /// Worker threads: each has a shard of the pool (its connections) of its own, so a request
    /// and the connection it uses stay on one thread. The limits are per destination over all
    /// shards (shared counters), except that a shard with no connection may always open one;
    /// back-off is shared (`Health`).
    pub shards: usize,
    /// Which HTTP/2 client an origin pool's connections run (`upstream.http2_client`).
    pub http2_client: Http2Client,
}

impl PoolSettings {
    pub fn from_config(upstream: &UpstreamConfig) -> Self {
        PoolSettings {
            max_connections: upstream.max_connections_per_destination,
            max_queued: upstream.max_queued_requests,
            max_identities: upstream.max_token_identities,
            new_identities_per_minute: upstream.new_token_identities_per_minute,
            reconnect_wait: upstream.reconnect_wait,
            keepalive_interval: upstream.keepalive_interval,
            keepalive_timeout: upstream.keepalive_timeout,
            connect_timeout: upstream.connect_timeout,
            backoff_base: Duration::from_secs(1),
            backoff_max: Duration::from_secs(60),
            shards: 1,
            http2_client: upstream.http2_client,
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

/// One upstream connection, of whichever kind.
pub struct Conn {
    id: u64,
    link: Link,
    in_flight: AtomicUsize,
    /// Takes new requests; cleared when it ends or is retired (drained).
    open: AtomicBool,
    route: Route,
    /// Ends the connection: cancelled when a retired connection carries nothing more (and by
    /// its identity's and the pool's tokens, whose child it is).
    close: CancellationToken,
    /// Why it was retired, for the line that says it ended.
    retired: std::sync::OnceLock<&'static str>,
}

impl Conn {
    /// Takes the connection out of rotation: requests on it finish, new ones go elsewhere, and
    /// it closes once it carries nothing. SeqCst pairs with `Lease::drop`: one of the two sees
    /// the other's change and closes it.
    fn retire(&self, why: &'static str) {
        if self.open.swap(false, Ordering::SeqCst) {
            let _ = self.retired.set(why);
            tracing::debug!(upstream.conn = self.id, why, "upstream connection retired");
        }
        if self.in_flight.load(Ordering::SeqCst) == 0 {
            self.close.cancel();
        }
    }

    fn has_room(&self) -> bool {
        self.open.load(Ordering::Acquire)
            && self.in_flight.load(Ordering::SeqCst) < self.link.capacity()
    }

    pub fn id(&self) -> u64 {
        self.id
    }

    pub fn route(&self) -> &Route {
        &self.route
    }
}

/// Whether a destination is reachable, shared by every worker's shard and every token identity
/// towards it (made-up JWT issuers do not get a back-off of their own): a failure seen by one
/// makes them all back off, and while it is down only one connect attempt is made at a time.
#[derive(Default)]
struct Health {
    failures: u32,
    retry_at: Option<Instant>,
    last_error: Option<Arc<ConnectError>>,
    /// When the destination went down: the first failure since the last success.
    down_since: Option<Instant>,
    /// Of `failures`, those within `reconnect_wait` of going down: retried at the base delay
    /// (an outage of a few seconds is ridden out), the exponential back-off counts the rest.
    riding_out: u32,
    /// `failures` as it was when the last connect succeeded: a connection refused at its first
    /// exchange (`Pool::connect_refused`) continues that count, so that connects which keep
    /// being refused that way back off exponentially like any others.
    failures_before: u32,
    /// A worker is making the attempt that tells whether the destination is back.
    probing: bool,
    /// `down_since` on the wall clock (for the status page).
    down_since_wall: Option<SystemTime>,
    /// Connect attempts finished (either way): a request that started one waits for this to move.
    finished: u64,
}

/// `Health` and the signal its waiters in every shard listen to.
#[derive(Default)]
struct HealthCell {
    state: Mutex<Health>,
    /// Notified whenever a connect attempt ends.
    changed: Notify,
}

impl HealthCell {
    fn lock(&self) -> MutexGuard<'_, Health> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// What every shard shares for one key: the counters the per-destination limits bound.
struct Shared {
    key: PoolKey,
    health: Arc<HealthCell>,
    /// Connections open or being opened, in every shard.
    reserved: AtomicUsize,
    /// Requests waiting for a stream, in every shard.
    queued: AtomicUsize,
    /// Each shard's entry for this key (for the identity bound's idleness check).
    dests: Mutex<Vec<Weak<Dest>>>,
    /// Set when this token identity was dropped to make room: entries for it are replaced.
    evicted: AtomicBool,
    /// Ends this key's connections in every shard (a child of the pool's shutdown token).
    close: CancellationToken,
    /// Bumped when the identity's connections are drained: a connect that started before
    /// presented the old certificate, and its connection is retired as it opens.
    generation: AtomicU64,
}

impl Shared {
    /// Nothing in flight, waiting or connecting in any shard.
    fn idle(&self) -> bool {
        let dests = self.dests.lock().unwrap_or_else(|p| p.into_inner());
        dests
            .iter()
            .filter_map(Weak::upgrade)
            .all(|d| d.lock().idle())
    }

    fn last_used(&self) -> Option<Instant> {
        let dests = self.dests.lock().unwrap_or_else(|p| p.into_inner());
        dests
            .iter()
            .filter_map(Weak::upgrade)
            .filter_map(|d| d.lock().last_used)
            .max()
    }
}

/// A connection counted in `Shared::reserved` from the decision to open it until it ends.
struct Reservation(Arc<Shared>);

impl Reservation {
    fn new(shared: &Arc<Shared>) -> Self {
        shared.reserved.fetch_add(1, Ordering::AcqRel);
        Reservation(shared.clone())
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        self.0.reserved.fetch_sub(1, Ordering::AcqRel);
    }
}

#[derive(Default)]
struct DestState {
    conns: Vec<Arc<Conn>>,
    /// Connect attempts in progress.
    connecting: usize,
    queued: usize,
    /// When a request last took a stream here: the least recently used idle identity goes first.
    last_used: Option<Instant>,
    /// Requests between finding this entry and leaving `checkout`: it is not idle meanwhile.
    checkouts: usize,
    /// What each client connection holds here (streams and queue places), for fair shares.
    clients: FastMap<SocketAddr, ClientUse>,
}

/// One client connection's stream slots and queue places on one entry.
#[derive(Default, Clone, Copy)]
struct ClientUse {
    /// Stream slots plus queue places.
    holds: usize,
    queued: usize,
    /// Queue places this client must give up for clients under their share.
    evict: usize,
}

/// A client's standing against its fair share (`DestState::fairness`).
#[derive(Clone, Copy)]
struct Standing {
    yields: bool,
    under_share: bool,
    displaceable: bool,
    evicted: bool,
    /// The waiting client over its share that would give up a queue place for this one.
    victim: Option<SocketAddr>,
}

impl DestState {
    fn hold(&mut self, client: SocketAddr, queued: bool) {
        let u = self.clients.entry(client).or_default();
        u.holds += 1;
        u.queued += usize::from(queued);
    }

    fn release(&mut self, client: SocketAddr, queued: bool) {
        if let Some(u) = self.clients.get_mut(&client) {
            u.holds = u.holds.saturating_sub(1);
            u.queued = u.queued.saturating_sub(usize::from(queued));
            if u.queued == 0 {
                u.evict = 0;
            }
            if u.holds == 0 {
                self.clients.remove(&client);
            }
        }
    }

    /// `client`'s standing against its fair share of this entry's stream slots and queue
    /// (`decision::shares`): sources (client IP addresses) share them first, then the
    /// connections of each source share its part, so a source gets one share however many
    /// connections it opens. It yields a freed slot when it holds its share or more while a
    /// client under its share waits; it may take a queue place only under its share, and in a
    /// full queue turn away a waiting request of a client over its share. Only worked out when
    /// requests wait.
    fn fairness(&self, client: Option<SocketAddr>, in_queue: bool, max_queued: usize) -> Standing {
        let free = Standing {
            yields: false,
            under_share: true,
            displaceable: false,
            evicted: false,
            victim: None,
        };
        let Some(client) = client else {
            return free;
        };
        // Told to give up its place (by this shard or another's), whatever else holds.
        let evicted = in_queue && self.clients.get(&client).is_some_and(|u| u.evict > 0);
        if self.queued <= usize::from(in_queue) {
            return Standing { evicted, ..free };
        }
        let mine = self.clients.get(&client).copied().unwrap_or_default();
        let others = self.clients.len() - usize::from(mine.holds > 0);
        if others == 0 {
            return Standing { evicted, ..free };
        }
        // Each source's holds and connections holding any.
        let mut sources: FastMap<IpAddr, (usize, usize)> = FastMap::default();
        for (c, u) in &self.clients {
            let e = sources.entry(c.ip()).or_default();
            e.0 += u.holds;
            e.1 += 1;
        }
        let src = client.ip();
        let newcomer = mine.holds == 0;
        let n_sources = sources.len() + usize::from(!sources.contains_key(&src));
        let capacity = self
            .conns
            .iter()
            .filter(|c| c.open.load(Ordering::Acquire))
            .map(|c| c.link.capacity())
            .sum::<usize>()
            + max_queued;
        let shares_of = |ip: IpAddr| {
            let conns = sources.get(&ip).map_or(0, |s| s.1) + usize::from(ip == src && newcomer);
            shares(capacity, n_sources, conns)
        };
        let holds_of = |c: &SocketAddr, u: &ClientUse| Holds {
            conn: u.holds,
            source: sources.get(&c.ip()).map_or(u.holds, |s| s.0),
        };
        let own = usize::from(in_queue && mine.holds > 0);
        let held = holds_of(&client, &mine);
        let held = Holds {
            conn: held.conn - own,
            source: held.source.saturating_sub(own),
        };
        let under_share = held.under(shares_of(src));
        let waiting_others = || {
            self.clients
                .iter()
                .filter(|(c, u)| **c != client && u.queued > 0)
        };
        // A waiting client's holds count its waiting request: without it, is it under?
        let waits_under = |c: &SocketAddr, u: &ClientUse| {
            let h = holds_of(c, u);
            Holds {
                conn: h.conn - 1,
                source: h.source - 1,
            }
            .under(shares_of(c.ip()))
        };
        let victim = if under_share {
            // The waiting client over its share whose source holds most, then itself.
            waiting_others()
                .filter(|(c, u)| u.queued > u.evict && holds_of(c, u).over(shares_of(c.ip())))
                .max_by_key(|(c, u)| (holds_of(c, u).source, u.holds))
                .map(|(c, _)| *c)
        } else {
            None
        };
        Standing {
            yields: !under_share && waiting_others().any(|(c, u)| waits_under(c, u)),
            under_share,
            displaceable: victim.is_some(),
            evicted,
            victim,
        }
    }

    /// Tells `victim` (a waiting client over its share) to give up a queue place.
    fn displace(&mut self, victim: Option<SocketAddr>) {
        if let Some(u) = victim.and_then(|v| self.clients.get_mut(&v)) {
            u.evict += 1;
        }
    }

    /// Nothing in flight, waiting or connecting: the entry can go without anyone noticing.
    fn idle(&self) -> bool {
        self.checkouts == 0
            && self.connecting == 0
            && self.queued == 0
            && self
                .conns
                .iter()
                .all(|c| c.in_flight.load(Ordering::SeqCst) == 0)
    }
}

/// One key in one shard.
struct Dest {
    key: PoolKey,
    shared: Arc<Shared>,
    /// Locked before `shared.health` when both are held, never after.
    state: Mutex<DestState>,
    changed: Notify,
    /// Requests waiting on `changed`; a freed stream slot wakes nobody when there are none.
    waiting: AtomicUsize,
}

impl Dest {
    /// Whether this shard's entry (`queued_here` waiting) is under its part of the shared queue
    /// and another shard's entry for this key over it (a part: `max_queued` over the shards
    /// queueing, this one counted); with `evict`, tells the waiting client holding most there to
    /// give up a place, and says whether there was one. Without `evict` it runs under this
    /// entry's lock, so it reads the other entries' queues from their counters and takes no
    /// lock but a `try_lock` of the list; with `evict` the caller holds no lock of this entry.
    fn over_part_elsewhere(&self, max_queued: usize, queued_here: usize, evict: bool) -> bool {
        let list = if evict {
            Some(self.shared.dests.lock().unwrap_or_else(|p| p.into_inner()))
        } else {
            self.shared.dests.try_lock().ok()
        };
        let Some(list) = list else {
            return false;
        };
        let others: Vec<Arc<Dest>> = list
            .iter()
            .filter_map(Weak::upgrade)
            .filter(|d| !std::ptr::eq(Arc::as_ptr(d), self))
            .collect();
        drop(list);
        let queued = |d: &Dest| d.waiting.load(Ordering::Acquire);
        let queueing = others.iter().filter(|d| queued(d) > 0).count() + 1;
        let part = (max_queued / queueing).max(1);
        if queued_here >= part {
            // This shard holds its part already.
            return false;
        }
        let Some(over) = others
            .iter()
            .filter(|d| queued(d) > part)
            .max_by_key(|d| queued(d))
        else {
            return false;
        };
        if !evict {
            return true;
        }
        let mut st = over.lock();
        let victim = st
            .clients
            .iter_mut()
            .filter(|(_, u)| u.queued > u.evict)
            .max_by_key(|(_, u)| u.holds);
        let Some((_, u)) = victim else {
            return false;
        };
        u.evict += 1;
        drop(st);
        over.changed.notify_waiters();
        true
    }

    fn lock(&self) -> MutexGuard<'_, DestState> {
        // A panic while holding this lock cannot leave the state half-written in a harmful way.
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn health(&self) -> MutexGuard<'_, Health> {
        self.shared.health.lock()
    }
}

/// A request slot on a connection (an HTTP/2 stream), held from request start until the
/// response body ends.
pub struct Lease {
    conn: Arc<Conn>,
    dest: Arc<Dest>,
    /// The client connection the slot is counted against (its fair share).
    client: Option<SocketAddr>,
}

impl Lease {
    pub fn conn_id(&self) -> u64 {
        self.conn.id
    }

    pub fn route(&self) -> &Route {
        &self.conn.route
    }

    /// The connection's request side.
    pub(super) fn link(&self) -> &Link {
        &self.conn.link
    }

    /// Takes the connection out of rotation (GOAWAY seen, or it failed): streams on it finish,
    /// new ones go elsewhere.
    pub fn retire(&self) {
        self.conn.retire("it failed or the origin sent GOAWAY");
        self.dest.changed.notify_waiters();
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        // SeqCst pairs with `QueueSlot::new`: either a new waiter sees this slot free when it
        // checks again, or this sees the waiter and wakes it.
        if self.conn.in_flight.fetch_sub(1, Ordering::SeqCst) == 1
            && !self.conn.open.load(Ordering::SeqCst)
        {
            // Retired, and this was its last request: it closes now.
            self.conn.close.cancel();
        }
        if let Some(client) = self.client {
            self.dest.lock().release(client, false);
        }
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

/// A place in the wait queue (counted in the shard's and the shared `queued`); decrements the
/// counts however the wait ends.
struct QueueSlot<'a>(&'a Dest, Option<SocketAddr>);

impl<'a> QueueSlot<'a> {
    /// Counts a place in `st` (`dest`'s state, locked by the caller) and the shared count.
    fn new(dest: &'a Dest, st: &mut DestState, client: Option<SocketAddr>) -> Self {
        st.queued += 1;
        if let Some(c) = client {
            st.hold(c, true);
        }
        dest.waiting.fetch_add(1, Ordering::SeqCst);
        dest.shared.queued.fetch_add(1, Ordering::AcqRel);
        QueueSlot(dest, client)
    }
}

impl Drop for QueueSlot<'_> {
    fn drop(&mut self) {
        self.0.waiting.fetch_sub(1, Ordering::SeqCst);
        self.0.shared.queued.fetch_sub(1, Ordering::AcqRel);
        let mut st = self.0.lock();
        st.queued -= 1;
        if let Some(c) = self.1 {
            st.release(c, true);
        }
    }
}

/// A connect attempt in progress; `probe` when it is the one attempt made while the destination
/// is down. However it ends (done, or the relay shutting down), it clears the flags and wakes
/// every request that may be waiting for it, in every shard.
struct ConnectingGuard<'a> {
    dest: &'a Dest,
    probe: bool,
}

impl Drop for ConnectingGuard<'_> {
    fn drop(&mut self) {
        let mut st = self.dest.lock();
        st.connecting = st.connecting.saturating_sub(1);
        if self.probe {
            self.dest.health().probing = false;
        }
        drop(st);
        self.dest.changed.notify_waiters();
        self.dest.shared.health.changed.notify_waiters();
    }
}

/// The upstream pool. Cheap to clone.
#[derive(Clone)]
pub struct Pool {
    inner: Arc<Inner>,
}

struct Inner {
    kind: LinkKind,
    /// Limits per destination (and identity), over all shards.
    settings: PoolSettings,
    /// One map per shard (worker thread).
    dests: Vec<Mutex<FastMap<PoolKey, Arc<Dest>>>>,
    /// What the shards share; locked after a shard's map, never before.
    registry: Mutex<Registry>,
    next_id: AtomicU64,
    /// Bumped whenever a connection opens or ends: for metrics and tests that wait on it.
    events: watch::Sender<u64>,
    /// Cancelled at shutdown: every connection driver closes its connection.
    closing: CancellationToken,
    metrics: Arc<Metrics>,
}

/// Each key's `Shared` and each destination's `Health`, held by the shards' entries; gone when
/// they all are. Token identities admitted per destination.
#[derive(Default)]
struct Registry {
    shared: FastMap<PoolKey, Weak<Shared>>,
    health: FastMap<PoolKey, Weak<HealthCell>>,
    tokens: FastMap<Authority, Admissions>,
}

/// The token identities towards one destination, and the bucket new ones are admitted from.
struct Admissions {
    members: Vec<Arc<Shared>>,
    /// New identities that may be admitted now (refilled at `per_minute`, at most that many).
    allowance: f64,
    refilled: Instant,
}

impl Admissions {
    fn new(per_minute: u32, now: Instant) -> Self {
        Admissions {
            members: Vec::new(),
            allowance: f64::from(per_minute.max(1)),
            refilled: now,
        }
    }

    fn refill(&mut self, per_minute: u32, now: Instant) {
        let cap = f64::from(per_minute.max(1));
        let elapsed = now.saturating_duration_since(self.refilled).as_secs_f64();
        self.allowance = (self.allowance + elapsed * cap / 60.0).min(cap);
        self.refilled = now;
    }
}

/// Whether `key` is a token (JWT) identity: those come from unverified claims, so they are
/// bounded and rate-limited; certificate identities come from the configuration.
fn is_token_identity(key: &PoolKey) -> bool {
    key.identity
        .as_deref()
        .is_some_and(|i| i.starts_with("jwt:"))
}

/// The key whose `Health` `key` uses: token identities share their destination's.
fn health_key(key: &PoolKey) -> PoolKey {
    if is_token_identity(key) {
        PoolKey {
            dest: key.dest.clone(),
            identity: None,
        }
    } else {
        key.clone()
    }
}

/// What the pool holds for one destination, for metrics and tests.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DestStats {
    pub open_connections: usize,
    pub streams_in_flight: usize,
    /// Requests waiting for a stream (or a connect).
    pub queued: usize,
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
    /// HTTP/2 connections to the origins, on the client `settings.http2_client` names; `tls`
    /// maps each identity (None: anonymous) to the client config that presents it.
    pub fn new(
        connector: Connector,
        tls: HashMap<Option<Arc<str>>, Arc<ClientConfig>>,
        settings: PoolSettings,
        metrics: Arc<Metrics>,
    ) -> Self {
        let setup = Self::origin_setup(connector, tls, &settings, &metrics);
        let kind = match settings.http2_client {
            Http2Client::H2 => LinkKind::H2(Box::new(H2Kind::new(setup))),
            Http2Client::Native => LinkKind::Native(Box::new(NativeKind::new(setup))),
        };
        Self::of_kind(kind, settings, metrics)
    }

    fn origin_setup(
        connector: Connector,
        tls: HashMap<Option<Arc<str>>, Arc<ClientConfig>>,
        settings: &PoolSettings,
        metrics: &Arc<Metrics>,
    ) -> OriginSetup {
        OriginSetup {
            connector,
            tls,
            keepalive_interval: settings.keepalive_interval,
            keepalive_timeout: settings.keepalive_timeout,
            metrics: metrics.clone(),
        }
    }

    /// HTTP/1.1 connections to a relay chain's DMZ relay, whatever the destination.
    pub fn chain(kind: ChainKind, settings: PoolSettings, metrics: Arc<Metrics>) -> Self {
        Self::of_kind(LinkKind::Chain(kind), settings, metrics)
    }

    fn of_kind(kind: LinkKind, settings: PoolSettings, metrics: Arc<Metrics>) -> Self {
        let shards = settings.shards.max(1);
        Pool {
            inner: Arc::new(Inner {
                kind,
                settings,
                dests: (0..shards)
                    .map(|_| Mutex::new(FastMap::default()))
                    .collect(),
                registry: Mutex::new(Registry::default()),
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
        if let Some(d) = dests.get(key)
            && !d.shared.evicted.load(Ordering::Acquire)
        {
            d.lock().checkouts += 1;
            return Ok(d.clone());
        }
        // New in this shard (or its identity was dropped and is back): entries are made rarely,
        // so drop the dropped identities' entries now.
        dests.retain(|_, d| !d.shared.evicted.load(Ordering::Acquire));
        let shared = self.shared(key)?;
        let dest = Arc::new(Dest {
            key: key.clone(),
            shared: shared.clone(),
            state: Mutex::new(DestState {
                checkouts: 1,
                ..DestState::default()
            }),
            changed: Notify::new(),
            waiting: AtomicUsize::new(0),
        });
        shared
            .dests
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(Arc::downgrade(&dest));
        dests.insert(key.clone(), dest.clone());
        Ok(dest)
    }

    /// What the shards share for `key`, made (and a token identity admitted) when none has it.
    fn shared(&self, key: &PoolKey) -> Result<Arc<Shared>, PoolError> {
        let mut reg = self
            .inner
            .registry
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if let Some(s) = reg.shared.get(key).and_then(Weak::upgrade)
            && !s.evicted.load(Ordering::Acquire)
        {
            return Ok(s);
        }
        if is_token_identity(key) {
            self.admit(&mut reg, key)?;
        }
        reg.shared.retain(|_, s| s.strong_count() > 0);
        reg.health.retain(|_, h| h.strong_count() > 0);
        let hkey = health_key(key);
        let health = match reg.health.get(&hkey).and_then(Weak::upgrade) {
            Some(h) => h,
            None => {
                let h = Arc::new(HealthCell::default());
                reg.health.insert(hkey, Arc::downgrade(&h));
                h
            }
        };
        let shared = Arc::new(Shared {
            key: key.clone(),
            health,
            reserved: AtomicUsize::new(0),
            queued: AtomicUsize::new(0),
            dests: Mutex::new(Vec::new()),
            evicted: AtomicBool::new(false),
            close: self.inner.closing.child_token(),
            generation: AtomicU64::new(0),
        });
        reg.shared.insert(key.clone(), Arc::downgrade(&shared));
        if is_token_identity(key)
            && let Some(adm) = reg.tokens.get_mut(&key.dest)
        {
            adm.members.push(shared.clone());
        }
        Ok(shared)
    }

    /// Lets a new token identity towards `key.dest` in: at most `max_identities` of them (the
    /// least recently used idle one is dropped, its connections closed, to make room; with none
    /// idle, the new one is refused), and at most `new_identities_per_minute` new ones.
    fn admit(&self, reg: &mut Registry, key: &PoolKey) -> Result<(), PoolError> {
        let settings = &self.inner.settings;
        let (max, per_minute) = (settings.max_identities, settings.new_identities_per_minute);
        let now = Instant::now();
        let adm = reg
            .tokens
            .entry(key.dest.clone())
            .or_insert_with(|| Admissions::new(per_minute, now));
        adm.members.retain(|s| !s.evicted.load(Ordering::Acquire));
        let victim = if adm.members.len() >= max {
            let idle = adm
                .members
                .iter()
                .enumerate()
                .filter(|(_, s)| s.idle())
                .min_by_key(|(_, s)| s.last_used())
                .map(|(i, _)| i);
            match idle {
                Some(i) => Some(i),
                None => {
                    return Err(PoolError::TooManyIdentities {
                        dest: key.dest.to_string(),
                        max,
                    });
                }
            }
        } else {
            None
        };
        adm.refill(per_minute, now);
        if adm.allowance < 1.0 {
            return Err(PoolError::IdentityRate {
                dest: key.dest.to_string(),
                per_minute,
            });
        }
        adm.allowance -= 1.0;
        if let Some(i) = victim {
            let gone = adm.members.swap_remove(i);
            gone.evicted.store(true, Ordering::Release);
            gone.close.cancel();
            tracing::info!(
                upstream.authority = %gone.key.dest,
                upstream.identity = gone.key.identity.as_deref().unwrap_or(""),
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

    /// Drains every connection of `identity`, in every shard: they take no new requests,
    /// finish what they carry and close; new requests open new connections (which present the
    /// identity's certificate as it is now). For a renewed identity certificate.
    pub fn drain_identity(&self, identity: &str) {
        let drained = self.drain_where(|key| key.identity.as_deref() == Some(identity));
        tracing::info!(
            upstream.identity = identity,
            connections = drained,
            "identity certificate renewed: its upstream connections drain"
        );
    }

    /// Drains every connection, in every shard, as `drain_identity` drains one identity's: for
    /// a renewed certificate that every connection presents (`upstream.relay.client_cert`).
    pub fn drain_all(&self) -> usize {
        self.drain_where(|_| true)
    }

    /// Retires the connections of every key `which` picks; gives how many were open.
    fn drain_where(&self, which: impl Fn(&PoolKey) -> bool) -> usize {
        let mut drained = 0;
        for shard in &self.inner.dests {
            let dests: Vec<Arc<Dest>> = shard
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .values()
                .filter(|d| which(&d.key))
                .cloned()
                .collect();
            for d in dests {
                d.shared.generation.fetch_add(1, Ordering::AcqRel);
                // A failure the old certificate caused may be gone: the next request tries.
                {
                    let mut health = d.health();
                    *health = Health {
                        finished: health.finished,
                        probing: health.probing,
                        ..Health::default()
                    };
                }
                for conn in d.lock().conns.iter() {
                    if conn.open.load(Ordering::Acquire) {
                        drained += 1;
                    }
                    conn.retire("its certificate was renewed");
                }
                d.changed.notify_waiters();
            }
        }
        self.inner.events.send_modify(|n| *n += 1);
        drained
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
                if d.shared.evicted.load(Ordering::Acquire) {
                    continue;
                }
                let st = d.lock();
                let e = by_key.entry(d.key.clone()).or_insert(DestStats {
                    open_connections: 0,
                    streams_in_flight: 0,
                    queued: 0,
                });
                e.queued += st.queued;
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
                let connecting = d.lock().connecting > 0;
                let h = d.health();
                let e = by_key.entry(d.key.clone()).or_insert_with(|| DestHealth {
                    connecting: false,
                    failures: h.failures,
                    down_since: h.down_since_wall,
                    retry_in: h.retry_at.map(|at| at.saturating_duration_since(now)),
                    last_error: h.last_error.clone(),
                });
                e.connecting |= connecting;
            }
        }
        by_key.into_iter().collect()
    }

    /// A stream slot towards `key`. Starts a connect when every open connection is full (the
    /// connect runs on its own: this request leaving does not cancel it), and waits, bounded by
    /// the queue size, `reconnect_wait` while the destination is down, and `deadline`.
    pub async fn checkout(&self, key: &PoolKey, deadline: Instant) -> Result<Lease, PoolError> {
        self.checkout_for(key, None, deadline).await
    }

    /// As `checkout`, for a request of client connection `client`: each client connection gets a
    /// fair share of the destination's stream slots and queue while requests wait (freed slots
    /// go first to the clients holding least), so one client cannot take them from the others.
    pub async fn checkout_for(
        &self,
        key: &PoolKey,
        client: Option<SocketAddr>,
        deadline: Instant,
    ) -> Result<Lease, PoolError> {
        let dest = self.dest(key)?;
        let _checkout = Checkout(&dest);
        let settings = &self.inner.settings;
        let limits = Limits {
            max_connections: settings.max_connections,
            max_queued: settings.max_queued,
            reconnect_wait: settings.reconnect_wait,
            connect_brings: self.inner.kind.connect_brings(),
        };
        let mut slot: Option<QueueSlot<'_>> = None;
        // `Health::finished` when this request started a connect: it waits for that to move.
        let mut awaiting: Option<u64> = None;
        // Listening for changes costs a lock per signal: only once this request has to wait
        // (it then looks again, listening, so nothing between the looks is missed).
        let mut listening = false;
        loop {
            let mut changed = pin!(dest.changed.notified());
            let mut health_changed = pin!(dest.shared.health.changed.notified());
            if listening {
                changed.as_mut().enable();
                health_changed.as_mut().enable();
            }
            let wake_at = {
                let mut st = dest.lock();
                st.conns.retain(|c| {
                    c.open.load(Ordering::Acquire) || c.in_flight.load(Ordering::Acquire) > 0
                });
                let standing = st.fairness(client, slot.is_some(), settings.max_queued);
                let mut health = dest.health();
                let view = View {
                    room: st.conns.iter().position(|c| c.has_room()),
                    open: st
                        .conns
                        .iter()
                        .filter(|c| c.open.load(Ordering::Acquire))
                        .count(),
                    reserved: dest.shared.reserved.load(Ordering::Acquire),
                    connecting: st.connecting,
                    waiting_here: st.queued,
                    queued: dest.shared.queued.load(Ordering::Acquire),
                    in_queue: slot.is_some(),
                    failures: health.failures,
                    retry_at: health.retry_at,
                    last_error: health.last_error.as_ref(),
                    lasting: health.last_error.as_ref().is_some_and(|e| e.is_lasting()),
                    down_since: health.down_since,
                    probing: health.probing,
                    awaiting: awaiting == Some(health.finished),
                    yields: standing.yields,
                    under_share: standing.under_share,
                    displaceable: standing.displaceable,
                    // Looked at only when it can matter: the queue full, this request under its
                    // share and no one to turn away in this shard.
                    over_part_elsewhere: slot.is_none()
                        && standing.under_share
                        && !standing.displaceable
                        && dest.shared.queued.load(Ordering::Acquire) >= settings.max_queued
                        && dest.over_part_elsewhere(settings.max_queued, st.queued, false),
                    evicted: standing.evicted,
                    now: Instant::now(),
                };
                match decide(&view, limits) {
                    Decision::Use(i) => {
                        let conn = st.conns[i].clone();
                        conn.in_flight.fetch_add(1, Ordering::AcqRel);
                        st.last_used = Some(view.now);
                        if let Some(c) = client {
                            st.hold(c, false);
                        }
                        return Ok(Lease {
                            conn,
                            dest: dest.clone(),
                            client,
                        });
                    }
                    Decision::Down { error, retry_in } => {
                        let (dest, source) = (key.dest.to_string(), error.clone());
                        return Err(match (awaiting, retry_in) {
                            // It waited for an attempt and saw it (or the ones after) fail.
                            (Some(_), _) => PoolError::Connect { dest, source },
                            (None, Some(remaining)) => PoolError::BackingOff {
                                dest,
                                remaining,
                                source,
                            },
                            (None, None) => PoolError::Reconnecting { dest, source },
                        });
                    }
                    Decision::QueueFull => {
                        if standing.evicted
                            && let Some(u) = client.and_then(|c| st.clients.get_mut(&c))
                        {
                            u.evict -= 1;
                        }
                        return Err(PoolError::QueueFull {
                            dest: key.dest.to_string(),
                            queued: view.queued,
                        });
                    }
                    Decision::Enqueue => {
                        drop(health);
                        slot = Some(QueueSlot::new(&dest, &mut st, client));
                        listening = true;
                        continue;
                    }
                    Decision::Displace => {
                        drop(health);
                        let here = standing.victim.is_some();
                        st.displace(standing.victim);
                        let queued_here = st.queued;
                        slot = Some(QueueSlot::new(&dest, &mut st, client));
                        drop(st);
                        if here {
                            dest.changed.notify_waiters();
                        } else if !dest.over_part_elsewhere(settings.max_queued, queued_here, true)
                        {
                            // No locks of this entry held: the other shard's may be taken. Nobody
                            // there gives up a place after all: the queue is full (the place
                            // taken goes with `slot`).
                            return Err(PoolError::QueueFull {
                                dest: key.dest.to_string(),
                                queued: dest.shared.queued.load(Ordering::Acquire),
                            });
                        }
                        continue;
                    }
                    Decision::Connect { probe } => {
                        st.connecting += 1;
                        health.probing = probe;
                        awaiting = Some(health.finished);
                        let reservation = Reservation::new(&dest.shared);
                        drop(health);
                        drop(st);
                        self.start_connect(dest.clone(), probe, reservation);
                        continue;
                    }
                    Decision::Wait { .. } if !listening => {
                        listening = true;
                        continue;
                    }
                    Decision::Wait { wake_at } => wake_at,
                }
            };
            let until = wake_at.map_or(deadline, |at| at.min(deadline));
            let woken = timeout_at(until, async {
                tokio::select! {
                    _ = changed => {}
                    _ = health_changed => {}
                }
            })
            .await;
            if woken.is_err() && Instant::now() >= deadline {
                let health = dest.health();
                let dest_name = key.dest.to_string();
                return Err(match &health.last_error {
                    Some(source) => PoolError::Connect {
                        dest: dest_name,
                        source: source.clone(),
                    },
                    None if dest.lock().connecting > 0 => PoolError::Connecting { dest: dest_name },
                    None => PoolError::WaitTimeout { dest: dest_name },
                });
            }
        }
    }

    /// Runs a connect for `dest` (counted in its `connecting`, and `probing` when `probe`, by the caller
    /// set) as a task of its own: the destination owns it, whoever asked for it may leave.
    fn start_connect(&self, dest: Arc<Dest>, probe: bool, reservation: Reservation) {
        let pool = self.clone();
        tokio::spawn(async move {
            let closing = pool.inner.closing.clone();
            tokio::select! {
                () = pool.connect(&dest, probe, reservation) => {}
                () = closing.cancelled() => {}
            }
        });
    }

    /// One connect attempt, bounded as a whole by `connect_timeout`, and its outcome recorded:
    /// the connection joins the entry, or the failure sets the back-off, with a log line naming
    /// the hop and a metric.
    async fn connect(&self, dest: &Arc<Dest>, probe: bool, reservation: Reservation) {
        // Declared first, dropped last: wakes the waiters once the outcome is recorded.
        let _guard = ConnectingGuard { dest, probe };
        let key = &dest.key;
        let deadline = Instant::now() + self.inner.settings.connect_timeout;
        let generation = dest.shared.generation.load(Ordering::Acquire);
        let result = self.open(dest, deadline, reservation).await;
        let mut st = dest.lock();
        let mut health = dest.health();
        let finished = health.finished + 1;
        let now = Instant::now();
        match result {
            Ok(conn) => {
                *health = Health {
                    finished,
                    failures_before: health.failures,
                    ..Health::default()
                };
                if dest.shared.generation.load(Ordering::Acquire) == generation {
                    st.conns.push(conn);
                } else {
                    conn.retire("opened before its identity certificate was renewed");
                }
            }
            Err(e) => {
                health.finished = finished;
                self.mark_failed(key, &mut health, e, now);
            }
        }
    }

    /// A connect to `key` failed with `e`: the destination is down, and backs off.
    fn mark_failed(&self, key: &PoolKey, health: &mut Health, e: ConnectError, now: Instant) {
        health.failures = health.failures.saturating_add(1);
        health.down_since_wall.get_or_insert_with(SystemTime::now);
        let down_since = *health.down_since.get_or_insert(now);
        let settings = &self.inner.settings;
        // Only what a retry may fix is ridden out at the base delay.
        if now < down_since + settings.reconnect_wait && !e.is_lasting() {
            health.riding_out += 1;
        }
        let steps = (health.failures - health.riding_out).max(1);
        let delay = backoff_delay(settings, steps, random_jitter());
        health.retry_at = Some(now + delay);
        self.record_failure(&e);
        let e = Arc::new(e);
        health.last_error = Some(e.clone());
        tracing::warn!(
            upstream.authority = %key.dest,
            upstream.hop = e.hop(),
            proxy.status = e_proxy_status(&e),
            retry_in_ms = delay.as_millis() as u64,
            down_for_ms = now.saturating_duration_since(down_since).as_millis() as u64,
            lasting = e.is_lasting(),
            error = %e,
            "upstream connect failed"
        );
    }

    /// `lease`'s connection turned out refused at its first exchange (a DMZ relay's TLS 1.3
    /// refusing our client certificate, which it says only at the first read): the connect
    /// failed after all. The connection is retired and the destination backs off as after any
    /// failed connect, so that the requests after it fail fast instead of each costing the far
    /// end a handshake.
    pub fn connect_refused(&self, lease: &Lease, e: ConnectError) {
        lease.retire();
        let dest = &lease.dest;
        let mut health = dest.health();
        health.failures = health.failures.max(health.failures_before);
        self.mark_failed(&dest.key, &mut health, e, Instant::now());
        drop(health);
        dest.shared.health.changed.notify_waiters();
    }

    fn record_failure(&self, e: &ConnectError) {
        let metrics = &self.inner.metrics;
        metrics.connect_failure(e.hop());
        if let Some(t) = e.tunnel() {
            metrics.proxy_failure(&match t {
                TunnelError::Refused { status, .. } => status.to_string(),
                TunnelError::ConnectTimeout { .. } | TunnelError::ReplyTimeout { .. } => {
                    "timeout".into()
                }
                TunnelError::Connect { .. } => "unreachable".into(),
                _ => "malformed".into(),
            });
        } else if e.is_tls() && !e.is_timeout() {
            metrics.tls_failure("upstream");
        }
    }

    /// Opens a connection of the pool's kind by `deadline`, and watches for its end.
    async fn open(
        &self,
        dest: &Arc<Dest>,
        deadline: Instant,
        reservation: Reservation,
    ) -> Result<Arc<Conn>, ConnectError> {
        let key = &dest.key;
        let close = dest.shared.close.child_token();
        let Opened { link, route, ended } = self
            .inner
            .kind
            .open(&key.dest, &key.identity, deadline, close.clone())
            .await?;
        let conn = Arc::new(Conn {
            id: self.inner.next_id.fetch_add(1, Ordering::Relaxed),
            link,
            in_flight: AtomicUsize::new(0),
            open: AtomicBool::new(true),
            route,
            close,
            retired: std::sync::OnceLock::new(),
        });
        tokio::spawn(watch_end(
            ended,
            conn.clone(),
            dest.clone(),
            self.inner.clone(),
            reservation,
        ));
        self.inner.events.send_modify(|n| *n += 1);
        tracing::info!(
            upstream.authority = %key.dest,
            upstream.conn = conn.id,
            upstream.route = ?conn.route,
            upstream.max_streams = conn.link.capacity(),
            "upstream connection ready"
        );
        Ok(conn)
    }
}

fn e_proxy_status(e: &ConnectError) -> Option<u16> {
    e.tunnel().and_then(TunnelError::proxy_status)
}

/// Waits for a connection's driver to say it ended (the reservation held until then), then
/// takes the connection out of rotation and wakes whoever waits for a change.
async fn watch_end(
    ended: oneshot::Receiver<Option<String>>,
    conn: Arc<Conn>,
    dest: Arc<Dest>,
    pool: Arc<Inner>,
    _reservation: Reservation,
) {
    let reason = match ended.await {
        Ok(Some(why)) => why,
        Ok(None) if pool.closing.is_cancelled() => "relay shutting down".to_owned(),
        Ok(None) if let Some(why) = conn.retired.get() => {
            format!("retired ({why}) and done with its last request")
        }
        Ok(None) => {
            "its identity was dropped (idle, over upstream.max_token_identities)".to_owned()
        }
        Err(_) => "its driver stopped".to_owned(),
    };
    conn.open.store(false, Ordering::Release);
    dest.changed.notify_waiters();
    pool.events.send_modify(|n| *n += 1);
    tracing::info!(upstream.authority = %dest.key.dest, upstream.conn = conn.id, reason = %reason, "upstream connection ended");
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings() -> PoolSettings {
        PoolSettings {
            max_connections: 4,
            max_queued: 10,
            max_identities: 8,
            new_identities_per_minute: 60,
            reconnect_wait: Duration::from_secs(5),
            keepalive_interval: Duration::from_secs(30),
            keepalive_timeout: Duration::from_secs(10),
            connect_timeout: Duration::from_secs(10),
            backoff_base: Duration::from_secs(1),
            backoff_max: Duration::from_secs(60),
            shards: 1,
            http2_client: Http2Client::Native,
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
