//! End-to-end tests of the stream multiplexer over in-memory pipes
//! (`tokio::io::duplex`) and real loopback TCP.

use std::io;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use ring::digest;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, DuplexStream};
use tokio::net::{TcpListener, TcpStream};
use transport::mux::{
    Incoming, MuxConfig, MuxHandle, MuxStream, OpenError, SessionEnd, Side, spawn_session,
};

fn duplex_pair(cfg: MuxConfig) -> ((MuxHandle, Incoming), (MuxHandle, Incoming)) {
    let (a, b) = tokio::io::duplex(1 << 20);
    (
        spawn_session(a, Side::Client, cfg.clone()),
        spawn_session(b, Side::Server, cfg),
    )
}

async fn tcp_pair(cfg: MuxConfig) -> ((MuxHandle, Incoming), (MuxHandle, Incoming)) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (client, server) = tokio::join!(TcpStream::connect(addr), listener.accept());
    let (client, server) = (client.unwrap(), server.unwrap().0);
    client.set_nodelay(true).unwrap();
    server.set_nodelay(true).unwrap();
    (
        spawn_session(client, Side::Client, cfg.clone()),
        spawn_session(server, Side::Server, cfg),
    )
}

/// Accepts every stream and echoes it back until the opener half-closes.
fn spawn_echo_server(mut incoming: Incoming) {
    tokio::spawn(async move {
        while let Some(pending) = incoming.next().await {
            let reply = Bytes::copy_from_slice(pending.request());
            let stream = pending.accept(reply);
            tokio::spawn(async move {
                let (mut rd, mut wr) = tokio::io::split(stream);
                // The session may die under the echo (tests of dead peers).
                if tokio::io::copy(&mut rd, &mut wr).await.is_ok() {
                    let _ = wr.shutdown().await;
                }
            });
        }
    });
}

/// Deterministic, non-repeating-looking test data.
fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// Writes `total` bytes (rotations of `block`, so misordered chunks change
/// the digest), half-closes, and returns the SHA-256 of what was sent.
async fn send_all<W: AsyncWrite + Unpin>(mut w: W, block: &[u8], total: usize) -> digest::Digest {
    let mut ctx = digest::Context::new(&digest::SHA256);
    let mut sent = 0;
    let mut rot = 0;
    while sent < total {
        let (a, b) = block.split_at(rot);
        for part in [b, a] {
            let part = &part[..part.len().min(total - sent)];
            w.write_all(part).await.unwrap();
            ctx.update(part);
            sent += part.len();
        }
        rot = (rot + 4099) % block.len();
    }
    w.shutdown().await.unwrap();
    ctx.finish()
}

/// Reads to the end and returns the byte count and SHA-256.
async fn recv_all<R: AsyncRead + Unpin>(mut r: R) -> (usize, digest::Digest) {
    let mut ctx = digest::Context::new(&digest::SHA256);
    let mut buf = vec![0u8; 256 * 1024];
    let mut n = 0;
    loop {
        let k = r.read(&mut buf).await.unwrap();
        if k == 0 {
            return (n, ctx.finish());
        }
        ctx.update(&buf[..k]);
        n += k;
    }
}

#[tokio::test]
async fn echo_round_trip_and_accept_payload() {
    let ((client, _ci), (_server, si)) = duplex_pair(MuxConfig::default());
    spawn_echo_server(si);
    let (mut stream, payload) = client.open(Bytes::from_static(b"sql-prod")).await.unwrap();
    assert_eq!(&payload[..], b"sql-prod");
    stream.write_all(b"ping over mux").await.unwrap();
    stream.shutdown().await.unwrap();
    let mut got = Vec::new();
    stream.read_to_end(&mut got).await.unwrap();
    assert_eq!(got, b"ping over mux");
    drop(stream);
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(
        client.open_streams(),
        0,
        "a stream finished both ways is released"
    );
}

