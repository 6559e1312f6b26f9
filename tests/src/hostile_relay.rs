//! A hostile relay: a man in the middle in front of a real relay, holding
//! the real relay's certificate and key (as a thief of the relay host or a
//! malicious operator would), that tries to splice itself into every pipe.
//!
//! Peers are pointed at [`HostileRelay::addr`] with the real relay's
//! `CertificateSha256`, so their pin succeeds. The hostile relay then:
//!
//! - **control channels**: terminates each peer's TLS with the relay's own
//!   certificate, opens its own channel to the real relay, and forwards every
//!   message both ways, replacing the data identity in each peer's `Hello`
//!   with the attacker's (remembering the real one). The real relay, none
//!   the wiser, announces the attacker's fingerprint to senders (`Agents`)
//!   and to agents (`Grant`, `PipeOffer`) by itself.
//! - **a sender's pipe**: terminates the sender's TLS as the agent would,
//!   with the attacker's identity. In [`Mode::Relay`] it dials the real
//!   relay with the same ticket and role and runs TLS as the sender would,
//!   with the attacker's identity, and copies the plaintext between the two
//!   legs; in [`Mode::Forge`] it answers every stream itself.
//! - **an agent's pipe**: passes it through to the real relay byte for byte;
//!   the agent's TLS ends at the attacker's re-originated sender leg.
//!
//! Every plaintext byte the attacker decrypts is recorded per direction
//! ([`HostileRelay::from_sender`], [`HostileRelay::from_agent`]), and what
//! it managed is counted ([`HostileRelay::stats`]), so a test can assert
//! both what a relay-trusted connection gives away and what an end-to-end
//! protected one must not.
//!
//! The attacker accepts whatever certificate either end presents (it checks
//! only the handshake signatures), so it never refuses anyone itself: every
//! pipe handshake that fails is a peer refusing the attacker.
//!
//! Control messages are handled as JSON values, not as `proto::control`
//! enums, so fields this version does not know (an end-to-end proof, say)
//! pass through unchanged: the attacker rewrites only what it must.

use std::io;
use std::net::SocketAddr;
use std::path::Path;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::{Context, Poll};
use std::time::Duration;

use crate::wire::{read_message, write_message};
use anyhow::{Context as _, Result};
use bytes::{Bytes, BytesMut};
use proto::control::{
    Fingerprint, PIPE_PREAMBLE_LEN, PipeRole, Ticket, decode_pipe_preamble, encode_pipe_preamble,
};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::WebPkiSupportedAlgorithms;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{DigitallySignedStruct, DistinguishedName, SignatureScheme};
use serde_json::Value;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::{JoinHandle, JoinSet};
use tokio::time::timeout;
use tokio_rustls::{TlsAcceptor, TlsConnector};
use transport::mux::{MuxConfig, Side, spawn_session};
use transport::tls::{DataIdentity, pipe_server_name, relay_client_config};

use crate::Relay;

/// The first byte of a TLS handshake record: a control channel.
const TLS_HANDSHAKE: u8 = 0x16;
/// How long a connection may take to say what it is, and a pipe to set up.
const SETUP_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a forged stream waits for the app to finish sending.
const FORGE_READ_TIMEOUT: Duration = Duration::from_secs(10);

/// What the hostile relay does with a sender's streams once it holds them
/// in plaintext.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Mode {
    /// Forward them to the real agent, reading (and recording) every byte.
    Relay,
    /// Answer each stream itself: read what the app sends until it
    /// half-closes, answer with these bytes, close. The agent never hears
    /// of the stream.
    Forge(Vec<u8>),
}

/// What the hostile relay managed so far.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct HostileStats {
    /// Control channels terminated and re-originated to the real relay.
    pub control_channels: u64,
    /// `Hello`s whose data identity was replaced by the attacker's.
    pub identities_replaced: u64,
    /// Sender pipes whose TLS the attacker terminated (it holds their
    /// plaintext).
    pub pipes_intercepted: u64,
    /// Intercepted pipes also re-originated to the real agent with TLS up.
    pub pipes_spliced: u64,
    /// Agent pipes passed through untouched.
    pub agent_pipes_passed: u64,
    /// Streams the attacker answered itself ([`Mode::Forge`]).
    pub streams_forged: u64,
    /// TLS handshakes that failed on either leg of a pipe.
    pub handshake_failures: u64,
}

