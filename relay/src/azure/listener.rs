//! One Azure-protocol listener's control channel, after its upgrade.
//!
//! Relay → listener: `accept` and `request` messages, each one JSON text
//! frame (the clients parse every message they get as JSON), a `request`
//! with a body followed by one binary message with it. Listener → relay:
//! `{"renewToken":{"token":...}}`, `response` messages (a binary message
//! with the body follows one with `"body":true`; at most
//! [`MAX_CONTROL_BODY`], fragments allowed), Pings (answered) and Pongs
//! (ignored). The channel is closed with 1008 when its token
//! expired more than the renewal grace (`relay serve --renew-grace`) ago without a renewal, or when a
//! renewal or a key change leaves it without a valid token, and with 1001
//! when its hybrid connection is deleted.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use fastwebsockets::{Frame, OpCode, Payload, WebSocket, WebSocketError, WebSocketWrite};
use proto::key::Right;
use proto::name::HcName;
use proto::sas::SasError;
use tokio::io::{AsyncRead, AsyncWrite, WriteHalf};
use tokio::sync::{Mutex, broadcast, mpsc};
use tracing::{debug, info, warn};

use super::http::{self, ListenerText, MAX_CONTROL_BODY, ResponseHead};
use crate::hub::Hub;

/// Largest frame a listener may send on its control channel: a `response`
/// or a body of at most 64 KiB.
pub const MAX_CONTROL_MESSAGE: usize = 64 << 10;
/// Close code: the token expired or no longer verifies (policy violation).
pub const CLOSE_POLICY: u16 = 1008;
/// Close code: the hybrid connection was deleted.
pub const CLOSE_GONE: u16 = 1001;

/// A message for the listener: JSON text, and for a `request` with a body
/// the binary message that follows it.
#[derive(Debug, Clone)]
pub struct Outgoing {
    /// The JSON message.
    pub text: String,
    /// The body that follows it, if any.
    pub body: Option<Bytes>,
}

/// A listener's response to one request on its control channel: the head
/// and the whole body, or why it is unusable.
pub type Answer = Result<(ResponseHead, Bytes), String>;

/// A response body being received on the control channel.
#[derive(Debug)]
struct Receiving {
    id: String,
    head: Result<ResponseHead, String>,
    bytes: Vec<u8>,
}

impl Receiving {
    /// Adds a fragment; past [`MAX_CONTROL_BODY`] the response becomes an
    /// error and the rest is not kept.
    fn push(&mut self, fragment: &[u8]) {
        if self.head.is_err() {
            return;
        }
        if self.bytes.len() + fragment.len() > MAX_CONTROL_BODY {
            self.bytes = Vec::new();
            self.head = Err(format!(
                "the listener's response body on its control channel is over {} KiB; a bigger body goes over the request's rendezvous address",
                MAX_CONTROL_BODY >> 10
            ));
            return;
        }
        self.bytes.extend_from_slice(fragment);
    }

    fn finish(self) -> (String, Answer) {
        let Receiving { id, head, bytes } = self;
        (id, head.map(|head| (head, Bytes::from(bytes))))
    }
}

/// Why a control channel ended.
#[derive(Debug)]
enum Stop {
    /// The listener closed it (its Close was answered).
    Closed,
    /// Its connection failed.
    Failed(WebSocketError),
    /// Close with this code and reason.
    Close(u16, String),
}

