//! Direct links between nodes (`cluster.link_listen`, `cluster/src/direct/`): envelopes go over
//! them instead of NATS, keep their order when links fail under load and come back, and a node
//! that cannot prove the cluster's secret (or takes no links) is still reached over NATS; with
//! link TLS (`cluster.link_tls_*`) links carry the same over TLS, and a node whose certificate
//! the cluster's CA did not sign for it, or that does not use link TLS, is reached over NATS.
//! Real nats-server, real nodes, real sockets, real TLS (rcgen certificates); clients act the
//! moment a frame arrives.

use confab_actors::{RunningNode, Settings};
use confab_cluster::DirectLinks;
use confab_protocol::*;
use confab_tests::pki::Pki;
use confab_tests::*;
use std::collections::HashMap;
use std::time::Duration;

const ALICE: &str = "sip:alice@example.com";
const BOB: &str = "sip:bob@example.com";

/// Rounds of the order test: each cuts every link once, in the middle of a burst.
const ROUNDS: usize = 5;
/// Messages of each round, all sent before any answer is read.
const PER_ROUND: usize = 100;

fn short_acks(s: &mut Settings) {
    // A message whose envelope a cut link lost is answered 408 this soon.
    s.flow.ack_timeout_ms = 1_000;
}

/// Sends message number `n` on `call` (its text is the number); its rid.
async fn send_numbered(from: &mut Raw, call: &str, n: usize) -> u32 {
    let rid = from.rid().expect("a rid");
    from.send(&ClientMsg::Message {
        rid: Some(rid),
        call: call.to_owned(),
        content_type: "text/plain".into(),
        body: Body::Text(n.to_string()),
    })
    .await;
    rid
}

#[tokio::test]
async fn messages_keep_their_order_while_direct_links_fail_under_load_and_come_back() {
    let nats = NatsServer::start();
    let a = start_cluster_node(&nats, "node-a", short_acks);
    let b = start_cluster_node(&nats, "node-b", short_acks);
    for n in [&a, &b] {
        wait_links(n, "a link each way", |l| l.out == 1 && l.accepted == 1).await;
    }
    let mut alice = Raw::sign_in(a.addr, ALICE, "laptop").await;
    let mut bob = Raw::sign_in(b.addr, BOB, "desk").await;
    wait_for_endpoints(&a, BOB, 1).await;
    let (call, bobs_call) = answered_call(&mut alice, &mut bob).await;
    let written_before = links(&a).written;

    let mut next = 0usize;
    let mut received: Vec<usize> = Vec::new();
    let (mut delivered, mut failed) = (0, 0);
    let mut cuts = 0;
    for round in 0..ROUNDS {
        if round > 0 {
            // The links cut in the round before are dialed again at the next heartbeats.
            for n in [&a, &b] {
                wait_links(n, "the links made again", |l| l.out == 1 && l.accepted == 1).await;
            }
        }
        let (cut_tx, cut_rx) = tokio::sync::oneshot::channel::<()>();
        let (done_tx, mut done_rx) = tokio::sync::oneshot::channel::<()>();
        let sender = async {
            let mut asked: HashMap<u32, usize> = HashMap::new();
            let mut cut = Some(cut_rx);
            for i in 0..PER_ROUND {
                if i == PER_ROUND / 2
                    && let Some(cut) = cut.take()
                {
                    // The second half goes after the cut: over NATS after the `Closed`
                    // marker, or over a link made again after its `Open`.
                    cut.await.expect("the receiver cuts the links");
                }
                let rid = send_numbered(&mut alice, &call, next).await;
                asked.insert(rid, next);
                next += 1;
            }
            // Exactly one answer each.
            let mut answers: HashMap<u32, ServerMsg> = HashMap::new();
            while answers.len() < PER_ROUND {
                let m = alice.recv_within(Duration::from_secs(10)).await;
                let rid = match &m {
                    ServerMsg::MessageDelivered { rid, .. } => *rid,
                    ServerMsg::MessageFailed { rid, code, .. } => {
                        assert_eq!(*code, 408, "only a lost envelope fails: {m:?}");
                        *rid
                    }
                    _ => continue,
                };
                let rid = rid.expect("answers carry the rid");
                assert!(
                    asked.contains_key(&rid),
                    "an answer to a message not sent: {m:?}"
                );
                assert!(answers.insert(rid, m).is_none(), "rid {rid} answered twice");
            }
            let _ = done_tx.send(());
            answers
        };
        let receiver = async {
            let mut this_round = 0;
            let mut cut = Some(cut_tx);
            loop {
                tokio::select! {
                    m = bob.recv() => {
                        if let ServerMsg::MessageReceived { msg, body: Body::Text(text), toast: None, .. } = m {
                            received.push(text.parse().expect("a number"));
                            bob.send(&ClientMsg::MessageAck { call: bobs_call.clone(), msg }).await;
                            this_round += 1;
                            if this_round == PER_ROUND / 4 && let Some(cut) = cut.take() {
                                // Mid-stream, both ways, while the link carries the first
                                // half: what is still queued for it is lost.
                                cuts += confab_cluster::of(&a).expect("cluster").cut_direct_links();
                                cuts += confab_cluster::of(&b).expect("cluster").cut_direct_links();
                                let _ = cut.send(());
                            }
                        }
                    }
                    _ = &mut done_rx => break,
                }
            }
        };
        let (answers, ()) = tokio::join!(sender, receiver);
        for m in answers.values() {
            match m {
                ServerMsg::MessageDelivered { .. } => delivered += 1,
                _ => failed += 1,
            }
        }
    }
    // Never out of order, never twice (a message may be missing: its envelope was lost in a cut).
    for pair in received.windows(2) {
        assert!(
            pair[0] < pair[1],
            "received out of order or twice: {} then {}",
            pair[0],
            pair[1]
        );
    }
    eprintln!(
        "{delivered} delivered, {failed} failed (408), {cuts} links cut; a {:?}, b {:?}",
        links(&a),
        links(&b)
    );
    assert_eq!(delivered + failed, ROUNDS * PER_ROUND);
    assert!(cuts >= ROUNDS * 2, "every round cut links: {cuts}");
    assert!(
        delivered >= ROUNDS * PER_ROUND / 2,
        "most messages get through: {delivered} delivered, {failed} failed"
    );
    assert!(
        links(&a).written > written_before,
        "the messages went over the link: {:?}",
        links(&a)
    );
    assert!(links(&b).read > 0, "{:?}", links(&b));
}

