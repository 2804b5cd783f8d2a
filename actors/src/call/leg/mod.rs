//! One call leg: one endpoint's InstantMessagingCall. It runs the shared state machine (every
//! transition becomes a `call_state` event, in order), answers the requests its endpoint
//! forwards, and carries the flow: messages to its peer leg, acks back, delivery reports and
//! composing state. Each caller and each callee endpoint has its own leg, as each SIP user agent
//! has its own dialog.

mod peer;
mod requests;
mod setup;

use actix::prelude::*;
use confab_protocol::sdp::Negotiated;

use crate::call::offer::CallOffer;
use crate::call::unacked::Unacked;
use crate::ids::IdMap;
use confab_protocol::state::transition;
use confab_protocol::{Body, CallEvent, CallState, Direction, Reason, Remote, ServerMsg, Toast};
use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;
use tokio::time::Instant;

use crate::arbiter::{ArbiterMsg, ForkArbiter, ForkTarget};
use crate::context::Ctx;
use crate::metrics as m;
use crate::reasons;
use crate::refusal::Refusal;
use crate::route::{EventSink, LegOwner};

/// Why an endpoint asks its leg to terminate.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum TerminateCause {
    /// `call_terminate`.
    Call,
    /// `conversation_terminate`.
    Conversation,
    /// `bye`: the endpoint ends cleanly.
    Bye,
    /// The node is shutting down.
    Shutdown,
}

/// Everything a leg is told, by its endpoint, its fork arbiter or its peer leg.
#[derive(Message)]
#[rtype(result = "()")]
pub enum LegMsg {
    // From the endpoint: the client's requests on this call.
    Accept {
        rid: Option<u32>,
        sdp: String,
    },
    Decline {
        rid: Option<u32>,
        code: u16,
    },
    Forward {
        rid: Option<u32>,
        to: String,
    },
    Transfer {
        rid: Option<u32>,
        to: String,
    },
    Terminate {
        rid: Option<u32>,
        cause: TerminateCause,
    },
    Message {
        rid: Option<u32>,
        content_type: String,
        body: Body,
    },
    Ack {
        msg: u32,
    },
    Composing {
        active: bool,
    },
    /// The endpoint's connection is gone without a `bye`.
    EndpointLost,
    /// The endpoint forgot this ended leg: nothing more can be addressed to it.
    Release,
    /// Cluster: the node holding this leg's endpoint died.
    NodeLost,

    // From a fork arbiter to the side that placed the call (the caller, or a transferee).
    Ringing,
    Forwarded {
        to: String,
    },
    Answered {
        peer: Addr<CallLeg>,
        remote: Remote,
        sdp: String,
        negotiated: Negotiated,
    },
    Failed {
        reason: Reason,
    },

    // From a fork arbiter to one fork.
    Won {
        peer: Addr<CallLeg>,
        remote: Remote,
    },
    AcceptRefused,
    Cancel {
        reason: Reason,
        elsewhere: bool,
    },
    AutoAcceptNeeded,

    // Between peer legs.
    Deliver {
        msg: u32,
        from: String,
        content_type: String,
        body: Body,
        sender: SharedLegAddr,
    },
    Acked {
        msg: u32,
    },
    Refused {
        msg: u32,
    },
    RemoteComposing {
        active: bool,
    },
    RemoteTerminate {
        reason: Reason,
        /// The leg that ended; ignored unless it is still this leg's peer (after a transfer
        /// the old peer's hang-up must not end the call with the new one).
        from: Addr<CallLeg>,
    },
    StartTransfer {
        to: String,
        transferor: Addr<CallLeg>,
    },
    TransferOutcome {
        result: Result<(), Reason>,
    },
}

