//! `confab send TO TEXT`: one call, one message, its delivery, hang up.

use std::process::ExitCode;
use std::sync::Arc;

use anyhow::anyhow;
use confab_client::protocol::sdp::DEFAULT_ACCEPT_TYPE;
use confab_client::{
    AutoAcceptPolicy, CallEstablishOptions, Conversation, InstantMessagingCall, Toast,
};
use futures::StreamExt as _;
use serde_json::json;

use super::out::{Output, Tone};
use super::session::{self, Session};

pub async fn run(
    session: &Session,
    out: &Arc<Output>,
    to: &str,
    text: &str,
    as_toast: bool,
) -> anyhow::Result<ExitCode> {
    let endpoint = session.sign_in(AutoAcceptPolicy::Notify).await?;
    session::decline_incoming(&endpoint, Arc::clone(out));
    let toast = as_toast.then(|| Toast {
        content_type: DEFAULT_ACCEPT_TYPE.to_owned(),
        body: text.into(),
    });
    let conversation = Conversation::new(&endpoint);
    let mut states = None;
    let result = async {
        let call = InstantMessagingCall::begin_establish(
            &conversation,
            to,
            toast,
            CallEstablishOptions::default(),
        )
        .await
        .map_err(|e| session::call_error(to, e))?;
        if out.json() {
            // The states are the story of the call for scripts; text mode keeps to the outcome.
            let mut changes = call.state_changes();
            let printer = Arc::clone(out);
            let id = call.id().to_owned();
            states = Some(tokio::spawn(async move {
                while let Some(change) = changes.next().await {
                    session::print_state(&printer, &id, &change);
                }
            }));
        }
        call.established()
            .await
            .map_err(|e| session::call_error(to, e))?;
        let remote = session::answered_by(&call).await;
        let remote_user = remote.as_ref().map_or(to, |r| r.user.as_str()).to_owned();
        let remote_endpoint = remote.map(|r| r.endpoint).unwrap_or_default();
        if as_toast {
            out.event(
                || {
                    format!(
                        "{} call with {remote_user} ({remote_endpoint}) established",
                        out.paint(Tone::Good, "✓")
                    )
                },
                || {
                    json!({"event": "established", "call": call.id(), "to": remote_user,
                           "endpoint": remote_endpoint})
                },
            );
        } else {
            let msg = call.flow().send_text(text).await.map_err(|e| {
                anyhow!(
                    "message to {to} not delivered: {}",
                    session::delivery_error(&e)
                )
            })?;
            out.event(
                || {
                    format!(
                        "{} delivered to {remote_user} ({remote_endpoint}) as msg {msg}",
                        out.paint(Tone::Good, "✓")
                    )
                },
                || {
                    json!({"event": "delivered", "call": call.id(), "msg": msg,
                           "to": remote_user, "endpoint": remote_endpoint})
                },
            );
        }
        if let Err(e) = call.terminate().await {
            tracing::debug!(error = %e, "terminating after delivery");
        }
        anyhow::Ok(())
    }
    .await;
    // bye ends anything left (a call still ringing after a failure, say).
    if let Err(e) = endpoint.bye().await {
        tracing::debug!(error = %e, "bye failed");
    }
    if let Some(states) = states {
        // The stream ends with `terminated` or with the connection, which bye has closed.
        let _ = states.await;
    }
    result.map(|()| ExitCode::SUCCESS)
}
