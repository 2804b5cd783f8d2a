//! Contract §5 (the InstantMessagingFlow) over real TCP: delivery and its one answer per
//! message, numbering, negotiation limits (415, 413), 481 / 408 failures, composing state and
//! the toast.

use confab_protocol::sdp::build_offer;
use confab_protocol::*;
use confab_tests::*;
use std::collections::HashSet;
use std::time::{Duration, Instant};

const ALICE: &str = "sip:alice@example.com";
const BOB: &str = "sip:bob@example.com";
const CAROL: &str = "sip:carol@example.com";

/// How long to watch for a frame that must not come.
const QUIET: Duration = Duration::from_millis(150);

/// An established call from alice to bob.
struct Call {
    alice: Raw,
    bob: Raw,
    /// Alice's leg.
    a: String,
    /// Bob's leg.
    b: String,
}

/// Alice calls bob with `sdp` (and `toast`), bob accepts with the default answer; both have
/// seen `call_established`. With a toast, bob's next frame is the toast's `message_received`.
async fn call_with(node: &confab_actors::RunningNode, sdp: String, toast: Option<&str>) -> Call {
    let mut alice = Raw::sign_in(node.addr, ALICE, "laptop").await;
    let mut bob = Raw::sign_in(node.addr, BOB, "desk").await;
    let reply = alice
        .request(ClientMsg::CallEstablish {
            rid: None,
            to: BOB.to_owned(),
            conversation: None,
            toast: toast.map(|t| Toast {
                content_type: "text/plain".to_owned(),
                body: Body::Text(t.to_owned()),
            }),
            sdp,
        })
        .await;
    let ServerMsg::CallCreated { call: a, .. } = reply else {
        panic!("expected call_created, got {reply:?}")
    };
    let (b, _) = bob.incoming().await;
    assert!(matches!(bob.accept(&b).await, ServerMsg::Ok { .. }));
    bob.recv_until(|m| matches!(m, ServerMsg::CallEstablished { .. }))
        .await;
    alice
        .recv_until(|m| matches!(m, ServerMsg::CallEstablished { .. }))
        .await;
    Call { alice, bob, a, b }
}

async fn call(node: &confab_actors::RunningNode) -> Call {
    call_with(node, offer(), None).await
}

/// Sends a text/plain message with a fresh rid; returns the rid.
async fn say(c: &mut Raw, call: &str, text: &str) -> Option<u32> {
    send_message(c, call, "text/plain", Body::Text(text.to_owned())).await
}

async fn send_message(c: &mut Raw, call: &str, content_type: &str, body: Body) -> Option<u32> {
    let rid = c.rid();
    c.send(&ClientMsg::Message {
        rid,
        call: call.to_owned(),
        content_type: content_type.to_owned(),
        body,
    })
    .await;
    rid
}

fn received(call: &str, msg: u32, from: &str, text: &str) -> ServerMsg {
    ServerMsg::MessageReceived {
        call: call.to_owned(),
        msg,
        from: from.to_owned(),
        content_type: "text/plain".to_owned(),
        body: Body::Text(text.to_owned()),
        toast: None,
    }
}

fn delivered(rid: Option<u32>, call: &str, msg: u32) -> ServerMsg {
    ServerMsg::MessageDelivered {
        rid,
        call: call.to_owned(),
        msg,
    }
}

async fn ack(c: &mut Raw, call: &str, msg: u32) {
    c.send(&ClientMsg::MessageAck {
        call: call.to_owned(),
        msg,
    })
    .await;
}

/// Asserts `m` is `message_failed{rid, call, msg, code}` with some text.
fn assert_failed(m: &ServerMsg, rid: Option<u32>, call: &str, msg: Option<u32>, code: u16) {
    match m {
        ServerMsg::MessageFailed {
            rid: r,
            call: c,
            msg: n,
            code: k,
            text,
        } => {
            assert_eq!((*r, c.as_str(), *n, *k), (rid, call, msg, code), "{m:?}");
            assert!(!text.is_empty(), "{m:?}");
        }
        other => panic!("expected message_failed {code}, got {other:?}"),
    }
}

fn composing(call: &str, active: bool) -> ServerMsg {
    ServerMsg::RemoteComposing {
        call: call.to_owned(),
        active,
    }
}

