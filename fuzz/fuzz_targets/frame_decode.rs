//! FrameCodec over arbitrary bytes delivered in arbitrary chunks.
//!
//! Input layout: byte 0 picks `max_frame` (64 … 64+255*257), byte 1 seeds the chunk sizes, the
//! rest is the byte stream as a peer would send it. Checks, besides "never panics":
//! - every frame is non-empty and at most `max_frame`, and frames re-framed equal the consumed
//!   prefix of the stream (nothing dropped, reordered or invented);
//! - chunked decoding yields exactly what decoding the whole stream at once yields;
//! - an announced length never makes the buffer grow towards the announced size.
#![no_main]

use bytes::BytesMut;
use confab_protocol::{FrameCodec, FrameError};
use libfuzzer_sys::fuzz_target;
use tokio_util::codec::Decoder;

#[derive(Debug, PartialEq)]
enum End {
    /// Ran out of input with this many bytes still buffered.
    Pending(usize),
    Empty,
    TooLarge(usize),
}

/// Feeds `stream` to a fresh codec in chunks whose sizes come from `seed`.
fn run(max_frame: usize, stream: &[u8], mut seed: u8) -> (Vec<BytesMut>, End) {
    let mut codec = FrameCodec::new(max_frame);
    let mut buf = BytesMut::new();
    let mut frames = Vec::new();
    let mut rest = stream;
    loop {
        loop {
            match codec.decode(&mut buf) {
                Ok(Some(frame)) => {
                    assert!(!frame.is_empty(), "empty frame yielded");
                    assert!(frame.len() <= max_frame, "frame over max_frame yielded");
                    frames.push(frame);
                }
                Ok(None) => break,
                Err(FrameError::Empty) => return (frames, End::Empty),
                Err(FrameError::TooLarge { len, max }) => {
                    assert_eq!(max, max_frame);
                    assert!(len > max_frame);
                    return (frames, End::TooLarge(len));
                }
                Err(e) => panic!("unexpected decode error {e:?}"),
            }
            // The buffer may hold one partial frame plus what the last chunk brought; it must
            // never be grown towards a length announced beyond max_frame.
            assert!(
                buf.capacity() <= 2 * (max_frame + 4) + 2 * stream.len() + 64,
                "buffer grew to {} for max_frame {max_frame}",
                buf.capacity()
            );
        }
        if rest.is_empty() {
            return (frames, End::Pending(buf.len()));
        }
        seed = seed.wrapping_mul(31).wrapping_add(7);
        let n = (usize::from(seed) % 17 + 1).min(rest.len());
        buf.extend_from_slice(&rest[..n]);
        rest = &rest[n..];
    }
}

fuzz_target!(|data: &[u8]| {
    let [pick, seed, stream @ ..] = data else {
        return;
    };
    let max_frame = 64 + usize::from(*pick) * 257;
    let (chunked, end_chunked) = run(max_frame, stream, *seed);

    // Re-framing what came out gives back the consumed prefix of the stream.
    let mut reframed = Vec::new();
    for f in &chunked {
        reframed.extend_from_slice(&(f.len() as u32).to_be_bytes());
        reframed.extend_from_slice(f);
    }
    assert_eq!(
        &stream[..reframed.len()],
        &reframed[..],
        "frames differ from the stream"
    );
    if let End::Pending(left) = end_chunked {
        assert_eq!(reframed.len() + left, stream.len(), "bytes lost");
    }

    // All at once: the same frames, the same ending.
    let mut codec = FrameCodec::new(max_frame);
    let mut whole = BytesMut::from(stream);
    let mut at_once = Vec::new();
    let end_whole = loop {
        match codec.decode(&mut whole) {
            Ok(Some(f)) => at_once.push(f),
            Ok(None) => break End::Pending(whole.len()),
            Err(FrameError::Empty) => break End::Empty,
            Err(FrameError::TooLarge { len, .. }) => break End::TooLarge(len),
            Err(e) => panic!("unexpected decode error {e:?}"),
        }
    };
    assert_eq!(chunked, at_once);
    assert_eq!(end_chunked, end_whole);
    // decode_eof on leftovers must not panic either.
    if let End::Pending(_) = end_whole {
        let _ = codec.decode_eof(&mut whole);
    }
});
