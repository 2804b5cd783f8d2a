//! Metric names (design §5) and the Prometheus recorder. Names are `confab_<area>_<what>`;
//! labels never carry a user or endpoint id, so cardinality stays fixed.

use crate::fork::Cause;
use confab_protocol::CallState;
use metrics::{Counter, Gauge, Histogram};
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
pub const LIMITS_TRIPPED: &str = "confab_limits_tripped_total";
pub const CLUSTER_NODES: &str = "confab_cluster_nodes";
pub const CLUSTER_ENVELOPES: &str = "confab_cluster_envelopes_total";
pub const CLUSTER_BATCHED_ENVELOPES: &str = "confab_cluster_batched_envelopes_total";
pub const CLUSTER_DIRECTORY_ENDPOINTS: &str = "confab_cluster_directory_endpoints";
pub const CLUSTER_NATS_CONNECTED: &str = "confab_cluster_nats_connected";
pub const CLUSTER_DIRECTORY_WRITES_PENDING: &str = "confab_cluster_directory_writes_pending";
pub const CLUSTER_ENVELOPES_DROPPED: &str = "confab_cluster_envelopes_dropped_total";
pub const CLUSTER_ENVELOPES_RESENT: &str = "confab_cluster_envelopes_resent_total";
pub const BUILD_INFO: &str = "confab_build_info";
pub const TLS_HANDSHAKES: &str = "confab_tls_handshakes_total";
pub const TOKENS_REFUSED: &str = "confab_tokens_refused_total";
pub const TLS_RELOADS: &str = "confab_tls_reloads_total";
pub const TLS_CERT_EXPIRY: &str = "confab_tls_cert_expiry_timestamp_seconds";
pub const CLUSTER_LINK_TLS_RELOADS: &str = "confab_cluster_link_tls_reloads_total";
pub const CLUSTER_SIGN_IN_SYNC_FAILURES: &str = "confab_cluster_sign_in_sync_failures_total";
pub const CLUSTER_DIRECTORY_DEGRADED: &str = "confab_cluster_directory_degraded";
pub const CLUSTER_KV_REPLICAS: &str = "confab_cluster_kv_replicas";
pub const CLUSTER_DIRECT_LINKS: &str = "confab_cluster_direct_links";
pub const CLUSTER_DIRECT_PAYLOADS: &str = "confab_cluster_direct_payloads_total";
pub const CLUSTER_DIRECT_LINK_EVENTS: &str = "confab_cluster_direct_link_events_total";
pub const ADMIN_REQUESTS: &str = "confab_admin_requests_total";
pub const SESSIONS_KICKED: &str = "confab_sessions_kicked_total";
pub const WEBSOCKET_UPGRADES: &str = "confab_websocket_upgrades_total";
pub const WEBSOCKET_REJECTIONS: &str = "confab_websocket_rejections_total";
pub const RESUMES: &str = "confab_resumes_total";
pub const SESSIONS_HELD: &str = "confab_sessions_held";
pub const SESSION_HOLDS: &str = "confab_session_holds_total";

/// Label values of `result` in [`RESUMES`]: `ok`, then each refusal's.
pub const RESUME_RESULTS: &[&str] = &[
    "ok",
    "unknown",
    "already_resumed",
    "window_over",
    "seen_ahead",
    "seen_behind",
    "sent_behind",
    "node_gone",
];

/// Label values of `end` in [`SESSION_HOLDS`].
pub const HOLD_ENDS: &[&str] = &["resumed", "expired", "ended"];

/// Label values of `result` in [`ADMIN_REQUESTS`].
pub const ADMIN_RESULTS: &[&str] = &["ok", "unauthorized", "bad_request", "not_found", "conflict"];

/// Label values of [`LIMITS_TRIPPED`].
pub const LIMITS: &[&str] = &[
    "calls_per_endpoint",
    "subscriptions_per_endpoint",
    "unacked_per_call",
    "heartbeat_timeout",
    "outbound_queue_bytes",
    "presence_updates_per_second",
    "connections_per_address",
    "new_connections_per_address",
    "max_unseen_frames",
];

/// Counts one refusal by `limit` (one of [`LIMITS`]).
pub fn limit_tripped(limit: &'static str) {
    metrics::counter!(LIMITS_TRIPPED, "limit" => limit).increment(1);
}

