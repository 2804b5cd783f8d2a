//! The admin API on the operations port (docs/operations.md, "The admin API"), over real HTTP
//! against real nodes: the bearer token, status, sessions and their pages, one user's ranked
//! endpoints, kick, drain, the cluster-wide answers over a real nats-server, and the
//! `confab admin` CLI end to end. Nothing here sleeps where an event can be awaited; state a
//! node reaches on its own is polled with a deadline.
#![allow(clippy::unwrap_used, clippy::print_stdout)]

use confab_actors::{RunningNode, Settings};
use confab_protocol::*;
use confab_tests::*;
use serde_json::{Value, json};
use std::net::SocketAddr;
use std::time::Duration;

const ALICE: &str = "sip:alice@example.com";
const BOB: &str = "sip:bob@example.com";
const CAROL: &str = "sip:carol@example.com";

/// A node with the admin API on; (node, its operations port, the token).
fn admin_node(tweak: impl FnOnce(&mut Settings)) -> (RunningNode, SocketAddr, AdminToken) {
    let token = AdminToken::new();
    let node = start_node(|s| {
        token.configure(s);
        tweak(s);
    });
    let ops = node
        .metrics_addr
        .expect("the test node serves the operations port");
    (node, ops, token)
}

fn parse(method: &str, target: &str, status: u16, body: &str) -> Value {
    serde_json::from_str(body).unwrap_or_else(|e| {
        panic!("{method} {target}: {status} with a body that is not JSON ({e}): {body:?}")
    })
}

/// `GET target` with the bearer `token`: (status, JSON body).
async fn get(ops: SocketAddr, target: &str, token: &str) -> (u16, Value) {
    let auth = format!("Bearer {token}");
    let (status, _, body) = http_request(
        ops,
        "GET",
        target,
        &[("Authorization", auth.as_str())],
        None,
    )
    .await;
    (status, parse("GET", target, status, &body))
}

/// `POST target` with the bearer `token` and the JSON `body`: (status, JSON body).
async fn post(ops: SocketAddr, target: &str, token: &str, body: &str) -> (u16, Value) {
    let auth = format!("Bearer {token}");
    let (status, _, reply) = http_request(
        ops,
        "POST",
        target,
        &[
            ("Authorization", auth.as_str()),
            ("Content-Type", "application/json"),
        ],
        Some(body),
    )
    .await;
    (status, parse("POST", target, status, &reply))
}

/// A `GET` that must be 200: its JSON.
async fn get_ok(ops: SocketAddr, target: &str, token: &str) -> Value {
    let (status, v) = get(ops, target, token).await;
    assert_eq!(status, 200, "GET {target}: {v}");
    v
}

/// The value of `series` in `ops`'s `/metrics` now.
async fn scrape(ops: SocketAddr, series: &str) -> f64 {
    let (status, _, text) = http_get(ops, "/metrics").await;
    assert_eq!(status, 200);
    metric(&text, series)
}

fn admin_requests(result: &str) -> String {
    format!("confab_admin_requests_total{{result=\"{result}\"}}")
}

