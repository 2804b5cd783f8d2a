//! A leg's part in its client's requests, as its endpoint passes them on: accepting,
//! declining, forwarding, transferring and terminating the call, its messages, acks and
//! composing, and the endpoint's loss.

use super::*;

impl CallLeg {
    /// `call_terminate`, or the endpoint ending its calls (a conversation's terminate, `bye`,
    /// a shutdown).
    pub(super) fn on_terminate(
        &mut self,
        rid: Option<u32>,
        cause: TerminateCause,
        ctx: &mut Context<Self>,
    ) {
        // Only `call_terminate` is a request of its own; a conversation's, a bye's or a
        // shutdown's terminate was already answered by the endpoint.
        if cause == TerminateCause::Call {
            self.reply_ok(rid);
        }
        let event = if cause == TerminateCause::Conversation {
            CallEvent::ConversationTerminate
        } else {
            CallEvent::Terminate
        };
        let (own, peer) = if cause == TerminateCause::Shutdown {
            (reasons::shutting_down(), reasons::shutting_down())
        } else {
            (
                reasons::terminated_locally(),
                reasons::terminated_remotely(),
            )
        };
        match self.state {
            CallState::Incoming => {
                // Terminating a ringing fork is a 486 decline of this endpoint only.
                if cause == TerminateCause::Shutdown {
                    self.decline(reasons::shutting_down(), ctx);
                } else {
                    self.decline(reasons::declined(486), ctx);
                }
            }
            CallState::Idle | CallState::Establishing
                if self.init.direction == Direction::Outbound =>
            {
                if let Some(a) = self.arbiter.take() {
                    let reason = if cause == TerminateCause::Shutdown {
                        reasons::shutting_down()
                    } else {
                        reasons::request_terminated()
                    };
                    a.do_send(ArbiterMsg::CallerCancel { reason });
                }
                self.end(ctx, event, own, None, false);
            }
            CallState::Established | CallState::Transferring | CallState::Establishing => {
                self.end(ctx, event, own, Some(peer), false);
            }
            CallState::Idle | CallState::Terminating | CallState::Terminated => {}
        }
    }

    /// Ends a ringing fork declined (by its client, or by the endpoint for it).
    pub(super) fn decline(&mut self, reason: Reason, ctx: &mut Context<Self>) {
        if let Some(a) = self.arbiter.take() {
            a.do_send(ArbiterMsg::Declined {
                call: self.init.id.clone(),
                reason: reason.clone(),
            });
        }
        self.end(ctx, CallEvent::Decline, reason, None, false);
    }

    /// The client's `message`: passed to the peer leg, and answered when its ack (or none)
    /// comes back.
    pub(super) fn on_message(
        &mut self,
        rid: Option<u32>,
        content_type: String,
        body: Body,
        ctx: &mut Context<Self>,
    ) {
        if self.peer.is_none() || !self.can_flow() {
            return self.message_failed(rid, None, 481, reasons::CALL_DOES_NOT_EXIST);
        }
        if !self.allows(&content_type) {
            return self.message_failed(rid, None, 415, "Unsupported Media Type");
        }
        let negotiated = self.negotiated.as_ref();
        let max = negotiated.and_then(|n| n.max_size).map_or(
            self.init.ctx.settings.flow.max_message_bytes,
            |s| {
                (s.min(usize::MAX as u64) as usize)
                    .min(self.init.ctx.settings.flow.max_message_bytes)
            },
        );
        if body.len() > max {
            return self.message_failed(rid, None, 413, "Request Entity Too Large");
        }
        if self.pending.len() >= self.init.ctx.live().limits.unacked_per_call {
            m::limit_tripped("unacked_per_call");
            return self.message_failed(rid, None, 503, "Too many unacknowledged messages");
        }
        let Some(peer) = self.peer.as_ref() else {
            return self.message_failed(rid, None, 481, reasons::CALL_DOES_NOT_EXIST);
        };
        let msg = self.init.counter.fetch_add(1, Ordering::Relaxed) + 1;
        let sender = self
            .own_addr
            .get_or_insert_with(|| Arc::new(ctx.address()))
            .clone();
        peer.addr.do_send(LegMsg::Deliver {
            msg,
            from: self.init.local.user.clone(),
            content_type,
            body,
            sender,
        });
        self.pending.insert(
            msg,
            Pending {
                rid,
                sent: Instant::now(),
            },
        );
        self.sent_order.push_back(msg);
        if self.ack_sweep.is_none() {
            self.arm_ack_sweep(ctx, self.ack_timeout());
        }
    }

