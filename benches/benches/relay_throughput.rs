//! Bytes per second through relay + agent on loopback, next to direct TCP to
//! the same sink in the same run, printed as a ratio.
//!
//! `cargo bench -p hybridlink-benches --bench relay_throughput` (release).
//! Set `HL_BENCH_MIB` to change the transfer size (default 2048 MiB).

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use proto::connection_string::ConnectionString;
use proto::key::Right;
use proto::name::HcName;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use transport::sender::{Sender, SenderOptions};

/// A sink that reads everything and answers with the byte count.
async fn sink() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((mut conn, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut buf = vec![0u8; 256 * 1024];
                let mut total = 0u64;
                while let Ok(n) = conn.read(&mut buf).await {
                    if n == 0 {
                        break;
                    }
                    total += n as u64;
                }
                let _ = conn.write_all(&total.to_be_bytes()).await;
            });
        }
    });
    addr
}

async fn upload<S: AsyncRead + AsyncWrite + Unpin>(mut s: S, bytes: u64) -> Duration {
    let block = vec![0x5au8; 256 * 1024];
    let start = Instant::now();
    let mut sent = 0u64;
    while sent < bytes {
        s.write_all(&block).await.expect("write");
        sent += block.len() as u64;
    }
    s.shutdown().await.expect("shutdown");
    let mut total = [0u8; 8];
    s.read_exact(&mut total).await.expect("count");
    assert_eq!(u64::from_be_bytes(total), sent);
    start.elapsed()
}

fn gbits(bytes: u64, d: Duration) -> f64 {
    bytes as f64 * 8.0 / d.as_secs_f64() / 1e9
}

#[tokio::main]
async fn main() {
    // `cargo test --benches` runs this with --test-ish flags; a quick pass is enough.
    let quick = std::env::args().any(|a| a == "--test" || a == "--list");
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let mib: u64 = std::env::var("HL_BENCH_MIB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(if quick { 64 } else { 2048 });
    let bytes = mib << 20;
    let dir = tempfile::tempdir().expect("tempdir");
    let relay = relay::RelayConfig {
        data_dir: dir.path().to_path_buf(),
        listen: "127.0.0.1:0".parse().expect("addr"),
        also_listen: Vec::new(),
        ca_cert: None,
        api: "127.0.0.1:0".parse().expect("addr"),
        api_tls: false,
        public_host: None,
        public_port: None,
        limits: relay::Limits::default(),
        etcd: None,
        advertise: None,
    }
    .start()
    .await
    .expect("relay starts");
    let target = sink().await;
    let name: HcName = "bench".parse().expect("name");
    let registry = relay.hub.registry().clone();
    let record = registry
        .create(name.clone(), target.to_string().parse().expect("endpoint"))
        .expect("create");
    let cs = |right: Right| ConnectionString {
        relay_host: "127.0.0.1".into(),
        relay_port: relay.listen.port(),
        key_name: right.rule_name().into(),
        key: record.keys(right).expect("keys").primary.clone(),
        hc: name.clone(),
        cert_sha256: Some(relay.cert_sha256),
        end_to_end_key: None,
    };
    let mut options = agent::AgentOptions::new(vec![cs(Right::Listen)]);
    // The sink listens on loopback, which only a rule naming it may reach.
    options.policy = agent::Policy::parse(
        &format!("[[allow]]\nhost = \"{}\"\n", target.ip()),
        std::path::Path::new("bench-policy.toml"),
    )
    .expect("policy");
    let _agent = agent::Agent::start(options).expect("agent");
    let sender = Sender::start(vec![cs(Right::Send)], SenderOptions::default()).expect("sender");
    // Warm up: the pipe is set up ahead of need and the first stream opens it.
    upload(sender.open(&name).await.expect("open"), 1 << 20).await;

    let mut direct = Vec::new();
    let mut relayed = Vec::new();
    for _ in 0..3 {
        let tcp = TcpStream::connect(target).await.expect("direct");
        tcp.set_nodelay(true).expect("nodelay");
        direct.push(gbits(bytes, upload(tcp, bytes).await));
        relayed.push(gbits(
            bytes,
            upload(sender.open(&name).await.expect("open"), bytes).await,
        ));
    }
    let median = |v: &mut Vec<f64>| {
        v.sort_by(|a, b| a.total_cmp(b));
        v[v.len() / 2]
    };
    let (d, r) = (median(&mut direct), median(&mut relayed));
    println!("single stream, {mib} MiB, median of 3, loopback");
    println!("  direct TCP             {d:6.2} Gbit/s");
    println!("  relay + agent (TLS e2e) {r:6.2} Gbit/s");
    println!("  ratio                  {:6.3}", r / d);
}