async fn set_composing(c: &mut Raw, call: &str, active: bool) {
    c.send(&ClientMsg::Composing {
        call: call.to_owned(),
        active,
    })
    .await;
}

#[tokio::test]
async fn messages_arrive_in_order_numbered_by_one_counter_and_acks_are_delivered() {
    let node = start_node(|_| {});
    let Call {
        mut alice,
        mut bob,
        a,
        b,
    } = call(&node).await;
    let r1 = say(&mut alice, &a, "one").await;
    let r2 = say(&mut alice, &a, "two").await;
    let r3 = say(&mut alice, &a, "three").await;
    assert_eq!(bob.recv().await, received(&b, 1, ALICE, "one"));
    assert_eq!(bob.recv().await, received(&b, 2, ALICE, "two"));
    assert_eq!(bob.recv().await, received(&b, 3, ALICE, "three"));
    for n in 1..=3 {
        ack(&mut bob, &b, n).await;
    }
    assert_eq!(alice.recv().await, delivered(r1, &a, 1));
    assert_eq!(alice.recv().await, delivered(r2, &a, 2));
    assert_eq!(alice.recv().await, delivered(r3, &a, 3));

    // The other direction continues the same counter.
    let r4 = say(&mut bob, &b, "four").await;
    assert_eq!(alice.recv().await, received(&a, 4, BOB, "four"));
    ack(&mut alice, &a, 4).await;
    assert_eq!(bob.recv().await, delivered(r4, &b, 4));

    // A message without rid gets its answer without one.
    bob.send(&ClientMsg::Message {
        rid: None,
        call: b.clone(),
        content_type: "text/plain".to_owned(),
        body: Body::Text("five".to_owned()),
    })
    .await;
    assert_eq!(alice.recv().await, received(&a, 5, BOB, "five"));
    ack(&mut alice, &a, 5).await;
    assert_eq!(bob.recv().await, delivered(None, &b, 5));
}

#[tokio::test]
async fn binary_content_type_is_delivered_as_bin() {
    let node = start_node(|_| {});
    let sdp = build_offer(&["text/plain", "application/octet-stream"], None);
    let mut alice = Raw::sign_in(node.addr, ALICE, "laptop").await;
    let mut bob = Raw::sign_in(node.addr, BOB, "desk").await;
    let ServerMsg::CallCreated { call: a, .. } = alice
        .request(ClientMsg::CallEstablish {
            rid: None,
            to: BOB.to_owned(),
            conversation: None,
            toast: None,
            sdp: sdp.clone(),
        })
        .await
    else {
        panic!("expected call_created")
    };
    let (b, _) = bob.incoming().await;
    let reply = bob
        .request(ClientMsg::CallAccept {
            rid: None,
            call: b.clone(),
            sdp,
        })
        .await;
    assert!(matches!(reply, ServerMsg::Ok { .. }), "{reply:?}");
    bob.recv_until(|m| matches!(m, ServerMsg::CallEstablished { .. }))
        .await;
    alice
        .recv_until(|m| matches!(m, ServerMsg::CallEstablished { .. }))
        .await;
    let rid = send_message(
        &mut alice,
        &a,
        "application/octet-stream",
        Body::Binary(vec![0, 1, 2, 255]),
    )
    .await;
    assert_eq!(
        bob.recv().await,
        ServerMsg::MessageReceived {
            call: b.clone(),
            msg: 1,
            from: ALICE.to_owned(),
            content_type: "application/octet-stream".to_owned(),
            body: Body::Binary(vec![0, 1, 2, 255]),
            toast: None,
        }
    );
    ack(&mut bob, &b, 1).await;
    assert_eq!(alice.recv().await, delivered(rid, &a, 1));
}

#[tokio::test]
async fn content_type_not_negotiated_is_415() {
    let node = start_node(|_| {});
    let Call {
        mut alice,
        mut bob,
        a,
        b,
    } = call(&node).await;
    let rid = send_message(&mut alice, &a, "image/png", Body::Binary(vec![0x89, b'P'])).await;
    assert_failed(&alice.recv().await, rid, &a, None, 415);
    let rid = send_message(&mut alice, &a, "text/html", Body::Text("<b>x</b>".into())).await;
    assert_failed(&alice.recv().await, rid, &a, None, 415);
    // Nothing reached bob, and the call still carries what was negotiated.
    let rid = say(&mut alice, &a, "plain").await;
    assert_eq!(bob.recv().await, received(&b, 1, ALICE, "plain"));
    ack(&mut bob, &b, 1).await;
    assert_eq!(alice.recv().await, delivered(rid, &a, 1));
}

