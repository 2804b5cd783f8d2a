//! End-to-end tests of the IM call operations (contract §4 "IM calls", "Transfer" and the
//! Reasons table), one test per rule, over real TCP against a node on ephemeral ports. Each
//! connection's frames are read in order and asserted exactly; the only relative orders left
//! open are the ones the contract leaves open (`call_ringing` versus its establishing →
//! establishing, `call_state` → established versus `call_established`, and events of two
//! different legs on one connection).

use confab_protocol::sdp::build_offer;
use confab_protocol::*;
use confab_tests::legs::{
    self, Leg, TERMINATED_LOCALLY, TERMINATED_REMOTELY, expect_callee_established,
    expect_caller_established, expect_end, expect_first_ringing, expect_seq, place_call_with,
    quiet_node, remote_of, terminate, text_toast,
};
use confab_tests::*;
use std::collections::HashMap;
use std::time::Duration;

const ALICE: &str = "sip:alice@example.com";
const BOB: &str = "sip:bob@example.com";
const CAROL: &str = "sip:carol@example.com";

/// The caller's offer differs from the callee's [`answer`], so every `sdp` field shows which
/// side's description it carries.
fn call_offer() -> String {
    build_offer(&["text/plain", "text/html"], None)
}

/// Several sequences on one connection (e.g. the events of two legs): each sequence must
/// arrive in order, the sequences may interleave.
async fn expect_interleaved(raw: &mut Raw, mut seqs: Vec<Vec<ServerMsg>>) {
    for s in &mut seqs {
        s.reverse();
    }
    while seqs.iter().any(|s| !s.is_empty()) {
        let got = raw.recv().await;
        let Some(s) = seqs.iter_mut().find(|s| s.last() == Some(&got)) else {
            panic!(
                "{}: unexpected {got:?}; expecting one of {seqs:?}",
                raw.user
            );
        };
        s.pop();
    }
}

fn accept_with(leg: &Leg, sdp: String) -> ClientMsg {
    ClientMsg::CallAccept {
        rid: None,
        call: leg.call.clone(),
        sdp,
    }
}

fn transfer(leg: &Leg, to: &str) -> ClientMsg {
    ClientMsg::CallTransfer {
        rid: None,
        call: leg.call.clone(),
        to: to.to_owned(),
    }
}

/// A call with the test offer to a user with one endpoint: up to the first ringing.
async fn place_call(caller: &mut Raw, to: &str, conversation: Option<&str>) -> Leg {
    let leg = place_call_with(caller, to, conversation, None, call_offer()).await;
    expect_first_ringing(caller, &leg).await;
    leg
}

/// The next frame must be `call_incoming` from `from` (a user) with the test offer and no toast.
async fn expect_incoming(callee: &mut Raw, from: &str, immediate: bool) -> Leg {
    legs::expect_incoming(callee, from, None, &call_offer(), immediate).await
}

/// `call_accept` with [`answer`]: `ok` first, then incoming → establishing → established
/// with `call_established{sdp: the test offer, remote}`.
async fn accept(callee: &mut Raw, leg: &Leg, remote: Remote) {
    legs::accept_and_win(callee, leg, &call_offer(), &remote, None).await;
}

/// `caller` calls `callee` (one endpoint) and `callee` accepts: (caller's leg, callee's leg).
async fn established_call(caller: &mut Raw, callee: &mut Raw) -> (Leg, Leg) {
    established_call_in(caller, callee, None).await
}

async fn established_call_in(
    caller: &mut Raw,
    callee: &mut Raw,
    conversation: Option<&str>,
) -> (Leg, Leg) {
    let to = callee.user.clone();
    let out = place_call(caller, &to, conversation).await;
    let inc = expect_incoming(callee, &caller.user, true).await;
    accept(callee, &inc, remote_of(caller)).await;
    expect_caller_established(caller, &out, remote_of(callee)).await;
    (out, inc)
}

/// `from` sends a text message on `from_leg`; `to` receives it on `to_leg`, acks it, and
/// `from` gets `message_delivered`. Returns the message number.
async fn message_flows(from: &mut Raw, from_leg: &Leg, to: &mut Raw, to_leg: &Leg) -> u32 {
    let text = format!("from {}", from.endpoint);
    let rid = send_request(
        from,
        ClientMsg::Message {
            rid: None,
            call: from_leg.call.clone(),
            content_type: "text/plain".into(),
            body: Body::Text(text.clone()),
        },
    )
    .await;
    let msg = match to.recv().await {
        ServerMsg::MessageReceived {
            call,
            msg,
            from: f,
            content_type,
            body,
            toast,
        } => {
            assert_eq!(call, to_leg.call);
            assert_eq!(f, from.user);
            assert_eq!(content_type, "text/plain");
            assert_eq!(body, Body::Text(text));
            assert_eq!(toast, None);
            msg
        }
        other => panic!("{}: expected message_received, got {other:?}", to.endpoint),
    };
    to.send(&ClientMsg::MessageAck {
        call: to_leg.call.clone(),
        msg,
    })
    .await;
    expect(
        from,
        ServerMsg::MessageDelivered {
            rid,
            call: from_leg.call.clone(),
            msg,
        },
    )
    .await;
    msg
}

