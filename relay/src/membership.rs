//! Which relay nodes serve one registry on etcd.
//!
//! Each node puts the address peers dial to reach it (`relay serve
//! --advertise`) at `PREFIX` `nodes/` `HOST:PORT`, attached to a lease of
//! [`NODE_TTL`] that it keeps alive; a node that dies leaves the list when
//! its lease expires. Every node watches `PREFIX` `nodes/` and hands the
//! list to its hub, which tells the peers that understand it
//! ([`proto::control::RelayMessage::Nodes`]): agents attach on every node,
//! senders fail over to another.
//!
//! Under the same lease each node publishes a summary of its live state at
//! `PREFIX` `status/` `HOST:PORT` ([`crate::cluster`]): when it changed, at
//! most once per [`KEEPALIVE_INTERVAL`] and within [`cluster::WRITE_BUDGET`]
//! bytes a second, and at least every [`cluster::REFRESH_EVERY`] (longer
//! for a big summary); so at most one write and 16 KiB a second per node. It
//! watches the others' summaries, for status answers that cover the
//! cluster.
//!
//! A node stopped cleanly ([`Membership::leave`]) revokes its lease, so it
//! leaves the list, and its summary goes, at once rather than after
//! [`NODE_TTL`].

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use etcd_client::{Client, EventType, GetOptions, PutOptions, WatchOptions};
use thiserror::Error;
use tracing::{info, warn};

use crate::cluster;
use crate::hub::Hub;
use crate::registry::etcd::{EtcdConfig, EtcdError, until_sent};

/// How long a node stays listed after its last keep-alive.
pub const NODE_TTL: Duration = Duration::from_secs(5);
/// How often the lease is kept alive: several times per TTL, so one late
/// answer does not drop the node.
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(1);
/// Pause before registering again after etcd failed.
const RETRY_PAUSE: Duration = Duration::from_secs(1);
/// How long a clean stop waits for etcd to revoke the lease.
const LEAVE_TIMEOUT: Duration = Duration::from_secs(2);

/// Why a node's registration ended (it is made again after [`RETRY_PAUSE`]).
#[derive(Debug, Error)]
enum MembershipError {
    #[error(transparent)]
    Connect(#[from] EtcdError),
    #[error(transparent)]
    Etcd(#[from] etcd_client::Error),
    #[error("etcd let this node's lease expire")]
    LeaseLost,
    #[error("etcd ended the watch of the node list or of the nodes' status")]
    WatchEnded,
}

/// The value at a node's key.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
struct NodeRecord {
    /// `HOST:PORT` peers dial.
    address: String,
}

/// The lease this node is listed under, with a client to revoke it.
type HeldLease = Arc<Mutex<Option<(Client, i64)>>>;

/// This node's place in the node list, kept until [`Membership::leave`]
/// or the relay stops.
pub struct Membership {
    task: tokio::task::JoinHandle<()>,
    lease: HeldLease,
}

impl std::fmt::Debug for Membership {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Membership")
            .field("listed", &!self.task.is_finished())
            .finish_non_exhaustive()
    }
}

impl Membership {
    /// Lists this node as `advertise`, publishes its state (it presents
    /// the certificate `cert_sha256`, hex) and keeps `hub`'s node list and
    /// cluster view current, until [`Membership::leave`] or the relay stops.
    pub fn start(
        config: EtcdConfig,
        advertise: String,
        hub: Hub,
        cert_sha256: String,
    ) -> Membership {
        let lease = HeldLease::default();
        let task = tokio::spawn(keep_listed(
            config,
            advertise,
            hub,
            cert_sha256,
            lease.clone(),
        ));
        Membership { task, lease }
    }

