//! Unit tests of the multiplexer, driven through a fake-clock [`Pair`].

use super::*;
use crate::frame::{FrameError, HEADER_LEN};

/// Two muxes wired back to back through in-memory buffers, with a fake
/// clock and a one-way latency.
struct Pair {
    now: Instant,
    client: Mux,
    server: Mux,
    /// Bytes in flight towards the server / client, with arrival times.
    to_server: VecDeque<(Instant, BytesMut)>,
    to_client: VecDeque<(Instant, BytesMut)>,
    latency: Duration,
    client_events: Vec<Event>,
    server_events: Vec<Event>,
}

impl Pair {
    fn new(config: Config) -> Self {
        Self::with_latency(config, Duration::ZERO)
    }

    fn with_latency(config: Config, latency: Duration) -> Self {
        let now = Instant::now();
        let mut pair = Self {
            now,
            client: Mux::new(Side::Client, config.clone(), now),
            server: Mux::new(Side::Server, config, now),
            to_server: VecDeque::new(),
            to_client: VecDeque::new(),
            latency,
            client_events: Vec::new(),
            server_events: Vec::new(),
        };
        pair.drive();
        pair
    }

    /// Moves bytes until nothing more can be delivered without the
    /// clock advancing.
    fn drive(&mut self) {
        loop {
            let mut progress = false;
            let mut out = BytesMut::new();
            self.client.poll_transmit(&mut out);
            if !out.is_empty() {
                self.to_server.push_back((self.now + self.latency, out));
                progress = true;
            }
            let mut out = BytesMut::new();
            self.server.poll_transmit(&mut out);
            if !out.is_empty() {
                self.to_client.push_back((self.now + self.latency, out));
                progress = true;
            }
            while self.to_server.front().is_some_and(|(t, _)| *t <= self.now) {
                let (_, mut b) = self.to_server.pop_front().unwrap();
                self.server.handle_input(&mut b, self.now);
                assert!(b.is_empty(), "whole frames are always delivered");
                progress = true;
            }
            while self.to_client.front().is_some_and(|(t, _)| *t <= self.now) {
                let (_, mut b) = self.to_client.pop_front().unwrap();
                self.client.handle_input(&mut b, self.now);
                progress = true;
            }
            while let Some(e) = self.client.poll_event() {
                self.client_events.push(e);
            }
            while let Some(e) = self.server.poll_event() {
                self.server_events.push(e);
            }
            if !progress {
                return;
            }
        }
    }

    /// Advances the clock by `d`, firing timers and deliveries in order.
    fn advance(&mut self, d: Duration) {
        let end = self.now + d;
        self.drive();
        loop {
            let next = [
                self.client.poll_timeout(),
                self.server.poll_timeout(),
                self.to_server.front().map(|(t, _)| *t),
                self.to_client.front().map(|(t, _)| *t),
            ]
            .into_iter()
            .flatten()
            .filter(|t| *t <= end)
            .min();
            let Some(t) = next else { break };
            self.now = self.now.max(t);
            self.client.handle_timeout(self.now);
            self.server.handle_timeout(self.now);
            self.drive();
        }
        self.now = end;
        self.drive();
    }

    fn open_accepted(&mut self, request: &'static [u8]) -> StreamId {
        let id = self.client.open(Bytes::from_static(request)).unwrap();
        self.drive();
        assert!(self.server_events.contains(&Event::IncomingStream {
            id,
            request: Bytes::from_static(request)
        }));
        self.server.accept(id, Bytes::from_static(b"ok")).unwrap();
        self.drive();
        assert!(self.client_events.contains(&Event::Accepted {
            id,
            payload: Bytes::from_static(b"ok")
        }));
        id
    }
}

fn read_all(m: &mut Mux, id: StreamId, now: Instant) -> Vec<u8> {
    let mut v = Vec::new();
    let mut buf = [0u8; 10_000];
    while let Ok(n) = m.read(id, &mut buf, now) {
        if n == 0 {
            break;
        }
        v.extend_from_slice(&buf[..n]);
    }
    v
}

