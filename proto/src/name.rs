//! Names: the name of a hybrid connection ([`HcName`]) and the `host:port`
//! an HC stands for ([`Endpoint`], [`Host`]).
//!
//! All three are parsed once, from untrusted text (CLI arguments, API bodies,
//! connection strings, control messages), into values that cannot be invalid;
//! everything downstream takes these types instead of strings. Each
//! serializes with serde as its canonical string and is validated again when
//! deserialized. [`canonical_dns_name`] is the one check of a DNS name,
//! for hosts and for every other name the appliance and agent take.

use std::fmt;
use std::net::Ipv4Addr;
use std::num::NonZeroU16;
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use thiserror::Error;

/// Longest allowed [`HcName`], in characters.
pub const HC_NAME_MAX_LEN: usize = 64;

/// Longest allowed DNS name in a [`Host`], in characters (RFC 1035, without
/// the trailing dot).
pub const DNS_NAME_MAX_LEN: usize = 253;

/// Longest allowed label of a DNS name in a [`Host`] (RFC 1035).
pub const DNS_LABEL_MAX_LEN: usize = 63;

/// Why a hybrid connection name, a host or an endpoint was rejected.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum NameError {
    /// The HC name is the empty string.
    #[error("hybrid connection name is empty; use 1 to 64 characters of a-z, 0-9 and '-'")]
    EmptyHcName,
    /// The HC name is longer than [`HC_NAME_MAX_LEN`].
    #[error("hybrid connection name is {len} characters long; the limit is 64 (a-z, 0-9 and '-')")]
    HcNameTooLong {
        /// Length of the rejected name, in characters.
        len: usize,
    },
    /// The HC name holds a character outside `[a-z0-9-]` (after lowercasing).
    #[error("hybrid connection name {name:?} contains {ch:?}; only a-z, 0-9 and '-' are allowed")]
    HcNameBadChar {
        /// The rejected name.
        name: String,
        /// The first character that is not allowed.
        ch: char,
    },
    /// The HC name starts or ends with `-`.
    #[error(
        "hybrid connection name {name:?} starts or ends with '-'; start and end with a letter or digit"
    )]
    HcNameHyphenEdge {
        /// The rejected name.
        name: String,
    },
    /// The host is the empty string.
    #[error("host is empty; give a DNS name (sql.corp.example, sql) or an IPv4 address (10.4.5.6)")]
    EmptyHost,
    /// The host looks like an IPv6 address, which HCs do not support.
    #[error(
        "host {host:?} is an IPv6 address; hybrid connection endpoints are DNS names or IPv4 addresses"
    )]
    Ipv6Host {
        /// The rejected host.
        host: String,
    },
    /// The host is longer than [`DNS_NAME_MAX_LEN`].
    #[error("host name is {len} characters long; a DNS name has at most 253")]
    HostTooLong {
        /// Length of the rejected host, in characters.
        len: usize,
    },
    /// One label of the DNS name is malformed.
    #[error("host {host:?} is not a valid DNS name: label {label:?} {reason}")]
    BadHostLabel {
        /// The rejected host.
        host: String,
        /// The offending label (between dots).
        label: String,
        /// What is wrong with the label.
        reason: &'static str,
    },
    /// The host consists of numbers and dots but is not a valid IPv4 address.
    #[error(
        "host {host:?} looks like an IPv4 address but is not one; write four numbers 0-255 (10.4.5.6)"
    )]
    BadIpv4 {
        /// The rejected host.
        host: String,
    },
    /// The endpoint has no `:port`.
    #[error("endpoint {endpoint:?} has no port; write HOST:PORT, for example sql.corp:1433")]
    MissingPort {
        /// The rejected endpoint text.
        endpoint: String,
    },
    /// The port is not a number in 1–65535.
    #[error("port {port:?} is not a number from 1 to 65535")]
    BadPort {
        /// The rejected port text.
        port: String,
    },
}

/// The name of a hybrid connection: 1–64 characters of `[a-z0-9-]`, not
/// starting or ending with `-` (like a DNS label, but up to 64 long).
///
/// Parsing lowercases the input, so `Payroll` and `payroll` are the same HC.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct HcName(String);

