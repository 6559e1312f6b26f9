//! The hybrid-connection registry: every HC the relay knows, its endpoint and
//! its keys, plus the relay-wide `manage` rule's two keys.
//!
//! The registry is held in memory and kept in a *store*: by default one
//! JSON file, `DATA_DIR/registry.json` (mode 0600: it holds every key; see
//! [`file`](self::file)). Every change goes to the store before it becomes
//! visible, and a change that the store refuses changes nothing.
//!
//! The primary manage key is also written to `DATA_DIR/manage.key` (mode
//! 0600) so that the CLI on the same host can authenticate to the management
//! API; the store is authoritative and `manage.key` is rewritten from it at
//! start when it is missing or differs, and whenever the primary is
//! regenerated. Like every rule, `manage` has a primary and a secondary key,
//! so that one can be replaced while the tools that manage the relay move to
//! the other.
//!
//! Changes are announced on a broadcast channel ([`Registry::subscribe`]) so
//! that the control server can end sessions whose key was regenerated or
//! whose HC was deleted. The events are worked out from the records before
//! and after each change ([`hc_events`]), so they are the same whoever made
//! the change.

use std::collections::BTreeMap;
use std::io;
use std::num::NonZeroU16;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{SystemTime, UNIX_EPOCH};

use proto::key::{Key, KeyError, KeySlot, Right};
use proto::name::{Endpoint, HcName, Host};
use proto::sas::RuleKeys;
use serde::{Deserialize, Serialize};
use thiserror::Error;
use tokio::sync::{broadcast, watch};

pub mod etcd;
mod file;

/// File name of the registry inside the data directory.
pub const REGISTRY_FILE: &str = "registry.json";

/// File name of the manage key inside the data directory.
pub const MANAGE_KEY_FILE: &str = "manage.key";

/// Version of the `registry.json` format this code writes (it also reads
/// version 1, [`REGISTRY_VERSION_ONE_MANAGE_KEY`]).
pub const REGISTRY_VERSION: u32 = 2;

/// The format version that held a single manage key.
pub const REGISTRY_VERSION_ONE_MANAGE_KEY: u32 = 1;

/// How many events a slow subscriber may fall behind before it sees
/// [`broadcast::error::RecvError::Lagged`].
const EVENT_CAPACITY: usize = 256;

/// Why the registry could not be opened or changed.
#[derive(Debug, Error)]
pub enum RegistryError {
    /// `--serve-from-cache` with etcd not answering and no usable cache.
    #[error(
        "{why}; and there is no registry cache to serve from ({cache}): the cache is written while this relay runs with etcd, so start it once with etcd answering"
    )]
    NoCache {
        /// Why etcd was not used.
        why: String,
        /// Why the cache could not be read.
        cache: String,
    },
    /// The data directory could not be created.
    #[error("cannot create data directory {path}: {source}")]
    CreateDir {
        /// The directory.
        path: PathBuf,
        /// The OS error.
        source: io::Error,
    },
    /// A file exists but cannot be read.
    #[error(
        "cannot read {path}: {source}; check its permissions (the relay never replaces a registry it cannot read)"
    )]
    Read {
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: io::Error,
    },
    /// `registry.json` is not a valid registry.
    #[error(
        "{path} is corrupt: {source}; restore it from a backup or fix it by hand (the relay never replaces a corrupt registry)"
    )]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// What the JSON parser found.
        source: serde_json::Error,
    },
    /// `registry.json` was written by a newer version.
    #[error(
        "{path} has format version {found}, but this relay reads versions 1 and {REGISTRY_VERSION}; run a newer hybridlink"
    )]
    UnsupportedVersion {
        /// The file.
        path: PathBuf,
        /// The version found in the file.
        found: u32,
    },
    /// `registry.json` lists one HC twice.
    #[error("{path} is corrupt: hybrid connection {name} appears twice; remove one by hand")]
    DuplicateInFile {
        /// The file.
        path: PathBuf,
        /// The repeated name.
        name: HcName,
    },
    /// A file could not be written.
    #[error("cannot write {path}: {source}; the change was not made")]
    Write {
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: io::Error,
    },
    /// A new key could not be made.
    #[error(transparent)]
    Key(#[from] KeyError),
    /// `create` with a name already in use.
    #[error("hybrid connection {0} already exists; pick another name or delete it first")]
    Duplicate(HcName),
    /// No HC of that name.
    #[error("hybrid connection {0} does not exist; see `hybridlink hc list`")]
    NotFound(HcName),
    /// Regenerate of a rule HCs do not have.
    #[error("hybrid connections have no {0} rule; regenerate send or listen")]
    NoSuchRule(Right),
    /// The primary manage key was replaced and saved in `registry.json`, but
    /// `manage.key` could not be rewritten.
    #[error(
        "the primary manage key was regenerated, but {path} could not be rewritten: {source}; the relay rewrites it at its next start (until then use the secondary key, or read the new one with `hybridlink hc manage-keys show`)"
    )]
    ManageKeyFile {
        /// `manage.key`.
        path: PathBuf,
        /// The OS error.
        source: io::Error,
    },
    /// The registry in etcd could not be read or changed.
    #[error(transparent)]
    Etcd(#[from] etcd::EtcdError),
    /// `create` beyond the relay's limit of hybrid connections.
    #[error(
        "this relay already holds {0} hybrid connections, its limit (relay serve --max-hcs); delete one first"
    )]
    Quota(usize),
}

