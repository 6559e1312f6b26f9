//! Between two hybridlink peers over Azure Relay's protocol: TLS inside
//! the WebSocket, and the end-to-end check inside that TLS, so a relay that
//! terminates the WebSocket (Azure's service, or hybridlink's own Azure
//! front door) sees only ciphertext.
//!
//! The sender offers the sub-protocol [`PROTOCOL`]; an agent that chooses
//! it opens the rendezvous at once and answers the stream preamble with
//! `[1, 0, 0]` followed by [`MARKER`]. azbridge and the Azure SDKs never
//! send that answer (an SDK listener that merely echoes the offered
//! sub-protocol answers `[1, 0, 0]` alone), so the sender knows whom it
//! talks to before it sends a byte of TLS.
//!
//! Then, over the WebSocket's bytes: a TLS 1.3 handshake (the sender as
//! client; both certificates are fresh and unpinned, since nobody
//! introduced them), and inside it two messages, each a 4-byte big-endian
//! length and JSON: the sender's [`Opening`] with its end-to-end proof
//! (`proto::e2e`, bound to this TLS session's exporter), and the agent's
//! [`Verdict`] with its own proof, sent only after the agent has checked
//! the sender's and dialled the target. A relay in the middle would hold
//! two TLS sessions with two exporters, so with an end-to-end key on both
//! ends it can neither read nor take over the stream; without one it could,
//! as on hybridlink's own relay, and status says `relay-trusted`.

use fastwebsockets::WebSocket;
use proto::control::{RefusalCode, StreamRefusal};
use proto::e2e::{BINDING_LEN, ChannelBinding, EXPORTER_LABEL, ProofRole};
use proto::key::Key;
use proto::name::HcName;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, DuplexStream};
use tokio_rustls::{TlsAcceptor, TlsConnector};

use super::AzureError;
use crate::tls::DataIdentity;

/// The sub-protocol of two hybridlink peers.
pub const PROTOCOL: &str = "hybridlink.v1";
/// What an agent speaking [`PROTOCOL`] appends to `[1, 0, 0]`.
pub const MARKER: &[u8] = b"hybridlink.v1";
/// Largest message inside the TLS session.
const MAX_MESSAGE: usize = 8 << 10;
/// Room between the WebSocket and the TLS session.
const ROOM: usize = 256 << 10;

/// The stream inside TLS, in the WebSocket.
pub type InnerClient = tokio_rustls::client::TlsStream<DuplexStream>;
/// The agent's side of it.
pub type InnerServer = tokio_rustls::server::TlsStream<DuplexStream>;

/// The sender's first message.
#[derive(Debug, Serialize, Deserialize)]
pub struct Opening {
    /// The sender's end-to-end proof, when it holds the key.
    pub proof: Option<String>,
}

/// The agent's answer: the stream is open, or why not.
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Verdict {
    /// The target answered; the agent's proof, when it holds the key.
    Accepted {
        /// The agent's end-to-end proof.
        proof: Option<String>,
    },
    /// Refused, with the reason the app side is told.
    Refused(StreamRefusal),
}

/// The answer to a preamble of an agent that speaks [`PROTOCOL`].
pub fn marked_answer() -> Vec<u8> {
    let mut out = super::preamble::ACCEPTED.to_vec();
    out.extend_from_slice(MARKER);
    out
}

fn tls_error(e: impl std::fmt::Display) -> AzureError {
    AzureError::Unusable(format!("TLS inside the WebSocket: {e}"))
}

/// Joins `ws` to one end of an in-memory stream in the background; the
/// other end carries the TLS session.
fn carry<S>(ws: WebSocket<S>) -> DuplexStream
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (inner, outer) = tokio::io::duplex(ROOM);
    tokio::spawn(super::bridge::bridge(ws, outer, None));
    inner
}

fn binding<D>(conn: &rustls::ConnectionCommon<D>) -> Result<ChannelBinding, AzureError> {
    conn.export_keying_material([0u8; BINDING_LEN], EXPORTER_LABEL, None)
        .map(ChannelBinding)
        .map_err(tls_error)
}

async fn write_message<S, T>(io: &mut S, message: &T) -> Result<(), AzureError>
where
    S: tokio::io::AsyncWrite + Unpin,
    T: Serialize,
{
    let body = serde_json::to_vec(message).map_err(|e| AzureError::Unusable(e.to_string()))?;
    io.write_all(&(body.len() as u32).to_be_bytes()).await?;
    io.write_all(&body).await?;
    io.flush().await?;
    Ok(())
}

