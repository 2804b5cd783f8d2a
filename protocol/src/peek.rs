//! A fast look at a frame before decoding it: the top-level map's `type`, found by skipping
//! every other value without building anything. It lets the hottest messages (`message`,
//! `message_ack`) decode straight into their fields instead of through serde's buffering of
//! internally tagged enums.

use rmp::Marker;

/// What a quick read of a frame can tell, even of a malformed one: whether it is a map, its
/// `type` and a valid `rid` (an unsigned integer that fits 32 bits).
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Probe<'a> {
    pub is_map: bool,
    pub ty: Option<&'a str>,
    pub rid: Option<u32>,
}

/// The `type` string of a frame whose top level is a map, if it has a readable one.
pub fn peek_type(body: &[u8]) -> Option<&str> {
    scan(body, false).ty
}

/// The `type` and `rid` of a frame, read up to the first thing that is not well-formed. Never
/// recurses, so nesting depth costs no stack.
pub fn probe(body: &[u8]) -> Probe<'_> {
    scan(body, true)
}

fn scan(body: &[u8], want_rid: bool) -> Probe<'_> {
    let mut p = Probe::default();
    let mut rd = body;
    let Some(len) = map_len(&mut rd) else {
        return p;
    };
    p.is_map = true;
    for _ in 0..len {
        let key = match peek_marker(rd) {
            Some(Marker::FixStr(_) | Marker::Str8 | Marker::Str16 | Marker::Str32) => {
                read_str(&mut rd)
            }
            _ => skip(&mut rd).map(|()| &b""[..]),
        };
        let Some(key) = key else { return p };
        let ok = match key {
            b"type"
                if matches!(
                    peek_marker(rd),
                    Some(Marker::FixStr(_) | Marker::Str8 | Marker::Str16 | Marker::Str32)
                ) =>
            {
                read_str(&mut rd).map(|v| p.ty = std::str::from_utf8(v).ok())
            }
            b"rid" => read_uint(&mut rd).map(|v| p.rid = v.and_then(|v| u32::try_from(v).ok())),
            _ => skip(&mut rd),
        };
        if ok.is_none() || (p.ty.is_some() && (!want_rid || p.rid.is_some())) {
            return p;
        }
    }
    p
}

/// The `call` of a `message_received` frame: `Some` only if `body` is exactly one well-formed
/// MessagePack map whose `type` is `message_received` and whose `call` is a string. What a
/// cluster node needs to pass another node's frame on to its client without decoding it.
pub fn message_received_call(body: &[u8]) -> Option<&str> {
    if value_len(body)? != body.len() {
        return None;
    }
    let mut rd = body;
    let len = map_len(&mut rd)?;
    let (mut ty, mut call) = (None, None);
    for _ in 0..len {
        match read_str(&mut rd)? {
            b"type" => ty = Some(read_str(&mut rd)?),
            b"call" => call = Some(std::str::from_utf8(read_str(&mut rd)?).ok()?),
            _ => skip(&mut rd)?,
        }
        if ty.is_some() && call.is_some() {
            break;
        }
    }
    (ty? == b"message_received").then_some(call?)
}

pub(crate) fn peek_marker(rd: &[u8]) -> Option<Marker> {
    rd.first().map(|b| Marker::from_u8(*b))
}

/// An unsigned integer (`Some(Some(n))`), or any other value skipped (`Some(None)`).
pub fn read_uint(rd: &mut &[u8]) -> Option<Option<u64>> {
    let be = |b: &[u8]| b.iter().fold(0u64, |acc, x| (acc << 8) | u64::from(*x));
    match peek_marker(rd)? {
        Marker::FixPos(n) => {
            take(rd, 1)?;
            Some(Some(u64::from(n)))
        }
        Marker::U8 | Marker::U16 | Marker::U32 | Marker::U64 => {
            let width = match take_marker(rd)? {
                Marker::U8 => 1,
                Marker::U16 => 2,
                Marker::U32 => 4,
                _ => 8,
            };
            Some(Some(be(take(rd, width)?)))
        }
        _ => skip(rd).map(|()| None),
    }
}

/// A map's length, the reader moved past its marker; `None` for anything but a map.
pub fn map_len(rd: &mut &[u8]) -> Option<u32> {
    match take_marker(rd)? {
        Marker::FixMap(n) => Some(u32::from(n)),
        Marker::Map16 => Some(u32::from(u16::from_be_bytes(take_array(rd)?))),
        Marker::Map32 => Some(u32::from_be_bytes(take_array(rd)?)),
        _ => None,
    }
}

/// A string's bytes (not checked as UTF-8), the reader moved past it; `None` for anything else.
pub fn read_str<'a>(rd: &mut &'a [u8]) -> Option<&'a [u8]> {
    let len = match take_marker(rd)? {
        Marker::FixStr(n) => usize::from(n),
        Marker::Str8 => usize::from(take(rd, 1)?[0]),
        Marker::Str16 => usize::from(u16::from_be_bytes(take_array(rd)?)),
        Marker::Str32 => u32::from_be_bytes(take_array(rd)?) as usize,
        _ => return None,
    };
    take(rd, len)
}

/// How many bytes the first MessagePack value of `body` takes; `None` if it is truncated or
/// malformed. Lets a decoder that borrows from `body` check that nothing trails the message.
pub fn value_len(body: &[u8]) -> Option<usize> {
    let mut rest = body;
    skip(&mut rest)?;
    Some(body.len() - rest.len())
}

