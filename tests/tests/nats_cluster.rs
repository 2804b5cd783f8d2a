//! Confab on a real three-server NATS cluster ([`NatsCluster`]). This file owns the test that
//! losing any one of the three NATS servers leaves the confab cluster working: while each
//! server in turn is down, sign-ins, presence and forked calls still cross between the three
//! confab nodes (the directory bucket is replicated on all three servers,
//! `cluster.kv_replicas = 3`), and once it is back the next one goes.
//!
//! Meanwhile a call between two of the nodes carries messages, one after another, each of
//! which must get exactly one answer. The `/health` answer while directory writes cannot land
//! is checked in `cluster.rs`.

use confab_actors::RunningNode;
use confab_cluster::spawn_node;
use confab_protocol::*;
use confab_tests::*;
use std::time::Duration;

/// How long a check during an outage may take: a node whose NATS server died reconnects to
/// another, and JetStream must elect a new meta or stream leader first. Debian's nats-server
/// 2.9.10 took 6.5 s for the bucket's leader alone, and a sign-in here waited up to 20 s while
/// JetStream also counted the dead server out of new consumers' placement; twice that, for a
/// loaded machine.
const OUTAGE_WAIT: Duration = Duration::from_secs(45);

fn confab_node(nats: &NatsCluster, node_id: &str) -> RunningNode {
    let mut s = cluster_settings_on(nats.urls(), node_id);
    s.fork.toast_timeout_ms = 60_000;
    s.fork.auto_accept_grace_ms = 60_000;
    // A message lost between the nodes with a NATS server is answered 408 after this plus
    // twice the node timeout: within the test's wait.
    s.flow.ack_timeout_ms = 2_000;
    if let Some(c) = s.cluster.as_mut() {
        // A node whose server died is back on another within a heartbeat or two; the nodes
        // must not declare each other dead meanwhile.
        c.node_timeout_ms = Some(5_000);
        // The default, said here because it is what the test is about.
        c.kv_replicas = 3;
    }
    spawn_node(s).expect("cluster node starts")
}

fn deadline() -> tokio::time::Instant {
    tokio::time::Instant::now() + OUTAGE_WAIT
}

