//! Wire format of the stream multiplexer that runs inside a pipe.
//!
//! Every frame is a 9-byte header followed by `len` payload bytes:
//!
//! ```text
//! +--------+----------------------+----------------------+=============+
//! | type:8 | stream id: 32, BE    | len: 32, BE          | payload ... |
//! +--------+----------------------+----------------------+=============+
//! ```
//!
//! | type | name   | stream id | payload                                    |
//! | ---- | ------ | --------- | ------------------------------------------ |
//! | 0x01 | OPEN   | non-zero  | the request (names the hybrid connection)  |
//! | 0x02 | ACCEPT | non-zero  | free-form answer                           |
//! | 0x03 | REJECT | non-zero  | free-form reason ("connection refused")    |
//! | 0x04 | DATA   | non-zero  | stream bytes                               |
//! | 0x05 | WINDOW | non-zero  | credit increment, u32 BE, never zero        |
//! | 0x06 | FIN    | non-zero  | empty: the sender will send no more DATA   |
//! | 0x07 | RST    | non-zero  | empty: the stream is aborted both ways     |
//! | 0x08 | PING   | zero      | 8 opaque bytes                             |
//! | 0x09 | PONG   | zero      | the 8 bytes of the PING it answers         |
//! | 0x0a | GOAWAY | zero      | UTF-8 reason; the session ends             |
//!
//! [`Frame::decode`] parses untrusted bytes: it never panics, returns
//! `Ok(None)` while a frame is incomplete and a [`FrameError`] on anything
//! malformed. DATA payloads are split off the input buffer without copying.

use std::fmt;

use bytes::{Buf, BufMut, Bytes, BytesMut};

/// Size of the fixed frame header in bytes.
pub const HEADER_LEN: usize = 9;

/// Largest payload a peer may put in one frame unless configured otherwise.
///
/// Senders of this crate put at most [`MAX_DATA_PAYLOAD`] bytes in a DATA
/// frame; the larger limit leaves room for other implementations.
pub const DEFAULT_MAX_PAYLOAD: u32 = 256 * 1024;

/// Largest DATA payload this crate sends in one frame.
pub const MAX_DATA_PAYLOAD: usize = 64 * 1024;

/// Identifier of a stream within one pipe. Zero is reserved for frames that
/// concern the whole session (PING, PONG, GOAWAY).
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct StreamId(u32);

impl StreamId {
    /// Wraps a raw identifier as found on the wire.
    pub const fn new(raw: u32) -> Self {
        Self(raw)
    }

    /// The raw identifier as written on the wire.
    pub const fn get(self) -> u32 {
        self.0
    }

    /// Whether the client side of the pipe opened this stream (odd ids).
    pub const fn is_client_initiated(self) -> bool {
        self.0 & 1 == 1
    }
}

impl fmt::Debug for StreamId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "#{}", self.0)
    }
}

impl fmt::Display for StreamId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// The type byte of a frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum FrameType {
    /// Opens a stream; the payload is the request.
    Open = 0x01,
    /// Accepts a stream opened by the peer.
    Accept = 0x02,
    /// Refuses a stream opened by the peer; the payload says why.
    Reject = 0x03,
    /// Stream bytes.
    Data = 0x04,
    /// Grants the peer more send credit on a stream.
    Window = 0x05,
    /// Half-closes the sender's direction of a stream.
    Fin = 0x06,
    /// Aborts a stream in both directions.
    Rst = 0x07,
    /// Asks the peer for a PONG (keep-alive and RTT probe).
    Ping = 0x08,
    /// Answers a PING.
    Pong = 0x09,
    /// Ends the session.
    GoAway = 0x0a,
}

