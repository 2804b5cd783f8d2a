//! The UCMA-shaped API against a scripted fake node: placing, receiving, auto-accepting,
//! declining, transferring and terminating calls, the flow (delivery, acks, composing),
//! presence, and the endpoint's life.

mod support;

use confab_client::{
    AutoAcceptPolicy, CallEstablishOptions, ClientError, Conversation, DeliveryError, Endpoint,
    EndpointEvent, InstantMessagingCall, StateChange,
};
use confab_protocol::sdp;
use confab_protocol::{
    Availability, Body, CallState, ClientMsg, Direction, ErrorCode, Reason, Remote, ServerMsg,
    Toast,
};
use futures::StreamExt;
use support::{ALICE, BOB, FakeNode, Peer, rid, step};

const CAROL: &str = "sip:carol@example.com";
const CALL: &str = "call-1";
const CONV: &str = "conv-1";

fn state(
    direction: Direction,
    previous: CallState,
    state: CallState,
    reason: Option<(u16, &str)>,
) -> ServerMsg {
    ServerMsg::CallState {
        call: CALL.to_owned(),
        conversation: CONV.to_owned(),
        direction,
        state,
        previous,
        reason: reason.map(|(code, text)| Reason::new(code, text)),
    }
}

fn remote(user: &str) -> Remote {
    Remote {
        user: user.to_owned(),
        endpoint: format!("ep-{user}"),
    }
}

fn toast(text: &str) -> Toast {
    Toast {
        content_type: "text/plain".to_owned(),
        body: Body::from(text),
    }
}

fn change(previous: CallState, state: CallState, reason: Option<(u16, &str)>) -> StateChange {
    StateChange {
        previous,
        state,
        reason: reason.map(|(code, text)| Reason::new(code, text)),
    }
}

/// Plays the node's side of a successful outbound call; returns the offer the client sent.
async fn serve_establish(peer: &mut Peer) -> String {
    let msg = peer.recv_no_ping().await;
    let ClientMsg::CallEstablish {
        rid, sdp: offer, ..
    } = msg
    else {
        panic!("expected call_establish, got {msg:?}");
    };
    let answer = sdp::build_answer(&offer, &["text/plain"], None).expect("answerable offer");
    use CallState::*;
    // All in one write: the client must have registered the call from `call_created` before
    // it dispatches the `call_state` right behind it.
    peer.send_all(vec![
        ServerMsg::CallCreated {
            rid,
            call: CALL.to_owned(),
            conversation: CONV.to_owned(),
        },
        state(Direction::Outbound, Idle, Establishing, None),
        ServerMsg::CallRinging {
            call: CALL.to_owned(),
        },
        state(Direction::Outbound, Establishing, Establishing, None),
        ServerMsg::CallEstablished {
            call: CALL.to_owned(),
            sdp: answer,
            remote: remote(BOB),
        },
        state(Direction::Outbound, Establishing, Established, None),
    ])
    .await;
    offer
}

/// Alice with an established call to Bob.
async fn established_call(node: &FakeNode) -> (Endpoint, Peer, InstantMessagingCall) {
    let (alice, mut peer) = node.endpoint(ALICE, AutoAcceptPolicy::Accept).await;
    let conversation = Conversation::new(&alice);
    let establish =
        InstantMessagingCall::establish(&conversation, BOB, None, CallEstablishOptions::default());
    let (call, _) = tokio::join!(establish, serve_establish(&mut peer));
    (alice, peer, call.expect("established"))
}

