//! The lab as network namespaces on this host:
//!
//! ```text
//!  app 198.18.1.2 ──veth── 198.18.1.1 relay 198.18.2.1 ──veth── 198.18.2.2 onprem
//!                          (lo: 198.18.0.1, the relay's address)
//! ```
//!
//! The relay namespace does not forward, so app and onprem reach each other
//! only through the relay program. Each namespace gets its own
//! `/etc/netns/NAME/{hosts,resolv.conf}`, which `ip netns exec` mounts over
//! the files in `/etc`: on-prem host names resolve only on-prem, and the
//! app's resolver points into the lab until the appliance takes over.
//!
//! With `relays` 2 or 3, nodes 2 and 3 are namespaces of their own, built
//! like node 1, each holding a relay node and an etcd member as a relay
//! host of a real cluster would:
//!
//! ```text
//!                 ┌─ relay  (lo 198.18.0.1) ─┐
//!  app 198.18.1.2 ┼─ relay2 (lo 198.18.0.2) ─┼ 198.18.2.2 onprem
//!                 └─ relay3 (lo 198.18.0.3) ─┘
//!        relay ── relay2 ── relay3 ── relay: 198.18.3.N (etcd)
//! ```
//!
//! App and onprem keep their one address on every link (node N's side is
//! 198.18.1.1N, 198.18.2.1N, point to point) and route each node's address
//! over that node's link; the nodes are joined pairwise, each at its
//! cluster address 198.18.3.N, where its etcd member listens and to which
//! app and onprem have no route. No node forwards: app and onprem still
//! reach each other only through a relay program. A node and its etcd
//! member share a namespace so that the lab is the three-host cluster of
//! README "Running several relays", and so that the role script that
//! starts both serves one VM per node as well.
//!
//! Names: PREFIX + `app`, `rly`, `rly2`, `rly3`, `onp` for the namespaces;
//! PREFIX + `a`, `ar`, `o`, `or` for node 1's veths, `aN`, `arN`, `oN`,
//! `orN` for node N's, `nNM` for node N's end of the link to node M
//! (interface names are limited to 15 bytes, so a prefix has at most 10).

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::{
    APP_IP, MAX_RELAYS, Machines, ONPREM_IP, RELAY_APP_SIDE_IP, RELAY_IP, RELAY_ONPREM_SIDE_IP,
    Role, relay_cluster_ip, relay_node_ip,
};

/// A lab's namespaces, by prefix. Building and removing are explicit: the
/// CLI's lab outlives the command that built it.
#[derive(Debug, Clone)]
pub struct Netns {
    prefix: String,
    binary: PathBuf,
    state_root: PathBuf,
    relays: usize,
}

/// How long processes get to exit on SIGTERM before they are killed.
const STOP_GRACE: Duration = Duration::from_secs(5);

impl Netns {
    /// The lab named by `prefix` (1-10 characters of a-z and 0-9), running
    /// `binary` as hybridlink, with its state under `state_root/PREFIX`.
    pub fn new(prefix: &str, binary: &Path, state_root: &Path) -> Result<Netns> {
        if prefix.is_empty()
            || prefix.len() > 10
            || !prefix
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
        {
            bail!("lab prefix {prefix:?}: use 1 to 10 characters of a-z and 0-9");
        }
        Ok(Netns {
            prefix: prefix.to_string(),
            binary: binary.to_path_buf(),
            state_root: state_root.join(prefix),
            relays: 1,
        })
    }

    /// The same lab with `relays` relay nodes (1 to 3; more than one: a
    /// cluster on etcd, see the module's doc).
    pub fn with_relays(self, relays: usize) -> Result<Netns> {
        if !(1..=MAX_RELAYS).contains(&relays) {
            bail!("--relays {relays}: a lab has 1 to {MAX_RELAYS} relay nodes");
        }
        Ok(Netns { relays, ..self })
    }