impl HcName {
    /// The name as text (always lowercase).
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl FromStr for HcName {
    type Err = NameError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let name = s.to_ascii_lowercase();
        if name.is_empty() {
            return Err(NameError::EmptyHcName);
        }
        let len = name.chars().count();
        if len > HC_NAME_MAX_LEN {
            return Err(NameError::HcNameTooLong { len });
        }
        if let Some(ch) = name
            .chars()
            .find(|c| !(c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '-'))
        {
            return Err(NameError::HcNameBadChar { name, ch });
        }
        if name.starts_with('-') || name.ends_with('-') {
            return Err(NameError::HcNameHyphenEdge { name });
        }
        Ok(HcName(name))
    }
}

impl TryFrom<String> for HcName {
    type Error = NameError;

    fn try_from(s: String) -> Result<Self, Self::Error> {
        s.parse()
    }
}

impl From<HcName> for String {
    fn from(name: HcName) -> String {
        name.0
    }
}

impl fmt::Display for HcName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// The host part of an HC endpoint: a DNS name (fully qualified or short) or
/// an IPv4 literal.
///
/// DNS names are stored lowercase and without a trailing dot. IPv6 is not
/// supported (the appliance maps HCs into an IPv4 range).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub enum Host {
    /// A DNS name such as `sql.corp.example` or `sql`.
    Dns(String),
    /// An IPv4 address such as `10.4.5.6`.
    Ipv4(Ipv4Addr),
}

impl Host {
    /// The IPv4 address, if this host is an IPv4 literal.
    pub fn ipv4(&self) -> Option<Ipv4Addr> {
        match self {
            Host::Ipv4(addr) => Some(*addr),
            Host::Dns(_) => None,
        }
    }

    /// The DNS name, if this host is one.
    pub fn dns_name(&self) -> Option<&str> {
        match self {
            Host::Dns(name) => Some(name),
            Host::Ipv4(_) => None,
        }
    }
}

impl FromStr for Host {
    type Err = NameError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.is_empty() {
            return Err(NameError::EmptyHost);
        }
        if s.contains(':') || (s.starts_with('[') && s.ends_with(']')) {
            return Err(NameError::Ipv6Host { host: s.to_owned() });
        }
        if let Ok(addr) = s.parse::<Ipv4Addr>() {
            return Ok(Host::Ipv4(addr));
        }
        canonical_dns_name(s).map(Host::Dns)
    }
}

/// Checks that `name` is a DNS host name and returns it in canonical form:
/// lower-case, without a trailing dot. A host name has at most 253
/// characters in labels of 1 to 63 letters, digits and `-`, none starting
/// or ending with `-`, and is not all digits and dots (that is meant as an
/// IPv4 address). Every part of hybridlink that takes a DNS name checks it
/// here: [`Host`], the appliance's name map, DNS server and allow list, and
/// the agent's policy.
pub fn canonical_dns_name(name: &str) -> Result<String, NameError> {
    let host = name.strip_suffix('.').unwrap_or(name).to_ascii_lowercase();
    if host.is_empty() {
        return Err(NameError::EmptyHost);
    }
    let len = host.chars().count();
    if len > DNS_NAME_MAX_LEN {
        return Err(NameError::HostTooLong { len });
    }
    // All digits and dots: meant as an address, but not a valid one.
    if host.chars().all(|c| c.is_ascii_digit() || c == '.') {
        return Err(NameError::BadIpv4 {
            host: name.to_owned(),
        });
    }
    for label in host.split('.') {
        let reason = if label.is_empty() {
            Some("is empty (two dots in a row, or a leading dot)")
        } else if label.len() > DNS_LABEL_MAX_LEN {
            Some("is longer than 63 characters")
        } else if !label
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
        {
            Some("contains a character other than a-z, 0-9 and '-'")
        } else if label.starts_with('-') || label.ends_with('-') {
            Some("starts or ends with '-'")
        } else {
            None
        };
        if let Some(reason) = reason {
            return Err(NameError::BadHostLabel {
                host: name.to_owned(),
                label: label.to_owned(),
                reason,
            });
        }
    }
    Ok(host)
}

impl TryFrom<String> for Host {
    type Error = NameError;

    fn try_from(s: String) -> Result<Self, Self::Error> {
        s.parse()
    }
}

impl From<Host> for String {
    fn from(host: Host) -> String {
        host.to_string()
    }
}

impl fmt::Display for Host {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Host::Dns(name) => f.write_str(name),
            Host::Ipv4(addr) => write!(f, "{addr}"),
        }
    }
}

