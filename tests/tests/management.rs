//! The key lifecycle and management as an operator sees them, with the real
//! binaries on loopback: regenerate (old strings refused with that reason,
//! open streams kept), endpoint update without restarts, status, quotas, and
//! a relay killed in the middle of a burst of creates.

use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpListener};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use hybridlink_tests::{Agent, OpenStream, Relay, binary, echo_server_thread, wait_for};
use proto::connection_string::ConnectionString;

/// A server that greets every connection with `banner` and closes.
fn banner_server(banner: &'static str) -> Result<SocketAddr> {
    let listener = TcpListener::bind("127.0.0.1:0")?;
    let addr = listener.local_addr()?;
    std::thread::spawn(move || {
        for conn in listener.incoming().flatten() {
            let mut conn = conn;
            let _ = conn.write_all(banner.as_bytes());
        }
    });
    Ok(addr)
}

/// `hybridlink connect CS` with stdin closed: what the target said, or the
/// failure's stderr.
fn connect_read(cs: &ConnectionString) -> Result<std::result::Result<String, String>> {
    let out = Command::new(binary())
        .args(["connect", &cs.to_string()])
        .stdin(Stdio::null())
        .output()?;
    Ok(if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    })
}

fn check(cs: &ConnectionString) -> Result<std::process::Output> {
    Ok(Command::new(binary())
        .args(["connect", "--check", "--wait", "5", &cs.to_string()])
        .output()?)
}

fn string_of(keys: &serde_json::Value, rule: &str, slot: &str) -> Result<ConnectionString> {
    keys["connection_strings"][rule][slot]
        .as_str()
        .context("string")?
        .parse()
        .map_err(|e| anyhow::anyhow!("{e}"))
}

#[test]
fn a_regenerated_key_is_refused_with_that_reason_and_open_streams_go_on() -> Result<()> {
    let relay = Relay::start()?;
    let (send, listen) = relay.create_hc("payroll", echo_server_thread()?)?;
    let agent = Agent::start(&[&listen], &[])?;
    agent.wait_connected()?;

    // A stream opened before the regeneration.
    let mut open = OpenStream::open(&send)?;
    assert_eq!(open.echo("before\n")?, "before\n");

    let keys = relay.hc(&[
        "regenerate",
        "payroll",
        "--rule",
        "send",
        "--key",
        "primary",
    ])?;
    let new_send = string_of(&keys, "send", "primary")?;
    assert_ne!(new_send.key, send.key);

    // The open stream goes on (documented in ARCHITECTURE.md).
    assert_eq!(
        open.echo("after\n")?,
        "after\n",
        "the open stream was cut by the regeneration"
    );
    open.close();

    // A new session with the old string is refused, saying why.
    let out = check(&send)?;
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("the key of this connection string was regenerated ("),
        "{err}"
    );
    assert!(err.contains("hc keys payroll"), "{err}");
    // The new string works, and so does the untouched secondary.
    let out = check(&new_send)?;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("reachable"));
    assert!(
        check(&string_of(&keys, "send", "secondary")?)?
            .status
            .success()
    );

    // The agent's key: regenerated, the agent is detached at once and says why.
    relay.hc(&[
        "regenerate",
        "payroll",
        "--rule",
        "listen",
        "--key",
        "primary",
    ])?;
    wait_for("the agent being denied", 5, || {
        let status = agent.status()?;
        let c = &status[0]["connection"];
        Ok(c["state"] == "denied"
            && c["reason"]
                .as_str()
                .unwrap_or("")
                .contains("the key of this connection string was regenerated"))
    })?;
    let out = check(&new_send)?;
    assert!(!out.status.success(), "a stream opened with no agent left");
    Ok(())
}