impl FrameType {
    /// Parses a type byte; `None` for a byte no frame type uses.
    pub const fn from_u8(b: u8) -> Option<Self> {
        Some(match b {
            0x01 => Self::Open,
            0x02 => Self::Accept,
            0x03 => Self::Reject,
            0x04 => Self::Data,
            0x05 => Self::Window,
            0x06 => Self::Fin,
            0x07 => Self::Rst,
            0x08 => Self::Ping,
            0x09 => Self::Pong,
            0x0a => Self::GoAway,
            _ => return None,
        })
    }

    /// Whether frames of this type concern the whole session (stream id 0).
    pub const fn is_session_frame(self) -> bool {
        matches!(self, Self::Ping | Self::Pong | Self::GoAway)
    }
}

/// A malformed frame. Every variant is fatal for the session that received
/// it: the byte stream can no longer be trusted to be in sync.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    /// The type byte is not one this protocol defines.
    #[error(
        "unknown frame type {0:#04x}: the peer speaks another protocol or the byte stream is corrupt"
    )]
    UnknownType(u8),
    /// The length field exceeds the configured maximum payload.
    #[error("{kind:?} frame announces {len} payload bytes, more than the limit of {max}")]
    TooLarge {
        /// Type of the offending frame.
        kind: FrameType,
        /// Announced payload length.
        len: u32,
        /// Configured limit.
        max: u32,
    },
    /// A stream frame uses stream id 0, which is reserved for the session.
    #[error("{0:?} frame on stream 0, which is reserved for session frames")]
    ZeroStreamId(FrameType),
    /// A session frame names a stream.
    #[error("{kind:?} frame names stream {id}, but session frames must use stream 0")]
    NonZeroStreamId {
        /// Type of the offending frame.
        kind: FrameType,
        /// The stream id found.
        id: u32,
    },
    /// A fixed-size frame has the wrong payload length.
    #[error("{kind:?} frame has a {len}-byte payload, it must have {expected}")]
    BadLength {
        /// Type of the offending frame.
        kind: FrameType,
        /// Announced payload length.
        len: u32,
        /// The only length allowed for this type.
        expected: u32,
    },
    /// A WINDOW frame grants no credit.
    #[error("WINDOW frame on stream {0} grants zero bytes")]
    ZeroWindowIncrement(StreamId),
}

/// One decoded frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    /// Opens stream `id` with a request.
    Open {
        /// New stream.
        id: StreamId,
        /// What the opener asks for (e.g. the hybrid connection name).
        request: Bytes,
    },
    /// Accepts stream `id`.
    Accept {
        /// Accepted stream.
        id: StreamId,
        /// Answer for the opener.
        payload: Bytes,
    },
    /// Refuses stream `id`.
    Reject {
        /// Refused stream.
        id: StreamId,
        /// Why, for the opener.
        payload: Bytes,
    },
    /// Bytes of stream `id`.
    Data {
        /// Stream the bytes belong to.
        id: StreamId,
        /// The bytes.
        data: Bytes,
    },
    /// `increment` more bytes may be sent on stream `id`.
    Window {
        /// Stream the credit is for.
        id: StreamId,
        /// Additional credit in bytes, never zero.
        increment: u32,
    },
    /// No more DATA follows on stream `id` from this sender.
    Fin {
        /// Half-closed stream.
        id: StreamId,
    },
    /// Stream `id` is aborted.
    Rst {
        /// Aborted stream.
        id: StreamId,
    },
    /// Keep-alive / RTT probe.
    Ping {
        /// Echoed back in the PONG.
        opaque: u64,
    },
    /// Answer to a PING.
    Pong {
        /// The PING's value.
        opaque: u64,
    },
    /// The sender ends the session.
    GoAway {
        /// Human-readable reason (UTF-8, not trusted to be valid).
        reason: Bytes,
    },
}

