//! The registry in etcd, shared by several relays (`relay serve --registry
//! etcd://HOST:PORT[,HOST:PORT...]`).
//!
//! Key layout, under a prefix (default `/hybridlink/`), values in JSON:
//!
//! | key | value |
//! | --- | --- |
//! | `PREFIX` `manage-keys` | the two manage keys ([`SlotKeys`]) |
//! | `PREFIX` `hcs/` `NAME` | one hybrid connection ([`HcRecord`]), with its retired keys |
//!
//! Every change is one etcd transaction guarded by the `mod_revision` the
//! record had when it was read (or, for a new record, by its absence):
//! two relays changing the same hybrid connection at once cannot both win,
//! and the loser reads the record again and redoes its change on top
//! ([`MAX_ATTEMPTS`] times at most). `create` is also guarded by the
//! revisions of every other hybrid connection, so that the quota counted
//! holds when the record is written.
//!
//! Each relay keeps the whole registry in memory, loaded at start and kept
//! current by one watch on the prefix. Only the watch changes the memory:
//! a relay's own change is visible once the watch has delivered it (the
//! call waits for that), so every relay sees every change in etcd's order
//! and announces the same [`RegistryEvent`]s. When the watch breaks (etcd
//! restarted, history compacted) the relay reads the whole prefix again and
//! announces the difference.
//!
//! At start, etcd must answer: a relay that cannot read its registry
//! refuses to start rather than serve an empty one.

use std::collections::BTreeMap;
use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use etcd_client::{
    Certificate, Client, Compare, CompareOp, ConnectOptions, DeleteOptions, EventType, GetOptions,
    Identity, KeyValue, TlsOptions, Txn, TxnOp, TxnOpResponse, WatchOptions,
};
use proto::name::HcName;
use thiserror::Error;
use tokio::sync::watch;

use super::{HcEdit, HcRecord, RegistryError, Shared, SlotKeys, State, StoreHealth, file};

/// The prefix of every key when none is given.
pub const DEFAULT_PREFIX: &str = "/hybridlink/";

/// How many times a change is tried against concurrent changes of the same
/// record before it is given up.
pub const MAX_ATTEMPTS: usize = 16;

/// How long a request to etcd may take.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// How long connecting to etcd may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);

/// How long a change waits to come back through this relay's watch.
const APPLIED_TIMEOUT: Duration = Duration::from_secs(5);

/// How many keys one read at start (or after the watch broke) asks for.
const PAGE: i64 = 100;

/// The most operations put in one transaction when copying a registry
/// (etcd refuses more than 128 by default).
const OPS_PER_TXN: usize = 64;

/// Why etcd could not be used.
#[derive(Debug, Error)]
pub enum EtcdError {
    /// `--registry` is not `etcd://HOST:PORT[,HOST:PORT...]`.
    #[error(
        "{0}; the registry is written etcd://HOST:PORT[,HOST:PORT...], or left out for the file registry in the data dir"
    )]
    BadUrl(String),
    /// The key prefix is unusable.
    #[error("etcd key prefix {0:?} must start and end with '/', e.g. /hybridlink/")]
    BadPrefix(String),
    /// A TLS file could not be read.
    #[error("cannot read {path}: {error}")]
    TlsFile {
        /// The file.
        path: PathBuf,
        /// The OS error.
        error: std::io::Error,
    },
    /// etcd did not answer, or refused the credentials, at start.
    #[error(
        "cannot read the registry from etcd at {endpoints}: {error}; check that etcd runs there and that its TLS settings and user match (a relay never starts without its registry; with --serve-from-cache it serves the registry it last saw, refusing changes, until etcd answers)"
    )]
    Connect {
        /// The endpoints tried.
        endpoints: String,
        /// What the client said.
        error: etcd_client::Error,
    },
    /// `migrate` could not reach etcd or write to it.
    #[error(
        "cannot copy the registry into etcd at {endpoints}: {error}; check that etcd runs there and that its TLS settings and user match"
    )]
    Copy {
        /// The endpoints tried.
        endpoints: String,
        /// What the client said.
        error: etcd_client::Error,
    },
    /// A request failed after start.
    #[error(
        "etcd at {endpoints} failed: {error}; the change may not have been made, check with `hybridlink hc show`"
    )]
    Request {
        /// The endpoints.
        endpoints: String,
        /// What the client said.
        error: etcd_client::Error,
    },
    /// etcd has not answered this relay's watch: changes are refused.
    #[error(
        "etcd at {endpoints} does not answer ({error}); this relay keeps serving the registry it knows but refuses changes until etcd answers again"
    )]
    Unreachable {
        /// The endpoints.
        endpoints: String,
        /// The last error seen.
        error: String,
    },
    /// A value under the prefix is not what this relay wrote.
    #[error("etcd key {key} is corrupt: {reason}; fix or delete it with etcdctl")]
    Corrupt {
        /// The key.
        key: String,
        /// What is wrong.
        reason: String,
    },
    /// Other relays kept changing the record.
    #[error(
        "{what} was changed by other relays {MAX_ATTEMPTS} times while this change was tried; try again"
    )]
    Contention {
        /// The record.
        what: String,
    },
    /// `migrate` to a prefix that holds keys.
    #[error(
        "etcd already holds {count} keys under {prefix}; copy into an empty prefix, or add --force to replace them"
    )]
    NotEmpty {
        /// The prefix.
        prefix: String,
        /// How many keys it holds.
        count: i64,
    },
}