#[test]
fn update_moves_new_streams_to_the_new_endpoint_without_restarts() -> Result<()> {
    let relay = Relay::start()?;
    let old = banner_server("old target\n")?;
    let new = banner_server("new target\n")?;
    let (send, listen) = relay.create_hc("payroll", old)?;
    let agent = Agent::start(&[&listen], &[])?;
    agent.wait_connected()?;
    assert_eq!(connect_read(&send)?, Ok("old target\n".into()));

    let out = relay
        .hc_command()?
        .args(["update", "payroll", "--port", &new.port().to_string()])
        .output()?;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        String::from_utf8_lossy(&out.stdout).contains(&format!("now reaches {new}")),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    wait_for("the agent learning the new endpoint", 5, || {
        Ok(agent.status()?[0]["endpoint"] == new.to_string())
    })?;
    assert_eq!(connect_read(&send)?, Ok("new target\n".into()));
    // Bad updates are refused, the endpoint stays.
    let out = relay
        .hc_command()?
        .args(["update", "payroll", "--port", "0"])
        .output()?;
    assert_eq!(out.status.code(), Some(2));
    let out = relay.hc_command()?.args(["update", "payroll"]).output()?;
    assert_eq!(out.status.code(), Some(2));
    let out = relay
        .hc_command()?
        .args(["update", "nobody", "--port", "1"])
        .output()?;
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("does not exist"));
    assert_eq!(relay.hc(&["show", "payroll"])?["endpoint"], new.to_string());
    Ok(())
}

#[test]
fn status_shows_each_agent_and_not_connected_when_none() -> Result<()> {
    let relay = Relay::start()?;
    let (_, listen) = relay.create_hc("payroll", echo_server_thread()?)?;
    relay.create_hc("idle", echo_server_thread()?)?;
    let mut agent = Agent::start(&[&listen], &["--label", "dc1-agent"])?;
    agent.wait_connected()?;

    let status = relay.hc(&["status", "payroll"])?;
    assert_eq!(status["status"], "Connected", "{status}");
    assert_eq!(status["listener_count"], 1);
    assert_eq!(status["listeners"][0]["label"], "dc1-agent");
    assert!(
        status["listeners"][0]["address"]
            .as_str()
            .unwrap_or("")
            .starts_with("127.0.0.1:")
    );
    let out = relay.hc_command()?.arg("list").output()?;
    let table = String::from_utf8_lossy(&out.stdout);
    let row = |name: &str| {
        table
            .lines()
            .find(|l| l.starts_with(name))
            .unwrap_or("")
            .to_string()
    };
    assert!(
        row("payroll").contains("Connected") && row("payroll").contains("dc1-agent"),
        "{table}"
    );
    assert!(row("idle").contains("Not connected"), "{table}");

    // The agent reports its streams: after one echo, the relay's status
    // shows it opened, closed, with its bytes each way.
    let send = relay.strings("payroll")?.0;
    let mut child = Command::new(binary())
        .args(["connect", &send.to_string()])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()?;
    child
        .stdin
        .take()
        .context("stdin")?
        .write_all(b"twelve bytes")?;
    let out = child.wait_with_output()?;
    assert_eq!(out.stdout, b"twelve bytes");
    wait_for("the agent's stream counters at the relay", 10, || {
        let s = &relay.hc(&["status", "payroll"])?["streams"];
        Ok(s["opened"] == 1
            && s["open"] == 0
            && s["bytes_to_target"] == 12
            && s["bytes_from_target"] == 12)
    })?;
    let out = relay.hc_command()?.args(["show", "payroll"]).output()?;
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("streams:   0 open, 1 opened, 0 refused"),
        "{text}"
    );

    agent.proc.kill();
    wait_for("payroll showing Not connected", 16, || {
        Ok(relay.hc(&["status", "payroll"])?["status"] == "Not connected")
    })?;
    Ok(())
}

#[test]
fn quotas_are_enforced_with_clear_errors() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let relay = Relay::start_with(
        dir.path(),
        "127.0.0.1:0",
        &["--max-hcs", "1", "--max-listeners", "1"],
    )?;
    let (_, listen) = relay.create_hc("payroll", echo_server_thread()?)?;
    let out = relay
        .hc_command()?
        .args(["create", "more", "--host", "h.corp", "--port", "80"])
        .output()?;
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("already holds 1 hybrid connections, its limit"),
        "{err}"
    );

    // Pipes: one sender holds the only one; the next sender is told why not.
    let pipes_dir = tempfile::tempdir()?;
    let narrow = Relay::start_with(pipes_dir.path(), "127.0.0.1:0", &["--max-pipes", "1"])?;
    let (narrow_send, narrow_listen) = narrow.create_hc("payroll", echo_server_thread()?)?;
    let narrow_agent = Agent::start(&[&narrow_listen], &[])?;
    narrow_agent.wait_connected()?;
    let mut holder = OpenStream::open(&narrow_send)?;
    assert_eq!(holder.echo("hold\n")?, "hold\n");
    let out = check(&narrow_send)?;
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "a second pipe opened past --max-pipes 1"
    );
    assert!(err.contains("limit of 1 concurrent pipes"), "{err}");
    holder.close();

    let first = Agent::start(&[&listen], &[])?;
    first.wait_connected()?;
    let second = Agent::start(&[&listen], &[])?;
    wait_for("the second agent being refused", 10, || {
        // Its status socket appears a moment after it starts.
        let Ok(status) = second.status() else {
            return Ok(false);
        };
        let c = &status[0]["connection"];
        Ok(c["state"] == "denied"
            && c["reason"]
                .as_str()
                .unwrap_or("")
                .contains("already has 1 listeners"))
    })?;
    Ok(())
}

