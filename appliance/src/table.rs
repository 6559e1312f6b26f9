//! Which hybrid connection a new flow belongs to.
//!
//! An app connects to an address and a port. Addresses in the virtual range
//! stand for host names (the DNS server handed them out); other addresses
//! are IPv4-literal endpoints routed into the tun as they are. Several
//! hybrid connections can share one host: the port decides.

use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddrV4};

use proto::name::{Endpoint, HcName, Host};

/// The lookup table from a flow's destination to its hybrid connection.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FlowTable {
    by_name: HashMap<(String, u16), HcName>,
    by_ip: HashMap<(Ipv4Addr, u16), HcName>,
}

impl FlowTable {
    /// Builds the table from the endpoints the relay announced.
    pub fn new<'a>(endpoints: impl IntoIterator<Item = (&'a HcName, &'a Endpoint)>) -> Self {
        let mut table = FlowTable::default();
        for (hc, endpoint) in endpoints {
            let port = endpoint.port();
            match endpoint.host() {
                Host::Ipv4(ip) => {
                    table.by_ip.insert((*ip, port), hc.clone());
                }
                Host::Dns(name) => {
                    table.by_name.insert((normalise(name), port), hc.clone());
                }
            }
        }
        table
    }

    /// The host names that need an address in the virtual range.
    pub fn names(&self) -> Vec<String> {
        let mut names: Vec<String> = self.by_name.keys().map(|(n, _)| n.clone()).collect();
        names.sort();
        names.dedup();
        names
    }

    /// The IPv4-literal endpoints, which are routed into the tun as /32s.
    pub fn literal_addresses(&self) -> Vec<Ipv4Addr> {
        let mut ips: Vec<Ipv4Addr> = self.by_ip.keys().map(|(ip, _)| *ip).collect();
        ips.sort();
        ips.dedup();
        ips
    }

    /// The hybrid connection for a flow to `dst`, where `name_of` tells the
    /// host name behind a virtual address. `None`: refuse the flow.
    pub fn lookup(
        &self,
        dst: SocketAddrV4,
        name_of: impl Fn(Ipv4Addr) -> Option<String>,
    ) -> Option<&HcName> {
        if let Some(hc) = self.by_ip.get(&(*dst.ip(), dst.port())) {
            return Some(hc);
        }
        let name = name_of(*dst.ip())?;
        self.by_name.get(&(normalise(&name), dst.port()))
    }
}

fn normalise(name: &str) -> String {
    name.trim_end_matches('.').to_ascii_lowercase()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hc(s: &str) -> HcName {
        s.parse().unwrap()
    }

    #[test]
    fn the_port_decides_between_hcs_of_one_host() {
        let web = (hc("web"), "Intranet.Corp:80".parse::<Endpoint>().unwrap());
        let api = (hc("api"), "intranet.corp:8080".parse::<Endpoint>().unwrap());
        let lit = (hc("lit"), "198.18.9.9:5432".parse::<Endpoint>().unwrap());
        let table = FlowTable::new([(&web.0, &web.1), (&api.0, &api.1), (&lit.0, &lit.1)]);
        assert_eq!(table.names(), vec!["intranet.corp".to_string()]);
        assert_eq!(
            table.literal_addresses(),
            vec![Ipv4Addr::new(198, 18, 9, 9)]
        );
        let virt = Ipv4Addr::new(127, 77, 0, 2);
        let name_of = |ip: Ipv4Addr| (ip == virt).then(|| "intranet.corp".to_string());
        assert_eq!(
            table.lookup(SocketAddrV4::new(virt, 80), name_of),
            Some(&hc("web"))
        );
        assert_eq!(
            table.lookup(SocketAddrV4::new(virt, 8080), name_of),
            Some(&hc("api"))
        );
        assert_eq!(table.lookup(SocketAddrV4::new(virt, 22), name_of), None);
        let other = Ipv4Addr::new(127, 77, 0, 3);
        assert_eq!(table.lookup(SocketAddrV4::new(other, 80), name_of), None);
        let lit_ip = Ipv4Addr::new(198, 18, 9, 9);
        assert_eq!(
            table.lookup(SocketAddrV4::new(lit_ip, 5432), name_of),
            Some(&hc("lit"))
        );
        assert_eq!(table.lookup(SocketAddrV4::new(lit_ip, 5433), name_of), None);
    }
}
