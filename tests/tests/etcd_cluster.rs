//! Three relay nodes on a real three-member etcd cluster, the real binary
//! on loopback, no namespaces: a hybrid connection made through node 1 is
//! served through node 3; a key regenerated through node 2 is refused by
//! all three within a second; when etcd's leader is killed (SIGKILL),
//! streams go on and changes made meanwhile are taken at the first try
//! (they wait out the election); when every member is down,
//! streams go on, changes are refused with a clear 503 and the nodes say
//! so, and once the members are back changes are taken and reach every
//! node; two changes of one hybrid connection at once through two nodes
//! are both answered and lose nothing.

use std::process::Command;
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use hybridlink_tests::cluster::{api_request, copy_certificate, nodes_of, registry_health};
use hybridlink_tests::etcd::EtcdCluster;
use hybridlink_tests::{Agent, OpenStream, Relay, binary, echo_server_thread, wait_for};
use proto::connection_string::ConnectionString;

/// How soon every node must refuse a regenerated key.
const REFUSED_WITHIN: Duration = Duration::from_secs(1);

/// Three relay nodes on `etcd`, with one certificate, each listing the
/// three.
struct Nodes {
    nodes: [Arc<Relay>; 3],
    _dirs: [tempfile::TempDir; 3],
}

impl Nodes {
    fn start(etcd: &EtcdCluster) -> Result<Nodes> {
        let url = etcd.url();
        let registry = ["--registry", url.as_str()];
        let dirs = [
            tempfile::tempdir()?,
            tempfile::tempdir()?,
            tempfile::tempdir()?,
        ];
        let node1 = Relay::start_with(dirs[0].path(), "127.0.0.1:0", &registry)?;
        copy_certificate(dirs[0].path(), dirs[1].path())?;
        copy_certificate(dirs[0].path(), dirs[2].path())?;
        let node2 = Relay::start_with(dirs[1].path(), "127.0.0.1:0", &registry)?;
        let node3 = Relay::start_with(dirs[2].path(), "127.0.0.1:0", &registry)?;
        let nodes = [node1, node2, node3].map(Arc::new);
        let mut all: Vec<String> = nodes.iter().map(|n| n.listen.to_string()).collect();
        all.sort();
        for relay in &nodes {
            wait_for("every node listing the three", 10, || {
                Ok(nodes_of(relay)? == all)
            })?;
        }
        Ok(Nodes { nodes, _dirs: dirs })
    }

    /// Makes `payroll` through node 1, to an echo server, with an agent
    /// given node 1's listen string attached on every node; the send
    /// strings of the three nodes.
    fn payroll_with_agent(&self) -> Result<(Agent, [ConnectionString; 3])> {
        let (_, mut listen) = self.nodes[0].create_hc("payroll", echo_server_thread()?)?;
        // A name, as in a real string: the agent attaches on every listed
        // node at an address it resolves to.
        listen.relay_host = "localhost".into();
        let agent = Agent::start(&[&listen], &[])?;
        agent.wait_connected()?;
        for relay in &self.nodes {
            wait_for("the agent attached on every node", 10, || {
                Ok(listeners(relay)? == 1)
            })?;
        }
        let mut sends = Vec::new();
        for relay in &self.nodes {
            sends.push(relay.strings("payroll")?.0);
        }
        let sends: [ConnectionString; 3] = sends
            .try_into()
            .map_err(|_| anyhow::anyhow!("three strings"))?;
        Ok((agent, sends))
    }
}

fn listeners(relay: &Relay) -> Result<u64> {
    relay.hc(&["status", "payroll"])?["listener_count"]
        .as_u64()
        .context("listener_count")
}

/// A stream through `cs` carries a few lines, each echoed whole.
fn stream_works(cs: &ConnectionString, what: &str) -> Result<()> {
    let mut stream = OpenStream::open(cs)?;
    for i in 0..3 {
        let line = format!("{what} {i} {}\n", "x".repeat(1000));
        ensure!(
            stream.echo(&line)? == line,
            "{what}: line {i} came back wrong"
        );
    }
    stream.close();
    Ok(())
}

