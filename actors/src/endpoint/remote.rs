//! An endpoint's calls whose legs live on another node (cluster): the forks adopted from
//! other nodes' arbiters, what the endpoint mirrors of each such call, the requests and
//! messages waiting for an answer from that node (each answered here if the answer never
//! comes), and ending those calls for the client when their node dies.

use actix::prelude::*;
use confab_protocol::{Direction, Reason, ServerMsg, Toast};
use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;

use super::{EndState, Endpoint};
use crate::call::leg::{LegMsg, TerminateCause};
use crate::link::Link;
use crate::metrics as m;
use crate::reasons;
use crate::refusal::Refusal;
use crate::route::LegRef;

/// How long an endpoint gathers the state events it passes on before acknowledging them to
/// their leg's node: far below the resend interval (half the node timeout, at least 50 ms).
const EVENTS_SEEN_DELAY: Duration = Duration::from_millis(5);

/// Cluster: a fork whose leg an arbiter on another node created for this endpoint.
#[derive(Debug)]
pub struct RemoteFork {
    pub leg_node: String,
    pub arbiter: String,
    pub call: String,
    pub conversation: String,
    pub from: String,
    pub offer: String,
    pub toast: Option<Toast>,
    pub immediate: bool,
    /// The run of `leg_node` that made the leg (absent from an older node's `Adopt`).
    pub leg_epoch: Option<u64>,
}

/// Tells a remote fork's arbiter the fork is lost if the offer is dropped unhandled: an
/// endpoint that is stopping no longer reads its mailbox, and the arbiter must not wait for it.
pub struct RemoteForkGuard {
    link: Arc<dyn Link>,
    leg_node: String,
    arbiter: String,
    call: String,
    armed: bool,
}

impl RemoteForkGuard {
    pub fn new(link: Arc<dyn Link>, fork: &RemoteFork) -> Self {
        RemoteForkGuard {
            link,
            leg_node: fork.leg_node.clone(),
            arbiter: fork.arbiter.clone(),
            call: fork.call.clone(),
            armed: true,
        }
    }

    pub(super) fn disarm(&mut self) {
        self.armed = false;
    }
}

impl Drop for RemoteForkGuard {
    fn drop(&mut self) {
        if self.armed {
            self.link.fork_lost(
                &self.leg_node,
                std::mem::take(&mut self.arbiter),
                std::mem::take(&mut self.call),
            );
        }
    }
}

/// What an endpoint mirrors of a call whose leg lives on another node, so it can end the call
/// for its client if that node dies.
pub(super) struct RemoteCall {
    pub(super) node: String,
    /// The run of `node` the leg belongs to: a node loss ends only the calls of the run that
    /// died (a call from its next run may be adopted before the others hear of that run).
    /// None: from an older node, which does not say; ended with any run of its node.
    pub(super) epoch: Option<u64>,
    pub(super) state: confab_protocol::CallState,
    pub(super) conversation: String,
    /// `rid`s of `message` requests still waiting for their answer, oldest first, with when
    /// each was sent (see [`Endpoint::sweep_remote_answers`]).
    pub(super) messages: VecDeque<(Option<u32>, Instant)>,
    /// The number of the next state event of the leg to pass on (`cluster/src/events.rs`), and
    /// the last one acknowledged to the leg's node.
    pub(super) next_event: u64,
    pub(super) acknowledged: u64,
    /// Call requests (`call_accept`, `call_decline`, `call_forward`, `call_transfer`,
    /// `call_terminate`) still waiting for their `ok` or `error`, oldest first: the same
    /// deadline and the same end as `messages`, so each gets its one answer even when its
    /// envelope, its answer or the leg's node is lost.
    pub(super) requests: VecDeque<WaitingRequest>,
}

/// A call request sent to a leg on another node and not answered yet.
pub(super) struct WaitingRequest {
    pub(super) rid: Option<u32>,
    pub(super) sent: Instant,
    pub(super) kind: RequestKind,
}