/// The two keys of one rule.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SlotKeys {
    /// The primary key.
    pub primary: Key,
    /// The secondary key.
    pub secondary: Key,
}

impl SlotKeys {
    /// Two fresh random keys.
    pub fn generate() -> Result<SlotKeys, KeyError> {
        Ok(SlotKeys {
            primary: Key::generate()?,
            secondary: Key::generate()?,
        })
    }

    /// The key in `slot`.
    pub fn get(&self, slot: KeySlot) -> &Key {
        match slot {
            KeySlot::Primary => &self.primary,
            KeySlot::Secondary => &self.secondary,
        }
    }

    fn get_mut(&mut self, slot: KeySlot) -> &mut Key {
        match slot {
            KeySlot::Primary => &mut self.primary,
            KeySlot::Secondary => &mut self.secondary,
        }
    }
}

/// One hybrid connection as the relay stores it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HcRecord {
    /// The HC's name.
    pub name: HcName,
    /// The `host:port` agents dial for it.
    pub endpoint: Endpoint,
    /// When it was created, seconds since the Unix epoch.
    pub created_unix: u64,
    /// Keys of the `send` rule.
    pub send: SlotKeys,
    /// Keys of the `listen` rule.
    pub listen: SlotKeys,
    /// Keys replaced by `regenerate`, newest last (at most
    /// [`RETIRED_KEYS_KEPT`]): they no longer open anything, but a token
    /// signed with one is refused as "regenerated", not as a forgery.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub retired: Vec<RetiredKey>,
}

/// How many replaced keys an HC remembers.
pub const RETIRED_KEYS_KEPT: usize = 4;

/// A key that `regenerate` replaced.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RetiredKey {
    /// The rule it belonged to.
    pub right: Right,
    /// Its slot.
    pub slot: KeySlot,
    /// The key.
    pub key: Key,
    /// When it was replaced, seconds since the Unix epoch.
    pub retired_unix: u64,
}

impl HcRecord {
    /// The keys of the rule granting `right`; `None` for [`Right::Manage`],
    /// which is relay-wide.
    pub fn keys(&self, right: Right) -> Option<&SlotKeys> {
        match right {
            Right::Send => Some(&self.send),
            Right::Listen => Some(&self.listen),
            Right::Manage => None,
        }
    }

    /// If `token` was signed with a key that `regenerate` replaced, when that
    /// was: the reason to give instead of "bad signature".
    pub fn regenerated_at(&self, token: &str, needed: Right, now_unix: u64) -> Option<u64> {
        self.retired.iter().rev().find_map(|r| {
            let rule = RuleKeys {
                name: r.right.rule_name(),
                right: r.right,
                primary: &r.key,
                secondary: &r.key,
            };
            proto::sas::verify(token, &self.name, needed, &[rule], now_unix)
                .ok()
                .map(|_| r.retired_unix)
        })
    }

    /// The HC's two rules, `send` and `listen`, for [`proto::sas::verify`].
    pub fn rules(&self) -> [RuleKeys<'_>; 2] {
        [
            RuleKeys {
                name: Right::Send.rule_name(),
                right: Right::Send,
                primary: &self.send.primary,
                secondary: &self.send.secondary,
            },
            RuleKeys {
                name: Right::Listen.rule_name(),
                right: Right::Listen,
                primary: &self.listen.primary,
                secondary: &self.listen.secondary,
            },
        ]
    }
}

/// A change to the registry, announced after it is on disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RegistryEvent {
    /// An HC was created.
    Created {
        /// Its name.
        name: HcName,
    },
    /// An HC was deleted: end all its sessions.
    Deleted {
        /// Its name.
        name: HcName,
    },
    /// One key of one rule of an HC was regenerated: end the sessions that
    /// authenticated with that rule and slot.
    KeysChanged {
        /// The HC.
        name: HcName,
        /// The rule whose key changed.
        right: Right,
        /// The slot that changed.
        slot: KeySlot,
    },
    /// An HC's endpoint changed.
    Updated {
        /// Its name.
        name: HcName,
    },
    /// One of the two manage keys was regenerated. The management API checks
    /// every request against the current keys, so nothing has to end.
    ManageKeyRegenerated {
        /// The slot that changed.
        slot: KeySlot,
    },
}

impl RegistryEvent {
    /// The HC the change is about, if it is about one.
    pub fn hc(&self) -> Option<&HcName> {
        match self {
            RegistryEvent::Created { name }
            | RegistryEvent::Deleted { name }
            | RegistryEvent::KeysChanged { name, .. }
            | RegistryEvent::Updated { name } => Some(name),
            RegistryEvent::ManageKeyRegenerated { .. } => None,
        }
    }
}
/// What the registry holds.
#[derive(Debug, Clone)]
struct State {
    manage_keys: SlotKeys,
    hcs: BTreeMap<HcName, HcRecord>,
}

