//! [`InstantMessagingCall`]: one leg of an IM call, UCMA's class of the same name. Its state is
//! what the node reported, checked against the shared state machine (see `tracker`); its
//! methods are the seed's actions, each one request to the node.

mod inner;
mod tracker;

use std::sync::Arc;

use confab_protocol::state::{CallState, Direction};
use confab_protocol::{ClientMsg, Reason, Remote, ServerMsg, Toast};
use tokio::sync::{mpsc, oneshot, watch};

pub(crate) use inner::{CallInner, NewCall};
pub use inner::{CallSnapshot, ReceivedMessage, StateChange};

use crate::conversation::Conversation;
use crate::endpoint::{Ctx, Endpoint, ok_reply};
use crate::error::ClientError;
use crate::flow::InstantMessagingFlow;
use crate::queue::{public_stream, receiver_stream};
use crate::sync::lock;

/// SIP "Not Acceptable Here": the auto-accept's answer to an offer we cannot take.
const NOT_ACCEPTABLE_HERE: u16 = 488;

/// Options of [`InstantMessagingCall::establish`].
#[derive(Debug, Clone, Default)]
pub struct CallEstablishOptions {
    /// The SDP offer to send; `None` builds one from the endpoint's accept types.
    pub sdp: Option<String>,
}

public_stream! {
    /// A call's state changes, from its first one; see [`InstantMessagingCall::state_changes`].
    StateChanges => StateChange
}

/// One leg of an IM call; cheap to clone (all clones are the same call).
#[derive(Clone)]
pub struct InstantMessagingCall {
    endpoint: Endpoint,
    inner: Arc<CallInner>,
}

impl std::fmt::Debug for InstantMessagingCall {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("InstantMessagingCall")
            .field("id", &self.inner.id)
            .field("direction", &self.inner.direction)
            .field("state", &self.state())
            .finish_non_exhaustive()
    }
}

impl InstantMessagingCall {
    pub(crate) fn from_parts(endpoint: Endpoint, inner: Arc<CallInner>) -> Self {
        InstantMessagingCall { endpoint, inner }
    }

    pub(crate) fn inner(&self) -> &Arc<CallInner> {
        &self.inner
    }

    pub(crate) fn ctx(&self) -> &Arc<Ctx> {
        self.endpoint.ctx()
    }

    /// Calls `to` in `conversation` and waits until the call is established (UCMA's
    /// `BeginEstablish`/`EndEstablish`). The `toast` is the first message, shown to the callee
    /// before they accept.
    ///
    /// Fails with [`ClientError::CallEnded`] (and the node's reason: 480, 486, 603, ...) when
    /// the call ends instead. Use [`InstantMessagingCall::begin_establish`] to get the call
    /// while it rings (to cancel it, say). The future borrows nothing, so it can be spawned.
    pub fn establish(
        conversation: &Conversation,
        to: &str,
        toast: Option<Toast>,
        options: CallEstablishOptions,
    ) -> impl Future<Output = Result<InstantMessagingCall, ClientError>> + Send + use<> {
        let begin = Self::begin_establish(conversation, to, toast, options);
        async move {
            let call = begin.await?;
            call.established().await?;
            Ok(call)
        }
    }

    /// Calls `to` and returns as soon as the node has created the call (state `establishing`
    /// or about to be). Binds `conversation` to the node's conversation if it was new. The
    /// future borrows nothing, so it can be spawned. Dropping it once the request is out does
    /// not cancel the call: it still shows in [`Endpoint::calls`], to be terminated there.
    pub fn begin_establish(
        conversation: &Conversation,
        to: &str,
        toast: Option<Toast>,
        options: CallEstablishOptions,
    ) -> impl Future<Output = Result<InstantMessagingCall, ClientError>> + Send + use<> {
        let conversation = conversation.clone();
        let to = to.to_owned();
        async move { begin_establish(&conversation, to, toast, options).await }
    }

    /// Waits until the call is established: `Ok` once it has been (even if it has moved on
    /// since), [`ClientError::CallEnded`] if it ended first, [`ClientError::Closed`] if the
    /// connection ended first.
    pub async fn established(&self) -> Result<(), ClientError> {
        wait_established(&self.inner).await
    }