/// What a new leg is made of.
pub struct LegInit {
    pub ctx: Ctx,
    pub id: String,
    pub conversation: String,
    pub direction: Direction,
    pub outbox: EventSink,
    pub endpoint: LegOwner,
    /// This leg's own user and endpoint.
    pub local: Remote,
    /// The SDP offer of the call (the caller's, for both legs).
    pub offer: CallOffer,
    pub toast: Option<Toast>,
    /// Outbound: who is called. Inbound: unused.
    pub to: String,
    /// Inbound: the arbiter that forked this leg.
    pub arbiter: Option<Addr<ForkArbiter>>,
    /// The call's message counter, shared by both legs.
    pub counter: Arc<AtomicU32>,
}

struct Peer {
    addr: Addr<CallLeg>,
}

/// A leg's address as every message it sends carries it. In actix both `ctx.address()` and
/// `Addr::clone` allocate two `Arc`s (a new sender with its own parking state); sharing one
/// `Addr` behind an `Arc` makes the per-message copy a reference-count increment. Use it with
/// `do_send` only: its holders share one sender, so a `send` that waits for mailbox room would
/// park them all together.
type SharedLegAddr = Arc<Addr<CallLeg>>;

struct Pending {
    rid: Option<u32>,
    sent: Instant,
}

/// This leg's part in a blind transfer.
enum Transfer {
    /// This leg asked its peer to be transferred and waits for the outcome.
    Transferor,
    /// This leg is being transferred: its arbiter forks the target.
    Transferee {
        arbiter: Addr<ForkArbiter>,
        transferor: Addr<CallLeg>,
    },
}

/// How a leg stands with its endpoint; it only ever moves down this list.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Attachment {
    /// The endpoint holds the leg.
    Held,
    /// The endpoint forgot the leg: nothing more can be addressed to it.
    Released,
    /// The endpoint's connection was lost: it hears nothing more (and released the leg).
    Lost,
    /// Cluster: the endpoint's node died (the other side sees 503 "Node lost").
    NodeLost,
}

/// What a fork arbiter still owes a leg: the leg lives until it has had it, so that the
/// arbiter's last word (a win for a leg that ended meanwhile must hang up the other side) is
/// always handled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ArbiterOwes {
    Nothing,
    /// The leg that placed the call (or a transferee): `Answered` or `Failed`.
    Outcome,
    /// A fork whose client's `call_accept` (this `rid`) waits for `Won`, `AcceptRefused` or
    /// `Cancel`; the accept is answered then.
    Accept {
        rid: Option<u32>,
    },
    /// The same, once the accept was answered already (the leg ended meanwhile).
    Decision,
}

pub struct CallLeg {
    init: LegInit,
    state: CallState,
    peer: Option<Peer>,
    /// Our own SDP once it differs from the call's offer: the answer, for an inbound leg that
    /// accepted (until then, and for an outbound leg, it is the offer, which is not copied).
    own_sdp: Option<String>,
    negotiated: Option<Negotiated>,
    /// Content types already found allowed by `negotiated` (a call usually carries one or two):
    /// checking a media range costs more than the rest of a message's handling in the leg.
    allowed_types: Vec<String>,
    arbiter: Option<Addr<ForkArbiter>>,
    /// Keyed by message number, a call's own counter (hence `IdMap`'s fast hasher).
    pending: IdMap<u32, Pending>,
    /// Messages we delivered to our client and that await its ack, with their sender.
    unacked: Unacked<SharedLegAddr>,
    /// Our own address, made at the first message we send (see [`SharedLegAddr`]) and dropped
    /// when the leg ends, so that it never keeps an ended leg's mailbox open.
    own_addr: Option<SharedLegAddr>,
    transfer: Option<Transfer>,
    ringing_seen: bool,
    /// How the leg stands with its endpoint.
    attachment: Attachment,
    /// What a fork arbiter still owes this leg.
    owed: ArbiterOwes,
    /// Ended because another fork won: a late accept is `answered_elsewhere`.
    ended_elsewhere: bool,
    remote_composing: bool,
    composing_timer: Option<SpawnHandle>,
    /// `pending`'s messages in the order they were sent (so oldest deadline first), for the
    /// sweep; entries already answered are dropped from the front as they surface.
    sent_order: VecDeque<u32>,
    /// One timer for all of `pending`, armed for the oldest one's ack deadline. (A timer per
    /// message cost a timer-wheel entry and a future in the actor's context for each, and the
    /// context polls its futures one by one.)
    ack_sweep: Option<SpawnHandle>,
    created: Instant,
    /// Why it ended, kept for an endpoint on another node: its end is reported again until
    /// released, and each report carries the reason (see `report_end`).
    end_reason: Option<Reason>,
}

