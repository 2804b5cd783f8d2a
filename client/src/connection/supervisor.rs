//! The life of a connection's links: starts each link's reader, writer and heartbeat, waits
//! for the link to end, and then either ends the connection (not resumable, closed by us, or
//! ended by the node) or, on a resumable session, reconnects with backoff within the node's
//! window and resumes: the node's frames carry on from the count read, ours are sent again
//! from the count the node read. It alone emits [`LinkEvent`]s, in order with the frames, and
//! it alone ends the connection, so every waiter is woken exactly once.

use std::sync::Arc;
use std::time::Duration;

use confab_protocol::{ClientMsg, ErrorCode, ResumeAsk, ResumeGrant, ServerMsg};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::dial::{Dialer, Link};
use super::{Hello, Inbound, LinkEvent, Reconnect, Shared, heartbeat, hello_msg, reader, writer};
use crate::error::ClientError;

/// What a resumable session needs to take itself back on a new link.
pub(super) struct Resumable {
    pub(super) policy: Reconnect,
    pub(super) dialer: Dialer,
    pub(super) hello: Hello,
    pub(super) endpoint: String,
    /// The latest grant: its token is the one the next resume spends.
    pub(super) grant: ResumeGrant,
    pub(super) handshake_timeout: Duration,
    pub(super) heartbeat: bool,
}

/// The tasks of one link.
pub(super) struct LinkTasks {
    cancel: CancellationToken,
    reader: JoinHandle<()>,
}

/// Starts the tasks of `link`, whose writer drains `out` (the queue the send path feeds).
pub(super) fn start_link(
    shared: &Arc<Shared>,
    link: Link,
    out: mpsc::UnboundedReceiver<bytes::Bytes>,
    heartbeat: Option<Duration>,
    events: &mpsc::UnboundedSender<Inbound>,
) -> LinkTasks {
    let cancel = shared.cancel.child_token();
    tokio::spawn(writer::run(
        link.write,
        out,
        cancel.clone(),
        Arc::clone(shared),
    ));
    if let Some(period) = heartbeat {
        tokio::spawn(heartbeat::run(Arc::clone(shared), period, cancel.clone()));
    }
    let reader = tokio::spawn(reader::run(
        link.read,
        Arc::clone(shared),
        events.clone(),
        cancel.clone(),
    ));
    LinkTasks { cancel, reader }
}

/// How the connection ended.
enum End {
    /// Closed by us, by the node, or a link of a session that is not resumable dropped.
    Closed,
    /// A resumable session that could not be resumed.
    Lost(String),
}

/// Why one resume attempt did not take the session back.
enum Attempt {
    /// The link could not be opened or the handshake failed: try again.
    Retry(String),
    /// The node refused, or answered in a way a retry cannot change: the session is over.
    Refused(String),
}

/// Why the reconnecting stopped.
enum Stop {
    Cancelled,
    Lost(String),
}

/// Watches the connection's links until it ends; see the module doc.
pub(super) async fn run(
    shared: Arc<Shared>,
    mut link: LinkTasks,
    mut resumable: Option<Resumable>,
    events: mpsc::UnboundedSender<Inbound>,
) {
    let end = loop {
        // The reader is the last to touch the link: once it is done, the count of frames read
        // is final, and it is what the resume says it saw.
        let _ = (&mut link.reader).await;
        link.cancel.cancel();
        shared.outbound.detach();
        if shared.cancel.is_cancelled() || shared.is_ending() {
            break End::Closed;
        }
        let Some(session) = resumable.as_mut() else {
            break End::Closed;
        };
        match session.take_back(&shared, &events).await {
            Ok(next) => link = next,
            Err(Stop::Cancelled) => break End::Closed,
            Err(Stop::Lost(reason)) => break End::Lost(reason),
        }
    };
    shared.cancel.cancel();
    match end {
        End::Closed => shared.pending.close(|| ClientError::Closed),
        End::Lost(reason) => {
            tracing::warn!(%reason, "the session with the node is lost");
            let _ = events.send(Inbound::Link(LinkEvent::Lost {
                reason: reason.clone(),
            }));
            shared
                .pending
                .close(|| ClientError::SessionLost(reason.clone()));
        }
    }
    shared.done.cancel();
}

