//! The WebSocket listener (`[server.websocket]`, docs/protocol.md §1 "WebSocket") over real
//! sockets: WebSocket and TCP devices of one user fork, rank and hand over as two TCP devices
//! do, on one node and across a cluster; frames keep their limits and rate limits; each refusal
//! (origin, upgrade headers, path, text, size) gets its HTTP status or close code and its
//! metric; `wss://` works with the client port's certificate; pages are served from
//! `static_dir` and nothing outside it.
#![allow(clippy::unwrap_used)]

use confab_actors::settings::WebSocket;
use confab_protocol::*;
use confab_tests::pki::Pki;
use confab_tests::*;
use std::net::SocketAddr;
use tokio_tungstenite::tungstenite::Message;

const ALICE: &str = "sip:alice@example.com";
const BOB: &str = "sip:bob@example.com";
const COMPLETED_ELSEWHERE: &str = "Call completed elsewhere";

/// A node with a WebSocket listener on an ephemeral port, letting `origins` in.
fn ws_node(
    origins: &[&str],
    tweak: impl FnOnce(&mut confab_actors::Settings),
) -> confab_actors::RunningNode {
    let origins: Vec<String> = origins.iter().map(|o| (*o).to_owned()).collect();
    start_node(move |s| {
        s.server.websocket = Some(WebSocket {
            allowed_origins: origins,
            ..WebSocket::new("127.0.0.1:0".parse().unwrap())
        });
        tweak(s);
    })
}

fn ws_addr(node: &confab_actors::RunningNode) -> SocketAddr {
    node.websocket_addr.expect("a WebSocket listener")
}

/// The call's `call_state` to terminated, with its reason text.
async fn expect_terminated(raw: &mut Raw, call: &str, text: &str) {
    let reason = raw.state(call, CallState::Terminated).await;
    assert_eq!(
        reason.map(|r| r.text),
        Some(text.to_owned()),
        "{}",
        raw.user
    );
}

/// Bob's WebSocket device is given the call, accepts it, and the message flows both ways.
async fn chat_over_the_call(alice: &mut Raw, alice_call: &str, bob: &mut Raw, bob_call: &str) {
    send_and_ack(alice, alice_call, bob, bob_call, "hello over a WebSocket").await;
    send_and_ack(bob, bob_call, alice, alice_call, "and back over TCP").await;
}

#[tokio::test]
async fn a_websocket_device_signs_in_calls_and_chats_with_a_tcp_one() {
    let node = ws_node(&[], |_| {});
    let mut bob = Raw::sign_in_ws(ws_addr(&node), BOB, "browser").await;
    bob.ping().await;
    let mut alice = Raw::sign_in(node.addr, ALICE, "laptop").await;
    let (call, _) = alice.establish(BOB, None).await;
    let (incoming, immediate) = bob.incoming().await;
    assert!(immediate, "one device: accepted at once");
    assert!(matches!(bob.accept(&incoming).await, ServerMsg::Ok { .. }));
    alice.state(&call, CallState::Established).await;
    chat_over_the_call(&mut alice, &call, &mut bob, &incoming).await;
    request_ok(&mut bob, ClientMsg::Bye { rid: None }).await;
    expect_terminated(&mut alice, &call, confab_tests::legs::TERMINATED_REMOTELY.1).await;
    // The call's last events, then the close.
    let last = bob.expect_closed().await;
    assert!(
        last.iter().any(|m| matches!(
            m,
            ServerMsg::CallState {
                state: CallState::Terminated,
                ..
            }
        )),
        "{last:?}"
    );
    assert_eq!(bob.closed_with(), Some(1000));
}

