//! First end-to-end path: sign in, fork to two devices, click, message, ack, terminate.

use confab_protocol::*;
use confab_tests::*;

#[tokio::test]
async fn forked_call_first_click_wins_and_messages_flow() {
    let node = start_node(|_| {});
    let mut alice = Raw::sign_in(node.addr, "sip:alice@example.com", "laptop").await;
    let mut bob1 = Raw::sign_in(node.addr, "sip:bob@example.com", "desk").await;
    let mut bob2 = Raw::sign_in(node.addr, "sip:bob@example.com", "phone").await;
    let (call, _conv) = alice.establish("sip:bob@example.com", Some("hi bob")).await;
    let (c1, imm1) = bob1.incoming().await;
    let (c2, imm2) = bob2.incoming().await;
    assert!(!imm1 && !imm2);
    assert!(matches!(bob1.accept(&c1).await, ServerMsg::Ok { .. }));
    bob1.state(&c1, CallState::Established).await;
    let (toast, _) = bob1
        .recv_until(|m| matches!(m, ServerMsg::MessageReceived { .. }))
        .await;
    assert!(matches!(
        toast,
        ServerMsg::MessageReceived {
            msg: 1,
            toast: Some(true),
            ..
        }
    ));
    let reason = bob2.state(&c2, CallState::Terminated).await;
    assert_eq!(reason.map(|r| r.code), Some(200));
    alice.state(&call, CallState::Established).await;
    let rid = alice.rid();
    alice
        .send(&ClientMsg::Message {
            rid,
            call: call.clone(),
            content_type: "text/plain".into(),
            body: Body::Text("hello".into()),
        })
        .await;
    let (m, _) = bob1
        .recv_until(|m| matches!(m, ServerMsg::MessageReceived { .. }))
        .await;
    let ServerMsg::MessageReceived { msg, .. } = m else {
        unreachable!()
    };
    assert_eq!(msg, 2);
    bob1.send(&ClientMsg::MessageAck {
        call: c1.clone(),
        msg,
    })
    .await;
    let (d, _) = alice.recv_until(|m| reply_rid(m) == rid).await;
    assert!(
        matches!(d, ServerMsg::MessageDelivered { msg: 2, .. }),
        "{d:?}"
    );
    let ok = alice
        .request(ClientMsg::CallTerminate {
            rid: None,
            call: call.clone(),
        })
        .await;
    assert!(matches!(ok, ServerMsg::Ok { .. }));
    let r = bob1.state(&c1, CallState::Terminated).await;
    assert_eq!(r, Some(Reason::new(200, "Terminated remotely")));
    node.shutdown();
}
