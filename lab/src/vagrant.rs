//! The lab as the three VMs of `vagrant/`, reached with `vagrant ssh`.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use anyhow::{Context, Result};

use crate::{Machines, Role, shell_quote};

/// Where the Vagrantfile's provisioners put things inside each VM.
pub const VM_BINARY: &str = "/usr/local/bin/hybridlink";
/// The role scripts inside each VM.
pub const VM_SCRIPTS: &str = "/opt/hybridlink-lab/provision";
/// The state directories inside each VM.
pub const VM_STATE: &str = "/var/lib/hybridlink-lab";

/// The VMs of the Vagrantfile in `dir`.
#[derive(Debug, Clone)]
pub struct Vagrant {
    dir: PathBuf,
}

impl Vagrant {
    /// The lab described by `dir/Vagrantfile`.
    pub fn new(dir: &Path) -> Vagrant {
        Vagrant {
            dir: dir.to_path_buf(),
        }
    }

    /// A `vagrant` command run in the Vagrantfile's directory.
    pub fn command(&self) -> Command {
        let mut c = Command::new("vagrant");
        c.current_dir(&self.dir);
        c
    }
}

impl Machines for Vagrant {
    fn sh(&self, role: Role, line: &str, env: &[(&str, &str)]) -> Result<Output> {
        let mut remote = String::from("sudo env");
        for (k, v) in env {
            remote.push(' ');
            remote.push_str(&shell_quote(&format!("{k}={v}")));
        }
        remote.push_str(" sh -c ");
        remote.push_str(&shell_quote(line));
        self.command()
            .args(["ssh", role.name(), "-c", &remote])
            .stdin(Stdio::null())
            .output()
            .with_context(|| format!("vagrant ssh {} -c {line:?}", role.name()))
    }

    fn hybridlink(&self) -> String {
        VM_BINARY.to_string()
    }

    fn scripts(&self) -> String {
        VM_SCRIPTS.to_string()
    }

    fn state(&self, role: Role) -> String {
        format!("{VM_STATE}/{}", role.name())
    }
}
