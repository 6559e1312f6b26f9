//! hybridlink's own peers over Azure Relay's protocol, through a
//! hybridlink relay's Azure front door: the agent as an Azure-protocol
//! listener (strings without `CertificateSha256`, the relay's certificate
//! trusted with `--ca-file`, the endpoint from `--endpoint`) and `connect` /
//! `forward` as senders; and each of them against Azure Relay's own Node
//! client, `hyco-ws`, also standing in for azbridge's two ends (its stream
//! preamble, as azbridge's public source defines it: azbridge itself is a
//! .NET program that cannot be installed on this machine).

use std::io::{Read, Write};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use hybridlink_tests::{Agent, Proc, Relay, azure_node_clients, azure_style, binary};
use proto::connection_string::ConnectionString;

/// A closed loopback port: bound, then let go.
fn closed_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// `hybridlink connect` over the Azure protocol with `send`, trusting the
/// relay's certificate as a CA: `input` on stdin; (success, stdout,
/// stderr).
fn connect(
    relay: &Relay,
    send: &ConnectionString,
    args: &[&str],
    input: &[u8],
) -> Result<(bool, Vec<u8>, String)> {
    let mut child = Command::new(binary())
        .arg("connect")
        .args(args)
        .args(["--wait", "5", "--ca-file"])
        .arg(relay.data_dir.join("cert.pem"))
        .env("HYBRIDLINK_CONNECTION_STRING", send.to_string())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    let mut stdin = child.stdin.take().context("stdin")?;
    let input = input.to_vec();
    let feeder = std::thread::spawn(move || {
        let _ = stdin.write_all(&input);
    });
    let mut stdout = child.stdout.take().context("stdout")?;
    let reader = std::thread::spawn(move || {
        let mut out = Vec::new();
        let _ = stdout.read_to_end(&mut out);
        out
    });
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            anyhow::bail!("connect did not finish within 30 s");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let _ = feeder.join();
    let out = reader
        .join()
        .map_err(|_| anyhow::anyhow!("reader panicked"))?;
    let mut err = String::new();
    child
        .stderr
        .take()
        .context("stderr")?
        .read_to_string(&mut err)?;
    Ok((status.success(), out, err))
}

