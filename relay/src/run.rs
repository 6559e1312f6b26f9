//! Starting a relay: data dir, ports, background tasks.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tracing::info;

use crate::ca_cert::{CaCertFiles, CaCertWatch, RelayCertResolver, ServedCaCert};
use crate::hub::Hub;
use crate::identity::RelayIdentity;
use crate::metrics::RelayMetrics;
use crate::registry::Registry;
use crate::{api, identity, registry, server};

/// How a relay is run.
#[derive(Clone, Debug)]
pub struct RelayConfig {
    /// Where the certificate, registry and manage key live.
    pub data_dir: PathBuf,
    /// The port agents and senders dial (control channels and pipes, and
    /// Azure Relay's clients).
    pub listen: SocketAddr,
    /// More addresses serving exactly what `listen` serves (say port 443
    /// beside 9443). Connection strings name `listen` (or `public_port`).
    pub also_listen: Vec<SocketAddr>,
    /// A CA-issued certificate for clients that do not offer hybridlink's
    /// ALPN id (Azure Relay's), reloaded when its files change; hybridlink
    /// peers keep getting the pinned self-signed one (see
    /// [`crate::ca_cert`]).
    pub ca_cert: Option<CaCertFiles>,
    /// The management API (plain HTTP unless `api_tls`: then keep it on
    /// loopback or behind a TLS proxy).
    pub api: SocketAddr,
    /// Serve the management API over TLS with the relay's certificate (see
    /// [`crate::api_tls`]).
    pub api_tls: bool,
    /// Host name written into connection strings; defaults to the listen IP.
    pub public_host: Option<String>,
    /// Port written into connection strings; defaults to the bound port.
    pub public_port: Option<u16>,
    /// Relay-wide quotas.
    pub limits: Limits,
    /// Keep the registry in etcd, shared with other relays, instead of
    /// `DATA_DIR/registry.json` ([`crate::registry::etcd`]).
    pub etcd: Option<crate::registry::etcd::EtcdConfig>,
    /// `HOST:PORT` other relays' peers dial to reach this node, listed in
    /// etcd ([`crate::membership`]); defaults to the public host and port.
    /// Used only with `etcd`.
    pub advertise: Option<String>,
}

/// Relay-wide quotas; exceeding one is a clear error for that request or
/// session, never a crash.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Hybrid connections this relay holds at most.
    pub max_hcs: usize,
    /// Agents attached to one hybrid connection at most (25, as in the
    /// original product).
    pub max_agents_per_hc: usize,
    /// Pipes spliced at once (a pipe joins one sender to one agent and
    /// carries all their streams; the relay cannot count the streams inside).
    pub max_pipes: usize,
    /// Pipes spliced or pending at once for one hybrid connection, so that
    /// one tenant cannot take them all; `None`: a quarter of `max_pipes`.
    pub max_pipes_per_hc: Option<usize>,
    /// Pipe requests one sender session may have waiting for their ends;
    /// also the burst of requests it may make at once.
    pub max_pending_pipes_per_session: usize,
    /// Pipe requests a second one sender session may make after its burst.
    pub pipe_requests_per_second: u32,
    /// Connections not yet authenticated (a control channel before its
    /// first successful attach, a pipe before its ticket is found), relay-wide;
    /// more are closed at once.
    pub max_unauthenticated: usize,
    /// The same, from one source address.
    pub max_unauthenticated_per_ip: usize,
    /// The longest lifetime of a SAS token accepted (control channels and
    /// the management API), in seconds.
    pub max_token_lifetime: u64,
    /// Seconds after its token's expiry that an Azure-protocol listener may
    /// still renew it.
    pub renew_grace: u64,
    /// Seconds a sender's Azure-protocol HTTP request waits for its
    /// listener's response before it gets 504.
    pub http_response_timeout: u64,
    /// Azure-protocol HTTP requests one hybrid connection may have open
    /// (waiting for or receiving their response) at once.
    pub max_http_requests_per_hc: usize,
}

