//! `confab listen`: a device that prints what reaches it. Ringing calls are accepted on Enter
//! (the oldest one still ringing), at once with `--auto-accept`, and whenever the node asks
//! this endpoint to accept: the only device of the user (`immediate_auto_accept`), or the most
//! active one once nobody clicked within the toast timeout (`auto_accept_needed`), as UCMA's
//! endpoints do by default. Every line typed is user input on this device, so it also
//! publishes the device state `active`.

use std::collections::VecDeque;
use std::io::IsTerminal as _;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::anyhow;
use confab_client::protocol::ErrorCode;
use confab_client::{
    Activity, AutoAcceptPolicy, CallState, ClientError, Endpoint, InstantMessagingCall,
};
use futures::StreamExt as _;
use serde_json::json;
use tokio::sync::mpsc;

use super::out::{Output, Tone};
use super::presence::ActivityArg;
use super::session::{self, Session};

#[derive(clap::Args)]
pub struct ListenArgs {
    /// Accept every call at once, even while the user's other devices still ring.
    #[arg(long)]
    pub auto_accept: bool,
    /// Exit after this many messages (a toast delivered to this device counts).
    #[arg(long)]
    pub count: Option<u64>,
    /// Publish this device state on sign-in (the node ranks devices by it).
    #[arg(long, value_enum)]
    pub activity: Option<ActivityArg>,
    /// With --activity: milliseconds since the user's last input on this device.
    #[arg(long, default_value_t = 0, requires = "activity")]
    pub idle_ms: u64,
}

pub async fn run(
    session: &Session,
    out: &Arc<Output>,
    args: ListenArgs,
) -> anyhow::Result<ExitCode> {
    let policy = if args.auto_accept {
        AutoAcceptPolicy::Accept
    } else {
        AutoAcceptPolicy::Notify
    };
    let endpoint = session.sign_in_resumable(policy).await?;
    let mut link_events = session::print_link_events(&endpoint, Arc::clone(out));
    if let Some(activity) = args.activity {
        endpoint
            .publish_device_state(activity.into(), args.idle_ms)
            .await?;
    }
    out.event(
        || {
            format!(
                "listening as {} ({} on {})",
                endpoint.id(),
                endpoint.user(),
                session.device
            )
        },
        || {
            json!({"event": "listening", "endpoint": endpoint.id(), "user": endpoint.user(),
                   "device": session.device})
        },
    );
    let interactive = std::io::stdin().is_terminal();
    if interactive && !args.auto_accept {
        out.note(|| {
            out.paint(
                Tone::Dim,
                "Enter accepts the oldest ringing call and marks this device active; Ctrl-C quits",
            )
        });
    }

    let mut incoming = endpoint.incoming_calls();
    let mut lines = Some(session::stdin_lines());
    let (received_tx, mut received_rx) = mpsc::unbounded_channel::<()>();
    let mut ringing: VecDeque<InstantMessagingCall> = VecDeque::new();
    let mut received = 0u64;
    let ctrl_c = session::interrupted();
    tokio::pin!(ctrl_c);
    let result = loop {
        if args.count.is_some_and(|count| received >= count) {
            break Ok(());
        }
        tokio::select! {
            call = incoming.recv() => {
                let Some(call) = call else {
                    // The endpoint is over: its link events are all printed, the last says why.
                    break Err(match (&mut link_events).await.ok().flatten() {
                        Some(reason) => anyhow!("the session with the node was lost: {reason}"),
                        None => anyhow!("the connection to the node closed"),
                    });
                };
                session::print_incoming(out, &call);
                tokio::spawn(follow_call(call.clone(), Arc::clone(out), received_tx.clone(), args.auto_accept));
                if !args.auto_accept && !call.is_immediate_auto_accept_needed() {
                    ringing.push_back(call);
                    if interactive {
                        out.note(|| out.paint(Tone::Dim, "  press Enter to accept"));
                    }
                }
            }
            line = next_line(&mut lines) => match line {
                Some(_) => on_enter(&endpoint, &mut ringing, out).await,
                // No more input (stdin closed or not a terminal): keep listening.
                None => lines = None,
            },
            Some(()) = received_rx.recv() => received += 1,
            _ = &mut ctrl_c => break Ok(()),
        }
    };
    if let Err(e) = endpoint.bye().await {
        tracing::debug!(error = %e, "bye failed");
    }
    result.map(|()| ExitCode::SUCCESS)
}

