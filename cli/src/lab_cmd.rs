//! `hybridlink lab ...`: the three-machine lab of ARCHITECTURE.md ("The
//! lab") on this host, in network namespaces (root), or as Vagrant VMs.

use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use clap::Subcommand;
use lab::netns::Netns;
use lab::{Machines, Role, demo};

/// Where the namespace labs keep their state (one directory per prefix).
const STATE_ROOT: &str = "/run/hybridlink-lab";

/// Options every namespace lab command takes.
#[derive(clap::Args, Debug, Clone)]
pub struct LabArgs {
    /// Names of the lab's namespaces start with this (1-10 of a-z, 0-9):
    /// PREFIXapp, PREFIXrly, PREFIXonp.
    #[arg(long, default_value = "hl")]
    prefix: String,
}

/// Lab subcommands.
#[derive(Subcommand, Debug)]
pub enum LabCommand {
    /// Build the lab (namespaces app, relay, onprem joined by veths in
    /// 198.18.0.0/15), start the relay, create hybrid connections for an
    /// on-prem web server, PostgreSQL and Redis, start them, the agent and
    /// the appliance. Replaces a lab of the same prefix left by a crash.
    /// Missing Debian packages are installed with apt-get.
    Up {
        #[command(flatten)]
        lab: LabArgs,
        /// Do not install missing packages; name the apt-get line instead.
        #[arg(long)]
        no_install: bool,
    },
    /// Run unmodified clients (curl, psql, redis-cli) in the app namespace
    /// against the on-prem servers and print a report. Brings the lab up
    /// first if it is not, and then down again unless --keep.
    Demo {
        #[command(flatten)]
        lab: LabArgs,
        /// Leave a lab this command brought up running afterwards.
        #[arg(long)]
        keep: bool,
        /// Do not install missing packages; name the apt-get line instead.
        #[arg(long)]
        no_install: bool,
    },
    /// Stop every process of the lab and remove its namespaces, interfaces
    /// and files.
    Down {
        #[command(flatten)]
        lab: LabArgs,
    },
    /// The same lab on three real VMs (vagrant/, libvirt with software
    /// emulation): prepare the host, build the box if missing, bring the VMs
    /// up, provision them with the same role scripts, run the demo's checks
    /// across them, destroy everything. Root; takes about 15 minutes.
    Vagrant {
        /// The directory holding the Vagrantfile.
        #[arg(long, default_value = "vagrant")]
        dir: PathBuf,
        /// Leave the VMs running afterwards.
        #[arg(long)]
        keep: bool,
    },
}

fn is_root() -> bool {
    std::os::unix::fs::MetadataExt::uid(
        &std::fs::metadata("/proc/self").unwrap_or_else(|_| std::fs::metadata("/").expect("/")),
    ) == 0
}

fn netns(args: &LabArgs) -> anyhow::Result<Netns> {
    if !is_root() {
        bail!("the lab builds network namespaces: run it as root");
    }
    let exe = std::env::current_exe().context("finding the hybridlink binary")?;
    Netns::new(&args.prefix, &exe, Path::new(STATE_ROOT))
}

/// Builds and provisions a namespace lab, replacing any leftover.
fn up(lab: &Netns, no_install: bool) -> anyhow::Result<()> {
    lab::packages::ensure(!no_install)?;
    if !lab.existing().is_empty() || lab.state_root().exists() {
        eprintln!(
            "lab: removing the earlier lab {:?} first",
            lab.ns(Role::App).trim_end_matches("app")
        );
        lab.remove()?;
    }
    eprintln!(
        "lab: building namespaces {}, {}, {}",
        lab.ns(Role::App),
        lab.ns(Role::Relay),
        lab.ns(Role::Onprem)
    );
    let provisioned = lab.build().and_then(|()| {
        eprintln!("lab: starting the relay, the on-prem servers and agent, and the appliance");
        demo::provision(lab)
    });
    if let Err(e) = provisioned {
        let logs = logs(lab);
        let _ = lab.remove();
        return Err(e.context(format!("bringing the lab up (removed again){logs}")));
    }
    Ok(())
}

/// The tails of the role logs, for an error message.
fn logs(lab: &Netns) -> String {
    let mut out = String::new();
    for (role, name) in [
        (Role::Relay, "relay"),
        (Role::Onprem, "agent"),
        (Role::App, "appliance"),
    ] {
        if let Ok(text) = demo::role_log(lab, role, name)
            && !text.trim().is_empty()
        {
            out.push_str(&format!("\n--- {name}.log ---\n{text}"));
        }
    }
    out
}

/// Runs a lab subcommand.
pub fn run(cmd: LabCommand) -> anyhow::Result<()> {
    match cmd {
        LabCommand::Up { lab, no_install } => {
            let lab = netns(&lab)?;
            up(&lab, no_install)?;
            println!("{}", usage(&lab));
            Ok(())
        }
        LabCommand::Demo {
            lab,
            keep,
            no_install,
        } => {
            let lab = netns(&lab)?;
            let was_up = lab.existing().len() == 3 && lab.state_root().exists();
            if !was_up {
                up(&lab, no_install)?;
            }
            let report = demo::run_checks(&lab);
            println!(
                "hybridlink lab demo: namespaces {}, {}, {}\n",
                lab.ns(Role::App),
                lab.ns(Role::Relay),
                lab.ns(Role::Onprem)
            );
            print!("{}", report.render());
            if !report.passed() {
                eprint!("{}", logs(&lab));
            }
            if !was_up && !keep {
                lab.remove()?;
                println!("(lab removed; `hybridlink lab up` keeps one running)");
            } else {
                println!("\n{}", usage(&lab));
            }
            if !report.passed() {
                bail!("some checks failed");
            }
            Ok(())
        }
        LabCommand::Vagrant { dir, keep } => {
            if !is_root() {
                bail!("the Vagrant lab sets up libvirt: run it as root");
            }
            if !dir.join("Vagrantfile").exists() {
                bail!(
                    "no Vagrantfile in {} (run from the repository root, or pass --dir)",
                    dir.display()
                );
            }
            let dir = dir.canonicalize()?;
            let exe = std::env::current_exe().context("finding the hybridlink binary")?;
            let report = lab::vagrant::run(&dir, &exe, keep)?;
            println!("hybridlink lab vagrant: VMs app, relay, onprem\n");
            print!("{}", report.render());
            if !report.passed() {
                bail!("some checks failed");
            }
            Ok(())
        }
        LabCommand::Down { lab } => {
            let lab = netns(&lab)?;
            let had = !lab.existing().is_empty() || lab.state_root().exists();
            lab.remove()?;
            println!(
                "{}",
                if had {
                    "lab removed"
                } else {
                    "no lab to remove"
                }
            );
            Ok(())
        }
    }
}

/// What to try in a running lab.
fn usage(lab: &Netns) -> String {
    let app = lab.ns(Role::App);
    let onp = lab.ns(Role::Onprem);
    let state = PathBuf::from(lab.state(Role::Onprem));
    format!(
        "The lab is up. Try:\n  ip netns exec {app} curl http://payroll.corp/\n  ip netns exec {app} psql -h sql.corp -U postgres -c 'select 1'\n  ip netns exec {app} redis-cli -h cache.corp ping\n  ip netns exec {onp} {} agent status --status-socket {}\nLogs: {}/*/*.log. Remove it with: hybridlink lab down{}",
        lab.hybridlink(),
        state.join("agent.sock").display(),
        lab.state_root().display(),
        if lab.ns(Role::App) == "hlapp" {
            String::new()
        } else {
            format!(" --prefix {}", app.trim_end_matches("app"))
        },
    )
}