#[tokio::test]
async fn establish_registers_the_call_and_follows_its_states() {
    let node = FakeNode::start().await;
    let (alice, mut peer) = node.endpoint(ALICE, AutoAcceptPolicy::Accept).await;
    let conversation = Conversation::new(&alice);
    let establish = InstantMessagingCall::establish(
        &conversation,
        BOB,
        Some(toast("hi")),
        CallEstablishOptions::default(),
    );
    let serve = async {
        let msg = peer.recv_no_ping().await;
        match &msg {
            ClientMsg::CallEstablish {
                to,
                conversation,
                toast: sent_toast,
                sdp: offer,
                ..
            } => {
                assert_eq!(to, BOB);
                assert_eq!(conversation, &None, "a new conversation names none");
                assert_eq!(sent_toast, &Some(toast("hi")));
                let media = sdp::offer_media(offer).expect("a valid offer");
                assert_eq!(media.accept_types, vec!["text/plain".to_owned()]);
            }
            other => panic!("expected call_establish, got {other:?}"),
        }
        // Replay the rest of the script with the same rid.
        let ClientMsg::CallEstablish {
            rid, sdp: offer, ..
        } = msg
        else {
            unreachable!("matched above");
        };
        let answer = sdp::build_answer(&offer, &["text/plain"], None).expect("answer");
        use CallState::*;
        peer.send_all(vec![
            ServerMsg::CallCreated {
                rid,
                call: CALL.to_owned(),
                conversation: CONV.to_owned(),
            },
            state(Direction::Outbound, Idle, Establishing, None),
            ServerMsg::CallRinging {
                call: CALL.to_owned(),
            },
            state(Direction::Outbound, Establishing, Establishing, None),
            ServerMsg::CallEstablished {
                call: CALL.to_owned(),
                sdp: answer,
                remote: remote(BOB),
            },
            state(Direction::Outbound, Establishing, Established, None),
        ])
        .await;
    };
    let (call, ()) = tokio::join!(establish, serve);
    let call = call.expect("established");
    assert_eq!(call.id(), CALL);
    assert_eq!(call.state(), CallState::Established);
    assert_eq!(call.direction(), Direction::Outbound);
    assert_eq!(conversation.id(), Some(CONV));
    assert_eq!(call.conversation_id(), CONV);
    assert_eq!(call.remote(), Some(remote(BOB)));
    let negotiated = call.flow().negotiated().expect("negotiated");
    assert_eq!(negotiated.accept_types, vec!["text/plain".to_owned()]);
    let changes: Vec<StateChange> = call.state_changes().take(3).collect().await;
    use CallState::*;
    assert_eq!(
        changes,
        vec![
            change(Idle, Establishing, None),
            change(Establishing, Establishing, None),
            change(Establishing, Established, None),
        ]
    );
    assert_eq!(alice.calls().len(), 1);
}

#[tokio::test]
async fn a_call_that_ends_while_establishing_reports_the_reason() {
    let node = FakeNode::start().await;
    let (alice, mut peer) = node.endpoint(ALICE, AutoAcceptPolicy::Accept).await;
    let begin = InstantMessagingCall::begin_establish(
        &Conversation::new(&alice),
        BOB,
        None,
        CallEstablishOptions::default(),
    );
    let serve = async {
        let msg = peer.recv_no_ping().await;
        use CallState::*;
        let unavailable = Some((480, "Temporarily Unavailable"));
        peer.send_all(vec![
            ServerMsg::CallCreated {
                rid: rid(&msg),
                call: CALL.to_owned(),
                conversation: CONV.to_owned(),
            },
            state(Direction::Outbound, Idle, Establishing, None),
            state(Direction::Outbound, Establishing, Terminating, unavailable),
            state(Direction::Outbound, Terminating, Terminated, unavailable),
        ])
        .await;
    };
    let (call, ()) = tokio::join!(begin, serve);
    let call = call.expect("created");
    match step("the outcome", call.established()).await {
        Err(ClientError::CallEnded(reason)) => assert_eq!(reason.code, 480),
        other => panic!("expected the call to end with 480, got {other:?}"),
    }
    let reason = step("terminated", call.terminated())
        .await
        .expect("terminated");
    assert_eq!(reason, Reason::new(480, "Temporarily Unavailable"));
    assert!(
        alice.calls().is_empty(),
        "terminated calls leave the endpoint"
    );
}

