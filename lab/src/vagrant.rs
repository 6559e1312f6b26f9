//! The lab as the three VMs of `vagrant/` (libvirt, software emulation):
//! the same role scripts and checks as the namespace lab, run over ssh, with
//! the roles as the systemd units `hybridlink ROLE install` writes (and the
//! checks of [`crate::services`] on them).
//!
//! [`run`] is `hybridlink lab vagrant`: prepare the host
//! (`scripts/vagrant-host-setup`), remove what an interrupted run left
//! (`scripts/vagrant-host-clean`), build the box if missing
//! (`vagrant/build-box`), `vagrant up`, provision the roles in order, run
//! the demo's checks, then destroy everything and check that nothing is
//! left (`scripts/vagrant-host-teardown`).

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Instant;

use anyhow::{Context, Result, bail};

use crate::{Machines, Role, Services, shell_quote};

/// Where the Vagrantfile's provisioners put things inside each VM.
pub const VM_BINARY: &str = "/usr/local/bin/hybridlink";
/// The role scripts inside each VM.
pub const VM_SCRIPTS: &str = "/opt/hybridlink-lab/provision";
/// The state directories inside each VM.
pub const VM_STATE: &str = "/var/lib/hybridlink-lab";
/// The host-wide lock a Vagrant lab holds from preparing the host to
/// tearing it down. The lab's domain and network names are fixed, so two
/// labs on one host cannot run at once; and while the lock is held, any
/// domain with those names belongs to a run that is gone.
pub const HOST_LOCK: &str = "/run/lock/hybridlink-vagrant.lock";

/// The VMs of the Vagrantfile in `dir`.
#[derive(Debug, Clone)]
pub struct Vagrant {
    dir: PathBuf,
    binary: PathBuf,
    /// `vagrant ssh-config`, once the VMs are up: plain ssh is much faster
    /// than `vagrant ssh` (no Ruby start-up per command).
    ssh_config: Option<PathBuf>,
}

impl Vagrant {
    /// The lab described by `dir/Vagrantfile`, with `binary` copied in.
    pub fn new(dir: &Path, binary: &Path) -> Vagrant {
        Vagrant {
            dir: dir.to_path_buf(),
            binary: binary.to_path_buf(),
            ssh_config: None,
        }
    }

    /// A `vagrant` command run in the Vagrantfile's directory.
    pub fn command(&self) -> Command {
        let mut c = Command::new("vagrant");
        c.current_dir(&self.dir)
            .env("HYBRIDLINK_BIN", &self.binary)
            .env("VAGRANT_DEFAULT_PROVIDER", "libvirt");
        c
    }

    fn scripts_dir(&self) -> PathBuf {
        self.dir.join("../scripts")
    }

    fn step(&self, what: &str, cmd: &mut Command) -> Result<()> {
        let started = Instant::now();
        eprintln!("lab vagrant: {what}");
        let status = cmd
            .stdin(Stdio::null())
            .status()
            .with_context(|| format!("{what}: running {cmd:?}"))?;
        if !status.success() {
            bail!("{what} failed ({status})");
        }
        eprintln!(
            "lab vagrant: {what}: done in {:.0} s",
            started.elapsed().as_secs_f64()
        );
        Ok(())
    }