/// Counts one message answered `message_failed` with `code` (a message is counted once, by
/// the node of the client that gets the answer).
pub fn message_failed(code: u16) {
    metrics::counter!(MESSAGES, "result" => crate::reasons::message_result_label(code))
        .increment(1);
}

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

/// Describes every metric and registers each at zero (with its known label values), so a fresh
/// node exports the whole catalogue and `rate()` sees the first burst of traffic.
/// The process's own metrics (`process_cpu_seconds_total`, `process_resident_memory_bytes`,
/// `process_open_fds`, `process_max_fds`, ...), read from the OS at each scrape.
fn process() -> &'static metrics_process::Collector {
    static PROCESS: std::sync::OnceLock<metrics_process::Collector> = std::sync::OnceLock::new();
    PROCESS.get_or_init(metrics_process::Collector::default)
}

/// Reads the process's metrics now (before a scrape is rendered).
pub fn collect_process() {
    process().collect();
}

pub fn describe_all() {
    describe_gauge!(
        BUILD_INFO,
        "1, labelled with the node's version: which build each node runs"
    );
    metrics::gauge!(BUILD_INFO, "version" => env!("CARGO_PKG_VERSION")).set(1.0);
    for result in ["ok", "failed"] {
        metrics::counter!(TLS_HANDSHAKES, "result" => result).absolute(0);
        metrics::counter!(TLS_RELOADS, "result" => result).absolute(0);
        metrics::counter!(CLUSTER_LINK_TLS_RELOADS, "result" => result).absolute(0);
    }
    for check in crate::auth::TokenRefusal::ALL {
        metrics::counter!(TOKENS_REFUSED, "check" => check.label()).absolute(0);
    }
    describe_counter!(
        TLS_HANDSHAKES,
        "TLS handshakes on the client port, by result (ok; failed: not TLS, no common version \
         or cipher, a bad or missing client certificate, a resumed session whose client \
         certificate no longer verifies, or not finished within \
         server.tls_handshake_timeout_ms); 0 without [tls]"
    );
    describe_counter!(
        TOKENS_REFUSED,
        "Sign-in tokens refused, by the check that failed (malformed, algorithm, unknown_key, \
         signature, expired, not_yet_valid, issuer, audience, missing_claim, wrong_user)"
    );
    describe_counter!(
        TLS_RELOADS,
        "Reloads of the client port's TLS certificate, key and client CA (SIGHUP, POST \
         /admin/reload), by result (ok; failed: the old ones stay); 0 without [tls]"
    );
    describe_counter!(
        CLUSTER_LINK_TLS_RELOADS,
        "Reloads of the link TLS certificates, key and CA (SIGHUP, POST /admin/reload), by \
         result (ok; failed: the old ones stay); 0 without cluster.link_tls_*"
    );
    describe_gauge!(
        TLS_CERT_EXPIRY,
        "When a certificate the node uses expires (its notAfter, Unix seconds), by cert \
         (client, client_ca: [tls]; link, link_ca: cluster.link_tls_*; a CA's is its first to \
         expire), as last read; absent without it"
    );
    describe_counter!(
        ADMIN_REQUESTS,
        "Requests to the admin API (/admin/…), by result (ok, unauthorized: a missing or wrong \
         token, bad_request, not_found: nothing matched, conflict: a drain while draining); 0 \
         without [admin] token_file"
    );
    describe_counter!(
        SESSIONS_KICKED,
        "Sessions an operator ended through the admin API (the client hears `kicked`)"
    );
    for result in ADMIN_RESULTS {
        metrics::counter!(ADMIN_REQUESTS, "result" => *result).absolute(0);
    }
    metrics::counter!(SESSIONS_KICKED).absolute(0);
    describe_counter!(
        WEBSOCKET_UPGRADES,
        "Connections upgraded to a WebSocket on the [server.websocket] listener"
    );
    describe_counter!(
        WEBSOCKET_REJECTIONS,
        "WebSocket requests and connections refused, by reason (origin, client_certificate: 403; \
         bad_request: 400; upgrade_required, version: 426; not_found: 404; method: 405; \
         text_message: close \
         1003; too_large: close 1009; empty: close 1007; protocol: close 1002)"
    );
    metrics::counter!(WEBSOCKET_UPGRADES).absolute(0);
    describe_counter!(
        RESUMES,
        "Resumes of a held session (hello with resume.endpoint), by result (ok, or the refusal: \
         unknown, already_resumed, window_over, seen_ahead, seen_behind, sent_behind, node_gone)"
    );
    describe_gauge!(
        SESSIONS_HELD,
        "Resumable sessions whose connection dropped, held for session.resume_window_ms"
    );
    describe_counter!(
        SESSION_HOLDS,
        "Holds of a resumable session that ended, by how (resumed; expired: the window passed \
         and the endpoint ended as lost; ended: the endpoint ended otherwise while held)"
    );
    for result in RESUME_RESULTS {
        metrics::counter!(RESUMES, "result" => *result).absolute(0);
    }
    for end in HOLD_ENDS {
        metrics::counter!(SESSION_HOLDS, "end" => *end).absolute(0);
    }
    metrics::gauge!(SESSIONS_HELD).set(0.0);
    for reason in crate::websocket::rejection_labels() {
        metrics::counter!(WEBSOCKET_REJECTIONS, "reason" => reason).absolute(0);
    }
    process().describe();
    process().collect();
    use metrics::{Unit, describe_counter, describe_gauge, describe_histogram};
    describe_gauge!(
        CONNECTIONS,
        "Open client connections (TCP, TLS and WebSocket)"
    );
    describe_counter!(CONNECTIONS_TOTAL, "Client connections accepted");
    describe_counter!(CONNECTIONS_REJECTED, "Connections refused, by reason");
    describe_gauge!(ENDPOINTS, "Signed-in endpoints");
    describe_counter!(SIGNINS, "Successful sign-ins (hello)");
    describe_gauge!(CALLS, "Call legs alive");
    describe_gauge!(CALLS_BY_STATE, "Call legs by state");
    describe_counter!(CALL_TRANSITIONS, "Call state transitions, by new state");
    describe_counter!(CALL_OUTCOMES, "Call legs ended, by reason code");
    describe_histogram!(
        CALL_SETUP_SECONDS,
        Unit::Seconds,
        "Outbound establish to established"
    );
    describe_gauge!(ARBITERS, "Fork arbiters in flight");
    describe_counter!(FORK_DECISIONS, "Fork arbiter decisions, by cause");
    describe_counter!(MESSAGES, "Messages answered, by result");
    describe_histogram!(
        MESSAGE_DELIVERY_SECONDS,
        Unit::Seconds,
        "Message sent to acked"
    );
    describe_counter!(PRESENCE_PUBLICATIONS, "device_state publications");
    describe_counter!(
        PRESENCE_NOTIFICATIONS,
        "presence events sent to subscribers"
    );
    describe_counter!(FRAMES_REJECTED, "Client frames rejected, by reason");
    describe_counter!(SLOW_CONSUMERS, "Clients dropped for not reading");
    describe_counter!(
        LIMITS_TRIPPED,
        "Requests refused or endpoints dropped by a limit, by limit"
    );
    describe_gauge!(
        CLUSTER_DIRECT_LINKS,
        "Direct links to other nodes up now, by direction (out: dialed by this node, which \
         sends over them; in: accepted) (cluster.link_listen only)"
    );
    describe_counter!(
        CLUSTER_DIRECT_PAYLOADS,
        "NATS-sized payloads (a batch of envelopes, or one) carried over direct links instead \
         of NATS, by direction (cluster.link_listen only)"
    );
    describe_counter!(
        CLUSTER_DIRECT_LINK_EVENTS,
        "Direct links' events: up, down, dial_failed, refused (a handshake that failed: wrong \
         secret, a dead run), overflow (envelopes waited too long for their marker over NATS), \
         late_dropped (a payload read after its link's close was marked), stalled (a link \
         whose writer fell behind a quarter of cluster.node_timeout_ms, given up for NATS) \
         (cluster.link_listen only)"
    );
    describe_gauge!(
        CLUSTER_NODES,
        "Cluster nodes this node sees alive, itself included (cluster mode only)"
    );
    describe_counter!(
        CLUSTER_ENVELOPES,
        "Envelopes exchanged with other cluster nodes, by direction (cluster mode only)"
    );
    describe_counter!(
        CLUSTER_BATCHED_ENVELOPES,
        "Envelopes published to other nodes inside a batch, several for one node in one NATS \
         message (cluster mode only)"
    );
    describe_gauge!(
        CLUSTER_DIRECTORY_ENDPOINTS,
        "Directory records this node knows: its own endpoints and its cache of the other nodes' \
         (cluster mode only)"
    );
    describe_gauge!(
        CLUSTER_NATS_CONNECTED,
        "1 while the node's NATS connection is up, 0 while it is down (cluster mode only)"
    );
    describe_gauge!(
        CLUSTER_DIRECTORY_WRITES_PENDING,
        "Writes of this node's directory records not yet landed in NATS, one per record at \
         most (cluster mode only)"
    );
    describe_counter!(
        CLUSTER_ENVELOPES_DROPPED,
        "Envelopes that clients' requests drive (messages, acks, composing, call requests, \
         forks) not sent to another node because cluster.max_queued_envelopes or \
         max_queued_bytes already waited for the NATS client (cluster mode only)"
    );
    describe_counter!(
        CLUSTER_ENVELOPES_RESENT,
        "Envelopes sent to another node again because their answer had not come (kind: event, \
         a call's state event; leg_ended; endpoint_lost); core NATS delivers at most once \
         (cluster mode only)"
    );
    describe_counter!(
        CLUSTER_SIGN_IN_SYNC_FAILURES,
        "Sign-ins whose record did not land in the directory in time (why=directory: refused, \
         overloaded) or that some other node had not read in time (why=node: welcomed anyway) \
         within cluster.sign_in_sync_timeout_ms (cluster mode only)"
    );
    describe_gauge!(
        CLUSTER_DIRECTORY_DEGRADED,
        "1 while this node's directory writes fail (from a failed attempt until one lands) or \
         its directory watch is being made again; /health answers 503 meanwhile (cluster mode \
         only)"
    );
    describe_gauge!(
        CLUSTER_KV_REPLICAS,
        "Replicas of the directory bucket, as JetStream reports it (cluster mode only)"
    );

    for g in [CONNECTIONS, ENDPOINTS, CALLS, ARBITERS] {
        metrics::gauge!(g).set(0.0);
    }
    for c in [
        CONNECTIONS_TOTAL,
        SIGNINS,
        PRESENCE_PUBLICATIONS,
        PRESENCE_NOTIFICATIONS,
        SLOW_CONSUMERS,
    ] {
        metrics::counter!(c).absolute(0);
    }
    for cause in [
        "immediate",
        "click",
        "timeout",
        "declined",
        "no_endpoints",
        "cancelled",
        "unanswered",
    ] {
        metrics::counter!(FORK_DECISIONS, "cause" => cause).absolute(0);
    }
    for reason in [
        "bad_frame",
        "frame_too_large",
        "unknown_type",
        "rate_limited",
    ] {
        metrics::counter!(FRAMES_REJECTED, "reason" => reason).absolute(0);
    }
    for limit in LIMITS {
        metrics::counter!(LIMITS_TRIPPED, "limit" => *limit).absolute(0);
    }
    for result in ["delivered", "408", "413", "415", "481", "503"] {
        metrics::counter!(MESSAGES, "result" => result).absolute(0);
    }
    for state in confab_protocol::CallState::ALL {
        metrics::gauge!(CALLS_BY_STATE, "state" => state.as_str()).increment(0.0);
        metrics::counter!(CALL_TRANSITIONS, "state" => state.as_str()).absolute(0);
    }
    for code in [
        "200", "202", "302", "408", "480", "483", "486", "487", "488", "503", "603",
    ] {
        metrics::counter!(CALL_OUTCOMES, "code" => code).absolute(0);
    }
    for reason in [
        "not_authenticated",
        "unauthorized",
        "bad_frame",
        "frame_too_large",
        "unsupported_version",
        "overloaded",
        "hello_timeout",
        "endpoints_per_user",
        "max_connections",
        "directory_unavailable",
        "tls",
        "connections_per_address",
        "new_connections_per_address",
        "proxy_header",
        "proxy_untrusted",
    ] {
        metrics::counter!(CONNECTIONS_REJECTED, "reason" => reason).absolute(0);
    }
    // Registering a histogram makes it render (all buckets at zero) before its first sample.
    let _ = metrics::histogram!(CALL_SETUP_SECONDS);
    let _ = metrics::histogram!(MESSAGE_DELIVERY_SECONDS);
}

