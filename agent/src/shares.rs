//! Each tenant's share of the agent's sockets.
//!
//! Anyone holding one hybrid connection's send key can make the relay offer
//! pipes to this agent and open streams on them, and the agent spends a
//! socket on each. So pipe set-ups and dials in progress are counted per
//! sender (its data identity) and per hybrid connection, each under a cap:
//! a tenant that floods exhausts its own share, and the agent's other
//! hybrid connections go on. A sender's pipe is charged to every hybrid
//! connection it was granted, since a pipe serves all of them; a sender
//! announces its identity itself, so the per-hybrid-connection cap is the
//! one a tenant cannot get around with many identities.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use proto::control::Fingerprint;
use proto::name::HcName;
use tokio::sync::Notify;

/// The caps of each kind of account.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ShareCaps {
    /// Pipe set-ups in progress from one sender.
    pub setups_per_sender: usize,
    /// Pipe set-ups in progress charged to one hybrid connection.
    pub setups_per_hc: usize,
    /// Dials in progress for one sender.
    pub dials_per_sender: usize,
    /// Dials in progress for one hybrid connection.
    pub dials_per_hc: usize,
}

impl Default for ShareCaps {
    /// A pipe set-up is a TLS handshake and a few round trips, and a sender
    /// needs one per agent, so a handful at once is plenty; a dial is one
    /// connection to a target, so more may be in progress at once (a burst
    /// of app connections), but not so many that one tenant holds a good
    /// part of the default 1024 open files.
    fn default() -> Self {
        ShareCaps {
            setups_per_sender: 8,
            setups_per_hc: 32,
            dials_per_sender: 64,
            dials_per_hc: 128,
        }
    }
}

/// What a share is counted under.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Account {
    /// Pipe set-ups from this sender.
    SetupsBy(Fingerprint),
    /// Pipe set-ups charged to this hybrid connection.
    SetupsFor(HcName),
    /// Dials for this sender.
    DialsBy(Fingerprint),
    /// Dials for this hybrid connection.
    DialsFor(HcName),
}

impl Account {
    /// The hybrid connection (or `-` for a sender) for metrics.
    pub fn label(&self) -> &str {
        match self {
            Account::SetupsFor(hc) | Account::DialsFor(hc) => hc.as_str(),
            Account::SetupsBy(_) | Account::DialsBy(_) => "-",
        }
    }

    /// The cap of this account.
    pub fn cap(&self, caps: &ShareCaps) -> usize {
        match self {
            Account::SetupsBy(_) => caps.setups_per_sender,
            Account::SetupsFor(_) => caps.setups_per_hc,
            Account::DialsBy(_) => caps.dials_per_sender,
            Account::DialsFor(_) => caps.dials_per_hc,
        }
    }
}

/// The counts of every account in use; an account at zero is forgotten, so
/// identities made up by a sender cost nothing once their work ends.
#[derive(Debug, Default)]
pub struct Shares {
    caps: ShareCaps,
    counts: Mutex<HashMap<Account, usize>>,
    released: Notify,
}

/// Work counted against some accounts until dropped.
#[derive(Debug)]
pub struct Share {
    shares: Arc<Shares>,
    accounts: Vec<Account>,
}

impl Drop for Share {
    fn drop(&mut self) {
        let mut counts = self.shares.lock();
        for a in &self.accounts {
            if let Some(n) = counts.get_mut(a) {
                *n -= 1;
                if *n == 0 {
                    counts.remove(a);
                }
            }
        }
        drop(counts);
        self.shares.released.notify_waiters();
    }
}

impl Shares {
    /// No work counted yet, under `caps`.
    pub fn new(caps: ShareCaps) -> Shares {
        Shares {
            caps,
            ..Shares::default()
        }
    }

