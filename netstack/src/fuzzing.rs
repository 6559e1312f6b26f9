//! Entry points for the fuzz target (`fuzz/fuzz_targets/netstack_packets.rs`)
//! and for replaying its corpus in tests. Not for production use.
//!
//! [`run_packets`] builds a stack with one established flow and one flow
//! waiting for a decision, on a fake clock, then interprets the input as a
//! list of records, each one of:
//!
//! | first byte % 4 | record |
//! | --- | --- |
//! | 0 | a raw IP packet from the tun |
//! | 1 | a TCP segment on the established flow: flags, sequence and acknowledgement offsets, payload (valid checksums, so it reaches the TCP state machine) |
//! | 2 | advance the clock |
//! | 3 | an action of the caller's stream: read, write, shut down, drop |
//!
//! Each record is `[kind: u8][len: u16 big-endian][len bytes]`; a short
//! record ends the input. After each one the stack is polled and its output
//! drained. New flows are accepted and refused in turn.

use std::net::SocketAddrV4;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Waker};

use smoltcp::time::{Duration, Instant};
use smoltcp::wire::{IpProtocol, Ipv4Packet, TcpControl, TcpPacket, TcpSeqNumber};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::{mpsc, oneshot};

use crate::config::{Ipv4Range, StackConfig};
use crate::engine::{Counters, Engine, Event};
use crate::error::AcceptError;
use crate::flow::{Command, TcpFlow};
use crate::packet::{build_syn, build_tcp};

const CLIENT: &str = "10.1.0.1:40000";
const SERVER: &str = "198.18.0.1:80";
const PENDING_CLIENT: &str = "10.1.0.2:40001";

struct Harness {
    engine: Engine,
    cmd_rx: mpsc::UnboundedReceiver<Command>,
    now: Instant,
    accepts: Vec<oneshot::Receiver<Result<TcpFlow, AcceptError>>>,
    streams: Vec<TcpFlow>,
    decide_accept: bool,
    client_seq: TcpSeqNumber,
    server_seq: TcpSeqNumber,
}

fn addr(s: &str) -> SocketAddrV4 {
    // The constants above are valid socket addresses.
    s.parse().expect("constant address")
}

fn lab_range() -> StackConfig {
    StackConfig::new(vec![
        Ipv4Range::new(std::net::Ipv4Addr::new(198, 18, 0, 0), 15).expect("constant range"),
    ])
}

impl Harness {
    /// The fuzzing stack: small buffers, so that windows fill quickly, and a
    /// second flow waiting for a decision.
    fn new() -> Self {
        let mut config = lab_range();
        config.udp_ports = vec![53];
        config.max_flows = 8;
        config.mtu = 1500;
        config.tcp_rx_buffer = 4096;
        config.tcp_tx_buffer = 4096;
        config.stream_buffer = 4096;
        let mut h = Self::established(config);
        // A second flow left undecided: its retransmissions and expiry are
        // reachable too.
        h.decide_accept = false;
        h.feed(build_syn(addr(PENDING_CLIENT), addr(SERVER), 5000));
        h.step_events_only();
        h
    }

    /// A stack with `config` and one accepted flow CLIENT → SERVER.
    fn established(config: StackConfig) -> Self {
        let (cmd_tx, cmd_rx) = mpsc::unbounded_channel();
        let now = Instant::from_millis(1_000);
        let engine = Engine::new(config, cmd_tx, Arc::new(Counters::default()), now);
        let mut h = Self {
            engine,
            cmd_rx,
            now,
            accepts: Vec::new(),
            streams: Vec::new(),
            decide_accept: true,
            client_seq: TcpSeqNumber(1000),
            server_seq: TcpSeqNumber(0),
        };
        h.establish();
        h
    }

    /// Opens the flow CLIENT → SERVER: SYN, accept, SYN-ACK, ACK.
    fn establish(&mut self) {
        self.feed(build_syn(addr(CLIENT), addr(SERVER), 999));
        self.step();
        // The SYN-ACK is the last packet the engine produced for CLIENT.
        if let Some(isn) = self.last_synack_seq() {
            self.server_seq = isn + 1;
        }
        let ack = build_tcp(
            addr(CLIENT),
            addr(SERVER),
            TcpControl::None,
            self.client_seq,
            Some(self.server_seq),
            &[],
        );
        self.feed(ack);
        self.step();
        self.drain();
    }

