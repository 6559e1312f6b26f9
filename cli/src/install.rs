//! `hybridlink relay|agent|appliance install`: the one-command setup of a
//! role as a systemd service. Writes the role's config (secrets readable by
//! the service only) and unit, makes the service's system user, then enables
//! and (re)starts it with systemctl.
//!
//! What each service runs as, and why:
//!
//! - The relay and the agent run as system users of their own,
//!   `hybridlink-relay` and `hybridlink-agent` (each with a group of the same
//!   name), made by `systemd-sysusers` from a file `install` writes to
//!   `/etc/sysusers.d/`, and keep no capability but, for a relay on a port
//!   below 1024, `CAP_NET_BIND_SERVICE`. Not `DynamicUser=`: root edits the
//!   agent's files while it runs (`agent allow|deny`, `agent install`) and
//!   the agent rereads them on SIGHUP, so they must stay readable by a group
//!   that exists whether or not the agent runs (`root:hybridlink-agent`,
//!   0640); `LoadCredential=` would hand it copies made at start, which a
//!   reload never sees change. The relay's data dir may be anywhere
//!   (`--data-dir`), where a dynamic user's `StateDirectory=` cannot be, and
//!   keeps one owner across restarts, reinstalls and restored backups.
//! - The appliance runs as root, bounded to `CAP_NET_ADMIN` (the tun, routes,
//!   rules, `/proc/sys/net`) and `CAP_NET_BIND_SERVICE` (DNS on port 53): it
//!   also rewrites `/etc/resolv.conf` in place, which only root may.
//!
//! Every unit gets the same sandbox ([`SANDBOX`]); the relay and the agent,
//! which only use sockets, also [`SOCKETS_ONLY`].

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, bail};
use transport::atomic_file::AtomicFile;

/// Options every `install` takes.
#[derive(clap::Args, Debug, Clone)]
pub struct InstallArgs {
    /// Write the files under this directory instead of / (for packaging
    /// and tests); nothing is started then.
    #[arg(long, default_value = "/")]
    pub root: PathBuf,
    /// Write the files but do not run systemctl.
    #[arg(long)]
    pub no_start: bool,
    /// The binary the service runs (default: this one; install it first,
    /// e.g. `install -m 755 hybridlink /usr/local/bin/`).
    #[arg(long)]
    pub binary: Option<PathBuf>,
}

impl InstallArgs {
    /// The binary the unit runs.
    pub fn binary(&self) -> anyhow::Result<PathBuf> {
        match &self.binary {
            Some(b) => Ok(b.clone()),
            None => std::env::current_exe().context("finding this binary's path"),
        }
    }

    /// `path` (absolute) under the install root.
    pub fn under_root(&self, path: &Path) -> PathBuf {
        self.root.join(path.strip_prefix("/").unwrap_or(path))
    }

    /// Whether the files go to this host (not under another root, whose
    /// users are not this host's).
    pub fn on_this_host(&self) -> bool {
        self.root == Path::new("/")
    }
}

/// The sandboxing every role's unit gets, the appliance's included. Files
/// the services make are private (`UMask=`); a system call outside systemd's
/// set for services, or one only root needs, fails with EPERM rather than
/// killing the service.
pub const SANDBOX: &[&str] = &[
    "NoNewPrivileges=yes",
    "ProtectSystem=strict",
    "ProtectHome=yes",
    "PrivateTmp=yes",
    "ProtectProc=invisible",
    "ProtectKernelModules=yes",
    "ProtectKernelLogs=yes",
    "ProtectControlGroups=yes",
    "ProtectClock=yes",
    "ProtectHostname=yes",
    "RestrictNamespaces=yes",
    "RestrictRealtime=yes",
    "RestrictSUIDSGID=yes",
    "LockPersonality=yes",
    "MemoryDenyWriteExecute=yes",
    "SystemCallArchitectures=native",
    "SystemCallFilter=@system-service",
    "SystemCallFilter=~@privileged",
    "SystemCallErrorNumber=EPERM",
    "UMask=0077",
];

