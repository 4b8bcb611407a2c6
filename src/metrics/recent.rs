//! The status page's data: what the relay did over the last minutes (requests, errors and latency
//! per listener and destination, relay errors by reason), certificate expiries and the
//! configuration's load history, kept from the events metrics already see; and the `Snapshot` the
//! admin listener renders (`crate::status`) as HTML or JSON. Part of `metrics`, a leaf: it knows
//! none of the relay's types, and a request costs it a few atomic adds on counters the worker
//! already holds.
//!
//! Counts live in one slot per minute for the last hour. A slot is reset by the first event of a
//! new minute; an event racing that reset may be lost, which a status page can afford.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::Serialize;

/// Minutes of history kept.
pub const HISTORY_MINUTES: u64 = 60;
/// The short window: requests, errors, latency and relay errors "now".
pub const RECENT_MINUTES: u64 = 5;
/// Certificates expiring within this many days are flagged.
pub const EXPIRY_WARNING_DAYS: i64 = 30;

/// Latency buckets: bucket `i` holds durations up to 0.25 ms × 2^(i/4), about 19 % apart, up to
/// about 4.4 minutes; the last one holds everything longer.
const LATENCY_BUCKETS: usize = 80;
const FIRST_BOUND_MS: f64 = 0.25;

fn bucket_bound_ms(i: usize) -> f64 {
    FIRST_BOUND_MS * 2f64.powf(i as f64 / 4.0)
}

fn latency_bucket(elapsed: Duration) -> usize {
    let ms = elapsed.as_secs_f64() * 1000.0;
    if ms <= FIRST_BOUND_MS {
        return 0;
    }
    let i = ((ms / FIRST_BOUND_MS).log2() * 4.0).ceil() as usize;
    i.min(LATENCY_BUCKETS - 1)
}

/// One minute's counters.
struct Slot<const N: usize> {
    minute: AtomicU64,
    counts: [AtomicU64; N],
}

/// The last hour of `N` counters, a slot per minute.
struct Ring<const N: usize> {
    slots: Vec<Slot<N>>,
}

impl<const N: usize> Ring<N> {
    fn new() -> Self {
        Ring {
            slots: (0..HISTORY_MINUTES)
                .map(|_| Slot {
                    // u64::MAX: never used, so the first event of any minute claims it.
                    minute: AtomicU64::new(u64::MAX),
                    counts: std::array::from_fn(|_| AtomicU64::new(0)),
                })
                .collect(),
        }
    }

    /// Adds one to each counter in `which` for `minute`.
    fn add(&self, minute: u64, which: &[usize]) {
        let slot = &self.slots[(minute % HISTORY_MINUTES) as usize];
        let seen = slot.minute.load(Ordering::Acquire);
        if seen != minute {
            let newer = seen == u64::MAX || seen < minute;
            if newer
                && slot
                    .minute
                    .compare_exchange(seen, minute, Ordering::AcqRel, Ordering::Acquire)
                    .is_ok()
            {
                for c in &slot.counts {
                    c.store(0, Ordering::Relaxed);
                }
            } else if slot.minute.load(Ordering::Acquire) != minute {
                // A late event for a minute whose slot already moved on.
                return;
            }
        }
        for &i in which {
            slot.counts[i].fetch_add(1, Ordering::Relaxed);
        }
    }

    /// The counters summed over the `minutes` minutes up to and including `now`.
    fn sum(&self, now: u64, minutes: u64) -> [u64; N] {
        let mut total = [0; N];
        for slot in &self.slots {
            let m = slot.minute.load(Ordering::Acquire);
            if m != u64::MAX && m <= now && now - m < minutes {
                for (t, c) in total.iter_mut().zip(&slot.counts) {
                    *t += c.load(Ordering::Relaxed);
                }
            }
        }
        total
    }
}

const REQUESTS: usize = 0;
const ERRORS: usize = 1;
const DEST_COUNTERS: usize = 2 + LATENCY_BUCKETS;

