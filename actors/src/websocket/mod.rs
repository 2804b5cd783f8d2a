//! The WebSocket listener's connections (`[server.websocket]`, docs/protocol.md §1
//! "WebSocket"): the HTTP upgrade with its checks ([`upgrade`]), the web client's files served
//! beside it ([`pages`]), and a WebSocket's binary messages as the engine's frames
//! ([`messages`]). From the `hello` on, a WebSocket connection is served by the same session,
//! endpoint and writer task as a TCP one.

pub mod messages;
mod pages;
mod upgrade;

pub use messages::{WsFrames, WsWriter, close};
pub use upgrade::{SUBPROTOCOL, accept, refuse_overloaded, rejection_labels};
