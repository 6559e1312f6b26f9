//! The data phase of an accepted connection: WebSocket frames relayed
//! between the sender's leg and the listener's, both of which the relay
//! serves.
//!
//! Text, binary and continuation frames go across with their opcode and
//! FIN bit, so messages keep their boundaries and fragments. Pings are
//! answered on the leg they came from and Pongs end there. A Close is
//! *forwarded*, not answered: the leg that sent it has finished sending,
//! but the other leg may go on until it sends its own Close, which is
//! forwarded back (half-close, as azbridge and .NET's
//! `HybridConnectionStream.Shutdown` use it). When both directions have
//! seen their Close, or one leg fails, the pump ends and both connections
//! are dropped.

use std::sync::Arc;
use std::time::Duration;

use fastwebsockets::{
    Frame, OpCode, Payload, WebSocket, WebSocketError, WebSocketRead, WebSocketWrite,
};
use tokio::io::{AsyncRead, AsyncWrite, ReadHalf, WriteHalf};
use tokio::sync::Mutex;
use tracing::debug;

/// Largest frame payload relayed, in bytes; a bigger frame ends the
/// connection (the peer should fragment it).
pub const MAX_FRAME: usize = 16 << 20;
/// After one leg failed (its connection dropped without a Close), how long
/// the other gets to answer the Close the relay sends it.
pub const CLOSE_GRACE: Duration = Duration::from_secs(5);
/// The close code sent to the surviving leg when the other one drops
/// without a Close: the other end went away.
pub const GOING_AWAY: u16 = 1001;
/// The close code sent for a Close frame that cannot be forwarded as it is.
pub const PROTOCOL_ERROR: u16 = 1002;

type Writer<S> = Arc<Mutex<WebSocketWrite<WriteHalf<S>>>>;

/// How one direction ended.
#[derive(Debug)]
enum Ended {
    /// Its Close was forwarded.
    Closed,
    /// Its leg failed.
    Failed(WebSocketError),
}

/// What went across, for the log.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Relayed {
    /// Data frames from the sender to the listener.
    pub to_listener: u64,
    /// Data frames from the listener to the sender.
    pub to_sender: u64,
}

/// Relays frames between `sender` and `listener` until both have closed or
/// one fails. Both are the relay's server ends of their WebSockets.
pub async fn pump<A, B>(sender: WebSocket<A>, listener: WebSocket<B>) -> Relayed
where
    A: AsyncRead + AsyncWrite + Unpin + Send,
    B: AsyncRead + AsyncWrite + Unpin + Send,
{
    let (from_sender, sender_writer) = split(sender);
    let (from_listener, listener_writer) = split(listener);
    let mut relayed = Relayed::default();
    let (to_listener_count, to_sender_count);
    {
        let up = forward(from_sender, sender_writer.clone(), listener_writer.clone());
        let down = forward(
            from_listener,
            listener_writer.clone(),
            sender_writer.clone(),
        );
        tokio::pin!(up, down);
        tokio::select! {
            (ended, n) = &mut up => {
                to_listener_count = n;
                to_sender_count = finish(ended, &listener_writer, down).await;
            }
            (ended, n) = &mut down => {
                to_sender_count = n;
                to_listener_count = finish(ended, &sender_writer, up).await;
            }
        }
    }
    relayed.to_listener = to_listener_count;
    relayed.to_sender = to_sender_count;
    relayed
}

/// One direction has ended: let the other run to its Close, or, if the
/// first one's leg failed, close the other leg and give it
/// [`CLOSE_GRACE`]. Returns the other direction's count.
async fn finish<S, F>(ended: Ended, other_writer: &Writer<S>, other: F) -> u64
where
    S: AsyncWrite,
    F: std::future::Future<Output = (Ended, u64)>,
{
    match ended {
        Ended::Closed => other.await.1,
        Ended::Failed(e) => {
            debug!(error = %e, "one leg ended without a Close");
            let _ = write(
                other_writer,
                Frame::close(GOING_AWAY, b"the other end went away"),
            )
            .await;
            tokio::time::timeout(CLOSE_GRACE, other)
                .await
                .map_or(0, |(_, n)| n)
        }
    }
}

fn split<S>(ws: WebSocket<S>) -> (WebSocketRead<ReadHalf<S>>, Writer<S>)
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let (mut read, write) = ws.split(tokio::io::split);
    // The relay forwards Closes instead of answering them, and answers
    // Pings itself.
    read.set_auto_close(false);
    read.set_auto_pong(true);
    read.set_max_message_size(MAX_FRAME);
    (read, Arc::new(Mutex::new(write)))
}

async fn write<S: AsyncWrite>(writer: &Writer<S>, frame: Frame<'_>) -> Result<(), WebSocketError> {
    let mut writer = writer.lock().await;
    writer.write_frame(frame).await?;
    writer.flush().await
}

