//! Hosts the appliance never answers or routes into the tun, whatever the
//! relay announces and whatever the allow list says: taking them over would
//! cut the appliance off from the relay (so it could never learn the fix),
//! from the namespace's resolver, or hand the host's own traffic to the
//! relay.
//!
//! - the relay's addresses, from the connection strings' `Endpoint`
//!   (resolved at start, before the appliance takes over DNS), and the
//!   relay's host names themselves;
//! - the DNS upstreams (the `nameserver`s of the original resolv.conf);
//! - the host's own addresses and the networks on its links;
//! - loopback (`127.0.0.0/8`), and the names `localhost` and `*.localhost`;
//! - addresses that are not one host's (unspecified, broadcast, multicast)
//!   and link-local ones (`169.254.0.0/16`, the cloud metadata service).

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, ToSocketAddrs};
use std::process::Command;

use ipnet::Ipv4Net;
use proto::name::Host;

/// Why a host is never routed; shown in logs and `appliance status`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum NeverReason {
    /// An address the relay was reached at.
    RelayAddress(Ipv4Addr),
    /// The relay's host name, which the appliance itself must resolve.
    RelayName(String),
    /// A DNS server the namespace forwards to.
    DnsUpstream(Ipv4Addr),
    /// An address of this host, on this interface.
    HostAddress {
        /// The address.
        addr: Ipv4Addr,
        /// Its interface.
        interface: String,
    },
    /// A network on one of this host's links.
    OnLink {
        /// The network.
        net: Ipv4Net,
        /// Its interface.
        interface: String,
    },
    /// The loopback network or a `localhost` name.
    Loopback,
    /// Not a unicast address one host could serve, or link-local (where
    /// cloud hosts keep their metadata service).
    Special(&'static str),
}

impl fmt::Display for NeverReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            NeverReason::RelayAddress(ip) => write!(f, "the relay's own address ({ip})"),
            NeverReason::RelayName(name) => write!(f, "the relay's own name ({name})"),
            NeverReason::DnsUpstream(ip) => write!(f, "a DNS server of this host ({ip})"),
            NeverReason::HostAddress { addr, interface } => {
                write!(f, "an address of this host ({addr} on {interface})")
            }
            NeverReason::OnLink { net, interface } => {
                write!(f, "on a link of this host ({net} on {interface})")
            }
            NeverReason::Loopback => f.write_str("loopback"),
            NeverReason::Special(what) => {
                let article = if what.starts_with('u') { "an" } else { "a" };
                write!(f, "{article} {what} address")
            }
        }
    }
}

/// One address of this host, with its prefix and interface (`ip -4 addr`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HostAddress {
    /// The interface it is on.
    pub interface: String,
    /// The address and the prefix of its link.
    pub net: Ipv4Net,
}

/// The set of hosts never routed. Build it with [`NeverRoute::new`] at
/// start, and refresh the host's addresses with
/// [`NeverRoute::set_host_addresses`] when they may have changed.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NeverRoute {
    relay_addrs: Vec<Ipv4Addr>,
    relay_names: Vec<String>,
    upstreams: Vec<Ipv4Addr>,
    host: Vec<HostAddress>,
}

impl NeverRoute {
    /// The set for a relay known by `relay_hosts` (names already resolved
    /// into `relay_addrs`), these DNS upstreams and host addresses.
    pub fn new(
        relay_hosts: &[String],
        relay_addrs: &[Ipv4Addr],
        upstreams: &[Ipv4Addr],
        host: Vec<HostAddress>,
    ) -> NeverRoute {
        let mut set = NeverRoute {
            host,
            ..NeverRoute::default()
        };
        for h in relay_hosts {
            match h.parse::<Ipv4Addr>() {
                Ok(ip) => set.relay_addrs.push(ip),
                Err(_) => set
                    .relay_names
                    .push(h.trim_end_matches('.').to_ascii_lowercase()),
            }
        }
        set.relay_addrs.extend_from_slice(relay_addrs);
        set.relay_addrs.sort();
        set.relay_addrs.dedup();
        set.relay_names.sort();
        set.relay_names.dedup();
        set.upstreams = upstreams.to_vec();
        set
    }

    /// Replaces the host's addresses (read again with [`host_addresses`]).
    /// Returns whether they changed.
    pub fn set_host_addresses(&mut self, host: Vec<HostAddress>) -> bool {
        if self.host == host {
            return false;
        }
        self.host = host;
        true
    }

