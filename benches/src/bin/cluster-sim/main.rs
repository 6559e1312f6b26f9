//! The relay cluster at scale, on one machine: one etcd and three real
//! `hybridlink relay serve` nodes on loopback, and in this process
//! thousands of simulated agents and senders — control channels only,
//! the transport crate's own client ([`transport::control`]), each agent
//! holding one channel to every node as a real agent does once told the
//! node list — joining, leaving and having their keys regenerated; plus a
//! real `hybridlink agent` and real senders ([`transport::sender::Sender`])
//! carrying streams whose bytes are checked.
//!
//! It reports attach latency (p50, p99), how long a key regenerated on one
//! node takes to detach the agents on the other two (p99), what etcd
//! writes (from its `/metrics`), the relays' resident memory per session,
//! and the benchmark's cluster row: new streams per second with every
//! sender on node 1 against senders spread over the three, in the same
//! run. Results go to `OUT/cluster-sim.{md,json}`.

mod cluster;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use clap::Parser;
use proto::connection_string::ConnectionString;
use proto::control::{DetachReason, Fingerprint, PeerRole, RelayMessage};
use proto::name::HcName;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::{Semaphore, mpsc};
use tokio::task::JoinSet;
use transport::control::{self, ControlConfig, ControlEvent, ControlHandle, RelayAddr};
use transport::sender::{Sender, SenderOptions};

use cluster::{Cluster, EtcdWrites, Owned, wait_until};

#[derive(Debug, Parser)]
#[command(
    about = "Simulate thousands of agents and senders on a three-node relay cluster on etcd, on loopback, and measure it",
    after_help = "Needs etcd (apt-get install etcd-server). The full run takes a few minutes; --smoke takes seconds.\n\
                  Results: OUT/cluster-sim.md and OUT/cluster-sim.json."
)]
struct Args {
    /// Seconds instead of minutes: a few agents, short measurements (CI).
    #[arg(long)]
    smoke: bool,
    /// The hybridlink binary whose `relay serve` and `agent run` are run.
    #[arg(long, default_value = "target/release/hybridlink")]
    hybridlink: PathBuf,
    /// Where to write cluster-sim.md and cluster-sim.json.
    #[arg(long, default_value = "bench/results")]
    out: PathBuf,
    /// Where etcd's and the nodes' data and logs go (replaced each run).
    #[arg(long, default_value = "target/cluster-sim")]
    logs: PathBuf,
    /// Hybrid connections (default 100; 4 with --smoke).
    #[arg(long)]
    hcs: Option<usize>,
    /// Simulated agents per hybrid connection, each with a control channel
    /// to every node (default 20, at most the relay's 25; 5 with --smoke).
    #[arg(long)]
    agents_per_hc: Option<usize>,
    /// Simulated senders, each on one node (default 300; 12 with --smoke).
    #[arg(long)]
    senders: Option<usize>,
    /// Keys regenerated, one hybrid connection at a time (default 20; 3
    /// with --smoke).
    #[arg(long)]
    rotations: Option<usize>,
    /// Seconds each stream-rate measurement runs (default 5; 1 with --smoke).
    #[arg(long)]
    rate_secs: Option<u64>,
    /// Also append the cluster row, as a Markdown section, to this file
    /// (`./scripts/bench` gives its latest.md).
    #[arg(long, value_name = "MD")]
    append_row_to: Option<PathBuf>,
}

/// The parameters of a run, as reported.
#[derive(Clone, Debug, serde::Serialize)]
struct Plan {
    smoke: bool,
    nodes: usize,
    hcs: usize,
    agents_per_hc: usize,
    agents: usize,
    senders: usize,
    rotations: usize,
    churn_fraction: f64,
    rate_secs: u64,
    rate_rounds: usize,
    stream_senders: usize,
    stream_workers_per_sender: usize,
    stream_bytes: usize,
    attach_concurrency: usize,
}

