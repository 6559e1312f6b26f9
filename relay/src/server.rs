//! The relay's one port: control channels (TLS) and pipes (plain TCP
//! introduced by a ticket) arrive on the same listener and are told apart by
//! their first byte. Inside TLS, the first plaintext byte tells a
//! hybridlink control channel (a message length, starting with `0x00`) from
//! an Azure Relay client's HTTP request (a method's first letter), which
//! goes to [`crate::azure`].

use std::net::SocketAddr;
use std::ops::ControlFlow;
use std::sync::Arc;
use std::time::Duration;

use proto::channel::{HANDSHAKE_TIMEOUT, RelayEvent, RelaySession, Timing};
use proto::control::{self, NODES_ALPN, PIPE_PREAMBLE_LEN, PeerMessage, PipeRole, RelayMessage};
use proto::label::sanitized;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::{Instant, timeout, timeout_at};
use tokio_rustls::LazyConfigAcceptor;
use tracing::{Instrument, debug, info, info_span, warn};
use transport::control::Ended;

use crate::azure::{Azure, serve_http};
use crate::hub::{AgentReport, Hub, Inbox, Outbox, PipeMeeting, SESSION_QUEUE, TICKET_TTL};
use crate::metrics::PipeDirection;
use crate::preauth::{PreAuthGate, PreAuthSlot};

/// At most one log line per this long about connections refused by the
/// unauthenticated caps (with the count since the last one).
const REFUSAL_LOG_INTERVAL: Duration = Duration::from_secs(10);
/// How much of a peer's text (an error that quotes it) a log line carries.
const LOGGED_CHARS: usize = 200;
/// The first byte of a TLS handshake record.
const TLS_HANDSHAKE: u8 = 0x16;

