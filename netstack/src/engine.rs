//! The stack without I/O: smoltcp's interface and sockets, the flow table,
//! and the decisions about SYNs. Packets and commands go in with the current
//! time; packets to transmit, events for the caller and the next deadline
//! come out. The tokio task in `stack.rs` only moves bytes between this and
//! the tun; the fuzz target drives it with a fake clock.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, VecDeque};
use std::io;
use std::net::SocketAddrV4;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use smoltcp::iface::{Config, Interface, PollResult, SocketHandle, SocketSet};
use smoltcp::phy::ChecksumCapabilities;
use smoltcp::socket::tcp::{self, CongestionControl, State};
use smoltcp::time::{Duration, Instant};
use smoltcp::wire::{HardwareAddress, IpListenEndpoint, TcpSeqNumber};
use tokio::sync::{mpsc, oneshot};
use tracing::{debug, trace, warn};

use crate::config::StackConfig;
use crate::device::{Packet, QueueDevice};
use crate::error::AcceptError;
use crate::flow::{Command, FlowId, FlowShared, TcpFlow};
use crate::packet::{self, Classified, FourTuple};

/// How often every flow is checked for timeouts.
const SWEEP_INTERVAL: Duration = Duration::from_millis(100);
/// Flow counts up to this are swept whole every [`SWEEP_INTERVAL`].
const SWEEP_ALL_BELOW: usize = 1024;
/// Past [`SWEEP_ALL_BELOW`], a sweep visits this fraction of the flows.
const SWEEP_SLICES: usize = 10;
/// Most rounds of egress per poll; each round emits up to one segment per
/// socket.
const EGRESS_ROUNDS: usize = 256;
/// A flow's empty stream buffers are freed after this long without traffic.
const SHRINK_AFTER: Duration = Duration::from_secs(1);
/// Packets dropped for their source are logged at WARN at most this often.
const FOREIGN_WARN_EVERY: Duration = Duration::from_secs(10);
/// Sockets of finished flows kept, buffers and all, for the next flows.
/// A new socket's buffers (`tcp_rx_buffer` + `tcp_tx_buffer`, 1 MiB by
/// default) come zeroed from the allocator, which zeroed them by hand when
/// it served them from memory it kept: 29 % of the appliance's CPU for
/// short connections. A reused socket costs nothing; at most this many
/// keep their touched pages resident.
const SPARE_SOCKETS: usize = 16;

/// Something the caller must hear about.
#[derive(Debug)]
pub(crate) enum Event {
    /// A SYN for a new 4-tuple; the caller must accept or refuse.
    NewFlow {
        id: FlowId,
        src: SocketAddrV4,
        dst: SocketAddrV4,
    },
    /// A datagram to a hooked UDP port.
    Datagram {
        src: SocketAddrV4,
        dst: SocketAddrV4,
        payload: Vec<u8>,
    },
}

/// Counters readable from any thread.
#[derive(Debug, Default)]
pub(crate) struct Counters {
    pub pending: AtomicU64,
    pub active: AtomicU64,
    pub accepted: AtomicU64,
    pub refused: AtomicU64,
    pub refused_over_cap: AtomicU64,
    pub expired: AtomicU64,
    pub reaped_idle: AtomicU64,
    pub dropped_packets: AtomicU64,
    pub dropped_foreign: AtomicU64,
    pub dropped_datagrams: AtomicU64,
}

#[derive(Debug)]
struct Pending {
    tuple: FourTuple,
    syn: Packet,
    seq: TcpSeqNumber,
    seg_len: usize,
    deadline: Instant,
}

#[derive(Debug)]
struct Active {
    tuple: FourTuple,
    /// The flow's own socket set, of its one socket: smoltcp finds the
    /// socket of a segment, and what to send, by asking every socket of
    /// the set it is given, so the engine routes by four-tuple itself and
    /// gives smoltcp just this one (a segment costs the same with 50,000
    /// flows as with one).
    sockets: SocketSet<'static>,
    handle: SocketHandle,
    /// When smoltcp last asked to be polled for this socket (a
    /// retransmission, a delayed ACK, a keep-alive), as queued in
    /// [`Engine::timers`].
    timer: Option<Instant>,
    shared: Arc<FlowShared>,
    /// Waiting `accept` call, answered once the handshake ends.
    reply: Option<oneshot::Sender<Result<TcpFlow, AcceptError>>>,
    established: bool,
    peer_fin: bool,
    we_closed: bool,
    handshake_deadline: Instant,
    last_activity: Instant,
    linger_deadline: Option<Instant>,
    /// Already in the dirty list.
    queued: bool,
}

