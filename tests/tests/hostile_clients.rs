//! Hostile clients against the real relay (`hybridlink relay serve`): anyone
//! may connect to the relay port, so what a stranger who has proved nothing
//! can make it hold, log or reveal is bounded. Each test repeats one attack
//! through the network and asserts the bound; the legitimate peers are the
//! real `hybridlink agent run` and `hybridlink connect`.
//!
//! Hostile connections come from 127.0.0.2 and up (any 127/8 address is
//! loopback on Linux), so per-address caps they hit do not touch the real
//! peers on 127.0.0.1.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use bytes::BytesMut;
use hybridlink_tests::wire::{read_message, write_message};
use hybridlink_tests::{Agent, Footprint, Relay, binary, echo_server_thread};
use proto::connection_string::ConnectionString;
use proto::control::{Fingerprint, PROTOCOL_VERSION, PeerMessage, PeerRole, RelayMessage};
use proto::key::Key;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio_rustls::client::TlsStream;

/// The relay's `/metrics` text.
fn scrape(addr: &str) -> Result<String> {
    use std::io::{Read, Write};
    let mut conn = std::net::TcpStream::connect(addr)?;
    conn.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")?;
    let mut text = String::new();
    conn.read_to_string(&mut text)?;
    ensure!(text.starts_with("HTTP/1.1 200"), "{text}");
    Ok(text)
}

/// The relay's deadline for the first successful attach after hello.
const ATTACH_DEADLINE: Duration = Duration::from_secs(10);

/// A TCP connection to the relay port from `source` (a loopback address).
async fn tcp_from(source: Ipv4Addr, relay: SocketAddr) -> Result<TcpStream> {
    let socket = TcpSocket::new_v4()?;
    socket.bind(SocketAddr::new(IpAddr::V4(source), 0))?;
    Ok(socket.connect(relay).await?)
}

/// A control channel (TLS, relay pinned) from `source`, nothing said yet.
async fn control_from(
    source: Ipv4Addr,
    relay: &Relay,
    cs: &ConnectionString,
) -> Result<TlsStream<TcpStream>> {
    let pin = Fingerprint(cs.cert_sha256.context("pinned string")?);
    let config = transport::tls::relay_client_config(pin)?;
    let tcp = tcp_from(source, relay.listen).await?;
    let name = rustls::pki_types::ServerName::try_from("localhost")?;
    Ok(tokio_rustls::TlsConnector::from(config)
        .connect(name, tcp)
        .await?)
}

fn hello(role: PeerRole, label: &str) -> Result<PeerMessage> {
    Ok(PeerMessage::Hello {
        version: PROTOCOL_VERSION,
        role,
        identity: Fingerprint([7; 32]),
        label: label.parse()?,
    })
}

/// A control channel that said hello and was welcomed.
async fn welcomed(
    source: Ipv4Addr,
    relay: &Relay,
    cs: &ConnectionString,
    role: PeerRole,
) -> Result<(TlsStream<TcpStream>, BytesMut)> {
    let mut tls = control_from(source, relay, cs).await?;
    write_message(&mut tls, &hello(role, "hostile")?).await?;
    let mut buf = BytesMut::new();
    match read_message::<RelayMessage, _>(&mut tls, &mut buf).await? {
        Some(RelayMessage::Welcome { .. }) => Ok((tls, buf)),
        other => bail!("relay answered hello with {other:?}"),
    }
}

/// Whether the relay closes `conn` (EOF or reset) within `within`.
/// A token expiry ten minutes from now, in Unix seconds.
fn ten_minutes_from_now() -> Result<u64> {
    Ok(std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_secs()
        + 600)
}

