//! The relay's live state: control sessions, who is attached to which hybrid
//! connection, and pipe tickets waiting for their two ends.
//!
//! All of it sits behind one mutex that is held only for short, non-async
//! critical sections. Messages to sessions go through each session's bounded
//! queue ([`SESSION_QUEUE`]); a message for a session whose queue is full is
//! dropped (and logged) rather than letting the relay's memory grow.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use proto::control::{
    AgentInfo, DetachReason, Fingerprint, PeerRole, RelayMessage, TICKET_LEN, Ticket,
};
use proto::key::Right;
use proto::label::PeerLabel;
use proto::name::HcName;
use proto::sas;
use ring::rand::{SecureRandom, SystemRandom};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot};
use tracing::{info, warn};

use crate::registry::Registry;

/// How long a pipe ticket waits for both ends.
pub const TICKET_TTL: Duration = Duration::from_secs(10);
/// Depth of each session's outgoing queue.
pub const SESSION_QUEUE: usize = 4096;
/// Listeners per hybrid connection, as in the original product.
pub const MAX_LISTENERS_PER_HC: usize = 25;

/// The relay's id of a control session.
pub type SessionId = u64;

#[derive(Debug)]
struct Attachment {
    token: String,
    expires: u64,
}

#[derive(Debug)]
struct Session {
    role: PeerRole,
    identity: Fingerprint,
    label: PeerLabel,
    addr: SocketAddr,
    since: SystemTime,
    tx: mpsc::Sender<RelayMessage>,
    attached: HashMap<HcName, Attachment>,
    /// Listener: its last stream counters per attached hybrid connection.
    stats: HashMap<HcName, (proto::control::StreamStats, AgentReport)>,
}

/// What an agent last said about a hybrid connection besides its counters.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct AgentReport {
    /// The agent holds the hybrid connection's end-to-end key and requires
    /// the end-to-end proof on every stream.
    pub end_to_end: bool,
    /// Set when the agent's on-prem policy refuses the endpoint.
    pub policy_refusal: Option<String>,
}

/// The first end of a pipe to arrive waits here for the other.
#[derive(Debug)]
struct PendingPipe {
    created: Instant,
    sender: SessionId,
    agent: SessionId,
    waiting: Option<(proto::control::PipeRole, oneshot::Sender<TcpStream>)>,
}

#[derive(Debug, Default)]
struct State {
    sessions: HashMap<SessionId, Session>,
    tickets: HashMap<Ticket, PendingPipe>,
}

/// A snapshot of one agent of a hybrid connection, for the status API.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct ListenerStatus {
    /// Relay session id.
    pub id: SessionId,
    /// The agent's own name.
    pub label: String,
    /// Its address as the relay sees it.
    pub address: String,
    /// Unix seconds when its control channel came up.
    pub connected_since: u64,
    /// Its streams of this hybrid connection, as it last reported them.
    pub streams: proto::control::StreamStats,
    /// `verified` when the agent requires the end-to-end proof, else
    /// `relay-trusted` (as the agent last reported it).
    pub end_to_end: String,
    /// Why the agent's on-prem policy refuses the endpoint, if it does.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub policy_refusal: Option<String>,
}

/// What happened to a pipe connection presenting a ticket.
#[derive(Debug)]
pub enum PipeMeeting {
    /// This end is first: keep `conn` and wait for the other end's connection
    /// on `partner`, then splice the two.
    Wait {
        /// Delivers the other end's connection.
        partner: oneshot::Receiver<TcpStream>,
        /// This end's connection, handed back.
        conn: TcpStream,
    },
    /// The other end was waiting and now has this connection.
    Handed,
}

/// Why a pipe connection was turned away.
#[derive(Debug, thiserror::Error)]
pub enum PipeRefused {
    /// Unknown, used or expired ticket.
    #[error("unknown or expired pipe ticket")]
    UnknownTicket,
    /// Both connections claimed the same end.
    #[error("both ends of the pipe claimed the same role")]
    SameRole,
}

/// One spliced pipe, counted against `--max-pipes` while it lives.
#[derive(Debug)]
pub struct PipeGuard(Arc<Inner>);