impl Plan {
    fn new(args: &Args) -> Result<Plan> {
        let s = args.smoke;
        let hcs = args.hcs.unwrap_or(if s { 4 } else { 100 });
        let agents_per_hc = args.agents_per_hc.unwrap_or(if s { 5 } else { 20 });
        ensure!(
            (1..=relay::hub::MAX_AGENTS_PER_HC).contains(&agents_per_hc),
            "--agents-per-hc must be 1 to {} (the relay's limit per hybrid connection)",
            relay::hub::MAX_AGENTS_PER_HC
        );
        ensure!(hcs >= 1, "--hcs must be at least 1");
        let rotations = args.rotations.unwrap_or(if s { 3 } else { 20 });
        ensure!(
            rotations <= hcs,
            "--rotations must not exceed --hcs (one regeneration per hybrid connection)"
        );
        Ok(Plan {
            smoke: s,
            nodes: 3,
            hcs,
            agents_per_hc,
            agents: hcs * agents_per_hc,
            senders: args.senders.unwrap_or(if s { 12 } else { 300 }),
            rotations,
            churn_fraction: 0.1,
            rate_secs: args.rate_secs.unwrap_or(if s { 1 } else { 5 }),
            rate_rounds: if s { 1 } else { 2 },
            stream_senders: 3,
            stream_workers_per_sender: 8,
            stream_bytes: 1024,
            attach_concurrency: 64,
        })
    }
}

/// How long one control channel may take to attach before the run fails.
const ATTACH_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a regenerated key may take to detach its agents everywhere.
const DETACH_TIMEOUT: Duration = Duration::from_secs(10);

