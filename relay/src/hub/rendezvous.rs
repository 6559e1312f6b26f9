//! Where the two TCP connections of a pipe meet: the first to present a
//! ticket waits here until the second hands it its connection. Which
//! tickets are valid is decided by [`super::state::HubState::claim`]; this
//! only moves sockets.

use std::collections::HashMap;

use proto::control::Ticket;
use tokio::net::TcpStream;
use tokio::sync::oneshot;

/// First ends of pipes waiting for their second, by ticket.
#[derive(Debug, Default)]
pub struct Rendezvous {
    waiting: HashMap<Ticket, oneshot::Sender<TcpStream>>,
}

impl Rendezvous {
    /// The first end of `ticket` arrived: the receiver delivers the second
    /// end's connection.
    pub fn wait(&mut self, ticket: Ticket) -> oneshot::Receiver<TcpStream> {
        let (tx, rx) = oneshot::channel();
        self.waiting.insert(ticket, tx);
        rx
    }

    /// The second end of `ticket` arrived with `conn`. If the first gave up
    /// in the meantime, `conn` is dropped (closed).
    pub fn hand(&mut self, ticket: &Ticket, conn: TcpStream) {
        if let Some(tx) = self.waiting.remove(ticket) {
            let _ = tx.send(conn);
        }
    }

    /// The first end of `ticket` stopped waiting.
    pub fn abandon(&mut self, ticket: &Ticket) {
        self.waiting.remove(ticket);
    }
}