/// The etcd members a relay talks to: `etcd://HOST:PORT[,HOST:PORT...]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EtcdEndpoints(Vec<String>);

impl EtcdEndpoints {
    /// The members as `HOST:PORT`.
    pub fn hosts(&self) -> &[String] {
        &self.0
    }
}

impl fmt::Display for EtcdEndpoints {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "etcd://{}", self.0.join(","))
    }
}

impl FromStr for EtcdEndpoints {
    type Err = EtcdError;

    fn from_str(s: &str) -> Result<EtcdEndpoints, EtcdError> {
        let bad = |why: String| EtcdError::BadUrl(why);
        let rest = s
            .strip_prefix("etcd://")
            .ok_or_else(|| bad(format!("{s:?} does not start with etcd://")))?;
        let rest = rest.strip_suffix('/').unwrap_or(rest);
        let mut hosts = Vec::new();
        for member in rest.split(',') {
            let (host, port) = member
                .rsplit_once(':')
                .ok_or_else(|| bad(format!("{member:?} in {s:?} has no :PORT")))?;
            let host_ok = !host.is_empty()
                && host
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-._[]:".contains(c));
            if !host_ok {
                return Err(bad(format!("{member:?} in {s:?} has no usable host")));
            }
            match port.parse::<u16>() {
                Ok(p) if p > 0 => {}
                _ => return Err(bad(format!("{member:?} in {s:?} has no usable port"))),
            }
            hosts.push(member.to_owned());
        }
        Ok(EtcdEndpoints(hosts))
    }
}

/// How to reach etcd and where the registry is in it.
#[derive(Clone)]
pub struct EtcdConfig {
    /// The members.
    pub endpoints: EtcdEndpoints,
    /// Every key starts with it; it starts and ends with `/`.
    pub prefix: String,
    /// The CA certificate (PEM) etcd's certificates are checked against;
    /// with it, etcd is spoken to over TLS.
    pub ca_file: Option<PathBuf>,
    /// A client certificate and its key (PEM), for etcd's
    /// `--client-cert-auth`; implies TLS.
    pub client_cert: Option<(PathBuf, PathBuf)>,
    /// A user and password, for etcd's own authentication.
    pub user: Option<(String, String)>,
    /// When etcd does not answer at start, serve the registry this relay
    /// last saw (its cache in the data dir) and refuse changes until etcd
    /// answers, instead of refusing to start.
    pub serve_from_cache: bool,
}

impl fmt::Debug for EtcdConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EtcdConfig")
            .field("endpoints", &self.endpoints)
            .field("prefix", &self.prefix)
            .field("ca_file", &self.ca_file)
            .field("client_cert", &self.client_cert)
            .field("user", &self.user.as_ref().map(|(name, _)| name))
            .field("serve_from_cache", &self.serve_from_cache)
            .finish()
    }
}

impl EtcdConfig {
    /// Plain etcd at `endpoints`, keys under [`DEFAULT_PREFIX`].
    pub fn new(endpoints: EtcdEndpoints) -> EtcdConfig {
        EtcdConfig {
            endpoints,
            prefix: DEFAULT_PREFIX.to_owned(),
            ca_file: None,
            client_cert: None,
            user: None,
            serve_from_cache: false,
        }
    }

    fn tls(&self) -> bool {
        self.ca_file.is_some() || self.client_cert.is_some()
    }

    /// The endpoints as they appear in messages.
    pub(super) fn describe(&self) -> String {
        let scheme = if self.tls() { "https" } else { "http" };
        self.endpoints
            .hosts()
            .iter()
            .map(|h| format!("{scheme}://{h}"))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// A client of etcd, as the registry's (for [`crate::membership`]).
    pub(crate) async fn client(&self) -> Result<Client, EtcdError> {
        self.connect().await.map(|(client, _)| client)
    }

    async fn connect(&self) -> Result<(Client, Layout), EtcdError> {
        if !(self.prefix.starts_with('/') && self.prefix.ends_with('/')) {
            return Err(EtcdError::BadPrefix(self.prefix.clone()));
        }
        let read = |path: &PathBuf| {
            std::fs::read(path).map_err(|error| EtcdError::TlsFile {
                path: path.clone(),
                error,
            })
        };
        let mut options = ConnectOptions::new()
            .with_connect_timeout(CONNECT_TIMEOUT)
            .with_timeout(REQUEST_TIMEOUT)
            .with_keep_alive(Duration::from_secs(5), Duration::from_secs(3))
            .with_keep_alive_while_idle(true)
            // A member cut off from its cluster answers nothing current.
            .with_require_leader(true)
            // etcd's tokens expire (after 5 min idle by default); without
            // this, the first change after a quiet spell would fail.
            .with_auto_token_refresh(true);
        if self.tls() {
            let mut tls = TlsOptions::new();
            if let Some(ca) = &self.ca_file {
                tls = tls.ca_certificate(Certificate::from_pem(read(ca)?));
            }
            if let Some((cert, key)) = &self.client_cert {
                tls = tls.identity(Identity::from_pem(read(cert)?, read(key)?));
            }
            options = options.with_tls(tls);
        }
        if let Some((name, password)) = &self.user {
            options = options.with_user(name, password);
        }
        let urls: Vec<String> = self.describe().split(',').map(str::to_owned).collect();
        let client = Client::connect(urls, Some(options))
            .await
            .map_err(|error| EtcdError::Connect {
                endpoints: self.describe(),
                error,
            })?;
        Ok((client, Layout::new(&self.prefix)))
    }
}

/// Where each record is kept.
#[derive(Debug, Clone)]
pub(super) struct Layout {
    prefix: String,
}

/// What a key under the prefix holds.
#[derive(Debug, PartialEq, Eq)]
enum Record {
    ManageKeys,
    Hc(HcName),
}

impl Layout {
    fn new(prefix: &str) -> Layout {
        Layout {
            prefix: prefix.to_owned(),
        }
    }