#[tokio::test]
async fn a_second_call_in_a_conversation_names_it() {
    let node = FakeNode::start().await;
    let (alice, mut peer, call) = established_call(&node).await;
    let conversation = call.conversation();
    let second = InstantMessagingCall::begin_establish(
        &conversation,
        CAROL,
        None,
        CallEstablishOptions::default(),
    );
    let serve = async {
        let msg = peer.recv_no_ping().await;
        let ClientMsg::CallEstablish {
            rid, conversation, ..
        } = msg
        else {
            panic!("expected call_establish, got {msg:?}");
        };
        assert_eq!(conversation.as_deref(), Some(CONV));
        peer.send(ServerMsg::CallCreated {
            rid,
            call: "call-2".to_owned(),
            conversation: CONV.to_owned(),
        })
        .await;
    };
    let (second, ()) = tokio::join!(second, serve);
    let second = second.expect("created");
    assert_eq!(second.id(), "call-2");
    assert_eq!(second.state(), CallState::Idle);
    assert_eq!(conversation.calls().len(), 2);

    let terminate = conversation.terminate();
    let serve = async {
        let msg = peer.recv_no_ping().await;
        assert!(
            matches!(&msg, ClientMsg::ConversationTerminate { conversation, .. } if conversation == CONV),
            "{msg:?}"
        );
        peer.send(ServerMsg::Ok { rid: rid(&msg) }).await;
    };
    let (result, ()) = tokio::join!(terminate, serve);
    result.expect("terminated");
    drop(alice);
}

#[tokio::test]
async fn send_returns_the_delivery_outcome_whatever_the_order_of_answers() {
    let node = FakeNode::start().await;
    let (_alice, mut peer, call) = established_call(&node).await;
    let flow = call.flow();
    let first = flow.send_text("hello");
    let second = flow.send("application/json", Body::from("{}"));
    let serve = async {
        let a = peer.recv_no_ping().await;
        let b = peer.recv_no_ping().await;
        match &a {
            ClientMsg::Message {
                call,
                content_type,
                body,
                ..
            } => {
                assert_eq!(call, CALL);
                assert_eq!(content_type, "text/plain");
                assert_eq!(body, &Body::from("hello"));
            }
            other => panic!("expected message, got {other:?}"),
        }
        match &b {
            ClientMsg::Message { body, .. } => {
                assert_eq!(
                    body,
                    &Body::Binary(b"{}".to_vec()),
                    "non-text types go as bin"
                );
            }
            other => panic!("expected message, got {other:?}"),
        }
        // The second is refused at once; the first is delivered later, with an event between.
        peer.send_all(vec![
            ServerMsg::MessageFailed {
                rid: rid(&b),
                call: CALL.to_owned(),
                msg: None,
                code: 415,
                text: "Unsupported Media Type".to_owned(),
            },
            ServerMsg::RemoteComposing {
                call: CALL.to_owned(),
                active: true,
            },
            ServerMsg::MessageDelivered {
                rid: rid(&a),
                call: CALL.to_owned(),
                msg: 2,
            },
        ])
        .await;
    };
    let (first, second, ()) = tokio::join!(first, second, serve);
    assert_eq!(first.expect("delivered"), 2);
    match second {
        Err(DeliveryError::Failed { code, msg, .. }) => {
            assert_eq!(code, 415);
            assert_eq!(msg, None);
        }
        other => panic!("expected 415, got {other:?}"),
    }
}

#[tokio::test]
async fn received_messages_are_acked_and_delivered_in_order() {
    let node = FakeNode::start().await;
    let (_alice, mut peer, call) = established_call(&node).await;
    let received = |msg: u32, text: &str| ServerMsg::MessageReceived {
        call: CALL.to_owned(),
        msg,
        from: BOB.to_owned(),
        content_type: "text/plain".to_owned(),
        body: Body::from(text),
        toast: None,
    };
    peer.send_all(vec![received(2, "one"), received(3, "two")])
        .await;
    for msg in [2, 3] {
        assert_eq!(
            peer.recv_no_ping().await,
            ClientMsg::MessageAck {
                call: CALL.to_owned(),
                msg
            }
        );
    }
    let mut messages = call.flow().received();
    let one = step("message 2", messages.recv()).await.expect("message");
    let two = step("message 3", messages.recv()).await.expect("message");
    assert_eq!(
        (one.msg, one.body, one.toast),
        (2, Body::from("one"), false)
    );
    assert_eq!((two.msg, two.from.as_str()), (3, BOB));
}