#[tokio::test]
async fn websocket_and_tcp_devices_of_one_user_fork_and_the_first_click_wins() {
    let node = ws_node(&[], |s| {
        s.fork.toast_timeout_ms = 60_000;
    });
    let mut alice = Raw::sign_in(node.addr, ALICE, "laptop").await;
    let mut bob_ws = Raw::sign_in_ws(ws_addr(&node), BOB, "browser").await;
    let mut bob_tcp = Raw::sign_in(node.addr, BOB, "desk").await;
    let (call, _) = alice.establish(BOB, Some("lunch?")).await;
    let (in_ws, immediate_ws) = bob_ws.incoming().await;
    let (in_tcp, immediate_tcp) = bob_tcp.incoming().await;
    assert!(
        !immediate_ws && !immediate_tcp,
        "two devices: both get a toast"
    );
    assert!(matches!(bob_ws.accept(&in_ws).await, ServerMsg::Ok { .. }));
    alice.state(&call, CallState::Established).await;
    expect_terminated(&mut bob_tcp, &in_tcp, COMPLETED_ELSEWHERE).await;
    let (toast, _) = bob_ws
        .recv_until(|m| matches!(m, ServerMsg::MessageReceived { .. }))
        .await;
    assert!(
        matches!(&toast, ServerMsg::MessageReceived { body: Body::Text(t), toast: Some(true), .. } if t == "lunch?"),
        "{toast:?}"
    );
}

#[tokio::test]
async fn the_toast_timeout_hands_the_call_to_the_more_active_device_whatever_its_transport() {
    let node = ws_node(&[], |s| {
        s.fork.toast_timeout_ms = 300;
        s.fork.auto_accept_grace_ms = 3_000;
    });
    let mut alice = Raw::sign_in(node.addr, ALICE, "laptop").await;
    // Both ways round: the active device is on the WebSocket, then on TCP.
    for ws_active in [true, false] {
        let mut bob_ws = Raw::sign_in_ws(ws_addr(&node), BOB, "browser").await;
        let mut bob_tcp = Raw::sign_in(node.addr, BOB, "desk").await;
        let (ws_activity, tcp_activity) = if ws_active {
            (Activity::Active, Activity::Away)
        } else {
            (Activity::Away, Activity::Active)
        };
        publish(&mut bob_ws, ws_activity, None).await;
        publish(&mut bob_tcp, tcp_activity, None).await;
        let (call, _) = alice.establish(BOB, None).await;
        let (in_ws, _) = bob_ws.incoming().await;
        let (in_tcp, _) = bob_tcp.incoming().await;
        let (winner, win_call, loser, lose_call) = if ws_active {
            (&mut bob_ws, in_ws, &mut bob_tcp, in_tcp)
        } else {
            (&mut bob_tcp, in_tcp, &mut bob_ws, in_ws)
        };
        let (m, _) = winner
            .recv_until(|m| matches!(m, ServerMsg::AutoAcceptNeeded { .. }))
            .await;
        assert_eq!(
            m,
            ServerMsg::AutoAcceptNeeded {
                call: win_call.clone()
            }
        );
        assert!(matches!(
            winner.accept(&win_call).await,
            ServerMsg::Ok { .. }
        ));
        alice.state(&call, CallState::Established).await;
        expect_terminated(loser, &lose_call, COMPLETED_ELSEWHERE).await;
        for bob in [&mut bob_ws, &mut bob_tcp] {
            let reply = bob.request(ClientMsg::Bye { rid: None }).await;
            assert!(matches!(reply, ServerMsg::Ok { .. }), "{reply:?}");
            bob.expect_closed().await;
        }
        alice.state(&call, CallState::Terminated).await;
        wait_for_endpoints(&node, BOB, 0).await;
    }
}