    fn manage_keys(&self) -> String {
        format!("{}manage-keys", self.prefix)
    }

    fn hcs(&self) -> String {
        format!("{}hcs/", self.prefix)
    }

    fn hc(&self, name: &HcName) -> String {
        format!("{}hcs/{name}", self.prefix)
    }

    /// What `key` holds; `None` for keys this relay does not use.
    fn record(&self, key: &[u8]) -> Result<Option<Record>, EtcdError> {
        let Ok(key) = std::str::from_utf8(key) else {
            return Ok(None);
        };
        if key == self.manage_keys() {
            return Ok(Some(Record::ManageKeys));
        }
        let Some(name) = key.strip_prefix(&self.hcs()) else {
            return Ok(None);
        };
        let name = name.parse().map_err(|e| EtcdError::Corrupt {
            key: key.to_owned(),
            reason: format!("not a hybrid connection name: {e}"),
        })?;
        Ok(Some(Record::Hc(name)))
    }
}

fn corrupt(kv: &KeyValue, reason: impl fmt::Display) -> EtcdError {
    EtcdError::Corrupt {
        key: String::from_utf8_lossy(kv.key()).into_owned(),
        reason: reason.to_string(),
    }
}

fn parse_hc(kv: &KeyValue, name: &HcName) -> Result<HcRecord, EtcdError> {
    let record: HcRecord = serde_json::from_slice(kv.value()).map_err(|e| corrupt(kv, e))?;
    if &record.name != name {
        return Err(corrupt(kv, format!("it holds {}", record.name)));
    }
    Ok(record)
}

fn parse_manage_keys(kv: &KeyValue) -> Result<SlotKeys, EtcdError> {
    serde_json::from_slice(kv.value()).map_err(|e| corrupt(kv, e))
}

fn to_json<T: serde::Serialize>(value: &T) -> Vec<u8> {
    // Records are plain strings and numbers: serializing cannot fail.
    serde_json::to_vec(value).expect("a registry record serializes")
}

/// Everything under the prefix, and the revision it was read at.
#[derive(Debug)]
struct Snapshot {
    manage_keys: Option<SlotKeys>,
    hcs: BTreeMap<HcName, HcRecord>,
    revision: i64,
}

/// Reads everything under the prefix at one revision, [`PAGE`] keys a
/// request (a registry of thousands of HCs is larger than one gRPC message
/// may be).
async fn read_all(client: &Client, layout: &Layout) -> Result<Snapshot, ReadError> {
    let end = prefix_end(layout.prefix.as_bytes());
    let mut from = layout.prefix.as_bytes().to_vec();
    let mut snapshot = Snapshot {
        manage_keys: None,
        hcs: BTreeMap::new(),
        revision: 0,
    };
    loop {
        let mut options = GetOptions::new().with_range(end.clone()).with_limit(PAGE);
        if snapshot.revision != 0 {
            options = options.with_revision(snapshot.revision);
        }
        let response = until_sent(|| {
            let mut kv = client.kv_client();
            let (from, options) = (from.clone(), options.clone());
            async move { kv.get(from, Some(options)).await }
        })
        .await
        .map_err(ReadError::Etcd)?;
        if snapshot.revision == 0 {
            snapshot.revision = response.header().map_or(0, |h| h.revision());
        }
        for kv in response.kvs() {
            match layout.record(kv.key()).map_err(ReadError::Corrupt)? {
                Some(Record::ManageKeys) => {
                    snapshot.manage_keys = Some(parse_manage_keys(kv).map_err(ReadError::Corrupt)?);
                }
                Some(Record::Hc(name)) => {
                    let record = parse_hc(kv, &name).map_err(ReadError::Corrupt)?;
                    snapshot.hcs.insert(name, record);
                }
                None => {}
            }
        }
        match response.kvs().last() {
            Some(last) if response.more() => {
                from = last.key().to_vec();
                from.push(0);
            }
            _ => return Ok(snapshot),
        }
    }
}

/// The first key after every key that starts with `prefix`.
fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    // Only 0xff bytes: to the end of the key space.
    vec![0]
}

/// Why the prefix could not be read.
#[derive(Debug)]
enum ReadError {
    Etcd(etcd_client::Error),
    Corrupt(EtcdError),
}

/// A registry read from etcd at start.
pub(super) struct Loaded {
    pub(super) client: Client,
    pub(super) layout: Layout,
    /// The endpoints, for messages.
    pub(super) endpoints: String,
    pub(super) state: State,
    /// The revision it was read at.
    pub(super) revision: i64,
}