fn main() {
    let args = Args::parse();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: starting the runtime: {e}");
            std::process::exit(1);
        }
    };
    if let Err(e) = runtime.block_on(run(args)) {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

async fn run(args: Args) -> Result<()> {
    let plan = Plan::new(&args)?;
    let _ = transport::fd_limit::raise();
    let _ = std::fs::remove_dir_all(&args.logs);
    std::fs::create_dir_all(&args.logs)?;
    let bin = std::fs::canonicalize(&args.hybridlink)
        .with_context(|| format!("{} (build it first)", args.hybridlink.display()))?;
    eprintln!(
        "== starting etcd and three relay nodes ({})",
        args.logs.display()
    );
    let cluster = tokio::task::block_in_place(|| Cluster::start(&bin, &args.logs))?;
    let nodes: Vec<SocketAddr> = cluster.nodes.iter().map(|n| n.listen).collect();
    let echo = echo_server().await?;

    // The registry: every hybrid connection, made through the nodes in turn.
    let before = cluster.etcd.writes()?;
    let mut strings: Vec<(ConnectionString, ConnectionString)> = Vec::new();
    let created = Instant::now();
    for h in 0..plan.hcs {
        let node = &cluster.nodes[h % nodes.len()];
        strings.push(tokio::task::block_in_place(|| {
            node.create_hc(&format!("sim-{h}"), echo)
        })?);
    }
    let create_secs = created.elapsed().as_secs_f64();
    let create_writes = cluster.etcd.writes()?.since(&before);

    // What etcd writes while nothing happens: the nodes' leases.
    let idle_secs = if plan.smoke { 2.0 } else { 10.0 };
    let before = cluster.etcd.writes()?;
    tokio::time::sleep(Duration::from_secs_f64(idle_secs)).await;
    let idle_writes = cluster.etcd.writes()?.since(&before);

    let rss_before: Vec<u64> = cluster.nodes.iter().map(|n| n.rss_kib()).collect();
    let (detached_tx, mut detached_rx) = mpsc::unbounded_channel();
    let sim = Sim {
        nodes: nodes.clone(),
        detached: detached_tx,
        limit: Arc::new(Semaphore::new(plan.attach_concurrency)),
        next_identity: Arc::new(AtomicU64::new(1)),
    };

    // Every agent attaches on every node; every sender on one.
    eprintln!(
        "== attaching {} agents x {} nodes and {} senders",
        plan.agents,
        nodes.len(),
        plan.senders
    );
    let before = cluster.etcd.writes()?;
    let attach_started = Instant::now();
    let mut agents: Vec<Option<SimAgent>> = Vec::new();
    let mut attach_ms = Vec::new();
    {
        let mut set = JoinSet::new();
        for a in 0..plan.agents {
            let hc = a % plan.hcs;
            let listen = strings[hc].1.clone();
            let sim = sim.clone();
            set.spawn(async move { (a, sim.agent(a, &listen).await) });
        }
        agents.resize_with(plan.agents, || None);
        while let Some(joined) = set.join_next().await {
            let (a, agent) = joined?;
            let (agent, latencies) = agent?;
            attach_ms.extend(latencies);
            agents[a] = Some(agent);
        }
    }
    let mut senders = Vec::new();
    let mut sender_attach_ms = Vec::new();
    {
        let mut set = JoinSet::new();
        for s in 0..plan.senders {
            let send = strings[s % plan.hcs].0.clone();
            let sim = sim.clone();
            set.spawn(async move {
                let node = s % sim.nodes.len();
                sim.channel(PeerRole::Sender, &send, node, Tag::Sender)
                    .await
            });
        }
        while let Some(joined) = set.join_next().await {
            let (ms, channel) = joined??;
            sender_attach_ms.push(ms);
            senders.push(channel);
        }
    }
    let attach_secs = attach_started.elapsed().as_secs_f64();
    let attach_writes = cluster.etcd.writes()?.since(&before);
    // Every node counts every agent of a hybrid connection.
    tokio::task::block_in_place(|| -> Result<()> {
        for node in &cluster.nodes {
            wait_until(Duration::from_secs(10), "every agent counted", || {
                Ok(node.agents("sim-0")? == plan.agents_per_hc as u64)
            })?;
        }
        Ok(())
    })?;
    let rss_after: Vec<u64> = cluster.nodes.iter().map(|n| n.rss_kib()).collect();
    let sessions_per_node: Vec<usize> = (0..nodes.len())
        .map(|i| plan.agents + (0..plan.senders).filter(|s| s % nodes.len() == i).count())
        .collect();

    // Churn: a tenth of the agents leave, are seen gone, and come back.
    eprintln!(
        "== churn: {:.0} % of the agents leave and rejoin",
        plan.churn_fraction * 100.0
    );
    let churned: Vec<usize> = (0..plan.agents)
        .step_by((1.0 / plan.churn_fraction) as usize)
        .collect();
    let left_started = Instant::now();
    for &a in &churned {
        agents[a] = None;
    }
    let gone =
        plan.agents_per_hc as u64 - churned.iter().filter(|&&a| a % plan.hcs == 0).count() as u64;
    tokio::task::block_in_place(|| -> Result<()> {
        for node in &cluster.nodes {
            wait_until(Duration::from_secs(10), "departed agents gone", || {
                Ok(node.agents("sim-0")? == gone)
            })?;
        }
        Ok(())
    })?;
    let leave_ms = left_started.elapsed().as_secs_f64() * 1000.0;
    let mut rejoin_ms = Vec::new();
    {
        let mut set = JoinSet::new();
        for &a in &churned {
            let hc = a % plan.hcs;
            let listen = strings[hc].1.clone();
            let sim = sim.clone();
            set.spawn(async move { (a, sim.agent(a, &listen).await) });
        }
        while let Some(joined) = set.join_next().await {
            let (a, agent) = joined?;
            let (agent, latencies) = agent?;
            rejoin_ms.extend(latencies);
            agents[a] = Some(agent);
        }
    }

    // Key rotation: a listen key regenerated on node A detaches that hybrid
    // connection's agents on B and C; the old key is then refused there;
    // the agents come back with the new one.
    eprintln!("== regenerating {} listen keys", plan.rotations);
    while detached_rx.try_recv().is_ok() {}
    let before = cluster.etcd.writes()?;
    let mut propagation_ms = Vec::new();
    let mut local_ms = Vec::new();
    let mut api_ms = Vec::new();
    let mut refused_old = 0;
    for r in 0..plan.rotations {
        let hc = r;
        let on = r % nodes.len();
        let name = format!("sim-{hc}");
        let old_listen = strings[hc].1.clone();
        let members: Vec<usize> = (0..plan.agents).filter(|a| a % plan.hcs == hc).collect();
        let started = Instant::now();
        let fresh = tokio::task::block_in_place(|| cluster.nodes[on].regenerate_listen(&name))?;
        api_ms.push(ms(started.elapsed()));
        let mut waiting: HashMap<(usize, usize), ()> = members
            .iter()
            .flat_map(|&a| (0..nodes.len()).map(move |n| ((a, n), ())))
            .collect();
        let deadline = tokio::time::Instant::now() + DETACH_TIMEOUT;
        while !waiting.is_empty() {
            let event = tokio::time::timeout_at(deadline, detached_rx.recv())
                .await
                .with_context(|| {
                    format!(
                        "{} agent channels of {name} still attached {DETACH_TIMEOUT:?} after its key was regenerated",
                        waiting.len()
                    )
                })?
                .context("detach events ended")?;
            let Tag::Agent(a) = event.tag else { continue };
            if event.reason != DetachReason::KeyRegenerated
                || waiting.remove(&(a, event.node)).is_none()
            {
                continue;
            }
            let took = ms(event.at.duration_since(started));
            if event.node == on {
                local_ms.push(took);
            } else {
                propagation_ms.push(took);
            }
        }
        // The old key, tried on another node, is refused.
        let other = (on + 1) % nodes.len();
        match sim
            .channel(PeerRole::Agent, &old_listen, other, Tag::Probe)
            .await
        {
            Err(e) if format!("{e:#}").contains("refused") => refused_old += 1,
            Err(e) => return Err(e.context("probing the old key")),
            Ok(_) => bail!(
                "node {} accepted {name}'s regenerated listen key",
                other + 1
            ),
        }
        strings[hc] = fresh;
        let mut set = JoinSet::new();
        for &a in &members {
            let listen = strings[hc].1.clone();
            let sim = sim.clone();
            set.spawn(async move { (a, sim.agent(a, &listen).await) });
        }
        while let Some(joined) = set.join_next().await {
            let (a, agent) = joined?;
            let (agent, latencies) = agent?;
            rejoin_ms.extend(latencies);
            agents[a] = Some(agent);
        }
    }
    let rotation_writes = cluster.etcd.writes()?.since(&before);

    // Real streams, bytes checked: one `hybridlink agent` on an echo
    // target, and senders all on node 1, then spread over the three.
    eprintln!("== streams: senders on node 1 against spread over three");
    let (echo_send, echo_listen) =
        tokio::task::block_in_place(|| cluster.nodes[0].create_hc("echo", echo))?;
    let _agent = real_agent(&bin, &args.logs, &echo_listen)?;
    tokio::task::block_in_place(|| -> Result<()> {
        for node in &cluster.nodes {
            wait_until(
                Duration::from_secs(20),
                "the real agent on every node",
                || Ok(node.agents("echo")? == 1),
            )?;
        }
        Ok(())
    })?;
    let mut one = RateTotals::default();
    let mut spread = RateTotals::default();
    for _ in 0..plan.rate_rounds {
        one.add(stream_rate(&plan, &echo_send, &[nodes[0]]).await?);
        spread.add(stream_rate(&plan, &echo_send, &nodes).await?);
    }

    let report = Report {
        plan: plan.clone(),
        machine: machine(),
        when_unix: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0),
        hybridlink: bin.display().to_string(),
        attach_ms: Summary::of(&attach_ms),
        attach_secs,
        sender_attach_ms: Summary::of(&sender_attach_ms),
        rejoin_ms: Summary::of(&rejoin_ms),
        leave_ms,
        regenerate_api_ms: Summary::of(&api_ms),
        detach_same_node_ms: Summary::of(&local_ms),
        detach_other_nodes_ms: Summary::of(&propagation_ms),
        old_key_refused: refused_old,
        etcd: EtcdReport {
            create_writes,
            create_secs,
            idle_writes,
            idle_secs,
            attach_writes,
            attach_secs,
            rotation_writes,
        },
        rss_before_kib: rss_before.clone(),
        rss_after_kib: rss_after.clone(),
        sessions_per_node: sessions_per_node.clone(),
        rss_per_session_kib: rss_after
            .iter()
            .zip(&rss_before)
            .map(|(a, b)| a.saturating_sub(*b))
            .sum::<u64>() as f64
            / sessions_per_node.iter().sum::<usize>() as f64,
        streams_one_node: one.finish(),
        streams_three_nodes: spread.finish(),
    };
    drop(senders);
    drop(agents);
    std::fs::create_dir_all(&args.out)?;
    let json = serde_json::to_string_pretty(&report)?;
    std::fs::write(args.out.join("cluster-sim.json"), json + "\n")?;
    let md = report.markdown();
    std::fs::write(args.out.join("cluster-sim.md"), &md)?;
    if let Some(path) = &args.append_row_to {
        use std::io::Write;
        let mut file = std::fs::OpenOptions::new()
            .append(true)
            .create(true)
            .open(path)
            .with_context(|| format!("opening {}", path.display()))?;
        write!(file, "\n{}", report.row_section())?;
    }
    print!("{md}");
    eprintln!("results: {}", args.out.join("cluster-sim.md").display());
    ensure!(
        report.streams_one_node.failed == 0 && report.streams_three_nodes.failed == 0,
        "streams failed: {} through node 1, {} spread (see {})",
        report.streams_one_node.failed,
        report.streams_three_nodes.failed,
        args.logs.display()
    );
    Ok(())
}

