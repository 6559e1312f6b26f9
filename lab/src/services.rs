//! The checks of the roles' systemd services, where the lab runs them as
//! the units `hybridlink ROLE install` writes (the VMs): what each runs as
//! and with which capabilities, that the relay's data and the agent's
//! control socket are out of other users' reach while root still manages
//! both, and that root's edits of the agent's files reach the unprivileged
//! agent. The traffic checks of [`crate::demo`] go through these services.

use std::collections::BTreeSet;

use crate::demo::{Check, check, first_line};
use crate::{Machines, Role, shell_quote};

/// Linux's capabilities by number, as `/proc/PID/status` counts them.
const CAPABILITIES: [&str; 41] = [
    "CAP_CHOWN",
    "CAP_DAC_OVERRIDE",
    "CAP_DAC_READ_SEARCH",
    "CAP_FOWNER",
    "CAP_FSETID",
    "CAP_KILL",
    "CAP_SETGID",
    "CAP_SETUID",
    "CAP_SETPCAP",
    "CAP_LINUX_IMMUTABLE",
    "CAP_NET_BIND_SERVICE",
    "CAP_NET_BROADCAST",
    "CAP_NET_ADMIN",
    "CAP_NET_RAW",
    "CAP_IPC_LOCK",
    "CAP_IPC_OWNER",
    "CAP_SYS_MODULE",
    "CAP_SYS_RAWIO",
    "CAP_SYS_CHROOT",
    "CAP_SYS_PTRACE",
    "CAP_SYS_PACCT",
    "CAP_SYS_ADMIN",
    "CAP_SYS_BOOT",
    "CAP_SYS_NICE",
    "CAP_SYS_RESOURCE",
    "CAP_SYS_TIME",
    "CAP_SYS_TTY_CONFIG",
    "CAP_MKNOD",
    "CAP_LEASE",
    "CAP_AUDIT_WRITE",
    "CAP_AUDIT_CONTROL",
    "CAP_SETFCAP",
    "CAP_MAC_OVERRIDE",
    "CAP_MAC_ADMIN",
    "CAP_SYSLOG",
    "CAP_WAKE_ALARM",
    "CAP_BLOCK_SUSPEND",
    "CAP_AUDIT_READ",
    "CAP_PERFMON",
    "CAP_BPF",
    "CAP_CHECKPOINT_RESTORE",
];

/// The names of the capabilities in a `/proc/PID/status` mask.
fn capability_names(mask: u64) -> BTreeSet<String> {
    (0..64)
        .filter(|bit| mask & (1 << bit) != 0)
        .map(|bit| match CAPABILITIES.get(bit) {
            Some(name) => name.to_string(),
            None => format!("capability {bit}"),
        })
        .collect()
}

/// One role's service and what it must run as.
#[derive(Debug)]
struct Expected {
    role: Role,
    unit: &'static str,
    user: &'static str,
    /// Its permitted, effective and bounding sets.
    capabilities: &'static [&'static str],
    /// Its ambient set.
    ambient: &'static [&'static str],
}

/// The lab's services: the relay on port 443 (`relay.sh`) keeps the one
/// capability that takes, the agent none; the appliance is root, bounded.
const SERVICES: [Expected; 3] = [
    Expected {
        role: Role::Relay,
        unit: "hybridlink-relay",
        user: "hybridlink-relay",
        capabilities: &["CAP_NET_BIND_SERVICE"],
        ambient: &["CAP_NET_BIND_SERVICE"],
    },
    Expected {
        role: Role::Onprem,
        unit: "hybridlink-agent",
        user: "hybridlink-agent",
        capabilities: &[],
        ambient: &[],
    },
    Expected {
        role: Role::App,
        unit: "hybridlink-appliance",
        user: "root",
        capabilities: &["CAP_NET_ADMIN", "CAP_NET_BIND_SERVICE"],
        ambient: &[],
    },
];

/// Prints the unit's state, its main process's user and capability sets,
/// and systemd's exposure score, one per line.
fn service_line(unit: &str) -> String {
    format!(
        "u={unit}.service; systemctl is-active $u; pid=$(systemctl show -p MainPID --value $u); \
         ps -o user= -p $pid; grep -E '^Cap(Prm|Eff|Bnd|Amb):' /proc/$pid/status; \
         systemd-analyze security --no-pager $u | tail -n 1"
    )
}

fn list(names: &BTreeSet<String>) -> String {
    if names.is_empty() {
        "none".into()
    } else {
        names.iter().cloned().collect::<Vec<_>>().join(" ")
    }
}

/// Judges what [`service_line`] printed against `e`.
fn judge_service(e: &Expected, out: &str) -> Result<String, String> {
    let mut lines = out.lines();
    let state = lines.next().unwrap_or_default();
    if state != "active" {
        return Err(format!("{} is {state:?}", e.unit));
    }
    let user = lines.next().unwrap_or_default().trim();
    if user != e.user {
        return Err(format!("runs as {user:?}, not {}", e.user));
    }
    let mut sets = Vec::new();
    let mut exposure = String::new();
    for line in lines {
        match line.split_once(':') {
            Some((field, mask)) if field.starts_with("Cap") => {
                let mask = u64::from_str_radix(mask.trim(), 16)
                    .map_err(|_| format!("unreadable {field}: {mask:?}"))?;
                sets.push((field.to_string(), capability_names(mask)));
            }
            // "→ Overall exposure level for UNIT: 1.7 OK 🙂"
            _ => {
                if let Some((_, level)) = line.rsplit_once(": ") {
                    exposure = level
                        .split_whitespace()
                        .take(2)
                        .collect::<Vec<_>>()
                        .join(" ");
                }
            }
        }
    }
    let want = |names: &[&str]| names.iter().map(|n| n.to_string()).collect::<BTreeSet<_>>();
    for (field, expected) in [
        ("CapPrm", e.capabilities),
        ("CapEff", e.capabilities),
        ("CapBnd", e.capabilities),
        ("CapAmb", e.ambient),
    ] {
        let Some((_, got)) = sets.iter().find(|(f, _)| f == field) else {
            return Err(format!("no {field} in /proc/PID/status"));
        };
        if *got != want(expected) {
            return Err(format!(
                "{field} is {}, expected {}",
                list(got),
                list(&want(expected))
            ));
        }
    }
    Ok(format!(
        "active as {user}, capabilities: {}; systemd-analyze security: {exposure}",
        list(&want(e.capabilities))
    ))
}

