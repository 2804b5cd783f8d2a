//! The state of one call leg as this library knows it, and how each node event changes it.
//! Only the endpoint's dispatcher (and the reply hook of `call_establish`) write here, in the
//! order the node sent things, so the view never runs ahead of or behind the node.

use std::sync::Mutex;

use confab_protocol::sdp::{self, Negotiated};
use confab_protocol::state::{CallState, Direction};
use confab_protocol::{Body, Reason, Remote, Toast};
use tokio::sync::watch;
use tokio::task::AbortHandle;

use super::tracker;
use crate::queue::{PushError, ReplayLog, SharedQueue};
use crate::sync::lock;

/// One transition of a call, as reported by the node's `call_state`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StateChange {
    /// The state the call left.
    pub previous: CallState,
    /// The state the call entered.
    pub state: CallState,
    /// Why, when the node said (always on `terminating` and `terminated`, and on a failed
    /// transfer's return to `established`).
    pub reason: Option<Reason>,
}

/// Everything known about a call at one moment; see [`crate::InstantMessagingCall::watch`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CallSnapshot {
    /// The current state.
    pub state: CallState,
    /// The other party, once established (and after a successful transfer, the new one).
    pub remote: Option<Remote>,
    /// What the flow may carry, once established.
    pub negotiated: Option<Negotiated>,
    /// The node chose this endpoint to auto-accept the call (`auto_accept_needed`).
    pub auto_accept_needed: bool,
    /// Where a callee last forwarded this (outbound) call.
    pub forwarded_to: Option<String>,
    /// The most recent reason the node gave.
    pub reason: Option<Reason>,
    /// The connection ended while the call was known; no further change will come.
    pub connection_lost: bool,
}

/// A message that arrived on a call's flow. The library has already acked it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReceivedMessage {
    /// Its number in the call (one counter for both directions, from 1).
    pub msg: u32,
    /// The sender's user URI.
    pub from: String,
    /// Its content type.
    pub content_type: String,
    /// Its body (text for `text/*`, bytes otherwise).
    pub body: Body,
    /// Whether this is the call's toast (msg 1, shown before the call was accepted).
    pub toast: bool,
}

/// Shared between the public handles and the dispatcher.
pub(crate) struct CallInner {
    pub(crate) id: String,
    pub(crate) conversation: String,
    pub(crate) direction: Direction,
    /// The other user: the callee as dialled (outbound) or the caller (inbound).
    pub(crate) peer: String,
    pub(crate) toast: Option<Toast>,
    /// The offer of the call: ours (outbound) or the caller's (inbound).
    pub(crate) offer: String,
    pub(crate) immediate_auto_accept: bool,
    pub(crate) snapshot: watch::Sender<CallSnapshot>,
    pub(crate) changes: ReplayLog<StateChange>,
    pub(crate) messages: SharedQueue<ReceivedMessage>,
    pub(crate) remote_composing: watch::Sender<bool>,
    /// The answer this endpoint sent (inbound), needed to negotiate once established.
    pub(crate) answer: Mutex<Option<String>>,
    /// Whether an accept is under way, so a second one (app and auto-accept racing) waits for
    /// the first instead of drawing `invalid_state` from the node.
    pub(crate) accepting: Mutex<bool>,
    /// The task refreshing our active composing state, while there is one.
    pub(crate) composing_refresh: Mutex<Option<AbortHandle>>,
}

/// What a new call leg is created from.
pub(crate) struct NewCall {
    pub(crate) id: String,
    pub(crate) conversation: String,
    pub(crate) direction: Direction,
    pub(crate) peer: String,
    pub(crate) toast: Option<Toast>,
    pub(crate) offer: String,
    pub(crate) immediate_auto_accept: bool,
    pub(crate) message_capacity: usize,
}

impl CallInner {
    pub(crate) fn new(new: NewCall) -> Self {
        let snapshot = CallSnapshot {
            state: new.direction.initial_state(),
            remote: None,
            negotiated: None,
            auto_accept_needed: false,
            forwarded_to: None,
            reason: None,
            connection_lost: false,
        };
        CallInner {
            id: new.id,
            conversation: new.conversation,
            direction: new.direction,
            peer: new.peer,
            toast: new.toast,
            offer: new.offer,
            immediate_auto_accept: new.immediate_auto_accept,
            snapshot: watch::Sender::new(snapshot),
            changes: ReplayLog::new(),
            messages: SharedQueue::new(new.message_capacity),
            remote_composing: watch::Sender::new(false),
            answer: Mutex::new(None),
            accepting: Mutex::new(false),
            composing_refresh: Mutex::new(None),
        }
    }

