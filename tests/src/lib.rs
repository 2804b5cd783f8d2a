//! Test support for end-to-end tests: a node started on ephemeral ports with short timeouts,
//! tokens, and [`Raw`], a protocol client that sends and reads frames exactly as written so a
//! test sees every event in order. [`legs`] holds the expectations about calls that several
//! test files share.
#![allow(clippy::unwrap_used, clippy::print_stdout)]

pub mod cut;
pub mod faults;
pub mod legs;
pub mod netns;
pub mod pki;
pub mod relay;
pub mod resumable;
pub mod wire;

use bytes::BytesMut;
use confab_actors::{RunningNode, Settings};
use confab_cluster::spawn_node;
use confab_protocol::codec::encode_frame;
use confab_protocol::sdp::build_offer;
use confab_protocol::*;
use std::net::SocketAddr;
use std::time::Duration;
use tokio::io::AsyncWriteExt;

pub const SECRET: &str = "test-secret";
/// Upper bound on waiting for any single event; a safety net, never a pacing device.
pub const EVENT_TIMEOUT: Duration = Duration::from_secs(5);

/// Settings for tests: ephemeral ports, two workers, short fork timers.
pub fn test_settings() -> Settings {
    let mut s = Settings::default();
    s.server.listen = "127.0.0.1:0".parse().unwrap();
    s.server.workers = 2;
    s.server.shutdown_timeout_ms = 3000;
    s.metrics.listen = "127.0.0.1:0".to_owned();
    s.auth.jwt_secret = SECRET.to_owned();
    s.fork.toast_timeout_ms = 300;
    s.fork.auto_accept_grace_ms = 300;
    s
}

pub fn start_node(tweak: impl FnOnce(&mut Settings)) -> RunningNode {
    init_logging();
    let mut s = test_settings();
    tweak(&mut s);
    spawn_node(s).expect("node starts")
}

/// An HS256 token for `user`, valid for an hour.
pub fn token(user: &str) -> String {
    token_with(user, SECRET, 3600)
}

pub fn token_with(user: &str, secret: &str, ttl_s: i64) -> String {
    #[derive(serde::Serialize)]
    struct Claims<'a> {
        sub: &'a str,
        exp: i64,
    }
    let exp = jsonwebtoken::get_current_timestamp() as i64 + ttl_s;
    jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        &Claims { sub: user, exp },
        &jsonwebtoken::EncodingKey::from_secret(secret.as_bytes()),
    )
    .unwrap()
}

pub fn offer() -> String {
    build_offer(&["text/plain"], None)
}

pub fn answer() -> String {
    build_offer(&["text/plain"], None)
}

/// A raw protocol client.
pub struct Raw {
    framed: wire::Wire,
    pub endpoint: String,
    pub user: String,
    next_rid: u32,
}

impl Raw {
    pub async fn connect(addr: SocketAddr) -> Raw {
        Raw::on(wire::Wire::tcp(addr).await)
    }

    /// A client on `wire`, not signed in.
    pub fn on(wire: wire::Wire) -> Raw {
        Raw {
            framed: wire,
            endpoint: String::new(),
            user: String::new(),
            next_rid: 1000,
        }
    }

    /// Connects to the WebSocket listener at `addr` (path `/confab`), without an `Origin`.
    pub async fn connect_ws(addr: SocketAddr) -> Raw {
        Raw::on(
            wire::Wire::websocket(addr, "/confab", None)
                .await
                .expect("WebSocket upgrade"),
        )
    }

    /// Connects over WebSocket and signs in as `user` on `device`.
    pub async fn sign_in_ws(addr: SocketAddr, user: &str, device: &str) -> Raw {
        match Raw::connect_ws(addr).await.hello(user, device).await {
            Ok(c) => c,
            Err(other) => panic!("expected welcome over WebSocket, got {other:?}"),
        }
    }

    /// The WebSocket close code the node sent, once it has closed.
    pub fn closed_with(&self) -> Option<u16> {
        self.framed.closed_with()
    }

    /// Sends one WebSocket message as it is.
    pub async fn send_ws_message(&mut self, msg: tokio_tungstenite::tungstenite::Message) {
        self.framed.send_message(msg).await;
    }

    /// Connects and signs in as `user` on `device`.
    pub async fn sign_in(addr: SocketAddr, user: &str, device: &str) -> Raw {
        match Raw::try_sign_in(addr, user, device).await {
            Ok(c) => c,
            Err(other) => panic!("expected welcome, got {other:?}"),
        }
    }

    /// [`Raw::sign_in`] that may be refused: the client on `welcome`, else the node's answer
    /// to the `hello` (an `error`, after which the node closes the connection).
    pub async fn try_sign_in(addr: SocketAddr, user: &str, device: &str) -> Result<Raw, ServerMsg> {
        Raw::connect(addr).await.hello(user, device).await
    }

    /// Sends the `hello` for `user` on `device`: the client on `welcome`, else the answer.
    pub async fn hello(mut self, user: &str, device: &str) -> Result<Raw, ServerMsg> {
        let c = &mut self;
        c.user = confab_protocol::uri::normalize_user_uri(user).unwrap();
        c.send(&ClientMsg::Hello {
            resume: None,
            rid: Some(1),
            version: 1,
            user: user.to_owned(),
            token: token(user),
            device: device.to_owned(),
            agent: None,
        })
        .await;
        match c.recv().await {
            ServerMsg::Welcome { endpoint, .. } => {
                c.endpoint = endpoint;
                Ok(self)
            }
            other => Err(other),
        }
    }

    pub fn rid(&mut self) -> Option<u32> {
        self.next_rid += 1;
        Some(self.next_rid)
    }

    pub async fn send(&mut self, msg: &ClientMsg) {
        self.framed.send(msg).await.unwrap();
    }

    pub async fn send_bytes(&mut self, bytes: &[u8]) {
        self.framed.tcp_stream().write_all(bytes).await.unwrap();
    }

