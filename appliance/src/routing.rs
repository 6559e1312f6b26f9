//! Routes the virtual range, and every IPv4-literal HC endpoint, into the tun.
//!
//! Linux delivers all of 127/8 to `lo` through the `local` table, which rule
//! priority 0 consults before anything else. To send a loopback sub-range
//! into the tun the appliance, inside its own network namespace:
//!
//! ```text
//! ip rule add pref 100 iif lo to 127.77.0.0/16 lookup 77 protocol 104
//! ip rule add pref 100 iif lo to 198.18.9.9/32 lookup 77 protocol 104   (one per IP-literal HC)
//! ip rule add pref 200 lookup local protocol 104
//! ip rule del pref 0                                               (the kernel's `lookup local`)
//! ip route add default dev hl0 table 77 src 127.0.0.1 proto 104
//! net.ipv4.conf.hl0.route_localnet = 1, net.ipv4.conf.hl0.rp_filter = 0
//! ```
//!
//! # What this exposes, and to whom
//!
//! Nothing to the namespace's neighbours. `route_localnet` is set on the tun
//! only: a loopback destination arriving on any other interface stays a
//! martian and is dropped, so no neighbour reaches a service bound to
//! `127.0.0.1`. The rules that lead into the tun match `iif lo`, which in
//! policy routing means "generated on this host" (the kernel looks output
//! routes up with `iif lo`); a packet forwarded from another interface
//! (`ip_forward=1`) never matches them and never reaches the netstack. The
//! kernel's reverse-path check looks the source up as if from `lo` too, so
//! replies from the tun pass it even with `rp_filter` strict on `all`.
//!
//! Every rule and route it adds carries the routing protocol
//! [`RULE_PROTOCOL`], so that [`cleanup_leftovers`] removes what a killed
//! appliance left and nothing else, even when an administrator has rules of
//! their own at the same priorities. [`setup`] returns a [`RoutingGuard`]
//! that undoes everything on [`RoutingGuard::undo`] or on drop.
//!
//! A rule per /32 rather than one rule per table entry keeps the table a
//! single default route: the rules decide what enters the tun, the table
//! only says "into the tun".

use std::collections::BTreeSet;
use std::fmt;
use std::io;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::Command;

use netstack::Ipv4Range;
use transport::atomic_file::AtomicFile;

use crate::virtual_range::VirtualRange;

/// The routing table that holds the route into the tun, unless configured.
pub const DEFAULT_TABLE: u32 = 77;

/// The routing protocol number (`ip rule ... protocol N`, `ip route ...
/// proto N`) that marks every rule and route the appliance adds; 104 is
/// ASCII `h`, and no routing daemon claims it.
pub const RULE_PROTOCOL: u8 = 104;

/// The address packets into the tun leave from; it must stay on `lo`.
const SOURCE: Ipv4Addr = Ipv4Addr::LOCALHOST;

/// Kernel numbers of the built-in tables (`ip -N` prints these).
const TABLE_LOCAL: u32 = 255;
const TABLE_MAIN: u32 = 254;
const TABLE_DEFAULT: u32 = 253;

/// The first priority the kernel's own `lookup main` rule holds.
const PREF_MAIN: u32 = 32766;

/// Bounds the delete-until-gone loops of [`cleanup_leftovers`].
const MAX_RULE_DELETES: usize = 65_536;

/// The two rule priorities the appliance uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RulePrefs {
    /// Priority of the rules that send the range and each /32 to the table
    /// (default 100).
    pub to_table: u32,
    /// Priority of the `lookup local` rule that replaces the kernel's one at
    /// priority 0 (default 200); must be above `to_table`.
    pub local: u32,
}

impl Default for RulePrefs {
    fn default() -> Self {
        Self {
            to_table: 100,
            local: 200,
        }
    }
}

/// What [`setup`] routes into which tun. Start from [`RoutingConfig::new`]
/// and adjust the public fields.
#[derive(Clone, Debug)]
pub struct RoutingConfig {
    /// The tun interface, already created and up (e.g. `hl0`).
    pub tun: String,
    /// The virtual range whose addresses DNS hands out.
    pub range: VirtualRange,
    /// Single addresses routed into the tun as well: the IPv4-literal HC
    /// endpoints. Addresses inside `range` need no rule and are skipped.
    pub hosts: Vec<Ipv4Addr>,
    /// The routing table holding the default route into the tun.
    pub table: u32,
    /// The rule priorities.
    pub prefs: RulePrefs,
    /// Where to note the sysctl values and the priority-0 rule found before
    /// setup, so that [`cleanup_leftovers`] can put them back after a crash
    /// (a file in the appliance's state dir). `None` keeps no journal: a
    /// crash then leaves the sysctls of a persistent tun changed.
    pub journal: Option<PathBuf>,
}