/// Polls `check` (every 20 ms) until it gives `Ok`, for at most `limit`; panics with its last
/// complaint. For what a node reaches on its own, where no event reaches the test.
async fn poll<T>(limit: Duration, mut check: impl AsyncFnMut() -> Result<T, String>) -> T {
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        match check().await {
            Ok(v) => return v,
            Err(complaint) => assert!(
                tokio::time::Instant::now() < deadline,
                "not within {limit:?}: {complaint}"
            ),
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The endpoint ids of a sessions page, in order.
fn endpoint_ids(page: &Value) -> Vec<String> {
    page["sessions"]
        .as_array()
        .unwrap_or_else(|| panic!("no sessions in {page}"))
        .iter()
        .map(|s| s["endpoint"].as_str().unwrap().to_owned())
        .collect()
}

/// Every page of `GET /admin/sessions?{query}limit={limit}`, following `next`: each page's
/// endpoint ids. Checks each page: at most `limit`, `next` the last id of a full page, null
/// after a short one. A page that exactly fills up may still have a `next`, with an empty
/// page after it (the API cannot tell that no node holds more): only the last page may be
/// empty, and only after a full one.
async fn all_pages(ops: SocketAddr, query: &str, token: &str, limit: usize) -> Vec<Vec<String>> {
    let mut pages: Vec<Vec<String>> = Vec::new();
    let mut target = format!("/admin/sessions?{query}limit={limit}");
    loop {
        let page = get_ok(ops, &target, token).await;
        assert_eq!(page["missing_nodes"], json!([]), "{page}");
        let ids = endpoint_ids(&page);
        assert!(ids.len() <= limit, "{target}: {page}");
        if ids.is_empty() {
            assert!(
                pages.is_empty() || pages.last().unwrap().len() == limit,
                "an empty page after a short one: {pages:?}"
            );
        }
        pages.push(ids.clone());
        assert!(pages.len() < 100, "paging does not end: {pages:?}");
        match page["next"].as_str() {
            Some(next) => {
                assert_eq!(ids.len(), limit, "a short page with a next: {page}");
                assert_eq!(Some(next), ids.last().map(String::as_str), "{page}");
                target = format!("/admin/sessions?{query}limit={limit}&after={next}");
            }
            None => {
                assert!(page["next"].is_null(), "{page}");
                return pages;
            }
        }
    }
}

/// The session of `endpoint` in a sessions page.
fn session<'a>(page: &'a Value, endpoint: &str) -> &'a Value {
    page["sessions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["endpoint"] == endpoint)
        .unwrap_or_else(|| panic!("no session of {endpoint} in {page}"))
}

/// Alice calls Bob, who accepts; returns (Alice's call, Bob's call) once both see it
/// established.
async fn answered_call(alice: &mut Raw, bob: &mut Raw) -> (String, String) {
    let (call, _) = alice.establish(&bob.user.clone(), None).await;
    let (incoming, _) = bob.incoming().await;
    assert!(matches!(bob.accept(&incoming).await, ServerMsg::Ok { .. }));
    bob.state(&incoming, CallState::Established).await;
    alice.state(&call, CallState::Established).await;
    (call, incoming)
}

/// The `kicked` event's reason, skipping what came before it.
async fn kicked_reason(raw: &mut Raw) -> String {
    let (m, _) = raw
        .recv_until(|m| matches!(m, ServerMsg::Kicked { .. }))
        .await;
    let ServerMsg::Kicked { reason } = m else {
        unreachable!()
    };
    reason
}

async fn publish(raw: &mut Raw, activity: Activity) {
    request_ok(
        raw,
        ClientMsg::DeviceState {
            rid: None,
            activity,
            idle_ms: Some(0),
        },
    )
    .await;
}

// ---------------------------------------------------------------------------------------------
// One node.

#[tokio::test]
async fn without_a_token_file_the_admin_routes_are_404() {
    let node = start_node(|_| {});
    let ops = node.metrics_addr.expect("the test node serves metrics");
    let _alice = Raw::sign_in(node.addr, ALICE, "laptop").await;
    let auth = [("Authorization", "Bearer anything")];
    for (method, target, body) in [
        ("GET", "/admin/status", None),
        ("GET", "/admin/sessions", None),
        ("GET", "/admin/users/sip:alice@example.com", None),
        (
            "POST",
            "/admin/kick",
            Some(r#"{"user":"sip:alice@example.com"}"#),
        ),
        ("POST", "/admin/drain", Some("{}")),
    ] {
        let (status, _, reply) = http_request(ops, method, target, &auth, body).await;
        assert_eq!(status, 404, "{method} {target}: {reply}");
        let (status, _, _) = http_request(ops, method, target, &[], body).await;
        assert_eq!(status, 404, "{method} {target} without a token");
    }
    // Nothing was done: the client is still signed in, the node still ready.
    assert_eq!(node.endpoints_of(ALICE).len(), 1);
    let (status, _, body) = http_get(ops, "/readyz").await;
    assert_eq!((status, body.as_str()), (200, "ready\n"));
    node.shutdown();
}

#[tokio::test]
async fn a_wrong_or_missing_token_is_401_with_a_bearer_challenge_and_counted() {
    let (node, ops, token) = admin_node(|_| {});
    let mut alice = Raw::sign_in(node.addr, ALICE, "laptop").await;
    let counted = admin_requests("unauthorized");
    let before = scrape(ops, &counted).await;
    let wrong = format!("Bearer {}x", token.token);
    let prefix = format!("Bearer {}", &token.token[..token.token.len() - 1]);
    let basic = format!("Basic {}", token.token);
    /// (method, path, headers, body)
    type Case<'a> = (&'a str, &'a str, Vec<(&'a str, &'a str)>, Option<&'a str>);
    let cases: Vec<Case> = vec![
        ("GET", "/admin/status", vec![], None),
        (
            "GET",
            "/admin/status",
            vec![("Authorization", wrong.as_str())],
            None,
        ),
        (
            "GET",
            "/admin/status",
            vec![("Authorization", prefix.as_str())],
            None,
        ),
        (
            "GET",
            "/admin/status",
            vec![("Authorization", basic.as_str())],
            None,
        ),
        (
            "GET",
            "/admin/status",
            vec![("Authorization", "Bearer ")],
            None,
        ),
        (
            "GET",
            "/admin/sessions",
            vec![("Authorization", wrong.as_str())],
            None,
        ),
        (
            "POST",
            "/admin/kick",
            vec![
                ("Authorization", wrong.as_str()),
                ("Content-Type", "application/json"),
            ],
            Some(r#"{"user":"sip:alice@example.com"}"#),
        ),
        (
            "POST",
            "/admin/drain",
            vec![("Content-Type", "application/json")],
            Some("{}"),
        ),
    ];
    let n = cases.len();
    for (method, target, headers, body) in cases {
        let (status, head, reply) = http_request(ops, method, target, &headers, body).await;
        assert_eq!(status, 401, "{method} {target} {headers:?}: {reply}");
        assert!(
            head.to_ascii_lowercase()
                .contains("\r\nwww-authenticate: bearer\r\n")
                || head
                    .to_ascii_lowercase()
                    .ends_with("\r\nwww-authenticate: bearer"),
            "{method} {target}: no `WWW-Authenticate: Bearer` in\n{head}"
        );
        assert_eq!(
            parse(method, target, status, &reply),
            json!({"error": "unauthorized"})
        );
    }
    let after = scrape(ops, &counted).await;
    assert!(
        after >= before + n as f64,
        "{counted}: {before} before, {after} after {n} refused requests"
    );
    // None of them acted: Alice is still signed in, the node not draining.
    alice.ping().await;
    assert_eq!(node.endpoints_of(ALICE), vec![alice.endpoint.clone()]);
    let (status, _, _) = http_get(ops, "/readyz").await;
    assert_eq!(status, 200);
    // The right token works.
    get_ok(ops, "/admin/status", &token.token).await;
    node.shutdown();
}

#[tokio::test]
async fn status_of_one_node_counts_its_endpoints_and_calls() {
    let (node, ops, token) = admin_node(|_| {});
    let t = &token.token;
    let v = get_ok(ops, "/admin/status", t).await;
    assert_eq!(v["node"], node.node_id.as_str(), "{v}");
    assert_eq!(v["missing_nodes"], json!([]), "{v}");
    let nodes = v["nodes"].as_array().unwrap();
    assert_eq!(nodes.len(), 1, "{v}");
    let me = &nodes[0];
    assert_eq!(me["node"], node.node_id.as_str());
    assert_eq!(me["version"], env!("CARGO_PKG_VERSION"));
    assert_eq!(me["endpoints"], 0);
    assert_eq!(me["calls"], 0);
    assert_eq!(me["draining"], false);
    assert_eq!(me["ready"], true);
    let up = me["uptime_ms"].as_u64().expect("uptime_ms is a number");

    let mut alice = Raw::sign_in(node.addr, ALICE, "laptop").await;
    let mut bob = Raw::sign_in(node.addr, BOB, "desk").await;
    let _bob_phone = Raw::sign_in(node.addr, BOB, "phone").await;
    let v = get_ok(ops, "/admin/status", t).await;
    assert_eq!(v["nodes"][0]["endpoints"], 3, "{v}");
    assert_eq!(v["nodes"][0]["calls"], 0, "{v}");
    assert!(v["nodes"][0]["uptime_ms"].as_u64().unwrap() >= up, "{v}");

    // One call, Alice's leg and Bob's: two legs on this node. Bob's phone's leg of the fork
    // ends when the desk answers, on its own: polled.
    let (call, incoming) = answered_call(&mut alice, &mut bob).await;
    poll(EVENT_TIMEOUT, async || {
        let v = get_ok(ops, "/admin/status", t).await;
        match v["nodes"][0]["calls"].as_u64() {
            Some(2) => Ok(()),
            _ => Err(format!("expected 2 call legs: {v}")),
        }
    })
    .await;
    let reply = alice
        .request(ClientMsg::CallTerminate {
            rid: None,
            call: call.clone(),
        })
        .await;
    assert!(matches!(reply, ServerMsg::Ok { .. }), "{reply:?}");
    bob.state(&incoming, CallState::Terminated).await;
    poll(EVENT_TIMEOUT, async || {
        let v = get_ok(ops, "/admin/status", t).await;
        match v["nodes"][0]["calls"].as_u64() {
            Some(0) => Ok(()),
            _ => Err(format!("expected no call legs after the hang-up: {v}")),
        }
    })
    .await;
    node.shutdown();
}

#[tokio::test]
async fn sessions_filter_by_user_and_page_with_after_and_next() {
    let (node, ops, token) = admin_node(|_| {});
    let t = &token.token;
    const PAGER: &str = "sip:pager@example.com";
    let mut pagers = Vec::new();
    for i in 0..5 {
        pagers.push(Raw::sign_in(node.addr, PAGER, &format!("device-{i}")).await);
    }
    let mut alice = Raw::sign_in(node.addr, ALICE, "laptop").await;
    let mut bob = Raw::sign_in(node.addr, BOB, "desk").await;
    answered_call(&mut alice, &mut bob).await;

    let mut want: Vec<String> = pagers.iter().map(|p| p.endpoint.clone()).collect();
    want.sort();

    // Pages of two: 2, 2, 1, each starting after the last one's `next`.
    let pages = all_pages(ops, "user=sip:pager@example.com&", t, 2).await;
    let sizes: Vec<usize> = pages.iter().map(Vec::len).collect();
    assert_eq!(sizes, vec![2, 2, 1], "5 sessions in pages of 2: {pages:?}");
    assert_eq!(
        pages.concat(),
        want,
        "every session once, in endpoint id order"
    );
    for page in &pages {
        for id in page {
            assert!(
                pagers.iter().any(|p| &p.endpoint == id),
                "not a pager: {id}"
            );
        }
    }

    // Each session as the node knows it: device, address, calls, state.
    let all = get_ok(ops, "/admin/sessions", t).await;
    assert_eq!(endpoint_ids(&all).len(), 7, "{all}");
    assert!(all["next"].is_null(), "{all}");
    let mut sorted = endpoint_ids(&all);
    sorted.sort();
    assert_eq!(endpoint_ids(&all), sorted, "in endpoint id order");
    for (i, p) in pagers.iter().enumerate() {
        let s = session(&all, &p.endpoint);
        assert_eq!(s["node"], node.node_id.as_str(), "{s}");
        assert_eq!(s["user"], PAGER, "{s}");
        assert_eq!(s["device"], format!("device-{i}"), "{s}");
        assert_eq!(s["remote_addr"], p.local_addr().to_string(), "{s}");
        assert_eq!(s["calls"], 0, "{s}");
        assert_eq!(s["state"], "active", "{s}");
        assert!(
            s["since_unix_ms"].as_u64().unwrap() > 1_600_000_000_000,
            "{s}"
        );
    }
    for (raw, device) in [(&alice, "laptop"), (&bob, "desk")] {
        let s = session(&all, &raw.endpoint);
        assert_eq!(s["user"], raw.user.as_str(), "{s}");
        assert_eq!(s["device"], device, "{s}");
        assert_eq!(s["remote_addr"], raw.local_addr().to_string(), "{s}");
        assert_eq!(s["calls"], 1, "a session in a call: {s}");
    }
    // A filter is a normalized URI; a user with no session lists nothing.
    let bobs = get_ok(ops, "/admin/sessions?user=sip:bob@EXAMPLE.COM", t).await;
    assert_eq!(endpoint_ids(&bobs), vec![bob.endpoint.clone()], "{bobs}");
    let none = get_ok(ops, "/admin/sessions?user=sip:nobody@example.com", t).await;
    assert_eq!(none["sessions"], json!([]), "{none}");
    assert!(none["next"].is_null(), "{none}");
    // Past the last one: an empty page.
    let last = want.last().unwrap();
    let past = get_ok(
        ops,
        &format!("/admin/sessions?after={last}&user=sip:pager@example.com"),
        t,
    )
    .await;
    assert_eq!(past["sessions"], json!([]), "{past}");

    // Bad parameters are 400.
    for target in [
        "/admin/sessions?limit=0",
        "/admin/sessions?limit=1001",
        "/admin/sessions?limit=two",
        "/admin/sessions?user=not-a-uri",
    ] {
        let (status, v) = get(ops, target, t).await;
        assert_eq!(status, 400, "{target}: {v}");
        assert!(v["error"].is_string(), "{target}: {v}");
    }
    let max = get_ok(ops, "/admin/sessions?limit=1000", t).await;
    assert_eq!(endpoint_ids(&max).len(), 7);
    node.shutdown();
}

#[tokio::test]
async fn a_users_endpoints_are_ranked_by_their_device_state() {
    let (node, ops, token) = admin_node(|_| {});
    let t = &token.token;
    let mut laptop = Raw::sign_in(node.addr, ALICE, "laptop").await;
    let mut phone = Raw::sign_in(node.addr, ALICE, "phone").await;
    let target = "/admin/users/sip:alice@example.com";

    // (endpoint, device, activity) in rank order, once the presence shard has applied them.
    let ranked = async |want: [(&str, &str, &str); 2]| {
        poll(EVENT_TIMEOUT, async || {
            let v = get_ok(ops, target, t).await;
            let got: Vec<(String, String, String, u64)> = v["endpoints"]
                .as_array()
                .ok_or_else(|| format!("no endpoints: {v}"))?
                .iter()
                .map(|e| {
                    (
                        e["endpoint"].as_str().unwrap_or("").to_owned(),
                        e["device"].as_str().unwrap_or("").to_owned(),
                        e["activity"].as_str().unwrap_or("").to_owned(),
                        e["rank"].as_u64().unwrap_or(0),
                    )
                })
                .collect();
            let expected: Vec<(String, String, String, u64)> = want
                .iter()
                .zip(1..)
                .map(|((e, d, a), r)| ((*e).to_owned(), (*d).to_owned(), (*a).to_owned(), r))
                .collect();
            if got != expected {
                return Err(format!("expected {expected:?}: {v}"));
            }
            Ok(v)
        })
        .await
    };

    publish(&mut laptop, Activity::Away).await;
    publish(&mut phone, Activity::Active).await;
    let v = ranked([
        (phone.endpoint.as_str(), "phone", "active"),
        (laptop.endpoint.as_str(), "laptop", "away"),
    ])
    .await;
    assert_eq!(v["user"], ALICE, "{v}");
    assert_eq!(v["most_active"], phone.endpoint.as_str(), "{v}");
    assert_eq!(v["availability"], "available", "{v}");
    for e in v["endpoints"].as_array().unwrap() {
        assert_eq!(e["node"], node.node_id.as_str(), "{e}");
        assert!(e["idle_ms"].is_u64(), "{e}");
    }

    // The laptop comes back, the phone goes away: the order follows.
    publish(&mut laptop, Activity::Active).await;
    publish(&mut phone, Activity::Away).await;
    let v = ranked([
        (laptop.endpoint.as_str(), "laptop", "active"),
        (phone.endpoint.as_str(), "phone", "away"),
    ])
    .await;
    assert_eq!(v["most_active"], laptop.endpoint.as_str(), "{v}");

    // The URI is normalized (its host), as everywhere, and may be percent-encoded.
    for other in [
        "/admin/users/sip:alice@Example.COM",
        "/admin/users/sip%3Aalice%40example.com",
    ] {
        let v = get_ok(ops, other, t).await;
        assert_eq!(v["user"], ALICE, "{other}: {v}");
        assert_eq!(v["most_active"], laptop.endpoint.as_str(), "{other}: {v}");
    }
    // The user part is not: SIP user parts are case-sensitive.
    let (status, v) = get(ops, "/admin/users/sip:ALICE@example.com", t).await;
    assert_eq!(status, 404, "{v}");

    // Nobody signed in as Bob: 404. Not a URI: 400.
    let (status, v) = get(ops, "/admin/users/sip:bob@example.com", t).await;
    assert_eq!(status, 404, "{v}");
    assert!(v["error"].is_string(), "{v}");
    let (status, v) = get(ops, "/admin/users/not-a-uri", t).await;
    assert_eq!(status, 400, "{v}");

    // Once Alice's devices are gone, she is unknown again.
    for mut raw in [laptop, phone] {
        raw.send(&ClientMsg::Bye { rid: None }).await;
        raw.expect_closed().await;
    }
    poll(EVENT_TIMEOUT, async || match get(ops, target, t).await {
        (404, _) => Ok(()),
        (status, v) => Err(format!("expected 404 once Alice left: {status} {v}")),
    })
    .await;
    node.shutdown();
}

#[tokio::test]
async fn kicking_an_endpoint_tells_its_client_ends_its_call_and_closes() {
    let (node, ops, token) = admin_node(|_| {});
    let t = &token.token;
    let mut alice = Raw::sign_in(node.addr, ALICE, "laptop").await;
    let mut alice_phone = Raw::sign_in(node.addr, ALICE, "phone").await;
    let mut bob = Raw::sign_in(node.addr, BOB, "desk").await;
    // Alice (laptop) calls Bob, who answers.
    let (call, incoming) = answered_call(&mut alice, &mut bob).await;
    let kicked_before = scrape(ops, "confab_sessions_kicked_total").await;
    let ok_before = scrape(ops, &admin_requests("ok")).await;

    let (status, v) = post(
        ops,
        "/admin/kick",
        t,
        &json!({"endpoint": alice.endpoint, "reason": "Account suspended"}).to_string(),
    )
    .await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v, json!({"kicked": 1, "missing_nodes": []}));

    // `kicked` with the reason first; then the call ends as on `bye`, and the node closes.
    let (m, before) = alice
        .recv_until(|m| matches!(m, ServerMsg::Kicked { .. }))
        .await;
    assert_eq!(
        m,
        ServerMsg::Kicked {
            reason: "Account suspended".to_owned()
        }
    );
    assert!(
        !before.iter().any(|m| matches!(
            m,
            ServerMsg::CallState {
                state: CallState::Terminated,
                ..
            }
        )),
        "the call ended before `kicked`: {before:?}"
    );
    let rest = alice.expect_closed().await;
    let ended = rest.iter().find_map(|m| match m {
        ServerMsg::CallState {
            call: c,
            state: CallState::Terminated,
            reason,
            ..
        } if *c == call => Some(reason.clone()),
        _ => None,
    });
    assert_eq!(
        ended,
        Some(Some(Reason::new(200, "Terminated locally"))),
        "after `kicked`: {rest:?}"
    );
    assert_eq!(
        bob.state(&incoming, CallState::Terminated).await,
        Some(Reason::new(200, "Terminated remotely"))
    );

    // Only that endpoint went: Alice's phone and Bob stay, and the sessions say so.
    alice_phone.ping().await;
    bob.ping().await;
    poll(EVENT_TIMEOUT, async || {
        let v = get_ok(ops, "/admin/sessions", t).await;
        let mut ids = endpoint_ids(&v);
        ids.sort();
        let mut want = vec![alice_phone.endpoint.clone(), bob.endpoint.clone()];
        want.sort();
        if ids == want {
            Ok(())
        } else {
            Err(format!("expected sessions {want:?}: {v}"))
        }
    })
    .await;
    assert_eq!(node.endpoints_of(ALICE), vec![alice_phone.endpoint.clone()]);
    // A kicked client may sign in again.
    let again = Raw::sign_in(node.addr, ALICE, "laptop").await;
    assert_ne!(again.endpoint, alice.endpoint);

    assert!(scrape(ops, "confab_sessions_kicked_total").await >= kicked_before + 1.0);
    assert!(scrape(ops, &admin_requests("ok")).await > ok_before);
    node.shutdown();
}

#[tokio::test]
async fn kicking_a_user_ends_every_one_of_their_devices() {
    let (node, ops, token) = admin_node(|_| {});
    let t = &token.token;
    let mut laptop = Raw::sign_in(node.addr, ALICE, "laptop").await;
    let mut phone = Raw::sign_in(node.addr, ALICE, "phone").await;
    let mut bob = Raw::sign_in(node.addr, BOB, "desk").await;

    // Another user part is another user (SIP user parts are case-sensitive): nobody.
    let (status, v) = post(
        ops,
        "/admin/kick",
        t,
        r#"{"user": "sip:Alice@example.com"}"#,
    )
    .await;
    assert_eq!(status, 404, "{v}");
    // No reason given: the default one. The URI's host is normalized.
    let (status, v) = post(
        ops,
        "/admin/kick",
        t,
        r#"{"user": "sip:alice@EXAMPLE.com"}"#,
    )
    .await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v, json!({"kicked": 2, "missing_nodes": []}));
    for raw in [&mut laptop, &mut phone] {
        assert_eq!(kicked_reason(raw).await, "Signed out by an operator");
        raw.expect_closed().await;
    }
    bob.ping().await;
    wait_for_endpoints(&node, ALICE, 0).await;
    let v = get_ok(ops, "/admin/sessions", t).await;
    assert_eq!(endpoint_ids(&v), vec![bob.endpoint.clone()], "{v}");
    // A reason of blanks is no reason.
    let (status, v) = post(
        ops,
        "/admin/kick",
        t,
        r#"{"user": "sip:bob@example.com", "reason": "   "}"#,
    )
    .await;
    assert_eq!((status, &v["kicked"]), (200, &json!(1)), "{v}");
    assert_eq!(kicked_reason(&mut bob).await, "Signed out by an operator");
    bob.expect_closed().await;
    node.shutdown();
}

