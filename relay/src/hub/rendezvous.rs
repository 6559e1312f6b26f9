//! Where the two TCP connections of a pipe meet: the first to present a
//! ticket waits here until the second hands it its connection. Which
//! tickets are valid is decided by [`super::state::HubState::claim`]; this
//! only moves sockets (`T`: the second end's connection and what goes with
//! it).

use std::collections::HashMap;

use proto::control::Ticket;
use tokio::sync::oneshot;

/// First ends of pipes waiting for their second, by ticket.
#[derive(Debug)]
pub struct Rendezvous<T> {
    waiting: HashMap<Ticket, oneshot::Sender<T>>,
}

impl<T> Default for Rendezvous<T> {
    fn default() -> Self {
        Rendezvous {
            waiting: HashMap::new(),
        }
    }
}

impl<T> Rendezvous<T> {
    /// The first end of `ticket` arrived: the receiver delivers the second
    /// end's connection.
    pub fn wait(&mut self, ticket: Ticket) -> oneshot::Receiver<T> {
        let (tx, rx) = oneshot::channel();
        self.waiting.insert(ticket, tx);
        rx
    }

    /// The second end of `ticket` arrived with `conn`. If the first gave up
    /// in the meantime, `conn` comes back, for the caller to drop (close).
    #[must_use]
    pub fn hand(&mut self, ticket: &Ticket, conn: T) -> Option<T> {
        match self.waiting.remove(ticket) {
            Some(tx) => tx.send(conn).err(),
            None => Some(conn),
        }
    }

    /// The first end of `ticket` stopped waiting.
    pub fn abandon(&mut self, ticket: &Ticket) {
        self.waiting.remove(ticket);
    }
}
