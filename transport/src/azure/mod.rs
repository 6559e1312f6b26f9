//! hybridlink's peers as clients of Azure Relay's Hybrid Connections
//! protocol (WebSocket mode), so that an agent listens and `connect`
//! sends through any Azure Relay namespace, or through a hybridlink relay's
//! Azure front door, and mixes with azbridge and the Azure SDKs.
//!
//! - [`Client`]: TLS to the relay (a pinned certificate, a CA file, or the
//!   system's roots) and the WebSocket upgrade, written out by hand so that
//!   the bytes after the handshake are never read ahead.
//! - [`connect`]: a sender's WebSocket (`sb-hc-action=connect`).
//! - [`listen`]: a listener's control channel, with token renewal, Pings,
//!   and reconnects backing off as the Azure SDKs do; [`Accept`] opens or
//!   refuses the rendezvous of each sender.
//! - [`bridge`]: one WebSocket joined to one TCP connection, half-close
//!   included; [`preamble`]: azbridge's stream preamble.
//!
//! The relay of this path terminates the WebSockets and sees their bytes;
//! what the trust model promises holds only on hybridlink's own pipes.

pub mod bridge;
pub mod inner;
pub mod preamble;

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine;
use fastwebsockets::{Frame, OpCode, Payload, Role, WebSocket};
use proto::connection_string::ConnectionString;
use proto::control::Fingerprint;
use ring::rand::{SecureRandom, SystemRandom};
use rustls::RootCertStore;
use rustls::pki_types::ServerName;
use serde::Deserialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tracing::{debug, info, warn};

/// A WebSocket to an Azure-protocol relay.
pub type Ws = WebSocket<TlsStream<TcpStream>>;

/// Longest upgrade answer head read.
const MAX_ANSWER_HEAD: usize = 16 << 10;
/// Longest refusal body kept for the error message.
const MAX_REFUSAL_BODY: usize = 2 << 10;
/// TCP connect, TLS and the upgrade answer must be done within this.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(15);
/// Lifetime of the tokens a listener signs; renewed at 80 %.
pub const TOKEN_TTL: Duration = Duration::from_secs(3600);
/// How often a listener pings its control channel (azbridge's interval),
/// which keeps NAT and proxies from dropping a quiet channel.
pub const PING_EVERY: Duration = Duration::from_secs(30);
/// The waits between a listener's reconnects, as the Azure SDKs space
/// them; the last repeats.
pub const RECONNECT_STEPS: [Duration; 6] = [
    Duration::ZERO,
    Duration::from_secs(1),
    Duration::from_secs(2),
    Duration::from_secs(5),
    Duration::from_secs(10),
    Duration::from_secs(30),
];
/// The key of the WebSocket accept hash (RFC 6455).
const WS_GUID: &str = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11";