#[tokio::test]
async fn composing_goes_out_and_remote_composing_comes_in() {
    let node = FakeNode::start().await;
    let (_alice, mut peer, call) = established_call(&node).await;
    let flow = call.flow();
    flow.set_composing(true).expect("sent");
    flow.set_composing(false).expect("sent");
    for active in [true, false] {
        assert_eq!(
            peer.recv_no_ping().await,
            ClientMsg::Composing {
                call: CALL.to_owned(),
                active
            }
        );
    }
    let mut remote = flow.remote_composing();
    assert!(!*remote.borrow_and_update());
    peer.send(ServerMsg::RemoteComposing {
        call: CALL.to_owned(),
        active: true,
    })
    .await;
    step("remote composing", remote.changed())
        .await
        .expect("changed");
    assert!(*remote.borrow_and_update());
}

#[tokio::test]
async fn an_immediate_auto_accept_call_is_accepted_by_the_library() {
    let node = FakeNode::start().await;
    let (bob, mut peer) = node.endpoint(BOB, AutoAcceptPolicy::Accept).await;
    let mut incoming = bob.incoming_calls();
    let offer = sdp::build_offer(&["text/plain", "text/html"], None);
    peer.send(ServerMsg::CallIncoming {
        call: CALL.to_owned(),
        conversation: CONV.to_owned(),
        from: ALICE.to_owned(),
        toast: Some(toast("lunch?")),
        sdp: offer.clone(),
        immediate_auto_accept: true,
    })
    .await;
    // Nobody touched the call: the library accepts it on its own.
    let msg = peer.recv_no_ping().await;
    let ClientMsg::CallAccept {
        rid,
        call,
        sdp: answer,
    } = msg
    else {
        panic!("expected call_accept, got {msg:?}");
    };
    assert_eq!(call, CALL);
    let negotiated = sdp::negotiate(&offer, &answer).expect("a valid answer");
    assert_eq!(negotiated.accept_types, vec!["text/plain".to_owned()]);
    use CallState::*;
    peer.send_all(vec![
        ServerMsg::Ok { rid },
        state(Direction::Inbound, Incoming, Establishing, None),
        ServerMsg::CallEstablished {
            call: CALL.to_owned(),
            sdp: offer,
            remote: remote(ALICE),
        },
        state(Direction::Inbound, Establishing, Established, None),
        ServerMsg::MessageReceived {
            call: CALL.to_owned(),
            msg: 1,
            from: ALICE.to_owned(),
            content_type: "text/plain".to_owned(),
            body: Body::from("lunch?"),
            toast: Some(true),
        },
    ])
    .await;
    let call = step("the incoming call", incoming.recv())
        .await
        .expect("a call");
    assert!(call.is_immediate_auto_accept_needed());
    assert_eq!(call.peer(), ALICE);
    assert_eq!(call.toast(), Some(&toast("lunch?")));
    step("established", call.established())
        .await
        .expect("established");
    assert_eq!(call.remote(), Some(remote(ALICE)));
    assert_eq!(
        peer.recv_no_ping().await,
        ClientMsg::MessageAck {
            call: CALL.to_owned(),
            msg: 1
        }
    );
    let first = step("the toast", call.flow().received().recv())
        .await
        .expect("toast");
    assert!(first.toast);
    assert_eq!(first.body, Body::from("lunch?"));
    // An accept by the application now waits for the library's instead of sending another.
    step("a second accept", call.accept())
        .await
        .expect("already accepted");
}

