//! The control channel between a peer (agent or sender) and the relay.
//!
//! A control channel is one long-lived TLS connection from a peer to the
//! relay. Over it the peer attaches to hybrid connections with SAS tokens,
//! learns which agents serve them, asks for pipes and receives pipe tickets.
//! Messages are JSON, each preceded by its length as a big-endian `u32`:
//! control traffic is small and rare, so readability wins over compactness.
//!
//! The same module defines the small messages that travel *inside* a pipe
//! when a stream is opened ([`StreamRequest`], [`StreamRefusal`]): they are
//! exchanged between sender and agent, never seen by the relay.

use std::fmt;
use std::str::FromStr;

use bytes::{Buf, BufMut, BytesMut};
use serde::{Deserialize, Serialize};

use crate::label::PeerLabel;
use crate::name::{Endpoint, HcName};

/// Version of the control protocol; a relay refuses a peer that speaks another.
pub const PROTOCOL_VERSION: u32 = 1;

/// Largest control message accepted. Control messages are small; anything
/// bigger is a broken or hostile peer.
pub const MAX_MESSAGE_LEN: usize = 1 << 20;

/// Largest control message a relay accepts from a peer that has not yet
/// attached to a hybrid connection: `Hello`, `Attach` and `Describe` fit in
/// well under 1 KiB, and nobody should make the relay hold a megabyte
/// before proving anything.
pub const PRE_AUTH_MAX_MESSAGE_LEN: usize = 8 << 10;

/// First bytes of a pipe connection to the relay port. A control channel
/// starts with a TLS record instead (first byte `0x16`), so one port serves
/// both.
pub const PIPE_MAGIC: &[u8; 4] = b"HLP1";

/// Length of the pipe preamble: magic, ticket, role byte.
pub const PIPE_PREAMBLE_LEN: usize = PIPE_MAGIC.len() + TICKET_LEN + 1;

/// Length in bytes of a pipe ticket.
pub const TICKET_LEN: usize = 16;

/// The SHA-256 of a peer's data certificate (DER). It is how the two ends of
/// a pipe recognise each other: the relay announces it, TLS inside the pipe
/// checks it.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Fingerprint(pub [u8; 32]);

impl Fingerprint {
    /// Fingerprint of a DER certificate.
    pub fn of_der(der: &[u8]) -> Self {
        let digest = ring::digest::digest(&ring::digest::SHA256, der);
        let mut out = [0u8; 32];
        out.copy_from_slice(digest.as_ref());
        Fingerprint(out)
    }
}

impl fmt::Display for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex_encode(&self.0))
    }
}

impl fmt::Debug for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Fingerprint({})", &hex_encode(&self.0)[..16])
    }
}

impl FromStr for Fingerprint {
    type Err = ControlError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        hex_decode::<32>(s)
            .map(Fingerprint)
            .ok_or(ControlError::BadHex("fingerprint"))
    }
}

impl Serialize for Fingerprint {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_string())
    }
}

impl<'de> Deserialize<'de> for Fingerprint {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// A one-time pipe ticket: the relay hands the same ticket to both ends of a
/// pipe, and splices the two connections that present it.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Ticket(pub [u8; TICKET_LEN]);

impl fmt::Debug for Ticket {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Half of it is enough to correlate logs and useless to an attacker.
        write!(f, "Ticket({}…)", &hex_encode(&self.0)[..8])
    }
}

impl Serialize for Ticket {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&hex_encode(&self.0))
    }
}

impl<'de> Deserialize<'de> for Ticket {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        hex_decode::<TICKET_LEN>(&s)
            .map(Ticket)
            .ok_or_else(|| serde::de::Error::custom("ticket is not 32 hex digits"))
    }
}

/// Which end of a pipe a connection is, as written in the pipe preamble.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PipeRole {
    /// The side that asked for the pipe (appliance, `connect`, `forward`).
    Sender,
    /// The agent.
    Agent,
}

