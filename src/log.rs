//! The log sink. Each event is formatted on its own thread into its own buffer and handed to one
//! writer thread, which lets a burst gather for a few milliseconds and writes it in one go: one
//! line per request would otherwise cost a write(2) each, and waking the writer per line would
//! cost as much. The queue is bounded; when it is full (the writer fell behind: a stalled pipe, a
//! full disk, a journal that does not read) the line is dropped and counted
//! (`pushrelay_log_lines_dropped_total`): a worker never waits for the log. `LogGuard` flushes what
//! is queued before the process exits.

use std::io::{self, BufWriter, Write};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, SyncSender, TrySendError, sync_channel};
use std::thread::JoinHandle;

use tracing_subscriber::fmt::MakeWriter;

/// Lines that may wait for the writer thread.
const QUEUE_LINES: usize = 16 * 1024;
/// How long the writer lets lines gather after the first of a burst: the most a line waits.
const GATHER: std::time::Duration = std::time::Duration::from_millis(20);

/// Lines dropped since the process started, over every sink.
static DROPPED: AtomicU64 = AtomicU64::new(0);

/// Log lines dropped because the writer fell behind.
pub fn dropped_lines() -> u64 {
    DROPPED.load(Ordering::Relaxed)
}

enum Msg {
    Line(Vec<u8>),
    Flush(SyncSender<()>),
}

/// Hands formatted events to the writer thread.
#[derive(Clone)]
pub struct LogSink {
    tx: SyncSender<Msg>,
}

/// Flushes the queue when dropped: keep it alive for as long as the program logs.
pub struct LogGuard {
    tx: SyncSender<Msg>,
    _thread: Option<JoinHandle<()>>,
}

/// One event's bytes; sent when the formatter is done with it.
pub struct EventBuf {
    buf: Vec<u8>,
    tx: SyncSender<Msg>,
}

impl Write for EventBuf {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        self.buf.extend_from_slice(data);
        Ok(data.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Drop for EventBuf {
    fn drop(&mut self) {
        if !self.buf.is_empty()
            && let Err(TrySendError::Full(_)) =
                self.tx.try_send(Msg::Line(std::mem::take(&mut self.buf)))
        {
            DROPPED.fetch_add(1, Ordering::Relaxed);
        }
    }
}

impl<'a> MakeWriter<'a> for LogSink {
    type Writer = EventBuf;

    fn make_writer(&'a self) -> EventBuf {
        EventBuf {
            buf: Vec::with_capacity(256),
            tx: self.tx.clone(),
        }
    }
}

/// A sink writing to `out` from a dedicated thread.
pub fn sink<W: Write + Send + 'static>(out: W) -> (LogSink, LogGuard) {
    sink_with_queue(out, QUEUE_LINES)
}

/// As `sink`, with room for `lines` lines waiting for the writer.
pub fn sink_with_queue<W: Write + Send + 'static>(out: W, lines: usize) -> (LogSink, LogGuard) {
    let (tx, rx) = sync_channel(lines);
    let thread = std::thread::Builder::new()
        .name("pushrelay-log".into())
        .spawn(move || write_lines(rx, out))
        .ok();
    (
        LogSink { tx: tx.clone() },
        LogGuard {
            tx,
            _thread: thread,
        },
    )
}

fn write_lines<W: Write>(rx: Receiver<Msg>, out: W) {
    let mut out = BufWriter::with_capacity(64 * 1024, out);
    let handle = |msg: Msg, out: &mut BufWriter<W>| match msg {
        Msg::Line(line) => {
            let _ = out.write_all(&line);
        }
        Msg::Flush(ack) => {
            let _ = out.flush();
            let _ = ack.send(());
        }
    };
    while let Ok(msg) = rx.recv() {
        let flush_now = matches!(msg, Msg::Flush(_));
        handle(msg, &mut out);
        // Let a burst gather: while this thread sleeps, senders queue lines without waking it.
        if !flush_now {
            std::thread::sleep(GATHER);
        }
        while let Ok(msg) = rx.try_recv() {
            handle(msg, &mut out);
        }
        let _ = out.flush();
    }
}

impl Drop for LogGuard {
    fn drop(&mut self) {
        let (ack_tx, ack_rx) = sync_channel(1);
        // Bounded as well: a stalled writer must not hold up the exit.
        if self.tx.try_send(Msg::Flush(ack_tx)).is_ok() {
            let _ = ack_rx.recv_timeout(std::time::Duration::from_secs(5));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    #[derive(Clone, Default)]
    struct Shared(Arc<Mutex<Vec<u8>>>);

    impl Write for Shared {
        fn write(&mut self, data: &[u8]) -> io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(data);
            Ok(data.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn every_line_is_written_in_order_by_the_time_the_guard_drops() {
        let out = Shared::default();
        let (sink, guard) = sink(out.clone());
        for i in 0..1000 {
            let mut w = sink.make_writer();
            writeln!(w, "line {i}").unwrap();
        }
        drop(guard);
        let text = String::from_utf8(out.0.lock().unwrap().clone()).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 1000);
        assert_eq!(lines[0], "line 0");
        assert_eq!(lines[999], "line 999");
    }

    /// A writer that blocks until the test lets it go: a pipe nobody reads.
    struct Stalled(std::sync::mpsc::Receiver<()>);

    impl Write for Stalled {
        fn write(&mut self, data: &[u8]) -> io::Result<usize> {
            let _ = self.0.recv();
            Ok(data.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    /// With the writer stalled, logging returns at once: lines beyond the queue are dropped and
    /// counted, never waited for.
    #[test]
    fn a_stalled_writer_never_blocks_the_logging_thread() {
        let (release, stalled) = std::sync::mpsc::channel();
        let (sink, guard) = sink_with_queue(Stalled(stalled), 8);
        let before = dropped_lines();
        let (done_tx, done_rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for i in 0..100 {
                let mut w = sink.make_writer();
                writeln!(w, "line {i}").unwrap();
            }
            done_tx.send(()).unwrap();
        });
        let returned = done_rx.recv_timeout(std::time::Duration::from_secs(5));
        assert!(returned.is_ok(), "logging blocked on a stalled writer");
        // The writer may have taken one line and a queue-full more before it stalled.
        assert!(
            dropped_lines() - before >= 100 - 2 * 8 - 1,
            "dropped lines are counted"
        );
        drop(release);
        drop(guard);
    }
}
