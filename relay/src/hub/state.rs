//! The hub's decisions, without I/O: who is attached to which hybrid
//! connection, which tokens verify, who must hear of a grant or a revoke,
//! which pipe tickets are pending and whether a quota is reached.
//!
//! Calls carry the time (monotonic for tickets, Unix seconds for tokens) and
//! the registry record they need; what the hub must do comes out of
//! [`HubState::poll_output`]: a message for a session, or a refusal to
//! count. The shell in the parent module owns the sockets, the queues, the
//! random numbers and the clocks.

use std::collections::{BTreeSet, HashMap, HashSet, VecDeque};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use proto::control::{
    AgentInfo, DetachReason, Fingerprint, PeerRole, PipeRole, RelayMessage, StreamStats, Ticket,
};
use proto::key::{Key, Right};
use proto::label::PeerLabel;
use proto::name::HcName;
use proto::sas;
use tracing::{info, warn};

use crate::metrics::RefusedReason;
use crate::registry::HcRecord;

/// The relay's id of a control session.
pub type SessionId = u64;

/// How long a pipe ticket waits for both ends.
pub const TICKET_TTL: Duration = Duration::from_secs(10);
/// Agents per hybrid connection, as in the original product.
pub const MAX_AGENTS_PER_HC: usize = 25;
/// Pipe tickets one sender session may hold waiting at once. A sender
/// opens a pipe per agent and reuses it; more than this in flight is a
/// flood, and it must not take the relay-wide quota from other tenants.
pub const MAX_PENDING_TICKETS_PER_SESSION: usize = 64;
/// Pipe requests one sender session may make per second, once it has used
/// its burst (as many as it may hold pending). Pipes are long-lived and
/// shared by all streams to an agent, so a real sender asks for a few per
/// agent over its life.
pub const PIPE_REQUESTS_PER_SECOND: u32 = 20;

/// Seconds after its token's expiry that an Azure-protocol listener may
/// still renew it. The Node and .NET clients renew exactly at expiry (or,
/// hyco-ws, once an hour whatever the token says), so without a grace
/// they would be cut at every renewal.
pub const RENEW_GRACE: u64 = 60;

/// What the hub must do after a call.
#[derive(Debug, PartialEq)]
pub enum Output {
    /// Queue this message for this session.
    Send(SessionId, RelayMessage),
    /// Count a refusal under this reason (`refused{reason}`).
    Refused(RefusedReason),
    /// Count a renewed token.
    Renewed,
}

/// The limits the hub enforces.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Quotas {
    /// Agents per hybrid connection.
    pub max_agents: usize,
    /// Pipes spliced or pending at once, relay-wide.
    pub max_pipes: usize,
    /// Pipes spliced or pending at once for one hybrid connection, so one
    /// tenant cannot take the relay-wide quota.
    pub max_pipes_per_hc: usize,
    /// Pending tickets per sender session (also its burst of requests).
    pub max_pending_per_session: usize,
    /// Pipe requests per second per sender session, after its burst.
    pub pipe_requests_per_second: u32,
    /// Longest token lifetime accepted, in seconds.
    pub max_token_lifetime: u64,
    /// How long after its token's expiry an Azure-protocol listener may
    /// still renew it, in seconds (its clients renew at expiry).
    pub renew_grace: u64,
}

impl Default for Quotas {
    fn default() -> Self {
        Quotas {
            max_agents: MAX_AGENTS_PER_HC,
            max_pipes: usize::MAX,
            max_pipes_per_hc: usize::MAX,
            max_pending_per_session: MAX_PENDING_TICKETS_PER_SESSION,
            pipe_requests_per_second: PIPE_REQUESTS_PER_SECOND,
            max_token_lifetime: sas::DEFAULT_MAX_TOKEN_LIFETIME,
            renew_grace: RENEW_GRACE,
        }
    }
}

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
    since_unix: u64,
    attached: HashMap<HcName, Attachment>,
    /// Agent: its last stream counters per attached hybrid connection.
    stats: HashMap<HcName, (StreamStats, AgentReport)>,
    /// Sender: its tickets still waiting for both ends.
    pending_tickets: usize,
    /// Sender: what is left of its allowance of pipe requests.
    requests: Option<Allowance>,
}

