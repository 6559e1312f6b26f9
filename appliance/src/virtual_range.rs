//! The virtual range: the addresses the appliance hands out to host names
//! (the name map), answers in DNS and routes into its tun.

use std::fmt;
use std::net::Ipv4Addr;
use std::str::FromStr;

use ipnet::Ipv4Net;
use netstack::Ipv4Range;

/// An IPv4 network usable as the virtual range: no host bits set, a prefix
/// between [`VirtualRange::SHORTEST_PREFIX`] and
/// [`VirtualRange::LONGEST_PREFIX`]. The default is
/// [`VirtualRange::DEFAULT`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct VirtualRange(Ipv4Net);

/// A network that cannot be the virtual range.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error(
    "{0:?} is not an IPv4 network like {default} with a prefix between /{shortest} and /{longest}",
    default = VirtualRange::DEFAULT,
    shortest = VirtualRange::SHORTEST_PREFIX,
    longest = VirtualRange::LONGEST_PREFIX
)]
pub struct VirtualRangeError(pub String);

impl VirtualRange {
    /// `127.77.0.0/16`: a private slice of loopback, so nothing can leak out
    /// of the host if the tun is down.
    pub const DEFAULT: VirtualRange =
        VirtualRange(Ipv4Net::new_assert(Ipv4Addr::new(127, 77, 0, 0), 16));

    /// The shortest prefix allowed (the widest range).
    pub const SHORTEST_PREFIX: u8 = 8;

    /// The longest prefix allowed: a /30 still has one address to hand out
    /// after the reserved ones (see [`crate::names`]).
    pub const LONGEST_PREFIX: u8 = 30;

    /// `net` as the virtual range, if it has no host bits set and an
    /// allowed prefix.
    pub fn new(net: Ipv4Net) -> Result<VirtualRange, VirtualRangeError> {
        let prefix_ok = (Self::SHORTEST_PREFIX..=Self::LONGEST_PREFIX).contains(&net.prefix_len());
        if prefix_ok && net.trunc() == net {
            Ok(VirtualRange(net))
        } else {
            Err(VirtualRangeError(net.to_string()))
        }
    }

    /// The first address of the range.
    pub fn network(self) -> Ipv4Addr {
        self.0.network()
    }

    /// The last address of the range.
    pub fn broadcast(self) -> Ipv4Addr {
        self.0.broadcast()
    }

    /// How many leading bits are fixed.
    pub fn prefix_len(self) -> u8 {
        self.0.prefix_len()
    }

    /// Whether `addr` lies in the range.
    pub fn contains(self, addr: Ipv4Addr) -> bool {
        self.0.contains(&addr)
    }

    /// The range as the netstack and the routing code write prefixes.
    pub fn to_ipv4_range(self) -> Ipv4Range {
        Ipv4Range::new(self.network(), self.prefix_len())
            // A VirtualRange has no host bits set and a prefix of at most /30.
            .expect("a virtual range is a valid IPv4 range")
    }
}

impl Default for VirtualRange {
    fn default() -> Self {
        Self::DEFAULT
    }
}

impl fmt::Display for VirtualRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

impl FromStr for VirtualRange {
    type Err = VirtualRangeError;

    /// Parses `a.b.c.d/len`.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = || VirtualRangeError(s.to_string());
        let range: Ipv4Range = s.parse().map_err(|_| err())?;
        let net = Ipv4Net::new(range.network(), range.prefix_len()).map_err(|_| err())?;
        VirtualRange::new(net).map_err(|_| err())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_is_a_slice_of_loopback() {
        assert_eq!(VirtualRange::default().to_string(), "127.77.0.0/16");
        assert_eq!("127.77.0.0/16".parse(), Ok(VirtualRange::DEFAULT));
        assert!(VirtualRange::DEFAULT.contains(Ipv4Addr::new(127, 77, 3, 4)));
        assert!(!VirtualRange::DEFAULT.contains(Ipv4Addr::new(127, 78, 0, 1)));
        assert_eq!(
            VirtualRange::DEFAULT.to_ipv4_range().to_string(),
            "127.77.0.0/16"
        );
    }

    #[test]
    fn only_networks_between_slash_8_and_slash_30_parse() {
        for ok in ["127.0.0.0/8", "10.0.0.252/30", "198.18.0.0/15"] {
            let range: VirtualRange = ok.parse().unwrap();
            assert_eq!(range.to_string(), ok);
        }
        for bad in [
            "10.0.0.0/31",
            "10.0.0.1/32",
            "10.0.0.0/7",
            "127.77.0.1/16",
            "127.77.0.0",
            "127.77.0.0/",
            "::1/128",
            "hello",
        ] {
            let err = bad.parse::<VirtualRange>().unwrap_err();
            assert_eq!(
                err.to_string(),
                format!(
                    "{bad:?} is not an IPv4 network like 127.77.0.0/16 with a prefix between /8 and /30"
                )
            );
        }
        let host_bits = Ipv4Net::new(Ipv4Addr::new(10, 0, 0, 1), 24).unwrap();
        assert!(VirtualRange::new(host_bits).is_err());
    }
}
