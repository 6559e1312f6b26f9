//! Three relay nodes on one etcd, with the same certificate, the real
//! binary on loopback: every node lists the three; an agent given a listen
//! string naming node 1 attaches on all three; a sender through node 3
//! reaches the target; when node 3 is killed (SIGKILL) the sender's next
//! connection succeeds through another node within 5 s, a stream carried
//! by node 2 sees no error, and node 3 leaves the list within its lease.
//! Asked of node 1, status shows the agents and pipes of every node,
//! labelled with their node; a node stopped with SIGTERM leaves at once; a
//! node with another certificate is named as such.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use hybridlink_tests::cluster::{self, copy_certificate, nodes_of};
use hybridlink_tests::etcd::Etcd;
use hybridlink_tests::{OpenStream, Proc, Relay, echo_server_thread, wait_for};

/// How long a node stays listed after it dies (`relay::membership::NODE_TTL`),
/// and the slack allowed on top for etcd's lease check.
const NODE_TTL: Duration = relay::membership::NODE_TTL;
const LEASE_SLACK: Duration = Duration::from_secs(2);

/// A relay node on loopback whose registry is in `etcd`, with `extra` flags.
fn node(etcd: &Etcd, dir: &Path, listen: &str, extra: &[&str]) -> Result<Relay> {
    let url = etcd.url();
    let mut args = vec!["--registry", url.as_str()];
    args.extend_from_slice(extra);
    Relay::start_with(dir, listen, &args)
}

/// The state `relay` gives the node at `address` in `GET /api/v1/nodes`.
fn state_of(relay: &Relay, address: &str) -> Result<Option<String>> {
    let body = api_get(relay, "/api/v1/nodes")?;
    Ok(body["states"]
        .as_array()
        .context("node states")?
        .iter()
        .find(|n| n["address"] == address)
        .and_then(|n| n["state"].as_str().map(str::to_owned)))
}

/// `GET path` of `relay`'s API, with its manage key; the JSON answer of
/// a 200.
fn api_get(relay: &Relay, path: &str) -> Result<serde_json::Value> {
    let (status, body) = cluster::api_get(relay, path)?;
    ensure!(status.starts_with("HTTP/1.1 200"), "{status} {body}");
    Ok(body)
}

/// The entry of node `node` in the `cluster` of `payroll`'s status as
/// `relay` answers it.
fn payroll_on(relay: &Relay, node: &str) -> Result<Option<serde_json::Value>> {
    let status = api_get(relay, "/api/v1/hcs/payroll/status")?;
    Ok(status["cluster"]
        .as_array()
        .context("a cluster list in the status")?
        .iter()
        .find(|n| n["node"] == node)
        .cloned())
}