    /// The host's addresses as last set.
    pub fn host_addresses(&self) -> &[HostAddress] {
        &self.host
    }

    /// Why `host` must never be answered or routed, or `None` when it may
    /// be (subject to the allow list).
    pub fn check(&self, host: &Host) -> Option<NeverReason> {
        match host {
            Host::Dns(name) => {
                let name = name.trim_end_matches('.').to_ascii_lowercase();
                if name == "localhost" || name.ends_with(".localhost") {
                    return Some(NeverReason::Loopback);
                }
                self.relay_names
                    .iter()
                    .find(|r| **r == name)
                    .map(|r| NeverReason::RelayName(r.clone()))
            }
            Host::Ipv4(ip) => self.check_addr(*ip),
        }
    }

    fn check_addr(&self, ip: Ipv4Addr) -> Option<NeverReason> {
        if self.relay_addrs.contains(&ip) {
            return Some(NeverReason::RelayAddress(ip));
        }
        if self.upstreams.contains(&ip) {
            return Some(NeverReason::DnsUpstream(ip));
        }
        if ip.is_loopback() {
            return Some(NeverReason::Loopback);
        }
        let special = if ip.is_unspecified() {
            Some("unspecified")
        } else if ip.is_broadcast() {
            Some("broadcast")
        } else if ip.is_multicast() {
            Some("multicast")
        } else if ip.is_link_local() {
            Some("link-local")
        } else {
            None
        };
        if let Some(what) = special {
            return Some(NeverReason::Special(what));
        }
        if let Some(a) = self.host.iter().find(|a| a.net.addr() == ip) {
            return Some(NeverReason::HostAddress {
                addr: ip,
                interface: a.interface.clone(),
            });
        }
        // A /32 (or /31 point-to-point) address has no neighbours to guard.
        self.host
            .iter()
            .find(|a| a.net.prefix_len() < 31 && a.net.trunc().contains(&ip))
            .map(|a| NeverReason::OnLink {
                net: a.net.trunc(),
                interface: a.interface.clone(),
            })
    }
}

/// The IPv4 addresses `host` (a relay's host name or address) resolves to
/// now; empty when it does not resolve.
pub fn resolve(host: &str, port: u16) -> Vec<Ipv4Addr> {
    let mut out: Vec<Ipv4Addr> = (host, port)
        .to_socket_addrs()
        .map(|addrs| {
            addrs
                .filter_map(|a| match a.ip() {
                    IpAddr::V4(ip) => Some(ip),
                    IpAddr::V6(_) => None,
                })
                .collect()
        })
        .unwrap_or_default();
    out.sort();
    out.dedup();
    out
}

/// Why the host's addresses could not be listed.
#[derive(Debug, thiserror::Error)]
#[error(
    "cannot list this host's addresses with `ip -4 -o addr show`: {0} (is iproute2 installed?)"
)]
pub struct HostAddressError(String);

/// This network namespace's IPv4 addresses (`ip -4 -o addr show`).
pub fn host_addresses() -> Result<Vec<HostAddress>, HostAddressError> {
    let out = Command::new("ip")
        .args(["-4", "-o", "addr", "show"])
        .env("LC_ALL", "C")
        .output()
        .map_err(|e| HostAddressError(e.to_string()))?;
    if !out.status.success() {
        return Err(HostAddressError(
            String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        ));
    }
    Ok(parse_ip_addr_show(&String::from_utf8_lossy(&out.stdout)))
}

