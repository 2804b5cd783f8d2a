//! The operator's tools as processes: `confab admin …` against a node with an admin token
//! (status, sessions, a user's ranking, kick, a wrong token), `confab admin drain` making a
//! `confab-node` process exit by itself, and the node's systemd notifications (`READY=1`,
//! `WATCHDOG=1`, `STOPPING=1`) on a socket standing in for systemd's.
#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;
use std::path::Path;
use std::process::{Output, Stdio};
use std::time::Duration;

use confab_protocol::{Activity, ClientMsg, ServerMsg};
use confab_tests::{NodeLog, Raw, log_line_with, request_ok, start_node};
use serde_json::Value;
use tokio::io::AsyncBufReadExt;
use tokio::process::Command;

/// Upper bound on any single wait; a safety net, never a pacing device.
const WAIT: Duration = Duration::from_secs(20);
const TOKEN: &str = "admin-test-token-0123456789";

fn token_file(dir: &Path, token: &str) -> std::path::PathBuf {
    let path = dir.join(format!("{}.token", &token[..5]));
    std::fs::write(&path, format!("{token}\n")).unwrap();
    path
}

/// `confab admin --admin ADDR --admin-token-file FILE ARGS...`.
async fn admin(ops: SocketAddr, token: &Path, args: &[&str]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_confab"));
    for var in [
        "CONFAB_ADMIN",
        "CONFAB_ADMIN_TOKEN_FILE",
        "NO_COLOR",
        "RUST_LOG",
    ] {
        cmd.env_remove(var);
    }
    cmd.arg("admin")
        .arg("--admin")
        .arg(ops.to_string())
        .arg("--admin-token-file")
        .arg(token)
        .args(args)
        .stdin(Stdio::null());
    tokio::time::timeout(WAIT, cmd.output())
        .await
        .expect("the CLI finishes")
        .unwrap()
}

fn json(out: &Output) -> Value {
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

#[tokio::test]
async fn the_cli_lists_ranks_and_kicks_sessions_and_refuses_a_wrong_token() {
    let dir = tempfile::tempdir().unwrap();
    let token = token_file(dir.path(), TOKEN);
    let node = start_node(|s| s.admin.token_file = token.display().to_string());
    let ops = node.metrics_addr.unwrap();
    let mut laptop = Raw::sign_in(node.addr, "sip:ann@example.com", "laptop").await;
    let mut phone = Raw::sign_in(node.addr, "sip:ann@example.com", "phone").await;
    for (raw, activity) in [
        (&mut laptop, Activity::Away),
        (&mut phone, Activity::Active),
    ] {
        request_ok(
            raw,
            ClientMsg::DeviceState {
                rid: None,
                activity,
                idle_ms: None,
            },
        )
        .await;
    }

    let status = json(&admin(ops, &token, &["--json", "status"]).await);
    assert_eq!(status["nodes"][0]["endpoints"], 2, "{status}");
    assert_eq!(status["nodes"][0]["ready"], true, "{status}");

    let sessions = json(
        &admin(
            ops,
            &token,
            &["--json", "sessions", "--user", "sip:ann@example.com"],
        )
        .await,
    );
    let list = sessions["sessions"].as_array().unwrap();
    assert_eq!(list.len(), 2, "{sessions}");
    assert!(
        list.iter()
            .all(|s| s["remote_addr"].as_str().unwrap().starts_with("127.0.0.1:"))
    );

    let user = json(&admin(ops, &token, &["--json", "user", "sip:ann@example.com"]).await);
    assert_eq!(
        user["endpoints"][0]["device"], "phone",
        "the active device ranks first: {user}"
    );
    assert_eq!(user["endpoints"][1]["device"], "laptop", "{user}");
    let text = admin(ops, &token, &["user", "sip:ann@example.com"]).await;
    let text = String::from_utf8_lossy(&text.stdout);
    assert!(text.contains("#1") && text.contains("phone"), "{text}");

    let laptop_id = user["endpoints"][1]["endpoint"]
        .as_str()
        .unwrap()
        .to_owned();
    let kicked = json(
        &admin(
            ops,
            &token,
            &[
                "--json",
                "kick",
                "--endpoint",
                &laptop_id,
                "--reason",
                "maintenance",
            ],
        )
        .await,
    );
    assert_eq!(kicked["kicked"], 1, "{kicked}");
    let seen = laptop.expect_closed().await;
    assert!(
        seen.iter()
            .any(|m| matches!(m, ServerMsg::Kicked { reason } if reason == "maintenance")),
        "{seen:?}"
    );

    let nobody = admin(ops, &token, &["kick", "--endpoint", &laptop_id]).await;
    assert!(!nobody.status.success());
    assert!(
        String::from_utf8_lossy(&nobody.stderr).contains("404"),
        "{}",
        String::from_utf8_lossy(&nobody.stderr)
    );

    let wrong = token_file(dir.path(), "not-the-token");
    let refused = admin(ops, &wrong, &["status"]).await;
    assert!(!refused.status.success());
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("401"),
        "{}",
        String::from_utf8_lossy(&refused.stderr)
    );
    phone.request(ClientMsg::Bye { rid: None }).await;
}

