//! `hybridlink appliance ...`

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use anyhow::Context;
use appliance::allow::{AllowEntry, AllowList};
use appliance::config::{ApplianceConfig, check_tun, parse_range};
use appliance::status::{STATUS_FILE, Status};
use clap::Subcommand;
use proto::connection_string::ConnectionString;
use proto::name::{Endpoint, HcName};

use crate::install::{RunAs, Unit};

/// Appliance subcommands.
#[derive(Subcommand, Debug)]
pub enum ApplianceCommand {
    /// Run the sidecar (as root, in the app's network namespace): create a
    /// tun device, route the virtual range and every IPv4-literal endpoint
    /// into it, answer DNS for the hybrid connections' host names, and carry
    /// each TCP flow of the app to the on-prem target through the relay.
    /// Every change to the namespace (routes, rules, sysctls, resolv.conf)
    /// is undone on exit, and by the next start after a crash.
    Run(RunArgs),
    /// Set the appliance up as a systemd service on the app's host: adds the
    /// send connection strings to /etc/hybridlink/appliance.toml (mode 0600;
    /// a string for a hybrid connection already there replaces it), adds the
    /// hosts the relay announces for them now to its `allow` list (the
    /// relay may later move an endpoint only within that list; edit it to
    /// allow more), writes /etc/systemd/system/hybridlink-appliance.service,
    /// enables and (re)starts it. Later changes to the file are picked up on
    /// `systemctl reload hybridlink-appliance` (SIGHUP).
    Install {
        /// A send connection string (`hybridlink hc keys NAME --rule send
        /// --key primary`); repeat for more hybrid connections. Other users
        /// of this machine can read a command line: prefer
        /// --connection-string-file.
        #[arg(long = "connection-string", value_name = "CS")]
        connection_strings: Vec<ConnectionString>,
        /// Read send connection strings from FILE, or from standard input
        /// with `-` (one a line, `#` starts a comment). Without this or
        /// --connection-string, HYBRIDLINK_CONNECTION_STRING holds them.
        #[arg(long, value_name = "FILE")]
        connection_string_file: Option<PathBuf>,
        /// Also allow this host name, `.suffix` or IPv4 network; repeat for
        /// more.
        #[arg(long = "allow", value_name = "ENTRY")]
        allow: Vec<AllowEntry>,
        /// The endpoint of a hybrid connection reached over Azure Relay's
        /// protocol (a send string without CertificateSha256: an Azure Relay
        /// namespace, or a hybridlink relay's Azure front door), whose relay
        /// names none: `NAME=HOST:PORT`, or `HOST:PORT` when only one goes that
        /// way. The app reaches it by this name and port; `allow` applies.
        /// Repeatable; adds to the config's `[endpoints]`.
        #[arg(long = "endpoint", value_name = "[NAME=]HOST:PORT", value_parser = crate::connection_strings::parse_named_endpoint)]
        endpoints: Vec<(Option<HcName>, Endpoint)>,
        /// For send strings without CertificateSha256: the CA certificates
        /// (PEM) that may issue the relay's certificate. Default: the system's.
        #[arg(long, value_name = "FILE")]
        ca_file: Option<PathBuf>,
        #[command(flatten)]
        install: crate::install::InstallArgs,
    },
    /// Show what the appliance running with this state dir serves: each
    /// hybrid connection, its endpoint, the address the app connects to,
    /// and `ok`, `not announced by the relay` or why it is refused.
    Status {
        /// The appliance's state dir.
        #[arg(long, default_value = "/var/lib/hybridlink-appliance")]
        state_dir: PathBuf,
        /// Print the status as JSON.
        #[arg(long)]
        json: bool,
    },
}

impl ApplianceCommand {
    /// The threads `appliance run` was asked for.
    pub fn threads(&self) -> Option<u16> {
        match self {
            ApplianceCommand::Run(args) => args.threads.threads,
            _ => None,
        }
    }
}

