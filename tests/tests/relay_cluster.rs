//! Three relay nodes on one etcd, with the same certificate, the real
//! binary on loopback: every node lists the three, and a killed node
//! (SIGKILL) leaves the list within its lease.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use hybridlink_tests::etcd::Etcd;
use hybridlink_tests::{Relay, wait_for};

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

/// Gives `dir` the certificate and key of `from`: how an operator makes
/// every node present the one certificate connection strings pin.
fn copy_certificate(from: &Path, dir: &Path) -> Result<()> {
    for file in [relay::identity::CERT_FILE, relay::identity::KEY_FILE] {
        std::fs::copy(from.join(file), dir.join(file))
            .with_context(|| format!("copying {file}"))?;
    }
    Ok(())
}

/// `GET /api/v1/nodes` of `relay`, with its manage key.
fn nodes_of(relay: &Relay) -> Result<Vec<String>> {
    let key = std::fs::read_to_string(relay.data_dir.join("manage.key"))?;
    let mut conn = TcpStream::connect(relay.api)?;
    conn.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(
        conn,
        "GET /api/v1/nodes HTTP/1.1\r\nHost: {}\r\nAuthorization: Bearer {}\r\nConnection: close\r\n\r\n",
        relay.api,
        key.trim()
    )?;
    let mut answer = String::new();
    conn.read_to_string(&mut answer)?;
    let (head, body) = answer.split_once("\r\n\r\n").context("an HTTP answer")?;
    ensure!(head.starts_with("HTTP/1.1 200"), "{answer}");
    let body: serde_json::Value = serde_json::from_str(body).with_context(|| answer.clone())?;
    let nodes = body["nodes"].as_array().context("a node list")?;
    Ok(nodes
        .iter()
        .filter_map(|n| n.as_str().map(str::to_owned))
        .collect())
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
