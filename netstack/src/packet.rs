//! Looking at packets read from the tun before smoltcp sees them, and
//! building the few packets the stack writes itself (resets for refused
//! flows, UDP replies). Every function here takes untrusted bytes and
//! returns an error instead of panicking.

use std::net::{Ipv4Addr, SocketAddrV4};

use smoltcp::phy::{Checksum, ChecksumCapabilities};
use smoltcp::wire::{
    IpAddress, IpProtocol, Ipv4Packet, Ipv4Repr, TcpControl, TcpPacket, TcpRepr, TcpSeqNumber,
    UdpPacket, UdpRepr,
};

use crate::config::StackConfig;

/// The 4-tuple naming one TCP flow, from the client's point of view.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) struct FourTuple {
    /// The client (the app that called `connect`).
    pub src: SocketAddrV4,
    /// The virtual address it connected to.
    pub dst: SocketAddrV4,
}

/// What an incoming packet is, as far as the stack's own logic cares.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Classified<'a> {
    /// A TCP SYN without ACK: a connection attempt (or a retransmission of one).
    TcpSyn {
        tuple: FourTuple,
        /// Sequence number and segment length, to build a reset.
        seq: TcpSeqNumber,
        seg_len: usize,
    },
    /// Any other TCP segment to a virtual address.
    Tcp { tuple: FourTuple },
    /// A UDP datagram to one of the hooked ports.
    HookedUdp {
        src: SocketAddrV4,
        dst: SocketAddrV4,
        payload: &'a [u8],
    },
    /// Anything else addressed to a virtual address (ICMP, other UDP): left
    /// to smoltcp.
    Other,
}

/// Why a packet from the tun was dropped before reaching smoltcp.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub(crate) enum DropReason {
    #[error("not a well-formed IPv4 packet")]
    MalformedIp,
    #[error("IP fragment (fragments are not reassembled)")]
    Fragment,
    #[error("destination is outside the virtual ranges")]
    NotVirtual,
    #[error("malformed TCP segment or bad checksum")]
    MalformedTcp,
    #[error("malformed UDP datagram or bad checksum")]
    MalformedUdp,
    #[error("TCP segment to or from port 0")]
    PortZero,
    #[error("source is not an address of this host (a forwarded packet?)")]
    ForeignSource,
}

/// Checksum handling for packets from the tun: always computed on the
/// packets we emit, verified on received ones only if `verify`.
pub(crate) fn checksum_caps(verify: bool) -> ChecksumCapabilities {
    let mut caps = ChecksumCapabilities::default();
    if !verify {
        caps.ipv4 = Checksum::Tx;
        caps.tcp = Checksum::Tx;
        caps.udp = Checksum::Tx;
        caps.icmpv4 = Checksum::Tx;
    }
    caps
}

/// Classifies one packet read from the tun.
pub(crate) fn classify<'a>(
    packet: &'a [u8],
    config: &StackConfig,
    caps: &ChecksumCapabilities,
) -> Result<Classified<'a>, DropReason> {
    let ip = Ipv4Packet::new_checked(packet).map_err(|_| DropReason::MalformedIp)?;
    if ip.more_frags() || ip.frag_offset() != 0 {
        return Err(DropReason::Fragment);
    }
    let ip_repr = Ipv4Repr::parse(&ip, caps).map_err(|_| DropReason::MalformedIp)?;
    if !config.in_ranges(ip_repr.dst_addr) {
        return Err(DropReason::NotVirtual);
    }
    if !config.source_allowed(ip_repr.src_addr) {
        return Err(DropReason::ForeignSource);
    }
    let src_ip = IpAddress::Ipv4(ip_repr.src_addr);
    let dst_ip = IpAddress::Ipv4(ip_repr.dst_addr);
    match ip_repr.next_header {
        IpProtocol::Tcp => {
            let seg = TcpPacket::new_checked(ip.payload()).map_err(|_| DropReason::MalformedTcp)?;
            let repr = TcpRepr::parse(&seg, &src_ip, &dst_ip, caps)
                .map_err(|_| DropReason::MalformedTcp)?;
            if repr.src_port == 0 || repr.dst_port == 0 {
                return Err(DropReason::PortZero);
            }
            let tuple = FourTuple {
                src: SocketAddrV4::new(ip_repr.src_addr, repr.src_port),
                dst: SocketAddrV4::new(ip_repr.dst_addr, repr.dst_port),
            };
            if repr.control == TcpControl::Syn && repr.ack_number.is_none() {
                Ok(Classified::TcpSyn {
                    tuple,
                    seq: repr.seq_number,
                    seg_len: repr.segment_len(),
                })
            } else {
                Ok(Classified::Tcp { tuple })
            }
        }
        IpProtocol::Udp => {
            let dgram =
                UdpPacket::new_checked(ip.payload()).map_err(|_| DropReason::MalformedUdp)?;
            if !config.udp_ports.contains(&dgram.dst_port()) {
                return Ok(Classified::Other);
            }
            let repr = UdpRepr::parse(&dgram, &src_ip, &dst_ip, caps)
                .map_err(|_| DropReason::MalformedUdp)?;
            Ok(Classified::HookedUdp {
                src: SocketAddrV4::new(ip_repr.src_addr, repr.src_port),
                dst: SocketAddrV4::new(ip_repr.dst_addr, repr.dst_port),
                payload: dgram.payload(),
            })
        }
        _ => Ok(Classified::Other),
    }
}

