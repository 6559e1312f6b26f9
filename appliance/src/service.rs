//! The running appliance: ties the relay client, the name map, the DNS
//! server, the routes, the tun and the netstack together, and takes them
//! down again in the reverse order.

use std::net::{IpAddr, Ipv4Addr};
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use netstack::{Ipv4Range, Netstack, StackConfig};
use proto::connection_string::ConnectionString;
use proto::name::{Endpoint, HcName};
use tokio::signal::unix::{SignalKind, signal};
use tracing::{info, warn};
use transport::sender::SenderOptions;

use crate::config::ApplianceConfig;
use crate::dns::{DnsConfig, DnsServer};
use crate::flows::{self, Dispatch};
use crate::gate::{Decisions, Gate, GateState};
use crate::metrics::ApplianceMetrics;
use crate::names::NameMap;
use crate::never_route::{self, HostAddress, NeverRoute};
use crate::resolv::parse_resolv_conf;
use crate::resolv::{self, ResolvPaths};
use crate::routing::{self, RoutingConfig, RoutingGuard, RulePrefs};
use crate::status::{self, ApplianceHcStatus, Status};
use crate::table::FlowTable;
use crate::upstream::{UpstreamError, Upstreams};

/// How long start-up waits for the relay to announce the endpoints.
const ENDPOINT_WAIT: Duration = Duration::from_secs(15);

/// Why the appliance could not start or stopped.
#[derive(Debug, thiserror::Error)]
pub enum ApplianceError {
    /// A relay client could not start.
    #[error(transparent)]
    Upstream(#[from] UpstreamError),
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

/// How often the host's own addresses are read again (they decide the
/// never-route set and which sources the netstack takes flows from).
const HOST_ADDRESS_POLL: Duration = Duration::from_secs(10);

/// Runs the appliance until `shutdown` resolves, then undoes every change
/// it made to the namespace.
///
/// With `reload_from`, the config file is read again on SIGHUP and whenever
/// it changes ("Sync keys"): new connection strings get a new relay client
/// for new flows, while flows already open keep theirs, so streams of
/// unchanged hybrid connections are never cut. The range, tun and DNS
/// address are fixed for the life of the process.
///
/// Flows, DNS queries and the relay clients count into `metrics`.
pub async fn run(
    config: ApplianceConfig,
    reload_from: Option<PathBuf>,
    metrics: Arc<ApplianceMetrics>,
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

    // Read before the appliance takes DNS over: where the namespace
    // resolves, and what the relay's names resolve to.
    let original = std::fs::read_to_string(&resolv_paths.resolv_conf).unwrap_or_default();
    let original = parse_resolv_conf(&original);
    let upstreams: Vec<Ipv4Addr> = original
        .upstreams()
        .iter()
        .filter_map(|a| match a.ip() {
            IpAddr::V4(ip) => Some(ip),
            IpAddr::V6(_) => None,
        })
        .collect();
    let host = read_host_addresses(&[]);
    let never = relay_never_route(&config.connection_strings, &upstreams, host.clone()).await;
    let mut gate = Gate::new(config.allow.clone(), never);

    let sender_options = SenderOptions {
        counters: metrics.control().clone(),
        ..sender_options()
    };
    let sender = start_upstreams(&config, sender_options.clone())?;
    let endpoints = wait_for_endpoints(&sender).await;
    let decisions = gate.decide(&endpoints);
    log_decisions(&decisions);
    let table = FlowTable::new(decisions.allowed());

    let range = config.virtual_range;
    let mut names = NameMap::load_or_create(config.state_dir.join("names.json"), range)?;
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
    let mut dns_config = DnsConfig::new(config.dns_listen, original.upstreams());
    dns_config.search = original.search.clone();
    dns_config.counters = metrics.dns().clone();
    let served = served_names(&names, &table);
    let dns = DnsServer::start(dns_config, served.clone()).await?;
    let mut resolv_guard = resolv::point_at(&resolv_paths, config.dns_listen.ip())?;

    // Every address the kernel routes into the tun is ours to answer: the
    // routes decide what enters, the flow table what is served. Packets
    // enter only from this host's own addresses: the rules into the tun
    // match only locally generated packets, and the netstack checks again.
    let any = Ipv4Range::new(Ipv4Addr::UNSPECIFIED, 0).map_err(|e| ApplianceError::Netstack {
        tun: config.tun.clone(),
        message: e.to_string(),
    })?;
    let mut stack_config = StackConfig::new(vec![any]);
    stack_config.mtu = config.mtu;
    stack_config.max_flows = config.max_flows;
    stack_config.sources = Some(own_sources(&host));
    let stack = Netstack::spawn(tun, stack_config).map_err(|e| ApplianceError::Netstack {
        tun: config.tun.clone(),
        message: e.to_string(),
    })?;
    let (flow_rx, _datagrams, stack_handle) = stack.into_parts();
    let dispatch = Arc::new(RwLock::new(Dispatch {
        table,
        names: names.iter().map(|(n, ip)| (ip, n.to_string())).collect(),
        upstreams: sender.clone(),
    }));
    let flow_task = tokio::spawn(flows::serve(flow_rx, dispatch.clone(), metrics));
    for (name, ip) in served {
        info!(%name, %ip, "name mapped");
    }
    let status_path = config.state_dir.join(status::STATUS_FILE);
    write_status(&status_path, &gate, &decisions, &names, &sender);
    info!(tun = %config.tun, range = %range, dns = %config.dns_listen, "appliance running");
    // Under systemd (Type=notify), `systemctl start` returns only now, when
    // the names resolve and the range is routed.
    let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Ready]);