async fn read_message<S, T>(io: &mut S) -> Result<T, AzureError>
where
    S: tokio::io::AsyncRead + Unpin,
    T: for<'de> Deserialize<'de>,
{
    let len = io.read_u32().await? as usize;
    if len > MAX_MESSAGE {
        return Err(AzureError::BadAnswer(format!(
            "a message of {len} bytes inside the stream's TLS"
        )));
    }
    let mut body = vec![0u8; len];
    io.read_exact(&mut body).await?;
    serde_json::from_slice(&body).map_err(|e| AzureError::BadAnswer(e.to_string()))
}

/// Why the sender's side ended before the stream opened.
#[derive(Debug, thiserror::Error)]
pub enum InnerError {
    /// The agent refused (its target, its policy, the end-to-end check).
    #[error("{}", .0.message)]
    Refused(StreamRefusal),
    /// The end-to-end check of the agent failed on this side.
    #[error("{0}")]
    EndToEnd(#[from] proto::e2e::EndToEndError),
    /// The session failed.
    #[error("{0}")]
    Azure(#[from] AzureError),
}

/// The sender's side, once the agent's answer carried [`MARKER`]: TLS as
/// client, the opening with `key`'s proof, and the agent's verdict, whose
/// proof is checked when this side holds a key.
pub async fn open_as_sender<S>(
    ws: WebSocket<S>,
    hc: &HcName,
    key: Option<&Key>,
) -> Result<InnerClient, InnerError>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let config = crate::tls::unpinned_client_config().map_err(tls_error)?;
    let mut tls = TlsConnector::from(config)
        .connect(crate::tls::pipe_server_name(), carry(ws))
        .await
        .map_err(tls_error)?;
    let binding = binding(tls.get_ref().1)?;
    let proof = key.map(|k| proto::e2e::prove(k, ProofRole::Sender, hc, &binding));
    write_message(&mut tls, &Opening { proof }).await?;
    match read_message::<_, Verdict>(&mut tls).await? {
        Verdict::Refused(refusal) => Err(InnerError::Refused(refusal)),
        Verdict::Accepted { proof } => {
            if let Some(key) = key {
                proto::e2e::verify(key, ProofRole::Agent, hc, &binding, proof.as_deref())?;
            }
            Ok(tls)
        }
    }
}

/// The agent's side after it sent [`marked_answer`]: TLS as server, then
/// the sender's opening, checked when this side holds `key`. Returns the
/// session and the binding its proofs are made for; the caller dials and
/// then answers with [`answer`].
pub async fn accept_as_agent<S>(
    ws: WebSocket<S>,
    identity: &DataIdentity,
    hc: &HcName,
    key: Option<&Key>,
) -> Result<(InnerServer, ChannelBinding), InnerError>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let config = identity.unpinned_server_config().map_err(tls_error)?;
    let mut tls = TlsAcceptor::from(config)
        .accept(carry(ws))
        .await
        .map_err(tls_error)?;
    let binding = binding(tls.get_ref().1)?;
    let opening: Opening = read_message(&mut tls).await?;
    let checked = key.map(|key| {
        proto::e2e::verify(
            key,
            ProofRole::Sender,
            hc,
            &binding,
            opening.proof.as_deref(),
        )
    });
    if let Some(Err(e)) = checked {
        let refusal = StreamRefusal {
            code: RefusalCode::EndToEnd,
            message: e.to_string(),
        };
        let _ = write_message(&mut tls, &Verdict::Refused(refusal)).await;
        let _ = tls.shutdown().await;
        return Err(e.into());
    }
    Ok((tls, binding))
}

/// The agent's verdict: open (with its proof when it holds `key`), or
/// refused.
pub async fn answer(
    tls: &mut InnerServer,
    binding: &ChannelBinding,
    hc: &HcName,
    key: Option<&Key>,
    refusal: Option<StreamRefusal>,
) -> Result<(), AzureError> {
    let verdict = match refusal {
        Some(refusal) => Verdict::Refused(refusal),
        None => Verdict::Accepted {
            proof: key.map(|k| proto::e2e::prove(k, ProofRole::Agent, hc, binding)),
        },
    };
    write_message(tls, &verdict).await?;
    if matches!(verdict, Verdict::Refused(_)) {
        let _ = tls.shutdown().await;
    }
    Ok(())
}
