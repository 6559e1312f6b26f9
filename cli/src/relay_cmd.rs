//! `hybridlink relay ...`

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Context;
use clap::Subcommand;
use proto::control::hex_encode;

/// Relay subcommands.
#[derive(Subcommand, Debug)]
pub enum RelayCommand {
    /// Serve: one port for agents and senders (control channels and pipes),
    /// and the management API. On first start the data dir gets a
    /// self-signed certificate (its SHA-256 goes into every connection
    /// string), an empty registry and a manage key (`DATA_DIR/manage.key`).
    ///
    /// Prints one JSON line on stdout when ready: the bound addresses and the
    /// certificate fingerprint.
    Serve {
        /// Directory for the certificate, registry and manage key.
        #[arg(long, env = "HYBRIDLINK_DATA_DIR")]
        data_dir: PathBuf,
        /// Address of the relay port that agents and senders dial.
        #[arg(long, default_value = "0.0.0.0:9443")]
        listen: SocketAddr,
        /// Address of the management API (plain HTTP: keep it on loopback or
        /// put a TLS proxy in front).
        #[arg(long, default_value = "127.0.0.1:9444")]
        api: SocketAddr,
        /// Host name or address written into connection strings (what the
        /// agents and senders should dial). Defaults to the listen address.
        #[arg(long)]
        public_host: Option<String>,
        /// Port written into connection strings. Defaults to the listen port.
        #[arg(long)]
        public_port: Option<u16>,
    },
}

/// Runs a relay subcommand.
pub async fn run(cmd: RelayCommand) -> anyhow::Result<()> {
    match cmd {
        RelayCommand::Serve {
            data_dir,
            listen,
            api,
            public_host,
            public_port,
        } => {
            let config = relay::RelayConfig {
                data_dir: data_dir.clone(),
                listen,
                api,
                public_host,
                public_port,
            };
            let relay = config.start().await.with_context(|| {
                format!("starting the relay with data dir {}", data_dir.display())
            })?;
            let ready = serde_json::json!({
                "listen": relay.listen.to_string(),
                "api": relay.api.to_string(),
                "cert_sha256": hex_encode(&relay.cert_sha256),
            });
            println!("{ready}");
            crate::shutdown_signal().await;
            tracing::info!("relay stopping");
            Ok(())
        }
    }
}
