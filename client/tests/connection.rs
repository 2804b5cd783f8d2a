//! The low-level connection against a scripted fake node: the handshake, replies matched by
//! rid whatever their order, events in order, errors, heartbeat, and hostile input.

mod support;

use confab_client::{ClientError, Connection, Hello};
use confab_protocol::{ClientMsg, ErrorCode, ServerMsg};
use support::{FakeNode, QUIET_HEARTBEAT_MS, rid, step};

async fn connected(node: &FakeNode) -> (Connection, confab_client::Events, support::Peer) {
    let connect = Connection::connect(node.addr(), Hello::new(support::ALICE, "tok", "laptop"));
    let serve = async {
        let mut peer = node.accept().await;
        peer.welcome("ep-1", QUIET_HEARTBEAT_MS).await;
        peer
    };
    let (connected, peer) = tokio::join!(connect, serve);
    let (connection, _, events) = connected.expect("connects");
    (connection, events, peer)
}

#[tokio::test]
async fn hello_carries_the_parameters_and_welcome_is_returned() {
    let node = FakeNode::start().await;
    let connect = Connection::connect(node.addr(), Hello::new(support::ALICE, "tok", "laptop"));
    let serve = async {
        let mut peer = node.accept().await;
        let hello = peer.welcome("ep-7", QUIET_HEARTBEAT_MS).await;
        (hello, peer)
    };
    let (connected, (hello, _peer)) = tokio::join!(connect, serve);
    let (_connection, welcome, _events) = connected.expect("connects");
    assert_eq!(welcome.endpoint, "ep-7");
    assert_eq!(welcome.node, "node-test");
    assert_eq!(welcome.max_frame, 65536);
    match hello {
        ClientMsg::Hello {
            version,
            user,
            token,
            device,
            rid,
            ..
        } => {
            assert_eq!(version, 1);
            assert_eq!(user, support::ALICE);
            assert_eq!(token, "tok");
            assert_eq!(device, "laptop");
            assert!(rid.is_some());
        }
        other => panic!("expected hello, got {other:?}"),
    }
}

#[tokio::test]
async fn a_refused_hello_is_a_server_error() {
    let node = FakeNode::start().await;
    let connect = Connection::connect(node.addr(), Hello::new(support::ALICE, "bad", "laptop"));
    let serve = async {
        let mut peer = node.accept().await;
        let hello = peer.recv().await;
        peer.send(ServerMsg::error(
            rid(&hello),
            ErrorCode::Unauthorized,
            "bad token",
        ))
        .await;
        peer
    };
    let (connected, _peer) = tokio::join!(connect, serve);
    match connected {
        Err(ClientError::Server { code, .. }) => assert_eq!(code, ErrorCode::Unauthorized),
        other => panic!("expected unauthorized, got {other:?}"),
    }
}

#[tokio::test]
async fn replies_find_their_request_in_any_order() {
    let node = FakeNode::start().await;
    let (connection, _events, mut peer) = connected(&node).await;
    let first = connection.request(ClientMsg::Ping { rid: None });
    let second = connection.request(ClientMsg::SetStatus {
        rid: None,
        status: None,
    });
    let serve = async {
        let a = peer.recv().await;
        let b = peer.recv().await;
        assert_ne!(rid(&a), rid(&b));
        // Answered in reverse order.
        peer.send(ServerMsg::Ok { rid: rid(&b) }).await;
        peer.send(ServerMsg::Pong { rid: rid(&a) }).await;
    };
    let (first, second, ()) = tokio::join!(first, second, serve);
    assert!(matches!(first, Ok(ServerMsg::Pong { .. })), "{first:?}");
    assert!(matches!(second, Ok(ServerMsg::Ok { .. })), "{second:?}");
}