/// `hybridlink connect --check` for `cs`: `Ok(())` or its stderr.
fn check(cs: &ConnectionString) -> Result<std::result::Result<(), String>> {
    let out = Command::new(binary())
        .args(["connect", "--check", "--wait", "5", &cs.to_string()])
        .output()?;
    Ok(if out.status.success() {
        Ok(())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    })
}

/// The port and the four keys of `payroll`, as `node` has them.
fn record(node: &Relay) -> Result<(serde_json::Value, Vec<String>)> {
    let port = node.hc(&["show", "payroll"])?["port"].clone();
    let keys = node.hc(&["keys", "payroll"])?;
    let mut all = Vec::new();
    for rule in ["send", "listen"] {
        for slot in ["primary", "secondary"] {
            let cs = keys["connection_strings"][rule][slot]
                .as_str()
                .with_context(|| format!("no {rule}.{slot} in {keys}"))?;
            let cs: ConnectionString = cs.parse().map_err(|e| anyhow::anyhow!("{e}"))?;
            all.push(cs.key.as_str().to_owned());
        }
    }
    Ok((port, all))
}

#[test]
fn an_hc_made_through_node_1_is_served_through_node_3_and_a_key_regenerated_through_node_2_is_refused_by_all_three_within_a_second()
-> Result<()> {
    let Some(etcd) = EtcdCluster::start()? else {
        return Ok(());
    };
    let cluster = Nodes::start(&etcd)?;
    let [_, node2, node3] = &cluster.nodes;
    let (_agent, sends) = cluster.payroll_with_agent()?;
    ensure!(sends[2].relay_port == node3.listen.port());
    stream_works(&sends[2], "through node 3")?;

    // The old send key works through every node, so that a refusal below
    // is the regeneration's doing.
    for (i, cs) in sends.iter().enumerate() {
        if let Err(err) = check(cs)? {
            bail!("node {}: the send key before regenerating: {err}", i + 1);
        }
    }
    node2.hc(&[
        "regenerate",
        "payroll",
        "--rule",
        "send",
        "--key",
        "primary",
    ])?;
    let regenerated = Instant::now();
    let mut refused = [false; 3];
    while !refused.iter().all(|r| *r) {
        for (i, cs) in sends.iter().enumerate() {
            if !refused[i] {
                refused[i] = check(cs)?.is_err_and(|e| e.contains("was regenerated"));
            }
        }
        if regenerated.elapsed() > REFUSED_WITHIN {
            bail!(
                "{:?} after regenerating through node 2, the old key is still taken (refused by node 1, 2, 3: {refused:?})",
                regenerated.elapsed()
            );
        }
    }
    eprintln!(
        "all three nodes refused the old send key {} ms after the regeneration through node 2",
        regenerated.elapsed().as_millis()
    );

    // The listen key, regenerated through node 2: every node detaches the
    // agent holding the old one within a second.
    node2.hc(&[
        "regenerate",
        "payroll",
        "--rule",
        "listen",
        "--key",
        "primary",
    ])?;
    let regenerated = Instant::now();
    for relay in &cluster.nodes {
        wait_for("every node detaching the agent with the old key", 1, || {
            Ok(listeners(relay)? == 0)
        })?;
    }
    eprintln!(
        "all three nodes detached the agent {} ms after the regeneration through node 2",
        regenerated.elapsed().as_millis()
    );
    ensure!(regenerated.elapsed() <= REFUSED_WITHIN + Duration::from_millis(100));
    Ok(())
}

