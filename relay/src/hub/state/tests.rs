//! The hub's decisions with a fake clock and records made on the spot.

use super::*;
use crate::registry::SlotKeys;

const START_UNIX: u64 = 1_800_000_000;

fn name(s: &str) -> HcName {
    s.parse().unwrap()
}

fn record(hc: &str) -> HcRecord {
    HcRecord {
        name: name(hc),
        endpoint: "10.0.0.1:5432".parse().unwrap(),
        created_unix: START_UNIX,
        send: SlotKeys::generate().unwrap(),
        listen: SlotKeys::generate().unwrap(),
        retired: Vec::new(),
    }
}

/// A hub with one hybrid connection, a fake clock, and what it said.
struct Bench {
    hub: HubState,
    now: Instant,
    unix: u64,
    record: HcRecord,
    sent: Vec<(SessionId, RelayMessage)>,
    refused: Vec<RefusedReason>,
    renewed: usize,
}

impl Bench {
    fn new() -> Bench {
        Bench::with(Quotas::default())
    }

    fn with(quotas: Quotas) -> Bench {
        Bench {
            hub: HubState::new(quotas, Key::generate().unwrap()),
            now: Instant::now(),
            unix: START_UNIX,
            record: record("payroll"),
            sent: Vec::new(),
            refused: Vec::new(),
            renewed: 0,
        }
    }

    fn advance(&mut self, by: Duration) {
        self.now += by;
        self.unix += by.as_secs();
    }

    fn collect(&mut self) {
        while let Some(out) = self.hub.poll_output() {
            match out {
                Output::Send(id, msg) => self.sent.push((id, msg)),
                Output::Refused(r) => self.refused.push(r),
                Output::Renewed => self.renewed += 1,
            }
        }
    }

    /// Everything said to `id` since the last call, in order.
    fn to(&mut self, id: SessionId) -> Vec<RelayMessage> {
        self.collect();
        let (mine, rest) = std::mem::take(&mut self.sent)
            .into_iter()
            .partition(|(to, _)| *to == id);
        self.sent = rest;
        mine.into_iter().map(|(_, m)| m).collect()
    }

    fn token(&self, role: PeerRole, key: &Key, lifetime: u64) -> String {
        sas::sign(
            "sb://relay.test/payroll",
            needed(role).rule_name(),
            key,
            self.unix + lifetime,
        )
    }

    fn key(&self, role: PeerRole) -> Key {
        match role {
            PeerRole::Sender => self.record.send.primary.clone(),
            PeerRole::Agent => self.record.listen.primary.clone(),
        }
    }

    /// Registers session `id` of `role` with identity `[who; 32]` and
    /// attaches it to `payroll` with a token valid for `lifetime` seconds.
    fn join(&mut self, id: SessionId, role: PeerRole, who: u8, lifetime: u64) {
        self.hub.register(
            id,
            role,
            Fingerprint([who; 32]),
            "test".parse().unwrap(),
            "192.0.2.1:1".parse().unwrap(),
            self.unix,
        );
        let token = self.token(role, &self.key(role), lifetime);
        let record = self.record.clone();
        self.hub
            .attach(id, name("payroll"), token, false, Some(&record), self.unix);
    }

    /// Attaches session `id` (already registered) to `other`, another
    /// hybrid connection, with its right key.
    fn also_attach(&mut self, id: SessionId, role: PeerRole, other: &HcRecord) {
        let key = match role {
            PeerRole::Sender => &other.send.primary,
            PeerRole::Agent => &other.listen.primary,
        };
        let token = sas::sign(
            &format!("sb://relay.test/{}", other.name),
            needed(role).rule_name(),
            key,
            self.unix + 3600,
        );
        self.hub
            .attach(id, other.name.clone(), token, false, Some(other), self.unix);
    }

    /// A sender's pipe request with a ticket made of `n`; whether it was
    /// granted (else the sender got `PipeFailed`).
    fn ask(&mut self, sender: SessionId, agent: SessionId, n: u32) -> bool {
        let mut t = [0u8; 16];
        t[..4].copy_from_slice(&n.to_be_bytes());
        self.hub
            .request_pipe(sender, u64::from(n), agent, Some(Ticket(t)), self.now);
        match self.to(sender).pop() {
            Some(RelayMessage::PipeTicket { .. }) => true,
            Some(RelayMessage::PipeFailed { .. }) => false,
            other => panic!("{other:?}"),
        }
    }

