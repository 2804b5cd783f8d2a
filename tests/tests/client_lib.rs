//! The Rust client library (`confab-client`) against a real node over TCP: establishing with a
//! toast and the immediate auto-accept, a forked call won by a click, delivery outcomes,
//! presence streams, a blind transfer, and the library's call states checked frame by frame
//! against the `call_state` events the node actually sent (recorded by a proxy in between).
#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use confab_client::protocol::{Body, ErrorCode, ServerMsg, decode_server};
use confab_client::{
    Activity, AutoAcceptPolicy, Availability, CallEstablishOptions, CallState, ClientError,
    Conversation, DeliveryError, Endpoint, EndpointOptions, Hello, InstantMessagingCall, Reason,
    StateChange, Toast,
};
use confab_tests::legs::{quiet_node, text_toast};
use confab_tests::token;
use futures::StreamExt;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const ALICE: &str = "sip:alice@example.com";
const BOB: &str = "sip:bob@example.com";
const CAROL: &str = "sip:carol@example.com";
const NOBODY: &str = "sip:nobody@example.com";

/// Upper bound on any single wait; a safety net, never a pacing device.
const WAIT: Duration = Duration::from_secs(10);

async fn within<T>(what: &str, fut: impl Future<Output = T>) -> T {
    tokio::time::timeout(WAIT, fut)
        .await
        .unwrap_or_else(|_| panic!("timed out waiting for {what}"))
}

/// A node whose toast timer never fires within a test.
async fn sign_in(addr: SocketAddr, user: &str, device: &str, policy: AutoAcceptPolicy) -> Endpoint {
    let options = EndpointOptions {
        auto_accept: policy,
        ..EndpointOptions::default()
    };
    within(
        "sign-in",
        Endpoint::connect_with(addr, Hello::new(user, token(user), device), options),
    )
    .await
    .unwrap()
}

fn change(previous: CallState, state: CallState, reason: Option<(u16, &str)>) -> StateChange {
    StateChange {
        previous,
        state,
        reason: reason.map(|(code, text)| Reason::new(code, text)),
    }
}

/// Every state change of `call` up to `terminated`.
async fn all_changes(call: &InstantMessagingCall) -> Vec<StateChange> {
    within("the call's end", call.state_changes().collect()).await
}

async fn next_call(calls: &mut confab_client::IncomingCalls) -> InstantMessagingCall {
    within("call_incoming", calls.recv()).await.unwrap()
}

#[tokio::test]
async fn establish_with_a_toast_is_accepted_at_once_by_the_only_device() {
    let node = quiet_node();
    let alice = sign_in(node.addr, ALICE, "laptop", AutoAcceptPolicy::Accept).await;
    let bob = sign_in(node.addr, BOB, "phone", AutoAcceptPolicy::Accept).await;
    let mut ringing = bob.incoming_calls();

    let conversation = Conversation::new(&alice);
    let call = within(
        "establish",
        InstantMessagingCall::establish(
            &conversation,
            BOB,
            Some(text_toast("lunch?")),
            CallEstablishOptions::default(),
        ),
    )
    .await
    .unwrap();
    assert_eq!(call.state(), CallState::Established);
    assert_eq!(conversation.id(), Some(call.conversation_id()));

    let inbound = next_call(&mut ringing).await;
    assert!(inbound.is_immediate_auto_accept_needed());
    assert_eq!(inbound.peer(), ALICE);
    assert_eq!(inbound.toast(), Some(&text_toast("lunch?")));
    within("bob established", inbound.established())
        .await
        .unwrap();
    let mut received = inbound.flow().received();
    let first = within("the toast", received.recv()).await.unwrap();
    assert!(first.toast);
    assert_eq!((first.msg, first.from.as_str()), (1, ALICE));
    assert_eq!(first.body, Body::from("lunch?"));

    let remote = within("remote", call.watch().wait_for(|s| s.remote.is_some()))
        .await
        .unwrap()
        .remote
        .clone()
        .unwrap();
    assert_eq!(
        (remote.user.as_str(), remote.endpoint.as_str()),
        (BOB, bob.id())
    );

    call.terminate().await.unwrap();
    assert_eq!(
        all_changes(&call).await,
        vec![
            change(CallState::Idle, CallState::Establishing, None),
            change(CallState::Establishing, CallState::Establishing, None),
            change(CallState::Establishing, CallState::Established, None),
            change(
                CallState::Established,
                CallState::Terminating,
                Some((200, "Terminated locally"))
            ),
            change(
                CallState::Terminating,
                CallState::Terminated,
                Some((200, "Terminated locally"))
            ),
        ]
    );
    let reason = within("bob's end", inbound.terminated()).await.unwrap();
    assert_eq!(reason, Reason::new(200, "Terminated remotely"));
    alice.bye().await.unwrap();
    bob.bye().await.unwrap();
}

