//! Serving a pipe: every stream a sender opens is checked, dialed and spliced
//! to its hybrid connection's endpoint.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use proto::control::{
    Fingerprint, RefusalCode, StreamAccept, StreamRefusal, StreamRequest, Ticket,
};
use proto::e2e::{self, ChannelBinding, ProofRole};
use tracing::{Instrument, debug, info, info_span, warn};
use transport::control::RelayAddr;
use transport::metrics::Direction;
use transport::mux::PendingStream;
use transport::tls::DataIdentity;
use transport::{pipe, pump};

use crate::dial::DialError;
use crate::metrics::AgentMetrics;
use crate::shares::{Account, Share, Shares};
use crate::{AgentOptions, PolicyCell, Shared, dial, endpoint_of, lock, record_policy};

/// Most bytes read from the target at once (the buffer is allocated on the
/// first byte the target sends).
const COPY_BUFFER: usize = 256 * 1024;

/// What a pipe task needs.
#[derive(Clone, Debug)]
pub(crate) struct Context {
    pub relay: RelayAddr,
    pub identity: DataIdentity,
    pub shared: Arc<Mutex<Shared>>,
    pub options: AgentOptions,
    /// The on-prem policy in force.
    pub policy: Arc<PolicyCell>,
    /// Streams being served by this agent (all generations).
    pub active: Arc<AtomicUsize>,
    /// Each tenant's share of pipe set-ups and dials.
    pub shares: Arc<Shares>,
    /// What the agent counts.
    pub metrics: Arc<AgentMetrics>,
    /// The other nodes of this channel's relay cluster.
    pub cluster: std::sync::Weak<crate::cluster::Cluster>,
}

/// Counts a stream as active while it lives.
pub(crate) struct Active(Arc<AtomicUsize>);

impl Active {
    pub(crate) fn new(count: &Arc<AtomicUsize>) -> Active {
        count.fetch_add(1, Ordering::Relaxed);
        Active(count.clone())
    }
}

