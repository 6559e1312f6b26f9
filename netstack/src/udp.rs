//! The UDP hook: datagrams to the configured ports on the virtual ranges,
//! and replies to them.

use std::net::SocketAddrV4;
use std::sync::Arc;

use tokio::sync::mpsc;

use crate::config::Ipv4Range;
use crate::error::UdpSendError;
use crate::flow::Command;
use crate::packet;

/// Sends UDP datagrams out of the tun, from a virtual address. Cheap to
/// clone.
#[derive(Clone, Debug)]
pub struct UdpSender {
    cmd: mpsc::UnboundedSender<Command>,
    ranges: Arc<[Ipv4Range]>,
    max_payload: usize,
}

impl UdpSender {
    pub(crate) fn new(
        cmd: mpsc::UnboundedSender<Command>,
        ranges: Arc<[Ipv4Range]>,
        mtu: u16,
    ) -> Self {
        Self {
            cmd,
            ranges,
            max_payload: packet::max_udp_payload(mtu),
        }
    }

    /// Sends `payload` from `from` (an address of the virtual ranges) to `to`.
    pub fn send(
        &self,
        from: SocketAddrV4,
        to: SocketAddrV4,
        payload: &[u8],
    ) -> Result<(), UdpSendError> {
        if !self.ranges.iter().any(|r| r.contains(*from.ip())) || !packet::is_unicast(*from.ip()) {
            return Err(UdpSendError::SourceNotVirtual(*from.ip()));
        }
        if payload.len() > self.max_payload {
            return Err(UdpSendError::TooLarge {
                len: payload.len(),
                max: self.max_payload,
            });
        }
        self.cmd
            .send(Command::SendPacket(packet::build_udp(from, to, payload)))
            .map_err(|_| UdpSendError::StackClosed)
    }
}

/// A datagram an app sent to a hooked UDP port of a virtual address.
#[derive(Debug)]
pub struct UdpDatagram {
    /// The app's address and port.
    pub src: SocketAddrV4,
    /// The virtual address and hooked port it was sent to.
    pub dst: SocketAddrV4,
    /// The UDP payload.
    pub payload: Vec<u8>,
    sender: UdpSender,
}

impl UdpDatagram {
    pub(crate) fn new(
        src: SocketAddrV4,
        dst: SocketAddrV4,
        payload: Vec<u8>,
        sender: UdpSender,
    ) -> Self {
        Self {
            src,
            dst,
            payload,
            sender,
        }
    }

    /// Answers the datagram: `payload` goes from `dst` back to `src`.
    pub fn reply(&self, payload: &[u8]) -> Result<(), UdpSendError> {
        self.sender.send(self.dst, self.src, payload)
    }

    /// A sender to answer later, after this datagram is gone.
    pub fn sender(&self) -> UdpSender {
        self.sender.clone()
    }
}