/// A token bucket: `burst` requests at once, refilled at `rate` a second.
#[derive(Debug, Clone, Copy)]
struct Allowance {
    left: f64,
    at: Instant,
}

impl Allowance {
    /// Takes one request at `now`; false if none is left.
    fn take(this: &mut Option<Allowance>, now: Instant, rate: u32, burst: usize) -> bool {
        let burst = burst as f64;
        let a = this.get_or_insert(Allowance {
            left: burst,
            at: now,
        });
        let refill = now.saturating_duration_since(a.at).as_secs_f64() * f64::from(rate);
        a.left = (a.left + refill).min(burst);
        a.at = now;
        if a.left >= 1.0 {
            a.left -= 1.0;
            true
        } else {
            false
        }
    }
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

/// One agent attached to a hybrid connection, as the status API shows it.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct AttachedAgent {
    /// Relay session id.
    pub id: SessionId,
    /// The agent's own name.
    pub label: String,
    /// Its address as the relay sees it.
    pub address: String,
    /// Unix seconds when its control channel came up.
    pub connected_since: u64,
    /// Its streams of this hybrid connection, as it last reported them.
    pub streams: StreamStats,
    /// `verified` when the agent requires the end-to-end proof, else
    /// `relay-trusted` (as the agent last reported it).
    pub end_to_end: String,
    /// Why the agent's on-prem policy refuses the endpoint, if it does.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub policy_refusal: Option<String>,
}

/// A ticket handed to both ends, waiting for their connections.
#[derive(Debug)]
struct PendingTicket {
    created: Instant,
    sender: SessionId,
    agent: SessionId,
    /// The hybrid connection whose pipe quota it counts against.
    hc: HcName,
    /// The role of the end that arrived first, if one did.
    arrived: Option<PipeRole>,
}

/// Why a pipe connection was turned away.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum PipeRefused {
    /// Unknown, used or expired ticket.
    #[error("unknown or expired pipe ticket")]
    UnknownTicket,
    /// Both connections claimed the same end.
    #[error("both ends of the pipe claimed the same role")]
    SameRole,
}

/// What a pipe connection presenting a valid ticket should do.
#[derive(Debug, PartialEq, Eq)]
pub enum Claim {
    /// It is the first end: wait for the other.
    First,
    /// It is the second end: join the one waiting.
    Second {
        /// The sender session that asked for the pipe.
        sender: SessionId,
        /// The agent session it goes to.
        agent: SessionId,
        /// The hybrid connection the pipe counts against until
        /// [`HubState::pipe_closed`].
        hc: HcName,
    },
}

/// The relay's live state: sessions, attachments and pending tickets.
#[derive(Debug)]
pub struct HubState {
    sessions: HashMap<SessionId, Session>,
    tickets: HashMap<Ticket, PendingTicket>,
    /// Tickets in the order they were drawn, for expiry in O(1) amortised:
    /// entries whose ticket was already used are skipped when they reach
    /// the front.
    ticket_order: VecDeque<(Instant, Ticket)>,
    /// Pipes spliced now.
    spliced: usize,
    /// Pipes pending or spliced per hybrid connection (absent: none).
    pipes_by_hc: HashMap<HcName, usize>,
    quotas: Quotas,
    /// Tokens for names the registry does not hold are checked against
    /// this key, which nobody has (see [`HubState::refuse_unknown`]).
    decoy: Key,
    out: VecDeque<Output>,
}

/// The right a token must grant for a session of `role`.
fn needed(role: PeerRole) -> Right {
    match role {
        PeerRole::Sender => Right::Send,
        PeerRole::Agent => Right::Listen,
    }
}