    /// The relay nodes of the lab as it runs now: how many of its relay
    /// namespaces exist (0 when there is no lab).
    pub fn running_relays(&self) -> usize {
        let existing = self.existing();
        Role::RELAY_NODES
            .iter()
            .take_while(|r| existing.contains(&self.ns(**r)))
            .count()
    }

    /// The namespace of `role`.
    pub fn ns(&self, role: Role) -> String {
        let suffix = match role {
            Role::App => "app",
            Role::Relay => "rly",
            Role::Relay2 => "rly2",
            Role::Relay3 => "rly3",
            Role::Onprem => "onp",
        };
        format!("{}{suffix}", self.prefix)
    }

    /// The directory holding this lab's state (role directories, scripts).
    pub fn state_root(&self) -> &Path {
        &self.state_root
    }

    /// The namespaces of this lab that exist now.
    pub fn existing(&self) -> Vec<String> {
        let listed = Command::new("ip")
            .args(["netns", "list"])
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .unwrap_or_default();
        let present: Vec<&str> = listed
            .lines()
            .filter_map(|l| l.split_whitespace().next())
            .collect();
        // Every role a lab of this prefix may have, whatever its size, so
        // that `down` removes a cluster lab too.
        Role::all(MAX_RELAYS)
            .iter()
            .map(|r| self.ns(*r))
            .filter(|ns| present.contains(&ns.as_str()))
            .collect()
    }

    /// Builds the namespaces, veths and addresses, and writes the role
    /// scripts into the state directory. Expects none of it to exist (call
    /// [`Netns::remove`] first); on failure, call `remove` to clean up the
    /// part that was made.
    pub fn build(&self) -> Result<()> {
        let roles = Role::all(self.relays);
        for role in &roles {
            let ns = self.ns(*role);
            ip(&["netns", "add", &ns])?;
            self.sh_ok(*role, "ip link set lo up")?;
        }
        let p = &self.prefix;
        let (a, ar, o, or) = (
            format!("{p}a"),
            format!("{p}ar"),
            format!("{p}o"),
            format!("{p}or"),
        );
        self.veth(Role::App, &a, Role::Relay, &ar)?;
        self.veth(Role::Onprem, &o, Role::Relay, &or)?;
        self.sh_ok(
            Role::App,
            &format!("ip addr add {APP_IP}/24 dev {a} && ip link set {a} up && ip route add {RELAY_IP}/32 via {RELAY_APP_SIDE_IP}"),
        )?;
        self.sh_ok(
            Role::Onprem,
            &format!("ip addr add {ONPREM_IP}/24 dev {o} && ip link set {o} up && ip route add {RELAY_IP}/32 via {RELAY_ONPREM_SIDE_IP}"),
        )?;
        self.sh_ok(
            Role::Relay,
            &format!(
                "ip addr add {RELAY_APP_SIDE_IP}/24 dev {ar} && ip link set {ar} up && \
                 ip addr add {RELAY_ONPREM_SIDE_IP}/24 dev {or} && ip link set {or} up && \
                 ip addr add {RELAY_IP}/32 dev lo && sysctl -qw net.ipv4.ip_forward=0"
            ),
        )?;
        for &node in &Role::relay_nodes(self.relays)[1..] {
            self.build_node(node)?;
        }
        self.build_node_links()?;
        for role in &roles {
            let role = *role;
            let etc = etc_dir(&self.ns(role));
            std::fs::create_dir_all(&etc)?;
            std::fs::write(etc.join("hosts"), "127.0.0.1 localhost\n")?;
            std::fs::write(
                etc.join("resolv.conf"),
                format!("nameserver {RELAY_APP_SIDE_IP}\nsearch lab.test\n"),
            )?;
            std::fs::create_dir_all(self.state_root.join(role.name()))?;
        }
        let scripts = self.state_root.join("provision");
        std::fs::create_dir_all(&scripts)?;
        for (name, text) in crate::SCRIPTS {
            std::fs::write(scripts.join(name), text)?;
        }
        // PostgreSQL runs as its own user and must reach its directory.
        set_mode(&self.state_root, 0o755)?;
        for role in &roles {
            set_mode(&self.state_root.join(role.name()), 0o755)?;
        }
        Ok(())
    }

