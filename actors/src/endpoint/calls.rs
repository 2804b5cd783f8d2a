//! An endpoint's calls: placing one, taking a fork an arbiter offers it, passing a call
//! request to the leg it names (or answering for a leg it does not hold), and forgetting a
//! leg once it ended.

use actix::prelude::*;
use confab_protocol::uri::normalize_user_uri;
use confab_protocol::{Direction, ServerMsg, Toast};
use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::AtomicU32;
use tokio::time::Instant;

use super::remote::{RemoteCall, RequestKind, WaitingRequest};
use super::{EndState, Endpoint, REMEMBERED_ENDED_CALLS};
use crate::arbiter::{ArbiterMsg, ForkArbiter};
use crate::call::conversation::{Conversation, ConversationMsg};
use crate::call::leg::{CallLeg, LegInit, LegMsg, TerminateCause};
use crate::call::offer::CallOffer;
use crate::metrics as m;
use crate::reasons;
use crate::refusal::Refusal;
use crate::route::{EventSink, LegOwner, LegRef};

/// A fork of a call offered to this endpoint by an arbiter. If it is dropped unhandled (the
/// endpoint is gone), the arbiter hears that the fork is lost, so it never waits for it.
pub struct ForkOffer {
    arbiter: Addr<ForkArbiter>,
    call: String,
    conversation: String,
    from: String,
    offer: CallOffer,
    toast: Option<Toast>,
    immediate: bool,
    counter: Arc<AtomicU32>,
    handled: bool,
}

impl ForkOffer {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        arbiter: Addr<ForkArbiter>,
        call: String,
        conversation: String,
        from: String,
        offer: CallOffer,
        toast: Option<Toast>,
        immediate: bool,
        counter: Arc<AtomicU32>,
    ) -> Self {
        ForkOffer {
            arbiter,
            call,
            conversation,
            from,
            offer,
            toast,
            immediate,
            counter,
            handled: false,
        }
    }
}

impl Drop for ForkOffer {
    fn drop(&mut self) {
        if !self.handled {
            self.arbiter.do_send(ArbiterMsg::ForkLost {
                call: std::mem::take(&mut self.call),
            });
        }
    }
}

impl Endpoint {
    /// A call request for a leg on another node that was not sent: too many requests already
    /// wait for that node (`cluster.max_queued_envelopes` or `max_queued_bytes`). The client
    /// may try again.
    pub(super) fn not_sent(&self, rid: Option<u32>) {
        self.refuse(rid, Refusal::RequestsWaitingForNode);
    }

    /// Sends a call request (`msg`, whose `rid` is `rid`) to the leg held under `call`, or
    /// answers that there is none. For a leg on another node the request waits here for its
    /// answer (see [`RemoteCall::requests`]); one that cannot be sent (too many requests wait
    /// for that node) is refused at once.
    pub(super) fn send_call_request(
        &mut self,
        call: &str,
        rid: Option<u32>,
        msg: LegMsg,
        ctx: &mut Context<Self>,
    ) {
        let kind = match msg {
            LegMsg::Terminate { .. } => RequestKind::Terminate,
            LegMsg::Accept { .. } => RequestKind::Accept,
            _ => RequestKind::Other,
        };
        let waiting = || WaitingRequest {
            rid,
            sent: Instant::now(),
            kind,
        };
        match self.send_awaiting_answer(call, msg, |r| &mut r.requests, waiting, ctx) {
            Some(true) => {}
            Some(false) => self.not_sent(rid),
            // Not held: `leg` answers `unknown_call`, or `invalid_state` for a call just over.
            None => drop(self.leg(rid, call)),
        }
    }

    /// Sends `msg` to the leg this endpoint holds under `call`. For a leg on another node,
    /// `entry()` first joins the `waiting` list of what awaits an answer from that node (the
    /// deadline sweep armed), and leaves it again if the message could not be sent. Whether
    /// it was sent, or `None` when this endpoint holds no such call.
    pub(super) fn send_awaiting_answer<T>(
        &mut self,
        call: &str,
        msg: LegMsg,
        waiting: fn(&mut RemoteCall) -> &mut VecDeque<T>,
        entry: impl FnOnce() -> T,
        ctx: &mut Context<Self>,
    ) -> Option<bool> {
        // No book, no call: `?` before a write, which would make one.
        let book = self.book.written()?;
        let (leg, _) = book.calls.get(call)?;
        let remote = match book.remote_calls.get_mut(call) {
            Some(r) => {
                waiting(r).push_back(entry());
                true
            }
            None => false,
        };
        if !leg.do_send(msg) {
            if let Some(r) = self.book.remote_calls.get_mut(call) {
                waiting(r).pop_back();
            }
            return Some(false);
        }
        if remote && !self.answer_sweep_armed {
            self.arm_answer_sweep(self.remote_answer_timeout(), ctx);
        }
        Some(true)
    }