/// The one answer a peer gets for a token that did not verify, whether or
/// not the hybrid connection exists.
fn not_accepted(hc: &HcName, e: &sas::SasError) -> String {
    format!("the token was not accepted for {hc}: {e}")
}

impl HubState {
    /// An empty hub. `decoy` must be a key no connection string holds.
    pub fn new(quotas: Quotas, decoy: Key) -> HubState {
        HubState {
            sessions: HashMap::new(),
            tickets: HashMap::new(),
            ticket_order: VecDeque::new(),
            spliced: 0,
            pipes_by_hc: HashMap::new(),
            quotas,
            decoy,
            out: VecDeque::new(),
        }
    }

    /// The limits in force.
    pub fn quotas(&self) -> Quotas {
        self.quotas
    }

    /// Changes the limits; sessions already attached keep their place.
    pub fn set_quotas(&mut self, quotas: Quotas) {
        self.quotas = quotas;
    }

    /// The next thing to do, in order.
    pub fn poll_output(&mut self) -> Option<Output> {
        self.out.pop_front()
    }

    fn send(&mut self, id: SessionId, msg: RelayMessage) {
        if self.sessions.contains_key(&id) {
            self.out.push_back(Output::Send(id, msg));
        }
    }

    /// A new control session.
    pub fn register(
        &mut self,
        id: SessionId,
        role: PeerRole,
        identity: Fingerprint,
        label: PeerLabel,
        addr: SocketAddr,
        since_unix: u64,
    ) {
        self.sessions.insert(
            id,
            Session {
                role,
                identity,
                label,
                addr,
                since_unix,
                attached: HashMap::new(),
                stats: HashMap::new(),
                pending_tickets: 0,
                requests: None,
            },
        );
    }

    /// Whether the session holds at least one attachment, i.e. has
    /// presented a token that verified.
    pub fn has_attachment(&self, id: SessionId) -> bool {
        self.sessions
            .get(&id)
            .is_some_and(|s| !s.attached.is_empty())
    }

    /// Removes a session and everything it was attached to.
    pub fn unregister(&mut self, id: SessionId) {
        let Some(session) = self.sessions.get(&id) else {
            return;
        };
        let hcs: Vec<HcName> = session.attached.keys().cloned().collect();
        for hc in hcs {
            self.detach(id, &hc);
        }
        self.sessions.remove(&id);
    }

    /// Why `token` is refused for `hc`, a name the registry does not
    /// hold: exactly the error a wrong key for an existing hybrid connection
    /// of that name would get (the token is checked against a key nobody
    /// has), so an unauthenticated peer cannot learn which names exist.
    fn refuse_unknown(
        &self,
        token: &str,
        hc: &HcName,
        needed: Right,
        now_unix: u64,
    ) -> sas::SasError {
        let rules = [Right::Send, Right::Listen].map(|right| sas::RuleKeys {
            name: right.rule_name(),
            right,
            primary: &self.decoy,
            secondary: &self.decoy,
        });
        match sas::verify(token, hc, needed, &rules, now_unix) {
            Err(e) => e,
            // Only with the decoy key itself, which nobody is given.
            Ok(_) => sas::SasError::BadSignature {
                rule: needed.rule_name().to_string(),
                hc: hc.clone(),
            },
        }
    }

