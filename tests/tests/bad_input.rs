//! Contract §1 and §6 over real TCP: what a signed-in endpoint gets for frames that are not
//! what the contract allows, and that a bad request harms nobody else.

use confab_protocol::*;
use confab_tests::*;
use rmpv::Value;
use std::time::Duration;

const ALICE: &str = "sip:alice@example.com";
const BOB: &str = "sip:bob@example.com";
const CAROL: &str = "sip:carol@example.com";

/// Encodes any MessagePack value as a frame body.
fn body(v: &Value) -> Vec<u8> {
    let mut buf = Vec::new();
    rmpv::encode::write_value(&mut buf, v).expect("encode");
    buf
}

/// A map body with string keys.
fn map_body(entries: &[(&str, Value)]) -> Vec<u8> {
    body(&Value::Map(
        entries
            .iter()
            .map(|(k, v)| (Value::from(*k), v.clone()))
            .collect(),
    ))
}

/// Asserts `m` is `error{rid, code}` with some human text.
fn assert_error(m: &ServerMsg, want_rid: Option<u32>, want: ErrorCode) {
    match m {
        ServerMsg::Error { rid, code, message } => {
            assert_eq!((*rid, *code), (want_rid, want), "{m:?}");
            assert!(!message.is_empty(), "error without text: {m:?}");
        }
        other => panic!("expected error {want:?}, got {other:?}"),
    }
}

/// Asserts the connection still works: a `ping` is answered.
async fn assert_open(c: &mut Raw) {
    let rid = c.rid();
    c.send(&ClientMsg::Ping { rid }).await;
    assert_eq!(c.recv().await, ServerMsg::Pong { rid });
}

/// Sends `body` and expects `error{rid, code}`, the connection staying open.
async fn assert_rejected(c: &mut Raw, body: &[u8], rid: Option<u32>, code: ErrorCode) {
    c.send_body(body).await;
    assert_error(&c.recv().await, rid, code);
    assert_open(c).await;
}

#[tokio::test]
async fn zero_length_frame_is_bad_frame_then_close() {
    let node = start_node(|_| {});
    let mut c = Raw::sign_in(node.addr, ALICE, "laptop").await;
    c.send_bytes(&[0, 0, 0, 0]).await;
    let frames = c.expect_closed().await;
    assert_eq!(frames.len(), 1, "{frames:?}");
    assert_error(&frames[0], None, ErrorCode::BadFrame);
}

#[tokio::test]
async fn zero_length_frame_before_hello_is_bad_frame_then_close() {
    let node = start_node(|_| {});
    let mut c = Raw::connect(node.addr).await;
    c.send_bytes(&[0, 0, 0, 0]).await;
    let frames = c.expect_closed().await;
    assert_eq!(frames.len(), 1, "{frames:?}");
    assert_error(&frames[0], None, ErrorCode::BadFrame);
}

#[tokio::test]
async fn frame_longer_than_max_frame_is_frame_too_large_then_close() {
    let node = start_node(|s| s.server.max_frame = 512);
    // Exactly max_frame is allowed.
    let mut c = Raw::sign_in(node.addr, ALICE, "laptop").await;
    let mut pad = 0;
    let exact = loop {
        let b = map_body(&[
            ("type", Value::from("ping")),
            ("rid", Value::from(7)),
            ("pad", Value::from("x".repeat(pad))),
        ]);
        if b.len() >= 512 {
            break b;
        }
        pad += 1;
    };
    assert_eq!(exact.len(), 512);
    c.send_body(&exact).await;
    assert_eq!(c.recv().await, ServerMsg::Pong { rid: Some(7) });

    // One byte more is not, whatever the body holds; the node need not wait for the body.
    let mut too_big = 513u32.to_be_bytes().to_vec();
    too_big.extend(std::iter::repeat_n(0x80, 513));
    c.send_bytes(&too_big).await;
    let frames = c.expect_closed().await;
    assert_eq!(frames.len(), 1, "{frames:?}");
    assert_error(&frames[0], None, ErrorCode::FrameTooLarge);

    // Announcing a huge frame before hello: the same.
    let mut c = Raw::connect(node.addr).await;
    c.send_bytes(&u32::MAX.to_be_bytes()).await;
    let frames = c.expect_closed().await;
    assert_eq!(frames.len(), 1, "{frames:?}");
    assert_error(&frames[0], None, ErrorCode::FrameTooLarge);
}