/// What a simulated channel is, for the detach events.
#[derive(Clone, Copy, Debug)]
enum Tag {
    Agent(usize),
    Sender,
    Probe,
}

/// A hybrid connection detached from a simulated channel.
struct Detached {
    tag: Tag,
    node: usize,
    reason: DetachReason,
    at: Instant,
}

/// What the simulated peers share.
#[derive(Clone)]
struct Sim {
    nodes: Vec<SocketAddr>,
    detached: mpsc::UnboundedSender<Detached>,
    /// Channels handshaking at once, as a fleet of agents starting over
    /// minutes would be spread.
    limit: Arc<Semaphore>,
    next_identity: Arc<AtomicU64>,
}

/// A control channel attached to one hybrid connection on one node; its
/// events are watched for detaches. Dropping it closes the channel.
struct Channel {
    _handle: ControlHandle,
    watcher: tokio::task::AbortHandle,
}

impl Drop for Channel {
    fn drop(&mut self) {
        self.watcher.abort();
    }
}

/// A simulated agent: one channel to every node.
struct SimAgent {
    _channels: Vec<Channel>,
}

impl Sim {
    /// Agent `a` attaches with `listen` on every node; the attach latency
    /// of each channel in ms.
    async fn agent(&self, a: usize, listen: &ConnectionString) -> Result<(SimAgent, Vec<f64>)> {
        let mut channels = Vec::new();
        let mut latencies = Vec::new();
        for node in 0..self.nodes.len() {
            let (took, channel) = self
                .channel(PeerRole::Agent, listen, node, Tag::Agent(a))
                .await?;
            latencies.push(took);
            channels.push(channel);
        }
        Ok((
            SimAgent {
                _channels: channels,
            },
            latencies,
        ))
    }

