//! The appliance's DNS server, driven only through the network: real UDP and
//! TCP queries on loopback (port 0) to a server that forwards to a fake
//! upstream, also on loopback.

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use appliance::dns::{DnsConfig, DnsError, DnsServer};
use appliance::names::{NameMap, NamesError};
use appliance::virtual_range::VirtualRange;
use hickory_proto::op::{Edns, Message, MessageType, OpCode, Query, ResponseCode};
use hickory_proto::rr::rdata::A;
use hickory_proto::rr::{Name, RData, Record, RecordType};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::task::JoinHandle;
use tokio::time::timeout;

/// The one name the fake upstream knows, and its address (only data: no
/// traffic ever goes there).
const UPSTREAM_NAME: &str = "example.test.";
const UPSTREAM_ADDR: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 7);

/// A tiny upstream resolver on loopback: answers `example.test` A over UDP
/// and TCP, NXDOMAIN for everything else, and counts what it was asked.
struct FakeUpstream {
    addr: SocketAddr,
    queries: Arc<AtomicU64>,
    tasks: Vec<JoinHandle<()>>,
}

impl Drop for FakeUpstream {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

fn upstream_answer(query: &[u8]) -> Option<Vec<u8>> {
    let request = Message::from_vec(query).ok()?;
    let mut response = Message::response(request.metadata.id, OpCode::Query);
    response.metadata.recursion_desired = request.metadata.recursion_desired;
    response.metadata.recursion_available = true;
    let q = request.queries.first()?.clone();
    if q.name() == &Name::from_ascii(UPSTREAM_NAME).ok()? && q.query_type() == RecordType::A {
        response.add_answer(Record::from_rdata(
            q.name().clone(),
            60,
            RData::A(A(UPSTREAM_ADDR)),
        ));
    } else {
        response.metadata.response_code = ResponseCode::NXDomain;
    }
    response.add_query(q);
    response.to_vec().ok()
}

impl FakeUpstream {
    async fn start() -> FakeUpstream {
        let udp = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let addr = udp.local_addr().unwrap();
        let tcp = TcpListener::bind(addr).await.unwrap();
        let queries = Arc::new(AtomicU64::new(0));
        let count = Arc::clone(&queries);
        let udp_task = tokio::spawn(async move {
            let mut buf = vec![0u8; 4096];
            while let Ok((len, from)) = udp.recv_from(&mut buf).await {
                count.fetch_add(1, Ordering::Relaxed);
                if let Some(answer) = upstream_answer(&buf[..len]) {
                    let _ = udp.send_to(&answer, from).await;
                }
            }
        });
        let count = Arc::clone(&queries);
        let tcp_task = tokio::spawn(async move {
            while let Ok((mut stream, _)) = tcp.accept().await {
                count.fetch_add(1, Ordering::Relaxed);
                tokio::spawn(async move {
                    let mut len = [0u8; 2];
                    stream.read_exact(&mut len).await?;
                    let mut buf = vec![0u8; usize::from(u16::from_be_bytes(len))];
                    stream.read_exact(&mut buf).await?;
                    if let Some(answer) = upstream_answer(&buf) {
                        let mut out = (answer.len() as u16).to_be_bytes().to_vec();
                        out.extend_from_slice(&answer);
                        stream.write_all(&out).await?;
                    }
                    Ok::<_, std::io::Error>(())
                });
            }
        });
        FakeUpstream {
            addr,
            queries,
            tasks: vec![udp_task, tcp_task],
        }
    }
}

/// A loopback UDP socket that never answers: an upstream that is down but
/// does not say so.
async fn black_hole() -> (UdpSocket, SocketAddr) {
    let socket = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let addr = socket.local_addr().unwrap();
    (socket, addr)
}

fn names(list: &[(&str, [u8; 4])]) -> Vec<(String, Ipv4Addr)> {
    list.iter()
        .map(|(n, a)| (n.to_string(), Ipv4Addr::from(*a)))
        .collect()
}

fn config(upstreams: Vec<SocketAddr>) -> DnsConfig {
    let mut config = DnsConfig::new("127.0.0.1:0".parse().unwrap(), upstreams);
    config.search = vec!["corp".to_string()];
    config
}

fn query_bytes(name: &str, qtype: RecordType) -> (u16, Vec<u8>) {
    let mut message = Message::query();
    message.metadata.recursion_desired = true;
    message.add_query(Query::query(Name::from_ascii(name).unwrap(), qtype));
    message.set_edns(Edns::new());
    (message.metadata.id, message.to_vec().unwrap())
}

/// Sends raw bytes over UDP and returns the answer, if one comes within 3 s.
async fn exchange_udp(server: SocketAddr, bytes: &[u8]) -> Option<Message> {
    let socket = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    socket.connect(server).await.unwrap();
    socket.send(bytes).await.unwrap();
    let mut buf = vec![0u8; 65535];
    let len = timeout(Duration::from_secs(3), socket.recv(&mut buf))
        .await
        .ok()?
        .ok()?;
    Some(Message::from_vec(&buf[..len]).expect("the server sent a valid DNS message"))
}

async fn query_udp(server: SocketAddr, name: &str, qtype: RecordType) -> Message {
    let (id, bytes) = query_bytes(name, qtype);
    let answer = exchange_udp(server, &bytes)
        .await
        .unwrap_or_else(|| panic!("no answer to {name} {qtype}"));
    assert_eq!(answer.metadata.id, id);
    assert_eq!(answer.metadata.message_type, MessageType::Response);
    answer
}

async fn query_tcp(server: SocketAddr, name: &str, qtype: RecordType) -> Message {
    let (id, bytes) = query_bytes(name, qtype);
    let exchange = async {
        let mut stream = TcpStream::connect(server).await.unwrap();
        let mut out = (bytes.len() as u16).to_be_bytes().to_vec();
        out.extend_from_slice(&bytes);
        stream.write_all(&out).await.unwrap();
        let mut len = [0u8; 2];
        stream.read_exact(&mut len).await.unwrap();
        let mut buf = vec![0u8; usize::from(u16::from_be_bytes(len))];
        stream.read_exact(&mut buf).await.unwrap();
        Message::from_vec(&buf).unwrap()
    };
    let answer = timeout(Duration::from_secs(3), exchange)
        .await
        .expect("TCP answer within 3 s");
    assert_eq!(answer.metadata.id, id);
    answer
}

fn a_records(message: &Message) -> Vec<Ipv4Addr> {
    message
        .answers
        .iter()
        .filter_map(|r| match &r.data {
            RData::A(a) => Some(a.0),
            _ => None,
        })
        .collect()
}

#[tokio::test]
async fn configured_names_answer_for_fqdn_short_and_case_variants() {
    let upstream = FakeUpstream::start().await;
    let server = DnsServer::start(
        config(vec![upstream.addr]),
        names(&[("sql", [127, 77, 0, 2]), ("payroll.corp", [127, 77, 0, 3])]),
    )
    .await
    .unwrap();
    let addr = server.local_addr();

    for (name, expect) in [
        ("sql.", [127, 77, 0, 2]),
        ("SQL.", [127, 77, 0, 2]),
        ("sql.corp.", [127, 77, 0, 2]),
        ("Sql.Corp.", [127, 77, 0, 2]),
        ("payroll.corp.", [127, 77, 0, 3]),
        ("PayRoll.CORP.", [127, 77, 0, 3]),
    ] {
        let answer = query_udp(addr, name, RecordType::A).await;
        assert_eq!(
            answer.metadata.response_code,
            ResponseCode::NoError,
            "{name}"
        );
        assert!(answer.metadata.authoritative, "{name}");
        assert_eq!(a_records(&answer), vec![Ipv4Addr::from(expect)], "{name}");
        assert_eq!(answer.answers[0].ttl, 30);
        // The answer keeps the case the client asked with.
        assert_eq!(answer.answers[0].name.to_string(), name);
    }
    assert_eq!(
        upstream.queries.load(Ordering::Relaxed),
        0,
        "nothing was forwarded"
    );
    assert_eq!(server.stats().answered_locally, 6);
}

#[tokio::test]
async fn other_types_for_configured_names_are_empty_noerror() {
    let upstream = FakeUpstream::start().await;
    let server = DnsServer::start(
        config(vec![upstream.addr]),
        names(&[("sql.corp", [127, 77, 0, 2])]),
    )
    .await
    .unwrap();
    let addr = server.local_addr();

    for qtype in [RecordType::AAAA, RecordType::MX, RecordType::TXT] {
        let answer = query_udp(addr, "sql.corp.", qtype).await;
        assert_eq!(
            answer.metadata.response_code,
            ResponseCode::NoError,
            "{qtype}"
        );
        assert!(answer.answers.is_empty(), "{qtype}");
    }
    let any = query_udp(addr, "sql.corp.", RecordType::ANY).await;
    assert_eq!(a_records(&any), vec![Ipv4Addr::new(127, 77, 0, 2)]);
    assert_eq!(any.answers.len(), 1);
    assert_eq!(upstream.queries.load(Ordering::Relaxed), 0);
}

#[tokio::test]
async fn unknown_names_are_forwarded_and_relayed() {
    let upstream = FakeUpstream::start().await;
    let server = DnsServer::start(
        config(vec![upstream.addr]),
        names(&[("sql", [127, 77, 0, 2])]),
    )
    .await
    .unwrap();
    let addr = server.local_addr();

    let answer = query_udp(addr, UPSTREAM_NAME, RecordType::A).await;
    assert_eq!(answer.metadata.response_code, ResponseCode::NoError);
    assert_eq!(a_records(&answer), vec![UPSTREAM_ADDR]);
    assert!(answer.metadata.recursion_available);
    assert!(!answer.metadata.authoritative);

    let answer = query_udp(addr, "missing.test.", RecordType::A).await;
    assert_eq!(answer.metadata.response_code, ResponseCode::NXDomain);
    // A name that only resembles a configured one is not answered locally.
    let answer = query_udp(addr, "sql.other.", RecordType::A).await;
    assert_eq!(answer.metadata.response_code, ResponseCode::NXDomain);

    assert_eq!(upstream.queries.load(Ordering::Relaxed), 3);
    let stats = server.stats();
    assert_eq!(
        (stats.forwarded, stats.failed, stats.answered_locally),
        (3, 0, 0)
    );
}

#[tokio::test]
async fn tcp_queries_work_locally_and_forwarded() {
    let upstream = FakeUpstream::start().await;
    let server = DnsServer::start(
        config(vec![upstream.addr]),
        names(&[("sql.corp", [127, 77, 0, 2])]),
    )
    .await
    .unwrap();
    let addr = server.local_addr();

    let answer = query_tcp(addr, "SQL.corp.", RecordType::A).await;
    assert_eq!(a_records(&answer), vec![Ipv4Addr::new(127, 77, 0, 2)]);
    let answer = query_tcp(addr, UPSTREAM_NAME, RecordType::A).await;
    assert_eq!(a_records(&answer), vec![UPSTREAM_ADDR]);
    assert_eq!(
        upstream.queries.load(Ordering::Relaxed),
        1,
        "forwarded once, over TCP"
    );
}

#[tokio::test]
async fn upstream_down_gives_servfail_within_two_seconds() {
    // Silent upstream: the forward times out.
    let (_hole, hole) = black_hole().await;
    let server = DnsServer::start(config(vec![hole]), names(&[]))
        .await
        .unwrap();
    let started = Instant::now();
    let answer = query_udp(server.local_addr(), UPSTREAM_NAME, RecordType::A).await;
    let took = started.elapsed();
    assert_eq!(answer.metadata.response_code, ResponseCode::ServFail);
    assert!(took < Duration::from_secs(2), "SERVFAIL took {took:?}");
    assert_eq!(server.stats().failed, 1);

    // Closed port: the ICMP error makes it fail at once.
    let closed = black_hole().await.1;
    let server = DnsServer::start(config(vec![closed]), names(&[]))
        .await
        .unwrap();
    let started = Instant::now();
    let answer = query_udp(server.local_addr(), UPSTREAM_NAME, RecordType::A).await;
    assert_eq!(answer.metadata.response_code, ResponseCode::ServFail);
    assert!(
        started.elapsed() < Duration::from_millis(500),
        "{:?}",
        started.elapsed()
    );

    // Over TCP too.
    let answer = query_tcp(server.local_addr(), UPSTREAM_NAME, RecordType::A).await;
    assert_eq!(answer.metadata.response_code, ResponseCode::ServFail);
}

#[tokio::test]
async fn a_dead_first_upstream_falls_back_to_the_next() {
    let (_hole, hole) = black_hole().await;
    let upstream = FakeUpstream::start().await;
    let server = DnsServer::start(config(vec![hole, upstream.addr]), names(&[]))
        .await
        .unwrap();
    let started = Instant::now();
    let answer = query_udp(server.local_addr(), UPSTREAM_NAME, RecordType::A).await;
    assert_eq!(a_records(&answer), vec![UPSTREAM_ADDR]);
    assert!(started.elapsed() < Duration::from_secs(2));
}

/// A header for a query with `qdcount` questions and nothing after it.
fn header(id: u16, flags: u16, qdcount: u16) -> Vec<u8> {
    let mut h = Vec::with_capacity(12);
    h.extend_from_slice(&id.to_be_bytes());
    h.extend_from_slice(&flags.to_be_bytes());
    h.extend_from_slice(&qdcount.to_be_bytes());
    h.extend_from_slice(&[0, 0, 0, 0, 0, 0]);
    h
}

#[tokio::test]
async fn hostile_input_never_takes_the_server_down() {
    let upstream = FakeUpstream::start().await;
    let server = DnsServer::start(
        config(vec![upstream.addr]),
        names(&[("sql", [127, 77, 0, 2])]),
    )
    .await
    .unwrap();
    let addr = server.local_addr();
    let sender = UdpSocket::bind("127.0.0.1:0").await.unwrap();

    // Too short for a header: dropped without an answer.
    for junk in [&b""[..], b"\x00", b"garbage", &[0xff; 11]] {
        sender.send_to(junk, addr).await.unwrap();
    }

    // A header promising a question that is not there: FORMERR.
    let answer = exchange_udp(addr, &header(0x1111, 0x0100, 1))
        .await
        .unwrap();
    assert_eq!(answer.metadata.response_code, ResponseCode::FormErr);
    // 65,535 questions promised, none there.
    let answer = exchange_udp(addr, &header(0x1112, 0x0100, u16::MAX))
        .await
        .unwrap();
    assert_eq!(answer.metadata.response_code, ResponseCode::FormErr);

    // A name longer than 255 bytes: FORMERR.
    let mut huge = header(0x2222, 0x0100, 1);
    for _ in 0..6 {
        huge.push(63);
        huge.extend_from_slice(&[b'a'; 63]);
    }
    huge.extend_from_slice(&[0, 0, 1, 0, 1]);
    let answer = exchange_udp(addr, &huge).await.unwrap();
    assert_eq!(answer.metadata.response_code, ResponseCode::FormErr);

    // A compression pointer loop: FORMERR.
    let mut looped = header(0x2223, 0x0100, 1);
    looped.extend_from_slice(&[0xc0, 12, 0, 1, 0, 1]);
    let answer = exchange_udp(addr, &looped).await.unwrap();
    assert_eq!(answer.metadata.response_code, ResponseCode::FormErr);

    // Many valid questions in one message: FORMERR, nothing forwarded.
    let mut many = Message::query();
    for i in 0..100 {
        many.add_query(Query::query(
            Name::from_ascii(format!("q{i}.test.")).unwrap(),
            RecordType::A,
        ));
    }
    let answer = exchange_udp(addr, &many.to_vec().unwrap()).await.unwrap();
    assert_eq!(answer.metadata.response_code, ResponseCode::FormErr);

    // No question at all: FORMERR.
    let answer = exchange_udp(addr, &header(0x3333, 0x0100, 0))
        .await
        .unwrap();
    assert_eq!(answer.metadata.response_code, ResponseCode::FormErr);

    // An opcode other than QUERY: NOTIMP.
    let (_, mut notify) = query_bytes("sql.", RecordType::A);
    notify[2] = (notify[2] & 0x87) | (4 << 3);
    let answer = exchange_udp(addr, &notify).await.unwrap();
    assert_eq!(answer.metadata.response_code, ResponseCode::NotImp);

    // Random bytes of every length up to 600, from a fixed seed.
    let mut state: u32 = 0x1234_5678;
    for len in 0..600usize {
        let bytes: Vec<u8> = (0..len)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 17;
                state ^= state << 5;
                (state >> 24) as u8
            })
            .collect();
        sender.send_to(&bytes, addr).await.unwrap();
    }

    // Garbage over TCP: a connection that sends a bad frame and hangs up.
    let mut stream = TcpStream::connect(addr).await.unwrap();
    stream.write_all(&[0x00, 0x05, 1, 2, 3]).await.unwrap();
    drop(stream);
    let mut stream = TcpStream::connect(addr).await.unwrap();
    stream.write_all(&[0xff, 0xff, 1, 2, 3]).await.unwrap();
    drop(stream);

    let answer = query_udp(addr, "sql.", RecordType::A).await;
    assert_eq!(a_records(&answer), vec![Ipv4Addr::new(127, 77, 0, 2)]);
    let answer = query_tcp(addr, "sql.", RecordType::A).await;
    assert_eq!(a_records(&answer), vec![Ipv4Addr::new(127, 77, 0, 2)]);
    assert_eq!(
        upstream.queries.load(Ordering::Relaxed),
        0,
        "no junk reached the upstream"
    );
}