#[tokio::test]
async fn kicking_nobody_is_404() {
    let (node, ops, token) = admin_node(|_| {});
    let t = &token.token;
    let mut alice = Raw::sign_in(node.addr, ALICE, "laptop").await;
    let before = scrape(ops, &admin_requests("not_found")).await;
    for body in [
        json!({"user": "sip:nobody@example.com"}),
        json!({"endpoint": "e-no-such-endpoint"}),
        json!({"endpoint": ""}),
    ] {
        let (status, v) = post(ops, "/admin/kick", t, &body.to_string()).await;
        assert_eq!(status, 404, "{body}: {v}");
        assert_eq!(v["kicked"], 0, "{body}: {v}");
        assert_eq!(v["missing_nodes"], json!([]), "{body}: {v}");
        assert!(v["error"].is_string(), "{body}: {v}");
    }
    assert!(scrape(ops, &admin_requests("not_found")).await >= before + 3.0);
    // Alice heard nothing of it.
    alice.ping().await;
    assert_eq!(node.endpoints_of(ALICE), vec![alice.endpoint.clone()]);
    node.shutdown();
}

#[tokio::test]
async fn bad_kick_bodies_are_400() {
    let (node, ops, token) = admin_node(|_| {});
    let t = &token.token;
    let mut alice = Raw::sign_in(node.addr, ALICE, "laptop").await;
    let before = scrape(ops, &admin_requests("bad_request")).await;
    let long = "x".repeat(201);
    let bodies = [
        // Both, or neither.
        json!({"user": ALICE, "endpoint": alice.endpoint}).to_string(),
        json!({}).to_string(),
        json!({"reason": "why not"}).to_string(),
        json!({"user": null, "endpoint": null}).to_string(),
        // Not a SIP URI.
        json!({"user": "alice"}).to_string(),
        // A field the API does not know.
        json!({"user": ALICE, "why": "typo"}).to_string(),
        // Too long a reason.
        json!({"user": ALICE, "reason": long}).to_string(),
        // Not JSON, or the wrong JSON.
        "{\"user\": ".to_owned(),
        "[]".to_owned(),
        json!({"user": 42}).to_string(),
        String::new(),
    ];
    let n = bodies.len();
    for body in &bodies {
        let (status, v) = post(ops, "/admin/kick", t, body).await;
        assert_eq!(status, 400, "{body:?}: {v}");
        assert!(v["error"].is_string(), "{body:?}: {v}");
    }
    // JSON without saying so.
    let auth = format!("Bearer {t}");
    let (status, _, reply) = http_request(
        ops,
        "POST",
        "/admin/kick",
        &[("Authorization", auth.as_str())],
        Some(&json!({"user": ALICE}).to_string()),
    )
    .await;
    assert_eq!(status, 400, "{reply}");
    assert!(scrape(ops, &admin_requests("bad_request")).await >= before + (n + 1) as f64);
    // Nothing was kicked.
    alice.ping().await;
    assert_eq!(node.endpoints_of(ALICE), vec![alice.endpoint.clone()]);
    // A reason of exactly 200 bytes is fine.
    let (status, v) = post(
        ops,
        "/admin/kick",
        t,
        &json!({"user": ALICE, "reason": "y".repeat(200)}).to_string(),
    )
    .await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(kicked_reason(&mut alice).await, "y".repeat(200));
    node.shutdown();
}

