//! Streams multiplexed over a pipe: the tokio layer over [`proto::mux::Mux`].
//!
//! [`spawn_session`] splits the pipe and starts three tasks that share the
//! state machine behind one mutex with the stream handles:
//!
//! - the *reader* reads the pipe into a 256 KiB buffer and feeds it to the
//!   machine (DATA payloads stay slices of that buffer until the application
//!   reads them);
//! - the *writer* takes everything the machine has queued (frames of all
//!   streams, up to about 1 MiB) and writes it, while the application keeps
//!   queueing into a second buffer; opens, their answers, window updates
//!   and pings go first, so a new stream never waits behind another
//!   stream's backlog of DATA (only behind the batch already being written);
//! - the *timer* fires keep-alives and detects a dead peer, independently of
//!   a writer that may be stuck on a full socket.
//!
//! Application tasks lock the mutex for one bounded operation (a copy of at
//! most [`MAX_WRITE_PER_CALL`] bytes, never across an `.await`) and park
//! their wakers in the shared state; the tasks wake exactly the streams the
//! machine reports as readable or writable.
//!
//! The session ends on [`MuxHandle::close`], on a GOAWAY or a protocol
//! violation from the peer, on an I/O error, when the peer goes silent for
//! [`MuxConfig::idle_timeout`], or once every handle, the [`Incoming`] and
//! every stream were dropped. Its open streams then fail with
//! [`io::ErrorKind::ConnectionReset`] (reads) or [`io::ErrorKind::BrokenPipe`]
//! (writes), never with a silent end of stream.

use std::collections::HashMap;
use std::fmt;
use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use proto::mux::{CloseReason, Event, Mux, StreamError};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::sync::{Notify, mpsc, oneshot, watch};
use tracing::{debug, trace};

pub use proto::mux::{Config as MuxConfig, Side, StreamId};

/// Bytes the reader asks the pipe for at once.
const READ_CHUNK: usize = 256 * 1024;

/// How long a pipe whose peer refused a stream for room is passed over
/// for new streams.
const PEER_FULL_FOR: Duration = Duration::from_secs(1);

/// Read buffers kept for reuse once the streams have taken every chunk of
/// them (see [`ReadBuffers`]).
const SPARE_READ_BUFFERS: usize = 2;

/// Most bytes one `poll_write` copies into the session while holding its
/// lock, so that other streams and the I/O tasks never wait long.
pub const MAX_WRITE_PER_CALL: usize = 256 * 1024;

/// How long a closing session keeps trying to flush its last frames
/// (GOAWAY) before dropping the pipe.
const LINGER: Duration = Duration::from_secs(2);

/// Why a session ended.
#[derive(Debug, Clone, thiserror::Error)]
pub enum SessionEnd {
    /// The multiplexer ended it (local close, GOAWAY, idle timeout,
    /// protocol violation).
    #[error(transparent)]
    Mux(#[from] CloseReason),
    /// Reading or writing the pipe failed.
    #[error("pipe I/O failed: {0}")]
    Io(Arc<io::Error>),
    /// The peer closed the pipe without a GOAWAY.
    #[error("the peer closed the pipe without saying goodbye")]
    Eof,
}

/// Why [`MuxHandle::open`] failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum OpenError {
    /// The peer refused the stream; the payload says why.
    #[error("stream rejected by the peer: {}", String::from_utf8_lossy(.0))]
    Rejected(Bytes),
    /// The peer reset the stream instead of answering.
    #[error("the peer reset the stream instead of answering")]
    Reset,
    /// The request does not fit in one frame.
    #[error("open request of {0} bytes is too large")]
    RequestTooLarge(usize),
    /// The session has ended (or ran out of stream ids); open a new pipe.
    #[error("session closed: {0}")]
    SessionClosed(SessionEnd),
}

#[derive(Default)]
struct Wakers {
    read: Option<Waker>,
    write: Option<Waker>,
}