/// Whether the registry's store takes changes now: the file always does;
/// a relay on etcd keeps serving the registry it knows while etcd does not
/// answer, and refuses changes until it does.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct StoreHealth {
    /// `file` or `etcd`.
    pub store: &'static str,
    /// Whether changes are taken.
    pub writable: bool,
    /// Since when (Unix seconds) the store has been in this state.
    pub since_unix: u64,
    /// The same instant on this machine's monotonic clock.
    #[serde(skip)]
    pub since: std::time::Instant,
    /// Why changes are refused, when they are.
    pub error: Option<String>,
}

impl StoreHealth {
    fn up(store: &'static str) -> StoreHealth {
        StoreHealth {
            store,
            writable: true,
            since_unix: unix_now(),
            since: std::time::Instant::now(),
            error: None,
        }
    }
}

/// The in-memory registry that every clone of a [`Registry`] (and a store
/// that learns of changes by itself) reads and changes.
#[derive(Debug)]
struct Shared {
    /// The data directory, where `manage.key` is kept.
    dir: PathBuf,
    state: Mutex<State>,
    events: broadcast::Sender<RegistryEvent>,
    health: watch::Sender<StoreHealth>,
}

impl Shared {
    fn new(dir: &Path, state: State, store: &'static str) -> Shared {
        let (events, _) = broadcast::channel(EVENT_CAPACITY);
        Shared {
            dir: dir.to_owned(),
            state: Mutex::new(state),
            events,
            health: watch::channel(StoreHealth::up(store)).0,
        }
    }

    /// Records that the store takes changes again (`None`) or does not
    /// (`Some(why)`); logs and stamps only a change of state.
    fn set_health(&self, refused: Option<String>) {
        self.health.send_if_modified(|h| {
            if h.writable == refused.is_none() {
                if refused.is_some() && h.error != refused {
                    h.error = refused;
                    return true;
                }
                return false;
            }
            match &refused {
                Some(why) => tracing::warn!(store = h.store, error = %why, "the registry's store does not answer: serving the registry this relay knows; management changes are refused until it answers"),
                None => tracing::info!(store = h.store, "the registry's store answers again; management changes are taken"),
            }
            *h = StoreHealth {
                store: h.store,
                writable: refused.is_none(),
                since_unix: unix_now(),
                since: std::time::Instant::now(),
                error: refused,
            };
            true
        });
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock cannot leave the state half-changed:
        // every change builds the new value first and then stores it.
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Makes `new` the record of `name` (`None`: no such HC) and announces
    /// what changed.
    fn apply_hc(&self, name: &HcName, new: Option<HcRecord>) {
        let mut state = self.lock();
        let old = match new {
            Some(record) => state.hcs.insert(name.clone(), record),
            None => state.hcs.remove(name),
        };
        let events = hc_events(name, old.as_ref(), state.hcs.get(name));
        drop(state);
        self.announce(events);
    }

    /// Makes `new` the manage keys and announces which slots changed.
    fn apply_manage_keys(&self, new: SlotKeys) {
        let mut state = self.lock();
        let old = std::mem::replace(&mut state.manage_keys, new);
        let events = manage_key_events(&old, &state.manage_keys);
        drop(state);
        self.announce(events);
    }

    fn announce(&self, events: Vec<RegistryEvent>) {
        for event in events {
            // No subscribers is fine.
            let _ = self.events.send(event);
        }
    }
}

/// A change of one HC's record: given the current record and the number of
/// HCs, the new record (`None`: delete it) and what to return.
type HcEdit<'a, T> =
    dyn FnMut(Option<&HcRecord>, usize) -> Result<(Option<HcRecord>, T), RegistryError> + 'a;

/// Where the registry is kept.
#[derive(Debug)]
enum Store {
    /// `registry.json` in the data directory ([`file`]).
    File,
    /// etcd, shared with other relays ([`etcd`]).
    Etcd(Box<etcd::EtcdStore>),
}

#[derive(Debug)]
struct Inner {
    shared: Arc<Shared>,
    store: Store,
    /// The most HCs `create` allows.
    max_hcs: std::sync::atomic::AtomicUsize,
}

/// The registry of hybrid connections, shared by the management API and the
/// control server. Cheap to clone; all clones see the same state.
///
/// Reads are from memory. The methods that change the registry block on the
/// store (a write and two fsyncs for the file); call them from
/// `tokio::task::spawn_blocking` in async code.
#[derive(Debug, Clone)]
pub struct Registry {
    inner: Arc<Inner>,
}

impl Registry {
    /// Opens the registry in `dir`, creating the directory (mode 0700), a new
    /// empty registry and a new manage key on first start.
    pub fn open(dir: &Path) -> Result<Registry, RegistryError> {
        let state = file::load_or_create(dir)?;
        Registry::with_store(dir, state, Store::File)
    }

