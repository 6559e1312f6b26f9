//! What the caller holds: an [`IncomingFlow`] to decide on, then a
//! [`TcpFlow`] stream. Both talk to the stack task through a command channel;
//! a stream's bytes pass through a small shared buffer per direction.

use std::collections::VecDeque;
use std::io;
use std::net::SocketAddrV4;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::{Context, Poll, Waker};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::{mpsc, oneshot};

use crate::error::AcceptError;

/// Identifies a flow inside one stack.
pub(crate) type FlowId = u64;

/// Requests from handles to the stack task.
#[derive(Debug)]
pub(crate) enum Command {
    /// Answer the SYN of a pending flow; the reply comes once the handshake
    /// finished.
    Accept {
        id: FlowId,
        reply: oneshot::Sender<Result<TcpFlow, AcceptError>>,
    },
    /// Reset a pending flow.
    Refuse { id: FlowId },
    /// A stream changed its buffers or flags.
    Wake { id: FlowId },
    /// Write this packet into the tun.
    SendPacket(Vec<u8>),
    /// Take packets only from these sources from now on (`None`: any).
    SetSources(Option<Vec<crate::config::Ipv4Range>>),
    /// Stop the stack: every flow is reset.
    Shutdown,
}

/// A new TCP connection to a virtual address, waiting for the caller's
/// decision. The client sees nothing (its SYN is unanswered) until
/// [`accept`](Self::accept) or [`refuse`](Self::refuse). Dropping it refuses
/// the flow; leaving it undecided past the stack's decision timeout refuses
/// it too.
#[derive(Debug)]
pub struct IncomingFlow {
    id: FlowId,
    src: SocketAddrV4,
    dst: SocketAddrV4,
    cmd: mpsc::UnboundedSender<Command>,
    decided: bool,
}

impl IncomingFlow {
    pub(crate) fn new(
        id: FlowId,
        src: SocketAddrV4,
        dst: SocketAddrV4,
        cmd: mpsc::UnboundedSender<Command>,
    ) -> Self {
        Self {
            id,
            src,
            dst,
            cmd,
            decided: false,
        }
    }

    /// The client's address and port.
    pub fn src(&self) -> SocketAddrV4 {
        self.src
    }

    /// The virtual address and port the client connected to.
    pub fn dst(&self) -> SocketAddrV4 {
        self.dst
    }

    /// Answers the client's SYN and waits for the handshake to complete;
    /// returns the connected stream. Fails if the flow already expired, the
    /// client went away, or the stack stopped.
    pub async fn accept(mut self) -> Result<TcpFlow, AcceptError> {
        self.decided = true;
        let (reply, result) = oneshot::channel();
        self.cmd
            .send(Command::Accept { id: self.id, reply })
            .map_err(|_| AcceptError::StackClosed)?;
        result.await.unwrap_or(Err(AcceptError::StackClosed))
    }

    /// Refuses the flow: the client gets a reset (ECONNREFUSED) at once.
    pub fn refuse(mut self) {
        self.decided = true;
        let _ = self.cmd.send(Command::Refuse { id: self.id });
    }
}

impl Drop for IncomingFlow {
    fn drop(&mut self) {
        if !self.decided {
            let _ = self.cmd.send(Command::Refuse { id: self.id });
        }
    }
}

/// State a stream shares with the stack task.
#[derive(Debug)]
pub(crate) struct FlowShared {
    pub id: FlowId,
    /// Set when a `Wake` is queued and not yet handled, so a busy stream
    /// queues at most one.
    pub notified: AtomicBool,
    buf: Mutex<FlowBuf>,
}

/// Buffers and flags of one stream.
#[derive(Debug)]
pub(crate) struct FlowBuf {
    /// Bytes received from the client, not yet read by the caller.
    pub rx: VecDeque<u8>,
    /// The client finished sending and everything was moved into `rx`.
    pub rx_eof: bool,
    /// Bytes written by the caller, not yet in smoltcp.
    pub tx: VecDeque<u8>,
    /// The caller shut down its write side.
    pub tx_shutdown: bool,
    /// The flow failed (reset, timed out); reads and writes return this.
    pub error: Option<io::ErrorKind>,
    /// The stack no longer tracks the flow; nothing more will arrive.
    pub detached: bool,
    /// The caller dropped its stream.
    pub dropped: bool,
    /// The caller asked for a reset.
    pub reset_requested: bool,
    /// Most bytes in each of `rx` and `tx`.
    pub cap: usize,
    pub read_waker: Option<Waker>,
    pub write_waker: Option<Waker>,
}

impl FlowShared {
    pub fn new(id: FlowId, cap: usize) -> Self {
        Self {
            id,
            notified: AtomicBool::new(false),
            buf: Mutex::new(FlowBuf {
                rx: VecDeque::new(),
                rx_eof: false,
                tx: VecDeque::new(),
                tx_shutdown: false,
                error: None,
                detached: false,
                dropped: false,
                reset_requested: false,
                cap,
                read_waker: None,
                write_waker: None,
            }),
        }
    }

    /// Locks the buffers. A panic while holding the lock cannot leave them
    /// inconsistent (every update is a single push or flag), so a poisoned
    /// lock is used as is.
    pub fn lock(&self) -> MutexGuard<'_, FlowBuf> {
        self.buf.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl FlowBuf {
    pub fn wake_reader(&mut self) {
        if let Some(w) = self.read_waker.take() {
            w.wake();
        }
    }

    pub fn wake_writer(&mut self) {
        if let Some(w) = self.write_waker.take() {
            w.wake();
        }
    }
}

fn store_waker(slot: &mut Option<Waker>, cx: &Context<'_>) {
    match slot {
        Some(w) if w.will_wake(cx.waker()) => {}
        _ => *slot = Some(cx.waker().clone()),
    }
}

/// What [`TcpFlow::poll_lend`] offers the received bytes to: it returns how
/// many it took, or `Pending` after registering the waker.
pub type Taker<'a> = dyn FnMut(&mut Context<'_>, &[u8]) -> Poll<io::Result<usize>> + 'a;

