//! What a request does next towards one destination, as a pure function of what the pool holds
//! there: use a connection with room, start a connect, join the queue, wait for a change, or fail.
//! `pool.rs` gathers the `View` under its locks, applies the `Decision`, and does the waiting;
//! connects run on their own (owned by the destination, not by the request that asked for one).
//! Everything it decides is here, table-tested.

use std::time::Duration;

use tokio::time::Instant;

/// One destination (for one identity) at one instant, as a checkout sees it. `E` is the last
/// connect error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct View<'a, E> {
    /// A connection with a free stream slot, by its index in the entry's list.
    pub room: Option<usize>,
    /// Open connections in this shard (full ones included).
    pub open: usize,
    /// Connections open or being opened in every shard: what `max_connections` bounds.
    pub reserved: usize,
    /// Connect attempts in progress in this shard.
    pub connecting: usize,
    /// Requests waiting in this shard (this one included once it holds a place).
    pub waiting_here: usize,
    /// Requests waiting, in every shard: what `max_queued` bounds.
    pub queued: usize,
    /// This request already holds a place in the queue.
    pub in_queue: bool,
    /// Connect failures since the last success, in every shard.
    pub failures: u32,
    /// The end of the current back-off, if one was set.
    pub retry_at: Option<Instant>,
    /// Why the last connect failed, when nothing succeeded since.
    pub last_error: Option<&'a E>,
    /// That failure is one a retry cannot fix (proxy 407/403, certificate, unresolvable name).
    pub lasting: bool,
    /// When the destination went down (the first failure since the last success).
    pub down_since: Option<Instant>,
    /// Some shard is making the one attempt allowed while the destination is down.
    pub probing: bool,
    /// This request started the attempt in progress and waits for its outcome.
    pub awaiting: bool,
    /// This request's client (connection) holds its share of this destination's streams and
    /// queue or more, and a client under its share is waiting: it lets that one go first.
    pub yields: bool,
    /// This request's client holds less than its share (always, when it is the only client):
    /// only then may it take a place in the queue, so clients filling the queue leave room
    /// for the others.
    pub under_share: bool,
    /// Another client holds more than its share and has requests waiting: one of them may be
    /// turned away to make room for this one when the queue is full.
    pub displaceable: bool,
    /// Another worker shard's entry for this destination holds more than its part of the
    /// shared queue (the shards queueing, this one counted, share it evenly) and has a waiting
    /// request to give up: one may be turned away there for this one when the queue is full.
    pub over_part_elsewhere: bool,
    /// This request's client was told to give up a queue place for a client under its share.
    pub evicted: bool,
    pub now: Instant,
}

/// The limits a decision respects.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Connections per destination, over all shards; a shard with none may always open one.
    pub max_connections: usize,
    /// Waiting requests per destination, over all shards.
    pub max_queued: usize,
    /// How long requests wait for a destination that went down to come back before they fail.
    pub reconnect_wait: Duration,
    /// Requests one new connection is counted on to carry at once: an HTTP/2 connection carries
    /// every waiting request (one connect at a time per shard), an HTTP/1.1 one a single request
    /// (one connect per waiting request, so a burst does not wait for handshakes one by one).
    pub connect_brings: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision<'a, E> {
    /// Take a stream slot on connection `room`.
    Use(usize),
    /// Start a connect for the destination (the down destination's one probe when `probe`),
    /// then look again: the request waits for it like any other.
    Connect { probe: bool },
    /// Fail: the destination is down, for longer than `reconnect_wait` or for a reason a retry
    /// cannot fix; `retry_in` is what is left of the back-off.
    Down {
        error: &'a E,
        retry_in: Option<Duration>,
    },
    /// Fail: the queue is full.
    QueueFull,
    /// Take a place in the queue, then look again (a slot freed meanwhile is not missed).
    Enqueue,
    /// The queue is full, but this client is under its share: turn away a waiting request of
    /// the client over its share holding most (in this shard, else in the shard holding more
    /// than its part of the queue), and take its place.
    Displace,
    /// Wait for a change, or until `wake_at` (always in the future) when something is due then:
    /// the back-off ends (start the reconnect) or the ride-out ends (fail).
    Wait { wake_at: Option<Instant> },
}