    /// Opens the registry kept in etcd, shared with the other relays that
    /// use the same etcd and prefix, and follows its changes from then on;
    /// `dir` is this relay's data directory, which gets `manage.key`. Fails,
    /// rather than start with an empty registry, when etcd does not answer.
    /// Call from within a multi-threaded tokio runtime.
    pub async fn open_etcd(
        dir: &Path,
        config: &etcd::EtcdConfig,
    ) -> Result<Registry, RegistryError> {
        file::create_data_dir(dir)?;
        let loaded = match etcd::connect_and_load(config).await {
            Ok(loaded) => loaded,
            Err(RegistryError::Etcd(e @ etcd::EtcdError::Connect { .. }))
                if config.serve_from_cache =>
            {
                return Registry::open_etcd_cache(dir, config, e);
            }
            Err(e) => return Err(e),
        };
        tracing::info!(
            etcd = %loaded.endpoints,
            prefix = %config.prefix,
            hcs = loaded.state.hcs.len(),
            revision = loaded.revision,
            "registry read from etcd; following its changes"
        );
        file::sync_manage_key_file(dir, &loaded.state.manage_keys.primary)?;
        let shared = Arc::new(Shared::new(dir, loaded.state, "etcd"));
        let store = etcd::EtcdStore::start(
            loaded.client,
            loaded.layout,
            loaded.endpoints,
            loaded.revision,
            shared.clone(),
        );
        Ok(Registry::with_shared(shared, Store::Etcd(Box::new(store))))
    }

    /// `--serve-from-cache` with etcd not answering (`why`): the registry
    /// this relay last saw, unwritable until etcd answers.
    fn open_etcd_cache(
        dir: &Path,
        config: &etcd::EtcdConfig,
        why: etcd::EtcdError,
    ) -> Result<Registry, RegistryError> {
        let state = file::read_cache(dir).map_err(|e| RegistryError::NoCache {
            why: why.to_string(),
            cache: e.to_string(),
        })?;
        tracing::warn!(
            error = %why,
            hcs = state.hcs.len(),
            cache = %dir.join(file::CACHE_FILE).display(),
            "etcd does not answer: serving the registry this relay last saw; changes are refused until etcd answers"
        );
        file::sync_manage_key_file(dir, &state.manage_keys.primary)?;
        let shared = Arc::new(Shared::new(dir, state, "etcd"));
        shared.set_health(Some(format!("not reached since start: {why}")));
        let store =
            etcd::EtcdStore::start_from_cache(config.clone(), config.describe(), shared.clone());
        Ok(Registry::with_shared(shared, Store::Etcd(Box::new(store))))
    }

    fn with_store(dir: &Path, state: State, store: Store) -> Result<Registry, RegistryError> {
        file::sync_manage_key_file(dir, &state.manage_keys.primary)?;
        Ok(Registry::with_shared(
            Arc::new(Shared::new(dir, state, "file")),
            store,
        ))
    }

    fn with_shared(shared: Arc<Shared>, store: Store) -> Registry {
        Registry {
            inner: Arc::new(Inner {
                shared,
                store,
                max_hcs: std::sync::atomic::AtomicUsize::new(usize::MAX),
            }),
        }
    }

    /// Limits `create` to `max` hybrid connections in all (the ones already
    /// there stay).
    pub fn set_max_hcs(&self, max: usize) {
        self.inner
            .max_hcs
            .store(max, std::sync::atomic::Ordering::Relaxed);
    }

    /// The data directory this registry's node keeps `manage.key` in.
    pub fn dir(&self) -> &Path {
        &self.inner.shared.dir
    }

    /// Whether the store takes changes now, and since when.
    pub fn health(&self) -> StoreHealth {
        self.inner.shared.health.borrow().clone()
    }

    /// Changes whenever [`Registry::health`] does.
    pub fn health_changes(&self) -> watch::Receiver<StoreHealth> {
        self.inner.shared.health.subscribe()
    }

    /// Every HC, sorted by name.
    pub fn list(&self) -> Vec<HcRecord> {
        self.lock().hcs.values().cloned().collect()
    }

    /// The HC called `name`, if any.
    pub fn get(&self, name: &HcName) -> Option<HcRecord> {
        self.lock().hcs.get(name).cloned()
    }

    /// The relay-wide primary manage key (the one in `manage.key`).
    pub fn manage_key(&self) -> Key {
        self.lock().manage_keys.primary.clone()
    }

    /// Both manage keys; either one opens the management API.
    pub fn manage_keys(&self) -> SlotKeys {
        self.lock().manage_keys.clone()
    }

    /// Replaces one manage key with a fresh one and returns both. Requests
    /// made with the old key are refused from now on; the other key keeps
    /// working. A new primary is also written to `manage.key`.
    pub fn regenerate_manage_key(&self, slot: KeySlot) -> Result<SlotKeys, RegistryError> {
        let key = Key::generate()?;
        let keys = self.change_manage_keys(|keys| {
            let mut keys = keys.clone();
            *keys.get_mut(slot) = key.clone();
            keys
        })?;
        if slot == KeySlot::Primary {
            file::sync_manage_key_file(self.dir(), &keys.primary).map_err(|e| match e {
                RegistryError::Write { path, source } | RegistryError::Read { path, source } => {
                    RegistryError::ManageKeyFile { path, source }
                }
                other => other,
            })?;
        }
        Ok(keys)
    }

