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
    /// Bytes of the frames read since the last `seen` the reader sent.
    bytes_since_seen: AtomicU64,
    /// ... and every this many bytes.
    seen_every_bytes: AtomicU64,
}

impl Received {
    /// The session is resumable, with the node's `max_unseen_frames` and `max_unseen_bytes`:
    /// a `seen` goes every quarter of either (docs/protocol.md §3), which leaves room for the
    /// frames already on the way.
    pub(super) fn acknowledge_every(&self, max_unseen_frames: u32, max_unseen_bytes: u64) {
        let every = (u64::from(max_unseen_frames) / 4).max(1);
        self.seen_every.store(every, Ordering::Relaxed);
        self.seen_every_bytes
            .store((max_unseen_bytes / 4).max(1), Ordering::Relaxed);
    }

    /// One more frame read whole, `len` bytes long (its body).
    pub(super) fn read_one(&self, len: usize) {
        self.last.fetch_add(1, Ordering::Relaxed);
        self.since_seen.fetch_add(1, Ordering::Relaxed);
        self.bytes_since_seen
            .fetch_add(len as u64, Ordering::Relaxed);
    }

    pub(super) fn last(&self) -> u64 {
        self.last.load(Ordering::Relaxed)
    }

    /// Whether a `seen` is due now; if so, the count towards the next one starts again.
    pub(super) fn seen_due(&self) -> bool {
        let every = self.seen_every.load(Ordering::Relaxed);
        let frames_due = self.since_seen.load(Ordering::Relaxed) >= every;
        let bytes_due = self.bytes_since_seen.load(Ordering::Relaxed)
            >= self.seen_every_bytes.load(Ordering::Relaxed);
        if every == 0 || !(frames_due || bytes_due) {
            return false;
        }
        self.seen_sent();
        true
    }

    /// A `seen` covering everything read goes out now (with a ping).
    pub(super) fn seen_sent(&self) {
        self.since_seen.store(0, Ordering::Relaxed);
        self.bytes_since_seen.store(0, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_seen_is_due_every_quarter_of_the_bound_once_resumable() {
        let r = Received::default();
        for _ in 0..10 {
            r.read_one(1);
        }
        assert!(!r.seen_due(), "not resumable: never due");
        r.acknowledge_every(16, 1 << 20);
        assert!(r.seen_due());
        assert!(!r.seen_due());
        for _ in 0..3 {
            r.read_one(1);
        }
        assert!(!r.seen_due());
        r.read_one(1);
        assert!(r.seen_due());
        assert_eq!(r.last(), 14);
    }

    #[test]
    fn a_seen_is_due_every_quarter_of_the_byte_bound_too() {
        let r = Received::default();
        r.acknowledge_every(1024, 4000);
        r.read_one(999);
        assert!(!r.seen_due());
        r.read_one(1);
        assert!(r.seen_due(), "1000 bytes: a quarter of 4000");
        assert!(!r.seen_due());
    }
}
