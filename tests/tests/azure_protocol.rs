//! Azure Relay's own clients against the relay: `tests/azure/check.js` runs
//! a real `hyco-ws` listener and senders (npm, pinned in
//! `tests/azure/package-lock.json`) through a relay started here, trusting
//! its self-signed certificate through `NODE_EXTRA_CA_CERTS`.
//!
//! Without node it skips, unless HYBRIDLINK_REQUIRE_TOOLS is set (as in
//! CI). `npm ci` runs first when `tests/azure/node_modules` is missing.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use hybridlink_tests::Relay;

/// The node script may take this long before it is killed.
const DEADLINE: Duration = Duration::from_secs(120);

#[test]
fn hyco_ws_listener_and_senders_talk_through_the_relay() -> Result<()> {
    let node = Command::new("node").arg("--version").output();
    if !node.is_ok_and(|o| o.status.success()) {
        ensure!(
            std::env::var_os("HYBRIDLINK_REQUIRE_TOOLS").is_none(),
            "node is missing (apt-get install nodejs npm)"
        );
        eprintln!("SKIP: node is missing");
        return Ok(());
    }
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("azure");
    if !dir.join("node_modules/hyco-ws").exists() {
        let status = Command::new("npm")
            .args(["ci", "--no-audit", "--no-fund", "--loglevel=error"])
            .current_dir(&dir)
            .status()
            .context("running npm ci in tests/azure")?;
        ensure!(status.success(), "npm ci in tests/azure failed");
    }

    let relay = Relay::start()?;
    let (send, listen) = relay.create_hc("payroll", "127.0.0.1:9".parse()?)?;
    let wrong = proto::key::Key::generate()?;
    let mut child = Command::new("node")
        .arg("check.js")
        .current_dir(&dir)
        .env("NODE_EXTRA_CA_CERTS", relay.data_dir.join("cert.pem"))
        .env("RELAY", format!("127.0.0.1:{}", relay.listen.port()))
        .env("HC", "payroll")
        .env("SEND_KEY", send.key.as_str())
        .env("LISTEN_KEY", listen.key.as_str())
        .env("WRONG_KEY", wrong.as_str())
        .spawn()
        .context("starting node")?;
    let started = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break status;
        }
        if started.elapsed() > DEADLINE {
            let _ = child.kill();
            let _ = child.wait();
            anyhow::bail!("check.js did not finish within {DEADLINE:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    ensure!(
        status.success(),
        "the hyco-ws checks failed ({status}); their output is above"
    );
    Ok(())
}

/// A WebSocket client of our own (hyco-ws's `ws` answers a Close by itself,
/// so it cannot show a half-close): a TLS connection pinned to the relay's
/// certificate and an upgrade request for `target`.
mod client {
    use anyhow::{Context, Result, ensure};
    use fastwebsockets::{Role, WebSocket};
    use proto::control::Fingerprint;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpStream;
    use tokio_rustls::client::TlsStream;

    pub type Ws = WebSocket<TlsStream<TcpStream>>;

