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
        resume: None,
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

/// With `server.proxy_trusted_from`, a PROXY header is taken only from those networks (the load
/// balancers): a peer elsewhere is closed before its header is read, so it cannot claim an
/// address.
#[tokio::test]
async fn a_header_is_taken_only_from_the_trusted_networks() {
    let elsewhere = start_node(|s| {
        s.server.proxy_protocol = true;
        s.server.proxy_trusted_from = vec!["10.0.0.0/8".to_owned()];
    });
    // Closed before its header is read: the header may still go out, nothing more.
    let mut untrusted = Raw::connect(elsewhere.addr).await;
    untrusted
        .send_bytes(&proxy::encode(addr("203.0.113.7:40000"), elsewhere.addr))
        .await;
    assert_eq!(
        untrusted.expect_closed().await,
        Vec::<ServerMsg>::new(),
        "127.0.0.1 is not a trusted balancer here"
    );
    let (_, _, metrics) = http_get(
        elsewhere
            .metrics_addr
            .expect("the test node serves metrics"),
        "/metrics",
    )
    .await;
    assert!(
        metric(
            &metrics,
            "confab_connections_rejected_total{reason=\"proxy_untrusted\"}"
        ) >= 1.0
    );

    let here = start_node(|s| {
        s.server.proxy_protocol = true;
        s.server.proxy_trusted_from = vec!["127.0.0.0/8".to_owned(), "::1/128".to_owned()];
    });
    let (_raw, first) = hello_from(here.addr, Some(addr("203.0.113.7:40000")), "b").await;
    assert!(
        matches!(first, Some(ServerMsg::Welcome { .. })),
        "{first:?}"
    );
}
