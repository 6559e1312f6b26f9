//! Routing into a real tun and rewriting a bind-mounted resolv.conf, each
//! test in a network and mount namespace of its own.
//!
//! Each test re-runs itself under `unshare --net --mount`: the tun, rules,
//! routes, sysctls and the bind mount over `/etc/resolv.conf` exist only
//! there and vanish with the process, whatever happens (mount propagation is
//! private, so the host never sees the mount). Needs root; as another user
//! every test prints why it skips and passes.

use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, UdpSocket};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tun_rs::AsyncDevice;

use appliance::resolv::{self, Recovery, ResolvPaths};
use appliance::routing::{self, Leftovers, RoutingConfig, RoutingError, RulePrefs};

const CHILD_ENV: &str = "APPLIANCE_ROUTING_TEST_CHILD";
const TUN: &str = "hl0";
const TABLE: u32 = routing::DEFAULT_TABLE;
const HOST: Ipv4Addr = Ipv4Addr::new(198, 18, 9, 9);

/// Kills the namespaced child if the parent test fails or panics.
struct ChildGuard(Option<Child>);

impl Drop for ChildGuard {
    fn drop(&mut self) {
        if let Some(mut child) = self.0.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Runs `body` in a fresh network and mount namespace with `lo` up.
fn in_netns(name: &str, body: impl FnOnce()) {
    if std::env::var(CHILD_ENV).as_deref() == Ok(name) {
        sh(&["ip", "link", "set", "lo", "up"]);
        body();
        return;
    }
    if !lab::preconditions::root_or_skip(name) {
        return;
    }
    let exe = std::env::current_exe().unwrap();
    let child = Command::new("unshare")
        .args(["--net", "--mount", "--propagation", "private", "--"])
        .arg(exe)
        .args([name, "--exact", "--nocapture", "--test-threads=1"])
        .env(CHILD_ENV, name)
        .stdin(Stdio::null())
        .spawn()
        .expect("run unshare (util-linux)");
    let mut guard = ChildGuard(Some(child));
    let deadline = Instant::now() + Duration::from_secs(120);
    let status = loop {
        if let Some(status) = guard.0.as_mut().unwrap().try_wait().unwrap() {
            guard.0 = None;
            break status;
        }
        assert!(Instant::now() < deadline, "{name} took more than 120 s");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(
        status.success(),
        "{name} failed inside its namespace: {status}"
    );
}

/// Runs a command that must succeed and returns its stdout.
fn sh(args: &[&str]) -> String {
    let out = Command::new(args[0]).args(&args[1..]).output().unwrap();
    assert!(
        out.status.success(),
        "{args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// Stdout of a command that may fail (e.g. showing a table that does not
/// exist yet), so before/after states compare as text.
fn stdout(args: &[&str]) -> String {
    let out = Command::new(args[0]).args(&args[1..]).output().unwrap();
    String::from_utf8(out.stdout).unwrap()
}

fn sysctl_path(dev: &str, name: &str) -> String {
    format!("/proc/sys/net/ipv4/conf/{dev}/{name}")
}

fn set_sysctl(dev: &str, name: &str, value: &str) {
    std::fs::write(sysctl_path(dev, name), value).unwrap();
}

/// Everything routing touches, as text: rules, our table, every table,
/// and the four sysctls.
fn snapshot(tun: &str) -> String {
    let mut s = String::new();
    s += &sh(&["ip", "-d", "rule", "show"]);
    s += "--- table\n";
    s += &stdout(&["ip", "-d", "route", "show", "table", &TABLE.to_string()]);
    s += "--- all\n";
    s += &sh(&["ip", "-d", "route", "show", "table", "all"]);
    for dev in ["all", tun] {
        for name in ["route_localnet", "rp_filter"] {
            let path = sysctl_path(dev, name);
            let value = std::fs::read_to_string(&path).unwrap_or_else(|_| "absent\n".into());
            s += &format!("{path} = {value}");
        }
    }
    s
}

fn route_get(addr: &str) -> String {
    route_get_args(&["route", "get", addr])
}

/// What `ip ARGS` prints on stdout and stderr (a refused lookup is an
/// answer too).
fn route_get_args(args: &[&str]) -> String {
    let out = Command::new("ip").args(args).output().unwrap();
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn ip_rules() -> String {
    sh(&["ip", "-d", "rule", "show"])
}

/// Whether `ip -d rule` output holds the kernel's `0: from all lookup local`.
fn has_kernel_local(rules: &str) -> bool {
    rules
        .lines()
        .any(|l| l == "0:\tfrom all lookup local proto kernel")
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

/// Creates the tun the way the appliance does, and brings it up; call it
/// inside the runtime that will read it.
fn create_tun(name: &str) -> AsyncDevice {
    let tun = netstack::create_tun(name, 1500).expect("create tun");
    sh(&["ip", "link", "set", name, "up"]);
    tun
}

/// One's-complement sum of 16-bit words, as IPv4 and UDP checksums use.
fn checksum(chunks: &[&[u8]]) -> u16 {
    let mut sum = 0u32;
    for chunk in chunks {
        for pair in chunk.chunks(2) {
            let word = u16::from_be_bytes([pair[0], *pair.get(1).unwrap_or(&0)]);
            sum += u32::from(word);
        }
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// An IPv4/UDP packet from `src` to `dst` carrying `payload`.
fn udp_packet(src: SocketAddrV4, dst: SocketAddrV4, payload: &[u8]) -> Vec<u8> {
    let udp_len = 8 + payload.len() as u16;
    let total = 20 + udp_len;
    let mut ip = vec![0x45, 0, 0, 0, 0, 0, 0x40, 0, 64, 17, 0, 0];
    ip[2..4].copy_from_slice(&total.to_be_bytes());
    ip.extend_from_slice(&src.ip().octets());
    ip.extend_from_slice(&dst.ip().octets());
    let sum = checksum(&[&ip]);
    ip[10..12].copy_from_slice(&sum.to_be_bytes());

    let mut udp = Vec::new();
    udp.extend_from_slice(&src.port().to_be_bytes());
    udp.extend_from_slice(&dst.port().to_be_bytes());
    udp.extend_from_slice(&udp_len.to_be_bytes());
    udp.extend_from_slice(&[0, 0]);
    udp.extend_from_slice(payload);
    let pseudo = [
        &src.ip().octets()[..],
        &dst.ip().octets()[..],
        &[0, 17],
        &udp_len.to_be_bytes(),
    ]
    .concat();
    let sum = match checksum(&[&pseudo, &udp]) {
        0 => 0xffff,
        s => s,
    };
    udp[6..8].copy_from_slice(&sum.to_be_bytes());
    ip.extend_from_slice(&udp);
    ip
}

/// Reads the tun until an IPv4/UDP packet to `dst` arrives; returns its
/// source and payload.
fn read_udp_to(
    rt: &tokio::runtime::Runtime,
    tun: &AsyncDevice,
    dst: SocketAddrV4,
) -> (SocketAddrV4, Vec<u8>) {
    rt.block_on(async {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        let mut buf = vec![0u8; 65536];
        loop {
            let n = tokio::time::timeout_at(deadline, tun.recv(&mut buf))
                .await
                .unwrap_or_else(|_| panic!("no packet to {dst} on the tun within 5 s"))
                .unwrap();
            let p = &buf[..n];
            if n < 28 || p[0] >> 4 != 4 || p[9] != 17 {
                continue; // IPv6 chatter, or not UDP
            }
            let ihl = usize::from(p[0] & 0x0f) * 4;
            let ip = |at: usize| Ipv4Addr::new(p[at], p[at + 1], p[at + 2], p[at + 3]);
            let port = |at: usize| u16::from_be_bytes([p[ihl + at], p[ihl + at + 1]]);
            let (src, to) = (
                SocketAddrV4::new(ip(12), port(0)),
                SocketAddrV4::new(ip(16), port(2)),
            );
            if to == dst {
                return (src, p[ihl + 8..].to_vec());
            }
        }
    })
}

/// Sends a datagram from an ordinary socket to `dst`, checks it comes out of
/// the tun from 127.0.0.1, then writes a reply into the tun and checks the
/// socket receives it.
fn round_trip(rt: &tokio::runtime::Runtime, tun: &AsyncDevice, dst: SocketAddrV4) {
    let sock = UdpSocket::bind("0.0.0.0:0").unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let payload = format!("to {dst}");
    sock.send_to(payload.as_bytes(), dst).unwrap();
    let (src, got) = read_udp_to(rt, tun, dst);
    assert_eq!(got, payload.as_bytes());
    assert_eq!(
        *src.ip(),
        Ipv4Addr::LOCALHOST,
        "source of packets into the tun"
    );
    assert_eq!(src.port(), sock.local_addr().unwrap().port());

    let reply = udp_packet(dst, src, b"reply");
    rt.block_on(tun.send(&reply)).unwrap();
    let mut buf = [0u8; 64];
    let (n, from) = sock
        .recv_from(&mut buf)
        .unwrap_or_else(|e| panic!("reply from {dst} written into the tun never arrived: {e}"));
    assert_eq!(&buf[..n], b"reply");
    assert_eq!(from, SocketAddr::V4(dst));
}

fn journal_in(dir: &tempfile::TempDir) -> std::path::PathBuf {
    dir.path().join("state").join("routing.journal")
}

#[test]
fn range_and_literal_hosts_reach_the_tun_and_undo_restores_everything() {
    in_netns(
        "range_and_literal_hosts_reach_the_tun_and_undo_restores_everything",
        || {
            let rt = rt();
            let _in_rt = rt.enter();
            let tun = create_tun(TUN);
            // Values other than the ones we set, so restoring them shows;
            // `all` strict, as hardened hosts have it, which the recipe
            // must neither need to change nor trip over.
            set_sysctl("all", "rp_filter", "1");
            set_sysctl(TUN, "rp_filter", "1");
            // A neighbour's link, with forwarding on as on container hosts.
            sh(&[
                "ip", "link", "add", "hlnb0", "type", "veth", "peer", "name", "hlnb1",
            ]);
            sh(&["ip", "addr", "add", "198.18.50.2/24", "dev", "hlnb0"]);
            sh(&["ip", "link", "set", "hlnb0", "up"]);
            sh(&["ip", "link", "set", "hlnb1", "up"]);
            sh(&["sysctl", "-q", "-w", "net.ipv4.ip_forward=1"]);
            let before = snapshot(TUN);
            assert!(route_get("127.77.0.5").contains("dev lo"));

            let state = tempfile::tempdir().unwrap();
            let mut config = RoutingConfig::new(TUN);
            config.hosts = vec![HOST, Ipv4Addr::new(127, 77, 1, 1)];
            config.journal = Some(journal_in(&state));
            let mut guard = routing::setup(&config).unwrap();
            assert!(config.journal.as_ref().unwrap().exists());
            assert_eq!(
                guard.hosts().collect::<Vec<_>>(),
                vec![HOST],
                "a host in the range needs no rule"
            );

            let rules = ip_rules();
            assert!(!has_kernel_local(&rules), "{rules}");
            assert!(
                rules.contains("200:\tfrom all lookup local proto 104"),
                "{rules}"
            );
            assert!(
                rules.contains("100:\tfrom all to 127.77.0.0/16 iif lo lookup 77 proto 104"),
                "{rules}"
            );
            assert!(
                rules.contains("100:\tfrom all to 198.18.9.9 iif lo lookup 77 proto 104"),
                "{rules}"
            );
            let read = |dev, n| std::fs::read_to_string(sysctl_path(dev, n)).unwrap();
            assert_eq!(read(TUN, "route_localnet"), "1\n");
            assert_eq!(read(TUN, "rp_filter"), "0\n");
            // Nothing but the tun changes: loopback stays a martian on
            // every other interface.
            assert_eq!(read("all", "route_localnet"), "0\n");
            assert_eq!(read("all", "rp_filter"), "1\n");
            assert_eq!(read("hlnb0", "route_localnet"), "0\n");

            assert!(route_get("127.77.0.5").contains("dev hl0"));
            assert!(route_get("198.18.9.9").contains("dev hl0"));
            // What a neighbour sends is never routed into the tun: loopback
            // destinations are martians on its link, and the rules into
            // the tun match only packets generated here.
            let forwarded = |dst: &str| {
                route_get_args(&["route", "get", dst, "from", "198.18.50.1", "iif", "hlnb0"])
            };
            for dst in ["127.0.0.1", "127.77.0.5", "198.18.9.9"] {
                let got = forwarded(dst);
                assert!(!got.contains("dev hl0"), "{dst} from a neighbour: {got}");
            }
            assert!(forwarded("127.0.0.1").contains("Invalid argument"));
            // The rest of loopback stays local.
            assert!(route_get("127.0.0.1").contains("dev lo"));
            assert!(route_get("127.78.0.1").contains("dev lo"));
            let a = UdpSocket::bind("127.0.0.1:0").unwrap();
            let b = UdpSocket::bind("127.0.0.1:0").unwrap();
            b.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            a.send_to(b"lo", b.local_addr().unwrap()).unwrap();
            assert_eq!(b.recv(&mut [0u8; 8]).unwrap(), 2);

            round_trip(&rt, &tun, "127.77.0.5:9".parse().unwrap());
            round_trip(&rt, &tun, SocketAddrV4::new(HOST, 443));

            // A reload adds and removes an IP-literal endpoint.
            let extra = Ipv4Addr::new(198, 18, 9, 10);
            assert!(!route_get("198.18.9.10").contains("dev hl0"));
            assert!(guard.add_host(extra).unwrap());
            assert!(!guard.add_host(extra).unwrap(), "already routed");
            round_trip(&rt, &tun, SocketAddrV4::new(extra, 80));
            guard.set_hosts(&[extra]).unwrap();
            assert_eq!(guard.hosts().collect::<Vec<_>>(), vec![extra]);
            assert!(!route_get("198.18.9.9").contains("dev hl0"));
            assert!(guard.remove_host(extra).unwrap());
            assert!(!guard.remove_host(extra).unwrap());
            assert!(!route_get("198.18.9.10").contains("dev hl0"));
            assert!(matches!(
                guard.add_host(Ipv4Addr::LOCALHOST),
                Err(RoutingError::InvalidHost(_))
            ));
            guard.add_host(HOST).unwrap();

            guard.undo().unwrap();
            guard.undo().unwrap();
            assert_eq!(snapshot(TUN), before);
            assert!(!config.journal.as_ref().unwrap().exists());
            assert!(route_get("127.77.0.5").contains("dev lo"));
            drop(guard);
            assert_eq!(snapshot(TUN), before, "drop after undo changes nothing");

            // Drop alone undoes too.
            let guard = routing::setup(&config).unwrap();
            assert_ne!(snapshot(TUN), before);
            drop(guard);
            assert_eq!(snapshot(TUN), before);
        },
    );
}

#[test]
fn setup_that_fails_midway_leaves_nothing_behind() {
    in_netns("setup_that_fails_midway_leaves_nothing_behind", || {
        let rules = ip_rules();
        let err = routing::setup(&RoutingConfig::new("nosuch0")).unwrap_err();
        assert!(matches!(err, RoutingError::NoInterface(_)), "{err}");
        assert_eq!(ip_rules(), rules);

        // Someone else's default route in table 77: ours fails after the
        // rules went in and the kernel's local rule went out; all of that
        // must be back as it was.
        let rt = rt();
        let _in_rt = rt.enter();
        let _tun = create_tun(TUN);
        sh(&["ip", "route", "add", "default", "dev", "lo", "table", "77"]);
        let before = snapshot(TUN);
        let state = tempfile::tempdir().unwrap();
        let mut config = RoutingConfig::new(TUN);
        config.hosts = vec![HOST];
        config.journal = Some(journal_in(&state));
        let err = routing::setup(&config).unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.contains("ip route add default dev hl0 table 77 src 127.0.0.1")
                && msg.contains("File exists"),
            "{msg}"
        );
        assert_eq!(snapshot(TUN), before);
        assert!(!config.journal.as_ref().unwrap().exists());
    });
}

#[test]
fn leftovers_of_a_killed_appliance_are_removed_and_nothing_else() {
    in_netns(
        "leftovers_of_a_killed_appliance_are_removed_and_nothing_else",
        || {
            // Someone else's rules and route, at our priorities and in our table.
            sh(&[
                "ip",
                "rule",
                "add",
                "pref",
                "100",
                "to",
                "198.18.200.0/24",
                "lookup",
                "77",
            ]);
            sh(&[
                "ip", "rule", "add", "pref", "200", "lookup", "local", "iif", "lo",
            ]);
            sh(&["ip", "rule", "add", "pref", "300", "lookup", "78"]);
            sh(&[
                "ip",
                "route",
                "add",
                "198.18.200.0/24",
                "dev",
                "lo",
                "table",
                "77",
            ]);
            // A persistent tun outlives the appliance, and its route with it.
            sh(&["ip", "tuntap", "add", "dev", TUN, "mode", "tun"]);
            sh(&["ip", "link", "set", TUN, "up"]);
            set_sysctl("all", "rp_filter", "2");
            set_sysctl(TUN, "rp_filter", "1");
            let before = snapshot(TUN);
            let before_rules = ip_rules();

            let state = tempfile::tempdir().unwrap();
            let journal = journal_in(&state);
            let mut config = RoutingConfig::new(TUN);
            config.hosts = vec![HOST];
            config.journal = Some(journal.clone());
            std::mem::forget(routing::setup(&config).unwrap());
            assert_ne!(ip_rules(), before_rules);
            assert!(!has_kernel_local(&ip_rules()));

            // The next start refuses to pile up on the leftovers...
            let err = routing::setup(&config).unwrap_err();
            assert!(matches!(err, RoutingError::Leftovers { .. }), "{err}");

            // ...until they are cleaned.
            let found =
                routing::cleanup_leftovers(TABLE, RulePrefs::default(), Some(&journal)).unwrap();
            assert_eq!(
                found,
                Leftovers {
                    rules_removed: 3,
                    routes_flushed: true,
                    local_rule_restored: true,
                    sysctls_restored: 2,
                }
            );
            assert_eq!(ip_rules(), before_rules);
            assert_eq!(snapshot(TUN), before);
            assert!(!journal.exists());

            let again =
                routing::cleanup_leftovers(TABLE, RulePrefs::default(), Some(&journal)).unwrap();
            assert_eq!(again, Leftovers::default(), "cleanup is idempotent");
            assert_eq!(snapshot(TUN), before);

            let guard = routing::setup(&config).unwrap();
            drop(guard);
            assert_eq!(snapshot(TUN), before);
        },
    );
}

#[test]
fn a_crash_that_took_the_tun_along_is_cleaned_without_a_journal() {
    in_netns(
        "a_crash_that_took_the_tun_along_is_cleaned_without_a_journal",
        || {
            let before_rules = ip_rules();
            let rt = rt();
            let _in_rt = rt.enter();
            let tun = create_tun(TUN);
            let mut config = RoutingConfig::new(TUN);
            config.hosts = vec![HOST];
            config.table = 1077;
            config.prefs = RulePrefs {
                to_table: 1000,
                local: 1001,
            };
            std::mem::forget(routing::setup(&config).unwrap());
            // The process dies: its tun, and the route through it, go too.
            drop(tun);
            rt.block_on(tokio::time::sleep(Duration::from_millis(100)));
            assert!(stdout(&["ip", "route", "show", "table", "1077"]).is_empty());

            let found = routing::cleanup_leftovers(
                1077,
                RulePrefs {
                    to_table: 1000,
                    local: 1001,
                },
                None,
            )
            .unwrap();
            assert_eq!(
                found,
                Leftovers {
                    rules_removed: 3,
                    routes_flushed: false,
                    local_rule_restored: true,
                    sysctls_restored: 0,
                }
            );
            assert_eq!(ip_rules(), before_rules);
            assert!(route_get("127.77.0.5").contains("dev lo"));
            let again = routing::cleanup_leftovers(
                1077,
                RulePrefs {
                    to_table: 1000,
                    local: 1001,
                },
                None,
            )
            .unwrap();
            assert!(!again.any());
            assert_eq!(ip_rules(), before_rules);
        },
    );
}

#[test]
fn resolv_conf_on_a_bind_mount_is_rewritten_in_place_restored_and_recovered() {
    in_netns(
        "resolv_conf_on_a_bind_mount_is_rewritten_in_place_restored_and_recovered",
        || {
            let original = "nameserver 198.18.0.53\nsearch corp.example\noptions ndots:2\n";
            let dir = tempfile::tempdir().unwrap();
            // What `ip netns exec` sets up: /etc/netns/NAME/resolv.conf
            // bind-mounted over /etc/resolv.conf.
            let netns_file = dir.path().join("netns-resolv.conf");
            std::fs::write(&netns_file, original).unwrap();
            sh(&[
                "mount",
                "--bind",
                netns_file.to_str().unwrap(),
                resolv::RESOLV_CONF,
            ]);
            assert_eq!(
                std::fs::read_to_string(resolv::RESOLV_CONF).unwrap(),
                original
            );
            assert_rename_onto_mount_point_is_ebusy(dir.path());

            let paths = ResolvPaths::new(dir.path().join("state"));
            let dns = "127.77.0.1".parse().unwrap();
            let guard = resolv::point_at(&paths, dns).unwrap();
            assert_eq!(
                guard.original().nameservers,
                vec!["198.18.0.53".parse::<std::net::IpAddr>().unwrap()]
            );
            assert_eq!(guard.original().search, vec!["corp.example"]);
            let seen = std::fs::read_to_string(resolv::RESOLV_CONF).unwrap();
            assert_eq!(
                std::fs::read_to_string(&netns_file).unwrap(),
                seen,
                "written through the mount"
            );
            let lines: Vec<&str> = seen.lines().filter(|l| !l.starts_with('#')).collect();
            assert_eq!(
                lines,
                [
                    "nameserver 127.77.0.1",
                    "search corp.example",
                    "options ndots:2"
                ]
            );
            assert_eq!(std::fs::read_to_string(&paths.backup).unwrap(), original);
            drop(guard);
            assert_eq!(
                std::fs::read_to_string(resolv::RESOLV_CONF).unwrap(),
                original
            );
            assert!(!paths.backup.exists());

            // A killed appliance leaves its rewrite and the backup; the next
            // start restores the original before reading it.
            std::mem::forget(resolv::point_at(&paths, dns).unwrap());
            assert!(paths.backup.exists());
            let guard = resolv::point_at(&paths, "127.77.0.2".parse().unwrap()).unwrap();
            assert_eq!(guard.original_text(), original);
            drop(guard);
            assert_eq!(std::fs::read_to_string(&netns_file).unwrap(), original);

            std::mem::forget(resolv::point_at(&paths, dns).unwrap());
            assert_eq!(resolv::recover(&paths).unwrap(), Recovery::Restored);
            assert_eq!(
                std::fs::read_to_string(resolv::RESOLV_CONF).unwrap(),
                original
            );
            assert_eq!(resolv::recover(&paths).unwrap(), Recovery::NothingToDo);
        },
    );
}

/// Shows the test is meaningful: replacing a bind-mounted file by rename, as
/// most "atomic write" helpers do, fails with EBUSY.
fn assert_rename_onto_mount_point_is_ebusy(scratch: &Path) {
    let dir = scratch.join("etc");
    std::fs::create_dir_all(&dir).unwrap();
    let target = dir.join("resolv.conf");
    std::fs::write(&target, "").unwrap();
    let source = scratch.join("mounted");
    std::fs::write(&source, "").unwrap();
    sh(&[
        "mount",
        "--bind",
        source.to_str().unwrap(),
        target.to_str().unwrap(),
    ]);
    let replacement = dir.join("resolv.conf.new");
    std::fs::write(&replacement, "nameserver 127.0.0.1\n").unwrap();
    let err = std::fs::rename(&replacement, &target).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(16), "EBUSY: {err}");
    sh(&["umount", target.to_str().unwrap()]);
}
