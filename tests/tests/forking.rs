//! End-to-end tests of the fork arbiter (contract §4 "Forking"), one test per rule, over real
//! TCP against a node started on ephemeral ports. Every test reads each connection's frames in
//! order and asserts them exactly (state, previous, reason code and text); the only relative
//! orders left open are the ones the contract leaves open (`call_ringing` versus its
//! establishing → establishing, and `call_state` → established versus `call_established`).

use confab_protocol::*;
use confab_tests::legs::{
    self, Leg, TERMINATED_LOCALLY, TERMINATED_REMOTELY, expect_callee_established,
    expect_caller_established, expect_end, expect_first_ringing, place_call_with, quiet_node,
    remote_of, terminate,
};
use confab_tests::*;
use std::time::{Duration, Instant};

const ALICE: &str = "sip:alice@example.com";
const BOB: &str = "sip:bob@example.com";
const CAROL: &str = "sip:carol@example.com";
const NOBODY: &str = "sip:nobody@example.com";

const COMPLETED_ELSEWHERE: (u16, &str) = (200, "Call completed elsewhere");
const TEMPORARILY_UNAVAILABLE: (u16, &str) = (480, "Temporarily Unavailable");

/// A node with the given fork timers.
fn node_with(toast_ms: u64, grace_ms: u64) -> confab_actors::RunningNode {
    start_node(move |s| {
        s.fork.toast_timeout_ms = toast_ms;
        s.fork.auto_accept_grace_ms = grace_ms;
    })
}

/// `call_establish` with the test offer: the reply first, then idle → establishing.
async fn place_call(caller: &mut Raw, to: &str, toast_text: Option<&str>) -> Leg {
    place_call_with(caller, to, None, toast_text, offer()).await
}

/// The next frame must be `call_incoming` from `caller` with the test offer.
async fn expect_incoming(
    callee: &mut Raw,
    caller: &Raw,
    toast_text: Option<&str>,
    immediate: bool,
) -> Leg {
    legs::expect_incoming(callee, &caller.user, toast_text, &offer(), immediate).await
}

/// `call_accept` that wins, on a call placed with the test offer.
async fn accept_and_win(callee: &mut Raw, leg: &Leg, caller: &Remote, toast_text: Option<&str>) {
    legs::accept_and_win(callee, leg, &offer(), caller, toast_text).await;
}

async fn decline(callee: &mut Raw, leg: &Leg, code: Option<u16>) {
    request_ok(
        callee,
        ClientMsg::CallDecline {
            rid: None,
            call: leg.call.clone(),
            code,
        },
    )
    .await;
}

async fn forward(callee: &mut Raw, leg: &Leg, to: &str) {
    request_ok(
        callee,
        ClientMsg::CallForward {
            rid: None,
            call: leg.call.clone(),
            to: to.to_owned(),
        },
    )
    .await;
}

/// Subscribes `raw` to its own user (its `presence` events then list the user's endpoints).
async fn watch_own_endpoints(raw: &mut Raw) {
    let users = vec![raw.user.clone()];
    request_ok(raw, ClientMsg::Subscribe { rid: None, users }).await;
}

/// Waits until `raw`'s own presence lists exactly `n` endpoints (it watches its own user).
async fn await_own_endpoint_count(raw: &mut Raw, n: usize) {
    raw.recv_until(|m| matches!(m, ServerMsg::Presence { endpoints: Some(e), .. } if e.len() == n))
        .await;
}

// ---------------------------------------------------------------------------------------------
// none: the call ends with 480
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn no_endpoint_caller_ends_480() {
    let node = quiet_node();
    let mut alice = Raw::sign_in(node.addr, ALICE, "laptop").await;
    let leg = place_call(&mut alice, NOBODY, Some("anyone?")).await;
    // No fork was created, so no call_ringing: the call ends at once.
    expect_end(
        &mut alice,
        &leg,
        CallState::Establishing,
        TEMPORARILY_UNAVAILABLE,
    )
    .await;
}

#[tokio::test]
async fn user_with_only_the_calling_endpoint_ends_480() {
    let node = quiet_node();
    let mut alice = Raw::sign_in(node.addr, ALICE, "laptop").await;
    let leg = place_call(&mut alice, ALICE, None).await;
    expect_end(
        &mut alice,
        &leg,
        CallState::Establishing,
        TEMPORARILY_UNAVAILABLE,
    )
    .await;
}

// ---------------------------------------------------------------------------------------------
// exactly one endpoint
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn single_endpoint_gets_immediate_auto_accept_and_accepting_establishes() {
    let node = quiet_node();
    let mut alice = Raw::sign_in(node.addr, ALICE, "laptop").await;
    let mut bob = Raw::sign_in(node.addr, BOB, "desk").await;
    let leg = place_call(&mut alice, BOB, Some("hi bob")).await;
    expect_first_ringing(&mut alice, &leg).await;
    let fork = expect_incoming(&mut bob, &alice, Some("hi bob"), true).await;
    accept_and_win(&mut bob, &fork, &remote_of(&alice), Some("hi bob")).await;
    expect_caller_established(&mut alice, &leg, remote_of(&bob)).await;
}

