//! `confab-bench` as a process against a node started in the test: every scenario runs briefly,
//! prints one JSON object with the common figures and its own, and counts what went wrong. The
//! figures' size is not checked here (speed lives in BENCHMARKS.md), only that the load was
//! real: work was done, nothing failed, and the report is complete.
#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;
use std::time::Duration;

use confab_tests::{SECRET, start_node};
use serde_json::Value;
use tokio::process::Command;

/// Upper bound on a whole bench run; a safety net, never a pacing device.
const WAIT: Duration = Duration::from_secs(60);

/// Runs `confab-bench --server ADDR --secret SECRET --json ARGS...` to its end and returns its
/// JSON report.
async fn bench(addr: SocketAddr, args: &[&str]) -> Value {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_confab-bench"));
    cmd.env_remove("CONFAB_AUTH_JWT_SECRET")
        .arg("--server")
        .arg(addr.to_string())
        .arg("--secret")
        .arg(SECRET)
        .arg("--json")
        .args(args)
        .kill_on_drop(true);
    let out = tokio::time::timeout(WAIT, cmd.output())
        .await
        .expect("the bench finished in time")
        .unwrap();
    let stdout = String::from_utf8(out.stdout).unwrap();
    assert!(
        out.status.success(),
        "confab-bench {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines.len(), 1, "one JSON object: {stdout}");
    serde_json::from_str(lines[0]).unwrap()
}

/// 200 endpoints signed in from two source addresses against the server at `addr`, whose memory
/// is read from process `pid`.
async fn small_idle(addr: SocketAddr, pid: &str) -> Value {
    bench(
        addr,
        &[
            "idle",
            "--endpoints",
            "200",
            "--concurrency",
            "32",
            "--sources",
            "2",
            "--hold",
            "0.1",
            "--node-pid",
            pid,
        ],
    )
    .await
}

fn num(report: &Value, key: &str) -> f64 {
    report[key]
        .as_f64()
        .unwrap_or_else(|| panic!("{key} is a number in {report}"))
}

/// The figures every scenario reports, and that the latency percentiles are ordered.
fn assert_common(report: &Value, scenario: &str) {
    assert_eq!(report["scenario"], scenario);
    let (p50, p99, p999) = (
        num(report, "p50_ms"),
        num(report, "p99_ms"),
        num(report, "p999_ms"),
    );
    assert!(p50 > 0.0 && p50 <= p99 && p99 <= p999, "{report}");
    assert!(num(report, "throughput_per_s") > 0.0, "{report}");
}

#[tokio::test]
async fn messages_are_delivered_and_acked_within_the_window() {
    let node = start_node(|_| {});
    let r = bench(
        node.addr,
        &[
            "messages",
            "--pairs",
            "4",
            "--window",
            "8",
            "--size",
            "64",
            "--duration",
            "0.5",
        ],
    )
    .await;
    assert_common(&r, "messages");
    assert!(num(&r, "delivered") > 0.0, "{r}");
    assert_eq!(num(&r, "failed"), 0.0, "{r}");
    assert_eq!(num(&r, "unanswered"), 0.0, "{r}");
    assert_eq!(r["cross_node"], false);
    assert_eq!(num(&r, "samples"), num(&r, "delivered"));
}

#[tokio::test]
async fn paced_messages_keep_to_the_offered_rate() {
    let node = start_node(|_| {});
    let r = bench(
        node.addr,
        &[
            "messages",
            "--pairs",
            "2",
            "--rate",
            "400",
            "--duration",
            "0.5",
        ],
    )
    .await;
    assert_common(&r, "messages");
    assert_eq!(num(&r, "offered_rate"), 400.0);
    // Paced, not as fast as the acks allow: at most the offered rate (plus the first message).
    assert!(num(&r, "throughput_per_s") <= 410.0, "{r}");
    assert_eq!(num(&r, "failed"), 0.0, "{r}");
}

#[tokio::test]
async fn forked_calls_are_established_by_a_click() {
    // Clicks only: no toast timeout (300 ms in the test settings) on a loaded machine.
    let node = start_node(|s| s.fork.toast_timeout_ms = 60_000);
    small_calls(node.addr).await;
}

/// Three callers each calling a user on three devices for half a second, against the server
/// at `addr`: calls were established, none failed.
async fn small_calls(addr: SocketAddr) {
    let args = [
        "calls",
        "--callers",
        "3",
        "--devices",
        "3",
        "--duration",
        "0.5",
    ];
    let r = bench(addr, &args).await;
    assert_common(&r, "calls");
    assert!(num(&r, "established") > 0.0, "{r}");
    assert_eq!(num(&r, "failed"), 0.0, "{r}");
    assert_eq!(num(&r, "devices_per_user"), 3.0);
}

#[tokio::test]
async fn forked_calls_are_established_by_the_timeout_when_nobody_clicks() {
    // The test node's toast timeout is 300 ms. A generous grace keeps a loaded machine from
    // running out the grace of both devices before the bench's client accepts (which would
    // end the call 480 and count it failed).
    let node = start_node(|s| s.fork.auto_accept_grace_ms = 10_000);
    let r = bench(
        node.addr,
        &[
            "calls",
            "--callers",
            "2",
            "--devices",
            "2",
            "--accept",
            "timeout",
            "--duration",
            "1",
        ],
    )
    .await;
    assert_common(&r, "calls");
    assert!(num(&r, "established") > 0.0, "{r}");
    assert_eq!(num(&r, "failed"), 0.0, "{r}");
    // Nobody clicked: no call was set up before the toast timeout.
    assert!(num(&r, "p50_ms") >= 300.0, "{r}");
}

#[tokio::test]
async fn idle_endpoints_sign_in_and_the_nodes_memory_is_read() {
    let node = start_node(|_| {});
    // The node runs in this test's process, so its memory is this process's.
    let pid = std::process::id().to_string();
    let r = small_idle(node.addr, &pid).await;
    assert_common(&r, "idle");
    assert_eq!(num(&r, "endpoints"), 200.0, "{r}");
    assert_eq!(num(&r, "failed"), 0.0, "{r}");
    assert!(num(&r, "signin_per_s") > 0.0, "{r}");
    assert!(num(&r, "node_rss_after_kib") > 0.0, "{r}");
    assert!(r["bytes_per_endpoint"].is_number(), "{r}");
}

#[tokio::test]
async fn presence_changes_reach_every_watcher() {
    let node = start_node(|_| {});
    let r = bench(
        node.addr,
        &["presence", "--watchers", "5", "--changes", "6"],
    )
    .await;
    assert_common(&r, "presence");
    assert_eq!(
        num(&r, "samples"),
        30.0,
        "every watcher saw every change: {r}"
    );
    assert_eq!(num(&r, "missed"), 0.0, "{r}");
}

#[tokio::test]
async fn a_wrong_secret_fails_loudly() {
    let node = start_node(|_| {});
    let out = Command::new(env!("CARGO_BIN_EXE_confab-bench"))
        .args(["--server", &node.addr.to_string(), "--secret", "not-it"])
        .args(["--json", "presence", "--watchers", "1", "--changes", "1"])
        .output()
        .await
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("refused"), "{stderr}");
}

