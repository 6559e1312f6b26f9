//! The results of a run: JSON for the chart, Markdown for people, with each
//! figure as a ratio to direct TCP and to the best peer, and the targets of
//! issue 7 checked.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::process::Command;

use anyhow::Result;
use serde::{Deserialize, Serialize};

use crate::paths::{Lab, PathKind};

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Metric {
    Up1,
    Up8,
    Down1,
    Down8,
    /// 64 streams at once: whether the path holds up under many streams.
    Up64,
    Down64,
    P50,
    P99,
    Rate,
    Mem1k,
    Mem10k,
    Mem50k,
    /// The largest count held with every connection still answering.
    Held,
    Dns,
}

impl Metric {
    /// The memory rows, one per count held, in the plan's order.
    pub const MEMORY: [Metric; 3] = [Metric::Mem1k, Metric::Mem10k, Metric::Mem50k];

    pub const ALL: [Metric; 14] = [
        Metric::Up1,
        Metric::Up8,
        Metric::Down1,
        Metric::Down8,
        Metric::Up64,
        Metric::Down64,
        Metric::P50,
        Metric::P99,
        Metric::Rate,
        Metric::Mem1k,
        Metric::Mem10k,
        Metric::Mem50k,
        Metric::Held,
        Metric::Dns,
    ];

    pub fn label(self) -> &'static str {
        match self {
            Metric::Up1 => "throughput app → on-prem, 1 stream",
            Metric::Up8 => "throughput app → on-prem, 8 streams",
            Metric::Down1 => "throughput on-prem → app, 1 stream",
            Metric::Down8 => "throughput on-prem → app, 8 streams",
            Metric::Up64 => "throughput app → on-prem, 64 streams",
            Metric::Down64 => "throughput on-prem → app, 64 streams",
            Metric::P50 => "connect to first byte, p50",
            Metric::P99 => "connect to first byte, p99",
            Metric::Rate => "new connections per second",
            Metric::Mem1k => "memory per idle connection (first count)",
            Metric::Mem10k => "memory per idle connection (second count)",
            Metric::Mem50k => "memory per idle connection (third count)",
            Metric::Held => "connections held, every one answering",
            Metric::Dns => "DNS answers per second",
        }
    }

    fn unit(self) -> &'static str {
        match self {
            Metric::Up1
            | Metric::Up8
            | Metric::Down1
            | Metric::Down8
            | Metric::Up64
            | Metric::Down64 => "Gbit/s",
            Metric::P50 | Metric::P99 => "ms",
            Metric::Rate | Metric::Dns => "/s",
            Metric::Mem1k | Metric::Mem10k | Metric::Mem50k => "KiB",
            Metric::Held => "connections",
        }
    }

    /// Whether more is better.
    fn higher_is_better(self) -> bool {
        !matches!(
            self,
            Metric::P50 | Metric::P99 | Metric::Mem1k | Metric::Mem10k | Metric::Mem50k
        )
    }

    pub fn format(self, v: f64) -> String {
        let digits = match self {
            Metric::Rate | Metric::Dns | Metric::Held => 0,
            Metric::Mem1k | Metric::Mem10k | Metric::Mem50k => 1,
            _ => 2,
        };
        format!("{v:.digits$} {}", self.unit())
    }
}

#[derive(Debug, Serialize, Deserialize)]
pub struct PathResult {
    pub id: String,
    pub title: String,
    pub peer: bool,
    /// The median of each metric's samples.
    pub values: BTreeMap<Metric, f64>,
    /// Each metric's figure in every round that measured it.
    #[serde(default)]
    pub samples: BTreeMap<Metric, Vec<f64>>,
    pub errors: Vec<String>,
    /// For each round with a failed measurement, the path's processes.
    #[serde(default)]
    pub diagnoses: Vec<Diagnosis>,
    /// Every figure as measured, in order, with the CPU time the
    /// hypervisor took meanwhile; the figures set aside for it included.
    #[serde(default)]
    pub measured: BTreeMap<Metric, Vec<Measured>>,
    /// The round being measured (errors name it).
    #[serde(skip)]
    pub round: usize,
}

