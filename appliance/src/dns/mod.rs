//! The appliance's DNS server: answers hybrid-connection host names with
//! their virtual addresses and forwards every other name upstream.
//!
//! It runs inside the appliance's network namespace, on an address the
//! caller chooses (for example `127.0.0.53:53`), over UDP and TCP. Apps in
//! the namespace reach it through the namespace's `/etc/resolv.conf`, which
//! [`crate::resolv`] points at it while the appliance runs.
//!
//! # What it answers
//!
//! - **Configured names.** A query matches a configured name `N` when its
//!   name, compared case-insensitively and as a fully qualified name, is `N`
//!   itself or `N.S` for a search domain `S` of the namespace's original
//!   `resolv.conf`. So a short host `sql` with search domain `corp` matches
//!   `sql` and `sql.corp`; an FQDN host `sql.corp` matches `sql.corp` (and
//!   the harmless `sql.corp.corp`, which a resolver with `ndots` above 1 may
//!   ask first). A name configured exactly wins over a search expansion of
//!   another name.
//! - For a matching name: `A` gets one `A` record with the name's address
//!   (TTL [`DnsConfig::ttl`], 30 s by default, authoritative); `ANY` gets the
//!   same single `A` record (the minimal answer RFC 8482 allows); every other
//!   type (`AAAA`, `MX`, `TXT`, ...) and every class other than `IN` gets
//!   NOERROR with an empty answer section, never NXDOMAIN, so that a resolver
//!   asking `A` and `AAAA` together keeps the `A` answer. No SOA is added,
//!   so the empty answer is not cached.
//! - **Every other name** is forwarded, unchanged but for a fresh random
//!   message id, to the upstream resolvers (the namespace's nameservers from
//!   before the appliance replaced `resolv.conf`), over the protocol the
//!   client used. Upstreams are tried in order within one deadline
//!   ([`DnsConfig::forward_timeout`], 1.5 s by default) shared between them;
//!   the first answer whose id and question match is relayed to the client.
//!   No answer in time gives SERVFAIL. The server does no recursion of its
//!   own.
//!
//! # Access and hostile input
//!
//! It is not an open resolver. Queries are answered only when their source
//! is a loopback address (`127.0.0.0/8`, `::1`) or lies in
//! [`DnsConfig::allow`]; others get REFUSED. On top of that the caller binds
//! it only inside the namespace.
//!
//! Input that is not a DNS query never takes the server down: a datagram
//! shorter than a header is dropped; one with a header but an undecodable
//! body (a name longer than 255 bytes, a question count larger than the
//! message) gets FORMERR; a query with zero or several questions gets
//! FORMERR; an opcode other than QUERY gets NOTIMP; responses are dropped.
//! At most [`DnsConfig::max_inflight_forwards`] forwards run at once; a
//! query that would exceed this gets SERVFAIL at once, so a flood of
//! queries for unknown names costs a bounded number of sockets and tasks.
//! TCP connections are closed after 10 s without a query.
//!
//! # Layout
//!
//! This module holds the server, its configuration and the checks every
//! query passes; `answer` the configured names and their answers, `forward`
//! the exchange with the upstream resolvers. The upstreams and search
//! domains come from [`crate::resolv::ResolvConf`].
//!
//! # Logging
//!
//! hickory-server logs one INFO line per request under the target
//! `hickory_server`; the binary should filter that target to `warn`. This
//! module logs per-query events at DEBUG and TRACE only.

mod answer;
mod forward;

use std::fmt;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use hickory_proto::op::{Edns, Header, HeaderCounts, Metadata, OpCode, ResponseCode};
use hickory_proto::rr::Record;
use hickory_proto::serialize::binary::BinDecoder;
use hickory_server::net::runtime::Time;
use hickory_server::server::{Request, RequestHandler, ResponseHandler, ResponseInfo};
use hickory_server::zone_handler::{MessageResponse, MessageResponseBuilder, Queries};
use ipnet::IpNet;
use proto::name::NameError;
use tokio::net::{TcpListener, UdpSocket};
use tokio::sync::Semaphore;
use tracing::{debug, info, trace, warn};

