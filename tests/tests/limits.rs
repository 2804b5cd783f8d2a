//! Hardening, part 1: every limit of `docs/security.md`, tripped on a node with tiny settings.
//! Each test checks what the client at fault sees, that the limit's metric moved (scraped from
//! `/metrics` like Prometheus would), and that other endpoints are unaffected.
//!
//! The metrics recorder is process-wide and the tests of this file run in parallel, so each
//! test compares a counter before and after and asserts it grew by at least what it caused.

mod scrape;

use confab_actors::Settings;
use confab_protocol::sdp::build_offer;
use confab_protocol::*;
use confab_tests::*;
use scrape::scrape;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const ALICE: &str = "sip:alice@example.com";
const BOB: &str = "sip:bob@example.com";
const CAROL: &str = "sip:carol@example.com";

const REJECTED: &str = "confab_connections_rejected_total";
const FRAMES_REJECTED: &str = "confab_frames_rejected_total";

fn assert_error(m: &ServerMsg, want_rid: Option<u32>, want: ErrorCode) {
    match m {
        ServerMsg::Error { rid, code, message } => {
            assert_eq!((*rid, *code), (want_rid, want), "{m:?}");
            assert!(!message.is_empty(), "error without text: {m:?}");
        }
        other => panic!("expected error {want:?}, got {other:?}"),
    }
}

/// The connection still works: a `ping` is answered.
async fn assert_open(c: &mut Raw) {
    c.ping().await;
}

fn hello(user: &str, device: &str) -> ClientMsg {
    ClientMsg::Hello {
        resume: None,
        rid: Some(1),
        version: 1,
        user: user.to_owned(),
        token: token(user),
        device: device.to_owned(),
        agent: None,
    }
}

/// Sends `hello` on a fresh connection and returns every frame until the node closes it.
async fn refused_sign_in(addr: std::net::SocketAddr, user: &str, device: &str) -> Vec<ServerMsg> {
    let mut c = Raw::connect(addr).await;
    c.send(&hello(user, device)).await;
    c.expect_closed().await
}

/// Signs in, retrying while the node still counts a connection or endpoint that is going away
/// (a slot is given back a moment after the client sees its connection close).
async fn sign_in_eventually(addr: std::net::SocketAddr, user: &str, device: &str) -> Raw {
    let deadline = Instant::now() + EVENT_TIMEOUT;
    loop {
        assert!(Instant::now() < deadline, "{user} still cannot sign in");
        let mut c = Raw::connect(addr).await;
        // A connection over max_connections is refused at once, before any hello: wait for
        // that first, so the hello never races the close.
        if tokio::time::timeout(Duration::from_millis(100), c.expect_closed())
            .await
            .is_ok()
        {
            continue;
        }
        c.send(&hello(user, device)).await;
        match c.recv().await {
            ServerMsg::Welcome { endpoint, .. } => {
                c.endpoint = endpoint;
                c.user = user.to_owned();
                return c;
            }
            ServerMsg::Error { .. } => tokio::time::sleep(Duration::from_millis(20)).await,
            other => panic!("unexpected {other:?}"),
        }
    }
}

/// Asserts a reply (already matched to its request by rid) is `error{code}`.
fn assert_code(m: &ServerMsg, want: ErrorCode) {
    match m {
        ServerMsg::Error { code, message, .. } => {
            assert_eq!(*code, want, "{m:?}");
            assert!(!message.is_empty(), "error without text: {m:?}");
        }
        other => panic!("expected error {want:?}, got {other:?}"),
    }
}

/// Establishes a call from `a` to `b` (b's only endpoint accepts); returns (a's call, b's call).
async fn connect_call(a: &mut Raw, b: &mut Raw) -> (String, String) {
    let (ca, _) = a.establish(&b.user.clone(), None).await;
    let (cb, _) = b.incoming().await;
    let reply = b.accept(&cb).await;
    assert!(matches!(reply, ServerMsg::Ok { .. }), "{reply:?}");
    // `call_established` follows the established `call_state` on both legs.
    let established = |call: &str| {
        let call = call.to_owned();
        move |m: &ServerMsg| matches!(m, ServerMsg::CallEstablished { call: c, .. } if *c == call)
    };
    b.recv_until(established(&cb)).await;
    a.recv_until(established(&ca)).await;
    (ca, cb)
}

