//! The agent's connection strings file (`--connection-strings-file`, the
//! `agent.conf` that `agent install` writes): one listen connection string
//! a line, `#` starts a comment. A string served over Azure Relay's
//! protocol (no `CertificateSha256`) carries its endpoint on the same line,
//! which that relay does not know:
//!
//! ```text
//! Endpoint=sb://ns.servicebus.windows.net/;...;EntityPath=payroll endpoint=sql.corp:1433
//! ```

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use proto::connection_string::{ConnectionString, ConnectionStringError};
use proto::name::{Endpoint, HcName};

/// Why a connection strings file could not be used.
#[derive(Debug, thiserror::Error)]
pub enum StringsFileError {
    /// The file could not be read.
    #[error("reading connection strings from {}: {error}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// The OS error.
        error: std::io::Error,
    },
    /// A line is not a connection string.
    #[error("in {}: line {line}: {error}", path.display())]
    Line {
        /// The file.
        path: PathBuf,
        /// The line, counted from 1.
        line: usize,
        /// What is wrong with it.
        error: ConnectionStringError,
    },
    /// What follows a string on its line is not `endpoint=HOST:PORT`.
    #[error("in {}: line {line}: {message}", path.display())]
    Endpoint {
        /// The file.
        path: PathBuf,
        /// The line, counted from 1.
        line: usize,
        /// What is wrong.
        message: String,
    },
}

/// What a connection strings file holds.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct StringsFile {
    /// The strings, in order.
    pub strings: Vec<ConnectionString>,
    /// The endpoints given on their lines, by hybrid connection.
    pub endpoints: HashMap<HcName, Endpoint>,
}

/// Why a line did not parse.
enum LineError {
    String(ConnectionStringError),
    Endpoint(String),
}

impl StringsFile {
    /// The file's text: one line a string, its endpoint after it.
    pub fn to_text(&self, header: &str) -> String {
        let mut text = header.to_string();
        for cs in &self.strings {
            match self.endpoints.get(&cs.hc) {
                Some(endpoint) => text.push_str(&format!("{cs} endpoint={endpoint}\n")),
                None => text.push_str(&format!("{cs}\n")),
            }
        }
        text
    }
}

/// Reads the connection strings file at `path`.
pub fn read(path: &Path) -> Result<Vec<ConnectionString>, StringsFileError> {
    Ok(read_all(path)?.strings)
}

/// Reads the connection strings file at `path`, endpoints included.
pub fn read_all(path: &Path) -> Result<StringsFile, StringsFileError> {
    let text = std::fs::read_to_string(path).map_err(|error| StringsFileError::Read {
        path: path.to_owned(),
        error,
    })?;
    parse_all(&text, path)
}

/// The strings of `text` in this file's format, read from `source` (a
/// path, or a name such as "standard input" for errors).
pub fn parse_text(text: &str, source: &Path) -> Result<Vec<ConnectionString>, StringsFileError> {
    Ok(parse_all(text, source)?.strings)
}

/// The strings and endpoints of `text`, read from `source`.
pub fn parse_all(text: &str, source: &Path) -> Result<StringsFile, StringsFileError> {
    parse(text).map_err(|(line, error)| match error {
        LineError::String(error) => StringsFileError::Line {
            path: source.to_owned(),
            line,
            error,
        },
        LineError::Endpoint(message) => StringsFileError::Endpoint {
            path: source.to_owned(),
            line,
            message,
        },
    })
}

/// The strings of a file's text; on error the line number and the error.
fn parse(text: &str) -> Result<StringsFile, (usize, LineError)> {
    let mut out = StringsFile::default();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let mut words = line.split_whitespace();
        let first = words.next().unwrap_or_default();
        let cs: ConnectionString = first.parse().map_err(|e| (n + 1, LineError::String(e)))?;
        for word in words {
            let endpoint = word
                .strip_prefix("endpoint=")
                .ok_or_else(|| {
                    LineError::Endpoint(format!(
                        "after the connection string only `endpoint=HOST:PORT` may follow, not {word:?}"
                    ))
                })
                .and_then(|e| {
                    e.parse::<Endpoint>()
                        .map_err(|e| LineError::Endpoint(format!("endpoint: {e}")))
                })
                .map_err(|e| (n + 1, e))?;
            if cs.cert_sha256.is_some() {
                return Err((
                    n + 1,
                    LineError::Endpoint(format!(
                        "endpoint={endpoint}: {} pins a hybridlink relay (CertificateSha256), which names the endpoint itself",
                        cs.hc
                    )),
                ));
            }
            out.endpoints.insert(cs.hc.clone(), endpoint);
        }
        out.strings.push(cs);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cs(name: &str) -> String {
        format!(
            "Endpoint=sb://relay.test:9443/;SharedAccessKeyName=listen;SharedAccessKey=k;EntityPath={name};CertificateSha256={}",
            "ab".repeat(32)
        )
    }

    #[test]
    fn comments_and_blank_lines_are_skipped_and_bad_lines_named() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("agent.conf");
        std::fs::write(&path, format!("# c\n\n{}\n  {}  \n", cs("a"), cs("b"))).unwrap();
        assert_eq!(read(&path).unwrap().len(), 2);
        std::fs::write(&path, "# c\nnot a string\n").unwrap();
        let err = read(&path).unwrap_err().to_string();
        let prefix = format!("in {}: line 2: ", path.display());
        assert!(err.starts_with(&prefix), "{err}");
        std::fs::write(&path, format!("{} endpoint=a.corp:1\n", cs("a"))).unwrap();
        let err = read(&path).unwrap_err().to_string();
        assert!(err.contains("names the endpoint itself"), "{err}");
        let missing = dir.path().join("missing.conf");
        let err = read(&missing).unwrap_err().to_string();
        let prefix = format!("reading connection strings from {}: ", missing.display());
        assert!(err.starts_with(&prefix), "{err}");
    }

    #[test]
    fn azure_protocol_strings_carry_their_endpoints_and_write_back_the_same() {
        let azure = cs("payroll")
            .split(";CertificateSha256")
            .next()
            .unwrap()
            .to_string();
        let text = format!("{azure} endpoint=sql.corp:1433\n{}\n", cs("b"));
        let file = parse_all(&text, Path::new("agent.conf")).unwrap();
        assert_eq!(file.strings.len(), 2);
        let payroll: HcName = "payroll".parse().unwrap();
        assert_eq!(file.endpoints[&payroll].to_string(), "sql.corp:1433");
        assert_eq!(file.to_text(""), text);
        for (bad, says) in [
            (
                format!("{azure} sql.corp:1433"),
                "only `endpoint=HOST:PORT`",
            ),
            (format!("{azure} endpoint=sql.corp"), "line 1: endpoint:"),
        ] {
            let err = parse_all(&bad, Path::new("agent.conf"))
                .unwrap_err()
                .to_string();
            assert!(err.contains(says), "{bad}: {err}");
        }
    }
}