use crate::metrics::{DnsAnswer, DnsCounters};
use answer::{LocalNames, send_local};
use forward::{Forwarder, is_self, send_relayed};

/// The TTL of the `A` records for configured names, unless configured.
pub const DEFAULT_TTL: u32 = 30;
/// How long a forwarded query may take, all upstreams together, unless
/// configured.
pub const DEFAULT_FORWARD_TIMEOUT: Duration = Duration::from_millis(1500);
/// How many forwarded queries may be in flight at once, unless configured.
pub const DEFAULT_MAX_INFLIGHT_FORWARDS: usize = 1024;

/// How long a TCP client may stay silent before its connection is closed.
const TCP_IDLE_TIMEOUT: Duration = Duration::from_secs(10);
/// How many responses may wait to be written on one TCP connection.
const TCP_RESPONSE_BUFFER: usize = 32;
/// The EDNS payload size advertised in local answers.
const EDNS_PAYLOAD: u16 = 1232;

/// Where the DNS server listens, where it forwards, and how it matches names.
#[derive(Debug, Clone)]
pub struct DnsConfig {
    /// The address to listen on, UDP and TCP (port 0 picks a free port, the
    /// same for both).
    pub listen: SocketAddr,
    /// The resolvers that other names are forwarded to, in order of
    /// preference: the nameservers of the namespace's `resolv.conf` from
    /// before the appliance replaced it (see [`ResolvConf::upstreams`](crate::resolv::ResolvConf::upstreams)).
    pub upstreams: Vec<SocketAddr>,
    /// The search domains of that same `resolv.conf` (see the module docs
    /// for how they are used).
    pub search: Vec<String>,
    /// Networks allowed to query besides loopback, which always is.
    pub allow: Vec<IpNet>,
    /// The TTL of the `A` records for configured names.
    pub ttl: u32,
    /// The deadline for a forwarded query, all upstreams together.
    pub forward_timeout: Duration,
    /// The most forwarded queries in flight at once; more get SERVFAIL.
    pub max_inflight_forwards: usize,
    /// Where the server counts what each query got: the appliance's
    /// metrics, or by default counters of its own. A clone of this
    /// configuration counts into the same ones.
    pub counters: DnsCounters,
}

impl DnsConfig {
    /// A configuration with no search domains, no extra allowed networks and
    /// the default TTL, timeout and forward limit.
    pub fn new(listen: SocketAddr, upstreams: Vec<SocketAddr>) -> DnsConfig {
        DnsConfig {
            listen,
            upstreams,
            search: Vec::new(),
            allow: Vec::new(),
            ttl: DEFAULT_TTL,
            forward_timeout: DEFAULT_FORWARD_TIMEOUT,
            max_inflight_forwards: DEFAULT_MAX_INFLIGHT_FORWARDS,
            counters: DnsCounters::default(),
        }
    }
}

/// What went wrong while starting, updating or stopping the DNS server.
#[derive(Debug, thiserror::Error)]
pub enum DnsError {
    /// The listening address could not be bound.
    #[error(
        "cannot listen for DNS on {addr} ({protocol}): {source}; is another DNS server \
         (systemd-resolved, dnsmasq) already using it?"
    )]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// `udp` or `tcp`.
        protocol: &'static str,
        /// The underlying I/O error.
        source: io::Error,
    },
    /// A configured name or search domain is not a valid DNS name.
    #[error(transparent)]
    InvalidName(#[from] NameError),
    /// A valid name that the DNS library cannot encode.
    #[error("{0:?} cannot be encoded as a DNS name")]
    Unencodable(String),
    /// An upstream is the server's own address: every forward would loop.
    #[error(
        "upstream {addr} is this DNS server itself; pass the nameservers of resolv.conf as it \
         was before the appliance replaced it"
    )]
    UpstreamIsSelf {
        /// The upstream address.
        addr: SocketAddr,
    },
    /// A configuration value is out of range.
    #[error("invalid DNS configuration: {0}")]
    Config(&'static str),
    /// A server task failed while shutting down.
    #[error("the DNS server failed while stopping: {0}")]
    Shutdown(String),
}