    // Follow the relay: new or changed endpoints are named and routed when
    // the gate lets them in.
    let mut sender = sender;
    let mut reached = Reached::of(&config);
    let mut allow = config.allow.clone();
    let mut changes = sender.changes();
    let mut hangup = signal(SignalKind::hangup()).map_err(|e| ApplianceError::Netstack {
        tun: config.tun.clone(),
        message: format!("cannot watch SIGHUP: {e}"),
    })?;
    let mut last_modified = reload_from.as_deref().and_then(modified);
    let mut poll = tokio::time::interval(CONFIG_POLL);
    let mut host_poll = tokio::time::interval(HOST_ADDRESS_POLL);
    host_poll.tick().await;
    let mut host = host;
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
            _ = host_poll.tick() => {
                let fresh = read_host_addresses(&host);
                if gate.never_route_mut().set_host_addresses(fresh.clone()) {
                    info!(addresses = ?fresh, "this host's addresses changed");
                    stack_handle.set_sources(Some(own_sources(&fresh)));
                    host = fresh;
                }
                false
            }
            changed = changes.changed() => {
                if changed.is_err() {
                    break;
                }
                false
            }
        };
        if reload {
            match reload_config(reload_from.as_deref()) {
                Some(new) if Reached::of(&new) != reached => {
                    info!(
                        hcs = new.connection_strings.len(),
                        "reloading: new connection strings or endpoints; open flows keep theirs"
                    );
                    match start_upstreams(&new, sender_options.clone()) {
                        Ok(fresh) => {
                            sender = fresh;
                            reached = Reached::of(&new);
                            changes = sender.changes();
                            *gate.never_route_mut() = relay_never_route(
                                &new.connection_strings,
                                &upstreams,
                                host.clone(),
                            )
                            .await;
                            let _ = wait_for_endpoints(&sender).await;
                            dispatch
                                .write()
                                .unwrap_or_else(|p| p.into_inner())
                                .upstreams = sender.clone();
                        }
                        Err(e) => {
                            warn!(error = %e, "reload failed; keeping the running configuration")
                        }
                    }
                    if new.allow != allow {
                        info!("reloading: a new allow list");
                        allow = new.allow.clone();
                        gate.set_allow(allow.clone());
                    }
                }
                Some(new) if new.allow != allow => {
                    info!("reloading: a new allow list");
                    allow = new.allow.clone();
                    gate.set_allow(allow.clone());
                }
                Some(_) => info!("reload: configuration unchanged"),
                None => {}
            }
        }
        let decisions = gate.decide(&sender.endpoints());
        log_decisions(&decisions);
        let table = FlowTable::new(decisions.allowed());
        let unchanged = dispatch.read().map(|d| d.table == table).unwrap_or(false);
        if !unchanged {
            apply(&table, &mut names, &mut routes, &dns, &dispatch);
        }
        if !unchanged || !decisions.changed.is_empty() {
            write_status(&status_path, &gate, &decisions, &names, &sender);
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
    if let Err(e) = status::remove(&status_path) {
        warn!(error = %e, path = %status_path.display(), "cannot remove the status file");
    }
    Ok(())
}

