//! Hand-written MessagePack for the frames the node sends most: `call_state` (about half of the
//! ~22 frames of a forked call), the other frames of a call's setup (`call_created`,
//! `call_ringing`, `call_incoming`, `call_established`, `ok`), `welcome` (every sign-in),
//! `message_received` and `message_delivered` (two of the four frames of every message).
//! serde's path for an internally tagged enum costs about 1,600 instructions per frame; writing
//! the map directly costs a fraction of that. The bytes are exactly what
//! [`crate::codec::encode_frame`] writes (tests compare every shape), so nothing on the wire
//! changes. Every other message goes through serde.
//!
//! The other way, [`decode_hot_client`] reads `message` and `message_ack` (two of the four
//! frames of every message) straight from the frame: anything but a clean instance of them
//! returns `None` and takes serde's path, which then gives the answer, errors included;
//! [`decode_hot_call_request`] does the same for a call's three requests (`call_establish`,
//! `call_accept`, `call_terminate`). [`decode_hot_server`] does the same for the client side's two, `message_received` and
//! `message_delivered` (the client library and confab-bench read every frame through it), and
//! [`encode_client_frame`] writes a client's `message` and `message_ack` by hand.

use bytes::{BufMut, BytesMut};

use crate::codec::{FrameError, close_frame, encode_frame};
use crate::messages::{Body, ClientMsg, ServerMsg};
use crate::peek::{self, peek_marker, read_str, read_uint, skip};
use rmp::Marker;

/// Appends one frame holding `msg`, as [`encode_frame`] would.
pub fn encode_server_frame(msg: &ServerMsg, dst: &mut BytesMut) -> Result<(), FrameError> {
    frame_by_hand_or_serde(msg, dst, |dst| {
        match msg {
            ServerMsg::CallState {
                call,
                conversation,
                direction,
                state,
                previous,
                reason,
            } => {
                tagged(
                    dst,
                    fixstr!("call_state"),
                    None,
                    if reason.is_some() { 6 } else { 5 },
                );
                key!(dst, "call");
                str(dst, call);
                key!(dst, "conversation");
                str(dst, conversation);
                key!(dst, "direction");
                str(dst, direction.as_str());
                key!(dst, "state");
                str(dst, state.as_str());
                key!(dst, "previous");
                str(dst, previous.as_str());
                if let Some(reason) = reason {
                    key!(dst, "reason");
                    map_len(dst, 2);
                    key!(dst, "code");
                    uint(dst, u64::from(reason.code));
                    key!(dst, "text");
                    str(dst, &reason.text);
                }
            }
            ServerMsg::MessageReceived {
                call,
                msg,
                from,
                content_type,
                body,
                toast,
            } => {
                tagged(
                    dst,
                    fixstr!("message_received"),
                    None,
                    if toast.is_some() { 6 } else { 5 },
                );
                key!(dst, "call");
                str(dst, call);
                key!(dst, "msg");
                uint(dst, u64::from(*msg));
                key!(dst, "from");
                str(dst, from);
                key!(dst, "content_type");
                str(dst, content_type);
                key!(dst, "body");
                self::body(dst, body);
                if let Some(toast) = toast {
                    key!(dst, "toast");
                    boolean(dst, *toast);
                }
            }
            ServerMsg::MessageDelivered { rid, call, msg } => {
                tagged(dst, fixstr!("message_delivered"), *rid, 2);
                key!(dst, "call");
                str(dst, call);
                key!(dst, "msg");
                uint(dst, u64::from(*msg));
            }
            ServerMsg::CallCreated {
                rid,
                call,
                conversation,
            } => {
                tagged(dst, fixstr!("call_created"), *rid, 2);
                key!(dst, "call");
                str(dst, call);
                key!(dst, "conversation");
                str(dst, conversation);
            }
            ServerMsg::CallIncoming {
                call,
                conversation,
                from,
                toast,
                sdp,
                immediate_auto_accept,
            } => {
                tagged(
                    dst,
                    fixstr!("call_incoming"),
                    None,
                    if toast.is_some() { 6 } else { 5 },
                );
                key!(dst, "call");
                str(dst, call);
                key!(dst, "conversation");
                str(dst, conversation);
                key!(dst, "from");
                str(dst, from);
                if let Some(toast) = toast {
                    key!(dst, "toast");
                    map_len(dst, 2);
                    key!(dst, "content_type");
                    str(dst, &toast.content_type);
                    key!(dst, "body");
                    body(dst, &toast.body);
                }
                key!(dst, "sdp");
                str(dst, sdp);
                key!(dst, "immediate_auto_accept");
                boolean(dst, *immediate_auto_accept);
            }
            ServerMsg::CallRinging { call } => {
                tagged(dst, fixstr!("call_ringing"), None, 1);
                key!(dst, "call");
                str(dst, call);
            }
            ServerMsg::CallEstablished { call, sdp, remote } => {
                tagged(dst, fixstr!("call_established"), None, 3);
                key!(dst, "call");
                str(dst, call);
                key!(dst, "sdp");
                str(dst, sdp);
                key!(dst, "remote");
                map_len(dst, 2);
                key!(dst, "user");
                str(dst, &remote.user);
                key!(dst, "endpoint");
                str(dst, &remote.endpoint);
            }
            ServerMsg::Ok { rid } => {
                tagged(dst, fixstr!("ok"), *rid, 0);
            }
            // A resumable session's welcome (rare) takes serde's path.
            ServerMsg::Welcome {
                rid,
                endpoint,
                node,
                heartbeat_ms,
                max_frame,
                resume: None,
            } => {
                tagged(dst, fixstr!("welcome"), *rid, 4);
                key!(dst, "endpoint");
                str(dst, endpoint);
                key!(dst, "node");
                str(dst, node);
                key!(dst, "heartbeat_ms");
                uint(dst, *heartbeat_ms);
                key!(dst, "max_frame");
                uint(dst, u64::from(*max_frame));
            }
            _ => return false,
        }
        true
    })
}