    /// Both ends of the pipe of ticket `n` arrive: it is spliced.
    fn splice(&mut self, n: u32) -> HcName {
        let mut t = [0u8; 16];
        t[..4].copy_from_slice(&n.to_be_bytes());
        assert_eq!(
            self.hub.claim(&Ticket(t), PipeRole::Agent, self.now),
            Ok(Claim::First)
        );
        match self.hub.claim(&Ticket(t), PipeRole::Sender, self.now) {
            Ok(Claim::Second { hc, .. }) => hc,
            other => panic!("{other:?}"),
        }
    }

    fn agent(&mut self, id: SessionId, who: u8) {
        self.join(id, PeerRole::Agent, who, 3600);
    }

    fn sender(&mut self, id: SessionId, who: u8) {
        self.join(id, PeerRole::Sender, who, 3600);
    }
}

fn grants(msgs: &[RelayMessage]) -> Vec<(u8, &str)> {
    msgs.iter()
        .filter_map(|m| match m {
            RelayMessage::Grant { peer, hc } => Some((peer.0[0], hc.as_str())),
            _ => None,
        })
        .collect()
}

fn revokes(msgs: &[RelayMessage]) -> Vec<u8> {
    msgs.iter()
        .filter_map(|m| match m {
            RelayMessage::Revoke { peer, .. } => Some(peer.0[0]),
            _ => None,
        })
        .collect()
}

fn agents(msgs: &[RelayMessage]) -> Option<Vec<SessionId>> {
    msgs.iter().rev().find_map(|m| match m {
        RelayMessage::Agents { agents, .. } => Some(agents.iter().map(|a| a.id).collect()),
        _ => None,
    })
}

fn detached(msgs: &[RelayMessage]) -> Option<DetachReason> {
    msgs.iter().find_map(|m| match m {
        RelayMessage::Detached { reason, .. } => Some(*reason),
        _ => None,
    })
}

#[test]
fn attaching_tells_each_side_of_the_other() {
    let mut b = Bench::new();
    b.agent(1, 0xa1);
    let to_agent = b.to(1);
    assert!(matches!(
        &to_agent[0],
        RelayMessage::Attached { endpoint: Some(e), .. } if e.to_string() == "10.0.0.1:5432"
    ));
    assert!(grants(&to_agent).is_empty(), "no sender yet");
    b.sender(2, 0x5e);
    let to_sender = b.to(2);
    assert_eq!(agents(&to_sender), Some(vec![1]));
    assert_eq!(grants(&b.to(1)), [(0x5e, "payroll")]);
    // A second agent learns of the sender already there; the sender learns
    // of both agents, in rotation order.
    b.agent(3, 0xa3);
    assert_eq!(grants(&b.to(3)), [(0x5e, "payroll")]);
    assert_eq!(agents(&b.to(2)), Some(vec![1, 3]));
    assert!(b.hub.has_attachment(3));
}

#[test]
fn a_renewal_extends_the_attachment_without_a_new_grant() {
    let mut b = Bench::new();
    b.agent(1, 0xa1);
    b.join(2, PeerRole::Sender, 0x5e, 100);
    b.collect();
    b.sent.clear();
    b.advance(Duration::from_secs(80));
    let token = b.token(PeerRole::Sender, &b.key(PeerRole::Sender), 100);
    let record = b.record.clone();
    b.hub
        .attach(2, name("payroll"), token, true, Some(&record), b.unix);
    assert!(matches!(
        b.to(2).as_slice(),
        [RelayMessage::Renewed { expires, .. }] if *expires == START_UNIX + 180
    ));
    assert_eq!(b.renewed, 1);
    assert!(b.to(1).is_empty(), "the agent hears nothing of a renewal");
    // Past the first token's expiry, the renewed one holds.
    b.advance(Duration::from_secs(50));
    b.hub.expire_tokens(b.unix);
    assert!(b.to(1).is_empty());
    assert!(b.hub.has_attachment(2));
}

#[test]
fn an_expired_token_detaches_and_revokes() {
    let mut b = Bench::new();
    b.agent(1, 0xa1);
    b.join(2, PeerRole::Sender, 0x5e, 100);
    b.collect();
    b.sent.clear();
    b.advance(Duration::from_secs(99));
    b.hub.expire_tokens(b.unix);
    assert!(b.to(2).is_empty());
    b.advance(Duration::from_secs(1));
    b.hub.expire_tokens(b.unix);
    assert_eq!(detached(&b.to(2)), Some(DetachReason::TokenExpired));
    assert_eq!(revokes(&b.to(1)), [0x5e]);
    assert!(!b.hub.has_attachment(2));
}