impl RoutingConfig {
    /// Routes [`VirtualRange::DEFAULT`] into `tun` through [`DEFAULT_TABLE`] with the
    /// default priorities, no extra hosts and no journal.
    pub fn new(tun: impl Into<String>) -> Self {
        Self {
            tun: tun.into(),
            range: VirtualRange::DEFAULT,
            hosts: Vec::new(),
            table: DEFAULT_TABLE,
            prefs: RulePrefs::default(),
            journal: None,
        }
    }

    fn validate(&self) -> Result<(), RoutingError> {
        let invalid = |reason: String| Err(RoutingError::InvalidConfig(reason));
        if !valid_ifname(&self.tun) {
            return invalid(format!(
                "{:?} is not a usable interface name (1 to 15 bytes, no '/' or whitespace, \
                 not \"all\" or \"default\")",
                self.tun
            ));
        }
        if self.range.contains(SOURCE) {
            return invalid(format!(
                "range {} contains {SOURCE}, which must stay on lo",
                self.range
            ));
        }
        if matches!(self.table, 0 | TABLE_DEFAULT | TABLE_MAIN | TABLE_LOCAL) {
            return invalid(format!(
                "table {} is built in; pick a number of our own, such as {DEFAULT_TABLE}",
                self.table
            ));
        }
        let RulePrefs { to_table, local } = self.prefs;
        if !(0 < to_table && to_table < local && local < PREF_MAIN) {
            return invalid(format!(
                "rule priorities must satisfy 0 < to_table < local < {PREF_MAIN}, \
                 got to_table {to_table}, local {local}"
            ));
        }
        for &host in &self.hosts {
            check_host(host)?;
        }
        Ok(())
    }
}

/// Why routing could not be set up, changed or undone.
#[derive(Debug, thiserror::Error)]
pub enum RoutingError {
    /// The configuration cannot work; nothing was changed.
    #[error("invalid routing configuration: {0}")]
    InvalidConfig(String),
    /// The tun does not exist in this network namespace.
    #[error("no interface {0:?} in this network namespace; create the tun before routing into it")]
    NoInterface(String),
    /// An address that must not be routed into the tun.
    #[error("{0} cannot be routed into the tun (unspecified, broadcast, multicast or {SOURCE})")]
    InvalidHost(Ipv4Addr),
    /// A command could not be started at all.
    #[error("could not run `{command}`: {source} (is iproute2 installed?)")]
    Spawn {
        /// The command line.
        command: String,
        /// Why it did not start.
        source: io::Error,
    },
    /// A command ran and failed.
    #[error("`{command}` failed ({status}): {stderr}")]
    Command {
        /// The command line.
        command: String,
        /// Its exit status.
        status: String,
        /// What it wrote to stderr, trimmed.
        stderr: String,
    },
    /// A `/proc/sys` file could not be read or written.
    #[error("sysctl {path}: {source}")]
    Sysctl {
        /// The file under `/proc/sys`.
        path: PathBuf,
        /// The I/O error.
        source: io::Error,
    },
    /// The journal could not be read, written or removed.
    #[error("routing journal {path}: {source}")]
    Journal {
        /// The journal file.
        path: PathBuf,
        /// The I/O error.
        source: io::Error,
    },
    /// The journal does not read as one this module wrote.
    #[error("routing journal {path} line {line} is not understood: {text:?}; fix or remove it")]
    BadJournal {
        /// The journal file.
        path: PathBuf,
        /// The 1-based line number.
        line: usize,
        /// The line.
        text: String,
    },
    /// A previous appliance left its rules or journal behind.
    #[error(
        "a previous appliance left its routing behind ({what}); \
         call cleanup_leftovers before setup"
    )]
    Leftovers {
        /// What was found.
        what: String,
    },
    /// Undo failed at one or more steps; every step was still attempted.
    #[error("undoing the routing failed at {} step(s); first: {}", .0.len(), .0[0])]
    Undo(Vec<RoutingError>),
}