    /// Opens a control channel to `node` with `cs` and waits until it is
    /// attached; the time that took (ms, from the dial) and the channel.
    /// An error containing "refused" when the relay detached it at once.
    async fn channel(
        &self,
        role: PeerRole,
        cs: &ConnectionString,
        node: usize,
        tag: Tag,
    ) -> Result<(f64, Channel)> {
        let _permit = self.limit.acquire().await?;
        let id = self.next_identity.fetch_add(1, Ordering::Relaxed);
        let mut identity = [0u8; 32];
        identity[..8].copy_from_slice(&id.to_be_bytes());
        let mut config = ControlConfig::new(
            role,
            Fingerprint(identity),
            format!("sim-{id}"),
            vec![cs.clone()],
        )?;
        let addr = self.nodes[node];
        config.relay = RelayAddr {
            host: addr.ip().to_string(),
            port: addr.port(),
            cert: config.relay.cert,
        };
        let started = Instant::now();
        let (handle, mut events) = control::spawn(config)?;
        let attached = tokio::time::timeout(ATTACH_TIMEOUT, async {
            loop {
                match events.recv().await {
                    Some(ControlEvent::Message(RelayMessage::Attached { .. })) => return Ok(()),
                    Some(ControlEvent::Message(RelayMessage::Detached { message, .. })) => {
                        bail!("attach refused by node {}: {message}", node + 1)
                    }
                    Some(_) => {}
                    None => bail!("control channel to node {} ended", node + 1),
                }
            }
        })
        .await
        .with_context(|| format!("no attach on node {} within {ATTACH_TIMEOUT:?}", node + 1))?;
        attached?;
        let took = ms(started.elapsed());
        let detached = self.detached.clone();
        let watcher = tokio::spawn(async move {
            while let Some(event) = events.recv().await {
                if let ControlEvent::Message(RelayMessage::Detached { reason, .. }) = event {
                    let _ = detached.send(Detached {
                        tag,
                        node,
                        reason,
                        at: Instant::now(),
                    });
                }
            }
        })
        .abort_handle();
        Ok((
            took,
            Channel {
                _handle: handle,
                watcher,
            },
        ))
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// A TCP echo server on loopback: the target of every hybrid connection.
async fn echo_server() -> Result<SocketAddr> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move {
        while let Ok((mut conn, _)) = listener.accept().await {
            tokio::spawn(async move {
                let (mut rd, mut wr) = conn.split();
                let _ = tokio::io::copy(&mut rd, &mut wr).await;
                let _ = wr.shutdown().await;
            });
        }
    });
    Ok(addr)
}

