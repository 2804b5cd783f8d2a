//! The count of the node's frames read (the `welcome` is 0), kept across links, and when the
//! next `seen` is due. Only the reader of the current link counts; the heartbeat reads the
//! count for the `seen` it sends with each ping.

use std::sync::atomic::{AtomicU64, Ordering};

#[derive(Default)]
pub(super) struct Received {
    /// The number of the last node frame read.
    last: AtomicU64,
    /// Frames read since the last `seen` the reader sent.
    since_seen: AtomicU64,
    /// Send a `seen` every this many frames; 0 while the session is not resumable.
    seen_every: AtomicU64,
}

impl Received {
    /// The session is resumable, with the node's `max_unseen_frames`. A quarter of it (the
    /// contract asks for at most half) leaves room for the frames already on the way.
    pub(super) fn acknowledge_every(&self, max_unseen_frames: u32) {
        let every = (u64::from(max_unseen_frames) / 4).max(1);
        self.seen_every.store(every, Ordering::Relaxed);
    }

    /// One more frame read whole.
    pub(super) fn read_one(&self) {
        self.last.fetch_add(1, Ordering::Relaxed);
        self.since_seen.fetch_add(1, Ordering::Relaxed);
    }

    pub(super) fn last(&self) -> u64 {
        self.last.load(Ordering::Relaxed)
    }

    /// Whether a `seen` is due now; if so, the count towards the next one starts again.
    pub(super) fn seen_due(&self) -> bool {
        let every = self.seen_every.load(Ordering::Relaxed);
        if every == 0 || self.since_seen.load(Ordering::Relaxed) < every {
            return false;
        }
        self.since_seen.store(0, Ordering::Relaxed);
        true
    }

    /// A `seen` covering everything read goes out now (with a ping).
    pub(super) fn seen_sent(&self) {
        self.since_seen.store(0, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_seen_is_due_every_quarter_of_the_bound_once_resumable() {
        let r = Received::default();
        for _ in 0..10 {
            r.read_one();
        }
        assert!(!r.seen_due(), "not resumable: never due");
        r.acknowledge_every(16);
        assert!(r.seen_due());
        assert!(!r.seen_due());
        for _ in 0..3 {
            r.read_one();
        }
        assert!(!r.seen_due());
        r.read_one();
        assert!(r.seen_due());
        assert_eq!(r.last(), 14);
    }
}
