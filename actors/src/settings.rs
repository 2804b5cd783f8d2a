//! Node settings: the TOML of design §4 with an embedded default for every key, and
//! `CONFAB_<SECTION>_<KEY>` environment overrides. Reading files and the environment is the
//! binary's job; this module only turns their text into validated [`Settings`].

use serde::{Deserialize, Serialize};
use std::net::SocketAddr;
use std::time::Duration;
use thiserror::Error;

/// A settings problem, always naming the key at fault.
#[derive(Debug, Error)]
pub enum SettingsError {
    #[error("configuration: {0}")]
    Parse(String),
    #[error("configuration key {key}: {reason}")]
    Invalid { key: String, reason: String },
}

#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct Settings {
    pub server: Server,
    pub auth: Auth,
    pub fork: Fork,
    pub presence: Presence,
    pub flow: Flow,
    pub session: Session,
    pub limits: Limits,
    pub metrics: Metrics,
    pub admin: Admin,
    pub log: Log,
    pub cluster: Option<Cluster>,
    /// TLS on the client port (`[tls]`); absent = plain TCP.
    pub tls: Option<Tls>,
}

/// TLS on the client port: the node's certificate chain and key (PEM), and optionally the CA
/// whose certificates clients must present. A top-level section (not `[server.tls]`) so that
/// `CONFAB_TLS_CERT_FILE` and the like override it as any other key.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Tls {
    pub cert_file: std::path::PathBuf,
    pub key_file: std::path::PathBuf,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_ca_file: Option<std::path::PathBuf>,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct Server {
    pub listen: SocketAddr,
    pub max_frame: u32,
    /// Largest frame accepted before sign-in (the `hello`), so an unauthenticated connection
    /// cannot make the node hold a `max_frame` buffer.
    pub max_hello_frame: u32,
    pub heartbeat_ms: u64,
    pub max_connections: usize,
    pub hello_timeout_ms: u64,
    /// Worker threads running actors; 0 = one per CPU core.
    pub workers: usize,
    /// Node id shown in `welcome` and used as the prefix of every id this node makes.
    pub node_id: String,
    /// How long a graceful shutdown may take before the node exits anyway.
    pub shutdown_timeout_ms: u64,
    pub reconnect_after_ms: u64,
    /// Pending-connection queue of the listening socket (sign-in bursts queue here).
    pub listen_backlog: u32,
    /// Every client connection starts with a PROXY protocol v2 header (from a load balancer
    /// in front of the node), which gives the client's address; a connection without one is
    /// refused.
    pub proxy_protocol: bool,
    /// With `proxy_protocol`: the networks (CIDR, e.g. `10.0.0.0/8`) a PROXY header is taken
    /// from, that is the load balancers; a connection from anywhere else is refused. Empty:
    /// any peer (then only the balancers must be able to reach the port).
    pub proxy_trusted_from: Vec<String>,
    /// Most a TLS handshake may take (within `hello_timeout_ms`, which also covers the hello):
    /// a client that starts one and stalls is closed this early.
    pub tls_handshake_timeout_ms: u64,
    /// The WebSocket listener for browsers (`[server.websocket]`); absent = none. Last, as a
    /// table must follow the plain keys in TOML.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub websocket: Option<WebSocket>,
}

/// The WebSocket listener (`[server.websocket]`, docs/protocol.md §1 "WebSocket"): the same
/// frames as the client port, one per binary message, for browsers. It speaks TLS (`wss://`)
/// when the node has `[tls]`, with the same certificate.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct WebSocket {
    pub listen: SocketAddr,
    /// The request path the upgrade must ask for.
    #[serde(default = "default_websocket_path")]
    pub path: String,
    /// Origins (`scheme://host[:port]`) whose pages may connect, or `"*"` for any. A request
    /// without `Origin` (not a browser) and a page this listener served itself (same origin)
    /// are always let in; any other origin is refused with 403.
    #[serde(default)]
    pub allowed_origins: Vec<String>,
    /// A folder whose files the listener serves on GET for any other path (the web client,
    /// `web/`); empty = no pages (404).
    #[serde(default)]
    pub static_dir: String,
}

fn default_websocket_path() -> String {
    "/confab".to_owned()
}