#[tokio::test]
async fn drain_refuses_sign_ins_tells_clients_and_stops_once_the_last_leaves() {
    let (node, ops, token) = admin_node(|s| s.server.reconnect_after_ms = 4321);
    let t = &token.token;
    let mut alice = Raw::sign_in(node.addr, ALICE, "laptop").await;
    let mut bob = Raw::sign_in(node.addr, BOB, "desk").await;
    let conflicts = scrape(ops, &admin_requests("conflict")).await;

    let (status, v) = post(ops, "/admin/drain", t, r#"{"deadline_ms": 60000}"#).await;
    assert_eq!(status, 202, "{v}");
    assert_eq!(
        v,
        json!({"draining": true, "endpoints": 2, "deadline_ms": 60000})
    );
    let (status, v) = post(ops, "/admin/drain", t, r#"{"deadline_ms": 1000}"#).await;
    assert_eq!(status, 409, "a second drain: {v}");
    assert!(v["error"].is_string(), "{v}");
    assert!(scrape(ops, &admin_requests("conflict")).await >= conflicts + 1.0);

    // Every client hears it, and stays connected.
    for raw in [&mut alice, &mut bob] {
        let (m, _) = raw
            .recv_until(|m| matches!(m, ServerMsg::Shutdown { .. }))
            .await;
        assert_eq!(
            m,
            ServerMsg::Shutdown {
                reason: "Node draining; reconnect to another node".to_owned(),
                reconnect_after_ms: 4321,
            }
        );
    }
    let (status, _, body) = http_get(ops, "/readyz").await;
    assert_eq!((status, body.as_str()), (503, "draining\n"));
    let (status, _, body) = http_get(ops, "/livez").await;
    assert_eq!((status, body.as_str()), (200, "ok\n"));
    let v = get_ok(ops, "/admin/status", t).await;
    assert_eq!(v["nodes"][0]["draining"], true, "{v}");
    assert_eq!(v["nodes"][0]["ready"], false, "{v}");
    assert_eq!(v["nodes"][0]["endpoints"], 2, "{v}");
    match Raw::try_sign_in(node.addr, CAROL, "phone").await {
        Err(ServerMsg::Error { code, .. }) => assert_eq!(code, ErrorCode::Overloaded),
        Err(other) => panic!("a sign-in while draining: {other:?}"),
        Ok(c) => panic!("a sign-in while draining was welcomed: {}", c.endpoint),
    }
    // Clients already in may still talk.
    alice.ping().await;

    // One leaves: the node stays for the other.
    alice.send(&ClientMsg::Bye { rid: None }).await;
    alice.expect_closed().await;
    let mut ended = std::pin::pin!(node.ended());
    bob.ping().await;
    assert!(
        tokio::time::timeout(Duration::from_millis(100), &mut ended)
            .await
            .is_err(),
        "the node stopped with a client left"
    );
    // The last one leaves: the node stops by itself, long before the deadline.
    bob.send(&ClientMsg::Bye { rid: None }).await;
    bob.expect_closed().await;
    tokio::time::timeout(Duration::from_secs(10), ended)
        .await
        .expect("the node stops once its last endpoint has left");
    assert!(
        tokio::net::TcpStream::connect(node.addr).await.is_err(),
        "the drained node still accepts connections"
    );
}

#[tokio::test]
async fn drain_stops_the_node_at_its_deadline_with_a_client_that_stays() {
    let (node, ops, token) = admin_node(|s| s.server.shutdown_timeout_ms = 2000);
    let t = &token.token;
    let mut alice = Raw::sign_in(node.addr, ALICE, "laptop").await;
    let mut bob = Raw::sign_in(node.addr, BOB, "desk").await;
    let (call, incoming) = answered_call(&mut alice, &mut bob).await;
    let deadline = Duration::from_millis(500);
    let started = tokio::time::Instant::now();
    let (status, v) = post(
        ops,
        "/admin/drain",
        t,
        &json!({"deadline_ms": deadline.as_millis() as u64}).to_string(),
    )
    .await;
    assert_eq!(status, 202, "{v}");
    assert_eq!(v["deadline_ms"], 500, "{v}");
    assert_eq!(v["endpoints"], 2, "{v}");
    let ended = node.ended();
    // The clients stay. At the deadline the node stops as on SIGTERM: their call ends with
    // 503 and the connections close.
    tokio::time::timeout(deadline + Duration::from_secs(3) + EVENT_TIMEOUT, ended)
        .await
        .expect("the node stops at the drain's deadline");
    let took = started.elapsed();
    assert!(
        took >= deadline,
        "the node stopped after {took:?}, before the drain's deadline {deadline:?}"
    );
    for (raw, c) in [(&mut alice, &call), (&mut bob, &incoming)] {
        let frames = raw.expect_closed().await;
        let drain = frames.iter().position(|m| {
            matches!(m, ServerMsg::Shutdown { reason, .. } if reason == "Node draining; reconnect to another node")
        });
        assert!(
            drain.is_some(),
            "{}: no drain notice in {frames:?}",
            raw.user
        );
        let ended = frames.iter().find_map(|m| match m {
            ServerMsg::CallState {
                call: x,
                state: CallState::Terminated,
                reason,
                ..
            } if x == c => Some(reason.clone()),
            _ => None,
        });
        assert_eq!(
            ended,
            Some(Some(Reason::new(503, "Server shutting down"))),
            "{}: {frames:?}",
            raw.user
        );
    }
}

#[tokio::test]
async fn drain_without_a_body_uses_the_configured_deadline_and_an_empty_node_stops_at_once() {
    let (node, ops, token) = admin_node(|s| s.admin.drain_deadline_ms = 45_000);
    let auth = format!("Bearer {}", token.token);
    let (status, _, body) = http_request(
        ops,
        "POST",
        "/admin/drain",
        &[("Authorization", auth.as_str())],
        None,
    )
    .await;
    assert_eq!(status, 202, "{body}");
    assert_eq!(
        parse("POST", "/admin/drain", status, &body),
        json!({"draining": true, "endpoints": 0, "deadline_ms": 45000})
    );
    tokio::time::timeout(EVENT_TIMEOUT, node.ended())
        .await
        .expect("a drained node with no endpoint stops at once");
    // Bad bodies are 400 (on another node: this one has stopped).
    let (node, ops, token) = admin_node(|_| {});
    for body in [
        r#"{"deadline_ms": "soon"}"#,
        r#"{"deadline": 5}"#,
        "nonsense",
    ] {
        let (status, v) = post(ops, "/admin/drain", &token.token, body).await;
        assert_eq!(status, 400, "{body}: {v}");
    }
    let (status, _, body) = http_get(ops, "/readyz").await;
    assert_eq!(
        (status, body.as_str()),
        (200, "ready\n"),
        "a bad drain drained"
    );
    node.shutdown();
}

// ---------------------------------------------------------------------------------------------
// A cluster of two nodes on a real nats-server.

struct Two {
    a: RunningNode,
    b: RunningNode,
    a_ops: SocketAddr,
    b_ops: SocketAddr,
    token: AdminToken,
    // Dropped last: the nodes leave the cluster before the server goes.
    _nats: NatsServer,
}

fn two(tweak: impl Fn(&mut Settings)) -> Two {
    let nats = NatsServer::start();
    let token = AdminToken::new();
    let a = start_cluster_node(&nats, "node-a", |s| {
        token.configure(s);
        tweak(s);
    });
    let b = start_cluster_node(&nats, "node-b", |s| {
        token.configure(s);
        tweak(s);
    });
    Two {
        a_ops: a.metrics_addr.unwrap(),
        b_ops: b.metrics_addr.unwrap(),
        a,
        b,
        token,
        _nats: nats,
    }
}

/// The status from `ops` once it lists exactly `nodes` (in order) and misses none.
async fn status_listing(ops: SocketAddr, token: &str, nodes: &[&str]) -> Value {
    poll(
        Duration::from_secs(NODE_TIMEOUT_MS / 1000 * 3 + 5),
        async || {
            let v = get_ok(ops, "/admin/status", token).await;
            let listed: Vec<&str> = v["nodes"]
                .as_array()
                .unwrap()
                .iter()
                .map(|n| n["node"].as_str().unwrap())
                .collect();
            if listed == nodes && v["missing_nodes"] == json!([]) {
                Ok(v)
            } else {
                Err(format!("expected nodes {nodes:?} and none missing: {v}"))
            }
        },
    )
    .await
}

#[tokio::test]
async fn in_a_cluster_status_and_sessions_list_every_nodes_endpoints_from_either_node() {
    let t = two(|_| {});
    let tok = &t.token.token;
    let mut alice = Raw::sign_in(t.a.addr, ALICE, "laptop").await;
    let alice_phone = Raw::sign_in(t.b.addr, ALICE, "phone").await;
    let mut bob = Raw::sign_in(t.b.addr, BOB, "desk").await;
    let carol = Raw::sign_in(t.a.addr, CAROL, "tablet").await;
    for n in [&t.a, &t.b] {
        wait_for_endpoints(n, ALICE, 2).await;
        wait_for_endpoints(n, BOB, 1).await;
        wait_for_endpoints(n, CAROL, 1).await;
    }
    // Alice's laptop (on A) calls Bob (on B).
    answered_call(&mut alice, &mut bob).await;
    let mut everyone = vec![
        alice.endpoint.clone(),
        alice_phone.endpoint.clone(),
        bob.endpoint.clone(),
        carol.endpoint.clone(),
    ];
    everyone.sort();

    for (ops, me) in [(t.a_ops, "node-a"), (t.b_ops, "node-b")] {
        let v = status_listing(ops, tok, &["node-a", "node-b"]).await;
        assert_eq!(v["node"], me, "{v}");
        let nodes = v["nodes"].as_array().unwrap();
        assert_eq!(nodes[0]["endpoints"], 2, "{v}");
        assert_eq!(nodes[1]["endpoints"], 2, "{v}");
        for n in nodes {
            assert_eq!(n["ready"], true, "{v}");
            assert_eq!(n["draining"], false, "{v}");
        }
        // The call's two legs (both on the caller's node, A, as it happens).
        let legs: u64 = nodes.iter().map(|n| n["calls"].as_u64().unwrap()).sum();
        assert_eq!(legs, 2, "{v}");

        let all = get_ok(ops, "/admin/sessions", tok).await;
        assert_eq!(all["missing_nodes"], json!([]), "{all}");
        assert!(all["next"].is_null(), "{all}");
        assert_eq!(endpoint_ids(&all), everyone, "{me}: {all}");
        for (raw, node, calls) in [
            (&alice, "node-a", 1),
            (&alice_phone, "node-b", 0),
            (&bob, "node-b", 1),
            (&carol, "node-a", 0),
        ] {
            let s = session(&all, &raw.endpoint);
            assert_eq!(s["node"], node, "{s}");
            assert_eq!(s["user"], raw.user.as_str(), "{s}");
            assert_eq!(s["remote_addr"], raw.local_addr().to_string(), "{s}");
            assert_eq!(s["calls"], calls, "{s}");
            assert_eq!(s["state"], "active", "{s}");
        }
        // Paged across the nodes, one at a time: each once, in order.
        let pages = all_pages(ops, "", tok, 1).await;
        assert_eq!(pages.concat(), everyone, "{me}: {pages:?}");
        // Filtered by a user whose devices are on both nodes, and paged.
        let pages = all_pages(ops, "user=sip:alice@example.com&", tok, 1).await;
        let mut want = vec![alice.endpoint.clone(), alice_phone.endpoint.clone()];
        want.sort();
        assert_eq!(pages.concat(), want, "{me}: {pages:?}");
        // One user's endpoints, with the node each is on.
        let v = get_ok(ops, "/admin/users/sip:alice@example.com", tok).await;
        let mut on: Vec<(String, String)> = v["endpoints"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| {
                (
                    e["endpoint"].as_str().unwrap().to_owned(),
                    e["node"].as_str().unwrap().to_owned(),
                )
            })
            .collect();
        on.sort();
        let mut want = vec![
            (alice.endpoint.clone(), "node-a".to_owned()),
            (alice_phone.endpoint.clone(), "node-b".to_owned()),
        ];
        want.sort();
        assert_eq!(on, want, "{v}");
    }
}

#[tokio::test]
async fn in_a_cluster_a_kick_on_one_node_ends_a_session_on_the_other() {
    let t = two(|_| {});
    let tok = &t.token.token;
    let mut alice = Raw::sign_in(t.a.addr, ALICE, "laptop").await;
    let mut bob = Raw::sign_in(t.b.addr, BOB, "desk").await;
    let mut bob_phone = Raw::sign_in(t.b.addr, BOB, "phone").await;
    for n in [&t.a, &t.b] {
        wait_for_endpoints(n, ALICE, 1).await;
        wait_for_endpoints(n, BOB, 2).await;
    }
    status_listing(t.a_ops, tok, &["node-a", "node-b"]).await;
    let (call, _) = answered_call(&mut alice, &mut bob).await;

    // Bob's desk, by its endpoint, from node A.
    let (status, v) = post(
        t.a_ops,
        "/admin/kick",
        tok,
        &json!({"endpoint": bob.endpoint, "reason": "Moved"}).to_string(),
    )
    .await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v, json!({"kicked": 1, "missing_nodes": []}));
    assert_eq!(kicked_reason(&mut bob).await, "Moved");
    bob.expect_closed().await;
    assert_eq!(
        alice.state(&call, CallState::Terminated).await,
        Some(Reason::new(200, "Terminated remotely"))
    );
    wait_for_endpoints(&t.a, BOB, 1).await;

    // Then every device of Bob's (the phone is left), from node A again.
    let (status, v) = post(
        t.a_ops,
        "/admin/kick",
        tok,
        &json!({"user": BOB}).to_string(),
    )
    .await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v, json!({"kicked": 1, "missing_nodes": []}));
    assert_eq!(
        kicked_reason(&mut bob_phone).await,
        "Signed out by an operator"
    );
    bob_phone.expect_closed().await;
    wait_for_endpoints(&t.a, BOB, 0).await;
    // Kicking him again from B finds nobody anywhere.
    let (status, v) = post(
        t.b_ops,
        "/admin/kick",
        tok,
        &json!({"user": BOB}).to_string(),
    )
    .await;
    assert_eq!(status, 404, "{v}");
    alice.ping().await;
}