/// A man in the middle in front of a real relay; see the module docs.
/// Dropping it closes its port and every connection through it.
#[derive(Debug)]
pub struct HostileRelay {
    /// Where peers must be pointed (the real relay's certificate pin still
    /// holds, since the attacker serves the same certificate).
    pub addr: SocketAddr,
    state: Arc<State>,
    task: JoinHandle<()>,
}

impl Drop for HostileRelay {
    fn drop(&mut self) {
        // Aborting the accept loop drops its task set, which aborts every
        // connection it serves.
        self.task.abort();
    }
}

impl HostileRelay {
    /// Starts a hostile relay on a loopback port of its own in front of
    /// `relay`, serving `relay`'s certificate and key from its data dir.
    pub async fn start(relay: &Relay) -> Result<HostileRelay> {
        HostileRelay::start_in_front_of(relay.listen, &relay.data_dir).await
    }

    /// Starts a hostile relay in front of the relay port `upstream`, with
    /// the certificate and key found in `data_dir`.
    pub async fn start_in_front_of(upstream: SocketAddr, data_dir: &Path) -> Result<HostileRelay> {
        let (cert, key) = stolen_relay_identity(data_dir)?;
        let relay_fingerprint = Fingerprint::of_der(&cert);
        let server = rustls::ServerConfig::builder_with_provider(transport::tls::provider())
            .with_safe_default_protocol_versions()?
            .with_no_client_auth()
            .with_single_cert(vec![cert], key)
            .context("the relay's cert.pem and key.pem do not form a TLS identity")?;
        let attacker = DataIdentity::generate()?;
        let (pipe_server, pipe_client) = attacker_pipe_configs(&attacker)?;
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let state = Arc::new(State {
            upstream,
            relay_tls: TlsAcceptor::from(Arc::new(server)),
            upstream_tls: TlsConnector::from(relay_client_config(relay_fingerprint)?),
            attacker,
            pipe_server: TlsAcceptor::from(pipe_server),
            pipe_client: TlsConnector::from(pipe_client),
            mode: Mutex::new(Mode::Relay),
            from_sender: Arc::default(),
            from_agent: Arc::default(),
            stats: Mutex::default(),
            log: Mutex::default(),
        });
        let task = tokio::spawn(accept_loop(listener, state.clone()));
        Ok(HostileRelay { addr, state, task })
    }

    /// The fingerprint the attacker announces for every peer.
    pub fn attacker_fingerprint(&self) -> Fingerprint {
        self.state.attacker.fingerprint()
    }

    /// Changes what is done with the streams of pipes set up from now on.
    pub fn set_mode(&self, mode: Mode) {
        *lock(&self.state.mode) = mode;
    }

    /// Every plaintext byte the attacker decrypted from senders, all pipes
    /// appended in the order read.
    pub fn from_sender(&self) -> Arc<Mutex<Vec<u8>>> {
        self.state.from_sender.clone()
    }

    /// Every plaintext byte the attacker decrypted from agents.
    pub fn from_agent(&self) -> Arc<Mutex<Vec<u8>>> {
        self.state.from_agent.clone()
    }

    /// A snapshot of the counters.
    pub fn stats(&self) -> HostileStats {
        *lock(&self.state.stats)
    }

    /// What happened, one line per event, for a failing test's message.
    pub fn log(&self) -> Vec<String> {
        lock(&self.state.log).clone()
    }
}

/// Reads `cert.pem` and `key.pem` from a relay's data dir, as a thief would
/// copy them.
fn stolen_relay_identity(
    data_dir: &Path,
) -> Result<(CertificateDer<'static>, PrivateKeyDer<'static>)> {
    let cert_path = data_dir.join(relay::identity::CERT_FILE);
    let key_path = data_dir.join(relay::identity::KEY_FILE);
    let cert = CertificateDer::from_pem_file(&cert_path)
        .with_context(|| format!("reading {}", cert_path.display()))?;
    let key = PrivateKeyDer::from_pem_file(&key_path)
        .with_context(|| format!("reading {}", key_path.display()))?;
    Ok((cert, key))
}