/// One figure as measured.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Measured {
    pub round: usize,
    pub value: f64,
    /// The share of the machine's CPU time the hypervisor took while it was
    /// measured, in percent (see `steal.rs`).
    pub steal: f64,
    /// Whether the figure counts; one measured while the hypervisor took
    /// more than `steal::LIMIT` was measured again instead.
    pub kept: bool,
}

/// The state of a path's processes when a measurement of `round` failed.
#[derive(Debug, Serialize, Deserialize)]
pub struct Diagnosis {
    pub round: usize,
    /// A process each: its name, whether it still runs (or its exit
    /// status), and the last lines of its log.
    pub processes: Vec<String>,
}

impl PathResult {
    pub fn new(kind: PathKind) -> PathResult {
        PathResult {
            id: kind.id().into(),
            title: kind.title().into(),
            peer: kind.is_peer(),
            values: BTreeMap::new(),
            samples: BTreeMap::new(),
            errors: Vec::new(),
            diagnoses: Vec::new(),
            measured: BTreeMap::new(),
            round: 1,
        }
    }

    /// Keeps a figure (and shows it), or the reason there is none. `steal`
    /// is the share of the CPU the hypervisor took while it was measured.
    pub fn record(&mut self, metric: Metric, value: Result<f64>, steal: f64) {
        match value {
            Ok(v) => {
                eprintln!(
                    "   {:<44} {}{}",
                    metric.label(),
                    metric.format(v),
                    stolen(steal)
                );
                self.samples.entry(metric).or_default().push(v);
                self.note(metric, v, steal, true);
            }
            Err(e) => self.fail(format!("{}: {e:#}", metric.label())),
        }
    }

    /// Shows a figure measured while the hypervisor took `steal` percent
    /// of the CPU, and keeps it only for the report: it is measured again.
    pub fn set_aside(&mut self, metric: Metric, value: f64, steal: f64) {
        eprintln!(
            "   {:<44} {}{}: set aside, measuring again",
            metric.label(),
            metric.format(value),
            stolen(steal)
        );
        self.note(metric, value, steal, false);
    }

    fn note(&mut self, metric: Metric, value: f64, steal: f64, kept: bool) {
        self.measured.entry(metric).or_default().push(Measured {
            round: self.round,
            value,
            steal,
            kept,
        });
    }

    /// Records a failure of the current round.
    pub fn fail(&mut self, what: String) {
        self.errors.push(format!("round {}: {what}", self.round));
    }

    /// Sets each metric's value to the median of its samples.
    pub fn finish(&mut self) {
        for (metric, samples) in &mut self.samples {
            samples.sort_by(f64::total_cmp);
            if let Some(median) = median(samples) {
                self.values.insert(*metric, median);
            }
        }
    }
}

/// What the console says after a figure when the hypervisor took a share
/// of the CPU worth noting while it was measured.
fn stolen(steal: f64) -> String {
    if steal >= crate::steal::NOTE {
        format!(" (the hypervisor took {steal:.0} % of the CPU)")
    } else {
        String::new()
    }
}

/// The median of sorted `samples` (the mean of the middle two for an even
/// count).
fn median(samples: &[f64]) -> Option<f64> {
    let n = samples.len();
    match n {
        0 => None,
        _ if n % 2 == 1 => Some(samples[n / 2]),
        _ => Some((samples[n / 2 - 1] + samples[n / 2]) / 2.0),
    }
}

