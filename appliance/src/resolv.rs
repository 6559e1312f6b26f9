//! Points the namespace's resolver at the appliance's DNS server while it
//! runs, and puts the original back on exit or at the next start.
//!
//! The original text is saved to a backup file in the appliance's state dir
//! before `/etc/resolv.conf` changes, and the backup is removed only after
//! the original is back. [`point_at`] restores a backup it finds before
//! anything else, so a crashed appliance's successor reads the real upstream
//! servers, never its predecessor's rewrite.
//!
//! `/etc/resolv.conf` is always rewritten in place (open, truncate, write):
//! inside `ip netns exec NAME` it is a bind mount of
//! `/etc/netns/NAME/resolv.conf`, where a rename fails with `EBUSY`; and
//! when it is a symlink, opening it writes the file it points to.

use std::fs::OpenOptions;
use std::io::{self, Write as _};
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};

use proto::name::canonical_dns_name;
use transport::atomic_file::AtomicFile;

/// The resolver configuration of the network namespace.
pub const RESOLV_CONF: &str = "/etc/resolv.conf";

/// The name of the backup in the appliance's state dir.
pub const BACKUP_FILE_NAME: &str = "resolv.conf.orig";

/// The first line of every file the appliance writes; its presence tells a
/// leftover rewrite from a file someone else wrote since.
pub const MARKER: &str = "# Written by the hybridlink appliance while it runs;";

/// Which resolver file to rewrite and where to keep its original.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ResolvPaths {
    /// The file the namespace's resolver reads (normally [`RESOLV_CONF`]).
    pub resolv_conf: PathBuf,
    /// Where the original text is kept while the appliance runs.
    pub backup: PathBuf,
}

impl ResolvPaths {
    /// [`RESOLV_CONF`], backed up as [`BACKUP_FILE_NAME`] in `state_dir`.
    pub fn new(state_dir: impl AsRef<Path>) -> Self {
        Self {
            resolv_conf: PathBuf::from(RESOLV_CONF),
            backup: state_dir.as_ref().join(BACKUP_FILE_NAME),
        }
    }
}

/// Why the resolver could not be pointed at the appliance or restored.
#[derive(Debug, thiserror::Error)]
pub enum ResolvError {
    /// The resolver file could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: io::Error,
    },
    /// The resolver file could not be rewritten in place.
    #[error("cannot rewrite {path} in place: {source}")]
    Write {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: io::Error,
    },
    /// The backup could not be written, read or removed.
    #[error("resolv.conf backup {path}: {source}; check the appliance's state dir")]
    Backup {
        /// The backup file.
        path: PathBuf,
        /// The I/O error.
        source: io::Error,
    },
}

/// What the appliance needs from a `resolv.conf`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ResolvConf {
    /// The `nameserver` addresses, in file order (all of them, though glibc
    /// uses only the first three). Link-local IPv6 addresses with a zone
    /// (`fe80::1%eth0`) are left out.
    pub nameservers: Vec<IpAddr>,
    /// The search list: from the last `search` or `domain` line, lower-case,
    /// without trailing dots, invalid names left out.
    pub search: Vec<String>,
    /// `options ndots:N`.
    pub ndots: Option<u8>,
    /// `options timeout:N`, in seconds.
    pub timeout: Option<u32>,
    /// `options attempts:N`.
    pub attempts: Option<u32>,
    /// Every option as written (including the three above), in file order,
    /// so that a rewritten file can keep them.
    pub options: Vec<String>,
}

impl ResolvConf {
    /// The nameservers as socket addresses on port 53, ready for
    /// [`DnsConfig::upstreams`](crate::dns::DnsConfig::upstreams).
    pub fn upstreams(&self) -> Vec<SocketAddr> {
        self.nameservers
            .iter()
            .map(|ip| SocketAddr::new(*ip, 53))
            .collect()
    }
}

