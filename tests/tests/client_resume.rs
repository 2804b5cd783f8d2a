//! The client library's resumable session (`ConnectionOptions::resume`, docs/protocol.md §3
//! "Resuming") against a real node, with the link failed for real by a relay in between
//! ([`CutProxy`]): messages both ways across a cut, a call that rings while the link is down,
//! a request in flight across a cut, a black-holed link only the heartbeat notices, a refused
//! resume and a window that passes (both `Lost`, nothing left waiting), `bye` and `shutdown`
//! that must not reconnect, and ~200 random cuts under a steady flow, each message exactly once.
#![allow(clippy::unwrap_used, clippy::print_stdout)]

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::Duration;

use confab_client::protocol::ClientMsg;
use confab_client::{
    AutoAcceptPolicy, CallState, ClientError, ConnectionOptions, Conversation, DeliveryError,
    Endpoint, EndpointEvent, EndpointEvents, EndpointOptions, Hello, InstantMessagingCall,
    LinkEvent, MessageStream, Reconnect, Status,
};
use confab_tests::cut::CutProxy;
use confab_tests::legs::quiet_node;
use confab_tests::{Raw, start_node, token};
use futures::future::join_all;

const ALICE: &str = "sip:alice@example.com";
const BOB: &str = "sip:bob@example.com";

/// Upper bound on any single wait; a safety net for a slow machine, never a pacing device.
const WAIT: Duration = Duration::from_secs(20);

async fn within<T>(what: &str, fut: impl Future<Output = T>) -> T {
    tokio::time::timeout(WAIT, fut)
        .await
        .unwrap_or_else(|_| panic!("timed out waiting for {what}"))
}

/// A node whose toast timer never fires within a test, with `tweak` applied.
fn node_with(tweak: impl FnOnce(&mut confab_actors::Settings)) -> confab_actors::RunningNode {
    start_node(|s| {
        s.fork.toast_timeout_ms = 60_000;
        s.fork.auto_accept_grace_ms = 60_000;
        tweak(s);
    })
}

/// Quick retries: a test's node is local, so a failed attempt is worth repeating soon.
fn quick_reconnect() -> Reconnect {
    Reconnect {
        first_delay: Duration::from_millis(40),
        max_delay: Duration::from_millis(200),
    }
}

async fn sign_in_with(
    addr: SocketAddr,
    user: &str,
    device: &str,
    policy: AutoAcceptPolicy,
    resume: Option<Reconnect>,
) -> Endpoint {
    let options = EndpointOptions {
        auto_accept: policy,
        connection: ConnectionOptions {
            resume,
            ..ConnectionOptions::default()
        },
        ..EndpointOptions::default()
    };
    within(
        "sign-in",
        Endpoint::connect_with(addr, Hello::new(user, token(user), device), options),
    )
    .await
    .unwrap()
}

/// A resumable endpoint signed in through `proxy`.
async fn resumable(proxy: &CutProxy, user: &str, policy: AutoAcceptPolicy) -> Endpoint {
    let endpoint = sign_in_with(proxy.addr, user, "phone", policy, Some(quick_reconnect())).await;
    assert!(
        endpoint.welcome().resume_window_ms.is_some(),
        "the node granted a resumable session"
    );
    endpoint
}

/// A plain endpoint straight to the node.
async fn plain(addr: SocketAddr, user: &str) -> Endpoint {
    sign_in_with(addr, user, "desk", AutoAcceptPolicy::Accept, None).await
}

/// The next link event (`Reconnecting`, `Resumed`, `Lost`), skipping the others.
async fn link_event(events: &mut EndpointEvents) -> LinkEvent {
    loop {
        let event = within("a link event", events.recv())
            .await
            .expect("the endpoint's events end only after a link event");
        if let EndpointEvent::Link(link) = event {
            return link;
        }
    }
}

/// Waits for the session to be resumed after a failed link; panics if it is lost.
async fn resumed(events: &mut EndpointEvents) {
    loop {
        match link_event(events).await {
            LinkEvent::Resumed { .. } => return,
            LinkEvent::Lost { reason } => panic!("session lost: {reason}"),
            _ => {}
        }
    }
}

/// Waits for the session to be lost; returns why. Panics if it is resumed instead.
async fn lost(events: &mut EndpointEvents) -> String {
    loop {
        match link_event(events).await {
            LinkEvent::Lost { reason } => return reason,
            LinkEvent::Resumed { .. } => panic!("resumed, but the session should be lost"),
            _ => {}
        }
    }
}

