//! The Grafana dashboard against a real Prometheus scraping a real node (design §5: the
//! dashboard uses only names that a running node exports).
//!
//! The node runs in cluster mode (a one-node cluster on a real `nats-server -js`, as in
//! `tests/cluster.rs`) so the Cluster row's panels have data too.
//!
//! The test drives every kind of traffic the dashboard shows through a node, lets the
//! `prometheus` binary scrape it every second, then evaluates every `expr` of
//! `grafana/dashboard.json` through Prometheus's HTTP API: each must be valid PromQL and return
//! at least one series. The traffic runs twice, with a scrape in between, so `rate()` and
//! `histogram_quantile()` see increases and the latency panels show real numbers.
//!
//! The `prometheus` and `nats-server` binaries must be installed (`scripts/test` installs them;
//! `PROMETHEUS_BIN` and `NATS_SERVER` name others); without them the test fails rather than
//! skipping.
#![allow(clippy::unwrap_used, clippy::print_stdout)]

use confab_protocol::*;
use confab_tests::*;
use serde_json::Value;
use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

const DASHBOARD: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../grafana/dashboard.json");
/// What Grafana variables become when an expression is evaluated outside Grafana.
const VARIABLES: &[(&str, &str)] = &[
    ("__rate_interval", "1m"),
    ("__interval", "1m"),
    ("__range", "1m"),
    ("instance", ".*"),
];
/// Messages a slow client is sent without reading; well above the node's outbound queue.
const SLOW_BURST: u32 = 100;
/// The node's outbound queue in this test: small, so the burst above overflows it.
const OUTBOUND_QUEUE: usize = 32;
/// Upper bound on waiting for Prometheus to start or to scrape what the node did.
const SCRAPE_DEADLINE: Duration = Duration::from_secs(30);

#[tokio::test]
async fn every_dashboard_query_returns_data_from_a_real_prometheus() {
    let started = Instant::now();
    let dashboard: Value = serde_json::from_str(&std::fs::read_to_string(DASHBOARD).unwrap())
        .expect("grafana/dashboard.json is valid JSON");
    let exprs = dashboard_exprs(&dashboard);
    assert!(
        exprs.len() >= 12,
        "expected the dashboard's panels, found {exprs:?}"
    );
    let names = metric_names(exprs.iter().map(String::as_str));

    let nats = NatsServer::start();
    // With link TLS: the certificate expiry panel shows only a node that has a certificate.
    let pki = confab_tests::pki::Pki::new("dashboard");
    let node = start_cluster_node(&nats, "dashboard", |s| {
        s.limits.outbound_queue = OUTBOUND_QUEUE;
        pki.with_link_tls(s);
    });
    let metrics_addr = node.metrics_addr.expect("the test node serves metrics");
    let prom = Prometheus::start(metrics_addr).await;

    // Phase one creates every series; once Prometheus has them, phase two shows up as increases.
    traffic(node.addr, "one").await;
    prom.wait_for_names(&names).await;
    traffic(node.addr, "two").await;

    // Both phases scraped: every expression here must return a series.
    let moved = [
        r#"confab_messages_total{result="delivered"} >= 8"#,
        r#"confab_fork_decisions_total{cause="click"} >= 2"#,
        r#"confab_fork_decisions_total{cause="immediate"} >= 4"#,
        r#"confab_fork_decisions_total{cause="declined"} >= 2"#,
        r#"confab_fork_decisions_total{cause="cancelled"} >= 2"#,
        r#"confab_fork_decisions_total{cause="no_endpoints"} >= 2"#,
        r#"confab_call_outcomes_total{code="200"} >= 2"#,
        r#"confab_call_outcomes_total{code="603"} >= 2"#,
        r#"confab_call_outcomes_total{code="487"} >= 2"#,
        r#"confab_call_outcomes_total{code="480"} >= 2"#,
        "confab_presence_publications_total >= 2",
        "confab_presence_notifications_total >= 6",
        r#"confab_frames_rejected_total{reason="bad_frame"} >= 2"#,
        r#"confab_frames_rejected_total{reason="unknown_type"} >= 2"#,
        r#"confab_connections_rejected_total{reason="unauthorized"} >= 2"#,
        "confab_slow_consumers_total >= 2",
        "confab_signins_total >= 12",
        "sum(rate(confab_call_setup_seconds_count[1m])) > 0",
        "sum(rate(confab_message_delivery_seconds_count[1m])) > 0",
        "confab_cluster_nats_connected == 1",
        // Every directory write of the traffic landed, and the gauge says so once idle.
        "confab_cluster_directory_writes_pending == 0",
        "confab_cluster_envelopes_dropped_total == 0",
        "sum(confab_cluster_envelopes_resent_total) == 0",
        "confab_cluster_nodes == 1",
    ];
    prom.wait_until_all(&moved).await;

    for raw in &exprs {
        let expr = substitute(raw);
        let series = prom
            .query(&expr)
            .await
            .unwrap_or_else(|e| panic!("dashboard query {raw:?} failed: {e}"));
        assert!(
            !series.is_empty(),
            "dashboard query returned no series: {expr}"
        );
        let values: Vec<f64> = series.iter().map(sample_value).collect();
        println!("{:>2} series {values:?}: {expr}", series.len());
        if expr.contains("histogram_quantile") {
            for s in &series {
                let v = sample_value(s);
                assert!(v.is_finite() && v >= 0.0, "latency quantile {expr} is {v}");
            }
        }
    }

    // The other way round: every family the node exports has a panel.
    let (status, _, text) = http_get(metrics_addr, "/metrics").await;
    assert_eq!(status, 200);
    let exported: BTreeSet<String> = text
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split_whitespace().next())
        .map(str::to_owned)
        .collect();
    let shown: BTreeSet<String> = names
        .iter()
        .map(|n| n.trim_end_matches("_bucket").to_owned())
        .collect();
    let missing: Vec<_> = exported.difference(&shown).collect();
    assert!(
        missing.is_empty(),
        "metrics the node exports but the dashboard does not show: {missing:?}"
    );

    drop(prom);
    node.shutdown();
    drop(nats);
    assert!(
        started.elapsed() < Duration::from_secs(60),
        "the dashboard test took {:?}",
        started.elapsed()
    );
}

