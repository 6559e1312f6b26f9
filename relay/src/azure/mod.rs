//! Azure Relay's Hybrid Connections protocol, WebSocket mode and HTTP
//! request/response mode, on the relay's one port: so that existing Azure
//! Relay clients (`hyco-ws`, `hyco-https`, `Microsoft.Azure.Relay`,
//! azbridge) work against this relay unchanged.
//!
//! After the TLS handshake, a connection whose first byte is an ASCII
//! letter is HTTP (a hybridlink control message starts with `0x00`);
//! [`serve_http`] gives it to a hyper HTTP/1 server connection with
//! upgrades. Its upgrade requests ([`request`]) open a listener's control
//! channel ([`listener`]), bring a sender, or open the rendezvous of an
//! `accept` or a `request`; the relay then relays WebSocket frames between
//! the sender and the listener ([`pump`]). A plain request to `/{hc}/...`
//! is a sender's HTTP request, carried to a listener as a `request`
//! message and answered with the listener's `response` ([`http`],
//! [`proxy`], [`exchanges`]).
//!
//! Unlike a hybridlink pipe, the relay terminates these WebSockets and sees
//! their payload, as Azure's service does. So an Azure-protocol sender
//! reaches only Azure-protocol listeners ([`listeners`] is separate from
//! the hub's agents), and hybridlink senders only hybridlink agents.

pub mod exchanges;
#[doc(hidden)]
pub mod fuzzing;
pub mod http;
pub mod listener;
pub mod listeners;
pub mod penalty;
pub mod proxy;
pub mod pump;
pub mod request;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use fastwebsockets::upgrade::{UpgradeFut, is_upgrade_request, upgrade};
use http_body_util::combinators::BoxBody;
use hyper::body::Incoming;
use hyper::header::{CONTENT_LENGTH, HOST, HeaderValue, SEC_WEBSOCKET_PROTOCOL};
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
use exchanges::Exchanges;
use listener::Outgoing;
use listeners::{ListenerId, Listeners, RENDEZVOUS_TTL};
use penalty::Penalties;
use proxy::{Prefix, Watchdog};
use request::{AcceptAddress, Action, HcRequest, RequestAddress};

/// Most bytes of a request head the relay buffers: the protocol's 32 KB
/// header limit for an HTTP-mode request. A bigger head is refused (431).
pub const MAX_HEAD: usize = 32 << 10;
/// Most header fields in a request head.
pub const MAX_HEADERS: usize = 64;
/// `accept` messages that may wait for one listener's control channel;
/// past that the listener is skipped as busy.
pub const LISTENER_QUEUE: usize = 256;

/// A response body: a plain answer, a listener's body already read, or one
/// streamed from a rendezvous.
pub type Body = BoxBody<Bytes, std::io::Error>;

/// What a sender's HTTP request is told by its listener.
#[derive(Debug)]
enum Reply {
    /// The listener answered on its control channel.
    Inline(listener::Answer),
    /// The listener opened the request's rendezvous: to receive the
    /// request, or to send a big response.
    Rendezvous(UpgradeFut),
}

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

/// How an `accept` or a `request` reaches one listener.
#[derive(Debug, Clone)]
struct ListenerHandle {
    accepts: mpsc::Sender<Outgoing>,
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
    exchanges: Mutex<Exchanges<oneshot::Sender<Reply>>>,
    rng: SystemRandom,
    penalties: Mutex<Penalties>,
    /// How long a sender's HTTP request waits for the listener's response.
    response_timeout: Duration,
    /// HTTP requests one hybrid connection may have open at once.
    max_http_requests_per_hc: usize,
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
        self.azure.exchanges().listener_gone(self.id);
        info!(hc = %self.hc, "Azure-protocol listener gone");
    }
}

/// Ends an HTTP exchange's entry when its request is over, however it
/// ends.
#[derive(Debug)]
struct ExchangeGuard {
    azure: Azure,
    id: String,
}

