//! Resumable sessions (docs/protocol.md §3 "Resuming") over real sockets, with the link failed
//! for real by a relay between client and node ([`CutProxy`]): a closed link, a black-holed
//! one only the heartbeat notices, mid-message, mid-ringing and mid-transfer; each frame seen
//! exactly once and each request answered exactly once; every refusal with its reason.

use confab_protocol::*;
use confab_tests::cut::CutProxy;
use confab_tests::resumable::{Resumable, Resumed, body_text, exchange_through_cuts, text};
use confab_tests::*;
use std::collections::HashMap;
use std::time::Duration;

const ALICE: &str = "sip:alice@example.com";
const BOB: &str = "sip:bob@example.com";
const CAROL: &str = "sip:carol@example.com";

/// Bob (a plain session) calls Alice (resumable, through `proxy`); both see the call
/// established. Returns (alice, alice's call, bob, bob's call).
async fn call_to_resumable(
    node: &confab_actors::RunningNode,
    proxy: &CutProxy,
) -> (Resumable, String, Raw, String) {
    let mut alice = Resumable::sign_in(proxy.addr, ALICE, "phone").await;
    let mut bob = Raw::sign_in(node.addr, BOB, "desk").await;
    let (b, _) = bob.establish(ALICE, None).await;
    let a = loop {
        if let Some(ServerMsg::CallIncoming { call, .. }) = alice.recv().await {
            break call;
        }
    };
    alice.accept(&a).await;
    bob.recv_until(|m| matches!(m, ServerMsg::CallEstablished { .. }))
        .await;
    (alice, a, bob, b)
}

/// Reads Alice's frames, acking each message and adding its body to `got`, until she has `n`
/// in all, or (`n` None) until her link ends.
async fn take_messages(alice: &mut Resumable, call: &str, got: &mut Vec<String>, n: Option<usize>) {
    while n.is_none_or(|n| got.len() < n) {
        let Some(msg) = alice.recv().await else {
            assert!(n.is_none(), "the resumed link ended");
            return;
        };
        if let ServerMsg::MessageReceived { msg, body, .. } = msg {
            got.push(body_text(&body));
            let call = call.to_owned();
            alice.send(ClientMsg::MessageAck { call, msg }).await;
        }
    }
}

/// Reads Alice's frames until the link ends, acking each message; returns the bodies.
async fn read_until_cut(alice: &mut Resumable, call: &str) -> Vec<String> {
    let mut got = Vec::new();
    take_messages(alice, call, &mut got, None).await;
    got
}

/// Reads Alice's messages until she has `n` in all, acking each.
async fn read_messages(alice: &mut Resumable, call: &str, got: &mut Vec<String>, n: usize) {
    take_messages(alice, call, got, Some(n)).await;
}

/// Bob's answers, by rid, until each of `rids` has one; panics on a second answer.
async fn answers(bob: &mut Raw, rids: std::ops::RangeInclusive<u32>) -> HashMap<u32, ServerMsg> {
    let mut got = HashMap::new();
    while got.len() < rids.clone().count() {
        let m = bob.recv().await;
        let rid = match &m {
            ServerMsg::MessageDelivered { rid, .. } | ServerMsg::MessageFailed { rid, .. } => *rid,
            _ => None,
        };
        if let Some(rid) = rid.filter(|r| rids.contains(r)) {
            assert!(got.insert(rid, m).is_none(), "message {rid} answered twice");
        }
    }
    got
}

#[tokio::test]
async fn a_cut_link_resumes_with_every_message_once_and_every_send_answered() {
    let node = start_node(|_| {});
    let proxy = CutProxy::start(node.addr).await;
    let (mut alice, a, mut bob, b) = call_to_resumable(&node, &proxy).await;
    for n in 1..=3 {
        bob.send(&text(&b, n)).await;
    }
    // Alice reads the first message, then the link fails with the rest in flight.
    let mut got = Vec::new();
    read_messages(&mut alice, &a, &mut got, 1).await;
    proxy.cut();
    got.extend(read_until_cut(&mut alice, &a).await);
    // While she is away, more messages come for her.
    for n in 4..=6 {
        bob.send(&text(&b, n)).await;
    }
    assert!(matches!(alice.resume(proxy.addr).await, Resumed::Ok(_)));
    read_messages(&mut alice, &a, &mut got, 6).await;
    assert_eq!(got, ["m1", "m2", "m3", "m4", "m5", "m6"]);
    let answered = answers(&mut bob, 1..=6).await;
    for (rid, m) in answered {
        assert!(
            matches!(m, ServerMsg::MessageDelivered { .. }),
            "message {rid}: {m:?}"
        );
    }
    // Nothing more comes: no frame twice.
    let rid = alice.rid();
    alice.send(ClientMsg::Ping { rid }).await;
    assert!(matches!(alice.recv().await, Some(ServerMsg::Pong { .. })));
}