    /// Creates an HC with fresh keys. Fails if the name is taken.
    pub fn create(&self, name: HcName, endpoint: Endpoint) -> Result<HcRecord, RegistryError> {
        let record = HcRecord {
            name: name.clone(),
            endpoint,
            created_unix: unix_now(),
            send: SlotKeys::generate()?,
            listen: SlotKeys::generate()?,
            retired: Vec::new(),
        };
        let max = self
            .inner
            .max_hcs
            .load(std::sync::atomic::Ordering::Relaxed);
        self.change_hc(&name, |old, count| {
            if old.is_some() {
                return Err(RegistryError::Duplicate(name.clone()));
            }
            if count >= max {
                return Err(RegistryError::Quota(max));
            }
            Ok((Some(record.clone()), record.clone()))
        })
    }

    /// Deletes an HC and returns what it was.
    pub fn delete(&self, name: &HcName) -> Result<HcRecord, RegistryError> {
        self.change_hc(name, |old, _| {
            let old = old.ok_or_else(|| RegistryError::NotFound(name.clone()))?;
            Ok((None, old.clone()))
        })
    }

    /// Replaces one key of one rule (`send` or `listen`) of an HC with a
    /// fresh one and returns the updated HC.
    pub fn regenerate(
        &self,
        name: &HcName,
        right: Right,
        slot: KeySlot,
    ) -> Result<HcRecord, RegistryError> {
        if right == Right::Manage {
            return Err(RegistryError::NoSuchRule(right));
        }
        let key = Key::generate()?;
        self.change_hc(name, |old, _| {
            let mut hc = old
                .ok_or_else(|| RegistryError::NotFound(name.clone()))?
                .clone();
            let keys = match right {
                Right::Send => &mut hc.send,
                _ => &mut hc.listen,
            };
            let old = std::mem::replace(keys.get_mut(slot), key.clone());
            hc.retired.push(RetiredKey {
                right,
                slot,
                key: old,
                retired_unix: unix_now(),
            });
            let excess = hc.retired.len().saturating_sub(RETIRED_KEYS_KEPT);
            hc.retired.drain(..excess);
            Ok((Some(hc.clone()), hc))
        })
    }

    /// Changes the host, the port or both of an HC and returns the updated
    /// HC. What is not given is kept as the store has it at the change, not
    /// as this relay last saw it: through a relay whose view lags, a port
    /// change neither undoes a host change made elsewhere nor misses an HC
    /// just made elsewhere.
    pub fn update_endpoint(
        &self,
        name: &HcName,
        host: Option<Host>,
        port: Option<NonZeroU16>,
    ) -> Result<HcRecord, RegistryError> {
        self.change_hc(name, |old, _| {
            let mut hc = old
                .ok_or_else(|| RegistryError::NotFound(name.clone()))?
                .clone();
            hc.endpoint = hc.endpoint.with(host.clone(), port);
            Ok((Some(hc.clone()), hc))
        })
    }

    /// A receiver of every change made after this call.
    pub fn subscribe(&self) -> broadcast::Receiver<RegistryEvent> {
        self.inner.shared.events.subscribe()
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.inner.shared.lock()
    }

    /// Changes the record of `name` in the store, then in memory, and
    /// announces what changed. `edit` gets the current record and the number
    /// of HCs, and returns the new record (`None`: delete it) and what to
    /// return; an error from it changes nothing. A store shared with other
    /// relays may call `edit` more than once, with fresher records.
    fn change_hc<T>(
        &self,
        name: &HcName,
        mut edit: impl FnMut(Option<&HcRecord>, usize) -> Result<(Option<HcRecord>, T), RegistryError>,
    ) -> Result<T, RegistryError> {
        let shared = &self.inner.shared;
        match &self.inner.store {
            Store::File => {
                let mut state = shared.lock();
                let (new, out) = edit(state.hcs.get(name), state.hcs.len())?;
                let mut next = state.clone();
                let old = match new {
                    Some(record) => next.hcs.insert(name.clone(), record),
                    None => next.hcs.remove(name),
                };
                file::save(&shared.dir, &next)?;
                let events = hc_events(name, old.as_ref(), next.hcs.get(name));
                *state = next;
                drop(state);
                shared.announce(events);
                Ok(out)
            }
            Store::Etcd(store) => store.change_hc(name, &mut edit),
        }
    }