/// Parses the text of a `resolv.conf` (see resolv.conf(5)) leniently, as the
/// C library does: unknown keywords and malformed values are skipped, never
/// an error. Comments start with `#` or `;`.
pub fn parse_resolv_conf(text: &str) -> ResolvConf {
    let mut conf = ResolvConf::default();
    for line in text.lines() {
        let line = match line.find(['#', ';']) {
            Some(at) => &line[..at],
            None => line,
        };
        let mut words = line.split_whitespace();
        let Some(keyword) = words.next() else {
            continue;
        };
        match keyword {
            "nameserver" => {
                if let Some(ip) = words.next().and_then(|w| w.parse::<IpAddr>().ok()) {
                    conf.nameservers.push(ip);
                }
            }
            "search" | "domain" => {
                let list: Vec<String> = if keyword == "domain" {
                    words
                        .take(1)
                        .filter_map(|w| canonical_dns_name(w).ok())
                        .collect()
                } else {
                    words.filter_map(|w| canonical_dns_name(w).ok()).collect()
                };
                conf.search = list;
            }
            "options" => {
                for option in words {
                    let (name, value) = option.split_once(':').unwrap_or((option, ""));
                    match name {
                        "ndots" => conf.ndots = value.parse::<u32>().ok().map(|n| n.min(15) as u8),
                        "timeout" => conf.timeout = value.parse().ok(),
                        "attempts" => conf.attempts = value.parse().ok(),
                        _ => {}
                    }
                    conf.options.push(option.to_string());
                }
            }
            _ => {}
        }
    }
    conf
}

/// What [`recover`] did with a backup left by an appliance that did not
/// exit cleanly.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Recovery {
    /// There was no backup: the last appliance exited cleanly.
    NothingToDo,
    /// The backup was written back and removed.
    Restored,
    /// The resolver file no longer carried [`MARKER`]: someone rewrote it
    /// after the crash, so it was kept and the stale backup removed.
    KeptNewer,
}

/// Restores the original resolv.conf from a backup left by a crashed
/// appliance; call it at start before reading the resolver configuration.
/// [`point_at`] calls it itself.
pub fn recover(paths: &ResolvPaths) -> Result<Recovery, ResolvError> {
    let original = match std::fs::read_to_string(&paths.backup) {
        Ok(text) => text,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Recovery::NothingToDo),
        Err(source) => {
            return Err(ResolvError::Backup {
                path: paths.backup.clone(),
                source,
            });
        }
    };
    let current = match std::fs::read_to_string(&paths.resolv_conf) {
        Ok(text) => Some(text),
        Err(e) if e.kind() == io::ErrorKind::NotFound => None,
        Err(source) => {
            return Err(ResolvError::Read {
                path: paths.resolv_conf.clone(),
                source,
            });
        }
    };
    let outcome = if current.as_deref().is_none_or(|t| t.starts_with(MARKER)) {
        write_in_place(&paths.resolv_conf, &original)?;
        tracing::warn!(
            path = %paths.resolv_conf.display(),
            backup = %paths.backup.display(),
            "restored the resolver configuration left pointing at a previous appliance"
        );
        Recovery::Restored
    } else {
        tracing::warn!(
            path = %paths.resolv_conf.display(),
            backup = %paths.backup.display(),
            "resolver configuration was rewritten by someone else after the appliance \
             stopped; keeping it and dropping the stale backup"
        );
        Recovery::KeptNewer
    };
    remove_backup(&paths.backup)?;
    Ok(outcome)
}

