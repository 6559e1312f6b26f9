//! The sending side: opens streams to hybrid connections.
//!
//! A [`Sender`] keeps one control channel to the relay (send tokens; when
//! its node of a relay cluster dies, to another node), learns
//! the live agents of each hybrid connection, keeps a pipe open to each of
//! them ahead of need, and opens each new stream on the next agent in round
//! robin order. Opening a stream then costs one round trip to the agent, which
//! dials the target before it answers: a stream that opens is connected to the
//! target, and a refused target is an error here, not a stream that closes.

mod roster;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use proto::connection_string::ConnectionString;
use proto::control::{
    AgentInfo, Fingerprint, PeerMessage, PeerRole, RefusalCode, RelayMessage, StreamAccept,
    StreamRefusal, StreamRequest, Ticket,
};
use proto::e2e::{self, ChannelBinding, EndToEndError, ProofRole};
use proto::key::Key;
use proto::name::{Endpoint, HcName};
use tokio::sync::{mpsc, oneshot, watch};
use tracing::{debug, info, warn};

use crate::control::{self, ControlClientError, ControlConfig, ControlEvent, ControlHandle};
use crate::metrics::ControlCounters;
use crate::mux::{MuxConfig, MuxHandle, MuxStream, OpenError};
use crate::pipe::{self, PipeError};
use crate::tls::DataIdentity;
use roster::{Roster, Unavailable};

/// A stream to a hybrid connection's target.
pub type Stream = MuxStream;

/// Options of a [`Sender`].
#[derive(Clone, Debug)]
pub struct SenderOptions {
    /// How long `open` waits for the relay and an agent before giving up.
    pub ready_timeout: Duration,
    /// Lifetime of the send tokens (renewed at 80 %).
    pub token_ttl: Duration,
    /// Multiplexer settings of the pipes.
    pub mux: MuxConfig,
    /// A name for the relay's logs.
    pub label: String,
    /// Where reconnects and token renewals are counted: a role's metrics,
    /// or by default counters nobody reads.
    pub counters: ControlCounters,
}

impl Default for SenderOptions {
    fn default() -> Self {
        SenderOptions {
            ready_timeout: Duration::from_secs(10),
            token_ttl: Duration::from_secs(3600),
            mux: MuxConfig::default(),
            label: "sender".into(),
            counters: ControlCounters::default(),
        }
    }
}