impl CallLeg {
    pub fn new(init: LegInit) -> Self {
        let state = init.direction.initial_state();
        let arbiter = init.arbiter.clone();
        let unacked = Unacked::new(
            init.ctx.live().limits.unacked_per_call,
            Duration::from_millis(init.ctx.settings.flow.ack_timeout_ms),
        );
        CallLeg {
            init,
            state,
            peer: None,
            own_sdp: None,
            negotiated: None,
            allowed_types: Vec::new(),
            arbiter,
            pending: IdMap::default(),
            sent_order: VecDeque::new(),
            unacked,
            own_addr: None,
            transfer: None,
            ringing_seen: false,
            attachment: Attachment::Held,
            owed: ArbiterOwes::Nothing,
            ended_elsewhere: false,
            remote_composing: false,
            composing_timer: None,
            ack_sweep: None,
            created: Instant::now(),
            end_reason: None,
        }
    }

    /// False when the event was not sent (see [`EventSink::push`]).
    fn push(&self, msg: ServerMsg) -> bool {
        // A lost endpoint hears nothing more (locally its outbox is closed anyway; a remote one
        // may never have adopted this leg, and must not learn its id).
        if self.attachment >= Attachment::Lost {
            return false;
        }
        self.init.outbox.push(msg)
    }

    fn reply_ok(&self, rid: Option<u32>) {
        self.push(ServerMsg::Ok { rid });
    }

    /// Answers the client's request `rid` with the error its refusal gets.
    fn refuse(&self, rid: Option<u32>, why: Refusal) {
        self.push(why.reply(rid));
    }

    /// Whether this leg counts its client's messages in `confab_messages_total`: a message is
    /// counted once, by the node of the client that gets its answer; for an endpoint on
    /// another node that is the endpoint's node, which alone knows whether the answer arrived
    /// in time (`endpoint/remote.rs`).
    fn counts_messages(&self) -> bool {
        self.init.endpoint.remote_node().is_none()
    }

    fn message_failed(&self, rid: Option<u32>, msg: Option<u32>, code: u16, text: &str) {
        if self.counts_messages() {
            m::message_failed(code);
        }
        self.push(ServerMsg::MessageFailed {
            rid,
            call: self.init.id.clone(),
            msg,
            code,
            text: text.to_owned(),
        });
    }

    /// Applies `event` through the shared state machine and reports the transition.
    fn step(&mut self, event: CallEvent, reason: Option<Reason>) -> bool {
        match transition(self.init.direction, self.state, event) {
            Ok(next) => {
                let previous = self.state;
                self.state = next;
                let hot = m::hot();
                hot.transition(next);
                hot.in_state(previous).decrement(1.0);
                hot.in_state(next).increment(1.0);
                self.push(ServerMsg::CallState {
                    call: self.init.id.clone(),
                    conversation: self.init.conversation.clone(),
                    direction: self.init.direction,
                    state: next,
                    previous,
                    reason,
                });
                true
            }
            Err(e) => {
                tracing::debug!(call = %self.init.id, error = %e, "transition refused");
                false
            }
        }
    }