/// Skips one value, however deeply nested, without recursion: `pending` counts the values
/// still to skip, and a container adds its items to it.
pub fn skip(rd: &mut &[u8]) -> Option<()> {
    let be = |b: &[u8]| b.iter().fold(0usize, |acc, x| (acc << 8) | usize::from(*x));
    let mut pending: usize = 1;
    while pending > 0 {
        pending -= 1;
        let (bytes, items) = match take_marker(rd)? {
            Marker::Null | Marker::True | Marker::False | Marker::FixPos(_) | Marker::FixNeg(_) => {
                (0, 0)
            }
            Marker::U8 | Marker::I8 => (1, 0),
            Marker::U16 | Marker::I16 => (2, 0),
            Marker::U32 | Marker::I32 | Marker::F32 => (4, 0),
            Marker::U64 | Marker::I64 | Marker::F64 => (8, 0),
            Marker::FixStr(n) => (usize::from(n), 0),
            Marker::Str8 | Marker::Bin8 => (be(take(rd, 1)?), 0),
            Marker::Str16 | Marker::Bin16 => (be(take(rd, 2)?), 0),
            Marker::Str32 | Marker::Bin32 => (be(take(rd, 4)?), 0),
            Marker::FixArray(n) => (0, usize::from(n)),
            Marker::Array16 => (0, be(take(rd, 2)?)),
            Marker::Array32 => (0, be(take(rd, 4)?)),
            Marker::FixMap(n) => (0, 2 * usize::from(n)),
            Marker::Map16 => (0, 2 * be(take(rd, 2)?)),
            Marker::Map32 => (0, 2 * be(take(rd, 4)?)),
            Marker::FixExt1 => (2, 0),
            Marker::FixExt2 => (3, 0),
            Marker::FixExt4 => (5, 0),
            Marker::FixExt8 => (9, 0),
            Marker::FixExt16 => (17, 0),
            Marker::Ext8 => (be(take(rd, 1)?) + 1, 0),
            Marker::Ext16 => (be(take(rd, 2)?) + 1, 0),
            Marker::Ext32 => (be(take(rd, 4)?) + 1, 0),
            Marker::Reserved => return None,
        };
        take(rd, bytes)?;
        pending = pending.checked_add(items)?;
    }
    Some(())
}

fn take_marker(rd: &mut &[u8]) -> Option<Marker> {
    let b = take(rd, 1)?[0];
    Some(Marker::from_u8(b))
}

fn take<'a>(rd: &mut &'a [u8], n: usize) -> Option<&'a [u8]> {
    if rd.len() < n {
        return None;
    }
    let (head, tail) = rd.split_at(n);
    *rd = tail;
    Some(head)
}

fn take_array<const N: usize>(rd: &mut &[u8]) -> Option<[u8; N]> {
    take(rd, N)?.try_into().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_type_after_other_keys_of_every_kind() {
        // {"a": [1, {"b": nil}], "c": bin(2), "type": "ping"}
        let body = [
            0x83, 0xa1, b'a', 0x92, 0x01, 0x81, 0xa1, b'b', 0xc0, 0xa1, b'c', 0xc4, 0x02, 0xff,
            0xff, 0xa4, b't', b'y', b'p', b'e', 0xa4, b'p', b'i', b'n', b'g',
        ];
        assert_eq!(peek_type(&body), Some("ping"));
    }

    #[test]
    fn a_message_received_frame_gives_its_call_and_nothing_else_does() {
        let msg = crate::ServerMsg::MessageReceived {
            call: "n.1.c2".into(),
            msg: 7,
            from: "sip:a@example.com".into(),
            content_type: "text/plain".into(),
            body: crate::Body::Text("hi".into()),
            toast: None,
        };
        let mut framed = bytes::BytesMut::new();
        crate::hot::encode_server_frame(&msg, &mut framed).expect("encodes");
        let body = &framed[crate::codec::LEN_PREFIX..];
        assert_eq!(message_received_call(body), Some("n.1.c2"));
        // Truncated, or with a byte after it: not one whole value.
        assert_eq!(message_received_call(&body[..body.len() - 1]), None);
        let mut longer = body.to_vec();
        longer.push(0xc0);
        assert_eq!(message_received_call(&longer), None);
        // Another type, or a call that is not a string.
        let ringing = crate::ServerMsg::CallRinging {
            call: "n.1.c2".into(),
        };
        let mut framed = bytes::BytesMut::new();
        crate::hot::encode_server_frame(&ringing, &mut framed).expect("encodes");
        assert_eq!(
            message_received_call(&framed[crate::codec::LEN_PREFIX..]),
            None
        );
        // {"type": "message_received", "call": 5}
        let mut odd = vec![0x82, 0xa4];
        odd.extend_from_slice(b"type");
        odd.push(0xb0);
        odd.extend_from_slice(b"message_received");
        odd.push(0xa4);
        odd.extend_from_slice(b"call");
        odd.push(0x05);
        assert_eq!(message_received_call(&odd), None);
    }

    #[test]
    fn no_type_or_not_a_map_or_truncated_is_none() {
        assert_eq!(peek_type(&[0x80]), None);
        assert_eq!(peek_type(&[0x91, 0xa4]), None);
        assert_eq!(peek_type(&[0x81, 0xa4, b't', b'y', b'p', b'e']), None);
        assert_eq!(peek_type(&[]), None);
        assert_eq!(peek_type(&[0x81, 0xa4, b't', b'y', b'p', b'e', 0x07]), None);
    }
}
