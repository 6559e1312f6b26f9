//! The product as the app sees it, in the three-namespace lab: unmodified
//! clients in `app` reach servers in `onprem` by host name (or IPv4 literal)
//! through the real appliance, relay and agent binaries. Needs root; skips
//! with a message otherwise (the tests of the appliance's trust boundary
//! fail instead when HYBRIDLINK_REQUIRE_TOOLS is set).

use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use hybridlink_tests::lab::{self, Lab, ONPREM_IP, RELAY_IP, UPSTREAM_DNS_IP};
use hybridlink_tests::{Footprint, Proc};
use serde_json::Value;

struct Setup {
    lab: Lab,
    _relay: Proc,
    _agent: Proc,
    _servers: Vec<Proc>,
    appliance: Option<Proc>,
    state_dir: tempfile::TempDir,
    /// The on-prem web server's directory.
    site: tempfile::TempDir,
    /// Other directories to remove at the end (relay data, databases).
    _dirs: Vec<tempfile::TempDir>,
    /// Send strings by hybrid connection name.
    send: Vec<(String, String)>,
    /// The relay's management API and data dir, for `hybridlink hc`.
    api: String,
    data_dir: String,
    /// The config's `allow` (`None`: no `allow` key).
    allow: Option<Vec<String>>,
}

fn fixture(name: &str) -> String {
    format!("{}/fixtures/{name}", env!("CARGO_MANIFEST_DIR"))
}

/// What a test needs beyond the basic lab.
#[derive(Default)]
struct Options {
    /// Run PostgreSQL and Redis on-prem.
    databases: bool,
    /// The hybrid connections in the appliance's config file at start
    /// (`None`: all of them).
    initial: Option<&'static [&'static str]>,
    /// The config's `allow` list (`None`: no `allow` key).
    allow: Option<&'static [&'static str]>,
}

/// The hybrid connections of the lab: name, host, port.
const HCS: &[(&str, &str, &str)] = &[
    ("payroll", "payroll.corp", "80"),
    ("literal", ONPREM_IP, "8080"),
    ("stopped", "stopped.corp", "81"),
    ("sql", "sql.corp", "5432"),
    ("cache", "cache.corp", "6379"),
    ("digest", "digest.corp", "9000"),
];