/// What a waiting call request gets if its call ends before the leg's answer comes: what the
/// leg itself would have answered for a call that is over.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(super) enum RequestKind {
    /// `ok`: terminating a call that is over is not an error.
    Terminate,
    /// `answered_elsewhere` when another fork won the call, else `invalid_state`.
    Accept,
    /// `invalid_state`.
    Other,
}

impl Endpoint {
    /// Answers every message of `call` still waiting for its leg on another node, when that
    /// leg can no longer answer them.
    pub(super) fn fail_waiting(
        &self,
        call: &str,
        waiting: VecDeque<(Option<u32>, Instant)>,
        code: u16,
        text: &str,
    ) {
        for (rid, _) in waiting {
            self.fail_message(rid, call.to_owned(), code, text);
        }
    }

    /// Answers call requests whose call ended (`elsewhere`: another fork won it) before its
    /// leg, on another node, answered them.
    pub(super) fn answer_requests_of_ended_call(
        &self,
        requests: VecDeque<WaitingRequest>,
        elsewhere: bool,
    ) {
        for r in requests {
            match r.kind {
                RequestKind::Terminate => self.push(ServerMsg::Ok { rid: r.rid }),
                RequestKind::Accept if elsewhere => self.refuse(r.rid, Refusal::AnsweredElsewhere),
                _ => self.refuse(r.rid, Refusal::CallOver),
            }
        }
    }

    /// Everything still waiting for a leg on another node that can no longer answer: messages
    /// get `message_failed` with `code` and `text`, call requests the answers for a call that
    /// is over.
    pub(super) fn answer_all_waiting(
        &self,
        call: &str,
        r: RemoteCall,
        code: u16,
        text: &str,
        elsewhere: bool,
    ) {
        self.fail_waiting(call, r.messages, code, text);
        self.answer_requests_of_ended_call(r.requests, elsewhere);
    }

    /// Cluster: adopts a fork whose leg an arbiter on another node created, or reports it lost.
    pub(super) fn adopt_remote(&mut self, fork: RemoteFork) {
        let Some(link) = self.ctx.link.clone() else {
            return;
        };
        if self.end_state == EndState::ShuttingDown {
            // Declined as a ringing fork is when the node shuts down: its leg, told to
            // terminate for the shutdown, declines with 503 "Server shutting down".
            link.send_to_leg(
                &fork.leg_node,
                &fork.call,
                &self.id,
                LegMsg::Terminate {
                    rid: None,
                    cause: TerminateCause::Shutdown,
                },
            );
            return;
        }
        if self.ending() || self.book.calls.len() >= self.ctx.live().limits.calls_per_endpoint {
            link.fork_lost(&fork.leg_node, fork.arbiter, fork.call);
            return;
        }
        self.push(ServerMsg::CallIncoming {
            call: fork.call.clone(),
            conversation: fork.conversation.clone(),
            from: fork.from,
            toast: fork.toast,
            sdp: fork.offer,
            immediate_auto_accept: fork.immediate,
        });
        link.fork_adopted(&fork.leg_node, fork.arbiter, fork.call.clone());
        self.book.remote_calls.insert(
            fork.call.clone(),
            RemoteCall {
                node: fork.leg_node.clone(),
                epoch: fork.leg_epoch,
                state: confab_protocol::CallState::Incoming,
                conversation: fork.conversation.clone(),
                messages: VecDeque::new(),
                next_event: 1,
                acknowledged: 0,
                requests: VecDeque::new(),
            },
        );
        let leg = LegRef::Remote {
            link,
            node: fork.leg_node,
            call: fork.call.clone(),
            endpoint: self.id.to_string(),
        };
        self.add_call(fork.call, leg, fork.conversation);
    }

