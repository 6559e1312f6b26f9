//! The HTTP requests waiting for their listener's response, without I/O.
//!
//! Each request sent to a listener has a random id (in its `request`
//! message) and a random ticket (in the `address` of that message). Its
//! waiter is handed out once: to the first `response` with its id on the
//! control channel of the listener it was sent to, or to the first
//! rendezvous opened with its ticket, whichever comes first. Generic over
//! the waiter (`W`) so that the decisions are tested with plain values.

use std::collections::HashMap;

use proto::name::HcName;

use super::listeners::ListenerId;

#[derive(Debug)]
struct Exchange<W> {
    hc: HcName,
    listener: ListenerId,
    ticket: String,
    /// `None` once handed out (or its listener went away).
    waiter: Option<W>,
}

/// Why a listener's response found no request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Unmatched {
    /// No request has this id (never sent, or already finished).
    #[error("no request has this id")]
    Unknown,
    /// The request was sent to another listener.
    #[error("the request was sent to another listener")]
    OtherListener,
    /// The request already has its response.
    #[error("the request was answered already")]
    Answered,
}

/// The requests waiting for a response, by id and by ticket.
#[derive(Debug)]
pub struct Exchanges<W> {
    by_id: HashMap<String, Exchange<W>>,
    by_ticket: HashMap<String, String>,
}

impl<W> Default for Exchanges<W> {
    fn default() -> Self {
        Exchanges {
            by_id: HashMap::new(),
            by_ticket: HashMap::new(),
        }
    }
}

impl<W> Exchanges<W> {
    /// A request `id` of `hc`, with its `ticket`, was sent to `listener`.
    pub fn open(
        &mut self,
        id: String,
        ticket: String,
        hc: HcName,
        listener: ListenerId,
        waiter: W,
    ) {
        self.by_ticket.insert(ticket.clone(), id.clone());
        self.by_id.insert(
            id,
            Exchange {
                hc,
                listener,
                ticket,
                waiter: Some(waiter),
            },
        );
    }

    /// `listener` sent a `response` for `id` on its control channel: the
    /// waiter, once, if the request was sent to that listener.
    pub fn answered(&mut self, listener: ListenerId, id: &str) -> Result<W, Unmatched> {
        let exchange = self.by_id.get_mut(id).ok_or(Unmatched::Unknown)?;
        if exchange.listener != listener {
            return Err(Unmatched::OtherListener);
        }
        exchange.waiter.take().ok_or(Unmatched::Answered)
    }

    /// A listener opened a rendezvous with `ticket` for `hc`: the waiter,
    /// once. An unknown, used or other hybrid connection's ticket gives
    /// nothing.
    pub fn rendezvous(&mut self, ticket: &str, hc: &HcName) -> Option<W> {
        let id = self.by_ticket.get(ticket)?;
        let exchange = self.by_id.get_mut(id)?;
        if &exchange.hc != hc {
            return None;
        }
        self.by_ticket.remove(ticket);
        exchange.waiter.take()
    }

    /// The request `id` is over (answered, failed or given up).
    pub fn close(&mut self, id: &str) {
        if let Some(exchange) = self.by_id.remove(id) {
            self.by_ticket.remove(&exchange.ticket);
        }
    }

    /// `listener`'s control channel ended: its requests' waiters are
    /// dropped, which tells each request that no response will come.
    pub fn listener_gone(&mut self, listener: ListenerId) {
        for exchange in self.by_id.values_mut() {
            if exchange.listener == listener {
                exchange.waiter = None;
            }
        }
    }

    /// Requests of `hc` open now.
    pub fn open_for(&self, hc: &HcName) -> usize {
        self.by_id.values().filter(|e| &e.hc == hc).count()
    }

    /// Requests open now.
    pub fn len(&self) -> usize {
        self.by_id.len()
    }

    /// Whether no request is open.
    pub fn is_empty(&self) -> bool {
        self.by_id.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hc(name: &str) -> HcName {
        name.parse().unwrap()
    }

    #[test]
    fn requests_are_counted_per_hybrid_connection_until_they_close() {
        let mut x: Exchanges<u32> = Exchanges::default();
        x.open("i1".into(), "t1".into(), hc("payroll"), 7, 1);
        x.open("i2".into(), "t2".into(), hc("payroll"), 7, 2);
        x.open("i3".into(), "t3".into(), hc("billing"), 8, 3);
        assert_eq!(x.open_for(&hc("payroll")), 2);
        x.close("i1");
        assert_eq!(x.open_for(&hc("payroll")), 1);
        assert_eq!(x.open_for(&hc("billing")), 1);
    }

    #[test]
    fn a_response_is_taken_once_and_only_from_the_listener_it_was_sent_to() {
        let mut x: Exchanges<u32> = Exchanges::default();
        x.open("i1".into(), "t1".into(), hc("payroll"), 7, 1);
        assert_eq!(x.answered(8, "i1"), Err(Unmatched::OtherListener));
        assert_eq!(x.answered(7, "nope"), Err(Unmatched::Unknown));
        assert_eq!(x.answered(7, "i1"), Ok(1));
        assert_eq!(x.answered(7, "i1"), Err(Unmatched::Answered));
        // The ticket is spent with it.
        assert_eq!(x.rendezvous("t1", &hc("payroll")), None);
        x.close("i1");
        assert!(x.is_empty());
        assert_eq!(x.answered(7, "i1"), Err(Unmatched::Unknown));
    }

    #[test]
    fn a_ticket_opens_once_for_its_hybrid_connection_and_a_gone_listener_drops_its_waiters() {
        let mut x: Exchanges<u32> = Exchanges::default();
        x.open("i1".into(), "t1".into(), hc("payroll"), 7, 1);
        x.open("i2".into(), "t2".into(), hc("payroll"), 8, 2);
        assert_eq!(x.rendezvous("t1", &hc("other")), None);
        assert_eq!(x.rendezvous("t1", &hc("payroll")), Some(1));
        assert_eq!(x.rendezvous("t1", &hc("payroll")), None);
        x.listener_gone(8);
        assert_eq!(x.rendezvous("t2", &hc("payroll")), None);
        assert_eq!(x.len(), 2);
        x.close("i1");
        x.close("i2");
        assert!(x.is_empty());
    }
}