/// Sends a message on `call` and has the receiver ack it; returns the sender's answer.
async fn message_round_trip(from: &mut Raw, to: &mut Raw, call: &str, body: Body) -> ServerMsg {
    let content_type = if body.is_text() {
        "text/plain"
    } else {
        "application/octet-stream"
    };
    let rid = from.rid();
    from.send(&ClientMsg::Message {
        rid,
        call: call.to_owned(),
        content_type: content_type.to_owned(),
        body,
    })
    .await;
    let (m, _) = to
        .recv_until(|m| matches!(m, ServerMsg::MessageReceived { .. }))
        .await;
    if let ServerMsg::MessageReceived { call, msg, .. } = m {
        to.send(&ClientMsg::MessageAck { call, msg }).await;
    }
    from.recv_until(|m| reply_rid(m) == rid).await.0
}

#[test]
fn every_limit_has_a_sane_default() {
    let s = Settings::default();
    assert_eq!(s.server.max_frame, 65536);
    assert_eq!(s.server.hello_timeout_ms, 10_000);
    assert!(s.server.max_connections >= 10_000);
    assert!(
        s.limits.requests_per_second >= 100
            && s.limits.request_burst >= s.limits.requests_per_second
    );
    assert!(s.limits.calls_per_endpoint >= 16);
    assert!((2..=256).contains(&s.limits.endpoints_per_user));
    assert!(s.limits.subscriptions_per_endpoint >= 100);
    assert!((16..=65_536).contains(&s.limits.outbound_queue));
    assert!(s.flow.max_message_bytes < s.server.max_frame as usize);
    assert!((1..=300).contains(&s.auth.leeway_s));
}

#[tokio::test]
async fn connections_over_max_connections_get_overloaded_and_close() {
    let node = start_node(|s| s.server.max_connections = 2);
    let before = scrape(node.metrics_addr).get(REJECTED, &[("reason", "max_connections")]);
    let mut alice = Raw::sign_in(node.addr, ALICE, "laptop").await;
    // A connection that has not signed in holds a slot too; of two made back to back, one is
    // over the limit. Each worker accepts from its own listener, so which of the two the node
    // takes first is not fixed: whichever is refused, the other holds the last slot.
    let mut second = Raw::connect(node.addr).await;
    let mut third = Raw::connect(node.addr).await;
    let (refused, frames) = tokio::select! {
        f = second.expect_closed() => (2, f),
        f = third.expect_closed() => (3, f),
    };
    let mut idle = if refused == 2 { third } else { second };
    assert_eq!(frames.len(), 1, "{frames:?}");
    assert_error(&frames[0], None, ErrorCode::Overloaded);
    let after = scrape(node.metrics_addr).get(REJECTED, &[("reason", "max_connections")]);
    assert!(after >= before + 1.0, "{before} -> {after}");

    // The connections inside the limit are unaffected.
    assert_open(&mut alice).await;
    idle.send(&hello(BOB, "phone")).await;
    assert!(matches!(idle.recv().await, ServerMsg::Welcome { .. }));

    // A slot given back is usable again.
    let bye = alice.request(ClientMsg::Bye { rid: None }).await;
    assert!(matches!(bye, ServerMsg::Ok { .. }), "{bye:?}");
    alice.expect_closed().await;
    let mut again = sign_in_eventually(node.addr, CAROL, "tablet").await;
    assert_open(&mut again).await;
}

#[tokio::test]
async fn frame_over_max_frame_is_frame_too_large_and_close() {
    let node = start_node(|s| s.server.max_frame = 256);
    let m0 = scrape(node.metrics_addr);
    let mut alice = Raw::sign_in(node.addr, ALICE, "laptop").await;
    let mut bob = Raw::sign_in(node.addr, BOB, "laptop").await;

    let mut big = 257u32.to_be_bytes().to_vec();
    big.extend(std::iter::repeat_n(0xc0, 257));
    alice.send_bytes(&big).await;
    let frames = alice.expect_closed().await;
    assert_eq!(frames.len(), 1, "{frames:?}");
    assert_error(&frames[0], None, ErrorCode::FrameTooLarge);

    // Before hello: refused the same way, without reading the announced body.
    let mut anon = Raw::connect(node.addr).await;
    anon.send_bytes(&u32::MAX.to_be_bytes()).await;
    let frames = anon.expect_closed().await;
    assert_eq!(frames.len(), 1, "{frames:?}");
    assert_error(&frames[0], None, ErrorCode::FrameTooLarge);

    let m1 = scrape(node.metrics_addr);
    let moved =
        |name, reason| m1.get(name, &[("reason", reason)]) - m0.get(name, &[("reason", reason)]);
    assert!(moved(FRAMES_REJECTED, "frame_too_large") >= 1.0);
    assert!(moved(REJECTED, "frame_too_large") >= 1.0);
    assert_open(&mut bob).await;
}

