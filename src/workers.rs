//! Worker threads, one single-threaded tokio runtime each, as nghttpx, HAProxy and Envoy run
//! theirs. Every worker accepts on every listener; a client connection, the requests on it and
//! the upstream connections those use (the worker's shard of the pool) then stay on that worker,
//! so relaying a push wakes no other thread and takes no lock another thread holds. The thread
//! that starts them keeps the control work: signals, reloads, the admin listener.

use std::io;
use std::thread::JoinHandle;

use tokio::runtime::Handle;
use tokio_util::sync::CancellationToken;

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