/// Options of `appliance run`.
#[derive(clap::Args, Debug)]
pub struct RunArgs {
    /// A TOML config file (see the README for its keys).
    #[arg(long, conflicts_with_all = ["connection_strings", "connection_string_file"])]
    config: Option<PathBuf>,
    /// A send connection string (`hybridlink hc keys NAME`); repeat for
    /// more hybrid connections. Other users of this machine can read a
    /// command line: prefer --config or --connection-string-file.
    #[arg(long = "connection-string", value_name = "CS")]
    connection_strings: Vec<ConnectionString>,
    /// Read send connection strings from FILE, or from standard input with
    /// `-` (one a line, `#` starts a comment). Without --config, this or
    /// --connection-string, HYBRIDLINK_CONNECTION_STRING holds them.
    #[arg(long, value_name = "FILE")]
    connection_string_file: Option<PathBuf>,
    /// The range host names resolve into (default 127.77.0.0/16).
    #[arg(long)]
    virtual_range: Option<String>,
    /// The tun device's name (default hl0).
    #[arg(long)]
    tun: Option<String>,
    /// Where the DNS server listens (default 127.0.0.53:53).
    #[arg(long)]
    dns_listen: Option<SocketAddr>,
    /// Where the name map and the resolv.conf backup are kept (default
    /// /var/lib/hybridlink-appliance).
    #[arg(long)]
    state_dir: Option<PathBuf>,
    /// Most TCP connections through the tun held at once, 1 to 1048576
    /// (default 65536; `max_flows` in the config). One past it is refused;
    /// each idle one costs about 10 to 25 KiB.
    #[arg(long, value_name = "N", value_parser = parse_max_flows_arg)]
    max_flows: Option<usize>,
    /// Allow the relay to announce this host name, `.suffix` or IPv4
    /// network; repeat for more. Replaces the config's `allow`. Without
    /// either, each hybrid connection's first announced host is allowed.
    #[arg(long = "allow", value_name = "ENTRY")]
    allow: Vec<AllowEntry>,
    /// The endpoint of a hybrid connection reached over Azure Relay's
    /// protocol (a send string without CertificateSha256: an Azure Relay
    /// namespace, or a hybridlink relay's Azure front door), whose relay
    /// names none: `NAME=HOST:PORT`, or `HOST:PORT` when only one goes that
    /// way. The app reaches it by this name and port; `allow` applies.
    /// Repeatable; adds to the config's `[endpoints]`.
    #[arg(long = "endpoint", value_name = "[NAME=]HOST:PORT", value_parser = crate::connection_strings::parse_named_endpoint)]
    endpoints: Vec<(Option<HcName>, Endpoint)>,
    /// For send strings without CertificateSha256: the CA certificates
    /// (PEM) that may issue the relay's certificate. Default: the system's.
    #[arg(long, value_name = "FILE")]
    ca_file: Option<PathBuf>,
    /// Serve Prometheus metrics at http://ADDR/metrics: app connections
    /// carried, refused and active per hybrid connection, bytes each way,
    /// DNS queries by answer, reconnects, token renewals.
    #[arg(long, value_name = "ADDR")]
    metrics: Option<SocketAddr>,
    #[command(flatten)]
    threads: crate::threads::ThreadsArg,
}

/// `--max-flows`, checked like `max_flows` in the config.
fn parse_max_flows_arg(s: &str) -> Result<usize, String> {
    let n: i64 = s
        .parse()
        .map_err(|_| format!("{s:?} is not a number of connections"))?;
    appliance::config::parse_max_flows(n).map_err(|e| e.to_string())
}

/// Where `appliance install` keeps the config.
pub const APPLIANCE_CONF: &str = "/etc/hybridlink/appliance.toml";

async fn install(
    strings: Vec<ConnectionString>,
    allow: Vec<AllowEntry>,
    reached: Reached,
    args: &crate::install::InstallArgs,
) -> anyhow::Result<()> {
    let path = args.under_root(std::path::Path::new(APPLIANCE_CONF));
    let mut config = if path.exists() {
        ApplianceConfig::load(&path)?
    } else {
        ApplianceConfig::new(strings.clone())?
    };
    // The hosts the relay announces now are learnt for the strings being
    // added, or for all of them when the config had no list yet (an older
    // install): the list must not shut out what the appliance serves today.
    let learn = if config.allow.is_some() || !path.exists() {
        strings.clone()
    } else {
        merge_strings(config.connection_strings.clone(), strings.clone())
    };
    config.connection_strings = merge_strings(config.connection_strings.clone(), strings.clone());
    reached.apply(&strings, &mut config)?;
    // The allow list: what it held, what was asked for, and what was learnt.
    let mut list = config.allow.clone().unwrap_or_default();
    for entry in allow {
        list.insert(entry);
    }
    let mut announced = appliance::service::announced_endpoints(learn.clone())
        .await
        .context("asking the relay for the endpoints")?;
    // Those of Azure-protocol strings come from the config.
    announced.extend(learn.iter().filter_map(|cs| {
        let endpoint = config.endpoints.get(&cs.hc)?;
        Some((cs.hc.clone(), Some(endpoint.clone())))
    }));
    for (hc, endpoint) in announced {
        match endpoint {
            Some(e) => {
                let entry = AllowEntry::exactly(e.host());
                if list.matching(e.host()).is_none() {
                    println!("allowing {entry} (the endpoint of {hc} now)");
                }
                list.insert(entry);
            }
            None => println!(
                "the relay announced no endpoint for {hc}; nothing is allowed for it yet: \
                 add its host with --allow HOST, or to `allow` in {}",
                path.display()
            ),
        }
    }
    config.allow = Some(list);
    // Validates the merged list (send strings only, no duplicates).
    let text = config.to_toml()?;
    ApplianceConfig::parse(&text, &path)?;
    crate::install::write_file(
        &path,
        &format!(
            "# Written by `hybridlink appliance install`, which adds to connection_strings and allow.\n\
             # allow: the hosts the relay may make this host answer and route (names, .suffixes,\n\
             # IPv4 networks); an endpoint moved outside it is refused.\n{text}"
        ),
        0o600,
    )?;
    // The sandbox needs the state directory to exist.
    let state_dir = args.under_root(&config.state_dir);
    std::fs::create_dir_all(&state_dir)
        .with_context(|| format!("creating {}", state_dir.display()))?;
    let unit = unit(&args.binary()?, &config.state_dir);
    crate::install::install_unit(args, &unit)?;
    let names: Vec<String> = config
        .connection_strings
        .iter()
        .map(|cs| cs.hc.to_string())
        .collect();
    println!("the appliance serves: {}", names.join(", "));
    Ok(())
}

