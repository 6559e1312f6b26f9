//! Azure Relay's own clients against the relay: `tests/azure/check.js` runs
//! a real `hyco-ws` listener and senders, `tests/azure/https_listener.js` a
//! real `hyco-https` listener that curl sends plain HTTPS requests to (npm,
//! pinned in `tests/azure/package-lock.json`), through a relay started
//! here, trusting its self-signed certificate through
//! `NODE_EXTRA_CA_CERTS`. Raw WebSocket listeners of our own show what
//! those clients cannot: a half-close, rejections, bad responses.
//!
//! Without node it skips, unless HYBRIDLINK_REQUIRE_TOOLS is set (as in
//! CI). `npm ci` runs first when `tests/azure/node_modules` is missing.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use hybridlink_tests::{Agent, OpenStream, Relay, echo_server_thread, wait_for};
use proto::connection_string::ConnectionString;
use proto::control::Fingerprint;

/// The node script may take this long before it is killed.
const DEADLINE: Duration = Duration::from_secs(120);

/// `tests/azure`, with Azure's Node clients installed; `None` (skip)
/// without node, unless HYBRIDLINK_REQUIRE_TOOLS is set.
fn hyco_ws() -> Result<Option<std::path::PathBuf>> {
    hybridlink_tests::azure_node_clients()
}