/// Errors of the Azure-protocol client.
#[derive(Debug, thiserror::Error)]
pub enum AzureError {
    /// The relay could not be reached.
    #[error("cannot reach the relay at {addr}: {source}")]
    Connect {
        /// host:port.
        addr: String,
        /// Why.
        source: std::io::Error,
    },
    /// The TLS handshake failed (an untrusted certificate among others).
    #[error("TLS with {addr} failed: {source}{hint}")]
    Tls {
        /// host:port.
        addr: String,
        /// Why.
        source: std::io::Error,
        /// What to do about it.
        hint: &'static str,
    },
    /// The relay answered the upgrade with another status.
    #[error("the relay answered {status} {reason}{}", if body.is_empty() { String::new() } else { format!(": {body}") })]
    Refused {
        /// The HTTP status.
        status: u16,
        /// Its reason phrase.
        reason: String,
        /// The start of the answer's body.
        body: String,
    },
    /// The answer was not HTTP, or not a valid WebSocket upgrade.
    #[error("the relay's answer is not a WebSocket upgrade: {0}")]
    BadAnswer(String),
    /// The handshake took too long.
    #[error("the relay did not answer within {0:?}")]
    Timeout(Duration),
    /// Reading or writing failed after the handshake.
    #[error("{0}")]
    Io(#[from] std::io::Error),
    /// The certificates to trust could not be loaded.
    #[error("{0}")]
    Trust(String),
    /// A connection string that cannot be used here.
    #[error("{0}")]
    Unusable(String),
    /// The WebSocket failed.
    #[error("WebSocket: {0}")]
    WebSocket(#[from] fastwebsockets::WebSocketError),
}

/// Which certificates the relay may present.
#[derive(Debug, Clone)]
pub enum Trust {
    /// Exactly this one (the connection string's `CertificateSha256`).
    Pinned(Fingerprint),
    /// Any that chains to these roots and names the relay's host.
    Roots(Arc<RootCertStore>),
}

impl Trust {
    /// The trust for `cs`: its pin if it has one, else the CA certificates
    /// in `ca_file` (PEM) if given, else the system's roots.
    pub fn for_string(cs: &ConnectionString, ca_file: Option<&Path>) -> Result<Trust, AzureError> {
        if let Some(pin) = cs.cert_sha256 {
            return Ok(Trust::Pinned(Fingerprint(pin)));
        }
        let mut roots = RootCertStore::empty();
        match ca_file {
            Some(path) => {
                for cert in crate::tls::pem_certificates(path).map_err(AzureError::Trust)? {
                    roots.add(cert).map_err(|e| {
                        AzureError::Trust(format!(
                            "a certificate in {} cannot be a root: {e}",
                            path.display()
                        ))
                    })?;
                }
            }
            None => {
                let found = rustls_native_certs::load_native_certs();
                for cert in found.certs {
                    // A system store may hold certificates rustls cannot
                    // use; the others still count.
                    let _ = roots.add(cert);
                }
                if roots.is_empty() {
                    return Err(AzureError::Trust(format!(
                        "the system has no CA certificates ({} errors; install ca-certificates) and the connection string has no CertificateSha256: give the relay's CA with --ca-file",
                        found.errors.len()
                    )));
                }
            }
        }
        Ok(Trust::Roots(Arc::new(roots)))
    }

    fn client_config(&self) -> Result<Arc<rustls::ClientConfig>, AzureError> {
        match self {
            Trust::Pinned(pin) => {
                crate::tls::relay_client_config(*pin).map_err(|e| AzureError::Trust(e.to_string()))
            }
            Trust::Roots(roots) => {
                let config = rustls::ClientConfig::builder_with_provider(crate::tls::provider())
                    .with_safe_default_protocol_versions()
                    .map_err(|e| AzureError::Trust(e.to_string()))?
                    .with_root_certificates(roots.clone())
                    .with_no_client_auth();
                Ok(Arc::new(config))
            }
        }
    }

    fn hint(&self) -> &'static str {
        match self {
            Trust::Pinned(_) => {
                " (the relay's certificate is not the one CertificateSha256 names: copy the connection string again, or leave CertificateSha256 out for a relay with a CA-issued certificate)"
            }
            Trust::Roots(_) => {
                " (is the relay's certificate issued by a CA this machine trusts and for this host name? Give its CA with --ca-file, or use a connection string with CertificateSha256 for a hybridlink relay's own certificate)"
            }
        }
    }
}

/// A relay's host and port, and how its certificate is checked.
#[derive(Debug, Clone)]
pub struct Client {
    host: String,
    port: u16,
    trust: Trust,
    tls: Arc<rustls::ClientConfig>,
}

/// A WebSocket after a successful upgrade.
pub struct Upgraded {
    /// The WebSocket (client role).
    pub ws: Ws,
    /// The sub-protocol the other side chose, if any.
    pub protocol: Option<String>,
}

impl std::fmt::Debug for Upgraded {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Upgraded")
            .field("protocol", &self.protocol)
            .finish_non_exhaustive()
    }
}

