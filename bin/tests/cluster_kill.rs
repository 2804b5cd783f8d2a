//! A cluster node killed with SIGKILL mid-call (issue #6): node B runs as a real `confab-node`
//! process; A and C are in-process. When B dies, A's calls with B's endpoint end with 503
//! "Node lost" (the contract's reason for "a cluster node holding the other side died"), every
//! message still waiting gets `message_failed{503}`, and the survivors' directories drop B's
//! endpoints within `node_timeout` + 1 s.
#![allow(clippy::unwrap_used)]

use confab_protocol::*;
use confab_tests::*;
use std::io::Write;
use std::time::{Duration, Instant};

const ALICE: &str = "sip:alice@example.com";
const BOB: &str = "sip:bob@example.com";
const CAROL: &str = "sip:carol@example.com";

struct Child(std::process::Child);

impl Drop for Child {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .unwrap()
}

/// Starts `confab-node` as node `node_id` on `nats`; returns the process and its address.
fn node_process(
    nats: &NatsServer,
    node_id: &str,
) -> (Child, std::net::SocketAddr, tempfile::NamedTempFile) {
    let port = free_port();
    let mut config = tempfile::NamedTempFile::new().unwrap();
    write!(
        config,
        r#"
[server]
listen = "127.0.0.1:{port}"
workers = 2
[auth]
jwt_secret = "{SECRET}"
[metrics]
listen = ""
[fork]
toast_timeout_ms = 60000
auto_accept_grace_ms = 60000
[log]
level = "warn"
[cluster]
nats_url = "{url}"
node_id = "{node_id}"
node_timeout_ms = {NODE_TIMEOUT_MS}
"#,
        url = nats.url()
    )
    .unwrap();
    let child = std::process::Command::new(env!("CARGO_BIN_EXE_confab-node"))
        .arg("--config")
        .arg(config.path())
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let addr: std::net::SocketAddr = ([127, 0, 0, 1], port).into();
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::net::TcpStream::connect(addr).is_err() {
        assert!(Instant::now() < deadline, "confab-node did not start");
        std::thread::sleep(Duration::from_millis(20));
    }
    (Child(child), addr, config)
}

async fn established(raw: &mut Raw, call: &str) {
    raw.state(call, CallState::Established).await;
}

async fn send_message(raw: &mut Raw, call: &str) -> Option<u32> {
    let rid = raw.rid();
    raw.send(&ClientMsg::Message {
        rid,
        call: call.to_owned(),
        content_type: "text/plain".into(),
        body: Body::Text("are you there?".into()),
    })
    .await;
    rid
}

/// Waits for the call's end and the pending message's failure, in any order; both 503.
async fn expect_node_lost(raw: &mut Raw, call: &str, rid: Option<u32>) {
    let mut ended = false;
    let mut failed = false;
    while !(ended && failed) {
        match raw.recv().await {
            ServerMsg::CallState {
                call: c,
                state: CallState::Terminated,
                reason,
                ..
            } if c == call => {
                assert_eq!(reason, Some(Reason::new(503, "Node lost")), "{}", raw.user);
                ended = true;
            }
            ServerMsg::MessageFailed { rid: r, code, .. } if r == rid => {
                assert_eq!(code, 503, "{}", raw.user);
                failed = true;
            }
            ServerMsg::MessageDelivered { rid: r, .. } if r == rid => {
                panic!("{}: a message to a dead node was delivered", raw.user)
            }
            _ => {}
        }
    }
}

