//! `fullpath --profile DIR`: where the CPU goes when hybridlink's path
//! moves one stream, each way.
//!
//! For each direction, one iperf3 stream crosses the lab for
//! [`PROFILE_SECS`], and then new connections are opened as fast as 16
//! threads can, while `perf record` samples the appliance, the relay and
//! the agent (cpu-clock, so it works without hardware counters; call graphs
//! unwound from DWARF, since release builds keep no frame pointers). Each
//! process's samples become a flame graph (`DIR/WORK-PROCESS.svg`, drawn
//! by inferno), and `DIR/README.md` gives what a byte and a connection
//! cost: each process's CPU time per GiB moved (per 1,000 connections),
//! split by the kind of work its samples were doing (encryption, copying,
//! the kernel, the netstack, the rest).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::fs;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use lab::Role;

use crate::paths::{GREET_PORT, IPERF_PORT, Lab, PathKind};

/// How long each direction is sampled.
const PROFILE_SECS: u32 = 10;
/// Samples a second per process.
const FREQUENCY: u32 = 999;
/// The kinds of work a sample is counted under, first match of its leaf
/// frame (or, for `kernel`, any kernel frame below it) wins.
const KINDS: [&str; 5] = ["encryption", "copying", "kernel", "netstack", "rest"];

/// One process's samples under one [`Work`], as CPU nanoseconds: a
/// cpu-clock sample weighs its period, which `perf script` prints and
/// inferno adds up.
struct Profile {
    process: String,
    nanos: u64,
    by_kind: BTreeMap<&'static str, u64>,
}

/// Profiles hybridlink's path both ways and writes the flame graphs and
/// `README.md` into `dir`. `tools` holds `inferno-collapse-perf` and
/// `inferno-flamegraph`.
pub fn run(lab: &Lab, dir: &Path, tools: &Path) -> Result<()> {
    let collapse = tools.join("inferno-collapse-perf");
    let flamegraph = tools.join("inferno-flamegraph");
    for tool in [&collapse, &flamegraph] {
        if !tool.exists() {
            bail!(
                "{} is missing: ./scripts/bench installs it (cargo install inferno)",
                tool.display()
            );
        }
    }
    fs::create_dir_all(dir)?;
    let mut running = lab.start(PathKind::Hybridlink)?;
    let mut server = lab.spawn(
        Role::Onprem,
        "iperf3-profile",
        &["iperf3", "-s", "-p", &IPERF_PORT.to_string()],
        &[],
    )?;
    std::thread::sleep(Duration::from_millis(300));
    let host = running.host.to_string();
    let mut report = String::new();
    let outcome = (|| -> Result<()> {
        for work in [Work::Up, Work::Down, Work::Connect] {
            let processes = running.children();
            let mut perfs = Vec::new();
            for (name, pid) in &processes {
                let data = dir.join(format!("{}-{name}.perf.data", work.id()));
                perfs.push((name.clone(), data.clone(), record(pid, &data)?));
            }
            // perf needs a moment to attach before the work starts.
            std::thread::sleep(Duration::from_millis(500));
            let done = work.run(lab, &host);
            for (_, _, perf) in &mut perfs {
                stop(perf);
            }
            let done = done?;
            let mut profiles = Vec::new();
            for (name, data, _) in perfs {
                let svg = dir.join(format!("{}-{name}.svg", work.id()));
                let title = format!("hybridlink {name}, {}, {}", work.title(), done.rate);
                let folded = fold(&data, &collapse)?;
                // The folded stacks stay with the logs, for a closer look.
                fs::write(
                    lab.state.join(format!("{}-{name}.folded", work.id())),
                    &folded,
                )?;
                draw(&folded, &flamegraph, &title, &svg)?;
                let _ = fs::remove_file(&data);
                profiles.push(classify(&name, &folded));
            }
            write_work(&mut report, work, &done, &profiles);
        }
        Ok(())
    })();
    let _ = server.kill();
    let _ = server.wait();
    running.stop(lab);
    outcome?;
    fs::write(dir.join("README.md"), header() + &report)?;
    println!(
        "wrote the flame graphs and {}",
        dir.join("README.md").display()
    );
    Ok(())
}

/// Starts `perf record` on `pid`.
fn record(pid: &u32, data: &Path) -> Result<Child> {
    Command::new("perf")
        .args(["record", "-e", "cpu-clock", "-F", &FREQUENCY.to_string()])
        .args(["--call-graph", "dwarf,16384", "-p", &pid.to_string(), "-o"])
        .arg(data)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("starting perf (Debian's linux-perf)")
}