/// The routing [`setup`] put in place. [`undo`](Self::undo) (or drop)
/// restores what was there before; `std::mem::forget` on it simulates a
/// crash, which [`cleanup_leftovers`] repairs.
#[derive(Debug)]
pub struct RoutingGuard {
    config: RoutingConfig,
    /// The `/32`s that have a rule of ours, in the order of `ip rule` output.
    hosts: BTreeSet<Ipv4Addr>,
    steps: Vec<Step>,
    undone: bool,
}

/// One change made by [`setup`], in the order made; undone in reverse.
#[derive(Debug)]
enum Step {
    Journal(PathBuf),
    RangeRule,
    LocalRule,
    DeletedKernelLocal { proto: u8 },
    Route,
    Sysctl { path: PathBuf, previous: String },
}

/// Applies the recipe for `config` and returns the guard that undoes it.
///
/// The tun must exist and `lo` must be up (`127.0.0.1` is the source of
/// packets into the tun). On failure everything done so far is undone.
/// Fails with [`RoutingError::Leftovers`] when rules of ours are already in
/// place or the journal exists: call [`cleanup_leftovers`] first.
pub fn setup(config: &RoutingConfig) -> Result<RoutingGuard, RoutingError> {
    config.validate()?;
    if !Path::new("/proc/sys/net/ipv4/conf")
        .join(&config.tun)
        .exists()
    {
        return Err(RoutingError::NoInterface(config.tun.clone()));
    }
    let rules = list_rules()?;
    let ours: Vec<&Rule> = rules
        .iter()
        .filter(|r| r.proto == Some(RULE_PROTOCOL))
        .collect();
    if let Some(r) = ours.first() {
        return Err(RoutingError::Leftovers {
            what: format!("rule `{}`", r.text),
        });
    }
    if let Some(path) = &config.journal
        && path.exists()
    {
        return Err(RoutingError::Leftovers {
            what: format!("journal {}", path.display()),
        });
    }
    let kernel_local = rules.iter().find(|r| r.is_kernel_local());

    let mut guard = RoutingGuard {
        config: config.clone(),
        hosts: BTreeSet::new(),
        steps: Vec::new(),
        undone: false,
    };
    // Any error below drops `guard`, which undoes the steps already taken.
    let sysctls = sysctl_paths(&config.tun);
    if let Some(path) = &config.journal {
        let mut entries = Vec::new();
        for (p, _) in &sysctls {
            entries.push((p.clone(), read_sysctl(p)?));
        }
        write_journal(path, kernel_local.map(|r| r.proto.unwrap_or(0)), &entries)?;
        guard.steps.push(Step::Journal(path.clone()));
    }
    ip(&range_rule_args("add", config))?;
    guard.steps.push(Step::RangeRule);
    for &host in &config.hosts {
        guard.add_host(host)?;
    }
    ip(&local_rule_args(
        "add",
        config.prefs.local,
        Some(RULE_PROTOCOL),
    ))?;
    guard.steps.push(Step::LocalRule);
    if let Some(rule) = kernel_local {
        let proto = rule.proto.unwrap_or(0);
        ip(&local_rule_args("del", 0, rule.proto))?;
        guard.steps.push(Step::DeletedKernelLocal { proto });
    }
    ip(&route_args("add", config))?;
    guard.steps.push(Step::Route);
    for (path, value) in sysctls {
        let previous = read_sysctl(&path)?;
        write_sysctl(&path, value)?;
        guard.steps.push(Step::Sysctl { path, previous });
    }
    tracing::info!(
        tun = %config.tun,
        range = %config.range,
        hosts = guard.hosts.len(),
        table = config.table,
        "routing the virtual range into the tun"
    );
    Ok(guard)
}

impl RoutingGuard {
    /// The configuration this guard was set up with.
    pub fn config(&self) -> &RoutingConfig {
        &self.config
    }