/// Bob (plain) calls Alice (resumable, through `proxy`, her only device: the library accepts
/// at once); returns both ends, established.
async fn call_to_resumable(
    node_addr: SocketAddr,
    proxy: &CutProxy,
) -> (
    Endpoint,
    InstantMessagingCall,
    Endpoint,
    InstantMessagingCall,
) {
    let alice = resumable(proxy, ALICE, AutoAcceptPolicy::Accept).await;
    let bob = plain(node_addr, BOB).await;
    let mut ringing = alice.incoming_calls();
    let bob_call = within(
        "establish",
        InstantMessagingCall::establish(&Conversation::new(&bob), ALICE, None, Default::default()),
    )
    .await
    .unwrap();
    let alice_call = within("call_incoming", ringing.recv()).await.unwrap();
    within("alice established", alice_call.established())
        .await
        .unwrap();
    (alice, alice_call, bob, bob_call)
}

fn text(body: &confab_client::protocol::Body) -> String {
    match body {
        confab_client::protocol::Body::Text(t) => t.clone(),
        confab_client::protocol::Body::Binary(b) => format!("{b:?}"),
    }
}

/// Reads messages until `got` holds `n`.
async fn read_messages(messages: &mut MessageStream, got: &mut Vec<String>, n: usize) {
    while got.len() < n {
        let m = within("a message", messages.recv())
            .await
            .expect("the call stays up");
        got.push(text(&m.body));
    }
}

/// Sends `{prefix}1..={prefix}n` at once (queued in that order); each send's one outcome.
async fn send_all(call: InstantMessagingCall, prefix: &'static str, n: u32) -> Vec<u32> {
    let flow = call.flow();
    let sends = (1..=n).map(|i| {
        let flow = flow.clone();
        async move { flow.send_text(&format!("{prefix}{i}")).await }
    });
    join_all(sends)
        .await
        .into_iter()
        .enumerate()
        .map(|(i, r)| r.unwrap_or_else(|e| panic!("{prefix}{}: {e}", i + 1)))
        .collect()
}

fn expected(prefix: &str, n: u32) -> Vec<String> {
    (1..=n).map(|i| format!("{prefix}{i}")).collect()
}

/// Each side sends one more message, which must be the next one the other reads: nothing
/// was received twice (messages of a call arrive in the order sent).
async fn nothing_more(
    a: &InstantMessagingCall,
    a_in: &mut MessageStream,
    b: &InstantMessagingCall,
    b_in: &mut MessageStream,
) {
    within("the last message", a.flow().send_text("a-last"))
        .await
        .unwrap();
    within("the last message", b.flow().send_text("b-last"))
        .await
        .unwrap();
    let mut got = Vec::new();
    read_messages(b_in, &mut got, 1).await;
    read_messages(a_in, &mut got, 2).await;
    assert_eq!(got, ["a-last", "b-last"]);
}

#[tokio::test]
async fn messages_both_ways_across_a_cut_arrive_once_and_each_send_is_answered_once() {
    const N: u32 = 40;
    let node = quiet_node();
    let proxy = CutProxy::start(node.addr).await;
    let (alice, alice_call, _bob, bob_call) = call_to_resumable(node.addr, &proxy).await;
    let mut events = alice.events();
    let mut alice_in = alice_call.flow().received();
    let mut bob_in = bob_call.flow().received();

    let alice_sends = tokio::spawn(send_all(alice_call.clone(), "a", N));
    let bob_sends = tokio::spawn(send_all(bob_call.clone(), "b", N));
    // Alice has read a few of Bob's messages when the link fails, the rest in flight.
    let mut alice_got = Vec::new();
    read_messages(&mut alice_in, &mut alice_got, 3).await;
    proxy.cut();
    resumed(&mut events).await;

    read_messages(&mut alice_in, &mut alice_got, N as usize).await;
    let mut bob_got = Vec::new();
    read_messages(&mut bob_in, &mut bob_got, N as usize).await;
    assert_eq!(alice_got, expected("b", N));
    assert_eq!(bob_got, expected("a", N));
    for sends in [alice_sends, bob_sends] {
        let mut numbers = within("every send answered", sends).await.unwrap();
        numbers.sort_unstable();
        numbers.dedup();
        assert_eq!(numbers.len(), N as usize, "each message its own number");
    }
    nothing_more(&alice_call, &mut alice_in, &bob_call, &mut bob_in).await;
}

