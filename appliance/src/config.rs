//! The appliance's configuration: a TOML file, or the same settings from the
//! command line. Parsed once into types that cannot hold an invalid value.
//!
//! ```toml
//! # /etc/hybridlink/appliance.toml
//! connection_strings = [
//!   "Endpoint=sb://relay.example:9443/;SharedAccessKeyName=send;SharedAccessKey=...;EntityPath=payroll;CertificateSha256=...",
//! ]
//! virtual_range = "127.77.0.0/16"   # where host names resolve to
//! tun = "hl0"
//! mtu = 65535
//! dns_listen = "127.0.0.53:53"
//! state_dir = "/var/lib/hybridlink-appliance"
//! # which endpoints the relay may make this host answer and route
//! # (names, .suffixes, IPv4 networks; see `allow`)
//! allow = ["payroll.corp", ".corp", "10.4.0.0/16"]
//! # strings without CertificateSha256 go over Azure Relay's protocol,
//! # whose relay names no endpoint: the config does, and `allow` applies
//! ca_file = "/etc/hybridlink/relay-ca.pem"   # default: the system's roots
//! max_flows = 65536   # TCP connections held at once through the tun
//! [endpoints]
//! payroll = "payroll.corp:1433"
//! ```

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::str::FromStr;

use proto::connection_string::ConnectionString;
use proto::name::{Endpoint, HcName};
use serde::Deserialize;

use crate::allow::{AllowError, AllowList};
use crate::virtual_range::{VirtualRange, VirtualRangeError};

/// Why a configuration could not be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read the appliance config {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// The file is not valid TOML of the expected shape.
    #[error("the appliance config {path} is not valid: {message}")]
    Syntax {
        /// The file.
        path: PathBuf,
        /// What the TOML parser said (with line and column).
        message: String,
    },
    /// A connection string did not parse.
    #[error("connection string #{index} in the appliance config: {message}")]
    ConnectionString {
        /// Its 1-based position.
        index: usize,
        /// The parser's message, which names the field.
        message: String,
    },
    /// A send string was expected.
    #[error(
        "connection string for {0} uses rule {1:?}; the appliance needs send connection strings (`hybridlink hc keys NAME`)"
    )]
    NotSend(String, String),
    /// No connection string at all.
    #[error(
        "no connection string: give --connection-string or a config file with connection_strings"
    )]
    Empty,
    /// The virtual range is unusable.
    #[error("virtual_range {0}")]
    Range(#[from] VirtualRangeError),
    /// A name for the tun device that Linux would refuse.
    #[error("tun name {0:?} must be 1 to 15 characters of letters, digits, '-' or '_'")]
    TunName(String),
    /// A flow limit of zero or past [`MAX_FLOWS_LIMIT`].
    #[error(
        "max_flows = {0}: give 1 to {MAX_FLOWS_LIMIT}; each connection held costs the appliance about 10 to 25 KiB when idle and reserves 1 MiB of TCP buffers, resident only as data passes (default {DEFAULT_MAX_FLOWS})"
    )]
    MaxFlows(i64),
    /// An entry of `allow` did not parse.
    #[error("in `allow` of the appliance config: {0}")]
    Allow(#[from] AllowError),
    /// An entry of `endpoints` did not parse.
    #[error("in `endpoints` of the appliance config: {name} = {value:?}: {message}")]
    EndpointSyntax {
        /// The key.
        name: String,
        /// The value.
        value: String,
        /// What is wrong.
        message: String,
    },
    /// A string over Azure Relay's protocol with no endpoint.
    #[error(
        "{0}: its connection string has no CertificateSha256, so it goes over Azure Relay's protocol, whose relay names no endpoint: give one (`--endpoint {0}=HOST:PORT`, or `{0} = \"HOST:PORT\"` under [endpoints] in the config)"
    )]
    NoEndpoint(HcName),
    /// An endpoint for a hybrid connection that is not served over Azure
    /// Relay's protocol.
    #[error("endpoint {0}={1}: {2}")]
    StrayEndpoint(HcName, Endpoint, &'static str),
}

/// How many TCP connections through the tun the appliance holds at once
/// unless `max_flows` says otherwise: a sender opens up to 16 pipes to an
/// agent of up to 4,096 streams each (`transport::sender`), so one hybrid
/// connection can carry this many.
pub const DEFAULT_MAX_FLOWS: usize = 65_536;

