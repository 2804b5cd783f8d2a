//! Every way the node refuses a client's request, and the one reply each refusal becomes: the
//! `error` code and text of docs/protocol.md §7, and, for a refused `message`, the
//! `message_failed` code and text of §6. Each reason is worded here once; the actors only
//! name the refusal.

use std::borrow::Cow;

use confab_protocol::{DecodeError, ErrorCode, PROTOCOL_VERSION, ServerMsg};

use crate::directory::DirectoryError;
use crate::reasons;

/// How much of a frame-error text is sent back (docs/protocol.md, "Frame errors"): the text
/// may quote the frame (its unknown `type`, serde's "unknown variant `…`"), and a client must
/// not get a large error for a small cost, nor fill its own queue with its echoes.
const MAX_ERROR_TEXT: usize = 200;

/// Why a request is refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    // Signing in (the session's handshake).
    /// The connection closed, or failed, before its `hello`.
    ClosedBeforeHello,
    /// A `hello` frame that does not parse.
    MalformedHello,
    /// The first frame is not a `hello`.
    HelloFirst,
    UnsupportedVersion,
    /// `device` empty or over 128 bytes.
    BadDevice,
    /// `user` is not a SIP URI.
    UserNotSipUri,
    /// The token failed a check (its text names which).
    InvalidToken(String),
    /// With `tls.client_ca_file`: the client certificate a resumed TLS session carries no
    /// longer verifies (its text says why).
    StaleClientCertificate(String),
    /// The node is draining.
    ShuttingDown,
    /// `server.max_connections` reached.
    ConnectionLimit,
    /// The directory refused the endpoint (`endpoints_per_user`, or a cluster directory that
    /// cannot be written now).
    Directory(DirectoryError),
    /// A `hello` that resumes a session could not take it back (its reason).
    Resume(ResumeRefusal),

    // Frames.
    ZeroLengthFrame,
    FrameTooLarge {
        len: usize,
        max: usize,
    },
    /// A frame that does not decode (an unknown `type`, a field of the wrong kind).
    Frame {
        code: ErrorCode,
        detail: String,
    },
    /// Over `limits.requests_per_second`.
    TooManyRequests,
    /// Over `limits.presence_updates_per_second`.
    PresenceTooFast,

    // The endpoint.
    AlreadySignedIn,
    /// `bye` was sent or a shutdown began.
    SigningOut,
    /// Cluster: the user has more endpoints across the nodes than `endpoints_per_user`.
    OverEndpointsAcrossCluster,
    SubscriptionLimit,
    /// `users` holds something that is not a SIP URI.
    UsersNotSipUris,
    /// `to` is not a SIP URI.
    ToNotSipUri,
    /// A content type or body that does not fit the contract (its reason).
    BadContent(&'static str),
    DeclineCode,
    TooManyCalls,
    UnknownConversation,

    // Calls.
    UnknownCall,
    /// A call this endpoint held, over now.
    CallOver,
    /// Another fork won the call.
    AnsweredElsewhere,
    NotRinging,
    CannotTransferNow,
    NoRemoteParty,
    /// The answer's SDP cannot be negotiated (its reason).
    SdpNotAcceptable(String),
    /// Cluster: too many requests already wait for the call's node.
    RequestsWaitingForNode,
    /// Cluster: the request or its answer was lost between the nodes.
    NoAnswerFromNode,
    /// A `seen` on a session that is not resumable.
    NotResumable,
    /// A `seen` past the last frame the node sent.
    SeenAhead,
}

/// Why a resume was refused (docs/protocol.md §3 "Resuming"). None of them tells a client
/// whether an endpoint it does not own exists: a wrong user, a wrong token, an endpoint that
/// is not resumable and one that never existed are all `Unknown`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResumeRefusal {
    Unknown,
    /// The token was already used: a resume took the session with it.
    AlreadyResumed,
    /// The resume window ended before the client came back.
    WindowOver,
    /// The client says it read frames the node never sent.
    SeenAhead,
    /// The client says it read less than it acknowledged: what it missed is forgotten.
    SeenBehind,
    /// The client says it sent fewer frames than the node read.
    SentBehind,
    /// Cluster: the node that held the session is gone (or did not answer).
    NodeGone,
}