/// The capabilities the appliance keeps: `CAP_NET_ADMIN` for the tun, its
/// routes and rules and `/proc/sys/net/ipv4/conf/TUN/`, `CAP_NET_BIND_SERVICE`
/// for DNS on port 53. Not `CAP_DAC_OVERRIDE`: root owns `/etc/resolv.conf`.
pub const CAPABILITIES: &[&str] = &["CAP_NET_ADMIN", "CAP_NET_BIND_SERVICE"];

/// The appliance's unit: root, as changing the host's network and
/// `/etc/resolv.conf` takes, but with only [`CAPABILITIES`], `/dev/net/tun`
/// as its one device, and nothing writable but its state dir and
/// `/etc/resolv.conf`.
fn unit(binary: &Path, state_dir: &Path) -> Unit {
    Unit {
        name: "hybridlink-appliance",
        description: "hybridlink appliance: host names of on-premises services for the apps on this host",
        exec_start: vec![
            binary.display().to_string(),
            "appliance".into(),
            "run".into(),
            "--config".into(),
            APPLIANCE_CONF.into(),
        ],
        reload_on_hup: true,
        notify: true,
        run_as: RunAs::Root,
        capabilities: CAPABILITIES.to_vec(),
        service: vec![
            "DevicePolicy=closed".into(),
            "DeviceAllow=/dev/net/tun rw".into(),
            // `ip` speaks netlink.
            "RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6 AF_NETLINK".into(),
            format!("ReadWritePaths={}", state_dir.display()),
            // Rewritten in place; `-`: a host without one gets the
            // appliance's own error, not systemd's.
            "ReadWritePaths=-/etc/resolv.conf".into(),
        ],
        written_by: "hybridlink appliance install",
    }
}

/// `--endpoint` and `--ca-file`: how strings over Azure Relay's protocol
/// are reached.
struct Reached {
    endpoints: Vec<(Option<HcName>, Endpoint)>,
    ca_file: Option<PathBuf>,
}

impl Reached {
    /// Adds to `config` the endpoints given for `strings` (a bare one for
    /// the only Azure-protocol string among them) and the CA file, then
    /// checks that every Azure-protocol string has its endpoint.
    fn apply(
        self,
        strings: &[ConnectionString],
        config: &mut ApplianceConfig,
    ) -> anyhow::Result<()> {
        let named = crate::connection_strings::azure_endpoints(strings, self.endpoints)?;
        config.endpoints.extend(named);
        if let Some(ca) = self.ca_file {
            config.ca_file = Some(ca);
        }
        config.check_endpoints()?;
        Ok(())
    }
}

/// `old` with `new` added; a new string for a hybrid connection of the same
/// relay replaces the old one.
fn merge_strings(
    mut old: Vec<ConnectionString>,
    new: Vec<ConnectionString>,
) -> Vec<ConnectionString> {
    old.retain(|o| {
        !new.iter()
            .any(|n| n.hc == o.hc && n.relay_host == o.relay_host && n.relay_port == o.relay_port)
    });
    old.extend(new);
    old
}