#[tokio::test]
async fn auto_accept_needed_makes_the_library_accept() {
    let node = FakeNode::start().await;
    let (bob, mut peer) = node.endpoint(BOB, AutoAcceptPolicy::Accept).await;
    let mut incoming = bob.incoming_calls();
    let offer = sdp::build_offer(&["text/plain"], None);
    peer.send(ServerMsg::CallIncoming {
        call: CALL.to_owned(),
        conversation: CONV.to_owned(),
        from: ALICE.to_owned(),
        toast: None,
        sdp: offer,
        immediate_auto_accept: false,
    })
    .await;
    let call = step("the incoming call", incoming.recv())
        .await
        .expect("a call");
    assert!(!call.is_immediate_auto_accept_needed());
    assert_eq!(call.state(), CallState::Incoming);
    // A forked call waits for a click: the next frame is this request, not an accept.
    let status = bob.set_status(None);
    let serve = async {
        let msg = peer.recv_no_ping().await;
        assert!(matches!(msg, ClientMsg::SetStatus { .. }), "{msg:?}");
        peer.send(ServerMsg::Ok { rid: rid(&msg) }).await;
    };
    let (status, ()) = tokio::join!(status, serve);
    status.expect("ok");

    peer.send(ServerMsg::AutoAcceptNeeded {
        call: CALL.to_owned(),
    })
    .await;
    let msg = peer.recv_no_ping().await;
    assert!(
        matches!(&msg, ClientMsg::CallAccept { call, .. } if call == CALL),
        "{msg:?}"
    );
    assert!(step("the flag", call.auto_accept_needed()).await);
}

#[tokio::test]
async fn with_the_notify_policy_the_application_decides() {
    let node = FakeNode::start().await;
    let (bob, mut peer) = node.endpoint(BOB, AutoAcceptPolicy::Notify).await;
    let mut incoming = bob.incoming_calls();
    peer.send_all(vec![
        ServerMsg::CallIncoming {
            call: CALL.to_owned(),
            conversation: CONV.to_owned(),
            from: ALICE.to_owned(),
            toast: None,
            sdp: sdp::build_offer(&["text/plain"], None),
            immediate_auto_accept: true,
        },
        ServerMsg::AutoAcceptNeeded {
            call: CALL.to_owned(),
        },
    ])
    .await;
    let call = step("the incoming call", incoming.recv())
        .await
        .expect("a call");
    assert!(call.is_immediate_auto_accept_needed());
    assert!(step("the flag", call.auto_accept_needed()).await);
    // The first frame the node sees is the application's decline, not an accept.
    let decline = call.decline(Some(603));
    let serve = async {
        let msg = peer.recv_no_ping().await;
        let ClientMsg::CallDecline { rid, call, code } = msg else {
            panic!("expected call_decline, got {msg:?}");
        };
        assert_eq!((call.as_str(), code), (CALL, Some(603)));
        let declined = Some((603, "Decline"));
        use CallState::*;
        peer.send_all(vec![
            ServerMsg::Ok { rid },
            state(Direction::Inbound, Incoming, Terminating, declined),
            state(Direction::Inbound, Terminating, Terminated, declined),
        ])
        .await;
    };
    let (declined, ()) = tokio::join!(decline, serve);
    declined.expect("ok");
    let reason = step("terminated", call.terminated())
        .await
        .expect("terminated");
    assert_eq!(reason.code, 603);
}

#[tokio::test]
async fn a_refused_accept_is_a_server_error() {
    let node = FakeNode::start().await;
    let (bob, mut peer) = node.endpoint(BOB, AutoAcceptPolicy::Notify).await;
    let mut incoming = bob.incoming_calls();
    peer.send(ServerMsg::CallIncoming {
        call: CALL.to_owned(),
        conversation: CONV.to_owned(),
        from: ALICE.to_owned(),
        toast: None,
        sdp: sdp::build_offer(&["text/plain"], None),
        immediate_auto_accept: false,
    })
    .await;
    let call = step("the incoming call", incoming.recv())
        .await
        .expect("a call");
    let accept = call.accept();
    let serve = async {
        let msg = peer.recv_no_ping().await;
        assert!(matches!(msg, ClientMsg::CallAccept { .. }), "{msg:?}");
        peer.send(ServerMsg::error(
            rid(&msg),
            ErrorCode::AnsweredElsewhere,
            "answered elsewhere",
        ))
        .await;
    };
    let (accepted, ()) = tokio::join!(accept, serve);
    assert_eq!(
        accepted.err().and_then(|e| e.server_code()),
        Some(ErrorCode::AnsweredElsewhere)
    );
}

