//! The cluster's contract on the in-memory transport and directory
//! (`confab_cluster::memory::MemoryNetwork`): no nats-server, each test in well under a
//! second. A forked call across two nodes answered by one click, a message across nodes
//! answered once, envelopes lost on the way (through the lossy transport) and sent again or
//! answered for, and an endpoint on a node that dies. The same contract over real NATS is in
//! `cluster.rs`; this file is its quick check.

use confab_actors::RunningNode;
use confab_cluster::Lose;
use confab_cluster::memory::MemoryNetwork;
use confab_protocol::*;
use confab_tests::*;
use std::time::Duration;

const ALICE: &str = "sip:alice@example.com";
const BOB: &str = "sip:bob@example.com";

/// The node timeout here: short, since nothing is slow in memory, so that what waits on it
/// (resends, a death) takes a fraction of a second.
const NODE_TIMEOUT_MS: u64 = 600;

struct Two {
    a: RunningNode,
    b: RunningNode,
}

/// Nodes A and B on one in-memory network.
fn two(tweak: impl Fn(&mut confab_actors::Settings) + Copy) -> Two {
    let network = MemoryNetwork::new();
    let tune = move |s: &mut confab_actors::Settings| {
        if let Some(c) = s.cluster.as_mut() {
            c.node_timeout_ms = Some(NODE_TIMEOUT_MS);
        }
        tweak(s);
    };
    Two {
        a: start_memory_node(&network, "node-a", tune),
        b: start_memory_node(&network, "node-b", tune),
    }
}

fn lossy(node: &RunningNode) -> std::sync::Arc<confab_cluster::transport::LossyTransport> {
    confab_cluster::lossy(node).expect("a lossy transport")
}

/// Alice on A, Bob on B; A's directory shows Bob and B's shows Alice.
async fn alice_on_a_bob_on_b(t: &Two) -> (Raw, Raw) {
    let alice = Raw::sign_in(t.a.addr, ALICE, "laptop").await;
    let bob = Raw::sign_in(t.b.addr, BOB, "desk").await;
    wait_for_endpoints(&t.a, BOB, 1).await;
    wait_for_endpoints(&t.b, ALICE, 1).await;
    (alice, bob)
}

/// Alice calls Bob, who accepts: the call's ids on both sides once both see it established.
async fn answered_call(alice: &mut Raw, bob: &mut Raw) -> (String, String) {
    let (call, _) = alice.establish(BOB, None).await;
    let (incoming, _) = bob.incoming().await;
    assert!(matches!(bob.accept(&incoming).await, ServerMsg::Ok { .. }));
    alice.state(&call, CallState::Established).await;
    bob.state(&incoming, CallState::Established).await;
    (call, incoming)
}

/// The next frame `raw` gets is the answer to a ping: nothing else was waiting for it.
async fn nothing_else_comes(raw: &mut Raw) {
    raw.send(&ClientMsg::Ping { rid: Some(99) }).await;
    assert_eq!(raw.recv().await, ServerMsg::Pong { rid: Some(99) });
}

#[tokio::test]
async fn a_call_forked_across_two_nodes_goes_to_the_first_click() {
    let t = two(|_| {});
    let mut alice = Raw::sign_in(t.a.addr, ALICE, "laptop").await;
    let mut desk = Raw::sign_in(t.b.addr, BOB, "desk").await;
    let mut phone = Raw::sign_in(t.a.addr, BOB, "phone").await;
    wait_for_endpoints(&t.a, BOB, 2).await;
    let (call, _) = alice.establish(BOB, Some("hi bob")).await;
    let (on_desk, _) = desk.incoming().await;
    let (on_phone, _) = phone.incoming().await;

    // The desk, on the other node, clicks first.
    assert!(matches!(desk.accept(&on_desk).await, ServerMsg::Ok { .. }));
    alice.state(&call, CallState::Established).await;
    desk.state(&on_desk, CallState::Established).await;
    let reason = phone.state(&on_phone, CallState::Terminated).await;
    assert_eq!(reason, Some(Reason::new(200, "Call completed elsewhere")));
    // The phone's late click finds the call taken.
    let rid = phone.rid();
    phone
        .send(&ClientMsg::CallAccept {
            rid,
            call: on_phone.clone(),
            sdp: answer(),
        })
        .await;
    let (m, _) = phone.recv_until(|m| reply_rid(m) == rid).await;
    assert!(matches!(m, ServerMsg::Error { .. }), "{m:?}");
}