/// What the relay and the agent, which only use sockets, also get: no
/// devices, `/proc/sys` read-only, only the processes' part of `/proc`, and
/// no netlink. (The appliance opens `/dev/net/tun`, writes
/// `/proc/sys/net/ipv4/conf/TUN/` and runs `ip`, which speaks netlink.)
pub const SOCKETS_ONLY: &[&str] = &[
    "PrivateDevices=yes",
    "ProtectKernelTunables=yes",
    "ProcSubset=pid",
    "RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6",
];

/// A system user a service runs as, with a group of the same name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SystemUser {
    /// The user's and the group's name.
    pub name: &'static str,
    /// What `/etc/passwd` says it is for.
    pub gecos: &'static str,
}

impl SystemUser {
    /// The `sysusers.d` line that makes it: no home, no login shell.
    pub fn sysusers_line(&self) -> String {
        format!("u {} - \"{}\"\n", self.name, self.gecos)
    }
}

/// Who a role's service runs as.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RunAs {
    /// root, with only the unit's capabilities.
    Root,
    /// A system user of its own ([`make_system_user`] makes it).
    User(SystemUser),
}

/// A systemd service of one role.
#[derive(Debug)]
pub struct Unit {
    /// `hybridlink-ROLE`.
    pub name: &'static str,
    /// The `Description=`.
    pub description: &'static str,
    /// The command line, one argument each.
    pub exec_start: Vec<String>,
    /// Whether SIGHUP reloads the config.
    pub reload_on_hup: bool,
    /// Whether the program tells systemd when it is ready (`Type=notify`).
    pub notify: bool,
    /// Who it runs as.
    pub run_as: RunAs,
    /// The only capabilities it may hold (`CapabilityBoundingSet=`); a
    /// service running as a user also gets them (`AmbientCapabilities=`),
    /// having none otherwise.
    pub capabilities: Vec<&'static str>,
    /// `[Service]` lines of its own, after [`SANDBOX`].
    pub service: Vec<String>,
    /// The command that wrote it, for the header.
    pub written_by: &'static str,
}

/// Quotes one argument for a systemd command line.
fn systemd_quote(arg: &str) -> String {
    if !arg.is_empty() && !arg.contains(|c: char| c.is_whitespace() || "\"'\\;$%".contains(c)) {
        return arg.to_string();
    }
    let escaped = arg
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('$', "$$")
        .replace('%', "%%");
    format!("\"{escaped}\"")
}

impl Unit {
    /// The unit file's text.
    pub fn render(&self) -> String {
        let mut s = String::new();
        let _ = writeln!(
            s,
            "# Written by `{}`; run it again to change it.",
            self.written_by
        );
        let _ = writeln!(s, "[Unit]\nDescription={}", self.description);
        s.push_str("Wants=network-online.target\nAfter=network-online.target\n\n[Service]\n");
        if self.notify {
            s.push_str("Type=notify\n");
        }
        let cmd: Vec<String> = self.exec_start.iter().map(|a| systemd_quote(a)).collect();
        let _ = writeln!(s, "ExecStart={}", cmd.join(" "));
        if self.reload_on_hup {
            s.push_str("ExecReload=/bin/kill -HUP $MAINPID\n");
        }
        s.push_str("Restart=always\nRestartSec=2\n");
        // Every socket is a file; the binary raises its soft limit to this.
        s.push_str("LimitNOFILE=1048576\n");
        let capabilities = self.capabilities.join(" ");
        if let RunAs::User(user) = self.run_as {
            let _ = writeln!(s, "User={}\nGroup={}\nRemoveIPC=yes", user.name, user.name);
        }
        let _ = writeln!(s, "CapabilityBoundingSet={capabilities}");
        if matches!(self.run_as, RunAs::User(_)) && !capabilities.is_empty() {
            let _ = writeln!(s, "AmbientCapabilities={capabilities}");
        }
        for line in SANDBOX {
            let _ = writeln!(s, "{line}");
        }
        for line in &self.service {
            let _ = writeln!(s, "{line}");
        }
        s.push_str("\n[Install]\nWantedBy=multi-user.target\n");
        s
    }
}