/// A listener's requests and errors.
pub struct ListenerTraffic(Ring<2>);

/// A destination's requests, errors and latency.
pub struct DestinationTraffic(Ring<DEST_COUNTERS>);

/// Where one request is counted: its listener, and its destination when it named an allowed one.
#[derive(Clone)]
pub struct Traffic {
    listener: Arc<ListenerTraffic>,
    destination: Option<Arc<DestinationTraffic>>,
}

/// The minute `at` falls in, counted from the Unix epoch.
fn minute_of(at: SystemTime) -> u64 {
    at.duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() / 60)
}

pub fn unix_seconds(at: SystemTime) -> i64 {
    at.duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

impl Traffic {
    /// Counts an answered request: an error when the status is 4xx or 5xx (pushrelay's own
    /// refusals and the origin's rejections alike).
    pub fn record(&self, status: u16, elapsed: Duration) {
        self.record_at(SystemTime::now(), status, elapsed);
    }

    fn record_at(&self, at: SystemTime, status: u16, elapsed: Duration) {
        let minute = minute_of(at);
        let failed = status >= 400;
        let which: &[usize] = if failed {
            &[REQUESTS, ERRORS]
        } else {
            &[REQUESTS]
        };
        self.listener.0.add(minute, which);
        if let Some(d) = &self.destination {
            // Latency is the origin's: 5xx answers are mostly pushrelay failing fast.
            let bucket = 2 + latency_bucket(elapsed);
            match status {
                500.. => d.0.add(minute, &[REQUESTS, ERRORS]),
                400.. => d.0.add(minute, &[REQUESTS, ERRORS, bucket]),
                _ => d.0.add(minute, &[REQUESTS, bucket]),
            }
        }
    }
}

/// The configuration as loaded, and what the last reload did.
#[derive(Debug, Clone, Default)]
struct ConfigRecord {
    origin: String,
    /// Effective configuration, secrets masked.
    yaml: String,
    loaded_at: Option<SystemTime>,
    last_reload: Option<ReloadRecord>,
}

#[derive(Debug, Clone)]
struct ReloadRecord {
    at: SystemTime,
    error: Option<String>,
}

/// Who holds a certificate: a listener (served or CA), or the upstream side (an identity).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct CertKey {
    holder: String,
    kind: String,
    name: String,
}

/// Everything the status page remembers between requests.
pub struct Book {
    started: SystemTime,
    listeners: Mutex<BTreeMap<String, Arc<ListenerTraffic>>>,
    destinations: Mutex<BTreeMap<String, Arc<DestinationTraffic>>>,
    reasons: Mutex<BTreeMap<String, Arc<Ring<1>>>>,
    certificates: Mutex<BTreeMap<CertKey, i64>>,
    config: Mutex<ConfigRecord>,
}

impl Default for Book {
    fn default() -> Self {
        Book::new()
    }
}

fn locked<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn entry<T>(map: &Mutex<BTreeMap<String, Arc<T>>>, key: &str, new: impl FnOnce() -> T) -> Arc<T> {
    let mut map = locked(map);
    if let Some(v) = map.get(key) {
        return v.clone();
    }
    let v = Arc::new(new());
    map.insert(key.to_owned(), v.clone());
    v
}

impl Book {
    pub fn new() -> Self {
        Book {
            started: SystemTime::now(),
            listeners: Mutex::default(),
            destinations: Mutex::default(),
            reasons: Mutex::default(),
            certificates: Mutex::default(),
            config: Mutex::default(),
        }
    }

    /// The counters for requests on `listener` to `destination` (`""`: none, or a refused one).
    /// Looked up once and kept by the caller: recording through it takes no lock.
    pub fn traffic(&self, listener: &str, destination: &str) -> Traffic {
        Traffic {
            listener: entry(&self.listeners, listener, || ListenerTraffic(Ring::new())),
            destination: (!destination.is_empty()).then(|| {
                entry(&self.destinations, destination, || {
                    DestinationTraffic(Ring::new())
                })
            }),
        }
    }