fn random_hex(bytes: usize) -> String {
    let mut buf = vec![0u8; bytes];
    // A failing system RNG leaves zeros: only the tracking id and the
    // WebSocket key use this, neither of them a secret.
    let _ = SystemRandom::new().fill(&mut buf);
    buf.iter().map(|b| format!("{b:02x}")).collect()
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// The resource a token for `cs` is signed for: `http://host/hc` as the
/// .NET SDK signs it (the port only when it is not 443), which Azure's
/// service and hybridlink's relay both accept.
pub fn resource(cs: &ConnectionString) -> String {
    if cs.relay_port == 443 {
        format!("http://{}/{}", cs.relay_host, cs.hc)
    } else {
        cs.resource_uri()
    }
}

/// A token for `cs` valid for `ttl` from now.
pub fn token(cs: &ConnectionString, ttl: Duration) -> String {
    proto::sas::sign(
        &resource(cs),
        &cs.key_name,
        &cs.key,
        unix_now() + ttl.as_secs(),
    )
}

/// The value of header `name` in an answer head.
fn header<'a>(head: &'a str, name: &str) -> Option<&'a str> {
    head.lines().skip(1).find_map(|line| {
        let (n, v) = line.split_once(':')?;
        n.trim().eq_ignore_ascii_case(name).then(|| v.trim())
    })
}

impl Client {
    /// The relay at `host:port`, checked with `trust`.
    pub fn new(host: &str, port: u16, trust: Trust) -> Result<Client, AzureError> {
        let tls = trust.client_config()?;
        Ok(Client {
            host: host.to_string(),
            port,
            trust,
            tls,
        })
    }

    /// The relay `cs` names.
    pub fn for_string(cs: &ConnectionString, trust: Trust) -> Result<Client, AzureError> {
        Client::new(&cs.relay_host, cs.relay_port, trust)
    }

    /// The same trust at another host (an `accept`'s address may name
    /// another front end of the same namespace).
    fn at(&self, host: &str, port: u16) -> Client {
        Client {
            host: host.to_string(),
            port,
            trust: self.trust.clone(),
            tls: self.tls.clone(),
        }
    }

    fn addr(&self) -> String {
        format!("{}:{}", self.host, self.port)
    }

    /// Opens a WebSocket to `target` (path and query) with `headers`.
    pub async fn upgrade(
        &self,
        target: &str,
        headers: &[(&str, &str)],
    ) -> Result<Upgraded, AzureError> {
        tokio::time::timeout(HANDSHAKE_TIMEOUT, self.upgrade_now(target, headers))
            .await
            .map_err(|_| AzureError::Timeout(HANDSHAKE_TIMEOUT))?
    }

    async fn upgrade_now(
        &self,
        target: &str,
        headers: &[(&str, &str)],
    ) -> Result<Upgraded, AzureError> {
        let addr = self.addr();
        let tcp = TcpStream::connect((self.host.as_str(), self.port))
            .await
            .map_err(|source| AzureError::Connect {
                addr: addr.clone(),
                source,
            })?;
        tcp.set_nodelay(true)?;
        let name = ServerName::try_from(self.host.clone())
            .map_err(|e| AzureError::Unusable(format!("{}: {e}", self.host)))?;
        let mut tls = tokio_rustls::TlsConnector::from(self.tls.clone())
            .connect(name, tcp)
            .await
            .map_err(|source| AzureError::Tls {
                addr: addr.clone(),
                source,
                hint: self.trust.hint(),
            })?;
        let key = base64::engine::general_purpose::STANDARD.encode(random_hex(8));
        let host = if self.port == 443 {
            self.host.clone()
        } else {
            addr.clone()
        };
        let mut head = format!(
            "GET {target} HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n"
        );
        for (name, value) in headers {
            head.push_str(&format!("{name}: {value}\r\n"));
        }
        head.push_str("\r\n");
        tls.write_all(head.as_bytes()).await?;
        // Byte by byte: the other side may send frames right after its
        // answer, and they belong to the WebSocket.
        let mut answer = Vec::new();
        while !answer.ends_with(b"\r\n\r\n") {
            if answer.len() >= MAX_ANSWER_HEAD {
                return Err(AzureError::BadAnswer("the answer head is too long".into()));
            }
            match tls.read_u8().await {
                Ok(b) => answer.push(b),
                Err(e) if answer.is_empty() => {
                    return Err(AzureError::BadAnswer(format!(
                        "the relay closed the connection: {e}"
                    )));
                }
                Err(e) => return Err(e.into()),
            }
        }
        let answer = String::from_utf8_lossy(&answer).into_owned();
        let status_line = answer.lines().next().unwrap_or_default();
        let mut parts = status_line.splitn(3, ' ');
        let (Some(version), Some(status)) = (parts.next(), parts.next()) else {
            return Err(AzureError::BadAnswer(
                status_line.chars().take(80).collect(),
            ));
        };
        let reason = parts.next().unwrap_or_default().trim().to_string();
        let status: u16 = status
            .parse()
            .ok()
            .filter(|_| version.starts_with("HTTP/1."))
            .ok_or_else(|| AzureError::BadAnswer(status_line.chars().take(80).collect()))?;
        if status != 101 {
            let body = read_body(&mut tls, &answer).await;
            return Err(AzureError::Refused {
                status,
                reason,
                body,
            });
        }
        let expected = {
            let digest = ring::digest::digest(
                &ring::digest::SHA1_FOR_LEGACY_USE_ONLY,
                format!("{key}{WS_GUID}").as_bytes(),
            );
            base64::engine::general_purpose::STANDARD.encode(digest.as_ref())
        };
        if header(&answer, "Sec-WebSocket-Accept") != Some(expected.as_str()) {
            return Err(AzureError::BadAnswer(
                "Sec-WebSocket-Accept does not match the key sent".into(),
            ));
        }
        let protocol = header(&answer, "Sec-WebSocket-Protocol").map(str::to_string);
        Ok(Upgraded {
            ws: WebSocket::after_handshake(tls, Role::Client),
            protocol,
        })
    }
}