#[tokio::test]
async fn body_not_a_map_is_bad_frame_and_connection_stays_open() {
    let node = start_node(|_| {});
    let mut c = Raw::sign_in(node.addr, ALICE, "laptop").await;
    let not_maps = [
        // What a struct-as-array encoder would write for ping{rid:5}.
        Value::Array(vec![Value::from("ping"), Value::from(5)]),
        Value::from("ping"),
        Value::from(17),
        Value::Nil,
        Value::Binary(vec![0x81, 0xa4]),
    ];
    for v in not_maps {
        assert_rejected(&mut c, &body(&v), None, ErrorCode::BadFrame).await;
    }
    // Not MessagePack at all, and a map followed by trailing bytes.
    assert_rejected(&mut c, &[0xc1], None, ErrorCode::BadFrame).await;
    let mut trailing = map_body(&[("type", Value::from("ping"))]);
    trailing.push(0xc0);
    c.send_body(&trailing).await;
    match c.recv().await {
        ServerMsg::Error { code, .. } => assert_eq!(code, ErrorCode::BadFrame),
        other => panic!("expected bad_frame, got {other:?}"),
    }
    assert_open(&mut c).await;
}

#[tokio::test]
async fn map_without_type_is_bad_frame() {
    let node = start_node(|_| {});
    let mut c = Raw::sign_in(node.addr, ALICE, "laptop").await;
    // The rid is echoed when valid.
    let b = map_body(&[("rid", Value::from(5)), ("users", Value::Array(vec![]))]);
    assert_rejected(&mut c, &b, Some(5), ErrorCode::BadFrame).await;
    // A `type` that is not a string is no type.
    let b = map_body(&[("type", Value::from(3)), ("rid", Value::from(6))]);
    assert_rejected(&mut c, &b, Some(6), ErrorCode::BadFrame).await;
    let b = map_body(&[("type", Value::Nil)]);
    assert_rejected(&mut c, &b, None, ErrorCode::BadFrame).await;
    // An empty map.
    assert_rejected(&mut c, &[0x80], None, ErrorCode::BadFrame).await;
}

#[tokio::test]
async fn unknown_type_is_unknown_type_echoing_a_valid_rid() {
    let node = start_node(|_| {});
    let mut c = Raw::sign_in(node.addr, ALICE, "laptop").await;
    let b = map_body(&[("type", Value::from("dance")), ("rid", Value::from(77))]);
    assert_rejected(&mut c, &b, Some(77), ErrorCode::UnknownType).await;
    // A server-side type is not something a client may send.
    let b = map_body(&[("type", Value::from("welcome")), ("rid", Value::from(78))]);
    assert_rejected(&mut c, &b, Some(78), ErrorCode::UnknownType).await;
    // Without a rid, or with one that is not a u32, the error has none.
    let b = map_body(&[("type", Value::from("dance"))]);
    assert_rejected(&mut c, &b, None, ErrorCode::UnknownType).await;
    for bad_rid in [
        Value::from(-1),
        Value::from("77"),
        Value::from(u64::from(u32::MAX) + 1),
    ] {
        let b = map_body(&[("type", Value::from("dance")), ("rid", bad_rid)]);
        assert_rejected(&mut c, &b, None, ErrorCode::UnknownType).await;
    }
}

/// An error quotes at most 200 bytes of the frame: a 60 kB `type` (or value) does not come
/// back 60 kB long.
#[tokio::test]
async fn an_error_quotes_at_most_200_bytes_of_the_frame() {
    let node = start_node(|_| {});
    let mut c = Raw::sign_in(node.addr, ALICE, "laptop").await;
    let long = "é".repeat(30_000);
    let frames = [
        map_body(&[
            ("type", Value::from(long.as_str())),
            ("rid", Value::from(9)),
        ]),
        map_body(&[
            ("type", Value::from("set_status")),
            ("rid", Value::from(9)),
            ("status", Value::from(long.as_str())),
        ]),
    ];
    for b in frames {
        c.send_body(&b).await;
        match c.recv().await {
            ServerMsg::Error {
                rid: Some(9),
                message,
                ..
            } => {
                assert!(message.len() <= 200 + '…'.len_utf8(), "{}", message.len());
                assert!(message.ends_with('…'), "{message}");
                assert!(
                    message.contains('é'),
                    "it still quotes the frame: {message}"
                );
            }
            other => panic!("expected an error, got {other:?}"),
        }
    }
    assert_open(&mut c).await;
}