/// Points the resolver at `dns` until the returned guard is undone or
/// dropped.
///
/// First [`recover`]s a leftover backup, then reads the original, saves it
/// durably to `paths.backup`, and rewrites `paths.resolv_conf` in place as
/// [`MARKER`], `nameserver <dns>`, and the original `search`, `domain` and
/// `options` lines.
pub fn point_at(paths: &ResolvPaths, dns: IpAddr) -> Result<ResolvGuard, ResolvError> {
    recover(paths)?;
    let original_text =
        std::fs::read_to_string(&paths.resolv_conf).map_err(|source| ResolvError::Read {
            path: paths.resolv_conf.clone(),
            source,
        })?;
    let original = parse_resolv_conf(&original_text);
    if original.nameservers.contains(&dns) {
        tracing::warn!(
            %dns,
            "the original resolver configuration already names the appliance's DNS \
             server; forwarding to it would loop"
        );
    }
    write_backup(&paths.backup, &original_text)?;
    let written = render(&original_text, dns, &paths.backup);
    if let Err(e) = write_in_place(&paths.resolv_conf, &written) {
        // A half-written file is worse than none: put the original back, and
        // keep the backup for the next start if even that fails.
        if write_in_place(&paths.resolv_conf, &original_text).is_ok() {
            let _ = remove_backup(&paths.backup);
        }
        return Err(e);
    }
    tracing::info!(
        path = %paths.resolv_conf.display(),
        %dns,
        "resolver pointed at the appliance"
    );
    Ok(ResolvGuard {
        paths: paths.clone(),
        original,
        original_text,
        written,
        undone: false,
    })
}

/// The resolver pointed at the appliance by [`point_at`]. [`undo`](Self::undo)
/// (or drop) puts the original back.
#[derive(Debug)]
pub struct ResolvGuard {
    paths: ResolvPaths,
    original: ResolvConf,
    original_text: String,
    written: String,
    undone: bool,
}

impl ResolvGuard {
    /// The configuration found before the rewrite: the upstream servers to
    /// forward other names to, and the search list.
    pub fn original(&self) -> &ResolvConf {
        &self.original
    }

    /// The text found before the rewrite, byte for byte.
    pub fn original_text(&self) -> &str {
        &self.original_text
    }

    /// Writes the original back in place and removes the backup. When the
    /// file no longer holds what the appliance wrote (someone rewrote it
    /// since), that newer text is kept. Calling it again does nothing.
    pub fn undo(&mut self) -> Result<(), ResolvError> {
        if self.undone {
            return Ok(());
        }
        let current = match std::fs::read_to_string(&self.paths.resolv_conf) {
            Ok(text) => Some(text),
            Err(e) if e.kind() == io::ErrorKind::NotFound => None,
            Err(source) => {
                return Err(ResolvError::Read {
                    path: self.paths.resolv_conf.clone(),
                    source,
                });
            }
        };
        if current.as_deref().is_none_or(|t| t == self.written) {
            write_in_place(&self.paths.resolv_conf, &self.original_text)?;
        } else {
            tracing::warn!(
                path = %self.paths.resolv_conf.display(),
                "resolver configuration was rewritten by someone else while the appliance \
                 ran; keeping that version"
            );
        }
        remove_backup(&self.paths.backup)?;
        self.undone = true;
        tracing::info!(path = %self.paths.resolv_conf.display(), "resolver configuration restored");
        Ok(())
    }
}

impl Drop for ResolvGuard {
    fn drop(&mut self) {
        if let Err(e) = self.undo() {
            tracing::error!(error = %e, "could not restore the resolver configuration");
        }
    }
}

/// The text that points the resolver at `dns`, keeping the original's
/// search list and options.
fn render(original: &str, dns: IpAddr, backup: &Path) -> String {
    let mut text = format!(
        "{MARKER} the original is restored on exit.\n# Original saved at {}.\nnameserver {dns}\n",
        backup.display()
    );
    for line in original.lines() {
        let keyword = line.split_whitespace().next();
        if matches!(keyword, Some("search" | "domain" | "options")) {
            text.push_str(line);
            text.push('\n');
        }
    }
    text
}

/// Truncates and rewrites `path` through its existing inode, following a
/// symlink: the only way that works on a bind-mounted file.
fn write_in_place(path: &Path, text: &str) -> Result<(), ResolvError> {
    let err = |source| ResolvError::Write {
        path: path.to_owned(),
        source,
    };
    let mut f = OpenOptions::new()
        .write(true)
        .truncate(true)
        .create(true)
        .open(path)
        .map_err(err)?;
    f.write_all(text.as_bytes()).map_err(err)?;
    f.sync_all().map_err(err)
}

