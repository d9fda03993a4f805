//! One write to the socket for the responses that are ready together.
//!
//! HTTP/2 carries many calls over one connection. When a read brings several requests,
//! each is served by its own task, and each finished response wakes the connection's task,
//! which runs next (the runtime runs a task just woken before the others queued) and writes
//! that one response: one `writev`, through the whole TCP stack, per call. That syscall was
//! a third of the server's CPU per call (the per-call floor in BENCHMARKS.md).
//!
//! [`Coalesced`] wraps a connection's socket: writes are gathered in a buffer, and the
//! first flush of a batch yields once to the runtime (the connection's task goes to the
//! back of the queue) before writing, so the responses of the tasks already queued are
//! gathered into the same write. It defers a flush at most once, for one turn of the
//! scheduler, so no response waits for later traffic: on a quiet connection it costs one
//! task wake-up.

use std::{
    io::{self, IoSlice},
    pin::Pin,
    task::{Context, Poll, ready},
};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tonic::transport::server::Connected;

/// Bytes gathered before they are written through without waiting for a flush.
const MAX_GATHERED: usize = 64 * 1024;
/// Buffer kept after a burst larger than [`MAX_GATHERED`] is written out.
const KEPT_CAPACITY: usize = 4 * 1024;

/// A socket whose writes are gathered until a flush, and whose flushes are deferred by
/// one scheduler turn (see the module docs).
#[derive(Debug)]
pub struct Coalesced<T> {
    inner: T,
    gathered: Vec<u8>,
    /// Bytes of `gathered` already written.
    written: usize,
    /// Whether this batch's flush has yielded once already.
    deferred: bool,
}

impl<T> Coalesced<T> {
    /// Wraps `inner`.
    pub fn new(inner: T) -> Self {
        Self {
            inner,
            gathered: Vec::new(),
            written: 0,
            deferred: false,
        }
    }
}

impl<T: AsyncWrite + Unpin> Coalesced<T> {
    /// Writes out everything gathered.
    fn poll_write_out(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while self.written < self.gathered.len() {
            let n =
                ready!(Pin::new(&mut self.inner).poll_write(cx, &self.gathered[self.written..]))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.written += n;
        }
        self.gathered.clear();
        if self.gathered.capacity() > MAX_GATHERED {
            // A burst's buffer is not kept for the connection's lifetime: thousands of
            // mostly idle connections (watch streams) must not each hold one.
            self.gathered.shrink_to(KEPT_CAPACITY);
        }
        self.written = 0;
        Poll::Ready(Ok(()))
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Coalesced<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Coalesced<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.poll_write_vectored(cx, &[IoSlice::new(buf)])
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        if this.gathered.len() >= MAX_GATHERED {
            // Enough for one write: out with it before taking more.
            ready!(this.poll_write_out(cx))?;
        }
        let mut taken = 0;
        for buf in bufs {
            this.gathered.extend_from_slice(buf);
            taken += buf.len();
        }
        Poll::Ready(Ok(taken))
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if this.gathered.len() > this.written {
            if !this.deferred {
                // Once per batch: let the tasks already queued finish their responses
                // first. Waking itself puts this task at the back of the run queue.
                this.deferred = true;
                cx.waker().wake_by_ref();
                return Poll::Pending;
            }
            ready!(this.poll_write_out(cx))?;
        }
        this.deferred = false;
        Pin::new(&mut this.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        ready!(this.poll_write_out(cx))?;
        Pin::new(&mut this.inner).poll_shutdown(cx)
    }
}

impl<T: Connected> Connected for Coalesced<T> {
    type ConnectInfo = T::ConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.inner.connect_info()
    }
}

#[cfg(test)]
mod tests {
    use std::task::Waker;

    use super::*;

    /// A socket that records each write it is given, taking at most `max` bytes of it.
    #[derive(Default)]
    struct Recorder {
        writes: Vec<Vec<u8>>,
        flushes: usize,
        shut: bool,
        max: Option<usize>,
    }

    impl AsyncWrite for Recorder {
        fn poll_write(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<io::Result<usize>> {
            let n = self.max.map_or(buf.len(), |m| m.min(buf.len()));
            self.writes.push(buf[..n].to_vec());
            Poll::Ready(Ok(n))
        }
        fn poll_flush(mut self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            self.flushes += 1;
            Poll::Ready(Ok(()))
        }
        fn poll_shutdown(mut self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            self.shut = true;
            Poll::Ready(Ok(()))
        }
    }