#[tokio::test]
async fn missing_field_is_bad_frame_echoing_rid() {
    let node = start_node(|_| {});
    let mut c = Raw::sign_in(node.addr, ALICE, "laptop").await;
    let cases = [
        map_body(&[("type", Value::from("subscribe")), ("rid", Value::from(8))]),
        map_body(&[
            ("type", Value::from("device_state")),
            ("rid", Value::from(8)),
        ]),
        map_body(&[
            ("type", Value::from("message")),
            ("rid", Value::from(8)),
            ("call", Value::from("c1")),
            ("content_type", Value::from("text/plain")),
        ]),
        map_body(&[
            ("type", Value::from("call_establish")),
            ("rid", Value::from(8)),
            ("to", Value::from(BOB)),
        ]),
    ];
    for b in cases {
        assert_rejected(&mut c, &b, Some(8), ErrorCode::BadFrame).await;
    }
}

#[tokio::test]
async fn set_status_without_status_is_bad_frame_not_a_clear() {
    let node = start_node(|_| {});
    let mut c = Raw::sign_in(node.addr, ALICE, "laptop").await;
    // `status` is required (contract §3 lists no `?`); only an explicit null clears.
    let b = map_body(&[("type", Value::from("set_status")), ("rid", Value::from(9))]);
    assert_rejected(&mut c, &b, Some(9), ErrorCode::BadFrame).await;
    let b = map_body(&[
        ("type", Value::from("set_status")),
        ("rid", Value::from(10)),
        ("status", Value::Nil),
    ]);
    c.send_body(&b).await;
    assert_eq!(c.recv().await, ServerMsg::Ok { rid: Some(10) });
}

#[tokio::test]
async fn field_of_the_wrong_kind_is_bad_frame_echoing_rid() {
    let node = start_node(|_| {});
    let mut c = Raw::sign_in(node.addr, ALICE, "laptop").await;
    let cases = [
        map_body(&[
            ("type", Value::from("device_state")),
            ("rid", Value::from(10)),
            ("activity", Value::from(1)),
        ]),
        map_body(&[
            ("type", Value::from("device_state")),
            ("rid", Value::from(10)),
            ("activity", Value::from("active")),
            ("idle_ms", Value::from("soon")),
        ]),
        map_body(&[
            ("type", Value::from("subscribe")),
            ("rid", Value::from(10)),
            ("users", Value::from(ALICE)),
        ]),
        map_body(&[
            ("type", Value::from("composing")),
            ("call", Value::from("c1")),
            ("active", Value::from("yes")),
        ]),
    ];
    let rids = [Some(10), Some(10), Some(10), None];
    for (b, rid) in cases.iter().zip(rids) {
        assert_rejected(&mut c, b, rid, ErrorCode::BadFrame).await;
    }
    // A rid that is not a u32 is itself a field of the wrong kind, and cannot be echoed.
    let b = map_body(&[("type", Value::from("ping")), ("rid", Value::from("11"))]);
    assert_rejected(&mut c, &b, None, ErrorCode::BadFrame).await;
    let b = map_body(&[("type", Value::from("ping")), ("rid", Value::from(-11))]);
    assert_rejected(&mut c, &b, None, ErrorCode::BadFrame).await;
}

#[tokio::test]
async fn value_outside_its_set_is_bad_frame_echoing_rid() {
    let node = start_node(|_| {});
    let mut c = Raw::sign_in(node.addr, ALICE, "laptop").await;
    let b = map_body(&[
        ("type", Value::from("device_state")),
        ("rid", Value::from(12)),
        ("activity", Value::from("sleepy")),
    ]);
    assert_rejected(&mut c, &b, Some(12), ErrorCode::BadFrame).await;
    let b = map_body(&[
        ("type", Value::from("set_status")),
        ("rid", Value::from(13)),
        ("status", Value::from("on_holiday")),
    ]);
    assert_rejected(&mut c, &b, Some(13), ErrorCode::BadFrame).await;
    // `unknown` is an effective activity, not one a client may publish.
    let b = map_body(&[
        ("type", Value::from("device_state")),
        ("rid", Value::from(14)),
        ("activity", Value::from("unknown")),
    ]);
    assert_rejected(&mut c, &b, Some(14), ErrorCode::BadFrame).await;
}