    /// Changes the manage keys in the store, then in memory, and returns
    /// them.
    fn change_manage_keys(
        &self,
        mut edit: impl FnMut(&SlotKeys) -> SlotKeys,
    ) -> Result<SlotKeys, RegistryError> {
        let shared = &self.inner.shared;
        match &self.inner.store {
            Store::File => {
                let mut state = shared.lock();
                let mut next = state.clone();
                next.manage_keys = edit(&state.manage_keys);
                file::save(&shared.dir, &next)?;
                let events = manage_key_events(&state.manage_keys, &next.manage_keys);
                let keys = next.manage_keys.clone();
                *state = next;
                drop(state);
                shared.announce(events);
                Ok(keys)
            }
            Store::Etcd(store) => store.change_manage_keys(&mut edit),
        }
    }
}

/// What changed between two versions of the record of `name` (`None`: no
/// such HC), in the order the hub should hear it.
pub fn hc_events(
    name: &HcName,
    old: Option<&HcRecord>,
    new: Option<&HcRecord>,
) -> Vec<RegistryEvent> {
    let name = name.clone();
    match (old, new) {
        (None, None) => Vec::new(),
        (None, Some(_)) => vec![RegistryEvent::Created { name }],
        (Some(_), None) => vec![RegistryEvent::Deleted { name }],
        (Some(old), Some(new)) => {
            let mut events = Vec::new();
            for (right, before, after) in [
                (Right::Send, &old.send, &new.send),
                (Right::Listen, &old.listen, &new.listen),
            ] {
                for slot in [KeySlot::Primary, KeySlot::Secondary] {
                    if before.get(slot) != after.get(slot) {
                        events.push(RegistryEvent::KeysChanged {
                            name: name.clone(),
                            right,
                            slot,
                        });
                    }
                }
            }
            if old.endpoint != new.endpoint {
                events.push(RegistryEvent::Updated { name });
            }
            events
        }
    }
}

/// Which manage keys changed.
fn manage_key_events(old: &SlotKeys, new: &SlotKeys) -> Vec<RegistryEvent> {
    [KeySlot::Primary, KeySlot::Secondary]
        .into_iter()
        .filter(|&slot| old.get(slot) != new.get(slot))
        .map(|slot| RegistryEvent::ManageKeyRegenerated { slot })
        .collect()
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proto::sas;
    use std::fs;
    use std::os::unix::fs::{MetadataExt, PermissionsExt};

    fn name(s: &str) -> HcName {
        s.parse().unwrap()
    }

    fn endpoint(s: &str) -> Endpoint {
        s.parse().unwrap()
    }

    fn host(s: &str) -> Host {
        s.parse().unwrap()
    }

    #[test]
    fn first_open_makes_an_empty_registry_and_a_manage_key() {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data");
        let registry = Registry::open(&data).unwrap();
        assert!(registry.list().is_empty());
        let key = registry.manage_key();
        assert_eq!(key.as_str().len(), 44);
        let on_disk = fs::read_to_string(data.join(MANAGE_KEY_FILE)).unwrap();
        assert_eq!(on_disk.trim(), key.as_str());
        for file in [MANAGE_KEY_FILE, REGISTRY_FILE] {
            let mode = fs::metadata(data.join(file)).unwrap().mode() & 0o777;
            assert_eq!(mode, 0o600, "{file}");
        }
        assert_eq!(fs::metadata(&data).unwrap().mode() & 0o777, 0o700);
        // Reopening keeps the key.
        assert_eq!(Registry::open(&data).unwrap().manage_key(), key);
    }

    #[test]
    fn changes_persist_across_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let registry = Registry::open(dir.path()).unwrap();
        let payroll = registry
            .create(name("payroll"), endpoint("sql.corp:1433"))
            .unwrap();
        registry
            .create(name("billing"), endpoint("10.4.5.6:5432"))
            .unwrap();
        assert_ne!(payroll.send.primary, payroll.send.secondary);
        assert_ne!(payroll.send.primary, payroll.listen.primary);
        assert!(payroll.created_unix > 1_700_000_000);
        let regenerated = registry
            .regenerate(&name("payroll"), Right::Listen, KeySlot::Secondary)
            .unwrap();
        assert_ne!(regenerated.listen.secondary, payroll.listen.secondary);
        assert_eq!(regenerated.listen.primary, payroll.listen.primary);
        assert_eq!(regenerated.send, payroll.send);
        registry
            .update_endpoint(&name("billing"), Some(host("10.4.5.7")), None)
            .unwrap();
        registry
            .update_endpoint(&name("billing"), None, NonZeroU16::new(5433))
            .unwrap();

        let reopened = Registry::open(dir.path()).unwrap();
        let names: Vec<String> = reopened.list().iter().map(|h| h.name.to_string()).collect();
        assert_eq!(names, ["billing", "payroll"]);
        assert_eq!(reopened.get(&name("payroll")).unwrap(), regenerated);
        assert_eq!(
            reopened.get(&name("billing")).unwrap().endpoint,
            endpoint("10.4.5.7:5433")
        );
        assert_eq!(reopened.manage_key(), registry.manage_key());

        reopened.delete(&name("payroll")).unwrap();
        assert!(
            Registry::open(dir.path())
                .unwrap()
                .get(&name("payroll"))
                .is_none()
        );
        let leftovers: Vec<_> = fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .filter(|n| n.contains(".tmp"))
            .collect();
        assert!(leftovers.is_empty(), "{leftovers:?}");
    }

    #[test]
    fn errors_for_duplicates_unknown_names_and_manage() {
        let dir = tempfile::tempdir().unwrap();
        let registry = Registry::open(dir.path()).unwrap();
        registry
            .create(name("payroll"), endpoint("sql:1433"))
            .unwrap();
        let err = registry
            .create(name("payroll"), endpoint("other:1"))
            .unwrap_err();
        assert!(matches!(err, RegistryError::Duplicate(_)));
        assert_eq!(
            err.to_string(),
            "hybrid connection payroll already exists; pick another name or delete it first"
        );
        assert_eq!(
            registry.get(&name("payroll")).unwrap().endpoint,
            endpoint("sql:1433")
        );
        let err = registry.delete(&name("nope")).unwrap_err();
        assert_eq!(
            err.to_string(),
            "hybrid connection nope does not exist; see `hybridlink hc list`"
        );
        assert!(matches!(
            registry.regenerate(&name("nope"), Right::Send, KeySlot::Primary),
            Err(RegistryError::NotFound(_))
        ));
        assert!(matches!(
            registry.regenerate(&name("payroll"), Right::Manage, KeySlot::Primary),
            Err(RegistryError::NoSuchRule(Right::Manage))
        ));
    }