/// Appends one frame holding `msg`, as [`encode_frame`] would: `message` and `message_ack`
/// (the two frames a client sends for every message) by hand, the rest through serde.
pub fn encode_client_frame(msg: &ClientMsg, dst: &mut BytesMut) -> Result<(), FrameError> {
    frame_by_hand_or_serde(msg, dst, |dst| {
        match msg {
            ClientMsg::Message {
                rid,
                call,
                content_type,
                body,
            } => {
                tagged(dst, fixstr!("message"), *rid, 3);
                key!(dst, "call");
                str(dst, call);
                key!(dst, "content_type");
                str(dst, content_type);
                key!(dst, "body");
                self::body(dst, body);
            }
            ClientMsg::MessageAck { call, msg } => {
                tagged(dst, fixstr!("message_ack"), None, 2);
                key!(dst, "call");
                str(dst, call);
                key!(dst, "msg");
                uint(dst, u64::from(*msg));
            }
            _ => return false,
        }
        true
    })
}

/// `message` or `message_ack` from a frame body, or `None` when the frame is anything else or
/// anything unusual (a duplicate, unknown or mistyped field, trailing bytes).
pub fn decode_hot_client(body: &[u8]) -> Option<ClientMsg> {
    let f = flow_fields(body)?;
    match (
        f.ty?,
        f.rid,
        f.call?,
        f.msg,
        f.content_type,
        f.body,
        f.from,
        f.toast,
    ) {
        (b"message", rid, call, None, Some(content_type), Some(body), None, None) => {
            Some(ClientMsg::Message {
                rid: rid.flatten(),
                call,
                content_type,
                body,
            })
        }
        (b"message_ack", None, call, Some(msg), None, None, None, None) => {
            Some(ClientMsg::MessageAck { call, msg })
        }
        _ => None,
    }
}

/// `call_establish` (without `conversation` or `toast`), `call_accept` or `call_terminate` from
/// a frame body, or `None` when the frame is anything else or anything unusual (a duplicate,
/// unknown or mistyped field, trailing bytes), which then takes serde's path and gets its
/// answer there. These are the three requests of every call a client places or takes: serde's
/// path for an internally tagged enum buffers the whole map first (about 3,000 instructions a
/// frame).
pub fn decode_hot_call_request(body: &[u8]) -> Option<ClientMsg> {
    let mut rd = body;
    // The strings are borrowed until the frame is known to be one of these, so that a frame
    // left to serde costs no allocation here.
    let (mut ty, mut rid, mut call, mut to, mut sdp) = (None, None, None, None, None);
    for _ in 0..peek::map_len(&mut rd)? {
        if !is_str(rd) {
            return None;
        }
        let fresh = match read_str(&mut rd)? {
            b"type" => ty.replace(str_bytes(&mut rd)?).is_none(),
            b"rid" => rid.replace(nil_or_u32(&mut rd)?).is_none(),
            b"call" => call.replace(text(&mut rd)?).is_none(),
            b"to" => to.replace(text(&mut rd)?).is_none(),
            b"sdp" => sdp.replace(text(&mut rd)?).is_none(),
            _ => return None,
        };
        if !fresh {
            return None;
        }
    }
    if !rd.is_empty() {
        return None;
    }
    let rid = rid.flatten();
    let (call, to, sdp) = (
        call.map(str::to_owned),
        to.map(str::to_owned),
        sdp.map(str::to_owned),
    );
    match (ty?, call, to, sdp) {
        (b"call_establish", None, Some(to), Some(sdp)) => Some(ClientMsg::CallEstablish {
            rid,
            to,
            conversation: None,
            toast: None,
            sdp,
        }),
        (b"call_accept", Some(call), None, Some(sdp)) => {
            Some(ClientMsg::CallAccept { rid, call, sdp })
        }
        (b"call_terminate", Some(call), None, None) => Some(ClientMsg::CallTerminate { rid, call }),
        _ => None,
    }
}

