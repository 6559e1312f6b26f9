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
//! # Logging
//!
//! hickory-server logs one INFO line per request under the target
//! `hickory_server`; the binary should filter that target to `warn`. This
//! module logs per-query events at DEBUG and TRACE only.

use std::collections::HashMap;
use std::fmt;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use hickory_proto::op::{
    Edns, Header, HeaderCounts, LowerQuery, Message, MessageType, Metadata, OpCode, ResponseCode,
};
use hickory_proto::rr::rdata::A;
use hickory_proto::rr::{DNSClass, LowerName, Name, RData, Record, RecordType};
use hickory_proto::serialize::binary::BinDecoder;
use hickory_server::net::runtime::Time;
use hickory_server::net::xfer::Protocol;
use hickory_server::server::{Request, RequestHandler, ResponseHandler, ResponseInfo};
use hickory_server::zone_handler::{MessageResponse, MessageResponseBuilder, Queries};
use ipnet::IpNet;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::sync::Semaphore;
use tokio::time::{Instant, timeout_at};
use tracing::{debug, info, trace, warn};

use crate::names::{NamesError, normalize_name};

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
    /// before the appliance replaced it (see [`ResolvConf::upstreams`]).
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
    InvalidName(#[from] NamesError),
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

/// Counters of what the server did, for metrics.
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

#[derive(Debug, Default)]
struct Counters {
    answered_locally: AtomicU64,
    forwarded: AtomicU64,
    failed: AtomicU64,
    rejected: AtomicU64,
}

impl Counters {
    fn bump(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }

    fn snapshot(&self) -> DnsStats {
        DnsStats {
            answered_locally: self.answered_locally.load(Ordering::Relaxed),
            forwarded: self.forwarded.load(Ordering::Relaxed),
            failed: self.failed.load(Ordering::Relaxed),
            rejected: self.rejected.load(Ordering::Relaxed),
        }
    }
}

/// The query names that have a local answer, with search expansions.
#[derive(Debug, Default)]
struct NameTable {
    entries: HashMap<LowerName, Ipv4Addr>,
}

impl NameTable {
    /// Builds the table for `names` and the (already normalised) `search`
    /// domains.
    fn build(names: &[(String, Ipv4Addr)], search: &[String]) -> Result<NameTable, DnsError> {
        let mut exact = Vec::with_capacity(names.len());
        for (name, addr) in names {
            exact.push((normalize_name(name)?, *addr));
        }
        let mut entries = HashMap::with_capacity(exact.len() * (1 + search.len()));
        for (name, addr) in &exact {
            for domain in search {
                // A name too long once expanded simply has no expansion.
                if let Some(key) = lower_name(&format!("{name}.{domain}")) {
                    entries.insert(key, *addr);
                }
            }
        }
        for (name, addr) in &exact {
            let key = lower_name(name).ok_or_else(|| NamesError::InvalidName {
                name: name.clone(),
                reason: "it cannot be encoded as a DNS name",
            })?;
            entries.insert(key, *addr);
        }
        Ok(NameTable { entries })
    }
}

/// `name` (valid, without a trailing dot) as a fully qualified lower-case
/// DNS name.
fn lower_name(name: &str) -> Option<LowerName> {
    Name::from_ascii(format!("{name}."))
        .ok()
        .map(LowerName::from)
}

/// The answer for a query about a configured name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum LocalAnswer {
    /// One `A` record with this address.
    Address(Ipv4Addr),
    /// NOERROR with an empty answer section.
    NoData,
}

/// The local answer to `query`, or `None` when it must be forwarded.
fn local_answer(table: &NameTable, query: &LowerQuery) -> Option<LocalAnswer> {
    let addr = *table.entries.get(query.name())?;
    if query.query_class() != DNSClass::IN {
        return Some(LocalAnswer::NoData);
    }
    Some(match query.query_type() {
        RecordType::A | RecordType::ANY => LocalAnswer::Address(addr),
        _ => LocalAnswer::NoData,
    })
}

