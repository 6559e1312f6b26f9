//! `hybridlink agent ...`

use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::time::Duration;

use agent::control_socket::ReloadAnswer;
use anyhow::Context;
use clap::Subcommand;
use proto::connection_string::ConnectionString;
use proto::name::{Endpoint, HcName};

use crate::install::{RunAs, SOCKETS_ONLY, SystemUser, Unit};

/// Each tenant's share of the agent's sockets: anyone holding one hybrid
/// connection's send key can make the relay offer this agent pipes and open
/// streams on them, so the work in progress is capped per sender and per
/// hybrid connection, and one tenant that floods exhausts only its share.
#[derive(clap::Args, Debug)]
pub struct ShareArgs {
    /// Pipe set-ups (TLS handshakes to the relay) in progress for one
    /// sender; offers past it are ignored (the sender asks again).
    #[arg(long, value_name = "N", default_value_t = agent::shares::ShareCaps::default().setups_per_sender)]
    max_pipe_setups_per_sender: usize,
    /// Pipe set-ups in progress charged to one hybrid connection (the cap a
    /// sender cannot get around by claiming many identities).
    #[arg(long, value_name = "N", default_value_t = agent::shares::ShareCaps::default().setups_per_hc)]
    max_pipe_setups_per_hc: usize,
    /// Dials to targets in progress for one sender; a stream past it waits
    /// up to --dial-timeout for a place, then is refused.
    #[arg(long, value_name = "N", default_value_t = agent::shares::ShareCaps::default().dials_per_sender)]
    max_dials_per_sender: usize,
    /// Dials to targets in progress for one hybrid connection.
    #[arg(long, value_name = "N", default_value_t = agent::shares::ShareCaps::default().dials_per_hc)]
    max_dials_per_hc: usize,
}

impl ShareArgs {
    fn caps(&self) -> agent::shares::ShareCaps {
        agent::shares::ShareCaps {
            setups_per_sender: self.max_pipe_setups_per_sender.max(1),
            setups_per_hc: self.max_pipe_setups_per_hc.max(1),
            dials_per_sender: self.max_dials_per_sender.max(1),
            dials_per_hc: self.max_dials_per_hc.max(1),
        }
    }
}

