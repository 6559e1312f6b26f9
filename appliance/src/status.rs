//! The running appliance's status, as a small JSON file in its state dir
//! (`status.json`) that `hybridlink appliance status` reads. The appliance
//! rewrites it whenever something in it changes, atomically (temporary file,
//! fsync, rename), and removes it on a clean exit.
//!
//! ```json
//! { "version": 1, "pid": 4242, "updated_unix": 1764500000,
//!   "allow_source": "config", "allow": [".corp", "198.18.2.2"],
//!   "hybrid_connections": [
//!     { "name": "payroll", "endpoint": "payroll.corp:80",
//!       "address": "127.77.0.2", "state": "ok" },
//!     { "name": "web", "endpoint": "github.com:443", "address": null,
//!       "state": "refused: outside the allow list (no entry matches github.com)" } ] }
//! ```

use std::fmt::Write as _;
use std::io;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use transport::atomic_file::AtomicFile;

/// The file name inside the state dir.
pub const STATUS_FILE: &str = "status.json";

/// The version written in the file.
const STATUS_VERSION: u32 = 1;

/// Why the status file could not be written or read.
#[derive(Debug, thiserror::Error)]
pub enum StatusError {
    /// Writing failed.
    #[error("cannot write the appliance status {path}: {source}")]
    Write {
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: io::Error,
    },
    /// There is no status file: no appliance runs with this state dir.
    #[error(
        "no appliance status at {path}: is `hybridlink appliance run` running with this \
         state dir? (give it with --state-dir)"
    )]
    Missing {
        /// The file.
        path: PathBuf,
    },
    /// Reading failed.
    #[error("cannot read the appliance status {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: io::Error,
    },
    /// The file is not a status this version understands.
    #[error("the appliance status {path} is not understood: {message}")]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// What the parser said.
        message: String,
    },
}

/// The whole status.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Status {
    /// Format version, 1.
    pub version: u32,
    /// The appliance's process id.
    pub pid: u32,
    /// When the file was written, in seconds since the Unix epoch.
    pub updated_unix: u64,
    /// `config` or `first announcement` (see `gate::AllowSource`).
    pub allow_source: String,
    /// The allow list in force.
    pub allow: Vec<String>,
    /// One entry per hybrid connection, in name order.
    pub hybrid_connections: Vec<ApplianceHcStatus>,
}

/// One hybrid connection as the appliance serves it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApplianceHcStatus {
    /// Its name.
    pub name: String,
    /// Its endpoint as the relay announced it.
    pub endpoint: Option<String>,
    /// Where the app connects: the virtual address of a name, or the
    /// IPv4 literal; `null` when refused or not yet announced.
    pub address: Option<String>,
    /// `ok`, `not announced by the relay`, or `refused: ...` with the
    /// reason.
    pub state: String,
    /// `verified` when the send string carries the hybrid connection's
    /// end-to-end key (agents must prove it on every stream), else
    /// `relay-trusted`.
    #[serde(default)]
    pub end_to_end: String,
}

impl Status {
    /// A status of this process, stamped now.
    pub fn new(allow_source: String, allow: Vec<String>, hcs: Vec<ApplianceHcStatus>) -> Status {
        let updated_unix = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        Status {
            version: STATUS_VERSION,
            pid: std::process::id(),
            updated_unix,
            allow_source,
            allow,
            hybrid_connections: hcs,
        }
    }

    /// Writes the status to `path` atomically.
    pub fn write(&self, path: &Path) -> Result<(), StatusError> {
        let err = |source| StatusError::Write {
            path: path.to_owned(),
            source,
        };
        let mut text =
            serde_json::to_vec_pretty(self).map_err(|e| err(io::Error::other(e.to_string())))?;
        text.push(b'\n');
        AtomicFile::new(path).write(&text).map_err(err)
    }

    /// Reads the status at `path`.
    pub fn read(path: &Path) -> Result<Status, StatusError> {
        let text = match std::fs::read_to_string(path) {
            Ok(t) => t,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Err(StatusError::Missing {
                    path: path.to_owned(),
                });
            }
            Err(source) => {
                return Err(StatusError::Read {
                    path: path.to_owned(),
                    source,
                });
            }
        };
        let status: Status = serde_json::from_str(&text).map_err(|e| StatusError::Corrupt {
            path: path.to_owned(),
            message: e.to_string(),
        })?;
        if status.version != STATUS_VERSION {
            return Err(StatusError::Corrupt {
                path: path.to_owned(),
                message: format!(
                    "version {} (this binary reads {STATUS_VERSION})",
                    status.version
                ),
            });
        }
        Ok(status)
    }

    /// Whether the process that wrote it still runs.
    pub fn is_live(&self) -> bool {
        Path::new("/proc").join(self.pid.to_string()).exists()
    }

    /// The status as a table for people.
    pub fn table(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "{:<24} {:<32} {:<16} {:<15} STATE",
            "HYBRID CONNECTION", "ENDPOINT", "ADDRESS", "END-TO-END"
        );
        for hc in &self.hybrid_connections {
            let _ = writeln!(
                out,
                "{:<24} {:<32} {:<16} {:<15} {}",
                hc.name,
                hc.endpoint.as_deref().unwrap_or("-"),
                hc.address.as_deref().unwrap_or("-"),
                hc.end_to_end,
                hc.state
            );
        }
        let allow = if self.allow.is_empty() {
            "(empty: nothing is served)".to_owned()
        } else {
            self.allow.join(", ")
        };
        let _ = writeln!(out, "\nallow list ({}): {allow}", self.allow_source);
        if !self.is_live() {
            let _ = writeln!(
                out,
                "stale: process {} that wrote this is not running",
                self.pid
            );
        }
        out
    }
}

/// Removes the status file (on a clean exit); a missing file is fine.
pub fn remove(path: &Path) -> io::Result<()> {
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn written_statuses_read_back_and_print_as_a_table() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(STATUS_FILE);
        let status = Status::new(
            "config".into(),
            vec![".corp".into()],
            vec![
                ApplianceHcStatus {
                    name: "payroll".into(),
                    endpoint: Some("payroll.corp:80".into()),
                    address: Some("127.77.0.2".into()),
                    state: "ok".into(),
                    end_to_end: "verified".into(),
                },
                ApplianceHcStatus {
                    name: "web".into(),
                    endpoint: Some("github.com:443".into()),
                    address: None,
                    state: "refused: outside the allow list (no entry matches github.com)".into(),
                    end_to_end: "relay-trusted".into(),
                },
            ],
        );
        status.write(&path).unwrap();
        let back = Status::read(&path).unwrap();
        assert_eq!(back, status);
        assert!(back.is_live());
        let table = back.table();
        assert!(table.contains("payroll.corp:80"), "{table}");
        assert!(table.contains("refused: outside the allow list"), "{table}");
        assert!(table.contains("allow list (config): .corp"), "{table}");
        remove(&path).unwrap();
        remove(&path).unwrap();
        assert!(matches!(
            Status::read(&path),
            Err(StatusError::Missing { .. })
        ));
        std::fs::write(&path, "{}").unwrap();
        assert!(matches!(
            Status::read(&path),
            Err(StatusError::Corrupt { .. })
        ));
    }
}
