//! The relay's live state: control sessions, who is attached to which hybrid
//! connection, and pipe tickets waiting for their two ends.
//!
//! The decisions are made by [`state::HubState`], which does no I/O; this
//! module is its shell. It keeps the state behind one mutex held only for
//! short, non-async critical sections, looks records up in the registry,
//! reads the clocks, draws tickets, and delivers what the state decides:
//! messages go to each session's bounded [`Outbox`] (a session too slow to
//! drain it is closed and its peer reconnects, never sent a partial
//! history), refusals and renewals to the relay's [`RelayMetrics`]. The two
//! TCP connections of a pipe meet in [`rendezvous`].

pub mod rendezvous;
pub mod state;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use proto::control::{Fingerprint, PeerRole, PipeRole, RelayMessage, TICKET_LEN, Ticket};
use proto::label::PeerLabel;
use proto::name::HcName;
use ring::rand::{SecureRandom, SystemRandom};
use tokio::net::TcpStream;
use tokio::sync::{Notify, mpsc, oneshot, watch};

use crate::metrics::{RefusedReason, RelayMetrics};
use crate::registry::Registry;
use rendezvous::Rendezvous;
pub use state::{
    AgentReport, AttachedAgent, Claim, HubState, MAX_AGENTS_PER_HC,
    MAX_PENDING_TICKETS_PER_SESSION, Output, PIPE_REQUESTS_PER_SECOND, PipeRefused, Quotas,
    RENEW_GRACE, SessionId, TICKET_TTL,
};

/// Depth of each session's outgoing queue.
pub const SESSION_QUEUE: usize = 4096;

/// Where the hub puts messages for one control session: a bounded queue
/// that is never allowed to lose a message. When it is full, the session is
/// told to close (its peer reconnects and is sent the whole state again)
/// instead of the message being dropped: a lost `Revoke` would leave a
/// grant in place.
#[derive(Clone, Debug)]
pub struct Outbox {
    tx: mpsc::Sender<RelayMessage>,
    overflow: Arc<Notify>,
}

/// The session's end of its [`Outbox`].
#[derive(Debug)]
pub struct Inbox {
    /// The messages, in order.
    pub messages: mpsc::Receiver<RelayMessage>,
    /// Notified when a message could not be queued: close the session.
    pub overflow: Arc<Notify>,
}

impl Outbox {
    /// A queue of `capacity` messages.
    pub fn new(capacity: usize) -> (Outbox, Inbox) {
        let (tx, messages) = mpsc::channel(capacity);
        let overflow = Arc::new(Notify::new());
        let inbox = Inbox {
            messages,
            overflow: overflow.clone(),
        };
        (Outbox { tx, overflow }, inbox)
    }

    /// Queues `msg`, or tells the session to close if its queue is full.
    /// A session already gone is ignored.
    pub fn send(&self, msg: RelayMessage) {
        if let Err(mpsc::error::TrySendError::Full(_)) = self.tx.try_send(msg) {
            // Stored as a permit if the session is not waiting right now.
            self.overflow.notify_one();
        }
    }
}

/// What a pipe connection with a valid ticket should do next.
#[derive(Debug)]
pub enum PipeMeeting {
    /// It arrived first: wait for the other end's connection on `partner`,
    /// then splice the two, holding the guard while they are spliced.
    Wait {
        /// Delivers the other end's connection.
        partner: oneshot::Receiver<(TcpStream, PipeGuard)>,
        /// This end's connection, handed back.
        conn: TcpStream,
    },
    /// The other end was waiting and now has this connection.
    Handed,
}

/// One spliced pipe, counted against `--max-pipes`, its hybrid
/// connection's `--max-pipes-per-hc` and the metrics' open pipes while it
/// lives. Never dropped with the hub's lock held.
#[derive(Debug)]
pub struct PipeGuard {
    inner: Arc<Inner>,
    hc: HcName,
    _open: transport::metrics::ActiveGuard,
}