    fn last_synack_seq(&mut self) -> Option<TcpSeqNumber> {
        let mut found = None;
        while let Some(p) = self.engine.peek_transmit() {
            if let Ok(ip) = Ipv4Packet::new_checked(p)
                && ip.next_header() == IpProtocol::Tcp
                && let Ok(tcp) = TcpPacket::new_checked(ip.payload())
                && tcp.syn()
                && tcp.ack()
            {
                found = Some(tcp.seq_number());
            }
            self.engine.pop_transmit();
        }
        found
    }

    fn feed(&mut self, packet: Vec<u8>) {
        let mut buf = self.engine.take_buffer();
        let len = packet.len().min(buf.len());
        buf[..len].copy_from_slice(&packet[..len]);
        self.engine.handle_packet(buf, len, self.now);
    }

    fn step_events_only(&mut self) {
        while let Some(ev) = self.engine.poll_event() {
            if let Event::NewFlow { id, .. } = ev {
                if self.decide_accept {
                    let (tx, rx) = oneshot::channel();
                    self.engine
                        .handle_command(Command::Accept { id, reply: tx }, self.now);
                    self.accepts.push(rx);
                } else {
                    self.decide_accept = true;
                }
            }
        }
    }

    fn step(&mut self) {
        while let Ok(cmd) = self.cmd_rx.try_recv() {
            self.engine.handle_command(cmd, self.now);
        }
        self.engine.poll(self.now);
        self.step_events_only();
        self.engine.poll(self.now);
        self.accepts.retain_mut(|rx| match rx.try_recv() {
            Ok(Ok(stream)) => {
                self.streams.push(stream);
                false
            }
            Ok(Err(_)) | Err(oneshot::error::TryRecvError::Closed) => false,
            Err(oneshot::error::TryRecvError::Empty) => true,
        });
    }

    fn drain(&mut self) {
        while self.engine.peek_transmit().is_some() {
            self.engine.pop_transmit();
        }
    }

    fn segment(&mut self, data: &[u8]) {
        let [flags, rest @ ..] = data else { return };
        let word = |b: &[u8]| -> u32 {
            let mut w = [0u8; 4];
            for (d, s) in w.iter_mut().zip(b) {
                *d = *s;
            }
            u32::from_be_bytes(w)
        };
        let seq_off = word(rest.get(..4).unwrap_or(&[]));
        let ack_off = word(rest.get(4..8).unwrap_or(&[]));
        let payload = rest.get(8..).unwrap_or(&[]);
        let control = match flags & 0x7 {
            1 => TcpControl::Syn,
            2 => TcpControl::Fin,
            3 => TcpControl::Rst,
            4 => TcpControl::Psh,
            _ => TcpControl::None,
        };
        // Small offsets are in-window, large ones wrap to just below.
        let seq = self.client_seq + (seq_off as usize % 8192);
        let seq = if flags & 0x40 != 0 {
            TcpSeqNumber(seq.0.wrapping_sub(4096))
        } else {
            seq
        };
        let ack = if flags & 0x80 != 0 {
            None
        } else {
            Some(TcpSeqNumber(
                self.server_seq.0.wrapping_add(ack_off as i32 % 8192),
            ))
        };
        let packet = build_tcp(addr(CLIENT), addr(SERVER), control, seq, ack, payload);
        if flags & 0x08 != 0 && control == TcpControl::None {
            self.client_seq += payload.len();
        }
        self.feed(packet);
    }

