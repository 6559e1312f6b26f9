//! The on-prem policy: which endpoints this agent may ever dial.
//!
//! The relay says where a hybrid connection's streams go, but the relay is
//! not trusted to decide what inside the on-prem network is reachable. The
//! on-prem administrator owns a policy file (TOML) next to the agent's
//! configuration, the counterpart of the original product's Group Policy:
//!
//! ```toml
//! [[allow]]
//! host = "payroll.corp"     # a name, a wildcard (*.corp, *), an address or a CIDR
//! ports = [80, "8000-8100"] # optional; every port when left out
//! hc = "payroll"            # optional; every hybrid connection when left out
//!
//! [[deny]]
//! host = "10.9.0.0/16"
//! ```
//!
//! A stream is allowed when no `deny` rule matches and some `allow` rule
//! does. Names are checked as written before dialing, and every address a
//! name resolves to is checked again: a `deny` rule with an address or CIDR
//! refuses it, and a loopback, link-local, unspecified, multicast or
//! broadcast address is reached only through a rule that names the host
//! exactly (never through a wildcard). So a relay that moves an endpoint to
//! `127.0.0.1`, `169.254.169.254` or a name that resolves there is refused,
//! unless the administrator allowed exactly that.
//!
//! Without a policy file the agent uses [`Policy::built_in`]: any host and
//! port, through the wildcard rule, so never those special addresses.

use std::fmt;
use std::net::IpAddr;
use std::path::{Path, PathBuf};

use ipnet::IpNet;
use proto::name::{Endpoint, HcName, canonical_dns_name};
use serde::{Deserialize, Serialize};
use transport::atomic_file::AtomicFile;

/// Why a policy file could not be used.
#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    /// The file could not be read.
    #[error("cannot read the policy {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// The file is not a valid policy.
    #[error("the policy {path} is not valid: {message}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// What is wrong, with line and column when TOML knows them.
        message: String,
    },
    /// A policy file named explicitly does not exist.
    #[error(
        "no policy file at {}; write one with `hybridlink agent allow HOST:PORT --policy {}`",
        path.display(),
        path.display()
    )]
    Missing {
        /// The file.
        path: PathBuf,
    },
    /// The file could not be written.
    #[error("cannot write the policy {path}: {source}")]
    Write {
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
}

/// Which hosts a rule covers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum HostPattern {
    /// `*`: every host.
    Any,
    /// `*.corp`: every name below `corp` (not `corp` itself).
    Suffix(String),
    /// One name, exactly (case-insensitive).
    Name(String),
    /// An address or a CIDR.
    Net(IpNet),
}

impl HostPattern {
    fn parse(s: &str) -> Result<Self, String> {
        let s = s.trim();
        if s == "*" {
            return Ok(HostPattern::Any);
        }
        if let Ok(ip) = s.parse::<IpAddr>() {
            return Ok(HostPattern::Net(IpNet::from(ip)));
        }
        if let Ok(net) = s.parse::<IpNet>() {
            return Ok(HostPattern::Net(net.trunc()));
        }
        if let Some(rest) = s.strip_prefix("*.") {
            if let Ok(suffix) = canonical_dns_name(rest) {
                return Ok(HostPattern::Suffix(suffix));
            }
        } else if let Ok(name) = canonical_dns_name(s) {
            return Ok(HostPattern::Name(name));
        }
        Err(format!(
            "host {s:?} is not a name, a wildcard (*.corp or *), an address or a CIDR"
        ))
    }

    /// Whether this pattern names a host exactly (not through a wildcard).
    fn is_exact(&self) -> bool {
        matches!(self, HostPattern::Name(_) | HostPattern::Net(_))
    }