#[derive(Debug, Serialize, Deserialize)]
pub struct Results {
    pub mode: String,
    pub date: String,
    pub machine: String,
    pub versions: BTreeMap<String, String>,
    /// The idle-connection counts behind `mem1k`, `mem10k` and `mem50k`.
    pub holds: Vec<u32>,
    /// The open-files limit of the lab's processes.
    #[serde(default)]
    pub open_files: u32,
    /// How many greeters, hold probes and hybridlink agents shared the
    /// connections held, each within that limit.
    #[serde(default)]
    pub spread: u32,
    /// Whether hybridlink's extra agent processes (see `spread`) served
    /// only the hold's hybrid connections, so that its other rows went
    /// through one agent; runs before 2 December 2026 spread every row.
    #[serde(default)]
    pub one_agent_rows: bool,
    /// How many destination ports hybridlink's hold spread over.
    #[serde(default)]
    pub hold_ports: u32,
    /// How many rounds measured every path in turn.
    #[serde(default)]
    pub rounds: usize,
    /// The share of the machine's CPU time the hypervisor took over the
    /// whole measurement, in percent.
    #[serde(default)]
    pub steal: f64,
    pub paths: Vec<PathResult>,
}

fn first_line(program: &str, args: &[&str]) -> String {
    Command::new(program)
        .args(args)
        .output()
        .map(|o| {
            let text = [o.stdout, o.stderr].concat();
            String::from_utf8_lossy(&text)
                .lines()
                .find(|l| !l.trim().is_empty())
                .unwrap_or("")
                .trim()
                .to_string()
        })
        .unwrap_or_else(|e| format!("not found ({e})"))
}

impl Results {
    pub fn new(mode: &str, lab: &Lab, holds: &[u32]) -> Result<Results> {
        let cpu = std::fs::read_to_string("/proc/cpuinfo")?
            .lines()
            .find_map(|l| l.strip_prefix("model name"))
            .map(|l| l.trim_start_matches([' ', '\t', ':']).to_string())
            .unwrap_or_default();
        let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
        let memory = std::fs::read_to_string("/proc/meminfo")?
            .lines()
            .next()
            .unwrap_or("")
            .split_whitespace()
            .nth(1)
            .and_then(|k| k.parse::<u64>().ok())
            .unwrap_or(0);
        let kernel = first_line("uname", &["-r"]);
        let machine = format!(
            "{cpu}, {cores} cores, {:.0} GiB, Linux {kernel}",
            memory as f64 / 1024.0 / 1024.0
        );
        let mut versions = BTreeMap::new();
        let hl = lab.hybridlink.display().to_string();
        let peer = |name: &str| lab.peers.join(name).display().to_string();
        let commit = first_line("git", &["rev-parse", "--short", "HEAD"]);
        let dirty = Command::new("git")
            .args(["diff", "--quiet", "HEAD"])
            .status()
            .is_ok_and(|s| !s.success());
        versions.insert(
            "hybridlink".into(),
            format!(
                "{} (commit {commit}{})",
                first_line(&hl, &["--version"]),
                if dirty { ", with local changes" } else { "" }
            ),
        );
        versions.insert("rathole".into(), {
            let out = Command::new(peer("rathole")).arg("--version").output();
            out.map(|o| {
                String::from_utf8_lossy(&o.stdout)
                    .lines()
                    .find_map(|l| l.strip_prefix("Build Version:"))
                    .map(|v| format!("rathole {}", v.trim()))
                    .unwrap_or_default()
            })
            .unwrap_or_else(|_| "not installed".into())
        });
        versions.insert(
            "shadowsocks-rust".into(),
            first_line(&peer("ssserver"), &["--version"]),
        );
        versions.insert("openssh".into(), first_line("ssh", &["-V"]));
        versions.insert("iperf3".into(), first_line("iperf3", &["--version"]));
        let date = first_line("date", &["-u", "+%Y-%m-%d %H:%M UTC"]);
        Ok(Results {
            mode: mode.into(),
            date,
            machine,
            versions,
            holds: holds.to_vec(),
            open_files: 0,
            spread: 1,
            one_agent_rows: true,
            hold_ports: 1,
            rounds: 1,
            steal: 0.0,
            paths: Vec::new(),
        })
    }