#[tokio::test]
async fn a_flood_is_survived_and_forwards_stay_bounded() {
    let (_hole, hole) = black_hole().await;
    let mut cfg = config(vec![hole]);
    cfg.max_inflight_forwards = 32;
    let server = DnsServer::start(cfg, names(&[("sql", [127, 77, 0, 2])]))
        .await
        .unwrap();
    let addr = server.local_addr();

    // 10,000 queries from one task as fast as it can send them: half for a
    // configured name, half for names that must be forwarded to an
    // upstream that never answers.
    let socket = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    socket.connect(addr).await.unwrap();
    let (_, local) = query_bytes("sql.", RecordType::A);
    let (_, remote) = query_bytes("flood.test.", RecordType::A);
    let started = Instant::now();
    for i in 0..10_000 {
        let bytes = if i % 2 == 0 { &local } else { &remote };
        socket.send(bytes).await.unwrap();
    }
    // Drain answers for a moment; many may be dropped by socket buffers.
    let mut buf = vec![0u8; 1500];
    let mut servfails = 0;
    let mut answers = 0;
    while let Ok(Ok(len)) = timeout(Duration::from_millis(300), socket.recv(&mut buf)).await {
        answers += 1;
        if Message::from_vec(&buf[..len])
            .unwrap()
            .metadata
            .response_code
            == ResponseCode::ServFail
        {
            servfails += 1;
        }
    }
    assert!(answers > 0);
    assert!(
        servfails > 0,
        "forwards beyond the limit are refused at once"
    );
    assert!(started.elapsed() < Duration::from_secs(30));

    let answer = query_udp(addr, "sql.", RecordType::A).await;
    assert_eq!(a_records(&answer), vec![Ipv4Addr::new(127, 77, 0, 2)]);
    let stats = server.stats();
    assert!(stats.answered_locally > 0);
    assert!(stats.failed > 0);
}