/// The body of a refusal, as far as it comes within a second, cut to
/// [`MAX_REFUSAL_BODY`] and to one line.
async fn read_body(tls: &mut TlsStream<TcpStream>, head: &str) -> String {
    let length = header(head, "Content-Length")
        .and_then(|l| l.parse::<usize>().ok())
        .unwrap_or(MAX_REFUSAL_BODY)
        .min(MAX_REFUSAL_BODY);
    let mut body = vec![0u8; length];
    let mut got = 0;
    let reading = async {
        while got < length {
            match tls.read(&mut body[got..]).await {
                Ok(0) | Err(_) => break,
                Ok(n) => got += n,
            }
        }
    };
    let _ = tokio::time::timeout(Duration::from_secs(1), reading).await;
    String::from_utf8_lossy(&body[..got])
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
}

/// A sender's WebSocket to the hybrid connection of `cs`, offering
/// `protocols` (the listener picks one, or none).
pub async fn connect(
    client: &Client,
    cs: &ConnectionString,
    protocols: &[&str],
) -> Result<Upgraded, AzureError> {
    if cs.key_name.eq_ignore_ascii_case("listen") {
        return Err(AzureError::Unusable(format!(
            "the connection string for {} is a listen string; a sender needs a send string",
            cs.hc
        )));
    }
    let target = format!(
        "/$hc/{}?sb-hc-action=connect&sb-hc-id={}",
        cs.hc,
        random_hex(16)
    );
    let token = token(cs, TOKEN_TTL);
    let offered = protocols.join(", ");
    let mut headers = vec![("ServiceBusAuthorization", token.as_str())];
    if !protocols.is_empty() {
        headers.push(("Sec-WebSocket-Protocol", offered.as_str()));
    }
    client.upgrade(&target, &headers).await
}

/// How a sender's stream begins.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Framing {
    /// azbridge's stream preamble asking for this port name, which the
    /// listener must accept (`[1, 0, 0]`) before any data: what azbridge
    /// listeners and hybridlink agents expect.
    Azbridge(String),
    /// Data from the first byte, for a listener that reads raw bytes (a
    /// `hyco-ws` app).
    Raw,
}

/// Why a sender's stream did not open, for people.
pub fn describe_refusal(e: &inner::InnerError) -> String {
    match e {
        inner::InnerError::Azure(AzureError::Refused {
            status: 404, body, ..
        }) => {
            format!(
                "no listener is connected to this hybrid connection, or it does not exist ({body})"
            )
        }
        inner::InnerError::Azure(AzureError::Refused {
            status: 401 | 403,
            body,
            ..
        }) if body.contains("token") => {
            format!("the relay refused the token: {body}")
        }
        inner::InnerError::Azure(AzureError::Refused { status, reason, .. }) => {
            format!("the listener refused the stream: {status} {reason}")
        }
        other => other.to_string(),
    }
}

