//! The management REST API: create, list, show and delete hybrid
//! connections, read and regenerate their keys, and the relay's own two
//! manage keys.
//!
//! It speaks HTTP, or HTTPS with the relay's own certificate (`relay serve
//! --api-tls`, see [`crate::run`]); plain HTTP is meant for loopback, where
//! the CLI on the relay's host uses it. Every request under `/api/` needs
//! `Authorization: Bearer <manage key>` or `Authorization:
//! SharedAccessSignature ...`, a SAS token for the resource
//! `https://RELAY/manage` signed under the rule name `manage`; either of the
//! relay's two manage keys (primary, in `DATA_DIR/manage.key`, and
//! secondary) does. Every error is a JSON body `{"error": "<one line a
//! person can act on>"}`.
//!
//! | method and path | answer |
//! | --- | --- |
//! | `GET /api/v1/hcs` | `[HC, ...]` |
//! | `POST /api/v1/hcs` `{"name","host","port"}` | 201, the HC with its `connection_strings` |
//! | `GET /api/v1/hcs/{name}` | the HC |
//! | `DELETE /api/v1/hcs/{name}` | the deleted HC |
//! | `GET /api/v1/hcs/{name}/keys` | `{"name", "connection_strings"}` |
//! | `POST /api/v1/hcs/{name}/keys/regenerate` `{"rule","key"}` | `{"name", "connection_strings"}` with the new key |
//! | `PATCH /api/v1/hcs/{name}` `{"host"?, "port"?}` | the HC with its new endpoint (agents use it for new streams) |
//! | `GET /api/v1/hcs/{name}/status` | `RelayHcStatus`: `Connected` or `Not connected`, the agents and the Azure-protocol listeners; on a relay cluster also `node` and `cluster`, the agents and pipes of every node |
//! | `GET /api/v1/status` | `[RelayHcStatus, ...]` |
//! | `GET /api/v1/nodes` | `{"nodes": ["HOST:PORT", ...], "states": [NodeView, ...]}`: the relay nodes sharing this registry on etcd and how each is doing (both empty for a relay on its own) |
//! | `GET /api/v1/manage-keys` | `{"primary","secondary"}`: the manage keys |
//! | `POST /api/v1/manage-keys/regenerate` `{"key"}` | `{"primary","secondary"}` with the new key; the old one is refused from then on |
//! | `GET /openapi.json` | the OpenAPI 3 description of all of this (no key needed) |
//! | `GET /`, `GET /portal/{app.js,style.css,icon.svg}` | the portal, a web page over this API ([`crate::portal`]; no key needed, the page asks for it) |
//!
//! An HC reads `{"name","host","port","endpoint","created_unix"}`;
//! `connection_strings` reads
//! `{"send":{"primary","secondary"},"listen":{"primary","secondary"}}`.