/// Connects and reads the registry, making the manage keys if there are
/// none yet.
pub(super) async fn connect_and_load(config: &EtcdConfig) -> Result<Loaded, RegistryError> {
    let (client, layout) = config.connect().await?;
    let connect_error = |error| EtcdError::Connect {
        endpoints: config.describe(),
        error,
    };
    // Read, make the keys if missing, read again: twice is enough.
    for _ in 0..2 {
        let snapshot = match read_all(&client, &layout).await {
            Ok(s) => s,
            Err(ReadError::Etcd(e)) => return Err(connect_error(e).into()),
            Err(ReadError::Corrupt(e)) => return Err(e.into()),
        };
        if let Some(manage_keys) = snapshot.manage_keys {
            let state = State {
                manage_keys,
                hcs: snapshot.hcs,
            };
            return Ok(Loaded {
                client,
                layout,
                endpoints: config.describe(),
                state,
                revision: snapshot.revision,
            });
        }
        // The first relay on an empty prefix makes the manage keys; if
        // another one got there first, read again.
        let key = layout.manage_keys();
        let txn = Txn::new()
            .when([Compare::create_revision(key.as_str(), CompareOp::Equal, 0)])
            .and_then([TxnOp::put(
                key.as_str(),
                to_json(&SlotKeys::generate()?),
                None,
            )]);
        client.kv_client().txn(txn).await.map_err(connect_error)?;
    }
    Err(EtcdError::Corrupt {
        key: layout.manage_keys(),
        reason: "the manage keys could neither be read nor made".into(),
    }
    .into())
}

/// The etcd side of a [`super::Registry`]: changes go to etcd, and a watch
/// brings every change (its own and other relays') into memory.
pub(super) struct EtcdStore {
    /// Set once etcd has been reached (at once, unless the relay started
    /// from its cache while etcd did not answer).
    client: Arc<std::sync::OnceLock<Client>>,
    layout: Layout,
    endpoints: String,
    /// The revision the memory is up to date with.
    applied: watch::Receiver<i64>,
    /// Whether the watch reaches etcd now.
    health: watch::Receiver<StoreHealth>,
    runtime: tokio::runtime::Handle,
    watcher: tokio::task::JoinHandle<()>,
}

impl fmt::Debug for EtcdStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EtcdStore")
            .field("endpoints", &self.endpoints)
            .field("prefix", &self.layout.prefix)
            .field("applied", &*self.applied.borrow())
            .finish()
    }
}

impl Drop for EtcdStore {
    fn drop(&mut self) {
        self.watcher.abort();
    }
}

impl EtcdStore {
    /// Starts watching from just after `revision`, the one `shared` was
    /// loaded at. Call from within a tokio runtime.
    pub(super) fn start(
        client: Client,
        layout: Layout,
        endpoints: String,
        revision: i64,
        shared: Arc<Shared>,
    ) -> EtcdStore {
        let cell = Arc::new(std::sync::OnceLock::new());
        let _ = cell.set(client);
        EtcdStore::follow(cell, None, layout, endpoints, revision, shared)
    }

    /// Starts from the registry cached in the data dir while etcd does not
    /// answer: connects in the background, and reads the whole registry
    /// once etcd answers.
    pub(super) fn start_from_cache(
        config: EtcdConfig,
        endpoints: String,
        shared: Arc<Shared>,
    ) -> EtcdStore {
        let layout = Layout::new(&config.prefix);
        let cell = Arc::new(std::sync::OnceLock::new());
        // Revision 0: nothing from etcd applied yet.
        EtcdStore::follow(cell, Some(config), layout, endpoints, 0, shared)
    }

    fn follow(
        client: Arc<std::sync::OnceLock<Client>>,
        connect: Option<EtcdConfig>,
        layout: Layout,
        endpoints: String,
        revision: i64,
        shared: Arc<Shared>,
    ) -> EtcdStore {
        let (applied_tx, applied) = watch::channel(revision);
        let health = shared.health.subscribe();
        tokio::spawn(keep_cache(shared.clone(), applied.clone()));
        let watcher = tokio::spawn(keep_watching(
            client.clone(),
            connect,
            layout.clone(),
            shared,
            revision,
            applied_tx,
        ));
        EtcdStore {
            client,
            layout,
            endpoints,
            applied,
            health,
            runtime: tokio::runtime::Handle::current(),
            watcher,
        }
    }

    /// Runs `future` to completion from a thread that may block (the
    /// registry's changing methods are synchronous).
    fn block_on<F: Future>(&self, future: F) -> F::Output {
        tokio::task::block_in_place(|| self.runtime.block_on(future))
    }

    /// The client to change the registry with, once the watch reaches
    /// etcd. While etcd has stopped answering only just now (its leader
    /// died and the others are electing one, or the member this relay's
    /// watch used died), the change waits for it, [`RIDE_OUT`] from the
    /// start of the outage at most; after that it is refused at once,
    /// rather than after a request's timeout.
    async fn reachable(&self) -> Result<&Client, RegistryError> {
        let mut health = self.health.clone();
        let outage_ends = {
            let h = health.borrow();
            (!h.writable).then(|| tokio::time::Instant::from_std(h.since + RIDE_OUT))
        };
        if let Some(ends) = outage_ends {
            // Timing out leaves the store unwritable, which is refused below.
            let _ = tokio::time::timeout_at(ends, health.wait_for(|h| h.writable)).await;
        }
        let health = health.borrow();
        let refused = |error: String| {
            Err(EtcdError::Unreachable {
                endpoints: self.endpoints.clone(),
                error,
            }
            .into())
        };
        if let (Some(error), false) = (&health.error, health.writable) {
            return refused(error.clone());
        }
        match self.client.get() {
            Some(client) => Ok(client),
            None => refused("not reached since this relay started".into()),
        }
    }

    fn request_error(&self, error: etcd_client::Error) -> RegistryError {
        EtcdError::Request {
            endpoints: self.endpoints.clone(),
            error,
        }
        .into()
    }

