//! The name → address map: each hybrid-connection host name gets a stable
//! IPv4 address in the appliance's virtual range.
//!
//! The map is persisted as JSON in a state file so that the same name keeps
//! its address across restarts (an app that cached an answer, or a
//! connection still open, stays valid). The file looks like
//!
//! ```json
//! { "version": 1, "names": { "sql.corp": "127.77.0.2" } }
//! ```
//!
//! # Which addresses are handed out
//!
//! Addresses are taken in ascending order, lowest free first, skipping:
//!
//! - the network address of the range (`127.77.0.0`) and its broadcast
//!   address (`127.77.255.255`);
//! - the first host address (`127.77.0.1`): it is kept for the appliance
//!   itself (its tun address, or where its DNS server listens);
//! - every address whose last octet is `0` or `255` (`127.77.1.0`,
//!   `127.77.0.255`): they are valid hosts in a /16, but some stacks and
//!   people take them for network or broadcast addresses, and the range has
//!   plenty of others.
//!
//! An address held by one name is never given to another.
//!
//! # Names
//!
//! Names are case-insensitive: they are stored lower-case, without a trailing
//! dot, and must be valid DNS host names (labels of 1–63 characters from
//! `a-z`, `0-9`, `-`, `_`; at most 253 characters in all). Hosts that are IP
//! literals are skipped by [`NameMap::assign`]: they are routed as they are
//! and need no name.

use std::collections::{BTreeMap, HashSet};
use std::fs;
use std::io;
use std::net::{IpAddr, Ipv4Addr};
use std::path::{Path, PathBuf};

use proto::name::{NameError, canonical_dns_name};
use serde::{Deserialize, Serialize};
use tracing::{info, warn};
use transport::atomic_file::AtomicFile;

use crate::virtual_range::VirtualRange;

/// The version written in the state file.
const STATE_VERSION: u32 = 1;

/// What went wrong while loading, extending or saving the name map.
#[derive(Debug, thiserror::Error)]
pub enum NamesError {
    /// The state file exists but could not be read.
    #[error("cannot read the name map {path}: {source}")]
    Read {
        /// The state file.
        path: PathBuf,
        /// The underlying I/O error.
        source: io::Error,
    },
    /// The state file is not a name map this version understands.
    #[error(
        "the name map {path} is corrupt: {reason}; repair it, or delete it to start afresh \
         (every name then gets a new address)"
    )]
    Corrupt {
        /// The state file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// The state file could not be written.
    #[error("cannot write the name map {path}: {source}")]
    Write {
        /// The state file.
        path: PathBuf,
        /// The underlying I/O error.
        source: io::Error,
    },
    /// A host name is not a valid DNS name.
    #[error(transparent)]
    InvalidName(#[from] NameError),
    /// Every usable address of the range is taken.
    #[error(
        "the virtual range {range} has no free address left for {name:?}; configure a wider range"
    )]
    RangeFull {
        /// The range as configured.
        range: VirtualRange,
        /// The name that found no address.
        name: String,
    },
}

/// The on-disk form of the map.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct StateFile {
    version: u32,
    names: BTreeMap<String, Ipv4Addr>,
}

/// Host names and their stable addresses in the virtual range, backed by a
/// state file.
///
/// Create it once at start with [`NameMap::load_or_create`], then call
/// [`NameMap::assign`] with the configured hosts at start and on every
/// reload; every change is written to the state file before `assign`
/// returns.
#[derive(Debug)]
pub struct NameMap {
    path: PathBuf,
    range: VirtualRange,
    by_name: BTreeMap<String, Ipv4Addr>,
    by_addr: BTreeMap<Ipv4Addr, String>,
}

