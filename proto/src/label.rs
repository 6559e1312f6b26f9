//! The name a peer gives itself in its `Hello` ([`PeerLabel`]), and
//! [`sanitized`], the one way any other text a peer sent reaches a log line.
//!
//! A label is shown in the relay's logs, in `hc status` and in the portal,
//! and it arrives before the peer has proved anything: it is short and
//! printable or the `Hello` is refused. Text a peer controls is never logged
//! raw: a newline would forge a log line and an escape sequence would reach
//! the terminal of whoever reads the log.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// The most characters a label may have.
pub const MAX_LABEL_CHARS: usize = 64;

/// A peer's name for itself (the agent's host name, `sender`, ...): 1 to
/// [`MAX_LABEL_CHARS`] characters, none of them a control character (so no
/// newline and no ANSI escape).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct PeerLabel(String);

/// Why a label was refused. The messages never repeat the label itself.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LabelError {
    /// Nothing at all.
    #[error("the label is empty; give the peer a name (e.g. its host name)")]
    Empty,
    /// Longer than [`MAX_LABEL_CHARS`].
    #[error(
        "the label has {0} characters, more than the {MAX_LABEL_CHARS} allowed; use a shorter name"
    )]
    TooLong(usize),
    /// A control character (newline, escape, ...).
    #[error(
        "the label contains control character U+{0:04X} at character {1}; use printable characters only"
    )]
    Control(u32, usize),
}

impl PeerLabel {
    /// Checks `text` is a valid label.
    pub fn parse(text: &str) -> Result<PeerLabel, LabelError> {
        let mut count = 0;
        for (i, c) in text.chars().enumerate() {
            if c.is_control() {
                return Err(LabelError::Control(c as u32, i + 1));
            }
            count += 1;
        }
        if count == 0 {
            return Err(LabelError::Empty);
        }
        if count > MAX_LABEL_CHARS {
            return Err(LabelError::TooLong(count));
        }
        Ok(PeerLabel(text.to_string()))
    }

    /// The nearest valid label to `text`, for a peer naming itself from
    /// something it does not control (a host name file): control characters
    /// become `?`, the rest is cut to [`MAX_LABEL_CHARS`], and an empty
    /// result becomes `?`.
    pub fn lossy(text: &str) -> PeerLabel {
        let s: String = text
            .chars()
            .map(|c| if c.is_control() { '?' } else { c })
            .take(MAX_LABEL_CHARS)
            .collect();
        if s.is_empty() {
            PeerLabel("?".into())
        } else {
            PeerLabel(s)
        }
    }

    /// The label as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for PeerLabel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl FromStr for PeerLabel {
    type Err = LabelError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        PeerLabel::parse(s)
    }
}

impl Serialize for PeerLabel {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.0)
    }
}

impl<'de> Deserialize<'de> for PeerLabel {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        PeerLabel::parse(&s).map_err(serde::de::Error::custom)
    }
}

/// `text` made safe for one log line: control characters escaped (`\n`,
/// `\u{1b}`), cut after `max_chars` characters with the number of bytes
/// left out. Use it for anything a peer sent that is not a parsed type.
pub fn sanitized(text: &str, max_chars: usize) -> String {
    let mut out = String::new();
    for (taken, (i, c)) in text.char_indices().enumerate() {
        if taken == max_chars {
            out.push_str(&format!("… ({} more bytes)", text.len() - i));
            break;
        }
        if c.is_control() {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_are_short_and_printable() {
        assert_eq!(
            PeerLabel::parse("onprem-1.example").unwrap().as_str(),
            "onprem-1.example"
        );
        assert_eq!(PeerLabel::parse("Zürich ☃").unwrap().as_str(), "Zürich ☃");
        assert!(PeerLabel::parse(&"x".repeat(MAX_LABEL_CHARS)).is_ok());
        assert_eq!(
            PeerLabel::parse(&"x".repeat(MAX_LABEL_CHARS + 1)),
            Err(LabelError::TooLong(MAX_LABEL_CHARS + 1))
        );
        assert_eq!(PeerLabel::parse(""), Err(LabelError::Empty));
        assert_eq!(PeerLabel::parse("a\nb"), Err(LabelError::Control(10, 2)));
        assert_eq!(
            PeerLabel::parse("\u{1b}[31mred"),
            Err(LabelError::Control(0x1b, 1))
        );
        // C1 controls (a one-character CSI) and DEL too.
        assert!(PeerLabel::parse("a\u{9b}31m").is_err());
        assert!(PeerLabel::parse("a\u{7f}").is_err());
    }

    #[test]
    fn refusals_never_repeat_the_label() {
        let evil = format!("\u{1b}]0;pwned\u{7}{}", "y".repeat(100));
        let err = PeerLabel::parse(&evil).unwrap_err().to_string();
        assert!(!err.contains("pwned") && !err.contains('\u{1b}'), "{err}");
        let json = format!(r#""{}""#, "z".repeat(500));
        let err = serde_json::from_str::<PeerLabel>(&json)
            .unwrap_err()
            .to_string();
        assert!(!err.contains("zzz"), "{err}");
    }

    #[test]
    fn lossy_labels_are_valid() {
        assert_eq!(PeerLabel::lossy("host\n").as_str(), "host?");
        assert_eq!(PeerLabel::lossy("").as_str(), "?");
        let long = PeerLabel::lossy(&"é".repeat(200));
        assert_eq!(long.as_str().chars().count(), MAX_LABEL_CHARS);
        assert!(PeerLabel::parse(long.as_str()).is_ok());
    }

    #[test]
    fn sanitized_text_is_one_bounded_line() {
        assert_eq!(sanitized("plain", 10), "plain");
        assert_eq!(sanitized("a\nb\u{1b}[2J", 100), "a\\nb\\u{1b}[2J");
        let s = sanitized(&"\n".repeat(1_000_000), 16);
        assert!(!s.contains('\n'));
        assert!(s.len() < 100, "{s}");
        assert!(s.ends_with("… (999984 more bytes)"), "{s}");
    }
}