#[tokio::test]
async fn single_endpoint_gets_no_auto_accept_needed_and_ends_480_after_toast_plus_grace() {
    let (toast_ms, grace_ms) = (200, 200);
    let node = node_with(toast_ms, grace_ms);
    let mut alice = Raw::sign_in(node.addr, ALICE, "laptop").await;
    let mut bob = Raw::sign_in(node.addr, BOB, "desk").await;
    let started = Instant::now();
    let leg = place_call(&mut alice, BOB, Some("hi bob")).await;
    expect_first_ringing(&mut alice, &leg).await;
    let fork = expect_incoming(&mut bob, &alice, Some("hi bob"), true).await;
    // The very next frame is the end: no auto_accept_needed in between.
    expect_end(
        &mut bob,
        &fork,
        CallState::Incoming,
        TEMPORARILY_UNAVAILABLE,
    )
    .await;
    let elapsed = started.elapsed();
    assert!(
        elapsed >= Duration::from_millis(toast_ms + grace_ms),
        "the call ended after {elapsed:?}, before toast_timeout + auto_accept_grace"
    );
    expect_end(
        &mut alice,
        &leg,
        CallState::Establishing,
        TEMPORARILY_UNAVAILABLE,
    )
    .await;
}

// ---------------------------------------------------------------------------------------------
// two or more endpoints: toasts, first accept wins
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn two_or_more_endpoints_all_get_toasts_and_first_accept_wins() {
    let node = quiet_node();
    let mut alice = Raw::sign_in(node.addr, ALICE, "laptop").await;
    let mut bob1 = Raw::sign_in(node.addr, BOB, "desk").await;
    let mut bob2 = Raw::sign_in(node.addr, BOB, "phone").await;
    let mut bob3 = Raw::sign_in(node.addr, BOB, "tablet").await;
    let leg = place_call(&mut alice, BOB, Some("hi bob")).await;
    expect_first_ringing(&mut alice, &leg).await;
    let f1 = expect_incoming(&mut bob1, &alice, Some("hi bob"), false).await;
    let f2 = expect_incoming(&mut bob2, &alice, Some("hi bob"), false).await;
    let f3 = expect_incoming(&mut bob3, &alice, Some("hi bob"), false).await;
    // Each endpoint sees its own leg id.
    assert!(f1.call != f2.call && f2.call != f3.call && f1.call != f3.call);
    assert!(leg.call != f1.call && leg.call != f2.call && leg.call != f3.call);

    accept_and_win(&mut bob2, &f2, &remote_of(&alice), Some("hi bob")).await;
    expect_end(&mut bob1, &f1, CallState::Incoming, COMPLETED_ELSEWHERE).await;
    expect_end(&mut bob3, &f3, CallState::Incoming, COMPLETED_ELSEWHERE).await;
    expect_caller_established(&mut alice, &leg, remote_of(&bob2)).await;
}

#[tokio::test]
async fn later_accept_on_a_losing_fork_gets_answered_elsewhere() {
    let node = quiet_node();
    let mut alice = Raw::sign_in(node.addr, ALICE, "laptop").await;
    let mut bob1 = Raw::sign_in(node.addr, BOB, "desk").await;
    let mut bob2 = Raw::sign_in(node.addr, BOB, "phone").await;
    let leg = place_call(&mut alice, BOB, None).await;
    expect_first_ringing(&mut alice, &leg).await;
    let f1 = expect_incoming(&mut bob1, &alice, None, false).await;
    let f2 = expect_incoming(&mut bob2, &alice, None, false).await;
    accept_and_win(&mut bob1, &f1, &remote_of(&alice), None).await;
    expect_end(&mut bob2, &f2, CallState::Incoming, COMPLETED_ELSEWHERE).await;

    let rid = send_request(
        &mut bob2,
        ClientMsg::CallAccept {
            rid: None,
            call: f2.call.clone(),
            sdp: answer(),
        },
    )
    .await;
    expect_error(&mut bob2, rid, ErrorCode::AnsweredElsewhere).await;
    expect_caller_established(&mut alice, &leg, remote_of(&bob1)).await;
}

#[tokio::test]
async fn caller_sees_ringing_then_established_with_answer_and_remote() {
    let node = quiet_node();
    let mut alice = Raw::sign_in(node.addr, ALICE, "laptop").await;
    let mut bob1 = Raw::sign_in(node.addr, BOB, "desk").await;
    let mut bob2 = Raw::sign_in(node.addr, BOB, "phone").await;
    // Exactly: call_created, idle → establishing, call_ringing with establishing →
    // establishing, establishing → established with call_established{sdp: answer, remote}.
    let leg = place_call(&mut alice, BOB, None).await;
    expect_first_ringing(&mut alice, &leg).await;
    let _f1 = expect_incoming(&mut bob1, &alice, None, false).await;
    let f2 = expect_incoming(&mut bob2, &alice, None, false).await;
    accept_and_win(&mut bob2, &f2, &remote_of(&alice), None).await;
    expect_caller_established(&mut alice, &leg, remote_of(&bob2)).await;
}

