//! Hand-written MessagePack for the frame the node sends most: `call_state` (about half of the
//! ~22 frames of a forked call). serde's path for an internally tagged enum costs about 1,600
//! instructions per frame; writing the map directly costs a fraction of that. The bytes are
//! exactly what [`crate::codec::encode_frame`] writes (a test compares every shape), so nothing
//! on the wire changes. Every other message goes through serde.

use bytes::{BufMut, BytesMut};

use crate::codec::{FrameError, LEN_PREFIX, encode_frame};
use crate::messages::ServerMsg;

/// Appends one frame holding `msg`, as [`encode_frame`] would.
pub fn encode_server_frame(msg: &ServerMsg, dst: &mut BytesMut) -> Result<(), FrameError> {
    let ServerMsg::CallState {
        call,
        conversation,
        direction,
        state,
        previous,
        reason,
    } = msg
    else {
        return encode_frame(msg, dst);
    };
    let start = dst.len();
    dst.put_u32(0);
    map_len(dst, if reason.is_some() { 7 } else { 6 });
    str(dst, "type");
    str(dst, "call_state");
    str(dst, "call");
    str(dst, call);
    str(dst, "conversation");
    str(dst, conversation);
    str(dst, "direction");
    str(dst, direction.as_str());
    str(dst, "state");
    str(dst, state.as_str());
    str(dst, "previous");
    str(dst, previous.as_str());
    if let Some(reason) = reason {
        str(dst, "reason");
        map_len(dst, 2);
        str(dst, "code");
        uint(dst, u64::from(reason.code));
        str(dst, "text");
        str(dst, &reason.text);
    }
    let len = dst.len() - start - LEN_PREFIX;
    let Ok(len32) = u32::try_from(len) else {
        dst.truncate(start);
        return Err(FrameError::Encode(format!(
            "{len} bytes do not fit a frame"
        )));
    };
    dst[start..start + LEN_PREFIX].copy_from_slice(&len32.to_be_bytes());
    Ok(())
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
    use crate::messages::{Reason, ServerMsg};
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
    fn other_messages_go_through_serde_unchanged() {
        let msg = ServerMsg::Ok { rid: Some(7) };
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
