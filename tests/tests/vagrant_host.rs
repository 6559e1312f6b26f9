//! The Vagrant lab's hold on the host, tried the way it breaks: a run
//! killed before its teardown (a CI job cut off at its time limit) leaves
//! its VMs and networks defined in libvirt under the lab's fixed names, and
//! the next `hybridlink lab vagrant` must still come up; two labs started
//! at once must not take each other's VMs. The whole lab on VMs runs in
//! `scripts/test-all`; these check the two guards in seconds. Needs root
//! (libvirt); skips with a message otherwise.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};
use hybridlink_tests::lab::root_or_skip;
use hybridlink_tests::{binary, repo_root};

fn virsh(args: &[&str]) -> Result<String> {
    let out = Command::new("virsh")
        .args(["-c", "qemu:///system"])
        .args(args)
        .output()
        .context("running virsh")?;
    ensure!(
        out.status.success(),
        "virsh {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Undoes `scripts/vagrant-host-setup` however the test ends.
struct Teardown;

impl Drop for Teardown {
    fn drop(&mut self) {
        let _ = Command::new(repo_root().join("scripts/vagrant-host-teardown")).status();
    }
}

#[test]
fn an_interrupted_labs_vms_and_networks_are_removed_before_the_next_lab() -> Result<()> {
    if !root_or_skip("an_interrupted_labs_vms_and_networks_are_removed_before_the_next_lab") {
        return Ok(());
    }
    let _lock = lab::vagrant::lock_host()?;
    let setup = Command::new(repo_root().join("scripts/vagrant-host-setup")).status()?;
    let _teardown = Teardown;
    ensure!(setup.success(), "vagrant-host-setup: {setup}");

    // What a killed run leaves: the app VM still running under its lab
    // name, and one of its networks up with its bridge.
    let dir = tempfile::tempdir()?;
    let domain = dir.path().join("hl-app.xml");
    std::fs::write(
        &domain,
        "<domain type='qemu'><name>hl-app</name><memory unit='MiB'>32</memory>\
         <vcpu>1</vcpu><os><type arch='x86_64'>hvm</type></os></domain>",
    )?;
    let network = dir.path().join("hl-appnet.xml");
    std::fs::write(&network, "<network><name>hl-appnet</name></network>")?;
    virsh(&["define", domain.to_str().expect("utf-8")])?;
    virsh(&["start", "hl-app"])?;
    virsh(&["net-define", network.to_str().expect("utf-8")])?;
    virsh(&["net-start", "hl-appnet"])?;
    let info = virsh(&["net-info", "hl-appnet"])?;
    let bridge = info
        .lines()
        .find_map(|l| l.strip_prefix("Bridge:"))
        .map(|b| b.trim().to_string())
        .context("net-info names no bridge")?;
    ensure!(
        virsh(&["list", "--name"])?.lines().any(|l| l == "hl-app"),
        "the planted VM is not running"
    );

    // The step `lab vagrant` runs before `vagrant up`.
    let out = Command::new(repo_root().join("scripts/vagrant-host-clean")).output()?;
    let said = String::from_utf8_lossy(&out.stdout);
    ensure!(out.status.success(), "vagrant-host-clean failed: {said}");
    ensure!(
        said.contains("removing leftover domain hl-app")
            && said.contains("removing leftover network hl-appnet"),
        "the clean-up does not say what it removed: {said}"
    );
    let domains = virsh(&["list", "--all", "--name"])?;
    ensure!(
        !domains.lines().any(|l| l == "hl-app"),
        "hl-app is still defined: {domains}"
    );
    let networks = virsh(&["net-list", "--all", "--name"])?;
    ensure!(
        !networks.lines().any(|l| l == "hl-appnet"),
        "hl-appnet is still defined: {networks}"
    );
    let links = Command::new("ip").args(["-o", "link"]).output()?;
    ensure!(
        !String::from_utf8_lossy(&links.stdout).contains(&format!(": {bridge}:")),
        "the network's bridge {bridge} is still there"
    );
    let qemu = Command::new("pgrep")
        .args(["-f", "guest=hl-app"])
        .output()?;
    ensure!(
        qemu.stdout.is_empty(),
        "the VM's qemu still runs: {}",
        String::from_utf8_lossy(&qemu.stdout)
    );
    Ok(())
}

#[test]
fn a_second_vagrant_lab_waits_for_the_first() -> Result<()> {
    if !root_or_skip("a_second_vagrant_lab_waits_for_the_first") {
        return Ok(());
    }
    // A Vagrantfile with no scripts beside it: once the lab has the lock,
    // its first step (preparing the host) fails at once.
    let dir = tempfile::tempdir()?;
    let vagrant = dir.path().join("vagrant");
    std::fs::create_dir(&vagrant)?;
    std::fs::write(vagrant.join("Vagrantfile"), "")?;

    let lock = lab::vagrant::lock_host()?;
    let mut lab = Command::new(binary())
        .args(["lab", "vagrant", "--dir"])
        .arg(&vagrant)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()?;
    let stderr = lab.stderr.take().expect("piped");
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let mut said = Vec::new();
    let waiting = loop {
        match rx.recv_timeout(Duration::from_secs(20)) {
            Ok(line) => {
                let waiting = line.contains("waiting");
                said.push(line);
                if waiting {
                    break true;
                }
            }
            Err(_) => break false,
        }
    };
    if !waiting {
        let _ = lab.kill();
        bail!("the second lab did not say it waits: {said:?}");
    }
    // Still waiting a second later: it has not gone on to the host.
    std::thread::sleep(Duration::from_secs(1));
    if let Some(status) = lab.try_wait()? {
        bail!("the second lab ended while the first held the host ({status}): {said:?}");
    }
    while let Ok(line) = rx.try_recv() {
        said.push(line);
    }
    ensure!(
        !said.iter().any(|l| l.contains("preparing the host")),
        "the second lab went on while the first held the host: {said:?}"
    );

    drop(lock);
    let status = lab.wait()?;
    said.extend(rx.iter());
    ensure!(!status.success(), "the lab had no scripts yet succeeded");
    ensure!(
        said.iter().any(|l| l.contains("preparing the host")),
        "released, the second lab did not go on: {said:?}"
    );
    Ok(())
}
