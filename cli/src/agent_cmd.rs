//! `hybridlink agent ...`

use std::path::PathBuf;
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
            required = true,
            env = "HYBRIDLINK_CONNECTION_STRING",
            value_delimiter = '\n'
        )]
        connection_strings: Vec<ConnectionString>,
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
        AgentCommand::Run {
            connection_strings,
            status_socket,
            dial_timeout,
            token_ttl,
            label,
        } => {
            let mut options = agent::AgentOptions::new(connection_strings);
            options.dial_timeout = Duration::from_secs(dial_timeout);
            options.token_ttl = Duration::from_secs(token_ttl.max(2));
            if let Some(label) = label {
                options.label = label;
            }
            let agent = agent::Agent::start(options)?;
            let _socket = agent::control_socket::serve(&status_socket, agent.clone())
                .with_context(|| {
                    format!("opening the status socket {}", status_socket.display())
                })?;
            crate::shutdown_signal().await;
            let _ = std::fs::remove_file(&status_socket);
            tracing::info!("agent stopping");
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