use std::collections::BTreeMap;
use std::num::NonZeroU16;
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path, Request, State};
use axum::http::{StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use proto::connection_string::ConnectionString;
use proto::key::{KeySlot, Right};
use proto::name::{Endpoint, HcName, Host};
use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::cluster::{NodeState, NodeSummary, NodeView};
use crate::hub::{AttachedAgent, Hub};
use crate::registry::etcd::EtcdError;
use crate::registry::{HcRecord, Registry, RegistryError, SlotKeys};

/// The OpenAPI 3 description of this API, served at `/openapi.json`.
pub const OPENAPI: &str = include_str!("openapi.json");

/// What the API handlers share.
#[derive(Debug, Clone)]
pub struct ApiState {
    /// The HC registry.
    pub registry: Registry,
    /// Host name or address clients dial the relay at, for connection strings.
    pub public_host: String,
    /// Port clients dial the relay at, for connection strings.
    pub public_port: u16,
    /// SHA-256 of the relay's certificate, for connection strings.
    pub cert_sha256: [u8; 32],
    /// The live sessions, for status.
    pub hub: Hub,
    /// The Azure-protocol listeners, for status (none when the relay does
    /// not serve that protocol, as in tests of the API alone).
    pub azure: Option<crate::azure::Azure>,
}

/// The management API, to be served over HTTPS, or plain HTTP on a loopback
/// address.
pub fn router(state: ApiState) -> Router {
    let api = Router::new()
        .route("/api/v1/hcs", get(list_hcs).post(create_hc))
        .route(
            "/api/v1/hcs/{name}",
            get(show_hc).delete(delete_hc).patch(update_hc),
        )
        .route("/api/v1/hcs/{name}/keys", get(show_keys))
        .route("/api/v1/hcs/{name}/keys/regenerate", post(regenerate_key))
        .route("/api/v1/hcs/{name}/status", get(hc_status))
        .route("/api/v1/status", get(all_status))
        .route("/api/v1/nodes", get(list_nodes))
        .route("/api/v1/manage-keys", get(show_manage_keys))
        .route("/api/v1/registry", get(registry_health))
        .route(
            "/api/v1/manage-keys/regenerate",
            post(regenerate_manage_key),
        )
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(middleware::from_fn_with_state(state.clone(), authorize))
        .with_state(state);
    // The description of the API and the portal's files are public;
    // everything the API describes is not.
    Router::new()
        .route("/openapi.json", get(openapi))
        .merge(crate::portal::router())
        .merge(api)
}

async fn openapi() -> Response {
    ([(header::CONTENT_TYPE, "application/json")], OPENAPI).into_response()
}

/// Whether an HC has an agent, and which, as the relay sees it (`HcStatus`
/// in the OpenAPI description).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RelayHcStatus {
    /// The HC's name.
    pub name: HcName,
    /// `host:port`.
    pub endpoint: Endpoint,
    /// `Connected` when at least one agent is attached, else `Not connected`.
    pub status: String,
    /// How many agents are attached.
    #[serde(rename = "listener_count")]
    pub agent_count: usize,
    /// The attached agents.
    #[serde(rename = "listeners")]
    pub agents: Vec<AttachedAgent>,
    /// The streams of the attached agents, summed (each agent reports its
    /// own every few seconds; the relay itself never sees inside a pipe).
    pub streams: proto::control::StreamStats,
    /// Listeners speaking Azure Relay's own protocol (hyco-ws, .NET, Java):
    /// they serve Azure-protocol senders only, and the relay sees their
    /// traffic.
    #[serde(default)]
    pub azure_listeners: Vec<crate::azure::AzureListenerView>,
    /// The node that answered, on a relay cluster; the fields above are
    /// its own.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
    /// On a relay cluster: this HC on every node, this one first, each as
    /// the node published it (see [`crate::cluster`]).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub cluster: Vec<NodeHcStatus>,
}

/// One HC on one node of a relay cluster (`NodeHcStatus` in the OpenAPI
/// description).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct NodeHcStatus {
    /// `HOST:PORT` of the node.
    pub node: String,
    /// How the node is doing, as the node that answered sees it.
    pub node_state: NodeState,
    /// Agents attached on that node.
    pub listener_count: usize,
    /// Those agents (empty with `listener_count` set when the node left
    /// their details out of a summary that was too big).
    pub listeners: Vec<AttachedAgent>,
    /// Their streams, summed, as they report them.
    pub streams: proto::control::StreamStats,
    /// Pipes (one sender to one agent) the node carries now.
    pub pipes: usize,
    /// Senders attached on the node.
    pub senders: usize,
}

/// The cluster as the node that answers sees it.
struct ClusterNow {
    /// This node's live state.
    own: NodeSummary,
    /// The other nodes' published state, with its age.
    peers: BTreeMap<String, (NodeSummary, Duration)>,
    /// Every listed node and its state.
    states: Vec<NodeView>,
}

/// The cluster now; `None` for a relay on its own.
fn cluster_now(state: &ApiState) -> Option<ClusterNow> {
    let this = state.hub.this_node()?;
    let listed = state.hub.nodes().borrow().clone();
    let own = crate::cluster::summary_of(
        &state.hub,
        &this,
        &proto::control::hex_encode(&state.cert_sha256),
    );
    let peers = state.hub.cluster().summaries(std::time::Instant::now());
    let states = crate::cluster::node_states(&listed, &own, &peers);
    Some(ClusterNow { own, peers, states })
}