// ---------------------------------------------------------------------------------------------
// establish, accept, decline
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn offer_without_message_media_is_created_then_ends_488() {
    let node = quiet_node();
    let mut alice = Raw::sign_in(node.addr, ALICE, "laptop").await;
    let mut bob = Raw::sign_in(node.addr, BOB, "desk").await;
    let audio_only = "v=0\r\no=- 0 0 IN IP4 0.0.0.0\r\ns=-\r\nc=IN IP4 0.0.0.0\r\nt=0 0\r\n\
                      m=audio 49170 RTP/AVP 0\r\n"
        .to_owned();
    // call_created, idle → establishing, establishing → terminating → terminated (488).
    let leg = place_call_with(&mut alice, BOB, None, Some("hi"), audio_only).await;
    expect_end(
        &mut alice,
        &leg,
        CallState::Establishing,
        (488, "Not Acceptable Here"),
    )
    .await;
    // Nothing was forked.
    bob.expect_silence(Duration::from_millis(150)).await;
}

#[tokio::test]
async fn accept_with_a_bad_answer_is_not_acceptable_and_the_leg_stays_incoming() {
    let node = quiet_node();
    let mut alice = Raw::sign_in(node.addr, ALICE, "laptop").await;
    let mut bob = Raw::sign_in(node.addr, BOB, "desk").await;
    let out = place_call(&mut alice, BOB, None).await;
    let inc = expect_incoming(&mut bob, ALICE, true).await;
    let not_subset = build_offer(&["image/png"], None);
    let no_message = "v=0\r\no=- 0 0 IN IP4 0.0.0.0\r\ns=-\r\nc=IN IP4 0.0.0.0\r\nt=0 0\r\nm=audio 5 RTP/AVP 0\r\n";
    for bad in [not_subset.as_str(), no_message, "not sdp at all"] {
        request_error(
            &mut bob,
            accept_with(&inc, bad.to_owned()),
            ErrorCode::NotAcceptable,
        )
        .await;
    }
    // Still incoming: a good answer is accepted, and nothing happened in between.
    accept(&mut bob, &inc, remote_of(&alice)).await;
    expect_caller_established(&mut alice, &out, remote_of(&bob)).await;
}

#[tokio::test]
async fn accept_on_an_established_leg_is_invalid_state() {
    let node = quiet_node();
    let mut alice = Raw::sign_in(node.addr, ALICE, "laptop").await;
    let mut bob = Raw::sign_in(node.addr, BOB, "desk").await;
    let (out, inc) = established_call(&mut alice, &mut bob).await;
    request_error(
        &mut bob,
        accept_with(&inc, answer()),
        ErrorCode::InvalidState,
    )
    .await;
    // The call is unaffected.
    message_flows(&mut alice, &out, &mut bob, &inc).await;
}

#[tokio::test]
async fn decline_code_outside_400_to_699_is_bad_frame() {
    let node = quiet_node();
    let mut alice = Raw::sign_in(node.addr, ALICE, "laptop").await;
    let mut bob = Raw::sign_in(node.addr, BOB, "desk").await;
    let out = place_call(&mut alice, BOB, None).await;
    let inc = expect_incoming(&mut bob, ALICE, true).await;
    for code in [0, 200, 399, 700, 999] {
        request_error(
            &mut bob,
            ClientMsg::CallDecline {
                rid: None,
                call: inc.call.clone(),
                code: Some(code),
            },
            ErrorCode::BadFrame,
        )
        .await;
    }
    // The leg was not declined: it still rings and can be accepted.
    accept(&mut bob, &inc, remote_of(&alice)).await;
    expect_caller_established(&mut alice, &out, remote_of(&bob)).await;
}

#[tokio::test]
async fn decline_on_an_established_leg_is_invalid_state() {
    let node = quiet_node();
    let mut alice = Raw::sign_in(node.addr, ALICE, "laptop").await;
    let mut bob = Raw::sign_in(node.addr, BOB, "desk").await;
    let (out, inc) = established_call(&mut alice, &mut bob).await;
    request_error(
        &mut bob,
        ClientMsg::CallDecline {
            rid: None,
            call: inc.call.clone(),
            code: Some(603),
        },
        ErrorCode::InvalidState,
    )
    .await;
    message_flows(&mut bob, &inc, &mut alice, &out).await;
}

#[tokio::test]
async fn forward_on_a_leg_that_is_not_incoming_is_invalid_state() {
    let node = quiet_node();
    let mut alice = Raw::sign_in(node.addr, ALICE, "laptop").await;
    let mut bob = Raw::sign_in(node.addr, BOB, "desk").await;
    let _carol = Raw::sign_in(node.addr, CAROL, "desk").await;
    let (out, inc) = established_call(&mut alice, &mut bob).await;
    request_error(
        &mut bob,
        ClientMsg::CallForward {
            rid: None,
            call: inc.call.clone(),
            to: CAROL.to_owned(),
        },
        ErrorCode::InvalidState,
    )
    .await;
    message_flows(&mut alice, &out, &mut bob, &inc).await;
}

