//! Moving one stream's bytes both ways between a multiplexed stream and the
//! other end (the app's flow on the appliance, the target's socket on the
//! agent) with as few copies, and as little memory per stream, as the two
//! ends allow.
//!
//! - Toward the other end, the multiplexer's received chunks ([`Bytes`]
//!   slices of the pipe's read buffer) are written as they are
//!   ([`ChunkRead`]).
//! - Toward the multiplexer, the other end lends the bytes it already holds
//!   ([`Lend`]) and the multiplexer copies them straight into its frames.
//!   The appliance's flow lends its receive buffer; a socket goes through
//!   [`Buffered`], whose buffer is allocated on the first read and never
//!   zeroed, so an idle stream's pages are not touched.
//!
//! `tokio::io::copy_bidirectional` instead reads into two buffers of its own
//! per stream, allocated (and zeroed) up front, and copies each byte once
//! more on the way through.

use std::future::poll_fn;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use bytes::{Buf, Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncWrite};

use crate::metrics::Counted;
use crate::mux::MuxStream;

/// Most bytes taken from the multiplexer at once toward the other end.
const MAX_CHUNK: usize = 256 * 1024;
/// Bytes one direction moves before it yields to the runtime, so that one
/// busy stream cannot hold a worker thread.
const YIELD_AFTER: u64 = 4 * 1024 * 1024;

/// What a [`Lend`] source did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lent {
    /// The taker took this many bytes (at least one).
    Took(usize),
    /// The source is at its end: nothing more will come.
    End,
}

/// The taker a [`Lend`] source offers its bytes to: it returns how many it
/// took (at least one), or `Pending` after registering the context's waker
/// when it can take none now.
pub type Take<'a> = dyn FnMut(&mut Context<'_>, &[u8]) -> Poll<io::Result<usize>> + 'a;

/// A byte source that offers the bytes it holds instead of copying them out.
pub trait Lend {
    /// Waits for bytes (or the end) and offers them to `take`. Returns
    /// `Pending` when there is nothing to offer, or when `take` took
    /// nothing (it registered the waker itself).
    fn poll_lend(&mut self, cx: &mut Context<'_>, take: &mut Take<'_>) -> Poll<io::Result<Lent>>;
}

/// A source of received chunks that need no copy to be handed on.
pub trait ChunkRead {
    /// The next chunk of at most `max` bytes; `None` is the end of the
    /// stream.
    fn poll_read_chunk(
        &mut self,
        cx: &mut Context<'_>,
        max: usize,
    ) -> Poll<io::Result<Option<Bytes>>>;
}

impl ChunkRead for MuxStream {
    fn poll_read_chunk(
        &mut self,
        cx: &mut Context<'_>,
        max: usize,
    ) -> Poll<io::Result<Option<Bytes>>> {
        MuxStream::poll_read_chunk(self, cx, max)
    }
}

impl<T: ChunkRead> ChunkRead for Counted<T> {
    fn poll_read_chunk(
        &mut self,
        cx: &mut Context<'_>,
        max: usize,
    ) -> Poll<io::Result<Option<Bytes>>> {
        let chunk = ready!(self.inner_mut().poll_read_chunk(cx, max))?;
        if let Some(chunk) = &chunk {
            self.count(chunk.len());
        }
        Poll::Ready(Ok(chunk))
    }
}

impl<T: Lend> Lend for Counted<T> {
    fn poll_lend(&mut self, cx: &mut Context<'_>, take: &mut Take<'_>) -> Poll<io::Result<Lent>> {
        let lent = ready!(self.inner_mut().poll_lend(cx, take))?;
        if let Lent::Took(n) = lent {
            self.count(n);
        }
        Poll::Ready(Ok(lent))
    }
}

/// A reader made a [`Lend`] source by a buffer of its own, allocated on the
/// first read and reused; writes go straight through.
#[derive(Debug)]
pub struct Buffered<R> {
    inner: R,
    buf: BytesMut,
    capacity: usize,
}

impl<R> Buffered<R> {
    /// `inner` read `capacity` bytes at a time at most.
    pub fn new(inner: R, capacity: usize) -> Buffered<R> {
        Buffered {
            inner,
            buf: BytesMut::new(),
            capacity: capacity.max(1),
        }
    }
}

