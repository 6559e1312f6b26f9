//! The peer side of a control channel: one long-lived TLS connection to the
//! relay, kept up with keep-alives, re-established with jittered backoff, with
//! every hybrid connection re-attached and its token renewed before expiry.
//!
//! The owner (agent or sender) gets [`ControlEvent`]s and sends
//! [`PeerMessage`]s through a [`ControlHandle`]; it never sees the reconnects
//! except as `Connected` / `Disconnected` events.

use std::ops::ControlFlow;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::{Buf, BytesMut};
use proto::channel::{Clock, PeerEvent, PeerHello, PeerSession, Session, Timing};
use proto::connection_string::ConnectionString;
use proto::control::{Fingerprint, PeerMessage, PeerRole, RelayMessage};
use proto::name::HcName;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio::time::{Instant, sleep_until, timeout};
use tokio_rustls::TlsConnector;
use tracing::{debug, error, info, warn};

use crate::backoff::Backoff;
use crate::tls;

pub use proto::channel::{HANDSHAKE_TIMEOUT, IDLE_TIMEOUT, KEEPALIVE_INTERVAL};

/// Where a relay is and which certificate it must present.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct RelayAddr {
    /// Host name or address, as in the connection string.
    pub host: String,
    /// The relay's one port.
    pub port: u16,
    /// SHA-256 of the relay certificate.
    pub cert: Fingerprint,
}

impl RelayAddr {
    /// The relay a connection string points at.
    pub fn of(cs: &ConnectionString) -> Result<Self, ControlClientError> {
        let cert = cs
            .cert_sha256
            .ok_or_else(|| ControlClientError::NoPin(cs.hc.clone()))?;
        Ok(RelayAddr {
            host: cs.relay_host.clone(),
            port: cs.relay_port,
            cert: Fingerprint(cert),
        })
    }

    /// Opens a TCP connection to the relay port with Nagle off.
    pub async fn dial(&self) -> std::io::Result<TcpStream> {
        let tcp = TcpStream::connect((self.host.as_str(), self.port)).await?;
        tcp.set_nodelay(true)?;
        Ok(tcp)
    }
}

impl std::fmt::Display for RelayAddr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}", self.host, self.port)
    }
}

/// Errors setting up a control channel (not the transient ones, which are
/// retried).
#[derive(Debug, thiserror::Error)]
pub enum ControlClientError {
    /// The connection string has no certificate pin.
    #[error(
        "the connection string for {0} has no CertificateSha256; relays with CA-issued certificates are not supported yet, copy the string again with `hybridlink hc keys {0}`"
    )]
    NoPin(HcName),
    /// Connection strings of one control channel point at different relays.
    #[error("connection strings for {0} and {1} name different relays; use one process per relay")]
    MixedRelays(HcName, HcName),
    /// No connection string at all.
    #[error("no connection string given")]
    Empty,
    /// TLS setup failed.
    #[error(transparent)]
    Tls(#[from] tls::TlsError),
}

/// What a control channel tells its owner.
#[derive(Debug)]
pub enum ControlEvent {
    /// The channel is up and the relay has welcomed us; attaches are on their way.
    Connected,
    /// The channel went down; it is being re-established.
    Disconnected(String),
    /// A message from the relay (keep-alives are handled inside).
    Message(RelayMessage),
}

/// Sends messages on the control channel. Messages sent while the channel is
/// down are dropped: owners time out their requests and retry.
#[derive(Clone, Debug)]
pub struct ControlHandle {
    tx: mpsc::Sender<PeerMessage>,
    relay: Arc<std::sync::Mutex<RelayAddr>>,
}

