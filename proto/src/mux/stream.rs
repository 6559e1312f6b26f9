//! The state of one stream, and the application's reads and writes on it.

use std::collections::VecDeque;
use std::time::Instant;

use bytes::Bytes;

#[cfg(doc)]
use super::Event;
use super::{BASE_WINDOW, Mux, StreamError};
use crate::frame::{self, Frame, FrameType, HEADER_LEN, MAX_DATA_PAYLOAD, StreamId};

/// Where a stream is in its opening handshake.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum State {
    /// Opened here, waiting for ACCEPT or REJECT.
    Opening,
    /// Opened by the peer, waiting for the application to answer.
    Incoming,
    /// Accepted.
    Open,
}

/// One stream's two halves: what this side may still send, and what it
/// received and has not yet read.
#[derive(Debug)]
pub(super) struct Stream {
    pub(super) state: State,
    // Sending half.
    pub(super) send_credit: u64,
    pub(super) send_fin: bool,
    pub(super) send_error: Option<StreamError>,
    pub(super) write_blocked: bool,
    // Receiving half.
    pub(super) recv_queue: VecDeque<Bytes>,
    pub(super) recv_fin: bool,
    pub(super) recv_eof_seen: bool,
    pub(super) recv_error: Option<StreamError>,
    pub(super) recv_received: u64,
    pub(super) recv_limit: u64,
    pub(super) recv_consumed: u64,
    pub(super) recv_window: u32,
    pub(super) last_grant: Option<Instant>,
}

impl Stream {
    pub(super) fn new(state: State) -> Self {
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

    /// Received bytes not yet read by the application.
    pub(super) fn buffered(&self) -> u64 {
        self.recv_received - self.recv_consumed
    }

    /// The peer aborted the stream, or the session died: writes fail, and
    /// reads fail unless the peer had already sent everything.
    pub(super) fn abort(&mut self, err: StreamError) {
        self.send_error.get_or_insert(err);
        if !self.recv_fin {
            self.recv_queue.clear();
            self.recv_error.get_or_insert(err);
        }
    }
}

impl Mux {
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

    /// Releases a stream once it has finished cleanly both ways.
    pub(super) fn maybe_release(&mut self, id: StreamId) {
        if let Some(s) = self.streams.get(&id)
            && s.send_fin
            && s.recv_eof_seen
            && s.send_error.is_none()
        {
            self.reset(id);
        }
    }
}