    /// Counts one of pushrelay's own answers by its reason (`RelayUpstreamUnreachable`, …).
    pub fn relay_error(&self, reason: &str) {
        self.relay_error_at(SystemTime::now(), reason);
    }

    fn relay_error_at(&self, at: SystemTime, reason: &str) {
        entry(&self.reasons, reason, Ring::new).add(minute_of(at), &[0]);
    }

    /// Notes a certificate's expiry (Unix seconds): `holder` is a listener name or `upstream`,
    /// `kind` `served`, `ca` or `identity`. A newer note for the same certificate replaces it.
    pub fn certificate(&self, holder: &str, kind: &str, name: &str, not_after: i64) {
        locked(&self.certificates).insert(
            CertKey {
                holder: holder.to_owned(),
                kind: kind.to_owned(),
                name: name.to_owned(),
            },
            not_after,
        );
    }

    /// Forgets a holder's certificates, before noting the ones a reload built.
    pub fn forget_certificates(&self, holder: &str) {
        locked(&self.certificates).retain(|k, _| k.holder != holder);
    }

    /// Where the configuration comes from (file and environment), for the page's header.
    pub fn config_origin(&self, origin: &str) {
        locked(&self.config).origin = origin.to_owned();
    }

    /// The configuration in use (secrets masked), loaded now; `reload` when it replaced another.
    pub fn config_loaded(&self, yaml: String, reload: bool) {
        let now = SystemTime::now();
        let mut c = locked(&self.config);
        c.yaml = yaml;
        c.loaded_at = Some(now);
        if reload {
            c.last_reload = Some(ReloadRecord {
                at: now,
                error: None,
            });
        }
    }

    /// A reload was refused; the running configuration stays.
    pub fn reload_refused(&self, error: &str) {
        locked(&self.config).last_reload = Some(ReloadRecord {
            at: SystemTime::now(),
            error: Some(error.to_owned()),
        });
    }

    /// The page's data at `now`, from what was recorded and what the caller reads live.
    pub fn snapshot(&self, about: &About, live: &Live, now: SystemTime) -> Snapshot {
        let minute = minute_of(now);
        let config = locked(&self.config).clone();
        let mut certificates: Vec<Certificate> = locked(&self.certificates)
            .iter()
            .map(|(k, &not_after)| Certificate::new(k, not_after, now))
            .collect();
        // The soonest first: that is the one to act on.
        certificates.sort_by_key(|c| c.not_after);
        let listeners = about
            .listeners
            .iter()
            .map(|l| {
                let traffic = locked(&self.listeners).get(&l.name).cloned();
                let window = |minutes| {
                    traffic.as_ref().map_or(Counts::default(), |t| {
                        let [requests, errors] = t.0.sum(minute, minutes);
                        Counts { requests, errors }
                    })
                };
                ListenerStatus {
                    name: l.name.clone(),
                    mode: l.mode.clone(),
                    bind: l.bind.clone(),
                    tls: l.tls.clone(),
                    certificate_expires: certificates
                        .iter()
                        .filter(|c| c.holder == l.name && c.kind == "served")
                        .min_by_key(|c| c.not_after)
                        .map(|c| c.expires.clone()),
                    connections: live.connections.get(&l.name).copied().unwrap_or(0),
                    last_5m: window(RECENT_MINUTES),
                    last_60m: window(HISTORY_MINUTES),
                }
            })
            .collect();
        let destinations = live
            .destinations
            .iter()
            .map(|d| {
                let traffic = locked(&self.destinations).get(&d.name).cloned();
                let sums = traffic
                    .as_ref()
                    .map_or([0; DEST_COUNTERS], |t| t.0.sum(minute, RECENT_MINUTES));
                DestinationStatus {
                    name: d.name.clone(),
                    route: d.route.clone(),
                    connections: d.connections,
                    streams_in_flight: d.streams_in_flight,
                    state: d.state.clone(),
                    last_5m: Counts {
                        requests: sums[REQUESTS],
                        errors: sums[ERRORS],
                    },
                    latency_ms_p50: percentile(&sums[2..], 0.50),
                    latency_ms_p99: percentile(&sums[2..], 0.99),
                }
            })
            .collect();
        let relay_errors = locked(&self.reasons)
            .iter()
            .map(|(reason, ring)| ReasonCount {
                reason: reason.clone(),
                last_5m: ring.sum(minute, RECENT_MINUTES)[0],
                last_60m: ring.sum(minute, HISTORY_MINUTES)[0],
            })
            .filter(|r| r.last_60m > 0)
            .collect();
        Snapshot {
            version: about.version.clone(),
            now: utc(unix_seconds(now)),
            started: utc(unix_seconds(self.started)),
            uptime_seconds: now.duration_since(self.started).map_or(0, |d| d.as_secs()),
            workers: about.workers,
            config: ConfigStatus {
                origin: config.origin,
                loaded: config.loaded_at.map(|t| utc(unix_seconds(t))),
                last_reload: config.last_reload.map(|r| ReloadStatus {
                    at: utc(unix_seconds(r.at)),
                    outcome: match &r.error {
                        None => "applied".into(),
                        Some(_) => "refused".into(),
                    },
                    error: r.error,
                }),
                effective: config.yaml,
            },
            listeners,
            destinations,
            relay_errors,
            certificates,
        }
    }
}

