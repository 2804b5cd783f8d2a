//! [`Endpoint`]: one signed-in device of one user, UCMA's `UserEndpoint`. It owns the
//! connection, publishes device state and status, watches presence, and surfaces inbound calls;
//! its dispatcher (see `dispatch`) routes the node's events to the call objects.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use confab_protocol::sdp::{self, DEFAULT_ACCEPT_TYPE};
use confab_protocol::{Activity, ClientMsg, ErrorCode, ServerMsg, Status};
use tokio::net::ToSocketAddrs;
use tokio_util::sync::CancellationToken;

use crate::call::{CallInner, InstantMessagingCall};
use crate::connection::{Connection, ConnectionOptions, Hello, LinkEvent, Welcome};
use crate::conversation::Conversation;
use crate::dispatch;
use crate::error::ClientError;
use crate::presence::{self, PresenceRouter, PresenceStream};
use crate::queue::{SharedQueue, public_stream, receiver_stream};
use crate::registry::Registry;

/// How long `bye` waits for the node to close the connection after its `ok`.
const BYE_GRACE: Duration = Duration::from_secs(5);

/// What the library does when the node asks this endpoint to accept a call: on
/// `auto_accept_needed`, and on a `call_incoming` with `immediate_auto_accept`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum AutoAcceptPolicy {
    /// Accept at once with the default answer, as the seed says the endpoint should. The call
    /// is still surfaced by [`Endpoint::incoming_calls`].
    #[default]
    Accept,
    /// Only record it ([`InstantMessagingCall::auto_accept_needed`],
    /// [`InstantMessagingCall::is_immediate_auto_accept_needed`]); the application decides.
    Notify,
}

/// Knobs of an endpoint; `EndpointOptions::default()` is what most applications want.
#[derive(Debug, Clone)]
pub struct EndpointOptions {
    /// See [`AutoAcceptPolicy`].
    pub auto_accept: AutoAcceptPolicy,
    /// Content types offered and accepted by default (`text/plain`).
    pub accept_types: Vec<String>,
    /// Our `a=max-size` in offers and answers, if any.
    pub max_message_size: Option<u64>,
    /// Received messages buffered per call before the library stops acking (the sender then
    /// gets 408 rather than this endpoint stalling).
    pub message_queue: usize,
    /// Inbound calls buffered before the library declines new ones with 486 Busy Here.
    pub incoming_queue: usize,
    /// Connection knobs.
    pub connection: ConnectionOptions,
}

impl Default for EndpointOptions {
    fn default() -> Self {
        EndpointOptions {
            auto_accept: AutoAcceptPolicy::Accept,
            accept_types: vec![DEFAULT_ACCEPT_TYPE.to_owned()],
            max_message_size: None,
            message_queue: 1024,
            incoming_queue: 256,
            connection: ConnectionOptions::default(),
        }
    }
}

/// Something about the endpoint as a whole that the node pushed.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum EndpointEvent {
    /// The node is shutting down: its calls will end with 503, then it closes.
    Shutdown {
        /// Human text.
        reason: String,
        /// When to try another connection.
        reconnect_after_ms: u64,
    },
    /// An operator ended this session (`kicked`): its calls end as on `bye`, then the node
    /// closes the connection. Signing in again is allowed.
    Kicked {
        /// The operator's reason.
        reason: String,
    },
    /// On a resumable session (see [`crate::ConnectionOptions::resume`]), news of its link:
    /// reconnecting, resumed, or lost. When lost, requests still waiting failed with
    /// [`ClientError::SessionLost`] and every call ended here with 408, as the node ends them
    /// for their remote parties; the endpoint is closed, sign in again for a new one.
    Link(LinkEvent),
    /// An `error` that answers no request (e.g. to a malformed `message_ack`).
    Error {
        /// The contract's code.
        code: ErrorCode,
        /// Human text.
        message: String,
    },
}

public_stream! {
    /// Inbound calls, in the order the node announced them; see [`Endpoint::incoming_calls`].
    IncomingCalls => InstantMessagingCall
}

public_stream! {
    /// Endpoint-wide events; see [`Endpoint::events`].
    EndpointEvents => EndpointEvent
}