#[derive(Debug)]
enum Entry {
    Pending(Pending),
    Active(Active),
}

/// smoltcp plus the flow table.
pub(crate) struct Engine {
    config: StackConfig,
    caps: ChecksumCapabilities,
    iface: Interface,
    /// An empty set, for what belongs to no flow (smoltcp answers a segment
    /// of no flow with a reset, an ICMP echo with its reply).
    no_sockets: SocketSet<'static>,
    /// Packets taken in and not yet given to smoltcp, with their flow.
    inbox: VecDeque<(Packet, Option<FlowId>)>,
    /// The flows' timers, earliest first. A flow whose timer moves later
    /// keeps its earlier entry (it is serviced once for nothing), so each
    /// flow has few entries; one whose time is not its flow's is stale.
    timers: BinaryHeap<Reverse<(Instant, FlowId)>>,
    /// See [`SPARE_SOCKETS`].
    spare: Vec<(SocketSet<'static>, SocketHandle)>,
    device: QueueDevice,
    entries: HashMap<FlowId, Entry>,
    by_tuple: HashMap<FourTuple, FlowId>,
    next_id: FlowId,
    n_pending: usize,
    dirty: Vec<FlowId>,
    events: VecDeque<Event>,
    cmd: mpsc::UnboundedSender<Command>,
    next_sweep: Instant,
    /// The flows the running sweep has yet to visit (see [`Self::sweep`]).
    to_sweep: Vec<FlowId>,
    counters: Arc<Counters>,
    last_foreign_warning: Option<Instant>,
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine")
            .field("flows", &self.entries.len())
            .field("pending", &self.n_pending)
            .finish_non_exhaustive()
    }
}

impl Engine {
    /// A stack for `config` (already validated). `cmd` is the channel the
    /// streams it creates use to reach the owner of this engine.
    pub fn new(
        config: StackConfig,
        cmd: mpsc::UnboundedSender<Command>,
        counters: Arc<Counters>,
        now: Instant,
    ) -> Self {
        let caps = packet::checksum_caps(config.verify_checksums);
        let mut device = QueueDevice::new(usize::from(config.mtu), caps.clone());
        let mut iface_config = Config::new(HardwareAddress::Ip);
        iface_config.random_seed = random_seed();
        let mut iface = Interface::new(iface_config, &mut device, now);
        iface.set_any_ip(true);
        Self {
            config,
            caps,
            iface,
            no_sockets: SocketSet::new(Vec::new()),
            inbox: VecDeque::new(),
            timers: BinaryHeap::new(),
            spare: Vec::new(),
            device,
            entries: HashMap::new(),
            by_tuple: HashMap::new(),
            next_id: 1,
            n_pending: 0,
            dirty: Vec::new(),
            events: VecDeque::new(),
            cmd,
            next_sweep: now + SWEEP_INTERVAL,
            to_sweep: Vec::new(),
            counters,
            last_foreign_warning: None,
        }
    }

    /// A buffer to read the next packet into; give it back with
    /// [`Self::handle_packet`] or [`Self::recycle`].
    pub fn take_buffer(&mut self) -> Vec<u8> {
        self.device.take_buffer()
    }

    /// Returns an unused buffer from [`Self::take_buffer`].
    pub fn recycle(&mut self, buf: Vec<u8>) {
        self.device.recycle_rx(buf);
    }