#[test]
fn a_regenerated_key_detaches_only_its_holders_and_revokes_them_everywhere() {
    let mut b = Bench::new();
    b.agent(1, 0xa1);
    b.agent(2, 0xa2);
    b.sender(3, 0x53);
    // The second sender attaches with the secondary key.
    b.hub.register(
        4,
        PeerRole::Sender,
        Fingerprint([0x54; 32]),
        "test".parse().unwrap(),
        "192.0.2.1:1".parse().unwrap(),
        b.unix,
    );
    let token = b.token(PeerRole::Sender, &b.record.send.secondary.clone(), 3600);
    let record = b.record.clone();
    b.hub
        .attach(4, name("payroll"), token, false, Some(&record), b.unix);
    b.collect();
    b.sent.clear();
    // The primary send key is regenerated.
    b.record.send.primary = Key::generate().unwrap();
    let record = b.record.clone();
    b.hub.recheck(&name("payroll"), Some(&record), b.unix);
    assert_eq!(detached(&b.to(3)), Some(DetachReason::KeyRegenerated));
    assert_eq!(detached(&b.to(4)), None, "the secondary key still holds");
    assert_eq!(revokes(&b.to(1)), [0x53]);
    assert_eq!(revokes(&b.to(2)), [0x53]);
}

#[test]
fn deleting_revokes_every_grant_at_every_agent_before_detaching_it() {
    // Whatever the order sessions were created in (the old hub walked a
    // HashMap), every agent hears every revoke.
    for order in [[1, 2, 3, 4], [4, 3, 2, 1], [2, 4, 1, 3]] {
        let mut b = Bench::new();
        for id in order {
            match id {
                1 | 3 => b.agent(id, 0xa0 + id as u8),
                _ => b.sender(id, 0x50 + id as u8),
            }
        }
        b.collect();
        b.sent.clear();
        b.hub.recheck(&name("payroll"), None, b.unix);
        for agent in [1, 3] {
            let msgs = b.to(agent);
            let mut revoked = revokes(&msgs);
            revoked.sort();
            assert_eq!(revoked, [0x52, 0x54], "agent {agent}, order {order:?}");
            let last = msgs.last().unwrap();
            assert!(
                matches!(
                    last,
                    RelayMessage::Detached {
                        reason: DetachReason::Deleted,
                        ..
                    }
                ),
                "{last:?}"
            );
        }
        assert!(b.hub.attached_hcs().is_empty());
    }
}

#[test]
fn a_revoke_waits_for_the_last_session_of_an_identity() {
    let mut b = Bench::new();
    b.agent(1, 0xa1);
    // Two sessions of one sender process (one identity).
    b.sender(2, 0x5e);
    b.sender(3, 0x5e);
    b.to(1);
    b.hub.unregister(2);
    assert!(revokes(&b.to(1)).is_empty(), "session 3 still holds it");
    b.hub.unregister(3);
    assert_eq!(revokes(&b.to(1)), [0x5e]);
}

#[test]
fn an_agent_that_detached_first_is_sent_nothing_after() {
    let mut b = Bench::new();
    b.join(1, PeerRole::Agent, 0xa1, 50);
    b.sender(2, 0x5e);
    b.collect();
    b.sent.clear();
    // The agent's token runs out first: it is told, and the sender learns
    // the rotation is empty.
    b.advance(Duration::from_secs(50));
    b.hub.expire_tokens(b.unix);
    assert_eq!(detached(&b.to(1)), Some(DetachReason::TokenExpired));
    assert_eq!(agents(&b.to(2)), Some(vec![]));
    // Then the sender goes: a detached agent gets no revoke (it dropped
    // its grants for this hybrid connection when it was told `Detached`).
    b.hub.unregister(2);
    assert!(b.to(1).is_empty());
}

