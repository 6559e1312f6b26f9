//! Serving a pipe: every stream a sender opens is checked, dialed and spliced
//! to its hybrid connection's endpoint.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use proto::control::{Fingerprint, RefusalCode, StreamRefusal, StreamRequest, Ticket};
use tracing::{Instrument, debug, info, info_span, warn};
use transport::control::RelayAddr;
use transport::mux::PendingStream;
use transport::pipe;
use transport::tls::DataIdentity;

use crate::{AgentOptions, Shared, dial, endpoint_of, lock};

/// Copy buffer per direction between a stream and its target.
const COPY_BUFFER: usize = 256 * 1024;

/// What a pipe task needs.
#[derive(Clone, Debug)]
pub(crate) struct Context {
    pub relay: RelayAddr,
    pub identity: DataIdentity,
    pub shared: Arc<Mutex<Shared>>,
    pub options: AgentOptions,
    /// Streams being served by this agent (all generations).
    pub active: Arc<AtomicUsize>,
}

/// Counts a stream as active while it lives.
struct Active(Arc<AtomicUsize>);

impl Active {
    fn new(count: &Arc<AtomicUsize>) -> Active {
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
pub(crate) async fn serve_pipe(ctx: Context, ticket: Ticket, peer: Fingerprint) {
    let span = info_span!("pipe", sender = %peer);
    async move {
        let (_mux, mut incoming) = match pipe::connect_as_agent(
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
        info!("pipe from sender open");
        let mut flow = 0u64;
        while let Some(pending) = incoming.next().await {
            flow += 1;
            let ctx = ctx.clone();
            tokio::spawn(serve_stream(ctx, peer, pending, flow));
        }
        info!("pipe from sender closed");
    }
    .instrument(span)
    .await
}

fn refuse_counted(hc: &str, pending: PendingStream, code: RefusalCode, message: String) {
    let reason = serde_json::to_value(code)
        .ok()
        .and_then(|v| v.as_str().map(str::to_string))
        .unwrap_or_else(|| "other".into());
    transport::metrics::count_refused(hc, &reason);
    refuse(pending, code, message);
}

fn refuse(pending: PendingStream, code: RefusalCode, message: String) {
    let body = StreamRefusal { code, message };
    // A struct of an enum and a string always serialises.
    #[allow(clippy::expect_used)]
    let payload = serde_json::to_vec(&body).expect("refusal serialises");
    pending.reject(Bytes::from(payload));
}

async fn serve_stream(ctx: Context, peer: Fingerprint, pending: PendingStream, flow: u64) {
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
        let (allowed, endpoint) = {
            let shared = lock(&ctx.shared);
            let allowed = shared
                .grants
                .get(&(ctx.relay.clone(), peer))
                .is_some_and(|set| set.contains(&hc));
            (allowed, endpoint_of(&shared, &hc))
        };
        let Some(endpoint) = endpoint else {
            warn!("stream for a hybrid connection this agent does not serve");
            refuse_counted(
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
                hc.as_str(),
                pending,
                RefusalCode::NotAllowed,
                format!("the relay has not granted you {hc}"),
            );
            return;
        }
        let dialed = dial::dial(&endpoint, ctx.options.dial_timeout).await;
        if let Some(s) = lock(&ctx.shared).hcs.get_mut(&hc) {
            s.count_stream(dialed.is_ok());
        }
        let target = match dialed {
            Ok(t) => t,
            Err(refusal) => {
                info!(%endpoint, reason = %refusal.message, "dial failed");
                refuse_counted(hc.as_str(), pending, refusal.code, refusal.message);
                return;
            }
        };
        debug!(%endpoint, "dialed");
        let metrics = transport::metrics::metrics();
        metrics
            .streams_opened
            .get_or_create(&transport::metrics::HcLabel { hc: hc.to_string() })
            .inc();
        let _counted = transport::metrics::ActiveGuard::new(hc.as_str());
        use transport::metrics::{Counted, Direction, bytes_counter};
        let mut stream = Counted::new(
            pending.accept(Bytes::new()),
            bytes_counter(hc.as_str(), Direction::to_target),
        );
        let mut target = Counted::new(target, bytes_counter(hc.as_str(), Direction::from_target));
        match tokio::io::copy_bidirectional_with_sizes(
            &mut stream,
            &mut target,
            COPY_BUFFER,
            COPY_BUFFER,
        )
        .await
        {
            Ok((up, down)) => debug!(up, down, "stream closed"),
            Err(e) => debug!(error = %e, "stream ended with an error"),
        }
    }
    .instrument(span)
    .await
}