/// What the server did, read from its [`DnsCounters`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DnsStats {
    /// Queries for configured names, answered from the map (including the
    /// empty answers to `AAAA` and other types).
    pub answered_locally: u64,
    /// Queries forwarded upstream and answered from there.
    pub forwarded: u64,
    /// Queries answered SERVFAIL because no upstream answered in time or too
    /// many forwards were in flight.
    pub failed: u64,
    /// Queries the handler refused (source not allowed) or rejected (not
    /// exactly one question: FORMERR; not a QUERY: NOTIMP). Messages that
    /// hickory rejects before they reach the handler (too short, an
    /// undecodable body, a source outside its own access list) are not
    /// counted.
    pub rejected: u64,
}

impl DnsStats {
    fn read(counters: &DnsCounters) -> DnsStats {
        DnsStats {
            answered_locally: counters.get(DnsAnswer::local),
            forwarded: counters.get(DnsAnswer::forwarded),
            failed: counters.get(DnsAnswer::failed),
            rejected: counters.get(DnsAnswer::rejected),
        }
    }
}

/// Whether a query from `ip` may be answered.
fn is_allowed(ip: IpAddr, allow: &[IpNet]) -> bool {
    let ip = ip.to_canonical();
    ip.is_loopback() || allow.iter().any(|net| net.contains(&ip))
}

/// The state shared by the handler tasks and the [`DnsServer`] handle.
struct Shared {
    allow: Vec<IpNet>,
    names: LocalNames,
    forwarder: Forwarder,
    /// Admits at most [`DnsConfig::max_inflight_forwards`] forwards at once.
    forwards: Semaphore,
    counters: DnsCounters,
}

/// The hickory request handler: policy checks, local answers, forwarding.
#[derive(Clone)]
struct Handler {
    shared: Arc<Shared>,
}

impl fmt::Debug for Handler {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Handler").finish_non_exhaustive()
    }
}

#[async_trait::async_trait]
impl RequestHandler for Handler {
    async fn handle_request<R: ResponseHandler, T: Time>(
        &self,
        request: &Request,
        response: R,
    ) -> ResponseInfo {
        let shared = &self.shared;
        if !is_allowed(request.src().ip(), &shared.allow) {
            shared.counters.count(DnsAnswer::rejected);
            debug!(src = %request.src(), "refused a query from outside the allowed networks");
            return send_error(request, response, ResponseCode::Refused).await;
        }
        if request.metadata.op_code != OpCode::Query {
            shared.counters.count(DnsAnswer::rejected);
            return send_error(request, response, ResponseCode::NotImp).await;
        }
        let [query] = request.queries.queries() else {
            shared.counters.count(DnsAnswer::rejected);
            return send_error(request, response, ResponseCode::FormErr).await;
        };
        if let Some(answer) = shared.names.answer(query) {
            shared.counters.count(DnsAnswer::local);
            trace!(name = %query.name(), qtype = %query.query_type(), ?answer, "local answer");
            return send_local(request, query, answer, shared.names.ttl, response).await;
        }
        let Ok(_permit) = shared.forwards.try_acquire() else {
            shared.counters.count(DnsAnswer::failed);
            debug!(name = %query.name(), "too many forwards in flight; answering SERVFAIL");
            return send_error(request, response, ResponseCode::ServFail).await;
        };
        match shared.forwarder.forward(request, query).await {
            Ok(upstream) => {
                shared.counters.count(DnsAnswer::forwarded);
                send_relayed(request, upstream, response).await
            }
            Err(e) => {
                shared.counters.count(DnsAnswer::failed);
                debug!(name = %query.name(), error = %e, "forward failed; answering SERVFAIL");
                send_error(request, response, ResponseCode::ServFail).await
            }
        }
    }
}

