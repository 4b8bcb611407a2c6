//! The accept loop: the source-address allowlist checked right after accept and before any TLS
//! work, a connection limit (a connection above it is closed at once, with a 503 on plain HTTP/1.1
//! listeners, rather than left in the kernel's backlog where the client hangs), then the front
//! door. Refusals are counted and logged at most once a second per listener and reason, so a
//! flood cannot flood the log too. Accept errors (such as running out of file descriptors) back off
//! instead of spinning. A connection that sends nothing is closed by its door `handshake_timeout`
//! after accept; `TCP_DEFER_ACCEPT` is not set (std's setter is unstable and socket2, rustix and
//! nix have none, and this crate has no `unsafe`), so such a connection holds its place under
//! `max_connections` until then.

use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::metrics::Metrics;
use crate::policy::SourcePolicy;
use crate::relay::door::DoorHandle;
use crate::swap::Swap;
use crate::workers::Placement;

pub struct Listener {
    pub name: Arc<str>,
    pub sources: Arc<Swap<SourcePolicy>>,
    pub door: DoorHandle,
    /// Client connections open at once (`limits.max_connections`), shared by every worker's
    /// accept loop on this listener.
    pub connections: Arc<Semaphore>,
    pub connections_limit: usize,
    pub metrics: Arc<Metrics>,
}

/// A log line at most once per `LOG_EVERY`, counting those left out.
struct Quiet {
    next: Instant,
    suppressed: u64,
}

const LOG_EVERY: Duration = Duration::from_secs(1);

impl Quiet {
    fn new() -> Self {
        Quiet {
            next: Instant::now(),
            suppressed: 0,
        }
    }

    /// `Some(lines left out since the last one)` when a line may be written now.
    fn allow(&mut self) -> Option<u64> {
        let now = Instant::now();
        if now < self.next {
            self.suppressed += 1;
            return None;
        }
        self.next = now + LOG_EVERY;
        Some(std::mem::take(&mut self.suppressed))
    }
}

const ACCEPT_BACKOFF_MAX: Duration = Duration::from_secs(1);

/// Accepts until `shutdown`; connection tasks go on `tracker`, run where `placement` puts them,
/// and see `shutdown` too.
pub async fn accept_loop(
    socket: TcpListener,
    listener: Listener,
    shutdown: CancellationToken,
    tracker: TaskTracker,
    placement: Placement,
) {
    let limit = listener.connections.clone();
    let mut backoff = Duration::from_millis(5);
    let (mut denied_log, mut full_log) = (Quiet::new(), Quiet::new());
    loop {
        let (stream, peer) = tokio::select! {
            _ = shutdown.cancelled() => break,
            r = socket.accept() => match r {
                Ok(pair) => {
                    backoff = Duration::from_millis(5);
                    pair
                }
                Err(e) => {
                    tracing::warn!(listener = %listener.name, error = %e, "accept failed; backing off");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(ACCEPT_BACKOFF_MAX);
                    continue;
                }
            },
        };
        if !listener.sources.load().allows(peer.ip()) {
            listener
                .metrics
                .connection_refused(&listener.name, "source_not_allowed");
            if let Some(suppressed) = denied_log.allow() {
                tracing::warn!(listener = %listener.name, client.addr = %peer, suppressed, "source address not allowed; connection closed");
            }
            continue;
        }
        let Ok(permit) = limit.clone().try_acquire_owned() else {
            listener
                .metrics
                .connection_refused(&listener.name, "max_connections");
            if let Some(suppressed) = full_log.allow() {
                tracing::warn!(listener = %listener.name, client.addr = %peer, max_connections = listener.connections_limit, suppressed, "connection limit reached; connection closed");
            }
            if let Some(answer) = listener.door.busy_answer() {
                // Non-blocking only: the accept loop never waits. What the client already sent
                // is read away first, as closing over unread bytes resets the connection and
                // the client could lose the answer.
                let mut unread = [0u8; 2048];
                let _ = stream.try_read(&mut unread);
                let _ = stream.try_write(&answer);
            }
            continue;
        };
        let _ = stream.set_nodelay(true);
        let door = listener.door.clone();
        let shutdown = shutdown.clone();
        placement.spawn(&tracker, stream, move |stream| async move {
            door.serve(stream, peer, shutdown).await;
            drop(permit);
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A flood of refusals writes one line a second, and that line says how many were left out.
    #[tokio::test(start_paused = true)]
    async fn refusals_are_logged_once_a_second_with_the_count_left_out() {
        let mut quiet = Quiet::new();
        assert_eq!(quiet.allow(), Some(0));
        for _ in 0..1000 {
            assert_eq!(quiet.allow(), None);
        }
        tokio::time::advance(LOG_EVERY).await;
        assert_eq!(quiet.allow(), Some(1000));
        assert_eq!(quiet.allow(), None);
    }
}