#[tokio::test]
async fn requests_over_the_rate_are_rate_limited_but_acks_are_not() {
    let node = start_node(|s| {
        // One token a second: a refill during the test's burst would need a stall of a second.
        s.limits.requests_per_second = 1;
        s.limits.request_burst = 5;
    });
    let mut alice = Raw::sign_in(node.addr, ALICE, "laptop").await;
    let mut bob = Raw::sign_in(node.addr, BOB, "laptop").await;
    let (ca, _) = alice.establish(BOB, None).await;
    let (cb, _) = bob.incoming().await;
    assert!(matches!(bob.accept(&cb).await, ServerMsg::Ok { .. }));
    alice.state(&ca, CallState::Established).await;
    bob.state(&cb, CallState::Established).await;
    // Alice sends a message; bob will ack it while he is over his rate.
    let rid = alice.rid();
    alice
        .send(&ClientMsg::Message {
            rid,
            call: ca.clone(),
            content_type: "text/plain".into(),
            body: "hi".into(),
        })
        .await;
    let (m, _) = bob
        .recv_until(|m| matches!(m, ServerMsg::MessageReceived { .. }))
        .await;
    let ServerMsg::MessageReceived { msg, .. } = m else {
        unreachable!()
    };
    // Let bob's bucket refill to its burst (his accept took one token; 1 token/s).
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let before = scrape(node.metrics_addr).get(FRAMES_REJECTED, &[("reason", "rate_limited")]);

    // One write: 10 pings, 20 acks of nothing, the real ack, one more ping.
    let mut batch = Vec::new();
    for rid in 1..=10 {
        batch.extend(frame(&ClientMsg::Ping { rid: Some(rid) }));
    }
    for n in 0..20 {
        batch.extend(frame(&ClientMsg::MessageAck {
            call: cb.clone(),
            msg: 10_000 + n,
        }));
    }
    batch.extend(frame(&ClientMsg::MessageAck {
        call: cb.clone(),
        msg,
    }));
    batch.extend(frame(&ClientMsg::Ping { rid: Some(11) }));
    bob.send_bytes(&batch).await;

    let mut pongs = Vec::new();
    let mut limited = Vec::new();
    for _ in 1..=11 {
        match bob.recv().await {
            ServerMsg::Pong { rid } => pongs.push(rid.expect("pong echoes the rid")),
            ServerMsg::Error {
                rid: Some(rid),
                code: ErrorCode::RateLimited,
                message,
            } => {
                assert!(!message.is_empty());
                limited.push(rid);
            }
            // Acks carry no rid: an error without one would be an ack refused.
            other => panic!("unexpected (an ack rate limited?) {other:?}"),
        }
    }
    // The burst passes in order; a refill could let one more through on a stalled machine.
    assert_eq!(pongs[..5], [1, 2, 3, 4, 5], "{pongs:?}");
    assert!(limited.len() >= 5, "pongs {pongs:?}, limited {limited:?}");
    // The acks took no tokens, and the real one got through.
    match alice.recv_until(|m| reply_rid(m) == rid).await.0 {
        ServerMsg::MessageDelivered { msg: m, .. } => assert_eq!(m, msg),
        other => panic!("expected message_delivered, got {other:?}"),
    }
    let after = scrape(node.metrics_addr).get(FRAMES_REJECTED, &[("reason", "rate_limited")]);
    assert!(
        after >= before + limited.len() as f64,
        "{before} -> {after}"
    );

    // Alice's own rate is hers: unaffected. Bob recovers once tokens come back.
    assert_open(&mut alice).await;
    tokio::time::sleep(Duration::from_millis(1100)).await;
    assert_open(&mut bob).await;
}

