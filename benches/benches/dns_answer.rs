//! Micro-benchmark of the appliance's DNS answer path: a UDP query to the
//! running DNS server (hickory-server with our handler) and its answer, for
//! a configured name (A record), the same name asked for AAAA (NOERROR, no
//! record) and an unknown name with no upstream (SERVFAIL at once), with
//! 1,000 names configured. The round trip over loopback is part of what is
//! measured: it is the path an application's resolver takes.
//!
//! `cargo bench -p hybridlink-benches --bench dns_answer`

use std::net::{Ipv4Addr, SocketAddr};
use std::time::Duration;

use appliance::dns::{DnsConfig, DnsServer};
use criterion::{Criterion, criterion_group, criterion_main};
use hickory_proto::op::{Message, Query, ResponseCode};
use hickory_proto::rr::{Name, RecordType};
use tokio::net::UdpSocket;

fn query(name: &str, qtype: RecordType) -> Vec<u8> {
    let mut m = Message::query();
    m.metadata.recursion_desired = true;
    m.add_query(Query::query(Name::from_ascii(name).expect("name"), qtype));
    m.to_vec().expect("encodes")
}

fn dns_answer(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("runtime");
    let names: Vec<(String, Ipv4Addr)> = (0..1000u32)
        .map(|i| {
            let [_, _, hi, lo] = (i + 2).to_be_bytes();
            (format!("host{i}.corp"), Ipv4Addr::new(127, 77, hi, lo))
        })
        .collect();
    let (server, client) = rt.block_on(async {
        let mut config = DnsConfig::new(SocketAddr::from(([127, 0, 0, 1], 0)), Vec::new());
        config.forward_timeout = Duration::from_millis(200);
        let server = DnsServer::start(config, names).await.expect("dns server");
        let client = UdpSocket::bind("127.0.0.1:0").await.expect("bind");
        client.connect(server.local_addr()).await.expect("connect");
        (server, client)
    });
    let mut g = c.benchmark_group("dns");
    for (what, name, qtype, rcode, answers) in [
        (
            "A for a configured name",
            "host500.corp",
            RecordType::A,
            ResponseCode::NoError,
            1,
        ),
        (
            "AAAA for a configured name",
            "host500.corp",
            RecordType::AAAA,
            ResponseCode::NoError,
            0,
        ),
        (
            "unknown name, no upstream",
            "elsewhere.example",
            RecordType::A,
            ResponseCode::ServFail,
            0,
        ),
    ] {
        let q = query(name, qtype);
        g.bench_function(what, |b| {
            let mut buf = vec![0u8; 4096];
            b.iter(|| {
                rt.block_on(async {
                    client.send(&q).await.expect("send");
                    client.recv(&mut buf).await.expect("recv")
                })
            });
            // Once, outside the timing: the answer is the one users rely on.
            let n = rt.block_on(async {
                client.send(&q).await.expect("send");
                client.recv(&mut buf).await.expect("recv")
            });
            let m = Message::from_vec(&buf[..n]).expect("an answer");
            assert_eq!(m.metadata.response_code, rcode, "{what}");
            assert_eq!(m.answers.len(), answers, "{what}");
        });
    }
    g.finish();
    rt.block_on(server.shutdown()).expect("shutdown");
}

criterion_group!(benches, dns_answer);
criterion_main!(benches);
