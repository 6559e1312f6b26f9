//! `hybridlink relay|agent|appliance install`: the one-command setup of a
//! role as a systemd service. Writes the role's config (secrets mode 0600)
//! and unit, then enables and (re)starts it with systemctl.

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
    /// Extra `[Service]` lines (sandboxing).
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

/// Writes the unit, then enables and restarts it unless told not to.
pub fn install_unit(args: &InstallArgs, unit: &Unit) -> anyhow::Result<()> {
    let path = args.under_root(Path::new(&format!(
        "/etc/systemd/system/{}.service",
        unit.name
    )));
    write_file(&path, &unit.render(), 0o644)?;
    if args.no_start || args.root != Path::new("/") {
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
            service: vec!["NoNewPrivileges=yes".into()],
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
}