    /// The caps in force.
    pub fn caps(&self) -> &ShareCaps {
        &self.caps
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Account, usize>> {
        self.counts.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Counts one unit against every account in `accounts` if none is at
    /// its cap; otherwise the first account that is.
    pub fn try_take(self: &Arc<Self>, accounts: Vec<Account>) -> Result<Share, Account> {
        let mut counts = self.lock();
        if let Some(full) = accounts
            .iter()
            .find(|a| counts.get(a).copied().unwrap_or(0) >= a.cap(&self.caps))
        {
            return Err(full.clone());
        }
        for a in &accounts {
            *counts.entry(a.clone()).or_default() += 1;
        }
        Ok(Share {
            shares: self.clone(),
            accounts,
        })
    }

    /// Like [`Shares::try_take`], waiting up to `patience` for room.
    pub async fn take(
        self: &Arc<Self>,
        accounts: Vec<Account>,
        patience: Duration,
    ) -> Result<Share, Account> {
        let deadline = tokio::time::Instant::now() + patience;
        loop {
            let released = self.released.notified();
            match self.try_take(accounts.clone()) {
                Ok(share) => return Ok(share),
                Err(full) => {
                    if tokio::time::timeout_at(deadline, released).await.is_err() {
                        return Err(full);
                    }
                }
            }
        }
    }

    /// Units counted against `account` now.
    pub fn in_use(&self, account: &Account) -> usize {
        self.lock().get(account).copied().unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hc(s: &str) -> HcName {
        s.parse().unwrap()
    }

    /// Small caps, so that the tests show which one stops what.
    fn small() -> Arc<Shares> {
        Arc::new(Shares::new(ShareCaps {
            setups_per_sender: 2,
            setups_per_hc: 5,
            dials_per_sender: 3,
            dials_per_hc: 4,
        }))
    }

    #[test]
    fn one_tenant_at_its_cap_leaves_the_others_their_share() {
        let shares = small();
        let mut held = Vec::new();
        // Many made-up identities, all on one hybrid connection: the
        // hybrid connection's cap stops them.
        for i in 0..5 {
            let who = Fingerprint([i as u8; 32]);
            held.push(
                shares
                    .try_take(vec![Account::SetupsBy(who), Account::SetupsFor(hc("a"))])
                    .unwrap(),
            );
        }
        let next = shares.try_take(vec![
            Account::SetupsBy(Fingerprint([0xee; 32])),
            Account::SetupsFor(hc("a")),
        ]);
        assert_eq!(next.unwrap_err(), Account::SetupsFor(hc("a")));
        // Another hybrid connection is untouched.
        assert!(
            shares
                .try_take(vec![
                    Account::SetupsBy(Fingerprint([0xee; 32])),
                    Account::SetupsFor(hc("b"))
                ])
                .is_ok()
        );
        // A refused take counted nothing; releasing frees the account and
        // forgets it at zero.
        assert_eq!(
            shares.in_use(&Account::SetupsBy(Fingerprint([0xee; 32]))),
            0
        );
        held.clear();
        assert_eq!(shares.in_use(&Account::SetupsFor(hc("a"))), 0);
        assert!(shares.lock().is_empty());
    }

    #[test]
    fn one_sender_cannot_take_a_whole_hybrid_connection() {
        let shares = small();
        let who = Fingerprint([1; 32]);
        let held: Vec<Share> = (0..2)
            .map(|_| {
                shares
                    .try_take(vec![Account::SetupsBy(who), Account::SetupsFor(hc("a"))])
                    .unwrap()
            })
            .collect();
        assert_eq!(
            shares
                .try_take(vec![Account::SetupsBy(who), Account::SetupsFor(hc("a"))])
                .unwrap_err(),
            Account::SetupsBy(who)
        );
        assert!(
            shares
                .try_take(vec![
                    Account::SetupsBy(Fingerprint([2; 32])),
                    Account::SetupsFor(hc("a"))
                ])
                .is_ok()
        );
        drop(held);
    }

    #[test]
    fn the_default_caps_are_the_documented_ones() {
        let caps = ShareCaps::default();
        assert_eq!(
            (
                caps.setups_per_sender,
                caps.setups_per_hc,
                caps.dials_per_sender,
                caps.dials_per_hc
            ),
            (8, 32, 64, 128)
        );
    }

    #[tokio::test]
    async fn a_waiting_dial_gets_the_next_free_place() {
        let shares = small();
        let account = || vec![Account::DialsFor(hc("a"))];
        let held: Vec<Share> = (0..4)
            .map(|_| shares.try_take(account()).unwrap())
            .collect();
        let waiter = {
            let shares = shares.clone();
            tokio::spawn(async move { shares.take(account(), Duration::from_secs(5)).await })
        };
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!waiter.is_finished());
        drop(held);
        assert!(waiter.await.unwrap().is_ok());
        // With no room, the wait ends at its patience.
        let _full: Vec<Share> = (0..4)
            .map(|_| shares.try_take(account()).unwrap())
            .collect();
        assert!(
            shares
                .take(account(), Duration::from_millis(30))
                .await
                .is_err()
        );
    }
}