/// A node that stops (gracefully: it says it leaves) is no longer listed by the survivor,
/// and is not named missing once it has left: the survivor asks only the nodes it knows.
#[tokio::test]
async fn a_node_that_has_stopped_leaves_the_survivors_status() {
    let t = two(|s| s.admin.cluster_timeout_ms = 500);
    let tok = t.token.token.clone();
    let a_ops = t.a_ops;
    let _alice = Raw::sign_in(t.a.addr, ALICE, "laptop").await;
    let _bob = Raw::sign_in(t.b.addr, BOB, "desk").await;
    wait_for_endpoints(&t.a, BOB, 1).await;
    status_listing(a_ops, &tok, &["node-a", "node-b"]).await;

    let Two { a, b, _nats, .. } = t;
    tokio::task::spawn_blocking(move || b.shutdown())
        .await
        .unwrap();
    let stopped = tokio::time::Instant::now();
    // Every answer meanwhile either still waits for B (named missing, after the cluster
    // timeout) or no longer knows it; soon, and well before the node timeout would have
    // declared it dead, the survivor lists only itself.
    let mut named_missing = 0;
    let v = poll(
        Duration::from_millis(NODE_TIMEOUT_MS) + EVENT_TIMEOUT,
        async || {
            let v = get_ok(a_ops, "/admin/status", &tok).await;
            let listed: Vec<&str> = v["nodes"]
                .as_array()
                .unwrap()
                .iter()
                .map(|n| n["node"].as_str().unwrap())
                .collect();
            assert_eq!(listed, vec!["node-a"], "B answered after it stopped: {v}");
            if v["missing_nodes"] == json!(["node-b"]) {
                named_missing += 1;
                return Err(format!("B still named missing: {v}"));
            }
            assert_eq!(v["missing_nodes"], json!([]), "{v}");
            Ok(v)
        },
    )
    .await;
    let took = stopped.elapsed();
    println!("B named missing in {named_missing} answers; gone from the status after {took:?}");
    assert!(
        took < Duration::from_millis(NODE_TIMEOUT_MS),
        "B, which said it left, was forgotten only after {took:?} (the node timeout is {NODE_TIMEOUT_MS} ms)"
    );
    assert_eq!(v["nodes"][0]["endpoints"], 1, "{v}");
    // Its sessions are gone from the list too.
    let s = get_ok(a_ops, "/admin/sessions", &tok).await;
    assert_eq!(s["missing_nodes"], json!([]), "{s}");
    assert_eq!(endpoint_ids(&s).len(), 1, "{s}");
    a.shutdown();
}

