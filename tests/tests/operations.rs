//! The operations surface of a node (docs/operations.md): `GET /health`, `GET /metrics` and
//! graceful shutdown.
#![allow(clippy::unwrap_used, clippy::print_stdout)]

use confab_protocol::*;
use confab_tests::*;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[tokio::test]
async fn health_is_200_while_serving() {
    let node = start_node(|_| {});
    let ops = node.metrics_addr.expect("the test node serves metrics");
    let (status, _, body) = http_get(ops, "/health").await;
    assert_eq!(status, 200);
    assert_eq!(body, "ok\n");
    // Still 200 with clients connected.
    let _alice = Raw::sign_in(node.addr, "sip:alice-health@example.com", "laptop").await;
    let (status, _, _) = http_get(ops, "/health").await;
    assert_eq!(status, 200);
    let (status, _, _) = http_get(ops, "/nothing-here").await;
    assert_eq!(status, 404);
    node.shutdown();
}

/// `/livez` says the process serves, `/readyz` that it takes sign-ins: during a graceful
/// shutdown (a client that does not leave keeps the node draining) the first stays 200 and the
/// second turns 503 "draining", so a supervisor does not restart a node that is draining.
#[tokio::test]
async fn livez_stays_200_and_readyz_turns_503_while_draining() {
    let mut node = start_node(|s| s.server.shutdown_timeout_ms = 10_000);
    let ops = node.metrics_addr.expect("the test node serves metrics");
    let (status, _, body) = http_get(ops, "/livez").await;
    assert_eq!((status, body.as_str()), (200, "ok\n"));
    let (status, _, body) = http_get(ops, "/readyz").await;
    assert_eq!((status, body.as_str()), (200, "ready\n"));
    let mut alice = Raw::sign_in(node.addr, "sip:alice-drain@example.com", "laptop").await;
    let stop = node.stopper().expect("the node can be stopped");
    let _ = stop.send(());
    // The client hears `shutdown` once the drain has begun; it stays connected.
    alice
        .recv_until(|m| matches!(m, ServerMsg::Shutdown { .. }))
        .await;
    let (status, _, body) = http_get(ops, "/readyz").await;
    assert_eq!((status, body.as_str()), (503, "draining\n"));
    let (status, _, body) = http_get(ops, "/livez").await;
    assert_eq!((status, body.as_str()), (200, "ok\n"));
    drop(alice);
    node.wait();
}

#[tokio::test]
async fn metrics_are_prometheus_text_with_histogram_buckets() {
    let node = start_node(|_| {});
    let ops = node.metrics_addr.expect("the test node serves metrics");
    // A call and an acknowledged message, so both latency histograms have observations.
    let mut alice = Raw::sign_in(node.addr, "sip:alice-metrics@example.com", "laptop").await;
    let mut bob = Raw::sign_in(node.addr, "sip:bob-metrics@example.com", "desk").await;
    let (call, _) = alice.establish(&bob.user.clone(), None).await;
    let (c, _) = bob.incoming().await;
    assert!(matches!(bob.accept(&c).await, ServerMsg::Ok { .. }));
    alice.state(&call, CallState::Established).await;
    let rid = alice.rid();
    alice
        .send(&ClientMsg::Message {
            rid,
            call: call.clone(),
            content_type: "text/plain".into(),
            body: Body::Text("hi".into()),
        })
        .await;
    let (m, _) = bob
        .recv_until(|m| matches!(m, ServerMsg::MessageReceived { .. }))
        .await;
    let ServerMsg::MessageReceived { msg, .. } = m else {
        unreachable!()
    };
    bob.send(&ClientMsg::MessageAck {
        call: c.clone(),
        msg,
    })
    .await;
    let (d, _) = alice.recv_until(|m| reply_rid(m) == rid).await;
    assert!(matches!(d, ServerMsg::MessageDelivered { .. }), "{d:?}");

    let (status, head, body) = http_get(ops, "/metrics").await;
    assert_eq!(status, 200);
    assert!(
        head.to_ascii_lowercase()
            .contains("content-type: text/plain; version=0.0.4"),
        "{head}"
    );
    for needle in [
        "# TYPE confab_endpoints gauge",
        "\nconfab_endpoints ",
        "# TYPE confab_call_setup_seconds histogram",
        "confab_call_setup_seconds_bucket{le=\"0.0005\"}",
        "confab_call_setup_seconds_bucket{le=\"+Inf\"}",
        "confab_call_setup_seconds_count ",
        "# TYPE confab_message_delivery_seconds histogram",
        "confab_message_delivery_seconds_bucket{le=\"",
        "confab_messages_total{result=\"delivered\"}",
    ] {
        assert!(body.contains(needle), "no {needle:?} in /metrics:\n{body}");
    }
    assert!(
        !body.contains("quantile="),
        "latencies must be histograms, not summaries:\n{body}"
    );
    assert!(
        !body.contains(&alice.endpoint) && !body.contains("alice-metrics"),
        "a user or endpoint id leaked into a label:\n{body}"
    );
    node.shutdown();
}

