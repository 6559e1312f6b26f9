//! The relay's portal in a real browser: `tests/portal/portal.mjs` drives
//! Debian's chromium with playwright-core against a real relay, and this
//! test serves what the page cannot do itself: it starts an agent, pushes
//! traffic and runs `hybridlink connect --check` when the script asks (a
//! line `@hybridlink {json}` on the script's stdout, answered with one JSON
//! line on its stdin). Screenshots go to HYBRIDLINK_PORTAL_SCREENSHOTS
//! (default `target/portal-screenshots`).
//!
//! Without chromium or node it skips, unless HYBRIDLINK_REQUIRE_TOOLS is
//! set (as in CI). `npm ci` runs first when `tests/portal/node_modules` (or
//! `tests/azure/node_modules`, for Azure Relay's Node client) is
//! missing.

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use hybridlink_tests::{Agent, Relay, binary, echo_server_thread};
use proto::connection_string::ConnectionString;
use serde_json::{Value, json};

/// The whole browser run may take this long before it is stopped.
const DEADLINE: Duration = Duration::from_secs(300);

#[test]
fn the_portal_creates_keys_watches_and_deletes_hybrid_connections() -> Result<()> {
    if let Some(missing) = missing_tool() {
        ensure!(
            std::env::var_os("HYBRIDLINK_REQUIRE_TOOLS").is_none(),
            "{missing}"
        );
        eprintln!("SKIP: {missing}");
        return Ok(());
    }
    let root = hybridlink_tests::repo_root();
    let script_dir = root.join("tests/portal");
    for (dir, module) in [
        ("tests/portal", "playwright-core"),
        ("tests/azure", "hyco-ws"),
    ] {
        if !root.join(dir).join("node_modules").join(module).exists() {
            let status = Command::new("npm")
                .args(["ci", "--no-audit", "--no-fund", "--loglevel=error"])
                .current_dir(root.join(dir))
                .status()
                .with_context(|| format!("running npm ci in {dir}"))?;
            ensure!(status.success(), "npm ci in {dir} failed");
        }
    }
    let shots = std::env::var_os("HYBRIDLINK_PORTAL_SCREENSHOTS")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            std::env::var_os("CARGO_TARGET_DIR")
                .map(PathBuf::from)
                .unwrap_or_else(|| root.join("target"))
                .join("portal-screenshots")
        });

    let relay = Relay::start()?;
    let key = std::fs::read_to_string(relay.data_dir.join("manage.key"))?;
    let targets = [echo_server_thread()?, echo_server_thread()?];
    let child = Command::new("node")
        .arg("portal.mjs")
        .current_dir(&script_dir)
        .env("HYBRIDLINK_API", format!("http://{}", relay.api))
        .env("HYBRIDLINK_MANAGE_KEY", key.trim())
        .env(
            "HYBRIDLINK_TARGETS",
            format!("{},{}", targets[0], targets[1]),
        )
        .env("HYBRIDLINK_PORTAL_SCREENSHOTS", &shots)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .context("starting node")?;
    let mut script = Script::new(child)?;

    let mut helper = Helper {
        agents: Vec::new(),
        traffic: None,
        azure_listeners: Vec::new(),
        relay_cert: relay.data_dir.join("cert.pem"),
    };
    while let Some(line) = script.line()? {
        let Some(request) = line.strip_prefix("@hybridlink ") else {
            println!("{line}");
            continue;
        };
        let reply = helper
            .serve(&serde_json::from_str(request)?)
            .unwrap_or_else(|e| json!({ "error": format!("{e:#}") }));
        script.reply(&reply)?;
    }
    drop(helper);
    let status = script.wait()?;
    ensure!(
        status.success(),
        "the browser test failed ({status}); its output is above"
    );
    println!("screenshots in {}", shots.display());
    Ok(())
}

/// Why the browser test cannot run here, if it cannot.
fn missing_tool() -> Option<String> {
    let chromium = std::env::var_os("CHROMIUM")
        .map_or_else(|| PathBuf::from("/usr/bin/chromium"), PathBuf::from);
    if !chromium.exists() {
        return Some(format!(
            "{} is missing (apt-get install chromium)",
            chromium.display()
        ));
    }
    let node = Command::new("node").arg("--version").output();
    if !node.is_ok_and(|o| o.status.success()) {
        return Some("node is missing (apt-get install nodejs npm)".into());
    }
    None
}

/// The node process, killed (and with it the browser) if the test ends
/// early; stopped with SIGTERM after [`DEADLINE`] even if it hangs.
struct Script {
    child: Child,
    stdin: ChildStdin,
    lines: std::sync::mpsc::Receiver<std::io::Result<String>>,
    deadline: Instant,
}

impl Script {
    fn new(mut child: Child) -> Result<Script> {
        let stdin = child.stdin.take().context("stdin")?;
        let stdout = child.stdout.take().context("stdout")?;
        let (tx, lines) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                if tx.send(line).is_err() {
                    return;
                }
            }
        });
        Ok(Script {
            child,
            stdin,
            lines,
            deadline: Instant::now() + DEADLINE,
        })
    }

    /// The script's next line; `None` when it has closed its stdout.
    fn line(&mut self) -> Result<Option<String>> {
        let left = self.deadline.saturating_duration_since(Instant::now());
        match self.lines.recv_timeout(left) {
            Ok(line) => Ok(Some(line?)),
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => Ok(None),
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
                anyhow::bail!("the browser test printed nothing for too long; stopping it")
            }
        }
    }

    fn reply(&mut self, reply: &Value) -> Result<()> {
        writeln!(self.stdin, "{reply}")?;
        Ok(self.stdin.flush()?)
    }

    fn wait(&mut self) -> Result<std::process::ExitStatus> {
        Ok(self.child.wait()?)
    }
}

