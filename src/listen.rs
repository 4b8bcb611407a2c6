//! The accept loop: a connection limit (excess waits in the kernel's backlog), the source-address
//! allowlist checked right after accept and before any TLS work, then the front door. Accept errors
//! (such as running out of file descriptors) back off instead of spinning.

use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

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
    loop {
        let permit = tokio::select! {
            _ = shutdown.cancelled() => break,
            p = limit.clone().acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => break,
            },
        };
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
            tracing::warn!(listener = %listener.name, client.addr = %peer, "source address not allowed; connection closed");
            continue;
        }
        let _ = stream.set_nodelay(true);
        let door = listener.door.clone();
        let shutdown = shutdown.clone();
        placement.spawn(&tracker, stream, move |stream| async move {
            door.serve(stream, peer, shutdown).await;
            drop(permit);
        });
    }
}