#[tokio::test]
async fn calls_over_calls_per_endpoint_are_overloaded() {
    let node = start_node(|s| {
        s.limits.calls_per_endpoint = 2;
        s.fork.toast_timeout_ms = 10_000;
    });
    let mut alice = Raw::sign_in(node.addr, ALICE, "laptop").await;
    let mut bob = Raw::sign_in(node.addr, BOB, "laptop").await;
    let mut carol = Raw::sign_in(node.addr, CAROL, "laptop").await;
    let (c1, _) = connect_call(&mut alice, &mut bob).await;
    let (_c2, _) = connect_call(&mut alice, &mut bob).await;

    // A third call from alice: refused, nothing created.
    let reply = alice
        .request(ClientMsg::CallEstablish {
            rid: None,
            to: CAROL.into(),
            conversation: None,
            toast: None,
            sdp: offer(),
        })
        .await;
    assert_code(&reply, ErrorCode::Overloaded);
    carol.expect_silence(Duration::from_millis(200)).await;

    // Bob is full too: a call to him finds no endpoint that can take it (480), and his
    // existing calls are not disturbed.
    let (cc, _) = carol.establish(BOB, None).await;
    let reason = carol
        .state(&cc, CallState::Terminated)
        .await
        .expect("a reason");
    assert_eq!(reason.code, 480, "{reason:?}");
    let delivered = message_round_trip(&mut alice, &mut bob, &c1, "still here".into()).await;
    assert!(
        matches!(delivered, ServerMsg::MessageDelivered { .. }),
        "{delivered:?}"
    );

    // A call that ends gives its slot back.
    alice
        .request(ClientMsg::CallTerminate {
            rid: None,
            call: c1.clone(),
        })
        .await;
    alice.state(&c1, CallState::Terminated).await;
    let (c3, _) = alice.establish(CAROL, None).await;
    let (c3b, _) = carol.incoming().await;
    assert!(matches!(carol.accept(&c3b).await, ServerMsg::Ok { .. }));
    alice.state(&c3, CallState::Established).await;
}

#[tokio::test]
async fn calls_per_endpoint_has_a_metric() {
    let node = start_node(|s| s.limits.calls_per_endpoint = 1);
    let mut alice = Raw::sign_in(node.addr, ALICE, "laptop").await;
    let _bob = Raw::sign_in(node.addr, BOB, "laptop").await;
    let before = scrape(node.metrics_addr).labelled("calls_per_endpoint");
    alice.establish(BOB, None).await;
    let reply = alice
        .request(ClientMsg::CallEstablish {
            rid: None,
            to: BOB.into(),
            conversation: None,
            toast: None,
            sdp: offer(),
        })
        .await;
    assert_code(&reply, ErrorCode::Overloaded);
    let after = scrape(node.metrics_addr).labelled("calls_per_endpoint");
    assert!(
        after >= before + 1.0,
        "no metric labelled calls_per_endpoint moved"
    );
}

#[tokio::test]
async fn sign_ins_over_endpoints_per_user_are_forbidden_and_closed() {
    let node = start_node(|s| s.limits.endpoints_per_user = 2);
    let before = scrape(node.metrics_addr).get(REJECTED, &[("reason", "endpoints_per_user")]);
    let mut a1 = Raw::sign_in(node.addr, ALICE, "laptop").await;
    let mut a2 = Raw::sign_in(node.addr, ALICE, "phone").await;

    let frames = refused_sign_in(node.addr, ALICE, "tablet").await;
    assert_eq!(frames.len(), 1, "{frames:?}");
    assert_error(&frames[0], Some(1), ErrorCode::Forbidden);
    // The limit is per user, and the URI is normalised before counting.
    let frames = refused_sign_in(node.addr, "SIP:alice@EXAMPLE.COM", "tablet").await;
    assert_error(&frames[0], Some(1), ErrorCode::Forbidden);
    let mut bob = Raw::sign_in(node.addr, BOB, "laptop").await;
    let after = scrape(node.metrics_addr).get(REJECTED, &[("reason", "endpoints_per_user")]);
    assert!(after >= before + 2.0, "{before} -> {after}");

    assert_open(&mut a1).await;
    assert_open(&mut a2).await;
    assert_open(&mut bob).await;
    // Calls to alice still fork to both of her endpoints.
    let (_call, _) = bob.establish(ALICE, None).await;
    let (_, imm1) = a1.incoming().await;
    let (_, imm2) = a2.incoming().await;
    assert!(!imm1 && !imm2);

    // Once one signs out, a new device may sign in.
    a2.request(ClientMsg::Bye { rid: None }).await;
    a2.expect_closed().await;
    let mut a3 = sign_in_eventually(node.addr, ALICE, "tablet").await;
    assert_open(&mut a3).await;
}