/// Writes the preamble a peer sends first on a pipe connection.
pub fn encode_pipe_preamble(ticket: &Ticket, role: PipeRole) -> [u8; PIPE_PREAMBLE_LEN] {
    let mut out = [0u8; PIPE_PREAMBLE_LEN];
    out[..4].copy_from_slice(PIPE_MAGIC);
    out[4..4 + TICKET_LEN].copy_from_slice(&ticket.0);
    out[4 + TICKET_LEN] = match role {
        PipeRole::Sender => b'S',
        PipeRole::Agent => b'A',
    };
    out
}

/// Reads a pipe preamble received by the relay.
pub fn decode_pipe_preamble(
    bytes: &[u8; PIPE_PREAMBLE_LEN],
) -> Result<(Ticket, PipeRole), ControlError> {
    if &bytes[..4] != PIPE_MAGIC {
        return Err(ControlError::BadPreamble);
    }
    let mut ticket = [0u8; TICKET_LEN];
    ticket.copy_from_slice(&bytes[4..4 + TICKET_LEN]);
    let role = match bytes[4 + TICKET_LEN] {
        b'S' => PipeRole::Sender,
        b'A' => PipeRole::Agent,
        _ => return Err(ControlError::BadPreamble),
    };
    Ok((Ticket(ticket), role))
}

/// What a peer is on its control channel.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PeerRole {
    /// Opens streams (appliance, `connect`, `forward`); attaches with send tokens.
    Sender,
    /// Serves hybrid connections; attaches with listen tokens. The wire
    /// keeps the original protocol's name, `listener`.
    #[serde(rename = "listener")]
    Agent,
}

/// A live agent of a hybrid connection, as announced to senders.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentInfo {
    /// The relay's id for the agent's control session; stable while it lives.
    pub id: u64,
    /// The agent's data certificate, pinned by the sender inside the pipe.
    pub identity: Fingerprint,
}

/// Messages from a peer to the relay. The hybrid connection a message is
/// about is `hc` here and `entity` on the wire, the original protocol's name.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum PeerMessage {
    /// First message on a channel.
    Hello {
        /// Must equal [`PROTOCOL_VERSION`].
        version: u32,
        /// Sender or agent.
        role: PeerRole,
        /// Fingerprint of the peer's data certificate.
        identity: Fingerprint,
        /// A name for logs and status (host name of the agent); short and
        /// printable, or the whole `Hello` does not decode.
        label: PeerLabel,
    },
    /// Join a hybrid connection with a SAS token of the right kind.
    Attach {
        #[serde(rename = "entity")]
        hc: HcName,
        token: String,
    },
    /// Replace the token of an attachment before it expires.
    Renew {
        #[serde(rename = "entity")]
        hc: HcName,
        token: String,
    },
    /// Sender: ask for a pipe to an agent.
    PipeRequest { request_id: u64, agent: u64 },
    /// Keep-alive.
    Ping { nonce: u64 },
    /// Answer to the relay's keep-alive.
    Pong { nonce: u64 },
    /// Agent: how its streams of a hybrid connection are doing (sent
    /// every few seconds; the relay shows the sum over agents in its status).
    Stats {
        #[serde(rename = "entity")]
        hc: HcName,
        stats: StreamStats,
        /// Whether this agent requires the end-to-end proof on this hybrid
        /// connection (it holds its `EndToEndKey`).
        #[serde(default)]
        end_to_end: bool,
        /// Set when the agent's local policy refuses the endpoint the relay
        /// announced: what was asked and which rule refused it.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        policy_refusal: Option<String>,
    },
    /// Agent: which endpoint does this hybrid connection have? Checks the
    /// token like `Attach` but joins nothing (`agent install` asks this to
    /// write a policy that allows exactly that endpoint).
    Describe {
        #[serde(rename = "entity")]
        hc: HcName,
        token: String,
    },
}