/// The lab with a relay, an HTTP server on-prem reachable by name and by
/// IPv4 literal, a port with nothing behind it, an agent and the appliance.
fn setup(tag: &str, options: Options) -> Result<Setup> {
    let lab = Lab::new(tag)?;
    lab.onprem_hosts(&[
        ("127.0.0.1", "payroll.corp"),
        ("127.0.0.1", "stopped.corp"),
        ("127.0.0.1", "sql.corp"),
        ("127.0.0.1", "cache.corp"),
        ("127.0.0.1", "digest.corp"),
    ])?;
    let site = tempfile::tempdir()?;
    std::fs::write(
        site.path().join("index.html"),
        "payroll page from on-prem\n",
    )?;
    let mut servers = vec![
        lab.web_server(&lab.onprem, "127.0.0.1", 80, site.path())?,
        lab.web_server(&lab.onprem, ONPREM_IP, 8080, site.path())?,
        lab.digest_server(&lab.onprem, "127.0.0.1", 9000)?,
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
    let (relay, api) = lab.start_relay(
        &lab.relay,
        &data_dir,
        "0.0.0.0:9443",
        &["--public-host", RELAY_IP],
    )?;
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
    let mut dirs = vec![data];
    if options.databases {
        let (procs, dir) = start_databases(&lab)?;
        servers.extend(procs);
        dirs.push(dir);
    }
    let mut send = Vec::new();
    let mut listen = Vec::new();
    for (name, host, port) in HCS {
        hc(&["create", name, "--host", host, "--port", port])?;
        let keys = hc(&["keys", name])?;
        let get = |rule: &str| {
            keys["connection_strings"][rule]["primary"]
                .as_str()
                .map(str::to_string)
                .context("string")
        };
        send.push((name.to_string(), get("send")?));
        listen.push(get("listen")?);
    }
    let status_socket = format!("/run/hl-test-agent-{}{tag}.sock", std::process::id());
    // The policy `agent install` would write: exactly these endpoints.
    let policy_dir = tempfile::tempdir()?;
    let policy_file = policy_dir.path().join("policy.toml");
    let rules: String = HCS
        .iter()
        .map(|(name, host, port)| {
            format!("[[allow]]\nhost = \"{host}\"\nports = [{port}]\nhc = \"{name}\"\n")
        })
        .collect();
    std::fs::write(&policy_file, rules)?;
    let policy_arg = policy_file.display().to_string();
    let mut agent_args = vec![
        "agent",
        "run",
        "--status-socket",
        &status_socket,
        "--policy",
        &policy_arg,
    ];
    for cs in &listen {
        agent_args.push("--connection-string");
        agent_args.push(cs);
    }
    let agent = lab.hybridlink(&lab.onprem, "agent", &agent_args)?;
    dirs.push(policy_dir);
    let state_dir = tempfile::tempdir()?;
    let initial: Vec<String> = send
        .iter()
        .filter(|(name, _)| options.initial.is_none_or(|i| i.contains(&name.as_str())))
        .map(|(_, cs)| cs.clone())
        .collect();
    let mut setup = Setup {
        lab,
        _relay: relay,
        _agent: agent,
        _servers: servers,
        appliance: None,
        state_dir,
        site,
        _dirs: dirs,
        send,
        api,
        data_dir,
        allow: options
            .allow
            .map(|a| a.iter().map(|e| e.to_string()).collect()),
    };
    setup.write_config(&initial)?;
    setup.start_appliance()?;
    Ok(setup)
}

impl Setup {
    fn config_path(&self) -> std::path::PathBuf {
        self.state_dir.path().join("appliance.toml")
    }

    /// Writes the appliance's config file with these send strings.
    fn write_config(&self, strings: &[String]) -> Result<()> {
        let state = self.state_dir.path().join("state");
        let list: Vec<String> = strings.iter().map(|s| format!("  \"{s}\",")).collect();
        let mut text = format!(
            "connection_strings = [\n{}\n]\nstate_dir = \"{}\"\n",
            list.join("\n"),
            state.display()
        );
        if let Some(allow) = &self.allow {
            let entries: Vec<String> = allow.iter().map(|e| format!("\"{e}\"")).collect();
            text.push_str(&format!("allow = [{}]\n", entries.join(", ")));
        }
        std::fs::write(self.config_path(), text)?;
        Ok(())
    }

    fn send_string(&self, name: &str) -> Result<String> {
        self.send
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, cs)| cs.clone())
            .context("no such HC")
    }

    fn start_appliance(&mut self) -> Result<()> {
        let config = self.config_path();
        let config = config.to_str().context("utf-8")?;
        let args = [
            "appliance",
            "run",
            "--config",
            config,
            "--metrics",
            "127.0.0.1:9460",
        ];
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

    /// `hybridlink hc ARGS...` against the lab's relay (through its
    /// management API), as an operator would run it.
    fn hc(&self, args: &[&str]) -> Result<()> {
        let out = self
            .lab
            .command(
                &self.lab.relay,
                hybridlink_tests::binary().to_str().context("utf-8")?,
            )
            .args(["hc", "--api", &self.api, "--data-dir", &self.data_dir])
            .args(args)
            .output()?;
        if !out.status.success() {
            bail!("hc {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        }
        Ok(())
    }

    /// `hybridlink appliance status --state-dir ... [--json]` in the app
    /// namespace: its stdout.
    fn appliance_status(&self, json: bool) -> Result<String> {
        let state = self.state_dir.path().join("state");
        let mut cmd = self.lab.command(
            &self.lab.app,
            hybridlink_tests::binary().to_str().context("utf-8")?,
        );
        cmd.args(["appliance", "status", "--state-dir"]).arg(&state);
        if json {
            cmd.arg("--json");
        }
        let out = cmd.output()?;
        if !out.status.success() {
            bail!("appliance status: {}", String::from_utf8_lossy(&out.stderr));
        }
        Ok(String::from_utf8(out.stdout)?)
    }

    /// The state `appliance status --json` shows for `hc`.
    fn hc_state(&self, hc: &str) -> Result<Value> {
        let status: Value = serde_json::from_str(&self.appliance_status(true)?)?;
        status["hybrid_connections"]
            .as_array()
            .and_then(|hcs| hcs.iter().find(|h| h["name"] == hc).cloned())
            .with_context(|| format!("no {hc} in {status}"))
    }

    /// What the app's resolver (the appliance, for our names) answers for
    /// `name`: its first address, or `None`.
    fn resolve(&self, name: &str) -> Result<Option<String>> {
        let out = self
            .lab
            .command(&self.lab.app, "getent")
            .args(["ahostsv4", name])
            .output()?;
        Ok(String::from_utf8_lossy(&out.stdout)
            .split_whitespace()
            .next()
            .map(str::to_string))
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
    if !lab::root_or_skip("unmodified_clients_reach_onprem_servers_by_name_and_literal") {
        return Ok(());
    }
    let s = setup("a", Options::default())?;

    // The appliance runs with glibc's mmap threshold fixed (idle flows stay
    // small; see the netstack_tun bench).
    let pid = s.appliance.as_ref().context("appliance")?.pid();
    let environ = std::fs::read(format!("/proc/{pid}/environ"))?;
    assert!(
        environ
            .split(|b| *b == 0)
            .any(|v| v == b"MALLOC_MMAP_THRESHOLD_=524288"),
        "the appliance does not run with the fixed mmap threshold"
    );
    assert!(
        environ
            .split(|b| *b == 0)
            .any(|v| v == b"MALLOC_TRIM_THRESHOLD_=33554432"),
        "the appliance does not run with the fixed trim threshold"
    );

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

    // The appliance's metrics count what just happened.
    let out = s.curl("http://127.0.0.1:9460/metrics");
    let metrics = String::from_utf8_lossy(&out.stdout);
    let value = |line_start: &str| -> f64 {
        metrics
            .lines()
            .find(|l| l.starts_with(line_start))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0.0)
    };
    assert!(
        value("hybridlink_appliance_flows_opened_total{hc=\"payroll\"}") >= 1.0,
        "{metrics}"
    );
    assert!(
        value("hybridlink_appliance_flows_refused_total{hc=\"stopped\",reason=\"refused\"}") >= 1.0,
        "{metrics}"
    );
    assert!(
        value("hybridlink_appliance_dns_queries_total{answer=\"local\"}") >= 1.0,
        "{metrics}"
    );
    // payroll's page (26 bytes) and more came back, and the request went out.
    assert!(
        value("hybridlink_appliance_bytes_total{hc=\"payroll\",direction=\"from_target\"}") >= 26.0,
        "{metrics}"
    );
    assert!(
        value("hybridlink_appliance_bytes_total{hc=\"payroll\",direction=\"to_target\"}") > 0.0,
        "{metrics}"
    );

    // Half-close end to end: the client shuts down its sending side after
    // the request; the server still answers through the closed direction.
    let script = r#"
import socket
s = socket.create_connection(("payroll.corp", 80), timeout=10)
s.sendall(b"GET / HTTP/1.0\r\nHost: payroll.corp\r\n\r\n")
s.shutdown(socket.SHUT_WR)
data = b""
while True:
    chunk = s.recv(65536)
    if not chunk:
        break
    data += chunk
print(data.decode().split("\r\n\r\n", 1)[1], end="")
"#;
    let out = s
        .lab
        .command(&s.lab.app, "python3")
        .args(["-c", script])
        .output()?;
    assert!(
        out.status.success(),
        "half-close client failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "payroll page from on-prem\n"
    );

    // Bulk both ways, byte-exact: 256 MiB down with curl, 256 MiB up and a
    // half-close, the server's digest coming back after it.
    let big = s.site.path().join("big.bin");
    let made = s.lab.sh(
        &s.lab.onprem,
        &format!("head -c 268435456 /dev/urandom > {}", big.display()),
    )?;
    assert!(made.status.success(), "writing big.bin failed");
    let sum = |ns: &str, line: &str| -> Result<String> {
        let out = s.lab.sh(ns, line)?;
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    };
    let expected = sum(&s.lab.onprem, &format!("sha256sum < {}", big.display()))?;
    let got = sum(
        &s.lab.app,
        "curl -sS --max-time 120 http://payroll.corp/big.bin | sha256sum",
    )?;
    assert_eq!(got, expected, "256 MiB down through the appliance");
    s.lab.send_digest(&s.lab.app, "digest.corp", 9000, 256)?;

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
    if !lab::root_or_skip("the_namespace_is_restored_after_exit_and_after_a_crash") {
        return Ok(());
    }
    let mut s = setup("b", Options::default())?;
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

/// PostgreSQL (trust auth, a throwaway cluster) and Redis, on-prem on
/// 127.0.0.1 only.
fn start_databases(lab: &Lab) -> Result<(Vec<Proc>, tempfile::TempDir)> {
    let pg = tempfile::tempdir()?;
    let pg_dir = pg.path().to_str().context("utf-8")?.to_string();
    let bin = "/usr/lib/postgresql/15/bin";
    lab.sh(
        &lab.onprem,
        &format!("chown postgres {pg_dir} && su postgres -s /bin/sh -c '{bin}/initdb --no-sync -A trust -U postgres -D {pg_dir}/data >/dev/null'"),
    )?;
    let postgres = lab.spawn(
        &lab.onprem,
        "postgres",
        &[
            "su", "postgres", "-s", "/bin/sh", "-c",
            &format!("exec {bin}/postgres -D {pg_dir}/data -k {pg_dir} -c listen_addresses=127.0.0.1 -p 5432"),
        ],
    )?;
    let redis = lab.spawn(
        &lab.onprem,
        "redis",
        &[
            "redis-server",
            "--bind",
            "127.0.0.1",
            "--port",
            "6379",
            "--save",
            "",
            "--appendonly",
            "no",
            "--enable-debug-command",
            "yes",
        ],
    )?;
    // Wait until both accept connections on-prem.
    let deadline = Instant::now() + Duration::from_secs(30);
    while lab
        .sh(
            &lab.onprem,
            "pg_isready -q -h 127.0.0.1 -p 5432 -U postgres && redis-cli -h 127.0.0.1 ping | grep -q PONG",
        )
        .is_err()
    {
        if Instant::now() > deadline {
            bail!("PostgreSQL or Redis did not start on-prem");
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    Ok((vec![postgres, redis], pg))
}

#[test]
fn psql_and_redis_cli_work_and_a_reload_keeps_open_streams() -> Result<()> {
    if !lab::root_or_skip("psql_and_redis_cli_work_and_a_reload_keeps_open_streams") {
        return Ok(());
    }
    let s = setup(
        "c",
        Options {
            databases: true,
            initial: Some(&["payroll", "sql", "cache"]),
            ..Options::default()
        },
    )?;

    let out = s
        .lab
        .command(&s.lab.app, "psql")
        .args(["-h", "sql.corp", "-U", "postgres", "-tAc", "select 6 * 7"])
        .output()?;
    assert!(
        out.status.success(),
        "psql failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "42");

    let out = s.lab.sh(&s.lab.app, "redis-cli -h cache.corp set greeting hello-from-app && redis-cli -h cache.corp get greeting")?;
    assert_eq!(String::from_utf8_lossy(&out.stdout), "OK\nhello-from-app\n");

    // Streams that stay open while the config gains another HC: a download
    // paced to last seconds, and a Redis call that sleeps 4 s before
    // answering. Both end normally, and the new HC works.
    let blob: Vec<u8> = hybridlink_tests::pattern_block(7, 24 << 20);
    std::fs::write(s.site.path().join("blob"), &blob)?;
    let download = s.state_dir.path().join("blob.download");
    let download_arg = download.to_str().context("utf-8")?.to_string();
    let transfer = s
        .lab
        .command(&s.lab.app, "curl")
        .args([
            "-sS",
            "--limit-rate",
            "6M",
            "-o",
            &download_arg,
            "http://payroll.corp/blob",
        ])
        .spawn()?;
    let long = s
        .lab
        .command(&s.lab.app, "redis-cli")
        .args(["-h", "cache.corp", "debug", "sleep", "4"])
        .stdout(std::process::Stdio::piped())
        .spawn()?;
    let out = s.curl(&format!("http://{ONPREM_IP}:8080/"));
    assert!(
        !out.status.success(),
        "the literal HC is not configured yet"
    );

    let mut all: Vec<String> = ["payroll", "sql", "cache", "literal"]
        .iter()
        .map(|n| s.send_string(n))
        .collect::<Result<_>>()?;
    all.sort();
    s.write_config(&all)?;
    let pid = s.appliance.as_ref().context("appliance")?.pid().to_string();
    std::process::Command::new("kill")
        .args(["-HUP", &pid])
        .status()?;
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let out = s.curl(&format!("http://{ONPREM_IP}:8080/"));
        if out.status.success() {
            assert_eq!(
                String::from_utf8_lossy(&out.stdout),
                "payroll page from on-prem\n"
            );
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the reload never made the literal HC work"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    // The stream opened before the reload (a 4 s server-side sleep) ends
    // normally with Redis's answer.
    let out = long.wait_with_output()?;
    assert!(out.status.success());
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "OK");
    let out = transfer.wait_with_output()?;
    assert!(
        out.status.success(),
        "the download across the reload failed"
    );
    assert!(
        std::fs::read(&download)? == blob,
        "the download across the reload is not intact"
    );
    let out = s
        .lab
        .sh(&s.lab.app, "redis-cli -h cache.corp get greeting")?;
    assert_eq!(String::from_utf8_lossy(&out.stdout), "hello-from-app\n");
    Ok(())
}

/// Whether the namespace tests can run (see `lab::root_or_skip`).
fn lab_available(test: &str) -> Result<bool> {
    Ok(lab::root_or_skip(test))
}

/// A host on a link of the app host: a namespace of its own joined to the
/// app namespace by a veth pair, removed (with the pair) on drop.
struct Neighbour {
    ns: String,
}

/// The app host's address on the neighbour's link, and the neighbour's.
const APP_ON_NEIGHBOUR_LINK: &str = "198.18.5.1";
const NEIGHBOUR_IP: &str = "198.18.5.2";

impl Neighbour {
    /// A neighbour that sends 127.0.0.0/8, and `via_app` (addresses the app
    /// host routes into its tun), to the app host, as an attacker on the
    /// link would.
    fn new(lab: &Lab, tag: &str, via_app: &[&str]) -> Result<Neighbour> {
        let ns = format!("hl{}{tag}nb", std::process::id() % 10000);
        let run = |line: &str| -> Result<()> {
            let out = std::process::Command::new("sh")
                .args(["-c", line])
                .output()?;
            if !out.status.success() {
                bail!("{line:?}: {}", String::from_utf8_lossy(&out.stderr).trim());
            }
            Ok(())
        };
        run(&format!("ip netns add {ns}"))?;
        let neighbour = Neighbour { ns: ns.clone() };
        let (a, b) = (format!("{ns}a"), format!("{ns}b"));
        let app = &lab.app;
        run(&format!(
            "ip link add {a} netns {app} type veth peer name {b} netns {ns} && \
             ip -n {app} addr add {APP_ON_NEIGHBOUR_LINK}/24 dev {a} && ip -n {app} link set {a} up && \
             ip -n {ns} addr add {NEIGHBOUR_IP}/24 dev {b} && ip -n {ns} link set {b} up && \
             ip -n {ns} link set lo up"
        ))?;
        // Loopback destinations leave through the link: the local table
        // moves behind a rule that sends 127/8 to the app host, and the
        // neighbour accepts loopback sources back.
        run(&format!(
            "ip netns exec {ns} sysctl -q -w net.ipv4.conf.all.route_localnet=1 \
               net.ipv4.conf.all.rp_filter=0 net.ipv4.conf.{b}.rp_filter=0 && \
             ip -n {ns} rule add pref 10 to 127.0.0.0/8 lookup 90 && \
             ip -n {ns} rule add pref 20 lookup local && ip -n {ns} rule del pref 0 && \
             ip -n {ns} route add 127.0.0.0/8 via {APP_ON_NEIGHBOUR_LINK} dev {b} table 90"
        ))?;
        for dst in via_app {
            run(&format!(
                "ip -n {ns} route add {dst}/32 via {APP_ON_NEIGHBOUR_LINK} dev {b}"
            ))?;
        }
        Ok(neighbour)
    }
}

impl Drop for Neighbour {
    fn drop(&mut self) {
        let _ = std::process::Command::new("ip")
            .args(["netns", "del", &self.ns])
            .status();
    }
}

/// Connects to host:port from namespace `ns`, sends a request line and
/// prints `connected <first bytes>` or `failed <why>` (3 s limit each).
const TRY_CONNECT: &str = r#"
import socket, sys
try:
    c = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=3)
    c.settimeout(3)
    c.sendall(b"GET / HTTP/1.0\r\n\r\n")
    print("connected", c.recv(200))
except Exception as e:
    print("failed", type(e).__name__, e)
"#;

fn try_connect(lab: &Lab, ns: &str, host: &str, port: &str) -> Result<String> {
    let out = lab
        .command(ns, "python3")
        .args(["-c", TRY_CONNECT, host, port])
        .output()?;
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// A TCP server bound to `bind` port 0 in `ns` that greets each connection
/// with `greeting`; returns it and its port.
fn greeter(ns: &str, bind: &str, greeting: &str) -> Result<(Proc, String)> {
    let script = r#"
import json, socket, sys
s = socket.socket()
s.bind((sys.argv[1], 0))
s.listen(16)
print(json.dumps({"port": s.getsockname()[1]}), flush=True)
while True:
    c, _ = s.accept()
    try:
        c.sendall(sys.argv[2].encode() + b"\n")
    finally:
        c.close()
"#;
    let mut proc = Proc::start_program(
        "ip",
        &format!("greeter-{bind}"),
        &["netns", "exec", ns, "python3", "-c", script, bind, greeting],
    )?;
    let port = proc.ready_line()?["port"]
        .as_u64()
        .context("greeter port")?
        .to_string();
    Ok((proc, port))
}

#[test]
fn neighbours_reach_neither_loopback_services_nor_hybrid_connections() -> Result<()> {
    if !lab_available("neighbours_reach_neither_loopback_services_nor_hybrid_connections")? {
        return Ok(());
    }
    let s = setup("n", Options::default())?;
    let lab = &s.lab;
    // Forwarding on, as on every container host.
    lab.sh(&lab.app, "sysctl -q -w net.ipv4.ip_forward=1")?;
    let neighbour = Neighbour::new(lab, "n", &[ONPREM_IP])?;
    let (_secret, secret_port) = greeter(&lab.app, "127.0.0.1", "loopback-secret")?;
    let (_public, public_port) = greeter(&lab.app, APP_ON_NEIGHBOUR_LINK, "public-service")?;
    let virtual_ip = s
        .resolve("payroll.corp")?
        .context("payroll.corp does not resolve")?;
    assert!(virtual_ip.starts_with("127.77."), "{virtual_ip}");

    // The appliance changed loopback routing on its tun only.
    let sysctls = lab.sh(
        &lab.app,
        "sysctl -n net.ipv4.conf.all.route_localnet net.ipv4.conf.hl0.route_localnet",
    )?;
    assert_eq!(String::from_utf8_lossy(&sysctls.stdout), "0\n1\n");

    // The link works: the neighbour reaches what the app host offers on it.
    let got = try_connect(lab, &neighbour.ns, APP_ON_NEIGHBOUR_LINK, &public_port)?;
    assert!(got.contains("public-service"), "{got}");

    // The app itself reaches its loopback service, names and literals.
    let got = try_connect(lab, &lab.app, "127.0.0.1", &secret_port)?;
    assert!(got.contains("loopback-secret"), "{got}");
    for url in [
        "http://payroll.corp/".to_string(),
        format!("http://{ONPREM_IP}:8080/"),
    ] {
        let out = s.curl(&url);
        assert!(
            out.status.success(),
            "the app cannot reach {url}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    // The neighbour reaches neither the loopback service, nor a hybrid
    // connection by its virtual address, nor the IPv4-literal one routed
    // via the app host.
    for (host, port) in [
        ("127.0.0.1", secret_port.as_str()),
        (virtual_ip.as_str(), "80"),
        (ONPREM_IP, "8080"),
    ] {
        let got = try_connect(lab, &neighbour.ns, host, port)?;
        assert!(
            got.starts_with("failed"),
            "the neighbour reached {host}:{port} on the app host: {got}\n{}",
            s.namespace_state()?
        );
    }
    // And the app still can, afterwards.
    let out = s.curl("http://payroll.corp/");
    assert!(out.status.success());
    Ok(())
}

#[test]
fn the_relay_cannot_name_or_route_outside_the_allow_list() -> Result<()> {
    if !lab_available("the_relay_cannot_name_or_route_outside_the_allow_list")? {
        return Ok(());
    }
    // The relay's own address is listed too: the never-route set wins.
    let s = setup(
        "w",
        Options {
            allow: Some(&[
                "payroll.corp",
                "stopped.corp",
                "sql.corp",
                "cache.corp",
                ONPREM_IP,
                RELAY_IP,
            ]),
            ..Options::default()
        },
    )?;
    let rules = |s: &Setup| -> Result<String> {
        let out = s
            .lab
            .sh(&s.lab.app, "ip rule; echo; ip route show table 77")?;
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    };
    let before = rules(&s)?;
    assert!(
        before.contains(&format!("to {ONPREM_IP} iif lo lookup 77")),
        "{before}"
    );
    for name in ["payroll.corp", "stopped.corp", "cache.corp"] {
        let ip = s.resolve(name)?.unwrap_or_default();
        assert!(ip.starts_with("127.77."), "{name} resolves to {ip:?}");
    }
    assert_eq!(s.hc_state("literal")?["state"], "ok");

    // The relay moves endpoints: a literal outside the list, a name outside
    // the list (stopped.corp is no longer announced), the relay's own
    // address; and deletes one (cache.corp is no longer announced).
    s.hc(&[
        "update",
        "literal",
        "--host",
        "198.18.9.9",
        "--port",
        "8080",
    ])?;
    s.hc(&[
        "update",
        "stopped",
        "--host",
        "evil.example",
        "--port",
        "81",
    ])?;
    s.hc(&["update", "sql", "--host", RELAY_IP, "--port", "9443"])?;
    s.hc(&["delete", "cache"])?;
    let expected = [
        (
            "literal",
            "refused: outside the allow list (no entry matches 198.18.9.9)",
        ),
        (
            "stopped",
            "refused: outside the allow list (no entry matches evil.example)",
        ),
        ("sql", "refused: the relay's own address (198.18.0.1)"),
        ("cache", "not announced by the relay"),
        ("payroll", "ok"),
    ];
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let mut pending = Vec::new();
        for (hc, state) in expected {
            let got = s.hc_state(hc)?;
            if got["state"] != state {
                pending.push(format!("{hc}: {got}"));
            }
        }
        if pending.is_empty() {
            break;
        }
        if Instant::now() > deadline {
            bail!("appliance status never showed the refusals: {pending:?}");
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(s.hc_state("literal")?["address"].is_null());
    assert_eq!(s.hc_state("literal")?["endpoint"], "198.18.9.9:8080");
    assert!(
        s.hc_state("payroll")?["address"]
            .as_str()
            .is_some_and(|a| a.starts_with("127.77.")),
        "{}",
        s.hc_state("payroll")?
    );
    let table = s.appliance_status(false)?;
    assert!(
        table.contains("refused: the relay's own address") && table.contains("allow list (config)"),
        "{table}"
    );

    // Nothing of it reaches routes...
    let after = rules(&s)?;
    for addr in ["198.18.9.9", RELAY_IP, ONPREM_IP] {
        assert!(
            !after.contains(&format!("to {addr} ")),
            "{addr} routed:\n{after}"
        );
    }
    assert!(
        after.contains("to 127.77.0.0/16 iif lo lookup 77"),
        "{after}"
    );
    let table77: Vec<&str> = after
        .split("\n\n")
        .nth(1)
        .unwrap_or_default()
        .lines()
        .collect();
    assert_eq!(
        table77,
        ["default dev hl0 proto 104 scope link src 127.0.0.1 "],
        "{after}"
    );
    // ...or DNS answers: names no longer announced, or never allowed, are
    // not answered by the appliance (the upstream knows none of them).
    for name in ["evil.example", "stopped.corp", "cache.corp"] {
        let ip = s.resolve(name)?;
        assert!(ip.is_none(), "{name} still resolves to {ip:?}");
    }

    // The appliance stays connected: the allowed hybrid connection works.
    let out = s.curl("http://payroll.corp/");
    assert!(
        out.status.success(),
        "payroll after the refusals: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "payroll page from on-prem\n"
    );

    // Moved back inside the list, an endpoint is served again.
    s.hc(&[
        "update",
        "stopped",
        "--host",
        "stopped.corp",
        "--port",
        "81",
    ])?;
    let deadline = Instant::now() + Duration::from_secs(20);
    while s.hc_state("stopped")?["state"] != "ok" {
        if Instant::now() > deadline {
            bail!("stopped never came back: {}", s.hc_state("stopped")?);
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    let ip = s.resolve("stopped.corp")?.unwrap_or_default();
    assert!(ip.starts_with("127.77."), "{ip:?}");
    Ok(())
}

/// The soak: 10,000 connections opened and closed through appliance, relay
/// and agent by an unmodified client in 16 threads, while a misbehaving
/// peer holds idle connections to the relay and sends it garbage. Every
/// response must be exact, and afterwards every process's open files,
/// threads and memory must be back within a small margin of what they were
/// after a warm-up.
#[test]
fn ten_thousand_connections_leave_nothing_behind() -> Result<()> {
    if !lab_available("ten_thousand_connections_leave_nothing_behind")? {
        return Ok(());
    }
    let s = setup("k", Options::default())?;
    let page = std::fs::read_to_string(s.site.path().join("index.html"))?;
    let client = fixture("soak_client.py");
    let soak = |total: &str, threads: &str| -> Result<String> {
        let out = s
            .lab
            .command(&s.lab.app, "python3")
            .args([&client, "payroll.corp", "80", total, threads, &page])
            .output()?;
        let printed = String::from_utf8_lossy(&out.stdout).trim().to_string();
        if !out.status.success() {
            bail!(
                "soak client: {printed} (ok, bad): {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(printed)
    };
    let pids = [
        ("relay", s._relay.pid()),
        ("agent", s._agent.pid()),
        (
            "appliance",
            s.appliance.as_ref().context("appliance")?.pid(),
        ),
    ];
    // Warm up: pipes opened, pools and buffers at their working size.
    soak("200", "16")?;
    std::thread::sleep(Duration::from_secs(2));
    let before: Vec<Footprint> = pids
        .iter()
        .map(|(_, pid)| Footprint::of(*pid))
        .collect::<Result<_>>()?;

    let hostile = s.lab.spawn(
        &s.lab.relay,
        "misbehaving-peer",
        &[
            "python3",
            &fixture("misbehaving_peer.py"),
            RELAY_IP,
            "9443",
            "30",
        ],
    )?;
    let started = Instant::now();
    let printed = soak("10000", "16")?;
    eprintln!("soak: 10,000 connections in {:?}", started.elapsed());
    assert_eq!(printed, "10000 0");
    drop(hostile);
    // Idle blocking-pool threads end after 10 s; connections in handshake
    // end at their deadlines.
    std::thread::sleep(Duration::from_secs(12));
    for ((name, pid), before) in pids.iter().zip(before) {
        let after = Footprint::of(*pid)?;
        eprintln!("{name}: {before:?} -> {after:?}");
        assert!(
            after.fds <= before.fds + 8,
            "{name} kept {} more open files",
            after.fds - before.fds
        );
        assert!(
            after.threads <= before.threads + 4,
            "{name} kept {} more threads",
            after.threads - before.threads
        );
        assert!(
            after.rss_kib <= before.rss_kib + 32 * 1024,
            "{name} grew from {} to {} KiB",
            before.rss_kib,
            after.rss_kib
        );
    }
    Ok(())
}