/// Moves one direction: frames read from one leg are written to the other,
/// until a Close has been forwarded or something fails. Returns how it
/// ended and the data frames it moved.
async fn forward<A, B>(
    mut from: WebSocketRead<ReadHalf<A>>,
    from_writer: Writer<A>,
    to: Writer<B>,
) -> (Ended, u64)
where
    A: AsyncRead + AsyncWrite,
    B: AsyncWrite,
{
    let mut frames = 0;
    let mut answer = |frame: Frame<'static>| {
        let writer = from_writer.clone();
        async move {
            match write(&writer, frame).await {
                // A Pong on a leg the relay already sent a Close to (the
                // other leg finished first) is not owed any more.
                Err(WebSocketError::ConnectionClosed) => Ok(()),
                other => other,
            }
        }
    };
    loop {
        let frame = match from.read_frame(&mut answer).await {
            Ok(frame) => frame,
            Err(e) => return (Ended::Failed(e), frames),
        };
        let result = match frame.opcode {
            OpCode::Text | OpCode::Binary | OpCode::Continuation => {
                frames += 1;
                let payload = Payload::Owned(frame.payload.to_vec());
                write(&to, Frame::new(frame.fin, frame.opcode, None, payload)).await
            }
            OpCode::Close => {
                let close = match frame.payload.len() {
                    0 | 2..=125 => Frame::close_raw(Payload::Owned(frame.payload.to_vec())),
                    _ => Frame::close(PROTOCOL_ERROR, b"malformed close frame"),
                };
                return match write(&to, close).await {
                    Ok(()) => (Ended::Closed, frames),
                    Err(e) => (Ended::Failed(e), frames),
                };
            }
            // Per leg: answered by the reader (Ping), or nothing to do.
            OpCode::Ping | OpCode::Pong => Ok(()),
        };
        if let Err(e) = result {
            return (Ended::Failed(e), frames);
        }
    }
}

#[cfg(test)]
mod tests {
    use fastwebsockets::Role;
    use tokio::io::DuplexStream;

    use super::*;

    /// A client end and the relay's server end of one leg, in memory.
    fn leg() -> (WebSocket<DuplexStream>, WebSocket<DuplexStream>) {
        let (client, relay) = tokio::io::duplex(1 << 16);
        let mut client = WebSocket::after_handshake(client, Role::Client);
        client.set_auto_close(false);
        (client, WebSocket::after_handshake(relay, Role::Server))
    }

    async fn next(ws: &mut WebSocketRead<ReadHalf<DuplexStream>>) -> (bool, OpCode, Vec<u8>) {
        let frame = ws
            .read_frame(&mut |_| async { Ok::<_, WebSocketError>(()) })
            .await
            .unwrap();
        (frame.fin, frame.opcode, frame.payload.to_vec())
    }

    fn frame(fin: bool, opcode: OpCode, payload: &[u8]) -> Frame<'static> {
        Frame::new(fin, opcode, None, Payload::Owned(payload.to_vec()))
    }

    #[tokio::test]
    async fn frames_keep_their_opcode_and_fin_and_a_half_close_lets_the_other_direction_finish() {
        let (sender, sender_relay) = leg();
        let (listener, listener_relay) = leg();
        let relay = tokio::spawn(pump(sender_relay, listener_relay));
        let (mut sender_rx, mut sender_tx) = sender.split(tokio::io::split);
        let (mut listener_rx, mut listener_tx) = listener.split(tokio::io::split);
        sender_rx.set_auto_close(false);
        listener_rx.set_auto_close(false);

        sender_tx
            .write_frame(frame(true, OpCode::Text, b"hello"))
            .await
            .unwrap();
        sender_tx
            .write_frame(frame(false, OpCode::Binary, b"part 1,"))
            .await
            .unwrap();
        sender_tx
            .write_frame(frame(true, OpCode::Continuation, b" part 2"))
            .await
            .unwrap();
        // A Ping is answered on its own leg and never reaches the other.
        sender_tx
            .write_frame(frame(true, OpCode::Ping, b"are you there"))
            .await
            .unwrap();
        assert_eq!(
            next(&mut listener_rx).await,
            (true, OpCode::Text, b"hello".to_vec())
        );
        assert_eq!(
            next(&mut listener_rx).await,
            (false, OpCode::Binary, b"part 1,".to_vec())
        );
        assert_eq!(
            next(&mut listener_rx).await,
            (true, OpCode::Continuation, b" part 2".to_vec())
        );
        assert_eq!(
            next(&mut sender_rx).await,
            (true, OpCode::Pong, b"are you there".to_vec())
        );

        // The sender is done sending: its Close reaches the listener as it
        // was sent, and nobody answers it on the sender's behalf.
        sender_tx
            .write_frame(Frame::close(1000, b"Shutdown"))
            .await
            .unwrap();
        let (_, opcode, payload) = next(&mut listener_rx).await;
        assert_eq!(
            (opcode, &payload[..2], &payload[2..]),
            (OpCode::Close, &1000u16.to_be_bytes()[..], &b"Shutdown"[..])
        );
        // The listener still sends, and the sender still receives.
        for i in 0..3u8 {
            listener_tx
                .write_frame(frame(true, OpCode::Binary, &[i; 1000]))
                .await
                .unwrap();
        }
        for i in 0..3u8 {
            assert_eq!(
                next(&mut sender_rx).await,
                (true, OpCode::Binary, vec![i; 1000])
            );
        }
        listener_tx
            .write_frame(Frame::close(1000, b"done too"))
            .await
            .unwrap();
        let (_, opcode, payload) = next(&mut sender_rx).await;
        assert_eq!((opcode, &payload[2..]), (OpCode::Close, &b"done too"[..]));
        let relayed = tokio::time::timeout(Duration::from_secs(5), relay)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(
            relayed,
            Relayed {
                to_listener: 3,
                to_sender: 3
            }
        );
    }

    #[tokio::test]
    async fn a_leg_that_drops_without_a_close_closes_the_other_with_going_away() {
        let (sender, sender_relay) = leg();
        let (listener, listener_relay) = leg();
        let relay = tokio::spawn(pump(sender_relay, listener_relay));
        drop(sender);
        let (mut listener_rx, mut listener_tx) = listener.split(tokio::io::split);
        let (_, opcode, payload) = next(&mut listener_rx).await;
        assert_eq!(
            (opcode, &payload[..2]),
            (OpCode::Close, &GOING_AWAY.to_be_bytes()[..])
        );
        listener_tx
            .write_frame(Frame::close(1000, b""))
            .await
            .unwrap();
        tokio::time::timeout(Duration::from_secs(5), relay)
            .await
            .unwrap()
            .unwrap();
    }
}