/// Expects success and exactly `want` on stdout.
fn exactly(want: &'static str) -> impl Fn(bool, &str, &str) -> Result<String, String> {
    move |ok, out, err| {
        if ok && out == want {
            Ok(want.trim().replace('\n', "; "))
        } else if ok {
            Err(format!("got {:?}, expected {:?}", out.trim(), want.trim()))
        } else {
            Err(format!("{:?}: {}", out.trim(), first_line(err)))
        }
    }
}

/// Runs a command as `nobody`, an unprivileged user.
const AS_NOBODY: &str = "setpriv --reuid=nobody --regid=nogroup --clear-groups";

/// Checks the lab's services (see the module's doc); run after the demo's
/// checks.
pub fn checks(m: &dyn Machines) -> Vec<Check> {
    let mut checks = Vec::new();
    for e in &SERVICES {
        checks.push(check(
            m,
            e.role,
            &format!("{} runs as {}", e.unit, e.user),
            &service_line(e.unit),
            |_, out, _| judge_service(e, out),
        ));
    }
    let bin = shell_quote(&m.hybridlink());
    let data = shell_quote(&format!("{}/data", m.state(Role::Relay)));
    checks.push(check(
        m,
        Role::Relay,
        "the relay's data dir is its user's alone; root's `hc --data-dir` still reads the manage key",
        &format!(
            "d={data}; stat -c '%U %a' \"$d\" \"$d/manage.key\"; \
             {AS_NOBODY} cat \"$d/manage.key\" 2>&1 | grep -o 'Permission denied'; \
             {bin} hc --data-dir \"$d\" list >/dev/null && echo 'root manages'"
        ),
        exactly("hybridlink-relay 700\nhybridlink-relay 600\nPermission denied\nroot manages\n"),
    ));
    let socket = "/run/hybridlink-agent/agent.sock";
    checks.push(check(
        m,
        Role::Onprem,
        "the agent's control socket is in a directory only its user enters; root's `agent status` reaches it",
        &format!(
            "stat -c '%U %a' /run/hybridlink-agent; \
             {AS_NOBODY} {bin} agent status --status-socket {socket} 2>&1 | grep -o 'Permission denied'; \
             {bin} agent status >/dev/null && echo 'root asks'"
        ),
        exactly("hybridlink-agent 700\nPermission denied\nroot asks\n"),
    ));
    checks.push(check(
        m,
        Role::Onprem,
        "root's `agent allow` keeps the agent's files root:hybridlink-agent 0640; the agent rereads them (`agent reload`, SIGHUP)",
        &format!(
            "{bin} agent allow 198.18.2.2:9 --hc stopped | tail -n 1; \
             stat -c '%U:%G %a' /etc/hybridlink/agent.conf /etc/hybridlink/policy.toml; \
             {bin} agent reload; \
             u=hybridlink-agent; pid=$(systemctl show -p MainPID --value $u); systemctl reload $u; sleep 1; \
             [ \"$(systemctl show -p MainPID --value $u)\" = \"$pid\" ] && systemctl is-active $u"
        ),
        exactly(
            "the running agent reread its policy\nroot:hybridlink-agent 640\nroot:hybridlink-agent 640\n\
             reloaded: added -; changed -; removed -\nactive\n",
        ),
    ));
    checks
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn capability_masks_are_named() {
        assert_eq!(
            capability_names(0x1400),
            BTreeSet::from([
                "CAP_NET_ADMIN".to_string(),
                "CAP_NET_BIND_SERVICE".to_string()
            ])
        );
        assert!(capability_names(0).is_empty());
        assert!(capability_names(1 << 41).contains("capability 41"));
    }

    #[test]
    fn a_service_is_judged_by_its_user_and_every_capability_set() {
        let appliance = &SERVICES[2];
        let out = |bnd: &str| {
            format!(
                "active\nroot\nCapPrm:\t0000000000001400\nCapEff:\t0000000000001400\n\
                 CapBnd:\t{bnd}\nCapAmb:\t0000000000000000\n\
                 → Overall exposure level for hybridlink-appliance.service: 2.5 OK 🙂\n"
            )
        };
        assert_eq!(
            judge_service(appliance, &out("0000000000001400")),
            Ok(
                "active as root, capabilities: CAP_NET_ADMIN CAP_NET_BIND_SERVICE; \
                systemd-analyze security: 2.5 OK"
                    .into()
            )
        );
        assert_eq!(
            judge_service(appliance, &out("000001ffffffffff")).unwrap_err(),
            format!(
                "CapBnd is {}, expected CAP_NET_ADMIN CAP_NET_BIND_SERVICE",
                list(&capability_names(0x1ff_ffff_ffff))
            )
        );
        let relay = &SERVICES[0];
        assert_eq!(
            judge_service(relay, "active\nroot\n").unwrap_err(),
            "runs as \"root\", not hybridlink-relay"
        );
        assert_eq!(
            judge_service(relay, "failed\n").unwrap_err(),
            "hybridlink-relay is \"failed\""
        );
    }
}