    /// Waits until the call is terminated and returns the node's reason.
    pub async fn terminated(&self) -> Result<Reason, ClientError> {
        let mut changes = self.inner.changes.subscribe();
        while let Some(change) = changes.recv().await {
            if change.state == CallState::Terminated {
                return Ok(reason_or_unknown(change.reason));
            }
        }
        Err(ClientError::Closed)
    }

    /// Accepts an inbound call with the default answer and waits until it is established
    /// (UCMA's `BeginAccept`/`EndAccept`). If the library is already accepting it
    /// (auto-accept), this waits for that accept instead of sending a second one.
    ///
    /// Fails with `answered_elsewhere` when another endpoint of the user won the call.
    pub async fn accept(&self) -> Result<(), ClientError> {
        accept_inner(self.ctx(), &self.inner, None).await
    }

    /// [`InstantMessagingCall::accept`] with an explicit SDP answer.
    pub async fn accept_with_answer(&self, sdp: String) -> Result<(), ClientError> {
        accept_inner(self.ctx(), &self.inner, Some(sdp)).await
    }

    /// Declines an inbound call. `None` is 486 Busy Here (this endpoint only); a 6xx code
    /// (603 Decline) declines it on every endpoint of the user.
    pub async fn decline(&self, code: Option<u16>) -> Result<(), ClientError> {
        self.request_ok(ClientMsg::CallDecline {
            rid: None,
            call: self.inner.id.clone(),
            code,
        })
        .await
    }

    /// Forwards an inbound, still ringing call to `to`.
    pub async fn forward(&self, to: &str) -> Result<(), ClientError> {
        self.request_ok(ClientMsg::CallForward {
            rid: None,
            call: self.inner.id.clone(),
            to: to.to_owned(),
        })
        .await
    }

    /// Transfers an established call to `to` (blind) and waits for the outcome: `Ok` when the
    /// transfer succeeded (this leg then ends with 202), [`ClientError::TransferFailed`] when
    /// it did not (the call is established again, with its old remote).
    pub async fn transfer(&self, to: &str) -> Result<(), ClientError> {
        // Subscribed before the request, so the outcome cannot slip past.
        let mut changes = self.inner.changes.subscribe_from_now();
        self.request_ok(ClientMsg::CallTransfer {
            rid: None,
            call: self.inner.id.clone(),
            to: to.to_owned(),
        })
        .await?;
        transfer_outcome(&mut changes).await
    }

    /// Terminates the call and waits until it is terminated (UCMA's
    /// `BeginTerminate`/`EndTerminate`). On a ringing inbound call this is a 486 decline.
    pub async fn terminate(&self) -> Result<(), ClientError> {
        if self.state() == CallState::Terminated {
            return Ok(());
        }
        self.request_ok(ClientMsg::CallTerminate {
            rid: None,
            call: self.inner.id.clone(),
        })
        .await?;
        self.terminated().await.map(|_| ())
    }

    /// Waits until the node asks this endpoint to auto-accept the call; true when it did,
    /// false when the call ended (or the connection did) first.
    pub async fn auto_accept_needed(&self) -> bool {
        let mut rx = self.inner.snapshot.subscribe();
        let result = rx
            .wait_for(|s| s.auto_accept_needed || s.state.is_final() || s.connection_lost)
            .await
            .map(|s| s.auto_accept_needed);
        result.unwrap_or(false)
    }

    /// The node's id of this leg.
    pub fn id(&self) -> &str {
        &self.inner.id
    }

    /// The id of the conversation the call belongs to.
    pub fn conversation_id(&self) -> &str {
        &self.inner.conversation
    }

    /// The conversation the call belongs to.
    pub fn conversation(&self) -> Conversation {
        Conversation::bound(&self.endpoint, self.inner.conversation.clone())
    }

    /// The endpoint that holds the call.
    pub fn endpoint(&self) -> &Endpoint {
        &self.endpoint
    }

    /// Whether this endpoint placed the call or received it.
    pub fn direction(&self) -> Direction {
        self.inner.direction
    }

