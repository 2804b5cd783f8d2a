//! End-to-end tests of a cluster (issue #6): a real `nats-server -js` on a free port (started by
//! the harness; the tests fail if it is missing) and three in-process nodes. A user's devices
//! sit on different nodes and the contract must hold exactly as on one node: forking, first
//! click wins, toast timeout to the most active device, declines, the flow, presence.

use confab_actors::RunningNode;
use confab_cluster::Lose;
use confab_protocol::*;
use confab_tests::*;
use std::time::Duration;

const ALICE: &str = "sip:alice@example.com";
const BOB: &str = "sip:bob@example.com";
const WATCHER: &str = "sip:watcher@example.com";
const CAROL: &str = "sip:carol@example.com";

struct Three {
    a: RunningNode,
    b: RunningNode,
    c: RunningNode,
    // Dropped last: the nodes leave the cluster before the server goes.
    _nats: NatsServer,
}

fn three(toast_ms: u64, grace_ms: u64) -> Three {
    let nats = NatsServer::start();
    let tweak = move |s: &mut confab_actors::Settings| {
        s.fork.toast_timeout_ms = toast_ms;
        s.fork.auto_accept_grace_ms = grace_ms;
    };
    Three {
        a: start_cluster_node(&nats, "node-a", tweak),
        b: start_cluster_node(&nats, "node-b", tweak),
        c: start_cluster_node(&nats, "node-c", tweak),
        _nats: nats,
    }
}

/// Alice on A, Bob on B and C; every node sees Bob's two devices.
async fn alice_and_two_bobs(t: &Three) -> (Raw, Raw, Raw) {
    let alice = Raw::sign_in(t.a.addr, ALICE, "laptop").await;
    let bob_b = Raw::sign_in(t.b.addr, BOB, "desk").await;
    let bob_c = Raw::sign_in(t.c.addr, BOB, "phone").await;
    for n in [&t.a, &t.b, &t.c] {
        wait_for_endpoints(n, BOB, 2).await;
        wait_for_endpoints(n, ALICE, 1).await;
    }
    (alice, bob_b, bob_c)
}

/// Alice calls `to`, whose `callee` accepts; returns the call's id on both sides once Alice
/// sees it established.
async fn answered_call(alice: &mut Raw, callee: &mut Raw, to: &str) -> (String, String) {
    let (call, _) = alice.establish(to, None).await;
    let (incoming, _) = callee.incoming().await;
    assert!(matches!(
        callee.accept(&incoming).await,
        ServerMsg::Ok { .. }
    ));
    alice.state(&call, CallState::Established).await;
    (call, incoming)
}

async fn expect_reason(raw: &mut Raw, call: &str, code: u16, text: &str) {
    let reason = raw.state(call, CallState::Terminated).await;
    assert_eq!(
        reason,
        Some(Reason::new(code, text)),
        "{} {}",
        raw.user,
        raw.endpoint
    );
}

async fn send_message(raw: &mut Raw, call: &str, text: &str) -> Option<u32> {
    let rid = raw.rid();
    raw.send(&ClientMsg::Message {
        rid,
        call: call.to_owned(),
        content_type: "text/plain".into(),
        body: Body::Text(text.into()),
    })
    .await;
    rid
}

/// Reads until a `message_received`; acks it; returns (msg, body).
async fn receive_and_ack(raw: &mut Raw, call: &str) -> (u32, String) {
    let (m, _) = raw
        .recv_until(|m| matches!(m, ServerMsg::MessageReceived { toast: None, .. }))
        .await;
    let ServerMsg::MessageReceived { msg, body, .. } = m else {
        unreachable!()
    };
    raw.send(&ClientMsg::MessageAck {
        call: call.to_owned(),
        msg,
    })
    .await;
    let Body::Text(text) = body else {
        panic!("text body expected")
    };
    (msg, text)
}

