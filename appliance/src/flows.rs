//! Serving the app's TCP flows: each SYN from the tun is matched to a
//! hybrid connection, a stream is opened through the relay (the agent dials
//! the target before it answers), and only then is the SYN answered. A
//! refused or unreachable target reaches the app as a refused connection.

use std::io;
use std::net::Ipv4Addr;
use std::pin::Pin;
use std::sync::{Arc, RwLock};
use std::task::{Context, Poll};
use std::time::Duration;

use netstack::{IncomingFlow, IncomingFlows, TcpFlow};
use tokio::io::AsyncWrite;
use tracing::{Instrument, debug, info, info_span, warn};
use transport::metrics::Direction;
use transport::pump::{Lend, Lent, Take};

use crate::metrics::{ApplianceMetrics, FlowRefusedReason};
use crate::table::FlowTable;
use crate::upstream::{Upstream, Upstreams};

/// How long a SYN may wait for the agent's answer. The netstack refuses
/// undecided flows after its own decision timeout anyway.
const OPEN_TIMEOUT: Duration = Duration::from_secs(8);

/// Where new flows go: the hybrid connection of each destination and the
/// relay client that opens their streams. The flow loop consults it for
/// every new flow; it is updated when the relay announces new endpoints,
/// and its sender is replaced on reload.
#[derive(Debug)]
pub struct Dispatch {
    /// Destination → hybrid connection.
    pub table: FlowTable,
    /// Virtual address → host name.
    pub names: std::collections::HashMap<Ipv4Addr, String>,
    /// The relay clients new flows go through. A reload with new connection
    /// strings puts new ones here; flows already open keep the old ones.
    pub upstreams: Upstreams,
}

/// Accepts flows until the netstack stops, counting them in `metrics`.
pub async fn serve(
    mut flows: IncomingFlows,
    dispatch: Arc<RwLock<Dispatch>>,
    metrics: Arc<ApplianceMetrics>,
) {
    let mut next_id = 0u64;
    while let Some(flow) = flows.next().await {
        next_id += 1;
        let found = {
            // A poisoned lock only means a reload panicked; the last table
            // is still the best we have.
            let d = dispatch.read().unwrap_or_else(|p| p.into_inner());
            let hc = d
                .table
                .lookup(flow.dst(), |ip| d.names.get(&ip).cloned())
                .cloned();
            hc.map(|hc| (hc, d.upstreams.clone()))
        };
        let Some((hc, upstreams)) = found else {
            debug!(src = %flow.src(), dst = %flow.dst(), "no hybrid connection for this address and port; refused");
            metrics.refused("", FlowRefusedReason::no_hybrid_connection);
            flow.refuse();
            continue;
        };
        let span = info_span!("flow", %hc, id = next_id, src = %flow.src(), dst = %flow.dst());
        let metrics = metrics.clone();
        tokio::spawn(
            async move {
                serve_flow(flow, upstreams, hc, &metrics).await;
            }
            .instrument(span),
        );
    }
}

async fn serve_flow(
    flow: IncomingFlow,
    upstreams: Upstreams,
    hc: proto::name::HcName,
    metrics: &ApplianceMetrics,
) {
    let opened = tokio::time::timeout(OPEN_TIMEOUT, upstreams.open(&hc)).await;
    let stream = match opened {
        Ok(Ok(stream)) => stream,
        Ok(Err(e)) => {
            info!(reason = %e, "refusing the app's connection");
            metrics.refused(hc.as_str(), FlowRefusedReason::refused);
            flow.refuse();
            return;
        }
        Err(_) => {
            warn!("no answer from the agent in time; refusing the app's connection");
            metrics.refused(hc.as_str(), FlowRefusedReason::timeout);
            flow.refuse();
            return;
        }
    };
    let _counted = metrics.flow_opened(hc.as_str());
    let app = match flow.accept().await {
        Ok(app) => app,
        Err(e) => {
            debug!(error = %e, "app went away before the handshake finished");
            return;
        }
    };
    match stream {
        Upstream::Native(stream) => {
            // The flow's received bytes go straight into the stream's frames
            // and the stream's chunks straight into the flow.
            let mut app = metrics.counted(AppFlow(app), hc.as_str(), Direction::to_target);
            let mut stream = metrics.counted(stream, hc.as_str(), Direction::from_target);
            match transport::pump::join(&mut stream, &mut app).await {
                Ok((up, down)) => debug!(up, down, "flow closed"),
                Err(e) => debug!(error = %e, "flow ended with an error"),
            }
        }
        Upstream::Azure(stream) => {
            let mut app = metrics.counted(app, hc.as_str(), Direction::to_target);
            let (down, up) = stream.join(&mut app).await;
            metrics.add_bytes(hc.as_str(), Direction::from_target, down);
            debug!(up, down, "flow closed");
        }
    }
}

/// The app's flow as a [`Lend`] source: it offers its receive buffer to the
/// stream, which copies the bytes straight into its frames.
#[derive(Debug)]
struct AppFlow(TcpFlow);

impl Lend for AppFlow {
    fn poll_lend(&mut self, cx: &mut Context<'_>, take: &mut Take<'_>) -> Poll<io::Result<Lent>> {
        self.0
            .poll_lend(cx, take)
            .map_ok(|taken| taken.map_or(Lent::End, Lent::Took))
    }
}

impl AsyncWrite for AppFlow {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.0).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_shutdown(cx)
    }
}
