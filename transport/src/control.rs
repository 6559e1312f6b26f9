//! The peer side of a control channel: one long-lived TLS connection to the
//! relay, kept up with keep-alives, re-established with jittered backoff, with
//! every hybrid connection re-attached and its token renewed before expiry.
//!
//! The owner (agent or sender) gets [`ControlEvent`]s and sends
//! [`PeerMessage`]s through a [`ControlHandle`]; it never sees the reconnects
//! except as `Connected` / `Disconnected` events.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::BytesMut;
use proto::connection_string::ConnectionString;
use proto::control::{self, Fingerprint, PROTOCOL_VERSION, PeerMessage, PeerRole, RelayMessage};
use proto::name::HcName;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio::time::{Instant, sleep_until, timeout};
use tokio_rustls::TlsConnector;
use tracing::{debug, info, warn};

use crate::backoff::Backoff;
use crate::tls;

/// How often a keep-alive is sent on an idle channel.
pub const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(5);
/// A channel with nothing received for this long is dead.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(15);
/// Connect + TLS + welcome must finish within this.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

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
            .ok_or_else(|| ControlClientError::NoPin(cs.entity.clone()))?;
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
    tx: mpsc::UnboundedSender<PeerMessage>,
}

impl ControlHandle {
    /// Queues a message for the relay.
    pub fn send(&self, msg: PeerMessage) {
        let _ = self.tx.send(msg);
    }
}

/// Everything a control channel needs to know.
#[derive(Clone, Debug)]
pub struct ControlConfig {
    /// The relay.
    pub relay: RelayAddr,
    /// Sender or listener.
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
                    first.entity.clone(),
                    cs.entity.clone(),
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
        })
    }
}

/// Starts the control channel task. It runs until the returned receiver is
/// dropped.
pub fn spawn(
    config: ControlConfig,
) -> Result<(ControlHandle, mpsc::UnboundedReceiver<ControlEvent>), ControlClientError> {
    let tls = tls::relay_client_config(config.relay.cert)?;
    let (out_tx, out_rx) = mpsc::unbounded_channel();
    let (ev_tx, ev_rx) = mpsc::unbounded_channel();
    tokio::spawn(run(config, tls, out_rx, ev_tx));
    Ok((ControlHandle { tx: out_tx }, ev_rx))
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

async fn run(
    config: ControlConfig,
    tls: Arc<rustls::ClientConfig>,
    mut out_rx: mpsc::UnboundedReceiver<PeerMessage>,
    events: mpsc::UnboundedSender<ControlEvent>,
) {
    let mut backoff = Backoff::default();
    loop {
        let started = Instant::now();
        let reason = match connect_and_serve(&config, &tls, &mut out_rx, &events).await {
            Ok(()) => return, // the owner went away
            Err(e) => e,
        };
        if events
            .send(ControlEvent::Disconnected(reason.clone()))
            .is_err()
        {
            return;
        }
        if started.elapsed() > Duration::from_secs(30) {
            backoff.reset();
        }
        let delay = backoff.next_delay();
        warn!(relay = %config.relay, %reason, retry_in = ?delay, "control channel down");
        tokio::time::sleep(delay).await;
        // Requests queued while down are stale; their owners time out.
        while out_rx.try_recv().is_ok() {}
    }
}

/// Serves one connection; `Ok` means the owner is gone, `Err` why the
/// connection ended.
type RelayStream = tokio_rustls::client::TlsStream<TcpStream>;

/// Dials the relay, runs TLS pinning its certificate, says `Hello` and
/// waits for `Welcome`, within [`HANDSHAKE_TIMEOUT`].
async fn handshake(
    config: &ControlConfig,
    tls: &Arc<rustls::ClientConfig>,
) -> Result<(RelayStream, BytesMut, u64), String> {
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
        let mut stream = TlsConnector::from(tls.clone())
            .connect(server_name, tcp)
            .await
            .map_err(|e| format!("TLS with relay {} failed: {e}", config.relay))?;
        let mut buf = BytesMut::new();
        let hello = PeerMessage::Hello {
            version: PROTOCOL_VERSION,
            role: config.role,
            identity: config.identity,
            label: proto::label::PeerLabel::lossy(&config.label),
        };
        write_message(&mut stream, &hello)
            .await
            .map_err(|e| e.to_string())?;
        match read_message::<RelayMessage, _>(&mut stream, &mut buf).await {
            Ok(Some(RelayMessage::Welcome { session })) => Ok((stream, buf, session)),
            Ok(Some(RelayMessage::Bye { message })) => Err(format!("relay refused us: {message}")),
            Ok(other) => Err(format!("relay answered hello with {other:?}")),
            Err(e) => Err(format!("reading welcome: {e}")),
        }
    };
    timeout(HANDSHAKE_TIMEOUT, connect).await.map_err(|_| {
        format!(
            "relay {} did not answer within {HANDSHAKE_TIMEOUT:?}",
            config.relay
        )
    })?
}

