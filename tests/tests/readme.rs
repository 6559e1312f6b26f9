//! The README's deployment walkthrough, run as written: every shell block
//! tagged with a machine (` ```sh relay `, ` ```sh onprem `, ` ```sh app `)
//! runs, in order, on that machine of a namespace lab, with the strings in
//! `<...>` filled in as a person would paste them. Each machine gets a
//! private view of `/etc`, `/var/lib`, `/usr/local/bin` and `/run` (so the
//! `install` commands write real files without touching this host) and a
//! stand-in `systemctl` that starts what the written units say. Needs root.

use std::os::unix::fs::MetadataExt as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use hybridlink_tests::lab::{Lab, RELAY_IP, root_or_skip};
use hybridlink_tests::{Proc, binary};

/// A block of the README: the machine it runs on and its text.
#[derive(Debug)]
struct Block {
    machine: String,
    text: String,
    line: usize,
}

fn readme_blocks() -> Result<Vec<Block>> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../README.md");
    let text = std::fs::read_to_string(&path)?;
    let mut blocks = Vec::new();
    let mut open: Option<Block> = None;
    for (n, line) in text.lines().enumerate() {
        match open.as_mut() {
            None => {
                if let Some(info) = line.strip_prefix("```sh ") {
                    let machine = info.trim();
                    ensure!(
                        ["relay", "onprem", "app"].contains(&machine),
                        "README line {}: unknown machine {machine:?}",
                        n + 1
                    );
                    open = Some(Block {
                        machine: machine.into(),
                        text: String::new(),
                        line: n + 1,
                    });
                }
            }
            Some(block) => {
                if line.starts_with("```") {
                    blocks.extend(open.take());
                } else {
                    block.text.push_str(line);
                    block.text.push('\n');
                }
            }
        }
    }
    ensure!(open.is_none(), "README ends inside a code block");
    Ok(blocks)
}

/// One machine of the walkthrough: a process holding a mount namespace
/// inside the lab namespace, with private writable system directories.
struct Machine {
    ns: String,
    holder: Proc,
    dir: PathBuf,
}

