//! The forwarding part of the DNS server: every name that is not configured
//! goes to the upstream resolvers (see the [module docs](super#what-it-answers)).

use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;

use hickory_proto::op::{LowerQuery, Message, MessageType, ResponseCode};
use hickory_proto::rr::LowerName;
use hickory_server::net::xfer::Protocol;
use hickory_server::server::{Request, ResponseHandler, ResponseInfo};
use hickory_server::zone_handler::MessageResponseBuilder;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UdpSocket};
use tokio::time::{Instant, timeout_at};
use tracing::{debug, trace};

use super::send;

/// The upstream resolvers and the deadline a forwarded query shares
/// between them.
#[derive(Debug)]
pub(super) struct Forwarder {
    /// The resolvers, in order of preference.
    pub(super) upstreams: Vec<SocketAddr>,
    timeout: Duration,
}

impl Forwarder {
    /// Forwards to `upstreams` in turn, all within `timeout`.
    pub(super) fn new(upstreams: Vec<SocketAddr>, timeout: Duration) -> Forwarder {
        Forwarder { upstreams, timeout }
    }

    /// Sends `request` to the upstreams in turn until one answers, within
    /// the forward deadline.
    pub(super) async fn forward(
        &self,
        request: &Request,
        query: &LowerQuery,
    ) -> Result<Message, ForwardError> {
        if self.upstreams.is_empty() {
            return Err(ForwardError::NoUpstream);
        }
        let id: u16 = rand::random();
        let mut raw = request.as_slice().to_vec();
        // The server has already decoded a 12-byte header from these bytes.
        if let Some(head) = raw.get_mut(0..2) {
            head.copy_from_slice(&id.to_be_bytes());
        }
        let deadline = Instant::now() + self.timeout;
        let mut last = ForwardError::Timeout;
        let count = self.upstreams.len();
        for (i, upstream) in self.upstreams.iter().enumerate() {
            let now = Instant::now();
            if now >= deadline {
                break;
            }
            // Each remaining upstream gets an equal share of what is left.
            let share = (deadline - now) / u32::try_from(count - i).unwrap_or(u32::MAX);
            let attempt = if request.protocol() == Protocol::Tcp {
                tcp_exchange(*upstream, &raw, id, query, now + share).await
            } else {
                let max = usize::from(request.max_payload()).max(512);
                udp_exchange(*upstream, &raw, id, query, max, now + share).await
            };
            match attempt {
                Ok(message) => return Ok(message),
                Err(e) => {
                    debug!(%upstream, error = %e, "upstream did not answer");
                    last = e;
                }
            }
        }
        Err(last)
    }
}

/// One query over UDP, from a fresh socket on a random port.
async fn udp_exchange(
    upstream: SocketAddr,
    raw: &[u8],
    id: u16,
    query: &LowerQuery,
    max_len: usize,
    deadline: Instant,
) -> Result<Message, ForwardError> {
    let local: IpAddr = match (upstream.ip(), upstream.ip().is_loopback()) {
        (IpAddr::V4(_), true) => Ipv4Addr::LOCALHOST.into(),
        (IpAddr::V4(_), false) => Ipv4Addr::UNSPECIFIED.into(),
        (IpAddr::V6(_), true) => Ipv6Addr::LOCALHOST.into(),
        (IpAddr::V6(_), false) => Ipv6Addr::UNSPECIFIED.into(),
    };
    let socket = UdpSocket::bind((local, 0)).await?;
    socket.connect(upstream).await?;
    socket.send(raw).await?;
    let mut buf = vec![0u8; max_len];
    loop {
        let len = timeout_at(deadline, socket.recv(&mut buf))
            .await
            .map_err(|_| ForwardError::Timeout)??;
        match Message::from_vec(&buf[..len]) {
            Ok(message) if matches_request(&message, id, query) => return Ok(message),
            // A stray or spoofed datagram: keep waiting for the real answer.
            _ => trace!(%upstream, "ignoring a datagram that does not answer the query"),
        }
    }
}

