//! The stream multiplexer of a pipe, as a state machine without I/O.
//!
//! One [`Mux`] holds the state of one side of one pipe. Bytes read from the
//! pipe go in through [`Mux::handle_input`], the current time through
//! [`Mux::handle_timeout`]; bytes to write come out of [`Mux::poll_transmit`],
//! things the application must know about out of [`Mux::poll_event`] and the
//! next deadline out of [`Mux::poll_timeout`]. The application side opens,
//! accepts, reads and writes streams with the other methods. Nothing here
//! reads a clock: every method that needs the time takes `now`.
//!
//! # Flow control
//!
//! Every stream starts with [`BASE_WINDOW`] bytes of credit in each
//! direction; each side raises the credit it grants to its configured
//! [`Config::initial_window`] with a WINDOW frame sent along with OPEN or
//! ACCEPT. The receiver grants more credit once the application has consumed
//! half of the window, so at most one window of unread bytes is ever buffered
//! per stream, and a reader that stops stalls only its own stream. Like QUIC,
//! a window that is refilled faster than every two round trips is the
//! bottleneck, so it doubles, up to [`Config::max_window`] per stream and
//! [`Config::max_session_window`] for all streams together. The round-trip
//! time is measured with PING/PONG. A peer that sends beyond its credit
//! breaks the protocol and the session is closed.
//!
//! # Liveness
//!
//! After [`Config::keepalive_interval`] without receiving anything, a PING is
//! sent (and again every interval); after [`Config::idle_timeout`] without
//! receiving anything the peer is considered dead and the session closes
//! with [`CloseReason::IdleTimeout`].
//!
//! # Memory
//!
//! DATA payloads of at least [`ZERO_COPY_MIN`] bytes are kept as slices of the
//! caller's input buffer, without copying; smaller ones are copied so that a
//! stalled stream holding many tiny frames cannot pin many large input
//! buffers. DoS note: a stalled stream's zero-copy slices can still pin up to
//! `input buffer size / ZERO_COPY_MIN` times their own size; callers read
//! into buffers of a few hundred KiB at most.

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};

pub use crate::frame::StreamId;
use crate::frame::{self, Frame, FrameError, FrameType, HEADER_LEN, MAX_DATA_PAYLOAD};

/// Credit each side implicitly grants on every new stream, before any
/// WINDOW frame.
pub const BASE_WINDOW: u32 = 64 * 1024;

/// DATA payloads of this size or more are buffered without copying.
pub const ZERO_COPY_MIN: usize = 4 * 1024;

/// How often the round-trip time is re-measured while windows are granted.
const RTT_PROBE_INTERVAL: Duration = Duration::from_millis(100);

/// Payload of the REJECT sent for an OPEN past [`Config::max_streams`].
pub const TOO_MANY_STREAMS: &[u8] = b"too many concurrent streams on this pipe";

/// Which end of the pipe this is. The client opens odd stream ids, the
/// server even ones, so both can open streams without coordination.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    /// The end that dialled the pipe (appliance, `connect` client).
    Client,
    /// The end that was dialled (agent).
    Server,
}

/// Tuning of one multiplexed session.
///
/// Out-of-range values are clamped by [`Mux::new`]: windows to at least
/// [`BASE_WINDOW`], `max_window` to at least `initial_window`,
/// `max_buffered_output` to at least one DATA frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    /// Receive window every stream starts with, in bytes.
    pub initial_window: u32,
    /// Largest receive window a stream can grow to, in bytes.
    pub max_window: u32,
    /// Windows stop growing once the receive windows of all streams add up
    /// to this many bytes; bounds the memory of a session.
    pub max_session_window: u64,
    /// Send a PING after this long without receiving anything.
    pub keepalive_interval: Duration,
    /// Declare the peer dead after this long without receiving anything.
    pub idle_timeout: Duration,
    /// Most streams open at once (including not yet answered ones); further
    /// OPENs from the peer are rejected with [`TOO_MANY_STREAMS`].
    pub max_streams: usize,
    /// Largest frame payload accepted from the peer.
    pub max_frame_payload: u32,
    /// [`Mux::write`] refuses more data while this many bytes wait in the
    /// output buffer, so that the writers of all streams are paced by the
    /// pipe.
    pub max_buffered_output: usize,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            initial_window: 256 * 1024,
            max_window: 16 * 1024 * 1024,
            max_session_window: 256 * 1024 * 1024,
            keepalive_interval: Duration::from_secs(5),
            idle_timeout: Duration::from_secs(15),
            // As many as the appliance's netstack holds flows: one sender
            // keeps one pipe per agent, so this is the most connections an
            // application can hold to one agent. Memory stays bounded by the
            // session window, not by the stream count.
            max_streams: 16_384,
            max_frame_payload: frame::DEFAULT_MAX_PAYLOAD,
            max_buffered_output: 1024 * 1024,
        }
    }
}

/// Something the application must react to, from [`Mux::poll_event`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// The peer opened a stream; answer with [`Mux::accept`] or
    /// [`Mux::reject`].
    IncomingStream {
        /// The new stream.
        id: StreamId,
        /// What the peer asks for.
        request: Bytes,
    },
    /// The peer accepted a stream opened with [`Mux::open`].
    Accepted {
        /// The stream, now open.
        id: StreamId,
        /// The peer's answer.
        payload: Bytes,
    },
    /// The peer rejected a stream opened with [`Mux::open`]; it is gone.
    Rejected {
        /// The refused stream.
        id: StreamId,
        /// Why.
        payload: Bytes,
    },
    /// A stream that had nothing to read now has data.
    Readable {
        /// The stream.
        id: StreamId,
    },
    /// A stream whose last write was blocked can take more data.
    Writable {
        /// The stream.
        id: StreamId,
    },
    /// The peer half-closed a stream: after the buffered data, reads see
    /// the end of the stream.
    Finished {
        /// The stream.
        id: StreamId,
    },
    /// The peer aborted a stream. Release it with [`Mux::reset`].
    Reset {
        /// The stream.
        id: StreamId,
    },
    /// The session ended; no further events follow.
    Closed {
        /// Why.
        reason: CloseReason,
    },
}

/// The peer broke the protocol; the session is closed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProtocolError {
    /// A frame could not be decoded.
    #[error("malformed frame: {0}")]
    Frame(#[from] FrameError),
    /// The peer sent more than the credit it was granted.
    #[error(
        "peer sent {received} bytes on stream {id} but was granted only {limit}: flow control violated"
    )]
    FlowControl {
        /// The stream.
        id: StreamId,
        /// Bytes the peer was allowed to send in total.
        limit: u64,
        /// Bytes it sent in total.
        received: u64,
    },
    /// A frame names a stream that was never opened.
    #[error("{kind:?} frame for stream {id}, which was never opened")]
    UnopenedStream {
        /// The stream named.
        id: StreamId,
        /// The frame type.
        kind: FrameType,
    },
    /// The peer opened a stream with an id of our parity.
    #[error("peer opened stream {0}, an id reserved for streams this side opens")]
    WrongParity(StreamId),
    /// The peer opened a stream with an id not above its previous ones.
    #[error("peer opened stream {0} again or out of order")]
    IdNotIncreasing(StreamId),
    /// DATA or FIN before the stream was accepted.
    #[error("{kind:?} frame on stream {id} before it was accepted")]
    BeforeAccept {
        /// The stream.
        id: StreamId,
        /// The frame type.
        kind: FrameType,
    },
    /// DATA after the peer's FIN.
    #[error("DATA on stream {0} after the peer half-closed it")]
    DataAfterFin(StreamId),
    /// ACCEPT or REJECT for a stream that awaits no answer.
    #[error("{kind:?} frame for stream {id}, which awaits no answer")]
    UnexpectedAnswer {
        /// The stream.
        id: StreamId,
        /// The frame type.
        kind: FrameType,
    },
}