/// Asks the relay for the endpoints of these hybrid connections (listen
/// strings, all for one relay) without attaching: no agent joins the
/// rotation. Each answer is the endpoint or the relay's refusal.
pub async fn describe(
    strings: &[ConnectionString],
) -> Result<Vec<(HcName, Result<proto::name::Endpoint, String>)>, String> {
    let config = ControlConfig::new(
        PeerRole::Listener,
        Fingerprint([0; 32]),
        "describe".into(),
        strings.to_vec(),
    )
    .map_err(|e| e.to_string())?;
    let tls = tls::relay_client_config(config.relay.cert).map_err(|e| e.to_string())?;
    let (mut stream, mut buf, _) = handshake(&config, &tls).await?;
    let expiry = unix_now() + 300;
    for cs in strings {
        let msg = PeerMessage::Describe {
            entity: cs.entity.clone(),
            token: cs.token(expiry),
        };
        write_message(&mut stream, &msg)
            .await
            .map_err(|e| e.to_string())?;
    }
    let mut answers = Vec::new();
    let read = async {
        while answers.len() < strings.len() {
            match read_message::<RelayMessage, _>(&mut stream, &mut buf).await {
                Ok(Some(RelayMessage::Described { entity, endpoint })) => {
                    answers.push((entity, Ok(endpoint)));
                }
                Ok(Some(RelayMessage::Detached {
                    entity, message, ..
                })) => answers.push((entity, Err(message))),
                Ok(Some(_)) => {}
                Ok(None) => return Err("the relay closed the channel".to_string()),
                Err(e) => return Err(e.to_string()),
            }
        }
        Ok(())
    };
    timeout(HANDSHAKE_TIMEOUT, read)
        .await
        .map_err(|_| format!("relay {} did not answer in time", config.relay))??;
    Ok(answers)
}