/// `hc` on every listed node whose summary is known, this node first.
fn per_node(hc: &HcName, cluster: &ClusterNow) -> Vec<NodeHcStatus> {
    let ClusterNow { own, peers, states } = cluster;
    let mut list = Vec::new();
    let ordered = std::iter::once(own).chain(
        states
            .iter()
            .filter(|v| !v.this_node)
            .filter_map(|v| peers.get(&v.address).map(|(s, _)| s)),
    );
    for summary in ordered {
        let node_state = states
            .iter()
            .find(|v| v.address == summary.address)
            .map_or(NodeState::Stale, |v| v.state);
        let entry = summary.hcs.get(hc.as_str()).cloned().unwrap_or_default();
        list.push(NodeHcStatus {
            node: summary.address.clone(),
            node_state,
            listener_count: entry.listener_count,
            listeners: entry.listeners,
            streams: entry.streams,
            pipes: entry.pipes,
            senders: entry.senders,
        });
    }
    list
}

fn status_of(state: &ApiState, hc: &HcRecord) -> RelayHcStatus {
    let cluster = cluster_now(state);
    status_in(state, hc, cluster.as_ref())
}

/// `hc`'s status, with its entries on every node when `cluster` is given.
fn status_in(state: &ApiState, hc: &HcRecord, cluster: Option<&ClusterNow>) -> RelayHcStatus {
    let agents = state.hub.agents(&hc.name);
    let azure_listeners = state
        .azure
        .as_ref()
        .map(|azure| azure.listener_views(&hc.name))
        .unwrap_or_default();
    let mut streams = proto::control::StreamStats::default();
    for a in &agents {
        streams += a.streams;
    }
    RelayHcStatus {
        streams,
        name: hc.name.clone(),
        endpoint: hc.endpoint.clone(),
        status: if agents.is_empty() && azure_listeners.is_empty() {
            "Not connected".into()
        } else {
            "Connected".into()
        },
        azure_listeners,
        agent_count: agents.len(),
        agents,
        node: cluster.map(|c| c.own.address.clone()),
        cluster: cluster.map(|c| per_node(&hc.name, c)).unwrap_or_default(),
    }
}

async fn hc_status(
    State(state): State<ApiState>,
    Path(name): Path<String>,
) -> ApiResult<axum::Json<RelayHcStatus>> {
    let hc = find(&state, &name)?;
    Ok(axum::Json(status_of(&state, &hc)))
}

/// `GET /api/v1/registry`: whether the registry's store takes changes.
async fn registry_health(
    State(state): State<ApiState>,
) -> axum::Json<crate::registry::StoreHealth> {
    axum::Json(state.registry.health())
}

async fn all_status(State(state): State<ApiState>) -> axum::Json<Vec<RelayHcStatus>> {
    let list = state.registry.list();
    let cluster = cluster_now(&state);
    axum::Json(
        list.iter()
            .map(|hc| status_in(&state, hc, cluster.as_ref()))
            .collect(),
    )
}

/// Answer of `GET /api/v1/nodes`.
#[derive(Debug, Serialize)]
struct NodesBody {
    /// The listed nodes' addresses, sorted.
    nodes: Vec<String>,
    /// The same nodes with their state.
    states: Vec<NodeView>,
}

async fn list_nodes(State(state): State<ApiState>) -> axum::Json<NodesBody> {
    let nodes = state.hub.nodes().borrow().clone();
    let states = cluster_now(&state).map(|c| c.states).unwrap_or_default();
    axum::Json(NodesBody { nodes, states })
}

/// Body of `PATCH /api/v1/hcs/{name}`: `host`, `port` or both; each, when
/// present, a real value (`null` is not "unchanged").
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct UpdateBody {
    #[serde(default, deserialize_with = "present")]
    host: Option<String>,
    #[serde(default, deserialize_with = "present")]
    port: Option<serde_json::Value>,
}