#[test]
fn a_relay_killed_during_a_burst_of_creates_restarts_consistent() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let mut relay = Relay::start_with(dir.path(), "127.0.0.1:0", &[])?;
    for round in 0..3 {
        let api = relay.api;
        let data_dir = relay.data_dir.clone();
        let stop = Arc::new(AtomicBool::new(false));
        let stop_burst = stop.clone();
        // Creates as fast as the CLI goes; remembers which ones succeeded.
        let burst = std::thread::spawn(move || {
            let mut ok = Vec::new();
            for i in 0.. {
                if stop_burst.load(Ordering::Relaxed) {
                    break;
                }
                let name = format!("r{round}-hc{i}");
                let out = Command::new(binary())
                    .args(["hc", "--api", &format!("http://{api}"), "--data-dir"])
                    .arg(&data_dir)
                    .args(["create", &name, "--host", "h.corp", "--port", "80"])
                    .output()
                    .expect("hc runs");
                if out.status.success() {
                    ok.push(name);
                } else {
                    break;
                }
            }
            ok
        });
        std::thread::sleep(Duration::from_millis(400 + 300 * round));
        relay.proc.kill(); // SIGKILL, mid-burst
        stop.store(true, Ordering::Relaxed);
        let created = burst.join().expect("burst thread");
        ensure!(
            created.len() >= 3,
            "round {round}: only {} creates before the kill",
            created.len()
        );
        relay.restart()?;
        let list = relay.hc(&["list"])?;
        let names: Vec<&str> = list
            .as_array()
            .context("list")?
            .iter()
            .filter_map(|hc| hc["name"].as_str())
            .collect();
        for name in &created {
            ensure!(
                names.contains(&name.as_str()),
                "round {round}: {name} was acknowledged but is gone"
            );
        }
        // Every HC on disk is whole: its keys are there and valid.
        for name in &names {
            let keys = relay.hc(&["keys", name])?;
            string_of(&keys, "listen", "secondary")?;
        }
    }
    Ok(())
}

/// `hybridlink forward` on a kernel-chosen port; returns the process and
/// its port.
fn forward(cs: &ConnectionString) -> Result<(hybridlink_tests::Proc, u16)> {
    let mut proc = hybridlink_tests::Proc::start(
        "forward",
        &["forward", "--listen", "127.0.0.1:0", &cs.to_string()],
    )?;
    let ready = proc.ready_line()?;
    let addr: SocketAddr = ready["listen"].as_str().context("listen")?.parse()?;
    Ok((proc, addr.port()))
}

