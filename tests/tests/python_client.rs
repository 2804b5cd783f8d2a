//! A client in another language, written from the contract alone, drives the mission: each test
//! starts a node and runs one scenario of `tests/python/scenarios.py` (the Python reference
//! client `tests/python/confab_client.py`) against it.
//!
//! Needs `python3` with the `msgpack` package; without them these tests fail (never skip) and
//! say to run `pip install msgpack`.

use confab_tests::{SECRET, start_node};
use std::path::PathBuf;
use std::process::{Command, Output};

fn python_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("python")
}

fn describe(out: &Output) -> String {
    format!(
        "{}\n--- stdout:\n{}\n--- stderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Fails (never skips) when `python3` or its `msgpack` package is missing.
fn require_python() {
    let out = Command::new("python3")
        .args(["-c", "import msgpack"])
        .output()
        .unwrap_or_else(|e| {
            panic!(
                "cannot run `python3` ({e}): install Python 3, then run `pip install msgpack`; \
                 the cross-language tests need both"
            )
        });
    assert!(
        out.status.success(),
        "python3 cannot import msgpack: run `pip install msgpack`\n{}",
        describe(&out)
    );
}

/// Runs `scenarios.py <addr> <secret> <scenario>` against a node started with `tweak`.
fn run_scenario(scenario: &str, tweak: impl FnOnce(&mut confab_actors::Settings)) {
    run_scenario_with(scenario, None, tweak);
}

/// [`run_scenario`]; with `ca`, over TLS (`CONFAB_CA` for the script) to a node with `[tls]`.
fn run_scenario_with(
    scenario: &str,
    ca: Option<&std::path::Path>,
    tweak: impl FnOnce(&mut confab_actors::Settings),
) {
    require_python();
    let node = start_node(tweak);
    let mut cmd = Command::new("python3");
    cmd.arg(python_dir().join("scenarios.py"))
        .arg(node.addr.to_string())
        .arg(SECRET)
        .arg(scenario)
        .current_dir(python_dir())
        .env("PYTHONDONTWRITEBYTECODE", "1")
        .env_remove("CONFAB_CA");
    if let Some(ca) = ca {
        cmd.env("CONFAB_CA", ca);
    }
    let out = cmd.output().expect("python3 runs");
    node.shutdown();
    eprint!("{}", String::from_utf8_lossy(&out.stdout));
    assert!(
        out.status.success(),
        "python scenario `{scenario}` failed\n{}",
        describe(&out)
    );
}

/// Two devices ring, device 1 clicks: it gets the toast and alice's message, device 2's fork
/// ends "Call completed elsewhere", alice's message is delivered.
#[test]
fn python_client_fork_click() {
    // A long toast timer keeps the arbiter out of the way: this scenario is about the click.
    run_scenario("fork_click", |s| s.fork.toast_timeout_ms = 10_000);
}

/// The same over TLS: Python's own `ssl` module (OpenSSL) against the node's rustls, checking
/// the node's certificate against 127.0.0.1.
#[test]
fn python_client_fork_click_over_tls() {
    let pki = confab_tests::pki::Pki::new("python");
    let tls = pki.node_tls();
    run_scenario_with("fork_click", Some(&pki.ca), |s| {
        s.fork.toast_timeout_ms = 10_000;
        s.tls = Some(tls);
    });
}

/// Nobody clicks: after the toast timer the active device (not the away one) is asked to
/// auto-accept, accepts, and gets the toast; the other fork ends "Call completed elsewhere".
#[test]
fn python_client_timeout_most_active() {
    // The harness's 300 ms toast timer fires the auto-accept; a generous grace keeps a slow
    // machine from handing the call on to the away device before the script accepts.
    run_scenario("timeout_most_active", |s| {
        s.fork.auto_accept_grace_ms = 3_000
    });
}

/// Section 3 "Resuming" from another language: a resumable session dropped while messages
/// come, resumed, every message once and delivered once; forged and spent tokens refused.
#[test]
fn python_client_resume() {
    run_scenario("resume", |_| {});
}
