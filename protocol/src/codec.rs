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
    /// A `u32`, as the length prefix is, and the sizes below: the codec sits in every
    /// connection's frame stream, which at 48 bytes of codec took the allocator's 128-byte class
    /// (96 with these at 24).
    max_frame: u32,
    adaptive: Option<Adaptive>,
}

/// `n`, or `u32::MAX` past it (no frame is longer: its length prefix is a `u32`).
fn saturated(n: usize) -> u32 {
    u32::try_from(n).unwrap_or(u32::MAX)
}

/// A read buffer that stays small while a connection is quiet and grows while it is busy.
///
/// A reader reads at most its buffer's spare room per system call, so a small buffer (what an
/// idle connection should cost) means one read per frame under load. When a read fills the
/// buffer, more is probably waiting: the buffer grows (to about `large`) so the next read takes a
/// batch. After `QUIET_READS` reads in a row that used less than a quarter of it, the buffer goes
/// back to `small` the next time it is empty.
#[derive(Debug, Clone, Copy)]
struct Adaptive {
    small: u32,
    large: u32,
    /// The buffer's length when `decode` last returned: more at the next call means a read.
    seen: u32,
    quiet_reads: u32,
}

/// Reads in a row that use under a quarter of a grown buffer before it shrinks back.
const QUIET_READS: u32 = 8;

impl Adaptive {
    /// Called at each `decode` with the buffer as the reader left it.
    fn after_read(&mut self, src: &mut BytesMut) {
        let fresh = src.len().saturating_sub(self.seen as usize);
        let (small, large) = (self.small as usize, self.large as usize);
        if fresh == 0 {
            return;
        }
        let room = src.capacity();
        if src.len() >= room && room < large {
            src.reserve((room * 4).min(large) - src.len());
            self.quiet_reads = 0;
        } else if room > small && fresh < room / 4 {
            self.quiet_reads = self.quiet_reads.saturating_add(1);
        } else {
            self.quiet_reads = 0;
        }
    }

    /// Called as `decode` returns: a quiet connection's emptied buffer goes back to `small`.
    fn before_return(&mut self, src: &mut BytesMut) {
        let small = self.small as usize;
        if src.is_empty() && self.quiet_reads >= QUIET_READS && src.capacity() > small {
            *src = BytesMut::with_capacity(small);
            self.quiet_reads = 0;
        }
        self.seen = saturated(src.len());
    }
}

impl FrameCodec {
    pub fn new(max_frame: usize) -> Self {
        FrameCodec {
            max_frame: saturated(max_frame),
            adaptive: None,
        }
    }

    /// Lets the read buffer move between `small` and `large` bytes with the load (see
    /// [`Adaptive`]): what the node uses, where an idle connection must cost little.
    pub fn with_adaptive_buffer(mut self, small: usize, large: usize) -> Self {
        self.adaptive = Some(Adaptive {
            small: saturated(small),
            large: saturated(large.max(small)),
            seen: 0,
            quiet_reads: 0,
        });
        self
    }
    pub fn max_frame(&self) -> usize {
        self.max_frame as usize
    }
    /// Changes the bound, e.g. from the small one before sign-in to the node's `max_frame`.
    pub fn set_max_frame(&mut self, max_frame: usize) {
        self.max_frame = saturated(max_frame);
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
        let Some(mut adaptive) = self.adaptive else {
            return self.decode_frame(src);
        };
        adaptive.after_read(src);
        let frame = self.decode_frame(src);
        adaptive.before_return(src);
        self.adaptive = Some(adaptive);
        frame
    }
}

impl FrameCodec {
    fn decode_frame(&self, src: &mut BytesMut) -> Result<Option<BytesMut>, FrameError> {
        let Some(prefix) = src.get(..LEN_PREFIX) else {
            return Ok(None);
        };
        let len = u32::from_be_bytes([prefix[0], prefix[1], prefix[2], prefix[3]]) as usize;
        if len == 0 {
            return Err(FrameError::Empty);
        }
        if len > self.max_frame as usize {
            return Err(FrameError::TooLarge {
                len,
                max: self.max_frame as usize,
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
    close_frame(writer.into_inner(), start)
}

/// Writes the length prefix of the frame that starts at `start` (its 4 placeholder bytes were
/// put there first), or removes the frame if its body does not fit the prefix.
pub(crate) fn close_frame(dst: &mut BytesMut, start: usize) -> Result<(), FrameError> {
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

    fn frames(n: usize, body: usize) -> BytesMut {
        let mut buf = BytesMut::new();
        for _ in 0..n {
            buf.put_u32(body as u32);
            buf.extend_from_slice(&vec![0x80; body]);
        }
        buf
    }

    #[test]
    fn a_full_read_grows_the_buffer_and_quiet_reads_shrink_it() {
        let mut codec = FrameCodec::new(1024).with_adaptive_buffer(128, 4096);
        let mut buf = BytesMut::with_capacity(128);
        // A read that fills the buffer: 12 frames of 6 bytes + part of the next.
        let burst = frames(20, 6);
        buf.extend_from_slice(&burst[..buf.capacity()]);
        assert!(codec.decode(&mut buf).expect("ok").is_some());
        assert!(buf.capacity() >= 400, "grew to {}", buf.capacity());
        while codec.decode(&mut buf).expect("ok").is_some() {}
        // Small reads, each consumed whole: back to the small buffer after QUIET_READS of them.
        buf.clear();
        for _ in 0..QUIET_READS {
            buf.extend_from_slice(&frames(1, 6));
            assert!(codec.decode(&mut buf).expect("ok").is_some());
            assert!(codec.decode(&mut buf).expect("ok").is_none());
        }
        assert_eq!(buf.capacity(), 128);
    }

    #[test]
    fn the_adaptive_buffer_never_passes_its_large_bound() {
        let mut codec = FrameCodec::new(1 << 20).with_adaptive_buffer(128, 1024);
        let mut buf = BytesMut::with_capacity(128);
        let stream = frames(20_000, 4);
        let mut at = 0;
        for _ in 0..50 {
            // As tokio-util's reader does before each read; then a read that fills it.
            buf.reserve(1);
            let room = buf.capacity() - buf.len();
            buf.extend_from_slice(&stream[at..at + room]);
            at += room;
            while codec.decode(&mut buf).expect("ok").is_some() {}
            // `BytesMut::reserve` may round a growth up, never to twice the bound.
            assert!(buf.capacity() < 2048, "{}", buf.capacity());
        }
        assert!(at > 50 * 512, "reads were batched: {at} bytes in 50 reads");
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

    /// Every connection's frame stream holds a codec: at 24 bytes the stream fits the
    /// allocator's 96-byte class (at 48, 128 bytes per idle connection).
    #[test]
    fn the_codec_stays_small() {
        assert!(std::mem::size_of::<FrameCodec>() <= 24);
    }

    #[test]
    fn a_bound_past_the_length_prefix_is_capped_at_its_largest() {
        let codec = FrameCodec::new(usize::MAX).with_adaptive_buffer(8, usize::MAX);
        assert_eq!(codec.max_frame(), u32::MAX as usize);
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