#[tokio::test]
async fn a_websocket_device_on_one_node_and_a_tcp_device_on_another_fork_and_one_wins() {
    let nats = NatsServer::start();
    let tweak = |s: &mut confab_actors::Settings| {
        s.fork.toast_timeout_ms = 60_000;
        s.server.websocket = Some(WebSocket::new("127.0.0.1:0".parse().unwrap()));
    };
    let a = start_cluster_node(&nats, "node-a", tweak);
    let b = start_cluster_node(&nats, "node-b", tweak);
    let mut bob_ws = Raw::sign_in_ws(ws_addr(&a), BOB, "browser").await;
    let mut bob_tcp = Raw::sign_in(b.addr, BOB, "desk").await;
    let mut alice = Raw::sign_in(b.addr, ALICE, "laptop").await;
    for n in [&a, &b] {
        wait_for_endpoints(n, BOB, 2).await;
        wait_for_endpoints(n, ALICE, 1).await;
    }
    let (call, _) = alice.establish(BOB, Some("are you there?")).await;
    let (in_ws, _) = bob_ws.incoming().await;
    let (in_tcp, _) = bob_tcp.incoming().await;
    // The WebSocket device on the other node clicks first.
    assert!(matches!(bob_ws.accept(&in_ws).await, ServerMsg::Ok { .. }));
    alice.state(&call, CallState::Established).await;
    expect_terminated(&mut bob_tcp, &in_tcp, COMPLETED_ELSEWHERE).await;
    chat_over_the_call(&mut alice, &call, &mut bob_ws, &in_ws).await;
}

/// The value of `confab_websocket_rejections_total{reason}` on `node`.
async fn rejections(node: &confab_actors::RunningNode, reason: &str) -> f64 {
    let (_, _, body) = http_get(node.metrics_addr.unwrap(), "/metrics").await;
    metric(
        &body,
        &format!("confab_websocket_rejections_total{{reason=\"{reason}\"}}"),
    )
}

#[tokio::test]
async fn each_bad_upgrade_gets_its_http_status_and_is_counted() {
    let node = ws_node(&["https://chat.example.com"], |_| {});
    let addr = ws_addr(&node);
    let upgrade = [
        ("Upgrade", "websocket"),
        ("Connection", "Upgrade"),
        ("Sec-WebSocket-Version", "13"),
        ("Sec-WebSocket-Key", "dGhlIHNhbXBsZSBub25jZQ=="),
    ];
    let with = |extra: &'static [(&'static str, &'static str)]| {
        let mut h = upgrade.to_vec();
        h.extend_from_slice(extra);
        h
    };
    // (path, headers, status, the metric's reason)
    type Case<'a> = (&'a str, Vec<(&'a str, &'a str)>, u16, &'a str);
    let cases: Vec<Case> = vec![
        (
            "/confab",
            with(&[("Origin", "https://evil.example")]),
            403,
            "origin",
        ),
        ("/confab", vec![], 426, "upgrade_required"),
        ("/confab", upgrade[..3].to_vec(), 400, "bad_request"),
        ("/elsewhere", upgrade.to_vec(), 404, "not_found"),
    ];
    for (path, headers, status, reason) in cases {
        let before = rejections(&node, reason).await;
        let (got, head, _) = http_request(addr, "GET", path, &headers, None).await;
        assert_eq!(got, status, "{path} {headers:?}: {head}");
        if status == 426 {
            assert!(
                head.to_ascii_lowercase().contains("upgrade: websocket"),
                "{head}"
            );
        }
        assert!(
            rejections(&node, reason).await > before,
            "{reason} not counted"
        );
    }
    // An allowed origin, and the node's own origin (a page it served), are let in.
    for origin in [
        "https://chat.example.com".to_owned(),
        format!("http://{addr}"),
    ] {
        let wire = confab_tests::wire::Wire::websocket(addr, "/confab", Some(&origin)).await;
        assert!(wire.is_ok(), "{origin}: {:?}", wire.err());
    }
    let refused =
        confab_tests::wire::Wire::websocket(addr, "/confab", Some("https://evil.example")).await;
    assert!(refused.is_err());
}