/// Writes the backup atomically: a crash leaves either no backup or a whole
/// one.
fn write_backup(path: &Path, text: &str) -> Result<(), ResolvError> {
    AtomicFile::new(path)
        .create_dir()
        .write(text.as_bytes())
        .map_err(|source| ResolvError::Backup {
            path: path.to_owned(),
            source,
        })
}

fn remove_backup(path: &Path) -> Result<(), ResolvError> {
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(ResolvError::Backup {
            path: path.to_owned(),
            source: e,
        }),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ORIGINAL: &str = "\
# managed by someone
domain old.example
nameserver 198.18.0.53
nameserver fe80::1%eth0
nameserver 2001:db8::53
search corp.example lab.example # trailing comment
options ndots:2 edns0
options timeout:1
sortlist 130.155.160.0/255.255.240.0
";

    fn paths(dir: &tempfile::TempDir) -> ResolvPaths {
        let resolv_conf = dir.path().join("resolv.conf");
        std::fs::write(&resolv_conf, ORIGINAL).unwrap();
        ResolvPaths {
            resolv_conf,
            backup: dir.path().join("state").join(BACKUP_FILE_NAME),
        }
    }

    fn dns() -> IpAddr {
        "127.77.0.1".parse().unwrap()
    }

    #[test]
    fn rewrites_with_our_server_and_the_original_search_and_options() {
        let dir = tempfile::tempdir().unwrap();
        let paths = paths(&dir);
        let guard = point_at(&paths, dns()).unwrap();
        let now = std::fs::read_to_string(&paths.resolv_conf).unwrap();
        assert!(now.starts_with(MARKER));
        let conf = parse_resolv_conf(&now);
        assert_eq!(conf.nameservers, vec![dns()]);
        assert_eq!(conf.search, vec!["corp.example", "lab.example"]);
        assert_eq!(conf.options, vec!["ndots:2", "edns0", "timeout:1"]);
        assert!(!now.contains("sortlist"));
        assert_eq!(guard.original(), &parse_resolv_conf(ORIGINAL));
        assert_eq!(guard.original_text(), ORIGINAL);
        assert_eq!(std::fs::read_to_string(&paths.backup).unwrap(), ORIGINAL);
        drop(guard);
        assert_eq!(
            std::fs::read_to_string(&paths.resolv_conf).unwrap(),
            ORIGINAL
        );
        assert!(!paths.backup.exists());
    }

    #[test]
    fn rewrites_the_same_inode_and_follows_a_symlink() {
        use std::os::unix::fs::MetadataExt;
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("run").join("stub-resolv.conf");
        std::fs::create_dir_all(target.parent().unwrap()).unwrap();
        std::fs::write(&target, ORIGINAL).unwrap();
        let link = dir.path().join("resolv.conf");
        std::os::unix::fs::symlink(&target, &link).unwrap();
        let inode = std::fs::metadata(&target).unwrap().ino();
        let paths = ResolvPaths {
            resolv_conf: link.clone(),
            backup: dir.path().join(BACKUP_FILE_NAME),
        };
        let mut guard = point_at(&paths, dns()).unwrap();
        assert!(std::fs::symlink_metadata(&link).unwrap().is_symlink());
        assert_eq!(std::fs::metadata(&target).unwrap().ino(), inode);
        let written = std::fs::read_to_string(&target).unwrap();
        assert_eq!(parse_resolv_conf(&written).nameservers, vec![dns()]);
        guard.undo().unwrap();
        guard.undo().unwrap();
        assert!(std::fs::symlink_metadata(&link).unwrap().is_symlink());
        assert_eq!(std::fs::metadata(&target).unwrap().ino(), inode);
        assert_eq!(std::fs::read_to_string(&target).unwrap(), ORIGINAL);
    }

    #[test]
    fn a_crashed_rewrite_is_restored_from_the_backup_before_anything_else() {
        let dir = tempfile::tempdir().unwrap();
        let paths = paths(&dir);
        std::mem::forget(point_at(&paths, dns()).unwrap());
        assert!(paths.backup.exists());

        // The next start must forward to the real upstream, not to itself.
        let guard = point_at(&paths, "127.77.0.2".parse().unwrap()).unwrap();
        assert_eq!(guard.original_text(), ORIGINAL);
        assert_eq!(guard.original().nameservers[0].to_string(), "198.18.0.53");
        drop(guard);
        assert_eq!(
            std::fs::read_to_string(&paths.resolv_conf).unwrap(),
            ORIGINAL
        );

        std::mem::forget(point_at(&paths, dns()).unwrap());
        assert_eq!(recover(&paths).unwrap(), Recovery::Restored);
        assert_eq!(
            std::fs::read_to_string(&paths.resolv_conf).unwrap(),
            ORIGINAL
        );
        assert!(!paths.backup.exists());
        assert_eq!(recover(&paths).unwrap(), Recovery::NothingToDo);
    }

    #[test]
    fn a_file_rewritten_by_someone_else_is_kept() {
        let dir = tempfile::tempdir().unwrap();
        let paths = paths(&dir);
        let newer = "nameserver 198.18.0.54\n";

        let guard = point_at(&paths, dns()).unwrap();
        std::fs::write(&paths.resolv_conf, newer).unwrap();
        drop(guard);
        assert_eq!(std::fs::read_to_string(&paths.resolv_conf).unwrap(), newer);
        assert!(!paths.backup.exists());

        std::mem::forget(point_at(&paths, dns()).unwrap());
        std::fs::write(&paths.resolv_conf, ORIGINAL).unwrap();
        assert_eq!(recover(&paths).unwrap(), Recovery::KeptNewer);
        assert_eq!(
            std::fs::read_to_string(&paths.resolv_conf).unwrap(),
            ORIGINAL
        );
        assert!(!paths.backup.exists());
    }

    #[test]
    fn a_missing_resolv_conf_is_an_error_that_names_it() {
        let dir = tempfile::tempdir().unwrap();
        let paths = ResolvPaths {
            resolv_conf: dir.path().join("absent"),
            backup: dir.path().join(BACKUP_FILE_NAME),
        };
        let err = point_at(&paths, dns()).unwrap_err();
        assert!(matches!(err, ResolvError::Read { .. }));
        assert!(err.to_string().contains("absent"));
        assert!(!paths.backup.exists());
    }

    #[test]
    fn parses_resolv_conf() {
        let conf = parse_resolv_conf(
            "# generated\n\
             nameserver 10.0.0.2\n\
             nameserver   2001:db8::53 # comment\n\
             nameserver fe80::1%eth0\n\
             nameserver not-an-ip\n\
             domain ignored.example\n\
             search Corp. eu.corp bad..name\n\
             ; options rotate\n\
             options ndots:2 timeout:3 attempts:4 edns0 ndots:99x\n\
             sortlist 10.0.0.0\n",
        );
        assert_eq!(
            conf.nameservers,
            vec![
                "10.0.0.2".parse::<IpAddr>().unwrap(),
                "2001:db8::53".parse().unwrap()
            ]
        );
        assert_eq!(conf.search, vec!["corp", "eu.corp"]);
        assert_eq!(conf.ndots, None, "the last ndots option was malformed");
        assert_eq!(conf.timeout, Some(3));
        assert_eq!(conf.attempts, Some(4));
        assert_eq!(
            conf.options,
            vec!["ndots:2", "timeout:3", "attempts:4", "edns0", "ndots:99x"]
        );
        assert_eq!(
            conf.upstreams(),
            vec![
                "10.0.0.2:53".parse::<SocketAddr>().unwrap(),
                "[2001:db8::53]:53".parse().unwrap()
            ]
        );

        let conf = parse_resolv_conf("search a.example b.example\ndomain Corp\noptions ndots:20\n");
        assert_eq!(
            conf.search,
            vec!["corp"],
            "the last of search and domain wins"
        );
        assert_eq!(conf.ndots, Some(15), "glibc caps ndots at 15");
        assert_eq!(parse_resolv_conf(""), ResolvConf::default());
        assert_eq!(
            parse_resolv_conf("\u{0}\u{ff}garbage\n\n  \t").nameservers,
            Vec::<IpAddr>::new()
        );
    }
}