#[tokio::test]
async fn forward_sends_the_target() {
    let node = FakeNode::start().await;
    let (bob, mut peer) = node.endpoint(BOB, AutoAcceptPolicy::Notify).await;
    let mut incoming = bob.incoming_calls();
    peer.send(ServerMsg::CallIncoming {
        call: CALL.to_owned(),
        conversation: CONV.to_owned(),
        from: ALICE.to_owned(),
        toast: None,
        sdp: sdp::build_offer(&["text/plain"], None),
        immediate_auto_accept: false,
    })
    .await;
    let call = step("the incoming call", incoming.recv())
        .await
        .expect("a call");
    let forward = call.forward(CAROL);
    let serve = async {
        let msg = peer.recv_no_ping().await;
        assert!(
            matches!(&msg, ClientMsg::CallForward { call, to, .. } if call == CALL && to == CAROL),
            "{msg:?}"
        );
        peer.send(ServerMsg::Ok { rid: rid(&msg) }).await;
    };
    let (forwarded, ()) = tokio::join!(forward, serve);
    forwarded.expect("ok");
}

#[tokio::test]
async fn the_caller_sees_a_forward() {
    let node = FakeNode::start().await;
    let (alice, mut peer) = node.endpoint(ALICE, AutoAcceptPolicy::Accept).await;
    let begin = InstantMessagingCall::begin_establish(
        &Conversation::new(&alice),
        BOB,
        None,
        CallEstablishOptions::default(),
    );
    let serve = async {
        let msg = peer.recv_no_ping().await;
        use CallState::*;
        peer.send_all(vec![
            ServerMsg::CallCreated {
                rid: rid(&msg),
                call: CALL.to_owned(),
                conversation: CONV.to_owned(),
            },
            state(Direction::Outbound, Idle, Establishing, None),
            ServerMsg::CallForwarded {
                call: CALL.to_owned(),
                to: CAROL.to_owned(),
            },
        ])
        .await;
    };
    let (call, ()) = tokio::join!(begin, serve);
    let call = call.expect("created");
    let mut watch = call.watch();
    let snapshot = step("the forward", watch.wait_for(|s| s.forwarded_to.is_some()))
        .await
        .expect("snapshot")
        .clone();
    assert_eq!(snapshot.forwarded_to.as_deref(), Some(CAROL));
    assert_eq!(snapshot.state, CallState::Establishing);
}

#[tokio::test]
async fn transfer_reports_success_and_failure() {
    let node = FakeNode::start().await;
    let (_alice, mut peer, call) = established_call(&node).await;
    use CallState::*;

    let transfer = call.transfer(CAROL);
    let serve = async {
        let msg = peer.recv_no_ping().await;
        assert!(
            matches!(&msg, ClientMsg::CallTransfer { to, .. } if to == CAROL),
            "{msg:?}"
        );
        peer.send_all(vec![
            ServerMsg::Ok { rid: rid(&msg) },
            state(Direction::Outbound, Established, Transferring, None),
            state(
                Direction::Outbound,
                Transferring,
                Established,
                Some((486, "Busy Here")),
            ),
        ])
        .await;
    };
    let (failed, ()) = tokio::join!(transfer, serve);
    match failed {
        Err(ClientError::TransferFailed(reason)) => assert_eq!(reason.code, 486),
        other => panic!("expected a failed transfer, got {other:?}"),
    }
    assert_eq!(call.state(), Established);

    let transfer = call.transfer(CAROL);
    let serve = async {
        let msg = peer.recv_no_ping().await;
        let transferred = Some((202, "Transferred"));
        peer.send_all(vec![
            ServerMsg::Ok { rid: rid(&msg) },
            state(Direction::Outbound, Established, Transferring, None),
            state(Direction::Outbound, Transferring, Terminating, transferred),
            state(Direction::Outbound, Terminating, Terminated, transferred),
        ])
        .await;
    };
    let (succeeded, ()) = tokio::join!(transfer, serve);
    succeeded.expect("transferred");
    step("terminated", call.terminated())
        .await
        .expect("terminated");
}

