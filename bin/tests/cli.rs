//! The `confab` CLI as processes against a node started in the test: tokens, send and listen
//! (auto-accept, a click on Enter, the most active device when nobody clicks), failures with
//! their reason, presence, `--json`, colour and a scripted chat. A listener is known to be
//! ready from its `listening as` line; nothing here sleeps.
#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;
use std::process::{ExitStatus, Stdio};
use std::time::Duration;

use confab_client::{AutoAcceptPolicy, Endpoint, EndpointOptions, Hello};
use confab_tests::{SECRET, start_node};
use serde_json::Value;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader, Lines};
use tokio::process::{Child, ChildStdin, ChildStdout, Command};

const ALICE: &str = "sip:alice@example.com";
const BOB: &str = "sip:bob@example.com";
const NOBODY: &str = "sip:nobody@example.com";

/// Upper bound on any single wait; a safety net, never a pacing device.
const WAIT: Duration = Duration::from_secs(15);

/// `confab --server ADDR --secret SECRET ARGS...`, with none of the CLI's variables inherited.
fn confab(addr: SocketAddr, args: &[&str]) -> Command {
    let mut cmd = bare(addr);
    cmd.arg("--secret").arg(SECRET).args(args);
    cmd
}

/// `confab --server ADDR`, with none of the CLI's variables inherited, and its output piped.
fn bare(addr: SocketAddr) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_confab"));
    for var in [
        "CONFAB_SERVER",
        "CONFAB_USER",
        "CONFAB_TOKEN",
        "CONFAB_AUTH_JWT_SECRET",
        "CONFAB_TOKEN_FILE",
        "CONFAB_SECRET_FILE",
        "CONFAB_TLS",
        "CONFAB_CA",
        "CONFAB_TLS_SERVER_NAME",
        "NO_COLOR",
        "RUST_LOG",
    ] {
        cmd.env_remove(var);
    }
    cmd.arg("--server")
        .arg(addr.to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    cmd
}

/// What a finished command printed.
struct Done {
    status: ExitStatus,
    stdout: String,
    stderr: String,
}

impl Done {
    fn lines(&self) -> Vec<&str> {
        self.stdout.lines().collect()
    }
}

/// Runs a command to its end.
async fn run(mut cmd: Command) -> Done {
    let out = tokio::time::timeout(WAIT, cmd.output())
        .await
        .expect("the command finished in time")
        .unwrap();
    Done {
        status: out.status,
        stdout: String::from_utf8(out.stdout).unwrap(),
        stderr: String::from_utf8(out.stderr).unwrap(),
    }
}

/// A running command whose stdout is read line by line.
struct Proc {
    child: Child,
    stdin: Option<ChildStdin>,
    stdout: Lines<BufReader<ChildStdout>>,
    seen: Vec<String>,
}

impl Proc {
    fn spawn(mut cmd: Command, with_stdin: bool) -> Proc {
        if with_stdin {
            cmd.stdin(Stdio::piped());
        }
        let mut child = cmd.spawn().unwrap();
        let stdout = BufReader::new(child.stdout.take().unwrap()).lines();
        Proc {
            stdin: child.stdin.take(),
            child,
            stdout,
            seen: Vec::new(),
        }
    }

    /// Reads lines until one satisfies `want`; returns it.
    async fn line(&mut self, want: impl Fn(&str) -> bool) -> String {
        loop {
            let next = tokio::time::timeout(WAIT, self.stdout.next_line()).await;
            match next {
                Ok(Ok(Some(line))) => {
                    self.seen.push(line.clone());
                    if want(&line) {
                        return line;
                    }
                }
                other => panic!(
                    "no matching line ({other:?}); stdout so far: {:#?}",
                    self.seen
                ),
            }
        }
    }

    /// Types a line on its stdin.
    async fn type_line(&mut self, line: &str) {
        let stdin = self.stdin.as_mut().unwrap();
        stdin
            .write_all(format!("{line}\n").as_bytes())
            .await
            .unwrap();
        stdin.flush().await.unwrap();
    }