    /// Takes in one packet read from the tun: the first `len` bytes of `buf`.
    pub fn handle_packet(&mut self, buf: Vec<u8>, len: usize, now: Instant) {
        let packet = Packet { buf, len };
        let classified = match packet::classify(packet.bytes(), &self.config, &self.caps) {
            Ok(c) => c,
            Err(reason) => {
                if reason == packet::DropReason::ForeignSource {
                    self.foreign_source(packet.bytes(), now);
                } else {
                    trace!(%reason, len, "dropped packet");
                }
                self.counters
                    .dropped_packets
                    .fetch_add(1, Ordering::Relaxed);
                self.device.recycle_rx(packet.buf);
                return;
            }
        };
        match classified {
            Classified::TcpSyn {
                tuple,
                seq,
                seg_len,
            } => match self.by_tuple.get(&tuple).copied() {
                Some(id) => match self.entries.get(&id) {
                    Some(Entry::Active(_)) => {
                        self.mark_dirty(id);
                        self.inbox.push_back((packet, Some(id)));
                    }
                    // A retransmitted SYN of a flow still waiting for a decision.
                    _ => self.device.recycle_rx(packet.buf),
                },
                None if self.entries.len() >= self.config.max_flows => {
                    debug!(src = %tuple.src, dst = %tuple.dst, "flow cap reached; refusing");
                    self.counters
                        .refused_over_cap
                        .fetch_add(1, Ordering::Relaxed);
                    self.device.recycle_rx(packet.buf);
                    self.send_refusal(&tuple, seq, seg_len);
                }
                None => {
                    let id = self.next_id;
                    self.next_id += 1;
                    trace!(id, src = %tuple.src, dst = %tuple.dst, "new flow");
                    self.entries.insert(
                        id,
                        Entry::Pending(Pending {
                            tuple,
                            syn: packet,
                            seq,
                            seg_len,
                            deadline: now + self.config.decision_timeout.into(),
                        }),
                    );
                    self.by_tuple.insert(tuple, id);
                    self.n_pending += 1;
                    self.events.push_back(Event::NewFlow {
                        id,
                        src: tuple.src,
                        dst: tuple.dst,
                    });
                }
            },
            Classified::Tcp { tuple } => {
                let flow = self
                    .by_tuple
                    .get(&tuple)
                    .copied()
                    .filter(|id| matches!(self.entries.get(id), Some(Entry::Active(_))));
                if let Some(id) = flow {
                    self.mark_dirty(id);
                }
                // Segments for unknown flows get smoltcp's RST.
                self.inbox.push_back((packet, flow));
            }
            Classified::HookedUdp { src, dst, payload } => {
                let payload = payload.to_vec();
                self.device.recycle_rx(packet.buf);
                self.events.push_back(Event::Datagram { src, dst, payload });
            }
            Classified::Other => self.inbox.push_back((packet, None)),
        }
    }

    /// Counts and logs a packet dropped for its source: at WARN at most once
    /// per [`FOREIGN_WARN_EVERY`], which bounds what a flood can write.
    fn foreign_source(&mut self, bytes: &[u8], now: Instant) {
        self.counters
            .dropped_foreign
            .fetch_add(1, Ordering::Relaxed);
        // classify parsed the header already, so the fields are there.
        let (src, dst) = match smoltcp::wire::Ipv4Packet::new_checked(bytes) {
            Ok(ip) => (ip.src_addr(), ip.dst_addr()),
            Err(_) => return,
        };
        let due = self
            .last_foreign_warning
            .is_none_or(|at| now >= at + FOREIGN_WARN_EVERY);
        if due {
            self.last_foreign_warning = Some(now);
            let dropped = self.counters.dropped_foreign.load(Ordering::Relaxed);
            warn!(
                %src, %dst, dropped,
                reason = %packet::DropReason::ForeignSource,
                "dropped a packet into the tun from a source that is not this host's"
            );
        } else {
            trace!(%src, %dst, "dropped packet from a foreign source");
        }
    }

    /// Carries out a command from a handle. Returns false for `Shutdown`.
    pub fn handle_command(&mut self, cmd: Command, now: Instant) -> bool {
        match cmd {
            Command::Accept { id, reply } => self.accept(id, reply, now),
            Command::Refuse { id } => self.refuse(id),
            Command::SetSources(sources) => {
                debug!(?sources, "accepted sources changed");
                self.config.sources = sources;
            }
            Command::Wake { id } => self.mark_dirty(id),
            Command::SendPacket(bytes) => {
                let len = bytes.len();
                self.device.tx.push_back(Packet { buf: bytes, len });
            }
            Command::Shutdown => return false,
        }
        true
    }

