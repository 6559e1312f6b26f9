//! The HTTP request/response mode's I/O: one sender's HTTP request carried
//! to a listener and its response carried back (the messages are in
//! [`super::http`]).
//!
//! The relay reads at most [`MAX_CONTROL_BODY`] of the request body before
//! it picks a listener. A request whose body ended within that, and whose
//! `request` message fits in [`MAX_CONTROL_HEADERS`], goes whole on the
//! listener's control channel; any other goes as an address only, and once
//! the listener opened that address the relay streams the request there.
//! The response comes on the control channel (its body at most 64 KiB) or
//! on a rendezvous; a rendezvous body is streamed to the sender through a
//! small queue, so a slow sender slows the listener down instead of
//! filling the relay's memory.
//!
//! Time limits: the listener's `response` must arrive within the response
//! timeout (60 s, `relay serve --http-response-timeout`) of the request's
//! dispatch, or of the request's end when it went over a rendezvous, else
//! 504; each piece of a body, either way, must move within [`BODY_IDLE`],
//! else the exchange is cut.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use fastwebsockets::{Frame, OpCode, Payload, WebSocket};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::upgrade::Upgraded;
use hyper::{Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tracing::debug;

use super::http::{self, ListenerText, MAX_CONTROL_BODY, ResponseHead};
use super::pump::MAX_FRAME;
use super::{Body, answer};

/// How long a body may stall (no piece from the sender, the listener or
/// taken by the sender) before the exchange is cut: the protocol's body
/// idle limit.
pub const BODY_IDLE: Duration = Duration::from_secs(60);
/// How long a listener's `response` may take by default: the protocol's
/// 60 s, after which the sender gets 504.
pub const RESPONSE_TIMEOUT: Duration = Duration::from_secs(60);
/// Pieces of a streamed response body queued for a slow sender.
const RESPONSE_QUEUE: usize = 4;
/// Largest piece of a streamed response body handed to the sender at once.
const RESPONSE_PIECE: usize = 64 << 10;

/// A rendezvous WebSocket of an HTTP exchange.
pub type Rendezvous = WebSocket<TokioIo<Upgraded>>;

/// The time by which an HTTP connection must have made progress; each step
/// of an exchange moves it on, and the connection is dropped when it
/// passes. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Watchdog {
    base: Instant,
    deadline_ms: Arc<AtomicU64>,
}

impl Watchdog {
    /// A watchdog that fires at `deadline` unless moved on.
    pub fn new(deadline: Instant) -> Watchdog {
        let base = Instant::now();
        let ms = deadline.saturating_duration_since(base).as_millis();
        Watchdog {
            base,
            deadline_ms: Arc::new(AtomicU64::new(u64::try_from(ms).unwrap_or(u64::MAX))),
        }
    }

    /// Moves the deadline to `after` from now, if that is later.
    pub fn extend(&self, after: Duration) {
        let ms = (Instant::now() + after)
            .saturating_duration_since(self.base)
            .as_millis();
        self.deadline_ms
            .fetch_max(u64::try_from(ms).unwrap_or(u64::MAX), Ordering::Relaxed);
    }

    /// The current deadline.
    pub fn deadline(&self) -> Instant {
        self.base + Duration::from_millis(self.deadline_ms.load(Ordering::Relaxed))
    }
}

/// The request body as far as the relay read it before picking a listener.
#[derive(Debug)]
pub enum Prefix {
    /// The whole body (possibly empty), at most [`MAX_CONTROL_BODY`].
    Whole(Bytes),
    /// The start of a bigger body (or one whose length says it is
    /// bigger), and the rest still to read.
    Partial(Bytes, Incoming),
}

impl Prefix {
    /// Whether a body goes with the request.
    pub fn has_body(&self) -> bool {
        !matches!(self, Prefix::Whole(b) if b.is_empty())
    }
}

/// Reads the request body up to [`MAX_CONTROL_BODY`]; one whose
/// `Content-Length` says it is bigger is not read here at all.
pub async fn read_prefix(
    mut body: Incoming,
    content_length: Option<u64>,
    watchdog: &Watchdog,
) -> Result<Prefix, String> {
    let limit = MAX_CONTROL_BODY as u64;
    if content_length.is_some_and(|n| n > limit) {
        return Ok(Prefix::Partial(Bytes::new(), body));
    }
    let mut bytes = BytesMut::new();
    loop {
        if bytes.len() > MAX_CONTROL_BODY {
            return Ok(Prefix::Partial(bytes.freeze(), body));
        }
        match next_data(&mut body, watchdog).await? {
            Some(data) => bytes.extend_from_slice(&data),
            None => return Ok(Prefix::Whole(bytes.freeze())),
        }
    }
}