/// An agent's stream counters for one hybrid connection.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StreamStats {
    /// Streams open now.
    pub open: u64,
    /// Streams dialed to the target since the agent started.
    pub opened: u64,
    /// Streams refused (the target refused or could not be reached).
    pub refused: u64,
    /// Bytes from senders to the target.
    pub bytes_to_target: u64,
    /// Bytes from the target to senders.
    pub bytes_from_target: u64,
}

impl std::ops::AddAssign for StreamStats {
    fn add_assign(&mut self, other: StreamStats) {
        self.open += other.open;
        self.opened += other.opened;
        self.refused += other.refused;
        self.bytes_to_target += other.bytes_to_target;
        self.bytes_from_target += other.bytes_from_target;
    }
}

/// Why the relay refused or ended an attachment.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DetachReason {
    /// The token did not verify (see the message).
    Unauthorized,
    /// No such hybrid connection. Not sent by this relay: a name that does
    /// not exist is refused as `Unauthorized`, with the same message as a
    /// wrong key, so that nobody learns names without a valid signature.
    #[serde(rename = "unknown_entity")]
    UnknownHc,
    /// The key the token was signed with was regenerated.
    KeyRegenerated,
    /// The hybrid connection was deleted.
    Deleted,
    /// The token expired and was not renewed.
    TokenExpired,
    /// A quota of the relay was reached.
    Quota,
}

/// Messages from the relay to a peer. As in [`PeerMessage`], `hc` is
/// `entity` on the wire.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum RelayMessage {
    /// Answer to `Hello`.
    Welcome { session: u64 },
    /// An attachment succeeded; both roles learn the endpoint (agents dial
    /// it, senders route and name it).
    Attached {
        #[serde(rename = "entity")]
        hc: HcName,
        endpoint: Option<Endpoint>,
        expires: u64,
    },
    /// An attachment was refused or has ended; `message` says why, for people.
    Detached {
        #[serde(rename = "entity")]
        hc: HcName,
        reason: DetachReason,
        message: String,
    },
    /// A token was renewed.
    Renewed {
        #[serde(rename = "entity")]
        hc: HcName,
        expires: u64,
    },
    /// To senders: the live agents of a hybrid connection (the whole list).
    Agents {
        #[serde(rename = "entity")]
        hc: HcName,
        agents: Vec<AgentInfo>,
    },
    /// The endpoint of a hybrid connection changed (or was re-announced).
    EndpointChanged {
        #[serde(rename = "entity")]
        hc: HcName,
        endpoint: Endpoint,
    },
    /// To agents: this sender identity may open streams on `hc`.
    Grant {
        peer: Fingerprint,
        #[serde(rename = "entity")]
        hc: HcName,
    },
    /// To agents: this sender identity may no longer open streams on `hc`.
    Revoke {
        peer: Fingerprint,
        #[serde(rename = "entity")]
        hc: HcName,
    },
    /// To a sender: the ticket for the pipe it asked for.
    PipeTicket {
        request_id: u64,
        agent: u64,
        ticket: Ticket,
    },
    /// To a sender: the pipe could not be arranged.
    PipeFailed { request_id: u64, message: String },
    /// To an agent: a sender will meet you on this ticket.
    PipeOffer { ticket: Ticket, peer: Fingerprint },
    /// Keep-alive.
    Ping { nonce: u64 },
    /// Answer to a peer's keep-alive.
    Pong { nonce: u64 },
    /// The relay ends the channel; `message` says why.
    Bye { message: String },
    /// Answer to `Describe` (a refusal comes as `Detached`).
    Described {
        #[serde(rename = "entity")]
        hc: HcName,
        endpoint: Endpoint,
    },
    /// The relay nodes serving this registry, as `HOST:PORT` that peers
    /// dial (the whole list, this node included). Sent when the list
    /// changes, and only to peers that offered [`NODES_ALPN`]: older peers
    /// would not decode it. `this_node` is the sender of the list, as it
    /// appears in it.
    Nodes {
        nodes: Vec<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        this_node: Option<String>,
    },
}

