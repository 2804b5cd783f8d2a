//! Signing in, and what several subcommands print the same way: call state changes, received
//! messages, errors of the client library.

use std::time::Duration;

use anyhow::anyhow;
use confab_client::protocol::Body;
use confab_client::{
    AutoAcceptPolicy, ClientError, DeliveryError, Endpoint, EndpointEvent, EndpointOptions, Hello,
    InstantMessagingCall, LinkEvent, Reason, ReceivedMessage, Reconnect, StateChange, token,
};
use serde_json::{Value, json};
use tokio::sync::mpsc;

use super::out::{Output, Tone};

/// How long a token minted from `--secret` is valid.
const MINTED_TOKEN_TTL: Duration = Duration::from_secs(12 * 3600);

/// `--token` or `--secret`.
pub enum Auth {
    Token(String),
    Secret(String),
}

/// Where and as whom to sign in (the global options).
pub struct Session {
    pub server: String,
    pub user: String,
    pub auth: Auth,
    pub device: String,
    /// `--tls`/`--ca`: TLS to the node, or plain TCP.
    pub tls: Option<confab_client::ClientTls>,
}

impl Session {
    /// Signs in; `policy` is what the library does when the node asks this endpoint to accept.
    pub async fn sign_in(&self, policy: AutoAcceptPolicy) -> anyhow::Result<Endpoint> {
        self.sign_in_with(policy, None).await
    }

    /// [`Session::sign_in`] on a resumable session: a dropped link is reconnected and the
    /// session resumed by the library, for the commands that stay signed in (`listen`,
    /// `chat`); see [`print_link_events`].
    pub async fn sign_in_resumable(&self, policy: AutoAcceptPolicy) -> anyhow::Result<Endpoint> {
        self.sign_in_with(policy, Some(Reconnect::default())).await
    }

    async fn sign_in_with(
        &self,
        policy: AutoAcceptPolicy,
        resume: Option<Reconnect>,
    ) -> anyhow::Result<Endpoint> {
        let token = match &self.auth {
            Auth::Token(token) => token.clone(),
            Auth::Secret(secret) => token::mint(&self.user, secret, MINTED_TOKEN_TTL),
        };
        let mut hello = Hello::new(&self.user, token, &self.device);
        hello.agent = Some(concat!("confab-cli/", env!("CARGO_PKG_VERSION")).to_owned());
        let mut options = EndpointOptions {
            auto_accept: policy,
            ..EndpointOptions::default()
        };
        options.connection.tls = self.tls.clone();
        options.connection.resume = resume;
        Endpoint::connect_with(self.server.as_str(), hello, options)
            .await
            .map_err(|e| match e {
                ClientError::Server { code, message } => anyhow!(
                    "sign-in as {} refused: {} ({message})",
                    self.user,
                    code.as_str()
                ),
                ClientError::Io(e) => anyhow!("cannot reach the node at {}: {e}", self.server),
                ClientError::Tls(e) => {
                    anyhow!("no TLS session with the node at {}: {e}", self.server)
                }
                ClientError::Closed => anyhow!(
                    "the node at {} closed the connection during sign-in",
                    self.server
                ),
                other => anyhow!("sign-in as {} failed: {other}", self.user),
            })
    }
}

/// Prints the news of a resumable session's link as it comes: reconnecting, resumed, lost.
/// The task ends with the endpoint and returns why the session was lost, if it was, so that a
/// command can say so rather than only "closed".
pub fn print_link_events(
    endpoint: &Endpoint,
    out: std::sync::Arc<Output>,
) -> tokio::task::JoinHandle<Option<String>> {
    let mut events = endpoint.events();
    tokio::spawn(async move {
        let mut lost = None;
        while let Some(event) = events.recv().await {
            let EndpointEvent::Link(link) = event else {
                continue;
            };
            match link {
                LinkEvent::Reconnecting { error } => out.event(
                    || {
                        out.paint(
                            Tone::Bad,
                            &format!("connection to the node lost ({error}); reconnecting…"),
                        )
                    },
                    || json!({"event": "reconnecting", "error": error}),
                ),
                LinkEvent::Resumed { attempts, resent } => out.event(
                    || out.paint(Tone::Good, "reconnected; the session resumed, nothing lost"),
                    || json!({"event": "resumed", "attempts": attempts, "resent": resent}),
                ),
                LinkEvent::Lost { reason } => {
                    out.event(
                        || out.paint(Tone::Bad, &format!("session lost: {reason}")),
                        || json!({"event": "lost", "reason": reason}),
                    );
                    lost = Some(reason);
                }
                other => tracing::debug!(?other, "link event"),
            }
        }
        lost
    })
}

/// Who answered an established call. `established()` resolves on the `call_state`, and the
/// contract lets `call_established` (which names the remote) come just before or just after
/// it, so this waits for the latter too.
pub async fn answered_by(call: &InstantMessagingCall) -> Option<confab_client::Remote> {
    let mut snapshots = call.watch();
    let snapshot = snapshots
        .wait_for(|s| s.remote.is_some() || s.state.is_final() || s.connection_lost)
        .await
        .ok()?;
    snapshot.remote.clone()
}

/// `code text`, as SIP prints it.
pub fn reason_text(reason: &Reason) -> String {
    format!("{} {}", reason.code, reason.text)
}