/// A TCP proxy to `upstream`, on a thread of its own, that can be frozen: while frozen
/// nothing passes either way and the connections stay open, so a node whose NATS connection
/// goes through it falls silent to the cluster without leaving it (as a hung node or a cut
/// network would).
struct FreezableProxy {
    addr: SocketAddr,
    frozen: tokio::sync::watch::Sender<bool>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl FreezableProxy {
    fn start(upstream: SocketAddr) -> FreezableProxy {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let addr = listener.local_addr().unwrap();
        let (frozen, watch) = tokio::sync::watch::channel(false);
        let (stop, mut stopped) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                let listener = tokio::net::TcpListener::from_std(listener).unwrap();
                loop {
                    let client = tokio::select! {
                        _ = &mut stopped => return,
                        accepted = listener.accept() => match accepted {
                            Ok((c, _)) => c,
                            Err(_) => continue,
                        },
                    };
                    let Ok(server) = tokio::net::TcpStream::connect(upstream).await else {
                        continue;
                    };
                    let (cr, cw) = client.into_split();
                    let (sr, sw) = server.into_split();
                    tokio::spawn(Self::pump(cr, sw, watch.clone()));
                    tokio::spawn(Self::pump(sr, cw, watch.clone()));
                }
            });
        });
        FreezableProxy {
            addr,
            frozen,
            stop: Some(stop),
            thread: Some(thread),
        }
    }

    /// Copies `from` to `to`, holding what it read while frozen.
    async fn pump(
        mut from: tokio::net::tcp::OwnedReadHalf,
        mut to: tokio::net::tcp::OwnedWriteHalf,
        mut frozen: tokio::sync::watch::Receiver<bool>,
    ) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut buf = vec![0u8; 16 * 1024];
        loop {
            if frozen.wait_for(|f| !*f).await.is_err() {
                return;
            }
            let n = match from.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            };
            if frozen.wait_for(|f| !*f).await.is_err() {
                return;
            }
            if to.write_all(&buf[..n]).await.is_err() {
                return;
            }
        }
    }

    fn set_frozen(&self, frozen: bool) {
        self.frozen.send_replace(frozen);
    }
}

