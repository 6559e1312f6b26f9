//! Connection strings: everything a client needs to reach one hybrid
//! connection through a relay, in the shape Azure Relay uses:
//!
//! ```text
//! Endpoint=sb://relay.example:9443/;SharedAccessKeyName=send;SharedAccessKey=<base64>;EntityPath=payroll;CertificateSha256=<64 hex>
//! ```
//!
//! Parsing accepts the pairs in any order, with keys in any case, whitespace
//! around pairs, and a trailing `;`. Unknown keys are rejected (a misspelt
//! `CertificateSha256` must not silently turn off pinning). The port in
//! `Endpoint` is required. `CertificateSha256` (the SHA-256 of the relay's
//! DER certificate, as 64 hex digits, `:` separators allowed) is optional:
//! a relay with a CA-issued certificate omits it.
//!
//! `EndToEndKey` is hybridlink's own, optional field: the hybrid
//! connection's end-to-end key (see [`crate::e2e`]). The relay never makes
//! or sees it: `hybridlink agent install` makes it on the on-prem side, and a
//! person adds it to the send string on the app side.
//!
//! [`ConnectionString`]'s `Display` prints the canonical form, and parsing
//! that gives back an equal value.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::key::{Key, KeyError};
use crate::name::{HcName, Host, NameError, parse_port};
use crate::sas;

/// Longest connection string accepted, in bytes. Real ones are about 250.
pub const CONNECTION_STRING_MAX_LEN: usize = 4096;

const ENDPOINT: &str = "Endpoint";
const KEY_NAME: &str = "SharedAccessKeyName";
const KEY: &str = "SharedAccessKey";
const ENTITY_PATH: &str = "EntityPath";
const CERT_SHA256: &str = "CertificateSha256";
const END_TO_END_KEY: &str = "EndToEndKey";

/// Why a connection string was rejected. Each message names the field and
/// says what to do.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum ConnectionStringError {
    /// The string is longer than [`CONNECTION_STRING_MAX_LEN`].
    #[error(
        "connection string is {len} bytes long, more than 4096; copy it again with `hybridlink hc keys NAME`"
    )]
    TooLong {
        /// Length of the rejected string.
        len: usize,
    },
    /// A `;`-separated part has no `=`.
    #[error(
        "connection string part {part:?} is not of the form Name=Value; copy it again with `hybridlink hc keys NAME`"
    )]
    NotAPair {
        /// The start of the offending part.
        part: String,
    },
    /// A key other than the five known ones.
    #[error(
        "connection string has an unknown field {field:?}; the fields are Endpoint, SharedAccessKeyName, SharedAccessKey, EntityPath, CertificateSha256 and EndToEndKey"
    )]
    UnknownField {
        /// The unknown key.
        field: String,
    },
    /// The same field twice.
    #[error("connection string has {field} twice; keep one")]
    DuplicateField {
        /// The repeated field.
        field: &'static str,
    },
    /// No `Endpoint`.
    #[error("connection string has no Endpoint; copy it again with `hybridlink hc keys NAME`")]
    MissingEndpoint,
    /// `Endpoint` is not `sb://host:port/`.
    #[error(
        "connection string Endpoint {value:?} is not of the form sb://HOST[:PORT]/ ({reason}); copy it again with `hybridlink hc keys NAME`"
    )]
    BadEndpoint {
        /// The rejected value.
        value: String,
        /// What is wrong with it.
        reason: String,
    },
    /// No `SharedAccessKeyName`.
    #[error(
        "connection string has no SharedAccessKeyName; copy it again with `hybridlink hc keys NAME`"
    )]
    MissingKeyName,
    /// `SharedAccessKeyName` is empty.
    #[error(
        "connection string SharedAccessKeyName is empty; it should be send or listen; copy it again with `hybridlink hc keys NAME`"
    )]
    EmptyKeyName,
    /// No `SharedAccessKey`.
    #[error(
        "connection string has no SharedAccessKey; copy it again with `hybridlink hc keys NAME`"
    )]
    MissingKey,
    /// `SharedAccessKey` is not a valid key.
    #[error("connection string SharedAccessKey is invalid: {0}")]
    BadKey(KeyError),
    /// No `EntityPath`.
    #[error(
        "connection string has no EntityPath (the hybrid connection name): copy it again with `hybridlink hc keys NAME`; a namespace-level string (Azure's RootManageSharedAccessKey) serves any hybrid connection of its namespace once `;EntityPath=NAME` is appended"
    )]
    MissingEntityPath,
    /// `EntityPath` is not a valid HC name.
    #[error("connection string EntityPath is invalid: {0}")]
    BadEntityPath(NameError),
    /// `CertificateSha256` is not 64 hex digits.
    #[error(
        "connection string CertificateSha256 is not 64 hex digits (the SHA-256 of the relay certificate); copy it again with `hybridlink hc keys NAME`, or drop it if the relay has a CA-issued certificate"
    )]
    BadCertificateSha256,
    /// `EndToEndKey` is not a valid key.
    #[error(
        "connection string EndToEndKey is invalid: {0}; copy it again from what `hybridlink agent install` printed on the on-prem host"
    )]
    BadEndToEndKey(KeyError),
    /// `EndToEndKey` is too short to be a 256-bit key.
    #[error(
        "connection string EndToEndKey is {0} characters long; end-to-end keys are 256-bit (44 characters) as `hybridlink agent install` makes them; copy it again"
    )]
    WeakEndToEndKey(usize),
}