/// What the endpoint handles, the calls and the dispatcher share.
pub(crate) struct Ctx {
    pub(crate) conn: Connection,
    pub(crate) welcome: Welcome,
    pub(crate) user: String,
    pub(crate) options: EndpointOptions,
    pub(crate) registry: Registry,
    pub(crate) presence: PresenceRouter,
    pub(crate) incoming: SharedQueue<Arc<CallInner>>,
    pub(crate) events: SharedQueue<EndpointEvent>,
    /// Cancelled once the dispatcher has handled the connection's last event.
    pub(crate) dispatched: CancellationToken,
}

impl Ctx {
    pub(crate) fn default_offer(&self) -> String {
        sdp::build_offer(&self.accept_types(), self.options.max_message_size)
    }

    pub(crate) fn default_answer(&self, offer: &str) -> Result<String, ClientError> {
        Ok(sdp::build_answer(
            offer,
            &self.accept_types(),
            self.options.max_message_size,
        )?)
    }

    fn accept_types(&self) -> Vec<&str> {
        self.options
            .accept_types
            .iter()
            .map(String::as_str)
            .collect()
    }
}

/// A signed-in device of a user; cheap to clone. The connection stays open while any handle
/// to the endpoint, or to one of its calls or conversations, exists; dropping the last one
/// closes it abruptly (the node sees a lost endpoint), so prefer [`Endpoint::bye`].
#[derive(Clone)]
pub struct Endpoint {
    inner: Arc<EndpointInner>,
}

struct EndpointInner {
    ctx: Arc<Ctx>,
}

impl Drop for EndpointInner {
    fn drop(&mut self) {
        // The dispatcher holds the context (and so the connection) for as long as the
        // connection runs; only the last application handle can end it.
        self.ctx.conn.close();
    }
}

impl std::fmt::Debug for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Endpoint")
            .field("id", &self.id())
            .field("user", &self.user())
            .finish_non_exhaustive()
    }
}

impl Endpoint {
    /// Signs `user` in on `device` at the node `server` with a JWT `token`, using the default
    /// [`EndpointOptions`].
    pub async fn connect(
        server: impl ToSocketAddrs,
        user: &str,
        token: &str,
        device: &str,
    ) -> Result<Endpoint, ClientError> {
        Self::connect_with(
            server,
            Hello::new(user, token, device),
            EndpointOptions::default(),
        )
        .await
    }

    /// [`Endpoint::connect`] with an explicit `hello` and options.
    pub async fn connect_with(
        server: impl ToSocketAddrs,
        hello: Hello,
        options: EndpointOptions,
    ) -> Result<Endpoint, ClientError> {
        let user = presence::normalize(&hello.user);
        let (conn, welcome, events) =
            Connection::connect_with(server, hello, options.connection.clone()).await?;
        let ctx = Arc::new(Ctx {
            conn,
            welcome,
            user,
            registry: Registry::default(),
            presence: PresenceRouter::default(),
            incoming: SharedQueue::new(options.incoming_queue),
            events: SharedQueue::new(64),
            dispatched: CancellationToken::new(),
            options,
        });
        tokio::spawn(dispatch::run(Arc::clone(&ctx), events));
        Ok(Endpoint {
            inner: Arc::new(EndpointInner { ctx }),
        })
    }

    pub(crate) fn ctx(&self) -> &Arc<Ctx> {
        &self.inner.ctx
    }

    /// The node-assigned endpoint id.
    pub fn id(&self) -> &str {
        &self.inner.ctx.welcome.endpoint
    }

    /// The signed-in user, normalised.
    pub fn user(&self) -> &str {
        &self.inner.ctx.user
    }

    /// The node's `welcome`.
    pub fn welcome(&self) -> &Welcome {
        &self.inner.ctx.welcome
    }

    /// The underlying connection, for requests this API does not wrap.
    pub fn connection(&self) -> &Connection {
        &self.inner.ctx.conn
    }

    /// Publishes this device's activity; `idle_ms` is how long ago the user last gave input.
    pub async fn publish_device_state(
        &self,
        activity: Activity,
        idle_ms: u64,
    ) -> Result<(), ClientError> {
        self.request_ok(ClientMsg::DeviceState {
            rid: None,
            activity,
            idle_ms: Some(idle_ms),
        })
        .await
    }

    /// Sets the user's manual status (for all their endpoints); `None` clears it.
    pub async fn set_status(&self, status: Option<Status>) -> Result<(), ClientError> {
        self.request_ok(ClientMsg::SetStatus { rid: None, status })
            .await
    }

