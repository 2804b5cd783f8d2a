//! Every message of the contract, one enum per direction: [`ClientMsg`] (client → node) and
//! [`ServerMsg`] (node → client). Each is a MessagePack map with a snake_case `"type"` tag and
//! named fields; unknown extra fields are ignored. Decoding tells an unknown `type` apart from a
//! malformed known one, because the contract answers them with different error codes.

use serde::de::{self, DeserializeOwned, Visitor};
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use std::fmt;
use thiserror::Error;

pub use crate::state::{CallState, Direction};

/// A device's self-reported activity, as published by `device_state`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Activity {
    Active,
    Inactive,
    Away,
}

/// The activity the node derives for an endpoint (publication plus idle extrapolation).
/// Ordered from most to least active, which is the ranking order of the contract.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EffectiveActivity {
    Active,
    Inactive,
    Unknown,
    Away,
}

impl From<Activity> for EffectiveActivity {
    fn from(a: Activity) -> Self {
        match a {
            Activity::Active => Self::Active,
            Activity::Inactive => Self::Inactive,
            Activity::Away => Self::Away,
        }
    }
}

/// A user's manual status (`set_status`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    Available,
    Busy,
    DoNotDisturb,
    BeRightBack,
    Away,
    AppearOffline,
}

/// Aggregated presence shown to watchers (Lync availability classes 3500 … 18500).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Availability {
    Available,
    Inactive,
    Busy,
    BusyInactive,
    DoNotDisturb,
    BeRightBack,
    Away,
    Offline,
}

impl Availability {
    /// The Lync/UCMA numeric availability of this class.
    pub fn lync_value(self) -> u32 {
        match self {
            Self::Available => 3500,
            Self::Inactive => 5000,
            Self::Busy => 6500,
            Self::BusyInactive => 7500,
            Self::DoNotDisturb => 9500,
            Self::BeRightBack => 12500,
            Self::Away => 15500,
            Self::Offline => 18500,
        }
    }
}

/// Error codes of `error{code}` (contract §6).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    BadFrame,
    FrameTooLarge,
    UnknownType,
    NotAuthenticated,
    Unauthorized,
    UnsupportedVersion,
    InvalidState,
    UnknownCall,
    UnknownConversation,
    NotAcceptable,
    AnsweredElsewhere,
    Forbidden,
    RateLimited,
    Overloaded,
    Internal,
    ResumeRefused,
}

impl ErrorCode {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::BadFrame => "bad_frame",
            Self::FrameTooLarge => "frame_too_large",
            Self::UnknownType => "unknown_type",
            Self::NotAuthenticated => "not_authenticated",
            Self::Unauthorized => "unauthorized",
            Self::UnsupportedVersion => "unsupported_version",
            Self::InvalidState => "invalid_state",
            Self::UnknownCall => "unknown_call",
            Self::UnknownConversation => "unknown_conversation",
            Self::NotAcceptable => "not_acceptable",
            Self::AnsweredElsewhere => "answered_elsewhere",
            Self::Forbidden => "forbidden",
            Self::RateLimited => "rate_limited",
            Self::Overloaded => "overloaded",
            Self::Internal => "internal",
            Self::ResumeRefused => "resume_refused",
        }
    }
}

/// A message body: MessagePack str for `text/*` content types, bin for anything else.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Body {
    Text(String),
    Binary(Vec<u8>),
}

