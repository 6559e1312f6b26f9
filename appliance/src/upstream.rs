//! Where the appliance's flows go: a hybridlink relay's pipes for strings
//! that pin its certificate, and one Azure Relay WebSocket per flow for
//! strings that do not (an Azure Relay namespace, or a hybridlink relay's
//! Azure front door).
//!
//! A hybridlink relay announces each hybrid connection's endpoint; an Azure
//! namespace knows none, so those come from the appliance's own config and
//! pass the same gate (allow list) as announced ones.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::Arc;

use proto::connection_string::ConnectionString;
use proto::name::{Endpoint, HcName};
use tokio::sync::watch;
use tracing::{info, warn};
use transport::azure::{AzureSender, AzureStream, Framing};
use transport::sender::{SendError, Sender, SenderOptions, Stream};

/// Why the upstreams could not start.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    /// The hybridlink relay's client could not start.
    #[error(transparent)]
    Sender(#[from] SendError),
    /// An Azure-protocol string cannot be used (trust, address).
    #[error("{hc}: {source}")]
    Azure {
        /// The hybrid connection.
        hc: HcName,
        /// Why.
        source: transport::azure::AzureError,
    },
    /// An Azure-protocol string without an endpoint in the config.
    #[error(transparent)]
    NoEndpoint(#[from] crate::config::ConfigError),
}

/// A stream to a hybrid connection's target, either kind.
#[derive(Debug)]
pub enum Upstream {
    /// A stream on a hybridlink relay's pipe.
    Native(Stream),
    /// A WebSocket through an Azure-protocol relay.
    Azure(AzureStream),
}

/// One hybrid connection reached over Azure Relay's protocol.
#[derive(Debug)]
struct AzureRoute {
    sender: AzureSender,
    endpoint: Endpoint,
}

/// Opens streams to every hybrid connection of the appliance's strings.
/// Cheap to clone.
#[derive(Clone, Debug)]
pub struct Upstreams {
    native: Option<Sender>,
    azure: Arc<HashMap<HcName, AzureRoute>>,
    /// Ticks never, for an appliance with no native string: kept so that
    /// [`Upstreams::changes`] stays open.
    quiet: Arc<watch::Sender<u64>>,
}

impl Upstreams {
    /// Starts the clients of `strings`: pinned ones through one
    /// [`Sender`], the others over Azure Relay's protocol to the endpoint
    /// `endpoints` names for them, trusting `ca_file` or the system's roots.
    pub fn start(
        strings: &[ConnectionString],
        endpoints: &BTreeMap<HcName, Endpoint>,
        ca_file: Option<&Path>,
        options: SenderOptions,
    ) -> Result<Upstreams, UpstreamError> {
        let (native, azure): (Vec<_>, Vec<_>) =
            strings.iter().partition(|cs| cs.cert_sha256.is_some());
        let native = if native.is_empty() {
            None
        } else {
            Some(Sender::start(
                native.into_iter().cloned().collect(),
                options,
            )?)
        };
        let mut routes = HashMap::new();
        for cs in azure {
            let endpoint = endpoints
                .get(&cs.hc)
                .cloned()
                .ok_or_else(|| crate::config::ConfigError::NoEndpoint(cs.hc.clone()))?;
            // azbridge's default port name is the port as text, so an
            // `azbridge -T` listener with default names takes these too.
            let framing = Framing::Azbridge(endpoint.port().to_string());
            let sender =
                AzureSender::new(cs, ca_file, framing).map_err(|source| UpstreamError::Azure {
                    hc: cs.hc.clone(),
                    source,
                })?;
            if cs.end_to_end_key.is_some() {
                info!(hc = %cs.hc, %endpoint, "over Azure Relay's protocol, verified end to end (only hybridlink agents proving the EndToEndKey are reached)");
            } else {
                warn!(hc = %cs.hc, %endpoint, "over Azure Relay's protocol without an EndToEndKey: the relay could read this traffic");
            }
            routes.insert(cs.hc.clone(), AzureRoute { sender, endpoint });
        }
        Ok(Upstreams {
            native,
            azure: Arc::new(routes),
            quiet: Arc::new(watch::channel(0).0),
        })
    }

    /// Each hybrid connection with its endpoint: as the hybridlink relay
    /// announced it (`None` until it has), or as the config gives it.
    pub fn endpoints(&self) -> Vec<(HcName, Option<Endpoint>)> {
        let mut out = self
            .native
            .as_ref()
            .map(Sender::endpoints)
            .unwrap_or_default();
        out.extend(
            self.azure
                .iter()
                .map(|(hc, route)| (hc.clone(), Some(route.endpoint.clone()))),
        );
        out
    }

    /// Ticks whenever the announced endpoints may have changed.
    pub fn changes(&self) -> watch::Receiver<u64> {
        match &self.native {
            Some(sender) => sender.changes(),
            None => self.quiet.subscribe(),
        }
    }

    /// Whether streams of `hc` are verified end to end.
    pub fn end_to_end(&self, hc: &HcName) -> bool {
        match self.azure.get(hc) {
            Some(route) => route.sender.connection_string().end_to_end_key.is_some(),
            None => self.native.as_ref().is_some_and(|s| s.end_to_end(hc)),
        }
    }

    /// Whether `hc` goes over Azure Relay's protocol.
    pub fn is_azure(&self, hc: &HcName) -> bool {
        self.azure.contains_key(hc)
    }

    /// Opens a stream to the target of `hc`; resolves once the target is
    /// connected (hybridlink agents dial before they answer; an azbridge
    /// listener accepts first and closes the stream if its dial fails).
    pub async fn open(&self, hc: &HcName) -> Result<Upstream, String> {
        if let Some(route) = self.azure.get(hc) {
            return route.sender.open().await.map(Upstream::Azure);
        }
        match &self.native {
            Some(sender) => sender
                .open(hc)
                .await
                .map(Upstream::Native)
                .map_err(|e| e.to_string()),
            None => Err(format!("{hc}: no connection string for it")),
        }
    }
}