impl Drop for ExchangeGuard {
    fn drop(&mut self) {
        self.azure.exchanges().close(&self.id);
    }
}

/// A plain-text answer.
fn answer(status: u16, text: &str) -> Response<Body> {
    let mut response = Response::new(proxy::full(Bytes::from(format!("{text}\n"))));
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
    /// No listeners yet; tokens are checked by `hub`, each hybrid
    /// connection takes at most `max_listeners` listeners, and a sender's
    /// HTTP request waits `response_timeout` for its response; one hybrid
    /// connection may have `max_http_requests_per_hc` requests open at once.
    pub fn new(
        hub: Hub,
        max_listeners: usize,
        response_timeout: Duration,
        max_http_requests_per_hc: usize,
    ) -> Azure {
        Azure {
            inner: Arc::new(Inner {
                hub,
                state: Mutex::new(Listeners::new(max_listeners)),
                exchanges: Mutex::new(Exchanges::default()),
                rng: SystemRandom::new(),
                penalties: Mutex::new(Penalties::new()),
                response_timeout,
                max_http_requests_per_hc,
            }),
        }
    }

    fn exchanges(&self) -> std::sync::MutexGuard<'_, Exchanges<oneshot::Sender<Reply>>> {
        // Every critical section leaves the maps consistent.
        self.inner
            .exchanges
            .lock()
            .unwrap_or_else(|p| p.into_inner())
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
    async fn handle(
        &self,
        req: Request<Incoming>,
        peer: SocketAddr,
        slot: Slot,
        watchdog: Watchdog,
    ) -> Response<Body> {
        let response = self.route(req, peer, &slot, watchdog).await;
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
        watchdog: Watchdog,
    ) -> Response<Body> {
        if !req.uri().path().starts_with(request::HC_PREFIX) {
            if is_upgrade_request(&req) {
                return answer(
                    404,
                    "WebSocket requests go to /$hc/NAME?sb-hc-action=...; plain HTTP requests to /NAME/...",
                );
            }
            return match request::parse_http(req.uri().path(), req.uri().query(), req.headers()) {
                Ok(parsed) => self.http(req, parsed, peer, slot, &watchdog).await,
                Err(e) => answer(e.status(), &e.to_string()),
            };
        }
        let parsed = match request::parse(req.uri().path(), req.uri().query(), req.headers()) {
            Ok(parsed) => parsed,
            Err(e) => return answer(e.status(), &e.to_string()),
        };
        if !is_upgrade_request(&req) {
            return answer(
                400,
                "expected a WebSocket upgrade (plain HTTP requests go to /NAME/..., without $hc)",
            );
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
            Action::Request { ticket } => self.request_rendezvous(&mut req, &parsed, &ticket, slot),
            Action::Http => answer(400, "expected a WebSocket upgrade"),
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
        let azure = self.clone();
        let answered = move |request: &str, result: listener::Answer| match azure
            .exchanges()
            .answered(id, request)
        {
            Ok(waiter) => waiter.send(Reply::Inline(result)).is_ok(),
            Err(e) => {
                debug!(request, error = %e, "a response matched no request");
                false
            }
        };
        let span = info_span!("azure listener", hc = %r.hc, id);
        tokio::spawn(
            async move {
                match upgraded.await {
                    Ok(ws) => {
                        info!("Azure-protocol listener connected");
                        let token = r.token.unwrap_or_default();
                        listener::serve(ws, rx, hub, r.hc, token, expires, answered).await;
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
            let message = Outgoing {
                text: message.to_string(),
                body: None,
            };
            listener.accepts.try_send(message).is_ok()
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

    /// A sender's plain HTTP request: authorized like a WebSocket sender,
    /// sent to the hybrid connection's next listener that has room, and
    /// answered with that listener's response (502 without a listener or
    /// with an unusable response, 504 when none comes in time).
    async fn http(
        &self,
        req: Request<Incoming>,
        r: HcRequest,
        peer: SocketAddr,
        slot: &Slot,
        watchdog: &Watchdog,
    ) -> Response<Body> {
        if let Err((status, text)) = self.authorize(&r, Right::Send) {
            return answer(status, &text);
        }
        authenticated(slot);
        if req.method() == hyper::Method::CONNECT {
            return answer(405, "CONNECT is not relayed");
        }
        let host = req
            .headers()
            .get(HOST)
            .and_then(|h| h.to_str().ok())
            .filter(|h| request::is_plain_host(h))
            .unwrap_or("hybridlink")
            .to_string();
        let via = http::via(&host);
        let (parts, body) = req.into_parts();
        let content_length = parts
            .headers
            .get(CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse().ok());
        let prefix = match proxy::read_prefix(body, content_length, watchdog).await {
            Ok(prefix) => prefix,
            Err(e) => return answer(400, &e),
        };
        let (Some(ticket), Some(id)) = (self.random_hex(), self.random_hex()) else {
            return answer(500, "the relay has no randomness for a ticket");
        };
        // One tenant's requests, however slow their listener, cannot hold
        // every connection and every byte of the relay.
        let open = self.exchanges().open_for(&r.hc);
        if open >= self.inner.max_http_requests_per_hc {
            self.inner.hub.metrics().refused(RefusedReason::quota);
            return answer(
                503,
                &format!(
                    "{} has {open} HTTP requests open, the relay's limit (relay serve --max-http-requests-per-hc); try again",
                    r.hc
                ),
            );
        }
        let mut target = format!("/{}{}", r.hc, r.suffix);
        if !r.app_query.is_empty() {
            target = format!("{target}?{}", r.app_query);
        }
        let whole = |address: &str| {
            serde_json::json!({"request": {
                "address": address,
                "id": id,
                "requestTarget": target,
                "method": parts.method.as_str(),
                "remoteEndpoint": {"address": peer.ip().to_string(), "port": peer.port()},
                "requestHeaders": http::request_headers(&parts.headers, r.authorization_was_token, &via),
                "body": prefix.has_body(),
            }})
            .to_string()
        };

        let (inline, message, rx) = match self.dispatch(&r.hc, &id, &ticket, whole, &prefix) {
            Ok(sent) => sent,
            Err(no_listener) => return answer(502, &no_listener),
        };
        let _guard = ExchangeGuard {
            azure: self.clone(),
            id: id.clone(),
        };
        self.inner.hub.metrics().azure_http_request();
        let timeout = self.inner.response_timeout;
        watchdog.extend(timeout + Duration::from_secs(5));
        let no_response = || {
            answer(
                504,
                &format!(
                    "the listener of {} did not respond within {} s",
                    r.hc,
                    timeout.as_secs()
                ),
            )
        };
        let reply = match tokio::time::timeout(timeout, rx).await {
            Err(_) => return no_response(),
            Ok(Err(_)) => {
                return answer(
                    502,
                    &format!("the listener of {} went away before it responded", r.hc),
                );
            }
            Ok(Ok(reply)) => reply,
        };
        watchdog.extend(proxy::BODY_IDLE);
        let upgrade = match reply {
            Reply::Inline(Ok((head, body))) => {
                return proxy::respond(&head, &via, proxy::full(body));
            }
            Reply::Inline(Err(e)) => return answer(502, &e),
            Reply::Rendezvous(upgrade) => upgrade,
        };
        let mut ws = match tokio::time::timeout(timeout, upgrade).await {
            Err(_) => return no_response(),
            Ok(Err(e)) => return answer(502, &format!("the listener's rendezvous failed: {e}")),
            Ok(Ok(ws)) => ws,
        };
        if !inline && let Err(e) = proxy::send_request(&mut ws, message, prefix, watchdog).await {
            return answer(502, &e);
        }
        // The listener has the whole request now; its response may take
        // the response timeout from here.
        watchdog.extend(timeout + Duration::from_secs(5));
        match tokio::time::timeout(timeout, proxy::read_response_head(&mut ws, &id)).await {
            Err(_) => no_response(),
            Ok(Err(e)) => answer(502, &e),
            Ok(Ok(head)) => {
                watchdog.extend(proxy::BODY_IDLE);
                let body = if head.body {
                    proxy::stream_body(ws, watchdog.clone())
                } else {
                    proxy::full(Bytes::new())
                };
                proxy::respond(&head, &via, body)
            }
        }
    }

    /// Sends request `id` to the next listener of `hc` with room in its
    /// queue: whole (`whole` makes the message for a request address) when
    /// it fits on the control channel, else as its address only. Returns
    /// whether it went whole, the whole message, and where the reply comes;
    /// or why no listener took it (for a 502).
    fn dispatch(
        &self,
        hc: &proto::name::HcName,
        id: &str,
        ticket: &str,
        whole: impl Fn(&str) -> String,
        prefix: &Prefix,
    ) -> Result<(bool, String, oneshot::Receiver<Reply>), String> {
        let rotation = self.lock().rotation_with_ids(hc);
        if rotation.is_empty() {
            return Err(format!(
                "no listener is connected to hybrid connection {hc}"
            ));
        }
        for (listener_id, listener) in rotation {
            let Ok(permit) = listener.accepts.try_reserve() else {
                continue;
            };
            let address = RequestAddress {
                host: &listener.host,
                hc,
                id,
                ticket,
            }
            .to_string();
            let message = whole(&address);
            let inline = message.len() <= http::MAX_CONTROL_HEADERS;
            let outgoing = match prefix {
                Prefix::Whole(body) if inline => Outgoing {
                    text: message.clone(),
                    body: Some(body.clone()).filter(|b| !b.is_empty()),
                },
                _ => Outgoing {
                    text: serde_json::json!({"request": {"address": address, "id": id}})
                        .to_string(),
                    body: None,
                },
            };
            let inline = inline && matches!(prefix, Prefix::Whole(_));
            let (tx, rx) = oneshot::channel();
            self.exchanges()
                .open(id.into(), ticket.into(), hc.clone(), listener_id, tx);
            permit.send(outgoing);
            return Ok((inline, message, rx));
        }
        Err(format!("every listener of {hc} is busy"))
    }

    /// A listener opens the rendezvous of an HTTP `request`: the request
    /// waiting on its ticket gets the WebSocket.
    fn request_rendezvous(
        &self,
        req: &mut Request<Incoming>,
        r: &HcRequest,
        ticket: &str,
        slot: &Slot,
    ) -> Response<Body> {
        let Some(waiter) = self.exchanges().rendezvous(ticket, &r.hc) else {
            return answer(403, "this request address is unknown, used or expired");
        };
        authenticated(slot);
        let (response, upgraded) = match upgrade(&mut *req) {
            Ok(x) => x,
            Err(e) => return answer(400, &e.to_string()),
        };
        if waiter.send(Reply::Rendezvous(upgraded)).is_err() {
            return answer(410, "the sender stopped waiting");
        }
        response.map(|_| Body::default())
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
    let head_time = deadline.saturating_duration_since(Instant::now());
    // A sender may wait for a listener; an HTTP exchange moves the
    // watchdog on as it goes.
    let watchdog = Watchdog::new(deadline + RENDEZVOUS_TTL + Duration::from_secs(5));
    let dog = watchdog.clone();
    let service = service_fn(move |req| {
        let azure = azure.clone();
        let slot = slot.clone();
        let dog = dog.clone();
        async move { Ok::<_, Infallible>(azure.handle(req, peer, slot, dog).await) }
    });
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
    tokio::pin!(conn);
    loop {
        tokio::select! {
            done = &mut conn => return done.map_err(|e| format!("HTTP: {e}")),
            () = tokio::time::sleep_until(watchdog.deadline()) => {
                if Instant::now() >= watchdog.deadline() {
                    return Err("HTTP connection made no progress in time".into());
                }
            }
        }
    }
}
