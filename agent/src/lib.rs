//! The on-prem agent (the "connection manager" of the original product).
//!
//! An agent dials out to the relay with listen keys, serves one or many
//! hybrid connections, and for every stream a sender opens it dials the
//! endpoint of that stream's hybrid connection, as the relay told it over its
//! own authenticated control channel. Nothing a sender writes can choose the
//! destination: a stream names only its hybrid connection.

pub mod control_socket;
pub mod dial;
pub mod serve;
pub mod status;

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use proto::connection_string::ConnectionString;
use proto::control::{Fingerprint, PeerRole, RelayMessage};
use proto::name::{Endpoint, HcName};
use tokio::sync::mpsc;
use tracing::{info, warn};
use transport::control::{self, ControlClientError, ControlConfig, ControlEvent, RelayAddr};
use transport::mux::MuxConfig;
use transport::tls::DataIdentity;

pub use status::{HcState, HcStatus};

/// Options of an agent.
#[derive(Clone, Debug)]
pub struct AgentOptions {
    /// Listen connection strings, one per hybrid connection served.
    pub connection_strings: Vec<ConnectionString>,
    /// How long dialing a target may take before the stream is refused as
    /// unreachable.
    pub dial_timeout: Duration,
    /// Lifetime of the listen tokens (renewed at 80 %).
    pub token_ttl: Duration,
    /// Name shown in the relay's status.
    pub label: String,
    /// Multiplexer settings of the pipes.
    pub mux: MuxConfig,
}

impl AgentOptions {
    /// Defaults for these connection strings.
    pub fn new(connection_strings: Vec<ConnectionString>) -> Self {
        AgentOptions {
            connection_strings,
            dial_timeout: Duration::from_secs(5),
            token_ttl: Duration::from_secs(3600),
            label: default_label(),
            mux: MuxConfig::default(),
        }
    }
}

fn default_label() -> String {
    std::fs::read_to_string("/etc/hostname")
        .ok()
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "agent".into())
}

/// Errors starting an agent.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// No connection string.
    #[error(
        "no connection string given; pass --connection-string with a listen string from `hybridlink hc keys NAME`"
    )]
    NoConnectionString,
    /// A connection string with the wrong rule.
    #[error(
        "the connection string for {0} uses rule {1:?}; an agent needs a listen connection string"
    )]
    NotListen(HcName, String),
    /// Two strings for one hybrid connection.
    #[error("two connection strings for {0}; give each hybrid connection once")]
    Duplicate(HcName),
    /// The control channel could not be set up.
    #[error(transparent)]
    Control(#[from] ControlClientError),
}

/// What the agent knows, shared by its tasks.
#[derive(Debug, Default)]
pub(crate) struct Shared {
    /// Per hybrid connection: endpoint and state.
    pub hcs: HashMap<HcName, HcState>,
    /// Which sender identities may open streams on which hybrid connections,
    /// per relay (grants are only valid on the relay that made them).
    pub grants: HashMap<(RelayAddr, Fingerprint), HashSet<HcName>>,
}

/// A running agent. Dropping it does not stop it; the tasks end with the
/// runtime.
#[derive(Clone, Debug)]
pub struct Agent {
    shared: Arc<Mutex<Shared>>,
}

impl Agent {
    /// Starts serving. Returns at once; connection to the relay happens in the
    /// background and is retried forever.
    pub fn start(options: AgentOptions) -> Result<Agent, AgentError> {
        if options.connection_strings.is_empty() {
            return Err(AgentError::NoConnectionString);
        }
        let identity = DataIdentity::generate().map_err(ControlClientError::from)?;
        let mut shared = Shared::default();
        let mut by_relay: HashMap<RelayAddr, Vec<ConnectionString>> = HashMap::new();
        for cs in &options.connection_strings {
            if cs.key_name == "send" || cs.key_name == "manage" {
                return Err(AgentError::NotListen(
                    cs.entity.clone(),
                    cs.key_name.clone(),
                ));
            }
            if shared
                .hcs
                .insert(cs.entity.clone(), HcState::new())
                .is_some()
            {
                return Err(AgentError::Duplicate(cs.entity.clone()));
            }
            by_relay
                .entry(RelayAddr::of(cs)?)
                .or_default()
                .push(cs.clone());
        }
        let shared = Arc::new(Mutex::new(shared));
        for (relay, strings) in by_relay {
            let mut config = ControlConfig::new(
                PeerRole::Listener,
                identity.fingerprint(),
                options.label.clone(),
                strings,
            )?;
            config.token_ttl = options.token_ttl;
            let (handle, events) = control::spawn(config)?;
            let ctx = serve::Context {
                relay,
                identity: identity.clone(),
                shared: shared.clone(),
                options: options.clone(),
            };
            tokio::spawn(run_relay(ctx, handle, events));
        }
        Ok(Agent { shared })
    }

