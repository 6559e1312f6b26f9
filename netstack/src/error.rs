//! Errors at the crate boundary.

use std::net::Ipv4Addr;

/// A [`StackConfig`](crate::StackConfig) or [`Ipv4Range`](crate::Ipv4Range)
/// that cannot work.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// A range string is not `a.b.c.d/len` or `a.b.c.d`.
    #[error("{0:?} is not an IPv4 range; write it as a.b.c.d/len, for example 127.77.0.0/16")]
    BadRange(String),
    /// A prefix length above 32.
    #[error("prefix length /{0} is longer than 32 bits")]
    PrefixTooLong(u8),
    /// The address of a range has bits set past its prefix.
    #[error("{addr}/{prefix_len} has host bits set; did you mean {network}/{prefix_len}?")]
    HostBitsSet {
        /// The address as given.
        addr: Ipv4Addr,
        /// The prefix length as given.
        prefix_len: u8,
        /// The address with the host bits cleared.
        network: Ipv4Addr,
    },
    /// No virtual range: the stack would terminate nothing.
    #[error("no virtual range configured; give at least one, for example 127.77.0.0/16")]
    NoRanges,
    /// The MTU cannot carry a TCP segment.
    #[error("MTU {0} is below 576, the least every IPv4 host must accept")]
    MtuTooSmall(u16),
    /// A size or count that must be positive is zero.
    #[error("{0} must be greater than zero")]
    Zero(&'static str),
    /// TCP buffers too small to hold a segment.
    #[error("TCP buffers must hold at least 1024 bytes")]
    BufferTooSmall,
}

/// Why an [`IncomingFlow::accept`](crate::IncomingFlow::accept) did not give a
/// stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum AcceptError {
    /// The flow was already refused because no decision came within the
    /// decision timeout.
    #[error("flow was refused before it was accepted: no decision within the decision timeout")]
    Expired,
    /// The client reset or abandoned the connection during the handshake.
    #[error("client abandoned the connection during the TCP handshake")]
    ClientGone,
    /// The client did not complete the handshake within the handshake timeout.
    #[error("client did not complete the TCP handshake in time")]
    HandshakeTimeout,
    /// The stack has stopped (tun closed, or the stack was shut down).
    #[error("netstack has stopped")]
    StackClosed,
}

/// Why the stack task stopped.
#[derive(Debug, thiserror::Error)]
pub enum StackError {
    /// Creating or configuring the tun device failed; are you root (or
    /// holding CAP_NET_ADMIN) in the right network namespace?
    #[error("could not create tun device {name:?} (needs CAP_NET_ADMIN): {source}")]
    CreateTun {
        /// The device name asked for.
        name: String,
        /// What the kernel said.
        source: std::io::Error,
    },
    /// Reading from or writing to the tun device failed.
    #[error("tun device I/O failed: {0}")]
    TunIo(#[source] std::io::Error),
    /// The configuration was rejected.
    #[error(transparent)]
    Config(#[from] ConfigError),
}

/// Why a UDP reply was not sent.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UdpSendError {
    /// The payload does not fit into one IP packet of the stack's MTU.
    #[error("UDP payload of {len} bytes exceeds the {max} bytes one packet can carry")]
    TooLarge {
        /// The payload length.
        len: usize,
        /// The largest payload.
        max: usize,
    },
    /// The source is not in the stack's virtual ranges.
    #[error("reply source {0} is not in the virtual ranges")]
    SourceNotVirtual(Ipv4Addr),
    /// The stack has stopped.
    #[error("netstack has stopped")]
    StackClosed,
}