    /// Stops following the cluster and revokes this node's lease, so the
    /// other nodes drop it (and its status) at once. Gives up after
    /// [`LEAVE_TIMEOUT`]; the lease then expires on its own.
    pub async fn leave(&self) {
        self.task.abort();
        let held = self.lease.lock().unwrap_or_else(|p| p.into_inner()).take();
        let Some((client, lease)) = held else { return };
        let revoke = until_sent(|| {
            let mut leases = client.lease_client();
            async move { leases.revoke(lease).await }
        });
        match tokio::time::timeout(LEAVE_TIMEOUT, revoke).await {
            Ok(Ok(_)) => info!("relay node left the node list"),
            Ok(Err(e)) => {
                warn!(error = %e, "relay node could not revoke its lease; the others drop it when it expires")
            }
            Err(_) => warn!(
                "etcd did not answer the lease revocation in time; the others drop this node when its lease expires"
            ),
        }
    }
}

impl Drop for Membership {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn keep_listed(
    config: EtcdConfig,
    advertise: String,
    hub: Hub,
    cert_sha256: String,
    lease: HeldLease,
) {
    hub.set_this_node(advertise.clone());
    loop {
        if let Err(e) = listed_once(&config, &advertise, &hub, &cert_sha256, &lease).await {
            warn!(error = %e, %advertise, "relay node list: registering again");
        }
        tokio::time::sleep(RETRY_PAUSE).await;
    }
}

/// Lists this node and follows the list until etcd fails.
async fn listed_once(
    config: &EtcdConfig,
    advertise: &str,
    hub: &Hub,
    cert_sha256: &str,
    held: &HeldLease,
) -> Result<(), MembershipError> {
    let client: Client = config.client().await?;
    let prefix = format!("{}nodes/", config.prefix);
    let status_prefix = format!("{}status/", config.prefix);
    let status_key = format!("{status_prefix}{advertise}");
    let ttl = i64::try_from(NODE_TTL.as_secs()).unwrap_or(5);
    // Every request goes to another member when one refuses the
    // connection (a dead member of three), as the registry's do.
    let lease = until_sent(|| {
        let mut leases = client.lease_client();
        async move { leases.grant(ttl, None).await }
    })
    .await?
    .id();
    *held.lock().unwrap_or_else(|p| p.into_inner()) = Some((client.clone(), lease));
    let record = serde_json::to_string(&NodeRecord {
        address: advertise.to_owned(),
    })
    .unwrap_or_default();
    let node_key = format!("{prefix}{advertise}");
    until_sent(|| {
        let mut kv = client.kv_client();
        let (key, record) = (node_key.clone(), record.clone());
        async move {
            kv.put(key, record, Some(PutOptions::new().with_lease(lease)))
                .await
        }
    })
    .await?;
    let (mut keeper, mut kept) = until_sent(|| {
        let mut leases = client.lease_client();
        async move { leases.keep_alive(lease).await }
    })
    .await?;
    let listed = get_prefix(&client, &prefix).await?;
    let mut nodes: BTreeMap<Vec<u8>, String> = listed
        .kvs()
        .iter()
        .filter_map(|kv| Some((kv.key().to_vec(), address(kv.value())?)))
        .collect();
    let revision = listed.header().map_or(0, |h| h.revision());
    publish(hub, &nodes);
    info!(%advertise, nodes = nodes.len(), "relay node listed in etcd");
    let mut changes = watch_prefix(&client, &prefix, revision + 1).await?;
    let mut publisher = Publisher::default();
    publisher
        .publish(&client, &status_key, lease, hub, advertise, cert_sha256)
        .await;
    let view = hub.cluster();
    view.forget_all();
    let statuses = get_prefix(&client, &status_prefix).await?;
    for kv in statuses.kvs() {
        heard(view, &status_prefix, kv, cert_sha256);
    }
    let status_revision = statuses.header().map_or(0, |h| h.revision());
    let mut status_changes = watch_prefix(&client, &status_prefix, status_revision + 1).await?;
    let mut tick = tokio::time::interval(KEEPALIVE_INTERVAL);
    loop {
        tokio::select! {
            _ = tick.tick() => {
                keeper.keep_alive().await?;
                publisher
                    .publish(&client, &status_key, lease, hub, advertise, cert_sha256)
                    .await;
            }
            change = status_changes.message() => {
                for event in watched(change)?.events() {
                    let Some(kv) = event.kv() else { continue };
                    match event.event_type() {
                        EventType::Put => heard(view, &status_prefix, kv, cert_sha256),
                        EventType::Delete => {
                            if let Some(node) = node_of(&status_prefix, kv.key()) {
                                view.forget(node);
                            }
                        }
                    }
                }
            }
            answer = kept.message() => match answer? {
                Some(answer) if answer.ttl() > 0 => {}
                _ => return Err(MembershipError::LeaseLost),
            },
            change = changes.message() => {
                for event in watched(change)?.events() {
                    let Some(kv) = event.kv() else { continue };
                    match event.event_type() {
                        EventType::Put => {
                            if let Some(a) = address(kv.value()) {
                                nodes.insert(kv.key().to_vec(), a);
                            }
                        }
                        EventType::Delete => {
                            nodes.remove(kv.key());
                        }
                    }
                }
                publish(hub, &nodes);
            }
        }
    }
}

/// Writes this node's summary when it changed, or when it was last
/// written [`cluster::refresh_after`] ago; never sooner than
/// [`cluster::write_gap`] after the last write.
#[derive(Default)]
struct Publisher {
    last: Option<(String, Instant)>,
}

impl Publisher {
    async fn publish(
        &mut self,
        client: &Client,
        key: &str,
        lease: i64,
        hub: &Hub,
        advertise: &str,
        cert_sha256: &str,
    ) {
        let value = cluster::encode(&cluster::summary_of(hub, advertise, cert_sha256));
        if let Some((last, at)) = &self.last {
            let since = at.elapsed();
            if since < cluster::write_gap(last.len())
                || (*last == value && since < cluster::refresh_after(value.len()))
            {
                return;
            }
        }
        let written = until_sent(|| {
            let mut kv = client.kv_client();
            let (key, value) = (key.to_owned(), value.clone());
            async move {
                kv.put(key, value, Some(PutOptions::new().with_lease(lease)))
                    .await
            }
        })
        .await;
        match written {
            Ok(_) => self.last = Some((value, Instant::now())),
            // The node stays listed; the summary is written again on a
            // later tick (the others mark it stale meanwhile).
            Err(e) => {
                warn!(error = %e, bytes = value.len(), "relay node status not written to etcd")
            }
        }
    }
}

/// Every key under `prefix`.
async fn get_prefix(
    client: &Client,
    prefix: &str,
) -> Result<etcd_client::GetResponse, etcd_client::Error> {
    until_sent(|| {
        let mut kv = client.kv_client();
        let prefix = prefix.to_owned();
        async move { kv.get(prefix, Some(GetOptions::new().with_prefix())).await }
    })
    .await
}

/// A watch of every key under `prefix` from `revision` on.
async fn watch_prefix(
    client: &Client,
    prefix: &str,
    revision: i64,
) -> Result<etcd_client::WatchStream, etcd_client::Error> {
    until_sent(|| {
        let mut watch = client.watch_client();
        let prefix = prefix.to_owned();
        async move {
            watch
                .watch(
                    prefix,
                    Some(
                        WatchOptions::new()
                            .with_prefix()
                            .with_start_revision(revision),
                    ),
                )
                .await
        }
    })
    .await
}

/// A watch's next answer, or why the watch ended.
fn watched(
    change: Result<Option<etcd_client::WatchResponse>, etcd_client::Error>,
) -> Result<etcd_client::WatchResponse, MembershipError> {
    match change? {
        Some(change) if !change.canceled() => Ok(change),
        _ => Err(MembershipError::WatchEnded),
    }
}

/// The node a key under `prefix` names.
fn node_of<'k>(prefix: &str, key: &'k [u8]) -> Option<&'k str> {
    std::str::from_utf8(key).ok()?.strip_prefix(prefix)
}