impl Machine {
    fn start(lab: &Lab, ns: &str, dir: &Path) -> Result<Machine> {
        for d in [
            "etc-up",
            "etc-work",
            "lib-up",
            "lib-work",
            "netns-etc",
            "systemd",
        ] {
            std::fs::create_dir_all(dir.join(d))?;
        }
        let d = dir.display();
        // `ip netns exec` binds the namespace's hosts and resolv.conf over
        // /etc's; keep them visible above the overlay.
        let script = format!(
            "set -e
            mount --bind /etc/netns/{ns} {d}/netns-etc
            mount -t overlay overlay -o lowerdir=/etc,upperdir={d}/etc-up,workdir={d}/etc-work /etc
            mount --bind {d}/netns-etc/hosts /etc/hosts
            mount --bind {d}/netns-etc/resolv.conf /etc/resolv.conf
            mount -t overlay overlay -o lowerdir=/var/lib,upperdir={d}/lib-up,workdir={d}/lib-work /var/lib
            mount -t tmpfs tmpfs /usr/local/bin
            mount -t tmpfs tmpfs /run
            touch {d}/ready
            exec sleep 3600"
        );
        let holder = lab.spawn(
            ns,
            &format!("{ns}-holder"),
            &[
                "unshare",
                "--mount",
                "--propagation",
                "private",
                "sh",
                "-c",
                &script,
            ],
        )?;
        let deadline = Instant::now() + Duration::from_secs(10);
        while !dir.join("ready").exists() {
            ensure!(
                Instant::now() < deadline,
                "the {ns} machine did not set up its mounts"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(Machine {
            ns: ns.to_string(),
            holder,
            dir: dir.to_path_buf(),
        })
    }

    /// Runs shell text on this machine from `cwd`, as root, with the
    /// stand-in systemctl first on PATH.
    fn run(&self, text: &str, cwd: &Path, fake_bin: &Path) -> Result<Output> {
        let path = format!(
            "{}:/usr/local/bin:/usr/local/sbin:/usr/sbin:/usr/bin:/sbin:/bin",
            fake_bin.display()
        );
        let out = Command::new("nsenter")
            .args(["-t", &self.holder.pid().to_string(), "-m", "-n"])
            .arg(format!("--wd={}", cwd.display()))
            .args(["env", "-i", "HOME=/root", "LANG=C.UTF-8"])
            .arg(format!("PATH={path}"))
            .arg(format!(
                "FAKE_SYSTEMD_DIR={}",
                self.dir.join("systemd").display()
            ))
            .args(["timeout", "120", "sh", "-ec", text])
            .output()?;
        Ok(out)
    }
}

/// Replaces `<listen string of NAME>` and `<send string of NAME>` with the
/// relay's strings, and `<end-to-end key of NAME>` with what the on-prem
/// machine's `agent end-to-end-key NAME` prints.
fn fill_in(
    text: &str,
    relay: &Machine,
    onprem: &Machine,
    cwd: &Path,
    fake_bin: &Path,
) -> Result<String> {
    let mut out = String::new();
    let mut rest = text;
    while let Some(start) = rest.find('<') {
        let Some(len) = rest[start..].find('>') else {
            break;
        };
        let inner = &rest[start + 1..start + len];
        // A shell redirection (`<<'EOF'`, `< file`), not a placeholder.
        if inner.contains(['<', '\n']) {
            out.push_str(&rest[..=start]);
            rest = &rest[start + 1..];
            continue;
        }
        let words: Vec<&str> = inner.split(' ').collect();
        out.push_str(&rest[..start]);
        // Which machine prints what the placeholder stands for.
        let source = match words.as_slice() {
            [rule @ ("listen" | "send"), "string", "of", name] => Some((
                relay,
                format!(
                    "hybridlink hc --data-dir /var/lib/hybridlink-relay keys {name} --rule {rule} --key primary"
                ),
            )),
            [
                rule @ ("listen" | "send"),
                slot @ ("primary" | "secondary"),
                "string",
                "of",
                name,
            ] => Some((
                relay,
                format!(
                    "hybridlink hc --data-dir /var/lib/hybridlink-relay keys {name} --rule {rule} --key {slot}"
                ),
            )),
            ["end-to-end", "key", "of", name] => {
                Some((onprem, format!("hybridlink agent end-to-end-key {name}")))
            }
            _ => None,
        };
        match source {
            Some((machine, command)) => {
                let got = machine.run(&command, cwd, fake_bin)?;
                ensure!(
                    got.status.success(),
                    "getting {inner}: {}",
                    String::from_utf8_lossy(&got.stderr)
                );
                out.push_str(String::from_utf8_lossy(&got.stdout).trim());
            }
            None => out.push_str(&rest[start..=start + len]),
        }
        rest = &rest[start + len + 1..];
    }
    out.push_str(rest);
    Ok(out)
}

#[test]
fn the_readme_walkthrough_works_as_written() -> Result<()> {
    if !root_or_skip("the_readme_walkthrough_works_as_written") {
        return Ok(());
    }
    let started = Instant::now();
    let blocks = readme_blocks()?;
    for machine in ["relay", "onprem", "app"] {
        ensure!(
            blocks.iter().any(|b| b.machine == machine),
            "the README has no block for {machine}"
        );
    }
    let lab = Lab::new("m")?;
    // The relay's public name, and the on-prem service's name, as DNS
    // would give them on those machines.
    lab.hosts(&lab.app, &[(RELAY_IP, "relay.example.com")])?;
    lab.hosts(
        &lab.onprem,
        &[
            (RELAY_IP, "relay.example.com"),
            ("127.0.0.1", "payroll.corp"),
        ],
    )?;
    let site = tempfile::tempdir()?;
    std::fs::write(
        site.path().join("index.html"),
        "payroll page from on-prem\n",
    )?;
    let _web = lab.web_server(&lab.onprem, "127.0.0.1", 80, site.path())?;

    // Where a person stands: a directory with the built binary in it.
    let work = tempfile::tempdir()?;
    let cwd = work.path().join("cwd");
    let fake_bin = work.path().join("fake-bin");
    std::fs::create_dir_all(&cwd)?;
    std::fs::create_dir_all(&fake_bin)?;
    std::os::unix::fs::symlink(binary(), cwd.join("hybridlink"))?;
    std::os::unix::fs::symlink(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/fake_systemctl.py"),
        fake_bin.join("systemctl"),
    )?;
    let machines = [
        (
            "relay",
            Machine::start(&lab, &lab.relay, &work.path().join("relay"))?,
        ),
        (
            "onprem",
            Machine::start(&lab, &lab.onprem, &work.path().join("onprem"))?,
        ),
        (
            "app",
            Machine::start(&lab, &lab.app, &work.path().join("app"))?,
        ),
    ];
    let machine = |name: &str| &machines.iter().find(|(n, _)| *n == name).expect("known").1;

    println!("machines ready at {:?}", started.elapsed());
    let mut outputs = Vec::new();
    let mut service_pids: Vec<(String, String)> = Vec::new();
    for block in &blocks {
        let m = machine(&block.machine);
        if block.machine == "app" && block.text.contains("appliance install") {
            wait_until_connected(machine("onprem"), &cwd, &fake_bin)?;
        }
        let text = fill_in(
            &block.text,
            machine("relay"),
            machine("onprem"),
            &cwd,
            &fake_bin,
        )?;
        let out = m.run(&text, &cwd, &fake_bin)?;
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        println!(
            "--- README line {} on {} ({}) at {:?}:\n{}{stdout}{stderr}",
            block.line,
            block.machine,
            m.ns,
            started.elapsed(),
            block.text
        );
        if !out.status.success() {
            let logs = std::fs::read_dir(m.dir.join("systemd"))
                .into_iter()
                .flatten()
                .flatten()
                .filter(|e| e.path().extension().is_some_and(|x| x == "log"))
                .map(|e| {
                    format!(
                        "{}:\n{}",
                        e.path().display(),
                        std::fs::read_to_string(e.path()).unwrap_or_default()
                    )
                })
                .collect::<Vec<_>>()
                .join("\n");
            bail!(
                "README block at line {} failed on {}:\n{stderr}\n{logs}",
                block.line,
                block.machine
            );
        }
        outputs.push((block, stdout));
        // Which process each installed service runs as, after each block.
        for (name, m) in &machines {
            for unit in [
                "hybridlink-relay",
                "hybridlink-agent",
                "hybridlink-appliance",
            ] {
                if let Ok(pid) = std::fs::read_to_string(m.dir.join(format!("systemd/{unit}.pid")))
                {
                    service_pids.push((format!("{name}/{unit}"), pid));
                }
            }
        }
    }

    // What the walkthrough promises a person sees.
    let seen = |needle: &str, what: &str| -> Result<()> {
        let blocks: Vec<_> = outputs
            .iter()
            .filter(|(b, _)| b.text.contains(needle))
            .collect();
        ensure!(!blocks.is_empty(), "no README block runs {needle:?}");
        for (b, o) in blocks {
            ensure!(
                o.contains(what),
                "the block at line {} ({needle:?}) did not show {what:?}",
                b.line
            );
        }
        Ok(())
    };
    seen("curl http://payroll.corp/", "payroll page from on-prem")?;
    seen("hybridlink forward", "payroll page from on-prem")?;
    seen("connect --check", "reachable")?;
    seen("agent status --json", "\"connected\"")?;
    seen("appliance status", "payroll.corp:80")?;
    seen("appliance status", " ok\n")?;
    seen("keys payroll --rule listen", "SharedAccessKeyName=listen")?;
    // The install commands wrote real units and configs, secrets kept
    // private (the agent's readable by its group, root's).
    for (m, path, mode) in [
        ("onprem", "etc-up/hybridlink/agent.conf", 0o640),
        ("onprem", "etc-up/hybridlink/policy.toml", 0o640),
        ("app", "etc-up/hybridlink/appliance.toml", 0o600),
        (
            "relay",
            "etc-up/systemd/system/hybridlink-relay.service",
            0o644,
        ),
    ] {
        let p = machine(m).dir.join(path);
        let meta = std::fs::metadata(&p).with_context(|| format!("{} on {m}", p.display()))?;
        ensure!(
            std::os::unix::fs::PermissionsExt::mode(&meta.permissions()) & 0o777 == mode,
            "{path} on {m} is not mode {mode:o}"
        );
    }
    // The relay and the agent run as the users `install` made, the
    // appliance as root.
    for (m, unit, user) in [
        ("relay", "hybridlink-relay", "hybridlink-relay"),
        ("onprem", "hybridlink-agent", "hybridlink-agent"),
        ("app", "hybridlink-appliance", "root"),
    ] {
        let pid = std::fs::read_to_string(machine(m).dir.join(format!("systemd/{unit}.pid")))?;
        let running_as = std::fs::metadata(format!("/proc/{}", pid.trim()))
            .with_context(|| format!("{unit} on {m} is not running"))?
            .uid();
        let id = machine(m).run(&format!("id -u {user}"), &cwd, &fake_bin)?;
        let uid = String::from_utf8_lossy(&id.stdout).trim().to_string();
        ensure!(
            running_as.to_string() == uid,
            "{unit} on {m} runs as uid {running_as}, not {user} ({uid:?})"
        );
    }
    // `appliance install` wrote an allow list of the endpoint it saw.
    let conf =
        std::fs::read_to_string(machine("app").dir.join("etc-up/hybridlink/appliance.toml"))?;
    ensure!(
        conf.contains("allow = [\n  \"payroll.corp\",\n]"),
        "appliance.toml has no allow list of what the relay announced:\n{conf}"
    );
    // Each service kept its first process all along: the key rotation
    // reloaded the agent and the appliance, it did not restart them.
    for (service, pid) in &service_pids {
        let first = service_pids
            .iter()
            .find(|(s, _)| s == service)
            .map(|(_, p)| p);
        ensure!(
            first == Some(pid),
            "{service} was restarted ({first:?} then {pid})"
        );
    }
    // systemd itself finds nothing to complain about in the units.
    for m in ["relay", "onprem", "app"] {
        let out = machine(m).run(
            "systemd-analyze verify /etc/systemd/system/hybridlink-*.service",
            &cwd,
            &fake_bin,
        )?;
        let err = String::from_utf8_lossy(&out.stderr);
        ensure!(
            out.status.success() && err.trim().is_empty(),
            "systemd-analyze verify on {m}: {err}"
        );
    }
    Ok(())
}

fn wait_until_connected(onprem: &Machine, cwd: &Path, fake_bin: &Path) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let out = onprem.run("hybridlink agent status --json", cwd, fake_bin)?;
        if String::from_utf8_lossy(&out.stdout).contains("\"connected\"") {
            return Ok(());
        }
        ensure!(
            Instant::now() < deadline,
            "the agent never connected: {}",
            String::from_utf8_lossy(&out.stdout)
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}
