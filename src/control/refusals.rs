//! How many refused control calls reach the audit log.
//!
//! A refusal is audited (who tried what), but a caller who may not act must not be able to
//! fill the disk through the log by being refused over and over. So refusal rows are
//! rationed: at most [`ROWS_PER_REFUSER_PER_SEC`] a second for one refuser (the operator's
//! actor for a permission refusal, the peer's address for a call without a valid
//! credential) and [`ROWS_PER_SEC`] a second for all refusers together. A refusal past
//! either is only counted, by the limit it hit
//! (`aegis_audit_refusals_unrecorded_total{reason}`): the count of refused calls stays
//! exact, only the rows are rationed.
//!
//! The per-refuser windows sit in a map of at most [`MAX_REFUSERS`] entries, so the map
//! cannot grow with the number of addresses an attacker owns: when it is full, windows of
//! past seconds are swept out (at most once a second), and refusers that still find no
//! room share one overflow window. IPv6 peers are keyed by their /64 (what one host is
//! usually given); a Unix socket or an unknown peer is one key.
//!
//! Answered Checks are never rationed this way: every Check answered keeps its row (the
//! product's promise); what bounds them is the size of each row
//! ([`crate::audit::MAX_FIELD_BYTES`]) and the decoding limit on a CheckRequest.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv6Addr};
use std::sync::Mutex;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering::Relaxed};

/// Refusal rows a second for one refuser (one actor, one peer address).
pub const ROWS_PER_REFUSER_PER_SEC: u32 = 5;
/// Refusal rows a second, every refuser together.
pub const ROWS_PER_SEC: u64 = 20;
/// Refusers with a window of their own; the rest share one.
pub const MAX_REFUSERS: usize = 4096;

/// Who was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refuser {
    /// An authenticated operator (`role:name`) whose role or tenant does not allow the call.
    Actor(String),
    /// A caller without a valid credential, by its address (`None`: a Unix socket or an
    /// address the transport does not know).
    Peer(Option<IpAddr>),
}

/// Why a refusal was counted and not recorded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unrecorded {
    /// Its actor had its rows for this second.
    RatePerActor,
    /// Its peer had its rows for this second.
    RatePerPeer,
    /// Every refuser together had their rows for this second.
    RateGlobal,
}

/// Rations refusal rows (see the module docs).
#[derive(Debug, Default)]
pub struct RefusalLimiter {
    /// The global window: its second and the rows admitted in it.
    second: AtomicI64,
    used: AtomicU64,
    refusers: Mutex<Windows>,
    /// Refusals not recorded, indexed as [`Unrecorded::ALL`].
    unrecorded: [AtomicU64; 3],
}

/// One window per refuser.
#[derive(Debug, Default)]
struct Windows {
    /// (second, rows admitted in it) per refuser.
    by_key: HashMap<Key, (i64, u32)>,
    /// The second of the last sweep of stale windows.
    swept: i64,
}

/// A refuser as the map keys it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum Key {
    Actor(String),
    Peer(Option<IpAddr>),
    /// Every refuser that found the map full.
    Overflow,
}

// === impl Refuser ===

impl Refuser {
    fn key(&self) -> Key {
        match self {
            Refuser::Actor(a) => Key::Actor(a.clone()),
            Refuser::Peer(ip) => Key::Peer(ip.map(host_of)),
        }
    }

    fn over_own_rate(&self) -> Unrecorded {
        match self {
            Refuser::Actor(_) => Unrecorded::RatePerActor,
            Refuser::Peer(_) => Unrecorded::RatePerPeer,
        }
    }
}

/// The address that stands for one host: IPv4 as it is (an IPv4-mapped IPv6 address as
/// its IPv4), IPv6 cut to its /64.
fn host_of(ip: IpAddr) -> IpAddr {
    match ip.to_canonical() {
        IpAddr::V6(v6) => IpAddr::V6(Ipv6Addr::from(u128::from(v6) & !u128::from(u64::MAX))),
        v4 => v4,
    }
}

// === impl Unrecorded ===

impl Unrecorded {
    /// Every kind, in the order the refusal counters are kept.
    pub const ALL: [Unrecorded; 3] = [
        Unrecorded::RatePerActor,
        Unrecorded::RatePerPeer,
        Unrecorded::RateGlobal,
    ];