    /// Ends the leg: terminating then terminated with `reason`, every open message answered,
    /// the peer told (when `peer_reason` is given), the endpoint told, the actor stopped.
    fn end(
        &mut self,
        ctx: &mut Context<Self>,
        event: CallEvent,
        reason: Reason,
        peer_reason: Option<Reason>,
        elsewhere: bool,
    ) {
        if self.state.is_final() || self.state == CallState::Terminating {
            return;
        }
        if !self.step(event, Some(reason.clone())) {
            // The seed has no arrow for this (state, event); end through the local terminate.
            if !self.step(CallEvent::Terminate, Some(reason.clone())) {
                tracing::warn!(call = %self.init.id, state = ?self.state, "cannot terminate");
                return;
            }
        }
        self.step(CallEvent::TerminateCompleted, Some(reason.clone()));
        if reason.code >= 400 && reason.code != 486 && reason.code != 487 {
            tracing::info!(call = %self.init.id, code = reason.code, text = %reason.text, "call ended abnormally");
        }
        m::hot().outcome(reason.code);
        // A call cut by a dead cluster node fails its messages with the node's loss.
        let (code, text) = if reason == reasons::node_lost() {
            (503, "Node lost")
        } else {
            (481, reasons::CALL_DOES_NOT_EXIST)
        };
        if let Some(sweep) = self.ack_sweep.take() {
            ctx.cancel_future(sweep);
        }
        // An ended call's composing notice ends with it: no `remote_composing` after
        // `terminated` (an ended leg may live on until its endpoint releases it).
        if let Some(h) = self.composing_timer.take() {
            ctx.cancel_future(h);
        }
        self.sent_order.clear();
        for (msg, p) in std::mem::take(&mut self.pending) {
            self.message_failed(p.rid, Some(msg), code, text);
        }
        // Our own address may only be held while messages can flow; an ended leg must not keep
        // its mailbox open (that would stop it from ever stopping on its own).
        self.own_addr = None;
        // After a node loss the peer fails these itself, with 503, when it hears of the loss.
        for (msg, sender) in self.unacked.take_all() {
            if self.attachment != Attachment::NodeLost {
                sender.do_send(LegMsg::Refused { msg });
            }
        }
        if let ArbiterOwes::Accept { rid } = self.owed {
            self.owed = ArbiterOwes::Decision;
            if elsewhere {
                self.refuse(rid, Refusal::AnsweredElsewhere);
            } else {
                self.refuse(rid, Refusal::CallOver);
            }
        }
        if let Some(Transfer::Transferee { arbiter, .. }) = self.transfer.take() {
            arbiter.do_send(ArbiterMsg::CallerCancel {
                reason: reasons::request_terminated(),
            });
        }
        if let (Some(peer), Some(r)) = (self.peer.take(), peer_reason) {
            peer.addr.do_send(LegMsg::RemoteTerminate {
                reason: r,
                from: ctx.address(),
            });
        }
        self.ended_elsewhere = elsewhere;
        // The leg stays until its endpoint has forgotten it (`Release`), so requests already on
        // their way to it are still answered; with no endpoint left, nobody can address it.
        if self.attachment != Attachment::NodeLost && self.init.endpoint.connected() {
            if let Some(every) = self.init.endpoint.resend_interval() {
                self.end_reason = Some(reason);
                self.report_end_again(every, 1, ctx);
            }
            self.report_end();
        } else {
            self.release();
        }
    }

    /// Tells the endpoint that this leg ended.
    fn report_end(&self) {
        self.init.endpoint.leg_ended(
            self.init.id.clone(),
            self.init.conversation.clone(),
            self.ended_elsewhere,
            self.end_reason.clone(),
        );
    }

