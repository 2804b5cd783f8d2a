//! An endpoint's reading of its client's frames: each decoded, held to
//! `limits.requests_per_second`, and dispatched to the job it concerns; a frame that cannot be
//! read, or a request that arrives while the endpoint ends, gets the answer its refusal gets.

use actix::prelude::*;
use bytes::BytesMut;
use confab_protocol::{ClientMsg, DecodeError, FrameError, ServerMsg, decode_client};
use futures::Stream;
use tokio::time::Instant;

use super::{Endpoint, request_rate};
use crate::call::leg::{LegMsg, TerminateCause};
use crate::metrics as m;
use crate::refusal::Refusal;

/// The client's frames after the `hello`, read by this actor (from either listener).
pub use crate::transport::Frames;

impl Endpoint {
    fn handle_frame(&mut self, msg: ClientMsg, ctx: &mut Context<Self>) {
        match msg {
            ClientMsg::Hello { rid, .. } => self.refuse(rid, Refusal::AlreadySignedIn),
            ClientMsg::Ping { rid } => {
                self.push(ServerMsg::Pong { rid });
                self.push_seen();
            }
            ClientMsg::Bye { rid } => {
                self.push(ServerMsg::Ok { rid });
                self.end_cleanly(ctx, TerminateCause::Bye);
            }
            ClientMsg::DeviceState {
                rid,
                activity,
                idle_ms,
            } => self.device_state(rid, activity, idle_ms),
            ClientMsg::SetStatus { rid, status } => self.set_status(rid, status, ctx),
            ClientMsg::Subscribe { rid, users } => self.subscribe(rid, users),
            ClientMsg::Unsubscribe { rid, users } => self.unsubscribe(rid, users),
            ClientMsg::CallEstablish {
                rid,
                to,
                conversation,
                toast,
                sdp,
            } => self.establish(rid, to, conversation, toast, sdp, ctx),
            ClientMsg::CallAccept { rid, call, sdp } => self.accept(rid, call, sdp, ctx),
            ClientMsg::CallDecline { rid, call, code } => self.decline(rid, call, code, ctx),
            ClientMsg::CallForward { rid, call, to } => {
                self.redirect(rid, call, to, |rid, to| LegMsg::Forward { rid, to }, ctx)
            }
            ClientMsg::CallTransfer { rid, call, to } => {
                self.redirect(rid, call, to, |rid, to| LegMsg::Transfer { rid, to }, ctx)
            }
            ClientMsg::CallTerminate { rid, call } => self.terminate(rid, call, ctx),
            ClientMsg::ConversationTerminate { rid, conversation } => {
                self.terminate_conversation(rid, conversation)
            }
            ClientMsg::Message {
                rid,
                call,
                content_type,
                body,
            } => self.send_message(rid, call, content_type, body, ctx),
            ClientMsg::MessageAck { call, msg } => self.ack(&call, msg),
            ClientMsg::Composing { call, active } => self.composing(&call, active),
            ClientMsg::Seen { upto } => self.client_saw(upto),
        }
    }

    /// A request refused unread, answered in the form its type is answered in: a `message`
    /// gets its `message_failed`, an ack or composing nothing (they have no answer), any other
    /// request its `error`. Requests that arrive after `bye` or a shutdown began are refused
    /// as `SigningOut`; those over the connection's rate as `TooManyRequests`.
    fn refuse_unread(&mut self, msg: ClientMsg, why: Refusal) {
        match msg {
            ClientMsg::Message { rid, call, .. } => self.fail_message_for(rid, call, &why),
            ClientMsg::MessageAck { .. } | ClientMsg::Composing { .. } | ClientMsg::Seen { .. } => {
            }
            other => self.refuse(other.rid(), why),
        }
    }

    fn reject_frame(&mut self, e: &DecodeError) {
        let reason = match e {
            DecodeError::UnknownType { .. } => "unknown_type",
            DecodeError::BadFrame { .. } => "bad_frame",
        };
        metrics::counter!(m::FRAMES_REJECTED, "reason" => reason).increment(1);
        self.refuse(e.rid(), Refusal::frame(e));
    }
}

/// One item of a connection's frames: the connection's number within its endpoint (a resume
/// starts a new one), and a frame, or `None` once the connection has ended.
pub type Tagged = (u32, Option<Result<BytesMut, FrameError>>);