    /// The `reason` label of the metric.
    pub fn as_str(self) -> &'static str {
        match self {
            Unrecorded::RatePerActor => "rate_per_actor",
            Unrecorded::RatePerPeer => "rate_per_peer",
            Unrecorded::RateGlobal => "rate_global",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

// === impl RefusalLimiter ===

impl RefusalLimiter {
    /// Whether a refusal of `who` at `now` (Unix seconds) gets its row; if not, it is
    /// counted under the limit it hit.
    pub fn admit(&self, who: &Refuser, now: i64) -> Result<(), Unrecorded> {
        let verdict = if !self.admit_refuser(who, now) {
            Err(who.over_own_rate())
        } else if !self.admit_global(now) {
            Err(Unrecorded::RateGlobal)
        } else {
            Ok(())
        };
        if let Err(why) = verdict
            && let Some(n) = self.unrecorded.get(why.index())
        {
            n.fetch_add(1, Relaxed);
        }
        verdict
    }

    /// (reason label, refusals not recorded) for every reason.
    pub fn unrecorded(&self) -> Vec<(&'static str, u64)> {
        Unrecorded::ALL
            .iter()
            .zip(&self.unrecorded)
            .map(|(u, n)| (u.as_str(), n.load(Relaxed)))
            .collect()
    }

    /// Refusers with a window now (at most [`MAX_REFUSERS`] + the overflow window).
    pub fn refusers(&self) -> usize {
        self.windows().by_key.len()
    }

    fn windows(&self) -> std::sync::MutexGuard<'_, Windows> {
        // A panic elsewhere while holding the lock leaves plain counters: still usable.
        self.refusers.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn admit_refuser(&self, who: &Refuser, now: i64) -> bool {
        let mut w = self.windows();
        let mut key = who.key();
        if !w.by_key.contains_key(&key) && w.by_key.len() >= MAX_REFUSERS {
            if w.swept != now {
                w.swept = now;
                w.by_key.retain(|_, (second, _)| *second == now);
            }
            if w.by_key.len() >= MAX_REFUSERS {
                key = Key::Overflow;
            }
        }
        let window = w.by_key.entry(key).or_insert((now, 0));
        if window.0 != now {
            *window = (now, 0);
        }
        if window.1 < ROWS_PER_REFUSER_PER_SEC {
            window.1 += 1;
            true
        } else {
            false
        }
    }

    fn admit_global(&self, now: i64) -> bool {
        if self.second.swap(now, Relaxed) != now {
            self.used.store(0, Relaxed);
        }
        self.used.fetch_add(1, Relaxed) < ROWS_PER_SEC
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peer(s: &str) -> Refuser {
        Refuser::Peer(Some(s.parse().expect("ip")))
    }

    fn unrecorded(l: &RefusalLimiter, why: Unrecorded) -> u64 {
        l.unrecorded()
            .into_iter()
            .find(|(k, _)| *k == why.as_str())
            .map_or(0, |(_, n)| n)
    }

    #[test]
    fn one_refuser_gets_its_rate_a_second_and_the_rest_is_counted() {
        let l = RefusalLimiter::default();
        let alice = Refuser::Actor("viewer:alice".into());
        let admitted = (0..50).filter(|_| l.admit(&alice, 100).is_ok()).count();
        assert_eq!(admitted, ROWS_PER_REFUSER_PER_SEC as usize);
        assert_eq!(unrecorded(&l, Unrecorded::RatePerActor), 45);
        // Another refuser is not starved by alice; the next second alice has rows again.
        assert!(l.admit(&peer("10.0.0.1"), 100).is_ok());
        assert!(l.admit(&alice, 101).is_ok());
    }

    #[test]
    fn many_refusers_share_the_global_rate() {
        let l = RefusalLimiter::default();
        let admitted = (0..100)
            .filter(|i| l.admit(&peer(&format!("10.0.0.{i}")), 7).is_ok())
            .count();
        assert_eq!(admitted, ROWS_PER_SEC as usize);
        assert_eq!(unrecorded(&l, Unrecorded::RateGlobal), 80);
        assert_eq!(unrecorded(&l, Unrecorded::RatePerPeer), 0);
    }

    #[test]
    fn an_ipv6_host_is_one_peer_whatever_address_of_its_64_it_uses() {
        let l = RefusalLimiter::default();
        let admitted = (0..50)
            .filter(|i| l.admit(&peer(&format!("2001:db8:1:2::{i:x}")), 7).is_ok())
            .count();
        assert_eq!(admitted, ROWS_PER_REFUSER_PER_SEC as usize);
        assert_eq!(l.refusers(), 1);
        // An IPv4-mapped address is its IPv4 peer.
        let v4 = RefusalLimiter::default();
        for _ in 0..ROWS_PER_REFUSER_PER_SEC {
            assert!(v4.admit(&peer("192.0.2.1"), 7).is_ok());
        }
        assert_eq!(
            v4.admit(&peer("::ffff:192.0.2.1"), 7),
            Err(Unrecorded::RatePerPeer)
        );
    }

    #[test]
    fn the_map_stays_bounded_however_many_peers_and_stale_windows_are_swept() {
        let l = RefusalLimiter::default();
        // Twice the cap of distinct peers in one second: the ones past the cap share one
        // overflow window (its own rate), the map never holds more than the cap + 1.
        let admitted = (0..2 * MAX_REFUSERS as u32)
            .filter(|i| {
                let ip = IpAddr::V4(std::net::Ipv4Addr::from(0x0a00_0000 + i));
                l.admit(&Refuser::Peer(Some(ip)), 1).is_ok()
            })
            .count();
        assert_eq!(admitted, ROWS_PER_SEC as usize);
        assert_eq!(l.refusers(), MAX_REFUSERS + 1);
        // The next second, a new peer finds the stale windows swept and a window of its own.
        assert!(l.admit(&peer("192.0.2.9"), 2).is_ok());
        assert_eq!(l.refusers(), 1);
    }

    #[test]
    fn unknown_peers_are_one_key() {
        let l = RefusalLimiter::default();
        let admitted = (0..20)
            .filter(|_| l.admit(&Refuser::Peer(None), 3).is_ok())
            .count();
        assert_eq!(admitted, ROWS_PER_REFUSER_PER_SEC as usize);
    }
}