/// Runs an appliance subcommand.
pub async fn run(cmd: ApplianceCommand) -> anyhow::Result<()> {
    let args = match cmd {
        ApplianceCommand::Install {
            connection_strings,
            connection_string_file,
            allow,
            endpoints,
            ca_file,
            install: args,
        } => {
            let strings = crate::connection_strings::gather(
                connection_strings,
                connection_string_file.as_deref(),
                crate::connection_strings::from_env(),
            )?;
            let reached = Reached { endpoints, ca_file };
            return install(strings, allow, reached, &args).await;
        }
        ApplianceCommand::Status { state_dir, json } => return status(&state_dir, json),
        ApplianceCommand::Run(args) => args,
    };
    let RunArgs {
        config,
        connection_strings,
        connection_string_file,
        virtual_range,
        tun,
        dns_listen,
        state_dir,
        max_flows,
        allow,
        endpoints,
        ca_file,
        metrics,
        threads: _,
    } = args;
    let mut config_from_file = match &config {
        Some(path) => ApplianceConfig::load(path)?,
        None => ApplianceConfig::new(crate::connection_strings::gather(
            connection_strings,
            connection_string_file.as_deref(),
            crate::connection_strings::from_env(),
        )?)?,
    };
    let config_path = config;
    let config = &mut config_from_file;
    if let Some(r) = virtual_range {
        config.virtual_range = parse_range(&r)?;
    }
    if let Some(t) = tun {
        config.tun = check_tun(t)?;
    }
    if let Some(d) = dns_listen {
        config.dns_listen = d;
    }
    if let Some(s) = state_dir {
        config.state_dir = s;
    }
    if let Some(n) = max_flows {
        config.max_flows = n;
    }
    if !allow.is_empty() {
        config.allow = Some(AllowList::new(allow));
    }
    let strings = config.connection_strings.clone();
    Reached { endpoints, ca_file }.apply(&strings, config)?;
    let counted = std::sync::Arc::new(appliance::metrics::ApplianceMetrics::new());
    if let Some(addr) = metrics {
        let counted = counted.clone();
        let bound = transport::metrics::serve(addr, move || counted.render())
            .await
            .with_context(|| format!("serving metrics on {addr}"))?;
        tracing::info!(%bound, "metrics at http://{bound}/metrics");
    }
    appliance::service::run(
        config_from_file,
        config_path,
        counted,
        crate::shutdown_signal(),
    )
    .await
    .context("appliance")?;
    tracing::info!("appliance stopped; the namespace is as it was");
    Ok(())
}

/// `appliance status`: prints the status file of the appliance running with
/// `state_dir`.
fn status(state_dir: &std::path::Path, json: bool) -> anyhow::Result<()> {
    let status = Status::read(&state_dir.join(STATUS_FILE))?;
    if json {
        println!("{}", serde_json::to_string_pretty(&status)?);
    } else {
        print!("{}", status.table());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cs(name: &str, key: &str) -> ConnectionString {
        format!(
            "Endpoint=sb://relay.test:9443/;SharedAccessKeyName=send;SharedAccessKey={key};EntityPath={name};CertificateSha256={}",
            "ab".repeat(32)
        )
        .parse()
        .unwrap()
    }

    #[test]
    fn the_appliance_runs_as_root_with_two_capabilities_and_one_device() {
        use crate::install::expected::SANDBOX;
        let expected = format!(
            "\
# Written by `hybridlink appliance install`; run it again to change it.
[Unit]
Description=hybridlink appliance: host names of on-premises services for the apps on this host
Wants=network-online.target
After=network-online.target

[Service]
Type=notify
ExecStart=/usr/local/bin/hybridlink appliance run --config /etc/hybridlink/appliance.toml
ExecReload=/bin/kill -HUP $MAINPID
Restart=always
RestartSec=2
LimitNOFILE=1048576
CapabilityBoundingSet=CAP_NET_ADMIN CAP_NET_BIND_SERVICE
{SANDBOX}\
DevicePolicy=closed
DeviceAllow=/dev/net/tun rw
RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6 AF_NETLINK
ReadWritePaths=/var/lib/hybridlink-appliance
ReadWritePaths=-/etc/resolv.conf

[Install]
WantedBy=multi-user.target
"
        );
        let unit = unit(
            Path::new("/usr/local/bin/hybridlink"),
            Path::new("/var/lib/hybridlink-appliance"),
        );
        assert_eq!(unit.render(), expected);
    }

    #[test]
    fn a_new_string_replaces_the_old_one_for_its_connection() {
        let merged = merge_strings(vec![cs("a", "old"), cs("b", "k")], vec![cs("a", "new")]);
        let names: Vec<String> = merged.iter().map(|c| c.hc.to_string()).collect();
        assert_eq!(names, ["b", "a"]);
        assert_eq!(merged[1].key, cs("a", "new").key);
    }
}