#[tokio::test]
async fn a_click_wins_a_forked_call_and_the_other_fork_ends_completed_elsewhere() {
    let node = quiet_node();
    let alice = sign_in(node.addr, ALICE, "laptop", AutoAcceptPolicy::Accept).await;
    let desk = sign_in(node.addr, BOB, "desk", AutoAcceptPolicy::Notify).await;
    let phone = sign_in(node.addr, BOB, "phone", AutoAcceptPolicy::Notify).await;
    let (mut desk_calls, mut phone_calls) = (desk.incoming_calls(), phone.incoming_calls());

    let placing = tokio::spawn(InstantMessagingCall::establish(
        &Conversation::new(&alice),
        BOB,
        Some(text_toast("are you there?")),
        CallEstablishOptions::default(),
    ));
    let on_desk = next_call(&mut desk_calls).await;
    let on_phone = next_call(&mut phone_calls).await;
    for fork in [&on_desk, &on_phone] {
        assert!(!fork.is_immediate_auto_accept_needed());
        assert_eq!(fork.state(), CallState::Incoming);
        assert_eq!(fork.toast(), Some(&text_toast("are you there?")));
    }

    // Notify: the library accepted nothing by itself; the user clicks on the desk.
    within("accept", on_desk.accept()).await.unwrap();
    let call = within("alice established", placing).await.unwrap().unwrap();
    assert_eq!(call.state(), CallState::Established);

    let reason = within("the phone's fork ends", on_phone.terminated())
        .await
        .unwrap();
    assert_eq!(reason, Reason::new(200, "Call completed elsewhere"));
    assert_eq!(
        all_changes(&on_phone).await,
        vec![
            change(
                CallState::Incoming,
                CallState::Terminating,
                Some((200, "Call completed elsewhere"))
            ),
            change(
                CallState::Terminating,
                CallState::Terminated,
                Some((200, "Call completed elsewhere"))
            ),
        ]
    );
    assert!(phone.calls().is_empty(), "the ended fork is forgotten");
    let late = on_phone.accept().await.unwrap_err();
    assert!(
        matches!(
            late,
            ClientError::Server {
                code: ErrorCode::AnsweredElsewhere,
                ..
            }
        ),
        "a late click: {late:?}"
    );

    // Only the winner got the toast as its first message.
    let toast_msg = within("toast", on_desk.flow().received().recv())
        .await
        .unwrap();
    assert!(toast_msg.toast);
    call.terminate().await.unwrap();
    for endpoint in [alice, desk, phone] {
        endpoint.bye().await.unwrap();
    }
}

