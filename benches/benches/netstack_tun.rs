//! netstack through a real tun against kernel loopback TCP, side by side.
//!
//! Needs root: the benchmark re-runs itself inside a fresh network namespace
//! (`unshare --net`), creates a tun with MTU 65535 routing 198.18.0.0/16 into
//! a netstack, and measures in the same run:
//!
//! - one kernel TCP flow over loopback (client thread → server thread);
//! - one kernel TCP flow into a sink on an accepted netstack flow;
//! - one accepted netstack flow as a source into a kernel TCP client;
//! - resident memory per idle accepted flow at 1,000 and 10,000 flows.
//!
//! ```text
//! cargo bench -p hybridlink-benches --bench netstack_tun
//! NETSTACK_BENCH_SECS=5 NETSTACK_BENCH_FLOWS=1000,10000 cargo bench ...
//! ```
//!
//! Targets (issue 3): netstack ≥ 0.7× loopback for one flow, ≤ 64 KiB per
//! idle flow.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::Command;
use std::time::{Duration, Instant};

use netstack::{Netstack, StackConfig, create_tun};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const CHILD_ENV: &str = "NETSTACK_BENCH_CHILD";
const TUN: &str = "hlb0";
const CHUNK: usize = 256 * 1024;

fn main() {
    if std::env::var_os(CHILD_ENV).is_some() {
        run();
        return;
    }
    if !lab::preconditions::root_or_skip("netstack_tun") {
        return;
    }
    let exe = std::env::current_exe().expect("own path");
    let mut cmd = Command::new("sh");
    // smoltcp reserves each flow's TCP buffers up front; they stay untouched
    // (not resident) only if glibc serves them with mmap. glibc raises its
    // mmap threshold after freeing a large block, after which such buffers
    // come from the heap, zeroed page by page. A fixed threshold (what the
    // appliance should run with) avoids that; set
    // NETSTACK_BENCH_GLIBC_DEFAULT=1 to measure glibc's default behaviour.
    if std::env::var_os("NETSTACK_BENCH_GLIBC_DEFAULT").is_none() {
        cmd.env("MALLOC_MMAP_THRESHOLD_", "131072");
    }
    // 10,000 flows need more descriptors than the usual soft limit of 1,024.
    let status = cmd
        .arg("-c")
        .arg("ulimit -n \"$(ulimit -Hn)\"; exec unshare --net -- \"$0\"")
        .arg(exe)
        .env(CHILD_ENV, "1")
        .status()
        .expect("run sh/unshare");
    assert!(status.success(), "benchmark failed: {status}");
}

fn sh(args: &[&str]) {
    let status = Command::new(args[0])
        .args(&args[1..])
        .status()
        .expect(args[0]);
    assert!(status.success(), "{args:?} failed");
}

