//! One Azure-protocol listener's control channel, after its upgrade.
//!
//! Relay → listener: `accept` messages, each one JSON text frame (the
//! clients parse every message they get as JSON, so nothing else is ever
//! sent). Listener → relay: `{"renewToken":{"token":...}}`, Pings (answered)
//! and Pongs (ignored). The channel is closed with 1008 when its token
//! expired more than the renewal grace (`relay serve --renew-grace`) ago without a renewal, or when a
//! renewal or a key change leaves it without a valid token, and with 1001
//! when its hybrid connection is deleted.

use std::sync::Arc;
use std::time::Duration;

use fastwebsockets::{Frame, OpCode, Payload, WebSocket, WebSocketError, WebSocketWrite};
use proto::key::Right;
use proto::name::HcName;
use proto::sas::SasError;
use serde::Deserialize;
use tokio::io::{AsyncRead, AsyncWrite, WriteHalf};
use tokio::sync::{Mutex, broadcast, mpsc};
use tracing::{debug, info, warn};

use crate::hub::Hub;

/// Largest message a listener may send on its control channel.
pub const MAX_CONTROL_MESSAGE: usize = 64 << 10;
/// Close code: the token expired or no longer verifies (policy violation).
pub const CLOSE_POLICY: u16 = 1008;
/// Close code: the hybrid connection was deleted.
pub const CLOSE_GONE: u16 = 1001;

/// A listener's message to the relay; unknown members are ignored, as the
/// clients ignore those they do not know.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct ListenerMessage {
    renew_token: Option<RenewToken>,
}

#[derive(Debug, Deserialize)]
struct RenewToken {
    token: String,
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

/// Serves one listener's control channel until it closes, fails or is
/// closed by the relay. `accepts` are the JSON texts to send it; `token`
/// verified and expires at `expires`.
pub async fn serve<S>(
    ws: WebSocket<S>,
    mut accepts: mpsc::Receiver<String>,
    hub: Hub,
    hc: HcName,
    token: String,
    expires: u64,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send,
{
    let (mut read, write_half) = ws.split(tokio::io::split);
    read.set_max_message_size(MAX_CONTROL_MESSAGE);
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
        loop {
            let frame = match read.read_frame(&mut answer).await {
                Ok(frame) => frame,
                Err(e) => return Stop::Failed(e),
            };
            match frame.opcode {
                OpCode::Close => return Stop::Closed,
                OpCode::Text if frame.fin => {
                    let Ok(message) = serde_json::from_slice::<ListenerMessage>(&frame.payload)
                    else {
                        debug!("ignored a control message that is not a JSON object");
                        continue;
                    };
                    let Some(renew) = message.renew_token else {
                        continue;
                    };
                    match hub.check_token(&hc, &renew.token, Right::Listen) {
                        Ok(expires) => {
                            info!(%hc, expires, "listener renewed its token");
                            *lock() = Credential {
                                token: renew.token,
                                expires,
                            };
                        }
                        Err(e) => {
                            warn!(%hc, error = %e, "listener's renewed token refused");
                            return Stop::Close(CLOSE_POLICY, format!("renewToken refused: {e}"));
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
                    if let Err(e) = write(&writer, Frame::text(Payload::Owned(accept.into_bytes()))).await {
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