    /// Watches the presence of `users`. The stream gets one update per user at once, then one
    /// per change.
    pub async fn subscribe<I>(&self, users: I) -> Result<PresenceStream, ClientError>
    where
        I: IntoIterator,
        I::Item: AsRef<str>,
    {
        let users: Vec<String> = users.into_iter().map(|u| u.as_ref().to_owned()).collect();
        let normalised: HashSet<String> = users.iter().map(|u| presence::normalize(u)).collect();
        let presence = &self.inner.ctx.presence;
        let (id, rx) = presence.add(normalised);
        match self
            .request_ok(ClientMsg::Subscribe { rid: None, users })
            .await
        {
            Ok(()) => Ok(PresenceStream::new(receiver_stream(rx))),
            Err(e) => {
                presence.remove(id);
                Err(e)
            }
        }
    }

    /// Stops watching `users`, for every [`PresenceStream`] of this endpoint (the node keeps
    /// one subscription per endpoint).
    pub async fn unsubscribe<I>(&self, users: I) -> Result<(), ClientError>
    where
        I: IntoIterator,
        I::Item: AsRef<str>,
    {
        let users: Vec<String> = users.into_iter().map(|u| u.as_ref().to_owned()).collect();
        let normalised: HashSet<String> = users.iter().map(|u| presence::normalize(u)).collect();
        self.request_ok(ClientMsg::Unsubscribe { rid: None, users })
            .await?;
        self.inner.ctx.presence.remove_users(&normalised);
        Ok(())
    }

    /// Inbound calls (UCMA's call-received event), each an [`InstantMessagingCall`] in state
    /// `incoming`. Calls are buffered from sign-in, so none is missed before this is called;
    /// several streams share one queue.
    pub fn incoming_calls(&self) -> IncomingCalls {
        let endpoint = self.clone();
        let stream = futures::StreamExt::map(self.inner.ctx.incoming.stream(), move |inner| {
            InstantMessagingCall::from_parts(endpoint.clone(), inner)
        });
        IncomingCalls::new(futures::StreamExt::boxed(stream))
    }

    /// Endpoint-wide events (`shutdown`, `kicked`, stray `error`s, and on a resumable session
    /// news of the link: [`EndpointEvent::Link`]).
    pub fn events(&self) -> EndpointEvents {
        EndpointEvents::new(self.inner.ctx.events.stream())
    }

    /// A new conversation to place calls in.
    pub fn new_conversation(&self) -> Conversation {
        Conversation::new(self)
    }

    /// The calls this endpoint currently holds (not yet terminated).
    pub fn calls(&self) -> Vec<InstantMessagingCall> {
        self.inner
            .ctx
            .registry
            .all()
            .into_iter()
            .map(|inner| InstantMessagingCall::from_parts(self.clone(), inner))
            .collect()
    }

    /// Signs out cleanly: the node terminates this endpoint's calls (their final events arrive
    /// before this returns), updates presence and closes the connection.
    pub async fn bye(&self) -> Result<(), ClientError> {
        self.request_ok(ClientMsg::Bye { rid: None }).await?;
        if tokio::time::timeout(BYE_GRACE, self.closed())
            .await
            .is_err()
        {
            tracing::warn!("the node did not close the connection after bye; closing it");
            self.inner.ctx.conn.close();
            self.closed().await;
        }
        Ok(())
    }

    /// Whether the connection has ended (or is ending).
    pub fn is_closed(&self) -> bool {
        self.inner.ctx.conn.is_closed()
    }

    /// Waits until the connection has ended and every event received before that has reached
    /// its call, stream or watcher.
    pub async fn closed(&self) {
        self.inner.ctx.dispatched.cancelled().await;
    }

    async fn request_ok(&self, msg: ClientMsg) -> Result<(), ClientError> {
        ok_reply(self.inner.ctx.conn.request(msg).await?)
    }
}

/// Maps a reply that must be `ok`.
pub(crate) fn ok_reply(reply: ServerMsg) -> Result<(), ClientError> {
    match reply {
        ServerMsg::Ok { .. } => Ok(()),
        other => Err(ClientError::Protocol(format!("expected ok, got {other:?}"))),
    }
}