/// The ALPN protocol id a peer offers, beside `hybridlink/1`, to say it
/// understands [`RelayMessage::Nodes`]. A relay that knows the message
/// selects it; an older relay selects nothing and never sends it.
pub const NODES_ALPN: &[u8] = b"hybridlink/1+nodes";

/// The request that opens a stream inside a pipe: which hybrid connection.
/// The agent dials only the endpoint it learned for that HC from the relay;
/// nothing here can name another destination.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StreamRequest {
    /// The hybrid connection the stream belongs to.
    pub hc: HcName,
    /// The sender's end-to-end proof for this hybrid connection and pipe
    /// (`crate::e2e`), when it holds the hybrid connection's end-to-end key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub proof: Option<String>,
}

/// The payload of an agent's `ACCEPT`: its end-to-end proof when it holds
/// the hybrid connection's end-to-end key. An empty payload means none.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StreamAccept {
    /// The agent's proof (`crate::e2e`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub proof: Option<String>,
}

/// Why an agent refused a stream.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RefusalCode {
    /// The target answered with RST.
    Refused,
    /// The target could not be reached (timeout, no route, DNS failure).
    Unreachable,
    /// The agent's local policy forbids this endpoint.
    DeniedByPolicy,
    /// The sender is not allowed on this hybrid connection.
    NotAllowed,
    /// The agent does not serve this hybrid connection.
    UnknownHc,
    /// The request could not be read.
    BadRequest,
    /// The end-to-end check failed: the sender did not prove it holds the
    /// hybrid connection's end-to-end key on this pipe.
    EndToEnd,
}

/// The agent's answer when it refuses a stream.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StreamRefusal {
    /// Machine-readable reason.
    pub code: RefusalCode,
    /// For people.
    pub message: String,
}

/// Errors of the control codec.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    /// A length prefix larger than the limit in force.
    #[error("control message of {len} bytes is larger than the {max}-byte limit")]
    TooLarge {
        /// The announced length.
        len: usize,
        /// The limit in force ([`MAX_MESSAGE_LEN`], or
        /// [`PRE_AUTH_MAX_MESSAGE_LEN`] before a peer has attached).
        max: usize,
    },
    /// The JSON did not describe a known message.
    #[error("control message is not valid: {0}")]
    Invalid(#[from] serde_json::Error),
    /// A hex field was not the right length or alphabet.
    #[error("{0} is not valid hex of the right length")]
    BadHex(&'static str),
    /// A connection to the relay port that is neither TLS nor a pipe.
    #[error("connection is neither TLS nor a hybridlink pipe preamble")]
    BadPreamble,
}

/// Appends one message, length-prefixed, to `out`.
pub fn encode<M: Serialize>(msg: &M, out: &mut BytesMut) {
    let start = out.len();
    out.put_u32(0);
    // Serialising these enums of strings and integers into memory cannot fail.
    #[allow(clippy::expect_used)]
    serde_json::to_writer((&mut *out).writer(), msg).expect("control messages always serialise");
    let len = (out.len() - start - 4) as u32;
    out[start..start + 4].copy_from_slice(&len.to_be_bytes());
}

/// Takes one message from the front of `buf` if it is complete.
pub fn decode<M: for<'de> Deserialize<'de>>(buf: &mut BytesMut) -> Result<Option<M>, ControlError> {
    decode_within(buf, MAX_MESSAGE_LEN)
}

/// Takes one message of at most `max_len` bytes from the front of `buf` if
/// it is complete; a longer announced length is an error at once.
///
/// Nothing is reserved for the announced length: `buf` grows only as bytes
/// arrive, so a peer announcing a large message and trickling it costs what
/// it has sent, not what it announced.
pub fn decode_within<M: for<'de> Deserialize<'de>>(
    buf: &mut BytesMut,
    max_len: usize,
) -> Result<Option<M>, ControlError> {
    if buf.len() < 4 {
        return Ok(None);
    }
    let len = u32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]) as usize;
    if len > max_len {
        return Err(ControlError::TooLarge { len, max: max_len });
    }
    if buf.len() < 4 + len {
        return Ok(None);
    }
    buf.advance(4);
    let body = buf.split_to(len);
    Ok(Some(serde_json::from_slice(&body)?))
}