/// Serves `table`: names get addresses (kept in names.json even when a name
/// is no longer served, so its address is not handed to another name too
/// soon), DNS answers only the names served now, and the IPv4 literals
/// served now are routed into the tun.
fn apply(
    table: &FlowTable,
    names: &mut NameMap,
    routes: &mut RoutingGuard,
    dns: &DnsServer,
    dispatch: &RwLock<Dispatch>,
) {
    if let Err(e) = names.assign(&table.names()) {
        warn!(error = %e, "cannot name a new host");
    }
    if let Err(e) = routes.set_hosts(&table.literal_addresses()) {
        warn!(error = %e, "cannot route a new IPv4 endpoint");
    }
    if let Err(e) = dns.update(served_names(names, table)) {
        warn!(error = %e, "cannot update the DNS names");
    }
    let mut d = dispatch.write().unwrap_or_else(|p| p.into_inner());
    d.table = table.clone();
    d.names = names.iter().map(|(n, ip)| (ip, n.to_string())).collect();
    info!("hybrid connections changed; names and routes updated");
}

/// One line per change of what the gate decided: WARN for a refusal (once
/// per refused endpoint, since only changes come here), INFO otherwise.
fn log_decisions(decisions: &Decisions) {
    for v in &decisions.changed {
        let endpoint = v.endpoint.as_ref().map(ToString::to_string);
        let endpoint = endpoint.as_deref().unwrap_or("-");
        match &v.state {
            GateState::Ok => {
                let rule = v.rule.as_ref().map(ToString::to_string).unwrap_or_default();
                info!(hc = %v.hc, endpoint, allowed_by = %rule, "serving the endpoint");
            }
            GateState::Waiting => info!(hc = %v.hc, "the relay announces no endpoint; not served"),
            refused => warn!(
                hc = %v.hc,
                endpoint,
                reason = %refused,
                "refusing the endpoint the relay announced: no name answered, no route added"
            ),
        }
    }
}

/// Writes `status.json`; a failure is logged, never fatal.
fn write_status(
    path: &Path,
    gate: &Gate,
    decisions: &Decisions,
    names: &NameMap,
    sender: &Upstreams,
) {
    let hcs = decisions
        .verdicts
        .iter()
        .map(|v| {
            let address = match (&v.state, &v.endpoint) {
                (GateState::Ok, Some(e)) => match e.host() {
                    proto::name::Host::Ipv4(ip) => Some(ip.to_string()),
                    proto::name::Host::Dns(name) => {
                        names.lookup_name(name).map(|ip| ip.to_string())
                    }
                },
                _ => None,
            };
            ApplianceHcStatus {
                name: v.hc.to_string(),
                endpoint: v.endpoint.as_ref().map(ToString::to_string),
                address,
                state: v.state.to_string(),
                end_to_end: if sender.end_to_end(&v.hc) {
                    "verified".into()
                } else {
                    "relay-trusted".into()
                },
            }
        })
        .collect();
    let allow = gate
        .allow()
        .entries()
        .iter()
        .map(ToString::to_string)
        .collect();
    let status = Status::new(gate.source().to_string(), allow, hcs);
    if let Err(e) = status.write(path) {
        warn!(error = %e, "cannot write the status file");
    }
}

/// The names DNS answers: those of the endpoints served now.
fn served_names(names: &NameMap, table: &FlowTable) -> Vec<(String, Ipv4Addr)> {
    table
        .names()
        .into_iter()
        .filter_map(|n| {
            let ip = names.lookup_name(&n)?;
            Some((n, ip))
        })
        .collect()
}

