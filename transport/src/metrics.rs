//! Prometheus metrics of every role, in the text exposition format, served
//! on `--metrics ADDR` at `/metrics`.
//!
//! One process-wide set of counters ([`metrics()`]); each role serves the
//! families it fills ([`Role`]). Byte counters grow as bytes are read
//! ([`Counted`]).

use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};

use axum::Router;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;

/// A hybrid connection.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct HcLabel {
    /// Its name.
    pub hc: String,
}

/// Which way bytes went, seen from the side that counts them.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq, EncodeLabelValue)]
#[allow(non_camel_case_types)]
pub enum Direction {
    /// Towards the on-prem target (app → target).
    to_target,
    /// From the on-prem target (target → app).
    from_target,
}

/// A hybrid connection and a direction.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct HcDirection {
    /// The hybrid connection.
    pub hc: String,
    /// Which way.
    pub direction: Direction,
}

/// A hybrid connection and why something was refused.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct HcReason {
    /// The hybrid connection.
    pub hc: String,
    /// Why (a short word: refused, unreachable, timeout, not_allowed, ...).
    pub reason: String,
}

/// Why a relay session or request was turned away.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabel {
    /// Why.
    pub reason: String,
}

/// What a DNS query got.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct AnswerLabel {
    /// `local`, `forwarded`, `failed` or `rejected`.
    pub answer: String,
}

/// Every counter of the process.
#[derive(Debug, Default)]
pub struct Metrics {
    /// Streams opened to a target (agent) or flows carried (appliance).
    pub streams_opened: Family<HcLabel, Counter>,
    /// Streams or flows refused, by reason.
    pub streams_refused: Family<HcReason, Counter>,
    /// Streams or flows open now.
    pub streams_active: Family<HcLabel, Gauge>,
    /// Bytes of streams or flows, each way.
    pub bytes: Family<HcDirection, Counter>,
    /// Control channel reconnects.
    pub reconnects: Counter,
    /// Tokens renewed.
    pub token_renewals: Counter,
    /// Relay: agents attached per hybrid connection (set at scrape;
    /// exported as `listeners`, the name dashboards know).
    pub agents: Family<HcLabel, Gauge>,
    /// Relay: senders attached per hybrid connection (set at scrape).
    pub senders: Family<HcLabel, Gauge>,
    /// Relay: hybrid connections in the registry (set at scrape).
    pub hybrid_connections: Gauge,
    /// Relay: pipes spliced.
    pub pipes: Counter,
    /// Relay: pipes open now.
    pub pipes_active: Gauge,
    /// Relay: bytes through pipes (sender → agent and back).
    pub pipe_bytes: Family<ReasonLabel, Counter>,
    /// Relay: connections, sessions or attachments refused, by reason
    /// (`unauthorized`, `unknown_hc`, `quota`, `unauthenticated_cap`, ...).
    pub refused: Family<ReasonLabel, Counter>,
    /// Appliance: DNS queries by what they got.
    pub dns_queries: Family<AnswerLabel, Counter>,
}

/// The content type of the Prometheus text format.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// The process's metrics.
pub fn metrics() -> &'static Metrics {
    static METRICS: OnceLock<Metrics> = OnceLock::new();
    METRICS.get_or_init(Metrics::default)
}

/// Which families a process serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// `relay serve`.
    Relay,
    /// `agent run`.
    Agent,
    /// `appliance run`.
    Appliance,
}

impl Role {
    fn prefix(self) -> &'static str {
        match self {
            Role::Relay => "hybridlink_relay",
            Role::Agent => "hybridlink_agent",
            Role::Appliance => "hybridlink_appliance",
        }
    }
}

