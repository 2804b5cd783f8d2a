//! What the two legs of an established call tell each other: messages and their acks,
//! composing, the hang-up, and a transfer's new call and its outcome.

use super::*;

impl CallLeg {
    /// A message from the peer leg for this leg's client.
    pub(super) fn on_deliver(
        &mut self,
        msg: u32,
        from: String,
        content_type: String,
        body: Body,
        sender: SharedLegAddr,
        ctx: &mut Context<Self>,
    ) {
        // A message from a leg that is no longer the peer (sent by a transferor just
        // before the transfer took its place) is refused: its sender has already
        // answered it 481, so the client must not get it either.
        let from_peer = self.peer.as_ref().is_some_and(|p| p.addr == *sender);
        if !self.can_flow() || !from_peer {
            sender.do_send(LegMsg::Refused { msg });
            return;
        }
        if let Some(h) = self.composing_timer.take() {
            ctx.cancel_future(h);
        }
        self.set_remote_composing(false);
        self.unacked.insert(msg, sender, Instant::now());
        self.push(ServerMsg::MessageReceived {
            call: self.init.id.clone(),
            msg,
            from,
            content_type,
            body,
            toast: None,
        });
    }

    /// The peer's client acked a message this leg sent.
    pub(super) fn on_acked(&mut self, msg: u32) {
        if let Some(p) = self.pending.remove(&msg) {
            self.trim_sent_order();
            if self.counts_messages() {
                m::hot().messages_delivered.increment(1);
            }
            m::hot()
                .message_delivery
                .record(p.sent.elapsed().as_secs_f64());
            self.push(ServerMsg::MessageDelivered {
                rid: p.rid,
                call: self.init.id.clone(),
                msg,
            });
        }
    }

    /// The peer refused a message this leg sent (the call is over for it).
    pub(super) fn on_refused(&mut self, msg: u32) {
        if let Some(p) = self.pending.remove(&msg) {
            self.trim_sent_order();
            self.message_failed(p.rid, Some(msg), 481, reasons::CALL_DOES_NOT_EXIST);
        }
    }

    /// The peer's client is (or stopped) composing.
    pub(super) fn on_remote_composing(&mut self, active: bool, ctx: &mut Context<Self>) {
        if !self.can_flow() {
            return;
        }
        if let Some(h) = self.composing_timer.take() {
            ctx.cancel_future(h);
        }
        self.set_remote_composing(active);
        if active {
            let idle = Duration::from_millis(self.init.ctx.settings.flow.composing_timeout_ms);
            self.composing_timer = Some(ctx.run_later(idle, |act, _| {
                act.composing_timer = None;
                act.set_remote_composing(false);
            }));
        }
    }

    /// The peer leg ended.
    pub(super) fn on_remote_terminate(
        &mut self,
        reason: Reason,
        from: Addr<CallLeg>,
        ctx: &mut Context<Self>,
    ) {
        if self.peer.as_ref().is_some_and(|p| p.addr != from) {
            return;
        }
        let event = if self.state == CallState::Established {
            CallEvent::RemoteTerminate
        } else {
            CallEvent::Terminate
        };
        self.peer = None;
        self.end(ctx, event, reason, None, false);
    }

    /// The peer asks this leg to place a call to `to` in its place (a transfer).
    pub(super) fn on_start_transfer(
        &mut self,
        to: String,
        transferor: Addr<CallLeg>,
        ctx: &mut Context<Self>,
    ) {
        if self.state != CallState::Established || self.transfer.is_some() {
            transferor.do_send(LegMsg::TransferOutcome {
                result: Err(reasons::transfer_pending()),
            });
            return;
        }
        let target = ForkTarget {
            ctx: self.init.ctx.clone(),
            caller: ctx.address(),
            from: self.init.local.clone(),
            to,
            offer: self.own_offer(),
            toast: None,
            counter: self.init.counter.clone(),
        };
        let arbiter = ForkArbiter::new(target).start();
        self.owed = ArbiterOwes::Outcome;
        self.transfer = Some(Transfer::Transferee {
            arbiter,
            transferor,
        });
    }

    /// The outcome of the transfer this leg asked its peer for.
    pub(super) fn on_transfer_outcome(
        &mut self,
        result: Result<(), Reason>,
        ctx: &mut Context<Self>,
    ) {
        if !matches!(self.transfer, Some(Transfer::Transferor))
            || self.state != CallState::Transferring
        {
            return;
        }
        self.transfer = None;
        match result {
            Ok(()) => {
                // The peer now talks to the target; it must not see us terminate.
                self.peer = None;
                self.end(
                    ctx,
                    CallEvent::TransferSucceeded,
                    reasons::transferred(),
                    None,
                    false,
                );
            }
            Err(reason) => {
                self.step(CallEvent::TransferFailed, Some(reason));
            }
        }
    }
}