/// A parsed connection string: relay address, credentials and the hybrid
/// connection they are for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnectionString {
    /// The relay's host name or IPv4 address (lowercase), as clients dial it.
    pub relay_host: String,
    /// The relay's TLS port.
    pub relay_port: u16,
    /// The rule the key belongs to (`send` or `listen`).
    pub key_name: String,
    /// The key that signs tokens.
    pub key: Key,
    /// The hybrid connection.
    pub hc: HcName,
    /// SHA-256 of the relay's DER certificate, to pin it; `None` when the
    /// relay's certificate is CA-issued and verified the usual way.
    pub cert_sha256: Option<[u8; 32]>,
    /// The hybrid connection's end-to-end key, when the two ends verify each
    /// other without trusting the relay. Never sent to the relay.
    pub end_to_end_key: Option<Key>,
}

impl ConnectionString {
    /// The resource URI tokens for this HC are signed for:
    /// `http://{relay_host}:{relay_port}/{hc}`.
    pub fn resource_uri(&self) -> String {
        format!("http://{}:{}/{}", self.relay_host, self.relay_port, self.hc)
    }

    /// A SAS token for this HC, signed with this string's key, valid until
    /// `expiry_unix` (seconds since the Unix epoch).
    pub fn token(&self, expiry_unix: u64) -> String {
        sas::sign(&self.resource_uri(), &self.key_name, &self.key, expiry_unix)
    }
}

/// The port of an `Endpoint` that names none, as Azure Relay's strings do.
pub const AZURE_PORT: u16 = 443;

fn parse_endpoint(value: &str) -> Result<(String, u16), ConnectionStringError> {
    let bad = |reason: &str| ConnectionStringError::BadEndpoint {
        value: value.to_owned(),
        reason: reason.to_owned(),
    };
    let rest = value
        .get(..5)
        .filter(|scheme| scheme.eq_ignore_ascii_case("sb://"))
        .map(|_| &value[5..])
        .ok_or_else(|| bad("it must start with sb://"))?;
    let authority = rest.strip_suffix('/').unwrap_or(rest);
    if authority.contains('/') {
        return Err(bad("it must have no path"));
    }
    // Azure Relay's strings name no port: its service is on 443.
    let (host, port) = match authority.rsplit_once(':') {
        Some((host, port)) => (host, parse_port(port).map_err(|e| bad(&e.to_string()))?),
        None => (authority, AZURE_PORT),
    };
    let host: Host = host.parse().map_err(|e: NameError| bad(&e.to_string()))?;
    Ok((host.to_string(), port))
}