/// A sender's open stream.
pub enum AzureStream {
    /// The WebSocket itself: the relay sees the bytes (the listener is not
    /// a hybridlink agent, or the framing was raw).
    Plain(Box<Ws>),
    /// TLS inside the WebSocket to a hybridlink agent, which passed the
    /// end-to-end check if this side holds the key.
    Inner(Box<inner::InnerClient>),
}

impl std::fmt::Debug for AzureStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            AzureStream::Plain(_) => "AzureStream::Plain",
            AzureStream::Inner(_) => "AzureStream::Inner",
        })
    }
}

impl AzureStream {
    /// Whether the relay sees only ciphertext.
    pub fn is_inner(&self) -> bool {
        matches!(self, AzureStream::Inner(_))
    }

    /// Joins the stream to `socket` until both directions end (half-close
    /// passed on); (bytes to the socket, bytes from it).
    pub async fn join<T>(self, mut socket: T) -> (u64, u64)
    where
        T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
    {
        match self {
            AzureStream::Plain(ws) => {
                let bridged = bridge::bridge(*ws, socket, None).await;
                (bridged.to_socket, bridged.from_socket)
            }
            AzureStream::Inner(mut tls) => {
                match tokio::io::copy_bidirectional(&mut *tls, &mut socket).await {
                    Ok((down, up)) => (down, up),
                    Err(_) => (0, 0),
                }
            }
        }
    }
}

/// The next data message of `ws` (Pings and Pongs skipped), or `None`
/// when the other side closes.
pub async fn next_message<S>(
    ws: &mut WebSocket<S>,
) -> Result<Option<Vec<u8>>, fastwebsockets::WebSocketError>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    loop {
        let frame = ws.read_frame().await?;
        match frame.opcode {
            OpCode::Binary | OpCode::Text | OpCode::Continuation => {
                return Ok(Some(frame.payload.to_vec()));
            }
            OpCode::Close => return Ok(None),
            OpCode::Ping | OpCode::Pong => {}
        }
    }
}

/// Opens one stream to the hybrid connection of `cs`: a sender's WebSocket
/// offering [`inner::PROTOCOL`], begun as `framing` says. A hybridlink
/// agent answers the preamble with [`inner::MARKER`]; TLS and the
/// end-to-end check then run inside the WebSocket, and the agent dials
/// before it answers, so a refusal is the target's own. A string with an
/// end-to-end key reaches only such agents.
pub async fn open_stream(
    client: &Client,
    cs: &ConnectionString,
    framing: &Framing,
) -> Result<AzureStream, inner::InnerError> {
    let mut ws = connect(client, cs, &[inner::PROTOCOL]).await?.ws;
    let Framing::Azbridge(port_name) = framing else {
        if cs.end_to_end_key.is_some() {
            return Err(AzureError::Unusable(
                "--framing raw cannot carry the end-to-end check this connection string's EndToEndKey asks for".into(),
            )
            .into());
        }
        return Ok(AzureStream::Plain(Box::new(ws)));
    };
    let hello = preamble::encode(port_name);
    ws.write_frame(Frame::binary(Payload::Borrowed(&hello)))
        .await
        .map_err(AzureError::from)?;
    let answer = tokio::time::timeout(HANDSHAKE_TIMEOUT, next_message(&mut ws))
        .await
        .map_err(|_| AzureError::Timeout(HANDSHAKE_TIMEOUT))?
        .map_err(AzureError::WebSocket)?;
    let Some(answer) = answer else {
        return Err(AzureError::Unusable(
            "the listener closed the stream instead of accepting it (its target may have refused)"
                .into(),
        )
        .into());
    };
    if answer == inner::marked_answer() {
        let tls = inner::open_as_sender(ws, &cs.hc, cs.end_to_end_key.as_ref()).await?;
        return Ok(AzureStream::Inner(Box::new(tls)));
    }
    preamble::check_answer(&answer).map_err(|e| AzureError::Unusable(e.to_string()))?;
    if cs.end_to_end_key.is_some() {
        return Err(AzureError::Unusable(
            "the listener is not a hybridlink agent (it answered as azbridge does), so it cannot prove this connection string's EndToEndKey".into(),
        )
        .into());
    }
    Ok(AzureStream::Plain(Box::new(ws)))
}