// ---------------------------------------------------------------------------------------------
// terminate
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn call_terminate_on_an_incoming_leg_is_a_486_decline() {
    let node = quiet_node();
    let mut alice = Raw::sign_in(node.addr, ALICE, "laptop").await;
    let mut bob = Raw::sign_in(node.addr, BOB, "desk").await;
    let out = place_call(&mut alice, BOB, None).await;
    let inc = expect_incoming(&mut bob, ALICE, true).await;
    request_ok(&mut bob, terminate(&inc)).await;
    expect_end(&mut bob, &inc, CallState::Incoming, (486, "Busy Here")).await;
    // bob's only fork declined 486: the caller gets 486 too.
    expect_end(
        &mut alice,
        &out,
        CallState::Establishing,
        (486, "Busy Here"),
    )
    .await;
}

#[tokio::test]
async fn call_terminate_on_a_terminated_leg_still_known_is_ok() {
    let node = quiet_node();
    let mut alice = Raw::sign_in(node.addr, ALICE, "laptop").await;
    let mut bob = Raw::sign_in(node.addr, BOB, "desk").await;
    let (out, inc) = established_call(&mut alice, &mut bob).await;
    request_ok(&mut alice, terminate(&out)).await;
    expect_end(&mut alice, &out, CallState::Established, TERMINATED_LOCALLY).await;
    expect_end(&mut bob, &inc, CallState::Established, TERMINATED_REMOTELY).await;
    // Both ended legs are still known: terminating them again is `ok` and causes nothing.
    request_ok(&mut alice, terminate(&out)).await;
    request_ok(&mut bob, terminate(&inc)).await;
    alice.expect_silence(Duration::from_millis(100)).await;
}

#[tokio::test]
async fn terminating_an_established_call_ends_it_locally_and_remotely_with_200() {
    let node = quiet_node();
    let mut alice = Raw::sign_in(node.addr, ALICE, "laptop").await;
    let mut bob = Raw::sign_in(node.addr, BOB, "desk").await;
    let (out, inc) = established_call(&mut alice, &mut bob).await;
    request_ok(&mut bob, terminate(&inc)).await;
    expect_end(&mut bob, &inc, CallState::Established, TERMINATED_LOCALLY).await;
    expect_end(
        &mut alice,
        &out,
        CallState::Established,
        TERMINATED_REMOTELY,
    )
    .await;
}

// ---------------------------------------------------------------------------------------------
// conversations
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn conversation_terminate_cascades_to_every_call_in_it() {
    let node = quiet_node();
    let mut alice = Raw::sign_in(node.addr, ALICE, "laptop").await;
    let mut bob = Raw::sign_in(node.addr, BOB, "desk").await;
    let mut carol = Raw::sign_in(node.addr, CAROL, "desk").await;
    let (to_bob, bob_leg) = established_call(&mut alice, &mut bob).await;
    // The second call joins the first one's conversation.
    let conv = to_bob.conversation.clone();
    let (to_carol, carol_leg) = established_call_in(&mut alice, &mut carol, Some(&conv)).await;
    assert_eq!(to_carol.conversation, conv, "call_created.conversation");

    request_ok(
        &mut alice,
        ClientMsg::ConversationTerminate {
            rid: None,
            conversation: conv,
        },
    )
    .await;
    expect_interleaved(
        &mut alice,
        vec![
            to_bob.end(CallState::Established, TERMINATED_LOCALLY),
            to_carol.end(CallState::Established, TERMINATED_LOCALLY),
        ],
    )
    .await;
    expect_end(
        &mut bob,
        &bob_leg,
        CallState::Established,
        TERMINATED_REMOTELY,
    )
    .await;
    expect_end(
        &mut carol,
        &carol_leg,
        CallState::Established,
        TERMINATED_REMOTELY,
    )
    .await;
}

#[tokio::test]
async fn unknown_conversation_is_rejected() {
    let node = quiet_node();
    let mut alice = Raw::sign_in(node.addr, ALICE, "laptop").await;
    let mut bob = Raw::sign_in(node.addr, BOB, "desk").await;
    request_error(
        &mut alice,
        ClientMsg::ConversationTerminate {
            rid: None,
            conversation: "no-such-conversation".into(),
        },
        ErrorCode::UnknownConversation,
    )
    .await;
    request_error(
        &mut alice,
        ClientMsg::CallEstablish {
            rid: None,
            to: BOB.into(),
            conversation: Some("no-such-conversation".into()),
            toast: None,
            sdp: call_offer(),
        },
        ErrorCode::UnknownConversation,
    )
    .await;
    // bob's own conversation id is unknown to alice, whether or not it exists elsewhere.
    let (out, inc) = established_call(&mut alice, &mut bob).await;
    request_error(
        &mut alice,
        ClientMsg::ConversationTerminate {
            rid: None,
            conversation: inc.conversation.clone(),
        },
        ErrorCode::UnknownConversation,
    )
    .await;
    request_error(
        &mut alice,
        ClientMsg::CallEstablish {
            rid: None,
            to: BOB.into(),
            conversation: Some(inc.conversation.clone()),
            toast: None,
            sdp: call_offer(),
        },
        ErrorCode::UnknownConversation,
    )
    .await;
    // bob saw nothing of it; the call is intact.
    message_flows(&mut bob, &inc, &mut alice, &out).await;
}