/// Writes `text` to `path` atomically, creating its directory, with exactly
/// `mode`, and says so.
pub fn write_file(path: &Path, text: &str, mode: u32) -> anyhow::Result<()> {
    AtomicFile::new(path)
        .mode(mode)
        .create_dir()
        .write(text.as_bytes())
        .with_context(|| format!("writing {}", path.display()))?;
    println!("wrote {}", path.display());
    Ok(())
}

/// Makes the system user `unit` runs as, if any: writes
/// `/etc/sysusers.d/USER.conf` and, on this host, has `systemd-sysusers`
/// make the user and its group from it unless they exist (at boot too,
/// should they be removed).
pub fn make_system_user(args: &InstallArgs, unit: &Unit) -> anyhow::Result<()> {
    let RunAs::User(user) = unit.run_as else {
        return Ok(());
    };
    let path = args.under_root(Path::new(&format!("/etc/sysusers.d/{}.conf", user.name)));
    let text = format!(
        "# Written by `{}`: the user that {}.service runs as.\n{}",
        unit.written_by,
        unit.name,
        user.sysusers_line()
    );
    write_file(&path, &text, 0o644)?;
    if args.on_this_host() {
        run(Command::new("systemd-sysusers").arg(&path))?;
    }
    Ok(())
}

/// Gives `path`, and everything in it when `recursive`, to `owner`
/// (`USER:GROUP`, as chown(1) takes it). Under another install root, whose
/// users are not this host's, says what to run there instead.
pub fn chown(args: &InstallArgs, owner: &str, path: &Path, recursive: bool) -> anyhow::Result<()> {
    let mut cmd = Command::new("chown");
    if recursive {
        cmd.arg("-R");
    }
    cmd.arg(owner).arg(path);
    if args.on_this_host() {
        return run(&mut cmd);
    }
    let target = Path::new("/").join(path.strip_prefix(&args.root).unwrap_or(path));
    println!(
        "on the target, after systemd-sysusers: chown {}{owner} {}",
        if recursive { "-R " } else { "" },
        target.display()
    );
    Ok(())
}