    fn accept(
        &mut self,
        id: FlowId,
        reply: oneshot::Sender<Result<TcpFlow, AcceptError>>,
        now: Instant,
    ) {
        let pending = match self.entries.remove(&id) {
            Some(Entry::Pending(p)) => p,
            Some(other) => {
                self.entries.insert(id, other);
                let _ = reply.send(Err(AcceptError::Expired));
                return;
            }
            None => {
                let _ = reply.send(Err(AcceptError::Expired));
                return;
            }
        };
        self.n_pending -= 1;
        let tuple = pending.tuple;
        let (mut sockets, handle) = self.spare.pop().unwrap_or_else(|| {
            let mut sockets = SocketSet::new(Vec::with_capacity(1));
            let handle = sockets.add(tcp::Socket::new(
                tcp::SocketBuffer::new(vec![0u8; self.config.tcp_rx_buffer]),
                tcp::SocketBuffer::new(vec![0u8; self.config.tcp_tx_buffer]),
            ));
            (sockets, handle)
        });
        let socket = sockets.get_mut::<tcp::Socket<'static>>(handle);
        // Everything a finished flow may have set, set again; `listen`
        // clears the connection's state and empties the buffers.
        socket.set_nagle_enabled(false);
        socket.set_ack_delay(None);
        socket.set_congestion_control(CongestionControl::Cubic);
        socket.set_timeout(Some(self.config.ack_timeout.into()));
        // Set before the handshake: smoltcp arms it from the ACK that ends
        // the handshake. Set on an established, idle socket, it sends a
        // probe at once (two packets more per connection, which every
        // connection paid until this moved here).
        socket.set_keep_alive(self.config.keep_alive.map(Into::into));
        let endpoint = IpListenEndpoint {
            addr: Some((*tuple.dst.ip()).into()),
            port: tuple.dst.port(),
        };
        if socket.listen(endpoint).is_err() {
            // Port 0 never gets here (classify drops it); refuse anyway.
            self.by_tuple.remove(&tuple);
            self.send_refusal(&tuple, pending.seq, pending.seg_len);
            let _ = reply.send(Err(AcceptError::ClientGone));
            return;
        }
        // The socket is alone in its set, so this SYN can only land on it.
        self.device.rx.push_front(pending.syn);
        let _ = self
            .iface
            .poll_ingress_single(now, &mut self.device, &mut sockets);
        let state = sockets.get::<tcp::Socket<'_>>(handle).state();
        if state != State::SynReceived {
            debug!(id, ?state, "stored SYN did not open the socket");
            self.keep_spare(sockets, handle);
            self.by_tuple.remove(&tuple);
            self.send_refusal(&tuple, pending.seq, pending.seg_len);
            let _ = reply.send(Err(AcceptError::ClientGone));
            return;
        }
        self.counters.accepted.fetch_add(1, Ordering::Relaxed);
        let shared = Arc::new(FlowShared::new(id, self.config.stream_buffer));
        self.entries.insert(
            id,
            Entry::Active(Active {
                tuple,
                sockets,
                handle,
                timer: None,
                shared,
                reply: Some(reply),
                established: false,
                peer_fin: false,
                we_closed: false,
                handshake_deadline: now + self.config.handshake_timeout.into(),
                last_activity: now,
                linger_deadline: None,
                queued: false,
            }),
        );
        // Its SYN-ACK goes out at the next poll.
        self.mark_dirty(id);
    }

    /// Keeps the socket set of a finished flow for the next one, up to
    /// [`SPARE_SOCKETS`].
    fn keep_spare(&mut self, mut sockets: SocketSet<'static>, handle: SocketHandle) {
        if self.spare.len() < SPARE_SOCKETS {
            // Closed, so that `listen` takes it (TIME-WAIT is not open
            // either, but its four-tuple would linger).
            sockets.get_mut::<tcp::Socket<'static>>(handle).abort();
            self.spare.push((sockets, handle));
        }
    }

    fn refuse(&mut self, id: FlowId) {
        if let Some(Entry::Pending(_)) = self.entries.get(&id)
            && let Some(Entry::Pending(p)) = self.entries.remove(&id)
        {
            self.n_pending -= 1;
            self.by_tuple.remove(&p.tuple);
            self.counters.refused.fetch_add(1, Ordering::Relaxed);
            trace!(id, "refused");
            self.send_refusal(&p.tuple, p.seq, p.seg_len);
            self.device.recycle_rx(p.syn.buf);
        }
    }

