//! `confab_messages_total` in a cluster: each message is counted once, by the node of the
//! client that gets its answer. Its own test binary, because the metrics recorder is one per
//! process and the other cluster tests would count their messages into the same series.

use confab_cluster::Lose;
use confab_protocol::*;
use confab_tests::*;
use std::time::Duration;

const ALICE: &str = "sip:alice@example.com";
const BOB: &str = "sip:bob@example.com";

/// Every result of `confab_messages_total` in a `/metrics` text, summed.
fn messages_counted(text: &str) -> f64 {
    text.lines()
        .filter(|l| l.starts_with("confab_messages_total{"))
        .filter_map(|l| l.rsplit_once(' ')?.1.parse::<f64>().ok())
        .sum()
}

/// Bob sends a message (`rid`) on his leg `incoming`; Alice receives it on `call` and acks it.
async fn bob_says_and_alice_acks(
    bob: &mut Raw,
    incoming: &str,
    alice: &mut Raw,
    call: &str,
    rid: u32,
) {
    bob.send(&ClientMsg::Message {
        rid: Some(rid),
        call: incoming.to_owned(),
        content_type: "text/plain".into(),
        body: Body::Text(format!("message {rid}")),
    })
    .await;
    let (m, _) = alice
        .recv_until(|m| matches!(m, ServerMsg::MessageReceived { .. }))
        .await;
    let ServerMsg::MessageReceived { msg, .. } = m else {
        unreachable!()
    };
    alice
        .send(&ClientMsg::MessageAck {
            call: call.to_owned(),
            msg,
        })
        .await;
}

/// Bob on node B sends a message to Alice on node A, who acks it; the leg (on A) sends Bob its
/// `message_delivered`, which is lost on the way. Bob's node answers 408 when its deadline
/// passes. The message is counted once in the cluster: as that 408, where Bob got his answer,
/// not also as `delivered` on A. Then one delivered normally is counted once too.
#[tokio::test]
async fn a_message_whose_answer_is_lost_between_nodes_is_counted_once() {
    let nats = NatsServer::start();
    // Bob's node answers 408 after the ack timeout plus twice the node timeout (3.3 s here;
    // this binary runs only this test, so a node timeout shorter than the other cluster
    // tests' 2 s is safe).
    let tune = |s: &mut confab_actors::Settings| {
        s.flow.ack_timeout_ms = 300;
        if let Some(c) = s.cluster.as_mut() {
            c.node_timeout_ms = Some(1_500);
        }
    };
    let a = start_cluster_node(&nats, "node-a", tune);
    let b = start_cluster_node(&nats, "node-b", tune);
    let ops = a.metrics_addr.expect("test nodes serve metrics");
    let counted = || async { messages_counted(&http_get(ops, "/metrics").await.2) };
    let mut alice = Raw::sign_in(a.addr, ALICE, "laptop").await;
    let mut bob = Raw::sign_in(b.addr, BOB, "desk").await;
    wait_for_endpoints(&a, BOB, 1).await;
    let (call, _) = alice.establish(BOB, None).await;
    let (incoming, _) = bob.incoming().await;
    assert!(matches!(bob.accept(&incoming).await, ServerMsg::Ok { .. }));
    alice
        .recv_until(|m| matches!(m, ServerMsg::CallEstablished { .. }))
        .await;
    let before = counted().await;

    confab_cluster::lossy(&a)
        .expect("a lossy transport")
        .lose_next(Lose::MessageAnswer);
    bob_says_and_alice_acks(&mut bob, &incoming, &mut alice, &call, 1).await;
    let (m, _) = bob
        .recv_until_within(
            Duration::from_millis(300 + 2 * 1_500) + EVENT_TIMEOUT,
            |m| matches!(m, ServerMsg::MessageFailed { .. }),
        )
        .await;
    assert!(
        matches!(
            m,
            ServerMsg::MessageFailed {
                rid: Some(1),
                code: 408,
                ..
            }
        ),
        "{m:?}"
    );
    assert_eq!(counted().await - before, 1.0, "the message is counted once");

    bob_says_and_alice_acks(&mut bob, &incoming, &mut alice, &call, 2).await;
    let (m, _) = bob
        .recv_until(|m| matches!(m, ServerMsg::MessageDelivered { .. }))
        .await;
    assert!(
        matches!(m, ServerMsg::MessageDelivered { rid: Some(2), .. }),
        "{m:?}"
    );
    assert_eq!(
        counted().await - before,
        2.0,
        "each message is counted once"
    );
    drop((a, b, nats));
}