impl Wakers {
    fn wake_all(&mut self) {
        if let Some(w) = self.read.take() {
            w.wake();
        }
        if let Some(w) = self.write.take() {
            w.wake();
        }
    }
}

fn park(slot: &mut Option<Waker>, cx: &Context<'_>) {
    match slot {
        Some(w) if w.will_wake(cx.waker()) => {}
        _ => *slot = Some(cx.waker().clone()),
    }
}

type OpenResult = Result<Bytes, OpenError>;

/// Everything the tasks and handles share, behind one mutex.
struct Shared {
    mux: Mux,
    wakers: HashMap<StreamId, Wakers>,
    opens: HashMap<StreamId, oneshot::Sender<OpenResult>>,
    incoming: Option<mpsc::UnboundedSender<PendingStream>>,
    end: Option<SessionEnd>,
    /// Until when the peer is taken to have no room for another stream,
    /// after it refused one for room ([`MuxHandle::peer_is_full`]).
    peer_full_until: Option<std::time::Instant>,
}

struct Inner {
    shared: Mutex<Shared>,
    /// Output is waiting, or the session closed.
    writer: Notify,
    /// The output backlog shrank: the reader may resume.
    reader: Notify,
    closed: watch::Sender<bool>,
}

/// Holds the session open while any application-side object exists; the
/// last one dropped closes it.
struct Session {
    inner: Arc<Inner>,
}

impl Drop for Session {
    fn drop(&mut self) {
        self.inner.end_session(None, "every handle was dropped");
    }
}

impl Inner {
    fn lock(&self) -> MutexGuard<'_, Shared> {
        // A panic while holding the lock is a bug in this module or in
        // proto; the state it left is still the best there is.
        self.shared
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Runs `f` on the shared state, then hands the machine's events out
    /// and wakes the writer if `f` queued the first bytes to send.
    fn with<R>(&self, f: impl FnOnce(&mut Shared) -> R) -> R {
        let mut s = self.lock();
        let had_output = s.mux.pending_output() > 0;
        let r = f(&mut s);
        self.dispatch(&mut s);
        if !had_output && s.mux.pending_output() > 0 {
            self.writer.notify_one();
        }
        r
    }

    /// Ends the session unless already ended. `end` is recorded as the
    /// reason; `None` means a local close.
    fn end_session(&self, end: Option<SessionEnd>, why: &str) {
        self.with(|s| {
            if s.end.is_none()
                && let Some(end) = end
            {
                s.end = Some(end);
            }
            s.mux.close(why);
        });
        // The GOAWAY (if any) must still be flushed.
        self.writer.notify_one();
    }

    fn dispatch(&self, s: &mut Shared) {
        while let Some(event) = s.mux.poll_event() {
            trace!(?event, "mux event");
            match event {
                Event::IncomingStream { id, request } => {
                    let pending = PendingStream {
                        session: None,
                        id,
                        request,
                        answered: false,
                    };
                    let Some(tx) = &s.incoming else {
                        let _ = s
                            .mux
                            .reject(id, Bytes::from_static(b"this side accepts no streams"));
                        continue;
                    };
                    if let Err(mpsc::error::SendError(mut pending)) = tx.send(pending) {
                        pending.answered = true;
                        let _ = s
                            .mux
                            .reject(id, Bytes::from_static(b"this side accepts no streams"));
                    }
                }
                Event::Accepted { id, payload } => {
                    if let Some(tx) = s.opens.remove(&id)
                        && tx.send(Ok(payload)).is_err()
                    {
                        // The opener gave up waiting.
                        s.mux.reset(id);
                    }
                }
                Event::Rejected { id, payload } => {
                    if let Some(tx) = s.opens.remove(&id) {
                        let _ = tx.send(Err(OpenError::Rejected(payload)));
                    }
                }
                Event::Readable { id } | Event::Finished { id } => {
                    if let Some(w) = s.wakers.get_mut(&id).and_then(|w| w.read.take()) {
                        w.wake();
                    }
                }
                Event::Writable { id } => {
                    if let Some(w) = s.wakers.get_mut(&id).and_then(|w| w.write.take()) {
                        w.wake();
                    }
                }
                Event::Reset { id } => {
                    if let Some(tx) = s.opens.remove(&id) {
                        let _ = tx.send(Err(OpenError::Reset));
                    }
                    if let Some(w) = s.wakers.get_mut(&id) {
                        w.wake_all();
                    }
                }
                Event::Closed { reason } => {
                    debug!(%reason, "mux session closed");
                    let end = s.end.get_or_insert(SessionEnd::Mux(reason)).clone();
                    for (_, tx) in s.opens.drain() {
                        let _ = tx.send(Err(OpenError::SessionClosed(end.clone())));
                    }
                    for w in s.wakers.values_mut() {
                        w.wake_all();
                    }
                    s.incoming = None;
                    self.closed.send_replace(true);
                    self.writer.notify_one();
                    self.reader.notify_one();
                }
            }
        }
    }

