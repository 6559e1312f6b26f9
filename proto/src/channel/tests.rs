//! Both sides of a control channel wired through memory with a fake clock.

use super::*;

const KEY: &str = "Q2hhbmdlTWUtdGhpcy1pcy1hLXRlc3Qta2V5LTAwMDE=";
const SHA: &str = "00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff";
const UNIX: u64 = 1_800_000_000;

fn string(hc: &str) -> ConnectionString {
    format!(
        "Endpoint=sb://relay.example:9443/;SharedAccessKeyName=listen;SharedAccessKey={KEY};EntityPath={hc};CertificateSha256={SHA}"
    )
    .parse()
    .unwrap()
}

fn hello() -> PeerHello {
    PeerHello {
        role: PeerRole::Agent,
        identity: Fingerprint([7; 32]),
        label: "onprem-1".parse().unwrap(),
    }
}

/// A peer and the relay, back to back. Each side's driver writes at once
/// unless told it is stuck; bytes reach the other side unless it does not
/// read.
struct Link {
    now: Instant,
    peer: PeerSession,
    relay: RelaySession,
    /// The relay's writes complete (the peer's receive window is open).
    relay_writes: bool,
    /// What the relay's driver was given and has not written.
    relay_writing: Option<BytesMut>,
    peer_events: Vec<PeerEvent>,
    relay_events: Vec<RelayEvent>,
    /// The session id the hub gives at the hello, if it registers at all.
    register_as: Option<u64>,
    /// Tokens the hub accepts (the names of their hybrid connections).
    hub_accepts: Vec<&'static str>,
    peer_error: Option<PeerError>,
    relay_error: Option<RelaySessionError>,
    /// Every message the relay sent, as the peer decoded it or not.
    relay_sent: usize,
}

