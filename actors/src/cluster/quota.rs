//! The bound on envelopes kept for other nodes while NATS is away
//! (`cluster.max_queued_envelopes`).
//!
//! During an outage the NATS client keeps what it is given and sends it on reconnect, so a short
//! outage loses nothing; but for a long one that store would grow without end. So at most
//! `limit` envelopes are kept per outage; beyond that a new envelope is dropped and counted. The
//! node treats it as any core-NATS message lost on the way: the waiting side's timeout answers
//! the client (a message fails with 408, a ringing call with its toast timeout).

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use crate::metrics as m;

pub(super) struct EnvelopeQuota {
    /// Envelopes kept since NATS went away.
    kept: AtomicUsize,
    limit: usize,
    /// Set from the first drop of an outage, so it logs one warning, not one per envelope.
    dropping: AtomicBool,
}

impl EnvelopeQuota {
    pub(super) fn new(limit: usize) -> Self {
        EnvelopeQuota {
            kept: AtomicUsize::new(0),
            limit,
            dropping: AtomicBool::new(false),
        }
    }

    /// Whether to send an envelope: always while NATS is connected; during an outage, only the
    /// first `limit`.
    pub(super) fn admit(&self, nats_connected: bool) -> bool {
        if nats_connected || self.kept.fetch_add(1, Ordering::Relaxed) < self.limit {
            return true;
        }
        metrics::counter!(m::CLUSTER_ENVELOPES_DROPPED).increment(1);
        if !self.dropping.swap(true, Ordering::Relaxed) {
            tracing::warn!(
                limit = self.limit,
                "cluster.max_queued_envelopes envelopes wait for NATS; dropping new ones until it is back"
            );
        }
        false
    }

    /// NATS is back: what was kept goes out, and the next outage starts from nothing.
    pub(super) fn reconnected(&self) {
        self.kept.store(0, Ordering::Relaxed);
        self.dropping.store(false, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn while_connected_nothing_is_counted_or_refused() {
        let q = EnvelopeQuota::new(1);
        for _ in 0..10 {
            assert!(q.admit(true));
        }
        assert!(q.admit(false), "the outage's first envelope is kept");
    }

    #[test]
    fn an_outage_keeps_the_first_limit_envelopes_and_a_reconnect_starts_afresh() {
        let q = EnvelopeQuota::new(2);
        assert!(q.admit(false));
        assert!(q.admit(false));
        assert!(!q.admit(false), "a third is over the limit");
        assert!(!q.admit(false));
        assert!(q.dropping.load(Ordering::Relaxed));
        q.reconnected();
        assert!(!q.dropping.load(Ordering::Relaxed));
        assert!(q.admit(false));
        assert!(q.admit(false));
        assert!(!q.admit(false));
    }
}