/// Why a call attempt failed, for the user: the node's reason when the call ended.
pub fn call_error(to: &str, e: ClientError) -> anyhow::Error {
    match e {
        ClientError::CallEnded(reason) => anyhow!("call to {to} failed: {}", reason_text(&reason)),
        ClientError::Closed => anyhow!("call to {to} failed: the connection to the node closed"),
        other => anyhow!("call to {to} failed: {other}"),
    }
}

/// Why a message was not delivered, for the user.
pub fn delivery_error(e: &DeliveryError) -> String {
    match e {
        DeliveryError::Failed { code, text, .. } => format!("{code} {text}"),
        DeliveryError::Client(e) => e.to_string(),
    }
}

/// A body as one line of text: the text itself, or a note for bytes.
pub fn body_text(content_type: &str, body: &Body) -> String {
    match body {
        Body::Text(text) => text.clone(),
        Body::Binary(bytes) => format!("[{} bytes of {content_type}]", bytes.len()),
    }
}

/// `call <id>: <previous> -> <state> [code text]`.
pub fn print_state(out: &Output, call: &str, change: &StateChange) {
    out.event(
        || {
            let mut line = format!(
                "call {call}: {} -> {}",
                change.previous.as_str(),
                change.state.as_str()
            );
            if let Some(reason) = &change.reason {
                line.push(' ');
                line.push_str(&reason_text(reason));
            }
            out.paint(Tone::Dim, &line)
        },
        || {
            json!({
                "event": "state",
                "call": call,
                "previous": change.previous.as_str(),
                "state": change.state.as_str(),
                "reason": change.reason,
            })
        },
    );
}

/// `<from>: <text>`.
pub fn print_message(out: &Output, call: &str, message: &ReceivedMessage) {
    out.event(
        || {
            format!(
                "{}: {}",
                out.paint(Tone::Who, &message.from),
                body_text(&message.content_type, &message.body)
            )
        },
        || {
            json!({
                "event": "message",
                "call": call,
                "msg": message.msg,
                "from": message.from,
                "content_type": message.content_type,
                "text": match &message.body {
                    Body::Text(text) => Value::from(text.as_str()),
                    Body::Binary(_) => Value::Null,
                },
                "toast": message.toast,
            })
        },
    );
}

/// An inbound call as announced: with its toast when it has one.
pub fn print_incoming(out: &Output, call: &InstantMessagingCall) {
    let toast = call.toast().map(|t| body_text(&t.content_type, &t.body));
    out.event(
        || match &toast {
            Some(text) => format!(
                "{} {}: {}",
                out.paint(Tone::Toast, "toast from"),
                out.paint(Tone::Who, call.peer()),
                text
            ),
            None => format!(
                "{} {}",
                out.paint(Tone::Toast, "call from"),
                out.paint(Tone::Who, call.peer())
            ),
        },
        || {
            json!({
                "event": "incoming",
                "call": call.id(),
                "conversation": call.conversation_id(),
                "from": call.peer(),
                "toast": toast,
                "immediate_auto_accept": call.is_immediate_auto_accept_needed(),
            })
        },
    );
}

/// Declines (486 Busy Here) every call that reaches an endpoint that is not listening, so it
/// never holds up the caller's other forks.
pub fn decline_incoming(endpoint: &Endpoint, out: std::sync::Arc<Output>) {
    let mut calls = endpoint.incoming_calls();
    tokio::spawn(async move {
        while let Some(call) = calls.recv().await {
            out.event(
                || {
                    out.paint(
                        Tone::Dim,
                        &format!("declined a call from {} (not listening)", call.peer()),
                    )
                },
                || json!({"event": "declined", "call": call.id(), "from": call.peer()}),
            );
            if let Err(e) = call.decline(None).await {
                tracing::debug!(error = %e, "declining failed");
            }
        }
    });
}

/// Whether the node's `call_state` `change` can only come after every message of the call: the
/// call is ending, so no message follows it.
pub fn ends_the_call(change: &StateChange) -> bool {
    matches!(
        change.state,
        confab_client::CallState::Terminating | confab_client::CallState::Terminated
    )
}

/// The messages already queued on `messages`, without waiting. States and messages come on two
/// streams; the library queues each in the node's order from one dispatcher, so once a change
/// that ends the call is seen, every message received before it is queued already, and printing
/// these first keeps the node's order. `open` turns false when the stream has ended.
pub fn ready_messages(
    messages: &mut confab_client::MessageStream,
    open: &mut bool,
) -> Vec<ReceivedMessage> {
    use futures::FutureExt as _;
    let mut ready = Vec::new();
    while *open {
        match messages.recv().now_or_never() {
            Some(Some(message)) => ready.push(message),
            Some(None) => *open = false,
            None => break,
        }
    }
    ready
}

/// Lines of stdin, read on a thread of their own (it ends with the process); the channel
/// closes at end of input.
pub fn stdin_lines() -> mpsc::UnboundedReceiver<String> {
    let (tx, rx) = mpsc::unbounded_channel();
    std::thread::spawn(move || {
        for line in std::io::stdin().lines() {
            let Ok(line) = line else { return };
            if tx.send(line).is_err() {
                return;
            }
        }
    });
    rx
}

/// Ctrl-C or SIGTERM: the signal to sign out cleanly and exit.
pub async fn interrupted() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        if let Ok(mut term) = signal(SignalKind::terminate()) {
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
            return;
        }
    }
    let _ = tokio::signal::ctrl_c().await;
}