#[tokio::test]
async fn fork_across_nodes_first_click_wins_and_messages_flow_in_order() {
    let t = three(60_000, 60_000);
    let (mut alice, mut bob_b, mut bob_c) = alice_and_two_bobs(&t).await;
    let (call, _) = alice.establish(BOB, Some("hi bob")).await;
    let (in_b, imm_b) = bob_b.incoming().await;
    let (in_c, imm_c) = bob_c.incoming().await;
    assert!(!imm_b && !imm_c, "two endpoints: no immediate auto-accept");
    alice
        .recv_until(|m| matches!(m, ServerMsg::CallRinging { .. }))
        .await;

    // C clicks first.
    assert!(matches!(bob_c.accept(&in_c).await, ServerMsg::Ok { .. }));
    let (m, _) = bob_c
        .recv_until(|m| matches!(m, ServerMsg::CallEstablished { .. }))
        .await;
    let ServerMsg::CallEstablished { remote, .. } = m else {
        unreachable!()
    };
    assert_eq!(remote.endpoint, alice.endpoint);
    // The toast is the winner's first message.
    let (m, _) = bob_c
        .recv_until(|m| matches!(m, ServerMsg::MessageReceived { .. }))
        .await;
    assert!(matches!(
        m,
        ServerMsg::MessageReceived {
            msg: 1,
            toast: Some(true),
            ..
        }
    ));
    let (m, _) = alice
        .recv_until(|m| matches!(m, ServerMsg::CallEstablished { .. }))
        .await;
    let ServerMsg::CallEstablished { remote, .. } = m else {
        unreachable!()
    };
    assert_eq!(remote.endpoint, bob_c.endpoint);
    // The other fork ends, and a late click is answered elsewhere.
    expect_reason(&mut bob_b, &in_b, 200, "Call completed elsewhere").await;
    match bob_b.accept(&in_b).await {
        ServerMsg::Error { code, .. } => assert_eq!(code, ErrorCode::AnsweredElsewhere),
        other => panic!("{other:?}"),
    }

    // Messages both ways, acked, delivered, in order.
    let mut rids = Vec::new();
    for i in 0..5 {
        rids.push(send_message(&mut alice, &call, &format!("a{i}")).await);
    }
    for i in 0..5 {
        let (msg, text) = receive_and_ack(&mut bob_c, &in_c).await;
        assert_eq!(text, format!("a{i}"));
        assert_eq!(msg, i + 2, "one counter per call; the toast was 1");
    }
    for rid in &rids {
        let (m, _) = alice
            .recv_until(|m| {
                matches!(
                    m,
                    ServerMsg::MessageDelivered { .. } | ServerMsg::MessageFailed { .. }
                )
            })
            .await;
        assert!(
            matches!(&m, ServerMsg::MessageDelivered { rid: r, .. } if r == rid),
            "{m:?}"
        );
    }
    let rid = send_message(&mut bob_c, &in_c, "from bob").await;
    let (msg, text) = receive_and_ack(&mut alice, &call).await;
    assert_eq!((msg, text.as_str()), (7, "from bob"));
    let (m, _) = bob_c
        .recv_until(|m| matches!(m, ServerMsg::MessageDelivered { .. }))
        .await;
    assert!(matches!(m, ServerMsg::MessageDelivered { rid: r, msg: 7, .. } if r == rid));

    // Bob hangs up from his node; Alice sees it.
    let reply = bob_c
        .request(ClientMsg::CallTerminate {
            rid: None,
            call: in_c.clone(),
        })
        .await;
    assert!(matches!(reply, ServerMsg::Ok { .. }));
    expect_reason(&mut bob_c, &in_c, 200, "Terminated locally").await;
    expect_reason(&mut alice, &call, 200, "Terminated remotely").await;
    // The ended call answers late requests as on one node.
    match bob_c
        .request(ClientMsg::Message {
            rid: None,
            call: in_c.clone(),
            content_type: "text/plain".into(),
            body: Body::Text("late".into()),
        })
        .await
    {
        ServerMsg::MessageFailed { code, .. } => assert_eq!(code, 481),
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn a_call_from_another_node_reaches_a_single_device_with_immediate_accept() {
    let t = three(60_000, 60_000);
    let mut alice = Raw::sign_in(t.a.addr, ALICE, "laptop").await;
    let mut bob = Raw::sign_in(t.b.addr, BOB, "desk").await;
    wait_for_endpoints(&t.b, ALICE, 1).await;
    // Bob (B) calls Alice (A): the call lives on B.
    let (call, _) = bob.establish(ALICE, None).await;
    let (incoming, immediate) = alice.incoming().await;
    assert!(immediate, "one endpoint: immediate auto-accept");
    assert!(matches!(
        alice.accept(&incoming).await,
        ServerMsg::Ok { .. }
    ));
    alice.state(&incoming, CallState::Established).await;
    bob.state(&call, CallState::Established).await;
    // Alice terminates; both ends see it.
    let reply = alice
        .request(ClientMsg::CallTerminate {
            rid: None,
            call: incoming.clone(),
        })
        .await;
    assert!(matches!(reply, ServerMsg::Ok { .. }));
    expect_reason(&mut alice, &incoming, 200, "Terminated locally").await;
    expect_reason(&mut bob, &call, 200, "Terminated remotely").await;
}

/// Waits until `node`'s directory holds `endpoint` (of `user`, on another node) with a
/// published `activity`.
async fn wait_for_activity(node: &RunningNode, user: &str, endpoint: &str, activity: Activity) {
    let cluster = confab_cluster::of(node).expect("a cluster node");
    wait_until(|| {
        let now = cluster
            .remote_endpoints_of(user)
            .iter()
            .find(|e| e.id == endpoint)
            .and_then(|e| e.record.publication.as_ref())
            .map(|p| p.activity);
        if now == Some(activity) {
            Ok(())
        } else {
            Err(format!(
                "{}: {endpoint} of {user} published {now:?}, expected {activity:?}",
                node.node_id
            ))
        }
    })
    .await;
}

#[tokio::test]
async fn toast_timeout_asks_the_most_active_device_on_whichever_node() {
    let t = three(300, 2_000);
    let (mut alice, mut bob_b, mut bob_c) = alice_and_two_bobs(&t).await;
    // B is away, C is active: C is the most active endpoint, whatever node ranks it.
    for (raw, activity) in [(&mut bob_b, Activity::Away), (&mut bob_c, Activity::Active)] {
        let reply = raw
            .request(ClientMsg::DeviceState {
                rid: None,
                activity,
                idle_ms: None,
            })
            .await;
        assert!(matches!(reply, ServerMsg::Ok { .. }));
    }
    // The call lives on node A, whose presence ranks Bob's devices when the toast times out:
    // wait until A's directory holds both publications (it hands each record to its presence
    // as it caches it, well before the toast timer asks for the ranking).
    wait_for_activity(&t.a, BOB, &bob_b.endpoint, Activity::Away).await;
    wait_for_activity(&t.a, BOB, &bob_c.endpoint, Activity::Active).await;
    let (call, _) = alice.establish(BOB, None).await;
    let (in_b, _) = bob_b.incoming().await;
    let (in_c, _) = bob_c.incoming().await;
    let (m, _) = bob_c
        .recv_until(|m| matches!(m, ServerMsg::AutoAcceptNeeded { .. }))
        .await;
    assert_eq!(m, ServerMsg::AutoAcceptNeeded { call: in_c.clone() });
    assert!(matches!(bob_c.accept(&in_c).await, ServerMsg::Ok { .. }));
    alice.state(&call, CallState::Established).await;
    expect_reason(&mut bob_b, &in_b, 200, "Call completed elsewhere").await;
}

#[tokio::test]
async fn a_603_decline_on_one_node_ends_the_call_everywhere() {
    let t = three(60_000, 60_000);
    let (mut alice, mut bob_b, mut bob_c) = alice_and_two_bobs(&t).await;
    let (call, _) = alice.establish(BOB, None).await;
    let (in_b, _) = bob_b.incoming().await;
    let (in_c, _) = bob_c.incoming().await;
    let reply = bob_b
        .request(ClientMsg::CallDecline {
            rid: None,
            call: in_b.clone(),
            code: Some(603),
        })
        .await;
    assert!(matches!(reply, ServerMsg::Ok { .. }));
    expect_reason(&mut bob_b, &in_b, 603, "Decline").await;
    expect_reason(&mut bob_c, &in_c, 603, "Declined elsewhere").await;
    expect_reason(&mut alice, &call, 603, "Decline").await;
}

async fn next_presence(raw: &mut Raw, user: &str) -> Availability {
    let (m, _) = raw
        .recv_until(|m| matches!(m, ServerMsg::Presence { user: u, .. } if u == user))
        .await;
    let ServerMsg::Presence { availability, .. } = m else {
        unreachable!()
    };
    availability
}

#[tokio::test]
async fn presence_published_on_one_node_is_seen_by_a_subscriber_on_another() {
    let t = three(60_000, 60_000);
    let mut watcher = Raw::sign_in(t.a.addr, WATCHER, "laptop").await;
    let reply = watcher
        .request(ClientMsg::Subscribe {
            rid: None,
            users: vec![BOB.to_owned()],
        })
        .await;
    assert!(matches!(reply, ServerMsg::Ok { .. }));
    assert_eq!(
        next_presence(&mut watcher, BOB).await,
        Availability::Offline
    );

    let mut bob = Raw::sign_in(t.b.addr, BOB, "desk").await;
    assert_eq!(
        next_presence(&mut watcher, BOB).await,
        Availability::Available
    );
    bob.request(ClientMsg::DeviceState {
        rid: None,
        activity: Activity::Away,
        idle_ms: None,
    })
    .await;
    assert_eq!(next_presence(&mut watcher, BOB).await, Availability::Away);
    // A manual status set on another node of the same user wins as the latest one.
    let mut bob_c = Raw::sign_in(t.c.addr, BOB, "phone").await;
    bob_c
        .request(ClientMsg::SetStatus {
            rid: None,
            status: Some(Status::DoNotDisturb),
        })
        .await;
    let (m, _) = watcher
        .recv_until(|m| {
            matches!(m, ServerMsg::Presence { availability, .. } if *availability == Availability::DoNotDisturb)
        })
        .await;
    assert!(matches!(
        m,
        ServerMsg::Presence {
            most_active: None,
            ..
        }
    ));
    // Both devices leave: offline again, and the status is cleared.
    bob.request(ClientMsg::Bye { rid: None }).await;
    bob_c.request(ClientMsg::Bye { rid: None }).await;
    watcher
        .recv_until(|m| {
            matches!(m, ServerMsg::Presence { availability, .. } if *availability == Availability::Offline)
        })
        .await;
    wait_for_endpoints(&t.a, BOB, 0).await;
    drop(t);
}

#[tokio::test]
async fn a_node_that_cannot_reach_nats_does_not_start() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port");
    let mut s = test_settings();
    s.cluster = Some(confab_actors::settings::Cluster {
        node_id: Some("lonely".to_owned()),
        // Refused at once on loopback; the short limit only keeps a slow refusal short.
        connect_timeout_ms: 500,
        ..confab_actors::settings::Cluster::new(format!("nats://127.0.0.1:{port}"))
    });
    let err = confab_cluster::spawn_node(s)
        .err()
        .expect("no NATS: no node");
    assert!(err.to_string().contains("NATS"), "{err}");
}

#[tokio::test]
async fn a_transfer_to_a_user_on_a_third_node_succeeds() {
    let t = three(60_000, 60_000);
    let mut alice = Raw::sign_in(t.a.addr, ALICE, "laptop").await;
    let mut bob = Raw::sign_in(t.b.addr, BOB, "desk").await;
    let mut carol = Raw::sign_in(t.c.addr, CAROL, "phone").await;
    for n in [&t.a, &t.b, &t.c] {
        wait_for_endpoints(n, BOB, 1).await;
        wait_for_endpoints(n, CAROL, 1).await;
    }
    let (call, in_b) = answered_call(&mut alice, &mut bob, BOB).await;
    bob.state(&in_b, CallState::Established).await;
    // Bob (on B) transfers Alice to Carol (on C).
    let reply = bob
        .request(ClientMsg::CallTransfer {
            rid: None,
            call: in_b.clone(),
            to: CAROL.to_owned(),
        })
        .await;
    assert!(matches!(reply, ServerMsg::Ok { .. }), "{reply:?}");
    let (in_c, immediate) = carol.incoming().await;
    assert!(immediate);
    assert!(matches!(carol.accept(&in_c).await, ServerMsg::Ok { .. }));
    carol.state(&in_c, CallState::Established).await;
    let (m, _) = alice
        .recv_until(|m| matches!(m, ServerMsg::CallTransferred { .. }))
        .await;
    let ServerMsg::CallTransferred { remote, .. } = m else {
        unreachable!()
    };
    assert_eq!(remote.endpoint, carol.endpoint);
    expect_reason(&mut bob, &in_b, 202, "Transferred").await;
    // Alice and Carol talk.
    let rid = send_message(&mut alice, &call, "hello carol").await;
    let (_, text) = receive_and_ack(&mut carol, &in_c).await;
    assert_eq!(text, "hello carol");
    let (m, _) = alice
        .recv_until(|m| matches!(m, ServerMsg::MessageDelivered { .. }))
        .await;
    assert!(matches!(m, ServerMsg::MessageDelivered { rid: r, .. } if r == rid));
}

#[tokio::test]
async fn bye_on_a_node_other_than_the_call_ends_the_call_before_closing() {
    let t = three(60_000, 60_000);
    let mut alice = Raw::sign_in(t.a.addr, ALICE, "laptop").await;
    let mut bob = Raw::sign_in(t.b.addr, BOB, "desk").await;
    wait_for_endpoints(&t.a, BOB, 1).await;
    let (call, in_b) = answered_call(&mut alice, &mut bob, BOB).await;
    bob.state(&in_b, CallState::Established).await;
    bob.send(&ClientMsg::Bye { rid: Some(9) }).await;
    let frames = bob.expect_closed().await;
    assert!(
        frames.iter().any(|m| matches!(
            m,
            ServerMsg::CallState { state: CallState::Terminated, reason: Some(r), .. }
                if r.code == 200 && r.text == "Terminated locally"
        )),
        "{frames:?}"
    );
    expect_reason(&mut alice, &call, 200, "Terminated remotely").await;
    wait_for_endpoints(&t.a, BOB, 0).await;
}

#[test]
fn the_example_cluster_configs_load() {
    for n in ["a", "b", "c"] {
        let path = format!(
            "{}/../config/cluster/node-{n}.toml",
            env!("CARGO_MANIFEST_DIR")
        );
        let text = std::fs::read_to_string(&path).expect("config file");
        let s = confab_actors::Settings::load(&text, []).expect("valid config");
        let c = s.cluster.expect("a [cluster] section");
        assert_eq!(c.node_id.as_deref(), Some(format!("node-{n}").as_str()));
    }
}

#[tokio::test]
async fn a_node_leaving_gracefully_ends_its_calls_and_leaves_the_directory_at_once() {
    let t = three(60_000, 60_000);
    let mut alice = Raw::sign_in(t.a.addr, ALICE, "laptop").await;
    let mut bob = Raw::sign_in(t.b.addr, BOB, "desk").await;
    wait_for_endpoints(&t.a, BOB, 1).await;
    let (call, _) = answered_call(&mut alice, &mut bob, BOB).await;
    bob.recv_until(|m| matches!(m, ServerMsg::CallEstablished { .. }))
        .await;
    let Three {
        a,
        b,
        c,
        _nats: nats,
    } = t;
    let started = std::time::Instant::now();
    b.shutdown();
    let frames = bob.expect_closed().await;
    assert!(
        matches!(frames.first(), Some(ServerMsg::Shutdown { .. })),
        "{frames:?}"
    );
    expect_reason(&mut alice, &call, 503, "Server shutting down").await;
    wait_for_endpoints(&a, BOB, 0).await;
    wait_for_endpoints(&c, BOB, 0).await;
    assert!(
        started.elapsed() < Duration::from_millis(NODE_TIMEOUT_MS),
        "a graceful leave does not wait for the node timeout: {:?}",
        started.elapsed()
    );
    // The nodes stop before their NATS server does.
    drop((a, c));
    drop(nats);
}

#[tokio::test]
async fn a_forward_to_a_user_on_a_third_node_rings_there_and_composing_crosses_nodes() {
    let t = three(60_000, 60_000);
    let mut alice = Raw::sign_in(t.a.addr, ALICE, "laptop").await;
    let mut bob = Raw::sign_in(t.b.addr, BOB, "desk").await;
    let mut carol = Raw::sign_in(t.c.addr, CAROL, "phone").await;
    wait_for_endpoints(&t.a, BOB, 1).await;
    wait_for_endpoints(&t.a, CAROL, 1).await;
    let (call, _) = alice.establish(BOB, None).await;
    let (in_b, _) = bob.incoming().await;
    let reply = bob
        .request(ClientMsg::CallForward {
            rid: None,
            call: in_b.clone(),
            to: CAROL.to_owned(),
        })
        .await;
    assert!(matches!(reply, ServerMsg::Ok { .. }), "{reply:?}");
    expect_reason(&mut bob, &in_b, 302, "Moved Temporarily").await;
    let (m, _) = alice
        .recv_until(|m| matches!(m, ServerMsg::CallForwarded { .. }))
        .await;
    assert!(matches!(m, ServerMsg::CallForwarded { to, .. } if to == CAROL));
    let (in_c, _) = carol.incoming().await;
    assert!(matches!(carol.accept(&in_c).await, ServerMsg::Ok { .. }));
    alice.state(&call, CallState::Established).await;
    carol.state(&in_c, CallState::Established).await;
    carol
        .send(&ClientMsg::Composing {
            call: in_c.clone(),
            active: true,
        })
        .await;
    let (m, _) = alice
        .recv_until(|m| matches!(m, ServerMsg::RemoteComposing { .. }))
        .await;
    assert_eq!(
        m,
        ServerMsg::RemoteComposing {
            call: call.clone(),
            active: true
        }
    );
}

#[tokio::test]
async fn a_node_cut_off_longer_than_the_timeout_loses_its_calls_then_rejoins() {
    let t = three(60_000, 60_000);
    let mut alice = Raw::sign_in(t.a.addr, ALICE, "laptop").await;
    let mut bob = Raw::sign_in(t.b.addr, BOB, "desk").await;
    wait_for_endpoints(&t.a, BOB, 1).await;
    let old_bob = t.a.endpoints_of(BOB);
    let (call, in_b) = answered_call(&mut alice, &mut bob, BOB).await;
    bob.state(&in_b, CallState::Established).await;

    // B goes silent: A and C declare it dead; the call ends on both sides with 503.
    let silence = Duration::from_millis(NODE_TIMEOUT_MS * 2);
    confab_cluster::of(&t.b)
        .expect("a cluster node")
        .mute_heartbeats(silence);
    expect_reason(&mut alice, &call, 503, "Node lost").await;
    wait_for_endpoints(&t.a, BOB, 0).await;
    wait_for_endpoints(&t.c, BOB, 0).await;
    // When B is heard again it is told it was declared dead; it ends its side and rejoins.
    expect_reason(&mut bob, &in_b, 503, "Node lost").await;
    wait_for_endpoints(&t.a, BOB, 1).await;
    wait_for_endpoints(&t.c, BOB, 1).await;
    assert_eq!(t.a.endpoints_of(BOB), old_bob, "the same endpoint, back");
    // And calls work again.
    answered_call(&mut alice, &mut bob, BOB).await;
}

/// A node cut off one way (the others declare it dead; it still hears them) may still fork a
/// call to their endpoints. The fork comes from a run declared dead, whose envelopes the
/// others drop: rung, it could never be ended, so it is refused and the call ends as without
/// that device.
#[tokio::test]
async fn a_fork_from_a_run_declared_dead_is_refused_not_rung() {
    let t = three(60_000, 60_000);
    let mut alice = Raw::sign_in(t.a.addr, ALICE, "laptop").await;
    let mut bob = Raw::sign_in(t.b.addr, BOB, "desk").await;
    wait_for_endpoints(&t.a, BOB, 1).await;
    wait_for_endpoints(&t.b, ALICE, 1).await;
    // A goes silent but runs on: B and C declare it dead, while A still hears them and still
    // lists Bob.
    confab_cluster::of(&t.a)
        .expect("a cluster node")
        .mute_heartbeats(Duration::from_secs(60));
    wait_for_endpoints(&t.b, ALICE, 0).await;
    let (call, _) = alice.establish(BOB, None).await;
    expect_reason(&mut alice, &call, 480, "Temporarily Unavailable").await;
    let rid = send_request(&mut bob, ClientMsg::Ping { rid: None }).await;
    let (_, before_pong) = bob.recv_until(|m| reply_rid(m) == rid).await;
    assert!(
        !before_pong
            .iter()
            .any(|m| matches!(m, ServerMsg::CallIncoming { .. })),
        "Bob was rung by a run declared dead: {before_pong:?}"
    );
}

/// A node restarted with its wall clock set back starts a run whose epoch is below its last
/// one. The others hear it as stale and ask it to rejoin above the run they know, so it is back
/// at once, not after `node_timeout` (a minute here) and not only once its clock passes the old
/// run's start.
#[tokio::test]
async fn a_node_restarted_with_its_clock_set_back_rejoins_above_its_last_run() {
    let nats = NatsServer::start();
    let a = start_cluster_node(&nats, "node-a", minute_node_timeout);
    let b = start_cluster_node(&nats, "node-b", minute_node_timeout);
    let (mut alice, mut bob, call, incoming) = alice_calls_bob(&a, &b).await;
    let cluster_b = confab_cluster::of(&b).expect("a cluster node");
    let last_run = cluster_b.epoch();

    let set_back = cluster_b.restart_with_clock_set_back(Duration::from_secs(3600));
    assert!(set_back < last_run);
    // B's new run ends its side; A ends its side once it hears the run that replaces the last.
    expect_reason(&mut bob, &incoming, 503, "Node lost").await;
    expect_reason(&mut alice, &call, 503, "Node lost").await;
    assert!(
        cluster_b.epoch() > last_run,
        "the run A heard is above the last one: {} <= {last_run}",
        cluster_b.epoch()
    );
    wait_for_endpoints(&a, BOB, 1).await;
    let (call, incoming) = answered_call(&mut alice, &mut bob, BOB).await;
    a_message_still_flows(&mut bob, &incoming, &mut alice, &call).await;
    drop((a, b, nats));
}

/// The purger (the living node with the smallest id) deletes a dead node's records from the
/// bucket itself, not only from the caches; it deletes each at the revision it saw, which must
/// be the record's. When the node is heard again it rejoins and writes them back.
#[tokio::test]
async fn a_dead_nodes_records_leave_the_bucket_and_come_back_when_it_rejoins() {
    let nats = NatsServer::start();
    let a = start_cluster_node(&nats, "node-a", |_| {});
    let b = start_cluster_node(&nats, "node-b", |_| {});
    let _bob = Raw::sign_in(b.addr, BOB, "desk").await;
    wait_for_endpoints(&a, BOB, 1).await;
    nats.wait_for_directory_keys(1).await;

    let cluster_b = confab_cluster::of(&b).expect("a cluster node");
    cluster_b.mute_heartbeats(Duration::from_secs(60));
    wait_for_endpoints(&a, BOB, 0).await;
    nats.wait_for_directory_keys(0).await;

    cluster_b.mute_heartbeats(Duration::ZERO);
    wait_for_endpoints(&a, BOB, 1).await;
    nats.wait_for_directory_keys(1).await;
    drop((a, b));
}

#[tokio::test]
async fn a_users_own_view_lists_and_ranks_devices_on_every_node() {
    let t = three(60_000, 60_000);
    let mut bob_b = Raw::sign_in(t.b.addr, BOB, "desk").await;
    let mut bob_c = Raw::sign_in(t.c.addr, BOB, "phone").await;
    wait_for_endpoints(&t.b, BOB, 2).await;
    bob_c
        .request(ClientMsg::DeviceState {
            rid: None,
            activity: Activity::Active,
            idle_ms: Some(0),
        })
        .await;
    bob_b
        .request(ClientMsg::DeviceState {
            rid: None,
            activity: Activity::Inactive,
            idle_ms: Some(1000),
        })
        .await;
    bob_b
        .request(ClientMsg::Subscribe {
            rid: None,
            users: vec![BOB.to_owned()],
        })
        .await;
    // The view settles on: the phone (on C) most active, then the desk (here, on B).
    let want_most_active = bob_c.endpoint.clone();
    let (m, _) = bob_b
        .recv_until(|m| {
            matches!(m, ServerMsg::Presence { most_active: Some(ma), endpoints: Some(eps), .. }
                if *ma == want_most_active && eps.len() == 2 && eps[1].activity == EffectiveActivity::Inactive)
        })
        .await;
    let ServerMsg::Presence {
        availability,
        endpoints: Some(eps),
        ..
    } = m
    else {
        unreachable!()
    };
    assert_eq!(availability, Availability::Available);
    assert_eq!(
        eps.iter()
            .map(|e| (e.device.as_str(), e.rank))
            .collect::<Vec<_>>(),
        vec![("phone", 1), ("desk", 2)]
    );
}

#[tokio::test]
async fn shutting_down_the_node_of_a_call_between_two_other_nodes_ends_it_with_503() {
    let t = three(60_000, 60_000);
    let mut alice = Raw::sign_in(t.a.addr, ALICE, "laptop").await;
    let mut bob = Raw::sign_in(t.b.addr, BOB, "desk").await;
    let mut carol = Raw::sign_in(t.c.addr, CAROL, "phone").await;
    for n in [&t.a, &t.b, &t.c] {
        wait_for_endpoints(n, BOB, 1).await;
        wait_for_endpoints(n, CAROL, 1).await;
    }
    // Alice (A) calls Bob (B), then transfers him to Carol (C): the Bob–Carol call lives on A,
    // whose own endpoint has left it.
    let (call, in_b) = answered_call(&mut alice, &mut bob, BOB).await;
    bob.state(&in_b, CallState::Established).await;
    let reply = alice
        .request(ClientMsg::CallTransfer {
            rid: None,
            call: call.clone(),
            to: CAROL.to_owned(),
        })
        .await;
    assert!(matches!(reply, ServerMsg::Ok { .. }), "{reply:?}");
    let (in_c, _) = carol.incoming().await;
    assert!(matches!(carol.accept(&in_c).await, ServerMsg::Ok { .. }));
    carol.state(&in_c, CallState::Established).await;
    bob.recv_until(|m| matches!(m, ServerMsg::CallTransferred { .. }))
        .await;
    expect_reason(&mut alice, &call, 202, "Transferred").await;
    // Node A stops gracefully: the call it holds ends for both, as on a single node.
    let Three {
        a,
        b,
        c,
        _nats: nats,
    } = t;
    a.shutdown();
    expect_reason(&mut bob, &in_b, 503, "Server shutting down").await;
    expect_reason(&mut carol, &in_c, 503, "Server shutting down").await;
    // The nodes stop before their NATS server does.
    drop((b, c));
    drop(nats);
}

/// Bob's only device rings on node B, which stops gracefully: his fork is declined with 503
/// "Server shutting down", and Alice's call (on A) ends with that reason, not the bare code's
/// "Declined" (protocol.md §9 i).
#[tokio::test]
async fn a_fork_declined_by_its_nodes_shutdown_gives_the_caller_that_reason() {
    let (nats, a, b, mut alice, mut bob) = alice_on_a_bob_on_b().await;
    let (call, _) = alice.establish(BOB, None).await;
    let (incoming, _) = bob.incoming().await;
    let stopping = tokio::task::spawn_blocking(move || b.shutdown());
    expect_reason(&mut bob, &incoming, 503, "Server shutting down").await;
    expect_reason(&mut alice, &call, 503, "Server shutting down").await;
    stopping.await.expect("node B stops");
    drop((a, nats));
}

/// Node B is shutting down while Bob's endpoint there still waits for his call's end from
/// node A (the end is lost on the way three times, so the wait lasts until the endpoint's own
/// deadline): a call Carol places to him now is declined for the shutdown, 503 "Server
/// shutting down", as a ringing fork would be, not lost (480).
#[tokio::test]
async fn a_fork_offered_to_an_endpoint_already_shutting_down_is_declined_with_503() {
    let nats = NatsServer::start();
    let a = start_cluster_node(&nats, "node-a", |_| {});
    let b = start_cluster_node(&nats, "node-b", |_| {});
    let (_alice, mut bob, _call, incoming) = alice_calls_bob(&a, &b).await;
    let mut carol = Raw::sign_in(a.addr, CAROL, "phone").await;
    let lossy = confab_cluster::lossy(&a).expect("a lossy transport");
    for _ in 0..3 {
        lossy.lose_next(Lose::LegEnded);
    }
    let stopping = tokio::task::spawn_blocking(move || b.shutdown());
    // Bob's call has ended (its events came), and his endpoint waits for the leg's end.
    expect_reason(&mut bob, &incoming, 503, "Server shutting down").await;
    let (call, _) = carol.establish(BOB, None).await;
    expect_reason(&mut carol, &call, 503, "Server shutting down").await;
    stopping.await.expect("node B stops");
    drop((a, nats));
}

/// Polls `/health` until it answers `status`.
async fn wait_for_health(addr: std::net::SocketAddr, status: u16, body: &str) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    loop {
        let (code, _, text) = http_get(addr, "/health").await;
        let now = (code, text);
        if now.0 == status && now.1 == body {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "/health is {now:?}, expected {status} {body:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn a_node_that_loses_nats_reports_itself_degraded_until_it_reconnects() {
    let mut nats = NatsServer::start();
    let node = start_cluster_node(&nats, "node-h", |_| {});
    let ops = node.metrics_addr.expect("the test node serves metrics");
    assert!(
        confab_cluster::of(&node)
            .expect("a cluster node")
            .nats_connected()
    );
    wait_for_health(ops, 200, "ok\n").await;
    nats.kill();
    wait_for_health(ops, 503, "degraded\n").await;
    assert!(
        !confab_cluster::of(&node)
            .expect("a cluster node")
            .nats_connected()
    );
    // Not ready for sign-ins, but alive: a supervisor must not restart it for this.
    let (status, _, body) = http_get(ops, "/readyz").await;
    assert_eq!((status, body.as_str()), (503, "degraded\n"));
    let (status, _, body) = http_get(ops, "/livez").await;
    assert_eq!((status, body.as_str()), (200, "ok\n"));
    nats.restart();
    wait_for_health(ops, 200, "ok\n").await;
    assert!(
        confab_cluster::of(&node)
            .expect("a cluster node")
            .nats_connected()
    );
    drop(node);
    drop(nats);
}

/// NATS itself goes away and comes back (its store kept): the directory must catch up with
/// what changed meanwhile. Bob, signed in on B before the outage, sets his status during it
/// (B's write waits for NATS); Carol's sign-in during it is refused with `overloaded`, since no
/// other node could learn of her. Afterwards Alice on A sees Bob's new status, and Carol, signed
/// in again, can be called from A the moment she holds her welcome.
#[tokio::test]
async fn after_nats_restarts_the_directory_has_what_changed_during_the_outage() {
    let mut nats = NatsServer::start();
    let a = start_cluster_node(&nats, "node-a", short_sign_in_sync);
    let b = start_cluster_node(&nats, "node-b", short_sign_in_sync);
    let mut alice = Raw::sign_in(a.addr, ALICE, "laptop").await;
    let mut bob = Raw::sign_in(b.addr, BOB, "desk").await;
    request_ok(
        &mut alice,
        ClientMsg::Subscribe {
            rid: None,
            users: vec![BOB.to_owned()],
        },
    )
    .await;
    assert_ne!(next_presence(&mut alice, BOB).await, Availability::Offline);
    let ops = [a.metrics_addr, b.metrics_addr].map(|m| m.expect("test nodes serve metrics"));

    nats.kill();
    wait_for_health(ops[1], 503, "degraded\n").await;
    request_ok(
        &mut bob,
        ClientMsg::SetStatus {
            rid: None,
            status: Some(Status::Busy),
        },
    )
    .await;
    let refused = Raw::try_sign_in(b.addr, CAROL, "phone").await.err();
    assert!(
        matches!(
            refused,
            Some(ServerMsg::Error {
                code: ErrorCode::Overloaded,
                ..
            })
        ),
        "{refused:?}"
    );
    nats.restart();
    // Both nodes, each on its own reconnect schedule.
    for ops in ops {
        wait_for_health(ops, 200, "ok\n").await;
    }

    while next_presence(&mut alice, BOB).await != Availability::Busy {}
    let mut carol = Raw::sign_in(b.addr, CAROL, "phone").await;
    answered_call(&mut alice, &mut carol, CAROL).await;
    drop((a, b));
}

/// A sign-in that cannot reach the directory is refused after half a second, not three.
fn short_sign_in_sync(s: &mut confab_actors::Settings) {
    if let Some(c) = s.cluster.as_mut() {
        c.sign_in_sync_timeout_ms = 500;
    }
}

/// NATS away for longer than the node timeout: every node hears nothing, not even its own
/// heartbeat, so each knows that it is cut off, not the others, and nobody is declared dead.
/// No call ends, no record is purged, no node rejoins; what changed meanwhile (a status, a
/// sign-out) lands once NATS is back, and a node that went away during the outage is declared
/// dead one node timeout after it and its records purged. So the directory ends with exactly
/// the live endpoints, on both nodes and in the bucket, and calls work.
#[tokio::test]
async fn a_nats_outage_longer_than_the_node_timeout_ends_no_call_and_leaves_one_consistent_directory()
 {
    const DAVE: &str = "sip:dave@example.com";
    let mut nats = NatsServer::start();
    // Longer than the tests' 2 s: once NATS is back, a node that reconnects a second after
    // another (its reconnect pause is up to 1 s) and beats a third of the timeout later must
    // still be heard in time on a loaded machine.
    let timeout_ms = 3_000;
    let timeout = move |s: &mut confab_actors::Settings| {
        if let Some(c) = s.cluster.as_mut() {
            c.node_timeout_ms = Some(timeout_ms);
        }
    };
    let a = start_cluster_node(&nats, "node-a", timeout);
    let b = start_cluster_node(&nats, "node-b", timeout);
    let c = start_cluster_node(&nats, "node-c", timeout);
    let (mut alice, mut bob, call, incoming) = alice_calls_bob(&a, &b).await;
    let alice_phone = Raw::sign_in(a.addr, ALICE, "phone").await;
    let _dave = Raw::sign_in(c.addr, DAVE, "desk").await;
    let reply = alice
        .request(ClientMsg::Subscribe {
            rid: None,
            users: vec![BOB.to_owned()],
        })
        .await;
    assert!(matches!(reply, ServerMsg::Ok { .. }), "{reply:?}");
    while next_presence(&mut alice, BOB).await != Availability::Available {}
    wait_for_endpoints(&b, ALICE, 2).await;
    wait_for_endpoints(&a, DAVE, 1).await;
    wait_for_endpoints(&b, DAVE, 1).await;
    let runs = [&a, &b].map(|n| confab_cluster::of(n).expect("a cluster node").epoch());

    nats.kill();
    let killed = tokio::time::Instant::now();
    // Meanwhile Bob's status changes and Alice's phone signs out (their records wait for
    // NATS), and node C stops (its leave cannot reach NATS: its record stays in the bucket).
    let reply = bob
        .request(ClientMsg::SetStatus {
            rid: None,
            status: Some(Status::Away),
        })
        .await;
    assert!(matches!(reply, ServerMsg::Ok { .. }), "{reply:?}");
    let mut alice_phone = alice_phone;
    request_ok(&mut alice_phone, ClientMsg::Bye { rid: None }).await;
    tokio::task::spawn_blocking(move || drop(c))
        .await
        .expect("node C stops");
    // The outage lasts twice the node timeout: past it, nobody was declared dead.
    tokio::time::sleep_until(killed + Duration::from_millis(2 * timeout_ms)).await;
    assert_eq!(a.endpoints_of(BOB).len(), 1, "B declared dead by A");
    assert_eq!(b.endpoints_of(ALICE).len(), 2, "A declared dead by B");
    assert_eq!(
        a.endpoints_of(DAVE).len(),
        1,
        "C declared dead by A in the outage"
    );
    nats.restart();

    // C, gone, is declared dead a node timeout after NATS is back, and purged; the sign-out
    // and the status reach the other node.
    wait_for_endpoints(&a, DAVE, 0).await;
    wait_for_endpoints(&b, DAVE, 0).await;
    wait_for_endpoints(&b, ALICE, 1).await;
    while next_presence(&mut alice, BOB).await != Availability::Away {}
    nats.wait_for_directory_keys(2).await;
    // The call went on through the outage, and neither node started a new run.
    a_message_still_flows(&mut bob, &incoming, &mut alice, &call).await;
    assert_eq!(
        [&a, &b].map(|n| confab_cluster::of(n).expect("a cluster node").epoch()),
        runs,
        "a node rejoined"
    );
    let mut carol = Raw::sign_in(b.addr, CAROL, "phone").await;
    wait_for_endpoints(&a, CAROL, 1).await;
    nats.wait_for_directory_keys(3).await;
    answered_call(&mut alice, &mut carol, CAROL).await;
    drop((a, b));
}

#[tokio::test]
async fn two_sign_ins_over_endpoints_per_user_on_two_nodes_leave_the_first_once_the_nodes_see_each_other()
 {
    let nats = NatsServer::start();
    let one_device = |s: &mut confab_actors::Settings| {
        s.limits.endpoints_per_user = 1;
        // Only an endpoint younger than the node timeout is signed out: long enough here that
        // a slow NATS restart cannot age the racing sign-in out of that window.
        if let Some(c) = s.cluster.as_mut() {
            c.node_timeout_ms = Some(10_000);
            c.sign_in_sync_timeout_ms = 500;
        }
    };
    let a = start_cluster_node(&nats, "node-a", one_device);
    let b = start_cluster_node(&nats, "node-b", one_device);

    // With both watches held neither node sees the other's sign-in, so both pass the limit of
    // one: the race of two sign-ins within the directory's propagation time, made certain.
    // (Each sign-in waits out `sign_in_sync_timeout_ms` for the other node, which cannot
    // answer that it has read the record while its watch is held.)
    let held = [&a, &b].map(|n| confab_cluster::of(n).expect("a cluster node"));
    for c in &held {
        c.hold_watch(true);
    }
    let mut first = Raw::sign_in(a.addr, ALICE, "laptop").await;
    let mut second = Raw::sign_in(b.addr, ALICE, "phone").await;
    // The later endpoint is in a call (with Bob, on its own node) when it is signed out.
    let mut bob = Raw::sign_in(b.addr, BOB, "desk").await;
    let (call, _) = second.establish(BOB, None).await;
    let (incoming, _) = bob.incoming().await;
    assert!(matches!(bob.accept(&incoming).await, ServerMsg::Ok { .. }));
    second.state(&call, CallState::Established).await;
    for c in &held {
        c.hold_watch(false);
    }

    // Once the records cross, both nodes rank the two the same way (sign-in time, then id) and
    // the node of the later one signs it out: one `forbidden` without a rid, its call ended as
    // `bye` would end it, then the close.
    let (signed_out, _) = second
        .recv_until(|m| matches!(m, ServerMsg::Error { .. }))
        .await;
    assert!(
        matches!(
            signed_out,
            ServerMsg::Error {
                rid: None,
                code: ErrorCode::Forbidden,
                ..
            }
        ),
        "{signed_out:?}"
    );
    let after = second.expect_closed().await;
    assert!(
        !after.iter().any(|m| matches!(m, ServerMsg::Error { .. })),
        "one error only: {after:?}"
    );
    assert_eq!(
        bob.state(&incoming, CallState::Terminated).await,
        Some(Reason::new(200, "Terminated remotely"))
    );
    for node in [&a, &b] {
        wait_for_endpoints(node, ALICE, 1).await;
    }
    // Node A may have counted one before node B's record of the signed-out endpoint reached it
    // (and then two, until the delete). B has queued the delete once it lists one (it holds
    // A's record, or it would not have signed it out), and B writes its records in order, so
    // once A sees a record B writes after it, A has seen the delete too.
    let _carol = Raw::sign_in(b.addr, CAROL, "desk").await;
    wait_for_endpoints(&a, CAROL, 1).await;
    first.ping().await;
    assert_eq!(a.endpoints_of(ALICE), vec![first.endpoint.clone()]);
}

/// The value of an unlabelled counter or gauge in a `/metrics` text.
fn metric_value(text: &str, name: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
        .unwrap_or_else(|| panic!("no {name} in /metrics"))
}

/// The answers to messages, by rid: (code, text), 200 for delivered.
type Answers = std::collections::HashMap<Option<u32>, Vec<(u16, String)>>;

fn note(answers: &mut Answers, m: ServerMsg) {
    match m {
        ServerMsg::MessageFailed {
            rid, code, text, ..
        } => answers.entry(rid).or_default().push((code, text)),
        ServerMsg::MessageDelivered { rid, .. } => {
            answers.entry(rid).or_default().push((200, String::new()))
        }
        _ => {}
    }
}

/// While NATS is away, messages for another node wait in the NATS client (2,048 commands)
/// and then in the node's queue, bounded by `cluster.max_queued_envelopes`; beyond that a message
/// is refused at once with `message_failed` 503, and counted. Whatever happens to the rest
/// (delivered after the reconnect, or lost because the other node was not back on NATS yet),
/// every message gets exactly one answer.
#[tokio::test]
async fn during_a_nats_outage_messages_beyond_the_queue_limit_fail_at_once_and_all_are_answered() {
    const DROPPED: &str = "confab_cluster_envelopes_dropped_total";
    const SENT: u32 = 4_096;
    let mut nats = NatsServer::start();
    // Alice's node holds the call's legs; Bob's messages leave his node as envelopes.
    // Room for every answer and message in the clients' queues: this test is about the node's
    // queue for the other node, not about slow consumers.
    let a = start_cluster_node(&nats, "node-a", |s| {
        s.flow.ack_timeout_ms = 2_000;
        s.limits.unacked_per_call = 8_192;
        s.limits.outbound_queue = 16_384;
        if let Some(c) = s.cluster.as_mut() {
            c.node_timeout_ms = Some(5_000);
        }
    });
    let b = start_cluster_node(&nats, "node-b", |s| {
        s.flow.ack_timeout_ms = 2_000;
        s.limits.outbound_queue = 16_384;
        if let Some(c) = s.cluster.as_mut() {
            c.node_timeout_ms = Some(5_000);
            c.max_queued_envelopes = 2;
        }
    });
    let mut alice = Raw::sign_in(a.addr, ALICE, "laptop").await;
    let mut bob = Raw::sign_in(b.addr, BOB, "desk").await;
    wait_for_endpoints(&a, BOB, 1).await;
    let (call, incoming) = answered_call(&mut alice, &mut bob, BOB).await;
    let ops = [a.metrics_addr, b.metrics_addr].map(|m| m.expect("test nodes serve metrics"));
    let dropped_before = metric_value(&http_get(ops[1], "/metrics").await.2, DROPPED);
    // Alice acks whatever reaches her.
    let alice_acks = tokio::spawn(async move {
        loop {
            if let Ok(ServerMsg::MessageReceived { msg, .. }) =
                tokio::time::timeout(Duration::from_secs(1), alice.recv()).await
            {
                alice
                    .send(&ClientMsg::MessageAck {
                        call: call.clone(),
                        msg,
                    })
                    .await;
            }
        }
    });

    nats.kill();
    wait_for_health(ops[1], 503, "degraded\n").await;
    let mut rids = Vec::new();
    for i in 0..SENT {
        rids.push(send_message(&mut bob, &incoming, &format!("m{i}")).await);
    }
    // Answers by rid; the refusals come while NATS is still down.
    let mut answers = Answers::new();
    let (first, before) = bob
        .recv_until(|m| matches!(m, ServerMsg::MessageFailed { code: 503, .. }))
        .await;
    for m in before.into_iter().chain([first]) {
        note(&mut answers, m);
    }

    nats.restart();
    for ops in ops {
        wait_for_health(ops, 200, "ok\n").await;
    }
    // Bob reads until every message has its answer (408s of lost ones come ack timeout + twice
    // the node timeout after the send). The outage is shorter than the node timeout: the call
    // stays up.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while answers.len() < rids.len() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{} of {SENT} answered",
            answers.len()
        );
        if let Ok(m) = tokio::time::timeout(Duration::from_secs(4), bob.recv()).await {
            assert!(!matches!(m, ServerMsg::CallState { .. }), "{m:?}");
            note(&mut answers, m);
        }
    }
    // Nothing more: a late answer to a message already failed here is dropped.
    while let Ok(m) = tokio::time::timeout(Duration::from_millis(500), bob.recv()).await {
        note(&mut answers, m);
    }
    // The call is still up and carries messages.
    let rid = send_message(&mut bob, &incoming, "after").await;
    let (m, _) = bob
        .recv_until(|m| matches!(m, ServerMsg::MessageDelivered { .. }))
        .await;
    assert!(matches!(m, ServerMsg::MessageDelivered { rid: r, .. } if r == rid));
    alice_acks.abort();

    let twice: Vec<_> = answers.iter().filter(|(_, a)| a.len() > 1).collect();
    assert!(twice.is_empty(), "answered more than once: {twice:?}");
    let refused = answers.values().filter(|a| a[0].0 == 503).count();
    for a in answers.values().filter(|a| a[0].0 == 503) {
        assert_eq!(a[0].1, confab_actors::refusal::REQUESTS_WAITING_FOR_NODE);
    }
    let dropped = metric_value(&http_get(ops[1], "/metrics").await.2, DROPPED) - dropped_before;
    assert!(refused > 0);
    // At least: the recorder is shared by the tests of this binary, and another one drops too.
    assert!(
        dropped >= refused as f64,
        "{dropped} counted, {refused} refused"
    );
    for a in answers.values() {
        assert!(matches!(a[0].0, 200 | 408 | 503), "{a:?}");
    }
    drop((a, b));
}

