//! The confab wire protocol, version 1: the messages of both directions, the length-prefixed
//! MessagePack framing, SDP for the `message` media and the InstantMessagingCall state machine.
//!
//! This crate is pure: no sockets, no actors, no clocks. The node, the client library, the bench
//! and the tests all build on it, so a rule written here is the same rule everywhere.

pub mod codec;
pub mod hot;
pub mod messages;
pub mod peek;
pub mod proxy;
pub mod sdp;
pub mod state;
pub mod uri;

pub use codec::{FrameCodec, FrameError};
pub use messages::*;
pub use state::{CallEvent, CallState, Direction, TransitionError};

/// The only protocol version this crate speaks.
pub const PROTOCOL_VERSION: u32 = 1;
/// Default upper bound on a frame body, in bytes (node setting `server.max_frame`).
pub const DEFAULT_MAX_FRAME: usize = 65536;