#[test]
fn open_accept_data_both_ways_and_half_close() {
    let mut p = Pair::new(Config::default());
    let id = p.open_accepted(b"sql-prod");
    assert!(id.is_client_initiated());
    assert_eq!(p.client.write(id, b"hello ").unwrap(), 6);
    assert_eq!(p.client.write(id, b"server").unwrap(), 6);
    p.client.shutdown_write(id).unwrap();
    p.drive();
    assert!(p.server_events.contains(&Event::Readable { id }));
    assert!(p.server_events.contains(&Event::Finished { id }));
    let now = p.now;
    assert_eq!(read_all(&mut p.server, id, now), b"hello server");
    assert_eq!(p.server.read(id, &mut [0; 4], now), Ok(0), "end of stream");
    // The other direction still flows after the client's FIN.
    assert_eq!(p.server.write(id, b"reply").unwrap(), 5);
    p.server.shutdown_write(id).unwrap();
    assert_eq!(p.server.stream_count(), 0, "done both ways: released");
    p.drive();
    assert_eq!(read_all(&mut p.client, id, now), b"reply");
    // Reading the end of the stream after our own FIN released it.
    assert_eq!(p.client.stream_count(), 0);
    assert_eq!(
        p.client.read(id, &mut [0; 4], now),
        Err(StreamError::UnknownStream(id))
    );
    assert_eq!(
        p.client.write(id, b"x"),
        Err(StreamError::UnknownStream(id))
    );
}

#[test]
fn both_sides_start_with_the_configured_window() {
    let mut p = Pair::new(Config::default());
    let id = p.open_accepted(b"x");
    let big = vec![0u8; 1 << 20];
    // The opener's WINDOW arrived before the stream was accepted.
    assert_eq!(p.server.write(id, &big), Ok(256 * 1024));
    assert_eq!(p.client.write(id, &big), Ok(256 * 1024));
}

#[test]
fn small_writes_coalesce_into_one_frame() {
    let mut p = Pair::new(Config::default());
    let id = p.open_accepted(b"x");
    for _ in 0..100 {
        p.client.write(id, b"ab").unwrap();
    }
    let mut out = BytesMut::new();
    p.client.poll_transmit(&mut out);
    assert_eq!(out.len(), HEADER_LEN + 200);
    p.server.handle_input(&mut out, p.now);
    assert_eq!(read_all(&mut p.server, id, p.now), b"ab".repeat(100));
}

#[test]
fn reject_carries_the_payload_and_forgets_the_stream() {
    let mut p = Pair::new(Config::default());
    let id = p.client.open(Bytes::from_static(b"db")).unwrap();
    p.drive();
    p.server
        .reject(id, Bytes::from_static(b"connection refused by target"))
        .unwrap();
    p.drive();
    assert!(p.client_events.contains(&Event::Rejected {
        id,
        payload: Bytes::from_static(b"connection refused by target")
    }));
    assert_eq!(p.client.stream_count(), 0);
    assert_eq!(p.server.stream_count(), 0);
    assert_eq!(
        p.client.write(id, b"x"),
        Err(StreamError::UnknownStream(id))
    );
}

/// Every frame in `bytes`, which must hold whole frames only.
fn frames(mut bytes: BytesMut) -> Vec<Frame> {
    let mut frames = Vec::new();
    while let Some(f) = Frame::decode(&mut bytes, frame::DEFAULT_MAX_PAYLOAD).unwrap() {
        frames.push(f);
    }
    assert!(bytes.is_empty(), "a partial frame is left");
    frames
}