    /// The client's `call_accept`: asks the arbiter, which answers `Won` or `AcceptRefused`.
    pub(super) fn on_accept(&mut self, rid: Option<u32>, sdp: String) {
        if self.ended_elsewhere {
            return self.refuse(rid, Refusal::AnsweredElsewhere);
        }
        if self.state != CallState::Incoming || self.accept_pending() {
            return self.refuse(rid, Refusal::NotRinging);
        }
        let negotiated = match self.init.offer.negotiate(&sdp) {
            Ok(n) => n,
            Err(e) => {
                return self.refuse(rid, Refusal::SdpNotAcceptable(e.to_string()));
            }
        };
        let Some(arbiter) = self.arbiter.clone() else {
            return self.refuse(rid, Refusal::NotRinging);
        };
        self.owed = ArbiterOwes::Accept { rid };
        self.own_sdp = Some(sdp.clone());
        self.set_negotiated(negotiated.clone());
        arbiter.do_send(ArbiterMsg::AcceptRequest {
            call: self.init.id.clone(),
            sdp,
            negotiated,
        });
    }

    /// The client's `call_decline` of a ringing call.
    pub(super) fn on_decline(&mut self, rid: Option<u32>, code: u16, ctx: &mut Context<Self>) {
        if self.state != CallState::Incoming {
            return self.refuse(rid, Refusal::NotRinging);
        }
        self.reply_ok(rid);
        self.decline(reasons::declined(code), ctx);
    }

    /// The client's `call_forward` of a ringing call: the arbiter rings the new target.
    pub(super) fn on_forward(&mut self, rid: Option<u32>, to: String, ctx: &mut Context<Self>) {
        if self.state != CallState::Incoming || self.accept_pending() {
            return self.refuse(rid, Refusal::NotRinging);
        }
        self.reply_ok(rid);
        if let Some(a) = self.arbiter.take() {
            a.do_send(ArbiterMsg::ForwardRequest {
                call: self.init.id.clone(),
                to,
            });
        }
        self.end(
            ctx,
            CallEvent::Forward,
            reasons::moved_temporarily(),
            None,
            false,
        );
    }

    /// The client's `call_transfer`: the peer leg places the new call (`StartTransfer`).
    pub(super) fn on_transfer(&mut self, rid: Option<u32>, to: String, ctx: &mut Context<Self>) {
        if self.state != CallState::Established || self.transfer.is_some() {
            return self.refuse(rid, Refusal::CannotTransferNow);
        }
        let Some(peer) = self.peer.as_ref() else {
            return self.refuse(rid, Refusal::NoRemoteParty);
        };
        peer.addr.do_send(LegMsg::StartTransfer {
            to,
            transferor: ctx.address(),
        });
        self.reply_ok(rid);
        self.transfer = Some(Transfer::Transferor);
        self.step(CallEvent::Transfer, None);
    }

    /// The client acked a received message: its sender's leg reports it delivered.
    pub(super) fn on_ack(&mut self, msg: u32) {
        if let Some(sender) = self.unacked.remove(msg) {
            sender.do_send(LegMsg::Acked { msg });
        }
    }

    /// The client's `composing`, passed to the peer while the call carries messages.
    pub(super) fn on_composing(&mut self, active: bool) {
        if let Some(peer) = self.peer.as_ref().filter(|_| self.can_flow()) {
            peer.addr.do_send(LegMsg::RemoteComposing { active });
        }
    }

    /// The endpoint's connection is gone without a `bye`.
    pub(super) fn on_endpoint_lost(&mut self, ctx: &mut Context<Self>) {
        if self.state.is_final() && self.init.endpoint.remote_node().is_some() {
            // Its end was reported already, but the endpoint's node waits for an end
            // to answer its `EndpointLost` (see `cluster/src/resend.rs`).
            self.report_end();
        }
        // Nobody is left to release this leg.
        self.attachment = self.attachment.max(Attachment::Lost);
        self.endpoint_lost(ctx);
    }

    /// Cluster: the node of this leg's endpoint died.
    pub(super) fn on_node_lost(&mut self, ctx: &mut Context<Self>) {
        self.attachment = Attachment::NodeLost;
        self.endpoint_lost(ctx);
    }
}