/// Why a stream could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum SendError {
    /// The hybrid connection is not among this sender's connection strings.
    #[error("no connection string for hybrid connection {0}")]
    UnknownHc(HcName),
    /// The relay refused our send token for the HC.
    #[error("the relay refused hybrid connection {hc}: {message}")]
    NotAuthorized {
        /// The HC.
        hc: HcName,
        /// The relay's reason.
        message: String,
    },
    /// The relay could not be reached or no agent is connected.
    #[error("hybrid connection {hc} is not reachable: {reason}")]
    NotReady {
        /// The HC.
        hc: HcName,
        /// What was missing.
        reason: String,
    },
    /// The agent refused the stream (target refused, unreachable, policy...).
    #[error("{hc}: {}", .refusal.message)]
    Refused {
        /// The HC.
        hc: HcName,
        /// The agent's answer.
        refusal: StreamRefusal,
    },
    /// The agent did not prove it holds the hybrid connection's end-to-end
    /// key on this pipe: the stream was closed before any data went out.
    #[error("{hc}: {error}")]
    EndToEnd {
        /// The HC.
        hc: HcName,
        /// What the check found.
        error: EndToEndError,
    },
    /// The pipe to the agent failed.
    #[error(transparent)]
    Pipe(#[from] PipeError),
    /// The relay did not arrange a pipe to the agent.
    #[error("could not arrange a pipe to the agent: {0}")]
    NoPipe(String),
    /// Setting up the control channel failed.
    #[error(transparent)]
    Control(#[from] ControlClientError),
}

impl SendError {
    /// The refusal code when the agent refused the stream.
    pub fn refusal_code(&self) -> Option<RefusalCode> {
        match self {
            SendError::Refused { refusal, .. } => Some(refusal.code),
            _ => None,
        }
    }
}

type PipeSlot = Arc<tokio::sync::Mutex<Option<(MuxHandle, ChannelBinding)>>>;

/// Most pipes a sender keeps to one agent. A pipe carries as many streams
/// as its session window covers (every stream commits the multiplexer's
/// base window: 4,096 streams with the default 256 MiB); when it is full the
/// next stream goes on another pipe to the same agent, so an application
/// can hold this many times that before the agent refuses it.
pub const MAX_PIPES_PER_AGENT: usize = 16;

/// Where the relay's answer to a pipe request goes: the agent id and ticket,
/// or the relay's reason.
type TicketReply = oneshot::Sender<Result<(u64, Ticket), String>>;

#[derive(Debug, Default)]
struct State {
    roster: Roster,
    /// Pipes by agent identity (stable across relay restarts, unlike ids):
    /// the first, opened ahead of need, then one more each time all the
    /// others are full, up to [`MAX_PIPES_PER_AGENT`].
    pipes: HashMap<Fingerprint, Vec<PipeSlot>>,
    tickets: HashMap<u64, TicketReply>,
    next_request: u64,
}

#[derive(Debug)]
struct Inner {
    identity: DataIdentity,
    control: ControlHandle,
    options: SenderOptions,
    /// End-to-end keys by hybrid connection, from the connection strings.
    end_to_end: HashMap<HcName, Key>,
    state: Mutex<State>,
    /// Bumped on every change of `state` that `open` may be waiting for.
    changed: watch::Sender<u64>,
}

/// Opens streams to hybrid connections through one relay. Cheap to clone.
#[derive(Clone, Debug)]
pub struct Sender {
    inner: Arc<Inner>,
}

impl Sender {
    /// Starts a sender for these send connection strings (all for one relay).
    /// Returns at once; `open` waits for the relay and agents as needed.
    pub fn start(
        strings: Vec<ConnectionString>,
        options: SenderOptions,
    ) -> Result<Sender, SendError> {
        let identity = DataIdentity::generate().map_err(ControlClientError::from)?;
        let mut config = ControlConfig::new(
            PeerRole::Sender,
            identity.fingerprint(),
            options.label.clone(),
            strings.clone(),
        )?;
        config.token_ttl = options.token_ttl;
        // When its relay node dies, the sender goes on through another.
        config.fail_over = true;
        let (control, events) = control::spawn(config)?;
        let state = State {
            roster: Roster::new(strings.iter().map(|cs| cs.hc.clone())),
            ..State::default()
        };
        let mut end_to_end = HashMap::new();
        for cs in &strings {
            if let Some(key) = &cs.end_to_end_key {
                end_to_end.insert(cs.hc.clone(), key.clone());
            }
            if cs.end_to_end_key.is_some() {
                info!(hc = %cs.hc, "end-to-end: verified (agents must prove the EndToEndKey on every stream)");
            } else {
                warn!(hc = %cs.hc, "end-to-end: relay-trusted (no EndToEndKey in the connection string: a relay that lies about the agents' keys could read this traffic)");
            }
        }
        let inner = Arc::new(Inner {
            identity,
            control,
            options,
            end_to_end,
            state: Mutex::new(state),
            changed: watch::channel(0).0,
        });
        tokio::spawn(handle_events(Arc::downgrade(&inner), events));
        Ok(Sender { inner })
    }

    /// The hybrid connections this sender can open streams to.
    pub fn hcs(&self) -> Vec<HcName> {
        self.inner.lock().roster.names()
    }

    /// Each hybrid connection with its endpoint, once the relay has announced
    /// it. The appliance names and routes these.
    pub fn endpoints(&self) -> Vec<(HcName, Option<Endpoint>)> {
        self.inner.lock().roster.endpoints()
    }

    /// Ticks whenever something `endpoints`, `agents` or `open` depend on
    /// changed (attachments, agents, endpoints, the control channel).
    pub fn changes(&self) -> watch::Receiver<u64> {
        self.inner.changed.subscribe()
    }

    /// Whether streams of `hc` are verified end to end (this sender holds its
    /// end-to-end key) rather than trusting the relay's introductions.
    pub fn end_to_end(&self, hc: &HcName) -> bool {
        self.inner.end_to_end.contains_key(hc)
    }

    /// The live agents of `hc` as last announced by the relay.
    pub fn agents(&self, hc: &HcName) -> Vec<AgentInfo> {
        self.inner.lock().roster.agents(hc)
    }

    /// Pipes open now, to all agents: one per agent, more while streams
    /// fill them ([`MAX_PIPES_PER_AGENT`]).
    pub fn open_pipes(&self) -> usize {
        let slots: Vec<PipeSlot> = self
            .inner
            .lock()
            .pipes
            .values()
            .flatten()
            .cloned()
            .collect();
        slots
            .iter()
            .filter(|slot| {
                slot.try_lock()
                    .is_ok_and(|guard| guard.as_ref().is_some_and(|(m, _)| !m.is_closed()))
            })
            .count()
    }

    /// Opens a stream to the target of `hc` through the next live agent.
    /// Resolves once the agent has connected to the target.
    pub async fn open(&self, hc: &HcName) -> Result<Stream, SendError> {
        let agent = self.next_agent(hc).await?;
        // A pipe can die between our pick and the open (agent just left):
        // then retry once on a fresh pick.
        match self.open_on(hc, &agent).await {
            Err(SendError::Pipe(_) | SendError::NoPipe(_) | SendError::NotReady { .. }) => {
                let agent = self.next_agent(hc).await?;
                self.open_on(hc, &agent).await
            }
            other => other,
        }
    }

    /// Opens a stream on an agent of `route` with an arbitrary request: for
    /// tests that play a hostile sender. Agents must refuse anything but a
    /// well-formed request for a hybrid connection the sender was granted.
    #[doc(hidden)]
    pub async fn open_raw(&self, route: &HcName, request: Bytes) -> Result<Stream, SendError> {
        let agent = self.next_agent(route).await?;
        let (mux, _) = self.inner.pipe_to(&agent).await?;
        self.open_request(route, &mux, request, None).await
    }

    async fn open_on(&self, hc: &HcName, agent: &AgentInfo) -> Result<Stream, SendError> {
        // Concurrent opens can fill a pipe between the choice and the open,
        // and the agent may count less room than we do: then the refusal
        // names a full pipe, which is passed over for a while, and the
        // next choice takes another.
        let mut tries = 0;
        loop {
            let (mux, binding) = self.inner.pipe_to(agent).await?;
            let opened = self.open_on_a_pipe(hc, &mux, binding).await;
            match &opened {
                Err(SendError::Refused { refusal, .. })
                    if refusal.message.as_bytes() == proto::mux::TOO_MANY_STREAMS
                        && tries < MAX_PIPES_PER_AGENT =>
                {
                    mux.peer_is_full();
                    tries += 1;
                }
                _ => return opened,
            }
        }
    }

    async fn open_on_a_pipe(
        &self,
        hc: &HcName,
        mux: &MuxHandle,
        binding: ChannelBinding,
    ) -> Result<Stream, SendError> {
        let key = self.inner.end_to_end.get(hc);
        let request = StreamRequest {
            hc: hc.clone(),
            proof: key.map(|k| e2e::prove(k, ProofRole::Sender, hc, &binding)),
        };
        // Serialising a struct of a validated name and hex cannot fail.
        #[allow(clippy::expect_used)]
        let request = serde_json::to_vec(&request).expect("request serialises");
        let verify = key.map(|k| (k, binding));
        self.open_request(hc, mux, Bytes::from(request), verify)
            .await
    }

    /// Opens a stream with `request`; with `verify`, the agent's accept must
    /// carry a valid end-to-end proof, or the stream is reset before any
    /// data is sent on it.
    async fn open_request(
        &self,
        hc: &HcName,
        mux: &MuxHandle,
        request: Bytes,
        verify: Option<(&Key, ChannelBinding)>,
    ) -> Result<Stream, SendError> {
        match mux.open(request).await {
            Ok((stream, accept)) => {
                if let Some((key, binding)) = verify {
                    let proof = if accept.is_empty() {
                        None
                    } else {
                        serde_json::from_slice::<StreamAccept>(&accept)
                            .ok()
                            .and_then(|a| a.proof)
                    };
                    if let Err(error) =
                        e2e::verify(key, ProofRole::Agent, hc, &binding, proof.as_deref())
                    {
                        warn!(%hc, %error, "stream closed before sending anything");
                        drop(stream);
                        return Err(SendError::EndToEnd {
                            hc: hc.clone(),
                            error,
                        });
                    }
                }
                Ok(stream)
            }
            Err(OpenError::Rejected(payload)) => {
                let refusal =
                    serde_json::from_slice::<StreamRefusal>(&payload).unwrap_or_else(|_| {
                        StreamRefusal {
                            code: RefusalCode::BadRequest,
                            message: String::from_utf8_lossy(&payload).into_owned(),
                        }
                    });
                Err(SendError::Refused {
                    hc: hc.clone(),
                    refusal,
                })
            }
            Err(e) => Err(SendError::NotReady {
                hc: hc.clone(),
                reason: format!("pipe to agent closed: {e}"),
            }),
        }
    }

    /// Waits until `hc` has a live agent, then picks the next one round robin.
    async fn next_agent(&self, hc: &HcName) -> Result<AgentInfo, SendError> {
        let mut changed = self.inner.changed.subscribe();
        let deadline = tokio::time::Instant::now() + self.inner.options.ready_timeout;
        loop {
            {
                let mut state = self.inner.lock();
                match state.roster.pick(hc) {
                    Ok(agent) => return Ok(agent),
                    Err(Unavailable::Unknown) => return Err(SendError::UnknownHc(hc.clone())),
                    Err(Unavailable::Refused(message)) => {
                        return Err(SendError::NotAuthorized {
                            hc: hc.clone(),
                            message,
                        });
                    }
                    Err(Unavailable::NoAgent) => {}
                }
                if tokio::time::Instant::now() >= deadline {
                    return Err(SendError::NotReady {
                        hc: hc.clone(),
                        reason: state.roster.not_ready_reason(),
                    });
                }
            }
            let _ = tokio::time::timeout_at(deadline, changed.changed()).await;
        }
    }
}

impl Inner {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // A panic while holding this lock is a bug elsewhere; the state is
        // still consistent enough to keep serving.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn bump(&self) {
        self.changed.send_modify(|v| *v = v.wrapping_add(1));
    }

    /// The first open pipe to `agent` with room for a stream, and its
    /// channel binding, setting one up where a slot has none (or a dead
    /// one). When every pipe is full, the last one: its refusal then tells
    /// the application why.
    async fn pipe_to(&self, agent: &AgentInfo) -> Result<(MuxHandle, ChannelBinding), SendError> {
        let mut index = 0;
        loop {
            let slot = {
                let mut state = self.lock();
                let slots = state.pipes.entry(agent.identity).or_default();
                if slots.len() <= index {
                    slots.push(PipeSlot::default());
                }
                slots[index].clone()
            };
            let mut guard = slot.lock().await;
            match guard.as_ref().filter(|(m, _)| !m.is_closed()) {
                Some(open) if open.0.can_open() || index + 1 >= MAX_PIPES_PER_AGENT => {
                    return Ok(open.clone());
                }
                Some(_) => index += 1,
                None => return self.set_up_pipe(agent, index, &mut guard).await,
            }
        }
    }

    /// Sets up pipe number `index` to `agent` into its (locked) slot.
    async fn set_up_pipe(
        &self,
        agent: &AgentInfo,
        index: usize,
        slot: &mut Option<(MuxHandle, ChannelBinding)>,
    ) -> Result<(MuxHandle, ChannelBinding), SendError> {
        // The node the ticket comes from, which the pipe must reach.
        let relay = self.control.relay();
        let ticket = self.request_ticket(agent.id).await?;
        let pipe::Pipe {
            mux,
            mut incoming,
            binding,
        } = pipe::connect_as_sender(
            &relay,
            &ticket,
            &self.identity,
            agent.identity,
            self.options.mux.clone(),
        )
        .await?;
        // Agents never open streams towards us; refuse any that try.
        tokio::spawn(async move {
            while let Some(pending) = incoming.next().await {
                pending.reject(Bytes::from_static(b"senders accept no streams"));
            }
        });
        if index == 0 {
            info!(agent = agent.id, identity = %agent.identity, "pipe to agent open");
        } else {
            info!(agent = agent.id, identity = %agent.identity, pipe = index + 1, "the other pipes to this agent are full: another one open");
        }
        *slot = Some((mux.clone(), binding));
        Ok((mux, binding))
    }

    async fn request_ticket(&self, agent: u64) -> Result<Ticket, SendError> {
        let (tx, rx) = oneshot::channel();
        let request_id = {
            let mut state = self.lock();
            state.next_request += 1;
            let id = state.next_request;
            state.tickets.insert(id, tx);
            id
        };
        self.control
            .send(PeerMessage::PipeRequest { request_id, agent });
        let not_ready = SendError::NoPipe;
        match tokio::time::timeout(pipe::PIPE_SETUP_TIMEOUT, rx).await {
            Ok(Ok(Ok((_, ticket)))) => Ok(ticket),
            Ok(Ok(Err(message))) => Err(not_ready(format!("relay refused a pipe: {message}"))),
            Ok(Err(_)) | Err(_) => {
                self.lock().tickets.remove(&request_id);
                Err(not_ready(
                    "relay did not hand out a pipe ticket in time".into(),
                ))
            }
        }
    }

    fn handle(&self, event: ControlEvent) {
        let mut state = self.lock();
        match event {
            ControlEvent::Connected => state.roster.connected(),
            ControlEvent::Disconnected(reason) => {
                self.options.counters.reconnects.inc();
                state.roster.disconnected(reason);
                state.tickets.clear();
            }
            ControlEvent::Message(msg) => match msg {
                RelayMessage::Renewed { .. } => {
                    self.options.counters.token_renewals.inc();
                }
                RelayMessage::PipeTicket {
                    request_id,
                    agent,
                    ticket,
                } => {
                    if let Some(tx) = state.tickets.remove(&request_id) {
                        let _ = tx.send(Ok((agent, ticket)));
                    }
                }
                RelayMessage::PipeFailed {
                    request_id,
                    message,
                } => {
                    if let Some(tx) = state.tickets.remove(&request_id) {
                        let _ = tx.send(Err(message));
                    }
                }
                other => {
                    if state.roster.apply(&other) {
                        prune_pipes(&mut state);
                    }
                }
            },
        }
        drop(state);
        self.bump();
    }
}