impl Body {
    pub fn len(&self) -> usize {
        self.as_bytes().len()
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    pub fn as_bytes(&self) -> &[u8] {
        match self {
            Body::Text(s) => s.as_bytes(),
            Body::Binary(b) => b,
        }
    }
    pub fn is_text(&self) -> bool {
        matches!(self, Body::Text(_))
    }
    /// True when the body's MessagePack kind is the one the contract requires for `content_type`.
    pub fn matches_content_type(&self, content_type: &str) -> bool {
        self.is_text() == is_text_content_type(content_type)
    }
    /// The body for `content_type`: text when it is `text/*` and valid UTF-8, bytes otherwise.
    pub fn for_content_type(content_type: &str, bytes: Vec<u8>) -> Body {
        if is_text_content_type(content_type) {
            match String::from_utf8(bytes) {
                Ok(s) => Body::Text(s),
                Err(e) => Body::Binary(e.into_bytes()),
            }
        } else {
            Body::Binary(bytes)
        }
    }
}

impl From<&str> for Body {
    fn from(s: &str) -> Self {
        Body::Text(s.to_owned())
    }
}

/// `text/*` (case-insensitive) carries text; everything else carries bytes.
pub fn is_text_content_type(content_type: &str) -> bool {
    content_type
        .get(..5)
        .is_some_and(|p| p.eq_ignore_ascii_case("text/"))
}

impl Serialize for Body {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            Body::Text(t) => s.serialize_str(t),
            Body::Binary(b) => s.serialize_bytes(b),
        }
    }
}

impl<'de> Deserialize<'de> for Body {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct BodyVisitor;
        impl<'de> Visitor<'de> for BodyVisitor {
            type Value = Body;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a MessagePack str or bin")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Body, E> {
                Ok(Body::Text(v.to_owned()))
            }
            fn visit_string<E: de::Error>(self, v: String) -> Result<Body, E> {
                Ok(Body::Text(v))
            }
            fn visit_bytes<E: de::Error>(self, v: &[u8]) -> Result<Body, E> {
                Ok(Body::Binary(v.to_vec()))
            }
            fn visit_byte_buf<E: de::Error>(self, v: Vec<u8>) -> Result<Body, E> {
                Ok(Body::Binary(v))
            }
        }
        d.deserialize_any(BodyVisitor)
    }
}

/// The toast: the first message of a call, shown before anyone accepts.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Toast {
    pub content_type: String,
    pub body: Body,
}

/// Why a call ended or a transfer failed (`reason{code, text}`), SIP-style.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Reason {
    pub code: u16,
    pub text: String,
}

impl Reason {
    pub fn new(code: u16, text: &str) -> Self {
        Reason {
            code,
            text: text.to_owned(),
        }
    }
}

/// The other party of a call leg.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Remote {
    pub user: String,
    pub endpoint: String,
}

/// One endpoint of a user as its own devices see it in `presence.endpoints`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EndpointPresence {
    pub endpoint: String,
    pub device: String,
    pub activity: EffectiveActivity,
    /// The node's current idle figure; `null` when the endpoint never published.
    pub idle_ms: Option<u64>,
    /// 1-based rank; 1 is the most active endpoint.
    pub rank: u32,
}

/// Client → node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ClientMsg {
    Hello {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        rid: Option<u32>,
        version: u32,
        user: String,
        token: String,
        device: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        agent: Option<String>,
        /// Asks for a resumable session (an empty map) or takes a held one back (section 3,
        /// "Resuming"). Boxed: almost every hello leaves it out.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        resume: Option<Box<ResumeAsk>>,
    },
    Ping {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        rid: Option<u32>,
    },
    Bye {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        rid: Option<u32>,
    },
    DeviceState {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        rid: Option<u32>,
        activity: Activity,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        idle_ms: Option<u64>,
    },
    SetStatus {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        rid: Option<u32>,
        /// `null` clears the manual status. Required: an absent `status` is a malformed frame,
        /// not a clear.
        #[serde(deserialize_with = "required_nullable")]
        status: Option<Status>,
    },
    Subscribe {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        rid: Option<u32>,
        users: Vec<String>,
    },
    Unsubscribe {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        rid: Option<u32>,
        users: Vec<String>,
    },
    CallEstablish {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        rid: Option<u32>,
        to: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        conversation: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        toast: Option<Toast>,
        sdp: String,
    },
    CallAccept {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        rid: Option<u32>,
        call: String,
        sdp: String,
    },
    CallDecline {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        rid: Option<u32>,
        call: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        code: Option<u16>,
    },
    CallForward {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        rid: Option<u32>,
        call: String,
        to: String,
    },
    CallTransfer {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        rid: Option<u32>,
        call: String,
        to: String,
    },
    CallTerminate {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        rid: Option<u32>,
        call: String,
    },
    ConversationTerminate {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        rid: Option<u32>,
        conversation: String,
    },
    Message {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        rid: Option<u32>,
        call: String,
        content_type: String,
        body: Body,
    },
    MessageAck {
        call: String,
        msg: u32,
    },
    Composing {
        call: String,
        active: bool,
    },
    /// On a resumable session: the client has read the node's frames up to `upto` (counted
    /// from the `welcome`, which is frame 0). No reply.
    Seen {
        upto: u64,
    },
}