/// What Alice sent into a link that failed is sent again on the resume and carried out once:
/// each of her messages reaches Bob once and gets one answer.
#[tokio::test]
async fn frames_sent_into_a_dead_link_are_sent_again_and_carried_out_once() {
    let node = start_node(|_| {});
    let proxy = CutProxy::start(node.addr).await;
    let (mut alice, a, mut bob, _b) = call_to_resumable(&node, &proxy).await;
    proxy.cut();
    for n in 1..=5 {
        alice.send(text(&a, n)).await;
    }
    assert!(alice.recv().await.is_none(), "the link is cut");
    let Resumed::Ok(node_read) = alice.resume(proxy.addr).await else {
        panic!("resume refused")
    };
    assert!(alice.sent >= 5 && node_read <= alice.sent);
    let mut bodies = Vec::new();
    while bodies.len() < 5 {
        if let ServerMsg::MessageReceived {
            msg, body, call, ..
        } = bob.recv().await
        {
            bodies.push(body_text(&body));
            bob.send(&ClientMsg::MessageAck { call, msg }).await;
        }
    }
    assert_eq!(bodies, ["m1", "m2", "m3", "m4", "m5"]);
    let mut answered = HashMap::new();
    while answered.len() < 5 {
        match alice.recv().await.expect("link up") {
            ServerMsg::MessageDelivered { rid: Some(r), .. } => {
                assert!(answered.insert(r, ()).is_none(), "answered twice");
            }
            ServerMsg::MessageFailed { rid, code, .. } => panic!("{rid:?} failed {code}"),
            _ => {}
        }
    }
    bob.expect_silence(Duration::from_millis(100)).await;
}

/// A link that goes silent without closing (a dead mobile link) is noticed by the heartbeat,
/// and the session is held, not ended: the operator sees it `held`, the other party nothing.
#[tokio::test]
async fn a_black_holed_link_is_held_after_the_heartbeat_and_resumes() {
    let admin = AdminToken::new();
    let node = start_node(|s| {
        s.server.heartbeat_ms = 100;
        admin.configure(s);
    });
    let proxy = CutProxy::start(node.addr).await;
    let (mut alice, a, mut bob, b) = call_to_resumable(&node, &proxy).await;
    proxy.black_hole();
    // The node notices within 3 to 4 heartbeats: no event reaches a client, so ask the admin
    // API until the session shows as held (Bob pings meanwhile, or he would be dropped too).
    while !has_state(&node, &admin, &alice.endpoint, "held").await {
        bob.ping().await;
    }
    bob.send(&text(&b, 1)).await;
    assert!(matches!(alice.resume(node.addr).await, Resumed::Ok(_)));
    let mut got = Vec::new();
    read_messages(&mut alice, &a, &mut got, 1).await;
    assert_eq!(got, ["m1"]);
    assert!(has_state(&node, &admin, &alice.endpoint, "active").await);
    let answered = answers(&mut bob, 1..=1).await;
    assert!(matches!(answered[&1], ServerMsg::MessageDelivered { .. }));
    bob.expect_silence(Duration::from_millis(100)).await;
}

/// Whether the admin API lists `endpoint` in `state` now.
async fn has_state(
    node: &confab_actors::RunningNode,
    admin: &AdminToken,
    endpoint: &str,
    state: &str,
) -> bool {
    let ops = node.metrics_addr.expect("an operations port");
    let auth = format!("Bearer {}", admin.token);
    let (status, _, body) = http_request(
        ops,
        "GET",
        "/admin/sessions",
        &[("Authorization", auth.as_str())],
        None,
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).expect("JSON");
    v["sessions"]
        .as_array()
        .and_then(|l| l.iter().find(|x| x["endpoint"] == endpoint))
        .is_some_and(|x| x["state"] == state)
}

/// A call that arrives while the link is down rings on: after the resume the toast is there,
/// once, and the device accepts it; Bob's other device hears "completed elsewhere".
#[tokio::test]
async fn a_call_that_rings_while_the_link_is_down_is_accepted_after_the_resume() {
    let node = start_node(|s| s.fork.toast_timeout_ms = 10_000);
    let proxy = CutProxy::start(node.addr).await;
    let mut phone = Resumable::sign_in(proxy.addr, BOB, "phone").await;
    let mut desk = Raw::sign_in(node.addr, BOB, "desk").await;
    let mut alice = Raw::sign_in(node.addr, ALICE, "laptop").await;
    proxy.cut();
    assert!(phone.recv().await.is_none());
    let (a, _) = alice.establish(BOB, Some("hi")).await;
    let (d, _) = desk.incoming().await;
    assert!(matches!(phone.resume(proxy.addr).await, Resumed::Ok(_)));
    let call = loop {
        if let ServerMsg::CallIncoming { call, .. } = phone.recv().await.expect("link up") {
            break call;
        }
    };
    phone.accept(&call).await;
    alice
        .recv_until(|m| matches!(m, ServerMsg::CallEstablished { call, .. } if *call == a))
        .await;
    let reason = desk.state(&d, CallState::Terminated).await;
    assert_eq!(reason.map(|r| r.code), Some(200), "completed elsewhere");
}

