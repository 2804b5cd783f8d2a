//! The order of a user's manual status changes, on one node and across a cluster.
//!
//! A user's status is the last `set_status` of any of their endpoints. Across nodes "last"
//! cannot be read off wall clocks alone: two changes within one millisecond carry the same
//! time, and two nodes' clocks disagree. So a change is stamped by a [`StatusClock`], a hybrid
//! logical clock: the wall clock, but always above every stamp this node has made or seen. A
//! change made after another was seen (the same device's next change, or a device on a node
//! that has read the other's record) therefore always has the larger stamp, whatever the
//! clocks say; two changes made without either knowing of the other (truly concurrent) are
//! ordered by the endpoint id, so every node picks the same one. [`StatusStamp::supersedes`]
//! is the one rule every node applies to every change, its own and the others'.

use std::sync::atomic::{AtomicU64, Ordering};

/// When a status was set: the hybrid clock's milliseconds, then the endpoint that set it.
#[derive(Debug, Clone, Default, PartialEq, Eq, PartialOrd, Ord)]
pub struct StatusStamp {
    pub at_ms: u64,
    pub endpoint: String,
}

impl StatusStamp {
    pub fn new(at_ms: u64, endpoint: impl Into<String>) -> Self {
        StatusStamp {
            at_ms,
            endpoint: endpoint.into(),
        }
    }

    /// Whether a change stamped `self` replaces the status stamped `current`: only if it is
    /// strictly later (a repeat of the same change is no change).
    pub fn supersedes(&self, current: &StatusStamp) -> bool {
        self > current
    }
}

/// This node's hybrid clock for status stamps (see the module's comment).
#[derive(Debug, Default)]
pub struct StatusClock {
    last_ms: AtomicU64,
}

impl StatusClock {
    /// A stamp for a change made now: the wall clock `wall_ms`, or one above the last stamp
    /// made or seen here if that is later.
    pub fn tick(&self, wall_ms: u64) -> u64 {
        let mut last = self.last_ms.load(Ordering::Relaxed);
        loop {
            let next = wall_ms.max(last.saturating_add(1));
            match self.last_ms.compare_exchange_weak(
                last,
                next,
                Ordering::Relaxed,
                Ordering::Relaxed,
            ) {
                Ok(_) => return next,
                Err(seen) => last = seen,
            }
        }
    }

    /// Notes a stamp made elsewhere: every later tick here is above it.
    pub fn observe(&self, at_ms: u64) {
        self.last_ms.fetch_max(at_ms, Ordering::Relaxed);
    }
}

/// The wall clock in unix ms (0 before 1970, which no clock here reads).
pub fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis().min(u64::MAX as u128) as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_later_time_supersedes() {
        assert!(StatusStamp::new(2, "b").supersedes(&StatusStamp::new(1, "z")));
        assert!(!StatusStamp::new(1, "z").supersedes(&StatusStamp::new(2, "b")));
    }

    #[test]
    fn the_same_time_is_ordered_by_endpoint_so_every_node_picks_the_same() {
        assert!(StatusStamp::new(5, "e2").supersedes(&StatusStamp::new(5, "e1")));
        assert!(!StatusStamp::new(5, "e1").supersedes(&StatusStamp::new(5, "e2")));
    }

    #[test]
    fn the_same_change_seen_twice_is_no_change() {
        assert!(!StatusStamp::new(5, "e1").supersedes(&StatusStamp::new(5, "e1")));
    }

    #[test]
    fn anything_supersedes_no_status_yet() {
        assert!(StatusStamp::new(0, "e").supersedes(&StatusStamp::default()));
    }

    #[test]
    fn changes_within_one_millisecond_get_rising_stamps() {
        let clock = StatusClock::default();
        let stamps: Vec<u64> = (0..4).map(|_| clock.tick(1000)).collect();
        assert_eq!(stamps, [1000, 1001, 1002, 1003]);
    }

    #[test]
    fn a_clock_set_back_still_stamps_above_what_it_made() {
        let clock = StatusClock::default();
        assert_eq!(clock.tick(1000), 1000);
        assert_eq!(clock.tick(400), 1001);
    }

    #[test]
    fn a_stamp_seen_from_a_node_whose_clock_is_ahead_is_passed() {
        let clock = StatusClock::default();
        clock.observe(9000);
        assert_eq!(clock.tick(1000), 9001);
        assert_eq!(clock.tick(9500), 9500);
    }
}