#[test]
fn when_etcds_leader_is_killed_streams_go_on_and_changes_are_still_taken() -> Result<()> {
    let Some(mut etcd) = EtcdCluster::start()? else {
        return Ok(());
    };
    let cluster = Nodes::start(&etcd)?;
    let [node1, _, node3] = &cluster.nodes;
    let (_agent, sends) = cluster.payroll_with_agent()?;
    let mut held = OpenStream::open(&sends[2])?;
    ensure!(held.echo("before\n")? == "before\n");

    let leader = etcd.leader()?;
    etcd.kill(leader);
    let killed = Instant::now();
    eprintln!("killed etcd member {leader}, the leader");

    ensure!(
        !held.ended() && held.echo("after\n")? == "after\n",
        "the open stream was cut when etcd's leader died"
    );
    for cs in &sends {
        stream_works(cs, "opened after the leader died")?;
    }
    // Changes right after the kill, through every node, come while the two
    // left elect a leader and while each node's watch moves to a member
    // that lives: each waits for that and is taken at the first try. The
    // updates through nodes 2 and 3 may come before their watch brought
    // the create through node 1: a change starts from etcd's record, not
    // from the node's memory.
    node1
        .hc(&["create", "billing", "--host", "198.18.7.2", "--port", "80"])
        .context("a change through node 1 right after etcd's leader died")?;
    eprintln!(
        "the first change after the leader died was taken {} ms after it",
        killed.elapsed().as_millis()
    );
    for (i, through) in cluster.nodes.iter().enumerate().skip(1) {
        through
            .hc(&["update", "billing", "--port", &(90 + i).to_string()])
            .with_context(|| format!("a change through node {} after etcd's leader died", i + 1))?;
    }
    for relay in &cluster.nodes {
        wait_for("every node seeing the new HC", 5, || {
            Ok(relay.hc(&["show", "billing"]).is_ok())
        })?;
    }
    // From then on, with a member still dead, every change is taken at the
    // first try, through any node (the client spreads requests over the
    // three members, the dead one included), and reaches the others.
    for i in 0..15u16 {
        let through = &cluster.nodes[usize::from(i) % 3];
        let port = (1100 + i).to_string();
        through
            .hc(&["update", "payroll", "--port", &port])
            .with_context(|| format!("change {i} with one etcd member dead"))?;
    }
    for relay in &cluster.nodes {
        wait_for("every node seeing the last change", 2, || {
            Ok(relay.hc(&["show", "payroll"])?["port"] == 1114)
        })?;
        ensure!(registry_health(relay)?["writable"] == true);
    }
    ensure!(held.echo("still\n")? == "still\n");

    // The member back: it catches up, and the cluster takes changes.
    etcd.start_member(leader)?;
    node1.hc(&["update", "billing", "--port", "82"])?;
    wait_for("node 3 seeing it", 2, || {
        Ok(node3.hc(&["show", "billing"])?["port"] == 82)
    })?;
    held.close();
    Ok(())
}