#[tokio::test]
async fn graceful_shutdown_tells_clients_and_ends_their_calls_with_503() {
    let node = start_node(|s| s.server.reconnect_after_ms = 1234);
    let addr = node.addr;
    let mut alice = Raw::sign_in(addr, "sip:alice-shutdown@example.com", "laptop").await;
    let mut bob = Raw::sign_in(addr, "sip:bob-shutdown@example.com", "desk").await;
    let (call, _) = alice.establish(&bob.user.clone(), None).await;
    let (c, _) = bob.incoming().await;
    assert!(matches!(bob.accept(&c).await, ServerMsg::Ok { .. }));
    bob.state(&c, CallState::Established).await;
    alice.state(&call, CallState::Established).await;

    let stopping = tokio::task::spawn_blocking(move || node.shutdown());

    for (client, call) in [(&mut alice, &call), (&mut bob, &c)] {
        // Everything the node still sends, up to the close. A peer's 503 may overtake this
        // endpoint's own `shutdown` event, so the order of the two is not asserted.
        let frames = client.expect_closed().await;
        let shutdown = frames
            .iter()
            .position(|m| matches!(m, ServerMsg::Shutdown { .. }))
            .unwrap_or_else(|| panic!("{}: no shutdown event in {frames:?}", client.user));
        let ServerMsg::Shutdown {
            reason,
            reconnect_after_ms,
        } = &frames[shutdown]
        else {
            unreachable!()
        };
        assert_eq!(reason, "Server shutting down");
        assert_eq!(*reconnect_after_ms, 1234);
        let ended = frames.iter().find_map(|m| match m {
            ServerMsg::CallState {
                call: c,
                state: CallState::Terminated,
                reason,
                ..
            } if c == call => Some(reason.clone()),
            _ => None,
        });
        assert_eq!(
            ended,
            Some(Some(Reason::new(503, "Server shutting down"))),
            "{}: {frames:?}",
            client.user
        );
    }
    tokio::time::timeout(Duration::from_secs(10), stopping)
        .await
        .expect("the node stops within its shutdown deadline")
        .unwrap();
    assert!(
        tokio::net::TcpStream::connect(addr).await.is_err(),
        "the node still accepts connections after shutdown"
    );
}

/// The operations port serves `metrics.max_connections` at once: while a connection holds
/// the only slot, the next waits unanswered (in the listen backlog, holding nothing of the
/// node), and it is served as soon as the first has its answer.
#[tokio::test]
async fn the_operations_port_serves_at_most_its_limit_at_once() {
    let node = start_node(|s| s.metrics.max_connections = 1);
    let ops = node.metrics_addr.expect("the test node serves metrics");
    let mut held = tokio::net::TcpStream::connect(ops).await.unwrap();
    // Accepted first (the backlog is in order), it takes the slot; half a request keeps it.
    held.write_all(b"GET /health").await.unwrap();
    let mut next = tokio::spawn(http_get(ops, "/health"));
    assert!(
        tokio::time::timeout(Duration::from_millis(200), &mut next)
            .await
            .is_err(),
        "a second connection is not served while the first holds the only slot"
    );

    held.write_all(b" HTTP/1.0\r\n\r\n").await.unwrap();
    let mut answer = Vec::new();
    held.read_to_end(&mut answer).await.unwrap();
    let answer = String::from_utf8_lossy(&answer);
    // An HTTP/1.0 request gets an HTTP/1.0 status line.
    assert!(answer.starts_with("HTTP/1.0 200"), "{answer}");
    let (status, _, body) = next.await.unwrap();
    assert_eq!((status, body.as_str()), (200, "ok\n"));
    node.shutdown();
}

/// Each worker listens on the port with `SO_REUSEPORT`; that must not let a second node take
/// the same port (and half its connections) by mistake.
#[test]
fn a_second_node_on_a_taken_port_fails_to_start() {
    let first = start_node(|_| {});
    let mut s = test_settings();
    s.server.listen = first.addr;
    match confab_cluster::spawn_node(s) {
        Err(confab_actors::node::NodeError::Bind { addr, .. }) => assert_eq!(addr, first.addr),
        Err(e) => panic!("expected a bind error, got {e}"),
        Ok(n) => panic!("a second node started on {}", n.addr),
    }
}

/// Many sign-ins at once, spread by the kernel over the workers' listeners, all get a welcome.
#[tokio::test]
async fn a_burst_of_sign_ins_over_the_workers_listeners_all_get_a_welcome() {
    let node = start_node(|s| s.server.workers = 2);
    let sign_ins = (0..64).map(|i| {
        let addr = node.addr;
        tokio::spawn(
            async move { Raw::sign_in(addr, &format!("sip:burst{i}@example.com"), "d").await },
        )
    });
    let raws = futures::future::join_all(sign_ins).await;
    assert_eq!(raws.iter().filter(|r| r.is_ok()).count(), 64);
    assert_eq!(node.endpoints_of("sip:burst63@example.com").len(), 1);
}