#[tokio::test]
async fn toast_arrives_as_the_winners_first_message_right_after_call_established() {
    let node = quiet_node();
    let mut alice = Raw::sign_in(node.addr, ALICE, "laptop").await;
    let mut bob1 = Raw::sign_in(node.addr, BOB, "desk").await;
    let mut bob2 = Raw::sign_in(node.addr, BOB, "phone").await;
    let leg = place_call(&mut alice, BOB, Some("the toast")).await;
    expect_first_ringing(&mut alice, &leg).await;
    let f1 = expect_incoming(&mut bob1, &alice, Some("the toast"), false).await;
    let f2 = expect_incoming(&mut bob2, &alice, Some("the toast"), false).await;
    // The winner: ok, states, call_established, then message_received{toast:true, msg:1}.
    accept_and_win(&mut bob1, &f1, &remote_of(&alice), Some("the toast")).await;
    // The loser gets no toast message: its next frames are its end.
    expect_end(&mut bob2, &f2, CallState::Incoming, COMPLETED_ELSEWHERE).await;
    expect_caller_established(&mut alice, &leg, remote_of(&bob1)).await;

    // Acking the toast is allowed and ignored: the caller gets no message_delivered for it,
    // so the first delivery report it sees is the one for its own message, msg 2.
    bob1.send(&ClientMsg::MessageAck {
        call: f1.call.clone(),
        msg: 1,
    })
    .await;
    let rid = send_request(
        &mut alice,
        ClientMsg::Message {
            rid: None,
            call: leg.call.clone(),
            content_type: "text/plain".into(),
            body: Body::Text("after the toast".into()),
        },
    )
    .await;
    expect(
        &mut bob1,
        ServerMsg::MessageReceived {
            call: f1.call.clone(),
            msg: 2,
            from: alice.user.clone(),
            content_type: "text/plain".into(),
            body: Body::Text("after the toast".into()),
            toast: None,
        },
    )
    .await;
    bob1.send(&ClientMsg::MessageAck {
        call: f1.call.clone(),
        msg: 2,
    })
    .await;
    expect(
        &mut alice,
        ServerMsg::MessageDelivered {
            rid,
            call: leg.call.clone(),
            msg: 2,
        },
    )
    .await;
}

// ---------------------------------------------------------------------------------------------
// nobody clicks: auto-accept by the most active endpoint
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn nobody_clicks_auto_accept_needed_goes_to_the_most_active_endpoint() {
    // The grace is long so that only the first candidate can be asked during this test.
    let node = node_with(300, 3_000);
    let mut alice = Raw::sign_in(node.addr, ALICE, "laptop").await;
    // The away endpoint signs in first and publishes last, so neither sign-in order nor the
    // latest publication would pick the right one: only the activity does.
    let mut bob_away = Raw::sign_in(node.addr, BOB, "old-laptop").await;
    let mut bob_active = Raw::sign_in(node.addr, BOB, "phone").await;
    publish(&mut bob_active, Activity::Active, None).await;
    publish(&mut bob_away, Activity::Away, None).await;

    let leg = place_call(&mut alice, BOB, Some("hi")).await;
    expect_first_ringing(&mut alice, &leg).await;
    let f_away = expect_incoming(&mut bob_away, &alice, Some("hi"), false).await;
    let f_active = expect_incoming(&mut bob_active, &alice, Some("hi"), false).await;

    expect(
        &mut bob_active,
        ServerMsg::AutoAcceptNeeded {
            call: f_active.call.clone(),
        },
    )
    .await;
    accept_and_win(&mut bob_active, &f_active, &remote_of(&alice), Some("hi")).await;
    // The other endpoint never got auto_accept_needed and ends as after a click.
    expect_end(
        &mut bob_away,
        &f_away,
        CallState::Incoming,
        COMPLETED_ELSEWHERE,
    )
    .await;
    expect_caller_established(&mut alice, &leg, remote_of(&bob_active)).await;
}

#[tokio::test]
async fn equal_activity_the_endpoint_with_the_latest_input_gets_auto_accept_needed() {
    let node = node_with(300, 3_000);
    let mut alice = Raw::sign_in(node.addr, ALICE, "laptop").await;
    // Both active (idle below inactive_after); the idle one signs in first and publishes
    // last, so only "latest last input" (stamp − idle_ms) picks the fresh one.
    let mut bob_idle = Raw::sign_in(node.addr, BOB, "desk").await;
    let mut bob_fresh = Raw::sign_in(node.addr, BOB, "phone").await;
    publish(&mut bob_fresh, Activity::Active, Some(0)).await;
    publish(&mut bob_idle, Activity::Active, Some(120_000)).await;

    let leg = place_call(&mut alice, BOB, None).await;
    expect_first_ringing(&mut alice, &leg).await;
    let f_idle = expect_incoming(&mut bob_idle, &alice, None, false).await;
    let f_fresh = expect_incoming(&mut bob_fresh, &alice, None, false).await;
    expect(
        &mut bob_fresh,
        ServerMsg::AutoAcceptNeeded {
            call: f_fresh.call.clone(),
        },
    )
    .await;
    accept_and_win(&mut bob_fresh, &f_fresh, &remote_of(&alice), None).await;
    expect_end(
        &mut bob_idle,
        &f_idle,
        CallState::Incoming,
        COMPLETED_ELSEWHERE,
    )
    .await;
    expect_caller_established(&mut alice, &leg, remote_of(&bob_fresh)).await;
}

