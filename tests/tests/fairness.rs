//! Per-stream flow control as a user feels it: a stream whose reader stops
//! must not stop the other streams of the same pipe.

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

/// Uploads `bytes` on a new stream to the digesting target; checks that
/// every byte arrived.
async fn upload(sender: &Sender, cs: &ConnectionString, bytes: usize) -> Result<()> {
    let mut s = sender.open(&cs.hc).await?;
    let block = vec![b'D'; 256 * 1024];
    let mut sent = 0;
    while sent < bytes {
        s.write_all(&block).await?;
        sent += block.len();
    }
    s.shutdown().await?;
    let mut total = [0u8; 8];
    s.read_exact(&mut total).await?;
    anyhow::ensure!(
        u64::from_be_bytes(total) as usize == sent,
        "the target got {} of {sent} bytes",
        u64::from_be_bytes(total)
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_stalled_reader_does_not_stop_a_parallel_stream() -> Result<()> {
    const BYTES: usize = 64 << 20;
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
    // Stall one stream: the target stops reading, so its window fills and
    // its writer blocks. Both streams share the one pipe, so with
    // head-of-line blocking the neighbour would stop outright; with
    // per-stream flow control every byte of it arrives. (How fast it goes
    // beside a stalled stream is for the benchmark harness to measure, not
    // for a test on a shared machine.)
    let stalled = stall(&sender, &send).await?;
    for round in 0..2 {
        tokio::time::timeout(Duration::from_secs(120), upload(&sender, &send, BYTES))
            .await
            .map_err(|_| {
                anyhow::anyhow!("round {round}: the neighbour of a stalled stream stopped")
            })??;
    }
    // The stalled stream is still open, and still stalled.
    let mut stalled = stalled;
    assert!(
        tokio::time::timeout(
            Duration::from_millis(300),
            stalled.write_all(&[0u8; 64 << 10])
        )
        .await
        .is_err(),
        "the stalled stream took more bytes although its reader never read"
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