/// Alice on A calls Bob on B and answers; returns (Alice, Bob, Alice's call id, Bob's).
/// A node timeout of a minute: no node is declared dead (nor a fork counted adopted) while
/// a test runs, whatever the machine's load.
fn minute_node_timeout(s: &mut confab_actors::Settings) {
    if let Some(c) = s.cluster.as_mut() {
        c.node_timeout_ms = Some(60_000);
    }
}

async fn alice_calls_bob(a: &RunningNode, b: &RunningNode) -> (Raw, Raw, String, String) {
    let mut alice = Raw::sign_in(a.addr, ALICE, "laptop").await;
    let mut bob = Raw::sign_in(b.addr, BOB, "desk").await;
    wait_for_endpoints(a, BOB, 1).await;
    let (call, incoming) = answered_call(&mut alice, &mut bob, BOB).await;
    (alice, bob, call, incoming)
}

/// Bob's message on his leg `incoming` reaches Alice on her leg `call`, and her ack comes back
/// to Bob as `message_delivered`: the call still carries messages.
async fn a_message_still_flows(bob: &mut Raw, incoming: &str, alice: &mut Raw, call: &str) {
    let rid = send_message(bob, incoming, "still here").await;
    assert_eq!(receive_and_ack(alice, call).await.1, "still here");
    let (m, _) = bob
        .recv_until(|m| matches!(m, ServerMsg::MessageDelivered { .. }))
        .await;
    assert!(matches!(m, ServerMsg::MessageDelivered { rid: r, .. } if r == rid));
}

