//! The messages a leg has handed to its client and not yet seen acked, each with the leg that
//! sent it (which is told when the ack comes).
//!
//! Bounded without refusing anything: the sender fails a message with 408 after
//! `flow.ack_timeout_ms`, so an entry older than that can only be acked in vain. Once the map
//! holds `limits.unacked_per_call` entries, those stale ones are dropped before the next goes
//! in. Without this a client that reads messages but never acks them would grow its leg's map
//! for as long as the call lasts (the sender's own limit frees up as its messages time out).
//! Fresh entries cannot outnumber the limit, since the sender holds no more than that many
//! messages awaiting acks.

use std::time::Duration;
use tokio::time::Instant;

use crate::ids::IdMap;

pub struct Unacked<S> {
    entries: IdMap<u32, (S, Instant)>,
    limit: usize,
    ack_timeout: Duration,
}

impl<S> Unacked<S> {
    pub fn new(limit: usize, ack_timeout: Duration) -> Self {
        Unacked {
            entries: IdMap::default(),
            limit,
            ack_timeout,
        }
    }

    /// Records message `msg` from `sender`, handed to the client at `now`.
    pub fn insert(&mut self, msg: u32, sender: S, now: Instant) {
        if self.entries.len() >= self.limit {
            let ack_timeout = self.ack_timeout;
            self.entries
                .retain(|_, (_, at)| now.saturating_duration_since(*at) < ack_timeout);
        }
        self.entries.insert(msg, (sender, now));
    }

    /// The sender of `msg`, which the client has just acked, if it is still awaited.
    pub fn remove(&mut self, msg: u32) -> Option<S> {
        self.entries.remove(&msg).map(|(sender, _)| sender)
    }

    /// Every awaited message with its sender, leaving none (the leg is ending).
    pub fn take_all(&mut self) -> impl Iterator<Item = (u32, S)> + use<S> {
        std::mem::take(&mut self.entries)
            .into_iter()
            .map(|(msg, (sender, _))| (msg, sender))
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TIMEOUT: Duration = Duration::from_secs(30);

    #[test]
    fn acked_messages_leave_and_report_their_sender() {
        let mut u = Unacked::new(4, TIMEOUT);
        let t = Instant::now();
        u.insert(1, "a", t);
        u.insert(2, "b", t);
        assert_eq!(u.remove(1), Some("a"));
        assert_eq!(u.remove(1), None, "an ack counts once");
        assert_eq!(u.len(), 1);
    }

    #[test]
    fn a_client_that_never_acks_holds_at_most_the_limit_once_the_sender_gave_up() {
        let mut u = Unacked::new(3, TIMEOUT);
        let start = Instant::now();
        // Three messages a minute for an hour, none acked: the sender failed each with 408
        // after 30 s, so only the fresh ones may stay.
        for n in 0..180u32 {
            u.insert(n, (), start + Duration::from_secs(20 * u64::from(n)));
            assert!(u.len() <= 3, "{} entries after message {n}", u.len());
        }
        assert!(u.remove(179).is_some(), "the newest is still awaited");
        assert!(u.remove(0).is_none(), "the oldest was dropped");
    }

    #[test]
    fn fresh_messages_are_never_dropped() {
        let mut u = Unacked::new(2, TIMEOUT);
        let t = Instant::now();
        for n in 0..5 {
            u.insert(n, (), t + Duration::from_secs(u64::from(n)));
        }
        assert_eq!(
            u.len(),
            5,
            "all within the ack timeout: each can still be acked"
        );
        assert_eq!(u.take_all().count(), 5);
        assert!(u.is_empty());
    }
}