#[tokio::test]
async fn names_can_change_at_run_time() {
    let upstream = FakeUpstream::start().await;
    let server = DnsServer::start(
        config(vec![upstream.addr]),
        names(&[("sql", [127, 77, 0, 2])]),
    )
    .await
    .unwrap();
    let addr = server.local_addr();
    let answer = query_udp(addr, "cache.corp.", RecordType::A).await;
    assert_eq!(
        answer.metadata.response_code,
        ResponseCode::NXDomain,
        "forwarded"
    );

    server
        .update(names(&[
            ("sql", [127, 77, 0, 2]),
            ("cache.corp", [127, 77, 0, 3]),
        ]))
        .unwrap();
    let answer = query_udp(addr, "cache.corp.", RecordType::A).await;
    assert_eq!(a_records(&answer), vec![Ipv4Addr::new(127, 77, 0, 3)]);

    let err = server
        .update(names(&[("bad name", [127, 77, 0, 4])]))
        .unwrap_err();
    assert!(matches!(err, DnsError::InvalidName(_)), "{err}");
    let answer = query_udp(addr, "cache.corp.", RecordType::A).await;
    assert_eq!(
        a_records(&answer),
        vec![Ipv4Addr::new(127, 77, 0, 3)],
        "old names kept"
    );
}