#[tokio::test]
async fn auto_accept_candidate_not_accepting_within_grace_passes_to_the_next() {
    let grace_ms = 800;
    let node = node_with(200, grace_ms);
    let mut alice = Raw::sign_in(node.addr, ALICE, "laptop").await;
    let mut bob_second = Raw::sign_in(node.addr, BOB, "desk").await;
    let mut bob_first = Raw::sign_in(node.addr, BOB, "phone").await;
    publish(&mut bob_first, Activity::Active, None).await;
    publish(&mut bob_second, Activity::Inactive, None).await;

    let leg = place_call(&mut alice, BOB, None).await;
    expect_first_ringing(&mut alice, &leg).await;
    let f_second = expect_incoming(&mut bob_second, &alice, None, false).await;
    let f_first = expect_incoming(&mut bob_first, &alice, None, false).await;

    expect(
        &mut bob_first,
        ServerMsg::AutoAcceptNeeded {
            call: f_first.call.clone(),
        },
    )
    .await;
    let asked_first = Instant::now();
    // bob_first ignores it; after the grace the next one is asked.
    expect(
        &mut bob_second,
        ServerMsg::AutoAcceptNeeded {
            call: f_second.call.clone(),
        },
    )
    .await;
    let gap = asked_first.elapsed();
    assert!(
        gap >= Duration::from_millis(grace_ms / 2),
        "the next candidate was asked {gap:?} after the first, well before the grace"
    );
    accept_and_win(&mut bob_second, &f_second, &remote_of(&alice), None).await;
    // The first candidate still held its fork; it ends as after a click elsewhere.
    expect_end(
        &mut bob_first,
        &f_first,
        CallState::Incoming,
        COMPLETED_ELSEWHERE,
    )
    .await;
    expect_caller_established(&mut alice, &leg, remote_of(&bob_second)).await;
}

#[tokio::test]
async fn auto_accept_candidate_declining_passes_to_the_next_at_once() {
    // A grace far longer than "at once" may take.
    let node = node_with(200, 4_000);
    let mut alice = Raw::sign_in(node.addr, ALICE, "laptop").await;
    let mut bob_second = Raw::sign_in(node.addr, BOB, "desk").await;
    let mut bob_first = Raw::sign_in(node.addr, BOB, "phone").await;
    publish(&mut bob_first, Activity::Active, None).await;
    publish(&mut bob_second, Activity::Away, None).await;

    let leg = place_call(&mut alice, BOB, None).await;
    expect_first_ringing(&mut alice, &leg).await;
    let f_second = expect_incoming(&mut bob_second, &alice, None, false).await;
    let f_first = expect_incoming(&mut bob_first, &alice, None, false).await;
    expect(
        &mut bob_first,
        ServerMsg::AutoAcceptNeeded {
            call: f_first.call.clone(),
        },
    )
    .await;
    let declined_at = Instant::now();
    decline(&mut bob_first, &f_first, Some(486)).await;
    expect_end(
        &mut bob_first,
        &f_first,
        CallState::Incoming,
        (486, "Busy Here"),
    )
    .await;
    expect(
        &mut bob_second,
        ServerMsg::AutoAcceptNeeded {
            call: f_second.call.clone(),
        },
    )
    .await;
    let waited = declined_at.elapsed();
    assert!(
        waited < Duration::from_millis(2_000),
        "the next candidate was asked {waited:?} after the decline, not at once"
    );
    accept_and_win(&mut bob_second, &f_second, &remote_of(&alice), None).await;
    expect_caller_established(&mut alice, &leg, remote_of(&bob_second)).await;
}

#[tokio::test]
async fn auto_accept_candidate_lost_passes_to_the_next_at_once() {
    let node = node_with(200, 4_000);
    let mut alice = Raw::sign_in(node.addr, ALICE, "laptop").await;
    let mut bob_second = Raw::sign_in(node.addr, BOB, "desk").await;
    let mut bob_first = Raw::sign_in(node.addr, BOB, "phone").await;
    publish(&mut bob_first, Activity::Active, None).await;
    publish(&mut bob_second, Activity::Away, None).await;

    let leg = place_call(&mut alice, BOB, None).await;
    expect_first_ringing(&mut alice, &leg).await;
    let f_second = expect_incoming(&mut bob_second, &alice, None, false).await;
    let f_first = expect_incoming(&mut bob_first, &alice, None, false).await;
    expect(
        &mut bob_first,
        ServerMsg::AutoAcceptNeeded {
            call: f_first.call.clone(),
        },
    )
    .await;
    let lost_at = Instant::now();
    drop(bob_first);
    expect(
        &mut bob_second,
        ServerMsg::AutoAcceptNeeded {
            call: f_second.call.clone(),
        },
    )
    .await;
    let waited = lost_at.elapsed();
    assert!(
        waited < Duration::from_millis(2_000),
        "the next candidate was asked {waited:?} after the loss, not at once"
    );
    accept_and_win(&mut bob_second, &f_second, &remote_of(&alice), None).await;
    expect_caller_established(&mut alice, &leg, remote_of(&bob_second)).await;
}

#[tokio::test]
async fn auto_accept_with_no_candidate_left_ends_480_for_caller_and_forks() {
    let node = node_with(150, 150);
    let mut alice = Raw::sign_in(node.addr, ALICE, "laptop").await;
    let mut bob1 = Raw::sign_in(node.addr, BOB, "desk").await;
    let mut bob2 = Raw::sign_in(node.addr, BOB, "phone").await;
    publish(&mut bob1, Activity::Active, None).await;
    publish(&mut bob2, Activity::Inactive, None).await;

    let leg = place_call(&mut alice, BOB, Some("hello?")).await;
    expect_first_ringing(&mut alice, &leg).await;
    let f1 = expect_incoming(&mut bob1, &alice, Some("hello?"), false).await;
    let f2 = expect_incoming(&mut bob2, &alice, Some("hello?"), false).await;
    // Each is asked in turn, nobody accepts, then everybody gets 480.
    for (bob, fork) in [(&mut bob1, &f1), (&mut bob2, &f2)] {
        expect(
            bob,
            ServerMsg::AutoAcceptNeeded {
                call: fork.call.clone(),
            },
        )
        .await;
    }
    expect_end(&mut bob1, &f1, CallState::Incoming, TEMPORARILY_UNAVAILABLE).await;
    expect_end(&mut bob2, &f2, CallState::Incoming, TEMPORARILY_UNAVAILABLE).await;
    expect_end(
        &mut alice,
        &leg,
        CallState::Establishing,
        TEMPORARILY_UNAVAILABLE,
    )
    .await;
}

