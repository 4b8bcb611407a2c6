//! Worker threads, one single-threaded tokio runtime each, as nghttpx, HAProxy and Envoy run
//! theirs. The accept loops (on the thread that started the workers, with signals, reloads and
//! the admin listener) hand each connection to the worker that has the fewest; the connection,
//! the requests on it and the upstream connections those use (the worker's shard of the pool)
//! then stay on that worker, so relaying a push wakes no other thread and takes no lock another
//! thread holds. Workers accepting on a shared socket themselves took turns badly: whichever
//! woke first took a whole burst of connections, often all of them.

use std::future::Future;
use std::io;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::thread::JoinHandle;

use tokio::net::TcpStream;
use tokio::runtime::Handle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::upstream::pool::set_worker;

pub struct Workers {
    handles: Vec<Handle>,
    stop: CancellationToken,
    threads: Vec<JoinHandle<()>>,
}

/// The number of workers for `configured` (`workers` in the configuration): 0 means one per CPU.
pub fn count(configured: usize) -> usize {
    match configured {
        0 => std::thread::available_parallelism().map_or(1, usize::from),
        n => n,
    }
}

impl Workers {
    /// Starts `n` worker threads (`pushrelay-w0`, …), each running its runtime until `stop`.
    pub fn start(n: usize) -> io::Result<Workers> {
        let stop = CancellationToken::new();
        let mut workers = Workers {
            handles: Vec::new(),
            stop: stop.clone(),
            threads: Vec::new(),
        };
        for index in 0..n.max(1) {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            workers.handles.push(runtime.handle().clone());
            let stop = stop.clone();
            let thread = std::thread::Builder::new()
                .name(format!("pushrelay-w{index}"))
                .spawn(move || {
                    set_worker(index);
                    runtime.block_on(stop.cancelled());
                })?;
            workers.threads.push(thread);
        }
        Ok(workers)
    }

    pub fn handles(&self) -> &[Handle] {
        &self.handles
    }

    /// Stops every worker (tasks still on them are dropped) and waits for their threads.
    pub fn stop(mut self) {
        self.stop.cancel();
        for t in std::mem::take(&mut self.threads) {
            let _ = t.join();
        }
    }
}

impl Drop for Workers {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// Where accepted connections are served: on the current runtime (no workers), or on the worker
/// serving the fewest connections. Cheap to clone.
#[derive(Clone, Default)]
pub struct Placement {
    workers: Arc<[Slot]>,
}

struct Slot {
    handle: Handle,
    connections: AtomicUsize,
}

/// Counts a connection off its worker however its task ends.
struct Placed(Arc<[Slot]>, usize);

impl Drop for Placed {
    fn drop(&mut self) {
        self.0[self.1].connections.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Placement {
    pub fn new(workers: &[Handle]) -> Self {
        Placement {
            workers: workers
                .iter()
                .map(|handle| Slot {
                    handle: handle.clone(),
                    connections: AtomicUsize::new(0),
                })
                .collect(),
        }
    }

    /// Runs `serve(stream)` on `tracker`, where this placement puts connections.
    pub fn spawn<S, F>(&self, tracker: &TaskTracker, stream: TcpStream, serve: S)
    where
        S: FnOnce(TcpStream) -> F + Send + 'static,
        F: Future<Output = ()> + Send + 'static,
    {
        let Some((index, slot)) = self
            .workers
            .iter()
            .enumerate()
            .min_by_key(|(_, s)| s.connections.load(Ordering::Relaxed))
        else {
            tracker.spawn(serve(stream));
            return;
        };
        // The socket leaves this thread's reactor and joins the worker's.
        let stream = match stream.into_std() {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e, "cannot hand a connection to a worker; closed");
                return;
            }
        };
        slot.connections.fetch_add(1, Ordering::Relaxed);
        let placed = Placed(self.workers.clone(), index);
        tracker.spawn_on(
            async move {
                let _placed = placed;
                match TcpStream::from_std(stream) {
                    Ok(stream) => serve(stream).await,
                    Err(e) => tracing::warn!(error = %e, "worker cannot take a connection; closed"),
                }
            },
            &slot.handle,
        );
    }
}
