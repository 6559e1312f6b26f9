//! Per-stream flow control as a user feels it: a stream whose reader stops
//! must not slow the other streams of the same pipe.
//!
//! This binary holds one test so that no other test competes for the two
//! cores while it compares throughputs.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::Result;
use hybridlink_tests::{Agent, Relay};
use proto::connection_string::ConnectionString;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use transport::sender::{Sender, SenderOptions};

/// A target that decides by the first byte: `S` stalls (never reads again),
/// anything else is digested like [`digest_server`].
async fn stall_or_digest_server() -> Result<SocketAddr> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move {
        while let Ok((mut conn, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut first = [0u8; 1];
                if conn.read_exact(&mut first).await.is_err() {
                    return;
                }
                if first[0] == b'S' {
                    tokio::time::sleep(Duration::from_secs(3600)).await;
                    return;
                }
                let mut buf = vec![0u8; 256 * 1024];
                let mut total = 1u64;
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
    Ok(addr)
}

async fn timed_upload(sender: &Sender, cs: &ConnectionString, bytes: usize) -> Result<Duration> {
    let mut s = sender.open(&cs.hc).await?;
    let block = vec![b'D'; 256 * 1024];
    let start = Instant::now();
    let mut sent = 0;
    while sent < bytes {
        s.write_all(&block).await?;
        sent += block.len();
    }
    s.shutdown().await?;
    let mut total = [0u8; 8];
    s.read_exact(&mut total).await?;
    assert_eq!(u64::from_be_bytes(total) as usize, sent);
    Ok(start.elapsed())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_stalled_reader_does_not_slow_a_parallel_stream() -> Result<()> {
    const BYTES: usize = 256 << 20;
    let relay = Relay::start()?;
    let target = stall_or_digest_server().await?;
    let (send, listen) = relay.create_hc("stall", target)?;
    let agent = Agent::start(&[&listen], &[])?;
    agent.wait_connected()?;
    let sender = Sender::start(vec![send.clone()], SenderOptions::default())?;
    let deadline = Instant::now() + Duration::from_secs(20);
    while sender.agents(&send.hc).is_empty() {
        assert!(Instant::now() < deadline, "sender never saw the agent");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // Interleave the two measurements so that machine noise hits both alike;
    // keep the best of each.
    let mut alone = Duration::MAX;
    let mut beside = Duration::MAX;
    for _ in 0..3 {
        alone = alone.min(timed_upload(&sender, &send, BYTES).await?);
        // Stall one stream: the target stops reading, so its window fills
        // and the writer blocks. Both streams share the one pipe.
        let stalled = stall(&sender, &send).await?;
        beside = beside.min(timed_upload(&sender, &send, BYTES).await?);
        drop(stalled);
    }
    let ratio = alone.as_secs_f64() / beside.as_secs_f64();
    eprintln!("alone {alone:?}, beside a stalled stream {beside:?}: ratio {ratio:.3}");
    // Head-of-line blocking would stop the neighbour outright (a ratio
    // near 0). The margin is for a debug build sharing two cores with the
    // relay, the agent and the rest of the suite, where 0.86 was seen once
    // with nothing wrong.
    assert!(
        ratio >= 0.75,
        "a stalled stream slowed its neighbour to {ratio:.2}x"
    );
    Ok(())
}

/// Opens a stream whose target never reads, and writes into it until the
/// writes block; returns the stalled stream.
async fn stall(sender: &Sender, cs: &ConnectionString) -> Result<transport::sender::Stream> {
    let mut stalled = sender.open(&cs.hc).await?;
    stalled.write_all(b"S").await?;
    let block = vec![0u8; 64 * 1024];
    let mut pushed = 0usize;
    loop {
        match tokio::time::timeout(Duration::from_millis(500), stalled.write_all(&block)).await {
            Ok(Ok(())) => pushed += block.len(),
            Ok(Err(e)) => return Err(e.into()),
            Err(_) => break,
        }
        assert!(
            pushed < 512 << 20,
            "a stalled stream absorbed {pushed} bytes: flow control is not bounding it"
        );
    }
    Ok(stalled)
}
