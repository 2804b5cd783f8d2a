//! Contract §2 (session) over real TCP: the `hello` handshake and its refusals, `ping`, `bye`,
//! the heartbeat, the hello timeout and a lost connection as the remote party of a call sees it.

use confab_protocol::sdp::build_offer;
use confab_protocol::*;
use confab_tests::*;
use rmpv::Value;
use std::time::{Duration, Instant};

const ALICE: &str = "sip:alice@example.com";
const BOB: &str = "sip:bob@example.com";

/// A MessagePack map body with string keys, written by hand.
fn map_body(entries: &[(&str, Value)]) -> Vec<u8> {
    let v = Value::Map(
        entries
            .iter()
            .map(|(k, v)| (Value::from(*k), v.clone()))
            .collect(),
    );
    let mut buf = Vec::new();
    rmpv::encode::write_value(&mut buf, &v).expect("encode");
    buf
}

fn hello(rid: u32, user: &str, token: String) -> ClientMsg {
    ClientMsg::Hello {
        resume: None,
        rid: Some(rid),
        version: 1,
        user: user.to_owned(),
        token,
        device: "laptop".to_owned(),
        agent: None,
    }
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

/// Asserts the node answers exactly one `error{rid, code}` and then closes.
async fn assert_refused_then_closed(c: &mut Raw, rid: Option<u32>, code: ErrorCode) {
    let frames = c.expect_closed().await;
    assert_eq!(frames.len(), 1, "expected one error then close: {frames:?}");
    assert_error(&frames[0], rid, code);
}

/// Sends `hello` and expects it refused with `code` (echoing its rid), then the close.
async fn assert_hello_refused(addr: std::net::SocketAddr, msg: ClientMsg, code: ErrorCode) {
    let rid = msg.rid();
    let mut c = Raw::connect(addr).await;
    c.send(&msg).await;
    assert_refused_then_closed(&mut c, rid, code).await;
}

/// An HS-family token for `user` signed with the test secret using `alg`.
fn token_alg(user: &str, alg: jsonwebtoken::Algorithm) -> String {
    #[derive(serde::Serialize)]
    struct Claims<'a> {
        sub: &'a str,
        exp: u64,
    }
    jsonwebtoken::encode(
        &jsonwebtoken::Header::new(alg),
        &Claims {
            sub: user,
            exp: jsonwebtoken::get_current_timestamp() + 3600,
        },
        &jsonwebtoken::EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .expect("token")
}

/// Alice calls Bob and Bob accepts; both have seen `call_established`.
/// Returns (alice's call, alice's conversation, bob's call, bob's conversation).
async fn established(alice: &mut Raw, bob: &mut Raw) -> (String, String, String, String) {
    let (a_call, a_conv) = alice.establish(&bob.user, None).await;
    let b_call;
    let b_conv;
    match bob
        .recv_until(|m| matches!(m, ServerMsg::CallIncoming { .. }))
        .await
        .0
    {
        ServerMsg::CallIncoming {
            call, conversation, ..
        } => {
            b_call = call;
            b_conv = conversation;
        }
        _ => unreachable!(),
    }
    assert!(matches!(bob.accept(&b_call).await, ServerMsg::Ok { .. }));
    bob.recv_until(|m| matches!(m, ServerMsg::CallEstablished { .. }))
        .await;
    alice
        .recv_until(|m| matches!(m, ServerMsg::CallEstablished { .. }))
        .await;
    (a_call, a_conv, b_call, b_conv)
}

fn call_state(
    call: &str,
    conversation: &str,
    direction: Direction,
    previous: CallState,
    state: CallState,
    reason: Option<Reason>,
) -> ServerMsg {
    ServerMsg::CallState {
        call: call.to_owned(),
        conversation: conversation.to_owned(),
        direction,
        state,
        previous,
        reason,
    }
}

/// The two events that end an established leg with `reason`.
fn ended(call: &str, conv: &str, direction: Direction, reason: Reason) -> Vec<ServerMsg> {
    vec![
        call_state(
            call,
            conv,
            direction,
            CallState::Established,
            CallState::Terminating,
            Some(reason.clone()),
        ),
        call_state(
            call,
            conv,
            direction,
            CallState::Terminating,
            CallState::Terminated,
            Some(reason),
        ),
    ]
}

/// Reads `n` frames from `c`, sending a `ping` (no rid) whenever nothing came for `every`, as a
/// live client does; the `pong`s this causes are left out of the result.
async fn recv_n_keeping_alive(c: &mut Raw, n: usize, every: Duration) -> Vec<ServerMsg> {
    let deadline = Instant::now() + EVENT_TIMEOUT;
    let mut out = Vec::new();
    while out.len() < n {
        assert!(Instant::now() < deadline, "only got {out:?}");
        match tokio::time::timeout(every, c.recv()).await {
            Ok(ServerMsg::Pong { rid: None }) => {}
            Ok(m) => out.push(m),
            Err(_) => c.send(&ClientMsg::Ping { rid: None }).await,
        }
    }
    out
}

#[tokio::test]
async fn hello_is_answered_with_welcome_echoing_rid() {
    let node = start_node(|s| {
        s.server.node_id = "node-t".to_owned();
        s.server.heartbeat_ms = 1234;
        s.server.max_frame = 4096;
    });
    let mut c = Raw::connect(node.addr).await;
    c.send(&hello(77, ALICE, token(ALICE))).await;
    match c.recv().await {
        ServerMsg::Welcome {
            rid,
            endpoint,
            node,
            heartbeat_ms,
            max_frame,
            resume,
        } => {
            assert_eq!(resume, None, "not asked for: not resumable");
            assert_eq!(rid, Some(77));
            assert!(!endpoint.is_empty());
            assert_eq!(node, "node-t");
            assert_eq!(heartbeat_ms, 1234);
            assert_eq!(max_frame, 4096);
        }
        other => panic!("expected welcome, got {other:?}"),
    }
    // Two sign-ins of the same user get distinct endpoint ids.
    let a = Raw::sign_in(node.addr, ALICE, "laptop").await;
    let b = Raw::sign_in(node.addr, ALICE, "phone").await;
    assert_ne!(a.endpoint, b.endpoint);
}

#[tokio::test]
async fn first_frame_not_hello_is_not_authenticated_then_closed() {
    let node = start_node(|_| {});
    let mut c = Raw::connect(node.addr).await;
    c.send(&ClientMsg::Ping { rid: Some(5) }).await;
    assert_refused_then_closed(&mut c, Some(5), ErrorCode::NotAuthenticated).await;

    // A well-formed request without rid: the error has none either.
    let mut c = Raw::connect(node.addr).await;
    c.send(&ClientMsg::Subscribe {
        rid: None,
        users: vec![ALICE.to_owned()],
    })
    .await;
    assert_refused_then_closed(&mut c, None, ErrorCode::NotAuthenticated).await;
}

#[tokio::test]
async fn undecodable_first_frame_is_not_authenticated_then_closed() {
    let node = start_node(|_| {});
    let garbage: Vec<Vec<u8>> = vec![
        // A map whose `type` is not a string, with a binary field.
        map_body(&[
            ("type", Value::from(42)),
            ("x", Value::Binary(vec![0xde, 0xad])),
        ]),
        // A map without `type`.
        map_body(&[("user", Value::from(ALICE))]),
        // A map announcing three entries but holding one key.
        vec![0x83, 0xa1, b'a'],
        // An unknown type.
        map_body(&[("type", Value::from("dance"))]),
        // Not MessagePack at all.
        vec![0xc1, 0xc1, 0xc1],
    ];
    for body in garbage {
        let mut c = Raw::connect(node.addr).await;
        c.send_body(&body).await;
        assert_refused_then_closed(&mut c, None, ErrorCode::NotAuthenticated).await;
    }
}

#[tokio::test]
async fn hello_with_a_field_of_the_wrong_kind_is_bad_frame_then_closed() {
    let node = start_node(|_| {});
    let mut c = Raw::connect(node.addr).await;
    c.send_body(&map_body(&[
        ("type", Value::from("hello")),
        ("rid", Value::from(3)),
        ("version", Value::from("1")),
        ("user", Value::from(ALICE)),
        ("token", Value::from(token(ALICE))),
        ("device", Value::from("laptop")),
    ]))
    .await;
    assert_refused_then_closed(&mut c, Some(3), ErrorCode::BadFrame).await;

    // `user` as an integer.
    let mut c = Raw::connect(node.addr).await;
    c.send_body(&map_body(&[
        ("type", Value::from("hello")),
        ("rid", Value::from(4)),
        ("version", Value::from(1)),
        ("user", Value::from(7)),
        ("token", Value::from(token(ALICE))),
        ("device", Value::from("laptop")),
    ]))
    .await;
    assert_refused_then_closed(&mut c, Some(4), ErrorCode::BadFrame).await;
}

#[tokio::test]
async fn second_hello_is_invalid_state_and_connection_stays_open() {
    let node = start_node(|_| {});
    let mut c = Raw::sign_in(node.addr, ALICE, "laptop").await;
    c.send(&hello(9, ALICE, token(ALICE))).await;
    assert_error(&c.recv().await, Some(9), ErrorCode::InvalidState);
    c.send(&ClientMsg::Ping { rid: Some(10) }).await;
    assert_eq!(c.recv().await, ServerMsg::Pong { rid: Some(10) });
}

#[tokio::test]
async fn version_other_than_1_is_unsupported_version() {
    let node = start_node(|_| {});
    let mut msg = hello(11, ALICE, token(ALICE));
    if let ClientMsg::Hello { version, .. } = &mut msg {
        *version = 2;
    }
    assert_hello_refused(node.addr, msg, ErrorCode::UnsupportedVersion).await;
}

#[tokio::test]
async fn token_with_bad_signature_is_unauthorized_then_closed() {
    let node = start_node(|_| {});
    let msg = hello(12, ALICE, token_with(ALICE, "not-the-secret", 3600));
    assert_hello_refused(node.addr, msg, ErrorCode::Unauthorized).await;
}

#[tokio::test]
async fn expired_token_is_unauthorized_then_closed() {
    let node = start_node(|_| {});
    // Well past any clock-skew leeway.
    let msg = hello(13, ALICE, token_with(ALICE, SECRET, -3600));
    assert_hello_refused(node.addr, msg, ErrorCode::Unauthorized).await;
}

#[tokio::test]
async fn other_users_token_is_unauthorized_then_closed() {
    let node = start_node(|_| {});
    let msg = hello(14, ALICE, token(BOB));
    assert_hello_refused(node.addr, msg, ErrorCode::Unauthorized).await;
}

#[tokio::test]
async fn user_not_a_sip_uri_is_unauthorized_then_closed() {
    let node = start_node(|_| {});
    for user in ["alice@example.com", "tel:+15551234", "sip:alice"] {
        let msg = hello(15, user, token(user));
        assert_hello_refused(node.addr, msg, ErrorCode::Unauthorized).await;
    }
}

#[tokio::test]
async fn token_signed_with_another_algorithm_is_unauthorized_then_closed() {
    let node = start_node(|_| {});
    for alg in [
        jsonwebtoken::Algorithm::HS384,
        jsonwebtoken::Algorithm::HS512,
    ] {
        let msg = hello(16, ALICE, token_alg(ALICE, alg));
        assert_hello_refused(node.addr, msg, ErrorCode::Unauthorized).await;
    }
}

#[tokio::test]
async fn user_uri_is_normalised_and_echoed_normalised() {
    let node = start_node(|_| {});
    let mut alice = Raw::connect(node.addr).await;
    alice
        .send(&hello(
            20,
            "SIP:Alice@EXAMPLE.com",
            token("SIP:Alice@EXAMPLE.com"),
        ))
        .await;
    assert!(
        matches!(alice.recv().await, ServerMsg::Welcome { rid: Some(20), .. }),
        "the un-normalised URI signs in"
    );
    // A token whose `sub` is written differently but normalises to the same user also works.
    let mut alice2 = Raw::connect(node.addr).await;
    alice2
        .send(&hello(
            21,
            "sip:Alice@example.com",
            token("Sip:Alice@Example.COM"),
        ))
        .await;
    assert!(matches!(
        alice2.recv().await,
        ServerMsg::Welcome { rid: Some(21), .. }
    ));

    // Once alice has a pong, presence knows her endpoint (tested in presence.rs).
    alice.send(&ClientMsg::Ping { rid: Some(23) }).await;
    assert_eq!(alice.recv().await, ServerMsg::Pong { rid: Some(23) });
    let mut bob = Raw::sign_in(node.addr, BOB, "desk").await;
    let rid = bob.rid();
    bob.send(&ClientMsg::Subscribe {
        rid,
        users: vec!["SIP:Alice@Example.COM".to_owned()],
    })
    .await;
    assert_eq!(bob.recv().await, ServerMsg::Ok { rid });
    assert_eq!(
        bob.recv().await,
        ServerMsg::Presence {
            user: "sip:Alice@example.com".to_owned(),
            availability: Availability::Available,
            most_active: None,
            endpoints: None,
            status: None,
        }
    );
    // The user part is exact: a differently-cased user is somebody else.
    let rid = bob.rid();
    bob.send(&ClientMsg::Subscribe {
        rid,
        users: vec!["sip:alice@example.com".to_owned()],
    })
    .await;
    assert_eq!(bob.recv().await, ServerMsg::Ok { rid });
    assert_eq!(
        bob.recv().await,
        ServerMsg::Presence {
            user: "sip:alice@example.com".to_owned(),
            availability: Availability::Offline,
            most_active: None,
            endpoints: None,
            status: None,
        }
    );
    // Calls show the normalised form as `from`.
    alice
        .send(&ClientMsg::CallEstablish {
            rid: Some(22),
            to: BOB.to_owned(),
            conversation: None,
            toast: None,
            sdp: build_offer(&["text/plain"], None),
        })
        .await;
    let (m, _) = bob
        .recv_until(|m| matches!(m, ServerMsg::CallIncoming { .. }))
        .await;
    match m {
        ServerMsg::CallIncoming { from, .. } => assert_eq!(from, "sip:Alice@example.com"),
        _ => unreachable!(),
    }
}

#[tokio::test]
async fn ping_is_answered_with_pong_echoing_rid() {
    let node = start_node(|_| {});
    let mut c = Raw::sign_in(node.addr, ALICE, "laptop").await;
    c.send(&ClientMsg::Ping { rid: Some(42) }).await;
    assert_eq!(c.recv().await, ServerMsg::Pong { rid: Some(42) });
    c.send(&ClientMsg::Ping { rid: None }).await;
    assert_eq!(c.recv().await, ServerMsg::Pong { rid: None });
    c.send(&ClientMsg::Ping {
        rid: Some(u32::MAX),
    })
    .await;
    assert_eq!(
        c.recv().await,
        ServerMsg::Pong {
            rid: Some(u32::MAX)
        }
    );
}

#[tokio::test]
async fn bye_is_ok_then_close_and_remote_sees_terminated_remotely() {
    let node = start_node(|_| {});
    let mut alice = Raw::sign_in(node.addr, ALICE, "laptop").await;
    let mut bob = Raw::sign_in(node.addr, BOB, "desk").await;
    let (a_call, a_conv, b_call, b_conv) = established(&mut alice, &mut bob).await;

    alice.send(&ClientMsg::Bye { rid: Some(30) }).await;
    // The reply first, then this endpoint's call events, then the close.
    let mut want = vec![ServerMsg::Ok { rid: Some(30) }];
    want.extend(ended(
        &a_call,
        &a_conv,
        Direction::Outbound,
        Reason::new(200, "Terminated locally"),
    ));
    assert_eq!(alice.expect_closed().await, want);

    let want = ended(
        &b_call,
        &b_conv,
        Direction::Inbound,
        Reason::new(200, "Terminated remotely"),
    );
    assert_eq!(vec![bob.recv().await, bob.recv().await], want);
}

#[tokio::test]
async fn bye_without_calls_is_ok_then_close() {
    let node = start_node(|_| {});
    let mut alice = Raw::sign_in(node.addr, ALICE, "laptop").await;
    alice.send(&ClientMsg::Bye { rid: None }).await;
    assert_eq!(
        alice.expect_closed().await,
        vec![ServerMsg::Ok { rid: None }]
    );
}

#[tokio::test]
async fn silent_client_is_dropped_after_three_heartbeats_and_remote_sees_408() {
    let node = start_node(|s| s.server.heartbeat_ms = 200);
    let mut alice = Raw::sign_in(node.addr, ALICE, "laptop").await;
    let mut bob = Raw::sign_in(node.addr, BOB, "desk").await;
    // Alice's last frame is her call_establish, sent after this instant.
    let silent_since = Instant::now();
    let (_, _, b_call, b_conv) = alice_calls_bob_keeping_bob_alive(&mut alice, &mut bob).await;
    let (_, bob_frames) = tokio::join!(
        alice.expect_closed(),
        recv_n_keeping_alive(&mut bob, 2, Duration::from_millis(50)),
    );
    assert!(
        silent_since.elapsed() >= Duration::from_millis(600),
        "dropped after {:?}, before 3 heartbeats",
        silent_since.elapsed()
    );
    assert_eq!(
        bob_frames,
        ended(
            &b_call,
            &b_conv,
            Direction::Inbound,
            Reason::new(408, "Remote endpoint lost"),
        )
    );
    // Bob, who kept pinging, is still connected.
    bob.send(&ClientMsg::Ping { rid: Some(1) }).await;
    let (m, _) = bob
        .recv_until(|m| matches!(m, ServerMsg::Pong { rid: Some(1) }))
        .await;
    assert_eq!(m, ServerMsg::Pong { rid: Some(1) });
}

/// Like [`established`], for a node with a short heartbeat: alice sends nothing after her
/// `call_establish`, bob pings while waiting.
async fn alice_calls_bob_keeping_bob_alive(
    alice: &mut Raw,
    bob: &mut Raw,
) -> (String, String, String, String) {
    let (a_call, a_conv) = alice.establish(&bob.user, None).await;
    let mut incoming = recv_n_keeping_alive(bob, 1, Duration::from_millis(50)).await;
    let (b_call, b_conv) = match incoming.pop() {
        Some(ServerMsg::CallIncoming {
            call, conversation, ..
        }) => (call, conversation),
        other => panic!("expected call_incoming, got {other:?}"),
    };
    assert!(matches!(bob.accept(&b_call).await, ServerMsg::Ok { .. }));
    bob.recv_until(|m| matches!(m, ServerMsg::CallEstablished { .. }))
        .await;
    alice
        .recv_until(|m| matches!(m, ServerMsg::CallEstablished { .. }))
        .await;
    (a_call, a_conv, b_call, b_conv)
}

#[tokio::test]
async fn no_hello_within_hello_timeout_is_closed() {
    let node = start_node(|s| s.server.hello_timeout_ms = 200);
    let mut signed_in = Raw::sign_in(node.addr, ALICE, "laptop").await;
    let start = Instant::now();
    let mut c = Raw::connect(node.addr).await;
    let frames = c.expect_closed().await;
    assert!(
        frames.iter().all(|f| matches!(f, ServerMsg::Error { .. })),
        "{frames:?}"
    );
    assert!(
        start.elapsed() >= Duration::from_millis(200),
        "closed after {:?}",
        start.elapsed()
    );
    // The timeout only concerns connections that have not said hello.
    signed_in.send(&ClientMsg::Ping { rid: Some(1) }).await;
    assert_eq!(signed_in.recv().await, ServerMsg::Pong { rid: Some(1) });
}

#[tokio::test]
async fn dropped_connection_mid_call_makes_remote_see_408() {
    let node = start_node(|_| {});
    let mut alice = Raw::sign_in(node.addr, ALICE, "laptop").await;
    let mut bob = Raw::sign_in(node.addr, BOB, "desk").await;
    let (_, _, b_call, b_conv) = established(&mut alice, &mut bob).await;
    drop(alice);
    let want = ended(
        &b_call,
        &b_conv,
        Direction::Inbound,
        Reason::new(408, "Remote endpoint lost"),
    );
    assert_eq!(vec![bob.recv().await, bob.recv().await], want);
}