#[tokio::test]
async fn a_node_without_the_secret_or_without_links_is_still_reached_over_nats() {
    let nats = NatsServer::start();
    let a = start_cluster_node(&nats, "node-a", |_| {});
    let c = start_cluster_node(&nats, "node-c", |s| {
        if let Some(c) = s.cluster.as_mut() {
            c.link_secret = "another cluster's secret".to_owned();
        }
    });
    let d = start_cluster_node(&nats, "node-d", without_direct_links);
    // a and c each dial the other and are refused; d is never dialed and dials nobody.
    wait_links(&a, "a refused c's dial", |l| {
        l.refused >= 1 && l.failed_dials >= 1
    })
    .await;
    wait_links(&c, "c refused a's dial", |l| {
        l.refused >= 1 && l.failed_dials >= 1
    })
    .await;
    for n in [&a, &c] {
        assert_eq!((links(n).out, links(n).accepted), (0, 0));
    }
    assert_eq!(links(&d), DirectLinks::default());

    let mut alice = Raw::sign_in(a.addr, ALICE, "laptop").await;
    for (node, device) in [(&c, "on-c"), (&d, "on-d")] {
        let mut bob = Raw::sign_in(node.addr, BOB, device).await;
        wait_for_endpoints(&a, BOB, 1).await;
        let (call, bobs_call) = answered_call(&mut alice, &mut bob).await;
        send_and_ack(&mut alice, &call, &mut bob, &bobs_call, "over NATS").await;
        send_and_ack(&mut bob, &bobs_call, &mut alice, &call, "and back").await;
        bob.request(ClientMsg::Bye { rid: None }).await;
        wait_for_endpoints(&a, BOB, 0).await;
    }
    assert_eq!(links(&a).written, 0, "nothing went over a link");
}

