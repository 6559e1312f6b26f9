//! Prometheus metrics of the relay and the agent after a known amount of
//! traffic: the counters say exactly what happened.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{Command, Stdio};

use anyhow::{Context, Result, ensure};
use hybridlink_tests::{Agent, Proc, binary};

fn scrape(addr: &str) -> Result<String> {
    let mut conn = TcpStream::connect(addr)?;
    conn.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")?;
    let mut text = String::new();
    conn.read_to_string(&mut text)?;
    ensure!(text.starts_with("HTTP/1.1 200"), "{text}");
    Ok(text)
}

/// The value of the sample whose name and labels are `series`.
fn value(text: &str, series: &str) -> f64 {
    text.lines()
        .find(|l| l.starts_with(series) && l[series.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}

fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

#[test]
fn relay_and_agent_count_streams_bytes_and_refusals() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let data = dir.path().to_str().context("utf-8")?;
    let mut relay_proc = Proc::start(
        "relay",
        &[
            "relay",
            "serve",
            "--data-dir",
            data,
            "--listen",
            "127.0.0.1:0",
            "--api",
            "127.0.0.1:0",
            "--metrics",
            "127.0.0.1:0",
        ],
    )?;
    let ready = relay_proc.ready_line()?;
    let relay_metrics = ready["metrics"]
        .as_str()
        .context("metrics address in the ready line")?
        .to_string();
    let api: SocketAddr = ready["api"].as_str().context("api")?.parse()?;
    let hc = |args: &[&str]| -> Result<serde_json::Value> {
        let out = Command::new(binary())
            .args([
                "hc",
                "--json",
                "--api",
                &format!("http://{api}"),
                "--data-dir",
                data,
            ])
            .args(args)
            .output()?;
        ensure!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(serde_json::from_slice(&out.stdout)?)
    };
    // A sink that reads everything and answers with its byte count.
    let sink = std::net::TcpListener::bind("127.0.0.1:0")?;
    let sink_addr = sink.local_addr()?;
    std::thread::spawn(move || {
        for conn in sink.incoming().flatten() {
            let mut conn = conn;
            let mut all = Vec::new();
            let _ = conn.read_to_end(&mut all);
            let _ = conn.write_all(format!("{}\n", all.len()).as_bytes());
        }
    });
    let closed = free_port()?;
    let string = |keys: &serde_json::Value, rule: &str| -> Result<String> {
        Ok(keys["connection_strings"][rule]["primary"]
            .as_str()
            .context("string")?
            .to_string())
    };
    let payroll = hc(&[
        "create",
        "payroll",
        "--host",
        "127.0.0.1",
        "--port",
        &sink_addr.port().to_string(),
    ])?;
    let stopped = hc(&[
        "create",
        "stopped",
        "--host",
        "127.0.0.1",
        "--port",
        &closed.to_string(),
    ])?;
    let metrics_port = free_port()?;
    let agent_metrics = format!("127.0.0.1:{metrics_port}");
    let listen: Vec<proto::connection_string::ConnectionString> = [&payroll, &stopped]
        .iter()
        .map(|k| string(k, "listen").and_then(|s| s.parse().map_err(|e| anyhow::anyhow!("{e}"))))
        .collect::<Result<_>>()?;
    let agent = Agent::start(&[&listen[0], &listen[1]], &["--metrics", &agent_metrics])?;
    agent.wait_connected()?;

    // Three streams of 100 000 bytes each to payroll, two refused on stopped.
    const BYTES: usize = 100_000;
    for _ in 0..3 {
        let mut child = Command::new(binary())
            .args(["connect", &string(&payroll, "send")?])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()?;
        child
            .stdin
            .take()
            .context("stdin")?
            .write_all(&vec![7u8; BYTES])?;
        let out = child.wait_with_output()?;
        ensure!(
            String::from_utf8_lossy(&out.stdout) == format!("{BYTES}\n"),
            "{:?}",
            out
        );
    }
    for _ in 0..2 {
        let out = Command::new(binary())
            .args(["connect", "--check", &string(&stopped, "send")?])
            .output()?;
        ensure!(!out.status.success());
    }
    // A session with a forged key is refused by the relay.
    let mut forged: proto::connection_string::ConnectionString = string(&payroll, "send")?
        .parse()
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    forged.key = "Zm9yZ2VkLWtleS1mb3JnZWQta2V5LWZvcmdlZC1rZXk="
        .parse()
        .map_err(|e| anyhow::anyhow!("{e:?}"))?;
    let out = Command::new(binary())
        .args(["connect", "--check", "--wait", "2", &forged.to_string()])
        .output()?;
    ensure!(!out.status.success());

    let m = scrape(&agent_metrics)?;
    let digits = BYTES.to_string().len() + 1;
    for (series, want) in [
        ("hybridlink_agent_streams_opened_total{hc=\"payroll\"}", 3.0),
        (
            "hybridlink_agent_streams_refused_total{hc=\"stopped\",reason=\"refused\"}",
            2.0,
        ),
        ("hybridlink_agent_streams_active{hc=\"payroll\"}", 0.0),
        (
            "hybridlink_agent_bytes_total{hc=\"payroll\",direction=\"to_target\"}",
            (3 * BYTES) as f64,
        ),
        (
            "hybridlink_agent_bytes_total{hc=\"payroll\",direction=\"from_target\"}",
            (3 * digits) as f64,
        ),
    ] {
        ensure!(
            value(&m, series) == want,
            "{series}: want {want}, got {}\n{m}",
            value(&m, series)
        );
    }
    ensure!(m.contains("hybridlink_agent_reconnects_total"), "{m}");

    let r = scrape(&relay_metrics)?;
    ensure!(
        value(&r, "hybridlink_relay_hybrid_connections") == 2.0,
        "{r}"
    );
    ensure!(
        value(&r, "hybridlink_relay_listeners{hc=\"payroll\"}") == 1.0,
        "{r}"
    );
    ensure!(
        value(
            &r,
            "hybridlink_relay_refused_total{reason=\"unauthorized\"}"
        ) >= 1.0,
        "{r}"
    );
    ensure!(value(&r, "hybridlink_relay_pipes_total") >= 3.0, "{r}");
    // The pipes carried the payload, encrypted: at least as many bytes.
    ensure!(
        value(
            &r,
            "hybridlink_relay_pipe_bytes_total{reason=\"sender_to_agent\"}"
        ) >= (3 * BYTES) as f64,
        "{r}"
    );
    drop(relay_proc);
    Ok(())
}
