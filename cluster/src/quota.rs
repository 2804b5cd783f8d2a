//! The bound on envelopes that clients' requests drive, waiting to go out to other nodes
//! (`cluster.max_queued_envelopes`, and in bytes `cluster.max_queued_bytes`).
//!
//! Envelopes wait in the publisher's queue until the NATS client takes them. While NATS is away
//! the client stops taking them once its own command buffer (2,048) is full, so without a bound
//! the queue would grow for the whole outage at the pace of the clients' requests (each
//! connection may send `limits.requests_per_second`, bodies and SDPs included). The bound counts
//! what is really waiting (taken when queued, given back once the client has it), so it holds
//! whether or not the node has noticed the outage yet. It covers what a client can repeat at
//! will, each with an answer when it is not sent:
//! - a `message` to a leg on another node: `message_failed` 503 at once;
//! - a `call_accept`, `call_decline`, `call_forward`, `call_transfer` or `call_terminate` for a
//!   leg on another node: `error{overloaded}` at once;
//! - a fork offered to an endpoint on another node: the fork is lost (as if the endpoint had
//!   gone; no leg is made for it), and the call goes on with the others or ends as without
//!   them;
//! - a `message_ack`, a `composing`, a `message_received` (not a toast) or a
//!   `remote_composing{active:true}`: dropped, as core NATS may drop them (the sender's leg
//!   answers the message with 408 after the ack timeout; a composing notice lapses).
//!
//! What the node sends on its own (call state, answers, toasts, a sign-out's hang-ups, a
//! conversation's hang-up, sent once per call, a lost endpoint, releases, the `active:false`
//! ending a composing notice that went out) is never dropped here: losing it would
//! leave a call half ended, and it comes only as fast as calls change.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use confab_actors::metrics as m;

pub(super) struct EnvelopeQuota {
    /// Bounded envelopes queued and not yet handed to the NATS client, and their bytes.
    waiting: AtomicUsize,
    waiting_bytes: AtomicUsize,
    limit: usize,
    byte_limit: usize,
    /// Set from a drop until the queue has drained to half the limit, so a long outage logs
    /// one warning when dropping starts and one line when it ends, not one per envelope.
    dropping: AtomicBool,
}

impl EnvelopeQuota {
    pub(super) fn new(limit: usize, byte_limit: usize) -> Self {
        EnvelopeQuota {
            waiting: AtomicUsize::new(0),
            waiting_bytes: AtomicUsize::new(0),
            limit,
            byte_limit,
            dropping: AtomicBool::new(false),
        }
    }

    /// Takes a place for one envelope of `bytes`; false when `limit` envelopes or
    /// `byte_limit` bytes already wait (one envelope alone is always let through, however
    /// large: the frame limits bound it), and the caller drops it (and answers for it).
    pub(super) fn take(&self, bytes: usize) -> bool {
        let count = self.waiting.fetch_add(1, Ordering::AcqRel);
        let before = self.waiting_bytes.fetch_add(bytes, Ordering::AcqRel);
        if count < self.limit && (before == 0 || before + bytes <= self.byte_limit) {
            return true;
        }
        self.waiting.fetch_sub(1, Ordering::AcqRel);
        self.waiting_bytes.fetch_sub(bytes, Ordering::AcqRel);
        metrics::counter!(m::CLUSTER_ENVELOPES_DROPPED).increment(1);
        if !self.dropping.swap(true, Ordering::Relaxed) {
            tracing::warn!(
                limit = self.limit,
                byte_limit = self.byte_limit,
                "cluster.max_queued_envelopes (or max_queued_bytes) wait for NATS; refusing new ones until they drain"
            );
        }
        false
    }

    /// Gives back the place of an envelope of `bytes` the NATS client has taken.
    pub(super) fn release(&self, bytes: usize) {
        self.release_many(1, bytes);
    }

    /// Gives back the places of `envelopes` envelopes of `bytes` in all (a batch's).
    pub(super) fn release_many(&self, envelopes: usize, bytes: usize) {
        let before = self.waiting.fetch_sub(envelopes, Ordering::AcqRel);
        let before_bytes = self.waiting_bytes.fetch_sub(bytes, Ordering::AcqRel);
        if before <= self.limit / 2 + envelopes
            && before_bytes <= self.byte_limit / 2 + bytes
            && self.dropping.swap(false, Ordering::Relaxed)
        {
            tracing::info!("envelopes for other nodes drain again; no longer refusing");
        }
    }

    /// Tests: holds `n` places, as envelopes stuck behind an outage would.
    pub(super) fn occupy(&self, n: usize) {
        self.waiting.fetch_add(n, Ordering::AcqRel);
    }

    /// Tests: gives back `n` places held by [`EnvelopeQuota::occupy`].
    pub(super) fn free(&self, n: usize) {
        for _ in 0..n {
            self.release(0);
        }
    }

    /// The places held now: envelopes, bytes.
    pub(super) fn waiting(&self) -> (usize, usize) {
        (
            self.waiting.load(Ordering::Acquire),
            self.waiting_bytes.load(Ordering::Acquire),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: usize = 1 << 20;

    #[test]
    fn places_beyond_the_limit_are_refused_until_one_is_given_back() {
        let q = EnvelopeQuota::new(2, MIB);
        assert!(q.take(10));
        assert!(q.take(10));
        assert!(!q.take(10), "a third is over the limit");
        assert_eq!(q.waiting(), (2, 20), "a refused one holds no place");
        q.release(10);
        assert!(q.take(10));
        assert!(!q.take(10));
    }

    #[test]
    fn bytes_beyond_the_byte_limit_are_refused_but_one_envelope_always_passes() {
        let q = EnvelopeQuota::new(100, 1000);
        assert!(q.take(5000), "alone, even a large one goes");
        assert!(!q.take(1), "behind it, nothing fits");
        q.release(5000);
        assert!(q.take(600));
        assert!(q.take(400));
        assert!(!q.take(1));
        assert_eq!(q.waiting(), (2, 1000));
    }

    #[test]
    fn refusing_ends_once_the_queue_has_drained_to_half() {
        let q = EnvelopeQuota::new(4, MIB);
        for _ in 0..4 {
            assert!(q.take(1));
        }
        assert!(!q.take(1));
        assert!(q.dropping.load(Ordering::Relaxed));
        q.release(1);
        assert!(
            q.dropping.load(Ordering::Relaxed),
            "one free place is not drained yet"
        );
        q.release(1);
        q.release(1);
        assert!(!q.dropping.load(Ordering::Relaxed));
        assert_eq!(q.waiting(), (1, 1));
    }
}