/// An agent serving `strings` over the Azure protocol with these
/// `--endpoint`s and policy text.
fn agent(
    relay: &Relay,
    strings: &[&ConnectionString],
    endpoints: &[String],
    policy: Option<&Path>,
) -> Result<Agent> {
    let cert = relay.data_dir.join("cert.pem");
    let mut extra: Vec<String> = vec!["--ca-file".into(), cert.display().to_string()];
    for e in endpoints {
        extra.push("--endpoint".into());
        extra.push(e.clone());
    }
    if let Some(policy) = policy {
        extra.push("--policy".into());
        extra.push(policy.display().to_string());
    }
    let extra: Vec<&str> = extra.iter().map(String::as_str).collect();
    let agent = Agent::start(strings, &extra)?;
    // Connected, or shown refused by the policy (the state says so first).
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let status = agent.status().unwrap_or_default();
        let up = status.as_array().is_some_and(|hcs| {
            hcs.len() == strings.len()
                && hcs.iter().all(|h| {
                    let state = &h["connection"]["state"];
                    state == "connected" || state == "denied_by_policy"
                })
        });
        if up {
            return Ok(agent);
        }
        ensure!(Instant::now() < deadline, "agent not connected: {status}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A Node script with Azure's clients, told where the relay is.
fn node(dir: &Path, relay: &Relay, script: &str, env: &[(&str, &str)]) -> Command {
    let mut command = Command::new("node");
    command
        .args(["-e", script])
        .env("NODE_PATH", dir.join("node_modules"))
        .env("NODE_EXTRA_CA_CERTS", relay.data_dir.join("cert.pem"))
        .env("RELAY", format!("127.0.0.1:{}", relay.listen.port()));
    for (k, v) in env {
        command.env(k, v);
    }
    command
}

/// Runs a Node sender script to its end; its stdout, or why it failed.
fn run_node(mut command: Command, what: &str) -> Result<String> {
    let out = command
        .output()
        .with_context(|| format!("starting {what}"))?;
    ensure!(
        out.status.success(),
        "{what} failed ({}): {}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

#[test]
fn an_agent_and_connect_carry_streams_over_the_azure_protocol_with_faithful_refusals() -> Result<()>
{
    let relay = Relay::start()?;
    let echo = hybridlink_tests::echo_server_thread()?;
    let closed = closed_port()?;
    let (send, listen) = relay.create_hc("payroll", echo)?;
    let (send_closed, listen_closed) = relay.create_hc("closed", "127.0.0.1:9".parse()?)?;
    let (send_secret, listen_secret) = relay.create_hc("secret", "127.0.0.1:9".parse()?)?;
    let dir = tempfile::tempdir()?;
    let policy = dir.path().join("policy.toml");
    std::fs::write(
        &policy,
        format!(
            "[[allow]]\nhost = \"127.0.0.1\"\nports = [{}, {closed}]\n",
            echo.port()
        ),
    )?;
    let (listen, listen_closed, listen_secret) = (
        azure_style(&listen),
        azure_style(&listen_closed),
        azure_style(&listen_secret),
    );
    let agent_proc = agent(
        &relay,
        &[&listen, &listen_closed, &listen_secret],
        &[
            format!("payroll={echo}"),
            format!("closed=127.0.0.1:{closed}"),
            // Allowed by no rule of the on-prem policy.
            "secret=127.0.0.1:22".into(),
        ],
        Some(&policy),
    )?;

    let status = agent_proc.status()?;
    ensure!(
        status
            .as_array()
            .is_some_and(|hcs| hcs.iter().all(|h| h["end_to_end"] == "relay-sees-payload")),
        "the agent's status does not say the relay sees these streams: {status}"
    );

    // 4 MiB there and back, byte-exact; connect's stdin ends first (a
    // half-close) and the echoed rest still arrives.
    let data: Vec<u8> = (0..4u32 << 20)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    let (ok, out, err) = connect(&relay, &azure_style(&send), &[], &data)?;
    ensure!(ok, "connect failed: {err}");
    ensure!(
        out.len() == data.len() && out == data,
        "{} of {} bytes came back intact",
        out.len(),
        data.len()
    );

    // forward: one local connection, one stream; a refused one is reset.
    let cert = relay.data_dir.join("cert.pem");
    let cert = cert.to_str().context("utf-8")?;
    let for_send = azure_style(&send).to_string();
    let mut forward = Proc::start(
        "forward",
        &[
            "forward",
            "--listen",
            "127.0.0.1:0",
            "--ca-file",
            cert,
            &for_send,
        ],
    )?;
    let local = forward.ready_line()?["listen"]
        .as_str()
        .context("listen address")?
        .to_string();
    let mut conn = std::net::TcpStream::connect(&local)?;
    conn.write_all(b"through forward")?;
    conn.shutdown(std::net::Shutdown::Write)?;
    let mut echoed = Vec::new();
    conn.read_to_end(&mut echoed)?;
    ensure!(
        echoed == b"through forward",
        "{:?}",
        String::from_utf8_lossy(&echoed)
    );
    let for_closed = azure_style(&send_closed).to_string();
    let mut forward_closed = Proc::start(
        "forward",
        &[
            "forward",
            "--listen",
            "127.0.0.1:0",
            "--ca-file",
            cert,
            &for_closed,
        ],
    )?;
    let local = forward_closed.ready_line()?["listen"]
        .as_str()
        .context("listen address")?
        .to_string();
    let mut conn = std::net::TcpStream::connect(&local)?;
    conn.set_read_timeout(Some(Duration::from_secs(10)))?;
    let got = conn.read(&mut [0u8; 16]);
    ensure!(
        got.as_ref()
            .is_err_and(|e| e.kind() == std::io::ErrorKind::ConnectionReset),
        "a refused target through forward: {got:?}"
    );

    let (ok, _, err) = connect(&relay, &azure_style(&send_closed), &["--check"], b"")?;
    ensure!(
        !ok && err.contains("refused the connection"),
        "a refused target: {err}"
    );
    let (ok, _, err) = connect(&relay, &azure_style(&send_secret), &["--check"], b"")?;
    ensure!(
        !ok && err.contains("on-prem policy refuses"),
        "a target the policy refuses: {err}"
    );
    let (ok, _, err) = connect(&relay, &listen, &["--check"], b"")?;
    ensure!(
        !ok && err.contains("listen string"),
        "a listen string given to a sender: {err}"
    );
    Ok(())
}

#[test]
fn an_untrusted_certificate_and_a_missing_endpoint_are_clear_errors() -> Result<()> {
    let relay = Relay::start()?;
    let (send, listen) = relay.create_hc("payroll", "127.0.0.1:9".parse()?)?;
    // No --ca-file: the system's roots do not know the relay's own
    // certificate.
    let out = Command::new(binary())
        .args(["connect", "--check", "--wait", "3"])
        .env(
            "HYBRIDLINK_CONNECTION_STRING",
            azure_style(&send).to_string(),
        )
        .output()?;
    let err = String::from_utf8_lossy(&out.stderr);
    ensure!(!out.status.success() && err.contains("--ca-file"), "{err}");

    let out = Command::new(binary())
        .args(["agent", "run", "--status-socket", "/nonexistent/agent.sock"])
        .env(
            "HYBRIDLINK_CONNECTION_STRING",
            azure_style(&listen).to_string(),
        )
        .output()?;
    let err = String::from_utf8_lossy(&out.stderr);
    ensure!(
        !out.status.success() && err.contains("--endpoint payroll=HOST:PORT"),
        "an agent without --endpoint: {err}"
    );

    // A pinned string against a relay presenting another certificate (as
    // Azure's service would): the error says which way out fits.
    let mut other_pin = send.clone();
    other_pin.cert_sha256 = Some([7; 32]);
    let out = Command::new(binary())
        .args(["connect", "--check", "--wait", "3"])
        .env("HYBRIDLINK_CONNECTION_STRING", other_pin.to_string())
        .output()?;
    let err = String::from_utf8_lossy(&out.stderr);
    ensure!(
        !out.status.success()
            && err.contains("not the pinned")
            && err.contains("remove CertificateSha256"),
        "a pin the relay does not match: {err}"
    );

    // A namespace-level string (no EntityPath): how to use it.
    let text = azure_style(&send).to_string();
    let namespace_level = text.replace(";EntityPath=payroll", "");
    let out = Command::new(binary())
        .args(["connect", "--check"])
        .env("HYBRIDLINK_CONNECTION_STRING", namespace_level)
        .output()?;
    let err = String::from_utf8_lossy(&out.stderr);
    ensure!(
        !out.status.success() && err.contains("append") && err.contains(";EntityPath=NAME"),
        "a namespace-level string: {err}"
    );
    Ok(())
}

/// Azure's Node clients against hybridlink's peers: a hyco-ws sender
/// with raw data and one that speaks azbridge's preamble (as `azbridge
/// -L` does) reach a hybridlink agent; `connect` reaches a raw hyco-ws
/// listener and one that answers azbridge's preamble (as `azbridge -T`).
#[test]
fn azure_node_clients_and_azbridge_framing_meet_hybridlink_peers() -> Result<()> {
    let Some(dir) = azure_node_clients()? else {
        return Ok(());
    };
    let relay = Relay::start()?;
    let echo = hybridlink_tests::echo_server_thread()?;
    let (send, listen) = relay.create_hc("payroll", echo)?;
    let _agent = agent(&relay, &[&azure_style(&listen)], &[echo.to_string()], None)?;
    let send_env = [("HC", "payroll"), ("SEND_KEY", send.key.as_str())];

    let out = run_node(
        node(&dir, &relay, HYCO_SENDER, &send_env),
        "a raw hyco-ws sender",
    )?;
    ensure!(
        out == "echoed: raw bytes from hyco-ws\n",
        "raw sender: {out:?}"
    );
    let mut with_preamble = node(&dir, &relay, HYCO_SENDER, &send_env);
    with_preamble.env("PREAMBLE", "1433");
    let out = run_node(with_preamble, "hyco-ws speaking azbridge's preamble")?;
    ensure!(
        out == "preamble accepted: 01 00 00\nechoed: raw bytes from hyco-ws\n",
        "azbridge-framed sender: {out:?}"
    );

    // The other way round: a second hybrid connection served by hyco-ws.
    let (send2, listen2) = relay.create_hc("listener", "127.0.0.1:9".parse()?)?;
    let listen_env = [("HC", "listener"), ("LISTEN_KEY", listen2.key.as_str())];
    let raw = Proc::adopt(
        node(&dir, &relay, HYCO_LISTENER, &listen_env).spawn()?,
        "raw hyco-ws listener",
    );
    let send2 = azure_style(&send2);
    let answer = retry(|| connect(&relay, &send2, &["--framing", "raw"], b"ping"))?;
    ensure!(
        answer == b"pong: ping",
        "{:?}",
        String::from_utf8_lossy(&answer)
    );
    drop(raw);

    let mut azbridge = node(&dir, &relay, HYCO_LISTENER, &listen_env);
    azbridge.env("PREAMBLE", "1");
    let _azbridge = Proc::adopt(azbridge.spawn()?, "hyco-ws as azbridge -T");
    let answer = retry(|| connect(&relay, &send2, &["--port-name", "5432"], b"ping"))?;
    ensure!(
        answer == b"pong (port 5432): ping",
        "{:?}",
        String::from_utf8_lossy(&answer)
    );
    Ok(())
}

/// `connect` until a listener answers (a listener that just started may not
/// be attached yet): its output.
fn retry(mut attempt: impl FnMut() -> Result<(bool, Vec<u8>, String)>) -> Result<Vec<u8>> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (ok, out, err) = attempt()?;
        if ok && !out.is_empty() {
            return Ok(out);
        }
        ensure!(Instant::now() < deadline, "connect kept failing: {err}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// A hyco-ws sender: sends "raw bytes from hyco-ws" (after azbridge's
/// preamble when PREAMBLE names a port) and prints what comes back.
const HYCO_SENDER: &str = r#"
const WebSocket = require('hyco-ws');
const { RELAY, HC, SEND_KEY, PREAMBLE } = process.env;
const uri = `wss://${RELAY}/$hc/${HC}?sb-hc-action=connect`;
const ws = WebSocket.relayedConnect(uri, WebSocket.createRelayToken(uri, 'send', SEND_KEY));
let waitingForPreamble = !!PREAMBLE;
setTimeout(() => { console.log('timed out'); process.exit(1); }, 15000).unref();
ws.on('open', () => {
  if (PREAMBLE) {
    const name = Buffer.from(PREAMBLE);
    ws.send(Buffer.concat([Buffer.from([1, 0, 0, name.length]), name]), { binary: true });
  } else {
    ws.send(Buffer.from('raw bytes from hyco-ws'), { binary: true });
  }
});
ws.on('message', (m) => {
  const b = Buffer.from(m);
  if (waitingForPreamble) {
    waitingForPreamble = false;
    console.log('preamble accepted: ' + [...b].map((x) => x.toString(16).padStart(2, '0')).join(' '));
    ws.send(Buffer.from('raw bytes from hyco-ws'), { binary: true });
    return;
  }
  console.log('echoed: ' + b.toString());
  process.exit(0);
});
ws.on('error', (e) => { console.log('error: ' + e.message); process.exit(1); });
"#;

/// A hyco-ws listener answering each message with "pong: ..."; with
/// PREAMBLE set it first reads azbridge's preamble and answers [1, 0, 0],
/// as `azbridge -T` does.
const HYCO_LISTENER: &str = r#"
const WebSocket = require('hyco-ws');
const { RELAY, HC, LISTEN_KEY, PREAMBLE } = process.env;
const uri = `wss://${RELAY}/$hc/${HC}?sb-hc-action=listen`;
WebSocket.createRelayedServer(
  { server: uri, token: () => WebSocket.createRelayToken(uri, 'listen', LISTEN_KEY) },
  (ws) => {
    let port = null;
    ws.on('message', (m) => {
      const b = Buffer.from(m);
      if (PREAMBLE && port === null) {
        if (b[0] !== 1 || b[1] !== 0 || b[2] !== 0 || b.length !== 4 + b[3]) { ws.close(); return; }
        port = b.slice(4).toString();
        ws.send(Buffer.from([1, 0, 0]), { binary: true });
        return;
      }
      const prefix = PREAMBLE ? `pong (port ${port}): ` : 'pong: ';
      ws.send(Buffer.concat([Buffer.from(prefix), b]), { binary: true });
      ws.close();
    });
  });
"#;

/// With an end-to-end key in both strings, streams run TLS inside the
/// WebSocket and pass the end-to-end check; a sender without the key is
/// refused before the agent dials, and the agent's status says verified.
#[test]
fn an_end_to_end_key_is_checked_inside_the_websocket() -> Result<()> {
    let relay = Relay::start()?;
    let echo = hybridlink_tests::echo_server_thread()?;
    let (send, listen) = relay.create_hc("payroll", echo)?;
    let key = proto::key::Key::generate()?;
    let mut listen = azure_style(&listen);
    listen.end_to_end_key = Some(key.clone());
    let mut keyed = azure_style(&send);
    keyed.end_to_end_key = Some(key);
    let agent_proc = agent(&relay, &[&listen], &[echo.to_string()], None)?;
    let status = agent_proc.status()?;
    ensure!(status[0]["end_to_end"] == "verified", "{status}");

    let (ok, out, err) = connect(&relay, &keyed, &["--check"], b"")?;
    let out = String::from_utf8_lossy(&out);
    ensure!(ok && out.contains("TLS inside the WebSocket"), "{out}{err}");
    let (ok, out, err) = connect(&relay, &keyed, &[], b"verified bytes")?;
    ensure!(ok && out == b"verified bytes", "{err}");

    let (ok, _, err) = connect(&relay, &azure_style(&send), &["--check"], b"")?;
    ensure!(
        !ok && err.contains("sent no end-to-end proof"),
        "a sender without the key: {err}"
    );
    // Raw framing has no room for the proof: refused before anything is
    // sent, rather than sending the bytes unverified.
    let (ok, _, err) = connect(&relay, &keyed, &["--framing", "raw"], b"unverified")?;
    ensure!(
        !ok && err.contains("--framing raw cannot carry the end-to-end check"),
        "raw framing with a key: {err}"
    );
    // Azure's own client, which cannot prove the key, is refused by the
    // agent (403) before it dials.
    if let Some(dir) = azure_node_clients()? {
        let env = [("HC", "payroll"), ("SEND_KEY", send.key.as_str())];
        let out = node(&dir, &relay, HYCO_SENDER, &env).output()?;
        let said = String::from_utf8_lossy(&out.stdout);
        ensure!(
            !out.status.success() && said.contains("403"),
            "a hyco-ws sender to a keyed agent: {said}"
        );
    }
    Ok(())
}

/// A listen string served over the Azure protocol from the agent's
/// strings file carries its endpoint on its line (`endpoint=HOST:PORT`,
/// as `agent install --endpoint` writes it); a changed endpoint in the
/// file is served after `agent reload`.
#[test]
fn the_strings_file_gives_azure_endpoints_and_a_reload_moves_them() -> Result<()> {
    let relay = Relay::start()?;
    let echo = hybridlink_tests::echo_server_thread()?;
    // The second target greets and closes.
    let greeter = std::net::TcpListener::bind("127.0.0.1:0")?;
    let greeter_addr = greeter.local_addr()?;
    std::thread::spawn(move || {
        for mut conn in greeter.incoming().flatten() {
            let _ = conn.write_all(b"second target\n");
        }
    });
    let (send, listen) = relay.create_hc("payroll", echo)?;
    let dir = tempfile::tempdir()?;
    let file = dir.path().join("agent.conf");
    let listen = azure_style(&listen);
    std::fs::write(&file, format!("{listen} endpoint={echo}\n"))?;
    let cert = relay.data_dir.join("cert.pem");
    let agent = Agent::start_with_text(
        &[],
        &[
            "--connection-strings-file",
            file.to_str().context("utf-8")?,
            "--ca-file",
            cert.to_str().context("utf-8")?,
        ],
    )?;
    agent.wait_connected()?;
    let send = azure_style(&send);
    let (ok, out, err) = connect(&relay, &send, &[], b"first")?;
    ensure!(ok && out == b"first", "before the reload: {err}");

    std::fs::write(&file, format!("{listen} endpoint={greeter_addr}\n"))?;
    let out = Command::new(binary())
        .args(["agent", "reload", "--status-socket"])
        .arg(&agent.status_socket)
        .output()?;
    ensure!(
        out.status.success(),
        "agent reload: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    hybridlink_tests::wait_for("the moved endpoint", 20, || {
        let (ok, out, _) = connect(&relay, &send, &[], b"")?;
        Ok(ok && out == b"second target\n")
    })?;
    Ok(())
}

/// The on-prem policy holds for streams already open over the Azure
/// protocol: a policy that no longer allows the endpoint cuts them, and
/// new ones are refused.
#[test]
fn a_replaced_policy_cuts_open_azure_streams() -> Result<()> {
    let relay = Relay::start()?;
    let echo = hybridlink_tests::echo_server_thread()?;
    let (send, listen) = relay.create_hc("payroll", echo)?;
    let dir = tempfile::tempdir()?;
    let policy = dir.path().join("policy.toml");
    let allow = |port: u16| format!("[[allow]]\nhost = \"127.0.0.1\"\nports = [{port}]\n");
    std::fs::write(&policy, allow(echo.port()))?;
    let _agent = agent(
        &relay,
        &[&azure_style(&listen)],
        &[echo.to_string()],
        Some(&policy),
    )?;
    let mut open = Command::new(binary())
        .args(["connect", "--ca-file"])
        .arg(relay.data_dir.join("cert.pem"))
        .env(
            "HYBRIDLINK_CONNECTION_STRING",
            azure_style(&send).to_string(),
        )
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()?;
    let mut stdin = open.stdin.take().context("stdin")?;
    let mut stdout = open.stdout.take().context("stdout")?;
    stdin.write_all(b"still here\n")?;
    let mut line = [0u8; 11];
    stdout.read_exact(&mut line)?;
    ensure!(&line == b"still here\n", "the stream did not echo");

    // Only another port from now on: the open stream's endpoint is out.
    std::fs::write(&policy, allow(echo.port().wrapping_add(1)))?;
    let deadline = Instant::now() + Duration::from_secs(15);
    let cut = loop {
        if let Some(status) = open.try_wait()? {
            break Some(status);
        }
        if Instant::now() > deadline {
            break None;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    if cut.is_none() {
        let _ = open.kill();
        let _ = open.wait();
    }
    drop(stdin);
    ensure!(
        cut.is_some(),
        "the open stream outlived the policy that refused it"
    );
    let (ok, _, err) = connect(&relay, &azure_style(&send), &["--check"], b"")?;
    ensure!(
        !ok && err.contains("polic"),
        "a new stream after the change: {err}"
    );
    Ok(())
}
