//! Shared access keys, the rights they grant, and the two key slots of a
//! rule.
//!
//! Every hybrid connection has two authorization rules, `send` and `listen`,
//! and the relay has one relay-wide rule, `manage`. A rule is named after the
//! one right it grants, so [`Right`] doubles as the rule name
//! ([`Right::rule_name`]); there is no separate rule-name type. Each rule has
//! two keys ([`KeySlot::Primary`] and [`KeySlot::Secondary`]) so that one
//! can be regenerated while clients still use the other.

use std::fmt;
use std::str::FromStr;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use ring::hmac;
use ring::rand::{SecureRandom, SystemRandom};
use serde::{Deserialize, Serialize};
use thiserror::Error;

/// Length of a generated key before base64 encoding, in bytes (256 bits).
pub const KEY_BYTES: usize = 32;

/// Longest key text accepted when parsing, in characters. Keys are generated
/// as 44 characters; the limit only keeps hostile input small.
pub const KEY_MAX_LEN: usize = 256;

/// Why a key, a right or a key slot could not be parsed or made.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum KeyError {
    /// The key text is empty.
    #[error("shared access key is empty; copy it again with `hybridlink hc keys NAME`")]
    Empty,
    /// The key text is longer than [`KEY_MAX_LEN`].
    #[error(
        "shared access key is {len} characters long; keys have at most 256 (generated ones have 44)"
    )]
    TooLong {
        /// Length of the rejected text.
        len: usize,
    },
    /// The key text is not standard base64.
    #[error(
        "shared access key is not base64 text (A-Z, a-z, 0-9, '+', '/', '=' padding); copy it again with `hybridlink hc keys NAME`"
    )]
    NotBase64,
    /// The operating system's random number generator failed.
    #[error("the system random number generator failed; cannot make a key")]
    Rng,
    /// A right / rule name other than `send`, `listen` or `manage`.
    #[error("unknown rule {0:?}; use send, listen or manage")]
    UnknownRight(String),
    /// A key slot other than `primary` or `secondary`.
    #[error("unknown key {0:?}; use primary or secondary")]
    UnknownSlot(String),
}

/// A shared access key: standard base64 text, 44 characters when generated
/// from 256 random bits.
///
/// The key is used as the UTF-8 bytes of its *text* for HMAC-SHA256 (as Azure
/// Relay does); it is never base64-decoded. `Debug` never prints it.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Key(String);

impl Key {
    /// Makes a new key from 256 bits of the operating system's randomness.
    pub fn generate() -> Result<Key, KeyError> {
        let mut bytes = [0u8; KEY_BYTES];
        SystemRandom::new()
            .fill(&mut bytes)
            .map_err(|_| KeyError::Rng)?;
        Ok(Key(STANDARD.encode(bytes)))
    }

    /// The key text, as it appears in connection strings. Handle with care:
    /// this is the secret.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The HMAC-SHA256 key made from the UTF-8 bytes of the key text.
    pub fn hmac_key(&self) -> hmac::Key {
        hmac::Key::new(hmac::HMAC_SHA256, self.0.as_bytes())
    }

    /// Whether `presented` is exactly this key's text, compared in constant
    /// time (for bearer-style authentication with the key itself).
    pub fn matches(&self, presented: &str) -> bool {
        // HMAC both values under this key and let ring compare the tags in
        // constant time; equal tags mean equal inputs.
        let hmac_key = self.hmac_key();
        let expected = hmac::sign(&hmac_key, self.0.as_bytes());
        hmac::verify(&hmac_key, presented.as_bytes(), expected.as_ref()).is_ok()
    }
}

impl fmt::Debug for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Key(<redacted>)")
    }
}

impl FromStr for Key {
    type Err = KeyError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.trim();
        if s.is_empty() {
            return Err(KeyError::Empty);
        }
        if s.len() > KEY_MAX_LEN {
            return Err(KeyError::TooLong { len: s.len() });
        }
        let body = s.trim_end_matches('=');
        let padding = s.len() - body.len();
        if body.is_empty()
            || padding > 2
            || !body
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'+' || b == b'/')
        {
            return Err(KeyError::NotBase64);
        }
        Ok(Key(s.to_owned()))
    }
}

impl TryFrom<String> for Key {
    type Error = KeyError;

    fn try_from(s: String) -> Result<Self, Self::Error> {
        s.parse()
    }
}

impl From<Key> for String {
    fn from(key: Key) -> String {
        key.0
    }
}

/// A right a rule grants. The rule granting it has the same name (`send`,
/// `listen`, `manage`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Right {
    /// Open streams to an HC: the application side (appliance, `connect`).
    Send,
    /// Serve an HC: the on-prem agent.
    Listen,
    /// Manage the relay (the management API). Like Azure's Manage right, it
    /// also grants Send and Listen.
    Manage,
}

