//! The agent's view of each hybrid connection it serves.

use std::time::SystemTime;

use proto::name::{Endpoint, HcName};
use serde::Serialize;

/// Whether the relay currently accepts this agent for a hybrid connection.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case", tag = "state", content = "reason")]
pub enum Connection {
    /// Not yet attached, or the relay is being dialed again.
    Reconnecting(String),
    /// Attached: new streams of this hybrid connection come to us.
    Connected,
    /// The relay refused the listen key (wrong, regenerated, HC deleted).
    Denied(String),
}

/// One hybrid connection's state inside the agent.
#[derive(Clone, Debug)]
pub struct HcState {
    connection: Connection,
    endpoint: Option<Endpoint>,
    since: SystemTime,
    streams_opened: u64,
    streams_refused: u64,
}

impl HcState {
    pub(crate) fn new() -> Self {
        HcState {
            connection: Connection::Reconnecting("connecting to the relay".into()),
            endpoint: None,
            since: SystemTime::now(),
            streams_opened: 0,
            streams_refused: 0,
        }
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

    pub(crate) fn denied(&mut self, reason: &str) {
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

    pub(crate) fn snapshot(&self, name: &HcName) -> HcStatus {
        HcStatus {
            name: name.clone(),
            endpoint: self.endpoint.as_ref().map(|e| e.to_string()),
            connection: self.connection.clone(),
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

/// A snapshot for `hybridlink agent status`.
#[derive(Clone, Debug, Serialize)]
pub struct HcStatus {
    /// The hybrid connection.
    pub name: HcName,
    /// Where its streams go.
    pub endpoint: Option<String>,
    /// Connected, reconnecting or denied, with the reason.
    pub connection: Connection,
    /// Unix seconds since the connection entered this state.
    pub since: u64,
    /// Streams dialed and connected since the agent started.
    pub streams_opened: u64,
    /// Streams refused (dial failed, not allowed, policy) since the agent started.
    pub streams_refused: u64,
}