    fn end(&self, s: &Shared) -> SessionEnd {
        s.end.clone().unwrap_or(SessionEnd::Mux(CloseReason::Local))
    }
}

/// Starts a multiplexed session over `io` (in production a TLS stream
/// inside a pipe) and returns the handle to open streams and the queue of
/// streams the peer opens. Must be called within a tokio runtime.
pub fn spawn_session<IO>(io: IO, side: Side, cfg: MuxConfig) -> (MuxHandle, Incoming)
where
    IO: AsyncRead + AsyncWrite + Send + Unpin + 'static,
{
    let (tx, rx) = mpsc::unbounded_channel();
    let inner = Arc::new(Inner {
        shared: Mutex::new(Shared {
            mux: Mux::new(side, cfg, now()),
            wakers: HashMap::new(),
            opens: HashMap::new(),
            incoming: Some(tx),
            end: None,
            peer_full_until: None,
        }),
        writer: Notify::new(),
        reader: Notify::new(),
        closed: watch::channel(false).0,
    });
    let (rd, wr) = tokio::io::split(io);
    tokio::spawn(reader_task(inner.clone(), rd));
    tokio::spawn(writer_task(inner.clone(), wr));
    tokio::spawn(timer_task(inner.clone()));
    let session = Arc::new(Session { inner });
    (
        MuxHandle {
            session: session.clone(),
        },
        Incoming { session, rx },
    )
}

/// The reader's buffer and the ones it filled before.
///
/// What the reader receives is handed to the streams as slices of its
/// buffer, without a copy, so a buffer is free again only once every
/// stream has passed its chunks on. Allocating a fresh buffer whenever the
/// current one is full cost page faults on every 256 KiB received (fresh
/// memory is mapped a page at a time on first write): a quarter of the
/// appliance's CPU in the on-prem → app profile. So the last few buffers
/// are kept and the first that is whole again is filled anew. Spares are
/// let go when reads turn small, so an idle pipe holds one buffer.
#[derive(Debug)]
struct ReadBuffers {
    current: BytesMut,
    spare: std::collections::VecDeque<BytesMut>,
}

impl ReadBuffers {
    fn new() -> ReadBuffers {
        ReadBuffers {
            current: BytesMut::with_capacity(READ_CHUNK),
            spare: std::collections::VecDeque::new(),
        }
    }

    /// Makes room for a read of [`READ_CHUNK`] when less than a quarter
    /// of it is left, carrying over the start of a frame not yet whole.
    fn make_room(&mut self) {
        if self.current.capacity() - self.current.len() >= READ_CHUNK / 4
            || self.current.try_reclaim(READ_CHUNK)
        {
            return;
        }
        let whole = (0..self.spare.len()).find_map(|_| {
            let mut buf = self.spare.pop_front()?;
            if buf.try_reclaim(READ_CHUNK) {
                Some(buf)
            } else {
                self.spare.push_back(buf);
                None
            }
        });
        let mut next = whole.unwrap_or_else(|| BytesMut::with_capacity(READ_CHUNK));
        next.extend_from_slice(&self.current);
        let mut filled = std::mem::replace(&mut self.current, next);
        filled.clear();
        self.spare.push_back(filled);
        while self.spare.len() > SPARE_READ_BUFFERS {
            self.spare.pop_front();
        }
    }

