//! Limits per source address on the client port: connections open at once, and new
//! connections per second (a token bucket), so that one address cannot take every
//! `server.max_connections` slot or flood the node with handshakes. Checked in the accept
//! loop, before a connection costs a TLS handshake or a `hello`.
//!
//! Loopback addresses are exempt by default (`limits.address_limits_exempt_loopback`): on one
//! machine, or behind a proxy on the same host, every client shares one address.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use tokio::time::Instant;

use crate::ratelimit::{Rate, TokenBucket};

/// Why a connection was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AddressRefusal {
    /// `limits.connections_per_address` already open from its address.
    TooMany,
    /// Over `limits.new_connections_per_address_per_second` (and its burst).
    TooFast,
}

impl AddressRefusal {
    /// The `reason` of `confab_connections_rejected_total`.
    pub fn label(self) -> &'static str {
        match self {
            AddressRefusal::TooMany => "connections_per_address",
            AddressRefusal::TooFast => "new_connections_per_address",
        }
    }
}

struct Seen {
    open: u32,
    bucket: TokenBucket,
}

/// The limits and what each address holds now.
pub struct AddressLimits {
    max_open: u32,
    rate: Rate,
    exempt_loopback: bool,
    by_address: Mutex<HashMap<IpAddr, Seen>>,
}

/// A connection's place under its address's limit, given back when dropped.
pub struct AddressSlot {
    limits: Option<(Arc<AddressLimits>, IpAddr)>,
}

impl AddressLimits {
    pub fn new(limits: &crate::settings::Limits) -> Self {
        AddressLimits {
            max_open: u32::try_from(limits.connections_per_address).unwrap_or(u32::MAX),
            rate: Rate::new(
                limits.new_connections_per_address_per_second,
                limits.new_connection_burst_per_address,
            ),
            exempt_loopback: limits.address_limits_exempt_loopback,
            by_address: Mutex::new(HashMap::new()),
        }
    }

    /// Admits a connection from `ip` at `now`, or says which limit it is over. An address from
    /// a PROXY header (`from_header`) is never exempt: a client could claim to be loopback.
    pub fn admit(
        self: &Arc<Self>,
        ip: IpAddr,
        from_header: bool,
        now: Instant,
    ) -> Result<AddressSlot, AddressRefusal> {
        let ip = counted_as(ip);
        if self.exempt_loopback && !from_header && ip.is_loopback() {
            return Ok(AddressSlot { limits: None });
        }
        let mut by_address = self.by_address.lock().unwrap_or_else(|p| p.into_inner());
        let seen = by_address.entry(ip).or_insert_with(|| Seen {
            open: 0,
            bucket: TokenBucket::full(self.rate, now),
        });
        if seen.open >= self.max_open {
            return Err(AddressRefusal::TooMany);
        }
        if !seen.bucket.try_take(self.rate, now) {
            return Err(AddressRefusal::TooFast);
        }
        seen.open += 1;
        Ok(AddressSlot {
            limits: Some((self.clone(), ip)),
        })
    }

    /// Forgets the addresses with nothing open whose bucket has refilled: they are as new.
    /// Run now and then, so the map holds only addresses seen lately.
    pub fn sweep(&self, now: Instant) {
        let mut by_address = self.by_address.lock().unwrap_or_else(|p| p.into_inner());
        by_address.retain(|_, seen| seen.open > 0 || !seen.bucket.is_full(self.rate, now));
    }

    /// Addresses the limiter holds (for tests).
    pub fn addresses(&self) -> usize {
        self.by_address
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .len()
    }

    fn release(&self, ip: IpAddr) {
        let mut by_address = self.by_address.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(seen) = by_address.get_mut(&ip) {
            seen.open = seen.open.saturating_sub(1);
        }
    }
}

/// The address a connection counts under: IPv4 as is (an IPv4-mapped IPv6 address as its IPv4
/// address), IPv6 by its /64, which one host or one customer usually holds whole.
fn counted_as(ip: IpAddr) -> IpAddr {
    match ip.to_canonical() {
        IpAddr::V6(v6) if !v6.is_loopback() => {
            let prefix = u128::from(v6) & !((1u128 << 64) - 1);
            IpAddr::V6(std::net::Ipv6Addr::from(prefix))
        }
        other => other,
    }
}