/// Accepts connections on the relay port until the listener fails.
/// Connections past the caps of `gate` are closed at once.
pub async fn accept_loop(
    listener: TcpListener,
    hub: Hub,
    tls: Arc<rustls::ServerConfig>,
    gate: PreAuthGate,
    azure: Azure,
) {
    let acceptor = ControlTls::new(tls);
    let mut refusals = RefusalLog::default();
    loop {
        let (conn, addr) = match listener.accept().await {
            Ok(x) => x,
            Err(e) => {
                // EMFILE and friends: wait a little rather than spin.
                warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let slot = match gate.admit(addr.ip()) {
            Ok(slot) => slot,
            Err(refused) => {
                drop(conn);
                hub.metrics().refused(refused.reason());
                if let Some(unlogged) = refusals.note(std::time::Instant::now()) {
                    warn!(
                        peer = %addr,
                        reason = %refused,
                        also_refused_since_last_line = unlogged,
                        "connection closed before authentication: too many unauthenticated connections"
                    );
                }
                continue;
            }
        };
        let _ = conn.set_nodelay(true);
        let hub = hub.clone();
        let azure = azure.clone();
        let acceptor = acceptor.clone();
        tokio::spawn(async move {
            // The first byte, the TLS handshake and the hello (or a pipe's
            // preamble) must all arrive by this.
            let deadline = Instant::now() + HANDSHAKE_TIMEOUT;
            let mut first = [0u8; 1];
            match timeout_at(deadline, conn.peek(&mut first)).await {
                Ok(Ok(1)) if first[0] == TLS_HANDSHAKE => {
                    let span = info_span!("control", peer = %addr);
                    if let Err(e) = serve_control(conn, addr, hub, azure, acceptor, slot, deadline)
                        .instrument(span.clone())
                        .await
                    {
                        let reason = sanitized(&e, LOGGED_CHARS);
                        span.in_scope(|| info!(%reason, "control channel closed"));
                    }
                }
                Ok(Ok(1)) => {
                    if let Err(e) = serve_pipe(conn, hub, slot, deadline).await {
                        debug!(peer = %addr, reason = %e, "pipe connection refused");
                    }
                }
                _ => debug!(peer = %addr, "connection closed before saying anything"),
            }
        });
    }
}

/// Rate-limits the log line about connections refused by the
/// unauthenticated caps: one line, then silence for
/// [`REFUSAL_LOG_INTERVAL`], then one line with the count left unlogged.
#[derive(Debug, Default)]
struct RefusalLog {
    last: Option<std::time::Instant>,
    unlogged: u64,
}

impl RefusalLog {
    /// A refusal at `now`: whether to write a line, with how many refusals
    /// since the last line went unlogged.
    fn note(&mut self, now: std::time::Instant) -> Option<u64> {
        if self
            .last
            .is_some_and(|last| now < last + REFUSAL_LOG_INTERVAL)
        {
            self.unlogged += 1;
            return None;
        }
        self.last = Some(now);
        Some(std::mem::take(&mut self.unlogged))
    }
}

async fn serve_pipe(
    mut conn: TcpStream,
    hub: Hub,
    slot: PreAuthSlot,
    deadline: Instant,
) -> Result<(), String> {
    let mut preamble = [0u8; PIPE_PREAMBLE_LEN];
    timeout_at(deadline, conn.read_exact(&mut preamble))
        .await
        .map_err(|_| "no preamble in time".to_string())?
        .map_err(|e| e.to_string())?;
    let (ticket, role) = control::decode_pipe_preamble(&preamble).map_err(|e| e.to_string())?;
    let meeting = hub.meet(ticket, role, conn).map_err(|e| e.to_string())?;
    // A ticket the relay handed out: this connection is authenticated.
    drop(slot);
    match meeting {
        PipeMeeting::Handed => Ok(()),
        PipeMeeting::Wait { partner, conn } => {
            let (other, _counted) = match timeout(TICKET_TTL, partner).await {
                Ok(Ok(other)) => other,
                Ok(Err(_)) => return Err("the pipe ticket was abandoned".to_string()),
                Err(_) => {
                    hub.abandon(&ticket);
                    return Err("the other end of the pipe never came".to_string());
                }
            };
            // Byte for byte: the relay never looks inside. Each direction's
            // EOF is passed on as a shutdown, so half-closes survive.
            // `conn` is this end's connection, `other` the other end's.
            let (from_this, from_other) = match role {
                PipeRole::Sender => (
                    PipeDirection::sender_to_agent,
                    PipeDirection::agent_to_sender,
                ),
                PipeRole::Agent => (
                    PipeDirection::agent_to_sender,
                    PipeDirection::sender_to_agent,
                ),
            };
            let copied = crate::splice::splice_bidirectional(
                &conn,
                &other,
                &hub.metrics().pipe_bytes(from_this),
                &hub.metrics().pipe_bytes(from_other),
            )
            .await;
            match copied {
                // `conn` is this end: `a` went from it to the other.
                Ok((a, b)) => debug!(up = a, down = b, "pipe closed"),
                Err(e) => debug!(error = %e, "pipe ended"),
            }
            // Dropping both sockets closes them (on an error, the direction
            // still running ends with them).
            Ok(())
        }
    }
}

/// The relay port's TLS: the same configuration twice, one selecting
/// [`NODES_ALPN`] for the peers that offer it. rustls refuses a client
/// whose ALPN offer misses every protocol the server has, so the id is
/// selected only when offered, after reading the ClientHello.
#[derive(Clone)]
struct ControlTls {
    plain: Arc<rustls::ServerConfig>,
    nodes: Arc<rustls::ServerConfig>,
}

impl ControlTls {
    fn new(plain: Arc<rustls::ServerConfig>) -> ControlTls {
        let mut nodes = (*plain).clone();
        nodes.alpn_protocols = vec![NODES_ALPN.to_vec()];
        ControlTls {
            plain,
            nodes: Arc::new(nodes),
        }
    }

    /// Completes the handshake; whether the peer understands the node list.
    async fn accept(
        &self,
        conn: TcpStream,
    ) -> std::io::Result<(tokio_rustls::server::TlsStream<TcpStream>, bool)> {
        let start = LazyConfigAcceptor::new(rustls::server::Acceptor::default(), conn).await?;
        let nodes = start
            .client_hello()
            .alpn()
            .is_some_and(|mut offered| offered.any(|p| p == NODES_ALPN));
        let config = if nodes { &self.nodes } else { &self.plain };
        let stream = start.into_stream(config.clone()).await?;
        Ok((stream, nodes))
    }
}

/// Tells one peer the node list now and whenever it changes, for as long
/// as it lives (aborted on drop).
struct NodesFeed(tokio::task::JoinHandle<()>);

impl NodesFeed {
    fn start(hub: &Hub, outbox: Outbox) -> NodesFeed {
        let mut nodes = hub.nodes();
        let hub = hub.clone();
        NodesFeed(tokio::spawn(async move {
            loop {
                let list = nodes.borrow_and_update().clone();
                if !list.is_empty() {
                    outbox.send(RelayMessage::Nodes {
                        nodes: list,
                        this_node: hub.this_node(),
                    });
                }
                if nodes.changed().await.is_err() {
                    return;
                }
            }
        }))
    }
}

impl Drop for NodesFeed {
    fn drop(&mut self) {
        self.0.abort();
    }
}

async fn serve_control(
    conn: TcpStream,
    addr: SocketAddr,
    hub: Hub,
    azure: Azure,
    acceptor: ControlTls,
    slot: PreAuthSlot,
    deadline: Instant,
) -> Result<(), String> {
    let (stream, understands_nodes) = timeout_at(deadline, acceptor.accept(conn))
        .await
        .map_err(|_| "no TLS handshake in time".to_string())?
        .map_err(|e| format!("TLS handshake failed: {e}"))?;
    // One byte of buffer: enough to look at the first byte, and reads
    // bigger than that go straight through.
    let mut stream = BufReader::with_capacity(1, stream);
    let first = timeout_at(deadline, stream.fill_buf())
        .await
        .map_err(|_| "nothing said in time after the TLS handshake".to_string())?
        .map_err(|e| e.to_string())?
        .first()
        .copied()
        .ok_or_else(|| "peer closed after the TLS handshake".to_string())?;
    if first.is_ascii_uppercase() {
        let span = info_span!("azure", peer = %addr);
        return serve_http(stream, addr, azure, slot, deadline)
            .instrument(span)
            .await;
    }
    let mut session = RelaySession::new(
        Timing::default(),
        std::time::Instant::now(),
        deadline.into_std(),
    );
    let (outbox, inbox) = Outbox::new(SESSION_QUEUE);
    let Inbox {
        messages: mut rx,
        overflow,
    } = inbox;
    // The hub holds the outbox once the session registers.
    let mut tx = Some(outbox);
    // Counted as unauthenticated until a token verifies.
    let mut unauthenticated = Some(slot);
    let mut registered: Option<Unregister> = None;
    // The node list goes only to a peer that understands it, once a token
    // verified: it names the nodes' addresses.
    let mut feed_to: Option<Outbox> = None;
    let mut _nodes_feed: Option<NodesFeed> = None;
    let served = transport::control::drive(stream, &mut session, &mut rx, |session, event| {
        match event {
            RelayEvent::Hello {
                role,
                identity,
                label,
            } => {
                let Some(tx) = tx.take() else {
                    return ControlFlow::Break(());
                };
                feed_to = understands_nodes.then(|| tx.clone());
                let id = hub.register(role, identity, label.clone(), addr, tx);
                registered = Some(Unregister {
                    hub: hub.clone(),
                    id,
                });
                info!(session = id, ?role, %label, "control channel up");
                if session.welcome(id, std::time::Instant::now()).is_err() {
                    return ControlFlow::Break(());
                }
            }
            RelayEvent::Message(msg) => {
                let Some(id) = registered.as_ref().map(|r| r.id) else {
                    return ControlFlow::Break(());
                };
                match msg {
                    PeerMessage::Attach { hc, token } => hub.attach(id, hc, token, false),
                    PeerMessage::Renew { hc, token } => hub.attach(id, hc, token, true),
                    PeerMessage::PipeRequest { request_id, agent } => {
                        hub.request_pipe(id, request_id, agent)
                    }
                    PeerMessage::Stats {
                        hc,
                        stats,
                        end_to_end,
                        policy_refusal,
                    } => hub.report_stats(
                        id,
                        hc,
                        stats,
                        AgentReport {
                            end_to_end,
                            policy_refusal,
                        },
                    ),
                    PeerMessage::Describe { hc, token } => hub.describe(id, hc, token),
                    // The session answers keep-alives and refuses a second
                    // hello itself.
                    PeerMessage::Hello { .. }
                    | PeerMessage::Ping { .. }
                    | PeerMessage::Pong { .. } => {}
                }
                if unauthenticated.is_some() && hub.has_attachment(id) {
                    session.authenticated();
                    unauthenticated = None;
                    _nodes_feed = feed_to.take().map(|outbox| NodesFeed::start(&hub, outbox));
                }
            }
        }
        ControlFlow::Continue(())
    });
    let ended = tokio::select! {
        ended = served => ended,
        () = overflow.notified() => {
            return Err(format!(
                "closed: more than {SESSION_QUEUE} messages waiting for this session; the peer will reconnect and resync"
            ));
        }
    };
    drop(registered);
    Err(match ended {
        Ended::Eof => "peer closed".to_string(),
        Ended::Commands => "session dropped".to_string(),
        Ended::Stopped => "session ended".to_string(),
        Ended::Io(e) => e.to_string(),
        Ended::Session(e) => e.to_string(),
    })
}

struct Unregister {
    hub: Hub,
    id: u64,
}

impl Drop for Unregister {
    fn drop(&mut self) {
        self.hub.unregister(self.id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refusals_are_logged_once_per_interval_with_the_count_between() {
        let mut log = RefusalLog::default();
        let t0 = std::time::Instant::now();
        assert_eq!(log.note(t0), Some(0));
        for i in 1..=500u64 {
            assert_eq!(log.note(t0 + Duration::from_millis(i)), None);
        }
        assert_eq!(log.note(t0 + REFUSAL_LOG_INTERVAL), Some(500));
        assert_eq!(log.note(t0 + REFUSAL_LOG_INTERVAL), None);
    }
}
