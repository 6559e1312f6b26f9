//! Dialing a hybrid connection's endpoint, within the on-prem policy.

use std::io::ErrorKind;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use proto::control::{RefusalCode, StreamRefusal};
use proto::name::{Endpoint, HcName, Host};
use tokio::net::TcpStream;

use crate::policy::{Denial, Policy};

/// Why a dial did not happen or did not succeed.
#[derive(Debug)]
pub enum DialError {
    /// The policy refuses the endpoint or an address it resolved to.
    Denied(Denial),
    /// The target refused, could not be resolved or reached.
    Failed(StreamRefusal),
}

impl DialError {
    /// The refusal the sender sees.
    pub fn refusal(&self) -> StreamRefusal {
        match self {
            DialError::Denied(d) => StreamRefusal {
                code: RefusalCode::DeniedByPolicy,
                message: d.to_string(),
            },
            DialError::Failed(r) => r.clone(),
        }
    }
}

/// A connected target and the address it was reached at.
#[derive(Debug)]
pub struct Dialed {
    /// The connection.
    pub tcp: TcpStream,
    /// The address it connected to (policy changes are checked against it).
    pub addr: SocketAddr,
}

/// Resolves `endpoint`, checks the name and every address against `policy`,
/// and connects to the first address that answers, all within `limit`.
/// Connecting only to addresses that were checked leaves no gap between the
/// check and the dial.
pub async fn dial(
    policy: &Policy,
    hc: &HcName,
    endpoint: &Endpoint,
    limit: Duration,
) -> Result<Dialed, DialError> {
    let rule = policy
        .check_endpoint(hc, endpoint)
        .map_err(DialError::Denied)?;
    let failed = |code, message: String| DialError::Failed(StreamRefusal { code, message });
    let attempt = async {
        let addrs: Vec<SocketAddr> = match endpoint.host() {
            Host::Ipv4(ip) => vec![SocketAddr::new(IpAddr::V4(*ip), endpoint.port())],
            Host::Dns(name) => tokio::net::lookup_host((name.as_str(), endpoint.port()))
                .await
                .map_err(|e| {
                    failed(
                        RefusalCode::Unreachable,
                        format!("{endpoint} does not resolve: {e}"),
                    )
                })?
                .collect(),
        };
        if addrs.is_empty() {
            return Err(failed(
                RefusalCode::Unreachable,
                format!("{endpoint} resolves to no address"),
            ));
        }
        // Any refused address refuses the name: a name that also resolves
        // into a refused range is not one the administrator meant.
        for addr in &addrs {
            policy
                .check_address(hc, endpoint, rule, addr.ip())
                .map_err(DialError::Denied)?;
        }
        let mut last = None;
        for addr in addrs {
            match TcpStream::connect(addr).await {
                Ok(tcp) => {
                    let _ = tcp.set_nodelay(true);
                    return Ok(Dialed { tcp, addr });
                }
                Err(e) => last = Some(e),
            }
        }
        Err(match last {
            Some(e) if e.kind() == ErrorKind::ConnectionRefused => failed(
                RefusalCode::Refused,
                format!("{endpoint} refused the connection"),
            ),
            Some(e) => failed(
                RefusalCode::Unreachable,
                format!("{endpoint} is unreachable: {e}"),
            ),
            None => failed(
                RefusalCode::Unreachable,
                format!("{endpoint} has no address"),
            ),
        })
    };
    match tokio::time::timeout(limit, attempt).await {
        Ok(result) => result,
        Err(_) => Err(failed(
            RefusalCode::Unreachable,
            format!("{endpoint} did not answer within {limit:?}"),
        )),
    }
}
