//! A hostile relay in front of the real one (`hybridlink_tests::hostile_relay`):
//! a relay host that was stolen, or an operator gone bad, holding the relay's
//! certificate and key. Without an end-to-end key it reads and forges a
//! hybrid connection's traffic (relay-trusted mode, and status must say
//! so); with one it must get nothing, and the app must be told why.
//!
//! Everything goes through the real binaries: `hybridlink agent run` and
//! `hybridlink connect`, with their connection strings pointed at the
//! hostile relay's port (the `CertificateSha256` pin still holds, since the
//! attacker serves the real relay's certificate).

use std::io::{Read, Write};
use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use hybridlink_tests::hostile_relay::{HostileRelay, Mode};
use hybridlink_tests::{Agent, Relay, binary};
use proto::connection_string::ConnectionString;
use proto::key::Key;
use ring::rand::{SecureRandom, SystemRandom};
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

/// How long one `hybridlink connect` may run before the test kills it.
const CONNECT_DEADLINE: Duration = Duration::from_secs(60);

/// The app's server: echoes, and remembers how many connections it
/// accepted and every byte it received.
struct Target {
    addr: SocketAddr,
    connections: Arc<AtomicUsize>,
    received: Arc<Mutex<Vec<u8>>>,
}

impl Target {
    async fn start() -> Result<Target> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let connections = Arc::new(AtomicUsize::new(0));
        let received = Arc::new(Mutex::new(Vec::new()));
        let (count, log) = (connections.clone(), received.clone());
        tokio::spawn(async move {
            while let Ok((mut conn, _)) = listener.accept().await {
                count.fetch_add(1, Ordering::SeqCst);
                let log = log.clone();
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 64 * 1024];
                    loop {
                        match conn.read(&mut buf).await {
                            Ok(0) | Err(_) => break,
                            Ok(n) => {
                                log.lock().unwrap().extend_from_slice(&buf[..n]);
                                if conn.write_all(&buf[..n]).await.is_err() {
                                    return;
                                }
                            }
                        }
                    }
                    let _ = conn.shutdown().await;
                });
            }
        });
        Ok(Target {
            addr,
            connections,
            received,
        })
    }

    fn connections(&self) -> usize {
        self.connections.load(Ordering::SeqCst)
    }

    fn received(&self) -> Vec<u8> {
        self.received.lock().unwrap().clone()
    }
}

/// An app's request with a secret in it, and that secret: 32 hex digits of
/// fresh randomness, found nowhere else.
fn post_with_secret() -> Result<(Vec<u8>, Vec<u8>)> {
    let mut random = [0u8; 16];
    SystemRandom::new()
        .fill(&mut random)
        .map_err(|_| anyhow::anyhow!("no randomness"))?;
    let marker = proto::control::hex_encode(&random).into_bytes();
    let body = format!(
        r#"{{"employee":"4242","salary_secret":"{}"}}"#,
        String::from_utf8_lossy(&marker)
    );
    let request = format!(
        "POST /payroll/raise HTTP/1.1\r\nHost: payroll.internal\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    Ok((request.into_bytes(), marker))
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

/// `cs` with its Endpoint moved to the hostile relay's port (same host, same
/// certificate pin).
fn via(cs: &ConnectionString, hostile: &HostileRelay) -> ConnectionString {
    let mut cs = cs.clone();
    cs.relay_port = hostile.addr.port();
    cs
}

/// `cs` as text with an `EndToEndKey` field.
fn with_key(cs: &ConnectionString, key: &Key) -> String {
    format!("{cs};EndToEndKey={}", key.as_str())
}

/// What one `hybridlink connect` run did.
struct Connected {
    success: bool,
    stdout: Vec<u8>,
    stderr: String,
}

/// Runs `hybridlink connect CS` with `stdin` as its input (then EOF), killed
/// after [`CONNECT_DEADLINE`].
fn connect(cs: &str, stdin: &[u8]) -> Result<Connected> {
    let mut child = Command::new(binary())
        .args(["connect", "--wait", "10", cs])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    let pid = child.id();
    let mut input = child.stdin.take().context("stdin")?;
    // A connect that fails early closes its stdin: not an error here.
    let _ = input.write_all(stdin);
    drop(input);
    let mut stdout = child.stdout.take().context("stdout")?;
    let mut stderr = child.stderr.take().context("stderr")?;
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut out = Vec::new();
        let mut err = Vec::new();
        let _ = stdout.read_to_end(&mut out);
        let _ = stderr.read_to_end(&mut err);
        let status = child.wait();
        let _ = tx.send((status, out, err));
    });
    let Ok((status, stdout, stderr)) = rx.recv_timeout(CONNECT_DEADLINE) else {
        let _ = Command::new("kill")
            .args(["-KILL", &pid.to_string()])
            .status();
        bail!("hybridlink connect ran longer than {CONNECT_DEADLINE:?}");
    };
    let stderr = String::from_utf8_lossy(&stderr).into_owned();
    eprintln!("connect stderr: {stderr}");
    Ok(Connected {
        success: status?.success(),
        stdout,
        stderr,
    })
}

/// The `end_to_end` field of each hybrid connection in `agent status`.
fn end_to_end(agent: &Agent) -> Result<(Vec<Value>, Value)> {
    let status = agent.status()?;
    let hcs = status.as_array().context("status is a list")?;
    anyhow::ensure!(!hcs.is_empty(), "agent status lists no hybrid connection");
    Ok((
        hcs.iter().map(|hc| hc["end_to_end"].clone()).collect(),
        status,
    ))
}