/// Starts `confab-bench bare-server` on an ephemeral port with `extra` arguments; returns the
/// process (killed when dropped) and its address.
async fn start_bare_server(extra: &[&str]) -> (tokio::process::Child, SocketAddr) {
    use tokio::io::AsyncBufReadExt;
    let mut server = Command::new(env!("CARGO_BIN_EXE_confab-bench"))
        .args(["bare-server", "--listen", "127.0.0.1:0", "--workers", "2"])
        .args(extra)
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = tokio::io::BufReader::new(server.stdout.take().unwrap()).lines();
    let first = tokio::time::timeout(WAIT, lines.next_line())
        .await
        .expect("the bare server printed its address in time")
        .unwrap()
        .expect("an address line");
    (server, first.parse().unwrap())
}

/// The bare server (the yardstick for sign-ins in BENCHMARKS.md) answers every hello of `idle`
/// with a welcome and holds the connections, so the scenario runs against it unchanged, memory
/// reading included.
#[tokio::test]
async fn idle_runs_against_the_bare_server() {
    let (server, addr) = start_bare_server(&[]).await;
    let pid = server.id().unwrap().to_string();
    let r = small_idle(addr, &pid).await;
    assert_common(&r, "idle");
    assert_eq!(num(&r, "endpoints"), 200.0, "{r}");
    assert_eq!(num(&r, "failed"), 0.0, "{r}");
    assert!(num(&r, "node_rss_after_kib") > 0.0, "{r}");
}

/// The bare server with `--calls` (the yardstick for calls) runs the `calls` scenario.
#[tokio::test]
async fn calls_run_against_the_bare_server() {
    let (_server, addr) = start_bare_server(&["--calls"]).await;
    small_calls(addr).await;
}

/// The bare server with `--calls` also routes the `messages` scenario (the yardstick for the
/// message rate and its p99): every message delivered and acked, none left unanswered.
#[tokio::test]
async fn messages_run_against_the_bare_server() {
    let (_server, addr) = start_bare_server(&["--calls"]).await;
    let args = [
        "messages",
        "--pairs",
        "4",
        "--window",
        "8",
        "--duration",
        "0.5",
    ];
    let r = bench(addr, &args).await;
    assert_common(&r, "messages");
    assert!(num(&r, "delivered") > 0.0, "{r}");
    assert_eq!(num(&r, "failed"), 0.0, "{r}");
    assert_eq!(num(&r, "unanswered"), 0.0, "{r}");
}