#[tokio::test]
async fn a_call_that_rings_while_the_link_is_down_can_be_accepted_after_the_resume() {
    let node = node_with(|s| {
        s.server.heartbeat_ms = 300;
    });
    let proxy = CutProxy::start(node.addr).await;
    let alice = resumable(&proxy, ALICE, AutoAcceptPolicy::Notify).await;
    let mut events = alice.events();
    let mut ringing = alice.incoming_calls();
    let bob = plain(node.addr, BOB).await;

    // The link goes silent; the call rings into it; only Alice's heartbeat notices.
    proxy.black_hole();
    let bob_call = within(
        "call_created",
        InstantMessagingCall::begin_establish(
            &Conversation::new(&bob),
            ALICE,
            None,
            Default::default(),
        ),
    )
    .await
    .unwrap();
    resumed(&mut events).await;

    let alice_call = within("call_incoming", ringing.recv()).await.unwrap();
    assert_eq!(alice_call.state(), CallState::Incoming);
    within("accept", alice_call.accept()).await.unwrap();
    within("bob established", bob_call.established())
        .await
        .unwrap();
    let mut alice_in = alice_call.flow().received();
    let mut bob_in = bob_call.flow().received();
    nothing_more(&alice_call, &mut alice_in, &bob_call, &mut bob_in).await;
    within("terminate", alice_call.terminate()).await.unwrap();
    let reason = within("bob's end", bob_call.terminated()).await.unwrap();
    assert_eq!(reason.code, 200, "{reason:?}");
}

#[tokio::test]
async fn a_request_in_flight_across_a_cut_gets_its_one_reply_after_the_resume() {
    let node = quiet_node();
    let proxy = CutProxy::start(node.addr).await;
    let alice = resumable(&proxy, ALICE, AutoAcceptPolicy::Accept).await;
    let mut events = alice.events();
    let mut ringing = alice.incoming_calls();
    // Bob speaks raw, so that he acks Alice's message only when the test says.
    let mut bob = Raw::sign_in(node.addr, BOB, "desk").await;
    let (b, _) = bob.establish(ALICE, None).await;
    let alice_call = within("call_incoming", ringing.recv()).await.unwrap();
    within("established", alice_call.established())
        .await
        .unwrap();

    let flow = alice_call.flow();
    let send = tokio::spawn(async move { flow.send_text("across the cut").await });
    let (received, _) = bob
        .recv_until(|m| {
            matches!(
                m,
                confab_client::protocol::ServerMsg::MessageReceived { .. }
            )
        })
        .await;
    let confab_client::protocol::ServerMsg::MessageReceived { msg, .. } = received else {
        unreachable!()
    };
    // The request waits for Bob's ack; the link fails meanwhile, and the ack comes while
    // Alice is away: her node holds the answer for her.
    proxy.cut();
    bob.send(&ClientMsg::MessageAck { call: b, msg }).await;
    resumed(&mut events).await;
    let delivered = within("the reply", send).await.unwrap().unwrap();
    assert_eq!(delivered, msg);
    // A request made after the resume is answered as usual.
    within("set_status", alice.set_status(Some(Status::Busy)))
        .await
        .unwrap();
}

#[tokio::test]
async fn a_black_holed_link_is_noticed_by_the_heartbeat_and_what_was_sent_into_it_goes_again() {
    let node = node_with(|s| {
        s.server.heartbeat_ms = 300;
    });
    let proxy = CutProxy::start(node.addr).await;
    let (alice, alice_call, _bob, bob_call) = call_to_resumable(node.addr, &proxy).await;
    let mut events = alice.events();
    let mut alice_in = alice_call.flow().received();
    let mut bob_in = bob_call.flow().received();

    proxy.black_hole();
    // Both sides send into the hole: Alice's frames are lost on the way, Bob's held by the node.
    let alice_sends = tokio::spawn(send_all(alice_call.clone(), "a", 5));
    let bob_sends = tokio::spawn(send_all(bob_call.clone(), "b", 5));
    let status = {
        let alice = alice.clone();
        tokio::spawn(async move { alice.set_status(Some(Status::Busy)).await })
    };
    match link_event(&mut events).await {
        LinkEvent::Reconnecting { error } => {
            assert!(
                error.contains("silent"),
                "noticed by the heartbeat: {error}"
            );
        }
        other => panic!("expected reconnecting, got {other:?}"),
    }
    resumed(&mut events).await;
    let mut got = Vec::new();
    read_messages(&mut alice_in, &mut got, 5).await;
    assert_eq!(got, expected("b", 5));
    let mut got = Vec::new();
    read_messages(&mut bob_in, &mut got, 5).await;
    assert_eq!(got, expected("a", 5));
    within("alice's sends", alice_sends).await.unwrap();
    within("bob's sends", bob_sends).await.unwrap();
    within("set_status", status).await.unwrap().unwrap();
    nothing_more(&alice_call, &mut alice_in, &bob_call, &mut bob_in).await;
}