/// `message_received` or `message_delivered` from a frame body, or `None` when the frame is
/// anything else or anything unusual (a duplicate, unknown or mistyped field, trailing bytes),
/// which then takes serde's path. These are the two frames of every message a client reads;
/// serde's path for an internally tagged enum buffers the whole map first.
pub fn decode_hot_server(body: &[u8]) -> Option<ServerMsg> {
    let f = flow_fields(body)?;
    match (
        f.ty?,
        f.rid,
        f.call?,
        f.msg?,
        f.content_type,
        f.body,
        f.from,
        f.toast,
    ) {
        (
            b"message_received",
            None,
            call,
            msg,
            Some(content_type),
            Some(body),
            Some(from),
            toast,
        ) => Some(ServerMsg::MessageReceived {
            call,
            msg,
            from,
            content_type,
            body,
            toast,
        }),
        (b"message_delivered", rid, call, msg, None, None, None, None) => {
            Some(ServerMsg::MessageDelivered {
                rid: rid.flatten(),
                call,
                msg,
            })
        }
        _ => None,
    }
}

/// Every field of the four flow frames (`message`, `message_ack`, `message_received`,
/// `message_delivered`) as read from one frame; which frame it is, and whether the fields fit
/// it, the decoders above decide.
#[derive(Default)]
struct FlowFields<'a> {
    ty: Option<&'a [u8]>,
    rid: Option<Option<u32>>,
    call: Option<String>,
    msg: Option<u32>,
    content_type: Option<String>,
    body: Option<Body>,
    from: Option<String>,
    toast: Option<bool>,
}

/// The fields of a flow frame, or `None` for anything unusual: a key that is not a string or
/// not one of those fields, a duplicate, a mistyped value, trailing bytes.
fn flow_fields(body: &[u8]) -> Option<FlowFields<'_>> {
    let mut rd = body;
    let mut f = FlowFields::default();
    for _ in 0..peek::map_len(&mut rd)? {
        if !is_str(rd) {
            return None;
        }
        let fresh = match read_str(&mut rd)? {
            b"type" => f.ty.replace(str_bytes(&mut rd)?).is_none(),
            b"rid" => f.rid.replace(nil_or_u32(&mut rd)?).is_none(),
            b"call" => f.call.replace(string(&mut rd)?).is_none(),
            b"msg" => f.msg.replace(u32_value(&mut rd)?).is_none(),
            b"content_type" => f.content_type.replace(string(&mut rd)?).is_none(),
            b"body" => f.body.replace(body_value(&mut rd)?).is_none(),
            b"from" => f.from.replace(string(&mut rd)?).is_none(),
            b"toast" => f.toast.replace(bool_value(&mut rd)?).is_none(),
            _ => return None,
        };
        if !fresh {
            return None;
        }
    }
    rd.is_empty().then_some(f)
}

fn bool_value(rd: &mut &[u8]) -> Option<bool> {
    let value = match peek_marker(rd)? {
        Marker::True => true,
        Marker::False => false,
        _ => return None,
    };
    skip(rd)?;
    Some(value)
}

fn is_str(rd: &[u8]) -> bool {
    matches!(
        peek_marker(rd),
        Some(Marker::FixStr(_) | Marker::Str8 | Marker::Str16 | Marker::Str32)
    )
}

fn str_bytes<'a>(rd: &mut &'a [u8]) -> Option<&'a [u8]> {
    if is_str(rd) { read_str(rd) } else { None }
}

fn string(rd: &mut &[u8]) -> Option<String> {
    text(rd).map(str::to_owned)
}

/// A `str` that is valid UTF-8, borrowed from the frame.
fn text<'a>(rd: &mut &'a [u8]) -> Option<&'a str> {
    std::str::from_utf8(str_bytes(rd)?).ok()
}

/// The frame's `type` when it is its first field (as every client library writes it), read
/// without looking further: which hand-written reader to try.
pub(crate) fn first_type(body: &[u8]) -> Option<&[u8]> {
    let mut rd = body;
    peek::map_len(&mut rd)?;
    if !is_str(rd) || read_str(&mut rd)? != b"type" {
        return None;
    }
    str_bytes(&mut rd)
}