/// `hybridlink agent run` with `listen` (naming node 1), allowed loopback.
fn real_agent(
    bin: &std::path::Path,
    dir: &std::path::Path,
    listen: &ConnectionString,
) -> Result<Owned> {
    let policy = dir.join("policy.toml");
    std::fs::write(&policy, "[[allow]]\nhost = \"127.0.0.0/8\"\n")?;
    let child = std::process::Command::new(bin)
        .args(["agent", "run", "--label", "cluster-sim", "--status-socket"])
        .arg(dir.join("agent.sock"))
        .arg("--policy")
        .arg(&policy)
        .env("HYBRIDLINK_CONNECTION_STRING", listen.to_string())
        .env("RUST_LOG", "warn")
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(dir.join("agent.log"))?)
        .spawn()
        .context("starting hybridlink agent run")?;
    Ok(Owned(child))
}

/// Streams opened and checked in one measurement.
#[derive(Clone, Copy, Debug, Default, serde::Serialize)]
struct Rate {
    streams: u64,
    failed: u64,
    secs: f64,
}

#[derive(Default)]
struct RateTotals {
    total: Rate,
    open_ms: Vec<f64>,
}

impl RateTotals {
    fn add(&mut self, (rate, open_ms): (Rate, Vec<f64>)) {
        self.total.streams += rate.streams;
        self.total.failed += rate.failed;
        self.total.secs += rate.secs;
        self.open_ms.extend(open_ms);
    }

    fn finish(self) -> StreamResult {
        StreamResult {
            streams: self.total.streams,
            failed: self.total.failed,
            secs: self.total.secs,
            per_sec: self.total.streams as f64 / self.total.secs.max(f64::EPSILON),
            open_ms: Summary::of(&self.open_ms),
        }
    }
}

#[derive(Debug, serde::Serialize)]
struct StreamResult {
    streams: u64,
    failed: u64,
    secs: f64,
    per_sec: f64,
    open_ms: Summary,
}

/// New streams per second through `via` (the senders take the nodes in
/// turn): each stream opens, carries `stream_bytes` out and back, and is
/// checked byte for byte.
async fn stream_rate(
    plan: &Plan,
    send: &ConnectionString,
    via: &[SocketAddr],
) -> Result<(Rate, Vec<f64>)> {
    let hc: HcName = send.hc.clone();
    let mut senders = Vec::new();
    for i in 0..plan.stream_senders {
        let mut cs = send.clone();
        let port = via[i % via.len()].port();
        cs.relay_port = port;
        let sender = Sender::start(
            vec![cs],
            SenderOptions {
                label: format!("cluster-sim-{i}"),
                ..SenderOptions::default()
            },
        )?;
        // The first stream waits for the agent and sets up the pipe.
        one_stream(&sender, &hc, plan.stream_bytes, 0)
            .await
            .with_context(|| format!("the first stream through the node at port {port}"))?;
        senders.push(sender);
    }
    let until = Instant::now() + Duration::from_secs(plan.rate_secs);
    let started = Instant::now();
    let mut set = JoinSet::new();
    for (i, sender) in senders.iter().enumerate() {
        for w in 0..plan.stream_workers_per_sender {
            let sender = sender.clone();
            let hc = hc.clone();
            let bytes = plan.stream_bytes;
            set.spawn(async move {
                let (mut ok, mut failed, mut open_ms) = (0u64, 0u64, Vec::new());
                let mut n = (i * 1000 + w) as u64;
                while Instant::now() < until {
                    n += 1;
                    match one_stream(&sender, &hc, bytes, n).await {
                        Ok(took) => {
                            ok += 1;
                            open_ms.push(took);
                        }
                        Err(e) => {
                            failed += 1;
                            eprintln!("stream failed: {e:#}");
                        }
                    }
                }
                (ok, failed, open_ms)
            });
        }
    }
    let mut rate = Rate::default();
    let mut open_ms = Vec::new();
    while let Some(joined) = set.join_next().await {
        let (ok, failed, took) = joined?;
        rate.streams += ok;
        rate.failed += failed;
        open_ms.extend(took);
    }
    rate.secs = started.elapsed().as_secs_f64();
    Ok((rate, open_ms))
}

/// One stream: open, send `len` bytes made from `seed`, half-close, read
/// everything back and compare. The open time in ms.
async fn one_stream(sender: &Sender, hc: &HcName, len: usize, seed: u64) -> Result<f64> {
    let payload: Vec<u8> = (0..len)
        .map(|i| (seed.wrapping_mul(31).wrapping_add(i as u64) % 251) as u8)
        .collect();
    let started = Instant::now();
    let mut stream = sender.open(hc).await?;
    let open = ms(started.elapsed());
    stream.write_all(&payload).await?;
    stream.shutdown().await?;
    let mut back = Vec::with_capacity(len);
    tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut back))
        .await
        .context("no echo within 10 s")??;
    ensure!(
        back == payload,
        "the echo differs: {} bytes back of {len}",
        back.len()
    );
    Ok(open)
}