    /// An endpoint on another node: the end is reported again every `every` until its
    /// `Release` comes (core NATS may lose either; see `cluster/src/resend.rs`), or the endpoint's
    /// node is declared dead (which releases the leg), at most `RESEND_ATTEMPTS` times.
    fn report_end_again(&mut self, every: Duration, attempt: u32, ctx: &mut Context<Self>) {
        ctx.run_later(every, move |act, ctx| {
            if act.attachment != Attachment::Held {
                return;
            }
            if act
                .init
                .ctx
                .link
                .as_ref()
                .is_none_or(|l| attempt > l.resend_attempts())
            {
                tracing::warn!(call = %act.init.id, "the endpoint never released its ended leg; giving up");
                act.release();
                act.maybe_stop(ctx);
                return;
            }
            tracing::debug!(call = %act.init.id, attempt, "reporting an unreleased leg's end again");
            metrics::counter!(m::CLUSTER_ENVELOPES_RESENT, "kind" => "leg_ended").increment(1);
            act.report_end();
            act.report_end_again(every, attempt + 1, ctx);
        });
    }

    /// Stops the actor once nothing can reach it any more: ended, forgotten by its endpoint,
    /// and owed nothing by an arbiter (whose last word must still be handled: a win for a leg
    /// that is gone must hang up the other side).
    fn maybe_stop(&mut self, ctx: &mut Context<Self>) {
        if self.state.is_final()
            && self.attachment != Attachment::Held
            && self.owed == ArbiterOwes::Nothing
        {
            ctx.stop();
        }
    }

    /// Whether the client's `call_accept` still waits for the arbiter's word.
    fn accept_pending(&self) -> bool {
        matches!(
            self.owed,
            ArbiterOwes::Accept { .. } | ArbiterOwes::Decision
        )
    }

    /// The endpoint forgot this leg (or nobody is left to).
    fn release(&mut self) {
        self.attachment = self.attachment.max(Attachment::Released);
    }

    /// Refuses a late answer from `peer` (this side cancelled or ended meanwhile): the winner
    /// must not wait for it, so it is hung up, with the reason this leg ended for.
    fn refuse_late_answer(&self, peer: Addr<CallLeg>, ctx: &mut Context<Self>) {
        let reason = match self.attachment {
            Attachment::NodeLost => reasons::node_lost(),
            Attachment::Lost => reasons::endpoint_lost(),
            Attachment::Held | Attachment::Released => reasons::terminated_remotely(),
        };
        peer.do_send(LegMsg::RemoteTerminate {
            reason,
            from: ctx.address(),
        });
    }

    fn established_with(&mut self, peer: Addr<CallLeg>) {
        self.peer = Some(Peer { addr: peer });
    }

    fn can_flow(&self) -> bool {
        matches!(self.state, CallState::Established | CallState::Transferring)
            && self.peer.is_some()
    }

    fn start_arbiter(
        &mut self,
        ctx: &mut Context<Self>,
        to: String,
        toast: Option<Toast>,
        offer: CallOffer,
    ) {
        let target = ForkTarget {
            ctx: self.init.ctx.clone(),
            caller: ctx.address(),
            from: self.init.local.clone(),
            to,
            offer,
            toast,
            counter: self.init.counter.clone(),
        };
        let addr = ForkArbiter::new(target).start();
        self.arbiter = Some(addr);
        self.owed = ArbiterOwes::Outcome;
    }

    /// Our own SDP as an offer (a transferee's new call offers it to the target): the call's
    /// offer itself, shared, unless this leg answered with its own.
    fn own_offer(&self) -> CallOffer {
        match &self.own_sdp {
            Some(sdp) => CallOffer::new(sdp.clone()),
            None => self.init.offer.clone(),
        }
    }

    fn set_negotiated(&mut self, negotiated: Negotiated) {
        self.negotiated = Some(negotiated);
        self.allowed_types.clear();
    }

    /// Whether the negotiated SDP allows messages of `content_type`.
    fn allows(&mut self, content_type: &str) -> bool {
        const REMEMBERED: usize = 4;
        if self.allowed_types.iter().any(|t| t == content_type) {
            return true;
        }
        let allowed = self
            .negotiated
            .as_ref()
            .is_some_and(|n| n.allows(content_type));
        if allowed && self.allowed_types.len() < REMEMBERED {
            self.allowed_types.push(content_type.to_owned());
        }
        allowed
    }

