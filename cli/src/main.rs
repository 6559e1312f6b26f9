//! `hybridlink`: one binary for every role. Thin wiring only; the work is in
//! the library crates.

mod agent_cmd;
mod api_client;
mod appliance_cmd;
mod connection_strings;
mod hc;
mod install;
mod lab_cmd;
mod relay_cmd;
mod send_cmd;
mod threads;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// hybridlink: reach a TCP service inside a private network by its host name
/// and port, from an unmodified application elsewhere, with no VPN and no
/// inbound firewall hole. Both sides dial out to a relay.
///
/// Typical setup: run `hybridlink relay serve` on a host both sides can reach,
/// create a hybrid connection with `hybridlink hc create`, give its listen
/// connection string to `hybridlink agent run` next to the service, and its
/// send connection string to the application side (`appliance`, `connect` or
/// `forward`).
///
/// Exit codes: 0 ok, 2 bad usage, 1 anything else (the reason is printed on
/// stderr). Logs go to stderr; set RUST_LOG (e.g. `RUST_LOG=debug`) for more.
#[derive(Parser, Debug)]
#[command(name = "hybridlink", version, propagate_version = true)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run the relay: the rendezvous both sides dial out to.
    Relay {
        #[command(subcommand)]
        cmd: relay_cmd::RelayCommand,
    },
    /// Manage hybrid connections through the relay's management API.
    Hc {
        #[command(subcommand)]
        cmd: hc::HcCommand,
        #[command(flatten)]
        api: hc::ApiArgs,
    },
    /// Run or inspect the on-premises agent.
    Agent {
        #[command(subcommand)]
        cmd: agent_cmd::AgentCommand,
    },
    /// Run the appliance: the sidecar that lets unmodified apps reach
    /// on-prem services by host name.
    Appliance {
        #[command(subcommand)]
        cmd: appliance_cmd::ApplianceCommand,
    },
    /// Open one stream to a hybrid connection and join it to stdin/stdout,
    /// like `nc`. Needs no root. Also a quick reachability check: it fails
    /// with the agent's reason when the target refuses or cannot be reached.
    Connect(send_cmd::ConnectArgs),
    /// Listen on a local TCP port and forward every connection to a hybrid
    /// connection. Needs no root.
    Forward(send_cmd::ForwardArgs),
    /// The lab: app, relay and onprem machines as network namespaces on
    /// this host (root), with real servers and unmodified clients.
    Lab {
        #[command(subcommand)]
        cmd: lab_cmd::LabCommand,
    },
}

/// glibc's mmap threshold for the appliance and the agent. With glibc's
/// default (a threshold that grows after large frees), the netstack's
/// per-flow buffers come from recycled heap memory that stays resident; a
/// fixed threshold at their size (512 KiB each by default) maps each
/// fresh, so that an idle flow holds about 9 KiB (`netstack_tun` bench).
/// It is not lower: the
/// multiplexer's 256 KiB read buffers must come from the heap, where freed
/// memory is reused as it is, since mapping each fresh cost a page fault
/// every 4 KiB received, a quarter of the appliance's CPU on-prem → app.
const MMAP_THRESHOLD: &str = "524288";

/// glibc's trim threshold for the appliance and the agent: how much free
/// memory at the top of a heap is kept rather than given back. At its
/// default (128 KiB) the memory of the multiplexer's read buffers went
/// back to the kernel as soon as the streams had passed it on and was
/// faulted in again a page at a time by the next read (about a sixth of
/// the appliance's CPU on-prem → app, a tenth of the agent's app →
/// on-prem). 32 MiB covers the buffers of a busy pipe; the memory is only
/// kept where it was used at a peak.
const TRIM_THRESHOLD: &str = "33554432";

fn main() -> ExitCode {
    let cli = Cli::parse();
    if matches!(
        cli.command,
        Command::Appliance { .. } | Command::Agent { .. }
    ) && std::env::var_os("MALLOC_TRIM_THRESHOLD_").is_none()
    {
        // glibc reads these at start, so run ourselves again with them
        // (same pid: exec replaces this process).
        use std::os::unix::process::CommandExt;
        if let Ok(exe) = std::env::current_exe() {
            let mut again = std::process::Command::new(exe);
            again
                .args(std::env::args_os().skip(1))
                .env("MALLOC_TRIM_THRESHOLD_", TRIM_THRESHOLD);
            // Fixing one of glibc's thresholds fixes the other at its
            // default, which would map every read buffer fresh.
            if std::env::var_os("MALLOC_MMAP_THRESHOLD_").is_none() {
                again.env("MALLOC_MMAP_THRESHOLD_", MMAP_THRESHOLD);
            }
            let err = again.exec();
            eprintln!(
                "hybridlink: could not re-run with glibc's thresholds fixed ({err}); continuing without"
            );
        }
    }
    let default_level = match &cli.command {
        // `connect` owns stdout; keep stderr quiet unless asked.
        Command::Connect(_) => "warn",
        // hickory logs every DNS request at INFO; keep its warnings only.
        _ => "info,hickory_server=warn",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_level));
    // Colours only on a terminal: in a log file or the journal an escape
    // sequence would be noise, and would hide any that a peer smuggled in.
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    // Every socket is a file: take all the hard limit allows.
    match transport::fd_limit::raise() {
        Ok((before, after)) if before != after => {
            tracing::debug!(?before, ?after, "open-files limit raised");
        }
        Ok(_) => {}
        Err(e) => tracing::warn!(error = %e, "could not raise the open-files limit"),
    }

    let result = match cli.command {
        Command::Hc { cmd, api } => hc::run(cmd, &api),
        Command::Lab { cmd } => lab_cmd::run(cmd),
        other => runtime(&other).and_then(|rt| {
            let result = rt.block_on(async move {
                match other {
                    Command::Relay { cmd } => relay_cmd::run(cmd).await,
                    Command::Agent { cmd } => agent_cmd::run(cmd).await,
                    Command::Appliance { cmd } => appliance_cmd::run(cmd).await,
                    Command::Connect(args) => send_cmd::connect(args).await,
                    Command::Forward(args) => send_cmd::forward(args).await,
                    Command::Hc { .. } | Command::Lab { .. } => unreachable!("handled above"),
                }
            });
            // `connect` reads stdin on a blocking thread that nothing can
            // cancel; waiting for it would keep a cut stream's process
            // alive until its stdin closes.
            rt.shutdown_timeout(std::time::Duration::from_millis(100));
            result
        }),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("hybridlink: {e:#}");
            if e.downcast_ref::<connection_strings::UsageError>().is_some() {
                ExitCode::from(2)
            } else {
                ExitCode::FAILURE
            }
        }
    }
}

/// The runtime for `cmd`, with the threads it asks for (`--threads`) or
/// its role's default.
fn runtime(cmd: &Command) -> anyhow::Result<tokio::runtime::Runtime> {
    use threads::Role;
    let (asked, role) = match cmd {
        Command::Relay { cmd } => (cmd.threads(), Role::Owner),
        Command::Agent { cmd } => (cmd.threads(), Role::Guest),
        Command::Appliance { cmd } => (cmd.threads(), Role::Guest),
        _ => (None, Role::Owner),
    };
    threads::runtime(asked, role)
}

/// Resolves on SIGINT or SIGTERM.
pub(crate) async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let term = signal(SignalKind::terminate());
    let int = signal(SignalKind::interrupt());
    match (term, int) {
        (Ok(mut term), Ok(mut int)) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
        }
        _ => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}