impl Frame {
    /// Type byte of this frame.
    pub fn kind(&self) -> FrameType {
        match self {
            Self::Open { .. } => FrameType::Open,
            Self::Accept { .. } => FrameType::Accept,
            Self::Reject { .. } => FrameType::Reject,
            Self::Data { .. } => FrameType::Data,
            Self::Window { .. } => FrameType::Window,
            Self::Fin { .. } => FrameType::Fin,
            Self::Rst { .. } => FrameType::Rst,
            Self::Ping { .. } => FrameType::Ping,
            Self::Pong { .. } => FrameType::Pong,
            Self::GoAway { .. } => FrameType::GoAway,
        }
    }

    /// Decodes one frame from the front of `buf`.
    ///
    /// Returns `Ok(None)` (consuming nothing) while `buf` holds less than a
    /// whole frame, and consumes the frame on success. Header errors are
    /// reported as soon as the 9 header bytes are present, so a peer cannot
    /// make the caller buffer a huge announced payload. Payloads are split
    /// off `buf` without copying.
    pub fn decode(buf: &mut BytesMut, max_payload: u32) -> Result<Option<Frame>, FrameError> {
        let Some(header) = buf.first_chunk::<HEADER_LEN>() else {
            return Ok(None);
        };
        let kind = FrameType::from_u8(header[0]).ok_or(FrameError::UnknownType(header[0]))?;
        let raw_id = u32::from_be_bytes([header[1], header[2], header[3], header[4]]);
        let len = u32::from_be_bytes([header[5], header[6], header[7], header[8]]);
        check_header(kind, raw_id, len, max_payload)?;
        // len <= max_payload: u32 always fits usize on the targets we build for.
        let len = len as usize;
        if buf.len() < HEADER_LEN + len {
            return Ok(None);
        }
        buf.advance(HEADER_LEN);
        let mut payload = buf.split_to(len);
        let id = StreamId(raw_id);
        Ok(Some(match kind {
            FrameType::Open => Frame::Open {
                id,
                request: payload.freeze(),
            },
            FrameType::Accept => Frame::Accept {
                id,
                payload: payload.freeze(),
            },
            FrameType::Reject => Frame::Reject {
                id,
                payload: payload.freeze(),
            },
            FrameType::Data => Frame::Data {
                id,
                data: payload.freeze(),
            },
            FrameType::Window => {
                let increment = payload.get_u32();
                if increment == 0 {
                    return Err(FrameError::ZeroWindowIncrement(id));
                }
                Frame::Window { id, increment }
            }
            FrameType::Fin => Frame::Fin { id },
            FrameType::Rst => Frame::Rst { id },
            FrameType::Ping => Frame::Ping {
                opaque: payload.get_u64(),
            },
            FrameType::Pong => Frame::Pong {
                opaque: payload.get_u64(),
            },
            FrameType::GoAway => Frame::GoAway {
                reason: payload.freeze(),
            },
        }))
    }

    /// Appends the encoded frame to `out`.
    ///
    /// The caller keeps payloads within the peer's limit (at most
    /// [`DEFAULT_MAX_PAYLOAD`] bytes unless both sides agreed otherwise).
    pub fn encode(&self, out: &mut BytesMut) {
        match self {
            Self::Open { id, request: p }
            | Self::Accept { id, payload: p }
            | Self::Reject { id, payload: p }
            | Self::Data { id, data: p } => {
                encode_header(self.kind(), *id, payload_len(p), out);
                out.extend_from_slice(p);
            }
            Self::Window { id, increment } => {
                encode_header(FrameType::Window, *id, 4, out);
                out.put_u32(*increment);
            }
            Self::Fin { id } | Self::Rst { id } => encode_header(self.kind(), *id, 0, out),
            Self::Ping { opaque } | Self::Pong { opaque } => {
                encode_header(self.kind(), StreamId(0), 8, out);
                out.put_u64(*opaque);
            }
            Self::GoAway { reason } => {
                encode_header(FrameType::GoAway, StreamId(0), payload_len(reason), out);
                out.extend_from_slice(reason);
            }
        }
    }
}

fn payload_len(p: &[u8]) -> u32 {
    u32::try_from(p.len()).unwrap_or(u32::MAX)
}

