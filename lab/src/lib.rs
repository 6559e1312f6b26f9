//! The lab (ARCHITECTURE.md, "The lab"): three machines, `app` (the
//! appliance and unmodified clients), `relay` and `onprem` (the agent and
//! real servers), joined so that app and onprem reach each other only
//! through the relay program. With `--relays 2` or `3` the relay is a
//! cluster: one machine per node (`relay`, `relay2`, `relay3`), each with a
//! relay node and an etcd member, as three relay hosts would run them.
//!
//! The machines are either network namespaces made on the spot ([`netns`])
//! or the VMs of `vagrant/` ([`vagrant`]). Both are provisioned by the same
//! role scripts (`lab/provision/*.sh`, compiled into the binary) and checked
//! by the same demo ([`demo`]), through the [`Machines`] trait.

pub mod demo;
pub mod netns;
pub mod packages;
pub mod preconditions;
pub mod services;
pub mod vagrant;

use std::process::Output;

use anyhow::Result;

/// The relay's address, reachable from both sides (on the relay's `lo`).
pub const RELAY_IP: &str = "198.18.0.1";
/// The app machine's address.
pub const APP_IP: &str = "198.18.1.2";
/// The on-prem machine's address.
pub const ONPREM_IP: &str = "198.18.2.2";
/// The relay's address on the app side.
pub const RELAY_APP_SIDE_IP: &str = "198.18.1.1";
/// The relay's address on the on-prem side.
pub const RELAY_ONPREM_SIDE_IP: &str = "198.18.2.1";

/// The relay's name in a cluster lab, written into connection strings and
/// resolving on app and onprem to every node's address (one hosts line per
/// node), as `relay.example.com` has one DNS record per node.
pub const RELAY_NAME: &str = "relay.lab.test";

/// The most relay nodes a lab has.
pub const MAX_RELAYS: usize = 3;

/// Relay node `n`'s (1-based) address, reachable from app and onprem; node
/// 1's is [`RELAY_IP`].
pub fn relay_node_ip(n: usize) -> String {
    format!("198.18.0.{n}")
}

/// Relay node `n`'s address on the links between the nodes, where its etcd
/// member listens: app and onprem have no route to it.
pub fn relay_cluster_ip(n: usize) -> String {
    format!("198.18.3.{n}")
}

/// The role scripts, by file name; `common.sh` is sourced by the others.
pub const SCRIPTS: &[(&str, &str)] = &[
    ("common.sh", include_str!("../provision/common.sh")),
    ("relay.sh", include_str!("../provision/relay.sh")),
    ("onprem.sh", include_str!("../provision/onprem.sh")),
    ("app.sh", include_str!("../provision/app.sh")),
];

/// One of the lab's three machines.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// The application side: appliance and unmodified clients.
    App,
    /// The relay (node 1 of a cluster).
    Relay,
    /// Node 2 of a relay cluster.
    Relay2,
    /// Node 3 of a relay cluster.
    Relay3,
    /// The on-premises side: agent and real servers.
    Onprem,
}

impl Role {
    /// Every role of a lab with one relay, in provisioning order.
    pub const ALL: [Role; 3] = [Role::Relay, Role::Onprem, Role::App];

    /// The relay nodes, node 1 first.
    pub const RELAY_NODES: [Role; MAX_RELAYS] = [Role::Relay, Role::Relay2, Role::Relay3];

    /// The first `relays` relay nodes (1 to [`MAX_RELAYS`]).
    pub fn relay_nodes(relays: usize) -> &'static [Role] {
        &Role::RELAY_NODES[..relays.clamp(1, MAX_RELAYS)]
    }

    /// Every role of a lab with `relays` relay nodes, in provisioning order.
    pub fn all(relays: usize) -> Vec<Role> {
        let mut roles = Role::relay_nodes(relays).to_vec();
        roles.extend([Role::Onprem, Role::App]);
        roles
    }

    /// The relay node's number (1-based), or `None` for app and onprem.
    pub fn relay_node(self) -> Option<usize> {
        Role::RELAY_NODES
            .iter()
            .position(|r| *r == self)
            .map(|i| i + 1)
    }

    /// The role's name, as in ARCHITECTURE.md and the Vagrantfile.
    pub fn name(self) -> &'static str {
        match self {
            Role::App => "app",
            Role::Relay => "relay",
            Role::Relay2 => "relay2",
            Role::Relay3 => "relay3",
            Role::Onprem => "onprem",
        }
    }
}

/// How the role scripts run hybridlink's roles (`SERVICES` in
/// `lab/provision/common.sh`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Services {
    /// In the background of the role script: namespaces have no init system.
    Processes,
    /// As the systemd units `hybridlink ROLE install` writes, as on a real
    /// host; [`services`] checks what they run as.
    Systemd,
}

impl Services {
    /// The value of `SERVICES`.
    pub fn name(self) -> &'static str {
        match self {
            Services::Processes => "processes",
            Services::Systemd => "systemd",
        }
    }
}

/// Where the lab runs: something that runs a shell line as root on the
/// machine of a role.
pub trait Machines {
    /// Runs `line` with `sh -c` as root on `role`'s machine, with `env` set,
    /// and returns its output whatever its exit status.
    fn sh(&self, role: Role, line: &str, env: &[(&str, &str)]) -> Result<Output>;
    /// The `hybridlink` binary's path on the machines.
    fn hybridlink(&self) -> String;
    /// The directory holding the role scripts on the machines.
    fn scripts(&self) -> String;
    /// `role`'s state directory on its machine (logs, pid files, data).
    fn state(&self, role: Role) -> String;
    /// How many relay nodes the lab has (1: one relay; more: a cluster on
    /// etcd, one machine per node).
    fn relays(&self) -> usize {
        1
    }
    /// How the roles run there.
    fn services(&self) -> Services {
        Services::Processes
    }
    /// Size of the file behind the demo's throughput figure, in MiB
    /// (smaller where the machines are emulated).
    fn big_file_mib(&self) -> u64 {
        256
    }
}

/// Quotes `s` for a POSIX shell.
pub fn shell_quote(s: &str) -> String {
    if !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_./=:@,+".contains(&b))
    {
        return s.to_string();
    }
    format!("'{}'", s.replace('\'', r"'\''"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_lab_has_one_machine_per_relay_node() {
        assert_eq!(Role::all(1), Role::ALL.to_vec());
        assert_eq!(
            Role::all(3),
            [
                Role::Relay,
                Role::Relay2,
                Role::Relay3,
                Role::Onprem,
                Role::App
            ]
        );
        assert_eq!(Role::Relay3.relay_node(), Some(3));
        assert_eq!(Role::App.relay_node(), None);
        let lab = netns::Netns::new(
            "hl",
            std::path::Path::new("/bin/true"),
            std::path::Path::new("/tmp"),
        )
        .unwrap();
        for bad in [0, MAX_RELAYS + 1] {
            let err = lab.clone().with_relays(bad).unwrap_err().to_string();
            assert!(err.contains("1 to 3 relay nodes"), "{bad}: {err}");
        }
        assert_eq!(lab.with_relays(3).unwrap().relays(), 3);
    }

    #[test]
    fn quoting_survives_the_shell() {
        for s in [
            "plain",
            "",
            "two words",
            "it's",
            "a;b|c$(x)`y`",
            "Endpoint=sb://x/;Key=a+b=",
        ] {
            let out = std::process::Command::new("sh")
                .args(["-c", &format!("printf %s {}", shell_quote(s))])
                .output()
                .unwrap();
            assert_eq!(String::from_utf8_lossy(&out.stdout), s);
        }
    }
}