    /// Prepares the host, builds the box if missing, brings the VMs up.
    pub fn up(&mut self) -> Result<()> {
        self.step(
            "preparing the host (libvirt, qemu)",
            &mut Command::new(self.scripts_dir().join("vagrant-host-setup")),
        )?;
        // A run killed before its teardown (a CI job cut off, a machine
        // shut down) leaves its domains defined, and `vagrant up` then
        // fails on "name already taken".
        self.step(
            "removing what an interrupted lab left",
            &mut Command::new(self.scripts_dir().join("vagrant-host-clean")),
        )?;
        self.step(
            "building the box if missing",
            &mut Command::new(self.dir.join("build-box")),
        )?;
        // vagrant's progress bars would flood a CI log: keep its output in a
        // file and show the end of it if it fails.
        let log = self.dir.join(".vagrant/hybridlink-up.log");
        std::fs::create_dir_all(self.dir.join(".vagrant"))?;
        let file = std::fs::File::create(&log)?;
        let up = self.step(
            &format!(
                "vagrant up (three VMs under software emulation: minutes; log in {})",
                log.display()
            ),
            self.command()
                .args(["up", "--provider=libvirt"])
                .stdout(file.try_clone()?)
                .stderr(file),
        );
        if let Err(e) = up {
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            let tail: Vec<&str> = text.lines().rev().take(40).collect();
            let tail: Vec<&str> = tail.into_iter().rev().collect();
            return Err(e.context(format!(
                "the end of {}:\n{}",
                log.display(),
                tail.join("\n")
            )));
        }
        let out = self.command().arg("ssh-config").output()?;
        if !out.status.success() {
            bail!(
                "vagrant ssh-config: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let path = self.dir.join(".vagrant/hybridlink-ssh-config");
        std::fs::write(&path, &out.stdout)?;
        self.ssh_config = Some(path);
        Ok(())
    }

    /// Destroys the VMs and undoes the host preparation; then checks that
    /// no VM, lab interface or (when `daemons_were_ours`) libvirt daemon is
    /// left.
    pub fn destroy(&self, daemons_were_ours: bool) -> Result<()> {
        let destroyed = self.step("vagrant destroy", self.command().args(["destroy", "-f"]));
        let torn = self.step(
            "tearing the host down",
            &mut Command::new(self.scripts_dir().join("vagrant-host-teardown")),
        );
        destroyed?;
        torn?;
        let mut left = Vec::new();
        let mut checks = vec![("qemu processes", "pgrep", &["-a", "qemu-system"][..])];
        if daemons_were_ours {
            checks.push((
                "libvirt daemons",
                "pgrep",
                &["-a", "-x", "libvirtd|virtlogd"][..],
            ));
        }
        for (what, program, args) in checks {
            if let Ok(o) = Command::new(program).args(args).output()
                && !o.stdout.is_empty()
            {
                left.push(format!(
                    "{what}: {}",
                    String::from_utf8_lossy(&o.stdout).trim()
                ));
            }
        }
        let links = Command::new("ip").args(["-o", "link"]).output()?;
        for line in String::from_utf8_lossy(&links.stdout).lines() {
            if line.contains("virbr") || line.contains(": vnet") {
                left.push(format!("interface: {line}"));
            }
        }
        if !left.is_empty() {
            bail!("the Vagrant lab left behind: {}", left.join("; "));
        }
        Ok(())
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
        let mut cmd = match &self.ssh_config {
            Some(config) => {
                let mut c = Command::new("ssh");
                c.arg("-F")
                    .arg(config)
                    .args(["-o", "LogLevel=ERROR", role.name(), "--", &remote]);
                c
            }
            None => {
                let mut c = self.command();
                c.args(["ssh", role.name(), "-c", &remote]);
                c
            }
        };
        let mut out = cmd
            .stdin(Stdio::null())
            .output()
            .with_context(|| format!("ssh {} {line:?}", role.name()))?;
        // A tty may turn newlines into CRLF.
        out.stdout.retain(|b| *b != b'\r');
        Ok(out)
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

    fn services(&self) -> Services {
        Services::Systemd
    }

    fn big_file_mib(&self) -> u64 {
        // Software emulation moves about 20 Mbit/s.
        16
    }
}

/// `hybridlink lab vagrant`: the whole VM lab, from nothing to nothing.
/// Returns the demo's report; everything is destroyed afterwards unless
/// `keep`.
pub fn run(dir: &Path, binary: &Path, keep: bool) -> Result<crate::demo::Report> {
    let _lock = lock_host()?;
    let mut lab = Vagrant::new(dir, binary);
    let daemons_were_ours = !Command::new("pgrep")
        .args(["-x", "libvirtd"])
        .output()
        .is_ok_and(|o| o.status.success());
    let result = lab.up().and_then(|()| {
        let started = Instant::now();
        eprintln!("lab vagrant: provisioning relay, onprem and app");
        crate::demo::provision(&lab)?;
        eprintln!(
            "lab vagrant: provisioned in {:.0} s; running the checks",
            started.elapsed().as_secs_f64()
        );
        Ok(crate::demo::run_checks(&lab))
    });
    if keep {
        eprintln!(
            "lab vagrant: --keep: the VMs stay up until `vagrant destroy -f` in {}, then scripts/vagrant-host-teardown (the next `lab vagrant` on this host removes them first)",
            dir.display()
        );
        return result;
    }
    let destroyed = lab.destroy(daemons_were_ours);
    let report = result?;
    destroyed?;
    Ok(report)
}

/// Takes [`HOST_LOCK`], waiting (and saying so) while another lab holds it.
/// Released when the returned file is dropped or the process ends.
pub fn lock_host() -> Result<std::fs::File> {
    if let Some(dir) = Path::new(HOST_LOCK).parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(HOST_LOCK)
        .with_context(|| format!("opening {HOST_LOCK}"))?;
    match file.try_lock() {
        Ok(()) => {}
        Err(std::fs::TryLockError::WouldBlock) => {
            eprintln!("lab vagrant: another Vagrant lab on this host holds {HOST_LOCK}; waiting");
            file.lock()
                .with_context(|| format!("locking {HOST_LOCK}"))?;
        }
        Err(std::fs::TryLockError::Error(e)) => {
            return Err(e).with_context(|| format!("locking {HOST_LOCK}"));
        }
    }
    Ok(file)
}
