//! An endpoint's side of the flow: a client's `message` passed to its call's leg (or answered
//! here when it cannot be), acks and composing notices, and what a message's content must be.

use actix::prelude::*;
use confab_protocol::{Body, ServerMsg};
use tokio::time::Instant;

use super::Endpoint;
use crate::call::leg::LegMsg;
use crate::metrics as m;
use crate::refusal::Refusal;

impl Endpoint {
    /// `message`: to its call's leg, which answers it; answered here when this endpoint holds
    /// no such call, or when a leg on another node cannot be reached now.
    pub(super) fn send_message(
        &mut self,
        rid: Option<u32>,
        call: String,
        content_type: String,
        body: Body,
        ctx: &mut Context<Self>,
    ) {
        if let Err(why) = self.check_content(&content_type, &body) {
            return self.refuse(rid, Refusal::BadContent(why));
        }
        let msg = LegMsg::Message {
            rid,
            content_type,
            body,
        };
        let entry = || (rid, Instant::now());
        match self.send_awaiting_answer(&call, msg, |r| &mut r.messages, entry, ctx) {
            Some(true) => {}
            // Over the bound for the leg's node: not sent, so answered here rather than left
            // to the deadline.
            Some(false) => self.fail_message_for(rid, call, &Refusal::RequestsWaitingForNode),
            None => self.fail_message_for(rid, call, &Refusal::UnknownCall),
        }
    }

    /// `message_ack`: the receiver's ack, to the leg that delivered the message.
    pub(super) fn ack(&self, call: &str, msg: u32) {
        if let Some((leg, _)) = self.book.calls.get(call) {
            leg.do_send(LegMsg::Ack { msg });
        }
    }

    /// `composing`: to the call's leg, which tells the other party.
    pub(super) fn composing(&self, call: &str, active: bool) {
        if let Some((leg, _)) = self.book.calls.get(call) {
            leg.do_send(LegMsg::Composing { active });
        }
    }

    /// A `message` refused here: its one `message_failed`, with the code and text its refusal
    /// gets.
    pub(super) fn fail_message_for(&self, rid: Option<u32>, call: String, why: &Refusal) {
        if let Some((code, text)) = why.message_failure() {
            self.fail_message(rid, call, code, text);
        }
    }

    /// A `message` answered here rather than by its leg: its one `message_failed`, counted.
    pub(super) fn fail_message(&self, rid: Option<u32>, call: String, code: u16, text: &str) {
        m::message_failed(code);
        self.push(ServerMsg::MessageFailed {
            rid,
            call,
            msg: None,
            code,
            text: text.to_owned(),
        });
    }

    /// A message's or a toast's content type and body, as the frame carries them: the body's
    /// kind must match the type, and the type fit `flow.max_content_type_bytes` (it travels
    /// with the body to the receiver, but is not counted in `flow.max_message_bytes`).
    pub(super) fn check_content(
        &self,
        content_type: &str,
        body: &Body,
    ) -> Result<(), &'static str> {
        let why = if content_type.len() > self.ctx.settings.flow.max_content_type_bytes {
            "content_type is longer than flow.max_content_type_bytes"
        } else if !body.matches_content_type(content_type) {
            "body must be str for text/* content types and bin otherwise"
        } else {
            return Ok(());
        };
        metrics::counter!(m::FRAMES_REJECTED, "reason" => "bad_frame").increment(1);
        Err(why)
    }
}