/// `confab-node` with `vars`, its log on a pipe: (child, the client address, the operations
/// address) once it listens.
async fn node_process(
    vars: &[(&str, &str)],
) -> (
    tokio::process::Child,
    NodeLog,
    SocketAddr,
    Option<SocketAddr>,
) {
    node_process_with(&[], vars).await
}

/// [`node_process`] with command-line arguments.
async fn node_process_with(
    args: &[&str],
    vars: &[(&str, &str)],
) -> (
    tokio::process::Child,
    NodeLog,
    SocketAddr,
    Option<SocketAddr>,
) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_confab-node"))
        .env_remove("RUST_LOG")
        .env("NO_COLOR", "1")
        .env("CONFAB_SERVER_LISTEN", "127.0.0.1:0")
        .env("CONFAB_AUTH_JWT_SECRET", confab_tests::SECRET)
        .envs(vars.iter().copied())
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut log = tokio::io::BufReader::new(child.stdout.take().unwrap()).lines();
    let line = log_line_with(&mut log, "confab node listening", WAIT).await;
    let field = |name: &str| {
        line.split(name)
            .nth(1)
            .and_then(|rest| rest.split_whitespace().next())
            .map(|a| {
                a.trim_start_matches("Some(")
                    .trim_end_matches(')')
                    .to_owned()
            })
    };
    let addr = field("addr=").and_then(|a| a.parse().ok()).unwrap();
    let ops = field("metrics_addr=").and_then(|a| a.parse().ok());
    (child, log, addr, ops)
}

#[tokio::test]
async fn a_drain_from_the_cli_ends_the_node_process_once_its_client_leaves() {
    let dir = tempfile::tempdir().unwrap();
    let token = token_file(dir.path(), TOKEN);
    let (mut child, _log, addr, ops) = node_process(&[
        ("CONFAB_METRICS_LISTEN", "127.0.0.1:0"),
        ("CONFAB_ADMIN_TOKEN_FILE", token.to_str().unwrap()),
    ])
    .await;
    let ops = ops.expect("the operations port");
    let mut client = Raw::sign_in(addr, "sip:dee@example.com", "laptop").await;
    let drained = json(&admin(ops, &token, &["--json", "drain", "--deadline-ms", "15000"]).await);
    assert_eq!(drained["endpoints"], 1, "{drained}");
    let notice = client.recv().await;
    assert!(
        matches!(&notice, ServerMsg::Shutdown { reason, .. } if reason.contains("draining")),
        "{notice:?}"
    );
    // A second drain is refused while the first runs.
    let again = admin(ops, &token, &["drain"]).await;
    assert!(
        String::from_utf8_lossy(&again.stderr).contains("409"),
        "{}",
        String::from_utf8_lossy(&again.stderr)
    );
    client.request(ClientMsg::Bye { rid: None }).await;
    let status = tokio::time::timeout(WAIT, child.wait())
        .await
        .expect("the node exits once drained")
        .unwrap();
    assert!(status.success(), "{status:?}");
}

