//! The paths of the reference set (ARCHITECTURE.md, "How performance is
//! measured"), each set up across the same lab: the peer's server where our
//! relay runs, its client where our agent runs, and (for the tun paths) its
//! app-side part in the app namespace.
//!
//! Every path ends at the same two targets on the on-prem machine: iperf3
//! on port 5201 and the greeter (see `probe`) on port 5300. A running path
//! tells the harness which address the app uses for them.

use std::fs;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use lab::netns::Netns;
use lab::{ONPREM_IP, RELAY_APP_SIDE_IP, RELAY_IP, RELAY_ONPREM_SIDE_IP, Role};

/// A shell prefix that raises the open-files limit (every process of every
/// path gets the same) and runs its arguments: the hard limit to 1,048,576
/// where it is lower (the harness runs as root; holding 50,000 connections
/// takes that many files in the probe, the greeter and a path's on-prem
/// side each), then the soft limit to the hard one.
const RAISE_FILES: &str = "h=$(ulimit -Hn); \
     { [ \"$h\" = unlimited ] || [ \"$h\" -ge 1048576 ] || ulimit -Hn 1048576 2>/dev/null; }; \
     ulimit -n \"$(ulimit -Hn)\" && exec \"$@\"";

/// The target ports, the same on every path.
pub const IPERF_PORT: u16 = 5201;
pub const GREET_PORT: u16 = 5300;
/// hybridlink's hold of share `i` (of [`Lab::spread`]) dials its own port,
/// `HOLD_PORT + i`, each a hybrid connection of its own to greeter `i`.
/// Linux picks a connection's ephemeral port by searching for one whose
/// four-tuple is free, even ports first: past about 32,000 connections
/// from one address to one address and port, every `connect` walks the
/// used ones first (88 % of the machine's CPU in `__inet_check_established`
/// while the 50,000-connection hold crept past 40,000, in the probe and in
/// the agent alike). One destination port per share keeps each below it.
pub const HOLD_PORT: u16 = 5310;
/// Most connections hybridlink's hold puts on one destination port.
const HOLD_PER_PORT: u32 = 25_000;
/// Most hold ports ([`HOLD_PORT`] on; the lab reserves them).
pub const HOLD_PORTS_MOST: u32 = 10;
/// The name the tun paths resolve; it resolves on-prem (and, for
/// shadowsocks, on the relay) only.
pub const TARGET_NAME: &str = "bench.corp";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PathKind {
    Direct,
    Ssh,
    Rathole,
    Shadowsocks,
    Hybridlink,
    /// hybridlink's agent and `forward` over Azure Relay's protocol
    /// through the relay's Azure front door: one WebSocket per connection,
    /// TLS inside it.
    HybridlinkAzure,
}

impl PathKind {
    pub const ALL: [PathKind; 6] = [
        PathKind::Direct,
        PathKind::Ssh,
        PathKind::Rathole,
        PathKind::Shadowsocks,
        PathKind::Hybridlink,
        PathKind::HybridlinkAzure,
    ];

    /// The short name used on the command line and in the results.
    pub fn id(self) -> &'static str {
        match self {
            PathKind::Direct => "direct",
            PathKind::Ssh => "ssh",
            PathKind::Rathole => "rathole",
            PathKind::Shadowsocks => "shadowsocks",
            PathKind::Hybridlink => "hybridlink",
            PathKind::HybridlinkAzure => "hybridlink-azure",
        }
    }

    /// The column title of the results table.
    pub fn title(self) -> &'static str {
        match self {
            PathKind::Direct => "direct TCP",
            PathKind::Ssh => "ssh -R + ssh -L",
            PathKind::Rathole => "rathole (noise)",
            PathKind::Shadowsocks => "shadowsocks-rust tun",
            PathKind::Hybridlink => "hybridlink",
            PathKind::HybridlinkAzure => "hybridlink, Azure protocol (forward)",
        }
    }

    /// A peer: one of the tools we compare against (not direct TCP, not us).
    pub fn is_peer(self) -> bool {
        matches!(
            self,
            PathKind::Ssh | PathKind::Rathole | PathKind::Shadowsocks
        )
    }

    pub fn parse(s: &str) -> Result<PathKind> {
        PathKind::ALL
            .into_iter()
            .find(|p| p.id() == s)
            .with_context(|| {
                format!(
                    "unknown path {s:?}: use direct, ssh, rathole, shadowsocks, hybridlink or hybridlink-azure"
                )
            })
    }
}