/// Runs `cmd`, failing with its stderr.
fn run(cmd: &mut Command) -> anyhow::Result<()> {
    let program = cmd.get_program().to_string_lossy().into_owned();
    let out = cmd
        .output()
        .with_context(|| format!("running {program} (use --root DIR to only write the files)"))?;
    if !out.status.success() {
        bail!(
            "{program} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// Writes the unit, then enables and restarts it unless told not to.
pub fn install_unit(args: &InstallArgs, unit: &Unit) -> anyhow::Result<()> {
    let path = args.under_root(Path::new(&format!(
        "/etc/systemd/system/{}.service",
        unit.name
    )));
    write_file(&path, &unit.render(), 0o644)?;
    if args.no_start || !args.on_this_host() {
        println!(
            "not started; start it with: systemctl daemon-reload && systemctl enable --now {}",
            unit.name
        );
        return Ok(());
    }
    systemctl(&["daemon-reload"])?;
    systemctl(&["enable", unit.name])?;
    // A service that reloads its config on SIGHUP keeps its open
    // connections; the others restart to pick the change up.
    let how = if unit.reload_on_hup {
        "reload-or-restart"
    } else {
        "restart"
    };
    systemctl(&[how, unit.name])?;
    println!(
        "{} enabled and started; see `systemctl status {}` and `journalctl -u {}`",
        unit.name, unit.name, unit.name
    );
    Ok(())
}

fn systemctl(args: &[&str]) -> anyhow::Result<()> {
    let out = Command::new("systemctl").args(args).output().context(
        "running systemctl (is this a systemd host? use --no-start to only write the files)",
    )?;
    if !out.status.success() {
        bail!(
            "systemctl {} failed: {} (the files are written; use --no-start on hosts without systemd)",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// The sandbox lines as a unit must read, for the roles' tests.
#[cfg(test)]
pub mod expected {
    /// [`super::SANDBOX`].
    pub const SANDBOX: &str = "\
NoNewPrivileges=yes
ProtectSystem=strict
ProtectHome=yes
PrivateTmp=yes
ProtectProc=invisible
ProtectKernelModules=yes
ProtectKernelLogs=yes
ProtectControlGroups=yes
ProtectClock=yes
ProtectHostname=yes
RestrictNamespaces=yes
RestrictRealtime=yes
RestrictSUIDSGID=yes
LockPersonality=yes
MemoryDenyWriteExecute=yes
SystemCallArchitectures=native
SystemCallFilter=@system-service
SystemCallFilter=~@privileged
SystemCallErrorNumber=EPERM
UMask=0077
";

    /// [`super::SOCKETS_ONLY`].
    pub const SOCKETS_ONLY: &str = "\
PrivateDevices=yes
ProtectKernelTunables=yes
ProcSubset=pid
RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6
";
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn units_quote_what_systemd_would_split_or_expand() {
        assert_eq!(
            systemd_quote("/usr/local/bin/hybridlink"),
            "/usr/local/bin/hybridlink"
        );
        assert_eq!(systemd_quote("a b"), "\"a b\"");
        assert_eq!(systemd_quote("Key=a;b$c%d"), "\"Key=a;b$$c%%d\"");
        let unit = Unit {
            name: "hybridlink-agent",
            description: "d",
            exec_start: vec!["/bin/x".into(), "run".into()],
            reload_on_hup: true,
            notify: true,
            run_as: RunAs::Root,
            capabilities: vec![],
            service: vec![],
            written_by: "hybridlink agent install",
        };
        let text = unit.render();
        assert!(
            text.contains("\nType=notify\nExecStart=/bin/x run\n"),
            "{text}"
        );
        assert!(
            text.contains("\nExecReload=/bin/kill -HUP $MAINPID\n"),
            "{text}"
        );
        assert!(
            text.contains("[Install]\nWantedBy=multi-user.target\n"),
            "{text}"
        );
    }

    #[test]
    fn a_user_service_holds_its_capabilities_as_ambient_ones_root_only_bounded() {
        let user = SystemUser {
            name: "hybridlink-relay",
            gecos: "hybridlink relay",
        };
        assert_eq!(
            user.sysusers_line(),
            "u hybridlink-relay - \"hybridlink relay\"\n"
        );
        let mut unit = Unit {
            name: "hybridlink-relay",
            description: "d",
            exec_start: vec!["/bin/x".into()],
            reload_on_hup: false,
            notify: false,
            run_as: RunAs::User(user),
            capabilities: vec!["CAP_NET_BIND_SERVICE"],
            service: vec![],
            written_by: "hybridlink relay install",
        };
        let text = unit.render();
        assert!(
            text.contains(
                "\nUser=hybridlink-relay\nGroup=hybridlink-relay\nRemoveIPC=yes\n\
                 CapabilityBoundingSet=CAP_NET_BIND_SERVICE\n\
                 AmbientCapabilities=CAP_NET_BIND_SERVICE\n"
            ),
            "{text}"
        );
        unit.run_as = RunAs::Root;
        let text = unit.render();
        assert!(!text.contains("User="), "{text}");
        assert!(!text.contains("AmbientCapabilities="), "{text}");
        unit.capabilities.clear();
        assert!(unit.render().contains("\nCapabilityBoundingSet=\n"));
    }
}
