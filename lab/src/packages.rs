//! The Debian packages the namespace lab runs: found, installed, or named
//! with the exact `apt-get install` line.

use std::path::Path;
use std::process::Command;

use anyhow::{Result, bail};

/// What the lab needs: a file that shows the package is there, and the
/// Debian package that provides it.
const NEEDS: &[(&str, &str)] = &[
    ("/usr/bin/ip", "iproute2"),
    ("/usr/bin/curl", "curl"),
    ("/usr/bin/python3", "python3"),
    ("/usr/bin/psql", "postgresql-client"),
    ("/usr/bin/pg_isready", "postgresql-client"),
    ("/usr/share/postgresql-common/pg_wrapper", "postgresql"),
    ("/usr/bin/redis-server", "redis-server"),
    ("/usr/bin/redis-cli", "redis-tools"),
    ("/usr/bin/setsid", "util-linux"),
    ("/usr/bin/truncate", "coreutils"),
    ("/usr/bin/ss", "iproute2"),
];

/// What a lab with a relay cluster needs on top: an etcd member per node.
const CLUSTER_NEEDS: &[(&str, &str)] = &[("/usr/bin/etcd", "etcd-server")];

/// The packages whose files are missing, each named once; `cluster`: for a
/// lab with several relay nodes.
pub fn missing(cluster: bool) -> Vec<&'static str> {
    let mut out: Vec<&str> = Vec::new();
    let cluster_needs = if cluster { CLUSTER_NEEDS } else { &[] };
    for (file, package) in NEEDS.iter().chain(cluster_needs) {
        if !Path::new(file).exists() && !out.contains(package) {
            out.push(package);
        }
    }
    // The server binaries live in a versioned directory.
    let has_server = std::fs::read_dir("/usr/lib/postgresql")
        .map(|d| d.flatten().any(|e| e.path().join("bin/initdb").exists()))
        .unwrap_or(false);
    if !has_server && !out.contains(&"postgresql") {
        out.push("postgresql");
    }
    out
}

/// The command line that installs `packages`.
pub fn install_line(packages: &[&str]) -> String {
    format!("apt-get install -y {}", packages.join(" "))
}

/// Makes sure every package is there (with etcd for a `cluster`): installs
/// the missing ones with apt-get when `install` is set, else fails naming
/// the line to run.
pub fn ensure(install: bool, cluster: bool) -> Result<()> {
    let missing = missing(cluster);
    if missing.is_empty() {
        return Ok(());
    }
    let line = install_line(&missing);
    if !install {
        bail!("the lab needs Debian packages that are missing; run: {line}");
    }
    eprintln!("lab: installing {}", missing.join(" "));
    let update = Command::new("apt-get").args(["update", "-qq"]).status()?;
    let status = Command::new("apt-get")
        .args(["install", "-y", "-qq"])
        .args(&missing)
        .env("DEBIAN_FRONTEND", "noninteractive")
        .status()?;
    if !update.success() || !status.success() {
        bail!("installing the lab's packages failed; run it yourself: {line}");
    }
    let still = self::missing(cluster);
    if !still.is_empty() {
        bail!("still missing after apt-get: {}", still.join(" "));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_install_line_names_each_package() {
        assert_eq!(
            install_line(&["curl", "redis-tools"]),
            "apt-get install -y curl redis-tools"
        );
    }
}