#[tokio::test]
async fn reload_applies_live_keys_names_the_rest_and_a_bad_file_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let token = token_file(dir.path(), TOKEN);
    let config = dir.path().join("node.toml");
    let write = |text: &str| std::fs::write(&config, text).unwrap();
    write("[limits]\nsubscriptions_per_endpoint = 100\n");
    let (_child, mut log, addr, ops) = node_process_with(
        &["--config", config.to_str().unwrap()],
        &[
            ("CONFAB_METRICS_LISTEN", "127.0.0.1:0"),
            ("CONFAB_ADMIN_TOKEN_FILE", token.to_str().unwrap()),
        ],
    )
    .await;
    let ops = ops.expect("the operations port");
    let mut ann = Raw::sign_in(addr, "sip:ann@example.com", "laptop").await;
    let sub = |user: &str| ClientMsg::Subscribe {
        rid: None,
        users: vec![user.to_owned()],
    };
    assert!(matches!(
        ann.request(sub("sip:bob@example.com")).await,
        ServerMsg::Ok { .. }
    ));

    // A live key and a restart-only key change together.
    write(
        "[limits]\nsubscriptions_per_endpoint = 1\n[fork]\ntoast_timeout_ms = 2500\n\
         [server]\nmax_connections = 77\n",
    );
    let report = json(&admin(ops, &token, &["--json", "reload"]).await);
    let keys = |field: &str| -> Vec<String> {
        report[field]
            .as_array()
            .unwrap()
            .iter()
            .map(|k| k.as_str().unwrap().to_owned())
            .collect()
    };
    assert!(
        keys("applied").contains(&"limits.subscriptions_per_endpoint".to_owned()),
        "{report}"
    );
    assert!(
        keys("applied").contains(&"fork.toast_timeout_ms".to_owned()),
        "{report}"
    );
    assert_eq!(
        keys("restart_needed"),
        ["server.max_connections"],
        "{report}"
    );
    // The new limit holds for the next request: Ann already has one subscription.
    let refused = ann.request(sub("sip:cat@example.com")).await;
    assert!(
        matches!(&refused, ServerMsg::Error { code, .. } if *code == confab_protocol::ErrorCode::Forbidden),
        "{refused:?}"
    );

    // A file that does not parse: 400 with why, and the limit stays as it was.
    write("[limits\nsubscriptions_per_endpoint = 100\n");
    let bad = admin(ops, &token, &["reload"]).await;
    assert!(!bad.status.success());
    let why = String::from_utf8_lossy(&bad.stderr);
    assert!(why.contains("400"), "{why}");
    let still = ann.request(sub("sip:dan@example.com")).await;
    assert!(matches!(still, ServerMsg::Error { .. }), "{still:?}");

    // SIGHUP does the same as the API, and says so in the log.
    write("[limits]\nsubscriptions_per_endpoint = 100\n[log]\nlevel = \"debug\"\n");
    let pid = _child.id().unwrap().to_string();
    let hup = std::process::Command::new("kill")
        .args(["-HUP", &pid])
        .status();
    assert!(hup.unwrap().success());
    let line = log_line_with(&mut log, "SIGHUP: settings reloaded", WAIT).await;
    assert!(line.contains("log.level"), "{line}");
    assert!(matches!(
        ann.request(sub("sip:dan@example.com")).await,
        ServerMsg::Ok { .. }
    ));
    ann.request(ClientMsg::Bye { rid: None }).await;
}

#[cfg(unix)]
#[tokio::test]
async fn the_node_tells_systemd_it_is_ready_pings_the_watchdog_and_says_stopping() {
    let dir = tempfile::tempdir().unwrap();
    let socket_path = dir.path().join("notify.sock");
    let socket = tokio::net::UnixDatagram::bind(&socket_path).unwrap();
    let (child, _log, _addr, _ops) = node_process(&[
        ("CONFAB_METRICS_LISTEN", ""),
        ("NOTIFY_SOCKET", socket_path.to_str().unwrap()),
        ("WATCHDOG_USEC", "200000"),
    ])
    .await;
    let mut buf = [0u8; 256];
    let mut next = async || {
        let n = tokio::time::timeout(WAIT, socket.recv(&mut buf))
            .await
            .expect("a notification")
            .unwrap();
        String::from_utf8_lossy(&buf[..n]).into_owned()
    };
    assert_eq!(next().await.trim(), "READY=1");
    assert_eq!(next().await.trim(), "WATCHDOG=1");
    assert_eq!(
        next().await.trim(),
        "WATCHDOG=1",
        "pinged again, every 100 ms"
    );
    let pid = child.id().unwrap().to_string();
    let term = std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status();
    assert!(term.unwrap().success());
    let mut last = next().await;
    while last.trim() == "WATCHDOG=1" {
        last = next().await;
    }
    assert_eq!(last.trim(), "STOPPING=1");
    let mut child = child;
    let status = tokio::time::timeout(WAIT, child.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(status.success(), "{status:?}");
}