impl Right {
    /// The name of the rule that grants this right: `send`, `listen` or
    /// `manage`.
    pub fn rule_name(self) -> &'static str {
        match self {
            Right::Send => "send",
            Right::Listen => "listen",
            Right::Manage => "manage",
        }
    }

    /// Whether holding `self` is enough for an operation needing `needed`.
    pub fn grants(self, needed: Right) -> bool {
        self == needed || self == Right::Manage
    }
}

impl fmt::Display for Right {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.rule_name())
    }
}

impl FromStr for Right {
    type Err = KeyError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_lowercase().as_str() {
            "send" => Ok(Right::Send),
            "listen" => Ok(Right::Listen),
            "manage" => Ok(Right::Manage),
            _ => Err(KeyError::UnknownRight(s.to_owned())),
        }
    }
}

/// Which of a rule's two keys.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum KeySlot {
    /// The primary key.
    Primary,
    /// The secondary key.
    Secondary,
}

impl KeySlot {
    /// `primary` or `secondary`.
    pub fn as_str(self) -> &'static str {
        match self {
            KeySlot::Primary => "primary",
            KeySlot::Secondary => "secondary",
        }
    }
}

impl fmt::Display for KeySlot {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for KeySlot {
    type Err = KeyError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_lowercase().as_str() {
            "primary" => Ok(KeySlot::Primary),
            "secondary" => Ok(KeySlot::Secondary),
            _ => Err(KeyError::UnknownSlot(s.to_owned())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_keys_are_44_base64_chars_of_256_bits() {
        let a = Key::generate().unwrap();
        let b = Key::generate().unwrap();
        assert_ne!(a, b);
        assert_eq!(a.as_str().len(), 44);
        assert_eq!(STANDARD.decode(a.as_str()).unwrap().len(), KEY_BYTES);
        assert_eq!(a.as_str().parse::<Key>().unwrap(), a);
    }

    #[test]
    fn debug_never_prints_the_key() {
        let key = Key::generate().unwrap();
        let shown = format!("{key:?} {:?}", Some(&key));
        assert!(!shown.contains(key.as_str()));
        assert!(shown.contains("<redacted>"));
    }

    #[test]
    fn key_parsing() {
        assert_eq!(
            " Q2hhbmdlTWUtdGhpcy1pcy1hLXRlc3Qta2V5LTAwMDE= "
                .parse::<Key>()
                .unwrap()
                .as_str(),
            "Q2hhbmdlTWUtdGhpcy1pcy1hLXRlc3Qta2V5LTAwMDE="
        );
        assert_eq!("".parse::<Key>(), Err(KeyError::Empty));
        assert_eq!("abc$".parse::<Key>(), Err(KeyError::NotBase64));
        assert_eq!("abc===".parse::<Key>(), Err(KeyError::NotBase64));
        assert_eq!("==".parse::<Key>(), Err(KeyError::NotBase64));
        assert_eq!(
            "a".repeat(300).parse::<Key>(),
            Err(KeyError::TooLong { len: 300 })
        );
        assert!(
            KeyError::Empty
                .to_string()
                .contains("`hybridlink hc keys NAME`")
        );
        let key: Key = serde_json::from_str("\"abcd\"").unwrap();
        assert_eq!(serde_json::to_string(&key).unwrap(), "\"abcd\"");
        assert!(serde_json::from_str::<Key>("\"\"").is_err());
    }

    #[test]
    fn matches_compares_exactly() {
        let key: Key = "abcd".parse().unwrap();
        assert!(key.matches("abcd"));
        assert!(!key.matches("abce"));
        assert!(!key.matches("abcd "));
        assert!(!key.matches(""));
    }

    #[test]
    fn rights_and_slots_parse_and_print() {
        for right in [Right::Send, Right::Listen, Right::Manage] {
            assert_eq!(right.to_string().parse::<Right>(), Ok(right));
        }
        assert_eq!("Listen".parse::<Right>(), Ok(Right::Listen));
        assert_eq!(
            "admin".parse::<Right>().unwrap_err().to_string(),
            "unknown rule \"admin\"; use send, listen or manage"
        );
        assert_eq!(Right::Send.rule_name(), "send");
        assert!(Right::Manage.grants(Right::Send));
        assert!(Right::Listen.grants(Right::Listen));
        assert!(!Right::Listen.grants(Right::Send));
        assert!(!Right::Send.grants(Right::Manage));
        for slot in [KeySlot::Primary, KeySlot::Secondary] {
            assert_eq!(slot.to_string().parse::<KeySlot>(), Ok(slot));
        }
        assert_eq!(
            "tertiary".parse::<KeySlot>().unwrap_err().to_string(),
            "unknown key \"tertiary\"; use primary or secondary"
        );
        assert_eq!(serde_json::to_string(&Right::Listen).unwrap(), "\"listen\"");
        assert_eq!(
            serde_json::from_str::<KeySlot>("\"secondary\"").unwrap(),
            KeySlot::Secondary
        );
    }
}
