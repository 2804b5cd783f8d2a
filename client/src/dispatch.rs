//! The endpoint's event dispatcher: one task that takes the connection's events in arrival
//! order and hands each to the call, presence stream or endpoint queue it is about. Being the
//! only consumer, it applies every call's events in the node's order; it never waits on the
//! application (queues are pushed without blocking) and starts a task for anything that needs
//! a round trip (auto-accept).

use std::sync::Arc;

use confab_protocol::{CallState, ClientMsg, Direction, Reason, ServerMsg};

use crate::call::{self, CallInner, NewCall, ReceivedMessage};
use crate::connection::{Events, Inbound, LinkEvent};
use crate::endpoint::{AutoAcceptPolicy, Ctx, EndpointEvent};
use crate::presence::PresenceUpdate;
use crate::queue::PushError;

/// SIP "Busy Here": what an endpoint that cannot take one more call answers.
const BUSY_HERE: u16 = 486;

/// What a call lost with its session ends with, here as on the node (section 3, "Resuming").
const LOST_CODE: u16 = 408;

pub(crate) async fn run(ctx: Arc<Ctx>, mut events: Events) {
    while let Some(item) = events.recv_inbound().await {
        match item {
            Inbound::Frame(event) => dispatch(&ctx, event),
            Inbound::Link(link) => on_link(&ctx, link),
        }
    }
    // The connection is gone: wake everything that waits on it.
    for call in ctx.registry.drain() {
        call.detach();
    }
    ctx.incoming.close();
    ctx.events.close();
    ctx.presence.close();
    ctx.dispatched.cancel();
    tracing::debug!(endpoint = %ctx.welcome.endpoint, "dispatcher finished");
}

fn dispatch(ctx: &Arc<Ctx>, event: ServerMsg) {
    match event {
        ServerMsg::CallIncoming {
            call,
            conversation,
            from,
            toast,
            sdp,
            immediate_auto_accept,
        } => incoming(
            ctx,
            NewCall {
                id: call,
                conversation,
                direction: Direction::Inbound,
                peer: from,
                toast,
                offer: sdp,
                immediate_auto_accept,
                message_capacity: ctx.options.message_queue,
            },
        ),
        ServerMsg::CallState {
            call,
            direction,
            state,
            previous,
            reason,
            ..
        } => {
            if let Some(inner) = find(ctx, &call, "call_state") {
                // Removed first, so whoever wakes up on `terminated` no longer sees the call
                // among the endpoint's calls.
                if state == CallState::Terminated {
                    ctx.registry.remove(&call);
                }
                inner.on_state(direction, previous, state, reason);
            }
        }
        ServerMsg::CallRinging { call } => {
            // The ringing itself shows as the establishing -> establishing call_state.
            find(ctx, &call, "call_ringing");
        }
        ServerMsg::CallEstablished { call, sdp, remote } => {
            if let Some(inner) = find(ctx, &call, "call_established") {
                inner.on_established(&sdp, remote);
            }
        }
        ServerMsg::AutoAcceptNeeded { call } => {
            if let Some(inner) = find(ctx, &call, "auto_accept_needed") {
                inner.on_auto_accept_needed();
                if ctx.options.auto_accept == AutoAcceptPolicy::Accept {
                    spawn_auto_accept(ctx, inner);
                }
            }
        }
        ServerMsg::CallForwarded { call, to } => {
            if let Some(inner) = find(ctx, &call, "call_forwarded") {
                inner.on_forwarded(to);
            }
        }
        ServerMsg::CallTransferred { call, remote } => {
            if let Some(inner) = find(ctx, &call, "call_transferred") {
                inner.on_transferred(remote);
            }
        }
        ServerMsg::MessageReceived {
            call,
            msg,
            from,
            content_type,
            body,
            toast,
        } => received(
            ctx,
            &call,
            ReceivedMessage {
                msg,
                from,
                content_type,
                body,
                toast: toast.unwrap_or(false),
            },
        ),
        // The connection's reader consumes it on a resumable session.
        ServerMsg::Seen { .. } => {}
        ServerMsg::RemoteComposing { call, active } => {
            if let Some(inner) = find(ctx, &call, "remote_composing") {
                inner.on_remote_composing(active);
            }
        }
        ServerMsg::Presence {
            user,
            availability,
            most_active,
            endpoints,
            status,
        } => ctx.presence.route(&PresenceUpdate {
            user,
            availability,
            most_active,
            endpoints,
            status,
        }),
        ServerMsg::Shutdown {
            reason,
            reconnect_after_ms,
        } => {
            tracing::info!(%reason, reconnect_after_ms, "the node is shutting down");
            push_endpoint_event(
                ctx,
                EndpointEvent::Shutdown {
                    reason,
                    reconnect_after_ms,
                },
            );
        }
        ServerMsg::Kicked { reason } => {
            tracing::info!(%reason, "an operator ended this session");
            push_endpoint_event(ctx, EndpointEvent::Kicked { reason });
        }
        ServerMsg::Error { code, message, .. } => {
            tracing::warn!(code = code.as_str(), %message, "error from the node, for no request");
            push_endpoint_event(ctx, EndpointEvent::Error { code, message });
        }
        other @ (ServerMsg::Welcome { .. }
        | ServerMsg::Ok { .. }
        | ServerMsg::Pong { .. }
        | ServerMsg::CallCreated { .. }
        | ServerMsg::MessageDelivered { .. }
        | ServerMsg::MessageFailed { .. }) => {
            // Replies without a rid answer no request of ours (we always send one).
            tracing::warn!(?other, "reply without rid; dropped");
        }
    }
}

