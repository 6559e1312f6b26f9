//! The sending side for people without root, through the real binary:
//! `hybridlink connect` (stdin/stdout) and `hybridlink forward` (a local
//! port), and the CLI's exit codes and messages.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use hybridlink_tests::{Agent, Proc, Relay, binary, echo_server, relay_serve};

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

/// `hybridlink ARGS...` with `stdin` written to its standard input and
/// HYBRIDLINK_CONNECTION_STRING set to `env` (or unset).
fn run_with(args: &[&str], stdin: &str, env: Option<&str>) -> Result<std::process::Output> {
    let mut cmd = Command::new(binary());
    cmd.args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .env_remove("HYBRIDLINK_CONNECTION_STRING");
    if let Some(env) = env {
        cmd.env("HYBRIDLINK_CONNECTION_STRING", env);
    }
    let mut child = cmd.spawn()?;
    child
        .stdin
        .take()
        .context("stdin")?
        .write_all(stdin.as_bytes())?;
    Ok(child.wait_with_output()?)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn connection_strings_come_from_files_stdin_and_the_environment() -> Result<()> {
    let relay = Relay::start()?;
    let echo = echo_server().await?;
    let (send, listen) = relay.create_hc("quiet", echo)?;
    let dir = tempfile::tempdir()?;
    let policy = dir.path().join("policy.toml");
    std::fs::write(&policy, hybridlink_tests::TEST_POLICY)?;
    let socket = dir.path().join("agent.sock");

    // The agent reads its listen string from standard input, once.
    let mut agent = Command::new(binary())
        .args(["agent", "run", "--connection-string-file", "-", "--policy"])
        .arg(&policy)
        .arg("--status-socket")
        .arg(&socket)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()?;
    let mut stdin = agent.stdin.take().context("stdin")?;
    stdin.write_all(format!("# payroll's listen string\n{listen}\n").as_bytes())?;
    drop(stdin);
    let cmdline = std::fs::read(format!("/proc/{}/cmdline", agent.id()))?;
    let key = listen.key.as_str();
    let result = (|| -> Result<()> {
        ensure!(
            !String::from_utf8_lossy(&cmdline).contains(key),
            "the key is on the agent's command line"
        );
        hybridlink_tests::wait_for("the agent to attach", 20, || {
            let out = Command::new(binary())
                .args(["agent", "status", "--json", "--status-socket"])
                .arg(&socket)
                .output()?;
            Ok(String::from_utf8_lossy(&out.stdout).contains("\"connected\""))
        })?;

        // The send string from a file (mode 0600, with a comment), from
        // standard input, and from the environment.
        let file = dir.path().join("send.cs");
        std::fs::write(&file, format!("# quiet\n{send}\n"))?;
        let file = file.to_str().context("utf-8")?;
        let send = send.to_string();
        for (args, stdin, env) in [
            (
                &["connect", "--check", "--connection-string-file", file][..],
                "",
                None,
            ),
            (
                &["connect", "--check", "--connection-string-file", "-"],
                send.as_str(),
                None,
            ),
            (&["connect", "--check"], "", Some(send.as_str())),
        ] {
            let out = run_with(args, stdin, env)?;
            ensure!(
                out.status.success() && String::from_utf8_lossy(&out.stdout).contains("reachable"),
                "{args:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        // connect's stream data still flows with the string from a file.
        let out = run_with(
            &["connect", "--connection-string-file", file],
            "hello\n",
            None,
        )?;
        ensure!(out.stdout == b"hello\n", "{out:?}");

        // Clear errors: usage (2) for what is missing or malformed, 1 for
        // a file that cannot be read.
        let bad = dir.path().join("bad.cs");
        std::fs::write(&bad, "Endpoint=sb://relay:1/;EntityPath=x\n")?;
        let bad = bad.to_str().context("utf-8")?;
        let missing = dir.path().join("missing.cs");
        let missing = missing.to_str().context("utf-8")?;
        for (args, env, code, says) in [
            (
                &["connect", "--check"][..],
                None,
                2,
                "no connection string: give --connection-string-file",
            ),
            (
                &["connect", "--check", "--connection-string-file", bad],
                None,
                2,
                "line 1: connection string has no",
            ),
            (
                &["connect", "--check", "--connection-string-file", missing],
                None,
                1,
                "reading connection strings from",
            ),
            (
                &["connect", "--connection-string-file", "-"],
                None,
                2,
                "cannot also read the connection string there",
            ),
            (
                &["connect", "--check", "--connection-string-file", file],
                Some(send.as_str()),
                0,
                "reachable",
            ),
            (
                &["agent", "install", "--no-start", "--root", missing],
                None,
                2,
                "no connection string",
            ),
            (
                &["appliance", "run", "--connection-string-file", bad],
                None,
                2,
                "bad.cs: line 1",
            ),
        ] {
            let out = run_with(args, "", env)?;
            let all = format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
            ensure!(
                out.status.code() == Some(code),
                "{args:?}: exit {:?}: {all}",
                out.status.code()
            );
            ensure!(all.contains(says), "{args:?}: {all}");
        }
        Ok(())
    })();
    let _ = agent.kill();
    let _ = agent.wait();
    result
}

/// `hybridlink ARGS...`, its exit code and its output with runs of
/// whitespace (clap's line wrapping) made single spaces.
fn run_flat(args: &[&str]) -> Result<(Option<i32>, String, String)> {
    let out = Command::new(binary()).args(args).output()?;
    let flat = |b: &[u8]| {
        String::from_utf8_lossy(b)
            .split_whitespace()
            .collect::<Vec<_>>()
            .join(" ")
    };
    Ok((out.status.code(), flat(&out.stdout), flat(&out.stderr)))
}

#[test]
fn the_relays_certificate_and_extra_listener_flags_are_explained_and_checked() -> Result<()> {
    let (code, help, _) = run_flat(&["relay", "serve", "--help"])?;
    ensure!(code == Some(0));
    for needle in [
        "--also-listen <ADDR> One more address serving exactly what --listen serves",
        "--tls-cert <FILE> A CA-issued certificate chain",
        "offer the ALPN id `hybridlink/1` and keep getting the self-signed certificate",
        "Both files are read every 2 s",
        "--tls-key <FILE> The private key",
    ] {
        ensure!(
            help.contains(needle),
            "relay serve --help lacks {needle:?}: {help}"
        );
    }
    let (code, help, _) = run_flat(&["relay", "install", "--help"])?;
    ensure!(code == Some(0));
    for needle in [
        "--also-listen <ADDR>",
        "--tls-cert <FILE>",
        "--tls-key <FILE>",
    ] {
        ensure!(
            help.contains(needle),
            "relay install --help lacks {needle:?}: {help}"
        );
    }

    let dir = tempfile::tempdir()?;
    let data = dir.path().join("data");
    let missing = dir.path().join("fullchain.pem");
    let serve = |extra: &[&str]| -> Result<(Option<i32>, String, String)> {
        let mut args = vec![
            "relay",
            "serve",
            "--data-dir",
            data.to_str().context("utf-8")?,
            "--listen",
            "127.0.0.1:0",
            "--api",
            "127.0.0.1:0",
        ];
        args.extend_from_slice(extra);
        run_flat(&args)
    };
    let cert = missing.to_str().context("utf-8")?;
    // One without the other is a usage error.
    let (code, _, err) = serve(&["--tls-cert", cert])?;
    ensure!(code == Some(2), "{code:?} {err}");
    ensure!(err.contains("--tls-key <FILE>"), "{err}");
    // Files that do not load stop the start, saying which and why.
    let (code, _, err) = serve(&["--tls-cert", cert, "--tls-key", cert])?;
    ensure!(code == Some(1), "{code:?} {err}");
    ensure!(
        err.contains(&format!("cannot read {cert}: No such file or directory")),
        "{err}"
    );
    Ok(())
}

/// An Azure-protocol send string (no `CertificateSha256`) names no
/// endpoint: `appliance install` refuses it without `--endpoint`, saying
/// how to give one, and with it writes the endpoint, the CA file and the
/// endpoint's host (for `allow`) into the config, without asking a relay.
#[test]
fn appliance_install_keeps_the_endpoints_of_azure_protocol_strings() -> Result<()> {
    let root = tempfile::tempdir()?;
    let root_arg = root.path().to_str().context("utf-8")?;
    let cs = "Endpoint=sb://ns.example/;SharedAccessKeyName=send;SharedAccessKey=Q2hhbmdlTWUtdGhpcy1pcy1hLXRlc3Qta2V5LTAwMDE=;EntityPath=payroll";
    let install = ["appliance", "install", "--no-start", "--root", root_arg];
    let mut args = install.to_vec();
    args.extend(["--connection-string", cs]);
    let (code, out, err) = run_flat(&args)?;
    ensure!(
        code != Some(0) && err.contains("--endpoint payroll=HOST:PORT"),
        "without --endpoint: exit {code:?}: {out}{err}"
    );
    let config = root.path().join("etc/hybridlink/appliance.toml");
    ensure!(
        !config.exists(),
        "a refused install wrote {}",
        config.display()
    );

    args.extend(["--endpoint", "sql.corp:1433", "--ca-file", "/etc/ca.pem"]);
    let (code, out, err) = run_flat(&args)?;
    ensure!(code == Some(0), "install: exit {code:?}: {out}{err}");
    let text = std::fs::read_to_string(&config)?;
    for needle in [
        "[endpoints]\n\"payroll\" = \"sql.corp:1433\"",
        "ca_file = \"/etc/ca.pem\"",
        "\"sql.corp\"",
    ] {
        ensure!(text.contains(needle), "no {needle:?} in {text}");
    }

    // `appliance run` says the same before it touches the namespace.
    let (code, out, err) = run_flat(&["appliance", "run", "--connection-string", cs])?;
    ensure!(
        code != Some(0) && err.contains("--endpoint payroll=HOST:PORT"),
        "run without --endpoint: exit {code:?}: {out}{err}"
    );
    Ok(())
}

/// `agent install` serves an Azure-protocol listen string (no
/// `CertificateSha256`, any rule name) only with its endpoint, which it
/// keeps after the string in agent.conf and allows in the policy, without
/// asking a relay; `--ca-file` reaches the unit's `agent run`.
#[test]
fn agent_install_keeps_the_endpoints_of_azure_protocol_strings() -> Result<()> {
    let root = tempfile::tempdir()?;
    let root_arg = root.path().to_str().context("utf-8")?;
    let cs = "Endpoint=sb://ns.example/;SharedAccessKeyName=RootManageSharedAccessKey;SharedAccessKey=Q2hhbmdlTWUtdGhpcy1pcy1hLXRlc3Qta2V5LTAwMDE=;EntityPath=payroll";
    let mut args = vec![
        "agent",
        "install",
        "--no-start",
        "--root",
        root_arg,
        "--binary",
        "/usr/local/bin/hybridlink",
        "--connection-string",
        cs,
    ];
    let (code, out, err) = run_flat(&args)?;
    ensure!(
        code != Some(0) && err.contains("--endpoint payroll=HOST:PORT"),
        "without --endpoint: exit {code:?}: {out}{err}"
    );
    args.extend(["--endpoint", "sql.corp:1433", "--ca-file", "/etc/ca.pem"]);
    let (code, out, err) = run_flat(&args)?;
    ensure!(code == Some(0), "install: exit {code:?}: {out}{err}");
    let conf = std::fs::read_to_string(root.path().join("etc/hybridlink/agent.conf"))?;
    ensure!(
        conf.lines()
            .any(|l| l.starts_with("Endpoint=sb://ns.example")
                && l.ends_with(" endpoint=sql.corp:1433")),
        "agent.conf: {conf}"
    );
    let policy = std::fs::read_to_string(root.path().join("etc/hybridlink/policy.toml"))?;
    ensure!(
        policy.contains("host = \"sql.corp\"") && policy.contains("1433"),
        "policy: {policy}"
    );
    let unit = std::fs::read_to_string(
        root.path()
            .join("etc/systemd/system/hybridlink-agent.service"),
    )?;
    ensure!(unit.contains("--ca-file /etc/ca.pem"), "unit: {unit}");

    // A second install of another string keeps the first one's endpoint.
    let other = cs.replace("EntityPath=payroll", "EntityPath=ledger");
    let (code, out, err) = run_flat(&[
        "agent",
        "install",
        "--no-start",
        "--root",
        root_arg,
        "--binary",
        "/usr/local/bin/hybridlink",
        "--connection-string",
        &other,
        "--endpoint",
        "ledger=ledger.corp:5432",
    ])?;
    ensure!(code == Some(0), "second install: exit {code:?}: {out}{err}");
    let conf = std::fs::read_to_string(root.path().join("etc/hybridlink/agent.conf"))?;
    for needle in [
        "EntityPath=payroll",
        " endpoint=sql.corp:1433",
        " endpoint=ledger.corp:5432",
    ] {
        ensure!(conf.contains(needle), "no {needle:?} in agent.conf: {conf}");
    }
    Ok(())
}

/// `relay install --registry ...` writes a unit whose `relay serve` joins
/// the cluster as the operator said: the etcd members, the advertised
/// address, serving from the cache, the etcd CA, client certificate, user
/// and password file. The password itself never reaches the unit: without
/// a password file the install is refused, even with the password in
/// HYBRIDLINK_ETCD_PASSWORD, and writes nothing.
#[test]
fn relay_install_passes_the_cluster_flags_into_the_unit_and_never_the_etcd_password() -> Result<()>
{
    let root = tempfile::tempdir()?;
    let root_arg = root.path().to_str().context("utf-8")?;
    let unit_path = root
        .path()
        .join("etc/systemd/system/hybridlink-relay.service");
    let install = |extra: &[&str]| -> Result<std::process::Output> {
        Ok(Command::new(binary())
            .args([
                "relay",
                "install",
                "--no-start",
                "--root",
                root_arg,
                "--binary",
                "/usr/local/bin/hybridlink",
                "--public-host",
                "relay1.example",
                "--registry",
                "etcd://10.0.0.1:2379,10.0.0.2:2379,10.0.0.3:2379",
                "--etcd-ca-file",
                "/etc/hybridlink-relay/etcd-ca.pem",
                "--etcd-cert",
                "/etc/hybridlink-relay/etcd.pem",
                "--etcd-key",
                "/etc/hybridlink-relay/etcd.key",
                "--etcd-user",
                "relay",
            ])
            .args(extra)
            .env("HYBRIDLINK_ETCD_PASSWORD", "s3cret-in-env")
            .output()?)
    };
    let out = install(&[])?;
    let err = String::from_utf8_lossy(&out.stderr);
    ensure!(
        !out.status.success()
            && err.contains("--etcd-user relay needs --etcd-password-file FILE")
            && err.contains("never written into the unit"),
        "without a password file: {err}"
    );
    ensure!(!unit_path.exists(), "a refused install wrote the unit");

    let out = install(&[
        "--etcd-password-file",
        "/etc/hybridlink-relay/etcd.password",
        "--advertise",
        "relay1.example:9443",
        "--serve-from-cache",
        "--etcd-prefix",
        "/prod/",
    ])?;
    ensure!(
        out.status.success(),
        "install: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let unit = std::fs::read_to_string(&unit_path)?;
    let exec = unit
        .lines()
        .find(|l| l.starts_with("ExecStart="))
        .context("an ExecStart")?;
    for needle in [
        " relay serve ",
        " --registry etcd://10.0.0.1:2379,10.0.0.2:2379,10.0.0.3:2379",
        " --serve-from-cache",
        " --advertise relay1.example:9443",
        " --etcd-prefix /prod/",
        " --etcd-ca-file /etc/hybridlink-relay/etcd-ca.pem",
        " --etcd-cert /etc/hybridlink-relay/etcd.pem",
        " --etcd-key /etc/hybridlink-relay/etcd.key",
        " --etcd-user relay",
        " --etcd-password-file /etc/hybridlink-relay/etcd.password",
    ] {
        ensure!(exec.contains(needle), "no {needle:?} in {exec}");
    }
    ensure!(
        !unit.contains("s3cret"),
        "the password is in the unit: {unit}"
    );

    // The etcd flags mean nothing without --registry: refused.
    let out = Command::new(binary())
        .args(["relay", "install", "--no-start", "--root", root_arg])
        .args(["--public-host", "relay1.example"])
        .args(["--etcd-ca-file", "/etc/hybridlink-relay/etcd-ca.pem"])
        .output()?;
    let err = String::from_utf8_lossy(&out.stderr);
    ensure!(
        !out.status.success() && err.contains("the --etcd-* flags need --registry"),
        "{err}"
    );
    Ok(())
}

/// `--threads` (or HYBRIDLINK_THREADS) sets how many worker threads a
/// serving process runs its tasks on; the log says how many it got, and a
/// count of 0 is a usage error, not a process that can run nothing.
#[test]
fn serving_commands_run_on_the_threads_asked_for() -> Result<()> {
    for cmd in [["relay", "serve"], ["agent", "run"], ["appliance", "run"]] {
        let (code, help, _) = run_flat(&[cmd[0], cmd[1], "--help"])?;
        ensure!(code == Some(0), "{cmd:?} --help: exit {code:?}");
        for needle in [
            "--threads <N> Worker threads for this process's tasks, 1 to 1024",
            "[env: HYBRIDLINK_THREADS=]",
        ] {
            ensure!(
                help.contains(needle),
                "{cmd:?} --help lacks {needle:?}: {help}"
            );
        }
        // The flag sits among the others without taking their help.
        if cmd == ["agent", "run"] {
            let needle = "--connection-string <CS> A listen connection string";
            ensure!(
                help.contains(needle),
                "agent run --help lacks {needle:?}: {help}"
            );
        }
        let (code, _, err) = run_flat(&[cmd[0], cmd[1], "--threads", "0"])?;
        ensure!(code == Some(2), "{cmd:?} --threads 0: exit {code:?}: {err}");
        ensure!(
            err.contains("invalid value '0' for '--threads <N>'"),
            "{cmd:?} --threads 0: {err}"
        );
    }

    let dir = tempfile::tempdir()?;
    let threads_logged = |log: &std::path::Path| -> Result<String> {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let text = std::fs::read_to_string(log).unwrap_or_default();
            if let Some(line) = text.lines().find(|l| l.contains("worker threads")) {
                return Ok(line.to_string());
            }
            ensure!(Instant::now() < deadline, "no thread count logged: {text}");
            std::thread::sleep(Duration::from_millis(50));
        }
    };
    let log = dir.path().join("flag.log");
    let relay = Relay::start_with_log(&["--threads", "3"], &log)?;
    let line = threads_logged(&log)?;
    ensure!(line.contains("threads=3"), "{line}");
    drop(relay);

    // The environment, as a unit's Environment= would set it.
    let log = dir.path().join("env.log");
    let data = dir.path().join("data");
    let mut relay = relay_serve(&data)
        .env("HYBRIDLINK_THREADS", "2")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log)?)
        .spawn()?;
    let line = threads_logged(&log);
    let _ = relay.kill();
    let _ = relay.wait();
    let line = line?;
    ensure!(line.contains("threads=2"), "{line}");
    Ok(())
}