    /// After a read of `n` bytes: a small one means traffic is light, and
    /// the spares are let go.
    fn read(&mut self, n: usize) {
        if n < READ_CHUNK / 16 {
            self.spare.clear();
        }
    }
}

async fn reader_task<R: AsyncRead + Unpin>(inner: Arc<Inner>, mut rd: R) {
    let mut closed = inner.closed.subscribe();
    let mut bufs = ReadBuffers::new();
    loop {
        loop {
            let wants_input = {
                let s = inner.lock();
                if s.mux.is_closed() {
                    return;
                }
                s.mux.wants_input()
            };
            if wants_input {
                break;
            }
            inner.reader.notified().await;
        }
        bufs.make_room();
        let read = tokio::select! {
            r = rd.read_buf(&mut bufs.current) => r,
            _ = wait_closed(&mut closed) => return,
        };
        match read {
            Ok(0) => {
                inner.end_session(Some(SessionEnd::Eof), "pipe closed");
                return;
            }
            Ok(n) => {
                bufs.read(n);
                inner.with(|s| s.mux.handle_input(&mut bufs.current, now()));
            }
            Err(e) => {
                inner.end_session(Some(SessionEnd::Io(Arc::new(e))), "pipe read failed");
                return;
            }
        }
    }
}

async fn writer_task<W: AsyncWrite + Unpin>(inner: Arc<Inner>, mut wr: W) {
    let mut closed_rx = inner.closed.subscribe();
    let mut urgent = BytesMut::new();
    let mut out = BytesMut::with_capacity(1024 * 1024);
    loop {
        let closed = inner.with(|s| {
            let was_backlogged = !s.mux.wants_input();
            s.mux.poll_transmit_split(&mut urgent, &mut out);
            if was_backlogged {
                inner.reader.notify_one();
            }
            s.mux.is_closed()
        });
        if urgent.is_empty() && out.is_empty() {
            if closed {
                let _ = tokio::time::timeout(LINGER, wr.shutdown()).await;
                return;
            }
            inner.writer.notified().await;
            continue;
        }
        let result = {
            let write = write_batch(&mut wr, &urgent, &out);
            tokio::pin!(write);
            tokio::select! {
                r = &mut write => r,
                _ = wait_closed(&mut closed_rx), if !closed => {
                    // Closing: finish this batch if the pipe lets us, then
                    // flush the GOAWAY on the next round.
                    tokio::time::timeout(LINGER, write)
                        .await
                        .unwrap_or_else(|_| Err(io::ErrorKind::TimedOut.into()))
                }
            }
        };
        urgent.clear();
        out.clear();
        if let Err(e) = result {
            if !closed {
                inner.end_session(Some(SessionEnd::Io(Arc::new(e))), "pipe write failed");
            }
            return;
        }
    }
}

/// The current time as the state machine sees it: tokio's clock, so that
/// tests with paused time drive keep-alives too.
fn now() -> Instant {
    tokio::time::Instant::now().into_std()
}

async fn wait_closed(rx: &mut watch::Receiver<bool>) {
    let _ = rx.wait_for(|c| *c).await;
}

/// Writes the frames that jump the queue, then the rest, then flushes.
async fn write_batch<W: AsyncWrite + Unpin>(
    wr: &mut W,
    urgent: &[u8],
    out: &[u8],
) -> io::Result<()> {
    wr.write_all(urgent).await?;
    wr.write_all(out).await?;
    wr.flush().await
}