/// Reads the output of `ip -4 -o addr show`; lines it does not understand
/// are skipped.
pub fn parse_ip_addr_show(text: &str) -> Vec<HostAddress> {
    let mut out = Vec::new();
    for line in text.lines() {
        let fields: Vec<&str> = line.split_whitespace().collect();
        let Some(inet) = fields.iter().position(|f| *f == "inet") else {
            continue;
        };
        let (Some(interface), Some(addr)) = (fields.get(1), fields.get(inet + 1)) else {
            continue;
        };
        let net = match addr.parse::<Ipv4Net>() {
            Ok(net) => net,
            Err(_) => match addr.parse::<Ipv4Addr>() {
                Ok(ip) => Ipv4Net::from(ip),
                Err(_) => continue,
            },
        };
        out.push(HostAddress {
            interface: interface.split('@').next().unwrap_or(interface).to_owned(),
            net,
        });
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const IP_ADDR: &str = "\
1: lo    inet 127.0.0.1/8 scope host lo\\       valid_lft forever preferred_lft forever
2: hlapp0@if7    inet 198.18.1.2/24 brd 198.18.1.255 scope global hlapp0\\       valid_lft forever preferred_lft forever
3: wg0    inet 10.9.0.1/32 scope global wg0\\       valid_lft forever preferred_lft forever
garbage line
";

    fn host(s: &str) -> Host {
        match s.parse::<Ipv4Addr>() {
            Ok(ip) => Host::Ipv4(ip),
            Err(_) => Host::Dns(s.to_owned()),
        }
    }

    fn set() -> NeverRoute {
        NeverRoute::new(
            &["relay.example".into(), "198.18.0.1".into()],
            &[Ipv4Addr::new(198, 18, 0, 9)],
            &[Ipv4Addr::new(198, 18, 1, 1), Ipv4Addr::new(192, 0, 2, 53)],
            parse_ip_addr_show(IP_ADDR),
        )
    }

    #[test]
    fn reads_ip_addr_show() {
        let addrs = parse_ip_addr_show(IP_ADDR);
        assert_eq!(addrs.len(), 3);
        assert_eq!(addrs[1].interface, "hlapp0");
        assert_eq!(addrs[1].net, "198.18.1.2/24".parse::<Ipv4Net>().unwrap());
        assert_eq!(addrs[2].net.prefix_len(), 32);
    }

    #[test]
    fn the_relay_the_resolvers_the_host_and_its_links_are_never_routed() {
        let s = set();
        let reason = |h: &str| s.check(&host(h)).map(|r| r.to_string());
        assert_eq!(
            reason("198.18.0.1").as_deref(),
            Some("the relay's own address (198.18.0.1)")
        );
        assert_eq!(
            reason("198.18.0.9").as_deref(),
            Some("the relay's own address (198.18.0.9)"),
            "addresses the relay's name resolved to"
        );
        assert_eq!(
            reason("Relay.Example.").as_deref(),
            Some("the relay's own name (relay.example)")
        );
        // The resolver is on-link too; its own reason wins.
        assert_eq!(
            reason("198.18.1.1").as_deref(),
            Some("a DNS server of this host (198.18.1.1)")
        );
        assert_eq!(
            reason("192.0.2.53").as_deref(),
            Some("a DNS server of this host (192.0.2.53)")
        );
        assert_eq!(
            reason("198.18.1.2").as_deref(),
            Some("an address of this host (198.18.1.2 on hlapp0)")
        );
        assert_eq!(
            reason("198.18.1.77").as_deref(),
            Some("on a link of this host (198.18.1.0/24 on hlapp0)")
        );
        assert_eq!(
            reason("10.9.0.1").as_deref(),
            Some("an address of this host (10.9.0.1 on wg0)")
        );
        for h in ["127.0.0.1", "127.77.0.2", "localhost", "db.localhost"] {
            assert_eq!(reason(h).as_deref(), Some("loopback"), "{h}");
        }
        for (h, what) in [
            ("0.0.0.0", "an unspecified address"),
            ("255.255.255.255", "a broadcast address"),
            ("224.0.0.1", "a multicast address"),
            ("169.254.169.254", "a link-local address"),
        ] {
            assert_eq!(reason(h).as_deref(), Some(what), "{h}");
        }
        for h in [
            "198.18.2.2",
            "10.9.0.2",
            "payroll.corp",
            "relay.example.org",
        ] {
            assert_eq!(reason(h), None, "{h}");
        }
    }

    #[test]
    fn host_addresses_can_change() {
        let mut s = set();
        assert!(!s.set_host_addresses(parse_ip_addr_show(IP_ADDR)));
        assert!(s.set_host_addresses(Vec::new()));
        assert_eq!(s.check(&host("198.18.1.77")), None);
        assert!(s.check(&host("127.0.0.1")).is_some());
    }

    #[test]
    fn relay_names_resolve_to_their_addresses() {
        assert_eq!(
            resolve("198.18.0.1", 9443),
            vec![Ipv4Addr::new(198, 18, 0, 1)]
        );
        assert!(resolve("localhost", 1).contains(&Ipv4Addr::LOCALHOST));
    }
}
