//! Shared Access Signature tokens, made and checked exactly as Azure Relay
//! does.
//!
//! A token reads
//! `SharedAccessSignature sr=<urlenc resource>&sig=<urlenc base64 HMAC-SHA256>&se=<unix expiry>&skn=<rule>`.
//! The signature is HMAC-SHA256 over `urlenc(resource) + "\n" + se`, keyed
//! with the UTF-8 bytes of the key *text* (the key is not base64-decoded).
//!
//! URL encoding percent-encodes every byte except the RFC 3986 unreserved
//! characters (`A-Z a-z 0-9 - _ . ~`), with upper-case hex. .NET's
//! `WebUtility.UrlEncode` (what Azure SDKs use) additionally leaves `!*()`
//! alone and writes a space as `+`; none of those can occur in a resource URI
//! of this relay (`http://host:port/hc-name`), so the two agree on every
//! token we make. When checking, the relay signs over the `sr` text exactly
//! as it appears in the token, so a client that encodes differently still
//! verifies.
//!
//! Checking a token ([`verify`]) looks at, in order: its shape, the HC it
//! names, the rule it names, its signature, its expiry, and the right of its
//! rule; the first failure is reported. The HC comes first because the
//! rules given to [`verify`] are those of the HC being accessed: a token for
//! another HC would otherwise look like a bad signature. Expiry and rights
//! are only reported for tokens whose signature is good.

use std::fmt;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use percent_encoding::{AsciiSet, NON_ALPHANUMERIC, percent_decode_str, utf8_percent_encode};
use ring::hmac;
use thiserror::Error;

use crate::key::{Key, KeySlot, Right};
use crate::name::HcName;

/// The word every token starts with (followed by one space).
pub const TOKEN_PREFIX: &str = "SharedAccessSignature";

/// Longest token [`verify`] looks at, in bytes. Real tokens are about 200.
pub const TOKEN_MAX_LEN: usize = 4096;

/// Everything but the RFC 3986 unreserved characters is percent-encoded.
const URL_ENCODE: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'_')
    .remove(b'.')
    .remove(b'~');

/// Percent-encodes `s` the way SAS tokens need it (see the module docs).
pub fn url_encode(s: &str) -> String {
    utf8_percent_encode(s, URL_ENCODE).to_string()
}

/// Makes a SAS token for `resource_uri`, signed with `key` of the rule
/// `key_name`, valid until `expiry_unix` (seconds since the Unix epoch).
pub fn sign(resource_uri: &str, key_name: &str, key: &Key, expiry_unix: u64) -> String {
    let sr = url_encode(resource_uri);
    let se = expiry_unix.to_string();
    let tag = hmac::sign(&key.hmac_key(), string_to_sign(&sr, &se).as_bytes());
    let sig = url_encode(&STANDARD.encode(tag.as_ref()));
    format!(
        "{TOKEN_PREFIX} sr={sr}&sig={sig}&se={se}&skn={}",
        url_encode(key_name)
    )
}

fn string_to_sign(encoded_resource: &str, expiry: &str) -> String {
    format!("{encoded_resource}\n{expiry}")
}

/// The keys of one rule of one HC, as the relay holds them.
#[derive(Debug, Clone, Copy)]
pub struct RuleKeys<'a> {
    /// Rule name, as tokens name it in `skn` (`send`, `listen`).
    pub name: &'a str,
    /// The right this rule grants.
    pub right: Right,
    /// The rule's primary key.
    pub primary: &'a Key,
    /// The rule's secondary key.
    pub secondary: &'a Key,
}

/// What a successfully checked token proved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verified {
    /// The rule that signed the token.
    pub rule: String,
    /// The right of that rule.
    pub right: Right,
    /// Which of the rule's keys signed it; a session should end when this key
    /// is regenerated.
    pub slot: KeySlot,
    /// When the token expires (seconds since the Unix epoch); a session must
    /// renew its token before then.
    pub expires_unix: u64,
}

/// The longest lifetime of a token a relay accepts unless told otherwise: a
/// day. Peers sign tokens for an hour and renew them; a token that lives
/// for years is a stolen key's best friend.
pub const DEFAULT_MAX_TOKEN_LIFETIME: u64 = 86_400;