    /// Sends a frame whose body is `body` verbatim.
    pub async fn send_body(&mut self, body: &[u8]) {
        let mut v = (body.len() as u32).to_be_bytes().to_vec();
        v.extend_from_slice(body);
        self.send_bytes(&v).await;
    }

    /// The next frame from the node, or `None` once the connection has ended (closed or
    /// reset); panics after [`EVENT_TIMEOUT`].
    pub async fn next_or_closed(&mut self) -> Option<ServerMsg> {
        match tokio::time::timeout(EVENT_TIMEOUT, self.framed.next()).await {
            Ok(Some(Ok(frame))) => Some(decode_server(&frame).unwrap()),
            Ok(Some(Err(_)) | None) => None,
            Err(_) => panic!("{}: no frame within {EVENT_TIMEOUT:?}", self.user),
        }
    }

    /// The next frame from the node; panics after [`EVENT_TIMEOUT`] or on close.
    pub async fn recv(&mut self) -> ServerMsg {
        self.recv_within(EVENT_TIMEOUT).await
    }

    /// The next frame from the node; panics after `limit` or on close. For a frame the node
    /// sends only when a deadline of its own passes: `limit` is that deadline plus
    /// [`EVENT_TIMEOUT`], so a stalled machine does not eat the margin.
    pub async fn recv_within(&mut self, limit: Duration) -> ServerMsg {
        match tokio::time::timeout(limit, self.framed.next()).await {
            Ok(Some(Ok(frame))) => decode_server(&frame).unwrap(),
            Ok(other) => panic!("{}: connection ended: {other:?}", self.user),
            Err(_) => panic!("{}: no frame within {limit:?}", self.user),
        }
    }

    /// Reads until `pred` matches; returns the match and everything skipped before it.
    pub async fn recv_until(
        &mut self,
        pred: impl Fn(&ServerMsg) -> bool,
    ) -> (ServerMsg, Vec<ServerMsg>) {
        self.recv_until_within(EVENT_TIMEOUT, pred).await
    }

    /// [`Raw::recv_until`], each frame awaited for at most `limit` (see [`Raw::recv_within`]).
    pub async fn recv_until_within(
        &mut self,
        limit: Duration,
        pred: impl Fn(&ServerMsg) -> bool,
    ) -> (ServerMsg, Vec<ServerMsg>) {
        let mut skipped = Vec::new();
        loop {
            let m = self.recv_within(limit).await;
            if pred(&m) {
                return (m, skipped);
            }
            skipped.push(m);
        }
    }

    /// Reads until `pred` matches, never past `deadline`: the match, or (without panicking,
    /// so a test can count its failures) what went wrong: the deadline passed or the
    /// connection ended, with the last frames skipped meanwhile.
    pub async fn try_recv_until(
        &mut self,
        deadline: tokio::time::Instant,
        pred: impl Fn(&ServerMsg) -> bool,
    ) -> Result<ServerMsg, String> {
        let mut skipped = Vec::new();
        let why = loop {
            match tokio::time::timeout_at(deadline, self.framed.next()).await {
                Ok(Some(Ok(frame))) => match decode_server(&frame) {
                    Ok(m) if pred(&m) => return Ok(m),
                    Ok(m) => skipped.push(m),
                    Err(e) => break format!("an undecodable frame ({e})"),
                },
                Ok(other) => break format!("the connection ended ({other:?})"),
                Err(_) => break "nothing matching by the deadline".to_owned(),
            }
        };
        let last = &skipped[skipped.len().saturating_sub(6)..];
        Err(format!(
            "{} ({}): {why}; {} frames skipped, the last: {last:?}",
            self.user,
            self.endpoint,
            skipped.len()
        ))
    }

    /// [`Raw::request`] that reports instead of panicking when no reply comes by `deadline`.
    pub async fn try_request(
        &mut self,
        mut msg: ClientMsg,
        deadline: tokio::time::Instant,
    ) -> Result<ServerMsg, String> {
        let rid = self.rid();
        set_rid(&mut msg, rid);
        if let Err(e) = self.framed.send(&msg).await {
            return Err(format!(
                "{} ({}): cannot send: {e}",
                self.user, self.endpoint
            ));
        }
        self.try_recv_until(deadline, |m| reply_rid(m) == rid).await
    }

    /// Sends a frame; the error (the connection is gone) instead of panicking, for clients
    /// that live through faults.
    pub async fn try_send(&mut self, msg: &ClientMsg) -> Result<(), String> {
        self.framed.send(msg).await
    }

    /// The next frame, `Ok(None)` when none came by `deadline`, or `Err` once the connection
    /// has ended (closed, reset or undecodable): for clients that live through faults.
    pub async fn try_next(
        &mut self,
        deadline: tokio::time::Instant,
    ) -> Result<Option<ServerMsg>, String> {
        match tokio::time::timeout_at(deadline, self.framed.next()).await {
            Ok(Some(Ok(frame))) => decode_server(&frame).map(Some).map_err(|e| e.to_string()),
            Ok(Some(Err(e))) => Err(e.to_string()),
            Ok(None) => Err("closed".to_owned()),
            Err(_) => Ok(None),
        }
    }

    /// Asserts the node closes the connection (after any frames, which are returned).
    pub async fn expect_closed(&mut self) -> Vec<ServerMsg> {
        let mut frames = Vec::new();
        loop {
            match tokio::time::timeout(EVENT_TIMEOUT, self.framed.next()).await {
                Ok(Some(Ok(frame))) => frames.push(decode_server(&frame).unwrap()),
                Ok(Some(Err(_))) | Ok(None) => return frames,
                Err(_) => panic!("connection still open; got {frames:?}"),
            }
        }
    }

    /// Asserts nothing arrives for `quiet` (used only to check that something did NOT happen).
    pub async fn expect_silence(&mut self, quiet: Duration) {
        if let Ok(Some(f)) = tokio::time::timeout(quiet, self.framed.next()).await {
            panic!(
                "{}: unexpected frame {:?}",
                self.user,
                f.map(|f| decode_server(&f))
            );
        }
    }