#[tokio::test]
async fn body_larger_than_max_size_is_413() {
    let node = start_node(|_| {});
    let Call {
        mut alice,
        mut bob,
        a,
        b,
    } = call_with(&node, build_offer(&["text/plain"], Some(10)), None).await;
    let rid = say(&mut alice, &a, "eleven byte").await;
    assert_failed(&alice.recv().await, rid, &a, None, 413);
    // Exactly max-size is fine; it is the first message that reached bob.
    let rid = say(&mut alice, &a, "ten bytes!").await;
    assert_eq!(bob.recv().await, received(&b, 1, ALICE, "ten bytes!"));
    ack(&mut bob, &b, 1).await;
    assert_eq!(alice.recv().await, delivered(rid, &a, 1));
    // The limit binds both directions.
    let rid = say(&mut bob, &b, "eleven byte").await;
    assert_failed(&bob.recv().await, rid, &b, None, 413);
}

#[tokio::test]
async fn message_on_unknown_call_is_481() {
    let node = start_node(|_| {});
    let mut alice = Raw::sign_in(node.addr, ALICE, "laptop").await;
    let rid = say(&mut alice, "no-such-call", "hello?").await;
    assert_failed(&alice.recv().await, rid, "no-such-call", None, 481);
}

#[tokio::test]
async fn message_on_another_endpoints_call_is_481() {
    let node = start_node(|_| {});
    let Call {
        mut alice,
        mut bob,
        a,
        b,
    } = call(&node).await;
    let mut carol = Raw::sign_in(node.addr, CAROL, "desk").await;
    for id in [&a, &b] {
        let rid = say(&mut carol, id, "let me in").await;
        assert_failed(&carol.recv().await, rid, id, None, 481);
    }
    // Another endpoint of the same user does not hold the call either.
    let mut alice2 = Raw::sign_in(node.addr, ALICE, "phone").await;
    let rid = say(&mut alice2, &a, "me too").await;
    assert_failed(&alice2.recv().await, rid, &a, None, 481);
    alice.expect_silence(QUIET).await;
    bob.expect_silence(QUIET).await;
}

#[tokio::test]
async fn message_on_a_call_not_yet_established_is_481() {
    let node = start_node(|_| {});
    let mut alice = Raw::sign_in(node.addr, ALICE, "laptop").await;
    // Two endpoints: no immediate auto-accept, the forks ring until the toast timeout.
    let mut bob1 = Raw::sign_in(node.addr, BOB, "desk").await;
    let mut bob2 = Raw::sign_in(node.addr, BOB, "phone").await;
    let (a, _) = alice.establish(BOB, None).await;
    let (b1, _) = bob1.incoming().await;
    let (b2, _) = bob2.incoming().await;
    // The callee's incoming leg.
    let rid = say(&mut bob1, &b1, "too early").await;
    assert_failed(&bob1.recv().await, rid, &b1, None, 481);
    // The caller's establishing leg.
    let rid = say(&mut alice, &a, "too early").await;
    let (m, _) = alice
        .recv_until(|m| matches!(m, ServerMsg::MessageFailed { .. }))
        .await;
    assert_failed(&m, rid, &a, None, 481);
    // Neither reached anybody; once established, numbering starts at 1.
    assert!(matches!(bob2.accept(&b2).await, ServerMsg::Ok { .. }));
    bob2.recv_until(|m| matches!(m, ServerMsg::CallEstablished { .. }))
        .await;
    alice
        .recv_until(|m| matches!(m, ServerMsg::CallEstablished { .. }))
        .await;
    let rid = say(&mut alice, &a, "now").await;
    assert_eq!(bob2.recv().await, received(&b2, 1, ALICE, "now"));
    ack(&mut bob2, &b2, 1).await;
    assert_eq!(alice.recv().await, delivered(rid, &a, 1));
}