/// Every kind of traffic the dashboard shows, for users tagged `tag` (so phases do not mix).
async fn traffic(addr: SocketAddr, tag: &str) {
    let user = |name: &str| format!("sip:{name}-{tag}@example.com");
    let mut alice = Raw::sign_in(addr, &user("alice"), "laptop").await;
    let mut bob1 = Raw::sign_in(addr, &user("bob"), "desk").await;
    let mut bob2 = Raw::sign_in(addr, &user("bob"), "phone").await;
    let mut carol = Raw::sign_in(addr, &user("carol"), "phone").await;

    // Presence: carol watches bob (a notification at once); bob's desk publishes its activity;
    // bob goes busy and back (a notification each, as carol's public view changes).
    let ok = carol
        .request(ClientMsg::Subscribe {
            rid: None,
            users: vec![user("bob")],
        })
        .await;
    assert!(matches!(ok, ServerMsg::Ok { .. }), "{ok:?}");
    carol.recv_until(is_presence).await;
    let ok = bob1
        .request(ClientMsg::DeviceState {
            rid: None,
            activity: Activity::Active,
            idle_ms: Some(0),
        })
        .await;
    assert!(matches!(ok, ServerMsg::Ok { .. }), "{ok:?}");
    for status in [Some(Status::Busy), None] {
        let ok = bob1
            .request(ClientMsg::SetStatus { rid: None, status })
            .await;
        assert!(matches!(ok, ServerMsg::Ok { .. }), "{ok:?}");
        carol.recv_until(is_presence).await;
    }

    // A forked call won by a click, messages both ways with acks, a normal end (200).
    let (call, _) = alice.establish(&user("bob"), Some("hi")).await;
    let (c1, _) = bob1.incoming().await;
    let (c2, _) = bob2.incoming().await;
    assert!(matches!(bob1.accept(&c1).await, ServerMsg::Ok { .. }));
    bob1.state(&c1, CallState::Established).await;
    bob2.state(&c2, CallState::Terminated).await;
    alice.state(&call, CallState::Established).await;
    for i in 0..3 {
        send_and_ack(&mut alice, &call, &mut bob1, &c1, &format!("hello {i}")).await;
    }
    send_and_ack(&mut bob1, &c1, &mut alice, &call, "hello back").await;
    terminate(&mut alice, &call).await;
    bob1.state(&c1, CallState::Terminated).await;

    // One device: offered with immediate auto-accept.
    let (call, _) = alice.establish(&user("carol"), None).await;
    let (c, immediate) = carol.incoming().await;
    assert!(immediate);
    assert!(matches!(carol.accept(&c).await, ServerMsg::Ok { .. }));
    alice.state(&call, CallState::Established).await;
    terminate(&mut carol, &c).await;
    alice.state(&call, CallState::Terminated).await;

    // Declined everywhere (603).
    let (call, _) = alice.establish(&user("bob"), None).await;
    let (c1, _) = bob1.incoming().await;
    let (c2, _) = bob2.incoming().await;
    let ok = bob1
        .request(ClientMsg::CallDecline {
            rid: None,
            call: c1.clone(),
            code: Some(603),
        })
        .await;
    assert!(matches!(ok, ServerMsg::Ok { .. }), "{ok:?}");
    let reason = alice.state(&call, CallState::Terminated).await;
    assert_eq!(reason.map(|r| r.code), Some(603));
    bob2.state(&c2, CallState::Terminated).await;

    // Cancelled by the caller while ringing (487 to the forks).
    let (call, _) = alice.establish(&user("bob"), None).await;
    let (c1, _) = bob1.incoming().await;
    let (c2, _) = bob2.incoming().await;
    terminate(&mut alice, &call).await;
    bob1.state(&c1, CallState::Terminated).await;
    bob2.state(&c2, CallState::Terminated).await;

    // Nobody signed in: 480 at once.
    let (call, _) = alice.establish(&user("dave"), None).await;
    let reason = alice.state(&call, CallState::Terminated).await;
    assert_eq!(reason.map(|r| r.code), Some(480));

    // A frame that is not MessagePack, then one of an unknown type: errors, connection kept.
    alice.send_body(&[0xc1]).await;
    alice
        .recv_until(|m| matches!(m, ServerMsg::Error { .. }))
        .await;
    let mut body = Vec::new();
    rmpv::encode::write_value(
        &mut body,
        &rmpv::Value::Map(vec![("type".into(), "frobnicate".into())]),
    )
    .unwrap();
    alice.send_body(&body).await;
    alice
        .recv_until(|m| matches!(m, ServerMsg::Error { .. }))
        .await;
    alice.ping().await;

    // A hello with a token signed by someone else: refused and closed.
    let mut intruder = Raw::connect(addr).await;
    intruder
        .send(&ClientMsg::Hello {
            resume: None,
            rid: Some(1),
            version: PROTOCOL_VERSION,
            user: user("mallet"),
            token: token_with(&user("mallet"), "not-the-secret", 3600),
            device: "pc".into(),
            agent: None,
        })
        .await;
    let frames = intruder.expect_closed().await;
    assert!(
        matches!(frames.first(), Some(ServerMsg::Error { .. })),
        "{frames:?}"
    );

    // A slow consumer: trent has more messages awaiting acks than its outbound queue holds, so
    // ending the call (each one fails with 481) overflows the queue and the node drops trent.
    let mut trent = Raw::sign_in(addr, &user("trent"), "pc").await;
    let mut peggy = Raw::sign_in(addr, &user("peggy"), "pc").await;
    let (call, _) = trent.establish(&user("peggy"), None).await;
    let (c, _) = peggy.incoming().await;
    assert!(matches!(peggy.accept(&c).await, ServerMsg::Ok { .. }));
    trent.state(&call, CallState::Established).await;
    for i in 0..SLOW_BURST {
        let rid = Some(10_000 + i);
        trent
            .send(&ClientMsg::Message {
                rid,
                call: call.clone(),
                content_type: "text/plain".into(),
                body: Body::Text(format!("unacked {i}")),
            })
            .await;
    }
    trent
        .send(&ClientMsg::CallTerminate {
            rid: None,
            call: call.clone(),
        })
        .await;
    trent.expect_closed().await;
}

