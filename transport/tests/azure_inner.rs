//! A relay that terminates the WebSockets between two hybridlink peers, as
//! an Azure Relay namespace (or hybridlink's own Azure front door) does,
//! tries to read and to take over their streams:
//!
//! - a recording relay sees only ciphertext (the TLS inside the
//!   WebSocket);
//! - a relay that runs that TLS itself toward each end (a man in the
//!   middle) is caught by the end-to-end check when both ends hold the
//!   key, whichever end checks first, and the stream never opens;
//! - without a key such a relay can read the stream: that is why the
//!   agent's status says `relay-trusted` or `relay-sees-payload` then.

use std::sync::{Arc, Mutex};

use fastwebsockets::{Frame, OpCode, Payload, Role, WebSocket};
use proto::key::Key;
use proto::name::HcName;
use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};
use transport::azure::inner::{self, InnerError};
use transport::tls::DataIdentity;

type Ws = WebSocket<DuplexStream>;

/// A WebSocket whose client end is one peer and whose server end is the
/// relay's leg.
fn leg() -> (Ws, Ws) {
    let (a, b) = tokio::io::duplex(1 << 20);
    (
        WebSocket::after_handshake(a, Role::Client),
        WebSocket::after_handshake(b, Role::Server),
    )
}

/// Relays frames one way, keeping a copy of every payload.
async fn pump_one_way(
    mut from: fastwebsockets::WebSocketRead<tokio::io::ReadHalf<DuplexStream>>,
    mut to: fastwebsockets::WebSocketWrite<tokio::io::WriteHalf<DuplexStream>>,
    seen: Arc<Mutex<Vec<u8>>>,
) {
    let mut ignore = |_: Frame<'_>| async { Ok::<(), fastwebsockets::WebSocketError>(()) };
    while let Ok(frame) = from.read_frame(&mut ignore).await {
        if frame.opcode == OpCode::Close {
            let _ = to.write_frame(Frame::close(1000, b"")).await;
            return;
        }
        seen.lock().unwrap().extend_from_slice(&frame.payload);
        let copy = Frame::new(
            true,
            frame.opcode,
            None,
            Payload::Owned(frame.payload.to_vec()),
        );
        if to.write_frame(copy).await.is_err() {
            return;
        }
    }
}

/// A relay joining two legs and recording what crosses: (sender's end,
/// agent's end, everything the relay saw).
fn recording_relay() -> (Ws, Ws, Arc<Mutex<Vec<u8>>>) {
    let (sender, relay_a) = leg();
    let (agent, relay_b) = leg();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let (a_read, a_write) = relay_a.split(tokio::io::split);
    let (b_read, b_write) = relay_b.split(tokio::io::split);
    tokio::spawn(pump_one_way(a_read, b_write, seen.clone()));
    tokio::spawn(pump_one_way(b_read, a_write, seen.clone()));
    (sender, agent, seen)
}

fn hc() -> HcName {
    "payroll".parse().unwrap()
}

/// The agent's side: accepts, answers open, echoes the stream.
async fn echoing_agent(ws: Ws, key: Option<Key>) -> Result<(), InnerError> {
    let identity = DataIdentity::generate().unwrap();
    let (mut tls, binding) = inner::accept_as_agent(ws, &identity, &hc(), key.as_ref()).await?;
    inner::answer(&mut tls, &binding, &hc(), key.as_ref(), None).await?;
    let mut buf = vec![0u8; 4096];
    loop {
        let n = tls
            .read(&mut buf)
            .await
            .map_err(transport::azure::AzureError::from)?;
        if n == 0 {
            let _ = tls.shutdown().await;
            return Ok(());
        }
        tls.write_all(&buf[..n])
            .await
            .map_err(transport::azure::AzureError::from)?;
    }
}

const SECRET: &[u8] = b"the payroll database password is hunter2";