async fn closed_within<R: AsyncRead + Unpin>(conn: &mut R, within: Duration) -> bool {
    let mut sink = [0u8; 4096];
    let ended = async {
        loop {
            match conn.read(&mut sink).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    };
    tokio::time::timeout(within, ended).await.is_ok()
}

/// `hybridlink connect --check` through the relay: the legitimate path.
fn check(cs: &ConnectionString) -> Result<()> {
    let out = Command::new(binary())
        .args(["connect", "--check", "--wait", "10", &cs.to_string()])
        .output()?;
    ensure!(
        out.status.success(),
        "connect --check failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sessions_that_never_attach_are_closed_by_the_deadline() -> Result<()> {
    let relay = Relay::start()?;
    let (send, _listen) = relay.create_hc("deadline", echo_server_thread()?)?;
    // Beside them, connections that never finish the handshake: silent TCP,
    // and TLS with no hello. The handshake deadline (10 s from accept) ends
    // those.
    let started = Instant::now();
    let mut silent = tcp_from(Ipv4Addr::new(127, 0, 0, 6), relay.listen).await?;
    let mut mute = control_from(Ipv4Addr::new(127, 0, 0, 6), &relay, &send).await?;
    let handshakes = tokio::spawn(async move {
        let within = ATTACH_DEADLINE + Duration::from_secs(2);
        closed_within(&mut silent, within).await && closed_within(&mut mute, within).await
    });
    // Each session answers the relay's keep-alives, so only the attach
    // deadline can end it (the idle timeout of 15 s never does).
    let mut sessions = tokio::task::JoinSet::new();
    for i in 0..20u8 {
        let (mut tls, mut buf) = welcomed(
            Ipv4Addr::new(127, 0, 0, 2 + i % 4),
            &relay,
            &send,
            PeerRole::Sender,
        )
        .await?;
        sessions.spawn(async move {
            loop {
                match read_message::<RelayMessage, _>(&mut tls, &mut buf).await {
                    Ok(Some(RelayMessage::Ping { nonce })) => {
                        let _ = write_message(&mut tls, &PeerMessage::Pong { nonce }).await;
                        let _ = write_message(&mut tls, &PeerMessage::Ping { nonce }).await;
                    }
                    Ok(Some(RelayMessage::Bye { message })) => return Some(message),
                    Ok(Some(_)) => {}
                    Ok(None) | Err(_) => return None,
                }
            }
        });
    }
    let all = async {
        let mut byes = Vec::new();
        while let Some(bye) = sessions.join_next().await {
            byes.push(bye?);
        }
        Ok::<_, anyhow::Error>(byes)
    };
    let byes = tokio::time::timeout(ATTACH_DEADLINE + Duration::from_secs(4), all)
        .await
        .context("sessions that never attached were still open 14 s after hello")??;
    ensure!(
        started.elapsed() >= ATTACH_DEADLINE - Duration::from_secs(1),
        "closed after {:?}, before the deadline",
        started.elapsed()
    );
    for bye in byes {
        let bye = bye.context("closed without a Bye")?;
        ensure!(
            bye.contains("no hybrid connection attached within"),
            "{bye}"
        );
    }
    ensure!(
        handshakes.await?,
        "a connection that never said hello outlived the handshake deadline"
    );
    // A session that attaches is not touched by the deadline.
    let (mut tls, mut buf) =
        welcomed(Ipv4Addr::new(127, 0, 0, 2), &relay, &send, PeerRole::Sender).await?;
    let expiry = ten_minutes_from_now()?;
    write_message(
        &mut tls,
        &PeerMessage::Attach {
            hc: send.hc.clone(),
            token: send.token(expiry),
        },
    )
    .await?;
    let until = Instant::now() + ATTACH_DEADLINE + Duration::from_secs(3);
    while Instant::now() < until {
        let msg = tokio::time::timeout(
            Duration::from_secs(6),
            read_message::<RelayMessage, _>(&mut tls, &mut buf),
        )
        .await
        .context("relay silent")??;
        match msg {
            Some(RelayMessage::Ping { nonce }) => {
                write_message(&mut tls, &PeerMessage::Pong { nonce }).await?
            }
            Some(RelayMessage::Bye { message }) => {
                bail!("an attached session was closed: {message}")
            }
            None => bail!("an attached session was closed"),
            Some(_) => {}
        }
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_per_address_cap_closes_the_next_stranger_and_real_peers_go_on() -> Result<()> {
    const CAP: usize = 8;
    let dir = tempfile::tempdir()?;
    let metrics = format!(
        "127.0.0.1:{}",
        std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port()
    );
    let relay = Relay::start_with(
        dir.path(),
        "127.0.0.1:0",
        &[
            "--max-unauthenticated-per-ip",
            &CAP.to_string(),
            "--metrics",
            &metrics,
        ],
    )?;
    let (send, listen) = relay.create_hc("capped", echo_server_thread()?)?;
    let agent = tokio::task::spawn_blocking(move || -> Result<Agent> {
        let agent = Agent::start(&[&listen], &[])?;
        agent.wait_connected()?;
        Ok(agent)
    })
    .await??;

    // CAP strangers from one address: plain TCP, saying nothing.
    let stranger = Ipv4Addr::new(127, 0, 0, 2);
    let mut held = Vec::new();
    for _ in 0..CAP {
        held.push(tcp_from(stranger, relay.listen).await?);
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    for conn in &mut held {
        ensure!(
            !closed_within(conn, Duration::from_millis(50)).await,
            "a connection within the cap was closed"
        );
    }
    // The next one from that address is closed at once.
    for _ in 0..3 {
        let mut extra = tcp_from(stranger, relay.listen).await?;
        ensure!(
            closed_within(&mut extra, Duration::from_secs(2)).await,
            "connection {} from one address was not closed at once",
            CAP + 1
        );
    }
    let text = scrape(&metrics)?;
    ensure!(
        text.lines().any(|l| l == "hybridlink_relay_refused_total{reason=\"unauthenticated_per_ip_cap\"} 3"),
        "the refusals were not counted:\n{text}"
    );
    // Real peers, authenticated or about to be, from another address.
    let send2 = send.clone();
    tokio::task::spawn_blocking(move || check(&send2)).await??;
    ensure!(
        agent.status()?[0]["connection"]["state"] == "connected",
        "the agent lost its attachment"
    );
    // With the strangers gone, their address may connect again.
    drop(held);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut again = tcp_from(stranger, relay.listen).await?;
    ensure!(
        !closed_within(&mut again, Duration::from_millis(500)).await,
        "the address was still refused after its connections closed"
    );
    Ok(())
}

/// Opens `CONNECTIONS` control channels that say hello, announce a message
/// of `announced` bytes and send one byte of it per second; returns the
/// relay's growth per connection in bytes, (resident, allocated), measured
/// 3 s in.
async fn slow_strangers(announced: u32) -> Result<(u64, u64)> {
    const CONNECTIONS: usize = 200;
    let relay = Relay::start()?;
    let (send, _listen) = relay.create_hc("memory", echo_server_thread()?)?;
    let pid = relay.proc.pid();
    // Warm up: the relay has served a control channel once.
    drop(welcomed(Ipv4Addr::new(127, 0, 0, 2), &relay, &send, PeerRole::Sender).await?);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let before = Footprint::of(pid)?;
    // 25 per source address, under the default per-address cap.
    let mut slow = tokio::task::JoinSet::new();
    for i in 0..CONNECTIONS {
        let source = Ipv4Addr::new(127, 0, 0, 2 + (i / 25) as u8);
        let (mut tls, _) = welcomed(source, &relay, &send, PeerRole::Sender).await?;
        tls.write_all(&announced.to_be_bytes()).await?;
        tls.flush().await?;
        slow.spawn(async move {
            for _ in 0..8 {
                if tls.write_all(b"{").await.is_err() || tls.flush().await.is_err() {
                    return;
                }
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        });
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    let during = Footprint::of(pid)?;
    slow.abort_all();
    let each = |before: u64, during: u64| during.saturating_sub(before) * 1024 / CONNECTIONS as u64;
    let (rss, data) = (
        each(before.rss_kib, during.rss_kib),
        each(before.data_kib, during.data_kib),
    );
    eprintln!(
        "announcing {announced} bytes: relay VmRSS {} -> {} KiB, VmData {} -> {} KiB with {CONNECTIONS} slow strangers: {rss} resident and {data} allocated bytes each",
        before.rss_kib, during.rss_kib, before.data_kib, during.data_kib
    );
    Ok((rss, data))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn slow_strangers_announcing_a_megabyte_cost_the_relay_little_memory() -> Result<()> {
    // The attack: a megabyte announced, a byte a second.
    let (rss, data) = slow_strangers(1 << 20).await?;
    ensure!(
        rss < 16 * 1024,
        "each slow unauthenticated connection grew the relay's resident memory by {rss} bytes"
    );
    ensure!(
        data < 64 * 1024,
        "each slow unauthenticated connection made the relay allocate {data} bytes"
    );
    // Within the limit before attachment the relay keeps the connection
    // (until the attach deadline) and holds only what arrived, besides the
    // connection's TLS and session state: about 16 KiB, of which 4 KiB is
    // rustls's record buffer, 2 KiB the session's outgoing queue and 1 KiB
    // the read buffer.
    let (rss, data) = slow_strangers(4 << 10).await?;
    ensure!(
        rss < 24 * 1024 && data < 24 * 1024,
        "each slow unauthenticated connection within the limit costs the relay {rss} resident and {data} allocated bytes"
    );
    Ok(())
}

/// Bytes and lines of a log file.
fn log_size(path: &Path) -> Result<(usize, usize)> {
    let bytes = std::fs::read(path)?;
    Ok((bytes.len(), bytes.iter().filter(|b| **b == b'\n').count()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_megabyte_label_of_escapes_neither_floods_nor_forges_the_log() -> Result<()> {
    let logs = tempfile::tempdir()?;
    let log = logs.path().join("relay.log");
    let relay = Relay::start_with_log(&[], &log)?;
    let (send, _listen) = relay.create_hc("labels", echo_server_thread()?)?;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (bytes_before, lines_before) = log_size(&log)?;

    // 1 MB of newlines, forged log lines and ANSI escapes (clear screen,
    // set the terminal title) in the label of a hello: 1 MB once encoded,
    // under the 1 MiB that any control message may have.
    let unit = "\n2026-01-01T00:00:00Z  INFO relay: admin logged in\u{1b}[2J\u{1b}]0;pwned\u{7}";
    let encoded = serde_json::to_string(unit)?.len() - 2;
    let evil = unit.repeat(1_000_000 / encoded);
    const HELLOS: usize = 20;
    for i in 0..HELLOS {
        let mut tls =
            control_from(Ipv4Addr::new(127, 0, 0, 2 + (i % 4) as u8), &relay, &send).await?;
        let hello = serde_json::json!({
            "type": "hello", "version": PROTOCOL_VERSION, "role": "sender",
            "identity": "00".repeat(32), "label": evil,
        });
        // The relay may close while we still write: that is the point.
        let _ = write_message(&mut tls, &hello).await;
        closed_within(&mut tls, Duration::from_secs(12)).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;

    let (bytes_after, lines_after) = log_size(&log)?;
    let (grew, new_lines) = (bytes_after - bytes_before, lines_after - lines_before);
    let text = std::fs::read(&log)?;
    ensure!(
        new_lines <= 2 * HELLOS,
        "{HELLOS} hostile hellos wrote {new_lines} log lines"
    );
    ensure!(
        grew <= 1024 * HELLOS,
        "{HELLOS} hostile hellos grew the log by {grew} bytes"
    );
    ensure!(
        !String::from_utf8_lossy(&text)
            .lines()
            .any(|l| l.starts_with("2026-01-01")),
        "a forged line reached the log"
    );

    // A short label with the same bytes fits any size cap: it is refused
    // for what it is, saying so.
    let mut tls = control_from(Ipv4Addr::new(127, 0, 0, 2), &relay, &send).await?;
    let short: String = evil.chars().take(120).collect();
    write_message(
        &mut tls,
        &serde_json::json!({
            "type": "hello", "version": PROTOCOL_VERSION, "role": "sender",
            "identity": "00".repeat(32), "label": short,
        }),
    )
    .await?;
    let mut buf = BytesMut::new();
    match read_message::<RelayMessage, _>(&mut tls, &mut buf).await? {
        Some(RelayMessage::Bye { message }) => ensure!(
            message.contains("label") && !message.contains('\u{1b}') && !message.contains("admin"),
            "{message}"
        ),
        other => bail!("a label with escapes was answered with {other:?}"),
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    ensure!(
        !std::fs::read(&log)?.contains(&0x1b),
        "an escape byte reached the relay's log"
    );
    Ok(())
}

/// Attaches (or describes) with `cs`'s token on a fresh channel; returns the
/// relay's refusal.
async fn refusal(
    relay: &Relay,
    cs: &ConnectionString,
    role: PeerRole,
    describe: bool,
) -> Result<(String, String)> {
    let (mut tls, mut buf) = welcomed(Ipv4Addr::new(127, 0, 0, 2), relay, cs, role).await?;
    let expiry = ten_minutes_from_now()?;
    let (hc, token) = (cs.hc.clone(), cs.token(expiry));
    let msg = if describe {
        PeerMessage::Describe { hc, token }
    } else {
        PeerMessage::Attach { hc, token }
    };
    write_message(&mut tls, &msg).await?;
    loop {
        match read_message::<RelayMessage, _>(&mut tls, &mut buf).await? {
            Some(RelayMessage::Detached {
                reason, message, ..
            }) => {
                return Ok((
                    serde_json::to_string(&reason)?,
                    message.replace(cs.hc.as_str(), "NAME"),
                ));
            }
            Some(RelayMessage::Ping { .. }) => {}
            other => bail!("expected a refusal, got {other:?}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_unknown_name_and_a_wrong_key_get_the_same_answer() -> Result<()> {
    let logs = tempfile::tempdir()?;
    let log = logs.path().join("relay.log");
    let relay = Relay::start_with_log(&[], &log)?;
    let (send, listen) = relay.create_hc("payroll", echo_server_thread()?)?;
    let forged = |cs: &ConnectionString, name: &str| -> Result<ConnectionString> {
        let mut cs = cs.clone();
        cs.key = Key::generate()?;
        cs.hc = name.parse()?;
        Ok(cs)
    };
    for (cs, role, describe) in [
        (&send, PeerRole::Sender, false),
        (&listen, PeerRole::Agent, false),
        (&listen, PeerRole::Agent, true),
    ] {
        // Same length, so not even the message length differs.
        let wrong_key = refusal(&relay, &forged(cs, "payroll")?, role, describe).await?;
        let unknown = refusal(&relay, &forged(cs, "bonuses")?, role, describe).await?;
        ensure!(
            wrong_key == unknown,
            "a stranger can tell names apart: wrong key {wrong_key:?}, unknown name {unknown:?}"
        );
        ensure!(
            wrong_key.1.contains("the token was not accepted for NAME"),
            "{wrong_key:?}"
        );
    }
    // The relay's own log still says which it was.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let text = std::fs::read_to_string(&log)?;
    ensure!(text.contains("no such hybrid connection"), "{text}");
    ensure!(
        text.contains("token was signed with a key this relay does not hold"),
        "{text}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_stranger_cannot_try_tokens_without_end() -> Result<()> {
    let logs = tempfile::tempdir()?;
    let log = logs.path().join("relay.log");
    let relay = Relay::start_with_log(&[], &log)?;
    let (send, _listen) = relay.create_hc("payroll", echo_server_thread()?)?;
    let mut forged = send.clone();
    forged.key = Key::generate()?;
    let (mut tls, mut buf) =
        welcomed(Ipv4Addr::new(127, 0, 0, 2), &relay, &send, PeerRole::Sender).await?;
    let expiry = ten_minutes_from_now()?;
    // Each refusal is a log line on the relay: a guesser gets 64 of them
    // per channel, then the channel is closed.
    for _ in 0..200 {
        let attach = PeerMessage::Attach {
            hc: forged.hc.clone(),
            token: forged.token(expiry),
        };
        if write_message(&mut tls, &attach).await.is_err() {
            break;
        }
    }
    let bye = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            match read_message::<RelayMessage, _>(&mut tls, &mut buf).await {
                Ok(Some(RelayMessage::Bye { message })) => return Some(message),
                Ok(Some(_)) => {}
                Ok(None) | Err(_) => return None,
            }
        }
    })
    .await
    .context("200 refused tokens and the channel is still open")?;
    let bye = bye.context("closed without a Bye")?;
    ensure!(
        bye.contains("tokens presented on this channel and none attached"),
        "{bye}"
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    let rejected = std::fs::read_to_string(&log)?
        .lines()
        .filter(|l| l.contains("token rejected"))
        .count();
    ensure!(rejected <= 64, "{rejected} refusals logged for one channel");
    Ok(())
}

/// An attached agent whose process stops reading its socket, while it
/// still sends keep-alives of its own (so the relay keeps hearing from
/// it): the relay notices its own keep-alives go unanswered and closes the
/// session, which takes the agent out of the rotation, within one
/// keep-alive interval plus the idle timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_agent_that_stops_reading_leaves_the_rotation_within_the_keepalive_timeout() -> Result<()>
{
    const KEEPALIVE: Duration = Duration::from_secs(5);
    const IDLE: Duration = Duration::from_secs(15);
    let relay = Relay::start()?;
    let (_send, listen) = relay.create_hc("stuck", echo_server_thread()?)?;
    let (mut tls, mut buf) = welcomed(
        Ipv4Addr::new(127, 0, 0, 3),
        &relay,
        &listen,
        PeerRole::Agent,
    )
    .await?;
    write_message(
        &mut tls,
        &PeerMessage::Attach {
            hc: listen.hc.clone(),
            token: listen.token(ten_minutes_from_now()?),
        },
    )
    .await?;
    loop {
        match read_message::<RelayMessage, _>(&mut tls, &mut buf).await? {
            Some(RelayMessage::Attached { .. }) => break,
            Some(RelayMessage::Ping { nonce }) => {
                write_message(&mut tls, &PeerMessage::Pong { nonce }).await?
            }
            Some(RelayMessage::Detached { message, .. }) => bail!("not attached: {message}"),
            other => bail!("unexpected {other:?}"),
        }
    }
    let agents = || -> Result<usize> {
        let status = relay.hc(&["status", "stuck"])?;
        Ok(status["listeners"].as_array().map_or(0, Vec::len))
    };
    ensure!(agents()? == 1, "the agent is not in the rotation");

    // From here on: a keep-alive every second, and not one byte read.
    let stopped = Instant::now();
    let (_unread, mut writer) = tokio::io::split(tls);
    let pinger = tokio::spawn(async move {
        for nonce in 1.. {
            let mut out = BytesMut::new();
            proto::control::encode(&PeerMessage::Ping { nonce }, &mut out);
            if writer.write_all(&out).await.is_err() {
                return;
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    });
    let limit = KEEPALIVE + IDLE + Duration::from_secs(3);
    while agents()? == 1 {
        ensure!(
            stopped.elapsed() < limit,
            "a session that reads nothing was still in the rotation {limit:?} after it stopped"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    // It was the unanswered keep-alive that ended it, not silence.
    ensure!(
        stopped.elapsed() >= IDLE - Duration::from_secs(1),
        "closed after {:?}, before a keep-alive could go unanswered",
        stopped.elapsed()
    );
    pinger.abort();
    Ok(())
}

/// Starts `sessions` sender sessions holding `cs` (each claiming its own
/// identity) that send `requests` pipe requests each, as fast as the relay
/// reads them, for 15 s, and never come to their end of a pipe. Each
/// task's result is how many requests the relay refused.
async fn flood(
    relay: &Relay,
    cs: &ConnectionString,
    sessions: u8,
    requests: u64,
) -> Result<tokio::task::JoinSet<u32>> {
    let mut floods = tokio::task::JoinSet::new();
    for i in 0..sessions {
        let mut tls = control_from(Ipv4Addr::new(127, 0, 0, 7), relay, cs).await?;
        let hello = PeerMessage::Hello {
            version: PROTOCOL_VERSION,
            role: PeerRole::Sender,
            identity: Fingerprint([0x80 + i; 32]),
            label: "flood".parse()?,
        };
        write_message(&mut tls, &hello).await?;
        let attach = PeerMessage::Attach {
            hc: cs.hc.clone(),
            token: cs.token(ten_minutes_from_now()?),
        };
        write_message(&mut tls, &attach).await?;
        floods.spawn(async move {
            let mut buf = BytesMut::new();
            let mut agent = None;
            let mut failed = 0u32;
            let mut sent = 0u64;
            let until = Instant::now() + Duration::from_secs(15);
            while Instant::now() < until {
                let next = tokio::time::timeout(
                    Duration::from_millis(20),
                    read_message::<RelayMessage, _>(&mut tls, &mut buf),
                )
                .await;
                match next {
                    Ok(Ok(Some(RelayMessage::Agents { agents, .. }))) => {
                        agent = agents.first().map(|a| a.id);
                    }
                    Ok(Ok(Some(RelayMessage::Ping { nonce }))) => {
                        let _ = write_message(&mut tls, &PeerMessage::Pong { nonce }).await;
                    }
                    Ok(Ok(Some(RelayMessage::PipeFailed { .. }))) => failed += 1,
                    Ok(Ok(None)) | Ok(Err(_)) => break,
                    _ => {}
                }
                if let Some(agent) = agent
                    && sent < requests
                {
                    for _ in 0..50 {
                        sent += 1;
                        let request = PeerMessage::PipeRequest {
                            request_id: sent,
                            agent,
                        };
                        if write_message(&mut tls, &request).await.is_err() {
                            return failed;
                        }
                    }
                }
            }
            failed
        });
    }
    Ok(floods)
}

/// A tenant holding only one hybrid connection's send key floods the relay
/// with pipe requests for the agent it shares with another tenant, from
/// many sessions each claiming its own identity, and never comes to its end
/// of a pipe. The relay caps each session's pending tickets and the agent
/// caps pipe set-ups per hybrid connection, so the agent's sockets stay
/// few and the other tenant's connections on the same agent keep working.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_tenant_flooding_pipe_requests_leaves_the_other_tenants_working() -> Result<()> {
    let relay = Relay::start()?;
    let (flooded_send, flooded_listen) = relay.create_hc("flooded", echo_server_thread()?)?;
    let (quiet_send, quiet_listen) = relay.create_hc("quiet", echo_server_thread()?)?;
    let agent = Agent::start(&[&flooded_listen, &quiet_listen], &[])?;
    agent.wait_connected()?;
    let agent_pid = agent.proc.pid();
    let baseline = Footprint::of(agent_pid)?.fds;

    let mut floods = flood(&relay, &flooded_send, 10, 300).await?;
    // While the flood goes on, the other tenant connects, again and again.
    let mut most_fds = baseline;
    for _ in 0..5 {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let quiet = quiet_send.clone();
        tokio::task::spawn_blocking(move || check(&quiet))
            .await?
            .context("the quiet tenant's connection failed during the flood")?;
        most_fds = most_fds.max(Footprint::of(agent_pid)?.fds);
    }
    let mut refused = 0;
    while let Some(failed) = floods.join_next().await {
        refused += failed?;
    }
    // 3,000 requests: the relay refused most of them (64 pending tickets a
    // session), and the agent never held more than its per-hybrid-
    // connection share of pipe set-ups on top of its baseline.
    ensure!(
        refused >= 2000,
        "the relay refused only {refused} of 3000 flood requests"
    );
    ensure!(
        most_fds <= baseline + 32 + 16,
        "the agent went from {baseline} to {most_fds} open files under the flood"
    );
    Ok(())
}

/// A tenant holding one hybrid connection's send key asks for pipes from
/// many sessions and never uses them. Without a quota per hybrid
/// connection its pending tickets would fill the relay-wide limit, and
/// every other tenant's next pipe would be refused; with one, it fills only
/// its own.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_tenant_cannot_take_the_whole_relays_pipe_quota() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let relay = Relay::start_with(
        dir.path(),
        "127.0.0.1:0",
        &["--max-pipes", "40", "--max-pipes-per-hc", "10"],
    )?;
    ensure!(
        relay.ready["max_pipes_per_hc"] == 10,
        "ready line: {}",
        relay.ready
    );
    let (flooded_send, flooded_listen) = relay.create_hc("flooded", echo_server_thread()?)?;
    let (quiet_send, quiet_listen) = relay.create_hc("quiet", echo_server_thread()?)?;
    let agent = Agent::start(&[&flooded_listen, &quiet_listen], &[])?;
    agent.wait_connected()?;
    // Five sessions may hold 64 pending tickets each: far more than 40.
    let mut floods = flood(&relay, &flooded_send, 5, 100).await?;
    for _ in 0..4 {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let quiet = quiet_send.clone();
        tokio::task::spawn_blocking(move || check(&quiet))
            .await?
            .context("the quiet tenant was refused a pipe during the flood")?;
    }
    let mut refused = 0;
    while let Some(failed) = floods.join_next().await {
        refused += failed?;
    }
    ensure!(
        refused >= 490 - 10,
        "the relay refused only {refused} of 500 requests of a hybrid connection allowed 10 pipes"
    );
    Ok(())
}

/// A relay that may open only 256 files: it fits its quotas to that limit
/// (and says so in its ready line), so strangers holding connections from
/// several addresses are refused by the caps instead of exhausting the
/// files, and a legitimate `connect --check` still gets through.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn at_its_open_files_limit_the_relay_still_serves_legitimate_peers() -> Result<()> {
    const OPEN_FILES: u64 = 256;
    let relay = Relay::start_with_open_files(OPEN_FILES)?;
    let max_pipes = relay.ready["max_pipes"].as_u64().context("max_pipes")?;
    let max_unauthenticated = relay.ready["max_unauthenticated"]
        .as_u64()
        .context("max_unauthenticated")?;
    ensure!(
        max_unauthenticated + 6 * max_pipes < OPEN_FILES,
        "quotas of {max_unauthenticated} strangers and {max_pipes} pipes do not fit {OPEN_FILES} files"
    );
    let (send, listen) = relay.create_hc("crowded", echo_server_thread()?)?;
    let agent = Agent::start(&[&listen], &[])?;
    agent.wait_connected()?;
    // 300 connections that say nothing, from five addresses: more than the
    // relay could hold open.
    let mut idle = Vec::new();
    for i in 0..300u16 {
        let source = Ipv4Addr::new(127, 0, 0, 10 + (i % 5) as u8);
        if let Ok(conn) = tcp_from(source, relay.listen).await {
            idle.push(conn);
        }
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let relay_files = Footprint::of(relay.proc.pid())?.fds;
    ensure!(
        relay_files < OPEN_FILES as usize - 32,
        "the relay holds {relay_files} files"
    );
    let send2 = send.clone();
    tokio::task::spawn_blocking(move || check(&send2))
        .await?
        .context("a legitimate peer could not get through")?;
    drop(idle);
    Ok(())
}

/// A send key's holder signs a token valid until the year 5138 (a token
/// that, once stolen, would open the hybrid connection for ever): the
/// relay refuses it and says how long it accepts; one made for an hour
/// attaches. `--max-token-lifetime` lowers the cap.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_token_valid_for_centuries_is_refused() -> Result<()> {
    let logs = tempfile::tempdir()?;
    let relay = Relay::start_with_log(
        &["--max-token-lifetime", "7200"],
        &logs.path().join("relay.log"),
    )?;
    let (send, _listen) = relay.create_hc("forever", echo_server_thread()?)?;
    let attach = |expiry: u64| PeerMessage::Attach {
        hc: send.hc.clone(),
        token: send.token(expiry),
    };
    let now = ten_minutes_from_now()? - 600;
    for (expiry, accepted) in [
        (99_999_999_999, false),
        (now + 7300, false),
        (now + 3600, true),
    ] {
        let (mut tls, mut buf) =
            welcomed(Ipv4Addr::new(127, 0, 0, 2), &relay, &send, PeerRole::Sender).await?;
        write_message(&mut tls, &attach(expiry)).await?;
        let answer = loop {
            match read_message::<RelayMessage, _>(&mut tls, &mut buf).await? {
                Some(RelayMessage::Ping { .. }) => {}
                other => break other,
            }
        };
        match (answer, accepted) {
            (Some(RelayMessage::Attached { .. }), true) => {}
            (Some(RelayMessage::Detached { message, .. }), false) => {
                ensure!(
                    message.contains("longer than the 7200 s this relay accepts"),
                    "{message}"
                );
            }
            (other, _) => bail!("token until {expiry}: {other:?}"),
        }
    }
    Ok(())
}

/// Whether `tls` receives a node list within `within`: the list, or `None`
/// when the time ran out or the relay closed first.
async fn nodes_within(
    tls: &mut TlsStream<TcpStream>,
    buf: &mut BytesMut,
    within: Duration,
) -> Result<Option<Vec<String>>> {
    let read = async {
        loop {
            match read_message::<RelayMessage, _>(tls, buf).await {
                Ok(Some(RelayMessage::Nodes { nodes, .. })) => return Some(nodes),
                Ok(Some(_)) => {}
                Ok(None) | Err(_) => return None,
            }
        }
    };
    Ok(tokio::time::timeout(within, read).await.unwrap_or(None))
}

/// The node list names the addresses of every relay node, so a relay
/// tells it only to a peer whose token verified: a stranger who offers
/// the ALPN id of the list and says hello, with no token or a wrong one,
/// is never told it; a peer with a good token is, at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_node_list_goes_only_to_a_peer_whose_token_verified() -> Result<()> {
    let Some(etcd) = hybridlink_tests::etcd::Etcd::start()? else {
        return Ok(());
    };
    let dir = tempfile::tempdir()?;
    let relay = Relay::start_with(dir.path(), "127.0.0.1:0", &["--registry", &etcd.url()])?;
    let (send, listen) = relay.create_hc("payroll", echo_server_thread()?)?;
    let listed = relay.listen.to_string();
    hybridlink_tests::wait_for("the relay listing itself", 10, || {
        Ok(hybridlink_tests::cluster::nodes_of(&relay)? == [listed.clone()])
    })?;
    let quiet = Duration::from_secs(2);
    let stranger = Ipv4Addr::new(127, 0, 0, 2);

    // No token at all: hello, then silence.
    let (mut tls, mut buf) = welcomed(stranger, &relay, &send, PeerRole::Sender).await?;
    ensure!(
        tls.get_ref().1.alpn_protocol() == Some(proto::control::NODES_ALPN),
        "the relay did not select the node list's ALPN id"
    );
    let told = nodes_within(&mut tls, &mut buf, quiet).await?;
    ensure!(told.is_none(), "told a peer with no token: {told:?}");

    // A wrong key, as a sender and as an agent: refused, and not told.
    for (cs, role) in [(&send, PeerRole::Sender), (&listen, PeerRole::Agent)] {
        let mut forged = cs.clone();
        forged.key = Key::generate()?;
        let (mut tls, mut buf) = welcomed(stranger, &relay, &forged, role).await?;
        let attach = PeerMessage::Attach {
            hc: forged.hc.clone(),
            token: forged.token(ten_minutes_from_now()?),
        };
        write_message(&mut tls, &attach).await?;
        let told = nodes_within(&mut tls, &mut buf, quiet).await?;
        ensure!(told.is_none(), "told a {role:?} with a wrong key: {told:?}");
    }

    // The listen key: told the list.
    let (mut tls, mut buf) = welcomed(stranger, &relay, &listen, PeerRole::Agent).await?;
    let attach = PeerMessage::Attach {
        hc: listen.hc.clone(),
        token: listen.token(ten_minutes_from_now()?),
    };
    write_message(&mut tls, &attach).await?;
    let told = nodes_within(&mut tls, &mut buf, Duration::from_secs(5)).await?;
    ensure!(
        told == Some(vec![listed.clone()]),
        "a peer with a good token was not told the list: {told:?}"
    );
    Ok(())
}
