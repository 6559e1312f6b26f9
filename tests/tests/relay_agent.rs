//! The spine of hybridlink on loopback: a stream opened with a send
//! connection string reaches the real host:port behind an agent that dialed
//! out with a listen connection string, through the real relay and agent
//! binaries.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use bytes::Bytes;
use hybridlink_tests::{Agent, Relay, echo_server, pattern_block};
use proto::connection_string::ConnectionString;
use proto::control::RefusalCode;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use transport::sender::{SendError, Sender, SenderOptions};

fn sender(cs: &ConnectionString) -> Sender {
    Sender::start(vec![cs.clone()], SenderOptions::default()).expect("sender starts")
}

async fn wait_for_agents(sender: &Sender, cs: &ConnectionString, n: usize) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while sender.agents(&cs.hc).len() != n {
        assert!(Instant::now() < deadline, "sender never saw {n} agents");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn echo_roundtrip(stream: &mut transport::sender::Stream, msg: &[u8]) -> std::io::Result<()> {
    stream.write_all(msg).await?;
    let mut back = vec![0u8; msg.len()];
    stream.read_exact(&mut back).await?;
    assert_eq!(back, msg);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn echo_through_relay_and_agent_with_half_close() -> Result<()> {
    let relay = Relay::start()?;
    let echo = echo_server().await?;
    let (send, listen) = relay.create_hc("echo", echo)?;
    let agent = Agent::start(&[&listen], &[])?;
    agent.wait_connected()?;
    let sender = sender(&send);
    let mut stream = sender.open(&send.hc).await?;
    stream.write_all(b"hello, on-prem").await?;
    // Half-close: our end of writing reaches the echo server as EOF, and its
    // answer still flows back before it closes its side.
    stream.shutdown().await?;
    let mut back = Vec::new();
    stream.read_to_end(&mut back).await?;
    assert_eq!(back, b"hello, on-prem");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn one_gibibyte_each_way_arrives_intact() -> Result<()> {
    const TOTAL: usize = 1 << 30;
    let relay = Relay::start()?;
    let echo = echo_server().await?;
    let (send, listen) = relay.create_hc("bulk", echo)?;
    let agent = Agent::start(&[&listen], &[])?;
    agent.wait_connected()?;
    let sender = sender(&send);
    let stream = sender.open(&send.hc).await?;
    let (mut rx, mut tx) = tokio::io::split(stream);
    // A block whose length is coprime with every frame and buffer size, so
    // reordering or loss cannot hide behind identical chunks.
    let block = Bytes::from(pattern_block(42, (1 << 20) + 7));
    let upload = {
        let block = block.clone();
        tokio::spawn(async move {
            let mut digest = ring::digest::Context::new(&ring::digest::SHA256);
            let mut sent = 0;
            while sent < TOTAL {
                let n = block.len().min(TOTAL - sent);
                tx.write_all(&block[..n]).await?;
                digest.update(&block[..n]);
                sent += n;
            }
            tx.shutdown().await?;
            Ok::<_, std::io::Error>(digest.finish())
        })
    };
    let mut digest = ring::digest::Context::new(&ring::digest::SHA256);
    let mut buf = vec![0u8; 1 << 20];
    let mut received = 0usize;
    loop {
        let n = rx.read(&mut buf).await?;
        if n == 0 {
            break;
        }
        digest.update(&buf[..n]);
        received += n;
    }
    let sent = upload.await??;
    assert_eq!(received, TOTAL);
    assert_eq!(
        digest.finish().as_ref(),
        sent.as_ref(),
        "echoed bytes differ from sent bytes"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn streams_are_spread_round_robin_and_survive_an_agent_dying() -> Result<()> {
    let relay = Relay::start()?;
    let echo = echo_server().await?;
    let (send, listen) = relay.create_hc("spread", echo)?;
    let mut first = Agent::start(&[&listen], &["--label", "first"])?;
    let second = Agent::start(&[&listen], &["--label", "second"])?;
    first.wait_connected()?;
    second.wait_connected()?;
    let sender = sender(&send);
    wait_for_agents(&sender, &send, 2).await;

    let mut streams = Vec::new();
    for i in 0..100u32 {
        let mut s = sender
            .open(&send.hc)
            .await
            .with_context(|| format!("stream {i}"))?;
        echo_roundtrip(&mut s, &i.to_be_bytes()).await?;
        streams.push(s);
    }
    let opened = |agent: &Agent| -> Result<i64> {
        agent.status()?[0]["streams_opened"]
            .as_i64()
            .context("streams_opened")
    };
    let (a, b) = (opened(&first)?, opened(&second)?);
    assert_eq!(a + b, 100);
    assert!(
        (49..=51).contains(&a),
        "first agent got {a} of 100 streams, second {b}"
    );

    first.proc.kill();
    let died_at = Instant::now();
    // The relay sees the control channel close and tells the sender at once.
    while sender.agents(&send.hc).len() != 1 {
        assert!(
            died_at.elapsed() < Duration::from_secs(5),
            "the dead agent stayed in the rotation"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Every stream is either intact (second agent) or ends with an error
    // (first agent): none hangs, none silently succeeds with wrong data.
    let mut intact = 0;
    let mut failed = 0;
    for (i, s) in streams.iter_mut().enumerate() {
        let msg = format!("after-{i}");
        match tokio::time::timeout(Duration::from_secs(20), echo_roundtrip(s, msg.as_bytes())).await
        {
            Ok(Ok(())) => intact += 1,
            Ok(Err(_)) => failed += 1,
            Err(_) => panic!("stream {i} hung after its agent died"),
        }
    }
    assert_eq!(
        intact as i64, b,
        "every stream on the surviving agent stays intact"
    );
    assert_eq!(
        failed as i64, a,
        "every stream on the dead agent ends with an error"
    );

    // New streams succeed, all on the survivor, within 5 s of the death.
    for i in 0..20u32 {
        let mut s = sender
            .open(&send.hc)
            .await
            .with_context(|| format!("new stream {i}"))?;
        echo_roundtrip(&mut s, b"still here").await?;
    }
    assert!(died_at.elapsed() < Duration::from_secs(5) + Duration::from_secs(20));
    assert_eq!(opened(&second)?, b + 20);
    assert_eq!(sender.agents(&send.hc).len(), 1);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn bad_tokens_are_refused_each_with_its_own_reason() -> Result<()> {
    let relay = Relay::start()?;
    let echo = echo_server().await?;
    let (send, listen) = relay.create_hc("guarded", echo)?;
    let (other_send, _) = relay.create_hc("other", echo)?;
    let agent = Agent::start(&[&listen], &[])?;
    agent.wait_connected()?;

    let refused = |cs: ConnectionString, ttl: Duration| async move {
        let options = SenderOptions {
            token_ttl: ttl,
            ready_timeout: Duration::from_secs(5),
            ..SenderOptions::default()
        };
        let sender = Sender::start(vec![cs.clone()], options).expect("sender starts");
        match sender.open(&cs.hc).await {
            Err(SendError::NotAuthorized { message, .. }) => message,
            other => panic!("expected a refusal, got {other:?}"),
        }
    };
    let hour = Duration::from_secs(3600);

    let mut tampered = send.clone();
    tampered.key = other_send.key.clone();
    let msg = refused(tampered, hour).await;
    assert!(
        msg.contains("signed with a key this relay does not hold"),
        "{msg}"
    );

    let mut wrong_rule = send.clone();
    wrong_rule.key_name = "admin".into();
    let msg = refused(wrong_rule, hour).await;
    assert!(msg.contains("rule \"admin\""), "{msg}");

    // A genuine listen token used to send.
    let msg = refused(listen.clone(), hour).await;
    assert!(msg.contains("grants listen but send is needed"), "{msg}");

    let msg = refused(send.clone(), Duration::ZERO).await;
    assert!(msg.contains("expired"), "{msg}");

    // A genuine token of one HC presented for another.
    let msg = raw_attach(&relay, &send, &other_send.hc).await?;
    assert!(msg.contains("token is for hybrid connection"), "{msg}");

    // And the good string still works.
    let sender = sender(&send);
    let mut s = sender.open(&send.hc).await?;
    echo_roundtrip(&mut s, b"ok").await?;
    Ok(())
}

/// Attaches with `cs`'s token but for `hc`, on a hand-made control
/// channel; returns the relay's refusal message.
async fn raw_attach(
    relay: &Relay,
    cs: &ConnectionString,
    hc: &proto::name::HcName,
) -> Result<String> {
    use proto::control::{Fingerprint, PROTOCOL_VERSION, PeerMessage, PeerRole, RelayMessage};
    let pin = Fingerprint(cs.cert_sha256.context("pinned")?);
    let config = transport::tls::relay_client_config(pin)?;
    let tcp = tokio::net::TcpStream::connect(relay.listen).await?;
    let name = rustls::pki_types::ServerName::try_from("localhost")?;
    let mut tls = tokio_rustls::TlsConnector::from(config)
        .connect(name, tcp)
        .await?;
    let hello = PeerMessage::Hello {
        version: PROTOCOL_VERSION,
        role: PeerRole::Sender,
        identity: Fingerprint([1; 32]),
        label: "raw".parse()?,
    };
    hybridlink_tests::wire::write_message(&mut tls, &hello).await?;
    let token = cs.token(u64::MAX / 4);
    hybridlink_tests::wire::write_message(
        &mut tls,
        &PeerMessage::Attach {
            hc: hc.clone(),
            token,
        },
    )
    .await?;
    let mut buf = bytes::BytesMut::new();
    loop {
        match hybridlink_tests::wire::read_message::<RelayMessage, _>(&mut tls, &mut buf).await? {
            Some(RelayMessage::Detached { message, .. }) => return Ok(message),
            Some(RelayMessage::Attached { .. }) => {
                anyhow::bail!("relay accepted a token of another HC")
            }
            Some(_) => continue,
            None => anyhow::bail!("relay closed"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn agent_reconnects_after_the_relay_restarts() -> Result<()> {
    let mut relay = Relay::start()?;
    let echo = echo_server().await?;
    let (send, listen) = relay.create_hc("restart", echo)?;
    let agent = Agent::start(&[&listen], &[])?;
    agent.wait_connected()?;
    let sender = sender(&send);
    let mut s = sender.open(&send.hc).await?;
    echo_roundtrip(&mut s, b"before").await?;

    relay.restart()?;
    // Same data dir: same certificate and keys, so the same strings work.
    assert_eq!(relay.strings("restart")?.0, send);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match sender.open(&send.hc).await {
            Ok(mut s) => {
                echo_roundtrip(&mut s, b"after").await?;
                break;
            }
            Err(e) if Instant::now() < deadline => eprintln!("not yet: {e}"),
            Err(e) => return Err(e.into()),
        }
    }
    agent.wait_connected()?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_sender_cannot_choose_the_destination() -> Result<()> {
    let relay = Relay::start()?;
    let echo = echo_server().await?;
    // A server the sender would love to reach instead; it must see nothing.
    let decoy = TcpListener::bind("127.0.0.1:0").await?;
    let decoy_addr = decoy.local_addr()?;
    let (send, listen_a) = relay.create_hc("allowed", echo)?;
    let (_, listen_b) = relay.create_hc("forbidden", decoy_addr)?;
    let agent = Agent::start(&[&listen_a, &listen_b], &[])?;
    agent.wait_connected()?;
    let sender = sender(&send);
    wait_for_agents(&sender, &send, 1).await;

    let forged = format!(
        r#"{{"hc":"allowed","host":"127.0.0.1","port":{}}}"#,
        decoy_addr.port()
    );
    let err = sender
        .open_raw(&send.hc, Bytes::from(forged))
        .await
        .expect_err("forged request refused");
    assert_eq!(err.refusal_code(), Some(RefusalCode::BadRequest), "{err}");

    // The agent serves "forbidden", but this sender holds no key for it.
    let err = sender
        .open_raw(&send.hc, Bytes::from_static(br#"{"hc":"forbidden"}"#))
        .await
        .expect_err("stream to an HC without a key refused");
    assert_eq!(err.refusal_code(), Some(RefusalCode::NotAllowed), "{err}");

    let accepted = tokio::time::timeout(Duration::from_millis(500), decoy.accept()).await;
    assert!(accepted.is_err(), "the agent dialed the decoy");

    let mut s = sender.open(&send.hc).await?;
    echo_roundtrip(&mut s, b"the real endpoint").await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn refused_and_unreachable_targets_are_errors_not_streams() -> Result<()> {
    let relay = Relay::start()?;
    // A port with nothing listening: bind, note, close.
    let closed = {
        let l = std::net::TcpListener::bind("127.0.0.1:0")?;
        l.local_addr()?
    };
    let (send, listen) = relay.create_hc("closed", closed)?;
    let agent = Agent::start(&[&listen], &[])?;
    agent.wait_connected()?;
    let sender = sender(&send);
    let started = Instant::now();
    let err = sender
        .open(&send.hc)
        .await
        .expect_err("nothing listens there");
    assert_eq!(err.refusal_code(), Some(RefusalCode::Refused), "{err}");
    assert!(err.to_string().contains("refused"), "{err}");
    assert!(started.elapsed() < Duration::from_secs(5));
    Ok(())
}

/// The bytes of one proxied connection: (client to server, server to client).
type Recording = (Vec<u8>, Vec<u8>);

/// A TCP proxy that records every byte in both directions of every
/// connection it carries.
struct Recorder {
    addr: SocketAddr,
    conns: std::sync::Arc<std::sync::Mutex<Vec<Recording>>>,
}

impl Recorder {
    async fn start(upstream: SocketAddr) -> Result<Recorder> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let conns = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let all = conns.clone();
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let Ok(server) = tokio::net::TcpStream::connect(upstream).await else {
                    continue;
                };
                let index = {
                    let mut v = all.lock().unwrap();
                    v.push((Vec::new(), Vec::new()));
                    v.len() - 1
                };
                let all = all.clone();
                tokio::spawn(async move {
                    let (mut cr, mut cw) = client.into_split();
                    let (mut sr, mut sw) = server.into_split();
                    let up_log = all.clone();
                    let up = async move {
                        let mut buf = vec![0u8; 64 * 1024];
                        while let Ok(n) = cr.read(&mut buf).await {
                            if n == 0 || sw.write_all(&buf[..n]).await.is_err() {
                                break;
                            }
                            up_log.lock().unwrap()[index].0.extend_from_slice(&buf[..n]);
                        }
                        let _ = sw.shutdown().await;
                    };
                    let down = async move {
                        let mut buf = vec![0u8; 64 * 1024];
                        while let Ok(n) = sr.read(&mut buf).await {
                            if n == 0 || cw.write_all(&buf[..n]).await.is_err() {
                                break;
                            }
                            all.lock().unwrap()[index].1.extend_from_slice(&buf[..n]);
                        }
                        let _ = cw.shutdown().await;
                    };
                    tokio::join!(up, down);
                });
            }
        });
        Ok(Recorder { addr, conns })
    }

    /// The recorded connections that are pipes (start with the pipe magic).
    fn pipes(&self) -> Vec<Recording> {
        self.conns
            .lock()
            .unwrap()
            .iter()
            .filter(|(up, _)| up.starts_with(proto::control::PIPE_MAGIC))
            .cloned()
            .collect()
    }
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_relay_forwards_only_ciphertext_it_cannot_read() -> Result<()> {
    let relay = Relay::start()?;
    let echo = echo_server().await?;
    let (mut send, mut listen) = relay.create_hc("secret", echo)?;
    // Both peers reach the relay through recorders: what they record is
    // exactly what crosses the relay's port in each direction.
    let agent_side = Recorder::start(relay.listen).await?;
    let sender_side = Recorder::start(relay.listen).await?;
    listen.relay_port = agent_side.addr.port();
    send.relay_port = sender_side.addr.port();
    let agent = Agent::start(&[&listen], &[])?;
    agent.wait_connected()?;
    let sender = sender(&send);
    let mut s = sender.open(&send.hc).await?;
    let pattern = b"PAYROLL-RECORD-4242-do-not-leak-".repeat(2048);
    for _ in 0..16 {
        echo_roundtrip(&mut s, &pattern).await?;
    }
    drop(s);
    tokio::time::sleep(Duration::from_millis(300)).await;

    let needle = &pattern[..32];
    let sender_pipes = sender_side.pipes();
    let agent_pipes = agent_side.pipes();
    assert_eq!(sender_pipes.len(), 1, "one pipe from the sender");
    assert_eq!(agent_pipes.len(), 1, "one pipe to the agent");
    let (s_up, s_down) = &sender_pipes[0];
    let (a_up, a_down) = &agent_pipes[0];
    assert!(
        s_up.len() > 16 * pattern.len(),
        "the transfer went through the recorded pipe"
    );
    for bytes in [s_up, s_down, a_up, a_down] {
        assert!(!contains(bytes, needle), "plaintext crossed the relay");
    }
    // The relay passes the TLS bytes on unchanged (after each side's
    // preamble): it holds no key with which it could re-encrypt them.
    let pre = proto::control::PIPE_PREAMBLE_LEN;
    let common = (s_up.len() - pre).min(a_down.len());
    assert!(common > 16 * pattern.len());
    assert_eq!(
        &s_up[pre..pre + common],
        &a_down[..common],
        "relay altered sender->agent bytes"
    );
    let common = (a_up.len() - pre).min(s_down.len());
    assert_eq!(
        &a_up[pre..pre + common],
        &s_down[..common],
        "relay altered agent->sender bytes"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn tokens_are_renewed_before_they_expire() -> Result<()> {
    let relay = Relay::start()?;
    let echo = echo_server().await?;
    let (send, listen) = relay.create_hc("renew", echo)?;
    // Two-second tokens: without renewal the relay detaches both sides after
    // two seconds (it sweeps expired attachments every second).
    let agent = Agent::start(&[&listen], &["--token-ttl", "2"])?;
    agent.wait_connected()?;
    let options = SenderOptions {
        token_ttl: Duration::from_secs(2),
        ..SenderOptions::default()
    };
    let sender = Sender::start(vec![send.clone()], options)?;
    let mut s = sender.open(&send.hc).await?;
    echo_roundtrip(&mut s, b"fresh").await?;
    tokio::time::sleep(Duration::from_secs(7)).await;
    assert_eq!(agent.status()?[0]["connection"]["state"], "connected");
    let mut s = sender.open(&send.hc).await?;
    echo_roundtrip(&mut s, b"after three lifetimes").await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_frozen_agent_leaves_the_rotation_within_the_keepalive_timeout() -> Result<()> {
    let relay = Relay::start()?;
    let echo = echo_server().await?;
    let (send, listen) = relay.create_hc("frozen", echo)?;
    let first = Agent::start(&[&listen], &[])?;
    let second = Agent::start(&[&listen], &[])?;
    first.wait_connected()?;
    second.wait_connected()?;
    let sender = sender(&send);
    wait_for_agents(&sender, &send, 2).await;

    // SIGSTOP: the process and its sockets stay, but it answers nothing, as
    // with a hung host or a silently dropped network path.
    let pid = first.proc.pid().to_string();
    std::process::Command::new("kill")
        .args(["-STOP", &pid])
        .status()?;
    let frozen_at = Instant::now();
    while sender.agents(&send.hc).len() != 1 {
        assert!(
            frozen_at.elapsed() < Duration::from_secs(25),
            "the relay still lists a frozen agent"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let noticed = frozen_at.elapsed();
    eprintln!("frozen agent left the rotation after {noticed:?}");
    // 15 s of silence, plus the moment for the relay to tell the sender.
    assert!(noticed <= Duration::from_secs(16), "{noticed:?}");
    for _ in 0..10 {
        let mut s = sender.open(&send.hc).await?;
        echo_roundtrip(&mut s, b"served by the live one").await?;
    }
    std::process::Command::new("kill")
        .args(["-CONT", &pid])
        .status()?;
    Ok(())
}

/// Deleting a hybrid connection revokes it at the agent over a pipe that
/// stays open (it serves other hybrid connections): twenty hybrid
/// connections share one sender, one agent and one pipe, and are deleted
/// one by one. After each delete, a stream for the deleted one, sent by a
/// sender that ignores the relay's `Detached` (`open_raw` on a route still
/// attached), is refused; the others still open.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn deleting_a_hybrid_connection_revokes_it_on_an_open_pipe_every_time() -> Result<()> {
    const N: usize = 20;
    let relay = Relay::start()?;
    let echo = echo_server().await?;
    let mut sends = Vec::new();
    let mut listens = Vec::new();
    for i in 0..=N {
        let (send, listen) = relay.create_hc(&format!("hc{i}"), echo)?;
        sends.push(send);
        listens.push(listen);
    }
    let agent = Agent::start(&listens.iter().collect::<Vec<_>>(), &[])?;
    agent.wait_connected()?;
    let sender = Sender::start(sends.clone(), SenderOptions::default())?;
    for send in &sends {
        wait_for_agents(&sender, send, 1).await;
        let mut s = sender.open(&send.hc).await?;
        echo_roundtrip(&mut s, b"before").await?;
    }
    // hc0 is never deleted: the route the hostile requests ride on.
    let route = &sends[0].hc;
    for send in &sends[1..] {
        let name = send.hc.as_str();
        relay.hc(&["delete", name])?;
        let request = Bytes::from(format!(r#"{{"hc":"{name}"}}"#));
        let deadline = Instant::now() + Duration::from_secs(3);
        let refused = loop {
            match sender.open_raw(route, request.clone()).await {
                Err(e) if e.refusal_code().is_some() => break e,
                Err(e) => return Err(e).context("the open pipe failed"),
                Ok(_) if Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                Ok(_) => anyhow::bail!("{name} still opens 3 s after it was deleted"),
            }
        };
        assert!(
            matches!(
                refused.refusal_code(),
                Some(RefusalCode::NotAllowed | RefusalCode::UnknownHc)
            ),
            "{name}: {refused}"
        );
        // The pipe and the hybrid connection still there are unharmed.
        let mut s = sender.open(route).await?;
        echo_roundtrip(&mut s, b"after").await?;
    }
    Ok(())
}

/// One pipe carries as many streams as its session window covers; an
/// application that holds more connections to one agent than that gets
/// them on further pipes to the same agent instead of refusals. The
/// sender's window here covers four streams; it holds twelve at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn more_streams_than_one_pipe_carries_go_on_further_pipes() -> Result<()> {
    let relay = Relay::start()?;
    let echo = echo_server().await?;
    let (send, listen) = relay.create_hc("many", echo)?;
    let agent = Agent::start(&[&listen], &[])?;
    agent.wait_connected()?;
    let options = SenderOptions {
        mux: transport::mux::MuxConfig {
            initial_window: proto::mux::BASE_WINDOW,
            max_session_window: 4 * u64::from(proto::mux::BASE_WINDOW),
            ..transport::mux::MuxConfig::default()
        },
        ..SenderOptions::default()
    };
    let sender = Sender::start(vec![send.clone()], options)?;
    let mut held = Vec::new();
    for i in 0..12u32 {
        let mut s = sender
            .open(&send.hc)
            .await
            .with_context(|| format!("stream {i} of 12"))?;
        echo_roundtrip(&mut s, format!("stream {i}").as_bytes()).await?;
        held.push(s);
    }
    // All twelve still work, each on its own stream.
    for (i, s) in held.iter_mut().enumerate() {
        echo_roundtrip(s, format!("again {i}").as_bytes()).await?;
    }
    assert_eq!(sender.open_pipes(), 3, "twelve streams, four per pipe");
    Ok(())
}

/// An agent may count less room on a pipe than its sender does (the two
/// ends' counts drift apart under churn, or their windows differ): a
/// sender refused for room on a pipe passes it over and opens the stream
/// on another, instead of trying the same pipe again. Here the agent's
/// pipes take four streams while the sender counts room for 4,096.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_pipe_the_agent_says_is_full_is_passed_over_for_another() -> Result<()> {
    let relay = Relay::start()?;
    let echo = echo_server().await?;
    let (send, listen) = relay.create_hc("crowd", echo)?;
    let mut options = agent::AgentOptions::new(vec![listen]);
    options.mux = transport::mux::MuxConfig {
        initial_window: proto::mux::BASE_WINDOW,
        max_session_window: 4 * u64::from(proto::mux::BASE_WINDOW),
        ..transport::mux::MuxConfig::default()
    };
    options.policy = agent::policy::Policy::parse(
        hybridlink_tests::TEST_POLICY,
        std::path::Path::new("test-policy.toml"),
    )?;
    let _agent = agent::Agent::start(options)?;
    let sender = Sender::start(vec![send.clone()], SenderOptions::default())?;
    let mut held = Vec::new();
    for i in 0..12u32 {
        let mut s = tokio::time::timeout(Duration::from_secs(10), sender.open(&send.hc))
            .await
            .with_context(|| format!("stream {i} of 12: no answer"))?
            .with_context(|| format!("stream {i} of 12"))?;
        echo_roundtrip(&mut s, format!("stream {i}").as_bytes()).await?;
        held.push(s);
    }
    assert_eq!(sender.open_pipes(), 3, "twelve streams, four per pipe");
    Ok(())
}