/// Records another node's summary (this node's own is live, not read back).
fn heard(view: &cluster::ClusterView, prefix: &str, kv: &etcd_client::KeyValue, ours: &str) {
    let Some(node) = node_of(prefix, kv.key()) else {
        return;
    };
    match serde_json::from_slice::<cluster::NodeSummary>(kv.value()) {
        Ok(summary) if summary.address != node => warn!(
            %node,
            claimed = %summary.address,
            "ignored a relay node's status that names another node"
        ),
        Ok(mut summary) => {
            // How often it is written follows from its size, whatever it
            // says.
            summary.refresh_secs = cluster::refresh_after(kv.value().len()).as_secs();
            view.heard(node, summary, Instant::now(), ours)
        }
        Err(e) => warn!(%node, error = %e, "ignored a relay node's status that does not read"),
    }
}

/// The address in a node's value; `None` (and a warning) for one that does
/// not read.
fn address(value: &[u8]) -> Option<String> {
    match serde_json::from_slice::<NodeRecord>(value) {
        Ok(record) => Some(record.address),
        Err(e) => {
            warn!(error = %e, "ignored a relay node whose record does not read");
            None
        }
    }
}

fn publish(hub: &Hub, nodes: &BTreeMap<Vec<u8>, String>) {
    let mut list: Vec<String> = nodes.values().cloned().collect();
    list.sort();
    list.dedup();
    hub.set_nodes(list);
}