impl Verified {
    /// The same token, if it expires no later than `max_lifetime` seconds
    /// after `now_unix`.
    pub fn within(self, now_unix: u64, max_lifetime: u64) -> Result<Verified, SasError> {
        if self.expires_unix > now_unix.saturating_add(max_lifetime) {
            return Err(SasError::TooLong {
                expires_unix: self.expires_unix,
                now_unix,
                max_lifetime,
            });
        }
        Ok(self)
    }
}

/// The part of a token that is malformed, for [`SasError::Malformed`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TokenPart {
    /// The whole token is longer than [`TOKEN_MAX_LEN`].
    Length,
    /// It does not start with `SharedAccessSignature `.
    Prefix,
    /// A `name=value` pair without `=`, or a name other than sr/sig/se/skn.
    Field(String),
    /// The same field appears twice.
    Duplicate(&'static str),
    /// A required field is absent.
    Missing(&'static str),
    /// `sr` is not percent-encoded UTF-8 or has no path naming an HC.
    Resource,
    /// `sig` is not percent-encoded base64 of 32 bytes.
    Signature,
    /// `se` is not a number of seconds.
    Expiry,
    /// `skn` is empty or not percent-encoded UTF-8.
    KeyName,
}

impl fmt::Display for TokenPart {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TokenPart::Length => write!(f, "it is longer than {TOKEN_MAX_LEN} bytes"),
            TokenPart::Prefix => write!(f, "it does not start with \"{TOKEN_PREFIX} \""),
            TokenPart::Field(field) => write!(
                f,
                "it has an unexpected part {field:?} (expected sr=, sig=, se=, skn=)"
            ),
            TokenPart::Duplicate(field) => write!(f, "its {field}= part appears twice"),
            TokenPart::Missing(field) => write!(f, "it has no {field}= part"),
            TokenPart::Resource => write!(
                f,
                "its sr= part is not a URL-encoded resource URI ending in a hybrid connection name"
            ),
            TokenPart::Signature => {
                write!(f, "its sig= part is not a URL-encoded base64 HMAC-SHA256")
            }
            TokenPart::Expiry => write!(f, "its se= part is not a Unix time in seconds"),
            TokenPart::KeyName => write!(f, "its skn= part is not a rule name"),
        }
    }
}

/// Why a token was rejected. Each message says what to do about it.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum SasError {
    /// The token cannot be read.
    #[error(
        "malformed shared access signature: {0}; make tokens from a connection string printed by `hybridlink hc keys NAME`"
    )]
    Malformed(TokenPart),
    /// The token was for another HC.
    #[error(
        "token is for hybrid connection {token_hc:?} but was presented for \"{presented}\"; use a connection string of \"{presented}\" (`hybridlink hc keys {presented}`)"
    )]
    WrongHc {
        /// The HC named by the token's `sr` (last path segment).
        token_hc: String,
        /// The HC the token was presented for.
        presented: HcName,
    },
    /// `skn` names no rule of this HC.
    #[error(
        "token is signed for rule {rule:?}, which hybrid connection \"{hc}\" does not have (its rules are send and listen); fetch a connection string with `hybridlink hc keys {hc}`"
    )]
    UnknownRule {
        /// The rule named by the token.
        rule: String,
        /// The HC the token was presented for.
        hc: HcName,
    },
    /// Neither key of the rule produces the token's signature.
    #[error(
        "token was signed with a key this relay does not hold for rule {rule:?} of \"{hc}\", or was altered: the key may have been regenerated; fetch the current connection string with `hybridlink hc keys {hc}`"
    )]
    BadSignature {
        /// The rule named by the token.
        rule: String,
        /// The HC the token was presented for.
        hc: HcName,
    },
    /// The token's expiry is not after `now`.
    #[error("token expired at {} ({} s ago); make a new token (clients renew theirs automatically; check this machine's clock if this repeats)", format_unix_utc(*.expired_unix), .now_unix.saturating_sub(*.expired_unix))]
    Expired {
        /// The token's `se`.
        expired_unix: u64,
        /// The time of the check.
        now_unix: u64,
    },
    /// The token lives longer than the relay accepts.
    #[error("token is valid until {} ({} s from now), longer than the {max_lifetime} s this relay accepts (relay serve --max-token-lifetime); make a token that expires sooner (clients renew theirs automatically)", format_unix_utc(*.expires_unix), .expires_unix.saturating_sub(*.now_unix))]
    TooLong {
        /// The token's `se`.
        expires_unix: u64,
        /// The time of the check.
        now_unix: u64,
        /// The longest lifetime accepted, in seconds.
        max_lifetime: u64,
    },
    /// The token is genuine but its rule lacks the needed right.
    #[error(
        "token of rule {rule:?} grants {has} but {needed} is needed; use the {needed} connection string (`hybridlink hc keys NAME`)"
    )]
    WrongRight {
        /// The rule that signed the token.
        rule: String,
        /// The right that rule grants.
        has: Right,
        /// The right the operation needs.
        needed: Right,
    },
}