    fn value(&self, id: &str, m: Metric) -> Option<f64> {
        self.paths
            .iter()
            .find(|p| p.id == id)
            .and_then(|p| p.values.get(&m).copied())
    }

    /// The best peer's figure for `m`, and which peer it is.
    fn best_peer(&self, m: Metric) -> Option<(f64, &str)> {
        self.paths
            .iter()
            .filter(|p| p.peer)
            .filter_map(|p| p.values.get(&m).map(|v| (*v, p.title.as_str())))
            .reduce(|a, b| {
                let b_better = if m.higher_is_better() {
                    b.0 > a.0
                } else {
                    b.0 < a.0
                };
                if b_better { b } else { a }
            })
    }

    fn label(&self, m: Metric) -> String {
        match m {
            Metric::Mem1k | Metric::Mem10k | Metric::Mem50k => {
                let i = Metric::MEMORY.iter().position(|&x| x == m).unwrap_or(0);
                match self.holds.get(i) {
                    Some(n) => format!("memory per idle connection, {n} held"),
                    None => m.label().to_string(),
                }
            }
            _ => m.label().to_string(),
        }
    }
}

/// The results as Markdown: the table, the targets, the machine.
pub fn markdown(r: &Results) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "# Full-path benchmark ({} run, {})\n", r.mode, r.date);
    let _ = writeln!(
        s,
        "Every path crosses the same lab (app, relay and on-prem network namespaces joined by \
         veths): app → relay → on-prem. Each cell: the figure, then its ratio to direct TCP and \
         to the best peer (ssh, rathole or shadowsocks-rust) for that row. Regenerate with \
         `sudo ./scripts/bench`.\n"
    );
    let _ = write!(s, "| | ");
    let titles: Vec<&str> = r.paths.iter().map(|p| p.title.as_str()).collect();
    let _ = writeln!(s, "{} |", titles.join(" | "));
    let _ = writeln!(s, "|---|{}", "---|".repeat(titles.len()));
    for m in Metric::ALL {
        if r.paths.iter().all(|p| !p.values.contains_key(&m)) {
            continue;
        }
        let _ = write!(s, "| {} |", r.label(m));
        let direct = r.value("direct", m);
        let best = r.best_peer(m);
        for p in &r.paths {
            let Some(v) = p.values.get(&m).copied() else {
                let _ = write!(s, " – |");
                continue;
            };
            let mut cell = m.format(v);
            let mut ratios = Vec::new();
            if let Some(d) = direct.filter(|_| p.id != "direct") {
                ratios.push(format!("{:.2}× direct", v / d));
            }
            if let Some((b, _)) = best.filter(|_| p.id != "direct") {
                ratios.push(format!("{:.2}× best peer", v / b));
            }
            if !ratios.is_empty() {
                let _ = write!(cell, " ({})", ratios.join(", "));
            }
            let _ = write!(s, " {cell} |");
        }
        let _ = writeln!(s);
    }
    let _ = writeln!(s, "\n## Targets (issue 19)\n");
    for line in targets(r) {
        let _ = writeln!(s, "- {line}");
    }
    spread(&mut s, r);
    stolen_rows(&mut s, r);
    let errors: Vec<String> = r
        .paths
        .iter()
        .flat_map(|p| p.errors.iter().map(move |e| format!("{}: {e}", p.title)))
        .collect();
    if !errors.is_empty() {
        let _ = writeln!(s, "\n## Failed measurements\n");
        for e in errors {
            let _ = writeln!(s, "- {e}");
        }
        for p in &r.paths {
            for d in &p.diagnoses {
                let _ = writeln!(
                    s,
                    "\n{}, round {}: the path's processes after the failure\n\n```text",
                    p.title, d.round
                );
                for process in &d.processes {
                    let _ = writeln!(s, "{process}");
                }
                let _ = writeln!(s, "```");
            }
        }
    }
    let _ = writeln!(s, "\n## Machine and versions\n\n- {}", r.machine);
    for (k, v) in &r.versions {
        let _ = writeln!(s, "- {k}: {v}");
    }
    let _ = writeln!(
        s,
        "\nMemory is the growth of the resident set of the path's own processes (hybridlink: \
         appliance, relay and agent; rathole: server and client; shadowsocks: sslocal and \
         ssserver; ssh: sshd and both clients) while the connections are held, divided by their \
         number; a count is held only if every connection, once the memory is read, sends \
         back a byte written to it (the row \"connections held, every one answering\" is the \
         largest such count). Latency and connection rate use a target that sends one byte on \
         accept; throughput is iperf3. Each figure is the median of the rounds that measured it."
    );
    if r.spread > 1 {
        let _ = writeln!(
            s,
            "\nThe open-files limit of this machine's processes was {} and could not be raised, \
             so the target, the probe holding the connections and hybridlink's agent each ran \
             as {} processes sharing the connections (one file per connection each).{}",
            r.open_files,
            r.spread,
            if r.one_agent_rows {
                " hybridlink's extra agent processes served only the held connections' \
                 hybrid connections: its other rows went through one agent, as a user runs it."
            } else {
                ""
            }
        );
    }
    if r.hold_ports > 1 {
        let _ = writeln!(
            s,
            "\nhybridlink's hold dialled {} ports, each a hybrid connection of its own, with \
             at most 25,000 connections on each: past about 32,000 connections from one \
             address to one address and port, Linux's search for a free ephemeral port in \
             `connect` costs more than the path (in the app's kernel and the agent's alike).",
            r.hold_ports
        );
    }
    s
}