/// The lab with the tools the paths need.
/// How many log lines of each process a failed measurement records.
const DIAGNOSIS_LINES: usize = 8;

pub struct Lab {
    pub netns: Netns,
    /// Where configs, keys and logs go.
    pub state: PathBuf,
    /// This program (for the probes).
    pub me: PathBuf,
    pub hybridlink: PathBuf,
    /// Where `rathole`, `sslocal` and `ssserver` are.
    pub peers: PathBuf,
    /// The open-files limit every process of the lab gets.
    pub files: u32,
    /// How many greeters, hold probes and hybridlink agents share the
    /// connections held, so that none needs more files than it may open.
    pub spread: u32,
    /// How many ports hybridlink's hold spreads over (see [`HOLD_PORT`]):
    /// one a share, and at most [`HOLD_PER_PORT`] connections on each.
    pub hold_ports: u32,
}

/// A path that is up: the processes to stop and what the app dials.
pub struct Running {
    pub kind: PathKind,
    /// The address the app dials for both targets.
    pub host: IpAddr,
    /// The path's own processes, by namespace and name, for resident memory.
    pub processes: Vec<(Role, &'static str)>,
    /// The path's DNS server on the app side and the name to ask it, if any.
    pub dns: Option<(String, String)>,
    children: Vec<Spawned>,
    /// Shell lines that undo the path's changes to the lab, by role.
    undo: Vec<(Role, String)>,
}

/// A process a path started, with the log its output goes to.
pub struct Spawned {
    pub name: String,
    pub log: PathBuf,
    child: Child,
}

impl Spawned {
    pub fn id(&self) -> u32 {
        self.child.id()
    }

    pub fn kill(&mut self) -> std::io::Result<()> {
        self.child.kill()
    }

    pub fn wait(&mut self) -> std::io::Result<std::process::ExitStatus> {
        self.child.wait()
    }

    /// `running`, or how it ended.
    pub fn state(&mut self) -> String {
        match self.child.try_wait() {
            Ok(None) => "running".into(),
            Ok(Some(status)) => format!("exited: {status}"),
            Err(e) => format!("unknown ({e})"),
        }
    }

    /// The last `n` lines of its log.
    pub fn tail(&self, n: usize) -> Vec<String> {
        let text = fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(n)..]
            .iter()
            .map(|l| l.to_string())
            .collect()
    }
}

impl Lab {
    /// The open-files limit the lab's processes get (see [`RAISE_FILES`]).
    pub fn open_files(&self) -> Result<u32> {
        let out = self
            .raised(Role::App)
            .args(["sh", "-c", "ulimit -n"])
            .output()?;
        let text = String::from_utf8_lossy(&out.stdout);
        match text.trim() {
            "unlimited" => Ok(u32::MAX),
            n => n
                .parse::<u64>()
                .map(|n| u32::try_from(n).unwrap_or(u32::MAX))
                .with_context(|| format!("ulimit -n printed {text:?}")),
        }
    }

    /// How many processes share `connections` held so that each stays well
    /// inside the open-files limit (one file per connection, a tenth spare
    /// for an uneven share and the process's own files).
    /// The number of ports hybridlink's hold of `connections` spreads
    /// over: one a process, and enough for [`HOLD_PER_PORT`] each.
    pub fn hold_ports_for(&self, connections: u32) -> u32 {
        self.processes_for(connections)
            .max(connections.div_ceil(HOLD_PER_PORT))
            .min(HOLD_PORTS_MOST)
    }

    /// The ports of hybridlink's hold.
    pub fn hold_ports(&self) -> impl Iterator<Item = u16> + use<> {
        (0..self.hold_ports.min(HOLD_PORTS_MOST)).map(|i| HOLD_PORT + i as u16)
    }

    pub fn processes_for(&self, connections: u32) -> u32 {
        let per_process = (u64::from(self.files).saturating_sub(1024) * 9 / 10).max(1);
        u64::from(connections)
            .div_ceil(per_process)
            .clamp(1, 64)
            .try_into()
            .unwrap_or(1)
    }

