//! The on-prem agent (the "connection manager" of the original product).
//!
//! An agent dials out to the relay with listen keys, serves one or many
//! hybrid connections, and for every stream a sender opens it dials the
//! endpoint of that stream's hybrid connection, as the relay told it over its
//! own authenticated control channel. Nothing a sender writes can choose the
//! destination: a stream names only its hybrid connection.

pub mod azure;
mod cluster;
pub mod control_socket;
pub mod dial;
pub mod metrics;
pub mod policy;
pub mod reload;
pub mod serve;
pub mod shares;
pub mod status;
pub mod strings_file;

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use proto::connection_string::ConnectionString;
use proto::control::{Fingerprint, PeerRole, RelayMessage};
use proto::key::Key;
use proto::name::{Endpoint, HcName};
use tokio::sync::{mpsc, watch};
use tracing::{debug, info, warn};
use transport::control::{self, ControlClientError, ControlConfig, ControlEvent, RelayAddr};
use transport::mux::MuxConfig;
use transport::tls::DataIdentity;

pub use metrics::AgentMetrics;
pub use policy::Policy;
pub use status::{AgentHcStatus, EndToEnd, HcState};

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
    /// The endpoints this agent may dial (replaceable while it runs with
    /// [`Agent::set_policy`]).
    pub policy: Policy,
    /// Each tenant's share of pipe set-ups and dials in progress.
    pub shares: shares::ShareCaps,
    /// The endpoint of each hybrid connection served over Azure Relay's
    /// protocol (a string without `CertificateSha256`), whose relay knows
    /// none.
    pub azure_endpoints: HashMap<HcName, Endpoint>,
    /// CA certificates (PEM) that may issue an Azure-protocol relay's
    /// certificate; without it, the system's.
    pub ca_file: Option<std::path::PathBuf>,
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
            policy: Policy::built_in(),
            shares: shares::ShareCaps::default(),
            azure_endpoints: HashMap::new(),
            ca_file: None,
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
    /// A string for Azure Relay's protocol without an endpoint to dial.
    #[error(
        "the connection string for {0} has no CertificateSha256, so it is served over Azure Relay's protocol, whose relay knows no endpoint: give it with --endpoint {0}=HOST:PORT"
    )]
    NoEndpoint(HcName),
    /// The Azure-protocol relay cannot be trusted as configured.
    #[error("{0}")]
    Azure(#[from] transport::azure::AzureError),
}

/// What the agent knows, shared by its tasks.
#[derive(Debug, Default)]
pub(crate) struct Shared {
    /// Per hybrid connection: endpoint and state.
    pub hcs: HashMap<HcName, HcState>,
    /// Which sender identities may open streams on which hybrid connections,
    /// per relay (grants are only valid on the relay that made them).
    pub grants: HashMap<(RelayAddr, Fingerprint), HashSet<HcName>>,
    /// End-to-end keys of the hybrid connections that have one.
    pub end_to_end: HashMap<HcName, Key>,
}

/// The policy in force, shared by every generation and stream; streams
/// watch `changed` and end when a new policy refuses them.
#[derive(Debug)]
pub(crate) struct PolicyCell {
    current: RwLock<Arc<Policy>>,
    changed: watch::Sender<u64>,
}

impl PolicyCell {
    fn new(policy: Policy) -> Self {
        PolicyCell {
            current: RwLock::new(Arc::new(policy)),
            changed: watch::channel(0).0,
        }
    }

