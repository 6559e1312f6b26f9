//! The agent as a listener of Azure Relay's Hybrid Connections protocol,
//! for listen strings without `CertificateSha256`: an Azure Relay
//! namespace, or a hybridlink relay's Azure front door with a CA-issued
//! certificate (or its own given as `--ca-file`).
//!
//! Such a namespace knows no endpoint, so the agent's configuration names
//! it (`agent run --endpoint`), and the on-prem policy is checked exactly
//! as for a native hybrid connection, again whenever it changes.
//!
//! Each sender's `accept` becomes one stream:
//! - a hybridlink sender offers [`azure::FAITHFUL`]: the agent dials
//!   first and opens the rendezvous only when the target answered, or
//!   rejects the sender with the reason (403 policy, 502 refused, 504
//!   unreachable), so the application sees the target's own answer;
//! - anyone else (azbridge, an SDK): the rendezvous opens at once, as
//!   azbridge does, and a failed dial closes it.
//!
//! A sender's first message is azbridge's stream preamble or not: a
//! preamble is answered `[1, 0, 0]`; anything else is the stream's first
//! bytes (a `hyco-ws` sender sending raw data).
//!
//! The relay of this path sees the bytes; `agent status` says so.

use std::sync::atomic::AtomicUsize;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use fastwebsockets::{Frame, OpCode};
use proto::connection_string::ConnectionString;
use proto::name::{Endpoint, HcName};
use tracing::{Instrument, debug, info, info_span, warn};
use transport::azure::{self, Accept, Client, Ws, preamble};
use transport::metrics::Direction;

use crate::dial::{self, DialError};
use crate::metrics::AgentMetrics;
use crate::serve::Active;
use crate::{PolicyCell, Shared, lock, record_policy};

/// How long a sender that was accepted at once has to send its first
/// message before the stream is taken to be raw and server-first.
pub const FIRST_MESSAGE_WAIT: Duration = Duration::from_secs(2);

/// What one hybrid connection served over the Azure protocol needs.
#[derive(Debug, Clone)]
pub(crate) struct AzureContext {
    pub hc: HcName,
    pub endpoint: Endpoint,
    pub shared: Arc<Mutex<Shared>>,
    pub policy: Arc<PolicyCell>,
    pub active: Arc<AtomicUsize>,
    pub metrics: Arc<AgentMetrics>,
    pub dial_timeout: Duration,
}

/// Serves `cs` over the Azure protocol until the task is aborted.
pub(crate) async fn run(ctx: AzureContext, client: Client, cs: ConnectionString) {
    let accepts = {
        let ctx = ctx.clone();
        move |accept: Accept| {
            let ctx = ctx.clone();
            let span = info_span!("azure stream", hc = %ctx.hc, id = %accept.id);
            tokio::spawn(serve_accept(ctx, accept).instrument(span));
        }
    };
    let states = {
        let ctx = ctx.clone();
        move |state: Option<String>| {
            let mut shared = lock(&ctx.shared);
            if let Some(s) = shared.hcs.get_mut(&ctx.hc) {
                match state {
                    None => s.connected(ctx.endpoint.clone()),
                    Some(reason) => s.reconnecting(&reason),
                }
            }
        }
    };
    azure::listen(client, cs, accepts, states).await;
}

/// Dials the endpoint within the policy in force, counting the answer.
async fn dial(ctx: &AzureContext) -> Result<dial::Dialed, DialError> {
    let policy = ctx.policy.get();
    let dialed = dial::dial(&policy, &ctx.hc, &ctx.endpoint, ctx.dial_timeout).await;
    let mut shared = lock(&ctx.shared);
    if let Some(s) = shared.hcs.get_mut(&ctx.hc) {
        s.count_stream(dialed.is_ok());
        match &dialed {
            Err(DialError::Denied(d)) => record_policy(&ctx.hc, s, Some(d.to_string())),
            Ok(_) => record_policy(&ctx.hc, s, None),
            Err(DialError::Failed(_)) => {}
        }
    }
    if let Err(e) = &dialed {
        let refusal = e.refusal();
        info!(endpoint = %ctx.endpoint, reason = %refusal.message, "stream refused");
        ctx.metrics.refused(ctx.hc.as_str(), refusal.code.into());
    }
    dialed
}