impl Drop for FreezableProxy {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// A node that falls silent without leaving (its NATS connection frozen) is named in
/// `missing_nodes` by the survivor's answers, each given at `admin.cluster_timeout_ms`, until
/// the node timeout declares it dead; from then on the survivor neither lists nor misses it.
#[tokio::test]
async fn a_silent_node_is_named_missing_until_it_is_declared_dead() {
    let nats = NatsServer::start();
    let token = AdminToken::new();
    let proxy = FreezableProxy::start(SocketAddr::from(([127, 0, 0, 1], nats.port)));
    let cluster_timeout = Duration::from_millis(300);
    let a = start_cluster_node(&nats, "node-a", |s| {
        token.configure(s);
        s.admin.cluster_timeout_ms = cluster_timeout.as_millis() as u64;
    });
    let mut s = cluster_settings_on(format!("nats://{}", proxy.addr), "node-b");
    token.configure(&mut s);
    let b = confab_cluster::spawn_node(s).expect("node B starts behind the proxy");
    let a_ops = a.metrics_addr.unwrap();
    let tok = token.token.as_str();
    let alice = Raw::sign_in(a.addr, ALICE, "laptop").await;
    let _bob = Raw::sign_in(b.addr, BOB, "desk").await;
    wait_for_endpoints(&a, BOB, 1).await;
    status_listing(a_ops, tok, &["node-a", "node-b"]).await;

    proxy.set_frozen(true);
    let frozen_at = tokio::time::Instant::now();
    // Asked and silent: named missing, and the answer comes at the cluster timeout.
    let asked = tokio::time::Instant::now();
    let v = get_ok(a_ops, "/admin/status", tok).await;
    let waited = asked.elapsed();
    assert_eq!(v["missing_nodes"], json!(["node-b"]), "{v}");
    assert_eq!(v["nodes"].as_array().unwrap().len(), 1, "{v}");
    assert_eq!(v["nodes"][0]["node"], "node-a", "{v}");
    assert!(
        waited >= cluster_timeout,
        "named missing after {waited:?}, before the cluster timeout"
    );
    // The same for sessions (A's alone are listed) and a kick (which finds nobody here).
    let sessions = get_ok(a_ops, "/admin/sessions", tok).await;
    assert_eq!(sessions["missing_nodes"], json!(["node-b"]), "{sessions}");
    assert_eq!(endpoint_ids(&sessions), vec![alice.endpoint.clone()]);
    let (status, v) = post(a_ops, "/admin/kick", tok, &json!({"user": BOB}).to_string()).await;
    assert_eq!(status, 404, "{v}");
    assert_eq!(v["missing_nodes"], json!(["node-b"]), "{v}");

    // Once the node timeout has declared B dead, A no longer asks it.
    let v = status_listing(a_ops, tok, &["node-a"]).await;
    let gone = frozen_at.elapsed();
    println!("B silent: named missing, then forgotten {gone:?} after it fell silent");
    assert!(
        gone >= Duration::from_millis(NODE_TIMEOUT_MS) / 2,
        "B forgotten after {gone:?}, long before the node timeout ({NODE_TIMEOUT_MS} ms): {v}"
    );
    let sessions = get_ok(a_ops, "/admin/sessions", tok).await;
    assert_eq!(sessions["missing_nodes"], json!([]), "{sessions}");
    assert_eq!(endpoint_ids(&sessions), vec![alice.endpoint.clone()]);

    // B heard again: it rejoins, and is listed again.
    proxy.set_frozen(false);
    status_listing(a_ops, tok, &["node-a", "node-b"]).await;
    tokio::task::spawn_blocking(move || {
        b.shutdown();
        a.shutdown();
    })
    .await
    .unwrap();
    drop(proxy);
}

// ---------------------------------------------------------------------------------------------
// The CLI.

/// The built `confab` binary: `CONFAB_CLI`, else `confab` next to this test's `deps/`
/// directory (`target/debug/confab`). `cargo test -p confab-tests` does not build it: build
/// it first with `cargo build -p confab-bin --bin confab`.
fn confab_cli() -> std::path::PathBuf {
    let path = match std::env::var_os("CONFAB_CLI") {
        Some(p) => std::path::PathBuf::from(p),
        None => {
            let exe = std::env::current_exe().unwrap();
            let profile = exe
                .parent()
                .and_then(|deps| deps.parent())
                .expect("the test runs from target/<profile>/deps");
            profile.join(format!("confab{}", std::env::consts::EXE_SUFFIX))
        }
    };
    assert!(
        path.is_file(),
        "no confab CLI at {}: run `cargo build -p confab-bin --bin confab` first (or set CONFAB_CLI)",
        path.display()
    );
    path
}

struct Done {
    ok: bool,
    stdout: String,
    stderr: String,
}

/// `confab admin --admin OPS --admin-token-file FILE ARGS...`, to its end.
async fn confab_admin(ops: SocketAddr, token_file: &std::path::Path, args: &[&str]) -> Done {
    let mut cmd = tokio::process::Command::new(confab_cli());
    for var in [
        "CONFAB_ADMIN",
        "CONFAB_ADMIN_TOKEN_FILE",
        "CONFAB_SERVER",
        "CONFAB_USER",
        "CONFAB_TOKEN",
        "CONFAB_TOKEN_FILE",
        "NO_COLOR",
        "RUST_LOG",
    ] {
        cmd.env_remove(var);
    }
    cmd.arg("admin")
        .arg("--admin")
        .arg(ops.to_string())
        .arg("--admin-token-file")
        .arg(token_file)
        .args(args)
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true);
    let out = tokio::time::timeout(Duration::from_secs(15), cmd.output())
        .await
        .expect("the CLI finished in time")
        .unwrap();
    Done {
        ok: out.status.success(),
        stdout: String::from_utf8(out.stdout).unwrap(),
        stderr: String::from_utf8(out.stderr).unwrap(),
    }
}

