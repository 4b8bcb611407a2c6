//! The log sink. Each event is formatted on its own thread into its own buffer and handed to one
//! writer thread, which lets a burst gather for a few milliseconds and writes it in one go: one
//! line per request would otherwise cost a write(2) each, and waking the writer per line would
//! cost as much. The queue is bounded; when it is full the logging thread waits rather than
//! dropping lines, and `LogGuard` flushes everything before the process exits.

use std::io::{self, BufWriter, Write};
use std::sync::mpsc::{Receiver, SyncSender, sync_channel};
use std::thread::JoinHandle;

use tracing_subscriber::fmt::MakeWriter;

/// Lines that may wait for the writer thread.
const QUEUE_LINES: usize = 16 * 1024;
/// How long the writer lets lines gather after the first of a burst: the most a line waits.
const GATHER: std::time::Duration = std::time::Duration::from_millis(20);

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
        if !self.buf.is_empty() {
            let _ = self.tx.send(Msg::Line(std::mem::take(&mut self.buf)));
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
    let (tx, rx) = sync_channel(QUEUE_LINES);
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
        if self.tx.send(Msg::Flush(ack_tx)).is_ok() {
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
}
