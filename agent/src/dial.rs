//! Dialing a hybrid connection's endpoint, within the on-prem policy.

use std::collections::HashMap;
use std::io::ErrorKind;
use std::net::{IpAddr, SocketAddr};
use std::sync::{LazyLock, Mutex};
use std::time::{Duration, Instant};

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
            Host::Dns(name) => resolve(name.as_str(), endpoint.port()).await.map_err(|e| {
                failed(
                    RefusalCode::Unreachable,
                    format!("{endpoint} does not resolve: {e}"),
                )
            })?,
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

/// How long a name's addresses are reused before it is resolved again.
/// The system's resolver (getaddrinfo, on a thread of tokio's blocking
/// pool, reading /etc/hosts and nsswitch.conf each time) cost about a fifth
/// of the agent's CPU per new stream when every stream resolved its name;
/// two seconds makes that once per name per two seconds under load, and
/// a changed address is dialed two seconds later at most.
const RESOLVED_FOR: Duration = Duration::from_secs(2);

/// The most names kept; past it, the expired ones are dropped, and all of
/// them if none has expired.
const RESOLVED_MOST: usize = 4096;

/// Recently resolved names, shared by every stream of this process.
static RESOLVED: LazyLock<Mutex<NameCache>> = LazyLock::new(|| Mutex::new(NameCache::default()));

/// The addresses of `name`, from [`RESOLVED`] if resolved less than
/// [`RESOLVED_FOR`] ago. A failure is not kept: the next stream asks again.
async fn resolve(name: &str, port: u16) -> std::io::Result<Vec<SocketAddr>> {
    let key = (name.to_string(), port);
    if let Some(addrs) = lock(&RESOLVED).get(&key, Instant::now()) {
        return Ok(addrs);
    }
    let addrs: Vec<SocketAddr> = tokio::net::lookup_host((name, port)).await?.collect();
    lock(&RESOLVED).put(key, addrs.clone(), Instant::now());
    Ok(addrs)
}

fn lock(cache: &Mutex<NameCache>) -> std::sync::MutexGuard<'_, NameCache> {
    // Every change replaces an entry whole; a panic cannot leave one half
    // written.
    cache
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Names and ports with their addresses and when they were resolved.
#[derive(Debug, Default)]
struct NameCache {
    entries: HashMap<(String, u16), (Instant, Vec<SocketAddr>)>,
}

impl NameCache {
    fn get(&self, key: &(String, u16), now: Instant) -> Option<Vec<SocketAddr>> {
        let (at, addrs) = self.entries.get(key)?;
        (now.duration_since(*at) < RESOLVED_FOR && !addrs.is_empty()).then(|| addrs.clone())
    }

    fn put(&mut self, key: (String, u16), addrs: Vec<SocketAddr>, now: Instant) {
        if self.entries.len() >= RESOLVED_MOST && !self.entries.contains_key(&key) {
            self.entries
                .retain(|_, (at, _)| now.duration_since(*at) < RESOLVED_FOR);
            if self.entries.len() >= RESOLVED_MOST {
                self.entries.clear();
            }
        }
        self.entries.insert(key, (now, addrs));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(name: &str) -> (String, u16) {
        (name.to_string(), 1433)
    }

    #[test]
    fn a_name_is_reused_for_two_seconds_then_resolved_again() {
        let mut cache = NameCache::default();
        let t0 = Instant::now();
        let addrs = vec!["198.18.7.2:1433".parse().unwrap()];
        assert_eq!(cache.get(&key("sql.corp"), t0), None);
        cache.put(key("sql.corp"), addrs.clone(), t0);
        assert_eq!(
            cache.get(&key("sql.corp"), t0 + Duration::from_millis(1999)),
            Some(addrs)
        );
        assert_eq!(cache.get(&key("sql.corp"), t0 + RESOLVED_FOR), None);
        assert_eq!(
            cache.get(&("sql.corp".to_string(), 80), t0),
            None,
            "another port"
        );
    }

    #[test]
    fn the_cache_stays_bounded_and_keeps_what_is_fresh() {
        let mut cache = NameCache::default();
        let t0 = Instant::now();
        let addr: Vec<SocketAddr> = vec!["198.18.7.2:1433".parse().unwrap()];
        for i in 0..RESOLVED_MOST {
            cache.put(key(&format!("old{i}")), addr.clone(), t0);
        }
        let later = t0 + RESOLVED_FOR;
        cache.put(key("new"), addr.clone(), later);
        assert_eq!(cache.entries.len(), 1, "the expired names made room");
        for i in 0..RESOLVED_MOST {
            cache.put(key(&format!("fresh{i}")), addr.clone(), later);
        }
        assert!(cache.entries.len() <= RESOLVED_MOST);
        assert!(cache.get(&key("fresh4095"), later).is_some());
    }

    #[tokio::test]
    async fn a_name_that_does_not_resolve_is_asked_again_next_time() {
        // A NUL in the name fails before any query leaves the machine.
        let name = "no-such\0name";
        assert!(resolve(name, 1).await.is_err());
        assert!(lock(&RESOLVED).entries.keys().all(|(n, _)| n != name));
    }
}
