//! Counting connections that have not yet proved anything.
//!
//! Anyone may connect to the relay port. A connection is *unauthenticated*
//! from `accept` until it presents something that verifies: a control
//! channel until its first successful `Attach`, a pipe until its ticket is
//! found. [`PreAuthGate`] caps how many such connections exist at once,
//! relay-wide and per source address, so that idle or slow strangers cannot
//! hold the relay's memory and file descriptors. Authenticated connections
//! are not counted here.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};

use crate::metrics::RefusedReason;

/// The caps of [`PreAuthGate`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PreAuthLimits {
    /// Unauthenticated connections relay-wide.
    pub max_total: usize,
    /// Unauthenticated connections from one source address.
    pub max_per_ip: usize,
}

/// Why a connection was closed at once.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum PreAuthRefused {
    /// The relay-wide cap.
    #[error("{0} unauthenticated connections are open, the relay's limit (--max-unauthenticated)")]
    Total(usize),
    /// The per-address cap.
    #[error(
        "{0} unauthenticated connections are open from this address, the limit (--max-unauthenticated-per-ip)"
    )]
    PerIp(usize),
}

impl PreAuthRefused {
    /// The reason the metrics count it under.
    pub fn reason(self) -> RefusedReason {
        match self {
            PreAuthRefused::Total(_) => RefusedReason::unauthenticated_cap,
            PreAuthRefused::PerIp(_) => RefusedReason::unauthenticated_per_ip_cap,
        }
    }
}

#[derive(Debug, Default)]
struct Counts {
    total: usize,
    per_ip: HashMap<IpAddr, usize>,
}

/// Counts unauthenticated connections against [`PreAuthLimits`]. Cheap to
/// clone.
#[derive(Debug, Clone)]
pub struct PreAuthGate {
    limits: PreAuthLimits,
    counts: Arc<Mutex<Counts>>,
}

/// One admitted unauthenticated connection; counted until dropped (when the
/// connection authenticates or ends).
#[derive(Debug)]
pub struct PreAuthSlot {
    gate: PreAuthGate,
    ip: IpAddr,
}

impl PreAuthGate {
    /// A gate with these caps.
    pub fn new(limits: PreAuthLimits) -> PreAuthGate {
        PreAuthGate {
            limits,
            counts: Arc::default(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Counts> {
        // Each critical section is a few integer updates that cannot panic
        // half-way, so a poisoned lock still holds consistent counts.
        self.counts.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Admits a new connection from `ip`, or says which cap it would exceed.
    pub fn admit(&self, ip: IpAddr) -> Result<PreAuthSlot, PreAuthRefused> {
        let mut counts = self.lock();
        if counts.total >= self.limits.max_total {
            return Err(PreAuthRefused::Total(counts.total));
        }
        let from_ip = counts.per_ip.get(&ip).copied().unwrap_or(0);
        if from_ip >= self.limits.max_per_ip {
            return Err(PreAuthRefused::PerIp(from_ip));
        }
        counts.total += 1;
        counts.per_ip.insert(ip, from_ip + 1);
        Ok(PreAuthSlot {
            gate: self.clone(),
            ip,
        })
    }

    /// Unauthenticated connections open now.
    pub fn open(&self) -> usize {
        self.lock().total
    }
}

impl Drop for PreAuthSlot {
    fn drop(&mut self) {
        let mut counts = self.gate.lock();
        counts.total = counts.total.saturating_sub(1);
        if let Some(n) = counts.per_ip.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                counts.per_ip.remove(&self.ip);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn caps_hold_per_address_and_overall_and_slots_give_back() {
        let gate = PreAuthGate::new(PreAuthLimits {
            max_total: 3,
            max_per_ip: 2,
        });
        let a: IpAddr = "192.0.2.1".parse().unwrap();
        let b: IpAddr = "2001:db8::1".parse().unwrap();
        let a1 = gate.admit(a).unwrap();
        let _a2 = gate.admit(a).unwrap();
        assert_eq!(gate.admit(a).unwrap_err(), PreAuthRefused::PerIp(2));
        let _b1 = gate.admit(b).unwrap();
        assert_eq!(gate.admit(b).unwrap_err(), PreAuthRefused::Total(3));
        assert_eq!(gate.open(), 3);
        drop(a1);
        assert_eq!(gate.open(), 2);
        let _a3 = gate.admit(a).unwrap();
        assert!(gate.admit(b).is_err());
    }

    #[test]
    fn an_address_with_nothing_open_is_forgotten() {
        let gate = PreAuthGate::new(PreAuthLimits {
            max_total: 10,
            max_per_ip: 10,
        });
        let slots: Vec<_> = (0..5u8)
            .map(|i| gate.admit(IpAddr::from([10, 0, 0, i])).unwrap())
            .collect();
        assert_eq!(gate.lock().per_ip.len(), 5);
        drop(slots);
        assert!(gate.lock().per_ip.is_empty());
        assert_eq!(gate.open(), 0);
    }
}