impl<R: AsyncRead + Unpin> Lend for Buffered<R> {
    fn poll_lend(&mut self, cx: &mut Context<'_>, take: &mut Take<'_>) -> Poll<io::Result<Lent>> {
        if self.buf.is_empty() {
            // Empty and not shared: this reclaims the whole allocation.
            self.buf.reserve(self.capacity);
            let n = ready!(tokio_util::io::poll_read_buf(
                Pin::new(&mut self.inner),
                cx,
                &mut self.buf
            ))?;
            if n == 0 {
                return Poll::Ready(Ok(Lent::End));
            }
        }
        let n = ready!(take(cx, &self.buf))?;
        self.buf.advance(n);
        Poll::Ready(Ok(Lent::Took(n)))
    }
}

impl<R: AsyncWrite + Unpin> AsyncWrite for Buffered<R> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// One direction's progress.
#[derive(Debug, Default)]
struct Way {
    moved: u64,
    /// Moved since the last yield.
    burst: u64,
    /// The source ended; the sink is being shut down.
    shutting: bool,
    done: bool,
}

impl Way {
    fn moved(&mut self, n: usize) {
        self.moved += n as u64;
        self.burst += n as u64;
    }

    /// Whether to yield now (waking the task at once to go on).
    fn should_yield(&mut self, cx: &Context<'_>) -> bool {
        if self.burst < YIELD_AFTER {
            return false;
        }
        self.burst = 0;
        cx.waker().wake_by_ref();
        true
    }
}

fn write_zero() -> io::Error {
    io::Error::new(io::ErrorKind::WriteZero, "the stream took no bytes")
}

/// Moves bytes both ways between `mux` and `other` until both directions
/// ended: each source's end shuts down the other side's write half, so a
/// half-close passes through. Returns the bytes moved `other` → `mux` and
/// `mux` → `other`. The first error of either direction ends both.
pub async fn join<M, O>(mux: &mut M, other: &mut O) -> io::Result<(u64, u64)>
where
    M: ChunkRead + AsyncWrite + Unpin,
    O: Lend + AsyncWrite + Unpin,
{
    let mut up = Way::default();
    let mut down = Way::default();
    let mut pending: Option<Bytes> = None;
    poll_fn(|cx| {
        if !up.done {
            // A pending direction leaves its waker registered; the other
            // direction is polled either way.
            if let Poll::Ready(r) = poll_up(cx, mux, other, &mut up) {
                r?;
            }
        }
        if !down.done
            && let Poll::Ready(r) = poll_down(cx, mux, other, &mut down, &mut pending)
        {
            r?;
        }
        if up.done && down.done {
            Poll::Ready(Ok((up.moved, down.moved)))
        } else {
            Poll::Pending
        }
    })
    .await
}

/// `other` → `mux`, until it ends (Ready) or waits (Pending).
fn poll_up<M, O>(
    cx: &mut Context<'_>,
    mux: &mut M,
    other: &mut O,
    way: &mut Way,
) -> Poll<io::Result<()>>
where
    M: AsyncWrite + Unpin,
    O: Lend,
{
    loop {
        if way.shutting {
            ready!(Pin::new(&mut *mux).poll_shutdown(cx))?;
            way.done = true;
            return Poll::Ready(Ok(()));
        }
        let mut take =
            |cx: &mut Context<'_>, bytes: &[u8]| match Pin::new(&mut *mux).poll_write(cx, bytes) {
                Poll::Ready(Ok(0)) if !bytes.is_empty() => Poll::Ready(Err(write_zero())),
                other => other,
            };
        match ready!(other.poll_lend(cx, &mut take))? {
            Lent::Took(n) => way.moved(n),
            Lent::End => way.shutting = true,
        }
        if way.should_yield(cx) {
            return Poll::Pending;
        }
    }
}

