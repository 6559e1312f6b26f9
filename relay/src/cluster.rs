//! What each node of a relay cluster knows of the others' live state.
//!
//! Agents attach on every node and senders use one, so no node sees the
//! whole cluster by itself. Each node publishes a compact [`NodeSummary`]
//! of its own live state (per hybrid connection: its agents, their stream
//! counters, the pipes it carries; and the node's own facts) under its
//! etcd lease at `PREFIX` `status/` `HOST:PORT` ([`crate::membership`]
//! writes it and follows the others'). A node answering a status request
//! merges its own live state with the summaries it holds here and labels
//! every entry with its node.
//!
//! A summary is written when it changed, at most once per
//! [`crate::membership`] tick (1 s), and again at least every
//! [`REFRESH_EVERY`] when nothing changed, so one not heard of for
//! [`STALE_AFTER`] belongs to a node whose lease is alive but whose state
//! is not being published: it is shown, marked stale. A node killed
//! outright loses its lease, and its summary goes with it.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tracing::error;

use crate::hub::{AttachedAgent, Hub};

/// A node publishes its summary again at least this often, changed or not.
pub const REFRESH_EVERY: Duration = Duration::from_secs(3);
/// A summary not heard of again within this is stale (three refreshes and
/// then some: one late write does not mark a node).
pub const STALE_AFTER: Duration = Duration::from_secs(10);
/// A summary bigger than this is published without its agents' details
/// (counts and counters stay), well under etcd's 1.5 MiB request limit.
pub const MAX_SUMMARY_BYTES: usize = 512 * 1024;
/// Most summary bytes a node writes to etcd a second, on average: a bigger
/// summary is written less often (512 KiB: every 32 s), so that the
/// history etcd keeps until it compacts stays small whatever the size of
/// the cluster (README: auto-compaction).
pub const WRITE_BUDGET: usize = 16 * 1024;

/// The least time between two writes of a summary of `len` bytes: one
/// second, longer for one bigger than [`WRITE_BUDGET`].
pub fn write_gap(len: usize) -> Duration {
    Duration::from_secs(1).max(Duration::from_secs_f64(len as f64 / WRITE_BUDGET as f64))
}

/// How long a node may leave a summary of `len` bytes unwritten when it did
/// not change.
pub fn refresh_after(len: usize) -> Duration {
    REFRESH_EVERY.max(write_gap(len))
}

/// One node's live state, as it publishes it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct NodeSummary {
    /// `HOST:PORT` the node is listed at.
    pub address: String,
    /// Unix seconds when the node started.
    pub started_unix: u64,
    /// Whether the node's registry takes changes (etcd answers it).
    pub registry_writable: bool,
    /// SHA-256 of the certificate the node presents, hex.
    pub cert_sha256: String,
    /// Per hybrid connection with anything attached or open on this node.
    #[serde(default)]
    pub hcs: BTreeMap<String, HcSummary>,
    /// Set when the agents' details were left out to keep the summary
    /// small ([`MAX_SUMMARY_BYTES`]).
    #[serde(default)]
    pub listeners_omitted: bool,
    /// Hybrid connections left out, the least busy first, because even
    /// without the agents' details the summary was bigger than
    /// [`MAX_SUMMARY_BYTES`].
    #[serde(default)]
    pub hcs_omitted: usize,
    /// Seconds within which the node writes this summary again even if
    /// nothing changed ([`refresh_after`] its size); readers mark it stale
    /// only well after that.
    #[serde(default)]
    pub refresh_secs: u64,
}

impl NodeSummary {
    /// How old this summary may be before it is stale.
    pub fn stale_after(&self) -> Duration {
        STALE_AFTER.max(Duration::from_secs(
            self.refresh_secs.saturating_mul(3).saturating_add(1),
        ))
    }
}

/// One hybrid connection on one node.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct HcSummary {
    /// Agents attached on the node.
    #[serde(default)]
    pub listener_count: usize,
    /// Those agents.
    #[serde(default)]
    pub listeners: Vec<AttachedAgent>,
    /// Their stream counters, summed.
    #[serde(default)]
    pub streams: proto::control::StreamStats,
    /// Pipes (sender to agent) the node carries now.
    #[serde(default)]
    pub pipes: usize,
    /// Senders attached on the node.
    #[serde(default)]
    pub senders: usize,
}

