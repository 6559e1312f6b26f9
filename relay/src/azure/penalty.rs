//! Refusals answered later and later to an address that keeps earning
//! them, without I/O: the relay's defence against clients that reconnect
//! at once, forever, when they are refused.
//!
//! Azure Relay's Node listener (`hyco-ws`) reconnects its control channel
//! the moment the previous attempt fails, from both its error and its close
//! handler, so a listener whose key was regenerated opens two new
//! connections per refusal: thousands of TLS handshakes a second against
//! the relay, with no end. The relay cannot change the client, but it
//! decides when to answer. A request that proved nothing (no token
//! verified, no ticket found) and is refused with 401 or 403 is answered
//! after a wait that doubles with each refusal from the same address: the
//! first at once, then [`FIRST_DELAY`], up to [`MAX_DELAY`]. While it
//! waits, the connection holds one of the address's unauthenticated slots
//! (`relay serve --max-unauthenticated-per-ip`), so a storming address
//! costs the relay at most that many handshakes per [`MAX_DELAY`]; further
//! connections are closed at accept, before TLS, which costs next to
//! nothing. Requests that succeed are never delayed, so an honest client
//! behind the same address loses no time once its token is right.
//!
//! An address is forgotten [`FORGET_AFTER`] after its last refusal. IPv6
//! addresses count by their /64, the block one host usually holds.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv6Addr};
use std::time::{Duration, Instant};

/// The wait before answering an address's second refusal.
pub const FIRST_DELAY: Duration = Duration::from_millis(250);
/// The longest wait.
pub const MAX_DELAY: Duration = Duration::from_secs(8);
/// An address refused this long ago starts afresh.
pub const FORGET_AFTER: Duration = Duration::from_secs(60);
/// Addresses remembered at once; past that, refusals from addresses not
/// yet remembered are answered at once (the table cannot grow without
/// bound under a spoofed-source or botnet flood).
pub const MAX_TRACKED: usize = 65_536;

#[derive(Debug, Clone, Copy)]
struct Record {
    refusals: u32,
    last: Instant,
}

/// Recent refusals per source address.
#[derive(Debug, Default)]
pub struct Penalties {
    by_source: HashMap<IpAddr, Record>,
}

/// The key an address is counted under: itself, or its /64.
fn source(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let prefix = u128::from(v6) & !((1u128 << 64) - 1);
                IpAddr::V6(Ipv6Addr::from(prefix))
            }
        },
    }
}

/// The wait before answering the `n`th refusal in a row (from 1).
fn delay_for(n: u32) -> Duration {
    match n {
        0 | 1 => Duration::ZERO,
        n => {
            let doublings = (n - 2).min(16);
            FIRST_DELAY.saturating_mul(1 << doublings).min(MAX_DELAY)
        }
    }
}

impl Penalties {
    /// Nobody penalised.
    pub fn new() -> Penalties {
        Penalties::default()
    }

    /// Records that a request from `ip` was refused at `now`; returns how
    /// long to wait before answering it.
    pub fn refused(&mut self, ip: IpAddr, now: Instant) -> Duration {
        let key = source(ip);
        if !self.by_source.contains_key(&key) && self.by_source.len() >= MAX_TRACKED {
            self.forget_old(now);
            if self.by_source.len() >= MAX_TRACKED {
                return Duration::ZERO;
            }
        }
        let record = self.by_source.entry(key).or_insert(Record {
            refusals: 0,
            last: now,
        });
        if now.saturating_duration_since(record.last) > FORGET_AFTER {
            record.refusals = 0;
        }
        record.refusals = record.refusals.saturating_add(1);
        record.last = now;
        delay_for(record.refusals)
    }

    /// Addresses remembered now.
    pub fn tracked(&self) -> usize {
        self.by_source.len()
    }

    fn forget_old(&mut self, now: Instant) {
        self.by_source
            .retain(|_, r| now.saturating_duration_since(r.last) <= FORGET_AFTER);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn the_wait_doubles_from_the_second_refusal_up_to_the_cap() {
        let mut p = Penalties::new();
        let now = Instant::now();
        let waits: Vec<Duration> = (0..10).map(|_| p.refused(ip("198.18.0.1"), now)).collect();
        let ms: Vec<u128> = waits.iter().map(Duration::as_millis).collect();
        assert_eq!(ms, [0, 250, 500, 1000, 2000, 4000, 8000, 8000, 8000, 8000]);
    }

    #[test]
    fn addresses_are_counted_apart_and_ipv6_by_its_64() {
        let mut p = Penalties::new();
        let now = Instant::now();
        p.refused(ip("198.18.0.1"), now);
        assert!(!p.refused(ip("198.18.0.1"), now).is_zero());
        assert!(p.refused(ip("198.18.0.2"), now).is_zero());
        p.refused(ip("2001:db8:0:1::1"), now);
        assert!(
            !p.refused(ip("2001:db8:0:1::ffff"), now).is_zero(),
            "another address of the same /64 starts afresh"
        );
        assert!(p.refused(ip("2001:db8:0:2::1"), now).is_zero());
        p.refused(ip("::ffff:198.18.0.9"), now);
        assert!(
            !p.refused(ip("198.18.0.9"), now).is_zero(),
            "an IPv4-mapped address is its IPv4 address"
        );
    }

    #[test]
    fn an_address_quiet_for_a_minute_starts_afresh() {
        let mut p = Penalties::new();
        let start = Instant::now();
        for _ in 0..5 {
            p.refused(ip("198.18.0.1"), start);
        }
        let later = start + FORGET_AFTER + Duration::from_secs(1);
        assert!(p.refused(ip("198.18.0.1"), later).is_zero());
    }

    #[test]
    fn the_table_stays_bounded_and_old_entries_make_room() {
        let mut p = Penalties::new();
        let start = Instant::now();
        for i in 0..MAX_TRACKED as u32 {
            p.refused(IpAddr::V4(std::net::Ipv4Addr::from(i)), start);
        }
        assert_eq!(p.tracked(), MAX_TRACKED);
        let newcomer = ip("2001:db8::1");
        p.refused(newcomer, start);
        assert!(
            p.refused(newcomer, start).is_zero(),
            "a full table takes no one new"
        );
        assert_eq!(p.tracked(), MAX_TRACKED);
        let later = start + FORGET_AFTER + Duration::from_secs(1);
        p.refused(newcomer, later);
        assert_eq!(p.tracked(), 1, "the stale entries were dropped");
        assert!(!p.refused(newcomer, later).is_zero());
    }
}