#[test]
fn a_ticket_reaches_both_ends_and_splices_once() {
    let mut b = Bench::new();
    b.agent(1, 0xa1);
    b.sender(2, 0x5e);
    b.collect();
    b.sent.clear();
    let ticket = Ticket([9; 16]);
    b.hub.request_pipe(2, 7, 1, Some(ticket), b.now);
    assert!(matches!(
        b.to(1).as_slice(),
        [RelayMessage::PipeOffer { ticket: t, peer }] if *t == ticket && peer.0[0] == 0x5e
    ));
    assert!(matches!(
        b.to(2).as_slice(),
        [RelayMessage::PipeTicket { request_id: 7, agent: 1, ticket: t }] if *t == ticket
    ));
    assert_eq!(
        b.hub.claim(&ticket, PipeRole::Agent, b.now),
        Ok(Claim::First)
    );
    assert_eq!(
        b.hub.claim(&ticket, PipeRole::Agent, b.now),
        Err(PipeRefused::SameRole)
    );
    assert_eq!(
        b.hub.claim(&ticket, PipeRole::Sender, b.now),
        Ok(Claim::Second {
            sender: 2,
            agent: 1,
            hc: name("payroll"),
        })
    );
    assert_eq!(
        b.hub.claim(&ticket, PipeRole::Sender, b.now),
        Err(PipeRefused::UnknownTicket),
        "used once"
    );
    assert_eq!(b.hub.pending_tickets(), 0);
}

#[test]
fn a_ticket_that_expires_while_its_partner_dials_is_refused() {
    let mut b = Bench::new();
    b.agent(1, 0xa1);
    b.sender(2, 0x5e);
    let ticket = Ticket([3; 16]);
    b.hub.request_pipe(2, 1, 1, Some(ticket), b.now);
    assert_eq!(
        b.hub.claim(&ticket, PipeRole::Sender, b.now),
        Ok(Claim::First)
    );
    b.advance(TICKET_TTL);
    assert_eq!(
        b.hub.claim(&ticket, PipeRole::Agent, b.now),
        Err(PipeRefused::UnknownTicket)
    );
    assert_eq!(b.hub.pending_tickets(), 0);
}

#[test]
fn ticket_expiry_is_linear_in_the_number_of_tickets() {
    // 20,000 requests, then all expire: each ticket is looked at a bounded
    // number of times (the old hub scanned every ticket per request).
    let mut b = Bench::with(Quotas {
        max_pending_per_session: usize::MAX,
        ..Quotas::default()
    });
    b.agent(1, 0xa1);
    b.sender(2, 0x5e);
    for i in 0..20_000u32 {
        let mut t = [0u8; 16];
        t[..4].copy_from_slice(&i.to_be_bytes());
        b.hub
            .request_pipe(2, u64::from(i), 1, Some(Ticket(t)), b.now);
        b.advance(Duration::from_micros(100));
    }
    b.collect();
    assert_eq!(b.hub.pending_tickets(), 20_000);
    b.advance(TICKET_TTL);
    b.hub.expire_tickets(b.now);
    assert_eq!(b.hub.pending_tickets(), 0);
    assert!(b.hub.ticket_order.is_empty());
}

#[test]
fn quotas_on_pipes_per_session_relay_wide_and_agents() {
    let mut b = Bench::with(Quotas {
        max_agents: 2,
        max_pipes: 5,
        max_pending_per_session: 3,
        ..Quotas::default()
    });
    b.agent(1, 0xa1);
    b.agent(2, 0xa2);
    b.agent(3, 0xa3);
    assert_eq!(detached(&b.to(3)), Some(DetachReason::Quota));
    b.sender(10, 0x5a);
    b.sender(11, 0x5b);
    b.collect();
    b.sent.clear();
    let failed = |msgs: &[RelayMessage]| {
        msgs.iter()
            .filter(|m| matches!(m, RelayMessage::PipeFailed { .. }))
            .count()
    };
    // One tenant may hold three pending tickets, not four.
    for i in 0..4u8 {
        b.hub.request_pipe(10, 0, 1, Some(Ticket([i; 16])), b.now);
    }
    assert_eq!(failed(&b.to(10)), 1);
    // The other tenant still gets its share, up to the relay-wide limit of
    // five (pipes spliced now count too).
    for i in 0..3u8 {
        b.hub
            .request_pipe(11, 0, 2, Some(Ticket([0x40 + i; 16])), b.now);
    }
    assert_eq!(failed(&b.to(11)), 1);
    // A spliced pipe counts as much as a pending one.
    assert_eq!(
        b.hub.claim(&Ticket([0; 16]), PipeRole::Agent, b.now),
        Ok(Claim::First)
    );
    assert!(matches!(
        b.hub.claim(&Ticket([0; 16]), PipeRole::Sender, b.now),
        Ok(Claim::Second { .. })
    ));
    b.hub
        .request_pipe(11, 0, 2, Some(Ticket([0x50; 16])), b.now);
    assert_eq!(failed(&b.to(11)), 1);
    // Once it closes, its place is free again.
    b.hub.pipe_closed(&name("payroll"));
    b.hub
        .request_pipe(11, 0, 2, Some(Ticket([0x51; 16])), b.now);
    assert_eq!(failed(&b.to(11)), 0);
    assert_eq!(
        b.refused
            .iter()
            .filter(|r| **r == RefusedReason::quota)
            .count(),
        4
    );
}

