//! Browsers as devices, for real: the JavaScript client library's tests (`web/test/`) against
//! a real node over real WebSockets, and the web client in Debian's headless Chromium (driven
//! by `web/test/browser.mjs` through playwright-core), with Bob on two tabs and Alice, a Rust
//! client over TCP, calling him: a click on one tab, then the toast timeout choosing the tab
//! that had input last. Screenshots of each step go to `target/browser-screenshots/`.
//!
//! Needs `node`, `npm ci` in `web/` and `/usr/bin/chromium` (or `CHROMIUM`): `scripts/test`
//! installs them.
#![allow(clippy::unwrap_used, clippy::print_stdout)]

use confab_actors::settings::WebSocket;
use confab_protocol::*;
use confab_tests::*;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

const ALICE: &str = "sip:alice@example.com";
const BOB: &str = "sip:bob@example.com";
/// Longest wait for one step of the browser script (it waits up to 15 s per thing it sees).
const STEP: Duration = Duration::from_secs(60);

fn web_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../web")
}

/// Fails with what to do when a tool the test needs is missing.
fn require_tools() -> PathBuf {
    let web = web_dir();
    assert!(
        web.join("node_modules/playwright-core").is_dir(),
        "web/node_modules is missing: run `npm ci` in web/ (scripts/test does)"
    );
    let chromium = std::env::var_os("CHROMIUM")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/usr/bin/chromium"));
    assert!(
        chromium.exists(),
        "{} is missing: apt-get install chromium (scripts/test does)",
        chromium.display()
    );
    chromium
}

/// A node serving the web client from `web/` beside its WebSocket path.
fn web_node(toast_ms: u64) -> confab_actors::RunningNode {
    let web = web_dir().to_str().unwrap().to_owned();
    start_node(move |s| {
        s.server.websocket = Some(WebSocket {
            static_dir: web,
            ..WebSocket::new("127.0.0.1:0".parse().unwrap())
        });
        s.fork.toast_timeout_ms = toast_ms;
        s.fork.auto_accept_grace_ms = 5_000;
    })
}