#[tokio::test]
async fn a_silent_websocket_client_is_dropped_after_three_heartbeats_like_tcp() {
    let node = ws_node(&[], |s| s.server.heartbeat_ms = 200);
    let mut alice = Raw::sign_in(node.addr, ALICE, "laptop").await;
    let mut bob = Raw::sign_in_ws(ws_addr(&node), BOB, "browser").await;
    let (call, _) = alice.establish(BOB, None).await;
    let (incoming, _) = bob.incoming().await;
    // Bob's last frame is his accept: from its sending he is silent, Alice keeps pinging. (Taken
    // before the accept is sent, so that the node's last sign of life from him is later.)
    let silent_since = std::time::Instant::now();
    assert!(matches!(bob.accept(&incoming).await, ServerMsg::Ok { .. }));
    let ended = loop {
        assert!(
            silent_since.elapsed() < EVENT_TIMEOUT,
            "Bob was never dropped"
        );
        alice.send(&ClientMsg::Ping { rid: None }).await;
        let soon = tokio::time::Instant::now() + std::time::Duration::from_millis(100);
        let terminated = |m: &ServerMsg| matches!(m, ServerMsg::CallState { call: c, state: CallState::Terminated, .. } if *c == call);
        if let Ok(m) = alice.try_recv_until(soon, terminated).await {
            break m;
        }
    };
    assert!(silent_since.elapsed() >= std::time::Duration::from_millis(600));
    assert!(
        matches!(&ended, ServerMsg::CallState { reason: Some(r), .. } if r.code == 408),
        "{ended:?}"
    );
    bob.expect_closed().await;
    assert_eq!(bob.closed_with(), Some(1000));
}

#[tokio::test]
async fn an_upgrade_over_max_connections_gets_503() {
    let node = ws_node(&[], |s| s.server.max_connections = 1);
    let mut bob = Raw::sign_in_ws(ws_addr(&node), BOB, "browser").await;
    bob.ping().await;
    let (status, head, _) = http_request(ws_addr(&node), "GET", "/confab", &[], None).await;
    assert_eq!(status, 503, "{head}");
    // The connection that holds the slot is untouched.
    bob.ping().await;
}

#[tokio::test]
async fn a_text_message_is_closed_with_1003_and_counted() {
    let node = ws_node(&[], |_| {});
    let before = rejections(&node, "text_message").await;
    let mut bob = Raw::sign_in_ws(ws_addr(&node), BOB, "browser").await;
    bob.send_ws_message(Message::text("{\"type\":\"ping\"}"))
        .await;
    assert!(bob.expect_closed().await.is_empty());
    assert_eq!(bob.closed_with(), Some(1003));
    assert!(rejections(&node, "text_message").await > before);
    wait_for_endpoints(&node, BOB, 0).await;
}

#[tokio::test]
async fn a_message_over_the_frame_limit_gets_its_error_then_close_1009() {
    let node = ws_node(&[], |s| {
        s.server.max_frame = 4096;
        s.flow.max_message_bytes = 2048;
        s.limits.outbound_queue_bytes = 8192;
    });
    // After sign-in: `max_frame`.
    let before = rejections(&node, "too_large").await;
    let mut bob = Raw::sign_in_ws(ws_addr(&node), BOB, "browser").await;
    bob.send_ws_message(Message::binary(vec![0x80u8; 5000]))
        .await;
    let frames = bob.expect_closed().await;
    assert!(
        matches!(
            frames.as_slice(),
            [ServerMsg::Error {
                code: ErrorCode::FrameTooLarge,
                ..
            }]
        ),
        "{frames:?}"
    );
    assert_eq!(bob.closed_with(), Some(1009));
    assert!(rejections(&node, "too_large").await > before);
    // Before sign-in, the hello's own limit (`max_hello_frame`, 4096 by default) holds, like
    // on TCP: a message of exactly `max_frame` is one byte too many for it only after it.
    let mut early = Raw::connect_ws(ws_addr(&node)).await;
    early
        .send_ws_message(Message::binary(vec![0x80u8; 4097]))
        .await;
    early.expect_closed().await;
    assert_eq!(early.closed_with(), Some(1009));
}

