//! The agent's view of each hybrid connection it serves.

use std::fmt;
use std::time::SystemTime;

use proto::name::{Endpoint, HcName};
use serde::{Deserialize, Serialize};

/// Whether the relay currently accepts this agent for a hybrid connection.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "state", content = "reason")]
pub enum Connection {
    /// Not yet attached, or the relay is being dialed again.
    Reconnecting(String),
    /// Attached: new streams of this hybrid connection come to us.
    Connected,
    /// The relay refused the listen key (wrong, regenerated, HC deleted).
    Denied(String),
    /// Attached, but the on-prem policy refuses the endpoint the relay
    /// announced: every stream is refused with `denied_by_policy`.
    DeniedByPolicy(String),
}

impl Connection {
    /// Why the hybrid connection is in this state; empty when connected.
    pub fn reason(&self) -> &str {
        match self {
            Connection::Connected => "",
            Connection::Reconnecting(reason)
            | Connection::Denied(reason)
            | Connection::DeniedByPolicy(reason) => reason,
        }
    }
}

impl fmt::Display for Connection {
    /// The state as `agent status` shows it.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(match self {
            Connection::Connected => "Connected",
            Connection::Reconnecting(_) => "Reconnecting",
            Connection::Denied(_) => "Denied",
            Connection::DeniedByPolicy(_) => "Denied by policy",
        })
    }
}

/// One hybrid connection's state inside the agent.
#[derive(Clone, Debug)]
pub struct HcState {
    connection: Connection,
    endpoint: Option<Endpoint>,
    since: SystemTime,
    streams_opened: u64,
    streams_refused: u64,
    end_to_end: bool,
    /// Served over Azure Relay's protocol, whose relay sees the bytes.
    azure: bool,
    policy_refusal: Option<String>,
}

impl HcState {
    pub(crate) fn new(end_to_end: bool) -> Self {
        HcState {
            connection: Connection::Reconnecting("connecting to the relay".into()),
            endpoint: None,
            since: SystemTime::now(),
            streams_opened: 0,
            streams_refused: 0,
            end_to_end,
            azure: false,
            policy_refusal: None,
        }
    }

    /// Served over Azure Relay's protocol: with an end-to-end key, only
    /// hybridlink senders that prove it are served, with TLS inside their
    /// WebSockets (verified); without one, any sender, and the relay may
    /// see the bytes.
    pub(crate) fn over_azure(end_to_end: bool) -> Self {
        HcState {
            azure: !end_to_end,
            ..HcState::new(end_to_end)
        }
    }

    /// Records what the policy says of the endpoint; returns true when that
    /// changed (the caller logs it once).
    pub(crate) fn set_policy_refusal(&mut self, refusal: Option<String>) -> bool {
        let changed = self.policy_refusal != refusal;
        self.policy_refusal = refusal;
        changed
    }

    /// Why the policy refuses this hybrid connection's endpoint, if it does.
    pub fn policy_refusal(&self) -> Option<&str> {
        self.policy_refusal.as_deref()
    }

    /// Whether this agent holds the hybrid connection's end-to-end key.
    pub fn end_to_end(&self) -> bool {
        self.end_to_end
    }

    pub(crate) fn count_stream(&mut self, opened: bool) {
        if opened {
            self.streams_opened += 1;
        } else {
            self.streams_refused += 1;
        }
    }

    pub(crate) fn is_connected(&self) -> bool {
        self.connection == Connection::Connected
    }

    pub(crate) fn connected(&mut self, endpoint: Endpoint) {
        if !self.is_connected() {
            self.since = SystemTime::now();
        }
        self.connection = Connection::Connected;
        self.endpoint = Some(endpoint);
    }

    pub(crate) fn set_endpoint(&mut self, endpoint: Endpoint) {
        self.endpoint = Some(endpoint);
    }

    pub(crate) fn reconnecting(&mut self, reason: &str) {
        if !matches!(self.connection, Connection::Denied(_)) {
            self.connection = Connection::Reconnecting(reason.to_string());
            self.since = SystemTime::now();
        }
    }

    /// The relay refused or ended the attachment: the endpoint it gave is
    /// forgotten, so no stream can be served for it.
    pub(crate) fn denied(&mut self, reason: &str) {
        self.endpoint = None;
        self.connection = Connection::Denied(reason.to_string());
        self.since = SystemTime::now();
    }

    /// Streams whose target refused or could not be reached.
    pub fn streams_refused(&self) -> u64 {
        self.streams_refused
    }

    /// Whether the relay accepts this agent for the hybrid connection.
    pub fn connection(&self) -> &Connection {
        &self.connection
    }

    /// The endpoint streams of this hybrid connection are dialed to, once
    /// the relay has told us.
    pub fn endpoint(&self) -> Option<&Endpoint> {
        self.endpoint.as_ref()
    }

    pub(crate) fn snapshot(&self, name: &HcName) -> AgentHcStatus {
        let connection = match (&self.connection, &self.policy_refusal) {
            (Connection::Connected, Some(refusal)) => Connection::DeniedByPolicy(refusal.clone()),
            (c, _) => c.clone(),
        };
        AgentHcStatus {
            name: name.clone(),
            endpoint: self.endpoint.as_ref().map(|e| e.to_string()),
            connection,
            end_to_end: match (self.azure, self.end_to_end) {
                (true, _) => EndToEnd::RelaySeesPayload,
                (false, true) => EndToEnd::Verified,
                (false, false) => EndToEnd::RelayTrusted,
            },
            since: self
                .since
                .duration_since(SystemTime::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0),
            streams_opened: self.streams_opened,
            streams_refused: self.streams_refused,
        }
    }
}

/// Whether the two ends of a hybrid connection verify each other, or trust
/// the relay's introductions.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum EndToEnd {
    /// Every stream carries proofs of the end-to-end key, bound to its pipe.
    Verified,
    /// No end-to-end key: a relay that lies about the ends' keys could read
    /// and alter the streams.
    RelayTrusted,
    /// Served over Azure Relay's protocol: the relay terminates the
    /// WebSockets and sees the streams' bytes.
    RelaySeesPayload,
}

impl fmt::Display for EndToEnd {
    /// `verified` or `relay-trusted`, as in the JSON.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(match self {
            EndToEnd::Verified => "verified",
            EndToEnd::RelayTrusted => "relay-trusted",
            EndToEnd::RelaySeesPayload => "relay-sees-payload",
        })
    }
}

/// One hybrid connection as the agent serves it: the snapshot `hybridlink
/// agent status` shows, as the control socket carries it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentHcStatus {
    /// The hybrid connection.
    pub name: HcName,
    /// Where its streams go.
    pub endpoint: Option<String>,
    /// Connected, reconnecting, denied or denied by policy, with the reason.
    pub connection: Connection,
    /// `verified` or `relay-trusted`.
    pub end_to_end: EndToEnd,
    /// Unix seconds since the connection entered this state.
    pub since: u64,
    /// Streams dialed and connected since the agent started.
    pub streams_opened: u64,
    /// Streams refused (dial failed, not allowed, policy) since the agent started.
    pub streams_refused: u64,
}