/// The largest `max_flows` accepted.
pub const MAX_FLOWS_LIMIT: usize = 1_048_576;

/// The raw file, as written by a person.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    connection_strings: Vec<String>,
    virtual_range: Option<String>,
    tun: Option<String>,
    mtu: Option<u16>,
    dns_listen: Option<SocketAddr>,
    state_dir: Option<PathBuf>,
    allow: Option<Vec<String>>,
    ca_file: Option<PathBuf>,
    max_flows: Option<i64>,
    endpoints: Option<BTreeMap<String, String>>,
}

/// A validated appliance configuration.
#[derive(Clone, Debug)]
pub struct ApplianceConfig {
    /// Send connection strings, one per hybrid connection.
    pub connection_strings: Vec<ConnectionString>,
    /// Host names resolve to addresses in this range, which is routed into
    /// the tun.
    pub virtual_range: VirtualRange,
    /// The tun device's name.
    pub tun: String,
    /// The tun device's MTU; 65535 is the fastest.
    pub mtu: u16,
    /// Where the DNS server listens (inside the appliance's namespace).
    pub dns_listen: SocketAddr,
    /// Where the name map and the resolv.conf backup live.
    pub state_dir: PathBuf,
    /// The hosts the relay may make this appliance answer and route
    /// (`allow` in the file). `None`: each hybrid connection's first
    /// announced host (see `gate::AllowSource::FirstAnnouncement`).
    pub allow: Option<AllowList>,
    /// The endpoint of each hybrid connection reached over Azure Relay's
    /// protocol (a string without `CertificateSha256`), whose relay names
    /// none.
    pub endpoints: BTreeMap<HcName, Endpoint>,
    /// The CA certificates (PEM) an Azure-protocol relay's certificate must
    /// chain to; `None`: the system's roots.
    pub ca_file: Option<PathBuf>,
    /// Most TCP connections through the tun held at once (`max_flows` in
    /// the file); a connection past it is refused with a reset.
    pub max_flows: usize,
}

impl ApplianceConfig {
    /// A configuration with defaults for everything but the strings.
    pub fn new(connection_strings: Vec<ConnectionString>) -> Result<Self, ConfigError> {
        check_strings(&connection_strings)?;
        Ok(ApplianceConfig {
            connection_strings,
            virtual_range: VirtualRange::DEFAULT,
            tun: "hl0".into(),
            mtu: 65535,
            dns_listen: SocketAddr::from((Ipv4Addr::new(127, 0, 0, 53), 53)),
            state_dir: PathBuf::from("/var/lib/hybridlink-appliance"),
            allow: None,
            endpoints: BTreeMap::new(),
            ca_file: None,
            max_flows: DEFAULT_MAX_FLOWS,
        })
    }

    /// Checks that every string over Azure Relay's protocol has an endpoint
    /// and every endpoint belongs to such a string.
    pub fn check_endpoints(&self) -> Result<(), ConfigError> {
        for cs in &self.connection_strings {
            if cs.cert_sha256.is_none() && !self.endpoints.contains_key(&cs.hc) {
                return Err(ConfigError::NoEndpoint(cs.hc.clone()));
            }
        }
        for (hc, endpoint) in &self.endpoints {
            match self.connection_strings.iter().find(|cs| &cs.hc == hc) {
                None => {
                    return Err(ConfigError::StrayEndpoint(
                        hc.clone(),
                        endpoint.clone(),
                        "no connection string for this hybrid connection",
                    ));
                }
                Some(cs) if cs.cert_sha256.is_some() => {
                    return Err(ConfigError::StrayEndpoint(
                        hc.clone(),
                        endpoint.clone(),
                        "its string pins a hybridlink relay (CertificateSha256), which names the endpoint itself",
                    ));
                }
                Some(_) => {}
            }
        }
        Ok(())
    }

