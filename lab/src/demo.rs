//! Provisioning the lab's roles and the demo's checks: unmodified clients on
//! the app machine (curl, psql, redis-cli) reach the on-prem servers by name
//! through the appliance, the relay and the agent.

use std::fmt::Write as _;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::{
    APP_IP, Machines, ONPREM_IP, RELAY_IP, RELAY_NAME, Role, Services, relay_cluster_ip,
    relay_node_ip, shell_quote,
};

/// The lab's hybrid connections, as `relay.sh` creates them: name, the
/// endpoint the app uses.
pub const HCS: &[(&str, &str)] = &[
    ("payroll", "payroll.corp:80"),
    ("sql", "sql.corp:5432"),
    ("cache", "cache.corp:6379"),
    ("literal", "198.18.2.2:8080"),
    ("stopped", "stopped.corp:81"),
];

/// The page the on-prem web server serves.
const PAGE: &str = "payroll page from on-prem\n";

/// The connection strings the relay made, by hybrid connection.
#[derive(Debug, Default)]
pub struct Strings {
    /// Send strings (the app side), name and string.
    pub send: Vec<(String, String)>,
    /// Listen strings (the agent), name and string.
    pub listen: Vec<(String, String)>,
}

/// Runs `name` (a role script) on `role`'s machine; returns its stdout, or
/// fails with its stderr.
fn script(m: &dyn Machines, role: Role, name: &str, env: &[(&str, &str)]) -> Result<String> {
    let state = m.state(role);
    let bin = m.hybridlink();
    let mut all = vec![
        ("LAB_STATE", state.as_str()),
        ("HYBRIDLINK", bin.as_str()),
        ("SERVICES", m.services().name()),
    ];
    all.extend_from_slice(env);
    let line = format!("sh {}/{name}", shell_quote(&m.scripts()));
    let out = m.sh(role, &line, &all)?;
    if !out.status.success() {
        bail!(
            "provisioning {}: {name} failed: {}",
            role.name(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The name or address connection strings give for the relay: its
/// address with one relay, a name resolving to every node with several.
pub fn relay_host(m: &dyn Machines) -> &'static str {
    if m.relays() > 1 { RELAY_NAME } else { RELAY_IP }
}

/// What app and onprem need to resolve the relay's name to every node
/// (nothing with one relay, whose strings name its address).
fn relay_name_env(m: &dyn Machines) -> Vec<(&'static str, String)> {
    if m.relays() == 1 {
        return Vec::new();
    }
    let addresses: Vec<String> = (1..=m.relays()).map(relay_node_ip).collect();
    vec![
        ("RELAY_NAME", RELAY_NAME.to_string()),
        ("RELAY_ADDRESSES", addresses.join(" ")),
    ]
}

/// Runs `relay.sh` for relay node `node` with `extra` variables; returns
/// what it printed (node 1: the connection strings).
pub fn start_relay_node(m: &dyn Machines, node: Role, extra: &[(&str, &str)]) -> Result<String> {
    let n = node.relay_node().context("not a relay node")?;
    let mut env: Vec<(&str, String)> = vec![
        ("RELAY_IP", relay_host(m).to_string()),
        ("ONPREM_IP", ONPREM_IP.to_string()),
    ];
    if m.relays() > 1 {
        let members: Vec<String> = (1..=m.relays()).map(relay_cluster_ip).collect();
        env.extend([
            ("RELAY_NODE", n.to_string()),
            ("ETCD_IPS", members.join(" ")),
            ("ADVERTISE_IP", relay_node_ip(n)),
            ("CERT_FROM", format!("{}/data", m.state(Role::Relay))),
        ]);
        env.extend(relay_name_env(m));
    }
    let mut env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    env.extend_from_slice(extra);
    script(m, node, "relay.sh", &env)
}

/// Provisions the roles in order (the relay nodes, onprem, app) with the
/// role scripts, handing the connection strings from the relay to the
/// others. A cluster's etcd members are all started first; node 1 then
/// makes the certificate and the hybrid connections, and the other nodes
/// start with a copy of its certificate.
pub fn provision(m: &dyn Machines) -> Result<Strings> {
    let nodes = Role::relay_nodes(m.relays());
    if nodes.len() > 1 {
        for node in nodes {
            start_relay_node(m, *node, &[("ETCD_ONLY", "yes")])?;
        }
    }
    let out = start_relay_node(m, Role::Relay, &[])?;
    for node in &nodes[1..] {
        start_relay_node(m, *node, &[])?;
    }
    let mut strings = Strings::default();
    for line in out.lines() {
        let mut parts = line.splitn(3, ' ');
        match (parts.next(), parts.next(), parts.next()) {
            (Some("send"), Some(name), Some(cs)) => strings.send.push((name.into(), cs.into())),
            (Some("listen"), Some(name), Some(cs)) => strings.listen.push((name.into(), cs.into())),
            _ => bail!("relay.sh printed an unexpected line: {line:?}"),
        }
    }
    if strings.send.len() != HCS.len() || strings.listen.len() != HCS.len() {
        bail!(
            "relay.sh printed {} send and {} listen strings, expected {} each",
            strings.send.len(),
            strings.listen.len(),
            HCS.len()
        );
    }
    let join = |v: &[(String, String)]| {
        v.iter()
            .map(|(_, cs)| cs.as_str())
            .collect::<Vec<_>>()
            .join("\n")
    };
    let listen = join(&strings.listen);
    let mib = m.big_file_mib().to_string();
    let name_env = relay_name_env(m);
    let name_env: Vec<(&str, &str)> = name_env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let mut env = vec![
        ("ONPREM_IP", ONPREM_IP),
        ("LISTEN_STRINGS", listen.as_str()),
        ("BIG_MIB", mib.as_str()),
    ];
    env.extend_from_slice(&name_env);
    script(m, Role::Onprem, "onprem.sh", &env)?;
    let send = join(&strings.send);
    let mut env = vec![("SEND_STRINGS", send.as_str())];
    env.extend_from_slice(&name_env);
    script(m, Role::App, "app.sh", &env)?;
    Ok(strings)
}

/// One check of the demo.
#[derive(Debug, Clone)]
pub struct Check {
    /// What was tried, as a person would say it.
    pub what: String,
    /// Whether it did what a user expects.
    pub ok: bool,
    /// What was seen.
    pub detail: String,
    /// How long it took.
    pub took: Duration,
}

/// What the demo saw.
#[derive(Debug, Default)]
pub struct Report {
    /// Each check, in order.
    pub checks: Vec<Check>,
    /// The checks of the installed services (where the roles run as
    /// systemd units), in order.
    pub services: Vec<Check>,
    /// The app side's view of the on-prem names: name and address.
    pub names: Vec<(String, String)>,
    /// `hybridlink agent status` on-prem.
    pub agent_status: String,
    /// Throughput of one download through the whole path, in Gbit/s.
    pub throughput_gbps: Option<f64>,
    /// The size of that download, MiB.
    pub big_file_mib: u64,
}

impl Report {
    /// True when every check passed.
    pub fn passed(&self) -> bool {
        !self.checks.is_empty() && self.checks.iter().chain(&self.services).all(|c| c.ok)
    }

    /// The report as a person reads it.
    pub fn render(&self) -> String {
        let mut s = String::from("Checks (unmodified clients on the app side)\n");
        render_checks(&mut s, &self.checks);
        if !self.services.is_empty() {
            s.push_str("\nServices (the systemd units `hybridlink ROLE install` wrote)\n");
            render_checks(&mut s, &self.services);
        }
        s.push_str("\nNames as the app resolves them (the appliance's DNS)\n");
        for (name, addr) in &self.names {
            let _ = writeln!(s, "  {name:<16} → {addr}");
        }
        s.push_str("\nAgent status (onprem: hybridlink agent status)\n");
        for line in self.agent_status.lines() {
            let _ = writeln!(s, "  {line}");
        }
        s.push_str("\nThroughput\n");
        match self.throughput_gbps {
            Some(g) => {
                let _ = writeln!(
                    s,
                    "  curl http://payroll.corp/big.bin, {} MiB through appliance, relay and agent: {g:.2} Gbit/s",
                    self.big_file_mib
                );
            }
            None => s.push_str("  not measured (the download failed)\n"),
        }
        let all = || self.checks.iter().chain(&self.services);
        let passed = all().filter(|c| c.ok).count();
        let _ = writeln!(s, "\n{passed} of {} checks passed", all().count());
        s
    }
}

fn render_checks(s: &mut String, checks: &[Check]) {
    for c in checks {
        let mark = if c.ok { '✓' } else { '✗' };
        let _ = writeln!(
            s,
            "  {mark} {} — {} ({} ms)",
            c.what,
            c.detail,
            c.took.as_millis()
        );
    }
}

/// Runs `line` on `role`'s machine and judges its output: `judge` gets
/// whether it succeeded, its stdout and its stderr, and says what was seen.
pub(crate) fn check(
    m: &dyn Machines,
    role: Role,
    what: &str,
    line: &str,
    judge: impl Fn(bool, &str, &str) -> std::result::Result<String, String>,
) -> Check {
    let started = Instant::now();
    let (ok, detail) = match m.sh(role, line, &[]) {
        Ok(out) => {
            let stdout = String::from_utf8_lossy(&out.stdout);
            let stderr = String::from_utf8_lossy(&out.stderr);
            match judge(out.status.success(), &stdout, &stderr) {
                Ok(d) => (true, d),
                Err(d) => (false, d),
            }
        }
        Err(e) => (false, format!("{e:#}")),
    };
    Check {
        what: what.to_string(),
        ok,
        detail,
        took: started.elapsed(),
    }
}

pub(crate) fn first_line(s: &str) -> String {
    s.trim().lines().next().unwrap_or("").to_string()
}

/// Expects success and exactly `want` on stdout.
fn expect(want: &'static str) -> impl Fn(bool, &str, &str) -> std::result::Result<String, String> {
    move |ok, out, err| {
        if ok && out == want {
            Ok(format!("got {:?}", want.trim()))
        } else if ok {
            Err(format!("got {:?}, expected {:?}", out.trim(), want.trim()))
        } else {
            Err(first_line(err))
        }
    }
}

/// The port the demo moves a hybrid connection to, which the lab's on-prem
/// policy does not allow.
pub const POLICY_PROBE_PORT: u16 = 18099;

/// Runs the demo's checks against a provisioned lab.
pub fn run_checks(m: &dyn Machines) -> Report {
    let mut report = Report::default();
    let big_file_bytes = m.big_file_mib() << 20;
    report.big_file_mib = m.big_file_mib();
    let t = "--max-time 10";
    report.checks.push(check(
        m,
        Role::App,
        "curl http://payroll.corp/ (by host name)",
        &format!("curl -sS {t} http://payroll.corp/"),
        expect(PAGE),
    ));
    report.checks.push(check(
        m,
        Role::App,
        &format!("curl http://{ONPREM_IP}:8080/ (IPv4 literal, no DNS)"),
        &format!("curl -sS {t} http://{ONPREM_IP}:8080/"),
        expect(PAGE),
    ));
    report.checks.push(check(
        m,
        Role::App,
        "psql -h sql.corp (PostgreSQL on-prem)",
        "PGCONNECT_TIMEOUT=10 psql -h sql.corp -U postgres -tAc 'select 6 * 7'",
        expect("42\n"),
    ));
    report.checks.push(check(
        m,
        Role::App,
        "redis-cli -h cache.corp (Redis on-prem)",
        "redis-cli -h cache.corp set greeting hello-from-app && redis-cli -h cache.corp get greeting",
        expect("OK\nhello-from-app\n"),
    ));
    report.checks.push(check(
        m,
        Role::App,
        "curl http://stopped.corp:81/ is refused (nothing listens on-prem)",
        &format!("curl -sS {t} http://stopped.corp:81/"),
        |ok, _, err| {
            if !ok && (err.contains("Connection refused") || err.contains("Couldn't connect")) {
                Ok("refused, as the on-prem port is".into())
            } else if ok {
                Err("the connection succeeded".into())
            } else {
                Err(first_line(err))
            }
        },
    ));
    let bin = shell_quote(&m.hybridlink());
    let relay_data = shell_quote(&format!("{}/data", m.state(Role::Relay)));
    let send = m
        .sh(Role::Relay, &format!("{bin} hc --api http://127.0.0.1:9444 --data-dir {relay_data} keys payroll --rule send --key primary"), &[])
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default();
    report.checks.push(check(
        m,
        Role::App,
        "hybridlink connect (a tcpping: one stream, no appliance)",
        &format!(
            "printf 'GET / HTTP/1.0\\r\\n\\r\\n' | {bin} connect {}",
            shell_quote(&send)
        ),
        |ok, out, err| {
            if ok && out.ends_with(PAGE) {
                Ok("the page came back".into())
            } else if ok {
                Err(format!("unexpected answer {:?}", first_line(out)))
            } else {
                Err(first_line(err))
            }
        },
    ));
    // The on-prem policy (written by `agent allow --endpoint-of`, as
    // `agent install` writes it) allows exactly the endpoints the relay
    // named at set-up: an endpoint the relay moves elsewhere is refused at
    // the agent, whatever the relay says.
    let hc_cmd = format!("{bin} hc --api http://127.0.0.1:9444 --data-dir {relay_data}");
    let stopped_send = m
        .sh(
            Role::Relay,
            &format!("{hc_cmd} update stopped --port {POLICY_PROBE_PORT} >/dev/null && {hc_cmd} keys stopped --rule send --key primary"),
            &[],
        )
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default();
    report.checks.push(check(
        m,
        Role::App,
        &format!("the relay moves stopped.corp to port {POLICY_PROBE_PORT}: the on-prem policy refuses it"),
        &format!("{bin} connect --check {}", shell_quote(&stopped_send)),
        |ok, _, err| {
            if !ok && err.contains("on-prem policy refuses") {
                Ok(first_line(&err[err.find("on-prem policy").unwrap_or(0)..]))
            } else if ok {
                Err("the agent dialed an endpoint its policy does not allow".into())
            } else {
                Err(first_line(err))
            }
        },
    ));
    let download = check(
        m,
        Role::App,
        &format!(
            "curl http://payroll.corp/big.bin ({} MiB)",
            m.big_file_mib()
        ),
        "curl -sS --max-time 120 -o /dev/null -w '%{size_download} %{time_total}' http://payroll.corp/big.bin",
        |ok, out, err| {
            let mut parts = out.split_whitespace();
            let size: u64 = parts.next().and_then(|s| s.parse().ok()).unwrap_or(0);
            let secs = parts.next().unwrap_or("?");
            if ok && size == big_file_bytes {
                Ok(format!("{size} bytes in {secs} s"))
            } else if ok {
                Err(format!("got {size} bytes"))
            } else {
                Err(first_line(err))
            }
        },
    );
    if download.ok {
        // curl's own transfer time, from the detail above.
        let secs: Option<f64> = download
            .detail
            .split_whitespace()
            .nth(3)
            .and_then(|s| s.parse().ok());
        report.throughput_gbps = secs
            .filter(|s| *s > 0.0)
            .map(|s| big_file_bytes as f64 * 8.0 / s / 1e9);
    }
    report.checks.push(download);
    if m.relays() > 1 {
        report.checks.extend(cluster_checks(m));
    }

    let names: Vec<&str> = HCS
        .iter()
        .filter_map(|(_, ep)| ep.split(':').next())
        .filter(|h| h.ends_with(".corp"))
        .collect();
    for name in names {
        let addr = m
            .sh(Role::App, &format!("getent hosts {name}"), &[])
            .ok()
            .filter(|o| o.status.success())
            .and_then(|o| {
                String::from_utf8_lossy(&o.stdout)
                    .split_whitespace()
                    .next()
                    .map(str::to_string)
            })
            .unwrap_or_else(|| "(does not resolve)".into());
        report.names.push((name.to_string(), addr));
    }
    // The installed agent's socket is where root's `agent status` looks.
    let socket = match m.services() {
        Services::Processes => format!(
            " --status-socket {}",
            shell_quote(&format!("{}/agent.sock", m.state(Role::Onprem)))
        ),
        Services::Systemd => String::new(),
    };
    report.agent_status = match m.sh(Role::Onprem, &format!("{bin} agent status{socket}"), &[]) {
        Ok(o) if o.status.success() => String::from_utf8_lossy(&o.stdout).into_owned(),
        Ok(o) => format!(
            "(failed: {})",
            first_line(&String::from_utf8_lossy(&o.stderr))
        ),
        Err(e) => format!("(failed: {e:#})"),
    };
    if m.services() == Services::Systemd {
        report.services = crate::services::checks(m);
    }
    report
}

/// How long the cluster checks wait for the app's next connection and for
/// the agent to be attached on the remaining nodes; the nodes' lease is
/// 5 s.
const FAILOVER_DEADLINE: Duration = Duration::from_secs(20);

/// The relay's API on each node, as `hc` takes it.
fn hc_on(m: &dyn Machines, node: Role) -> String {
    let data = shell_quote(&format!("{}/data", m.state(node)));
    format!(
        "{} hc --api http://127.0.0.1:9444 --data-dir {data}",
        shell_quote(&m.hybridlink())
    )
}

/// The relay node whose port the appliance (on the app, at [`APP_IP`]) is
/// connected to.
fn appliance_node(m: &dyn Machines) -> Option<Role> {
    Role::relay_nodes(m.relays()).iter().copied().find(|node| {
        m.sh(*node, "ss -Htn state established '( sport = :9443 )'", &[])
            .map(|o| {
                String::from_utf8_lossy(&o.stdout)
                    .split_whitespace()
                    .any(|w| w.starts_with(&format!("{APP_IP}:")))
            })
            .unwrap_or(false)
    })
}

/// How many agents node `node` has attached for `payroll`.
fn payroll_listeners(m: &dyn Machines, node: Role) -> std::result::Result<u64, String> {
    let out = m
        .sh(
            node,
            &format!("{} --json status payroll", hc_on(m, node)),
            &[],
        )
        .map_err(|e| format!("{e:#}"))?;
    if !out.status.success() {
        return Err(first_line(&String::from_utf8_lossy(&out.stderr)));
    }
    let status: serde_json::Value =
        serde_json::from_slice(&out.stdout).map_err(|e| format!("hc status: {e}"))?;
    status["listener_count"]
        .as_u64()
        .ok_or_else(|| format!("hc status has no listener_count: {status}"))
}

/// The cluster's checks: the relay node the appliance uses is killed
/// (SIGKILL); the app's next connection by host name still succeeds,
/// through another node, and the agent is attached on every remaining
/// node. The node is started again afterwards, so the lab stays whole.
fn cluster_checks(m: &dyn Machines) -> Vec<Check> {
    let started = Instant::now();
    let nodes = Role::relay_nodes(m.relays());
    let Some(victim) = appliance_node(m) else {
        return vec![Check {
            what: "find the relay node the appliance is connected to".into(),
            ok: false,
            detail: format!("no node has a connection from {APP_IP} on port 9443"),
            took: started.elapsed(),
        }];
    };
    let mut checks = Vec::new();
    let pid_file = shell_quote(&format!("{}/relay.pid", m.state(victim)));
    let killed = m
        .sh(victim, &format!("kill -KILL \"$(cat {pid_file})\""), &[])
        .map(|o| o.status.success())
        .unwrap_or(false);
    let what = format!(
        "kill -9 the relay on {} (the appliance's node): curl http://payroll.corp/ by host name still succeeds",
        victim.name()
    );
    if !killed {
        checks.push(Check {
            what,
            ok: false,
            detail: format!("could not kill the relay on {}", victim.name()),
            took: started.elapsed(),
        });
        return checks;
    }
    let killed_at = Instant::now();
    let mut attempts = 0;
    let mut last = String::new();
    let ok = loop {
        attempts += 1;
        match m.sh(Role::App, "curl -sS --max-time 5 http://payroll.corp/", &[]) {
            Ok(o) if o.status.success() && o.stdout == PAGE.as_bytes() => break true,
            Ok(o) => last = first_line(&String::from_utf8_lossy(&o.stderr)),
            Err(e) => last = format!("{e:#}"),
        }
        if killed_at.elapsed() > FAILOVER_DEADLINE {
            break false;
        }
        std::thread::sleep(Duration::from_millis(500));
    };
    checks.push(Check {
        what,
        ok,
        detail: if ok {
            format!(
                "the page came back {} ms after the kill ({attempts} attempt{})",
                killed_at.elapsed().as_millis(),
                if attempts == 1 { "" } else { "s" }
            )
        } else {
            format!("no page within {FAILOVER_DEADLINE:?}: {last}")
        },
        took: killed_at.elapsed(),
    });

    let rest: Vec<Role> = nodes.iter().copied().filter(|n| *n != victim).collect();
    let names: Vec<&str> = rest.iter().map(|n| n.name()).collect();
    let waited = Instant::now();
    let (ok, seen) = loop {
        let seen: Vec<_> = rest.iter().map(|n| payroll_listeners(m, *n)).collect();
        if seen.iter().all(|l| matches!(l, Ok(n) if *n >= 1)) {
            break (true, seen);
        }
        if killed_at.elapsed() > FAILOVER_DEADLINE {
            break (false, seen);
        }
        std::thread::sleep(Duration::from_millis(500));
    };
    let listed: Vec<String> = names
        .iter()
        .zip(&seen)
        .map(|(name, l)| match l {
            Ok(n) => format!("{name}: {n}"),
            Err(e) => format!("{name}: {e}"),
        })
        .collect();
    checks.push(Check {
        what: format!(
            "the agent is attached on the remaining nodes ({})",
            names.join(", ")
        ),
        ok,
        detail: format!("payroll's agents per node: {}", listed.join(", ")),
        took: waited.elapsed(),
    });

    let restarted = Instant::now();
    let (ok, detail) = match start_relay_node(m, victim, &[]) {
        Ok(_) => (true, "its relay serves again".to_string()),
        Err(e) => (false, format!("{e:#}")),
    };
    checks.push(Check {
        what: format!("{} started again (the lab stays whole)", victim.name()),
        ok,
        detail,
        took: restarted.elapsed(),
    });
    checks
}

/// Reads a role's log file, for error messages.
pub fn role_log(m: &dyn Machines, role: Role, name: &str) -> Result<String> {
    let path = shell_quote(&format!("{}/{name}.log", m.state(role)));
    let out = m.sh(role, &format!("tail -n 30 {path}"), &[])?;
    String::from_utf8(out.stdout).context("log is not UTF-8")
}