/// The p-th quantile of a latency histogram, as its bucket's upper bound in milliseconds.
fn percentile(buckets: &[u64], p: f64) -> Option<f64> {
    let total: u64 = buckets.iter().sum();
    if total == 0 {
        return None;
    }
    let rank = ((total as f64) * p).ceil().max(1.0) as u64;
    let mut seen = 0;
    for (i, n) in buckets.iter().enumerate() {
        seen += n;
        if seen >= rank {
            return Some((bucket_bound_ms(i) * 100.0).round() / 100.0);
        }
    }
    None
}

/// What the relay is, fixed at start: version, workers, listeners.
#[derive(Debug, Clone, Default)]
pub struct About {
    pub version: String,
    pub workers: usize,
    pub listeners: Vec<ListenerAbout>,
}

#[derive(Debug, Clone)]
pub struct ListenerAbout {
    pub name: String,
    pub mode: String,
    /// The address actually bound.
    pub bind: String,
    /// `minted from CA <file>`, `fixed <file>` or `none (plain HTTP)`.
    pub tls: String,
}

/// What the caller reads live for each page: open client connections, destinations' pool state.
#[derive(Debug, Clone, Default)]
pub struct Live {
    /// Client connections open now, by listener name.
    pub connections: BTreeMap<String, usize>,
    pub destinations: Vec<DestinationLive>,
}

#[derive(Debug, Clone)]
pub struct DestinationLive {
    pub name: String,
    /// `direct to host:port` or `via proxy http://…@proxy:port`, secrets masked.
    pub route: String,
    pub connections: usize,
    pub streams_in_flight: usize,
    pub state: DestinationState,
}

/// Where a destination stands with the upstream.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum DestinationState {
    /// At least one upstream connection is open.
    Up,
    /// No connection open and no failure: nothing needed one yet, or they were closed when idle.
    Idle,
    /// A connection is being opened; after failures, this is the attempt that tells whether the
    /// destination is back.
    Connecting {
        /// Failed connects in a row before this attempt.
        failures: u32,
        #[serde(skip_serializing_if = "Option::is_none")]
        last_failure: Option<Failure>,
    },
    /// Connects failed; requests fail fast until the next attempt.
    BackingOff {
        /// When the first of the failures in a row happened.
        since: String,
        /// Failed connects in a row.
        failures: u32,
        /// Seconds until the next attempt may start; 0: the next request makes it.
        retry_in_seconds: u64,
        last_failure: Failure,
    },
}

