//! Which relay nodes serve one registry on etcd.
//!
//! Each node puts the address peers dial to reach it (`relay serve
//! --advertise`) at `PREFIX` `nodes/` `HOST:PORT`, attached to a lease of
//! [`NODE_TTL`] that it keeps alive; a node that dies leaves the list when
//! its lease expires. Every node watches `PREFIX` `nodes/` and hands the
//! list to its hub, which tells the peers that understand it
//! ([`proto::control::RelayMessage::Nodes`]): agents attach on every node,
//! senders fail over to another.

use std::collections::BTreeMap;
use std::time::Duration;

use etcd_client::{Client, EventType, GetOptions, PutOptions, WatchOptions};
use thiserror::Error;
use tracing::{info, warn};

use crate::hub::Hub;
use crate::registry::etcd::{EtcdConfig, EtcdError};

/// How long a node stays listed after its last keep-alive.
pub const NODE_TTL: Duration = Duration::from_secs(5);
/// How often the lease is kept alive: several times per TTL, so one late
/// answer does not drop the node.
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(1);
/// Pause before registering again after etcd failed.
const RETRY_PAUSE: Duration = Duration::from_secs(1);

/// Why a node's registration ended (it is made again after [`RETRY_PAUSE`]).
#[derive(Debug, Error)]
enum MembershipError {
    #[error(transparent)]
    Connect(#[from] EtcdError),
    #[error(transparent)]
    Etcd(#[from] etcd_client::Error),
    #[error("etcd let this node's lease expire")]
    LeaseLost,
    #[error("etcd ended the watch of the node list")]
    WatchEnded,
}

/// The value at a node's key.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
struct NodeRecord {
    /// `HOST:PORT` peers dial.
    address: String,
}

/// Keeps this node listed as `advertise` and `hub`'s node list current,
/// until the relay stops.
pub async fn keep_listed(config: EtcdConfig, advertise: String, hub: Hub) {
    hub.set_this_node(advertise.clone());
    loop {
        if let Err(e) = listed_once(&config, &advertise, &hub).await {
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
) -> Result<(), MembershipError> {
    let client: Client = config.client().await?;
    let prefix = format!("{}nodes/", config.prefix);
    let ttl = i64::try_from(NODE_TTL.as_secs()).unwrap_or(5);
    let lease = client.lease_client().grant(ttl, None).await?.id();
    let record = serde_json::to_string(&NodeRecord {
        address: advertise.to_owned(),
    })
    .unwrap_or_default();
    client
        .kv_client()
        .put(
            format!("{prefix}{advertise}"),
            record,
            Some(PutOptions::new().with_lease(lease)),
        )
        .await?;
    let (mut keeper, mut kept) = client.lease_client().keep_alive(lease).await?;
    let listed = client
        .kv_client()
        .get(prefix.as_str(), Some(GetOptions::new().with_prefix()))
        .await?;
    let mut nodes: BTreeMap<Vec<u8>, String> = listed
        .kvs()
        .iter()
        .filter_map(|kv| Some((kv.key().to_vec(), address(kv.value())?)))
        .collect();
    let revision = listed.header().map_or(0, |h| h.revision());
    publish(hub, &nodes);
    info!(%advertise, nodes = nodes.len(), "relay node listed in etcd");
    let mut changes = client
        .watch_client()
        .watch(
            prefix.as_str(),
            Some(
                WatchOptions::new()
                    .with_prefix()
                    .with_start_revision(revision + 1),
            ),
        )
        .await?;
    let mut tick = tokio::time::interval(KEEPALIVE_INTERVAL);
    loop {
        tokio::select! {
            _ = tick.tick() => keeper.keep_alive().await?,
            answer = kept.message() => match answer? {
                Some(answer) if answer.ttl() > 0 => {}
                _ => return Err(MembershipError::LeaseLost),
            },
            change = changes.message() => {
                let Some(change) = change? else {
                    return Err(MembershipError::WatchEnded);
                };
                if change.canceled() {
                    return Err(MembershipError::WatchEnded);
                }
                for event in change.events() {
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
