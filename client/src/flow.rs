//! [`InstantMessagingFlow`]: the messages of an established call (UCMA's class of the same
//! name). Sending waits for the node's delivery outcome; received messages are acked by the
//! library as soon as they are queued for the application; composing state is refreshed for
//! as long as it is active, as the contract asks.

use std::time::Duration;

use confab_protocol::sdp::Negotiated;
use confab_protocol::{Body, ClientMsg, ServerMsg};
use tokio::sync::watch;
use tokio::time::{Instant, interval_at};

use crate::call::{InstantMessagingCall, ReceivedMessage};
use crate::error::{ClientError, DeliveryError};
use crate::queue::public_stream;
use crate::sync::lock;

/// The contract's refresh period for an active composing state (the node lets it lapse after
/// `composing_timeout`, 6 s by default).
const COMPOSING_REFRESH: Duration = Duration::from_secs(5);

public_stream! {
    /// Messages received on a call; see [`InstantMessagingFlow::received`].
    MessageStream => ReceivedMessage
}

/// The flow of one call; cheap to clone.
#[derive(Clone, Debug)]
pub struct InstantMessagingFlow {
    call: InstantMessagingCall,
}

impl InstantMessagingFlow {
    pub(crate) fn new(call: InstantMessagingCall) -> Self {
        InstantMessagingFlow { call }
    }

    /// The call this flow belongs to.
    pub fn call(&self) -> &InstantMessagingCall {
        &self.call
    }

    /// Sends a message and waits until the remote endpoint acked it; returns its number in the
    /// call. The node answers every message exactly once, at the latest after its
    /// `ack_timeout` (408).
    ///
    /// The body is sent as text for `text/*` content types and as bytes otherwise, whichever
    /// form it was given in. Sending ends our composing state, as the node does for the remote.
    pub async fn send(
        &self,
        content_type: &str,
        body: impl Into<Body>,
    ) -> Result<u32, DeliveryError> {
        let inner = self.call.inner();
        inner.stop_composing_refresh();
        let request = ClientMsg::Message {
            rid: None,
            call: inner.id.clone(),
            content_type: content_type.to_owned(),
            body: fit_body(content_type, body.into()),
        };
        match self.call.ctx().conn.request(request).await? {
            ServerMsg::MessageDelivered { msg, .. } => Ok(msg),
            ServerMsg::MessageFailed {
                msg, code, text, ..
            } => Err(DeliveryError::Failed { msg, code, text }),
            other => Err(ClientError::Protocol(format!(
                "expected message_delivered or message_failed, got {other:?}"
            ))
            .into()),
        }
    }

    /// [`InstantMessagingFlow::send`] of a `text/plain` message.
    pub async fn send_text(&self, text: &str) -> Result<u32, DeliveryError> {
        self.send(confab_protocol::sdp::DEFAULT_ACCEPT_TYPE, text)
            .await
    }

    /// Messages received on this call, in the order sent, starting with the toast (for the
    /// leg that won it). They are buffered from the call's creation, so none is missed before
    /// this is called; several streams share one queue. The stream ends when the call does.
    pub fn received(&self) -> MessageStream {
        MessageStream::new(self.call.inner().messages.stream())
    }

    /// Tells the remote side that the user is (or stopped) typing. While active, the library
    /// refreshes it every 5 s until this is called with `false`, a message is sent, or the call
    /// ends.
    pub fn set_composing(&self, active: bool) -> Result<(), ClientError> {
        let inner = self.call.inner();
        inner.stop_composing_refresh();
        let conn = self.call.ctx().conn.clone();
        let call = inner.id.clone();
        conn.send(ClientMsg::Composing {
            call: call.clone(),
            active,
        })?;
        if active {
            let refresh = tokio::spawn(async move {
                let mut ticks = interval_at(Instant::now() + COMPOSING_REFRESH, COMPOSING_REFRESH);
                loop {
                    ticks.tick().await;
                    let msg = ClientMsg::Composing {
                        call: call.clone(),
                        active: true,
                    };
                    if conn.send(msg).is_err() {
                        return;
                    }
                }
            });
            *lock(&inner.composing_refresh) = Some(refresh.abort_handle());
        }
        Ok(())
    }

    /// Whether the remote user is typing, as the node last said (`remote_composing`).
    pub fn remote_composing(&self) -> watch::Receiver<bool> {
        self.call.inner().remote_composing.subscribe()
    }

    /// The content types and size limit the call negotiated, once established.
    pub fn negotiated(&self) -> Option<Negotiated> {
        self.call.inner().snapshot.borrow().negotiated.clone()
    }
}

/// The body in the MessagePack kind the contract requires for `content_type`: str for
/// `text/*`, bin otherwise. Bytes that are not UTF-8 stay bytes, and the node will say so.
fn fit_body(content_type: &str, body: Body) -> Body {
    if body.matches_content_type(content_type) {
        return body;
    }
    let bytes = match body {
        Body::Text(text) => text.into_bytes(),
        Body::Binary(bytes) => bytes,
    };
    Body::for_content_type(content_type, bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bodies_take_the_kind_of_their_content_type() {
        assert_eq!(
            fit_body("text/plain", Body::Binary(b"hi".to_vec())),
            Body::Text("hi".to_owned())
        );
        assert_eq!(
            fit_body("application/octet-stream", Body::from("hi")),
            Body::Binary(b"hi".to_vec())
        );
        assert_eq!(fit_body("text/html", Body::from("<b>")), Body::from("<b>"));
        assert_eq!(
            fit_body("text/plain", Body::Binary(vec![0xff])),
            Body::Binary(vec![0xff])
        );
    }
}