impl ResumeRefusal {
    /// The label of `confab_resumes_total{result}`.
    pub fn label(self) -> &'static str {
        match self {
            ResumeRefusal::Unknown => "unknown",
            ResumeRefusal::AlreadyResumed => "already_resumed",
            ResumeRefusal::WindowOver => "window_over",
            ResumeRefusal::SeenAhead => "seen_ahead",
            ResumeRefusal::SeenBehind => "seen_behind",
            ResumeRefusal::SentBehind => "sent_behind",
            ResumeRefusal::NodeGone => "node_gone",
        }
    }

    fn text(self) -> &'static str {
        match self {
            ResumeRefusal::Unknown => "unknown or expired session",
            ResumeRefusal::AlreadyResumed => "the session was already resumed with this token",
            ResumeRefusal::WindowOver => "the resume window is over",
            ResumeRefusal::SeenAhead => "seen is ahead of the frames the node sent",
            ResumeRefusal::SeenBehind => {
                "seen is behind what the client acknowledged; those frames are gone"
            }
            ResumeRefusal::SentBehind => "sent is behind the frames the node read",
            ResumeRefusal::NodeGone => "the node holding the session is gone",
        }
    }
}

impl Refusal {
    /// A frame that did not decode, refused with its own code and clipped detail.
    pub fn frame(e: &DecodeError) -> Refusal {
        let detail = match e {
            DecodeError::UnknownType { ty, .. } => format!("unknown message type {ty:?}"),
            DecodeError::BadFrame { detail, .. } => detail.clone(),
        };
        Refusal::Frame {
            code: e.code(),
            detail: clip(&detail).into_owned(),
        }
    }

    /// The `error` code.
    pub fn code(&self) -> ErrorCode {
        use Refusal::*;
        match self {
            ClosedBeforeHello | HelloFirst => ErrorCode::NotAuthenticated,
            MalformedHello | BadDevice | ZeroLengthFrame | UsersNotSipUris | ToNotSipUri
            | BadContent(_) | DeclineCode => ErrorCode::BadFrame,
            UnsupportedVersion => ErrorCode::UnsupportedVersion,
            UserNotSipUri | InvalidToken(_) | StaleClientCertificate(_) => ErrorCode::Unauthorized,
            ShuttingDown
            | ConnectionLimit
            | Directory(DirectoryError::Unavailable)
            | TooManyCalls
            | RequestsWaitingForNode => ErrorCode::Overloaded,
            Directory(DirectoryError::TooManyEndpoints) => ErrorCode::Forbidden,
            FrameTooLarge { .. } => ErrorCode::FrameTooLarge,
            Frame { code, .. } => *code,
            TooManyRequests | PresenceTooFast => ErrorCode::RateLimited,
            AlreadySignedIn | SigningOut | CallOver | NotRinging | CannotTransferNow
            | NoRemoteParty => ErrorCode::InvalidState,
            OverEndpointsAcrossCluster | SubscriptionLimit => ErrorCode::Forbidden,
            UnknownConversation => ErrorCode::UnknownConversation,
            UnknownCall => ErrorCode::UnknownCall,
            AnsweredElsewhere => ErrorCode::AnsweredElsewhere,
            SdpNotAcceptable(_) => ErrorCode::NotAcceptable,
            NoAnswerFromNode => ErrorCode::Internal,
            Resume(_) => ErrorCode::ResumeRefused,
            NotResumable => ErrorCode::InvalidState,
            SeenAhead => ErrorCode::BadFrame,
        }
    }

