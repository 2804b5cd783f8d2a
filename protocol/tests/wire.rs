//! Wire-level tests of the protocol crate: exact golden bytes, a round trip for every message,
//! typed decode errors, a property test of the codec, and interop with Python's `msgpack`.

use bytes::BytesMut;
use confab_protocol::codec::{encode_frame, frame_bytes};
use confab_protocol::*;
use proptest::prelude::*;
use std::io::Write;
use std::process::{Command, Stdio};
use tokio_util::codec::Decoder;

/// MessagePack fixstr, written by hand so the golden bytes do not come from the codec under test.
fn s(text: &str) -> Vec<u8> {
    assert!(text.len() < 32);
    let mut v = vec![0xa0 | text.len() as u8];
    v.extend_from_slice(text.as_bytes());
    v
}

fn framed(body: Vec<u8>) -> Vec<u8> {
    let mut v = (body.len() as u32).to_be_bytes().to_vec();
    v.extend(body);
    v
}

fn golden(msg: &impl serde::Serialize, body: Vec<u8>) {
    let got = frame_bytes(msg).expect("encodes");
    assert_eq!(&got[..], &framed(body)[..]);
}

#[test]
fn golden_ping_with_rid() {
    let body = [vec![0x82], s("type"), s("ping"), s("rid"), vec![0x07]].concat();
    golden(&ClientMsg::Ping { rid: Some(7) }, body.clone());
    // And the bytes of the worked example in docs/protocol.md.
    let hex: String = framed(body).iter().map(|b| format!("{b:02x}")).collect();
    assert_eq!(hex, "0000001082a474797065a470696e67a372696407");
}

#[test]
fn golden_pong_without_rid_has_no_rid_key() {
    golden(
        &ServerMsg::Pong { rid: None },
        [vec![0x81], s("type"), s("pong")].concat(),
    );
}

#[test]
fn golden_binary_message_body_is_msgpack_bin() {
    let msg = ClientMsg::Message {
        rid: Some(1),
        call: "c".into(),
        content_type: "a/b".into(),
        body: Body::Binary(vec![1, 2]),
    };
    let body = [
        vec![0x85],
        s("type"),
        s("message"),
        s("rid"),
        vec![0x01],
        s("call"),
        s("c"),
        s("content_type"),
        s("a/b"),
        s("body"),
        vec![0xc4, 0x02, 0x01, 0x02],
    ]
    .concat();
    golden(&msg, body);
}

#[test]
fn golden_call_state_with_reason() {
    let msg = ServerMsg::CallState {
        call: "k".into(),
        conversation: "v".into(),
        direction: Direction::Inbound,
        state: CallState::Terminating,
        previous: CallState::Incoming,
        reason: Some(Reason::new(486, "Busy Here")),
    };
    let body = [
        vec![0x87],
        s("type"),
        s("call_state"),
        s("call"),
        s("k"),
        s("conversation"),
        s("v"),
        s("direction"),
        s("inbound"),
        s("state"),
        s("terminating"),
        s("previous"),
        s("incoming"),
        s("reason"),
        vec![0x82],
        s("code"),
        vec![0xcd, 0x01, 0xe6],
        s("text"),
        s("Busy Here"),
    ]
    .concat();
    golden(&msg, body);
}

#[test]
fn golden_presence_null_status_is_explicit_nil() {
    let msg = ServerMsg::Presence {
        user: "u".into(),
        availability: Availability::Away,
        most_active: None,
        endpoints: None,
        status: Some(None),
    };
    let body = [
        vec![0x84],
        s("type"),
        s("presence"),
        s("user"),
        s("u"),
        s("availability"),
        s("away"),
        s("status"),
        vec![0xc0],
    ]
    .concat();
    golden(&msg, body);
}