#[tokio::test]
async fn message_on_an_ended_call_is_481() {
    let node = start_node(|_| {});
    let Call {
        mut alice,
        mut bob,
        a,
        b,
    } = call(&node).await;
    let reply = alice
        .request(ClientMsg::CallTerminate {
            rid: None,
            call: a.clone(),
        })
        .await;
    assert!(matches!(reply, ServerMsg::Ok { .. }));
    alice.state(&a, CallState::Terminated).await;
    bob.state(&b, CallState::Terminated).await;
    let rid = say(&mut alice, &a, "after").await;
    assert_failed(&alice.recv().await, rid, &a, None, 481);
    let rid = say(&mut bob, &b, "after").await;
    assert_failed(&bob.recv().await, rid, &b, None, 481);
}

#[tokio::test]
async fn unacked_message_fails_with_408_after_ack_timeout() {
    let node = start_node(|s| s.flow.ack_timeout_ms = 200);
    let Call {
        mut alice,
        mut bob,
        a,
        b,
    } = call(&node).await;
    let start = Instant::now();
    let rid = say(&mut alice, &a, "anyone?").await;
    assert_eq!(bob.recv().await, received(&b, 1, ALICE, "anyone?"));
    assert_failed(&alice.recv().await, rid, &a, Some(1), 408);
    assert!(
        start.elapsed() >= Duration::from_millis(200),
        "408 after {:?}",
        start.elapsed()
    );
    // A late ack changes nothing: the message already had its one answer.
    ack(&mut bob, &b, 1).await;
    // The call is still up: the next message is delivered, and it is the next frame alice gets.
    let rid = say(&mut alice, &a, "still there?").await;
    assert_eq!(bob.recv().await, received(&b, 2, ALICE, "still there?"));
    ack(&mut bob, &b, 2).await;
    assert_eq!(alice.recv().await, delivered(rid, &a, 2));
}

/// One sweep timer serves all of a leg's unacked messages: each still fails at its own
/// deadline, in order, and one acked in between is not failed.
#[tokio::test]
async fn several_unacked_messages_each_fail_at_their_own_deadline() {
    let node = start_node(|s| s.flow.ack_timeout_ms = 300);
    let Call {
        mut alice,
        mut bob,
        a,
        b,
    } = call(&node).await;
    let first_sent = Instant::now();
    let r1 = say(&mut alice, &a, "one").await;
    assert_eq!(bob.recv().await, received(&b, 1, ALICE, "one"));
    // The second message goes out well after the first.
    tokio::time::sleep(Duration::from_millis(150)).await;
    let second_sent = Instant::now();
    let r2 = say(&mut alice, &a, "two").await;
    assert_eq!(bob.recv().await, received(&b, 2, ALICE, "two"));
    let r3 = say(&mut alice, &a, "three").await;
    assert_eq!(bob.recv().await, received(&b, 3, ALICE, "three"));
    ack(&mut bob, &b, 3).await;
    // The third is delivered, once; the first two fail in order, each at its own deadline. The
    // delivery races the first deadline (the 150 ms left of it on a loaded machine may not
    // cover the round trips above), so it may come before, between or after the failures.
    let mut third_delivered = false;
    let mut failures = 0;
    while failures < 2 || !third_delivered {
        let m = alice.recv().await;
        if m == delivered(r3, &a, 3) {
            assert!(!third_delivered, "the third was delivered twice");
            third_delivered = true;
        } else if failures == 0 {
            assert_failed(&m, r1, &a, Some(1), 408);
            assert!(first_sent.elapsed() >= Duration::from_millis(300));
            failures += 1;
        } else if failures == 1 {
            assert_failed(&m, r2, &a, Some(2), 408);
            assert!(
                second_sent.elapsed() >= Duration::from_millis(300),
                "the second failed {:?} after it was sent",
                second_sent.elapsed()
            );
            failures += 1;
        } else {
            panic!("unexpected {m:?} after both failures");
        }
    }
}