/// How long a client may wait for the answer its own node gives a request whose envelope was
/// lost: that node's deadline (the ack timeout `ack_ms` plus twice the node timeout), plus the
/// usual [`EVENT_TIMEOUT`] of slack for a stalled machine.
fn remote_answer(ack_ms: u64) -> Duration {
    Duration::from_millis(ack_ms + 2 * NODE_TIMEOUT_MS) + EVENT_TIMEOUT
}

/// Alice on node A in an established call with Bob on node B, whose node will lose the next
/// envelope that a request of Bob's drives to A, as core NATS may. Both nodes use
/// `ack_timeout_ms`.
async fn losing_bobs_next_envelope(
    ack_timeout_ms: u64,
) -> (
    NatsServer,
    RunningNode,
    RunningNode,
    Raw,
    Raw,
    String,
    String,
) {
    let nats = NatsServer::start();
    let tune = |s: &mut confab_actors::Settings| s.flow.ack_timeout_ms = ack_timeout_ms;
    let a = start_cluster_node(&nats, "node-a", tune);
    let b = start_cluster_node(&nats, "node-b", tune);
    let (alice, bob, call, incoming) = alice_calls_bob(&a, &b).await;
    confab_cluster::lossy(&b)
        .expect("a lossy transport")
        .lose_bounded_envelopes(1);
    (nats, a, b, alice, bob, call, incoming)
}