#[tokio::test]
async fn a_fork_can_still_be_clicked_during_the_auto_accept_phase() {
    let node = node_with(200, 4_000);
    let mut alice = Raw::sign_in(node.addr, ALICE, "laptop").await;
    let mut bob_candidate = Raw::sign_in(node.addr, BOB, "desk").await;
    let mut bob_other = Raw::sign_in(node.addr, BOB, "phone").await;
    publish(&mut bob_candidate, Activity::Active, None).await;
    publish(&mut bob_other, Activity::Away, None).await;

    let leg = place_call(&mut alice, BOB, Some("hey")).await;
    expect_first_ringing(&mut alice, &leg).await;
    let f_cand = expect_incoming(&mut bob_candidate, &alice, Some("hey"), false).await;
    let f_other = expect_incoming(&mut bob_other, &alice, Some("hey"), false).await;
    expect(
        &mut bob_candidate,
        ServerMsg::AutoAcceptNeeded {
            call: f_cand.call.clone(),
        },
    )
    .await;
    // While the candidate is being asked, the other endpoint clicks its toast and wins.
    accept_and_win(&mut bob_other, &f_other, &remote_of(&alice), Some("hey")).await;
    expect_end(
        &mut bob_candidate,
        &f_cand,
        CallState::Incoming,
        COMPLETED_ELSEWHERE,
    )
    .await;
    expect_caller_established(&mut alice, &leg, remote_of(&bob_other)).await;
}

// ---------------------------------------------------------------------------------------------
// declines and lost forks
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn decline_4xx_5xx_removes_only_that_fork() {
    let node = quiet_node();
    let mut alice = Raw::sign_in(node.addr, ALICE, "laptop").await;
    let mut bob1 = Raw::sign_in(node.addr, BOB, "desk").await;
    let mut bob2 = Raw::sign_in(node.addr, BOB, "phone").await;
    let mut bob3 = Raw::sign_in(node.addr, BOB, "tablet").await;
    let leg = place_call(&mut alice, BOB, None).await;
    expect_first_ringing(&mut alice, &leg).await;
    let f1 = expect_incoming(&mut bob1, &alice, None, false).await;
    let f2 = expect_incoming(&mut bob2, &alice, None, false).await;
    let f3 = expect_incoming(&mut bob3, &alice, None, false).await;

    // The default decline code is 486.
    decline(&mut bob1, &f1, None).await;
    expect_end(&mut bob1, &f1, CallState::Incoming, (486, "Busy Here")).await;
    // Another 5xx code: this endpoint only, its leg ends with the code given.
    decline(&mut bob2, &f2, Some(500)).await;
    for state in [CallState::Terminating, CallState::Terminated] {
        match bob2.recv().await {
            ServerMsg::CallState {
                call,
                state: s,
                reason: Some(r),
                ..
            } if call == f2.call && s == state && r.code == 500 => {}
            other => panic!("expected {state:?} with reason 500, got {other:?}"),
        }
    }
    // The remaining fork still rings and can win; the caller saw nothing meanwhile.
    accept_and_win(&mut bob3, &f3, &remote_of(&alice), None).await;
    expect_caller_established(&mut alice, &leg, remote_of(&bob3)).await;
}

#[tokio::test]
async fn all_forks_decline_486_caller_gets_486_busy_here() {
    let node = quiet_node();
    let mut alice = Raw::sign_in(node.addr, ALICE, "laptop").await;
    let mut bob1 = Raw::sign_in(node.addr, BOB, "desk").await;
    let mut bob2 = Raw::sign_in(node.addr, BOB, "phone").await;
    let leg = place_call(&mut alice, BOB, None).await;
    expect_first_ringing(&mut alice, &leg).await;
    let f1 = expect_incoming(&mut bob1, &alice, None, false).await;
    let f2 = expect_incoming(&mut bob2, &alice, None, false).await;
    decline(&mut bob1, &f1, Some(486)).await;
    expect_end(&mut bob1, &f1, CallState::Incoming, (486, "Busy Here")).await;
    decline(&mut bob2, &f2, Some(486)).await;
    expect_end(&mut bob2, &f2, CallState::Incoming, (486, "Busy Here")).await;
    expect_end(
        &mut alice,
        &leg,
        CallState::Establishing,
        (486, "Busy Here"),
    )
    .await;
}

#[tokio::test]
async fn decline_603_ends_the_call_caller_603_and_other_forks_declined_elsewhere() {
    let node = quiet_node();
    let mut alice = Raw::sign_in(node.addr, ALICE, "laptop").await;
    let mut bob1 = Raw::sign_in(node.addr, BOB, "desk").await;
    let mut bob2 = Raw::sign_in(node.addr, BOB, "phone").await;
    let mut bob3 = Raw::sign_in(node.addr, BOB, "tablet").await;
    let leg = place_call(&mut alice, BOB, None).await;
    expect_first_ringing(&mut alice, &leg).await;
    let f1 = expect_incoming(&mut bob1, &alice, None, false).await;
    let f2 = expect_incoming(&mut bob2, &alice, None, false).await;
    let f3 = expect_incoming(&mut bob3, &alice, None, false).await;
    decline(&mut bob2, &f2, Some(603)).await;
    expect_end(&mut bob2, &f2, CallState::Incoming, (603, "Decline")).await;
    expect_end(
        &mut bob1,
        &f1,
        CallState::Incoming,
        (603, "Declined elsewhere"),
    )
    .await;
    expect_end(
        &mut bob3,
        &f3,
        CallState::Incoming,
        (603, "Declined elsewhere"),
    )
    .await;
    expect_end(&mut alice, &leg, CallState::Establishing, (603, "Decline")).await;
}