/// A yardstick is fair only if the clients see the same thing: for one forked call (a caller,
/// a callee on two devices, the first accepting, then the caller hanging up), each client gets
/// the same frames from the bare server as from the node, in the same order.
#[tokio::test]
async fn the_bare_call_server_sends_what_the_node_sends_for_a_forked_call() {
    // The device clicks: a toast timeout (300 ms in the test settings) that a loaded machine
    // lets pass before the click would add the node's auto-accept frames, which the bare
    // router never sends.
    let node = start_node(|s| s.fork.toast_timeout_ms = 60_000);
    let from_node = one_forked_call(node.addr).await;
    let (_server, addr) = start_bare_server(&["--calls"]).await;
    let from_bare = one_forked_call(addr).await;
    assert_eq!(from_bare, from_node);
}

/// What the caller, the accepting device and the other device receive for one forked call,
/// each frame reduced to its type (and, for `call_state`, its states and reason).
async fn one_forked_call(addr: SocketAddr) -> [Vec<String>; 3] {
    use confab_protocol::{CallState, ClientMsg, ServerMsg};
    use confab_tests::{Raw, offer};
    let callee = "sip:callee@bench.invalid";
    let mut first = Raw::sign_in(addr, callee, "dev0").await;
    let mut second = Raw::sign_in(addr, callee, "dev1").await;
    let mut caller = Raw::sign_in(addr, "sip:caller@bench.invalid", "desk").await;
    let terminated = |m: &ServerMsg| {
        matches!(
            m,
            ServerMsg::CallState {
                state: CallState::Terminated,
                ..
            }
        )
    };
    let rid = caller.rid();
    caller
        .send(&ClientMsg::CallEstablish {
            rid,
            to: callee.into(),
            conversation: None,
            toast: None,
            sdp: offer(),
        })
        .await;
    let (incoming, _) = first
        .recv_until(|m| matches!(m, ServerMsg::CallIncoming { .. }))
        .await;
    let ServerMsg::CallIncoming { call: leg, .. } = &incoming else {
        unreachable!()
    };
    let rid_accept = first.rid();
    first
        .send(&ClientMsg::CallAccept {
            rid: rid_accept,
            call: leg.clone(),
            sdp: confab_tests::answer(),
        })
        .await;
    let (established, mut seen_caller) = caller
        .recv_until(|m| matches!(m, ServerMsg::CallEstablished { .. }))
        .await;
    let ServerMsg::CallEstablished { call, .. } = &established else {
        unreachable!()
    };
    let rid_terminate = caller.rid();
    caller
        .send(&ClientMsg::CallTerminate {
            rid: rid_terminate,
            call: call.clone(),
        })
        .await;
    seen_caller.push(established.clone());
    let (end, more) = caller.recv_until(terminated).await;
    seen_caller.extend(more);
    seen_caller.push(end);
    let (end, mut seen_first) = first.recv_until(terminated).await;
    seen_first.insert(0, incoming.clone());
    seen_first.push(end);
    let (end, mut seen_second) = second.recv_until(terminated).await;
    seen_second.push(end);
    [seen_caller, seen_first, seen_second].map(|frames| frames.iter().map(describe).collect())
}

/// A frame's type, and for `call_state` its direction, states and reason.
fn describe(m: &confab_protocol::ServerMsg) -> String {
    use confab_protocol::ServerMsg;
    match m {
        ServerMsg::CallState {
            direction,
            state,
            previous,
            reason,
            ..
        } => format!("call_state {direction:?} {previous:?}->{state:?} {reason:?}"),
        other => serde_json::to_value(other).unwrap()["type"]
            .as_str()
            .unwrap_or("?")
            .to_owned(),
    }
}

/// `--callee-server`: the callers on node A, the called users' devices on node B of a cluster
/// (a real nats-server), so every message and every fork crosses nodes. Both scenarios work
/// there and say so (`cross_node`).
#[tokio::test]
async fn messages_and_forked_calls_cross_nodes_with_callee_server() {
    let nats = confab_tests::NatsServer::start();
    let clicks_only = |s: &mut confab_actors::Settings| s.fork.toast_timeout_ms = 60_000;
    let a = confab_tests::start_cluster_node(&nats, "node-a", clicks_only);
    let b = confab_tests::start_cluster_node(&nats, "node-b", clicks_only);
    let callee = b.addr.to_string();
    let r = bench(
        a.addr,
        &[
            "calls",
            "--callers",
            "3",
            "--devices",
            "3",
            "--duration",
            "0.5",
            "--callee-server",
            &callee,
        ],
    )
    .await;
    assert_common(&r, "calls");
    assert!(num(&r, "established") > 0.0, "{r}");
    assert_eq!(num(&r, "failed"), 0.0, "{r}");
    assert_eq!(r["cross_node"], Value::Bool(true), "{r}");
    let r = bench(
        a.addr,
        &[
            "messages",
            "--pairs",
            "3",
            "--duration",
            "0.5",
            "--callee-server",
            &callee,
        ],
    )
    .await;
    assert_common(&r, "messages");
    assert!(num(&r, "delivered") > 0.0, "{r}");
    assert_eq!(r["cross_node"], Value::Bool(true), "{r}");
    drop((a, b, nats));
}

