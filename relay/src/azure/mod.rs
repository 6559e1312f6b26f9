//! Azure Relay's Hybrid Connections protocol, WebSocket mode, on the
//! relay's one port: so that existing Azure Relay clients (`hyco-ws`,
//! `Microsoft.Azure.Relay`, azbridge) work against this relay unchanged.
//!
//! After the TLS handshake, a connection whose first byte is an ASCII
//! letter is HTTP (a hybridlink control message starts with `0x00`);
//! [`serve_http`] gives it to a hyper HTTP/1 server connection with
//! upgrades. Its requests ([`request`]) open a listener's control channel
//! ([`listener`]), bring a sender, or open the rendezvous of an `accept`;
//! the relay then relays WebSocket frames between the sender and the
//! listener ([`pump`]).
//!
//! Unlike a hybridlink pipe, the relay terminates these WebSockets and sees
//! their payload, as Azure's service does. So an Azure-protocol sender
//! reaches only Azure-protocol listeners ([`listeners`] is separate from
//! the hub's agents), and hybridlink senders only hybridlink agents.

#[doc(hidden)]
pub mod fuzzing;
pub mod listener;
pub mod listeners;
pub mod penalty;
pub mod pump;
pub mod request;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use fastwebsockets::upgrade::{UpgradeFut, is_upgrade_request, upgrade};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{HOST, HeaderValue, SEC_WEBSOCKET_PROTOCOL};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use proto::key::Right;
use proto::sas::SasError;
use ring::rand::{SecureRandom, SystemRandom};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;
use tracing::{Instrument, debug, info, info_span, warn};

use crate::hub::Hub;
use crate::metrics::RefusedReason;
use crate::preauth::PreAuthSlot;
use listeners::{ListenerId, Listeners, RENDEZVOUS_TTL};
use penalty::Penalties;
use request::{AcceptAddress, Action, HcRequest};

/// Most bytes of a request head the relay buffers (hyper's smallest
/// buffer); a bigger head is refused.
pub const MAX_HEAD: usize = 8 << 10;
/// Most header fields in a request head.
pub const MAX_HEADERS: usize = 64;
/// `accept` messages that may wait for one listener's control channel;
/// past that the listener is skipped as busy.
pub const LISTENER_QUEUE: usize = 256;

type Body = Full<Bytes>;

/// What a waiting sender is told by the listener's rendezvous.
#[derive(Debug)]
enum Answer {
    /// The listener opened the rendezvous: its upgrade, and the
    /// sub-protocol it chose.
    Accepted {
        protocol: Option<HeaderValue>,
        listener: UpgradeFut,
    },
    /// The listener refused with this status and description.
    Rejected { status: u16, description: String },
}

/// How an `accept` reaches one listener.
#[derive(Debug, Clone)]
struct ListenerHandle {
    accepts: mpsc::Sender<String>,
    /// The host the listener dialled, for the `accept`'s address.
    host: Arc<str>,
    /// Where it connected from and when, for status.
    view: AzureListenerView,
}

/// An Azure-protocol listener as status shows it: beside the agents of its
/// hybrid connection, marked as the other kind, whose traffic the relay
/// sees (it terminates the client's TLS and relays WebSocket messages).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct AzureListenerView {
    /// Always `azure-protocol`.
    pub kind: String,
    /// Its address as the relay sees it.
    pub address: String,
    /// Unix seconds when its control channel came up.
    pub connected_since: u64,
    /// Always true: on this path the relay sees the payload.
    pub relay_sees_payload: bool,
}

/// The Azure protocol's live state: listeners and waiting senders. Cheap
/// to clone.
#[derive(Debug, Clone)]
pub struct Azure {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    hub: Hub,
    state: Mutex<Listeners<ListenerHandle, oneshot::Sender<Answer>>>,
    rng: SystemRandom,
    penalties: Mutex<Penalties>,
}

/// The connection's pre-authentication slot, given back when a request
/// proves something (a token verifies, a ticket is found).
type Slot = Arc<Mutex<Option<PreAuthSlot>>>;

fn authenticated(slot: &Slot) {
    slot.lock().unwrap_or_else(|p| p.into_inner()).take();
}

/// Whether the connection has proved nothing yet.
fn unproven(slot: &Slot) -> bool {
    slot.lock().unwrap_or_else(|p| p.into_inner()).is_some()
}