/// Every figure measured while the hypervisor took a share of the CPU
/// worth noting, and those measured again for it: a noisy neighbour on the
/// host shows itself rather than passing for the path's figure.
fn stolen_rows(s: &mut String, r: &Results) {
    use crate::steal;
    let _ = writeln!(
        s,
        "\n## CPU taken by the hypervisor\n\nThis machine is a virtual one: its \
         hypervisor took {:.1} % of its CPU time over the run (`steal` in /proc/stat). A \
         latency row measured while it took more than {:.0} % is set aside and measured \
         again, up to {} times, for every path alike. Figures measured while it took \
         {:.0} % or more:\n",
        r.steal,
        steal::LIMIT,
        steal::RETRIES,
        steal::NOTE
    );
    let mut any = false;
    for p in &r.paths {
        for (metric, figures) in &p.measured {
            for m in figures.iter().filter(|m| m.steal >= steal::NOTE) {
                any = true;
                let _ = writeln!(
                    s,
                    "- {}, {}, round {}: {} while it took {:.0} %{}",
                    p.title,
                    r.label(*metric),
                    m.round,
                    metric.format(m.value),
                    m.steal,
                    if m.kept {
                        ""
                    } else {
                        " (set aside, measured again)"
                    }
                );
            }
        }
    }
    if !any {
        let _ = writeln!(s, "- none");
    }
}

/// The spread of each figure over the rounds: min–max and the number of
/// rounds, so that a noisy run shows itself.
fn spread(s: &mut String, r: &Results) {
    if r.rounds < 2 {
        return;
    }
    let _ = writeln!(
        s,
        "\n## Spread over the rounds\n\nThe paths took turns, round by round ({} rounds); \
         each cell is the lowest and highest figure of a path's rounds (the table above shows \
         their median).\n",
        r.rounds
    );
    let titles: Vec<&str> = r.paths.iter().map(|p| p.title.as_str()).collect();
    let _ = writeln!(s, "| | {} |", titles.join(" | "));
    let _ = writeln!(s, "|---|{}", "---|".repeat(titles.len()));
    for m in Metric::ALL {
        if r.paths
            .iter()
            .all(|p| p.samples.get(&m).is_none_or(|v| v.len() < 2))
        {
            continue;
        }
        let _ = write!(s, "| {} |", r.label(m));
        for p in &r.paths {
            match p.samples.get(&m) {
                Some(v) if !v.is_empty() => {
                    let lo = v.iter().copied().fold(f64::INFINITY, f64::min);
                    let hi = v.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                    let _ = write!(s, " {} – {} (n={}) |", m.format(lo), m.format(hi), v.len());
                }
                _ => {
                    let _ = write!(s, " – |");
                }
            }
        }
        let _ = writeln!(s);
    }
}