/// Agent subcommands.
#[derive(Subcommand, Debug)]
pub enum AgentCommand {
    /// Serve hybrid connections: dial out to the relay with their listen
    /// connection strings and forward every stream to the hybrid connection's
    /// host:port. Reconnects by itself when the relay goes away.
    Run {
        #[command(flatten)]
        threads: crate::threads::ThreadsArg,
        /// A listen connection string (`hybridlink hc keys NAME`); repeat for
        /// more hybrid connections. Other users of this machine can read a
        /// command line: prefer --connection-strings-file.
        #[arg(long = "connection-string", value_name = "CS")]
        connection_strings: Vec<ConnectionString>,
        /// A file of listen connection strings, one per line (`#` starts a
        /// comment), as `agent install` writes it; reread on SIGHUP and
        /// `agent reload`. `-` reads them once from standard input. Without
        /// this or --connection-string, HYBRIDLINK_CONNECTION_STRING holds
        /// them (several separated by newlines).
        #[arg(long, value_name = "FILE", alias = "connection-string-file")]
        connection_strings_file: Option<PathBuf>,
        /// Where `agent status` asks this agent for its state.
        #[arg(long, default_value_os_t = agent::control_socket::default_path())]
        status_socket: PathBuf,
        /// Give up dialing a target after this many seconds (the sender then
        /// sees "unreachable").
        #[arg(long, default_value_t = 5)]
        dial_timeout: u64,
        /// Lifetime in seconds of the tokens this agent signs (renewed at 80 %).
        #[arg(long, default_value_t = 3600)]
        token_ttl: u64,
        /// Name shown in the relay's status (default: this host's name): at
        /// most 64 printable characters.
        #[arg(long, value_parser = parse_label)]
        label: Option<String>,
        /// On SIGTERM or SIGINT, stop taking new streams at once and give the
        /// open ones this many seconds to finish before exiting.
        #[arg(long, default_value_t = 10)]
        drain_timeout: u64,
        /// Serve Prometheus metrics at http://ADDR/metrics: streams opened,
        /// refused (by reason, dial failures included) and active per hybrid
        /// connection, bytes each way, reconnects, token renewals.
        #[arg(long, value_name = "ADDR")]
        metrics: Option<std::net::SocketAddr>,
        /// The on-prem policy: the only hosts and ports this agent may ever
        /// dial (TOML; see `hybridlink agent allow --help`). Default:
        /// policy.toml beside --connection-strings-file, else
        /// /etc/hybridlink/policy.toml; without such a file, any host and
        /// port except loopback, link-local and unspecified addresses.
        /// Reread when it changes, on SIGHUP and on `agent reload`.
        #[arg(long, value_name = "FILE")]
        policy: Option<PathBuf>,
        #[command(flatten)]
        shares: ShareArgs,
        /// The endpoint of a hybrid connection served over Azure Relay's
        /// protocol (a listen string without CertificateSha256: an Azure
        /// Relay namespace, or a hybridlink relay with a CA-issued
        /// certificate), whose relay names none: `NAME=HOST:PORT`, or
        /// `HOST:PORT` when only one is served that way. Repeatable. The
        /// on-prem policy applies to it as to any endpoint.
        #[arg(long = "endpoint", value_name = "[NAME=]HOST:PORT", value_parser = crate::connection_strings::parse_named_endpoint)]
        endpoints: Vec<(Option<HcName>, Endpoint)>,
        /// For listen strings without CertificateSha256: the CA
        /// certificates (PEM) that may issue the relay's certificate.
        /// Default: the system's.
        #[arg(long, value_name = "FILE")]
        ca_file: Option<PathBuf>,
    },
    /// Allow this agent to dial HOST (a name, a wildcard like *.corp, an
    /// address or a CIDR), on PORT or every port, for one hybrid connection
    /// (--hc) or all: adds a rule to the on-prem policy and makes a running
    /// agent reread it. Streams the policy still allows are never cut.
    Allow(PolicyEdit),
    /// Refuse HOST (name, wildcard, address or CIDR; a CIDR also refuses
    /// names that resolve into it) on PORT or every port: adds a deny rule
    /// to the on-prem policy, which wins over every allow rule. A running
    /// agent rereads it and cuts the open streams it now refuses.
    Deny(PolicyEdit),
    /// Print the on-prem policy's rules and check that the file is valid.
    Policy {
        /// The policy file.
        #[arg(long, default_value = POLICY_FILE)]
        policy: PathBuf,
    },
    /// Make a running agent read its --connection-strings-file again (as
    /// SIGHUP does): new and changed hybrid connections attach first, then the
    /// old channels close, so nothing it keeps serving is ever unserved and
    /// open streams go on. Prints what changed.
    Reload {
        /// The running agent's status socket.
        #[arg(long, default_value_os_t = agent::control_socket::default_path())]
        status_socket: PathBuf,
    },
    /// Set the agent up as a systemd service, the one-command on-premises
    /// setup: adds the listen connection strings to /etc/hybridlink/agent.conf
    /// (a string for a hybrid connection already there replaces it), writes
    /// /etc/systemd/system/hybridlink-agent.service, enables and (re)starts
    /// it. The service runs as the system user hybridlink-agent, made now;
    /// agent.conf and policy.toml are root's, mode 0640, group
    /// hybridlink-agent.
    ///
    /// It also makes each new hybrid connection's end-to-end key (kept in
    /// agent.conf, never sent to the relay; the app side needs it, see
    /// `agent end-to-end-key`) and writes /etc/hybridlink/policy.toml to
    /// allow exactly the endpoint the relay names for each hybrid connection
    /// now (or what --allow says).
    Install {
        /// A listen connection string (`hybridlink hc keys NAME --rule listen
        /// --key primary`); repeat for more hybrid connections. Other users
        /// of this machine can read a command line: prefer
        /// --connection-string-file.
        #[arg(long = "connection-string", value_name = "CS")]
        connection_strings: Vec<ConnectionString>,
        /// Read listen connection strings from FILE, or from standard input
        /// with `-` (one a line, `#` starts a comment). Without this or
        /// --connection-string, HYBRIDLINK_CONNECTION_STRING holds them.
        #[arg(long, value_name = "FILE")]
        connection_string_file: Option<PathBuf>,
        /// Allow HOST[:PORT] in the policy for these hybrid connections
        /// instead of asking the relay for their endpoints; repeatable.
        #[arg(long, value_name = "HOST[:PORT]")]
        allow: Vec<String>,
        /// Make no end-to-end key: streams then trust the relay's
        /// introductions ("relay-trusted"), and a relay that lies could read
        /// them. For app sides that cannot carry the key.
        #[arg(long)]
        no_end_to_end: bool,
        /// The endpoint of a hybrid connection served over Azure Relay's
        /// protocol (a listen string without CertificateSha256), whose relay
        /// names none: `NAME=HOST:PORT`, or `HOST:PORT` when only one is
        /// given that way. Kept after its string in agent.conf (`endpoint=`)
        /// and allowed in the policy. Repeatable.
        #[arg(long = "endpoint", value_name = "[NAME=]HOST:PORT", value_parser = crate::connection_strings::parse_named_endpoint)]
        endpoints: Vec<(Option<HcName>, Endpoint)>,
        /// For listen strings without CertificateSha256: the CA
        /// certificates (PEM) that may issue the relay's certificate, passed
        /// to `agent run`. Default: the system's.
        #[arg(long, value_name = "FILE")]
        ca_file: Option<PathBuf>,
        #[command(flatten)]
        install: crate::install::InstallArgs,
    },
    /// Print the end-to-end key of a hybrid connection this agent serves,
    /// for the app side: append `;EndToEndKey=KEY` to its send connection
    /// string. The relay never has this key.
    EndToEndKey {
        /// The hybrid connection.
        name: proto::name::HcName,
        /// The agent's connection strings file.
        #[arg(long, default_value = AGENT_CONF)]
        config: PathBuf,
    },
    /// Show the state of each hybrid connection a running agent serves: its
    /// endpoint, whether the relay accepts it, whether the on-prem policy
    /// allows the endpoint, and whether its streams are verified end to end.
    Status {
        /// The running agent's status socket.
        #[arg(long, default_value_os_t = agent::control_socket::default_path())]
        status_socket: PathBuf,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
}

impl AgentCommand {
    /// The threads `agent run` was asked for.
    pub fn threads(&self) -> Option<u16> {
        match self {
            AgentCommand::Run { threads, .. } => threads.threads,
            _ => None,
        }
    }
}

/// Where `agent install` writes the on-prem policy.
pub const POLICY_FILE: &str = "/etc/hybridlink/policy.toml";

/// Arguments of `agent allow` and `agent deny`.
#[derive(clap::Args, Debug)]
pub struct PolicyEdit {
    /// HOST or HOST:PORT (PORT may be a range, 8000-8100).
    #[arg(required_unless_present = "endpoint_of")]
    target: Option<String>,
    /// Instead of HOST:PORT: allow exactly the endpoint the relay names now
    /// for the hybrid connection of this listen connection string (as
    /// `agent install` does); repeatable.
    #[arg(long, value_name = "LISTEN STRING", conflicts_with_all = ["target", "hc"])]
    endpoint_of: Vec<ConnectionString>,
    /// Only for this hybrid connection.
    #[arg(long)]
    hc: Option<proto::name::HcName>,
    /// The policy file.
    #[arg(long, default_value = POLICY_FILE)]
    policy: PathBuf,
    /// The running agent to tell (it also rereads the file by itself
    /// within seconds).
    #[arg(long, default_value_os_t = agent::control_socket::default_path())]
    status_socket: PathBuf,
}

/// Splits `HOST[:PORT]` (an IPv6 address or CIDR has no port).
fn split_target(target: &str) -> anyhow::Result<(String, Option<agent::policy::PortSpec>)> {
    use agent::policy::PortSpec;
    let colons = target.matches(':').count();
    let (host, port) = match target.rsplit_once(':') {
        Some((h, p)) if colons == 1 => (h.to_string(), Some(p.to_string())),
        _ => (target.to_string(), None),
    };
    let port = port
        .map(|p| match p.parse::<u16>() {
            Ok(n) => Ok(PortSpec::One(n)),
            Err(_) if p.contains('-') => Ok(PortSpec::Range(p)),
            Err(_) => Err(anyhow::anyhow!(
                "{target:?}: the port {p:?} is not a number or a range like 8000-8100"
            )),
        })
        .transpose()?;
    Ok((host, port))
}

async fn edit_policy(edit: PolicyEdit, allow: bool) -> anyhow::Result<()> {
    if !edit.endpoint_of.is_empty() {
        if !allow {
            anyhow::bail!("--endpoint-of only allows; name the host to deny");
        }
        write_install_policy(&edit.policy, &edit.endpoint_of, &[], &Default::default()).await?;
        tell_agent(&edit.status_socket).await;
        return Ok(());
    }
    let target = edit.target.as_deref().unwrap_or_default();
    let (host, port) = split_target(target)?;
    let rule = agent::policy::RuleText {
        host,
        ports: port.map(|p| vec![p]),
        hc: edit.hc.map(|h| h.to_string()),
    };
    let mut text = agent::policy::read_text(&edit.policy)?;
    let list = if allow {
        &mut text.allow
    } else {
        &mut text.deny
    };
    if list.contains(&rule) {
        println!("{} already has this rule", edit.policy.display());
    } else {
        list.push(rule);
        agent::policy::write_text(&edit.policy, &text)?;
        println!(
            "{} rule added to {}",
            if allow { "allow" } else { "deny" },
            edit.policy.display()
        );
    }
    tell_agent(&edit.status_socket).await;
    Ok(())
}

/// Asks a running agent to reread its files, if one answers.
async fn tell_agent(socket: &Path) {
    match agent::control_socket::reload(socket).await {
        Ok(ReloadAnswer::Reloaded(_)) => println!("the running agent reread its policy"),
        Ok(ReloadAnswer::Error(error)) => println!("the running agent answered: {error}"),
        Err(_) => println!(
            "no agent answered at {} (a running agent rereads the file within seconds)",
            socket.display()
        ),
    }
}

/// The policy file an agent uses when not told: beside its connection
/// strings file, else the system-wide one.
fn default_policy_path(strings_file: Option<&Path>) -> PathBuf {
    strings_file
        .and_then(Path::parent)
        .filter(|d| !d.as_os_str().is_empty())
        .map(|d| d.join("policy.toml"))
        .unwrap_or_else(|| PathBuf::from(POLICY_FILE))
}

/// Runs an agent subcommand.
/// Open files the agent wants: one per stream it carries to a target, and a
/// sender opens up to 16 pipes of 4,096 streams each (65,536), plus room
/// for its pipes and control channels.
const FILES_WANTED: u64 = 65_536 + 1_024;

/// Says at start when the open-files limit (already raised to the hard
/// limit) caps the streams the agent can carry.
fn warn_if_few_files() {
    if let Some(soft) = transport::fd_limit::soft()
        && soft < FILES_WANTED
    {
        tracing::warn!(
            open_files = soft,
            wanted = FILES_WANTED,
            "the open-files limit lets this agent carry about {soft} connections at once, fewer than one sender can open ({FILES_WANTED}); raise it (the unit sets LimitNOFILE=1048576; or ulimit -Hn as root)"
        );
    }
}

pub async fn run(cmd: AgentCommand) -> anyhow::Result<()> {
    match cmd {
        AgentCommand::Install {
            connection_strings,
            connection_string_file,
            allow,
            no_end_to_end,
            endpoints,
            ca_file,
            install,
        } => {
            let strings = crate::connection_strings::gather(
                connection_strings,
                connection_string_file.as_deref(),
                crate::connection_strings::from_env(),
            )?;
            let endpoints = crate::connection_strings::azure_endpoints(&strings, endpoints)?;
            let azure = AzureInstall {
                endpoints: endpoints.into_iter().collect(),
                ca_file,
            };
            install_agent(strings, &allow, no_end_to_end, azure, &install).await
        }
        AgentCommand::EndToEndKey { name, config } => {
            let strings = agent::strings_file::read(&config)?;
            let cs = strings.iter().find(|cs| cs.hc == name).with_context(|| {
                format!("{} has no connection string for {name}", config.display())
            })?;
            let key = cs.end_to_end_key.as_ref().with_context(|| {
                format!("{name} has no end-to-end key (it was installed with --no-end-to-end): it runs relay-trusted")
            })?;
            println!("{}", key.as_str());
            Ok(())
        }
        AgentCommand::Allow(edit) => edit_policy(edit, true).await,
        AgentCommand::Deny(edit) => edit_policy(edit, false).await,
        AgentCommand::Policy { policy } => {
            let p = agent::Policy::load(&policy)?;
            println!("{}", p.describe());
            for rule in p.rules() {
                println!("  {rule}");
            }
            Ok(())
        }
        AgentCommand::Run {
            threads: _,
            connection_strings,
            connection_strings_file,
            status_socket,
            dial_timeout,
            token_ttl,
            label,
            drain_timeout,
            metrics,
            policy,
            shares,
            endpoints,
            ca_file,
        } => {
            // A file is reread on reload; standard input is read once, so
            // its strings are fixed, like those of the command line.
            let stdin = connection_strings_file.as_deref() == Some(Path::new("-"));
            let strings_file = connection_strings_file.filter(|_| !stdin);
            let mut fixed = connection_strings;
            if stdin {
                fixed.extend(crate::connection_strings::read(Path::new("-"))?);
            }
            if fixed.is_empty() && strings_file.is_none() {
                fixed = crate::connection_strings::gather(
                    Vec::new(),
                    None,
                    crate::connection_strings::from_env(),
                )?;
            }
            let mut connection_strings = fixed.clone();
            let mut file_endpoints = std::collections::HashMap::new();
            if let Some(path) = &strings_file {
                let file = agent::strings_file::read_all(path)?;
                connection_strings.extend(file.strings);
                file_endpoints = file.endpoints;
            }
            // Those of the command line name strings of either source.
            let fixed_endpoints: std::collections::HashMap<HcName, Endpoint> =
                crate::connection_strings::azure_endpoints(&connection_strings, endpoints)?
                    .into_iter()
                    .collect();
            let sources = agent::reload::ReloadSources {
                fixed,
                fixed_endpoints: fixed_endpoints.clone(),
                policy: policy
                    .clone()
                    .unwrap_or_else(|| default_policy_path(strings_file.as_deref())),
                policy_explicit: policy.is_some(),
                strings_file,
            };
            let mut options = agent::AgentOptions::new(connection_strings);
            options.policy = sources.initial_policy()?;
            options.dial_timeout = Duration::from_secs(dial_timeout);
            options.token_ttl = Duration::from_secs(token_ttl.max(2));
            options.shares = shares.caps();
            options.azure_endpoints = file_endpoints;
            options.azure_endpoints.extend(fixed_endpoints);
            options.ca_file = ca_file;
            if let Some(label) = label {
                options.label = label;
            }
            let agent = agent::Agent::start(options)?;
            warn_if_few_files();
            if let Some(addr) = metrics {
                let metrics = agent.metrics();
                let bound = transport::metrics::serve(addr, move || metrics.render())
                    .await
                    .with_context(|| format!("serving metrics on {addr}"))?;
                tracing::info!(%bound, "metrics at http://{bound}/metrics");
            }
            let (reload_tx, reload_rx) = tokio::sync::mpsc::channel(4);
            let _socket =
                agent::control_socket::serve(&status_socket, agent.clone(), Some(reload_tx))
                    .with_context(|| {
                        format!("opening the status socket {}", status_socket.display())
                    })?;
            agent::reload::serve_reloads(&agent, &sources, reload_rx, crate::shutdown_signal())
                .await?;
            // Out of rotation at once; open streams get time to finish.
            let cut = agent.drain(Duration::from_secs(drain_timeout)).await;
            let _ = std::fs::remove_file(&status_socket);
            tracing::info!(cut, "agent stopped");
            Ok(())
        }
        AgentCommand::Reload { status_socket } => {
            let answer = agent::control_socket::reload(&status_socket)
                .await
                .with_context(|| {
                    format!(
                        "asking the agent at {} (is `hybridlink agent run` running?)",
                        status_socket.display()
                    )
                })?;
            let summary = match answer {
                ReloadAnswer::Reloaded(summary) => summary,
                ReloadAnswer::Error(error) => anyhow::bail!("{error}"),
            };
            let list = |names: &[String]| {
                if names.is_empty() {
                    "-".to_string()
                } else {
                    names.join(", ")
                }
            };
            println!(
                "reloaded: added {}; changed {}; removed {}",
                list(&summary.added),
                list(&summary.changed),
                list(&summary.removed)
            );
            Ok(())
        }
        AgentCommand::Status {
            status_socket,
            json,
        } => {
            let status = agent::control_socket::status(&status_socket)
                .await
                .with_context(|| {
                    format!(
                        "asking the agent at {} (is `hybridlink agent run` running?)",
                        status_socket.display()
                    )
                })?;
            if json {
                // Through a Value, whose keys are sorted, as this output has
                // always been.
                let value = serde_json::to_value(&status)?;
                println!("{}", serde_json::to_string_pretty(&value)?);
            } else {
                println!(
                    "{:<24} {:<18} {:<32} {:<15} REASON",
                    "HYBRID CONNECTION", "STATE", "ENDPOINT", "END-TO-END"
                );
                for hc in &status {
                    let name = hc.name.as_str();
                    let state = &hc.connection;
                    let endpoint = hc.endpoint.as_deref().unwrap_or("-");
                    let e2e = hc.end_to_end;
                    let reason = crate::hc::printable(hc.connection.reason());
                    println!("{name:<24} {state:<18} {endpoint:<32} {e2e:<15} {reason}");
                }
            }
            Ok(())
        }
    }
}

/// Where `agent install` keeps the listen connection strings.
pub const AGENT_CONF: &str = "/etc/hybridlink/agent.conf";

/// Adds `new` to `old`: a string for the same hybrid connection on the same
/// relay replaces the old one.
fn merge(old: Vec<ConnectionString>, new: Vec<ConnectionString>) -> Vec<ConnectionString> {
    let same = |a: &ConnectionString, b: &ConnectionString| {
        a.hc == b.hc && a.relay_host == b.relay_host && a.relay_port == b.relay_port
    };
    let mut out: Vec<ConnectionString> = old
        .into_iter()
        .filter(|o| !new.iter().any(|n| same(o, n)))
        .collect();
    out.extend(new);
    out
}

/// Gives each string an end-to-end key: the one it carries, else the one the
/// same hybrid connection already has in `old` (a key rotation keeps it),
/// else a new one (unless `none`).
fn with_end_to_end_keys(
    strings: Vec<ConnectionString>,
    old: &[ConnectionString],
    none: bool,
) -> anyhow::Result<Vec<ConnectionString>> {
    strings
        .into_iter()
        .map(|mut cs| {
            if cs.end_to_end_key.is_none() && !none {
                let kept = old
                    .iter()
                    .find(|o| o.hc == cs.hc)
                    .and_then(|o| o.end_to_end_key.clone());
                cs.end_to_end_key = Some(match kept {
                    Some(k) => k,
                    None => proto::key::Key::generate()
                        .map_err(|e| anyhow::anyhow!("making an end-to-end key: {e}"))?,
                });
            }
            Ok(cs)
        })
        .collect()
}

/// Adds allow rules to the policy at `path` for the new strings: `allow`
/// when given, else each endpoint the relay names now, or `known` gives
/// (a rule is added only when the policy does not already allow the
/// endpoint).
async fn write_install_policy(
    path: &Path,
    strings: &[ConnectionString],
    allow: &[String],
    known: &std::collections::HashMap<HcName, Endpoint>,
) -> anyhow::Result<()> {
    use agent::policy::{RuleText, read_text, write_text};
    let mut text = read_text(path)?;
    let mut wanted: Vec<RuleText> = Vec::new();
    if !allow.is_empty() {
        for target in allow {
            let (host, port) = split_target(target)?;
            for cs in strings {
                wanted.push(RuleText {
                    host: host.clone(),
                    ports: port.clone().map(|p| vec![p]),
                    hc: Some(cs.hc.to_string()),
                });
            }
        }
    } else {
        let current = if path.exists() {
            Some(agent::Policy::load(path)?)
        } else {
            None
        };
        let mut by_relay: Vec<Vec<ConnectionString>> = Vec::new();
        let mut answered = Vec::new();
        for cs in strings {
            // Over Azure Relay's protocol the endpoint is the agent's own.
            if let Some(endpoint) = known.get(&cs.hc) {
                answered.push((cs.hc.clone(), endpoint.clone()));
                continue;
            }
            match by_relay
                .iter_mut()
                .find(|g| g[0].relay_host == cs.relay_host && g[0].relay_port == cs.relay_port)
            {
                Some(g) => g.push(cs.clone()),
                None => by_relay.push(vec![cs.clone()]),
            }
        }
        for group in by_relay {
            let answers = transport::control::describe(&group).await.map_err(|e| {
                anyhow::anyhow!(
                    "asking the relay for the endpoints to allow: {e}; pass --allow HOST:PORT to write the policy without asking"
                )
            })?;
            for (hc, answer) in answers {
                let endpoint = answer
                    .map_err(|e| anyhow::anyhow!("the relay refused to describe {hc}: {e}"))?;
                answered.push((hc, endpoint));
            }
        }
        for (hc, endpoint) in answered {
            if current
                .as_ref()
                .is_some_and(|p| p.check_endpoint(&hc, &endpoint).is_ok())
            {
                continue;
            }
            wanted.push(RuleText {
                host: endpoint.host().to_string(),
                ports: Some(vec![agent::policy::PortSpec::One(endpoint.port())]),
                hc: Some(hc.to_string()),
            });
        }
    }
    for rule in wanted {
        if !text.allow.contains(&rule) {
            println!(
                "policy: allowing {}{} for {}",
                rule.host,
                match &rule.ports {
                    Some(p) => format!(
                        ":{}",
                        serde_json::to_string(&p[0])
                            .unwrap_or_default()
                            .trim_matches('"')
                    ),
                    None => String::new(),
                },
                rule.hc.as_deref().unwrap_or("every hybrid connection")
            );
            text.allow.push(rule);
        }
    }
    write_text(path, &text)?;
    Ok(())
}

/// `agent install --endpoint --ca-file`: how strings over Azure Relay's
/// protocol are served.
struct AzureInstall {
    endpoints: std::collections::HashMap<HcName, Endpoint>,
    ca_file: Option<PathBuf>,
}

async fn install_agent(
    strings: Vec<ConnectionString>,
    allow: &[String],
    no_end_to_end: bool,
    azure: AzureInstall,
    args: &crate::install::InstallArgs,
) -> anyhow::Result<()> {
    for cs in &strings {
        // An Azure namespace's rules have names of their own choosing.
        if cs.key_name != "listen" && cs.cert_sha256.is_some() {
            anyhow::bail!(
                "the connection string for {} is a {} string; the agent needs the listen string (`hybridlink hc keys {} --rule listen --key primary`)",
                cs.hc,
                cs.key_name,
                cs.hc
            );
        }
    }
    let unit = unit(&args.binary()?, azure.ca_file.as_deref());
    let conf = args.under_root(Path::new(AGENT_CONF));
    let old = if conf.exists() {
        agent::strings_file::read_all(&conf)?
    } else {
        agent::strings_file::StringsFile::default()
    };
    let mut endpoints = old.endpoints.clone();
    endpoints.extend(azure.endpoints);
    if let Some(cs) = strings
        .iter()
        .find(|cs| cs.cert_sha256.is_none() && !endpoints.contains_key(&cs.hc))
    {
        anyhow::bail!(
            "{hc}: its listen string has no CertificateSha256, so it is served over Azure Relay's protocol, whose relay names no endpoint: give one with --endpoint {hc}=HOST:PORT",
            hc = cs.hc
        );
    }
    crate::install::make_system_user(args, &unit)?;
    let strings = with_end_to_end_keys(strings, &old.strings, no_end_to_end)?;
    let policy = args.under_root(Path::new(POLICY_FILE));
    write_install_policy(&policy, &strings, allow, &endpoints).await?;
    let new = strings.clone();
    let all = merge(old.strings, strings);
    endpoints.retain(|hc, _| {
        all.iter()
            .any(|cs| &cs.hc == hc && cs.cert_sha256.is_none())
    });
    let file = agent::strings_file::StringsFile {
        strings: all.clone(),
        endpoints,
    };
    let text = file.to_text(
        "# Listen connection strings served by the hybridlink agent, one per line\n# (over Azure Relay's protocol, with `endpoint=HOST:PORT` after it).\n# Written by `hybridlink agent install`, which adds to this list.\n",
    );
    crate::install::write_file(&conf, &text, 0o640)?;
    // Root edits them (`agent allow|deny`, which keeps their owner, group
    // and mode); the agent's group reads them, at start and on every reload.
    let owner = format!("root:{}", USER.name);
    for path in [&conf, &policy] {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o640))
            .with_context(|| format!("setting the mode of {}", path.display()))?;
        crate::install::chown(args, &owner, path, false)?;
    }
    crate::install::install_unit(args, &unit)?;
    let names: Vec<String> = all.iter().map(|cs| cs.hc.to_string()).collect();
    println!("the agent serves: {}", names.join(", "));
    println!("on-prem policy: {POLICY_FILE} (edit with `hybridlink agent allow|deny`)");
    for cs in &new {
        match &cs.end_to_end_key {
            Some(key) => println!(
                "end-to-end: verified for {name}. On the app side, append this to the send connection string of {name} (the relay never sees it; `hybridlink agent end-to-end-key {name}` prints it again):\n  ;EndToEndKey={key}",
                name = cs.hc,
                key = key.as_str()
            ),
            None => println!(
                "end-to-end: relay-trusted for {} (no end-to-end key): a relay that lies about the ends' keys could read and alter its traffic",
                cs.hc
            ),
        }
    }
    Ok(())
}