fn parse_cert_sha256(value: &str) -> Result<[u8; 32], ConnectionStringError> {
    let digits: Vec<u8> = value.bytes().filter(|b| *b != b':').collect();
    if digits.len() != 64 {
        return Err(ConnectionStringError::BadCertificateSha256);
    }
    let mut out = [0u8; 32];
    for (byte, pair) in out.iter_mut().zip(digits.chunks_exact(2)) {
        let hex =
            std::str::from_utf8(pair).map_err(|_| ConnectionStringError::BadCertificateSha256)?;
        *byte =
            u8::from_str_radix(hex, 16).map_err(|_| ConnectionStringError::BadCertificateSha256)?;
    }
    Ok(out)
}

/// Writes `bytes` as lowercase hex (used for `CertificateSha256`).
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

impl FromStr for ConnectionString {
    type Err = ConnectionStringError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        use ConnectionStringError as E;
        if s.len() > CONNECTION_STRING_MAX_LEN {
            return Err(E::TooLong { len: s.len() });
        }
        let mut fields: [Option<&str>; 6] = [None; 6];
        let names = [
            ENDPOINT,
            KEY_NAME,
            KEY,
            ENTITY_PATH,
            CERT_SHA256,
            END_TO_END_KEY,
        ];
        for part in s.split(';').map(str::trim).filter(|p| !p.is_empty()) {
            let (name, value) = part.split_once('=').ok_or_else(|| E::NotAPair {
                part: part.chars().take(40).collect(),
            })?;
            let name = name.trim();
            let index = names
                .iter()
                .position(|known| known.eq_ignore_ascii_case(name))
                .ok_or_else(|| E::UnknownField {
                    field: name.chars().take(40).collect(),
                })?;
            if fields[index].replace(value.trim()).is_some() {
                return Err(E::DuplicateField {
                    field: names[index],
                });
            }
        }
        let [endpoint, key_name, key, hc, cert, end_to_end] = fields;
        let (relay_host, relay_port) = parse_endpoint(endpoint.ok_or(E::MissingEndpoint)?)?;
        let key_name = key_name.ok_or(E::MissingKeyName)?;
        if key_name.is_empty() {
            return Err(E::EmptyKeyName);
        }
        let key = key.ok_or(E::MissingKey)?.parse().map_err(E::BadKey)?;
        let hc = hc
            .ok_or(E::MissingEntityPath)?
            .parse()
            .map_err(E::BadEntityPath)?;
        let cert_sha256 = cert.map(parse_cert_sha256).transpose()?;
        let end_to_end_key = end_to_end
            .map(|k| {
                if k.len() < 43 {
                    return Err(E::WeakEndToEndKey(k.len()));
                }
                k.parse().map_err(E::BadEndToEndKey)
            })
            .transpose()?;
        Ok(ConnectionString {
            relay_host,
            relay_port,
            key_name: key_name.to_owned(),
            key,
            hc,
            cert_sha256,
            end_to_end_key,
        })
    }
}

impl fmt::Display for ConnectionString {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{ENDPOINT}=sb://{}:{}/;{KEY_NAME}={};{KEY}={};{ENTITY_PATH}={}",
            self.relay_host,
            self.relay_port,
            self.key_name,
            self.key.as_str(),
            self.hc
        )?;
        if let Some(sha) = &self.cert_sha256 {
            write!(f, ";{CERT_SHA256}={}", hex(sha))?;
        }
        if let Some(key) = &self.end_to_end_key {
            write!(f, ";{END_TO_END_KEY}={}", key.as_str())?;
        }
        Ok(())
    }
}