/// `hybridlink hc ARGS...` of `relay` as a person reads it.
fn hc_text(relay: &Relay, args: &[&str]) -> Result<String> {
    let out = relay.hc_command()?.args(args).output()?;
    ensure!(
        out.status.success(),
        "hc {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8(out.stdout)?)
}

fn listeners(relay: &Relay) -> Result<u64> {
    relay.hc(&["status", "payroll"])?["listener_count"]
        .as_u64()
        .context("listener_count")
}

/// One connection through `hybridlink forward` at `local`: sends `text`,
/// half-closes, returns what came back.
fn through_forward(local: SocketAddr, text: &str) -> Result<String> {
    let mut conn = TcpStream::connect(local)?;
    conn.set_read_timeout(Some(Duration::from_secs(5)))?;
    conn.write_all(text.as_bytes())?;
    conn.shutdown(std::net::Shutdown::Write)?;
    let mut back = String::new();
    conn.read_to_string(&mut back)?;
    Ok(back)
}

/// A port free right now on loopback, for a node that must know its own
/// address before it starts.
fn free_port() -> Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// Three nodes on `etcd` with node 1's certificate; node 3 listens on a
/// port chosen first and says so with `--advertise`.
struct Cluster {
    nodes: [Relay; 3],
    /// Node 3's address, as it advertises it.
    advertise3: String,
    _dirs: [tempfile::TempDir; 3],
}

impl Cluster {
    fn start(etcd: &Etcd) -> Result<Cluster> {
        let dirs = [
            tempfile::tempdir()?,
            tempfile::tempdir()?,
            tempfile::tempdir()?,
        ];
        let node1 = node(etcd, dirs[0].path(), "127.0.0.1:0", &[])?;
        copy_certificate(dirs[0].path(), dirs[1].path())?;
        copy_certificate(dirs[0].path(), dirs[2].path())?;
        let node2 = node(etcd, dirs[1].path(), "127.0.0.1:0", &[])?;
        let advertise3 = format!("127.0.0.1:{}", free_port()?);
        let node3 = node(
            etcd,
            dirs[2].path(),
            &advertise3,
            &["--advertise", &advertise3],
        )?;
        ensure!(
            node1.ready["cert_sha256"] == node2.ready["cert_sha256"]
                && node1.ready["cert_sha256"] == node3.ready["cert_sha256"],
            "one certificate on every node: {} {} {}",
            node1.ready,
            node2.ready,
            node3.ready
        );
        let cluster = Cluster {
            nodes: [node1, node2, node3],
            advertise3,
            _dirs: dirs,
        };
        let all = cluster.addresses(&[0, 1, 2]);
        for relay in &cluster.nodes {
            wait_for("every node listing the three", 10, || {
                Ok(nodes_of(relay)? == all)
            })?;
        }
        Ok(cluster)
    }

    /// The sorted addresses of these nodes.
    fn addresses(&self, which: &[usize]) -> Vec<String> {
        let mut list: Vec<String> = which
            .iter()
            .map(|&i| match i {
                2 => self.advertise3.clone(),
                i => self.nodes[i].listen.to_string(),
            })
            .collect();
        list.sort();
        list
    }

    /// Waits for nodes 1 and 2 to list only themselves after node 3 was
    /// killed at `killed`, and fails if that took longer than the lease.
    fn wait_for_node3_to_leave(&self, killed: Instant) -> Result<()> {
        let left = self.addresses(&[0, 1]);
        let secs = (NODE_TTL + LEASE_SLACK).as_secs();
        for relay in &self.nodes[..2] {
            wait_for("node 3 leaving the list", secs, || {
                Ok(nodes_of(relay)? == left)
            })?;
        }
        eprintln!(
            "node 3 left the list {} ms after it died",
            killed.elapsed().as_millis()
        );
        ensure!(
            killed.elapsed() <= NODE_TTL + LEASE_SLACK,
            "node 3 was listed for {:?} after it died",
            killed.elapsed()
        );
        Ok(())
    }
}

#[test]
fn every_node_lists_the_others_and_a_killed_node_leaves_within_its_lease() -> Result<()> {
    let Some(etcd) = Etcd::start()? else {
        return Ok(());
    };
    let mut cluster = Cluster::start(&etcd)?;
    cluster.nodes[2].proc.kill();
    cluster.wait_for_node3_to_leave(Instant::now())
}

#[test]
fn every_node_serves_every_agent_and_a_sender_outlives_its_node() -> Result<()> {
    let Some(etcd) = Etcd::start()? else {
        return Ok(());
    };
    let mut cluster = Cluster::start(&etcd)?;
    let [node1, node2, node3] = &cluster.nodes;

    // An HC made on node 1; the agent is given node 1's listen string only,
    // naming it `localhost` as a string names a relay by a DNS name, and
    // attaches on all three, once on each.
    let (send1, mut listen1) = node1.create_hc("payroll", echo_server_thread()?)?;
    listen1.relay_host = "localhost".into();
    let agent = hybridlink_tests::Agent::start(&[&listen1], &[])?;
    agent.wait_connected()?;
    for relay in &cluster.nodes {
        wait_for("the agent attached on every node", 10, || {
            Ok(listeners(relay)? == 1)
        })?;
    }

    // Node 3's string differs from node 1's only by its port: one
    // certificate, one set of keys.
    let send3 = node3.strings("payroll")?.0;
    ensure!(send3.cert_sha256 == send1.cert_sha256 && send3.key == send1.key);
    ensure!(send3.relay_port == node3.listen.port());
    let send2 = node2.strings("payroll")?.0;

    // A sender through node 3 reaches the target.
    let mut forward = Proc::start(
        "forward",
        &["forward", "--listen", "127.0.0.1:0", &send3.to_string()],
    )?;
    let local: SocketAddr = forward.ready_line()?["listen"]
        .as_str()
        .context("listen")?
        .parse()?;
    ensure!(through_forward(local, "through node 3")? == "through node 3");

    // A stream through node 2, open while node 3 dies.
    let mut held = OpenStream::open(&send2)?;
    ensure!(held.echo("before\n")? == "before\n");

    cluster.nodes[2].proc.kill();
    let killed = Instant::now();
    let recovered = loop {
        match through_forward(local, "after node 3") {
            Ok(back) if back == "after node 3" => break killed.elapsed(),
            outcome => {
                if killed.elapsed() > Duration::from_secs(5) {
                    bail!("no connection through forward 5 s after its node died: {outcome:?}");
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    };
    eprintln!(
        "the sender's next connection succeeded {} ms after its node died",
        recovered.as_millis()
    );
    ensure!(
        !held.ended() && held.echo("after\n")? == "after\n",
        "the stream through node 2 was cut when node 3 died"
    );
    cluster.wait_for_node3_to_leave(killed)?;

    // The agent is still served by the two that are left.
    let [node1, node2, _] = &cluster.nodes;
    ensure!(listeners(node1)? == 1 && listeners(node2)? == 1);
    ensure!(through_forward(local, "still")? == "still");
    held.close();
    forward.kill();
    Ok(())
}

/// A relay lists the nodes, and a relay may be hostile: an agent attaches
/// only on listed nodes at an address the relay's name resolves to, so no
/// relay can make it dial elsewhere. Here a node listed at 127.0.0.2 (with
/// the one certificate, so only the address rule can refuse it) gets no
/// agent, while the node the string names does.
#[test]
fn an_agent_dials_no_listed_node_outside_the_addresses_of_the_relays_name() -> Result<()> {
    let Some(etcd) = Etcd::start()? else {
        return Ok(());
    };
    let (dir1, dir2) = (tempfile::tempdir()?, tempfile::tempdir()?);
    let node1 = node(&etcd, dir1.path(), "127.0.0.1:0", &[])?;
    copy_certificate(dir1.path(), dir2.path())?;
    let port = TcpListener::bind("127.0.0.2:0")?.local_addr()?.port();
    let elsewhere = format!("127.0.0.2:{port}");
    let node2 = node(&etcd, dir2.path(), &elsewhere, &["--advertise", &elsewhere])?;
    wait_for("node 1 listing the node at 127.0.0.2", 10, || {
        Ok(nodes_of(&node1)?.contains(&elsewhere))
    })?;

    let (_, mut listen) = node1.create_hc("payroll", echo_server_thread()?)?;
    // `localhost` resolves to 127.0.0.1 (and ::1), never to 127.0.0.2.
    listen.relay_host = "localhost".into();
    let agent = hybridlink_tests::Agent::start(&[&listen], &[])?;
    agent.wait_connected()?;
    wait_for("the agent on node 1", 10, || Ok(listeners(&node1)? == 1))?;
    // Long enough for a channel to the listed node to have attached.
    std::thread::sleep(Duration::from_secs(3));
    ensure!(
        listeners(&node2)? == 0,
        "the agent attached on a node the relay's name does not lead to"
    );
    Ok(())
}

/// Whether `hc status` text shows an agent labelled `on NODE` (the agents
/// are listed `..., ...` with their node last).
fn labels_an_agent_with(text: &str, node: &str) -> bool {
    let label = format!(" on {node}");
    text.lines()
        .flat_map(|line| line.split(", "))
        .any(|item| item.trim_end().ends_with(&label))
}

/// An agent and a sender's stream on node 3 are seen by asking node 1 (the
/// API, `hc status`, `hc show`), labelled node 3, and leave with node 3's
/// lease when it is killed.
#[test]
fn status_asked_of_one_node_shows_every_node_s_agents_and_streams() -> Result<()> {
    let Some(etcd) = Etcd::start()? else {
        return Ok(());
    };
    let mut cluster = Cluster::start(&etcd)?;
    let [node1, _, node3] = &cluster.nodes;
    let node3_at = cluster.advertise3.clone();
    let (_, listen1) = node1.create_hc("payroll", echo_server_thread()?)?;
    let agent = hybridlink_tests::Agent::start(&[&listen1], &[])?;
    agent.wait_connected()?;
    wait_for("the agent attached on node 3", 10, || {
        Ok(listeners(node3)? == 1)
    })?;
    let send3 = node3.strings("payroll")?.0;
    let mut held = OpenStream::open(&send3)?;
    ensure!(held.echo("through node 3\n")? == "through node 3\n");

    // Node 3 publishes within a second; node 1 shows it, labelled.
    wait_for("node 1 showing node 3's agent and pipe", 5, || {
        Ok(payroll_on(node1, &node3_at)?.is_some_and(|n| {
            n["listener_count"] == 1 && n["pipes"] == 1 && n["node_state"] == "up"
        }))
    })?;
    let all = api_get(node1, "/api/v1/status")?;
    ensure!(
        all[0]["node"] == node1.listen.to_string()
            && all[0]["cluster"].as_array().map(Vec::len) == Some(3),
        "every node in /api/v1/status of node 1: {all}"
    );
    let status = hc_text(node1, &["status", "payroll"])?;
    ensure!(
        labels_an_agent_with(&status, &node3_at) && status.contains("relay nodes:"),
        "hc status of node 1 does not show node 3's agent:\n{status}"
    );
    let show = hc_text(node1, &["show", "payroll"])?;
    ensure!(
        show.contains(&format!(
            "node:      {node3_at} (up): 1 agents, 1 senders, 1 pipes"
        )),
        "hc show of node 1 does not show node 3's pipe:\n{show}"
    );
    eprintln!("{status}\n{show}");
    // The agent's stream counters are its own, whichever node carried the
    // stream: summed over the cluster they count the one open stream once.
    let open_streams = || -> Result<u64> {
        let status = api_get(node1, "/api/v1/hcs/payroll/status")?;
        let open: u64 = status["cluster"]
            .as_array()
            .context("a cluster list in the status")?
            .iter()
            .filter_map(|n| n["streams"]["open"].as_u64())
            .sum();
        ensure!(open <= 1, "one open stream counted {open} times: {status}");
        Ok(open)
    };
    wait_for("the cluster counting the open stream", 10, || {
        Ok(open_streams()? == 1)
    })?;
    // Long enough for every node to have heard the agent's next report
    // (every 2 s) and published it (within 1 s).
    std::thread::sleep(Duration::from_millis(3500));
    ensure!(open_streams()? == 1, "the open stream is no longer counted");

    cluster.nodes[2].proc.kill();
    let killed = Instant::now();
    let node1 = &cluster.nodes[0];
    wait_for(
        "node 3's entries leaving node 1's status",
        (NODE_TTL + LEASE_SLACK).as_secs(),
        || Ok(payroll_on(node1, &node3_at)?.is_none()),
    )?;
    eprintln!(
        "node 3's entries left node 1's status {} ms after it died",
        killed.elapsed().as_millis()
    );
    ensure!(!labels_an_agent_with(
        &hc_text(node1, &["status", "payroll"])?,
        &node3_at
    ));
    held.close();
    Ok(())
}

/// A node stopped with SIGTERM revokes its lease: the others drop it
/// within a second, not after its lease.
#[test]
fn a_node_stopped_cleanly_leaves_the_list_within_a_second() -> Result<()> {
    let Some(etcd) = Etcd::start()? else {
        return Ok(());
    };
    let mut cluster = Cluster::start(&etcd)?;
    let stopped = Instant::now();
    cluster.nodes[2].proc.terminate();
    let left = cluster.addresses(&[0, 1]);
    for relay in &cluster.nodes[..2] {
        wait_for(
            "node 3 leaving the list",
            2,
            || Ok(nodes_of(relay)? == left),
        )?;
    }
    eprintln!(
        "node 3 left the list {} ms after SIGTERM",
        stopped.elapsed().as_millis()
    );
    ensure!(
        stopped.elapsed() <= Duration::from_secs(1),
        "node 3 was listed for {:?} after SIGTERM",
        stopped.elapsed()
    );
    Ok(())
}

/// A node started with another certificate than the others is named: node
/// 1 logs an error naming it, and its state says so.
#[test]
fn a_node_with_another_certificate_is_named_as_such() -> Result<()> {
    let Some(etcd) = Etcd::start()? else {
        return Ok(());
    };
    let logs = tempfile::tempdir()?;
    let log1 = logs.path().join("node1.log");
    let url = etcd.url();
    let node1 = Relay::start_with_log(&["--registry", &url], &log1)?;
    let dir2 = tempfile::tempdir()?;
    copy_certificate(&node1.data_dir, dir2.path())?;
    let node2 = node(&etcd, dir2.path(), "127.0.0.1:0", &[])?;
    // Its own data dir, so its own certificate.
    let other = Relay::start_with_log(&["--registry", &url], &logs.path().join("other.log"))?;
    ensure!(other.ready["cert_sha256"] != node1.ready["cert_sha256"]);
    let other_at = other.listen.to_string();
    let node2_at = node2.listen.to_string();
    wait_for(
        "node 1 naming the node with another certificate",
        10,
        || Ok(state_of(&node1, &other_at)?.as_deref() == Some("certificate_mismatch")),
    )?;
    ensure!(state_of(&node1, &node2_at)?.as_deref() == Some("up"));
    let log = std::fs::read_to_string(&log1)?;
    ensure!(
        log.contains(&format!(
            "relay node {other_at} presents another certificate than this node"
        )),
        "node 1's log does not name the node:\n{log}"
    );

    // An agent told of the node by node 1 is refused by its pin there: it
    // says so once, naming the node, and does not retry in a storm.
    let (_, listen1) = node1.create_hc("payroll", echo_server_thread()?)?;
    let agent_log = logs.path().join("agent.log");
    let socket = logs.path().join("agent.sock");
    let child = std::process::Command::new(hybridlink_tests::binary())
        .args(["agent", "run", "--status-socket"])
        .arg(&socket)
        .args(["--connection-string", &listen1.to_string()])
        // Every retry of the node shows, even the quiet ones.
        .env("RUST_LOG", "info,transport::control=debug")
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(&agent_log)?)
        .spawn()?;
    let _agent = Proc::adopt(child, "agent");
    wait_for("the agent on node 1 and node 2", 10, || {
        Ok(listeners(&node1)? == 1 && listeners(&node2)? == 1)
    })?;
    // Long enough for several retries at the usual reconnect backoff.
    std::thread::sleep(Duration::from_secs(6));
    ensure!(listeners(&other)? == 0);
    let log = std::fs::read_to_string(&agent_log)?;
    let refusals: Vec<&str> = log
        .lines()
        .filter(|l| l.contains(&other_at) && l.contains("certificate other than"))
        .collect();
    ensure!(
        refusals.len() == 1 && refusals[0].contains("wrong relay certificate"),
        "the agent should say once that {other_at} presents another certificate:\n{log}"
    );
    // The first retry of that node waits at least 5 s: in 6 s there is at
    // most one (the usual backoff would have made several).
    let retries = log
        .lines()
        .filter(|l| l.contains(&other_at) && l.contains("still presents another certificate"))
        .count();
    ensure!(
        retries <= 1,
        "the agent retried {other_at} {retries} times in 6 s:\n{log}"
    );
    Ok(())
}

/// The portal of node 1, in a real browser (`tests/portal/cluster.mjs`):
/// the detail view shows the three relay nodes, each up, and the agent
/// once per node, labelled with that node.
#[test]
fn the_portal_of_one_node_shows_every_node_and_their_agents() -> Result<()> {
    let chromium = std::env::var_os("CHROMIUM")
        .map_or_else(|| std::path::PathBuf::from("/usr/bin/chromium"), Into::into);
    let root = hybridlink_tests::repo_root();
    let script_dir = root.join("tests/portal");
    let tools = chromium.exists()
        && script_dir.join("node_modules/playwright-core").exists()
        && std::process::Command::new("node")
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success());
    if !tools {
        ensure!(
            std::env::var_os("HYBRIDLINK_REQUIRE_TOOLS").is_none(),
            "chromium, node or tests/portal/node_modules is missing (scripts/test-all installs them)"
        );
        eprintln!("SKIP: chromium, node or tests/portal/node_modules is missing");
        return Ok(());
    }
    let Some(etcd) = Etcd::start()? else {
        return Ok(());
    };
    let cluster = Cluster::start(&etcd)?;
    let node1 = &cluster.nodes[0];
    let (_, listen1) = node1.create_hc("payroll", echo_server_thread()?)?;
    let agent = hybridlink_tests::Agent::start(&[&listen1], &[])?;
    agent.wait_connected()?;
    for relay in &cluster.nodes {
        wait_for("the agent on every node", 10, || Ok(listeners(relay)? == 1))?;
    }
    let key = std::fs::read_to_string(node1.data_dir.join("manage.key"))?;
    let shots = std::env::var_os("CARGO_TARGET_DIR")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| root.join("target"))
        .join("portal-screenshots");
    let mut browser = std::process::Command::new("timeout")
        .args(["120", "node", "cluster.mjs"])
        .current_dir(&script_dir)
        .env("HYBRIDLINK_API", format!("http://{}", node1.api))
        .env("HYBRIDLINK_MANAGE_KEY", key.trim())
        .env("HYBRIDLINK_NODES", cluster.addresses(&[0, 1, 2]).join(","))
        .env("HYBRIDLINK_PORTAL_SCREENSHOTS", &shots)
        .spawn()
        .context("starting node")?;
    let status = browser.wait()?;
    ensure!(
        status.success(),
        "the browser found the cluster view wrong ({status}); its output is above"
    );
    Ok(())
}