// ---------------------------------------------------------------------------------------------
// blind transfer
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn blind_transfer_success_reconnects_the_transferee_to_the_target() {
    let node = quiet_node();
    let mut alice = Raw::sign_in(node.addr, ALICE, "laptop").await;
    let mut bob = Raw::sign_in(node.addr, BOB, "desk").await;
    let mut carol = Raw::sign_in(node.addr, CAROL, "desk").await;
    let (a_leg, b_leg) = established_call(&mut alice, &mut bob).await;
    message_flows(&mut alice, &a_leg, &mut bob, &b_leg).await;

    request_ok(&mut bob, transfer(&b_leg, CAROL)).await;
    expect(
        &mut bob,
        b_leg.state(CallState::Transferring, CallState::Established, None),
    )
    .await;
    // carol is called as by alice's user, with alice's offer, and without a toast.
    let c_leg = expect_incoming(&mut carol, ALICE, true).await;
    accept(&mut carol, &c_leg, remote_of(&alice)).await;
    // alice's leg stays established and learns its new remote; no call_state.
    expect(
        &mut alice,
        ServerMsg::CallTransferred {
            call: a_leg.call.clone(),
            remote: remote_of(&carol),
        },
    )
    .await;
    // bob's leg: transferring → terminating → terminated (202), and nothing more.
    expect_end(
        &mut bob,
        &b_leg,
        CallState::Transferring,
        (202, "Transferred"),
    )
    .await;

    // Messages now flow between alice and carol, both ways.
    message_flows(&mut alice, &a_leg, &mut carol, &c_leg).await;
    message_flows(&mut carol, &c_leg, &mut alice, &a_leg).await;
    bob.expect_silence(Duration::from_millis(100)).await;
}

#[tokio::test]
async fn blind_transfer_failure_returns_the_transferor_to_established_with_the_reason() {
    let node = quiet_node();
    let mut alice = Raw::sign_in(node.addr, ALICE, "laptop").await;
    let mut bob = Raw::sign_in(node.addr, BOB, "desk").await;
    let mut carol = Raw::sign_in(node.addr, CAROL, "desk").await;
    let (a_leg, b_leg) = established_call(&mut alice, &mut bob).await;

    request_ok(&mut bob, transfer(&b_leg, CAROL)).await;
    expect(
        &mut bob,
        b_leg.state(CallState::Transferring, CallState::Established, None),
    )
    .await;
    let c_leg = expect_incoming(&mut carol, ALICE, true).await;
    // Messages are allowed while transferring, both ways.
    message_flows(&mut alice, &a_leg, &mut bob, &b_leg).await;
    message_flows(&mut bob, &b_leg, &mut alice, &a_leg).await;
    request_ok(
        &mut carol,
        ClientMsg::CallDecline {
            rid: None,
            call: c_leg.call.clone(),
            code: Some(486),
        },
    )
    .await;
    expect_end(&mut carol, &c_leg, CallState::Incoming, (486, "Busy Here")).await;
    expect(
        &mut bob,
        b_leg.state(
            CallState::Established,
            CallState::Transferring,
            Some(Reason::new(486, "Busy Here")),
        ),
    )
    .await;
    // Nothing changed for alice (her next frames are this message's), and bob still talks
    // to her.
    message_flows(&mut alice, &a_leg, &mut bob, &b_leg).await;
    message_flows(&mut bob, &b_leg, &mut alice, &a_leg).await;
}

#[tokio::test]
async fn blind_transfer_to_a_user_with_no_endpoint_fails_480() {
    let node = quiet_node();
    let mut alice = Raw::sign_in(node.addr, ALICE, "laptop").await;
    let mut bob = Raw::sign_in(node.addr, BOB, "desk").await;
    let (a_leg, b_leg) = established_call(&mut alice, &mut bob).await;
    request_ok(&mut bob, transfer(&b_leg, "sip:nobody@example.com")).await;
    expect_seq(
        &mut bob,
        vec![
            b_leg.state(CallState::Transferring, CallState::Established, None),
            b_leg.state(
                CallState::Established,
                CallState::Transferring,
                Some(Reason::new(480, "Temporarily Unavailable")),
            ),
        ],
    )
    .await;
    message_flows(&mut alice, &a_leg, &mut bob, &b_leg).await;
}

#[tokio::test]
async fn transferor_terminating_while_transferring_ends_the_call_and_cancels_the_target() {
    let node = quiet_node();
    let mut alice = Raw::sign_in(node.addr, ALICE, "laptop").await;
    let mut bob = Raw::sign_in(node.addr, BOB, "desk").await;
    let mut carol = Raw::sign_in(node.addr, CAROL, "desk").await;
    let (a_leg, b_leg) = established_call(&mut alice, &mut bob).await;

    request_ok(&mut bob, transfer(&b_leg, CAROL)).await;
    expect(
        &mut bob,
        b_leg.state(CallState::Transferring, CallState::Established, None),
    )
    .await;
    let c_leg = expect_incoming(&mut carol, ALICE, true).await;
    request_ok(&mut bob, terminate(&b_leg)).await;
    expect_end(
        &mut bob,
        &b_leg,
        CallState::Transferring,
        TERMINATED_LOCALLY,
    )
    .await;
    expect_end(
        &mut alice,
        &a_leg,
        CallState::Established,
        TERMINATED_REMOTELY,
    )
    .await;
    expect_end(
        &mut carol,
        &c_leg,
        CallState::Incoming,
        (487, "Request Terminated"),
    )
    .await;
}