impl Default for Limits {
    fn default() -> Limits {
        Limits {
            max_hcs: 10_000,
            max_agents_per_hc: crate::hub::MAX_AGENTS_PER_HC,
            max_pipes: 100_000,
            max_pipes_per_hc: None,
            max_pending_pipes_per_session: crate::hub::MAX_PENDING_TICKETS_PER_SESSION,
            pipe_requests_per_second: crate::hub::PIPE_REQUESTS_PER_SECOND,
            max_unauthenticated: 1024,
            max_unauthenticated_per_ip: 64,
            max_token_lifetime: proto::sas::DEFAULT_MAX_TOKEN_LIFETIME,
            renew_grace: crate::hub::RENEW_GRACE,
            http_response_timeout: crate::azure::proxy::RESPONSE_TIMEOUT.as_secs(),
            max_http_requests_per_hc: 1024,
        }
    }
}

/// Open files the relay keeps for itself: its listeners, the registry and
/// identity files, the management API's connections, logs.
const FD_RESERVE: u64 = 128;
/// Open files one spliced pipe costs: the two sockets and the two ends of
/// each of the two kernel pipes that splice them.
pub const FDS_PER_PIPE: u64 = 6;

impl Limits {
    /// The pipes one hybrid connection may hold: `max_pipes_per_hc`, or a
    /// quarter of `max_pipes`.
    pub fn pipes_per_hc(&self) -> usize {
        self.max_pipes_per_hc.unwrap_or((self.max_pipes / 4).max(1))
    }

    /// These limits fitted to a process that may open `open_files` files
    /// (`None`: unlimited), with a sentence for each limit it lowered.
    ///
    /// A quarter of what is left after [`FD_RESERVE`] may go to connections
    /// not yet authenticated, an eighth is kept for control channels (one
    /// file each), and the rest is for pipes at [`FDS_PER_PIPE`] each. A
    /// relay past its file limit fails every `accept`, legitimate peers'
    /// included; within these quotas it refuses the extra request instead.
    pub fn fit_to_open_files(self, open_files: Option<u64>) -> (Limits, Vec<String>) {
        let Some(open_files) = open_files else {
            return (self, Vec::new());
        };
        let mut fitted = self;
        let mut notes = Vec::new();
        let budget = open_files.saturating_sub(FD_RESERVE);
        let unauthenticated = usize::try_from(budget / 4).unwrap_or(usize::MAX).max(1);
        if fitted.max_unauthenticated > unauthenticated {
            notes.push(format!(
                "--max-unauthenticated {} lowered to {unauthenticated}: this process may open {open_files} files (ulimit -n)",
                fitted.max_unauthenticated
            ));
            fitted.max_unauthenticated = unauthenticated;
        }
        // One address may not hold more than an eighth of them, so a few
        // addresses cannot take them all.
        fitted.max_unauthenticated_per_ip = fitted
            .max_unauthenticated_per_ip
            .min((fitted.max_unauthenticated / 8).max(1));
        let for_pipes = budget
            .saturating_sub(fitted.max_unauthenticated as u64)
            .saturating_sub(budget / 8);
        let pipes = usize::try_from(for_pipes / FDS_PER_PIPE)
            .unwrap_or(usize::MAX)
            .max(1);
        if fitted.max_pipes > pipes {
            notes.push(format!(
                "--max-pipes {} lowered to {pipes}: each pipe takes {FDS_PER_PIPE} open files and this process may open {open_files} (ulimit -n; the relay's unit sets LimitNOFILE=1048576)",
                fitted.max_pipes
            ));
            fitted.max_pipes = pipes;
        }
        (fitted, notes)
    }
}