async fn connect_and_serve(
    config: &ControlConfig,
    tls: &Arc<rustls::ClientConfig>,
    out_rx: &mut mpsc::UnboundedReceiver<PeerMessage>,
    events: &mpsc::UnboundedSender<ControlEvent>,
) -> Result<(), String> {
    let (stream, mut buf, session) = handshake(config, tls).await?;
    info!(relay = %config.relay, session, "control channel up");
    if events.send(ControlEvent::Connected).is_err() {
        return Ok(());
    }

    let (mut reader, mut writer) = tokio::io::split(stream);
    let mut out = BytesMut::new();
    let renew_every = config.token_ttl.mul_f32(0.8).max(Duration::from_secs(1));
    let sign = |cs: &ConnectionString| cs.token(unix_now() + config.token_ttl.as_secs());
    for cs in &config.attachments {
        control::encode(
            &PeerMessage::Attach {
                entity: cs.entity.clone(),
                token: sign(cs),
            },
            &mut out,
        );
    }
    let mut last_heard = Instant::now();
    let mut next_ping = Instant::now() + KEEPALIVE_INTERVAL;
    let mut next_renew = Instant::now() + renew_every;
    let mut nonce = 0u64;
    let mut pending_pongs: HashMap<u64, Instant> = HashMap::new();

    loop {
        if !out.is_empty() {
            writer
                .write_all(&out)
                .await
                .map_err(|e| format!("writing to relay: {e}"))?;
            out.clear();
        }
        tokio::select! {
            read = reader.read_buf(&mut buf) => {
                match read {
                    Ok(0) => return Err("relay closed the control channel".into()),
                    Ok(_) => last_heard = Instant::now(),
                    Err(e) => return Err(format!("reading from relay: {e}")),
                }
                loop {
                    match control::decode::<RelayMessage>(&mut buf) {
                        Ok(Some(RelayMessage::Ping { nonce })) => control::encode(&PeerMessage::Pong { nonce }, &mut out),
                        Ok(Some(RelayMessage::Pong { nonce })) => {
                            if let Some(sent) = pending_pongs.remove(&nonce) {
                                debug!(rtt = ?sent.elapsed(), "control keep-alive answered");
                            }
                        }
                        Ok(Some(RelayMessage::Bye { message })) => return Err(format!("relay said goodbye: {message}")),
                        Ok(Some(msg)) => {
                            if events.send(ControlEvent::Message(msg)).is_err() {
                                return Ok(());
                            }
                        }
                        Ok(None) => break,
                        Err(e) => return Err(format!("relay sent a bad message: {e}")),
                    }
                }
            }
            msg = out_rx.recv() => match msg {
                Some(msg) => control::encode(&msg, &mut out),
                None => return Ok(()),
            },
            _ = sleep_until(last_heard + IDLE_TIMEOUT) => {
                return Err(format!("relay silent for {IDLE_TIMEOUT:?}"));
            }
            _ = sleep_until(next_ping) => {
                nonce += 1;
                pending_pongs.retain(|_, t| t.elapsed() < IDLE_TIMEOUT);
                pending_pongs.insert(nonce, Instant::now());
                control::encode(&PeerMessage::Ping { nonce }, &mut out);
                next_ping = Instant::now() + KEEPALIVE_INTERVAL;
            }
            _ = sleep_until(next_renew) => {
                for cs in &config.attachments {
                    control::encode(&PeerMessage::Renew { entity: cs.entity.clone(), token: sign(cs) }, &mut out);
                }
                debug!(count = config.attachments.len(), "tokens renewed");
                next_renew = Instant::now() + renew_every;
            }
        }
    }
}

/// Writes one length-prefixed control message.
pub async fn write_message<M: serde::Serialize, W: AsyncWrite + Unpin>(
    w: &mut W,
    msg: &M,
) -> std::io::Result<()> {
    let mut out = BytesMut::new();
    control::encode(msg, &mut out);
    w.write_all(&out).await
}

/// Reads one length-prefixed control message; `Ok(None)` on a clean EOF.
pub async fn read_message<M, R>(r: &mut R, buf: &mut BytesMut) -> std::io::Result<Option<M>>
where
    M: for<'de> serde::Deserialize<'de>,
    R: AsyncRead + Unpin,
{
    read_message_within(r, buf, control::MAX_MESSAGE_LEN).await
}

/// Reads one length-prefixed control message of at most `max_len` bytes;
/// `Ok(None)` on a clean EOF. `buf` grows only as bytes arrive.
pub async fn read_message_within<M, R>(
    r: &mut R,
    buf: &mut BytesMut,
    max_len: usize,
) -> std::io::Result<Option<M>>
where
    M: for<'de> serde::Deserialize<'de>,
    R: AsyncRead + Unpin,
{
    loop {
        match control::decode_within::<M>(buf, max_len) {
            Ok(Some(m)) => return Ok(Some(m)),
            Ok(None) => {}
            Err(e) => return Err(std::io::Error::new(std::io::ErrorKind::InvalidData, e)),
        }
        if r.read_buf(buf).await? == 0 {
            return Ok(None);
        }
    }
}
