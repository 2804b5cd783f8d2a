//! `decode_client` and `decode_server` over arbitrary frame bodies.
//!
//! Besides "never panics": a body that decodes re-encodes (as the node writes it) and decodes
//! to the same message; its `type` is one of the known ones (and the one `peek_type` saw); an
//! error's rid/type/code accessors are consistent with the error kind; and decoding fits a
//! bounded stack.
//!
//! The stack bound: the node decodes frames on its worker threads (2 MiB stacks), in debug
//! builds with frames several times larger than here, so each input is decoded on a thread with
//! `CONFAB_FUZZ_STACK` bytes of stack (default 512 KiB). Recursion that depends on the input
//! (nesting) shows up as a stack overflow, which libFuzzer reports as a crash.
#![no_main]

use bytes::BytesMut;
use confab_protocol::codec::encode_frame;
use confab_protocol::peek::peek_type;
use confab_protocol::{
    CLIENT_TYPES, DecodeError, ErrorCode, SERVER_TYPES, decode_client, decode_server,
};
use libfuzzer_sys::fuzz_target;

fn reencode<T: serde::Serialize>(msg: &T) -> BytesMut {
    let mut buf = BytesMut::new();
    encode_frame(msg, &mut buf).expect("a decoded message re-encodes");
    buf.split_off(4)
}

fn check_error(e: &DecodeError, known: &[&str]) {
    match e {
        DecodeError::UnknownType { ty, rid } => {
            assert_eq!(e.code(), ErrorCode::UnknownType);
            assert!(
                !known.contains(&ty.as_str()),
                "known type {ty} reported unknown"
            );
            assert_eq!(e.rid(), *rid);
        }
        DecodeError::BadFrame { .. } => assert_eq!(e.code(), ErrorCode::BadFrame),
    }
    let _ = e.type_name();
    let _ = e.to_string();
}

/// Stack of the thread each input is decoded on.
fn stack_size() -> usize {
    static SIZE: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *SIZE.get_or_init(|| {
        std::env::var("CONFAB_FUZZ_STACK")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(512 * 1024)
    })
}

fuzz_target!(|data: &[u8]| {
    std::thread::scope(|s| {
        std::thread::Builder::new()
            .stack_size(stack_size())
            .spawn_scoped(s, || check(data))
            .expect("spawn")
            .join()
            // A panic was already reported by libFuzzer's hook; re-raise it here.
            .unwrap_or_else(|p| std::panic::resume_unwind(p));
    });
});

fn check(data: &[u8]) {
    match decode_client(data) {
        Ok(msg) => {
            assert!(CLIENT_TYPES.contains(&msg.type_name()));
            // The fast peek at `type` (which picks the hot path) never disagrees with the decoder.
            if let Some(t) = peek_type(data) {
                assert_eq!(t, msg.type_name(), "peek_type disagrees");
            }
            let _ = msg.rid();
            let again = decode_client(&reencode(&msg)).expect("re-encoded client msg decodes");
            assert_eq!(again, msg, "client round trip");
        }
        Err(e) => check_error(&e, CLIENT_TYPES),
    }
    match decode_server(data) {
        Ok(msg) => {
            let again = decode_server(&reencode(&msg)).expect("re-encoded server msg decodes");
            assert_eq!(again, msg, "server round trip");
        }
        Err(e) => check_error(&e, SERVER_TYPES),
    }
}