async fn timer_task(inner: Arc<Inner>) {
    let mut closed = inner.closed.subscribe();
    loop {
        let Some(deadline) = inner.lock().mux.poll_timeout() else {
            return;
        };
        let sleep = tokio::time::sleep_until(tokio::time::Instant::from_std(deadline));
        tokio::select! {
            _ = sleep => {}
            _ = wait_closed(&mut closed) => return,
        }
        inner.with(|s| s.mux.handle_timeout(now()));
    }
}

/// Opens streams on a session and observes it. Cheap to clone; the session
/// ends when it, the [`Incoming`] and every stream are dropped.
#[derive(Clone)]
pub struct MuxHandle {
    session: Arc<Session>,
}

impl fmt::Debug for MuxHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MuxHandle")
            .field("closed", &self.is_closed())
            .finish()
    }
}

impl MuxHandle {
    /// Opens a stream carrying `request` and waits for the peer's answer:
    /// the stream and the accept payload, or why not. One round trip.
    /// Dropping the future before the answer resets the stream.
    pub async fn open(&self, request: Bytes) -> Result<(MuxStream, Bytes), OpenError> {
        let inner = &self.session.inner;
        let (tx, rx) = oneshot::channel();
        let id = inner.with(|s| match s.mux.open(request) {
            Ok(id) => {
                s.opens.insert(id, tx);
                Ok(id)
            }
            Err(proto::mux::OpenError::RequestTooLarge { len, .. }) => {
                Err(OpenError::RequestTooLarge(len))
            }
            // Refused here as the peer would refuse it.
            Err(proto::mux::OpenError::SessionFull) => Err(OpenError::Rejected(
                Bytes::from_static(proto::mux::TOO_MANY_STREAMS),
            )),
            Err(_) => Err(OpenError::SessionClosed(inner.end(s))),
        })?;
        let mut guard = OpenGuard {
            inner,
            id,
            rx: Some(rx),
        };
        // The guard was built with `Some(rx)` on the line above.
        let rx = guard.rx.as_mut().expect("receiver present until answered");
        let answer = rx.await;
        guard.rx = None;
        match answer {
            Ok(Ok(payload)) => Ok((MuxStream::new(self.session.clone(), id), payload)),
            Ok(Err(e)) => Err(e),
            Err(_) => Err(OpenError::SessionClosed(inner.with(|s| inner.end(s)))),
        }
    }

    /// Whether the session has ended.
    pub fn is_closed(&self) -> bool {
        *self.session.inner.closed.borrow()
    }

    /// Why the session ended, once it has.
    pub fn close_reason(&self) -> Option<SessionEnd> {
        let inner = &self.session.inner;
        let s = inner.lock();
        s.mux.is_closed().then(|| inner.end(&s))
    }

    /// Resolves when the session ends (peer dead, I/O error, GOAWAY, close).
    pub async fn closed(&self) {
        wait_closed(&mut self.session.inner.closed.subscribe()).await;
    }

    /// Streams currently held by the session: open, being opened, awaiting
    /// an answer, or reset and not yet dropped.
    pub fn open_streams(&self) -> usize {
        self.session.inner.lock().mux.stream_count()
    }

    /// Whether [`MuxHandle::open`] would be given a stream now rather than
    /// refused for a full session ([`proto::mux::Mux::can_open`]), and the
    /// peer has not just refused one for room.
    pub fn can_open(&self) -> bool {
        let s = self.session.inner.lock();
        s.mux.can_open()
            && s.peer_full_until
                .is_none_or(|until| std::time::Instant::now() >= until)
    }

    /// Records that the peer refused a stream for room
    /// ([`proto::mux::TOO_MANY_STREAMS`]): [`MuxHandle::can_open`] says no
    /// for the next [`PEER_FULL_FOR`]. The two ends count room alike only
    /// while every stream keeps its base window; the peer may have given
    /// some more, and a sender that went on choosing this pipe because it
    /// still counted room was refused on it every time.
    pub fn peer_is_full(&self) {
        self.session.inner.lock().peer_full_until = Some(std::time::Instant::now() + PEER_FULL_FOR);
    }

