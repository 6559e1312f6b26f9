//! The full-path benchmark: hybridlink against the reference set of
//! ARCHITECTURE.md ("How performance is measured": direct TCP, an ssh -R/-L
//! pair, rathole with noise, shadowsocks-rust's tun), each crossing the same
//! three-namespace lab, measured one after the other in one run. Run it
//! through `./scripts/bench` (root), which installs the peers and renders
//! the chart.
//!
//! For each path: iperf3 throughput with 1, 8 and 64 streams in both
//! directions; connect-to-first-byte latency (p50, p99) over fresh
//! connections; new connections per second; resident memory of the path's
//! processes per idle connection, with every connection held shown still
//! answering; DNS answers per second where the path has a DNS server on the
//! app side. Results go to `OUT/latest.json` and
//! `OUT/latest.md`; each figure is also given as a ratio to direct TCP and
//! to the best peer.

mod paths;
mod probe;
mod profile;
mod report;
mod steal;

use std::io::{BufRead, BufReader, Write};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::Parser;
use lab::Role;
use lab::netns::Netns;

use paths::{GREET_PORT, IPERF_PORT, Lab, PathKind, Running, Spawned};
use report::{Diagnosis, Metric, PathResult, Results};

/// The lab's default name prefix; `hybridlink lab down --prefix hlb`
/// removes a lab left by a killed run.
const PREFIX: &str = "hlb";
const STATE_ROOT: &str = "/run/hybridlink-lab";

#[derive(Debug, Parser)]
#[command(
    about = "Measure hybridlink's full path against direct TCP, ssh, rathole and shadowsocks-rust across the lab (root)",
    after_help = "Normally run as ./scripts/bench, which installs the peers first.\n\
                  A run takes about 40 minutes; --smoke takes well under one."
)]
struct Args {
    /// A few seconds per path instead of the full measurement (CI uses it to
    /// keep the harness working; its figures mean little).
    #[arg(long)]
    smoke: bool,
    /// Where to write latest.json and latest.md.
    #[arg(long, default_value = "bench/results")]
    out: PathBuf,
    /// The paths to measure, comma separated.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "direct,ssh,rathole,shadowsocks,hybridlink"
    )]
    paths: Vec<String>,
    /// Where the paths' configs and logs go (kept after the run).
    #[arg(long, default_value = "target/bench-run")]
    logs: PathBuf,
    /// The directory with `rathole`, `sslocal` and `ssserver`.
    #[arg(long, default_value = "target/bench-peers/bin")]
    peers: PathBuf,
    /// Only write OUT/latest.md again from this latest.json (no lab, no
    /// measurement).
    #[arg(long, value_name = "JSON")]
    report_from: Option<PathBuf>,
    /// The hybridlink binary to measure.
    #[arg(long, default_value = "target/release/hybridlink")]
    hybridlink: PathBuf,
    /// Instead of measuring, profile hybridlink's path (one stream each
    /// way under perf) and write flame graphs and README.md into DIR.
    #[arg(long, value_name = "DIR")]
    profile: Option<PathBuf>,
    /// The directory with `inferno-collapse-perf` and `inferno-flamegraph`
    /// (for --profile).
    #[arg(long, default_value = "target/bench-peers/bin")]
    tools: PathBuf,
    /// The numbers of connections held for the memory rows, comma
    /// separated, instead of the plan's (full: 1000,10000,50000; smoke:
    /// 100).
    #[arg(long, value_delimiter = ',', value_name = "N,M")]
    holds: Option<Vec<u32>>,
    /// How many connections the latency row times, one after the other,
    /// instead of the plan's (full: 2000; smoke: 100). A large count keeps
    /// the row running long enough to trace it.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
    latency_count: Option<u32>,
    /// The lab's name prefix (its namespaces are PREFIXapp, PREFIXrly and
    /// PREFIXonp); another prefix lets a second run go on beside one that
    /// holds the default.
    #[arg(long, default_value = PREFIX)]
    lab_prefix: String,
}