/// The user the agent's service runs as.
pub const USER: SystemUser = SystemUser {
    name: "hybridlink-agent",
    gecos: "hybridlink agent",
};

/// The agent's unit: its own user, no capability, nothing writable but its
/// control socket's directory, which only that user (and root) may enter.
fn unit(binary: &Path, ca_file: Option<&Path>) -> Unit {
    let mut service: Vec<String> = SOCKETS_ONLY.iter().map(|l| l.to_string()).collect();
    service.push("RuntimeDirectory=hybridlink-agent".into());
    service.push("RuntimeDirectoryMode=0700".into());
    Unit {
        name: "hybridlink-agent",
        description: "hybridlink agent: serves hybrid connections to on-premises services",
        exec_start: vec![
            binary.display().to_string(),
            "agent".into(),
            "run".into(),
            "--connection-strings-file".into(),
            AGENT_CONF.into(),
            "--policy".into(),
            POLICY_FILE.into(),
            "--status-socket".into(),
            agent::control_socket::SYSTEM_PATH.into(),
        ]
        .into_iter()
        .chain(
            ca_file
                .map(|f| vec!["--ca-file".into(), f.display().to_string()])
                .unwrap_or_default(),
        )
        .collect(),
        reload_on_hup: true,
        notify: false,
        run_as: RunAs::User(USER),
        capabilities: vec![],
        service,
        written_by: "hybridlink agent install",
    }
}