#[test]
fn one_hybrid_connection_at_its_pipe_quota_leaves_the_others_their_share() {
    let mut b = Bench::with(Quotas {
        max_pipes_per_hc: 2,
        ..Quotas::default()
    });
    let ledger = record("ledger");
    b.agent(1, 0xa1);
    b.also_attach(1, PeerRole::Agent, &ledger);
    // The flooding tenant holds payroll's send key, the quiet one ledger's.
    b.sender(10, 0x5a);
    b.hub.register(
        11,
        PeerRole::Sender,
        Fingerprint([0x5b; 32]),
        "test".parse().unwrap(),
        "192.0.2.2:1".parse().unwrap(),
        b.unix,
    );
    b.also_attach(11, PeerRole::Sender, &ledger);
    b.collect();
    b.sent.clear();
    assert!(b.ask(10, 1, 1) && b.ask(10, 1, 2));
    assert!(!b.ask(10, 1, 3), "payroll is at its quota of two");
    assert_eq!(b.refused.last(), Some(&RefusedReason::hc_quota));
    assert!(b.ask(11, 1, 4) && b.ask(11, 1, 5), "ledger has its own two");
    assert_eq!(
        (
            b.hub.pipes_of(&name("payroll")),
            b.hub.pipes_of(&ledger.name)
        ),
        (2, 2)
    );
    // A spliced pipe keeps its place until it closes; an unused ticket
    // gives it back when it expires.
    assert_eq!(b.splice(1), name("payroll"));
    b.advance(TICKET_TTL);
    b.hub.expire_tickets(b.now);
    assert_eq!(
        (
            b.hub.pipes_of(&name("payroll")),
            b.hub.pipes_of(&ledger.name)
        ),
        (1, 0)
    );
    assert!(b.ask(10, 1, 6));
    assert!(!b.ask(10, 1, 7));
    b.hub.pipe_closed(&name("payroll"));
    assert!(b.ask(10, 1, 8));
}

#[test]
fn a_sender_holding_two_hybrid_connections_charges_the_one_with_room() {
    let mut b = Bench::with(Quotas {
        max_pipes_per_hc: 1,
        ..Quotas::default()
    });
    let ledger = record("ledger");
    b.agent(1, 0xa1);
    b.also_attach(1, PeerRole::Agent, &ledger);
    b.sender(10, 0x5a);
    b.also_attach(10, PeerRole::Sender, &ledger);
    b.collect();
    b.sent.clear();
    assert!(b.ask(10, 1, 1) && b.ask(10, 1, 2));
    assert!(
        !b.ask(10, 1, 3),
        "both hybrid connections are at their quota"
    );
    assert_eq!(
        (
            b.hub.pipes_of(&name("payroll")),
            b.hub.pipes_of(&ledger.name)
        ),
        (1, 1)
    );
}

#[test]
fn pipe_requests_past_the_burst_are_limited_to_the_rate() {
    let mut b = Bench::with(Quotas {
        max_pending_per_session: 4,
        pipe_requests_per_second: 2,
        ..Quotas::default()
    });
    b.agent(1, 0xa1);
    b.sender(10, 0x5a);
    b.collect();
    b.sent.clear();
    // The burst: four at once, each spliced at once (so the pending cap is
    // not what stops the fifth).
    for n in 1..=4 {
        assert!(b.ask(10, 1, n), "request {n} of the burst");
        b.splice(n);
    }
    assert!(!b.ask(10, 1, 5));
    assert_eq!(b.refused.last(), Some(&RefusedReason::rate));
    // Two a second after that.
    b.advance(Duration::from_millis(500));
    assert!(b.ask(10, 1, 6));
    assert!(!b.ask(10, 1, 7));
    b.advance(Duration::from_secs(10));
    let granted = (8..20).filter(|n| b.ask(10, 1, *n)).count();
    assert_eq!(
        granted, 4,
        "the allowance refills up to the burst, no further"
    );
}