/// Why a session ended.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CloseReason {
    /// This side called [`Mux::close`].
    #[error("session closed locally")]
    Local,
    /// The peer sent GOAWAY.
    #[error("peer closed the session: {0}")]
    PeerGoAway(String),
    /// Nothing was received for [`Config::idle_timeout`].
    #[error("peer sent nothing for the idle timeout; it is presumed dead")]
    IdleTimeout,
    /// The peer broke the protocol.
    #[error("protocol violation by the peer: {0}")]
    Protocol(#[from] ProtocolError),
}

/// Why [`Mux::open`] failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OpenError {
    /// The session has ended.
    #[error("the session is closed")]
    SessionClosed,
    /// The request does not fit in one frame.
    #[error("open request of {len} bytes exceeds the frame limit of {max}")]
    RequestTooLarge {
        /// Request size.
        len: usize,
        /// Limit.
        max: u32,
    },
    /// All stream ids of this side were used; open a new pipe.
    #[error("stream ids of this pipe are exhausted; open a new pipe")]
    IdsExhausted,
}

/// Why an operation on one stream failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum StreamError {
    /// Nothing to read, or no credit or output room to write: retry after
    /// [`Event::Readable`] / [`Event::Writable`].
    #[error("the stream would block")]
    Blocked,
    /// The stream was aborted by the peer.
    #[error("the stream was reset by the peer")]
    Reset,
    /// Write after [`Mux::shutdown_write`].
    #[error("the stream was already shut down for writing")]
    Finished,
    /// The operation does not fit the stream's state (write before the
    /// stream was accepted, accept of a stream this side opened, ...).
    #[error("the stream is not in a state that allows this operation")]
    InvalidState,
    /// The session has ended.
    #[error("the session is closed")]
    SessionClosed,
    /// No such stream (never opened, or already released).
    #[error("unknown stream {0}")]
    UnknownStream(StreamId),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Opened here, waiting for ACCEPT or REJECT.
    Opening,
    /// Opened by the peer, waiting for the application to answer.
    Incoming,
    /// Accepted.
    Open,
}

#[derive(Debug)]
struct Stream {
    state: State,
    // Sending half.
    send_credit: u64,
    send_fin: bool,
    send_error: Option<StreamError>,
    write_blocked: bool,
    // Receiving half.
    recv_queue: VecDeque<Bytes>,
    recv_fin: bool,
    recv_eof_seen: bool,
    recv_error: Option<StreamError>,
    recv_received: u64,
    recv_limit: u64,
    recv_consumed: u64,
    recv_window: u32,
    last_grant: Option<Instant>,
}

impl Stream {
    fn new(state: State) -> Self {
        Self {
            state,
            send_credit: u64::from(BASE_WINDOW),
            send_fin: false,
            send_error: None,
            write_blocked: false,
            recv_queue: VecDeque::new(),
            recv_fin: false,
            recv_eof_seen: false,
            recv_error: None,
            recv_received: 0,
            recv_limit: u64::from(BASE_WINDOW),
            recv_consumed: 0,
            recv_window: BASE_WINDOW,
            last_grant: None,
        }
    }

    fn buffered(&self) -> u64 {
        self.recv_received - self.recv_consumed
    }

    /// The peer aborted the stream, or the session died: writes fail, and
    /// reads fail unless the peer had already sent everything.
    fn abort(&mut self, err: StreamError) {
        self.send_error.get_or_insert(err);
        if !self.recv_fin {
            self.recv_queue.clear();
            self.recv_error.get_or_insert(err);
        }
    }
}

/// One side of the multiplexer of one pipe. See the [module docs](self).
#[derive(Debug)]
pub struct Mux {
    side: Side,
    config: Config,
    streams: HashMap<StreamId, Stream>,
    /// Next id this side opens (u64 so that running out is detectable).
    next_local: u64,
    /// Highest id the peer has opened.
    max_peer: u32,
    out: BytesMut,
    /// Header offset in `out` of the DATA frame `out` ends with, so small
    /// writes to the same stream extend it instead of adding frames.
    open_data_frame: Option<(StreamId, usize)>,
    /// Streams whose write was refused because `out` was full.
    output_blocked: Vec<StreamId>,
    events: VecDeque<Event>,
    closed: Option<CloseReason>,
    session_window: u64,
    last_recv: Instant,
    last_ping: Option<Instant>,
    ping_outstanding: Option<(u64, Instant)>,
    next_ping: u64,
    srtt: Option<Duration>,
    last_rtt_sample: Option<Instant>,
}

impl Mux {
    /// Creates the state of a new session. Queues a PING to measure the
    /// round-trip time right away.
    pub fn new(side: Side, mut config: Config, now: Instant) -> Self {
        config.initial_window = config.initial_window.max(BASE_WINDOW);
        config.max_window = config.max_window.max(config.initial_window);
        config.max_buffered_output = config.max_buffered_output.max(MAX_DATA_PAYLOAD);
        let mut mux = Self {
            side,
            config,
            streams: HashMap::new(),
            next_local: match side {
                Side::Client => 1,
                Side::Server => 2,
            },
            max_peer: 0,
            out: BytesMut::new(),
            open_data_frame: None,
            output_blocked: Vec::new(),
            events: VecDeque::new(),
            closed: None,
            session_window: 0,
            last_recv: now,
            last_ping: None,
            ping_outstanding: None,
            next_ping: 1,
            srtt: None,
            last_rtt_sample: None,
        };
        mux.send_ping(now);
        mux
    }

    /// The configuration in effect (after clamping).
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// Whether the session has ended.
    pub fn is_closed(&self) -> bool {
        self.closed.is_some()
    }

    /// Why the session ended, if it has.
    pub fn close_reason(&self) -> Option<&CloseReason> {
        self.closed.as_ref()
    }

    /// Number of streams held (opening, awaiting an answer, open, or reset
    /// and not yet released).
    pub fn stream_count(&self) -> usize {
        self.streams.len()
    }

    /// Smoothed round-trip time, once measured.
    pub fn rtt(&self) -> Option<Duration> {
        self.srtt
    }

    /// Current receive window of a stream, in bytes.
    pub fn recv_window(&self, id: StreamId) -> Option<u32> {
        self.streams.get(&id).map(|s| s.recv_window)
    }