#[tokio::test]
async fn reject_delivers_the_payload_to_the_opener() {
    let ((client, _ci), (_server, mut si)) = duplex_pair(MuxConfig::default());
    tokio::spawn(async move {
        while let Some(p) = si.next().await {
            assert_eq!(p.request(), b"db");
            p.reject(Bytes::from_static(b"connection refused by target"));
        }
    });
    match client.open(Bytes::from_static(b"db")).await {
        Err(OpenError::Rejected(payload)) => {
            assert_eq!(&payload[..], b"connection refused by target")
        }
        other => panic!("expected a rejection, got {other:?}"),
    }
    assert_eq!(client.open_streams(), 0);
}

#[tokio::test]
async fn half_close_each_way_keeps_the_other_direction_flowing() {
    let ((client, _ci), (_server, mut si)) = duplex_pair(MuxConfig::default());
    let server = tokio::spawn(async move {
        let mut s = si.next().await.unwrap().accept(Bytes::new());
        // Server finishes first; keeps reading afterwards.
        s.write_all(b"server says bye").await.unwrap();
        s.shutdown().await.unwrap();
        let mut got = Vec::new();
        s.read_to_end(&mut got).await.unwrap();
        got
    });
    let (mut s, _) = client.open(Bytes::new()).await.unwrap();
    let mut got = Vec::new();
    s.read_to_end(&mut got).await.unwrap();
    assert_eq!(got, b"server says bye");
    // The client can still send after reading the server's end of stream.
    s.write_all(b"client still talking").await.unwrap();
    s.shutdown().await.unwrap();
    assert_eq!(server.await.unwrap(), b"client still talking");
}