/// A failed connect: the hop, in the other side's words where it gave some, and the whole error.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Failure {
    /// `proxy answered 407 Proxy Authentication Required`, `tcp`, `tls`, …
    pub hop: String,
    pub error: String,
}

impl DestinationState {
    pub fn word(&self) -> &'static str {
        match self {
            DestinationState::Up => "up",
            DestinationState::Idle => "idle",
            DestinationState::Connecting { .. } => "connecting",
            DestinationState::BackingOff { .. } => "backing off",
        }
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Counts {
    pub requests: u64,
    /// Answers with a 4xx or 5xx status.
    pub errors: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct Snapshot {
    pub version: String,
    pub now: String,
    pub started: String,
    pub uptime_seconds: u64,
    pub workers: usize,
    pub config: ConfigStatus,
    pub listeners: Vec<ListenerStatus>,
    pub destinations: Vec<DestinationStatus>,
    /// pushrelay's own answers by reason, over the last 60 minutes (those with any).
    pub relay_errors: Vec<ReasonCount>,
    /// Soonest expiry first.
    pub certificates: Vec<Certificate>,
}

#[derive(Debug, Clone, Serialize)]
pub struct ConfigStatus {
    /// The file and environment it was read from.
    pub origin: String,
    pub loaded: Option<String>,
    pub last_reload: Option<ReloadStatus>,
    /// The effective configuration, secrets masked (what `pushrelay check` prints).
    pub effective: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct ReloadStatus {
    pub at: String,
    /// `applied` or `refused`.
    pub outcome: String,
    pub error: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct ListenerStatus {
    pub name: String,
    pub mode: String,
    pub bind: String,
    pub tls: String,
    /// The earliest expiry among the certificates it serves.
    pub certificate_expires: Option<String>,
    pub connections: usize,
    pub last_5m: Counts,
    pub last_60m: Counts,
}

#[derive(Debug, Clone, Serialize)]
pub struct DestinationStatus {
    pub name: String,
    pub route: String,
    pub connections: usize,
    pub streams_in_flight: usize,
    #[serde(flatten)]
    pub state: DestinationState,
    pub last_5m: Counts,
    /// Time to the answer head over the last 5 minutes, of answers below 500 (5xx are mostly
    /// pushrelay failing fast), as the upper bound of its ~19 % bucket.
    pub latency_ms_p50: Option<f64>,
    pub latency_ms_p99: Option<f64>,
}

#[derive(Debug, Clone, Serialize)]
pub struct ReasonCount {
    pub reason: String,
    pub last_5m: u64,
    pub last_60m: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct Certificate {
    /// A listener's name, or `upstream` for identities.
    pub holder: String,
    /// `served`, `ca` or `identity`.
    pub kind: String,
    pub name: String,
    pub not_after: i64,
    pub expires: String,
    pub days_left: i64,
    /// Expires within `EXPIRY_WARNING_DAYS` (or already has).
    pub expiring_soon: bool,
}

impl Certificate {
    fn new(key: &CertKey, not_after: i64, now: SystemTime) -> Self {
        let days_left = (not_after - unix_seconds(now)).div_euclid(86_400);
        Certificate {
            holder: key.holder.clone(),
            kind: key.kind.clone(),
            name: key.name.clone(),
            not_after,
            expires: utc(not_after),
            days_left,
            expiring_soon: days_left < EXPIRY_WARNING_DAYS,
        }
    }
}

/// `2026-12-01 20:05:09 UTC` for a Unix time.
pub fn utc(unix: i64) -> String {
    let days = unix.div_euclid(86_400);
    let secs = unix.rem_euclid(86_400);
    // Civil date from days since 1970-01-01 (proleptic Gregorian), era by era of 400 years.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02} {:02}:{:02}:{:02} UTC",
        secs / 3600,
        secs % 3600 / 60,
        secs % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at_minute(m: u64) -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(m * 60 + 7)
    }

    const NOW: u64 = 29_000_000;

    #[test]
    fn dates_are_utc_civil_dates() {
        assert_eq!(utc(0), "1970-01-01 00:00:00 UTC");
        assert_eq!(utc(951_782_400), "2000-02-29 00:00:00 UTC");
        assert_eq!(utc(1_796_155_509), "2026-12-01 20:05:09 UTC");
        assert_eq!(utc(-1), "1969-12-31 23:59:59 UTC");
    }

    /// Windows count the minutes up to now: 5 minutes see the recent ones, 60 the hour; a slot
    /// reused an hour later starts again from zero.
    #[test]
    fn requests_and_errors_count_in_their_window() {
        let book = Book::new();
        let t = book.traffic("apns", "api.push.apple.com:443");
        for _ in 0..3 {
            t.record_at(at_minute(NOW), 200, Duration::from_millis(2));
        }
        t.record_at(at_minute(NOW - 2), 502, Duration::from_millis(1));
        t.record_at(at_minute(NOW - 10), 200, Duration::from_millis(1));
        t.record_at(at_minute(NOW - 10), 410, Duration::from_millis(1));
        // Two hours ago: the slot it used is the same as NOW - 60's, and outside every window.
        t.record_at(at_minute(NOW - 120), 500, Duration::from_millis(1));
        let l = &book.listeners.lock().unwrap()["apns"];
        assert_eq!(l.0.sum(NOW, 5), [4, 1]);
        assert_eq!(l.0.sum(NOW, 60), [6, 2]);
        // A minute's slot is reused an hour later from zero.
        t.record_at(at_minute(NOW + 60), 200, Duration::from_millis(1));
        assert_eq!(l.0.sum(NOW + 60, 1), [1, 0]);
        // A late event for a minute whose slot moved on is dropped, not added to the new one.
        t.record_at(at_minute(NOW), 500, Duration::from_millis(1));
        assert_eq!(l.0.sum(NOW + 60, 1), [1, 0]);
    }

    #[test]
    fn refused_destinations_count_on_the_listener_only() {
        let book = Book::new();
        book.traffic("apns", "")
            .record_at(at_minute(NOW), 403, Duration::ZERO);
        assert!(book.destinations.lock().unwrap().is_empty());
        assert_eq!(book.listeners.lock().unwrap()["apns"].0.sum(NOW, 5), [1, 1]);
    }

    /// p50 and p99 are the upper bounds of the buckets the ranks fall in, within 19 %.
    #[test]
    fn latency_percentiles_come_from_the_buckets() {
        let mut buckets = [0u64; LATENCY_BUCKETS];
        for _ in 0..98 {
            buckets[latency_bucket(Duration::from_millis(3))] += 1;
        }
        buckets[latency_bucket(Duration::from_millis(40))] += 1;
        buckets[latency_bucket(Duration::from_millis(900))] += 1;
        let p50 = percentile(&buckets, 0.5).unwrap();
        let p99 = percentile(&buckets, 0.99).unwrap();
        assert!((3.0..3.6).contains(&p50), "{p50}");
        assert!((40.0..47.6).contains(&p99), "{p99}");
        assert_eq!(percentile(&[0; LATENCY_BUCKETS], 0.5), None);
        assert_eq!(latency_bucket(Duration::ZERO), 0);
        assert_eq!(
            latency_bucket(Duration::from_secs(3600)),
            LATENCY_BUCKETS - 1
        );
        for i in 1..LATENCY_BUCKETS - 1 {
            let inside = Duration::from_secs_f64(bucket_bound_ms(i) * 0.99 / 1000.0);
            assert_eq!(latency_bucket(inside), i, "bucket {i}");
        }
    }

    fn about() -> About {
        About {
            version: "9.9.9".into(),
            workers: 2,
            listeners: vec![ListenerAbout {
                name: "apns".into(),
                mode: "pre-proxy".into(),
                bind: "127.0.0.1:8443".into(),
                tls: "minted from CA certs/ca.pem".into(),
            }],
        }
    }

    /// The snapshot joins what was recorded with what is live: windows, latency, reasons,
    /// certificates flagged within 30 days, the configuration and its last reload.
    #[test]
    fn snapshot_gathers_every_section() {
        let book = Book::new();
        let now = SystemTime::now();
        let t = book.traffic("apns", "api.push.apple.com:443");
        t.record_at(now, 200, Duration::from_millis(5));
        t.record_at(now, 502, Duration::from_millis(900));
        book.relay_error_at(now, "RelayProxyAuthenticationRequired");
        book.relay_error_at(now, "RelayProxyAuthenticationRequired");
        let day = 86_400;
        let soon = unix_seconds(now) + 10 * day + 60;
        let later = unix_seconds(now) + 300 * day + 60;
        book.certificate("apns", "served", "api.push.apple.com", later);
        book.certificate("apns", "served", "api.sandbox.push.apple.com", soon);
        book.certificate("apns", "ca", "certs/ca.pem", later);
        book.certificate("upstream", "identity", "com.example.app", soon);
        book.config_origin("config.yaml and PUSHRELAY_* environment");
        book.config_loaded("workers: 2\n".into(), false);
        book.reload_refused("listeners changed");
        let live = Live {
            connections: [("apns".to_owned(), 3)].into(),
            destinations: vec![DestinationLive {
                name: "api.push.apple.com:443".into(),
                route: "direct to api.push.apple.com:443".into(),
                connections: 1,
                streams_in_flight: 0,
                state: DestinationState::Up,
            }],
        };
        let s = book.snapshot(&about(), &live, now);
        assert_eq!(s.workers, 2);
        let l = &s.listeners[0];
        assert_eq!(l.connections, 3);
        assert_eq!(
            l.last_5m,
            Counts {
                requests: 2,
                errors: 1
            }
        );
        assert_eq!(l.certificate_expires.as_deref(), Some(utc(soon).as_str()));
        let d = &s.destinations[0];
        assert_eq!(d.last_5m.errors, 1);
        // The 502 counts as an error, not in the latency.
        let p99 = d.latency_ms_p99.unwrap();
        assert!((5.0..6.0).contains(&p99), "{d:?}");
        assert_eq!(s.relay_errors[0].reason, "RelayProxyAuthenticationRequired");
        assert_eq!(s.relay_errors[0].last_5m, 2);
        let flagged: Vec<&str> = s
            .certificates
            .iter()
            .filter(|c| c.expiring_soon)
            .map(|c| c.name.as_str())
            .collect();
        assert_eq!(flagged, ["api.sandbox.push.apple.com", "com.example.app"]);
        assert_eq!(
            s.certificates
                .iter()
                .find(|c| !c.expiring_soon)
                .unwrap()
                .days_left,
            300
        );
        assert_eq!(s.config.effective, "workers: 2\n");
        let reload = s.config.last_reload.unwrap();
        assert_eq!(reload.outcome, "refused");
        assert_eq!(reload.error.as_deref(), Some("listeners changed"));
    }

    #[test]
    fn a_reload_that_applies_replaces_the_configuration() {
        let book = Book::new();
        book.config_loaded("a: 1\n".into(), false);
        book.reload_refused("bad");
        book.config_loaded("a: 2\n".into(), true);
        let s = book.snapshot(&About::default(), &Live::default(), SystemTime::now());
        assert_eq!(s.config.effective, "a: 2\n");
        assert_eq!(s.config.last_reload.unwrap().outcome, "applied");
    }

    #[test]
    fn forgotten_certificates_leave_the_list() {
        let book = Book::new();
        book.certificate("apns", "served", "a", 1);
        book.certificate("legacy", "served", "b", 1);
        book.forget_certificates("apns");
        let s = book.snapshot(&About::default(), &Live::default(), SystemTime::now());
        let names: Vec<&str> = s.certificates.iter().map(|c| c.name.as_str()).collect();
        assert_eq!(names, ["b"]);
    }
}