/// A sender of one hybrid connection over Azure Relay's protocol: the
/// relay's client, the send string and how each stream begins. Cheap to
/// clone; every [`AzureSender::open`] is a WebSocket of its own.
#[derive(Debug, Clone)]
pub struct AzureSender {
    client: Client,
    cs: ConnectionString,
    framing: Framing,
}

impl AzureSender {
    /// A sender for `cs`, trusting `ca_file` (PEM) or the system's roots
    /// when `cs` pins no certificate.
    pub fn new(
        cs: &ConnectionString,
        ca_file: Option<&Path>,
        framing: Framing,
    ) -> Result<AzureSender, AzureError> {
        let trust = Trust::for_string(cs, ca_file)?;
        Ok(AzureSender {
            client: Client::for_string(cs, trust)?,
            cs: cs.clone(),
            framing,
        })
    }

    /// The send string.
    pub fn connection_string(&self) -> &ConnectionString {
        &self.cs
    }

    /// Opens one stream; the error says why for people, naming the hybrid
    /// connection.
    pub async fn open(&self) -> Result<AzureStream, String> {
        open_stream(&self.client, &self.cs, &self.framing)
            .await
            .map_err(|e| format!("{}: {}", self.cs.hc, describe_refusal(&e)))
    }
}

/// A sender waiting for the listener's rendezvous, as an `accept` message
/// describes it.
#[derive(Debug, Clone)]
pub struct Accept {
    /// Where to open the rendezvous, used as it is.
    pub address: String,
    /// The connection's tracking id.
    pub id: String,
    /// The sub-protocols the sender offered.
    pub protocols: Vec<String>,
    /// The sender's address as the relay saw it, if it says.
    pub remote: Option<String>,
    client: Client,
}

#[derive(Debug, Deserialize)]
struct AcceptMessage {
    address: String,
    #[serde(default)]
    id: String,
    #[serde(default, rename = "connectHeaders")]
    connect_headers: serde_json::Map<String, serde_json::Value>,
    #[serde(default, rename = "remoteEndpoint")]
    remote_endpoint: Option<RemoteEndpoint>,
}

#[derive(Debug, Deserialize)]
struct RemoteEndpoint {
    address: String,
    port: u16,
}

#[derive(Debug, Deserialize)]
struct ControlMessage {
    accept: Option<AcceptMessage>,
    request: Option<serde_json::Value>,
}

impl Accept {
    fn from_message(message: AcceptMessage, client: &Client) -> Accept {
        let protocols = message
            .connect_headers
            .iter()
            .filter(|(name, _)| name.eq_ignore_ascii_case("Sec-WebSocket-Protocol"))
            .filter_map(|(_, value)| value.as_str())
            .flat_map(|value| value.split(','))
            .map(|p| p.trim().to_string())
            .filter(|p| !p.is_empty())
            .collect();
        Accept {
            address: message.address,
            id: message.id,
            protocols,
            remote: message
                .remote_endpoint
                .map(|r| format!("{}:{}", r.address, r.port)),
            client: client.clone(),
        }
    }