    #[test]
    fn corrupt_or_unreadable_files_are_errors_naming_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let registry = Registry::open(dir.path()).unwrap();
        registry.create(name("payroll"), endpoint("sql:1")).unwrap();
        let path = dir.path().join(REGISTRY_FILE);
        let good = fs::read(&path).unwrap();

        fs::write(&path, &good[..good.len() / 2]).unwrap();
        let err = Registry::open(dir.path()).unwrap_err();
        assert!(matches!(err, RegistryError::Corrupt { .. }));
        let msg = err.to_string();
        assert!(
            msg.starts_with(&format!("{} is corrupt: ", path.display())),
            "{msg}"
        );
        assert!(msg.contains("never replaces a corrupt registry"), "{msg}");
        // The corrupt file was left alone.
        assert_eq!(fs::read(&path).unwrap(), &good[..good.len() / 2]);

        let bad_name = String::from_utf8(good.clone())
            .unwrap()
            .replace("\"payroll\"", "\"pay roll\"");
        fs::write(&path, bad_name).unwrap();
        let err = Registry::open(dir.path()).unwrap_err();
        assert!(err.to_string().contains("contains ' '"), "{err}");

        let newer = String::from_utf8(good.clone())
            .unwrap()
            .replace("\"version\": 2", "\"version\": 7");
        fs::write(&path, newer).unwrap();
        assert!(matches!(
            Registry::open(dir.path()),
            Err(RegistryError::UnsupportedVersion { found: 7, .. })
        ));