    /// Cluster: an event from a leg on another node. The endpoint mirrors what it needs to end
    /// the call itself should that node die, then passes the event on.
    pub(super) fn remote_event(
        &mut self,
        msg: ServerMsg,
        answering: Option<String>,
        seq: Option<u64>,
        ctx: &mut Context<Self>,
    ) {
        // An event of a call this endpoint never held (or forgot long ago) is dropped: ids never
        // leak. Replies (`ok`, `error`, `message_*`) always pass.
        let event_call = match &msg {
            ServerMsg::CallState { call, .. }
            | ServerMsg::CallIncoming { call, .. }
            | ServerMsg::CallRinging { call }
            | ServerMsg::CallEstablished { call, .. }
            | ServerMsg::AutoAcceptNeeded { call }
            | ServerMsg::CallForwarded { call, .. }
            | ServerMsg::CallTransferred { call, .. }
            | ServerMsg::MessageReceived { call, .. }
            | ServerMsg::RemoteComposing { call, .. } => Some(call),
            _ => None,
        };
        if let Some(call) = event_call
            && !self.holds_or_held(call)
        {
            tracing::debug!(endpoint = %self.id, %call, "dropping an event of a call not held here");
            return;
        }
        if let (Some(seq), Some(call)) = (seq, event_call)
            && !self.take_in_order(call, seq, ctx)
        {
            return;
        }
        match &msg {
            ServerMsg::CallState { call, state, .. } => {
                if let Some(r) = self.book.remote_calls.get_mut(call) {
                    r.state = *state;
                }
            }
            ServerMsg::MessageDelivered { rid, call, .. }
            | ServerMsg::MessageFailed { rid, call, .. } => {
                // Only a message still waiting is answered: one answered here already (408
                // when its answer was late, or when its call ended or its node was lost)
                // gets no second answer.
                // `written()`: an answer for a call this endpoint never held makes no book.
                let waiting = self
                    .book
                    .written()
                    .and_then(|b| b.remote_calls.get_mut(call))
                    .and_then(|r| {
                        let i = r.messages.iter().position(|(x, _)| x == rid)?;
                        r.messages.remove(i)
                    })
                    .is_some();
                if !waiting {
                    tracing::debug!(endpoint = %self.id, %call, "dropping an answer to a message answered already");
                    return;
                }
                // Counted here, where it reaches the client, and not by the leg: a late answer
                // dropped above was counted already, as the 408 this node gave.
                match &msg {
                    ServerMsg::MessageFailed { code, .. } => {
                        m::message_failed(*code);
                    }
                    _ => m::hot().messages_delivered.increment(1),
                }
            }
            ServerMsg::Ok { rid } | ServerMsg::Error { rid, .. } => {
                // The answer to its call's oldest request with this `rid` still waiting
                // (without a call, from a node that does not name it: the oldest of any call).
                // None waiting: it was answered here already (its deadline passed, or its call
                // ended), and gets no second answer.
                let position = |r: &mut RemoteCall| {
                    let i = r.requests.iter().position(|w| w.rid == *rid)?;
                    Some((r.requests[i].sent, i))
                };
                let book = self.book.written();
                let oldest = match (&answering, book) {
                    (_, None) => None,
                    (Some(call), Some(book)) => book.remote_calls.get_mut(call).and_then(|r| {
                        let (sent, i) = position(r)?;
                        Some((sent, i, r))
                    }),
                    (None, Some(book)) => book
                        .remote_calls
                        .values_mut()
                        .filter_map(|r| {
                            let (sent, i) = position(r)?;
                            Some((sent, i, r))
                        })
                        .min_by_key(|(sent, _, _)| *sent),
                };
                match oldest {
                    Some((_, i, r)) => {
                        r.requests.remove(i);
                    }
                    None => {
                        tracing::debug!(endpoint = %self.id, "dropping an answer to a call request answered already");
                        return;
                    }
                }
            }
            _ => {}
        }
        self.push(msg);
    }

    /// Cluster: another node's `message_received` for the call `call`, encoded there: queued
    /// as it came, under the same rule as [`Endpoint::remote_event`] (dropped for a call this
    /// endpoint never held), without decoding it and encoding it again.
    pub(super) fn remote_frame(&mut self, call: &str, frame: bytes::Bytes) {
        if !self.holds_or_held(call) {
            tracing::debug!(endpoint = %self.id, %call, "dropping an event of a call not held here");
            return;
        }
        self.outbox.push_encoded(frame);
    }