#[tokio::test]
async fn a_recording_relay_sees_only_ciphertext() {
    let key = Key::generate().unwrap();
    let (sender, agent, seen) = recording_relay();
    let agent = tokio::spawn(echoing_agent(agent, Some(key.clone())));
    let mut stream = inner::open_as_sender(sender, &hc(), Some(&key))
        .await
        .unwrap();
    stream.write_all(SECRET).await.unwrap();
    let mut back = vec![0u8; SECRET.len()];
    stream.read_exact(&mut back).await.unwrap();
    assert_eq!(back, SECRET);
    stream.shutdown().await.unwrap();
    drop(stream);
    agent.await.unwrap().unwrap();
    let seen = seen.lock().unwrap().clone();
    assert!(
        seen.len() > SECRET.len() * 2,
        "the relay saw {} bytes",
        seen.len()
    );
    assert!(
        !seen.windows(8).any(|w| SECRET.windows(8).any(|s| s == w)),
        "the relay saw the plaintext"
    );
    let proof_hint = b"proof";
    assert!(
        !seen.windows(proof_hint.len()).any(|w| w == proof_hint),
        "the relay saw the end-to-end messages"
    );
}

/// A relay that is itself the TLS peer of both ends and copies plaintext
/// between them: (sender's end, agent's end, what it read).
fn intercepting_relay() -> (Ws, Ws, Arc<Mutex<Vec<u8>>>) {
    let (sender, toward_sender) = leg();
    let (agent, toward_agent) = leg();
    let read = Arc::new(Mutex::new(Vec::new()));
    let seen = read.clone();
    tokio::spawn(async move {
        // Toward the sender it plays the agent (and proves nothing it does
        // not know); toward the agent, the sender.
        let identity = DataIdentity::generate().unwrap();
        // The relay's legs are WebSocket servers; the inner TLS does not
        // care which side of the WebSocket it runs on.
        let Ok((mut as_agent, binding)) =
            inner::accept_as_agent(toward_sender, &identity, &hc(), None).await
        else {
            return;
        };
        let Ok(mut as_sender) = inner::open_as_sender(toward_agent, &hc(), None).await else {
            let _ = inner::answer(&mut as_agent, &binding, &hc(), None, None).await;
            return;
        };
        let _ = inner::answer(&mut as_agent, &binding, &hc(), None, None).await;
        let mut buf = vec![0u8; 4096];
        if let Ok(n) = as_agent.read(&mut buf).await {
            seen.lock().unwrap().extend_from_slice(&buf[..n]);
            let _ = as_sender.write_all(&buf[..n]).await;
            if let Ok(n) = as_sender.read(&mut buf).await {
                let _ = as_agent.write_all(&buf[..n]).await;
            }
        }
    });
    (sender, agent, read)
}

#[tokio::test]
async fn a_relay_in_the_middle_is_caught_by_the_end_to_end_check() {
    let key = Key::generate().unwrap();
    let (sender, agent, read) = intercepting_relay();
    let agent = tokio::spawn(echoing_agent(agent, Some(key.clone())));
    let opened = inner::open_as_sender(sender, &hc(), Some(&key)).await;
    match opened {
        Err(InnerError::EndToEnd(e)) => {
            assert!(e.to_string().contains("end-to-end check failed"), "{e}")
        }
        Err(other) => panic!("refused for another reason: {other}"),
        Ok(_) => panic!("the stream opened through a relay in the middle"),
    }
    // The agent refused the relay's unproven opening before dialling.
    let agent = agent.await.unwrap();
    assert!(
        matches!(agent, Err(InnerError::EndToEnd(_))),
        "the agent served the relay: {agent:?}"
    );
    assert!(
        read.lock().unwrap().is_empty(),
        "the relay read stream bytes"
    );
}

#[tokio::test]
async fn without_a_key_a_relay_in_the_middle_can_read_which_is_why_status_warns() {
    let (sender, agent, read) = intercepting_relay();
    let agent = tokio::spawn(echoing_agent(agent, None));
    let mut stream = inner::open_as_sender(sender, &hc(), None).await.unwrap();
    stream.write_all(SECRET).await.unwrap();
    let mut back = vec![0u8; SECRET.len()];
    stream.read_exact(&mut back).await.unwrap();
    assert_eq!(back, SECRET);
    assert_eq!(read.lock().unwrap().as_slice(), SECRET);
    drop(stream);
    let _ = agent.await;
}

#[tokio::test]
async fn a_sender_with_the_key_refuses_an_agent_without_it() {
    let key = Key::generate().unwrap();
    let (sender, agent, _) = recording_relay();
    let agent = tokio::spawn(echoing_agent(agent, None));
    let opened = inner::open_as_sender(sender, &hc(), Some(&key)).await;
    assert!(
        matches!(opened, Err(InnerError::EndToEnd(_))),
        "opened without the agent's proof: {:?}",
        opened.err()
    );
    drop(agent);
}