/// A field that, when given, must not be `null`.
fn present<'de, D, T>(d: D) -> Result<Option<T>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Deserialize<'de>,
{
    let value = serde_json::Value::deserialize(d)?;
    if value.is_null() {
        return Err(serde::de::Error::custom(
            "null is not a value; leave the field out to keep it",
        ));
    }
    T::deserialize(value)
        .map(Some)
        .map_err(serde::de::Error::custom)
}

async fn update_hc(
    State(state): State<ApiState>,
    Path(name): Path<String>,
    body: Bytes,
) -> ApiResult<axum::Json<HcView>> {
    let name = parse_name(&name)?;
    let body: UpdateBody = parse_body(&body)?;
    if body.host.is_none() && body.port.is_none() {
        return Err(ApiError::bad_request(
            "nothing to change; give host, port or both",
        ));
    }
    let host = match body.host {
        Some(h) => Some(h.parse().map_err(ApiError::bad_request)?),
        None => None,
    };
    let port = match body.port {
        Some(p) => NonZeroU16::new(parse_port(&p)?),
        None => None,
    };
    // What is left out is kept as the store has it, which may be newer
    // than this relay's view (another relay of a cluster changed it).
    let registry = state.registry.clone();
    let hc = blocking(move || registry.update_endpoint(&name, host, port)).await?;
    tracing::info!(hc = %hc.name, endpoint = %hc.endpoint, "hybrid connection updated");
    Ok(axum::Json(HcView::from(&hc)))
}

fn parse_port(port: &serde_json::Value) -> ApiResult<u16> {
    port.as_u64()
        .and_then(|p| u16::try_from(p).ok())
        .filter(|p| *p != 0)
        .ok_or_else(|| {
            ApiError::bad_request(format!("port {port} is not a number from 1 to 65535"))
        })
}

/// An HC as the API shows it (no keys).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct HcView {
    /// The HC's name.
    pub name: HcName,
    /// Host agents dial.
    pub host: Host,
    /// Port agents dial.
    pub port: u16,
    /// `host:port`.
    pub endpoint: Endpoint,
    /// Creation time, seconds since the Unix epoch.
    pub created_unix: u64,
}

impl From<&HcRecord> for HcView {
    fn from(hc: &HcRecord) -> HcView {
        HcView {
            name: hc.name.clone(),
            host: hc.endpoint.host().clone(),
            port: hc.endpoint.port(),
            endpoint: hc.endpoint.clone(),
            created_unix: hc.created_unix,
        }
    }
}

/// The two connection strings of one rule.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SlotStrings {
    /// Made with the primary key.
    pub primary: ConnectionString,
    /// Made with the secondary key.
    pub secondary: ConnectionString,
}

/// The four connection strings of an HC.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ConnectionStrings {
    /// For senders (appliances).
    pub send: SlotStrings,
    /// For agents.
    pub listen: SlotStrings,
}

/// Answer of `POST /api/v1/hcs`: the HC and its connection strings.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CreatedHc {
    /// The HC.
    #[serde(flatten)]
    pub hc: HcView,
    /// Its connection strings.
    pub connection_strings: ConnectionStrings,
}

/// Answer of the `keys` endpoints.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct HcKeys {
    /// The HC.
    pub name: HcName,
    /// Its connection strings.
    pub connection_strings: ConnectionStrings,
}

/// Body of `POST /api/v1/hcs`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateBody {
    name: String,
    host: String,
    port: serde_json::Value,
}

/// Body of `POST /api/v1/hcs/{name}/keys/regenerate`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RegenerateBody {
    rule: String,
    key: String,
}

/// Body of `POST /api/v1/manage-keys/regenerate`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RegenerateManageBody {
    key: String,
}

/// An error answer: a status and a one-line reason.
#[derive(Debug)]
struct ApiError(StatusCode, String);

impl ApiError {
    fn bad_request(reason: impl ToString) -> ApiError {
        ApiError(StatusCode::BAD_REQUEST, reason.to_string())
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.0, axum::Json(json!({ "error": self.1 }))).into_response()
    }
}