#[test]
fn no_rst_follows_a_reject() {
    let mut p = Pair::new(Config::default());
    let id = p.client.open(Bytes::from_static(b"db")).unwrap();
    p.drive();
    p.server.reject(id, Bytes::from_static(b"refused")).unwrap();
    // The application drops its side of the stream too, as the driver does.
    p.server.reset(id);
    let mut to_client = BytesMut::new();
    p.server.poll_transmit(&mut to_client);
    let sent = frames(to_client.clone());
    assert!(
        matches!(sent[..], [Frame::Reject { id: rejected, .. }] if rejected == id),
        "the server sends exactly the REJECT: {sent:?}"
    );
    p.client.handle_input(&mut to_client, p.now);
    assert!(matches!(
        p.client.poll_event(),
        Some(Event::Rejected { .. })
    ));
    p.client.reset(id);
    let mut to_server = BytesMut::new();
    p.client.poll_transmit(&mut to_server);
    let answered = frames(to_server);
    assert!(
        !answered.iter().any(|f| matches!(f, Frame::Rst { .. })),
        "the REJECT already ended the stream, yet the client sends {answered:?}"
    );
}

#[test]
fn server_opens_even_ids_and_ids_increase() {
    let mut p = Pair::new(Config::default());
    let a = p.server.open(Bytes::new()).unwrap();
    let b = p.server.open(Bytes::new()).unwrap();
    assert_eq!((a.get(), b.get()), (2, 4));
    let c = p.client.open(Bytes::new()).unwrap();
    assert_eq!(c.get(), 1);
    p.drive();
    assert_eq!(
        p.client_events
            .iter()
            .filter(|e| matches!(e, Event::IncomingStream { .. }))
            .count(),
        2
    );
}

#[test]
fn reset_aborts_both_directions_and_is_reported() {
    let mut p = Pair::new(Config::default());
    let id = p.open_accepted(b"x");
    p.server.write(id, b"unread").unwrap();
    p.drive();
    p.client.reset(id);
    assert_eq!(p.client.stream_count(), 0);
    p.drive();
    assert!(p.server_events.contains(&Event::Reset { id }));
    assert_eq!(p.server.write(id, b"more"), Err(StreamError::Reset));
    assert_eq!(
        p.server.read(id, &mut [0; 8], p.now),
        Err(StreamError::Reset)
    );
    p.server.reset(id);
    p.drive();
    assert_eq!(p.server.stream_count(), 0);
    assert!(!p.client.is_closed() && !p.server.is_closed());
}

#[test]
fn reset_after_peer_fin_keeps_the_complete_data_readable() {
    let mut p = Pair::new(Config::default());
    let id = p.open_accepted(b"x");
    p.server.write(id, b"all of it").unwrap();
    p.server.shutdown_write(id).unwrap();
    p.drive();
    // The server stops reading; it had finished sending, so the client
    // still gets everything the server sent.
    p.server.reset(id);
    p.drive();
    assert!(p.client_events.contains(&Event::Reset { id }));
    assert_eq!(read_all(&mut p.client, id, p.now), b"all of it");
    assert_eq!(p.client.read(id, &mut [0; 8], p.now), Ok(0));
    assert_eq!(p.client.write(id, b"more"), Err(StreamError::Reset));
}

#[test]
fn writer_is_limited_to_credit_and_resumes_when_reader_consumes() {
    let cfg = Config {
        initial_window: 128 * 1024,
        max_window: 128 * 1024,
        ..Config::default()
    };
    let mut p = Pair::new(cfg);
    let id = p.open_accepted(b"x");
    let big = vec![1u8; 1 << 20];
    assert_eq!(p.client.write(id, &big).unwrap(), 128 * 1024);
    assert_eq!(p.client.write(id, &big), Err(StreamError::Blocked));
    p.drive();
    assert_eq!(p.server.buffered(id), Some(128 * 1024));
    // Reading less than half the window grants nothing yet.
    let mut buf = vec![0u8; 60 * 1024];
    p.server.read(id, &mut buf, p.now).unwrap();
    p.drive();
    assert!(!p.client_events.contains(&Event::Writable { id }));
    p.server.read(id, &mut buf, p.now).unwrap();
    p.drive();
    assert!(p.client_events.contains(&Event::Writable { id }));
    // The grant came once 64 KiB (half the window) were consumed.
    assert_eq!(p.client.write(id, &big).unwrap(), 64 * 1024);
}