impl Serialize for ConnectionString {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for ConnectionString {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let s = String::deserialize(deserializer)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY_TEXT: &str = "Q2hhbmdlTWUtdGhpcy1pcy1hLXRlc3Qta2V5LTAwMDE=";
    const SHA: &str = "00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff";

    fn canonical() -> String {
        format!(
            "Endpoint=sb://relay.example:9443/;SharedAccessKeyName=send;SharedAccessKey={KEY_TEXT};EntityPath=payroll;CertificateSha256={SHA}"
        )
    }

    fn err(s: &str) -> ConnectionStringError {
        s.parse::<ConnectionString>().unwrap_err()
    }

    #[test]
    fn parses_and_prints_the_canonical_form() {
        let cs: ConnectionString = canonical().parse().unwrap();
        assert_eq!(cs.relay_host, "relay.example");
        assert_eq!(cs.relay_port, 9443);
        assert_eq!(cs.key_name, "send");
        assert_eq!(cs.key.as_str(), KEY_TEXT);
        assert_eq!(cs.hc.as_str(), "payroll");
        let sha = cs.cert_sha256.unwrap();
        assert_eq!(sha[0], 0x00);
        assert_eq!(sha[31], 0xff);
        assert_eq!(cs.to_string(), canonical());
        assert_eq!(cs.to_string().parse::<ConnectionString>().unwrap(), cs);
        let json = serde_json::to_string(&cs).unwrap();
        assert_eq!(serde_json::from_str::<ConnectionString>(&json).unwrap(), cs);
    }

    #[test]
    fn accepts_any_order_case_whitespace_and_trailing_semicolon() {
        let s = format!(
            "  entitypath=Payroll ; ENDPOINT = SB://Relay.Example:9443 ;sharedaccesskey={KEY_TEXT}; SharedAccessKeyName=send;CertificateSha256={};",
            SHA.to_uppercase()
        );
        let cs: ConnectionString = s.parse().unwrap();
        assert_eq!(cs.to_string(), canonical());
    }

    #[test]
    fn an_end_to_end_key_is_kept_and_printed_back() {
        let with = format!("{};EndToEndKey={KEY_TEXT}", canonical());
        let cs: ConnectionString = with.parse().unwrap();
        assert_eq!(cs.end_to_end_key.as_ref().map(Key::as_str), Some(KEY_TEXT));
        assert_eq!(cs.to_string(), with);
        assert_eq!(
            canonical()
                .parse::<ConnectionString>()
                .unwrap()
                .end_to_end_key,
            None
        );
        let bad = err(&format!("{};EndToEndKey={}!", canonical(), "a".repeat(43)));
        assert!(
            matches!(bad, ConnectionStringError::BadEndToEndKey(_)),
            "{bad}"
        );
        assert!(bad.to_string().contains("agent install"), "{bad}");
        let weak = err(&format!("{};EndToEndKey=c2hvcnQ=", canonical()));
        assert_eq!(weak, ConnectionStringError::WeakEndToEndKey(8));
    }

    #[test]
    fn certificate_is_optional_and_may_have_colons() {
        let without = canonical().replace(&format!(";CertificateSha256={SHA}"), "");
        let cs: ConnectionString = without.parse().unwrap();
        assert_eq!(cs.cert_sha256, None);
        assert_eq!(cs.to_string(), without);
        let colons: Vec<String> = SHA
            .as_bytes()
            .chunks(2)
            .map(|c| String::from_utf8(c.to_vec()).unwrap())
            .collect();
        let with_colons = canonical().replace(SHA, &colons.join(":"));
        assert_eq!(
            with_colons.parse::<ConnectionString>().unwrap().to_string(),
            canonical()
        );
    }

    #[test]
    fn resource_uri_and_token() {
        let cs: ConnectionString = canonical().parse().unwrap();
        assert_eq!(cs.resource_uri(), "http://relay.example:9443/payroll");
        assert_eq!(
            cs.token(1_893_456_000),
            "SharedAccessSignature sr=http%3A%2F%2Frelay.example%3A9443%2Fpayroll&sig=Un0ur%2BW0SmunFfsBF2LK9GNvsicOvVvdVL%2B7ws0jCA8%3D&se=1893456000&skn=send"
        );
    }

