//! `hybridlink agent ...`

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;
use clap::Subcommand;
use proto::connection_string::ConnectionString;

/// Agent subcommands.
#[derive(Subcommand, Debug)]
pub enum AgentCommand {
    /// Serve hybrid connections: dial out to the relay with their listen
    /// connection strings and forward every stream to the hybrid connection's
    /// host:port. Reconnects by itself when the relay goes away.
    Run {
        /// A listen connection string (`hybridlink hc keys NAME`); repeat for
        /// more hybrid connections.
        #[arg(
            long = "connection-string",
            required_unless_present = "connection_strings_file",
            env = "HYBRIDLINK_CONNECTION_STRING",
            value_delimiter = '\n'
        )]
        connection_strings: Vec<ConnectionString>,
        /// A file of listen connection strings, one per line (`#` starts a
        /// comment), as `agent install` writes it.
        #[arg(long, value_name = "FILE")]
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
        /// Name shown in the relay's status (default: this host's name).
        #[arg(long)]
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
    /// (mode 0600; a string for a hybrid connection already there replaces
    /// it), writes /etc/systemd/system/hybridlink-agent.service, enables and
    /// (re)starts it.
    Install {
        /// A listen connection string (`hybridlink hc keys NAME --rule listen
        /// --key primary`); repeat for more hybrid connections.
        #[arg(long = "connection-string", required = true)]
        connection_strings: Vec<ConnectionString>,
        #[command(flatten)]
        install: crate::install::InstallArgs,
    },
    /// Show the state of each hybrid connection a running agent serves.
    Status {
        /// The running agent's status socket.
        #[arg(long, default_value_os_t = agent::control_socket::default_path())]
        status_socket: PathBuf,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
}

/// Runs an agent subcommand.
pub async fn run(cmd: AgentCommand) -> anyhow::Result<()> {
    match cmd {
        AgentCommand::Install {
            connection_strings,
            install,
        } => install_agent(connection_strings, &install),
        AgentCommand::Run {
            mut connection_strings,
            connection_strings_file,
            status_socket,
            dial_timeout,
            token_ttl,
            label,
            drain_timeout,
            metrics,
        } => {
            let fixed = connection_strings.clone();
            if let Some(path) = &connection_strings_file {
                connection_strings.extend(read_strings_file(path)?);
            }
            let mut options = agent::AgentOptions::new(connection_strings);
            options.dial_timeout = Duration::from_secs(dial_timeout);
            options.token_ttl = Duration::from_secs(token_ttl.max(2));
            if let Some(label) = label {
                options.label = label;
            }
            let agent = agent::Agent::start(options)?;
            if let Some(addr) = metrics {
                let bound = transport::metrics::serve(addr, || {
                    transport::metrics::render(transport::metrics::Role::Agent)
                })
                .await
                .with_context(|| format!("serving metrics on {addr}"))?;
                tracing::info!(%bound, "metrics at http://{bound}/metrics");
            }
            let (reload_tx, mut reload_rx) = tokio::sync::mpsc::channel(4);
            let reload_tx = connection_strings_file.as_ref().map(|_| reload_tx);
            let _socket = agent::control_socket::serve(&status_socket, agent.clone(), reload_tx)
                .with_context(|| {
                    format!("opening the status socket {}", status_socket.display())
                })?;
            let reload = async |agent: &agent::Agent| -> Result<agent::ReloadSummary, String> {
                let Some(path) = &connection_strings_file else {
                    return Err("no --connection-strings-file to reload".into());
                };
                let mut strings = fixed.clone();
                strings.extend(read_strings_file(path).map_err(|e| format!("{e:#}"))?);
                agent.reload(strings).await.map_err(|e| e.to_string())
            };
            let mut hangup =
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())?;
            let shutdown = crate::shutdown_signal();
            tokio::pin!(shutdown);
            loop {
                tokio::select! {
                    _ = &mut shutdown => break,
                    _ = hangup.recv() => {
                        if let Err(e) = reload(&agent).await {
                            tracing::warn!(error = %e, "reload on SIGHUP failed; still serving the old strings");
                        }
                    }
                    Some(answer) = reload_rx.recv() => {
                        let result = reload(&agent).await;
                        if let Err(e) = &result {
                            tracing::warn!(error = %e, "reload failed; still serving the old strings");
                        }
                        let _ = answer.send(result);
                    }
                }
            }
            // Out of rotation at once; open streams get time to finish.
            agent.stop_accepting();
            let deadline = tokio::time::Instant::now() + Duration::from_secs(drain_timeout);
            if agent.active_streams() > 0 {
                tracing::info!(
                    open = agent.active_streams(),
                    "agent stopping; draining open streams"
                );
            }
            while agent.active_streams() > 0 && tokio::time::Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            let _ = std::fs::remove_file(&status_socket);
            tracing::info!(cut = agent.active_streams(), "agent stopped");
            Ok(())
        }
        AgentCommand::Reload { status_socket } => {
            let answer = agent::control_socket::request(&status_socket, "reload")
                .await
                .with_context(|| {
                    format!(
                        "asking the agent at {} (is `hybridlink agent run` running?)",
                        status_socket.display()
                    )
                })?;
            if let Some(error) = answer["error"].as_str() {
                anyhow::bail!("{error}");
            }
            let r = &answer["reloaded"];
            let list = |k: &str| {
                let names: Vec<&str> = r[k]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(|v| v.as_str())
                    .collect();
                if names.is_empty() {
                    "-".to_string()
                } else {
                    names.join(", ")
                }
            };
            println!(
                "reloaded: added {}; changed {}; removed {}",
                list("added"),
                list("changed"),
                list("removed")
            );
            Ok(())
        }
        AgentCommand::Status {
            status_socket,
            json,
        } => {
            let status = agent::control_socket::query(&status_socket)
                .await
                .with_context(|| {
                    format!(
                        "asking the agent at {} (is `hybridlink agent run` running?)",
                        status_socket.display()
                    )
                })?;
            if json {
                println!("{}", serde_json::to_string_pretty(&status)?);
            } else {
                println!(
                    "{:<24} {:<14} {:<32} REASON",
                    "HYBRID CONNECTION", "STATE", "ENDPOINT"
                );
                for hc in status.as_array().into_iter().flatten() {
                    let name = hc["name"].as_str().unwrap_or("?");
                    let state = hc["connection"]["state"].as_str().unwrap_or("?");
                    let state = match state {
                        "connected" => "Connected",
                        "reconnecting" => "Reconnecting",
                        "denied" => "Denied",
                        other => other,
                    };
                    let endpoint = hc["endpoint"].as_str().unwrap_or("-");
                    let reason = hc["connection"]["reason"].as_str().unwrap_or("");
                    println!("{name:<24} {state:<14} {endpoint:<32} {reason}");
                }
            }
            Ok(())
        }
    }
}