    fn matches_host(&self, host: &str) -> bool {
        let host = host.to_ascii_lowercase();
        match (self, host.parse::<IpAddr>()) {
            (HostPattern::Any, _) => true,
            (HostPattern::Net(net), Ok(ip)) => net.contains(&ip),
            (HostPattern::Net(_), Err(_)) => false,
            (HostPattern::Name(n), Err(_)) => *n == host,
            (HostPattern::Suffix(sfx), Err(_)) => host
                .strip_suffix(sfx.as_str())
                .is_some_and(|head| head.ends_with('.')),
            (HostPattern::Name(_) | HostPattern::Suffix(_), Ok(_)) => false,
        }
    }
}

impl fmt::Display for HostPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HostPattern::Any => f.write_str("*"),
            HostPattern::Suffix(s) => write!(f, "*.{s}"),
            HostPattern::Name(n) => f.write_str(n),
            HostPattern::Net(net) if net.prefix_len() == net.max_prefix_len() => {
                write!(f, "{}", net.addr())
            }
            HostPattern::Net(net) => write!(f, "{net}"),
        }
    }
}

/// A port or an inclusive range of ports, as written in the file.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum PortSpec {
    /// One port.
    One(u16),
    /// `"8000-8100"` or `"443"`.
    Range(String),
}

fn parse_ports(specs: &[PortSpec]) -> Result<Vec<(u16, u16)>, String> {
    specs
        .iter()
        .map(|spec| match spec {
            PortSpec::One(0) => Err("port 0 is not a port".to_string()),
            PortSpec::One(p) => Ok((*p, *p)),
            PortSpec::Range(s) => {
                let bad =
                    || format!("ports entry {s:?} is not a port or a range like \"8000-8100\"");
                let (lo, hi) = s.split_once('-').unwrap_or((s, s));
                let lo: u16 = lo.trim().parse().map_err(|_| bad())?;
                let hi: u16 = hi.trim().parse().map_err(|_| bad())?;
                if lo == 0 || lo > hi {
                    return Err(bad());
                }
                Ok((lo, hi))
            }
        })
        .collect()
}

/// One rule as written in the file.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuleText {
    /// A name, a wildcard, an address or a CIDR.
    pub host: String,
    /// Ports; every port when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ports: Option<Vec<PortSpec>>,
    /// The hybrid connection the rule is for; all when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hc: Option<String>,
}

/// The file's shape.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PolicyText {
    /// Rules that allow.
    #[serde(default)]
    pub allow: Vec<RuleText>,
    /// Rules that deny, checked first.
    #[serde(default)]
    pub deny: Vec<RuleText>,
}

/// Allow or deny.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    /// `[[allow]]`.
    Allow,
    /// `[[deny]]`.
    Deny,
}

/// One parsed rule.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rule {
    /// Allow or deny.
    pub action: Action,
    /// Its 1-based position among the rules of its kind, for messages.
    pub index: usize,
    /// Hosts.
    pub host: HostPattern,
    /// Inclusive port ranges; `None` for every port.
    pub ports: Option<Vec<(u16, u16)>>,
    /// The hybrid connection it is limited to.
    pub hc: Option<HcName>,
}

impl Rule {
    fn applies(&self, hc: &HcName, port: u16) -> bool {
        self.hc.as_ref().is_none_or(|h| h == hc)
            && self
                .ports
                .as_ref()
                .is_none_or(|ranges| ranges.iter().any(|(lo, hi)| (*lo..=*hi).contains(&port)))
    }
}

impl fmt::Display for Rule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let kind = match self.action {
            Action::Allow => "allow",
            Action::Deny => "deny",
        };
        write!(f, "{kind} rule #{} (host {}", self.index, self.host)?;
        if let Some(ranges) = &self.ports {
            let list: Vec<String> = ranges
                .iter()
                .map(|(lo, hi)| {
                    if lo == hi {
                        lo.to_string()
                    } else {
                        format!("{lo}-{hi}")
                    }
                })
                .collect();
            write!(f, ", ports {}", list.join(","))?;
        }
        if let Some(hc) = &self.hc {
            write!(f, ", hc {hc}")?;
        }
        f.write_str(")")
    }
}