    fn send_refusal(&mut self, tuple: &FourTuple, seq: TcpSeqNumber, seg_len: usize) {
        let rst = packet::build_refusal(tuple, seq, seg_len);
        let len = rst.len();
        self.device.tx.push_back(Packet { buf: rst, len });
    }

    fn mark_dirty(&mut self, id: FlowId) {
        if let Some(Entry::Active(flow)) = self.entries.get_mut(&id)
            && !flow.queued
        {
            flow.queued = true;
            self.dirty.push(id);
        }
    }

    /// Runs smoltcp: every queued packet in, every flow touched since the
    /// last poll serviced, timeouts checked, segments out.
    pub fn poll(&mut self, now: Instant) {
        while let Some((packet, flow)) = self.inbox.pop_front() {
            let sockets = match flow.and_then(|id| self.entries.get_mut(&id)) {
                Some(Entry::Active(flow)) => &mut flow.sockets,
                _ => &mut self.no_sockets,
            };
            self.device.rx.push_back(packet);
            // The device holds this one packet, which the call takes.
            let _ = self
                .iface
                .poll_ingress_single(now, &mut self.device, sockets);
        }
        while let Some(&Reverse((at, id))) = self.timers.peek() {
            if at > now {
                break;
            }
            self.timers.pop();
            if let Some(Entry::Active(flow)) = self.entries.get_mut(&id)
                && flow.timer == Some(at)
            {
                flow.timer = None;
                self.mark_dirty(id);
            }
        }
        self.service_dirty(now);
        if now >= self.next_sweep {
            self.sweep(now);
            self.next_sweep = now + SWEEP_INTERVAL;
        }
        self.counters
            .pending
            .store(self.n_pending as u64, Ordering::Relaxed);
        self.counters.active.store(
            (self.entries.len() - self.n_pending) as u64,
            Ordering::Relaxed,
        );
    }

    fn service_dirty(&mut self, now: Instant) {
        let mut dirty = std::mem::take(&mut self.dirty);
        for id in dirty.drain(..) {
            self.service(id, now);
        }
        // Keep the allocation; services never push while we hold the list.
        if self.dirty.is_empty() {
            self.dirty = dirty;
        }
    }

    /// Checks flows for timeouts, and services them so that state changes
    /// made by smoltcp timers (retransmission give-up, TIME-WAIT) are seen.
    /// Up to [`SWEEP_ALL_BELOW`] flows are all visited every
    /// [`SWEEP_INTERVAL`]; past that, a tenth of them each time, so that
    /// every flow is still visited once a second while tens of thousands
    /// held cost a tenth of the work per tick.
    fn sweep(&mut self, now: Instant) {
        if self.to_sweep.is_empty() {
            self.to_sweep.extend(self.entries.keys().copied());
        }
        let n = self
            .to_sweep
            .len()
            .min(SWEEP_ALL_BELOW.max(self.entries.len().div_ceil(SWEEP_SLICES)));
        let ids: Vec<FlowId> = self.to_sweep.drain(self.to_sweep.len() - n..).collect();
        for id in ids {
            let expired = match self.entries.get_mut(&id) {
                Some(Entry::Pending(p)) => now >= p.deadline,
                Some(Entry::Active(flow)) => {
                    let socket = flow.sockets.get_mut::<tcp::Socket<'_>>(flow.handle);
                    let idle = now - flow.last_activity;
                    if let Some(limit) = self.config.idle_timeout
                        && flow.established
                        && idle >= limit.into()
                        && socket.is_open()
                    {
                        debug!(id, "idle flow reset");
                        self.counters.reaped_idle.fetch_add(1, Ordering::Relaxed);
                        socket.abort();
                        flow.shared.lock().error = Some(io::ErrorKind::TimedOut);
                    }
                    if flow.linger_deadline.is_some_and(|d| now >= d) && socket.is_open() {
                        socket.abort();
                    }
                    if idle >= SHRINK_AFTER {
                        let mut b = flow.shared.lock();
                        if b.rx.is_empty() && b.rx.capacity() > 0 {
                            b.rx = VecDeque::new();
                        }
                        if b.tx.is_empty() && b.tx.capacity() > 0 {
                            b.tx = VecDeque::new();
                        }
                    }
                    false
                }
                None => false,
            };
            if expired {
                debug!(id, "no decision in time; refusing");
                self.counters.expired.fetch_add(1, Ordering::Relaxed);
                self.refuse(id);
            } else {
                self.service(id, now);
            }
        }
    }