#[tokio::test]
async fn terminate_waits_for_terminated_and_ends_the_streams() {
    let node = FakeNode::start().await;
    let (alice, mut peer, call) = established_call(&node).await;
    let mut messages = call.flow().received();
    let terminate = call.terminate();
    let serve = async {
        let msg = peer.recv_no_ping().await;
        assert!(
            matches!(&msg, ClientMsg::CallTerminate { call, .. } if call == CALL),
            "{msg:?}"
        );
        let local = Some((200, "Terminated locally"));
        use CallState::*;
        peer.send_all(vec![
            ServerMsg::Ok { rid: rid(&msg) },
            state(Direction::Outbound, Established, Terminating, local),
            state(Direction::Outbound, Terminating, Terminated, local),
        ])
        .await;
    };
    let (terminated, ()) = tokio::join!(terminate, serve);
    terminated.expect("terminated");
    assert_eq!(call.state(), CallState::Terminated);
    assert!(step("messages end", messages.recv()).await.is_none());
    let changes: Vec<StateChange> = step("changes end", call.state_changes().collect()).await;
    assert_eq!(changes.len(), 5);
    assert!(alice.calls().is_empty());
    // Terminating a terminated call asks nothing of the node.
    call.terminate().await.expect("no-op");
}

#[tokio::test]
async fn an_unexpected_transition_is_followed_not_invented() {
    let node = FakeNode::start().await;
    let (_alice, mut peer, call) = established_call(&node).await;
    let mut watch = call.watch();
    use CallState::*;
    // `previous` does not match what the client tracked (established): the node is the
    // authority, so the client follows it rather than keep a state the node no longer has.
    peer.send(state(
        Direction::Outbound,
        Transferring,
        Terminating,
        Some((200, "x")),
    ))
    .await;
    let snapshot = step("the new state", watch.wait_for(|s| s.state == Terminating))
        .await
        .expect("snapshot")
        .clone();
    assert_eq!(snapshot.reason.map(|r| r.code), Some(200));
}

#[tokio::test]
async fn presence_updates_reach_the_subscribing_stream() {
    let node = FakeNode::start().await;
    let (alice, mut peer) = node.endpoint(ALICE, AutoAcceptPolicy::Accept).await;
    let subscribe = alice.subscribe(["sip:bob@EXAMPLE.com"]);
    let serve = async {
        let msg = peer.recv_no_ping().await;
        let ClientMsg::Subscribe { rid, users } = msg else {
            panic!("expected subscribe, got {msg:?}");
        };
        assert_eq!(users, vec!["sip:bob@EXAMPLE.com".to_owned()]);
        // The node echoes the normalised URI; the update follows the `ok` at once.
        peer.send_all(vec![
            ServerMsg::Ok { rid },
            ServerMsg::Presence {
                user: BOB.to_owned(),
                availability: Availability::Away,
                most_active: None,
                endpoints: None,
                status: None,
            },
        ])
        .await;
    };
    let (stream, ()) = tokio::join!(subscribe, serve);
    let mut stream = stream.expect("subscribed");
    let update = step("presence", stream.recv()).await.expect("an update");
    assert_eq!(update.user, BOB);
    assert_eq!(update.availability, Availability::Away);

    let unsubscribe = alice.unsubscribe([BOB]);
    let serve = async {
        let msg = peer.recv_no_ping().await;
        assert!(matches!(msg, ClientMsg::Unsubscribe { .. }), "{msg:?}");
        peer.send(ServerMsg::Ok { rid: rid(&msg) }).await;
    };
    let (unsubscribed, ()) = tokio::join!(unsubscribe, serve);
    unsubscribed.expect("ok");
    assert!(step("the stream to end", stream.recv()).await.is_none());
}

