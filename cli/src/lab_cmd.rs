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
        /// Relay nodes: 1, or 2 to 3 for a relay cluster on etcd, each node
        /// with an etcd member in its own namespace (PREFIXrly,
        /// PREFIXrly2, PREFIXrly3), all reached by the name relay.lab.test.
        #[arg(long, default_value_t = 1)]
        relays: usize,
        /// Do not install missing packages; name the apt-get line instead.
        #[arg(long)]
        no_install: bool,
    },
    /// Run unmodified clients (curl, psql, redis-cli) in the app namespace
    /// against the on-prem servers and print a report. Brings the lab up
    /// first if it is not, and then down again unless --keep. With a relay
    /// cluster it also kills the node the appliance uses and checks that
    /// the app's next connection by host name succeeds and that the agent
    /// is attached on the remaining nodes, then starts the node again.
    Demo {
        #[command(flatten)]
        lab: LabArgs,
        /// Relay nodes of a lab the demo brings up (as for `lab up`); a
        /// running lab is checked with the nodes it has.
        #[arg(long)]
        relays: Option<usize>,
        /// Leave a lab this command brought up running afterwards.
        #[arg(long)]
        keep: bool,
        /// Do not install missing packages; name the apt-get line instead.
        #[arg(long)]
        no_install: bool,
    },
    /// Stop every process of the lab (relay nodes and etcd members too) and
    /// remove its namespaces, interfaces and files (etcd's data with them).
    Down {
        #[command(flatten)]
        lab: LabArgs,
    },
    /// The same lab on three real VMs (vagrant/, libvirt with software
    /// emulation): prepare the host, build the box if missing, bring the VMs
    /// up, provision them with the same role scripts, run the demo's checks
    /// across them, destroy everything. Root; takes about 15 minutes. One
    /// lab per host: a second run waits for the first
    /// (/run/lock/hybridlink-vagrant.lock), and a run removes what an
    /// interrupted one left.
    Vagrant {
        /// The directory holding the Vagrantfile.
        #[arg(long, default_value = "vagrant")]
        dir: PathBuf,
        /// Leave the VMs running afterwards. The next `lab vagrant` on this
        /// host removes them before it starts (the VMs' names are fixed).
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
    lab::packages::ensure(!no_install, lab.relays() > 1)?;
    if !lab.existing().is_empty() || lab.state_root().exists() {
        eprintln!(
            "lab: removing the earlier lab {:?} first",
            lab.ns(Role::App).trim_end_matches("app")
        );
        lab.remove()?;
    }
    eprintln!("lab: building namespaces {}", namespaces(lab));
    let provisioned = lab.build().and_then(|()| {
        if lab.relays() > 1 {
            eprintln!(
                "lab: starting {} etcd members and relay nodes, the on-prem servers and agent, and the appliance",
                lab.relays()
            );
        } else {
            eprintln!(
                "lab: starting the relay, the on-prem servers and agent, and the appliance"
            );
        }
        demo::provision(lab)
    });
    if let Err(e) = provisioned {
        let logs = logs(lab);
        let _ = lab.remove();
        return Err(e.context(format!("bringing the lab up (removed again){logs}")));
    }
    Ok(())
}

/// The lab's namespaces, as a person reads them.
fn namespaces(lab: &Netns) -> String {
    Role::all(lab.relays())
        .iter()
        .map(|r| lab.ns(*r))
        .collect::<Vec<_>>()
        .join(", ")
}

/// The tails of the role logs, for an error message.
fn logs(lab: &Netns) -> String {
    let mut out = String::new();
    let mut logs: Vec<(Role, &str)> = Vec::new();
    for node in Role::relay_nodes(lab.relays()) {
        logs.push((*node, "relay"));
        if lab.relays() > 1 {
            logs.push((*node, "etcd"));
        }
    }
    logs.extend([(Role::Onprem, "agent"), (Role::App, "appliance")]);
    for (role, name) in logs {
        if let Ok(text) = demo::role_log(lab, role, name)
            && !text.trim().is_empty()
        {
            out.push_str(&format!("\n--- {}/{name}.log ---\n{text}", role.name()));
        }
    }
    out
}

/// Runs a lab subcommand.
pub fn run(cmd: LabCommand) -> anyhow::Result<()> {
    match cmd {
        LabCommand::Up {
            lab,
            relays,
            no_install,
        } => {
            let lab = netns(&lab)?.with_relays(relays)?;
            up(&lab, no_install)?;
            println!("{}", usage(&lab));
            Ok(())
        }
        LabCommand::Demo {
            lab,
            relays,
            keep,
            no_install,
        } => {
            let lab = netns(&lab)?;
            let running = lab.running_relays();
            let was_up =
                running > 0 && lab.existing().len() == running + 2 && lab.state_root().exists();
            let lab = if was_up {
                if let Some(asked) = relays.filter(|n| *n != running) {
                    bail!(
                        "the running lab has {running} relay node(s), not {asked}: run `hybridlink lab down` first, or leave out --relays"
                    );
                }
                lab.with_relays(running)?
            } else {
                let lab = lab.with_relays(relays.unwrap_or(1))?;
                up(&lab, no_install)?;
                lab
            };
            let report = demo::run_checks(&lab);
            println!("hybridlink lab demo: namespaces {}\n", namespaces(&lab));
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
    let mut nodes = String::new();
    if lab.relays() > 1 {
        let names: Vec<String> = Role::relay_nodes(lab.relays())
            .iter()
            .map(|r| lab.ns(*r))
            .collect();
        nodes = format!(
            "Relay nodes {} (each with an etcd member), all named {} on app and onprem:\n  ip netns exec {} {} hc --api http://127.0.0.1:9444 --data-dir {}/data status payroll\n",
            names.join(", "),
            lab::RELAY_NAME,
            names[1],
            lab.hybridlink(),
            lab.state(Role::Relay2),
        );
    }
    format!(
        "The lab is up. Try:\n  ip netns exec {app} curl http://payroll.corp/\n  ip netns exec {app} psql -h sql.corp -U postgres -c 'select 1'\n  ip netns exec {app} redis-cli -h cache.corp ping\n  ip netns exec {onp} {} agent status --status-socket {}\n{nodes}Logs: {}/*/*.log. Remove it with: hybridlink lab down{}",
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