/// `hello.resume`: `{}` asks for a resumable session; with `endpoint` and `token` it takes a
/// held session back, saying how many of the node's frames the client read (`seen`) and how
/// many of its own it sent (`sent`), each counted from its `welcome`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResumeAsk {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub endpoint: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token: Option<String>,
    #[serde(default)]
    pub seen: u64,
    #[serde(default)]
    pub sent: u64,
}

/// `welcome.resume`: the session is resumable, with this token and these bounds; `seen` is
/// present when this welcome took a held session back, and says how many of the client's
/// frames the node had read (the client sends its frames after that number again).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResumeGrant {
    pub token: String,
    pub window_ms: u64,
    pub max_unseen_frames: u32,
    pub max_unseen_bytes: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seen: Option<u64>,
}

/// Every `type` a client may send, in contract order.
pub const CLIENT_TYPES: &[&str] = &[
    "hello",
    "ping",
    "bye",
    "device_state",
    "set_status",
    "subscribe",
    "unsubscribe",
    "call_establish",
    "call_accept",
    "call_decline",
    "call_forward",
    "call_transfer",
    "call_terminate",
    "conversation_terminate",
    "message",
    "message_ack",
    "composing",
    "seen",
];

impl ClientMsg {
    /// The request id to echo in the reply, if the client gave one.
    pub fn rid(&self) -> Option<u32> {
        use ClientMsg::*;
        match self {
            Hello { rid, .. }
            | Ping { rid }
            | Bye { rid }
            | DeviceState { rid, .. }
            | SetStatus { rid, .. }
            | Subscribe { rid, .. }
            | Unsubscribe { rid, .. }
            | CallEstablish { rid, .. }
            | CallAccept { rid, .. }
            | CallDecline { rid, .. }
            | CallForward { rid, .. }
            | CallTransfer { rid, .. }
            | CallTerminate { rid, .. }
            | ConversationTerminate { rid, .. }
            | Message { rid, .. } => *rid,
            MessageAck { .. } | Composing { .. } | Seen { .. } => None,
        }
    }

    /// The `rid` field of a request, to set it; `None` for the two messages that are never
    /// answered (`message_ack`, `composing`).
    pub fn rid_mut(&mut self) -> Option<&mut Option<u32>> {
        use ClientMsg::*;
        match self {
            Hello { rid, .. }
            | Ping { rid }
            | Bye { rid }
            | DeviceState { rid, .. }
            | SetStatus { rid, .. }
            | Subscribe { rid, .. }
            | Unsubscribe { rid, .. }
            | CallEstablish { rid, .. }
            | CallAccept { rid, .. }
            | CallDecline { rid, .. }
            | CallForward { rid, .. }
            | CallTransfer { rid, .. }
            | CallTerminate { rid, .. }
            | ConversationTerminate { rid, .. }
            | Message { rid, .. } => Some(rid),
            MessageAck { .. } | Composing { .. } | Seen { .. } => None,
        }
    }