fn is_presence(m: &ServerMsg) -> bool {
    matches!(m, ServerMsg::Presence { .. })
}

async fn terminate(who: &mut Raw, call: &str) {
    let ok = who
        .request(ClientMsg::CallTerminate {
            rid: None,
            call: call.to_owned(),
        })
        .await;
    assert!(matches!(ok, ServerMsg::Ok { .. }), "{ok:?}");
}

/// Every `expr` string anywhere in the dashboard (panels, rows, nested panels).
fn dashboard_exprs(v: &Value) -> Vec<String> {
    let mut out = Vec::new();
    collect_exprs(v, &mut out);
    out
}

fn collect_exprs(v: &Value, out: &mut Vec<String>) {
    match v {
        Value::Object(map) => {
            for (k, v) in map {
                match (k.as_str(), v) {
                    ("expr", Value::String(s)) => out.push(s.clone()),
                    _ => collect_exprs(v, out),
                }
            }
        }
        Value::Array(items) => items.iter().for_each(|v| collect_exprs(v, out)),
        _ => {}
    }
}

/// The `confab_*` and `process_*` series names the expressions use.
fn metric_names<'a>(exprs: impl Iterator<Item = &'a str>) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    for e in exprs {
        let mut rest = e;
        while let Some(at) = ["confab_", "process_"]
            .iter()
            .filter_map(|prefix| rest.find(prefix))
            .min()
        {
            let tail = &rest[at..];
            let end = tail
                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .unwrap_or(tail.len());
            names.insert(tail[..end].to_owned());
            rest = &tail[end..];
        }
    }
    names
}