fn check_header(kind: FrameType, id: u32, len: u32, max_payload: u32) -> Result<(), FrameError> {
    if kind.is_session_frame() {
        if id != 0 {
            return Err(FrameError::NonZeroStreamId { kind, id });
        }
    } else if id == 0 {
        return Err(FrameError::ZeroStreamId(kind));
    }
    let fixed = match kind {
        FrameType::Window => Some(4),
        FrameType::Fin | FrameType::Rst => Some(0),
        FrameType::Ping | FrameType::Pong => Some(8),
        _ => None,
    };
    match fixed {
        Some(expected) if len != expected => Err(FrameError::BadLength {
            kind,
            len,
            expected,
        }),
        None if len > max_payload => Err(FrameError::TooLarge {
            kind,
            len,
            max: max_payload,
        }),
        _ => Ok(()),
    }
}

/// Appends a frame header to `out`.
///
/// Used directly to write DATA frames whose payload is appended by the caller
/// right after, saving a copy through an intermediate [`Bytes`].
pub fn encode_header(kind: FrameType, id: StreamId, len: u32, out: &mut BytesMut) {
    let mut h = [0u8; HEADER_LEN];
    h[0] = kind as u8;
    h[1..5].copy_from_slice(&id.0.to_be_bytes());
    h[5..9].copy_from_slice(&len.to_be_bytes());
    out.extend_from_slice(&h);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(n: u32) -> StreamId {
        StreamId::new(n)
    }

    fn samples() -> Vec<Frame> {
        vec![
            Frame::Open {
                id: id(1),
                request: Bytes::from_static(b"sql-prod"),
            },
            Frame::Accept {
                id: id(1),
                payload: Bytes::new(),
            },
            Frame::Reject {
                id: id(3),
                payload: Bytes::from_static(b"connection refused"),
            },
            Frame::Data {
                id: id(2),
                data: Bytes::from(vec![7u8; 70_000]),
            },
            Frame::Window {
                id: id(2),
                increment: 131_072,
            },
            Frame::Fin { id: id(5) },
            Frame::Rst { id: id(u32::MAX) },
            Frame::Ping {
                opaque: 0x0102_0304_0506_0708,
            },
            Frame::Pong { opaque: u64::MAX },
            Frame::GoAway {
                reason: Bytes::from_static(b"shutting down"),
            },
        ]
    }

    #[test]
    fn every_frame_type_round_trips() {
        let mut buf = BytesMut::new();
        for f in samples() {
            f.encode(&mut buf);
        }
        for expected in samples() {
            let got = Frame::decode(&mut buf, DEFAULT_MAX_PAYLOAD)
                .unwrap()
                .unwrap();
            assert_eq!(got, expected);
        }
        assert!(buf.is_empty());
        assert_eq!(Frame::decode(&mut buf, DEFAULT_MAX_PAYLOAD), Ok(None));
    }

    #[test]
    fn partial_input_consumes_nothing_until_the_frame_is_whole() {
        let mut whole = BytesMut::new();
        Frame::Data {
            id: id(9),
            data: Bytes::from_static(b"hello world"),
        }
        .encode(&mut whole);
        for cut in 0..whole.len() {
            let mut part = BytesMut::from(&whole[..cut]);
            assert_eq!(Frame::decode(&mut part, 1024), Ok(None), "cut at {cut}");
            assert_eq!(part.len(), cut);
        }
        let f = Frame::decode(&mut whole, 1024).unwrap().unwrap();
        assert_eq!(
            f,
            Frame::Data {
                id: id(9),
                data: Bytes::from_static(b"hello world")
            }
        );
    }

    #[test]
    fn header_encoding_is_exactly_as_documented() {
        let mut buf = BytesMut::new();
        Frame::Window {
            id: id(0x0102_0304),
            increment: 0x10,
        }
        .encode(&mut buf);
        assert_eq!(&buf[..], &[0x05, 1, 2, 3, 4, 0, 0, 0, 4, 0, 0, 0, 0x10]);
    }

    fn header(t: u8, id: u32, len: u32) -> BytesMut {
        let mut b = BytesMut::new();
        b.put_u8(t);
        b.put_u32(id);
        b.put_u32(len);
        b
    }

    #[test]
    fn garbage_is_rejected_with_the_matching_error() {
        let cases: Vec<(BytesMut, FrameError)> = vec![
            (header(0x00, 1, 0), FrameError::UnknownType(0)),
            (header(0xff, 1, 0), FrameError::UnknownType(0xff)),
            (
                header(0x04, 1, 1025),
                FrameError::TooLarge {
                    kind: FrameType::Data,
                    len: 1025,
                    max: 1024,
                },
            ),
            (
                header(0x04, 0, 3),
                FrameError::ZeroStreamId(FrameType::Data),
            ),
            (
                header(0x01, 0, 3),
                FrameError::ZeroStreamId(FrameType::Open),
            ),
            (
                header(0x08, 7, 8),
                FrameError::NonZeroStreamId {
                    kind: FrameType::Ping,
                    id: 7,
                },
            ),
            (
                header(0x05, 1, 5),
                FrameError::BadLength {
                    kind: FrameType::Window,
                    len: 5,
                    expected: 4,
                },
            ),
            (
                header(0x06, 1, 1),
                FrameError::BadLength {
                    kind: FrameType::Fin,
                    len: 1,
                    expected: 0,
                },
            ),
            (
                header(0x09, 0, 4),
                FrameError::BadLength {
                    kind: FrameType::Pong,
                    len: 4,
                    expected: 8,
                },
            ),
        ];
        for (mut buf, err) in cases {
            // Errors come from the header alone, before any payload arrives.
            assert_eq!(Frame::decode(&mut buf, 1024), Err(err));
        }
        let mut zero = header(0x05, 3, 4);
        zero.put_u32(0);
        assert_eq!(
            Frame::decode(&mut zero, 1024),
            Err(FrameError::ZeroWindowIncrement(id(3)))
        );
    }

    #[test]
    fn random_bytes_never_panic() {
        // xorshift64*: deterministic, no dependency.
        let mut state = 0x9E37_79B9_7F4A_7C15u64;
        let mut next = move || {
            state ^= state >> 12;
            state ^= state << 25;
            state ^= state >> 27;
            state.wrapping_mul(0x2545_F491_4F6C_DD1D)
        };
        let mut decoded = 0usize;
        for round in 0..5000 {
            let mut buf = BytesMut::new();
            if round % 2 == 0 {
                // Plausible frames (random type, id and length) then noise.
                for _ in 0..(next() % 4) {
                    let t = (next() % 12) as u8;
                    let id = [0, 1, 2, next() as u32][(next() % 4) as usize];
                    let len = [0, 4, 8, (next() % 40) as u32][(next() % 4) as usize];
                    buf.extend_from_slice(&header(t, id, len));
                    for _ in 0..len {
                        buf.put_u8(next() as u8);
                    }
                }
                buf.truncate(buf.len().saturating_sub((next() % 4) as usize));
            } else {
                for _ in 0..(next() % 96) {
                    buf.put_u8(next() as u8);
                }
            }
            loop {
                let before = buf.len();
                match Frame::decode(&mut buf, 32) {
                    Ok(Some(f)) => {
                        decoded += 1;
                        assert!(buf.len() < before);
                        let mut again = BytesMut::new();
                        f.encode(&mut again);
                        assert_eq!(Frame::decode(&mut again, 32), Ok(Some(f)));
                    }
                    Ok(None) | Err(_) => break,
                }
            }
        }
        assert!(
            decoded > 300,
            "the biased generator should produce valid frames, got {decoded}"
        );
    }
}