/// The next piece of the sender's body, `None` at its end; an error if it
/// fails or stalls for [`BODY_IDLE`].
async fn next_data(body: &mut Incoming, watchdog: &Watchdog) -> Result<Option<Bytes>, String> {
    loop {
        let frame = tokio::time::timeout(BODY_IDLE, body.frame())
            .await
            .map_err(|_| format!("the request body stalled for {} s", BODY_IDLE.as_secs()))?;
        watchdog.extend(BODY_IDLE);
        match frame {
            None => return Ok(None),
            Some(Err(e)) => return Err(format!("reading the request body: {e}")),
            Some(Ok(frame)) => {
                if let Ok(data) = frame.into_data() {
                    return Ok(Some(data));
                }
                // Trailers are hop-by-hop here: dropped.
            }
        }
    }
}

/// Writes one frame to a rendezvous, within [`BODY_IDLE`] (a listener
/// that stops reading does not hold the exchange for ever).
async fn write_within(ws: &mut Rendezvous, frame: Frame<'_>) -> Result<(), String> {
    tokio::time::timeout(BODY_IDLE, ws.write_frame(frame))
        .await
        .map_err(|_| "the listener stopped reading the request".to_string())?
        .map_err(|e| format!("writing to the rendezvous: {e}"))
}

/// Sends the whole `request` message and its body over a rendezvous: the
/// body as one binary message, streamed in fragments when it was not all
/// read.
pub async fn send_request(
    ws: &mut Rendezvous,
    message: String,
    prefix: Prefix,
    watchdog: &Watchdog,
) -> Result<(), String> {
    write_within(ws, Frame::text(Payload::Owned(message.into_bytes()))).await?;
    match prefix {
        Prefix::Whole(bytes) if bytes.is_empty() => Ok(()),
        Prefix::Whole(bytes) => write_within(ws, Frame::binary(Payload::Borrowed(&bytes))).await,
        Prefix::Partial(start, mut rest) => {
            let fragment = |opcode, fin, bytes: &[u8]| {
                Frame::new(fin, opcode, None, Payload::Owned(bytes.to_vec()))
            };
            write_within(ws, fragment(OpCode::Binary, false, &start)).await?;
            while let Some(data) = next_data(&mut rest, watchdog).await? {
                write_within(ws, fragment(OpCode::Continuation, false, &data)).await?;
            }
            write_within(ws, fragment(OpCode::Continuation, true, &[])).await
        }
    }
}

/// Reads the `response` for request `id` from a rendezvous.
pub async fn read_response_head(ws: &mut Rendezvous, id: &str) -> Result<ResponseHead, String> {
    loop {
        let frame = ws
            .read_frame()
            .await
            .map_err(|e| format!("the listener's rendezvous failed: {e}"))?;
        match frame.opcode {
            OpCode::Close => {
                return Err("the listener closed the rendezvous before it responded".into());
            }
            OpCode::Text if frame.fin && frame.payload.len() <= http::MAX_RESPONSE_HEAD => {
                match http::classify(&frame.payload) {
                    ListenerText::Response { id: got, head, .. } if got == id => return head,
                    ListenerText::Response { id: got, .. } => {
                        return Err(format!(
                            "the listener answered request {got:?} on the rendezvous of another request"
                        ));
                    }
                    _ => debug!("ignored a rendezvous message that is not a response"),
                }
            }
            _ => debug!(opcode = ?frame.opcode, "ignored a rendezvous frame before the response"),
        }
    }
}

/// A response body fed by a task through a bounded queue; an error in it
/// makes hyper cut the response, so that the sender sees a broken body,
/// never a short one that looks whole.
#[derive(Debug)]
struct QueueBody(mpsc::Receiver<Result<Bytes, std::io::Error>>);

impl hyper::body::Body for QueueBody {
    type Data = Bytes;
    type Error = std::io::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<hyper::body::Frame<Bytes>, Self::Error>>> {
        self.0
            .poll_recv(cx)
            .map(|item| item.map(|result| result.map(hyper::body::Frame::data)))
    }
}

