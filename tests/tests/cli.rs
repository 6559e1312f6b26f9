//! The sending side for people without root, through the real binary:
//! `hybridlink connect` (stdin/stdout) and `hybridlink forward` (a local
//! port), and the CLI's exit codes and messages.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use hybridlink_tests::{Agent, Proc, Relay, binary, echo_server};

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn connect_joins_stdin_and_stdout_to_one_stream() -> Result<()> {
    let relay = Relay::start()?;
    let echo = echo_server().await?;
    let (send, listen) = relay.create_hc("nc", echo)?;
    let agent = Agent::start(&[&listen], &[])?;
    agent.wait_connected()?;
    let mut child = Command::new(binary())
        .args(["connect", &send.to_string()])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()?;
    let mut stdin = child.stdin.take().context("stdin")?;
    stdin.write_all(b"line one\nline two\n")?;
    // Closing stdin is a half-close: the echo still comes back, then EOF.
    drop(stdin);
    let out = child.wait_with_output()?;
    assert!(out.status.success());
    assert_eq!(out.stdout, b"line one\nline two\n");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn connect_fails_with_the_reason_and_exit_code_1() -> Result<()> {
    let relay = Relay::start()?;
    let closed: SocketAddr = {
        let l = std::net::TcpListener::bind("127.0.0.1:0")?;
        l.local_addr()?
    };
    let (send, listen) = relay.create_hc("gone", closed)?;
    let agent = Agent::start(&[&listen], &[])?;
    agent.wait_connected()?;
    let out = Command::new(binary())
        .args(["connect", &send.to_string()])
        .stdin(Stdio::null())
        .output()?;
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("refused the connection"), "{stderr}");

    // A connection string with a field missing is a usage error (2) that
    // names the field.
    let broken = send
        .to_string()
        .replace("SharedAccessKey=", "SharedAccessKeyX=");
    let out = Command::new(binary()).args(["connect", &broken]).output()?;
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("SharedAccessKey"), "{stderr}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn forward_serves_a_local_port_and_resets_refused_streams() -> Result<()> {
    let relay = Relay::start()?;
    let echo = echo_server().await?;
    let (send, listen) = relay.create_hc("fwd", echo)?;
    let agent = Agent::start(&[&listen], &[])?;
    agent.wait_connected()?;
    let mut forward = Proc::start(
        "forward",
        &[
            "forward",
            "--listen",
            "127.0.0.1:0",
            "--wait",
            "2",
            &send.to_string(),
        ],
    )?;
    let local: SocketAddr = forward.ready_line()?["listen"]
        .as_str()
        .context("listen")?
        .parse()?;
    let mut conns = Vec::new();
    for i in 0..5 {
        let mut c = TcpStream::connect(local)?;
        let msg = format!("client {i}");
        c.write_all(msg.as_bytes())?;
        let mut back = vec![0u8; msg.len()];
        c.read_exact(&mut back)?;
        assert_eq!(back, msg.as_bytes());
        conns.push(c);
    }

    // Stop the target: new local connections are reset, not accepted-and-closed.
    drop(agent);
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let mut c = TcpStream::connect(local)?;
        c.set_read_timeout(Some(Duration::from_secs(15)))?;
        let _ = c.write_all(b"x");
        let mut buf = [0u8; 1];
        match c.read(&mut buf) {
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => break,
            other => {
                assert!(Instant::now() < deadline, "no reset, got {other:?}");
                std::thread::sleep(Duration::from_millis(200));
            }
        }
    }
    Ok(())
}