    /// Whether this endpoint holds the call `call`, or ended it not long ago (its late events
    /// still reach the client; those of a call never held here are dropped: ids never leak).
    fn holds_or_held(&self, call: &str) -> bool {
        self.book.calls.contains_key(call) || self.book.ended.iter().any(|(c, _)| c == call)
    }

    /// Cluster: whether the state event numbered `seq` of the leg of `call` is the next one to
    /// pass on (`cluster/src/events.rs`). A repeat is not (its acknowledgement may be what was
    /// lost, so it is acknowledged again), nor is one after a gap (the lost one comes again,
    /// with everything after it), nor one of a call no longer mirrored (it ended here, and its
    /// leg is released).
    fn take_in_order(&mut self, call: &str, seq: u64, ctx: &mut Context<Self>) -> bool {
        let Some(r) = self.book.remote_calls.get_mut(call) else {
            tracing::debug!(endpoint = %self.id, %call, seq, "dropping a state event of a call over here");
            return false;
        };
        let next = seq == r.next_event;
        if next {
            r.next_event += 1;
        } else if seq < r.next_event {
            r.acknowledged = r.acknowledged.min(seq.saturating_sub(1));
            tracing::debug!(endpoint = %self.id, %call, seq, "dropping a state event passed on already");
        } else {
            tracing::debug!(endpoint = %self.id, %call, seq, expected = r.next_event, "a state event came after a gap; waiting for the lost ones");
        }
        if !self.events_seen_armed {
            self.events_seen_armed = true;
            // One acknowledgement for the events of a burst (a call's set-up sends several).
            ctx.run_later(EVENTS_SEEN_DELAY, |act, _| act.acknowledge_events());
        }
        next
    }

    /// Tells each leg's node which of its state events were passed on since the last time.
    fn acknowledge_events(&mut self) {
        self.events_seen_armed = false;
        let Some(link) = &self.ctx.link else {
            return;
        };
        for (call, r) in &mut self.book.remote_calls {
            let upto = r.next_event - 1;
            if upto > r.acknowledged {
                r.acknowledged = upto;
                link.events_seen(&r.node, call, upto);
            }
        }
    }

    /// Cluster: how long a message to a leg on another node waits for its answer before this
    /// endpoint gives it one (408). The leg answers within the ack timeout of receiving it, and
    /// an envelope late by `node_timeout` or more means the nodes are losing each other (and
    /// then the calls end, their messages answered anyway); so past the ack timeout plus two
    /// such delays (there and back), an envelope was lost on the way (core NATS delivers at
    /// most once): the message, its `message_received`, the ack or the answer. Without this
    /// the client would wait forever.
    pub(super) fn remote_answer_timeout(&self) -> Duration {
        let node_timeout = self
            .ctx
            .link
            .as_ref()
            .map_or(Duration::ZERO, |l| l.node_timeout());
        Duration::from_millis(self.ctx.settings.flow.ack_timeout_ms) + 2 * node_timeout
    }

    pub(super) fn arm_answer_sweep(&mut self, after: Duration, ctx: &mut Context<Self>) {
        self.answer_sweep_armed = true;
        ctx.run_later(after, |act, ctx| {
            act.answer_sweep_armed = false;
            act.sweep_remote_answers(ctx);
        });
    }