    /// Sends a request and returns its reply (the first frame echoing its rid).
    pub async fn request(&mut self, mut msg: ClientMsg) -> ServerMsg {
        let rid = self.rid();
        set_rid(&mut msg, rid);
        self.send(&msg).await;
        let (reply, _) = self.recv_until(|m| reply_rid(m) == rid).await;
        reply
    }

    /// Sends a `ping` and asserts its `pong`. The node answers it only after every frame sent
    /// before it, so this also waits until those are handled, and shows the connection works.
    pub async fn ping(&mut self) {
        let reply = self.request(ClientMsg::Ping { rid: None }).await;
        assert!(
            matches!(reply, ServerMsg::Pong { .. }),
            "{}: {reply:?}",
            self.user
        );
    }

    /// `call_establish` to `to`; returns (call, conversation).
    pub async fn establish(&mut self, to: &str, toast: Option<&str>) -> (String, String) {
        let reply = self
            .request(ClientMsg::CallEstablish {
                rid: None,
                to: to.to_owned(),
                conversation: None,
                toast: toast.map(legs::text_toast),
                sdp: offer(),
            })
            .await;
        match reply {
            ServerMsg::CallCreated {
                call, conversation, ..
            } => (call, conversation),
            other => panic!("expected call_created, got {other:?}"),
        }
    }

    /// Waits for `call_incoming`; returns (call, immediate_auto_accept).
    pub async fn incoming(&mut self) -> (String, bool) {
        match self
            .recv_until(|m| matches!(m, ServerMsg::CallIncoming { .. }))
            .await
            .0
        {
            ServerMsg::CallIncoming {
                call,
                immediate_auto_accept,
                ..
            } => (call, immediate_auto_accept),
            _ => unreachable!(),
        }
    }

    /// Waits for the `call_state` of `call` reaching `state`; returns its reason.
    pub async fn state(&mut self, call: &str, state: CallState) -> Option<Reason> {
        let (m, _) = self
            .recv_until(|m| matches!(m, ServerMsg::CallState { call: c, state: s, .. } if c == call && *s == state))
            .await;
        match m {
            ServerMsg::CallState { reason, .. } => reason,
            _ => unreachable!(),
        }
    }

    pub async fn accept(&mut self, call: &str) -> ServerMsg {
        self.request(ClientMsg::CallAccept {
            rid: None,
            call: call.to_owned(),
            sdp: answer(),
        })
        .await
    }
}

pub fn reply_rid(m: &ServerMsg) -> Option<u32> {
    m.reply_rid()
}

pub fn set_rid(msg: &mut ClientMsg, new: Option<u32>) {
    if let Some(rid) = msg.rid_mut() {
        *rid = new;
    }
}

/// The next frame on `raw` must be exactly `want`.
pub async fn expect(raw: &mut Raw, want: ServerMsg) {
    let got = raw.recv().await;
    assert_eq!(got, want, "{} ({})", raw.user, raw.endpoint);
}

/// Sends `msg` with a fresh rid and returns that rid.
pub async fn send_request(raw: &mut Raw, mut msg: ClientMsg) -> Option<u32> {
    let rid = raw.rid();
    set_rid(&mut msg, rid);
    raw.send(&msg).await;
    rid
}

/// The next frame on `raw` must be `ok` echoing `rid`.
pub async fn expect_ok(raw: &mut Raw, rid: Option<u32>) {
    expect(raw, ServerMsg::Ok { rid }).await;
}

/// The next frame on `raw` must be an `error` with `code`, echoing `rid`.
pub async fn expect_error(raw: &mut Raw, rid: Option<u32>, code: ErrorCode) {
    match raw.recv().await {
        ServerMsg::Error {
            rid: r, code: c, ..
        } if r == rid && c == code => {}
        other => panic!(
            "{}: expected error {code:?} (rid {rid:?}), got {other:?}",
            raw.user
        ),
    }
}

/// Publishes `raw`'s device state (`device_state`) and asserts its `ok`.
pub async fn publish(raw: &mut Raw, activity: Activity, idle_ms: Option<u64>) {
    request_ok(
        raw,
        ClientMsg::DeviceState {
            rid: None,
            activity,
            idle_ms,
        },
    )
    .await;
}

/// Sends `msg` and asserts the next frame is `ok` for it.
pub async fn request_ok(raw: &mut Raw, msg: ClientMsg) {
    let rid = send_request(raw, msg).await;
    expect_ok(raw, rid).await;
}

/// Sends `msg` and asserts the next frame is `error{code}` for it.
pub async fn request_error(raw: &mut Raw, msg: ClientMsg, code: ErrorCode) {
    let rid = send_request(raw, msg).await;
    expect_error(raw, rid, code).await;
}

/// Encodes `msg` as a complete frame.
pub fn frame(msg: &impl serde::Serialize) -> Vec<u8> {
    let mut b = BytesMut::new();
    encode_frame(msg, &mut b).unwrap();
    b.to_vec()
}

/// A real `nats-server` with JetStream on a free port, in a temporary store directory, killed
/// when dropped. Panics (so a test fails, never skips) when `nats-server` cannot be started.
pub struct NatsServer {
    child: std::process::Child,
    pub port: u16,
    _dir: tempfile::TempDir,
}

impl NatsServer {
    pub fn start() -> NatsServer {
        init_logging();
        let dir = tempfile::tempdir().expect("a temporary directory");
        // The free port is only free when we look: another test's node may bind it before
        // nats-server does, and then nats-server exits while our readiness check talks to
        // that node. So a start counts only once *this* server answers, else a new port.
        for _ in 0..5 {
            let port = std::net::TcpListener::bind("127.0.0.1:0")
                .and_then(|l| l.local_addr())
                .map(|a| a.port())
                .expect("a free port");
            if let Some(child) = Self::spawn(port, dir.path()) {
                return NatsServer {
                    child,
                    port,
                    _dir: dir,
                };
            }
        }
        panic!("nats-server did not start on any of 5 free ports");
    }