/// Why the policy refuses an endpoint: for logs, status and the sender.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Denial {
    /// What was asked: `host:port`, and the address when a resolved address
    /// was refused.
    pub asked: String,
    /// Which rule refused it, or why no rule allowed it.
    pub reason: String,
}

impl fmt::Display for Denial {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "on-prem policy refuses {}: {}", self.asked, self.reason)
    }
}

/// Where a policy came from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PolicySource {
    /// The built-in default (no file).
    BuiltIn,
    /// A file.
    File(PathBuf),
}

/// A parsed policy.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Policy {
    rules: Vec<Rule>,
    source: PolicySource,
}

/// Addresses reached only through a rule that names the host exactly.
fn is_special(ip: IpAddr) -> Option<&'static str> {
    match ip {
        IpAddr::V4(v4) if v4.is_loopback() => Some("a loopback address"),
        IpAddr::V4(v4) if v4.is_link_local() => Some("a link-local address"),
        IpAddr::V4(v4) if v4.is_unspecified() => Some("the unspecified address"),
        IpAddr::V4(v4) if v4.is_multicast() || v4.is_broadcast() => {
            Some("a multicast or broadcast address")
        }
        IpAddr::V6(v6) if v6.is_loopback() => Some("a loopback address"),
        IpAddr::V6(v6) if v6.is_unicast_link_local() => Some("a link-local address"),
        IpAddr::V6(v6) if v6.is_unspecified() => Some("the unspecified address"),
        IpAddr::V6(v6) if v6.is_multicast() => Some("a multicast address"),
        IpAddr::V6(v6) => v6
            .to_ipv4_mapped()
            .and_then(|v4| is_special(IpAddr::V4(v4))),
        IpAddr::V4(_) => None,
    }
}

impl Policy {
    /// The policy of an agent without a policy file: every host and port
    /// through a wildcard, so never a loopback, link-local or unspecified
    /// address.
    pub fn built_in() -> Policy {
        Policy {
            rules: vec![Rule {
                action: Action::Allow,
                index: 1,
                host: HostPattern::Any,
                ports: None,
                hc: None,
            }],
            source: PolicySource::BuiltIn,
        }
    }

    /// Parses a policy file's text.
    pub fn parse(text: &str, path: &Path) -> Result<Policy, PolicyError> {
        let parse_err = |message: String| PolicyError::Parse {
            path: path.to_path_buf(),
            message,
        };
        let raw: PolicyText = toml::from_str(text).map_err(|e| parse_err(e.to_string()))?;
        let mut rules = Vec::new();
        for (action, list) in [(Action::Deny, &raw.deny), (Action::Allow, &raw.allow)] {
            for (i, r) in list.iter().enumerate() {
                let kind = if action == Action::Allow {
                    "allow"
                } else {
                    "deny"
                };
                let at = |m: String| parse_err(format!("{kind} rule #{}: {m}", i + 1));
                let host = HostPattern::parse(&r.host).map_err(at)?;
                let ports = r
                    .ports
                    .as_deref()
                    .map(parse_ports)
                    .transpose()
                    .map_err(at)?;
                let hc =
                    r.hc.as_deref()
                        .map(|h| h.parse::<HcName>().map_err(|e| e.to_string()))
                        .transpose()
                        .map_err(at)?;
                rules.push(Rule {
                    action,
                    index: i + 1,
                    host,
                    ports,
                    hc,
                });
            }
        }
        Ok(Policy {
            rules,
            source: PolicySource::File(path.to_path_buf()),
        })
    }