#[tokio::test]
async fn an_error_reply_is_a_server_error_and_the_connection_stays_usable() {
    let node = FakeNode::start().await;
    let (connection, _events, mut peer) = connected(&node).await;
    let request = connection.request(ClientMsg::CallTerminate {
        rid: None,
        call: "nope".to_owned(),
    });
    let serve = async {
        let msg = peer.recv().await;
        peer.send(ServerMsg::error(
            rid(&msg),
            ErrorCode::UnknownCall,
            "unknown call",
        ))
        .await;
    };
    let (reply, ()) = tokio::join!(request, serve);
    match reply {
        Err(ClientError::Server { code, message }) => {
            assert_eq!(code, ErrorCode::UnknownCall);
            assert_eq!(message, "unknown call");
        }
        other => panic!("expected a server error, got {other:?}"),
    }
    let ping = connection.request(ClientMsg::Ping { rid: None });
    let serve = async {
        let msg = peer.recv().await;
        peer.send(ServerMsg::Pong { rid: rid(&msg) }).await;
    };
    let (reply, ()) = tokio::join!(ping, serve);
    assert!(matches!(reply, Ok(ServerMsg::Pong { .. })));
}

#[tokio::test]
async fn events_arrive_in_order_after_the_reply_that_caused_them() {
    let node = FakeNode::start().await;
    let (connection, mut events, mut peer) = connected(&node).await;
    let request = connection.request(ClientMsg::Subscribe {
        rid: None,
        users: vec![support::BOB.to_owned()],
    });
    let serve = async {
        let msg = peer.recv().await;
        let presence = |availability| ServerMsg::Presence {
            user: support::BOB.to_owned(),
            availability,
            most_active: None,
            endpoints: None,
            status: None,
        };
        peer.send_all(vec![
            ServerMsg::Ok { rid: rid(&msg) },
            presence(confab_protocol::Availability::Available),
            presence(confab_protocol::Availability::Away),
        ])
        .await;
    };
    let (reply, ()) = tokio::join!(request, serve);
    assert!(matches!(reply, Ok(ServerMsg::Ok { .. })));
    for expected in [
        confab_protocol::Availability::Available,
        confab_protocol::Availability::Away,
    ] {
        match step("a presence event", events.recv()).await {
            Some(ServerMsg::Presence { availability, .. }) => assert_eq!(availability, expected),
            other => panic!("expected presence, got {other:?}"),
        }
    }
}

#[tokio::test]
async fn undecodable_frames_are_skipped_and_a_garbled_reply_fails_only_its_request() {
    let node = FakeNode::start().await;
    let (connection, mut events, mut peer) = connected(&node).await;
    let request = connection.request(ClientMsg::Ping { rid: None });
    let serve = async {
        let msg = peer.recv().await;
        let rid = rid(&msg).expect("rid");
        // A frame that is not a map, a map of an unknown type, and a `pong` whose rid is right
        // but whose other field has the wrong kind: none may crash the client.
        peer.send_raw(&[0, 0, 0, 1, 0x01]).await;
        peer.send_raw(&frame(&[("type", "from_the_future")], None))
            .await;
        peer.send_raw(&frame(
            &[("type", "welcome"), ("heartbeat_ms", "soon")],
            Some(rid),
        ))
        .await;
        peer.send(ServerMsg::CallRinging {
            call: "c1".to_owned(),
        })
        .await;
    };
    let (reply, ()) = tokio::join!(request, serve);
    assert!(matches!(reply, Err(ClientError::Protocol(_))), "{reply:?}");
    match step("the event after the garbage", events.recv()).await {
        Some(ServerMsg::CallRinging { call }) => assert_eq!(call, "c1"),
        other => panic!("expected call_ringing, got {other:?}"),
    }
    assert!(!connection.is_closed());
}