#[tokio::test]
async fn send_returns_the_msg_number_on_delivery_and_481_once_the_remote_hung_up() {
    let node = quiet_node();
    let alice = sign_in(node.addr, ALICE, "laptop", AutoAcceptPolicy::Accept).await;
    let bob = sign_in(node.addr, BOB, "phone", AutoAcceptPolicy::Accept).await;
    let mut ringing = bob.incoming_calls();
    let call = within(
        "establish",
        InstantMessagingCall::establish(
            &Conversation::new(&alice),
            BOB,
            Some(text_toast("hi")),
            CallEstablishOptions::default(),
        ),
    )
    .await
    .unwrap();
    let inbound = next_call(&mut ringing).await;
    within("bob established", inbound.established())
        .await
        .unwrap();
    let mut received = inbound.flow().received();

    // The toast was msg 1, so the first message is 2, and the counter is shared by both legs.
    let msg = within("delivery", call.flow().send_text("one"))
        .await
        .unwrap();
    assert_eq!(msg, 2);
    let reply = within("delivery", inbound.flow().send_text("two"))
        .await
        .unwrap();
    assert_eq!(reply, 3);
    let toast_msg = within("toast", received.recv()).await.unwrap();
    let one = within("one", received.recv()).await.unwrap();
    assert_eq!((toast_msg.msg, one.msg), (1, 2));
    assert_eq!(one.body, Body::from("one"));
    let got = within("two", call.flow().received().recv()).await.unwrap();
    assert_eq!((got.msg, got.from.as_str()), (3, BOB));

    inbound.terminate().await.unwrap();
    let reason = within("alice's end", call.terminated()).await.unwrap();
    assert_eq!(reason, Reason::new(200, "Terminated remotely"));
    match within("481", call.flow().send_text("too late")).await {
        Err(DeliveryError::Failed { code: 481, .. }) => {}
        other => panic!("expected message_failed 481, got {other:?}"),
    }
    alice.bye().await.unwrap();
    bob.bye().await.unwrap();
}

#[tokio::test]
async fn presence_streams_start_with_a_snapshot_then_follow_changes() {
    let node = quiet_node();
    let alice = sign_in(node.addr, ALICE, "laptop", AutoAcceptPolicy::Accept).await;
    let mut watching = alice.subscribe([BOB]).await.unwrap();
    let snapshot = within("snapshot", watching.recv()).await.unwrap();
    assert_eq!(snapshot.user, BOB);
    assert_eq!(snapshot.availability, Availability::Offline);
    assert_eq!(
        snapshot.endpoints, None,
        "other users see availability only"
    );

    let bob = sign_in(node.addr, BOB, "phone", AutoAcceptPolicy::Accept).await;
    let online = within("bob online", watching.recv()).await.unwrap();
    assert_eq!(online.availability, Availability::Available);
    bob.publish_device_state(Activity::Away, 0).await.unwrap();
    let away = within("bob away", watching.recv()).await.unwrap();
    assert_eq!(away.availability, Availability::Away);

    // One's own user: the ranked endpoints and the most active one.
    let mut own = bob.subscribe([BOB]).await.unwrap();
    let mine = within("own snapshot", own.recv()).await.unwrap();
    assert_eq!(mine.most_active.as_deref(), Some(bob.id()));
    let endpoints = mine.endpoints.unwrap();
    assert_eq!(endpoints.len(), 1);
    assert_eq!(
        (endpoints[0].device.as_str(), endpoints[0].rank),
        ("phone", 1)
    );
    assert_eq!(mine.status, Some(None));

    bob.bye().await.unwrap();
    let offline = within("bob offline", watching.recv()).await.unwrap();
    assert_eq!(offline.availability, Availability::Offline);
    alice.unsubscribe([BOB]).await.unwrap();
    assert!(
        within("stream end", watching.recv()).await.is_none(),
        "unsubscribing ends the stream"
    );
    alice.bye().await.unwrap();
}

