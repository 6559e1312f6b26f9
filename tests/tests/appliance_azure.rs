//! The appliance and the agent over Azure Relay's protocol, in the
//! three-namespace lab: unmodified `curl` and a plain socket client in
//! `app` reach servers in `onprem` by host name through the appliance, the
//! relay's Azure front door and the agent, with connection strings that
//! pin no certificate (as an Azure Relay namespace hands them out) and the
//! endpoints taken from the appliance's and the agent's own configuration.

use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use hybridlink_tests::lab::{Lab, RELAY_IP};
use hybridlink_tests::{Proc, azure_style, binary};
use proto::connection_string::ConnectionString;

fn string(text: &str) -> Result<ConnectionString> {
    text.parse().map_err(|e| anyhow::anyhow!("{e}"))
}

fn sh(lab: &Lab, ns: &str, line: &str) -> Result<String> {
    Ok(String::from_utf8(lab.sh(ns, line)?.stdout)?)
}

#[test]
fn curl_reaches_onprem_through_an_azure_protocol_appliance_and_agent() -> Result<()> {
    if !hybridlink_tests::lab::root_or_skip("appliance_azure") {
        return Ok(());
    }
    let lab = Lab::new("az")?;
    lab.onprem_hosts(&[("127.0.0.1", "payroll.corp"), ("127.0.0.1", "closed.corp")])?;
    let site = tempfile::tempdir()?;
    let big = site.path().join("big.bin");
    sh(
        &lab,
        &lab.onprem,
        &format!("head -c 67108864 /dev/urandom > {}", big.display()),
    )?;
    let mut servers: Vec<Proc> = vec![
        lab.web_server(&lab.onprem, "127.0.0.1", 80, site.path())?,
        lab.digest_server(&lab.onprem, "127.0.0.1", 9000)?,
    ];

    let data = tempfile::tempdir()?;
    let data_dir = data.path().to_str().context("utf-8")?;
    let (relay, api) = lab.start_relay(
        &lab.relay,
        data_dir,
        "0.0.0.0:9443",
        &["--public-host", RELAY_IP],
    )?;
    servers.push(relay);
    let ca = data.path().join("cert.pem");
    let ca = ca.to_str().context("utf-8")?;
    let hc = |args: &[&str]| -> Result<serde_json::Value> {
        let out = lab
            .command(&lab.relay, binary().to_str().context("utf-8")?)
            .args(["hc", "--api", &api, "--data-dir", data_dir])
            .args(args)
            .output()?;
        ensure!(
            out.status.success(),
            "hc {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(serde_json::from_slice(&out.stdout)?)
    };
    // The relay's endpoints are placeholders: over Azure Relay's protocol
    // the agent's and the appliance's own configs name them.
    let key = proto::key::Key::generate()?;
    let mut send = Vec::new();
    let mut listen = Vec::new();
    for (name, keyed) in [("payroll", true), ("digest", true), ("closed", false)] {
        hc(&[
            "create",
            name,
            "--host",
            "placeholder.invalid",
            "--port",
            "1",
        ])?;
        let keys = hc(&["keys", name])?;
        let get = |rule: &str| -> Result<ConnectionString> {
            let text = keys["connection_strings"][rule]["primary"]
                .as_str()
                .context("string")?;
            let mut cs = azure_style(&string(text)?);
            if keyed {
                cs.end_to_end_key = Some(key.clone());
            }
            Ok(cs)
        };
        send.push(get("send")?);
        listen.push(get("listen")?);
    }

    // On-prem: the agent, with its endpoints and a policy that allows them.
    let policy_dir = tempfile::tempdir()?;
    let policy = policy_dir.path().join("policy.toml");
    std::fs::write(
        &policy,
        "[[allow]]\nhost = \"payroll.corp\"\nports = [80, 9000]\n\
         [[allow]]\nhost = \"closed.corp\"\nports = [81]\n",
    )?;
    let socket = format!("/run/hl-test-agent-{}az.sock", std::process::id());
    let policy = policy.to_str().context("utf-8")?.to_string();
    let listen_text: Vec<String> = listen.iter().map(ToString::to_string).collect();
    let mut agent_args: Vec<&str> = vec![
        "agent",
        "run",
        "--status-socket",
        &socket,
        "--policy",
        &policy,
        "--ca-file",
        ca,
        "--endpoint",
        "payroll=payroll.corp:80",
        "--endpoint",
        "digest=payroll.corp:9000",
        "--endpoint",
        "closed=closed.corp:81",
    ];
    for cs in &listen_text {
        agent_args.extend(["--connection-string", cs.as_str()]);
    }
    let _agent = lab.hybridlink(&lab.onprem, "agent", &agent_args)?;

    // The app side: the appliance, its endpoints and CA from its config.
    let state = tempfile::tempdir()?;
    let config = state.path().join("appliance.toml");
    let strings: Vec<String> = send.iter().map(|cs| format!("  \"{cs}\",")).collect();
    let write_config = |payroll_port: u16| {
        std::fs::write(
            &config,
            format!(
                "connection_strings = [\n{}\n]\nstate_dir = \"{}\"\nca_file = \"{ca}\"\n\
                 [endpoints]\npayroll = \"payroll.corp:{payroll_port}\"\n\
                 digest = \"payroll.corp:9000\"\nclosed = \"closed.corp:81\"\n",
                strings.join("\n"),
                state.path().join("state").display()
            ),
        )
    };
    write_config(80)?;
    let config = config.to_str().context("utf-8")?;
    let _appliance = lab.hybridlink(
        &lab.app,
        "appliance",
        &["appliance", "run", "--config", config],
    )?;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let out = lab
            .command(&lab.app, "getent")
            .args(["hosts", "payroll.corp"])
            .output()?;
        if out.status.success() && String::from_utf8_lossy(&out.stdout).starts_with("127.77.") {
            break;
        }
        if Instant::now() > deadline {
            bail!("the appliance never answered for payroll.corp");
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    // The agent's listeners may still be connecting.
    hybridlink_tests::wait_for("the agent's listeners", 20, || {
        let out = std::process::Command::new(binary())
            .args(["agent", "status", "--json", "--status-socket", &socket])
            .output()?;
        let status: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
        Ok(status.as_array().is_some_and(|hcs| {
            hcs.len() == 3 && hcs.iter().all(|h| h["connection"]["state"] == "connected")
        }))
    })?;

    // 64 MiB down with unmodified curl, byte-exact.
    let expected = sh(&lab, &lab.onprem, &format!("sha256sum < {}", big.display()))?;
    let got = sh(
        &lab,
        &lab.app,
        "curl -sS --max-time 120 http://payroll.corp/big.bin | sha256sum",
    )?;
    ensure!(
        got == expected,
        "64 MiB through the Azure-protocol path: sha256 {got} != {expected}"
    );

    // 64 MiB up, then a half-close: the server's answer comes back after it.
    lab.send_digest(&lab.app, "payroll.corp", 9000, 64)?;

    // A target that refuses: the app sees a refused connection, as it
    // would without the tunnel (the agent dials before the stream opens).
    let out = lab
        .command(&lab.app, "curl")
        .args(["-sS", "--max-time", "10", "http://closed.corp:81/"])
        .output()?;
    let err = String::from_utf8_lossy(&out.stderr);
    ensure!(
        out.status.code() == Some(7),
        "curl to a closed on-prem port: exit {:?}, {err}",
        out.status.code()
    );

    // Status says how each hybrid connection is carried.
    let out = lab
        .command(&lab.app, binary().to_str().context("utf-8")?)
        .args(["appliance", "status", "--json", "--state-dir"])
        .arg(state.path().join("state"))
        .output()?;
    let status: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    let e2e = |name: &str| {
        status["hybrid_connections"]
            .as_array()
            .and_then(|hcs| hcs.iter().find(|h| h["name"] == name))
            .map(|h| (h["state"].clone(), h["end_to_end"].clone()))
    };
    ensure!(
        e2e("payroll") == Some(("ok".into(), "verified".into()))
            && e2e("closed") == Some(("ok".into(), "relay-trusted".into())),
        "appliance status: {status}"
    );

    // The app-side endpoint is the appliance's own: a changed config is
    // served without a restart (the agent still dials its own endpoint).
    write_config(8080)?;
    hybridlink_tests::wait_for("the moved app-side port", 20, || {
        let out = lab
            .command(&lab.app, "curl")
            .args([
                "-sS",
                "--max-time",
                "5",
                "-o",
                "/dev/null",
                "-w",
                "%{http_code}",
            ])
            .arg("http://payroll.corp:8080/big.bin")
            .output()?;
        Ok(out.stdout == b"200")
    })?;
    drop(servers);
    Ok(())
}