fn agent_reload(agent: &Agent) -> Result<String> {
    let out = Command::new(binary())
        .args(["agent", "reload", "--status-socket"])
        .arg(&agent.status_socket)
        .output()?;
    ensure!(
        out.status.success(),
        "agent reload: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The rotation procedure of the README, while a client keeps connecting:
/// both sides move to the secondary keys, the primaries are regenerated,
/// both sides move back to the new primaries. Not one connection fails, and
/// the agent is never restarted.
#[test]
fn keys_rotate_with_zero_failed_connections() -> Result<()> {
    use std::sync::atomic::{AtomicU16, AtomicU64};
    let relay = Relay::start()?;
    relay.create_hc("payroll", echo_server_thread()?)?;
    let keys = relay.hc(&["keys", "payroll"])?;
    let dir = tempfile::tempdir()?;
    let file = dir.path().join("agent.conf");
    std::fs::write(
        &file,
        format!("{}\n", string_of(&keys, "listen", "primary")?),
    )?;
    let file_arg = file.to_str().context("utf-8")?;
    let agent = Agent::start(&[], &["--connection-strings-file", file_arg])?;
    agent.wait_connected()?;
    let agent_pid = agent.proc.pid();

    let (mut forward_primary, port) = forward(&string_of(&keys, "send", "primary")?)?;
    let current = Arc::new(AtomicU16::new(port));
    let stop = Arc::new(AtomicBool::new(false));
    let ok = Arc::new(AtomicU64::new(0));
    let client = {
        let (current, stop, ok) = (current.clone(), stop.clone(), ok.clone());
        std::thread::spawn(move || -> Vec<String> {
            let mut failures = Vec::new();
            let mut i = 0u64;
            while !stop.load(Ordering::Relaxed) {
                i += 1;
                let port = current.load(Ordering::Relaxed);
                let result = (|| -> std::io::Result<String> {
                    let conn = std::net::TcpStream::connect(("127.0.0.1", port))?;
                    conn.set_read_timeout(Some(Duration::from_secs(5)))?;
                    let mut writer = conn.try_clone()?;
                    writer.write_all(format!("ping {i}\n").as_bytes())?;
                    let mut line = String::new();
                    BufReader::new(conn).read_line(&mut line)?;
                    Ok(line)
                })();
                match result {
                    Ok(line) if line == format!("ping {i}\n") => {
                        ok.fetch_add(1, Ordering::Relaxed);
                    }
                    Ok(line) => failures.push(format!("#{i} on port {port}: answer {line:?}")),
                    Err(e) => failures.push(format!("#{i} on port {port}: {e}")),
                }
                std::thread::sleep(Duration::from_millis(5));
            }
            failures
        })
    };
    let settle = || std::thread::sleep(Duration::from_millis(400));
    settle();

    // 1. Both sides to the secondary keys.
    let (mut forward_secondary, port) = forward(&string_of(&keys, "send", "secondary")?)?;
    current.store(port, Ordering::Relaxed);
    settle();
    forward_primary.terminate();
    std::fs::write(
        &file,
        format!("{}\n", string_of(&keys, "listen", "secondary")?),
    )?;
    let said = agent_reload(&agent)?;
    ensure!(said.contains("changed payroll"), "{said}");
    settle();

    // 2. Regenerate both primaries: nobody uses them any more.
    relay.hc(&[
        "regenerate",
        "payroll",
        "--rule",
        "send",
        "--key",
        "primary",
    ])?;
    let keys = relay.hc(&[
        "regenerate",
        "payroll",
        "--rule",
        "listen",
        "--key",
        "primary",
    ])?;
    settle();

    // 3. Both sides back to the (new) primaries.
    std::fs::write(
        &file,
        format!("{}\n", string_of(&keys, "listen", "primary")?),
    )?;
    agent_reload(&agent)?;
    let (_forward_new, port) = forward(&string_of(&keys, "send", "primary")?)?;
    current.store(port, Ordering::Relaxed);
    settle();
    forward_secondary.terminate();
    settle();

    stop.store(true, Ordering::Relaxed);
    let failures = client.join().expect("client thread");
    let ok = ok.load(Ordering::Relaxed);
    ensure!(
        failures.is_empty(),
        "{} of {} connections failed: {failures:#?}",
        failures.len(),
        ok + failures.len() as u64
    );
    ensure!(ok >= 50, "only {ok} connections in the whole rotation");
    // The same agent process served throughout, now with one channel.
    ensure!(agent.proc.pid() == agent_pid);
    ensure!(agent.status()?[0]["connection"]["state"] == "connected");
    wait_for("the relay seeing exactly one agent", 5, || {
        Ok(relay.hc(&["status", "payroll"])?["listener_count"] == 1)
    })?;
    Ok(())
}

#[test]
fn an_agent_drains_open_streams_on_sigterm() -> Result<()> {
    let relay = Relay::start()?;
    let (send, listen) = relay.create_hc("payroll", echo_server_thread()?)?;
    let mut agent = Agent::start(&[&listen], &["--drain-timeout", "10"])?;
    agent.wait_connected()?;
    let mut open = OpenStream::open(&send)?;
    assert_eq!(open.echo("one\n")?, "one\n");

    // SIGTERM: out of rotation at once, but the open stream still works.
    let pid = agent.proc.pid().to_string();
    Command::new("kill").args(["-TERM", &pid]).status()?;
    wait_for("the agent leaving the rotation", 5, || {
        Ok(relay.hc(&["status", "payroll"])?["status"] == "Not connected")
    })?;
    assert_eq!(
        open.echo("two\n")?,
        "two\n",
        "the open stream was cut at SIGTERM"
    );
    // Closing the stream lets the agent finish.
    open.close();
    wait_for("the agent exiting after its last stream", 5, || {
        Ok(!std::path::Path::new(&format!("/proc/{pid}")).exists()
            || std::fs::read_to_string(format!("/proc/{pid}/stat"))
                .is_ok_and(|s| s.contains(") Z ")))
    })?;
    let _ = &mut agent;
    Ok(())
}

/// `hybridlink hc ARGS...` with only `env` for the manage key (no data dir).
fn hc_as(api: &[&str], key: &str, args: &[&str]) -> Result<std::process::Output> {
    Ok(Command::new(binary())
        .arg("hc")
        .args(api)
        .args(args)
        .env("HYBRIDLINK_MANAGE_KEY", key)
        .env_remove("HYBRIDLINK_DATA_DIR")
        .output()?)
}

#[test]
fn manage_keys_are_regenerated_one_at_a_time_and_the_old_one_is_refused() -> Result<()> {
    let mut relay = Relay::start()?;
    let api_url = format!("http://{}", relay.api);
    let keys = relay.hc(&["manage-keys", "show"])?;
    let primary = keys["primary"].as_str().context("primary")?.to_owned();
    let secondary = keys["secondary"].as_str().context("secondary")?.to_owned();
    let on_disk = || -> Result<String> {
        Ok(std::fs::read_to_string(relay.data_dir.join("manage.key"))?
            .trim()
            .to_owned())
    };
    assert_eq!(on_disk()?, primary);
    let api = ["--api", api_url.as_str()];
    for key in [&primary, &secondary] {
        ensure!(hc_as(&api, key, &["list"])?.status.success());
    }

    // Signed in with the primary (manage.key), regenerate the secondary.
    let after = relay.hc(&["manage-keys", "regenerate", "--key", "secondary"])?;
    ensure!(after["primary"] == primary.as_str(), "{after}");
    let new_secondary = after["secondary"].as_str().context("secondary")?.to_owned();
    ensure!(new_secondary != secondary);
    let out = hc_as(&api, &secondary, &["list"])?;
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    ensure!(
        stderr.contains("management token refused") && stderr.contains("regenerated"),
        "{stderr}"
    );
    ensure!(hc_as(&api, &primary, &["list"])?.status.success());
    ensure!(hc_as(&api, &new_secondary, &["list"])?.status.success());

    // Signed in with the new secondary, regenerate the primary: manage.key
    // follows, the old primary is refused, `--data-dir` works again.
    let out = hc_as(
        &api,
        &new_secondary,
        &["--json", "manage-keys", "regenerate", "--key", "primary"],
    )?;
    ensure!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let after: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    let new_primary = after["primary"].as_str().context("primary")?.to_owned();
    ensure!(new_primary != primary && after["secondary"] == new_secondary.as_str());
    assert_eq!(on_disk()?, new_primary);
    assert_eq!(hc_as(&api, &primary, &["list"])?.status.code(), Some(1));
    relay.hc(&["list"])?;
    let out = relay
        .hc_command()?
        .args(["manage-keys", "show", "--key", "secondary"])
        .output()?;
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), new_secondary);

    // Both survive a restart.
    relay.restart()?;
    let keys = relay.hc(&["manage-keys", "show"])?;
    ensure!(keys["primary"] == new_primary.as_str() && keys["secondary"] == new_secondary.as_str());
    Ok(())
}