fn secs() -> f64 {
    std::env::var("NETSTACK_BENCH_SECS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3.0)
}

fn gbit(bytes: u64, took: Duration) -> f64 {
    bytes as f64 * 8.0 / took.as_secs_f64() / 1e9
}

/// Writes for `secs` seconds into `w`, returns bytes written and time.
fn blast(mut w: impl Write, secs: f64) -> (u64, Duration) {
    let chunk = vec![0x5au8; CHUNK];
    let start = Instant::now();
    let limit = Duration::from_secs_f64(secs);
    let mut sent = 0u64;
    while start.elapsed() < limit {
        w.write_all(&chunk).expect("write");
        sent += CHUNK as u64;
    }
    (sent, start.elapsed())
}

/// Reads until EOF, returns bytes read and time from the first byte.
fn drain(mut r: impl Read) -> (u64, Duration) {
    let mut buf = vec![0u8; CHUNK];
    let mut got = 0u64;
    let mut start = None;
    loop {
        let n = r.read(&mut buf).expect("read");
        if n == 0 {
            break;
        }
        start.get_or_insert_with(Instant::now);
        got += n as u64;
    }
    (got, start.map(|s| s.elapsed()).unwrap_or_default())
}

fn kernel_loopback(secs: f64) -> f64 {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let server = std::thread::spawn(move || drain(listener.accept().unwrap().0));
    let client = TcpStream::connect(addr).unwrap();
    client.set_nodelay(true).unwrap();
    blast(&client, secs);
    client.shutdown(std::net::Shutdown::Write).unwrap();
    let (bytes, took) = server.join().unwrap();
    gbit(bytes, took)
}

fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .unwrap()
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

fn run() {
    let secs = secs();
    let flows: Vec<usize> = std::env::var("NETSTACK_BENCH_FLOWS")
        .unwrap_or_else(|_| "1000,10000".into())
        .split(',')
        .filter_map(|v| v.trim().parse().ok())
        .collect();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async move {
        let tun = create_tun(TUN, 65535).expect("tun");
        sh(&["ip", "link", "set", "lo", "up"]);
        sh(&["ip", "link", "set", TUN, "up"]);
        sh(&["ip", "addr", "add", "198.19.0.1/32", "dev", TUN]);
        sh(&["ip", "route", "add", "198.18.0.0/16", "dev", TUN, "src", "198.19.0.1"]);
        let mut config = StackConfig::new(vec!["198.18.0.0/16".parse().unwrap()]);
        config.max_flows = 20_000;
        let mut stack = Netstack::spawn(tun, config).expect("stack");
        let handle = stack.handle();
        let (idle_tx, mut idle_rx) = tokio::sync::mpsc::unbounded_channel();
        tokio::spawn(async move {
            while let Some(flow) = stack.next_flow().await {
                let idle_tx = idle_tx.clone();
                tokio::spawn(async move {
                    let port = flow.dst().port();
                    let Ok(mut s) = flow.accept().await else { return };
                    match port {
                        // Sink.
                        9 => {
                            let mut buf = vec![0u8; CHUNK];
                            while s.read(&mut buf).await.map(|n| n > 0).unwrap_or(false) {}
                        }
                        // Source: until the client closes.
                        19 => {
                            let chunk = vec![0xa5u8; CHUNK];
                            while s.write_all(&chunk).await.is_ok() {}
                        }
                        // Idle: one byte each way, then held.
                        _ => {
                            let mut b = [0u8; 1];
                            if s.read_exact(&mut b).await.is_ok() && s.write_all(&b).await.is_ok() {
                                let _ = idle_tx.send(s);
                            }
                        }
                    }
                });
            }
        });

        let loopback = tokio::task::spawn_blocking(move || kernel_loopback(secs)).await.unwrap();

        let into_sink = tokio::task::spawn_blocking(move || {
            let c = TcpStream::connect("198.18.0.1:9").unwrap();
            c.set_nodelay(true).unwrap();
            let r = blast(&c, secs);
            c.shutdown(std::net::Shutdown::Write).unwrap();
            r
        })
        .await
        .unwrap();
        let into_sink = gbit(into_sink.0, into_sink.1);

        let from_source = tokio::task::spawn_blocking(move || {
            let mut c = TcpStream::connect("198.18.0.1:19").unwrap();
            let mut buf = vec![0u8; CHUNK];
            let start = Instant::now();
            let mut got = 0u64;
            while start.elapsed() < Duration::from_secs_f64(secs) {
                got += c.read(&mut buf).unwrap() as u64;
            }
            (got, start.elapsed())
        })
        .await
        .unwrap();
        let from_source = gbit(from_source.0, from_source.1);

        println!(
            "netstack_tun (MTU 65535, one flow, {secs} s each; MALLOC_MMAP_THRESHOLD_={})",
            std::env::var("MALLOC_MMAP_THRESHOLD_").unwrap_or_else(|_| "glibc default".into())
        );
        println!("  kernel loopback TCP      {loopback:6.2} Gbit/s");
        println!(
            "  kernel -> netstack sink  {into_sink:6.2} Gbit/s  ratio {:.2}",
            into_sink / loopback
        );
        println!(
            "  netstack source -> kernel {from_source:5.2} Gbit/s  ratio {:.2}",
            from_source / loopback
        );

        // Let the streams above be reaped before counting memory.
        tokio::time::sleep(Duration::from_millis(500)).await;
        let mut held_clients = Vec::new();
        let mut held_flows = Vec::new();
        let mut opened = 0usize;
        for &target in &flows {
            let before = rss_kib();
            let n = target - opened;
            for i in opened..target {
                let dst: SocketAddr = format!("198.18.{}.{}:{}", 100 + i / 250, 1 + i % 250, 7000)
                    .parse()
                    .unwrap();
                let mut c = tokio::net::TcpStream::connect(dst).await.expect("connect idle flow");
                c.write_all(b"x").await.unwrap();
                let mut b = [0u8; 1];
                c.read_exact(&mut b).await.unwrap();
                held_clients.push(c);
                held_flows.push(idle_rx.recv().await.unwrap());
            }
            opened = target;
            // Let stream buffers of the now idle flows be freed.
            tokio::time::sleep(Duration::from_millis(1500)).await;
            let after = rss_kib();
            let per_flow = after.saturating_sub(before) as f64 / n as f64;
            println!(
                "  idle flows {target:6}: RSS {after} KiB, {per_flow:.1} KiB per flow (stack reports {} active)",
                handle.stats().active_flows
            );
        }
        handle.shutdown();
    });
}