/// One query over TCP, on a fresh connection.
async fn tcp_exchange(
    upstream: SocketAddr,
    raw: &[u8],
    id: u16,
    query: &LowerQuery,
    deadline: Instant,
) -> Result<Message, ForwardError> {
    let exchange = async {
        let len = u16::try_from(raw.len())
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "query too long for TCP"))?;
        let mut stream = TcpStream::connect(upstream).await?;
        let mut out = Vec::with_capacity(2 + raw.len());
        out.extend_from_slice(&len.to_be_bytes());
        out.extend_from_slice(raw);
        stream.write_all(&out).await?;
        let mut len = [0u8; 2];
        stream.read_exact(&mut len).await?;
        let mut buf = vec![0u8; usize::from(u16::from_be_bytes(len))];
        stream.read_exact(&mut buf).await?;
        Ok::<_, ForwardError>(buf)
    };
    let buf = timeout_at(deadline, exchange)
        .await
        .map_err(|_| ForwardError::Timeout)??;
    match Message::from_vec(&buf) {
        Ok(message) if matches_request(&message, id, query) => Ok(message),
        _ => Err(ForwardError::Mismatch),
    }
}

/// Whether `response` answers the query we sent with `id` for `query`.
///
/// A response without a question is accepted when it carries an error code
/// (some servers send FORMERR and REFUSED that way).
fn matches_request(response: &Message, id: u16, query: &LowerQuery) -> bool {
    if response.metadata.id != id || response.metadata.message_type != MessageType::Response {
        return false;
    }
    match response.queries.as_slice() {
        [] => response.metadata.response_code != ResponseCode::NoError,
        [q] => {
            LowerName::from(q.name()) == *query.name()
                && q.query_type() == query.query_type()
                && q.query_class() == query.query_class()
        }
        _ => false,
    }
}

/// Why a forward failed; for logs only (the client sees SERVFAIL).
#[derive(Debug, thiserror::Error)]
pub(super) enum ForwardError {
    #[error("no upstream resolver is configured")]
    NoUpstream,
    #[error("no upstream answered in time")]
    Timeout,
    #[error("{0}")]
    Io(#[from] io::Error),
    #[error("the upstream answer does not match the query")]
    Mismatch,
}

/// Sends the upstream's answer to the client, under the client's message id.
pub(super) async fn send_relayed<R: ResponseHandler>(
    request: &Request,
    upstream: Message,
    response: R,
) -> ResponseInfo {
    let mut metadata = upstream.metadata;
    metadata.id = request.metadata.id;
    let builder = MessageResponseBuilder::new(&request.queries, upstream.edns.as_ref());
    let message = builder.build(
        metadata,
        upstream.answers.iter(),
        upstream.authorities.iter(),
        std::iter::empty(),
        upstream.additionals.iter(),
    );
    send(request, message, response).await
}

/// Whether `upstream` is the server listening on `local`.
pub(super) fn is_self(upstream: SocketAddr, local: SocketAddr) -> bool {
    upstream.port() == local.port()
        && (upstream.ip() == local.ip()
            || (local.ip().is_unspecified() && upstream.ip().is_loopback()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dns::tests::query;
    use hickory_proto::op::{OpCode, Query};
    use hickory_proto::rr::{Name, RecordType};

    #[test]
    fn upstream_answers_must_match() {
        let q = query("example.test.", RecordType::A);
        let mut m = Message::response(7, OpCode::Query);
        m.add_query(Query::query(
            Name::from_ascii("EXAMPLE.test.").unwrap(),
            RecordType::A,
        ));
        assert!(matches_request(&m, 7, &q));
        assert!(!matches_request(&m, 8, &q));
        assert!(!matches_request(
            &m,
            7,
            &query("other.test.", RecordType::A)
        ));
        assert!(!matches_request(
            &m,
            7,
            &query("example.test.", RecordType::AAAA)
        ));
        let mut m = Message::query();
        m.metadata.id = 7;
        m.add_query(Query::query(
            Name::from_ascii("example.test.").unwrap(),
            RecordType::A,
        ));
        assert!(!matches_request(&m, 7, &q), "a query is not an answer");
        let formerr = Message::error_msg(7, OpCode::Query, ResponseCode::FormErr);
        assert!(matches_request(&formerr, 7, &q));
        let empty = Message::response(7, OpCode::Query);
        assert!(!matches_request(&empty, 7, &q));
    }

    #[test]
    fn self_as_upstream_is_detected() {
        let local: SocketAddr = "127.0.0.53:53".parse().unwrap();
        assert!(is_self("127.0.0.53:53".parse().unwrap(), local));
        assert!(!is_self("127.0.0.1:53".parse().unwrap(), local));
        assert!(!is_self("127.0.0.53:5353".parse().unwrap(), local));
        assert!(is_self(
            "127.0.0.1:53".parse().unwrap(),
            "0.0.0.0:53".parse().unwrap()
        ));
    }
}