#[tokio::test]
async fn unknown_extra_fields_are_ignored() {
    let node = start_node(|_| {});
    let mut c = Raw::sign_in(node.addr, ALICE, "laptop").await;
    c.send_body(&map_body(&[
        ("type", Value::from("ping")),
        ("rid", Value::from(15)),
        ("colour", Value::from("red")),
        (
            "nested",
            Value::Map(vec![(Value::from(1), Value::Array(vec![Value::Nil]))]),
        ),
    ]))
    .await;
    assert_eq!(c.recv().await, ServerMsg::Pong { rid: Some(15) });
    c.send_body(&map_body(&[
        ("x-future", Value::Boolean(true)),
        ("type", Value::from("device_state")),
        ("activity", Value::from("away")),
        ("rid", Value::from(16)),
    ]))
    .await;
    assert_eq!(c.recv().await, ServerMsg::Ok { rid: Some(16) });
}

#[tokio::test]
async fn malformed_frames_do_not_disturb_another_endpoints_call() {
    let node = start_node(|_| {});
    let mut alice = Raw::sign_in(node.addr, ALICE, "laptop").await;
    let mut bob = Raw::sign_in(node.addr, BOB, "desk").await;
    let (a, _) = alice.establish(BOB, None).await;
    let (b, _) = bob.incoming().await;
    assert!(matches!(bob.accept(&b).await, ServerMsg::Ok { .. }));
    bob.recv_until(|m| matches!(m, ServerMsg::CallEstablished { .. }))
        .await;
    alice
        .recv_until(|m| matches!(m, ServerMsg::CallEstablished { .. }))
        .await;

    // Carol sends everything wrong, naming alice's and bob's calls, until she is cut off.
    let mut carol = Raw::sign_in(node.addr, CAROL, "desk").await;
    let garbage = [
        body(&Value::Array(vec![Value::from("message")])),
        map_body(&[("type", Value::from("message")), ("call", Value::from(&*a))]),
        map_body(&[
            ("type", Value::from("message_ack")),
            ("call", Value::from(&*b)),
            ("msg", Value::from("one")),
        ]),
        map_body(&[
            ("type", Value::from("call_terminate")),
            ("call", Value::from(7)),
        ]),
        map_body(&[("type", Value::from("explode")), ("call", Value::from(&*a))]),
    ];
    for g in &garbage {
        carol.send_body(g).await;
        assert!(matches!(carol.recv().await, ServerMsg::Error { .. }));
    }
    carol.send_bytes(&[0, 0, 0, 0]).await;
    carol.expect_closed().await;
    // Alice's own malformed frame does not hurt her call either.
    alice.send_body(&[0x91, 0x01]).await;
    assert_error(&alice.recv().await, None, ErrorCode::BadFrame);

    // Nothing reached alice or bob, and the call still carries messages both ways.
    bob.expect_silence(Duration::from_millis(50)).await;
    let rid = alice.rid();
    alice
        .send(&ClientMsg::Message {
            rid,
            call: a.clone(),
            content_type: "text/plain".to_owned(),
            body: Body::Text("still here".to_owned()),
        })
        .await;
    assert_eq!(
        bob.recv().await,
        ServerMsg::MessageReceived {
            call: b.clone(),
            msg: 1,
            from: ALICE.to_owned(),
            content_type: "text/plain".to_owned(),
            body: Body::Text("still here".to_owned()),
            toast: None,
        }
    );
    bob.send(&ClientMsg::MessageAck {
        call: b.clone(),
        msg: 1,
    })
    .await;
    assert_eq!(
        alice.recv().await,
        ServerMsg::MessageDelivered {
            rid,
            call: a.clone(),
            msg: 1
        }
    );
    let rid = bob.rid();
    bob.send(&ClientMsg::Message {
        rid,
        call: b.clone(),
        content_type: "text/plain".to_owned(),
        body: Body::Text("me too".to_owned()),
    })
    .await;
    let (m, _) = alice
        .recv_until(|m| matches!(m, ServerMsg::MessageReceived { .. }))
        .await;
    assert!(
        matches!(&m, ServerMsg::MessageReceived { msg: 2, .. }),
        "{m:?}"
    );
}