    /// Changes the record of `name` with a compare-and-swap on its
    /// revision, redoing `edit` on the fresh record after a conflict.
    pub(super) fn change_hc<T>(
        &self,
        name: &HcName,
        edit: &mut HcEdit<'_, T>,
    ) -> Result<T, RegistryError> {
        self.block_on(async {
            let client = self.reachable().await?;
            let key = self.layout.hc(name);
            let hcs = self.layout.hcs();
            let txn = |txn: Txn| {
                until_sent(move || {
                    let mut kv = client.kv_client();
                    let txn = txn.clone();
                    async move { kv.txn(txn).await }
                })
            };
            let patience = Patience::new();
            // A write whose answer was lost, and what it would have
            // returned: it took effect if the record now reads as written.
            let mut unsure: Option<(Option<HcRecord>, T)> = None;
            let mut attempt = 0;
            while attempt < MAX_ATTEMPTS {
                // The record and the number of HCs at one revision.
                let read = Txn::new().and_then([
                    TxnOp::get(key.as_str(), None),
                    TxnOp::get(
                        hcs.as_str(),
                        Some(GetOptions::new().with_prefix().with_count_only()),
                    ),
                ]);
                let response = match txn(read).await {
                    Ok(response) => response,
                    Err(e) => {
                        patience.again(e).await.map_err(|e| self.request_error(e))?;
                        continue;
                    }
                };
                let revision = response.header().map_or(0, |h| h.revision());
                let mut old = None;
                let mut count = 0;
                for (i, op) in response.op_responses().into_iter().enumerate() {
                    if let TxnOpResponse::Get(get) = op {
                        if i == 0 {
                            if let Some(kv) = get.kvs().first() {
                                old = Some((parse_hc(kv, name)?, kv.mod_revision()));
                            }
                        } else {
                            count = usize::try_from(get.count()).unwrap_or(usize::MAX);
                        }
                    }
                }
                if let Some((written, out)) = unsure.take()
                    && old.as_ref().map(|(r, _)| r) == written.as_ref()
                {
                    self.wait_applied(revision).await;
                    return Ok(out);
                }
                let (new, out) = edit(old.as_ref().map(|(r, _)| r), count)?;
                let mut guards = vec![match &old {
                    Some((_, m)) => Compare::mod_revision(key.as_str(), CompareOp::Equal, *m),
                    None => Compare::create_revision(key.as_str(), CompareOp::Equal, 0),
                }];
                if old.is_none() && new.is_some() {
                    // No HC was created (or changed) since the count.
                    guards.push(
                        Compare::mod_revision(hcs.as_str(), CompareOp::Less, revision + 1)
                            .with_prefix(),
                    );
                }
                let op = match &new {
                    Some(record) => TxnOp::put(key.as_str(), to_json(record), None),
                    None => TxnOp::delete(key.as_str(), None),
                };
                let write = Txn::new().when(guards).and_then([op]);
                let response = match txn(write).await {
                    Ok(response) => response,
                    Err(e) => {
                        patience.again(e).await.map_err(|e| self.request_error(e))?;
                        unsure = Some((new, out));
                        continue;
                    }
                };
                if response.succeeded() {
                    self.wait_applied(response.header().map_or(0, |h| h.revision()))
                        .await;
                    return Ok(out);
                }
                tracing::debug!(hc = %name, attempt, "changed by another relay meanwhile; trying again");
                backoff(attempt).await;
                attempt += 1;
            }
            Err(EtcdError::Contention {
                what: format!("hybrid connection {name}"),
            }
            .into())
        })
    }

    /// Changes the manage keys with a compare-and-swap on their revision.
    pub(super) fn change_manage_keys(
        &self,
        edit: &mut dyn FnMut(&SlotKeys) -> SlotKeys,
    ) -> Result<SlotKeys, RegistryError> {
        self.block_on(async {
            let client = self.reachable().await?;
            let key = self.layout.manage_keys();
            let patience = Patience::new();
            // Keys written without an answer: they took effect if they are
            // what etcd now holds.
            let mut unsure: Option<SlotKeys> = None;
            let mut attempt = 0;
            while attempt < MAX_ATTEMPTS {
                let read = until_sent(|| {
                    let mut kv = client.kv_client();
                    let key = key.clone();
                    async move { kv.get(key, None).await }
                })
                .await;
                let response = match read {
                    Ok(response) => response,
                    Err(e) => {
                        patience.again(e).await.map_err(|e| self.request_error(e))?;
                        continue;
                    }
                };
                let Some(current) = response.kvs().first() else {
                    return Err(EtcdError::Corrupt {
                        key: key.clone(),
                        reason: "the manage keys are missing; restart a relay to make new ones"
                            .into(),
                    }
                    .into());
                };
                let now = parse_manage_keys(current)?;
                if let Some(written) = unsure.take()
                    && written == now
                {
                    self.wait_applied(current.mod_revision()).await;
                    return Ok(written);
                }
                let keys = edit(&now);
                let write = Txn::new()
                    .when([Compare::mod_revision(
                        key.as_str(),
                        CompareOp::Equal,
                        current.mod_revision(),
                    )])
                    .and_then([TxnOp::put(key.as_str(), to_json(&keys), None)]);
                let written = until_sent(|| {
                    let mut kv = client.kv_client();
                    let write = write.clone();
                    async move { kv.txn(write).await }
                })
                .await;
                let response = match written {
                    Ok(response) => response,
                    Err(e) => {
                        patience.again(e).await.map_err(|e| self.request_error(e))?;
                        unsure = Some(keys);
                        continue;
                    }
                };
                if response.succeeded() {
                    self.wait_applied(response.header().map_or(0, |h| h.revision()))
                        .await;
                    return Ok(keys);
                }
                backoff(attempt).await;
                attempt += 1;
            }
            Err(EtcdError::Contention {
                what: "the manage keys".into(),
            }
            .into())
        })
    }