impl ControlHandle {
    /// The relay node the channel is (or is being) connected to: pipes go
    /// there, to the node that issues their tickets. It changes only with
    /// [`ControlConfig::fail_over`].
    pub fn relay(&self) -> RelayAddr {
        self.relay.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Queues a message for the relay; dropped if the queue is full, as if
    /// the channel were down.
    pub fn send(&self, msg: PeerMessage) {
        if let Err(mpsc::error::TrySendError::Full(msg)) = self.tx.try_send(msg) {
            debug!(?msg, "control channel queue full; message dropped");
        }
    }
}

/// Everything a control channel needs to know.
#[derive(Clone, Debug)]
pub struct ControlConfig {
    /// The relay.
    pub relay: RelayAddr,
    /// Sender or agent.
    pub role: PeerRole,
    /// This process's data identity fingerprint.
    pub identity: Fingerprint,
    /// A name for the relay's logs and status; made into a valid
    /// [`proto::label::PeerLabel`] (cut, control characters replaced) if it
    /// is not one.
    pub label: String,
    /// The hybrid connections to attach to, with their keys.
    pub attachments: Vec<ConnectionString>,
    /// Lifetime of the tokens we sign; renewed at 80 % of it.
    pub token_ttl: Duration,
    /// When the channel drops, reconnect to the next node of the relay
    /// cluster (as the relay listed them, [`RelayMessage::Nodes`]) rather
    /// than to `relay` again. For senders: an agent keeps a channel to
    /// every node instead.
    pub fail_over: bool,
}

impl ControlConfig {
    /// A config for `strings`, which must all point at the same relay.
    pub fn new(
        role: PeerRole,
        identity: Fingerprint,
        label: String,
        strings: Vec<ConnectionString>,
    ) -> Result<Self, ControlClientError> {
        let first = strings.first().ok_or(ControlClientError::Empty)?;
        let relay = RelayAddr::of(first)?;
        for cs in &strings[1..] {
            if RelayAddr::of(cs)? != relay {
                return Err(ControlClientError::MixedRelays(
                    first.hc.clone(),
                    cs.hc.clone(),
                ));
            }
        }
        Ok(ControlConfig {
            relay,
            role,
            identity,
            label,
            attachments: strings,
            token_ttl: Duration::from_secs(3600),
            fail_over: false,
        })
    }
}

/// Depth of the queue of messages from the owner to a control channel.
/// Owners send a handful per stream set-up; a full queue means the relay
/// is unreachable or stuck, and the message is dropped like one sent while
/// the channel is down.
const COMMAND_QUEUE: usize = 1024;

/// Starts the control channel task. It runs until the returned receiver is
/// dropped.
pub fn spawn(
    config: ControlConfig,
) -> Result<(ControlHandle, mpsc::UnboundedReceiver<ControlEvent>), ControlClientError> {
    let tls = tls::relay_client_config(config.relay.cert)?;
    let (out_tx, out_rx) = mpsc::channel(COMMAND_QUEUE);
    let (ev_tx, ev_rx) = mpsc::unbounded_channel();
    let relay = Arc::new(std::sync::Mutex::new(config.relay.clone()));
    tokio::spawn(run(config, tls, out_rx, ev_tx, relay.clone()));
    Ok((ControlHandle { tx: out_tx, relay }, ev_rx))
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// The clocks a session reads, now.
pub fn clock() -> Clock {
    Clock {
        now: std::time::Instant::now(),
        unix: unix_now(),
    }
}

/// First pause after a relay presented another certificate than the pinned
/// one; the pauses double up to [`WRONG_CERTIFICATE_RETRY_MAX`].
const WRONG_CERTIFICATE_RETRY: Duration = Duration::from_secs(10);
const WRONG_CERTIFICATE_RETRY_MAX: Duration = Duration::from_secs(300);

async fn run(
    config: ControlConfig,
    tls: Arc<rustls::ClientConfig>,
    mut out_rx: mpsc::Receiver<PeerMessage>,
    events: mpsc::UnboundedSender<ControlEvent>,
    current: Arc<std::sync::Mutex<RelayAddr>>,
) {
    let mut backoff = Backoff::default();
    // A relay presenting another certificate keeps doing so: it is said
    // once, and tried again seldom, until something else happens.
    let mut wrong_certificate = Backoff::new(WRONG_CERTIFICATE_RETRY, WRONG_CERTIFICATE_RETRY_MAX);
    let mut said_wrong_certificate = false;
    let mut nodes: Vec<String> = Vec::new();
    let mut attempt = config.clone();
    loop {
        let started = Instant::now();
        let served = connect_and_serve(&attempt, &tls, &mut out_rx, &events, &mut nodes).await;
        let down = match served {
            Ok(()) => return, // the owner went away
            Err(e) => e,
        };
        let reason = down.reason;
        if events
            .send(ControlEvent::Disconnected(reason.clone()))
            .is_err()
        {
            return;
        }
        if started.elapsed() > Duration::from_secs(30) {
            backoff.reset();
        }
        // A sender that fails over tries the next node at the usual pace;
        // only a retry of the same node that presented another
        // certificate waits long.
        let failed = attempt.relay.clone();
        if config.fail_over {
            let allowed = allowed_nodes(&config.relay, &nodes).await;
            let next = next_node(&config.relay, &attempt.relay, &allowed);
            if next != attempt.relay {
                info!(from = %attempt.relay, to = %next, "control channel: trying another relay node");
            }
            *current.lock().unwrap_or_else(|p| p.into_inner()) = next.clone();
            attempt.relay = next;
        }
        let delay = if down.wrong_certificate {
            let delay = if attempt.relay == failed {
                wrong_certificate.next_delay()
            } else {
                backoff.next_delay()
            };
            if said_wrong_certificate {
                debug!(relay = %failed, retry_in = ?delay, "relay still presents another certificate");
            } else {
                said_wrong_certificate = true;
                error!(relay = %failed, %reason, retry_in = ?delay, "control channel refused: wrong relay certificate");
            }
            delay
        } else {
            said_wrong_certificate = false;
            wrong_certificate.reset();
            let delay = backoff.next_delay();
            warn!(relay = %failed, %reason, retry_in = ?delay, "control channel down");
            delay
        };
        tokio::time::sleep(delay).await;
        // Requests queued while down are stale; their owners time out.
        while out_rx.try_recv().is_ok() {}
    }
}

/// Whether a peer may dial the listed relay node `node`: it is the relay
/// the connection strings name, by that name, or an address that name
/// resolves to now. Relays list the nodes, and a relay may be hostile:
/// without this check one could make an on-prem agent open connections to
/// any address its network reaches. So every node's address must be listed
/// under the relay's name (one DNS record per node).
pub async fn node_allowed(node: &RelayAddr, origin: &RelayAddr) -> bool {
    if node.host.eq_ignore_ascii_case(&origin.host) {
        return true;
    }
    let Ok(ip) = node.host.parse::<std::net::IpAddr>() else {
        return false;
    };
    match tokio::net::lookup_host((origin.host.as_str(), origin.port)).await {
        Ok(mut addrs) => addrs.any(|a| a.ip() == ip),
        Err(_) => false,
    }
}

/// The listed nodes a peer may dial ([`node_allowed`]); the others are
/// logged once each time the list is read.
async fn allowed_nodes(origin: &RelayAddr, nodes: &[String]) -> Vec<String> {
    let mut out = Vec::new();
    for node in nodes {
        let Some(addr) = parse_node(node, origin) else {
            continue;
        };
        if node_allowed(&addr, origin).await {
            out.push(node.clone());
        } else {
            warn!(%node, relay = %origin.host, "ignoring a listed relay node at an address the relay's name does not resolve to");
        }
    }
    out
}

/// A listed node (`HOST:PORT`, `[V6]:PORT`), pinned to `origin`'s
/// certificate: every node presents the same one.
pub fn parse_node(node: &str, origin: &RelayAddr) -> Option<RelayAddr> {
    let (host, port) = node.rsplit_once(':')?;
    let host = host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host);
    if host.is_empty() {
        return None;
    }
    Some(RelayAddr {
        host: host.to_owned(),
        port: port.parse().ok()?,
        cert: origin.cert,
    })
}

/// The node to try after `failed`: the next of the connection string's
/// relay and the listed nodes, in turn. Nodes are `HOST:PORT` and pinned to
/// the same certificate as `origin`: every node presents the same one.
fn next_node(origin: &RelayAddr, failed: &RelayAddr, nodes: &[String]) -> RelayAddr {
    let mut candidates = vec![origin.clone()];
    for node in nodes {
        let Some(addr) = parse_node(node, origin) else {
            continue;
        };
        if !candidates.contains(&addr) {
            candidates.push(addr);
        }
    }
    let at = candidates.iter().position(|c| c == failed).unwrap_or(0);
    candidates[(at + 1) % candidates.len()].clone()
}

type RelayStream = tokio_rustls::client::TlsStream<TcpStream>;

/// Dials the relay and runs TLS pinning its certificate, within
/// [`HANDSHAKE_TIMEOUT`].
async fn connect(
    config: &ControlConfig,
    tls: &Arc<rustls::ClientConfig>,
) -> Result<RelayStream, Down> {
    let connect = async {
        let tcp = config
            .relay
            .dial()
            .await
            .map_err(|e| format!("cannot reach relay {}: {e}", config.relay))?;
        let server_name = rustls::pki_types::ServerName::try_from(config.relay.host.clone())
            .map_err(|e| {
                format!(
                    "relay host {:?} is not a valid name: {e}",
                    config.relay.host
                )
            })?;
        TlsConnector::from(tls.clone())
            .connect(server_name, tcp)
            .await
            .map_err(|e| match crate::tls::pin_mismatch(&e) {
                // Another certificate: the relay's was renewed, or it is
                // not a hybridlink relay at all.
                Some(pin) => Down::wrong_certificate(format!(
                    "the relay at {} presents a certificate other than the connection string's CertificateSha256 ({pin}): if the relay's certificate was renewed, copy the string again (`hybridlink hc keys NAME`); if it is an Azure Relay namespace or presents a CA-issued certificate, remove CertificateSha256 from the string to speak Azure Relay's protocol; if it is one node of a relay cluster, that node was given another certificate than the others",
                    config.relay
                )),
                None => format!("TLS with relay {} failed: {e}", config.relay).into(),
            })
    };
    timeout(HANDSHAKE_TIMEOUT, connect).await.map_err(|_| {
        Down::from(format!(
            "relay {} did not answer within {HANDSHAKE_TIMEOUT:?}",
            config.relay
        ))
    })?
}

/// Why a control channel is down.
#[derive(Debug)]
struct Down {
    reason: String,
    /// The relay presented another certificate than the pinned one:
    /// retrying soon cannot help.
    wrong_certificate: bool,
}

impl Down {
    fn wrong_certificate(reason: String) -> Down {
        Down {
            reason,
            wrong_certificate: true,
        }
    }
}

impl From<String> for Down {
    fn from(reason: String) -> Down {
        Down {
            reason,
            wrong_certificate: false,
        }
    }
}

impl From<&str> for Down {
    fn from(reason: &str) -> Down {
        reason.to_owned().into()
    }
}

/// A session that says hello for `config` and attaches `attachments`.
fn peer_session(config: &ControlConfig, attachments: Vec<ConnectionString>) -> PeerSession {
    PeerSession::new(
        Timing::default(),
        PeerHello {
            role: config.role,
            identity: config.identity,
            label: proto::label::PeerLabel::lossy(&config.label),
        },
        attachments,
        config.token_ttl,
        std::time::Instant::now(),
    )
}

/// Asks the relay for the endpoints of these hybrid connections (listen
/// strings, all for one relay) without attaching: no agent joins the
/// rotation. Each answer is the endpoint or the relay's refusal.
pub async fn describe(
    strings: &[ConnectionString],
) -> Result<Vec<(HcName, Result<proto::name::Endpoint, String>)>, String> {
    let config = ControlConfig::new(
        PeerRole::Agent,
        Fingerprint([0; 32]),
        "describe".into(),
        strings.to_vec(),
    )
    .map_err(|e| e.to_string())?;
    let tls = tls::relay_client_config(config.relay.cert).map_err(|e| e.to_string())?;
    let stream = connect(&config, &tls).await.map_err(|d| d.reason)?;
    let mut session = peer_session(&config, Vec::new());
    // Nothing else is sent: the commands end with the session's own.
    let (_commands_tx, mut commands) = mpsc::channel(1);
    let mut answers = Vec::new();
    let mut failure = None;
    let talk = drive(stream, &mut session, &mut commands, |session, event| {
        match event {
            PeerEvent::Up { .. } => {
                let expiry = unix_now() + 300;
                for cs in strings {
                    let msg = PeerMessage::Describe {
                        hc: cs.hc.clone(),
                        token: cs.token(expiry),
                    };
                    if let Err(e) = session.send(&msg) {
                        failure = Some(e.to_string());
                        return ControlFlow::Break(());
                    }
                }
            }
            PeerEvent::Message(RelayMessage::Described { hc, endpoint }) => {
                answers.push((hc, Ok(endpoint)));
            }
            PeerEvent::Message(RelayMessage::Detached { hc, message, .. }) => {
                answers.push((hc, Err(message)))
            }
            PeerEvent::Message(_) => {}
        }
        if answers.len() < strings.len() {
            ControlFlow::Continue(())
        } else {
            ControlFlow::Break(())
        }
    });
    let ended = timeout(2 * HANDSHAKE_TIMEOUT, talk)
        .await
        .map_err(|_| format!("relay {} did not answer in time", config.relay))?;
    if let Some(failure) = failure {
        return Err(failure);
    }
    match ended {
        Ended::Stopped => Ok(answers),
        other => Err(other.to_string()),
    }
}

async fn connect_and_serve(
    config: &ControlConfig,
    tls: &Arc<rustls::ClientConfig>,
    out_rx: &mut mpsc::Receiver<PeerMessage>,
    events: &mpsc::UnboundedSender<ControlEvent>,
    nodes: &mut Vec<String>,
) -> Result<(), Down> {
    let stream = connect(config, tls).await?;
    let mut session = peer_session(config, config.attachments.clone());
    let relay = &config.relay;
    let ended = drive(stream, &mut session, out_rx, |_, event| {
        let event = match event {
            PeerEvent::Up { session } => {
                info!(%relay, session, "control channel up");
                ControlEvent::Connected
            }
            PeerEvent::Message(msg) => {
                if let RelayMessage::Nodes { nodes: listed, .. } = &msg {
                    nodes.clone_from(listed);
                }
                ControlEvent::Message(msg)
            }
        };
        match events.send(event) {
            Ok(()) => ControlFlow::Continue(()),
            Err(_) => ControlFlow::Break(()),
        }
    })
    .await;
    match ended {
        // The owner went away.
        Ended::Commands | Ended::Stopped => Ok(()),
        Ended::Eof => Err("relay closed the control channel".into()),
        other => Err(other.to_string().into()),
    }
}

/// How a driven control channel ended.
#[derive(Debug, thiserror::Error)]
pub enum Ended<E: std::error::Error> {
    /// The owner dropped its sender of commands.
    #[error("the session's owner closed it")]
    Commands,
    /// The event handler asked to stop.
    #[error("stopped")]
    Stopped,
    /// The other side closed the connection.
    #[error("the other side closed the connection")]
    Eof,
    /// Reading or writing failed.
    #[error("{0}")]
    Io(std::io::Error),
    /// The session ended it (a deadline, a bad message, a refusal).
    #[error(transparent)]
    Session(E),
}

/// How long a closing channel may take to write what it queued last (a
/// `Bye` with the reason).
const FAREWELL_TIMEOUT: Duration = Duration::from_secs(1);
/// How long a closing channel then reads what the peer still sends, until
/// the peer closes its side: enough for what was already on its way, while
/// a peer that goes on sending does not hold the connection (and its
/// memory) for long; a flood of refused connections costs what 50 ms of
/// them hold.
const LINGER: Duration = Duration::from_millis(50);

/// Runs a control channel over `io` until it ends: reads and writes in one
/// `select!` with the session's deadline, so a write that cannot complete
/// never holds up a timeout. `on_event` handles each event and may stop the
/// channel. When the session fails, what it queued last is written for up
/// to [`FAREWELL_TIMEOUT`].
pub async fn drive<S, IO, F>(
    io: IO,
    session: &mut S,
    commands: &mut mpsc::Receiver<S::Command>,
    mut on_event: F,
) -> Ended<S::Error>
where
    S: Session,
    IO: AsyncRead + AsyncWrite,
    F: FnMut(&mut S, S::Event) -> ControlFlow<()>,
{
    let (mut reader, mut writer) = tokio::io::split(io);
    // Control messages are small, and most channels are idle: start small
    // (a relay holds one of these per connection, authenticated or not)
    // and grow for a bigger message.
    let mut read_buf = BytesMut::with_capacity(1024);
    let mut writing: Option<BytesMut> = None;
    let mut needs_flush = false;
    let ended = 'serve: loop {
        let now = std::time::Instant::now();
        if writing.is_none() {
            writing = session.channel_mut().poll_transmit(now);
        }
        let deadline = Instant::from_std(session.poll_timeout());
        tokio::select! {
            read = reader.read_buf(&mut read_buf) => match read {
                Ok(0) => break Ended::Eof,
                Ok(_) => {
                    session.channel_mut().receive(&read_buf, std::time::Instant::now());
                    read_buf.clear();
                }
                Err(e) => break Ended::Io(e),
            },
            // One branch writes, or flushes once everything is written
            // (TLS may hold records back until flushed).
            written = async {
                match writing.as_deref() {
                    Some(buf) => writer.write(buf).await.map(Some),
                    None => writer.flush().await.map(|()| None),
                }
            }, if writing.is_some() || needs_flush => match written {
                Ok(Some(0)) => break Ended::Eof,
                Ok(Some(n)) => {
                    session.channel_mut().transmitted(n, std::time::Instant::now());
                    if let Some(buf) = writing.as_mut() {
                        buf.advance(n);
                        if buf.is_empty() {
                            writing = None;
                            needs_flush = true;
                        }
                    }
                }
                Ok(None) => needs_flush = false,
                Err(e) => break Ended::Io(e),
            },
            command = commands.recv() => match command {
                Some(command) => {
                    if let Err(e) = session.command(command) {
                        break Ended::Session(e);
                    }
                }
                None => break Ended::Commands,
            },
            _ = sleep_until(deadline) => {
                if let Err(e) = session.handle_timeout(clock()) {
                    break Ended::Session(e);
                }
            }
        }
        loop {
            match session.poll_event(clock()) {
                Ok(Some(event)) => {
                    if on_event(session, event).is_break() {
                        break 'serve Ended::Stopped;
                    }
                }
                Ok(None) => break,
                Err(e) => break 'serve Ended::Session(e),
            }
        }
    };
    if let Ended::Session(_) = ended {
        let farewell = async {
            if let Some(buf) = writing.take() {
                writer.write_all(&buf).await?;
            }
            if let Some(buf) = session
                .channel_mut()
                .poll_transmit(std::time::Instant::now())
            {
                writer.write_all(&buf).await?;
            }
            writer.flush().await?;
            writer.shutdown().await
        };
        if let Ok(Ok(())) = timeout(FAREWELL_TIMEOUT, farewell).await {
            // Closing a socket with unread bytes resets the connection, and
            // a reset can make the peer lose the `Bye` it has not read yet:
            // read what it still sends until it closes too, briefly.
            let drain = async {
                loop {
                    read_buf.clear();
                    match reader.read_buf(&mut read_buf).await {
                        Ok(0) | Err(_) => break,
                        Ok(_) => {}
                    }
                }
            };
            let _ = timeout(LINGER, drain).await;
        }
    }
    ended
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(host: &str, port: u16) -> RelayAddr {
        RelayAddr {
            host: host.into(),
            port,
            cert: Fingerprint([1; 32]),
        }
    }

    #[test]
    fn a_failed_node_is_followed_by_the_next_listed_one() {
        let origin = addr("relay.example", 9443);
        let nodes: Vec<String> = vec!["10.0.0.1:9443".into(), "[::1]:9443".into(), "bad".into()];
        let first = next_node(&origin, &origin, &nodes);
        assert_eq!(first, addr("10.0.0.1", 9443));
        let second = next_node(&origin, &first, &nodes);
        assert_eq!(second, addr("::1", 9443));
        // Round the list, back to the connection string's relay.
        assert_eq!(next_node(&origin, &second, &nodes), origin);
        // No list (a relay on its own): the same relay again.
        assert_eq!(next_node(&origin, &origin, &[]), origin);
    }
}
