//! What every role's Prometheus metrics are made of, and the server that
//! exposes them on `--metrics ADDR` at `GET /metrics`.
//!
//! Each role owns its metrics, made when it starts and handed (as an `Arc`)
//! to what counts: `relay::metrics::RelayMetrics`,
//! `agent::metrics::AgentMetrics`, `appliance::metrics::ApplianceMetrics`.
//! This module holds what they share: the label sets of hybrid connections
//! and directions, the control channel's counters ([`ControlCounters`], also
//! given to a [`Sender`](crate::sender::Sender)), a gauge held while a
//! stream lives ([`ActiveGuard`]), byte counters that grow as bytes are read
//! ([`Counted`]), and [`serve`].
//!
//! Label values are enums deriving `EncodeLabelValue`, which writes a
//! variant's name as it is: the variants are spelled as the exported values
//! (hence `non_camel_case_types`), so a typo cannot make a new series.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::Router;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;

/// The content type of the Prometheus text format.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// A hybrid connection.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct HcLabel {
    /// Its name.
    pub hc: String,
}

impl HcLabel {
    /// The label of `hc`.
    pub fn new(hc: &str) -> HcLabel {
        HcLabel { hc: hc.to_string() }
    }
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

/// What a peer's control channel counts: reconnects and renewed tokens.
/// Clones count into the same counters, so a role hands one to each control
/// channel (or [`Sender`](crate::sender::Sender)) it starts and registers
/// it once.
#[derive(Clone, Debug, Default)]
pub struct ControlCounters {
    /// Times the control channel was lost (each is followed by a reconnect).
    pub reconnects: Counter,
    /// Tokens the relay accepted as renewals.
    pub token_renewals: Counter,
}

/// Holds a gauge one higher while it lives: a stream counted as active.
#[derive(Debug)]
pub struct ActiveGuard(Gauge);

impl ActiveGuard {
    /// Adds one to `gauge` until the guard drops.
    pub fn new(gauge: Gauge) -> ActiveGuard {
        gauge.inc();
        ActiveGuard(gauge)
    }
}

impl Drop for ActiveGuard {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// `registry` in the Prometheus text format.
pub fn encode(registry: &Registry) -> String {
    let mut out = String::new();
    // Writing into a String cannot fail.
    let _ = prometheus_client::encoding::text::encode(&mut out, registry);
    out
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

    /// The wrapped stream, for readers that count through [`Self::count`].
    pub fn inner_mut(&mut self) -> &mut T {
        &mut self.inner
    }

    /// Counts `n` bytes read from the wrapped stream by other means than
    /// `poll_read`.
    pub fn count(&self, n: usize) {
        self.read.inc_by(n as u64);
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