#[tokio::test]
async fn lost_fork_is_removed_and_the_others_still_ring() {
    let node = quiet_node();
    let mut alice = Raw::sign_in(node.addr, ALICE, "laptop").await;
    let mut bob1 = Raw::sign_in(node.addr, BOB, "desk").await;
    let mut bob2 = Raw::sign_in(node.addr, BOB, "phone").await;
    watch_own_endpoints(&mut bob2).await;
    await_own_endpoint_count(&mut bob2, 2).await;
    let leg = place_call(&mut alice, BOB, None).await;
    expect_first_ringing(&mut alice, &leg).await;
    let _f1 = expect_incoming(&mut bob1, &alice, None, false).await;
    let (m, _) = bob2
        .recv_until(|m| matches!(m, ServerMsg::CallIncoming { .. }))
        .await;
    let ServerMsg::CallIncoming {
        call, conversation, ..
    } = m
    else {
        unreachable!()
    };
    let f2 = Leg {
        call,
        conversation,
        direction: Direction::Inbound,
    };
    // bob1's connection drops; once bob2 sees it gone, the call still rings on bob2.
    drop(bob1);
    await_own_endpoint_count(&mut bob2, 1).await;
    accept_and_win(&mut bob2, &f2, &remote_of(&alice), None).await;
    expect_caller_established(&mut alice, &leg, remote_of(&bob2)).await;
}

#[tokio::test]
async fn losing_the_last_fork_ends_the_call_480() {
    // Timers never fire: the 480 can only come from the lost forks.
    let node = quiet_node();
    let mut alice = Raw::sign_in(node.addr, ALICE, "laptop").await;
    let mut bob1 = Raw::sign_in(node.addr, BOB, "desk").await;
    let mut bob2 = Raw::sign_in(node.addr, BOB, "phone").await;
    let leg = place_call(&mut alice, BOB, None).await;
    expect_first_ringing(&mut alice, &leg).await;
    expect_incoming(&mut bob1, &alice, None, false).await;
    expect_incoming(&mut bob2, &alice, None, false).await;
    drop(bob1);
    drop(bob2);
    expect_end(
        &mut alice,
        &leg,
        CallState::Establishing,
        TEMPORARILY_UNAVAILABLE,
    )
    .await;
}

#[tokio::test]
async fn last_fork_gone_a_decline_beats_a_lost_fork() {
    let node = quiet_node();
    let mut alice = Raw::sign_in(node.addr, ALICE, "laptop").await;
    let mut bob1 = Raw::sign_in(node.addr, BOB, "desk").await;
    let mut bob2 = Raw::sign_in(node.addr, BOB, "phone").await;
    let leg = place_call(&mut alice, BOB, None).await;
    expect_first_ringing(&mut alice, &leg).await;
    expect_incoming(&mut bob1, &alice, None, false).await;
    let f2 = expect_incoming(&mut bob2, &alice, None, false).await;
    drop(bob1);
    decline(&mut bob2, &f2, Some(486)).await;
    expect_end(&mut bob2, &f2, CallState::Incoming, (486, "Busy Here")).await;
    // A lost fork counts as 480; within the 4xx class the decline wins, whatever the order.
    expect_end(
        &mut alice,
        &leg,
        CallState::Establishing,
        (486, "Busy Here"),
    )
    .await;
}

#[tokio::test]
async fn last_fork_gone_the_lowest_class_wins_a_lost_fork_over_a_5xx_decline() {
    let node = quiet_node();
    let mut alice = Raw::sign_in(node.addr, ALICE, "laptop").await;
    let mut bob1 = Raw::sign_in(node.addr, BOB, "desk").await;
    let mut bob2 = Raw::sign_in(node.addr, BOB, "phone").await;
    let leg = place_call(&mut alice, BOB, None).await;
    expect_first_ringing(&mut alice, &leg).await;
    let f1 = expect_incoming(&mut bob1, &alice, None, false).await;
    expect_incoming(&mut bob2, &alice, None, false).await;
    decline(&mut bob1, &f1, Some(500)).await;
    bob1.recv_until(|m| {
        matches!(
            m,
            ServerMsg::CallState {
                state: CallState::Terminated,
                ..
            }
        )
    })
    .await;
    drop(bob2);
    // 500 versus a lost fork (480): the lowest class, 4xx, wins.
    expect_end(
        &mut alice,
        &leg,
        CallState::Establishing,
        TEMPORARILY_UNAVAILABLE,
    )
    .await;
}