impl Drop for PipeGuard {
    fn drop(&mut self) {
        Hub {
            inner: self.inner.clone(),
        }
        .with_state(|s| s.pipe_closed(&self.hc));
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
    shared: Mutex<Shared>,
    next_session: AtomicU64,
    rng: SystemRandom,
    metrics: Arc<RelayMetrics>,
    /// The relay nodes sharing this registry (`HOST:PORT`, sorted); empty
    /// for a relay on its own.
    nodes: watch::Sender<Vec<String>>,
    /// This node's address in `nodes`, once it is listed.
    this_node: Mutex<Option<String>>,
    /// The other nodes' published state.
    cluster: crate::cluster::ClusterView,
    /// Unix seconds when this hub was made (the relay started).
    started_unix: u64,
}

#[derive(Debug)]
struct Shared {
    state: HubState,
    outboxes: HashMap<SessionId, Outbox>,
    rendezvous: Rendezvous<(TcpStream, PipeGuard)>,
}

impl Shared {
    /// Carries out what the state decided.
    fn deliver(&mut self, metrics: &RelayMetrics) {
        while let Some(output) = self.state.poll_output() {
            match output {
                Output::Send(id, msg) => {
                    if let Some(outbox) = self.outboxes.get(&id) {
                        outbox.send(msg);
                    }
                }
                Output::Refused(reason) => metrics.refused(reason),
                Output::Renewed => metrics.token_renewed(),
            }
        }
    }
}

/// A key no connection string holds, for tokens of unknown names.
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
    /// A hub over `registry`, counting into `metrics`.
    pub fn new(registry: Registry, metrics: Arc<RelayMetrics>) -> Hub {
        Hub {
            inner: Arc::new(Inner {
                registry,
                shared: Mutex::new(Shared {
                    state: HubState::new(Quotas::default(), decoy_key()),
                    outboxes: HashMap::new(),
                    rendezvous: Rendezvous::default(),
                }),
                next_session: AtomicU64::new(1),
                rng: SystemRandom::new(),
                metrics,
                nodes: watch::Sender::new(Vec::new()),
                this_node: Mutex::new(None),
                cluster: crate::cluster::ClusterView::default(),
                started_unix: unix_now(),
            }),
        }
    }

    /// The registry this hub checks tokens against.
    pub fn registry(&self) -> &Registry {
        &self.inner.registry
    }

    /// Replaces the list of relay nodes sharing this registry; peers that
    /// understand [`RelayMessage::Nodes`] are told at once.
    pub fn set_nodes(&self, nodes: Vec<String>) {
        self.inner.nodes.send_if_modified(|old| {
            let changed = *old != nodes;
            *old = nodes;
            changed
        });
    }

    /// Records this node's own address in the node list.
    pub fn set_this_node(&self, address: String) {
        *self
            .inner
            .this_node
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = Some(address);
    }