impl NameMap {
    /// Loads the map from `path`, or creates an empty one there if the file
    /// does not exist.
    ///
    /// Entries whose address lies outside `range` (the range was changed
    /// since they were written) or on a reserved address are dropped with a
    /// warning; their names get new addresses at the next
    /// [`assign`](Self::assign). A file that cannot be parsed, has an unknown
    /// version, an invalid name or two names on one address is an error,
    /// never silently replaced.
    pub fn load_or_create(
        path: impl AsRef<Path>,
        range: VirtualRange,
    ) -> Result<NameMap, NamesError> {
        let path = path.as_ref().to_path_buf();
        let mut map = NameMap {
            path,
            range,
            by_name: BTreeMap::new(),
            by_addr: BTreeMap::new(),
        };
        let text = match fs::read_to_string(&map.path) {
            Ok(text) => text,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                map.save()?;
                return Ok(map);
            }
            Err(source) => {
                return Err(NamesError::Read {
                    path: map.path,
                    source,
                });
            }
        };
        let corrupt = |reason: String| NamesError::Corrupt {
            path: map.path.clone(),
            reason,
        };
        let state: StateFile =
            serde_json::from_str(&text).map_err(|e| corrupt(format!("not valid JSON ({e})")))?;
        if state.version != STATE_VERSION {
            return Err(corrupt(format!(
                "version {} is not the supported version {STATE_VERSION}",
                state.version
            )));
        }
        let mut dropped = false;
        let mut entries = Vec::with_capacity(state.names.len());
        for (name, addr) in state.names {
            let normal = canonical_dns_name(&name).map_err(|e| corrupt(e.to_string()))?;
            if normal != name {
                return Err(corrupt(format!(
                    "name {name:?} is not in canonical form {normal:?}"
                )));
            }
            if !is_assignable(range, addr) {
                warn!(%name, %addr, %range, "stored address is outside the virtual range or reserved; the name gets a new one");
                dropped = true;
                continue;
            }
            entries.push((name, addr));
        }
        for (name, addr) in entries {
            if let Some(other) = map.by_addr.get(&addr) {
                return Err(corrupt(format!(
                    "{addr} is held by both {other:?} and {name:?}"
                )));
            }
            map.by_addr.insert(addr, name.clone());
            map.by_name.insert(name, addr);
        }
        if dropped {
            map.save()?;
        }
        Ok(map)
    }

    /// Gives every name in `names` that has no address yet the lowest free
    /// one, keeps the addresses of names already known (also those not in
    /// `names`: a name dropped from the configuration and added back later
    /// gets its old address), and saves the map if anything changed.
    ///
    /// IP literals are skipped. On error nothing is changed, in memory or on
    /// disk.
    pub fn assign(&mut self, names: &[String]) -> Result<(), NamesError> {
        let mut new_names = Vec::new();
        for name in names {
            if name.trim_end_matches('.').parse::<IpAddr>().is_ok() {
                continue;
            }
            let name = canonical_dns_name(name)?;
            if !self.by_name.contains_key(&name) && !new_names.contains(&name) {
                new_names.push(name);
            }
        }
        if new_names.is_empty() {
            return Ok(());
        }
        let mut taken: HashSet<Ipv4Addr> = self.by_addr.keys().copied().collect();
        let mut candidates = assignable_addrs(self.range);
        let mut added = Vec::with_capacity(new_names.len());
        for name in new_names {
            let addr = candidates
                .by_ref()
                .find(|a| !taken.contains(a))
                .ok_or_else(|| NamesError::RangeFull {
                    range: self.range,
                    name: name.clone(),
                })?;
            taken.insert(addr);
            added.push((name, addr));
        }
        let previous = (self.by_name.clone(), self.by_addr.clone());
        for (name, addr) in &added {
            self.by_name.insert(name.clone(), *addr);
            self.by_addr.insert(*addr, name.clone());
        }
        if let Err(e) = self.save() {
            (self.by_name, self.by_addr) = previous;
            return Err(e);
        }
        for (name, addr) in added {
            info!(%name, %addr, "assigned a virtual address");
        }
        Ok(())
    }

    /// The address of `name` (any case, trailing dot or not), if it has one.
    pub fn lookup_name(&self, name: &str) -> Option<Ipv4Addr> {
        let name = name.strip_suffix('.').unwrap_or(name);
        if name.bytes().any(|b| b.is_ascii_uppercase()) {
            self.by_name.get(&name.to_ascii_lowercase()).copied()
        } else {
            self.by_name.get(name).copied()
        }
    }

    /// The name that holds `addr`, if any.
    pub fn lookup_addr(&self, addr: Ipv4Addr) -> Option<&str> {
        self.by_addr.get(&addr).map(String::as_str)
    }

    /// Every name and its address, in name order.
    pub fn iter(&self) -> impl Iterator<Item = (&str, Ipv4Addr)> + '_ {
        self.by_name.iter().map(|(n, a)| (n.as_str(), *a))
    }

    /// How many names have an address.
    pub fn len(&self) -> usize {
        self.by_name.len()
    }

    /// Whether no name has an address yet.
    pub fn is_empty(&self) -> bool {
        self.by_name.is_empty()
    }

    /// The virtual range the addresses come from.
    pub fn range(&self) -> VirtualRange {
        self.range
    }

    /// The state file backing this map.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Writes the map atomically, so that a crash leaves either the old or
    /// the new map, never half of one.
    fn save(&self) -> Result<(), NamesError> {
        let write_err = |source| NamesError::Write {
            path: self.path.clone(),
            source,
        };
        let state = StateFile {
            version: STATE_VERSION,
            names: self.by_name.clone(),
        };
        let mut text = serde_json::to_vec_pretty(&state)
            .map_err(|e| write_err(io::Error::other(e.to_string())))?;
        text.push(b'\n');
        AtomicFile::new(&self.path).write(&text).map_err(write_err)
    }
}