#[tokio::test]
async fn message_pending_when_the_remote_terminates_fails_with_481() {
    let node = start_node(|_| {});
    let Call {
        mut alice,
        mut bob,
        a,
        b,
    } = call(&node).await;
    let rid = say(&mut alice, &a, "wait").await;
    assert_eq!(bob.recv().await, received(&b, 1, ALICE, "wait"));
    let reply = bob
        .request(ClientMsg::CallTerminate {
            rid: None,
            call: b.clone(),
        })
        .await;
    assert!(matches!(reply, ServerMsg::Ok { .. }));
    // Alice gets the failure and the end of her leg (in either order), nothing else.
    let mut frames = Vec::new();
    for _ in 0..3 {
        frames.push(alice.recv().await);
    }
    let failures: Vec<_> = frames
        .iter()
        .filter(|m| matches!(m, ServerMsg::MessageFailed { .. }))
        .collect();
    assert_eq!(failures.len(), 1, "{frames:?}");
    assert_failed(failures[0], rid, &a, Some(1), 481);
    let states: Vec<_> = frames
        .iter()
        .filter_map(|m| match m {
            ServerMsg::CallState { state, reason, .. } => Some((*state, reason.clone())),
            _ => None,
        })
        .collect();
    let remotely = Some(Reason::new(200, "Terminated remotely"));
    assert_eq!(
        states,
        vec![
            (CallState::Terminating, remotely.clone()),
            (CallState::Terminated, remotely)
        ]
    );
    // A late ack from bob does not produce a second answer.
    ack(&mut bob, &b, 1).await;
    alice.expect_silence(QUIET).await;
}

#[tokio::test]
async fn message_pending_when_the_remote_is_lost_fails_with_481() {
    let node = start_node(|_| {});
    let Call {
        mut alice,
        mut bob,
        a,
        b,
    } = call(&node).await;
    let rid = say(&mut alice, &a, "wait").await;
    assert_eq!(bob.recv().await, received(&b, 1, ALICE, "wait"));
    drop(bob);
    let (m, _) = alice
        .recv_until(|m| matches!(m, ServerMsg::MessageFailed { .. }))
        .await;
    assert_failed(&m, rid, &a, Some(1), 481);
}

#[tokio::test]
async fn message_pending_when_the_sender_terminates_fails_with_481() {
    let node = start_node(|_| {});
    let Call {
        mut alice,
        mut bob,
        a,
        b,
    } = call(&node).await;
    let rid = say(&mut alice, &a, "wait").await;
    assert_eq!(bob.recv().await, received(&b, 1, ALICE, "wait"));
    alice
        .send(&ClientMsg::CallTerminate {
            rid: Some(1),
            call: a.clone(),
        })
        .await;
    // The ok, the end of the leg and the failure, in some order.
    let mut frames = Vec::new();
    for _ in 0..4 {
        frames.push(alice.recv().await);
    }
    assert!(
        frames.contains(&ServerMsg::Ok { rid: Some(1) }),
        "{frames:?}"
    );
    let failures: Vec<_> = frames
        .iter()
        .filter(|m| matches!(m, ServerMsg::MessageFailed { .. }))
        .collect();
    assert_eq!(failures.len(), 1, "{frames:?}");
    assert_failed(failures[0], rid, &a, Some(1), 481);
    // Bob's ack comes too late to make a second answer.
    ack(&mut bob, &b, 1).await;
    alice.expect_silence(QUIET).await;
}

#[tokio::test]
async fn message_pending_when_the_sender_says_bye_is_answered_before_the_close() {
    let node = start_node(|_| {});
    let Call {
        mut alice,
        mut bob,
        a,
        b,
    } = call(&node).await;
    let rid = say(&mut alice, &a, "wait").await;
    assert_eq!(bob.recv().await, received(&b, 1, ALICE, "wait"));
    alice.send(&ClientMsg::Bye { rid: Some(2) }).await;
    let frames = alice.expect_closed().await;
    let answers: Vec<_> = frames
        .iter()
        .filter(|m| {
            matches!(
                m,
                ServerMsg::MessageDelivered { .. } | ServerMsg::MessageFailed { .. }
            )
        })
        .collect();
    assert_eq!(answers.len(), 1, "{frames:?}");
    assert_failed(answers[0], rid, &a, Some(1), 481);
}

