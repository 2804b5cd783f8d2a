//! Length-prefixed framing: a 4-byte big-endian length `N`, then `N` bytes of one MessagePack
//! map. [`FrameCodec`] is a `tokio-util` codec that yields raw frame bodies (decoding them into
//! messages is [`crate::messages`]'s job) and encodes any serializable message as a named map.
//! The length is checked against `max_frame` before any buffer grows, so a hostile peer cannot
//! make the node allocate what it announces.

use bytes::{Buf, BufMut, BytesMut};
use serde::Serialize;
use thiserror::Error;
use tokio_util::codec::{Decoder, Encoder};

/// Size of the length prefix.
pub const LEN_PREFIX: usize = 4;

/// A framing failure. `Empty` and `TooLarge` mean the stream can no longer be trusted.
#[derive(Debug, Error)]
pub enum FrameError {
    #[error("zero-length frame")]
    Empty,
    #[error("frame of {len} bytes exceeds the limit of {max}")]
    TooLarge { len: usize, max: usize },
    #[error("message could not be encoded: {0}")]
    Encode(String),
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

/// The frame codec; `max_frame` bounds the body length of decoded frames.
#[derive(Debug, Clone, Copy)]
pub struct FrameCodec {
    max_frame: usize,
}

impl FrameCodec {
    pub fn new(max_frame: usize) -> Self {
        FrameCodec { max_frame }
    }
    pub fn max_frame(&self) -> usize {
        self.max_frame
    }
    /// Changes the bound, e.g. from the small one before sign-in to the node's `max_frame`.
    pub fn set_max_frame(&mut self, max_frame: usize) {
        self.max_frame = max_frame;
    }
}

impl Default for FrameCodec {
    fn default() -> Self {
        FrameCodec::new(crate::DEFAULT_MAX_FRAME)
    }
}

impl Decoder for FrameCodec {
    type Item = BytesMut;
    type Error = FrameError;

    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<BytesMut>, FrameError> {
        let Some(prefix) = src.get(..LEN_PREFIX) else {
            return Ok(None);
        };
        let len = u32::from_be_bytes([prefix[0], prefix[1], prefix[2], prefix[3]]) as usize;
        if len == 0 {
            return Err(FrameError::Empty);
        }
        if len > self.max_frame {
            return Err(FrameError::TooLarge {
                len,
                max: self.max_frame,
            });
        }
        if src.len() < LEN_PREFIX + len {
            // Safe to reserve: `len` is bounded by max_frame.
            src.reserve(LEN_PREFIX + len - src.len());
            return Ok(None);
        }
        src.advance(LEN_PREFIX);
        Ok(Some(src.split_to(len)))
    }
}

impl<T: Serialize> Encoder<&T> for FrameCodec {
    type Error = FrameError;

    fn encode(&mut self, msg: &T, dst: &mut BytesMut) -> Result<(), FrameError> {
        encode_frame(msg, dst)
    }
}

/// Appends one frame holding `msg` as a MessagePack map with named fields.
pub fn encode_frame<T: Serialize>(msg: &T, dst: &mut BytesMut) -> Result<(), FrameError> {
    let start = dst.len();
    dst.put_u32(0);
    let mut writer = dst.writer();
    if let Err(e) = rmp_serde::encode::write_named(&mut writer, msg) {
        writer.into_inner().truncate(start);
        return Err(FrameError::Encode(e.to_string()));
    }
    let dst = writer.into_inner();
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

/// One frame holding `msg`, as a fresh buffer.
pub fn frame_bytes<T: Serialize>(msg: &T) -> Result<BytesMut, FrameError> {
    let mut buf = BytesMut::with_capacity(128);
    encode_frame(msg, &mut buf)?;
    Ok(buf)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn partial_prefix_and_partial_body_are_not_errors() {
        let mut codec = FrameCodec::new(16);
        let mut buf = BytesMut::from(&[0u8, 0][..]);
        assert!(codec.decode(&mut buf).expect("partial").is_none());
        buf.extend_from_slice(&[0, 3, 0x80]);
        assert!(codec.decode(&mut buf).expect("partial").is_none());
        buf.extend_from_slice(&[0x80, 0x80, 0xff]);
        let frame = codec.decode(&mut buf).expect("ok").expect("frame");
        assert_eq!(&frame[..], &[0x80, 0x80, 0x80]);
        assert_eq!(&buf[..], &[0xff]);
    }

    #[test]
    fn zero_length_is_rejected() {
        let mut buf = BytesMut::from(&[0u8, 0, 0, 0][..]);
        assert!(matches!(
            FrameCodec::new(16).decode(&mut buf),
            Err(FrameError::Empty)
        ));
    }

    #[test]
    fn oversize_is_rejected_before_the_body_arrives() {
        let mut buf = BytesMut::from(&[0xffu8, 0xff, 0xff, 0xff][..]);
        match FrameCodec::new(65536).decode(&mut buf) {
            Err(FrameError::TooLarge { len, max }) => {
                assert_eq!((len, max), (u32::MAX as usize, 65536));
            }
            other => panic!("expected TooLarge, got {other:?}"),
        }
        assert!(buf.capacity() < 1024, "no allocation for an announced size");
    }

    #[test]
    fn exactly_max_frame_is_accepted() {
        let mut buf = BytesMut::new();
        buf.put_u32(4);
        buf.extend_from_slice(&[1, 2, 3, 4]);
        let frame = FrameCodec::new(4)
            .decode(&mut buf)
            .expect("ok")
            .expect("frame");
        assert_eq!(frame.len(), 4);
    }
}