/// How a listed node is doing, as this node sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum NodeState {
    /// Listed, its summary fresh, nothing wrong.
    Up,
    /// Listed (its lease is alive) but its summary is missing or older
    /// than [`STALE_AFTER`]: what is shown of it may be out of date.
    Stale,
    /// It presents another certificate than this node: connection strings
    /// pin one, so agents and senders refuse it.
    CertificateMismatch,
    /// Its registry does not take changes (etcd does not answer it).
    RegistryNotWritable,
}

/// A listed node and its state (`GET /api/v1/nodes`, `states`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct NodeView {
    /// `HOST:PORT` the node is listed at.
    pub address: String,
    /// Whether it is the node that answered.
    pub this_node: bool,
    /// The worst of what is wrong with it, or `up`.
    pub state: NodeState,
    /// One sentence per thing wrong with it.
    pub problems: Vec<String>,
    /// Unix seconds when it started, if its summary was heard.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub started_unix: Option<u64>,
    /// Whether its registry takes changes, if its summary was heard.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub registry_writable: Option<bool>,
    /// The certificate it presents, if its summary was heard.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cert_sha256: Option<String>,
    /// Milliseconds since its summary was last heard of (0 for this node).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub summary_age_ms: Option<u64>,
}

/// A summary and when it was heard.
#[derive(Debug, Clone)]
struct Heard {
    summary: NodeSummary,
    at: Instant,
}

#[derive(Debug, Default)]
struct Peers {
    /// By the address in the key it was published under.
    summaries: BTreeMap<String, Heard>,
    /// (node, certificate) pairs already reported as a mismatch.
    reported: BTreeSet<(String, String)>,
}

/// The other nodes' summaries, as this node last heard them. Cheap to
/// clone.
#[derive(Debug, Clone, Default)]
pub struct ClusterView {
    peers: Arc<Mutex<Peers>>,
}

impl ClusterView {
    fn lock(&self) -> std::sync::MutexGuard<'_, Peers> {
        self.peers.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Records `summary`, published under `address`, heard `now`. A node
    /// presenting another certificate than `ours` is logged as an error,
    /// once per node and certificate.
    pub fn heard(&self, address: &str, summary: NodeSummary, now: Instant, ours: &str) {
        let mut peers = self.lock();
        if summary.cert_sha256 != ours
            && peers
                .reported
                .insert((address.to_owned(), summary.cert_sha256.clone()))
        {
            error!(
                node = %address,
                node_cert_sha256 = %summary.cert_sha256,
                this_cert_sha256 = %ours,
                "relay node {address} presents another certificate than this node: connection strings pin one certificate, so agents and senders refuse that node; give every node the same cert.pem and key.pem"
            );
        }
        peers
            .summaries
            .insert(address.to_owned(), Heard { summary, at: now });
    }

    /// Forgets the summary published under `address` (its key was
    /// deleted: the node left).
    pub fn forget(&self, address: &str) {
        self.lock().summaries.remove(address);
    }

    /// Forgets every summary (before reading them all again).
    pub fn forget_all(&self) {
        self.lock().summaries.clear();
    }

    /// Every summary held, by address, with its age at `now`.
    pub fn summaries(&self, now: Instant) -> BTreeMap<String, (NodeSummary, Duration)> {
        self.lock()
            .summaries
            .iter()
            .map(|(a, h)| {
                (
                    a.clone(),
                    (h.summary.clone(), now.saturating_duration_since(h.at)),
                )
            })
            .collect()
    }
}

/// This node's live state as a summary, to publish under `address`.
pub fn summary_of(hub: &Hub, address: &str, cert_sha256: &str) -> NodeSummary {
    let mut hcs = BTreeMap::new();
    for (name, agents, senders) in hub.attachment_counts() {
        let listeners = hub.agents(&name);
        let mut streams = proto::control::StreamStats::default();
        for a in &listeners {
            streams += a.streams;
        }
        let entry = HcSummary {
            listener_count: agents,
            listeners,
            streams,
            pipes: hub.pipes_of(&name),
            senders,
        };
        hcs.insert(name.to_string(), entry);
    }
    NodeSummary {
        address: address.to_owned(),
        started_unix: hub.started_unix(),
        registry_writable: hub.registry().health().writable,
        cert_sha256: cert_sha256.to_owned(),
        hcs,
        listeners_omitted: false,
        hcs_omitted: 0,
        refresh_secs: 0,
    }
}