/// A message whose envelope core NATS loses never reaches the leg, which therefore never
/// answers it: the sender's own node fails it with 408 after the ack timeout plus twice the
/// node timeout, and the call goes on.
#[tokio::test]
async fn a_message_lost_between_nodes_gets_408_from_the_senders_node() {
    let (nats, a, b, mut alice, mut bob, call, incoming) = losing_bobs_next_envelope(300).await;
    let lost = send_message(&mut bob, &incoming, "lost").await;
    let (m, _) = bob
        .recv_until_within(remote_answer(300), |m| {
            matches!(m, ServerMsg::MessageFailed { .. })
        })
        .await;
    assert!(
        matches!(&m, ServerMsg::MessageFailed { rid, code: 408, text, .. } if *rid == lost && text == "Request Timeout"),
        "{m:?}"
    );

    a_message_still_flows(&mut bob, &incoming, &mut alice, &call).await;
    drop((a, b, nats));
}

/// Alice signed in on node A and Bob on node B, with A's directory showing Bob.
async fn alice_on_a_bob_on_b() -> (NatsServer, RunningNode, RunningNode, Raw, Raw) {
    let nats = NatsServer::start();
    let a = start_cluster_node(&nats, "node-a", |_| {});
    let b = start_cluster_node(&nats, "node-b", |_| {});
    let alice = Raw::sign_in(a.addr, ALICE, "laptop").await;
    let bob = Raw::sign_in(b.addr, BOB, "desk").await;
    wait_for_endpoints(&a, BOB, 1).await;
    (nats, a, b, alice, bob)
}