/// Removes a listener from the rotation when its channel ends.
#[derive(Debug)]
struct Registration {
    azure: Azure,
    hc: proto::name::HcName,
    id: ListenerId,
    _counted: transport::metrics::ActiveGuard,
}

impl Drop for Registration {
    fn drop(&mut self) {
        self.azure.lock().remove(&self.hc, self.id);
        info!(hc = %self.hc, "Azure-protocol listener gone");
    }
}

/// A plain-text answer.
fn answer(status: u16, text: &str) -> Response<Body> {
    let mut response = Response::new(Full::new(Bytes::from(format!("{text}\n"))));
    *response.status_mut() =
        StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    response
}

/// The status a refused token is answered with: 403 when the token is
/// genuine but not for this (its hybrid connection or its right), 401
/// otherwise.
fn token_status(e: &SasError) -> u16 {
    match e {
        SasError::WrongHc { .. } | SasError::WrongRight { .. } => 403,
        _ => 401,
    }
}

/// The protocol a listener asked for in its rendezvous: the first it
/// offered.
fn first_protocol(req: &Request<Incoming>) -> Option<HeaderValue> {
    let offered = req.headers().get(SEC_WEBSOCKET_PROTOCOL)?.to_str().ok()?;
    let first = offered.split(',').next()?.trim();
    HeaderValue::from_str(first)
        .ok()
        .filter(|_| !first.is_empty())
}

impl Azure {
    /// No listeners yet; tokens are checked by `hub`, and each hybrid
    /// connection takes at most `max_listeners` listeners.
    pub fn new(hub: Hub, max_listeners: usize) -> Azure {
        Azure {
            inner: Arc::new(Inner {
                hub,
                state: Mutex::new(Listeners::new(max_listeners)),
                rng: SystemRandom::new(),
                penalties: Mutex::new(Penalties::new()),
            }),
        }
    }

    fn lock(
        &self,
    ) -> std::sync::MutexGuard<'_, Listeners<ListenerHandle, oneshot::Sender<Answer>>> {
        // Every critical section leaves the maps consistent.
        self.inner.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Azure-protocol listeners of `hc` now.
    pub fn listeners(&self, hc: &proto::name::HcName) -> usize {
        self.lock().count(hc)
    }

    /// The Azure-protocol listeners of `hc` as status shows them, oldest
    /// first.
    pub fn listener_views(&self, hc: &proto::name::HcName) -> Vec<AzureListenerView> {
        self.lock()
            .members(hc)
            .into_iter()
            .map(|handle| handle.view)
            .collect()
    }

    /// 16 random bytes as hex, or `None` without randomness.
    fn random_hex(&self) -> Option<String> {
        let mut bytes = [0u8; 16];
        self.inner.rng.fill(&mut bytes).ok()?;
        Some(bytes.iter().map(|b| format!("{b:02x}")).collect())
    }

    /// Checks the request's token for `right`: its expiry, or the status
    /// and text to answer.
    fn authorize(&self, r: &HcRequest, right: Right) -> Result<u64, (u16, String)> {
        let Some(token) = &r.token else {
            return Err((
                401,
                "no token: send a SAS token in the ServiceBusAuthorization header or the sb-hc-token query parameter".into(),
            ));
        };
        self.inner
            .hub
            .check_token(&r.hc, token, right)
            .map_err(|e| {
                warn!(hc = %r.hc, error = %e, "Azure-protocol token rejected");
                (
                    token_status(&e),
                    format!("the token was not accepted for {}: {e}", r.hc),
                )
            })
    }

    /// Answers one request; a refusal of a connection that proved
    /// nothing waits first, longer the more its address was refused
    /// ([`penalty`]).
    async fn handle(&self, req: Request<Incoming>, peer: SocketAddr, slot: Slot) -> Response<Body> {
        let response = self.route(req, peer, &slot).await;
        let refused = matches!(response.status().as_u16(), 401 | 403);
        if refused && unproven(&slot) {
            let wait = self
                .inner
                .penalties
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .refused(peer.ip(), std::time::Instant::now());
            if !wait.is_zero() {
                debug!(%peer, ?wait, "refused again: answering later");
                tokio::time::sleep(wait).await;
            }
        }
        response
    }