    fn ack_timeout(&self) -> Duration {
        Duration::from_millis(self.init.ctx.settings.flow.ack_timeout_ms)
    }

    fn arm_ack_sweep(&mut self, ctx: &mut Context<Self>, after: Duration) {
        self.ack_sweep = Some(ctx.run_later(after, |act, ctx| {
            act.ack_sweep = None;
            act.expire_unacked(ctx);
        }));
    }

    /// Fails (408) every sent message whose ack deadline has passed, oldest first, and re-arms
    /// the sweep for the next deadline. Work is proportional to what expired, not to what is
    /// pending.
    fn expire_unacked(&mut self, ctx: &mut Context<Self>) {
        let now = Instant::now();
        let timeout = self.ack_timeout();
        while let Some(&msg) = self.sent_order.front() {
            let Some(p) = self.pending.get(&msg) else {
                // Answered already.
                self.sent_order.pop_front();
                continue;
            };
            let deadline = p.sent + timeout;
            if deadline > now {
                self.arm_ack_sweep(ctx, deadline - now);
                return;
            }
            self.sent_order.pop_front();
            if let Some(p) = self.pending.remove(&msg) {
                self.message_failed(p.rid, Some(msg), 408, reasons::REQUEST_TIMEOUT);
            }
        }
    }

    /// Drops answered messages from the front of `sent_order`, and compacts it when answered
    /// ones pile up behind an old unanswered one, so it stays about the size of `pending`.
    fn trim_sent_order(&mut self) {
        while let Some(msg) = self.sent_order.front() {
            if self.pending.contains_key(msg) {
                break;
            }
            self.sent_order.pop_front();
        }
        if self.sent_order.len() > 2 * self.pending.len() + 32 {
            let pending = &self.pending;
            self.sent_order.retain(|msg| pending.contains_key(msg));
        }
    }

    /// The endpoint's connection is gone: a ringing fork is lost to its arbiter, a caller's
    /// pending call is cancelled, an established call's peer sees 408.
    fn endpoint_lost(&mut self, ctx: &mut Context<Self>) {
        let lost = if self.attachment == Attachment::NodeLost {
            reasons::node_lost()
        } else {
            reasons::endpoint_lost()
        };
        match self.state {
            CallState::Incoming => {
                if let Some(a) = self.arbiter.take() {
                    a.do_send(ArbiterMsg::ForkLost {
                        call: self.init.id.clone(),
                    });
                }
                self.end(ctx, CallEvent::Terminate, lost.clone(), None, false);
            }
            CallState::Idle | CallState::Establishing
                if self.init.direction == Direction::Outbound =>
            {
                if let Some(a) = self.arbiter.take() {
                    a.do_send(ArbiterMsg::CallerCancel {
                        reason: lost.clone(),
                    });
                }
                self.end(ctx, CallEvent::Terminate, lost.clone(), None, false);
            }
            _ => self.end(
                ctx,
                CallEvent::Terminate,
                lost.clone(),
                Some(lost.clone()),
                false,
            ),
        }
    }

    fn set_remote_composing(&mut self, active: bool) {
        if self.remote_composing != active {
            let sent = self.push(ServerMsg::RemoteComposing {
                call: self.init.id.clone(),
                active,
            });
            // An `active:true` not sent (over the bound for another node) leaves the notice
            // off, so no `active:false` follows it: that one is never dropped, and a client
            // toggling its composing notice could otherwise queue one per toggle.
            if sent || !active {
                self.remote_composing = active;
            }
        }
    }
}

