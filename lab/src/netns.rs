//! The lab as three network namespaces on this host:
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
//! Names: PREFIX + `app`, `rly`, `onp` for the namespaces, PREFIX + `a`,
//! `ar`, `o`, `or` for the veths (interface names are limited to 15 bytes,
//! so a prefix has at most 10).

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::{APP_IP, Machines, ONPREM_IP, RELAY_APP_SIDE_IP, RELAY_IP, RELAY_ONPREM_SIDE_IP, Role};

/// A lab's namespaces, by prefix. Building and removing are explicit: the
/// CLI's lab outlives the command that built it.
#[derive(Debug, Clone)]
pub struct Netns {
    prefix: String,
    binary: PathBuf,
    state_root: PathBuf,
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
        })
    }

    /// The namespace of `role`.
    pub fn ns(&self, role: Role) -> String {
        let suffix = match role {
            Role::App => "app",
            Role::Relay => "rly",
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
        Role::ALL
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
        for role in Role::ALL {
            let ns = self.ns(role);
            ip(&["netns", "add", &ns])?;
            self.sh_ok(role, "ip link set lo up")?;
        }
        let p = &self.prefix;
        let (a, ar, o, or) = (
            format!("{p}a"),
            format!("{p}ar"),
            format!("{p}o"),
            format!("{p}or"),
        );
        let (app, relay, onprem) = (
            self.ns(Role::App),
            self.ns(Role::Relay),
            self.ns(Role::Onprem),
        );
        ip(&[
            "link", "add", &a, "netns", &app, "type", "veth", "peer", "name", &ar, "netns", &relay,
        ])?;
        ip(&[
            "link", "add", &o, "netns", &onprem, "type", "veth", "peer", "name", &or, "netns",
            &relay,
        ])?;
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
        for role in Role::ALL {
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
        for role in Role::ALL {
            set_mode(&self.state_root.join(role.name()), 0o755)?;
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
        for role in Role::ALL {
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