/// [`alice_on_a_bob_on_b`], with B about to lose the next `ForkAdopted` it sends.
async fn forks_to_bob_losing_the_next_adoption() -> (NatsServer, RunningNode, RunningNode, Raw, Raw)
{
    let (nats, a, b, alice, bob) = alice_on_a_bob_on_b().await;
    confab_cluster::lossy(&b)
        .expect("a lossy transport")
        .lose_next(Lose::ForkAdopted);
    (nats, a, b, alice, bob)
}

/// The `ForkAdopted` envelope of a fork on another node is lost (core NATS delivers at most
/// once): the callee's accept, which comes from the fork's own leg, shows the arbiter that the
/// fork was adopted, and the call is established as usual.
#[tokio::test]
async fn an_accept_wins_though_its_forks_adoption_was_lost_on_the_way() {
    let (nats, a, b, mut alice, mut bob) = forks_to_bob_losing_the_next_adoption().await;
    let (call, incoming) = answered_call(&mut alice, &mut bob, BOB).await;
    a_message_still_flows(&mut bob, &incoming, &mut alice, &call).await;
    drop((a, b, nats));
}

/// The `ForkAdopted` of a fork on another node is lost and nobody answers: the arbiter, hearing
/// neither that the fork was adopted nor that it was lost within twice the node timeout, counts
/// it adopted and cancels it like any other, so the device's toast is taken down instead of
/// ringing for good.
#[tokio::test]
async fn an_unanswered_fork_whose_adoption_was_lost_stops_ringing() {
    let (nats, a, b, mut alice, mut bob) = forks_to_bob_losing_the_next_adoption().await;
    let (call, _) = alice.establish(BOB, None).await;
    let (incoming, _) = bob.incoming().await;
    // The arbiter decides after twice the node timeout.
    let (m, _) = alice
        .recv_until_within(remote_answer(0), |m| {
            matches!(m, ServerMsg::CallState { call: c, state: CallState::Terminated, .. } if *c == call)
        })
        .await;
    assert!(
        matches!(&m, ServerMsg::CallState { reason: Some(r), .. } if *r == Reason::new(480, "Temporarily Unavailable")),
        "{m:?}"
    );
    assert!(bob.state(&incoming, CallState::Terminated).await.is_some());
    drop((a, b, nats));
}

/// Bob rings on his desk (node B) and his phone (node A); the `ForkAdopted` of the desk's fork
/// is lost on the way, and the phone answers. The desk's toast comes down at once ("Call
/// completed elsewhere"), not when the arbiter, hearing nothing, would count the fork adopted
/// (twice the node timeout: two minutes here, so the test fails without the fix).
#[tokio::test]
async fn a_fork_whose_adoption_was_lost_is_taken_down_when_another_device_answers() {
    let nats = NatsServer::start();
    let a = start_cluster_node(&nats, "node-a", minute_node_timeout);
    let b = start_cluster_node(&nats, "node-b", minute_node_timeout);
    let mut alice = Raw::sign_in(a.addr, ALICE, "laptop").await;
    let mut desk = Raw::sign_in(b.addr, BOB, "desk").await;
    let mut phone = Raw::sign_in(a.addr, BOB, "phone").await;
    wait_for_endpoints(&a, BOB, 2).await;
    confab_cluster::lossy(&b)
        .expect("a lossy transport")
        .lose_next(Lose::ForkAdopted);
    let (call, _) = alice.establish(BOB, None).await;
    let (on_desk, _) = desk.incoming().await;
    let (on_phone, _) = phone.incoming().await;
    assert!(matches!(
        phone.accept(&on_phone).await,
        ServerMsg::Ok { .. }
    ));
    alice.state(&call, CallState::Established).await;
    expect_reason(&mut desk, &on_desk, 200, "Call completed elsewhere").await;
    assert_eq!(
        confab_cluster::lossy(&b)
            .expect("a lossy transport")
            .lose_pending(),
        0,
        "the adoption was not lost"
    );
    drop((a, b, nats));
}

/// The `Adopt` offering Bob's fork to his node is lost: his device never rings, the call ends
/// 480, and the leg the arbiter made for him, which no endpoint holds, is still released and
/// stops (through the end it reports to Bob's node), instead of staying on Alice's node.
#[tokio::test]
async fn a_fork_whose_offer_was_lost_leaves_no_leg_behind() {
    let (nats, a, b, mut alice, _bob) = alice_on_a_bob_on_b().await;
    let cluster = confab_cluster::of(&a).expect("a cluster node");
    confab_cluster::lossy(&a)
        .expect("a lossy transport")
        .lose_bounded_envelopes(1);
    let (call, _) = alice.establish(BOB, None).await;
    expect_reason(&mut alice, &call, 480, "Temporarily Unavailable").await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !cluster.legs.is_empty() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the fork's leg is still on node A"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    drop((a, b, nats));
}

/// Two of Bob's devices click at once; the one on another node loses the race, and its accept
/// is still waiting (here: lost on the way) when its leg reports that the call was completed
/// elsewhere: the accept gets `answered_elsewhere`, as on one node, not `invalid_state`.
#[tokio::test]
async fn an_accept_still_waiting_when_another_device_wins_gets_answered_elsewhere() {
    let nats = NatsServer::start();
    let a = start_cluster_node(&nats, "node-a", |_| {});
    let b = start_cluster_node(&nats, "node-b", |_| {});
    let mut alice = Raw::sign_in(a.addr, ALICE, "laptop").await;
    let mut desk = Raw::sign_in(b.addr, BOB, "desk").await;
    let mut phone = Raw::sign_in(a.addr, BOB, "phone").await;
    wait_for_endpoints(&a, BOB, 2).await;
    let (call, _) = alice.establish(BOB, None).await;
    let (on_desk, _) = desk.incoming().await;
    let (on_phone, _) = phone.incoming().await;

    confab_cluster::lossy(&b)
        .expect("a lossy transport")
        .lose_bounded_envelopes(1);
    let lost = desk.rid();
    desk.send(&ClientMsg::CallAccept {
        rid: lost,
        call: on_desk.clone(),
        sdp: answer(),
    })
    .await;
    desk.ping().await;
    assert!(matches!(
        phone.accept(&on_phone).await,
        ServerMsg::Ok { .. }
    ));
    alice.state(&call, CallState::Established).await;
    let (m, _) = desk
        .recv_until(
            |m| matches!(m, ServerMsg::Error { rid, .. } | ServerMsg::Ok { rid } if *rid == lost),
        )
        .await;
    assert!(
        matches!(
            m,
            ServerMsg::Error {
                code: ErrorCode::AnsweredElsewhere,
                ..
            }
        ),
        "{m:?}"
    );
    drop((a, b, nats));
}

/// A call request whose envelope core NATS loses never reaches the leg: the sender's own node
/// answers it with `internal` after the ack timeout plus twice the node timeout (whether it was
/// carried out is unknown there), and the call goes on; the same request again then works.
#[tokio::test]
async fn a_call_request_lost_between_nodes_gets_internal_from_the_senders_node() {
    let (nats, a, b, mut alice, mut bob, call, incoming) = losing_bobs_next_envelope(300).await;
    let rid = send_request(
        &mut bob,
        ClientMsg::CallTerminate {
            rid: None,
            call: incoming.clone(),
        },
    )
    .await;
    let (reply, _) = bob
        .recv_until_within(remote_answer(300), |m| reply_rid(m) == rid)
        .await;
    assert!(
        matches!(&reply, ServerMsg::Error { code: ErrorCode::Internal, message, .. } if message.contains("no answer from the call's node")),
        "{reply:?}"
    );

    // The call was not ended: a message still flows, and the terminate now does its work.
    a_message_still_flows(&mut bob, &incoming, &mut alice, &call).await;
    let reply = bob
        .request(ClientMsg::CallTerminate {
            rid: None,
            call: incoming.clone(),
        })
        .await;
    assert!(matches!(reply, ServerMsg::Ok { .. }), "{reply:?}");
    expect_reason(&mut alice, &call, 200, "Terminated remotely").await;
    drop((a, b, nats));
}

/// A call request lost on the way when the call then ends: the leg answered everything it had
/// before it reported its end, so the sender's node answers this one as for a call that is
/// over (`invalid_state`; a `call_terminate` would get `ok`), once.
#[tokio::test]
async fn a_call_request_lost_between_nodes_before_the_call_ends_is_answered_once() {
    let (nats, a, b, mut alice, mut bob, call, incoming) = losing_bobs_next_envelope(30_000).await;
    let lost = bob.rid();
    bob.send(&ClientMsg::CallTransfer {
        rid: lost,
        call: incoming.clone(),
        to: "sip:carol@example.com".into(),
    })
    .await;
    // Bob's node has handled the request (and lost it) once it answers a ping sent after it.
    bob.ping().await;
    hang_up(&mut alice, &call, &mut bob, &incoming).await;
    let (m, _) = bob
        .recv_until(|m| matches!(m, ServerMsg::Error { .. } | ServerMsg::Ok { .. }))
        .await;
    assert!(
        matches!(&m, ServerMsg::Error { rid, code: ErrorCode::InvalidState, .. } if *rid == lost),
        "{m:?}"
    );
    // Exactly one answer: nothing else for that rid before the pong of a later ping.
    let pong = bob.rid();
    bob.send(&ClientMsg::Ping { rid: pong }).await;
    let (_, before) = bob
        .recv_until(|m| matches!(m, ServerMsg::Pong { rid } if *rid == pong))
        .await;
    assert!(
        !before.iter().any(
            |m| matches!(m, ServerMsg::Ok { rid } | ServerMsg::Error { rid, .. } if *rid == lost)
        ),
        "{before:?}"
    );
    drop((a, b, nats));
}