    fn write(c: &mut Coalesced<Recorder>, cx: &mut Context<'_>, bufs: &[&[u8]]) {
        let slices: Vec<IoSlice<'_>> = bufs.iter().map(|b| IoSlice::new(b)).collect();
        let n = bufs.iter().map(|b| b.len()).sum::<usize>();
        assert!(matches!(
            Pin::new(&mut *c).poll_write_vectored(cx, &slices),
            Poll::Ready(Ok(taken)) if taken == n
        ));
    }

    /// Counts its wake-ups.
    #[derive(Default)]
    struct Wakes(std::sync::atomic::AtomicUsize);

    impl std::task::Wake for Wakes {
        fn wake(self: std::sync::Arc<Self>) {
            self.wake_by_ref();
        }
        fn wake_by_ref(self: &std::sync::Arc<Self>) {
            self.0.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        }
    }

    #[test]
    fn writes_until_a_flush_go_out_as_one_after_one_deferral() {
        let wakes = std::sync::Arc::new(Wakes::default());
        let waker = Waker::from(wakes.clone());
        let mut cx = Context::from_waker(&waker);
        let mut c = Coalesced::new(Recorder::default());
        write(&mut c, &mut cx, &[b"head", b"ers"]);
        write(&mut c, &mut cx, &[b"data"]);
        assert!(c.inner.writes.is_empty(), "nothing written before a flush");
        // The first flush of a batch yields once (and has woken its task)...
        assert!(Pin::new(&mut c).poll_flush(&mut cx).is_pending());
        assert!(c.inner.writes.is_empty());
        assert_eq!(
            wakes.0.load(std::sync::atomic::Ordering::SeqCst),
            1,
            "woken to go on"
        );
        // ...and what was written meanwhile joins the batch.
        write(&mut c, &mut cx, &[b"+more"]);
        assert!(matches!(
            Pin::new(&mut c).poll_flush(&mut cx),
            Poll::Ready(Ok(()))
        ));
        assert_eq!(c.inner.writes, vec![b"headersdata+more".to_vec()]);
        assert_eq!(c.inner.flushes, 1);
        // The next batch is deferred once again; a flush with nothing gathered is not.
        write(&mut c, &mut cx, &[b"next"]);
        assert!(Pin::new(&mut c).poll_flush(&mut cx).is_pending());
        assert!(matches!(
            Pin::new(&mut c).poll_flush(&mut cx),
            Poll::Ready(Ok(()))
        ));
        assert!(matches!(
            Pin::new(&mut c).poll_flush(&mut cx),
            Poll::Ready(Ok(()))
        ));
        assert_eq!(c.inner.writes.len(), 2);
        assert_eq!(c.inner.flushes, 3);
    }

    #[test]
    fn partial_writes_resume_where_they_stopped_and_shutdown_writes_everything() {
        let mut cx = Context::from_waker(Waker::noop());
        let mut c = Coalesced::new(Recorder {
            max: Some(3),
            ..Recorder::default()
        });
        write(&mut c, &mut cx, &[b"abcdefgh"]);
        assert!(matches!(
            Pin::new(&mut c).poll_shutdown(&mut cx),
            Poll::Ready(Ok(()))
        ));
        assert!(c.inner.shut);
        assert_eq!(c.inner.writes.concat(), b"abcdefgh".to_vec());
        assert_eq!(c.inner.writes.len(), 3);
    }

    #[test]
    fn a_full_buffer_is_written_through_without_waiting_for_a_flush() {
        let mut cx = Context::from_waker(Waker::noop());
        let mut c = Coalesced::new(Recorder::default());
        let big = vec![7u8; MAX_GATHERED + 1];
        write(&mut c, &mut cx, &[&big]);
        assert!(c.inner.writes.is_empty());
        write(&mut c, &mut cx, &[b"tail"]);
        assert_eq!(c.inner.writes, vec![big]);
        assert!(Pin::new(&mut c).poll_flush(&mut cx).is_pending());
        assert!(matches!(
            Pin::new(&mut c).poll_flush(&mut cx),
            Poll::Ready(Ok(()))
        ));
        assert_eq!(c.inner.writes.last().map(Vec::as_slice), Some(&b"tail"[..]));
        // The burst's buffer is not kept.
        assert!(
            c.gathered.capacity() <= KEPT_CAPACITY,
            "{}",
            c.gathered.capacity()
        );
    }
}