    async fn route(
        &self,
        mut req: Request<Incoming>,
        peer: SocketAddr,
        slot: &Slot,
    ) -> Response<Body> {
        let parsed = match request::parse(req.uri().path(), req.uri().query(), req.headers()) {
            Ok(parsed) => parsed,
            Err(e) => return answer(e.status(), &e.to_string()),
        };
        if !is_upgrade_request(&req) {
            return answer(400, "expected a WebSocket upgrade");
        }
        match parsed.action.clone() {
            Action::Listen => self.listen(&mut req, parsed, peer, slot),
            Action::Connect => self.connect(&mut req, parsed, peer, slot).await,
            Action::Accept { ticket } => self.rendezvous(&mut req, &parsed, &ticket, None, slot),
            Action::Reject {
                ticket,
                status,
                description,
            } => self.rendezvous(
                &mut req,
                &parsed,
                &ticket,
                Some((status, description)),
                slot,
            ),
        }
    }

    fn listen(
        &self,
        req: &mut Request<Incoming>,
        r: HcRequest,
        peer: SocketAddr,
        slot: &Slot,
    ) -> Response<Body> {
        let expires = match self.authorize(&r, Right::Listen) {
            Ok(expires) => expires,
            Err((status, text)) => return answer(status, &text),
        };
        let Some(host) = req
            .headers()
            .get(HOST)
            .and_then(|h| h.to_str().ok())
            .filter(|h| request::is_plain_host(h))
        else {
            return answer(
                400,
                "the request has no Host header the relay can put in an address",
            );
        };
        let host: Arc<str> = host.into();
        let (response, upgraded) = match upgrade(&mut *req) {
            Ok(x) => x,
            Err(e) => return answer(400, &e.to_string()),
        };
        let (tx, rx) = mpsc::channel(LISTENER_QUEUE);
        let view = AzureListenerView {
            kind: "azure-protocol".into(),
            address: peer.to_string(),
            connected_since: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
            relay_sees_payload: true,
        };
        let handle = ListenerHandle {
            accepts: tx,
            host,
            view,
        };
        let id = match self.lock().add(&r.hc, handle) {
            Ok(id) => id,
            Err(e) => {
                self.inner.hub.metrics().refused(RefusedReason::quota);
                return answer(403, &e.to_string());
            }
        };
        authenticated(slot);
        let registration = Registration {
            azure: self.clone(),
            hc: r.hc.clone(),
            id,
            _counted: self.inner.hub.metrics().azure_listener(&r.hc),
        };
        let hub = self.inner.hub.clone();
        let span = info_span!("azure listener", hc = %r.hc, id);
        tokio::spawn(
            async move {
                match upgraded.await {
                    Ok(ws) => {
                        info!("Azure-protocol listener connected");
                        let token = r.token.unwrap_or_default();
                        listener::serve(ws, rx, hub, r.hc, token, expires).await;
                    }
                    Err(e) => debug!(error = %e, "listener upgrade failed"),
                }
                drop(registration);
            }
            .instrument(span),
        );
        response.map(|_| Body::default())
    }