/// The fields of a token, still encoded as they were sent.
struct RawToken<'t> {
    sr: &'t str,
    sig: &'t str,
    se: &'t str,
    skn: &'t str,
}

fn parse_token(token: &str) -> Result<RawToken<'_>, TokenPart> {
    if token.len() > TOKEN_MAX_LEN {
        return Err(TokenPart::Length);
    }
    let token = token.trim();
    let rest = token
        .split_once(' ')
        .filter(|(prefix, _)| prefix.eq_ignore_ascii_case(TOKEN_PREFIX))
        .map(|(_, rest)| rest.trim_start())
        .ok_or(TokenPart::Prefix)?;
    let (mut sr, mut sig, mut se, mut skn) = (None, None, None, None);
    for pair in rest.split('&').filter(|p| !p.is_empty()) {
        let (name, value) = pair
            .split_once('=')
            .ok_or_else(|| TokenPart::Field(pair.chars().take(32).collect()))?;
        let (slot, field) = match name {
            "sr" => (&mut sr, "sr"),
            "sig" => (&mut sig, "sig"),
            "se" => (&mut se, "se"),
            "skn" => (&mut skn, "skn"),
            _ => return Err(TokenPart::Field(name.chars().take(32).collect())),
        };
        if slot.replace(value).is_some() {
            return Err(TokenPart::Duplicate(field));
        }
    }
    Ok(RawToken {
        sr: sr.ok_or(TokenPart::Missing("sr"))?,
        sig: sig.ok_or(TokenPart::Missing("sig"))?,
        se: se.ok_or(TokenPart::Missing("se"))?,
        skn: skn.ok_or(TokenPart::Missing("skn"))?,
    })
}

/// The HC a resource URI names: its last non-empty path segment, lowercased.
fn hc_of(resource: &str) -> Option<String> {
    let after_scheme = resource
        .split_once("://")
        .map_or(resource, |(_, rest)| rest);
    let (_, path) = after_scheme.split_once('/')?;
    let path = path.split(['?', '#']).next().unwrap_or_default();
    path.rsplit('/')
        .find(|segment| !segment.is_empty())
        .map(str::to_ascii_lowercase)
}