    /// Waits until the watch has brought `revision` into memory, so that
    /// the caller reads its own change.
    async fn wait_applied(&self, revision: i64) {
        let mut applied = self.applied.clone();
        let caught_up =
            tokio::time::timeout(APPLIED_TIMEOUT, applied.wait_for(|&seen| seen >= revision)).await;
        if !matches!(caught_up, Ok(Ok(_))) {
            tracing::warn!(
                revision,
                "a change was written to etcd but has not come back through this relay's watch yet; it shows here once it does"
            );
        }
    }
}

/// How many more times a request goes whose connection to a member could
/// not be made. The client spreads requests over the members at random, a
/// dead one included, and such a request was never sent, so sending it
/// again (to another member, most likely) is safe.
const UNSENT_RETRIES: usize = 8;

/// Whether `error` says the connection to a member could not be made
/// (tonic's words for it): the request was not sent.
fn not_sent(error: &etcd_client::Error) -> bool {
    matches!(error, etcd_client::Error::GRpcStatus(status) if status.message() == "tcp connect error")
}

/// Runs `request` until it was sent to a member that took the
/// connection, [`UNSENT_RETRIES`] more times at most.
pub(crate) async fn until_sent<T, F, Fut>(mut request: F) -> Result<T, etcd_client::Error>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, etcd_client::Error>>,
{
    let mut retries = 0;
    loop {
        match request().await {
            Err(e) if not_sent(&e) && retries < UNSENT_RETRIES => {
                retries += 1;
                tracing::debug!(error = %e, "an etcd member refused the connection; sending the request to another");
            }
            answer => return answer,
        }
    }
}

/// How long a change waits for etcd that stopped answering only just now,
/// before it is refused. Losing etcd's leader costs an election (about two
/// seconds with etcd's default timeouts, measured with three members); a
/// change made meanwhile waits for the new leader rather than failing.
const RIDE_OUT: Duration = Duration::from_secs(5);

/// The pause before a request that failed for want of a leader (or of the
/// member it went to) is sent again.
const RIDE_OUT_PAUSE: Duration = Duration::from_millis(100);

/// gRPC's codes (a wire standard) for the failures that pass with an
/// election: UNKNOWN (the connection to a member broke mid-request),
/// DEADLINE_EXCEEDED and UNAVAILABLE (`etcdserver: leader changed`, `no
/// leader`).
const PASSING_CODES: [i32; 3] = [2, 4, 14];

/// Whether `error` may pass by itself within [`RIDE_OUT`]: the member went
/// away or etcd is electing a leader.
fn passing(error: &etcd_client::Error) -> bool {
    match error {
        etcd_client::Error::GRpcStatus(status) => PASSING_CODES.contains(&(status.code() as i32)),
        etcd_client::Error::TransportError(_) | etcd_client::Error::IoError(_) => true,
        _ => false,
    }
}

/// How long one change goes on sending requests that failed in passing.
struct Patience {
    until: tokio::time::Instant,
}

impl Patience {
    fn new() -> Patience {
        Patience {
            until: tokio::time::Instant::now() + RIDE_OUT,
        }
    }

    /// Returns after a short pause when `error` may pass and the change
    /// has time left; otherwise gives the error back. A write whose answer
    /// was lost this way may have been applied: the caller reads the
    /// record again before deciding.
    async fn again(&self, error: etcd_client::Error) -> Result<(), etcd_client::Error> {
        if !passing(&error) || tokio::time::Instant::now() + RIDE_OUT_PAUSE > self.until {
            return Err(error);
        }
        tracing::debug!(error = %error, "etcd did not answer a change (an election, or a member gone); sending it again");
        tokio::time::sleep(RIDE_OUT_PAUSE).await;
        Ok(())
    }
}

/// A short random pause before trying a change again.
async fn backoff(attempt: usize) {
    let most = 5 * (attempt as u64 + 1);
    let ms = rand::random_range(1..=most);
    tokio::time::sleep(Duration::from_millis(ms)).await;
}

/// Keeps `shared` equal to etcd: applies the watch's events in order, and
/// after the watch breaks reads everything again and applies the
/// difference.
async fn keep_watching(
    cell: Arc<std::sync::OnceLock<Client>>,
    connect: Option<EtcdConfig>,
    layout: Layout,
    shared: Arc<Shared>,
    mut revision: i64,
    applied: watch::Sender<i64>,
) {
    let mut pause = Duration::from_millis(100);
    // Started from the cache: reach etcd first, then read it all.
    let client = match cell.get() {
        Some(client) => client.clone(),
        None => {
            let Some(config) = connect else { return };
            let client = loop {
                match config.connect().await {
                    Ok((client, _)) => break client,
                    Err(e) => shared.set_health(Some(e.to_string())),
                }
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(Duration::from_secs(5));
            };
            let _ = cell.set(client.clone());
            client
        }
    };
    let mut read_first = revision == 0;
    loop {
        if read_first {
            read_first = false;
        } else {
            match watch_from(&client, &layout, &shared, &mut revision, &applied).await {
                Ok(()) => tracing::warn!("the etcd watch ended; reading the registry again"),
                Err(e) => {
                    tracing::warn!(error = %e, "the etcd watch failed; reading the registry again");
                    shared.set_health(Some(e.to_string()));
                }
            }
        }
        loop {
            match read_all(&client, &layout).await {
                Ok(snapshot) => {
                    revision = snapshot.revision;
                    apply_snapshot(&shared, snapshot);
                    applied.send_replace(revision);
                    shared.set_health(None);
                    pause = Duration::from_millis(100);
                    break;
                }
                Err(ReadError::Etcd(e)) => {
                    tracing::warn!(error = %e, "cannot read the registry from etcd; this relay serves what it knows and tries again");
                    shared.set_health(Some(e.to_string()));
                }
                Err(ReadError::Corrupt(e)) => {
                    tracing::error!(error = %e, "the registry in etcd cannot be read; this relay serves what it knows and tries again");
                    shared.set_health(Some(e.to_string()));
                }
            }
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(Duration::from_secs(5));
        }
    }
}