/// `summary` as the JSON to publish, without the agents' details if it
/// would be bigger than [`MAX_SUMMARY_BYTES`].
/// It says within how long it will be written again ([`refresh_after`]).
pub fn encode(summary: &NodeSummary) -> String {
    let mut summary = summary.clone();
    let mut text = serde_json::to_string(&summary).unwrap_or_default();
    if text.len() > MAX_SUMMARY_BYTES {
        for hc in summary.hcs.values_mut() {
            hc.listeners.clear();
        }
        summary.listeners_omitted = true;
        text = serde_json::to_string(&summary).unwrap_or_default();
    }
    if text.len() > MAX_SUMMARY_BYTES {
        // Still too big (thousands of hybrid connections): keep the
        // busiest, dropping a tenth of the rest at a time.
        let mut by_activity: Vec<(usize, String)> = summary
            .hcs
            .iter()
            .map(|(name, hc)| (activity(hc), name.clone()))
            .collect();
        by_activity.sort();
        let mut dropped = by_activity.into_iter();
        while text.len() > MAX_SUMMARY_BYTES && !summary.hcs.is_empty() {
            let step = (summary.hcs.len() / 10).max(1);
            for (_, name) in dropped.by_ref().take(step) {
                summary.hcs.remove(&name);
                summary.hcs_omitted += 1;
            }
            text = serde_json::to_string(&summary).unwrap_or_default();
        }
    }
    summary.refresh_secs = refresh_after(text.len()).as_secs_f64().ceil() as u64;
    serde_json::to_string(&summary).unwrap_or_default()
}

/// How busy a hybrid connection is on a node, to choose which to keep in
/// a summary that must shrink.
fn activity(hc: &HcSummary) -> usize {
    hc.pipes + hc.senders + hc.listener_count + hc.streams.open as usize
}

/// The state of each node in `listed`, given this node's own summary
/// `this` and the others' `peers` with their ages.
pub fn node_states(
    listed: &[String],
    this: &NodeSummary,
    peers: &BTreeMap<String, (NodeSummary, Duration)>,
) -> Vec<NodeView> {
    listed
        .iter()
        .map(|address| {
            if *address == this.address {
                return view_of(
                    address,
                    true,
                    Some((this, Duration::ZERO)),
                    &this.cert_sha256,
                );
            }
            let heard = peers.get(address).map(|(s, age)| (s, *age));
            view_of(address, false, heard, &this.cert_sha256)
        })
        .collect()
}