    /// Reads and validates a TOML file.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Self::parse(&text, path)
    }

    /// Validates the text of a TOML file; `path` is only for messages.
    pub fn parse(text: &str, path: &Path) -> Result<Self, ConfigError> {
        let raw: RawConfig = toml::from_str(text).map_err(|e| ConfigError::Syntax {
            path: path.to_path_buf(),
            message: e.to_string(),
        })?;
        let strings = raw
            .connection_strings
            .iter()
            .enumerate()
            .map(|(i, s)| {
                ConnectionString::from_str(s).map_err(|e| ConfigError::ConnectionString {
                    index: i + 1,
                    message: e.to_string(),
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        let mut config = ApplianceConfig::new(strings)?;
        if let Some(r) = raw.virtual_range {
            config.virtual_range = parse_range(&r)?;
        }
        if let Some(t) = raw.tun {
            config.tun = check_tun(t)?;
        }
        if let Some(m) = raw.mtu {
            config.mtu = m.max(576);
        }
        if let Some(d) = raw.dns_listen {
            config.dns_listen = d;
        }
        if let Some(s) = raw.state_dir {
            config.state_dir = s;
        }
        if let Some(a) = raw.allow {
            config.allow = Some(AllowList::parse(&a)?);
        }
        config.ca_file = raw.ca_file;
        if let Some(n) = raw.max_flows {
            config.max_flows = parse_max_flows(n)?;
        }
        for (name, value) in raw.endpoints.unwrap_or_default() {
            let bad = |message: String| ConfigError::EndpointSyntax {
                name: name.clone(),
                value: value.clone(),
                message,
            };
            let hc = name.parse::<HcName>().map_err(|e| bad(e.to_string()))?;
            let endpoint = value.parse::<Endpoint>().map_err(|e| bad(e.to_string()))?;
            config.endpoints.insert(hc, endpoint);
        }
        config.check_endpoints()?;
        Ok(config)
    }
}

impl ApplianceConfig {
    /// The config as a TOML file: the strings, and every other key that is
    /// not at its default. [`ApplianceConfig::parse`] reads it back as is.
    pub fn to_toml(&self) -> Result<String, ConfigError> {
        let defaults = ApplianceConfig::new(self.connection_strings.clone())?;
        let quote = |s: &str| format!("\"{}\"", s.replace('\\', "\\\\").replace('"', "\\\""));
        let mut out = String::from("connection_strings = [\n");
        for cs in &self.connection_strings {
            out.push_str(&format!("  {},\n", quote(&cs.to_string())));
        }
        out.push_str("]\n");
        if self.virtual_range != defaults.virtual_range {
            out.push_str(&format!(
                "virtual_range = {}\n",
                quote(&self.virtual_range.to_string())
            ));
        }
        if self.tun != defaults.tun {
            out.push_str(&format!("tun = {}\n", quote(&self.tun)));
        }
        if self.mtu != defaults.mtu {
            out.push_str(&format!("mtu = {}\n", self.mtu));
        }
        if self.dns_listen != defaults.dns_listen {
            out.push_str(&format!(
                "dns_listen = {}\n",
                quote(&self.dns_listen.to_string())
            ));
        }
        if self.state_dir != defaults.state_dir {
            out.push_str(&format!(
                "state_dir = {}\n",
                quote(&self.state_dir.display().to_string())
            ));
        }
        if let Some(allow) = &self.allow {
            out.push_str("allow = [\n");
            for entry in allow.entries() {
                out.push_str(&format!("  {},\n", quote(&entry.to_string())));
            }
            out.push_str("]\n");
        }
        if let Some(ca) = &self.ca_file {
            out.push_str(&format!("ca_file = {}\n", quote(&ca.display().to_string())));
        }
        if self.max_flows != defaults.max_flows {
            out.push_str(&format!("max_flows = {}\n", self.max_flows));
        }
        // A table comes last: every key after it would belong to it.
        if !self.endpoints.is_empty() {
            out.push_str("[endpoints]\n");
            for (hc, endpoint) in &self.endpoints {
                out.push_str(&format!(
                    "{} = {}\n",
                    quote(hc.as_str()),
                    quote(&endpoint.to_string())
                ));
            }
        }
        Ok(out)
    }
}

fn check_strings(strings: &[ConnectionString]) -> Result<(), ConfigError> {
    if strings.is_empty() {
        return Err(ConfigError::Empty);
    }
    for cs in strings {
        if cs.key_name == "listen" || cs.key_name == "manage" {
            return Err(ConfigError::NotSend(cs.hc.to_string(), cs.key_name.clone()));
        }
    }
    Ok(())
}

/// Parses `virtual_range` as written in the file or on the command line.
pub fn parse_range(s: &str) -> Result<VirtualRange, ConfigError> {
    Ok(s.parse()?)
}

/// Checks `max_flows` as written in the file.
pub fn parse_max_flows(n: i64) -> Result<usize, ConfigError> {
    match usize::try_from(n) {
        Ok(n) if (1..=MAX_FLOWS_LIMIT).contains(&n) => Ok(n),
        _ => Err(ConfigError::MaxFlows(n)),
    }
}

/// Checks a tun device name.
pub fn check_tun(name: String) -> Result<String, ConfigError> {
    let ok = !name.is_empty()
        && name.len() <= 15
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
    if ok {
        Ok(name)
    } else {
        Err(ConfigError::TunName(name))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CS: &str = "Endpoint=sb://127.0.0.1:9443/;SharedAccessKeyName=send;SharedAccessKey=Q2hhbmdlTWUtdGhpcy1pcy1hLXRlc3Qta2V5LTAwMDE=;EntityPath=payroll;CertificateSha256=86c1c84aa76199659d205375087f92c891470d3cc71eb8b9ef3f5af42a222551";

    #[test]
    fn a_full_file_parses_and_defaults_fill_the_rest() {
        let text = format!(
            "connection_strings = [\"{CS}\"]\nvirtual_range = \"127.78.0.0/24\"\ntun = \"hl9\"\n"
        );
        let c = ApplianceConfig::parse(&text, Path::new("a.toml")).unwrap();
        assert_eq!(c.connection_strings.len(), 1);
        assert_eq!(c.virtual_range.to_string(), "127.78.0.0/24");
        assert_eq!(c.tun, "hl9");
        assert_eq!(c.mtu, 65535);
        assert_eq!(c.dns_listen, "127.0.0.53:53".parse().unwrap());
    }

    #[test]
    fn max_flows_is_read_and_bad_values_say_what_to_give() {
        let p = Path::new("a.toml");
        let file = |v: &str| format!("connection_strings = [\"{CS}\"]\nmax_flows = {v}\n");
        let c = ApplianceConfig::parse(&file("100000"), p).unwrap();
        assert_eq!(c.max_flows, 100_000);
        let back = ApplianceConfig::parse(&c.to_toml().unwrap(), p).unwrap();
        assert_eq!(back.max_flows, 100_000);
        let c = ApplianceConfig::parse(&format!("connection_strings = [\"{CS}\"]"), p).unwrap();
        assert_eq!(c.max_flows, DEFAULT_MAX_FLOWS);
        for bad in ["0", "-5", "1048577", "99999999999"] {
            let err = ApplianceConfig::parse(&file(bad), p).unwrap_err();
            assert!(
                matches!(err, ConfigError::MaxFlows(_))
                    && err
                        .to_string()
                        .contains(&format!("max_flows = {bad}: give 1 to 1048576")),
                "{bad}: {err}"
            );
        }
        let err = ApplianceConfig::parse(&file("\"many\""), p).unwrap_err();
        assert!(
            matches!(&err, ConfigError::Syntax { message, .. } if message.contains("max_flows")),
            "{err}"
        );
    }

    #[test]
    fn written_configs_read_back_the_same() {
        let mut c = ApplianceConfig::new(vec![CS.parse().unwrap()]).unwrap();
        let text = c.to_toml().unwrap();
        assert!(!text.contains("tun"), "defaults are left out: {text}");
        c.tun = "hl7".into();
        c.state_dir = PathBuf::from("/var/lib/a \"b\"");
        c.virtual_range = parse_range("127.78.0.0/24").unwrap();
        let back = ApplianceConfig::parse(&c.to_toml().unwrap(), Path::new("a.toml")).unwrap();
        assert_eq!(back.allow, None, "no list is not an empty list");
        c.allow = Some(AllowList::parse(&["payroll.corp", ".corp", "10.4.0.0/16"]).unwrap());
        let back = ApplianceConfig::parse(&c.to_toml().unwrap(), Path::new("a.toml")).unwrap();
        assert_eq!(back.allow, c.allow);
        assert_eq!(back.tun, "hl7");
        assert_eq!(back.state_dir, c.state_dir);
        assert_eq!(back.virtual_range, c.virtual_range);
        assert_eq!(back.connection_strings[0].to_string(), CS);
    }

    #[test]
    fn azure_protocol_strings_take_their_endpoints_and_ca_from_the_file() {
        let p = Path::new("a.toml");
        let azure = CS.split(";CertificateSha256").next().unwrap();
        let text = format!(
            "connection_strings = [\"{azure}\", \"{}\"]\nca_file = \"/etc/ca.pem\"\n[endpoints]\npayroll = \"sql.corp:1433\"\n",
            CS.replace("EntityPath=payroll", "EntityPath=native")
        );
        let c = ApplianceConfig::parse(&text, p).unwrap();
        let payroll: HcName = "payroll".parse().unwrap();
        assert_eq!(c.endpoints[&payroll].to_string(), "sql.corp:1433");
        assert_eq!(c.ca_file.as_deref(), Some(Path::new("/etc/ca.pem")));
        let back = ApplianceConfig::parse(&c.to_toml().unwrap(), p).unwrap();
        assert_eq!(back.endpoints, c.endpoints);
        assert_eq!(back.ca_file, c.ca_file);

        // Without its endpoint an Azure-protocol string is refused, saying
        // how to give one.
        let err =
            ApplianceConfig::parse(&format!("connection_strings = [\"{azure}\"]"), p).unwrap_err();
        assert!(
            matches!(&err, ConfigError::NoEndpoint(hc) if hc == &payroll)
                && err.to_string().contains("[endpoints]"),
            "{err}"
        );
        // An endpoint for a pinned string, or for no string, is a mistake.
        let err = ApplianceConfig::parse(
            &format!("connection_strings = [\"{CS}\"]\n[endpoints]\npayroll = \"a.corp:1\"\n"),
            p,
        )
        .unwrap_err();
        assert!(
            err.to_string().contains("names the endpoint itself"),
            "{err}"
        );
        let err = ApplianceConfig::parse(
            &format!("connection_strings = [\"{azure}\"]\n[endpoints]\npayroll = \"a.corp:1\"\nother = \"b.corp:2\"\n"),
            p,
        )
        .unwrap_err();
        assert!(err.to_string().contains("no connection string"), "{err}");
        let err = ApplianceConfig::parse(
            &format!("connection_strings = [\"{azure}\"]\n[endpoints]\npayroll = \"a.corp\"\n"),
            p,
        )
        .unwrap_err();
        assert!(matches!(err, ConfigError::EndpointSyntax { .. }), "{err}");
    }

    #[test]
    fn bad_files_say_what_is_wrong() {
        let p = Path::new("a.toml");
        let err = ApplianceConfig::parse("connection_strings = [\"Endpoint=x\"]", p).unwrap_err();
        assert!(err.to_string().contains("connection string #1"), "{err}");
        let err = ApplianceConfig::parse("connection_strings = []", p).unwrap_err();
        assert!(matches!(err, ConfigError::Empty));
        let err =
            ApplianceConfig::parse(&format!("connection_strings = [\"{CS}\"]\ncolour = 1"), p)
                .unwrap_err();
        assert!(err.to_string().contains("colour"), "{err}");
        let err = ApplianceConfig::parse(
            &format!("connection_strings = [\"{CS}\"]\nvirtual_range = \"10.0.0.0/31\""),
            p,
        )
        .unwrap_err();
        assert!(matches!(err, ConfigError::Range(_)), "{err}");
        let err = ApplianceConfig::parse(
            &format!("connection_strings = [\"{CS}\"]\ntun = \"a/b\""),
            p,
        )
        .unwrap_err();
        assert!(matches!(err, ConfigError::TunName(_)), "{err}");
        let err = ApplianceConfig::parse(
            &format!("connection_strings = [\"{CS}\"]\nallow = [\"10.0.0.1/8\"]"),
            p,
        )
        .unwrap_err();
        assert!(err.to_string().contains("did you mean 10.0.0.0/8"), "{err}");
        let listen = CS.replace("SharedAccessKeyName=send", "SharedAccessKeyName=listen");
        let err =
            ApplianceConfig::parse(&format!("connection_strings = [\"{listen}\"]"), p).unwrap_err();
        assert!(matches!(err, ConfigError::NotSend(..)), "{err}");
    }
}