fn u32_value(rd: &mut &[u8]) -> Option<u32> {
    read_uint(rd)?.and_then(|v| u32::try_from(v).ok())
}

fn nil_or_u32(rd: &mut &[u8]) -> Option<Option<u32>> {
    if peek_marker(rd) == Some(Marker::Null) {
        skip(rd)?;
        return Some(None);
    }
    u32_value(rd).map(Some)
}

/// A `str` body (valid UTF-8) or a `bin` one.
fn body_value(rd: &mut &[u8]) -> Option<Body> {
    if is_str(rd) {
        return string(rd).map(Body::Text);
    }
    let header = match peek_marker(rd)? {
        Marker::Bin8 => 2,
        Marker::Bin16 => 3,
        Marker::Bin32 => 5,
        _ => return None,
    };
    let before: &[u8] = rd;
    skip(rd)?;
    let value = &before[..before.len() - rd.len()];
    Some(Body::Binary(value.get(header..)?.to_vec()))
}

/// A string known when compiling, shorter than 32 bytes, as rmp writes it (a fixstr: its
/// marker, then its bytes), made when compiling: the frames' keys and type names.
macro_rules! fixstr {
    ($s:literal) => {{
        const BYTES: [u8; $s.len() + 1] = fixstr_bytes::<{ $s.len() + 1 }>($s);
        &BYTES
    }};
}
use fixstr;

/// A map key by [`fixstr!`], copied in one go: [`str`] works out each key's marker at every
/// frame, and the keys are about half of what the node writes per call.
macro_rules! key {
    ($dst:expr, $s:literal) => {
        $dst.put_slice(fixstr!($s))
    };
}
use key;

/// [`fixstr!`]'s bytes; `N` is the length of `s` plus the marker's byte.
const fn fixstr_bytes<const N: usize>(s: &str) -> [u8; N] {
    let bytes = s.as_bytes();
    assert!(bytes.len() < 32 && bytes.len() + 1 == N);
    let mut out = [0u8; N];
    out[0] = 0xa0 | bytes.len() as u8;
    let mut i = 0;
    while i < bytes.len() {
        out[i + 1] = bytes[i];
        i += 1;
    }
    out
}

/// A map header (the messages here have fewer than 16 fields: fixmap).
fn map_len(dst: &mut BytesMut, n: u8) {
    debug_assert!(n < 16);
    dst.put_u8(0x80 | n);
}

/// A string in its shortest form, as rmp writes it.
fn str(dst: &mut BytesMut, s: &str) {
    let len = s.len();
    if len < 32 {
        dst.put_u8(0xa0 | len as u8);
    } else if let Ok(n) = u8::try_from(len) {
        dst.put_u8(0xd9);
        dst.put_u8(n);
    } else if let Ok(n) = u16::try_from(len) {
        dst.put_u8(0xda);
        dst.put_u16(n);
    } else {
        dst.put_u8(0xdb);
        // Frames are bounded far below 4 GiB; the frame length check reports it if not.
        dst.put_u32(u32::try_from(len).unwrap_or(u32::MAX));
    }
    dst.put_slice(s.as_bytes());
}

/// One frame holding `msg`: its body written by `by_hand`, or, when that declines (returns
/// false, having written nothing), by serde.
fn frame_by_hand_or_serde<T: serde::Serialize>(
    msg: &T,
    dst: &mut BytesMut,
    by_hand: impl FnOnce(&mut BytesMut) -> bool,
) -> Result<(), FrameError> {
    let start = dst.len();
    dst.put_u32(0);
    if by_hand(dst) {
        close_frame(dst, start)
    } else {
        dst.truncate(start);
        encode_frame(msg, dst)
    }
}

/// The start of a tagged message's map: its size (`fields` after `type` and the `rid`, plus
/// those two), `type`, and `rid` when there is one (serde skips a `None` rid).
fn tagged(dst: &mut BytesMut, ty: &[u8], rid: Option<u32>, fields: u8) {
    map_len(dst, fields + 1 + u8::from(rid.is_some()));
    key!(dst, "type");
    dst.put_slice(ty);
    opt_rid(dst, rid);
}

/// `rid` and its value when there is one (serde skips a `None` rid).
fn opt_rid(dst: &mut BytesMut, rid: Option<u32>) {
    if let Some(rid) = rid {
        key!(dst, "rid");
        uint(dst, u64::from(rid));
    }
}

fn boolean(dst: &mut BytesMut, b: bool) {
    dst.put_u8(if b { 0xc3 } else { 0xc2 });
}

/// A message body: text as str, binary as bin (what `Body`'s `Serialize` writes).
fn body(dst: &mut BytesMut, body: &Body) {
    match body {
        Body::Text(text) => str(dst, text),
        Body::Binary(bytes) => bin(dst, bytes),
    }
}