fn view_of(
    address: &str,
    this_node: bool,
    heard: Option<(&NodeSummary, Duration)>,
    ours: &str,
) -> NodeView {
    let mut problems = Vec::new();
    let mut states = Vec::new();
    match heard {
        None => {
            states.push(NodeState::Stale);
            problems.push(
                "its lease is alive but no summary of its state has been heard: what this node shows of it may be missing".to_owned(),
            );
        }
        Some((summary, age)) => {
            if summary.cert_sha256 != ours {
                states.push(NodeState::CertificateMismatch);
                problems.push(format!(
                    "it presents certificate {} but this node presents {ours}: agents and senders pinned to one refuse the other; give every node the same cert.pem and key.pem",
                    summary.cert_sha256
                ));
            }
            if age > summary.stale_after() {
                states.push(NodeState::Stale);
                problems.push(format!(
                    "its summary was last heard {} s ago: what is shown of it may be out of date",
                    age.as_secs()
                ));
            }
            if !summary.registry_writable {
                states.push(NodeState::RegistryNotWritable);
                problems
                    .push("its registry does not take changes: etcd does not answer it".to_owned());
            }
        }
    }
    NodeView {
        address: address.to_owned(),
        this_node,
        state: states.first().copied().unwrap_or(NodeState::Up),
        problems,
        started_unix: heard.map(|(s, _)| s.started_unix),
        registry_writable: heard.map(|(s, _)| s.registry_writable),
        cert_sha256: heard.map(|(s, _)| s.cert_sha256.clone()),
        summary_age_ms: heard.map(|(_, age)| u64::try_from(age.as_millis()).unwrap_or(u64::MAX)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn summary(address: &str, cert: &str, writable: bool) -> NodeSummary {
        NodeSummary {
            address: address.into(),
            started_unix: 1,
            registry_writable: writable,
            cert_sha256: cert.into(),
            hcs: BTreeMap::new(),
            listeners_omitted: false,
            hcs_omitted: 0,
            refresh_secs: 0,
        }
    }

    #[test]
    fn each_listed_node_gets_the_state_its_summary_shows() {
        let this = summary("a:1", "aa", true);
        let listed: Vec<String> = ["a:1", "b:1", "c:1", "d:1", "e:1", "f:1"]
            .map(String::from)
            .to_vec();
        let mut peers = BTreeMap::new();
        let fresh = Duration::from_secs(1);
        peers.insert("b:1".to_owned(), (summary("b:1", "aa", true), fresh));
        peers.insert("c:1".to_owned(), (summary("c:1", "bb", true), fresh));
        peers.insert("d:1".to_owned(), (summary("d:1", "aa", false), fresh));
        peers.insert(
            "e:1".to_owned(),
            (summary("e:1", "aa", true), STALE_AFTER * 2),
        );
        let states: Vec<(String, NodeState)> = node_states(&listed, &this, &peers)
            .into_iter()
            .map(|v| (v.address, v.state))
            .collect();
        assert_eq!(
            states,
            vec![
                ("a:1".into(), NodeState::Up),
                ("b:1".into(), NodeState::Up),
                ("c:1".into(), NodeState::CertificateMismatch),
                ("d:1".into(), NodeState::RegistryNotWritable),
                ("e:1".into(), NodeState::Stale),
                // Listed, never heard of.
                ("f:1".into(), NodeState::Stale),
            ]
        );
    }

    #[test]
    fn a_summary_too_big_leaves_out_the_agents_but_keeps_the_counts() {
        let mut big = summary("a:1", "aa", true);
        let agent = AttachedAgent {
            id: 1,
            label: "x".repeat(1000),
            address: "192.0.2.1:1".into(),
            connected_since: 0,
            streams: Default::default(),
            end_to_end: "verified".into(),
            policy_refusal: None,
        };
        for i in 0..1000 {
            big.hcs.insert(
                format!("hc{i}"),
                HcSummary {
                    listener_count: 1,
                    listeners: vec![agent.clone()],
                    ..Default::default()
                },
            );
        }
        let text = encode(&big);
        assert!(text.len() <= MAX_SUMMARY_BYTES, "{}", text.len());
        let back: NodeSummary = serde_json::from_str(&text).unwrap();
        assert!(back.listeners_omitted);
        assert_eq!(back.hcs["hc7"].listener_count, 1);
        assert!(back.hcs["hc7"].listeners.is_empty());
    }

    #[test]
    fn a_big_summary_is_written_less_often_and_goes_stale_later() {
        assert_eq!(write_gap(2_000), Duration::from_secs(1));
        assert_eq!(write_gap(MAX_SUMMARY_BYTES), Duration::from_secs(32));
        let mut big = summary("b:1", "aa", true);
        big.hcs.insert(
            "payroll".into(),
            HcSummary {
                pipes: 1,
                ..HcSummary::default()
            },
        );
        let small: NodeSummary = serde_json::from_str(&encode(&big)).unwrap();
        assert_eq!(small.refresh_secs, REFRESH_EVERY.as_secs());
        assert_eq!(small.stale_after(), STALE_AFTER);
        big.refresh_secs = 32;
        assert_eq!(big.stale_after(), Duration::from_secs(97));
        // A summary from a relay that does not say stays under the old rule.
        let old: NodeSummary = serde_json::from_str(
            r#"{"address":"c:1","started_unix":1,"registry_writable":true,"cert_sha256":"aa"}"#,
        )
        .unwrap();
        assert_eq!(old.stale_after(), STALE_AFTER);
    }

    #[test]
    fn thousands_of_hybrid_connections_keep_the_summary_under_the_limit_busiest_first() {
        let mut many = summary("m:1", "aa", true);
        for i in 0..20_000 {
            many.hcs.insert(
                format!("hybrid-connection-number-{i:05}"),
                HcSummary {
                    listener_count: 1,
                    pipes: usize::from(i == 7),
                    ..HcSummary::default()
                },
            );
        }
        let text = encode(&many);
        assert!(text.len() <= MAX_SUMMARY_BYTES, "{} bytes", text.len());
        let kept: NodeSummary = serde_json::from_str(&text).unwrap();
        assert!(kept.hcs_omitted > 0);
        assert_eq!(kept.hcs.len() + kept.hcs_omitted, 20_000);
        assert!(kept.hcs.contains_key("hybrid-connection-number-00007"));
    }
}