    /// Moves bytes between a flow's smoltcp socket and its stream buffers,
    /// sends what smoltcp has for it, and follows its state.
    fn service(&mut self, id: FlowId, now: Instant) {
        self.exchange(id, now);
        self.transmit(id, now);
    }

    /// The bytes and the state of [`Self::service`].
    fn exchange(&mut self, id: FlowId, now: Instant) {
        let Some(Entry::Active(flow)) = self.entries.get_mut(&id) else {
            return;
        };
        flow.queued = false;
        flow.shared.notified.store(false, Ordering::Release);
        let socket = flow.sockets.get_mut::<tcp::Socket<'static>>(flow.handle);

        if !flow.established {
            match socket.state() {
                State::Listen | State::SynReceived => {
                    if now < flow.handshake_deadline {
                        return;
                    }
                    socket.abort();
                    if let Some(reply) = flow.reply.take() {
                        let _ = reply.send(Err(AcceptError::HandshakeTimeout));
                    }
                    flow.shared.lock().dropped = true;
                }
                State::Closed => {
                    if let Some(reply) = flow.reply.take() {
                        let _ = reply.send(Err(AcceptError::ClientGone));
                    }
                    flow.shared.lock().dropped = true;
                }
                _ => {
                    flow.established = true;
                    if let Some(reply) = flow.reply.take() {
                        let stream = TcpFlow::new(
                            flow.shared.clone(),
                            self.cmd.clone(),
                            flow.tuple.src,
                            flow.tuple.dst,
                        );
                        // If the caller stopped waiting, the stream comes
                        // back and is dropped here, which closes the flow.
                        let _ = reply.send(Ok(stream));
                    }
                }
            }
        }

        let mut b = flow.shared.lock();
        if b.reset_requested && socket.is_open() {
            socket.abort();
            b.error.get_or_insert(io::ErrorKind::ConnectionAborted);
        }

        // Client → caller.
        let mut moved = false;
        if b.dropped {
            while socket.can_recv() {
                match socket.recv(|d| (d.len(), d.len())) {
                    Ok(0) | Err(_) => break,
                    Ok(_) => moved = true,
                }
            }
            b.rx.clear();
        } else {
            let mut got = false;
            while socket.can_recv() {
                let room = b.cap.saturating_sub(b.rx.len());
                if room == 0 {
                    break;
                }
                let rx = &mut b.rx;
                match socket.recv(|d| {
                    let n = d.len().min(room);
                    rx.extend(&d[..n]);
                    (n, n)
                }) {
                    Ok(0) | Err(_) => break,
                    Ok(_) => got = true,
                }
            }
            if got {
                moved = true;
                b.wake_reader();
            }
        }

        // Caller → client.
        let mut sent = false;
        while !b.tx.is_empty() && socket.can_send() {
            let tx = &mut b.tx;
            let n = socket
                .send(|d| {
                    let n = d.len().min(tx.len());
                    let (front, back) = tx.as_slices();
                    let first = n.min(front.len());
                    d[..first].copy_from_slice(&front[..first]);
                    d[first..n].copy_from_slice(&back[..n - first]);
                    (n, n)
                })
                .unwrap_or(0);
            if n == 0 {
                break;
            }
            b.tx.drain(..n);
            sent = true;
        }
        if sent {
            moved = true;
            b.wake_writer();
        }
        if !b.tx.is_empty() && !socket.may_send() {
            // The connection can no longer carry it.
            b.tx.clear();
        }

        // Our FIN, once everything written went into TCP.
        if (b.tx_shutdown || b.dropped) && b.tx.is_empty() && !flow.we_closed {
            socket.close();
            flow.we_closed = true;
        }
        if b.dropped && flow.linger_deadline.is_none() {
            flow.linger_deadline = Some(now + self.config.linger.into());
        }

        let state = socket.state();
        if matches!(
            state,
            State::CloseWait | State::LastAck | State::Closing | State::TimeWait
        ) {
            flow.peer_fin = true;
        }
        if flow.peer_fin && socket.recv_queue() == 0 && !b.rx_eof {
            b.rx_eof = true;
            b.wake_reader();
        }
        if moved {
            flow.last_activity = now;
        }
    }

