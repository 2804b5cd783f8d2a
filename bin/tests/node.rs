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