/// Each target of issue 19 (performance, round two) as a line: met or
/// not, and the figures behind it.
fn targets(r: &Results) -> Vec<String> {
    let mut lines = Vec::new();
    let ours = |m| r.value("hybridlink", m);
    let mut line = |what: &str, figures: Option<(bool, String)>| match figures {
        Some((met, why)) => lines.push(format!("{} {what}: {why}", if met { "✓" } else { "✗" })),
        None => lines.push(format!("{what}: not measured")),
    };
    // Ours against another path's figure times `factor`.
    let against = |m: Metric, other: &str, factor: f64, at_least: bool| {
        let (a, b) = (ours(m)?, r.value(other, m)?);
        let met = if at_least {
            a >= factor * b
        } else {
            a <= factor * b
        };
        Some((
            met,
            format!(
                "hybridlink {} vs {other} {} ({:.2}×)",
                m.format(a),
                m.format(b),
                a / b
            ),
        ))
    };
    for (m, way) in [
        (Metric::Up1, "app → on-prem"),
        (Metric::Down1, "on-prem → app"),
    ] {
        line(
            &format!("single stream {way} ≥ 0.35× direct TCP"),
            against(m, "direct", 0.35, true),
        );
        line(
            &format!("single stream {way} ≥ 3× rathole"),
            against(m, "rathole", 3.0, true),
        );
    }
    // One of our figures against another of ours, at least `factor` times it.
    let ours_against = |a: Metric, b: Metric, factor: f64| {
        let (x, y) = (ours(a)?, ours(b)?);
        Some((
            x >= factor * y,
            format!("{} vs {} ({:.2}×)", a.format(x), b.format(y), x / y),
        ))
    };
    line(
        "single stream on-prem → app within 10 % of app → on-prem",
        ours_against(Metric::Down1, Metric::Up1, 0.9),
    );
    line(
        "8 streams app → on-prem ≥ our single stream",
        ours_against(Metric::Up8, Metric::Up1, 1.0),
    );
    line(
        "no collapse with 64 streams: app → on-prem ≥ 0.9× our 8 streams",
        ours_against(Metric::Up64, Metric::Up8, 0.9),
    );
    line(
        "new connections per second ≥ 2× rathole",
        against(Metric::Rate, "rathole", 2.0, true),
    );
    line(
        "connect-to-first-byte p50 ≤ 0.75× rathole's",
        against(Metric::P50, "rathole", 0.75, false),
    );
    line(
        "connect-to-first-byte p99 ≤ 1.5× rathole's",
        against(Metric::P99, "rathole", 1.5, false),
    );
    line(
        "memory per idle connection at 10,000 ≤ 32 KiB and below every peer",
        ours(Metric::Mem10k).map(|kib| {
            let peer = r.best_peer(Metric::Mem10k);
            let below = peer.is_none_or(|(best, _)| kib < best);
            (
                kib <= 32.0 && below,
                match peer {
                    Some((best, name)) => format!(
                        "hybridlink {} vs the best peer ({name}) {}",
                        Metric::Mem10k.format(kib),
                        Metric::Mem10k.format(best)
                    ),
                    None => format!(
                        "hybridlink {} (no peer held 10,000)",
                        Metric::Mem10k.format(kib)
                    ),
                },
            )
        }),
    );
    line(
        "50,000 connections held through one appliance, every one answering",
        Some(match ours(Metric::Held) {
            Some(n) => (n >= 50_000.0, format!("{n:.0} held")),
            None => (false, "none of the counts held".into()),
        }),
    );
    lines
}