    /// Received bytes of a stream not yet read by the application.
    pub fn buffered(&self, id: StreamId) -> Option<u64> {
        self.streams.get(&id).map(Stream::buffered)
    }

    /// Whether the caller should read more input now. False while the
    /// output backlog is far beyond [`Config::max_buffered_output`] (a peer
    /// that floods PINGs but reads nothing); reading resumes once
    /// [`Mux::poll_transmit`] has drained it.
    pub fn wants_input(&self) -> bool {
        self.out.len() <= 2 * self.config.max_buffered_output
    }

    /// Bytes waiting in the output buffer.
    pub fn pending_output(&self) -> usize {
        self.out.len()
    }

    /// Feeds bytes read from the pipe. Consumes every complete frame of
    /// `input` and leaves an incomplete tail in it. A malformed or illegal
    /// frame closes the session ([`Event::Closed`] with
    /// [`CloseReason::Protocol`]); input after the close is discarded.
    pub fn handle_input(&mut self, input: &mut BytesMut, now: Instant) {
        if self.closed.is_some() {
            input.clear();
            return;
        }
        if !input.is_empty() {
            self.last_recv = now;
        }
        loop {
            let result = match Frame::decode(input, self.config.max_frame_payload) {
                Ok(None) => return,
                Ok(Some(frame)) => self.on_frame(frame, now),
                Err(e) => Err(e.into()),
            };
            if let Err(e) = result {
                self.close_with(CloseReason::Protocol(e), true);
            }
            if self.closed.is_some() {
                input.clear();
                return;
            }
        }
    }

    /// Advances timers: sends keep-alive PINGs and closes the session with
    /// [`CloseReason::IdleTimeout`] when the peer has been silent too long.
    pub fn handle_timeout(&mut self, now: Instant) {
        if self.closed.is_some() {
            return;
        }
        if now >= self.last_recv + self.config.idle_timeout {
            self.close_with(CloseReason::IdleTimeout, true);
        } else if self.next_keepalive().is_some_and(|at| now >= at) {
            self.send_ping(now);
        }
    }

    /// When [`Mux::handle_timeout`] must next be called; `None` once closed.
    pub fn poll_timeout(&self) -> Option<Instant> {
        if self.closed.is_some() {
            return None;
        }
        let idle = self.last_recv + self.config.idle_timeout;
        Some(self.next_keepalive().map_or(idle, |k| k.min(idle)))
    }

    fn next_keepalive(&self) -> Option<Instant> {
        let after_recv = self.last_recv + self.config.keepalive_interval;
        match self.last_ping {
            Some(p) if p >= self.last_recv => Some(p + self.config.keepalive_interval),
            _ => Some(after_recv),
        }
    }

    /// Moves the bytes to write to the pipe into `out` (appending). Writes
    /// refused for lack of output room become possible again, signalled by
    /// [`Event::Writable`].
    pub fn poll_transmit(&mut self, out: &mut BytesMut) {
        if self.out.is_empty() {
            return;
        }
        if out.is_empty() {
            // Hand the whole buffer over and take the caller's (empty) one
            // back: no copy, and both allocations get reused.
            std::mem::swap(out, &mut self.out);
        } else {
            out.extend_from_slice(&self.out);
            self.out.clear();
        }
        self.open_data_frame = None;
        for id in std::mem::take(&mut self.output_blocked) {
            if let Some(s) = self.streams.get_mut(&id)
                && std::mem::take(&mut s.write_blocked)
            {
                self.events.push_back(Event::Writable { id });
            }
        }
    }

    /// Next event for the application.
    pub fn poll_event(&mut self) -> Option<Event> {
        self.events.pop_front()
    }

    /// Opens a stream with `request`. The answer comes as
    /// [`Event::Accepted`] or [`Event::Rejected`]; the stream cannot carry
    /// data before.
    pub fn open(&mut self, request: Bytes) -> Result<StreamId, OpenError> {
        if self.closed.is_some() {
            return Err(OpenError::SessionClosed);
        }
        if request.len() > self.config.max_frame_payload as usize {
            return Err(OpenError::RequestTooLarge {
                len: request.len(),
                max: self.config.max_frame_payload,
            });
        }
        let raw = u32::try_from(self.next_local).map_err(|_| OpenError::IdsExhausted)?;
        self.next_local += 2;
        let id = StreamId::new(raw);
        self.push(&Frame::Open { id, request });
        let mut stream = Stream::new(State::Opening);
        self.grant_initial(id, &mut stream);
        self.streams.insert(id, stream);
        Ok(id)
    }

    /// Accepts a stream the peer opened ([`Event::IncomingStream`]).
    pub fn accept(&mut self, id: StreamId, payload: Bytes) -> Result<(), StreamError> {
        self.stream_for_answer(id)?;
        let Some(mut s) = self.streams.remove(&id) else {
            return Err(StreamError::UnknownStream(id));
        };
        s.state = State::Open;
        self.push(&Frame::Accept { id, payload });
        self.grant_initial(id, &mut s);
        self.streams.insert(id, s);
        Ok(())
    }

    /// Rejects a stream the peer opened; the stream is gone afterwards.
    pub fn reject(&mut self, id: StreamId, payload: Bytes) -> Result<(), StreamError> {
        self.stream_for_answer(id)?;
        self.streams.remove(&id);
        self.push(&Frame::Reject { id, payload });
        Ok(())
    }

    fn stream_for_answer(&mut self, id: StreamId) -> Result<&mut Stream, StreamError> {
        if self.closed.is_some() {
            return Err(StreamError::SessionClosed);
        }
        let s = self
            .streams
            .get_mut(&id)
            .ok_or(StreamError::UnknownStream(id))?;
        if s.state != State::Incoming {
            return Err(StreamError::InvalidState);
        }
        Ok(s)
    }

    /// Raises the receive window of a new stream from [`BASE_WINDOW`] to
    /// the configured initial window.
    fn grant_initial(&mut self, id: StreamId, s: &mut Stream) {
        s.recv_window = self.config.initial_window;
        s.recv_limit = u64::from(s.recv_window);
        self.session_window += u64::from(s.recv_window);
        if let Some(increment) = s.recv_window.checked_sub(BASE_WINDOW).filter(|&i| i > 0) {
            self.push(&Frame::Window { id, increment });
        }
    }

