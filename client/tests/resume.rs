//! The counting rules of a resumable session (docs/protocol.md §3 "Resuming") checked frame
//! by frame against a scripted fake node: what the resuming `hello` says it saw and sent
//! (every frame counts: one the library cannot decode, the node's `seen`, our `seen` sent with
//! each ping), which frames go again, the token carried from one resume to the next, and a
//! refusal ending it.

mod support;

use std::time::Duration;

use confab_client::{
    ClientError, Connection, ConnectionOptions, Events, Hello, Inbound, LinkEvent, Reconnect,
};
use confab_protocol::{ClientMsg, ErrorCode, ResumeAsk, ResumeGrant, ServerMsg};
use support::{FakeNode, Peer, QUIET_HEARTBEAT_MS, step};

fn grant(token: &str, seen: Option<u64>) -> Option<Box<ResumeGrant>> {
    Some(Box::new(ResumeGrant {
        token: token.to_owned(),
        window_ms: 10_000,
        max_unseen_frames: 1024,
        max_unseen_bytes: 1 << 22,
        seen,
    }))
}

fn welcome(resume: Option<Box<ResumeGrant>>) -> ServerMsg {
    ServerMsg::Welcome {
        rid: Some(0),
        endpoint: "ep-1".to_owned(),
        node: "node-test".to_owned(),
        heartbeat_ms: QUIET_HEARTBEAT_MS,
        max_frame: 65536,
        resume,
    }
}

/// Reads the resuming `hello` on a new connection; returns what it asks.
async fn resuming_hello(node: &FakeNode) -> (Peer, ResumeAsk) {
    let mut peer = node.accept().await;
    match peer.recv().await {
        ClientMsg::Hello {
            resume: Some(ask), ..
        } => (peer, *ask),
        other => panic!("expected a resuming hello, got {other:?}"),
    }
}

async fn next_link_event(events: &mut Events) -> LinkEvent {
    loop {
        match step("a link event", events.recv_inbound()).await {
            Some(Inbound::Link(link)) => return link,
            Some(Inbound::Frame(_)) => {}
            None => panic!("the events ended"),
        }
    }
}

fn composing(active: bool) -> ServerMsg {
    ServerMsg::RemoteComposing {
        call: "c-1".to_owned(),
        active,
    }
}

#[tokio::test]
async fn resumes_count_every_frame_both_ways_and_send_again_what_the_node_did_not_read() {
    let node = FakeNode::start().await;
    let options = ConnectionOptions {
        resume: Some(Reconnect {
            first_delay: Duration::from_millis(10),
            max_delay: Duration::from_millis(50),
        }),
        ..ConnectionOptions::default()
    };
    let connect = Connection::connect_with(
        node.addr(),
        Hello::new(support::ALICE, "tok", "laptop"),
        options,
    );
    let serve = async {
        let mut peer = node.accept().await;
        let hello = peer.recv().await;
        peer.send(welcome(grant("t1", None))).await;
        (hello, peer)
    };
    let (connected, (hello, mut peer)) = tokio::join!(connect, serve);
    let (connection, welcome_seen, mut events) = connected.expect("connects");
    assert!(
        matches!(&hello, ClientMsg::Hello { resume: Some(ask), .. } if **ask == ResumeAsk::default()),
        "asks with resume: {{}}: {hello:?}"
    );
    assert_eq!(welcome_seen.resume_window_ms, Some(10_000));

    // Ours: composing is 1, the seen that goes with every ping 2, the ping request 3. The
    // node reads them all, acknowledges only 1.
    connection
        .send(ClientMsg::Composing {
            call: "c-1".to_owned(),
            active: true,
        })
        .expect("queued");
    let ping = {
        let connection = connection.clone();
        tokio::spawn(async move { connection.request(ClientMsg::Ping { rid: None }).await })
    };
    assert!(matches!(peer.recv().await, ClientMsg::Composing { .. }));
    assert_eq!(peer.recv().await, ClientMsg::Seen { upto: 0 });
    let ClientMsg::Ping { rid } = peer.recv().await else {
        panic!("expected the ping")
    };
    // The node's: an event (1), a frame of a type this library does not know (2), seen (3),
    // another event (4). The client reads them all.
    peer.send(composing(true)).await;
    peer.send_raw(&unknown_type_frame()).await;
    peer.send(ServerMsg::Seen { upto: 1 }).await;
    peer.send(composing(false)).await;
    for active in [true, false] {
        match step("an event", events.recv()).await {
            Some(ServerMsg::RemoteComposing { active: a, .. }) => assert_eq!(a, active),
            other => panic!("expected remote_composing, got {other:?}"),
        }
    }

    // The link drops; the client comes back saying it read 4 and sent 3.
    peer.close();
    let (mut peer, ask) = resuming_hello(&node).await;
    assert_eq!(
        ask,
        ResumeAsk {
            endpoint: Some("ep-1".to_owned()),
            token: Some("t1".to_owned()),
            seen: 4,
            sent: 3,
        }
    );
    assert!(matches!(
        next_link_event(&mut events).await,
        LinkEvent::Reconnecting { .. }
    ));
    // The node had read up to 1: the seen and the ping go again, the ping with its rid, and
    // the ping is answered.
    peer.send(welcome(grant("t2", Some(1)))).await;
    assert_eq!(peer.recv().await, ClientMsg::Seen { upto: 0 });
    assert_eq!(peer.recv().await, ClientMsg::Ping { rid });
    assert_eq!(
        next_link_event(&mut events).await,
        LinkEvent::Resumed {
            attempts: 1,
            resent: 2
        }
    );
    peer.send(ServerMsg::Pong { rid }).await;
    let reply = step("the ping's reply", ping).await.expect("joined");
    assert!(matches!(reply, Ok(ServerMsg::Pong { .. })), "{reply:?}");
    assert_eq!(
        connection.unacknowledged(),
        2,
        "the seen and the ping are not acknowledged yet"
    );

    // Again: the new token, the pong counted (5), nothing more sent. A refusal ends it.
    peer.close();
    let (mut peer, ask) = resuming_hello(&node).await;
    assert_eq!(
        (ask.token.as_deref(), ask.seen, ask.sent),
        (Some("t2"), 5, 3)
    );
    peer.send(ServerMsg::error(
        Some(0),
        ErrorCode::ResumeRefused,
        "unknown or expired session",
    ))
    .await;
    peer.close();
    let _ = next_link_event(&mut events).await;
    match next_link_event(&mut events).await {
        LinkEvent::Lost { reason } => {
            assert!(reason.contains("unknown or expired session"), "{reason}")
        }
        other => panic!("expected lost, got {other:?}"),
    }
    assert!(step("the events to end", events.recv()).await.is_none());
    step("closed()", connection.closed()).await;
    assert!(matches!(
        connection.request(ClientMsg::Ping { rid: None }).await,
        Err(ClientError::Closed)
    ));
}

/// `{"type":"from_the_future"}`: a type a newer node could send.
fn unknown_type_frame() -> Vec<u8> {
    let body = [&[0x81, 0xa4][..], b"type", &[0xaf], b"from_the_future"].concat();
    let mut out = u32::try_from(body.len())
        .expect("small")
        .to_be_bytes()
        .to_vec();
    out.extend_from_slice(&body);
    out
}
