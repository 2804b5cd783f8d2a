//! `confab-node` as a process: a bad setting stops it at start, with status 1 and the key's
//! name, before it binds anything (docs/operations.md, "Configuration").
#![allow(clippy::unwrap_used)]

use std::io::Read;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// A safety net for a node that starts although it should not; never a pacing device.
const WAIT: Duration = Duration::from_secs(20);

/// Runs the node with `vars` set (and no `RUST_LOG`, which would win over `log.level`); returns
/// its exit status and stderr. Each case fails before the node listens, so nothing is bound; a
/// node that starts anyway is killed after `WAIT` and the case fails.
fn node_with(vars: &[(&str, &str)]) -> (Option<i32>, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_confab-node"))
        .env_remove("RUST_LOG")
        .envs(vars.iter().copied())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + WAIT;
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status.code();
        }
        if Instant::now() > deadline {
            child.kill().unwrap();
            child.wait().unwrap();
            panic!("{vars:?}: the node started instead of refusing the setting");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut stderr = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut stderr)
        .unwrap();
    (status, stderr)
}

#[test]
fn a_bad_setting_stops_the_node_and_names_the_key() {
    for (var, value, key) in [
        ("CONFAB_LOG_LEVEL", "confab=loud", "log.level"),
        ("CONFAB_LOG_LEVEL", "debg", "log.level"),
        (
            "CONFAB_FLOW_COMPOSING_TIMEOUT_MS",
            "1000",
            "flow.composing_timeout_ms",
        ),
        (
            "CONFAB_SERVER_HELLO_TIMEOUT_MS",
            "0",
            "server.hello_timeout_ms",
        ),
        ("CONFAB_METRICS_LISTEN", "localhost:9464", "metrics.listen"),
    ] {
        let (status, stderr) = node_with(&[(var, value)]);
        assert_eq!(status, Some(1), "{var}={value}: {stderr}");
        assert!(stderr.contains(key), "{var}={value} names {key}: {stderr}");
    }
}

