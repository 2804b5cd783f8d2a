//! Test support for end-to-end tests: a node started on ephemeral ports with short timeouts,
//! tokens, and [`Raw`], a protocol client that sends and reads frames exactly as written so a
//! test sees every event in order. [`legs`] holds the expectations about calls that several
//! test files share.
#![allow(clippy::unwrap_used, clippy::print_stdout)]

pub mod legs;

use bytes::BytesMut;
use confab_actors::{RunningNode, Settings, spawn_node};
use confab_protocol::codec::encode_frame;
use confab_protocol::sdp::build_offer;
use confab_protocol::*;
use futures::{SinkExt, StreamExt};
use std::net::SocketAddr;
use std::time::Duration;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio_util::codec::Framed;

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
    framed: Framed<TcpStream, FrameCodec>,
    pub endpoint: String,
    pub user: String,
    next_rid: u32,
}

impl Raw {
    pub async fn connect(addr: SocketAddr) -> Raw {
        let stream = TcpStream::connect(addr).await.unwrap();
        Raw {
            framed: Framed::new(stream, FrameCodec::new(1 << 20)),
            endpoint: String::new(),
            user: String::new(),
            next_rid: 1000,
        }
    }

    /// Connects and signs in as `user` on `device`.
    pub async fn sign_in(addr: SocketAddr, user: &str, device: &str) -> Raw {
        let mut c = Raw::connect(addr).await;
        c.send(&ClientMsg::Hello {
            rid: Some(1),
            version: 1,
            user: user.to_owned(),
            token: token(user),
            device: device.to_owned(),
            agent: None,
        })
        .await;
        match c.recv().await {
            ServerMsg::Welcome { endpoint, .. } => c.endpoint = endpoint,
            other => panic!("expected welcome, got {other:?}"),
        }
        c.user = confab_protocol::uri::normalize_user_uri(user).unwrap();
        c
    }

    pub fn rid(&mut self) -> Option<u32> {
        self.next_rid += 1;
        Some(self.next_rid)
    }

    pub async fn send(&mut self, msg: &ClientMsg) {
        self.framed.send(msg).await.unwrap();
    }

    pub async fn send_bytes(&mut self, bytes: &[u8]) {
        self.framed.get_mut().write_all(bytes).await.unwrap();
    }

    /// Sends a frame whose body is `body` verbatim.
    pub async fn send_body(&mut self, body: &[u8]) {
        let mut v = (body.len() as u32).to_be_bytes().to_vec();
        v.extend_from_slice(body);
        self.send_bytes(&v).await;
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
        // `RUST_LOG=confab_actors=debug` shows the nodes' logs.
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_test_writer()
            .try_init();
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
            .get_key_value(confab_actors::cluster::BUCKET)
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

/// Node timeout used by cluster tests (a dead node is noticed within it). Two seconds: short
/// enough for the tests that wait for a death, long enough that a loaded machine stalling a
/// node's NATS thread for a heartbeat or two does not make a death no test asked for.
pub const NODE_TIMEOUT_MS: u64 = 2000;

/// Test settings for a cluster node named `node_id` on `nats`.
pub fn cluster_settings(nats: &NatsServer, node_id: &str) -> Settings {
    let mut s = test_settings();
    s.server.node_id = node_id.to_owned();
    s.cluster = Some(confab_actors::settings::Cluster {
        node_id: Some(node_id.to_owned()),
        node_timeout_ms: Some(NODE_TIMEOUT_MS),
        ..confab_actors::settings::Cluster::new(nats.url())
    });
    s
}

pub fn start_cluster_node(
    nats: &NatsServer,
    node_id: &str,
    tweak: impl FnOnce(&mut Settings),
) -> RunningNode {
    let mut s = cluster_settings(nats, node_id);
    tweak(&mut s);
    spawn_node(s).expect("cluster node starts")
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

/// A one-shot HTTP/1.0 GET (the operations port, Prometheus): (status, head, body), or the
/// error when it cannot be made or takes more than 5 s.
pub async fn try_http_get(
    addr: std::net::SocketAddr,
    target: &str,
) -> std::io::Result<(u16, String, String)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let exchange = async {
        let mut s = tokio::net::TcpStream::connect(addr).await?;
        s.write_all(format!("GET {target} HTTP/1.0\r\nHost: {addr}\r\n\r\n").as_bytes())
            .await?;
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