#[tokio::test]
async fn kill_9_of_a_node_ends_its_calls_and_cleans_the_directory() {
    let nats = NatsServer::start();
    let a = start_cluster_node(&nats, "node-a", |s| {
        s.fork.toast_timeout_ms = 60_000;
        s.fork.auto_accept_grace_ms = 60_000;
    });
    let c = start_cluster_node(&nats, "node-c", |_| {});
    let (mut b, b_addr, _config) = node_process(&nats, "node-b");

    let mut alice = Raw::sign_in(a.addr, ALICE, "laptop").await;
    let mut carol = Raw::sign_in(a.addr, CAROL, "laptop").await;
    let mut bob = Raw::sign_in(b_addr, BOB, "desk").await;
    wait_for_endpoints(&a, BOB, 1).await;
    wait_for_endpoints(&c, BOB, 1).await;

    // Alice (A) calls Bob (B): the call lives on A.
    let (call_a, _) = alice.establish(BOB, None).await;
    let (in_b, _) = bob.incoming().await;
    assert!(matches!(bob.accept(&in_b).await, ServerMsg::Ok { .. }));
    established(&mut alice, &call_a).await;
    established(&mut bob, &in_b).await;

    // Bob (B) calls Carol (A): that call lives on B.
    let mut tries = 0;
    let (call_b, in_c) = loop {
        let (call_b, _) = bob.establish(CAROL, None).await;
        let (m, _) = bob
            .recv_until(|m| {
                matches!(m, ServerMsg::CallRinging { call } if *call == call_b)
                    || matches!(m, ServerMsg::CallState { call, state: CallState::Terminated, .. } if *call == call_b)
            })
            .await;
        if matches!(m, ServerMsg::CallRinging { .. }) {
            let (in_c, _) = carol.incoming().await;
            break (call_b, in_c);
        }
        // B had not heard of Carol yet.
        tries += 1;
        assert!(tries < 50, "node B never saw carol");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(matches!(carol.accept(&in_c).await, ServerMsg::Ok { .. }));
    established(&mut carol, &in_c).await;
    established(&mut bob, &call_b).await;

    // Messages Bob will never ack.
    let rid_a = send_message(&mut alice, &call_a).await;
    let rid_c = send_message(&mut carol, &in_c).await;
    bob.recv_until(|m| matches!(m, ServerMsg::MessageReceived { .. }))
        .await;
    bob.recv_until(|m| matches!(m, ServerMsg::MessageReceived { .. }))
        .await;

    // kill -9 (SIGKILL) node B.
    b.0.kill().unwrap();
    let killed = Instant::now();
    let _ = b.0.wait();

    // Alice's call lived on A, with Bob's leg there too: it ends with 503 Node lost.
    expect_node_lost(&mut alice, &call_a, rid_a).await;
    // Carol's call lived on B: her endpoint ends it for her, the same way.
    expect_node_lost(&mut carol, &in_c, rid_c).await;

    // The survivors no longer list Bob's device, within node_timeout + 1 s.
    let limit = Duration::from_millis(NODE_TIMEOUT_MS) + Duration::from_secs(1);
    wait_for_endpoints(&a, BOB, 0).await;
    wait_for_endpoints(&c, BOB, 0).await;
    assert!(
        killed.elapsed() <= limit,
        "cleanup took {:?}",
        killed.elapsed()
    );
    // A call to Bob now finds nobody.
    let (call, _) = alice.establish(BOB, None).await;
    let reason = alice.state(&call, CallState::Terminated).await;
    assert_eq!(reason.map(|r| r.code), Some(480));
}

#[tokio::test]
async fn a_node_restarted_at_once_ends_its_previous_runs_calls_and_serves_again() {
    let nats = NatsServer::start();
    let a = start_cluster_node(&nats, "node-a", |s| {
        s.fork.toast_timeout_ms = 60_000;
        s.fork.auto_accept_grace_ms = 60_000;
    });
    let (mut b, b_addr, _config) = node_process(&nats, "node-b");
    let mut alice = Raw::sign_in(a.addr, ALICE, "laptop").await;
    let mut bob = Raw::sign_in(b_addr, BOB, "desk").await;
    wait_for_endpoints(&a, BOB, 1).await;
    let old_bob = a.endpoints_of(BOB);
    let (call, _) = alice.establish(BOB, None).await;
    let (in_b, _) = bob.incoming().await;
    assert!(matches!(bob.accept(&in_b).await, ServerMsg::Ok { .. }));
    established(&mut alice, &call).await;
    let rid = send_message(&mut alice, &call).await;

    // kill -9, and the same node id back at once (a new run, a new epoch).
    b.0.kill().unwrap();
    let _ = b.0.wait();
    drop(bob);
    let (_b2, b2_addr, _config2) = node_process(&nats, "node-b");
    expect_node_lost(&mut alice, &call, rid).await;
    // Bob's old endpoint is gone everywhere; his new one works.
    let mut bob = Raw::sign_in(b2_addr, BOB, "desk").await;
    let deadline = Instant::now() + EVENT_TIMEOUT;
    loop {
        let now = a.endpoints_of(BOB);
        if now.len() == 1 && now != old_bob {
            break;
        }
        assert!(Instant::now() < deadline, "node-a lists {now:?} for bob");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let (call, _) = alice.establish(BOB, None).await;
    let (in_b, _) = bob.incoming().await;
    assert!(matches!(bob.accept(&in_b).await, ServerMsg::Ok { .. }));
    established(&mut alice, &call).await;
}