/// Errors starting a relay.
#[derive(Debug, thiserror::Error)]
pub enum RelayError {
    /// Certificate could not be made or loaded.
    #[error(transparent)]
    Identity(#[from] identity::IdentityError),
    /// The CA-issued certificate could not be loaded.
    #[error(transparent)]
    CaCert(#[from] crate::ca_cert::CaCertError),
    /// rustls refused the relay port's configuration.
    #[error("cannot configure TLS: {0}")]
    Tls(#[from] rustls::Error),
    /// Registry could not be opened.
    #[error(transparent)]
    Registry(#[from] registry::RegistryError),
    /// A port could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The socket error.
        source: std::io::Error,
    },
}

/// A started relay.
#[derive(Debug)]
pub struct RunningRelay {
    /// Where the relay port is bound.
    pub listen: SocketAddr,
    /// Where the extra listeners are bound, in the order given.
    pub also_listen: Vec<SocketAddr>,
    /// SHA-256 of the CA-issued certificate served at start, if any.
    pub ca_cert_sha256: Option<[u8; 32]>,
    /// Where the management API is bound.
    pub api: SocketAddr,
    /// Whether the management API is served over TLS.
    pub api_tls: bool,
    /// SHA-256 of the relay certificate, as in connection strings.
    pub cert_sha256: [u8; 32],
    /// The live state; its metrics are [`Hub::render_metrics`].
    pub hub: Hub,
    /// The quotas in force: those asked for, fitted to the open-files limit.
    pub limits: Limits,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    /// This node's place in the etcd node list, if it has one.
    membership: Option<crate::membership::Membership>,
}

impl RunningRelay {
    /// Stops accepting (open connections are dropped with the runtime).
    pub fn stop(&self) {
        for t in &self.tasks {
            t.abort();
        }
    }

    /// Leaves the etcd node list at once (revoking this node's lease), so
    /// that the other nodes and the agents stop using it now rather than
    /// when its lease expires; a relay on its own has nothing to leave.
    /// Call it when stopping cleanly.
    pub async fn leave(&self) {
        if let Some(membership) = &self.membership {
            membership.leave().await;
        }
    }
}

impl Drop for RunningRelay {
    fn drop(&mut self) {
        self.stop();
    }
}

async fn bind(addr: SocketAddr) -> Result<TcpListener, RelayError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| RelayError::Bind { addr, source })
}

impl RelayConfig {
    /// Loads or creates the data dir, binds both ports and starts serving.
    pub async fn start(self) -> Result<RunningRelay, RelayError> {
        let mut names = vec!["localhost".to_string()];
        if let Some(h) = &self.public_host {
            names.push(h.clone());
        }
        let identity = RelayIdentity::load_or_create_with_names(&self.data_dir, &names)?;
        let ca = match &self.ca_cert {
            Some(files) => {
                let first = crate::ca_cert::read(files).await;
                let (watch, loaded) = CaCertWatch::start(files.clone(), first)?;
                Some((watch, ServedCaCert::new(loaded)))
            }
            None => None,
        };
        let ca_cert_sha256 = ca.as_ref().map(|(_, served)| served.get().sha256);
        let relay_tls = RelayCertResolver::new(
            identity.certified_key(),
            ca.as_ref().map(|(_, served)| served.clone()),
        )
        .server_config()?;
        let registry = match &self.etcd {
            None => Registry::open(&self.data_dir)?,
            Some(config) => Registry::open_etcd(&self.data_dir, config).await?,
        };
        let listener = bind(self.listen).await?;
        let mut also = Vec::new();
        for &addr in &self.also_listen {
            let extra = bind(addr).await?;
            let bound = extra
                .local_addr()
                .map_err(|source| RelayError::Bind { addr, source })?;
            also.push((extra, bound));
        }
        let also_listen: Vec<SocketAddr> = also.iter().map(|(_, bound)| *bound).collect();
        let api_listener = bind(self.api).await?;
        let listen = listener.local_addr().map_err(|source| RelayError::Bind {
            addr: self.listen,
            source,
        })?;
        let api = api_listener
            .local_addr()
            .map_err(|source| RelayError::Bind {
                addr: self.api,
                source,
            })?;
        let (limits, notes) = self.limits.fit_to_open_files(transport::fd_limit::soft());
        for note in notes {
            tracing::warn!("{note}");
        }
        registry.set_max_hcs(limits.max_hcs);
        let hub = Hub::new(registry.clone(), Arc::new(RelayMetrics::new()));
        hub.set_max_agents(limits.max_agents_per_hc);
        hub.set_max_pipes(limits.max_pipes, limits.pipes_per_hc());
        hub.set_pipe_requests(
            limits.max_pending_pipes_per_session,
            limits.pipe_requests_per_second,
        );
        hub.set_max_token_lifetime(limits.max_token_lifetime);
        hub.set_renew_grace(limits.renew_grace);
        let public_host = self
            .public_host
            .clone()
            .unwrap_or_else(|| listen.ip().to_string());
        let public_port = self.public_port.unwrap_or(listen.port());
        let advertise = self
            .advertise
            .clone()
            .unwrap_or_else(|| join_host_port(&public_host, public_port));
        let azure = crate::azure::Azure::new(
            hub.clone(),
            limits.max_agents_per_hc,
            std::time::Duration::from_secs(limits.http_response_timeout),
            limits.max_http_requests_per_hc,
        );
        let state = api::ApiState {
            registry: registry.clone(),
            public_host,
            public_port,
            cert_sha256: identity.cert_sha256(),
            hub: hub.clone(),
            azure: Some(azure.clone()),
        };
        let mut tasks = Vec::new();
        // One gate for all the listeners: the caps are the relay's.
        let gate = crate::preauth::PreAuthGate::new(crate::preauth::PreAuthLimits {
            max_total: limits.max_unauthenticated,
            max_per_ip: limits.max_unauthenticated_per_ip,
        });
        let listeners = std::iter::once(listener).chain(also.into_iter().map(|(l, _)| l));
        for listener in listeners {
            tasks.push(tokio::spawn(server::accept_loop(
                listener,
                hub.clone(),
                relay_tls.clone(),
                gate.clone(),
                azure.clone(),
            )));
        }
        let membership = self.etcd.as_ref().map(|etcd| {
            crate::membership::Membership::start(
                etcd.clone(),
                advertise,
                hub.clone(),
                proto::control::hex_encode(&identity.cert_sha256()),
            )
        });
        if let Some((watch, served)) = ca {
            tasks.push(tokio::spawn(crate::ca_cert::keep_reloading(watch, served)));
        }
        let router = api::router(state);
        if self.api_tls {
            let listener = crate::api_tls::TlsListener::new(api_listener, identity.server_config())
                .map_err(|source| RelayError::Bind {
                    addr: self.api,
                    source,
                })?;
            tasks.push(tokio::spawn(async move {
                if let Err(e) = axum::serve(listener, router).await {
                    tracing::error!(error = %e, "management API stopped");
                }
            }));
        } else {
            if !api.ip().is_loopback() {
                tracing::warn!(
                    %api,
                    "the management API is plain HTTP on an address that is not loopback: whatever crosses the network to it can be read; add --api-tls, or bind it to 127.0.0.1"
                );
            }
            tasks.push(tokio::spawn(async move {
                if let Err(e) = axum::serve(api_listener, router).await {
                    tracing::error!(error = %e, "management API stopped");
                }
            }));
        }
        // Tokens expire; sessions whose keys change or whose HC goes away are
        // re-checked at once.
        let sweeper = hub.clone();
        tasks.push(tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            loop {
                tick.tick().await;
                sweeper.expire_tokens();
            }
        }));
        let mut changes = registry.subscribe();
        let watcher = hub.clone();
        tasks.push(tokio::spawn(async move {
            loop {
                match changes.recv().await {
                    Ok(event) => {
                        // Manage keys guard only the API, which checks them on
                        // every request: no session depends on them.
                        if let Some(name) = event.hc() {
                            watcher.recheck(name);
                        }
                    }
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {
                        for name in watcher.attached_hcs() {
                            watcher.recheck(&name);
                        }
                    }
                    Err(_) => return,
                }
            }
        }));
        info!(
            %listen,
            ?also_listen,
            %api,
            api_tls = self.api_tls,
            ca_cert = ca_cert_sha256.is_some(),
            "relay serving"
        );
        Ok(RunningRelay {
            listen,
            also_listen,
            ca_cert_sha256,
            api,
            api_tls: self.api_tls,
            cert_sha256: identity.cert_sha256(),
            hub,
            limits,
            tasks,
            membership,
        })
    }
}

