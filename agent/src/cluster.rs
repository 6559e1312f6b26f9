//! Attaching on every node of a relay cluster.
//!
//! A relay that shares its registry with other nodes on etcd tells its
//! peers the nodes' addresses ([`RelayMessage::Nodes`]). The agent keeps a
//! control channel, with the same listen strings, to each listed node that
//! is not the one its strings name, and closes the channel of a node that
//! left the list. Every node then sees every agent and issues pipes to its
//! own senders; a pipe goes to the node whose ticket it carries.
//!
//! [`RelayMessage::Nodes`]: proto::control::RelayMessage::Nodes

use std::collections::{HashMap, HashSet};
use std::sync::{Mutex, Weak};

use proto::connection_string::ConnectionString;
use proto::control::PeerRole;
use tokio::task::AbortHandle;
use tracing::{info, warn};
use transport::control::{self, ControlConfig, RelayAddr};

use crate::serve;

/// The extra control channels of one relay cluster; dropping it closes them.
#[derive(Debug)]
pub(crate) struct Cluster {
    /// The node the connection strings name; its channel is the
    /// generation's own.
    origin: RelayAddr,
    strings: Vec<ConnectionString>,
    /// The listed node that the origin's channel reached, as the node
    /// said: no second channel goes there (the strings may name the
    /// relay by a name that reaches any node).
    origin_node: Mutex<Option<RelayAddr>>,
    channels: Mutex<HashMap<RelayAddr, AbortHandle>>,
}

impl Cluster {
    /// The cluster reached through `origin` with `strings`.
    pub(crate) fn new(origin: RelayAddr, strings: Vec<ConnectionString>) -> Cluster {
        Cluster {
            origin,
            strings,
            origin_node: Mutex::new(None),
            channels: Mutex::new(HashMap::new()),
        }
    }

    /// Follows a new node list: a channel to each node not yet reached, and
    /// none to a node no longer listed. `ctx` is the context of the channel
    /// that brought the list; `cluster` is this, for the new channels' own
    /// lists; `this_node` is the sending node's own entry.
    pub(crate) fn update(
        &self,
        ctx: &serve::Context,
        cluster: &Weak<Cluster>,
        nodes: &[String],
        this_node: Option<&str>,
    ) {
        let mut origin_node = self.origin_node.lock().unwrap_or_else(|p| p.into_inner());
        if ctx.relay == self.origin {
            *origin_node = this_node.and_then(|node| control::parse_node(node, &self.origin));
        }
        let wanted: HashSet<RelayAddr> = nodes
            .iter()
            .filter_map(|node| {
                let addr = control::parse_node(node, &self.origin);
                if addr.is_none() {
                    warn!(%node, "ignored a relay node whose address does not read as HOST:PORT");
                }
                addr
            })
            .filter(|addr| *addr != self.origin && Some(addr) != origin_node.as_ref())
            .collect();
        drop(origin_node);
        let mut channels = self.channels.lock().unwrap_or_else(|p| p.into_inner());
        channels.retain(|addr, task| {
            let keep = wanted.contains(addr);
            if !keep {
                info!(node = %addr, "relay node left the cluster: its control channel closes");
                task.abort();
            }
            keep
        });
        for addr in wanted {
            if channels.contains_key(&addr) {
                continue;
            }
            match self.attach(ctx, cluster, addr.clone()) {
                Ok(task) => {
                    info!(node = %addr, "attaching on relay node of the cluster");
                    channels.insert(addr, task);
                }
                Err(e) => warn!(node = %addr, error = %e, "cannot attach on relay node"),
            }
        }
    }

    fn attach(
        &self,
        ctx: &serve::Context,
        cluster: &Weak<Cluster>,
        node: RelayAddr,
    ) -> Result<AbortHandle, control::ControlClientError> {
        let mut config = ControlConfig::new(
            PeerRole::Agent,
            ctx.identity.fingerprint(),
            ctx.options.label.clone(),
            self.strings.clone(),
        )?;
        config.relay = node.clone();
        config.token_ttl = ctx.options.token_ttl;
        let mut node_ctx = ctx.clone();
        node_ctx.relay = node.clone();
        node_ctx.cluster = cluster.clone();
        let origin = self.origin.clone();
        Ok(tokio::spawn(async move {
            // The relay chose this address: dial it only if the relay's own
            // name leads there, so that no relay can make this agent
            // connect elsewhere.
            if !control::node_allowed(&node, &origin).await {
                warn!(
                    node = %node,
                    relay = %origin.host,
                    "not attaching on a listed relay node at an address the relay's name does not resolve to (list every node's address under that name)"
                );
                return;
            }
            match control::spawn(config) {
                Ok((handle, events)) => crate::run_relay(node_ctx, handle, events).await,
                Err(e) => warn!(node = %node, error = %e, "cannot attach on relay node"),
            }
        })
        .abort_handle())
    }

    /// Whether `relay` is the node the strings name (its channel's end is
    /// reported as the hybrid connections' state; the others' are not).
    pub(crate) fn is_origin(&self, relay: &RelayAddr) -> bool {
        *relay == self.origin
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let channels = self.channels.get_mut().unwrap_or_else(|p| p.into_inner());
        for task in channels.values() {
            task.abort();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proto::control::Fingerprint;

    #[test]
    fn node_addresses_read_as_host_and_port() {
        let origin = RelayAddr {
            host: "relay.example".into(),
            port: 9443,
            cert: Fingerprint([7; 32]),
        };
        let a = control::parse_node("10.0.0.2:9444", &origin).unwrap();
        assert_eq!(
            (a.host.as_str(), a.port, a.cert),
            ("10.0.0.2", 9444, origin.cert)
        );
        let v6 = control::parse_node("[::1]:9443", &origin).unwrap();
        assert_eq!(v6.host, "::1");
        assert!(control::parse_node("no-port", &origin).is_none());
        assert!(control::parse_node(":9443", &origin).is_none());
        assert!(control::parse_node("host:99999", &origin).is_none());
    }
}
