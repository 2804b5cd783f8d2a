//! The reader task of one link: turns frames from the node into replies (completing the
//! waiting request) and events (pushed, in order, to the [`super::Events`] stream). It counts
//! every frame it reads whole, since on a resumable session that count is what the client
//! acknowledges (`seen`) and resumes from; the node's own `seen` is consumed here and never
//! surfaced. Nothing the node sends can make it panic: an undecodable frame is logged and
//! skipped, a framing error ends the link as the contract says it must.

use std::sync::Arc;

use confab_protocol::{DecodeError, FrameCodec, ServerMsg, decode_server};
use futures::StreamExt;
use tokio::sync::mpsc;
use tokio_util::codec::FramedRead;
use tokio_util::sync::CancellationToken;

use super::dial::ReadHalf;
use super::{Inbound, Shared};
use crate::error::ClientError;

/// Reads the link until it ends or `link` is cancelled; cancels `link` on the way out, so the
/// writer and the heartbeat of the link stop too.
pub(super) async fn run(
    mut frames: FramedRead<ReadHalf, FrameCodec>,
    shared: Arc<Shared>,
    events: mpsc::UnboundedSender<Inbound>,
    link: CancellationToken,
) {
    loop {
        let frame = tokio::select! {
            biased;
            () = link.cancelled() => break,
            frame = frames.next() => frame,
        };
        match frame {
            None => {
                tracing::debug!("the node closed the connection");
                shared.link_failed("the node closed the connection".to_owned());
                break;
            }
            Some(Err(e)) => {
                // Zero-length or oversized frames mean the byte stream can no longer be trusted.
                tracing::warn!(error = %e, "connection failed while reading");
                shared.link_failed(format!("reading failed: {e}"));
                break;
            }
            Some(Ok(body)) => {
                shared.heard();
                // Every frame counts, even one this library cannot read: the node numbered it.
                shared.received.read_one(body.len());
                match decode_server(&body) {
                    Ok(msg) => route(&shared, &events, msg),
                    Err(e) => undecodable(&shared, &e),
                }
                shared.acknowledge_if_due();
            }
        }
    }
    link.cancel();
}

fn route(shared: &Shared, events: &mpsc::UnboundedSender<Inbound>, msg: ServerMsg) {
    if let Some(rid) = msg.reply_rid() {
        shared.note_reply(rid, &msg);
        if !shared.pending.complete(rid, Ok(msg)) {
            tracing::warn!(rid, "reply to no outstanding request; dropped");
        }
        return;
    }
    match msg {
        // Heartbeat answers: their arrival is all that matters, and `heard` noted it.
        ServerMsg::Pong { .. } => {}
        ServerMsg::Ok { .. } => tracing::debug!("ok without rid; dropped"),
        // The node read our frames up to `upto`: the library's bookkeeping, not an event.
        ServerMsg::Seen { upto } => shared.outbound.acked(upto),
        event => {
            if matches!(event, ServerMsg::Kicked { .. } | ServerMsg::Shutdown { .. }) {
                // The node ends this session itself; its link closing next is no drop.
                shared.session_ending();
            }
            // Nobody listening is the application's choice, not an error.
            let _ = events.send(Inbound::Frame(event));
        }
    }
}

fn undecodable(shared: &Shared, error: &DecodeError) {
    match error {
        // The contract lets the node grow new message types; an old client ignores them.
        DecodeError::UnknownType { ty, .. } => {
            tracing::debug!(r#type = %ty, "unknown message type from the node; ignored");
        }
        DecodeError::BadFrame { .. } => {
            tracing::warn!(error = %error, "malformed frame from the node; ignored");
        }
    }
    // A reply we cannot read must still end its request, or the caller would wait forever.
    if let Some(rid) = error.rid() {
        shared.pending.complete(
            rid,
            Err(ClientError::Protocol(format!("unreadable reply: {error}"))),
        );
    }
}