    /// A veth with end `a` in `role_a`'s namespace and `b` in `role_b`'s.
    fn veth(&self, role_a: Role, a: &str, role_b: Role, b: &str) -> Result<()> {
        let (ns_a, ns_b) = (self.ns(role_a), self.ns(role_b));
        ip(&[
            "link", "add", a, "netns", &ns_a, "type", "veth", "peer", "name", b, "netns", &ns_b,
        ])?;
        Ok(())
    }

    /// Joins relay node `node` (2 or 3) to app and onprem: point-to-point
    /// links on which app and onprem keep their one address, and a route
    /// to the node's address over its link.
    fn build_node(&self, node: Role) -> Result<()> {
        let n = node.relay_node().context("a relay node")?;
        let p = &self.prefix;
        let node_ip = relay_node_ip(n);
        for (side, side_ip, node_side_ip, letter) in [
            (Role::App, APP_IP, format!("198.18.1.1{n}"), "a"),
            (Role::Onprem, ONPREM_IP, format!("198.18.2.1{n}"), "o"),
        ] {
            let (outer, inner) = (format!("{p}{letter}{n}"), format!("{p}{letter}r{n}"));
            self.veth(side, &outer, node, &inner)?;
            self.sh_ok(
                side,
                &format!(
                    "ip addr add {side_ip}/32 peer {node_side_ip}/32 dev {outer} && ip link set {outer} up && \
                     ip route add {node_ip}/32 via {node_side_ip}"
                ),
            )?;
            self.sh_ok(
                node,
                &format!(
                    "ip addr add {node_side_ip}/32 peer {side_ip}/32 dev {inner} && ip link set {inner} up"
                ),
            )?;
        }
        self.sh_ok(
            node,
            &format!("ip addr add {node_ip}/32 dev lo && sysctl -qw net.ipv4.ip_forward=0"),
        )?;
        Ok(())
    }

    /// Joins every pair of relay nodes by a link between their cluster
    /// addresses (the same address on each of a node's links, point to
    /// point), for etcd.
    fn build_node_links(&self) -> Result<()> {
        let nodes = Role::relay_nodes(self.relays);
        let p = &self.prefix;
        for (i, &one) in nodes.iter().enumerate() {
            for (j, &other) in nodes.iter().enumerate().skip(i + 1) {
                let (n, m) = (i + 1, j + 1);
                let (here, there) = (format!("{p}n{n}{m}"), format!("{p}n{m}{n}"));
                self.veth(one, &here, other, &there)?;
                for (role, dev, own, peer) in [(one, &here, n, m), (other, &there, m, n)] {
                    self.sh_ok(
                        role,
                        &format!(
                            "ip addr add {}/32 peer {}/32 dev {dev} && ip link set {dev} up",
                            relay_cluster_ip(own),
                            relay_cluster_ip(peer)
                        ),
                    )?;
                }
            }
        }
        Ok(())
    }