    /// The wire `type` of this message.
    pub fn type_name(&self) -> &'static str {
        use ClientMsg::*;
        match self {
            Hello { .. } => "hello",
            Ping { .. } => "ping",
            Bye { .. } => "bye",
            DeviceState { .. } => "device_state",
            SetStatus { .. } => "set_status",
            Subscribe { .. } => "subscribe",
            Unsubscribe { .. } => "unsubscribe",
            CallEstablish { .. } => "call_establish",
            CallAccept { .. } => "call_accept",
            CallDecline { .. } => "call_decline",
            CallForward { .. } => "call_forward",
            CallTransfer { .. } => "call_transfer",
            CallTerminate { .. } => "call_terminate",
            ConversationTerminate { .. } => "conversation_terminate",
            Message { .. } => "message",
            MessageAck { .. } => "message_ack",
            Composing { .. } => "composing",
            Seen { .. } => "seen",
        }
    }
}

/// Node → client.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ServerMsg {
    Welcome {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        rid: Option<u32>,
        endpoint: String,
        node: String,
        heartbeat_ms: u64,
        max_frame: u32,
        /// Present on a resumable session. Boxed: most sessions are not.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        resume: Option<Box<ResumeGrant>>,
    },
    Error {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        rid: Option<u32>,
        code: ErrorCode,
        message: String,
    },
    Ok {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        rid: Option<u32>,
    },
    Pong {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        rid: Option<u32>,
    },
    Shutdown {
        reason: String,
        reconnect_after_ms: u64,
    },
    /// An operator ended this endpoint's session (the admin API's kick): its calls end as on
    /// `bye`, then the node closes the connection.
    Kicked {
        reason: String,
    },
    Presence {
        user: String,
        availability: Availability,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        most_active: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        endpoints: Option<Vec<EndpointPresence>>,
        /// Outer `None`: absent (other users' watchers); `Some(None)`: explicit `null`.
        #[serde(
            default,
            skip_serializing_if = "Option::is_none",
            with = "double_option"
        )]
        status: Option<Option<Status>>,
    },
    CallCreated {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        rid: Option<u32>,
        call: String,
        conversation: String,
    },
    CallState {
        call: String,
        conversation: String,
        direction: Direction,
        state: CallState,
        previous: CallState,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        reason: Option<Reason>,
    },
    CallIncoming {
        call: String,
        conversation: String,
        from: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        toast: Option<Toast>,
        sdp: String,
        immediate_auto_accept: bool,
    },
    CallRinging {
        call: String,
    },
    CallEstablished {
        call: String,
        sdp: String,
        remote: Remote,
    },
    AutoAcceptNeeded {
        call: String,
    },
    CallForwarded {
        call: String,
        to: String,
    },
    CallTransferred {
        call: String,
        remote: Remote,
    },
    MessageDelivered {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        rid: Option<u32>,
        call: String,
        msg: u32,
    },
    MessageFailed {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        rid: Option<u32>,
        call: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        msg: Option<u32>,
        code: u16,
        text: String,
    },
    MessageReceived {
        call: String,
        msg: u32,
        from: String,
        content_type: String,
        body: Body,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        toast: Option<bool>,
    },
    RemoteComposing {
        call: String,
        active: bool,
    },
    /// On a resumable session, after each `pong`: the node has read the client's frames up to
    /// `upto` (counted from the `hello`, which is frame 0).
    Seen {
        upto: u64,
    },
}

impl ServerMsg {
    /// The `rid` of a reply; `None` for events (and for replies to requests sent without one).
    pub fn reply_rid(&self) -> Option<u32> {
        use ServerMsg::*;
        match self {
            Welcome { rid, .. }
            | Error { rid, .. }
            | Ok { rid }
            | Pong { rid }
            | CallCreated { rid, .. }
            | MessageDelivered { rid, .. }
            | MessageFailed { rid, .. } => *rid,
            Shutdown { .. }
            | Kicked { .. }
            | Presence { .. }
            | CallState { .. }
            | CallIncoming { .. }
            | CallRinging { .. }
            | CallEstablished { .. }
            | AutoAcceptNeeded { .. }
            | CallForwarded { .. }
            | CallTransferred { .. }
            | MessageReceived { .. }
            | RemoteComposing { .. }
            | Seen { .. } => None,
        }
    }