    /// Ends the session: sends GOAWAY, fails every stream, closes the pipe.
    pub fn close(&self) {
        self.session
            .inner
            .end_session(None, "closed by the application");
    }
}

/// Resets a stream whose `open` future was dropped before it completed.
struct OpenGuard<'a> {
    inner: &'a Inner,
    id: StreamId,
    rx: Option<oneshot::Receiver<OpenResult>>,
}

impl Drop for OpenGuard<'_> {
    fn drop(&mut self) {
        let Some(mut rx) = self.rx.take() else { return };
        let id = self.id;
        // An answer that arrived but was never taken is an open stream
        // nobody owns; no answer yet means the stream is still opening.
        let accepted = matches!(rx.try_recv(), Ok(Ok(_)));
        self.inner.with(|s| {
            if s.opens.remove(&id).is_some() || accepted {
                s.mux.reset(id);
            }
        });
    }
}

/// Streams opened by the peer, in order.
pub struct Incoming {
    session: Arc<Session>,
    rx: mpsc::UnboundedReceiver<PendingStream>,
}

impl fmt::Debug for Incoming {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Incoming").finish_non_exhaustive()
    }
}

impl Incoming {
    /// Next stream the peer opened, to accept or reject; `None` once the
    /// session has ended.
    pub async fn next(&mut self) -> Option<PendingStream> {
        let mut pending = self.rx.recv().await?;
        pending.session = Some(self.session.clone());
        Some(pending)
    }
}

/// A stream the peer opened, waiting for an answer. Dropping it rejects
/// the stream with an empty payload.
pub struct PendingStream {
    /// Set when handed out by [`Incoming::next`] (creating it inside the
    /// session lock must not clone the last reference of anything).
    session: Option<Arc<Session>>,
    id: StreamId,
    request: Bytes,
    answered: bool,
}

impl fmt::Debug for PendingStream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PendingStream")
            .field("id", &self.id)
            .field("request_len", &self.request.len())
            .finish()
    }
}

impl PendingStream {
    /// What the peer asks for (e.g. the hybrid connection name).
    pub fn request(&self) -> &[u8] {
        &self.request
    }

    /// The stream's id within the pipe (for logs).
    pub fn id(&self) -> StreamId {
        self.id
    }

    /// Accepts the stream, sending `payload` to the opener. If the peer
    /// gave up or the session ended meanwhile, the stream's reads and
    /// writes fail.
    pub fn accept(mut self, payload: Bytes) -> MuxStream {
        self.answered = true;
        // Only `Incoming::next` hands a PendingStream out, and it sets this.
        let session = self
            .session
            .take()
            .expect("PendingStream is only handed out by Incoming::next");
        let id = self.id;
        session.inner.with(|s| {
            let _ = s.mux.accept(id, payload);
        });
        MuxStream::new(session, id)
    }

    /// Refuses the stream; the opener's `open` fails with
    /// [`OpenError::Rejected`] carrying `payload`.
    pub fn reject(mut self, payload: Bytes) {
        self.answered = true;
        if let Some(session) = &self.session {
            let id = self.id;
            session.inner.with(|s| {
                let _ = s.mux.reject(id, payload);
            });
        }
    }
}

impl Drop for PendingStream {
    fn drop(&mut self) {
        if !self.answered
            && let Some(session) = &self.session
        {
            let id = self.id;
            session.inner.with(|s| {
                let _ = s.mux.reject(id, Bytes::new());
            });
        }
    }
}

/// One multiplexed stream: a byte stream both ways with its own flow
/// control.
///
/// `poll_shutdown` half-closes it (the peer reads the end of the stream;
/// the other direction keeps flowing). Dropping it before both directions
/// finished resets it: the peer's reads and writes fail with
/// [`io::ErrorKind::ConnectionReset`] / [`io::ErrorKind::BrokenPipe`].
pub struct MuxStream {
    session: Arc<Session>,
    id: StreamId,
    read_eof: bool,
    write_shut: bool,
}