#[tokio::test]
async fn the_map_survives_a_restart_and_a_corrupt_map_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("names.json");
    let hosts = vec![
        "sql.corp".to_string(),
        "payroll.corp".to_string(),
        "10.4.5.6".to_string(),
    ];

    let mut first = Vec::new();
    {
        let mut map = NameMap::load_or_create(&path, VirtualRange::DEFAULT).unwrap();
        map.assign(&hosts).unwrap();
        let served: Vec<_> = map.iter().map(|(n, a)| (n.to_string(), a)).collect();
        let server = DnsServer::start(config(vec![]), served).await.unwrap();
        for name in ["sql.corp.", "payroll.corp."] {
            first.extend(a_records(
                &query_udp(server.local_addr(), name, RecordType::A).await,
            ));
        }
        server.shutdown().await.unwrap();
    }
    assert_eq!(first.len(), 2);
    assert_ne!(first[0], first[1]);
    assert!(first.iter().all(|a| VirtualRange::DEFAULT.contains(*a)));

    // Restart: a new map from the same file, hosts in another order.
    let mut map = NameMap::load_or_create(&path, VirtualRange::DEFAULT).unwrap();
    map.assign(&[
        "PAYROLL.corp".to_string(),
        "new.corp".to_string(),
        "sql.corp.".to_string(),
    ])
    .unwrap();
    let served: Vec<_> = map.iter().map(|(n, a)| (n.to_string(), a)).collect();
    let server = DnsServer::start(config(vec![]), served).await.unwrap();
    let mut second = Vec::new();
    for name in ["sql.corp.", "payroll.corp."] {
        second.extend(a_records(
            &query_udp(server.local_addr(), name, RecordType::A).await,
        ));
    }
    assert_eq!(first, second, "same names, same addresses");
    let new = a_records(&query_udp(server.local_addr(), "new.corp.", RecordType::A).await);
    assert_eq!(new.len(), 1);
    assert!(!first.contains(&new[0]));

    std::fs::write(&path, b"{\"version\":1,\"names\":{\"sql.corp\":").unwrap();
    let err = NameMap::load_or_create(&path, VirtualRange::DEFAULT).unwrap_err();
    assert!(matches!(err, NamesError::Corrupt { .. }), "{err}");
    assert!(err.to_string().contains("names.json"), "{err}");
}