        fs::remove_file(&path).unwrap();
        fs::create_dir(&path).unwrap();
        let err = Registry::open(dir.path()).unwrap_err();
        assert!(matches!(err, RegistryError::Read { .. }), "{err}");
        assert!(
            err.to_string()
                .starts_with(&format!("cannot read {}", path.display()))
        );
    }

    #[test]
    fn manage_key_file_is_restored_from_the_registry() {
        let dir = tempfile::tempdir().unwrap();
        let key = Registry::open(dir.path()).unwrap().manage_key();
        let key_path = dir.path().join(MANAGE_KEY_FILE);
        fs::remove_file(&key_path).unwrap();
        Registry::open(dir.path()).unwrap();
        assert_eq!(fs::read_to_string(&key_path).unwrap().trim(), key.as_str());
        fs::write(&key_path, "stale").unwrap();
        Registry::open(dir.path()).unwrap();
        assert_eq!(fs::read_to_string(&key_path).unwrap().trim(), key.as_str());
    }

    #[test]
    fn a_version_one_file_keeps_its_key_as_primary_and_gains_a_secondary() {
        let dir = tempfile::tempdir().unwrap();
        let old_key = Key::generate().unwrap();
        let send = SlotKeys::generate().unwrap();
        let listen = SlotKeys::generate().unwrap();
        let v1 = serde_json::json!({
            "version": 1,
            "manage_key": old_key.as_str(),
            "hcs": [{
                "name": "payroll",
                "endpoint": "sql:1433",
                "created_unix": 1_700_000_000u64,
                "send": {"primary": send.primary.as_str(), "secondary": send.secondary.as_str()},
                "listen": {"primary": listen.primary.as_str(), "secondary": listen.secondary.as_str()},
            }],
        });
        fs::write(dir.path().join(REGISTRY_FILE), v1.to_string()).unwrap();
        let registry = Registry::open(dir.path()).unwrap();
        let keys = registry.manage_keys();
        assert_eq!(keys.primary, old_key);
        assert_ne!(keys.secondary, old_key);
        let hc = registry.get(&name("payroll")).unwrap();
        assert_eq!((hc.send, hc.listen), (send, listen));
        // Rewritten in the current format at once, the same keys on reopen.
        let text = fs::read_to_string(dir.path().join(REGISTRY_FILE)).unwrap();
        assert!(text.contains("\"version\": 2"), "{text}");
        assert!(!text.contains("\"manage_key\""), "{text}");
        assert_eq!(Registry::open(dir.path()).unwrap().manage_keys(), keys);
        let on_disk = fs::read_to_string(dir.path().join(MANAGE_KEY_FILE)).unwrap();
        assert_eq!(on_disk.trim(), old_key.as_str());
    }

    #[test]
    fn regenerating_a_manage_key_replaces_only_that_one_and_manage_key_follows_the_primary() {
        let dir = tempfile::tempdir().unwrap();
        let registry = Registry::open(dir.path()).unwrap();
        let mut events = registry.subscribe();
        let before = registry.manage_keys();
        assert_ne!(before.primary, before.secondary);

        let after = registry.regenerate_manage_key(KeySlot::Secondary).unwrap();
        assert_eq!(after.primary, before.primary);
        assert_ne!(after.secondary, before.secondary);
        let key_file = dir.path().join(MANAGE_KEY_FILE);
        assert_eq!(
            fs::read_to_string(&key_file).unwrap().trim(),
            before.primary.as_str()
        );

        let last = registry.regenerate_manage_key(KeySlot::Primary).unwrap();
        assert_ne!(last.primary, before.primary);
        assert_eq!(last.secondary, after.secondary);
        assert_eq!(
            fs::read_to_string(&key_file).unwrap().trim(),
            last.primary.as_str()
        );
        assert_eq!(registry.manage_key(), last.primary);
        assert_eq!(Registry::open(dir.path()).unwrap().manage_keys(), last);
        let seen: Vec<_> = std::iter::from_fn(|| events.try_recv().ok()).collect();
        assert_eq!(
            seen,
            [
                RegistryEvent::ManageKeyRegenerated {
                    slot: KeySlot::Secondary
                },
                RegistryEvent::ManageKeyRegenerated {
                    slot: KeySlot::Primary
                },
            ]
        );
        assert_eq!(seen[0].hc(), None);
    }

    #[test]
    fn events_follow_changes() {
        let dir = tempfile::tempdir().unwrap();
        let registry = Registry::open(dir.path()).unwrap();
        let mut events = registry.subscribe();
        registry.create(name("payroll"), endpoint("sql:1")).unwrap();
        let _ = registry.create(name("payroll"), endpoint("sql:1"));
        registry
            .regenerate(&name("payroll"), Right::Send, KeySlot::Primary)
            .unwrap();
        registry
            .update_endpoint(&name("payroll"), None, NonZeroU16::new(2))
            .unwrap();
        registry.delete(&name("payroll")).unwrap();
        let mut seen = Vec::new();
        while let Ok(event) = events.try_recv() {
            seen.push(event);
        }
        assert_eq!(
            seen,
            [
                RegistryEvent::Created {
                    name: name("payroll")
                },
                RegistryEvent::KeysChanged {
                    name: name("payroll"),
                    right: Right::Send,
                    slot: KeySlot::Primary
                },
                RegistryEvent::Updated {
                    name: name("payroll")
                },
                RegistryEvent::Deleted {
                    name: name("payroll")
                },
            ]
        );
    }

    #[test]
    fn events_are_the_differences_between_two_records() {
        let dir = tempfile::tempdir().unwrap();
        let registry = Registry::open(dir.path()).unwrap();
        let old = registry.create(name("payroll"), endpoint("sql:1")).unwrap();
        let mut new = old.clone();
        new.endpoint = endpoint("sql:2");
        new.send.secondary = Key::generate().unwrap();
        new.listen.primary = Key::generate().unwrap();
        let n = name("payroll");
        assert_eq!(
            hc_events(&n, Some(&old), Some(&new)),
            [
                RegistryEvent::KeysChanged {
                    name: n.clone(),
                    right: Right::Send,
                    slot: KeySlot::Secondary
                },
                RegistryEvent::KeysChanged {
                    name: n.clone(),
                    right: Right::Listen,
                    slot: KeySlot::Primary
                },
                RegistryEvent::Updated { name: n.clone() },
            ]
        );
        assert!(hc_events(&n, Some(&old), Some(&old)).is_empty());
        assert!(hc_events(&n, None, None).is_empty());
        assert_eq!(
            hc_events(&n, None, Some(&old)),
            [RegistryEvent::Created { name: n.clone() }]
        );
        assert_eq!(
            hc_events(&n, Some(&old), None),
            [RegistryEvent::Deleted { name: n }]
        );
    }

    #[test]
    fn rules_verify_tokens_and_regeneration_revokes() {
        let dir = tempfile::tempdir().unwrap();
        let registry = Registry::open(dir.path()).unwrap();
        let hc = registry.create(name("payroll"), endpoint("sql:1")).unwrap();
        let resource = "http://relay:9443/payroll";
        let token = sas::sign(resource, "listen", &hc.listen.primary, 2_000_000_000);
        let verified =
            sas::verify(&token, &hc.name, Right::Listen, &hc.rules(), 1_900_000_000).unwrap();
        assert_eq!(verified.slot, KeySlot::Primary);
        let hc = registry
            .regenerate(&hc.name, Right::Listen, KeySlot::Primary)
            .unwrap();
        assert!(matches!(
            sas::verify(&token, &hc.name, Right::Listen, &hc.rules(), 1_900_000_000),
            Err(sas::SasError::BadSignature { .. })
        ));
        assert_eq!(hc.keys(Right::Send), Some(&hc.send));
        assert_eq!(hc.keys(Right::Manage), None);
    }

    #[test]
    fn failed_write_changes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let registry = Registry::open(dir.path()).unwrap();
        // Make the directory read-only so the temp file cannot be created.
        // Root ignores permissions, so skip the check there.
        fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o500)).unwrap();
        let probe = dir.path().join("probe");
        let can_still_write = fs::write(&probe, b"x").is_ok();
        let result = registry.create(name("payroll"), endpoint("sql:1"));
        fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o700)).unwrap();
        if can_still_write {
            return;
        }
        let err = result.unwrap_err();
        assert!(matches!(err, RegistryError::Write { .. }));
        assert!(
            err.to_string().ends_with("the change was not made"),
            "{err}"
        );
        assert!(registry.list().is_empty());
        assert!(Registry::open(dir.path()).unwrap().list().is_empty());
    }
}