impl Link {
    fn new(attachments: &[&'static str], ttl: Duration) -> Link {
        let now = Instant::now();
        let mut link = Link {
            now,
            peer: PeerSession::new(
                Timing::default(),
                hello(),
                attachments.iter().map(|e| string(e)).collect(),
                ttl,
                now,
            ),
            relay: RelaySession::new(Timing::default(), now, now + HANDSHAKE_TIMEOUT),
            relay_writes: true,
            relay_writing: None,
            peer_events: Vec::new(),
            relay_events: Vec::new(),
            register_as: Some(42),
            hub_accepts: attachments.to_vec(),
            peer_error: None,
            relay_error: None,
            relay_sent: 0,
        };
        link.drive();
        link
    }

    fn closed(&self) -> bool {
        self.peer_error.is_some() || self.relay_error.is_some()
    }

    /// Moves bytes and events until nothing moves without the clock.
    fn drive(&mut self) {
        let now = self.now;
        loop {
            if self.closed() {
                return;
            }
            let mut progress = false;
            if let Some(out) = self.peer.channel().poll_transmit(now) {
                self.peer.channel().transmitted(out.len(), now);
                self.relay.channel().receive(&out, now);
                progress = true;
            }
            if self.relay_writing.is_none() {
                self.relay_writing = self.relay.channel().poll_transmit(now);
            }
            if self.relay_writes
                && let Some(out) = self.relay_writing.take()
            {
                self.relay.channel().transmitted(out.len(), now);
                self.relay_sent += out.len();
                self.peer.channel().receive(&out, now);
                progress = true;
            }
            loop {
                match self.peer.poll_event(now, UNIX) {
                    Ok(Some(e)) => {
                        self.peer_events.push(e);
                        progress = true;
                    }
                    Ok(None) => break,
                    Err(e) => {
                        self.peer_error = Some(e);
                        return;
                    }
                }
            }
            loop {
                match self.relay.poll_event() {
                    Ok(Some(e)) => {
                        self.hub(&e);
                        self.relay_events.push(e);
                        progress = true;
                    }
                    Ok(None) => break,
                    Err(e) => {
                        self.relay_failed(e);
                        return;
                    }
                }
            }
            if !progress {
                return;
            }
        }
    }

    /// The relay closes: whatever it queued (a bye) still reaches the peer.
    fn relay_failed(&mut self, e: RelaySessionError) {
        if let Some(out) = self.relay.channel().poll_transmit(self.now) {
            self.peer.channel().receive(&out, self.now);
        }
        while self.peer_error.is_none() {
            match self.peer.poll_event(self.now, UNIX) {
                Ok(Some(e)) => self.peer_events.push(e),
                Ok(None) => break,
                Err(e) => self.peer_error = Some(e),
            }
        }
        self.relay_error = Some(e);
    }

    /// A hub that registers on hello and accepts the tokens it was told to.
    fn hub(&mut self, event: &RelayEvent) {
        match event {
            RelayEvent::Hello { .. } => {
                if let Some(id) = self.register_as {
                    self.relay.welcome(id, self.now).unwrap();
                }
            }
            RelayEvent::Message(PeerMessage::Attach { hc, .. }) => {
                if self.hub_accepts.contains(&hc.as_str()) {
                    self.relay.authenticated();
                }
            }
            RelayEvent::Message(_) => {}
        }
    }

    /// Advances the clock to `until` in steps of each side's next deadline.
    fn run_until(&mut self, until: Instant) {
        while !self.closed() {
            let next = self.peer.poll_timeout().min(self.relay.poll_timeout());
            if next > until {
                self.now = until;
                self.drive();
                return;
            }
            self.now = next.max(self.now);
            if let Err(e) = self.peer.handle_timeout(self.now, UNIX) {
                self.peer_error = Some(e);
            }
            if let Err(e) = self.relay.handle_timeout(self.now) {
                self.relay_failed(e);
            }
            self.drive();
        }
    }

    fn relay_messages(&self) -> Vec<&PeerMessage> {
        self.relay_events
            .iter()
            .filter_map(|e| match e {
                RelayEvent::Message(m) => Some(m),
                _ => None,
            })
            .collect()
    }
}

#[test]
fn hello_welcome_then_every_hybrid_connection_is_attached() {
    let link = Link::new(&["payroll", "crm"], Duration::from_secs(3600));
    assert!(matches!(
        link.relay_events[0],
        RelayEvent::Hello {
            role: PeerRole::Agent,
            ..
        }
    ));
    assert_eq!(link.peer_events, vec![PeerEvent::Up { session: 42 }]);
    assert_eq!(link.peer.session(), Some(42));
    let attached: Vec<&str> = link
        .relay_messages()
        .iter()
        .map(|m| match m {
            PeerMessage::Attach { hc, token } => {
                assert!(token.contains(&format!("se={}", UNIX + 3600)), "{token}");
                hc.as_str()
            }
            other => panic!("{other:?}"),
        })
        .collect();
    assert_eq!(attached, ["payroll", "crm"]);
    assert!(link.relay.is_authenticated());
}

#[test]
fn an_idle_healthy_channel_lives_on_keepalives_alone() {
    let mut link = Link::new(&["payroll"], Duration::from_secs(3600));
    let start = link.now;
    link.run_until(start + Duration::from_secs(600));
    assert!(link.peer_error.is_none(), "{:?}", link.peer_error);
    assert!(link.relay_error.is_none(), "{:?}", link.relay_error);
    assert!(link.relay_sent > 0);
}

#[test]
fn tokens_are_renewed_at_four_fifths_of_their_lifetime() {
    let mut link = Link::new(&["payroll"], Duration::from_secs(100));
    let start = link.now;
    link.run_until(start + Duration::from_secs(79));
    assert!(
        !link
            .relay_messages()
            .iter()
            .any(|m| matches!(m, PeerMessage::Renew { .. }))
    );
    link.run_until(start + Duration::from_secs(81));
    let renewals = link
        .relay_messages()
        .iter()
        .filter(|m| matches!(m, PeerMessage::Renew { .. }))
        .count();
    assert_eq!(renewals, 1);
    link.run_until(start + Duration::from_secs(250));
    let renewals = link
        .relay_messages()
        .iter()
        .filter(|m| matches!(m, PeerMessage::Renew { .. }))
        .count();
    assert_eq!(renewals, 3, "at 80, 160 and 240 s");
}

#[test]
fn a_peer_that_never_reads_is_closed_though_it_keeps_sending() {
    let mut link = Link::new(&["payroll"], Duration::from_secs(3600));
    let start = link.now;
    // From now on the peer sends a keep-alive every second and reads
    // nothing; the kernel still accepts every byte the relay writes.
    let relay = &mut link.relay;
    let mut t = start;
    let err = loop {
        t += Duration::from_secs(1);
        assert!(t < start + Duration::from_secs(60), "never closed");
        let nonce = (t - start).as_secs();
        relay
            .channel()
            .receive(&encoded(&PeerMessage::Ping { nonce }), t);
        // Keep-alives are answered inside; nothing reaches the hub.
        assert_eq!(relay.poll_event().unwrap(), None);
        if let Err(e) = relay.handle_timeout(t) {
            break e;
        }
        if let Some(out) = relay.channel().poll_transmit(t) {
            relay.channel().transmitted(out.len(), t);
        }
    };
    assert!(
        matches!(err, RelaySessionError::Channel(ChannelError::Unanswered(_))),
        "{err}"
    );
    // The first keep-alive after the peer stopped reading, plus the idle
    // timeout.
    assert!(
        t <= start + KEEPALIVE_INTERVAL + IDLE_TIMEOUT,
        "{:?}",
        t - start
    );
}

#[test]
fn a_write_that_never_completes_closes_the_channel_within_the_idle_timeout() {
    let mut link = Link::new(&["payroll"], Duration::from_secs(3600));
    let start = link.now;
    link.relay_writes = false;
    link.relay
        .send(&RelayMessage::Revoke {
            peer: Fingerprint([1; 32]),
            hc: "payroll".parse().unwrap(),
        })
        .unwrap();
    link.drive();
    link.run_until(start + Duration::from_secs(60));
    assert!(
        matches!(
            link.relay_error,
            Some(RelaySessionError::Channel(ChannelError::WriteStalled(_)))
        ),
        "{:?}",
        link.relay_error
    );
    assert!(link.now <= start + IDLE_TIMEOUT);
}

#[test]
fn a_full_queue_closes_the_channel_instead_of_dropping_a_message() {
    let now = Instant::now();
    let timing = Timing {
        max_backlog: 4096,
        ..Timing::default()
    };
    let mut channel: Channel<RelayMessage, PeerMessage> = Channel::new(timing, now);
    let grant = RelayMessage::Grant {
        peer: Fingerprint([1; 32]),
        hc: "payroll".parse().unwrap(),
    };
    // Nothing is written: the first grants queue, then the channel refuses.
    let mut sent = 0;
    let err = loop {
        match channel.send(&grant) {
            Ok(()) => sent += 1,
            Err(e) => break e,
        }
    };
    assert!(sent > 10, "{sent}");
    assert!(
        matches!(err, ChannelError::Backlog { max: 4096, .. }),
        "{err}"
    );
    // Handing bytes to a writer that does not finish still counts.
    let mut channel: Channel<RelayMessage, PeerMessage> = Channel::new(timing, now);
    let mut handed = 0;
    while channel.send(&grant).is_ok() {
        handed += channel.poll_transmit(now).map_or(0, |b| b.len());
    }
    assert!(handed <= 4096 && handed > 3000, "{handed}");
}

#[test]
fn a_silent_peer_is_closed_after_the_idle_timeout() {
    let now = Instant::now();
    let mut channel: Channel<RelayMessage, PeerMessage> = Channel::new(Timing::default(), now);
    let (t, err) = loop {
        let t = channel.poll_timeout();
        if let Err(e) = channel.handle_timeout(t) {
            break (t, e);
        }
        // The pings go out; nothing ever comes back.
        if let Some(out) = channel.poll_transmit(t) {
            channel.transmitted(out.len(), t);
        }
    };
    assert!(matches!(err, ChannelError::Silent(_)), "{err}");
    assert_eq!(t, now + IDLE_TIMEOUT);
}

#[test]
fn no_hello_in_time_closes_the_channel() {
    let now = Instant::now();
    let mut relay = RelaySession::new(Timing::default(), now, now + HANDSHAKE_TIMEOUT);
    assert!(relay.poll_timeout() <= now + HANDSHAKE_TIMEOUT);
    // Keep-alives do not stand in for a hello.
    relay.channel().receive(
        &encoded(&PeerMessage::Ping { nonce: 1 }),
        now + Duration::from_secs(1),
    );
    assert!(relay.poll_event().unwrap().is_none());
    assert!(matches!(
        relay.handle_timeout(now + HANDSHAKE_TIMEOUT),
        Err(RelaySessionError::NoHello)
    ));
}

fn encoded<M: serde::Serialize>(msg: &M) -> BytesMut {
    let mut out = BytesMut::new();
    control::encode(msg, &mut out);
    out
}

fn bye_of(relay: &mut RelaySession) -> String {
    let out = relay.channel().poll_transmit(Instant::now()).unwrap();
    let mut out = BytesMut::from(&out[..]);
    let mut last = None;
    while let Some(m) = control::decode::<RelayMessage>(&mut out).unwrap() {
        last = Some(m);
    }
    match last {
        Some(RelayMessage::Bye { message }) => message,
        other => panic!("{other:?}"),
    }
}

#[test]
fn a_first_message_other_than_hello_or_another_version_is_refused() {
    let now = Instant::now();
    let mut relay = RelaySession::new(Timing::default(), now, now + HANDSHAKE_TIMEOUT);
    relay.channel().receive(
        &encoded(&PeerMessage::PipeRequest {
            request_id: 1,
            agent: 1,
        }),
        now,
    );
    assert!(matches!(
        relay.poll_event(),
        Err(RelaySessionError::NotHello)
    ));

    let mut relay = RelaySession::new(Timing::default(), now, now + HANDSHAKE_TIMEOUT);
    relay.channel().receive(
        &encoded(&PeerMessage::Hello {
            version: PROTOCOL_VERSION + 1,
            role: PeerRole::Sender,
            identity: Fingerprint([0; 32]),
            label: "x".parse().unwrap(),
        }),
        now,
    );
    assert!(matches!(
        relay.poll_event(),
        Err(RelaySessionError::Version(v)) if v == PROTOCOL_VERSION + 1
    ));
    assert!(bye_of(&mut relay).contains("upgrade the older side"));
}

#[test]
fn a_welcomed_peer_that_never_attaches_is_told_and_closed() {
    let mut link = Link::new(&["payroll"], Duration::from_secs(3600));
    let mut unattached = Link::new(&[], Duration::from_secs(3600));
    let start = unattached.now;
    unattached.run_until(start + Duration::from_secs(30));
    assert!(
        matches!(unattached.relay_error, Some(RelaySessionError::NoAttach(_))),
        "{:?} {:?}",
        unattached.relay_error,
        unattached.peer_error
    );
    // The peer read why.
    assert!(
        matches!(&unattached.peer_error, Some(PeerError::Bye(m)) if m.contains("no hybrid connection attached")),
        "{:?}",
        unattached.peer_error
    );
    assert_eq!(unattached.now, start + ATTACH_TIMEOUT);
    // An attached one has no such deadline.
    let start = link.now;
    link.run_until(start + Duration::from_secs(30));
    assert!(link.relay_error.is_none());
}

#[test]
fn tokens_that_never_verify_are_capped() {
    let mut link = Link::new(&[], Duration::from_secs(3600));
    let attach = PeerMessage::Attach {
        hc: "payroll".parse().unwrap(),
        token: "SharedAccessSignature sr=x".into(),
    };
    for _ in 0..MAX_TOKENS_BEFORE_AUTH {
        link.peer.channel().send(&attach).unwrap();
        link.drive();
    }
    assert!(link.relay_error.is_none());
    link.peer.channel().send(&attach).unwrap();
    link.drive();
    assert!(
        matches!(link.relay_error, Some(RelaySessionError::TooManyTokens(_))),
        "{:?}",
        link.relay_error
    );
}

#[test]
fn messages_are_small_until_a_token_verifies() {
    let big = PeerMessage::Describe {
        hc: "payroll".parse().unwrap(),
        token: "x".repeat(PRE_AUTH_MAX_MESSAGE_LEN),
    };
    let mut link = Link::new(&[], Duration::from_secs(3600));
    link.peer.channel().send(&big).unwrap();
    link.drive();
    assert!(
        matches!(&link.relay_error, Some(RelaySessionError::BadMessage(m)) if m.contains("before a hybrid connection is attached")),
        "{:?}",
        link.relay_error
    );

    let mut link = Link::new(&["payroll"], Duration::from_secs(3600));
    link.peer.channel().send(&big).unwrap();
    link.drive();
    assert!(link.relay_error.is_none(), "{:?}", link.relay_error);
    assert!(matches!(
        link.relay_messages().last(),
        Some(PeerMessage::Describe { .. })
    ));
}

#[test]
fn a_second_hello_is_refused() {
    let mut link = Link::new(&["payroll"], Duration::from_secs(3600));
    link.peer
        .channel()
        .send(&PeerMessage::Hello {
            version: PROTOCOL_VERSION,
            role: PeerRole::Sender,
            identity: Fingerprint([0; 32]),
            label: "again".parse().unwrap(),
        })
        .unwrap();
    link.drive();
    assert!(matches!(
        link.relay_error,
        Some(RelaySessionError::SecondHello)
    ));
}

#[test]
fn a_relay_that_never_welcomes_is_left_after_the_handshake_timeout() {
    let mut link = Link {
        register_as: None,
        ..Link::new(&["payroll"], Duration::from_secs(3600))
    };
    // `Link::new` already welcomed; start over with a hub that does not.
    let now = link.now;
    link.peer = PeerSession::new(
        Timing::default(),
        hello(),
        vec![string("payroll")],
        Duration::from_secs(3600),
        now,
    );
    link.relay = RelaySession::new(Timing::default(), now, now + Duration::from_secs(3600));
    link.relay_events.clear();
    link.peer_events.clear();
    link.drive();
    link.run_until(now + Duration::from_secs(60));
    assert!(
        matches!(link.peer_error, Some(PeerError::NoWelcome(_))),
        "{:?}",
        link.peer_error
    );
    assert_eq!(link.now, now + HANDSHAKE_TIMEOUT);
    assert!(link.peer_events.is_empty());
}

#[test]
fn a_bye_ends_the_peer_side_with_the_relays_reason() {
    let mut link = Link::new(&["payroll"], Duration::from_secs(3600));
    link.relay
        .send(&RelayMessage::Bye {
            message: "going away".into(),
        })
        .unwrap();
    link.drive();
    assert!(matches!(&link.peer_error, Some(PeerError::Bye(m)) if m == "going away"));
}
