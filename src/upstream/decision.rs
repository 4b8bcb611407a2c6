//! What a request does next towards one destination, as a pure function of what the pool holds
//! there: use a connection with room, fail fast while the destination is down, open a connection,
//! join the queue, or wait for a change. `pool.rs` gathers the `View` under its locks, applies the
//! `Decision`, and does the waiting and connecting; everything it decides is here, table-tested.

use std::time::Duration;

use tokio::time::Instant;

/// One destination (for one identity) at one instant, as a checkout sees it. `E` is the last
/// connect error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct View<'a, E> {
    /// A connection with a free stream slot, by its index in the entry's list.
    pub room: Option<usize>,
    /// Open connections (full ones included).
    pub open: usize,
    /// A connect attempt is in progress in this shard.
    pub connecting: bool,
    /// Requests waiting in this shard's queue.
    pub queued: usize,
    /// This request already holds a place in that queue.
    pub in_queue: bool,
    /// Connect failures since the last success, in every shard.
    pub failures: u32,
    /// The end of the current back-off, if one was set.
    pub retry_at: Option<Instant>,
    /// Why the last connect failed, when nothing succeeded since.
    pub last_error: Option<&'a E>,
    /// Some shard is making the one attempt allowed while the destination is down.
    pub probing: bool,
    pub now: Instant,
}

/// The per-shard limits a decision respects.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    pub max_connections: usize,
    pub max_queued: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision<'a, E> {
    /// Take a stream slot on connection `room`.
    Use(usize),
    /// Fail fast: the destination is down and backing off for `remaining` more.
    BackingOff { remaining: Duration, error: &'a E },
    /// Fail fast: the destination is down and another shard is trying it now.
    Reconnecting { error: &'a E },
    /// Open a connection (and be the down destination's one probe when `probe`).
    Connect { probe: bool },
    /// Fail: the queue is full.
    QueueFull,
    /// Take a place in the queue, then look again (a slot freed meanwhile is not missed).
    Enqueue,
    /// Wait for a change; `retry_at` (when set) is also worth waking at, to start the reconnect.
    Wait,
}

/// What to do next. Connections with room always win; with none open after a failure, requests
/// fail fast while backing off or while another shard probes; one connect at a time per shard, and
/// while the destination is down one among all shards; otherwise queue (bounded) and wait.
pub fn decide<'a, E>(view: &View<'a, E>, limits: Limits) -> Decision<'a, E> {
    if let Some(conn) = view.room {
        return Decision::Use(conn);
    }
    let backing_off = view.retry_at.filter(|at| *at > view.now);
    if view.open == 0
        && let Some(error) = view.last_error
    {
        if let Some(at) = backing_off {
            return Decision::BackingOff {
                remaining: at - view.now,
                error,
            };
        }
        if view.probing && !view.connecting {
            return Decision::Reconnecting { error };
        }
    }
    if !view.connecting
        && backing_off.is_none()
        && !view.probing
        && view.open < limits.max_connections
    {
        // `probing` is only ever set while the destination is down.
        return Decision::Connect {
            probe: view.failures > 0,
        };
    }
    if view.in_queue {
        Decision::Wait
    } else if view.queued >= limits.max_queued {
        Decision::QueueFull
    } else {
        Decision::Enqueue
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: Limits = Limits {
        max_connections: 2,
        max_queued: 3,
    };

    /// A healthy destination with nothing open yet.
    fn fresh(now: Instant) -> View<'static, &'static str> {
        View {
            room: None,
            open: 0,
            connecting: false,
            queued: 0,
            in_queue: false,
            failures: 0,
            retry_at: None,
            last_error: None,
            probing: false,
            now,
        }
    }

    #[test]
    fn checkout_decisions_by_destination_state() {
        let now = Instant::now();
        let later = now + Duration::from_secs(3);
        let earlier = now - Duration::from_secs(3);
        let down = |v: View<'static, &'static str>| View {
            failures: 2,
            last_error: Some(&"refused"),
            ..v
        };
        let f = fresh(now);
        #[rustfmt::skip]
        let table: Vec<(&str, View<&str>, Decision<&str>)> = vec![
            ("a connection with room is used", View { room: Some(1), open: 2, ..f }, Decision::Use(1)),
            ("room wins even while backing off", View { room: Some(0), open: 1, ..down(View { retry_at: Some(later), ..f }) }, Decision::Use(0)),
            ("nothing open: connect", f, Decision::Connect { probe: false }),
            ("all full, under the limit: connect", View { open: 1, ..f }, Decision::Connect { probe: false }),
            ("all full at the limit: queue", View { open: 2, ..f }, Decision::Enqueue),
            ("a connect in progress: queue", View { connecting: true, ..f }, Decision::Enqueue),
            ("queued already: wait", View { connecting: true, in_queue: true, queued: 3, ..f }, Decision::Wait),
            ("queue full: fail", View { open: 2, queued: 3, ..f }, Decision::QueueFull),
            ("down, backing off: fail fast with what is left", down(View { retry_at: Some(later), ..f }), Decision::BackingOff { remaining: Duration::from_secs(3), error: &"refused" }),
            ("down, back-off over: probe", down(View { retry_at: Some(earlier), ..f }), Decision::Connect { probe: true }),
            ("down, another shard probes: fail fast", down(View { retry_at: Some(earlier), probing: true, ..f }), Decision::Reconnecting { error: &"refused" }),
            ("down, this shard probes: queue behind it", down(View { retry_at: Some(earlier), probing: true, connecting: true, ..f }), Decision::Enqueue),
            ("open connections full while backing off: queue, no connect", View { open: 1, ..down(View { retry_at: Some(later), ..f }) }, Decision::Enqueue),
            ("open connections full while another shard probes: queue", View { open: 1, probing: true, ..down(f) }, Decision::Enqueue),
            ("failures without a recorded error do not fail fast", View { failures: 1, retry_at: Some(later), ..f }, Decision::Enqueue),
        ];
        for (what, view, expected) in table {
            assert_eq!(decide(&view, LIMITS), expected, "{what}");
        }
    }
}