/// Requests that follow `bye` in the same write are still read and answered before the
/// connection closes: the `message` with 503, the `ping`-like request with `invalid_state`
/// (protocol.md §9 k), each once.
#[tokio::test]
async fn requests_sent_right_after_bye_are_answered_before_the_close() {
    let node = start_node(|_| {});
    let Call { mut alice, a, .. } = call(&node).await;
    let mut bytes = frame(&ClientMsg::Bye { rid: Some(2) });
    bytes.extend(frame(&ClientMsg::Message {
        rid: Some(3),
        call: a.clone(),
        content_type: "text/plain".into(),
        body: Body::Text("too late".into()),
    }));
    bytes.extend(frame(&ClientMsg::SetStatus {
        rid: Some(4),
        status: None,
    }));
    // A frame of a type the node does not know, still with a readable rid.
    let mut unknown = unknown_type_frame(5);
    bytes.append(&mut unknown);
    alice.send_bytes(&bytes).await;
    let frames = alice.expect_closed().await;
    let answers = |rid: u32| {
        frames
            .iter()
            .filter(|m| reply_rid(m) == Some(rid))
            .collect::<Vec<_>>()
    };
    assert!(
        matches!(answers(2)[..], [ServerMsg::Ok { .. }]),
        "{frames:?}"
    );
    assert!(
        matches!(answers(3)[..], [ServerMsg::MessageFailed { code: 503, .. }]),
        "{frames:?}"
    );
    assert!(
        matches!(
            answers(4)[..],
            [ServerMsg::Error {
                code: ErrorCode::InvalidState,
                ..
            }]
        ),
        "{frames:?}"
    );
    assert!(
        matches!(
            answers(5)[..],
            [ServerMsg::Error {
                code: ErrorCode::UnknownType,
                ..
            }]
        ),
        "{frames:?}"
    );
}

/// `{type: "no_such_request", rid}` as a frame.
fn unknown_type_frame(rid: u32) -> Vec<u8> {
    #[derive(serde::Serialize)]
    struct Unknown {
        r#type: &'static str,
        rid: u32,
    }
    frame(&Unknown {
        r#type: "no_such_request",
        rid,
    })
}

#[tokio::test]
async fn remote_composing_can_become_active_again_after_going_idle() {
    let node = start_node(|s| s.flow.composing_timeout_ms = 100);
    let Call {
        mut alice,
        mut bob,
        a,
        b,
    } = call(&node).await;
    set_composing(&mut alice, &a, true).await;
    assert_eq!(bob.recv().await, composing(&b, true));
    assert_eq!(bob.recv().await, composing(&b, false));
    set_composing(&mut alice, &a, true).await;
    assert_eq!(bob.recv().await, composing(&b, true));
    set_composing(&mut alice, &a, false).await;
    assert_eq!(bob.recv().await, composing(&b, false));
}

#[tokio::test]
async fn every_message_gets_exactly_one_answer() {
    let node = start_node(|_| {});
    let Call {
        mut alice,
        mut bob,
        a,
        b,
    } = call(&node).await;
    let mut rids = HashSet::new();
    for i in 0..50 {
        let rid = say(&mut alice, &a, &format!("m{i}")).await;
        rids.insert(rid.expect("rid"));
    }
    for i in 0..50u32 {
        assert_eq!(
            bob.recv().await,
            received(&b, i + 1, ALICE, &format!("m{i}"))
        );
        ack(&mut bob, &b, i + 1).await;
    }
    let mut answered = HashSet::new();
    for _ in 0..50 {
        match alice.recv().await {
            ServerMsg::MessageDelivered { rid, call, .. } => {
                assert_eq!(call, a);
                assert!(answered.insert(rid.expect("rid")), "{rid:?} answered twice");
            }
            other => panic!("expected message_delivered, got {other:?}"),
        }
    }
    assert_eq!(answered, rids);
    alice.expect_silence(QUIET).await;
}

#[tokio::test]
async fn remote_composing_is_sent_on_changes_only() {
    let node = start_node(|_| {});
    let Call {
        mut alice,
        mut bob,
        a,
        b,
    } = call(&node).await;
    for active in [true, true, true, false, false] {
        set_composing(&mut alice, &a, active).await;
    }
    // A frame that must come after all of the above tells where they stop.
    say(&mut alice, &a, "done").await;
    assert_eq!(bob.recv().await, composing(&b, true));
    assert_eq!(bob.recv().await, composing(&b, false));
    assert_eq!(bob.recv().await, received(&b, 1, ALICE, "done"));
    // The other direction.
    set_composing(&mut bob, &b, true).await;
    assert_eq!(alice.recv().await, composing(&a, true));
    // Composing gets no reply of its own.
    bob.expect_silence(QUIET).await;
}