/// Lower-case hex of `bytes`.
pub fn hex_encode(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(DIGITS[(b >> 4) as usize] as char);
        s.push(DIGITS[(b & 15) as usize] as char);
    }
    s
}

/// Decodes exactly `N` bytes of hex (either case); `None` on anything else.
pub fn hex_decode<const N: usize>(s: &str) -> Option<[u8; N]> {
    let s = s.as_bytes();
    if s.len() != 2 * N {
        return None;
    }
    let nibble = |c: u8| match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        b'A'..=b'F' => Some(c - b'A' + 10),
        _ => None,
    };
    let mut out = [0u8; N];
    for (i, o) in out.iter_mut().enumerate() {
        *o = nibble(s[2 * i])? << 4 | nibble(s[2 * i + 1])?;
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_round_trip_through_the_codec() {
        let msgs = vec![
            PeerMessage::Hello {
                version: PROTOCOL_VERSION,
                role: PeerRole::Agent,
                identity: Fingerprint([7; 32]),
                label: "onprem-1".parse().unwrap(),
            },
            PeerMessage::Attach {
                hc: "payroll".parse().unwrap(),
                token: "SharedAccessSignature sr=x".into(),
            },
            PeerMessage::PipeRequest {
                request_id: 9,
                agent: 3,
            },
        ];
        let mut buf = BytesMut::new();
        for m in &msgs {
            encode(m, &mut buf);
        }
        // Feed the bytes one at a time: partial input must wait, not fail.
        let bytes = buf.split().freeze();
        let mut got = Vec::new();
        for b in bytes.iter() {
            buf.extend_from_slice(&[*b]);
            while let Some(m) = decode::<PeerMessage>(&mut buf).unwrap() {
                got.push(m);
            }
        }
        assert_eq!(got, msgs);
    }

    /// The wire keeps the original protocol's names, so that peers and
    /// relays of either vocabulary understand each other.
    #[test]
    fn the_wire_keeps_the_original_names() {
        let hello = PeerMessage::Hello {
            version: PROTOCOL_VERSION,
            role: PeerRole::Agent,
            identity: Fingerprint([7; 32]),
            label: "onprem-1".parse().unwrap(),
        };
        let json = serde_json::to_value(&hello).unwrap();
        assert_eq!(
            json,
            serde_json::json!({"type": "hello", "version": PROTOCOL_VERSION,
                "role": "listener", "identity": "07".repeat(32), "label": "onprem-1"})
        );
        assert_eq!(serde_json::from_value::<PeerMessage>(json).unwrap(), hello);

        let attach = PeerMessage::Attach {
            hc: "payroll".parse().unwrap(),
            token: "t".into(),
        };
        let json = serde_json::to_value(&attach).unwrap();
        assert_eq!(
            json,
            serde_json::json!({"type": "attach", "entity": "payroll", "token": "t"})
        );
        assert_eq!(serde_json::from_value::<PeerMessage>(json).unwrap(), attach);

        let detached = RelayMessage::Detached {
            hc: "payroll".parse().unwrap(),
            reason: DetachReason::UnknownHc,
            message: "m".into(),
        };
        let json = serde_json::to_value(&detached).unwrap();
        assert_eq!(
            json,
            serde_json::json!({"type": "detached", "entity": "payroll",
                "reason": "unknown_entity", "message": "m"})
        );
        assert_eq!(
            serde_json::from_value::<RelayMessage>(json).unwrap(),
            detached
        );
    }

    #[test]
    fn oversized_and_garbage_messages_are_errors() {
        let mut buf = BytesMut::from(&[0xff, 0xff, 0xff, 0xff][..]);
        assert!(matches!(
            decode::<PeerMessage>(&mut buf),
            Err(ControlError::TooLarge { .. })
        ));
        // The pre-authentication limit: refused as soon as the length is
        // read, and nothing is reserved for a length within the limit.
        let mut buf = BytesMut::new();
        buf.put_u32(PRE_AUTH_MAX_MESSAGE_LEN as u32 + 1);
        assert!(matches!(
            decode_within::<PeerMessage>(&mut buf, PRE_AUTH_MAX_MESSAGE_LEN),
            Err(ControlError::TooLarge { len, max: PRE_AUTH_MAX_MESSAGE_LEN }) if len == PRE_AUTH_MAX_MESSAGE_LEN + 1
        ));
        let mut buf = BytesMut::with_capacity(8);
        buf.put_u32(MAX_MESSAGE_LEN as u32);
        assert!(decode::<PeerMessage>(&mut buf).unwrap().is_none());
        assert!(buf.capacity() < 1024, "reserved {}", buf.capacity());
        let mut buf = BytesMut::new();
        buf.put_u32(5);
        buf.extend_from_slice(b"hello");
        assert!(matches!(
            decode::<PeerMessage>(&mut buf),
            Err(ControlError::Invalid(_))
        ));
        let mut buf = BytesMut::new();
        encode(
            &serde_json::json!({"type": "attach", "entity": "Bad Name!", "token": ""}),
            &mut buf,
        );
        assert!(decode::<PeerMessage>(&mut buf).is_err());
        // A hello whose label is not short and printable does not decode,
        // and the error does not repeat the label.
        let mut buf = BytesMut::new();
        encode(
            &serde_json::json!({"type": "hello", "version": 1, "role": "sender",
                "identity": "00".repeat(32), "label": "evil\n\u{1b}[2Jforged"}),
            &mut buf,
        );
        let err = decode::<PeerMessage>(&mut buf).unwrap_err().to_string();
        assert!(
            err.contains("control character") && !err.contains("forged"),
            "{err}"
        );
    }

    #[test]
    fn the_node_list_is_pinned_json() {
        let nodes = RelayMessage::Nodes {
            nodes: vec!["relay-a.example:9443".into(), "10.0.0.2:9443".into()],
            this_node: Some("10.0.0.2:9443".into()),
        };
        let json = serde_json::json!({"type": "nodes",
            "nodes": ["relay-a.example:9443", "10.0.0.2:9443"],
            "this_node": "10.0.0.2:9443"});
        assert_eq!(serde_json::to_value(&nodes).unwrap(), json);
        assert_eq!(serde_json::from_value::<RelayMessage>(json).unwrap(), nodes);
    }

    #[test]
    fn pipe_preamble_round_trips_and_rejects_garbage() {
        let t = Ticket([0xab; TICKET_LEN]);
        let p = encode_pipe_preamble(&t, PipeRole::Agent);
        assert_eq!(decode_pipe_preamble(&p).unwrap(), (t, PipeRole::Agent));
        let mut bad = p;
        bad[0] = 0x16;
        assert!(decode_pipe_preamble(&bad).is_err());
        let mut bad = p;
        bad[PIPE_PREAMBLE_LEN - 1] = b'X';
        assert!(decode_pipe_preamble(&bad).is_err());
    }

    #[test]
    fn fingerprints_parse_and_print_as_hex() {
        let f = Fingerprint::of_der(b"certificate");
        let s = f.to_string();
        assert_eq!(s.len(), 64);
        assert_eq!(s.parse::<Fingerprint>().unwrap(), f);
        assert_eq!(s.to_uppercase().parse::<Fingerprint>().unwrap(), f);
        assert!("abc".parse::<Fingerprint>().is_err());
        assert!("zz".repeat(32).parse::<Fingerprint>().is_err());
    }

    #[test]
    fn stream_request_cannot_carry_a_destination() {
        let forged = br#"{"hc":"payroll","host":"10.0.0.1","port":22}"#;
        assert!(serde_json::from_slice::<StreamRequest>(forged).is_err());
    }
}