#[test]
fn window_grows_towards_the_bandwidth_delay_product() {
    let cfg = Config::default();
    let mut p = Pair::with_latency(cfg.clone(), Duration::from_millis(10));
    p.advance(Duration::from_millis(50));
    let id = p.client.open(Bytes::new()).unwrap();
    p.advance(Duration::from_millis(20));
    p.server.accept(id, Bytes::new()).unwrap();
    p.advance(Duration::from_millis(20));
    assert!(
        p.client_events
            .iter()
            .any(|e| matches!(e, Event::Accepted { .. }))
    );
    assert_eq!(p.server.recv_window(id), Some(cfg.initial_window));
    // A fast writer and a fast reader: every millisecond the client
    // writes all it may and the server reads everything.
    let chunk = vec![0u8; 1 << 20];
    let mut buf = vec![0u8; 1 << 20];
    let mut total = 0usize;
    for _ in 0..2000 {
        while let Ok(n) = p.client.write(id, &chunk) {
            total += n;
        }
        p.advance(Duration::from_millis(1));
        while let Ok(n) = p.server.read(id, &mut buf, p.now) {
            assert!(n > 0);
        }
        p.drive();
    }
    let window = p.server.recv_window(id).unwrap();
    assert!(
        window >= 4 * cfg.initial_window,
        "window stayed at {window}"
    );
    assert!(window <= cfg.max_window);
    // With a 20 ms RTT a 256 KiB window alone would allow ~13 MB/s;
    // 2 s at that rate is ~26 MB.
    assert!(total > 100 << 20, "only {total} bytes moved");
    assert!(p.client.rtt().unwrap() >= Duration::from_millis(20));
}

#[test]
fn session_budget_caps_window_growth() {
    let cfg = Config {
        max_session_window: 600 * 1024,
        ..Config::default()
    };
    let mut p = Pair::with_latency(cfg, Duration::from_millis(10));
    let id = p.client.open(Bytes::new()).unwrap();
    p.advance(Duration::from_millis(20));
    p.server.accept(id, Bytes::new()).unwrap();
    p.advance(Duration::from_millis(20));
    let chunk = vec![0u8; 1 << 20];
    let mut buf = vec![0u8; 1 << 20];
    for _ in 0..500 {
        while p.client.write(id, &chunk).is_ok() {}
        p.advance(Duration::from_millis(1));
        while p.server.read(id, &mut buf, p.now).is_ok() {}
        p.drive();
    }
    assert_eq!(
        p.server.recv_window(id),
        Some(512 * 1024),
        "one doubling fits in 600 KiB"
    );
}

#[test]
fn a_stalled_stream_does_not_stop_another() {
    let cfg = Config::default();
    let mut p = Pair::new(cfg.clone());
    let stalled = p.open_accepted(b"stalled");
    let live = p.open_accepted(b"live");
    let chunk = vec![3u8; 1 << 20];
    let mut buf = vec![0u8; 1 << 20];
    let mut moved = 0usize;
    for _ in 0..400 {
        let _ = p.client.write(stalled, &chunk);
        if let Ok(n) = p.client.write(live, &chunk) {
            moved += n;
        }
        p.drive();
        while let Ok(n) = p.server.read(live, &mut buf, p.now) {
            assert!(n > 0);
        }
        p.drive();
    }
    assert!(moved >= 50 << 20, "live stream moved only {moved} bytes");
    let stuck = p.server.buffered(stalled).unwrap();
    assert_eq!(
        stuck,
        u64::from(cfg.initial_window),
        "stalled stream holds exactly its window"
    );
    assert_eq!(p.client.write(stalled, &chunk), Err(StreamError::Blocked));
}