    /// The current state, as last reported by the node.
    pub fn state(&self) -> CallState {
        self.inner.state()
    }

    /// Everything known about the call right now.
    pub fn snapshot(&self) -> CallSnapshot {
        self.inner.snapshot.borrow().clone()
    }

    /// A receiver that sees every new [`CallSnapshot`] (intermediate ones may be skipped; use
    /// [`InstantMessagingCall::state_changes`] to see every transition).
    pub fn watch(&self) -> watch::Receiver<CallSnapshot> {
        self.inner.snapshot.subscribe()
    }

    /// Every state change of the call, from the first one (even those before this call), in
    /// order; ends after `terminated` or when the connection ends.
    pub fn state_changes(&self) -> StateChanges {
        StateChanges::new(receiver_stream(self.inner.changes.subscribe()))
    }

    /// The other party once established (updated by a transfer).
    pub fn remote(&self) -> Option<Remote> {
        self.inner.snapshot.borrow().remote.clone()
    }

    /// The other user's URI: who was called (outbound) or who calls (inbound).
    pub fn peer(&self) -> &str {
        &self.inner.peer
    }

    /// The toast the call was placed with.
    pub fn toast(&self) -> Option<&Toast> {
        self.inner.toast.as_ref()
    }

    /// The call's SDP offer: ours (outbound) or the caller's (inbound).
    pub fn offer_sdp(&self) -> &str {
        &self.inner.offer
    }

    /// Whether the node asked this endpoint to accept at once (the user's only endpoint). UCMA's
    /// `IsImmediateAutoAcceptNeeded`; with [`crate::AutoAcceptPolicy::Accept`] the library has
    /// already done so.
    pub fn is_immediate_auto_accept_needed(&self) -> bool {
        self.inner.immediate_auto_accept
    }

    /// The call's instant messaging flow.
    pub fn flow(&self) -> InstantMessagingFlow {
        InstantMessagingFlow::new(self.clone())
    }

    async fn request_ok(&self, msg: ClientMsg) -> Result<(), ClientError> {
        ok_reply(self.ctx().conn.request(msg).await?)
    }
}

/// See [`InstantMessagingCall::begin_establish`].
async fn begin_establish(
    conversation: &Conversation,
    to: String,
    toast: Option<Toast>,
    options: CallEstablishOptions,
) -> Result<InstantMessagingCall, ClientError> {
    let endpoint = conversation.endpoint().clone();
    let ctx = Arc::clone(endpoint.ctx());
    let offer = options.sdp.unwrap_or_else(|| ctx.default_offer());
    // Two calls placed at once in a new conversation must not create two conversations.
    let _binding = conversation.binding().await;
    let requested = conversation.id().map(str::to_owned);

    // The call is created on the reader task, from the reply, so that it is registered
    // before the node's next frame (its first call_state) is dispatched.
    let (created_tx, created_rx) = oneshot::channel();
    let new = NewCall {
        id: String::new(),
        conversation: String::new(),
        direction: Direction::Outbound,
        peer: to.clone(),
        toast: toast.clone(),
        offer: offer.clone(),
        immediate_auto_accept: false,
        message_capacity: ctx.options.message_queue,
    };
    let hook_ctx = Arc::clone(&ctx);
    let register = move |reply: &ServerMsg| {
        if let ServerMsg::CallCreated {
            call, conversation, ..
        } = reply
        {
            let inner = Arc::new(CallInner::new(NewCall {
                id: call.clone(),
                conversation: conversation.clone(),
                ..new
            }));
            hook_ctx.registry.insert(Arc::clone(&inner));
            let _ = created_tx.send(inner);
        }
    };
    let request = ClientMsg::CallEstablish {
        rid: None,
        to,
        conversation: requested.clone(),
        toast,
        sdp: offer,
    };
    let reply = ctx.conn.request_then(request, register).await?;
    let ServerMsg::CallCreated {
        conversation: created,
        ..
    } = reply
    else {
        return Err(ClientError::Protocol(format!(
            "expected call_created, got {reply:?}"
        )));
    };
    match requested {
        None => conversation.bind(created),
        Some(requested) if requested != created => {
            tracing::warn!(%requested, %created, "the node put the call in another conversation");
        }
        Some(_) => {}
    }
    let inner = created_rx
        .await
        .map_err(|_| ClientError::Protocol("call_created was not registered".to_owned()))?;
    Ok(InstantMessagingCall { endpoint, inner })
}

