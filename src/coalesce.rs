//! Write coalescing for HTTP/2 connections. h2 flushes at the end of every poll of a connection,
//! and pushes arrive one by one, so without help every push becomes its own TLS record and its own
//! write(2) on both sides of the relay. `Coalesce` buffers what is written and, when asked to
//! flush, first yields once to the scheduler so that requests or answers that are ready right now
//! join the same record and syscall; it then writes the whole buffer. It also tells h2 it has no
//! vectored writes, so h2 copies small DATA frames into its buffer instead of flushing each alone.
//! The buffer exists only while it holds bytes: an idle connection (most of them, most of the
//! time) keeps none, which is a quarter of what an idle TLS + HTTP/2 client connection costs.
//!
//! Also here, on the same write path: `WriteDeadline`, which fails a write that has made no
//! progress for a while, so a client that stops reading its socket is cut off instead of holding
//! its connection (and what is buffered for it) forever.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::{Instant, Sleep};

/// Bytes buffered before a write goes out without waiting for a flush.
const MAX_BUFFER: usize = 64 * 1024;
/// The buffer's first allocation: a burst of answers' frames.
const FIRST_ALLOCATION: usize = 16 * 1024;

pub struct Coalesce<S> {
    io: S,
    buf: Vec<u8>,
    sent: usize,
    yielded: bool,
}

impl<S> Coalesce<S> {
    pub fn new(io: S) -> Self {
        Coalesce {
            io,
            buf: Vec::new(),
            sent: 0,
            yielded: false,
        }
    }

    pub fn get_ref(&self) -> &S {
        &self.io
    }
}

impl<S: AsyncWrite + Unpin> Coalesce<S> {
    fn poll_drain(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while self.sent < self.buf.len() {
            let n = ready!(Pin::new(&mut self.io).poll_write(cx, &self.buf[self.sent..]))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.sent += n;
        }
        // Freed, not cleared: the next burst allocates afresh (one allocation per write(2)).
        self.buf = Vec::new();
        self.sent = 0;
        Poll::Ready(Ok(()))
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Coalesce<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Coalesce<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        if self.buf.len() >= MAX_BUFFER {
            ready!(self.poll_drain(cx))?;
        }
        if self.buf.capacity() == 0 {
            self.buf.reserve(FIRST_ALLOCATION.max(data.len()));
        }
        self.buf.extend_from_slice(data);
        Poll::Ready(Ok(data.len()))
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if !self.buf.is_empty() && !self.yielded {
            // Let whatever is ready now be written with this.
            self.yielded = true;
            cx.waker().wake_by_ref();
            return Poll::Pending;
        }
        ready!(self.poll_drain(cx))?;
        self.yielded = false;
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        ready!(self.poll_drain(cx))?;
        Pin::new(&mut self.io).poll_shutdown(cx)
    }

    fn is_write_vectored(&self) -> bool {
        false
    }
}

/// A stream whose writes fail with `TimedOut` once one has waited `limit` without progress. The
/// timer exists only while a write is blocked.
pub struct WriteDeadline<S> {
    io: S,
    limit: Duration,
    blocked: Option<Pin<Box<Sleep>>>,
}

impl<S> WriteDeadline<S> {
    pub fn new(io: S, limit: Duration) -> Self {
        WriteDeadline {
            io,
            limit,
            blocked: None,
        }
    }

    /// After a write or flush returned `Pending`: `Err` once it has been blocked for `limit`.
    fn check(&mut self, cx: &mut Context<'_>) -> io::Result<()> {
        let limit = self.limit;
        let timer = self
            .blocked
            .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(Instant::now() + limit)));
        match timer.as_mut().poll(cx) {
            Poll::Ready(()) => Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("the client read nothing for {limit:?}"),
            )),
            Poll::Pending => Ok(()),
        }
    }

    fn progress<T>(&mut self, r: Poll<io::Result<T>>, cx: &mut Context<'_>) -> Poll<io::Result<T>> {
        match r {
            Poll::Pending => match self.check(cx) {
                Ok(()) => Poll::Pending,
                Err(e) => Poll::Ready(Err(e)),
            },
            done => {
                self.blocked = None;
                done
            }
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for WriteDeadline<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for WriteDeadline<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.io).poll_write(cx, data);
        self.progress(r, cx)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let r = Pin::new(&mut self.io).poll_flush(cx);
        self.progress(r, cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let r = Pin::new(&mut self.io).poll_shutdown(cx);
        self.progress(r, cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.io).poll_write_vectored(cx, bufs);
        self.progress(r, cx)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn writes_are_held_until_flush_and_then_go_out_whole() {
        let (a, mut b) = tokio::io::duplex(1024 * 1024);
        let mut w = Coalesce::new(a);
        w.write_all(b"one ").await.unwrap();
        w.write_all(b"two").await.unwrap();
        let mut probe = [0u8; 8];
        let early =
            tokio::time::timeout(std::time::Duration::from_millis(50), b.read(&mut probe)).await;
        assert!(early.is_err(), "nothing reaches the peer before a flush");
        w.flush().await.unwrap();
        let mut got = vec![0u8; 7];
        b.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"one two");
    }

    /// A peer that stops reading makes the write fail after the deadline; one that reads keeps
    /// the stream alive however long the whole takes.
    #[tokio::test(start_paused = true)]
    async fn a_write_blocked_past_its_deadline_fails_and_progress_resets_it() {
        let (a, mut b) = tokio::io::duplex(64);
        let mut w = WriteDeadline::new(a, std::time::Duration::from_secs(5));
        let reader = tokio::spawn(async move {
            let mut got = vec![0u8; 1000];
            for chunk in got.chunks_mut(100) {
                tokio::time::sleep(std::time::Duration::from_secs(4)).await;
                b.read_exact(chunk).await.unwrap();
            }
            b
        });
        w.write_all(&[1u8; 1000]).await.unwrap();
        let _b = reader.await.unwrap();
        let err = w.write_all(&[2u8; 1000]).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
    }

    #[tokio::test]
    async fn large_writes_go_out_without_a_flush_and_shutdown_drains() {
        let (a, mut b) = tokio::io::duplex(4 * MAX_BUFFER);
        let mut w = Coalesce::new(a);
        let big = vec![7u8; MAX_BUFFER + 10];
        w.write_all(&big).await.unwrap();
        w.write_all(b"tail").await.unwrap();
        w.shutdown().await.unwrap();
        let mut got = Vec::new();
        b.read_to_end(&mut got).await.unwrap();
        assert_eq!(got.len(), MAX_BUFFER + 14);
        assert!(got.ends_with(b"tail"));
    }
}