#[test]
fn dead_peer_is_detected_at_the_idle_timeout() {
    let mut p = Pair::new(Config::default());
    let id = p.open_accepted(b"x");
    // Keep-alives keep a healthy but silent session open: the client
    // heard from the server within one keep-alive interval of the end.
    p.advance(Duration::from_secs(60));
    assert!(!p.client.is_closed() && !p.server.is_closed());
    let heard_last = p.client.last_recv;
    assert!(
        heard_last + p.client.config.keepalive_interval >= p.now,
        "the client last heard from the server {:?} before the end of a minute of silence",
        p.now - heard_last
    );
    // Now the server vanishes: its bytes never arrive again.
    let mut pings = 0;
    let dead_from = p.now;
    let mut now = p.now;
    let mut closed_at = None;
    while closed_at.is_none() && now < dead_from + Duration::from_secs(30) {
        let t = p.client.poll_timeout().unwrap();
        assert!(t > now);
        now = t;
        p.client.handle_timeout(now);
        let mut out = BytesMut::new();
        p.client.poll_transmit(&mut out);
        if !out.is_empty() {
            pings += 1;
        }
        while let Some(e) = p.client.poll_event() {
            if let Event::Closed { reason } = e {
                assert_eq!(reason, CloseReason::IdleTimeout);
                closed_at = Some(now);
            }
        }
    }
    let last_recv = p.client.last_recv;
    let closed_at = closed_at.expect("session should close");
    assert_eq!(closed_at - last_recv, Duration::from_secs(15));
    assert!(closed_at - dead_from <= Duration::from_secs(15));
    assert!(pings >= 2, "keep-alive pings were sent ({pings})");
    assert_eq!(
        p.client.read(id, &mut [0; 4], now),
        Err(StreamError::SessionClosed)
    );
    assert_eq!(p.client.write(id, b"x"), Err(StreamError::SessionClosed));
    assert_eq!(p.client.poll_timeout(), None);
}

#[test]
fn open_past_the_stream_cap_is_rejected_with_a_reason() {
    let mut p = Pair::new(Config {
        max_streams: 2,
        ..Config::default()
    });
    let _a = p.client.open(Bytes::new()).unwrap();
    let _b = p.client.open(Bytes::new()).unwrap();
    let c = p.client.open(Bytes::new()).unwrap();
    p.drive();
    assert!(p.client_events.contains(&Event::Rejected {
        id: c,
        payload: Bytes::from_static(TOO_MANY_STREAMS)
    }));
    assert_eq!(p.server.stream_count(), 2);
}

/// The bound a pipe keeps against a peer opening streams without end: with
/// the default config, the session window covers 4,096 streams (256 MiB of
/// [`BASE_WINDOW`] each), below `max_streams`; every OPEN past them is
/// refused and the session stays up.
#[test]
fn a_pipe_holds_4096_streams_and_refuses_the_rest() {
    let config = Config::default();
    let bound = (config.max_session_window / u64::from(BASE_WINDOW)) as usize;
    assert_eq!(bound, 4096);
    assert!(bound <= config.max_streams);
    let now = Instant::now();
    let mut server = Mux::new(Side::Server, config, now);
    let mut input = BytesMut::new();
    for i in 0..5000u32 {
        Frame::Open {
            id: StreamId::new(2 * i + 1),
            request: Bytes::new(),
        }
        .encode(&mut input);
    }
    server.handle_input(&mut input, now);
    let mut incoming = 0;
    while let Some(e) = server.poll_event() {
        assert!(matches!(e, Event::IncomingStream { .. }), "{e:?}");
        incoming += 1;
    }
    assert_eq!(incoming, bound);
    assert_eq!(server.stream_count(), bound);
    let mut out = BytesMut::new();
    server.poll_transmit(&mut out);
    let mut rejects = 0;
    while let Some(frame) = Frame::decode(&mut out, u32::MAX).unwrap() {
        if let Frame::Reject { payload, .. } = frame {
            assert_eq!(payload, TOO_MANY_STREAMS);
            rejects += 1;
        }
    }
    assert_eq!(rejects, 5000 - bound);
    assert!(!server.is_closed());
}

fn violation(frames: &[Frame]) -> CloseReason {
    let mut p = Pair::new(Config::default());
    let mut buf = BytesMut::new();
    for f in frames {
        f.encode(&mut buf);
    }
    p.server.handle_input(&mut buf, p.now);
    p.drive();
    match p.server_events.last() {
        Some(Event::Closed { reason }) => reason.clone(),
        other => panic!("expected Closed, got {other:?}"),
    }
}