/// News of the link, surfaced as an endpoint event; a lost session also ends every call here,
/// as the node ends them (408) for their remote parties when its window passes.
fn on_link(ctx: &Ctx, event: LinkEvent) {
    if let LinkEvent::Lost { .. } = event {
        let why = Reason::new(LOST_CODE, "Connection to the node lost");
        for call in ctx.registry.drain() {
            call.end_locally(why.clone());
        }
    }
    push_endpoint_event(ctx, EndpointEvent::Link(event));
}

/// The call an event names; a miss is logged, since the node should only name our calls.
fn find(ctx: &Ctx, call: &str, what: &'static str) -> Option<Arc<CallInner>> {
    let found = ctx.registry.get(call);
    if found.is_none() {
        tracing::warn!(
            call,
            event = what,
            "event for a call this endpoint does not hold"
        );
    }
    found
}

fn incoming(ctx: &Arc<Ctx>, new: NewCall) {
    let inner = Arc::new(CallInner::new(new));
    // Registered before anything else, so the call's next events find it.
    ctx.registry.insert(Arc::clone(&inner));
    match ctx.incoming.push(Arc::clone(&inner)) {
        Ok(()) => {
            if inner.immediate_auto_accept && ctx.options.auto_accept == AutoAcceptPolicy::Accept {
                spawn_auto_accept(ctx, inner);
            }
        }
        Err(PushError::Full) => {
            tracing::warn!(call = %inner.id, "too many unhandled inbound calls; declining");
            let conn = ctx.conn.clone();
            let call = inner.id.clone();
            tokio::spawn(async move {
                let decline = ClientMsg::CallDecline {
                    rid: None,
                    call,
                    code: Some(BUSY_HERE),
                };
                if let Err(e) = conn.request(decline).await {
                    tracing::debug!(error = %e, "declining an unhandled call failed");
                }
            });
        }
        Err(PushError::Closed) => {}
    }
}

fn spawn_auto_accept(ctx: &Arc<Ctx>, inner: Arc<CallInner>) {
    tokio::spawn(call::auto_accept(Arc::clone(ctx), inner));
}

fn received(ctx: &Ctx, call: &str, message: ReceivedMessage) {
    let Some(inner) = find(ctx, call, "message_received") else {
        // Not acked: the sender learns (408) that nobody took it.
        return;
    };
    let msg = message.msg;
    match inner.on_message(message) {
        Ok(()) => {
            let ack = ClientMsg::MessageAck {
                call: call.to_owned(),
                msg,
            };
            if let Err(e) = ctx.conn.send(ack) {
                tracing::debug!(error = %e, "could not ack a message");
            }
        }
        // Not acked either: a slow application makes the sender see 408, not the endpoint stall.
        Err(PushError::Full) => {
            tracing::warn!(call, msg, "message queue full; message not acked");
        }
        Err(PushError::Closed) => tracing::debug!(call, msg, "message for a finished call"),
    }
}

fn push_endpoint_event(ctx: &Ctx, event: EndpointEvent) {
    if ctx.events.push(event).is_err() {
        tracing::debug!("endpoint event queue full or closed; event dropped");
    }
}
