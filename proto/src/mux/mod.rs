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
//! The session window is a hard bound on the credit granted: every stream
//! commits its [`BASE_WINDOW`] from the moment it is opened (by either
//! side), initial windows are raised only as far as the budget allows, and
//! a stream the budget cannot cover is refused (REJECT for the peer's OPEN,
//! [`OpenError::SessionFull`] for our own). So a pipe never buffers more
//! than that window of unread bytes, however many streams it carries.
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
//!
//! # Layout
//!
//! This file holds the session: its configuration, the events it reports,
//! frames in and out, timers and the life of streams. `stream` holds the
//! state of one stream and the application's reads and writes on it, `flow`
//! the credit and window growth, `error` the errors.

mod error;
mod flow;
mod stream;
#[cfg(test)]
mod tests;

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};

pub use crate::frame::StreamId;
use crate::frame::{self, Frame, FrameType, MAX_DATA_PAYLOAD};

pub use error::{CloseReason, OpenError, ProtocolError, StreamError};
pub use flow::BASE_WINDOW;
use stream::{State, Stream};

/// DATA payloads of this size or more are buffered without copying.
pub const ZERO_COPY_MIN: usize = 4 * 1024;

/// Payload of the REJECT sent for an OPEN past [`Config::max_streams`], or
/// one whose [`BASE_WINDOW`] the session window cannot cover.
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
            // As many as the appliance's netstack holds flows. Every stream
            // commits at least BASE_WINDOW of the session window, so with
            // the default window the budget admits 4,096 streams at once
            // before this; a sender whose pipe is full opens another one to
            // the same agent (`transport::sender::MAX_PIPES_PER_AGENT`).
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
    /// Frames that go out before everything in `out`: opens and their
    /// answers, window updates, pings and pongs. A new stream's OPEN (or a
    /// peer's credit) never waits behind a backlog of other streams' DATA.
    /// Nothing here must keep its place relative to DATA: FIN and RST, which
    /// must follow their stream's DATA, go into `out`.
    urgent: BytesMut,
    /// An RST waits in `out`. Its stream is already released here, so a
    /// new OPEN could count on its room; until the RST is transmitted,
    /// frames that would jump the queue keep their order instead, so the
    /// peer frees the stream before it sees the OPEN.
    rst_waiting: bool,
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
            urgent: BytesMut::new(),
            rst_waiting: false,
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

    /// Whether [`Mux::open`] would take one more stream now: the session is
    /// up, holds fewer than [`Config::max_streams`], and its window can
    /// cover the new stream's [`BASE_WINDOW`]. The peer, with the same
    /// configuration, accepts what this allows.
    pub fn can_open(&self) -> bool {
        self.closed.is_none()
            && self.streams.len() < self.config.max_streams
            && self.has_room_for_a_stream()
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
        self.pending_output() <= 2 * self.config.max_buffered_output
    }

    /// Bytes waiting to be written to the pipe.
    pub fn pending_output(&self) -> usize {
        self.out.len() + self.urgent.len()
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
        move_into(out, &mut self.urgent);
        self.transmit_data(out);
    }

    /// As [`Self::poll_transmit`], with the frames that jump the queue
    /// (opens and their answers, window updates, pings and pongs) appended
    /// to `urgent` and the rest to `data`: the caller writes `urgent`
    /// first, and a large `data` batch is handed over without a copy.
    pub fn poll_transmit_split(&mut self, urgent: &mut BytesMut, data: &mut BytesMut) {
        move_into(urgent, &mut self.urgent);
        self.transmit_data(data);
    }

    fn transmit_data(&mut self, out: &mut BytesMut) {
        if self.out.is_empty() {
            return;
        }
        move_into(out, &mut self.out);
        self.open_data_frame = None;
        self.rst_waiting = false;
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
        if !self.has_room_for_a_stream() {
            return Err(OpenError::SessionFull);
        }
        let raw = u32::try_from(self.next_local).map_err(|_| OpenError::IdsExhausted)?;
        self.next_local += 2;
        let id = StreamId::new(raw);
        self.push_urgent(&Frame::Open { id, request });
        let mut stream = Stream::new(State::Opening);
        self.commit_base();
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
        self.push_urgent(&Frame::Accept { id, payload });
        self.grant_initial(id, &mut s);
        self.streams.insert(id, s);
        Ok(())
    }

    /// Rejects a stream the peer opened; the stream is gone afterwards.
    pub fn reject(&mut self, id: StreamId, payload: Bytes) -> Result<(), StreamError> {
        self.stream_for_answer(id)?;
        self.release(id);
        self.push_urgent(&Frame::Reject { id, payload });
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

    /// Releases a stream. Unless it had finished cleanly both ways (or the
    /// peer already reset it), the peer is told with RST that the stream was
    /// aborted. Call it when the application drops a stream; unknown ids
    /// are ignored.
    pub fn reset(&mut self, id: StreamId) {
        let Some(s) = self.release(id) else {
            return;
        };
        let clean = s.send_fin && s.recv_fin;
        let peer_knows = s.send_error.is_some();
        if !clean && !peer_knows && self.closed.is_none() {
            self.push(&Frame::Rst { id });
            self.rst_waiting = true;
        }
    }

    /// Forgets a stream without telling the peer, and returns its receive
    /// window to the session budget.
    fn release(&mut self, id: StreamId) -> Option<Stream> {
        let s = self.streams.remove(&id)?;
        self.session_window = self.session_window.saturating_sub(u64::from(s.recv_window));
        Some(s)
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

    /// Queues a frame ahead of the DATA backlog (see `urgent`).
    fn push_urgent(&mut self, frame: &Frame) {
        if self.rst_waiting {
            self.push(frame);
        } else {
            frame.encode(&mut self.urgent);
        }
    }

    fn send_ping(&mut self, now: Instant) {
        let opaque = self.next_ping;
        self.next_ping += 1;
        self.ping_outstanding = Some((opaque, now));
        self.last_ping = Some(now);
        self.push_urgent(&Frame::Ping { opaque });
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
                // An accepted stream may receive BASE_WINDOW at once: one
                // the session budget cannot cover is refused like one past
                // the stream limit. The budget is committed from the OPEN.
                if self.streams.len() >= self.config.max_streams || !self.has_room_for_a_stream() {
                    self.push_urgent(&Frame::Reject {
                        id,
                        payload: Bytes::from_static(TOO_MANY_STREAMS),
                    });
                } else {
                    self.commit_base();
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
                    // The REJECT ended the stream on both sides: no RST.
                    self.release(id);
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
                if !self.on_window(id, increment) {
                    return self.check_gone(id, kind);
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
                    self.release(id);
                    self.events.push_back(Event::Reset { id });
                }
            }
            Frame::Ping { opaque } => self.push_urgent(&Frame::Pong { opaque }),
            Frame::Pong { opaque } => self.on_pong(opaque, now),
            Frame::GoAway { reason } => {
                let text = String::from_utf8_lossy(&reason[..reason.len().min(256)]).into_owned();
                self.close_with(CloseReason::PeerGoAway(text), false);
            }
        }
        Ok(())
    }
}

/// Appends `from` to `to` and empties `from`; when `to` is empty, the two
/// buffers are swapped instead (no copy, and both allocations are reused).
fn move_into(to: &mut BytesMut, from: &mut BytesMut) {
    if from.is_empty() {
        return;
    }
    if to.is_empty() {
        std::mem::swap(to, from);
    } else {
        to.extend_from_slice(from);
        from.clear();
    }
}