#[tokio::test]
async fn caller_terminating_while_forks_ring_ends_them_487() {
    let node = quiet_node();
    let mut alice = Raw::sign_in(node.addr, ALICE, "laptop").await;
    let mut bob1 = Raw::sign_in(node.addr, BOB, "desk").await;
    let mut bob2 = Raw::sign_in(node.addr, BOB, "phone").await;
    let leg = place_call(&mut alice, BOB, Some("never mind")).await;
    expect_first_ringing(&mut alice, &leg).await;
    let f1 = expect_incoming(&mut bob1, &alice, Some("never mind"), false).await;
    let f2 = expect_incoming(&mut bob2, &alice, Some("never mind"), false).await;
    request_ok(&mut alice, terminate(&leg)).await;
    expect_end(
        &mut alice,
        &leg,
        CallState::Establishing,
        TERMINATED_LOCALLY,
    )
    .await;
    expect_end(
        &mut bob1,
        &f1,
        CallState::Incoming,
        (487, "Request Terminated"),
    )
    .await;
    expect_end(
        &mut bob2,
        &f2,
        CallState::Incoming,
        (487, "Request Terminated"),
    )
    .await;
}

// ---------------------------------------------------------------------------------------------
// forwarding
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn call_forward_ends_all_forks_302_and_retargets_the_call() {
    let node = quiet_node();
    let mut alice = Raw::sign_in(node.addr, ALICE, "laptop").await;
    let mut bob1 = Raw::sign_in(node.addr, BOB, "desk").await;
    let mut bob2 = Raw::sign_in(node.addr, BOB, "phone").await;
    let mut carol = Raw::sign_in(node.addr, CAROL, "laptop").await;
    let leg = place_call(&mut alice, BOB, Some("for bob")).await;
    expect_first_ringing(&mut alice, &leg).await;
    let f1 = expect_incoming(&mut bob1, &alice, Some("for bob"), false).await;
    let f2 = expect_incoming(&mut bob2, &alice, Some("for bob"), false).await;

    // The target is written with an upper-case host; the node echoes the normalised form.
    forward(&mut bob1, &f1, "sip:carol@Example.COM").await;
    expect_end(
        &mut bob1,
        &f1,
        CallState::Incoming,
        (302, "Moved Temporarily"),
    )
    .await;
    expect_end(
        &mut bob2,
        &f2,
        CallState::Incoming,
        (302, "Moved Temporarily"),
    )
    .await;
    // The caller stays establishing: call_forwarded, then a new call_ringing, no call_state.
    expect(
        &mut alice,
        ServerMsg::CallForwarded {
            call: leg.call.clone(),
            to: CAROL.to_owned(),
        },
    )
    .await;
    expect(
        &mut alice,
        ServerMsg::CallRinging {
            call: leg.call.clone(),
        },
    )
    .await;
    // The new target is forked with the same from, offer and toast (one endpoint: immediate).
    let fc = expect_incoming(&mut carol, &alice, Some("for bob"), true).await;
    accept_and_win(&mut carol, &fc, &remote_of(&alice), Some("for bob")).await;
    expect_caller_established(&mut alice, &leg, remote_of(&carol)).await;
}

#[tokio::test]
async fn more_than_8_forwards_ends_the_call_483_too_many_hops() {
    let node = quiet_node();
    let mut alice = Raw::sign_in(node.addr, ALICE, "laptop").await;
    let mut bob = Raw::sign_in(node.addr, BOB, "desk").await;
    let mut carol = Raw::sign_in(node.addr, CAROL, "desk").await;
    let leg = place_call(&mut alice, BOB, None).await;
    expect_first_ringing(&mut alice, &leg).await;
    // bob and carol bounce the call to each other: forwards 1..=8 re-target it, the 9th fails.
    for hop in 1..=9u32 {
        let (here, there) = if hop % 2 == 1 {
            (&mut bob, CAROL)
        } else {
            (&mut carol, BOB)
        };
        let fork = expect_incoming(here, &alice, None, true).await;
        forward(here, &fork, there).await;
        expect_end(here, &fork, CallState::Incoming, (302, "Moved Temporarily")).await;
        if hop <= 8 {
            expect(
                &mut alice,
                ServerMsg::CallForwarded {
                    call: leg.call.clone(),
                    to: there.to_owned(),
                },
            )
            .await;
            expect(
                &mut alice,
                ServerMsg::CallRinging {
                    call: leg.call.clone(),
                },
            )
            .await;
        }
    }
    expect_end(
        &mut alice,
        &leg,
        CallState::Establishing,
        (483, "Too Many Hops"),
    )
    .await;
}

// ---------------------------------------------------------------------------------------------
// who is forked to
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn calling_your_own_user_rings_only_your_other_device() {
    let node = quiet_node();
    let mut alice1 = Raw::sign_in(node.addr, ALICE, "laptop").await;
    let mut alice2 = Raw::sign_in(node.addr, ALICE, "phone").await;
    // The caller's own stream holds only its outbound leg's events: no call_incoming.
    let leg = place_call(&mut alice1, ALICE, Some("note to self")).await;
    expect_first_ringing(&mut alice1, &leg).await;
    // One other endpoint: it alone is forked, with immediate_auto_accept.
    let fork = expect_incoming(&mut alice2, &alice1, Some("note to self"), true).await;
    accept_and_win(
        &mut alice2,
        &fork,
        &remote_of(&alice1),
        Some("note to self"),
    )
    .await;
    expect_caller_established(&mut alice1, &leg, remote_of(&alice2)).await;
}

