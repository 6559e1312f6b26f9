//! The three-namespace lab of DESIGN.md, made on the spot for one test and
//! removed when it drops (even when the test fails):
//!
//! ```text
//!  app 198.18.1.2 ──veth── 198.18.1.1 relay 198.18.2.1 ──veth── 198.18.2.2 onprem
//!                          (lo: 198.18.0.1, the relay's address)
//! ```
//!
//! The relay namespace does not forward, so app and onprem can reach each
//! other only through the relay program. Each namespace gets its own
//! `/etc/netns/NAME/{hosts,resolv.conf}`, which `ip netns exec` mounts over
//! `/etc`: the on-prem host names resolve only on-prem, and the app's
//! resolver is the lab's upstream until the appliance takes over.

use std::path::PathBuf;
use std::process::{Command, Output, Stdio};

use anyhow::{Context, Result, bail};

use crate::{Proc, binary};

/// The relay's address, reachable from both sides.
pub const RELAY_IP: &str = "198.18.0.1";
/// The app namespace's address.
pub const APP_IP: &str = "198.18.1.2";
/// The on-prem namespace's address.
pub const ONPREM_IP: &str = "198.18.2.2";
/// The relay namespace's address on the app side, where the lab's upstream
/// DNS server listens.
pub const UPSTREAM_DNS_IP: &str = "198.18.1.1";

/// True when this process may build namespaces.
pub fn is_root() -> bool {
    std::fs::metadata("/proc/self")
        .map(|m| std::os::unix::fs::MetadataExt::uid(&m) == 0)
        .unwrap_or(false)
}

/// One lab; everything in it is removed on drop.
#[derive(Debug)]
pub struct Lab {
    /// Namespace of the application side.
    pub app: String,
    /// Namespace of the relay.
    pub relay: String,
    /// Namespace of the on-prem side.
    pub onprem: String,
}

fn run(cmd: &mut Command) -> Result<Output> {
    let out = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(out)
}

fn ip(args: &[&str]) -> Result<Output> {
    run(Command::new("ip").args(args))
}

impl Lab {
    /// Builds a lab whose names start with `hl` and contain `tag` (keep it
    /// to 3 characters: interface names are limited to 15).
    pub fn new(tag: &str) -> Result<Lab> {
        let id = format!("{}{tag}", std::process::id() % 10000);
        let lab = Lab {
            app: format!("hl{id}app"),
            relay: format!("hl{id}rly"),
            onprem: format!("hl{id}onp"),
        };
        // Drop cleans up whatever part of the setup succeeded.
        lab.build(&id)?;
        Ok(lab)
    }

    fn build(&self, id: &str) -> Result<()> {
        for ns in [&self.app, &self.relay, &self.onprem] {
            ip(&["netns", "add", ns])?;
            self.sh(ns, "ip link set lo up")?;
        }
        let (a, ar) = (format!("hl{id}a"), format!("hl{id}ar"));
        let (o, or) = (format!("hl{id}o"), format!("hl{id}or"));
        ip(&[
            "link",
            "add",
            &a,
            "netns",
            &self.app,
            "type",
            "veth",
            "peer",
            "name",
            &ar,
            "netns",
            &self.relay,
        ])?;
        ip(&[
            "link",
            "add",
            &o,
            "netns",
            &self.onprem,
            "type",
            "veth",
            "peer",
            "name",
            &or,
            "netns",
            &self.relay,
        ])?;
        self.sh(&self.app, &format!("ip addr add {APP_IP}/24 dev {a} && ip link set {a} up && ip route add {RELAY_IP}/32 via 198.18.1.1"))?;
        self.sh(&self.onprem, &format!("ip addr add {ONPREM_IP}/24 dev {o} && ip link set {o} up && ip route add {RELAY_IP}/32 via 198.18.2.1"))?;
        self.sh(
            &self.relay,
            &format!(
                "ip addr add 198.18.1.1/24 dev {ar} && ip link set {ar} up && ip addr add 198.18.2.1/24 dev {or} && ip link set {or} up && ip addr add {RELAY_IP}/32 dev lo && sysctl -qw net.ipv4.ip_forward=0"
            ),
        )?;
        for ns in [&self.app, &self.relay, &self.onprem] {
            std::fs::create_dir_all(etc_dir(ns))?;
            std::fs::write(etc_dir(ns).join("hosts"), "127.0.0.1 localhost\n")?;
            std::fs::write(
                etc_dir(ns).join("resolv.conf"),
                format!("nameserver {UPSTREAM_DNS_IP}\nsearch lab.test\n"),
            )?;
        }
        Ok(())
    }

    /// Makes `names` resolve to `ip` inside the on-prem namespace only.
    pub fn onprem_hosts(&self, entries: &[(&str, &str)]) -> Result<()> {
        let mut text = String::from("127.0.0.1 localhost\n");
        for (ip, name) in entries {
            text.push_str(&format!("{ip} {name}\n"));
        }
        std::fs::write(etc_dir(&self.onprem).join("hosts"), text)?;
        Ok(())
    }

    /// The app namespace's resolv.conf as a process inside it sees it.
    pub fn app_resolv_conf(&self) -> Result<String> {
        Ok(std::fs::read_to_string(
            etc_dir(&self.app).join("resolv.conf"),
        )?)
    }

    /// A command that runs `program` inside namespace `ns`.
    pub fn command(&self, ns: &str, program: &str) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", ns, program]);
        c
    }

    /// Runs a shell command line inside `ns`; fails on a non-zero exit.
    pub fn sh(&self, ns: &str, line: &str) -> Result<Output> {
        run(self.command(ns, "sh").args(["-c", line]))
    }

    /// Starts `hybridlink ARGS...` inside `ns`.
    pub fn hybridlink(&self, ns: &str, name: &str, args: &[&str]) -> Result<Proc> {
        let bin = binary();
        let bin = bin.to_str().context("utf-8 binary path")?;
        let mut argv = vec!["netns", "exec", ns, bin];
        argv.extend_from_slice(args);
        Proc::start_program("ip", name, &argv)
    }

    /// Starts any program inside `ns`, stdout discarded.
    pub fn spawn(&self, ns: &str, name: &str, argv: &[&str]) -> Result<Proc> {
        let mut full = vec!["netns", "exec", ns];
        full.extend_from_slice(argv);
        Proc::start_program_quiet("ip", name, &full)
    }
}

fn etc_dir(ns: &str) -> PathBuf {
    PathBuf::from("/etc/netns").join(ns)
}

impl Drop for Lab {
    fn drop(&mut self) {
        for ns in [&self.app, &self.relay, &self.onprem] {
            // Kill whatever still runs inside, then remove the namespace
            // (which removes its veths and tun devices with it).
            if let Ok(out) = Command::new("ip")
                .args(["netns", "pids", ns])
                .stderr(Stdio::null())
                .output()
            {
                for pid in String::from_utf8_lossy(&out.stdout).split_whitespace() {
                    let _ = Command::new("kill").args(["-9", pid]).status();
                }
            }
            let _ = Command::new("ip")
                .args(["netns", "del", ns])
                .stderr(Stdio::null())
                .status();
            let _ = std::fs::remove_dir_all(etc_dir(ns));
        }
    }
}