    /// Starts nats-server on `port`; `None` if it exits (the port was taken) before it answers.
    fn spawn(port: u16, dir: &std::path::Path) -> Option<std::process::Child> {
        let bin = std::env::var("NATS_SERVER").unwrap_or_else(|_| "nats-server".to_owned());
        let mut child = std::process::Command::new(&bin)
            .args(["-js", "-a", "127.0.0.1", "-p", &port.to_string(), "-sd"])
            .arg(dir)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {bin} (install nats-server): {e}"));
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            if let Ok(Some(_)) = child.try_wait() {
                return None;
            }
            if Self::answers(port) {
                return Some(child);
            }
            assert!(
                std::time::Instant::now() < deadline,
                "nats-server did not listen on {port}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Whether a NATS server answers on `port` (it greets every client with `INFO`).
    fn answers(port: u16) -> bool {
        use std::io::Read;
        let Ok(mut conn) = std::net::TcpStream::connect(("127.0.0.1", port)) else {
            return false;
        };
        let _ = conn.set_read_timeout(Some(Duration::from_millis(500)));
        let mut greeting = [0u8; 4];
        conn.read_exact(&mut greeting).is_ok() && &greeting == b"INFO"
    }

    /// Kills the server (the nodes lose NATS).
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Starts the server again on the same port with the same store.
    pub fn restart(&mut self) {
        self.kill();
        self.child = Self::spawn(self.port, self._dir.path())
            .unwrap_or_else(|| panic!("nats-server could not restart on {}", self.port));
    }

    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// The keys in the directory bucket, read by a client of its own (what any node would load).
    pub async fn directory_keys(&self) -> Vec<String> {
        use futures::StreamExt;
        let client = async_nats::connect(self.url())
            .await
            .expect("the test connects to NATS");
        let kv = async_nats::jetstream::new(client)
            .get_key_value(confab_cluster::BUCKET)
            .await
            .expect("the nodes created the bucket");
        let keys = kv.keys().await.expect("the bucket lists its keys");
        keys.filter_map(|k| async move { k.ok() }).collect().await
    }

    /// Waits until the directory bucket holds exactly `n` keys.
    pub async fn wait_for_directory_keys(&self, n: usize) {
        let deadline = tokio::time::Instant::now() + EVENT_TIMEOUT;
        loop {
            // async-nats's `keys()` can wait for ever when a key is rewritten during the read
            // (the node's own load avoids it); a read that stalls is simply read again.
            let keys = tokio::time::timeout(Duration::from_secs(1), self.directory_keys())
                .await
                .ok();
            if keys.as_ref().is_some_and(|k| k.len() == n) {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "the bucket holds {keys:?}, expected {n} keys"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `RUST_LOG=confab_actors=debug` shows the nodes' logs.
fn init_logging() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
}

/// The number of servers in a [`NatsCluster`].
pub const NATS_CLUSTER_SIZE: usize = 3;

/// Three real `nats-server` processes with JetStream forming one NATS cluster on 127.0.0.1:
/// each has its `server_name` (`n0`, `n1`, `n2`), its own client, cluster (route) and
/// monitoring port, its own store directory and `routes` to the other two, written to a config
/// file per server in a temporary directory and started with `-c`. [`NatsCluster::start`] and
/// [`NatsCluster::restart`] return only once JetStream is ready (see
/// [`NatsCluster::wait_for_jetstream`]). Every server is killed when this is dropped. Panics
/// (so a test fails, never skips) when `nats-server` cannot be started.
pub struct NatsCluster {
    members: Vec<ClusterMember>,
    _dir: tempfile::TempDir,
}

struct ClusterMember {
    name: String,
    port: u16,
    monitor_port: u16,
    config: std::path::PathBuf,
    child: Option<std::process::Child>,
}

impl NatsCluster {
    pub fn start() -> NatsCluster {
        init_logging();
        // As for [`NatsServer`]: a free port may be taken before nats-server binds it, and
        // then that server exits; the whole cluster is then made again on new ports.
        for _ in 0..5 {
            if let Some(cluster) = Self::try_start() {
                return cluster;
            }
        }
        panic!("a NATS cluster did not start on any of 5 sets of free ports");
    }

    fn try_start() -> Option<NatsCluster> {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let ports = free_ports(3 * NATS_CLUSTER_SIZE);
        let route_port = |i: usize| ports[3 * i + 1];
        let members = (0..NATS_CLUSTER_SIZE)
            .map(|i| {
                let name = format!("n{i}");
                let (port, monitor_port) = (ports[3 * i], ports[3 * i + 2]);
                let routes: String = (0..NATS_CLUSTER_SIZE)
                    .filter(|j| *j != i)
                    .map(|j| format!("    \"nats-route://127.0.0.1:{}\"\n", route_port(j)))
                    .collect();
                let store = dir.path().join(&name);
                let text = format!(
                    "server_name: \"{name}\"\n\
                     listen: \"127.0.0.1:{port}\"\n\
                     http: \"127.0.0.1:{monitor_port}\"\n\
                     jetstream {{\n  store_dir: \"{}\"\n}}\n\
                     cluster {{\n  name: \"confab-test\"\n  listen: \"127.0.0.1:{}\"\n  \
                     routes: [\n{routes}  ]\n}}\n",
                    store.display(),
                    route_port(i),
                );
                let config = dir.path().join(format!("{name}.conf"));
                std::fs::write(&config, text).expect("the server's config file is written");
                ClusterMember {
                    name,
                    port,
                    monitor_port,
                    config,
                    child: None,
                }
            })
            .collect();
        let mut cluster = NatsCluster { members, _dir: dir };
        for i in 0..NATS_CLUSTER_SIZE {
            cluster.members[i].child = Some(spawn_nats_config(&cluster.members[i].config));
        }
        for i in 0..NATS_CLUSTER_SIZE {
            // One that exited spoils the attempt; dropping `cluster` kills the others.
            if !cluster.wait_answers(i) {
                return None;
            }
        }
        cluster.wait_for_jetstream();
        Some(cluster)
    }

    /// Whether server `i` answers clients (false if it exited first: its port was taken).
    fn wait_answers(&mut self, i: usize) -> bool {
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        let m = &mut self.members[i];
        loop {
            match m.child.as_mut().map(|c| c.try_wait()) {
                Some(Ok(None)) => {}
                _ => return false,
            }
            if NatsServer::answers(m.port) {
                return true;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "nats-server {} did not listen on {}",
                m.name,
                m.port
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits (at most 30 s) until JetStream is ready: every running server follows one meta
    /// leader, itself a running server, which counts every other running server as current.
    /// With a server killed, the two left elect a leader between them.
    pub fn wait_for_jetstream(&self) {
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        loop {
            let complaint = match self.jetstream_ready() {
                Ok(()) => return,
                Err(complaint) => complaint,
            };
            assert!(
                std::time::Instant::now() < deadline,
                "JetStream of the NATS cluster is not ready: {complaint}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn jetstream_ready(&self) -> Result<(), String> {
        let running: Vec<usize> = (0..NATS_CLUSTER_SIZE)
            .filter(|i| self.members[*i].child.is_some())
            .collect();
        let mut leader: Option<String> = None;
        for &i in &running {
            let name = &self.members[i].name;
            let jsz = self.jsz(i).ok_or_else(|| format!("{name}: no /jsz"))?;
            let now = jsz["meta_cluster"]["leader"].as_str().unwrap_or("");
            if now.is_empty() {
                return Err(format!("{name}: no meta leader"));
            }
            match &leader {
                Some(l) if l != now => return Err(format!("{name} follows {now}, others {l}")),
                _ => leader = Some(now.to_owned()),
            }
        }
        let leader = leader.ok_or("no server running")?;
        let at = running
            .iter()
            .copied()
            .find(|i| self.members[*i].name == leader)
            .ok_or_else(|| format!("the meta leader {leader} is not running"))?;
        let jsz = self.jsz(at).ok_or_else(|| format!("{leader}: no /jsz"))?;
        let replicas = jsz["meta_cluster"]["replicas"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        for &i in &running {
            let name = &self.members[i].name;
            if i == at {
                continue;
            }
            let current = replicas.iter().any(|r| {
                r["name"].as_str() == Some(name.as_str())
                    && r["current"].as_bool() == Some(true)
                    && r["offline"].as_bool() != Some(true)
            });
            if !current {
                return Err(format!(
                    "the meta leader {leader} does not count {name} current"
                ));
            }
        }
        Ok(())
    }

    /// Server `i`'s `/jsz` (JetStream state), from its monitoring port.
    fn jsz(&self, i: usize) -> Option<serde_json::Value> {
        use std::io::{Read, Write};
        let mut conn =
            std::net::TcpStream::connect(("127.0.0.1", self.members[i].monitor_port)).ok()?;
        conn.set_read_timeout(Some(Duration::from_secs(1))).ok()?;
        conn.write_all(b"GET /jsz HTTP/1.0\r\nHost: localhost\r\n\r\n")
            .ok()?;
        let mut buf = Vec::new();
        conn.read_to_end(&mut buf).ok()?;
        let text = String::from_utf8_lossy(&buf);
        let (_, body) = text.split_once("\r\n\r\n")?;
        serde_json::from_str(body).ok()
    }

    /// Kills server `i` (its clients reconnect to the others); returns at once.
    pub fn kill(&mut self, i: usize) {
        if let Some(mut child) = self.members[i].child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts server `i` again with the same ports, config and store; returns once it
    /// answers and JetStream is ready with it.
    pub fn restart(&mut self, i: usize) {
        self.kill(i);
        self.members[i].child = Some(spawn_nats_config(&self.members[i].config));
        assert!(
            self.wait_answers(i),
            "nats-server {} could not restart on {}",
            self.members[i].name,
            self.members[i].port
        );
        self.wait_for_jetstream();
    }

    /// Every server's URL, comma-separated: a `cluster.nats_url` for confab.
    pub fn urls(&self) -> String {
        (0..NATS_CLUSTER_SIZE)
            .map(|i| self.url(i))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// Server `i`'s client URL.
    pub fn url(&self, i: usize) -> String {
        format!("nats://127.0.0.1:{}", self.members[i].port)
    }

    /// Waits (at most 30 s) until the directory bucket's stream has a leader and counts every
    /// other replica current: a server restarted after an outage has caught up, so the next
    /// one can go (an operator's rolling restart waits for the same).
    pub async fn wait_for_directory_caught_up(&self) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        let addrs: Vec<async_nats::ServerAddr> = (0..NATS_CLUSTER_SIZE)
            .filter_map(|i| self.url(i).parse().ok())
            .collect();
        let client = async_nats::connect(addrs)
            .await
            .expect("the test connects to NATS");
        let js = async_nats::jetstream::new(client);
        loop {
            let read = async {
                let stream = js
                    .get_stream(format!("KV_{}", confab_cluster::BUCKET))
                    .await
                    .map_err(|e| e.to_string())?;
                let info = stream.get_info().await.map_err(|e| e.to_string())?;
                let cluster = info.cluster.unwrap_or_default();
                let lagging: Vec<String> = cluster
                    .replicas
                    .iter()
                    .filter(|p| !p.current || p.offline)
                    .map(|p| p.name.clone())
                    .collect();
                match (cluster.leader, lagging.is_empty()) {
                    (Some(_), true) if cluster.replicas.len() + 1 == info.config.num_replicas => {
                        Ok(())
                    }
                    (leader, _) => Err(format!("leader {leader:?}, lagging {lagging:?}")),
                }
            };
            let complaint = match tokio::time::timeout(Duration::from_secs(2), read).await {
                Ok(Ok(())) => return,
                Ok(Err(e)) => e,
                Err(_) => "no answer within 2 s".to_owned(),
            };
            assert!(
                tokio::time::Instant::now() < deadline,
                "the directory bucket did not catch up: {complaint}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Where the directory bucket's stream lives, for a test's messages: its replica count,
    /// its leader and its other peers, or why that could not be read.
    pub async fn directory_placement(&self) -> String {
        let addrs: Vec<async_nats::ServerAddr> = (0..NATS_CLUSTER_SIZE)
            .filter(|i| self.members[*i].child.is_some())
            .filter_map(|i| self.url(i).parse().ok())
            .collect();
        let read = async {
            let client = async_nats::connect(addrs)
                .await
                .map_err(|e| e.to_string())?;
            let stream = async_nats::jetstream::new(client)
                .get_stream(format!("KV_{}", confab_cluster::BUCKET))
                .await
                .map_err(|e| e.to_string())?;
            let info = stream.get_info().await.map_err(|e| e.to_string())?;
            let cluster = info.cluster.unwrap_or_default();
            let peers: Vec<&str> = cluster.replicas.iter().map(|p| p.name.as_str()).collect();
            Ok::<_, String>(format!(
                "R{}, leader {:?}, other peers {peers:?}",
                info.config.num_replicas, cluster.leader
            ))
        };
        match tokio::time::timeout(Duration::from_secs(5), read).await {
            Ok(Ok(placement)) => placement,
            Ok(Err(e)) => format!("unknown ({e})"),
            Err(_) => "unknown (no answer within 5 s)".to_owned(),
        }
    }
}

impl Drop for NatsCluster {
    fn drop(&mut self) {
        for i in 0..NATS_CLUSTER_SIZE {
            self.kill(i);
        }
    }
}

/// `n` distinct ports free at the moment (all held until all are known).
fn free_ports(n: usize) -> Vec<u16> {
    let held: Vec<std::net::TcpListener> = (0..n)
        .map(|_| std::net::TcpListener::bind("127.0.0.1:0").expect("a free port"))
        .collect();
    held.iter()
        .map(|l| l.local_addr().expect("a bound port").port())
        .collect()
}

/// Starts `nats-server -c config`, its output discarded.
fn spawn_nats_config(config: &std::path::Path) -> std::process::Child {
    let bin = std::env::var("NATS_SERVER").unwrap_or_else(|_| "nats-server".to_owned());
    std::process::Command::new(&bin)
        .arg("-c")
        .arg(config)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {bin} (install nats-server): {e}"))
}

/// Node timeout used by cluster tests (a dead node is noticed within it). Two seconds: short
/// enough for the tests that wait for a death, long enough that a loaded machine stalling a
/// node's NATS thread for a heartbeat or two does not make a death no test asked for.
pub const NODE_TIMEOUT_MS: u64 = 2000;

/// Test settings for a cluster node named `node_id` on `nats`.
pub fn cluster_settings(nats: &NatsServer, node_id: &str) -> Settings {
    cluster_settings_on(nats.url(), node_id)
}

/// Test settings for a cluster node named `node_id` whose `cluster.nats_url` is `nats_url`
/// (one URL, or several comma-separated, as [`NatsCluster::urls`] gives them).
pub fn cluster_settings_on(nats_url: String, node_id: &str) -> Settings {
    let mut s = test_settings();
    s.server.node_id = node_id.to_owned();
    s.cluster = Some(confab_actors::settings::Cluster {
        node_id: Some(node_id.to_owned()),
        node_timeout_ms: Some(NODE_TIMEOUT_MS),
        ..confab_actors::settings::Cluster::new(nats_url)
    });
    s
}

/// The link secret of the test clusters' nodes.
pub const LINK_SECRET: &str = "the test cluster's link secret";

/// Turns on direct links between nodes (`cluster.link_listen`) on a port of the system's
/// choosing, with [`LINK_SECRET`].
pub fn with_direct_links(s: &mut Settings) {
    if let Some(c) = s.cluster.as_mut() {
        c.link_listen = "127.0.0.1:0".to_owned();
        c.link_secret = LINK_SECRET.to_owned();
    }
}

/// Envelopes over NATS only, as a node without `cluster.link_listen` sends them.
pub fn without_direct_links(s: &mut Settings) {
    if let Some(c) = s.cluster.as_mut() {
        c.link_listen.clear();
    }
}

/// Starts a cluster node on `nats`, with direct links to the others (as production runs
/// them; [`without_direct_links`] in `tweak` for a node that sends everything over NATS).
pub fn start_cluster_node(
    nats: &NatsServer,
    node_id: &str,
    tweak: impl FnOnce(&mut Settings),
) -> RunningNode {
    let mut s = cluster_settings(nats, node_id);
    with_direct_links(&mut s);
    tweak(&mut s);
    // Lossy: the tests of envelopes lost on the way arm it (`confab_cluster::lossy`).
    confab_cluster::spawn_node_with(s, confab_cluster::ClusterJoin::nats().lossy())
        .expect("cluster node starts")
}

/// Starts a cluster node named `node_id` on the in-memory `network`, with the nodes of this
/// process that joined it: no NATS. Its transport is lossy, as [`start_cluster_node`]'s is.
pub fn start_memory_node(
    network: &confab_cluster::memory::MemoryNetwork,
    node_id: &str,
    tweak: impl FnOnce(&mut Settings),
) -> RunningNode {
    // The URL is not used: the node joins `network`.
    let mut s = cluster_settings_on("memory".to_owned(), node_id);
    tweak(&mut s);
    confab_cluster::spawn_node_with(s, confab_cluster::ClusterJoin::memory(network).lossy())
        .expect("in-memory cluster node starts")
}

/// Polls `check` every 10 ms until it passes (`Ok`); panics with its last complaint after
/// [`EVENT_TIMEOUT`]. For state another node reaches on its own, where no event reaches a client.
pub async fn wait_until(mut check: impl FnMut() -> Result<(), String>) {
    let deadline = tokio::time::Instant::now() + EVENT_TIMEOUT;
    loop {
        match check() {
            Ok(()) => return,
            Err(complaint) => assert!(tokio::time::Instant::now() < deadline, "{complaint}"),
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// `node`'s direct links now (`cluster.link_listen`).
pub fn links(node: &RunningNode) -> confab_cluster::DirectLinks {
    confab_cluster::of(node)
        .expect("a cluster node")
        .direct_links()
}

/// Waits until `ready` holds of `node`'s links (the wait is what the caller is about: a link is
/// dialed when the other node's heartbeat is heard, and again after a back-off).
pub async fn wait_links(
    node: &RunningNode,
    what: &str,
    ready: impl Fn(&confab_cluster::DirectLinks) -> bool,
) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let now = links(node);
        if ready(&now) {
            return;
        }
        assert!(tokio::time::Instant::now() < deadline, "{what}: {now:?}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// `alice` signs in on node `a` ("laptop") and `bob` on node `b` ("desk"); once each node
/// lists the other's endpoint, Alice calls Bob, who accepts. Both clients and the call's id on
/// each side.
pub async fn answered_call_across(
    a: &RunningNode,
    alice: &str,
    b: &RunningNode,
    bob: &str,
) -> (Raw, Raw, String, String) {
    let mut alice_raw = Raw::sign_in(a.addr, alice, "laptop").await;
    let mut bob_raw = Raw::sign_in(b.addr, bob, "desk").await;
    wait_for_endpoints(a, bob, 1).await;
    wait_for_endpoints(b, alice, 1).await;
    let (call, bobs_call) = answered_call(&mut alice_raw, &mut bob_raw).await;
    (alice_raw, bob_raw, call, bobs_call)
}

/// Alice calls Bob, who accepts; the call's id on each side (each leg has its own).
pub async fn answered_call(alice: &mut Raw, bob: &mut Raw) -> (String, String) {
    let (call, _) = alice.establish(&bob.user, None).await;
    let (incoming, _) = bob.incoming().await;
    assert!(matches!(bob.accept(&incoming).await, ServerMsg::Ok { .. }));
    alice.state(&call, CallState::Established).await;
    (call, incoming)
}

/// Waits until `node`'s directory lists exactly `n` endpoints of `user`.
pub async fn wait_for_endpoints(node: &RunningNode, user: &str, n: usize) {
    wait_until(|| {
        let now = node.endpoints_of(user).len();
        if now == n {
            Ok(())
        } else {
            Err(format!(
                "{}: {user} has {now} endpoints, expected {n}",
                node.node_id
            ))
        }
    })
    .await;
}

/// Waits until no leg on `node` serves an endpoint on another node: each ended leg has been
/// released by its endpoint.
pub async fn wait_for_no_remote_legs(node: &RunningNode) {
    let cluster = confab_cluster::of(node).expect("a cluster node");
    wait_until(|| match cluster.legs.len() {
        0 => Ok(()),
        n => Err(format!(
            "{n} ended legs on {} are never released",
            cluster.node_id
        )),
    })
    .await;
}

/// Waits until no leg on `node` holds state events another node has not acknowledged.
pub async fn wait_for_state_events_acknowledged(node: &RunningNode) {
    let cluster = confab_cluster::of(node).expect("a cluster node");
    wait_until(|| match cluster.unseen_events_len() {
        0 => Ok(()),
        n => Err(format!("{n} legs' state events never acknowledged")),
    })
    .await;
}

/// The `call_state` events among `frames`, as (previous, state).
pub fn call_states(frames: &[ServerMsg]) -> Vec<(CallState, CallState)> {
    frames
        .iter()
        .filter_map(|m| match m {
            ServerMsg::CallState {
                previous, state, ..
            } => Some((*previous, *state)),
            _ => None,
        })
        .collect()
}

/// The callee's `call_state` events among `frames` are its accepted call's set-up, in
/// order, each once: `establishing`, then `established`.
pub fn assert_set_up_in_order(frames: &[ServerMsg]) {
    assert_eq!(
        call_states(frames),
        vec![
            (CallState::Incoming, CallState::Establishing),
            (CallState::Establishing, CallState::Established),
        ],
        "{frames:?}"
    );
}

/// Waits until `node` has heard from `peer`'s heartbeats that it acknowledges numbered state
/// events (so `node` numbers and resends the ones it sends there).
pub async fn wait_for_acks_events(node: &RunningNode, peer: &str) {
    let cluster = confab_cluster::of(node).expect("a cluster node");
    wait_until(|| match cluster.acks_events(peer) {
        true => Ok(()),
        false => Err(format!(
            "{} never heard that {peer} acknowledges state events",
            cluster.node_id
        )),
    })
    .await;
}

/// `caller` terminates its leg `call`; the callee's leg `incoming` ends "Terminated remotely".
pub async fn hang_up(caller: &mut Raw, call: &str, callee: &mut Raw, incoming: &str) {
    let reply = caller
        .request(ClientMsg::CallTerminate {
            rid: None,
            call: call.to_owned(),
        })
        .await;
    assert!(matches!(reply, ServerMsg::Ok { .. }), "{reply:?}");
    assert_eq!(
        callee.state(incoming, CallState::Terminated).await,
        Some(Reason::new(200, "Terminated remotely")),
        "{} {}",
        callee.user,
        callee.endpoint
    );
}

/// A one-shot HTTP/1.0 GET (the operations port, Prometheus): (status, head, body), or the
/// error when it cannot be made or takes more than 5 s.
pub async fn try_http_get(
    addr: std::net::SocketAddr,
    target: &str,
) -> std::io::Result<(u16, String, String)> {
    let request = format!("GET {target} HTTP/1.0\r\nHost: {addr}\r\n\r\n");
    http_exchange(addr, request).await
}

/// Sends `request` on a new connection and reads the answer to its end: (status, head, body),
/// or the error when it cannot be made or takes more than 5 s.
async fn http_exchange(
    addr: std::net::SocketAddr,
    request: String,
) -> std::io::Result<(u16, String, String)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let exchange = async {
        let mut s = tokio::net::TcpStream::connect(addr).await?;
        s.write_all(request.as_bytes()).await?;
        let mut buf = Vec::new();
        s.read_to_end(&mut buf).await?;
        Ok::<_, std::io::Error>(buf)
    };
    let buf = tokio::time::timeout(EVENT_TIMEOUT, exchange)
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "HTTP timeout"))??;
    let text = String::from_utf8_lossy(&buf);
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    Ok((status, head.to_owned(), body.to_owned()))
}

/// [`try_http_get`] of a server that must answer: (status, head, body).
pub async fn http_get(addr: std::net::SocketAddr, target: &str) -> (u16, String, String) {
    try_http_get(addr, target)
        .await
        .unwrap_or_else(|e| panic!("GET {target} from {addr}: {e}"))
}

/// `from` sends a message on `call`; `to` receives it on `to_call` and acks it; `from` sees it
/// delivered.
pub async fn send_and_ack(from: &mut Raw, call: &str, to: &mut Raw, to_call: &str, text: &str) {
    let rid = from.rid();
    from.send(&ClientMsg::Message {
        rid,
        call: call.to_owned(),
        content_type: "text/plain".into(),
        body: Body::Text(text.into()),
    })
    .await;
    let (m, _) = to
        .recv_until(|m| matches!(m, ServerMsg::MessageReceived { call: c, toast: None, .. } if c == to_call))
        .await;
    let ServerMsg::MessageReceived { msg, .. } = m else {
        unreachable!()
    };
    to.send(&ClientMsg::MessageAck {
        call: to_call.to_owned(),
        msg,
    })
    .await;
    let (d, _) = from.recv_until(|m| reply_rid(m) == rid).await;
    assert!(matches!(d, ServerMsg::MessageDelivered { .. }), "{d:?}");
}

/// The value of the series `series` (name and labels, as printed) in a `/metrics` text; 0 when
/// absent. The recorder is shared by a test binary's tests, so compare with at least what a
/// test caused.
pub fn metric(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|l| {
            l.strip_prefix(series)?
                .strip_prefix(' ')?
                .trim()
                .parse()
                .ok()
        })
        .unwrap_or(0.0)
}

/// A seed for a randomized test: the variable `var` when set (to replay a run), else the
/// clock's nanoseconds.
pub fn seed_from_env(var: &str) -> u64 {
    std::env::var(var)
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(1, |d| d.as_nanos() as u64)
        })
}

/// A one-shot HTTP/1.1 request with `Connection: close` (the operations port's admin API):
/// `method target`, the extra `headers`, and `body` (sent with its `Content-Length`) if any.
/// (status, head, body), or the error when it cannot be made or takes more than 5 s.
pub async fn try_http_request(
    addr: std::net::SocketAddr,
    method: &str,
    target: &str,
    headers: &[(&str, &str)],
    body: Option<&str>,
) -> std::io::Result<(u16, String, String)> {
    let mut request =
        format!("{method} {target} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
    for (name, value) in headers {
        request.push_str(&format!("{name}: {value}\r\n"));
    }
    if let Some(body) = body {
        request.push_str(&format!("Content-Length: {}\r\n", body.len()));
    }
    request.push_str("\r\n");
    request.push_str(body.unwrap_or(""));
    http_exchange(addr, request).await
}

/// [`try_http_request`] of a server that must answer: (status, head, body).
pub async fn http_request(
    addr: std::net::SocketAddr,
    method: &str,
    target: &str,
    headers: &[(&str, &str)],
    body: Option<&str>,
) -> (u16, String, String) {
    try_http_request(addr, method, target, headers, body)
        .await
        .unwrap_or_else(|e| panic!("{method} {target} to {addr}: {e}"))
}

impl Raw {
    /// The client's own address on its connection to the node (what the node sees as the
    /// peer's address).
    pub fn local_addr(&self) -> SocketAddr {
        self.framed.local_addr()
    }
}

/// A node process's log (its stdout), line by line.
pub type NodeLog = tokio::io::Lines<tokio::io::BufReader<tokio::process::ChildStdout>>;

/// Reads a node process's log until a line containing `want` and returns it; panics when the
/// log ends first or nothing comes within `limit` (a safety net, never a pacing device).
pub async fn log_line_with(log: &mut NodeLog, want: &str, limit: Duration) -> String {
    tokio::time::timeout(limit, async {
        while let Ok(Some(line)) = log.next_line().await {
            if line.contains(want) {
                return line;
            }
        }
        panic!("the node's log ended before {want:?}");
    })
    .await
    .unwrap_or_else(|_| panic!("no {want:?} in the node's log"))
}

/// The admin token of a test: a file the node reads (`admin.token_file`), and its text.
pub struct AdminToken {
    pub file: tempfile::NamedTempFile,
    pub token: String,
}

impl AdminToken {
    #[allow(clippy::new_without_default)]
    pub fn new() -> AdminToken {
        use std::io::Write;
        let token = format!("admin-token-{}", seed_from_env("CONFAB_ADMIN_TEST_TOKEN"));
        let mut file = tempfile::NamedTempFile::new().expect("a temporary file");
        writeln!(file, "{token}").unwrap();
        file.flush().unwrap();
        AdminToken { file, token }
    }

    pub fn path(&self) -> String {
        self.file.path().to_str().unwrap().to_owned()
    }

    /// Turns the admin API on in `s`.
    pub fn configure(&self, s: &mut Settings) {
        s.admin.token_file = self.path();
    }
}