/// TLS configs for pipes with the attacker's identity that accept any peer
/// certificate: the server end (towards senders) and the client end
/// (towards agents).
fn attacker_pipe_configs(
    attacker: &DataIdentity,
) -> Result<(Arc<rustls::ServerConfig>, Arc<rustls::ClientConfig>)> {
    let provider = transport::tls::provider();
    let any = Arc::new(AnyCertificate {
        algorithms: provider.signature_verification_algorithms,
    });
    // The pinned configs carry the attacker's certificate and key; only the
    // pin is swapped for a verifier that takes anyone.
    let pinned = attacker.pipe_server_config(attacker.fingerprint())?;
    let server = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(any.clone())
        .with_cert_resolver(pinned.cert_resolver.clone());
    let mut client = (*attacker.pipe_client_config(attacker.fingerprint())?).clone();
    client.dangerous().set_certificate_verifier(any);
    Ok((Arc::new(server), Arc::new(client)))
}

/// Shared by every connection through the hostile relay.
struct State {
    upstream: SocketAddr,
    /// Serves the real relay's certificate to peers.
    relay_tls: TlsAcceptor,
    /// Pins the real relay's certificate.
    upstream_tls: TlsConnector,
    attacker: DataIdentity,
    /// Plays the agent towards senders.
    pipe_server: TlsAcceptor,
    /// Plays the sender towards agents.
    pipe_client: TlsConnector,
    mode: Mutex<Mode>,
    from_sender: Arc<Mutex<Vec<u8>>>,
    from_agent: Arc<Mutex<Vec<u8>>>,
    stats: Mutex<HostileStats>,
    log: Mutex<Vec<String>>,
}

impl std::fmt::Debug for State {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("State")
            .field("upstream", &self.upstream)
            .field("attacker", &self.attacker)
            .finish_non_exhaustive()
    }
}

impl State {
    fn count(&self, field: impl FnOnce(&mut HostileStats) -> &mut u64) {
        *field(&mut lock(&self.stats)) += 1;
    }

    fn note(&self, line: String) {
        lock(&self.log).push(line);
    }
}

/// Locks `m`, taking the data of a poisoned mutex as it is: a panicking
/// test thread must not hide what the attacker recorded.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

async fn accept_loop(listener: TcpListener, state: Arc<State>) {
    let mut connections = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((tcp, _)) => {
                    let _ = tcp.set_nodelay(true);
                    let state = state.clone();
                    connections.spawn(async move {
                        if let Err(e) = serve_connection(&state, tcp).await {
                            state.note(e);
                        }
                    });
                }
                Err(e) => {
                    state.note(format!("accept failed: {e}"));
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
        }
    }
}

async fn serve_connection(state: &State, tcp: TcpStream) -> Result<(), String> {
    let mut first = [0u8; 1];
    match timeout(SETUP_TIMEOUT, tcp.peek(&mut first)).await {
        Ok(Ok(1)) if first[0] == TLS_HANDSHAKE => serve_control(state, tcp).await,
        Ok(Ok(1)) => serve_pipe(state, tcp).await,
        _ => Err("a connection closed before saying anything".into()),
    }
}

/// Who a peer really is, from its hello.
#[derive(Clone, Copy, Debug)]
struct Peer {
    agent: bool,
    identity: Fingerprint,
}