    pub(crate) fn state(&self) -> CallState {
        self.snapshot.borrow().state
    }

    /// Applies a `call_state` event.
    pub(crate) fn on_state(
        &self,
        direction: Direction,
        previous: CallState,
        state: CallState,
        reason: Option<Reason>,
    ) {
        if direction != self.direction {
            tracing::warn!(call = %self.id, ?direction, "call_state names the other direction");
        }
        let tracked = self.state();
        match tracker::check(self.direction, tracked, previous, state) {
            Ok(event) => {
                tracing::debug!(call = %self.id, ?previous, ?state, ?event, "call state");
            }
            // The node owns the call: following it keeps every later request valid, and the
            // warning is the evidence for the bug report.
            Err(e) => {
                tracing::warn!(call = %self.id, error = %e, "node reported an unexpected transition; following the node")
            }
        }
        self.snapshot.send_modify(|s| {
            s.state = state;
            if reason.is_some() {
                s.reason.clone_from(&reason);
            }
        });
        self.changes.push(StateChange {
            previous,
            state,
            reason,
        });
        if state == CallState::Terminated {
            self.finish();
        }
    }

    /// `call_established`: the other side's SDP and who answered.
    pub(crate) fn on_established(&self, remote_sdp: &str, remote: Remote) {
        let negotiated = match self.direction {
            Direction::Outbound => sdp::negotiate(&self.offer, remote_sdp),
            Direction::Inbound => match lock(&self.answer).as_deref() {
                Some(answer) => sdp::negotiate(&self.offer, answer),
                // Accepted with a raw request on the connection; the node checked the answer.
                None => sdp::negotiate(&self.offer, remote_sdp),
            },
        };
        let negotiated = negotiated
            .inspect_err(|e| tracing::warn!(call = %self.id, error = %e, "could not negotiate"))
            .ok();
        self.snapshot.send_modify(|s| {
            s.remote = Some(remote);
            s.negotiated = negotiated;
        });
    }

    pub(crate) fn on_transferred(&self, remote: Remote) {
        self.snapshot.send_modify(|s| s.remote = Some(remote));
    }

    pub(crate) fn on_forwarded(&self, to: String) {
        self.snapshot.send_modify(|s| s.forwarded_to = Some(to));
    }

    pub(crate) fn on_auto_accept_needed(&self) {
        self.snapshot.send_modify(|s| s.auto_accept_needed = true);
    }

    pub(crate) fn on_remote_composing(&self, active: bool) {
        self.remote_composing.send_if_modified(|current| {
            let changed = *current != active;
            *current = active;
            changed
        });
    }

    /// Queues a received message; the caller acks it only on success.
    pub(crate) fn on_message(&self, message: ReceivedMessage) -> Result<(), PushError> {
        self.messages.push(message)
    }

    /// The session is lost: the call ends here as the node ends it (through `terminating`,
    /// with `reason`), so that waiters see an ended call rather than a vanished one.
    pub(crate) fn end_locally(&self, reason: Reason) {
        let mut state = self.state();
        if state.is_final() {
            return;
        }
        tracing::info!(call = %self.id, ?state, "session lost; ending the call here");
        for next in [CallState::Terminating, CallState::Terminated] {
            if state == next {
                continue;
            }
            self.snapshot.send_modify(|s| {
                s.state = next;
                s.reason = Some(reason.clone());
            });
            self.changes.push(StateChange {
                previous: state,
                state: next,
                reason: Some(reason.clone()),
            });
            state = next;
        }
        self.detach();
    }

    /// The connection ended: nothing will change any more, so every waiter must wake up.
    pub(crate) fn detach(&self) {
        self.snapshot.send_modify(|s| s.connection_lost = true);
        self.finish();
    }

    /// Ends the call's streams; what they already hold can still be read.
    fn finish(&self) {
        self.changes.close();
        self.messages.close();
        self.stop_composing_refresh();
        self.on_remote_composing(false);
    }

    pub(crate) fn stop_composing_refresh(&self) {
        if let Some(task) = lock(&self.composing_refresh).take() {
            task.abort();
        }
    }
}