/// `mux` → `other`, until it ends (Ready) or waits (Pending).
fn poll_down<M, O>(
    cx: &mut Context<'_>,
    mux: &mut M,
    other: &mut O,
    way: &mut Way,
    pending: &mut Option<Bytes>,
) -> Poll<io::Result<()>>
where
    M: ChunkRead,
    O: AsyncWrite + Unpin,
{
    loop {
        if let Some(chunk) = pending {
            let n = ready!(Pin::new(&mut *other).poll_write(cx, chunk))?;
            if n == 0 {
                return Poll::Ready(Err(write_zero()));
            }
            chunk.advance(n);
            way.moved(n);
            if chunk.is_empty() {
                *pending = None;
            }
            if way.should_yield(cx) {
                return Poll::Pending;
            }
            continue;
        }
        if way.shutting {
            ready!(Pin::new(&mut *other).poll_flush(cx))?;
            ready!(Pin::new(&mut *other).poll_shutdown(cx))?;
            way.done = true;
            return Poll::Ready(Ok(()));
        }
        match ready!(mux.poll_read_chunk(cx, MAX_CHUNK))? {
            Some(chunk) if !chunk.is_empty() => *pending = Some(chunk),
            Some(_) => {}
            None => way.shutting = true,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::VecDeque;

    use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream, duplex};

    use super::*;

    /// A chunk source fed from a channel of chunks, for the tests.
    struct Chunks {
        rx: tokio::sync::mpsc::UnboundedReceiver<Bytes>,
        written: DuplexStream,
    }

    impl ChunkRead for Chunks {
        fn poll_read_chunk(
            &mut self,
            cx: &mut Context<'_>,
            max: usize,
        ) -> Poll<io::Result<Option<Bytes>>> {
            match ready!(self.rx.poll_recv(cx)) {
                Some(mut chunk) => {
                    assert!(chunk.len() <= max, "test chunks are small");
                    Poll::Ready(Ok(Some(chunk.split_to(chunk.len()))))
                }
                None => Poll::Ready(Ok(None)),
            }
        }
    }

    impl AsyncWrite for Chunks {
        fn poll_write(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<io::Result<usize>> {
            Pin::new(&mut self.written).poll_write(cx, buf)
        }
        fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            Pin::new(&mut self.written).poll_flush(cx)
        }
        fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            Pin::new(&mut self.written).poll_shutdown(cx)
        }
    }

    #[tokio::test]
    async fn bytes_pass_both_ways_and_each_end_closes_only_its_direction() {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        let (written, mut mux_peer) = duplex(1024);
        let mut mux = Chunks { rx, written };
        let (socket, mut far) = duplex(1024);
        let mut other = Buffered::new(socket, 100);
        let up: Vec<u8> = (0..50_000u32).map(|i| (i % 251) as u8).collect();
        let down: VecDeque<Bytes> = (0..100u8).map(|i| Bytes::from(vec![i; 777])).collect();
        let expect_down: Vec<u8> = down.iter().flat_map(|c| c.to_vec()).collect();

        let task = tokio::spawn(async move { join(&mut mux, &mut other).await });
        let sent = up.clone();
        let writer = tokio::spawn(async move {
            // The far end sends everything, half-closes, then reads.
            far.write_all(&sent).await?;
            far.shutdown().await?;
            let mut got = Vec::new();
            far.read_to_end(&mut got).await?;
            io::Result::Ok(got)
        });
        let mut got_up = vec![0u8; up.len()];
        mux_peer.read_exact(&mut got_up).await.unwrap();
        assert_eq!(got_up, up);
        // The far end's half-close reached the multiplexer's side...
        assert_eq!(mux_peer.read(&mut [0u8; 1]).await.unwrap(), 0);
        // ...while the other direction still flows.
        for chunk in down {
            tx.send(chunk).unwrap();
        }
        drop(tx);
        let got_down = writer.await.unwrap().unwrap();
        assert_eq!(got_down, expect_down);
        let (moved_up, moved_down) = task.await.unwrap().unwrap();
        assert_eq!(moved_up, up.len() as u64);
        assert_eq!(moved_down, expect_down.len() as u64);
    }

    #[tokio::test]
    async fn an_error_on_one_side_ends_the_join() {
        let (_tx, rx) = tokio::sync::mpsc::unbounded_channel();
        let (written, mux_peer) = duplex(16);
        let mut mux = Chunks { rx, written };
        let (socket, mut far) = duplex(1024);
        let mut other = Buffered::new(socket, 64);
        drop(mux_peer);
        far.write_all(b"nobody will read this").await.unwrap();
        let result = join(&mut mux, &mut other).await;
        assert_eq!(result.unwrap_err().kind(), io::ErrorKind::BrokenPipe);
    }

    #[tokio::test]
    async fn buffered_allocates_nothing_before_the_first_read() {
        let (socket, _far) = duplex(16);
        let b = Buffered::new(socket, 64 * 1024);
        assert_eq!(b.buf.capacity(), 0);
    }
}