    /// The policy in force now.
    pub(crate) fn get(&self) -> Arc<Policy> {
        self.current
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    fn set(&self, policy: Policy) {
        *self.current.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(policy);
        self.changed.send_modify(|v| *v = v.wrapping_add(1));
    }

    /// Ticks when the policy is replaced.
    pub(crate) fn changes(&self) -> watch::Receiver<u64> {
        self.changed.subscribe()
    }
}

/// Resolves when a policy that replaced the one in force refuses
/// `endpoint` of `hc`, or the address `addr` a stream reached it at: why.
/// A stream ends then; a new policy that still allows it leaves it alone.
pub(crate) async fn refused_later(
    policy: &PolicyCell,
    mut changes: watch::Receiver<u64>,
    hc: &HcName,
    endpoint: &Endpoint,
    addr: std::net::IpAddr,
) -> policy::Denial {
    loop {
        if changes.changed().await.is_err() {
            std::future::pending::<()>().await;
        }
        let policy = policy.get();
        let verdict = policy
            .check_endpoint(hc, endpoint)
            .and_then(|rule| policy.check_address(hc, endpoint, rule, addr));
        if let Err(denial) = verdict {
            return denial;
        }
    }
}

/// Checks `endpoint` of `hc` against `policy`, records the answer in the
/// hybrid connection's state and logs it when it changed.
pub(crate) fn apply_policy(policy: &Policy, hc: &HcName, state: &mut HcState) {
    let Some(endpoint) = state.endpoint().cloned() else {
        return;
    };
    let refusal = policy
        .check_endpoint(hc, &endpoint)
        .err()
        .map(|d| d.to_string());
    record_policy(hc, state, refusal);
}

/// Records a policy answer for `hc`, logging it once when it changes.
pub(crate) fn record_policy(hc: &HcName, state: &mut HcState, refusal: Option<String>) {
    if state.set_policy_refusal(refusal.clone()) {
        match refusal {
            Some(r) => {
                warn!(%hc, refusal = %r, "Denied by policy: streams of this hybrid connection are refused")
            }
            None => {
                info!(%hc, endpoint = ?state.endpoint().map(|e| e.to_string()), "the policy allows the endpoint")
            }
        }
    }
}

/// A running agent. Dropping it does not stop it; the tasks end with the
/// runtime.
///
/// Its connection strings can be replaced while it runs ([`Agent::reload`]):
/// a new *generation* of control channels attaches with the new strings
/// first, then the old one detaches, so the hybrid connections never lose
/// their agent; streams already open (on pipes of the old generation)
/// go on until they end.
#[derive(Clone, Debug)]
pub struct Agent {
    inner: Arc<AgentInner>,
}

#[derive(Debug)]
struct AgentInner {
    identity: DataIdentity,
    options: AgentOptions,
    policy: Arc<PolicyCell>,
    current: Mutex<Generation>,
    /// Streams being served, over all generations.
    active: Arc<AtomicUsize>,
    metrics: Arc<AgentMetrics>,
}

/// One set of control channels and what they learned.
#[derive(Debug)]
struct Generation {
    strings: Vec<ConnectionString>,
    shared: Arc<Mutex<Shared>>,
    /// The tasks following each relay's control channel; aborting one
    /// closes its channel (the relay takes the agent out of rotation).
    tasks: Vec<tokio::task::JoinHandle<()>>,
    /// The channels to the other nodes of each relay cluster; dropped
    /// after `tasks` are aborted, which closes them too.
    _clusters: Vec<Arc<cluster::Cluster>>,
}

impl Drop for Generation {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

/// What [`Agent::reload`] changed, by hybrid connection name.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ReloadSummary {
    /// Hybrid connections served now and not before.
    pub added: Vec<String>,
    /// Hybrid connections no longer served.
    pub removed: Vec<String>,
    /// Hybrid connections whose string (key or relay) changed.
    pub changed: Vec<String>,
}

/// How long a reload waits for the new generation to attach before it
/// retires the old one anyway.
const RELOAD_ATTACH_WAIT: Duration = Duration::from_secs(10);

fn check_strings(strings: &[ConnectionString]) -> Result<(), AgentError> {
    if strings.is_empty() {
        return Err(AgentError::NoConnectionString);
    }
    let mut seen = HashSet::new();
    for cs in strings {
        if cs.key_name == "send" || cs.key_name == "manage" {
            return Err(AgentError::NotListen(cs.hc.clone(), cs.key_name.clone()));
        }
        if !seen.insert(cs.hc.clone()) {
            return Err(AgentError::Duplicate(cs.hc.clone()));
        }
    }
    Ok(())
}

impl Agent {
    /// Starts serving. Returns at once; connection to the relay happens in the
    /// background and is retried forever.
    pub fn start(options: AgentOptions) -> Result<Agent, AgentError> {
        check_strings(&options.connection_strings)?;
        let identity = DataIdentity::generate().map_err(ControlClientError::from)?;
        let active = Arc::new(AtomicUsize::new(0));
        let metrics = Arc::new(AgentMetrics::new());
        let policy = Arc::new(PolicyCell::new(options.policy.clone()));
        info!(policy = %options.policy.describe(), "on-prem policy");
        let generation = spawn_generation(
            &identity,
            &options,
            &policy,
            options.connection_strings.clone(),
            &options.azure_endpoints,
            &active,
            &metrics,
        )?;
        Ok(Agent {
            inner: Arc::new(AgentInner {
                identity,
                options,
                policy,
                current: Mutex::new(generation),
                active,
                metrics,
            }),
        })
    }

