//! A call's state events for an endpoint on another node, numbered and sent again until that
//! node says it has passed them on. Core NATS delivers at most once; a lost `call_state` or
//! `call_established` would leave the client's view of its call behind for as long as the
//! call lasts (its end is covered by `resend.rs` and `Endpoint::end_mirrored_call`).
//!
//! - Which events: those that move or describe the call ([`is_state_event`]). Messages, their
//!   answers and `composing` notices are not numbered: each message gets its one answer by
//!   deadline already (`message_failed` 408), and a late notice is worse than none.
//! - The leg's node numbers them per leg from 1 (`Envelope::Event::seq`), keeps each until the
//!   endpoint's node answers `EventsSeen { upto }`, and on the liveness tick sends every one
//!   still unanswered after a resend interval again, in order, at most [`RESEND_ATTEMPTS`]
//!   times (by then the other node would have been declared dead); a leg whose events stay
//!   unseen longer ends its call, since its endpoint would wait for the missing one for good.
//! - The endpoint passes on only the next number it expects: a repeat is dropped (and answered
//!   again, since its answer may be what was lost), and an event after a gap is dropped until
//!   the lost one comes again with everything after it.

use super::resend::RESEND_ATTEMPTS;
use super::*;
use std::collections::VecDeque;

/// How many unanswered state events one leg keeps for sending again; a call in a sane state
/// machine sends a handful, so only a runaway leg reaches it (its call then ends).
const MAX_UNSEEN_PER_LEG: usize = 64;

/// Whether `msg` is a state event, numbered and sent again until seen (see the module doc).
pub fn is_state_event(msg: &ServerMsg) -> bool {
    matches!(
        msg,
        ServerMsg::CallState { .. }
            | ServerMsg::CallRinging { .. }
            | ServerMsg::CallEstablished { .. }
            | ServerMsg::AutoAcceptNeeded { .. }
            | ServerMsg::CallForwarded { .. }
            | ServerMsg::CallTransferred { .. }
    )
}

/// One leg's state events not yet seen by its endpoint's node.
pub(super) struct UnseenEvents {
    node: String,
    /// (number, encoded envelope), oldest first.
    events: VecDeque<(u64, Bytes)>,
    /// When they were last sent (the oldest one's first sending, or the last resend).
    sent: Instant,
    attempts: u32,
}

impl Cluster {
    /// Whether `node` acknowledges numbered state events, as its heartbeats say: only then are
    /// its endpoints' state events numbered and sent again.
    pub fn acks_events(&self, node: &str) -> bool {
        lock(&self.nodes).get(node).is_some_and(|n| n.acks_events)
    }

    /// What `node`'s latest heartbeat says of acknowledging state events.
    pub(super) fn note_acks_events(&self, node: &str, acks: bool) {
        if let Some(seen) = lock(&self.nodes).get_mut(node) {
            seen.acks_events = acks;
        }
    }

    /// Sends the state event `env` (numbered `seq`) of the leg `call` to `node`, and keeps it
    /// until seen. Published under the lock, as resends are: a resend must not overtake a
    /// newer event, which the endpoint would then drop as coming after a gap.
    pub(super) fn send_state_event(&self, node: &str, call: &str, seq: u64, payload: Bytes) {
        let mut unseen = lock(&self.unseen_events);
        let entry = unseen
            .entry(call.to_owned())
            .or_insert_with(|| UnseenEvents {
                node: node.to_owned(),
                events: VecDeque::new(),
                sent: Instant::now(),
                attempts: 0,
            });
        if entry.events.len() >= MAX_UNSEEN_PER_LEG {
            unseen.remove(call);
            drop(unseen);
            tracing::warn!(%call, %node, "too many state events unseen by another node; ending the call");
            self.end_unseen_leg(call);
            return;
        }
        entry.events.push_back((seq, payload.clone()));
        self.publish(&node_subject(node), &payload, false);
    }

    /// Ends the leg `call`, whose endpoint's node has not acknowledged its state events: that
    /// endpoint would wait for the missing one for good and drop every later one, so its call
    /// ends instead, as it does when the endpoint is lost (its end still reaches the client:
    /// `LegEnded`, sent again until released, and the endpoint's own `terminating` and
    /// `terminated` when the leg's were among the events lost).
    fn end_unseen_leg(&self, call: &str) {
        if let Some(leg) = self.legs.get(call).map(|l| l.value().1.clone()) {
            leg.do_send(LegMsg::EndpointLost);
        }
    }

    /// The endpoint's node passed on the state events of the leg `call` up to `upto`.
    pub(super) fn events_seen(&self, call: &str, upto: u64) {
        let mut unseen = lock(&self.unseen_events);
        let Some(entry) = unseen.get_mut(call) else {
            return;
        };
        let before = entry.events.len();
        entry.events.retain(|(seq, _)| *seq > upto);
        if entry.events.is_empty() {
            unseen.remove(call);
        } else if entry.events.len() < before {
            // The rest is younger: it gets its own resend interval.
            entry.attempts = 0;
            entry.sent = Instant::now();
        }
    }

    /// Forgets the unseen state events of the leg `call`: it is gone.
    pub fn forget_events(&self, call: &str) {
        lock(&self.unseen_events).remove(call);
    }

    /// Forgets the unseen state events for `node` (None: all of them): it is dead, or this
    /// node started a new run, and either way those calls have ended on both sides.
    pub(super) fn forget_events_to(&self, node: Option<&str>) {
        let mut unseen = lock(&self.unseen_events);
        match node {
            Some(node) => unseen.retain(|_, u| u.node != node),
            None => unseen.clear(),
        }
    }

    /// Sends again, in order, the state events of each leg unseen for a resend interval (on
    /// the liveness tick); ends the legs whose events went unseen [`RESEND_ATTEMPTS`] times.
    pub(super) fn resend_unseen_events(&self) {
        let now = Instant::now();
        let every = self.resend_interval();
        let mut resent = 0;
        let mut given_up = Vec::new();
        let mut unseen = lock(&self.unseen_events);
        unseen.retain(|call, u| {
            if now.duration_since(u.sent) < every {
                return true;
            }
            if u.attempts >= RESEND_ATTEMPTS {
                tracing::warn!(%call, node = %u.node, "another node never acknowledged a call's state events; ending the call");
                given_up.push(call.clone());
                return false;
            }
            u.attempts += 1;
            u.sent = now;
            tracing::debug!(%call, node = %u.node, events = u.events.len(), "sending unseen state events again");
            let subject = node_subject(&u.node);
            for (_, payload) in &u.events {
                self.publish(&subject, payload, false);
                resent += 1;
            }
            true
        });
        drop(unseen);
        if resent > 0 {
            metrics::counter!(m::CLUSTER_ENVELOPES_RESENT, "kind" => "event").increment(resent);
            self.events_resent.fetch_add(resent, Ordering::Relaxed);
        }
        for call in given_up {
            self.end_unseen_leg(&call);
        }
    }

    /// Tests: how many state events this node has sent again.
    pub fn events_resent(&self) -> u64 {
        self.events_resent.load(Ordering::Relaxed)
    }

    /// Tests: how many legs here have state events another node has not acknowledged.
    pub fn unseen_events_len(&self) -> usize {
        lock(&self.unseen_events).len()
    }
}