/// Where `agent install` keeps the listen connection strings.
pub const AGENT_CONF: &str = "/etc/hybridlink/agent.conf";

/// Reads a file of connection strings, one per line; `#` starts a comment.
pub fn read_strings_file(path: &Path) -> anyhow::Result<Vec<ConnectionString>> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading connection strings from {}", path.display()))?;
    parse_strings(&text).with_context(|| format!("in {}", path.display()))
}

fn parse_strings(text: &str) -> anyhow::Result<Vec<ConnectionString>> {
    let mut out = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let cs: ConnectionString = line
            .parse()
            .map_err(|e| anyhow::anyhow!("line {}: {e}", n + 1))?;
        out.push(cs);
    }
    Ok(out)
}

/// Adds `new` to `old`: a string for the same hybrid connection on the same
/// relay replaces the old one.
fn merge(old: Vec<ConnectionString>, new: Vec<ConnectionString>) -> Vec<ConnectionString> {
    let same = |a: &ConnectionString, b: &ConnectionString| {
        a.entity == b.entity && a.relay_host == b.relay_host && a.relay_port == b.relay_port
    };
    let mut out: Vec<ConnectionString> = old
        .into_iter()
        .filter(|o| !new.iter().any(|n| same(o, n)))
        .collect();
    out.extend(new);
    out
}

fn install_agent(
    strings: Vec<ConnectionString>,
    args: &crate::install::InstallArgs,
) -> anyhow::Result<()> {
    for cs in &strings {
        if cs.key_name != "listen" {
            anyhow::bail!(
                "the connection string for {} is a {} string; the agent needs the listen string (`hybridlink hc keys {} --rule listen --key primary`)",
                cs.entity,
                cs.key_name,
                cs.entity
            );
        }
    }
    let conf = args.under_root(Path::new(AGENT_CONF));
    let old = if conf.exists() {
        read_strings_file(&conf)?
    } else {
        Vec::new()
    };
    let all = merge(old, strings);
    let mut text = String::from(
        "# Listen connection strings served by the hybridlink agent, one per line.\n# Written by `hybridlink agent install`, which adds to this list.\n",
    );
    for cs in &all {
        text.push_str(&format!("{cs}\n"));
    }
    crate::install::write_file(&conf, &text, 0o600)?;
    let binary = args.binary()?;
    let unit = crate::install::Unit {
        name: "hybridlink-agent",
        description: "hybridlink agent: serves hybrid connections to on-premises services",
        exec_start: vec![
            binary.display().to_string(),
            "agent".into(),
            "run".into(),
            "--connection-strings-file".into(),
            AGENT_CONF.into(),
        ],
        reload_on_hup: true,
        notify: false,
        service: [
            "NoNewPrivileges=yes",
            "ProtectSystem=strict",
            "ProtectHome=yes",
            "PrivateTmp=yes",
            "ReadWritePaths=/run",
            "CapabilityBoundingSet=",
        ]
        .map(String::from)
        .to_vec(),
        written_by: "hybridlink agent install",
    };
    crate::install::install_unit(args, &unit)?;
    let names: Vec<String> = all.iter().map(|cs| cs.entity.to_string()).collect();
    println!("the agent serves: {}", names.join(", "));
    Ok(())
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
    fn strings_files_skip_comments_and_name_bad_lines() {
        let text = format!("# c\n\n{}\n  {}  \n", cs("a", "k1"), cs("b", "k2"));
        assert_eq!(parse_strings(&text).unwrap().len(), 2);
        let err = parse_strings("# c\nnot a string\n")
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("line 2: "), "{err}");
    }

    #[test]
    fn a_new_string_replaces_the_old_one_for_its_connection() {
        let merged = merge(vec![cs("a", "old"), cs("b", "k")], vec![cs("a", "new")]);
        let names: Vec<String> = merged.iter().map(|c| c.entity.to_string()).collect();
        assert_eq!(names, ["b", "a"]);
        assert_eq!(merged[1].key, cs("a", "new").key);
    }
}