impl Resumable {
    /// Reconnects and resumes, attempt after attempt, until it works, the node refuses, the
    /// window passes or the connection is closed.
    async fn take_back(
        &mut self,
        shared: &Arc<Shared>,
        events: &mpsc::UnboundedSender<Inbound>,
    ) -> Result<LinkTasks, Stop> {
        let why = shared
            .take_link_error()
            .unwrap_or_else(|| "the link to the node failed".to_owned());
        tracing::info!(error = %why, "link lost; resuming the session");
        let _ = events.send(Inbound::Link(LinkEvent::Reconnecting { error: why }));
        // The node's window starts when it notices the drop, which is no earlier than here
        // for a closed link, and a little later for a silent one: this deadline is safe.
        let window = Duration::from_millis(self.grant.window_ms);
        let deadline = Instant::now() + window;
        let mut last_error = String::from("none");
        let mut attempt = 0u32;
        loop {
            attempt = attempt.saturating_add(1);
            let delay = self.policy.delay(attempt, rand::random::<f64>());
            if Instant::now() + delay >= deadline {
                return Err(Stop::Lost(format!(
                    "not resumed within the node's {} ms window ({last_error})",
                    window.as_millis()
                )));
            }
            let attempt_deadline = (Instant::now() + delay + self.handshake_timeout).min(deadline);
            let result = tokio::select! {
                biased;
                () = shared.cancel.cancelled() => return Err(Stop::Cancelled),
                result = async {
                    tokio::time::sleep(delay).await;
                    self.attempt(shared, attempt_deadline).await
                } => result,
            };
            match result {
                Ok((link, welcome)) => {
                    return self.resumed(shared, events, link, welcome, attempt);
                }
                Err(Attempt::Retry(e)) => {
                    tracing::debug!(attempt, error = %e, "resume attempt failed; retrying");
                    last_error = e;
                }
                Err(Attempt::Refused(e)) => return Err(Stop::Lost(e)),
            }
        }
    }

    /// One attempt: a new link and a resuming `hello` on it.
    async fn attempt(
        &self,
        shared: &Shared,
        deadline: Instant,
    ) -> Result<(Link, Resumed), Attempt> {
        let mut link = self
            .dialer
            .open(deadline)
            .await
            .map_err(|e| Attempt::Retry(e.to_string()))?;
        let ask = ResumeAsk {
            endpoint: Some(self.endpoint.clone()),
            token: Some(self.grant.token.clone()),
            seen: shared.received.last(),
            sent: shared.outbound.sent(),
        };
        let hello: ClientMsg = hello_msg(&self.hello, Some(Box::new(ask)));
        let reply = link
            .handshake(&hello, deadline)
            .await
            .map_err(|e| match e {
                // A sign-in refusal other than the resume's own (an expired JWT, say).
                ClientError::Server { code, message } => judge_error(code, &message),
                other => Attempt::Retry(other.to_string()),
            })?;
        match reply {
            ServerMsg::Welcome {
                resume: Some(grant),
                heartbeat_ms,
                max_frame,
                ..
            } => match grant.seen {
                Some(read) => Ok((
                    link,
                    Resumed {
                        grant: *grant,
                        read,
                        heartbeat_ms,
                        max_frame,
                    },
                )),
                None => Err(Attempt::Refused(
                    "the node answered the resume with a new session".to_owned(),
                )),
            },
            ServerMsg::Welcome { resume: None, .. } => Err(Attempt::Refused(
                "the node answered the resume with a session that is not resumable".to_owned(),
            )),
            ServerMsg::Error { code, message, .. } => Err(judge_error(code, &message)),
            other => Err(Attempt::Retry(format!(
                "expected welcome, got {}",
                other_name(&other)
            ))),
        }
    }

    /// The node took the session back: send again what it did not read, then run the link.
    fn resumed(
        &mut self,
        shared: &Arc<Shared>,
        events: &mpsc::UnboundedSender<Inbound>,
        link: Link,
        welcome: Resumed,
        attempts: u32,
    ) -> Result<LinkTasks, Stop> {
        shared.heard();
        shared.set_max_out_frame(welcome.max_frame);
        let (out_tx, out_rx) = mpsc::unbounded_channel();
        let resent = shared
            .outbound
            .resume(out_tx, welcome.read)
            .map_err(|e| Stop::Lost(format!("the node's resume cannot be honoured: {e}")))?;
        self.grant = welcome.grant;
        tracing::info!(attempts, resent, "session resumed");
        // Before the new reader starts, so it precedes every frame of the new link.
        let _ = events.send(Inbound::Link(LinkEvent::Resumed { attempts, resent }));
        let heartbeat = self
            .heartbeat
            .then_some(welcome.heartbeat_ms)
            .filter(|&ms| ms > 0)
            .map(Duration::from_millis);
        Ok(start_link(shared, link, out_rx, heartbeat, events))
    }
}

/// What the resumed `welcome` said.
struct Resumed {
    grant: ResumeGrant,
    /// The last of our frames the node read.
    read: u64,
    heartbeat_ms: u64,
    max_frame: u32,
}

/// Whether an `error` to a resuming `hello` is worth another attempt: only `overloaded` (a
/// node shutting down, a cluster directory out of reach) may pass; a refused resume, a token
/// no longer valid and the rest will not.
fn judge_error(code: ErrorCode, message: &str) -> Attempt {
    match code {
        ErrorCode::Overloaded => Attempt::Retry(format!("overloaded: {message}")),
        ErrorCode::ResumeRefused => Attempt::Refused(format!("resume refused: {message}")),
        other => Attempt::Refused(format!("resume refused: {}: {message}", other.as_str())),
    }
}

fn other_name(msg: &ServerMsg) -> String {
    format!("{msg:?}")
        .split([' ', '{'])
        .next()
        .unwrap_or("?")
        .to_owned()
}