    /// Queues up to `data.len()` bytes on a stream and returns how many were
    /// taken: no more than the peer's credit and the room in the output
    /// buffer. `Err(Blocked)` when nothing could be taken; an
    /// [`Event::Writable`] follows when that changes.
    pub fn write(&mut self, id: StreamId, data: &[u8]) -> Result<usize, StreamError> {
        if self.closed.is_some() {
            return Err(StreamError::SessionClosed);
        }
        let s = self
            .streams
            .get_mut(&id)
            .ok_or(StreamError::UnknownStream(id))?;
        if let Some(e) = s.send_error {
            return Err(e);
        }
        if s.send_fin {
            return Err(StreamError::Finished);
        }
        if s.state != State::Open {
            return Err(StreamError::InvalidState);
        }
        if data.is_empty() {
            return Ok(0);
        }
        let room = self
            .config
            .max_buffered_output
            .saturating_sub(self.out.len());
        let credit = usize::try_from(s.send_credit).unwrap_or(usize::MAX);
        let n = data.len().min(credit).min(room);
        if n == 0 {
            s.write_blocked = true;
            if room == 0 {
                self.output_blocked.push(id);
            }
            return Err(StreamError::Blocked);
        }
        s.send_credit -= n as u64;
        let mut rest = &data[..n];
        if let Some((open_id, at)) = self.open_data_frame
            && open_id == id
        {
            let len = self.out.len() - at - HEADER_LEN;
            let take = (MAX_DATA_PAYLOAD - len).min(rest.len());
            self.out.extend_from_slice(&rest[..take]);
            // len + take <= MAX_DATA_PAYLOAD, far below u32::MAX.
            let new_len = (len + take) as u32;
            self.out[at + 5..at + HEADER_LEN].copy_from_slice(&new_len.to_be_bytes());
            rest = &rest[take..];
        }
        while !rest.is_empty() {
            let take = rest.len().min(MAX_DATA_PAYLOAD);
            let at = self.out.len();
            // take <= MAX_DATA_PAYLOAD, far below u32::MAX.
            frame::encode_header(FrameType::Data, id, take as u32, &mut self.out);
            self.out.extend_from_slice(&rest[..take]);
            self.open_data_frame = Some((id, at));
            rest = &rest[take..];
        }
        Ok(n)
    }

    /// Copies received bytes of a stream into `buf`. `Ok(0)` (for a
    /// non-empty `buf`) is the end of the stream; `Err(Blocked)` means
    /// nothing yet, an [`Event::Readable`] follows when data arrives.
    pub fn read(
        &mut self,
        id: StreamId,
        buf: &mut [u8],
        now: Instant,
    ) -> Result<usize, StreamError> {
        let mut n = 0;
        while n < buf.len() {
            match self.read_chunk(id, buf.len() - n, now) {
                Ok(Some(chunk)) => {
                    buf[n..n + chunk.len()].copy_from_slice(&chunk);
                    n += chunk.len();
                }
                Ok(None) if n == 0 => return Ok(0),
                Err(e) if n == 0 => return Err(e),
                Ok(None) | Err(_) => break,
            }
        }
        Ok(n)
    }

    /// Takes up to `max` received bytes of a stream without copying.
    /// `Ok(None)` is the end of the stream.
    pub fn read_chunk(
        &mut self,
        id: StreamId,
        max: usize,
        now: Instant,
    ) -> Result<Option<Bytes>, StreamError> {
        let s = self
            .streams
            .get_mut(&id)
            .ok_or(StreamError::UnknownStream(id))?;
        if let Some(e) = s.recv_error {
            return Err(e);
        }
        let Some(front) = s.recv_queue.front_mut() else {
            if s.recv_fin {
                s.recv_eof_seen = true;
                self.maybe_release(id);
                return Ok(None);
            }
            return Err(if self.closed.is_some() {
                StreamError::SessionClosed
            } else {
                StreamError::Blocked
            });
        };
        let chunk = if front.len() <= max {
            // The queue is non-empty: front_mut returned Some.
            s.recv_queue.pop_front().unwrap_or_default()
        } else {
            front.split_to(max)
        };
        s.recv_consumed += chunk.len() as u64;
        self.maybe_grant(id, now);
        Ok(Some(chunk))
    }

    /// Half-closes a stream: queues FIN after the data already written. The
    /// peer reads the end of the stream; the other direction keeps flowing.
    pub fn shutdown_write(&mut self, id: StreamId) -> Result<(), StreamError> {
        if self.closed.is_some() {
            return Err(StreamError::SessionClosed);
        }
        let s = self
            .streams
            .get_mut(&id)
            .ok_or(StreamError::UnknownStream(id))?;
        if let Some(e) = s.send_error {
            return Err(e);
        }
        if s.send_fin {
            return Ok(());
        }
        if s.state != State::Open {
            return Err(StreamError::InvalidState);
        }
        s.send_fin = true;
        self.push(&Frame::Fin { id });
        self.maybe_release(id);
        Ok(())
    }

    /// Releases a stream. Unless it had finished cleanly both ways (or the
    /// peer already reset it), the peer is told with RST that the stream was
    /// aborted. Call it when the application drops a stream; unknown ids
    /// are ignored.
    pub fn reset(&mut self, id: StreamId) {
        let Some(s) = self.streams.remove(&id) else {
            return;
        };
        if s.state != State::Incoming {
            self.session_window = self.session_window.saturating_sub(u64::from(s.recv_window));
        }
        let clean = s.send_fin && s.recv_fin;
        let peer_knows = s.send_error.is_some();
        if !clean && !peer_knows && self.closed.is_none() {
            self.push(&Frame::Rst { id });
        }
    }

    /// Ends the session: queues GOAWAY with `reason` and emits
    /// [`Event::Closed`]. Flush [`Mux::poll_transmit`] before closing the
    /// pipe.
    pub fn close(&mut self, reason: &str) {
        if self.closed.is_none() {
            self.push(&Frame::GoAway {
                reason: Bytes::copy_from_slice(reason.as_bytes()),
            });
            self.close_with(CloseReason::Local, false);
        }
    }

    fn close_with(&mut self, reason: CloseReason, send_goaway: bool) {
        if self.closed.is_some() {
            return;
        }
        if send_goaway {
            let text = reason.to_string();
            self.push(&Frame::GoAway {
                reason: Bytes::from(text),
            });
        }
        for s in self.streams.values_mut() {
            s.abort(StreamError::SessionClosed);
        }
        self.closed = Some(reason.clone());
        self.events.push_back(Event::Closed { reason });
    }

    fn push(&mut self, frame: &Frame) {
        frame.encode(&mut self.out);
        self.open_data_frame = None;
    }

    fn send_ping(&mut self, now: Instant) {
        let opaque = self.next_ping;
        self.next_ping += 1;
        self.ping_outstanding = Some((opaque, now));
        self.last_ping = Some(now);
        self.push(&Frame::Ping { opaque });
    }

    fn maybe_release(&mut self, id: StreamId) {
        if let Some(s) = self.streams.get(&id)
            && s.send_fin
            && s.recv_eof_seen
            && s.send_error.is_none()
        {
            self.reset(id);
        }
    }