    fn stream_action(&mut self, data: &[u8]) {
        let Some(stream) = self.streams.first_mut() else {
            return;
        };
        let mut cx = Context::from_waker(Waker::noop());
        match data.first().map(|b| b % 4) {
            Some(0) | None => {
                let mut buf = [0u8; 2048];
                let mut rb = ReadBuf::new(&mut buf);
                let _ = Pin::new(stream).poll_read(&mut cx, &mut rb);
            }
            Some(1) => {
                let _ = Pin::new(stream).poll_write(&mut cx, data.get(1..).unwrap_or(&[]));
            }
            Some(2) => {
                let _ = Pin::new(stream).poll_shutdown(&mut cx);
            }
            _ => {
                self.streams.remove(0);
            }
        }
    }
}

/// Feeds `data` (see the module documentation) through the whole packet
/// path. Must never panic, whatever the bytes.
pub fn run_packets(data: &[u8]) {
    let mut h = Harness::new();
    let mut rest = data;
    while let [kind, hi, lo, tail @ ..] = rest {
        let len = usize::from(u16::from_be_bytes([*hi, *lo])).min(tail.len());
        let (body, next) = tail.split_at(len);
        rest = next;
        match kind % 4 {
            0 => h.feed(body.to_vec()),
            1 => h.segment(body),
            2 => {
                let ms = body
                    .iter()
                    .take(2)
                    .fold(0u64, |acc, b| acc * 256 + u64::from(*b));
                h.now += Duration::from_millis(ms * 10);
            }
            _ => h.stream_action(body),
        }
        h.step();
        h.drain();
    }
    // Let every timer fire once.
    h.now += Duration::from_secs(3600);
    h.step();
}

/// One accepted flow on a stack with the default configuration (MTU 65535)
/// over an in-memory device, for the netstack micro-benchmark: the engine,
/// smoltcp and the caller's stream, without the tun.
#[derive(Debug)]
pub struct Bulk {
    h: Harness,
    payload: Vec<u8>,
    buf: Vec<u8>,
}

impl std::fmt::Debug for Harness {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Harness")
            .field("now", &self.now)
            .finish_non_exhaustive()
    }
}

impl Bulk {
    /// A flow that will receive segments of `segment` bytes.
    pub fn new(segment: usize) -> Bulk {
        Bulk {
            h: Harness::established(lab_range()),
            payload: vec![0x5a; segment],
            buf: vec![0; 256 * 1024],
        }
    }

    /// The client sends `count` in-order segments; after each, the stack
    /// runs and the caller's stream is read dry. Returns the bytes read.
    pub fn inbound(&mut self, count: usize) -> usize {
        let mut total = 0;
        let mut cx = Context::from_waker(Waker::noop());
        for _ in 0..count {
            let packet = build_tcp(
                addr(CLIENT),
                addr(SERVER),
                TcpControl::Psh,
                self.h.client_seq,
                Some(self.h.server_seq),
                &self.payload,
            );
            self.h.client_seq += self.payload.len();
            self.h.feed(packet);
            self.h.step();
            let Some(stream) = self.h.streams.first_mut() else {
                return total;
            };
            loop {
                let mut rb = ReadBuf::new(&mut self.buf);
                match Pin::new(&mut *stream).poll_read(&mut cx, &mut rb) {
                    std::task::Poll::Ready(Ok(())) if !rb.filled().is_empty() => {
                        total += rb.filled().len();
                    }
                    _ => break,
                }
            }
            self.h.step();
            self.h.drain();
        }
        total
    }
}