/// A client that uses one `rid` for requests to two calls on another node still gets each
/// call's answer for that call: the leg's answer names its call between the nodes, so the
/// answer to the second request does not settle the first (lost on the way), which gets the
/// answer for a call that is over once its call ends, and nothing is answered twice.
#[tokio::test]
async fn answers_to_requests_with_one_rid_on_two_remote_calls_settle_each_its_own() {
    let nats = NatsServer::start();
    let a = start_cluster_node(&nats, "node-a", |_| {});
    let b = start_cluster_node(&nats, "node-b", |_| {});
    let (mut alice, mut bob, first, first_incoming) = alice_calls_bob(&a, &b).await;
    let (second, second_incoming) = answered_call(&mut alice, &mut bob, BOB).await;
    confab_cluster::lossy(&b)
        .expect("a lossy transport")
        .lose_bounded_envelopes(1);
    let rid = bob.rid();
    // Lost on the way (the next envelope Bob's node sends).
    bob.send(&ClientMsg::CallTransfer {
        rid,
        call: first_incoming.clone(),
        to: "sip:carol@example.com".into(),
    })
    .await;
    bob.ping().await;
    bob.send(&ClientMsg::CallTerminate {
        rid,
        call: second_incoming.clone(),
    })
    .await;
    let (m, _) = bob
        .recv_until(|m| matches!(m, ServerMsg::Error { .. } | ServerMsg::Ok { .. }))
        .await;
    assert!(matches!(&m, ServerMsg::Ok { rid: r } if *r == rid), "{m:?}");
    expect_reason(&mut alice, &second, 200, "Terminated remotely").await;

    hang_up(&mut alice, &first, &mut bob, &first_incoming).await;
    let (m, _) = bob
        .recv_until(|m| matches!(m, ServerMsg::Error { .. } | ServerMsg::Ok { .. }))
        .await;
    assert!(
        matches!(&m, ServerMsg::Error { rid: r, code: ErrorCode::InvalidState, .. } if *r == rid),
        "the lost transfer is answered as for a call that is over: {m:?}"
    );
    let pong = bob.rid();
    bob.send(&ClientMsg::Ping { rid: pong }).await;
    let (_, before) = bob
        .recv_until(|m| matches!(m, ServerMsg::Pong { rid } if *rid == pong))
        .await;
    assert!(
        !before
            .iter()
            .any(|m| matches!(m, ServerMsg::Ok { .. } | ServerMsg::Error { .. })),
        "{before:?}"
    );
    drop((a, b, nats));
}

/// A message lost on the way when the call then ends: the leg answered everything it had
/// before it reported the end, so the sender's node answers this one with 481.
#[tokio::test]
async fn a_message_lost_between_nodes_before_the_call_ends_gets_481() {
    let (nats, a, b, mut alice, mut bob, call, incoming) = losing_bobs_next_envelope(30_000).await;
    let lost = send_message(&mut bob, &incoming, "lost").await;
    // Bob's node has handled the message (and lost it) once it answers a request sent after it.
    bob.ping().await;
    hang_up(&mut alice, &call, &mut bob, &incoming).await;
    let (m, _) = bob
        .recv_until(|m| matches!(m, ServerMsg::MessageFailed { .. }))
        .await;
    assert!(
        matches!(&m, ServerMsg::MessageFailed { rid, code: 481, .. } if *rid == lost),
        "{m:?}"
    );
    drop((a, b, nats));
}

/// When `cluster.max_queued_envelopes` already wait for another node (as behind a NATS outage),
/// what a client asks of that node is refused at once and not sent: a hang-up gets
/// `error{overloaded}`, a message `message_failed` 503, a call's fork there is lost (480 when
/// it was the only one); once the queue drains, the same requests go through.
#[tokio::test]
async fn requests_for_another_node_over_the_queue_limit_are_refused_at_once() {
    let nats = NatsServer::start();
    let one = |s: &mut confab_actors::Settings| {
        if let Some(c) = s.cluster.as_mut() {
            c.max_queued_envelopes = 1;
        }
    };
    let a = start_cluster_node(&nats, "node-a", one);
    let b = start_cluster_node(&nats, "node-b", one);
    let (mut alice, mut bob, call, incoming) = alice_calls_bob(&a, &b).await;
    let [cluster_a, cluster_b] = [&a, &b].map(|n| confab_cluster::of(n).expect("a cluster node"));

    cluster_b.occupy_envelope_places(1);
    let hang_up = ClientMsg::CallTerminate {
        rid: None,
        call: incoming.clone(),
    };
    match bob.request(hang_up.clone()).await {
        ServerMsg::Error { code, message, .. } => {
            assert_eq!(code, ErrorCode::Overloaded);
            assert_eq!(message, confab_actors::refusal::REQUESTS_WAITING_FOR_NODE);
        }
        other => panic!("{other:?}"),
    }
    let rid = send_message(&mut bob, &incoming, "refused").await;
    let (m, _) = bob
        .recv_until(|m| matches!(m, ServerMsg::MessageFailed { .. }))
        .await;
    match m {
        ServerMsg::MessageFailed {
            rid: r, code, text, ..
        } => {
            assert_eq!((r, code), (rid, 503));
            assert_eq!(text, confab_actors::refusal::REQUESTS_WAITING_FOR_NODE);
        }
        other => panic!("{other:?}"),
    }
    cluster_b.free_envelope_places(1);

    // A's queue full: Alice's composing notice does not reach Bob's node, and the `false` that
    // ends it is not sent either (nothing to end); once the queue drains, the next notice does.
    cluster_a.occupy_envelope_places(1);
    for active in [true, false] {
        alice
            .send(&ClientMsg::Composing {
                call: call.clone(),
                active,
            })
            .await;
    }
    // Alice's node has handled both once it answers a request sent after them.
    alice.ping().await;
    cluster_a.free_envelope_places(1);
    alice
        .send(&ClientMsg::Composing {
            call: call.clone(),
            active: true,
        })
        .await;
    let (m, _) = bob
        .recv_until(|m| matches!(m, ServerMsg::RemoteComposing { .. }))
        .await;
    assert!(
        matches!(m, ServerMsg::RemoteComposing { active: true, .. }),
        "{m:?}"
    );

    let rid = send_message(&mut bob, &incoming, "sent").await;
    assert_eq!(receive_and_ack(&mut alice, &call).await.1, "sent");
    let (m, _) = bob
        .recv_until(|m| matches!(m, ServerMsg::MessageDelivered { .. }))
        .await;
    assert!(matches!(m, ServerMsg::MessageDelivered { rid: r, .. } if r == rid));
    assert!(matches!(bob.request(hang_up).await, ServerMsg::Ok { .. }));
    expect_reason(&mut alice, &call, 200, "Terminated remotely").await;

    // A's queue full: Alice's call to Bob cannot offer him the fork, so it fails as if his
    // device had gone.
    cluster_a.occupy_envelope_places(1);
    let (call, _) = alice.establish(BOB, None).await;
    expect_reason(&mut alice, &call, 480, "Temporarily Unavailable").await;
    cluster_a.free_envelope_places(1);
    drop((a, b, nats));
}

/// Alice on node A hangs up a call with Bob on node B, and the leg's end that Bob's leg (on
/// A, the arbiter's node) reports to his endpoint is lost on the way. The leg reports it again
/// until his endpoint releases it, so it does not stay on A for good.
#[tokio::test]
async fn a_leg_end_lost_between_nodes_is_reported_again_until_released() {
    let nats = NatsServer::start();
    let a = start_cluster_node(&nats, "node-a", |_| {});
    let b = start_cluster_node(&nats, "node-b", |_| {});
    let (mut alice, mut bob, call, incoming) = alice_calls_bob(&a, &b).await;
    confab_cluster::lossy(&a)
        .expect("a lossy transport")
        .lose_next(Lose::LegEnded);
    hang_up(&mut alice, &call, &mut bob, &incoming).await;
    wait_for_no_remote_legs(&a).await;
    drop((a, b, nats));
}

/// The same, with the endpoint's `Release` lost instead: the leg, still unreleased, reports its
/// end again, and Bob's node, which no longer holds the call, releases it again.
#[tokio::test]
async fn a_release_lost_between_nodes_is_sent_again_when_the_end_is() {
    let nats = NatsServer::start();
    let a = start_cluster_node(&nats, "node-a", |_| {});
    let b = start_cluster_node(&nats, "node-b", |_| {});
    let (mut alice, mut bob, call, incoming) = alice_calls_bob(&a, &b).await;
    confab_cluster::lossy(&b)
        .expect("a lossy transport")
        .lose_next(Lose::Release);
    hang_up(&mut alice, &call, &mut bob, &incoming).await;
    wait_for_no_remote_legs(&a).await;
    drop((a, b, nats));
}

/// Bob's connection drops while his call with Alice lasts, and the word of it to his leg on
/// node A is lost on the way. His node sends it again until the leg's end answers, so Alice's
/// call ends "Remote endpoint lost" instead of failing her messages one by one for good.
#[tokio::test]
async fn an_endpoint_loss_lost_between_nodes_is_sent_again_until_the_leg_ends() {
    let nats = NatsServer::start();
    let a = start_cluster_node(&nats, "node-a", |_| {});
    let b = start_cluster_node(&nats, "node-b", |_| {});
    let (mut alice, bob, call, _incoming) = alice_calls_bob(&a, &b).await;
    let b_cluster = confab_cluster::of(&b).expect("a cluster node");
    confab_cluster::lossy(&b)
        .expect("a lossy transport")
        .lose_next(Lose::EndpointLost);
    drop(bob);
    let reason = alice.state(&call, CallState::Terminated).await;
    assert_eq!(
        reason,
        Some(Reason::new(408, "Remote endpoint lost")),
        "Alice's call ends with Bob's loss"
    );
    wait_until(|| match b_cluster.unanswered_lost_len() {
        0 => Ok(()),
        n => Err(format!(
            "{n} endpoint losses on node B are still unanswered"
        )),
    })
    .await;
    wait_for_no_remote_legs(&a).await;
    drop((a, b, nats));
}

/// Alice hangs up, and the two `call_state` events that end Bob's leg (on node A) for his
/// client on node B are lost on the way. The leg's end, which carries its reason and is sent
/// until answered, still reaches Bob's node, which sends his client the missing events itself:
/// terminating, then terminated "Terminated remotely", once each.
#[tokio::test]
async fn a_calls_last_events_lost_between_nodes_still_reach_the_client() {
    let nats = NatsServer::start();
    let a = start_cluster_node(&nats, "node-a", |_| {});
    let b = start_cluster_node(&nats, "node-b", |_| {});
    let (mut alice, mut bob, call, incoming) = alice_calls_bob(&a, &b).await;
    // The set-up's events have all arrived, and none is waiting to be sent again: the next
    // two `call_state` events A publishes for Bob are his leg's last.
    bob.state(&incoming, CallState::Established).await;
    wait_for_state_events_acknowledged(&a).await;
    let lossy = confab_cluster::lossy(&a).expect("a lossy transport");
    lossy.lose_next(Lose::CallState);
    lossy.lose_next(Lose::CallState);
    let reply = alice
        .request(ClientMsg::CallTerminate {
            rid: None,
            call: call.clone(),
        })
        .await;
    assert!(matches!(reply, ServerMsg::Ok { .. }), "{reply:?}");
    let ended = Some(Reason::new(200, "Terminated remotely"));
    let (m, _) = bob
        .recv_until(|m| matches!(m, ServerMsg::CallState { call: c, state, .. } if *c == incoming && (state.is_final() || *state == CallState::Terminating)))
        .await;
    assert!(
        matches!(&m, ServerMsg::CallState { state: CallState::Terminating, previous: CallState::Established, reason, .. } if *reason == ended),
        "{m:?}"
    );
    let m = bob.recv().await;
    assert!(
        matches!(&m, ServerMsg::CallState { call: c, state: CallState::Terminated, previous: CallState::Terminating, reason, .. } if *c == incoming && *reason == ended),
        "{m:?}"
    );
    // Once each: after the leg is released (it reports its end until then), the next frame
    // Bob gets is the answer to his ping.
    wait_for_no_remote_legs(&a).await;
    bob.send(&ClientMsg::Ping { rid: Some(99) }).await;
    assert_eq!(bob.recv().await, ServerMsg::Pong { rid: Some(99) });
    drop((a, b, nats));
}

