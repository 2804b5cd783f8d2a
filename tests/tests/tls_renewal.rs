//! Certificates renewed in place: link TLS files (`cluster.link_tls_*`, docs/operations.md
//! "Link TLS") replaced and read again by a reload (SIGHUP, `POST /admin/reload`) make the
//! next links, and a set that does not load is reported and leaves the old one in force; the
//! expiry of the certificate in use, on the client port and on the links, is exported
//! (`confab_tls_cert_expiry_timestamp_seconds{cert}`) and follows a reload. A file of its
//! own: the metrics recorder is the test process's, and no other test's node may set the
//! gauge meanwhile. Real nats-server, real nodes, real TLS (rcgen certificates).

use confab_tests::pki::Pki;
use confab_tests::*;

const ALICE: &str = "sip:alice@example.com";
const BOB: &str = "sip:bob@example.com";

/// Copies `from` to `to` (a certificate, key or CA file replaced in place, as an operator does).
fn replace_file(from: &std::path::Path, to: &std::path::Path) {
    std::fs::copy(from, to).unwrap_or_else(|e| panic!("copy {from:?} to {to:?}: {e}"));
}

/// Unix seconds of the first of January of `year` (UTC).
fn new_year(year: i64) -> f64 {
    // Days from 1970-01-01 to `year`-01-01 in the proleptic Gregorian calendar.
    let leaps = |y: i64| y / 4 - y / 100 + y / 400;
    let days = 365 * (year - 1970) + leaps(year - 1) - leaps(1969);
    (days * 86_400) as f64
}

#[tokio::test]
async fn link_certificates_replaced_and_reloaded_make_the_next_links_and_report_their_expiry() {
    let nats = NatsServer::start();
    let old_ca = Pki::new("old cluster");
    let new_ca = Pki::new("new cluster");
    // Node A's files live where an operator keeps them; they start issued by the old CA.
    let files = tempfile::tempdir().expect("a temporary directory");
    let (cert, key, ca) = (
        files.path().join("link.pem"),
        files.path().join("link-key.pem"),
        files.path().join("ca.pem"),
    );
    let (c, k) = old_ca.issue_link_until("node-a", 2090);
    replace_file(&c, &cert);
    replace_file(&k, &key);
    replace_file(&old_ca.ca, &ca);
    let text = |p: &std::path::Path| p.to_str().expect("UTF-8").to_owned();
    let a = start_cluster_node(&nats, "node-a", |s| {
        let c = s.cluster.as_mut().expect("cluster");
        c.link_tls_cert_file = text(&cert);
        c.link_tls_key_file = text(&key);
        c.link_tls_ca_file = text(&ca);
    });
    // Node B is already on the new CA: the two refuse each other.
    // Its certificate expires when A's first one does: the metrics recorder is the test
    // process's, shared by both nodes, so the expiry gauge then reads 2090 whoever set it last.
    let b = start_cluster_node(&nats, "node-b", |s| {
        new_ca.with_link_tls(s);
        let (cert, key) = new_ca.issue_link_until("node-b", 2090);
        let c = s.cluster.as_mut().expect("cluster");
        c.link_tls_cert_file = text(&cert);
        c.link_tls_key_file = text(&key);
    });
    for n in [&a, &b] {
        wait_links(n, "dials refused both ways", |l| {
            l.refused >= 1 && l.failed_dials >= 1
        })
        .await;
    }
    let expiry = "confab_tls_cert_expiry_timestamp_seconds{cert=\"link\"}";
    let ops = a.metrics_addr.expect("test nodes serve metrics");
    let (_, _, text_before) = http_get(ops, "/metrics").await;
    assert_eq!(metric(&text_before, expiry), new_year(2090), "{expiry}");
    // The CA's own expiry too (rcgen's default for the test CAs: 4096-01-01).
    let ca_expiry = "confab_tls_cert_expiry_timestamp_seconds{cert=\"link_ca\"}";
    assert_eq!(
        metric(&text_before, ca_expiry),
        new_year(4096),
        "{ca_expiry}"
    );

    // A new certificate and key that load, but a CA file that does not: the reload says so,
    // and the old set stays in force, the gauge still naming the old certificate.
    let (c, k) = new_ca.issue_link_until("node-a", 2093);
    replace_file(&c, &cert);
    replace_file(&k, &key);
    std::fs::write(&ca, "not a CA").expect("write");
    let report = a.reload().expect("the settings load");
    assert!(
        report.failed.iter().any(|f| f.what == "link_tls"),
        "{report:?}"
    );
    assert!(!report.reloaded.iter().any(|r| r == "link_tls"));
    let (_, _, text_failed) = http_get(ops, "/metrics").await;
    assert_eq!(metric(&text_failed, expiry), new_year(2090), "unchanged");

    // The new CA's files in place, then a reload: the next dials either way make links.
    let (c, k) = new_ca.issue_link_until("node-a", 2095);
    replace_file(&c, &cert);
    replace_file(&k, &key);
    replace_file(&new_ca.ca, &ca);
    let report = a.reload().expect("the settings load");
    assert!(
        report.reloaded.iter().any(|r| r == "link_tls"),
        "{report:?}"
    );
    assert!(report.failed.is_empty(), "{report:?}");
    for n in [&a, &b] {
        wait_links(n, "a TLS link each way after the reload", |l| {
            l.out == 1 && l.accepted == 1
        })
        .await;
    }
    let (mut alice, mut bob, call, bobs_call) = answered_call_across(&a, ALICE, &b, BOB).await;
    let (a_before, b_before) = (links(&a), links(&b));
    send_and_ack(&mut alice, &call, &mut bob, &bobs_call, "over the new link").await;
    send_and_ack(&mut bob, &bobs_call, &mut alice, &call, "and back").await;
    assert!(links(&a).written > a_before.written, "{:?}", links(&a));
    assert!(links(&b).written > b_before.written, "{:?}", links(&b));
    let (_, _, text_after) = http_get(ops, "/metrics").await;
    assert_eq!(metric(&text_after, expiry), new_year(2095), "{expiry}");
    for (series, at_least) in [
        ("confab_cluster_link_tls_reloads_total{result=\"ok\"}", 1.0),
        (
            "confab_cluster_link_tls_reloads_total{result=\"failed\"}",
            1.0,
        ),
    ] {
        assert!(metric(&text_after, series) >= at_least, "{series}");
    }

    // Back to the old CA's files, which B does not trust: the links already open are not cut
    // and keep carrying what crosses (only a new dial would use the files read last).
    let (c, k) = old_ca.issue_link_until("node-a", 2090);
    replace_file(&c, &cert);
    replace_file(&k, &key);
    replace_file(&old_ca.ca, &ca);
    let report = a.reload().expect("the settings load");
    assert!(
        report.reloaded.iter().any(|r| r == "link_tls"),
        "{report:?}"
    );
    let (a_before, b_before) = (links(&a), links(&b));
    send_and_ack(
        &mut alice,
        &call,
        &mut bob,
        &bobs_call,
        "still over the link",
    )
    .await;
    send_and_ack(&mut bob, &bobs_call, &mut alice, &call, "and back again").await;
    let (a_after, b_after) = (links(&a), links(&b));
    assert!(a_after.written > a_before.written, "{a_after:?}");
    assert!(b_after.written > b_before.written, "{b_after:?}");
    for (before, after) in [(a_before, a_after), (b_before, b_after)] {
        assert_eq!((after.out, after.accepted), (1, 1), "{after:?}");
        assert_eq!(
            (after.failed_dials, after.refused),
            (before.failed_dials, before.refused),
            "no link was cut and dialed again: {after:?}"
        );
    }
}