const IPV4_HEADER: usize = 20;
const UDP_HEADER: usize = 8;

/// The reset that refuses a SYN: `<SEQ=0><ACK=SEG.SEQ+SEG.LEN><CTL=RST,ACK>`
/// (RFC 9293, 3.10.7.1), from the virtual address back to the client.
pub(crate) fn build_refusal(tuple: &FourTuple, seq: TcpSeqNumber, seg_len: usize) -> Vec<u8> {
    let tcp = TcpRepr {
        src_port: tuple.dst.port(),
        dst_port: tuple.src.port(),
        control: TcpControl::Rst,
        seq_number: TcpSeqNumber(0),
        ack_number: Some(seq + seg_len),
        window_len: 0,
        window_scale: None,
        max_seg_size: None,
        sack_permitted: false,
        sack_ranges: [None, None, None],
        timestamp: None,
        payload: &[],
    };
    let ip = Ipv4Repr {
        src_addr: *tuple.dst.ip(),
        dst_addr: *tuple.src.ip(),
        next_header: IpProtocol::Tcp,
        payload_len: tcp.header_len(),
        hop_limit: 64,
    };
    let mut buf = vec![0u8; IPV4_HEADER + tcp.header_len()];
    let caps = ChecksumCapabilities::default();
    ip.emit(&mut Ipv4Packet::new_unchecked(&mut buf[..]), &caps);
    tcp.emit(
        &mut TcpPacket::new_unchecked(&mut buf[IPV4_HEADER..]),
        &IpAddress::Ipv4(ip.src_addr),
        &IpAddress::Ipv4(ip.dst_addr),
        &caps,
    );
    buf
}

/// Largest UDP payload that fits in one packet of `mtu` bytes.
pub(crate) fn max_udp_payload(mtu: u16) -> usize {
    usize::from(mtu).saturating_sub(IPV4_HEADER + UDP_HEADER)
}

/// A UDP datagram from `from` to `to`. The caller checks the size against
/// [`max_udp_payload`].
pub(crate) fn build_udp(from: SocketAddrV4, to: SocketAddrV4, payload: &[u8]) -> Vec<u8> {
    let udp = UdpRepr {
        src_port: from.port(),
        dst_port: to.port(),
    };
    let ip = Ipv4Repr {
        src_addr: *from.ip(),
        dst_addr: *to.ip(),
        next_header: IpProtocol::Udp,
        payload_len: UDP_HEADER + payload.len(),
        hop_limit: 64,
    };
    let mut buf = vec![0u8; IPV4_HEADER + UDP_HEADER + payload.len()];
    let caps = ChecksumCapabilities::default();
    ip.emit(&mut Ipv4Packet::new_unchecked(&mut buf[..]), &caps);
    udp.emit(
        &mut UdpPacket::new_unchecked(&mut buf[IPV4_HEADER..]),
        &IpAddress::Ipv4(ip.src_addr),
        &IpAddress::Ipv4(ip.dst_addr),
        payload.len(),
        |out| out.copy_from_slice(payload),
        &caps,
    );
    buf
}

/// A TCP SYN from `src` to `dst`, used by tests and fuzz seeds.
pub(crate) fn build_syn(src: SocketAddrV4, dst: SocketAddrV4, seq: u32) -> Vec<u8> {
    build_tcp(
        src,
        dst,
        TcpControl::Syn,
        TcpSeqNumber(seq as i32),
        None,
        &[],
    )
}

/// Any TCP segment from `src` to `dst` with valid checksums.
pub(crate) fn build_tcp(
    src: SocketAddrV4,
    dst: SocketAddrV4,
    control: TcpControl,
    seq: TcpSeqNumber,
    ack: Option<TcpSeqNumber>,
    payload: &[u8],
) -> Vec<u8> {
    let tcp = TcpRepr {
        src_port: src.port(),
        dst_port: dst.port(),
        control,
        seq_number: seq,
        ack_number: ack,
        window_len: 65535,
        window_scale: None,
        max_seg_size: if control == TcpControl::Syn {
            Some(1460)
        } else {
            None
        },
        sack_permitted: false,
        sack_ranges: [None, None, None],
        timestamp: None,
        payload,
    };
    let ip = Ipv4Repr {
        src_addr: *src.ip(),
        dst_addr: *dst.ip(),
        next_header: IpProtocol::Tcp,
        payload_len: tcp.header_len() + payload.len(),
        hop_limit: 64,
    };
    let mut buf = vec![0u8; IPV4_HEADER + ip.payload_len];
    let caps = ChecksumCapabilities::default();
    ip.emit(&mut Ipv4Packet::new_unchecked(&mut buf[..]), &caps);
    tcp.emit(
        &mut TcpPacket::new_unchecked(&mut buf[IPV4_HEADER..]),
        &IpAddress::Ipv4(ip.src_addr),
        &IpAddress::Ipv4(ip.dst_addr),
        &caps,
    );
    buf
}