/// `--label`: refused at once rather than cut or refused by the relay later.
fn parse_label(text: &str) -> Result<String, proto::label::LabelError> {
    proto::label::PeerLabel::parse(text).map(|l| l.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cs(name: &str, key: &str) -> ConnectionString {
        format!("Endpoint=sb://relay.test:9443/;SharedAccessKeyName=listen;SharedAccessKey={key};EntityPath={name};CertificateSha256={}", "ab".repeat(32))
            .parse()
            .unwrap()
    }

    #[test]
    fn the_agent_runs_as_its_own_user_with_a_private_socket_directory() {
        use crate::install::expected::{SANDBOX, SOCKETS_ONLY};
        let expected = format!(
            "\
# Written by `hybridlink agent install`; run it again to change it.
[Unit]
Description=hybridlink agent: serves hybrid connections to on-premises services
Wants=network-online.target
After=network-online.target

[Service]
ExecStart=/usr/local/bin/hybridlink agent run --connection-strings-file /etc/hybridlink/agent.conf --policy /etc/hybridlink/policy.toml --status-socket /run/hybridlink-agent/agent.sock
ExecReload=/bin/kill -HUP $MAINPID
Restart=always
RestartSec=2
LimitNOFILE=1048576
User=hybridlink-agent
Group=hybridlink-agent
RemoveIPC=yes
CapabilityBoundingSet=
{SANDBOX}{SOCKETS_ONLY}\
RuntimeDirectory=hybridlink-agent
RuntimeDirectoryMode=0700

[Install]
WantedBy=multi-user.target
"
        );
        assert_eq!(
            unit(Path::new("/usr/local/bin/hybridlink"), None).render(),
            expected
        );
    }

    #[test]
    fn a_new_string_replaces_the_old_one_for_its_connection() {
        let merged = merge(vec![cs("a", "old"), cs("b", "k")], vec![cs("a", "new")]);
        let names: Vec<String> = merged.iter().map(|c| c.hc.to_string()).collect();
        assert_eq!(names, ["b", "a"]);
        assert_eq!(merged[1].key, cs("a", "new").key);
    }
}