#[tokio::test]
async fn the_client_port_certificate_expiry_is_exported_and_follows_a_reload() {
    let pki = Pki::new("client port");
    let dir = tempfile::tempdir().expect("a temporary directory");
    let (cert, key) = (dir.path().join("node.pem"), dir.path().join("node-key.pem"));
    pki.issue_server_until(&cert, &key, 2091);
    let mut tls = pki.node_tls();
    tls.cert_file = cert.clone();
    tls.key_file = key.clone();
    tls.client_ca_file = Some(pki.ca.clone());
    let node = start_node(|s| s.tls = Some(tls));
    let expiry = "confab_tls_cert_expiry_timestamp_seconds{cert=\"client\"}";
    let ops = node.metrics_addr.expect("test nodes serve metrics");
    let (_, _, text) = http_get(ops, "/metrics").await;
    assert_eq!(metric(&text, expiry), new_year(2091), "{expiry}");
    // The client CA's (rcgen's default for the test CA: 4096-01-01).
    let ca_expiry = "confab_tls_cert_expiry_timestamp_seconds{cert=\"client_ca\"}";
    assert_eq!(metric(&text, ca_expiry), new_year(4096), "{ca_expiry}");
    pki.issue_server_until(&cert, &key, 2092);
    let report = node.reload().expect("the settings load");
    assert!(report.reloaded.iter().any(|r| r == "tls"), "{report:?}");
    let (_, _, text) = http_get(ops, "/metrics").await;
    assert_eq!(metric(&text, expiry), new_year(2092), "{expiry}");
}