/// `HOST:PORT`, with an IPv6 literal in brackets.
fn join_host_port(host: &str, port: u16) -> String {
    if host.contains(':') && !host.starts_with('[') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quotas_fit_the_open_files_limit() {
        let asked = Limits::default();
        // Unlimited or plenty: nothing changes.
        assert_eq!(asked.fit_to_open_files(None).1, Vec::<String>::new());
        let (fitted, notes) = asked.fit_to_open_files(Some(1 << 20));
        assert!(notes.is_empty(), "{notes:?}");
        assert_eq!(fitted.max_pipes, asked.max_pipes);
        // systemd's default soft limit: both quotas come down, and what
        // they need fits in it.
        let (fitted, notes) = asked.fit_to_open_files(Some(1024));
        assert_eq!(notes.len(), 2, "{notes:?}");
        assert!(
            notes[1].contains("--max-pipes 100000 lowered to"),
            "{notes:?}"
        );
        let needed =
            FD_RESERVE + fitted.max_unauthenticated as u64 + fitted.max_pipes as u64 * FDS_PER_PIPE;
        assert!(needed <= 1024, "{needed}");
        assert!(fitted.max_unauthenticated_per_ip <= fitted.max_unauthenticated);
        assert!(fitted.max_pipes >= 50, "{}", fitted.max_pipes);
    }
}
