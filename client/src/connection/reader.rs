//! The reader task: turns frames from the node into replies (completing the waiting request)
//! and events (pushed, in order, to the [`super::Events`] stream). Nothing the node sends can
//! make it panic: an undecodable frame is logged and skipped, a framing error ends the
//! connection as the contract says it must.

use std::sync::Arc;

use confab_protocol::{DecodeError, FrameCodec, ServerMsg, decode_server};
use futures::StreamExt;
use tokio::sync::mpsc;
use tokio_util::codec::FramedRead;

use super::Shared;
use crate::error::ClientError;

pub(super) async fn run<R: tokio::io::AsyncRead + Unpin>(
    mut frames: FramedRead<R, FrameCodec>,
    shared: Arc<Shared>,
    events: mpsc::UnboundedSender<ServerMsg>,
) {
    loop {
        let frame = tokio::select! {
            biased;
            () = shared.cancel.cancelled() => break,
            frame = frames.next() => frame,
        };
        match frame {
            None => {
                tracing::debug!("the node closed the connection");
                break;
            }
            Some(Err(e)) => {
                // Zero-length or oversized frames mean the byte stream can no longer be trusted.
                tracing::warn!(error = %e, "connection failed while reading");
                break;
            }
            Some(Ok(body)) => {
                shared.heard();
                match decode_server(&body) {
                    Ok(msg) => route(&shared, &events, msg),
                    Err(e) => undecodable(&shared, &e),
                }
            }
        }
    }
    shared.cancel.cancel();
    shared.pending.close();
    shared.done.cancel();
}

fn route(shared: &Shared, events: &mpsc::UnboundedSender<ServerMsg>, msg: ServerMsg) {
    if let Some(rid) = msg.reply_rid() {
        if !shared.pending.complete(rid, Ok(msg)) {
            tracing::warn!(rid, "reply to no outstanding request; dropped");
        }
        return;
    }
    match msg {
        // Heartbeat answers: their arrival is all that matters, and `heard` noted it.
        ServerMsg::Pong { .. } => {}
        ServerMsg::Ok { .. } => tracing::debug!("ok without rid; dropped"),
        event => {
            // Nobody listening is the application's choice, not an error.
            let _ = events.send(event);
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
