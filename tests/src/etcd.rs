//! A throwaway etcd for the tests: one member ([`Etcd`]) or a cluster of
//! three ([`EtcdCluster`]) on loopback, on ports the kernel picked, with
//! its data in a temporary directory; killed and removed when dropped, so a
//! failing test leaves neither a process nor a directory behind.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};

use crate::Proc;

/// Where Debian's `etcd-server` puts the server.
const ETCD: &str = "etcd";

/// A running etcd member.
#[derive(Debug)]
pub struct Etcd {
    // Dropped in this order: the process first, then its data.
    proc: Proc,
    client: SocketAddr,
    /// Plain HTTP `/health`, whether the client port speaks TLS or not.
    health: SocketAddr,
    args: Vec<String>,
    tls: Option<TlsFiles>,
    _dir: tempfile::TempDir,
}

/// The files of an etcd that speaks TLS and asks clients for certificates.
#[derive(Debug, Clone)]
pub struct TlsFiles {
    /// The CA that issued etcd's certificate and the client's.
    pub ca: PathBuf,
    /// A client certificate etcd accepts.
    pub client_cert: PathBuf,
    /// Its key.
    pub client_key: PathBuf,
}

impl Etcd {
    /// Starts etcd and waits until it answers. `None` (the caller skips)
    /// when etcd is not installed, unless HYBRIDLINK_REQUIRE_TOOLS is set,
    /// when that is an error.
    pub fn start() -> Result<Option<Etcd>> {
        Etcd::start_with(&[])
    }

    /// Starts etcd speaking TLS on its client port, asking clients for a
    /// certificate from its CA ([`Etcd::tls_files`]).
    pub fn start_tls() -> Result<Option<Etcd>> {
        if !installed()? {
            return Ok(None);
        }
        Etcd::try_start(&[], true).map(Some)
    }

    /// The CA and client certificate of an etcd from [`Etcd::start_tls`].
    pub fn tls_files(&self) -> Option<&TlsFiles> {
        self.tls.as_ref()
    }

    /// Starts etcd with more flags, as [`Etcd::start`] does.
    pub fn start_with(extra: &[&str]) -> Result<Option<Etcd>> {
        if !installed()? {
            return Ok(None);
        }
        // A port picked by the kernel may be taken again before etcd binds
        // it: try a few times.
        let mut last = None;
        for _ in 0..3 {
            match Etcd::try_start(extra, false) {
                Ok(etcd) => return Ok(Some(etcd)),
                Err(e) => last = Some(e),
            }
        }
        Err(last.expect("three tries were made"))
    }

    fn try_start(extra: &[&str], tls: bool) -> Result<Etcd> {
        let dir = tempfile::tempdir()?;
        let client = free_port()?;
        let peer = free_port()?;
        let health = free_port()?;
        let scheme = if tls { "https" } else { "http" };
        let client_url = format!("{scheme}://{client}");
        let health_url = format!("http://{health}");
        let peer_url = format!("http://{peer}");
        let data = dir.path().join("data");
        let data = data.to_str().context("utf-8 temp dir")?;
        let cluster = format!("test={peer_url}");
        let args: Vec<String> = [
            "--name",
            "test",
            "--data-dir",
            data,
            "--listen-client-urls",
            &client_url,
            "--advertise-client-urls",
            &client_url,
            "--listen-peer-urls",
            &peer_url,
            "--initial-advertise-peer-urls",
            &peer_url,
            "--initial-cluster",
            &cluster,
            "--listen-metrics-urls",
            &health_url,
            "--logger",
            "zap",
            "--log-level",
            "error",
        ]
        .into_iter()
        .chain(extra.iter().copied())
        .map(String::from)
        .collect();
        let mut args = args;
        let tls = if tls {
            let (files, server_cert, server_key) = issue(dir.path())?;
            for (flag, path) in [
                ("--cert-file", &server_cert),
                ("--key-file", &server_key),
                ("--trusted-ca-file", &files.ca),
            ] {
                args.push(flag.into());
                args.push(path.to_str().context("utf-8 temp dir")?.into());
            }
            args.push("--client-cert-auth".into());
            Some(files)
        } else {
            None
        };
        let proc = run(&args, health)?;
        Ok(Etcd {
            proc,
            client,
            health,
            args,
            tls,
            _dir: dir,
        })
    }