#[tokio::test]
async fn remote_composing_goes_idle_after_composing_timeout_without_refresh() {
    let node = start_node(|s| s.flow.composing_timeout_ms = 500);
    let Call {
        mut alice,
        mut bob,
        a,
        b,
    } = call(&node).await;
    let start = Instant::now();
    set_composing(&mut alice, &a, true).await;
    assert_eq!(bob.recv().await, composing(&b, true));
    // A refresh 100 ms in (a client's refresh period, not a wait for an event) restarts the
    // timeout and is no change.
    tokio::time::sleep(Duration::from_millis(100)).await;
    set_composing(&mut alice, &a, true).await;
    assert_eq!(bob.recv().await, composing(&b, false));
    assert!(
        start.elapsed() >= Duration::from_millis(600),
        "idle after {:?}, before the refreshed timeout",
        start.elapsed()
    );
}

#[tokio::test]
async fn remote_composing_false_precedes_the_message_of_a_composing_sender() {
    let node = start_node(|_| {});
    let Call {
        mut alice,
        mut bob,
        a,
        b,
    } = call(&node).await;
    set_composing(&mut alice, &a, true).await;
    assert_eq!(bob.recv().await, composing(&b, true));
    say(&mut alice, &a, "typed").await;
    assert_eq!(bob.recv().await, composing(&b, false));
    assert_eq!(bob.recv().await, received(&b, 1, ALICE, "typed"));
    // Not composing: the message comes alone.
    say(&mut alice, &a, "again").await;
    assert_eq!(bob.recv().await, received(&b, 2, ALICE, "again"));
}

#[tokio::test]
async fn composing_on_a_call_not_established_is_ignored() {
    let node = start_node(|_| {});
    let mut alice = Raw::sign_in(node.addr, ALICE, "laptop").await;
    let mut bob = Raw::sign_in(node.addr, BOB, "desk").await;
    let (a, _) = alice.establish(BOB, None).await;
    let (b, _) = bob.incoming().await;
    set_composing(&mut bob, &b, true).await;
    set_composing(&mut alice, &a, true).await;
    // The pong tells alice's composing reached her leg before bob accepts.
    alice.send(&ClientMsg::Ping { rid: Some(1) }).await;
    alice
        .recv_until(|m| matches!(m, ServerMsg::Pong { rid: Some(1) }))
        .await;
    assert!(matches!(bob.accept(&b).await, ServerMsg::Ok { .. }));
    bob.recv_until(|m| matches!(m, ServerMsg::CallEstablished { .. }))
        .await;
    let (_, before) = alice
        .recv_until(|m| matches!(m, ServerMsg::CallEstablished { .. }))
        .await;
    assert!(
        !before
            .iter()
            .any(|m| matches!(m, ServerMsg::RemoteComposing { .. })),
        "{before:?}"
    );
    // Neither earlier composing carried over: the first frames after establishment are these.
    say(&mut alice, &a, "hi").await;
    assert_eq!(bob.recv().await, received(&b, 1, ALICE, "hi"));
    say(&mut bob, &b, "hey").await;
    assert_eq!(alice.recv().await, received(&a, 2, BOB, "hey"));
}

#[tokio::test]
async fn composing_on_a_call_that_is_not_yours_is_ignored() {
    let node = start_node(|_| {});
    let Call {
        mut alice,
        mut bob,
        a,
        b,
    } = call(&node).await;
    let mut carol = Raw::sign_in(node.addr, CAROL, "desk").await;
    set_composing(&mut carol, &a, true).await;
    set_composing(&mut carol, &b, true).await;
    set_composing(&mut carol, "no-such-call", true).await;
    carol.expect_silence(QUIET).await;
    alice.expect_silence(Duration::from_millis(1)).await;
    bob.expect_silence(Duration::from_millis(1)).await;
    // And it is no error either: carol's connection is fine.
    carol.send(&ClientMsg::Ping { rid: Some(1) }).await;
    assert_eq!(carol.recv().await, ServerMsg::Pong { rid: Some(1) });
}