    /// Waits for the process to exit; returns its status, every stdout line and its stderr.
    async fn finish(mut self) -> (ExitStatus, Vec<String>, String) {
        drop(self.stdin.take());
        while let Ok(Ok(Some(line))) = tokio::time::timeout(WAIT, self.stdout.next_line()).await {
            self.seen.push(line);
        }
        let status = tokio::time::timeout(WAIT, self.child.wait())
            .await
            .expect("the process exited in time")
            .unwrap();
        let mut stderr = String::new();
        if let Some(mut pipe) = self.child.stderr.take() {
            pipe.read_to_string(&mut stderr).await.unwrap();
        }
        (status, self.seen, stderr)
    }
}

/// Starts `confab --user USER listen ARGS...` and waits until it has signed in.
async fn listener(addr: SocketAddr, user: &str, args: &[&str], with_stdin: bool) -> Proc {
    let mut all = vec!["--user", user, "listen"];
    all.extend_from_slice(args);
    let mut proc = Proc::spawn(confab(addr, &all), with_stdin);
    proc.line(|l| l.starts_with("listening as ") || l.starts_with(r#"{"device""#))
        .await;
    proc
}

fn quiet_node() -> confab_actors::RunningNode {
    start_node(|s| {
        s.fork.toast_timeout_ms = 60_000;
        s.fork.auto_accept_grace_ms = 60_000;
    })
}

#[tokio::test]
async fn token_prints_a_jwt_the_node_accepts() {
    let node = quiet_node();
    let done = run(confab(node.addr, &["token", ALICE])).await;
    assert!(done.status.success(), "{}", done.stderr);
    let token = done.stdout.trim();
    assert_eq!(token.split('.').count(), 3, "a JWT: {token}");

    let endpoint = Endpoint::connect_with(
        node.addr,
        Hello::new(ALICE, token, "test"),
        EndpointOptions {
            auto_accept: AutoAcceptPolicy::Notify,
            ..EndpointOptions::default()
        },
    )
    .await
    .expect("the node accepts the printed token");
    endpoint.bye().await.unwrap();

    // The CLI signs in with it too (--token instead of --secret).
    let mut cmd = bare(node.addr);
    cmd.args(["--token", token])
        .args(["--user", ALICE, "presence", "watch", ALICE, "--count", "1"]);
    let done = run(cmd).await;
    assert!(done.status.success(), "{}", done.stderr);
    assert!(done.stdout.starts_with("sip:alice@example.com: available"));

    // A token signed with another secret is refused, and the CLI says why.
    let mut cmd = bare(node.addr);
    cmd.args(["--secret", "not-the-secret", "--user", ALICE])
        .args(["presence", "watch", BOB]);
    let done = run(cmd).await;
    assert!(!done.status.success());
    assert!(done.stderr.contains("unauthorized"), "{}", done.stderr);
}

#[tokio::test]
async fn send_is_delivered_to_an_auto_accepting_listener() {
    let node = quiet_node();
    let bob = listener(node.addr, BOB, &["--auto-accept", "--count", "1"], false).await;

    let sent = run(confab(node.addr, &["--user", ALICE, "send", BOB, "hello"])).await;
    assert!(sent.status.success(), "send failed: {}", sent.stderr);
    assert!(
        sent.stdout.contains("delivered to sip:bob@example.com"),
        "{}",
        sent.stdout
    );

    let (status, lines, stderr) = bob.finish().await;
    assert!(status.success(), "listen failed: {stderr}");
    assert!(
        lines.iter().any(|l| l == "sip:alice@example.com: hello"),
        "{lines:#?}"
    );
    assert!(
        lines.iter().all(|l| !l.contains('\x1b')),
        "no colour when piped"
    );
}

#[tokio::test]
async fn send_to_a_user_without_endpoints_fails_with_480() {
    let node = quiet_node();
    let done = run(confab(node.addr, &["--user", ALICE, "send", NOBODY, "hi"])).await;
    assert!(!done.status.success());
    assert!(
        done.stderr.contains("480 Temporarily Unavailable"),
        "{}",
        done.stderr
    );
    // Also with --toast, where success would be the call being established.
    let done = run(confab(
        node.addr,
        &["--user", ALICE, "send", "--toast", NOBODY, "hi"],
    ))
    .await;
    assert!(!done.status.success());
    assert!(done.stderr.contains("480"), "{}", done.stderr);
}

#[tokio::test]
async fn enter_accepts_on_one_device_and_the_other_sees_completed_elsewhere() {
    let node = quiet_node();
    // The desk keeps listening: one that left right after the toast could hang up before
    // Alice's call is established, and her `send` would rightly report a failed call.
    let mut desk = listener(node.addr, BOB, &["--device", "desk"], true).await;
    let mut phone = listener(node.addr, BOB, &["--device", "phone"], false).await;

    let send = tokio::spawn(run(confab(
        node.addr,
        &["--user", ALICE, "send", "--toast", BOB, "lunch?"],
    )));
    let toast = "toast from sip:alice@example.com: lunch?";
    desk.line(|l| l == toast).await;
    phone.line(|l| l == toast).await;
    desk.type_line("").await;

    let sent = tokio::time::timeout(WAIT, send).await.unwrap().unwrap();
    assert!(sent.status.success(), "{}", sent.stderr);
    assert!(sent.stdout.contains("established"), "{}", sent.stdout);
    phone
        .line(|l| l.ends_with("incoming -> terminating 200 Call completed elsewhere"))
        .await;
    // The toast is the first message of the call, on the device that took it.
    desk.line(|l| l == "sip:alice@example.com: lunch?").await;
}

#[tokio::test]
async fn when_nobody_clicks_the_most_active_device_takes_the_message() {
    // The test node's 300 ms toast timer fires the auto-accept; a generous grace keeps a slow
    // machine from handing the call on to the away device before the phone's process accepts.
    let node = start_node(|s| s.fork.auto_accept_grace_ms = 10_000);
    let mut desk = listener(
        node.addr,
        BOB,
        &["--device", "desk", "--activity", "away"],
        false,
    )
    .await;
    let phone = listener(
        node.addr,
        BOB,
        &["--device", "phone", "--activity", "active", "--count", "1"],
        false,
    )
    .await;

    let sent = run(confab(
        node.addr,
        &["--user", ALICE, "send", BOB, "where are you?"],
    ))
    .await;
    assert!(sent.status.success(), "{}", sent.stderr);
    let (status, lines, _) = phone.finish().await;
    assert!(status.success());
    assert!(
        lines
            .iter()
            .any(|l| l.contains("the node chose this device")),
        "{lines:#?}"
    );
    assert!(
        lines
            .iter()
            .any(|l| l == "sip:alice@example.com: where are you?"),
        "{lines:#?}"
    );
    desk.line(|l| l.ends_with("Call completed elsewhere")).await;
}

#[tokio::test]
async fn presence_watch_prints_events_and_set_changes_them() {
    let node = quiet_node();
    let done = run(confab(
        node.addr,
        &["--user", ALICE, "presence", "watch", BOB, "--count", "1"],
    ))
    .await;
    assert!(done.status.success(), "{}", done.stderr);
    assert_eq!(done.lines(), ["sip:bob@example.com: offline"]);

    let mut watch = Proc::spawn(
        confab(
            node.addr,
            &["--user", ALICE, "presence", "watch", BOB, "--count", "3"],
        ),
        false,
    );
    watch.line(|l| l == "sip:bob@example.com: offline").await;
    let bob = listener(node.addr, BOB, &[], false).await;
    watch.line(|l| l == "sip:bob@example.com: available").await;
    // The status outlives `presence set`'s own endpoint: Bob's listener is still signed in.
    let set = run(confab(
        node.addr,
        &["--user", BOB, "presence", "set", "--status", "busy"],
    ))
    .await;
    assert!(set.status.success(), "{}", set.stderr);
    assert!(
        set.stdout
            .starts_with("sip:bob@example.com: busy (status: busy)"),
        "{}",
        set.stdout
    );
    watch.line(|l| l == "sip:bob@example.com: busy").await;
    let (status, _, _) = watch.finish().await;
    assert!(status.success());
    drop(bob);
}

#[tokio::test]
async fn json_output_is_one_object_per_line() {
    let node = quiet_node();
    let bob = listener(
        node.addr,
        BOB,
        &["--json", "--auto-accept", "--count", "1"],
        false,
    )
    .await;
    let sent = run(confab(
        node.addr,
        &["--json", "--user", ALICE, "send", BOB, "hello"],
    ))
    .await;
    assert!(sent.status.success(), "{}", sent.stderr);
    let events: Vec<Value> = sent
        .lines()
        .iter()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert!(
        events
            .iter()
            .any(|e| e["event"] == "delivered" && e["msg"] == 1),
        "{events:#?}"
    );
    assert!(events.iter().any(|e| e["event"] == "state"
        && e["state"] == "terminated"
        && e["reason"]["code"] == 200));

    let (status, lines, _) = bob.finish().await;
    assert!(status.success());
    let events: Vec<Value> = lines
        .iter()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(events[0]["event"], "listening");
    let message = events
        .iter()
        .find(|e| e["event"] == "message")
        .expect("a message event");
    assert_eq!(message["from"], ALICE);
    assert_eq!(message["text"], "hello");
    assert_eq!(message["msg"], 1);
    assert!(message["call"].is_string());

    let watched = run(confab(
        node.addr,
        &[
            "--json", "--user", BOB, "presence", "watch", BOB, "--count", "1",
        ],
    ))
    .await;
    let event: Value = serde_json::from_str(watched.stdout.trim()).unwrap();
    assert_eq!(event["event"], "presence");
    assert_eq!(event["availability"], "available");
    assert_eq!(event["endpoints"][0]["rank"], 1);

    let failed = run(confab(
        node.addr,
        &["--json", "--user", ALICE, "send", NOBODY, "hi"],
    ))
    .await;
    assert!(!failed.status.success());
    for line in failed.lines() {
        let _: Value = serde_json::from_str(line).unwrap();
    }
}

#[tokio::test]
async fn color_only_when_asked_or_on_a_terminal() {
    let node = quiet_node();
    let plain = run(confab(
        node.addr,
        &["--user", ALICE, "presence", "watch", BOB, "--count", "1"],
    ))
    .await;
    assert!(!plain.stdout.contains('\x1b'));
    let colored = run(confab(
        node.addr,
        &[
            "--color", "always", "--user", ALICE, "presence", "watch", BOB, "--count", "1",
        ],
    ))
    .await;
    assert!(colored.status.success());
    assert!(colored.stdout.contains("\x1b["), "{:?}", colored.stdout);
}

#[tokio::test]
async fn a_scripted_chat_delivers_each_line_and_quits() {
    let node = quiet_node();
    let mut bob = listener(node.addr, BOB, &["--auto-accept"], false).await;
    let mut chat = Proc::spawn(confab(node.addr, &["--user", ALICE, "chat", BOB]), true);
    chat.type_line("first").await;
    chat.type_line("second").await;
    chat.type_line("/quit").await;
    let (status, lines, stderr) = chat.finish().await;
    assert!(status.success(), "{stderr}");
    let marks: Vec<&String> = lines.iter().filter(|l| l.starts_with('✓')).collect();
    assert_eq!(marks, ["✓ first", "✓ second"], "{lines:#?}");
    assert!(
        lines
            .iter()
            .any(|l| l.ends_with("established -> terminating 200 Terminated locally")),
        "{lines:#?}"
    );
    bob.line(|l| l == "sip:alice@example.com: first").await;
    bob.line(|l| l == "sip:alice@example.com: second").await;
    bob.line(|l| l.ends_with("established -> terminating 200 Terminated remotely"))
        .await;
}

#[tokio::test]
async fn the_cli_speaks_tls_with_a_ca_and_reads_its_secret_from_a_file() {
    let pki = confab_tests::pki::Pki::new("cli");
    let tls = pki.node_tls();
    let node = start_node(move |s| s.tls = Some(tls));
    let secret_file = pki.dir.path().join("secret");
    std::fs::write(&secret_file, format!("{SECRET}\n")).unwrap();
    let ca = pki.ca.to_str().unwrap().to_owned();
    let secret = secret_file.to_str().unwrap().to_owned();

    // --ca (the server name is the host of --server, 127.0.0.1), --secret-file.
    let mut cmd = bare(node.addr);
    cmd.args(["--ca", &ca, "--secret-file", &secret, "--user", ALICE])
        .args(["presence", "watch", ALICE, "--count", "1"]);
    let done = run(cmd).await;
    assert!(done.status.success(), "{}", done.stderr);
    assert!(done.stdout.starts_with("sip:alice@example.com: available"));

    // The same through CONFAB_CA and CONFAB_SECRET_FILE.
    let mut cmd = bare(node.addr);
    cmd.env("CONFAB_CA", &ca)
        .env("CONFAB_SECRET_FILE", &secret)
        .args(["--user", ALICE, "presence", "watch", ALICE, "--count", "1"]);
    let done = run(cmd).await;
    assert!(done.status.success(), "{}", done.stderr);

    // Plain TCP to a TLS port, and TLS trusting the system's roots only: each fails and says
    // why.
    let mut cmd = confab(node.addr, &["--user", ALICE, "presence", "watch", ALICE]);
    cmd.arg("--count").arg("1");
    let done = run(cmd).await;
    assert!(!done.status.success());
    let mut cmd = confab(
        node.addr,
        &["--tls", "--user", ALICE, "presence", "watch", ALICE],
    );
    cmd.arg("--count").arg("1");
    let done = run(cmd).await;
    assert!(!done.status.success());
    assert!(
        done.stderr.contains("TLS") || done.stderr.contains("root certificates"),
        "{}",
        done.stderr
    );
}

#[tokio::test]
async fn listen_rides_out_a_cut_link_and_keeps_printing_messages_both_ways() {
    use confab_client::{Conversation, InstantMessagingCall};
    let node = quiet_node();
    let proxy = confab_tests::cut::CutProxy::start(node.addr).await;
    // Bob listens through the relay; Alice calls him and sends from the library.
    let mut bob = listener(proxy.addr, BOB, &["--json", "--count", "2"], false).await;
    let alice = Endpoint::connect_with(
        node.addr,
        Hello::new(ALICE, confab_tests::token(ALICE), "laptop"),
        EndpointOptions::default(),
    )
    .await
    .unwrap();
    let call = tokio::time::timeout(
        WAIT,
        InstantMessagingCall::establish(&Conversation::new(&alice), BOB, None, Default::default()),
    )
    .await
    .expect("established in time")
    .unwrap();
    call.flow().send_text("before").await.unwrap();
    bob.line(|l| l.contains(r#""text":"before""#)).await;

    proxy.cut();
    let reconnecting = bob.line(|l| l.contains(r#""event":"reconnecting""#)).await;
    let resumed = bob.line(|l| l.contains(r#""event":"resumed""#)).await;
    call.flow().send_text("after").await.unwrap();
    bob.line(|l| l.contains(r#""text":"after""#)).await;

    let (status, lines, stderr) = bob.finish().await;
    assert!(status.success(), "listen failed: {stderr}");
    let resumed: Value = serde_json::from_str(&resumed).unwrap();
    assert!(resumed["attempts"].as_u64() >= Some(1), "{resumed}");
    let reconnecting: Value = serde_json::from_str(&reconnecting).unwrap();
    assert!(reconnecting["error"].is_string(), "{reconnecting}");
    let messages = lines
        .iter()
        .filter(|l| l.contains(r#""event":"message""#))
        .count();
    assert_eq!(messages, 2, "each message printed once: {lines:#?}");
}
