//! What a sender knows of its hybrid connections, without I/O: whether the
//! relay accepted each send key, which agents serve each one and whose turn
//! is next, and the endpoint the relay announced. Fed the control channel's
//! events; asked for the next agent.

use std::collections::{BTreeMap, HashSet};

use proto::control::{AgentInfo, Fingerprint, RelayMessage};
use proto::name::{Endpoint, HcName};
use tracing::{debug, info, warn};

#[derive(Debug, Clone, Default, PartialEq, Eq)]
enum Attachment {
    #[default]
    Attaching,
    Attached,
    Refused(String),
}

#[derive(Debug, Default)]
struct Hc {
    attachment: Attachment,
    /// The agents in the relay's rotation order.
    agents: Vec<AgentInfo>,
    /// Picks made so far: the next is `agents[next % agents.len()]`.
    next: usize,
    /// The target `host:port`, as the relay announced it.
    endpoint: Option<Endpoint>,
}

/// Why no agent can be picked for a hybrid connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Unavailable {
    /// The sender has no connection string for it.
    Unknown,
    /// The relay refused or ended the send key, with its reason.
    Refused(String),
    /// Not yet: no agent is announced (or the relay is not reached).
    NoAgent,
}

/// The sender's view of its hybrid connections.
#[derive(Debug, Default)]
pub struct Roster {
    connected: bool,
    last_error: Option<String>,
    hcs: BTreeMap<HcName, Hc>,
}

impl Roster {
    /// A roster of these hybrid connections, none attached yet.
    pub fn new(names: impl IntoIterator<Item = HcName>) -> Roster {
        Roster {
            hcs: names.into_iter().map(|n| (n, Hc::default())).collect(),
            ..Roster::default()
        }
    }

    /// The hybrid connections, by name.
    pub fn names(&self) -> Vec<HcName> {
        self.hcs.keys().cloned().collect()
    }

    /// Each hybrid connection with its endpoint once announced, by name.
    pub fn endpoints(&self) -> Vec<(HcName, Option<Endpoint>)> {
        self.hcs
            .iter()
            .map(|(n, h)| (n.clone(), h.endpoint.clone()))
            .collect()
    }

    /// The agents of `hc` in rotation order.
    pub fn agents(&self, hc: &HcName) -> Vec<AgentInfo> {
        self.hcs
            .get(hc)
            .map(|h| h.agents.clone())
            .unwrap_or_default()
    }

    /// Every agent of every hybrid connection (an agent serving several
    /// appears once per hybrid connection).
    pub fn all_agents(&self) -> impl Iterator<Item = &AgentInfo> {
        self.hcs.values().flat_map(|h| h.agents.iter())
    }

    /// The identities of the agents still in some rotation.
    pub fn live_identities(&self) -> HashSet<Fingerprint> {
        self.all_agents().map(|a| a.identity).collect()
    }

    /// The control channel is up.
    pub fn connected(&mut self) {
        self.connected = true;
        self.last_error = None;
    }

    /// The control channel went down: nothing the relay said holds until it
    /// says it again, except the endpoints (the appliance keeps naming them
    /// while it reconnects) and refusals.
    pub fn disconnected(&mut self, reason: String) {
        self.connected = false;
        self.last_error = Some(reason);
        for h in self.hcs.values_mut() {
            h.agents.clear();
            if h.attachment == Attachment::Attached {
                h.attachment = Attachment::Attaching;
            }
        }
    }

    /// Applies a message from the relay; `true` if some rotation changed.
    pub fn apply(&mut self, msg: &RelayMessage) -> bool {
        match msg {
            RelayMessage::Attached { hc, endpoint, .. } => {
                if let Some(h) = self.hcs.get_mut(hc) {
                    info!(%hc, "attached to relay");
                    h.attachment = Attachment::Attached;
                    if endpoint.is_some() {
                        h.endpoint = endpoint.clone();
                    }
                }
                false
            }
            RelayMessage::EndpointChanged { hc, endpoint } => {
                if let Some(h) = self.hcs.get_mut(hc) {
                    info!(%hc, %endpoint, "endpoint changed");
                    h.endpoint = Some(endpoint.clone());
                }
                false
            }
            RelayMessage::Detached {
                hc,
                reason,
                message,
            } => {
                let Some(h) = self.hcs.get_mut(hc) else {
                    return false;
                };
                warn!(%hc, ?reason, %message, "relay refused the send key");
                h.attachment = Attachment::Refused(message.clone());
                // No longer announced: the appliance stops naming it.
                h.endpoint = None;
                !std::mem::take(&mut h.agents).is_empty()
            }
            RelayMessage::Agents { hc, agents } => {
                debug!(%hc, count = agents.len(), "agents changed");
                match self.hcs.get_mut(hc) {
                    Some(h) if h.agents != *agents => {
                        h.agents = agents.clone();
                        true
                    }
                    _ => false,
                }
            }
            _ => false,
        }
    }

