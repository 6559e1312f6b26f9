//! Dialing a hybrid connection's endpoint.

use std::io::ErrorKind;
use std::time::Duration;

use proto::control::{RefusalCode, StreamRefusal};
use proto::name::Endpoint;
use tokio::net::TcpStream;

/// Connects to `endpoint` within `limit`, turning failures into the refusal
/// the sender will see.
pub async fn dial(endpoint: &Endpoint, limit: Duration) -> Result<TcpStream, StreamRefusal> {
    let target = (endpoint.host().to_string(), endpoint.port());
    let refusal = |code, message: String| StreamRefusal { code, message };
    match tokio::time::timeout(limit, TcpStream::connect(target)).await {
        Ok(Ok(tcp)) => {
            let _ = tcp.set_nodelay(true);
            Ok(tcp)
        }
        Ok(Err(e)) if e.kind() == ErrorKind::ConnectionRefused => Err(refusal(
            RefusalCode::Refused,
            format!("{endpoint} refused the connection"),
        )),
        Ok(Err(e)) => Err(refusal(
            RefusalCode::Unreachable,
            format!("{endpoint} is unreachable: {e}"),
        )),
        Err(_) => Err(refusal(
            RefusalCode::Unreachable,
            format!("{endpoint} did not answer within {limit:?}"),
        )),
    }
}
