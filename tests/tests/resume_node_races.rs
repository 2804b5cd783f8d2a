//! What the client library's tests found on the node's side of resumable sessions, each now a
//! rule of the node: a resume racing the old connection's end, and a resume whose welcome is
//! lost. Written with the raw resumable client of `confab_tests::resumable`, not the library.

use confab_protocol::*;
use confab_tests::resumable::{Resumable, Resumed};
use confab_tests::*;

/// A client that notices a drop before the node does resumes on a new connection while the
/// old one is still open; the old one then closes (`Resumable::resume` drops it right after
/// the welcome). The node must take that close as the end of a connection it already
/// dropped, not as the loss of the resumed one: the new connection must stay up.
#[tokio::test]
async fn the_old_connection_closing_after_a_resume_leaves_the_new_one_up() {
    let node = start_node(|_| {});
    let mut alice = Resumable::sign_in(node.addr, "sip:alice@example.com", "phone").await;
    for round in 0..100 {
        match alice.resume(node.addr).await {
            Resumed::Ok(_) => {}
            Resumed::Refused(answer) => panic!("round {round}: resume refused: {answer:?}"),
        }
        let rid = alice.rid();
        alice.send(ClientMsg::Ping { rid }).await;
        match alice.recv().await {
            Some(ServerMsg::Pong { .. }) => {}
            other => panic!("round {round}: the resumed connection ended: {other:?}"),
        }
    }
}

/// A resume the node takes back spends the client's token and sends a new one in the
/// `welcome`. When the link fails again before that welcome reaches the client (a second drop
/// during the reconnect, common on a flaky mobile link), the client holds only the spent
/// token: the node takes it again while nothing has been read from the connection that spent
/// it (docs/protocol.md §3, the refusals table).
#[tokio::test]
async fn a_resume_whose_welcome_was_lost_can_be_made_again_with_the_same_token() {
    let node = start_node(|_| {});
    let mut alice = Resumable::sign_in(node.addr, "sip:alice@example.com", "phone").await;
    // A resuming hello the node takes back, whose welcome the client never reads.
    let mut lost = confab_tests::wire::Wire::tcp(node.addr).await;
    lost.send(&ClientMsg::Hello {
        rid: Some(1),
        version: 1,
        user: alice.user.clone(),
        token: token(&alice.user),
        device: alice.device.clone(),
        agent: None,
        resume: Some(Box::new(ResumeAsk {
            endpoint: Some(alice.endpoint.clone()),
            token: Some(alice.resume_token.clone()),
            seen: alice.seen,
            sent: alice.sent,
        })),
    })
    .await
    .expect("send the resuming hello");
    // The node has taken the session back once it drops the old connection.
    assert!(
        alice.recv().await.is_none(),
        "the old connection is dropped"
    );
    drop(lost);
    match alice.resume(node.addr).await {
        Resumed::Ok(_) => {}
        Resumed::Refused(answer) => panic!("the session is lost: {answer:?}"),
    }
}