    /// A command in `role`'s namespace that raises the open-files limit and
    /// then runs the arguments it is given.
    fn raised(&self, role: Role) -> Command {
        let mut cmd = self.netns.command(role, "sh");
        cmd.args(["-c", RAISE_FILES, "sh"]);
        cmd
    }

    /// Starts `argv` in `role`'s namespace with a high open-files limit,
    /// its output in `state/NAME.log`.
    pub fn spawn(
        &self,
        role: Role,
        name: &str,
        argv: &[&str],
        env: &[(&str, &str)],
    ) -> Result<Spawned> {
        let path = self.state.join(format!("{name}.log"));
        let log = fs::File::create(&path)?;
        let mut cmd = self.raised(role);
        cmd.args(argv)
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        let child = cmd.spawn().with_context(|| format!("starting {name}"))?;
        Ok(Spawned {
            name: name.to_string(),
            log: path,
            child,
        })
    }

    /// Runs a shell line in `role`'s namespace; its stdout, or its stderr as
    /// the error.
    pub fn sh(&self, role: Role, line: &str) -> Result<String> {
        let out = self.netns.sh_ok(role, line)?;
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
    }

    /// A probe run in `role`'s namespace, its JSON result.
    pub fn probe(&self, role: Role, args: &[&str]) -> Result<serde_json::Value> {
        let mut cmd = self.raised(role);
        cmd.arg(&self.me).arg("probe").args(args);
        let out = cmd.output()?;
        if !out.status.success() {
            bail!(
                "probe {}: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        serde_json::from_slice(&out.stdout).context("probe output")
    }

    /// A probe started in `role`'s namespace with pipes to talk to it.
    pub fn probe_child(&self, role: Role, args: &[&str]) -> Result<Child> {
        let mut cmd = self.raised(role);
        cmd.arg(&self.me)
            .arg("probe")
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped());
        Ok(cmd.spawn()?)
    }

    fn peer(&self, name: &str) -> Result<String> {
        let p = self.peers.join(name);
        if !p.exists() {
            bail!(
                "{} is missing: run ./scripts/bench, which installs the peers",
                p.display()
            );
        }
        Ok(p.display().to_string())
    }

    fn write(&self, name: &str, text: &str) -> Result<String> {
        let p = self.state.join(name);
        fs::write(&p, text)?;
        Ok(p.display().to_string())
    }

    /// Brings `kind` up and waits until a connection through it is greeted.
    pub fn start(&self, kind: PathKind) -> Result<Running> {
        let mut running = Running {
            kind,
            host: ONPREM_IP.parse()?,
            processes: Vec::new(),
            dns: None,
            children: Vec::new(),
            undo: Vec::new(),
        };
        if let Err(e) = self.start_into(&mut running) {
            let why = running.diagnose().join("\n");
            running.stop(self);
            return Err(e.context(format!("starting the {} path; {why}", kind.id())));
        }
        let target = format!("{}:{GREET_PORT}", running.host);
        let ready = wait_for(Duration::from_secs(30), || {
            self.probe(Role::App, &["latency", &target, "1"])
        });
        if let Err(e) = ready {
            let why = running.diagnose().join("\n");
            running.stop(self);
            return Err(e.context(format!("the {} path never greeted; {why}", kind.id())));
        }
        Ok(running)
    }

    fn start_into(&self, r: &mut Running) -> Result<()> {
        match r.kind {
            PathKind::Direct => self.start_direct(r),
            PathKind::Ssh => self.start_ssh(r),
            PathKind::Rathole => self.start_rathole(r),
            PathKind::Shadowsocks => self.start_shadowsocks(r),
            PathKind::Hybridlink => self.start_hybridlink(r),
            PathKind::HybridlinkAzure => self.start_hybridlink_azure(r),
        }
    }

    /// The kernel routes app ↔ on-prem through the relay namespace.
    fn start_direct(&self, r: &mut Running) -> Result<()> {
        r.undo
            .push((Role::Relay, "sysctl -qw net.ipv4.ip_forward=0".into()));
        self.sh(Role::Relay, "sysctl -qw net.ipv4.ip_forward=1")?;
        r.undo
            .push((Role::App, format!("ip route del {ONPREM_IP}/32")));
        self.sh(
            Role::App,
            &format!("ip route add {ONPREM_IP}/32 via {RELAY_APP_SIDE_IP}"),
        )?;
        let app = lab::APP_IP;
        r.undo
            .push((Role::Onprem, format!("ip route del {app}/32")));
        self.sh(
            Role::Onprem,
            &format!("ip route add {app}/32 via {RELAY_ONPREM_SIDE_IP}"),
        )?;
        Ok(())
    }

    /// sshd on the relay; on-prem `ssh -R` publishes the targets there,
    /// app-side `ssh -L` brings them to the app's loopback.
    fn start_ssh(&self, r: &mut Running) -> Result<()> {
        let dir = self.state.join("ssh");
        fs::create_dir_all(&dir)?;
        for key in ["host", "client"] {
            let path = dir.join(key);
            if !path.exists() {
                let ok = Command::new("ssh-keygen")
                    .args(["-q", "-t", "ed25519", "-N", "", "-f"])
                    .arg(&path)
                    .status()?
                    .success();
                if !ok {
                    bail!("ssh-keygen failed");
                }
            }
        }
        fs::copy(dir.join("client.pub"), dir.join("authorized_keys"))?;
        fs::create_dir_all("/run/sshd")?;
        let d = dir.display();
        let config = self.write(
            "sshd_config",
            &format!(
                "ListenAddress {RELAY_IP}:2222\nHostKey {d}/host\nAuthorizedKeysFile {d}/authorized_keys\n\
                 PermitRootLogin prohibit-password\nPasswordAuthentication no\nKbdInteractiveAuthentication no\n\
                 UsePAM no\nStrictModes no\nAllowTcpForwarding yes\nPidFile none\nLogLevel ERROR\n"
            ),
        )?;
        r.children.push(self.spawn(
            Role::Relay,
            "sshd",
            &["/usr/sbin/sshd", "-D", "-e", "-f", &config],
            &[],
        )?);
        let client = |forward: &str, spec: [String; 2]| -> Vec<String> {
            let mut v: Vec<String> = ["ssh", "-N", "-p", "2222", "-i"]
                .iter()
                .map(|s| s.to_string())
                .collect();
            v.push(format!("{d}/client"));
            for o in [
                "StrictHostKeyChecking=no",
                "UserKnownHostsFile=/dev/null",
                "ExitOnForwardFailure=yes",
                "LogLevel=ERROR",
                "BatchMode=yes",
            ] {
                v.extend(["-o".to_string(), o.to_string()]);
            }
            for s in spec {
                v.extend([forward.to_string(), s]);
            }
            v.push(format!("root@{RELAY_IP}"));
            v
        };
        let remote = client(
            "-R",
            [
                format!("127.0.0.1:1{IPERF_PORT}:127.0.0.1:{IPERF_PORT}"),
                format!("127.0.0.1:1{GREET_PORT}:127.0.0.1:{GREET_PORT}"),
            ],
        );
        let local = client(
            "-L",
            [
                format!("127.0.0.1:{IPERF_PORT}:127.0.0.1:1{IPERF_PORT}"),
                format!("127.0.0.1:{GREET_PORT}:127.0.0.1:1{GREET_PORT}"),
            ],
        );
        wait_for(Duration::from_secs(10), || {
            self.sh(
                Role::Onprem,
                &format!("bash -c 'exec 3<>/dev/tcp/{RELAY_IP}/2222'"),
            )
        })?;
        fn argv(v: &[String]) -> Vec<&str> {
            v.iter().map(String::as_str).collect()
        }
        r.children
            .push(self.spawn(Role::Onprem, "ssh-R", &argv(&remote), &[])?);
        // The app side may only forward once the remote ports exist.
        wait_for(Duration::from_secs(10), || {
            self.sh(
                Role::Relay,
                &format!("bash -c 'exec 3<>/dev/tcp/127.0.0.1/1{GREET_PORT}'"),
            )
        })?;
        r.children
            .push(self.spawn(Role::App, "ssh-L", &argv(&local), &[])?);
        r.host = "127.0.0.1".parse()?;
        r.processes = vec![
            (Role::Relay, "sshd"),
            (Role::Onprem, "ssh"),
            (Role::App, "ssh"),
        ];
        Ok(())
    }

    /// rathole's server on the relay publishes the targets there; its client
    /// on-prem serves them. Noise transport (encrypted), as in the reference
    /// set.
    fn start_rathole(&self, r: &mut Running) -> Result<()> {
        let rathole = self.peer("rathole")?;
        let keys = Command::new(&rathole).arg("--genkey").output()?;
        let keys = String::from_utf8_lossy(&keys.stdout).into_owned();
        let (private, public) = parse_rathole_keys(&keys)
            .with_context(|| format!("rathole --genkey printed {keys:?}"))?;
        let services = |side: &str| {
            [("iperf", IPERF_PORT), ("greet", GREET_PORT)]
                .iter()
                .map(|(name, port)| {
                    let addr = if side == "server" {
                        format!("bind_addr = \"{RELAY_IP}:{port}\"")
                    } else {
                        format!("local_addr = \"127.0.0.1:{port}\"")
                    };
                    format!("[{side}.services.{name}]\ntoken = \"bench\"\n{addr}\n")
                })
                .collect::<String>()
        };
        let server = self.write(
            "rathole-server.toml",
            &format!(
                "[server]\nbind_addr = \"{RELAY_IP}:2333\"\n[server.transport]\ntype = \"noise\"\n\
                 [server.transport.noise]\nlocal_private_key = \"{private}\"\n{}",
                services("server")
            ),
        )?;
        let client = self.write(
            "rathole-client.toml",
            &format!(
                "[client]\nremote_addr = \"{RELAY_IP}:2333\"\n[client.transport]\ntype = \"noise\"\n\
                 [client.transport.noise]\nremote_public_key = \"{public}\"\n{}",
                services("client")
            ),
        )?;
        let quiet = [("RUST_LOG", "warn")];
        r.children.push(self.spawn(
            Role::Relay,
            "rathole-server",
            &[&rathole, "--server", &server],
            &quiet,
        )?);
        r.children.push(self.spawn(
            Role::Onprem,
            "rathole-client",
            &[&rathole, "--client", &client],
            &quiet,
        )?);
        r.host = RELAY_IP.parse()?;
        r.processes = vec![(Role::Relay, "rathole"), (Role::Onprem, "rathole")];
        Ok(())
    }

    /// `ssserver` on the relay (it alone resolves the target's name);
    /// `sslocal` in the app namespace with a tun and fake DNS: the app
    /// resolves the name to a fake address routed into the tun.
    fn start_shadowsocks(&self, r: &mut Running) -> Result<()> {
        let (sslocal, ssserver) = (self.peer("sslocal")?, self.peer("ssserver")?);
        let hosts = self.netns.hosts_file(Role::Relay);
        let mut text = fs::read_to_string(&hosts)?;
        if !text.contains(TARGET_NAME) {
            text.push_str(&format!("{ONPREM_IP} {TARGET_NAME}\n"));
            fs::write(&hosts, text)?;
        }
        let password = "hybridlink-bench";
        r.children.push(self.spawn(
            Role::Relay,
            "ssserver",
            &[
                &ssserver,
                "-s",
                &format!("{RELAY_IP}:8388"),
                "-m",
                "aes-128-gcm",
                "-k",
                password,
            ],
            &[],
        )?);
        let db = self.state.join("ss-fakedns");
        let _ = fs::remove_dir_all(&db);
        let config = serde_json::json!({
            "server": RELAY_IP,
            "server_port": 8388,
            "password": password,
            "method": "aes-128-gcm",
            "locals": [
                {
                    "protocol": "tun",
                    "tun_interface_name": "hlbss0",
                    // The fake addresses must not include the tun's own.
                    "tun_interface_address": "198.19.0.1/16",
                },
                {
                    "protocol": "fake-dns",
                    "local_address": "127.0.0.1",
                    "local_port": 5353,
                    "fake_dns_ipv4_network": "198.19.128.0/17",
                    "fake_dns_database_path": db.display().to_string(),
                    // The harness resolves once per run; by default a fake
                    // address is forgotten after a few seconds and then
                    // leaves the tun as itself.
                    "fake_dns_record_expire_duration": 86400,
                },
            ],
        });
        let config = self.write("sslocal.json", &serde_json::to_string_pretty(&config)?)?;
        r.children
            .push(self.spawn(Role::App, "sslocal", &[&sslocal, "-c", &config], &[])?);
        let dns = "127.0.0.1:5353".to_string();
        let answer = wait_for(Duration::from_secs(20), || {
            self.probe(Role::App, &["resolve", &dns, TARGET_NAME])
        })?;
        r.host = answer["address"]
            .as_str()
            .context("fake DNS answer")?
            .parse()?;
        r.dns = Some((dns, TARGET_NAME.to_string()));
        r.processes = vec![(Role::App, "sslocal"), (Role::Relay, "ssserver")];
        Ok(())
    }

    /// Our relay, agent and appliance, two hybrid connections
    /// (bench.corp:5201 and bench.corp:5300).
    /// A hybridlink relay in the relay namespace with the two hybrid
    /// connections; their (send, listen) strings, `--azure` ones (without
    /// the certificate pin) when `azure`.
    fn start_relay(&self, r: &mut Running, azure: bool) -> Result<(Vec<String>, Vec<String>)> {
        let bin = self.hybridlink.display().to_string();
        let data = self.relay_data();
        let _ = fs::remove_dir_all(&data);
        let data = data.display().to_string();
        r.children.push(self.spawn(
            Role::Relay,
            "relay",
            &[
                &bin,
                "relay",
                "serve",
                "--data-dir",
                &data,
                "--listen",
                &format!("{RELAY_IP}:9443"),
                "--api",
                "127.0.0.1:9444",
                "--public-host",
                RELAY_IP,
            ],
            &[],
        )?);
        let hc = |args: &str| {
            self.sh(
                Role::Relay,
                &format!("{bin} hc --api http://127.0.0.1:9444 --data-dir {data} {args}"),
            )
        };
        let form = if azure { " --azure" } else { "" };
        let (mut send, mut listen) = (Vec::new(), Vec::new());
        let mut hcs = vec![
            ("iperf".to_string(), IPERF_PORT),
            ("greet".to_string(), GREET_PORT),
        ];
        if !azure {
            hcs.extend(self.hold_ports().map(|port| (format!("hold{port}"), port)));
        }
        for (name, port) in hcs {
            wait_for(Duration::from_secs(20), || {
                hc(&format!("create {name} --host {TARGET_NAME} --port {port}"))
            })?;
            send.push(hc(&format!("keys {name} --rule send --key primary{form}"))?);
            listen.push(hc(&format!(
                "keys {name} --rule listen --key primary{form}"
            ))?);
        }
        Ok((send, listen))
    }

    fn relay_data(&self) -> PathBuf {
        self.state.join("relay-data")
    }

    /// The agent in the onprem namespace, allowed exactly the endpoints
    /// (the policy `agent install` would write). `listen` holds the iperf
    /// and greeter hybrid connections' strings, then the hold's. Agent 0
    /// serves them all, as a user's one agent would; when the open-files
    /// limit spreads the agent over processes ([`Lab::spread`]), the others
    /// serve only the hold's, so every other row measures one agent.
    fn start_agent(&self, r: &mut Running, listen: &[String], extra: &[&str]) -> Result<()> {
        self.start_one_agent(r, 0, listen, extra)?;
        let held = listen.get(2..).unwrap_or_default();
        if !held.is_empty() {
            for i in 1..self.spread {
                self.start_one_agent(r, i, held, extra)?;
            }
        }
        Ok(())
    }

    /// Agent number `i` (of [`Lab::spread`], each carrying a share of the
    /// streams, one file each).
    fn start_one_agent(
        &self,
        r: &mut Running,
        i: u32,
        listen: &[String],
        extra: &[&str],
    ) -> Result<()> {
        let bin = self.hybridlink.display().to_string();
        let name = if i == 0 {
            "agent".to_string()
        } else {
            format!("agent{i}")
        };
        let agent_socket = self
            .state
            .join(format!("{name}.sock"))
            .display()
            .to_string();
        let label = name.replace("agent", "bench");
        let ports: Vec<String> = [IPERF_PORT, GREET_PORT]
            .into_iter()
            .chain(self.hold_ports())
            .map(|p| p.to_string())
            .collect();
        let policy = self.write(
            "policy.toml",
            &format!(
                "[[allow]]\nhost = \"{TARGET_NAME}\"\nports = [{}]\n",
                ports.join(", ")
            ),
        )?;
        let mut argv = vec![
            bin.as_str(),
            "agent",
            "run",
            "--status-socket",
            &agent_socket,
            "--label",
            &label,
            "--policy",
            &policy,
        ];
        argv.extend_from_slice(extra);
        r.children.push(self.spawn(
            Role::Onprem,
            &name,
            &argv,
            &[("HYBRIDLINK_CONNECTION_STRING", &listen.join("\n"))],
        )?);
        Ok(())
    }

    /// The agent and two `forward`s (app side, one per target port) over
    /// Azure Relay's protocol through the relay's Azure front door, the
    /// relay's own certificate trusted as a CA.
    fn start_hybridlink_azure(&self, r: &mut Running) -> Result<()> {
        let bin = self.hybridlink.display().to_string();
        let (send, listen) = self.start_relay(r, true)?;
        let cert = self.relay_data().join("cert.pem").display().to_string();
        let endpoints = [
            format!("iperf={TARGET_NAME}:{IPERF_PORT}"),
            format!("greet={TARGET_NAME}:{GREET_PORT}"),
        ];
        self.start_agent(
            r,
            &listen,
            &[
                "--ca-file",
                &cert,
                "--endpoint",
                &endpoints[0],
                "--endpoint",
                &endpoints[1],
            ],
        )?;
        for (send, port) in send.iter().zip([IPERF_PORT, GREET_PORT]) {
            let listen = format!("127.0.0.1:{port}");
            r.children.push(self.spawn(
                Role::App,
                "forward",
                &[&bin, "forward", "--listen", &listen, "--ca-file", &cert],
                &[("HYBRIDLINK_CONNECTION_STRING", send)],
            )?);
        }
        wait_for(Duration::from_secs(20), || {
            self.sh(
                Role::App,
                &format!(
                    "{bin} connect --check --ca-file {cert} --wait 2 '{}'",
                    send[1]
                ),
            )
        })?;
        r.host = "127.0.0.1".parse()?;
        r.processes = vec![
            (Role::App, "hybridlink"),
            (Role::Relay, "hybridlink"),
            (Role::Onprem, "hybridlink"),
        ];
        Ok(())
    }

    fn start_hybridlink(&self, r: &mut Running) -> Result<()> {
        let bin = self.hybridlink.display().to_string();
        let (send, listen) = self.start_relay(r, false)?;
        self.start_agent(r, &listen, &[])?;
        let appliance_state = self.state.join("appliance");
        let _ = fs::remove_dir_all(&appliance_state);
        let strings: String = send.iter().map(|s| format!("  \"{s}\",\n")).collect();
        let config = self.write(
            "appliance.toml",
            &format!(
                "state_dir = \"{}\"\nconnection_strings = [\n{strings}]\n",
                appliance_state.display()
            ),
        )?;
        r.children.push(self.spawn(
            Role::App,
            "appliance",
            &[&bin, "appliance", "run", "--config", &config],
            &[],
        )?);
        let dns = "127.0.0.53:53".to_string();
        let answer = wait_for(Duration::from_secs(30), || {
            self.probe(Role::App, &["resolve", &dns, TARGET_NAME])
        })?;
        r.host = answer["address"].as_str().context("DNS answer")?.parse()?;
        r.dns = Some((dns, TARGET_NAME.to_string()));
        r.processes = vec![
            (Role::App, "hybridlink"),
            (Role::Relay, "hybridlink"),
            (Role::Onprem, "hybridlink"),
        ];
        Ok(())
    }
}

impl Running {
    /// Stops the path's processes (app side first) and undoes its changes.
    pub fn stop(&mut self, lab: &Lab) {
        let pids: Vec<String> = self
            .children
            .iter()
            .rev()
            .map(|c| c.id().to_string())
            .collect();
        if !pids.is_empty() {
            let _ = Command::new("kill").arg("-TERM").args(&pids).status();
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        for child in &mut self.children {
            while Instant::now() < deadline && matches!(child.child.try_wait(), Ok(None)) {
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        self.children.clear();
        for (role, line) in self.undo.drain(..) {
            let _ = lab.sh(role, &line);
        }
    }

    /// Why a measurement may have failed, for the report: each process the
    /// path started, whether it still runs (or how it ended), and the last
    /// lines of its log.
    pub fn diagnose(&mut self) -> Vec<String> {
        self.children
            .iter_mut()
            .map(|c| {
                let state = c.state();
                let tail = c.tail(DIAGNOSIS_LINES);
                let mut out = format!("{} ({state}); last lines of {}:", c.name, c.log.display());
                if tail.is_empty() {
                    out.push_str(" (empty)");
                }
                for line in tail {
                    out.push_str("\n    ");
                    out.push_str(line.trim_end());
                }
                out
            })
            .collect()
    }

    /// The resident memory of the path's processes, in KiB.
    /// The path's own processes by the name they were started under, with
    /// their pids.
    pub fn children(&self) -> Vec<(String, u32)> {
        self.children
            .iter()
            .map(|c| (c.name.clone(), c.id()))
            .collect()
    }

    pub fn resident_kib(&self, lab: &Lab) -> u64 {
        let mut total = 0;
        for (role, name) in &self.processes {
            for pid in lab.netns.pids(*role) {
                let comm = fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
                if comm.trim() == *name || (name == &"sshd" && comm.starts_with("sshd")) {
                    total += rss_kib(format!("/proc/{pid}/status"));
                }
            }
        }
        total
    }
}

fn rss_kib(status: impl AsRef<Path>) -> u64 {
    fs::read_to_string(status)
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

/// `rathole --genkey` prints the private and the public key, each on the
/// line after its heading.
fn parse_rathole_keys(out: &str) -> Option<(String, String)> {
    let after = |heading: &str| {
        let mut lines = out.lines();
        lines.find(|l| l.to_ascii_lowercase().contains(heading))?;
        lines.next().map(|l| l.trim().to_string())
    };
    Some((after("private key")?, after("public key")?))
}

/// Retries `f` every 200 ms until it succeeds or `limit` passes.
pub fn wait_for<T>(limit: Duration, mut f: impl FnMut() -> Result<T>) -> Result<T> {
    let deadline = Instant::now() + limit;
    loop {
        match f() {
            Ok(v) => return Ok(v),
            Err(e) if Instant::now() > deadline => {
                return Err(e.context(format!("still failing after {limit:?}")));
            }
            Err(_) => std::thread::sleep(Duration::from_millis(200)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A process that died says so, with its exit status and its last log
    /// lines, as a failed measurement's diagnosis shows it.
    #[test]
    fn a_dead_process_is_diagnosed_with_its_status_and_log() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("relay.log");
        let file = fs::File::create(&log).unwrap();
        let child = Command::new("sh")
            .args(["-c", "for i in $(seq 1 20); do echo line $i; done; exit 3"])
            .stdout(file)
            .spawn()
            .unwrap();
        let mut dead = Spawned {
            name: "relay".into(),
            log: log.clone(),
            child,
        };
        let _ = dead.child.wait();
        let alive = Command::new("sleep").arg("30").spawn().unwrap();
        let mut running = Running {
            kind: PathKind::Hybridlink,
            host: ONPREM_IP.parse().unwrap(),
            processes: Vec::new(),
            dns: None,
            children: vec![
                dead,
                Spawned {
                    name: "agent".into(),
                    log: dir.path().join("agent.log"),
                    child: alive,
                },
            ],
            undo: Vec::new(),
        };
        let found = running.diagnose();
        assert!(
            found[0].starts_with("relay (exited: exit status: 3)"),
            "{found:?}"
        );
        assert!(
            found[0].ends_with("line 20")
                && found[0].contains("line 13")
                && !found[0].contains("line 12\n"),
            "the last {DIAGNOSIS_LINES} lines: {found:?}"
        );
        assert!(found[1].starts_with("agent (running)"), "{found:?}");
        for c in &mut running.children {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}