#[tokio::test]
async fn a_refused_resume_is_lost_once_with_its_reason_and_leaves_nothing_waiting() {
    // Alice's node drops her as a slow consumer (no hold) once more than 16 of its frames
    // wait for her `seen`; her link is black-holed so she cannot send one.
    let node = node_with(|s| {
        s.server.heartbeat_ms = 300;
        s.session.max_unseen_frames = 16;
    });
    let proxy = CutProxy::start(node.addr).await;
    let (alice, alice_call, _bob, bob_call) = call_to_resumable(node.addr, &proxy).await;
    let mut events = alice.events();

    proxy.black_hole();
    let alice_send = {
        let flow = alice_call.flow();
        tokio::spawn(async move { flow.send_text("into the hole").await })
    };
    let flood = {
        let bob_call = bob_call.clone();
        tokio::spawn(async move {
            let flow = bob_call.flow();
            join_all((0..24).map(|i| {
                let flow = flow.clone();
                async move { flow.send_text(&format!("b{i}")).await }
            }))
            .await
        })
    };
    let lost = lost(&mut events).await;
    assert!(lost.contains("unknown or expired session"), "{lost}");
    // The request waiting on the lost session failed with the reason, once.
    match within("the pending send", alice_send).await.unwrap() {
        Err(DeliveryError::Client(ClientError::SessionLost(reason))) => assert_eq!(reason, lost),
        other => panic!("expected SessionLost, got {other:?}"),
    }
    // The call ended here as on the node: 408.
    let reason = within("alice's call end", alice_call.terminated())
        .await
        .unwrap();
    assert_eq!(reason.code, 408, "{reason:?}");
    let reason = within("bob's call end", bob_call.terminated())
        .await
        .unwrap();
    assert_eq!(reason.code, 408, "{reason:?}");
    // Bob's messages all got their one answer (none delivered to a lost endpoint).
    for result in within("bob's sends", flood).await.unwrap() {
        assert!(result.is_err(), "{result:?}");
    }
    // No retry loop: the endpoint is closed, its events end, and a request fails at once.
    within("closed", alice.closed()).await;
    while let Some(event) = within("the events' end", events.recv()).await {
        assert!(!matches!(event, EndpointEvent::Link(_)), "{event:?}");
    }
    assert!(matches!(
        alice.set_status(None).await,
        Err(ClientError::Closed)
    ));
}

#[tokio::test]
async fn a_session_not_resumed_within_the_window_is_lost_and_ends_its_calls() {
    let node = node_with(|s| {
        s.session.resume_window_ms = 600;
    });
    let proxy = CutProxy::start(node.addr).await;
    let (alice, alice_call, _bob, bob_call) = call_to_resumable(node.addr, &proxy).await;
    let mut events = alice.events();
    // The relay goes away for good: every reconnect attempt is refused by the OS.
    drop(proxy);
    let status = {
        let alice = alice.clone();
        tokio::spawn(async move { alice.set_status(Some(Status::Busy)).await })
    };
    let reason = lost(&mut events).await;
    assert!(reason.contains("window"), "{reason}");
    assert!(matches!(
        within("the pending request", status).await.unwrap(),
        Err(ClientError::SessionLost(_))
    ));
    let ended = within("alice's call end", alice_call.terminated())
        .await
        .unwrap();
    assert_eq!(ended.code, 408);
    let ended = within("bob's call end", bob_call.terminated())
        .await
        .unwrap();
    assert_eq!(
        (ended.code, ended.text.as_str()),
        (408, "Remote endpoint lost")
    );
}

/// Every link event until the endpoint's events end.
async fn remaining_link_events(mut events: EndpointEvents) -> Vec<EndpointEvent> {
    let mut seen = Vec::new();
    while let Some(event) = within("the events' end", events.recv()).await {
        if !matches!(
            event,
            EndpointEvent::Shutdown { .. } | EndpointEvent::Kicked { .. }
        ) {
            seen.push(event);
        }
    }
    seen
}

