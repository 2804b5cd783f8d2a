//! The Prometheus alert rules (`grafana/alerts.yml`): valid for `promtool check rules`, passing
//! their unit tests (`grafana/alerts_test.yml`, `promtool test rules`), and naming only metrics
//! a real cluster node exports, so a renamed metric cannot leave an alert that never fires.

use confab_tests::*;
use std::collections::BTreeSet;
use std::process::Command;

const GRAFANA: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../grafana");

/// Runs `promtool ARGS` in `grafana/`; panics with its output unless it succeeds.
fn promtool(args: &[&str]) -> String {
    let bin = std::env::var("PROMTOOL").unwrap_or_else(|_| "promtool".to_owned());
    let out = Command::new(&bin)
        .args(args)
        .current_dir(GRAFANA)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {bin} (install prometheus): {e}"));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "promtool {args:?}:\n{text}");
    text
}

#[test]
fn the_alert_rules_are_valid_and_pass_their_unit_tests() {
    let checked = promtool(&["check", "rules", "alerts.yml"]);
    assert!(checked.contains("SUCCESS: 12 rules found"), "{checked}");
    promtool(&["test", "rules", "alerts_test.yml"]);
    promtool(&["check", "config", "prometheus.yml"]);
}

/// The metric names in the rules' `expr` lines (words that look like metric names).
fn alert_metrics() -> BTreeSet<String> {
    let rules = std::fs::read_to_string(format!("{GRAFANA}/alerts.yml"))
        .expect("grafana/alerts.yml is readable");
    rules
        .lines()
        .filter_map(|l| l.trim().strip_prefix("expr:"))
        .flat_map(|expr| {
            expr.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .filter(|w| w.starts_with("confab_") || w.starts_with("process_"))
                .map(str::to_owned)
                .collect::<Vec<_>>()
        })
        .collect()
}

#[tokio::test]
async fn every_metric_the_alerts_name_is_exported_by_a_cluster_node() {
    let nats = NatsServer::start();
    // With link TLS: the certificate expiry gauge is exported only by a node that has one.
    let pki = confab_tests::pki::Pki::new("alerts");
    let node = start_cluster_node(&nats, "alerts", |s| pki.with_link_tls(s));
    let addr = node.metrics_addr.expect("the test node serves metrics");
    let (status, _, text) = http_get(addr, "/metrics").await;
    assert_eq!(status, 200);
    let exported: BTreeSet<&str> = text
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split_whitespace().next())
        .collect();
    let named = alert_metrics();
    assert!(named.len() >= 8, "{named:?}");
    let missing: Vec<&String> = named
        .iter()
        .filter(|m| !exported.contains(m.as_str()))
        .collect();
    assert!(
        missing.is_empty(),
        "alerts name metrics no node exports: {missing:?}"
    );
    node.shutdown();
}