/// How long the cache waits after a change before it is written, so that
/// a burst of changes is written once.
const CACHE_DELAY: Duration = Duration::from_secs(1);

/// Keeps `registry-cache.json` in the data dir equal to what this relay
/// has applied from etcd, for `--serve-from-cache`.
async fn keep_cache(shared: Arc<Shared>, mut applied: watch::Receiver<i64>) {
    let mut written = None;
    loop {
        let revision = *applied.borrow_and_update();
        // Revision 0: started from the cache, nothing newer to write yet.
        if revision != 0 && written != Some(revision) {
            let state = shared.lock().clone();
            let dir = shared.dir.clone();
            let saved =
                tokio::task::spawn_blocking(move || file::save_as(&dir, file::CACHE_FILE, &state))
                    .await;
            match saved {
                Ok(Ok(())) => written = Some(revision),
                Ok(Err(e)) => tracing::warn!(error = %e, "cannot write the registry cache"),
                Err(e) => tracing::warn!(error = %e, "writing the registry cache failed"),
            }
        }
        if applied.changed().await.is_err() {
            return;
        }
        tokio::time::sleep(CACHE_DELAY).await;
    }
}

/// Why a watch stopped.
#[derive(Debug, Error)]
enum WatchEnd {
    #[error(transparent)]
    Etcd(#[from] etcd_client::Error),
    #[error("etcd cancelled the watch: {0}")]
    Cancelled(String),
}

async fn watch_from(
    client: &Client,
    layout: &Layout,
    shared: &Shared,
    revision: &mut i64,
    applied: &watch::Sender<i64>,
) -> Result<(), WatchEnd> {
    let options = WatchOptions::new()
        .with_prefix()
        .with_start_revision(*revision + 1)
        .with_progress_notify();
    let mut stream = until_sent(|| {
        let mut watch = client.watch_client();
        let (prefix, options) = (layout.prefix.clone(), options.clone());
        async move { watch.watch(prefix, Some(options)).await }
    })
    .await?;
    while let Some(response) = stream.message().await? {
        if response.canceled() || response.compact_revision() != 0 {
            return Err(WatchEnd::Cancelled(format!(
                "{} (compacted at {})",
                response.cancel_reason(),
                response.compact_revision()
            )));
        }
        for event in response.events() {
            let Some(kv) = event.kv() else { continue };
            apply_event(layout, shared, event.event_type(), kv);
            *revision = (*revision).max(kv.mod_revision());
        }
        if response.events().is_empty() && !response.created() {
            // A progress notice: every change up to its revision was sent.
            if let Some(header) = response.header() {
                *revision = (*revision).max(header.revision());
            }
        }
        applied.send_replace(*revision);
    }
    Ok(())
}

/// Brings one change from etcd into memory.
fn apply_event(layout: &Layout, shared: &Shared, kind: EventType, kv: &KeyValue) {
    let record = match layout.record(kv.key()) {
        Ok(Some(record)) => record,
        Ok(None) => return,
        Err(e) => {
            tracing::error!(error = %e, "ignored a change in etcd");
            return;
        }
    };
    match (record, kind) {
        (Record::Hc(name), EventType::Put) => match parse_hc(kv, &name) {
            Ok(hc) => shared.apply_hc(&name, Some(hc)),
            Err(e) => {
                tracing::error!(error = %e, "ignored a change in etcd; the relay keeps the hybrid connection as it was")
            }
        },
        (Record::Hc(name), EventType::Delete) => shared.apply_hc(&name, None),
        (Record::ManageKeys, EventType::Put) => match parse_manage_keys(kv) {
            Ok(keys) => {
                let primary = keys.primary.clone();
                shared.apply_manage_keys(keys);
                sync_manage_key_file(shared, &primary);
            }
            Err(e) => {
                tracing::error!(error = %e, "ignored a change in etcd; the relay keeps its manage keys")
            }
        },
        (Record::ManageKeys, EventType::Delete) => {
            tracing::error!(
                "the manage keys were deleted from etcd; this relay keeps the ones it has"
            );
        }
    }
}

/// Makes memory equal to a fresh read of etcd, announcing the difference.
fn apply_snapshot(shared: &Shared, snapshot: Snapshot) {
    let names: Vec<HcName> = {
        let state = shared.lock();
        state.hcs.keys().cloned().collect()
    };
    for name in names {
        if !snapshot.hcs.contains_key(&name) {
            shared.apply_hc(&name, None);
        }
    }
    for (name, record) in snapshot.hcs {
        shared.apply_hc(&name, Some(record));
    }
    match snapshot.manage_keys {
        Some(keys) => {
            let primary = keys.primary.clone();
            shared.apply_manage_keys(keys);
            sync_manage_key_file(shared, &primary);
        }
        None => tracing::error!(
            "the manage keys are missing from etcd; this relay keeps the ones it has"
        ),
    }
}

fn sync_manage_key_file(shared: &Shared, primary: &proto::key::Key) {
    if let Err(e) = file::sync_manage_key_file(&shared.dir, primary) {
        tracing::error!(error = %e, "cannot rewrite manage.key with the new primary manage key");
    }
}

/// What [`copy_to_etcd`] copied.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Copied {
    /// Hybrid connections copied (the manage keys come with them).
    pub hcs: usize,
}

