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
    /// The on-prem web server's directory.
    site: tempfile::TempDir,
    /// Other directories to remove at the end (relay data, databases).
    _dirs: Vec<tempfile::TempDir>,
    /// Send strings by hybrid connection name.
    send: Vec<(String, String)>,
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
}

/// The hybrid connections of the lab: name, host, port.
const HCS: &[(&str, &str, &str)] = &[
    ("payroll", "payroll.corp", "80"),
    ("literal", ONPREM_IP, "8080"),
    ("stopped", "stopped.corp", "81"),
    ("sql", "sql.corp", "5432"),
    ("cache", "cache.corp", "6379"),
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
    ])?;
    let site = tempfile::tempdir()?;
    std::fs::write(
        site.path().join("index.html"),
        "payroll page from on-prem\n",
    )?;
    let mut servers = vec![
        lab.web_server(&lab.onprem, "127.0.0.1", 80, site.path())?,
        lab.web_server(&lab.onprem, ONPREM_IP, 8080, site.path())?,
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
        let text = format!(
            "connection_strings = [\n{}\n]\nstate_dir = \"{}\"\n",
            list.join("\n"),
            state.display()
        );
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
    let s = setup("a", Options::default())?;

    // The appliance runs with glibc's mmap threshold fixed (idle flows stay
    // small; see the netstack_tun bench).
    let pid = s.appliance.as_ref().context("appliance")?.pid();
    let environ = std::fs::read(format!("/proc/{pid}/environ"))?;
    assert!(
        environ
            .split(|b| *b == 0)
            .any(|v| v == b"MALLOC_MMAP_THRESHOLD_=131072"),
        "the appliance does not run with the fixed mmap threshold"
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
    if !lab::is_root() {
        eprintln!("SKIP: the lab needs root");
        return Ok(());
    }
    let s = setup(
        "c",
        Options {
            databases: true,
            initial: Some(&["payroll", "sql", "cache"]),
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
