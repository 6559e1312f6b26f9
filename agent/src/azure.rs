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
//! - a hybridlink sender offers [`inner::PROTOCOL`]: the rendezvous opens
//!   at once, the preamble is answered with the marker, TLS and the
//!   end-to-end check run inside the WebSocket, and only then does the
//!   agent dial, answering with the target's verdict inside that TLS; the
//!   relay sees none of it;
//! - anyone else (azbridge, an SDK): the rendezvous opens at once, as
//!   azbridge does, and a failed dial closes it; with an end-to-end key,
//!   such senders are refused (403), since they cannot prove it.
//!
//! A plain sender's first message is azbridge's stream preamble or not: a
//! preamble is answered `[1, 0, 0]`; anything else is the stream's first
//! bytes (a `hyco-ws` sender sending raw data).
//!
//! `agent status` says `verified` for a hybrid connection with an
//! end-to-end key, and `relay-sees-payload` without one.

use std::sync::atomic::AtomicUsize;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use fastwebsockets::Frame;
use proto::connection_string::ConnectionString;
use proto::control::RefusalCode;
use proto::key::Key;
use proto::name::{Endpoint, HcName};
use tracing::{Instrument, debug, info, info_span, warn};
use transport::azure::{self, Accept, Client, Ws, inner, preamble};
use transport::metrics::Direction;
use transport::tls::DataIdentity;

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
    /// This agent's certificate for the TLS inside WebSockets.
    pub identity: DataIdentity,
    /// The hybrid connection's end-to-end key, when the string has one.
    pub key: Option<Key>,
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
    match tokio::time::timeout(wait, azure::next_message(ws)).await {
        Ok(Ok(Some(bytes))) => Ok(Some(bytes)),
        Ok(Ok(None) | Err(_)) => Err(()),
        Err(_) => Ok(None),
    }
}

async fn serve_accept(ctx: AzureContext, accept: Accept) {
    let _active = Active::new(&ctx.active);
    // Watch before dialling, so a policy replaced meanwhile still counts.
    let policy_changes = ctx.policy.changes();
    if accept.protocols.iter().any(|p| p == inner::PROTOCOL) {
        serve_hybridlink(ctx, accept, policy_changes).await;
        return;
    }
    if ctx.key.is_some() {
        // The end-to-end promise holds only between hybridlink peers.
        let _ = accept
            .reject(
                403,
                "this hybrid connection has an end-to-end key: only hybridlink senders holding it may open streams",
            )
            .await;
        info!("refused a sender that cannot prove the end-to-end key (not a hybridlink sender)");
        ctx.metrics
            .refused(ctx.hc.as_str(), RefusalCode::EndToEnd.into());
        return;
    }
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
            let reason: String = e.refusal().message.chars().take(100).collect();
            let _ = ws.write_frame(Frame::close(1011, reason.as_bytes())).await;
            return;
        }
    };
    ws.set_max_message_size(16 << 20);
    let addr = target.addr;
    info!(endpoint = %ctx.endpoint, %addr, mode = "plain WebSocket (the relay sees the bytes)", "stream open");
    let (_counted, socket) = opened(&ctx, target.tcp);
    let bridged = async {
        let bridged = azure::bridge::bridge(ws, socket, first).await;
        Some(bridged.to_socket)
    };
    until_refused(&ctx, addr, policy_changes, bridged).await;
}

/// A hybridlink sender: the preamble answered with the marker, TLS and
/// the end-to-end check inside the WebSocket, then the dial, then the
/// verdict: the sender learns the target's answer, and the relay sees
/// neither it nor a byte of the stream.
async fn serve_hybridlink(
    ctx: AzureContext,
    accept: Accept,
    policy_changes: tokio::sync::watch::Receiver<u64>,
) {
    let mut ws = match accept.open(Some(inner::PROTOCOL)).await {
        Ok(ws) => ws,
        Err(e) => {
            warn!(error = %e, "opening the rendezvous failed");
            return;
        }
    };
    match first_message(&mut ws, azure::HANDSHAKE_TIMEOUT).await {
        Ok(Some(m)) if preamble::parse(&m).is_some_and(|p| p.mode == preamble::MODE_STREAM) => {}
        _ => {
            debug!("the sender sent no stream preamble");
            return;
        }
    }
    if answer(&mut ws, &inner::marked_answer()).await.is_err() {
        return;
    }
    let key = ctx.key.as_ref();
    let (mut tls, binding) = match inner::accept_as_agent(ws, &ctx.identity, &ctx.hc, key).await {
        Ok(x) => x,
        Err(e) => {
            warn!(error = %e, "stream refused before dialling");
            ctx.metrics
                .refused(ctx.hc.as_str(), RefusalCode::EndToEnd.into());
            return;
        }
    };
    let target = match dial(&ctx).await {
        Ok(target) => target,
        Err(e) => {
            let _ = inner::answer(&mut tls, &binding, &ctx.hc, key, Some(e.refusal())).await;
            return;
        }
    };
    if let Err(e) = inner::answer(&mut tls, &binding, &ctx.hc, key, None).await {
        debug!(error = %e, "the sender went away");
        return;
    }
    let addr = target.addr;
    info!(
        endpoint = %ctx.endpoint,
        %addr,
        mode = if key.is_some() { "TLS inside the WebSocket, end-to-end verified" } else { "TLS inside the WebSocket, relay-trusted" },
        "stream open"
    );
    let (_counted, mut target) = opened(&ctx, target.tcp);
    let copied = async {
        let copied = tokio::io::copy_bidirectional(&mut tls, &mut target).await;
        copied.ok().map(|(to_target, _)| to_target)
    };
    until_refused(&ctx, addr, policy_changes, copied).await;
}

/// Counts a stream as open until the guard drops, and the bytes read from
/// its target.
fn opened(
    ctx: &AzureContext,
    target: tokio::net::TcpStream,
) -> (
    transport::metrics::ActiveGuard,
    transport::metrics::Counted<tokio::net::TcpStream>,
) {
    let guard = ctx.metrics.stream_opened(ctx.hc.as_str());
    let counted = ctx
        .metrics
        .counted(target, ctx.hc.as_str(), Direction::from_target);
    (guard, counted)
}

/// Runs `stream` (which ends with the bytes it sent to the target, when it
/// knows them) until it ends, or until a replaced policy refuses its
/// endpoint or the address `addr` it reached.
async fn until_refused<F>(
    ctx: &AzureContext,
    addr: std::net::SocketAddr,
    changes: tokio::sync::watch::Receiver<u64>,
    stream: F,
) where
    F: std::future::Future<Output = Option<u64>>,
{
    let refused_later =
        crate::refused_later(&ctx.policy, changes, &ctx.hc, &ctx.endpoint, addr.ip());
    tokio::select! {
        sent = stream => {
            if let Some(n) = sent {
                ctx.metrics.add_bytes(ctx.hc.as_str(), Direction::to_target, n);
            }
            debug!("stream closed");
        }
        denial = refused_later => warn!(%denial, "stream cut: the new on-prem policy refuses it"),
    }
}

/// Sends a preamble answer as one binary message.
async fn answer(ws: &mut Ws, bytes: &[u8]) -> Result<(), fastwebsockets::WebSocketError> {
    ws.write_frame(Frame::binary(fastwebsockets::Payload::Borrowed(bytes)))
        .await
}