    /// The client for the address's host, and the address's path and query.
    fn target(&self) -> Result<(Client, String), AzureError> {
        let rest = self.address.strip_prefix("wss://").ok_or_else(|| {
            AzureError::BadAnswer(format!("accept address {:?} is not wss://", self.address))
        })?;
        let (authority, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
        let (host, port) = match authority.rsplit_once(':') {
            Some((host, port)) => (
                host,
                port.parse::<u16>().map_err(|_| {
                    AzureError::BadAnswer(format!(
                        "accept address {:?} has a bad port",
                        self.address
                    ))
                })?,
            ),
            None => (authority, 443),
        };
        if host.is_empty() || path.is_empty() {
            return Err(AzureError::BadAnswer(format!(
                "accept address {:?} has no host or path",
                self.address
            )));
        }
        Ok((self.client.at(host, port), path.to_string()))
    }

    /// Opens the rendezvous, choosing `protocol` (one the sender offered).
    pub async fn open(&self, protocol: Option<&str>) -> Result<Ws, AzureError> {
        let (client, target) = self.target()?;
        let headers: Vec<(&str, &str)> = protocol
            .map(|p| ("Sec-WebSocket-Protocol", p))
            .into_iter()
            .collect();
        Ok(client.upgrade(&target, &headers).await?.ws)
    }

    /// Refuses the sender: it is answered `status` (400 to 599) with
    /// `description`.
    pub async fn reject(&self, status: u16, description: &str) -> Result<(), AzureError> {
        let (client, target) = self.target()?;
        let target = format!(
            "{target}&sb-hc-statusCode={status}&sb-hc-statusDescription={}",
            proto::sas::url_encode(description)
        );
        match client.upgrade(&target, &[]).await {
            // The relay answers a rejection with 410; some answer 101.
            Err(AzureError::Refused { status: 410, .. }) | Ok(_) => Ok(()),
            Err(e) => Err(e),
        }
    }
}

/// Serves the listener control channel of `cs` until `stop` resolves:
/// each sender's `accept` goes to `on_accept`; `on_state` hears whether
/// the channel is up (`None`) or why not (`Some(reason)`). Reconnects with
/// [`RECONNECT_STEPS`] between attempts.
pub async fn listen<A, S>(client: Client, cs: ConnectionString, on_accept: A, on_state: S)
where
    A: Fn(Accept) + Send + Sync,
    S: Fn(Option<String>) + Send + Sync,
{
    let mut attempt = 0usize;
    loop {
        let wait = RECONNECT_STEPS[attempt.min(RECONNECT_STEPS.len() - 1)];
        if !wait.is_zero() {
            tokio::time::sleep(wait).await;
        }
        attempt += 1;
        let target = format!(
            "/$hc/{}?sb-hc-action=listen&sb-hc-id={}",
            cs.hc,
            random_hex(16)
        );
        let token = token(&cs, TOKEN_TTL);
        let ws = match client
            .upgrade(&target, &[("ServiceBusAuthorization", token.as_str())])
            .await
        {
            Ok(up) => up.ws,
            Err(e) => {
                warn!(hc = %cs.hc, error = %e, "Azure-protocol listener could not connect");
                on_state(Some(e.to_string()));
                continue;
            }
        };
        info!(hc = %cs.hc, relay = %client.addr(), "Azure-protocol listener connected");
        on_state(None);
        let started = tokio::time::Instant::now();
        let why = serve_channel(ws, &client, &cs, &on_accept).await;
        warn!(hc = %cs.hc, reason = %why, "Azure-protocol control channel ended");
        on_state(Some(why));
        // A channel that stayed up a while starts the backoff afresh.
        if started.elapsed() > Duration::from_secs(60) {
            attempt = 0;
        }
    }
}

/// One control channel until it ends; why it ended.
async fn serve_channel<A>(ws: Ws, client: &Client, cs: &ConnectionString, on_accept: &A) -> String
where
    A: Fn(Accept) + Send + Sync,
{
    let mut ws = ws;
    ws.set_auto_close(true);
    ws.set_auto_pong(true);
    let renew_every = TOKEN_TTL.mul_f64(0.8);
    let mut renew =
        tokio::time::interval_at(tokio::time::Instant::now() + renew_every, renew_every);
    let mut ping = tokio::time::interval_at(tokio::time::Instant::now() + PING_EVERY, PING_EVERY);
    loop {
        tokio::select! {
            frame = ws.read_frame() => {
                let frame = match frame {
                    Ok(frame) => frame,
                    Err(e) => return format!("the connection failed: {e}"),
                };
                match frame.opcode {
                    OpCode::Text => match serde_json::from_slice::<ControlMessage>(&frame.payload) {
                        Ok(ControlMessage { accept: Some(accept), .. }) => {
                            debug!(hc = %cs.hc, id = %accept.id, "accept");
                            on_accept(Accept::from_message(accept, client));
                        }
                        Ok(ControlMessage { request: Some(_), .. }) => {
                            debug!(hc = %cs.hc, "an HTTP request: this listener serves WebSockets only");
                        }
                        Ok(_) => {}
                        Err(e) => debug!(hc = %cs.hc, error = %e, "ignored a control message"),
                    },
                    OpCode::Close => {
                        let code = frame.payload.get(..2).map(|c| u16::from_be_bytes([c[0], c[1]]));
                        let reason = String::from_utf8_lossy(frame.payload.get(2..).unwrap_or_default()).into_owned();
                        return match code {
                            Some(1008) => format!("the relay closed it (1008, the token was refused or expired): {reason}"),
                            Some(1001) => format!("the relay closed it (1001, the hybrid connection was deleted or disabled): {reason}"),
                            Some(code) => format!("the relay closed it ({code}): {reason}"),
                            None => "the relay closed it".to_string(),
                        };
                    }
                    _ => {}
                }
            }
            _ = renew.tick() => {
                let message = serde_json::json!({"renewToken": {"token": token(cs, TOKEN_TTL)}});
                let frame = Frame::text(Payload::Owned(message.to_string().into_bytes()));
                if let Err(e) = ws.write_frame(frame).await {
                    return format!("renewing the token failed: {e}");
                }
                info!(hc = %cs.hc, "Azure-protocol listener renewed its token");
            }
            _ = ping.tick() => {
                if let Err(e) = ws.write_frame(Frame::new(true, OpCode::Ping, None, Payload::Borrowed(b""))).await {
                    return format!("the connection failed: {e}");
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cs(text: &str) -> ConnectionString {
        text.parse().unwrap()
    }

    #[test]
    fn tokens_are_signed_for_the_resource_the_sdks_use() {
        let azure = cs(
            "Endpoint=sb://ns.servicebus.windows.net/;SharedAccessKeyName=send;SharedAccessKey=c2VjcmV0c2VjcmV0c2VjcmV0c2VjcmV0c2VjcmV0MTI=;EntityPath=payroll",
        );
        assert_eq!(resource(&azure), "http://ns.servicebus.windows.net/payroll");
        let ours = cs(
            "Endpoint=sb://relay.example:9443/;SharedAccessKeyName=send;SharedAccessKey=c2VjcmV0c2VjcmV0c2VjcmV0c2VjcmV0c2VjcmV0MTI=;EntityPath=payroll",
        );
        assert_eq!(resource(&ours), "http://relay.example:9443/payroll");
        let t = token(&ours, Duration::from_secs(60));
        assert!(t.starts_with("SharedAccessSignature sr="), "{t}");
        assert!(t.contains("&skn=send"), "{t}");
    }

    #[test]
    fn an_accept_names_the_offered_protocols_and_where_to_rendezvous() {
        let client =
            Client::new("relay.example", 9443, Trust::Pinned(Fingerprint([0; 32]))).unwrap();
        let message: ControlMessage = serde_json::from_str(
            r#"{"accept":{"address":"wss://front.example/$hc/payroll?sb-hc-action=accept&sb-hc-id=x&sb-hc-ticket=t","id":"x",
                "connectHeaders":{"Sec-WebSocket-Key":"k","Sec-WebSocket-Protocol":"hybridlink.v1, other"},
                "remoteEndpoint":{"address":"198.18.0.9","port":40000}}}"#,
        )
        .unwrap();
        let accept = Accept::from_message(message.accept.unwrap(), &client);
        assert_eq!(accept.protocols, ["hybridlink.v1", "other"]);
        assert_eq!(accept.remote.as_deref(), Some("198.18.0.9:40000"));
        let (at, target) = accept.target().unwrap();
        assert_eq!(at.addr(), "front.example:443");
        assert_eq!(
            target,
            "/$hc/payroll?sb-hc-action=accept&sb-hc-id=x&sb-hc-ticket=t"
        );

        let mut with_port = accept.clone();
        with_port.address = "wss://127.0.0.1:9443/$hc/payroll?sb-hc-action=accept".into();
        assert_eq!(with_port.target().unwrap().0.addr(), "127.0.0.1:9443");
        with_port.address = "https://elsewhere/".into();
        assert!(with_port.target().is_err());
    }

    #[test]
    fn answer_headers_are_found_whatever_their_case() {
        let head =
            "HTTP/1.1 101 Switching Protocols\r\nsec-websocket-protocol: hybridlink.v1\r\n\r\n";
        assert_eq!(
            header(head, "Sec-WebSocket-Protocol"),
            Some("hybridlink.v1")
        );
        assert_eq!(header(head, "Sec-WebSocket-Accept"), None);
    }
}