#[tokio::test]
async fn transfer_on_an_incoming_leg_is_invalid_state() {
    let node = quiet_node();
    let mut alice = Raw::sign_in(node.addr, ALICE, "laptop").await;
    let mut bob = Raw::sign_in(node.addr, BOB, "desk").await;
    let _carol = Raw::sign_in(node.addr, CAROL, "desk").await;
    let out = place_call(&mut alice, BOB, None).await;
    let inc = expect_incoming(&mut bob, ALICE, true).await;
    request_error(&mut bob, transfer(&inc, CAROL), ErrorCode::InvalidState).await;
    // Still incoming.
    accept(&mut bob, &inc, remote_of(&alice)).await;
    expect_caller_established(&mut alice, &out, remote_of(&bob)).await;
}

#[tokio::test]
async fn transfer_while_the_other_side_is_transferring_is_invalid_state() {
    let node = quiet_node();
    let mut alice = Raw::sign_in(node.addr, ALICE, "laptop").await;
    let mut bob = Raw::sign_in(node.addr, BOB, "desk").await;
    let mut carol = Raw::sign_in(node.addr, CAROL, "desk").await;
    let (a_leg, b_leg) = established_call(&mut alice, &mut bob).await;
    request_ok(&mut bob, transfer(&b_leg, CAROL)).await;
    expect(
        &mut bob,
        b_leg.state(CallState::Transferring, CallState::Established, None),
    )
    .await;
    expect_incoming(&mut carol, ALICE, true).await;
    request_error(&mut alice, transfer(&a_leg, CAROL), ErrorCode::InvalidState).await;
}

// ---------------------------------------------------------------------------------------------
// ordering and identity
// ---------------------------------------------------------------------------------------------

/// Checks one connection's frames: per leg, the `call_state` events chain (each `previous` is
/// the state before), start where the contract says (idle for outbound; incoming, announced by
/// `call_incoming`, for inbound), end in terminated with nothing after, and every terminating
/// and terminated event carries a reason. Returns the state sequence of each leg.
fn check_state_chains(who: &str, frames: &[ServerMsg]) -> HashMap<String, Vec<CallState>> {
    let mut current: HashMap<String, CallState> = HashMap::new();
    let mut seen: HashMap<String, Vec<CallState>> = HashMap::new();
    for f in frames {
        match f {
            ServerMsg::CallIncoming { call, .. } => {
                assert!(
                    current.insert(call.clone(), CallState::Incoming).is_none(),
                    "{who}: call_incoming for a known leg"
                );
                seen.insert(call.clone(), vec![CallState::Incoming]);
            }
            ServerMsg::CallState {
                call,
                direction,
                state,
                previous,
                reason,
                ..
            } => {
                let before = *current.entry(call.clone()).or_insert_with(|| {
                    assert_eq!(
                        *direction,
                        Direction::Outbound,
                        "{who}: an inbound leg's first event must be call_incoming"
                    );
                    seen.insert(call.clone(), vec![CallState::Idle]);
                    CallState::Idle
                });
                assert_ne!(
                    before,
                    CallState::Terminated,
                    "{who}: event after terminated"
                );
                assert_eq!(*previous, before, "{who}: {f:?} out of order");
                if matches!(state, CallState::Terminating | CallState::Terminated) {
                    assert!(reason.is_some(), "{who}: {f:?} without a reason");
                }
                current.insert(call.clone(), *state);
                seen.entry(call.clone()).or_default().push(*state);
            }
            _ => {}
        }
    }
    for (call, state) in &current {
        assert_eq!(
            *state,
            CallState::Terminated,
            "{who}: leg {call} did not end"
        );
    }
    seen
}

/// Reads `raw` until `pred` matches, recording every frame in `log`; returns the match.
async fn rec_until(
    raw: &mut Raw,
    log: &mut Vec<ServerMsg>,
    pred: impl Fn(&ServerMsg) -> bool,
) -> ServerMsg {
    loop {
        let m = raw.recv().await;
        log.push(m.clone());
        if pred(&m) {
            return m;
        }
    }
}

fn is_state(m: &ServerMsg, of: &str, s: CallState) -> bool {
    matches!(m, ServerMsg::CallState { call, state, .. } if call == of && *state == s)
}

/// Records `raw`'s frames until leg `call` has reached terminated (if it has not already).
async fn rec_until_terminated(raw: &mut Raw, log: &mut Vec<ServerMsg>, call: &str) {
    if !log.iter().any(|m| is_state(m, call, CallState::Terminated)) {
        rec_until(raw, log, |m| is_state(m, call, CallState::Terminated)).await;
    }
}