#[tokio::test]
async fn device_state_and_status_are_requests() {
    let node = FakeNode::start().await;
    let (alice, mut peer) = node.endpoint(ALICE, AutoAcceptPolicy::Accept).await;
    let publish = alice.publish_device_state(confab_client::Activity::Inactive, 1500);
    let serve = async {
        let msg = peer.recv_no_ping().await;
        assert!(
            matches!(
                msg,
                ClientMsg::DeviceState {
                    activity: confab_client::Activity::Inactive,
                    idle_ms: Some(1500),
                    ..
                }
            ),
            "{msg:?}"
        );
        peer.send(ServerMsg::Ok { rid: rid(&msg) }).await;
    };
    let (published, ()) = tokio::join!(publish, serve);
    published.expect("ok");
    let status = alice.set_status(Some(confab_client::Status::Busy));
    let serve = async {
        let msg = peer.recv_no_ping().await;
        assert!(
            matches!(
                msg,
                ClientMsg::SetStatus {
                    status: Some(confab_client::Status::Busy),
                    ..
                }
            ),
            "{msg:?}"
        );
        peer.send(ServerMsg::error(
            rid(&msg),
            ErrorCode::RateLimited,
            "slow down",
        ))
        .await;
    };
    let (status, ()) = tokio::join!(status, serve);
    assert_eq!(
        status.err().and_then(|e| e.server_code()),
        Some(ErrorCode::RateLimited)
    );
}

#[tokio::test]
async fn bye_returns_after_the_calls_have_ended_and_the_node_closed() {
    let node = FakeNode::start().await;
    let (alice, mut peer, call) = established_call(&node).await;
    let bye = alice.bye();
    let serve = async {
        let msg = peer.recv_no_ping().await;
        assert!(matches!(msg, ClientMsg::Bye { .. }), "{msg:?}");
        let local = Some((200, "Terminated locally"));
        use CallState::*;
        peer.send_all(vec![
            ServerMsg::Ok { rid: rid(&msg) },
            state(Direction::Outbound, Established, Terminating, local),
            state(Direction::Outbound, Terminating, Terminated, local),
        ])
        .await;
        peer.close();
    };
    let (bye, ()) = tokio::join!(bye, serve);
    bye.expect("clean bye");
    assert_eq!(call.state(), CallState::Terminated);
    assert!(alice.is_closed());
}

#[tokio::test]
async fn losing_the_connection_wakes_every_waiter() {
    let node = FakeNode::start().await;
    let (alice, peer, call) = established_call(&node).await;
    let mut incoming = alice.incoming_calls();
    let mut events = alice.events();
    peer.close();
    assert!(matches!(
        step("terminated", call.terminated()).await,
        Err(ClientError::Closed)
    ));
    assert!(call.snapshot().connection_lost);
    assert!(step("incoming to end", incoming.recv()).await.is_none());
    assert!(step("events to end", events.recv()).await.is_none());
    step("closed", alice.closed()).await;
    assert!(matches!(
        call.flow().send_text("anyone?").await,
        Err(DeliveryError::Client(ClientError::Closed))
    ));
}

#[tokio::test]
async fn shutdown_and_stray_errors_are_endpoint_events() {
    let node = FakeNode::start().await;
    let (alice, mut peer) = node.endpoint(ALICE, AutoAcceptPolicy::Accept).await;
    let mut events = alice.events();
    peer.send_all(vec![
        ServerMsg::error(None, ErrorCode::BadFrame, "bad ack"),
        ServerMsg::Shutdown {
            reason: "maintenance".to_owned(),
            reconnect_after_ms: 1000,
        },
    ])
    .await;
    assert_eq!(
        step("an error", events.recv()).await,
        Some(EndpointEvent::Error {
            code: ErrorCode::BadFrame,
            message: "bad ack".to_owned()
        })
    );
    assert_eq!(
        step("the shutdown", events.recv()).await,
        Some(EndpointEvent::Shutdown {
            reason: "maintenance".to_owned(),
            reconnect_after_ms: 1000
        })
    );
}

#[tokio::test]
async fn dropping_every_handle_closes_the_connection() {
    let node = FakeNode::start().await;
    let (alice, mut peer, call) = established_call(&node).await;
    drop(alice);
    // A call handle keeps the endpoint alive ...
    assert!(!call.endpoint().is_closed());
    // ... and the last handle going closes the connection.
    drop(call);
    peer.expect_eof().await;
}
