//! `hybridlink lab up | demo | down` as a person runs them: the demo's
//! report shows every check passed, and `down` (or the end of a demo) leaves
//! no namespace, interface, rule, file or process behind; with three relay
//! nodes, the demo's clients outlive the node the appliance used. Needs
//! root; skips with a message otherwise.

use std::process::{Command, Output};

use anyhow::{Result, ensure};
use hybridlink_tests::binary;
use hybridlink_tests::lab::root_or_skip;

fn hybridlink_lab(args: &[&str]) -> Result<Output> {
    Ok(Command::new(binary()).arg("lab").args(args).output()?)
}

fn text(out: &[u8]) -> String {
    String::from_utf8_lossy(out).into_owned()
}

/// What the host looks like from outside any lab: its rules, and what of
/// a lab with `prefix` exists.
fn traces(prefix: &str) -> Result<Vec<String>> {
    let mut found = Vec::new();
    let netns = text(&Command::new("ip").args(["netns", "list"]).output()?.stdout);
    found.extend(
        netns
            .lines()
            .filter(|l| l.starts_with(prefix))
            .map(|l| format!("namespace {l}")),
    );
    let links = text(&Command::new("ip").args(["-o", "link"]).output()?.stdout);
    found.extend(
        links
            .lines()
            .filter(|l| l.contains(&format!(": {prefix}")))
            .map(|l| format!("interface {l}")),
    );
    let state = format!("/run/hybridlink-lab/{prefix}");
    if std::path::Path::new(&state).exists() {
        found.push(format!("directory {state}"));
    }
    for ns in ["app", "rly", "rly2", "rly3", "onp"] {
        let etc = format!("/etc/netns/{prefix}{ns}");
        if std::path::Path::new(&etc).exists() {
            found.push(format!("directory {etc}"));
        }
    }
    // Every process the lab starts has the state directory on its command
    // line or runs inside a lab namespace (gone with it); look for the first.
    let procs = text(
        &Command::new("pgrep")
            .args(["-a", "-f", &state])
            .output()?
            .stdout,
    );
    found.extend(procs.lines().map(|l| format!("process {l}")));
    Ok(found)
}

fn rules() -> Result<String> {
    Ok(text(&Command::new("ip").arg("rule").output()?.stdout))
}

/// The check lines of a report: (passed, line).
fn checks(report: &str) -> Vec<(bool, String)> {
    report
        .lines()
        .filter_map(|l| {
            let l = l.trim_start();
            if l.starts_with('✓') {
                Some((true, l.to_string()))
            } else if l.starts_with('✗') {
                Some((false, l.to_string()))
            } else {
                None
            }
        })
        .collect()
}

#[test]
fn lab_demo_passes_every_check_and_leaves_nothing() -> Result<()> {
    if !root_or_skip("lab_demo_passes_every_check_and_leaves_nothing") {
        return Ok(());
    }
    let prefix = format!("hl{}d", std::process::id() % 10000);
    let rules_before = rules()?;
    let out = hybridlink_lab(&["demo", "--prefix", &prefix])?;
    let report = text(&out.stdout);
    println!("{report}\n{}", text(&out.stderr));
    let checks = checks(&report);
    ensure!(
        out.status.success(),
        "lab demo failed:\n{report}\n{}",
        text(&out.stderr)
    );
    // The report names each client and shows the map and the agent.
    for what in [
        "payroll.corp",
        "psql",
        "redis-cli",
        "stopped.corp",
        "hybridlink connect",
        "big.bin",
    ] {
        ensure!(
            checks.iter().any(|(_, l)| l.contains(what)),
            "no check for {what} in:\n{report}"
        );
    }
    ensure!(
        checks.iter().all(|(ok, _)| *ok),
        "a check failed:\n{report}"
    );
    ensure!(
        report.contains(&format!("{n} of {n} checks passed", n = checks.len())),
        "{report}"
    );
    for name in ["payroll.corp", "sql.corp", "cache.corp"] {
        ensure!(
            report
                .lines()
                .any(|l| l.contains(name) && l.contains("→ 127.77.")),
            "{name} is not mapped into the virtual range:\n{report}"
        );
    }
    ensure!(
        report.lines().filter(|l| l.contains("Connected")).count() == 4,
        "the agent does not show 4 of its hybrid connections connected:\n{report}"
    );
    // The fifth was moved by the relay to a port its on-prem policy does
    // not allow: the report's agent status says so, with the reason.
    ensure!(
        report.lines().any(|l| l.contains("stopped")
            && l.contains("Denied by policy")
            && l.contains("on-prem policy refuses stopped.corp:18099")),
        "the agent status does not show the policy refusal:\n{report}"
    );
    ensure!(report.contains("Gbit/s"), "no throughput figure:\n{report}");
    // Brought up by the demo, so removed by it.
    let left = traces(&prefix)?;
    ensure!(left.is_empty(), "the demo left behind: {left:#?}");
    ensure!(rules()? == rules_before, "the host's ip rules changed");
    Ok(())
}

