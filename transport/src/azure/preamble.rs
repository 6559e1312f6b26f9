//! The stream preamble of azbridge (Azure Relay Bridge), so that hybridlink
//! peers and azbridge tunnel TCP to each other over Azure-protocol
//! WebSockets.
//!
//! The sender's first message is `[1, 0, mode, len, port_name]`: version 1,
//! a zero byte, mode 0 for a TCP stream (1 for datagrams, which hybridlink
//! does not carry), then the length and UTF-8 bytes of a port name (by
//! default the target port as text, `"1433"`). The listener answers
//! `[1, 0, mode]` to accept; `[0, 0, 0]` (unknown version), `[0, 0, 1]` and
//! `[0, 0, 255]` (wrong mode) refuse, and so does anything else or the end
//! of the stream. After that the WebSocket carries the stream's bytes as
//! binary messages whose boundaries mean nothing.

/// The only version azbridge speaks.
pub const VERSION: u8 = 1;
/// A TCP stream.
pub const MODE_STREAM: u8 = 0;
/// The listener's answer that accepts a stream.
pub const ACCEPTED: [u8; 3] = [VERSION, 0, MODE_STREAM];
/// The listener's answer to a mode it does not serve.
pub const WRONG_MODE: [u8; 3] = [0, 0, 255];

/// A sender's preamble.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Preamble {
    /// 0 for a stream, 1 for datagrams.
    pub mode: u8,
    /// The port name the sender asked for.
    pub port_name: String,
}

/// Why a listener's answer refuses a stream.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refused {
    /// `[0, 0, 0]`.
    #[error("the listener does not speak this preamble's version")]
    Version,
    /// `[0, 0, 1]` or `[0, 0, 255]`.
    #[error("the listener serves another mode (datagrams, not a TCP stream)")]
    Mode,
    /// Anything else.
    #[error("the listener answered the stream preamble with {0:02x?}, not [1, 0, 0]")]
    Other(Vec<u8>),
}

/// A stream preamble asking for `port_name` (cut to 255 bytes at a
/// character boundary).
pub fn encode(port_name: &str) -> Vec<u8> {
    let mut end = port_name.len().min(255);
    while !port_name.is_char_boundary(end) {
        end -= 1;
    }
    let name = &port_name.as_bytes()[..end];
    let mut out = vec![VERSION, 0, MODE_STREAM, name.len() as u8];
    out.extend_from_slice(name);
    out
}

/// The preamble `message` is, if it is exactly one: a sender's first
/// message is taken as a preamble only when its length is exactly what its
/// fourth byte announces, so raw data from a client that sends none (a
/// `hyco-ws` sender) is almost never mistaken for one.
pub fn parse(message: &[u8]) -> Option<Preamble> {
    let [VERSION, 0, mode, len, name @ ..] = message else {
        return None;
    };
    if name.len() != usize::from(*len) || *mode > 1 {
        return None;
    }
    let port_name = std::str::from_utf8(name).ok()?.to_string();
    Some(Preamble {
        mode: *mode,
        port_name,
    })
}

/// Checks a listener's answer to a stream preamble.
pub fn check_answer(answer: &[u8]) -> Result<(), Refused> {
    match answer {
        [VERSION, 0, MODE_STREAM] => Ok(()),
        [0, 0, 0] => Err(Refused::Version),
        [0, 0, 1] | [0, 0, 255] => Err(Refused::Mode),
        other => Err(Refused::Other(other.iter().copied().take(16).collect())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_preamble_round_trips_and_is_what_azbridge_sends() {
        let bytes = encode("1433");
        assert_eq!(bytes, [1, 0, 0, 4, b'1', b'4', b'3', b'3']);
        assert_eq!(
            parse(&bytes),
            Some(Preamble {
                mode: 0,
                port_name: "1433".into()
            })
        );
    }

    #[test]
    fn data_that_does_not_fit_the_announced_length_is_not_a_preamble() {
        assert_eq!(parse(b"GET / HTTP/1.1\r\n"), None);
        assert_eq!(parse(&[1, 0, 0, 4, b'1', b'4', b'3']), None);
        assert_eq!(parse(&[1, 0, 0, 2, b'1', b'4', b'3']), None);
        assert_eq!(parse(&[1, 0, 7, 0]), None);
        assert_eq!(parse(&[1, 0, 0, 2, 0xff, 0xfe]), None, "not UTF-8");
        assert!(parse(&[1, 0, 1, 3, b'5', b'3', b'U']).is_some());
    }

    #[test]
    fn long_port_names_are_cut_at_a_character_boundary() {
        let name = "é".repeat(200);
        let bytes = encode(&name);
        assert_eq!(usize::from(bytes[3]), 254);
        assert!(parse(&bytes).is_some());
    }

    #[test]
    fn answers_say_why_a_stream_was_refused() {
        assert_eq!(check_answer(&ACCEPTED), Ok(()));
        assert_eq!(check_answer(&[0, 0, 0]), Err(Refused::Version));
        assert_eq!(check_answer(&WRONG_MODE), Err(Refused::Mode));
        assert!(matches!(check_answer(b"hello"), Err(Refused::Other(_))));
    }
}