impl Drop for Active {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Meets a sender on `ticket` and serves its streams until the pipe closes.
/// `setup` counts the set-up against its sender's and hybrid connections'
/// shares until the pipe is open.
pub(crate) async fn serve_pipe(ctx: Context, ticket: Ticket, peer: Fingerprint, setup: Share) {
    let span = info_span!("pipe", sender = %peer);
    async move {
        let pipe::Pipe {
            mux: _mux,
            mut incoming,
            binding,
        } = match pipe::connect_as_agent(
            &ctx.relay,
            &ticket,
            &ctx.identity,
            peer,
            ctx.options.mux.clone(),
        )
        .await
        {
            Ok(x) => x,
            Err(e) => {
                warn!(error = %e, "pipe setup failed");
                return;
            }
        };
        drop(setup);
        info!("pipe from sender open");
        let mut flow = 0u64;
        while let Some(pending) = incoming.next().await {
            flow += 1;
            let ctx = ctx.clone();
            tokio::spawn(serve_stream(ctx, peer, binding, pending, flow));
        }
        info!("pipe from sender closed");
    }
    .instrument(span)
    .await
}

fn refuse_counted(
    ctx: &Context,
    hc: &str,
    pending: PendingStream,
    code: RefusalCode,
    message: String,
) {
    ctx.metrics.refused(hc, code.into());
    refuse(pending, code, message);
}

fn refuse(pending: PendingStream, code: RefusalCode, message: String) {
    let body = StreamRefusal { code, message };
    // A struct of an enum and a string always serialises.
    #[allow(clippy::expect_used)]
    let payload = serde_json::to_vec(&body).expect("refusal serialises");
    pending.reject(Bytes::from(payload));
}

async fn serve_stream(
    ctx: Context,
    peer: Fingerprint,
    binding: ChannelBinding,
    pending: PendingStream,
    flow: u64,
) {
    let _active = Active::new(&ctx.active);
    let request: StreamRequest = match serde_json::from_slice(pending.request()) {
        Ok(r) => r,
        Err(e) => {
            warn!(flow, error = %e, "unreadable stream request");
            refuse(
                pending,
                RefusalCode::BadRequest,
                format!("unreadable stream request: {e}"),
            );
            return;
        }
    };
    let hc = request.hc;
    let span = info_span!("stream", %hc, flow);
    async move {
        let (allowed, endpoint, key) = {
            let shared = lock(&ctx.shared);
            let allowed = shared
                .grants
                .get(&(ctx.relay.clone(), peer))
                .is_some_and(|set| set.contains(&hc));
            (
                allowed,
                endpoint_of(&shared, &hc),
                shared.end_to_end.get(&hc).cloned(),
            )
        };
        let Some(endpoint) = endpoint else {
            warn!("stream for a hybrid connection this agent does not serve");
            refuse_counted(
                &ctx,
                hc.as_str(),
                pending,
                RefusalCode::UnknownHc,
                format!("this agent does not serve {hc}"),
            );
            return;
        };
        if !allowed {
            warn!("sender is not allowed on this hybrid connection");
            refuse_counted(
                &ctx,
                hc.as_str(),
                pending,
                RefusalCode::NotAllowed,
                format!("the relay has not granted you {hc}"),
            );
            return;
        }
        // The end-to-end check comes before anything is dialed: a sender
        // (or a relay in the middle) without the key reaches nothing.
        if let Some(key) = &key
            && let Err(e) = e2e::verify(
                key,
                ProofRole::Sender,
                &hc,
                &binding,
                request.proof.as_deref(),
            )
        {
            warn!(error = %e, "stream refused by the end-to-end check");
            refuse_counted(
                &ctx,
                hc.as_str(),
                pending,
                RefusalCode::EndToEnd,
                e.to_string(),
            );
            return;
        }
        // Watch before reading, so a policy replaced in between is still
        // seen as a change by this stream.
        let policy_changes = ctx.policy.changes();
        let policy = ctx.policy.get();
        // A place among the dials in progress of this sender and this
        // hybrid connection, waiting as long as a dial may take.
        let patience = ctx.options.dial_timeout;
        let dialing = match ctx
            .shares
            .take(
                vec![Account::DialsBy(peer), Account::DialsFor(hc.clone())],
                patience,
            )
            .await
        {
            Ok(share) => share,
            Err(full) => {
                let message = format!(
                    "the agent has {} dials in progress for {} already; try again",
                    full.cap(ctx.shares.caps()),
                    match full {
                        Account::DialsBy(_) => "this sender",
                        _ => "this hybrid connection",
                    }
                );
                warn!(%message, "stream refused: too many dials in progress");
                ctx.metrics
                    .refused(hc.as_str(), crate::metrics::StreamRefusedReason::dials);
                refuse(pending, RefusalCode::Refused, message);
                return;
            }
        };
        let dialed = dial::dial(&policy, &hc, &endpoint, ctx.options.dial_timeout).await;
        drop(dialing);
        {
            let mut shared = lock(&ctx.shared);
            if let Some(s) = shared.hcs.get_mut(&hc) {
                s.count_stream(dialed.is_ok());
                match &dialed {
                    Err(DialError::Denied(d)) => record_policy(&hc, s, Some(d.to_string())),
                    Ok(_) if s.endpoint() == Some(&endpoint) => record_policy(&hc, s, None),
                    _ => {}
                }
            }
        }
        let dial::Dialed { tcp: target, addr } = match dialed {
            Ok(t) => t,
            Err(e) => {
                let refusal = e.refusal();
                // A policy refusal was logged once, when it began.
                if matches!(e, DialError::Denied(_)) {
                    debug!(%endpoint, reason = %refusal.message, "stream denied by policy");
                } else {
                    info!(%endpoint, reason = %refusal.message, "dial failed");
                }
                refuse_counted(&ctx, hc.as_str(), pending, refusal.code, refusal.message);
                return;
            }
        };
        debug!(%endpoint, %addr, "dialed");
        let _counted = ctx.metrics.stream_opened(hc.as_str());
        let accept = match &key {
            Some(key) => {
                let body = StreamAccept {
                    proof: Some(e2e::prove(key, ProofRole::Agent, &hc, &binding)),
                };
                // A struct of one hex string always serialises.
                #[allow(clippy::expect_used)]
                Bytes::from(serde_json::to_vec(&body).expect("accept serialises"))
            }
            None => Bytes::new(),
        };
        let metrics = &ctx.metrics;
        let mut stream = metrics.counted(pending.accept(accept), hc.as_str(), Direction::to_target);
        // The stream's chunks go straight to the target's socket; what the
        // target sends goes through one buffer, allocated on its first byte.
        let mut target = pump::Buffered::new(
            metrics.counted(target, hc.as_str(), Direction::from_target),
            COPY_BUFFER,
        );
        let copy = pump::join(&mut stream, &mut target);
        let refused_later =
            crate::refused_later(&ctx.policy, policy_changes, &hc, &endpoint, addr.ip());
        tokio::select! {
            result = copy => match result {
                Ok((down, up)) => debug!(up, down, "stream closed"),
                Err(e) => debug!(error = %e, "stream ended with an error"),
            },
            denial = refused_later => {
                warn!(%denial, "stream cut: the new on-prem policy refuses it");
            }
        }
    }
    .instrument(span)
    .await
}
