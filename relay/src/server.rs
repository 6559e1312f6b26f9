//! The relay's one port: control channels (TLS) and pipes (plain TCP
//! introduced by a ticket) arrive on the same listener and are told apart by
//! their first byte.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use proto::control::{
    self, MAX_MESSAGE_LEN, PIPE_PREAMBLE_LEN, PRE_AUTH_MAX_MESSAGE_LEN, PROTOCOL_VERSION,
    PeerMessage, RelayMessage,
};
use proto::label::sanitized;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::time::{Instant, sleep_until, timeout, timeout_at};
use tokio_rustls::TlsAcceptor;
use tracing::{Instrument, debug, info, info_span, warn};

use crate::hub::{AgentReport, Hub, PipeMeeting, SESSION_QUEUE, TICKET_TTL};
use crate::preauth::{PreAuthGate, PreAuthSlot};

/// Keep-alive interval on control channels.
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(5);
/// A control channel silent this long is dead.
const IDLE_TIMEOUT: Duration = Duration::from_secs(15);
/// From accept, the first byte, the TLS handshake and the hello must be done
/// within this (a pipe's preamble too).
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// After the welcome, a control channel must attach to a hybrid connection
/// (present a token that verifies) within this, or it is closed.
pub const ATTACH_TIMEOUT: Duration = Duration::from_secs(10);
/// Tokens (`Attach`, `Renew`, `Describe`) a control channel may present
/// before one attaches; one more closes it. Each refusal is a log line, so
/// a stranger must not be able to send them without end.
pub const MAX_TOKENS_BEFORE_AUTH: u32 = 64;
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
) {
    let acceptor = TlsAcceptor::from(tls);
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
                crate::hub::count_refused(refused.reason());
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
        let acceptor = acceptor.clone();
        tokio::spawn(async move {
            let deadline = Instant::now() + HANDSHAKE_TIMEOUT;
            let mut first = [0u8; 1];
            match timeout_at(deadline, conn.peek(&mut first)).await {
                Ok(Ok(1)) if first[0] == TLS_HANDSHAKE => {
                    let span = info_span!("control", peer = %addr);
                    if let Err(e) = serve_control(conn, addr, hub, acceptor, slot, deadline)
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
    slot: PreAuthSlot,
    deadline: Instant,
) -> Result<(), String> {
    let mut stream = timeout_at(deadline, acceptor.accept(conn))
        .await
        .map_err(|_| "no TLS handshake in time".to_string())?
        .map_err(|e| format!("TLS handshake failed: {e}"))?;
    // Until the peer attaches, its messages are small ones.
    let mut buf = BytesMut::new();
    let hello = timeout_at(
        deadline,
        transport::control::read_message_within::<PeerMessage, _>(
            &mut stream,
            &mut buf,
            PRE_AUTH_MAX_MESSAGE_LEN,
        ),
    )
    .await;
    let hello = match hello {
        Err(_) => return Err("no hello in time".into()),
        Ok(Err(e)) => {
            let message = format!("bad hello: {}", sanitized(&e.to_string(), LOGGED_CHARS));
            let bye = RelayMessage::Bye {
                message: message.clone(),
            };
            let _ = timeout(
                Duration::from_secs(1),
                transport::control::write_message(&mut stream, &bye),
            )
            .await;
            return Err(message);
        }
        Ok(Ok(hello)) => hello,
    };
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
    let attach_deadline = Instant::now() + ATTACH_TIMEOUT;
    // Counted as unauthenticated until a token verifies.
    let mut unauthenticated = Some(slot);
    let mut tokens_tried = 0u32;
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
                    let max_len = if unauthenticated.is_some() { PRE_AUTH_MAX_MESSAGE_LEN } else { MAX_MESSAGE_LEN };
                    let msg = match control::decode_within::<PeerMessage>(&mut buf, max_len) {
                        Ok(Some(m)) => m,
                        Ok(None) => break,
                        Err(e) => {
                            let mut message = format!("bad message: {}", sanitized(&e.to_string(), LOGGED_CHARS));
                            if unauthenticated.is_some() {
                                message.push_str(" (before a hybrid connection is attached)");
                            }
                            control::encode(&RelayMessage::Bye { message: message.clone() }, &mut out);
                            let _ = timeout(Duration::from_secs(1), writer.write_all(&out)).await;
                            return Err(message);
                        }
                    };
                    if unauthenticated.is_some()
                        && matches!(msg, PeerMessage::Attach { .. } | PeerMessage::Renew { .. } | PeerMessage::Describe { .. })
                    {
                        tokens_tried += 1;
                        if tokens_tried > MAX_TOKENS_BEFORE_AUTH {
                            let message = format!(
                                "{MAX_TOKENS_BEFORE_AUTH} tokens presented on this channel and none attached; check the connection strings (`hybridlink hc keys NAME`)"
                            );
                            control::encode(&RelayMessage::Bye { message: message.clone() }, &mut out);
                            let _ = timeout(Duration::from_secs(1), writer.write_all(&out)).await;
                            return Err(message);
                        }
                    }
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
                    if unauthenticated.is_some() && hub.has_attachment(id) {
                        unauthenticated = None;
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
            _ = sleep_until(attach_deadline), if unauthenticated.is_some() => {
                let message = format!(
                    "no hybrid connection attached within {ATTACH_TIMEOUT:?} of hello; attach with a token made from a connection string (`hybridlink hc keys NAME`)"
                );
                control::encode(&RelayMessage::Bye { message: message.clone() }, &mut out);
                let _ = timeout(Duration::from_secs(1), writer.write_all(&out)).await;
                return Err(message);
            }
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