#[tokio::test]
async fn endpoints_signing_in_after_the_fork_get_nothing() {
    let node = node_with(200, 3_000);
    let mut alice = Raw::sign_in(node.addr, ALICE, "laptop").await;
    let mut bob_away = Raw::sign_in(node.addr, BOB, "desk").await;
    let mut bob_inactive = Raw::sign_in(node.addr, BOB, "phone").await;
    publish(&mut bob_away, Activity::Away, None).await;
    publish(&mut bob_inactive, Activity::Inactive, None).await;
    let leg = place_call(&mut alice, BOB, None).await;
    expect_first_ringing(&mut alice, &leg).await;
    let f_away = expect_incoming(&mut bob_away, &alice, None, false).await;
    let f_inactive = expect_incoming(&mut bob_inactive, &alice, None, false).await;

    // A new, most active endpoint signs in while the forks ring: no fork, and it is not a
    // candidate when the toast times out.
    let mut bob_late = Raw::sign_in(node.addr, BOB, "tablet").await;
    publish(&mut bob_late, Activity::Active, None).await;
    expect(
        &mut bob_inactive,
        ServerMsg::AutoAcceptNeeded {
            call: f_inactive.call.clone(),
        },
    )
    .await;
    accept_and_win(&mut bob_inactive, &f_inactive, &remote_of(&alice), None).await;
    expect_end(
        &mut bob_away,
        &f_away,
        CallState::Incoming,
        COMPLETED_ELSEWHERE,
    )
    .await;
    expect_caller_established(&mut alice, &leg, remote_of(&bob_inactive)).await;
    bob_late.expect_silence(Duration::from_millis(200)).await;
}

/// After a `call_accept` (rid `rid`) raced another fork's: the winner's frames are `ok` then its
/// states and `call_established`; the loser's are `answered_elsewhere` and its 200 "Call
/// completed elsewhere" end, in either order (the end is not caused by its request). Returns
/// whether this fork won.
async fn accept_outcome(raw: &mut Raw, leg: &Leg, rid: Option<u32>, caller: &Remote) -> bool {
    let first = raw.recv().await;
    if first == (ServerMsg::Ok { rid }) {
        expect_callee_established(raw, leg, &offer(), caller.clone()).await;
        return true;
    }
    // Error texts are free; compare errors by rid and code only.
    let blank = |m: ServerMsg| match m {
        ServerMsg::Error { rid, code, .. } => ServerMsg::Error {
            rid,
            code,
            message: String::new(),
        },
        other => other,
    };
    let reason = Some(Reason::new(COMPLETED_ELSEWHERE.0, COMPLETED_ELSEWHERE.1));
    let error = ServerMsg::Error {
        rid,
        code: ErrorCode::AnsweredElsewhere,
        message: String::new(),
    };
    let terminating = leg.state(CallState::Terminating, CallState::Incoming, reason.clone());
    let terminated = leg.state(CallState::Terminated, CallState::Terminating, reason);
    let mut got = vec![blank(first)];
    while got.len() < 3 {
        match tokio::time::timeout(Duration::from_secs(2), raw.recv()).await {
            Ok(m) => got.push(blank(m)),
            Err(_) => panic!(
                "{}: the losing fork's call_accept (rid {rid:?}) got no reply; frames: {got:?}",
                raw.endpoint
            ),
        }
    }
    let position = |w: &ServerMsg| got.iter().position(|g| g == w);
    match (
        position(&error),
        position(&terminating),
        position(&terminated),
    ) {
        (Some(_), Some(t1), Some(t2)) if t1 < t2 => {}
        _ => panic!(
            "{}: the losing fork expected {error:?} and its end, got {got:?}",
            raw.endpoint
        ),
    }
    false
}

#[tokio::test]
async fn simultaneous_accepts_exactly_one_wins_the_other_gets_answered_elsewhere() {
    let node = quiet_node();
    let mut alice = Raw::sign_in(node.addr, ALICE, "laptop").await;
    let mut bob1 = Raw::sign_in(node.addr, BOB, "desk").await;
    let mut bob2 = Raw::sign_in(node.addr, BOB, "phone").await;
    for round in 0..200 {
        let leg = place_call(&mut alice, BOB, None).await;
        expect_first_ringing(&mut alice, &leg).await;
        let f1 = expect_incoming(&mut bob1, &alice, None, false).await;
        let f2 = expect_incoming(&mut bob2, &alice, None, false).await;
        // Both click at (nearly) the same time; which one sends first alternates.
        let accept = |f: &Leg| ClientMsg::CallAccept {
            rid: None,
            call: f.call.clone(),
            sdp: answer(),
        };
        let (rid1, rid2) = if round % 2 == 0 {
            let r1 = send_request(&mut bob1, accept(&f1)).await;
            (r1, send_request(&mut bob2, accept(&f2)).await)
        } else {
            let r2 = send_request(&mut bob2, accept(&f2)).await;
            (send_request(&mut bob1, accept(&f1)).await, r2)
        };
        let caller = remote_of(&alice);
        let won1 = accept_outcome(&mut bob1, &f1, rid1, &caller).await;
        let won2 = accept_outcome(&mut bob2, &f2, rid2, &caller).await;
        assert!(won1 != won2, "round {round}: exactly one fork wins");
        let (winner, w_leg) = if won1 {
            (&mut bob1, &f1)
        } else {
            (&mut bob2, &f2)
        };
        expect_caller_established(&mut alice, &leg, remote_of(winner)).await;
        request_ok(&mut alice, terminate(&leg)).await;
        expect_end(&mut alice, &leg, CallState::Established, TERMINATED_LOCALLY).await;
        expect_end(winner, w_leg, CallState::Established, TERMINATED_REMOTELY).await;
    }
}