impl Drop for PipeGuard {
    fn drop(&mut self) {
        self.0.active_pipes.fetch_sub(1, Ordering::Relaxed);
    }
}

/// The relay's live state. Cheap to clone.
#[derive(Clone, Debug)]
pub struct Hub {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    registry: Registry,
    state: Mutex<State>,
    next_session: AtomicU64,
    rng: SystemRandom,
    max_listeners: AtomicUsize,
    /// Pipes (sender-agent pairs, each carrying any number of streams) that
    /// may be spliced at once, and how many are.
    max_pipes: AtomicUsize,
    active_pipes: AtomicUsize,
    /// Checks tokens presented for names the registry does not hold
    /// ([`Hub::refuse_unknown`]).
    decoy_key: proto::key::Key,
}

/// A key no connection string holds, for [`Hub::refuse_unknown`].
fn decoy_key() -> proto::key::Key {
    proto::key::Key::generate().unwrap_or_else(|_| {
        // Without randomness any key will do: a token that verifies against
        // it is still refused.
        #[allow(clippy::expect_used)]
        "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA="
            .parse()
            .expect("a constant 32-byte base64 key parses")
    })
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

impl Hub {
    /// A hub over `registry`.
    pub fn new(registry: Registry) -> Hub {
        Hub {
            inner: Arc::new(Inner {
                registry,
                state: Mutex::new(State::default()),
                next_session: AtomicU64::new(1),
                max_listeners: AtomicUsize::new(MAX_LISTENERS_PER_HC),
                max_pipes: AtomicUsize::new(usize::MAX),
                active_pipes: AtomicUsize::new(0),
                rng: SystemRandom::new(),
                decoy_key: decoy_key(),
            }),
        }
    }

    /// The registry this hub checks tokens against.
    pub fn registry(&self) -> &Registry {
        &self.inner.registry
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // Every critical section leaves the state consistent before it can
        // panic, so a poisoned lock is still usable.
        self.inner.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Registers a new control session; returns its id.
    pub fn register(
        &self,
        role: PeerRole,
        identity: Fingerprint,
        label: PeerLabel,
        addr: SocketAddr,
        tx: mpsc::Sender<RelayMessage>,
    ) -> SessionId {
        let id = self.inner.next_session.fetch_add(1, Ordering::Relaxed);
        let session = Session {
            role,
            identity,
            label,
            addr,
            since: SystemTime::now(),
            tx,
            attached: HashMap::new(),
            stats: HashMap::new(),
        };
        self.lock().sessions.insert(id, session);
        id
    }

    /// Whether the session holds at least one attachment, i.e. has
    /// presented a token that verified.
    pub fn has_attachment(&self, id: SessionId) -> bool {
        self.lock()
            .sessions
            .get(&id)
            .is_some_and(|s| !s.attached.is_empty())
    }

    /// Removes a session and everything it was attached to.
    pub fn unregister(&self, id: SessionId) {
        let mut state = self.lock();
        let entities: Vec<HcName> = match state.sessions.get(&id) {
            Some(s) => s.attached.keys().cloned().collect(),
            None => return,
        };
        for entity in entities {
            detach_locked(&mut state, id, &entity);
        }
        state.sessions.remove(&id);
    }

    /// Handles an `Attach` or `Renew`: verifies the token and, on success,
    /// records the attachment and tells the others.
    pub fn attach(&self, id: SessionId, entity: HcName, token: String, renew: bool) {
        let now = unix_now();
        let mut state = self.lock();
        let Some(session) = state.sessions.get(&id) else {
            return;
        };
        let role = session.role;
        let tx = session.tx.clone();
        let needed = match role {
            PeerRole::Sender => Right::Send,
            PeerRole::Listener => Right::Listen,
        };
        let verified = match self.inner.registry.get(&entity) {
            Some(record) => match sas::verify(&token, &entity, needed, &record.rules(), now) {
                Ok(v) => Ok((record, v.expires_unix)),
                Err(e) => Err((Some(record), e)),
            },
            None => Err((None, self.refuse_unknown(&token, &entity, needed, now))),
        };
        let (record, expires) = match verified {
            Ok(ok) => ok,
            Err((record, e)) => {
                // A token signed with a retired key of this very hybrid
                // connection proves its holder knew the name: say what to do.
                let regenerated = record
                    .as_ref()
                    .and_then(|r| r.regenerated_at(&token, needed, now));
                let message = match regenerated {
                    Some(at) => format!(
                        "the key of this connection string was regenerated ({}s ago); get the current one with `hybridlink hc keys {entity}`",
                        now.saturating_sub(at)
                    ),
                    None => not_accepted(&entity, &e),
                };
                // The relay's own log and metrics keep the precise reason.
                let (why, counted) = match (&record, regenerated) {
                    (None, _) => ("no such hybrid connection".to_string(), "unknown_hc"),
                    (Some(_), Some(_)) => (message.clone(), "key_regenerated"),
                    (Some(_), None) => (e.to_string(), "unauthorized"),
                };
                warn!(session = id, hc = %entity, error = %why, "token rejected");
                count_refused(counted);
                if state
                    .sessions
                    .get(&id)
                    .is_some_and(|s| s.attached.contains_key(&entity))
                {
                    detach_locked(&mut state, id, &entity);
                }
                let _ = tx.try_send(RelayMessage::Detached {
                    entity,
                    reason: DetachReason::Unauthorized,
                    message,
                });
                return;
            }
        };
        if renew
            && let Some(a) = state
                .sessions
                .get_mut(&id)
                .and_then(|s| s.attached.get_mut(&entity))
        {
            a.token = token;
            a.expires = expires;
            transport::metrics::metrics().token_renewals.inc();
            let _ = tx.try_send(RelayMessage::Renewed { entity, expires });
            return;
        }
        let max = self.inner.max_listeners.load(Ordering::Relaxed);
        if role == PeerRole::Listener && listeners_of(&state, &entity).len() >= max {
            let _ = tx.try_send(RelayMessage::Detached {
                message: format!("{entity} already has {max} listeners, the most a hybrid connection may have on this relay"),
                entity,
                reason: {
                    count_refused("quota");
                    DetachReason::Quota
                },
            });
            return;
        }
        let fresh = state
            .sessions
            .get_mut(&id)
            .map(|s| {
                s.attached
                    .insert(entity.clone(), Attachment { token, expires })
                    .is_none()
            })
            .unwrap_or(false);
        // Listeners dial the endpoint; senders (the appliance) route and
        // name it locally.
        let endpoint = Some(record.endpoint.clone());
        let _ = tx.try_send(RelayMessage::Attached {
            entity: entity.clone(),
            endpoint,
            expires,
        });
        if !fresh {
            return;
        }
        let Some(session) = state.sessions.get(&id) else {
            return;
        };
        info!(session = id, hc = %entity, role = ?role, peer = %session.label, addr = %session.addr, "attached");
        let identity = session.identity;
        match role {
            PeerRole::Sender => {
                let _ = tx.try_send(RelayMessage::Agents {
                    entity: entity.clone(),
                    agents: agents_of(&state, &entity),
                });
                for l in listeners_of(&state, &entity) {
                    send_to(
                        &state,
                        l,
                        RelayMessage::Grant {
                            peer: identity,
                            entity: entity.clone(),
                        },
                    );
                }
            }
            PeerRole::Listener => {
                for s in senders_of(&state, &entity) {
                    let peer = state.sessions[&s].identity;
                    let _ = tx.try_send(RelayMessage::Grant {
                        peer,
                        entity: entity.clone(),
                    });
                }
                announce_agents(&state, &entity);
            }
        }
    }

    /// Why `token` is refused for `entity`, a name the registry does not
    /// hold: exactly the error a wrong key for an existing hybrid connection
    /// of that name would get (the token is checked against keys nobody
    /// has), so an unauthenticated peer cannot learn which names exist.
    fn refuse_unknown(
        &self,
        token: &str,
        entity: &HcName,
        needed: Right,
        now: u64,
    ) -> sas::SasError {
        let decoy = &self.inner.decoy_key;
        let rules = [Right::Send, Right::Listen].map(|right| sas::RuleKeys {
            name: right.rule_name(),
            right,
            primary: decoy,
            secondary: decoy,
        });
        match sas::verify(token, entity, needed, &rules, now) {
            Err(e) => e,
            // Only with the decoy key itself, which nobody is given.
            Ok(_) => sas::SasError::BadSignature {
                rule: needed.rule_name().to_string(),
                entity: entity.clone(),
            },
        }
    }

    /// A sender asks for a pipe to an agent: both get the same one-time ticket.
    pub fn request_pipe(&self, sender: SessionId, request_id: u64, agent: SessionId) {
        let mut state = self.lock();
        let Some(s) = state.sessions.get(&sender) else {
            return;
        };
        let reply = s.tx.clone();
        let sender_identity = s.identity;
        let shared = state
            .sessions
            .get(&agent)
            .filter(|a| a.role == PeerRole::Listener)
            .is_some_and(|a| a.attached.keys().any(|hc| s.attached.contains_key(hc)));
        if s.role != PeerRole::Sender || !shared {
            let _ = reply.try_send(RelayMessage::PipeFailed {
                request_id,
                message: format!(
                    "agent {agent} serves none of your hybrid connections (it may have just left)"
                ),
            });
            return;
        }
        let mut ticket = [0u8; TICKET_LEN];
        if self.inner.rng.fill(&mut ticket).is_err() {
            let _ = reply.try_send(RelayMessage::PipeFailed {
                request_id,
                message: "relay could not draw a random ticket".into(),
            });
            return;
        }
        let ticket = Ticket(ticket);
        state
            .tickets
            .retain(|_, p| p.created.elapsed() < TICKET_TTL);
        let max = self.inner.max_pipes.load(Ordering::Relaxed);
        let in_use = self.inner.active_pipes.load(Ordering::Relaxed) + state.tickets.len();
        if in_use >= max {
            count_refused("quota");
            let _ = reply.try_send(RelayMessage::PipeFailed {
                request_id,
                message: format!(
                    "this relay is at its limit of {max} concurrent pipes (relay serve --max-pipes); try again later"
                ),
            });
            return;
        }
        state.tickets.insert(
            ticket,
            PendingPipe {
                created: Instant::now(),
                sender,
                agent,
                waiting: None,
            },
        );
        send_to(
            &state,
            agent,
            RelayMessage::PipeOffer {
                ticket,
                peer: sender_identity,
            },
        );
        let _ = reply.try_send(RelayMessage::PipeTicket {
            request_id,
            agent,
            ticket,
        });
    }

    /// A pipe connection presented `ticket` as `role`.
    pub fn meet(
        &self,
        ticket: Ticket,
        role: proto::control::PipeRole,
        conn: TcpStream,
    ) -> Result<PipeMeeting, PipeRefused> {
        let mut state = self.lock();
        let pending = state
            .tickets
            .get_mut(&ticket)
            .ok_or(PipeRefused::UnknownTicket)?;
        if pending.created.elapsed() > TICKET_TTL {
            state.tickets.remove(&ticket);
            return Err(PipeRefused::UnknownTicket);
        }
        match pending.waiting.take() {
            None => {
                let (tx, rx) = oneshot::channel();
                pending.waiting = Some((role, tx));
                Ok(PipeMeeting::Wait { partner: rx, conn })
            }
            Some((first_role, tx)) => {
                if first_role == role {
                    pending.waiting = Some((first_role, tx));
                    return Err(PipeRefused::SameRole);
                }
                let (sender, agent) = (pending.sender, pending.agent);
                state.tickets.remove(&ticket);
                info!(sender, agent, "pipe spliced");
                // If the first end gave up in the meantime, this one is dropped.
                let _ = tx.send(conn);
                Ok(PipeMeeting::Handed)
            }
        }
    }

    /// Ends attachments whose token expired without renewal.
    pub fn expire_tokens(&self) {
        let now = unix_now();
        let mut state = self.lock();
        let expired: Vec<(SessionId, HcName)> = state
            .sessions
            .iter()
            .flat_map(|(id, s)| {
                s.attached
                    .iter()
                    .filter(|(_, a)| a.expires <= now)
                    .map(move |(hc, _)| (*id, hc.clone()))
            })
            .collect();
        for (id, hc) in expired {
            detach_locked(&mut state, id, &hc);
            send_to(
                &state,
                id,
                RelayMessage::Detached {
                    message: format!("the token for {hc} expired and was not renewed"),
                    entity: hc,
                    reason: DetachReason::TokenExpired,
                },
            );
        }
    }

    /// Re-checks every attachment to `entity` after its keys changed or it
    /// was deleted: sessions whose token no longer verifies are detached.
    pub fn recheck(&self, entity: &HcName) {
        let now = unix_now();
        let record = self.inner.registry.get(entity);
        let mut state = self.lock();
        let attached: Vec<(SessionId, PeerRole, String)> = state
            .sessions
            .iter()
            .filter_map(|(id, s)| {
                s.attached
                    .get(entity)
                    .map(|a| (*id, s.role, a.token.clone()))
            })
            .collect();
        for (id, role, token) in attached {
            let (reason, message) = match &record {
                None => (
                    DetachReason::Deleted,
                    format!("hybrid connection {entity} was deleted"),
                ),
                Some(record) => {
                    let needed = match role {
                        PeerRole::Sender => Right::Send,
                        PeerRole::Listener => Right::Listen,
                    };
                    match sas::verify(&token, entity, needed, &record.rules(), now) {
                        Ok(_) => continue,
                        Err(e) => (
                            DetachReason::KeyRegenerated,
                            format!("the key of this connection string was regenerated ({e})"),
                        ),
                    }
                }
            };
            info!(session = id, hc = %entity, ?reason, "detached");
            detach_locked(&mut state, id, entity);
            send_to(
                &state,
                id,
                RelayMessage::Detached {
                    entity: entity.clone(),
                    reason,
                    message,
                },
            );
        }
        if let Some(record) = record {
            let mut peers = listeners_of(&state, entity);
            peers.extend(senders_of(&state, entity));
            for l in peers {
                send_to(
                    &state,
                    l,
                    RelayMessage::EndpointChanged {
                        entity: entity.clone(),
                        endpoint: record.endpoint.clone(),
                    },
                );
            }
        }
    }

    /// Limits the pipes spliced at once to `max`.
    pub fn set_max_pipes(&self, max: usize) {
        self.inner.max_pipes.store(max, Ordering::Relaxed);
    }

    /// Counts a spliced pipe until the guard drops.
    pub fn pipe_guard(&self) -> PipeGuard {
        self.inner.active_pipes.fetch_add(1, Ordering::Relaxed);
        PipeGuard(self.inner.clone())
    }

    /// Limits each hybrid connection to `max` attached agents.
    pub fn set_max_listeners(&self, max: usize) {
        self.inner.max_listeners.store(max, Ordering::Relaxed);
    }

    /// Records a listener's stream counters for a hybrid connection it is
    /// attached to (reports for anything else are ignored).
    pub fn report_stats(
        &self,
        id: SessionId,
        entity: HcName,
        stats: proto::control::StreamStats,
        report: AgentReport,
    ) {
        let mut state = self.lock();
        if let Some(s) = state.sessions.get_mut(&id)
            && s.role == PeerRole::Listener
            && s.attached.contains_key(&entity)
        {
            s.stats.insert(entity, (stats, report));
        }
    }

    /// A listener asks for a hybrid connection's endpoint without joining
    /// it: the token is checked as for `attach`; the answer is `Described`
    /// or `Detached`.
    pub fn describe(&self, id: SessionId, entity: HcName, token: String) {
        let now = unix_now();
        let state = self.lock();
        let Some(session) = state.sessions.get(&id) else {
            return;
        };
        let tx = session.tx.clone();
        let needed = match session.role {
            PeerRole::Sender => Right::Send,
            PeerRole::Listener => Right::Listen,
        };
        drop(state);
        let refused = |reason, message: String| RelayMessage::Detached {
            entity: entity.clone(),
            reason,
            message,
        };
        let answer = match self.inner.registry.get(&entity) {
            None => {
                let e = self.refuse_unknown(&token, &entity, needed, now);
                warn!(session = id, hc = %entity, "describe refused: no such hybrid connection");
                refused(DetachReason::Unauthorized, not_accepted(&entity, &e))
            }
            Some(record) => match sas::verify(&token, &entity, needed, &record.rules(), now) {
                Ok(_) => RelayMessage::Described {
                    entity: entity.clone(),
                    endpoint: record.endpoint.clone(),
                },
                Err(e) => refused(DetachReason::Unauthorized, not_accepted(&entity, &e)),
            },
        };
        let _ = tx.try_send(answer);
    }

    /// Per attached hybrid connection: (listeners, senders).
    pub fn attachment_counts(&self) -> Vec<(HcName, usize, usize)> {
        let state = self.lock();
        let names: HashSet<HcName> = state
            .sessions
            .values()
            .flat_map(|s| s.attached.keys().cloned())
            .collect();
        names
            .into_iter()
            .map(|n| {
                let l = listeners_of(&state, &n).len();
                let s = senders_of(&state, &n).len();
                (n, l, s)
            })
            .collect()
    }

    /// Every hybrid connection some session is attached to.
    pub fn attached_entities(&self) -> Vec<HcName> {
        let state = self.lock();
        let set: HashSet<HcName> = state
            .sessions
            .values()
            .flat_map(|s| s.attached.keys().cloned())
            .collect();
        set.into_iter().collect()
    }

    /// The agents currently serving `entity`.
    pub fn listeners(&self, entity: &HcName) -> Vec<ListenerStatus> {
        let state = self.lock();
        listeners_of(&state, entity)
            .into_iter()
            .filter_map(|id| {
                let s = state.sessions.get(&id)?;
                Some(ListenerStatus {
                    id,
                    label: s.label.to_string(),
                    address: s.addr.to_string(),
                    connected_since: s
                        .since
                        .duration_since(UNIX_EPOCH)
                        .map(|d| d.as_secs())
                        .unwrap_or(0),
                    streams: s.stats.get(entity).map(|(st, _)| *st).unwrap_or_default(),
                    end_to_end: if s.stats.get(entity).is_some_and(|(_, r)| r.end_to_end) {
                        "verified".into()
                    } else {
                        "relay-trusted".into()
                    },
                    policy_refusal: s
                        .stats
                        .get(entity)
                        .and_then(|(_, r)| r.policy_refusal.clone()),
                })
            })
            .collect()
    }
}

/// The one answer a peer gets for a token that did not verify, whether or
/// not the hybrid connection exists.
fn not_accepted(entity: &HcName, e: &sas::SasError) -> String {
    format!("the token was not accepted for {entity}: {e}")
}

/// Counts a refusal in `refused{reason}` of the relay's metrics.
pub(crate) fn count_refused(reason: &str) {
    transport::metrics::metrics()
        .refused
        .get_or_create(&transport::metrics::ReasonLabel {
            reason: reason.to_string(),
        })
        .inc();
}

fn send_to(state: &State, id: SessionId, msg: RelayMessage) {
    if let Some(s) = state.sessions.get(&id)
        && s.tx.try_send(msg).is_err()
    {
        warn!(session = id, "control session queue full; message dropped");
    }
}

fn listeners_of(state: &State, entity: &HcName) -> Vec<SessionId> {
    let mut ids: Vec<SessionId> = state
        .sessions
        .iter()
        .filter(|(_, s)| s.role == PeerRole::Listener && s.attached.contains_key(entity))
        .map(|(id, _)| *id)
        .collect();
    ids.sort_unstable();
    ids
}

fn senders_of(state: &State, entity: &HcName) -> Vec<SessionId> {
    state
        .sessions
        .iter()
        .filter(|(_, s)| s.role == PeerRole::Sender && s.attached.contains_key(entity))
        .map(|(id, _)| *id)
        .collect()
}

fn agents_of(state: &State, entity: &HcName) -> Vec<AgentInfo> {
    listeners_of(state, entity)
        .into_iter()
        .map(|id| AgentInfo {
            id,
            identity: state.sessions[&id].identity,
        })
        .collect()
}

fn announce_agents(state: &State, entity: &HcName) {
    let agents = agents_of(state, entity);
    for s in senders_of(state, entity) {
        send_to(
            state,
            s,
            RelayMessage::Agents {
                entity: entity.clone(),
                agents: agents.clone(),
            },
        );
    }
}

/// Removes one attachment and tells whoever depended on it.
fn detach_locked(state: &mut State, id: SessionId, entity: &HcName) {
    let Some(session) = state.sessions.get_mut(&id) else {
        return;
    };
    if session.attached.remove(entity).is_none() {
        return;
    }
    session.stats.remove(entity);
    let (role, identity) = (session.role, session.identity);
    match role {
        PeerRole::Listener => announce_agents(state, entity),
        PeerRole::Sender => {
            // Another session of the same identity may still hold the grant.
            let still: HashSet<SessionId> = senders_of(state, entity)
                .into_iter()
                .filter(|s| state.sessions[s].identity == identity)
                .collect();
            if still.is_empty() {
                for l in listeners_of(state, entity) {
                    send_to(
                        state,
                        l,
                        RelayMessage::Revoke {
                            peer: identity,
                            entity: entity.clone(),
                        },
                    );
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proto::key::{Key, KeySlot};

    fn hub_with(name: &str) -> (Hub, tempfile::TempDir) {
        let dir = tempfile::tempdir().unwrap();
        let registry = Registry::open(dir.path()).unwrap();
        registry
            .create(name.parse().unwrap(), "10.0.0.1:5432".parse().unwrap())
            .unwrap();
        (Hub::new(registry), dir)
    }

    /// Attaches as a sender with a token signed by `key` for `entity`;
    /// returns the relay's answer.
    fn attach(hub: &Hub, entity: &str, key: &Key) -> RelayMessage {
        let (tx, mut rx) = mpsc::channel(8);
        let label = PeerLabel::parse("test").unwrap();
        let id = hub.register(
            PeerRole::Sender,
            Fingerprint([1; 32]),
            label,
            "192.0.2.1:1".parse().unwrap(),
            tx,
        );
        let token = sas::sign(
            &format!("sb://relay.test/{entity}"),
            "send",
            key,
            unix_now() + 600,
        );
        hub.attach(id, entity.parse().unwrap(), token, false);
        rx.try_recv().unwrap()
    }

    fn refusal(msg: RelayMessage, entity: &str) -> (DetachReason, String) {
        match msg {
            RelayMessage::Detached {
                reason, message, ..
            } => (reason, message.replace(entity, "NAME")),
            other => panic!("expected a refusal, got {other:?}"),
        }
    }

    #[test]
    fn unknown_names_and_wrong_keys_get_one_answer() {
        let (hub, _dir) = hub_with("payroll");
        let stranger = Key::generate().unwrap();
        let wrong_key = refusal(attach(&hub, "payroll", &stranger), "payroll");
        let unknown = refusal(attach(&hub, "bonuses", &stranger), "bonuses");
        assert_eq!(wrong_key, unknown);
        assert_eq!(wrong_key.0, DetachReason::Unauthorized);
        assert!(
            wrong_key
                .1
                .starts_with("the token was not accepted for NAME: "),
            "{}",
            wrong_key.1
        );
    }

    #[test]
    fn a_regenerated_key_of_an_existing_name_still_says_so() {
        let (hub, _dir) = hub_with("payroll");
        let name: HcName = "payroll".parse().unwrap();
        let old = hub.registry().get(&name).unwrap().send.primary.clone();
        hub.registry()
            .regenerate(&name, Right::Send, KeySlot::Primary)
            .unwrap();
        let (reason, message) = refusal(attach(&hub, "payroll", &old), "payroll");
        assert_eq!(reason, DetachReason::Unauthorized);
        assert!(message.contains("was regenerated"), "{message}");
        let current = hub.registry().get(&name).unwrap().send.primary.clone();
        assert!(matches!(
            attach(&hub, "payroll", &current),
            RelayMessage::Attached { .. }
        ));
    }
}