impl WebSocket {
    /// A listener on `listen` with the default path, no other origin and no pages.
    pub fn new(listen: SocketAddr) -> Self {
        WebSocket {
            listen,
            path: default_websocket_path(),
            allowed_origins: Vec::new(),
            static_dir: String::new(),
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct Auth {
    /// The HS256 secret; empty (with `jwks_file`) refuses HS256 tokens.
    pub jwt_secret: String,
    /// Clock skew tolerated on `exp` and `nbf`, in seconds.
    pub leeway_s: u64,
    /// A JWK set (JSON) of an identity provider's public keys (RS256, ES256, EdDSA); empty =
    /// none. Re-read on SIGHUP.
    pub jwks_file: String,
    /// When set, a token's `iss` must be this.
    pub issuer: String,
    /// When set, a token's `aud` must hold this.
    pub audience: String,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct Fork {
    pub toast_timeout_ms: u64,
    pub auto_accept_grace_ms: u64,
    pub max_forwards: u32,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct Presence {
    pub inactive_after_ms: u64,
    pub away_after_ms: u64,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct Flow {
    pub ack_timeout_ms: u64,
    pub composing_timeout_ms: u64,
    /// Largest message body accepted (413 above it), whatever the SDP says.
    pub max_message_bytes: usize,
    /// Longest `content_type` of a message or a toast (`bad_frame` above it): it is passed on
    /// to the receiver with the body, but not counted in `max_message_bytes`.
    pub max_content_type_bytes: usize,
}

/// Resumable sessions (docs/protocol.md §3 "Resuming"): how long a dropped connection's
/// endpoint is held for its client to come back, and how much the node keeps for it.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct Session {
    /// How long an endpoint whose connection dropped is held; 0 turns resuming off.
    pub resume_window_ms: u64,
    /// Frames sent on a resumable session and not yet acknowledged with `seen`, at most.
    pub max_unseen_frames: usize,
    /// Bytes of those frames, at most.
    pub max_unseen_bytes: usize,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    /// Frames queued towards one client before it is dropped as a slow consumer.
    pub outbound_queue: usize,
    /// Bytes (approximately) queued towards one client before it is dropped as a slow consumer.
    pub outbound_queue_bytes: usize,
    pub calls_per_endpoint: usize,
    pub endpoints_per_user: usize,
    pub subscriptions_per_endpoint: usize,
    /// Messages a call leg may have waiting for an ack.
    pub unacked_per_call: usize,
    /// Sustained requests per second one connection may send (token bucket; `rate_limited`).
    pub requests_per_second: u32,
    /// Requests a connection may send in a burst above the sustained rate.
    pub request_burst: u32,
    /// Sustained presence changes (`device_state`, `set_status`) per second one connection may
    /// make: each reaches every watcher of the user (and, in a cluster, the directory bucket),
    /// so they are held well below `requests_per_second`.
    pub presence_updates_per_second: u32,
    /// Presence changes a connection may make in a burst above that rate.
    pub presence_update_burst: u32,
    /// Client connections one source address may hold open at once.
    pub connections_per_address: usize,
    /// New client connections one source address may open per second, sustained...
    pub new_connections_per_address_per_second: u32,
    /// ... and in a burst above that rate.
    pub new_connection_burst_per_address: u32,
    /// Loopback addresses (one machine, or a proxy on the same host) are not held to the two
    /// limits above.
    pub address_limits_exempt_loopback: bool,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct Metrics {
    /// Address of `GET /metrics` and `GET /health`; empty string disables it.
    pub listen: String,
    /// Connections the operations port serves at once; more wait in the listen backlog until
    /// one is done, so stuck or hostile scrapers cannot hold the node's files.
    pub max_connections: usize,
    /// How long one connection may take to send its request and read the answer.
    pub request_timeout_ms: u64,
}

/// The admin API on the operations port (docs/operations.md, "The admin API").
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct Admin {
    /// A file holding the bearer token the admin API asks for (its first line); empty = no
    /// admin API. Read at start and on SIGHUP.
    pub token_file: String,
    /// How long a cluster-wide admin query waits for the other nodes' answers.
    pub cluster_timeout_ms: u64,
    /// How long a drain waits for the clients to leave before the node stops anyway.
    pub drain_deadline_ms: u64,
}

impl Default for Admin {
    fn default() -> Self {
        Admin {
            token_file: String::new(),
            cluster_timeout_ms: 2_000,
            drain_deadline_ms: 60_000,
        }
    }
}

/// The most `metrics.max_connections` may be: far more than any monitoring needs, and within
/// what a semaphore holds.
pub const MAX_METRICS_CONNECTIONS: usize = 65_536;

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct Log {
    /// `RUST_LOG`-style filter; `RUST_LOG` itself wins when set.
    pub level: String,
    /// `text` or `json`.
    pub format: String,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Cluster {
    pub nats_url: String,
    #[serde(default)]
    pub node_id: Option<String>,
    #[serde(default)]
    pub node_timeout_ms: Option<u64>,
    /// Envelopes that clients' requests drive to other nodes (messages, acks, composing, call
    /// requests, forks) waiting for the NATS client (they pile up while NATS is away); beyond
    /// this many, new ones are not sent, and answered (see `cluster::quota`).
    #[serde(default = "default_max_queued_envelopes")]
    pub max_queued_envelopes: usize,
    /// The same bound in bytes (whichever is reached first).
    #[serde(default = "default_max_queued_bytes")]
    pub max_queued_bytes: usize,
    /// How long the node waits at start for NATS to answer before it gives up (exits non-zero).
    #[serde(default = "default_connect_timeout_ms")]
    pub connect_timeout_ms: u64,
    /// Replicas of the directory bucket, so that it survives the loss of a NATS server: the
    /// bucket is created with this many, or as many as the NATS cluster has servers if fewer.
    #[serde(default = "default_kv_replicas")]
    pub kv_replicas: usize,
    /// How long a sign-in waits for its directory record to land and for every other node to
    /// have read it before `welcome`; a record that has not landed by then refuses the
    /// sign-in (`overloaded`), a node that has not answered is logged and counted.
    #[serde(default = "default_sign_in_sync_timeout_ms")]
    pub sign_in_sync_timeout_ms: u64,
    /// Envelopes queued together for one node go as one NATS message (`cluster/src/batch.rs`);
    /// false sends each alone (and tells the other nodes to send this one each alone).
    #[serde(default = "default_batch_envelopes")]
    pub batch_envelopes: bool,
    /// Direct links (`cluster/src/direct/`): where this node listens for the other nodes'
    /// links, `host:port`; empty: no links, every envelope over NATS.
    #[serde(default)]
    pub link_listen: String,
    /// What the other nodes dial to reach `link_listen` (told in the heartbeat); empty: the
    /// listen address, which must then name an interface (not 0.0.0.0).
    #[serde(default)]
    pub link_advertise: String,
    /// The secret every node of the cluster holds: a link opens only between nodes that prove
    /// they hold it (at least 16 bytes; set it through `CONFAB_CLUSTER_LINK_SECRET`).
    #[serde(default)]
    pub link_secret: String,
    /// TLS on the direct links: this node's certificate chain (PEM), which must name
    /// `cluster.node_id` as a DNS name; empty: links in the clear (still authenticated by
    /// `link_secret`). With it, `link_tls_key_file` and `link_tls_ca_file` are required.
    #[serde(default)]
    pub link_tls_cert_file: String,
    /// The private key (PEM) of `link_tls_cert_file`.
    #[serde(default)]
    pub link_tls_key_file: String,
    /// The CA (PEM) that signs every node's link certificate: a link opens only between nodes
    /// whose certificates it signed, each checked by the other.
    #[serde(default)]
    pub link_tls_ca_file: String,
}

fn default_batch_envelopes() -> bool {
    true
}

/// `[scheme://]user:password@host` → `[scheme://]user:<redacted>@host`, a bare token
/// (`TOKEN@host`) redacted whole; anything else unchanged. The host starts after the last `@`,
/// so a password holding one does not leak.
pub fn redact_url_password(url: &str, redacted: &str) -> String {
    let (scheme, rest) = match url.split_once("://") {
        Some((scheme, rest)) => (format!("{scheme}://"), rest),
        None => (String::new(), url),
    };
    match rest.rsplit_once('@') {
        Some((userinfo, host)) => match userinfo.split_once(':') {
            Some((user, _)) => format!("{scheme}{user}:{redacted}@{host}"),
            None => format!("{scheme}{redacted}@{host}"),
        },
        None => url.to_owned(),
    }
}

fn default_kv_replicas() -> usize {
    3
}

fn default_sign_in_sync_timeout_ms() -> u64 {
    3_000
}

fn default_connect_timeout_ms() -> u64 {
    5_000
}

fn default_max_queued_bytes() -> usize {
    64 * 1024 * 1024
}

fn default_max_queued_envelopes() -> usize {
    8_192
}

impl Cluster {
    /// A cluster section naming only the NATS server; everything else at its default.
    pub fn new(nats_url: impl Into<String>) -> Self {
        Cluster {
            nats_url: nats_url.into(),
            node_id: None,
            node_timeout_ms: None,
            max_queued_envelopes: default_max_queued_envelopes(),
            max_queued_bytes: default_max_queued_bytes(),
            connect_timeout_ms: default_connect_timeout_ms(),
            kv_replicas: default_kv_replicas(),
            link_listen: String::new(),
            link_advertise: String::new(),
            link_secret: String::new(),
            link_tls_cert_file: String::new(),
            link_tls_key_file: String::new(),
            link_tls_ca_file: String::new(),
            sign_in_sync_timeout_ms: default_sign_in_sync_timeout_ms(),
            batch_envelopes: default_batch_envelopes(),
        }
    }
}

impl Default for Server {
    fn default() -> Self {
        Server {
            listen: SocketAddr::from(([127, 0, 0, 1], 5070)),
            max_frame: 65536,
            max_hello_frame: 4096,
            heartbeat_ms: 15_000,
            max_connections: 100_000,
            hello_timeout_ms: 10_000,
            workers: 0,
            node_id: "node-a".to_owned(),
            shutdown_timeout_ms: 10_000,
            reconnect_after_ms: 5_000,
            listen_backlog: 4096,
            proxy_protocol: false,
            proxy_trusted_from: Vec::new(),
            tls_handshake_timeout_ms: 5_000,
            websocket: None,
        }
    }
}

impl Default for Auth {
    fn default() -> Self {
        Auth {
            jwt_secret: "change-me".to_owned(),
            leeway_s: 30,
            jwks_file: String::new(),
            issuer: String::new(),
            audience: String::new(),
        }
    }
}

impl Default for Fork {
    fn default() -> Self {
        Fork {
            toast_timeout_ms: 10_000,
            auto_accept_grace_ms: 5_000,
            max_forwards: 8,
        }
    }
}

impl Default for Presence {
    fn default() -> Self {
        Presence {
            inactive_after_ms: 300_000,
            away_after_ms: 1_200_000,
        }
    }
}

impl Default for Flow {
    fn default() -> Self {
        Flow {
            ack_timeout_ms: 30_000,
            composing_timeout_ms: 6_000,
            max_message_bytes: 60_000,
            max_content_type_bytes: 256,
        }
    }
}

impl Default for Session {
    fn default() -> Self {
        Session {
            resume_window_ms: 30_000,
            max_unseen_frames: 1024,
            max_unseen_bytes: 4 * 1024 * 1024,
        }
    }
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            outbound_queue: 1024,
            outbound_queue_bytes: 4 * 1024 * 1024,
            calls_per_endpoint: 256,
            endpoints_per_user: 32,
            subscriptions_per_endpoint: 1000,
            unacked_per_call: 1024,
            requests_per_second: 10_000,
            request_burst: 20_000,
            presence_updates_per_second: 100,
            presence_update_burst: 200,
            connections_per_address: 1_000,
            new_connections_per_address_per_second: 100,
            new_connection_burst_per_address: 500,
            address_limits_exempt_loopback: true,
        }
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics {
            listen: "127.0.0.1:9464".to_owned(),
            max_connections: 32,
            request_timeout_ms: 5_000,
        }
    }
}

impl Default for Log {
    fn default() -> Self {
        Log {
            level: "info".to_owned(),
            format: "text".to_owned(),
        }
    }
}

impl Settings {
    /// Parses TOML text (empty = all defaults), applies `CONFAB_<SECTION>_<KEY>` overrides from
    /// `env`, and validates the result.
    pub fn load(
        toml_text: &str,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Settings, SettingsError> {
        let table: toml::Table =
            toml::from_str(toml_text).map_err(|e| SettingsError::Parse(e.to_string()))?;
        let env: Vec<(String, String)> = env.into_iter().collect();
        let settings = Self::with_env(table, &env)?;
        settings.validate()?;
        Ok(settings)
    }

    fn with_env(
        mut table: toml::Table,
        env: &[(String, String)],
    ) -> Result<Settings, SettingsError> {
        // An environment value has no type: `12345` may be a port or a secret. The type of the
        // key's default decides.
        let defaults = typed_defaults();
        for (name, value) in env {
            let Some(rest) = name.strip_prefix("CONFAB_") else {
                continue;
            };
            let rest = rest.to_ascii_lowercase();
            let Some((section, key)) = rest.split_once('_') else {
                continue;
            };
            if !SECTIONS.contains(&section) {
                continue;
            }
            let entry = table
                .entry(section.to_owned())
                .or_insert_with(|| toml::Value::Table(toml::Table::new()));
            let toml::Value::Table(section_table) = entry else {
                return Err(SettingsError::Invalid {
                    key: section.to_owned(),
                    reason: "must be a table".to_owned(),
                });
            };
            let value = match defaults.get(section).and_then(|t| t.get(key)) {
                Some(toml::Value::String(_)) => toml::Value::String(value.clone()),
                // A list of text: comma-separated in the variable.
                Some(toml::Value::Array(_)) => toml::Value::Array(
                    value
                        .split(',')
                        .map(str::trim)
                        .filter(|v| !v.is_empty())
                        .map(|v| toml::Value::String(v.to_owned()))
                        .collect(),
                ),
                _ => env_value(value),
            };
            section_table.insert(key.to_owned(), value);
        }
        toml::Value::Table(table)
            .try_into()
            .map_err(|e: toml::de::Error| SettingsError::Parse(e.to_string()))
    }

    /// These settings with every secret replaced by `<redacted>`: `auth.jwt_secret`, and the
    /// password of a `user:password@` in `cluster.nats_url`. For `confab-node --print-config`.
    pub fn redacted(&self) -> Settings {
        const REDACTED: &str = "<redacted>";
        let mut s = self.clone();
        // An empty secret (HS256 off) stays empty: printed as redacted it would load back as a
        // secret everyone knows.
        if !s.auth.jwt_secret.is_empty() {
            s.auth.jwt_secret = REDACTED.to_owned();
        }
        if let Some(c) = s.cluster.as_mut() {
            c.nats_url = c
                .nats_url
                .split(',')
                .map(|url| redact_url_password(url, REDACTED))
                .collect::<Vec<_>>()
                .join(",");
            if !c.link_secret.is_empty() {
                c.link_secret = REDACTED.to_owned();
            }
        }
        s
    }

    fn validate(&self) -> Result<(), SettingsError> {
        let invalid = |key: &str, reason: &str| {
            Err(SettingsError::Invalid {
                key: key.to_owned(),
                reason: reason.to_owned(),
            })
        };
        if !self.admin.token_file.is_empty() && self.metrics.listen.is_empty() {
            return invalid(
                "admin.token_file",
                "the admin API is served on the operations port: set metrics.listen",
            );
        }
        if !(1..=60_000).contains(&self.admin.cluster_timeout_ms) {
            return invalid("admin.cluster_timeout_ms", "must be 1-60000");
        }
        if self.server.max_frame < 64 {
            return invalid("server.max_frame", "must be at least 64 bytes");
        }
        if self.server.max_hello_frame < 512 || self.server.max_hello_frame > self.server.max_frame
        {
            return invalid(
                "server.max_hello_frame",
                "must be between 512 bytes and server.max_frame",
            );
        }
        if self.server.heartbeat_ms == 0 {
            return invalid("server.heartbeat_ms", "must be positive");
        }
        if let Some(bad) = self
            .server
            .proxy_trusted_from
            .iter()
            .find(|n| n.parse::<ipnet::IpNet>().is_err())
        {
            return Err(SettingsError::Invalid {
                key: "server.proxy_trusted_from".to_owned(),
                reason: format!("{bad:?} is not a network like 10.0.0.0/8"),
            });
        }
        if self.server.tls_handshake_timeout_ms == 0 {
            return invalid("server.tls_handshake_timeout_ms", "must be positive");
        }
        if let Some(ws) = &self.server.websocket {
            ws.validate(self.server.listen)?;
        }
        if self.server.hello_timeout_ms == 0 {
            return invalid("server.hello_timeout_ms", "must be positive");
        }
        if self.server.max_connections == 0 {
            return invalid("server.max_connections", "must be positive");
        }
        if self.server.node_id.is_empty() || self.server.node_id.contains(char::is_whitespace) {
            return invalid("server.node_id", "must be a non-empty word");
        }
        if !(1..=MAX_METRICS_CONNECTIONS).contains(&self.metrics.max_connections) {
            return invalid("metrics.max_connections", "must be between 1 and 65536");
        }
        if self.metrics.request_timeout_ms == 0 {
            return invalid("metrics.request_timeout_ms", "must be positive");
        }
        if !self.auth.jwks_file.is_empty() && self.auth.jwt_secret == Auth::default().jwt_secret {
            // With an identity provider the shared secret is easy to forget, and the default
            // is public: anyone could mint an HS256 token for any user.
            return invalid(
                "auth.jwt_secret",
                "is the public default while auth.jwks_file is set: set a secret of your own, or \"\" to refuse HS256 tokens",
            );
        }
        if self.auth.jwt_secret.is_empty() && self.auth.jwks_file.is_empty() {
            return invalid(
                "auth.jwt_secret",
                "must not be empty (unless auth.jwks_file names the identity provider's keys)",
            );
        }
        if self.presence.away_after_ms < self.presence.inactive_after_ms {
            return invalid(
                "presence.away_after_ms",
                "must not be less than presence.inactive_after_ms",
            );
        }
        if self.flow.max_message_bytes == 0
            || self.flow.max_message_bytes >= self.server.max_frame as usize
        {
            // A message's frame carries its body and more: a limit at or above the frame's would
            // never be the one that refuses a message (the frame limit closes the connection).
            return invalid(
                "flow.max_message_bytes",
                "must be positive and less than server.max_frame",
            );
        }
        if self.session.max_unseen_frames < 2 {
            return invalid("session.max_unseen_frames", "must be at least 2");
        }
        if self.session.max_unseen_bytes < 2 * self.flow.max_message_bytes {
            return invalid(
                "session.max_unseen_bytes",
                "must hold at least two messages of flow.max_message_bytes",
            );
        }
        if self.flow.max_content_type_bytes == 0 {
            return invalid("flow.max_content_type_bytes", "must be positive");
        }
        if self.flow.composing_timeout_ms <= COMPOSING_REFRESH_MS {
            return invalid(
                "flow.composing_timeout_ms",
                "must be more than 5000: clients refresh `composing` every 5 s (docs/protocol.md)",
            );
        }
        if self.limits.connections_per_address == 0 {
            return invalid("limits.connections_per_address", "must be positive");
        }
        if self.limits.new_connections_per_address_per_second == 0
            || self.limits.new_connection_burst_per_address == 0
        {
            return invalid(
                "limits.new_connections_per_address_per_second",
                "must be positive, with a positive limits.new_connection_burst_per_address",
            );
        }
        if self.limits.requests_per_second == 0 {
            return invalid("limits.requests_per_second", "must be positive");
        }
        if self.limits.request_burst == 0 {
            return invalid("limits.request_burst", "must be positive");
        }
        if self.limits.presence_updates_per_second == 0 {
            return invalid("limits.presence_updates_per_second", "must be positive");
        }
        if self.limits.presence_update_burst == 0 {
            return invalid("limits.presence_update_burst", "must be positive");
        }
        if self.limits.outbound_queue < 16 {
            return invalid("limits.outbound_queue", "must be at least 16");
        }
        if self.limits.outbound_queue_bytes < 2 * self.flow.max_message_bytes {
            return invalid(
                "limits.outbound_queue_bytes",
                "must hold at least two messages of flow.max_message_bytes",
            );
        }
        // The outbox counts its bytes in a `u32` (to fit its allocator class, outbox/mod.rs).
        if u32::try_from(self.limits.outbound_queue_bytes).is_err() {
            return invalid("limits.outbound_queue_bytes", "must be at most 4294967295");
        }
        if !self.metrics.listen.is_empty() && self.metrics.listen.parse::<SocketAddr>().is_err() {
            return invalid("metrics.listen", "must be IP:port or empty");
        }
        if let Some(c) = &self.cluster {
            if c.nats_url.trim().is_empty() {
                return invalid("cluster.nats_url", "must name a NATS server");
            }
            if let Some(id) = &c.node_id
                && (id.is_empty()
                    || !id
                        .chars()
                        .all(|ch| ch.is_ascii_alphanumeric() || ch == '-' || ch == '_'))
            {
                return invalid(
                    "cluster.node_id",
                    "must be a non-empty word of letters, digits, - and _",
                );
            }
            if c.node_timeout_ms.is_some_and(|t| t < MIN_NODE_TIMEOUT_MS) {
                return invalid("cluster.node_timeout_ms", "must be at least 100");
            }
            if c.max_queued_envelopes == 0 {
                return invalid("cluster.max_queued_envelopes", "must be positive");
            }
            if c.max_queued_bytes == 0 {
                return invalid("cluster.max_queued_bytes", "must be positive");
            }
            if c.connect_timeout_ms == 0 {
                return invalid("cluster.connect_timeout_ms", "must be positive");
            }
            if !c.link_listen.is_empty() {
                let Ok(listen) = c.link_listen.parse::<SocketAddr>() else {
                    return invalid("cluster.link_listen", "must be IP:port or empty");
                };
                if c.link_secret.len() < 16 {
                    return invalid(
                        "cluster.link_secret",
                        "must be at least 16 bytes when cluster.link_listen is set",
                    );
                }
                if c.link_advertise.is_empty() && listen.ip().is_unspecified() {
                    return invalid(
                        "cluster.link_advertise",
                        "must be set when cluster.link_listen listens on every interface",
                    );
                }
                if !c.link_advertise.is_empty()
                    && c.link_advertise
                        .rsplit_once(':')
                        .is_none_or(|(host, port)| host.is_empty() || port.parse::<u16>().is_err())
                {
                    return invalid("cluster.link_advertise", "must be host:port or empty");
                }
            }
            c.validate_link_tls()?;
            if !(1..=5).contains(&c.kv_replicas) {
                // JetStream's own bound on a stream's replicas.
                return invalid("cluster.kv_replicas", "must be between 1 and 5");
            }
            if c.sign_in_sync_timeout_ms == 0 {
                return invalid("cluster.sign_in_sync_timeout_ms", "must be positive");
            }
        }
        if !matches!(self.log.format.as_str(), "text" | "json") {
            return invalid("log.format", "must be \"text\" or \"json\"");
        }
        if let Some(word) = bare_non_level(&self.log.level) {
            return invalid(
                "log.level",
                &format!(
                    "`{word}` is not a level (trace, debug, info, warn, error, off); name a target with a level, as in `{word}=debug`"
                ),
            );
        }
        Ok(())
    }

    pub fn heartbeat(&self) -> Duration {
        Duration::from_millis(self.server.heartbeat_ms)
    }
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics.listen.parse().ok()
    }
}

impl Cluster {
    /// `link_tls_*`: all three or none, only with links, and with a node id a certificate can
    /// name. The files themselves are read at start and on reload (`confab-node --check` reads
    /// them too).
    fn validate_link_tls(&self) -> Result<(), SettingsError> {
        let invalid = |key: &str, reason: &str| {
            Err(SettingsError::Invalid {
                key: format!("cluster.{key}"),
                reason: reason.to_owned(),
            })
        };
        let files = [
            ("link_tls_cert_file", &self.link_tls_cert_file),
            ("link_tls_key_file", &self.link_tls_key_file),
            ("link_tls_ca_file", &self.link_tls_ca_file),
        ];
        let Some((set, _)) = files.iter().find(|(_, v)| !v.is_empty()) else {
            return Ok(());
        };
        if let Some((unset, _)) = files.iter().find(|(_, v)| v.is_empty()) {
            return invalid(
                unset,
                &format!(
                    "must be set with cluster.{set}: link TLS needs this node's certificate, its key and the cluster's CA"
                ),
            );
        }
        if self.link_listen.is_empty() {
            return invalid(
                set,
                "is TLS on the direct links, which are off: set cluster.link_listen",
            );
        }
        // The certificates name nodes by id (docs/architecture.md, "Direct links between
        // nodes"): a generated id changes with every start, and must be a DNS name.
        match &self.node_id {
            None => invalid(
                "node_id",
                "must be set with link TLS: the link certificates name each node by its id",
            ),
            Some(id) if rustls_pki_types::DnsName::try_from(id.as_str()).is_err() => invalid(
                "node_id",
                "must be a DNS name with link TLS (the certificates name it): not all digits, no - at either end",
            ),
            Some(_) => Ok(()),
        }
    }
}

impl WebSocket {
    fn validate(&self, client_port: SocketAddr) -> Result<(), SettingsError> {
        let invalid = |key: &str, reason: String| {
            Err(SettingsError::Invalid {
                key: format!("server.websocket.{key}"),
                reason,
            })
        };
        if self.listen.port() != 0 && self.listen == client_port {
            return invalid("listen", "must differ from server.listen".to_owned());
        }
        if !self.path.starts_with('/')
            || self
                .path
                .contains(|c: char| c.is_whitespace() || c.is_control() || c == '?' || c == '#')
        {
            return invalid(
                "path",
                format!("{:?} must start with / and hold no query", self.path),
            );
        }
        if let Some(bad) = self.allowed_origins.iter().find(|o| !is_origin(o)) {
            return invalid(
                "allowed_origins",
                format!("{bad:?} is not \"*\" or scheme://host[:port] (no path, no trailing /)"),
            );
        }
        Ok(())
    }
}

/// `*`, or an origin as browsers send it: `http://` or `https://`, a host, maybe a port.
fn is_origin(o: &str) -> bool {
    if o == "*" {
        return true;
    }
    let rest = o
        .strip_prefix("http://")
        .or_else(|| o.strip_prefix("https://"));
    rest.is_some_and(|host| {
        !host.is_empty()
            && !host.contains(['/', '?', '#', '@'])
            && !host.contains(char::is_whitespace)
    })
}

/// The first directive of a `log.level` filter that is a bare word but not a level. The filter
/// syntax reads such a word as a target to log at every level, so a misspelt level (`debg`)
/// would parse and leave the node logging almost nothing; a target must carry its level here.
fn bare_non_level(filter: &str) -> Option<&str> {
    const LEVELS: [&str; 6] = ["trace", "debug", "info", "warn", "error", "off"];
    filter.split(',').map(str::trim).find(|d| {
        !d.is_empty()
            && !d.contains(['=', '['])
            && !LEVELS.iter().any(|l| l.eq_ignore_ascii_case(d))
    })
}

/// How often clients refresh `composing` (docs/protocol.md); the node's timeout must exceed it.
const COMPOSING_REFRESH_MS: u64 = 5_000;

/// Shortest `cluster.node_timeout_ms`: heartbeats go out every third of it, and below this a
/// busy NATS server's ordinary delays would declare live nodes dead.
pub const MIN_NODE_TIMEOUT_MS: u64 = 100;

/// `cluster.node_timeout_ms` when unset: a killed node is declared dead 0.8 to 1.6 s after its
/// last heartbeat (one every 400 ms), and a heartbeat must be 800 ms late before a live one is.
/// Under the cluster benchmark's full load no live node was declared dead (BENCHMARKS.md).
pub const DEFAULT_NODE_TIMEOUT_MS: u64 = 1200;

/// The defaults as TOML, with a `[cluster]` section whose every key is present, so that an
/// environment value for any key takes that key's type (the real defaults have no cluster).
fn typed_defaults() -> toml::Table {
    let defaults = Settings {
        cluster: Some(Cluster {
            node_id: Some(String::new()),
            node_timeout_ms: Some(0),
            ..Cluster::new("")
        }),
        ..Settings::default()
    };
    toml::Table::try_from(defaults).unwrap_or_default()
}

const SECTIONS: &[&str] = &[
    "server", "auth", "fork", "presence", "flow", "session", "limits", "metrics", "admin", "log",
    "cluster", "tls",
];

/// An environment value as TOML: integers and booleans keep their type, anything else is text.
fn env_value(raw: &str) -> toml::Value {
    if let Ok(i) = raw.parse::<i64>() {
        toml::Value::Integer(i)
    } else if let Ok(b) = raw.parse::<bool>() {
        toml::Value::Boolean(b)
    } else {
        toml::Value::String(raw.to_owned())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proxy_trusted_from_takes_networks_from_the_file_or_a_comma_separated_variable() {
        let s = Settings::load(
            "",
            [(
                "CONFAB_SERVER_PROXY_TRUSTED_FROM".to_owned(),
                "10.0.0.0/8, 2001:db8::/32".to_owned(),
            )],
        )
        .expect("valid");
        assert_eq!(s.server.proxy_trusted_from, ["10.0.0.0/8", "2001:db8::/32"]);
        let bad = Settings::load("[server]\nproxy_trusted_from = [\"lb.example\"]\n", []);
        assert!(
            matches!(bad, Err(SettingsError::Invalid { ref key, .. }) if key == "server.proxy_trusted_from"),
            "{bad:?}"
        );
    }

    #[test]
    fn redacted_settings_hide_the_secret_and_a_nats_password_and_round_trip() {
        let s = Settings::load(
            "[auth]\njwt_secret = \"s3cret\"\n[cluster]\nnats_url = \"nats://u:pw@h:4222,nats://tok@h2:4222,nats://h3:4222\"\n",
            [],
        )
        .expect("valid");
        let r = s.redacted();
        assert_eq!(r.auth.jwt_secret, "<redacted>");
        assert_eq!(
            r.cluster.as_ref().map(|c| c.nats_url.as_str()),
            Some("nats://u:<redacted>@h:4222,nats://<redacted>@h2:4222,nats://h3:4222")
        );
        assert_eq!(
            redact_url_password("u:p@ss@h:4222", "<redacted>"),
            "u:<redacted>@h:4222"
        );
        let open = Settings::load("[auth]\njwt_secret = \"\"\njwks_file = \"/k.json\"\n", [])
            .expect("valid");
        assert_eq!(open.redacted().auth.jwt_secret, "", "HS256 off stays off");
        let public_default = Settings::load("[auth]\njwks_file = \"/k.json\"\n", []);
        assert!(
            matches!(public_default, Err(SettingsError::Invalid { ref key, .. }) if key == "auth.jwt_secret"),
            "the public default secret beside an identity provider: {public_default:?}"
        );
        let text = toml::to_string_pretty(&r).expect("settings print as TOML");
        assert!(!text.contains("s3cret") && !text.contains("pw@"), "{text}");
        let back = Settings::load(&text, []).expect("the printed settings load again");
        assert_eq!(back.fork.toast_timeout_ms, s.fork.toast_timeout_ms);
    }

    #[test]
    fn empty_text_gives_the_embedded_defaults() {
        let s = Settings::load("", []).expect("defaults are valid");
        assert_eq!(s.server.listen.port(), 5070);
        assert_eq!(s.fork.toast_timeout_ms, 10_000);
        assert!(s.cluster.is_none());
    }

    #[test]
    fn env_overrides_the_file() {
        let s = Settings::load(
            "[fork]\ntoast_timeout_ms = 5\n",
            [
                ("CONFAB_FORK_TOAST_TIMEOUT_MS".to_owned(), "7".to_owned()),
                ("CONFAB_AUTH_JWT_SECRET".to_owned(), "s3cret".to_owned()),
                ("PATH".to_owned(), "/bin".to_owned()),
            ],
        )
        .expect("valid");
        assert_eq!(s.fork.toast_timeout_ms, 7);
        assert_eq!(s.auth.jwt_secret, "s3cret");
    }

    #[test]
    fn an_all_digit_env_value_still_fits_a_text_key() {
        let s = Settings::load(
            "",
            [
                ("CONFAB_AUTH_JWT_SECRET".to_owned(), "12345".to_owned()),
                ("CONFAB_SERVER_HEARTBEAT_MS".to_owned(), "500".to_owned()),
            ],
        )
        .expect("valid");
        assert_eq!(s.auth.jwt_secret, "12345");
        assert_eq!(s.server.heartbeat_ms, 500);
    }

    #[test]
    fn a_bare_word_in_log_level_must_be_a_level() {
        for good in [
            "info",
            "WARN",
            "confab_actors=debug,info",
            "info, async_nats=warn",
            "confab_actors[call]=trace",
        ] {
            let text = format!("[log]\nlevel = \"{good}\"\n");
            assert!(
                Settings::load(&text, []).is_ok(),
                "{good} is a valid filter"
            );
        }
        let e = Settings::load("[log]\nlevel = \"info,debg\"\n", [])
            .expect_err("a misspelt level would read as a target and silence the node");
        assert!(e.to_string().contains("log.level"), "{e}");
        assert!(e.to_string().contains("`debg`"), "{e}");
    }

    #[test]
    fn the_cluster_section_is_checked() {
        let s = Settings::load(
            "[cluster]\nnats_url = \"nats://127.0.0.1:4222\"\nnode_id = \"node-b\"\n",
            [],
        )
        .expect("valid");
        let c = s.cluster.expect("cluster");
        assert_eq!(c.node_id.as_deref(), Some("node-b"));
        assert_eq!(c.max_queued_envelopes, 8_192);
        assert_eq!(c.max_queued_bytes, 64 << 20);
        assert_eq!(c.connect_timeout_ms, 5_000);
        let e = Settings::load("[cluster]\nnats_url = \"x\"\nnode_id = \"a.b\"\n", [])
            .expect_err("dots would break subjects and keys");
        assert!(e.to_string().contains("cluster.node_id"), "{e}");
        let e = Settings::load(
            "[cluster]\nnats_url = \"x\"\nmax_queued_envelopes = 0\n",
            [],
        )
        .expect_err("a node that can queue no envelope cannot send one to another node");
        assert!(
            e.to_string().contains("cluster.max_queued_envelopes"),
            "{e}"
        );
        let e = Settings::load("[cluster]\nnats_url = \"x\"\nmax_queued_bytes = 0\n", [])
            .expect_err("no byte may wait");
        assert!(e.to_string().contains("cluster.max_queued_bytes"), "{e}");
    }

    #[test]
    fn direct_links_need_a_secret_and_an_address_others_can_dial() {
        let load = |extra: &str| {
            Settings::load(&format!("[cluster]\nnats_url = \"x\"\n{extra}"), [])
                .map(|s| s.cluster.expect("cluster"))
        };
        let secret = "link_secret = \"0123456789abcdef\"\n";
        let c = load(&format!("link_listen = \"10.0.0.5:5090\"\n{secret}")).expect("valid");
        assert_eq!(c.link_listen, "10.0.0.5:5090");
        for (extra, key) in [
            (
                "link_listen = \"10.0.0.5:5090\"\n".to_owned(),
                "cluster.link_secret",
            ),
            (
                "link_listen = \"10.0.0.5:5090\"\nlink_secret = \"short\"\n".to_owned(),
                "cluster.link_secret",
            ),
            (
                format!("link_listen = \"nowhere\"\n{secret}"),
                "cluster.link_listen",
            ),
            (
                format!("link_listen = \"0.0.0.0:5090\"\n{secret}"),
                "cluster.link_advertise",
            ),
            (
                format!("link_listen = \"0.0.0.0:5090\"\nlink_advertise = \"host\"\n{secret}"),
                "cluster.link_advertise",
            ),
        ] {
            let e = load(&extra).expect_err(&extra);
            assert!(e.to_string().contains(key), "{extra}: {e}");
        }
        let c = load(&format!(
            "link_listen = \"0.0.0.0:5090\"\nlink_advertise = \"node-a.internal:5090\"\n{secret}"
        ))
        .expect("advertised by name");
        let shown = Settings {
            cluster: Some(c),
            ..Settings::default()
        }
        .redacted();
        assert_eq!(
            shown.cluster.map(|c| c.link_secret).as_deref(),
            Some("<redacted>")
        );
    }

    #[test]
    fn link_tls_needs_all_three_files_links_and_a_node_id_a_certificate_can_name() {
        let load = |extra: &str, env: Vec<(String, String)>| {
            Settings::load(
                &format!(
                    "[cluster]\nnats_url = \"x\"\nlink_secret = \"0123456789abcdef\"\n{extra}"
                ),
                env,
            )
            .map(|s| s.cluster.expect("cluster"))
        };
        let links = "link_listen = \"10.0.0.5:5090\"\nnode_id = \"node-a\"\n";
        let cert = "link_tls_cert_file = \"node.pem\"\n";
        let key = "link_tls_key_file = \"node-key.pem\"\n";
        let ca = "link_tls_ca_file = \"ca.pem\"\n";
        let c = load(&format!("{links}{cert}{key}{ca}"), vec![]).expect("valid");
        assert_eq!(
            (
                c.link_tls_cert_file.as_str(),
                c.link_tls_key_file.as_str(),
                c.link_tls_ca_file.as_str()
            ),
            ("node.pem", "node-key.pem", "ca.pem")
        );
        let plain = load(links, vec![]).expect("links without TLS");
        assert!(plain.link_tls_cert_file.is_empty());
        for (extra, key, why) in [
            (
                format!("{links}{cert}{ca}"),
                "cluster.link_tls_key_file",
                "a certificate without its key",
            ),
            (
                format!("{links}{key}{ca}"),
                "cluster.link_tls_cert_file",
                "a key without its certificate",
            ),
            (
                format!("{links}{cert}{key}"),
                "cluster.link_tls_ca_file",
                "no CA: the other node's certificate could not be checked",
            ),
            (
                format!("node_id = \"node-a\"\n{cert}{key}{ca}"),
                "cluster.link_listen",
                "TLS on links that are off",
            ),
            (
                format!("link_listen = \"10.0.0.5:5090\"\n{cert}{key}{ca}"),
                "cluster.node_id",
                "a generated id no certificate names",
            ),
            (
                format!("link_listen = \"10.0.0.5:5090\"\nnode_id = \"1234\"\n{cert}{key}{ca}"),
                "cluster.node_id",
                "not a DNS name",
            ),
        ] {
            let e = load(&extra, vec![]).expect_err(why);
            assert!(e.to_string().contains(key), "{why}: {e}");
        }
        // From the environment, as the other cluster keys.
        let env = [
            ("CONFAB_CLUSTER_LINK_TLS_CERT_FILE", "/etc/confab/link.pem"),
            (
                "CONFAB_CLUSTER_LINK_TLS_KEY_FILE",
                "/etc/confab/link-key.pem",
            ),
            ("CONFAB_CLUSTER_LINK_TLS_CA_FILE", "/etc/confab/link-ca.pem"),
        ]
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .to_vec();
        let c = load(links, env).expect("valid from the environment");
        assert_eq!(c.link_tls_key_file, "/etc/confab/link-key.pem");
    }

    #[test]
    fn an_all_digit_env_value_still_fits_a_text_key_of_the_cluster_section() {
        let s = Settings::load(
            "",
            [
                (
                    "CONFAB_CLUSTER_NATS_URL".to_owned(),
                    "nats://127.0.0.1:4222".to_owned(),
                ),
                ("CONFAB_CLUSTER_NODE_ID".to_owned(), "1234".to_owned()),
                (
                    "CONFAB_CLUSTER_NODE_TIMEOUT_MS".to_owned(),
                    "500".to_owned(),
                ),
            ],
        )
        .expect("valid");
        let c = s.cluster.expect("cluster");
        assert_eq!(c.node_id.as_deref(), Some("1234"));
        assert_eq!(c.node_timeout_ms, Some(500));
    }

    /// Values that would silently disable a rule are refused with the key's name, not adjusted.
    #[test]
    fn values_that_would_disable_a_rule_are_refused() {
        for (toml, key) in [
            (
                "[server]\nhello_timeout_ms = 0\n",
                "server.hello_timeout_ms",
            ),
            (
                "[flow]\nmax_message_bytes = 65536\n",
                "flow.max_message_bytes",
            ),
            ("[flow]\nmax_message_bytes = 0\n", "flow.max_message_bytes"),
            (
                "[flow]\nmax_content_type_bytes = 0\n",
                "flow.max_content_type_bytes",
            ),
            (
                "[flow]\ncomposing_timeout_ms = 5000\n",
                "flow.composing_timeout_ms",
            ),
            (
                "[limits]\nrequests_per_second = 0\n",
                "limits.requests_per_second",
            ),
            ("[limits]\nrequest_burst = 0\n", "limits.request_burst"),
            (
                "[limits]\npresence_updates_per_second = 0\n",
                "limits.presence_updates_per_second",
            ),
            (
                "[limits]\npresence_update_burst = 0\n",
                "limits.presence_update_burst",
            ),
            (
                "[limits]\noutbound_queue_bytes = 4294967296\n",
                "limits.outbound_queue_bytes",
            ),
            (
                "[cluster]\nnats_url = \"x\"\nnode_timeout_ms = 99\n",
                "cluster.node_timeout_ms",
            ),
            (
                "[cluster]\nnats_url = \"x\"\nconnect_timeout_ms = 0\n",
                "cluster.connect_timeout_ms",
            ),
        ] {
            let e = Settings::load(toml, []).expect_err(toml);
            assert!(e.to_string().contains(key), "{toml}: {e}");
        }
        let s = Settings::load(
            "[server]\nmax_frame = 8192\n[flow]\nmax_message_bytes = 8000\n",
            [],
        )
        .expect("a body limit below the frame limit");
        assert_eq!(s.flow.max_message_bytes, 8000);
    }

    #[test]
    fn errors_name_the_key() {
        let e = Settings::load("[fork]\ntoast_timeout = 5\n", []).expect_err("unknown key");
        assert!(e.to_string().contains("toast_timeout"), "{e}");
        let e = Settings::load("[server]\nheartbeat_ms = \"soon\"\n", []).expect_err("type");
        assert!(e.to_string().contains("heartbeat_ms"), "{e}");
        let e = Settings::load("[presence]\naway_after_ms = 1\n", []).expect_err("order");
        assert!(e.to_string().contains("presence.away_after_ms"), "{e}");
    }

    #[test]
    fn the_websocket_listener_is_off_unless_configured_and_its_keys_are_checked() {
        assert!(
            Settings::load("", [])
                .expect("defaults")
                .server
                .websocket
                .is_none()
        );
        let s = Settings::load(
            "[server.websocket]\nlisten = \"127.0.0.1:5080\"\nallowed_origins = [\"https://chat.example.com\", \"http://localhost:8080\"]\n",
            [],
        )
        .expect("a listener");
        let ws = s.server.websocket.expect("configured");
        assert_eq!(ws.path, "/confab");
        assert_eq!(ws.allowed_origins.len(), 2);
        for (toml, key) in [
            ("listen = \"127.0.0.1:5070\"", "server.websocket.listen"),
            (
                "listen = \"127.0.0.1:5080\"\npath = \"confab\"",
                "server.websocket.path",
            ),
            (
                "listen = \"127.0.0.1:5080\"\nallowed_origins = [\"chat.example.com\"]",
                "server.websocket.allowed_origins",
            ),
            (
                "listen = \"127.0.0.1:5080\"\nallowed_origins = [\"https://a.example/\"]",
                "server.websocket.allowed_origins",
            ),
        ] {
            let e =
                Settings::load(&format!("[server.websocket]\n{toml}\n"), []).expect_err("refused");
            assert!(
                matches!(&e, SettingsError::Invalid { key: k, .. } if k == key),
                "{toml}: {e}"
            );
        }
    }
}
