//! The registry in one JSON file, `DATA_DIR/registry.json`: the default
//! store, for a relay that runs alone.
//!
//! Every change is written to disk before it becomes visible: the new state
//! goes to a temporary file, which is fsynced, renamed over the old file, and
//! the directory is fsynced, so a crash leaves either the old or the new
//! registry, never a torn one. A registry file that cannot be read or parsed
//! is an error at start, naming the file; it is never silently reset.
//!
//! Format version 1 held a single manage key (`manage_key`); such a file is
//! read with that key as the primary, a fresh secondary is made, and the
//! file is rewritten as version 2 at once.

use std::collections::BTreeMap;
use std::fs;
use std::io;
use std::os::unix::fs::DirBuilderExt;
use std::path::Path;

use proto::key::Key;
use serde::{Deserialize, Serialize};
use transport::atomic_file::AtomicFile;

use super::{
    HcRecord, MANAGE_KEY_FILE, REGISTRY_FILE, REGISTRY_VERSION, REGISTRY_VERSION_ONE_MANAGE_KEY,
    RegistryError, SlotKeys, State,
};

/// The registry in `dir`, made (empty, with fresh manage keys) on first
/// start; a file in the older format is rewritten in the current one.
pub(super) fn load_or_create(dir: &Path) -> Result<State, RegistryError> {
    create_data_dir(dir)?;
    let path = dir.join(REGISTRY_FILE);
    match fs::read(&path) {
        Ok(bytes) => {
            let (state, migrated) = parse_file(&path, &bytes)?;
            if migrated {
                save(dir, &state)?;
                tracing::info!(
                    path = %path.display(),
                    "registry upgraded to format version {REGISTRY_VERSION}: the manage key is now the primary, and a secondary manage key was made"
                );
            }
            Ok(state)
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            let state = State {
                manage_keys: SlotKeys::generate()?,
                hcs: BTreeMap::new(),
            };
            save(dir, &state)?;
            Ok(state)
        }
        Err(source) => Err(RegistryError::Read { path, source }),
    }
}

/// The registry in `dir` as it is, for copying elsewhere: nothing is
/// created or rewritten, and a missing `registry.json` is an error.
pub(super) fn read_existing(dir: &Path) -> Result<State, RegistryError> {
    read_state(&dir.join(REGISTRY_FILE))
}

/// The state a file in `registry.json`'s format holds, as it is.
fn read_state(path: &Path) -> Result<State, RegistryError> {
    let bytes = fs::read(path).map_err(|source| RegistryError::Read {
        path: path.to_owned(),
        source,
    })?;
    Ok(parse_file(path, &bytes)?.0)
}

/// The registry cached in `dir` ([`CACHE_FILE`]).
pub(super) fn read_cache(dir: &Path) -> Result<State, RegistryError> {
    read_state(&dir.join(CACHE_FILE))
}

/// What `registry.json` holds.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct RegistryFile {
    version: u32,
    manage_keys: SlotKeys,
    hcs: Vec<HcRecord>,
}

/// What `registry.json` held in format version 1: one manage key.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RegistryFileOneManageKey {
    #[allow(dead_code)] // Checked before this is parsed.
    version: u32,
    manage_key: Key,
    hcs: Vec<HcRecord>,
}

/// Just the version of a `registry.json`, to know how to read the rest.
#[derive(Debug, Deserialize)]
struct VersionOnly {
    version: u32,
}

pub(super) fn create_data_dir(dir: &Path) -> Result<(), RegistryError> {
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|source| RegistryError::CreateDir {
            path: dir.to_owned(),
            source,
        })
}

/// The state a `registry.json` holds, and whether it was in an older format
/// (to be rewritten in the current one).
pub(super) fn parse_file(path: &Path, bytes: &[u8]) -> Result<(State, bool), RegistryError> {
    let corrupt = |source| RegistryError::Corrupt {
        path: path.to_owned(),
        source,
    };
    let version = serde_json::from_slice::<VersionOnly>(bytes)
        .map_err(corrupt)?
        .version;
    let (manage_keys, hcs, migrated) = match version {
        REGISTRY_VERSION => {
            let file: RegistryFile = serde_json::from_slice(bytes).map_err(corrupt)?;
            (file.manage_keys, file.hcs, false)
        }
        REGISTRY_VERSION_ONE_MANAGE_KEY => {
            let file: RegistryFileOneManageKey = serde_json::from_slice(bytes).map_err(corrupt)?;
            let keys = SlotKeys {
                primary: file.manage_key,
                secondary: Key::generate()?,
            };
            (keys, file.hcs, true)
        }
        found => {
            return Err(RegistryError::UnsupportedVersion {
                path: path.to_owned(),
                found,
            });
        }
    };
    let mut by_name = BTreeMap::new();
    for hc in hcs {
        let name = hc.name.clone();
        if by_name.insert(name.clone(), hc).is_some() {
            return Err(RegistryError::DuplicateInFile {
                path: path.to_owned(),
                name,
            });
        }
    }
    let state = State {
        manage_keys,
        hcs: by_name,
    };
    Ok((state, migrated))
}

pub(super) fn save(dir: &Path, state: &State) -> Result<(), RegistryError> {
    save_as(dir, REGISTRY_FILE, state)
}

/// A relay on etcd's copy of the registry it last saw, in the format of
/// `registry.json`, for `--serve-from-cache`.
pub(super) const CACHE_FILE: &str = "registry-cache.json";

/// Writes `state` to `dir/name` in the format of `registry.json`.
pub(super) fn save_as(dir: &Path, name: &str, state: &State) -> Result<(), RegistryError> {
    let file = RegistryFile {
        version: REGISTRY_VERSION,
        manage_keys: state.manage_keys.clone(),
        hcs: state.hcs.values().cloned().collect(),
    };
    let mut json = serde_json::to_vec_pretty(&file).map_err(|e| RegistryError::Write {
        path: dir.join(name),
        source: io::Error::other(e),
    })?;
    json.push(b'\n');
    let path = dir.join(name);
    AtomicFile::new(&path)
        .mode(0o600)
        .write(&json)
        .map_err(|source| RegistryError::Write { path, source })
}

pub(super) fn sync_manage_key_file(dir: &Path, key: &Key) -> Result<(), RegistryError> {
    let path = dir.join(MANAGE_KEY_FILE);
    let current = match fs::read_to_string(&path) {
        Ok(text) => Some(text),
        Err(e) if e.kind() == io::ErrorKind::NotFound => None,
        Err(source) => return Err(RegistryError::Read { path, source }),
    };
    if current.as_deref().map(str::trim) != Some(key.as_str()) {
        let text = format!("{}\n", key.as_str());
        AtomicFile::new(&path)
            .mode(0o600)
            .write(text.as_bytes())
            .map_err(|source| RegistryError::Write { path, source })?;
    }
    Ok(())
}