/// Someone without the secret on the link port: an oversized handshake frame closes the
/// connection unread, at most 64 handshakes wait at once (the rest are closed at once), and
/// each is counted as refused; the node's own links are untouched.
#[tokio::test]
async fn a_stranger_on_the_link_port_is_refused_cheaply() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let nats = NatsServer::start();
    let a = start_cluster_node(&nats, "node-a", |_| {});
    let addr = confab_cluster::of(&a)
        .expect("cluster")
        .direct_link_address()
        .expect("links on");
    // A frame announced at 1 MiB, far past the handshake's bound: closed without reading it.
    let mut s = tokio::net::TcpStream::connect(&addr)
        .await
        .expect("connects");
    s.write_all(&(1u32 << 20).to_be_bytes())
        .await
        .expect("writes");
    s.write_all(&[0u8; 1024]).await.expect("writes");
    let mut buf = [0u8; 64];
    let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf))
        .await
        .expect("closed within the handshake's time");
    assert!(matches!(n, Ok(0) | Err(_)), "closed: {n:?}");
    wait_links(&a, "the oversized frame refused", |l| l.refused >= 1).await;
    // 80 connections that say nothing: 64 wait for their handshake, 16 are closed at once.
    let mut idle = Vec::new();
    for _ in 0..80 {
        idle.push(
            tokio::net::TcpStream::connect(&addr)
                .await
                .expect("connects"),
        );
    }
    wait_links(&a, "the handshakes over the bound closed", |l| {
        l.refused >= 17
    })
    .await;
    let mut closed = 0;
    for s in &mut idle {
        if let Ok(r) = tokio::time::timeout(Duration::from_millis(50), s.read(&mut buf)).await {
            assert!(matches!(r, Ok(0) | Err(_)), "{r:?}");
            closed += 1;
        }
    }
    assert_eq!(
        closed, 16,
        "only the connections past the bound were closed at once"
    );
    assert_eq!((links(&a).out, links(&a).accepted), (0, 0));
}

/// Alice sends `n` messages on `call` before reading any answer; Bob acks each as it arrives.
/// Each is delivered, and answered exactly once.
async fn exchange(alice: &mut Raw, call: &str, bob: &mut Raw, bobs_call: &str, n: usize) {
    let mut asked = HashMap::new();
    for i in 0..n {
        let rid = send_numbered(alice, call, i).await;
        asked.insert(rid, i);
    }
    let mut received = 0;
    while received < n {
        if let ServerMsg::MessageReceived { msg, .. } = bob.recv().await {
            bob.send(&ClientMsg::MessageAck {
                call: bobs_call.to_owned(),
                msg,
            })
            .await;
            received += 1;
        }
    }
    let mut answered = HashMap::new();
    while answered.len() < n {
        let m = alice.recv_within(Duration::from_secs(10)).await;
        let rid = match &m {
            ServerMsg::MessageDelivered { rid, .. } => rid.expect("answers carry the rid"),
            ServerMsg::MessageFailed { .. } => panic!("a message failed: {m:?}"),
            _ => continue,
        };
        assert!(
            asked.contains_key(&rid),
            "an answer to a message not sent: {m:?}"
        );
        assert!(
            answered.insert(rid, m).is_none(),
            "rid {rid} answered twice"
        );
    }
    // Nothing more comes for them (a second answer would arrive about now).
    if let Ok(m) = tokio::time::timeout(Duration::from_millis(300), alice.recv()).await {
        assert!(
            !matches!(
                m,
                ServerMsg::MessageDelivered { .. } | ServerMsg::MessageFailed { .. }
            ),
            "an answer too many: {m:?}"
        );
    }
}