/// Whether `addr` may be handed out from `range` (see the module docs).
fn is_assignable(range: VirtualRange, addr: Ipv4Addr) -> bool {
    let network = u32::from(range.network());
    let a = u32::from(addr);
    let last = addr.octets()[3];
    range.contains(addr)
        && a != network
        && a != network.wrapping_add(1)
        && addr != range.broadcast()
        && last != 0
        && last != 255
}

/// Every assignable address of `range`, in ascending order.
fn assignable_addrs(range: VirtualRange) -> impl Iterator<Item = Ipv4Addr> {
    let first = u32::from(range.network());
    let last = u32::from(range.broadcast());
    (first..=last)
        .map(Ipv4Addr::from)
        .filter(move |a| is_assignable(range, *a))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn assigns_lowest_free_skipping_reserved() {
        let dir = tempfile::tempdir().unwrap();
        let mut map =
            NameMap::load_or_create(dir.path().join("n.json"), VirtualRange::DEFAULT).unwrap();
        map.assign(&names(&["sql.corp", "payroll.corp"])).unwrap();
        assert_eq!(
            map.lookup_name("sql.corp"),
            Some(Ipv4Addr::new(127, 77, 0, 2))
        );
        assert_eq!(
            map.lookup_name("payroll.corp"),
            Some(Ipv4Addr::new(127, 77, 0, 3))
        );
        assert_eq!(
            map.lookup_addr(Ipv4Addr::new(127, 77, 0, 3)),
            Some("payroll.corp")
        );
        assert_eq!(map.lookup_addr(Ipv4Addr::new(127, 77, 0, 1)), None);
    }

    #[test]
    fn names_are_case_insensitive_and_dot_insensitive() {
        let dir = tempfile::tempdir().unwrap();
        let mut map =
            NameMap::load_or_create(dir.path().join("n.json"), VirtualRange::DEFAULT).unwrap();
        map.assign(&names(&["SQL.Corp.", "sql.corp", "10.4.5.6", "::1"]))
            .unwrap();
        assert_eq!(map.len(), 1);
        let addr = map.lookup_name("sql.corp").unwrap();
        assert_eq!(map.lookup_name("SQL.CORP."), Some(addr));
        assert_eq!(map.iter().collect::<Vec<_>>(), vec![("sql.corp", addr)]);
    }

    #[test]
    fn old_names_keep_addresses_when_new_ones_arrive() {
        let dir = tempfile::tempdir().unwrap();
        let mut map =
            NameMap::load_or_create(dir.path().join("n.json"), VirtualRange::DEFAULT).unwrap();
        map.assign(&names(&["b", "a"])).unwrap();
        let (a, b) = (map.lookup_name("a").unwrap(), map.lookup_name("b").unwrap());
        map.assign(&names(&["c", "a"])).unwrap();
        assert_eq!(map.lookup_name("a"), Some(a));
        assert_eq!(map.lookup_name("b"), Some(b));
        let c = map.lookup_name("c").unwrap();
        assert!(c != a && c != b);
    }

    #[test]
    fn small_range_fills_up_and_skips_dot_zero_and_dot_255() {
        let dir = tempfile::tempdir().unwrap();
        // 10.0.0.252/30: .252 network, .253 reserved, .254 free, .255 broadcast.
        let range: VirtualRange = "10.0.0.252/30".parse().unwrap();
        let mut map = NameMap::load_or_create(dir.path().join("n.json"), range).unwrap();
        map.assign(&names(&["one"])).unwrap();
        assert_eq!(map.lookup_name("one"), Some(Ipv4Addr::new(10, 0, 0, 254)));
        let err = map.assign(&names(&["two"])).unwrap_err();
        assert!(matches!(err, NamesError::RangeFull { .. }), "{err}");
        assert_eq!(map.len(), 1);

        // A /23 crossing an octet: .0 and .255 of each /24 are skipped.
        let range: VirtualRange = "10.1.0.0/23".parse().unwrap();
        let all: Vec<_> = assignable_addrs(range).collect();
        assert_eq!(all.len(), 512 - 5);
        assert!(!all.contains(&Ipv4Addr::new(10, 1, 0, 255)));
        assert!(!all.contains(&Ipv4Addr::new(10, 1, 1, 0)));
        assert_eq!(all.first(), Some(&Ipv4Addr::new(10, 1, 0, 2)));
        assert_eq!(all.last(), Some(&Ipv4Addr::new(10, 1, 1, 254)));
    }

    #[test]
    fn survives_reload_and_rejects_corruption() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("n.json");
        let mut map = NameMap::load_or_create(&path, VirtualRange::DEFAULT).unwrap();
        map.assign(&names(&["x.corp", "y.corp"])).unwrap();
        let before: Vec<_> = map.iter().map(|(n, a)| (n.to_string(), a)).collect();
        drop(map);
        let mut map = NameMap::load_or_create(&path, VirtualRange::DEFAULT).unwrap();
        let after: Vec<_> = map.iter().map(|(n, a)| (n.to_string(), a)).collect();
        assert_eq!(before, after);
        // A new name does not take an address already held.
        map.assign(&names(&["z.corp"])).unwrap();
        assert_eq!(
            map.lookup_name("z.corp"),
            Some(Ipv4Addr::new(127, 77, 0, 4))
        );

        for bad in [
            "not json",
            r#"{"version":2,"names":{}}"#,
            r#"{"version":1,"names":{"a":"127.77.0.2","b":"127.77.0.2"}}"#,
            r#"{"version":1,"names":{"A":"127.77.0.2"}}"#,
            r#"{"version":1,"names":{"a b":"127.77.0.2"}}"#,
            r#"{"version":1,"names":{},"extra":1}"#,
        ] {
            fs::write(&path, bad).unwrap();
            let err = NameMap::load_or_create(&path, VirtualRange::DEFAULT).unwrap_err();
            assert!(matches!(err, NamesError::Corrupt { .. }), "{bad}: {err}");
            assert_eq!(
                fs::read_to_string(&path).unwrap(),
                bad,
                "file left as it was"
            );
        }
    }

    #[test]
    fn range_change_drops_entries_outside_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("n.json");
        fs::write(
            &path,
            r#"{"version":1,"names":{"a":"127.77.0.2","b":"127.78.0.2","c":"127.77.0.1"}}"#,
        )
        .unwrap();
        let mut map = NameMap::load_or_create(&path, VirtualRange::DEFAULT).unwrap();
        assert_eq!(map.lookup_name("a"), Some(Ipv4Addr::new(127, 77, 0, 2)));
        assert_eq!(map.lookup_name("b"), None);
        assert_eq!(map.lookup_name("c"), None);
        map.assign(&names(&["b"])).unwrap();
        assert_eq!(map.lookup_name("b"), Some(Ipv4Addr::new(127, 77, 0, 3)));
    }

    #[test]
    fn unwritable_state_file_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("missing-dir").join("n.json");
        let err = NameMap::load_or_create(&path, VirtualRange::DEFAULT).unwrap_err();
        assert!(matches!(err, NamesError::Write { .. }), "{err}");
    }
}