/// A TCP proxy on loopback that records every byte the client sends.
fn recording_proxy(to: SocketAddr) -> Result<(SocketAddr, Arc<std::sync::Mutex<Vec<u8>>>)> {
    let listener = TcpListener::bind("127.0.0.1:0")?;
    let addr = listener.local_addr()?;
    let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
    let record = seen.clone();
    std::thread::spawn(move || {
        for client in listener.incoming().flatten() {
            let Ok(server) = std::net::TcpStream::connect(to) else {
                continue;
            };
            let (mut from_client, mut to_server) =
                (client.try_clone().unwrap(), server.try_clone().unwrap());
            let (mut from_server, mut to_client) = (server, client);
            let record = record.clone();
            std::thread::spawn(move || {
                let mut buf = [0u8; 4096];
                while let Ok(n @ 1..) = std::io::Read::read(&mut from_client, &mut buf) {
                    record.lock().unwrap().extend_from_slice(&buf[..n]);
                    if to_server.write_all(&buf[..n]).is_err() {
                        break;
                    }
                }
                let _ = to_server.shutdown(std::net::Shutdown::Write);
            });
            std::thread::spawn(move || {
                let _ = std::io::copy(&mut from_server, &mut to_client);
                let _ = to_client.shutdown(std::net::Shutdown::Write);
            });
        }
    });
    Ok((addr, seen))
}