/// What to do next. A connection with room wins (unless this client has its share and one
/// under its share waits: freed slots go to the clients holding least); one connect at a time per shard (for HTTP/1.1, as many as requests wait), none while backing off, and while the
/// destination is down one among all shards; requests wait for a destination that is down for
/// up to `reconnect_wait`, then fail fast, and at once for lasting failures.
pub fn decide<'a, E>(view: &View<'a, E>, limits: Limits) -> Decision<'a, E> {
    if let Some(conn) = view.room
        && !view.yields
    {
        return Decision::Use(conn);
    }
    let backing_off = view.retry_at.filter(|at| *at > view.now);
    // A shard with none open and none coming may always open one.
    let may_open =
        (view.open == 0 && view.connecting == 0) || view.reserved < limits.max_connections;
    // Requests here the connects in progress are not counted on to carry (a request not yet
    // queued counts itself). While the destination is down, one attempt at a time.
    let wanting = view.waiting_here + usize::from(!view.in_queue);
    let connect_wanted = view.connecting == 0
        || (view.failures == 0 && view.connecting.saturating_mul(limits.connect_brings) < wanting);
    if view.room.is_none() && connect_wanted && backing_off.is_none() && !view.probing && may_open {
        // `probing` is only ever set while the destination is down.
        return Decision::Connect {
            probe: view.failures > 0,
        };
    }
    let down = if view.open == 0 {
        view.last_error
    } else {
        None
    };
    let ride_out_end = view.down_since.map(|at| at + limits.reconnect_wait);
    if let Some(error) = down
        && !view.awaiting
        && (view.lasting || ride_out_end.is_none_or(|end| end <= view.now))
    {
        return Decision::Down {
            error,
            retry_in: backing_off.map(|at| at - view.now),
        };
    }
    if view.in_queue && view.evicted {
        return Decision::QueueFull;
    }
    if view.in_queue {
        let reconnect_due = backing_off.filter(|_| view.connecting == 0 && !view.probing);
        let give_up_due = ride_out_end.filter(|_| down.is_some() && !view.awaiting);
        let wake_at = match (reconnect_due, give_up_due) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        Decision::Wait { wake_at }
    } else if view.awaiting || (view.under_share && view.queued < limits.max_queued) {
        Decision::Enqueue
    } else if view.under_share && (view.displaceable || view.over_part_elsewhere) {
        Decision::Displace
    } else {
        Decision::QueueFull
    }
}

/// What one client connection and its source (the client's IP address, all its connections
/// together) hold on one destination entry: stream slots plus queue places.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Holds {
    pub conn: usize,
    pub source: usize,
}

/// A client connection's fair share of a destination's stream slots and queue, and its
/// source's.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shares {
    pub source: usize,
    pub conn: usize,
}

/// The shares of `capacity` (stream slots plus queue places) among `sources` sources holding
/// any (the asking one counted even when it holds nothing yet) and, within a source, among its
/// `conns` connections holding any (likewise): with more than one, each gets the whole divided
/// by one more than their number, so a share is left for a newcomer; alone, the whole (a lone
/// source: no bound of its own). A source
/// with many connections thus gets one source's share, however many connections it opens.
pub fn shares(capacity: usize, sources: usize, conns: usize) -> Shares {
    let split = |whole: usize, n: usize| {
        if n <= 1 {
            whole
        } else {
            (whole / (n + 1)).max(1)
        }
    };
    let source = split(capacity, sources);
    Shares {
        // A lone source is bounded only by its connections' shares.
        source: if sources <= 1 { usize::MAX } else { source },
        conn: split(source, conns),
    }
}

impl Holds {
    /// Under its share: the connection and its source both hold less than theirs.
    pub fn under(self, shares: Shares) -> bool {
        self.conn < shares.conn && self.source < shares.source
    }