/// Whether a query from `ip` may be answered.
fn is_allowed(ip: IpAddr, allow: &[IpNet]) -> bool {
    let ip = ip.to_canonical();
    ip.is_loopback() || allow.iter().any(|net| net.contains(&ip))
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
enum ForwardError {
    #[error("no upstream resolver is configured")]
    NoUpstream,
    #[error("no upstream answered in time")]
    Timeout,
    #[error("{0}")]
    Io(#[from] io::Error),
    #[error("the upstream answer does not match the query")]
    Mismatch,
}

/// The state shared by the handler tasks and the [`DnsServer`] handle.
struct Shared {
    upstreams: Vec<SocketAddr>,
    search: Vec<String>,
    allow: Vec<IpNet>,
    ttl: u32,
    forward_timeout: Duration,
    forwards: Semaphore,
    table: RwLock<Arc<NameTable>>,
    counters: Counters,
}

impl Shared {
    fn table(&self) -> Arc<NameTable> {
        // A poisoned lock still holds a complete table: swaps are atomic.
        match self.table.read() {
            Ok(guard) => Arc::clone(&guard),
            Err(poisoned) => Arc::clone(&poisoned.into_inner()),
        }
    }

    fn set_table(&self, table: NameTable) {
        let table = Arc::new(table);
        match self.table.write() {
            Ok(mut guard) => *guard = table,
            Err(poisoned) => *poisoned.into_inner() = table,
        }
    }

    /// Sends `request` to the upstreams in turn until one answers, within
    /// the forward deadline.
    async fn forward(
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
        let deadline = Instant::now() + self.forward_timeout;
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
            Counters::bump(&shared.counters.rejected);
            count_dns("rejected");
            debug!(src = %request.src(), "refused a query from outside the allowed networks");
            return send_error(request, response, ResponseCode::Refused).await;
        }
        if request.metadata.op_code != OpCode::Query {
            Counters::bump(&shared.counters.rejected);
            count_dns("rejected");
            return send_error(request, response, ResponseCode::NotImp).await;
        }
        let [query] = request.queries.queries() else {
            Counters::bump(&shared.counters.rejected);
            count_dns("rejected");
            return send_error(request, response, ResponseCode::FormErr).await;
        };
        if let Some(answer) = local_answer(&shared.table(), query) {
            Counters::bump(&shared.counters.answered_locally);
            count_dns("local");
            trace!(name = %query.name(), qtype = %query.query_type(), ?answer, "local answer");
            return send_local(request, query, answer, shared.ttl, response).await;
        }
        let Ok(_permit) = shared.forwards.try_acquire() else {
            Counters::bump(&shared.counters.failed);
            count_dns("failed");
            debug!(name = %query.name(), "too many forwards in flight; answering SERVFAIL");
            return send_error(request, response, ResponseCode::ServFail).await;
        };
        match shared.forward(request, query).await {
            Ok(upstream) => {
                Counters::bump(&shared.counters.forwarded);
                count_dns("forwarded");
                send_relayed(request, upstream, response).await
            }
            Err(e) => {
                Counters::bump(&shared.counters.failed);
                count_dns("failed");
                debug!(name = %query.name(), error = %e, "forward failed; answering SERVFAIL");
                send_error(request, response, ResponseCode::ServFail).await
            }
        }
    }
}

fn count_dns(answer: &str) {
    transport::metrics::metrics()
        .dns_queries
        .get_or_create(&transport::metrics::AnswerLabel {
            answer: answer.to_string(),
        })
        .inc();
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

async fn send_local<R: ResponseHandler>(
    request: &Request,
    query: &LowerQuery,
    answer: LocalAnswer,
    ttl: u32,
    response: R,
) -> ResponseInfo {
    let mut metadata = Metadata::response_from_request(&request.metadata);
    metadata.authoritative = true;
    metadata.recursion_available = true;
    let records: Vec<Record> = match answer {
        LocalAnswer::Address(addr) => vec![Record::from_rdata(
            // The name as asked, so that 0x20 case randomisation checks pass.
            query.original().name().clone(),
            ttl,
            RData::A(A(addr)),
        )],
        LocalAnswer::NoData => Vec::new(),
    };
    let edns = response_edns(request);
    let builder = MessageResponseBuilder::new(&request.queries, edns.as_ref());
    let message = builder.build(
        metadata,
        records.iter(),
        std::iter::empty(),
        std::iter::empty(),
        std::iter::empty(),
    );
    send(request, message, response).await
}

async fn send_relayed<R: ResponseHandler>(
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
            .field("upstreams", &self.shared.upstreams)
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
        let search = config
            .search
            .iter()
            .map(|s| normalize_name(s))
            .collect::<Result<Vec<_>, _>>()?;
        let table = NameTable::build(&names, &search)?;
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
            upstreams: config.upstreams,
            search,
            allow: config.allow,
            ttl: config.ttl,
            forward_timeout: config.forward_timeout,
            forwards: Semaphore::new(config.max_inflight_forwards),
            table: RwLock::new(Arc::new(table)),
            counters: Counters::default(),
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
        info!(listen = %local_addr, upstreams = ?shared.upstreams, names = names.len(), "DNS server started");
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
        let table = NameTable::build(&names, &self.shared.search)?;
        self.shared.set_table(table);
        info!(names = names.len(), "DNS names updated");
        Ok(())
    }

    /// What the server has done so far.
    pub fn stats(&self) -> DnsStats {
        self.shared.counters.snapshot()
    }

    /// Stops accepting queries and waits until the server's tasks ended.
    pub async fn shutdown(mut self) -> Result<(), DnsError> {
        self.server
            .shutdown_gracefully()
            .await
            .map_err(|e| DnsError::Shutdown(e.to_string()))
    }
}

/// Whether `upstream` is the server listening on `local`.
fn is_self(upstream: SocketAddr, local: SocketAddr) -> bool {
    upstream.port() == local.port()
        && (upstream.ip() == local.ip()
            || (local.ip().is_unspecified() && upstream.ip().is_loopback()))
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

/// What the appliance needs from a `resolv.conf`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ResolvConf {
    /// The `nameserver` addresses, in file order (all of them, though glibc
    /// uses only the first three). Link-local IPv6 addresses with a zone
    /// (`fe80::1%eth0`) are left out.
    pub nameservers: Vec<IpAddr>,
    /// The search list: from the last `search` or `domain` line, lower-case,
    /// without trailing dots, invalid names left out.
    pub search: Vec<String>,
    /// `options ndots:N`.
    pub ndots: Option<u8>,
    /// `options timeout:N`, in seconds.
    pub timeout: Option<u32>,
    /// `options attempts:N`.
    pub attempts: Option<u32>,
    /// Every option as written (including the three above), in file order,
    /// so that a rewritten file can keep them.
    pub options: Vec<String>,
}

impl ResolvConf {
    /// The nameservers as socket addresses on port 53, ready for
    /// [`DnsConfig::upstreams`].
    pub fn upstreams(&self) -> Vec<SocketAddr> {
        self.nameservers
            .iter()
            .map(|ip| SocketAddr::new(*ip, 53))
            .collect()
    }
}

/// Parses the text of a `resolv.conf` (see resolv.conf(5)) leniently, as the
/// C library does: unknown keywords and malformed values are skipped, never
/// an error. Comments start with `#` or `;`.
pub fn parse_resolv_conf(text: &str) -> ResolvConf {
    let mut conf = ResolvConf::default();
    for line in text.lines() {
        let line = match line.find(['#', ';']) {
            Some(at) => &line[..at],
            None => line,
        };
        let mut words = line.split_whitespace();
        let Some(keyword) = words.next() else {
            continue;
        };
        match keyword {
            "nameserver" => {
                if let Some(ip) = words.next().and_then(|w| w.parse::<IpAddr>().ok()) {
                    conf.nameservers.push(ip);
                }
            }
            "search" | "domain" => {
                let list: Vec<String> = if keyword == "domain" {
                    words
                        .take(1)
                        .filter_map(|w| normalize_name(w).ok())
                        .collect()
                } else {
                    words.filter_map(|w| normalize_name(w).ok()).collect()
                };
                conf.search = list;
            }
            "options" => {
                for option in words {
                    let (name, value) = option.split_once(':').unwrap_or((option, ""));
                    match name {
                        "ndots" => conf.ndots = value.parse::<u32>().ok().map(|n| n.min(15) as u8),
                        "timeout" => conf.timeout = value.parse().ok(),
                        "attempts" => conf.attempts = value.parse().ok(),
                        _ => {}
                    }
                    conf.options.push(option.to_string());
                }
            }
            _ => {}
        }
    }
    conf
}

#[cfg(test)]
mod tests {
    use super::*;
    use hickory_proto::op::Query;

    /// A query as decoded from the wire, where every name is fully qualified.
    fn query(name: &str, qtype: RecordType) -> LowerQuery {
        let mut name = Name::from_ascii(name).unwrap();
        name.set_fqdn(true);
        LowerQuery::from(Query::query(name, qtype))
    }

    fn table() -> NameTable {
        let names = vec![
            ("sql".to_string(), Ipv4Addr::new(127, 77, 0, 2)),
            ("Payroll.Corp.".to_string(), Ipv4Addr::new(127, 77, 0, 3)),
            ("db.corp".to_string(), Ipv4Addr::new(127, 77, 0, 4)),
            ("db".to_string(), Ipv4Addr::new(127, 77, 0, 5)),
        ];
        NameTable::build(&names, &["corp".to_string(), "eu.corp".to_string()]).unwrap()
    }

    #[test]
    fn matches_fqdn_short_and_case_variants() {
        let t = table();
        let a = |n| local_answer(&t, &query(n, RecordType::A));
        let addr = |d| Some(LocalAnswer::Address(Ipv4Addr::new(127, 77, 0, d)));
        assert_eq!(a("sql."), addr(2));
        assert_eq!(a("SQL"), addr(2));
        assert_eq!(a("sql.corp."), addr(2));
        assert_eq!(a("Sql.EU.corp"), addr(2));
        assert_eq!(a("payroll.corp"), addr(3));
        assert_eq!(a("PAYROLL.CORP."), addr(3));
        assert_eq!(
            a("payroll"),
            None,
            "an FQDN host does not match its first label"
        );
        assert_eq!(a("sql.other"), None);
        assert_eq!(a("xsql.corp"), None);
        // db.corp is configured itself: it wins over db + search corp.
        assert_eq!(a("db.corp"), addr(4));
        assert_eq!(a("db.eu.corp"), addr(5));
    }

    #[test]
    fn other_types_get_no_data_and_any_gets_a() {
        let t = table();
        let addr = Some(LocalAnswer::Address(Ipv4Addr::new(127, 77, 0, 2)));
        assert_eq!(local_answer(&t, &query("sql", RecordType::ANY)), addr);
        for qtype in [
            RecordType::AAAA,
            RecordType::MX,
            RecordType::TXT,
            RecordType::SRV,
        ] {
            assert_eq!(
                local_answer(&t, &query("sql", qtype)),
                Some(LocalAnswer::NoData)
            );
        }
        let mut chaos = Query::query(Name::from_ascii("sql.").unwrap(), RecordType::A);
        chaos.set_query_class(DNSClass::CH);
        assert_eq!(
            local_answer(&t, &LowerQuery::from(chaos)),
            Some(LocalAnswer::NoData)
        );
        assert_eq!(
            local_answer(&t, &query("example.test", RecordType::AAAA)),
            None
        );
    }

    #[test]
    fn invalid_names_are_errors() {
        let bad = vec![("a b".to_string(), Ipv4Addr::LOCALHOST)];
        assert!(matches!(
            NameTable::build(&bad, &[]),
            Err(DnsError::InvalidName(_))
        ));
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

    #[test]
    fn parses_resolv_conf() {
        let conf = parse_resolv_conf(
            "# generated\n\
             nameserver 10.0.0.2\n\
             nameserver   2001:db8::53 # comment\n\
             nameserver fe80::1%eth0\n\
             nameserver not-an-ip\n\
             domain ignored.example\n\
             search Corp. eu.corp bad..name\n\
             ; options rotate\n\
             options ndots:2 timeout:3 attempts:4 edns0 ndots:99x\n\
             sortlist 10.0.0.0\n",
        );
        assert_eq!(
            conf.nameservers,
            vec![
                "10.0.0.2".parse::<IpAddr>().unwrap(),
                "2001:db8::53".parse().unwrap()
            ]
        );
        assert_eq!(conf.search, vec!["corp", "eu.corp"]);
        assert_eq!(conf.ndots, None, "the last ndots option was malformed");
        assert_eq!(conf.timeout, Some(3));
        assert_eq!(conf.attempts, Some(4));
        assert_eq!(
            conf.options,
            vec!["ndots:2", "timeout:3", "attempts:4", "edns0", "ndots:99x"]
        );
        assert_eq!(
            conf.upstreams(),
            vec![
                "10.0.0.2:53".parse::<SocketAddr>().unwrap(),
                "[2001:db8::53]:53".parse().unwrap()
            ]
        );

        let conf = parse_resolv_conf("search a.example b.example\ndomain Corp\noptions ndots:20\n");
        assert_eq!(
            conf.search,
            vec!["corp"],
            "the last of search and domain wins"
        );
        assert_eq!(conf.ndots, Some(15), "glibc caps ndots at 15");
        assert_eq!(parse_resolv_conf(""), ResolvConf::default());
        assert_eq!(
            parse_resolv_conf("\u{0}\u{ff}garbage\n\n  \t").nameservers,
            Vec::<IpAddr>::new()
        );
    }
}
