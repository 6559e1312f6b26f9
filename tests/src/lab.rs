//! The three-namespace lab of ARCHITECTURE.md ("The lab"), made on the spot
//! for one test and removed when it drops (even when the test fails):
//!
//! ```text
//!  app 198.18.1.2 ──veth── 198.18.1.1 relay 198.18.2.1 ──veth── 198.18.2.2 onprem
//!                          (lo: 198.18.0.1, the relay's address)
//! ```
//!
//! The relay namespace does not forward, so app and onprem can reach each
//! other only through the relay program. Each namespace gets its own
//! `/etc/netns/NAME/{hosts,resolv.conf}`, which `ip netns exec` mounts over
//! `/etc`: the on-prem host names resolve only on-prem, and the app's
//! resolver is the lab's upstream until the appliance takes over.

use std::process::{Command, Output};

use anyhow::{Context, Result, bail};
use lab::Role;
use lab::netns::Netns;

pub use lab::{APP_IP, ONPREM_IP, RELAY_IP};

use crate::{Proc, binary};

/// The relay namespace's address on the app side, where the lab's upstream
/// DNS server listens.
pub const UPSTREAM_DNS_IP: &str = lab::RELAY_APP_SIDE_IP;

pub use ::lab::preconditions::{is_root, root_or_skip};

/// One lab (the `lab` crate's, as `hybridlink lab` builds it); everything
/// in it is removed on drop.
#[derive(Debug)]
pub struct Lab {
    /// Namespace of the application side.
    pub app: String,
    /// Namespace of the relay.
    pub relay: String,
    /// Namespace of the on-prem side.
    pub onprem: String,
    netns: Netns,
}

impl Lab {
    /// Builds a lab whose names start with `hl` and contain `tag` (keep it
    /// to 3 characters: interface names are limited to 15).
    pub fn new(tag: &str) -> Result<Lab> {
        let prefix = format!("hl{}{tag}", std::process::id() % 10000);
        let root = std::env::temp_dir().join("hybridlink-test-labs");
        let netns = Netns::new(&prefix, &binary(), &root)?;
        let lab = Lab {
            app: netns.ns(Role::App),
            relay: netns.ns(Role::Relay),
            onprem: netns.ns(Role::Onprem),
            netns,
        };
        // Drop cleans up whatever part of the setup succeeded.
        lab.netns.build()?;
        Ok(lab)
    }

    /// Makes each (ip, name) resolve inside namespace `ns` only.
    pub fn hosts(&self, ns: &str, entries: &[(&str, &str)]) -> Result<()> {
        let mut text = String::from("127.0.0.1 localhost\n");
        for (ip, name) in entries {
            text.push_str(&format!("{ip} {name}\n"));
        }
        std::fs::write(
            std::path::Path::new("/etc/netns").join(ns).join("hosts"),
            text,
        )?;
        Ok(())
    }

    /// Makes `names` resolve to `ip` inside the on-prem namespace only.
    pub fn onprem_hosts(&self, entries: &[(&str, &str)]) -> Result<()> {
        let mut text = String::from("127.0.0.1 localhost\n");
        for (ip, name) in entries {
            text.push_str(&format!("{ip} {name}\n"));
        }
        std::fs::write(self.netns.hosts_file(Role::Onprem), text)?;
        Ok(())
    }

    /// The app namespace's resolv.conf as a process inside it sees it.
    pub fn app_resolv_conf(&self) -> Result<String> {
        Ok(std::fs::read_to_string(self.netns.resolv_conf(Role::App))?)
    }