/// How long the open streams of an agent that left the rotation may go on
/// (an agent that stops or reloads drains its streams; a dead agent's pipe
/// fails by itself long before).
const LEFT_AGENT_GRACE: std::time::Duration = std::time::Duration::from_secs(30);

/// Stops opening streams on pipes to agents that no HC lists any more. Their
/// open streams go on (a draining agent finishes them) for up to
/// [`LEFT_AGENT_GRACE`]; then the pipe is closed and what is left of them
/// ends with an error.
fn prune_pipes(state: &mut State) {
    let live = state.roster.live_identities();
    state.pipes.retain(|identity, slots| {
        if live.contains(identity) {
            return true;
        }
        for slot in slots.iter() {
            if let Ok(guard) = slot.try_lock()
                && let Some((mux, _)) = guard.as_ref()
            {
                close_when_drained(mux.clone());
            }
        }
        false
    });
}

/// Closes `mux` once its streams are done, or after [`LEFT_AGENT_GRACE`].
fn close_when_drained(mux: MuxHandle) {
    if mux.open_streams() == 0 {
        mux.close();
    } else if let Ok(runtime) = tokio::runtime::Handle::try_current() {
        runtime.spawn(async move {
            let deadline = tokio::time::Instant::now() + LEFT_AGENT_GRACE;
            while mux.open_streams() > 0
                && !mux.is_closed()
                && tokio::time::Instant::now() < deadline
            {
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            }
            mux.close();
        });
    } else {
        mux.close();
    }
}

async fn handle_events(
    inner: std::sync::Weak<Inner>,
    mut events: mpsc::UnboundedReceiver<ControlEvent>,
) {
    while let Some(event) = events.recv().await {
        let Some(inner) = inner.upgrade() else { return };
        inner.handle(event);
        // Open pipes ahead of need so that the first stream costs no handshake.
        let wanted: Vec<AgentInfo> = {
            let state = inner.lock();
            state
                .roster
                .all_agents()
                .filter(|a| !state.pipes.contains_key(&a.identity))
                .cloned()
                .collect()
        };
        for agent in wanted {
            let inner = inner.clone();
            tokio::spawn(async move {
                if let Err(e) = inner.pipe_to(&agent).await {
                    debug!(agent = agent.id, error = %e, "opening a pipe ahead of need failed; will retry on demand");
                }
            });
        }
    }
}
