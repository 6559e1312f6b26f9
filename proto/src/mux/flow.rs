//! Flow control: the credit each side grants, and how windows grow towards
//! the bandwidth-delay product (see the [module docs](super#flow-control)).

use std::time::{Duration, Instant};

use super::stream::Stream;
use super::{Event, Mux};
use crate::frame::{Frame, StreamId};

/// Credit each side implicitly grants on every new stream, before any
/// WINDOW frame.
pub const BASE_WINDOW: u32 = 64 * 1024;

/// Window raises and growth leave the base windows of this many new streams
/// uncommitted (at most an eighth of the session window), so streams opened
/// after a few fast ones still fit in the session window.
const RESERVED_STREAMS: u64 = 1024;

/// How often the round-trip time is re-measured while windows are granted.
const RTT_PROBE_INTERVAL: Duration = Duration::from_millis(100);

impl Mux {
    /// Whether the session can commit the [`BASE_WINDOW`] a new stream
    /// implicitly grants without passing [`super::Config::max_session_window`].
    pub(super) fn has_room_for_a_stream(&self) -> bool {
        self.session_window + u64::from(BASE_WINDOW) <= self.config.max_session_window
    }

    /// Commits the [`BASE_WINDOW`] of a stream being created.
    pub(super) fn commit_base(&mut self) {
        self.session_window += u64::from(BASE_WINDOW);
    }

    /// Session window that raises above [`BASE_WINDOW`] may still commit:
    /// what is left after the reserve for new streams.
    fn room_to_raise(&self) -> u64 {
        let base = u64::from(BASE_WINDOW);
        let reserve = (self.config.max_session_window / base / 8).min(RESERVED_STREAMS) * base;
        self.config
            .max_session_window
            .saturating_sub(self.session_window + reserve)
    }

    /// Raises the receive window of a new stream (whose [`BASE_WINDOW`] is
    /// committed) towards the configured initial window, as far as the
    /// session budget allows.
    pub(super) fn grant_initial(&mut self, id: StreamId, s: &mut Stream) {
        let room = self.room_to_raise();
        let wanted = self.config.initial_window.saturating_sub(s.recv_window);
        let increment = u32::try_from(room.min(u64::from(wanted))).unwrap_or(wanted);
        if increment > 0 {
            s.recv_window += increment;
            s.recv_limit = u64::from(s.recv_window);
            self.session_window += u64::from(increment);
            self.push_urgent(&Frame::Window { id, increment });
        }
    }

    /// Grants more credit once half of the window was consumed; doubles the
    /// window when grants come faster than every two round trips.
    pub(super) fn maybe_grant(&mut self, id: StreamId, now: Instant) {
        let room = self.room_to_raise();
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
            if extra <= room {
                self.session_window += extra;
                s.recv_window = grown;
            }
        }
        s.last_grant = Some(now);
        let new_limit = s.recv_consumed + u64::from(s.recv_window);
        // new_limit - recv_limit <= window <= u32::MAX.
        let increment = (new_limit - s.recv_limit) as u32;
        s.recv_limit = new_limit;
        self.push_urgent(&Frame::Window { id, increment });
        let stale = self
            .last_rtt_sample
            .is_none_or(|t| now >= t + RTT_PROBE_INTERVAL);
        if self.ping_outstanding.is_none() && stale {
            self.send_ping(now);
        }
    }

    /// Adds the peer's WINDOW increment to a stream's send credit. False if
    /// the stream is not held.
    pub(super) fn on_window(&mut self, id: StreamId, increment: u32) -> bool {
        let Some(s) = self.streams.get_mut(&id) else {
            return false;
        };
        s.send_credit = s.send_credit.saturating_add(u64::from(increment));
        if std::mem::take(&mut s.write_blocked) {
            self.events.push_back(Event::Writable { id });
        }
        true
    }

    /// Takes a round-trip sample from the PONG of the outstanding PING.
    pub(super) fn on_pong(&mut self, opaque: u64, now: Instant) {
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
}