/// A byte string (MessagePack bin) in its shortest form, as rmp writes it.
fn bin(dst: &mut BytesMut, bytes: &[u8]) {
    let len = bytes.len();
    if let Ok(n) = u8::try_from(len) {
        dst.put_u8(0xc4);
        dst.put_u8(n);
    } else if let Ok(n) = u16::try_from(len) {
        dst.put_u8(0xc5);
        dst.put_u16(n);
    } else {
        dst.put_u8(0xc6);
        dst.put_u32(u32::try_from(len).unwrap_or(u32::MAX));
    }
    dst.put_slice(bytes);
}

/// An unsigned integer in its shortest form, as rmp writes it.
fn uint(dst: &mut BytesMut, v: u64) {
    if v < 128 {
        dst.put_u8(v as u8);
    } else if let Ok(n) = u8::try_from(v) {
        dst.put_u8(0xcc);
        dst.put_u8(n);
    } else if let Ok(n) = u16::try_from(v) {
        dst.put_u8(0xcd);
        dst.put_u16(n);
    } else if let Ok(n) = u32::try_from(v) {
        dst.put_u8(0xce);
        dst.put_u32(n);
    } else {
        dst.put_u8(0xcf);
        dst.put_u64(v);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::LEN_PREFIX;
    use crate::messages::{Reason, Remote, ServerMsg, Toast};
    use crate::state::{CallState, Direction};

    fn both(msg: &ServerMsg) -> (BytesMut, BytesMut) {
        let (mut hot, mut serde) = (BytesMut::new(), BytesMut::new());
        encode_server_frame(msg, &mut hot).expect("hot path encodes");
        encode_frame(msg, &mut serde).expect("serde encodes");
        (hot, serde)
    }

    #[test]
    fn call_state_bytes_are_serdes_in_every_shape() {
        let long = "x".repeat(40);
        let longer = "y".repeat(300);
        let reasons = [
            None,
            Some(Reason::new(200, "OK")),
            Some(Reason::new(0, "")),
            Some(Reason::new(127, &long)),
            Some(Reason::new(128, &longer)),
            Some(Reason::new(603, "Decline")),
            Some(Reason::new(u16::MAX, "max")),
        ];
        for direction in [Direction::Inbound, Direction::Outbound] {
            for state in CallState::ALL {
                for reason in &reasons {
                    for (call, conversation) in [("c1", "v1"), (long.as_str(), longer.as_str())] {
                        let msg = ServerMsg::CallState {
                            call: call.to_owned(),
                            conversation: conversation.to_owned(),
                            direction,
                            state,
                            previous: CallState::Idle,
                            reason: reason.clone(),
                        };
                        let (hot, serde) = both(&msg);
                        assert_eq!(hot, serde, "{msg:?}");
                    }
                }
            }
        }
    }

    #[test]
    fn message_frames_are_serdes_in_every_shape() {
        let long = "m".repeat(300);
        let bodies = [
            Body::Text(String::new()),
            Body::Text("hello".into()),
            Body::Text(long.clone()),
            Body::Binary(vec![]),
            Body::Binary(vec![0, 159, 255]),
            Body::Binary(vec![7; 300]),
            Body::Binary(vec![1; 70_000]),
        ];
        for body in &bodies {
            for toast in [None, Some(true), Some(false)] {
                for msg in [0, 1, 127, 128, 70_000, u32::MAX] {
                    let m = ServerMsg::MessageReceived {
                        call: "n.1.c5".into(),
                        msg,
                        from: long.clone(),
                        content_type: "text/plain; charset=utf-8".into(),
                        body: body.clone(),
                        toast,
                    };
                    let (hot, serde) = both(&m);
                    assert_eq!(hot, serde, "{toast:?} {msg}");
                }
            }
        }
        for rid in [None, Some(0), Some(200), Some(u32::MAX)] {
            for msg in [1, 300] {
                let m = ServerMsg::MessageDelivered {
                    rid,
                    call: long.clone(),
                    msg,
                };
                let (hot, serde) = both(&m);
                assert_eq!(hot, serde, "{rid:?} {msg}");
            }
        }
    }

    use rmpv::Value as V;

    /// A frame body holding the map `pairs`, written by rmpv (so by neither of our paths).
    fn frame(pairs: Vec<(V, V)>) -> Vec<u8> {
        let mut out = Vec::new();
        rmpv::encode::write_value(&mut out, &V::Map(pairs)).expect("vec write");
        out
    }

    fn client_body(msg: &ClientMsg) -> Vec<u8> {
        let mut buf = BytesMut::new();
        encode_frame(msg, &mut buf).expect("encodes");
        buf[LEN_PREFIX..].to_vec()
    }

    #[test]
    fn the_flows_frames_take_the_hot_path_and_read_as_serde_reads_them() {
        let long = "q".repeat(300);
        let frames = [
            ClientMsg::Message {
                rid: Some(9),
                call: "n.1.c1".into(),
                content_type: "text/plain".into(),
                body: Body::Text("hi".into()),
            },
            ClientMsg::Message {
                rid: None,
                call: long.clone(),
                content_type: "application/octet-stream".into(),
                body: Body::Binary(vec![0, 255, 7]),
            },
            ClientMsg::Message {
                rid: Some(u32::MAX),
                call: "c".into(),
                content_type: "image/png".into(),
                body: Body::Binary(vec![1; 70_000]),
            },
            ClientMsg::MessageAck {
                call: "n.1.c1".into(),
                msg: 300,
            },
        ];
        for m in &frames {
            let body = client_body(m);
            assert_eq!(decode_hot_client(&body).as_ref(), Some(m));
            assert_eq!(crate::messages::decode_client(&body).as_ref(), Ok(m));
        }
    }

    #[test]
    fn the_flows_server_frames_take_the_hot_path_and_read_as_serde_reads_them() {
        let long = "r".repeat(300);
        let mut frames = Vec::new();
        for body in [
            Body::Text("hi".into()),
            Body::Text(long.clone()),
            Body::Binary(vec![]),
            Body::Binary(vec![1; 70_000]),
        ] {
            for toast in [None, Some(true), Some(false)] {
                for msg in [0, 1, 128, u32::MAX] {
                    frames.push(ServerMsg::MessageReceived {
                        call: "n1.c7".into(),
                        msg,
                        from: long.clone(),
                        content_type: "text/plain".into(),
                        body: body.clone(),
                        toast,
                    });
                }
            }
        }
        for rid in [None, Some(0), Some(70_000), Some(u32::MAX)] {
            frames.push(ServerMsg::MessageDelivered {
                rid,
                call: long.clone(),
                msg: 300,
            });
        }
        for m in &frames {
            let mut buf = BytesMut::new();
            encode_frame(m, &mut buf).expect("encodes");
            let body = &buf[LEN_PREFIX..];
            assert_eq!(decode_hot_server(body).as_ref(), Some(m), "{m:?}");
            assert_eq!(crate::messages::decode_server(body).as_ref(), Ok(m));
        }
    }

    #[test]
    fn client_flow_frames_are_serdes_in_every_shape() {
        let long = "k".repeat(300);
        let mut frames = vec![ClientMsg::Ping { rid: Some(1) }];
        for rid in [None, Some(0), Some(128), Some(u32::MAX)] {
            for body in [
                Body::Text(String::new()),
                Body::Text(long.clone()),
                Body::Binary(vec![0, 255]),
                Body::Binary(vec![9; 70_000]),
            ] {
                frames.push(ClientMsg::Message {
                    rid,
                    call: long.clone(),
                    content_type: "text/plain".into(),
                    body,
                });
            }
        }
        for msg in [0, 127, 128, 65_536, u32::MAX] {
            frames.push(ClientMsg::MessageAck {
                call: "n1.c1".into(),
                msg,
            });
        }
        for m in &frames {
            let (mut hot, mut serde) = (BytesMut::new(), BytesMut::new());
            encode_client_frame(m, &mut hot).expect("hot path encodes");
            encode_frame(m, &mut serde).expect("serde encodes");
            assert_eq!(hot, serde, "{m:?}");
        }
    }

    #[test]
    fn unusual_server_frames_are_left_to_serde() {
        let s = |t: &str| V::from(t);
        let delivered = || {
            vec![
                (s("type"), s("message_delivered")),
                (s("call"), s("c1")),
                (s("msg"), V::from(3)),
            ]
        };
        assert!(decode_hot_server(&frame(delivered())).is_some());
        let mut cases = Vec::new();
        let mut unknown = delivered();
        unknown.push((s("later_field"), V::from(1)));
        cases.push(frame(unknown));
        let mut dup = delivered();
        dup.push((s("msg"), V::from(4)));
        cases.push(frame(dup));
        let mut nil_toast = delivered();
        nil_toast[0] = (s("type"), s("message_received"));
        nil_toast.extend([
            (s("from"), s("sip:a@b")),
            (s("content_type"), s("text/plain")),
            (s("body"), s("x")),
            (s("toast"), V::Nil),
        ]);
        cases.push(frame(nil_toast));
        let mut received_missing_body = delivered();
        received_missing_body[0] = (s("type"), s("message_received"));
        received_missing_body.extend([
            (s("from"), s("sip:a@b")),
            (s("content_type"), s("text/plain")),
        ]);
        cases.push(frame(received_missing_body));
        let mut delivered_with_from = delivered();
        delivered_with_from.push((s("from"), s("sip:a@b")));
        cases.push(frame(delivered_with_from));
        let mut trailing = frame(delivered());
        trailing.push(0xc0);
        cases.push(trailing);
        cases.push(frame(vec![(s("type"), s("pong"))]));
        for body in &cases {
            assert_eq!(decode_hot_server(body), None, "{body:?}");
        }
    }

    #[test]
    fn anything_unusual_is_left_to_serde() {
        let s = |t: &str| V::from(t);
        let good = || {
            vec![
                (s("type"), s("message")),
                (s("call"), s("c1")),
                (s("content_type"), s("text/plain")),
                (s("body"), s("x")),
            ]
        };
        let mut cases = Vec::new();
        let mut dup = good();
        dup.push((s("call"), s("c2")));
        cases.push(frame(dup));
        let mut unknown = good();
        unknown.push((s("extra"), V::from(1)));
        cases.push(frame(unknown));
        // A field of the server's flow frames, which the shared field reader knows.
        let mut from = good();
        from.push((s("from"), s("sip:a@b")));
        cases.push(frame(from));
        let mut negative = good();
        negative.push((s("rid"), V::from(-1)));
        cases.push(frame(negative));
        let mut big = good();
        big.push((s("rid"), V::from(u64::from(u32::MAX) + 1)));
        cases.push(frame(big));
        let mut missing = good();
        missing.retain(|(k, _)| k.as_str() != Some("body"));
        cases.push(frame(missing));
        let mut number_body = good();
        number_body.retain(|(k, _)| k.as_str() != Some("body"));
        number_body.push((s("body"), V::from(5)));
        cases.push(frame(number_body));
        // `call` as a str whose bytes are not UTF-8 (written by hand: rmpv will not).
        let mut bad_utf8 = Vec::new();
        rmp::encode::write_map_len(&mut bad_utf8, 4).expect("vec write");
        for (k, v) in [
            ("type", "message"),
            ("content_type", "text/plain"),
            ("body", "x"),
        ] {
            rmp::encode::write_str(&mut bad_utf8, k).expect("vec write");
            rmp::encode::write_str(&mut bad_utf8, v).expect("vec write");
        }
        rmp::encode::write_str(&mut bad_utf8, "call").expect("vec write");
        rmp::encode::write_str_len(&mut bad_utf8, 2).expect("vec write");
        bad_utf8.extend_from_slice(&[0xff, 0xfe]);
        cases.push(bad_utf8);
        let mut trailing = frame(good());
        trailing.push(0xc0);
        cases.push(trailing);
        cases.push(frame(vec![
            (s("type"), s("message_ack")),
            (s("call"), s("c")),
        ]));
        cases.push(frame(vec![
            (s("type"), s("call_terminate")),
            (s("call"), s("c")),
        ]));
        for body in &cases {
            assert_eq!(decode_hot_client(body), None, "{body:?}");
        }
        // And the clean frame itself is taken.
        assert!(decode_hot_client(&frame(good())).is_some());
    }

    /// A call's three requests read by hand must read exactly as serde reads them: the
    /// clean shapes come out equal; anything else is left to serde, whose answer (a value or
    /// an error) `decode_client` then gives unchanged.
    #[test]
    fn call_requests_take_the_hot_path_and_read_as_serde_reads_them() {
        let long = "t".repeat(300);
        let mut frames = Vec::new();
        for rid in [None, Some(0), Some(128), Some(u32::MAX)] {
            frames.push(ClientMsg::CallEstablish {
                rid,
                to: "sip:bob@example.com".into(),
                conversation: None,
                toast: None,
                sdp: long.clone(),
            });
            frames.push(ClientMsg::CallAccept {
                rid,
                call: long.clone(),
                sdp: "v=0\r\n".into(),
            });
            frames.push(ClientMsg::CallTerminate {
                rid,
                call: "n1.c1".into(),
            });
        }
        for m in &frames {
            let body = client_body(m);
            assert_eq!(decode_hot_call_request(&body).as_ref(), Some(m), "{m:?}");
            assert_eq!(crate::messages::decode_client(&body).as_ref(), Ok(m));
        }
        let s = |t: &str| V::from(t);
        let establish = || {
            vec![
                (s("type"), s("call_establish")),
                (s("rid"), V::from(4)),
                (s("to"), s("sip:bob@example.com")),
                (s("sdp"), s("v=0")),
            ]
        };
        assert!(decode_hot_call_request(&frame(establish())).is_some());
        // `rid: nil` reads as no rid, as serde's `default` reads it.
        let mut nil_rid = establish();
        nil_rid[1].1 = V::Nil;
        let body = frame(nil_rid);
        assert_eq!(
            decode_hot_call_request(&body),
            crate::messages::decode_client(&body).ok()
        );
        let mut cases = Vec::new();
        for (key, value) in [
            ("conversation", s("v1")),
            ("toast", V::Nil),
            ("call", s("c1")),
            ("extra", V::from(1)),
            ("sdp", s("again")),
            ("rid", V::from(-1)),
        ] {
            let mut f = establish();
            f.push((s(key), value));
            cases.push(frame(f));
        }
        let mut big_rid = establish();
        big_rid[1].1 = V::from(u64::from(u32::MAX) + 1);
        cases.push(frame(big_rid));
        let mut no_sdp = establish();
        no_sdp.pop();
        cases.push(frame(no_sdp));
        let mut number_to = establish();
        number_to[2].1 = V::from(7);
        cases.push(frame(number_to));
        let mut trailing = frame(establish());
        trailing.push(0xc0);
        cases.push(trailing);
        cases.push(frame(vec![
            (s("type"), s("call_accept")),
            (s("call"), s("c")),
        ]));
        cases.push(frame(vec![
            (s("type"), s("call_terminate")),
            (s("call"), s("c")),
            (s("sdp"), s("v=0")),
        ]));
        cases.push(frame(vec![
            (s("type"), s("call_decline")),
            (s("call"), s("c")),
        ]));
        for body in &cases {
            assert_eq!(decode_hot_call_request(body), None, "{body:?}");
        }
    }

    #[test]
    fn call_setup_frames_are_serdes_in_every_shape() {
        let long = "s".repeat(300);
        let toasts = [
            None,
            Some(Toast {
                content_type: "text/plain".into(),
                body: Body::Text("Lunch?".into()),
            }),
            Some(Toast {
                content_type: long.clone(),
                body: Body::Binary(vec![0, 1, 255]),
            }),
        ];
        let mut frames = Vec::new();
        for rid in [None, Some(0), Some(200), Some(u32::MAX)] {
            frames.push(ServerMsg::Ok { rid });
            for (call, conversation) in [("c1", "v1"), (long.as_str(), "v")] {
                frames.push(ServerMsg::CallCreated {
                    rid,
                    call: call.into(),
                    conversation: conversation.into(),
                });
            }
            for (heartbeat_ms, max_frame) in [(0, 0), (15_000, 1 << 20), (u64::MAX, u32::MAX)] {
                frames.push(ServerMsg::Welcome {
                    resume: None,
                    rid,
                    endpoint: "n1.0badf00d.e1".into(),
                    node: long.clone(),
                    heartbeat_ms,
                    max_frame,
                });
            }
        }
        for toast in &toasts {
            for immediate_auto_accept in [false, true] {
                for sdp in ["", "v=0\r\n", long.as_str()] {
                    frames.push(ServerMsg::CallIncoming {
                        call: "n1.c2".into(),
                        conversation: "n1.v3".into(),
                        from: "sip:alice@example.com".into(),
                        toast: toast.clone(),
                        sdp: sdp.into(),
                        immediate_auto_accept,
                    });
                }
            }
        }
        for call in ["c", long.as_str()] {
            frames.push(ServerMsg::CallRinging { call: call.into() });
            frames.push(ServerMsg::CallEstablished {
                call: call.into(),
                sdp: long.clone(),
                remote: Remote {
                    user: "sip:bob@example.com".into(),
                    endpoint: call.into(),
                },
            });
        }
        for m in &frames {
            let (hot, serde) = both(m);
            assert_eq!(hot, serde, "{m:?}");
        }
    }

    #[test]
    fn other_messages_go_through_serde_unchanged() {
        let msg = ServerMsg::Pong { rid: Some(7) };
        let (hot, serde) = both(&msg);
        assert_eq!(hot, serde);
    }

    #[test]
    fn strings_and_integers_of_every_width_match_rmp() {
        for len in [0usize, 31, 32, 255, 256, 65535, 65536] {
            let s = "z".repeat(len);
            let mut ours = BytesMut::new();
            str(&mut ours, &s);
            let mut theirs = Vec::new();
            rmp::encode::write_str(&mut theirs, &s).expect("vec write");
            assert_eq!(&ours[..], &theirs[..], "len {len}");
        }
        for v in [
            0u64,
            127,
            128,
            255,
            256,
            65535,
            65536,
            u64::from(u32::MAX),
            u64::MAX,
        ] {
            let mut ours = BytesMut::new();
            uint(&mut ours, v);
            let mut theirs = Vec::new();
            rmp::encode::write_uint(&mut theirs, v).expect("vec write");
            assert_eq!(&ours[..], &theirs[..], "{v}");
        }
    }
}