#[tokio::test]
async fn subscriptions_over_subscriptions_per_endpoint_are_forbidden() {
    let node = start_node(|s| s.limits.subscriptions_per_endpoint = 2);
    let mut alice = Raw::sign_in(node.addr, ALICE, "laptop").await;
    let mut other = Raw::sign_in(node.addr, BOB, "laptop").await;
    let sub = |users: &[&str]| ClientMsg::Subscribe {
        rid: None,
        users: users.iter().map(|u| u.to_string()).collect(),
    };
    let ok = |m: &ServerMsg| assert!(matches!(m, ServerMsg::Ok { .. }), "{m:?}");

    ok(&alice.request(sub(&[BOB, CAROL])).await);
    // Re-subscribing to the same users adds nothing, so it is within the limit.
    ok(&alice.request(sub(&[BOB])).await);
    let reply = alice.request(sub(&["sip:dave@example.com"])).await;
    assert_code(&reply, ErrorCode::Forbidden);
    // All or nothing: a list that would cross the limit adds none of its users.
    ok(&alice
        .request(ClientMsg::Unsubscribe {
            rid: None,
            users: vec![CAROL.into()],
        })
        .await);
    let reply = alice
        .request(sub(&["sip:dave@example.com", "sip:erin@example.com"]))
        .await;
    assert_code(&reply, ErrorCode::Forbidden);
    ok(&alice.request(sub(&["sip:dave@example.com"])).await);

    // The connection stays open and other endpoints subscribe freely.
    assert_open(&mut alice).await;
    ok(&other.request(sub(&[ALICE, CAROL])).await);
}

/// Presence changes have their own, smaller budget: each reaches every watcher. Over it the
/// change is refused and not made; other requests still pass.
#[tokio::test]
async fn presence_changes_over_their_rate_are_rate_limited_and_not_made() {
    let node = start_node(|s| {
        s.limits.presence_updates_per_second = 1;
        s.limits.presence_update_burst = 2;
    });
    let mut alice = Raw::sign_in(node.addr, ALICE, "laptop").await;
    let device_state = |activity| ClientMsg::DeviceState {
        rid: None,
        activity,
        idle_ms: None,
    };
    let before = scrape(node.metrics_addr).labelled("presence_updates_per_second");
    // Sent back to back, so they are handled within far less than the second that refills
    // one token (the bucket starts full, however long the sign-in took).
    let mut rids = Vec::new();
    for msg in [
        device_state(Activity::Away),
        device_state(Activity::Active),
        ClientMsg::SetStatus {
            rid: None,
            status: Some(Status::Busy),
        },
        device_state(Activity::Away),
    ] {
        rids.push(send_request(&mut alice, msg).await);
    }
    expect_ok(&mut alice, rids[0]).await;
    expect_ok(&mut alice, rids[1]).await;
    expect_error(&mut alice, rids[2], ErrorCode::RateLimited).await;
    expect_error(&mut alice, rids[3], ErrorCode::RateLimited).await;
    alice.ping().await;

    // A new watcher sees the last change that was made: active, and no busy status.
    let mut bob = Raw::sign_in(node.addr, BOB, "laptop").await;
    request_ok(
        &mut bob,
        ClientMsg::Subscribe {
            rid: None,
            users: vec![ALICE.into()],
        },
    )
    .await;
    let (presence, _) = bob
        .recv_until(|m| matches!(m, ServerMsg::Presence { .. }))
        .await;
    assert!(
        matches!(
            presence,
            ServerMsg::Presence {
                availability: Availability::Available,
                ..
            }
        ),
        "{presence:?}"
    );
    let after = scrape(node.metrics_addr).labelled("presence_updates_per_second");
    assert!(after >= before + 2.0, "{before} -> {after}");
}

