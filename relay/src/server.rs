//! The relay's one port: control channels (TLS) and pipes (plain TCP
//! introduced by a ticket) arrive on the same listener and are told apart by
//! their first byte.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use proto::control::{self, PIPE_PREAMBLE_LEN, PROTOCOL_VERSION, PeerMessage, RelayMessage};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::time::{Instant, sleep_until, timeout};
use tokio_rustls::TlsAcceptor;
use tracing::{Instrument, debug, info, info_span, warn};

use crate::hub::{AgentReport, Hub, PipeMeeting, SESSION_QUEUE, TICKET_TTL};

/// Keep-alive interval on control channels.
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(5);
/// A control channel silent this long is dead.
const IDLE_TIMEOUT: Duration = Duration::from_secs(15);
/// TLS handshake and hello must be done within this.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// The first byte of a TLS handshake record.
const TLS_HANDSHAKE: u8 = 0x16;

/// Accepts connections on the relay port until the listener fails.
pub async fn accept_loop(listener: TcpListener, hub: Hub, tls: Arc<rustls::ServerConfig>) {
    let acceptor = TlsAcceptor::from(tls);
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
        let _ = conn.set_nodelay(true);
        let hub = hub.clone();
        let acceptor = acceptor.clone();
        tokio::spawn(async move {
            let mut first = [0u8; 1];
            match timeout(HANDSHAKE_TIMEOUT, conn.peek(&mut first)).await {
                Ok(Ok(1)) if first[0] == TLS_HANDSHAKE => {
                    let span = info_span!("control", peer = %addr);
                    if let Err(e) = serve_control(conn, addr, hub, acceptor)
                        .instrument(span.clone())
                        .await
                    {
                        span.in_scope(|| info!(reason = %e, "control channel closed"));
                    }
                }
                Ok(Ok(1)) => {
                    if let Err(e) = serve_pipe(conn, hub).await {
                        debug!(peer = %addr, reason = %e, "pipe connection refused");
                    }
                }
                _ => debug!(peer = %addr, "connection closed before saying anything"),
            }
        });
    }
}

