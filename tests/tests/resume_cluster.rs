//! Resumable sessions across a cluster over a real NATS server (docs/protocol.md §3
//! "Resuming"): a session held on one node resumed on another, relayed through it
//! (`confab_actors::relay`), with every frame once; back and forth under random drops; and a
//! resume for a session whose node is gone, refused as such.

use confab_protocol::*;
use confab_tests::cut::CutProxy;
use confab_tests::resumable::{Resumable, Resumed, body_text, exchange_through_cuts, text};
use confab_tests::*;
use std::collections::HashMap;
use std::time::Duration;

const ALICE: &str = "sip:alice@example.com";
const BOB: &str = "sip:bob@example.com";

/// Alice (resumable, on node a through `proxy`) in a call from Bob (plain, on node b).
async fn cross_node_call(
    a: &confab_actors::RunningNode,
    b: &confab_actors::RunningNode,
    proxy: &CutProxy,
) -> (Resumable, String, Raw, String) {
    let mut alice = Resumable::sign_in(proxy.addr, ALICE, "phone").await;
    let mut bob = Raw::sign_in(b.addr, BOB, "desk").await;
    wait_for_endpoints(b, ALICE, 1).await;
    let _ = a;
    let (bc, _) = bob.establish(ALICE, None).await;
    let ac = loop {
        if let Some(ServerMsg::CallIncoming { call, .. }) = alice.recv().await {
            break call;
        }
    };
    alice.accept(&ac).await;
    bob.recv_until(|m| matches!(m, ServerMsg::CallEstablished { .. }))
        .await;
    (alice, ac, bob, bc)
}

/// A session held on node a resumes on node b: everything Bob sent meanwhile arrives once,
/// Alice's messages through b reach Bob once, each answered once; then back on a.
#[tokio::test]
async fn a_session_held_on_one_node_resumes_on_another() {
    let nats = NatsServer::start();
    let a = start_cluster_node(&nats, "node-a", |_| {});
    let b = start_cluster_node(&nats, "node-b", |_| {});
    let proxy = CutProxy::start(a.addr).await;
    let (mut alice, ac, mut bob, bc) = cross_node_call(&a, &b, &proxy).await;
    for n in 1..=3 {
        bob.send(&text(&bc, n)).await;
    }
    proxy.cut();
    let mut got = Vec::new();
    while let Some(m) = alice.recv().await {
        if let ServerMsg::MessageReceived { msg, body, .. } = m {
            got.push(body_text(&body));
            let call = ac.clone();
            alice.send(ClientMsg::MessageAck { call, msg }).await;
        }
    }
    for n in 4..=6 {
        bob.send(&text(&bc, n)).await;
    }
    // A forged token on node b is refused by node a, through b, and harms nothing.
    let real = std::mem::replace(&mut alice.resume_token, "Zm9yZ2Vk".to_owned());
    match alice.resume(b.addr).await {
        Resumed::Refused(ServerMsg::Error {
            code: ErrorCode::ResumeRefused,
            message,
            ..
        }) => assert_eq!(message, "unknown or expired session"),
        other => panic!("{other:?}"),
    }
    alice.resume_token = real;
    // On node b, where the session is not held.
    let Resumed::Ok(_) = alice.resume(b.addr).await else {
        panic!("the resume on node b was refused")
    };
    while got.len() < 6 {
        if let ServerMsg::MessageReceived { msg, body, .. } = alice.recv().await.expect("up") {
            got.push(body_text(&body));
            let call = ac.clone();
            alice.send(ClientMsg::MessageAck { call, msg }).await;
        }
    }
    assert_eq!(got, ["m1", "m2", "m3", "m4", "m5", "m6"]);
    // Alice talks through b; Bob's answers for 1 to 6 come meanwhile.
    alice.send(text(&ac, 100)).await;
    let (mut answered, mut acked) = (HashMap::new(), false);
    while answered.len() < 6 || !acked {
        match bob.recv().await {
            ServerMsg::MessageDelivered { rid: Some(r), .. } => {
                assert!(answered.insert(r, ()).is_none(), "{r} answered twice");
            }
            ServerMsg::MessageFailed { rid, code, .. } => panic!("{rid:?} failed {code}"),
            ServerMsg::MessageReceived { msg, body, .. } => {
                assert_eq!(body_text(&body), "m100");
                assert!(!acked, "m100 arrived twice");
                acked = true;
                bob.send(&ClientMsg::MessageAck {
                    call: bc.clone(),
                    msg,
                })
                .await;
            }
            _ => {}
        }
    }
    loop {
        match alice.recv().await.expect("up") {
            ServerMsg::MessageDelivered { rid: Some(100), .. } => break,
            ServerMsg::MessageFailed { code, text, .. } => panic!("{code} {text}"),
            _ => {}
        }
    }
    // And back home: a resume on node a takes the session from the relay.
    let Resumed::Ok(_) = alice.resume(a.addr).await else {
        panic!("the resume back on node a was refused")
    };
    let rid = alice.rid();
    alice.send(ClientMsg::Ping { rid }).await;
    assert!(matches!(alice.recv().await, Some(ServerMsg::Pong { .. })));
    bob.expect_silence(Duration::from_millis(100)).await;
}

/// Drops at random while messages flow both ways, each time resuming on the other node:
/// every message arrives once and in order, every send is answered once.
#[tokio::test]
async fn random_drops_resumed_on_alternate_nodes_lose_and_repeat_nothing() {
    const MESSAGES: u32 = 150;
    let nats = NatsServer::start();
    let a = start_cluster_node(&nats, "node-a", |_| {});
    let b = start_cluster_node(&nats, "node-b", |_| {});
    let proxy_a = CutProxy::start(a.addr).await;
    let proxy_b = CutProxy::start(b.addr).await;
    let (mut alice, ac, bob, bc) = cross_node_call(&a, &b, &proxy_a).await;
    let proxies = [&proxy_a, &proxy_b];
    let on = std::cell::Cell::new(0);
    let cuts = exchange_through_cuts(
        &mut alice,
        &ac,
        bob,
        &bc,
        MESSAGES,
        17,
        || proxies[on.get()].cut(),
        || {
            on.set(1 - on.get());
            proxies[on.get()].addr
        },
    )
    .await;
    assert!(cuts >= 4, "only {cuts} cuts");
}

/// A session whose node is gone (declared dead) cannot be resumed elsewhere: the resume is
/// refused with that reason, and the client signs in afresh.
#[tokio::test]
async fn a_resume_for_a_session_whose_node_is_gone_is_refused_as_such() {
    let nats = NatsServer::start();
    let a = start_cluster_node(&nats, "node-a", |_| {});
    let b = start_cluster_node(&nats, "node-b", |_| {});
    let proxy = CutProxy::start(a.addr).await;
    let mut alice = Resumable::sign_in(proxy.addr, ALICE, "phone").await;
    wait_for_endpoints(&b, ALICE, 1).await;
    proxy.cut();
    assert!(alice.recv().await.is_none());
    // Node a falls silent: b declares it dead and forgets its endpoints.
    confab_cluster::of(&a)
        .expect("a cluster node")
        .mute_heartbeats(Duration::from_secs(60));
    wait_for_endpoints(&b, ALICE, 0).await;
    match alice.resume(b.addr).await {
        Resumed::Refused(ServerMsg::Error {
            code: ErrorCode::ResumeRefused,
            message,
            ..
        }) => assert_eq!(message, "the node holding the session is gone"),
        other => panic!("{other:?}"),
    }
    let fresh = Resumable::sign_in(b.addr, ALICE, "phone").await;
    assert_ne!(fresh.endpoint, alice.endpoint);
}