#[cfg(test)]
mod tests {
    use super::*;

    fn results(rounds: usize, paths: Vec<PathResult>) -> Results {
        Results {
            mode: "full".into(),
            date: "today".into(),
            machine: "test".into(),
            versions: BTreeMap::new(),
            holds: vec![1000, 10000, 50000],
            open_files: 0,
            spread: 1,
            one_agent_rows: true,
            hold_ports: 1,
            rounds,
            steal: 0.0,
            paths,
        }
    }

    /// The table shows each figure's median, the spread table the lowest
    /// and highest round, and a failed round is listed with the state of
    /// the path's processes.
    #[test]
    fn medians_spread_and_diagnoses_reach_the_report() {
        let mut ours = PathResult::new(PathKind::Hybridlink);
        for (round, v) in [(1, 3.0), (2, 9.0), (3, 4.0)] {
            ours.round = round;
            ours.record(Metric::Up1, Ok(v), 0.0);
        }
        ours.round = 3;
        ours.record(Metric::P50, Err(anyhow::anyhow!("0 of 300 connected")), 0.0);
        ours.diagnoses.push(Diagnosis {
            round: 3,
            processes: vec!["relay (exited: signal: 9 (SIGKILL)); last lines of relay.log:".into()],
        });
        ours.finish();
        assert_eq!(ours.values[&Metric::Up1], 4.0, "the median of 3, 9 and 4");
        let md = markdown(&results(3, vec![ours]));
        assert!(md.contains("| 4.00 Gbit/s"), "{md}");
        assert!(md.contains("3.00 Gbit/s – 9.00 Gbit/s (n=3)"), "{md}");
        assert!(
            md.contains("round 3: connect to first byte, p50: 0 of 300 connected"),
            "{md}"
        );
        assert!(
            md.contains("round 3: the path's processes after the failure"),
            "{md}"
        );
        assert!(md.contains("relay (exited: signal: 9 (SIGKILL))"), "{md}");
    }

    /// A latency row the hypervisor disturbed is listed with its share of
    /// the CPU, set aside, and does not make the median; a quiet run says
    /// so.
    #[test]
    fn figures_measured_while_the_hypervisor_took_the_cpu_are_named() {
        let mut ours = PathResult::new(PathKind::Hybridlink);
        ours.round = 1;
        ours.set_aside(Metric::P99, 11.3, 22.8);
        ours.record(Metric::P99, Ok(0.9), 0.3);
        ours.round = 2;
        ours.record(Metric::P99, Ok(2.5), 3.0);
        ours.finish();
        assert_eq!(
            ours.samples[&Metric::P99],
            vec![0.9, 2.5],
            "11.3 is not kept"
        );
        let mut r = results(2, vec![ours]);
        r.steal = 1.7;
        let md = markdown(&r);
        assert!(md.contains("hypervisor took 1.7 % of its CPU time"), "{md}");
        assert!(
            md.contains("round 1: 11.30 ms while it took 23 % (set aside, measured again)"),
            "{md}"
        );
        assert!(md.contains("round 2: 2.50 ms while it took 3 %\n"), "{md}");
        assert!(
            !md.contains("0.90 ms while"),
            "a quiet figure is not listed: {md}"
        );

        let mut quiet = PathResult::new(PathKind::Hybridlink);
        quiet.record(Metric::P99, Ok(0.9), 0.0);
        quiet.finish();
        let md = markdown(&results(1, vec![quiet]));
        assert!(md.contains("or more:\n\n- none"), "{md}");
    }

    #[test]
    fn an_even_count_takes_the_mean_of_the_middle_two() {
        assert_eq!(median(&[1.0, 2.0, 4.0, 10.0]), Some(3.0));
        assert_eq!(median(&[]), None);
    }
}