#[test]
fn protocol_violations_close_the_session() {
    let id1 = StreamId::new(1);
    let cases = [
        (
            vec![Frame::Data {
                id: id1,
                data: Bytes::from_static(b"x"),
            }],
            ProtocolError::UnopenedStream {
                id: id1,
                kind: FrameType::Data,
            },
        ),
        (
            vec![Frame::Open {
                id: StreamId::new(2),
                request: Bytes::new(),
            }],
            ProtocolError::WrongParity(StreamId::new(2)),
        ),
        (
            vec![
                Frame::Open {
                    id: StreamId::new(5),
                    request: Bytes::new(),
                },
                Frame::Open {
                    id: StreamId::new(3),
                    request: Bytes::new(),
                },
            ],
            ProtocolError::IdNotIncreasing(StreamId::new(3)),
        ),
        (
            vec![
                Frame::Open {
                    id: id1,
                    request: Bytes::new(),
                },
                Frame::Data {
                    id: id1,
                    data: Bytes::from_static(b"x"),
                },
            ],
            ProtocolError::BeforeAccept {
                id: id1,
                kind: FrameType::Data,
            },
        ),
        (
            vec![
                Frame::Open {
                    id: id1,
                    request: Bytes::new(),
                },
                Frame::Accept {
                    id: id1,
                    payload: Bytes::new(),
                },
            ],
            ProtocolError::UnexpectedAnswer {
                id: id1,
                kind: FrameType::Accept,
            },
        ),
    ];
    for (frames, expected) in cases {
        assert_eq!(violation(&frames), CloseReason::Protocol(expected));
    }
    let mut garbage = BytesMut::from(&[0xee; 9][..]);
    let mut p = Pair::new(Config::default());
    p.client.handle_input(&mut garbage, p.now);
    assert_eq!(
        p.client.close_reason(),
        Some(&CloseReason::Protocol(ProtocolError::Frame(
            FrameError::UnknownType(0xee)
        )))
    );
    // The peer is told why.
    p.drive();
    assert!(
        matches!(p.server_events.last(), Some(Event::Closed { reason: CloseReason::PeerGoAway(r) }) if r.contains("unknown frame type"))
    );
}

#[test]
fn data_beyond_credit_is_a_flow_control_violation() {
    let mut p = Pair::new(Config::default());
    let id = p.open_accepted(b"x");
    let mut buf = BytesMut::new();
    let chunk = Bytes::from(vec![0u8; 64 * 1024]);
    for _ in 0..4 {
        Frame::Data {
            id,
            data: chunk.clone(),
        }
        .encode(&mut buf);
    }
    p.server.handle_input(&mut buf, p.now);
    assert!(
        !p.server.is_closed(),
        "256 KiB is within the initial window"
    );
    Frame::Data {
        id,
        data: Bytes::from_static(b"!"),
    }
    .encode(&mut buf);
    p.server.handle_input(&mut buf, p.now);
    assert_eq!(
        p.server.close_reason(),
        Some(&CloseReason::Protocol(ProtocolError::FlowControl {
            id,
            limit: 256 * 1024,
            received: 256 * 1024 + 1
        }))
    );
}

#[test]
fn late_frames_for_released_streams_are_ignored() {
    let mut p = Pair::new(Config::default());
    let id = p.open_accepted(b"x");
    p.server.reset(id);
    // The client writes before learning of the reset.
    p.client.write(id, b"late").unwrap();
    p.client.shutdown_write(id).unwrap();
    p.drive();
    assert!(!p.server.is_closed());
    assert!(p.client_events.contains(&Event::Reset { id }));
}

#[test]
fn goaway_closes_both_sides_and_fails_streams() {
    let mut p = Pair::new(Config::default());
    let id = p.open_accepted(b"x");
    p.client.close("bye");
    p.drive();
    assert_eq!(
        p.client_events.last(),
        Some(&Event::Closed {
            reason: CloseReason::Local
        })
    );
    assert_eq!(
        p.server_events.last(),
        Some(&Event::Closed {
            reason: CloseReason::PeerGoAway("bye".into())
        })
    );
    assert_eq!(p.server.write(id, b"x"), Err(StreamError::SessionClosed));
    assert_eq!(p.client.open(Bytes::new()), Err(OpenError::SessionClosed));
}