    /// A reply `error{rid, code, message}`.
    pub fn error(rid: Option<u32>, code: ErrorCode, message: impl Into<String>) -> Self {
        ServerMsg::Error {
            rid,
            code,
            message: message.into(),
        }
    }
}

/// A field that must be present but may be `null`. (serde would treat a missing `Option` field
/// as `None`; with a `deserialize_with` it reports it missing instead.)
fn required_nullable<'de, T: Deserialize<'de>, D: Deserializer<'de>>(
    d: D,
) -> Result<Option<T>, D::Error> {
    Option::<T>::deserialize(d)
}

/// `Option<Option<T>>` that tells "absent" from "null" on the wire.
mod double_option {
    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    pub fn serialize<T: Serialize, S: Serializer>(
        v: &Option<Option<T>>,
        s: S,
    ) -> Result<S::Ok, S::Error> {
        match v {
            Some(inner) => inner.serialize(s),
            None => s.serialize_none(),
        }
    }

    pub fn deserialize<'de, T: Deserialize<'de>, D: Deserializer<'de>>(
        d: D,
    ) -> Result<Option<Option<T>>, D::Error> {
        Option::<T>::deserialize(d).map(Some)
    }
}

/// Why a frame body did not decode into a message.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum DecodeError {
    /// A map with a string `type` this side does not know: answer `unknown_type`.
    #[error("unknown message type {ty:?}")]
    UnknownType { ty: String, rid: Option<u32> },
    /// Anything else: not a map, no `type`, a missing or mistyped field, a value outside its
    /// set, trailing bytes. `ty` is the frame's `type` when it had a readable one.
    #[error("malformed frame: {detail}")]
    BadFrame {
        ty: Option<String>,
        rid: Option<u32>,
        detail: String,
    },
}

impl DecodeError {
    /// The `rid` to echo in the error reply, when the frame carried a valid one.
    pub fn rid(&self) -> Option<u32> {
        match self {
            DecodeError::UnknownType { rid, .. } | DecodeError::BadFrame { rid, .. } => *rid,
        }
    }
    /// The frame's `type`, when it had a readable one.
    pub fn type_name(&self) -> Option<&str> {
        match self {
            DecodeError::UnknownType { ty, .. } => Some(ty),
            DecodeError::BadFrame { ty, .. } => ty.as_deref(),
        }
    }
    /// The contract's error code for this failure.
    pub fn code(&self) -> ErrorCode {
        match self {
            DecodeError::UnknownType { .. } => ErrorCode::UnknownType,
            DecodeError::BadFrame { .. } => ErrorCode::BadFrame,
        }
    }
}

/// Decodes a client frame body (without its length prefix).
pub fn decode_client(body: &[u8]) -> Result<ClientMsg, DecodeError> {
    // The two messages of the flow's hot path are read straight from the frame; anything
    // unusual about them (an error to report, trailing bytes) takes the general path, so the
    // answer is the same either way.
    // The same for a call's three requests (placing, accepting and ending it); the frame's
    // first field, its type as clients write it, says which reader to try.
    let hot = match crate::hot::first_type(body) {
        Some(b"call_establish" | b"call_accept" | b"call_terminate") => {
            crate::hot::decode_hot_call_request(body)
        }
        _ => crate::hot::decode_hot_client(body),
    };
    if let Some(msg) = hot {
        return Ok(msg);
    }
    decode_tagged(body, CLIENT_TYPES)
}