/// Everything the attacker decrypted, both directions.
fn attacker_plaintext(hostile: &HostileRelay) -> Vec<u8> {
    let mut all = hostile.from_sender().lock().unwrap().clone();
    all.extend_from_slice(&hostile.from_agent().lock().unwrap());
    all
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_relay_without_end_to_end_reads_and_forges_traffic() -> Result<()> {
    let relay = Relay::start()?;
    let target = Target::start().await?;
    let (send, listen) = relay.create_hc("payroll", target.addr)?;
    let hostile = HostileRelay::start(&relay).await?;
    let agent = Agent::start(&[&via(&listen, &hostile)], &[])?;
    agent.wait_connected()?;
    let send = via(&send, &hostile).to_string();
    let (request, secret) = post_with_secret()?;

    // Read: the app's request reaches the target and its answer comes back,
    // both through the attacker, who reads them in passing.
    let out = connect(&send, &request)?;
    assert!(out.success, "{}\n{:#?}", out.stderr, hostile.log());
    assert_eq!(out.stdout, request, "the echo came back intact");
    assert_eq!(target.connections(), 1);
    assert!(contains(&target.received(), &secret), "the target got it");
    let stats = hostile.stats();
    assert!(stats.identities_replaced >= 2, "{stats:?}");
    assert!(stats.pipes_spliced >= 1, "{stats:?}\n{:#?}", hostile.log());
    assert!(
        contains(&hostile.from_sender().lock().unwrap(), &secret),
        "the attacker read the request"
    );
    assert!(
        contains(&hostile.from_agent().lock().unwrap(), &secret),
        "the attacker read the answer"
    );

    // Forge: the attacker answers the app itself; the target never hears
    // of it.
    let forged = b"HTTP/1.1 200 OK\r\nContent-Length: 15\r\n\r\nraise approved\n".to_vec();
    hostile.set_mode(Mode::Forge(forged.clone()));
    let out = connect(&send, &request)?;
    assert!(out.success, "{}\n{:#?}", out.stderr, hostile.log());
    assert_eq!(out.stdout, forged, "the app got the attacker's answer");
    assert_eq!(
        target.connections(),
        1,
        "the forged stream reached the target"
    );
    assert!(hostile.stats().streams_forged >= 1);

    // This is what relay-trusted means, and status must say it.
    let (modes, status) = end_to_end(&agent)?;
    assert!(
        modes.iter().all(|m| m == "relay-trusted"),
        "agent status must say relay-trusted: {status}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_relay_cannot_splice_itself_into_an_end_to_end_connection() -> Result<()> {
    let relay = Relay::start()?;
    let target = Target::start().await?;
    let (send, listen) = relay.create_hc("payroll", target.addr)?;
    let key = Key::generate()?;
    let (request, secret) = post_with_secret()?;

    {
        let hostile = HostileRelay::start(&relay).await?;
        let agent = Agent::start_with_text(&[&with_key(&via(&listen, &hostile), &key)], &[])?;
        agent.wait_connected()?;
        let send = with_key(&via(&send, &hostile), &key);

        // Splicing: the app is refused, naming the check that failed.
        let out = connect(&send, &request)?;
        assert!(!out.success, "connect succeeded through the attacker");
        assert!(
            out.stderr.contains("end-to-end check failed"),
            "the refusal must name the end-to-end check: {}",
            out.stderr
        );
        assert!(!contains(&out.stdout, &secret));

        // Forging: not one byte of the attacker's reaches the app.
        let forged = b"HTTP/1.1 200 OK\r\n\r\nforged".to_vec();
        hostile.set_mode(Mode::Forge(forged.clone()));
        let out = connect(&send, &request)?;
        assert!(!out.success, "connect succeeded against a forger");
        assert!(
            out.stderr.contains("end-to-end check failed"),
            "{}",
            out.stderr
        );
        assert!(out.stdout.is_empty(), "the app got bytes from the attacker");

        let stats = hostile.stats();
        assert!(
            stats.identities_replaced >= 2,
            "the attack was tried: {stats:?}"
        );
        assert_eq!(target.connections(), 0, "the target was reached");
        let seen = attacker_plaintext(&hostile);
        for piece in secret.windows(8) {
            assert!(
                !contains(&seen, piece),
                "the attacker read part of the secret\n{:#?}",
                hostile.log()
            );
        }
        assert!(
            !contains(&seen, b"POST /payroll"),
            "the attacker read the request"
        );

        let (modes, status) = end_to_end(&agent)?;
        assert!(modes.iter().all(|m| m == "verified"), "{status}");
    }

    // Control: the same strings straight to the real relay work, byte for
    // byte, so the check above did not simply break everything.
    let agent = Agent::start_with_text(&[&with_key(&listen, &key)], &[])?;
    agent.wait_connected()?;
    let out = connect(&with_key(&send, &key), &request)?;
    assert!(out.success, "{}", out.stderr);
    assert_eq!(out.stdout, request);
    assert_eq!(target.connections(), 1);
    assert!(contains(&target.received(), &secret));
    let (modes, status) = end_to_end(&agent)?;
    assert!(modes.iter().all(|m| m == "verified"), "{status}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_agent_with_an_end_to_end_key_refuses_a_sender_without_it() -> Result<()> {
    let relay = Relay::start()?;
    let target = Target::start().await?;
    let (send, listen) = relay.create_hc("payroll", target.addr)?;
    let key = Key::generate()?;
    let agent = Agent::start_with_text(&[&with_key(&listen, &key)], &[])?;
    agent.wait_connected()?;
    let (request, _) = post_with_secret()?;
    let out = connect(&send.to_string(), &request)?;
    assert!(!out.success, "a sender without the key got through");
    assert!(
        out.stderr.contains("end-to-end check failed"),
        "the refusal must name the end-to-end check: {}",
        out.stderr
    );
    assert!(out.stdout.is_empty());
    assert_eq!(target.connections(), 0, "the target was reached");
    Ok(())
}