/// `frames`, tagged as connection `conn`, with its end as a last item. actix may still poll a
/// stream once after it was cancelled (a resume cancels the old connection's): the tag lets
/// the endpoint drop what the old connection still yields, its end included, rather than take
/// it for the new one's.
pub fn tagged(frames: Frames, conn: u32) -> TaggedFrames {
    TaggedFrames {
        frames: Some(frames),
        conn,
        ended: false,
    }
}

/// What [`tagged`] returns. A struct of its own rather than `map` and `chain(once(..))`: the
/// chained stream kept room for its last item (an `Option<Result<BytesMut, FrameError>>`)
/// beside the frames, which moved every connection's boxed stream into the allocator's next
/// size class.
pub struct TaggedFrames {
    /// Dropped (and the socket's read half with it) once it has ended, as `chain` did.
    frames: Option<Frames>,
    conn: u32,
    /// The end has been yielded: nothing more comes.
    ended: bool,
}

impl Stream for TaggedFrames {
    type Item = Tagged;

    fn poll_next(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Tagged>> {
        use std::task::Poll;
        let conn = self.conn;
        if let Some(frames) = self.frames.as_mut() {
            match std::pin::Pin::new(frames).poll_next(cx) {
                Poll::Ready(Some(item)) => return Poll::Ready(Some((conn, Some(item)))),
                Poll::Ready(None) => self.frames = None,
                Poll::Pending => return Poll::Pending,
            }
        }
        if self.ended {
            return Poll::Ready(None);
        }
        self.ended = true;
        Poll::Ready(Some((conn, None)))
    }
}

impl StreamHandler<Tagged> for Endpoint {
    fn handle(&mut self, (conn, item): Tagged, ctx: &mut Context<Self>) {
        if !self.is_current_connection(conn) {
            return;
        }
        match item {
            Some(item) => self.frame_read(item, ctx),
            None => self.connection_lost("closed by the client", ctx),
        }
    }

    /// The end of a connection arrives as its last item (see [`tagged`]).
    fn finished(&mut self, _: &mut Context<Self>) {}
}

impl Endpoint {
    pub(super) fn frame_read(
        &mut self,
        item: Result<BytesMut, FrameError>,
        ctx: &mut Context<Self>,
    ) {
        if item.is_ok() {
            self.count_received();
        }
        if self.ending() {
            // Still answered while the socket is open: a `message` always gets its one answer,
            // a malformed frame its error. (A framing error needs no answer now: the socket is
            // closing anyway.)
            if let Ok(frame) = item {
                match decode_client(&frame) {
                    Ok(msg) => self.refuse_unread(msg, Refusal::SigningOut),
                    Err(e) => self.reject_frame(&e),
                }
            }
            return;
        }
        self.last_rx = Instant::now();
        match item {
            Ok(frame) => match decode_client(&frame) {
                // Acks answer the node's own frames; refusing them would only fail the sender
                // (or, for `seen`, keep frames the client has).
                Ok(msg @ (ClientMsg::MessageAck { .. } | ClientMsg::Seen { .. })) => {
                    self.handle_frame(msg, ctx)
                }
                Ok(msg) if !self.bucket.try_take(request_rate(&self.ctx), self.last_rx) => {
                    metrics::counter!(m::FRAMES_REJECTED, "reason" => "rate_limited").increment(1);
                    self.refuse_unread(msg, Refusal::TooManyRequests)
                }
                Ok(msg) => self.handle_frame(msg, ctx),
                // Malformed frames cost a token too, or garbage would be a way past the limit.
                Err(e) if !self.bucket.try_take(request_rate(&self.ctx), self.last_rx) => {
                    metrics::counter!(m::FRAMES_REJECTED, "reason" => "rate_limited").increment(1);
                    self.refuse(e.rid(), Refusal::TooManyRequests);
                }
                Err(e) => self.reject_frame(&e),
            },
            Err(FrameError::Empty) => {
                metrics::counter!(m::FRAMES_REJECTED, "reason" => "bad_frame").increment(1);
                self.refuse(None, Refusal::ZeroLengthFrame);
                self.lost(ctx);
            }
            Err(FrameError::TooLarge { len, max }) => {
                metrics::counter!(m::FRAMES_REJECTED, "reason" => "frame_too_large").increment(1);
                self.refuse(None, Refusal::FrameTooLarge { len, max });
                self.lost(ctx);
            }
            Err(e) => {
                tracing::debug!(endpoint = %self.id, error = %e, "connection read failed");
                self.connection_lost("read failed", ctx);
            }
        }
    }
}