#[tokio::test]
async fn nodes_with_link_tls_exchange_messages_over_their_links() {
    let nats = NatsServer::start();
    let pki = Pki::new("cluster");
    let a = start_cluster_node(&nats, "node-a", |s| pki.with_link_tls(s));
    let b = start_cluster_node(&nats, "node-b", |s| pki.with_link_tls(s));
    for n in [&a, &b] {
        wait_links(n, "a TLS link each way", |l| l.out == 1 && l.accepted == 1).await;
    }
    let (mut alice, mut bob, call, bobs_call) = answered_call_across(&a, ALICE, &b, BOB).await;
    let (a_before, b_before) = (links(&a), links(&b));
    exchange(&mut alice, &call, &mut bob, &bobs_call, 50).await;
    exchange(&mut bob, &bobs_call, &mut alice, &call, 50).await;
    let (a_after, b_after) = (links(&a), links(&b));
    eprintln!("a {a_after:?}, b {b_after:?}");
    // Each way: the messages (and the acks and answers coming back) went over the links.
    assert!(a_after.written > a_before.written, "{a_after:?}");
    assert!(b_after.written > b_before.written, "{b_after:?}");
    assert!(a_after.read > a_before.read && b_after.read > b_before.read);
    for l in [a_after, b_after] {
        assert_eq!(
            (l.out, l.accepted, l.failed_dials, l.refused),
            (1, 1, 0, 0),
            "{l:?}"
        );
    }
}

/// Alice on `a` and Bob on each of `others` in turn: a call and messages both ways, over NATS.
async fn reached_over_nats(a: &RunningNode, others: &[&RunningNode]) {
    let mut alice = Raw::sign_in(a.addr, ALICE, "laptop").await;
    for (i, node) in others.iter().enumerate() {
        let mut bob = Raw::sign_in(node.addr, BOB, &format!("device-{i}")).await;
        wait_for_endpoints(a, BOB, 1).await;
        let (call, bobs_call) = answered_call(&mut alice, &mut bob).await;
        send_and_ack(&mut alice, &call, &mut bob, &bobs_call, "over NATS").await;
        send_and_ack(&mut bob, &bobs_call, &mut alice, &call, "and back").await;
        bob.request(ClientMsg::Bye { rid: None }).await;
        wait_for_endpoints(a, BOB, 0).await;
    }
}

#[tokio::test]
async fn a_node_whose_link_certificate_the_cluster_ca_did_not_sign_for_it_is_refused_both_ways() {
    let nats = NatsServer::start();
    let pki = Pki::new("cluster");
    let stranger = Pki::new("stranger");
    let a = start_cluster_node(&nats, "node-a", |s| pki.with_link_tls(s));
    // A certificate another CA signed: it trusts the cluster's CA, but is not trusted.
    let c = start_cluster_node(&nats, "node-c", |s| {
        stranger.with_link_tls(s);
        let c = s.cluster.as_mut().expect("cluster");
        c.link_tls_ca_file = pki.ca.to_str().expect("UTF-8").to_owned();
    });
    // The cluster's CA, but a certificate for another node: it cannot pass for node-e.
    let e = start_cluster_node(&nats, "node-e", |s| {
        pki.with_link_tls(s);
        let (cert, key) = pki.issue_link("node-x");
        let c = s.cluster.as_mut().expect("cluster");
        c.link_tls_cert_file = cert.to_str().expect("UTF-8").to_owned();
        c.link_tls_key_file = key.to_str().expect("UTF-8").to_owned();
    });
    // Every dial between them fails, and every node refused the others' dials.
    for n in [&a, &c, &e] {
        wait_links(n, "dials refused both ways", |l| {
            l.refused >= 2 && l.failed_dials >= 2
        })
        .await;
    }
    for n in [&a, &c, &e] {
        assert_eq!((links(n).out, links(n).accepted), (0, 0));
    }
    reached_over_nats(&a, &[&c, &e]).await;
    for n in [&a, &c, &e] {
        assert_eq!(links(n).written, 0, "nothing went over a link");
    }
}

#[tokio::test]
async fn a_node_with_link_tls_and_one_with_plain_links_do_not_link_and_use_nats() {
    let nats = NatsServer::start();
    let pki = Pki::new("cluster");
    let a = start_cluster_node(&nats, "node-a", |s| pki.with_link_tls(s));
    let p = start_cluster_node(&nats, "node-p", |_| {});
    for n in [&a, &p] {
        wait_links(n, "dials refused both ways", |l| {
            l.refused >= 1 && l.failed_dials >= 1
        })
        .await;
    }
    for n in [&a, &p] {
        assert_eq!((links(n).out, links(n).accepted), (0, 0));
    }
    reached_over_nats(&a, &[&p]).await;
    for n in [&a, &p] {
        assert_eq!(links(n).written, 0, "nothing went over a link");
    }
}