/// `--ca`: the same scenarios over TLS to a node with `[tls]`, with resumed and with full
/// handshakes (scripts/bench-tls measures them beside plain TCP).
#[tokio::test]
async fn the_bench_speaks_tls_with_ca() {
    let pki = confab_tests::pki::Pki::new("bench");
    let tls = pki.node_tls();
    let node = start_node(move |s| s.tls = Some(tls));
    let ca = pki.ca.to_str().unwrap().to_owned();
    let r = bench(
        node.addr,
        &["--ca", &ca, "messages", "--pairs", "2", "--duration", "0.3"],
    )
    .await;
    assert_common(&r, "messages");
    assert!(num(&r, "delivered") > 0.0, "{r}");
    assert_eq!(num(&r, "failed"), 0.0, "{r}");
    let pid = std::process::id().to_string();
    for extra in [&[][..], &["--tls-full-handshakes"][..]] {
        let mut args = vec!["--ca", ca.as_str()];
        args.extend_from_slice(extra);
        args.extend_from_slice(&[
            "idle",
            "--endpoints",
            "50",
            "--hold",
            "0",
            "--node-pid",
            &pid,
        ]);
        let r = bench(node.addr, &args).await;
        assert_eq!(num(&r, "failed"), 0.0, "{r}");
        assert_eq!(num(&r, "endpoints"), 50.0, "{r}");
    }
}

/// Asserts a `resume` report: every round resumed and its message arrived exactly once.
fn assert_resumed_exactly_once(r: &Value, rounds: f64) {
    assert_common(r, "resume");
    assert_eq!(num(r, "resumed"), rounds, "{r}");
    assert_eq!(num(r, "samples"), rounds, "one latency per round: {r}");
    for key in ["missing", "duplicates", "failed", "pairs_stopped"] {
        assert_eq!(num(r, key), 0.0, "{key}: {r}");
    }
    assert_eq!(r["first_error"], Value::Null, "{r}");
}

/// `resume` on one node: each round drops a resumable session's socket, a message goes to
/// it, and it resumes and gets that message once; `messages --resumable` runs beside it.
#[tokio::test]
async fn resume_rounds_get_each_message_once_and_messages_run_resumable() {
    // A small bound, so that the bench's `seen` every quarter of it is exercised: a late one
    // would drop the connection as a slow consumer and the run would fail.
    let node = start_node(|s| s.session.max_unseen_frames = 16);
    let r = bench(node.addr, &["resume", "--pairs", "2", "--rounds", "10"]).await;
    assert_resumed_exactly_once(&r, 20.0);
    assert_eq!(r["cross_node"], false);
    let r = bench(
        node.addr,
        &[
            "messages",
            "--resumable",
            "--pairs",
            "2",
            "--window",
            "8",
            "--duration",
            "0.5",
        ],
    )
    .await;
    assert_common(&r, "messages");
    assert_eq!(r["resumable"], true);
    assert!(num(&r, "delivered") > 0.0, "{r}");
    assert_eq!(num(&r, "failed"), 0.0, "{r}");
    assert_eq!(num(&r, "unanswered"), 0.0, "{r}");
}

/// `resume --resume-on`: sessions held on node A are resumed on node B of a cluster (a real
/// nats-server), relayed; the session stays on A.
#[tokio::test]
async fn resume_rounds_cross_nodes_with_resume_on() {
    let nats = confab_tests::NatsServer::start();
    let a = confab_tests::start_cluster_node(&nats, "node-a", |_| {});
    let b = confab_tests::start_cluster_node(&nats, "node-b", |_| {});
    let r = bench(
        a.addr,
        &[
            "resume",
            "--pairs",
            "2",
            "--rounds",
            "5",
            "--resume-on",
            &b.addr.to_string(),
        ],
    )
    .await;
    assert_resumed_exactly_once(&r, 10.0);
    assert_eq!(r["cross_node"], true, "{r}");
    assert_eq!(
        num(&r, "holding_node_changed"),
        0.0,
        "relayed, not moved: {r}"
    );
    drop((a, b, nats));
}