/// Whether `addr` is a usable unicast source for a reply.
pub(crate) fn is_unicast(addr: Ipv4Addr) -> bool {
    !(addr.is_broadcast() || addr.is_multicast() || addr.is_unspecified())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Ipv4Range;

    fn config() -> StackConfig {
        let mut c = StackConfig::new(vec!["198.18.0.0/16".parse::<Ipv4Range>().unwrap()]);
        c.udp_ports = vec![53];
        c
    }

    fn addr(s: &str) -> SocketAddrV4 {
        s.parse().unwrap()
    }

    #[test]
    fn classifies_syn_and_builds_refusal() {
        let syn = build_syn(addr("10.0.0.1:40000"), addr("198.18.0.5:80"), 1000);
        let caps = checksum_caps(true);
        let c = classify(&syn, &config(), &caps).unwrap();
        let Classified::TcpSyn {
            tuple,
            seq,
            seg_len,
        } = c
        else {
            panic!("not a SYN: {c:?}");
        };
        assert_eq!(tuple.dst, addr("198.18.0.5:80"));
        assert_eq!(seg_len, 1);
        let rst = build_refusal(&tuple, seq, seg_len);
        let ip = Ipv4Packet::new_checked(&rst[..]).unwrap();
        let repr = Ipv4Repr::parse(&ip, &caps).unwrap();
        assert_eq!(repr.src_addr, Ipv4Addr::new(198, 18, 0, 5));
        let seg = TcpPacket::new_checked(ip.payload()).unwrap();
        let t = TcpRepr::parse(&seg, &repr.src_addr.into(), &repr.dst_addr.into(), &caps).unwrap();
        assert_eq!(t.control, TcpControl::Rst);
        assert_eq!(t.ack_number, Some(TcpSeqNumber(1001)));
        assert_eq!(t.dst_port, 40000);
    }

    #[test]
    fn drops_outside_ranges_and_garbage() {
        let caps = checksum_caps(true);
        let syn = build_syn(addr("10.0.0.1:40000"), addr("10.9.9.9:80"), 1);
        assert_eq!(
            classify(&syn, &config(), &caps),
            Err(DropReason::NotVirtual)
        );
        assert_eq!(
            classify(&[0x45, 0, 0], &config(), &caps),
            Err(DropReason::MalformedIp)
        );
        let mut bad = build_syn(addr("10.0.0.1:40000"), addr("198.18.0.5:80"), 1);
        let last = bad.len() - 1;
        bad[last] ^= 0xff; // corrupt the TCP checksum region
        assert!(classify(&bad, &config(), &caps).is_err());
    }

    #[test]
    fn drops_packets_from_sources_not_allowed() {
        let caps = checksum_caps(true);
        let mut c = config();
        c.sources = Some(vec![
            "127.0.0.0/8".parse().unwrap(),
            "10.0.0.1/32".parse().unwrap(),
        ]);
        let from = |src: &str| build_syn(addr(src), addr("198.18.0.5:80"), 1);
        assert!(matches!(
            classify(&from("127.0.0.1:40000"), &c, &caps),
            Ok(Classified::TcpSyn { .. })
        ));
        assert!(matches!(
            classify(&from("10.0.0.1:40000"), &c, &caps),
            Ok(Classified::TcpSyn { .. })
        ));
        assert_eq!(
            classify(&from("10.0.0.2:40000"), &c, &caps),
            Err(DropReason::ForeignSource)
        );
        let udp = build_udp(addr("198.18.99.1:5000"), addr("198.18.0.1:53"), b"q");
        assert_eq!(classify(&udp, &c, &caps), Err(DropReason::ForeignSource));
        c.sources = None;
        assert!(classify(&from("10.0.0.2:40000"), &c, &caps).is_ok());
    }

    #[test]
    fn hooks_udp_port() {
        let caps = checksum_caps(true);
        let pkt = build_udp(addr("10.0.0.1:5000"), addr("198.18.0.1:53"), b"query");
        match classify(&pkt, &config(), &caps).unwrap() {
            Classified::HookedUdp { src, dst, payload } => {
                assert_eq!(src, addr("10.0.0.1:5000"));
                assert_eq!(dst, addr("198.18.0.1:53"));
                assert_eq!(payload, b"query");
            }
            other => panic!("unexpected {other:?}"),
        }
        let other = build_udp(addr("10.0.0.1:5000"), addr("198.18.0.1:54"), b"x");
        assert_eq!(
            classify(&other, &config(), &caps).unwrap(),
            Classified::Other
        );
    }
}