fn every_client_msg() -> Vec<ClientMsg> {
    use ClientMsg::*;
    let call = || "call-1".to_string();
    vec![
        Hello {
            resume: None,
            rid: Some(1),
            version: 1,
            user: "sip:a@b.c".into(),
            token: "x.y.z".into(),
            device: "pc".into(),
            agent: Some("t".into()),
        },
        Ping { rid: None },
        Bye { rid: Some(2) },
        DeviceState {
            rid: None,
            activity: Activity::Away,
            idle_ms: Some(5),
        },
        SetStatus {
            rid: Some(3),
            status: Some(Status::DoNotDisturb),
        },
        SetStatus {
            rid: None,
            status: None,
        },
        Subscribe {
            rid: None,
            users: vec!["sip:a@b".into(), "sip:c@d".into()],
        },
        Unsubscribe {
            rid: Some(9),
            users: vec![],
        },
        CallEstablish {
            rid: Some(4),
            to: "sip:b@c".into(),
            conversation: Some("conv".into()),
            toast: Some(Toast {
                content_type: "text/plain".into(),
                body: "hello".into(),
            }),
            sdp: "v=0\r\n".into(),
        },
        CallAccept {
            rid: None,
            call: call(),
            sdp: "v=0".into(),
        },
        CallDecline {
            rid: None,
            call: call(),
            code: Some(603),
        },
        CallForward {
            rid: None,
            call: call(),
            to: "sip:x@y".into(),
        },
        CallTransfer {
            rid: Some(u32::MAX),
            call: call(),
            to: "sip:x@y".into(),
        },
        CallTerminate {
            rid: None,
            call: call(),
        },
        ConversationTerminate {
            rid: None,
            conversation: "conv".into(),
        },
        Message {
            rid: Some(5),
            call: call(),
            content_type: "text/plain".into(),
            body: "hi".into(),
        },
        MessageAck {
            call: call(),
            msg: 3,
        },
        Composing {
            call: call(),
            active: false,
        },
        Hello {
            resume: Some(Box::default()),
            rid: Some(1),
            version: 1,
            user: "sip:a@b.c".into(),
            token: "x.y.z".into(),
            device: "pc".into(),
            agent: None,
        },
        Hello {
            resume: Some(Box::new(ResumeAsk {
                endpoint: Some("ep-1".into()),
                token: Some("r-token".into()),
                seen: 12,
                sent: 7,
            })),
            rid: Some(1),
            version: 1,
            user: "sip:a@b.c".into(),
            token: "x.y.z".into(),
            device: "pc".into(),
            agent: None,
        },
        Seen { upto: 300 },
    ]
}

fn every_server_msg() -> Vec<ServerMsg> {
    use ServerMsg::*;
    let call = || "call-1".to_string();
    let remote = Remote {
        user: "sip:b@c".into(),
        endpoint: "ep-2".into(),
    };
    vec![
        Welcome {
            resume: None,
            rid: Some(1),
            endpoint: "ep-1".into(),
            node: "node-a".into(),
            heartbeat_ms: 15000,
            max_frame: 65536,
        },
        ServerMsg::error(Some(2), ErrorCode::UnknownCall, "no such call"),
        Ok { rid: None },
        Pong { rid: Some(3) },
        Shutdown {
            reason: "maintenance".into(),
            reconnect_after_ms: 1000,
        },
        Presence {
            user: "sip:b@c".into(),
            availability: Availability::BusyInactive,
            most_active: Some("ep-2".into()),
            endpoints: Some(vec![EndpointPresence {
                endpoint: "ep-2".into(),
                device: "phone".into(),
                activity: EffectiveActivity::Unknown,
                idle_ms: None,
                rank: 1,
            }]),
            status: Some(Some(Status::Busy)),
        },
        Presence {
            user: "sip:b@c".into(),
            availability: Availability::Offline,
            most_active: None,
            endpoints: None,
            status: None,
        },
        CallCreated {
            rid: None,
            call: call(),
            conversation: "conv".into(),
        },
        CallState {
            call: call(),
            conversation: "conv".into(),
            direction: Direction::Outbound,
            state: confab_protocol::CallState::Establishing,
            previous: confab_protocol::CallState::Idle,
            reason: None,
        },
        CallIncoming {
            call: call(),
            conversation: "conv".into(),
            from: "sip:a@b".into(),
            toast: None,
            sdp: "v=0".into(),
            immediate_auto_accept: true,
        },
        CallRinging { call: call() },
        CallEstablished {
            call: call(),
            sdp: "v=0".into(),
            remote: remote.clone(),
        },
        AutoAcceptNeeded { call: call() },
        CallForwarded {
            call: call(),
            to: "sip:z@y".into(),
        },
        CallTransferred {
            call: call(),
            remote,
        },
        MessageDelivered {
            rid: Some(7),
            call: call(),
            msg: 2,
        },
        MessageFailed {
            rid: None,
            call: call(),
            msg: None,
            code: 481,
            text: "Call Leg/Transaction Does Not Exist".into(),
        },
        MessageReceived {
            call: call(),
            msg: 1,
            from: "sip:a@b".into(),
            content_type: "image/png".into(),
            body: Body::Binary(vec![0, 159, 146, 150]),
            toast: Some(true),
        },
        RemoteComposing {
            call: call(),
            active: true,
        },
        Welcome {
            resume: Some(Box::new(ResumeGrant {
                token: "r-token".into(),
                window_ms: 30_000,
                max_unseen_frames: 1024,
                max_unseen_bytes: 4_194_304,
                seen: Some(7),
            })),
            rid: Some(1),
            endpoint: "ep-1".into(),
            node: "node-a".into(),
            heartbeat_ms: 15000,
            max_frame: 65536,
        },
        Seen { upto: 70_000 },
    ]
}

