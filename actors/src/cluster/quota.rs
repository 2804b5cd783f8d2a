//! The bound on envelopes that clients' requests drive, waiting to go out to other nodes
//! (`cluster.max_queued_envelopes`).
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
//!   gone), and the call goes on with the others or ends as without them;
//! - a `message_ack`, a `composing`, a `message_received` (not a toast) or a
//!   `remote_composing{active:true}`: dropped, as core NATS may drop them (the sender's leg
//!   answers the message with 408 after the ack timeout; a composing notice lapses).
//!
//! What the node sends on its own (call state, answers, toasts, a sign-out's hang-ups, a lost
//! endpoint, releases, the lapse of a composing notice) is never dropped here: losing it would
//! leave a call half ended, and it comes only as fast as calls change.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use crate::metrics as m;

pub(super) struct EnvelopeQuota {
    /// Message envelopes queued and not yet handed to the NATS client.
    waiting: AtomicUsize,
    limit: usize,
    /// Set from a drop until the queue has drained to half the limit, so a long outage logs
    /// one warning when dropping starts and one line when it ends, not one per message.
    dropping: AtomicBool,
}

impl EnvelopeQuota {
    pub(super) fn new(limit: usize) -> Self {
        EnvelopeQuota {
            waiting: AtomicUsize::new(0),
            limit,
            dropping: AtomicBool::new(false),
        }
    }

    /// Takes a place for one message envelope; false when `limit` already wait, and the caller
    /// drops it (and answers for it).
    pub(super) fn take(&self) -> bool {
        if self.waiting.fetch_add(1, Ordering::AcqRel) < self.limit {
            return true;
        }
        self.waiting.fetch_sub(1, Ordering::AcqRel);
        metrics::counter!(m::CLUSTER_ENVELOPES_DROPPED).increment(1);
        if !self.dropping.swap(true, Ordering::Relaxed) {
            tracing::warn!(
                limit = self.limit,
                "cluster.max_queued_envelopes messages wait for NATS; dropping new ones until they drain"
            );
        }
        false
    }

    /// Gives back the place of a message envelope the NATS client has taken.
    pub(super) fn release(&self) {
        let before = self.waiting.fetch_sub(1, Ordering::AcqRel);
        if before <= self.limit / 2 + 1 && self.dropping.swap(false, Ordering::Relaxed) {
            tracing::info!("messages for other nodes drain again; no longer dropping");
        }
    }

    /// Tests: holds `n` places, as envelopes stuck behind an outage would.
    pub(super) fn occupy(&self, n: usize) {
        self.waiting.fetch_add(n, Ordering::AcqRel);
    }

    /// Tests: gives back `n` places held by [`EnvelopeQuota::occupy`].
    pub(super) fn free(&self, n: usize) {
        for _ in 0..n {
            self.release();
        }
    }

    #[cfg(test)]
    fn waiting(&self) -> usize {
        self.waiting.load(Ordering::Acquire)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn places_beyond_the_limit_are_refused_until_one_is_given_back() {
        let q = EnvelopeQuota::new(2);
        assert!(q.take());
        assert!(q.take());
        assert!(!q.take(), "a third is over the limit");
        assert_eq!(q.waiting(), 2, "a refused one holds no place");
        q.release();
        assert!(q.take());
        assert!(!q.take());
    }

    #[test]
    fn dropping_ends_once_the_queue_has_drained_to_half() {
        let q = EnvelopeQuota::new(4);
        for _ in 0..4 {
            assert!(q.take());
        }
        assert!(!q.take());
        assert!(q.dropping.load(Ordering::Relaxed));
        q.release();
        assert!(
            q.dropping.load(Ordering::Relaxed),
            "one free place is not drained yet"
        );
        q.release();
        q.release();
        assert!(!q.dropping.load(Ordering::Relaxed));
        assert_eq!(q.waiting(), 1);
    }
}