#[tokio::test]
async fn call_state_events_come_in_order_and_every_end_event_carries_a_reason() {
    use CallState::*;
    let node = quiet_node();
    let mut alice = Raw::sign_in(node.addr, ALICE, "laptop").await;
    let mut bob1 = Raw::sign_in(node.addr, BOB, "desk").await;
    let mut bob2 = Raw::sign_in(node.addr, BOB, "phone").await;
    let mut carol = Raw::sign_in(node.addr, CAROL, "desk").await;
    let (mut la, mut lb1, mut lb2, mut lc) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());

    // A life with most transitions, read loosely and recorded: a fork that loses, a failed
    // transfer, a terminate. The checks run on the recordings afterwards.
    let rid = send_request(
        &mut alice,
        ClientMsg::CallEstablish {
            rid: None,
            to: BOB.into(),
            conversation: None,
            toast: Some(text_toast("hi")),
            sdp: call_offer(),
        },
    )
    .await;
    let ServerMsg::CallCreated { call: a, .. } =
        rec_until(&mut alice, &mut la, |m| reply_rid(m) == rid).await
    else {
        panic!("expected call_created")
    };
    let is_incoming = |m: &ServerMsg| matches!(m, ServerMsg::CallIncoming { .. });
    let ServerMsg::CallIncoming { call: b1, .. } =
        rec_until(&mut bob1, &mut lb1, is_incoming).await
    else {
        unreachable!()
    };
    let ServerMsg::CallIncoming { call: b2, .. } =
        rec_until(&mut bob2, &mut lb2, is_incoming).await
    else {
        unreachable!()
    };
    let rid = send_request(
        &mut bob1,
        ClientMsg::CallAccept {
            rid: None,
            call: b1.clone(),
            sdp: answer(),
        },
    )
    .await;
    rec_until(&mut bob1, &mut lb1, |m| reply_rid(m) == rid).await;
    rec_until(&mut bob1, &mut lb1, |m| is_state(m, &b1, Established)).await;
    rec_until(&mut alice, &mut la, |m| is_state(m, &a, Established)).await;
    let rid = send_request(
        &mut bob1,
        ClientMsg::CallTransfer {
            rid: None,
            call: b1.clone(),
            to: CAROL.into(),
        },
    )
    .await;
    rec_until(&mut bob1, &mut lb1, |m| reply_rid(m) == rid).await;
    let ServerMsg::CallIncoming { call: c, .. } = rec_until(&mut carol, &mut lc, is_incoming).await
    else {
        unreachable!()
    };
    let rid = send_request(
        &mut carol,
        ClientMsg::CallDecline {
            rid: None,
            call: c.clone(),
            code: Some(480),
        },
    )
    .await;
    rec_until(&mut carol, &mut lc, |m| reply_rid(m) == rid).await;
    rec_until(&mut bob1, &mut lb1, |m| {
        matches!(m, ServerMsg::CallState { call, state: Established, previous: Transferring, .. } if *call == b1)
    })
    .await;
    let rid = send_request(
        &mut alice,
        ClientMsg::CallTerminate {
            rid: None,
            call: a.clone(),
        },
    )
    .await;
    rec_until(&mut alice, &mut la, |m| reply_rid(m) == rid).await;
    rec_until_terminated(&mut alice, &mut la, &a).await;
    rec_until_terminated(&mut bob1, &mut lb1, &b1).await;
    rec_until_terminated(&mut bob2, &mut lb2, &b2).await;
    rec_until_terminated(&mut carol, &mut lc, &c).await;

    let chains = [
        (
            "alice",
            &la,
            &a,
            vec![
                Idle,
                Establishing,
                Establishing,
                Established,
                Terminating,
                Terminated,
            ],
        ),
        (
            "bob1",
            &lb1,
            &b1,
            vec![
                Incoming,
                Establishing,
                Established,
                Transferring,
                Established,
                Terminating,
                Terminated,
            ],
        ),
        ("bob2", &lb2, &b2, vec![Incoming, Terminating, Terminated]),
        ("carol", &lc, &c, vec![Incoming, Terminating, Terminated]),
    ];
    for (who, log, call, want) in chains {
        let seen = check_state_chains(who, log);
        assert_eq!(
            seen.get(call.as_str()),
            Some(&want),
            "{who}: states of its leg"
        );
    }
}

#[tokio::test]
async fn replies_precede_the_events_their_requests_cause() {
    let node = quiet_node();
    let mut alice = Raw::sign_in(node.addr, ALICE, "laptop").await;
    let mut bob1 = Raw::sign_in(node.addr, BOB, "desk").await;
    let mut bob2 = Raw::sign_in(node.addr, BOB, "phone").await;
    // call_created, then the caller's first call_state.
    let out = place_call_with(&mut alice, BOB, None, None, call_offer()).await;
    let f1 = expect_incoming(&mut bob1, ALICE, false).await;
    let f2 = expect_incoming(&mut bob2, ALICE, false).await;
    // call_decline: ok, then the declining leg's events.
    let rid = send_request(
        &mut bob2,
        ClientMsg::CallDecline {
            rid: None,
            call: f2.call.clone(),
            code: None,
        },
    )
    .await;
    expect_ok(&mut bob2, rid).await;
    expect_end(&mut bob2, &f2, CallState::Incoming, (486, "Busy Here")).await;
    // call_accept: ok, then the accepting leg's events.
    let rid = send_request(&mut bob1, accept_with(&f1, answer())).await;
    expect_ok(&mut bob1, rid).await;
    expect_callee_established(&mut bob1, &f1, &call_offer(), remote_of(&alice)).await;
    expect_first_ringing(&mut alice, &out).await;
    expect_caller_established(&mut alice, &out, remote_of(&bob1)).await;
    // call_terminate: ok, then the events.
    let rid = send_request(&mut alice, terminate(&out)).await;
    expect_ok(&mut alice, rid).await;
    expect_end(&mut alice, &out, CallState::Established, TERMINATED_LOCALLY).await;
    expect_end(&mut bob1, &f1, CallState::Established, TERMINATED_REMOTELY).await;
}