/// Copies the file registry in `dir` into etcd: every hybrid connection
/// with its keys and retired keys, and the manage keys. Refuses when the
/// prefix holds any key, unless `force`, which deletes them first. Relays
/// on the prefix should be stopped meanwhile: with more than
/// [`OPS_PER_TXN`] records the copy takes several transactions.
pub async fn copy_to_etcd(
    dir: &std::path::Path,
    config: &EtcdConfig,
    force: bool,
) -> Result<Copied, RegistryError> {
    let state = file::read_existing(dir)?;
    let (client, layout) = config.connect().await.map_err(|e| match e {
        EtcdError::Connect { endpoints, error } => EtcdError::Copy { endpoints, error },
        other => other,
    })?;
    let mut kv = client.kv_client();
    let failed = |error| -> RegistryError {
        EtcdError::Copy {
            endpoints: config.describe(),
            error,
        }
        .into()
    };
    if force {
        kv.delete(
            layout.prefix.as_str(),
            Some(DeleteOptions::new().with_prefix()),
        )
        .await
        .map_err(failed)?;
    }
    let mut puts = vec![TxnOp::put(
        layout.manage_keys(),
        to_json(&state.manage_keys),
        None,
    )];
    puts.extend(
        state
            .hcs
            .values()
            .map(|hc| TxnOp::put(layout.hc(&hc.name), to_json(hc), None)),
    );
    let mut first = true;
    while !puts.is_empty() {
        let batch: Vec<TxnOp> = puts.drain(..puts.len().min(OPS_PER_TXN)).collect();
        let mut txn = Txn::new();
        if first {
            // Nothing under the prefix.
            txn = txn.when([
                Compare::create_revision(layout.prefix.as_str(), CompareOp::Equal, 0).with_prefix(),
            ]);
        }
        let txn = txn.and_then(batch);
        let response = kv.txn(txn).await.map_err(failed)?;
        if first && !response.succeeded() {
            let count = kv
                .get(
                    layout.prefix.as_str(),
                    Some(GetOptions::new().with_prefix().with_count_only()),
                )
                .await
                .map_err(failed)?
                .count();
            return Err(EtcdError::NotEmpty {
                prefix: layout.prefix.clone(),
                count,
            }
            .into());
        }
        first = false;
    }
    Ok(Copied {
        hcs: state.hcs.len(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_are_parsed_and_bad_ones_say_why() {
        let one: EtcdEndpoints = "etcd://127.0.0.1:2379".parse().unwrap();
        assert_eq!(one.hosts(), ["127.0.0.1:2379"]);
        let three: EtcdEndpoints = "etcd://a.example:2379,b:2379,[::1]:2379/".parse().unwrap();
        assert_eq!(three.hosts(), ["a.example:2379", "b:2379", "[::1]:2379"]);
        assert_eq!(three.to_string(), "etcd://a.example:2379,b:2379,[::1]:2379");
        for (bad, says) in [
            ("http://127.0.0.1:2379", "does not start with etcd://"),
            ("etcd://", "has no :PORT"),
            ("etcd://host", "has no :PORT"),
            ("etcd://host:0", "no usable port"),
            ("etcd://host:99999", "no usable port"),
            ("etcd://:2379", "no usable host"),
            ("etcd://a:2379,,b:2379", "has no :PORT"),
            ("etcd://a b:2379", "no usable host"),
        ] {
            let err = bad.parse::<EtcdEndpoints>().unwrap_err().to_string();
            assert!(err.contains(says), "{bad}: {err}");
            assert!(err.contains("etcd://HOST:PORT"), "{bad}: {err}");
        }
    }

    #[test]
    fn the_end_of_a_prefix_is_the_first_key_after_it() {
        assert_eq!(prefix_end(b"/hybridlink/"), b"/hybridlink0");
        assert_eq!(prefix_end(b"a\xff"), b"b");
        assert_eq!(prefix_end(b"\xff\xff"), [0]);
    }

    #[test]
    fn keys_map_to_records_and_foreign_keys_are_ignored() {
        let layout = Layout::new("/hl/");
        let payroll: HcName = "payroll".parse().unwrap();
        assert_eq!(layout.hc(&payroll), "/hl/hcs/payroll");
        assert_eq!(
            layout.record(b"/hl/hcs/payroll").unwrap(),
            Some(Record::Hc(payroll))
        );
        assert_eq!(
            layout.record(b"/hl/manage-keys").unwrap(),
            Some(Record::ManageKeys)
        );
        assert_eq!(layout.record(b"/hl/nodes/a").unwrap(), None);
        let err = layout.record(b"/hl/hcs/Pay Roll").unwrap_err();
        assert!(
            err.to_string().contains("/hl/hcs/Pay Roll is corrupt"),
            "{err}"
        );
    }
}