    /// A command that runs `program` inside namespace `ns`.
    pub fn command(&self, ns: &str, program: &str) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", ns, program]);
        c
    }

    /// Runs a shell command line inside `ns`; fails on a non-zero exit.
    pub fn sh(&self, ns: &str, line: &str) -> Result<Output> {
        let out = self.command(ns, "sh").args(["-c", line]).output()?;
        if !out.status.success() {
            bail!(
                "{line:?} in {ns} failed: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(out)
    }

    /// Starts `hybridlink ARGS...` inside `ns`.
    pub fn hybridlink(&self, ns: &str, name: &str, args: &[&str]) -> Result<Proc> {
        let bin = binary();
        let bin = bin.to_str().context("utf-8 binary path")?;
        let mut argv = vec!["netns", "exec", ns, bin];
        argv.extend_from_slice(args);
        Proc::start_program("ip", name, &argv)
    }

    /// Starts `hybridlink relay serve` inside `ns` with `data_dir`,
    /// listening on `listen` and its API on the namespace's loopback, with
    /// more `extra` flags; returns the process and the API's `http://` URL.
    pub fn start_relay(
        &self,
        ns: &str,
        data_dir: &str,
        listen: &str,
        extra: &[&str],
    ) -> Result<(Proc, String)> {
        let mut args = vec![
            "relay",
            "serve",
            "--data-dir",
            data_dir,
            "--listen",
            listen,
            "--api",
            "127.0.0.1:0",
        ];
        args.extend_from_slice(extra);
        let mut relay = self.hybridlink(ns, "relay", &args)?;
        let ready = relay.ready_line()?;
        let api = format!(
            "http://{}",
            ready["api"].as_str().context("api in ready line")?
        );
        Ok((relay, api))
    }

    /// Serves the files of `dir` over HTTP at `bind:port` inside `ns`.
    pub fn web_server(
        &self,
        ns: &str,
        bind: &str,
        port: u16,
        dir: &std::path::Path,
    ) -> Result<Proc> {
        let dir = dir.to_str().context("utf-8 directory")?;
        let port = port.to_string();
        let argv = [
            "python3",
            "-m",
            "http.server",
            "--bind",
            bind,
            &port,
            "--directory",
            dir,
        ];
        // Its access log (a line a request) would drown the test's output.
        let mut full = vec!["netns", "exec", ns];
        full.extend_from_slice(&argv);
        Proc::spawn(
            "ip",
            &format!("web-{bind}-{port}"),
            &full,
            std::process::Stdio::null(),
            std::process::Stdio::null(),
        )
    }

    /// Starts any program inside `ns`, stdout discarded.
    pub fn spawn(&self, ns: &str, name: &str, argv: &[&str]) -> Result<Proc> {
        let mut full = vec!["netns", "exec", ns];
        full.extend_from_slice(argv);
        Proc::start_program_quiet("ip", name, &full)
    }

    /// Starts, inside `ns`, a server at `bind:port` that reads each
    /// connection until the client half-closes, then answers
    /// `LENGTH SHA256` and closes: the answer arrives only if the
    /// half-close went through.
    pub fn digest_server(&self, ns: &str, bind: &str, port: u16) -> Result<Proc> {
        let script = DIGEST_SERVER
            .replace("BIND", bind)
            .replace("PORT", &port.to_string());
        self.spawn(ns, &format!("digest-{port}"), &["python3", "-c", &script])
    }

    /// From `ns`, sends `mib` MiB to `host:port` (a [`Lab::digest_server`]),
    /// half-closes, and checks that the server saw exactly those bytes.
    pub fn send_digest(&self, ns: &str, host: &str, port: u16, mib: u32) -> Result<()> {
        let script = DIGEST_CLIENT
            .replace("HOST", host)
            .replace("PORT", &port.to_string())
            .replace("MIB", &mib.to_string());
        let out = self.command(ns, "python3").args(["-c", &script]).output()?;
        let text = String::from_utf8_lossy(&out.stdout);
        let lines: Vec<&str> = text.lines().collect();
        anyhow::ensure!(
            out.status.success() && lines.len() == 2 && lines[0] == lines[1],
            "{mib} MiB to {host}:{port} and a half-close: the server saw {:?}, \
             the client sent {:?} ({})",
            lines.first(),
            lines.get(1),
            String::from_utf8_lossy(&out.stderr).trim()
        );
        Ok(())
    }
}

const DIGEST_SERVER: &str = r#"
import hashlib, socket
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("BIND", PORT))
s.listen(8)
while True:
    c, _ = s.accept()
    h, n = hashlib.sha256(), 0
    while True:
        b = c.recv(1 << 16)
        if not b:
            break
        h.update(b)
        n += len(b)
    c.sendall(f"{n} {h.hexdigest()}\n".encode())
    c.close()
"#;

const DIGEST_CLIENT: &str = r#"
import hashlib, socket
block = bytes((i * 7 + 3) % 251 for i in range(1 << 16))
s = socket.create_connection(("HOST", PORT), timeout=120)
h = hashlib.sha256()
for _ in range(MIB * 16):
    s.sendall(block)
    h.update(block)
s.shutdown(socket.SHUT_WR)
answer = b""
while True:
    b = s.recv(4096)
    if not b:
        break
    answer += b
print(answer.decode().strip())
print(f"{MIB * 16 * len(block)} {h.hexdigest()}")
"#;

impl Drop for Lab {
    fn drop(&mut self) {
        // Stops what still runs inside, then removes the namespaces (their
        // veths and tun devices go with them) and their files.
        if let Err(e) = self.netns.remove() {
            eprintln!("removing the lab: {e:#}");
        }
    }
}