#[tokio::test]
async fn body_kind_not_matching_content_type_is_bad_frame() {
    let node = start_node(|_| {});
    let Call {
        mut alice,
        mut bob,
        a,
        b,
    } = call(&node).await;
    let rid = send_message(&mut alice, &a, "text/plain", Body::Binary(b"hi".to_vec())).await;
    match alice.recv().await {
        ServerMsg::Error { rid: r, code, .. } => assert_eq!((r, code), (rid, ErrorCode::BadFrame)),
        other => panic!("expected bad_frame, got {other:?}"),
    }
    let rid = send_message(&mut alice, &a, "image/png", Body::Text("png?".to_owned())).await;
    match alice.recv().await {
        ServerMsg::Error { rid: r, code, .. } => assert_eq!((r, code), (rid, ErrorCode::BadFrame)),
        other => panic!("expected bad_frame, got {other:?}"),
    }
    // Neither took a number nor reached bob; the connection and the call are fine.
    let rid = say(&mut alice, &a, "ok").await;
    assert_eq!(bob.recv().await, received(&b, 1, ALICE, "ok"));
    ack(&mut bob, &b, 1).await;
    assert_eq!(alice.recv().await, delivered(rid, &a, 1));
}

/// A content type travels with its body to the receiver but is not counted in
/// `flow.max_message_bytes`: it has a limit of its own, `flow.max_content_type_bytes` (256).
#[tokio::test]
async fn content_type_longer_than_its_limit_is_bad_frame() {
    let node = start_node(|_| {});
    let Call {
        mut alice,
        mut bob,
        a,
        b,
    } = call(&node).await;
    let at_limit = format!("text/{}", "x".repeat(256 - 5));
    let rid = send_message(&mut alice, &a, &at_limit, Body::Text("hi".into())).await;
    // At the limit it is read, and refused as a type the call did not negotiate.
    assert_failed(&alice.recv().await, rid, &a, None, 415);
    let over = format!("{at_limit}x");
    let rid = send_message(&mut alice, &a, &over, Body::Text("hi".into())).await;
    match alice.recv().await {
        ServerMsg::Error { rid: r, code, .. } => assert_eq!((r, code), (rid, ErrorCode::BadFrame)),
        other => panic!("expected bad_frame, got {other:?}"),
    }
    // A toast's content type too.
    let reply = alice
        .request(ClientMsg::CallEstablish {
            rid: None,
            to: BOB.to_owned(),
            conversation: None,
            toast: Some(Toast {
                content_type: over,
                body: Body::Text("knock".into()),
            }),
            sdp: offer(),
        })
        .await;
    assert!(
        matches!(
            reply,
            ServerMsg::Error {
                code: ErrorCode::BadFrame,
                ..
            }
        ),
        "{reply:?}"
    );
    // The call still carries messages.
    let rid = say(&mut alice, &a, "ok").await;
    assert_eq!(bob.recv().await, received(&b, 1, ALICE, "ok"));
    ack(&mut bob, &b, 1).await;
    assert_eq!(alice.recv().await, delivered(rid, &a, 1));
}

#[tokio::test]
async fn toast_is_message_1_and_acking_it_is_allowed_and_ignored() {
    let node = start_node(|_| {});
    let Call {
        mut alice,
        mut bob,
        a,
        b,
    } = call_with(&node, offer(), Some("knock knock")).await;
    assert_eq!(
        bob.recv().await,
        ServerMsg::MessageReceived {
            call: b.clone(),
            msg: 1,
            from: ALICE.to_owned(),
            content_type: "text/plain".to_owned(),
            body: Body::Text("knock knock".to_owned()),
            toast: Some(true),
        }
    );
    ack(&mut bob, &b, 1).await;
    // The caller gets no message_delivered for the toast: its next frame is the answer to the
    // next message, which is msg 2.
    let rid = say(&mut alice, &a, "who's there").await;
    assert_eq!(bob.recv().await, received(&b, 2, ALICE, "who's there"));
    ack(&mut bob, &b, 2).await;
    assert_eq!(alice.recv().await, delivered(rid, &a, 2));
    // Bob's connection is fine after acking the toast.
    bob.send(&ClientMsg::Ping { rid: Some(1) }).await;
    assert_eq!(bob.recv().await, ServerMsg::Pong { rid: Some(1) });
}
