//! The on-prem policy, tried as a hostile relay operator would: the
//! management API moves a hybrid connection's endpoint somewhere the
//! on-prem administrator did not allow, and the agent must refuse it,
//! say so where people look, and keep serving what is allowed.
//!
//! Every target here listens on loopback; the endpoints the relay tries
//! are loopback ports or names that resolve to loopback, so a regression
//! sends nothing off this machine.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use hybridlink_tests::{Agent, OpenStream, Relay, binary, echo_server_thread, wait_for};
use proto::connection_string::ConnectionString;
use serde_json::Value;

/// `hybridlink connect --check CS`: (succeeded, stderr).
fn check(cs: &ConnectionString) -> Result<(bool, String)> {
    let out = Command::new(binary())
        .args(["connect", "--check", &cs.to_string()])
        .output()?;
    Ok((
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    ))
}

/// The agent's status entry for `hc`.
fn agent_hc(agent: &Agent, hc: &str) -> Result<Value> {
    let status = agent.status()?;
    status
        .as_array()
        .and_then(|all| all.iter().find(|h| h["name"] == hc))
        .cloned()
        .with_context(|| format!("{hc} not in {status}"))
}

/// `hybridlink agent allow|deny TARGET --policy FILE --status-socket S`.
fn edit(verb: &str, target: &str, policy: &Path, agent: &Agent) -> Result<()> {
    let out = Command::new(binary())
        .args(["agent", verb, target, "--policy"])
        .arg(policy)
        .arg("--status-socket")
        .arg(&agent.status_socket)
        .output()?;
    ensure!(
        out.status.success(),
        "agent {verb} {target}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

#[test]
fn an_endpoint_the_relay_moves_outside_the_policy_is_refused_and_shown() -> Result<()> {
    let relay = Relay::start()?;
    let allowed = echo_server_thread()?;
    // A service bound to the agent host's loopback that nobody allowed.
    let private = echo_server_thread()?;
    let (send, listen) = relay.create_hc("web", allowed)?;
    let dir = tempfile::tempdir()?;
    let policy = dir.path().join("policy.toml");
    std::fs::write(
        &policy,
        format!(
            "[[allow]]\nhost = \"127.0.0.1\"\nports = [{}]\nhc = \"web\"\n",
            allowed.port()
        ),
    )?;
    let policy_arg = policy.display().to_string();
    let agent = Agent::start(&[&listen], &["--policy", &policy_arg])?;
    agent.wait_connected()?;
    let (ok, err) = check(&send)?;
    ensure!(ok, "the allowed endpoint must work: {err}");

    let port = private.port().to_string();
    for (host, port) in [
        ("127.0.0.1", port.as_str()),
        ("0.0.0.0", port.as_str()),
        ("localhost", port.as_str()),
    ] {
        relay.hc(&["update", "web", "--host", host, "--port", port])?;
        let asked = format!("{host}:{port}");
        wait_for("the agent to see the move", 10, || {
            Ok(agent_hc(&agent, "web")?["endpoint"] == asked.as_str())
        })?;
        let (ok, err) = check(&send)?;
        ensure!(!ok, "the agent dialed {asked}, which no rule allows");
        ensure!(
            err.contains(&format!("on-prem policy refuses {asked}")),
            "the sender must be told the policy refused {asked}: {err}"
        );
        let hc = agent_hc(&agent, "web")?;
        ensure!(
            hc["connection"]["state"] == "denied_by_policy",
            "agent status: {hc}"
        );
        ensure!(
            hc["connection"]["reason"]
                .as_str()
                .is_some_and(|r| r.contains(&asked)),
            "agent status names the endpoint: {hc}"
        );
        // The relay's status shows what the agent reported (every 2 s).
        wait_for("hc show to carry the refusal", 10, || {
            let shown = relay.hc(&["status", "web"])?;
            Ok(shown["listeners"][0]["policy_refusal"]
                .as_str()
                .is_some_and(|r| r.contains(&asked)))
        })?;
    }
    let text = relay.hc_command()?.args(["show", "web"]).output()?;
    let text = String::from_utf8_lossy(&text.stdout);
    ensure!(
        text.contains("on-prem policy refuses localhost:"),
        "hc show: {text}"
    );
    let table = Command::new(binary())
        .args(["agent", "status", "--status-socket"])
        .arg(&agent.status_socket)
        .output()?;
    let table = String::from_utf8_lossy(&table.stdout);
    ensure!(table.contains("Denied by policy"), "agent status: {table}");

    // Back to the allowed endpoint: served again, no restart.
    relay.hc(&[
        "update",
        "web",
        "--host",
        "127.0.0.1",
        "--port",
        &allowed.port().to_string(),
    ])?;
    wait_for("the allowed endpoint to work again", 10, || {
        Ok(check(&send)?.0)
    })?;
    ensure!(agent_hc(&agent, "web")?["connection"]["state"] == "connected");
    Ok(())
}

#[test]
fn a_name_that_resolves_into_a_refused_range_is_refused() -> Result<()> {
    let relay = Relay::start()?;
    let target = echo_server_thread()?;
    let port = target.port();
    let (send, listen) = relay.create_hc("named", target)?;
    relay.hc(&[
        "update",
        "named",
        "--host",
        "localhost",
        "--port",
        &port.to_string(),
    ])?;
    let dir = tempfile::tempdir()?;
    let policy = dir.path().join("policy.toml");
    // A wildcard never reaches loopback, whatever name leads there.
    std::fs::write(&policy, "[[allow]]\nhost = \"*\"\n")?;
    let policy_arg = policy.display().to_string();
    let agent = Agent::start(&[&listen], &["--policy", &policy_arg])?;
    agent.wait_connected()?;
    let (ok, err) = check(&send)?;
    ensure!(!ok, "localhost reached through a wildcard");
    ensure!(
        err.contains("resolved to 127.0.0.1") || err.contains("resolved to ::1"),
        "the refusal names the address: {err}"
    );
    ensure!(
        agent_hc(&agent, "named")?["connection"]["state"] == "denied_by_policy",
        "the dial-time refusal shows in status"
    );

    // Named exactly, it is allowed; a deny CIDR still wins over it.
    edit("allow", &format!("localhost:{port}"), &policy, &agent)?;
    wait_for("the exact rule to allow it", 10, || Ok(check(&send)?.0))?;
    edit("deny", "127.0.0.0/8", &policy, &agent)?;
    edit("deny", "::1/128", &policy, &agent)?;
    let (ok, err) = check(&send)?;
    ensure!(!ok, "a name resolving into a denied CIDR was dialed");
    ensure!(err.contains("deny rule"), "names the rule: {err}");
    Ok(())
}

#[test]
fn editing_the_policy_takes_effect_at_once_and_cuts_only_what_it_refuses() -> Result<()> {
    let relay = Relay::start()?;
    let (web_target, other_target) = (echo_server_thread()?, echo_server_thread()?);
    let (web_send, web_listen) = relay.create_hc("web", web_target)?;
    let (other_send, other_listen) = relay.create_hc("other", other_target)?;
    let dir = tempfile::tempdir()?;
    let policy = dir.path().join("policy.toml");
    std::fs::write(&policy, "")?;
    let policy_arg = policy.display().to_string();
    let agent = Agent::start(&[&web_listen, &other_listen], &["--policy", &policy_arg])?;
    wait_for("both hybrid connections attached", 20, || {
        Ok(["web", "other"].iter().all(|hc| {
            agent_hc(&agent, hc).is_ok_and(|h| h["connection"]["state"] == "denied_by_policy")
        }))
    })?;
    let pid = agent.proc.pid();
    // An empty policy allows nothing.
    ensure!(!check(&web_send)?.0, "an empty policy allowed a dial");

    edit(
        "allow",
        &format!("127.0.0.1:{}", web_target.port()),
        &policy,
        &agent,
    )?;
    edit(
        "allow",
        &format!("127.0.0.1:{}", other_target.port()),
        &policy,
        &agent,
    )?;
    ensure!(check(&web_send)?.0, "allowed at once, without a restart");
    ensure!(check(&other_send)?.0);

    let mut web = OpenStream::open(&web_send)?;
    ensure!(web.echo("one\n")? == "one\n");
    let mut other = OpenStream::open(&other_send)?;
    ensure!(other.echo("one\n")? == "one\n");

    // Refusing `other` cuts its stream and leaves `web`'s alone.
    edit(
        "deny",
        &format!("127.0.0.1:{}", other_target.port()),
        &policy,
        &agent,
    )?;
    ensure!(!check(&other_send)?.0, "the denied endpoint was dialed");
    wait_for("the refused stream to be cut", 10, || Ok(other.ended()))?;
    ensure!(web.echo("two\n")? == "two\n", "an allowed stream was cut");
    ensure!(check(&web_send)?.0);

    // A hand edit is picked up too (the agent watches the file).
    std::fs::write(
        &policy,
        format!(
            "[[allow]]\nhost = \"127.0.0.1\"\nports = [{}]\n",
            other_target.port()
        ),
    )?;
    wait_for("the hand-edited policy to apply", 10, || {
        Ok(check(&other_send)?.0 && web.ended())
    })?;
    ensure!(agent.proc.pid() == pid);
    ensure!(
        agent_hc(&agent, "web")?["connection"]["state"] == "denied_by_policy",
        "web is refused now"
    );
    Ok(())
}

/// Link-local (the cloud metadata address) and unlisted endpoints, tried
/// inside a lab namespace: if the agent ever dialed one, the SYN would stay
/// inside the lab.
#[test]
fn metadata_link_local_and_unlisted_endpoints_are_refused() -> Result<()> {
    if !hybridlink_tests::lab::root_or_skip(
        "metadata_link_local_and_unlisted_endpoints_are_refused",
    ) {
        return Ok(());
    }
    let lab = hybridlink_tests::lab::Lab::new("pol")?;
    let ns = lab.onprem.clone();
    let data = tempfile::tempdir()?;
    let data_dir = data.path().display().to_string();
    let (_relay, api) = lab.start_relay(&ns, &data_dir, "127.0.0.1:0", &[])?;
    let bin = binary().display().to_string();
    let hc = |args: &str| -> Result<String> {
        let out = lab.sh(
            &ns,
            &format!("{bin} hc --api {api} --data-dir {data_dir} {args}"),
        )?;
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
    };
    hc("create web --host 127.0.0.1 --port 9")?;
    let send = hc("keys web --rule send --key primary")?;
    let listen = hc("keys web --rule listen --key primary")?;
    let policy = data.path().join("policy.toml");
    std::fs::write(
        &policy,
        "[[allow]]\nhost = \"127.0.0.1\"\nports = [9]\nhc = \"web\"\n[[allow]]\nhost = \"*.corp\"\n",
    )?;
    let socket = data.path().join("agent.sock").display().to_string();
    let policy_arg = policy.display().to_string();
    let _agent = lab.hybridlink(
        &ns,
        "agent",
        &[
            "agent",
            "run",
            "--connection-string",
            &listen,
            "--policy",
            &policy_arg,
            "--status-socket",
            &socket,
        ],
    )?;
    for endpoint in ["169.254.169.254:80", "198.18.250.1:80", "0.0.0.0:9"] {
        let (host, port) = endpoint.split_once(':').context("host:port")?;
        hc(&format!("update web --host {host} --port {port}"))?;
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let out = lab
                .command(&ns, &bin)
                .args(["connect", "--check", &send])
                .output()?;
            ensure!(!out.status.success(), "the agent dialed {endpoint}");
            let last = String::from_utf8_lossy(&out.stderr).into_owned();
            if last.contains(&format!("on-prem policy refuses {endpoint}")) {
                break;
            }
            ensure!(
                Instant::now() < deadline,
                "{endpoint} not refused by the policy: {last}"
            );
            std::thread::sleep(Duration::from_millis(200));
        }
        let status = lab.sh(
            &ns,
            &format!("{bin} agent status --json --status-socket {socket}"),
        )?;
        let status: Value = serde_json::from_slice(&status.stdout)?;
        ensure!(
            status[0]["connection"]["state"] == "denied_by_policy"
                && status[0]["endpoint"] == endpoint,
            "agent status after {endpoint}: {status}"
        );
    }
    Ok(())
}