#[test]
fn output_backlog_pushes_back_on_writers_until_drained() {
    let cfg = Config {
        max_buffered_output: 100 * 1024,
        ..Config::default()
    };
    let mut p = Pair::new(cfg);
    let a = p.open_accepted(b"a");
    let b = p.open_accepted(b"b");
    let data = vec![0u8; 200 * 1024];
    assert_eq!(p.client.write(a, &data).unwrap(), 100 * 1024);
    assert_eq!(p.client.write(b, &data), Err(StreamError::Blocked));
    let mut out = BytesMut::new();
    p.client.poll_transmit(&mut out);
    assert_eq!(p.client.poll_event(), Some(Event::Writable { id: b }));
    assert!(p.client.write(b, &data).unwrap() > 0);
}

#[test]
fn receive_credit_never_exceeds_the_session_window() {
    let budget = 10 * u64::from(BASE_WINDOW);
    let small = Config {
        max_session_window: budget,
        ..Config::default()
    };
    let mut p = Pair::new(Config::default());
    p.server = Mux::new(Side::Server, small.clone(), p.now);
    for _ in 0..20 {
        p.client.open(Bytes::new()).unwrap();
    }
    p.drive();
    let incoming: Vec<StreamId> = p
        .server_events
        .iter()
        .filter_map(|e| match e {
            Event::IncomingStream { id, .. } => Some(*id),
            _ => None,
        })
        .collect();
    let rejected = p
        .client_events
        .iter()
        .filter(|e| matches!(e, Event::Rejected { payload, .. } if payload == TOO_MANY_STREAMS))
        .count();
    assert_eq!((incoming.len(), rejected), (10, 10));
    for id in &incoming {
        p.server.accept(*id, Bytes::new()).unwrap();
    }
    p.drive();
    let committed: u64 = incoming
        .iter()
        .map(|id| u64::from(p.server.recv_window(*id).unwrap()))
        .sum();
    assert!(committed <= budget, "{committed} > {budget}");
    // A released stream gives its credit back: the next OPEN is accepted.
    p.server.reset(incoming[0]);
    p.drive();
    let again = p.client.open(Bytes::new()).unwrap();
    p.drive();
    assert!(
        p.server_events
            .iter()
            .any(|e| matches!(e, Event::IncomingStream { id, .. } if *id == again))
    );

    // Our own opens stop at the budget too: the first streams get more
    // than the base window, the later ones the base window alone.
    let mut alone = Mux::new(Side::Client, small, p.now);
    let mut opened = Vec::new();
    let refusal = loop {
        match alone.open(Bytes::new()) {
            Ok(id) => opened.push(id),
            Err(e) => break e,
        }
    };
    assert!(matches!(refusal, OpenError::SessionFull), "{refusal}");
    let committed: u64 = opened
        .iter()
        .map(|id| u64::from(alone.recv_window(*id).unwrap()))
        .sum();
    assert!(committed <= budget, "{committed} > {budget}");
    assert!(alone.recv_window(opened[0]).unwrap() > BASE_WINDOW);
    assert!(opened.len() > 3, "{}", opened.len());
}

#[test]
fn can_open_says_when_a_stream_would_be_refused() {
    // By the stream cap: the peer would reject the third OPEN.
    let mut p = Pair::new(Config {
        max_streams: 2,
        ..Config::default()
    });
    let a = p.client.open(Bytes::new()).unwrap();
    assert!(p.client.can_open());
    p.client.open(Bytes::new()).unwrap();
    assert!(!p.client.can_open());
    p.client.reset(a);
    p.drive();
    assert!(p.client.can_open(), "a released stream makes room again");

    // By the session window: exactly when open would say SessionFull.
    let mut alone = Mux::new(
        Side::Client,
        Config {
            initial_window: BASE_WINDOW,
            max_session_window: 4 * u64::from(BASE_WINDOW),
            ..Config::default()
        },
        p.now,
    );
    let mut opened = 0;
    while alone.can_open() {
        alone.open(Bytes::new()).unwrap();
        opened += 1;
    }
    assert_eq!(opened, 4);
    assert!(matches!(
        alone.open(Bytes::new()),
        Err(OpenError::SessionFull)
    ));

    // And never on a closed session.
    p.client.close("done");
    assert!(!p.client.can_open());
}