impl From<RegistryError> for ApiError {
    fn from(err: RegistryError) -> ApiError {
        let status = match &err {
            RegistryError::Duplicate(_) => StatusCode::CONFLICT,
            RegistryError::NotFound(_) => StatusCode::NOT_FOUND,
            RegistryError::NoSuchRule(_) => StatusCode::BAD_REQUEST,
            RegistryError::Quota(_) => StatusCode::CONFLICT,
            RegistryError::Etcd(EtcdError::Contention { .. }) => StatusCode::CONFLICT,
            RegistryError::Etcd(_) => StatusCode::SERVICE_UNAVAILABLE,
            _ => StatusCode::INTERNAL_SERVER_ERROR,
        };
        if status == StatusCode::INTERNAL_SERVER_ERROR {
            tracing::error!(error = %err, "management API request failed");
        }
        ApiError(status, err.to_string())
    }
}

type ApiResult<T> = Result<T, ApiError>;

async fn authorize(State(state): State<ApiState>, request: Request, next: Next) -> Response {
    let presented = request
        .headers()
        .get(header::AUTHORIZATION)
        .map(|value| value.to_str().unwrap_or_default());
    let reason = match presented {
        None => Some(
            "missing Authorization header; send `Authorization: Bearer <manage key>` (the key is in DATA_DIR/manage.key) or a SharedAccessSignature signed with it".to_owned(),
        ),
        Some(value) => match value.split_once(' ') {
            Some((scheme, key)) if scheme.eq_ignore_ascii_case("bearer") => {
                let keys = state.registry.manage_keys();
                // Both compared, so the time taken does not say which matched.
                let primary = keys.primary.matches(key.trim());
                let secondary = keys.secondary.matches(key.trim());
                if primary | secondary {
                    None
                } else {
                    Some("wrong manage key; use the key in the relay's DATA_DIR/manage.key, or the secondary manage key (it may have been regenerated)".to_owned())
                }
            }
            Some((scheme, _)) if scheme.eq_ignore_ascii_case("sharedaccesssignature") => {
                manage_token_error(&state, value)
            }
            _ => Some("Authorization header is not `Bearer <manage key>` or `SharedAccessSignature ...`".to_owned()),
        },
    };
    match reason {
        None => next.run(request).await,
        Some(reason) => {
            tracing::info!(reason, "management API request rejected");
            let mut response = ApiError(StatusCode::UNAUTHORIZED, reason).into_response();
            response.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                header::HeaderValue::from_static("Bearer"),
            );
            response
        }
    }
}

/// Checks a SAS token for the management API: resource `.../manage`, key
/// name `manage`, signed with either manage key. `None` when it is good.
fn manage_token_error(state: &ApiState, token: &str) -> Option<String> {
    let keys = state.registry.manage_keys();
    let rule = proto::sas::RuleKeys {
        name: Right::Manage.rule_name(),
        right: Right::Manage,
        primary: &keys.primary,
        secondary: &keys.secondary,
    };
    // The token's resource ends in `/manage`, which parses as a name.
    let hc: HcName = "manage".parse().ok()?;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let max_lifetime = state.hub.max_token_lifetime();
    match proto::sas::verify(token, &hc, Right::Manage, &[rule], now)
        .and_then(|v| v.within(now, max_lifetime))
    {
        Ok(_) => None,
        Err(proto::sas::SasError::BadSignature { .. }) => Some(
            "management token refused: it was signed with a key that is neither of the relay's manage keys, or was altered (a manage key may have been regenerated: the primary is in DATA_DIR/manage.key, `hybridlink hc manage-keys show` prints both)".to_owned(),
        ),
        Err(e) => Some(format!(
            "management token refused: {e} (sign the resource `https://RELAY/manage` with key name `manage` and a manage key)"
        )),
    }
}

async fn not_found() -> ApiError {
    ApiError(
        StatusCode::NOT_FOUND,
        "no such API endpoint; the API lives under /api/v1/hcs, /api/v1/status and /api/v1/manage-keys".to_owned(),
    )
}

