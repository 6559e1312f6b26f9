//! One Azure-protocol WebSocket joined to one TCP connection, as azbridge
//! joins them: every binary (or text) message's bytes go to the socket,
//! every read from the socket goes out as one binary message, Pings are
//! answered.
//!
//! Half-close works both ways. The end of the socket's reading side sends
//! a Close frame (1000, "Shutdown") and keeps delivering what the WebSocket
//! still brings; a Close frame from the WebSocket shuts the socket's
//! writing side down and keeps sending what the socket still reads. The
//! bridge ends when both directions have ended, or at once when either side
//! fails.

use std::sync::Arc;

use fastwebsockets::{Frame, OpCode, Payload, WebSocket, WebSocketError, WebSocketWrite};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, WriteHalf};
use tokio::sync::Mutex;

/// Bytes read from the socket per message (azbridge uses the same).
pub const CHUNK: usize = 64 << 10;
/// The close code of a half-close.
pub const CLOSE_NORMAL: u16 = 1000;

/// What went through a bridge.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Bridged {
    /// Bytes from the WebSocket to the socket.
    pub to_socket: u64,
    /// Bytes from the socket to the WebSocket.
    pub from_socket: u64,
}

type Writer<S> = Arc<Mutex<WebSocketWrite<WriteHalf<S>>>>;

async fn send<S: AsyncWrite>(writer: &Writer<S>, frame: Frame<'_>) -> Result<(), WebSocketError> {
    let mut writer = writer.lock().await;
    writer.write_frame(frame).await?;
    writer.flush().await
}

/// Joins `ws` and `socket` until both directions end. `first` is a message
/// already read from the WebSocket, delivered to the socket first.
pub async fn bridge<W, T>(ws: WebSocket<W>, socket: T, first: Option<Vec<u8>>) -> Bridged
where
    W: AsyncRead + AsyncWrite + Unpin + Send,
    T: AsyncRead + AsyncWrite + Unpin,
{
    let mut ws = ws;
    ws.set_auto_close(false);
    ws.set_auto_pong(true);
    let (mut from_ws, ws_writer) = ws.split(tokio::io::split);
    let ws_writer: Writer<W> = Arc::new(Mutex::new(ws_writer));
    let (mut socket_reader, mut socket_writer) = tokio::io::split(socket);

    let inbound = async {
        let mut count = 0u64;
        if let Some(first) = first {
            if socket_writer.write_all(&first).await.is_err() {
                return (false, count);
            }
            count += first.len() as u64;
        }
        let mut obligated = |frame: Frame<'static>| {
            let writer = ws_writer.clone();
            async move { send(&writer, frame).await }
        };
        loop {
            let frame = match from_ws.read_frame(&mut obligated).await {
                Ok(frame) => frame,
                Err(_) => return (false, count),
            };
            match frame.opcode {
                OpCode::Binary | OpCode::Text | OpCode::Continuation => {
                    if socket_writer.write_all(&frame.payload).await.is_err() {
                        return (false, count);
                    }
                    count += frame.payload.len() as u64;
                }
                OpCode::Close => {
                    let _ = socket_writer.shutdown().await;
                    return (true, count);
                }
                OpCode::Ping | OpCode::Pong => {}
            }
        }
    };
    let outbound = async {
        let mut count = 0u64;
        let mut buf = vec![0u8; CHUNK];
        loop {
            match socket_reader.read(&mut buf).await {
                Ok(0) => {
                    let close = Frame::close(CLOSE_NORMAL, b"Shutdown");
                    return (send(&ws_writer, close).await.is_ok(), count);
                }
                Ok(n) => {
                    let frame = Frame::binary(Payload::Borrowed(&buf[..n]));
                    if send(&ws_writer, frame).await.is_err() {
                        return (false, count);
                    }
                    count += n as u64;
                }
                Err(_) => return (false, count),
            }
        }
    };
    tokio::pin!(inbound, outbound);
    let mut bridged = Bridged::default();
    // Either direction failing ends both; a clean end waits for the other.
    tokio::select! {
        (clean, n) = &mut inbound => {
            bridged.to_socket = n;
            if clean {
                bridged.from_socket = outbound.await.1;
            }
        }
        (clean, n) = &mut outbound => {
            bridged.from_socket = n;
            if clean {
                bridged.to_socket = inbound.await.1;
            }
        }
    }
    bridged
}

#[cfg(test)]
mod tests {
    use super::*;
    use fastwebsockets::Role;

    /// A WebSocket pair over memory: (server end, client end).
    fn pair() -> (
        WebSocket<tokio::io::DuplexStream>,
        WebSocket<tokio::io::DuplexStream>,
    ) {
        let (a, b) = tokio::io::duplex(1 << 20);
        (
            WebSocket::after_handshake(a, Role::Server),
            WebSocket::after_handshake(b, Role::Client),
        )
    }

    #[tokio::test]
    async fn bytes_cross_both_ways_and_a_half_close_keeps_the_other_direction() {
        let (server, client) = pair();
        // Split, as a client that half-closes must be: an unsplit
        // WebSocket stops reading once it has sent a Close.
        let (mut client_rx, mut client_tx) = client.split(tokio::io::split);
        let (socket, mut app) = tokio::io::duplex(1 << 20);
        let bridge = tokio::spawn(bridge(server, socket, Some(b"first ".to_vec())));

        client_tx
            .write_frame(Frame::binary(Payload::Borrowed(b"to the socket")))
            .await
            .unwrap();
        // The WebSocket side half-closes; the socket must see its end.
        client_tx
            .write_frame(Frame::close(1000, b"Shutdown"))
            .await
            .unwrap();
        let mut got = Vec::new();
        app.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, b"first to the socket");

        // The other direction still flows, then ends with a Close.
        app.write_all(b"the answer").await.unwrap();
        app.shutdown().await.unwrap();
        let mut ignore = |_: Frame<'_>| async { Ok::<(), WebSocketError>(()) };
        let frame = client_rx.read_frame(&mut ignore).await.unwrap();
        assert_eq!(frame.opcode, OpCode::Binary);
        assert_eq!(&frame.payload[..], b"the answer");
        let frame = client_rx.read_frame(&mut ignore).await.unwrap();
        assert_eq!(frame.opcode, OpCode::Close);
        let bridged = bridge.await.unwrap();
        assert_eq!(
            bridged,
            Bridged {
                to_socket: 19,
                from_socket: 10
            }
        );
    }

    #[tokio::test]
    async fn a_dropped_websocket_ends_the_bridge() {
        let (server, client) = pair();
        let (socket, _app) = tokio::io::duplex(1 << 20);
        let bridge = tokio::spawn(bridge(server, socket, None));
        drop(client);
        let done = tokio::time::timeout(std::time::Duration::from_secs(5), bridge).await;
        assert!(done.is_ok(), "the bridge outlived its WebSocket");
    }
}
