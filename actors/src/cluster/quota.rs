//! The bound on the message flow waiting to go out to other nodes
//! (`cluster.max_queued_messages`).
//!
//! Envelopes wait in the publisher's queue until the NATS client takes them. While NATS is away
//! the client stops taking them once its own command buffer (2,048) is full, so without a bound
//! the queue would grow for the whole outage, bodies included. The bound counts what is really
//! waiting (taken when queued, given back once the client has it), so it holds whether or not
//! the node has noticed the outage yet. It covers the envelopes of the message flow, which a
//! client can send as fast as its request rate allows: a `message` to a leg on another node
//! (refused at once with `message_failed` 503), a `message_ack` or `composing` (dropped: the
//! sender's leg fails the message with 408, a composing notice just lapses), and a
//! `message_received` (not a toast) or `remote_composing` to an endpoint on another node
//! (dropped likewise). Call control (accept, hang-up, call state, message answers) is never
//! dropped here: losing it would leave a call half ended, and a client makes it only as fast as
//! calls change.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use crate::metrics as m;

pub(super) struct MessageQuota {
    /// Message envelopes queued and not yet handed to the NATS client.
    waiting: AtomicUsize,
    limit: usize,
    /// Set from a drop until the queue has drained to half the limit, so a long outage logs
    /// one warning when dropping starts and one line when it ends, not one per message.
    dropping: AtomicBool,
}

impl MessageQuota {
    pub(super) fn new(limit: usize) -> Self {
        MessageQuota {
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
        metrics::counter!(m::CLUSTER_MESSAGES_DROPPED).increment(1);
        if !self.dropping.swap(true, Ordering::Relaxed) {
            tracing::warn!(
                limit = self.limit,
                "cluster.max_queued_messages messages wait for NATS; dropping new ones until they drain"
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
        let q = MessageQuota::new(2);
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
        let q = MessageQuota::new(4);
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
