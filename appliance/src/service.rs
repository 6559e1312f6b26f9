//! The running appliance: ties the relay client, the name map, the DNS
//! server, the routes, the tun and the netstack together, and takes them
//! down again in the reverse order.

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use netstack::{Ipv4Range, Netstack, StackConfig};
use proto::connection_string::ConnectionString;
use proto::name::{Endpoint, HcName};
use tokio::signal::unix::{SignalKind, signal};
use tracing::{info, warn};
use transport::sender::{Sender, SenderOptions};

use crate::config::ApplianceConfig;
use crate::dns::parse_resolv_conf;
use crate::dns::{DnsConfig, DnsServer};
use crate::flows::{self, Routing};
use crate::names::NameMap;
use crate::resolv::{self, ResolvPaths};
use crate::routing::{self, RoutingConfig, RulePrefs};
use crate::table::FlowTable;

/// How long start-up waits for the relay to announce the endpoints.
const ENDPOINT_WAIT: Duration = Duration::from_secs(15);

/// Why the appliance could not start or stopped.
#[derive(Debug, thiserror::Error)]
pub enum ApplianceError {
    /// The relay client could not start.
    #[error(transparent)]
    Sender(#[from] transport::sender::SendError),
    /// Routing setup failed.
    #[error(transparent)]
    Routing(#[from] routing::RoutingError),
    /// resolv.conf could not be read or rewritten.
    #[error(transparent)]
    Resolv(#[from] resolv::ResolvError),
    /// The DNS server failed.
    #[error(transparent)]
    Dns(#[from] crate::dns::DnsError),
    /// The name map failed.
    #[error(transparent)]
    Names(#[from] crate::names::NamesError),
    /// The tun or netstack failed.
    #[error("tun {tun}: {message}")]
    Netstack {
        /// The device.
        tun: String,
        /// What failed.
        message: String,
    },
    /// The state directory could not be made.
    #[error("cannot create the state directory {path}: {source}")]
    StateDir {
        /// The directory.
        path: std::path::PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
}

/// How often the config file is checked for changes.
const CONFIG_POLL: Duration = Duration::from_secs(2);

/// Runs the appliance until `shutdown` resolves, then undoes every change
/// it made to the namespace.
///
/// With `reload_from`, the config file is read again on SIGHUP and whenever
/// it changes ("Sync keys"): new connection strings get a new relay client
/// for new flows, while flows already open keep theirs, so streams of
/// unchanged hybrid connections are never cut. The range, tun and DNS
/// address are fixed for the life of the process.
pub async fn run(
    config: ApplianceConfig,
    reload_from: Option<PathBuf>,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<(), ApplianceError> {
    std::fs::create_dir_all(&config.state_dir).map_err(|source| ApplianceError::StateDir {
        path: config.state_dir.clone(),
        source,
    })?;
    let journal = config.state_dir.join("routing.journal");
    let resolv_paths = ResolvPaths::new(&config.state_dir);
    // A previous run that was killed may have left its changes behind.
    let leftovers =
        routing::cleanup_leftovers(routing::DEFAULT_TABLE, RulePrefs::default(), Some(&journal))?;
    if leftovers.any() {
        warn!(
            ?leftovers,
            "removed routing left behind by an appliance that did not exit cleanly"
        );
    }
    resolv::recover(&resolv_paths)?;

    let sender = Sender::start(config.connection_strings.clone(), sender_options())?;
    let endpoints = wait_for_endpoints(&sender).await;
    let table = FlowTable::new(endpoints.iter().map(|(n, e)| (n, e)));

    let range = config.virtual_range;
    let net = ipnet::Ipv4Net::new(range.network(), range.prefix_len()).map_err(|e| {
        ApplianceError::Netstack {
            tun: config.tun.clone(),
            message: format!("virtual range: {e}"),
        }
    })?;
    let mut names = NameMap::load_or_create(config.state_dir.join("names.json"), net)?;
    names.assign(&table.names())?;

    let tun =
        netstack::create_tun(&config.tun, config.mtu).map_err(|e| ApplianceError::Netstack {
            tun: config.tun.clone(),
            message: e.to_string(),
        })?;
    let mut routing_config = RoutingConfig::new(config.tun.clone());
    routing_config.range = range;
    routing_config.hosts = table.literal_addresses();
    routing_config.journal = Some(journal);
    let mut routes = routing::setup(&routing_config)?;

    // Forward other names to whatever the namespace used before us.
    let original = std::fs::read_to_string(&resolv_paths.resolv_conf).unwrap_or_default();
    let original = parse_resolv_conf(&original);
    let mut dns_config = DnsConfig::new(config.dns_listen, original.upstreams());
    dns_config.search = original.search.clone();
    let dns = DnsServer::start(dns_config, name_list(&names)).await?;
    let mut resolv_guard = resolv::point_at(&resolv_paths, config.dns_listen.ip())?;

    // Every address the kernel routes into the tun is ours to answer: the
    // routes decide what enters, the flow table what is served.
    let any = Ipv4Range::new(Ipv4Addr::UNSPECIFIED, 0).map_err(|e| ApplianceError::Netstack {
        tun: config.tun.clone(),
        message: e.to_string(),
    })?;
    let mut stack_config = StackConfig::new(vec![any]);
    stack_config.mtu = config.mtu;
    let stack = Netstack::spawn(tun, stack_config).map_err(|e| ApplianceError::Netstack {
        tun: config.tun.clone(),
        message: e.to_string(),
    })?;
    let (flow_rx, _datagrams, stack_handle) = stack.into_parts();
    let routing_state = Arc::new(RwLock::new(Routing {
        table,
        names: names.iter().map(|(n, ip)| (ip, n.to_string())).collect(),
        sender: sender.clone(),
    }));
    let flow_task = tokio::spawn(flows::serve(flow_rx, routing_state.clone()));
    for (name, ip) in names.iter() {
        info!(%name, %ip, "name mapped");
    }
    info!(tun = %config.tun, range = %range, dns = %config.dns_listen, "appliance running");
    // Under systemd (Type=notify), `systemctl start` returns only now, when
    // the names resolve and the range is routed.
    let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Ready]);

    // Follow the relay: new or changed endpoints are named and routed.
    let mut sender = sender;
    let mut strings = config.connection_strings.clone();
    let mut changes = sender.changes();
    let mut hangup = signal(SignalKind::hangup()).map_err(|e| ApplianceError::Netstack {
        tun: config.tun.clone(),
        message: format!("cannot watch SIGHUP: {e}"),
    })?;
    let mut last_modified = reload_from.as_deref().and_then(modified);
    let mut poll = tokio::time::interval(CONFIG_POLL);
    tokio::pin!(shutdown);
    loop {
        let reload = tokio::select! {
            _ = &mut shutdown => break,
            _ = hangup.recv() => true,
            _ = poll.tick() => {
                let now = reload_from.as_deref().and_then(modified);
                let changed = now != last_modified;
                last_modified = now;
                changed
            }
            changed = changes.changed() => {
                if changed.is_err() {
                    break;
                }
                false
            }
        };
        if reload {
            match reload_strings(reload_from.as_deref(), &strings) {
                Some(new) => {
                    info!(
                        hcs = new.len(),
                        "reloading: new connection strings; open flows keep theirs"
                    );
                    match Sender::start(new.clone(), sender_options()) {
                        Ok(fresh) => {
                            sender = fresh;
                            strings = new;
                            changes = sender.changes();
                            let _ = wait_for_endpoints(&sender).await;
                            routing_state
                                .write()
                                .unwrap_or_else(|p| p.into_inner())
                                .sender = sender.clone();
                        }
                        Err(e) => {
                            warn!(error = %e, "reload failed; keeping the running configuration")
                        }
                    }
                }
                None => info!("reload: connection strings unchanged"),
            }
        }
        {
            let endpoints: Vec<(HcName, Endpoint)> = sender
                .endpoints()
                .into_iter()
                .filter_map(|(n, e)| Some((n, e?)))
                .collect();
            let table = FlowTable::new(endpoints.iter().map(|(n, e)| (n, e)));
            let unchanged = routing_state
                .read()
                .map(|r| r.table == table)
                .unwrap_or(false);
            if unchanged {
                continue;
            }
            if let Err(e) = names.assign(&table.names()) {
                warn!(error = %e, "cannot name a new host");
            }
            if let Err(e) = routes.set_hosts(&table.literal_addresses()) {
                warn!(error = %e, "cannot route a new IPv4 endpoint");
            }
            if let Err(e) = dns.update(name_list(&names)) {
                warn!(error = %e, "cannot update the DNS names");
            }
            let mut r = routing_state.write().unwrap_or_else(|p| p.into_inner());
            r.table = table;
            r.names = names.iter().map(|(n, ip)| (ip, n.to_string())).collect();
            info!("hybrid connections changed; names and routes updated");
        }
    }

    info!("appliance stopping; undoing its changes");
    flow_task.abort();
    stack_handle.shutdown();
    if let Err(e) = resolv_guard.undo() {
        warn!(error = %e, "restoring resolv.conf failed");
    }
    if let Err(e) = dns.shutdown().await {
        warn!(error = %e, "stopping the DNS server failed");
    }
    routes.undo()?;
    Ok(())
}

fn sender_options() -> SenderOptions {
    SenderOptions {
        label: "appliance".into(),
        ..SenderOptions::default()
    }
}

fn modified(path: &Path) -> Option<std::time::SystemTime> {
    std::fs::metadata(path).and_then(|m| m.modified()).ok()
}

/// Reads the config file again; `Some` with its strings when they differ
/// from `current` (a bad file is logged and ignored: the running
/// configuration stays).
fn reload_strings(
    path: Option<&Path>,
    current: &[ConnectionString],
) -> Option<Vec<ConnectionString>> {
    let path = path?;
    match ApplianceConfig::load(path) {
        Ok(new) if new.connection_strings.as_slice() != current => Some(new.connection_strings),
        Ok(_) => None,
        Err(e) => {
            warn!(error = %e, "reload failed; keeping the running configuration");
            None
        }
    }
}

fn name_list(names: &NameMap) -> Vec<(String, Ipv4Addr)> {
    names.iter().map(|(n, ip)| (n.to_string(), ip)).collect()
}

/// Waits until the relay has announced an endpoint for every hybrid
/// connection, or [`ENDPOINT_WAIT`] has passed; returns those known.
async fn wait_for_endpoints(sender: &Sender) -> Vec<(HcName, Endpoint)> {
    let mut changes = sender.changes();
    let deadline = tokio::time::Instant::now() + ENDPOINT_WAIT;
    loop {
        let all = sender.endpoints();
        let known: Vec<(HcName, Endpoint)> = all
            .iter()
            .filter_map(|(n, e)| Some((n.clone(), e.clone()?)))
            .collect();
        if known.len() == all.len() || tokio::time::Instant::now() >= deadline {
            let missing: Vec<String> = all
                .iter()
                .filter(|(_, e)| e.is_none())
                .map(|(n, _)| n.to_string())
                .collect();
            if !missing.is_empty() {
                warn!(
                    ?missing,
                    "no endpoint from the relay yet for these; they are added when it arrives"
                );
            }
            return known;
        }
        let _ = tokio::time::timeout_at(deadline, changes.changed()).await;
    }
}