impl Drop for Script {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            // SIGTERM first: playwright then closes the browser it started.
            let _ = Command::new("kill")
                .args(["-TERM", &self.child.id().to_string()])
                .status();
            let deadline = Instant::now() + Duration::from_secs(5);
            while matches!(self.child.try_wait(), Ok(None)) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// A listener of Azure Relay's Node client (`hyco-ws`, installed in
/// `tests/azure`) that stays connected until it is killed.
const HYCO_WS_LISTENER: &str = r#"
const WebSocket = require('hyco-ws');
const { RELAY, HC, LISTEN_KEY } = process.env;
const uri = `wss://${RELAY}/$hc/${HC}?sb-hc-action=listen`;
WebSocket.createRelayedServer(
  { server: uri, token: () => WebSocket.createRelayToken(uri, 'listen', LISTEN_KEY) },
  (ws) => ws.close());
"#;

/// What the script may ask for; everything it started ends on drop.
struct Helper {
    agents: Vec<Agent>,
    traffic: Option<Traffic>,
    /// Azure Relay's own Node client, as listeners.
    azure_listeners: Vec<hybridlink_tests::Proc>,
    /// The relay's certificate, for the Node client to trust.
    relay_cert: PathBuf,
}

impl Helper {
    fn serve(&mut self, request: &Value) -> Result<Value> {
        let string = || -> Result<ConnectionString> {
            request["connection_string"]
                .as_str()
                .context("no connection_string")?
                .parse()
                .map_err(|e| anyhow::anyhow!("{e}"))
        };
        match request["do"].as_str().unwrap_or_default() {
            "agent" => {
                let agent = Agent::start(&[&string()?], &[])?;
                agent.wait_connected()?;
                self.agents.push(agent);
                Ok(json!({}))
            }
            "policy" => {
                // Rewrites every agent's policy file: "" allows nothing,
                // "allow" restores what the tests allow. The agents notice
                // the change by themselves.
                let text = match request["text"].as_str().unwrap_or_default() {
                    "allow" => hybridlink_tests::TEST_POLICY,
                    _ => "",
                };
                for agent in &self.agents {
                    let path = agent
                        .policy
                        .as_ref()
                        .context("agent without a policy file")?;
                    std::fs::write(path, text)?;
                }
                Ok(json!({}))
            }
            "traffic" => {
                self.traffic = Some(Traffic::start(&string()?, 2)?);
                Ok(json!({}))
            }
            "azure-listener" => {
                let cs = string()?;
                let child = Command::new("node")
                    .args(["-e", HYCO_WS_LISTENER])
                    .env(
                        "NODE_PATH",
                        Path::new(env!("CARGO_MANIFEST_DIR")).join("azure/node_modules"),
                    )
                    .env("NODE_EXTRA_CA_CERTS", &self.relay_cert)
                    .env("RELAY", format!("{}:{}", cs.relay_host, cs.relay_port))
                    .env("HC", cs.hc.as_str())
                    .env("LISTEN_KEY", cs.key.as_str())
                    .spawn()
                    .context("starting a hyco-ws listener")?;
                self.azure_listeners
                    .push(hybridlink_tests::Proc::adopt(child, "hyco-ws listener"));
                Ok(json!({}))
            }
            "stop-azure-listeners" => {
                self.azure_listeners.clear();
                Ok(json!({}))
            }
            "stop-traffic" => {
                self.traffic = None;
                Ok(json!({}))
            }
            "check" => {
                let out = Command::new(binary())
                    .args(["connect", "--check", "--wait", "5", &string()?.to_string()])
                    .output()?;
                Ok(json!({
                    "ok": out.status.success(),
                    "output": format!(
                        "{}{}",
                        String::from_utf8_lossy(&out.stdout),
                        String::from_utf8_lossy(&out.stderr)
                    ),
                }))
            }
            other => anyhow::bail!("unknown request {other:?}"),
        }
    }
}

/// Streams held open by `hybridlink connect` to an echo target, each fed a
/// few hundred kB/s in a slow sawtooth (so the page's chart has a shape).
struct Traffic {
    streams: Vec<Child>,
    stop: Arc<AtomicBool>,
}

impl Traffic {
    fn start(cs: &ConnectionString, count: usize) -> Result<Traffic> {
        let stop = Arc::new(AtomicBool::new(false));
        let mut streams = Vec::new();
        for _ in 0..count {
            let mut child = Command::new(binary())
                .args(["connect", &cs.to_string()])
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .spawn()?;
            let mut stdin = child.stdin.take().context("stdin")?;
            let mut stdout = child.stdout.take().context("stdout")?;
            let stop = stop.clone();
            std::thread::spawn(move || {
                let started = Instant::now();
                while !stop.load(Ordering::Relaxed) {
                    let size = 8192 * (1 + started.elapsed().as_secs() % 12) as usize;
                    if stdin.write_all(&vec![b'x'; size]).is_err() {
                        return;
                    }
                    std::thread::sleep(Duration::from_millis(100));
                }
            });
            std::thread::spawn(move || std::io::copy(&mut stdout, &mut std::io::sink()));
            streams.push(child);
        }
        Ok(Traffic { streams, stop })
    }
}

impl Drop for Traffic {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for child in &mut self.streams {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}