    /// What this agent counts, for `--metrics`.
    pub fn metrics(&self) -> Arc<AgentMetrics> {
        self.inner.metrics.clone()
    }

    /// Serves `strings` instead of the current ones without dropping a
    /// hybrid connection that stays: the new control channels attach
    /// (or are refused, or 10 s pass), then the old ones close. `endpoints`
    /// are those of the strings served over Azure Relay's protocol.
    pub async fn reload(
        &self,
        strings: Vec<ConnectionString>,
        endpoints: HashMap<HcName, Endpoint>,
    ) -> Result<ReloadSummary, AgentError> {
        check_strings(&strings)?;
        let old_strings = self.current().strings.clone();
        let summary = summarize(&old_strings, &strings);
        let next = spawn_generation(
            &self.inner.identity,
            &self.inner.options,
            &self.inner.policy,
            strings,
            &endpoints,
            &self.inner.active,
            &self.inner.metrics,
        )?;
        let deadline = tokio::time::Instant::now() + RELOAD_ATTACH_WAIT;
        while tokio::time::Instant::now() < deadline {
            let settled = lock(&next.shared)
                .hcs
                .values()
                .all(|s| !matches!(s.connection(), status::Connection::Reconnecting(_)));
            if settled {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let old = std::mem::replace(&mut *self.current(), next);
        drop(old);
        info!(?summary, "connection strings reloaded");
        Ok(summary)
    }

    /// Replaces the on-prem policy. Hybrid connections are checked again at
    /// once (status and the relay learn which are refused); open streams
    /// that the new policy still allows go on, the others are cut.
    pub fn set_policy(&self, policy: Policy) {
        info!(policy = %policy.describe(), "on-prem policy replaced");
        let shared = self.current().shared.clone();
        {
            let mut shared = lock(&shared);
            for (name, state) in shared.hcs.iter_mut() {
                apply_policy(&policy, name, state);
            }
        }
        self.inner.policy.set(policy);
    }

    /// The on-prem policy in force.
    pub fn policy(&self) -> Arc<Policy> {
        self.inner.policy.get()
    }

    /// Stops taking new streams: every control channel closes, so the relay
    /// takes this agent out of rotation at once. Open streams go on.
    pub fn stop_accepting(&self) {
        let mut current = self.current();
        for t in current.tasks.drain(..) {
            t.abort();
        }
    }

    /// Takes the agent out of rotation at once ([`Agent::stop_accepting`])
    /// and waits up to `timeout` for its open streams to end. Returns how
    /// many were still open.
    pub async fn drain(&self, timeout: Duration) -> usize {
        self.stop_accepting();
        let deadline = tokio::time::Instant::now() + timeout;
        if self.active_streams() > 0 {
            info!(
                open = self.active_streams(),
                "agent stopping; draining open streams"
            );
        }
        while self.active_streams() > 0 && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        self.active_streams()
    }

    /// How many streams are being served now.
    pub fn active_streams(&self) -> usize {
        self.inner.active.load(Ordering::Relaxed)
    }

    /// The connection strings being served.
    pub fn connection_strings(&self) -> Vec<ConnectionString> {
        self.current().strings.clone()
    }

    fn current(&self) -> std::sync::MutexGuard<'_, Generation> {
        self.inner.current.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The state of each hybrid connection this agent serves.
    pub fn status(&self) -> Vec<AgentHcStatus> {
        let shared = self.current().shared.clone();
        let shared = lock(&shared);
        let mut out: Vec<AgentHcStatus> = shared
            .hcs
            .iter()
            .map(|(name, s)| s.snapshot(name))
            .collect();
        out.sort_by(|a, b| a.name.cmp(&b.name));
        out
    }
}

fn summarize(old: &[ConnectionString], new: &[ConnectionString]) -> ReloadSummary {
    let mut summary = ReloadSummary::default();
    for n in new {
        match old.iter().find(|o| o.hc == n.hc) {
            None => summary.added.push(n.hc.to_string()),
            Some(o) if o.to_string() != n.to_string() => summary.changed.push(n.hc.to_string()),
            Some(_) => {}
        }
    }
    for o in old {
        if !new.iter().any(|n| n.hc == o.hc) {
            summary.removed.push(o.hc.to_string());
        }
    }
    summary
}

/// Starts one control channel per relay for `strings`.
fn spawn_generation(
    identity: &DataIdentity,
    options: &AgentOptions,
    policy: &Arc<PolicyCell>,
    strings: Vec<ConnectionString>,
    endpoints: &HashMap<HcName, Endpoint>,
    active: &Arc<AtomicUsize>,
    metrics: &Arc<AgentMetrics>,
) -> Result<Generation, AgentError> {
    let mut shared = Shared::default();
    let shares = Arc::new(shares::Shares::new(options.shares));
    let mut by_relay: HashMap<RelayAddr, Vec<ConnectionString>> = HashMap::new();
    let mut azure = Vec::new();
    for cs in &strings {
        if cs.cert_sha256.is_none() {
            shared.hcs.insert(
                cs.hc.clone(),
                HcState::over_azure(cs.end_to_end_key.is_some()),
            );
            info!(hc = %cs.hc, relay = %cs.relay_host, "served over Azure Relay's protocol: that relay sees the streams' bytes");
            azure.push(cs.clone());
            continue;
        }
        shared
            .hcs
            .insert(cs.hc.clone(), HcState::new(cs.end_to_end_key.is_some()));
        if let Some(key) = &cs.end_to_end_key {
            shared.end_to_end.insert(cs.hc.clone(), key.clone());
        } else {
            warn!(hc = %cs.hc, "end-to-end: relay-trusted (no EndToEndKey in the listen connection string: a relay that lies about the senders' keys could read and inject traffic)");
        }
        by_relay
            .entry(RelayAddr::of(cs)?)
            .or_default()
            .push(cs.clone());
    }
    let mut azure_tasks = Vec::new();
    for cs in azure {
        let endpoint = endpoints
            .get(&cs.hc)
            .cloned()
            .ok_or_else(|| AgentError::NoEndpoint(cs.hc.clone()))?;
        let trust = transport::azure::Trust::for_string(&cs, options.ca_file.as_deref())?;
        let client = transport::azure::Client::for_string(&cs, trust)?;
        if let Some(state) = shared.hcs.get_mut(&cs.hc) {
            state.set_endpoint(endpoint.clone());
            apply_policy(&policy.get(), &cs.hc, state);
        }
        azure_tasks.push((cs, client, endpoint));
    }
    let shared = Arc::new(Mutex::new(shared));
    let mut tasks = Vec::new();
    for (cs, client, endpoint) in azure_tasks {
        let ctx = azure::AzureContext {
            hc: cs.hc.clone(),
            endpoint,
            shared: shared.clone(),
            policy: policy.clone(),
            active: active.clone(),
            metrics: metrics.clone(),
            dial_timeout: options.dial_timeout,
            identity: identity.clone(),
            key: cs.end_to_end_key.clone(),
        };
        tasks.push(tokio::spawn(azure::run(ctx, client, cs)));
    }
    let mut clusters = Vec::new();
    for (relay, relay_strings) in by_relay {
        let cluster = Arc::new(cluster::Cluster::new(relay.clone(), relay_strings.clone()));
        let mut config = ControlConfig::new(
            PeerRole::Agent,
            identity.fingerprint(),
            options.label.clone(),
            relay_strings,
        )?;
        config.token_ttl = options.token_ttl;
        let (handle, events) = control::spawn(config)?;
        let ctx = serve::Context {
            relay,
            identity: identity.clone(),
            shared: shared.clone(),
            options: options.clone(),
            policy: policy.clone(),
            active: active.clone(),
            shares: shares.clone(),
            metrics: metrics.clone(),
            cluster: Arc::downgrade(&cluster),
        };
        tasks.push(tokio::spawn(run_relay(ctx, handle, events)));
        clusters.push(cluster);
    }
    Ok(Generation {
        strings,
        shared,
        tasks,
        _clusters: clusters,
    })
}

pub(crate) fn lock(shared: &Mutex<Shared>) -> std::sync::MutexGuard<'_, Shared> {
    // Critical sections are plain map updates; a poisoned lock is still usable.
    shared.lock().unwrap_or_else(|p| p.into_inner())
}

/// Follows one relay's control channel (and reports stream counters on it). Holding `control` keeps the channel
/// open for as long as this task runs.
pub(crate) async fn run_relay(
    ctx: serve::Context,
    control: control::ControlHandle,
    mut events: mpsc::UnboundedReceiver<ControlEvent>,
) {
    let mut report = tokio::time::interval(STATS_INTERVAL);
    report.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let event = tokio::select! {
            event = events.recv() => match event {
                Some(event) => event,
                None => return,
            },
            _ = report.tick() => {
                report_stats(&ctx, &control, is_origin(&ctx));
                continue;
            }
        };
        match event {
            ControlEvent::Connected => {}
            ControlEvent::Disconnected(reason) => {
                ctx.metrics.control().reconnects.inc();
                let origin = is_origin(&ctx);
                let mut shared = lock(&ctx.shared);
                shared.grants.retain(|(relay, _), _| *relay != ctx.relay);
                // The hybrid connections' state follows the node the
                // strings name; the other nodes' channels come and go
                // with the cluster.
                if origin {
                    for s in shared.hcs.values_mut() {
                        s.reconnecting(&reason);
                    }
                }
            }
            ControlEvent::Message(msg) => handle_message(&ctx, msg),
        }
    }
}

/// Whether this channel goes to the node the connection strings name (the
/// other nodes of a cluster come and go with the node list).
fn is_origin(ctx: &serve::Context) -> bool {
    ctx.cluster
        .upgrade()
        .is_none_or(|cluster| cluster.is_origin(&ctx.relay))
}

/// How often an agent tells the relay how its streams are doing.
const STATS_INTERVAL: Duration = Duration::from_secs(2);

/// Sends the stream counters of every hybrid connection attached on this
/// relay (the relay's status shows them), with whether the end-to-end key
/// holds and what the policy refuses. The counters are this agent's,
/// whichever node of a cluster carried the streams, so only the node the
/// connection strings name (`origin`) gets them and the others get zeros:
/// a status summed over the cluster counts each stream once.
fn report_stats(ctx: &serve::Context, control: &control::ControlHandle, origin: bool) {
    let connected: Vec<(HcName, u64, bool, Option<String>)> = lock(&ctx.shared)
        .hcs
        .iter()
        .filter(|(_, s)| s.is_connected())
        .map(|(name, s)| {
            (
                name.clone(),
                s.streams_refused(),
                s.end_to_end(),
                s.policy_refusal().map(str::to_string),
            )
        })
        .collect();
    for (hc, refused, end_to_end, policy_refusal) in connected {
        let stats = if origin {
            ctx.metrics.stream_stats(&hc, refused)
        } else {
            proto::control::StreamStats::default()
        };
        control.send(proto::control::PeerMessage::Stats {
            hc,
            stats,
            end_to_end,
            policy_refusal,
        });
    }
}

fn handle_message(ctx: &serve::Context, msg: RelayMessage) {
    match msg {
        RelayMessage::Attached { hc, endpoint, .. } => {
            let mut shared = lock(&ctx.shared);
            if let Some(s) = shared.hcs.get_mut(&hc)
                && let Some(endpoint) = endpoint
            {
                if !s.is_connected() {
                    info!(%hc, %endpoint, "Connected");
                }
                s.connected(endpoint);
                apply_policy(&ctx.policy.get(), &hc, s);
            }
        }
        RelayMessage::Renewed { hc, .. } => {
            ctx.metrics.control().token_renewals.inc();
            tracing::debug!(%hc, "token renewed");
        }
        RelayMessage::Detached {
            hc,
            reason,
            message,
        } => {
            warn!(%hc, ?reason, %message, "relay refused or ended the listen key");
            let mut shared = lock(&ctx.shared);
            if let Some(s) = shared.hcs.get_mut(&hc) {
                s.denied(&message);
            }
            // Detached, the agent no longer learns of revocations for this
            // hybrid connection: every grant it holds for it from this relay
            // goes now, whatever the relay still sends or fails to send.
            for ((relay, _), set) in shared.grants.iter_mut() {
                if *relay == ctx.relay {
                    set.remove(&hc);
                }
            }
        }
        RelayMessage::EndpointChanged { hc, endpoint } => {
            let mut shared = lock(&ctx.shared);
            if let Some(s) = shared.hcs.get_mut(&hc) {
                info!(%hc, %endpoint, "endpoint changed");
                s.set_endpoint(endpoint);
                apply_policy(&ctx.policy.get(), &hc, s);
            }
        }
        RelayMessage::Grant { peer, hc } => {
            lock(&ctx.shared)
                .grants
                .entry((ctx.relay.clone(), peer))
                .or_default()
                .insert(hc);
        }
        RelayMessage::Revoke { peer, hc } => {
            let mut shared = lock(&ctx.shared);
            if let Some(set) = shared.grants.get_mut(&(ctx.relay.clone(), peer)) {
                set.remove(&hc);
            }
        }
        RelayMessage::PipeOffer { ticket, peer } => {
            // A pipe is charged to every hybrid connection its sender was
            // granted here; a sender granted none has nothing to open.
            let granted: Vec<HcName> = lock(&ctx.shared)
                .grants
                .get(&(ctx.relay.clone(), peer))
                .map(|set| set.iter().cloned().collect())
                .unwrap_or_default();
            if granted.is_empty() {
                debug!(sender = %peer, "pipe offer from a sender granted nothing here; ignored");
                return;
            }
            let mut accounts = vec![shares::Account::SetupsBy(peer)];
            accounts.extend(granted.into_iter().map(shares::Account::SetupsFor));
            match ctx.shares.try_take(accounts) {
                Ok(share) => {
                    let ctx = ctx.clone();
                    tokio::spawn(async move { serve::serve_pipe(ctx, ticket, peer, share).await });
                }
                Err(full) => {
                    ctx.metrics
                        .refused(full.label(), metrics::StreamRefusedReason::pipe_setups);
                    debug!(sender = %peer, account = ?full, "pipe offer ignored: at the cap of pipe set-ups in progress");
                }
            }
        }
        RelayMessage::Nodes { nodes, this_node } => {
            if let Some(cluster) = ctx.cluster.upgrade() {
                cluster.update(ctx, &ctx.cluster, &nodes, this_node.as_deref());
            }
        }
        other => tracing::debug!(?other, "ignored relay message"),
    }
}

/// The endpoint a stream of `hc` must go to, if the agent serves it.
pub(crate) fn endpoint_of(shared: &Shared, hc: &HcName) -> Option<Endpoint> {
    shared.hcs.get(hc).and_then(|s| s.endpoint().cloned())
}