    /// The leg this endpoint holds under `call`, or the error reply for a call it does not hold.
    pub(super) fn leg(&self, rid: Option<u32>, call: &str) -> Option<LegRef> {
        if let Some((leg, _)) = self.book.calls.get(call) {
            return Some(leg.clone());
        }
        if self.book.ended.iter().any(|(c, _)| c == call) {
            self.refuse(rid, Refusal::CallOver);
        } else {
            self.refuse(rid, Refusal::UnknownCall);
        }
        None
    }

    /// Holds `call` (its `leg`) in `conversation`: a new conversation's actor starts with the
    /// call already in it, so the common case (one call per conversation) sends it nothing.
    pub(super) fn add_call(&mut self, call: String, leg: LegRef, conversation: String) {
        match self.book.conversations.get_mut(&conversation) {
            Some((conv, count)) => {
                *count += 1;
                conv.do_send(ConversationMsg::Add {
                    call: call.clone(),
                    leg: leg.clone(),
                });
            }
            None => {
                let conv = Conversation::with(call.clone(), leg.clone()).start();
                self.book
                    .conversations
                    .insert(conversation.clone(), (conv, 1));
            }
        }
        self.book.calls.insert(call, (leg, conversation));
    }

    /// `call_accept`: to the leg, or `answered_elsewhere` for a call another fork won.
    pub(super) fn accept(
        &mut self,
        rid: Option<u32>,
        call: String,
        sdp: String,
        ctx: &mut Context<Self>,
    ) {
        if self.book.calls.contains_key(&call) {
            self.send_call_request(&call, rid, LegMsg::Accept { rid, sdp }, ctx);
        } else if self
            .book
            .ended
            .iter()
            .any(|(c, elsewhere)| *c == call && *elsewhere)
        {
            self.refuse(rid, Refusal::AnsweredElsewhere);
        } else {
            self.leg(rid, &call);
        }
    }

    pub(super) fn decline(
        &mut self,
        rid: Option<u32>,
        call: String,
        code: Option<u16>,
        ctx: &mut Context<Self>,
    ) {
        let code = code.unwrap_or(486);
        if !(400..=699).contains(&code) {
            return self.refuse(rid, Refusal::DeclineCode);
        }
        self.send_call_request(&call, rid, LegMsg::Decline { rid, code }, ctx);
    }

    /// `call_forward` and `call_transfer`: the target checked, then the request (made by
    /// `request` from the `rid` and the normalised target) to the leg.
    pub(super) fn redirect(
        &mut self,
        rid: Option<u32>,
        call: String,
        to: String,
        request: fn(Option<u32>, String) -> LegMsg,
        ctx: &mut Context<Self>,
    ) {
        let Ok(to) = normalize_user_uri(&to) else {
            return self.refuse(rid, Refusal::ToNotSipUri);
        };
        self.send_call_request(&call, rid, request(rid, to), ctx);
    }

    pub(super) fn terminate(&mut self, rid: Option<u32>, call: String, ctx: &mut Context<Self>) {
        if self.book.calls.contains_key(&call) {
            let terminate = LegMsg::Terminate {
                rid,
                cause: TerminateCause::Call,
            };
            self.send_call_request(&call, rid, terminate, ctx);
        } else if self.book.ended.iter().any(|(c, _)| *c == call) {
            // Terminating a call that already ended is not an error.
            self.push(ServerMsg::Ok { rid });
        } else {
            self.refuse(rid, Refusal::UnknownCall);
        }
    }

    pub(super) fn terminate_conversation(&mut self, rid: Option<u32>, conversation: String) {
        match self.book.conversations.get(&conversation) {
            Some((conv, _)) => {
                self.push(ServerMsg::Ok { rid });
                conv.do_send(ConversationMsg::Terminate);
            }
            None => self.refuse(rid, Refusal::UnknownConversation),
        }
    }

    pub(super) fn establish(
        &mut self,
        rid: Option<u32>,
        to: String,
        conversation: Option<String>,
        toast: Option<Toast>,
        sdp: String,
        ctx: &mut Context<Self>,
    ) {
        let Ok(to) = normalize_user_uri(&to) else {
            return self.refuse(rid, Refusal::ToNotSipUri);
        };
        if let Some(t) = &toast
            && let Err(why) = self.check_content(&t.content_type, &t.body)
        {
            return self.refuse(rid, Refusal::BadContent(why));
        }
        if self.book.calls.len() >= self.ctx.live().limits.calls_per_endpoint {
            m::limit_tripped("calls_per_endpoint");
            return self.refuse(rid, Refusal::TooManyCalls);
        }
        let conversation = match conversation {
            Some(c) if self.book.conversations.contains_key(&c) => c,
            Some(_) => {
                return self.refuse(rid, Refusal::UnknownConversation);
            }
            // Started with the call, in `add_call`.
            None => self.ctx.ids.mint('v'),
        };
        let call = self.ctx.ids.mint('c');
        // The reply goes out before the leg exists, so it precedes the leg's first event.
        self.push(ServerMsg::CallCreated {
            rid,
            call: call.clone(),
            conversation: conversation.clone(),
        });
        let counter = Arc::new(AtomicU32::new(u32::from(toast.is_some())));
        let leg = CallLeg::new(LegInit {
            ctx: self.ctx.clone(),
            id: call.clone(),
            conversation: conversation.clone(),
            direction: Direction::Outbound,
            outbox: EventSink::Local(self.outbox.clone()),
            endpoint: LegOwner::Local(ctx.address()),
            local: self.local(),
            offer: CallOffer::new(sdp),
            toast,
            to,
            arbiter: None,
            counter,
        })
        .start();
        self.add_call(call, LegRef::Local(leg), conversation);
    }