#[test]
fn a_pipe_to_an_agent_of_another_hybrid_connection_is_refused() {
    let mut b = Bench::new();
    b.agent(1, 0xa1);
    b.hub.register(
        2,
        PeerRole::Sender,
        Fingerprint([0x5e; 32]),
        "test".parse().unwrap(),
        "192.0.2.1:1".parse().unwrap(),
        b.unix,
    );
    b.hub.request_pipe(2, 4, 1, Some(Ticket([1; 16])), b.now);
    assert!(matches!(
        b.to(2).as_slice(),
        [RelayMessage::PipeFailed { request_id: 4, .. }]
    ));
    assert!(
        !b.to(1)
            .iter()
            .any(|m| matches!(m, RelayMessage::PipeOffer { .. }))
    );
}

#[test]
fn unknown_names_and_wrong_keys_get_one_answer() {
    let mut b = Bench::new();
    let stranger = Key::generate().unwrap();
    let answer = |b: &mut Bench, id: SessionId, hc: &str, record: Option<&HcRecord>| {
        b.hub.register(
            id,
            PeerRole::Sender,
            Fingerprint([1; 32]),
            "test".parse().unwrap(),
            "192.0.2.1:1".parse().unwrap(),
            b.unix,
        );
        let token = sas::sign(
            &format!("sb://relay.test/{hc}"),
            "send",
            &stranger,
            b.unix + 600,
        );
        b.hub.attach(id, name(hc), token, false, record, b.unix);
        match b.to(id).pop() {
            Some(RelayMessage::Detached {
                reason, message, ..
            }) => (reason, message.replace(hc, "NAME")),
            other => panic!("{other:?}"),
        }
    };
    let record = b.record.clone();
    let wrong_key = answer(&mut b, 1, "payroll", Some(&record));
    let unknown = answer(&mut b, 2, "bonuses", None);
    assert_eq!(wrong_key, unknown);
    assert_eq!(
        b.refused,
        [RefusedReason::unauthorized, RefusedReason::unknown_hc]
    );
}

#[test]
fn a_token_that_lives_longer_than_the_cap_is_refused() {
    let mut b = Bench::with(Quotas {
        max_token_lifetime: 3600,
        ..Quotas::default()
    });
    b.join(1, PeerRole::Agent, 0xa1, 3601);
    match b.to(1).as_slice() {
        [
            RelayMessage::Detached {
                reason: DetachReason::Unauthorized,
                message,
                ..
            },
        ] => assert!(message.contains("--max-token-lifetime"), "{message}"),
        other => panic!("{other:?}"),
    }
    assert!(!b.hub.has_attachment(1));
    b.join(2, PeerRole::Agent, 0xa2, 3600);
    assert!(b.hub.has_attachment(2));
}

#[test]
fn a_describe_answers_the_endpoint_without_joining_the_rotation() {
    let mut b = Bench::new();
    b.sender(10, 0x5a);
    b.collect();
    b.sent.clear();
    b.hub.register(
        1,
        PeerRole::Agent,
        Fingerprint([0xa1; 32]),
        "installer".parse().unwrap(),
        "192.0.2.1:1".parse().unwrap(),
        b.unix,
    );
    let token = b.token(PeerRole::Agent, &b.key(PeerRole::Agent), 600);
    let record = b.record.clone();
    b.hub
        .describe(1, name("payroll"), token, Some(&record), b.unix);
    assert!(matches!(
        b.to(1).as_slice(),
        [RelayMessage::Described { hc, endpoint }] if hc.as_str() == "payroll" && *endpoint == record.endpoint
    ));
    // Not attached: no grant, no place among the agents senders see, and
    // still unauthenticated as far as the pre-auth limits go.
    assert!(!b.hub.has_attachment(1));
    assert!(
        b.to(10).is_empty(),
        "the sender heard of a describing session"
    );
    assert!(b.hub.agents(&name("payroll")).is_empty());
    // A wrong key gets the refusal anyone gets.
    let wrong = b.token(PeerRole::Agent, &Key::generate().unwrap(), 600);
    b.hub
        .describe(1, name("payroll"), wrong, Some(&record), b.unix);
    assert!(matches!(
        b.to(1).as_slice(),
        [RelayMessage::Detached {
            reason: DetachReason::Unauthorized,
            ..
        }]
    ));
}