    /// The `/32`s currently routed into the tun by a rule of their own.
    pub fn hosts(&self) -> impl Iterator<Item = Ipv4Addr> + '_ {
        self.hosts.iter().copied()
    }

    /// Routes `host` into the tun as well (an HC with an IPv4-literal host
    /// was added). Returns `false` when nothing had to change: the host is
    /// in the range or already routed.
    pub fn add_host(&mut self, host: Ipv4Addr) -> Result<bool, RoutingError> {
        check_host(host)?;
        if self.undone || self.config.range.contains(host) || self.hosts.contains(&host) {
            return Ok(false);
        }
        ip(&host_rule_args("add", &self.config, host))?;
        self.hosts.insert(host);
        tracing::info!(%host, tun = %self.config.tun, "routing an IP-literal endpoint into the tun");
        Ok(true)
    }

    /// Stops routing `host` into the tun. Returns `false` when it had no
    /// rule of its own.
    pub fn remove_host(&mut self, host: Ipv4Addr) -> Result<bool, RoutingError> {
        if !self.hosts.contains(&host) {
            return Ok(false);
        }
        ip(&host_rule_args("del", &self.config, host))?;
        self.hosts.remove(&host);
        tracing::info!(%host, "no longer routing an IP-literal endpoint into the tun");
        Ok(true)
    }

    /// Makes the routed `/32`s exactly `hosts` (after a reload), adding and
    /// removing rules as needed; addresses in the range are ignored.
    pub fn set_hosts(&mut self, hosts: &[Ipv4Addr]) -> Result<(), RoutingError> {
        for &host in hosts {
            check_host(host)?;
        }
        let wanted: BTreeSet<Ipv4Addr> = hosts
            .iter()
            .copied()
            .filter(|h| !self.config.range.contains(*h))
            .collect();
        let stale: Vec<Ipv4Addr> = self.hosts.difference(&wanted).copied().collect();
        for host in stale {
            self.remove_host(host)?;
        }
        for host in wanted {
            self.add_host(host)?;
        }
        Ok(())
    }

    /// Restores what [`setup`] found: the kernel's `pref 0 lookup local`
    /// rule back first (so loopback never stops working), then our rules,
    /// route and journal removed and the sysctls set back to their previous
    /// values. Every step is attempted even when one fails. Calling it again
    /// does nothing.
    pub fn undo(&mut self) -> Result<(), RoutingError> {
        if self.undone {
            return Ok(());
        }
        self.undone = true;
        let mut failures = Vec::new();
        let mut record = |r: Result<(), RoutingError>| {
            if let Err(e) = r {
                failures.push(e);
            }
        };
        // Put loopback back before taking our `lookup local` away.
        if let Some(Step::DeletedKernelLocal { proto }) = self
            .steps
            .iter()
            .find(|s| matches!(s, Step::DeletedKernelLocal { .. }))
        {
            record(ip(&local_rule_args("add", 0, Some(*proto))).map(drop));
        }
        let hosts = std::mem::take(&mut self.hosts);
        for host in hosts {
            record(ip_absent_ok(&host_rule_args("del", &self.config, host)).map(drop));
        }
        for step in self.steps.drain(..).rev() {
            let r = match step {
                Step::Journal(path) => remove_journal(&path),
                Step::RangeRule => ip_absent_ok(&range_rule_args("del", &self.config)).map(drop),
                Step::LocalRule => ip_absent_ok(&local_rule_args(
                    "del",
                    self.config.prefs.local,
                    Some(RULE_PROTOCOL),
                ))
                .map(drop),
                Step::DeletedKernelLocal { .. } => Ok(()),
                // The route vanishes by itself when the tun goes away.
                Step::Route => ip_absent_ok(&route_args("del", &self.config)).map(drop),
                Step::Sysctl { path, previous } => restore_sysctl(&path, &previous),
            };
            record(r);
        }
        if failures.is_empty() {
            tracing::info!(tun = %self.config.tun, "routing into the tun undone");
            Ok(())
        } else {
            Err(RoutingError::Undo(failures))
        }
    }
}

impl Drop for RoutingGuard {
    fn drop(&mut self) {
        if let Err(e) = self.undo() {
            tracing::error!(error = %e, "could not undo the routing into the tun");
        }
    }
}

/// What [`cleanup_leftovers`] found and repaired; all zero and `false` when
/// the previous appliance exited cleanly.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Leftovers {
    /// Rules of ours removed.
    pub rules_removed: usize,
    /// Whether routes of ours were flushed from the table (`false` also when
    /// the table held none or does not exist).
    pub routes_flushed: bool,
    /// Whether the `pref 0 lookup local` rule had to be put back.
    pub local_rule_restored: bool,
    /// Sysctls set back from the journal.
    pub sysctls_restored: usize,
}

impl Leftovers {
    /// Whether anything was repaired.
    pub fn any(&self) -> bool {
        *self != Self::default()
    }
}

