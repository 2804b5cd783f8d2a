//! Metric names (design §5) and the Prometheus recorder. Names are `confab_<area>_<what>`;
//! labels never carry a user or endpoint id, so cardinality stays fixed.

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use std::sync::OnceLock;

pub const CONNECTIONS: &str = "confab_connections";
pub const CONNECTIONS_TOTAL: &str = "confab_connections_accepted_total";
pub const CONNECTIONS_REJECTED: &str = "confab_connections_rejected_total";
pub const ENDPOINTS: &str = "confab_endpoints";
pub const SIGNINS: &str = "confab_signins_total";
pub const CALLS: &str = "confab_calls";
pub const CALLS_BY_STATE: &str = "confab_calls_by_state";
pub const CALL_TRANSITIONS: &str = "confab_call_transitions_total";
pub const CALL_OUTCOMES: &str = "confab_call_outcomes_total";
pub const CALL_SETUP_SECONDS: &str = "confab_call_setup_seconds";
pub const ARBITERS: &str = "confab_fork_arbiters";
pub const FORK_DECISIONS: &str = "confab_fork_decisions_total";
pub const MESSAGES: &str = "confab_messages_total";
pub const MESSAGE_DELIVERY_SECONDS: &str = "confab_message_delivery_seconds";
pub const PRESENCE_PUBLICATIONS: &str = "confab_presence_publications_total";
pub const PRESENCE_NOTIFICATIONS: &str = "confab_presence_notifications_total";
pub const FRAMES_REJECTED: &str = "confab_frames_rejected_total";
pub const SLOW_CONSUMERS: &str = "confab_slow_consumers_total";
pub const CLUSTER_NODES: &str = "confab_cluster_nodes";

/// Latency buckets in seconds, explicit so histograms aggregate across nodes.
const LATENCY_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

static HANDLE: OnceLock<Option<PrometheusHandle>> = OnceLock::new();

/// Installs the process-wide recorder once (tests start several nodes in one process) and
/// returns the handle that renders `/metrics`.
pub fn recorder() -> Option<PrometheusHandle> {
    HANDLE
        .get_or_init(|| {
            let builder = PrometheusBuilder::new()
                .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), LATENCY_BUCKETS)
                .ok()?;
            let recorder = builder.build_recorder();
            let handle = recorder.handle();
            metrics::set_global_recorder(recorder).ok()?;
            Some(handle)
        })
        .clone()
}
