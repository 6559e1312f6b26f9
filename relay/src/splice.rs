//! Moving a pipe's bytes from one socket to the other inside the kernel:
//! `splice(2)` from the socket into a kernel pipe, then from the pipe into the
//! other socket, one pipe per direction. The bytes never enter the relay's
//! memory (a copy loop would copy each byte in and out once), and the relay
//! has nothing to look at anyway: pipes are end-to-end encrypted.

use std::io;
use std::net::Shutdown;
use std::os::fd::OwnedFd;

use prometheus_client::metrics::counter::Counter;
use rustix::pipe::{PipeFlags, SpliceFlags};
use tokio::io::Interest;
use tokio::net::TcpStream;

/// The kernel pipe's size per direction (the default is 64 KiB; bigger
/// means fewer system calls per byte).
const PIPE_SIZE: usize = 1024 * 1024;

/// Moves bytes both ways until both directions have ended; each end of
/// stream is passed on as a shutdown of the other socket's sending side, so
/// half-closes survive. Bytes are counted into `a_to_b` and `b_to_a` as they
/// go. Returns the bytes moved each way, or the first error.
pub async fn splice_bidirectional(
    a: &TcpStream,
    b: &TcpStream,
    a_to_b: &Counter,
    b_to_a: &Counter,
) -> io::Result<(u64, u64)> {
    tokio::try_join!(one_way(a, b, a_to_b), one_way(b, a, b_to_a))
}

async fn one_way(from: &TcpStream, to: &TcpStream, counter: &Counter) -> io::Result<u64> {
    let (pipe_out, pipe_in) = rustix::pipe::pipe_with(PipeFlags::NONBLOCK | PipeFlags::CLOEXEC)?;
    // A smaller pipe still works, only with more system calls.
    let size = rustix::pipe::fcntl_setpipe_size(&pipe_in, PIPE_SIZE).unwrap_or(64 * 1024);
    let mut total = 0u64;
    loop {
        // The pipe is empty here, so "would block" can only mean the socket.
        let n = fill(from, &pipe_in, size).await?;
        if n == 0 {
            socket2::SockRef::from(to).shutdown(Shutdown::Write)?;
            return Ok(total);
        }
        drain(&pipe_out, to, n).await?;
        total += n as u64;
        counter.inc_by(n as u64);
    }
}

/// Splices up to `size` bytes from `from` into the pipe; 0 at end of stream.
async fn fill(from: &TcpStream, pipe_in: &OwnedFd, size: usize) -> io::Result<usize> {
    loop {
        from.readable().await?;
        match from.try_io(Interest::READABLE, || {
            rustix::pipe::splice(from, None, pipe_in, None, size, flags()).map_err(io::Error::from)
        }) {
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            result => return result,
        }
    }
}

/// Splices exactly `n` bytes from the pipe into `to`.
async fn drain(pipe_out: &OwnedFd, to: &TcpStream, mut n: usize) -> io::Result<()> {
    while n > 0 {
        to.writable().await?;
        match to.try_io(Interest::WRITABLE, || {
            rustix::pipe::splice(pipe_out, None, to, None, n, flags()).map_err(io::Error::from)
        }) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(m) => n -= m,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

fn flags() -> SpliceFlags {
    SpliceFlags::MOVE | SpliceFlags::NONBLOCK
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    /// A connected pair of sockets: (our end, the far end).
    async fn pair() -> (TcpStream, TcpStream) {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let near = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
        let (far, _) = l.accept().await.unwrap();
        (near, far)
    }

    #[tokio::test]
    async fn bytes_and_half_closes_pass_both_ways_and_are_counted() {
        let (a, mut a_far) = pair().await;
        let (b, mut b_far) = pair().await;
        let (ab, ba) = (Counter::default(), Counter::default());
        let relay = tokio::spawn(async move {
            splice_bidirectional(&a, &b, &ab, &ba)
                .await
                .map(|r| (r, ab.get(), ba.get()))
        });
        let big: Vec<u8> = (0..5_000_000u32).map(|i| (i % 251) as u8).collect();
        let sent = big.clone();
        let writer = tokio::spawn(async move {
            a_far.write_all(&sent).await.unwrap();
            a_far.shutdown().await.unwrap();
            // The other direction still works after this half-close.
            let mut back = Vec::new();
            a_far.read_to_end(&mut back).await.unwrap();
            back
        });
        let mut got = Vec::new();
        b_far.read_to_end(&mut got).await.unwrap();
        assert!(got == big, "every byte arrives, in order");
        b_far.write_all(b"answer").await.unwrap();
        b_far.shutdown().await.unwrap();
        assert_eq!(writer.await.unwrap(), b"answer");
        let ((up, down), counted_up, counted_down) = relay.await.unwrap().unwrap();
        assert_eq!((up, down), (big.len() as u64, 6));
        assert_eq!((counted_up, counted_down), (up, down));
    }
}