/// A hand-made MessagePack map frame of string fields (and an optional `rid`).
fn frame(fields: &[(&str, &str)], rid: Option<u32>) -> Vec<u8> {
    let count = fields.len() + usize::from(rid.is_some());
    let mut body = vec![0x80 | u8::try_from(count).expect("small map")];
    let put_str = |body: &mut Vec<u8>, s: &str| {
        body.push(0xa0 | u8::try_from(s.len()).expect("short string"));
        body.extend_from_slice(s.as_bytes());
    };
    for (k, v) in fields {
        put_str(&mut body, k);
        put_str(&mut body, v);
    }
    if let Some(rid) = rid {
        put_str(&mut body, "rid");
        body.push(0xce);
        body.extend_from_slice(&rid.to_be_bytes());
    }
    let mut out = u32::try_from(body.len())
        .expect("small")
        .to_be_bytes()
        .to_vec();
    out.extend_from_slice(&body);
    out
}

#[tokio::test]
async fn when_the_node_closes_waiters_fail_and_events_end() {
    let node = FakeNode::start().await;
    let (connection, mut events, mut peer) = connected(&node).await;
    let request = connection.request(ClientMsg::Ping { rid: None });
    let serve = async {
        peer.recv().await;
        peer.close();
    };
    let (reply, ()) = tokio::join!(request, serve);
    assert!(matches!(reply, Err(ClientError::Closed)), "{reply:?}");
    assert!(step("the events to end", events.recv()).await.is_none());
    step("closed()", connection.closed()).await;
    assert!(matches!(
        connection.request(ClientMsg::Ping { rid: None }).await,
        Err(ClientError::Closed)
    ));
}

#[tokio::test]
async fn messages_without_rid_cannot_be_requests() {
    let node = FakeNode::start().await;
    let (connection, _events, _peer) = connected(&node).await;
    let ack = ClientMsg::MessageAck {
        call: "c".to_owned(),
        msg: 1,
    };
    assert!(matches!(
        connection.request(ack).await,
        Err(ClientError::NotARequest("message_ack"))
    ));
}

#[tokio::test]
async fn a_frame_over_the_nodes_limit_is_refused_locally() {
    let node = FakeNode::start().await;
    let (connection, _events, mut peer) = connected(&node).await;
    let huge = ClientMsg::Message {
        rid: None,
        call: "c".to_owned(),
        content_type: "text/plain".to_owned(),
        body: confab_protocol::Body::Text("x".repeat(70_000)),
    };
    let refused = connection.request(huge).await;
    assert!(matches!(refused, Err(ClientError::Frame(_))), "{refused:?}");
    // The connection is intact: the next frame the node sees is the next request.
    let ping = connection.request(ClientMsg::Ping { rid: None });
    let serve = async {
        let msg = peer.recv().await;
        assert!(matches!(msg, ClientMsg::Ping { .. }), "{msg:?}");
        peer.send(ServerMsg::Pong { rid: rid(&msg) }).await;
    };
    let (reply, ()) = tokio::join!(ping, serve);
    assert!(reply.is_ok());
}

#[tokio::test]
async fn the_heartbeat_pings_every_period() {
    let node = FakeNode::start().await;
    let connect = Connection::connect(node.addr(), Hello::new(support::ALICE, "tok", "laptop"));
    let serve = async {
        let mut peer = node.accept().await;
        peer.welcome("ep-1", 20).await;
        peer
    };
    let (connected, mut peer) = tokio::join!(connect, serve);
    let (_connection, _, _events) = connected.expect("connects");
    for _ in 0..2 {
        let msg = peer.recv().await;
        assert!(matches!(msg, ClientMsg::Ping { rid: None }), "{msg:?}");
        peer.send(ServerMsg::Pong { rid: None }).await;
    }
}

#[tokio::test]
async fn a_silent_node_is_given_up_after_three_periods() {
    let node = FakeNode::start().await;
    let connect = Connection::connect(node.addr(), Hello::new(support::ALICE, "tok", "laptop"));
    let serve = async {
        let mut peer = node.accept().await;
        peer.welcome("ep-1", 20).await;
        peer
    };
    let (connected, mut peer) = tokio::join!(connect, serve);
    let (connection, _, _events) = connected.expect("connects");
    // The fake never pongs.
    peer.expect_eof().await;
    step("closed()", connection.closed()).await;
}