/// Removes what a killed appliance left behind; call it at start, before
/// [`setup`]. Idempotent, and it touches only what is ours:
///
/// - rules at `prefs.to_table` looking up `table` and rules at `prefs.local`
///   looking up `local`, in both cases only those marked [`RULE_PROTOCOL`];
/// - routes in `table` marked [`RULE_PROTOCOL`];
/// - the sysctls noted in `journal`, set back to the values noted there
///   (those of a tun that no longer exists are skipped), then the journal
///   itself.
///
/// It puts `pref 0 lookup local` back if it is missing and either the
/// journal says it was there or no `lookup local` rule is left at all; a
/// namespace where someone else moved the local table elsewhere keeps that.
pub fn cleanup_leftovers(
    table: u32,
    prefs: RulePrefs,
    journal: Option<&Path>,
) -> Result<Leftovers, RoutingError> {
    let mut found = Leftovers::default();
    let journal = match journal {
        Some(path) => read_journal(path)?.map(|j| (path, j)),
        None => None,
    };

    // Loopback first: with our pref-200 rule gone and pref 0 missing, 127/8
    // would stop being local.
    let rules = list_rules()?;
    let kernel_local_present = rules.iter().any(Rule::is_kernel_local);
    let foreign_local = rules.iter().any(|r| {
        r.table == Some(TABLE_LOCAL) && r.proto != Some(RULE_PROTOCOL) && !r.is_kernel_local()
    });
    let journal_says_present = journal.as_ref().map(|(_, j)| j.kernel_local);
    let restore_proto = match journal_says_present {
        Some(Some(proto)) => Some(proto),
        Some(None) => None,
        None if !foreign_local => Some(RTPROT_KERNEL),
        None => None,
    };
    if !kernel_local_present && let Some(proto) = restore_proto {
        ip(&local_rule_args("add", 0, Some(proto)))?;
        found.local_rule_restored = true;
    }

    let to_table = strings(&[
        &"rule",
        &"del",
        &"pref",
        &prefs.to_table,
        &"lookup",
        &table,
        &"protocol",
        &RULE_PROTOCOL,
    ]);
    found.rules_removed += delete_all(&to_table)?;
    found.rules_removed += delete_all(&local_rule_args("del", prefs.local, Some(RULE_PROTOCOL)))?;

    let ours_in_table =
        |verb: &str| strings(&[&"route", &verb, &"table", &table, &"proto", &RULE_PROTOCOL]);
    let routes = ip_absent_ok(&ours_in_table("show"))?;
    if routes.is_some_and(|out| !out.trim().is_empty()) {
        ip_absent_ok(&ours_in_table("flush"))?;
        found.routes_flushed = true;
    }

    if let Some((path, journal)) = journal {
        for (sysctl, value) in &journal.sysctls {
            match read_sysctl(sysctl) {
                Ok(current) if current == *value => {}
                Ok(_) => {
                    write_sysctl(sysctl, value)?;
                    found.sysctls_restored += 1;
                }
                // The tun it belonged to is gone, and its settings with it.
                Err(RoutingError::Sysctl { source, .. })
                    if source.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(e),
            }
        }
        remove_journal(path)?;
    }
    if found.any() {
        tracing::warn!(
            rules = found.rules_removed,
            routes = found.routes_flushed,
            local_rule_restored = found.local_rule_restored,
            sysctls = found.sysctls_restored,
            "removed routing left behind by an appliance that did not exit cleanly"
        );
    }
    Ok(found)
}

const RTPROT_KERNEL: u8 = 2;

/// Runs `ip args` until it reports the rule is gone; returns how many it
/// deleted.
fn delete_all(args: &[String]) -> Result<usize, RoutingError> {
    for n in 0..MAX_RULE_DELETES {
        if ip_absent_ok(args)?.is_none() {
            return Ok(n);
        }
    }
    Err(RoutingError::Command {
        command: command_line(args),
        status: "still succeeding".to_owned(),
        stderr: format!("deleted {MAX_RULE_DELETES} rules and more remain"),
    })
}

fn check_host(host: Ipv4Addr) -> Result<(), RoutingError> {
    if host.is_unspecified() || host.is_broadcast() || host.is_multicast() || host == SOURCE {
        return Err(RoutingError::InvalidHost(host));
    }
    Ok(())
}

fn valid_ifname(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 15
        && !matches!(name, "." | ".." | "all" | "default")
        && !name
            .chars()
            .any(|c| c == '/' || c == ':' || c.is_whitespace() || c.is_control())
}

fn strings(args: &[&dyn fmt::Display]) -> Vec<String> {
    args.iter().map(|a| a.to_string()).collect()
}

