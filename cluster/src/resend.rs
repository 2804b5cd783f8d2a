//! The words that end a call across nodes, sent again until answered. Core NATS delivers at
//! most once, and losing one of them would leave a call half ended: the device showing a call
//! that is over, or the other party's messages failing 408 one by one on a call whose device
//! is gone, or an ended leg held for good. Each has an answer that shows it arrived:
//!
//! - a leg's `LegEnded` is answered by its endpoint's `Release` (the endpoint's node answers
//!   for an endpoint it no longer holds); the leg sends it again until then (`call/leg.rs`);
//! - an endpoint's `EndpointLost` is answered by its leg's `LegEnded` (the leg's node answers
//!   for a leg it no longer holds); this file keeps the unanswered ones and sends them again.
//!
//! A leg reports its end again every [`Cluster::resend_interval`] (half the node timeout); the
//! unanswered `EndpointLost`s are looked at on the liveness tick (a third of the node timeout)
//! and sent again once a resend interval has passed, so about every two thirds of the node
//! timeout. Each at most [`RESEND_ATTEMPTS`] times: by then the other node would have been
//! declared dead, which ends the call on its own.

use super::*;

/// How many times an unanswered call-ending envelope is sent again.
pub const RESEND_ATTEMPTS: u32 = 8;

/// An `EndpointLost` waiting for its leg's end.
pub(super) struct UnansweredLost {
    node: String,
    endpoint: String,
    sent: Instant,
    attempts: u32,
}

impl Cluster {
    /// How long a call-ending envelope waits for its answer before it is sent again.
    pub fn resend_interval(&self) -> Duration {
        self.timeout / 2
    }

    /// Tells the leg of `call` on `node` that `endpoint`, here, is gone; sent again until the
    /// leg's end comes back.
    pub fn endpoint_lost(&self, node: &str, call: &str, endpoint: &str) {
        lock(&self.unanswered_lost).insert(
            call.to_owned(),
            UnansweredLost {
                node: node.to_owned(),
                endpoint: endpoint.to_owned(),
                sent: Instant::now(),
                attempts: 0,
            },
        );
        self.send_endpoint_lost(node, call, endpoint);
    }

    fn send_endpoint_lost(&self, node: &str, call: &str, endpoint: &str) {
        self.send(
            node,
            &Envelope::Leg {
                call: call.to_owned(),
                reply_node: self.node_id.clone(),
                reply_endpoint: endpoint.to_owned(),
                msg: WireLegMsg::EndpointLost,
            },
        );
    }

    /// The end of `call`'s leg reached an endpoint no longer here: an `EndpointLost` for it is
    /// answered.
    pub(super) fn lost_endpoint_answered(&self, call: &str) {
        lock(&self.unanswered_lost).remove(call);
    }

    /// Forgets the `EndpointLost`s to `node`: it is dead, or this node started a new run, and
    /// either way the calls they were about have ended on both sides.
    pub(super) fn forget_unanswered(&self, node: Option<&str>) {
        let mut unanswered = lock(&self.unanswered_lost);
        match node {
            Some(node) => unanswered.retain(|_, u| u.node != node),
            None => unanswered.clear(),
        }
    }

    /// Sends again each `EndpointLost` unanswered for a resend interval (on the liveness tick).
    pub(super) fn resend_unanswered(&self) {
        let now = Instant::now();
        let every = self.resend_interval();
        let mut again = Vec::new();
        lock(&self.unanswered_lost).retain(|call, u| {
            if now.duration_since(u.sent) < every {
                return true;
            }
            if u.attempts >= RESEND_ATTEMPTS {
                tracing::warn!(%call, node = %u.node, "a lost endpoint's leg never answered; giving up");
                return false;
            }
            u.attempts += 1;
            u.sent = now;
            again.push((u.node.clone(), call.clone(), u.endpoint.clone()));
            true
        });
        if !again.is_empty() {
            metrics::counter!(m::CLUSTER_ENVELOPES_RESENT, "kind" => "endpoint_lost")
                .increment(again.len() as u64);
        }
        for (node, call, endpoint) in again {
            tracing::debug!(%call, %node, "sending an unanswered EndpointLost again");
            self.send_endpoint_lost(&node, &call, &endpoint);
        }
    }

    /// Tests: how many `EndpointLost`s wait for their answer.
    pub fn unanswered_lost_len(&self) -> usize {
        lock(&self.unanswered_lost).len()
    }
}