    /// The `error` text.
    pub fn text(&self) -> Cow<'static, str> {
        use Refusal::*;
        match self {
            ClosedBeforeHello => "connection closed".into(),
            MalformedHello => "malformed hello".into(),
            HelloFirst => "the first frame must be hello".into(),
            UnsupportedVersion => format!("this node speaks version {PROTOCOL_VERSION}").into(),
            BadDevice => "device must be 1-128 bytes".into(),
            UserNotSipUri => "user is not a SIP URI".into(),
            InvalidToken(why) => format!("invalid token: {why}").into(),
            StaleClientCertificate(why) => format!(
                "resumed TLS session refused: {why}; start a new TLS session (a full handshake, without the cached session) with a valid certificate"
            )
            .into(),
            ShuttingDown => "the node is shutting down".into(),
            ConnectionLimit => "connection limit reached".into(),
            Directory(e) => e.to_string().into(),
            SdpNotAcceptable(text) => text.clone().into(),
            ZeroLengthFrame => "zero-length frame".into(),
            FrameTooLarge { len, max } => format!("frame of {len} bytes exceeds {max}").into(),
            Frame { detail, .. } => detail.clone().into(),
            TooManyRequests => "too many requests; slow down".into(),
            PresenceTooFast => {
                "presence changes faster than limits.presence_updates_per_second; slow down".into()
            }
            AlreadySignedIn => "already signed in".into(),
            SigningOut => "the endpoint is signing out".into(),
            OverEndpointsAcrossCluster => {
                "too many endpoints signed in for this user (across the cluster)".into()
            }
            SubscriptionLimit => "subscription limit reached".into(),
            UsersNotSipUris => "`users` must hold SIP URIs".into(),
            ToNotSipUri => "`to` is not a SIP URI".into(),
            BadContent(why) => Cow::Borrowed(why),
            DeclineCode => "decline code must be 400-699".into(),
            TooManyCalls => "too many calls on this endpoint".into(),
            UnknownConversation => "no such conversation".into(),
            UnknownCall => "no such call".into(),
            CallOver => "the call is over".into(),
            AnsweredElsewhere => "another endpoint answered".into(),
            NotRinging => "the call is not ringing".into(),
            CannotTransferNow => "the call cannot be transferred now".into(),
            NoRemoteParty => "the call has no remote party".into(),
            RequestsWaitingForNode => REQUESTS_WAITING_FOR_NODE.into(),
            NoAnswerFromNode => "no answer from the call's node; the outcome is unknown".into(),
            Resume(why) => why.text().into(),
            NotResumable => "the session is not resumable".into(),
            SeenAhead => "seen is ahead of the frames the node sent".into(),
        }
    }

    /// The `error` reply to the request `rid`.
    pub fn reply(&self, rid: Option<u32>) -> ServerMsg {
        ServerMsg::error(rid, self.code(), self.text())
    }

    /// What a `message` refused for this reason gets instead of an `error`: its one
    /// `message_failed`, with the code and text of docs/protocol.md §6. None for a refusal
    /// a `message` never meets (its other checks come first).
    pub fn message_failure(&self) -> Option<(u16, &'static str)> {
        Some(match self {
            Refusal::SigningOut => (503, "Endpoint is signing out"),
            Refusal::TooManyRequests => (503, "Too many requests; slow down"),
            Refusal::RequestsWaitingForNode => (503, REQUESTS_WAITING_FOR_NODE),
            Refusal::UnknownCall | Refusal::CallOver => (481, reasons::CALL_DOES_NOT_EXIST),
            _ => return None,
        })
    }
}

/// The text of a `message_failed` 503 or an `error{overloaded}` for a request not sent because
/// too much already waits for another node (docs/protocol.md §6, §9 p).
pub const REQUESTS_WAITING_FOR_NODE: &str = "Too many requests waiting for another node";

/// `text` cut to [`MAX_ERROR_TEXT`] bytes at a character boundary, ending in `…` when cut.
fn clip(text: &str) -> Cow<'_, str> {
    if text.len() <= MAX_ERROR_TEXT {
        return text.into();
    }
    let mut end = MAX_ERROR_TEXT;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &text[..end]).into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_long_frame_error_is_clipped_at_a_character_boundary() {
        let long = "é".repeat(150);
        let r = Refusal::frame(&DecodeError::BadFrame {
            rid: None,
            ty: None,
            detail: long,
        });
        let text = r.text();
        assert!(
            text.len() <= MAX_ERROR_TEXT + '…'.len_utf8(),
            "{}",
            text.len()
        );
        assert!(text.ends_with('…'));
    }

    #[test]
    fn a_refused_message_fails_with_the_contracts_codes() {
        assert_eq!(
            Refusal::SigningOut.message_failure(),
            Some((503, "Endpoint is signing out"))
        );
        assert_eq!(
            Refusal::UnknownCall.message_failure(),
            Some((481, reasons::CALL_DOES_NOT_EXIST))
        );
        assert_eq!(
            Refusal::RequestsWaitingForNode
                .message_failure()
                .map(|(_, text)| text),
            Some(&*Refusal::RequestsWaitingForNode.text())
        );
    }

    #[test]
    fn every_refusal_replies_with_its_code_and_the_request_id() {
        let ServerMsg::Error { rid, code, message } = Refusal::CallOver.reply(Some(7)) else {
            panic!("not an error");
        };
        assert_eq!(
            (rid, code, message.as_str()),
            (Some(7), ErrorCode::InvalidState, "the call is over")
        );
    }
}