/// `ip rule VERB` for one of our "to DESTINATION lookup TABLE" rules.
fn to_table_rule_args(verb: &str, c: &RoutingConfig, to: &Ipv4Range) -> Vec<String> {
    strings(&[
        &"rule",
        &verb,
        &"pref",
        &c.prefs.to_table,
        &"iif",
        &"lo",
        &"to",
        to,
        &"lookup",
        &c.table,
        &"protocol",
        &RULE_PROTOCOL,
    ])
}

fn range_rule_args(verb: &str, c: &RoutingConfig) -> Vec<String> {
    to_table_rule_args(verb, c, &c.range.to_ipv4_range())
}

fn host_rule_args(verb: &str, c: &RoutingConfig, host: Ipv4Addr) -> Vec<String> {
    to_table_rule_args(verb, c, &Ipv4Range::host(host))
}

fn local_rule_args(verb: &str, pref: u32, proto: Option<u8>) -> Vec<String> {
    let mut args = strings(&[&"rule", &verb, &"pref", &pref, &"lookup", &"local"]);
    if let Some(p) = proto {
        args.extend(strings(&[&"protocol", &p]));
    }
    args
}

fn route_args(verb: &str, c: &RoutingConfig) -> Vec<String> {
    strings(&[
        &"route",
        &verb,
        &"default",
        &"dev",
        &c.tun,
        &"table",
        &c.table,
        &"src",
        &SOURCE,
        &"proto",
        &RULE_PROTOCOL,
    ])
}

/// The sysctls the recipe needs, with their values: the tun's only, never
/// `all` or another interface (see the module docs).
fn sysctl_paths(tun: &str) -> Vec<(PathBuf, &'static str)> {
    let dir = Path::new("/proc/sys/net/ipv4/conf").join(tun);
    vec![
        (dir.join("route_localnet"), "1"),
        (dir.join("rp_filter"), "0"),
    ]
}

fn read_sysctl(path: &Path) -> Result<String, RoutingError> {
    std::fs::read_to_string(path)
        .map(|s| s.trim().to_owned())
        .map_err(|source| RoutingError::Sysctl {
            path: path.to_owned(),
            source,
        })
}

fn write_sysctl(path: &Path, value: &str) -> Result<(), RoutingError> {
    std::fs::write(path, value).map_err(|source| RoutingError::Sysctl {
        path: path.to_owned(),
        source,
    })
}

/// Sets a sysctl back, unless its interface has gone (taking it along).
fn restore_sysctl(path: &Path, value: &str) -> Result<(), RoutingError> {
    match write_sysctl(path, value) {
        Err(RoutingError::Sysctl { source, .. }) if source.kind() == io::ErrorKind::NotFound => {
            Ok(())
        }
        r => r,
    }
}

fn command_line(args: &[String]) -> String {
    let mut line = String::from("ip");
    for a in args {
        line.push(' ');
        line.push_str(a);
    }
    line
}

/// Runs `ip args` and returns its stdout.
fn ip(args: &[String]) -> Result<String, RoutingError> {
    let out = Command::new("ip")
        .args(args)
        .env("LC_ALL", "C")
        .output()
        .map_err(|source| RoutingError::Spawn {
            command: command_line(args),
            source,
        })?;
    if out.status.success() {
        tracing::debug!(command = %command_line(args), "ran");
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(RoutingError::Command {
            command: command_line(args),
            status: out.status.to_string(),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        })
    }
}

/// Like [`ip`], but `None` when it failed only because the rule, route or
/// table was not there.
fn ip_absent_ok(args: &[String]) -> Result<Option<String>, RoutingError> {
    match ip(args) {
        Ok(out) => Ok(Some(out)),
        Err(RoutingError::Command { stderr, .. })
            if stderr.contains("No such file or directory")
                || stderr.contains("No such process")
                || stderr.contains("FIB table does not exist")
                || stderr.contains("Cannot find device") =>
        {
            Ok(None)
        }
        Err(e) => Err(e),
    }
}

/// One line of `ip -N -d rule show`.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Rule {
    pref: u32,
    /// The table it looks up, if its action is a lookup.
    table: Option<u32>,
    proto: Option<u8>,
    /// Whether it has no selector (`from all` and nothing else).
    plain: bool,
    text: String,
}

impl Rule {
    /// The kernel's own first rule, `0: from all lookup local`.
    fn is_kernel_local(&self) -> bool {
        self.pref == 0 && self.table == Some(TABLE_LOCAL) && self.plain
    }