#[test]
fn with_every_etcd_member_down_streams_go_on_changes_are_refused_and_taken_again_after()
-> Result<()> {
    let Some(mut etcd) = EtcdCluster::start()? else {
        return Ok(());
    };
    let cluster = Nodes::start(&etcd)?;
    let [node1, node2, node3] = &cluster.nodes;
    let (_agent, sends) = cluster.payroll_with_agent()?;
    let mut held = OpenStream::open(&sends[0])?;
    ensure!(held.echo("before\n")? == "before\n");

    etcd.stop_all();
    for relay in &cluster.nodes {
        wait_for("every node noticing etcd is down", 10, || {
            Ok(registry_health(relay)?["writable"] == false)
        })?;
        let health = registry_health(relay)?;
        ensure!(
            health["store"] == "etcd" && health["error"].as_str().is_some_and(|e| !e.is_empty()),
            "{health}"
        );
    }
    ensure!(
        !held.ended() && held.echo("during\n")? == "during\n",
        "the open stream was cut when etcd went down"
    );
    for cs in &sends {
        stream_works(cs, "opened while etcd is down")?;
    }
    // A change through the API: refused with 503, saying why, once the
    // relay has given etcd the few seconds an election takes.
    let asked = Instant::now();
    let (status, body) = api_request(
        node2,
        "PATCH",
        "/api/v1/hcs/payroll",
        Some(&serde_json::json!({ "port": 1081 })),
    )?;
    ensure!(
        status.starts_with("HTTP/1.1 503"),
        "a change while etcd is down: {status} {body}"
    );
    let error = body["error"].as_str().unwrap_or_default();
    ensure!(
        error.contains("does not answer")
            && error.contains(
                "keeps serving the registry it knows but refuses changes until etcd answers again"
            ),
        "{body}"
    );
    ensure!(
        asked.elapsed() < Duration::from_secs(7),
        "the refusal took {:?}",
        asked.elapsed()
    );
    // `hc create` says the same, and at once now that etcd has been away
    // for longer than an election takes.
    let asked = Instant::now();
    let err = node3
        .hc(&["create", "billing", "--host", "198.18.7.2", "--port", "80"])
        .expect_err("a change while etcd is down");
    ensure!(format!("{err:#}").contains("refuses changes"), "{err:#}");
    ensure!(
        asked.elapsed() < Duration::from_millis(1500),
        "the second refusal took {:?}",
        asked.elapsed()
    );

    // Every member back, on its data: changes are taken again and reach
    // every node.
    etcd.start_all()?;
    let restarted = Instant::now();
    wait_for("a change through node 2 after etcd came back", 15, || {
        Ok(node2.hc(&["update", "payroll", "--port", "1082"]).is_ok())
    })?;
    eprintln!(
        "changes were taken again {} ms after etcd came back",
        restarted.elapsed().as_millis()
    );
    for relay in &cluster.nodes {
        wait_for("every node seeing the change", 10, || {
            Ok(relay.hc(&["show", "payroll"])?["port"] == 1082)
        })?;
        ensure!(registry_health(relay)?["writable"] == true);
    }
    node1.hc(&["create", "billing", "--host", "198.18.7.2", "--port", "80"])?;
    ensure!(held.echo("after\n")? == "after\n");
    held.close();
    Ok(())
}

#[test]
fn two_updates_of_one_hc_at_once_through_two_nodes_are_both_answered_and_lose_nothing() -> Result<()>
{
    let Some(etcd) = EtcdCluster::start()? else {
        return Ok(());
    };
    let cluster = Nodes::start(&etcd)?;
    let [node1, node2, node3] = &cluster.nodes;
    node1.hc(&["create", "payroll", "--host", "198.18.7.1", "--port", "1"])?;
    wait_for("every node seeing the new HC", 2, || {
        Ok(node2.hc(&["show", "payroll"]).is_ok() && node3.hc(&["show", "payroll"]).is_ok())
    })?;

    for round in 0..3u16 {
        let (_, keys_before) = record(node1)?;
        let barrier = Arc::new(Barrier::new(2));
        let update = |node: &Arc<Relay>, port: u16| {
            let node = Arc::clone(node);
            let barrier = Arc::clone(&barrier);
            std::thread::spawn(move || {
                let port = port.to_string();
                barrier.wait();
                node.hc(&["update", "payroll", "--port", &port])
            })
        };
        let (port1, port2) = (1000 + round * 2, 1001 + round * 2);
        let answers =
            [update(node1, port1), update(node2, port2)].map(|t| t.join().expect("the thread ran"));
        // The registry redoes a change that lost the race on the fresh
        // record; only one that keeps losing is refused, as a conflict.
        for answer in &answers {
            if let Err(e) = answer {
                ensure!(
                    format!("{e:#}").contains("was changed by other relays"),
                    "round {round}: {e:#}"
                );
            }
        }
        let taken: Vec<u16> = [port1, port2]
            .into_iter()
            .zip(&answers)
            .filter(|(_, a)| a.is_ok())
            .map(|(p, _)| p)
            .collect();
        ensure!(!taken.is_empty(), "round {round}: neither was taken");
        wait_for("every node agreeing", 2, || {
            let first = record(node1)?;
            Ok(record(node2)? == first && record(node3)? == first)
        })?;
        let (port, keys) = record(node3)?;
        ensure!(
            taken.iter().any(|p| port == *p),
            "round {round}: port {port}, not one taken of {taken:?}"
        );
        ensure!(
            keys == keys_before,
            "round {round}: the keys changed: {keys:?} != {keys_before:?}"
        );
        eprintln!("round {round}: taken {taken:?}, final port {port}");
    }
    Ok(())
}