#[test]
fn the_cli_manages_over_https_with_short_lived_tokens_and_the_key_never_leaves_it() -> Result<()> {
    let log_dir = tempfile::tempdir()?;
    let log = log_dir.path().join("relay.log");
    let relay = Relay::start_with_log(&["--api-tls"], &log)?;
    let https = format!("https://127.0.0.1:{}", relay.api.port());
    ensure!(relay.ready["api_url"] == https.as_str(), "{}", relay.ready);
    let pin = relay.ready["cert_sha256"].as_str().context("cert_sha256")?;
    let key = std::fs::read_to_string(relay.data_dir.join("manage.key"))?;
    let key = key.trim();
    let cert_pem = relay.data_dir.join("cert.pem");
    let cert_pem = cert_pem.to_str().context("utf-8")?;

    // Pinned by the fingerprint every connection string carries: the whole
    // life of a hybrid connection, from another "machine" (no data dir).
    let pinned = ["--api", https.as_str(), "--api-cert-sha256", pin];
    let run = |api: &[&str], args: &[&str]| -> Result<serde_json::Value> {
        let out = hc_as(api, key, &[&["--json"], args].concat())?;
        ensure!(
            out.status.success(),
            "hc {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(serde_json::from_slice(&out.stdout).unwrap_or(serde_json::Value::Null))
    };
    let created = run(
        &pinned,
        &[
            "create",
            "payroll",
            "--host",
            "payroll.corp",
            "--port",
            "80",
        ],
    )?;
    ensure!(created["endpoint"] == "payroll.corp:80", "{created}");
    let send = string_of(&run(&pinned, &["keys", "payroll"])?, "send", "primary")?;
    ensure!(proto::control::hex_encode(&send.cert_sha256.context("pin")?) == pin);
    run(&pinned, &["update", "payroll", "--port", "8080"])?;
    run(
        &pinned,
        &[
            "regenerate",
            "payroll",
            "--rule",
            "send",
            "--key",
            "primary",
        ],
    )?;
    ensure!(run(&pinned, &["list"])?[0]["endpoint"] == "payroll.corp:8080");
    // The relay's cert.pem as the CA file works too (it names 127.0.0.1).
    run(
        &["--api", https.as_str(), "--api-ca", cert_pem],
        &["show", "payroll"],
    )?;
    run(&pinned, &["delete", "payroll"])?;

    // The wrong pin: refused before anything is sent.
    let wrong = "00".repeat(32);
    let out = hc_as(
        &["--api", https.as_str(), "--api-cert-sha256", &wrong],
        key,
        &["list"],
    )?;
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    ensure!(
        stderr.contains("is not the one --api-cert-sha256 or --api-ca names"),
        "{stderr}"
    );
    // https without saying what to trust, and plain http to a remote host.
    let out = hc_as(&["--api", https.as_str()], key, &["list"])?;
    ensure!(String::from_utf8_lossy(&out.stderr).contains("--api-cert-sha256 HEX"));
    let out = hc_as(&["--api", "http://relay.example.com:9444"], key, &["list"])?;
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    ensure!(
        stderr.contains("plain HTTP to a host that is not this one")
            && stderr.contains("--insecure"),
        "{stderr}"
    );

    // The relay saw tokens, never the key: not in its log...
    let logged = std::fs::read_to_string(&log)?;
    ensure!(logged.contains("hybrid connection created"), "{logged}");
    ensure!(!logged.contains(key), "the relay logged the manage key");

    // ...and not on the wire: a plain-HTTP relay behind a recorder.
    let plain = Relay::start()?;
    let (proxy, seen) = recording_proxy(plain.api)?;
    let plain_key = std::fs::read_to_string(plain.data_dir.join("manage.key"))?;
    let out = hc_as(
        &["--api", &format!("http://{proxy}")],
        plain_key.trim(),
        &["list"],
    )?;
    ensure!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let wire = String::from_utf8_lossy(&seen.lock().map_err(|_| anyhow::anyhow!("poisoned"))?)
        .into_owned();
    ensure!(wire.contains("SharedAccessSignature sr="), "{wire}");
    ensure!(
        !wire.contains(plain_key.trim()),
        "the key crossed the wire: {wire}"
    );
    Ok(())
}