impl Actor for CallLeg {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        m::hot().calls.increment(1.0);
        self.init.ctx.count_leg(true);
        if let (Some(node), Some(link)) = (self.init.endpoint.remote_node(), &self.init.ctx.link) {
            link.register_leg(&self.init.id, node, ctx.address());
        }
        m::hot().in_state(self.state).increment(1.0);
        if self.init.direction == Direction::Inbound {
            return;
        }
        self.step(CallEvent::Establish, None);
        // Parsed once here; every fork's accept reuses it.
        match self.init.offer.media() {
            Ok(_) => {
                let to = self.init.to.clone();
                let toast = self.init.toast.clone();
                let offer = self.init.offer.clone();
                self.start_arbiter(ctx, to, toast, offer);
            }
            Err(_) => self.end(
                ctx,
                CallEvent::EstablishFailed,
                reasons::not_acceptable_here(),
                None,
                false,
            ),
        }
    }

    fn stopped(&mut self, _: &mut Context<Self>) {
        m::hot().calls.decrement(1.0);
        self.init.ctx.count_leg(false);
        if self.init.endpoint.remote_node().is_some()
            && let Some(link) = &self.init.ctx.link
        {
            link.forget_leg(&self.init.id);
        }
        m::hot().in_state(self.state).decrement(1.0);
    }
}

impl Handler<LegMsg> for CallLeg {
    type Result = ();

    fn handle(&mut self, msg: LegMsg, ctx: &mut Context<Self>) {
        self.dispatch(msg, ctx);
        self.maybe_stop(ctx);
    }
}

impl CallLeg {
    /// Each message to its handler: the endpoint's requests in `requests.rs`, the arbiter's
    /// word in `setup.rs`, the peer leg's in `peer.rs`.
    fn dispatch(&mut self, msg: LegMsg, ctx: &mut Context<Self>) {
        match msg {
            LegMsg::Accept { rid, sdp } => self.on_accept(rid, sdp),
            LegMsg::Decline { rid, code } => self.on_decline(rid, code, ctx),
            LegMsg::Forward { rid, to } => self.on_forward(rid, to, ctx),
            LegMsg::Transfer { rid, to } => self.on_transfer(rid, to, ctx),
            LegMsg::Terminate { rid, cause } => self.on_terminate(rid, cause, ctx),
            LegMsg::Message {
                rid,
                content_type,
                body,
            } => self.on_message(rid, content_type, body, ctx),
            LegMsg::Ack { msg } => self.on_ack(msg),
            LegMsg::Composing { active } => self.on_composing(active),
            LegMsg::EndpointLost => self.on_endpoint_lost(ctx),
            LegMsg::Release => self.release(),
            LegMsg::NodeLost => self.on_node_lost(ctx),

            LegMsg::Ringing => self.on_ringing(),
            LegMsg::Forwarded { to } => self.on_forwarded(to),
            LegMsg::Answered {
                peer,
                remote,
                sdp,
                negotiated,
            } => self.on_answered(peer, remote, sdp, negotiated, ctx),
            LegMsg::Failed { reason } => self.on_failed(reason, ctx),

            LegMsg::Won { peer, remote } => self.on_won(peer, remote, ctx),
            LegMsg::AcceptRefused => self.on_accept_refused(),
            LegMsg::Cancel { reason, elsewhere } => self.on_cancel(reason, elsewhere, ctx),
            LegMsg::AutoAcceptNeeded => self.on_auto_accept_needed(),

            LegMsg::Deliver {
                msg,
                from,
                content_type,
                body,
                sender,
            } => self.on_deliver(msg, from, content_type, body, sender, ctx),
            LegMsg::Acked { msg } => self.on_acked(msg),
            LegMsg::Refused { msg } => self.on_refused(msg),
            LegMsg::RemoteComposing { active } => self.on_remote_composing(active, ctx),
            LegMsg::RemoteTerminate { reason, from } => self.on_remote_terminate(reason, from, ctx),
            LegMsg::StartTransfer { to, transferor } => self.on_start_transfer(to, transferor, ctx),
            LegMsg::TransferOutcome { result } => self.on_transfer_outcome(result, ctx),
        }
    }
}