/// Accepts `inner`; shared by the public `accept` and the auto-accept task.
async fn accept_inner(
    ctx: &Arc<Ctx>,
    inner: &Arc<CallInner>,
    answer: Option<String>,
) -> Result<(), ClientError> {
    let already = std::mem::replace(&mut *lock(&inner.accepting), true);
    if already {
        return wait_established(inner).await;
    }
    let result = async {
        let answer = match answer {
            Some(answer) => answer,
            None => ctx.default_answer(&inner.offer)?,
        };
        // Stored first: call_established, which needs it to negotiate, follows the reply.
        *lock(&inner.answer) = Some(answer.clone());
        let request = ClientMsg::CallAccept {
            rid: None,
            call: inner.id.clone(),
            sdp: answer,
        };
        ok_reply(ctx.conn.request(request).await?)
    }
    .await;
    if let Err(e) = result {
        // A failed accept (not_acceptable, say) may be retried with another answer.
        *lock(&inner.accepting) = false;
        return Err(e);
    }
    wait_established(inner).await
}

/// See [`InstantMessagingCall::established`]. The whole history is scanned, so a call that was
/// established before the wait began still counts.
async fn wait_established(inner: &CallInner) -> Result<(), ClientError> {
    let mut changes = inner.changes.subscribe();
    while let Some(change) = changes.recv().await {
        match change.state {
            CallState::Established => {
                // `call_established` (with the remote party) may follow the `call_state`; the
                // call is not usable until it is known.
                let mut snapshot = inner.snapshot.subscribe();
                return match snapshot
                    .wait_for(|s| s.remote.is_some() || s.state.is_final())
                    .await
                {
                    Ok(_) => Ok(()),
                    Err(_) => Err(ClientError::Closed),
                };
            }
            CallState::Terminating | CallState::Terminated => {
                return Err(ClientError::CallEnded(reason_or_unknown(change.reason)));
            }
            _ => {}
        }
    }
    Err(ClientError::Closed)
}

/// What the library does when the node asks it to accept (policy `Accept`).
pub(crate) async fn auto_accept(ctx: Arc<Ctx>, inner: Arc<CallInner>) {
    match accept_inner(&ctx, &inner, None).await {
        Ok(()) => tracing::debug!(call = %inner.id, "auto-accepted"),
        Err(ClientError::Sdp(e)) => {
            tracing::info!(call = %inner.id, error = %e, "cannot answer the offer; declining");
            let decline = ClientMsg::CallDecline {
                rid: None,
                call: inner.id.clone(),
                code: Some(NOT_ACCEPTABLE_HERE),
            };
            if let Err(e) = ctx.conn.request(decline).await {
                tracing::debug!(call = %inner.id, error = %e, "declining failed");
            }
        }
        // Losing the race to another fork or the call ending is normal life for a fork.
        Err(e) => tracing::debug!(call = %inner.id, error = %e, "auto-accept did not complete"),
    }
}

async fn transfer_outcome(
    changes: &mut mpsc::UnboundedReceiver<StateChange>,
) -> Result<(), ClientError> {
    /// The transferor's leg ends with this code when the transfer succeeded.
    const TRANSFERRED: u16 = 202;
    while let Some(change) = changes.recv().await {
        if change.previous != CallState::Transferring {
            continue;
        }
        let reason = reason_or_unknown(change.reason);
        return match change.state {
            CallState::Established => Err(ClientError::TransferFailed(reason)),
            _ if reason.code == TRANSFERRED => Ok(()),
            _ => Err(ClientError::CallEnded(reason)),
        };
    }
    Err(ClientError::Closed)
}

/// The contract always gives a reason where this is used; a node that forgets gets code 0
/// rather than a panic.
fn reason_or_unknown(reason: Option<Reason>) -> Reason {
    reason.unwrap_or_else(|| Reason::new(0, "no reason given"))
}