    /// The segments of [`Self::service`]: smoltcp's for this flow's socket
    /// out, then the flow ended if its socket is done, or its timer set.
    fn transmit(&mut self, id: FlowId, now: Instant) {
        let Some(Entry::Active(flow)) = self.entries.get_mut(&id) else {
            return;
        };
        for _ in 0..EGRESS_ROUNDS {
            if self
                .iface
                .poll_egress(now, &mut self.device, &mut flow.sockets)
                == PollResult::None
            {
                break;
            }
        }
        let socket = flow.sockets.get::<tcp::Socket<'static>>(flow.handle);
        let state = socket.state();
        let done = match state {
            State::TimeWait => true,
            // Once smoltcp sent the RST of an abort.
            State::Closed => socket.remote_endpoint().is_none(),
            _ => false,
        };
        if !done {
            if let Some(at) = self.iface.poll_at(now, &flow.sockets)
                && flow.timer.is_none_or(|t| at < t)
            {
                flow.timer = Some(at);
                self.timers.push(Reverse((at, id)));
            }
            return;
        }
        let mut b = flow.shared.lock();
        if state == State::Closed
            && !(flow.we_closed && flow.peer_fin)
            && b.error.is_none()
            && !b.dropped
        {
            b.error = Some(io::ErrorKind::ConnectionReset);
        }
        b.detached = true;
        b.wake_reader();
        b.wake_writer();
        drop(b);
        trace!(id, ?state, "flow finished");
        if let Some(reply) = flow.reply.take() {
            let _ = reply.send(Err(AcceptError::ClientGone));
        }
        let tuple = flow.tuple;
        if let Some(Entry::Active(flow)) = self.entries.remove(&id) {
            self.keep_spare(flow.sockets, flow.handle);
        }
        self.by_tuple.remove(&tuple);
    }

    /// The next event for the caller.
    pub fn poll_event(&mut self) -> Option<Event> {
        self.events.pop_front()
    }

    /// The next packet to write into the tun, without removing it.
    pub fn peek_transmit(&self) -> Option<&[u8]> {
        self.device.tx.front().map(Packet::bytes)
    }

    /// Removes the packet returned by [`Self::peek_transmit`].
    pub fn pop_transmit(&mut self) {
        if let Some(p) = self.device.tx.pop_front() {
            self.device.recycle_tx(p.buf);
        }
    }

    /// When [`Self::poll`] must run next even if nothing arrives.
    pub fn poll_at(&mut self, now: Instant) -> Instant {
        let mut at = self.next_sweep;
        if let Some(&Reverse((t, _))) = self.timers.peek() {
            at = at.min(t);
        }
        if !self.dirty.is_empty() || !self.inbox.is_empty() {
            at = now;
        }
        at
    }

    /// Number of flows, pending or active.
    #[cfg(test)]
    pub fn flow_count(&self) -> usize {
        self.entries.len()
    }

    /// Number of sockets kept for reuse.
    #[cfg(test)]
    pub fn spare_count(&self) -> usize {
        self.spare.len()
    }

    /// Resets every flow (stack shutdown).
    pub fn reset_all(&mut self, now: Instant) {
        let ids: Vec<FlowId> = self.entries.keys().copied().collect();
        for id in ids {
            match self.entries.get(&id) {
                Some(Entry::Pending(_)) => self.refuse(id),
                Some(Entry::Active(flow)) => {
                    flow.shared.lock().reset_requested = true;
                    self.mark_dirty(id);
                }
                None => {}
            }
        }
        self.poll(now);
    }
}

/// A seed for smoltcp's initial sequence numbers and ephemeral choices,
/// different in every process.
fn random_seed() -> u64 {
    use std::hash::{BuildHasher, RandomState};
    RandomState::new().hash_one(std::time::SystemTime::now())
}