    /// Grants more credit once half of the window was consumed; doubles the
    /// window when grants come faster than every two round trips.
    fn maybe_grant(&mut self, id: StreamId, now: Instant) {
        let Some(s) = self.streams.get_mut(&id) else {
            return;
        };
        if s.recv_fin || s.recv_limit - s.recv_consumed > u64::from(s.recv_window / 2) {
            return;
        }
        if let (Some(last), Some(rtt)) = (s.last_grant, self.srtt)
            && now.saturating_duration_since(last) < 2 * rtt
            && s.recv_window < self.config.max_window
        {
            let grown = s.recv_window.saturating_mul(2).min(self.config.max_window);
            let extra = u64::from(grown - s.recv_window);
            if self.session_window + extra <= self.config.max_session_window {
                self.session_window += extra;
                s.recv_window = grown;
            }
        }
        s.last_grant = Some(now);
        let new_limit = s.recv_consumed + u64::from(s.recv_window);
        // new_limit - recv_limit <= window <= u32::MAX.
        let increment = (new_limit - s.recv_limit) as u32;
        s.recv_limit = new_limit;
        self.push(&Frame::Window { id, increment });
        let stale = self
            .last_rtt_sample
            .is_none_or(|t| now >= t + RTT_PROBE_INTERVAL);
        if self.ping_outstanding.is_none() && stale {
            self.send_ping(now);
        }
    }

    /// Whether an id of a frame for a stream we do not hold is one that
    /// existed once (a late frame, ignored) rather than one never opened.
    fn check_gone(&self, id: StreamId, kind: FrameType) -> Result<(), ProtocolError> {
        let ours = id.is_client_initiated() == (self.side == Side::Client);
        let existed = if ours {
            u64::from(id.get()) < self.next_local
        } else {
            id.get() <= self.max_peer
        };
        if existed {
            Ok(())
        } else {
            Err(ProtocolError::UnopenedStream { id, kind })
        }
    }