#[tokio::test]
async fn ids_never_leak_another_endpoints_call_id_is_unknown() {
    let node = quiet_node();
    let mut alice = Raw::sign_in(node.addr, ALICE, "laptop").await;
    let mut bob = Raw::sign_in(node.addr, BOB, "desk").await;
    let (out, inc) = established_call(&mut alice, &mut bob).await;
    let alices = out.call.clone();

    // bob names alice's leg: every request is answered as for a call that does not exist.
    request_error(
        &mut bob,
        ClientMsg::CallTerminate {
            rid: None,
            call: alices.clone(),
        },
        ErrorCode::UnknownCall,
    )
    .await;
    request_error(
        &mut bob,
        accept_with(&out, answer()),
        ErrorCode::UnknownCall,
    )
    .await;
    request_error(
        &mut bob,
        ClientMsg::CallDecline {
            rid: None,
            call: alices.clone(),
            code: Some(603),
        },
        ErrorCode::UnknownCall,
    )
    .await;
    request_error(&mut bob, transfer(&out, CAROL), ErrorCode::UnknownCall).await;
    let rid = send_request(
        &mut bob,
        ClientMsg::Message {
            rid: None,
            call: alices.clone(),
            content_type: "text/plain".into(),
            body: Body::Text("sneaky".into()),
        },
    )
    .await;
    match bob.recv().await {
        ServerMsg::MessageFailed {
            rid: r,
            call,
            code: 481,
            ..
        } if r == rid && call == alices => {}
        other => panic!("expected message_failed 481 for alice's call id, got {other:?}"),
    }
    // alice's call is unaffected: she saw nothing, and the call still carries messages.
    message_flows(&mut alice, &out, &mut bob, &inc).await;
    message_flows(&mut bob, &inc, &mut alice, &out).await;
}

#[tokio::test]
async fn accept_pipelined_after_a_decline_is_invalid_state() {
    let node = quiet_node();
    let mut alice = Raw::sign_in(node.addr, ALICE, "laptop").await;
    let mut bob = Raw::sign_in(node.addr, BOB, "desk").await;
    let out = place_call(&mut alice, BOB, None).await;
    let inc = expect_incoming(&mut bob, ALICE, true).await;
    // One write: call_decline then call_accept on the same leg.
    let (r1, r2) = (bob.rid(), bob.rid());
    let mut bytes = frame(&ClientMsg::CallDecline {
        rid: r1,
        call: inc.call.clone(),
        code: None,
    });
    bytes.extend(frame(&ClientMsg::CallAccept {
        rid: r2,
        call: inc.call.clone(),
        sdp: answer(),
    }));
    bob.send_bytes(&bytes).await;
    expect_ok(&mut bob, r1).await;
    // The decline's events and the accept's invalid_state, the latter anywhere among them.
    let mut events = inc.end(CallState::Incoming, (486, "Busy Here"));
    events.reverse();
    let mut refused = false;
    let mut got = Vec::new();
    while !(refused && events.is_empty()) {
        let m = match tokio::time::timeout(Duration::from_secs(2), bob.recv()).await {
            Ok(m) => m,
            Err(_) => panic!("the accept (rid {r2:?}) after the decline got no reply; got {got:?}"),
        };
        match &m {
            ServerMsg::Error { rid, code, .. } if *rid == r2 && !refused => {
                assert_eq!(*code, ErrorCode::InvalidState, "{m:?}");
                refused = true;
            }
            other if events.last() == Some(other) => {
                events.pop();
            }
            other => panic!("bob: unexpected {other:?} after {got:?}"),
        }
        got.push(m);
    }
    expect_end(
        &mut alice,
        &out,
        CallState::Establishing,
        (486, "Busy Here"),
    )
    .await;
}

#[tokio::test]
async fn requests_pipelined_after_the_one_that_ends_a_call_are_still_answered() {
    let node = quiet_node();
    let mut alice = Raw::sign_in(node.addr, ALICE, "laptop").await;
    let mut bob = Raw::sign_in(node.addr, BOB, "desk").await;
    let (a_leg, b_leg) = established_call(&mut alice, &mut bob).await;
    // One write holding: call_terminate, a message on the same call, call_terminate again.
    let (r1, r2, r3) = (bob.rid(), bob.rid(), bob.rid());
    let mut bytes = frame(&ClientMsg::CallTerminate {
        rid: r1,
        call: b_leg.call.clone(),
    });
    bytes.extend(frame(&ClientMsg::Message {
        rid: r2,
        call: b_leg.call.clone(),
        content_type: "text/plain".into(),
        body: Body::Text("too late".into()),
    }));
    bytes.extend(frame(&ClientMsg::CallTerminate {
        rid: r3,
        call: b_leg.call.clone(),
    }));
    bob.send_bytes(&bytes).await;
    // The first terminate: ok, then the leg's end.
    expect_ok(&mut bob, r1).await;
    let mut events = b_leg.end(CallState::Established, TERMINATED_LOCALLY);
    events.reverse();
    // The message gets its one answer (481: the call is over) and the second terminate is
    // `ok` (a terminated leg still known), wherever they fall among the end events.
    let (mut failed, mut ok3) = (false, false);
    let mut got = Vec::new();
    while !(failed && ok3 && events.is_empty()) {
        let m = match tokio::time::timeout(Duration::from_secs(2), bob.recv()).await {
            Ok(m) => m,
            Err(_) => panic!(
                "bob is missing frames (message rid {r2:?} answered: {failed}, terminate rid \
                 {r3:?} answered: {ok3}, end events left: {events:?}); got {got:?}"
            ),
        };
        match &m {
            ServerMsg::MessageFailed {
                rid, call, code, ..
            } if *rid == r2 && !failed => {
                assert_eq!((call.as_str(), *code), (b_leg.call.as_str(), 481));
                failed = true;
            }
            ServerMsg::Ok { rid } if *rid == r3 && !ok3 => ok3 = true,
            other if events.last() == Some(other) => {
                events.pop();
            }
            other => panic!("bob: unexpected {other:?} after {got:?}"),
        }
        got.push(m);
    }
    expect_end(
        &mut alice,
        &a_leg,
        CallState::Established,
        TERMINATED_REMOTELY,
    )
    .await;
}