#[tokio::test]
async fn forwarding_to_itself_is_refused_at_start() {
    let probe = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let addr = probe.local_addr().unwrap();
    drop(probe);
    let mut cfg = config(vec![addr]);
    cfg.listen = addr;
    match DnsServer::start(cfg, names(&[])).await {
        Err(DnsError::UpstreamIsSelf { .. }) => {}
        // The port was taken again in between; the check is unit-tested too.
        Err(DnsError::Bind { .. }) => {}
        other => panic!("expected UpstreamIsSelf, got {other:?}"),
    }
}

#[tokio::test]
async fn a_busy_port_is_a_bind_error() {
    let (_taken, addr) = black_hole().await;
    let mut cfg = config(vec![]);
    cfg.listen = addr;
    let err = DnsServer::start(cfg, names(&[])).await.unwrap_err();
    assert!(
        matches!(
            err,
            DnsError::Bind {
                protocol: "udp",
                ..
            }
        ),
        "{err}"
    );
}

/// Sources outside loopback are refused unless allowed. This needs a
/// non-loopback address, so the test re-runs itself in a fresh network
/// namespace (as root, via `unshare --net`) and gives its `lo` an address
/// from the benchmarking range 198.18.0.0/15; nothing leaves the namespace.
#[test]
fn non_loopback_sources_are_refused_unless_allowed() {
    const INSIDE: &str = "HYBRIDLINK_DNS_TEST_IN_NETNS";
    if std::env::var_os(INSIDE).is_none() {
        let exe = std::env::current_exe().unwrap();
        if !lab::preconditions::root_or_skip("the DNS server in a namespace") {
            return;
        }
        let output = std::process::Command::new("unshare")
            .args(["--net", "--"])
            .arg(exe)
            .args(["--exact", "non_loopback_sources_are_refused_unless_allowed"])
            .env(INSIDE, "1")
            .output()
            .expect("run unshare");
        assert!(
            output.status.success(),
            "the test inside the namespace failed: {}\n{}{}",
            output.status,
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        return;
    }
    for args in [
        &["link", "set", "lo", "up"][..],
        &["addr", "add", "198.18.0.1/32", "dev", "lo"],
    ] {
        let ok = std::process::Command::new("ip")
            .args(args)
            .status()
            .unwrap();
        assert!(ok.success(), "ip {args:?}");
    }
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async {
        let listen: SocketAddr = "198.18.0.1:0".parse().unwrap();
        let names = names(&[("sql", [127, 77, 0, 2])]);

        let server = DnsServer::start(DnsConfig::new(listen, vec![]), names.clone())
            .await
            .unwrap();
        let socket = UdpSocket::bind("198.18.0.1:0").await.unwrap();
        let (_, bytes) = query_bytes("sql.", RecordType::A);
        socket.send_to(&bytes, server.local_addr()).await.unwrap();
        let mut buf = vec![0u8; 1500];
        let len = timeout(Duration::from_secs(3), socket.recv(&mut buf))
            .await
            .unwrap()
            .unwrap();
        let answer = Message::from_vec(&buf[..len]).unwrap();
        assert_eq!(answer.metadata.response_code, ResponseCode::Refused);
        assert!(answer.answers.is_empty());

        let mut cfg = DnsConfig::new(listen, vec![]);
        cfg.allow = vec!["198.18.0.0/15".parse().unwrap()];
        let server = DnsServer::start(cfg, names).await.unwrap();
        socket.send_to(&bytes, server.local_addr()).await.unwrap();
        let len = timeout(Duration::from_secs(3), socket.recv(&mut buf))
            .await
            .unwrap()
            .unwrap();
        let answer = Message::from_vec(&buf[..len]).unwrap();
        assert_eq!(a_records(&answer), vec![Ipv4Addr::new(127, 77, 0, 2)]);
    });
}