#[test]
fn lab_up_recovers_from_a_crash_and_down_removes_everything() -> Result<()> {
    if !root_or_skip("lab_up_recovers_from_a_crash_and_down_removes_everything") {
        return Ok(());
    }
    let prefix = format!("hl{}u", std::process::id() % 10000);
    let guard = Down(prefix.clone());
    let out = hybridlink_lab(&["up", "--prefix", &prefix])?;
    ensure!(out.status.success(), "lab up: {}", text(&out.stderr));
    ensure!(
        text(&out.stdout).contains("The lab is up"),
        "{}",
        text(&out.stdout)
    );

    // A crash: the agent and relay die without cleaning up.
    let state = format!("/run/hybridlink-lab/{prefix}");
    for role in ["relay/relay", "onprem/agent"] {
        let pid = std::fs::read_to_string(format!("{state}/{role}.pid"))?;
        Command::new("kill").args(["-9", pid.trim()]).status()?;
    }
    // `up` again replaces the broken lab with a working one.
    let out = hybridlink_lab(&["up", "--prefix", &prefix])?;
    ensure!(
        out.status.success(),
        "lab up after a crash: {}",
        text(&out.stderr)
    );
    ensure!(
        text(&out.stderr).contains("removing the earlier lab"),
        "{}",
        text(&out.stderr)
    );

    // A demo on a running lab checks it and leaves it running.
    let out = hybridlink_lab(&["demo", "--prefix", &prefix])?;
    let report = text(&out.stdout);
    ensure!(
        out.status.success(),
        "demo on the running lab:\n{report}{}",
        text(&out.stderr)
    );
    ensure!(
        !checks(&report).is_empty() && checks(&report).iter().all(|(ok, _)| *ok),
        "{report}"
    );
    ensure!(
        !traces(&prefix)?.is_empty(),
        "the demo removed a lab it did not bring up"
    );

    let out = hybridlink_lab(&["down", "--prefix", &prefix])?;
    ensure!(out.status.success(), "lab down: {}", text(&out.stderr));
    ensure!(text(&out.stdout).contains("lab removed"));
    let left = traces(&prefix)?;
    ensure!(left.is_empty(), "lab down left behind: {left:#?}");
    let out = hybridlink_lab(&["down", "--prefix", &prefix])?;
    ensure!(out.status.success() && text(&out.stdout).contains("no lab to remove"));
    drop(guard);
    Ok(())
}

/// Connects from namespace `ns` to `addr` (HOST:PORT); returns how it
/// failed (`ENETUNREACH`, `ECONNREFUSED`, ...) or `connected`.
fn connect_from(ns: &str, host: &str, port: u16) -> Result<String> {
    let script = format!(
        "import errno, socket\ntry:\n    socket.create_connection(('{host}', {port}), 2)\n    print('connected')\nexcept OSError as e:\n    print(errno.errorcode.get(e.errno, str(e)))"
    );
    let out = Command::new("ip")
        .args(["netns", "exec", ns, "python3", "-c", &script])
        .output()?;
    Ok(text(&out.stdout).trim().to_string())
}

