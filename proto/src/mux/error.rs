//! Errors of the multiplexer: what the peer did wrong, why a session ended,
//! why opening or using a stream failed.

#[cfg(doc)]
use super::{Config, Event, Mux};
use crate::frame::{FrameError, FrameType, StreamId};

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
    /// The receive windows of the open streams fill the session window:
    /// another stream would commit memory past it.
    #[error("the streams of this pipe hold all of its receive window; close some first")]
    SessionFull,
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
