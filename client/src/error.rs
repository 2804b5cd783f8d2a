//! The library's error types: [`ClientError`] for everything that can go wrong between the
//! application and the node, and [`DeliveryError`] for a message that did not reach the other
//! side. Kept in one place so that every API returns the same, matchable errors.

use confab_protocol::sdp::SdpError;
use confab_protocol::{ErrorCode, FrameError, Reason};
use thiserror::Error;

/// Anything that can fail in a request to the node or on the connection.
#[derive(Debug, Error)]
pub enum ClientError {
    /// The node answered the request with `error{code, message}`.
    #[error("the node refused the request: {} ({message})", .code.as_str())]
    Server {
        /// The contract's error code (protocol §6).
        code: ErrorCode,
        /// Human text from the node; never parse it.
        message: String,
    },
    /// The connection is gone (closed by either side, or lost); nothing more can be sent.
    #[error("the connection to the node is closed")]
    Closed,
    /// A resumable session could not be resumed after its link dropped (the node refused, or
    /// its window passed); the text says why. Nothing more can be sent.
    #[error("the session with the node was lost: {0}")]
    SessionLost(String),
    /// The socket failed.
    #[error("i/o error: {0}")]
    Io(#[from] std::io::Error),
    /// The node sent something the contract does not allow here (a reply of the wrong kind, an
    /// illegal frame). The connection may still be usable.
    #[error("protocol violation: {0}")]
    Protocol(String),
    /// A message could not be encoded, or its frame is larger than the node accepts; nothing
    /// was sent, so the connection is intact.
    #[error("frame not sent: {0}")]
    Frame(#[from] FrameError),
    /// The message has no `rid` field, so it cannot be a request; use `Connection::send`.
    #[error("`{0}` carries no rid and gets no reply; send it instead of requesting it")]
    NotARequest(&'static str),
    /// TLS could not be set up: a CA file that does not load, or a failed handshake (the
    /// node's certificate not trusted or not for this name, or the node not speaking TLS).
    #[error("TLS: {0}")]
    Tls(String),
    /// The node did not answer within the time this library allows (e.g. the `hello`).
    #[error("timed out waiting for {0}")]
    Timeout(&'static str),
    /// The call ended (or never got going) before the awaited state was reached.
    #[error("the call ended: {} {}", .0.code, .0.text)]
    CallEnded(Reason),
    /// A transfer did not succeed; the call is still established with its old remote.
    #[error("the transfer failed: {} {}", .0.code, .0.text)]
    TransferFailed(Reason),
    /// An SDP offer could not be answered with the content types this endpoint supports.
    #[error("SDP: {0}")]
    Sdp(#[from] SdpError),
}

impl ClientError {
    /// The node's error code, when this is a [`ClientError::Server`] error.
    pub fn server_code(&self) -> Option<ErrorCode> {
        match self {
            ClientError::Server { code, .. } => Some(*code),
            _ => None,
        }
    }
}

/// Why [`crate::InstantMessagingFlow::send`] did not deliver a message.
#[derive(Debug, Error)]
pub enum DeliveryError {
    /// The node answered `message_failed{code, text}`: 415 type not negotiated, 413 too large,
    /// 481 no such established call, 408 the remote endpoint did not ack in time.
    #[error("message not delivered: {code} {text}")]
    Failed {
        /// The message number, when the node had assigned one.
        msg: Option<u32>,
        /// SIP-style status code.
        code: u16,
        /// Reason phrase.
        text: String,
    },
    /// The message never got a delivery outcome: the request itself failed (connection
    /// closed, `error{bad_frame}`, ...).
    #[error(transparent)]
    Client(#[from] ClientError),
}

impl DeliveryError {
    /// The SIP-style code of a `message_failed` answer; `None` when the request itself failed.
    pub fn code(&self) -> Option<u16> {
        match self {
            DeliveryError::Failed { code, .. } => Some(*code),
            DeliveryError::Client(_) => None,
        }
    }
}