async fn method_not_allowed() -> ApiError {
    ApiError(
        StatusCode::METHOD_NOT_ALLOWED,
        "method not allowed on this endpoint".to_owned(),
    )
}

fn parse_name(name: &str) -> ApiResult<HcName> {
    name.parse().map_err(ApiError::bad_request)
}

fn parse_body<T: serde::de::DeserializeOwned>(body: &Bytes) -> ApiResult<T> {
    serde_json::from_slice(body).map_err(|e| {
        ApiError::bad_request(format!(
            "request body is not valid JSON for this endpoint: {e}"
        ))
    })
}

/// Runs a registry change (which writes and fsyncs) off the async threads.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, RegistryError> + Send + 'static,
) -> ApiResult<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| {
            ApiError(
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("registry task failed: {e}"),
            )
        })?
        .map_err(ApiError::from)
}

fn connection_strings(state: &ApiState, hc: &HcRecord) -> ConnectionStrings {
    let make = |right: Right, keys: &SlotKeys, slot: KeySlot| ConnectionString {
        relay_host: state.public_host.clone(),
        relay_port: state.public_port,
        key_name: right.rule_name().to_owned(),
        key: keys.get(slot).clone(),
        hc: hc.name.clone(),
        cert_sha256: Some(state.cert_sha256),
        end_to_end_key: None,
    };
    let rule = |right: Right, keys: &SlotKeys| SlotStrings {
        primary: make(right, keys, KeySlot::Primary),
        secondary: make(right, keys, KeySlot::Secondary),
    };
    ConnectionStrings {
        send: rule(Right::Send, &hc.send),
        listen: rule(Right::Listen, &hc.listen),
    }
}

async fn list_hcs(State(state): State<ApiState>) -> axum::Json<Vec<HcView>> {
    axum::Json(state.registry.list().iter().map(HcView::from).collect())
}

async fn create_hc(
    State(state): State<ApiState>,
    body: Bytes,
) -> ApiResult<(StatusCode, axum::Json<CreatedHc>)> {
    let body: CreateBody = parse_body(&body)?;
    let name = parse_name(&body.name)?;
    let host: Host = body.host.parse().map_err(ApiError::bad_request)?;
    let port = parse_port(&body.port)?;
    let endpoint = Endpoint::new(host, port).map_err(ApiError::bad_request)?;
    let registry = state.registry.clone();
    let hc = blocking(move || registry.create(name, endpoint)).await?;
    tracing::info!(hc = %hc.name, endpoint = %hc.endpoint, "hybrid connection created");
    let created = CreatedHc {
        hc: HcView::from(&hc),
        connection_strings: connection_strings(&state, &hc),
    };
    Ok((StatusCode::CREATED, axum::Json(created)))
}

fn find(state: &ApiState, name: &str) -> ApiResult<HcRecord> {
    let name = parse_name(name)?;
    state
        .registry
        .get(&name)
        .ok_or_else(|| RegistryError::NotFound(name).into())
}

async fn show_hc(
    State(state): State<ApiState>,
    Path(name): Path<String>,
) -> ApiResult<axum::Json<HcView>> {
    Ok(axum::Json(HcView::from(&find(&state, &name)?)))
}

async fn delete_hc(
    State(state): State<ApiState>,
    Path(name): Path<String>,
) -> ApiResult<axum::Json<HcView>> {
    let name = parse_name(&name)?;
    let registry = state.registry.clone();
    let hc = blocking(move || registry.delete(&name)).await?;
    tracing::info!(hc = %hc.name, "hybrid connection deleted");
    Ok(axum::Json(HcView::from(&hc)))
}

async fn show_keys(
    State(state): State<ApiState>,
    Path(name): Path<String>,
) -> ApiResult<axum::Json<HcKeys>> {
    let hc = find(&state, &name)?;
    Ok(axum::Json(HcKeys {
        connection_strings: connection_strings(&state, &hc),
        name: hc.name,
    }))
}

