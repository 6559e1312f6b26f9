//! The processes of the simulation: one etcd and three `hybridlink relay
//! serve` nodes on loopback, killed when dropped; their management API,
//! etcd's write counters and the nodes' resident memory.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use proto::connection_string::ConnectionString;

/// A child process killed (SIGKILL) and reaped when dropped, so that a
/// failed run leaves nothing behind.
pub struct Owned(pub Child);

impl Drop for Owned {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A loopback port free right now, for a process that must be told its
/// address before it starts.
pub fn free_port() -> Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// One etcd member on loopback with its data in `dir`.
pub struct Etcd {
    _proc: Owned,
    /// The client address (`etcd://` this for `--registry`).
    pub client: SocketAddr,
    /// Plain HTTP `/health` and `/metrics`.
    metrics: SocketAddr,
}

impl Etcd {
    /// Starts `etcd` (Debian's etcd-server) and waits until it is healthy.
    pub fn start(dir: &Path, log: &Path) -> Result<Etcd> {
        let client: SocketAddr = format!("127.0.0.1:{}", free_port()?).parse()?;
        let peer = format!("http://127.0.0.1:{}", free_port()?);
        let metrics: SocketAddr = format!("127.0.0.1:{}", free_port()?).parse()?;
        let client_url = format!("http://{client}");
        let data = dir.join("etcd");
        let child = Command::new("etcd")
            .args(["--name", "sim", "--data-dir"])
            .arg(&data)
            .args(["--listen-client-urls", &client_url])
            .args(["--advertise-client-urls", &client_url])
            .args(["--listen-peer-urls", &peer])
            .args(["--initial-advertise-peer-urls", &peer])
            .args(["--initial-cluster", &format!("sim={peer}")])
            .args(["--listen-metrics-urls", &format!("http://{metrics}")])
            .args(["--log-level", "error"])
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(log)?)
            .spawn()
            .context("starting etcd (apt-get install etcd-server)")?;
        let etcd = Etcd {
            _proc: Owned(child),
            client,
            metrics,
        };
        wait_until(Duration::from_secs(20), "etcd healthy", || {
            Ok(http_get(etcd.metrics, "/health")?.contains("\"health\":\"true\""))
        })?;
        Ok(etcd)
    }

    /// etcd's write counters now: Raft proposals committed (every write,
    /// lease grants and revokes included) and the MVCC puts, deletes and
    /// transactions; and the size of its database.
    pub fn writes(&self) -> Result<EtcdWrites> {
        let text = http_get(self.metrics, "/metrics")?;
        Ok(EtcdWrites {
            committed: metric(&text, "etcd_server_proposals_committed_total"),
            puts: metric(&text, "etcd_mvcc_put_total"),
            deletes: metric(&text, "etcd_mvcc_delete_total"),
            txns: metric(&text, "etcd_mvcc_txn_total"),
            db_bytes: metric(&text, "etcd_mvcc_db_total_size_in_use_in_bytes"),
        })
    }
}

/// Counters from etcd's `/metrics`.
#[derive(Clone, Copy, Debug, Default, serde::Serialize)]
pub struct EtcdWrites {
    pub committed: f64,
    pub puts: f64,
    pub deletes: f64,
    pub txns: f64,
    /// Not a counter: the size of etcd's database in use.
    pub db_bytes: f64,
}

impl EtcdWrites {
    /// What was written between `earlier` and this.
    pub fn since(&self, earlier: &EtcdWrites) -> EtcdWrites {
        EtcdWrites {
            committed: self.committed - earlier.committed,
            puts: self.puts - earlier.puts,
            deletes: self.deletes - earlier.deletes,
            txns: self.txns - earlier.txns,
            db_bytes: self.db_bytes - earlier.db_bytes,
        }
    }
}