impl Drop for AddressSlot {
    fn drop(&mut self) {
        if let Some((limits, ip)) = self.limits.take() {
            limits.release(ip);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn limits(max_open: usize, per_second: u32, burst: u32, exempt: bool) -> Arc<AddressLimits> {
        Arc::new(AddressLimits::new(&crate::settings::Limits {
            connections_per_address: max_open,
            new_connections_per_address_per_second: per_second,
            new_connection_burst_per_address: burst,
            address_limits_exempt_loopback: exempt,
            ..Default::default()
        }))
    }

    const A: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(192, 0, 2, 1));
    const B: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(192, 0, 2, 2));

    #[test]
    fn an_address_holds_at_most_its_connections_and_gets_a_place_back_on_close() {
        let l = limits(2, 1000, 1000, true);
        let now = Instant::now();
        let one = l.admit(A, false, now).expect("first");
        let _two = l.admit(A, false, now).expect("second");
        assert_eq!(l.admit(A, false, now).err(), Some(AddressRefusal::TooMany));
        assert!(
            l.admit(B, false, now).is_ok(),
            "another address is not affected"
        );
        drop(one);
        assert!(l.admit(A, false, now).is_ok());
    }

    #[test]
    fn new_connections_are_held_to_the_rate_after_the_burst() {
        let l = limits(100, 10, 3, true);
        let now = Instant::now();
        let slots: Vec<_> = (0..3)
            .map(|_| l.admit(A, false, now).expect("burst"))
            .collect();
        assert_eq!(l.admit(A, false, now).err(), Some(AddressRefusal::TooFast));
        assert!(
            l.admit(A, false, now + Duration::from_millis(100)).is_ok(),
            "one more after 1/10 s"
        );
        drop(slots);
    }

    #[test]
    fn loopback_is_exempt_unless_configured_otherwise() {
        let local = IpAddr::V4(std::net::Ipv4Addr::LOCALHOST);
        let now = Instant::now();
        let exempt = limits(1, 1, 1, true);
        let _held: Vec<_> = (0..5)
            .map(|_| exempt.admit(local, false, now).expect("exempt"))
            .collect();
        let counted = limits(1, 1, 1, false);
        let _one = counted.admit(local, false, now).expect("first");
        assert!(counted.admit(local, false, now).is_err());
    }

    #[test]
    fn an_ipv4_mapped_address_counts_as_its_ipv4_address() {
        let l = limits(1, 100, 100, true);
        let now = Instant::now();
        let _v4 = l.admit(A, false, now).expect("v4");
        let mapped = IpAddr::V6(std::net::Ipv4Addr::new(192, 0, 2, 1).to_ipv6_mapped());
        assert_eq!(
            l.admit(mapped, false, now).err(),
            Some(AddressRefusal::TooMany)
        );
    }

    #[test]
    fn ipv6_addresses_count_by_their_64_prefix() {
        let l = limits(1, 100, 100, true);
        let now = Instant::now();
        let one: IpAddr = "2001:db8:1:2::7".parse().unwrap_or(A);
        let same_64: IpAddr = "2001:db8:1:2:ffff::9".parse().unwrap_or(A);
        let other_64: IpAddr = "2001:db8:1:3::7".parse().unwrap_or(A);
        let _held = l.admit(one, false, now).expect("first");
        assert_eq!(
            l.admit(same_64, false, now).err(),
            Some(AddressRefusal::TooMany)
        );
        assert!(l.admit(other_64, false, now).is_ok());
    }

    #[test]
    fn a_loopback_address_from_a_proxy_header_is_not_exempt() {
        let l = limits(1, 100, 100, true);
        let now = Instant::now();
        let local = IpAddr::V4(std::net::Ipv4Addr::LOCALHOST);
        let _one = l.admit(local, true, now).expect("first");
        assert_eq!(
            l.admit(local, true, now).err(),
            Some(AddressRefusal::TooMany)
        );
    }

    #[test]
    fn a_sweep_forgets_idle_refilled_addresses_only() {
        let l = limits(10, 10, 2, true);
        let now = Instant::now();
        let held = l.admit(A, false, now).expect("held");
        drop(l.admit(B, false, now).expect("closed at once"));
        l.sweep(now);
        assert_eq!(l.addresses(), 2, "B's bucket has not refilled yet");
        l.sweep(now + Duration::from_secs(1));
        assert_eq!(l.addresses(), 1, "A still holds a connection");
        drop(held);
    }
}
