//! Configuration of a [`Netstack`](crate::Netstack): the virtual ranges it
//! terminates flows for, and the bounds it keeps.

use std::fmt;
use std::net::Ipv4Addr;
use std::str::FromStr;
use std::time::Duration;

use crate::error::ConfigError;

/// An IPv4 prefix such as `127.77.0.0/16` or `198.18.5.6/32`.
///
/// The host bits are always zero, so two equal ranges compare equal.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Ipv4Range {
    network: Ipv4Addr,
    prefix_len: u8,
}

impl Ipv4Range {
    /// A range of `prefix_len` leading bits of `addr`; host bits of `addr`
    /// must be zero.
    pub fn new(addr: Ipv4Addr, prefix_len: u8) -> Result<Self, ConfigError> {
        if prefix_len > 32 {
            return Err(ConfigError::PrefixTooLong(prefix_len));
        }
        let mask = Self::mask(prefix_len);
        if u32::from(addr) & !mask != 0 {
            return Err(ConfigError::HostBitsSet {
                addr,
                prefix_len,
                network: Ipv4Addr::from(u32::from(addr) & mask),
            });
        }
        Ok(Self {
            network: addr,
            prefix_len,
        })
    }

    /// The range holding exactly `addr` (a /32).
    pub fn host(addr: Ipv4Addr) -> Self {
        Self {
            network: addr,
            prefix_len: 32,
        }
    }

    /// The first address of the range.
    pub fn network(&self) -> Ipv4Addr {
        self.network
    }

    /// How many leading bits are fixed.
    pub fn prefix_len(&self) -> u8 {
        self.prefix_len
    }

    /// Whether `addr` lies in the range.
    pub fn contains(&self, addr: Ipv4Addr) -> bool {
        u32::from(addr) & Self::mask(self.prefix_len) == u32::from(self.network)
    }

    fn mask(prefix_len: u8) -> u32 {
        match prefix_len {
            0 => 0,
            n => u32::MAX << (32 - u32::from(n)),
        }
    }
}

impl fmt::Display for Ipv4Range {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.network, self.prefix_len)
    }
}

impl FromStr for Ipv4Range {
    type Err = ConfigError;

    /// Parses `a.b.c.d/len`, or a bare `a.b.c.d` as a /32.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (addr, len) = match s.split_once('/') {
            Some((addr, len)) => (
                addr,
                len.parse::<u8>()
                    .map_err(|_| ConfigError::BadRange(s.to_owned()))?,
            ),
            None => (s, 32),
        };
        let addr = addr
            .parse::<Ipv4Addr>()
            .map_err(|_| ConfigError::BadRange(s.to_owned()))?;
        Self::new(addr, len)
    }
}

/// How a [`Netstack`](crate::Netstack) terminates flows and which bounds it
/// keeps. Start from [`StackConfig::new`] and adjust the public fields.
#[derive(Clone, Debug)]
pub struct StackConfig {
    /// Destinations whose TCP flows are terminated and offered to the caller.
    /// Packets to other addresses are dropped.
    pub ranges: Vec<Ipv4Range>,
    /// Largest IP packet read from or written to the tun device; should
    /// match the tun MTU. 65535 is fastest.
    pub mtu: u16,
    /// Most flows alive at once, counting those still waiting for a decision
    /// and those closing. A SYN past the cap is refused with a reset.
    pub max_flows: usize,
    /// How long an [`IncomingFlow`](crate::IncomingFlow) may stay undecided
    /// before it is refused.
    pub decision_timeout: Duration,
    /// How long an accepted flow may stay in the handshake (our SYN-ACK sent,
    /// the final ACK not yet seen) before it is dropped.
    pub handshake_timeout: Duration,
    /// An established flow that moves no byte for this long is reset.
    /// `None` keeps idle flows forever (keep-alives still find dead peers).
    pub idle_timeout: Option<Duration>,
    /// Interval of TCP keep-alive probes on established flows; with
    /// `ack_timeout` this reaps flows whose peer vanished.
    pub keep_alive: Option<Duration>,
    /// A flow whose sent data (or keep-alive) stays unacknowledged this long
    /// is reset.
    pub ack_timeout: Duration,
    /// After the caller dropped its stream, how long the stack waits for
    /// the client to finish its side before resetting the flow.
    pub linger: Duration,
    /// TCP receive buffer of each flow inside smoltcp: the largest window
    /// advertised to the client. Reserved per flow when it is accepted; its
    /// pages become resident only as data passes, provided the allocator
    /// maps blocks of this size fresh (with glibc, run with a fixed
    /// `MALLOC_MMAP_THRESHOLD_` at or below it, as `hybridlink appliance`
    /// does with 524288; its default dynamic threshold hands out recycled,
    /// pre-zeroed heap memory instead).
    pub tcp_rx_buffer: usize,
    /// TCP send buffer of each flow inside smoltcp.
    pub tcp_tx_buffer: usize,
    /// Bytes buffered per direction between smoltcp and the caller's stream.
    /// Freed when a flow goes idle.
    pub stream_buffer: usize,
    /// UDP destination ports on the virtual ranges whose datagrams are handed
    /// to the caller (typically `[53]`). Other UDP is answered with ICMP
    /// unreachable.
    pub udp_ports: Vec<u16>,
    /// Datagrams queued for the caller before new ones are dropped.
    pub udp_queue: usize,
    /// Sources whose packets the stack takes in; a packet from any other
    /// source is dropped before smoltcp sees it (and counted and logged).
    /// `None` takes packets from anywhere. Change it on a running stack with
    /// [`StackHandle::set_sources`](crate::StackHandle::set_sources).
    pub sources: Option<Vec<Ipv4Range>>,
    /// Verify IPv4/TCP/UDP checksums of packets read from the tun. The
    /// kernel always writes valid checksums into a tun, so turning this off
    /// saves a pass over every byte; keep it on when packets may come from
    /// anywhere else.
    pub verify_checksums: bool,
}