/// Runs `confab-node ARGS` with `vars`, which must exit by itself: (status, stdout, stderr).
fn node_run(args: &[&str], vars: &[(&str, &str)]) -> (Option<i32>, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_confab-node"))
        .args(args)
        .env_remove("RUST_LOG")
        .envs(vars.iter().copied())
        .output()
        .unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn check_accepts_the_shipped_configs_and_refuses_a_bad_one_naming_the_key() {
    let root = concat!(env!("CARGO_MANIFEST_DIR"), "/..");
    for file in [
        "config/node.toml",
        "config/cluster/node-a.toml",
        "config/cluster/node-b.toml",
        "config/cluster/node-c.toml",
    ] {
        let path = format!("{root}/{file}");
        let (status, stdout, stderr) = node_run(&["--check", "--config", &path], &[]);
        assert_eq!(status, Some(0), "{file}: {stderr}");
        assert!(stdout.starts_with("ok: "), "{file}: {stdout}");
    }
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.toml");
    std::fs::write(&bad, "[fork]\ntoast_timeout_ms = \"soon\"\n").unwrap();
    let (status, stdout, stderr) = node_run(&["--check", "--config", bad.to_str().unwrap()], &[]);
    assert_eq!(status, Some(1), "{stdout}");
    assert!(stderr.contains("fork.toast_timeout_ms"), "{stderr}");
    // The environment is checked too, and so is the log filter.
    let (status, _, stderr) = node_run(&["--check"], &[("CONFAB_LOG_LEVEL", "debg,[")]);
    assert_eq!(status, Some(1));
    assert!(stderr.contains("log.level"), "{stderr}");
}

#[test]
fn check_warns_of_a_certificate_that_has_expired_and_still_passes() {
    let pki = confab_tests::pki::Pki::new("check");
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = (dir.path().join("node.pem"), dir.path().join("node-key.pem"));
    let config = dir.path().join("node.toml");
    let write_config = || {
        let text = format!(
            "[tls]\ncert_file = {:?}\nkey_file = {:?}\n",
            cert.to_str().unwrap(),
            key.to_str().unwrap()
        );
        std::fs::write(&config, text).unwrap();
    };
    write_config();
    pki.issue_expired_server(&cert, &key);
    let (status, stdout, stderr) =
        node_run(&["--check", "--config", config.to_str().unwrap()], &[]);
    // A start would take it (and fail every handshake): the check says so and passes.
    assert_eq!(status, Some(0), "{stderr}");
    assert!(stdout.starts_with("ok: "), "{stdout}");
    assert!(
        stderr.contains("warning: tls.cert_file: it has expired"),
        "{stderr}"
    );
    pki.issue_server_until(&cert, &key, 2090);
    let (status, _, stderr) = node_run(&["--check", "--config", config.to_str().unwrap()], &[]);
    assert_eq!(status, Some(0), "{stderr}");
    assert!(!stderr.contains("warning"), "{stderr}");
}

#[test]
fn print_config_shows_file_and_environment_with_secrets_redacted() {
    let (status, stdout, stderr) = node_run(
        &["--print-config"],
        &[
            ("CONFAB_AUTH_JWT_SECRET", "very-secret-value"),
            ("CONFAB_FORK_TOAST_TIMEOUT_MS", "4321"),
        ],
    );
    assert_eq!(status, Some(0), "{stderr}");
    assert!(stdout.contains("toast_timeout_ms = 4321"), "{stdout}");
    assert!(stdout.contains("jwt_secret = \"<redacted>\""), "{stdout}");
    assert!(!stdout.contains("very-secret-value"), "{stdout}");
}

/// The node as a process with `[tls]`: SIGHUP makes it present a renewed certificate (of
/// another CA here) to new connections, and SIGTERM still stops it cleanly.
#[tokio::test]
async fn sighup_reloads_the_tls_certificate_of_a_running_node() {
    use confab_client::{ClientTls, Endpoint, EndpointOptions, Hello};
    use tokio::io::AsyncBufReadExt;

    let old = confab_tests::pki::Pki::new("sighup-old");
    let new = confab_tests::pki::Pki::new("sighup-new");
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = (dir.path().join("node.pem"), dir.path().join("node-key.pem"));
    old.issue_server(&cert, &key);
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_confab-node"))
        .env_remove("RUST_LOG")
        .env("NO_COLOR", "1")
        .env("CONFAB_SERVER_LISTEN", "127.0.0.1:0")
        .env("CONFAB_METRICS_LISTEN", "")
        .env("CONFAB_AUTH_JWT_SECRET", confab_tests::SECRET)
        .env("CONFAB_TLS_CERT_FILE", &cert)
        .env("CONFAB_TLS_KEY_FILE", &key)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut log = tokio::io::BufReader::new(child.stdout.take().unwrap()).lines();
    let listening = confab_tests::log_line_with(&mut log, "confab node listening", WAIT).await;
    let addr: std::net::SocketAddr = listening
        .split("addr=")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|a| a.parse().ok())
        .unwrap_or_else(|| panic!("no address in {listening:?}"));
    let sign_in = |ca: std::path::PathBuf| async move {
        let user = "sip:hup@example.com";
        let mut options = EndpointOptions::default();
        options.connection.tls = Some(ClientTls::with_ca_file(ca).unwrap());
        let hello = Hello::new(user, confab_tests::token(user), "laptop");
        Endpoint::connect_with(addr, hello, options).await
    };
    sign_in(old.ca.clone()).await.unwrap().bye().await.unwrap();

    new.issue_server(&cert, &key);
    let pid = child.id().unwrap().to_string();
    let hup = std::process::Command::new("kill")
        .args(["-HUP", &pid])
        .status();
    assert!(hup.unwrap().success());
    confab_tests::log_line_with(&mut log, "SIGHUP: TLS certificate reloaded", WAIT).await;
    assert!(
        sign_in(old.ca.clone()).await.is_err(),
        "the old CA no longer fits"
    );
    sign_in(new.ca.clone()).await.unwrap().bye().await.unwrap();

    let term = std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status();
    assert!(term.unwrap().success());
    let status = tokio::time::timeout(WAIT, child.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(status.success(), "{status:?}");
}