    /// Turns etcd's authentication on, with one user, `root`, whose
    /// password is `password` (through etcd's JSON gateway, so that no
    /// etcdctl is needed).
    pub fn enable_auth(&self, password: &str) -> Result<()> {
        let user = serde_json::json!({ "name": "root", "password": password });
        let steps = [
            ("/v3/auth/user/add", user),
            ("/v3/auth/role/add", serde_json::json!({ "name": "root" })),
            (
                "/v3/auth/user/grant",
                serde_json::json!({ "user": "root", "role": "root" }),
            ),
            ("/v3/auth/enable", serde_json::json!({})),
        ];
        for (path, body) in steps {
            let answer = post(self.client, path, &body.to_string())?;
            if !answer.starts_with("HTTP/1.0 200") && !answer.starts_with("HTTP/1.1 200") {
                bail!("etcd {path}: {answer}");
            }
        }
        Ok(())
    }

    /// Kills etcd (SIGKILL) and starts it again on the same ports with the
    /// same data.
    pub fn restart(&mut self) -> Result<()> {
        self.stop();
        // The ports may linger for a moment.
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            match run(&self.args, self.health) {
                Ok(proc) => {
                    self.proc = proc;
                    return Ok(());
                }
                Err(e) if Instant::now() < deadline => {
                    eprintln!("etcd restart: {e:#}; retrying");
                    std::thread::sleep(Duration::from_millis(200));
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Kills etcd (SIGKILL) and waits for it to end.
    pub fn stop(&mut self) {
        self.proc.kill();
    }

    /// What `relay serve --registry` takes: `etcd://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("etcd://{}", self.client)
    }

    /// The client address.
    pub fn client(&self) -> SocketAddr {
        self.client
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.proc.pid()
    }
}

/// One member of an [`EtcdCluster`]: its flags, and its process while it
/// runs.
#[derive(Debug)]
struct Member {
    client: SocketAddr,
    health: SocketAddr,
    args: Vec<String>,
    proc: Option<Proc>,
}

/// Three etcd members on loopback forming one cluster (one
/// `--initial-cluster` naming all three), each with its data directory
/// kept across restarts, so that a member can be killed, stopped and
/// started again, alone or all together.
#[derive(Debug)]
pub struct EtcdCluster {
    // Dropped in this order: the processes first, then their data.
    members: Vec<Member>,
    _dir: tempfile::TempDir,
}

/// How many members an [`EtcdCluster`] has.
pub const CLUSTER_SIZE: usize = 3;

impl EtcdCluster {
    /// Starts three members and waits until the cluster is healthy (every
    /// member answers `/health` with a leader). `None` when etcd is not
    /// installed, as [`Etcd::start`].
    pub fn start() -> Result<Option<EtcdCluster>> {
        if !installed()? {
            return Ok(None);
        }
        // A port picked by the kernel may be taken again before etcd binds
        // it: try a few times.
        let mut last = None;
        for _ in 0..3 {
            match EtcdCluster::try_start() {
                Ok(cluster) => return Ok(Some(cluster)),
                Err(e) => last = Some(e),
            }
        }
        Err(last.expect("three tries were made"))
    }

    fn try_start() -> Result<EtcdCluster> {
        let dir = tempfile::tempdir()?;
        let mut ports = Vec::new();
        for _ in 0..CLUSTER_SIZE {
            ports.push((free_port()?, free_port()?, free_port()?));
        }
        let initial_cluster = ports
            .iter()
            .enumerate()
            .map(|(i, (_, peer, _))| format!("m{i}=http://{peer}"))
            .collect::<Vec<_>>()
            .join(",");
        let mut members = Vec::new();
        for (i, &(client, peer, health)) in ports.iter().enumerate() {
            let data = dir.path().join(format!("m{i}"));
            let data = data.to_str().context("utf-8 temp dir")?;
            let client_url = format!("http://{client}");
            let peer_url = format!("http://{peer}");
            let args = [
                "--name",
                &format!("m{i}"),
                "--data-dir",
                data,
                "--listen-client-urls",
                &client_url,
                "--advertise-client-urls",
                &client_url,
                "--listen-peer-urls",
                &peer_url,
                "--initial-advertise-peer-urls",
                &peer_url,
                "--initial-cluster",
                &initial_cluster,
                "--initial-cluster-token",
                "hybridlink-test",
                "--listen-metrics-urls",
                &format!("http://{health}"),
                "--logger",
                "zap",
                "--log-level",
                "error",
            ]
            .map(String::from)
            .to_vec();
            members.push(Member {
                client,
                health,
                args,
                proc: None,
            });
        }
        let mut cluster = EtcdCluster { members, _dir: dir };
        cluster.start_all()?;
        Ok(cluster)
    }

    /// What `relay serve --registry` takes: every member's client address,
    /// `etcd://127.0.0.1:P1,127.0.0.1:P2,127.0.0.1:P3`.
    pub fn url(&self) -> String {
        let hosts: Vec<String> = self.members.iter().map(|m| m.client.to_string()).collect();
        format!("etcd://{}", hosts.join(","))
    }

    /// Member `i`'s client address.
    pub fn client(&self, i: usize) -> SocketAddr {
        self.members[i].client
    }

    /// Whether member `i` runs (was not killed or stopped since it last
    /// started).
    pub fn running(&self, i: usize) -> bool {
        self.members[i].proc.is_some()
    }

    /// Kills member `i` (SIGKILL) and waits for it to end.
    pub fn kill(&mut self, i: usize) {
        if let Some(mut proc) = self.members[i].proc.take() {
            proc.kill();
        }
    }

    /// Stops member `i` the way a service manager does (SIGTERM; SIGKILL
    /// after 5 s).
    pub fn stop(&mut self, i: usize) {
        if let Some(mut proc) = self.members[i].proc.take() {
            proc.terminate();
        }
    }

    /// Starts member `i` again with its data and ports, and waits until it
    /// is healthy (it needs a quorum for that: at least one other member
    /// running).
    pub fn start_member(&mut self, i: usize) -> Result<()> {
        self.spawn(i)?;
        self.wait_healthy(&[i])
    }

    /// Stops every member (SIGTERM).
    pub fn stop_all(&mut self) {
        for i in 0..self.members.len() {
            self.stop(i);
        }
    }

    /// Starts every member that does not run, with its data, and waits
    /// until all are healthy. They start together: none is healthy
    /// without a quorum.
    pub fn start_all(&mut self) -> Result<()> {
        for i in 0..self.members.len() {
            if !self.running(i) {
                self.spawn(i)?;
            }
        }
        let all: Vec<usize> = (0..self.members.len()).collect();
        self.wait_healthy(&all)
    }

    fn spawn(&mut self, i: usize) -> Result<()> {
        ensure!(!self.running(i), "etcd member {i} runs already");
        let argv: Vec<&str> = self.members[i].args.iter().map(String::as_str).collect();
        let proc = Proc::start_program_quiet(ETCD, &format!("etcd member {i}"), &argv)?;
        self.members[i].proc = Some(proc);
        Ok(())
    }

    /// Waits until the members `which` say they are healthy; on a timeout,
    /// kills them (so that a retry on other ports starts clean).
    fn wait_healthy(&mut self, which: &[usize]) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(20);
        while !which.iter().all(|&i| healthy(self.members[i].health)) {
            if Instant::now() > deadline {
                for &i in which {
                    self.kill(i);
                }
                bail!("etcd members {which:?} did not become healthy within 20 s");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(())
    }

    /// The index of the member that leads the cluster now, as a running
    /// member's `/v3/maintenance/status` (etcd's JSON gateway) says.
    pub fn leader(&self) -> Result<usize> {
        let mut ids = Vec::new();
        let mut leader = None;
        for member in &self.members {
            if member.proc.is_none() {
                ids.push(None);
                continue;
            }
            let answer = post(member.client, "/v3/maintenance/status", "{}")?;
            let body = answer
                .split_once("\r\n\r\n")
                .map(|(_, body)| body)
                .with_context(|| format!("etcd status: {answer}"))?;
            let status: serde_json::Value =
                serde_json::from_str(body).with_context(|| format!("etcd status: {answer}"))?;
            ids.push(status["header"]["member_id"].as_str().map(str::to_owned));
            if let Some(id) = status["leader"].as_str() {
                leader = Some(id.to_owned());
            }
        }
        let leader = leader.context("no running member names a leader")?;
        ids.iter()
            .position(|id| id.as_deref() == Some(leader.as_str()))
            .with_context(|| format!("the leader {leader} is none of the running members"))
    }
}

/// Whether etcd is installed; when it is not, an error under
/// HYBRIDLINK_REQUIRE_TOOLS, else `false` (the caller skips).
fn installed() -> Result<bool> {
    let installed = Command::new(ETCD)
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !installed {
        if std::env::var_os("HYBRIDLINK_REQUIRE_TOOLS").is_some() {
            bail!("etcd is missing (apt-get install etcd-server)");
        }
        eprintln!("SKIP: etcd is missing (apt-get install etcd-server)");
    }
    Ok(installed)
}

/// A CA, a certificate for etcd on 127.0.0.1 and one for its client,
/// written to `dir`; the client's files, and etcd's certificate and key.
fn issue(dir: &Path) -> Result<(TlsFiles, PathBuf, PathBuf)> {
    use rcgen::{
        BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose,
        IsCa, KeyPair, KeyUsagePurpose,
    };
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params
        .distinguished_name
        .push(DnType::CommonName, "hybridlink test etcd CA");
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let ca = CertifiedIssuer::self_signed(params, KeyPair::generate()?)?;
    let write = |name: &str, text: &str| -> Result<PathBuf> {
        let path = dir.join(name);
        std::fs::write(&path, text)?;
        Ok(path)
    };
    let leaf = |name: &str, purpose: ExtendedKeyUsagePurpose| -> Result<(PathBuf, PathBuf)> {
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::new(vec!["127.0.0.1".into(), "localhost".into()])?;
        params.distinguished_name.push(DnType::CommonName, name);
        params.extended_key_usages = vec![purpose];
        let cert = params.signed_by(&key, &ca)?;
        Ok((
            write(&format!("{name}.pem"), &cert.pem())?,
            write(&format!("{name}.key"), &key.serialize_pem())?,
        ))
    };
    let (server_cert, server_key) = leaf("etcd", ExtendedKeyUsagePurpose::ServerAuth)?;
    let (client_cert, client_key) = leaf("relay", ExtendedKeyUsagePurpose::ClientAuth)?;
    let files = TlsFiles {
        ca: write("ca.pem", &ca.pem())?,
        client_cert,
        client_key,
    };
    Ok((files, server_cert, server_key))
}

/// Starts etcd with `args` and waits until its `/health` on `health` says
/// it serves.
fn run(args: &[String], health: SocketAddr) -> Result<Proc> {
    let argv: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut proc = Proc::start_program_quiet(ETCD, "etcd", &argv)?;
    let deadline = Instant::now() + Duration::from_secs(20);
    while !healthy(health) {
        if Instant::now() > deadline {
            proc.kill();
            bail!("etcd did not become healthy within 20 s");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(proc)
}

fn free_port() -> Result<SocketAddr> {
    let listener = TcpListener::bind("127.0.0.1:0")?;
    Ok(listener.local_addr()?)
}

/// POSTs `body` to `path` on etcd's client port; the whole answer.
fn post(client: SocketAddr, path: &str, body: &str) -> Result<String> {
    let mut conn = TcpStream::connect_timeout(&client, Duration::from_secs(2))?;
    conn.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(
        conn,
        "POST {path} HTTP/1.0\r\nHost: localhost\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )?;
    let mut answer = String::new();
    conn.read_to_string(&mut answer)?;
    Ok(answer)
}

/// Whether etcd's `/health` says it serves.
fn healthy(health: SocketAddr) -> bool {
    let Ok(mut conn) = TcpStream::connect_timeout(&health, Duration::from_millis(200)) else {
        return false;
    };
    let _ = conn.set_read_timeout(Some(Duration::from_secs(1)));
    if conn
        .write_all(b"GET /health HTTP/1.0\r\nHost: localhost\r\n\r\n")
        .is_err()
    {
        return false;
    }
    let mut answer = String::new();
    let _ = conn.read_to_string(&mut answer);
    answer.contains("\"health\":\"true\"")
}