/// The EDNS record for a response to `request`: present when the request
/// had one (RFC 6891 6.1.1).
fn response_edns(request: &Request) -> Option<Edns> {
    request.edns.as_ref().map(|_| {
        let mut edns = Edns::new();
        edns.set_max_payload(EDNS_PAYLOAD);
        edns
    })
}

async fn send_error<R: ResponseHandler>(
    request: &Request,
    response: R,
    code: ResponseCode,
) -> ResponseInfo {
    let edns = response_edns(request);
    // Echo the question only when there is exactly one: many questions
    // might not even fit in the 512 bytes an error answer may take.
    let none = Queries::read(&mut BinDecoder::new(&[]), 0);
    let queries = match &none {
        Ok(none) if request.queries.len() != 1 => none,
        _ => &request.queries,
    };
    let builder = MessageResponseBuilder::new(queries, edns.as_ref());
    send(
        request,
        builder.error_msg(&request.metadata, code),
        response,
    )
    .await
}

async fn send<'a, R: ResponseHandler>(
    request: &Request,
    message: MessageResponse<
        '_,
        'a,
        impl Iterator<Item = &'a Record> + Send + 'a,
        impl Iterator<Item = &'a Record> + Send + 'a,
        impl Iterator<Item = &'a Record> + Send + 'a,
        impl Iterator<Item = &'a Record> + Send + 'a,
    >,
    mut response: R,
) -> ResponseInfo {
    match response.send_response(message).await {
        Ok(info) => info,
        Err(e) => {
            debug!(src = %request.src(), error = %e, "could not send a DNS response");
            let mut metadata = Metadata::response_from_request(&request.metadata);
            metadata.response_code = ResponseCode::ServFail;
            ResponseInfo::from(Header {
                metadata,
                counts: HeaderCounts::default(),
            })
        }
    }
}

/// A running DNS server. Dropping it stops the server;
/// [`shutdown`](Self::shutdown) stops it and waits until its tasks ended.
pub struct DnsServer {
    local_addr: SocketAddr,
    shared: Arc<Shared>,
    server: hickory_server::Server<Handler>,
}

impl fmt::Debug for DnsServer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DnsServer")
            .field("local_addr", &self.local_addr)
            .field("upstreams", &self.shared.forwarder.upstreams)
            .finish_non_exhaustive()
    }
}

impl DnsServer {
    /// Binds `config.listen` over UDP and TCP, and serves `names` (host name,
    /// virtual address; typically [`NameMap::iter`](crate::names::NameMap::iter))
    /// from tasks on the current tokio runtime.
    pub async fn start(
        config: DnsConfig,
        names: Vec<(String, Ipv4Addr)>,
    ) -> Result<DnsServer, DnsError> {
        if config.max_inflight_forwards == 0 {
            return Err(DnsError::Config("max_inflight_forwards must be at least 1"));
        }
        if config.forward_timeout.is_zero() {
            return Err(DnsError::Config("forward_timeout must be longer than zero"));
        }
        let local_names = LocalNames::new(&names, &config.search, config.ttl)?;
        let (udp, tcp) = bind(config.listen).await?;
        let local_addr = udp.local_addr().map_err(|source| DnsError::Bind {
            addr: config.listen,
            protocol: "udp",
            source,
        })?;
        if let Some(addr) = config.upstreams.iter().find(|u| is_self(**u, local_addr)) {
            return Err(DnsError::UpstreamIsSelf { addr: *addr });
        }
        if config.upstreams.is_empty() {
            warn!("no upstream resolver: names other than the hybrid connections get SERVFAIL");
        }
        let shared = Arc::new(Shared {
            allow: config.allow,
            names: local_names,
            forwarder: Forwarder::new(config.upstreams, config.forward_timeout),
            forwards: Semaphore::new(config.max_inflight_forwards),
            counters: config.counters,
        });
        // hickory's own access check refuses before decoding; the handler
        // checks again, and counts.
        let mut allowed: Vec<IpNet> = vec![
            IpNet::new_assert(Ipv4Addr::new(127, 0, 0, 0).into(), 8),
            IpNet::new_assert(Ipv6Addr::LOCALHOST.into(), 128),
        ];
        allowed.extend(shared.allow.iter().copied());
        let handler = Handler {
            shared: Arc::clone(&shared),
        };
        let mut server = hickory_server::Server::with_access(handler, [], allowed);
        server.register_socket(udp);
        server.register_listener(tcp, TCP_IDLE_TIMEOUT, TCP_RESPONSE_BUFFER);
        info!(listen = %local_addr, upstreams = ?shared.forwarder.upstreams, names = names.len(), "DNS server started");
        Ok(DnsServer {
            local_addr,
            shared,
            server,
        })
    }

