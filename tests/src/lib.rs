//! Shared helpers for the end-to-end tests: start the real `hybridlink`
//! binary (relay, agent, forward) on loopback, create hybrid connections
//! through the CLI, and run small target servers in the test process.
//!
//! Every child process is killed when its handle drops, so a failing test
//! leaves nothing behind. Ports are always chosen by the kernel (port 0).

use std::io::{BufRead, BufReader, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use proto::connection_string::ConnectionString;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

pub mod cluster;
pub mod etcd;
pub mod hostile_relay;
pub mod lab;
pub mod wire;

/// The repository's root directory (the parent of `tests/`).
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent")
        .to_path_buf()
}

/// Path of the `hybridlink` binary, built once per test run if needed.
pub fn binary() -> PathBuf {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        if let Some(p) = std::env::var_os("HYBRIDLINK_BIN") {
            return PathBuf::from(p);
        }
        let root = repo_root();
        let target = std::env::var_os("CARGO_TARGET_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| root.join("target"));
        // The cargo running these tests (same toolchain, so no rebuild of
        // the dependencies), else the one on PATH.
        let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
        let status = Command::new(cargo)
            .args(["build", "-q", "-p", "hybridlink", "--bin", "hybridlink"])
            .current_dir(&root)
            .status()
            .expect("cargo runs");
        assert!(status.success(), "building hybridlink failed");
        target.join("debug").join("hybridlink")
    })
    .clone()
}

/// A child process killed on drop.
#[derive(Debug)]
pub struct Proc {
    child: Child,
    name: String,
}

impl Proc {
    /// Starts `hybridlink ARGS...` with stderr passed through (for test logs)
    /// and stdout piped.
    pub fn start(name: &str, args: &[&str]) -> Result<Proc> {
        Proc::start_program(binary(), name, args)
    }

    /// Starts any program the same way (stdout piped for its ready line).
    pub fn start_program(
        program: impl AsRef<std::ffi::OsStr>,
        name: &str,
        args: &[&str],
    ) -> Result<Proc> {
        Proc::spawn(program, name, args, Stdio::piped(), Stdio::inherit())
    }

    /// Starts any program with its stdout discarded.
    pub fn start_program_quiet(
        program: impl AsRef<std::ffi::OsStr>,
        name: &str,
        args: &[&str],
    ) -> Result<Proc> {
        Proc::spawn(program, name, args, Stdio::null(), Stdio::inherit())
    }

    /// Takes over a child started elsewhere (with an environment of its
    /// own), to be killed and reaped like the others when dropped.
    pub fn adopt(child: Child, name: &str) -> Proc {
        Proc {
            child,
            name: name.to_string(),
        }
    }

    fn spawn(
        program: impl AsRef<std::ffi::OsStr>,
        name: &str,
        args: &[&str],
        stdout: Stdio,
        stderr: Stdio,
    ) -> Result<Proc> {
        let child = Command::new(program)
            .args(args)
            .stdin(Stdio::null())
            .stdout(stdout)
            .stderr(stderr)
            .env(
                "RUST_LOG",
                // hickory logs every DNS query at INFO: its warnings only.
                std::env::var("RUST_LOG").unwrap_or_else(|_| "info,hickory_server=warn".into()),
            )
            .spawn()
            .with_context(|| format!("starting {name}"))?;
        Ok(Proc {
            child,
            name: name.to_string(),
        })
    }