    /// Fails (408) every message to a leg on another node unanswered for
    /// [`Endpoint::remote_answer_timeout`]; a late answer to one is then dropped, so the
    /// client still gets exactly one. Re-arms for the oldest message left.
    pub(super) fn sweep_remote_answers(&mut self, ctx: &mut Context<Self>) {
        let timeout = self.remote_answer_timeout();
        let now = Instant::now();
        let mut expired = Vec::new();
        let mut expired_requests = Vec::new();
        let mut next: Option<Instant> = None;
        let mut keep = |sent: Instant| {
            let young = now.saturating_duration_since(sent) < timeout;
            if young {
                next = Some(next.map_or(sent, |n: Instant| n.min(sent)));
            }
            young
        };
        for (call, r) in &mut self.book.remote_calls {
            while let Some(&(rid, sent)) = r.messages.front() {
                if keep(sent) {
                    break;
                }
                r.messages.pop_front();
                expired.push((call.clone(), rid));
            }
            while let Some(w) = r.requests.front() {
                if keep(w.sent) {
                    break;
                }
                expired_requests.push(w.rid);
                r.requests.pop_front();
            }
        }
        if !expired.is_empty() || !expired_requests.is_empty() {
            // One line per sweep, not per message: an outage can expire thousands at once.
            tracing::info!(endpoint = %self.id, messages = expired.len(), requests = expired_requests.len(), "no answer from the calls' node; failing messages with 408 and call requests with internal");
        }
        for (call, rid) in expired {
            self.fail_message(rid, call, 408, reasons::REQUEST_TIMEOUT);
        }
        for rid in expired_requests {
            // Lost between the nodes, the request or its answer: whether it was carried out
            // is unknown here, and the call's events will tell.
            self.refuse(rid, Refusal::NoAnswerFromNode);
        }
        if let Some(oldest) = next {
            self.arm_answer_sweep((oldest + timeout).saturating_duration_since(now), ctx);
        }
    }

    /// Cluster: the leg of `call`, on another node, ended for `reason`. Its events arrive
    /// before its end (one connection, in order), so a call still mirrored as not over lost its
    /// last `call_state` events on the way: the client gets them from here, or would show the
    /// call for good.
    pub(super) fn end_mirrored_call(&mut self, call: &str, reason: Reason) {
        let Some(r) = self
            .book
            .remote_calls
            .get_mut(call)
            .filter(|r| !r.state.is_final())
        else {
            return;
        };
        let (state, conversation) = (r.state, r.conversation.clone());
        r.state = confab_protocol::CallState::Terminated;
        tracing::debug!(endpoint = %self.id, %call, "a leg's last events were lost on the way; ending the call here");
        self.push_end_states(call, &conversation, state, reason);
    }

    /// The `call_state` events that take an inbound call from `state` to terminated with
    /// `reason`, as its leg sends them; none when it is there already.
    fn push_end_states(
        &self,
        call: &str,
        conversation: &str,
        state: confab_protocol::CallState,
        reason: Reason,
    ) {
        use confab_protocol::CallState::{Terminated, Terminating};
        if state.is_final() {
            return;
        }
        let steps: &[confab_protocol::CallState] = if state == Terminating {
            &[Terminated]
        } else {
            &[Terminating, Terminated]
        };
        let mut previous = state;
        for next in steps {
            self.push(ServerMsg::CallState {
                call: call.to_owned(),
                conversation: conversation.to_owned(),
                direction: Direction::Inbound,
                state: *next,
                previous,
                reason: Some(reason.clone()),
            });
            previous = *next;
        }
    }

    /// Cluster: run `epoch` of `node` died (None: every other node, for this one). Every call
    /// whose leg lived in that run, or an earlier one, ends here, for the client, as the leg
    /// would have ended it: terminating, terminated, 503 "Node lost"; every message still
    /// waiting gets its `message_failed`.
    pub(super) fn node_lost(&mut self, node: Option<(&str, u64)>, ctx: &mut Context<Self>) {
        let lost: Vec<String> = self
            .book
            .remote_calls
            .iter()
            .filter(|(_, r)| {
                node.is_none_or(|(n, dead)| r.node == n && r.epoch.is_none_or(|e| e <= dead))
            })
            .map(|(c, _)| c.clone())
            .collect();
        for call in lost {
            let Some(r) = self.book.remote_calls.remove(&call) else {
                continue;
            };
            let reason = reasons::node_lost();
            self.answer_requests_of_ended_call(r.requests, false);
            self.fail_waiting(&call, r.messages, 503, &reason.text);
            self.push_end_states(&call, &r.conversation, r.state, reason);
            self.leg_ended(call, r.conversation, false, ctx);
        }
    }
}