    async fn connect(
        &self,
        req: &mut Request<Incoming>,
        r: HcRequest,
        peer: SocketAddr,
        slot: &Slot,
    ) -> Response<Body> {
        if let Err((status, text)) = self.authorize(&r, Right::Send) {
            return answer(status, &text);
        }
        authenticated(slot);
        let connect_headers = request::connect_headers(req.headers());
        let (mut response, sender_upgrade) = match upgrade(&mut *req) {
            Ok(x) => x,
            Err(e) => return answer(400, &e.to_string()),
        };
        let (Some(ticket), Some(fresh_id)) = (self.random_hex(), self.random_hex()) else {
            return answer(500, "the relay has no randomness for a ticket");
        };
        let id = r.id.clone().unwrap_or(fresh_id);
        let (tx, rx) = oneshot::channel();
        let rotation = {
            let mut state = self.lock();
            let rotation = state.rotation(&r.hc);
            if !rotation.is_empty() {
                state.wait(ticket.clone(), r.hc.clone(), tx, std::time::Instant::now());
            }
            rotation
        };
        if rotation.is_empty() {
            return answer(
                404,
                &format!("no listener is connected to hybrid connection {}", r.hc),
            );
        }
        let offered = rotation.iter().any(|listener| {
            let address = AcceptAddress {
                host: &listener.host,
                request: &r,
                id: &id,
                ticket: &ticket,
            };
            let message = serde_json::json!({"accept": {
                "address": address.to_string(),
                "id": id,
                "connectHeaders": connect_headers,
                "remoteEndpoint": {"address": peer.ip().to_string(), "port": peer.port()},
            }});
            listener.accepts.try_send(message.to_string()).is_ok()
        });
        if !offered {
            self.lock().forget(&ticket);
            self.inner.hub.metrics().refused(RefusedReason::quota);
            return answer(503, &format!("every listener of {} is busy", r.hc));
        }
        match tokio::time::timeout(RENDEZVOUS_TTL, rx).await {
            Ok(Ok(Answer::Accepted { protocol, listener })) => {
                if let Some(protocol) = protocol {
                    response
                        .headers_mut()
                        .insert(SEC_WEBSOCKET_PROTOCOL, protocol);
                }
                let span = info_span!("azure connection", hc = %r.hc, %id);
                let counted = self.inner.hub.metrics().azure_connection();
                tokio::spawn(
                    async move {
                        let _counted = counted;
                        match tokio::join!(sender_upgrade, listener) {
                            (Ok(sender), Ok(listener)) => {
                                debug!("relaying");
                                let relayed = pump::pump(sender, listener).await;
                                debug!(?relayed, "connection closed");
                            }
                            (Err(e), _) | (_, Err(e)) => debug!(error = %e, "an upgrade failed"),
                        }
                    }
                    .instrument(span),
                );
                response.map(|_| Body::default())
            }
            Ok(Ok(Answer::Rejected {
                status,
                description,
            })) => {
                let mut response = answer(status, &description);
                if let Ok(reason) = hyper::ext::ReasonPhrase::try_from(description.as_bytes()) {
                    response.extensions_mut().insert(reason);
                }
                response
            }
            Ok(Err(_)) | Err(_) => {
                self.lock().forget(&ticket);
                answer(
                    504,
                    &format!(
                        "no listener of {} accepted within {} s",
                        r.hc,
                        RENDEZVOUS_TTL.as_secs()
                    ),
                )
            }
        }
    }

    fn rendezvous(
        &self,
        req: &mut Request<Incoming>,
        r: &HcRequest,
        ticket: &str,
        reject: Option<(u16, String)>,
        slot: &Slot,
    ) -> Response<Body> {
        let Some(waiter) = self.lock().take(ticket, &r.hc, std::time::Instant::now()) else {
            return answer(403, "this accept address is unknown, used or expired");
        };
        authenticated(slot);
        if let Some((status, description)) = reject {
            let _ = waiter.send(Answer::Rejected {
                status,
                description,
            });
            return answer(410, "the sender was rejected");
        }
        let protocol = first_protocol(req);
        let (mut response, upgraded) = match upgrade(&mut *req) {
            Ok(x) => x,
            Err(e) => {
                let _ = waiter.send(Answer::Rejected {
                    status: 502,
                    description: "Bad Gateway".into(),
                });
                return answer(400, &e.to_string());
            }
        };
        let accepted = Answer::Accepted {
            protocol: protocol.clone(),
            listener: upgraded,
        };
        if waiter.send(accepted).is_err() {
            return answer(403, "the sender stopped waiting");
        }
        if let Some(protocol) = protocol {
            response
                .headers_mut()
                .insert(SEC_WEBSOCKET_PROTOCOL, protocol);
        }
        response.map(|_| Body::default())
    }
}

/// Serves an HTTP connection (TLS already ended, `io` still holding the
/// first byte) until its one request is answered or upgraded. The request
/// head must arrive by `deadline`; the connection counts against the
/// pre-authentication caps (`slot`) until a token verifies or a ticket is
/// found.
pub async fn serve_http<S>(
    io: S,
    peer: SocketAddr,
    azure: Azure,
    slot: PreAuthSlot,
    deadline: Instant,
) -> Result<(), String>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let slot: Slot = Arc::new(Mutex::new(Some(slot)));
    let service = service_fn(move |req| {
        let azure = azure.clone();
        let slot = slot.clone();
        async move { Ok::<_, Infallible>(azure.handle(req, peer, slot).await) }
    });
    let head_time = deadline.saturating_duration_since(Instant::now());
    let mut builder = http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(head_time)
        .max_buf_size(MAX_HEAD)
        .max_headers(MAX_HEADERS)
        .keep_alive(false);
    let conn = builder
        .serve_connection(TokioIo::new(io), service)
        .with_upgrades();
    // A sender may wait for a listener; nothing else takes long.
    let limit = head_time + RENDEZVOUS_TTL + Duration::from_secs(5);
    match tokio::time::timeout(limit, conn).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(format!("HTTP: {e}")),
        Err(_) => Err("HTTP connection took too long".into()),
    }
}