    /// The address the server listens on (UDP and TCP).
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Replaces the served names, for example after a reload added hybrid
    /// connections. Queries in progress finish with the old names. On error
    /// the old names stay in force.
    pub fn update(&self, names: Vec<(String, Ipv4Addr)>) -> Result<(), DnsError> {
        self.shared.names.update(&names)?;
        info!(names = names.len(), "DNS names updated");
        Ok(())
    }

    /// What the server has done so far.
    pub fn stats(&self) -> DnsStats {
        DnsStats::read(&self.shared.counters)
    }

    /// Stops accepting queries and waits until the server's tasks ended.
    pub async fn shutdown(mut self) -> Result<(), DnsError> {
        self.server
            .shutdown_gracefully()
            .await
            .map_err(|e| DnsError::Shutdown(e.to_string()))
    }
}

/// Binds UDP and TCP on the same address and port; with port 0, retries a
/// few times when the port UDP got is taken for TCP.
async fn bind(listen: SocketAddr) -> Result<(UdpSocket, TcpListener), DnsError> {
    let mut attempts = if listen.port() == 0 { 8 } else { 1 };
    loop {
        attempts -= 1;
        let udp = UdpSocket::bind(listen)
            .await
            .map_err(|source| DnsError::Bind {
                addr: listen,
                protocol: "udp",
                source,
            })?;
        let addr = udp.local_addr().map_err(|source| DnsError::Bind {
            addr: listen,
            protocol: "udp",
            source,
        })?;
        match TcpListener::bind(addr).await {
            Ok(tcp) => return Ok((udp, tcp)),
            Err(e) if e.kind() == io::ErrorKind::AddrInUse && attempts > 0 => continue,
            Err(source) => {
                return Err(DnsError::Bind {
                    addr,
                    protocol: "tcp",
                    source,
                });
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hickory_proto::op::{LowerQuery, Query};
    use hickory_proto::rr::{Name, RecordType};

    /// A query as decoded from the wire, where every name is fully qualified.
    pub(super) fn query(name: &str, qtype: RecordType) -> LowerQuery {
        let mut name = Name::from_ascii(name).unwrap();
        name.set_fqdn(true);
        LowerQuery::from(Query::query(name, qtype))
    }

    #[test]
    fn only_loopback_and_allow_list_may_query() {
        let allow: Vec<IpNet> = vec!["198.18.0.0/15".parse().unwrap()];
        assert!(is_allowed("127.0.0.1".parse().unwrap(), &[]));
        assert!(is_allowed("127.77.0.9".parse().unwrap(), &[]));
        assert!(is_allowed("::1".parse().unwrap(), &[]));
        assert!(is_allowed("::ffff:127.0.0.1".parse().unwrap(), &[]));
        assert!(!is_allowed("198.18.0.1".parse().unwrap(), &[]));
        assert!(is_allowed("198.18.0.1".parse().unwrap(), &allow));
        assert!(is_allowed("198.19.255.1".parse().unwrap(), &allow));
        assert!(!is_allowed("198.20.0.1".parse().unwrap(), &allow));
        assert!(!is_allowed("fe80::1".parse().unwrap(), &allow));
    }
}