    /// This node's own address in the node list, if it is listed.
    pub fn this_node(&self) -> Option<String> {
        self.inner
            .this_node
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// The other nodes' published state (empty for a relay on its own).
    pub fn cluster(&self) -> &crate::cluster::ClusterView {
        &self.inner.cluster
    }

    /// Unix seconds when the relay started.
    pub fn started_unix(&self) -> u64 {
        self.inner.started_unix
    }

    /// The relay nodes sharing this registry, following changes; empty for
    /// a relay on its own.
    pub fn nodes(&self) -> watch::Receiver<Vec<String>> {
        self.inner.nodes.subscribe()
    }

    /// The relay's metrics, which the hub and the relay port count into.
    pub fn metrics(&self) -> &RelayMetrics {
        &self.inner.metrics
    }

    /// The relay's metrics in the Prometheus text format, with the number
    /// of hybrid connections and of the agents and senders attached to each
    /// read now.
    pub fn render_metrics(&self) -> String {
        let metrics = &self.inner.metrics;
        metrics.set_attachments(self.registry().list().len(), &self.attachment_counts());
        metrics.set_registry_writable(self.registry().health().writable);
        metrics.render()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Shared> {
        // Every critical section leaves the state consistent before it can
        // panic, so a poisoned lock is still usable.
        self.inner.shared.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Runs `f` on the state under the lock, then delivers what it decided.
    fn with_state<T>(&self, f: impl FnOnce(&mut HubState) -> T) -> T {
        let mut shared = self.lock();
        let out = f(&mut shared.state);
        shared.deliver(&self.inner.metrics);
        out
    }

    /// Registers a new control session; returns its id.
    pub fn register(
        &self,
        role: PeerRole,
        identity: Fingerprint,
        label: PeerLabel,
        addr: SocketAddr,
        outbox: Outbox,
    ) -> SessionId {
        let id = self.inner.next_session.fetch_add(1, Ordering::Relaxed);
        let mut shared = self.lock();
        shared.outboxes.insert(id, outbox);
        shared
            .state
            .register(id, role, identity, label, addr, unix_now());
        id
    }

    /// Whether the session holds at least one attachment, i.e. has
    /// presented a token that verified.
    pub fn has_attachment(&self, id: SessionId) -> bool {
        self.lock().state.has_attachment(id)
    }

    /// Removes a session and everything it was attached to.
    pub fn unregister(&self, id: SessionId) {
        let mut shared = self.lock();
        shared.state.unregister(id);
        shared.deliver(&self.inner.metrics);
        shared.outboxes.remove(&id);
    }

    /// Handles an `Attach` or `Renew`: verifies the token and, on success,
    /// records the attachment and tells the others.
    pub fn attach(&self, id: SessionId, hc: HcName, token: String, renew: bool) {
        let record = self.inner.registry.get(&hc);
        let now = unix_now();
        self.with_state(|s| s.attach(id, hc, token, renew, record.as_ref(), now));
    }

    /// Checks a token presented for `hc`, needing `needed`, outside a
    /// control session (the Azure protocol's requests, see
    /// [`crate::azure`]): its expiry (Unix seconds) or why it is refused,
    /// within the relay's longest token lifetime. A name the registry does
    /// not hold is refused exactly as a wrong key is; the metrics count a
    /// refusal under the same reasons as a control session's.
    pub fn check_token(
        &self,
        hc: &HcName,
        token: &str,
        needed: proto::key::Right,
    ) -> Result<u64, proto::sas::SasError> {
        let record = self.inner.registry.get(hc);
        let now = unix_now();
        let verified = self
            .lock()
            .state
            .verify_token(token, hc, needed, record.as_ref(), now);
        if verified.is_err() {
            let reason = match &record {
                None => RefusedReason::unknown_hc,
                Some(r) if r.regenerated_at(token, needed, now).is_some() => {
                    RefusedReason::key_regenerated
                }
                Some(_) => RefusedReason::unauthorized,
            };
            self.inner.metrics.refused(reason);
        }
        verified
    }

    /// An agent asks for a hybrid connection's endpoint without joining
    /// it: the answer is `Described` or `Detached`.
    pub fn describe(&self, id: SessionId, hc: HcName, token: String) {
        let record = self.inner.registry.get(&hc);
        let now = unix_now();
        self.with_state(|s| s.describe(id, hc, token, record.as_ref(), now));
    }

    /// A sender asks for a pipe to an agent: both get the same one-time ticket.
    pub fn request_pipe(&self, sender: SessionId, request_id: u64, agent: SessionId) {
        let mut ticket = [0u8; TICKET_LEN];
        let ticket = self
            .inner
            .rng
            .fill(&mut ticket)
            .ok()
            .map(|()| Ticket(ticket));
        let now = Instant::now();
        self.with_state(|s| s.request_pipe(sender, request_id, agent, ticket, now));
    }

    /// A pipe connection presented `ticket` as `role`.
    pub fn meet(
        &self,
        ticket: Ticket,
        role: PipeRole,
        conn: TcpStream,
    ) -> Result<PipeMeeting, PipeRefused> {
        let mut shared = self.lock();
        match shared.state.claim(&ticket, role, Instant::now())? {
            Claim::First => Ok(PipeMeeting::Wait {
                partner: shared.rendezvous.wait(ticket),
                conn,
            }),
            Claim::Second { hc, .. } => {
                let guard = PipeGuard {
                    inner: self.inner.clone(),
                    hc,
                    _open: self.inner.metrics.pipe_spliced(),
                };
                let unmet = shared.rendezvous.hand(&ticket, (conn, guard));
                // The first end gave up: its guard (which takes the lock)
                // and connection go, after the lock is released.
                drop(shared);
                drop(unmet);
                Ok(PipeMeeting::Handed)
            }
        }
    }

    /// The first end of a pipe gave up waiting for the second.
    pub fn abandon(&self, ticket: &Ticket) {
        self.lock().rendezvous.abandon(ticket);
    }

    /// Ends attachments whose token expired without renewal, and forgets
    /// expired tickets.
    pub fn expire_tokens(&self) {
        let now = unix_now();
        self.with_state(|s| {
            s.expire_tokens(now);
            s.expire_tickets(Instant::now());
        });
    }

    /// Re-checks every attachment to `hc` after its keys changed or it
    /// was deleted: sessions whose token no longer verifies are detached.
    pub fn recheck(&self, hc: &HcName) {
        let record = self.inner.registry.get(hc);
        let now = unix_now();
        self.with_state(|s| s.recheck(hc, record.as_ref(), now));
    }

    /// Changes the quotas in force; sessions already attached keep their
    /// place.
    fn update_quotas(&self, change: impl FnOnce(&mut Quotas)) {
        self.with_state(|s| {
            let mut quotas = s.quotas();
            change(&mut quotas);
            s.set_quotas(quotas);
        });
    }

    /// Limits the pipes spliced or pending at once to `max`, relay-wide,
    /// and to `per_hc` for each hybrid connection.
    pub fn set_max_pipes(&self, max: usize, per_hc: usize) {
        self.update_quotas(|q| {
            q.max_pipes = max;
            q.max_pipes_per_hc = per_hc;
        });
    }

    /// Caps each sender session at `pending` pipe requests waiting for
    /// their ends, and at `per_second` requests a second after a burst of
    /// `pending`.
    pub fn set_pipe_requests(&self, pending: usize, per_second: u32) {
        self.update_quotas(|q| {
            q.max_pending_per_session = pending;
            q.pipe_requests_per_second = per_second;
        });
    }

    /// Limits each hybrid connection to `max` attached agents.
    pub fn set_max_agents(&self, max: usize) {
        self.update_quotas(|q| q.max_agents = max);
    }

    /// Accepts tokens that live at most `seconds` (control channels and the
    /// management API alike).
    pub fn set_max_token_lifetime(&self, seconds: u64) {
        self.update_quotas(|q| q.max_token_lifetime = seconds);
    }

    /// The longest token lifetime accepted, in seconds.
    pub fn max_token_lifetime(&self) -> u64 {
        self.lock().state.quotas().max_token_lifetime
    }

    /// Lets Azure-protocol listeners renew a token up to `seconds` after
    /// it expired.
    pub fn set_renew_grace(&self, seconds: u64) {
        self.update_quotas(|q| q.renew_grace = seconds);
    }

    /// How long after expiry an Azure-protocol listener may renew, in
    /// seconds.
    pub fn renew_grace(&self) -> u64 {
        self.lock().state.quotas().renew_grace
    }

    /// Records an agent's stream counters for a hybrid connection it is
    /// attached to (reports for anything else are ignored).
    pub fn report_stats(
        &self,
        id: SessionId,
        hc: HcName,
        stats: proto::control::StreamStats,
        report: AgentReport,
    ) {
        self.with_state(|s| s.report_stats(id, hc, stats, report));
    }

    /// Per attached hybrid connection: (agents, senders).
    pub fn attachment_counts(&self) -> Vec<(HcName, usize, usize)> {
        self.lock().state.attachment_counts()
    }

    /// Every hybrid connection some session is attached to.
    pub fn attached_hcs(&self) -> Vec<HcName> {
        self.lock().state.attached_hcs()
    }

    /// Pipes spliced or pending for `hc` on this relay.
    pub fn pipes_of(&self, hc: &HcName) -> usize {
        self.lock().state.pipes_of(hc)
    }

    /// The agents currently serving `hc`.
    pub fn agents(&self, hc: &HcName) -> Vec<AttachedAgent> {
        self.lock().state.agents(hc)
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use proto::control::DetachReason;
    use proto::key::{Key, KeySlot, Right};
    use proto::sas;

    use super::*;

    fn hub_with(name: &str) -> (Hub, tempfile::TempDir) {
        let dir = tempfile::tempdir().unwrap();
        let registry = Registry::open(dir.path()).unwrap();
        registry
            .create(name.parse().unwrap(), "10.0.0.1:5432".parse().unwrap())
            .unwrap();
        (Hub::new(registry, Arc::default()), dir)
    }

    /// Attaches as a sender with a token signed by `key` for `hc`;
    /// returns the relay's answer.
    fn attach(hub: &Hub, hc: &str, key: &Key) -> RelayMessage {
        let (tx, mut inbox) = Outbox::new(8);
        let label = PeerLabel::parse("test").unwrap();
        let id = hub.register(
            PeerRole::Sender,
            Fingerprint([1; 32]),
            label,
            "192.0.2.1:1".parse().unwrap(),
            tx,
        );
        let token = sas::sign(
            &format!("sb://relay.test/{hc}"),
            "send",
            key,
            unix_now() + 600,
        );
        hub.attach(id, hc.parse().unwrap(), token, false);
        inbox.messages.try_recv().unwrap()
    }

    #[tokio::test]
    async fn a_full_outbox_closes_its_session_instead_of_dropping_a_message() {
        let (outbox, mut inbox) = Outbox::new(2);
        let revoke = RelayMessage::Revoke {
            peer: Fingerprint([1; 32]),
            hc: "payroll".parse().unwrap(),
        };
        let wait = Duration::from_millis(20);
        outbox.send(revoke.clone());
        outbox.send(revoke.clone());
        assert!(
            tokio::time::timeout(wait, inbox.overflow.notified())
                .await
                .is_err(),
            "two messages fit"
        );
        // The third cannot be queued: the session is told to close, and
        // what was queued is still there, in order.
        outbox.send(revoke.clone());
        assert!(
            tokio::time::timeout(wait, inbox.overflow.notified())
                .await
                .is_ok()
        );
        assert_eq!(inbox.messages.try_recv().unwrap(), revoke);
        assert_eq!(inbox.messages.try_recv().unwrap(), revoke);
        assert!(inbox.messages.try_recv().is_err());
    }

    fn refusal(msg: RelayMessage, hc: &str) -> (DetachReason, String) {
        match msg {
            RelayMessage::Detached {
                reason, message, ..
            } => (reason, message.replace(hc, "NAME")),
            other => panic!("expected a refusal, got {other:?}"),
        }
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