/// The sum of a Prometheus counter over its label sets.
fn metric(text: &str, name: &str) -> f64 {
    text.lines()
        .filter(|l| {
            l.strip_prefix(name)
                .is_some_and(|rest| rest.starts_with(' ') || rest.starts_with('{'))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// A relay node.
pub struct Node {
    proc: Owned,
    /// Where peers dial it (its `--listen` and `--advertise`).
    pub listen: SocketAddr,
    /// Its management API.
    pub api: SocketAddr,
    manage_key: String,
    pub data_dir: PathBuf,
}

impl Node {
    /// Starts `relay serve` on `etcd`, its data in `dir` (which may hold the
    /// certificate of the first node), its log in `log`.
    pub fn start(bin: &Path, etcd: &Etcd, dir: &Path, log: &Path) -> Result<Node> {
        std::fs::create_dir_all(dir)?;
        let listen = format!("127.0.0.1:{}", free_port()?);
        let mut child = Command::new(bin)
            .args(["relay", "serve", "--data-dir"])
            .arg(dir)
            .args(["--listen", &listen, "--api", "127.0.0.1:0"])
            .args(["--registry", &format!("etcd://{}", etcd.client)])
            // Connection strings name `localhost`; every node is at one of
            // its addresses, as agents require of a listed node.
            .args(["--public-host", "localhost", "--advertise", &listen])
            .env("RUST_LOG", "warn")
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(log)?)
            .spawn()
            .with_context(|| format!("starting {}", bin.display()))?;
        let stdout = child.stdout.take().context("relay stdout")?;
        let proc = Owned(child);
        let mut line = String::new();
        BufReader::new(stdout)
            .read_line(&mut line)
            .context("reading the relay's ready line")?;
        let ready: serde_json::Value = serde_json::from_str(&line)
            .with_context(|| format!("relay ready line {line:?}; see {}", log.display()))?;
        let api = ready["api"]
            .as_str()
            .context("api in the ready line")?
            .parse()?;
        let manage_key = std::fs::read_to_string(dir.join("manage.key"))?
            .trim()
            .to_owned();
        Ok(Node {
            proc,
            listen: listen.parse()?,
            api,
            manage_key,
            data_dir: dir.to_owned(),
        })
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.proc.0.id()
    }

    /// Resident memory of the node now, in KiB.
    pub fn rss_kib(&self) -> u64 {
        std::fs::read_to_string(format!("/proc/{}/status", self.pid()))
            .unwrap_or_default()
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or(0)
    }

    /// The node list this node serves (`GET /api/v1/nodes`).
    pub fn nodes(&self) -> Result<Vec<String>> {
        let body = self.api_call("GET", "/api/v1/nodes", None)?;
        Ok(body["nodes"]
            .as_array()
            .context("a node list")?
            .iter()
            .filter_map(|n| n.as_str().map(str::to_owned))
            .collect())
    }

    /// Creates a hybrid connection to `endpoint`; its primary (send,
    /// listen) strings.
    pub fn create_hc(
        &self,
        name: &str,
        endpoint: SocketAddr,
    ) -> Result<(ConnectionString, ConnectionString)> {
        let body = serde_json::json!({
            "name": name, "host": endpoint.ip().to_string(), "port": endpoint.port()
        });
        let hc = self.api_call("POST", "/api/v1/hcs", Some(&body))?;
        primary_strings(&hc)
    }

    /// Regenerates the primary listen key of `name`; the new (send, listen)
    /// strings.
    pub fn regenerate_listen(&self, name: &str) -> Result<(ConnectionString, ConnectionString)> {
        let body = serde_json::json!({ "rule": "listen", "key": "primary" });
        let keys = self.api_call(
            "POST",
            &format!("/api/v1/hcs/{name}/keys/regenerate"),
            Some(&body),
        )?;
        primary_strings(&keys)
    }

    /// The number of agents `name` has on this node.
    pub fn agents(&self, name: &str) -> Result<u64> {
        let status = self.api_call("GET", &format!("/api/v1/hcs/{name}/status"), None)?;
        status["listener_count"]
            .as_u64()
            .with_context(|| format!("listener_count in {status}"))
    }

    fn api_call(
        &self,
        method: &str,
        path: &str,
        body: Option<&serde_json::Value>,
    ) -> Result<serde_json::Value> {
        let body = body.map(|b| b.to_string()).unwrap_or_default();
        let mut conn = TcpStream::connect(self.api)?;
        conn.set_read_timeout(Some(Duration::from_secs(10)))?;
        write!(
            conn,
            "{method} {path} HTTP/1.1\r\nHost: {}\r\nAuthorization: Bearer {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            self.api,
            self.manage_key,
            body.len()
        )?;
        let mut answer = String::new();
        conn.read_to_string(&mut answer)?;
        let (head, body) = answer.split_once("\r\n\r\n").context("an HTTP answer")?;
        ensure!(head.starts_with("HTTP/1.1 20"), "{method} {path}: {answer}");
        serde_json::from_str(body).with_context(|| format!("{method} {path}: {answer}"))
    }
}

fn primary_strings(body: &serde_json::Value) -> Result<(ConnectionString, ConnectionString)> {
    let find = |rule: &str| -> Result<ConnectionString> {
        body["connection_strings"][rule]["primary"]
            .as_str()
            .with_context(|| format!("no {rule}.primary in {body}"))?
            .parse()
            .map_err(|e| anyhow::anyhow!("{e}"))
    };
    Ok((find("send")?, find("listen")?))
}

/// Three nodes on one etcd presenting one certificate, each listing all
/// three.
pub struct Cluster {
    pub nodes: Vec<Node>,
    pub etcd: Etcd,
}

impl Cluster {
    pub fn start(bin: &Path, dir: &Path) -> Result<Cluster> {
        let etcd = Etcd::start(dir, &dir.join("etcd.log"))?;
        let mut nodes = Vec::new();
        for i in 1..=3 {
            let data = dir.join(format!("node{i}"));
            if let Some(first) = nodes.first() {
                let first: &Node = first;
                std::fs::create_dir_all(&data)?;
                for file in ["cert.pem", "key.pem"] {
                    std::fs::copy(first.data_dir.join(file), data.join(file))
                        .with_context(|| format!("copying {file} from node 1"))?;
                }
            }
            nodes.push(Node::start(
                bin,
                &etcd,
                &data,
                &dir.join(format!("node{i}.log")),
            )?);
        }
        let mut all: Vec<String> = nodes.iter().map(|n| n.listen.to_string()).collect();
        all.sort();
        for node in &nodes {
            wait_until(
                Duration::from_secs(15),
                "every node listing the three",
                || {
                    let mut listed = node.nodes()?;
                    listed.sort();
                    Ok(listed == all)
                },
            )?;
        }
        Ok(Cluster { nodes, etcd })
    }
}

/// Retries `check` every 50 ms until it says yes or `limit` passes.
pub fn wait_until(
    limit: Duration,
    what: &str,
    mut check: impl FnMut() -> Result<bool>,
) -> Result<()> {
    let deadline = Instant::now() + limit;
    loop {
        let outcome = check();
        if matches!(outcome, Ok(true)) {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("no {what} within {limit:?} (last: {outcome:?})");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// `GET path` over plain HTTP/1.0; the body.
fn http_get(addr: SocketAddr, path: &str) -> Result<String> {
    let mut conn = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    conn.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(conn, "GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n")?;
    let mut answer = String::new();
    conn.read_to_string(&mut answer)?;
    Ok(answer
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_counter_is_summed_over_its_label_sets() {
        let text = "# HELP etcd_mvcc_put_total x\n\
                    etcd_mvcc_put_total 7\n\
                    etcd_mvcc_put_total_other 100\n\
                    etcd_server_proposals_committed_total{a=\"1\"} 2\n\
                    etcd_server_proposals_committed_total{a=\"2\"} 3.5\n";
        assert_eq!(metric(text, "etcd_mvcc_put_total"), 7.0);
        assert_eq!(metric(text, "etcd_server_proposals_committed_total"), 5.5);
        assert_eq!(metric(text, "etcd_mvcc_txn_total"), 0.0);
    }
}