#[test]
fn every_message_has_a_sample_and_round_trips() {
    let clients = every_client_msg();
    for ty in CLIENT_TYPES {
        assert!(
            clients.iter().any(|m| m.type_name() == *ty),
            "no sample of {ty}"
        );
    }
    for msg in clients {
        let frame = frame_bytes(&msg).expect("encodes");
        assert_eq!(decode_client(&frame[4..]), Ok(msg));
    }
    let servers = every_server_msg();
    assert!(servers.len() >= SERVER_TYPES.len());
    for msg in servers {
        let frame = frame_bytes(&msg).expect("encodes");
        assert_eq!(decode_server(&frame[4..]), Ok(msg));
    }
}

fn body_of(v: rmpv::Value) -> Vec<u8> {
    let mut out = Vec::new();
    rmpv::encode::write_value(&mut out, &v).expect("write");
    out
}

fn map(pairs: &[(&str, rmpv::Value)]) -> rmpv::Value {
    rmpv::Value::Map(
        pairs
            .iter()
            .map(|(k, v)| (rmpv::Value::from(*k), v.clone()))
            .collect(),
    )
}

#[test]
fn unknown_type_and_bad_frames_are_distinct_typed_errors() {
    use rmpv::Value as V;
    let unknown = body_of(map(&[("type", V::from("teleport")), ("rid", V::from(9))]));
    assert_eq!(
        decode_client(&unknown),
        Err(DecodeError::UnknownType {
            ty: "teleport".into(),
            rid: Some(9)
        })
    );
    let cases: Vec<(Vec<u8>, Option<&str>, Option<u32>)> = vec![
        // missing field `call`
        (
            body_of(map(&[
                ("type", V::from("call_terminate")),
                ("rid", V::from(3)),
            ])),
            Some("call_terminate"),
            Some(3),
        ),
        // mistyped field
        (
            body_of(map(&[
                ("type", V::from("message_ack")),
                ("call", V::from("c")),
                ("msg", V::from("two")),
            ])),
            Some("message_ack"),
            None,
        ),
        // value outside its set
        (
            body_of(map(&[
                ("type", V::from("device_state")),
                ("activity", V::from("sleepy")),
                ("rid", V::from(-1)),
            ])),
            Some("device_state"),
            None,
        ),
        // no type
        (body_of(map(&[("rid", V::from(4))])), None, Some(4)),
        // not a map
        (body_of(V::from("ping")), None, None),
        (body_of(V::Array(vec![V::from("ping")])), None, None),
        // trailing bytes after a valid map
        (
            [body_of(map(&[("type", V::from("ping"))])), vec![0xc0]].concat(),
            Some("ping"),
            None,
        ),
        // truncated map
        (vec![0x82, 0xa4, b't'], None, None),
    ];
    for (body, ty, rid) in cases {
        match decode_client(&body) {
            Err(e @ DecodeError::BadFrame { .. }) => {
                assert_eq!(e.type_name(), ty, "{body:02x?}");
                assert_eq!(e.rid(), rid, "{body:02x?}");
                assert_eq!(e.code(), ErrorCode::BadFrame);
            }
            other => panic!("expected BadFrame for {body:02x?}, got {other:?}"),
        }
    }
}

#[test]
fn unknown_extra_fields_are_ignored() {
    use rmpv::Value as V;
    let body = body_of(map(&[
        ("type", V::from("ping")),
        ("rid", V::from(1)),
        ("future", map(&[("nested", V::Array(vec![V::Nil]))])),
    ]));
    assert_eq!(decode_client(&body), Ok(ClientMsg::Ping { rid: Some(1) }));
}