/// The never-route set for a relay reached through `strings`: their hosts,
/// and the addresses those resolve to now.
async fn relay_never_route(
    strings: &[ConnectionString],
    upstreams: &[Ipv4Addr],
    host: Vec<HostAddress>,
) -> NeverRoute {
    let relays: Vec<(String, u16)> = strings
        .iter()
        .map(|cs| (cs.relay_host.clone(), cs.relay_port))
        .collect();
    let hosts: Vec<String> = relays.iter().map(|(h, _)| h.clone()).collect();
    let addrs = tokio::task::spawn_blocking(move || {
        let mut all = Vec::new();
        for (h, port) in relays {
            let found = never_route::resolve(&h, port);
            if found.is_empty() {
                warn!(relay = %h, "the relay's name does not resolve now; only the name itself is kept out of DNS");
            }
            all.extend(found);
        }
        all
    })
    .await
    .unwrap_or_default();
    NeverRoute::new(&hosts, &addrs, upstreams, host)
}

/// This host's addresses, or `previous` when they cannot be read.
fn read_host_addresses(previous: &[HostAddress]) -> Vec<HostAddress> {
    match never_route::host_addresses() {
        Ok(a) => a,
        Err(e) => {
            warn!(error = %e, "keeping the addresses read before");
            previous.to_vec()
        }
    }
}

/// The sources the netstack takes packets from: loopback and this host's
/// own addresses.
fn own_sources(host: &[HostAddress]) -> Vec<Ipv4Range> {
    // 127.0.0.0 has no host bits under /8.
    let loopback = Ipv4Range::new(Ipv4Addr::new(127, 0, 0, 0), 8).expect("127.0.0.0/8 is a range");
    let mut out = vec![loopback];
    out.extend(host.iter().map(|a| Ipv4Range::host(a.net.addr())));
    out
}

/// What decides the relay clients: a change of it on reload starts new
/// ones.
#[derive(PartialEq)]
struct Reached {
    strings: Vec<ConnectionString>,
    endpoints: std::collections::BTreeMap<HcName, Endpoint>,
    ca_file: Option<PathBuf>,
}

impl Reached {
    fn of(config: &ApplianceConfig) -> Reached {
        Reached {
            strings: config.connection_strings.clone(),
            endpoints: config.endpoints.clone(),
            ca_file: config.ca_file.clone(),
        }
    }
}

/// The relay clients of `config`'s strings.
fn start_upstreams(
    config: &ApplianceConfig,
    options: SenderOptions,
) -> Result<Upstreams, UpstreamError> {
    Upstreams::start(
        &config.connection_strings,
        &config.endpoints,
        config.ca_file.as_deref(),
        options,
    )
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

/// Reads the config file again; a bad file is logged and ignored (the
/// running configuration stays).
fn reload_config(path: Option<&Path>) -> Option<ApplianceConfig> {
    let path = path?;
    match ApplianceConfig::load(path) {
        Ok(new) => Some(new),
        Err(e) => {
            warn!(error = %e, "reload failed; keeping the running configuration");
            None
        }
    }
}

/// Asks the relay for the endpoints of the hybrid connections of `strings`
/// (as `appliance install` does, to write its allow list): waits until each
/// is announced or `ENDPOINT_WAIT` (15 s) has passed; `None` for those still
/// unknown then.
pub async fn announced_endpoints(
    strings: Vec<ConnectionString>,
) -> Result<Vec<(HcName, Option<Endpoint>)>, ApplianceError> {
    let strings: Vec<ConnectionString> = strings
        .into_iter()
        .filter(|cs| cs.cert_sha256.is_some())
        .collect();
    if strings.is_empty() {
        return Ok(Vec::new());
    }
    let sender = Upstreams::start(&strings, &Default::default(), None, sender_options())?;
    Ok(wait_for_endpoints(&sender).await)
}

/// Waits until the relay has announced an endpoint for every hybrid
/// connection, or [`ENDPOINT_WAIT`] has passed; returns them all, `None`
/// for those still unknown.
async fn wait_for_endpoints(sender: &Upstreams) -> Vec<(HcName, Option<Endpoint>)> {
    let mut changes = sender.changes();
    let deadline = tokio::time::Instant::now() + ENDPOINT_WAIT;
    loop {
        let all = sender.endpoints();
        let known = all.iter().filter(|(_, e)| e.is_some()).count();
        if known == all.len() || tokio::time::Instant::now() >= deadline {
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
            return all;
        }
        let _ = tokio::time::timeout_at(deadline, changes.changed()).await;
    }
}