async fn next_line(lines: &mut Option<mpsc::UnboundedReceiver<String>>) -> Option<String> {
    match lines {
        Some(lines) => lines.recv().await,
        None => std::future::pending().await,
    }
}

/// A line typed: user input on this device, and a click on the oldest ringing call.
async fn on_enter(
    endpoint: &Endpoint,
    ringing: &mut VecDeque<InstantMessagingCall>,
    out: &Arc<Output>,
) {
    if let Err(e) = endpoint.publish_device_state(Activity::Active, 0).await {
        out.note(|| format!("could not publish the device state: {e}"));
    }
    ringing.retain(|call| call.state() == CallState::Incoming);
    let Some(call) = ringing.pop_front() else {
        out.event(
            || out.paint(Tone::Dim, "no call ringing; this device is now active"),
            || json!({"event": "activity", "activity": "active", "idle_ms": 0}),
        );
        return;
    };
    out.event(
        || {
            out.paint(
                Tone::Dim,
                &format!("accepting call {} from {}", call.id(), call.peer()),
            )
        },
        || json!({"event": "accepting", "call": call.id(), "from": call.peer(), "why": "click"}),
    );
    tokio::spawn(accept(call, Arc::clone(out)));
}

async fn accept(call: InstantMessagingCall, out: Arc<Output>) {
    match call.accept().await {
        Ok(()) => {}
        Err(ClientError::Server {
            code: ErrorCode::AnsweredElsewhere,
            ..
        }) => out.event(
            || {
                out.paint(
                    Tone::Dim,
                    &format!("call {} was answered on another device", call.id()),
                )
            },
            || json!({"event": "accept_failed", "call": call.id(), "error": "answered_elsewhere"}),
        ),
        // Its end shows in the call's state changes.
        Err(ClientError::CallEnded(_)) => {}
        Err(e) => out.event(
            || {
                out.paint(
                    Tone::Bad,
                    &format!("could not accept call {}: {e}", call.id()),
                )
            },
            || json!({"event": "accept_failed", "call": call.id(), "error": e.to_string()}),
        ),
    }
}

/// Prints a call's state changes and messages until it ends, and accepts it when the node asks
/// (or at once with `--auto-accept`).
async fn follow_call(
    call: InstantMessagingCall,
    out: Arc<Output>,
    received: mpsc::UnboundedSender<()>,
    auto_accept: bool,
) {
    if auto_accept {
        tokio::spawn(accept(call.clone(), Arc::clone(&out)));
    } else {
        let call = call.clone();
        let out = Arc::clone(&out);
        tokio::spawn(async move {
            let why = if call.is_immediate_auto_accept_needed() {
                "the only device of the user"
            } else if call.auto_accept_needed().await {
                "nobody clicked: the node chose this device as the most active"
            } else {
                return;
            };
            out.event(
                || out.paint(Tone::Dim, &format!("accepting call {} ({why})", call.id())),
                || {
                    json!({"event": "accepting", "call": call.id(), "from": call.peer(),
                           "why": if call.is_immediate_auto_accept_needed() { "immediate" } else { "auto_accept_needed" }})
                },
            );
            accept(call, out).await;
        });
    }
    let id = call.id().to_owned();
    let mut changes = call.state_changes();
    let mut messages = call.flow().received();
    let (mut changes_open, mut messages_open) = (true, true);
    let show = |message: &confab_client::ReceivedMessage| {
        session::print_message(&out, &id, message);
        let _ = received.send(());
    };
    while changes_open || messages_open {
        tokio::select! {
            biased;
            change = changes.next(), if changes_open => match change {
                Some(change) => {
                    if session::ends_the_call(&change) {
                        for message in session::ready_messages(&mut messages, &mut messages_open) {
                            show(&message);
                        }
                    }
                    session::print_state(&out, &id, &change);
                }
                None => changes_open = false,
            },
            message = messages.recv(), if messages_open => match message {
                Some(message) => show(&message),
                None => messages_open = false,
            },
        }
    }
}
