//! Regression tests for crashes found in the parsers of untrusted input, by the fuzz targets of
//! `fuzz/` (see its README) or while hardening. Each test reproduces one finding with the
//! smallest input that shows it, and stays here after the fix.
//!
//! 1. `message_decode`: a frame body nesting MessagePack maps or arrays deeply (well within
//!    `max_frame`: one to three bytes per level) made `decode_client` recurse once per level, up
//!    to rmp-serde's default depth limit of 1024. In a debug build that overflowed the 2 MiB
//!    stack of a node worker thread from about 500 levels (in release, 1024 levels of maps
//!    needed more than 512 KiB), and the overflow aborted the whole node process. Fixed by
//!    bounding nesting to `messages::MAX_DEPTH` (16) in every decoder pass.

use confab_protocol::{decode_client, decode_server};
use std::process::Command;

/// Stack of a node worker thread (actix arbiters use the std default).
const WORKER_STACK: usize = 2 * 1024 * 1024;

/// Set in the child process that runs one test's body.
const CHILD: &str = "CONFAB_FUZZ_REGRESSION_CHILD";

/// Runs `body` in a child process (this test binary, filtered to test `name`), so that a stack
/// overflow, which aborts the process, fails this test with a message instead of killing every
/// test of the binary.
fn in_child(name: &str, body: impl FnOnce()) {
    if std::env::var(CHILD).as_deref() == Ok(name) {
        body();
        return;
    }
    let out = Command::new(std::env::current_exe().expect("test binary"))
        .args(["--exact", name, "--nocapture", "--test-threads=1"])
        .env(CHILD, name)
        .output()
        .expect("run the test binary");
    assert!(
        out.status.success(),
        "{name} crashed ({}):\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Decodes `body` both ways on a thread with a worker's stack; any result is fine.
fn decode_on_worker_stack(body: Vec<u8>) {
    std::thread::Builder::new()
        .stack_size(WORKER_STACK)
        .spawn(move || {
            let _ = decode_client(&body);
            let _ = decode_server(&body);
        })
        .expect("spawn")
        .join()
        .expect("decoding does not panic");
}

/// `{"type":"ping","x": <nested>}` (or `<nested>` alone), `depth` levels of `open`.
fn nested(depth: usize, open: u8, in_field: bool) -> Vec<u8> {
    let mut v = Vec::new();
    if in_field {
        v.extend_from_slice(&[0x82, 0xa4]);
        v.extend_from_slice(b"type");
        v.push(0xa4);
        v.extend_from_slice(b"ping");
        v.extend_from_slice(&[0xa1, b'x']);
    }
    for _ in 0..depth {
        v.push(open);
        if open == 0x81 {
            // A fixmap of one entry: key "k", then the next level as its value.
            v.extend_from_slice(&[0xa1, b'k']);
        }
    }
    v.push(0xc0);
    v
}

#[test]
fn deeply_nested_bodies_decode_within_a_worker_stack() {
    in_child("deeply_nested_bodies_decode_within_a_worker_stack", || {
        for depth in [600, 1000, 1023, 1100, 20_000] {
            for open in [0x91, 0x81] {
                for in_field in [true, false] {
                    let body = nested(depth, open, in_field);
                    // Every one of these fits the default max_frame.
                    assert!(body.len() <= 65536);
                    decode_on_worker_stack(body);
                }
            }
        }
    });
}

#[test]
fn shallow_unknown_fields_are_still_ignored() {
    // Whatever bound the fix puts on nesting, an ordinary extra field still decodes.
    let body = nested(3, 0x91, true);
    assert!(decode_client(&body).is_ok());
    let body = nested(3, 0x81, true);
    assert!(decode_client(&body).is_ok());
}

#[test]
fn too_deep_frame_is_bad_frame_echoing_its_rid() {
    // {"type":"ping","rid":5,"x":[[[…]]]}: a map with a valid rid (contract §1: the error echoes
    // it), one level too deep.
    for depth in [15, 40, 1000] {
        let mut body = vec![0x83, 0xa4];
        body.extend_from_slice(b"type");
        body.push(0xa4);
        body.extend_from_slice(b"ping");
        body.extend_from_slice(&[0xa3, b'r', b'i', b'd', 0x05, 0xa1, b'x']);
        body.extend(std::iter::repeat_n(0x91, depth));
        body.push(0xc0);
        match decode_client(&body) {
            Err(e @ confab_protocol::DecodeError::BadFrame { .. }) => {
                assert_eq!(e.rid(), Some(5), "{e:?}");
                assert_eq!(e.type_name(), Some("ping"), "{e:?}");
                assert!(!e.to_string().contains("not a MessagePack map"), "{e}");
            }
            other => panic!("expected bad_frame, got {other:?}"),
        }
    }
}