    /// Reads a policy file.
    pub fn load(path: &Path) -> Result<Policy, PolicyError> {
        let text = std::fs::read_to_string(path).map_err(|source| PolicyError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Policy::parse(&text, path)
    }

    /// Where this policy came from.
    pub fn source(&self) -> &PolicySource {
        &self.source
    }

    /// The rules, deny rules first.
    pub fn rules(&self) -> &[Rule] {
        &self.rules
    }

    /// Checks an endpoint as the relay announced it, before resolving it.
    /// On success returns the allow rule that matched.
    pub fn check_endpoint(&self, hc: &HcName, endpoint: &Endpoint) -> Result<&Rule, Denial> {
        let host = endpoint.host().to_string();
        let port = endpoint.port();
        let denial = |reason: String| Denial {
            asked: endpoint.to_string(),
            reason,
        };
        let matching = |r: &&Rule| r.applies(hc, port) && r.host.matches_host(&host);
        if let Some(rule) = self
            .rules
            .iter()
            .filter(|r| r.action == Action::Deny)
            .find(matching)
        {
            return Err(denial(format!("{rule} matches it")));
        }
        // A rule naming the host exactly is preferred to a wildcard: only
        // it may lead to the special addresses.
        let allows = || self.rules.iter().filter(|r| r.action == Action::Allow);
        let allowed = allows()
            .filter(|r| r.host.is_exact())
            .find(matching)
            .or_else(|| allows().find(matching))
            .ok_or_else(|| denial(format!("no rule allows it for {hc}")))?;
        // An address literal is checked as an address at once.
        if let Ok(ip) = host.parse::<IpAddr>() {
            self.check_address(hc, endpoint, allowed, ip)?;
        }
        Ok(allowed)
    }

    /// Checks one address `endpoint` resolved to, given the allow rule that
    /// let the endpoint through.
    pub fn check_address(
        &self,
        hc: &HcName,
        endpoint: &Endpoint,
        allowed_by: &Rule,
        ip: IpAddr,
    ) -> Result<(), Denial> {
        let port = endpoint.port();
        let asked = if endpoint.host().to_string() == ip.to_string() {
            endpoint.to_string()
        } else {
            format!("{endpoint} (resolved to {ip})")
        };
        if let Some(rule) = self.rules.iter().find(|r| {
            r.action == Action::Deny
                && r.applies(hc, port)
                && matches!(&r.host, HostPattern::Net(net) if net.contains(&ip))
        }) {
            return Err(Denial {
                asked,
                reason: format!("{rule} matches {ip}"),
            });
        }
        if let Some(kind) = is_special(ip)
            && !allowed_by.host.is_exact()
        {
            return Err(Denial {
                asked,
                reason: format!(
                    "{ip} is {kind}, which only a rule naming this host exactly may reach ({allowed_by} is a wildcard)"
                ),
            });
        }
        Ok(())
    }

    /// A one-line description for logs and status.
    pub fn describe(&self) -> String {
        match &self.source {
            PolicySource::BuiltIn => {
                "built-in (no policy file): any host and port except loopback, link-local and unspecified addresses".into()
            }
            PolicySource::File(path) => format!("{} ({} rules)", path.display(), self.rules.len()),
        }
    }
}

/// Reads the policy file's text as rules to edit (an absent file is empty).
pub fn read_text(path: &Path) -> Result<PolicyText, PolicyError> {
    match std::fs::read_to_string(path) {
        Ok(text) => {
            // Validate the whole file, not only its shape.
            Policy::parse(&text, path)?;
            toml::from_str(&text).map_err(|e| PolicyError::Parse {
                path: path.to_path_buf(),
                message: e.to_string(),
            })
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(PolicyText::default()),
        Err(source) => Err(PolicyError::Read {
            path: path.to_path_buf(),
            source,
        }),
    }
}

/// The header every policy file written by hybridlink starts with.
pub const HEADER: &str = "\
# hybridlink agent policy: the only endpoints this agent may ever dial.
# Owned by the on-prem administrator; the relay cannot change it.
# A stream is allowed when no [[deny]] rule matches and an [[allow]] rule does.
# host: a name, a wildcard (*.corp, *), an address or a CIDR; ports: e.g.
# [80, \"8000-8100\"] (every port when left out); hc: one hybrid connection
# (all when left out). Loopback, link-local and unspecified addresses are
# reached only through a rule that names the host exactly.
# Edit with `hybridlink agent allow|deny`, or by hand; the agent rereads it.
";

/// Writes `text` to `path` atomically (0644 under the usual umask), after
/// checking that it parses.
pub fn write_text(path: &Path, text: &PolicyText) -> Result<(), PolicyError> {
    let body = toml::to_string(text).map_err(|e| PolicyError::Parse {
        path: path.to_path_buf(),
        message: e.to_string(),
    })?;
    let full = format!("{HEADER}\n{body}");
    Policy::parse(&full, path)?;
    AtomicFile::new(path)
        .create_dir()
        .write(full.as_bytes())
        .map_err(|source| PolicyError::Write {
            path: path.to_path_buf(),
            source,
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hc(s: &str) -> HcName {
        s.parse().unwrap()
    }

    fn ep(s: &str) -> Endpoint {
        s.parse().unwrap()
    }

    fn policy(text: &str) -> Policy {
        Policy::parse(text, Path::new("policy.toml")).unwrap()
    }

    #[test]
    fn exact_names_wildcards_cidrs_ports_and_hcs() {
        let p = policy(
            r#"
            [[allow]]
            host = "payroll.corp"
            ports = [80]
            hc = "payroll"
            [[allow]]
            host = "*.lab.corp"
            ports = ["8000-8100"]
            [[allow]]
            host = "198.18.0.0/15"
            [[deny]]
            host = "198.18.9.9"
            "#,
        );
        let ok = |h: &str, e: &str| p.check_endpoint(&hc(h), &ep(e)).is_ok();
        assert!(ok("payroll", "payroll.corp:80"));
        assert!(ok("payroll", "PAYROLL.corp:80"));
        assert!(!ok("payroll", "payroll.corp:81"), "another port");
        assert!(!ok("other", "payroll.corp:80"), "another hybrid connection");
        assert!(ok("any", "web.lab.corp:8080"));
        assert!(ok("any", "a.b.lab.corp:8100"));
        assert!(!ok("any", "lab.corp:8080"), "the suffix itself");
        assert!(!ok("any", "evil-lab.corp:8080"));
        assert!(!ok("any", "web.lab.corp:8101"));
        assert!(ok("any", "198.19.1.1:22"));
        assert!(!ok("any", "10.0.0.1:22"));
        let denied = p
            .check_endpoint(&hc("any"), &ep("198.18.9.9:80"))
            .unwrap_err();
        assert!(denied.reason.contains("deny rule #1"), "{denied}");
        assert_eq!(denied.asked, "198.18.9.9:80");
        let none = p.check_endpoint(&hc("x"), &ep("10.0.0.1:22")).unwrap_err();
        assert!(none.to_string().contains("no rule allows it"), "{none}");
    }

    #[test]
    fn special_addresses_need_a_rule_naming_them_exactly() {
        let builtin = Policy::built_in();
        for e in [
            "127.0.0.1:18099",
            "169.254.169.254:80",
            "0.0.0.0:80",
            "224.0.0.1:80",
        ] {
            let d = builtin.check_endpoint(&hc("web"), &ep(e)).unwrap_err();
            assert!(
                d.reason.contains("only a rule naming this host exactly"),
                "{e}: {d}"
            );
        }
        assert!(
            builtin
                .check_endpoint(&hc("web"), &ep("198.18.0.5:80"))
                .is_ok()
        );
        // A name that resolves into loopback through the wildcard is refused.
        let rule = builtin
            .check_endpoint(&hc("web"), &ep("evil.example:80"))
            .unwrap();
        let d = builtin
            .check_address(
                &hc("web"),
                &ep("evil.example:80"),
                rule,
                "127.0.0.1".parse().unwrap(),
            )
            .unwrap_err();
        assert_eq!(d.asked, "evil.example:80 (resolved to 127.0.0.1)");
        // A rule that names the host exactly may reach it.
        let p = policy(
            "[[allow]]\nhost = \"payroll.corp\"\nports = [80]\n[[allow]]\nhost = \"127.0.0.1\"\nports = [5432]\n",
        );
        let rule = p
            .check_endpoint(&hc("web"), &ep("payroll.corp:80"))
            .unwrap();
        assert!(
            p.check_address(
                &hc("web"),
                &ep("payroll.corp:80"),
                rule,
                "127.0.0.1".parse().unwrap()
            )
            .is_ok()
        );
        assert!(p.check_endpoint(&hc("web"), &ep("127.0.0.1:5432")).is_ok());
        assert!(
            p.check_endpoint(&hc("web"), &ep("127.0.0.1:18099"))
                .is_err()
        );
    }

    #[test]
    fn an_exact_rule_wins_over_an_earlier_wildcard() {
        let p =
            policy("[[allow]]\nhost = \"*\"\n[[allow]]\nhost = \"localhost\"\nports = [8080]\n");
        let rule = p.check_endpoint(&hc("web"), &ep("localhost:8080")).unwrap();
        assert_eq!(rule.host, HostPattern::Name("localhost".into()));
        let loopback = "127.0.0.1".parse().unwrap();
        assert!(
            p.check_address(&hc("web"), &ep("localhost:8080"), rule, loopback)
                .is_ok()
        );
        let rule = p.check_endpoint(&hc("web"), &ep("localhost:8081")).unwrap();
        assert!(
            p.check_address(&hc("web"), &ep("localhost:8081"), rule, loopback)
                .is_err()
        );
    }

    #[test]
    fn a_deny_cidr_refuses_what_a_name_resolves_to() {
        let p = policy("[[allow]]\nhost = \"*.corp\"\n[[deny]]\nhost = \"10.9.0.0/16\"\n");
        let rule = p.check_endpoint(&hc("web"), &ep("db.corp:5432")).unwrap();
        let d = p
            .check_address(
                &hc("web"),
                &ep("db.corp:5432"),
                rule,
                "10.9.1.2".parse().unwrap(),
            )
            .unwrap_err();
        assert!(d.reason.contains("deny rule #1"), "{d}");
        assert!(
            p.check_address(
                &hc("web"),
                &ep("db.corp:5432"),
                rule,
                "10.8.1.2".parse().unwrap()
            )
            .is_ok()
        );
    }

    #[test]
    fn bad_files_say_what_is_wrong() {
        let err = |t: &str| {
            Policy::parse(t, Path::new("p.toml"))
                .unwrap_err()
                .to_string()
        };
        assert!(err("[[allow]]\nhost = \"bad host!\"\n").contains("allow rule #1"));
        assert!(err("[[allow]]\nhost = \"a.corp\"\nports = [\"9-1\"]\n").contains("ports entry"));
        assert!(err("[[allow]]\nhost = \"a.corp\"\nports = [0]\n").contains("port 0"));
        assert!(err("[[allow]]\nhost = \"a.corp\"\nhc = \"Bad Name\"\n").contains("allow rule #1"));
        assert!(err("[[allow]]\nhots = \"a.corp\"\n").contains("p.toml"));
        assert!(err("[[permit]]\nhost = \"a\"\n").contains("p.toml"));
        // An empty file allows nothing.
        let empty = policy("");
        assert!(empty.check_endpoint(&hc("web"), &ep("a.corp:80")).is_err());
    }

    #[test]
    fn written_files_read_back_the_same() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("policy.toml");
        let mut text = read_text(&path).unwrap();
        assert_eq!(text, PolicyText::default());
        text.allow.push(RuleText {
            host: "payroll.corp".into(),
            ports: Some(vec![PortSpec::One(80)]),
            hc: Some("payroll".into()),
        });
        write_text(&path, &text).unwrap();
        assert_eq!(read_text(&path).unwrap(), text);
        let p = Policy::load(&path).unwrap();
        assert!(
            p.check_endpoint(&hc("payroll"), &ep("payroll.corp:80"))
                .is_ok()
        );
        assert!(
            std::fs::read_to_string(&path)
                .unwrap()
                .starts_with("# hybridlink agent policy")
        );
    }
}