impl StackConfig {
    /// Defaults for a stack terminating flows to `ranges`: MTU 65535, at most
    /// 16,384 flows, 10 s to decide, no UDP hook.
    pub fn new(ranges: Vec<Ipv4Range>) -> Self {
        Self {
            ranges,
            mtu: 65535,
            max_flows: 16_384,
            decision_timeout: Duration::from_secs(10),
            handshake_timeout: Duration::from_secs(10),
            idle_timeout: Some(Duration::from_secs(2 * 60 * 60)),
            keep_alive: Some(Duration::from_secs(60)),
            ack_timeout: Duration::from_secs(120),
            linger: Duration::from_secs(30),
            tcp_rx_buffer: 512 * 1024,
            tcp_tx_buffer: 512 * 1024,
            stream_buffer: 256 * 1024,
            udp_ports: Vec::new(),
            udp_queue: 1024,
            sources: None,
            verify_checksums: true,
        }
    }

    /// Checks the values that would make the stack misbehave.
    pub(crate) fn validate(&self) -> Result<(), ConfigError> {
        if self.ranges.is_empty() {
            return Err(ConfigError::NoRanges);
        }
        if self.mtu < 576 {
            return Err(ConfigError::MtuTooSmall(self.mtu));
        }
        if self.max_flows == 0 {
            return Err(ConfigError::Zero("max_flows"));
        }
        if self.tcp_rx_buffer < 1024 || self.tcp_tx_buffer < 1024 {
            return Err(ConfigError::BufferTooSmall);
        }
        if self.stream_buffer == 0 {
            return Err(ConfigError::Zero("stream_buffer"));
        }
        if self.udp_queue == 0 {
            return Err(ConfigError::Zero("udp_queue"));
        }
        Ok(())
    }

    pub(crate) fn in_ranges(&self, addr: Ipv4Addr) -> bool {
        self.ranges.iter().any(|r| r.contains(addr))
    }

    pub(crate) fn source_allowed(&self, addr: Ipv4Addr) -> bool {
        self.sources
            .as_ref()
            .is_none_or(|sources| sources.iter().any(|r| r.contains(addr)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_ranges() {
        let r: Ipv4Range = "127.77.0.0/16".parse().unwrap();
        assert!(r.contains(Ipv4Addr::new(127, 77, 3, 4)));
        assert!(!r.contains(Ipv4Addr::new(127, 78, 0, 1)));
        let h: Ipv4Range = "10.4.5.6".parse().unwrap();
        assert_eq!(h.prefix_len(), 32);
        assert!(h.contains(Ipv4Addr::new(10, 4, 5, 6)));
        assert!(!h.contains(Ipv4Addr::new(10, 4, 5, 7)));
        let all: Ipv4Range = "0.0.0.0/0".parse().unwrap();
        assert!(all.contains(Ipv4Addr::new(1, 2, 3, 4)));
    }

    #[test]
    fn rejects_bad_ranges() {
        assert!(matches!(
            "127.77.0.1/16".parse::<Ipv4Range>(),
            Err(ConfigError::HostBitsSet { .. })
        ));
        assert!(matches!(
            "10.0.0.0/33".parse::<Ipv4Range>(),
            Err(ConfigError::PrefixTooLong(33))
        ));
        assert!(matches!(
            "hello".parse::<Ipv4Range>(),
            Err(ConfigError::BadRange(_))
        ));
    }

    #[test]
    fn validates_config() {
        assert!(matches!(
            StackConfig::new(vec![]).validate(),
            Err(ConfigError::NoRanges)
        ));
        let mut c = StackConfig::new(vec![Ipv4Range::host(Ipv4Addr::LOCALHOST)]);
        assert!(c.validate().is_ok());
        c.max_flows = 0;
        assert!(c.validate().is_err());
    }
}