/// Inputs that cover each kind of record; the committed corpus starts from
/// these.
pub fn seed_inputs() -> Vec<(&'static str, Vec<u8>)> {
    fn record(kind: u8, body: &[u8]) -> Vec<u8> {
        let mut r = vec![kind];
        r.extend_from_slice(&(body.len() as u16).to_be_bytes());
        r.extend_from_slice(body);
        r
    }
    fn seg(flags: u8, seq: u32, ack: u32, payload: &[u8]) -> Vec<u8> {
        let mut b = vec![flags];
        b.extend_from_slice(&seq.to_be_bytes());
        b.extend_from_slice(&ack.to_be_bytes());
        b.extend_from_slice(payload);
        record(1, &b)
    }
    let syn = build_syn(addr("10.1.0.9:1234"), addr("198.18.0.7:443"), 7);
    let mut truncated = syn.clone();
    truncated.truncate(30);
    let mut fragment = syn.clone();
    fragment[6] = 0x20; // more fragments
    let udp = crate::packet::build_udp(addr("10.1.0.9:5353"), addr("198.18.0.1:53"), b"\x12\x34");
    let mut seeds = vec![
        ("new_syn", record(0, &syn)),
        ("truncated_syn", record(0, &truncated)),
        ("fragment", record(0, &fragment)),
        ("udp_hook", record(0, &udp)),
        ("garbage", record(0, &[0x45, 0xff, 0x00, 0x10, 1, 2, 3])),
        (
            "data_then_read",
            [seg(0x08, 0, 0, b"hello"), record(3, &[0])].concat(),
        ),
        (
            "fin_from_client",
            [seg(0x08, 0, 0, b"x"), seg(0x02, 1, 0, b"")].concat(),
        ),
        ("rst_from_client", seg(0x03, 0, 0, b"")),
        ("out_of_window", seg(0x40, 0, 0, b"old data")),
        ("syn_in_established", seg(0x01, 0, 0, b"")),
        (
            "write_and_shutdown",
            [record(3, b"\x01reply"), record(3, &[2]), seg(0, 0, 6, b"")].concat(),
        ),
        (
            "drop_stream",
            [record(3, &[3]), record(2, &[0, 10])].concat(),
        ),
        ("idle_timeouts", record(2, &[0xff, 0xff])),
        (
            "many_syns",
            (0..12u16)
                .flat_map(|i| {
                    let s = build_syn(
                        SocketAddrV4::new(std::net::Ipv4Addr::new(10, 1, 1, 1), 2000 + i),
                        addr("198.18.0.2:22"),
                        u32::from(i),
                    );
                    record(0, &s)
                })
                .collect(),
        ),
    ];
    seeds.sort_by_key(|(name, _)| *name);
    seeds
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn harness_establishes_a_flow() {
        let mut h = Harness::new();
        assert_eq!(h.streams.len(), 1, "the handshake completed");
        assert_eq!(h.engine.flow_count(), 2, "one active, one pending");
        // Data from the client reaches the stream.
        let data = build_tcp(
            addr(CLIENT),
            addr(SERVER),
            TcpControl::Psh,
            h.client_seq,
            Some(h.server_seq),
            b"ping",
        );
        h.feed(data);
        h.step();
        let mut buf = [0u8; 16];
        let mut rb = ReadBuf::new(&mut buf);
        let mut cx = Context::from_waker(Waker::noop());
        let r = Pin::new(&mut h.streams[0]).poll_read(&mut cx, &mut rb);
        assert!(r.is_ready());
        assert_eq!(rb.filled(), b"ping");
    }

    /// A `max_flows` above the old fixed 16,384 is what the stack holds:
    /// 20,000 flows (one established, the rest waiting for a decision, which
    /// count alike), and the next SYN is refused with a reset at once.
    #[test]
    fn a_configured_flow_cap_above_16384_is_honoured() {
        let mut h = small_stack(20_000);
        let client = |i| numbered_client(2, i);
        for i in 0..19_999 {
            h.feed(build_syn(client(i), addr(SERVER), 7));
        }
        assert_eq!(h.engine.flow_count(), 20_000);
        h.drain();
        h.feed(build_syn(client(19_999), addr(SERVER), 7));
        assert_eq!(h.engine.flow_count(), 20_000, "the flow past the cap");
        let refusal = h
            .engine
            .peek_transmit()
            .expect("a reset for the refused SYN");
        let ip = Ipv4Packet::new_checked(refusal).unwrap();
        let tcp = TcpPacket::new_checked(ip.payload()).unwrap();
        assert_eq!(ip.dst_addr(), *client(19_999).ip());
        assert!(tcp.rst());
    }

    /// A stack of 4 KiB socket buffers holding up to `max_flows`, with one
    /// flow established.
    fn small_stack(max_flows: usize) -> Harness {
        let mut config = lab_range();
        config.max_flows = max_flows;
        config.mtu = 1500;
        config.tcp_rx_buffer = 4096;
        config.tcp_tx_buffer = 4096;
        Harness::established(config)
    }

    /// Client `i` of network `10.net.0.0/16`.
    fn numbered_client(net: u8, i: u32) -> SocketAddrV4 {
        let [_, _, a, b] = (i + 1).to_be_bytes();
        SocketAddrV4::new(std::net::Ipv4Addr::new(10, net, a, b), 40000)
    }

    /// The segments the engine sent to `client` since the last drain.
    fn segments_to(
        h: &mut Harness,
        client: SocketAddrV4,
    ) -> Vec<(TcpControl, TcpSeqNumber, Vec<u8>)> {
        let mut out = Vec::new();
        while let Some(p) = h.engine.peek_transmit() {
            if let Ok(ip) = Ipv4Packet::new_checked(p)
                && ip.dst_addr() == *client.ip()
                && let Ok(tcp) = TcpPacket::new_checked(ip.payload())
                && tcp.dst_port() == client.port()
            {
                let control = if tcp.rst() {
                    TcpControl::Rst
                } else if tcp.syn() {
                    TcpControl::Syn
                } else if tcp.fin() {
                    TcpControl::Fin
                } else {
                    TcpControl::None
                };
                out.push((control, tcp.seq_number(), tcp.payload().to_vec()));
            }
            h.engine.pop_transmit();
        }
        out
    }

    fn read_all(stream: &mut TcpFlow) -> Vec<u8> {
        let mut buf = [0u8; 4096];
        let mut rb = ReadBuf::new(&mut buf);
        let mut cx = Context::from_waker(Waker::noop());
        let _ = Pin::new(stream).poll_read(&mut cx, &mut rb);
        rb.filled().to_vec()
    }

    /// A finished flow's socket serves the next flow, and carries nothing
    /// of the first over: the second client gets its own handshake, its
    /// stream reads its own bytes only, and what the caller writes reaches
    /// it from the first byte; a segment on the first flow's four-tuple is
    /// answered with a reset, as for any unknown flow.
    #[test]
    fn a_finished_flows_socket_serves_the_next_flow_afresh() {
        let mut config = lab_range();
        config.mtu = 1500;
        let mut h = Harness::established(config);
        let first = addr(CLIENT);
        let data = build_tcp(
            first,
            addr(SERVER),
            TcpControl::Psh,
            h.client_seq,
            Some(h.server_seq),
            &[b'A'; 1000],
        );
        h.feed(data);
        h.step();
        assert!(
            read_all(&mut h.streams[0]) == [b'A'; 1000],
            "the first flow's bytes"
        );
        let mut cx = Context::from_waker(Waker::noop());
        let _ = Pin::new(&mut h.streams[0]).poll_write(&mut cx, &[b'B'; 1000]);
        h.step();
        h.drain();
        // The client resets: the flow ends and its socket is kept.
        h.feed(build_tcp(
            first,
            addr(SERVER),
            TcpControl::Rst,
            h.client_seq + 1000,
            None,
            &[],
        ));
        h.step();
        h.drain();
        assert_eq!(h.engine.flow_count(), 0);
        assert_eq!(h.engine.spare_count(), 1);

        let second = SocketAddrV4::new(std::net::Ipv4Addr::new(10, 1, 0, 9), 40009);
        h.feed(build_syn(second, addr(SERVER), 70_000));
        h.step();
        assert_eq!(h.engine.spare_count(), 0, "the kept socket was taken");
        let synack = segments_to(&mut h, second);
        let [(TcpControl::Syn, isn, _)] = synack[..] else {
            panic!("one SYN-ACK, not {synack:?}");
        };
        let client_seq = TcpSeqNumber(70_001);
        h.feed(build_tcp(
            second,
            addr(SERVER),
            TcpControl::Psh,
            client_seq,
            Some(isn + 1),
            b"second",
        ));
        h.step();
        assert_eq!(h.streams.len(), 2);
        assert_eq!(read_all(&mut h.streams[1]), b"second");
        let _ = Pin::new(&mut h.streams[1]).poll_write(&mut cx, b"reply");
        h.step();
        let sent: Vec<_> = segments_to(&mut h, second)
            .into_iter()
            .filter(|(_, _, payload)| !payload.is_empty())
            .collect();
        assert_eq!(sent.len(), 1, "{sent:?}");
        assert_eq!(sent[0].1, isn + 1, "from its first byte");
        assert_eq!(sent[0].2, b"reply");
        // Keep-alive is armed by the handshake: no probe at once (there
        // was none above), one once the flow was idle for its interval.
        h.feed(build_tcp(
            second,
            addr(SERVER),
            TcpControl::None,
            client_seq + 6,
            Some(isn + 6),
            &[],
        ));
        h.step();
        h.now += Duration::from_secs(30);
        h.step();
        assert!(segments_to(&mut h, second).is_empty(), "nothing at 30 s");
        h.now += Duration::from_secs(31);
        h.step();
        let probe = segments_to(&mut h, second);
        assert!(
            matches!(&probe[..], [(TcpControl::None, seq, payload)] if *seq == isn + 5 && payload == &[0]),
            "a keep-alive probe at 61 s: {probe:?}"
        );

        h.feed(build_tcp(
            first,
            addr(SERVER),
            TcpControl::None,
            h.client_seq + 1000,
            Some(h.server_seq),
            b"late",
        ));
        h.step();
        let answer = segments_to(&mut h, first);
        assert!(
            matches!(answer[..], [(TcpControl::Rst, _, _)]),
            "{answer:?}"
        );
    }

    /// Thousands of flows held, each sent a byte at once: every byte is
    /// acknowledged and reaches its stream, in one poll.
    #[test]
    fn every_one_of_thousands_of_flows_takes_a_byte_sent_to_all_at_once() {
        const FLOWS: u32 = 3000;
        let mut h = small_stack(10_000);
        let client = |i| numbered_client(3, i);
        let mut isns = Vec::new();
        for i in 0..FLOWS {
            h.feed(build_syn(client(i), addr(SERVER), 100));
            h.step();
            let synack = segments_to(&mut h, client(i));
            let [(TcpControl::Syn, isn, _)] = synack[..] else {
                panic!("flow {i}: one SYN-ACK, not {synack:?}");
            };
            h.feed(build_tcp(
                client(i),
                addr(SERVER),
                TcpControl::None,
                TcpSeqNumber(101),
                Some(isn + 1),
                &[],
            ));
            isns.push(isn);
        }
        h.step();
        h.drain();
        assert_eq!(h.streams.len(), FLOWS as usize + 1);
        for (i, isn) in isns.iter().enumerate() {
            h.feed(build_tcp(
                client(i as u32),
                addr(SERVER),
                TcpControl::Psh,
                TcpSeqNumber(101),
                Some(*isn + 1),
                b"?",
            ));
        }
        h.step();
        let mut acked = 0;
        while let Some(p) = h.engine.peek_transmit() {
            if let Ok(ip) = Ipv4Packet::new_checked(p)
                && let Ok(tcp) = TcpPacket::new_checked(ip.payload())
                && tcp.ack()
                && tcp.ack_number() == TcpSeqNumber(102)
            {
                acked += 1;
            }
            h.engine.pop_transmit();
        }
        assert_eq!(acked, FLOWS, "flows whose byte was acknowledged");
        let delivered = h.streams[1..]
            .iter_mut()
            .map(read_all)
            .filter(|got| got == b"?")
            .count();
        assert_eq!(delivered, FLOWS as usize, "flows whose stream got the byte");
    }

    #[test]
    fn retransmitted_syn_makes_no_second_flow() {
        let mut h = Harness::new();
        h.feed(build_syn(addr(PENDING_CLIENT), addr(SERVER), 5000));
        h.step();
        assert_eq!(h.engine.flow_count(), 2);
    }

    #[test]
    fn undecided_flow_expires_with_reset() {
        let mut h = Harness::new();
        h.now += Duration::from_secs(11);
        h.engine.poll(h.now);
        assert_eq!(h.engine.flow_count(), 1, "pending flow refused");
    }

    #[test]
    fn seeds_run() {
        for (_, seed) in seed_inputs() {
            run_packets(&seed);
        }
    }
}