#[tokio::test]
async fn bye_and_shutdown_end_a_resumable_session_without_reconnecting() {
    let node = quiet_node();
    let proxy = CutProxy::start(node.addr).await;
    let alice = resumable(&proxy, ALICE, AutoAcceptPolicy::Accept).await;
    let events = alice.events();
    within("bye", alice.bye()).await.unwrap();
    assert_eq!(remaining_link_events(events).await, []);

    let carol = resumable(&proxy, "sip:carol@example.com", AutoAcceptPolicy::Accept).await;
    let events = carol.events();
    tokio::task::spawn_blocking(move || node.shutdown());
    within("closed", carol.closed()).await;
    assert_eq!(remaining_link_events(events).await, []);
}

/// A tiny deterministic generator, so that a failing run can be replayed from its seed.
struct Lcg(u64);

impl Lcg {
    fn below(&mut self, n: u64) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        (self.0 >> 33) % n
    }
}

/// Sends `{prefix}1`, `{prefix}2`, … with up to 4 in flight until `stop`; returns how many.
async fn steady_flow(
    call: InstantMessagingCall,
    prefix: &'static str,
    stop: tokio_util::sync::CancellationToken,
) -> u32 {
    use futures::StreamExt as _;
    let flow = call.flow();
    let mut in_flight = futures::stream::FuturesOrdered::new();
    let mut sent = 0u32;
    loop {
        while in_flight.len() < 4 && !stop.is_cancelled() {
            sent += 1;
            let flow = flow.clone();
            let body = format!("{prefix}{sent}");
            in_flight.push_back(async move { flow.send_text(&body).await.map_err(|e| (body, e)) });
        }
        match in_flight.next().await {
            Some(Ok(_)) => {}
            Some(Err((body, e))) => panic!("{body} not delivered: {e}"),
            None => return sent,
        }
    }
}

#[tokio::test]
async fn two_hundred_random_cuts_under_a_steady_flow_lose_and_repeat_nothing() {
    const CUTS: usize = 200;
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
    let node = node_with(|s| {
        s.limits.new_connections_per_address_per_second = 10_000;
        s.limits.new_connection_burst_per_address = 10_000;
    });
    let proxy = CutProxy::start(node.addr).await;
    let (alice, alice_call, _bob, bob_call) = call_to_resumable(node.addr, &proxy).await;
    let mut events = alice.events();
    let mut alice_in = alice_call.flow().received();
    let mut bob_in = bob_call.flow().received();
    let stop = tokio_util::sync::CancellationToken::new();
    let alice_flow = tokio::spawn(steady_flow(alice_call.clone(), "a", stop.clone()));
    let bob_flow = tokio::spawn(steady_flow(bob_call.clone(), "b", stop.clone()));

    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(1, |d| d.as_nanos() as u64);
    println!("seed {seed}");
    let mut rng = Lcg(seed);
    let (mut alice_got, mut bob_got) = (Vec::new(), Vec::new());
    for _ in 0..CUTS {
        // Cut after a random number of messages (0 to 3) reached one side or the other.
        let wait = rng.below(4) as usize;
        if rng.below(2) == 0 {
            let n = alice_got.len() + wait;
            read_messages(&mut alice_in, &mut alice_got, n).await;
        } else {
            let n = bob_got.len() + wait;
            read_messages(&mut bob_in, &mut bob_got, n).await;
        }
        proxy.cut();
        resumed(&mut events).await;
    }
    stop.cancel();
    let alice_sent = within("alice's flow", alice_flow).await.unwrap();
    let bob_sent = within("bob's flow", bob_flow).await.unwrap();
    read_messages(&mut alice_in, &mut alice_got, bob_sent as usize).await;
    read_messages(&mut bob_in, &mut bob_got, alice_sent as usize).await;
    assert_eq!(alice_got, expected("b", bob_sent), "seed {seed}");
    assert_eq!(bob_got, expected("a", alice_sent), "seed {seed}");
    nothing_more(&alice_call, &mut alice_in, &bob_call, &mut bob_in).await;
    // Not a single frame of either side was given up on.
    let counts: HashMap<&str, u32> = [("a", alice_sent), ("b", bob_sent)].into();
    println!("{CUTS} cuts, messages sent: {counts:?}");
}