    /// Reads the first line the process prints on stdout (its ready line).
    pub fn ready_line(&mut self) -> Result<serde_json::Value> {
        let stdout = self.child.stdout.take().context("stdout already taken")?;
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut line = String::new();
            let _ = BufReader::new(stdout).read_line(&mut line);
            let _ = tx.send(line);
        });
        let line = rx
            .recv_timeout(Duration::from_secs(60))
            .with_context(|| format!("{} printed no ready line", self.name))?;
        serde_json::from_str(&line).with_context(|| format!("{} ready line {line:?}", self.name))
    }

    /// Kills the process (SIGKILL) and waits for it.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Sends SIGTERM and waits up to 5 s.
    pub fn terminate(&mut self) {
        let pid = self.child.id() as i32;
        let _ = Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        self.kill();
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A relay process with its own data dir.
#[derive(Debug)]
pub struct Relay {
    /// The process.
    pub proc: Proc,
    /// Relay port.
    pub listen: SocketAddr,
    /// Management API.
    pub api: SocketAddr,
    /// Its data dir.
    pub data_dir: PathBuf,
    /// The line `relay serve` printed when ready.
    pub ready: serde_json::Value,
    _dir: Option<tempfile::TempDir>,
}

/// `hybridlink relay serve` with `data_dir`, its listener and API on
/// loopback ports the kernel picks, not yet started: for the cases that
/// watch how a relay starts, or how it refuses to.
pub fn relay_serve(data_dir: &Path) -> Command {
    let mut cmd = Command::new(binary());
    cmd.args([
        "relay",
        "serve",
        "--listen",
        "127.0.0.1:0",
        "--api",
        "127.0.0.1:0",
        "--data-dir",
    ])
    .arg(data_dir);
    cmd
}

impl Relay {
    /// Starts a relay on loopback with a fresh data dir.
    pub fn start() -> Result<Relay> {
        let dir = tempfile::tempdir()?;
        let data_dir = dir.path().to_path_buf();
        let mut relay = Relay::start_in(&data_dir, "127.0.0.1:0")?;
        relay._dir = Some(dir);
        Ok(relay)
    }

    /// Starts a relay with `data_dir` listening on `listen`.
    pub fn start_in(data_dir: &Path, listen: &str) -> Result<Relay> {
        Relay::start_with(data_dir, listen, &[])
    }

    /// Starts a relay with `data_dir` listening on `listen`, with more
    /// `relay serve` flags.
    pub fn start_with(data_dir: &Path, listen: &str, extra: &[&str]) -> Result<Relay> {
        Relay::start_logging(data_dir, listen, extra, Stdio::inherit(), None)
    }

    /// Starts a relay on loopback with a fresh data dir and more `relay
    /// serve` flags, its log (stderr) written to `log`.
    pub fn start_with_log(extra: &[&str], log: &Path) -> Result<Relay> {
        let dir = tempfile::tempdir()?;
        let file =
            std::fs::File::create(log).with_context(|| format!("creating {}", log.display()))?;
        let mut relay = Relay::start_logging(dir.path(), "127.0.0.1:0", extra, file.into(), None)?;
        relay._dir = Some(dir);
        Ok(relay)
    }

    /// Starts a relay on loopback with a fresh data dir in a process that
    /// may open at most `open_files` files (soft and hard limit, set with
    /// util-linux's `prlimit`).
    pub fn start_with_open_files(open_files: u64) -> Result<Relay> {
        let dir = tempfile::tempdir()?;
        let mut relay = Relay::start_logging(
            dir.path(),
            "127.0.0.1:0",
            &[],
            Stdio::inherit(),
            Some(open_files),
        )?;
        relay._dir = Some(dir);
        Ok(relay)
    }

    fn start_logging(
        data_dir: &Path,
        listen: &str,
        extra: &[&str],
        log: Stdio,
        open_files: Option<u64>,
    ) -> Result<Relay> {
        let dir = data_dir.to_str().context("utf-8 path")?;
        let mut argv = vec![
            "relay",
            "serve",
            "--data-dir",
            dir,
            "--listen",
            listen,
            "--api",
            "127.0.0.1:0",
        ];
        argv.extend_from_slice(extra);
        let mut proc = match open_files {
            None => Proc::spawn(binary(), "relay", &argv, Stdio::piped(), log)?,
            Some(n) => {
                let limit = format!("--nofile={n}:{n}");
                let bin = binary();
                let bin = bin.to_str().context("utf-8 binary path")?;
                let mut wrapped = vec![limit.as_str(), "--", bin];
                wrapped.extend_from_slice(&argv);
                Proc::spawn("prlimit", "relay", &wrapped, Stdio::piped(), log)?
            }
        };
        let ready = proc.ready_line()?;
        let addr = |k: &str| -> Result<SocketAddr> {
            ready[k]
                .as_str()
                .context("address in ready line")?
                .parse()
                .context("address parses")
        };
        Ok(Relay {
            listen: addr("listen")?,
            api: addr("api")?,
            proc,
            data_dir: data_dir.to_path_buf(),
            ready,
            _dir: None,
        })
    }

    /// Stops this relay and starts it again with the same data dir and port.
    pub fn restart(&mut self) -> Result<()> {
        self.proc.kill();
        let listen = self.listen.to_string();
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            match Relay::start_in(&self.data_dir, &listen) {
                Ok(mut fresh) => {
                    std::mem::swap(&mut self.proc, &mut fresh.proc);
                    self.api = fresh.api;
                    return Ok(());
                }
                Err(e) if Instant::now() < deadline => {
                    eprintln!("relay restart: {e:#}; retrying");
                    std::thread::sleep(Duration::from_millis(200));
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// `hybridlink hc --api ... --data-dir ...` for this relay; add the
    /// subcommand and run it.
    pub fn hc_command(&self) -> Result<Command> {
        let mut cmd = Command::new(binary());
        cmd.arg("hc").args([
            "--api",
            &format!("http://{}", self.api),
            "--data-dir",
            self.data_dir.to_str().context("utf-8")?,
        ]);
        Ok(cmd)
    }

    /// Runs `hybridlink hc --json ARGS...` against this relay; returns its
    /// JSON.
    pub fn hc(&self, args: &[&str]) -> Result<serde_json::Value> {
        let out = self.hc_command()?.arg("--json").args(args).output()?;
        if !out.status.success() {
            bail!(
                "hc {args:?} failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        if out.stdout.iter().all(u8::is_ascii_whitespace) {
            return Ok(serde_json::Value::Null);
        }
        serde_json::from_slice(&out.stdout).with_context(|| {
            format!(
                "hc {args:?} printed {:?}",
                String::from_utf8_lossy(&out.stdout)
            )
        })
    }

    /// Creates a hybrid connection to `endpoint`; returns (send, listen)
    /// primary connection strings.
    pub fn create_hc(
        &self,
        name: &str,
        endpoint: SocketAddr,
    ) -> Result<(ConnectionString, ConnectionString)> {
        self.hc(&[
            "create",
            name,
            "--host",
            &endpoint.ip().to_string(),
            "--port",
            &endpoint.port().to_string(),
        ])?;
        self.strings(name)
    }

    /// The primary send and listen connection strings of `name`.
    pub fn strings(&self, name: &str) -> Result<(ConnectionString, ConnectionString)> {
        let keys = self.hc(&["keys", name])?;
        let find = |rule: &str| -> Result<ConnectionString> {
            let s = keys["connection_strings"][rule]["primary"]
                .as_str()
                .with_context(|| format!("no {rule}.primary in {keys}"))?;
            s.parse().map_err(|e| anyhow::anyhow!("{e}"))
        };
        Ok((find("send")?, find("listen")?))
    }
}

/// The on-prem policy test agents run with unless told otherwise: loopback
/// (where the tests' targets listen) and anything else.
pub const TEST_POLICY: &str = "[[allow]]\nhost = \"127.0.0.0/8\"\n[[allow]]\nhost = \"*\"\n";

/// An agent process.
#[derive(Debug)]
pub struct Agent {
    /// The process.
    pub proc: Proc,
    /// Its status socket.
    pub status_socket: PathBuf,
    /// The policy file written for it (when `extra` gave none).
    pub policy: Option<PathBuf>,
    _dir: tempfile::TempDir,
}

impl Agent {
    /// Starts `hybridlink agent run` for these listen strings.
    pub fn start(strings: &[&ConnectionString], extra: &[&str]) -> Result<Agent> {
        let text: Vec<String> = strings.iter().map(|cs| cs.to_string()).collect();
        let text: Vec<&str> = text.iter().map(String::as_str).collect();
        Agent::start_with_text(&text, extra)
    }

    /// Starts `hybridlink agent run` for listen strings given as text, as
    /// the agent's own parser must read them.
    pub fn start_with_text(strings: &[&str], extra: &[&str]) -> Result<Agent> {
        let dir = tempfile::tempdir()?;
        let socket = dir.path().join("agent.sock");
        let mut args: Vec<String> = vec![
            "agent".into(),
            "run".into(),
            "--status-socket".into(),
            socket.display().to_string(),
        ];
        for cs in strings {
            args.push("--connection-string".into());
            args.push((*cs).to_string());
        }
        let mut policy = None;
        if !extra.contains(&"--policy") {
            // The tests' targets listen on loopback, which the built-in
            // policy refuses: allow it, as an administrator would.
            let path = dir.path().join("policy.toml");
            std::fs::write(&path, TEST_POLICY)?;
            args.push("--policy".into());
            args.push(path.display().to_string());
            policy = Some(path);
        }
        args.extend(extra.iter().map(|s| s.to_string()));
        let argv: Vec<&str> = args.iter().map(String::as_str).collect();
        let proc = Proc::start("agent", &argv)?;
        Ok(Agent {
            proc,
            status_socket: socket,
            policy,
            _dir: dir,
        })
    }

    /// `hybridlink agent status --json`, parsed.
    pub fn status(&self) -> Result<serde_json::Value> {
        let out = Command::new(binary())
            .args(["agent", "status", "--json", "--status-socket"])
            .arg(&self.status_socket)
            .output()?;
        if !out.status.success() {
            bail!(
                "agent status failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(serde_json::from_slice(&out.stdout)?)
    }

    /// Waits until every hybrid connection of the agent is `connected`.
    pub fn wait_connected(&self) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok(status) = self.status() {
                let all = status.as_array().is_some_and(|hcs| {
                    !hcs.is_empty() && hcs.iter().all(|h| h["connection"]["state"] == "connected")
                });
                if all {
                    return Ok(());
                }
                if Instant::now() > deadline {
                    bail!("agent not connected: {status}");
                }
            } else if Instant::now() > deadline {
                bail!("agent status socket never answered");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// A TCP echo server on loopback; returns its address.
pub async fn echo_server() -> Result<SocketAddr> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move {
        while let Ok((mut conn, _)) = listener.accept().await {
            tokio::spawn(async move {
                let (mut r, mut w) = conn.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
                let _ = w.shutdown().await;
            });
        }
    });
    Ok(addr)
}

/// A TCP echo server on loopback served by plain threads, for tests that
/// have no tokio runtime; it lives as long as the test process.
pub fn echo_server_thread() -> Result<SocketAddr> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    let addr = listener.local_addr()?;
    std::thread::spawn(move || {
        for conn in listener.incoming().flatten() {
            std::thread::spawn(move || {
                if let Ok(mut reader) = conn.try_clone() {
                    let mut writer = conn;
                    let _ = std::io::copy(&mut reader, &mut writer);
                }
            });
        }
    });
    Ok(addr)
}

/// A server that reads everything, then answers with the SHA-256 of what it
/// read (32 bytes) and closes: checks integrity and half-close at once.
pub async fn digest_server() -> Result<SocketAddr> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move {
        while let Ok((mut conn, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
                let mut buf = vec![0u8; 256 * 1024];
                loop {
                    match conn.read(&mut buf).await {
                        Ok(0) => break,
                        Ok(n) => ctx.update(&buf[..n]),
                        Err(_) => return,
                    }
                }
                let _ = conn.write_all(ctx.finish().as_ref()).await;
                let _ = conn.shutdown().await;
            });
        }
    });
    Ok(addr)
}

/// Deterministic pseudo-random bytes (xorshift), cheap enough for GiBs.
pub fn pattern_block(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    out
}

/// One stream held open by `hybridlink connect`, to an echo target.
#[derive(Debug)]
pub struct OpenStream {
    child: std::process::Child,
    stdin: Option<std::process::ChildStdin>,
    stdout: BufReader<std::process::ChildStdout>,
}

impl OpenStream {
    /// Starts `hybridlink connect` for `cs`.
    pub fn open(cs: &ConnectionString) -> Result<OpenStream> {
        let mut child = Command::new(binary())
            .args(["connect", &cs.to_string()])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()?;
        let stdin = child.stdin.take().context("stdin")?;
        let stdout = BufReader::new(child.stdout.take().context("stdout")?);
        Ok(OpenStream {
            child,
            stdin: Some(stdin),
            stdout,
        })
    }

    /// Sends `line` and returns the line that comes back.
    pub fn echo(&mut self, line: &str) -> Result<String> {
        self.stdin
            .as_mut()
            .context("closed")?
            .write_all(line.as_bytes())?;
        let mut back = String::new();
        self.stdout.read_line(&mut back)?;
        Ok(back)
    }

    /// Whether the `connect` process has ended (its stream was cut).
    pub fn ended(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(Some(_)))
    }

    /// Closes the sending side and waits for the process.
    pub fn close(mut self) {
        self.stdin.take();
        let _ = self.child.wait();
    }
}

impl Drop for OpenStream {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Polls `ok` every 100 ms until it says true; fails after `secs` seconds
/// naming `what`.
pub fn wait_for(what: &str, secs: u64, mut ok: impl FnMut() -> Result<bool>) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while !ok()? {
        if Instant::now() >= deadline {
            bail!("{what} did not happen within {secs} s");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    Ok(())
}

/// What a process holds, from /proc: open files, threads, and memory in
/// KiB, resident (`VmRSS`) and allocated (`VmData`, which counts what was
/// reserved even if never touched, so it does not depend on the kernel's
/// huge-page policy).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Footprint {
    /// Open file descriptors.
    pub fds: usize,
    /// Threads.
    pub threads: usize,
    /// Resident memory, KiB.
    pub rss_kib: u64,
    /// Allocated memory, KiB.
    pub data_kib: u64,
}

impl Footprint {
    /// The footprint of process `pid` now.
    pub fn of(pid: u32) -> Result<Footprint> {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
            .with_context(|| format!("reading /proc/{pid}/status"))?;
        let field = |name: &str| -> Result<u64> {
            status
                .lines()
                .find(|l| l.starts_with(name))
                .and_then(|l| l.split_whitespace().nth(1))
                .with_context(|| format!("no {name} for {pid}"))?
                .parse()
                .context("a number")
        };
        Ok(Footprint {
            fds: std::fs::read_dir(format!("/proc/{pid}/fd"))?.count(),
            threads: usize::try_from(field("Threads:")?)?,
            rss_kib: field("VmRSS:")?,
            data_kib: field("VmData:")?,
        })
    }
}

/// `tests/azure`, where Azure Relay's Node clients are installed (`npm ci`
/// runs first when they are not); `None` (the caller skips) without node,
/// unless HYBRIDLINK_REQUIRE_TOOLS is set, when it fails instead.
pub fn azure_node_clients() -> Result<Option<PathBuf>> {
    let node = Command::new("node").arg("--version").output();
    if !node.is_ok_and(|o| o.status.success()) {
        if std::env::var_os("HYBRIDLINK_REQUIRE_TOOLS").is_some() {
            bail!("node is missing (apt-get install nodejs npm)");
        }
        eprintln!("SKIP: node is missing");
        return Ok(None);
    }
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("azure");
    let installed = ["hyco-ws", "hyco-https"]
        .iter()
        .all(|m| dir.join("node_modules").join(m).exists());
    if !installed {
        let status = Command::new("npm")
            .args(["ci", "--no-audit", "--no-fund", "--loglevel=error"])
            .current_dir(&dir)
            .status()
            .context("running npm ci in tests/azure")?;
        if !status.success() {
            bail!("npm ci in tests/azure failed");
        }
    }
    Ok(Some(dir))
}

/// `cs` as Azure Relay's own strings are: without `CertificateSha256`, so
/// hybridlink's peers speak Azure Relay's protocol with it.
pub fn azure_style(cs: &ConnectionString) -> ConnectionString {
    let mut cs = cs.clone();
    cs.cert_sha256 = None;
    cs
}
