//! The local allow list: which hosts the relay may make this appliance
//! answer in DNS (names) and route into the tun (IPv4 literals).
//!
//! The relay announces each hybrid connection's endpoint, and whoever runs
//! the relay (or holds its manage key) can change it at any time. The allow
//! list is the app host's own word on what those announcements may reach;
//! an endpoint outside it is refused, and its hybrid connection serves
//! nothing until it moves back inside.
//!
//! Entries, as written in `appliance.toml` (`allow = [...]`):
//!
//! | entry | matches |
//! | --- | --- |
//! | `payroll.corp` | that host name (any case, trailing dot or not) |
//! | `.corp` or `*.corp` | every name that ends in `.corp` (not `corp` itself) |
//! | `10.4.0.0/16` | IPv4-literal endpoints in that network |
//! | `10.4.5.6` | that one IPv4 address (a `/32`) |
//!
//! CIDRs match only IPv4-literal endpoints and names only names: the
//! appliance never resolves an endpoint's name (the agent does, on-prem), so
//! a name gets a virtual address whatever it would resolve to.

use std::fmt;
use std::net::Ipv4Addr;
use std::str::FromStr;

use ipnet::Ipv4Net;
use proto::name::{Host, canonical_dns_name};

/// Why an allow-list entry could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AllowError {
    /// An entry that is neither a host name, a suffix nor an IPv4 network.
    #[error(
        "allow-list entry {entry:?} is not usable: {reason}; write a host name \
         (payroll.corp), a suffix (.corp) or an IPv4 network (10.4.0.0/16, 10.4.5.6)"
    )]
    Invalid {
        /// The entry as written.
        entry: String,
        /// What is wrong with it.
        reason: String,
    },
}

/// One entry of the allow list.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum AllowEntry {
    /// Exactly this host name (lower case, no trailing dot).
    Name(String),
    /// Every name ending in `.` + this (lower case, no leading dot).
    Suffix(String),
    /// IPv4-literal endpoints in this network.
    Net(Ipv4Net),
}

impl AllowEntry {
    /// The entry that allows exactly `host`: its name, or its address as a
    /// `/32`.
    pub fn exactly(host: &Host) -> AllowEntry {
        match host {
            Host::Ipv4(ip) => AllowEntry::Net(Ipv4Net::from(*ip)),
            Host::Dns(name) => AllowEntry::Name(normalise(name)),
        }
    }

    /// Whether this entry allows `host`.
    pub fn matches(&self, host: &Host) -> bool {
        match (self, host) {
            (AllowEntry::Net(net), Host::Ipv4(ip)) => net.contains(ip),
            (AllowEntry::Name(allowed), Host::Dns(name)) => *allowed == normalise(name),
            (AllowEntry::Suffix(suffix), Host::Dns(name)) => {
                let name = normalise(name);
                name.len() > suffix.len() + 1
                    && name.ends_with(suffix.as_str())
                    && name.as_bytes()[name.len() - suffix.len() - 1] == b'.'
            }
            _ => false,
        }
    }
}

impl FromStr for AllowEntry {
    type Err = AllowError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let invalid = |reason: String| AllowError::Invalid {
            entry: s.to_owned(),
            reason,
        };
        let text = s.trim();
        if text.is_empty() {
            return Err(invalid("it is empty".into()));
        }
        if text.starts_with(|c: char| c.is_ascii_digit()) && !text.contains(char::is_alphabetic) {
            if let Ok(ip) = text.parse::<Ipv4Addr>() {
                return Ok(AllowEntry::Net(Ipv4Net::from(ip)));
            }
            let net = text
                .parse::<Ipv4Net>()
                .map_err(|_| invalid("not an IPv4 address or network".into()))?;
            if net != net.trunc() {
                return Err(invalid(format!(
                    "host bits are set; did you mean {}?",
                    net.trunc()
                )));
            }
            return Ok(AllowEntry::Net(net));
        }
        let suffix = text.strip_prefix("*.").or_else(|| text.strip_prefix('.'));
        let name = suffix.unwrap_or(text);
        let name = canonical_dns_name(name).map_err(|e| invalid(e.to_string()))?;
        Ok(match suffix {
            Some(_) => AllowEntry::Suffix(name),
            None => AllowEntry::Name(name),
        })
    }
}

impl fmt::Display for AllowEntry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            AllowEntry::Name(name) => f.write_str(name),
            AllowEntry::Suffix(suffix) => write!(f, ".{suffix}"),
            AllowEntry::Net(net) if net.prefix_len() == 32 => write!(f, "{}", net.addr()),
            AllowEntry::Net(net) => write!(f, "{net}"),
        }
    }
}

/// A list of [`AllowEntry`]s; a host is allowed when any entry matches.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AllowList {
    entries: Vec<AllowEntry>,
}