impl fmt::Debug for MuxStream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MuxStream")
            .field("id", &self.id)
            .field("read_eof", &self.read_eof)
            .field("write_shut", &self.write_shut)
            .finish()
    }
}

impl MuxStream {
    fn new(session: Arc<Session>, id: StreamId) -> Self {
        session.inner.lock().wakers.insert(id, Wakers::default());
        Self {
            session,
            id,
            read_eof: false,
            write_shut: false,
        }
    }

    /// The stream's id within the pipe (for logs).
    pub fn id(&self) -> StreamId {
        self.id
    }

    /// Received bytes waiting to be read; never more than the stream's
    /// receive window ([`MuxConfig::max_window`] at most).
    pub fn buffered_len(&self) -> u64 {
        self.session.inner.lock().mux.buffered(self.id).unwrap_or(0)
    }

    /// The next received chunk of at most `max` bytes, without copying it
    /// (a slice of the pipe's read buffer); `None` is the end of the stream.
    pub fn poll_read_chunk(
        &mut self,
        cx: &mut Context<'_>,
        max: usize,
    ) -> Poll<io::Result<Option<Bytes>>> {
        if self.read_eof {
            return Poll::Ready(Ok(None));
        }
        let inner = &self.session.inner;
        let id = self.id;
        let mut s = inner.lock();
        let had_output = s.mux.pending_output() > 0;
        let result = match s.mux.read_chunk(id, max.max(1), now()) {
            Ok(Some(chunk)) => Poll::Ready(Ok(Some(chunk))),
            Ok(None) => {
                self.read_eof = true;
                Poll::Ready(Ok(None))
            }
            Err(StreamError::Blocked) => {
                if let Some(w) = s.wakers.get_mut(&id) {
                    park(&mut w.read, cx);
                }
                Poll::Pending
            }
            Err(e) => Poll::Ready(Err(self.error(&s, e, false))),
        };
        // Reading may have granted credit (WINDOW) or released the stream.
        inner.dispatch(&mut s);
        if !had_output && s.mux.pending_output() > 0 {
            inner.writer.notify_one();
        }
        result
    }

    fn error(&self, s: &Shared, e: StreamError, write: bool) -> io::Error {
        let kind = if write {
            io::ErrorKind::BrokenPipe
        } else {
            io::ErrorKind::ConnectionReset
        };
        match e {
            StreamError::SessionClosed => io::Error::new(
                kind,
                format!("mux session closed: {}", self.session.inner.end(s)),
            ),
            StreamError::Reset | StreamError::UnknownStream(_) => {
                io::Error::new(kind, format!("stream {} was reset by the peer", self.id))
            }
            StreamError::Finished => io::Error::new(kind, "write after shutdown"),
            StreamError::Blocked | StreamError::InvalidState => io::Error::other(e),
        }
    }
}

impl AsyncRead for MuxStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.read_eof || buf.remaining() == 0 {
            return Poll::Ready(Ok(()));
        }
        let inner = &this.session.inner;
        let id = this.id;
        let now = now();
        let mut s = inner.lock();
        let had_output = s.mux.pending_output() > 0;
        let mut got = 0;
        let result = loop {
            match s.mux.read_chunk(id, buf.remaining(), now) {
                Ok(Some(chunk)) => {
                    got += chunk.len();
                    buf.put_slice(&chunk);
                    if buf.remaining() == 0 {
                        break Poll::Ready(Ok(()));
                    }
                }
                Ok(None) => {
                    this.read_eof = true;
                    break Poll::Ready(Ok(()));
                }
                Err(_) if got > 0 => break Poll::Ready(Ok(())),
                Err(StreamError::Blocked) => {
                    if let Some(w) = s.wakers.get_mut(&id) {
                        park(&mut w.read, cx);
                    }
                    break Poll::Pending;
                }
                Err(e) => break Poll::Ready(Err(this.error(&s, e, false))),
            }
        };
        // Reading may have granted credit (WINDOW) or released the stream.
        inner.dispatch(&mut s);
        if !had_output && s.mux.pending_output() > 0 {
            inner.writer.notify_one();
        }
        result
    }
}