/// p50, p99 and max of a sample, in ms.
#[derive(Debug, Default, serde::Serialize)]
struct Summary {
    count: usize,
    p50: f64,
    p99: f64,
    max: f64,
}

impl Summary {
    fn of(sample: &[f64]) -> Summary {
        if sample.is_empty() {
            return Summary::default();
        }
        let mut sorted = sample.to_vec();
        sorted.sort_by(f64::total_cmp);
        let at =
            |q: f64| sorted[((sorted.len() as f64 * q).ceil() as usize).clamp(1, sorted.len()) - 1];
        Summary {
            count: sorted.len(),
            p50: at(0.50),
            p99: at(0.99),
            max: sorted[sorted.len() - 1],
        }
    }
}

#[derive(Debug, serde::Serialize)]
struct EtcdReport {
    create_writes: EtcdWrites,
    create_secs: f64,
    idle_writes: EtcdWrites,
    idle_secs: f64,
    attach_writes: EtcdWrites,
    attach_secs: f64,
    rotation_writes: EtcdWrites,
}

#[derive(Debug, serde::Serialize)]
struct Report {
    plan: Plan,
    machine: serde_json::Value,
    when_unix: u64,
    hybridlink: String,
    attach_ms: Summary,
    attach_secs: f64,
    sender_attach_ms: Summary,
    rejoin_ms: Summary,
    leave_ms: f64,
    regenerate_api_ms: Summary,
    detach_same_node_ms: Summary,
    detach_other_nodes_ms: Summary,
    old_key_refused: usize,
    etcd: EtcdReport,
    rss_before_kib: Vec<u64>,
    rss_after_kib: Vec<u64>,
    sessions_per_node: Vec<usize>,
    rss_per_session_kib: f64,
    streams_one_node: StreamResult,
    streams_three_nodes: StreamResult,
}

impl Report {
    fn markdown(&self) -> String {
        let p = &self.plan;
        let e = &self.etcd;
        let per_sec = |w: &EtcdWrites, secs: f64| w.committed / secs.max(f64::EPSILON);
        let ms = |s: &Summary| format!("{:.1} / {:.1} (n = {})", s.p50, s.p99, s.count);
        let mut md = String::new();
        md.push_str("# Relay cluster simulation\n\n");
        md.push_str(&format!(
            "Machine: {}. Run: {} (unix {}), `{}`.\n\n",
            self.machine["summary"].as_str().unwrap_or("?"),
            if p.smoke { "--smoke" } else { "full" },
            self.when_unix,
            self.hybridlink
        ));
        md.push_str(&format!(
            "One etcd, {} relay nodes on loopback; {} hybrid connections x {} simulated agents = {} agents, each with a control channel to every node ({} channels); {} simulated senders, each on one node; {} listen keys regenerated; {:.0} % of the agents left and rejoined. Reproduce: `cluster-sim{}` (README, \"Benchmarks\").\n\n",
            p.nodes,
            p.hcs,
            p.agents_per_hc,
            p.agents,
            p.agents * p.nodes,
            p.senders,
            p.rotations,
            p.churn_fraction * 100.0,
            if p.smoke { " --smoke" } else { "" }
        ));
        md.push_str("| measure | value |\n| --- | --- |\n");
        md.push_str(&format!(
            "| agent attach, dial to `Attached`, ms p50 / p99 | {} |\n",
            ms(&self.attach_ms)
        ));
        md.push_str(&format!(
            "| all agents and senders attached in | {:.1} s |\n",
            self.attach_secs
        ));
        md.push_str(&format!(
            "| sender attach, ms p50 / p99 | {} |\n",
            ms(&self.sender_attach_ms)
        ));
        md.push_str(&format!(
            "| agent re-attach (after leaving, after a key change), ms p50 / p99 | {} |\n",
            ms(&self.rejoin_ms)
        ));
        md.push_str(&format!(
            "| departed agents gone from every node's status | {:.0} ms |\n",
            self.leave_ms
        ));
        md.push_str(&format!(
            "| key regenerate, API answer on node A, ms p50 / p99 | {} |\n",
            ms(&self.regenerate_api_ms)
        ));
        md.push_str(&format!(
            "| regenerated key → agents detached on node A, ms p50 / p99 | {} |\n",
            ms(&self.detach_same_node_ms)
        ));
        md.push_str(&format!(
            "| **watch propagation**: regenerated on A → agents detached on B and C, ms p50 / p99 | {} |\n",
            ms(&self.detach_other_nodes_ms)
        ));
        md.push_str(&format!(
            "| old key refused on another node afterwards | {} of {} |\n",
            self.old_key_refused, p.rotations
        ));
        md.push_str(&format!(
            "| etcd writes (Raft proposals committed) per hybrid connection created | {:.2} |\n",
            e.create_writes.committed / p.hcs as f64
        ));
        md.push_str(&format!(
            "| etcd database growth per hybrid connection created | {:.0} bytes |\n",
            e.create_writes.db_bytes / p.hcs as f64
        ));
        md.push_str(&format!(
            "| etcd writes per key regenerated | {:.2} |\n",
            e.rotation_writes.committed / p.rotations.max(1) as f64
        ));
        md.push_str(&format!(
            "| etcd writes/s, idle cluster ({} nodes' leases) | {:.2} |\n",
            p.nodes,
            per_sec(&e.idle_writes, e.idle_secs)
        ));
        md.push_str(&format!(
            "| etcd writes/s while {} channels attached | {:.2} ({} writes in {:.1} s) |\n",
            p.agents * p.nodes + p.senders,
            per_sec(&e.attach_writes, e.attach_secs),
            e.attach_writes.committed,
            e.attach_secs
        ));
        md.push_str(&format!(
            "| relay RSS before → after, MiB per node | {} |\n",
            self.rss_before_kib
                .iter()
                .zip(&self.rss_after_kib)
                .map(|(b, a)| format!("{:.1} → {:.1}", *b as f64 / 1024.0, *a as f64 / 1024.0))
                .collect::<Vec<_>>()
                .join(", ")
        ));
        md.push_str(&format!(
            "| **relay memory per session** (RSS growth / control channels, {} per node) | {:.1} KiB |\n",
            self.sessions_per_node
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join(", "),
            self.rss_per_session_kib
        ));
        md.push('\n');
        md.push_str(&self.row_section());
        md
    }

