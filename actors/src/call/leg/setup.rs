//! What a fork arbiter tells a leg while the call is being set up: to the side that placed
//! the call (the caller, or a transferee) how its forks fare, and to each fork whether it won.

use super::*;

impl CallLeg {
    /// A fork is ringing: the caller's `call_ringing` (and the state's, once).
    pub(super) fn on_ringing(&mut self) {
        if self.transfer.is_some() || self.state != CallState::Establishing {
            return;
        }
        self.push(ServerMsg::CallRinging {
            call: self.init.id.clone(),
        });
        if !self.ringing_seen {
            self.ringing_seen = true;
            self.step(CallEvent::Ringing, None);
        }
    }

    /// A fork forwarded the call.
    pub(super) fn on_forwarded(&mut self, to: String) {
        if self.transfer.is_none() && self.state == CallState::Establishing {
            self.push(ServerMsg::CallForwarded {
                call: self.init.id.clone(),
                to,
            });
        }
    }

    /// A fork answered: established with it (or, for a transferee, with the transfer's target).
    pub(super) fn on_answered(
        &mut self,
        peer: Addr<CallLeg>,
        remote: Remote,
        sdp: String,
        negotiated: Negotiated,
        ctx: &mut Context<Self>,
    ) {
        self.owed = ArbiterOwes::Nothing;
        if let Some(Transfer::Transferee { transferor, .. }) = self.transfer.take() {
            // The transfer target answered: talk to it from now on; the transferor's
            // leg ends with 202 and must not see a remote terminate.
            self.set_negotiated(negotiated);
            self.peer = Some(Peer { addr: peer });
            self.push(ServerMsg::CallTransferred {
                call: self.init.id.clone(),
                remote,
            });
            transferor.do_send(LegMsg::TransferOutcome { result: Ok(()) });
            return;
        }
        self.arbiter = None;
        if self.state != CallState::Establishing {
            // We cancelled meanwhile.
            return self.refuse_late_answer(peer, ctx);
        }
        self.set_negotiated(negotiated);
        self.established_with(peer);
        self.step(CallEvent::Established, None);
        m::hot()
            .call_setup
            .record(self.created.elapsed().as_secs_f64());
        self.push(ServerMsg::CallEstablished {
            call: self.init.id.clone(),
            sdp,
            remote,
        });
    }

    /// No fork answered (or the transfer's new call failed).
    pub(super) fn on_failed(&mut self, reason: Reason, ctx: &mut Context<Self>) {
        self.owed = ArbiterOwes::Nothing;
        if let Some(Transfer::Transferee { transferor, .. }) = self.transfer.take() {
            transferor.do_send(LegMsg::TransferOutcome {
                result: Err(reason),
            });
            return;
        }
        self.arbiter = None;
        self.end(ctx, CallEvent::EstablishFailed, reason, None, false);
    }

    /// This fork's accept won the call.
    pub(super) fn on_won(&mut self, peer: Addr<CallLeg>, remote: Remote, ctx: &mut Context<Self>) {
        self.arbiter = None;
        let owed = std::mem::replace(&mut self.owed, ArbiterOwes::Nothing);
        if self.state != CallState::Incoming {
            return self.refuse_late_answer(peer, ctx);
        }
        let rid = match owed {
            ArbiterOwes::Accept { rid } => rid,
            _ => None,
        };
        self.reply_ok(rid);
        self.step(CallEvent::Accept, None);
        self.established_with(peer);
        self.step(CallEvent::Established, None);
        self.push(ServerMsg::CallEstablished {
            call: self.init.id.clone(),
            sdp: self.init.offer.sdp().to_owned(),
            remote: remote.clone(),
        });
        if let Some(toast) = self.init.toast.take() {
            self.push(ServerMsg::MessageReceived {
                call: self.init.id.clone(),
                msg: 1,
                from: remote.user,
                content_type: toast.content_type,
                body: toast.body,
                toast: Some(true),
            });
        }
    }

    /// This fork's accept lost to another fork.
    pub(super) fn on_accept_refused(&mut self) {
        if let ArbiterOwes::Accept { rid } = std::mem::replace(&mut self.owed, ArbiterOwes::Nothing)
        {
            self.refuse(rid, Refusal::AnsweredElsewhere);
        }
    }

    /// The call was decided without this fork, or its caller cancelled.
    pub(super) fn on_cancel(&mut self, reason: Reason, elsewhere: bool, ctx: &mut Context<Self>) {
        self.arbiter = None;
        // Its accept, if any, is answered as the leg ends: the cancel was the arbiter's word.
        self.end(ctx, CallEvent::RemoteCancel, reason, None, elsewhere);
        if matches!(
            self.owed,
            ArbiterOwes::Accept { .. } | ArbiterOwes::Decision
        ) {
            self.owed = ArbiterOwes::Nothing;
        }
    }

    /// The toast timeout chose this fork: its client is asked to accept.
    pub(super) fn on_auto_accept_needed(&mut self) {
        if self.state == CallState::Incoming {
            self.push(ServerMsg::AutoAcceptNeeded {
                call: self.init.id.clone(),
            });
        }
    }
}