/// Alice on node A calls Bob on node B (his leg lives on A); from the moment Bob accepts, A
/// loses the next envelopes of the kinds in `on_a`, and B those in `on_b`. Returns Bob's
/// frames from his accept's `ok` up to his leg's `established`, that one included, with the
/// nodes and clients.
async fn bob_accepts_losing(
    on_a: &[Lose],
    on_b: &[Lose],
) -> (
    NatsServer,
    RunningNode,
    RunningNode,
    Raw,
    Raw,
    String,
    Vec<ServerMsg>,
) {
    let nats = NatsServer::start();
    let a = start_cluster_node(&nats, "node-a", |_| {});
    let b = start_cluster_node(&nats, "node-b", |_| {});
    let mut alice = Raw::sign_in(a.addr, ALICE, "laptop").await;
    let mut bob = Raw::sign_in(b.addr, BOB, "desk").await;
    wait_for_endpoints(&a, BOB, 1).await;
    wait_for_acks_events(&a, "node-b").await;
    let (call, _) = alice.establish(BOB, None).await;
    let (incoming, _) = bob.incoming().await;
    for kind in on_a {
        confab_cluster::lossy(&a)
            .expect("a lossy transport")
            .lose_next(*kind);
    }
    for kind in on_b {
        confab_cluster::lossy(&b)
            .expect("a lossy transport")
            .lose_next(*kind);
    }
    assert!(matches!(bob.accept(&incoming).await, ServerMsg::Ok { .. }));
    let (last, mut frames) = bob
        .recv_until(|m| matches!(m, ServerMsg::CallState { call: c, state: CallState::Established, .. } if *c == incoming))
        .await;
    frames.push(last);
    alice.state(&call, CallState::Established).await;
    (nats, a, b, alice, bob, incoming, frames)
}

/// A call's state event lost between the nodes reaches the client anyway, and in order: Bob's
/// leg (on A) sends `establishing`, then `established`; A loses the first. B drops the second
/// (it comes after a gap), and A sends both again since B has not acknowledged them.
#[tokio::test]
async fn a_calls_state_event_lost_between_nodes_is_sent_again_in_order() {
    let (nats, a, b, _alice, mut bob, incoming, frames) =
        bob_accepts_losing(&[Lose::CallState], &[]).await;
    assert_set_up_in_order(&frames);
    let cluster = confab_cluster::of(&a).expect("a cluster node");
    assert_eq!(
        confab_cluster::lossy(&a)
            .expect("a lossy transport")
            .lose_pending(),
        0,
        "the event was not lost"
    );
    assert!(cluster.events_resent() > 0, "nothing was sent again");
    // Then `call_established` (it came after the gap too), once.
    let m = bob.recv().await;
    assert!(
        matches!(&m, ServerMsg::CallEstablished { call, .. } if *call == incoming),
        "{m:?}"
    );
    wait_for_state_events_acknowledged(&a).await;
    bob.send(&ClientMsg::Ping { rid: Some(99) }).await;
    assert_eq!(bob.recv().await, ServerMsg::Pong { rid: Some(99) });
    drop((a, b, nats));
}

/// The acknowledgements of a call's state events lost between the nodes (the first two: B may
/// acknowledge the set-up's events in one envelope or two): A sends the events again, and B
/// passes none of them on twice, and acknowledges them again.
#[tokio::test]
async fn a_lost_acknowledgement_of_state_events_passes_nothing_on_twice() {
    let (nats, a, b, _alice, mut bob, incoming, frames) =
        bob_accepts_losing(&[], &[Lose::EventsSeen, Lose::EventsSeen]).await;
    assert_set_up_in_order(&frames);
    let m = bob.recv().await;
    assert!(
        matches!(&m, ServerMsg::CallEstablished { call, .. } if *call == incoming),
        "{m:?}"
    );
    // A holds the events until B acknowledges them again, which it does only for events
    // sent again: once A holds none, the repeats have reached B.
    let cluster = confab_cluster::of(&a).expect("a cluster node");
    wait_for_state_events_acknowledged(&a).await;
    assert_eq!(
        confab_cluster::lossy(&b)
            .expect("a lossy transport")
            .lose_pending(),
        0,
        "the acknowledgements were not lost"
    );
    assert!(cluster.events_resent() > 0, "nothing was sent again");
    bob.send(&ClientMsg::Ping { rid: Some(99) }).await;
    assert_eq!(bob.recv().await, ServerMsg::Pong { rid: Some(99) });
    drop((a, b, nats));
}

/// Every acknowledgement of a call's state events lost between the nodes while both stay up:
/// A sends the events again `RESEND_ATTEMPTS` times, then ends the call, as for an endpoint
/// lost, rather than leave Bob's node waiting for an event it may never get. Both clients see
/// the end: Alice from her leg, Bob from his node (his leg's own events were refused by then).
#[tokio::test]
async fn state_events_never_acknowledged_end_the_call_on_both_sides() {
    let (nats, a, b, mut alice, mut bob, incoming, frames) =
        bob_accepts_losing(&[], &[Lose::EventsSeen; 20]).await;
    assert_eq!(
        call_states(&frames).last(),
        Some(&(CallState::Establishing, CallState::Established))
    );
    // 8 resends about every two thirds of the node timeout (2 s): some 11 s.
    let patience = Duration::from_millis(12 * NODE_TIMEOUT_MS) + EVENT_TIMEOUT;
    let lost = Some(Reason::new(408, "Remote endpoint lost"));
    let (m, _) = bob
        .recv_until_within(patience, |m| matches!(m, ServerMsg::CallState { call: c, state: CallState::Terminated, .. } if *c == incoming))
        .await;
    assert!(
        matches!(&m, ServerMsg::CallState { reason, .. } if *reason == lost),
        "{m:?}"
    );
    let (m, _) = alice
        .recv_until(|m| {
            matches!(
                m,
                ServerMsg::CallState {
                    state: CallState::Terminated,
                    ..
                }
            )
        })
        .await;
    assert!(
        matches!(&m, ServerMsg::CallState { reason, .. } if *reason == lost),
        "{m:?}"
    );
    let cluster = confab_cluster::of(&a).expect("a cluster node");
    assert!(cluster.events_resent() >= 8, "{}", cluster.events_resent());
    assert_eq!(cluster.unseen_events_len(), 0);
    drop((a, b, nats));
}

/// Envelopes for one node go out batched when several are queued (`cluster/src/batch.rs`);
/// a batch must keep each call's events in order. Ten cross-node calls at once, each caller
/// sending 100 messages without waiting: every callee gets its messages once and in order,
/// every message is delivered, and the call's end comes after its last message.
#[tokio::test]
async fn batched_envelopes_keep_every_calls_events_in_order() {
    const CALLS: usize = 10;
    const MESSAGES: u32 = 100;
    let nats = NatsServer::start();
    let a = start_cluster_node(&nats, "node-a", |_| {});
    let b = start_cluster_node(&nats, "node-b", |_| {});
    let mut pairs = Vec::new();
    for i in 0..CALLS {
        let caller = format!("sip:caller{i}@example.com");
        let callee = format!("sip:callee{i}@example.com");
        let mut from = Raw::sign_in(a.addr, &caller, "desk").await;
        let mut to = Raw::sign_in(b.addr, &callee, "desk").await;
        wait_for_endpoints(&a, &callee, 1).await;
        let (call, incoming) = answered_call(&mut from, &mut to, &callee).await;
        to.state(&incoming, CallState::Established).await;
        pairs.push((from, call, to, incoming));
    }
    let mut tasks = Vec::new();
    for (mut from, call, mut to, incoming) in pairs {
        tasks.push(tokio::spawn(async move {
            let receiver = tokio::spawn(async move {
                let mut next = 1;
                loop {
                    match to.recv().await {
                        ServerMsg::MessageReceived { msg, body, .. } => {
                            assert_eq!(body, Body::Text(format!("n{next}")), "out of order");
                            next += 1;
                            to.send(&ClientMsg::MessageAck {
                                call: incoming.clone(),
                                msg,
                            })
                            .await;
                        }
                        ServerMsg::CallState {
                            state: CallState::Terminated,
                            ..
                        } => {
                            assert_eq!(next, MESSAGES + 1, "the end came before a message");
                            return;
                        }
                        _ => {}
                    }
                }
            });
            for n in 1..=MESSAGES {
                from.send(&ClientMsg::Message {
                    rid: Some(n),
                    call: call.clone(),
                    content_type: "text/plain".into(),
                    body: Body::Text(format!("n{n}")),
                })
                .await;
            }
            let mut delivered = std::collections::HashSet::new();
            while delivered.len() < MESSAGES as usize {
                match from.recv().await {
                    ServerMsg::MessageDelivered { rid: Some(r), .. } => {
                        assert!(delivered.insert(r), "{r} answered twice");
                    }
                    ServerMsg::MessageFailed { rid, code, .. } => panic!("{rid:?} failed {code}"),
                    _ => {}
                }
            }
            let reply = from
                .request(ClientMsg::CallTerminate {
                    rid: None,
                    call: call.clone(),
                })
                .await;
            assert!(matches!(reply, ServerMsg::Ok { .. }), "{reply:?}");
            receiver.await.expect("the callee's side");
        }));
    }
    for t in tasks {
        t.await.expect("a call");
    }
    let ops = a.metrics_addr.expect("an operations port");
    let (_, _, text) = http_get(ops, "/metrics").await;
    let batched = metric(&text, "confab_cluster_batched_envelopes_total");
    assert!(batched > 0.0, "no envelope went in a batch");
    // Each envelope of a batch gives its place in the bound back.
    for node in [&a, &b] {
        let cluster = confab_cluster::of(node).expect("a cluster node");
        wait_until(|| match cluster.envelopes_waiting() {
            (0, 0) => Ok(()),
            held => Err(format!("places still held: {held:?}")),
        })
        .await;
    }
}