/// Checks a token presented for `hc`, needing `needed` right, against the
/// HC's rules, at time `now_unix` (seconds since the Unix epoch).
///
/// Returns the rule that signed it (and which slot matched) on success. Only
/// the last path segment of the token's resource is compared with `hc`;
/// the scheme, host and port are not, because a relay can be reached under
/// several names (a public name, an internal one, an address). Signatures are
/// compared in constant time.
pub fn verify(
    token: &str,
    hc: &HcName,
    needed: Right,
    rules: &[RuleKeys<'_>],
    now_unix: u64,
) -> Result<Verified, SasError> {
    let raw = parse_token(token).map_err(SasError::Malformed)?;
    let resource = percent_decode_str(raw.sr)
        .decode_utf8()
        .map_err(|_| SasError::Malformed(TokenPart::Resource))?;
    let token_hc = hc_of(&resource).ok_or(SasError::Malformed(TokenPart::Resource))?;
    let sig = percent_decode_str(raw.sig).collect::<Vec<u8>>();
    let sig = STANDARD
        .decode(sig)
        .ok()
        .filter(|sig| sig.len() == 32)
        .ok_or(SasError::Malformed(TokenPart::Signature))?;
    if raw.se.is_empty() || !raw.se.bytes().all(|b| b.is_ascii_digit()) {
        return Err(SasError::Malformed(TokenPart::Expiry));
    }
    let expires_unix: u64 = raw
        .se
        .parse()
        .map_err(|_| SasError::Malformed(TokenPart::Expiry))?;
    let rule_name = percent_decode_str(raw.skn)
        .decode_utf8()
        .ok()
        .filter(|name| !name.is_empty())
        .ok_or(SasError::Malformed(TokenPart::KeyName))?;

    if token_hc != hc.as_str() {
        return Err(SasError::WrongHc {
            token_hc,
            presented: hc.clone(),
        });
    }
    let rule = rules
        .iter()
        .find(|rule| rule.name == rule_name)
        .ok_or_else(|| SasError::UnknownRule {
            rule: rule_name.to_string(),
            hc: hc.clone(),
        })?;
    let message = string_to_sign(raw.sr, raw.se);
    let slot = [
        (KeySlot::Primary, rule.primary),
        (KeySlot::Secondary, rule.secondary),
    ]
    .into_iter()
    .find(|(_, key)| hmac::verify(&key.hmac_key(), message.as_bytes(), &sig).is_ok())
    .map(|(slot, _)| slot)
    .ok_or_else(|| SasError::BadSignature {
        rule: rule.name.to_owned(),
        hc: hc.clone(),
    })?;
    if expires_unix <= now_unix {
        return Err(SasError::Expired {
            expired_unix: expires_unix,
            now_unix,
        });
    }
    if !rule.right.grants(needed) {
        return Err(SasError::WrongRight {
            rule: rule.name.to_owned(),
            has: rule.right,
            needed,
        });
    }
    Ok(Verified {
        rule: rule.name.to_owned(),
        right: rule.right,
        slot,
        expires_unix,
    })
}

/// Formats seconds since the Unix epoch as `YYYY-MM-DDTHH:MM:SSZ` (UTC),
/// for messages.
pub fn format_unix_utc(unix: u64) -> String {
    let days = unix / 86_400;
    let secs = unix % 86_400;
    // Civil-from-days (Howard Hinnant), on days since 1970-01-01.
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        secs / 3600,
        secs / 60 % 60,
        secs % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: &str = "Q2hhbmdlTWUtdGhpcy1pcy1hLXRlc3Qta2V5LTAwMDE=";
    const RESOURCE: &str = "http://relay.example:9443/payroll";
    const VECTOR: &str = "SharedAccessSignature sr=http%3A%2F%2Frelay.example%3A9443%2Fpayroll&sig=Un0ur%2BW0SmunFfsBF2LK9GNvsicOvVvdVL%2B7ws0jCA8%3D&se=1893456000&skn=send";
    const EXPIRY: u64 = 1_893_456_000;
    const NOW: u64 = 1_800_000_000;

    struct Hc {
        send: (Key, Key),
        listen: (Key, Key),
    }

    impl Hc {
        fn new() -> Hc {
            Hc {
                send: (KEY.parse().unwrap(), Key::generate().unwrap()),
                listen: (Key::generate().unwrap(), Key::generate().unwrap()),
            }
        }

        fn rules(&self) -> [RuleKeys<'_>; 2] {
            [
                RuleKeys {
                    name: "send",
                    right: Right::Send,
                    primary: &self.send.0,
                    secondary: &self.send.1,
                },
                RuleKeys {
                    name: "listen",
                    right: Right::Listen,
                    primary: &self.listen.0,
                    secondary: &self.listen.1,
                },
            ]
        }
    }

    fn payroll() -> HcName {
        "payroll".parse().unwrap()
    }

    #[test]
    fn matches_the_independent_test_vector() {
        let key: Key = KEY.parse().unwrap();
        assert_eq!(sign(RESOURCE, "send", &key, EXPIRY), VECTOR);
    }

    #[test]
    fn url_encoding_keeps_only_unreserved() {
        assert_eq!(url_encode("a-Z_0.~"), "a-Z_0.~");
        assert_eq!(url_encode(":/+= !*()"), "%3A%2F%2B%3D%20%21%2A%28%29");
        assert_eq!(url_encode("é"), "%C3%A9");
    }

    #[test]
    fn vector_verifies_with_either_slot() {
        let hc = Hc::new();
        let verified = verify(VECTOR, &payroll(), Right::Send, &hc.rules(), NOW).unwrap();
        assert_eq!(
            verified,
            Verified {
                rule: "send".into(),
                right: Right::Send,
                slot: KeySlot::Primary,
                expires_unix: EXPIRY,
            }
        );
        let token = sign(RESOURCE, "listen", &hc.listen.1, EXPIRY);
        let verified = verify(&token, &payroll(), Right::Listen, &hc.rules(), NOW).unwrap();
        assert_eq!(verified.slot, KeySlot::Secondary);
        assert_eq!(verified.rule, "listen");
    }

    #[test]
    fn host_of_resource_is_not_checked() {
        let hc = Hc::new();
        let token = sign("sb://10.0.0.9:443/Payroll/", "send", &hc.send.0, EXPIRY);
        assert!(verify(&token, &payroll(), Right::Send, &hc.rules(), NOW).is_ok());
    }

    #[test]
    fn token_fields_may_come_in_any_order() {
        let hc = Hc::new();
        let token = "SharedAccessSignature skn=send&se=1893456000&sig=Un0ur%2BW0SmunFfsBF2LK9GNvsicOvVvdVL%2B7ws0jCA8%3D&sr=http%3A%2F%2Frelay.example%3A9443%2Fpayroll";
        assert!(verify(token, &payroll(), Right::Send, &hc.rules(), NOW).is_ok());
    }

    #[test]
    fn malformed_tokens_name_the_part() {
        let hc = Hc::new();
        let check = |token: &str| verify(token, &payroll(), Right::Send, &hc.rules(), NOW);
        let cases: Vec<(String, TokenPart, &str)> = vec![
            (
                VECTOR.replace("SharedAccessSignature ", "Bearer "),
                TokenPart::Prefix,
                "does not start with \"SharedAccessSignature \"",
            ),
            (
                VECTOR.replace("&skn=send", ""),
                TokenPart::Missing("skn"),
                "no skn= part",
            ),
            (
                VECTOR.replace("&se=1893456000", "&se=1&se=2"),
                TokenPart::Duplicate("se"),
                "se= part appears twice",
            ),
            (
                format!("{VECTOR}&foo=1"),
                TokenPart::Field("foo".into()),
                "unexpected part \"foo\"",
            ),
            (
                VECTOR.replace("se=1893456000", "se=tomorrow"),
                TokenPart::Expiry,
                "se= part is not a Unix time",
            ),
            (
                VECTOR.replace("se=1893456000", "se=99999999999999999999999"),
                TokenPart::Expiry,
                "se= part is not a Unix time",
            ),
            (
                VECTOR.replace("sig=Un0ur", "sig=Un0"),
                TokenPart::Signature,
                "sig= part is not",
            ),
            (
                VECTOR.replace("%2Fpayroll", ""),
                TokenPart::Resource,
                "sr= part is not",
            ),
            (
                VECTOR.replace("sr=http", "sr=%FF"),
                TokenPart::Resource,
                "sr= part is not",
            ),
            (
                VECTOR.replace("skn=send", "skn="),
                TokenPart::KeyName,
                "skn= part is not a rule name",
            ),
            ("x".repeat(5000), TokenPart::Length, "longer than 4096"),
        ];
        for (token, part, words) in cases {
            let err = check(&token).unwrap_err();
            assert_eq!(err, SasError::Malformed(part), "{token}");
            let msg = err.to_string();
            assert!(
                msg.starts_with("malformed shared access signature: "),
                "{msg}"
            );
            assert!(msg.contains(words), "{msg}");
        }
    }

    #[test]
    fn expired_token_says_when() {
        let hc = Hc::new();
        let err = verify(VECTOR, &payroll(), Right::Send, &hc.rules(), EXPIRY + 90).unwrap_err();
        assert_eq!(
            err,
            SasError::Expired {
                expired_unix: EXPIRY,
                now_unix: EXPIRY + 90
            }
        );
        assert!(
            err.to_string()
                .starts_with("token expired at 2030-01-01T00:00:00Z (90 s ago); make a new token"),
            "{err}"
        );
        // Valid up to, not including, the expiry second.
        assert!(verify(VECTOR, &payroll(), Right::Send, &hc.rules(), EXPIRY - 1).is_ok());
        assert!(verify(VECTOR, &payroll(), Right::Send, &hc.rules(), EXPIRY).is_err());
    }

    #[test]
    fn tampered_or_regenerated_key_is_a_bad_signature() {
        let hc = Hc::new();
        let tampered = VECTOR.replace("se=1893456000", "se=1893456001");
        let err = verify(&tampered, &payroll(), Right::Send, &hc.rules(), NOW).unwrap_err();
        assert_eq!(
            err,
            SasError::BadSignature {
                rule: "send".into(),
                hc: payroll()
            }
        );
        assert_eq!(
            err.to_string(),
            "token was signed with a key this relay does not hold for rule \"send\" of \"payroll\", or was altered: the key may have been regenerated; fetch the current connection string with `hybridlink hc keys payroll`"
        );
        let other_key = Key::generate().unwrap();
        let token = sign(RESOURCE, "send", &other_key, EXPIRY);
        assert!(matches!(
            verify(&token, &payroll(), Right::Send, &hc.rules(), NOW),
            Err(SasError::BadSignature { .. })
        ));
    }

    #[test]
    fn token_for_another_hc_is_wrong_hc() {
        let hc = Hc::new();
        let billing: HcName = "billing".parse().unwrap();
        let err = verify(VECTOR, &billing, Right::Send, &hc.rules(), NOW).unwrap_err();
        assert_eq!(
            err,
            SasError::WrongHc {
                token_hc: "payroll".into(),
                presented: billing
            }
        );
        assert_eq!(
            err.to_string(),
            "token is for hybrid connection \"payroll\" but was presented for \"billing\"; use a connection string of \"billing\" (`hybridlink hc keys billing`)"
        );
    }

    #[test]
    fn unknown_rule_is_reported() {
        let hc = Hc::new();
        let token = sign(RESOURCE, "RootManageSharedAccessKey", &hc.send.0, EXPIRY);
        let err = verify(&token, &payroll(), Right::Send, &hc.rules(), NOW).unwrap_err();
        assert_eq!(
            err,
            SasError::UnknownRule {
                rule: "RootManageSharedAccessKey".into(),
                hc: payroll()
            }
        );
        assert!(
            err.to_string().starts_with(
                "token is signed for rule \"RootManageSharedAccessKey\", which hybrid connection \"payroll\" does not have"
            ),
            "{err}"
        );
    }

    #[test]
    fn listen_token_cannot_send_and_vice_versa() {
        let hc = Hc::new();
        let listen = sign(RESOURCE, "listen", &hc.listen.0, EXPIRY);
        let err = verify(&listen, &payroll(), Right::Send, &hc.rules(), NOW).unwrap_err();
        assert_eq!(
            err,
            SasError::WrongRight {
                rule: "listen".into(),
                has: Right::Listen,
                needed: Right::Send
            }
        );
        assert_eq!(
            err.to_string(),
            "token of rule \"listen\" grants listen but send is needed; use the send connection string (`hybridlink hc keys NAME`)"
        );
        let err = verify(VECTOR, &payroll(), Right::Listen, &hc.rules(), NOW).unwrap_err();
        assert!(matches!(
            err,
            SasError::WrongRight {
                has: Right::Send,
                needed: Right::Listen,
                ..
            }
        ));
    }

    #[test]
    fn formats_utc_dates() {
        assert_eq!(format_unix_utc(0), "1970-01-01T00:00:00Z");
        assert_eq!(format_unix_utc(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(format_unix_utc(1_709_251_199), "2024-02-29T23:59:59Z");
        assert_eq!(format_unix_utc(EXPIRY), "2030-01-01T00:00:00Z");
    }

    #[test]
    fn a_token_living_past_the_cap_is_refused_and_says_why() {
        let verified = Verified {
            rule: "send".into(),
            right: Right::Send,
            slot: KeySlot::Primary,
            expires_unix: EXPIRY,
        };
        assert!(verified.clone().within(EXPIRY - 3600, 3600).is_ok());
        let err = verified.within(EXPIRY - 3601, 3600).unwrap_err();
        assert!(matches!(
            err,
            SasError::TooLong {
                max_lifetime: 3600,
                ..
            }
        ));
        assert!(err.to_string().contains("--max-token-lifetime"), "{err}");
    }
}