#[tokio::test]
async fn subscriptions_per_endpoint_has_a_metric() {
    let node = start_node(|s| s.limits.subscriptions_per_endpoint = 1);
    let mut alice = Raw::sign_in(node.addr, ALICE, "laptop").await;
    let before = scrape(node.metrics_addr).labelled("subscriptions_per_endpoint");
    let reply = alice
        .request(ClientMsg::Subscribe {
            rid: None,
            users: vec![BOB.into(), CAROL.into()],
        })
        .await;
    assert_code(&reply, ErrorCode::Forbidden);
    let after = scrape(node.metrics_addr).labelled("subscriptions_per_endpoint");
    assert!(
        after >= before + 1.0,
        "no metric labelled subscriptions_per_endpoint moved"
    );
}

#[tokio::test]
async fn message_over_max_message_bytes_fails_413() {
    let node = start_node(|s| s.flow.max_message_bytes = 100);
    let mut alice = Raw::sign_in(node.addr, ALICE, "laptop").await;
    let mut bob = Raw::sign_in(node.addr, BOB, "laptop").await;
    let (ca, cb) = connect_call(&mut alice, &mut bob).await;
    let before = scrape(node.metrics_addr).get("confab_messages_total", &[("result", "413")]);

    for body in [Body::Text("x".repeat(101)), Body::Binary(vec![7; 101])] {
        let content_type = if body.is_text() {
            "text/plain"
        } else {
            "application/octet-stream"
        };
        let reply = alice
            .request(ClientMsg::Message {
                rid: None,
                call: ca.clone(),
                content_type: content_type.into(),
                body,
            })
            .await;
        match reply {
            ServerMsg::MessageFailed {
                code: 413,
                msg: None,
                ..
            } => {}
            // The binary one is refused earlier: the call negotiated text/plain only.
            ServerMsg::MessageFailed { code: 415, .. } if content_type != "text/plain" => {}
            other => panic!("expected message_failed 413, got {other:?}"),
        }
    }
    bob.expect_silence(Duration::from_millis(200)).await;
    // Exactly the limit is fine, both ways.
    let r = message_round_trip(&mut alice, &mut bob, &ca, Body::Text("y".repeat(100))).await;
    assert!(matches!(r, ServerMsg::MessageDelivered { .. }), "{r:?}");
    let r = message_round_trip(&mut bob, &mut alice, &cb, Body::Text("z".repeat(100))).await;
    assert!(matches!(r, ServerMsg::MessageDelivered { .. }), "{r:?}");
    let after = scrape(node.metrics_addr).get("confab_messages_total", &[("result", "413")]);
    assert!(after >= before + 1.0, "{before} -> {after}");
}

#[tokio::test]
async fn message_over_the_negotiated_max_size_fails_413() {
    let node = start_node(|_| {});
    let mut alice = Raw::sign_in(node.addr, ALICE, "laptop").await;
    let mut bob = Raw::sign_in(node.addr, BOB, "laptop").await;
    let (ca, _) = alice.establish(BOB, None).await;
    let (cb, _) = bob.incoming().await;
    let reply = bob
        .request(ClientMsg::CallAccept {
            rid: None,
            call: cb.clone(),
            sdp: build_offer(&["text/plain"], Some(10)),
        })
        .await;
    assert!(matches!(reply, ServerMsg::Ok { .. }), "{reply:?}");
    alice.state(&ca, CallState::Established).await;
    let reply = alice
        .request(ClientMsg::Message {
            rid: None,
            call: ca.clone(),
            content_type: "text/plain".into(),
            body: "eleven byte".into(),
        })
        .await;
    assert!(
        matches!(reply, ServerMsg::MessageFailed { code: 413, .. }),
        "{reply:?}"
    );
}