/// Call outcome codes with a cached counter; any other code is looked up when it occurs.
const OUTCOME_CODES: [u16; 11] = [200, 202, 302, 408, 480, 483, 486, 487, 488, 503, 603];

/// Handles of the metrics updated on every call transition and every message, taken once.
/// The `metrics!` macros build a key, hash its labels and look it up in the registry at every
/// use, which a profile of the `calls` scenario put at several percent of the node's time.
pub struct Hot {
    pub calls: Gauge,
    pub arbiters: Gauge,
    pub endpoints: Gauge,
    pub messages_delivered: Counter,
    pub message_delivery: Histogram,
    /// Cluster: envelopes published to and received from other nodes (one of each per
    /// cross-node message at least, so the registry's look-up per increment showed in profiles).
    pub envelopes_out: Counter,
    pub envelopes_in: Counter,
    pub call_setup: Histogram,
    /// `confab_fork_decisions_total`, one per [`Cause`] (every forked call counts one).
    decisions: [Counter; Cause::ALL.len()],
    by_state: [Gauge; CallState::ALL.len()],
    transitions: [Counter; CallState::ALL.len()],
    outcomes: [Counter; OUTCOME_CODES.len()],
}

impl Hot {
    /// The gauge of legs currently in `state`.
    pub fn in_state(&self, state: CallState) -> &Gauge {
        &self.by_state[state_index(state)]
    }