async fn regenerate_key(
    State(state): State<ApiState>,
    Path(name): Path<String>,
    body: Bytes,
) -> ApiResult<axum::Json<HcKeys>> {
    let name = parse_name(&name)?;
    let body: RegenerateBody = parse_body(&body)?;
    let right = match body.rule.parse::<Right>() {
        Ok(right @ (Right::Send | Right::Listen)) => right,
        _ => {
            return Err(ApiError::bad_request(format!(
                "unknown rule {:?}; use send or listen",
                body.rule
            )));
        }
    };
    let slot: KeySlot = body.key.parse().map_err(ApiError::bad_request)?;
    let registry = state.registry.clone();
    let hc = blocking(move || registry.regenerate(&name, right, slot)).await?;
    tracing::info!(hc = %hc.name, rule = %right, key = %slot, "key regenerated");
    Ok(axum::Json(HcKeys {
        connection_strings: connection_strings(&state, &hc),
        name: hc.name,
    }))
}

async fn show_manage_keys(State(state): State<ApiState>) -> axum::Json<SlotKeys> {
    axum::Json(state.registry.manage_keys())
}

async fn regenerate_manage_key(
    State(state): State<ApiState>,
    body: Bytes,
) -> ApiResult<axum::Json<SlotKeys>> {
    let body: RegenerateManageBody = parse_body(&body)?;
    let slot: KeySlot = body.key.parse().map_err(ApiError::bad_request)?;
    let registry = state.registry.clone();
    let keys = blocking(move || registry.regenerate_manage_key(slot)).await?;
    tracing::info!(key = %slot, "manage key regenerated; requests made with the old one are refused");
    Ok(axum::Json(keys))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state() -> (tempfile::TempDir, ApiState) {
        let dir = tempfile::tempdir().unwrap();
        let registry = Registry::open(dir.path()).unwrap();
        let state = ApiState {
            hub: Hub::new(registry.clone(), Default::default()),
            registry,
            public_host: "relay.example".into(),
            public_port: 9443,
            cert_sha256: [7; 32],
            azure: None,
        };
        (dir, state)
    }

    #[test]
    fn connection_strings_carry_relay_hc_rule_and_pin() {
        let (_dir, state) = state();
        let hc = state
            .registry
            .create("payroll".parse().unwrap(), "sql:1433".parse().unwrap())
            .unwrap();
        let strings = connection_strings(&state, &hc);
        let cs = &strings.listen.secondary;
        assert_eq!(cs.key, hc.listen.secondary);
        assert_eq!(cs.key_name, "listen");
        assert_eq!(
            cs.to_string(),
            format!(
                "Endpoint=sb://relay.example:9443/;SharedAccessKeyName=listen;SharedAccessKey={};EntityPath=payroll;CertificateSha256={}",
                hc.listen.secondary.as_str(),
                "07".repeat(32)
            )
        );
        assert_eq!(strings.send.primary.key, hc.send.primary);
        assert_eq!(strings.send.primary.key_name, "send");
    }

    #[test]
    fn registry_errors_map_to_statuses() {
        let name: HcName = "x".parse().unwrap();
        assert_eq!(
            ApiError::from(RegistryError::Duplicate(name.clone())).0,
            StatusCode::CONFLICT
        );
        assert_eq!(
            ApiError::from(RegistryError::NotFound(name)).0,
            StatusCode::NOT_FOUND
        );
        assert_eq!(
            ApiError::from(RegistryError::NoSuchRule(Right::Manage)).0,
            StatusCode::BAD_REQUEST
        );
        // Another relay kept winning: try again. etcd not answering: the
        // service is unavailable, not broken.
        let contention = EtcdError::Contention { what: "x".into() };
        assert_eq!(
            ApiError::from(RegistryError::from(contention)).0,
            StatusCode::CONFLICT
        );
        let down = EtcdError::Request {
            endpoints: "http://127.0.0.1:2379".into(),
            error: etcd_client::Error::InvalidArgs("x".into()),
        };
        assert_eq!(
            ApiError::from(RegistryError::from(down)).0,
            StatusCode::SERVICE_UNAVAILABLE
        );
    }
}