#[tokio::test]
async fn the_cli_shows_status_and_sessions_and_kicks_an_endpoint() {
    let (node, ops, token) = admin_node(|_| {});
    let file = token.file.path();
    let mut alice = Raw::sign_in(node.addr, ALICE, "laptop").await;
    let bob = Raw::sign_in(node.addr, BOB, "desk").await;

    // status --json: the API's JSON, one line.
    let done = confab_admin(ops, file, &["--json", "status"]).await;
    assert!(
        done.ok,
        "status --json failed: {}{}",
        done.stdout, done.stderr
    );
    let v: Value = serde_json::from_str(done.stdout.trim())
        .unwrap_or_else(|e| panic!("status --json is not JSON ({e}): {}", done.stdout));
    assert_eq!(v["node"], node.node_id.as_str(), "{v}");
    assert_eq!(v["nodes"][0]["endpoints"], 2, "{v}");
    assert_eq!(v["nodes"][0]["ready"], true, "{v}");
    // status as text.
    let done = confab_admin(ops, file, &["status"]).await;
    assert!(done.ok, "status failed: {}", done.stderr);
    assert!(
        done.stdout.contains(&node.node_id) && done.stdout.contains("endpoints 2"),
        "{}",
        done.stdout
    );

    // sessions: a line per session, with its endpoint, user and device.
    let done = confab_admin(ops, file, &["sessions"]).await;
    assert!(done.ok, "sessions failed: {}", done.stderr);
    let lines: Vec<&str> = done.stdout.lines().collect();
    assert_eq!(lines.len(), 2, "{}", done.stdout);
    for (raw, device) in [(&alice, "laptop"), (&bob, "desk")] {
        assert!(
            lines.iter().any(|l| l.contains(&raw.endpoint)
                && l.contains(&raw.user)
                && l.contains(device)
                && l.contains(&raw.local_addr().to_string())),
            "no line for {} in {}",
            raw.endpoint,
            done.stdout
        );
    }
    // sessions --user filters; --limit 1 says where the next page starts.
    let done = confab_admin(ops, file, &["sessions", "--user", BOB]).await;
    assert!(done.ok, "sessions --user failed: {}", done.stderr);
    let lines: Vec<&str> = done.stdout.lines().collect();
    assert_eq!(lines.len(), 1, "only Bob's: {}", done.stdout);
    assert!(lines[0].contains(&bob.endpoint), "{}", done.stdout);
    let done = confab_admin(ops, file, &["--json", "sessions", "--limit", "1", "--all"]).await;
    assert!(done.ok, "sessions --all failed: {}", done.stderr);
    let pages: Vec<Value> = done
        .stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let listed: Vec<String> = pages.iter().flat_map(endpoint_ids).collect();
    let mut want = vec![alice.endpoint.clone(), bob.endpoint.clone()];
    want.sort();
    assert_eq!(listed, want, "pages of one: {}", done.stdout);

    // kick --endpoint: the client hears the reason; the CLI says how many.
    let done = confab_admin(
        ops,
        file,
        &[
            "kick",
            "--endpoint",
            &alice.endpoint,
            "--reason",
            "CLI says bye",
        ],
    )
    .await;
    assert!(done.ok, "kick failed: {}{}", done.stdout, done.stderr);
    assert_eq!(done.stdout.trim(), "kicked 1");
    assert_eq!(kicked_reason(&mut alice).await, "CLI says bye");
    alice.expect_closed().await;
    // Again: nobody to kick, a failure with the API's word for it.
    let done = confab_admin(ops, file, &["kick", "--endpoint", &alice.endpoint]).await;
    assert!(!done.ok, "a kick of nobody succeeded: {}", done.stdout);
    assert!(done.stderr.contains("404"), "{}", done.stderr);

    // A wrong token: non-zero, and it says 401.
    let mut wrong = tempfile::NamedTempFile::new().unwrap();
    {
        use std::io::Write;
        writeln!(wrong, "not-the-token").unwrap();
    }
    for args in [
        &["status"][..],
        &["sessions"],
        &["kick", "--endpoint", &bob.endpoint],
    ] {
        let done = confab_admin(ops, wrong.path(), args).await;
        assert!(
            !done.ok,
            "{args:?} with a wrong token succeeded: {}",
            done.stdout
        );
        assert!(
            done.stderr.contains("401"),
            "{args:?}: no 401 in {:?}",
            done.stderr
        );
    }
    assert_eq!(node.endpoints_of(BOB), vec![bob.endpoint.clone()]);
    node.shutdown();
}

#[tokio::test]
async fn a_reload_shortens_the_toast_of_the_next_call_not_the_ringing_one() {
    let slow = |s: &mut Settings| {
        s.fork.toast_timeout_ms = 600_000;
        s.fork.auto_accept_grace_ms = 600_000;
    };
    let node = start_node(slow);
    let mut next = test_settings();
    slow(&mut next);
    next.fork.toast_timeout_ms = 100;
    node.set_reloader(confab_actors::reload::Reloader {
        load: Box::new(move || Ok(next.clone())),
        log_level: Box::new(|_| Ok(())),
    });
    let mut alice = Raw::sign_in(node.addr, ALICE, "laptop").await;
    let mut phone = Raw::sign_in(node.addr, BOB, "phone").await;
    let mut desk = Raw::sign_in(node.addr, BOB, "desk").await;
    request_ok(
        &mut phone,
        ClientMsg::DeviceState {
            rid: None,
            activity: Activity::Active,
            idle_ms: None,
        },
    )
    .await;

    alice.establish(BOB, None).await;
    let (ringing_fork, _) = phone.incoming().await;
    desk.incoming().await;

    let report = node.reload().unwrap();
    assert_eq!(report.applied, ["fork.toast_timeout_ms"], "{report:?}");

    alice.establish(BOB, None).await;
    let (new_fork, _) = phone.incoming().await;
    desk.incoming().await;
    let (asked, _) = phone
        .recv_until(|m| matches!(m, ServerMsg::AutoAcceptNeeded { .. }))
        .await;
    assert_eq!(
        asked,
        ServerMsg::AutoAcceptNeeded {
            call: new_fork.clone()
        },
        "the new call's 100 ms toast ran out; the first call ({ringing_fork}) keeps its 10 minutes"
    );
    alice.request(ClientMsg::Bye { rid: None }).await;
}