/// What a hybrid connection stands for: a host and a TCP port (1–65535),
/// written `host:port`.
///
/// The fields are private so that an `Endpoint` always holds a non-zero
/// port; build one with [`Endpoint::new`] or by parsing.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Endpoint {
    host: Host,
    port: u16,
}

impl Endpoint {
    /// Builds an endpoint; fails if `port` is 0.
    pub fn new(host: Host, port: u16) -> Result<Self, NameError> {
        if port == 0 {
            return Err(NameError::BadPort {
                port: port.to_string(),
            });
        }
        Ok(Endpoint { host, port })
    }

    /// The host to dial.
    pub fn host(&self) -> &Host {
        &self.host
    }

    /// The TCP port to dial (never 0).
    pub fn port(&self) -> u16 {
        self.port
    }

    /// This endpoint with `host`, `port` or both replaced.
    pub fn with(&self, host: Option<Host>, port: Option<NonZeroU16>) -> Endpoint {
        Endpoint {
            host: host.unwrap_or_else(|| self.host.clone()),
            port: port.map_or(self.port, NonZeroU16::get),
        }
    }
}

/// Parses a TCP port in 1–65535 from text.
pub fn parse_port(s: &str) -> Result<u16, NameError> {
    match s.parse::<u16>() {
        Ok(port) if port != 0 && s.bytes().all(|b| b.is_ascii_digit()) => Ok(port),
        _ => Err(NameError::BadPort { port: s.to_owned() }),
    }
}

impl FromStr for Endpoint {
    type Err = NameError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let Some((host, port)) = s.rsplit_once(':') else {
            return Err(NameError::MissingPort {
                endpoint: s.to_owned(),
            });
        };
        let port = parse_port(port)?;
        let host = host.parse()?;
        Ok(Endpoint { host, port })
    }
}

impl TryFrom<String> for Endpoint {
    type Error = NameError;

    fn try_from(s: String) -> Result<Self, Self::Error> {
        s.parse()
    }
}

impl From<Endpoint> for String {
    fn from(endpoint: Endpoint) -> String {
        endpoint.to_string()
    }
}

impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.host, self.port)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hc_name_accepts_and_lowercases() {
        let name: HcName = "Payroll-DB-2".parse().unwrap();
        assert_eq!(name.as_str(), "payroll-db-2");
        assert_eq!(name.to_string(), "payroll-db-2");
        assert!("a".parse::<HcName>().is_ok());
        assert!("a".repeat(64).parse::<HcName>().is_ok());
    }

    #[test]
    fn hc_name_rejections_say_why() {
        assert_eq!("".parse::<HcName>(), Err(NameError::EmptyHcName));
        assert_eq!(
            "a".repeat(65).parse::<HcName>(),
            Err(NameError::HcNameTooLong { len: 65 })
        );
        let err = "pay_roll".parse::<HcName>().unwrap_err();
        assert_eq!(
            err.to_string(),
            "hybrid connection name \"pay_roll\" contains '_'; only a-z, 0-9 and '-' are allowed"
        );
        assert!(matches!(
            "-pay".parse::<HcName>(),
            Err(NameError::HcNameHyphenEdge { .. })
        ));
        assert!(matches!(
            "pay-".parse::<HcName>(),
            Err(NameError::HcNameHyphenEdge { .. })
        ));
        assert!(matches!(
            "päy".parse::<HcName>(),
            Err(NameError::HcNameBadChar { ch: 'ä', .. })
        ));
    }

    #[test]
    fn hc_name_serde_validates() {
        let name: HcName = serde_json::from_str("\"Payroll\"").unwrap();
        assert_eq!(serde_json::to_string(&name).unwrap(), "\"payroll\"");
        let err = serde_json::from_str::<HcName>("\"bad name\"").unwrap_err();
        assert!(err.to_string().contains("contains ' '"), "{err}");
    }

    #[test]
    fn host_parses_dns_and_ipv4() {
        assert_eq!(
            "SQL.Corp.Example.".parse::<Host>(),
            Ok(Host::Dns("sql.corp.example".into()))
        );
        assert_eq!("sql".parse::<Host>(), Ok(Host::Dns("sql".into())));
        assert_eq!(
            "10.4.5.6".parse::<Host>(),
            Ok(Host::Ipv4(Ipv4Addr::new(10, 4, 5, 6)))
        );
        assert_eq!(
            "198.18.0.1".parse::<Host>().unwrap().ipv4(),
            Some(Ipv4Addr::new(198, 18, 0, 1))
        );
        assert_eq!("db1.corp".parse::<Host>().unwrap().to_string(), "db1.corp");
    }

    #[test]
    fn host_rejections_say_why() {
        assert_eq!("".parse::<Host>(), Err(NameError::EmptyHost));
        assert_eq!(".".parse::<Host>(), Err(NameError::EmptyHost));
        assert!(matches!(
            "::1".parse::<Host>(),
            Err(NameError::Ipv6Host { .. })
        ));
        assert!(matches!(
            "10.4.5.256".parse::<Host>(),
            Err(NameError::BadIpv4 { .. })
        ));
        let err = "a..b".parse::<Host>().unwrap_err();
        assert!(err.to_string().contains("label \"\" is empty"), "{err}");
        let err = "sql_server.corp".parse::<Host>().unwrap_err();
        assert!(err.to_string().contains("\"sql_server\""), "{err}");
        assert!(matches!(
            "-a.corp".parse::<Host>(),
            Err(NameError::BadHostLabel { .. })
        ));
        assert!(matches!(
            format!("{}.corp", "a".repeat(64)).parse::<Host>(),
            Err(NameError::BadHostLabel { .. })
        ));
        let long = vec!["abcdefgh"; 30].join(".");
        assert!(matches!(
            long.parse::<Host>(),
            Err(NameError::HostTooLong { .. })
        ));
    }

    #[test]
    fn dns_names_are_checked_once_and_made_canonical() {
        assert_eq!(canonical_dns_name("Sql.Corp."), Ok("sql.corp".into()));
        assert_eq!(canonical_dns_name("db-1.x"), Ok("db-1.x".into()));
        assert_eq!(
            canonical_dns_name("10.in-addr.arpa"),
            Ok("10.in-addr.arpa".into())
        );
        for bad in [
            "",
            ".",
            "a..b",
            "a b",
            "_svc.corp",
            "-a.corp",
            "a-.corp",
            "caf\u{e9}.corp",
            "10.4.5",
            &"x".repeat(64),
            &"a.".repeat(130),
        ] {
            assert!(canonical_dns_name(bad).is_err(), "{bad:?}");
        }
        // A host that is not an address is exactly a canonical DNS name.
        assert_eq!(
            "SQL.corp.".parse::<Host>(),
            canonical_dns_name("SQL.corp.").map(Host::Dns)
        );
        assert_eq!(
            "sql_server.corp".parse::<Host>(),
            canonical_dns_name("sql_server.corp").map(Host::Dns)
        );
    }

    #[test]
    fn endpoint_round_trips() {
        let ep: Endpoint = "sql.corp:1433".parse().unwrap();
        assert_eq!(ep.host(), &Host::Dns("sql.corp".into()));
        assert_eq!(ep.port(), 1433);
        assert_eq!(ep.to_string(), "sql.corp:1433");
        let ep: Endpoint = "198.18.0.7:65535".parse().unwrap();
        assert_eq!(ep.host().ipv4(), Some(Ipv4Addr::new(198, 18, 0, 7)));
        let json = serde_json::to_string(&ep).unwrap();
        assert_eq!(json, "\"198.18.0.7:65535\"");
        assert_eq!(serde_json::from_str::<Endpoint>(&json).unwrap(), ep);
    }

    #[test]
    fn endpoint_rejections_say_why() {
        let err = "sql.corp".parse::<Endpoint>().unwrap_err();
        assert_eq!(
            err.to_string(),
            "endpoint \"sql.corp\" has no port; write HOST:PORT, for example sql.corp:1433"
        );
        for bad in ["sql:0", "sql:65536", "sql:", "sql:+80", "sql:http"] {
            assert!(
                matches!(bad.parse::<Endpoint>(), Err(NameError::BadPort { .. })),
                "{bad}"
            );
        }
        assert!(matches!(
            ":80".parse::<Endpoint>(),
            Err(NameError::EmptyHost)
        ));
        assert!(matches!(
            "[::1]:80".parse::<Endpoint>(),
            Err(NameError::Ipv6Host { .. })
        ));
        assert!(Endpoint::new(Host::Dns("a".into()), 0).is_err());
        assert!(serde_json::from_str::<Endpoint>("\"sql:0\"").is_err());
    }
}