#[tokio::test]
async fn the_javascript_client_passes_its_tests_against_a_real_node() {
    require_tools();
    let node = web_node(60_000);
    let url = format!("ws://{}/confab", node.websocket_addr.unwrap());
    let out = tokio::process::Command::new("node")
        .args(["--test", "test/client.test.js", "test/live.test.js"])
        .current_dir(web_dir())
        .env("CONFAB_WS_URL", &url)
        .env("CONFAB_TOKEN_ALICE", token(ALICE))
        .env("CONFAB_TOKEN_BOB", token(BOB))
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(STEP, out)
        .await
        .expect("node --test finished in time")
        .expect("node runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    println!("{stdout}");
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Every test ran, the live ones included: none skipped.
    assert!(stdout.contains("# fail 0"), "{stdout}");
    assert!(stdout.contains("# skipped 0"), "{stdout}");
    assert!(stdout.contains("# pass 9"), "{stdout}");
}

/// The next line of the browser script, which must start with `want`.
async fn expect_step(
    lines: &mut tokio::io::Lines<BufReader<tokio::process::ChildStdout>>,
    want: &str,
) -> String {
    let line = tokio::time::timeout(STEP, lines.next_line())
        .await
        .unwrap_or_else(|_| panic!("the browser script did not reach \"{want}\" in time"))
        .unwrap()
        .unwrap_or_else(|| panic!("the browser script ended before \"{want}\" (see its stderr)"));
    assert!(
        line.starts_with(want),
        "expected \"{want}\", got \"{line}\""
    );
    line
}

/// Waits for `call_established` of `call`; returns the endpoint that answered.
async fn answered_by(alice: &mut Raw, call: &str) -> String {
    let (m, _) = alice
        .recv_until_within(
            STEP,
            |m| matches!(m, ServerMsg::CallEstablished { call: c, .. } if c == call),
        )
        .await;
    match m {
        ServerMsg::CallEstablished { remote, .. } => remote.endpoint,
        _ => unreachable!(),
    }
}

/// Waits until Alice sees Bob's availability as `want`.
async fn bob_becomes(alice: &mut Raw, want: Availability) {
    alice
        .recv_until_within(STEP, |m| {
            matches!(m, ServerMsg::Presence { user, availability, .. }
                if user == BOB && *availability == want)
        })
        .await;
}

#[tokio::test]
async fn bob_on_two_browser_tabs_answers_by_click_then_by_the_toast_timeout() {
    let chromium = require_tools();
    let node = web_node(5_000);
    let mut alice = Raw::sign_in(node.addr, ALICE, "laptop").await;
    publish(&mut alice, Activity::Active, None).await;
    let shots = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/browser-screenshots");
    let _ = std::fs::remove_dir_all(&shots);
    let mut browser = tokio::process::Command::new("node")
        .arg("test/browser.mjs")
        .current_dir(web_dir())
        .env(
            "CONFAB_PAGE_URL",
            format!("http://{}/", node.websocket_addr.unwrap()),
        )
        .env("CONFAB_TOKEN_BOB", token(BOB))
        .env("CONFAB_SCREENSHOTS", &shots)
        .env("CHROMIUM", &chromium)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("node starts the browser script");
    let mut to_browser = browser.stdin.take().unwrap();
    let mut lines = BufReader::new(browser.stdout.take().unwrap()).lines();

    let ready = expect_step(&mut lines, "ready").await;
    let tabs: Vec<&str> = ready.split_whitespace().skip(1).collect();
    let [tab1, tab2] = tabs[..] else {
        panic!("ready without the two endpoints: {ready}")
    };
    wait_for_endpoints(&node, BOB, 2).await;

    // A click: the toast on both tabs, Accept on tab 1.
    let (call, _) = alice.establish(BOB, Some("lunch?")).await;
    to_browser.write_all(b"called\n").await.unwrap();
    expect_step(&mut lines, "accepted").await;
    assert_eq!(answered_by(&mut alice, &call).await, tab1);

    // The chat: a message delivered to tab 1 (its ack), Bob's typing, his reply.
    let rid = send_request(
        &mut alice,
        ClientMsg::Message {
            rid: None,
            call: call.clone(),
            content_type: "text/plain".into(),
            body: Body::Text("are you free at noon?".into()),
        },
    )
    .await;
    to_browser.write_all(b"sent\n").await.unwrap();
    let (delivered, _) = alice.recv_until_within(STEP, |m| reply_rid(m) == rid).await;
    assert!(
        matches!(delivered, ServerMsg::MessageDelivered { .. }),
        "{delivered:?}"
    );
    alice
        .recv_until_within(STEP, |m| {
            matches!(m, ServerMsg::RemoteComposing { active: true, .. })
        })
        .await;
    let (reply, _) = alice
        .recv_until_within(STEP, |m| matches!(m, ServerMsg::MessageReceived { .. }))
        .await;
    let ServerMsg::MessageReceived { msg, body, .. } = reply else {
        unreachable!()
    };
    assert_eq!(body, Body::Text("yes, see you".into()));
    alice
        .send(&ClientMsg::MessageAck {
            call: call.clone(),
            msg,
        })
        .await;
    expect_step(&mut lines, "replied").await;
    let hung_up = alice
        .request(ClientMsg::CallTerminate {
            rid: None,
            call: call.clone(),
        })
        .await;
    assert!(matches!(hung_up, ServerMsg::Ok { .. }), "{hung_up:?}");
    to_browser.write_all(b"ended\n").await.unwrap();

    // The timeout: tab 2 had input last, so it is asked to accept.
    expect_step(&mut lines, "input-on-2").await;
    let (call, _) = alice.establish(BOB, Some("still there?")).await;
    to_browser.write_all(b"called\n").await.unwrap();
    expect_step(&mut lines, "timeout-picked-2").await;
    assert_eq!(answered_by(&mut alice, &call).await, tab2);

    // Where Bob is: his two tabs hidden make him away for Alice; a third tab of his, left
    // alone past its idle time, makes him inactive (the most active of the three).
    request_ok(
        &mut alice,
        ClientMsg::Subscribe {
            rid: None,
            users: vec![BOB.into()],
        },
    )
    .await;
    to_browser.write_all(b"hide\n").await.unwrap();
    expect_step(&mut lines, "hidden").await;
    bob_becomes(&mut alice, Availability::Away).await;
    to_browser.write_all(b"idle\n").await.unwrap();
    expect_step(&mut lines, "inactive").await;
    bob_becomes(&mut alice, Availability::Inactive).await;

    let status = tokio::time::timeout(STEP, browser.wait())
        .await
        .expect("the browser script ends")
        .unwrap();
    assert!(status.success(), "the browser script failed: {status}");
    let saved = std::fs::read_dir(&shots).unwrap().count();
    assert!(
        saved >= 13,
        "only {saved} screenshots in {}",
        shots.display()
    );
}
