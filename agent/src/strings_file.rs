//! The agent's connection strings file (`--connection-strings-file`, the
//! `agent.conf` that `agent install` writes): one listen connection string
//! a line, `#` starts a comment.

use std::path::{Path, PathBuf};

use proto::connection_string::{ConnectionString, ConnectionStringError};

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
}

/// Reads the connection strings file at `path`.
pub fn read(path: &Path) -> Result<Vec<ConnectionString>, StringsFileError> {
    let text = std::fs::read_to_string(path).map_err(|error| StringsFileError::Read {
        path: path.to_owned(),
        error,
    })?;
    parse_text(&text, path)
}

/// The strings of `text` in this file's format, read from `source` (a
/// path, or a name such as "standard input" for errors).
pub fn parse_text(text: &str, source: &Path) -> Result<Vec<ConnectionString>, StringsFileError> {
    parse(text).map_err(|(line, error)| StringsFileError::Line {
        path: source.to_owned(),
        line,
        error,
    })
}

/// The strings of a file's text; on error the line number and the error.
fn parse(text: &str) -> Result<Vec<ConnectionString>, (usize, ConnectionStringError)> {
    let mut out = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        out.push(line.parse().map_err(|e| (n + 1, e))?);
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
        let missing = dir.path().join("missing.conf");
        let err = read(&missing).unwrap_err().to_string();
        let prefix = format!("reading connection strings from {}: ", missing.display());
        assert!(err.starts_with(&prefix), "{err}");
    }
}
