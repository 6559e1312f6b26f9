//! Control messages on a raw connection, for tests that play a peer or a
//! relay by hand (the real ones go through `proto::channel`).

use bytes::BytesMut;
use proto::control;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// Writes one length-prefixed control message.
pub async fn write_message<M: serde::Serialize, W: AsyncWrite + Unpin>(
    w: &mut W,
    msg: &M,
) -> std::io::Result<()> {
    let mut out = BytesMut::new();
    control::encode(msg, &mut out);
    w.write_all(&out).await
}

/// Reads one length-prefixed control message; `Ok(None)` on a clean EOF.
pub async fn read_message<M, R>(r: &mut R, buf: &mut BytesMut) -> std::io::Result<Option<M>>
where
    M: for<'de> serde::Deserialize<'de>,
    R: AsyncRead + Unpin,
{
    read_message_within(r, buf, control::MAX_MESSAGE_LEN).await
}

/// Reads one length-prefixed control message of at most `max_len` bytes;
/// `Ok(None)` on a clean EOF. `buf` grows only as bytes arrive.
pub async fn read_message_within<M, R>(
    r: &mut R,
    buf: &mut BytesMut,
    max_len: usize,
) -> std::io::Result<Option<M>>
where
    M: for<'de> serde::Deserialize<'de>,
    R: AsyncRead + Unpin,
{
    loop {
        match control::decode_within::<M>(buf, max_len) {
            Ok(Some(m)) => return Ok(Some(m)),
            Ok(None) => {}
            Err(e) => return Err(std::io::Error::new(std::io::ErrorKind::InvalidData, e)),
        }
        if r.read_buf(buf).await? == 0 {
            return Ok(None);
        }
    }
}