#[tokio::test]
async fn no_hello_within_hello_timeout_closes() {
    let node = start_node(|s| s.server.hello_timeout_ms = 300);
    let before = scrape(node.metrics_addr).get(REJECTED, &[("reason", "hello_timeout")]);
    let mut bob = Raw::sign_in(node.addr, BOB, "laptop").await;

    let started = Instant::now();
    let mut silent = Raw::connect(node.addr).await;
    // Slowloris: two bytes of a length prefix, then nothing.
    let mut partial = Raw::connect(node.addr).await;
    partial.send_bytes(&[0, 0]).await;
    // Half a hello: the prefix and part of the body.
    let mut half = Raw::connect(node.addr).await;
    let h = frame(&hello(ALICE, "laptop"));
    half.send_bytes(&h[..h.len() / 2]).await;

    for c in [&mut silent, &mut partial, &mut half] {
        let frames = c.expect_closed().await;
        assert!(frames.is_empty(), "{frames:?}");
    }
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_millis(250),
        "closed too early: {waited:?}"
    );
    let after = scrape(node.metrics_addr).get(REJECTED, &[("reason", "hello_timeout")]);
    assert!(after >= before + 3.0, "{before} -> {after}");
    // A client that signed in in time is not subject to the deadline.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_open(&mut bob).await;
}

/// A client that signs in and subscribes, then never reads again.
#[tokio::test]
async fn a_frame_before_hello_over_max_hello_frame_is_frame_too_large() {
    let node = start_node(|_| {});
    let mut anon = Raw::connect(node.addr).await;
    // Well under max_frame, over max_hello_frame: refused before the body is read.
    anon.send_bytes(&5000u32.to_be_bytes()).await;
    let frames = anon.expect_closed().await;
    assert_eq!(frames.len(), 1, "{frames:?}");
    assert_error(&frames[0], None, ErrorCode::FrameTooLarge);
    // After hello the node's max_frame applies.
    let mut alice = Raw::sign_in(node.addr, ALICE, "laptop").await;
    let big = "x".repeat(5000);
    let reply = alice
        .request(ClientMsg::Subscribe {
            rid: None,
            users: vec![format!("sip:{big}@example.com")],
        })
        .await;
    assert_code(&reply, ErrorCode::BadFrame);
}

async fn non_reader(addr: std::net::SocketAddr, user: &str) -> TcpStream {
    let mut s = TcpStream::connect(addr).await.expect("connect");
    s.write_all(&frame(&hello(user, "never-reads")))
        .await
        .expect("hello");
    s.write_all(&frame(&ClientMsg::Subscribe {
        rid: Some(2),
        users: vec![user.to_owned()],
    }))
    .await
    .expect("subscribe");
    s
}

#[tokio::test]
async fn a_client_that_stops_reading_is_dropped_as_a_slow_consumer() {
    // Room for exactly the connections made below (six devices, the non-reader, bob, carol),
    // so that one more can only sign in once the non-reader's slot has been given back.
    const CONNECTIONS: usize = 9;
    let node = start_node(|s| {
        s.limits.outbound_queue = 16;
        s.server.max_connections = CONNECTIONS;
        // The flood below is of presence changes, which their own limit would stop first.
        s.limits.presence_updates_per_second = 1_000_000;
        s.limits.presence_update_burst = 1_000_000;
    });
    let metric = || scrape(node.metrics_addr).get("confab_slow_consumers_total", &[]);
    let before = metric();
    // Alice's own devices see the full presence view, with every device's name: large events.
    let mut devices = Vec::new();
    for i in 0..6 {
        let name = format!("{i}{}", "d".repeat(120));
        devices.push(Raw::sign_in(node.addr, ALICE, &name).await);
    }
    let mut slow = non_reader(node.addr, ALICE).await;
    let mut bob = Raw::sign_in(node.addr, BOB, "laptop").await;
    let mut carol = Raw::sign_in(node.addr, CAROL, "laptop").await;
    let (bob_call, carol_call) = connect_call(&mut bob, &mut carol).await;

    // Flood: one of alice's devices flips its activity, each flip a presence event to the
    // non-reader. Requests are pipelined eight at a time so the flooder's own queue stays small.
    let flooder = &mut devices[0];
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut flips = 0u32;
    loop {
        let mut batch = Vec::new();
        for i in 0..8 {
            let activity = if (flips + i).is_multiple_of(2) {
                Activity::Inactive
            } else {
                Activity::Active
            };
            batch.extend(frame(&ClientMsg::DeviceState {
                rid: Some(flips + i),
                activity,
                idle_ms: None,
            }));
        }
        flooder.send_bytes(&batch).await;
        for _ in 0..8 {
            flooder
                .recv_until(|m| matches!(m, ServerMsg::Ok { .. }))
                .await;
        }
        flips += 8;
        if flips.is_multiple_of(200) && metric() > before {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no slow consumer after {flips} presence changes"
        );
    }

    // The node lets go of the non-reader's socket even though its last write can never finish:
    // the connection's slot is free while the client still has not read a byte. (This node's
    // own limit tells, where the process-wide connection gauges would also count the
    // connections of tests running beside this one.)
    let _dave = sign_in_eventually(node.addr, "sip:dave@example.com", "laptop").await;

    // The non-reader's connection is closed: reading now drains what was buffered, then EOF.
    let mut sink = vec![0u8; 1 << 16];
    let drained = tokio::time::timeout(Duration::from_secs(10), async {
        let mut total = 0usize;
        loop {
            match slow.read(&mut sink).await {
                Ok(0) | Err(_) => return total,
                Ok(n) => total += n,
            }
        }
    })
    .await
    .expect("the slow consumer's connection is closed");
    assert!(drained > 0);

    // Everyone else is unaffected.
    for d in &mut devices {
        assert_open(d).await;
    }
    let r = message_round_trip(&mut bob, &mut carol, &bob_call, "unaffected".into()).await;
    assert!(matches!(r, ServerMsg::MessageDelivered { .. }), "{r:?}");
    let r = message_round_trip(&mut carol, &mut bob, &carol_call, "indeed".into()).await;
    assert!(matches!(r, ServerMsg::MessageDelivered { .. }), "{r:?}");
}