    /// The state of each hybrid connection this agent serves.
    pub fn status(&self) -> Vec<HcStatus> {
        let shared = lock(&self.shared);
        let mut out: Vec<HcStatus> = shared
            .hcs
            .iter()
            .map(|(name, s)| s.snapshot(name))
            .collect();
        out.sort_by(|a, b| a.name.cmp(&b.name));
        out
    }
}

pub(crate) fn lock(shared: &Mutex<Shared>) -> std::sync::MutexGuard<'_, Shared> {
    // Critical sections are plain map updates; a poisoned lock is still usable.
    shared.lock().unwrap_or_else(|p| p.into_inner())
}

/// Follows one relay's control channel. Holding `_control` keeps the channel
/// open for as long as this task runs.
async fn run_relay(
    ctx: serve::Context,
    _control: control::ControlHandle,
    mut events: mpsc::UnboundedReceiver<ControlEvent>,
) {
    while let Some(event) = events.recv().await {
        match event {
            ControlEvent::Connected => {}
            ControlEvent::Disconnected(reason) => {
                let mut shared = lock(&ctx.shared);
                shared.grants.retain(|(relay, _), _| *relay != ctx.relay);
                for s in shared.hcs.values_mut() {
                    s.reconnecting(&reason);
                }
            }
            ControlEvent::Message(msg) => handle_message(&ctx, msg),
        }
    }
}

fn handle_message(ctx: &serve::Context, msg: RelayMessage) {
    match msg {
        RelayMessage::Attached {
            entity, endpoint, ..
        } => {
            let mut shared = lock(&ctx.shared);
            if let Some(s) = shared.hcs.get_mut(&entity)
                && let Some(endpoint) = endpoint
            {
                if !s.is_connected() {
                    info!(hc = %entity, %endpoint, "Connected");
                }
                s.connected(endpoint);
            }
        }
        RelayMessage::Renewed { entity, .. } => tracing::debug!(hc = %entity, "token renewed"),
        RelayMessage::Detached {
            entity,
            reason,
            message,
        } => {
            warn!(hc = %entity, ?reason, %message, "relay refused or ended the listen key");
            let mut shared = lock(&ctx.shared);
            if let Some(s) = shared.hcs.get_mut(&entity) {
                s.denied(&message);
            }
        }
        RelayMessage::EndpointChanged { entity, endpoint } => {
            let mut shared = lock(&ctx.shared);
            if let Some(s) = shared.hcs.get_mut(&entity) {
                info!(hc = %entity, %endpoint, "endpoint changed");
                s.set_endpoint(endpoint);
            }
        }
        RelayMessage::Grant { peer, entity } => {
            lock(&ctx.shared)
                .grants
                .entry((ctx.relay.clone(), peer))
                .or_default()
                .insert(entity);
        }
        RelayMessage::Revoke { peer, entity } => {
            let mut shared = lock(&ctx.shared);
            if let Some(set) = shared.grants.get_mut(&(ctx.relay.clone(), peer)) {
                set.remove(&entity);
            }
        }
        RelayMessage::PipeOffer { ticket, peer } => {
            let ctx = ctx.clone();
            tokio::spawn(async move { serve::serve_pipe(ctx, ticket, peer).await });
        }
        other => tracing::debug!(?other, "ignored relay message"),
    }
}

/// The endpoint a stream of `hc` must go to, if the agent serves it.
pub(crate) fn endpoint_of(shared: &Shared, hc: &HcName) -> Option<Endpoint> {
    shared.hcs.get(hc).and_then(|s| s.endpoint().cloned())
}