    /// Checks `token` for `hc` (whose registry record is `record`): the
    /// record and the token's expiry, or why it is refused. A name the
    /// registry does not hold gets the answer a wrong key would.
    fn check_token<'r>(
        &self,
        token: &str,
        hc: &HcName,
        needed: Right,
        record: Option<&'r HcRecord>,
        now_unix: u64,
    ) -> Result<(&'r HcRecord, u64), sas::SasError> {
        let Some(record) = record else {
            return Err(self.refuse_unknown(token, hc, needed, now_unix));
        };
        let verified = sas::verify(token, hc, needed, &record.rules(), now_unix)?
            .within(now_unix, self.quotas.max_token_lifetime)?;
        Ok((record, verified.expires_unix))
    }

    /// Checks `token` for `hc` (whose registry record is `record`) outside
    /// a control session: its expiry (Unix seconds), or why it is refused.
    /// A name the registry does not hold gets the answer a wrong key would.
    pub fn verify_token(
        &self,
        token: &str,
        hc: &HcName,
        needed: Right,
        record: Option<&HcRecord>,
        now_unix: u64,
    ) -> Result<u64, sas::SasError> {
        self.check_token(token, hc, needed, record, now_unix)
            .map(|(_, expires)| expires)
    }

    /// Handles an `Attach` (or a `Renew`) of `hc`, whose registry record
    /// is `record`: verifies the token and, on success, records the
    /// attachment and tells everyone concerned.
    pub fn attach(
        &mut self,
        id: SessionId,
        hc: HcName,
        token: String,
        renew: bool,
        record: Option<&HcRecord>,
        now_unix: u64,
    ) {
        let Some(session) = self.sessions.get(&id) else {
            return;
        };
        let role = session.role;
        let needed = needed(role);
        let (record, expires) = match self.check_token(&token, &hc, needed, record, now_unix) {
            Ok(verified) => verified,
            Err(e) => {
                // A token signed with a retired key of this very hybrid
                // connection proves its holder knew the name: say what to do.
                let regenerated = record.and_then(|r| r.regenerated_at(&token, needed, now_unix));
                let message = match regenerated {
                    Some(at) => format!(
                        "the key of this connection string was regenerated ({}s ago); get the current one with `hybridlink hc keys {hc}`",
                        now_unix.saturating_sub(at)
                    ),
                    None => not_accepted(&hc, &e),
                };
                // The relay's own log and metrics keep the precise reason.
                let (why, counted) = match (record, regenerated) {
                    (None, _) => (
                        "no such hybrid connection".to_string(),
                        RefusedReason::unknown_hc,
                    ),
                    (Some(_), Some(_)) => (message.clone(), RefusedReason::key_regenerated),
                    (Some(_), None) => (e.to_string(), RefusedReason::unauthorized),
                };
                warn!(session = id, %hc, error = %why, "token rejected");
                self.out.push_back(Output::Refused(counted));
                self.detach(id, &hc);
                self.send(
                    id,
                    RelayMessage::Detached {
                        hc,
                        reason: DetachReason::Unauthorized,
                        message,
                    },
                );
                return;
            }
        };
        if renew
            && let Some(a) = self
                .sessions
                .get_mut(&id)
                .and_then(|s| s.attached.get_mut(&hc))
        {
            a.token = token;
            a.expires = expires;
            self.out.push_back(Output::Renewed);
            self.send(id, RelayMessage::Renewed { hc, expires });
            return;
        }
        let max = self.quotas.max_agents;
        let already = self
            .sessions
            .get(&id)
            .is_some_and(|s| s.attached.contains_key(&hc));
        if role == PeerRole::Agent && !already && self.agent_ids(&hc).len() >= max {
            self.out.push_back(Output::Refused(RefusedReason::quota));
            self.send(
                id,
                RelayMessage::Detached {
                    message: format!(
                        "{hc} already has {max} listeners, the most a hybrid connection may have on this relay"
                    ),
                    hc,
                    reason: DetachReason::Quota,
                },
            );
            return;
        }
        let Some(session) = self.sessions.get_mut(&id) else {
            return;
        };
        let fresh = session
            .attached
            .insert(hc.clone(), Attachment { token, expires })
            .is_none();
        let identity = session.identity;
        // Agents dial the endpoint; senders (the appliance) route and
        // name it locally.
        self.send(
            id,
            RelayMessage::Attached {
                hc: hc.clone(),
                endpoint: Some(record.endpoint.clone()),
                expires,
            },
        );
        if !fresh {
            return;
        }
        if let Some(s) = self.sessions.get(&id) {
            info!(session = id, %hc, role = ?role, peer = %s.label, addr = %s.addr, "attached");
        }
        match role {
            PeerRole::Sender => {
                let agents = self.agents_of(&hc);
                self.send(
                    id,
                    RelayMessage::Agents {
                        hc: hc.clone(),
                        agents,
                    },
                );
                for a in self.agent_ids(&hc) {
                    self.send(
                        a,
                        RelayMessage::Grant {
                            peer: identity,
                            hc: hc.clone(),
                        },
                    );
                }
            }
            PeerRole::Agent => {
                for peer in self.sender_identities(&hc) {
                    self.send(
                        id,
                        RelayMessage::Grant {
                            peer,
                            hc: hc.clone(),
                        },
                    );
                }
                self.announce_agents(&hc);
            }
        }
    }

    /// An agent asks for a hybrid connection's endpoint without joining
    /// it: the token is checked as for `attach`; the answer is `Described`
    /// or `Detached`.
    pub fn describe(
        &mut self,
        id: SessionId,
        hc: HcName,
        token: String,
        record: Option<&HcRecord>,
        now_unix: u64,
    ) {
        let Some(session) = self.sessions.get(&id) else {
            return;
        };
        let needed = needed(session.role);
        let msg = match self.check_token(&token, &hc, needed, record, now_unix) {
            Ok((record, _)) => RelayMessage::Described {
                hc,
                endpoint: record.endpoint.clone(),
            },
            Err(e) => {
                if record.is_none() {
                    warn!(session = id, %hc, "describe refused: no such hybrid connection");
                }
                RelayMessage::Detached {
                    message: not_accepted(&hc, &e),
                    hc,
                    reason: DetachReason::Unauthorized,
                }
            }
        };
        self.send(id, msg);
    }

    /// A sender asks for a pipe to an agent. `ticket` is a fresh random
    /// ticket (`None` if none could be drawn). Both ends get the same
    /// ticket, or the sender a `PipeFailed` saying which limit it met.
    ///
    /// The pipe counts against the quota of one hybrid connection the two
    /// share (the one with the fewest pipes), from now until its ticket
    /// expires unused or [`HubState::pipe_closed`].
    pub fn request_pipe(
        &mut self,
        sender: SessionId,
        request_id: u64,
        agent: SessionId,
        ticket: Option<Ticket>,
        now: Instant,
    ) {
        self.expire_tickets(now);
        let quotas = self.quotas;
        let Some(s) = self.sessions.get(&sender) else {
            return;
        };
        let sender_identity = s.identity;
        let mut shared: Vec<(usize, &HcName)> = self
            .sessions
            .get(&agent)
            .filter(|a| a.role == PeerRole::Agent && s.role == PeerRole::Sender)
            .map(|a| {
                a.attached
                    .keys()
                    .filter(|hc| s.attached.contains_key(*hc))
                    .map(|hc| (self.pipes_by_hc.get(hc).copied().unwrap_or(0), hc))
                    .collect()
            })
            .unwrap_or_default();
        shared.sort();
        let charged = shared
            .first()
            .filter(|(pipes, _)| *pipes < quotas.max_pipes_per_hc)
            .map(|(_, hc)| (*hc).clone());
        let refusal = if shared.is_empty() {
            Some((
                None,
                format!(
                    "agent {agent} serves none of your hybrid connections (it may have just left)"
                ),
            ))
        } else if s.pending_tickets >= quotas.max_pending_per_session {
            Some((
                Some(RefusedReason::quota),
                format!(
                    "{} pipe requests of this session are already waiting for their ends; wait for them",
                    quotas.max_pending_per_session
                ),
            ))
        } else if self.spliced + self.tickets.len() >= quotas.max_pipes {
            Some((
                Some(RefusedReason::quota),
                format!(
                    "this relay is at its limit of {} concurrent pipes (relay serve --max-pipes); try again later",
                    quotas.max_pipes
                ),
            ))
        } else if charged.is_none() {
            Some((
                Some(RefusedReason::hc_quota),
                format!(
                    "{} is at its limit of {} concurrent pipes (relay serve --max-pipes-per-hc); try again later",
                    shared
                        .first()
                        .map(|(_, hc)| hc.as_str())
                        .unwrap_or_default(),
                    quotas.max_pipes_per_hc
                ),
            ))
        } else if ticket.is_none() {
            Some((None, "relay could not draw a random ticket".into()))
        } else {
            None
        };
        // Only a request that would be granted spends the allowance.
        let refusal = refusal.or_else(|| {
            let s = self.sessions.get_mut(&sender)?;
            let allowed = Allowance::take(
                &mut s.requests,
                now,
                quotas.pipe_requests_per_second,
                quotas.max_pending_per_session,
            );
            (!allowed).then(|| {
                (
                    Some(RefusedReason::rate),
                    format!(
                        "too many pipe requests: a session may make {} at once, then {} a second (relay serve --pipe-requests-per-second)",
                        quotas.max_pending_per_session, quotas.pipe_requests_per_second
                    ),
                )
            })
        });
        let (Some(ticket), Some(hc), None) = (ticket, charged, refusal.as_ref()) else {
            let (counted, message) = refusal.unwrap_or_default();
            if let Some(reason) = counted {
                self.out.push_back(Output::Refused(reason));
            }
            self.send(
                sender,
                RelayMessage::PipeFailed {
                    request_id,
                    message,
                },
            );
            return;
        };
        *self.pipes_by_hc.entry(hc.clone()).or_default() += 1;
        self.tickets.insert(
            ticket,
            PendingTicket {
                created: now,
                sender,
                agent,
                hc,
                arrived: None,
            },
        );
        self.ticket_order.push_back((now, ticket));
        if let Some(s) = self.sessions.get_mut(&sender) {
            s.pending_tickets += 1;
        }
        self.send(
            agent,
            RelayMessage::PipeOffer {
                ticket,
                peer: sender_identity,
            },
        );
        self.send(
            sender,
            RelayMessage::PipeTicket {
                request_id,
                agent,
                ticket,
            },
        );
    }

    /// Forgets tickets older than [`TICKET_TTL`].
    pub fn expire_tickets(&mut self, now: Instant) {
        while let Some((created, ticket)) = self.ticket_order.front().copied() {
            if now < created + TICKET_TTL {
                break;
            }
            self.ticket_order.pop_front();
            // Skipped if it was used (or drawn again, which 128 random bits
            // do not do).
            if self
                .tickets
                .get(&ticket)
                .is_some_and(|p| p.created == created)
                && let Some(pending) = self.remove_ticket(&ticket)
            {
                self.release(&pending.hc);
            }
        }
    }

    fn remove_ticket(&mut self, ticket: &Ticket) -> Option<PendingTicket> {
        let pending = self.tickets.remove(ticket)?;
        if let Some(s) = self.sessions.get_mut(&pending.sender) {
            s.pending_tickets = s.pending_tickets.saturating_sub(1);
        }
        Some(pending)
    }

    /// One pipe less counts against `hc`'s quota.
    fn release(&mut self, hc: &HcName) {
        if let Some(n) = self.pipes_by_hc.get_mut(hc) {
            *n -= 1;
            if *n == 0 {
                self.pipes_by_hc.remove(hc);
            }
        }
    }

    /// A spliced pipe of `hc` (from [`Claim::Second`]) closed.
    pub fn pipe_closed(&mut self, hc: &HcName) {
        self.spliced = self.spliced.saturating_sub(1);
        self.release(hc);
    }

    /// Pipes pending or spliced that count against `hc`.
    pub fn pipes_of(&self, hc: &HcName) -> usize {
        self.pipes_by_hc.get(hc).copied().unwrap_or(0)
    }

    /// Tickets waiting for their ends.
    pub fn pending_tickets(&self) -> usize {
        self.tickets.len()
    }

    /// A pipe connection presented `ticket` as `role`.
    pub fn claim(
        &mut self,
        ticket: &Ticket,
        role: PipeRole,
        now: Instant,
    ) -> Result<Claim, PipeRefused> {
        self.expire_tickets(now);
        let pending = self
            .tickets
            .get_mut(ticket)
            .ok_or(PipeRefused::UnknownTicket)?;
        match pending.arrived {
            None => {
                pending.arrived = Some(role);
                Ok(Claim::First)
            }
            Some(first) if first == role => Err(PipeRefused::SameRole),
            Some(_) => {
                let pending = self
                    .remove_ticket(ticket)
                    .ok_or(PipeRefused::UnknownTicket)?;
                info!(
                    sender = pending.sender,
                    agent = pending.agent,
                    hc = %pending.hc,
                    "pipe spliced"
                );
                self.spliced += 1;
                Ok(Claim::Second {
                    sender: pending.sender,
                    agent: pending.agent,
                    hc: pending.hc,
                })
            }
        }
    }

    /// Ends attachments whose token expired without renewal.
    pub fn expire_tokens(&mut self, now_unix: u64) {
        let mut expired: Vec<(SessionId, HcName)> = self
            .sessions
            .iter()
            .flat_map(|(id, s)| {
                s.attached
                    .iter()
                    .filter(|(_, a)| a.expires <= now_unix)
                    .map(move |(hc, _)| (*id, hc.clone()))
            })
            .collect();
        expired.sort();
        for (id, hc) in expired {
            self.detach(id, &hc);
            self.send(
                id,
                RelayMessage::Detached {
                    message: format!("the token for {hc} expired and was not renewed"),
                    hc,
                    reason: DetachReason::TokenExpired,
                },
            );
        }
    }

    /// Re-checks every attachment to `hc` after its keys changed or it
    /// was deleted (`record` is then `None`): sessions whose token no longer
    /// verifies are detached. Senders go first, so every agent still
    /// attached hears every revoke before it is detached itself.
    pub fn recheck(&mut self, hc: &HcName, record: Option<&HcRecord>, now_unix: u64) {
        let mut attached: Vec<(PeerRole, SessionId, String)> = self
            .sessions
            .iter()
            .filter_map(|(id, s)| s.attached.get(hc).map(|a| (s.role, *id, a.token.clone())))
            .collect();
        // `Sender` sorts before `Agent`.
        attached.sort_by_key(|(role, id, _)| (*role != PeerRole::Sender, *id));
        for (role, id, token) in attached {
            let (reason, message) = match record {
                None => (
                    DetachReason::Deleted,
                    format!("hybrid connection {hc} was deleted"),
                ),
                Some(record) => {
                    match sas::verify(&token, hc, needed(role), &record.rules(), now_unix) {
                        Ok(_) => continue,
                        Err(e) => (
                            DetachReason::KeyRegenerated,
                            format!("the key of this connection string was regenerated ({e})"),
                        ),
                    }
                }
            };
            info!(session = id, %hc, ?reason, "detached");
            self.detach(id, hc);
            self.send(
                id,
                RelayMessage::Detached {
                    hc: hc.clone(),
                    reason,
                    message,
                },
            );
        }
        if let Some(record) = record {
            let mut peers = self.agent_ids(hc);
            peers.extend(self.sender_ids(hc));
            for p in peers {
                self.send(
                    p,
                    RelayMessage::EndpointChanged {
                        hc: hc.clone(),
                        endpoint: record.endpoint.clone(),
                    },
                );
            }
        }
    }

    /// Records an agent's stream counters for a hybrid connection it is
    /// attached to (reports for anything else are ignored).
    pub fn report_stats(
        &mut self,
        id: SessionId,
        hc: HcName,
        stats: StreamStats,
        report: AgentReport,
    ) {
        if let Some(s) = self.sessions.get_mut(&id)
            && s.role == PeerRole::Agent
            && s.attached.contains_key(&hc)
        {
            s.stats.insert(hc, (stats, report));
        }
    }

    /// Per attached hybrid connection: (agents, senders), by name.
    pub fn attachment_counts(&self) -> Vec<(HcName, usize, usize)> {
        self.attached_hcs()
            .into_iter()
            .map(|n| {
                let a = self.agent_ids(&n).len();
                let s = self.sender_ids(&n).len();
                (n, a, s)
            })
            .collect()
    }

    /// Every hybrid connection some session is attached to, by name.
    pub fn attached_hcs(&self) -> Vec<HcName> {
        let set: BTreeSet<&HcName> = self
            .sessions
            .values()
            .flat_map(|s| s.attached.keys())
            .collect();
        set.into_iter().cloned().collect()
    }

    /// The agents currently serving `hc`.
    pub fn agents(&self, hc: &HcName) -> Vec<AttachedAgent> {
        self.agent_ids(hc)
            .into_iter()
            .filter_map(|id| {
                let s = self.sessions.get(&id)?;
                let (streams, report) = s.stats.get(hc).cloned().unwrap_or_default();
                Some(AttachedAgent {
                    id,
                    label: s.label.to_string(),
                    address: s.addr.to_string(),
                    connected_since: s.since_unix,
                    streams,
                    end_to_end: if report.end_to_end {
                        "verified".into()
                    } else {
                        "relay-trusted".into()
                    },
                    policy_refusal: report.policy_refusal,
                })
            })
            .collect()
    }

    /// The sessions of the agents attached to `hc`, by id (the rotation order).
    fn agent_ids(&self, hc: &HcName) -> Vec<SessionId> {
        self.attached_as(hc, PeerRole::Agent)
    }

    fn sender_ids(&self, hc: &HcName) -> Vec<SessionId> {
        self.attached_as(hc, PeerRole::Sender)
    }

    fn attached_as(&self, hc: &HcName, role: PeerRole) -> Vec<SessionId> {
        let mut ids: Vec<SessionId> = self
            .sessions
            .iter()
            .filter(|(_, s)| s.role == role && s.attached.contains_key(hc))
            .map(|(id, _)| *id)
            .collect();
        ids.sort_unstable();
        ids
    }

    /// The distinct identities of the senders attached to `hc`.
    fn sender_identities(&self, hc: &HcName) -> Vec<Fingerprint> {
        let set: BTreeSet<Fingerprint> = self
            .sender_ids(hc)
            .into_iter()
            .map(|s| self.sessions[&s].identity)
            .collect();
        set.into_iter().collect()
    }

    fn agents_of(&self, hc: &HcName) -> Vec<AgentInfo> {
        self.agent_ids(hc)
            .into_iter()
            .map(|id| AgentInfo {
                id,
                identity: self.sessions[&id].identity,
            })
            .collect()
    }

    fn announce_agents(&mut self, hc: &HcName) {
        let agents = self.agents_of(hc);
        for s in self.sender_ids(hc) {
            self.send(
                s,
                RelayMessage::Agents {
                    hc: hc.clone(),
                    agents: agents.clone(),
                },
            );
        }
    }

    /// Removes one attachment and tells whoever depended on it.
    fn detach(&mut self, id: SessionId, hc: &HcName) {
        let Some(session) = self.sessions.get_mut(&id) else {
            return;
        };
        if session.attached.remove(hc).is_none() {
            return;
        }
        session.stats.remove(hc);
        let (role, identity) = (session.role, session.identity);
        match role {
            PeerRole::Agent => self.announce_agents(hc),
            PeerRole::Sender => {
                // Another session of the same identity may still hold the
                // grant.
                let still: HashSet<Fingerprint> = self.sender_identities(hc).into_iter().collect();
                if !still.contains(&identity) {
                    for a in self.agent_ids(hc) {
                        self.send(
                            a,
                            RelayMessage::Revoke {
                                peer: identity,
                                hc: hc.clone(),
                            },
                        );
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests;