async fn serve_pipe(mut conn: TcpStream, hub: Hub) -> Result<(), String> {
    let mut preamble = [0u8; PIPE_PREAMBLE_LEN];
    timeout(HANDSHAKE_TIMEOUT, conn.read_exact(&mut preamble))
        .await
        .map_err(|_| "no preamble in time".to_string())?
        .map_err(|e| e.to_string())?;
    let (ticket, role) = control::decode_pipe_preamble(&preamble).map_err(|e| e.to_string())?;
    match hub.meet(ticket, role, conn).map_err(|e| e.to_string())? {
        PipeMeeting::Handed => Ok(()),
        PipeMeeting::Wait { partner, conn } => {
            let other = timeout(TICKET_TTL, partner)
                .await
                .map_err(|_| "the other end of the pipe never came".to_string())?
                .map_err(|_| "the pipe ticket was abandoned".to_string())?;
            // Byte for byte: the relay never looks inside. Each direction's
            // EOF is passed on as a shutdown, so half-closes survive.
            let _counted = hub.pipe_guard();
            let m = transport::metrics::metrics();
            m.pipes.inc();
            m.pipes_active.inc();
            // `conn` is this end's connection, `other` the other end's.
            let (from_this, from_other) = match role {
                proto::control::PipeRole::Sender => ("sender_to_agent", "agent_to_sender"),
                _ => ("agent_to_sender", "sender_to_agent"),
            };
            let counter = |reason: &str| {
                m.pipe_bytes
                    .get_or_create(&transport::metrics::ReasonLabel {
                        reason: reason.into(),
                    })
                    .clone()
            };
            let copied = crate::splice::splice_bidirectional(
                &conn,
                &other,
                &counter(from_this),
                &counter(from_other),
            )
            .await;
            m.pipes_active.dec();
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

async fn serve_control(
    conn: TcpStream,
    addr: SocketAddr,
    hub: Hub,
    acceptor: TlsAcceptor,
) -> Result<(), String> {
    let (stream, hello) = timeout(HANDSHAKE_TIMEOUT, async {
        let mut stream = acceptor
            .accept(conn)
            .await
            .map_err(|e| format!("TLS handshake failed: {e}"))?;
        let mut buf = BytesMut::new();
        let hello = transport::control::read_message::<PeerMessage, _>(&mut stream, &mut buf)
            .await
            .map_err(|e| format!("bad hello: {e}"))?;
        Ok::<_, String>((stream, (hello, buf)))
    })
    .await
    .map_err(|_| "no hello in time".to_string())??;
    let (hello, mut buf) = hello;
    let mut stream = stream;
    let Some(PeerMessage::Hello {
        version,
        role,
        identity,
        label,
    }) = hello
    else {
        return Err("first message was not a hello".into());
    };
    if version != PROTOCOL_VERSION {
        let bye = RelayMessage::Bye {
            message: format!(
                "this relay speaks protocol {PROTOCOL_VERSION}, you speak {version}; upgrade the older side"
            ),
        };
        let _ = transport::control::write_message(&mut stream, &bye).await;
        return Err(format!("protocol version {version}"));
    }
    let (tx, mut rx) = mpsc::channel(SESSION_QUEUE);
    let id = hub.register(role, identity, label.clone(), addr, tx);
    let _guard = Unregister {
        hub: hub.clone(),
        id,
    };
    info!(session = id, ?role, %label, "control channel up");
    let (mut reader, mut writer) = tokio::io::split(stream);
    let mut out = BytesMut::new();
    control::encode(&RelayMessage::Welcome { session: id }, &mut out);
    let mut last_heard = Instant::now();
    let mut next_ping = Instant::now() + KEEPALIVE_INTERVAL;
    let mut nonce = 0u64;
    loop {
        if !out.is_empty() {
            writer.write_all(&out).await.map_err(|e| e.to_string())?;
            out.clear();
        }
        tokio::select! {
            read = reader.read_buf(&mut buf) => {
                match read {
                    Ok(0) => return Err("peer closed".into()),
                    Ok(_) => last_heard = Instant::now(),
                    Err(e) => return Err(e.to_string()),
                }
                loop {
                    let msg = match control::decode::<PeerMessage>(&mut buf) {
                        Ok(Some(m)) => m,
                        Ok(None) => break,
                        Err(e) => {
                            control::encode(&RelayMessage::Bye { message: format!("bad message: {e}") }, &mut out);
                            let _ = writer.write_all(&out).await;
                            return Err(format!("bad message: {e}"));
                        }
                    };
                    match msg {
                        PeerMessage::Attach { entity, token } => hub.attach(id, entity, token, false),
                        PeerMessage::Renew { entity, token } => hub.attach(id, entity, token, true),
                        PeerMessage::PipeRequest { request_id, agent } => hub.request_pipe(id, request_id, agent),
                        PeerMessage::Ping { nonce } => control::encode(&RelayMessage::Pong { nonce }, &mut out),
                        PeerMessage::Pong { .. } => {}
                        PeerMessage::Stats { entity, stats, end_to_end, policy_refusal } => {
                            hub.report_stats(id, entity, stats, AgentReport { end_to_end, policy_refusal })
                        }
                        PeerMessage::Describe { entity, token } => hub.describe(id, entity, token),
                        PeerMessage::Hello { .. } => return Err("second hello".into()),
                    }
                }
            }
            msg = rx.recv() => match msg {
                Some(msg) => {
                    control::encode(&msg, &mut out);
                    while let Ok(more) = rx.try_recv() {
                        control::encode(&more, &mut out);
                    }
                }
                None => return Err("session dropped".into()),
            },
            _ = sleep_until(last_heard + IDLE_TIMEOUT) => {
                return Err(format!("peer silent for {IDLE_TIMEOUT:?}"));
            }
            _ = sleep_until(next_ping) => {
                nonce += 1;
                control::encode(&RelayMessage::Ping { nonce }, &mut out);
                next_ping = Instant::now() + KEEPALIVE_INTERVAL;
            }
        }
    }
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