/// Waits for `child` up to [`DEADLINE`]; kills it past that.
fn wait_deadline(child: &mut std::process::Child, what: &str) -> Result<std::process::ExitStatus> {
    let started = Instant::now();
    loop {
        if let Some(status) = child.try_wait()? {
            return Ok(status);
        }
        if started.elapsed() > DEADLINE {
            let _ = child.kill();
            let _ = child.wait();
            anyhow::bail!("{what} did not finish within {DEADLINE:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Runs `check.js` (hyco-ws listener and senders) against the relay port
/// `relay`, trusting only the certificates in `trusted`; the hybrid
/// connection's strings are `send` and `listen`.
fn check_js(
    dir: &Path,
    relay: std::net::SocketAddr,
    trusted: &Path,
    hc: &str,
    send: &ConnectionString,
    listen: &ConnectionString,
) -> Result<()> {
    let wrong = proto::key::Key::generate()?;
    let mut child = Command::new("node")
        .arg("check.js")
        .current_dir(dir)
        .env("NODE_EXTRA_CA_CERTS", trusted)
        .env("RELAY", format!("127.0.0.1:{}", relay.port()))
        .env("HC", hc)
        .env("SEND_KEY", send.key.as_str())
        .env("LISTEN_KEY", listen.key.as_str())
        .env("WRONG_KEY", wrong.as_str())
        .spawn()
        .context("starting node")?;
    let status = wait_deadline(&mut child, "check.js")?;
    ensure!(
        status.success(),
        "the hyco-ws checks against {relay} failed ({status}); their output is above"
    );
    Ok(())
}

#[test]
fn hyco_ws_listener_and_senders_talk_through_the_relay() -> Result<()> {
    let Some(dir) = hyco_ws()? else {
        return Ok(());
    };

    let relay = Relay::start()?;
    let (send, listen) = relay.create_hc("payroll", "127.0.0.1:9".parse()?)?;
    check_js(
        &dir,
        relay.listen,
        &relay.data_dir.join("cert.pem"),
        "payroll",
        &send,
        &listen,
    )
}

/// A private certificate authority, as a company's or a public one would
/// be, issuing the relay certificates for `localhost` and `127.0.0.1`.
struct TestCa {
    issuer: rcgen::CertifiedIssuer<'static, rcgen::KeyPair>,
    dir: tempfile::TempDir,
}

impl TestCa {
    fn new() -> Result<TestCa> {
        use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyUsagePurpose};
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(DnType::CommonName, "hybridlink test CA");
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let issuer = rcgen::CertifiedIssuer::self_signed(params, rcgen::KeyPair::generate()?)?;
        let dir = tempfile::tempdir()?;
        std::fs::write(dir.path().join("ca.pem"), issuer.pem())?;
        Ok(TestCa { issuer, dir })
    }

    /// The CA's certificate, what clients are told to trust.
    fn ca_file(&self) -> std::path::PathBuf {
        self.dir.path().join("ca.pem")
    }

    /// `--tls-cert` and `--tls-key`.
    fn files(&self) -> (std::path::PathBuf, std::path::PathBuf) {
        (
            self.dir.path().join("fullchain.pem"),
            self.dir.path().join("privkey.pem"),
        )
    }

    /// Issues a new relay certificate and puts it in place as a renewal
    /// does (each file renamed over the old one); returns its DER.
    fn issue(&self) -> Result<Vec<u8>> {
        use rcgen::{CertificateParams, DnType};
        let key = rcgen::KeyPair::generate()?;
        let mut params = CertificateParams::new(vec!["localhost".into(), "127.0.0.1".into()])?;
        params
            .distinguished_name
            .push(DnType::CommonName, "localhost");
        let cert = params.signed_by(&key, &self.issuer)?;
        let (cert_file, key_file) = self.files();
        replace(&key_file, key.serialize_pem().as_bytes())?;
        replace(
            &cert_file,
            format!("{}{}", cert.pem(), self.issuer.pem()).as_bytes(),
        )?;
        Ok(cert.der().to_vec())
    }
}

/// Writes `bytes` beside `path` and renames it over `path`.
fn replace(path: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = path.with_extension("new");
    std::fs::write(&tmp, bytes)?;
    std::fs::rename(&tmp, path)?;
    Ok(())
}

/// The certificate a new TLS connection to `relay` gets: as an Azure
/// client (no ALPN, verified against the CA alone), or with `pin` as a
/// hybridlink peer (its client configuration, pinning `pin`).
fn served_certificate(
    relay: std::net::SocketAddr,
    ca: &TestCa,
    pin: Option<[u8; 32]>,
) -> Result<Vec<u8>> {
    let config = match pin {
        Some(pin) => transport::tls::relay_client_config(Fingerprint(pin))?,
        None => {
            let mut roots = rustls::RootCertStore::empty();
            roots.add(ca.issuer.der().clone())?;
            std::sync::Arc::new(
                rustls::ClientConfig::builder_with_provider(transport::tls::provider())
                    .with_safe_default_protocol_versions()?
                    .with_root_certificates(roots)
                    .with_no_client_auth(),
            )
        }
    };
    let mut conn = rustls::ClientConnection::new(config, "localhost".try_into()?)?;
    let mut tcp = std::net::TcpStream::connect(relay)?;
    tcp.set_read_timeout(Some(Duration::from_secs(10)))?;
    while conn.is_handshaking() {
        conn.complete_io(&mut tcp)?;
    }
    let certs = conn.peer_certificates().context("no certificate")?;
    Ok(certs[0].to_vec())
}

#[test]
fn a_ca_certificate_serves_azure_clients_while_hybridlink_peers_keep_their_pin() -> Result<()> {
    let dir =
        hyco_ws()?.context("these checks need node and hyco-ws (apt-get install nodejs npm)")?;
    let ca = TestCa::new()?;
    let leaf = ca.issue()?;
    let (cert_file, key_file) = ca.files();
    let logs = tempfile::tempdir()?;
    let relay = Relay::start_with_log(
        &[
            "--tls-cert",
            cert_file.to_str().context("utf-8")?,
            "--tls-key",
            key_file.to_str().context("utf-8")?,
            "--also-listen",
            "127.0.0.1:0",
        ],
        &logs.path().join("relay.log"),
    )?;
    let also: std::net::SocketAddr = relay.ready["also_listen"][0]
        .as_str()
        .context("also_listen in the ready line")?
        .parse()?;
    ensure!(also.port() != relay.listen.port(), "{}", relay.ready);
    ensure!(
        relay.ready["tls_cert_sha256"] == proto::control::hex_encode(&Fingerprint::of_der(&leaf).0),
        "{}",
        relay.ready
    );

    // The real Azure client, trusting the CA only (not the relay's
    // self-signed certificate) and verifying, on both ports.
    let (send, listen) = relay.create_hc("payroll", "127.0.0.1:9".parse()?)?;
    for port in [relay.listen, also] {
        check_js(&dir, port, &ca.ca_file(), "payroll", &send, &listen)?;
    }

    // hybridlink peers with their pinned strings, on the same ports: an
    // agent on the main one, a sender on each.
    let echo = echo_server_thread()?;
    let (send, listen) = relay.create_hc("echo", echo)?;
    let agent = Agent::start(&[&listen], &[])?;
    agent.wait_connected()?;
    let mut via_also = send.clone();
    via_also.relay_port = also.port();
    for cs in [&send, &via_also] {
        let mut stream = OpenStream::open(cs)?;
        ensure!(
            stream.echo("through the relay\n")? == "through the relay\n",
            "no echo through port {}",
            cs.relay_port
        );
        stream.close();
    }
    // What each kind of client is given, on both ports.
    let pin = send.cert_sha256.context("strings pin the certificate")?;
    for port in [relay.listen, also] {
        ensure!(served_certificate(port, &ca, None)? == leaf);
        ensure!(Fingerprint::of_der(&served_certificate(port, &ca, Some(pin))?).0 == pin);
    }
    Ok(())
}

#[test]
fn a_renewed_certificate_is_served_without_a_restart_and_a_corrupt_one_is_not() -> Result<()> {
    let ca = TestCa::new()?;
    let first = ca.issue()?;
    let (cert_file, key_file) = ca.files();
    let logs = tempfile::tempdir()?;
    let log = logs.path().join("relay.log");
    let relay = Relay::start_with_log(
        &[
            "--tls-cert",
            cert_file.to_str().context("utf-8")?,
            "--tls-key",
            key_file.to_str().context("utf-8")?,
        ],
        &log,
    )?;
    ensure!(served_certificate(relay.listen, &ca, None)? == first);

    let second = ca.issue()?;
    ensure!(second != first);
    wait_for("the renewed certificate to be served", 10, || {
        Ok(served_certificate(relay.listen, &ca, None)? == second)
    })?;
    let logged = std::fs::read_to_string(&log)?;
    ensure!(logged.contains("TLS certificate reloaded"), "{logged}");
    ensure!(
        !logged.contains("ERROR"),
        "a renewal logged an error: {logged}"
    );

    // A corrupt replacement: an error naming the file, and the renewed
    // certificate stays.
    replace(&cert_file, b"-----BEGIN CERTIFICATE-----\ntruncated")?;
    wait_for("the corrupt certificate to be reported", 10, || {
        let reason = format!("{} holds no PEM certificate", cert_file.display());
        Ok(std::fs::read_to_string(&log)?
            .lines()
            .any(|line| line.contains("ERROR") && line.contains(&reason)))
    })?;
    ensure!(served_certificate(relay.listen, &ca, None)? == second);
    // hybridlink peers never noticed any of it.
    let pin = relay.ready["cert_sha256"].as_str().context("cert_sha256")?;
    let pin: Fingerprint = pin.parse()?;
    ensure!(Fingerprint::of_der(&served_certificate(relay.listen, &ca, Some(pin.0))?) == pin);

    // Fixed: served again.
    let third = ca.issue()?;
    wait_for("the fixed certificate to be served", 10, || {
        Ok(served_certificate(relay.listen, &ca, None)? == third)
    })?;
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
        let (answer, tls) = upgrade(relay, cert, target, headers).await?;
        ensure!(answer.starts_with("HTTP/1.1 101"), "not upgraded: {answer}");
        Ok(WebSocket::after_handshake(tls, Role::Client))
    }

    /// Sends the upgrade request; returns the answer's head, whatever its
    /// status, and the connection.
    pub async fn upgrade(
        relay: std::net::SocketAddr,
        cert: [u8; 32],
        target: &str,
        headers: &[(&str, &str)],
    ) -> Result<(String, TlsStream<TcpStream>)> {
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
        Ok((String::from_utf8_lossy(&answer).into_owned(), tls))
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

fn unix_now() -> Result<u64> {
    Ok(std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_secs())
}

/// An Azure-protocol listener's control channel on `hc`, with a token
/// that expires at `expiry` (Unix seconds).
async fn listen(
    relay: &Relay,
    listen: &proto::connection_string::ConnectionString,
    expiry: u64,
) -> Result<client::Ws> {
    let cert = listen.cert_sha256.context("certificate hash")?;
    let target = format!(
        "/$hc/{}?sb-hc-action=listen&sb-hc-token={}",
        listen.hc,
        proto::sas::url_encode(&listen.token(expiry))
    );
    client::open(relay.listen, cert, &target, &[]).await
}

/// The close code of the next frame on `ws`, which must be a Close within
/// `within`.
async fn close_code(ws: &mut client::Ws, within: Duration) -> Result<u16> {
    let frame = tokio::time::timeout(within, ws.read_frame())
        .await
        .context("no Close in time")??;
    ensure!(
        frame.opcode == fastwebsockets::OpCode::Close,
        "expected a Close, got {:?}",
        frame.opcode
    );
    ensure!(frame.payload.len() >= 2, "a Close without a code");
    Ok(u16::from_be_bytes([frame.payload[0], frame.payload[1]]))
}

/// A sender's upgrade to `hc` in the background: the answer head.
fn connect(
    relay: &Relay,
    send: &proto::connection_string::ConnectionString,
) -> Result<tokio::task::JoinHandle<Result<String>>> {
    let cert = send.cert_sha256.context("certificate hash")?;
    let token = send.token(unix_now()? + 600);
    let addr = relay.listen;
    let target = format!("/$hc/{}?sb-hc-action=connect", send.hc);
    Ok(tokio::spawn(async move {
        let (answer, _tls) = client::upgrade(
            addr,
            cert,
            &target,
            &[("ServiceBusAuthorization", token.as_str())],
        )
        .await?;
        Ok(answer)
    }))
}

/// The `accept` message a listener gets for a sender, within `within`.
async fn next_accept(ws: &mut client::Ws, within: Duration) -> Result<serde_json::Value> {
    let frame = tokio::time::timeout(within, ws.read_frame())
        .await
        .context("no accept in time")??;
    ensure!(
        frame.opcode == fastwebsockets::OpCode::Text,
        "expected an accept, got {:?}",
        frame.opcode
    );
    let message: serde_json::Value = serde_json::from_slice(&frame.payload)?;
    ensure!(message["accept"].is_object(), "{message}");
    Ok(message["accept"].clone())
}

/// The Node and .NET clients renew their token when it expires (hyco-ws
/// once an hour, whatever the token says): a listener that renews within
/// the grace after expiry stays and keeps getting senders; one that does
/// not is closed with 1008 once the grace is over.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_listener_renewing_after_expiry_stays_and_one_that_does_not_is_closed() -> Result<()> {
    let data = tempfile::tempdir()?;
    let dir = data.path().to_path_buf();
    let relay = tokio::task::spawn_blocking(move || {
        Relay::start_with(&dir, "127.0.0.1:0", &["--renew-grace", "3"])
    })
    .await??;
    let (send, listen_cs) = relay.create_hc("payroll", "127.0.0.1:9".parse()?)?;
    let start = unix_now()?;
    let mut renewing = listen(&relay, &listen_cs, start + 2).await?;
    let mut lapsing = listen(&relay, &listen_cs, start + 2).await?;

    // Past the expiry, inside the grace.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let renewal =
        serde_json::json!({ "renewToken": { "token": listen_cs.token(unix_now()? + 600) } });
    renewing
        .write_frame(fastwebsockets::Frame::text(fastwebsockets::Payload::Owned(
            renewal.to_string().into_bytes(),
        )))
        .await?;

    // The grace ends at start + 5: the one that did not renew is closed.
    let code = close_code(&mut lapsing, Duration::from_secs(8)).await?;
    ensure!(code == 1008, "the lapsed listener was closed with {code}");
    ensure!(unix_now()? >= start + 5, "closed before the grace was over");

    // The one that renewed still gets senders, now that the grace is over.
    let sender = connect(&relay, &send)?;
    let accept = next_accept(&mut renewing, Duration::from_secs(5)).await?;
    ensure!(accept["address"].is_string(), "{accept}");
    sender.abort();
    Ok(())
}

/// One registry, one set of keys: regenerating the listen key closes the
/// listeners that used it with 1008 (the listener's policy no longer
/// holds), deleting the hybrid connection closes them with 1001.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn regenerate_closes_listeners_with_1008_and_delete_with_1001() -> Result<()> {
    let relay = tokio::task::spawn_blocking(Relay::start).await??;
    let expiry = unix_now()? + 600;
    let (_, first) = relay.create_hc("first", "127.0.0.1:9".parse()?)?;
    let (_, second) = relay.create_hc("second", "127.0.0.1:9".parse()?)?;
    let mut regenerated = listen(&relay, &first, expiry).await?;
    let mut deleted = listen(&relay, &second, expiry).await?;
    // The listener of the other hybrid connection is untouched by either.
    let (_, third) = relay.create_hc("third", "127.0.0.1:9".parse()?)?;
    let mut bystander = listen(&relay, &third, expiry).await?;

    relay.hc(&[
        "regenerate",
        "first",
        "--rule",
        "listen",
        "--key",
        "primary",
    ])?;
    let code = close_code(&mut regenerated, Duration::from_secs(5)).await?;
    ensure!(code == 1008, "regenerate closed the listener with {code}");
    ensure!(
        listen(&relay, &first, expiry).await.is_err(),
        "the old listen key still opens a listener"
    );

    relay.hc(&["delete", "second"])?;
    let code = close_code(&mut deleted, Duration::from_secs(5)).await?;
    ensure!(code == 1001, "delete closed the listener with {code}");

    let (send, _) = relay.strings("third")?;
    let sender = connect(&relay, &send)?;
    next_accept(&mut bystander, Duration::from_secs(5))
        .await
        .context("the other hybrid connection's listener")?;
    sender.abort();
    Ok(())
}

/// A listener that rejects a sender: the sender's upgrade is answered with
/// the listener's status and description, the listener's own request to
/// the rendezvous address with 410.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rejecting_listener_gives_the_sender_its_status() -> Result<()> {
    let relay = tokio::task::spawn_blocking(Relay::start).await??;
    let (send, listen_cs) = relay.create_hc("payroll", "127.0.0.1:9".parse()?)?;
    let cert = send.cert_sha256.context("certificate hash")?;
    let mut control = listen(&relay, &listen_cs, unix_now()? + 600).await?;
    let sender = connect(&relay, &send)?;
    let accept = next_accept(&mut control, Duration::from_secs(5)).await?;
    let address = accept["address"].as_str().context("address")?;
    let prefix = format!("wss://localhost:{}", relay.listen.port());
    let target = address
        .strip_prefix(&prefix)
        .context("address on the relay")?;
    let reject = format!(
        "{target}&sb-hc-statusCode=403&sb-hc-statusDescription={}",
        proto::sas::url_encode("not on my watch")
    );
    let (answer, _) = client::upgrade(relay.listen, cert, &reject, &[]).await?;
    ensure!(answer.starts_with("HTTP/1.1 410"), "listener got: {answer}");
    let answer = tokio::time::timeout(Duration::from_secs(5), sender)
        .await
        .context("the sender was not answered")???;
    ensure!(
        answer.starts_with("HTTP/1.1 403 not on my watch"),
        "sender got: {answer}"
    );
    Ok(())
}

/// The README's block tagged `tag` (```js tag).
fn readme_block(tag: &str) -> Result<String> {
    let readme =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../README.md"))?;
    let open = format!("```js {tag}\n");
    let start = readme
        .find(&open)
        .with_context(|| format!("README has no {open:?} block"))?
        + open.len();
    let end = readme[start..]
        .find("```")
        .context("the block does not end")?;
    Ok(readme[start..start + end].to_string())
}

/// The README's listener block `listener` and sender block `sender`, run
/// as written: the sender must print `expected`.
fn run_readme_pair(listener: &str, sender: &str, expected: &str) -> Result<()> {
    let Some(dir) = hyco_ws()? else {
        return Ok(());
    };
    let relay = Relay::start()?;
    let (send, listen) = relay.create_hc("payroll", "127.0.0.1:9".parse()?)?;
    let scripts = tempfile::tempdir()?;
    let node = |block: &str, key: (&str, &str)| -> Result<Command> {
        let file = scripts.path().join(format!("{block}.js"));
        std::fs::write(&file, readme_block(block)?)?;
        let mut command = Command::new("node");
        command
            .arg(&file)
            .env("NODE_PATH", dir.join("node_modules"))
            .env("NODE_EXTRA_CA_CERTS", relay.data_dir.join("cert.pem"))
            .env("RELAY", format!("127.0.0.1:{}", relay.listen.port()))
            .env("HC", "payroll")
            .env(key.0, key.1);
        Ok(command)
    };
    let _listener = hybridlink_tests::Proc::adopt(
        node(listener, ("LISTEN_KEY", listen.key.as_str()))?
            .spawn()
            .context("starting the listener")?,
        "the README's listener",
    );
    // The listener attaches in well under a second; a sender before it is
    // refused (404, 502), so try again for a while.
    let started = Instant::now();
    loop {
        let mut child = node(sender, ("SEND_KEY", send.key.as_str()))?
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .context("starting the sender")?;
        let status = wait_deadline(&mut child, "the README's sender")?;
        let mut out = String::new();
        std::io::Read::read_to_string(&mut child.stdout.take().context("stdout")?, &mut out)?;
        if status.success() {
            ensure!(out == expected, "the sender printed {out:?}");
            return Ok(());
        }
        ensure!(
            started.elapsed() < Duration::from_secs(20),
            "the README's sender kept failing ({status}): {out}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// The README's hyco-ws listener and sender, run as written.
#[test]
fn the_readmes_hyco_ws_example_runs_as_written() -> Result<()> {
    run_readme_pair(
        "hyco-ws-listener",
        "hyco-ws-sender",
        "hello through the relay\n",
    )
}

/// The README's hyco-https listener and its plain HTTPS sender, run as
/// written.
#[test]
fn the_readmes_hyco_https_example_runs_as_written() -> Result<()> {
    run_readme_pair(
        "hyco-https-listener",
        "hyco-https-sender",
        "200 hello from the listener: GET /payroll/hello?x=1\n",
    )
}

/// `hc status` lists an Azure-protocol listener beside the agents, as its
/// own kind whose traffic the relay sees, and forgets it when it goes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_lists_azure_listeners_as_their_own_kind() -> Result<()> {
    let relay = tokio::task::spawn_blocking(Relay::start).await??;
    let (_, listen_cs) = relay.create_hc("payroll", "127.0.0.1:9".parse()?)?;
    let status = relay.hc(&["status", "payroll"])?;
    ensure!(status["status"] == "Not connected", "{status}");
    let control = listen(&relay, &listen_cs, unix_now()? + 600).await?;

    let status = relay.hc(&["status", "payroll"])?;
    ensure!(status["status"] == "Connected", "{status}");
    ensure!(
        status["listener_count"] == 0,
        "counted as an agent: {status}"
    );
    let listeners = status["azure_listeners"]
        .as_array()
        .context("azure_listeners")?;
    ensure!(listeners.len() == 1, "{status}");
    ensure!(listeners[0]["kind"] == "azure-protocol", "{status}");
    ensure!(listeners[0]["relay_sees_payload"] == true, "{status}");
    ensure!(
        listeners[0]["address"]
            .as_str()
            .is_some_and(|a| a.starts_with("127.0.0.1:")),
        "{status}"
    );
    let text = relay.hc_command()?.args(["status"]).output()?;
    let text = String::from_utf8_lossy(&text.stdout);
    ensure!(
        text.contains("azure-protocol at 127.0.0.1:") && text.contains("relay sees payload"),
        "{text}"
    );

    drop(control);
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let status = relay.hc(&["status", "payroll"])?;
        if status["azure_listeners"]
            .as_array()
            .is_some_and(Vec::is_empty)
        {
            ensure!(status["status"] == "Not connected", "{status}");
            return Ok(());
        }
        ensure!(
            Instant::now() < deadline,
            "a gone listener is still listed: {status}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The relay's Prometheus metrics (its ready line's `metrics` address).
fn scrape(relay: &Relay) -> Result<String> {
    use std::io::{Read, Write};
    let addr = relay.ready["metrics"]
        .as_str()
        .context("metrics address in the ready line")?;
    let mut conn = std::net::TcpStream::connect(addr)?;
    conn.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")?;
    let mut text = String::new();
    conn.read_to_string(&mut text)?;
    ensure!(text.starts_with("HTTP/1.1 200"), "{text}");
    Ok(text)
}

/// The value of the sample `series` (name and labels), 0 when absent.
fn sample(text: &str, series: &str) -> f64 {
    text.lines()
        .find(|l| l.starts_with(series) && l[series.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}

/// hyco-ws reconnects its control channel at once after every failure,
/// from its error and its close handler both, so a listener with a wrong
/// key opens ever more connections, for ever (hundreds of refused
/// handshakes in ten seconds against a relay that answers at once). The
/// relay answers an address's repeated refusals later and later: the storm
/// costs it a few dozen answers; an honest listener from the same address
/// still connects at once; and the metrics count the refusals and the
/// listener.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_listener_reconnecting_without_backoff_costs_the_relay_a_few_answers() -> Result<()> {
    let Some(dir) = hyco_ws()? else {
        return Ok(());
    };
    let data = tempfile::tempdir()?;
    let data_dir = data.path().to_path_buf();
    let relay = tokio::task::spawn_blocking(move || {
        Relay::start_with(&data_dir, "127.0.0.1:0", &["--metrics", "127.0.0.1:0"])
    })
    .await??;
    let (_, listen_cs) = relay.create_hc("payroll", "127.0.0.1:9".parse()?)?;
    let wrong_key = "d3JvbmdrZXl3cm9uZ2tleXdyb25na2V5d3JvbmdrZXk=";
    let storm = Command::new("node")
        .args(["-e", STORMING_LISTENER])
        .env("NODE_PATH", dir.join("node_modules"))
        .env("NODE_EXTRA_CA_CERTS", relay.data_dir.join("cert.pem"))
        .env("RELAY", format!("127.0.0.1:{}", relay.listen.port()))
        .env("HC", "payroll")
        .env("LISTEN_KEY", wrong_key)
        .stdout(std::process::Stdio::null())
        .spawn()
        .context("starting hyco-ws")?;
    let storm = hybridlink_tests::Proc::adopt(storm, "hyco-ws with a wrong key");

    tokio::time::sleep(Duration::from_secs(4)).await;
    let started = Instant::now();
    let _honest = listen(&relay, &listen_cs, unix_now()? + 600).await?;
    ensure!(
        started.elapsed() < Duration::from_secs(2),
        "an honest listener waited {:?} behind the storm",
        started.elapsed()
    );
    tokio::time::sleep(Duration::from_secs(6)).await;
    let text = scrape(&relay)?;
    drop(storm);

    let refused = sample(
        &text,
        "hybridlink_relay_refused_total{reason=\"unauthorized\"}",
    );
    ensure!(
        (3.0..=60.0).contains(&refused),
        "{refused} refusals in 10 s of a reconnect storm (expected a few dozen at most)"
    );
    ensure!(
        sample(&text, "hybridlink_relay_azure_listeners{hc=\"payroll\"}") == 1.0,
        "the honest listener is not counted:\n{text}"
    );
    Ok(())
}

/// A hyco-ws listener that counts its refusals and keeps reconnecting.
const STORMING_LISTENER: &str = r#"
const WebSocket = require('hyco-ws');
const { RELAY, HC, LISTEN_KEY } = process.env;
const uri = `wss://${RELAY}/$hc/${HC}?sb-hc-action=listen`;
const server = WebSocket.createRelayedServer(
  { server: uri, token: () => WebSocket.createRelayToken(uri, 'listen', LISTEN_KEY) },
  (ws) => ws.close());
server.on('error', () => {});
"#;

/// Senders are spread round robin over a hybrid connection's
/// Azure-protocol listeners, which `--max-listeners` caps; a sender that
/// is relayed is counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn senders_take_turns_over_the_listeners_and_max_listeners_caps_them() -> Result<()> {
    let data = tempfile::tempdir()?;
    let data_dir = data.path().to_path_buf();
    let relay = tokio::task::spawn_blocking(move || {
        Relay::start_with(
            &data_dir,
            "127.0.0.1:0",
            &["--max-listeners", "2", "--metrics", "127.0.0.1:0"],
        )
    })
    .await??;
    let (send, listen_cs) = relay.create_hc("payroll", "127.0.0.1:9".parse()?)?;
    let expiry = unix_now()? + 600;
    let listeners = [
        listen(&relay, &listen_cs, expiry).await?,
        listen(&relay, &listen_cs, expiry).await?,
    ];

    let cert = listen_cs.cert_sha256.context("certificate hash")?;
    let third = format!(
        "/$hc/payroll?sb-hc-action=listen&sb-hc-token={}",
        proto::sas::url_encode(&listen_cs.token(expiry))
    );
    let (answer, mut tls) = client::upgrade(relay.listen, cert, &third, &[]).await?;
    // The relay closes without close_notify once the answer is out: keep
    // what came before that.
    let mut body = Vec::new();
    let _ = tokio::io::AsyncReadExt::read_to_end(&mut tls, &mut body).await;
    let body = String::from_utf8_lossy(&body);
    ensure!(
        answer.starts_with("HTTP/1.1 403") && body.contains("--max-listeners"),
        "a third listener: {answer}{body}"
    );

    // Each listener reports its accepts, tagged with its index.
    let (tx, mut accepts) = tokio::sync::mpsc::unbounded_channel();
    for (i, mut ws) in listeners.into_iter().enumerate() {
        let tx = tx.clone();
        tokio::spawn(async move {
            while let Ok(accept) = next_accept(&mut ws, Duration::from_secs(120)).await {
                if tx.send((i, accept)).is_err() {
                    break;
                }
            }
        });
    }
    // Each sender's accept goes to one listener, the next sender's to the
    // other. The listener rejects, so each sender is answered at once.
    let mut took = [0usize; 2];
    for round in 0..6 {
        let sender = connect(&relay, &send)?;
        let (i, accept) = tokio::time::timeout(Duration::from_secs(5), accepts.recv())
            .await
            .with_context(|| format!("round {round}: no listener got an accept"))?
            .context("the listeners stopped")?;
        let address = accept["address"].as_str().context("address")?;
        reject(relay.listen, cert, address).await?;
        took[i] += 1;
        let answer = sender.await??;
        ensure!(answer.starts_with("HTTP/1.1 409"), "{answer}");
    }
    ensure!(took == [3, 3], "accepts per listener: {took:?}");
    let text = scrape(&relay)?;
    ensure!(
        sample(&text, "hybridlink_relay_azure_listeners{hc=\"payroll\"}") == 2.0,
        "{text}"
    );
    ensure!(
        sample(&text, "hybridlink_relay_refused_total{reason=\"quota\"}") >= 1.0,
        "the third listener's refusal is not counted:\n{text}"
    );
    Ok(())
}

/// Rejects the sender of an `accept` whose address is `address`, with
/// 409, as a listener does.
async fn reject(relay: std::net::SocketAddr, cert: [u8; 32], address: &str) -> Result<()> {
    let url = address
        .split_once("/$hc/")
        .map(|(_, rest)| format!("/$hc/{rest}&sb-hc-statusCode=409&sb-hc-statusDescription=Busy"))
        .context("an accept address without /$hc/")?;
    let (answer, _tls) = client::upgrade(relay, cert, &url, &[]).await?;
    ensure!(
        answer.starts_with("HTTP/1.1 410"),
        "reject answered {answer}"
    );
    Ok(())
}

/// An HTTPS answer as `curl -i` shows it.
#[derive(Debug)]
struct HttpAnswer {
    status: u16,
    head: String,
    body: Vec<u8>,
}

impl HttpAnswer {
    /// The first value of header `name`.
    fn header(&self, name: &str) -> Option<&str> {
        self.head.lines().skip(1).find_map(|line| {
            let (n, v) = line.split_once(':')?;
            n.trim().eq_ignore_ascii_case(name).then(|| v.trim())
        })
    }

    fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// A plain HTTPS request to the relay with curl (trusting the relay's
/// certificate), `args` added as they are and `body` on standard input.
fn curl(relay: &Relay, target: &str, args: &[&str], body: Option<&[u8]>) -> Result<HttpAnswer> {
    let out = curl_output(relay, target, args, body)?;
    ensure!(
        out.status.success(),
        "curl {target} failed ({})",
        out.status
    );
    let end = out
        .stdout
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .context("curl printed no response head")?;
    let head = String::from_utf8_lossy(&out.stdout[..end]).into_owned();
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .with_context(|| format!("no status in {head:?}"))?;
    Ok(HttpAnswer {
        status,
        head,
        body: out.stdout[end + 4..].to_vec(),
    })
}

/// What curl did with a request, whether or not it succeeded.
fn curl_output(
    relay: &Relay,
    target: &str,
    args: &[&str],
    body: Option<&[u8]>,
) -> Result<std::process::Output> {
    use std::io::Write;
    let url = format!("https://localhost:{}{target}", relay.listen.port());
    let mut command = Command::new("curl");
    command
        .args([
            "-sS",
            "-i",
            "--http1.1",
            "--max-time",
            "30",
            "-H",
            "Expect:",
        ])
        .arg("--cacert")
        .arg(relay.data_dir.join("cert.pem"))
        .args(args)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped());
    if body.is_some() {
        command.args(["--data-binary", "@-"]);
    }
    let mut child = command
        .arg(&url)
        .spawn()
        .context("starting curl (apt-get install curl)")?;
    let mut stdin = child.stdin.take().context("curl's stdin")?;
    if let Some(body) = body {
        stdin.write_all(body)?;
    }
    drop(stdin);
    Ok(child.wait_with_output()?)
}

/// `tests/azure/https_listener.js` (hyco-https) listening on `hc`, once its
/// control channel is up.
fn hyco_https_listener(
    dir: &Path,
    relay: &Relay,
    hc: &str,
    listen_key: &str,
) -> Result<hybridlink_tests::Proc> {
    let mut child = Command::new("node")
        .arg("https_listener.js")
        .current_dir(dir)
        .env("NODE_EXTRA_CA_CERTS", relay.data_dir.join("cert.pem"))
        .env("RELAY", format!("127.0.0.1:{}", relay.listen.port()))
        .env("HC", hc)
        .env("LISTEN_KEY", listen_key)
        .stdout(std::process::Stdio::piped())
        .spawn()
        .context("starting node")?;
    let stdout = child.stdout.take().context("node's stdout")?;
    let listener = hybridlink_tests::Proc::adopt(child, "the hyco-https listener");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        use std::io::BufRead;
        for line in std::io::BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if line == "listening" {
                let _ = tx.send(());
            }
        }
    });
    rx.recv_timeout(Duration::from_secs(20))
        .context("the hyco-https listener did not attach within 20 s")?;
    Ok(listener)
}

/// The real `hyco-https` listener answers plain HTTPS requests (curl)
/// through the relay: small bodies on its control channel, bodies over
/// 64 KiB both ways over rendezvous WebSockets, headers passed without the
/// hop-by-hop ones and with the relay's `Via`; 504 when it does not answer
/// in time, 502 without a listener, 401/403 for bad tokens, 431 for a
/// head over 32 KiB.
#[test]
fn hyco_https_listener_answers_plain_https_requests_through_the_relay() -> Result<()> {
    let Some(dir) = hyco_ws()? else {
        return Ok(());
    };
    let data = tempfile::tempdir()?;
    let relay = Relay::start_with(
        data.path(),
        "127.0.0.1:0",
        &["--http-response-timeout", "3"],
    )?;
    let (send, listen) = relay.create_hc("payroll", "127.0.0.1:9".parse()?)?;
    let (other_send, _) = relay.create_hc("other", "127.0.0.1:9".parse()?)?;
    let _listener = hyco_https_listener(&dir, &relay, "payroll", listen.key.as_str())?;
    let token = send.token(unix_now()? + 600);
    let auth = format!("ServiceBusAuthorization: {token}");

    // A GET with the token in the query, which the listener never sees.
    let got = curl(
        &relay,
        &format!(
            "/payroll/hello?x=1&sb-hc-token={}",
            proto::sas::url_encode(&token)
        ),
        &[
            "-H",
            "X-App: hello",
            "-H",
            "Connection: X-Hop-Req",
            "-H",
            "X-Hop-Req: must not pass",
            "-H",
            "Keep-Alive: timeout=5",
            "-H",
            "TE: trailers",
        ],
        None,
    )?;
    ensure!(got.status == 200, "GET: {got:?}");
    let seen: serde_json::Value = serde_json::from_slice(&got.body)?;
    ensure!(seen["method"] == "GET", "{seen}");
    ensure!(seen["url"] == "/payroll/hello?x=1", "{seen}");
    let headers = &seen["headers"];
    ensure!(headers["x-app"] == "hello", "{seen}");
    for dropped in [
        "x-hop-req",
        "keep-alive",
        "te",
        "connection",
        "servicebusauthorization",
    ] {
        ensure!(
            headers.get(dropped).is_none(),
            "{dropped} reached the listener: {seen}"
        );
    }
    ensure!(
        headers["via"]
            .as_str()
            .is_some_and(|v| v.starts_with("1.1 localhost:")),
        "{seen}"
    );
    ensure!(got.header("x-listener") == Some("hyco-https"), "{got:?}");
    ensure!(
        got.header("via")
            .is_some_and(|v| v.starts_with("1.1 localhost:")),
        "no Via: {got:?}"
    );
    for dropped in ["x-hop-resp", "keep-alive"] {
        ensure!(
            got.header(dropped).is_none(),
            "{dropped} reached the sender: {got:?}"
        );
    }
    // The relay's own connection header: one request per connection.
    ensure!(got.header("connection") == Some("close"), "{got:?}");

    // A POST with a small body, token in the header.
    let got = curl(
        &relay,
        "/payroll/echo",
        &["-H", &auth],
        Some(b"hello, listener"),
    )?;
    ensure!(got.status == 200, "small POST: {got:?}");
    ensure!(got.body == b"hello, listener", "small POST: {}", got.text());

    // 200 KiB up and the same back: both over rendezvous WebSockets.
    let big: Vec<u8> = (0..200 * 1024u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    let got = curl(
        &relay,
        "/payroll/echo",
        &["-H", &auth, "-H", "Content-Type: application/octet-stream"],
        Some(&big),
    )?;
    ensure!(got.status == 200, "big POST: {:?}", got.head);
    ensure!(
        got.body.len() == big.len() && got.body == big,
        "big POST came back with {} bytes",
        got.body.len()
    );
    // Bodies of 0 B, 10 KiB and 1 MiB, each echoed back byte-exact (an
    // empty one answered with the request's description).
    for size in [0usize, 10 << 10, 1 << 20] {
        let body: Vec<u8> = (0..size as u32)
            .map(|i| (i.wrapping_mul(40_503) >> 7) as u8)
            .collect();
        let got = curl(
            &relay,
            "/payroll/echo",
            &["-H", &auth, "-H", "Content-Type: application/octet-stream"],
            Some(&body),
        )?;
        ensure!(got.status == 200, "POST of {size} bytes: {:?}", got.head);
        if size == 0 {
            let seen: serde_json::Value = serde_json::from_slice(&got.body)?;
            ensure!(seen["method"] == "POST", "{seen}");
        } else {
            ensure!(
                got.body == body,
                "POST of {size} bytes came back with {} bytes",
                got.body.len()
            );
        }
    }

    // A small request with a 300 000-byte answer.
    let got = curl(&relay, "/payroll/big?n=300000", &["-H", &auth], None)?;
    ensure!(got.status == 200, "big GET: {:?}", got.head);
    let expected: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
    ensure!(got.body == expected, "big GET: {} bytes", got.body.len());

    // Headers that make the request message bigger than 32 KiB: it goes
    // over a rendezvous too.
    let quotes = "\"".repeat(20_000);
    let got = curl(
        &relay,
        "/payroll/quotes",
        &["-H", &auth, "-H", &format!("X-Quotes: {quotes}")],
        None,
    )?;
    ensure!(got.status == 200, "big headers: {:?}", got.head);
    let seen: serde_json::Value = serde_json::from_slice(&got.body)?;
    ensure!(
        seen["headers"]["x-quotes"] == quotes.as_str(),
        "big headers arrived as {}",
        seen["headers"]["x-quotes"].as_str().map_or(0, str::len)
    );

    // The Authorization header may carry the token too; it is not passed on.
    let got = curl(
        &relay,
        "/payroll/who",
        &["-H", &format!("Authorization: {token}")],
        None,
    )?;
    ensure!(got.status == 200, "Authorization token: {got:?}");
    let seen: serde_json::Value = serde_json::from_slice(&got.body)?;
    ensure!(seen["headers"].get("authorization").is_none(), "{seen}");

    // A listener that never answers: 504 after the (shortened) timeout.
    let started = Instant::now();
    let got = curl(&relay, "/payroll/never", &["-H", &auth], None)?;
    ensure!(got.status == 504, "never: {got:?}");
    ensure!(
        started.elapsed() >= Duration::from_secs(3) && started.elapsed() < Duration::from_secs(10),
        "504 after {:?}",
        started.elapsed()
    );

    // No listener: 502.
    let other = format!(
        "ServiceBusAuthorization: {}",
        other_send.token(unix_now()? + 600)
    );
    let got = curl(&relay, "/other/x", &["-H", &other], None)?;
    ensure!(got.status == 502, "no listener: {got:?}");
    ensure!(got.text().contains("no listener"), "{}", got.text());

    // Bad tokens: 401 for a forged one, 403 for another hybrid connection's.
    let got = curl(
        &relay,
        "/payroll/x",
        &[
            "-H",
            "ServiceBusAuthorization: SharedAccessSignature sr=x&sig=eA%3D%3D&se=9999999999&skn=send",
        ],
        None,
    )?;
    ensure!(got.status == 401, "forged token: {got:?}");
    let got = curl(&relay, "/payroll/x", &[], None)?;
    ensure!(got.status == 401, "no token: {got:?}");
    let got = curl(&relay, "/payroll/x", &["-H", &other], None)?;
    ensure!(
        got.status == 403,
        "another hybrid connection's token: {got:?}"
    );

    // A head over 32 KiB is refused before anything is sent on.
    let huge = format!("X-Huge: {}", "a".repeat(40 << 10));
    let got = curl(&relay, "/payroll/x", &["-H", &auth, "-H", &huge], None)?;
    ensure!(got.status == 431, "huge head: {:?}", got.head);

    // And the listener still serves.
    let got = curl(&relay, "/payroll/echo", &["-H", &auth], Some(b"still here"))?;
    ensure!(got.body == b"still here", "after all that: {got:?}");
    Ok(())
}

/// The next `request` message on a raw listener's control channel.
async fn next_request(ws: &mut client::Ws) -> Result<serde_json::Value> {
    let frame = tokio::time::timeout(Duration::from_secs(10), ws.read_frame())
        .await
        .context("no request in time")??;
    ensure!(
        frame.opcode == fastwebsockets::OpCode::Text,
        "expected a request, got {:?}",
        frame.opcode
    );
    let message: serde_json::Value = serde_json::from_slice(&frame.payload)?;
    ensure!(message["request"].is_object(), "{message}");
    Ok(message["request"].clone())
}

async fn send_text(ws: &mut client::Ws, value: serde_json::Value) -> Result<()> {
    ws.write_frame(fastwebsockets::Frame::text(fastwebsockets::Payload::Owned(
        value.to_string().into_bytes(),
    )))
    .await?;
    Ok(())
}

/// A raw listener that answers badly: a response the relay cannot use, a
/// response for an unknown id, a body over 64 KiB on the control channel
/// and a listener that goes away each fail only their own request, with a
/// clear 502 (or the right answer when it comes after all); the relay and
/// its other listeners go on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_raw_listeners_bad_responses_fail_only_their_own_request() -> Result<()> {
    let relay = std::sync::Arc::new(tokio::task::spawn_blocking(Relay::start).await??);
    let (send, listen_cs) = relay.create_hc("payroll", "127.0.0.1:9".parse()?)?;
    let auth = format!("ServiceBusAuthorization: {}", send.token(unix_now()? + 600));
    let request = |target: &'static str, body: Option<&'static [u8]>| {
        let relay = relay.clone();
        let auth = auth.clone();
        tokio::task::spawn_blocking(move || curl(&relay, target, &["-H", &auth], body))
    };
    let mut control = listen(&relay, &listen_cs, unix_now()? + 600).await?;

    // The request as the listener gets it, then a response it cannot use.
    let sender = request("/payroll/a/b?q=1", Some(b"ping"));
    let req = next_request(&mut control).await?;
    ensure!(req["method"] == "POST", "{req}");
    ensure!(req["requestTarget"] == "/payroll/a/b?q=1", "{req}");
    ensure!(req["body"] == true, "{req}");
    ensure!(req["remoteEndpoint"]["address"] == "127.0.0.1", "{req}");
    let headers = req["requestHeaders"]
        .as_object()
        .context("requestHeaders")?;
    ensure!(
        !headers
            .keys()
            .any(|k| k.eq_ignore_ascii_case("ServiceBusAuthorization")
                || k.eq_ignore_ascii_case("Host")
                || k.eq_ignore_ascii_case("Content-Length")),
        "{req}"
    );
    ensure!(
        req["address"]
            .as_str()
            .is_some_and(|a| a.contains("sb-hc-action=request")),
        "{req}"
    );
    let body = control.read_frame().await?;
    ensure!(
        body.opcode == fastwebsockets::OpCode::Binary && &body.payload[..] == b"ping",
        "the body did not follow its request"
    );
    let id = req["id"].clone();
    send_text(
        &mut control,
        serde_json::json!({"response": {"requestId": id, "statusCode": "teapot"}}),
    )
    .await?;
    let got = sender.await??;
    ensure!(got.status == 502, "garbage response: {got:?}");
    ensure!(got.text().contains("statusCode"), "{}", got.text());

    // A response for an unknown id is dropped; the right one still counts.
    let sender = request("/payroll/c", None);
    let req = next_request(&mut control).await?;
    ensure!(req["body"] == false, "{req}");
    send_text(
        &mut control,
        serde_json::json!({"response": {"requestId": "no-such-request", "statusCode": 500}}),
    )
    .await?;
    send_text(
        &mut control,
        serde_json::json!({"response": {"requestId": req["id"], "statusCode": 201,
            "statusDescription": "Made", "responseHeaders": {"x-raw": 7}, "body": true}}),
    )
    .await?;
    control
        .write_frame(fastwebsockets::Frame::new(
            false,
            fastwebsockets::OpCode::Binary,
            None,
            fastwebsockets::Payload::Owned(b"frag".to_vec()),
        ))
        .await?;
    control
        .write_frame(fastwebsockets::Frame::new(
            true,
            fastwebsockets::OpCode::Continuation,
            None,
            fastwebsockets::Payload::Owned(b"ments".to_vec()),
        ))
        .await?;
    let got = sender.await??;
    ensure!(got.status == 201, "after an unknown id: {got:?}");
    ensure!(got.head.starts_with("HTTP/1.1 201 Made"), "{}", got.head);
    ensure!(got.header("x-raw") == Some("7"), "{got:?}");
    ensure!(got.body == b"fragments", "{}", got.text());

    // A body over 64 KiB on the control channel.
    let sender = request("/payroll/d", None);
    let req = next_request(&mut control).await?;
    send_text(
        &mut control,
        serde_json::json!({"response": {"requestId": req["id"], "statusCode": 200, "body": true}}),
    )
    .await?;
    for fin in [false, true] {
        let opcode = if fin {
            fastwebsockets::OpCode::Continuation
        } else {
            fastwebsockets::OpCode::Binary
        };
        control
            .write_frame(fastwebsockets::Frame::new(
                fin,
                opcode,
                None,
                fastwebsockets::Payload::Owned(vec![0u8; 40 << 10]),
            ))
            .await?;
    }
    let got = sender.await??;
    ensure!(got.status == 502, "oversized body: {got:?}");
    ensure!(got.text().contains("64 KiB"), "{}", got.text());

    // A listener that goes away in the middle of a request.
    let sender = request("/payroll/e", None);
    next_request(&mut control).await?;
    drop(control);
    let got = sender.await??;
    ensure!(got.status == 502, "vanished listener: {got:?}");
    ensure!(got.text().contains("went away"), "{}", got.text());

    // The relay goes on: a new listener answers.
    let mut control = listen(&relay, &listen_cs, unix_now()? + 600).await?;

    // A listener that goes away in the middle of a body it streams over a
    // rendezvous: the sender sees a broken response, not a short one.
    let (relay_for_curl, auth_for_curl) = (relay.clone(), auth.clone());
    let sender = tokio::task::spawn_blocking(move || {
        curl_output(&relay_for_curl, "/payroll/g", &["-H", &auth_for_curl], None)
    });
    let req = next_request(&mut control).await?;
    let address = req["address"].as_str().context("address")?;
    let prefix = format!("wss://localhost:{}", relay.listen.port());
    let target = address
        .strip_prefix(&prefix)
        .with_context(|| format!("{address} is not on the host the listener dialled"))?;
    let cert = listen_cs.cert_sha256.context("certificate hash")?;
    let mut rendezvous = client::open(relay.listen, cert, target, &[]).await?;
    send_text(
        &mut rendezvous,
        serde_json::json!({"response": {"requestId": req["id"], "statusCode": 200, "body": true}}),
    )
    .await?;
    rendezvous
        .write_frame(fastwebsockets::Frame::new(
            false,
            fastwebsockets::OpCode::Binary,
            None,
            fastwebsockets::Payload::Owned(b"the first half".to_vec()),
        ))
        .await?;
    // Let the first half reach the sender before the rendezvous drops.
    tokio::time::sleep(Duration::from_millis(300)).await;
    drop(rendezvous);
    let out = sender.await??;
    let shown = String::from_utf8_lossy(&out.stdout);
    ensure!(
        shown.starts_with("HTTP/1.1 200") && shown.contains("the first half"),
        "{shown}"
    );
    ensure!(
        !out.status.success(),
        "a body cut by the listener looked whole to curl: {shown}"
    );
    let sender = request("/payroll/f", None);
    let req = next_request(&mut control).await?;
    send_text(
        &mut control,
        serde_json::json!({"response": {"requestId": req["id"], "statusCode": 204}}),
    )
    .await?;
    let got = sender.await??;
    ensure!(got.status == 204, "after it all: {got:?}");
    Ok(())
}

/// Answers the next request that reaches either listener with 200; which
/// one got it (0 or 1).
async fn answer_either(listeners: &mut [client::Ws; 2]) -> Result<usize> {
    let [a, b] = listeners;
    let (which, req, ws) = tokio::select! {
        req = next_request(a) => (0, req?, a),
        req = next_request(b) => (1, req?, b),
    };
    send_text(
        ws,
        serde_json::json!({"response": {"requestId": req["id"], "statusCode": 200}}),
    )
    .await?;
    Ok(which)
}

/// HTTP requests are spread over a hybrid connection's listeners round
/// robin, as WebSocket senders are.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_requests_take_turns_among_the_listeners() -> Result<()> {
    let relay = std::sync::Arc::new(tokio::task::spawn_blocking(Relay::start).await??);
    let (send, listen_cs) = relay.create_hc("payroll", "127.0.0.1:9".parse()?)?;
    let auth = format!("ServiceBusAuthorization: {}", send.token(unix_now()? + 600));
    let expiry = unix_now()? + 600;
    let mut listeners = [
        listen(&relay, &listen_cs, expiry).await?,
        listen(&relay, &listen_cs, expiry).await?,
    ];
    let mut turns = Vec::new();
    for _ in 0..4 {
        let (relay, auth) = (relay.clone(), auth.clone());
        let sender =
            tokio::task::spawn_blocking(move || curl(&relay, "/payroll/x", &["-H", &auth], None));
        turns.push(answer_either(&mut listeners).await?);
        let got = sender.await??;
        ensure!(got.status == 200, "{got:?}");
    }
    ensure!(
        turns == [0, 1, 0, 1] || turns == [1, 0, 1, 0],
        "requests went to listeners {turns:?}"
    );
    Ok(())
}

/// A tenant whose listener never answers cannot hold more than
/// `--max-http-requests-per-hc` of the relay's requests: past it its
/// senders get 503 at once, and another hybrid connection's requests go
/// on being answered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_listener_holds_at_most_its_share_of_http_requests() -> Result<()> {
    let data = tempfile::tempdir()?;
    let data_dir = data.path().to_path_buf();
    let relay = std::sync::Arc::new(
        tokio::task::spawn_blocking(move || {
            Relay::start_with(
                &data_dir,
                "127.0.0.1:0",
                &[
                    "--max-http-requests-per-hc",
                    "2",
                    "--http-response-timeout",
                    "8",
                ],
            )
        })
        .await??,
    );
    let (send, listen_cs) = relay.create_hc("payroll", "127.0.0.1:9".parse()?)?;
    let (send_other, listen_other) = relay.create_hc("billing", "127.0.0.1:9".parse()?)?;
    let expiry = unix_now()? + 600;
    // Takes requests and never answers them.
    let mut silent = listen(&relay, &listen_cs, expiry).await?;
    let answering = listen(&relay, &listen_other, expiry).await?;

    let auth = format!("ServiceBusAuthorization: {}", send.token(expiry));
    let mut pending = Vec::new();
    for _ in 0..2 {
        let (relay, auth) = (relay.clone(), auth.clone());
        pending.push(tokio::task::spawn_blocking(move || {
            curl(&relay, "/payroll/slow", &["-H", &auth], None)
        }));
        next_request(&mut silent).await?;
    }
    let started = Instant::now();
    let (relay3, auth3) = (relay.clone(), auth.clone());
    let third =
        tokio::task::spawn_blocking(move || curl(&relay3, "/payroll/slow", &["-H", &auth3], None))
            .await??;
    ensure!(third.status == 503, "the third request: {third:?}");
    ensure!(
        String::from_utf8_lossy(&third.body).contains("--max-http-requests-per-hc"),
        "{third:?}"
    );
    ensure!(
        started.elapsed() < Duration::from_secs(3),
        "the refusal took {:?}",
        started.elapsed()
    );

    // The other tenant is served meanwhile.
    let auth_other = format!("ServiceBusAuthorization: {}", send_other.token(expiry));
    let relay_other = relay.clone();
    let other = tokio::task::spawn_blocking(move || {
        curl(&relay_other, "/billing/x", &["-H", &auth_other], None)
    });
    let mut answering = [answering];
    let [ws] = &mut answering;
    let req = next_request(ws).await?;
    send_text(
        ws,
        serde_json::json!({"response": {"requestId": req["id"], "statusCode": 200}}),
    )
    .await?;
    let other = other.await??;
    ensure!(other.status == 200, "another tenant's request: {other:?}");

    // The held ones end with 504 at their timeout, and the share is free.
    for p in pending {
        let got = p.await??;
        ensure!(got.status == 504, "{got:?}");
    }
    let (relay4, auth4) = (relay.clone(), auth.clone());
    let again =
        tokio::task::spawn_blocking(move || curl(&relay4, "/payroll/x", &["-H", &auth4], None));
    let req = next_request(&mut silent).await?;
    send_text(
        &mut silent,
        serde_json::json!({"response": {"requestId": req["id"], "statusCode": 200}}),
    )
    .await?;
    let again = again.await??;
    ensure!(again.status == 200, "after the timeouts: {again:?}");
    Ok(())
}