#[tokio::test]
async fn a_blind_transfer_through_the_library_reconnects_the_transferee() {
    let node = quiet_node();
    let alice = sign_in(node.addr, ALICE, "laptop", AutoAcceptPolicy::Accept).await;
    let bob = sign_in(node.addr, BOB, "phone", AutoAcceptPolicy::Accept).await;
    let carol = sign_in(node.addr, CAROL, "desk", AutoAcceptPolicy::Accept).await;
    let (mut bob_calls, mut carol_calls) = (bob.incoming_calls(), carol.incoming_calls());
    let call = within(
        "establish",
        InstantMessagingCall::establish(
            &Conversation::new(&alice),
            BOB,
            None,
            CallEstablishOptions::default(),
        ),
    )
    .await
    .unwrap();
    let at_bob = next_call(&mut bob_calls).await;
    within("bob established", at_bob.established())
        .await
        .unwrap();

    // A transfer to nobody fails and leaves the call as it was.
    match within("failed transfer", at_bob.transfer(NOBODY)).await {
        Err(ClientError::TransferFailed(reason)) => assert_eq!(reason.code, 480),
        other => panic!("expected TransferFailed(480), got {other:?}"),
    }
    assert_eq!(at_bob.state(), CallState::Established);

    within("transfer", at_bob.transfer(CAROL)).await.unwrap();
    assert_eq!(
        within("bob's end", at_bob.terminated()).await.unwrap(),
        Reason::new(202, "Transferred")
    );
    let at_carol = next_call(&mut carol_calls).await;
    assert_eq!(
        at_carol.peer(),
        ALICE,
        "the target is called by the transferee"
    );
    within("carol established", at_carol.established())
        .await
        .unwrap();
    let remote = within(
        "call_transferred",
        call.watch()
            .wait_for(|s| s.remote.as_ref().is_some_and(|r| r.user == CAROL)),
    )
    .await
    .unwrap()
    .remote
    .clone()
    .unwrap();
    assert_eq!(remote.endpoint, carol.id());
    assert_eq!(call.state(), CallState::Established);

    within("delivery", call.flow().send_text("hello carol"))
        .await
        .unwrap();
    let got = within("message", at_carol.flow().received().recv())
        .await
        .unwrap();
    assert_eq!(
        (got.from.as_str(), got.body),
        (ALICE, Body::from("hello carol"))
    );
    call.terminate().await.unwrap();
    for endpoint in [alice, bob, carol] {
        endpoint.bye().await.unwrap();
    }
}

/// A TCP proxy in front of the node for one client connection: forwards both ways and records
/// every `call_state` the node sends, before the client can see it.
struct Tap {
    addr: SocketAddr,
    states: Arc<Mutex<Vec<(String, StateChange)>>>,
}

impl Tap {
    async fn start(node: SocketAddr) -> Tap {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let states = Arc::new(Mutex::new(Vec::new()));
        let record = Arc::clone(&states);
        tokio::spawn(async move {
            let (client, _) = listener.accept().await.unwrap();
            let server = TcpStream::connect(node).await.unwrap();
            let (mut client_rx, mut client_tx) = client.into_split();
            let (mut server_rx, mut server_tx) = server.into_split();
            tokio::spawn(async move {
                let _ = tokio::io::copy(&mut client_rx, &mut server_tx).await;
                let _ = server_tx.shutdown().await;
            });
            loop {
                let mut len = [0u8; 4];
                if server_rx.read_exact(&mut len).await.is_err() {
                    break;
                }
                let mut body = vec![0u8; u32::from_be_bytes(len) as usize];
                if server_rx.read_exact(&mut body).await.is_err() {
                    break;
                }
                if let Ok(ServerMsg::CallState {
                    call,
                    previous,
                    state,
                    reason,
                    ..
                }) = decode_server(&body)
                {
                    let change = StateChange {
                        previous,
                        state,
                        reason,
                    };
                    record.lock().unwrap().push((call, change));
                }
                if client_tx.write_all(&len).await.is_err()
                    || client_tx.write_all(&body).await.is_err()
                {
                    break;
                }
            }
            let _ = client_tx.shutdown().await;
        });
        Tap { addr, states }
    }

    /// The node's `call_state` events for `call`, in the order sent.
    fn node_states(&self, call: &str) -> Vec<StateChange> {
        self.states
            .lock()
            .unwrap()
            .iter()
            .filter(|(c, _)| c == call)
            .map(|(_, change)| change.clone())
            .collect()
    }
}

/// The library's view of `call` must be exactly the node's `call_state` sequence, and its
/// current state the last one.
async fn assert_matches_node(tap: &Tap, call: &InstantMessagingCall) {
    let library = all_changes(call).await;
    let node = tap.node_states(call.id());
    assert!(!node.is_empty(), "the tap saw call {}", call.id());
    assert_eq!(library, node, "call {}", call.id());
    assert_eq!(call.state(), node.last().unwrap().state);
    assert_eq!(call.snapshot().state, call.state());
}