    pub async fn open(
        relay: std::net::SocketAddr,
        cert: [u8; 32],
        target: &str,
        headers: &[(&str, &str)],
    ) -> Result<Ws> {
        let tcp = TcpStream::connect(relay).await?;
        let config = transport::tls::relay_client_config(Fingerprint(cert))?;
        let mut tls = tokio_rustls::TlsConnector::from(config)
            .connect("localhost".try_into()?, tcp)
            .await?;
        let mut head = format!(
            "GET {target} HTTP/1.1\r\nHost: localhost:{}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n",
            relay.port()
        );
        for (name, value) in headers {
            head.push_str(&format!("{name}: {value}\r\n"));
        }
        head.push_str("\r\n");
        tls.write_all(head.as_bytes()).await?;
        // Byte by byte, so that no frame after the head is read with it.
        let mut answer = Vec::new();
        while !answer.ends_with(b"\r\n\r\n") {
            ensure!(answer.len() < 8192, "answer head too long");
            answer.push(tls.read_u8().await.context("reading the answer head")?);
        }
        let answer = String::from_utf8_lossy(&answer);
        ensure!(answer.starts_with("HTTP/1.1 101"), "not upgraded: {answer}");
        Ok(WebSocket::after_handshake(tls, Role::Client))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_half_close_passes_through_the_relay() -> Result<()> {
    use fastwebsockets::{Frame, OpCode, Payload, WebSocketError};

    let relay = tokio::task::spawn_blocking(Relay::start).await??;
    let (send, listen) = relay.create_hc("payroll", "127.0.0.1:9".parse()?)?;
    let cert = send
        .cert_sha256
        .context("strings carry the certificate hash")?;
    let expiry = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_secs()
        + 600;
    let listen_target = format!(
        "/$hc/payroll?sb-hc-action=listen&sb-hc-token={}",
        proto::sas::url_encode(&listen.token(expiry))
    );
    let mut control = client::open(relay.listen, cert, &listen_target, &[]).await?;

    let send_token = send.token(expiry);
    let relay_addr = relay.listen;
    let sender = tokio::spawn(async move {
        client::open(
            relay_addr,
            cert,
            "/$hc/payroll/orders?x=1&sb-hc-action=connect",
            &[
                ("ServiceBusAuthorization", send_token.as_str()),
                ("X-App", "hello"),
            ],
        )
        .await
    });

    let accept = control.read_frame().await?;
    ensure!(accept.opcode == OpCode::Text, "accept is text");
    let accept: serde_json::Value = serde_json::from_slice(&accept.payload)?;
    let accept = &accept["accept"];
    let headers = &accept["connectHeaders"];
    ensure!(
        headers["Sec-WebSocket-Key"] == "dGhlIHNhbXBsZSBub25jZQ==",
        "{accept}"
    );
    ensure!(headers["X-App"] == "hello", "{accept}");
    ensure!(
        headers.get("Servicebusauthorization").is_none(),
        "token forwarded: {accept}"
    );
    ensure!(
        accept["remoteEndpoint"]["address"] == "127.0.0.1",
        "{accept}"
    );
    let address = accept["address"].as_str().context("address")?;
    let prefix = format!("wss://localhost:{}", relay.listen.port());
    let target = address
        .strip_prefix(&prefix)
        .with_context(|| format!("{address} is not on the host the listener dialled"))?;
    ensure!(target.starts_with("/$hc/payroll/orders?x=1&"), "{address}");
    let listener = client::open(relay.listen, cert, target, &[]).await?;
    // The address is good once.
    ensure!(
        client::open(relay.listen, cert, target, &[]).await.is_err(),
        "a used address opened a second rendezvous"
    );
    let sender = sender.await??;

    let (mut sender_rx, mut sender_tx) = sender.split(tokio::io::split);
    let (mut listener_rx, mut listener_tx) = listener.split(tokio::io::split);
    sender_rx.set_auto_close(false);
    listener_rx.set_auto_close(false);
    let mut ignore = |_| async { Ok::<_, WebSocketError>(()) };
    let binary = |bytes: &[u8]| Frame::binary(Payload::Owned(bytes.to_vec()));

    // The sender sends its request and half-closes.
    sender_tx.write_frame(binary(b"request")).await?;
    sender_tx
        .write_frame(Frame::close(1000, b"Shutdown"))
        .await?;
    let got = listener_rx.read_frame(&mut ignore).await?;
    ensure!((got.opcode, &got.payload[..]) == (OpCode::Binary, &b"request"[..]));
    let got = listener_rx.read_frame(&mut ignore).await?;
    ensure!(got.opcode == OpCode::Close && &got.payload[2..] == b"Shutdown");
    // The listener's answer still reaches the sender, then its own Close.
    for part in [&b"reply 1"[..], b"reply 2"] {
        listener_tx.write_frame(binary(part)).await?;
    }
    listener_tx.write_frame(Frame::close(1000, b"")).await?;
    for part in [&b"reply 1"[..], b"reply 2"] {
        let got = sender_rx.read_frame(&mut ignore).await?;
        ensure!((got.opcode, &got.payload[..]) == (OpCode::Binary, part));
    }
    let got = sender_rx.read_frame(&mut ignore).await?;
    ensure!(got.opcode == OpCode::Close, "{:?}", got.opcode);
    drop(relay);
    Ok(())
}
