//! Which Azure-protocol listeners serve which hybrid connection, and the
//! rendezvous tickets waiting for a listener, without I/O.
//!
//! Generic over what a listener is reached by (`L`) and what a waiting
//! sender is told through (`W`), so the decisions are tested with plain
//! values; the shell in the parent module uses channels. The time comes in
//! as an argument.

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

use proto::name::HcName;

/// How long an `accept`'s address is valid, and how long a sender waits
/// for a listener to open it.
pub const RENDEZVOUS_TTL: Duration = Duration::from_secs(30);

/// The relay's id of one listener control channel.
pub type ListenerId = u64;

/// Why a listener was not added.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error(
    "hybrid connection has {0} listeners already, the relay's limit (relay serve --max-listeners)"
)]
pub struct TooManyListeners(pub usize);

#[derive(Debug)]
struct Rotation<L> {
    members: Vec<(ListenerId, L)>,
    next: usize,
}

#[derive(Debug)]
struct Waiting<W> {
    created: Instant,
    hc: HcName,
    waiter: W,
}

/// The listeners per hybrid connection and the tickets of senders waiting
/// for one.
#[derive(Debug)]
pub struct Listeners<L, W> {
    by_hc: HashMap<HcName, Rotation<L>>,
    waiting: HashMap<String, Waiting<W>>,
    /// Tickets in the order they were drawn, for expiry: entries whose
    /// ticket was already used are skipped when they reach the front.
    order: VecDeque<(Instant, String)>,
    max_per_hc: usize,
    next_id: ListenerId,
}

impl<L: Clone, W> Listeners<L, W> {
    /// No listeners; at most `max_per_hc` on one hybrid connection.
    pub fn new(max_per_hc: usize) -> Listeners<L, W> {
        Listeners {
            by_hc: HashMap::new(),
            waiting: HashMap::new(),
            order: VecDeque::new(),
            max_per_hc,
            next_id: 1,
        }
    }

    /// Adds a listener of `hc`; its id, for [`Listeners::remove`].
    pub fn add(&mut self, hc: &HcName, listener: L) -> Result<ListenerId, TooManyListeners> {
        let rotation = self.by_hc.entry(hc.clone()).or_insert_with(|| Rotation {
            members: Vec::new(),
            next: 0,
        });
        if rotation.members.len() >= self.max_per_hc {
            return Err(TooManyListeners(rotation.members.len()));
        }
        let id = self.next_id;
        self.next_id += 1;
        rotation.members.push((id, listener));
        Ok(id)
    }

    /// Removes a listener (its channel ended).
    pub fn remove(&mut self, hc: &HcName, id: ListenerId) {
        if let Some(rotation) = self.by_hc.get_mut(hc) {
            rotation.members.retain(|(member, _)| *member != id);
            if rotation.members.is_empty() {
                self.by_hc.remove(hc);
            }
        }
    }

    /// The listeners of `hc` now.
    pub fn count(&self, hc: &HcName) -> usize {
        self.by_hc.get(hc).map_or(0, |r| r.members.len())
    }

    /// The listeners of `hc` in the order they came, without moving the
    /// rotation.
    pub fn members(&self, hc: &HcName) -> Vec<L> {
        self.by_hc
            .get(hc)
            .map(|r| r.members.iter().map(|(_, l)| l.clone()).collect())
            .unwrap_or_default()
    }

    /// The listeners of `hc` in the order a new sender should try them:
    /// round robin, each call starting one further.
    pub fn rotation(&mut self, hc: &HcName) -> Vec<L> {
        self.rotation_with_ids(hc)
            .into_iter()
            .map(|(_, listener)| listener)
            .collect()
    }

    /// [`Listeners::rotation`] with each listener's id.
    pub fn rotation_with_ids(&mut self, hc: &HcName) -> Vec<(ListenerId, L)> {
        let Some(rotation) = self.by_hc.get_mut(hc) else {
            return Vec::new();
        };
        let n = rotation.members.len();
        let start = rotation.next % n;
        rotation.next = (start + 1) % n;
        (0..n)
            .map(|i| rotation.members[(start + i) % n].clone())
            .collect()
    }

    /// A sender waits on `ticket` for a listener of `hc`, from `now`.
    pub fn wait(&mut self, ticket: String, hc: HcName, waiter: W, now: Instant) {
        self.expire(now);
        self.order.push_back((now, ticket.clone()));
        self.waiting.insert(
            ticket,
            Waiting {
                created: now,
                hc,
                waiter,
            },
        );
    }

    /// A listener presents `ticket` for `hc`: the waiting sender, once. An
    /// unknown, used, expired or other hybrid connection's ticket gives
    /// nothing.
    pub fn take(&mut self, ticket: &str, hc: &HcName, now: Instant) -> Option<W> {
        self.expire(now);
        if self.waiting.get(ticket).is_none_or(|w| &w.hc != hc) {
            return None;
        }
        self.waiting.remove(ticket).map(|w| w.waiter)
    }

    /// Forgets `ticket` (its sender gave up).
    pub fn forget(&mut self, ticket: &str) {
        self.waiting.remove(ticket);
    }

    /// Senders waiting now.
    pub fn waiting(&self) -> usize {
        self.waiting.len()
    }

    fn expire(&mut self, now: Instant) {
        while let Some((created, ticket)) = self.order.front() {
            if now.saturating_duration_since(*created) < RENDEZVOUS_TTL {
                break;
            }
            if self
                .waiting
                .get(ticket)
                .is_some_and(|w| w.created == *created)
            {
                self.waiting.remove(ticket);
            }
            self.order.pop_front();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hc(name: &str) -> HcName {
        name.parse().unwrap()
    }

    #[test]
    fn senders_are_spread_round_robin_and_a_full_hybrid_connection_refuses() {
        let mut l: Listeners<&str, ()> = Listeners::new(3);
        let payroll = hc("payroll");
        let a = l.add(&payroll, "a").unwrap();
        l.add(&payroll, "b").unwrap();
        l.add(&payroll, "c").unwrap();
        assert_eq!(l.add(&payroll, "d"), Err(TooManyListeners(3)));
        l.add(&hc("other"), "x").unwrap();
        let firsts: Vec<&str> = (0..6).map(|_| l.rotation(&payroll)[0]).collect();
        assert_eq!(firsts, ["a", "b", "c", "a", "b", "c"]);
        assert_eq!(l.rotation(&payroll), ["a", "b", "c"]);
        l.remove(&payroll, a);
        assert_eq!(l.count(&payroll), 2);
        assert!(l.rotation(&hc("nobody")).is_empty());
    }

    #[test]
    fn a_ticket_is_good_once_for_its_hybrid_connection_and_only_for_thirty_seconds() {
        let mut l: Listeners<(), u32> = Listeners::new(25);
        let t0 = Instant::now();
        let payroll = hc("payroll");
        l.wait("t1".into(), payroll.clone(), 1, t0);
        l.wait("t2".into(), payroll.clone(), 2, t0);
        assert_eq!(l.take("t1", &hc("other"), t0), None);
        assert_eq!(l.take("t1", &payroll, t0), Some(1));
        assert_eq!(l.take("t1", &payroll, t0), None, "used");
        assert_eq!(l.take("t2", &payroll, t0 + RENDEZVOUS_TTL), None, "expired");
        assert_eq!(l.waiting(), 0);
        l.wait("t3".into(), payroll.clone(), 3, t0);
        l.forget("t3");
        assert_eq!(l.take("t3", &payroll, t0), None);
    }
}