#[test]
fn lab_demo_with_three_relays_outlives_a_killed_node_and_down_leaves_nothing() -> Result<()> {
    if !root_or_skip("lab_demo_with_three_relays_outlives_a_killed_node_and_down_leaves_nothing") {
        return Ok(());
    }
    let prefix = format!("hl{}c", std::process::id() % 10000);
    let guard = Down(prefix.clone());
    let out = hybridlink_lab(&["demo", "--relays", "3", "--keep", "--prefix", &prefix])?;
    let report = text(&out.stdout);
    println!("{report}\n{}", text(&out.stderr));
    ensure!(
        out.status.success(),
        "lab demo --relays 3 failed:\n{report}\n{}",
        text(&out.stderr)
    );
    let checks = checks(&report);
    ensure!(
        checks.iter().all(|(ok, _)| *ok)
            && report.contains(&format!("{n} of {n} checks passed", n = checks.len())),
        "a check failed:\n{report}"
    );
    ensure!(
        report.contains(&format!("{prefix}rly, {prefix}rly2, {prefix}rly3")),
        "the report does not name the three relay nodes:\n{report}"
    );
    // The cluster's own checks: the appliance's node killed, the next
    // connection by name through another, the agent on the others.
    for what in [
        "(the appliance's node): curl http://payroll.corp/ by host name still succeeds",
        "the agent is attached on the remaining nodes",
        "started again",
    ] {
        ensure!(
            checks.iter().any(|(_, l)| l.contains(what)),
            "no check {what:?} in:\n{report}"
        );
    }
    ensure!(
        report.lines().filter(|l| l.contains("Connected")).count() == 4,
        "the agent does not show 4 of its hybrid connections connected:\n{report}"
    );
    // App and onprem still reach each other only through a relay program:
    // onprem has no route to the app, nor either of them to etcd.
    let (app, onp) = (format!("{prefix}app"), format!("{prefix}onp"));
    ensure!(connect_from(&onp, "198.18.1.2", 9)? == "ENETUNREACH");
    for member in ["198.18.3.1", "198.18.3.2", "198.18.3.3"] {
        ensure!(connect_from(&onp, member, 2379)? == "ENETUNREACH");
        let from_app = connect_from(&app, member, 2379)?;
        ensure!(from_app != "connected", "the app reaches etcd at {member}");
    }
    for node in ["rly", "rly2", "rly3"] {
        let ns = format!("{prefix}{node}");
        let forward = text(
            &Command::new("ip")
                .args(["netns", "exec", &ns, "sysctl", "-n", "net.ipv4.ip_forward"])
                .output()?
                .stdout,
        );
        ensure!(forward.trim() == "0", "{ns} forwards packets");
    }

    let out = hybridlink_lab(&["down", "--prefix", &prefix])?;
    ensure!(out.status.success(), "lab down: {}", text(&out.stderr));
    let left = traces(&prefix)?;
    ensure!(left.is_empty(), "lab down left behind: {left:#?}");
    drop(guard);
    Ok(())
}

#[test]
fn lab_refuses_a_bad_prefix_with_usage_help() -> Result<()> {
    let out = hybridlink_lab(&["down", "--prefix", "Bad-Prefix"])?;
    ensure!(!out.status.success());
    let err = text(&out.stderr);
    ensure!(
        err.contains("1 to 10 characters") || err.contains("run it as root"),
        "{err}"
    );
    Ok(())
}

/// Removes the lab if the test fails half-way.
struct Down(String);

impl Drop for Down {
    fn drop(&mut self) {
        let _ = hybridlink_lab(&["down", "--prefix", &self.0]);
    }
}