    pub(super) fn adopt_fork(&mut self, mut offer: ForkOffer, ctx: &mut Context<Self>) {
        // Dropping the offer (returning early) tells the arbiter this fork is lost.
        if self.ending() {
            if self.end_state == EndState::ShuttingDown {
                offer.handled = true;
                offer.arbiter.do_send(ArbiterMsg::Declined {
                    call: offer.call.clone(),
                    reason: reasons::shutting_down(),
                });
            }
            return;
        }
        if self.book.calls.len() >= self.ctx.live().limits.calls_per_endpoint {
            m::limit_tripped("calls_per_endpoint");
            return;
        }
        offer.handled = true;
        // Handled: the offer's own strings move out (its drop no longer reads them).
        let call = std::mem::take(&mut offer.call);
        let conversation = std::mem::take(&mut offer.conversation);
        let toast = offer.toast.take();
        let leg = CallLeg::new(LegInit {
            ctx: self.ctx.clone(),
            id: call.clone(),
            conversation: conversation.clone(),
            direction: Direction::Inbound,
            outbox: EventSink::Local(self.outbox.clone()),
            endpoint: LegOwner::Local(ctx.address()),
            local: self.local(),
            offer: offer.offer.clone(),
            toast: toast.clone(),
            to: String::new(),
            arbiter: Some(offer.arbiter.clone()),
            counter: offer.counter.clone(),
        })
        .start();
        self.push(ServerMsg::CallIncoming {
            call: call.clone(),
            conversation: conversation.clone(),
            from: std::mem::take(&mut offer.from),
            toast,
            sdp: offer.offer.sdp().to_owned(),
            immediate_auto_accept: offer.immediate,
        });
        offer.arbiter.do_send(ArbiterMsg::ForkReady {
            call: call.clone(),
            leg: leg.clone(),
        });
        self.add_call(call, LegRef::Local(leg), conversation);
    }

    /// Forgets an ended leg (and releases it), remembering its id for late requests.
    pub(super) fn leg_ended(
        &mut self,
        call: String,
        conversation: String,
        elsewhere: bool,
        ctx: &mut Context<Self>,
    ) {
        let held = self.book.calls.remove(&call);
        let was_held = held.is_some();
        match held {
            Some((leg, _))
                if leg.remote_node().is_none() || self.book.remote_calls.contains_key(&call) =>
            {
                leg.do_send(LegMsg::Release);
            }
            Some(_) => {}
            // Cluster: a leg made for this endpoint that it never held (the `Adopt` offering
            // it was lost on the way) still needs its release, or it would stay for good.
            None => {
                if let Some(link) = &self.ctx.link {
                    link.release_leg(call.clone(), self.id.to_string());
                }
            }
        }
        if let Some(r) = self.book.remote_calls.remove(&call) {
            // The leg answered every message and request it had before it reported its end (in
            // order, on one connection): one still waiting was lost on the way, or crossed the
            // end.
            self.answer_all_waiting(&call, r, 481, reasons::CALL_DOES_NOT_EXIST, elsewhere);
        }
        // A leg on another node reports its end again until released (`cluster/src/resend.rs`):
        // one call is remembered once, or its repeats would push other calls out.
        if was_held || !self.book.ended.iter().any(|(c, _)| *c == call) {
            self.book.ended.push_back((call.clone(), elsewhere));
            if self.book.ended.len() > REMEMBERED_ENDED_CALLS {
                self.book.ended.pop_front();
            }
        }
        // Only a call held until now leaves its conversation: a second report of the same end
        // (a node loss, then the leg's own late `LegEnded`) must not end a conversation that
        // still holds other calls.
        if was_held && let Some((conv, count)) = self.book.conversations.get_mut(&conversation) {
            *count = count.saturating_sub(1);
            if *count == 0 {
                // Its last call: dropping the only address stops the actor (actix stops an
                // actor whose addresses are all gone), so it needs no message.
                self.book.conversations.remove(&conversation);
            } else {
                conv.do_send(ConversationMsg::Remove { call });
            }
        }
        if self.closing
            && !self
                .book
                .calls
                .values()
                .any(|(l, _)| l.remote_node().is_some())
        {
            self.closing = false;
            self.outbox.close();
            ctx.stop();
        }
    }
}