    /// The benchmark's cluster row.
    fn row_section(&self) -> String {
        let (one, three) = (&self.streams_one_node, &self.streams_three_nodes);
        let p = &self.plan;
        format!(
            "## Relay cluster: new connections per second, one node vs three\n\n\
             A real `hybridlink agent` attached on all three nodes, an echo target, {} senders with {} streams each at a time, {} bytes out and back per stream, checked; all senders on node 1, then one sender per node, in the same run ({} x {} s each).\n\n\
             | senders | new streams/s | open ms p50 / p99 | failed |\n| --- | --- | --- | --- |\n\
             | all on node 1 | {:.0} | {:.2} / {:.2} | {} |\n\
             | spread over 3 nodes | {:.0} ({:.2}x) | {:.2} / {:.2} | {} |\n",
            p.stream_senders,
            p.stream_workers_per_sender,
            p.stream_bytes,
            p.rate_rounds,
            p.rate_secs,
            one.per_sec,
            one.open_ms.p50,
            one.open_ms.p99,
            one.failed,
            three.per_sec,
            three.per_sec / one.per_sec.max(f64::EPSILON),
            three.open_ms.p50,
            three.open_ms.p99,
            three.failed
        )
    }
}

/// The machine, for the report: CPU model and count, memory, kernel.
fn machine() -> serde_json::Value {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .and_then(|l| l.split_once(':'))
        .map_or("unknown CPU".to_owned(), |(_, m)| m.trim().to_owned());
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    let mem_kib: u64 = std::fs::read_to_string("/proc/meminfo")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0);
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .unwrap_or_default()
        .trim()
        .to_owned();
    let load = std::fs::read_to_string("/proc/loadavg")
        .unwrap_or_default()
        .split_whitespace()
        .next()
        .unwrap_or("?")
        .to_owned();
    let build = if cfg!(debug_assertions) {
        "debug"
    } else {
        "release"
    };
    serde_json::json!({
        "load_average_1min_at_end": load,
        "cluster_sim_build": build,
        "cpu": model,
        "cpus": cpus,
        "memory_gib": mem_kib as f64 / 1024.0 / 1024.0,
        "kernel": kernel,
        "summary": format!(
            "{cpus} x {model}, {:.0} GiB, Linux {kernel}; load average {load} (1 min, at the end); cluster-sim built {build}",
            mem_kib as f64 / 1024.0 / 1024.0
        ),
    })
}