/// Stops a `perf record` the way it expects (SIGINT), so it writes its file.
fn stop(perf: &mut Child) {
    let _ = Command::new("kill")
        .args(["-INT", &perf.id().to_string()])
        .status();
    let _ = perf.wait();
}

/// What the path is made to do while it is sampled.
#[derive(Debug, Clone, Copy)]
enum Work {
    /// One iperf3 stream app → on-prem.
    Up,
    /// One iperf3 stream on-prem → app.
    Down,
    /// New connections, each greeted and closed, from 16 threads.
    Connect,
}

/// How much a [`Work`] did: the amount its cost is divided by.
struct Done {
    /// GiB moved, or thousands of connections.
    amount: f64,
    /// The rate, for titles.
    rate: String,
}

impl Work {
    fn id(self) -> &'static str {
        match self {
            Work::Up => "up",
            Work::Down => "down",
            Work::Connect => "connect",
        }
    }

    fn title(self) -> &'static str {
        match self {
            Work::Up => "one stream app → on-prem",
            Work::Down => "one stream on-prem → app",
            Work::Connect => "new connections from 16 threads",
        }
    }

    /// What its cost is given per.
    fn unit(self) -> &'static str {
        match self {
            Work::Up | Work::Down => "GiB moved",
            Work::Connect => "1,000 connections",
        }
    }

    fn run(self, lab: &Lab, host: &str) -> Result<Done> {
        match self {
            Work::Up | Work::Down => iperf(lab, host, matches!(self, Work::Down)),
            Work::Connect => {
                let target = format!("{host}:{GREET_PORT}");
                let secs = PROFILE_SECS.to_string();
                let v = lab.probe(Role::App, &["rate", &target, &secs, "16"])?;
                let ok = v["ok"].as_f64().context("rate's count")?;
                let per_sec = v["per_sec"].as_f64().context("rate's rate")?;
                Ok(Done {
                    amount: ok / 1000.0,
                    rate: format!("{per_sec:.0} connections/s"),
                })
            }
        }
    }
}

/// One iperf3 stream for [`PROFILE_SECS`].
fn iperf(lab: &Lab, host: &str, reverse: bool) -> Result<Done> {
    let v = crate::run_iperf(lab, host, PROFILE_SECS, 0, 1, reverse)?;
    let sum = &v["end"]["sum_received"];
    let bytes = sum["bytes"].as_f64().context("iperf3's bytes")?;
    let bits = sum["bits_per_second"].as_f64().context("iperf3's rate")?;
    Ok(Done {
        amount: bytes / f64::from(1u32 << 30),
        rate: format!("{:.2} Gbit/s", bits / 1e9),
    })
}

/// `perf script` folded into one line per stack (inferno's format), kernel
/// frames marked `_[k]`.
fn fold(data: &Path, collapse: &Path) -> Result<String> {
    let script = Command::new("perf")
        .args(["script", "-i"])
        .arg(data)
        .stderr(Stdio::null())
        .output()
        .context("perf script")?;
    if !script.status.success() {
        bail!("perf script failed on {}", data.display());
    }
    let mut child = Command::new(collapse)
        .arg("--all")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()?;
    let mut stdin = child.stdin.take().context("collapse's stdin")?;
    let writer = std::thread::spawn(move || {
        use std::io::Write;
        stdin.write_all(&script.stdout)
    });
    let out = child.wait_with_output()?;
    writer.join().expect("writer")?;
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn draw(folded: &str, flamegraph: &Path, title: &str, svg: &Path) -> Result<()> {
    let mut child = Command::new(flamegraph)
        .args(["--title", title])
        .stdin(Stdio::piped())
        .stdout(fs::File::create(svg)?)
        .spawn()?;
    let mut stdin = child.stdin.take().context("flamegraph's stdin")?;
    std::io::Write::write_all(&mut stdin, folded.as_bytes())?;
    drop(stdin);
    if !child.wait()?.success() {
        bail!("inferno-flamegraph failed for {}", svg.display());
    }
    Ok(())
}

/// Counts each folded stack's samples under the kind of work its frames
/// show.
fn classify(process: &str, folded: &str) -> Profile {
    let mut profile = Profile {
        process: process.to_string(),
        nanos: 0,
        by_kind: KINDS.iter().map(|k| (*k, 0)).collect(),
    };
    for line in folded.lines() {
        let Some((stack, count)) = line.rsplit_once(' ') else {
            continue;
        };
        let Ok(count) = count.parse::<u64>() else {
            continue;
        };
        profile.nanos += count;
        *profile.by_kind.entry(kind_of(stack)).or_default() += count;
    }
    profile
}

/// The kind of work of one stack (frames root first, `;`-separated).
fn kind_of(stack: &str) -> &'static str {
    let frames: Vec<&str> = stack.split(';').collect();
    let leaf = frames
        .last()
        .copied()
        .unwrap_or_default()
        .to_ascii_lowercase();
    let any = |words: &[&str]| words.iter().any(|w| leaf.contains(w));
    if any(&[
        "aes",
        "gcm",
        "ghash",
        "chacha",
        "poly1305",
        "aws_lc",
        "ring_core",
    ]) {
        "encryption"
    } else if any(&[
        "memcpy",
        "memmove",
        "copy_user",
        "copy_to_iter",
        "copy_from_iter",
        "rep_mov",
    ]) {
        "copying"
    } else if frames.iter().any(|f| f.ends_with("_[k]")) {
        "kernel"
    } else if frames.iter().any(|f| f.contains("smoltcp")) {
        "netstack"
    } else {
        "rest"
    }
}