#[test]
fn opens_and_credit_overtake_a_backlog_of_data() {
    let mut p = Pair::new(Config::default());
    let bulk = p.open_accepted(b"bulk");
    // A backlog of DATA on one stream, not yet transmitted...
    let written = p.client.write(bulk, &vec![7u8; 200_000]).unwrap();
    assert!(written > 0);
    // ...then a new stream's OPEN and a PING's PONG to answer.
    let fresh = p.client.open(Bytes::from_static(b"new")).unwrap();
    let mut ping = BytesMut::new();
    Frame::Ping { opaque: 42 }.encode(&mut ping);
    p.client.handle_input(&mut ping, p.now);
    let mut out = BytesMut::new();
    p.client.poll_transmit(&mut out);
    let sent = frames(out);
    let first_data = sent
        .iter()
        .position(|f| matches!(f, Frame::Data { .. }))
        .expect("the DATA goes out too");
    let open_at = sent
        .iter()
        .position(|f| matches!(f, Frame::Open { id, .. } if *id == fresh));
    let pong_at = sent
        .iter()
        .position(|f| matches!(f, Frame::Pong { opaque: 42 }));
    assert!(
        open_at < Some(first_data) && pong_at < Some(first_data),
        "the OPEN or the PONG waited behind DATA: {:?}",
        &sent[..first_data + 1]
    );
    let data: usize = sent
        .iter()
        .map(|f| match f {
            Frame::Data { id, data } if *id == bulk => data.len(),
            _ => 0,
        })
        .sum();
    assert_eq!(data, written, "the DATA still goes out, after them");
}

#[test]
fn a_streams_fin_never_overtakes_its_data() {
    let mut p = Pair::new(Config::default());
    let id = p.open_accepted(b"x");
    p.client.write(id, b"last bytes").unwrap();
    p.client.shutdown_write(id).unwrap();
    let mut out = BytesMut::new();
    p.client.poll_transmit(&mut out);
    let sent = frames(out);
    let data_at = sent.iter().position(|f| matches!(f, Frame::Data { .. }));
    let fin_at = sent.iter().position(|f| matches!(f, Frame::Fin { .. }));
    assert!(data_at.is_some() && data_at < fin_at, "{sent:?}");
}

#[test]
fn an_open_after_a_reset_never_overtakes_the_rst() {
    let mut p = Pair::new(Config::default());
    let old = p.open_accepted(b"old");
    // A backlog of DATA, then the stream is dropped: its RST waits behind
    // the DATA, and its room is free again on this side at once.
    p.client.write(old, &vec![1u8; 100_000]).unwrap();
    p.client.reset(old);
    let fresh = p.client.open(Bytes::from_static(b"fresh")).unwrap();
    let mut out = BytesMut::new();
    p.client.poll_transmit(&mut out);
    let sent = frames(out.clone());
    let rst_at = sent
        .iter()
        .position(|f| matches!(f, Frame::Rst { id } if *id == old));
    let open_at = sent
        .iter()
        .position(|f| matches!(f, Frame::Open { id, .. } if *id == fresh));
    assert!(rst_at.is_some() && rst_at < open_at, "{:?}", &sent);
    // The peer learns of the reset before it sees the new stream.
    p.server.handle_input(&mut out, p.now);
    while let Some(e) = p.server.poll_event() {
        p.server_events.push(e);
    }
    let reset_at = p
        .server_events
        .iter()
        .position(|e| matches!(e, Event::Reset { id } if *id == old));
    let incoming_at = p
        .server_events
        .iter()
        .position(|e| matches!(e, Event::IncomingStream { id, .. } if *id == fresh));
    assert!(
        reset_at.is_some() && (incoming_at.is_none() || reset_at < incoming_at),
        "{:?}",
        p.server_events
    );
}
