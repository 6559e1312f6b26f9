//! `hybridlink appliance ...`

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Context;
use appliance::config::{ApplianceConfig, check_tun, parse_range};
use clap::Subcommand;
use proto::connection_string::ConnectionString;

/// Appliance subcommands.
#[derive(Subcommand, Debug)]
pub enum ApplianceCommand {
    /// Run the sidecar (as root, in the app's network namespace): create a
    /// tun device, route the virtual range and every IPv4-literal endpoint
    /// into it, answer DNS for the hybrid connections' host names, and carry
    /// each TCP flow of the app to the on-prem target through the relay.
    /// Every change to the namespace (routes, rules, sysctls, resolv.conf)
    /// is undone on exit, and by the next start after a crash.
    Run {
        /// A TOML config file (see the README for its keys).
        #[arg(long, conflicts_with = "connection_strings")]
        config: Option<PathBuf>,
        /// A send connection string (`hybridlink hc keys NAME`); repeat for
        /// more hybrid connections.
        #[arg(long = "connection-string", required_unless_present = "config")]
        connection_strings: Vec<ConnectionString>,
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
    },
}

/// Runs an appliance subcommand.
pub async fn run(cmd: ApplianceCommand) -> anyhow::Result<()> {
    let ApplianceCommand::Run {
        config,
        connection_strings,
        virtual_range,
        tun,
        dns_listen,
        state_dir,
    } = cmd;
    let mut config_from_file = match &config {
        Some(path) => ApplianceConfig::load(path)?,
        None => ApplianceConfig::new(connection_strings)?,
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
    appliance::service::run(config_from_file, config_path, crate::shutdown_signal())
        .await
        .context("appliance")?;
    tracing::info!("appliance stopped; the namespace is as it was");
    Ok(())
}