    /// The next agent of `hc` in round robin.
    pub fn pick(&mut self, hc: &HcName) -> Result<AgentInfo, Unavailable> {
        let h = self.hcs.get_mut(hc).ok_or(Unavailable::Unknown)?;
        if let Attachment::Refused(message) = &h.attachment {
            return Err(Unavailable::Refused(message.clone()));
        }
        if h.agents.is_empty() {
            return Err(Unavailable::NoAgent);
        }
        let agent = h.agents[h.next % h.agents.len()].clone();
        h.next = h.next.wrapping_add(1);
        Ok(agent)
    }

    /// Why no agent could be picked in time, for a person.
    pub fn not_ready_reason(&self) -> String {
        if self.connected {
            "no agent is connected for it (is `hybridlink agent run` up with its listen key?)"
                .into()
        } else {
            self.last_error
                .clone()
                .unwrap_or_else(|| "the relay has not answered yet".into())
        }
    }
}

#[cfg(test)]
mod tests {
    use proto::control::DetachReason;

    use super::*;

    fn name() -> HcName {
        "payroll".parse().unwrap()
    }

    fn agent(id: u64) -> AgentInfo {
        AgentInfo {
            id,
            identity: Fingerprint([id as u8; 32]),
        }
    }

    fn announce(roster: &mut Roster, ids: &[u64]) -> bool {
        roster.apply(&RelayMessage::Agents {
            hc: name(),
            agents: ids.iter().map(|i| agent(*i)).collect(),
        })
    }

    fn picks(roster: &mut Roster, n: usize) -> Vec<u64> {
        (0..n).map(|_| roster.pick(&name()).unwrap().id).collect()
    }

    #[test]
    fn streams_go_round_robin_and_a_new_agent_joins_the_turn() {
        let mut r = Roster::new([name()]);
        assert_eq!(r.pick(&name()), Err(Unavailable::NoAgent));
        assert!(announce(&mut r, &[1, 2, 3]));
        assert_eq!(picks(&mut r, 7), [1, 2, 3, 1, 2, 3, 1]);
        // The same list again changes nothing.
        assert!(!announce(&mut r, &[1, 2, 3]));
        assert!(announce(&mut r, &[1, 3]));
        let after = picks(&mut r, 4);
        assert_eq!(after.iter().filter(|i| **i == 1).count(), 2);
        assert_eq!(after.iter().filter(|i| **i == 3).count(), 2);
        assert!(r.live_identities().len() == 2);
    }

    #[test]
    fn unknown_and_refused_hybrid_connections_say_why() {
        let mut r = Roster::new([name()]);
        assert_eq!(r.pick(&"other".parse().unwrap()), Err(Unavailable::Unknown));
        r.apply(&RelayMessage::Attached {
            hc: name(),
            endpoint: Some("10.0.0.1:5432".parse().unwrap()),
            expires: 0,
        });
        announce(&mut r, &[1]);
        assert!(r.endpoints()[0].1.is_some());
        let left = r.apply(&RelayMessage::Detached {
            hc: name(),
            reason: DetachReason::KeyRegenerated,
            message: "regenerated".into(),
        });
        assert!(left, "the rotation emptied");
        assert_eq!(
            r.pick(&name()),
            Err(Unavailable::Refused("regenerated".into()))
        );
        assert_eq!(r.endpoints()[0].1, None, "no longer named");
        assert!(r.live_identities().is_empty());
    }

    #[test]
    fn a_lost_channel_empties_the_rotations_but_keeps_the_endpoints() {
        let mut r = Roster::new([name()]);
        r.connected();
        r.apply(&RelayMessage::Attached {
            hc: name(),
            endpoint: Some("10.0.0.1:5432".parse().unwrap()),
            expires: 0,
        });
        announce(&mut r, &[1, 2]);
        assert!(r.not_ready_reason().contains("no agent is connected"));
        r.disconnected("relay closed the control channel".into());
        assert_eq!(r.pick(&name()), Err(Unavailable::NoAgent));
        assert_eq!(r.not_ready_reason(), "relay closed the control channel");
        assert!(r.endpoints()[0].1.is_some());
        // Back: the relay announces again.
        r.connected();
        announce(&mut r, &[2]);
        assert_eq!(picks(&mut r, 2), [2, 2]);
    }
}