#[tokio::test]
async fn requests_racing_the_end_of_a_call_are_still_answered() {
    let node = quiet_node();
    let mut alice = Raw::sign_in(node.addr, ALICE, "laptop").await;
    let mut bob = Raw::sign_in(node.addr, BOB, "desk").await;
    for round in 0..100 {
        let (a_leg, b_leg) = established_call(&mut alice, &mut bob).await;
        // alice hangs up while bob sends a message and a terminate of his own: each request
        // gets its one answer, whichever way the race goes (a message never gets silence).
        let a_rid = send_request(&mut alice, terminate(&a_leg)).await;
        let m_rid = send_request(
            &mut bob,
            ClientMsg::Message {
                rid: None,
                call: b_leg.call.clone(),
                content_type: "text/plain".into(),
                body: Body::Text("bye?".into()),
            },
        )
        .await;
        let t_rid = send_request(&mut bob, terminate(&b_leg)).await;

        let (mut answered, mut terminated_ok, mut ended) = (false, false, false);
        let mut got = Vec::new();
        while !(answered && terminated_ok && ended) {
            let m = match tokio::time::timeout(Duration::from_secs(2), bob.recv()).await {
                Ok(m) => m,
                Err(_) => panic!(
                    "round {round}: bob is missing an answer (message rid {m_rid:?}: \
                     {answered}, terminate rid {t_rid:?}: {terminated_ok}, end: {ended}); \
                     frames: {got:?}"
                ),
            };
            match &m {
                ServerMsg::MessageFailed { rid, .. } | ServerMsg::MessageDelivered { rid, .. }
                    if *rid == m_rid =>
                {
                    assert!(!answered, "round {round}: two answers to one message");
                    answered = true;
                }
                ServerMsg::Ok { rid } if *rid == t_rid => terminated_ok = true,
                ServerMsg::CallState {
                    state: CallState::Terminated,
                    ..
                } => ended = true,
                ServerMsg::CallState { .. } => {}
                other => panic!("round {round}: bob got {other:?}"),
            }
            got.push(m);
        }
        // alice: ok, then her leg's end; a message_received may come first if bob's message
        // got through before her terminate.
        let (m, _) = alice
            .recv_until(|m| !matches!(m, ServerMsg::MessageReceived { .. }))
            .await;
        assert_eq!(m, ServerMsg::Ok { rid: a_rid }, "round {round}");
        let (m, _) = alice
            .recv_until(|m| !matches!(m, ServerMsg::MessageReceived { .. }))
            .await;
        assert!(
            matches!(&m, ServerMsg::CallState { call, state: CallState::Terminating, .. } if *call == a_leg.call),
            "round {round}: {m:?}"
        );
        let (m, _) = alice
            .recv_until(|m| !matches!(m, ServerMsg::MessageReceived { .. }))
            .await;
        assert!(
            matches!(&m, ServerMsg::CallState { call, state: CallState::Terminated, .. } if *call == a_leg.call),
            "round {round}: {m:?}"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// the endpoint going away
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn bye_terminates_the_endpoints_calls_locally_then_closes() {
    let node = quiet_node();
    let mut alice = Raw::sign_in(node.addr, ALICE, "laptop").await;
    let mut bob = Raw::sign_in(node.addr, BOB, "desk").await;
    let (a_leg, b_leg) = established_call(&mut alice, &mut bob).await;
    request_ok(&mut alice, ClientMsg::Bye { rid: None }).await;
    // The call's events, then the close; nothing else.
    let rest = alice.expect_closed().await;
    assert_eq!(
        rest,
        a_leg.end(CallState::Established, TERMINATED_LOCALLY),
        "alice's frames after the ok to bye"
    );
    expect_end(
        &mut bob,
        &b_leg,
        CallState::Established,
        TERMINATED_REMOTELY,
    )
    .await;
}

#[tokio::test]
async fn losing_an_endpoint_ends_its_calls_408_for_the_other_side() {
    let node = quiet_node();
    let mut alice = Raw::sign_in(node.addr, ALICE, "laptop").await;
    let mut bob = Raw::sign_in(node.addr, BOB, "desk").await;
    let (_a_leg, b_leg) = established_call(&mut alice, &mut bob).await;
    drop(alice);
    expect_end(
        &mut bob,
        &b_leg,
        CallState::Established,
        (408, "Remote endpoint lost"),
    )
    .await;
}