/// An accepted TCP flow: the bytes the client sends are read here, and bytes
/// written here reach the client.
///
/// [`AsyncWriteExt::shutdown`](tokio::io::AsyncWriteExt::shutdown) sends a
/// FIN after the buffered data (half-close: reading goes on until the client
/// closes too). A read of 0 bytes means the client shut down its side.
/// Dropping the stream closes it gracefully; [`reset`](Self::reset) aborts it
/// with a RST. A reset by the client shows as `ConnectionReset` errors.
#[derive(Debug)]
pub struct TcpFlow {
    shared: Arc<FlowShared>,
    cmd: mpsc::UnboundedSender<Command>,
    src: SocketAddrV4,
    dst: SocketAddrV4,
}

impl TcpFlow {
    pub(crate) fn new(
        shared: Arc<FlowShared>,
        cmd: mpsc::UnboundedSender<Command>,
        src: SocketAddrV4,
        dst: SocketAddrV4,
    ) -> Self {
        Self {
            shared,
            cmd,
            src,
            dst,
        }
    }

    /// The client's address and port.
    pub fn src(&self) -> SocketAddrV4 {
        self.src
    }

    /// The virtual address and port the client connected to.
    pub fn dst(&self) -> SocketAddrV4 {
        self.dst
    }

    /// Aborts the flow: the client gets a RST, buffered data is discarded.
    pub fn reset(self) {
        self.shared.lock().reset_requested = true;
        // Drop notifies the stack.
    }

    /// Offers the bytes received from the client, not yet read, to `take`
    /// without copying them out, front first; `take` returns how many it
    /// took, or `Pending` (having registered the waker) when it can take
    /// none. `Some(n)`: `n` bytes (at least one) were taken; `None`: the
    /// client finished sending and everything was taken. `Pending` when
    /// nothing is buffered yet or `take` took nothing.
    ///
    /// The flow's lock is held while `take` runs, so `take` must not block.
    pub fn poll_lend(
        &mut self,
        cx: &mut Context<'_>,
        take: &mut Taker<'_>,
    ) -> Poll<io::Result<Option<usize>>> {
        let mut b = self.shared.lock();
        if let Some(kind) = b.error {
            return Poll::Ready(Err(kind.into()));
        }
        if b.rx.is_empty() {
            if b.rx_eof || b.detached {
                return Poll::Ready(Ok(None));
            }
            store_waker(&mut b.read_waker, cx);
            return Poll::Pending;
        }
        let mut taken = 0;
        let mut failed = None;
        while !b.rx.is_empty() {
            let (front, _) = b.rx.as_slices();
            let offered = front.len();
            match take(cx, front) {
                Poll::Ready(Ok(n)) => {
                    let n = n.min(offered);
                    b.rx.drain(..n);
                    taken += n;
                    if n < offered {
                        break;
                    }
                }
                Poll::Ready(Err(e)) => {
                    failed = Some(e);
                    break;
                }
                Poll::Pending => break,
            }
        }
        drop(b);
        if taken > 0 {
            // Room in the receive buffer: the stack may move more in.
            self.notify();
        }
        match failed {
            Some(e) => Poll::Ready(Err(e)),
            None if taken > 0 => Poll::Ready(Ok(Some(taken))),
            None => Poll::Pending,
        }
    }

    fn notify(&self) {
        if !self.shared.notified.swap(true, Ordering::AcqRel) {
            let _ = self.cmd.send(Command::Wake { id: self.shared.id });
        }
    }
}

impl Drop for TcpFlow {
    fn drop(&mut self) {
        self.shared.lock().dropped = true;
        self.notify();
    }
}

impl AsyncRead for TcpFlow {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        out: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let mut b = self.shared.lock();
        if let Some(kind) = b.error {
            return Poll::Ready(Err(kind.into()));
        }
        if !b.rx.is_empty() {
            let n = out.remaining().min(b.rx.len());
            let (front, back) = b.rx.as_slices();
            let first = n.min(front.len());
            out.put_slice(&front[..first]);
            out.put_slice(&back[..n - first]);
            b.rx.drain(..n);
            drop(b);
            self.notify();
            return Poll::Ready(Ok(()));
        }
        if b.rx_eof || b.detached || out.remaining() == 0 {
            return Poll::Ready(Ok(()));
        }
        store_waker(&mut b.read_waker, cx);
        Poll::Pending
    }
}

impl AsyncWrite for TcpFlow {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        let mut b = self.shared.lock();
        if let Some(kind) = b.error {
            return Poll::Ready(Err(kind.into()));
        }
        if b.tx_shutdown || b.detached {
            return Poll::Ready(Err(io::ErrorKind::BrokenPipe.into()));
        }
        if data.is_empty() {
            return Poll::Ready(Ok(0));
        }
        let room = b.cap.saturating_sub(b.tx.len());
        if room == 0 {
            store_waker(&mut b.write_waker, cx);
            return Poll::Pending;
        }
        let n = room.min(data.len());
        b.tx.extend(&data[..n]);
        drop(b);
        self.notify();
        Poll::Ready(Ok(n))
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        // Buffered bytes are handed to TCP as soon as the window allows;
        // there is nothing to push.
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        {
            let mut b = self.shared.lock();
            if let Some(kind) = b.error {
                return Poll::Ready(Err(kind.into()));
            }
            b.tx_shutdown = true;
        }
        self.notify();
        Poll::Ready(Ok(()))
    }
}