/// The response body that follows a `response` on a rendezvous, streamed:
/// a task reads the listener's binary message frame by frame (each at most
/// [`MAX_FRAME`]) and hands it to the sender in pieces of at most
/// [`RESPONSE_PIECE`], at most [`RESPONSE_QUEUE`] ahead. It closes the
/// rendezvous at the end.
pub fn stream_body(mut ws: Rendezvous, watchdog: Watchdog) -> Body {
    ws.set_max_message_size(MAX_FRAME);
    let (tx, rx) = mpsc::channel(RESPONSE_QUEUE);
    tokio::spawn(async move {
        let outcome: Result<(), String> = async {
            loop {
                let frame = tokio::time::timeout(BODY_IDLE, ws.read_frame())
                    .await
                    .map_err(|_| "the listener's body stalled".to_string())?
                    .map_err(|e| format!("the listener's rendezvous failed: {e}"))?;
                match frame.opcode {
                    OpCode::Binary | OpCode::Continuation => {
                        let fin = frame.fin;
                        let data = Bytes::from(frame.payload.to_vec());
                        // Pieces of a frame share its buffer: the next frame
                        // is read only when all but RESPONSE_QUEUE of them
                        // are gone, so at most two frames are held.
                        for start in (0..data.len()).step_by(RESPONSE_PIECE) {
                            let piece = data.slice(start..data.len().min(start + RESPONSE_PIECE));
                            tokio::time::timeout(BODY_IDLE, tx.send(Ok(piece)))
                                .await
                                .map_err(|_| "the sender stopped reading".to_string())?
                                .map_err(|_| "the sender went away".to_string())?;
                            watchdog.extend(BODY_IDLE);
                        }
                        if fin {
                            return Ok(());
                        }
                    }
                    OpCode::Close => {
                        return Err("the listener closed the rendezvous inside the body".into());
                    }
                    _ => {}
                }
            }
        }
        .await;
        match outcome {
            Ok(()) => {
                let _ = ws.write_frame(Frame::close(1000, b"")).await;
            }
            Err(e) => {
                debug!(error = %e, "response body cut");
                let _ = tx.try_send(Err(std::io::Error::other(e)));
            }
        }
    });
    QueueBody(rx).boxed()
}

/// A body of bytes already there.
pub fn full(bytes: Bytes) -> Body {
    http_body_util::Full::new(bytes)
        .map_err(|never| match never {})
        .boxed()
}

/// The sender's response for a listener's `response` head and its body.
pub fn respond(head: &ResponseHead, via: &str, body: Body) -> Response<Body> {
    let headers = match http::response_headers(head, via) {
        Ok(headers) => headers,
        Err(e) => return answer(502, &e),
    };
    let mut response = Response::new(body);
    *response.status_mut() =
        StatusCode::from_u16(head.status_code).unwrap_or(StatusCode::BAD_GATEWAY);
    *response.headers_mut() = headers;
    let phrase: String = head
        .status_description
        .as_deref()
        .unwrap_or("")
        .chars()
        .filter(|c| *c == ' ' || c.is_ascii_graphic())
        .take(super::request::MAX_STATUS_DESCRIPTION)
        .collect();
    let phrase = phrase.trim();
    if !phrase.is_empty()
        && let Ok(reason) = hyper::ext::ReasonPhrase::try_from(phrase.as_bytes())
    {
        response.extensions_mut().insert(reason);
    }
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_watchdog_only_ever_moves_later() {
        let start = Instant::now();
        let dog = Watchdog::new(start + Duration::from_secs(10));
        let first = dog.deadline();
        assert!(first >= start + Duration::from_secs(9), "{first:?}");
        dog.extend(Duration::from_secs(1));
        assert_eq!(dog.deadline(), first, "an earlier deadline moved it back");
        dog.extend(Duration::from_secs(60));
        assert!(dog.deadline() >= start + Duration::from_secs(59));
        let clone = dog.clone();
        clone.extend(Duration::from_secs(120));
        assert_eq!(
            dog.deadline(),
            clone.deadline(),
            "clones share the deadline"
        );
    }

    #[test]
    fn only_an_empty_whole_body_is_no_body() {
        assert!(!Prefix::Whole(Bytes::new()).has_body());
        assert!(Prefix::Whole(Bytes::from_static(b"x")).has_body());
    }
}