fn header() -> String {
    let mut s = String::from(
        "# Where the CPU goes: hybridlink's path\n\n\
         Made by `./scripts/bench` (`fullpath --profile`): one iperf3 stream for ",
    );
    let _ = writeln!(
        s,
        "{PROFILE_SECS} s each way across the benchmark's lab, then as many new connections as 16 threads open in as long, while `perf record -e cpu-clock -F {FREQUENCY} --call-graph dwarf` \
         samples the appliance, the relay and the agent. The flame graphs beside this file are those samples \
         (open an SVG in a browser; it is searchable; widths are CPU time). \
         The kinds of work go by each sample's innermost frame: encryption (AES-GCM and its helpers), \
         copying (memcpy/memmove in user space, copies to and from user memory in the kernel), \
         kernel (anything else below a system call: TCP, the tun device, scheduling), \
         netstack (smoltcp), rest (our framing, tokio, allocation)."
    );
    s
}

fn write_work(out: &mut String, work: Work, done: &Done, profiles: &[Profile]) {
    let unit = work.unit();
    let _ = write!(
        out,
        "\n## {} ({}): {}\n\n\
         CPU milliseconds per {unit}, by process and kind of work:\n\n\
         | process | total | {} |\n|---|---|{}\n",
        work.title(),
        work.id(),
        done.rate,
        KINDS.join(" | "),
        "---|".repeat(KINDS.len()),
    );
    let per_unit = |nanos: u64| nanos as f64 / 1e6 / done.amount.max(1e-9);
    let mut total = 0;
    for p in profiles {
        total += p.nanos;
        let cells: Vec<String> = KINDS
            .iter()
            .map(|k| format!("{:.0}", per_unit(p.by_kind[k])))
            .collect();
        let _ = writeln!(
            out,
            "| {} | {:.0} | {} |",
            p.process,
            per_unit(p.nanos),
            cells.join(" | ")
        );
    }
    let _ = writeln!(
        out,
        "\nAll three: {:.0} CPU ms per {unit}, {:.2} cores busy on average. \
         Flame graphs: {}.",
        per_unit(total),
        total as f64 / 1e9 / f64::from(PROFILE_SECS),
        profiles
            .iter()
            .map(|p| format!("[{0}]({1}-{0}.svg)", p.process, work.id()))
            .collect::<Vec<_>>()
            .join(", ")
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stacks_are_counted_under_the_work_their_frames_show() {
        let folded = "hybridlink;tokio::run;aes_gcm_enc_update 40\n\
                      hybridlink;write;entry_SYSCALL_64_[k];tcp_sendmsg_[k];copy_user_generic_[k] 30\n\
                      hybridlink;read;entry_SYSCALL_64_[k];tun_get_user_[k] 20\n\
                      hybridlink;smoltcp::iface::Interface::poll 7\n\
                      hybridlink;proto::mux::Mux::poll 3\n\
                      garbage line\n";
        let p = classify("appliance", folded);
        assert_eq!(p.nanos, 100);
        assert_eq!(p.by_kind["encryption"], 40);
        assert_eq!(p.by_kind["copying"], 30);
        assert_eq!(p.by_kind["kernel"], 20);
        assert_eq!(p.by_kind["netstack"], 7);
        assert_eq!(p.by_kind["rest"], 3);
    }
}