/// A transfer that happens while the transferee's link is down reaches it on the resume: it
/// hears `call_transferred` once and talks to the new party.
#[tokio::test]
async fn a_transfer_made_while_the_link_is_down_reaches_the_resumed_device() {
    let node = start_node(|_| {});
    let proxy = CutProxy::start(node.addr).await;
    let (mut alice, a, mut bob, b) = call_to_resumable(&node, &proxy).await;
    let mut carol = Raw::sign_in(node.addr, CAROL, "desk").await;
    proxy.cut();
    assert!(alice.recv().await.is_none());
    let rid = bob.rid();
    bob.send(&ClientMsg::CallTransfer {
        rid,
        call: b.clone(),
        to: CAROL.to_owned(),
    })
    .await;
    let (c, _) = carol.incoming().await;
    assert!(matches!(carol.accept(&c).await, ServerMsg::Ok { .. }));
    assert!(matches!(alice.resume(proxy.addr).await, Resumed::Ok(_)));
    let mut transferred = 0;
    while transferred == 0 {
        if let ServerMsg::CallTransferred { remote, .. } = alice.recv().await.expect("link up") {
            assert_eq!(remote.user, CAROL);
            transferred += 1;
        }
    }
    // Alice now talks to Carol on the same call.
    alice.send(text(&a, 7)).await;
    let (r, _) = carol
        .recv_until(|m| matches!(m, ServerMsg::MessageReceived { .. }))
        .await;
    let ServerMsg::MessageReceived { body, .. } = r else {
        unreachable!()
    };
    assert_eq!(body_text(&body), "m7");
}

/// A client that resumes while the node still holds its old connection open (it noticed the
/// drop first): the old connection is dropped, the new one carries on, nothing is lost.
#[tokio::test]
async fn a_resume_while_the_old_connection_is_open_takes_over_from_it() {
    let node = start_node(|_| {});
    let (mut alice, a, mut bob, b) = {
        let proxy = CutProxy::start(node.addr).await;
        let r = call_to_resumable(&node, &proxy).await;
        // Only the client side is gone: the node's socket to the proxy stays open.
        proxy.black_hole();
        std::mem::forget(proxy);
        r
    };
    for n in 1..=3 {
        bob.send(&text(&b, n)).await;
    }
    assert!(matches!(alice.resume(node.addr).await, Resumed::Ok(_)));
    let mut got = Vec::new();
    read_messages(&mut alice, &a, &mut got, 3).await;
    assert_eq!(got, ["m1", "m2", "m3"]);
    let answered = answers(&mut bob, 1..=3).await;
    assert!(
        answered
            .values()
            .all(|m| matches!(m, ServerMsg::MessageDelivered { .. }))
    );
}

/// The reason of a refused resume.
fn refusal(r: Resumed) -> String {
    match r {
        Resumed::Refused(ServerMsg::Error {
            code: ErrorCode::ResumeRefused,
            message,
            ..
        }) => message,
        other => panic!("expected resume_refused, got {other:?}"),
    }
}

/// Every way a resume can be wrong is refused with its reason, and none of them harms the held
/// session: the right resume still works afterwards.
#[tokio::test]
async fn bad_resumes_are_refused_with_their_reason_and_harm_nothing() {
    let node = start_node(|_| {});
    let proxy = CutProxy::start(node.addr).await;
    let (mut alice, a, mut bob, b) = call_to_resumable(&node, &proxy).await;
    bob.send(&text(&b, 1)).await;
    let mut got = Vec::new();
    read_messages(&mut alice, &a, &mut got, 1).await;
    proxy.cut();
    while alice.recv().await.is_some() {}

    // A forged token.
    let real = std::mem::replace(&mut alice.resume_token, "Zm9yZ2Vk".to_owned());
    assert_eq!(
        refusal(alice.resume(node.addr).await),
        "unknown or expired session"
    );
    alice.resume_token = real.clone();
    // Another user's JWT with the right token: the same answer, nothing said of the session.
    let user = std::mem::replace(&mut alice.user, CAROL.to_owned());
    assert_eq!(
        refusal(alice.resume(node.addr).await),
        "unknown or expired session"
    );
    alice.user = user;
    // A "last seen" from the future.
    let seen = alice.seen;
    assert_eq!(
        refusal(alice.resume_with(node.addr, seen + 5).await),
        "seen is ahead of the frames the node sent"
    );
    // Fewer frames sent than the node read.
    let sent = std::mem::replace(&mut alice.sent, 0);
    assert_eq!(
        refusal(alice.resume(node.addr).await),
        "sent is behind the frames the node read"
    );
    alice.sent = sent;
    // An endpoint that does not exist.
    let endpoint = std::mem::replace(&mut alice.endpoint, "node-x.0.e1".to_owned());
    assert_eq!(
        refusal(alice.resume(node.addr).await),
        "unknown or expired session"
    );
    alice.endpoint = endpoint;

    // The right resume still works, and takes what came meanwhile.
    bob.send(&text(&b, 2)).await;
    assert!(matches!(alice.resume(node.addr).await, Resumed::Ok(_)));
    read_messages(&mut alice, &a, &mut got, 2).await;
    assert_eq!(got, ["m1", "m2"]);
    // The spent token is refused as such.
    let fresh = std::mem::replace(&mut alice.resume_token, real);
    assert_eq!(
        refusal(alice.resume(node.addr).await),
        "the session was already resumed with this token"
    );
    alice.resume_token = fresh;
}

