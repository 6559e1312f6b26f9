//! The product as the app sees it, in the three-namespace lab: unmodified
//! clients in `app` reach servers in `onprem` by host name (or IPv4 literal)
//! through the real appliance, relay and agent binaries. Needs root; skips
//! with a message otherwise.

use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use hybridlink_tests::Proc;
use hybridlink_tests::lab::{self, Lab, ONPREM_IP, RELAY_IP, UPSTREAM_DNS_IP};

struct Setup {
    lab: Lab,
    _relay: Proc,
    _agent: Proc,
    _servers: Vec<Proc>,
    appliance: Option<Proc>,
    state_dir: tempfile::TempDir,
    send: Vec<String>,
}

fn fixture(name: &str) -> String {
    format!("{}/fixtures/{name}", env!("CARGO_MANIFEST_DIR"))
}

/// The lab with a relay, an HTTP server on-prem reachable by name and by
/// IPv4 literal, a port with nothing behind it, an agent and the appliance.
fn setup(tag: &str) -> Result<Setup> {
    let lab = Lab::new(tag)?;
    lab.onprem_hosts(&[("127.0.0.1", "payroll.corp"), ("127.0.0.1", "stopped.corp")])?;
    let site = tempfile::tempdir()?;
    std::fs::write(
        site.path().join("index.html"),
        "payroll page from on-prem\n",
    )?;
    let site_dir = site.path().to_str().context("utf-8")?.to_string();
    std::mem::forget(site); // removed with the process' temp dir clean-up; tiny
    let mut servers = vec![
        lab.spawn(
            &lab.onprem,
            "web",
            &[
                "python3",
                "-m",
                "http.server",
                "--bind",
                "127.0.0.1",
                "80",
                "--directory",
                &site_dir,
            ],
        )?,
        lab.spawn(
            &lab.onprem,
            "web-literal",
            &[
                "python3",
                "-m",
                "http.server",
                "--bind",
                ONPREM_IP,
                "8080",
                "--directory",
                &site_dir,
            ],
        )?,
    ];
    servers.push(lab.spawn(
        &lab.relay,
        "upstream-dns",
        &[
            "python3",
            &fixture("upstream_dns.py"),
            UPSTREAM_DNS_IP,
            "53",
            "example.test=198.18.7.7",
        ],
    )?);

    let data = tempfile::tempdir()?;
    let data_dir = data.path().to_str().context("utf-8")?.to_string();
    std::mem::forget(data);
    let mut relay = lab.hybridlink(
        &lab.relay,
        "relay",
        &[
            "relay",
            "serve",
            "--data-dir",
            &data_dir,
            "--listen",
            "0.0.0.0:9443",
            "--api",
            "127.0.0.1:0",
            "--public-host",
            RELAY_IP,
        ],
    )?;
    let ready = relay.ready_line()?;
    let api = format!("http://{}", ready["api"].as_str().context("api")?);
    let hc = |args: &[&str]| -> Result<serde_json::Value> {
        let out = lab
            .command(
                &lab.relay,
                hybridlink_tests::binary().to_str().context("utf-8")?,
            )
            .args(["hc", "--api", &api, "--data-dir", &data_dir])
            .args(args)
            .output()?;
        if !out.status.success() {
            bail!("hc {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        }
        Ok(serde_json::from_slice(&out.stdout)?)
    };
    let mut send = Vec::new();
    let mut listen = Vec::new();
    for (name, host, port) in [
        ("payroll", "payroll.corp", "80"),
        ("literal", ONPREM_IP, "8080"),
        ("stopped", "stopped.corp", "81"),
    ] {
        hc(&["create", name, "--host", host, "--port", port])?;
        let keys = hc(&["keys", name])?;
        let get = |rule: &str| {
            keys["connection_strings"][rule]["primary"]
                .as_str()
                .map(str::to_string)
                .context("string")
        };
        send.push(get("send")?);
        listen.push(get("listen")?);
    }
    let status_socket = format!("/run/hl-test-agent-{}{tag}.sock", std::process::id());
    let mut agent_args = vec!["agent", "run", "--status-socket", &status_socket];
    for cs in &listen {
        agent_args.push("--connection-string");
        agent_args.push(cs);
    }
    let agent = lab.hybridlink(&lab.onprem, "agent", &agent_args)?;
    let state_dir = tempfile::tempdir()?;
    let mut setup = Setup {
        lab,
        _relay: relay,
        _agent: agent,
        _servers: servers,
        appliance: None,
        state_dir,
        send,
    };
    setup.start_appliance()?;
    Ok(setup)
}

impl Setup {
    fn start_appliance(&mut self) -> Result<()> {
        let state = self.state_dir.path().to_str().context("utf-8")?.to_string();
        let mut args = vec!["appliance", "run", "--state-dir", &state];
        for cs in &self.send {
            args.push("--connection-string");
            args.push(cs);
        }
        let proc = self.lab.hybridlink(&self.lab.app, "appliance", &args)?;
        self.appliance = Some(proc);
        // Ready when the app's resolver points at the appliance and a name resolves.
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let out = self
                .lab
                .command(&self.lab.app, "getent")
                .args(["hosts", "payroll.corp"])
                .output()?;
            if out.status.success() && String::from_utf8_lossy(&out.stdout).starts_with("127.77.") {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "the appliance never answered for payroll.corp: {}",
                    self.lab.app_resolv_conf()?
                );
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    fn curl(&self, url: &str) -> std::process::Output {
        self.lab
            .command(&self.lab.app, "curl")
            .args(["-sS", "--max-time", "10", url])
            .output()
            .expect("curl runs")
    }

    fn namespace_state(&self) -> Result<String> {
        let out = self.lab.sh(
            &self.lab.app,
            "ip rule; echo; ip route show table all | grep -v '^local\\|^broadcast\\|fe80\\|ff00\\|^multicast' ; echo; ip link; sysctl net.ipv4.conf.all.route_localnet net.ipv4.conf.all.rp_filter",
        )?;
        Ok(format!(
            "{}\n{}",
            String::from_utf8_lossy(&out.stdout),
            self.lab.app_resolv_conf()?
        ))
    }
}

#[test]
fn unmodified_clients_reach_onprem_servers_by_name_and_literal() -> Result<()> {
    if !lab::is_root() {
        eprintln!("SKIP: the lab needs root");
        return Ok(());
    }
    let s = setup("a")?;

    let out = s.curl("http://payroll.corp/");
    assert!(
        out.status.success(),
        "curl by name failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "payroll page from on-prem\n"
    );

    // The IPv4-literal endpoint works with no DNS at all.
    let out = s.curl(&format!("http://{ONPREM_IP}:8080/"));
    assert!(
        out.status.success(),
        "curl to the literal failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "payroll page from on-prem\n"
    );

    // A stopped target is a refused connection, fast.
    let started = Instant::now();
    let out = s.curl("http://stopped.corp:81/");
    let took = started.elapsed();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("Connection refused") || err.contains("Couldn't connect"),
        "{err}"
    );
    assert!(took < Duration::from_secs(1), "refusal took {took:?}");

    // A port no hybrid connection serves on a mapped address: refused at once.
    let out = s.curl("http://payroll.corp:9999/");
    assert!(!out.status.success());

    // Other names still resolve through the namespace's original resolver.
    let out = s
        .lab
        .command(&s.lab.app, "getent")
        .args(["hosts", "example.test"])
        .output()?;
    assert!(out.status.success(), "upstream lookup failed");
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("198.18.7.7"));
    Ok(())
}

#[test]
fn the_namespace_is_restored_after_exit_and_after_a_crash() -> Result<()> {
    if !lab::is_root() {
        eprintln!("SKIP: the lab needs root");
        return Ok(());
    }
    let mut s = setup("b")?;
    let running = s.namespace_state()?;
    let mut appliance = s.appliance.take().context("appliance")?;
    appliance.terminate();
    let before = {
        // What the namespace looked like before any appliance: a fresh lab
        // namespace has the kernel's rules and the lab's resolv.conf.
        s.namespace_state()?
    };
    assert!(
        !before.contains("lookup 77"),
        "rules left after a clean exit:\n{before}"
    );
    assert!(
        before.contains(&format!("nameserver {UPSTREAM_DNS_IP}")),
        "resolv.conf not restored:\n{before}"
    );
    assert_ne!(running, before);

    // kill -9, then a new start cleans up and works; its exit restores again.
    s.start_appliance()?;
    let mut appliance = s.appliance.take().context("appliance")?;
    appliance.kill();
    let crashed = s.namespace_state()?;
    assert!(
        crashed.contains("lookup 77"),
        "the crash should have left rules behind:\n{crashed}"
    );
    s.start_appliance()?;
    let out = s.curl("http://payroll.corp/");
    assert!(
        out.status.success(),
        "after a crash and restart: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut appliance = s.appliance.take().context("appliance")?;
    appliance.terminate();
    let after = s.namespace_state()?;
    assert_eq!(
        after, before,
        "the namespace differs after crash, restart and exit"
    );
    Ok(())
}