    fn parse(line: &str) -> Option<Self> {
        let (pref, rest) = line.split_once(':')?;
        let pref = pref.trim().parse().ok()?;
        let mut table = None;
        let mut proto = None;
        let mut selectors = Vec::new();
        let mut tokens = rest.split_whitespace();
        while let Some(t) = tokens.next() {
            match t {
                "lookup" => table = tokens.next().and_then(|v| v.parse().ok()),
                "proto" => proto = tokens.next().and_then(|v| v.parse().ok()),
                other => selectors.push(other),
            }
        }
        Some(Self {
            pref,
            table,
            proto,
            plain: selectors == ["from", "all"],
            text: line.trim().to_owned(),
        })
    }
}

fn list_rules() -> Result<Vec<Rule>, RoutingError> {
    let out = ip(&strings(&[&"-4", &"-N", &"-d", &"rule", &"show"]))?;
    Ok(out.lines().filter_map(Rule::parse).collect())
}

/// What the journal holds: the priority-0 `lookup local` rule found before
/// setup (its protocol, or `None` if there was none) and the sysctls'
/// previous values.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Journal {
    kernel_local: Option<u8>,
    sysctls: Vec<(PathBuf, String)>,
}

const JOURNAL_HEADER: &str =
    "# hybridlink appliance routing journal: what to restore after a crash";

fn render_journal(kernel_local: Option<u8>, sysctls: &[(PathBuf, String)]) -> String {
    let mut text = format!("{JOURNAL_HEADER}\n");
    match kernel_local {
        Some(proto) => text.push_str(&format!("kernel-local-rule {proto}\n")),
        None => text.push_str("kernel-local-rule absent\n"),
    }
    for (path, value) in sysctls {
        text.push_str(&format!("sysctl {} {value}\n", path.display()));
    }
    text
}

fn parse_journal(path: &Path, text: &str) -> Result<Journal, RoutingError> {
    let mut journal = Journal {
        kernel_local: None,
        sysctls: Vec::new(),
    };
    for (i, line) in text.lines().enumerate() {
        let bad = || RoutingError::BadJournal {
            path: path.to_owned(),
            line: i + 1,
            text: line.to_owned(),
        };
        let line_trimmed = line.trim();
        if line_trimmed.is_empty() || line_trimmed.starts_with('#') {
            continue;
        }
        let fields: Vec<&str> = line_trimmed.split_whitespace().collect();
        match fields.as_slice() {
            ["kernel-local-rule", "absent"] => journal.kernel_local = None,
            ["kernel-local-rule", proto] => {
                journal.kernel_local = Some(proto.parse().map_err(|_| bad())?);
            }
            ["sysctl", p, value]
                if p.starts_with("/proc/sys/net/ipv4/conf/") && !p.contains("..") =>
            {
                journal
                    .sysctls
                    .push((PathBuf::from(p), (*value).to_owned()));
            }
            _ => return Err(bad()),
        }
    }
    Ok(journal)
}

fn read_journal(path: &Path) -> Result<Option<Journal>, RoutingError> {
    match std::fs::read_to_string(path) {
        Ok(text) => parse_journal(path, &text).map(Some),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(RoutingError::Journal {
            path: path.to_owned(),
            source,
        }),
    }
}

/// Writes the journal atomically, so a crash never leaves half of it.
fn write_journal(
    path: &Path,
    kernel_local: Option<u8>,
    sysctls: &[(PathBuf, String)],
) -> Result<(), RoutingError> {
    AtomicFile::new(path)
        .create_dir()
        .write(render_journal(kernel_local, sysctls).as_bytes())
        .map_err(|source| RoutingError::Journal {
            path: path.to_owned(),
            source,
        })
}