#[tokio::test]
async fn the_library_state_always_matches_the_node_call_state_sequence() {
    let node = quiet_node();
    let alice_tap = Tap::start(node.addr).await;
    let bob_tap = Tap::start(node.addr).await;
    let alice = sign_in(alice_tap.addr, ALICE, "laptop", AutoAcceptPolicy::Accept).await;
    // Notify: Bob's library accepts nothing by itself, so every outcome below is chosen here.
    let bob = sign_in(bob_tap.addr, BOB, "phone", AutoAcceptPolicy::Notify).await;
    let mut bob_calls = bob.incoming_calls();
    // Each call in a conversation of its own: the node forgets a conversation with its last
    // call, so a `Conversation` whose calls have all ended cannot place another. (A helper
    // function rather than a closure: under Rust 2024's capture rules `begin_establish`'s
    // future type names its arguments' lifetimes, for want of `+ use<>`.)
    async fn place_on(
        endpoint: &Endpoint,
        to: &str,
        toast: Option<Toast>,
    ) -> Result<InstantMessagingCall, ClientError> {
        let conversation = Conversation::new(endpoint);
        InstantMessagingCall::begin_establish(
            &conversation,
            to,
            toast,
            CallEstablishOptions::default(),
        )
        .await
    }
    let place = |to, toast| place_on(&alice, to, toast);

    // Nobody there: 480.
    let unanswered = within("call_created", place(NOBODY, None)).await.unwrap();
    match within("480", unanswered.established()).await {
        Err(ClientError::CallEnded(reason)) => assert_eq!(reason.code, 480),
        other => panic!("expected 480, got {other:?}"),
    }
    assert_matches_node(&alice_tap, &unanswered).await;

    // Accepted, a failed transfer (back to established with its reason), ended by the remote.
    let call = within("call_created", place(BOB, Some(text_toast("state check"))))
        .await
        .unwrap();
    let at_bob = next_call(&mut bob_calls).await;
    within("accept", at_bob.accept()).await.unwrap();
    within("alice established", call.established())
        .await
        .unwrap();
    assert!(matches!(
        within("transfer", call.transfer(NOBODY)).await,
        Err(ClientError::TransferFailed(_))
    ));
    at_bob.terminate().await.unwrap();
    within("alice's end", call.terminated()).await.unwrap();
    assert_matches_node(&alice_tap, &call).await;
    assert_matches_node(&bob_tap, &at_bob).await;
    assert_eq!(
        alice_tap
            .node_states(call.id())
            .iter()
            .map(|c| c.state)
            .collect::<Vec<_>>(),
        [
            CallState::Establishing,
            CallState::Establishing,
            CallState::Established,
            CallState::Transferring,
            CallState::Established,
            CallState::Terminating,
            CallState::Terminated,
        ]
    );

    // Declined by the callee: 486 on both legs.
    let declined = within("call_created", place(BOB, None)).await.unwrap();
    let declined_at_bob = next_call(&mut bob_calls).await;
    declined_at_bob.decline(None).await.unwrap();
    match within("486", declined.established()).await {
        Err(ClientError::CallEnded(reason)) => assert_eq!(reason.code, 486),
        other => panic!("expected 486, got {other:?}"),
    }
    within("bob's end", declined_at_bob.terminated())
        .await
        .unwrap();
    assert_matches_node(&alice_tap, &declined).await;
    assert_matches_node(&bob_tap, &declined_at_bob).await;

    // Cancelled by the caller while ringing: 487 on both legs.
    let cancelled = within("call_created", place(BOB, None)).await.unwrap();
    let cancelled_at_bob = next_call(&mut bob_calls).await;
    cancelled.terminate().await.unwrap();
    assert_eq!(
        within("bob's end", cancelled_at_bob.terminated())
            .await
            .unwrap()
            .code,
        487
    );
    assert_matches_node(&alice_tap, &cancelled).await;
    assert_matches_node(&bob_tap, &cancelled_at_bob).await;

    alice.bye().await.unwrap();
    bob.bye().await.unwrap();
}