    /// Over its share: the connection or its source holds more than its share.
    pub fn over(self, shares: Shares) -> bool {
        self.conn > shares.conn || self.source > shares.source
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: Limits = Limits {
        max_connections: 2,
        max_queued: 3,
        reconnect_wait: Duration::from_secs(5),
        connect_brings: usize::MAX,
    };

    /// A healthy destination with nothing open yet.
    fn fresh(now: Instant) -> View<'static, &'static str> {
        View {
            room: None,
            open: 0,
            reserved: 0,
            connecting: 0,
            waiting_here: 0,
            queued: 0,
            in_queue: false,
            failures: 0,
            retry_at: None,
            last_error: None,
            lasting: false,
            down_since: None,
            probing: false,
            awaiting: false,
            yields: false,
            under_share: true,
            displaceable: false,
            over_part_elsewhere: false,
            evicted: false,
            now,
        }
    }

    #[test]
    fn checkout_decisions_by_destination_state() {
        let now = Instant::now();
        let s = Duration::from_secs;
        let later = now + s(3);
        let earlier = now - s(3);
        // Down for 2 s (inside the 5 s ride-out), or for 9 s (past it).
        let down = |v: View<'static, &'static str>| View {
            failures: 2,
            last_error: Some(&"refused"),
            down_since: Some(now - s(2)),
            ..v
        };
        let long_down = |v: View<'static, &'static str>| View {
            down_since: Some(now - s(9)),
            ..down(v)
        };
        let f = fresh(now);
        let q = View {
            in_queue: true,
            queued: 1,
            waiting_here: 1,
            ..f
        };
        #[rustfmt::skip]
        let table: Vec<(&str, View<&str>, Decision<&str>)> = vec![
            ("a connection with room is used", View { room: Some(1), open: 2, reserved: 2, ..f }, Decision::Use(1)),
            ("room wins even while backing off", View { room: Some(0), open: 1, reserved: 1, ..down(View { retry_at: Some(later), ..f }) }, Decision::Use(0)),
            ("nothing open: connect", f, Decision::Connect { probe: false }),
            ("all full, under the limit: connect", View { open: 1, reserved: 1, ..f }, Decision::Connect { probe: false }),
            ("all full at the limit: queue", View { open: 2, reserved: 2, ..f }, Decision::Enqueue),
            ("the limit counts every shard's connections", View { open: 1, reserved: 2, ..f }, Decision::Enqueue),
            ("a shard with none may open one beyond the limit", View { open: 0, reserved: 2, ..f }, Decision::Connect { probe: false }),
            ("a connect in progress: queue", View { connecting: 1, reserved: 1, ..f }, Decision::Enqueue),
            ("queued already: wait for a change", View { connecting: 1, ..q }, Decision::Wait { wake_at: None }),
            ("queue full (all shards): fail", View { open: 2, reserved: 2, queued: 3, ..f }, Decision::QueueFull),
            ("the request that started the connect may wait in a full queue", View { connecting: 1, awaiting: true, queued: 3, ..f }, Decision::Enqueue),
            // Riding out an outage.
            ("down briefly, backing off: queue instead of failing", down(View { retry_at: Some(later), ..f }), Decision::Enqueue),
            ("down briefly, queued: wake at the back-off's end (sooner than the ride-out's)", down(View { retry_at: Some(now + s(1)), ..q }), Decision::Wait { wake_at: Some(now + s(1)) }),
            ("down briefly, queued, back-off ends after the ride-out: wake to give up", down(View { retry_at: Some(later + s(1)), ..q }), Decision::Wait { wake_at: Some(now + s(3)) }),
            ("down, back-off over: probe", down(View { retry_at: Some(earlier), ..q }), Decision::Connect { probe: true }),
            ("down briefly, another shard probes: wait, woken by its outcome or the ride-out's end", down(View { retry_at: Some(earlier), probing: true, ..q }), Decision::Wait { wake_at: Some(now + s(3)) }),
            ("a back-off that has passed is no reason to wake (no busy loop)", View { down_since: Some(now), ..down(View { retry_at: Some(earlier), probing: true, ..q }) }, Decision::Wait { wake_at: Some(now + s(5)) }),
            ("down past the ride-out, backing off: fail fast with what is left", long_down(View { retry_at: Some(later), ..f }), Decision::Down { error: &"refused", retry_in: Some(s(3)) }),
            ("down past the ride-out, queued: fail too", long_down(View { retry_at: Some(later), ..q }), Decision::Down { error: &"refused", retry_in: Some(s(3)) }),
            ("down past the ride-out, another shard probes: fail fast", long_down(View { retry_at: Some(earlier), probing: true, ..f }), Decision::Down { error: &"refused", retry_in: None }),
            ("down past the ride-out, back-off over: probe", long_down(View { retry_at: Some(earlier), ..f }), Decision::Connect { probe: true }),
            ("the probe's own request waits for its outcome", long_down(View { retry_at: Some(earlier), probing: true, connecting: 1, awaiting: true, ..q }), Decision::Wait { wake_at: None }),
            ("a lasting failure (proxy 407): fail at once", View { lasting: true, ..down(View { retry_at: Some(later), ..q }) }, Decision::Down { error: &"refused", retry_in: Some(s(3)) }),
            ("open connections full while backing off: queue, no connect", View { open: 1, reserved: 1, ..down(View { retry_at: Some(later), ..f }) }, Decision::Enqueue),
            ("open connections full while another shard probes: queue", View { open: 1, reserved: 1, probing: true, ..long_down(f) }, Decision::Enqueue),
            ("failures without a recorded error do not fail", View { failures: 1, retry_at: Some(later), ..f }, Decision::Enqueue),
            // Fairness between clients.
            ("at its share with another client waiting: leave the slot to it", View { room: Some(0), open: 1, reserved: 1, yields: true, ..q }, Decision::Wait { wake_at: None }),
            ("at its share, not yet queued: queue behind the others", View { room: Some(0), open: 1, reserved: 1, yields: true, ..f }, Decision::Enqueue),
            ("at its share while others hold places: no queue place", View { open: 2, reserved: 2, queued: 1, under_share: false, ..f }, Decision::QueueFull),
            ("queue full, under its share, nobody over theirs: fail", View { open: 2, reserved: 2, queued: 3, under_share: true, ..f }, Decision::QueueFull),
            ("queue full, under its share, another client over its share waits: take its place", View { open: 2, reserved: 2, queued: 3, under_share: true, displaceable: true, ..f }, Decision::Displace),
            ("queue full, at its share: no displacing", View { open: 2, reserved: 2, queued: 3, under_share: false, displaceable: true, ..f }, Decision::QueueFull),
            // Fairness across worker shards: the queue is shared by all of them.
            ("queue full of another shard's requests, that shard over its part: take a place there", View { open: 2, reserved: 2, queued: 3, over_part_elsewhere: true, ..f }, Decision::Displace),
            ("queue full, another shard over its part, this client at its share: fail", View { open: 2, reserved: 2, queued: 3, under_share: false, over_part_elsewhere: true, ..f }, Decision::QueueFull),
            ("turned away for a client under its share: fail", View { connecting: 1, evicted: true, ..q }, Decision::QueueFull),
        ];
        for (what, view, expected) in table {
            assert_eq!(decide(&view, LIMITS), expected, "{what}");
        }

        // A kind whose connections carry one request at a time (HTTP/1.1 to a DMZ relay).
        let h1 = Limits {
            connect_brings: 1,
            max_connections: 8,
            ..LIMITS
        };
        #[rustfmt::skip]
        let table: Vec<(&str, View<&str>, Decision<&str>)> = vec![
            ("a connect in progress for a waiting request, another request: a second connect", View { connecting: 1, reserved: 1, waiting_here: 1, queued: 1, ..f }, Decision::Connect { probe: false }),
            ("two in progress, two waiting and this one: a third", View { connecting: 2, reserved: 2, waiting_here: 2, queued: 2, ..f }, Decision::Connect { probe: false }),
            ("queued, as many connects in progress as waiting: wait", View { connecting: 3, reserved: 3, waiting_here: 3, queued: 3, ..q }, Decision::Wait { wake_at: None }),
            ("queued, fewer connects than waiting: one more", View { connecting: 2, reserved: 2, waiting_here: 3, queued: 3, ..q }, Decision::Connect { probe: false }),
            ("never past max_connections, even in a shard with none open yet", View { connecting: 2, reserved: 8, waiting_here: 3, queued: 3, ..q }, Decision::Wait { wake_at: None }),
            ("never past max_connections", View { open: 6, connecting: 2, reserved: 8, waiting_here: 3, queued: 3, ..q }, Decision::Wait { wake_at: None }),
            ("while the destination is down: one attempt at a time", down(View { connecting: 1, reserved: 1, waiting_here: 3, queued: 3, ..q }), Decision::Wait { wake_at: Some(now + s(3)) }),
        ];
        for (what, view, expected) in table {
            assert_eq!(decide(&view, h1), expected, "{what}");
        }
        // The same views with an HTTP/2 kind: one connect at a time.
        let one = View {
            connecting: 1,
            reserved: 1,
            ..f
        };
        assert_eq!(decide(&one, LIMITS), Decision::Enqueue);
    }

    #[test]
    fn fair_shares_by_source_then_connection() {
        let h = |conn, source| Holds { conn, source };
        /// (what, (capacity, sources, conns of this source), holds, under, over)
        type Row = (&'static str, (usize, usize, usize), Holds, bool, bool);
        #[rustfmt::skip]
        let table: Vec<Row> = vec![
            ("alone: the whole", (20, 1, 1), h(19, 19), true, false),
            ("one source, four connections: a fifth each", (20, 1, 4), h(3, 12), true, false),
            ("one source, four connections, at its share", (20, 1, 4), h(4, 16), false, false),
            ("a lone source holding everything: its connections' shares decide", (20, 1, 4), h(0, 20), true, false),
            ("two sources: a third each", (21, 2, 1), h(6, 6), true, false),
            ("two sources: one holding more than a third is over", (21, 2, 1), h(8, 8), false, true),
            ("many connections of one source share one source's share", (21, 2, 10), h(0, 7), false, false),
            ("each of them gets a part of it", (21, 2, 6), h(0, 4), true, false),
            ("and is at it with one", (21, 2, 6), h(1, 5), false, false),
            ("a connection under its part, its source over its share: over", (21, 2, 6), h(1, 9), false, true),
            ("a newcomer source is under its share", (21, 3, 1), h(0, 0), true, false),
            ("a share is never zero", (2, 5, 5), h(0, 0), true, false),
        ];
        for (what, (capacity, sources, conns), holds, under, over) in table {
            let s = shares(capacity, sources, conns);
            assert_eq!(
                (holds.under(s), holds.over(s)),
                (under, over),
                "{what}: {s:?}"
            );
        }
        assert_eq!(shares(21, 2, 6), Shares { source: 7, conn: 1 });
        assert_eq!(
            shares(20, 1, 4),
            Shares {
                source: usize::MAX,
                conn: 4
            }
        );
    }
}