/// The most connections the peers and the Azure-protocol path are asked
/// to hold: the counts past it are about one appliance's limits, and a
/// peer's failing attempt at them would only cost the run minutes.
const PEER_HOLD_MOST: u32 = 10_000;

/// How long each measurement runs.
struct Plan {
    iperf_secs: u32,
    iperf_omit: u32,
    /// Every path is measured once a round, the paths taking turns, so
    /// that a busy minute of the machine falls on all of them alike.
    rounds: usize,
    latency_count: u32,
    rate_secs: u32,
    holds: Vec<u32>,
    dns_secs: u32,
}

impl Plan {
    fn new(smoke: bool) -> Plan {
        if smoke {
            Plan {
                iperf_secs: 1,
                iperf_omit: 0,
                rounds: 1,
                latency_count: 100,
                rate_secs: 1,
                holds: vec![100],
                dns_secs: 1,
            }
        } else {
            Plan {
                iperf_secs: 5,
                iperf_omit: 1,
                rounds: 3,
                latency_count: 2000,
                rate_secs: 5,
                holds: vec![1000, 10000, 50000],
                dns_secs: 5,
            }
        }
    }
}

fn main() {
    let argv: Vec<String> = std::env::args().collect();
    let result = if argv.get(1).map(String::as_str) == Some("probe") {
        probe::main(&argv[2..])
    } else {
        run(Args::parse())
    };
    if let Err(e) = result {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

fn run(args: Args) -> Result<()> {
    if let Some(json) = &args.report_from {
        let text =
            std::fs::read_to_string(json).with_context(|| format!("reading {}", json.display()))?;
        let results: Results = serde_json::from_str(&text)
            .with_context(|| format!("{} is not a results file", json.display()))?;
        std::fs::create_dir_all(&args.out)?;
        std::fs::write(args.out.join("latest.md"), report::markdown(&results))?;
        return Ok(());
    }
    let kinds = args
        .paths
        .iter()
        .map(|p| PathKind::parse(p))
        .collect::<Result<Vec<_>>>()?;
    let hybridlink = std::fs::canonicalize(&args.hybridlink)
        .with_context(|| format!("the hybridlink binary {}", args.hybridlink.display()))?;
    let peers = std::path::absolute(&args.peers)?;
    let prefix = args.lab_prefix.as_str();
    let netns = Netns::new(prefix, &hybridlink, STATE_ROOT.as_ref())?;
    claim_lab(prefix)?;
    netns.remove()?;
    netns.build()?;
    remove_lab_on_interrupt(netns.clone(), prefix.to_owned());
    let state = std::path::absolute(&args.logs)?;
    let _ = std::fs::remove_dir_all(&state);
    let mut plan = Plan::new(args.smoke);
    if let Some(holds) = &args.holds {
        if holds.contains(&0) || holds.len() > Metric::MEMORY.len() {
            bail!(
                "--holds: give 1 to {} counts, each at least 1",
                Metric::MEMORY.len()
            );
        }
        plan.holds.clone_from(holds);
    }
    if let Some(count) = args.latency_count {
        plan.latency_count = count;
    }
    let mut lab = Lab {
        state,
        netns,
        me: std::env::current_exe()?,
        hybridlink,
        peers,
        files: 0,
        spread: 1,
        hold_ports: 1,
    };
    lab.files = lab.open_files()?;
    // A profile holds no connections: one agent, as users run it.
    let most_held = match args.profile {
        Some(_) => 0,
        None => plan.holds.iter().copied().max().unwrap_or(0),
    };
    lab.spread = lab.processes_for(most_held);
    lab.hold_ports = lab.hold_ports_for(most_held);
    if lab.spread > 1 {
        eprintln!(
            "the open-files limit is {} (the hard limit could not be raised): the greeter, the hold probe and hybridlink's agent run as {} processes each (the extra agents serve only the hold's hybrid connections)",
            lab.files, lab.spread
        );
    }
    if let Some(dir) = &args.profile {
        let profiled = prepare(&lab).and_then(|mut greeters| {
            let profiled = profile::run(&lab, dir, &std::path::absolute(&args.tools)?);
            stop_all(&mut greeters);
            profiled
        });
        let removed = lab.netns.remove();
        let _ = std::fs::remove_file(PathBuf::from(STATE_ROOT).join(format!("{prefix}.bench.pid")));
        profiled?;
        return removed;
    }
    let outcome = measure_all(&lab, &kinds, &plan, &args);
    let removed = lab.netns.remove();
    let _ = std::fs::remove_file(PathBuf::from(STATE_ROOT).join(format!("{prefix}.bench.pid")));
    let results = outcome?;
    removed?;
    std::fs::create_dir_all(&args.out)?;
    let json = args.out.join("latest.json");
    std::fs::write(&json, serde_json::to_string_pretty(&results)?)?;
    let md = args.out.join("latest.md");
    std::fs::write(&md, report::markdown(&results))?;
    println!("{}", report::markdown(&results));
    println!("wrote {} and {}", json.display(), md.display());
    let failed: Vec<String> = results
        .paths
        .iter()
        .flat_map(|p| p.errors.iter().map(move |e| format!("{}: {e}", p.id)))
        .collect();
    if !failed.is_empty() {
        bail!("some measurements failed:\n  {}", failed.join("\n  "));
    }
    Ok(())
}

/// Removes the lab when the run is interrupted (Ctrl-C, SIGTERM): its
/// namespaces, the processes in them and the pid file, as a run that ends
/// does; then exits as the signal would have (130, 143).
fn remove_lab_on_interrupt(netns: Netns, prefix: String) {
    std::thread::spawn(move || {
        let Ok(runtime) = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
        else {
            return;
        };
        let code = runtime.block_on(async {
            use tokio::signal::unix::{SignalKind, signal};
            let (Ok(mut interrupt), Ok(mut terminate)) = (
                signal(SignalKind::interrupt()),
                signal(SignalKind::terminate()),
            ) else {
                return None;
            };
            tokio::select! {
                _ = interrupt.recv() => Some(130),
                _ = terminate.recv() => Some(143),
            }
        });
        if let Some(code) = code {
            eprintln!("interrupted: removing the lab {prefix}");
            if let Err(e) = netns.remove() {
                eprintln!(
                    "could not remove the lab: {e:#}; `hybridlink lab down --prefix {prefix}` will"
                );
            }
            let _ =
                std::fs::remove_file(PathBuf::from(STATE_ROOT).join(format!("{prefix}.bench.pid")));
            std::process::exit(code);
        }
    });
}

/// Refuses to start while another run is alive (it would remove that run's
/// lab under it); a run that was killed leaves a stale pid file, taken over.
fn claim_lab(prefix: &str) -> Result<()> {
    let pid_file = PathBuf::from(STATE_ROOT).join(format!("{prefix}.bench.pid"));
    if let Ok(pid) = std::fs::read_to_string(&pid_file) {
        let pid = pid.trim();
        let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
        if comm.trim() == "fullpath" && pid != std::process::id().to_string() {
            bail!(
                "another benchmark run (pid {pid}) is using the lab {prefix}: wait for it, or give another --lab-prefix"
            );
        }
    }
    std::fs::create_dir_all(STATE_ROOT)?;
    std::fs::write(&pid_file, std::process::id().to_string())?;
    Ok(())
}

/// Readies the lab for any path: the namespaces' sysctls, the target's
/// name on-prem, and the greeter every path's latency is measured against
/// (and whose greeting tells that a path is up).
fn prepare(lab: &Lab) -> Result<Vec<Spawned>> {
    std::fs::create_dir_all(&lab.state)?;
    for role in [Role::App, Role::Relay, Role::Onprem] {
        // Thousands of connections a second leave sockets in TIME-WAIT, so
        // widen the ephemeral range, keeping out the ports the paths listen
        // on (an outgoing socket on 9444 once kept our relay from starting).
        lab.sh(
            role,
            "sysctl -qw net.ipv4.ip_local_port_range='1024 65000' net.ipv4.tcp_tw_reuse=1 \
             net.ipv4.ip_local_reserved_ports=2222,2333,5201,5300,5310-5319,5353,8388,9443-9444,15201,15300",
        )?;
    }
    let hosts = lab.netns.hosts_file(Role::Onprem);
    std::fs::write(
        &hosts,
        format!("127.0.0.1 localhost\n127.0.0.1 {}\n", paths::TARGET_NAME),
    )?;
    let me = lab.me.display().to_string();
    let hold_ports: Vec<u16> = lab.hold_ports().collect();
    // Sharing the greeting port (SO_REUSEPORT) when one may not hold every
    // connection, and the hold ports dealt out.
    (0..lab.spread)
        .map(|i| {
            let mut argv = vec![
                me.clone(),
                "probe".to_string(),
                "greet".to_string(),
                format!("0.0.0.0:{GREET_PORT}"),
            ];
            argv.extend(
                hold_ports
                    .iter()
                    .skip(i as usize)
                    .step_by(lab.spread as usize)
                    .map(|port| format!("0.0.0.0:{port}")),
            );
            let argv: Vec<&str> = argv.iter().map(String::as_str).collect();
            lab.spawn(Role::Onprem, &format!("greeter{i}"), &argv, &[])
        })
        .collect()
}

fn stop_all(children: &mut [Spawned]) {
    for child in children {
        let _ = child.kill();
        let _ = child.wait();
    }
}

fn measure_all(lab: &Lab, kinds: &[PathKind], plan: &Plan, args: &Args) -> Result<Results> {
    let mut greeters = prepare(lab)?;
    let mut results = Results::new(if args.smoke { "smoke" } else { "full" }, lab, &plan.holds)?;
    results.rounds = plan.rounds;
    results.open_files = lab.files;
    results.spread = lab.spread;
    results.hold_ports = lab.hold_ports;
    let run = steal::Clock::start();
    let mut per_path: Vec<PathResult> = kinds.iter().map(|&k| PathResult::new(k)).collect();
    for round in 0..plan.rounds {
        for (&kind, result) in kinds.iter().zip(per_path.iter_mut()) {
            eprintln!(
                "== {} (round {} of {})",
                kind.title(),
                round + 1,
                plan.rounds
            );
            let started = Instant::now();
            result.round = round + 1;
            let failed_before = result.errors.len();
            match lab.start(kind) {
                Ok(mut running) => {
                    measure(lab, &mut running, plan, round, result);
                    if result.errors.len() > failed_before {
                        // While the path is still up: what its processes
                        // were doing when the measurement failed.
                        result.diagnoses.push(Diagnosis {
                            round: round + 1,
                            processes: running.diagnose(),
                        });
                    }
                    running.stop(lab);
                }
                Err(e) => result.errors.push(format!("round {}: {e:#}", round + 1)),
            }
            for e in &result.errors[failed_before..] {
                eprintln!("   ✗ {e}");
            }
            eprintln!("   ({:.0} s)", started.elapsed().as_secs_f64());
        }
    }
    results.steal = run.percent();
    for mut result in per_path {
        result.finish();
        results.paths.push(result);
    }
    stop_all(&mut greeters);
    Ok(results)
}

/// Runs every measurement on a path that is up, recording figures and
/// errors in `result`.
fn measure(lab: &Lab, running: &mut Running, plan: &Plan, round: usize, result: &mut PathResult) {
    let host = running.host.to_string();
    match lab.spawn(
        Role::Onprem,
        "iperf3",
        &["iperf3", "-s", "-p", &IPERF_PORT.to_string()],
        &[],
    ) {
        Ok(mut server) => {
            std::thread::sleep(Duration::from_millis(300));
            for (metric, streams, reverse) in [
                (Metric::Up1, 1, false),
                (Metric::Up8, 8, false),
                (Metric::Down1, 1, true),
                (Metric::Down8, 8, true),
                (Metric::Up64, 64, false),
                (Metric::Down64, 64, true),
            ] {
                let (gbits, stolen) = steal::during(|| iperf(lab, &host, plan, streams, reverse));
                result.record(metric, gbits, stolen);
            }
            let _ = server.kill();
            let _ = server.wait();
        }
        Err(e) => result.fail(format!("iperf3 server: {e:#}")),
    }
    let target = format!("{host}:{GREET_PORT}");
    time_connections(lab, &target, plan.latency_count, result);
    let secs = plan.rate_secs.to_string();
    let (rate, stolen) = steal::during(|| {
        lab.probe(Role::App, &["rate", &target, &secs, "16"])
            .and_then(|v| number(&v, "per_sec"))
    });
    result.record(Metric::Rate, rate, stolen);
    if let Some((server, name)) = running.dns.clone() {
        let secs = plan.dns_secs.to_string();
        let (answered, stolen) = steal::during(|| {
            lab.probe(Role::App, &["dns", &server, &name, &secs, "8"])
                .and_then(|v| number(&v, "per_sec"))
        });
        result.record(Metric::Dns, answered, stolen);
    }
    // Holding thousands of connections takes long and varies little:
    // once, in the first round, and last, so that a path left struggling
    // by a count it could not hold does not spoil the other rows.
    if running.kind != PathKind::Direct && round == 0 {
        let mut all_answered = None;
        for (&n, metric) in plan.holds.iter().zip(Metric::MEMORY) {
            if n > PEER_HOLD_MOST && running.kind != PathKind::Hybridlink {
                continue;
            }
            let (held, stolen) = steal::during(|| idle_memory(lab, running, &target, n));
            if held.is_ok() {
                all_answered = all_answered.max(Some(n));
            }
            result.record(metric, held, stolen);
        }
        if let Some(n) = all_answered {
            result.record(Metric::Held, Ok(f64::from(n)), 0.0);
        }
    }
}

/// The latency row: `count` fresh connections to `target`, timed from
/// connect to the greeting byte. One slow connection in a hundred makes
/// the p99, so a second in which the hypervisor takes a fifth of the CPU
/// decides it, for any path: a row taken while it took more than
/// [`steal::LIMIT`] is set aside and measured again once it calms down.
fn time_connections(lab: &Lab, target: &str, count: u32, result: &mut PathResult) {
    let count = count.to_string();
    for attempt in 0..=steal::RETRIES {
        let (timed, stolen) = steal::during(|| lab.probe(Role::App, &["latency", target, &count]));
        let v = match timed {
            Ok(v) => v,
            Err(e) => return result.fail(format!("latency: {e:#}")),
        };
        let (p50, p99) = (number(&v, "p50_ms"), number(&v, "p99_ms"));
        if stolen > steal::LIMIT
            && attempt < steal::RETRIES
            && let (Ok(p50), Ok(p99)) = (&p50, &p99)
        {
            result.set_aside(Metric::P50, *p50, stolen);
            result.set_aside(Metric::P99, *p99, stolen);
            if !steal::wait_for_calm(steal::CALM_WAIT) {
                eprintln!(
                    "   the hypervisor kept taking more than {} % of the CPU for {} s",
                    steal::LIMIT,
                    steal::CALM_WAIT.as_secs()
                );
            }
            continue;
        }
        result.record(Metric::P50, p50, stolen);
        result.record(Metric::P99, p99, stolen);
        if v["failures"].as_u64().unwrap_or(0) > 0 {
            result.fail(format!(
                "latency: {} connections failed: {}",
                v["failures"], v["first_error"]
            ));
        }
        return;
    }
}

fn number(v: &serde_json::Value, key: &str) -> Result<f64> {
    v[key].as_f64().with_context(|| format!("no {key} in {v}"))
}

/// One iperf3 run, in Gbit/s.
fn iperf(lab: &Lab, host: &str, plan: &Plan, streams: u32, reverse: bool) -> Result<f64> {
    let v = run_iperf(
        lab,
        host,
        plan.iperf_secs,
        plan.iperf_omit,
        streams,
        reverse,
    )?;
    Ok(number(&v["end"]["sum_received"], "bits_per_second")? / 1e9)
}

/// Runs the iperf3 client in the app's namespace against `host` for
/// `secs` (the first `omit` left out), and returns its JSON report.
pub(crate) fn run_iperf(
    lab: &Lab,
    host: &str,
    secs: u32,
    omit: u32,
    streams: u32,
    reverse: bool,
) -> Result<serde_json::Value> {
    let mut line = format!("iperf3 -J -c {host} -p {IPERF_PORT} -t {secs} -O {omit} -P {streams}");
    if reverse {
        line.push_str(" -R");
    }
    // The server may still be finishing the previous test.
    paths::wait_for(Duration::from_secs(5), || {
        let out = lab
            .netns
            .command(Role::App, "sh")
            .args(["-c", &line])
            .output()?;
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).with_context(|| {
            format!(
                "iperf3 printed no JSON: {}",
                String::from_utf8_lossy(&out.stderr)
            )
        })?;
        match v["error"].as_str() {
            Some(e) => bail!("iperf3: {e}"),
            None => Ok(v),
        }
    })
}

/// Resident memory of the path's processes per idle connection, in KiB:
/// the growth while `n` greeted connections are held open. Fails unless
/// all `n` opened and, once the memory is read, every one sends back a
/// byte written to it.
fn idle_memory(lab: &Lab, running: &Running, target: &str, n: u32) -> Result<f64> {
    // Let the memory of earlier measurements settle first.
    std::thread::sleep(Duration::from_secs(1));
    let before = running.resident_kib(lab);
    // As many probes as the open-files limit needs, each holding its share;
    // hybridlink's on ports of their own (`paths::HOLD_PORT`).
    let targets: Vec<String> = if running.kind == PathKind::Hybridlink {
        let host = running.host;
        lab.hold_ports()
            .map(|port| format!("{host}:{port}"))
            .collect()
    } else {
        vec![target.to_string(); lab.spread as usize]
    };
    let parts = targets.len() as u32;
    let mut probes = Vec::new();
    for (i, target) in targets.iter().enumerate() {
        let i = i as u32;
        let share = n / parts + u32::from(i < n % parts);
        if share == 0 {
            continue;
        }
        let mut child = lab.probe_child(Role::App, &["hold", target, &share.to_string()])?;
        let stdout = BufReader::new(child.stdout.take().context("hold's stdout")?);
        probes.push((child, stdout));
    }
    let started = Instant::now();
    let mut held = 0;
    let mut first_error = serde_json::Value::Null;
    for (_, stdout) in &mut probes {
        let report = json_line(stdout, "hold")?;
        held += report["held"].as_u64().unwrap_or(0);
        if first_error.is_null() {
            first_error = report["first_error"].clone();
        }
    }
    let opening = started.elapsed();
    std::thread::sleep(Duration::from_secs(1));
    let after = running.resident_kib(lab);
    let mut answered = 0;
    for (child, stdout) in &mut probes {
        if let Some(stdin) = child.stdin.as_mut() {
            writeln!(stdin, "check")?;
            stdin.flush()?;
        }
        answered += json_line(stdout, "hold's check")?["answered"]
            .as_u64()
            .unwrap_or(0);
    }
    for (mut child, _) in probes {
        drop(child.stdin.take());
        let _ = child.wait();
    }
    let per_connection = after.saturating_sub(before) as f64 / held.max(1) as f64;
    eprintln!(
        "   {n} wanted, {held} held: opened in {:.1} s, {per_connection:.1} KiB each, {answered} answering",
        opening.as_secs_f64()
    );
    if held < u64::from(n) {
        bail!("only {held} of {n} connections opened: {first_error}");
    }
    if answered < held {
        bail!("of {held} connections held, only {answered} sent back a byte written to them");
    }
    // Closing thousands of flows takes the paths a moment.
    std::thread::sleep(Duration::from_secs(2).max(Duration::from_micros(100) * n));
    Ok(per_connection)
}

/// The next line a probe printed, as JSON.
fn json_line(stdout: &mut impl BufRead, what: &str) -> Result<serde_json::Value> {
    let mut line = String::new();
    stdout.read_line(&mut line)?;
    serde_json::from_str(&line).with_context(|| format!("{what} printed {line:?}"))
}