/// A window that passes ends the session as a lost connection: the other party sees 408, a
/// message waiting for the device gets its one answer, and a late resume is told why.
#[tokio::test]
async fn a_window_that_passes_ends_the_session_as_lost() {
    let node = start_node(|s| s.session.resume_window_ms = 300);
    let proxy = CutProxy::start(node.addr).await;
    let (mut alice, _a, mut bob, b) = call_to_resumable(&node, &proxy).await;
    proxy.cut();
    assert!(alice.recv().await.is_none());
    bob.send(&text(&b, 1)).await;
    let (mut ended, mut failed) = (None, 0);
    while ended.is_none() || failed == 0 {
        match bob.recv().await {
            ServerMsg::CallState {
                state: CallState::Terminated,
                reason,
                ..
            } => ended = reason.map(|r| r.code),
            ServerMsg::MessageFailed { rid: Some(1), .. } => failed += 1,
            ServerMsg::MessageDelivered { .. } => panic!("delivered to a gone device"),
            _ => {}
        }
    }
    assert_eq!(ended, Some(408));
    bob.expect_silence(Duration::from_millis(100)).await;
    assert_eq!(
        refusal(alice.resume(node.addr).await),
        "the resume window is over"
    );
}

/// `seen` acknowledges the node's frames: the node forgets them (so a resume cannot go back
/// before them), answers a count from the future with an error, and a session that did not
/// ask for resuming refuses `seen`.
#[tokio::test]
async fn seen_is_checked_and_only_resumable_sessions_take_it() {
    let node = start_node(|_| {});
    let mut plain = Raw::sign_in(node.addr, CAROL, "desk").await;
    plain.send(&ClientMsg::Seen { upto: 1 }).await;
    match plain.recv().await {
        ServerMsg::Error { code, .. } => assert_eq!(code, ErrorCode::InvalidState),
        other => panic!("{other:?}"),
    }
    let mut alice = Resumable::sign_in(node.addr, ALICE, "phone").await;
    let rid = alice.rid();
    alice.send(ClientMsg::Ping { rid }).await;
    assert!(matches!(alice.recv().await, Some(ServerMsg::Pong { .. })));
    // pong (1) and seen (2) were sent; 3 is ahead.
    alice.send(ClientMsg::Seen { upto: 3 }).await;
    match alice.recv().await {
        Some(ServerMsg::Error { code, .. }) => assert_eq!(code, ErrorCode::BadFrame),
        other => panic!("{other:?}"),
    }
    // Frames 1 to 3 acknowledged; a ping makes sure the node has read it.
    alice.ack().await;
    let rid = alice.rid();
    alice.send(ClientMsg::Ping { rid }).await;
    assert!(matches!(alice.recv().await, Some(ServerMsg::Pong { .. })));
    assert_eq!(
        refusal(alice.resume_with(node.addr, 1).await),
        "seen is behind what the client acknowledged; those frames are gone"
    );
}

/// Hundreds of drops at random moments while messages flow both ways: every message arrives
/// exactly once and in order, every send gets exactly one answer, all delivered.
#[tokio::test]
async fn hundreds_of_random_drops_lose_and_repeat_nothing() {
    const MESSAGES: u32 = 400;
    let node = start_node(|_| {});
    let proxy = CutProxy::start(node.addr).await;
    let (mut alice, a, bob, b) = call_to_resumable(&node, &proxy).await;
    let cuts = exchange_through_cuts(
        &mut alice,
        &a,
        bob,
        &b,
        MESSAGES,
        23,
        || proxy.cut(),
        || proxy.addr,
    )
    .await;
    assert!(cuts >= 10, "only {cuts} cuts");
}