    /// Stops every process in the lab's namespaces (SIGTERM, then SIGKILL
    /// after 5 s), removes the namespaces (their veths, tun devices, routes
    /// and rules go with them), their `/etc/netns` files and the state
    /// directory. Safe to call on a lab that is partly built or gone.
    pub fn remove(&self) -> Result<()> {
        let namespaces = self.existing();
        signal_all(&namespaces, "TERM");
        let deadline = Instant::now() + STOP_GRACE;
        while namespaces.iter().any(|ns| !pids(ns).is_empty()) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(100));
        }
        signal_all(&namespaces, "KILL");
        let mut failed = Vec::new();
        for ns in &namespaces {
            // A killed process may take a moment to let go of the namespace.
            let deadline = Instant::now() + Duration::from_secs(5);
            loop {
                match ip(&["netns", "del", ns]) {
                    Ok(_) => break,
                    Err(e) if Instant::now() > deadline => {
                        failed.push(format!("{ns}: {e:#}"));
                        break;
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(100)),
                }
            }
        }
        for role in Role::all(MAX_RELAYS) {
            let _ = std::fs::remove_dir_all(etc_dir(&self.ns(role)));
        }
        if self.state_root.exists() {
            std::fs::remove_dir_all(&self.state_root)
                .with_context(|| format!("removing {}", self.state_root.display()))?;
        }
        if !failed.is_empty() {
            bail!("could not remove: {}", failed.join("; "));
        }
        Ok(())
    }

    /// A command that runs `program` inside `role`'s namespace.
    pub fn command(&self, role: Role, program: &str) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.ns(role), program]);
        c
    }

    /// Runs a shell line inside `role`'s namespace; fails on a non-zero exit.
    pub fn sh_ok(&self, role: Role, line: &str) -> Result<Output> {
        run(self.command(role, "sh").args(["-c", line]))
    }

    /// The processes in `role`'s namespace.
    pub fn pids(&self, role: Role) -> Vec<String> {
        pids(&self.ns(role))
    }

    /// The namespace's own `/etc/hosts` (what `ip netns exec` shows there).
    pub fn hosts_file(&self, role: Role) -> PathBuf {
        etc_dir(&self.ns(role)).join("hosts")
    }

    /// The namespace's own `/etc/resolv.conf`.
    pub fn resolv_conf(&self, role: Role) -> PathBuf {
        etc_dir(&self.ns(role)).join("resolv.conf")
    }
}

impl Machines for Netns {
    fn sh(&self, role: Role, line: &str, env: &[(&str, &str)]) -> Result<Output> {
        let mut cmd = self.command(role, "env");
        for (k, v) in env {
            cmd.arg(format!("{k}={v}"));
        }
        cmd.args(["sh", "-c", line]).stdin(Stdio::null());
        cmd.output()
            .with_context(|| format!("running {line:?} in {}", self.ns(role)))
    }

    fn hybridlink(&self) -> String {
        self.binary.display().to_string()
    }

    fn scripts(&self) -> String {
        self.state_root.join("provision").display().to_string()
    }

    fn state(&self, role: Role) -> String {
        self.state_root.join(role.name()).display().to_string()
    }

    fn relays(&self) -> usize {
        self.relays
    }
}

fn etc_dir(ns: &str) -> PathBuf {
    PathBuf::from("/etc/netns").join(ns)
}

fn set_mode(path: &Path, mode: u32) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .with_context(|| format!("chmod {}", path.display()))
}

fn pids(ns: &str) -> Vec<String> {
    Command::new("ip")
        .args(["netns", "pids", ns])
        .stderr(Stdio::null())
        .output()
        .map(|o| {
            String::from_utf8_lossy(&o.stdout)
                .split_whitespace()
                .map(str::to_string)
                .collect()
        })
        .unwrap_or_default()
}

fn signal_all(namespaces: &[String], signal: &str) {
    for ns in namespaces {
        let pids = pids(ns);
        if !pids.is_empty() {
            let _ = Command::new("kill")
                .arg(format!("-{signal}"))
                .args(&pids)
                .stderr(Stdio::null())
                .status();
        }
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefixes_keep_interface_names_short() {
        let bin = Path::new("/bin/true");
        let root = Path::new("/tmp");
        assert!(Netns::new("hl", bin, root).is_ok());
        let lab = Netns::new("abcdefghij", bin, root).unwrap();
        assert_eq!(lab.ns(Role::Onprem), "abcdefghijonp");
        for bad in ["", "abcdefghijk", "Hl", "h-l", "h l"] {
            let err = Netns::new(bad, bin, root).unwrap_err().to_string();
            assert!(err.contains("1 to 10 characters"), "{bad:?}: {err}");
        }
    }
}
