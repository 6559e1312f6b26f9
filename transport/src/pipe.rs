//! Pipes: a TCP connection to the relay, introduced by a one-time ticket and
//! spliced by the relay to the other end's, with TLS end to end inside and the
//! stream multiplexer inside that.

use std::time::Duration;

use proto::control::{Fingerprint, PipeRole, Ticket, encode_pipe_preamble};
use proto::e2e::{BINDING_LEN, ChannelBinding, EXPORTER_LABEL};
use tokio::io::AsyncWriteExt;
use tokio::time::timeout;
use tokio_rustls::{TlsAcceptor, TlsConnector};

use crate::control::RelayAddr;
use crate::mux::{self, Incoming, MuxConfig, MuxHandle, Side};
use crate::tls::{DataIdentity, TlsError, pipe_server_name};

/// How long dialing, meeting the other end and the TLS handshake may take.
pub const PIPE_SETUP_TIMEOUT: Duration = Duration::from_secs(10);

/// Why a pipe could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum PipeError {
    /// The relay port could not be reached.
    #[error("cannot reach the relay at {relay} for a pipe: {source}")]
    Dial {
        /// The relay.
        relay: String,
        /// The socket error.
        source: std::io::Error,
    },
    /// TLS with the other end failed: its key did not match the one the relay
    /// announced, or the relay did not splice us to anyone.
    #[error("end-to-end TLS with the {peer} end of the pipe failed: {source}")]
    Handshake {
        /// "agent" or "sender".
        peer: &'static str,
        /// The TLS or socket error.
        source: std::io::Error,
    },
    /// Setup took too long.
    #[error("pipe setup did not finish within {0:?}")]
    Timeout(Duration),
    /// TLS configuration failed.
    #[error(transparent)]
    Tls(#[from] TlsError),
}

async fn dial_with_ticket(
    relay: &RelayAddr,
    ticket: &Ticket,
    role: PipeRole,
) -> Result<tokio::net::TcpStream, PipeError> {
    let dial_err = |source| PipeError::Dial {
        relay: relay.to_string(),
        source,
    };
    let mut tcp = relay.dial().await.map_err(dial_err)?;
    tcp.write_all(&encode_pipe_preamble(ticket, role))
        .await
        .map_err(dial_err)?;
    Ok(tcp)
}

/// An open pipe: the multiplexer, the streams the other end opens, and the
/// TLS session's channel binding for end-to-end proofs (`proto::e2e`).
#[derive(Debug)]
pub struct Pipe {
    /// Opens streams.
    pub mux: MuxHandle,
    /// Streams the other end opens.
    pub incoming: Incoming,
    /// The value both ends of this TLS session (and no other) share.
    pub binding: ChannelBinding,
}

/// Exports the channel binding of a finished TLS handshake.
fn binding_of<D>(conn: &rustls::ConnectionCommon<D>) -> Result<ChannelBinding, PipeError> {
    let out = conn
        .export_keying_material([0u8; BINDING_LEN], EXPORTER_LABEL, None)
        .map_err(TlsError::from)?;
    Ok(ChannelBinding(out))
}

/// The sender's end: dial the relay with `ticket`, run TLS as client pinning
/// the agent's key `agent`, and start the multiplexer.
pub async fn connect_as_sender(
    relay: &RelayAddr,
    ticket: &Ticket,
    identity: &DataIdentity,
    agent: Fingerprint,
    config: MuxConfig,
) -> Result<Pipe, PipeError> {
    let setup = async {
        let tcp = dial_with_ticket(relay, ticket, PipeRole::Sender).await?;
        let tls = TlsConnector::from(identity.pipe_client_config(agent)?)
            .connect(pipe_server_name(), tcp)
            .await
            .map_err(|source| PipeError::Handshake {
                peer: "agent",
                source,
            })?;
        let binding = binding_of(tls.get_ref().1)?;
        let (mux, incoming) = mux::spawn_session(tls, Side::Client, config);
        Ok(Pipe {
            mux,
            incoming,
            binding,
        })
    };
    timeout(PIPE_SETUP_TIMEOUT, setup)
        .await
        .map_err(|_| PipeError::Timeout(PIPE_SETUP_TIMEOUT))?
}

/// The agent's end: dial the relay with `ticket`, run TLS as server accepting
/// only the sender key `sender`, and start the multiplexer.
pub async fn connect_as_agent(
    relay: &RelayAddr,
    ticket: &Ticket,
    identity: &DataIdentity,
    sender: Fingerprint,
    config: MuxConfig,
) -> Result<Pipe, PipeError> {
    let setup = async {
        let tcp = dial_with_ticket(relay, ticket, PipeRole::Agent).await?;
        let tls = TlsAcceptor::from(identity.pipe_server_config(sender)?)
            .accept(tcp)
            .await
            .map_err(|source| PipeError::Handshake {
                peer: "sender",
                source,
            })?;
        let binding = binding_of(tls.get_ref().1)?;
        let (mux, incoming) = mux::spawn_session(tls, Side::Server, config);
        Ok(Pipe {
            mux,
            incoming,
            binding,
        })
    };
    timeout(PIPE_SETUP_TIMEOUT, setup)
        .await
        .map_err(|_| PipeError::Timeout(PIPE_SETUP_TIMEOUT))?
}