/// Waits (at most [`OUTAGE_WAIT`]) until `node`'s directory lists `n` endpoints of `user`.
async fn wait_for_endpoints_during_outage(node: &RunningNode, user: &str, n: usize) {
    let until = deadline();
    loop {
        let now = node.endpoints_of(user);
        if now.len() == n {
            return;
        }
        assert!(
            tokio::time::Instant::now() < until,
            "{}: {user} has {now:?}, expected {n} endpoints within {OUTAGE_WAIT:?}",
            node.node_id
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Signs in as a real client does: a sign-in refused with `overloaded` (the directory could
/// not be written in time: JetStream electing a new leader for the bucket) is made again at
/// once, until [`OUTAGE_WAIT`]. Prints how long it took when it was refused.
async fn sign_in(node: &RunningNode, user: &str, device: &str) -> Raw {
    let started = tokio::time::Instant::now();
    let until = deadline();
    let mut refusals = 0;
    loop {
        match Raw::try_sign_in(node.addr, user, device).await {
            Ok(raw) => {
                if refusals > 0 {
                    eprintln!(
                        "{user} signed in on {} after {refusals} refusals, {:?}",
                        node.node_id,
                        started.elapsed()
                    );
                }
                return raw;
            }
            Err(ServerMsg::Error {
                code: ErrorCode::Overloaded,
                ..
            }) if tokio::time::Instant::now() < until => refusals += 1,
            Err(other) => panic!("{user} on {}: {other:?}", node.node_id),
        }
    }
}

/// Reads `raw` until a `presence` of `user` says `want` (at most [`OUTAGE_WAIT`]).
async fn presence_becomes(raw: &mut Raw, user: &str, want: Availability, what: &str) {
    if let Err(e) = raw
        .try_recv_until(deadline(), |m| {
            matches!(m, ServerMsg::Presence { user: u, availability, .. }
                if u == user && *availability == want)
        })
        .await
    {
        panic!("{what}: {user} never {want:?}: {e}");
    }
}

async fn must(raw: &mut Raw, msg: ClientMsg, what: &str) -> ServerMsg {
    raw.try_request(msg, deadline())
        .await
        .unwrap_or_else(|e| panic!("{what}: {e}"))
}

async fn ok(raw: &mut Raw, msg: ClientMsg, what: &str) {
    let reply = must(raw, msg, what).await;
    assert!(matches!(reply, ServerMsg::Ok { .. }), "{what}: {reply:?}");
}

/// Waits for `call_incoming` on `raw`; returns its call and `immediate_auto_accept`.
async fn rings(raw: &mut Raw, what: &str) -> (String, bool) {
    match raw
        .try_recv_until(deadline(), |m| matches!(m, ServerMsg::CallIncoming { .. }))
        .await
    {
        Ok(ServerMsg::CallIncoming {
            call,
            immediate_auto_accept,
            ..
        }) => (call, immediate_auto_accept),
        Ok(_) => unreachable!(),
        Err(e) => panic!("{what}: no call_incoming: {e}"),
    }
}

async fn reaches(raw: &mut Raw, call: &str, state: CallState, what: &str) -> Option<Reason> {
    match raw
        .try_recv_until(deadline(), |m| {
            matches!(m, ServerMsg::CallState { call: c, state: s, .. } if c == call && *s == state)
        })
        .await
    {
        Ok(ServerMsg::CallState { reason, .. }) => reason,
        Ok(_) => unreachable!(),
        Err(e) => panic!("{what}: {call} never {state:?}: {e}"),
    }
}

/// With the cluster as it is: a watcher on `a` sees a user signed in on `c` and on `b`, and
/// its status set on `b`; a call from `a` forks to both devices and the one on `b` answers;
/// signing out is seen on `a`. `tag` makes every user new.
async fn everything_crosses(a: &RunningNode, b: &RunningNode, c: &RunningNode, tag: &str) {
    let user = format!("sip:user-{tag}@example.com");
    let what = |step: &str| format!("{tag}: {step}");
    let mut watcher = sign_in(a, &format!("sip:watcher-{tag}@example.com"), "w").await;
    let subscribe = ClientMsg::Subscribe {
        rid: None,
        users: vec![user.clone()],
    };
    ok(&mut watcher, subscribe, &what("subscribe")).await;
    presence_becomes(&mut watcher, &user, Availability::Offline, &what("first")).await;

    let mut desk = sign_in(c, &user, "desk").await;
    presence_becomes(
        &mut watcher,
        &user,
        Availability::Available,
        &what("signed in on c"),
    )
    .await;
    // The sign-in on b must reach a's directory: the call from a then rings it.
    let mut phone = sign_in(b, &user, "phone").await;
    wait_for_endpoints_during_outage(a, &user, 2).await;
    let mut caller = sign_in(a, &format!("sip:caller-{tag}@example.com"), "c").await;
    let reply = must(
        &mut caller,
        ClientMsg::CallEstablish {
            rid: None,
            to: user.clone(),
            conversation: None,
            toast: Some(legs::text_toast("ring")),
            sdp: offer(),
        },
        &what("call_establish"),
    )
    .await;
    let ServerMsg::CallCreated { call, .. } = reply else {
        panic!("{}: {reply:?}", what("call_establish"));
    };
    let (on_desk, immediate_desk) = rings(&mut desk, &what("desk (node c)")).await;
    let (on_phone, immediate_phone) = rings(&mut phone, &what("phone (node b)")).await;
    assert!(
        !immediate_desk && !immediate_phone,
        "{}: two devices, so no immediate auto-accept",
        what("fork")
    );
    let accept = ClientMsg::CallAccept {
        rid: None,
        call: on_phone.clone(),
        sdp: answer(),
    };
    ok(&mut phone, accept, &what("accept on b")).await;
    reaches(&mut caller, &call, CallState::Established, &what("caller")).await;
    assert_eq!(
        reaches(&mut desk, &on_desk, CallState::Terminated, &what("desk")).await,
        Some(Reason::new(200, "Call completed elsewhere"))
    );
    let terminate = ClientMsg::CallTerminate {
        rid: None,
        call: call.clone(),
    };
    ok(&mut caller, terminate, &what("terminate")).await;
    assert_eq!(
        reaches(&mut phone, &on_phone, CallState::Terminated, &what("phone")).await,
        Some(Reason::new(200, "Terminated remotely"))
    );

    // A status set on b, then both devices leave: a's watcher sees each.
    let dnd = ClientMsg::SetStatus {
        rid: None,
        status: Some(Status::DoNotDisturb),
    };
    ok(&mut phone, dnd, &what("set_status")).await;
    presence_becomes(
        &mut watcher,
        &user,
        Availability::DoNotDisturb,
        &what("status set on b"),
    )
    .await;
    ok(&mut desk, ClientMsg::Bye { rid: None }, &what("bye desk")).await;
    ok(&mut phone, ClientMsg::Bye { rid: None }, &what("bye phone")).await;
    presence_becomes(
        &mut watcher,
        &user,
        Availability::Offline,
        &what("both signed out"),
    )
    .await;
    wait_for_endpoints_during_outage(a, &user, 0).await;
}

/// What the message load saw: messages answered `message_delivered`, and `message_failed`
/// (with their codes).
#[derive(Debug, Default)]
struct LoadSeen {
    delivered: u64,
    failed: Vec<u16>,
}

/// The load that runs through every outage: Alice on node-a sends Bob on node-b messages on
/// one call, each as soon as the last was answered, and Bob acks each as it arrives, until
/// `stop`. Every message must get exactly one answer (an answer for another `rid` fails the
/// test) within [`OUTAGE_WAIT`].
async fn message_load(
    mut alice: Raw,
    mut bob: Raw,
    (call, incoming): (String, String),
    stop: tokio::sync::watch::Receiver<bool>,
) -> LoadSeen {
    let mut seen = LoadSeen::default();
    let mut n = 0u32;
    while !*stop.borrow() {
        n += 1;
        let rid = alice.rid();
        alice
            .send(&ClientMsg::Message {
                rid,
                call: call.clone(),
                content_type: "text/plain".into(),
                body: Body::Text(format!("load {n}")),
            })
            .await;
        let until = deadline();
        loop {
            tokio::select! {
                answer = alice.try_recv_until(until, |m| matches!(m,
                    ServerMsg::MessageDelivered { .. } | ServerMsg::MessageFailed { .. })) => {
                    match answer {
                        Ok(ServerMsg::MessageDelivered { rid: r, .. }) if r == rid => {
                            seen.delivered += 1;
                        }
                        Ok(ServerMsg::MessageFailed { rid: r, code, .. }) if r == rid => {
                            seen.failed.push(code);
                        }
                        other => panic!("load message {n} ({rid:?}): {other:?}"),
                    }
                    break;
                }
                received = bob.try_recv_until(until, |m| matches!(m, ServerMsg::MessageReceived { .. })) => {
                    let Ok(ServerMsg::MessageReceived { msg, .. }) = received else {
                        panic!("load message {n}: {received:?}");
                    };
                    let ack = ClientMsg::MessageAck { call: incoming.clone(), msg };
                    bob.send(&ack).await;
                }
            }
        }
    }
    seen
}

#[tokio::test]
async fn losing_any_one_of_three_nats_servers_keeps_sign_ins_presence_and_forked_calls_working() {
    let mut nats = NatsCluster::start();
    let nodes = [
        confab_node(&nats, "node-a"),
        confab_node(&nats, "node-b"),
        confab_node(&nats, "node-c"),
    ];
    everything_crosses(&nodes[0], &nodes[1], &nodes[2], "before").await;
    // A call between node-a and node-b carries messages through every outage.
    let mut alice = sign_in(&nodes[0], "sip:load-alice@example.com", "laptop").await;
    let mut bob = sign_in(&nodes[1], "sip:load-bob@example.com", "desk").await;
    let (call, _) = alice.establish(&bob.user, None).await;
    let (incoming, _) = bob.incoming().await;
    assert!(matches!(bob.accept(&incoming).await, ServerMsg::Ok { .. }));
    alice.state(&call, CallState::Established).await;
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let load = tokio::spawn(message_load(alice, bob, (call, incoming), stopped));
    for down in 0..NATS_CLUSTER_SIZE {
        // Shown with the failure, if any: a bucket with no replica left cannot take writes.
        eprintln!(
            "killing n{down}; the directory bucket: {}",
            nats.directory_placement().await
        );
        nats.kill(down);
        // Each outage with the roles turned, so every node is once the caller's.
        let [a, b, c] = [0, 1, 2].map(|k| &nodes[(down + k) % 3]);
        everything_crosses(a, b, c, &format!("n{down}-down")).await;
        nats.restart(down);
        nats.wait_for_directory_caught_up().await;
    }
    everything_crosses(&nodes[2], &nodes[0], &nodes[1], "after").await;
    stop.send_replace(true);
    let seen = load.await.expect("the message load ran to its end");
    eprintln!("message load: {seen:?}");
    assert!(
        seen.delivered > 0 && seen.failed.iter().all(|code| *code == 408),
        "messages kept flowing through the outages, and one lost with a NATS server is \
         answered 408: {seen:?}"
    );
    // The nodes leave before the servers go.
    drop(nodes);
    drop(nats);
}