    #[test]
    fn missing_fields_are_named() {
        use ConnectionStringError as E;
        let drop = |field: &str| {
            canonical()
                .split(';')
                .filter(|p| !p.starts_with(&format!("{field}=")))
                .collect::<Vec<_>>()
                .join(";")
        };
        assert_eq!(err(&drop("Endpoint")), E::MissingEndpoint);
        assert_eq!(err(&drop("SharedAccessKeyName")), E::MissingKeyName);
        assert_eq!(err(&drop("SharedAccessKey")), E::MissingKey);
        assert_eq!(err(&drop("EntityPath")), E::MissingEntityPath);
        assert_eq!(
            E::MissingKey.to_string(),
            "connection string has no SharedAccessKey; copy it again with `hybridlink hc keys NAME`"
        );
        assert!(E::MissingEndpoint.to_string().contains("no Endpoint"));
        assert!(
            E::MissingKeyName
                .to_string()
                .contains("no SharedAccessKeyName")
        );
        assert!(E::MissingEntityPath.to_string().contains("no EntityPath"));
        assert_eq!(err(""), E::MissingEndpoint);
    }

    #[test]
    fn malformed_fields_are_named() {
        use ConnectionStringError as E;
        let c = canonical();
        let e = err(&c.replace("sb://relay.example:9443/", "https://relay.example:9443/"));
        assert!(e.to_string().contains("must start with sb://"), "{e}");
        let azure: ConnectionString = c.replace(":9443/", "/").parse().unwrap();
        assert_eq!(azure.relay_port, 443, "a string without a port means 443");
        let e = err(&c.replace(":9443/", ":0/"));
        assert!(
            e.to_string().contains("not a number from 1 to 65535"),
            "{e}"
        );
        let e = err(&c.replace(":9443/", ":9443/ns/"));
        assert!(e.to_string().contains("no path"), "{e}");
        let e = err(&c.replace("relay.example", "relay_example"));
        assert!(matches!(e, E::BadEndpoint { .. }), "{e}");
        assert_eq!(err(&c.replace("Name=send", "Name=")), E::EmptyKeyName);
        assert_eq!(
            err(&c.replace(KEY_TEXT, "not base64!")),
            E::BadKey(KeyError::NotBase64)
        );
        assert!(
            err(&c.replace(KEY_TEXT, "not base64!"))
                .to_string()
                .starts_with("connection string SharedAccessKey is invalid: ")
        );
        assert_eq!(
            err(&c.replace("EntityPath=payroll", "EntityPath=pay roll")),
            E::BadEntityPath("pay roll".parse::<HcName>().unwrap_err())
        );
        assert_eq!(err(&c.replace(SHA, &SHA[..62])), E::BadCertificateSha256);
        assert_eq!(
            err(&c.replace(SHA, &SHA.replace('a', "g"))),
            E::BadCertificateSha256
        );
        assert_eq!(
            err(&c.replace(SHA, &format!("{}é", &SHA[..62]))),
            E::BadCertificateSha256
        );
    }

    #[test]
    fn structural_errors() {
        use ConnectionStringError as E;
        let c = canonical();
        assert!(matches!(err(&format!("{c};garbage")), E::NotAPair { .. }));
        let e = err(&format!("{c};CertificateSha265=00"));
        assert_eq!(
            e,
            E::UnknownField {
                field: "CertificateSha265".into()
            }
        );
        assert!(
            e.to_string()
                .contains("unknown field \"CertificateSha265\"")
        );
        assert_eq!(
            err(&format!("{c};entitypath=other")),
            E::DuplicateField {
                field: "EntityPath"
            }
        );
        assert!(matches!(err(&"x".repeat(5000)), E::TooLong { len: 5000 }));
    }
}