/// One source address holds at most `limits.connections_per_address` connections, and opens at
/// most `new_connections_per_address_per_second` (after a burst): a connection over either is
/// closed at once, before any handshake or `hello`, and counted. Loopback is exempt by default,
/// so the test turns that off.
#[tokio::test]
async fn a_source_address_over_its_limits_is_refused_before_a_hello() {
    let node = start_node(|s| {
        s.limits.address_limits_exempt_loopback = false;
        s.limits.connections_per_address = 2;
        s.limits.new_connections_per_address_per_second = 1_000;
        s.limits.new_connection_burst_per_address = 1_000;
    });
    let first = Raw::sign_in(node.addr, "sip:alice-addr@example.com", "one").await;
    let _second = Raw::sign_in(node.addr, "sip:alice-addr@example.com", "two").await;
    let mut third = Raw::connect(node.addr).await;
    assert_eq!(third.expect_closed().await, Vec::<ServerMsg>::new());
    // A place comes back when a connection closes.
    drop(first);
    let mut again = None;
    for _ in 0..100 {
        let mut raw = Raw::connect(node.addr).await;
        raw.send(&ClientMsg::Hello {
            resume: None,
            rid: Some(1),
            version: 1,
            user: "sip:alice-addr@example.com".to_owned(),
            token: token("sip:alice-addr@example.com"),
            device: "three".to_owned(),
            agent: None,
        })
        .await;
        // Until the node has seen the first connection close, this one is refused too.
        if let Some(welcome @ ServerMsg::Welcome { .. }) = raw.next_or_closed().await {
            again = Some((raw, welcome));
            break;
        }
    }
    assert!(
        again.is_some(),
        "the closed connection's place was given back"
    );
    let (_, _, metrics) = http_get(
        node.metrics_addr.expect("the test node serves metrics"),
        "/metrics",
    )
    .await;
    assert!(
        metric(
            &metrics,
            "confab_connections_rejected_total{reason=\"connections_per_address\"}"
        ) >= 1.0
    );

    let fast = start_node(|s| {
        s.limits.address_limits_exempt_loopback = false;
        s.limits.new_connections_per_address_per_second = 1;
        s.limits.new_connection_burst_per_address = 2;
    });
    let _a = Raw::sign_in(fast.addr, "sip:bob-addr@example.com", "one").await;
    let _b = Raw::sign_in(fast.addr, "sip:bob-addr@example.com", "two").await;
    let mut c = Raw::connect(fast.addr).await;
    assert_eq!(c.expect_closed().await, Vec::<ServerMsg>::new());
}