    fn on_frame(&mut self, frame: Frame, now: Instant) -> Result<(), ProtocolError> {
        let kind = frame.kind();
        match frame {
            Frame::Open { id, request } => {
                if id.is_client_initiated() == (self.side == Side::Client) {
                    return Err(ProtocolError::WrongParity(id));
                }
                if id.get() <= self.max_peer {
                    return Err(ProtocolError::IdNotIncreasing(id));
                }
                self.max_peer = id.get();
                if self.streams.len() >= self.config.max_streams {
                    self.push(&Frame::Reject {
                        id,
                        payload: Bytes::from_static(TOO_MANY_STREAMS),
                    });
                } else {
                    self.streams.insert(id, Stream::new(State::Incoming));
                    self.events.push_back(Event::IncomingStream { id, request });
                }
            }
            Frame::Accept { id, payload } | Frame::Reject { id, payload } => {
                let Some(s) = self.streams.get_mut(&id) else {
                    return self.check_gone(id, kind);
                };
                if s.state != State::Opening {
                    return Err(ProtocolError::UnexpectedAnswer { id, kind });
                }
                if kind == FrameType::Accept {
                    s.state = State::Open;
                    self.events.push_back(Event::Accepted { id, payload });
                } else {
                    self.reset(id);
                    self.events.push_back(Event::Rejected { id, payload });
                }
            }
            Frame::Data { id, data } => {
                let Some(s) = self.streams.get_mut(&id) else {
                    return self.check_gone(id, kind);
                };
                if s.state != State::Open {
                    return Err(ProtocolError::BeforeAccept { id, kind });
                }
                if s.recv_fin {
                    return Err(ProtocolError::DataAfterFin(id));
                }
                s.recv_received += data.len() as u64;
                if s.recv_received > s.recv_limit {
                    return Err(ProtocolError::FlowControl {
                        id,
                        limit: s.recv_limit,
                        received: s.recv_received,
                    });
                }
                if s.recv_error.is_some() || data.is_empty() {
                    // Late data on a stream the peer reset: dropped. Count it
                    // as consumed so the window accounting stays exact.
                    s.recv_consumed += data.len() as u64;
                    return Ok(());
                }
                let was_empty = s.recv_queue.is_empty();
                let data = if data.len() < ZERO_COPY_MIN {
                    Bytes::copy_from_slice(&data)
                } else {
                    data
                };
                s.recv_queue.push_back(data);
                if was_empty {
                    self.events.push_back(Event::Readable { id });
                }
            }
            Frame::Window { id, increment } => {
                let Some(s) = self.streams.get_mut(&id) else {
                    return self.check_gone(id, kind);
                };
                s.send_credit = s.send_credit.saturating_add(u64::from(increment));
                if std::mem::take(&mut s.write_blocked) {
                    self.events.push_back(Event::Writable { id });
                }
            }
            Frame::Fin { id } => {
                let Some(s) = self.streams.get_mut(&id) else {
                    return self.check_gone(id, kind);
                };
                if s.state != State::Open {
                    return Err(ProtocolError::BeforeAccept { id, kind });
                }
                if !s.recv_fin && s.recv_error.is_none() {
                    s.recv_fin = true;
                    self.events.push_back(Event::Finished { id });
                }
            }
            Frame::Rst { id } => {
                let Some(s) = self.streams.get_mut(&id) else {
                    return self.check_gone(id, kind);
                };
                if s.state == State::Open {
                    if s.send_error.is_none() {
                        s.abort(StreamError::Reset);
                        s.write_blocked = false;
                        self.events.push_back(Event::Reset { id });
                    }
                } else {
                    // Cancelled before being answered: nobody holds it yet.
                    let state = s.state;
                    self.streams.remove(&id);
                    if state == State::Opening {
                        self.session_window = self
                            .session_window
                            .saturating_sub(u64::from(self.config.initial_window));
                    }
                    self.events.push_back(Event::Reset { id });
                }
            }
            Frame::Ping { opaque } => self.push(&Frame::Pong { opaque }),
            Frame::Pong { opaque } => {
                if let Some((expected, sent)) = self.ping_outstanding
                    && expected == opaque
                {
                    self.ping_outstanding = None;
                    let sample = now.saturating_duration_since(sent);
                    self.srtt = Some(match self.srtt {
                        None => sample,
                        Some(srtt) => (srtt * 7 + sample) / 8,
                    });
                    self.last_rtt_sample = Some(now);
                }
            }
            Frame::GoAway { reason } => {
                let text = String::from_utf8_lossy(&reason[..reason.len().min(256)]).into_owned();
                self.close_with(CloseReason::PeerGoAway(text), false);
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Two muxes wired back to back through in-memory buffers, with a fake
    /// clock and a one-way latency.
    struct Pair {
        now: Instant,
        client: Mux,
        server: Mux,
        /// Bytes in flight towards the server / client, with arrival times.
        to_server: VecDeque<(Instant, BytesMut)>,
        to_client: VecDeque<(Instant, BytesMut)>,
        latency: Duration,
        client_events: Vec<Event>,
        server_events: Vec<Event>,
    }

    impl Pair {
        fn new(config: Config) -> Self {
            Self::with_latency(config, Duration::ZERO)
        }

        fn with_latency(config: Config, latency: Duration) -> Self {
            let now = Instant::now();
            let mut pair = Self {
                now,
                client: Mux::new(Side::Client, config.clone(), now),
                server: Mux::new(Side::Server, config, now),
                to_server: VecDeque::new(),
                to_client: VecDeque::new(),
                latency,
                client_events: Vec::new(),
                server_events: Vec::new(),
            };
            pair.drive();
            pair
        }

        /// Moves bytes until nothing more can be delivered without the
        /// clock advancing.
        fn drive(&mut self) {
            loop {
                let mut progress = false;
                let mut out = BytesMut::new();
                self.client.poll_transmit(&mut out);
                if !out.is_empty() {
                    self.to_server.push_back((self.now + self.latency, out));
                    progress = true;
                }
                let mut out = BytesMut::new();
                self.server.poll_transmit(&mut out);
                if !out.is_empty() {
                    self.to_client.push_back((self.now + self.latency, out));
                    progress = true;
                }
                while self.to_server.front().is_some_and(|(t, _)| *t <= self.now) {
                    let (_, mut b) = self.to_server.pop_front().unwrap();
                    self.server.handle_input(&mut b, self.now);
                    assert!(b.is_empty(), "whole frames are always delivered");
                    progress = true;
                }
                while self.to_client.front().is_some_and(|(t, _)| *t <= self.now) {
                    let (_, mut b) = self.to_client.pop_front().unwrap();
                    self.client.handle_input(&mut b, self.now);
                    progress = true;
                }
                while let Some(e) = self.client.poll_event() {
                    self.client_events.push(e);
                }
                while let Some(e) = self.server.poll_event() {
                    self.server_events.push(e);
                }
                if !progress {
                    return;
                }
            }
        }

        /// Advances the clock by `d`, firing timers and deliveries in order.
        fn advance(&mut self, d: Duration) {
            let end = self.now + d;
            self.drive();
            loop {
                let next = [
                    self.client.poll_timeout(),
                    self.server.poll_timeout(),
                    self.to_server.front().map(|(t, _)| *t),
                    self.to_client.front().map(|(t, _)| *t),
                ]
                .into_iter()
                .flatten()
                .filter(|t| *t <= end)
                .min();
                let Some(t) = next else { break };
                self.now = self.now.max(t);
                self.client.handle_timeout(self.now);
                self.server.handle_timeout(self.now);
                self.drive();
            }
            self.now = end;
            self.drive();
        }

        fn open_accepted(&mut self, request: &'static [u8]) -> StreamId {
            let id = self.client.open(Bytes::from_static(request)).unwrap();
            self.drive();
            assert!(self.server_events.contains(&Event::IncomingStream {
                id,
                request: Bytes::from_static(request)
            }));
            self.server.accept(id, Bytes::from_static(b"ok")).unwrap();
            self.drive();
            assert!(self.client_events.contains(&Event::Accepted {
                id,
                payload: Bytes::from_static(b"ok")
            }));
            id
        }
    }

    fn read_all(m: &mut Mux, id: StreamId, now: Instant) -> Vec<u8> {
        let mut v = Vec::new();
        let mut buf = [0u8; 10_000];
        while let Ok(n) = m.read(id, &mut buf, now) {
            if n == 0 {
                break;
            }
            v.extend_from_slice(&buf[..n]);
        }
        v
    }

    #[test]
    fn open_accept_data_both_ways_and_half_close() {
        let mut p = Pair::new(Config::default());
        let id = p.open_accepted(b"sql-prod");
        assert!(id.is_client_initiated());
        assert_eq!(p.client.write(id, b"hello ").unwrap(), 6);
        assert_eq!(p.client.write(id, b"server").unwrap(), 6);
        p.client.shutdown_write(id).unwrap();
        p.drive();
        assert!(p.server_events.contains(&Event::Readable { id }));
        assert!(p.server_events.contains(&Event::Finished { id }));
        let now = p.now;
        assert_eq!(read_all(&mut p.server, id, now), b"hello server");
        assert_eq!(p.server.read(id, &mut [0; 4], now), Ok(0), "end of stream");
        // The other direction still flows after the client's FIN.
        assert_eq!(p.server.write(id, b"reply").unwrap(), 5);
        p.server.shutdown_write(id).unwrap();
        assert_eq!(p.server.stream_count(), 0, "done both ways: released");
        p.drive();
        assert_eq!(read_all(&mut p.client, id, now), b"reply");
        // Reading the end of the stream after our own FIN released it.
        assert_eq!(p.client.stream_count(), 0);
        assert_eq!(
            p.client.read(id, &mut [0; 4], now),
            Err(StreamError::UnknownStream(id))
        );
        assert_eq!(
            p.client.write(id, b"x"),
            Err(StreamError::UnknownStream(id))
        );
    }

    #[test]
    fn both_sides_start_with_the_configured_window() {
        let mut p = Pair::new(Config::default());
        let id = p.open_accepted(b"x");
        let big = vec![0u8; 1 << 20];
        // The opener's WINDOW arrived before the stream was accepted.
        assert_eq!(p.server.write(id, &big), Ok(256 * 1024));
        assert_eq!(p.client.write(id, &big), Ok(256 * 1024));
    }

    #[test]
    fn small_writes_coalesce_into_one_frame() {
        let mut p = Pair::new(Config::default());
        let id = p.open_accepted(b"x");
        for _ in 0..100 {
            p.client.write(id, b"ab").unwrap();
        }
        let mut out = BytesMut::new();
        p.client.poll_transmit(&mut out);
        assert_eq!(out.len(), HEADER_LEN + 200);
        p.server.handle_input(&mut out, p.now);
        assert_eq!(read_all(&mut p.server, id, p.now), b"ab".repeat(100));
    }

    #[test]
    fn reject_carries_the_payload_and_forgets_the_stream() {
        let mut p = Pair::new(Config::default());
        let id = p.client.open(Bytes::from_static(b"db")).unwrap();
        p.drive();
        p.server
            .reject(id, Bytes::from_static(b"connection refused by target"))
            .unwrap();
        p.drive();
        assert!(p.client_events.contains(&Event::Rejected {
            id,
            payload: Bytes::from_static(b"connection refused by target")
        }));
        assert_eq!(p.client.stream_count(), 0);
        assert_eq!(p.server.stream_count(), 0);
        assert_eq!(
            p.client.write(id, b"x"),
            Err(StreamError::UnknownStream(id))
        );
    }

    #[test]
    fn server_opens_even_ids_and_ids_increase() {
        let mut p = Pair::new(Config::default());
        let a = p.server.open(Bytes::new()).unwrap();
        let b = p.server.open(Bytes::new()).unwrap();
        assert_eq!((a.get(), b.get()), (2, 4));
        let c = p.client.open(Bytes::new()).unwrap();
        assert_eq!(c.get(), 1);
        p.drive();
        assert_eq!(
            p.client_events
                .iter()
                .filter(|e| matches!(e, Event::IncomingStream { .. }))
                .count(),
            2
        );
    }

    #[test]
    fn reset_aborts_both_directions_and_is_reported() {
        let mut p = Pair::new(Config::default());
        let id = p.open_accepted(b"x");
        p.server.write(id, b"unread").unwrap();
        p.drive();
        p.client.reset(id);
        assert_eq!(p.client.stream_count(), 0);
        p.drive();
        assert!(p.server_events.contains(&Event::Reset { id }));
        assert_eq!(p.server.write(id, b"more"), Err(StreamError::Reset));
        assert_eq!(
            p.server.read(id, &mut [0; 8], p.now),
            Err(StreamError::Reset)
        );
        p.server.reset(id);
        p.drive();
        assert_eq!(p.server.stream_count(), 0);
        assert!(!p.client.is_closed() && !p.server.is_closed());
    }

    #[test]
    fn reset_after_peer_fin_keeps_the_complete_data_readable() {
        let mut p = Pair::new(Config::default());
        let id = p.open_accepted(b"x");
        p.server.write(id, b"all of it").unwrap();
        p.server.shutdown_write(id).unwrap();
        p.drive();
        // The server stops reading; it had finished sending, so the client
        // still gets everything the server sent.
        p.server.reset(id);
        p.drive();
        assert!(p.client_events.contains(&Event::Reset { id }));
        assert_eq!(read_all(&mut p.client, id, p.now), b"all of it");
        assert_eq!(p.client.read(id, &mut [0; 8], p.now), Ok(0));
        assert_eq!(p.client.write(id, b"more"), Err(StreamError::Reset));
    }

    #[test]
    fn writer_is_limited_to_credit_and_resumes_when_reader_consumes() {
        let cfg = Config {
            initial_window: 128 * 1024,
            max_window: 128 * 1024,
            ..Config::default()
        };
        let mut p = Pair::new(cfg);
        let id = p.open_accepted(b"x");
        let big = vec![1u8; 1 << 20];
        assert_eq!(p.client.write(id, &big).unwrap(), 128 * 1024);
        assert_eq!(p.client.write(id, &big), Err(StreamError::Blocked));
        p.drive();
        assert_eq!(p.server.buffered(id), Some(128 * 1024));
        // Reading less than half the window grants nothing yet.
        let mut buf = vec![0u8; 60 * 1024];
        p.server.read(id, &mut buf, p.now).unwrap();
        p.drive();
        assert!(!p.client_events.contains(&Event::Writable { id }));
        p.server.read(id, &mut buf, p.now).unwrap();
        p.drive();
        assert!(p.client_events.contains(&Event::Writable { id }));
        // The grant came once 64 KiB (half the window) were consumed.
        assert_eq!(p.client.write(id, &big).unwrap(), 64 * 1024);
    }

    #[test]
    fn window_grows_towards_the_bandwidth_delay_product() {
        let cfg = Config::default();
        let mut p = Pair::with_latency(cfg.clone(), Duration::from_millis(10));
        p.advance(Duration::from_millis(50));
        let id = p.client.open(Bytes::new()).unwrap();
        p.advance(Duration::from_millis(20));
        p.server.accept(id, Bytes::new()).unwrap();
        p.advance(Duration::from_millis(20));
        assert!(
            p.client_events
                .iter()
                .any(|e| matches!(e, Event::Accepted { .. }))
        );
        assert_eq!(p.server.recv_window(id), Some(cfg.initial_window));
        // A fast writer and a fast reader: every millisecond the client
        // writes all it may and the server reads everything.
        let chunk = vec![0u8; 1 << 20];
        let mut buf = vec![0u8; 1 << 20];
        let mut total = 0usize;
        for _ in 0..2000 {
            while let Ok(n) = p.client.write(id, &chunk) {
                total += n;
            }
            p.advance(Duration::from_millis(1));
            while let Ok(n) = p.server.read(id, &mut buf, p.now) {
                assert!(n > 0);
            }
            p.drive();
        }
        let window = p.server.recv_window(id).unwrap();
        assert!(
            window >= 4 * cfg.initial_window,
            "window stayed at {window}"
        );
        assert!(window <= cfg.max_window);
        // With a 20 ms RTT a 256 KiB window alone would allow ~13 MB/s;
        // 2 s at that rate is ~26 MB.
        assert!(total > 100 << 20, "only {total} bytes moved");
        assert!(p.client.rtt().unwrap() >= Duration::from_millis(20));
    }

    #[test]
    fn session_budget_caps_window_growth() {
        let cfg = Config {
            max_session_window: 600 * 1024,
            ..Config::default()
        };
        let mut p = Pair::with_latency(cfg, Duration::from_millis(10));
        let id = p.client.open(Bytes::new()).unwrap();
        p.advance(Duration::from_millis(20));
        p.server.accept(id, Bytes::new()).unwrap();
        p.advance(Duration::from_millis(20));
        let chunk = vec![0u8; 1 << 20];
        let mut buf = vec![0u8; 1 << 20];
        for _ in 0..500 {
            while p.client.write(id, &chunk).is_ok() {}
            p.advance(Duration::from_millis(1));
            while p.server.read(id, &mut buf, p.now).is_ok() {}
            p.drive();
        }
        assert_eq!(
            p.server.recv_window(id),
            Some(512 * 1024),
            "one doubling fits in 600 KiB"
        );
    }

    #[test]
    fn a_stalled_stream_does_not_stop_another() {
        let cfg = Config::default();
        let mut p = Pair::new(cfg.clone());
        let stalled = p.open_accepted(b"stalled");
        let live = p.open_accepted(b"live");
        let chunk = vec![3u8; 1 << 20];
        let mut buf = vec![0u8; 1 << 20];
        let mut moved = 0usize;
        for _ in 0..400 {
            let _ = p.client.write(stalled, &chunk);
            if let Ok(n) = p.client.write(live, &chunk) {
                moved += n;
            }
            p.drive();
            while let Ok(n) = p.server.read(live, &mut buf, p.now) {
                assert!(n > 0);
            }
            p.drive();
        }
        assert!(moved >= 50 << 20, "live stream moved only {moved} bytes");
        let stuck = p.server.buffered(stalled).unwrap();
        assert_eq!(
            stuck,
            u64::from(cfg.initial_window),
            "stalled stream holds exactly its window"
        );
        assert_eq!(p.client.write(stalled, &chunk), Err(StreamError::Blocked));
    }

    #[test]
    fn dead_peer_is_detected_at_the_idle_timeout() {
        let mut p = Pair::new(Config::default());
        let id = p.open_accepted(b"x");
        // Keep-alives keep a healthy but silent session open: the client
        // heard from the server within one keep-alive interval of the end.
        p.advance(Duration::from_secs(60));
        assert!(!p.client.is_closed() && !p.server.is_closed());
        let heard_last = p.client.last_recv;
        assert!(
            heard_last + p.client.config.keepalive_interval >= p.now,
            "the client last heard from the server {:?} before the end of a minute of silence",
            p.now - heard_last
        );
        // Now the server vanishes: its bytes never arrive again.
        let mut pings = 0;
        let dead_from = p.now;
        let mut now = p.now;
        let mut closed_at = None;
        while closed_at.is_none() && now < dead_from + Duration::from_secs(30) {
            let t = p.client.poll_timeout().unwrap();
            assert!(t > now);
            now = t;
            p.client.handle_timeout(now);
            let mut out = BytesMut::new();
            p.client.poll_transmit(&mut out);
            if !out.is_empty() {
                pings += 1;
            }
            while let Some(e) = p.client.poll_event() {
                if let Event::Closed { reason } = e {
                    assert_eq!(reason, CloseReason::IdleTimeout);
                    closed_at = Some(now);
                }
            }
        }
        let last_recv = p.client.last_recv;
        let closed_at = closed_at.expect("session should close");
        assert_eq!(closed_at - last_recv, Duration::from_secs(15));
        assert!(closed_at - dead_from <= Duration::from_secs(15));
        assert!(pings >= 2, "keep-alive pings were sent ({pings})");
        assert_eq!(
            p.client.read(id, &mut [0; 4], now),
            Err(StreamError::SessionClosed)
        );
        assert_eq!(p.client.write(id, b"x"), Err(StreamError::SessionClosed));
        assert_eq!(p.client.poll_timeout(), None);
    }

    #[test]
    fn open_past_the_stream_cap_is_rejected_with_a_reason() {
        let mut p = Pair::new(Config {
            max_streams: 2,
            ..Config::default()
        });
        let _a = p.client.open(Bytes::new()).unwrap();
        let _b = p.client.open(Bytes::new()).unwrap();
        let c = p.client.open(Bytes::new()).unwrap();
        p.drive();
        assert!(p.client_events.contains(&Event::Rejected {
            id: c,
            payload: Bytes::from_static(TOO_MANY_STREAMS)
        }));
        assert_eq!(p.server.stream_count(), 2);
    }

    fn violation(frames: &[Frame]) -> CloseReason {
        let mut p = Pair::new(Config::default());
        let mut buf = BytesMut::new();
        for f in frames {
            f.encode(&mut buf);
        }
        p.server.handle_input(&mut buf, p.now);
        p.drive();
        match p.server_events.last() {
            Some(Event::Closed { reason }) => reason.clone(),
            other => panic!("expected Closed, got {other:?}"),
        }
    }

    #[test]
    fn protocol_violations_close_the_session() {
        let id1 = StreamId::new(1);
        let cases = [
            (
                vec![Frame::Data {
                    id: id1,
                    data: Bytes::from_static(b"x"),
                }],
                ProtocolError::UnopenedStream {
                    id: id1,
                    kind: FrameType::Data,
                },
            ),
            (
                vec![Frame::Open {
                    id: StreamId::new(2),
                    request: Bytes::new(),
                }],
                ProtocolError::WrongParity(StreamId::new(2)),
            ),
            (
                vec![
                    Frame::Open {
                        id: StreamId::new(5),
                        request: Bytes::new(),
                    },
                    Frame::Open {
                        id: StreamId::new(3),
                        request: Bytes::new(),
                    },
                ],
                ProtocolError::IdNotIncreasing(StreamId::new(3)),
            ),
            (
                vec![
                    Frame::Open {
                        id: id1,
                        request: Bytes::new(),
                    },
                    Frame::Data {
                        id: id1,
                        data: Bytes::from_static(b"x"),
                    },
                ],
                ProtocolError::BeforeAccept {
                    id: id1,
                    kind: FrameType::Data,
                },
            ),
            (
                vec![
                    Frame::Open {
                        id: id1,
                        request: Bytes::new(),
                    },
                    Frame::Accept {
                        id: id1,
                        payload: Bytes::new(),
                    },
                ],
                ProtocolError::UnexpectedAnswer {
                    id: id1,
                    kind: FrameType::Accept,
                },
            ),
        ];
        for (frames, expected) in cases {
            assert_eq!(violation(&frames), CloseReason::Protocol(expected));
        }
        let mut garbage = BytesMut::from(&[0xee; 9][..]);
        let mut p = Pair::new(Config::default());
        p.client.handle_input(&mut garbage, p.now);
        assert_eq!(
            p.client.close_reason(),
            Some(&CloseReason::Protocol(ProtocolError::Frame(
                FrameError::UnknownType(0xee)
            )))
        );
        // The peer is told why.
        p.drive();
        assert!(
            matches!(p.server_events.last(), Some(Event::Closed { reason: CloseReason::PeerGoAway(r) }) if r.contains("unknown frame type"))
        );
    }

    #[test]
    fn data_beyond_credit_is_a_flow_control_violation() {
        let mut p = Pair::new(Config::default());
        let id = p.open_accepted(b"x");
        let mut buf = BytesMut::new();
        let chunk = Bytes::from(vec![0u8; 64 * 1024]);
        for _ in 0..4 {
            Frame::Data {
                id,
                data: chunk.clone(),
            }
            .encode(&mut buf);
        }
        p.server.handle_input(&mut buf, p.now);
        assert!(
            !p.server.is_closed(),
            "256 KiB is within the initial window"
        );
        Frame::Data {
            id,
            data: Bytes::from_static(b"!"),
        }
        .encode(&mut buf);
        p.server.handle_input(&mut buf, p.now);
        assert_eq!(
            p.server.close_reason(),
            Some(&CloseReason::Protocol(ProtocolError::FlowControl {
                id,
                limit: 256 * 1024,
                received: 256 * 1024 + 1
            }))
        );
    }

    #[test]
    fn late_frames_for_released_streams_are_ignored() {
        let mut p = Pair::new(Config::default());
        let id = p.open_accepted(b"x");
        p.server.reset(id);
        // The client writes before learning of the reset.
        p.client.write(id, b"late").unwrap();
        p.client.shutdown_write(id).unwrap();
        p.drive();
        assert!(!p.server.is_closed());
        assert!(p.client_events.contains(&Event::Reset { id }));
    }

    #[test]
    fn goaway_closes_both_sides_and_fails_streams() {
        let mut p = Pair::new(Config::default());
        let id = p.open_accepted(b"x");
        p.client.close("bye");
        p.drive();
        assert_eq!(
            p.client_events.last(),
            Some(&Event::Closed {
                reason: CloseReason::Local
            })
        );
        assert_eq!(
            p.server_events.last(),
            Some(&Event::Closed {
                reason: CloseReason::PeerGoAway("bye".into())
            })
        );
        assert_eq!(p.server.write(id, b"x"), Err(StreamError::SessionClosed));
        assert_eq!(p.client.open(Bytes::new()), Err(OpenError::SessionClosed));
    }

    #[test]
    fn output_backlog_pushes_back_on_writers_until_drained() {
        let cfg = Config {
            max_buffered_output: 100 * 1024,
            ..Config::default()
        };
        let mut p = Pair::new(cfg);
        let a = p.open_accepted(b"a");
        let b = p.open_accepted(b"b");
        let data = vec![0u8; 200 * 1024];
        assert_eq!(p.client.write(a, &data).unwrap(), 100 * 1024);
        assert_eq!(p.client.write(b, &data), Err(StreamError::Blocked));
        let mut out = BytesMut::new();
        p.client.poll_transmit(&mut out);
        assert_eq!(p.client.poll_event(), Some(Event::Writable { id: b }));
        assert!(p.client.write(b, &data).unwrap() > 0);
    }
}