    /// Counts one transition into `state`.
    pub fn transition(&self, state: CallState) {
        self.transitions[state_index(state)].increment(1);
    }

    /// Counts one call decided, for `cause`.
    pub fn decided(&self, cause: Cause) {
        let i = Cause::ALL.iter().position(|c| *c == cause);
        if let Some(counter) = i.and_then(|i| self.decisions.get(i)) {
            counter.increment(1);
        }
    }

    /// Counts one leg ended with `code`.
    pub fn outcome(&self, code: u16) {
        match OUTCOME_CODES.iter().position(|c| *c == code) {
            Some(i) => self.outcomes[i].increment(1),
            None => metrics::counter!(CALL_OUTCOMES, "code" => code.to_string()).increment(1),
        }
    }
}

fn state_index(state: CallState) -> usize {
    CallState::ALL
        .iter()
        .position(|s| *s == state)
        .unwrap_or_default()
}

/// The cached handles. Taken from the global recorder at first use, which is after the node
/// installed it ([`recorder`] runs before any endpoint can exist); without a recorder (unit
/// tests) they are no-ops, as the macros would be.
pub fn hot() -> &'static Hot {
    static HOT: OnceLock<Hot> = OnceLock::new();
    HOT.get_or_init(|| Hot {
        calls: metrics::gauge!(CALLS),
        arbiters: metrics::gauge!(ARBITERS),
        endpoints: metrics::gauge!(ENDPOINTS),
        messages_delivered: metrics::counter!(MESSAGES, "result" => "delivered"),
        message_delivery: metrics::histogram!(MESSAGE_DELIVERY_SECONDS),
        envelopes_out: metrics::counter!(CLUSTER_ENVELOPES, "direction" => "out"),
        envelopes_in: metrics::counter!(CLUSTER_ENVELOPES, "direction" => "in"),
        call_setup: metrics::histogram!(CALL_SETUP_SECONDS),
        decisions: Cause::ALL.map(|c| metrics::counter!(FORK_DECISIONS, "cause" => c.label())),
        by_state: CallState::ALL.map(|s| metrics::gauge!(CALLS_BY_STATE, "state" => s.as_str())),
        transitions: CallState::ALL
            .map(|s| metrics::counter!(CALL_TRANSITIONS, "state" => s.as_str())),
        outcomes: OUTCOME_CODES.map(|c| metrics::counter!(CALL_OUTCOMES, "code" => c.to_string())),
    })
}