/// The first message of `ws`, if one comes within `wait`: its bytes, or
/// `Err` when the WebSocket ended first.
async fn first_message(ws: &mut Ws, wait: Duration) -> Result<Option<Vec<u8>>, ()> {
    let read = async {
        loop {
            let frame = ws.read_frame().await.map_err(|_| ())?;
            match frame.opcode {
                OpCode::Binary | OpCode::Text | OpCode::Continuation => {
                    return Ok(frame.payload.to_vec());
                }
                OpCode::Close => return Err(()),
                OpCode::Ping | OpCode::Pong => {}
            }
        }
    };
    match tokio::time::timeout(wait, read).await {
        Ok(Ok(bytes)) => Ok(Some(bytes)),
        Ok(Err(())) => Err(()),
        Err(_) => Ok(None),
    }
}

async fn serve_accept(ctx: AzureContext, accept: Accept) {
    let _active = Active::new(&ctx.active);
    let faithful = accept.protocols.iter().any(|p| p == azure::FAITHFUL);
    // Watch before dialling, so a policy replaced meanwhile still counts.
    let policy_changes = ctx.policy.changes();
    let (mut ws, target, first) = if faithful {
        let target = match dial(&ctx).await {
            Ok(target) => target,
            Err(e) => {
                let refusal = e.refusal();
                let status = azure::refusal_status(refusal.code);
                if let Err(e) = accept.reject(status, &refusal.message).await {
                    debug!(error = %e, "rejecting the sender failed");
                }
                return;
            }
        };
        let mut ws = match accept.open(Some(azure::FAITHFUL)).await {
            Ok(ws) => ws,
            Err(e) => {
                warn!(error = %e, "opening the rendezvous failed");
                return;
            }
        };
        // A hybridlink sender always sends the preamble first.
        match first_message(&mut ws, azure::HANDSHAKE_TIMEOUT).await {
            Ok(Some(m)) if preamble::parse(&m).is_some_and(|p| p.mode == preamble::MODE_STREAM) => {
            }
            _ => {
                debug!("the sender sent no stream preamble");
                return;
            }
        }
        if answer(&mut ws, &preamble::ACCEPTED).await.is_err() {
            return;
        }
        (ws, target, None)
    } else {
        let protocol = accept.protocols.first().map(String::as_str);
        let mut ws = match accept.open(protocol).await {
            Ok(ws) => ws,
            Err(e) => {
                warn!(error = %e, "opening the rendezvous failed");
                return;
            }
        };
        let first = match first_message(&mut ws, FIRST_MESSAGE_WAIT).await {
            Ok(first) => first,
            Err(()) => return,
        };
        let first = match first.as_deref().map(|m| (m, preamble::parse(m))) {
            Some((_, Some(p))) if p.mode != preamble::MODE_STREAM => {
                let _ = answer(&mut ws, &preamble::WRONG_MODE).await;
                info!(
                    mode = p.mode,
                    "refused an azbridge datagram stream: this agent serves TCP"
                );
                return;
            }
            Some((_, Some(p))) => {
                debug!(port_name = %p.port_name, "azbridge stream preamble");
                if answer(&mut ws, &preamble::ACCEPTED).await.is_err() {
                    return;
                }
                None
            }
            Some((m, None)) => Some(m.to_vec()),
            None => None,
        };
        let target = match dial(&ctx).await {
            Ok(target) => target,
            Err(e) => {
                let reason = e.refusal().message;
                let reason: String = reason.chars().take(100).collect();
                let _ = ws.write_frame(Frame::close(1011, reason.as_bytes())).await;
                return;
            }
        };
        (ws, target, first)
    };
    ws.set_max_message_size(16 << 20);
    let addr = target.addr;
    debug!(endpoint = %ctx.endpoint, %addr, faithful, "stream open");
    let _counted = ctx.metrics.stream_opened(ctx.hc.as_str());
    let socket = ctx
        .metrics
        .counted(target.tcp, ctx.hc.as_str(), Direction::from_target);
    let bridged = azure::bridge::bridge(ws, socket, first);
    let refused_later = crate::refused_later(
        &ctx.policy,
        policy_changes,
        &ctx.hc,
        &ctx.endpoint,
        addr.ip(),
    );
    tokio::select! {
        bridged = bridged => {
            ctx.metrics.add_bytes(ctx.hc.as_str(), Direction::to_target, bridged.to_socket);
            debug!(to_target = bridged.to_socket, from_target = bridged.from_socket, "stream closed");
        }
        denial = refused_later => warn!(%denial, "stream cut: the new on-prem policy refuses it"),
    }
}

/// Sends a preamble answer as one binary message.
async fn answer(ws: &mut Ws, bytes: &[u8]) -> Result<(), fastwebsockets::WebSocketError> {
    ws.write_frame(Frame::binary(fastwebsockets::Payload::Borrowed(bytes)))
        .await
}