async fn serve_control(state: &State, tcp: TcpStream) -> Result<(), String> {
    let peer = state
        .relay_tls
        .accept(tcp)
        .await
        .map_err(|e| format!("control TLS with a peer failed: {e}"))?;
    let up = TcpStream::connect(state.upstream)
        .await
        .map_err(|e| format!("cannot reach the real relay: {e}"))?;
    let _ = up.set_nodelay(true);
    // The pin, not the name, authenticates the relay.
    let name = ServerName::try_from("localhost").map_err(|e| e.to_string())?;
    let up = state
        .upstream_tls
        .connect(name, up)
        .await
        .map_err(|e| format!("control TLS with the real relay failed: {e}"))?;
    state.count(|s| &mut s.control_channels);
    let (mut peer_rd, mut peer_wr) = tokio::io::split(peer);
    let (mut up_rd, mut up_wr) = tokio::io::split(up);
    let attacker = state.attacker.fingerprint();

    let to_relay = async {
        let mut buf = BytesMut::new();
        while let Some(mut msg) = read_message::<Value, _>(&mut peer_rd, &mut buf)
            .await
            .map_err(|e| format!("reading a peer: {e}"))?
        {
            if let Some(peer) = replace_identity(&mut msg, attacker) {
                state.count(|s| &mut s.identities_replaced);
                state.note(format!(
                    "hello from {}: identity {} replaced by {attacker}",
                    if peer.agent { "an agent" } else { "a sender" },
                    peer.identity
                ));
            }
            write_message(&mut up_wr, &msg)
                .await
                .map_err(|e| format!("writing to the real relay: {e}"))?;
        }
        Ok::<_, String>("the peer closed its control channel")
    };

    let to_peer = async {
        let mut buf = BytesMut::new();
        while let Some(msg) = read_message::<Value, _>(&mut up_rd, &mut buf)
            .await
            .map_err(|e| format!("reading the real relay: {e}"))?
        {
            write_message(&mut peer_wr, &msg)
                .await
                .map_err(|e| format!("writing to a peer: {e}"))?;
        }
        Ok::<_, String>("the real relay closed a control channel")
    };

    let ended = tokio::select! {
        r = to_relay => r?,
        r = to_peer => r?,
    };
    state.note(ended.to_string());
    Ok(())
}

/// If `msg` is a peer's `Hello`, puts `attacker` in place of its identity
/// and returns who the peer really is.
fn replace_identity(msg: &mut Value, attacker: Fingerprint) -> Option<Peer> {
    if msg.get("type")? != "hello" {
        return None;
    }
    let identity: Fingerprint = serde_json::from_value(msg.get("identity")?.clone()).ok()?;
    // Agents still say `listener` on the wire.
    let agent = msg.get("role")? == "listener";
    msg["identity"] = Value::String(attacker.to_string());
    Some(Peer { agent, identity })
}

async fn serve_pipe(state: &State, mut tcp: TcpStream) -> Result<(), String> {
    let mut preamble = [0u8; PIPE_PREAMBLE_LEN];
    timeout(SETUP_TIMEOUT, tcp.read_exact(&mut preamble))
        .await
        .map_err(|_| "no pipe preamble in time".to_string())?
        .map_err(|e| format!("reading a pipe preamble: {e}"))?;
    let (ticket, role) = decode_pipe_preamble(&preamble).map_err(|e| e.to_string())?;
    match role {
        PipeRole::Agent => {
            let mut up = dial_pipe(state, &ticket, PipeRole::Agent).await?;
            state.count(|s| &mut s.agent_pipes_passed);
            let _ = tokio::io::copy_bidirectional(&mut tcp, &mut up).await;
            Ok(())
        }
        PipeRole::Sender => intercept_sender_pipe(state, ticket, tcp).await,
    }
}

/// Dials the real relay and introduces the connection with `ticket` and
/// `role`.
async fn dial_pipe(state: &State, ticket: &Ticket, role: PipeRole) -> Result<TcpStream, String> {
    let mut up = TcpStream::connect(state.upstream)
        .await
        .map_err(|e| format!("cannot reach the real relay for a pipe: {e}"))?;
    let _ = up.set_nodelay(true);
    up.write_all(&encode_pipe_preamble(ticket, role))
        .await
        .map_err(|e| format!("writing a pipe preamble: {e}"))?;
    Ok(up)
}

async fn intercept_sender_pipe(
    state: &State,
    ticket: Ticket,
    tcp: TcpStream,
) -> Result<(), String> {
    let sender_leg = match timeout(SETUP_TIMEOUT, state.pipe_server.accept(tcp)).await {
        Ok(Ok(tls)) => tls,
        Ok(Err(e)) => return Err(handshake_failed(state, "sender", e.to_string())),
        Err(_) => return Err(handshake_failed(state, "sender", "timed out".into())),
    };
    state.count(|s| &mut s.pipes_intercepted);
    state.note(format!("intercepted the sender's pipe {ticket:?}"));
    let sender_leg = Recorded::new(sender_leg, state.from_sender.clone());
    let mode = lock(&state.mode).clone();
    match mode {
        Mode::Relay => splice(state, ticket, sender_leg).await,
        Mode::Forge(answer) => {
            forge(state, sender_leg, answer).await;
            Ok(())
        }
    }
}

fn handshake_failed(state: &State, leg: &str, error: String) -> String {
    state.count(|s| &mut s.handshake_failures);
    let line = format!("pipe TLS with the {leg} failed: {error}");
    state.note(line.clone());
    line
}