/// What went wrong, in words fit for the client: serde's own messages ("missing field `call`",
/// "unknown variant `sleepy`") say what to fix; the reader's are reworded so no internal
/// detail reaches the wire.
fn describe(e: &rmp_serde::decode::Error) -> String {
    use rmp_serde::decode::Error as E;
    match e {
        E::Syntax(msg) | E::Uncategorized(msg) => msg.clone(),
        E::InvalidMarkerRead(_) | E::InvalidDataRead(_) | E::LengthMismatch(_) => {
            "truncated MessagePack".to_owned()
        }
        E::TypeMismatch(_) => "a field has the wrong MessagePack type".to_owned(),
        E::OutOfRange => "a number is out of range".to_owned(),
        E::Utf8Error(_) => "a string is not valid UTF-8".to_owned(),
        E::DepthLimitExceeded => format!("nested deeper than {MAX_DEPTH} levels"),
    }
}

/// Deepest nesting a frame may have. The contract's messages nest four levels; serde recurses
/// once per level, so an unbounded depth lets a small frame overflow a worker's stack.
pub const MAX_DEPTH: usize = 16;

/// A deserializer reading `body` in place (strings are copied once, straight from the frame),
/// with the depth bound.
fn bounded(body: &[u8]) -> rmp_serde::Deserializer<rmp_serde::decode::ReadRefReader<'_, [u8]>> {
    let mut de = rmp_serde::Deserializer::from_read_ref(body);
    de.set_max_depth(MAX_DEPTH);
    de
}

/// Whether `body` is exactly one MessagePack value: the in-place reader cannot say where it
/// stopped, so the value's extent is measured separately (a cheap scan of the markers).
fn is_one_value(body: &[u8]) -> bool {
    crate::peek::value_len(body) == Some(body.len())
}

/// Decodes a node frame body (without its length prefix).
pub fn decode_server(body: &[u8]) -> Result<ServerMsg, DecodeError> {
    // As in `decode_client`: the flow's two frames are read straight from the frame, and
    // anything unusual about them takes the general path.
    if let Some(msg) = crate::hot::decode_hot_server(body) {
        return Ok(msg);
    }
    decode_tagged(body, SERVER_TYPES)
}

/// Every `type` the node may send.
pub const SERVER_TYPES: &[&str] = &[
    "welcome",
    "error",
    "ok",
    "pong",
    "shutdown",
    "presence",
    "call_created",
    "call_state",
    "call_incoming",
    "call_ringing",
    "call_established",
    "auto_accept_needed",
    "call_forwarded",
    "call_transferred",
    "message_delivered",
    "message_failed",
    "message_received",
    "remote_composing",
    "seen",
];

fn decode_tagged<T: DeserializeOwned>(body: &[u8], known: &[&str]) -> Result<T, DecodeError> {
    // serde's tagged enums also accept an array whose first element is the tag; the contract
    // allows maps only, so look at the MessagePack marker first.
    if !matches!(body.first(), Some(0x80..=0x8f | 0xde | 0xdf)) {
        return Err(DecodeError::BadFrame {
            ty: None,
            rid: None,
            detail: "the frame is not a MessagePack map".to_owned(),
        });
    }
    let result = T::deserialize(&mut bounded(body));
    match result {
        Ok(msg) if is_one_value(body) => Ok(msg),
        Ok(_) => {
            let probe = crate::peek::probe(body);
            Err(DecodeError::BadFrame {
                ty: probe.ty.map(str::to_owned),
                rid: probe.rid,
                detail: "trailing bytes after the message map".to_owned(),
            })
        }
        Err(e) => {
            // The slow path only runs for bad frames: a second, lenient pass finds the `type` and
            // `rid` so the error can be the right one and echo the request id.
            let probe = crate::peek::probe(body);
            match probe.ty {
                Some(ty) if !known.contains(&ty) => Err(DecodeError::UnknownType {
                    ty: ty.to_owned(),
                    rid: probe.rid,
                }),
                ty => Err(DecodeError::BadFrame {
                    ty: ty.map(str::to_owned),
                    rid: probe.rid,
                    detail: if probe.is_map {
                        describe(&e)
                    } else {
                        "the frame is not a MessagePack map".to_owned()
                    },
                }),
            }
        }
    }
}