#[test]
fn codec_splits_a_stream_into_frames() {
    let mut buf = BytesMut::new();
    for m in every_client_msg() {
        encode_frame(&m, &mut buf).expect("encodes");
    }
    let mut codec = FrameCodec::default();
    let mut decoded = Vec::new();
    while let Some(frame) = codec.decode(&mut buf).expect("valid stream") {
        decoded.push(decode_client(&frame).expect("decodes"));
    }
    assert_eq!(decoded, every_client_msg());
}

proptest! {
    #[test]
    fn codec_never_panics_on_random_input(
        chunks in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..64), 0..16),
        max in 1usize..128,
    ) {
        let mut codec = FrameCodec::new(max);
        let mut buf = BytesMut::new();
        'outer: for chunk in chunks {
            buf.extend_from_slice(&chunk);
            loop {
                match codec.decode(&mut buf) {
                    Ok(Some(frame)) => {
                        prop_assert!(!frame.is_empty() && frame.len() <= max);
                        // Decoding a random body gives a message or a typed error, never a panic.
                        let _ = decode_client(&frame);
                        let _ = decode_server(&frame);
                    }
                    Ok(None) => break,
                    Err(FrameError::Empty) | Err(FrameError::TooLarge { .. }) => break 'outer,
                    Err(e) => prop_assert!(false, "unexpected error {e}"),
                }
            }
        }
    }

    #[test]
    fn decode_never_panics_on_random_bodies(body in proptest::collection::vec(any::<u8>(), 0..256)) {
        let _ = decode_client(&body);
        let _ = decode_server(&body);
    }
}

fn python(mode: &str, input: &[u8]) -> Vec<u8> {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/interop.py");
    let mut child = Command::new("python3")
        .args([script, mode])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("python3 runs");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(input)
        .expect("write to python");
    let out = child.wait_with_output().expect("python finishes");
    assert!(
        out.status.success(),
        "python interop peer failed (is `msgpack` installed? `pip install msgpack`): {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

fn split(mut data: BytesMut) -> Vec<BytesMut> {
    let mut codec = FrameCodec::default();
    let mut frames = Vec::new();
    while let Some(f) = codec.decode(&mut data).expect("python frames are valid") {
        frames.push(f);
    }
    assert!(data.is_empty());
    frames
}

#[test]
fn python_msgpack_reads_and_rewrites_our_frames() {
    let mut buf = BytesMut::new();
    for m in every_server_msg() {
        encode_frame(&m, &mut buf).expect("encodes");
    }
    for m in every_client_msg() {
        encode_frame(&m, &mut buf).expect("encodes");
    }
    let back = split(BytesMut::from(&python("echo", &buf)[..]));
    let (servers, clients) = back.split_at(every_server_msg().len());
    for (frame, want) in servers.iter().zip(every_server_msg()) {
        assert_eq!(decode_server(frame), Ok(want));
    }
    for (frame, want) in clients.iter().zip(every_client_msg()) {
        assert_eq!(decode_client(frame), Ok(want));
    }
    assert_eq!(clients.len(), every_client_msg().len());
}

#[test]
fn frames_built_by_python_msgpack_decode() {
    let frames = split(BytesMut::from(&python("build", &[])[..]));
    let got: Vec<ClientMsg> = frames
        .iter()
        .map(|f| decode_client(f).expect("python frame decodes"))
        .collect();
    assert_eq!(got.len(), 10);
    assert_eq!(
        got[0],
        ClientMsg::Hello {
            resume: None,
            rid: Some(1),
            version: 1,
            user: "sip:alice@example.com".into(),
            token: "t.o.k".into(),
            device: "laptop".into(),
            agent: Some("py/1.0".into())
        }
    );
    assert_eq!(
        got[3],
        ClientMsg::SetStatus {
            rid: Some(3),
            status: None
        }
    );
    assert!(
        matches!(&got[5], ClientMsg::CallEstablish { toast: Some(t), .. } if t.body == Body::Text("hi".into()))
    );
    assert_eq!(
        got[6],
        ClientMsg::Message {
            rid: Some(u32::MAX),
            call: "c-1".into(),
            content_type: "application/octet-stream".into(),
            body: Body::Binary(vec![0, 0xff])
        }
    );
    assert_eq!(
        got[8],
        ClientMsg::CallDecline {
            rid: None,
            call: "c-2".into(),
            code: Some(603)
        }
    );
}