/// Replaces the Grafana variables (`$name`, `${name}`, `${name:format}`) with plain values.
fn substitute(expr: &str) -> String {
    let mut out = expr.to_owned();
    for (name, value) in VARIABLES {
        // Longest forms first; `__rate_interval` before `__range` is safe as neither prefixes
        // the other.
        let braced = format!("${{{name}}}");
        out = out.replace(&braced, value);
        while let Some(at) = out.find(&format!("${{{name}:")) {
            let end = out[at..].find('}').map(|e| at + e + 1).unwrap();
            out.replace_range(at..end, value);
        }
        let plain = format!("${name}");
        let mut from = 0;
        while let Some(at) = out[from..].find(&plain).map(|a| a + from) {
            let after = out[at + plain.len()..].chars().next();
            if after.is_some_and(|c| c.is_ascii_alphanumeric() || c == '_') {
                from = at + plain.len();
                continue;
            }
            out.replace_range(at..at + plain.len(), value);
            from = at + value.len();
        }
    }
    assert!(
        !out.contains('$'),
        "unknown Grafana variable left in {expr:?} -> {out:?}"
    );
    out
}

fn sample_value(series: &Value) -> f64 {
    series["value"][1]
        .as_str()
        .and_then(|s| s.parse().ok())
        .unwrap_or(f64::NAN)
}

/// The `prometheus` binary on an ephemeral port, scraping one target every second; killed (and
/// its storage removed) on drop.
struct Prometheus {
    child: Child,
    dir: PathBuf,
    addr: SocketAddr,
}

impl Prometheus {
    async fn start(target: SocketAddr) -> Prometheus {
        let bin = find_prometheus().unwrap_or_else(|| {
            panic!(
                "the `prometheus` binary is not installed (looked at $PROMETHEUS_BIN, on PATH \
                 and in /usr/bin); scripts/test installs it (apt-get install prometheus)"
            )
        });
        let mut last_error = String::new();
        // The free port is found by binding and releasing it; retry if someone takes it first.
        for _ in 0..3 {
            match Prometheus::try_start(&bin, target).await {
                Ok(p) => return p,
                Err(e) => last_error = e,
            }
        }
        panic!("prometheus did not start: {last_error}");
    }