/// The metrics of `role` in the Prometheus text format.
pub fn render(role: Role) -> String {
    let m = metrics();
    let mut registry = Registry::with_prefix(role.prefix());
    match role {
        Role::Relay => {
            registry.register(
                "hybrid_connections",
                "Hybrid connections in the registry",
                m.hybrid_connections.clone(),
            );
            registry.register(
                "listeners",
                "Agents attached, per hybrid connection",
                m.agents.clone(),
            );
            registry.register(
                "senders",
                "Senders attached, per hybrid connection",
                m.senders.clone(),
            );
            registry.register("pipes", "Pipes spliced", m.pipes.clone());
            registry.register("pipes_active", "Pipes open now", m.pipes_active.clone());
            registry.register(
                "pipe_bytes",
                "Bytes through pipes (reason: sender_to_agent or agent_to_sender)",
                m.pipe_bytes.clone(),
            );
            registry.register(
                "refused",
                "Connections, sessions and attachments refused, by reason",
                m.refused.clone(),
            );
            registry.register(
                "token_renewals",
                "Tokens renewed by peers",
                m.token_renewals.clone(),
            );
        }
        Role::Agent => {
            registry.register(
                "streams_opened",
                "Streams dialed to their target",
                m.streams_opened.clone(),
            );
            registry.register(
                "streams_refused",
                "Streams refused, by reason (dial failures included)",
                m.streams_refused.clone(),
            );
            registry.register(
                "streams_active",
                "Streams open now",
                m.streams_active.clone(),
            );
            registry.register("bytes", "Bytes of streams, each way", m.bytes.clone());
            registry.register(
                "reconnects",
                "Control channel reconnects",
                m.reconnects.clone(),
            );
            registry.register(
                "token_renewals",
                "Listen tokens renewed",
                m.token_renewals.clone(),
            );
        }
        Role::Appliance => {
            registry.register(
                "flows_opened",
                "App connections carried to their target",
                m.streams_opened.clone(),
            );
            registry.register(
                "flows_refused",
                "App connections refused, by reason",
                m.streams_refused.clone(),
            );
            registry.register(
                "flows_active",
                "App connections open now",
                m.streams_active.clone(),
            );
            registry.register(
                "bytes",
                "Bytes of app connections, each way",
                m.bytes.clone(),
            );
            registry.register(
                "dns_queries",
                "DNS queries, by answer",
                m.dns_queries.clone(),
            );
            registry.register(
                "reconnects",
                "Control channel reconnects",
                m.reconnects.clone(),
            );
            registry.register(
                "token_renewals",
                "Send tokens renewed",
                m.token_renewals.clone(),
            );
        }
    }
    let mut out = String::new();
    // Writing into a String cannot fail.
    let _ = prometheus_client::encoding::text::encode(&mut out, &registry);
    out
}

/// Counts a stream of `hc` as active while it lives.
#[derive(Debug)]
pub struct ActiveGuard(HcLabel);

impl ActiveGuard {
    /// One more active stream of `hc`.
    pub fn new(hc: &str) -> ActiveGuard {
        let label = HcLabel { hc: hc.to_string() };
        metrics().streams_active.get_or_create(&label).inc();
        ActiveGuard(label)
    }
}

impl Drop for ActiveGuard {
    fn drop(&mut self) {
        metrics().streams_active.get_or_create(&self.0).dec();
    }
}

/// The byte counter of `hc` in `direction`.
pub fn bytes_counter(hc: &str, direction: Direction) -> Counter {
    metrics()
        .bytes
        .get_or_create(&HcDirection {
            hc: hc.to_string(),
            direction,
        })
        .clone()
}

/// A stream whose reads are counted as they happen (so a connection that
/// ends in an error is counted too).
#[derive(Debug)]
pub struct Counted<T> {
    inner: T,
    read: Counter,
}

impl<T> Counted<T> {
    /// Counts every byte read from `inner` into `read`.
    pub fn new(inner: T, read: Counter) -> Counted<T> {
        Counted { inner, read }
    }
}

impl<T: tokio::io::AsyncRead + Unpin> tokio::io::AsyncRead for Counted<T> {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let polled = std::pin::Pin::new(&mut self.inner).poll_read(cx, buf);
        if let std::task::Poll::Ready(Ok(())) = polled {
            self.read.inc_by((buf.filled().len() - before) as u64);
        }
        polled
    }
}