async fn big_transfer_both_ways(client: MuxHandle, mut si: Incoming, total: usize) {
    let block = Arc::new(pattern(1 << 20, 7));
    let block2 = block.clone();
    let server = tokio::spawn(async move {
        let s = si.next().await.unwrap().accept(Bytes::new());
        let (rd, wr) = tokio::io::split(s);
        let sender = tokio::spawn(async move { send_all(wr, &block2[1000..], total).await });
        let received = recv_all(rd).await;
        (received, sender.await.unwrap())
    });
    let (s, _) = client.open(Bytes::new()).await.unwrap();
    let (rd, wr) = tokio::io::split(s);
    let started = Instant::now();
    let (sent, received) = tokio::join!(send_all(wr, &block, total), recv_all(rd));
    let ((server_got, server_digest), server_sent) = server.await.unwrap();
    eprintln!("{} MiB each way in {:?}", total >> 20, started.elapsed());
    assert_eq!(server_got, total);
    assert_eq!(server_digest.as_ref(), sent.as_ref());
    assert_eq!(received.0, total);
    assert_eq!(received.1.as_ref(), server_sent.as_ref());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transfer_256_mib_each_way_over_duplex() {
    let ((client, _ci), (_server, si)) = duplex_pair(MuxConfig::default());
    big_transfer_both_ways(client, si, 256 << 20).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transfer_256_mib_each_way_over_tcp() {
    let ((client, _ci), (_server, si)) = tcp_pair(MuxConfig::default()).await;
    big_transfer_both_ways(client, si, 256 << 20).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_concurrent_streams() {
    let ((client, _ci), (_server, si)) = tcp_pair(MuxConfig::default()).await;
    spawn_echo_server(si);
    let mut tasks = Vec::new();
    for i in 0..200u64 {
        let client = client.clone();
        tasks.push(tokio::spawn(async move {
            let data = pattern(100_000 + i as usize * 97, i);
            let (s, payload) = client
                .open(Bytes::from(format!("stream-{i}")))
                .await
                .unwrap();
            assert_eq!(payload, Bytes::from(format!("stream-{i}")));
            let (mut rd, mut wr) = tokio::io::split(s);
            let expected = data.clone();
            let writer = tokio::spawn(async move {
                wr.write_all(&data).await.unwrap();
                wr.shutdown().await.unwrap();
            });
            let mut got = Vec::new();
            rd.read_to_end(&mut got).await.unwrap();
            writer.await.unwrap();
            assert!(got == expected, "stream {i} echoed different bytes");
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_reader_does_not_stall_a_parallel_stream() {
    let cfg = MuxConfig {
        max_window: 4 << 20,
        ..MuxConfig::default()
    };
    let max_window = u64::from(cfg.max_window);
    let ((client, _ci), (_server, mut si)) = tcp_pair(cfg).await;
    let (stalled_tx, stalled_rx) = tokio::sync::oneshot::channel::<MuxStream>();
    let server = tokio::spawn(async move {
        // The first stream is accepted and never read.
        let stalled = si.next().await.unwrap().accept(Bytes::new());
        stalled_tx.send(stalled).unwrap();
        let live = si.next().await.unwrap().accept(Bytes::new());
        recv_all(live).await
    });
    let (mut stalled, _) = client.open(Bytes::from_static(b"stalled")).await.unwrap();
    let written = Arc::new(AtomicU64::new(0));
    let written2 = written.clone();
    tokio::spawn(async move {
        let block = vec![1u8; 64 * 1024];
        loop {
            match stalled.write(&block).await {
                Ok(n) => written2.fetch_add(n as u64, Ordering::Relaxed),
                Err(_) => return,
            };
        }
    });
    let stalled_server = stalled_rx.await.unwrap();
    let (live, _) = client.open(Bytes::from_static(b"live")).await.unwrap();
    let total = 64 << 20;
    let sent = send_all(live, &pattern(1 << 20, 3), total).await;
    let (got, digest) = tokio::time::timeout(Duration::from_secs(60), server)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(got, total);
    assert_eq!(digest.as_ref(), sent.as_ref());
    let before = written.load(Ordering::Relaxed);
    tokio::time::sleep(Duration::from_millis(200)).await;
    let after = written.load(Ordering::Relaxed);
    assert_eq!(before, after, "the stalled stream's writer is blocked");
    let buffered = stalled_server.buffered_len();
    assert!(
        buffered > 0 && buffered <= max_window,
        "stalled stream buffers {buffered} bytes"
    );
    assert!(
        after <= buffered + (2 << 20),
        "writer got {after} bytes in, receiver holds {buffered}"
    );
}

/// Forwards bytes both ways between two duplex pipes until `dead` is set;
/// then swallows everything, like a peer that vanished without a FIN.
fn black_hole_link(dead: Arc<AtomicBool>) -> (DuplexStream, DuplexStream) {
    let (a, a_far) = tokio::io::duplex(1 << 20);
    let (b, b_far) = tokio::io::duplex(1 << 20);
    let (a_rd, a_wr) = tokio::io::split(a_far);
    let (b_rd, b_wr) = tokio::io::split(b_far);
    for (mut rd, mut wr) in [(a_rd, b_wr), (b_rd, a_wr)] {
        let dead = dead.clone();
        tokio::spawn(async move {
            let mut buf = vec![0u8; 64 * 1024];
            while let Ok(n) = rd.read(&mut buf).await {
                if n == 0 {
                    return;
                }
                if !dead.load(Ordering::Relaxed) && wr.write_all(&buf[..n]).await.is_err() {
                    return;
                }
            }
        });
    }
    (a, b)
}

#[tokio::test]
async fn a_dead_peer_fails_open_streams_within_the_idle_timeout() {
    let cfg = MuxConfig {
        keepalive_interval: Duration::from_millis(200),
        idle_timeout: Duration::from_millis(600),
        ..MuxConfig::default()
    };
    let dead = Arc::new(AtomicBool::new(false));
    let (a, b) = black_hole_link(dead.clone());
    let (client, _ci) = spawn_session(a, Side::Client, cfg.clone());
    let (_server, si) = spawn_session(b, Side::Server, cfg);
    spawn_echo_server(si);
    let (mut s, _) = client.open(Bytes::new()).await.unwrap();
    // Quiet but alive: keep-alives hold the session open past the timeout.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(!client.is_closed());
    s.write_all(b"still there?").await.unwrap();
    let mut buf = [0u8; 12];
    s.read_exact(&mut buf).await.unwrap();

    dead.store(true, Ordering::Relaxed);
    let died = Instant::now();
    let err = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf))
        .await
        .unwrap()
        .unwrap_err();
    let noticed = died.elapsed();
    assert_eq!(err.kind(), io::ErrorKind::ConnectionReset);
    assert!(noticed <= Duration::from_millis(900), "took {noticed:?}");
    assert!(
        noticed >= Duration::from_millis(300),
        "too early: {noticed:?}"
    );
    assert_eq!(
        s.write(b"x").await.unwrap_err().kind(),
        io::ErrorKind::BrokenPipe
    );
    tokio::time::timeout(Duration::from_secs(1), client.closed())
        .await
        .unwrap();
    assert!(matches!(
        client.close_reason(),
        Some(SessionEnd::Mux(proto::mux::CloseReason::IdleTimeout))
    ));
    assert!(matches!(
        client.open(Bytes::new()).await,
        Err(OpenError::SessionClosed(_))
    ));
}

#[tokio::test]
async fn dropping_a_stream_resets_it() {
    let ((client, _ci), (_server, mut si)) = duplex_pair(MuxConfig::default());
    let (opened, mut server_side) = tokio::join!(
        async { client.open(Bytes::new()).await.unwrap().0 },
        async { si.next().await.unwrap().accept(Bytes::new()) }
    );
    drop(opened);
    let mut buf = [0u8; 8];
    let err = server_side.read(&mut buf).await.unwrap_err();
    assert_eq!(err.kind(), io::ErrorKind::ConnectionReset);
    assert_eq!(
        server_side.write(b"x").await.unwrap_err().kind(),
        io::ErrorKind::BrokenPipe
    );
}

#[tokio::test]
async fn closing_the_session_fails_streams_instead_of_ending_them() {
    let ((client, _ci), (server, si)) = duplex_pair(MuxConfig::default());
    spawn_echo_server(si);
    let (mut s, _) = client.open(Bytes::new()).await.unwrap();
    server.close();
    let mut buf = [0u8; 8];
    let err = s.read(&mut buf).await.unwrap_err();
    assert_eq!(err.kind(), io::ErrorKind::ConnectionReset);
    client.closed().await;
    assert!(matches!(
        client.close_reason(),
        Some(SessionEnd::Mux(proto::mux::CloseReason::PeerGoAway(_)))
    ));
}

#[tokio::test]
async fn dropping_every_handle_ends_the_session() {
    let ((client, ci), (server, _si)) = duplex_pair(MuxConfig::default());
    drop(client);
    drop(ci);
    tokio::time::timeout(Duration::from_secs(2), server.closed())
        .await
        .unwrap();
}

#[tokio::test]
async fn open_past_the_peer_stream_cap_is_rejected() {
    let cfg = MuxConfig {
        max_streams: 3,
        ..MuxConfig::default()
    };
    let ((client, _ci), (_server, mut si)) = duplex_pair(cfg);
    let mut held = Vec::new();
    for _ in 0..3 {
        let (r, accepted) = tokio::join!(client.open(Bytes::new()), async {
            si.next().await.unwrap().accept(Bytes::new())
        });
        held.push((r.unwrap().0, accepted));
    }
    match client.open(Bytes::new()).await {
        Err(OpenError::Rejected(reason)) => assert_eq!(&reason[..], proto::mux::TOO_MANY_STREAMS),
        other => panic!("expected rejection, got {other:?}"),
    }
}

/// Prints single-stream throughput over loopback TCP without TLS. Run with
/// `cargo test -p transport --release -- --ignored throughput --nocapture`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "benchmark; run in release"]
async fn throughput() {
    let ((client, _ci), (_server, mut si)) = tcp_pair(MuxConfig::default()).await;
    let total: usize = 8 << 30;
    let server = tokio::spawn(async move {
        let mut s = si.next().await.unwrap().accept(Bytes::new());
        let mut buf = vec![0u8; 256 * 1024];
        let mut n = 0;
        loop {
            let k = s.read(&mut buf).await.unwrap();
            if k == 0 {
                return n;
            }
            n += k;
        }
    });
    let (mut s, _) = client.open(Bytes::new()).await.unwrap();
    let block = vec![0x5au8; 256 * 1024];
    let start = Instant::now();
    let mut sent = 0;
    while sent < total {
        s.write_all(&block).await.unwrap();
        sent += block.len();
    }
    s.shutdown().await.unwrap();
    let got = server.await.unwrap();
    let secs = start.elapsed().as_secs_f64();
    assert_eq!(got, total);
    println!(
        "mux single stream over loopback TCP: {:.2} Gbit/s ({} MiB in {secs:.2} s)",
        total as f64 * 8.0 / secs / 1e9,
        total >> 20
    );
}
