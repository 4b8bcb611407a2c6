//! Prometheus metrics with stable names (the Grafana dashboard in deploy/grafana reads them). One
//! explicit registry, so tests render it. Gauges about the pool are refreshed when scraped, from
//! the pool's own accounting, so they can never drift from it. The status page's recent history
//! (`recent::Book`) is fed from the same calls.

use std::cell::RefCell;
use std::fmt::Write;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

pub mod recent;

use recent::Book;

/// A certificate a listener serves or mints from, for expiry monitoring.
#[derive(Debug, Clone)]
pub struct CertExpiry {
    /// `served`, `ca` or `identity`.
    pub kind: &'static str,
    pub name: String,
    pub not_after: i64,
}

/// One destination's pool gauges, read when scraped.
pub struct DestinationGauges {
    pub destination: String,
    pub open_connections: usize,
    pub streams_in_flight: usize,
}

/// What can report pool gauges (the upstream pool), so metrics need not know the pool.
pub trait PoolGauges {
    fn gauges(&self) -> Vec<DestinationGauges>;
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    listener: Arc<str>,
    destination: Arc<str>,
    status_class: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabels {
    reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ListenerLabels {
    listener: Arc<str>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DestinationLabels {
    destination: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ProxyStatusLabels {
    proxy_status: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RefusedLabels {
    listener: String,
    reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct HopLabels {
    hop: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct SideLabels {
    side: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CertLabels {
    listener: String,
    kind: &'static str,
    name: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ConnectLabels {
    listener: Arc<str>,
    outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TunnelLabels {
    listener: Arc<str>,
    kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TunnelBytesLabels {
    listener: Arc<str>,
    direction: &'static str,
}

type HistogramFamily = Family<ListenerLabels, Histogram, fn() -> Histogram>;

/// A request's counter and histogram, as looked up for its labels. A family lookup hashes every
/// label and takes a lock; a worker thread sees the same few label sets push after push, so it
/// keeps the last few handles (the families' own, shared) and finds them by their labels.
struct RequestHandles {
    metrics: u64,
    listener: Arc<str>,
    destination: Arc<str>,
    status_class: &'static str,
    count: Counter,
    duration: Histogram,
    recent: recent::Traffic,
}

const RECENT_HANDLES: usize = 8;

/// Equal labels: usually the very same text, else compared (each post-proxy connection has its
/// own copy of the destination's).
fn same(a: &Arc<str>, b: &Arc<str>) -> bool {
    Arc::ptr_eq(a, b) || **a == **b
}

thread_local! {
    static RECENT: RefCell<Vec<RequestHandles>> = const { RefCell::new(Vec::new()) };
}

pub struct Metrics {
    /// Tells this registry's handles apart from another's in `RECENT` (tests run several).
    id: u64,
    registry: Registry,
    requests: Family<RequestLabels, Counter>,
    relay_errors: Family<ReasonLabels, Counter>,
    duration: HistogramFamily,
    upstream_connections: Family<DestinationLabels, Gauge>,
    streams_in_flight: Family<DestinationLabels, Gauge>,
    proxy_failures: Family<ProxyStatusLabels, Counter>,
    tls_failures: Family<SideLabels, Counter>,
    connect_failures: Family<HopLabels, Counter>,
    goaways: Family<DestinationLabels, Counter>,
    cert_expiry: Family<CertLabels, Gauge<i64, AtomicI64>>,
    status: Arc<Book>,
    connects: Family<ConnectLabels, Counter>,
    tunnels_open: Family<TunnelLabels, Gauge>,
    tunnel_bytes: Family<TunnelBytesLabels, Counter>,
    connections_refused: Family<RefusedLabels, Counter>,
    log_dropped: Counter,
    log_sync: std::sync::Mutex<()>,
}

fn duration_histogram() -> Histogram {
    // 0.5 ms … ~16 s: a relayed push takes a few ms; a stuck one hits request_timeout.
    Histogram::new(exponential_buckets(0.0005, 2.0, 16))
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("pushrelay");
        static NEXT_ID: AtomicU64 = AtomicU64::new(1);
        let m = Metrics {
            id: NEXT_ID.fetch_add(1, Ordering::Relaxed),
            requests: Family::default(),
            relay_errors: Family::default(),
            duration: HistogramFamily::new_with_constructor(duration_histogram),
            upstream_connections: Family::default(),
            streams_in_flight: Family::default(),
            proxy_failures: Family::default(),
            tls_failures: Family::default(),
            connect_failures: Family::default(),
            goaways: Family::default(),
            cert_expiry: Family::default(),
            status: Arc::default(),
            connects: Family::default(),
            tunnels_open: Family::default(),
            tunnel_bytes: Family::default(),
            connections_refused: Family::default(),
            log_dropped: Counter::default(),
            log_sync: std::sync::Mutex::new(()),
            registry: Registry::default(),
        };
        registry.register(
            "requests",
            "Requests answered, by listener, destination and status class",
            m.requests.clone(),
        );
        registry.register(
            "relay_errors",
            "Requests pushrelay answered itself, by reason",
            m.relay_errors.clone(),
        );
        registry.register(
            "request_duration_seconds",
            "Time from request head to answer head",
            m.duration.clone(),
        );
        registry.register(
            "upstream_connections",
            "Open upstream HTTP/2 connections",
            m.upstream_connections.clone(),
        );
        registry.register(
            "upstream_streams_in_flight",
            "Upstream streams in flight",
            m.streams_in_flight.clone(),
        );
        registry.register(
            "proxy_connect_failures",
            "CONNECT tunnels the proxy refused or failed, by the proxy's status",
            m.proxy_failures.clone(),
        );
        registry.register(
            "tls_handshake_failures",
            "Failed TLS handshakes, by side",
            m.tls_failures.clone(),
        );
        registry.register(
            "upstream_connect_failures",
            "Failed upstream connect attempts, by the hop that failed (dns, tcp, proxy, tls, h2)",
            m.connect_failures.clone(),
        );
        registry.register(
            "upstream_goaways",
            "Upstream connections ended by the origin (GOAWAY)",
            m.goaways.clone(),
        );
        registry.register(
            "certificate_expiry_timestamp_seconds",
            "Not-after of each served and CA certificate (Unix time)",
            m.cert_expiry.clone(),
        );
        registry.register(
            "forward_proxy_connects",
            "CONNECT requests to a forward-proxy listener, by outcome: intercepted, tunnelled, tls_failed, tls_timeout, sni_mismatch, or the Relay reason of the refusal",
            m.connects.clone(),
        );
        registry.register(
            "forward_proxy_tunnels_open",
            "CONNECT tunnels open, by kind (intercept, blind)",
            m.tunnels_open.clone(),
        );
        registry.register(
            "forward_proxy_tunnel_bytes",
            "Bytes copied through blind tunnels, by direction (to_upstream, to_client)",
            m.tunnel_bytes.clone(),
        );
        registry.register(
            "connections_refused",
            "Client connections closed right after accept, by listener and reason",
            m.connections_refused.clone(),
        );
        registry.register(
            "log_lines_dropped",
            "Log lines dropped because the log writer fell behind",
            m.log_dropped.clone(),
        );
        Metrics { registry, ..m }
    }

    /// Counts an answered request. Labels are shared strings: looking a series up per request
    /// allocates nothing.
    pub fn request(
        &self,
        listener: &Arc<str>,
        destination: &Arc<str>,
        status: u16,
        elapsed: Duration,
    ) {
        let status_class = match status {
            100..=199 => "1xx",
            200..=299 => "2xx",
            300..=399 => "3xx",
            400..=499 => "4xx",
            _ => "5xx",
        };
        RECENT.with_borrow_mut(|recent| {
            let found = recent.iter().position(|r| {
                r.metrics == self.id
                    && r.status_class == status_class
                    && same(&r.listener, listener)
                    && same(&r.destination, destination)
            });
            let i = match found {
                Some(i) => i,
                None => {
                    let handles = RequestHandles {
                        metrics: self.id,
                        listener: listener.clone(),
                        destination: destination.clone(),
                        status_class,
                        count: self
                            .requests
                            .get_or_create(&RequestLabels {
                                listener: listener.clone(),
                                destination: destination.clone(),
                                status_class,
                            })
                            .clone(),
                        duration: self
                            .duration
                            .get_or_create(&ListenerLabels {
                                listener: listener.clone(),
                            })
                            .clone(),
                        recent: self.status.traffic(listener, destination),
                    };
                    if recent.len() == RECENT_HANDLES {
                        recent.pop();
                    }
                    recent.insert(0, handles);
                    0
                }
            };
            recent[i].count.inc();
            recent[i].duration.observe(elapsed.as_secs_f64());
            recent[i].recent.record(status, elapsed);
        });
    }

    pub fn relay_error(&self, reason: &str) {
        self.relay_errors
            .get_or_create(&ReasonLabels {
                reason: reason.to_owned(),
            })
            .inc();
        self.status.relay_error(reason);
    }

    /// What the status page shows of the recent past.
    pub fn status(&self) -> &Arc<Book> {
        &self.status
    }

    /// `status` is the proxy's HTTP status, or a word (`timeout`, `unreachable`, `malformed`).
    pub fn proxy_failure(&self, status: &str) {
        self.proxy_failures
            .get_or_create(&ProxyStatusLabels {
                proxy_status: status.to_owned(),
            })
            .inc();
    }

    /// Log lines dropped so far (`log::dropped_lines`, counted process-wide by the log sink):
    /// the counter catches up, one caller at a time.
    pub fn log_lines_dropped(&self, total: u64) {
        if let Ok(_one) = self.log_sync.lock() {
            let seen = self.log_dropped.get();
            if total > seen {
                self.log_dropped.inc_by(total - seen);
            }
        }
    }

    /// A client connection closed right after accept: `max_connections` or `source_not_allowed`.
    pub fn connection_refused(&self, listener: &str, reason: &'static str) {
        self.connections_refused
            .get_or_create(&RefusedLabels {
                listener: listener.to_owned(),
                reason,
            })
            .inc();
    }

    /// `side` is `client` (towards pushrelay) or `upstream` (towards the origin).
    pub fn tls_failure(&self, side: &'static str) {
        self.tls_failures.get_or_create(&SideLabels { side }).inc();
    }

    pub fn connect_failure(&self, hop: &'static str) {
        self.connect_failures
            .get_or_create(&HopLabels { hop })
            .inc();
    }

    pub fn goaway(&self, destination: &str) {
        self.goaways
            .get_or_create(&DestinationLabels {
                destination: destination.to_owned(),
            })
            .inc();
    }

    /// A CONNECT answered: `outcome` is `intercepted`, `tunnelled` or a `Relay…` reason.
    pub fn connect(&self, listener: &Arc<str>, outcome: &'static str) {
        self.connects
            .get_or_create(&ConnectLabels {
                listener: listener.clone(),
                outcome,
            })
            .inc();
    }

    /// The open-tunnels gauge for `kind` (`intercept` or `blind`), to move up and down.
    pub fn tunnels_open(&self, listener: &Arc<str>, kind: &'static str) -> Gauge {
        self.tunnels_open
            .get_or_create(&TunnelLabels {
                listener: listener.clone(),
                kind,
            })
            .clone()
    }

    /// The blind-tunnel byte counter for `direction` (`to_upstream` or `to_client`).
    pub fn tunnel_bytes(&self, listener: &Arc<str>, direction: &'static str) -> Counter {
        self.tunnel_bytes
            .get_or_create(&TunnelBytesLabels {
                listener: listener.clone(),
                direction,
            })
            .clone()
    }

    /// The expiry of an upstream identity's certificate (`listener="upstream"`, `kind="identity"`,
    /// `name` its topic).
    pub fn identity_certificate(&self, topic: &str, not_after: i64) {
        self.status
            .certificate("upstream", "identity", topic, not_after);
        self.cert_expiry
            .get_or_create(&CertLabels {
                listener: "upstream".to_owned(),
                kind: "identity",
                name: topic.to_owned(),
            })
            .set(not_after);
    }

    /// The expiry of every certificate a listener serves or mints from (the whole set, each time
    /// it is built).
    pub fn certificates(&self, listener: &str, certs: &[CertExpiry]) {
        self.status.forget_certificates(listener);
        for c in certs {
            self.status
                .certificate(listener, c.kind, &c.name, c.not_after);
            self.cert_expiry
                .get_or_create(&CertLabels {
                    listener: listener.to_owned(),
                    kind: c.kind,
                    name: c.name.clone(),
                })
                .set(c.not_after);
        }
    }

    /// The text exposition, with pool gauges read from `pool` now.
    pub fn render(&self, pool: &impl PoolGauges) -> String {
        let mut by_dest: std::collections::BTreeMap<String, (i64, i64)> = Default::default();
        for g in pool.gauges() {
            let e = by_dest.entry(g.destination).or_default();
            e.0 += g.open_connections as i64;
            e.1 += g.streams_in_flight as i64;
        }
        for (destination, (conns, streams)) in by_dest {
            let labels = DestinationLabels { destination };
            self.upstream_connections.get_or_create(&labels).set(conns);
            self.streams_in_flight.get_or_create(&labels).set(streams);
        }
        self.encode()
    }

    fn encode(&self) -> String {
        let mut out = String::new();
        if prometheus_client::encoding::text::encode(&mut out, &self.registry).is_err() {
            let _ = writeln!(out, "# metrics encoding failed");
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn count(m: &Metrics, listener: &str, destination: &str, class: &str) -> u64 {
        let line = format!(
            "pushrelay_requests_total{{listener=\"{listener}\",destination=\"{destination}\",status_class=\"{class}\"}} "
        );
        let text = m.encode();
        text.lines()
            .find_map(|l| l.strip_prefix(line.as_str()))
            .map_or(0, |n| n.parse().unwrap())
    }

    /// The dropped-lines counter follows the sink's process-wide total and never goes back.
    #[test]
    fn log_lines_dropped_follow_the_sinks_total() {
        let m = Metrics::new();
        for total in [5, 3, 9] {
            m.log_lines_dropped(total);
        }
        assert!(
            m.encode().contains("pushrelay_log_lines_dropped_total 9\n"),
            "{}",
            m.encode()
        );
    }

    /// The handles kept per thread never mix registries or labels up, and every request counts.
    #[test]
    fn every_request_counts_in_its_own_registry_and_series() {
        let (a, b) = (Metrics::new(), Metrics::new());
        let pre: Arc<str> = Arc::from("pre");
        let dests: Vec<Arc<str>> = (0..12).map(|i| Arc::from(format!("h{i}:443"))).collect();
        let ms = Duration::from_millis(1);
        for round in 0..3 {
            for (i, d) in dests.iter().enumerate() {
                // Equal text in a new Arc is the same series.
                let d = if round == 1 {
                    Arc::from(&**d)
                } else {
                    d.clone()
                };
                a.request(&pre, &d, 200, ms);
                if i % 2 == 0 {
                    b.request(&pre, &d, 503, ms);
                }
            }
        }
        a.request(&pre, &dests[0], 404, ms);
        for (i, d) in dests.iter().enumerate() {
            assert_eq!(count(&a, "pre", d, "2xx"), 3, "{d}");
            assert_eq!(count(&a, "pre", d, "5xx"), 0, "{d}");
            assert_eq!(
                count(&b, "pre", d, "5xx"),
                if i % 2 == 0 { 3 } else { 0 },
                "{d}"
            );
            assert_eq!(count(&b, "pre", d, "2xx"), 0, "{d}");
        }
        assert_eq!(count(&a, "pre", "h0:443", "4xx"), 1);
        let text = a.encode();
        assert!(
            text.contains("pushrelay_request_duration_seconds_count{listener=\"pre\"} 37"),
            "{text}"
        );
    }
}