impl<T: tokio::io::AsyncWrite + Unpin> tokio::io::AsyncWrite for Counted<T> {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

/// Counts a refusal of `hc` for `reason`.
pub fn count_refused(hc: &str, reason: &str) {
    metrics()
        .streams_refused
        .get_or_create(&HcReason {
            hc: hc.to_string(),
            reason: reason.to_string(),
        })
        .inc();
}

/// Serves `GET /metrics` on `addr` with what `render` returns, and a 404
/// that says where the metrics are on every other path or method. Returns
/// the bound address; serving goes on in a task of its own for as long as
/// the runtime runs, past failed accepts (axum waits a second after an
/// error such as `EMFILE`, then accepts again).
///
/// Every answer closes its connection, so a scraper that reads to the end
/// gets the whole text.
pub async fn serve(
    addr: SocketAddr,
    render: impl Fn() -> String + Send + Sync + 'static,
) -> std::io::Result<SocketAddr> {
    let listener = TcpListener::bind(addr).await?;
    let bound = listener.local_addr()?;
    let render = Arc::new(render);
    let scrape = get(move || {
        let render = render.clone();
        async move { (StatusCode::OK, answer_headers(), render()) }
    });
    let router = Router::new()
        .route("/metrics", scrape)
        .method_not_allowed_fallback(not_found)
        .fallback(not_found);
    tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, router).await {
            tracing::error!(error = %e, "metrics server stopped");
        }
    });
    Ok(bound)
}

fn answer_headers() -> [(header::HeaderName, &'static str); 2] {
    [
        (header::CONTENT_TYPE, CONTENT_TYPE),
        (header::CONNECTION, "close"),
    ]
}

async fn not_found() -> impl IntoResponse {
    (
        StatusCode::NOT_FOUND,
        answer_headers(),
        "metrics are at GET /metrics\n",
    )
}

#[cfg(test)]
mod tests {
    use std::io::{Read, Write};

    use super::*;

    /// Sends `request` to `addr` and reads the answer to its end.
    fn ask(addr: SocketAddr, request: &str) -> String {
        let mut conn = std::net::TcpStream::connect(addr).unwrap();
        conn.write_all(request.as_bytes()).unwrap();
        let mut answer = String::new();
        conn.read_to_string(&mut answer).unwrap();
        answer
    }

    fn get(addr: SocketAddr, path: &str) -> String {
        ask(addr, &format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n"))
    }

    #[test]
    fn serves_the_text_at_metrics_a_hint_elsewhere_and_goes_on_serving() {
        let runtime = tokio::runtime::Runtime::new().unwrap();
        let addr = runtime
            .block_on(serve("127.0.0.1:0".parse().unwrap(), || {
                "# TYPE x counter\nx_total 1\n# EOF\n".to_string()
            }))
            .unwrap();

        let scraped = get(addr, "/metrics");
        assert!(scraped.starts_with("HTTP/1.1 200 OK\r\n"), "{scraped}");
        assert!(
            scraped.contains(&format!("content-type: {CONTENT_TYPE}\r\n")),
            "{scraped}"
        );
        assert!(
            scraped.ends_with("\r\n\r\n# TYPE x counter\nx_total 1\n# EOF\n"),
            "{scraped}"
        );
        assert!(get(addr, "/metrics?name=x").starts_with("HTTP/1.1 200 OK\r\n"));

        for answer in [
            get(addr, "/"),
            get(addr, "/metrics/x"),
            ask(
                addr,
                "POST /metrics HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n",
            ),
        ] {
            assert!(answer.starts_with("HTTP/1.1 404 Not Found\r\n"), "{answer}");
            assert!(
                answer.ends_with("\r\n\r\nmetrics are at GET /metrics\n"),
                "{answer}"
            );
        }
        // Neither garbage nor a client that leaves mid-request stops it.
        let garbage = ask(addr, "\x16\x03\x01 not http\r\n\r\n");
        assert!(garbage.starts_with("HTTP/1.1 400"), "{garbage}");
        drop(std::net::TcpStream::connect(addr).unwrap());
        let mut half = std::net::TcpStream::connect(addr).unwrap();
        half.write_all(b"GET /met").unwrap();
        drop(half);
        assert!(get(addr, "/metrics").starts_with("HTTP/1.1 200 OK\r\n"));
    }
}