    async fn try_start(bin: &Path, target: SocketAddr) -> Result<Prometheus, String> {
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_nanos();
        let dir =
            std::env::temp_dir().join(format!("confab-dashboard-{}-{nanos}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let config = dir.join("prometheus.yml");
        std::fs::write(
            &config,
            format!(
                "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n\
                 scrape_configs:\n  - job_name: confab\n    scrape_interval: 1s\n    \
                 scrape_timeout: 1s\n    static_configs:\n      - targets: [\"{target}\"]\n"
            ),
        )
        .unwrap();
        let addr = free_port();
        let log = std::fs::File::create(dir.join("prometheus.log")).unwrap();
        let child = Command::new(bin)
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("data").display()
            ))
            .arg(format!("--web.listen-address={addr}"))
            .arg("--log.level=warn")
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .map_err(|e| format!("cannot run {}: {e}", bin.display()))?;
        let mut prom = Prometheus { child, dir, addr };
        let deadline = Instant::now() + SCRAPE_DEADLINE;
        loop {
            if let Ok(Some(status)) = prom.child.try_wait() {
                return Err(format!("prometheus exited ({status}): {}", prom.log()));
            }
            if let Ok((200, _, _)) = try_http_get(addr, "/-/ready").await {
                return Ok(prom);
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "not ready within {SCRAPE_DEADLINE:?}: {}",
                    prom.log()
                ));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("prometheus.log")).unwrap_or_default()
    }

    /// Evaluates `promql` now; the series of the resulting vector, or why it failed.
    async fn query(&self, promql: &str) -> Result<Vec<Value>, String> {
        let target = format!("/api/v1/query?query={}", percent_encode(promql));
        let (status, _, body) = try_http_get(self.addr, &target)
            .await
            .map_err(|e| format!("cannot reach prometheus: {e}"))?;
        let v: Value =
            serde_json::from_str(&body).map_err(|e| format!("HTTP {status}: {e}: {body}"))?;
        if v["status"] != "success" {
            return Err(format!("HTTP {status}: {body}"));
        }
        match &v["data"]["result"] {
            Value::Array(series) => Ok(series.clone()),
            // A scalar or string result is one value, never empty.
            other => Ok(vec![serde_json::json!({ "value": other })]),
        }
    }

    /// Waits until Prometheus has scraped a series of each of `names`.
    async fn wait_for_names(&self, names: &BTreeSet<String>) {
        let deadline = Instant::now() + SCRAPE_DEADLINE;
        loop {
            let present: BTreeSet<String> = self
                .query(r#"count by (__name__) ({__name__=~"confab_.*|process_.*"})"#)
                .await
                .unwrap_or_default()
                .iter()
                .filter_map(|s| s["metric"]["__name__"].as_str().map(str::to_owned))
                .collect();
            let missing: Vec<_> = names.difference(&present).collect();
            if missing.is_empty() {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "the dashboard uses metrics Prometheus never scraped from the node: {missing:?} \
                 (scraped: {present:?})"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Waits until every query returns at least one series (a filter such as `>= 2` holds).
    async fn wait_until_all(&self, queries: &[&str]) {
        let deadline = Instant::now() + SCRAPE_DEADLINE;
        loop {
            let mut unmet = Vec::new();
            for q in queries {
                match self.query(q).await {
                    Ok(series) if !series.is_empty() => {}
                    Ok(_) => unmet.push(q.to_string()),
                    Err(e) => panic!("query {q} failed: {e}"),
                }
            }
            if unmet.is_empty() {
                return;
            }
            if Instant::now() > deadline {
                let mut detail = Vec::new();
                for q in &unmet {
                    // The same query without its filter shows the current value.
                    let bare = q.split(['>', '<']).next().unwrap_or(q).trim();
                    detail.push(format!("{q}: now {:?}", self.query(bare).await));
                }
                panic!("counters did not move as expected:\n{}", detail.join("\n"));
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// `$PROMETHEUS_BIN` when set, else `prometheus` on the PATH or in the usual directories.
fn find_prometheus() -> Option<PathBuf> {
    if let Some(bin) = std::env::var_os("PROMETHEUS_BIN") {
        let bin = PathBuf::from(bin);
        return bin.is_file().then_some(bin);
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain([PathBuf::from("/usr/bin"), PathBuf::from("/usr/local/bin")])
        .map(|d| d.join("prometheus"))
        .find(|p| p.is_file())
}

fn free_port() -> SocketAddr {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap()
}

fn percent_encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}