/// The listener's current token and its expiry (Unix seconds).
#[derive(Debug)]
struct Credential {
    token: String,
    expires: u64,
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

type Writer<S> = Arc<Mutex<WebSocketWrite<WriteHalf<S>>>>;

async fn write<S: AsyncWrite>(writer: &Writer<S>, frame: Frame<'_>) -> Result<(), WebSocketError> {
    let mut writer = writer.lock().await;
    writer.write_frame(frame).await?;
    writer.flush().await
}

/// Writes a message and the body after it, with nothing in between.
async fn write_message<S: AsyncWrite>(
    writer: &Writer<S>,
    message: Outgoing,
) -> Result<(), WebSocketError> {
    let mut writer = writer.lock().await;
    writer
        .write_frame(Frame::text(Payload::Owned(message.text.into_bytes())))
        .await?;
    if let Some(body) = message.body {
        writer
            .write_frame(Frame::binary(Payload::Borrowed(&body)))
            .await?;
    }
    writer.flush().await
}

/// Serves one listener's control channel until it closes, fails or is
/// closed by the relay. `accepts` are the messages to send it; `token`
/// verified and expires at `expires`. Each `response` the listener sends
/// goes to `answered` with its request's id, which says whether a request
/// was waiting for it.
pub async fn serve<S, F>(
    ws: WebSocket<S>,
    mut accepts: mpsc::Receiver<Outgoing>,
    hub: Hub,
    hc: HcName,
    token: String,
    expires: u64,
    answered: F,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send,
    F: Fn(&str, Answer) -> bool + Send,
{
    let (mut read, write_half) = ws.split(tokio::io::split);
    // fastwebsockets refuses a frame of exactly the limit.
    read.set_max_message_size(MAX_CONTROL_MESSAGE + 1);
    let writer: Writer<S> = Arc::new(Mutex::new(write_half));
    let credential = std::sync::Mutex::new(Credential { token, expires });
    let credential = &credential;
    let lock = || credential.lock().unwrap_or_else(|p| p.into_inner());
    let mut events = hub.registry().subscribe();

    let reader = async {
        let mut answer = |frame: Frame<'static>| {
            let writer = writer.clone();
            async move { write(&writer, frame).await }
        };
        let mut receiving: Option<Receiving> = None;
        let deliver = |id: String, answer: Answer| {
            if !answered(&id, answer) {
                debug!(%hc, id, "a response for no waiting request was dropped");
            }
        };
        loop {
            let frame = match read.read_frame(&mut answer).await {
                Ok(frame) => frame,
                Err(e) => return Stop::Failed(e),
            };
            match frame.opcode {
                OpCode::Close => return Stop::Closed,
                OpCode::Binary | OpCode::Continuation => {
                    if let Some(body) = &mut receiving {
                        body.push(&frame.payload);
                        if frame.fin
                            && let Some(body) = receiving.take()
                        {
                            let (id, result) = body.finish();
                            deliver(id, result);
                        }
                    }
                }
                OpCode::Text => {
                    if let Some(body) = receiving.take() {
                        deliver(
                            body.id,
                            Err("the listener sent a message before its response's body".into()),
                        );
                    }
                    if !frame.fin {
                        debug!("ignored a fragmented control message");
                        continue;
                    }
                    match http::classify(&frame.payload) {
                        ListenerText::Response { id, head, body } => {
                            if body {
                                receiving = Some(Receiving {
                                    id,
                                    head,
                                    bytes: Vec::new(),
                                });
                            } else {
                                deliver(id, head.map(|head| (head, Bytes::new())));
                            }
                        }
                        ListenerText::RenewToken(token) => {
                            match hub.check_token(&hc, &token, Right::Listen) {
                                Ok(expires) => {
                                    info!(%hc, expires, "listener renewed its token");
                                    *lock() = Credential { token, expires };
                                }
                                Err(e) => {
                                    warn!(%hc, error = %e, "listener's renewed token refused");
                                    return Stop::Close(
                                        CLOSE_POLICY,
                                        format!("renewToken refused: {e}"),
                                    );
                                }
                            }
                        }
                        ListenerText::Other => {
                            debug!(
                                "ignored a control message that is not a response or renewToken"
                            );
                        }
                    }
                }
                _ => {}
            }
        }
    };

    let sender = async {
        let mut watching = true;
        loop {
            let expires = lock().expires;
            let left = (expires + hub.renew_grace()).saturating_sub(unix_now());
            tokio::select! {
                accept = accepts.recv() => {
                    let Some(accept) = accept else {
                        return Stop::Close(1011, "the relay dropped this listener".into());
                    };
                    if let Err(e) = write_message(&writer, accept).await {
                        return Stop::Failed(e);
                    }
                }
                () = tokio::time::sleep(Duration::from_secs(left)) => {
                    if lock().expires + hub.renew_grace() <= unix_now() {
                        info!(%hc, "listener's token expired without renewal");
                        return Stop::Close(CLOSE_POLICY, "the token expired and was not renewed".into());
                    }
                }
                event = events.recv(), if watching => {
                    let concerns_us = match &event {
                        Ok(change) => change.hc() == Some(&hc),
                        Err(broadcast::error::RecvError::Lagged(_)) => true,
                        Err(broadcast::error::RecvError::Closed) => {
                            watching = false;
                            false
                        }
                    };
                    let token = lock().token.clone();
                    if concerns_us && let Some(stop) = recheck(&hub, &hc, &token) {
                        return stop;
                    }
                }
            }
        }
    };

    let stop = tokio::select! {
        stop = reader => stop,
        stop = sender => stop,
    };
    match stop {
        Stop::Closed => debug!(%hc, "listener closed its control channel"),
        Stop::Failed(e) => debug!(%hc, error = %e, "listener's control channel failed"),
        Stop::Close(code, reason) => {
            let reason: String = reason.chars().take(120).collect();
            let _ = write(&writer, Frame::close(code, reason.as_bytes())).await;
        }
    }
}

/// After a change to `hc` in the registry: why the channel must close, if
/// its token no longer verifies. A token in its grace period after expiry
/// still counts.
fn recheck(hub: &Hub, hc: &HcName, token: &str) -> Option<Stop> {
    if hub.registry().get(hc).is_none() {
        info!(%hc, "hybrid connection deleted: closing its listener");
        return Some(Stop::Close(
            CLOSE_GONE,
            "the hybrid connection was deleted".into(),
        ));
    }
    match hub.check_token(hc, token, Right::Listen) {
        Ok(_) | Err(SasError::Expired { .. }) => None,
        Err(e) => {
            info!(%hc, error = %e, "listener's token no longer verifies: closing it");
            Some(Stop::Close(
                CLOSE_POLICY,
                format!("the token no longer verifies: {e}"),
            ))
        }
    }
}