#[tokio::test]
async fn a_message_across_nodes_is_answered_once() {
    let t = two(|_| {});
    let (mut alice, mut bob) = alice_on_a_bob_on_b(&t).await;
    let (call, incoming) = answered_call(&mut alice, &mut bob).await;
    send_and_ack(&mut alice, &call, &mut bob, &incoming, "hello bob").await;
    send_and_ack(&mut bob, &incoming, &mut alice, &call, "hello alice").await;
    nothing_else_comes(&mut alice).await;
    nothing_else_comes(&mut bob).await;
}

/// A's `call_state` for Bob's client (his leg lives on A) is lost on the way: A sends it
/// again, and Bob sees his call's states in order, each once.
#[tokio::test]
async fn a_state_event_lost_on_the_way_is_sent_again_in_order() {
    let t = two(|_| {});
    let (mut alice, mut bob) = alice_on_a_bob_on_b(&t).await;
    wait_for_acks_events(&t.a, "node-b").await;
    let (call, _) = alice.establish(BOB, None).await;
    let (incoming, _) = bob.incoming().await;
    lossy(&t.a).lose_next(Lose::CallState);
    assert!(matches!(bob.accept(&incoming).await, ServerMsg::Ok { .. }));
    let (last, mut frames) = bob
        .recv_until(|m| matches!(m, ServerMsg::CallState { call: c, state: CallState::Established, .. } if *c == incoming))
        .await;
    frames.push(last);
    assert_set_up_in_order(&frames);
    assert_eq!(lossy(&t.a).lose_pending(), 0, "the event was not lost");
    let a = confab_cluster::of(&t.a).expect("a cluster node");
    assert!(a.events_resent() > 0, "nothing was sent again");
    alice.state(&call, CallState::Established).await;
    let m = bob.recv().await;
    assert!(
        matches!(&m, ServerMsg::CallEstablished { call, .. } if *call == incoming),
        "{m:?}"
    );
    wait_for_state_events_acknowledged(&t.a).await;
    nothing_else_comes(&mut bob).await;
}

/// Bob's message to Alice is lost on the way: his own node answers it 408 (after the ack
/// timeout and twice the node timeout), once, and the call goes on.
#[tokio::test]
async fn a_message_lost_on_the_way_is_answered_by_the_senders_node() {
    let t = two(|s| s.flow.ack_timeout_ms = 200);
    let (mut alice, mut bob) = alice_on_a_bob_on_b(&t).await;
    let (call, incoming) = answered_call(&mut alice, &mut bob).await;
    lossy(&t.b).lose_bounded_envelopes(1);
    let rid = bob.rid();
    bob.send(&ClientMsg::Message {
        rid,
        call: incoming.clone(),
        content_type: "text/plain".into(),
        body: Body::Text("lost".into()),
    })
    .await;
    let (m, _) = bob.recv_until(|m| reply_rid(m) == rid).await;
    assert!(
        matches!(&m, ServerMsg::MessageFailed { code: 408, .. }),
        "{m:?}"
    );
    send_and_ack(&mut bob, &incoming, &mut alice, &call, "still here").await;
    nothing_else_comes(&mut bob).await;
}

/// A leg's end lost on the way is reported again until Bob's node releases the leg.
#[tokio::test]
async fn a_leg_end_lost_on_the_way_is_reported_again_until_released() {
    let t = two(|_| {});
    let (mut alice, mut bob) = alice_on_a_bob_on_b(&t).await;
    let (call, incoming) = answered_call(&mut alice, &mut bob).await;
    lossy(&t.a).lose_next(Lose::LegEnded);
    hang_up(&mut alice, &call, &mut bob, &incoming).await;
    wait_for_no_remote_legs(&t.a).await;
    assert_eq!(lossy(&t.a).lose_pending(), 0, "the leg's end was not lost");
}

/// Node B dies (falls silent): A declares it dead within the node timeout, Alice's call with
/// Bob ends "Node lost", and A's directory no longer lists Bob.
#[tokio::test]
async fn an_endpoint_on_a_node_that_dies_is_lost_to_the_others() {
    let t = two(|_| {});
    let (mut alice, mut bob) = alice_on_a_bob_on_b(&t).await;
    let (call, _) = answered_call(&mut alice, &mut bob).await;
    confab_cluster::of(&t.b)
        .expect("a cluster node")
        .mute_heartbeats(Duration::from_secs(60));
    let reason = alice.state(&call, CallState::Terminated).await;
    assert_eq!(reason, Some(Reason::new(503, "Node lost")));
    wait_for_endpoints(&t.a, BOB, 0).await;
}