#[tokio::test]
async fn a_websocket_connection_is_held_to_the_request_rate_like_tcp() {
    let node = ws_node(&[], |s| {
        s.limits.requests_per_second = 1;
        s.limits.request_burst = 2;
    });
    let mut bob = Raw::sign_in_ws(ws_addr(&node), BOB, "browser").await;
    let mut limited = 0;
    for _ in 0..6 {
        let reply = bob.request(ClientMsg::Ping { rid: None }).await;
        if matches!(
            reply,
            ServerMsg::Error {
                code: ErrorCode::RateLimited,
                ..
            }
        ) {
            limited += 1;
        }
    }
    assert!(limited >= 3, "only {limited} of 6 pings were refused");
}

#[tokio::test]
async fn wss_speaks_tls_with_the_client_ports_certificate() {
    use futures::{SinkExt, StreamExt};
    use rustls_pki_types::pem::PemObject;
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    let pki = Pki::new("wss");
    let node = ws_node(&[], |s| s.tls = Some(pki.node_tls()));
    let addr = ws_addr(&node);
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls_pki_types::CertificateDer::pem_file_iter(&pki.ca).unwrap() {
        roots.add(cert.unwrap()).unwrap();
    }
    let config = rustls::ClientConfig::builder()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let connector = tokio_rustls::TlsConnector::from(std::sync::Arc::new(config));
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let name = rustls_pki_types::ServerName::try_from("localhost").unwrap();
    let tls = connector.connect(name, tcp).await.unwrap();
    let request = format!("wss://localhost:{}/confab", addr.port())
        .into_client_request()
        .unwrap();
    let (mut socket, _) = tokio_tungstenite::client_async(request, tls).await.unwrap();
    let hello = ClientMsg::Hello {
        resume: None,
        rid: Some(1),
        version: 1,
        user: BOB.to_owned(),
        token: token(BOB),
        device: "browser".to_owned(),
        agent: None,
    };
    socket
        .send(Message::binary(rmp_serde::to_vec_named(&hello).unwrap()))
        .await
        .unwrap();
    let reply = tokio::time::timeout(EVENT_TIMEOUT, socket.next())
        .await
        .expect("an answer in time")
        .expect("a message")
        .unwrap();
    let welcome = decode_server(&reply.into_data()).unwrap();
    assert!(matches!(welcome, ServerMsg::Welcome { .. }), "{welcome:?}");
    // A plain WebSocket on the TLS listener gets nothing.
    assert!(
        confab_tests::wire::Wire::websocket(addr, "/confab", None)
            .await
            .is_err()
    );
}

#[tokio::test]
async fn pages_are_served_from_static_dir_and_nothing_outside_it() {
    let dir = tempfile::tempdir().unwrap();
    let web = dir.path().join("web");
    std::fs::create_dir(&web).unwrap();
    std::fs::write(web.join("index.html"), "<h1>confab</h1>").unwrap();
    std::fs::write(web.join("app.js"), "export const x = 1;").unwrap();
    std::fs::write(dir.path().join("secret.txt"), "no").unwrap();
    let web_dir = web.to_str().unwrap().to_owned();
    let node = start_node(move |s| {
        s.server.websocket = Some(WebSocket {
            static_dir: web_dir,
            ..WebSocket::new("127.0.0.1:0".parse().unwrap())
        });
    });
    let addr = ws_addr(&node);
    let (status, head, body) = http_get(addr, "/").await;
    assert_eq!((status, body.as_str()), (200, "<h1>confab</h1>"), "{head}");
    assert!(head.contains("text/html"), "{head}");
    let (status, head, _) = http_get(addr, "/app.js").await;
    assert_eq!(status, 200);
    assert!(head.contains("text/javascript"), "{head}");
    for outside in [
        "/../secret.txt",
        "/%2e%2e/secret.txt",
        "/missing.js",
        "/.hidden",
    ] {
        assert_eq!(http_get(addr, outside).await.0, 404, "{outside}");
    }
    // The upgrade path still upgrades.
    let mut bob = Raw::sign_in_ws(addr, BOB, "browser").await;
    bob.ping().await;
}
