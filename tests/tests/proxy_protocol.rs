//! `server.proxy_protocol`: every connection starts with a PROXY protocol v2 header, as a load
//! balancer in front of the node sends it; the per-address limits then count the client's
//! address from the header. A connection without a header, or with one that lies, is closed
//! without a frame and counted.

use confab_protocol::proxy;
use confab_protocol::*;
use confab_tests::*;
use std::net::SocketAddr;

const USER: &str = "sip:alice-proxy@example.com";

/// Connects with a PROXY header naming `client` as the source (none when `None`), then sends a
/// `hello`; the node's first frame, or `None` if it closed the connection.
async fn hello_from(
    node: SocketAddr,
    client: Option<SocketAddr>,
    device: &str,
) -> (Raw, Option<ServerMsg>) {
    let mut raw = Raw::connect(node).await;
    if let Some(client) = client {
        raw.send_bytes(&proxy::encode(client, node)).await;
    }
    raw.send(&ClientMsg::Hello {
        rid: Some(1),
        version: 1,
        user: USER.to_owned(),
        token: token(USER),
        device: device.to_owned(),
        agent: None,
    })
    .await;
    let first = raw.next_or_closed().await;
    (raw, first)
}

fn addr(s: &str) -> SocketAddr {
    s.parse().expect("a socket address")
}

#[tokio::test]
async fn the_client_address_comes_from_the_proxy_header_and_is_limited() {
    let node = start_node(|s| {
        s.server.proxy_protocol = true;
        s.limits.address_limits_exempt_loopback = false;
        s.limits.connections_per_address = 1;
    });
    let (_a, first) = hello_from(node.addr, Some(addr("203.0.113.7:40000")), "a").await;
    assert!(
        matches!(first, Some(ServerMsg::Welcome { .. })),
        "{first:?}"
    );
    // The same client address again: over its limit of one, whatever the TCP peer.
    let (_b, first) = hello_from(node.addr, Some(addr("203.0.113.7:40001")), "b").await;
    assert_eq!(first, None);
    // Another client behind the same balancer (the same TCP peer) is its own address.
    let (_c, first) = hello_from(node.addr, Some(addr("[2001:db8::9]:5555")), "c").await;
    assert!(
        matches!(first, Some(ServerMsg::Welcome { .. })),
        "{first:?}"
    );
    // No header: closed, no frame (the node cannot tell whose connection it is).
    let (_d, first) = hello_from(node.addr, None, "d").await;
    assert_eq!(first, None);
    // A header announcing more than the node reads: closed before it is read.
    let mut lying = Raw::connect(node.addr).await;
    let mut header = proxy::encode(addr("198.51.100.1:1"), node.addr);
    header[14] = 0xFF;
    lying.send_bytes(&header).await;
    assert_eq!(lying.expect_closed().await, Vec::<ServerMsg>::new());

    let (_, _, metrics) = http_get(
        node.metrics_addr.expect("the test node serves metrics"),
        "/metrics",
    )
    .await;
    for reason in ["proxy_header", "connections_per_address"] {
        let series = format!("confab_connections_rejected_total{{reason=\"{reason}\"}}");
        assert!(metric(&metrics, &series) >= 1.0, "{series}");
    }
}