fn remove_journal(path: &Path) -> Result<(), RoutingError> {
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(RoutingError::Journal {
            path: path.to_owned(),
            source: e,
        }),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_rules_from_ip_numeric_detailed_output() {
        let r = Rule::parse("0:\tfrom all lookup 255 proto 2").unwrap();
        assert!(r.is_kernel_local());
        assert_eq!(r.proto, Some(2));

        let r = Rule::parse("100:\tfrom all to 127.77.0.0/16 iif lo lookup 77 proto 104").unwrap();
        assert_eq!(
            (r.pref, r.table, r.proto, r.plain),
            (100, Some(77), Some(104), false)
        );

        let r = Rule::parse("200:\tfrom all lookup 255 proto 104").unwrap();
        assert!(r.plain && !r.is_kernel_local());

        let r = Rule::parse("0:\tfrom all to 10.0.0.0/8 lookup 255 proto 0").unwrap();
        assert!(
            !r.is_kernel_local(),
            "a rule with a selector is not the kernel's"
        );

        let r = Rule::parse("50:\tfrom all fwmark 0x1 blackhole proto 0").unwrap();
        assert_eq!(r.table, None);
        assert!(Rule::parse("garbage").is_none());
    }

    #[test]
    fn builds_the_documented_commands() {
        let mut c = RoutingConfig::new("hl0");
        c.hosts.push(Ipv4Addr::new(198, 18, 9, 9));
        assert_eq!(
            command_line(&range_rule_args("add", &c)),
            "ip rule add pref 100 iif lo to 127.77.0.0/16 lookup 77 protocol 104"
        );
        assert_eq!(
            command_line(&host_rule_args("add", &c, Ipv4Addr::new(198, 18, 9, 9))),
            "ip rule add pref 100 iif lo to 198.18.9.9/32 lookup 77 protocol 104"
        );
        assert_eq!(
            command_line(&local_rule_args("add", 200, Some(RULE_PROTOCOL))),
            "ip rule add pref 200 lookup local protocol 104"
        );
        assert_eq!(
            command_line(&route_args("add", &c)),
            "ip route add default dev hl0 table 77 src 127.0.0.1 proto 104"
        );
    }

    #[test]
    fn rejects_configurations_that_cannot_work() {
        let ok = RoutingConfig::new("hl0");
        assert!(ok.validate().is_ok());

        for name in ["", "all", "default", "a/b", "a b", "sixteen-chars-xx"] {
            let mut c = ok.clone();
            c.tun = name.to_owned();
            assert!(
                matches!(c.validate(), Err(RoutingError::InvalidConfig(_))),
                "{name:?}"
            );
        }
        let mut c = ok.clone();
        c.range = "127.0.0.0/8".parse().unwrap();
        assert!(matches!(c.validate(), Err(RoutingError::InvalidConfig(_))));
        for table in [0, 253, 254, 255] {
            let mut c = ok.clone();
            c.table = table;
            assert!(matches!(c.validate(), Err(RoutingError::InvalidConfig(_))));
        }
        for (to_table, local) in [(0, 200), (200, 100), (100, 100), (100, 32766)] {
            let mut c = ok.clone();
            c.prefs = RulePrefs { to_table, local };
            assert!(matches!(c.validate(), Err(RoutingError::InvalidConfig(_))));
        }
        for host in [
            Ipv4Addr::UNSPECIFIED,
            Ipv4Addr::BROADCAST,
            Ipv4Addr::LOCALHOST,
            Ipv4Addr::new(224, 0, 0, 1),
        ] {
            let mut c = ok.clone();
            c.hosts = vec![host];
            assert!(matches!(c.validate(), Err(RoutingError::InvalidHost(h)) if h == host));
        }
    }

    #[test]
    fn journal_round_trips_and_rejects_strange_lines() {
        let path = Path::new("/state/routing.journal");
        let sysctls = vec![
            (
                PathBuf::from("/proc/sys/net/ipv4/conf/all/route_localnet"),
                "0".to_owned(),
            ),
            (
                PathBuf::from("/proc/sys/net/ipv4/conf/hl0/rp_filter"),
                "2".to_owned(),
            ),
        ];
        for kernel_local in [Some(2), Some(0), None] {
            let text = render_journal(kernel_local, &sysctls);
            assert_eq!(
                parse_journal(path, &text).unwrap(),
                Journal {
                    kernel_local,
                    sysctls: sysctls.clone()
                }
            );
        }
        for bad in [
            "sysctl /etc/passwd 0",
            "sysctl /proc/sys/net/ipv4/conf/../../../kernel/x 1",
            "kernel-local-rule maybe",
            "something else",
        ] {
            assert!(
                matches!(
                    parse_journal(path, bad),
                    Err(RoutingError::BadJournal { line: 1, .. })
                ),
                "{bad}"
            );
        }
    }

    #[test]
    fn command_failures_name_the_command_and_its_stderr() {
        let e = RoutingError::Command {
            command: "ip rule add pref 100 to 127.77.0.0/16 lookup 77 protocol 104".to_owned(),
            status: "exit status: 2".to_owned(),
            stderr: "RTNETLINK answers: File exists".to_owned(),
        };
        let msg = e.to_string();
        assert!(msg.contains("ip rule add pref 100") && msg.contains("File exists"));
    }
}