impl AllowList {
    /// A list of these entries (duplicates dropped, order kept).
    pub fn new(entries: impl IntoIterator<Item = AllowEntry>) -> AllowList {
        let mut list = AllowList::default();
        for e in entries {
            list.insert(e);
        }
        list
    }

    /// Parses every entry; the first bad one is the error.
    pub fn parse<S: AsRef<str>>(entries: &[S]) -> Result<AllowList, AllowError> {
        let parsed = entries
            .iter()
            .map(|e| e.as_ref().parse())
            .collect::<Result<Vec<AllowEntry>, _>>()?;
        Ok(AllowList::new(parsed))
    }

    /// Adds `entry` unless it is there already; returns whether it was new.
    pub fn insert(&mut self, entry: AllowEntry) -> bool {
        if self.entries.contains(&entry) {
            return false;
        }
        self.entries.push(entry);
        true
    }

    /// The first entry that allows `host`, if any.
    pub fn matching(&self, host: &Host) -> Option<&AllowEntry> {
        self.entries.iter().find(|e| e.matches(host))
    }

    /// The entries, in the order given.
    pub fn entries(&self) -> &[AllowEntry] {
        &self.entries
    }

    /// Whether the list has no entry (and so allows nothing).
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

fn normalise(name: &str) -> String {
    name.trim_end_matches('.').to_ascii_lowercase()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn host(s: &str) -> Host {
        match s.parse::<Ipv4Addr>() {
            Ok(ip) => Host::Ipv4(ip),
            Err(_) => Host::Dns(s.to_owned()),
        }
    }

    fn entry(s: &str) -> AllowEntry {
        s.parse().unwrap()
    }

    #[test]
    fn entries_parse_and_print_back() {
        for (text, printed) in [
            ("payroll.corp", "payroll.corp"),
            ("Payroll.Corp.", "payroll.corp"),
            (".corp", ".corp"),
            ("*.Corp", ".corp"),
            ("10.4.0.0/16", "10.4.0.0/16"),
            ("10.4.5.6", "10.4.5.6"),
            ("10.4.5.6/32", "10.4.5.6"),
            ("sql", "sql"),
        ] {
            assert_eq!(entry(text).to_string(), printed, "{text}");
            assert_eq!(entry(printed), entry(text), "{text} round trip");
        }
    }

    #[test]
    fn bad_entries_say_what_to_write() {
        for bad in [
            "",
            "10.4.5.6/16",
            "10.4.0.0/33",
            "a b",
            "*.",
            ".",
            "300.1.1.1",
        ] {
            let err = bad.parse::<AllowEntry>().unwrap_err().to_string();
            assert!(err.contains("write a host name"), "{bad:?}: {err}");
        }
        let err = "10.4.5.6/16".parse::<AllowEntry>().unwrap_err().to_string();
        assert!(err.contains("did you mean 10.4.0.0/16"), "{err}");
    }

    #[test]
    fn names_suffixes_and_networks_match_only_their_kind() {
        let list = AllowList::parse(&["payroll.corp", ".lab.test", "198.18.2.0/24"]).unwrap();
        let allowed = |h: &str| list.matching(&host(h)).map(ToString::to_string);
        assert_eq!(allowed("payroll.corp").as_deref(), Some("payroll.corp"));
        assert_eq!(allowed("PAYROLL.corp.").as_deref(), Some("payroll.corp"));
        assert_eq!(allowed("x.payroll.corp"), None, "a name is not a suffix");
        assert_eq!(allowed("sql.lab.test").as_deref(), Some(".lab.test"));
        assert_eq!(allowed("a.b.lab.test").as_deref(), Some(".lab.test"));
        assert_eq!(allowed("lab.test"), None, "a suffix is not the name itself");
        assert_eq!(allowed("evillab.test"), None, "suffixes match whole labels");
        assert_eq!(allowed("198.18.2.2").as_deref(), Some("198.18.2.0/24"));
        assert_eq!(allowed("198.18.3.2"), None);
        assert_eq!(allowed("github.com"), None);
        assert!(
            AllowList::default()
                .matching(&host("payroll.corp"))
                .is_none()
        );
    }

    #[test]
    fn exact_entries_allow_exactly_one_host() {
        let e = AllowEntry::exactly(&host("Payroll.corp"));
        assert!(e.matches(&host("payroll.corp")));
        assert!(!e.matches(&host("sql.corp")));
        let e = AllowEntry::exactly(&host("198.18.2.2"));
        assert_eq!(e.to_string(), "198.18.2.2");
        assert!(e.matches(&host("198.18.2.2")));
        assert!(!e.matches(&host("198.18.2.3")));
        let mut list = AllowList::default();
        assert!(list.insert(e.clone()));
        assert!(!list.insert(e));
        assert_eq!(list.entries().len(), 1);
    }
}