impl AsyncWrite for MuxStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let inner = &this.session.inner;
        let id = this.id;
        let buf = &buf[..buf.len().min(MAX_WRITE_PER_CALL)];
        let mut s = inner.lock();
        let had_output = s.mux.pending_output() > 0;
        let result = match s.mux.write(id, buf) {
            Ok(n) => Poll::Ready(Ok(n)),
            Err(StreamError::Blocked) => {
                if let Some(w) = s.wakers.get_mut(&id) {
                    park(&mut w.write, cx);
                }
                Poll::Pending
            }
            Err(e) => Poll::Ready(Err(this.error(&s, e, true))),
        };
        if !had_output && s.mux.pending_output() > 0 {
            inner.writer.notify_one();
        }
        result
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        // Written bytes are already queued for the writer task, which
        // flushes every batch.
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.write_shut {
            return Poll::Ready(Ok(()));
        }
        let id = this.id;
        let inner = &this.session.inner;
        let result = inner.with(|s| s.mux.shutdown_write(id).map_err(|e| this.error(s, e, true)));
        this.write_shut = result.is_ok();
        Poll::Ready(result)
    }
}

impl Drop for MuxStream {
    fn drop(&mut self) {
        let id = self.id;
        self.session.inner.with(|s| {
            s.wakers.remove(&id);
            s.mux.reset(id);
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Fills the current buffer and hands all of it out as one chunk, as
    /// the multiplexer does with the frames it parses.
    fn fill_and_take(bufs: &mut ReadBuffers) -> bytes::Bytes {
        bufs.make_room();
        let room = bufs.current.capacity() - bufs.current.len();
        bufs.current.extend_from_slice(&vec![7u8; room]);
        bufs.read(room);
        bufs.current.split().freeze()
    }

    #[test]
    fn a_read_buffer_is_filled_again_once_its_chunks_are_gone() {
        let mut bufs = ReadBuffers::new();
        let first = bufs.current.as_ptr();
        let chunk = fill_and_take(&mut bufs);
        drop(chunk);
        bufs.make_room();
        assert_eq!(bufs.current.as_ptr(), first, "reused in place");

        // Chunks still held by streams: a new buffer, the old one kept;
        // once they are gone, the old one is taken again.
        let held = fill_and_take(&mut bufs);
        bufs.make_room();
        let second = bufs.current.as_ptr();
        assert_ne!(second, first);
        drop(held);
        let held2 = fill_and_take(&mut bufs);
        bufs.make_room();
        assert_eq!(bufs.current.as_ptr(), first, "the spare, whole again");
        drop(held2);
    }

    #[test]
    fn spares_are_bounded_and_let_go_when_reads_turn_small() {
        let mut bufs = ReadBuffers::new();
        let held: Vec<_> = (0..6).map(|_| fill_and_take(&mut bufs)).collect();
        bufs.make_room();
        assert!(bufs.spare.len() <= SPARE_READ_BUFFERS);
        drop(held);
        bufs.read(100);
        assert!(bufs.spare.is_empty());
    }

    #[test]
    fn the_start_of_a_frame_is_carried_into_the_next_buffer() {
        let mut bufs = ReadBuffers::new();
        let _held = fill_and_take(&mut bufs);
        bufs.make_room();
        let room = bufs.current.capacity() - bufs.current.len();
        bufs.current.extend_from_slice(&vec![1u8; room - 10]);
        let _held2 = bufs.current.split_to(room - 13).freeze();
        assert_eq!(&bufs.current[..], &[1, 1, 1]);
        bufs.make_room();
        assert_eq!(&bufs.current[..], &[1, 1, 1]);
        assert!(bufs.current.capacity() - bufs.current.len() >= READ_CHUNK / 4);
    }
}