/// Plays the sender towards the real agent and copies plaintext between the
/// two legs, recording what the agent sends.
async fn splice<S>(state: &State, ticket: Ticket, mut sender_leg: S) -> Result<(), String>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let up = dial_pipe(state, &ticket, PipeRole::Sender).await?;
    let connect = state.pipe_client.connect(pipe_server_name(), up);
    let agent_leg = match timeout(SETUP_TIMEOUT, connect).await {
        Ok(Ok(tls)) => tls,
        Ok(Err(e)) => return Err(handshake_failed(state, "agent", e.to_string())),
        Err(_) => return Err(handshake_failed(state, "agent", "timed out".into())),
    };
    state.count(|s| &mut s.pipes_spliced);
    state.note(format!("spliced into the pipe {ticket:?}"));
    let mut agent_leg = Recorded::new(agent_leg, state.from_agent.clone());
    match tokio::io::copy_bidirectional(&mut sender_leg, &mut agent_leg).await {
        Ok((up, down)) => state.note(format!("spliced pipe closed ({up} bytes up, {down} down)")),
        Err(e) => state.note(format!("spliced pipe ended: {e}")),
    }
    Ok(())
}

/// Plays the agent's multiplexer towards the sender and answers every
/// stream with `answer`.
async fn forge<S>(state: &State, sender_leg: S, answer: Vec<u8>)
where
    S: AsyncRead + AsyncWrite + Send + Unpin + 'static,
{
    let answer = Bytes::from(answer);
    let (_mux, mut incoming) = spawn_session(sender_leg, Side::Server, MuxConfig::default());
    let mut streams = JoinSet::new();
    while let Some(pending) = incoming.next().await {
        state.count(|s| &mut s.streams_forged);
        state.note(format!(
            "forging the answer to stream request {}",
            String::from_utf8_lossy(pending.request())
        ));
        let answer = answer.clone();
        streams.spawn(async move {
            let mut stream = pending.accept(Bytes::new());
            // What the app sends is recorded by the TLS leg underneath.
            let mut sink = Vec::new();
            let _ = timeout(FORGE_READ_TIMEOUT, stream.read_to_end(&mut sink)).await;
            let _ = stream.write_all(&answer).await;
            let _ = stream.shutdown().await;
        });
    }
    // The sender closed the pipe; nothing is left to answer.
    while streams.join_next().await.is_some() {}
}

/// A stream that appends every byte read from it to a shared log.
struct Recorded<S> {
    inner: S,
    log: Arc<Mutex<Vec<u8>>>,
}

impl<S> Recorded<S> {
    fn new(inner: S, log: Arc<Mutex<Vec<u8>>>) -> Self {
        Recorded { inner, log }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Recorded<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let this = &mut *self;
        let polled = Pin::new(&mut this.inner).poll_read(cx, buf);
        if let Poll::Ready(Ok(())) = polled {
            lock(&this.log).extend_from_slice(&buf.filled()[before..]);
        }
        polled
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Recorded<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// Takes any certificate, checking only that the handshake was signed with
/// its key: the attacker wants every pipe, not to know who is at the end.
#[derive(Debug)]
struct AnyCertificate {
    algorithms: WebPkiSupportedAlgorithms,
}

impl ServerCertVerifier for AnyCertificate {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

impl ClientCertVerifier for AnyCertificate {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_hello_has_its_identity_replaced() {
        let real = Fingerprint([1; 32]);
        let attacker = Fingerprint([2; 32]);
        let mut hello = serde_json::json!({
            "type": "hello",
            "version": 1,
            "role": "listener",
            "identity": real.to_string(),
            "label": "onprem",
            "a_field_from_a_newer_peer": "kept",
        });
        let peer = replace_identity(&mut hello, attacker).unwrap();
        assert!(peer.agent);
        assert_eq!(peer.identity, real);
        assert_eq!(hello["identity"], attacker.to_string());
        assert_eq!(hello["a_field_from_a_newer_peer"], "kept");

        let mut ping = serde_json::json!({"type": "ping", "nonce": 3});
        let before = ping.clone();
        assert!(replace_identity(&mut ping, attacker).is_none());
        assert_eq!(ping, before);
    }
}
