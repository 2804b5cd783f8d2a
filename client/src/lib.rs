//! # confab-client
//!
//! The Rust client library of confab, with an async API shaped like UCMA's:
//!
//! - [`Endpoint`]: one signed-in device of a user (UCMA's `UserEndpoint`): device state,
//!   manual status, presence subscriptions, inbound calls, `bye`.
//! - [`Conversation`]: a group of calls; terminating it terminates them all.
//! - [`InstantMessagingCall`]: one call leg with its state (checked against the shared state
//!   machine of `confab-protocol` on every `call_state`), `establish`, `accept`, `decline`,
//!   `forward`, `transfer`, `terminate`, and automatic acceptance as the seed prescribes
//!   ([`AutoAcceptPolicy`]).
//! - [`InstantMessagingFlow`]: the messages of a call: `send` waits for the delivery outcome,
//!   received messages are acked for you, composing state is refreshed for you.
//! - [`Connection`]: the layer below, for tools that speak the protocol directly: requests
//!   matched to replies by `rid`, events as a stream, heartbeat.
//! - Resumable sessions, opt-in with [`ConnectionOptions::resume`] (a [`Reconnect`] policy):
//!   when the link drops (closed, failed, or the node silent for three heartbeats) the library
//!   reconnects with backoff within the node's window and resumes the session
//!   (docs/protocol.md §3 "Resuming"). Requests, calls and messages carry on across the drop,
//!   each frame of both sides delivered exactly once; [`EndpointEvent::Link`] says
//!   [`LinkEvent::Reconnecting`], [`LinkEvent::Resumed`] or, when the node refuses or the
//!   window passes, [`LinkEvent::Lost`] (pending requests then fail with
//!   [`ClientError::SessionLost`] and calls end locally with 408).
//! - [`token::mint`]: HS256 tokens for `hello`, for tests, the CLI and the bench.
//!
//! ```no_run
//! use std::time::Duration;
//! use confab_client::{CallEstablishOptions, Conversation, Endpoint, InstantMessagingCall, token};
//! use confab_client::protocol::{Body, Toast};
//!
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! let secret = "change-me";
//! let alice_token = token::mint("sip:alice@example.com", secret, Duration::from_secs(3600));
//! let alice = Endpoint::connect("127.0.0.1:5070", "sip:alice@example.com", &alice_token, "laptop").await?;
//!
//! let bob_token = token::mint("sip:bob@example.com", secret, Duration::from_secs(3600));
//! let bob = Endpoint::connect("127.0.0.1:5070", "sip:bob@example.com", &bob_token, "phone").await?;
//! let mut ringing = bob.incoming_calls();
//!
//! // Alice calls Bob with a toast; Bob's only endpoint is asked to accept at once, and the
//! // library does so by default.
//! let toast = Toast { content_type: "text/plain".into(), body: Body::from("lunch?") };
//! let conversation = Conversation::new(&alice);
//! let call = InstantMessagingCall::establish(
//!     &conversation, "sip:bob@example.com", Some(toast), CallEstablishOptions::default(),
//! ).await?;
//!
//! let inbound = ringing.recv().await.ok_or("no call")?;
//! let mut messages = inbound.flow().received();
//! let toast = messages.recv().await.ok_or("no toast")?;
//! assert!(toast.toast);
//!
//! let msg = call.flow().send_text("12:30 at the usual place").await?;
//! let got = messages.recv().await.ok_or("no message")?;
//! assert_eq!(got.msg, msg);
//!
//! call.terminate().await?;
//! alice.bye().await?;
//! bob.bye().await?;
//! # Ok(())
//! # }
//! ```
//!
//! Everything the node sends is checked, never trusted: a malformed frame is logged and
//! skipped, a reply of the wrong kind is a [`ClientError::Protocol`], and nothing in this
//! library panics on the node's input.

#![warn(missing_docs)]

pub mod call;
pub mod connection;
mod conversation;
mod dispatch;
mod endpoint;
pub mod error;
mod flow;
pub mod presence;
mod queue;
mod registry;
mod sync;
pub mod token;

pub use call::{
    CallEstablishOptions, CallSnapshot, InstantMessagingCall, ReceivedMessage, StateChange,
    StateChanges,
};
pub use connection::{
    ClientTls, Connection, ConnectionOptions, Events, Hello, Inbound, LinkEvent, Reconnect, Welcome,
};
pub use conversation::Conversation;
pub use endpoint::{
    AutoAcceptPolicy, Endpoint, EndpointEvent, EndpointEvents, EndpointOptions, IncomingCalls,
};
pub use error::{ClientError, DeliveryError};
pub use flow::{InstantMessagingFlow, MessageStream};
pub use presence::{PresenceStream, PresenceUpdate};

/// The wire protocol crate, re-exported so applications need only this one dependency.
pub use confab_protocol as protocol;
pub use confab_protocol::{
    Activity, Availability, CallState, Direction, Reason, Remote, Status, Toast,
};
