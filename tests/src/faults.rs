//! The fault harness's cluster and load (issue 24): three `nats-server` processes forming one
//! NATS cluster and three `confab-node` processes, each in its own host of a [`Net`], three
//! client hosts (one beside each node), and load that acts as real clients do while a test
//! cuts, slows or restarts things.
//!
//! [`FaultCluster`] owns the processes (stopped when dropped; the [`Net`] then removes the
//! hosts). [`Load`] owns the clients: three workers, each a caller on one node calling a user
//! with a device on each of the two other nodes (a forked call across nodes: both devices
//! click accept the moment the call rings), then sending messages that the winning device
//! acks the moment they arrive, then hanging up, in a loop; and watchers, one on each node,
//! subscribed to a sentinel user signed in on each node, whose presence events time the
//! cluster's detection of a lost node and its recovery. Every frame a client reads passes
//! through the [`Tally`], which counts what the promises of docs/architecture.md §13 are
//! about: calls accepted on two devices, messages answered twice, received twice, or never
//! answered while their connection stood.

use crate::netns::Net;
use crate::relay::Relay;
use crate::{LINK_SECRET, Raw, SECRET, answer, legs, offer, token};
use confab_protocol::*;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::time::Instant;

/// The node timeout of the fault tests: a heartbeat every second. A cut of half a second
/// (plus TCP's first retransmissions, 0.2 and 0.6 s after a lost segment) leaves a silence of
/// at most about 1.7 s, well inside it on a loaded machine; a cut of 6 s is well beyond it.
pub const NODE_TIMEOUT_MS: u64 = 3000;
/// `flow.ack_timeout_ms` of the nodes.
pub const ACK_TIMEOUT_MS: u64 = 2000;
/// How long after its send a message must have its answer: the node's own deadline for an
/// answer from another node (ack timeout + 2 × node timeout), plus room for a slow machine.
pub const ANSWER_DEADLINE: Duration =
    Duration::from_millis(ACK_TIMEOUT_MS + 2 * NODE_TIMEOUT_MS + 6000);

pub const NODES: [&str; 3] = ["a", "b", "c"];
pub const NATS: [&str; 3] = ["n1", "n2", "n3"];
const CLIENT_PORT: u16 = 5070;
const OPS_PORT: u16 = 9464;
/// Where each node takes the others' direct links (`cluster.link_listen`).
const LINK_PORT: u16 = 5090;
const NATS_PORT: u16 = 4222;

/// The client host beside `node` (clients reach their node over the bridge).
pub fn clients_of(node: &str) -> String {
    format!("c{node}")
}

/// The `confab-node` binary of this build: `CONFAB_NODE_BIN`, or the one cargo built beside
/// this test binary (`cargo test --workspace` builds it; `cargo build -p confab-bin` does).
pub fn node_binary() -> std::path::PathBuf {
    if let Ok(bin) = std::env::var("CONFAB_NODE_BIN") {
        return bin.into();
    }
    let exe = std::env::current_exe().expect("the test binary's path");
    // target/<profile>/deps/<test> → target/<profile>/confab-node
    let bin = exe
        .parent()
        .and_then(|deps| deps.parent())
        .map(|profile| profile.join("confab-node"))
        .expect("a target directory");
    assert!(
        bin.exists(),
        "{} is missing: build it first (cargo build -p confab-bin --bin confab-node)",
        bin.display()
    );
    bin
}

/// Why the fault tests cannot run here, or `None`: root, ip, nft, nats-server.
pub fn unavailable() -> Option<String> {
    if let Some(why) = Net::available() {
        return Some(why);
    }
    let bin = std::env::var("NATS_SERVER").unwrap_or_else(|_| "nats-server".to_owned());
    match std::process::Command::new(&bin).arg("--version").output() {
        Ok(o) if o.status.success() => None,
        _ => Some(format!("needs {bin}")),
    }
}

struct Proc {
    child: Option<tokio::process::Child>,
}

impl Proc {
    async fn stop(&mut self, signal: &str, wait: Duration) -> Option<std::process::ExitStatus> {
        let mut child = self.child.take()?;
        if let Some(pid) = child.id() {
            let _ = std::process::Command::new("kill")
                .args([signal, &pid.to_string()])
                .status();
        }
        match tokio::time::timeout(wait, child.wait()).await {
            Ok(status) => status.ok(),
            Err(_) => {
                let _ = child.kill().await;
                None
            }
        }
    }
}

/// The NATS cluster and the confab nodes on a [`Net`], as processes.
pub struct FaultCluster {
    pub net: Net,
    dir: tempfile::TempDir,
    nats: BTreeMap<String, Proc>,
    nodes: BTreeMap<String, Proc>,
    /// A node's NATS URLs when not the servers' own (a relay in front of them).
    nats_url_of: BTreeMap<String, String>,
}

impl FaultCluster {
    /// The hosts, the three NATS servers (JetStream ready) and the three nodes (ready).
    pub async fn start() -> FaultCluster {
        Self::start_relayed(&[]).await.0
    }

    /// [`FaultCluster::start`] with the nodes in `relayed` reaching each NATS server through a
    /// [`Relay`] in their own host, whose delay (ms, 0 at first) the returned value sets.
    pub async fn start_relayed(relayed: &[&str]) -> (FaultCluster, Arc<AtomicU64>, Vec<Relay>) {
        let mut hosts: Vec<String> = NATS.iter().map(|s| s.to_string()).collect();
        hosts.extend(NODES.iter().map(|s| s.to_string()));
        hosts.extend(NODES.iter().map(|n| clients_of(n)));
        let names: Vec<&str> = hosts.iter().map(String::as_str).collect();
        let net = Net::up(&names).await;
        let mut c = FaultCluster {
            net,
            dir: tempfile::tempdir().expect("a temporary directory"),
            nats: BTreeMap::new(),
            nodes: BTreeMap::new(),
            nats_url_of: BTreeMap::new(),
        };
        for n in NATS {
            c.start_nats(n);
        }
        c.wait_for_jetstream().await;
        let delay = Arc::new(AtomicU64::new(0));
        let mut relays = Vec::new();
        for node in relayed {
            let mut urls = Vec::new();
            for (i, n) in NATS.iter().enumerate() {
                let listen = SocketAddr::from(([127, 0, 0, 1], 14222 + i as u16));
                let r = Relay::start(&c.net, node, listen, c.nats_addr(n), delay.clone()).await;
                urls.push(format!("nats://{}", r.addr));
                relays.push(r);
            }
            c.set_nats_url(node, urls.join(","));
        }
        for node in NODES {
            c.start_node(node).await;
        }
        (c, delay, relays)
    }

    /// Every NATS server's client URL, comma-separated.
    pub fn nats_urls(&self) -> String {
        NATS.iter()
            .map(|n| format!("nats://{}", self.net.addr(n, NATS_PORT)))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// The NATS server `n`'s client address.
    pub fn nats_addr(&self, n: &str) -> SocketAddr {
        self.net.addr(n, NATS_PORT)
    }

    /// Starts NATS server `n` (its config written the first time, its store kept).
    pub fn start_nats(&mut self, n: &str) {
        let ip = self.net.host(n).ip;
        let routes: String = NATS
            .iter()
            .filter(|o| **o != n)
            .map(|o| format!("    \"nats-route://{}:6222\"\n", self.net.host(o).ip))
            .collect();
        let store = self.dir.path().join(format!("store-{n}"));
        let config = self.dir.path().join(format!("{n}.conf"));
        let text = format!(
            "server_name: \"{n}\"\nlisten: \"{ip}:{NATS_PORT}\"\nhttp: \"{ip}:8222\"\n\
             jetstream {{\n  store_dir: \"{}\"\n}}\n\
             cluster {{\n  name: \"confab-faults\"\n  listen: \"{ip}:6222\"\n  routes: [\n{routes}  ]\n}}\n",
            store.display()
        );
        std::fs::write(&config, text).expect("a NATS config");
        let log = std::fs::File::create(self.dir.path().join(format!("{n}.log"))).expect("a log");
        let bin = std::env::var("NATS_SERVER").unwrap_or_else(|_| "nats-server".to_owned());
        let child = self
            .net
            .command(n, &bin)
            .arg("-c")
            .arg(&config)
            .stdout(log.try_clone().expect("a log"))
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {bin}: {e}"));
        self.nats.insert(n.to_owned(), Proc { child: Some(child) });
    }

    /// Kills NATS server `n` (SIGKILL: a crash).
    pub async fn kill_nats(&mut self, n: &str) {
        if let Some(p) = self.nats.get_mut(n) {
            p.stop("-KILL", Duration::from_secs(5)).await;
        }
    }

    /// Waits (at most 60 s) until every running NATS server follows one JetStream meta
    /// leader, itself running.
    pub async fn wait_for_jetstream(&self) {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let mut leaders = HashSet::new();
            let mut complaint = None;
            for n in NATS {
                if self.nats.get(n).is_none_or(|p| p.child.is_none()) {
                    continue;
                }
                let addr = self.net.addr(n, 8222);
                match crate::try_http_get(addr, "/jsz").await {
                    Ok((200, _, body)) => {
                        let jsz: serde_json::Value =
                            serde_json::from_str(&body).unwrap_or_default();
                        match jsz["meta_cluster"]["leader"].as_str() {
                            Some(l) if !l.is_empty() => {
                                leaders.insert(l.to_owned());
                            }
                            _ => complaint = Some(format!("{n}: no meta leader")),
                        }
                    }
                    other => complaint = Some(format!("{n}: /jsz {other:?}")),
                }
            }
            let running_leader = leaders.len() == 1
                && leaders
                    .iter()
                    .all(|l| self.nats.get(l).is_some_and(|p| p.child.is_some()));
            if complaint.is_none() && running_leader {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "JetStream not ready: {complaint:?}, leaders {leaders:?}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Makes `node` reach NATS through `urls` (from its next start).
    pub fn set_nats_url(&mut self, node: &str, urls: String) {
        self.nats_url_of.insert(node.to_owned(), urls);
    }

    fn node_config(&self, node: &str) -> std::path::PathBuf {
        let ip = self.net.host(node).ip;
        let urls = self
            .nats_url_of
            .get(node)
            .cloned()
            .unwrap_or_else(|| self.nats_urls());
        let text = format!(
            "[server]\nlisten = \"{ip}:{CLIENT_PORT}\"\nnode_id = \"{node}\"\nworkers = 2\n\
             shutdown_timeout_ms = 3000\n\n[metrics]\nlisten = \"{ip}:{OPS_PORT}\"\n\n\
             [auth]\njwt_secret = \"{SECRET}\"\n\n\
             [fork]\ntoast_timeout_ms = 60000\nauto_accept_grace_ms = 60000\n\n\
             [flow]\nack_timeout_ms = {ACK_TIMEOUT_MS}\n\n\
             [cluster]\nnats_url = \"{urls}\"\nnode_id = \"{node}\"\nnode_timeout_ms = {NODE_TIMEOUT_MS}\n\
             link_listen = \"{ip}:{LINK_PORT}\"\nlink_secret = \"{LINK_SECRET}\"\n"
        );
        let path = self.dir.path().join(format!("{node}.toml"));
        std::fs::write(&path, text).expect("a node config");
        path
    }

    /// Starts `node` and waits until it is ready (`/readyz`).
    pub async fn start_node(&mut self, node: &str) {
        let config = self.node_config(node);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.node_log(node))
            .expect("a log");
        let child = self
            .net
            .command(node, &node_binary().to_string_lossy())
            .arg("--config")
            .arg(&config)
            .env_remove("RUST_LOG")
            .env("NO_COLOR", "1")
            .stdout(log.try_clone().expect("a log"))
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .expect("confab-node starts");
        self.nodes
            .insert(node.to_owned(), Proc { child: Some(child) });
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok((200, _, _)) = crate::try_http_get(self.ops(node), "/readyz").await {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "node {node} not ready within 30 s; its log:\n{}",
                self.log_tail(node)
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Stops `node` with SIGTERM (its graceful leave) and returns once it has exited.
    pub async fn stop_node(&mut self, node: &str) -> Option<std::process::ExitStatus> {
        let p = self.nodes.get_mut(node)?;
        p.stop("-TERM", Duration::from_secs(20)).await
    }

    pub fn node_addr(&self, node: &str) -> SocketAddr {
        self.net.addr(node, CLIENT_PORT)
    }

    pub fn ops(&self, node: &str) -> SocketAddr {
        self.net.addr(node, OPS_PORT)
    }

    fn node_log(&self, node: &str) -> std::path::PathBuf {
        self.dir.path().join(format!("{node}.log"))
    }

    /// The lines of `node`'s log containing `what`.
    pub fn log_lines(&self, node: &str, what: &str) -> Vec<String> {
        std::fs::read_to_string(self.node_log(node))
            .unwrap_or_default()
            .lines()
            .filter(|l| l.contains(what))
            .map(str::to_owned)
            .collect()
    }

    /// The last lines of `node`'s log, for a failure's message.
    pub fn log_tail(&self, node: &str) -> String {
        let text = std::fs::read_to_string(self.node_log(node)).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }

    /// Waits (at most `limit`) until `node` answers `/health` with `status`.
    pub async fn wait_for_health(&self, node: &str, status: u16, limit: Duration) {
        let deadline = Instant::now() + limit;
        loop {
            let got = crate::try_http_get(self.ops(node), "/health").await;
            if matches!(&got, Ok((s, _, _)) if *s == status) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{node}: /health {got:?}, expected {status}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The keys of the directory bucket, read from the root namespace (as any node would),
    /// or why they could not be read.
    pub async fn directory_keys(&self) -> Result<Vec<String>, String> {
        use futures::StreamExt;
        let addrs: Vec<async_nats::ServerAddr> = NATS
            .iter()
            .filter(|n| self.nats.get(**n).is_some_and(|p| p.child.is_some()))
            .filter_map(|n| format!("nats://{}", self.nats_addr(n)).parse().ok())
            .collect();
        let read = async {
            let client = async_nats::connect(addrs)
                .await
                .map_err(|e| e.to_string())?;
            let kv = async_nats::jetstream::new(client)
                .get_key_value(confab_cluster::BUCKET)
                .await
                .map_err(|e| e.to_string())?;
            let keys = kv.keys().await.map_err(|e| e.to_string())?;
            Ok(keys.filter_map(|k| async move { k.ok() }).collect().await)
        };
        tokio::time::timeout(Duration::from_secs(3), read)
            .await
            .unwrap_or_else(|_| Err("no answer within 3 s".to_owned()))
    }

    /// Waits (at most 30 s) until the bucket lists exactly the endpoints `expected` (their
    /// ids): nothing left for a node that is gone or a client that left.
    pub async fn wait_for_directory(&self, expected: &HashSet<String>) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let keys = self.directory_keys().await;
            let listed: Option<HashSet<String>> = keys.as_ref().ok().map(|keys| {
                keys.iter()
                    .filter_map(|k| k.rsplit('.').next().map(str::to_owned))
                    .collect()
            });
            if listed.as_ref() == Some(expected) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "the directory lists {listed:?} ({keys:?}), expected {expected:?}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

impl Drop for FaultCluster {
    fn drop(&mut self) {
        // kill_on_drop kills each child; the Net's teardown then kills anything left in a
        // namespace and removes it.
        for p in self.nodes.values_mut().chain(self.nats.values_mut()) {
            if let Some(child) = p.child.as_mut() {
                let _ = child.start_kill();
            }
        }
    }
}

/// What one load round ended as.
#[derive(Debug, Clone)]
pub struct Round {
    pub worker: usize,
    pub start: Instant,
    pub end: Instant,
    /// `None`: set up, carried every message, hung up. `Some(why)` otherwise.
    pub failed: Option<String>,
}

/// Every count the promises are about, over a whole run.
#[derive(Debug, Clone, Default)]
pub struct Tally {
    pub calls_placed: u64,
    /// Calls some device accepted (its `call_accept` answered `ok`).
    pub calls_accepted: u64,
    /// Calls two devices accepted: must stay 0.
    pub calls_double_accepted: u64,
    pub msgs_sent: u64,
    pub msgs_answered_once: u64,
    pub msgs_delivered: u64,
    /// Failures by "code text".
    pub msgs_failed: BTreeMap<String, u64>,
    /// No answer by [`ANSWER_DEADLINE`] although the connection stood: must stay 0.
    pub msgs_unanswered: u64,
    /// The sender's connection ended before the answer came (its node went away).
    pub msgs_cut_short: u64,
    /// A second answer to a message: must stay 0.
    pub msgs_answered_twice: u64,
    /// A message received twice by the callee's devices: must stay 0.
    pub msgs_received_twice: u64,
    pub rounds: Vec<Round>,
}

impl Tally {
    /// The promises every fault must keep; panics naming the broken one.
    pub fn assert_promises(&self) {
        assert_eq!(
            self.calls_double_accepted, 0,
            "a call accepted on two devices: {self:#?}"
        );
        assert_eq!(
            self.msgs_answered_twice, 0,
            "a message answered twice: {self:#?}"
        );
        assert_eq!(
            self.msgs_received_twice, 0,
            "a message delivered twice: {self:#?}"
        );
        assert_eq!(
            self.msgs_unanswered, 0,
            "a message never answered: {self:#?}"
        );
        assert_eq!(
            self.msgs_answered_once + self.msgs_cut_short,
            self.msgs_sent,
            "every message answered once: {self:#?}"
        );
    }

    /// Rounds that succeeded, per worker.
    pub fn ok_rounds(&self) -> usize {
        self.rounds.iter().filter(|r| r.failed.is_none()).count()
    }

    /// How long after `since` every worker had completed a round begun after `since`: calls
    /// through every node work again. `None` if some worker never did.
    pub fn all_working_after(&self, since: Instant) -> Option<Duration> {
        (0..NODES.len())
            .map(|w| {
                self.rounds
                    .iter()
                    .filter(|r| r.worker == w && r.failed.is_none() && r.start >= since)
                    .map(|r| r.end)
                    .min()
            })
            .collect::<Option<Vec<_>>>()
            .and_then(|ends| ends.into_iter().max())
            .map(|end| end.duration_since(since))
    }

    /// Why rounds failed, counted.
    pub fn failures(&self) -> BTreeMap<String, usize> {
        let mut why = BTreeMap::new();
        for r in &self.rounds {
            if let Some(f) = &r.failed {
                *why.entry(f.clone()).or_default() += 1;
            }
        }
        why
    }

    /// One line for a test's output.
    pub fn summary(&self) -> String {
        format!(
            "rounds {} ({} ok), calls placed {}, accepted {}, double-accepted {}, messages sent {}, \
             answered once {} (delivered {}, failed {:?}), cut short {}, unanswered {}, answered twice {}, \
             received twice {}; round failures {:?}",
            self.rounds.len(),
            self.ok_rounds(),
            self.calls_placed,
            self.calls_accepted,
            self.calls_double_accepted,
            self.msgs_sent,
            self.msgs_answered_once,
            self.msgs_delivered,
            self.msgs_failed,
            self.msgs_cut_short,
            self.msgs_unanswered,
            self.msgs_answered_twice,
            self.msgs_received_twice,
            self.failures()
        )
    }
}

/// Where a client stands: which host it connects from, to which node, as whom.
#[derive(Clone)]
struct Place {
    netns: String,
    node: SocketAddr,
    user: String,
    device: String,
}

/// Connects from `place` and signs in, as a real client: refused or unreachable, it tries
/// again after 200 ms, until `stop`.
async fn sign_in(place: &Place, stop: &AtomicBool) -> Option<Raw> {
    while !stop.load(Ordering::Relaxed) {
        if let Some(raw) = try_sign_in(place).await {
            return Some(raw);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    None
}

async fn try_sign_in(place: &Place) -> Option<Raw> {
    let stream =
        crate::netns::connect_from(place.netns.clone(), place.node, Duration::from_secs(2))
            .await
            .ok()?;
    let mut raw = Raw::on(crate::wire::Wire::Tcp(tokio_util::codec::Framed::new(
        stream,
        FrameCodec::new(1 << 20),
    )));
    raw.user = confab_protocol::uri::normalize_user_uri(&place.user).ok()?;
    let hello = ClientMsg::Hello {
        resume: None,
        rid: Some(1),
        version: 1,
        user: place.user.clone(),
        token: token(&place.user),
        device: place.device.clone(),
        agent: None,
    };
    raw.try_send(&hello).await.ok()?;
    let deadline = Instant::now() + Duration::from_secs(10);
    match raw.try_next(deadline).await {
        Ok(Some(ServerMsg::Welcome { endpoint, .. })) => {
            raw.endpoint = endpoint;
            Some(raw)
        }
        _ => None,
    }
}

/// One caller and the callee's two devices, and what the caller's messages await.
struct Worker {
    id: usize,
    caller: Place,
    devices: [Place; 2],
    tally: Arc<Mutex<Tally>>,
    stop: Arc<AtomicBool>,
    /// Messages sent and not answered yet: rid → deadline.
    pending: HashMap<u32, Instant>,
    answered: HashSet<u32>,
    received: HashSet<String>,
}

/// What a device's ring ended as.
enum Ring {
    Won(String),
    Lost,
    Other(String),
}

impl Worker {
    fn tally(&self) -> std::sync::MutexGuard<'_, Tally> {
        self.tally.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Counts a frame the caller read: the answers to its messages.
    fn caller_saw(&mut self, m: &ServerMsg) {
        Self::note_answer(&mut self.pending, &mut self.answered, &self.tally, m);
    }

    /// [`Worker::caller_saw`] on the worker's parts, so that it can run beside the devices.
    fn note_answer(
        pending: &mut HashMap<u32, Instant>,
        answered: &mut HashSet<u32>,
        tally: &Mutex<Tally>,
        m: &ServerMsg,
    ) {
        let (rid, answer) = match m {
            ServerMsg::MessageDelivered { rid: Some(r), .. } => (*r, None),
            ServerMsg::MessageFailed {
                rid: Some(r),
                code,
                text,
                ..
            } => (*r, Some(format!("{code} {text}"))),
            _ => return,
        };
        let mut t = tally.lock().unwrap_or_else(|p| p.into_inner());
        if pending.remove(&rid).is_some() {
            answered.insert(rid);
            t.msgs_answered_once += 1;
            match answer {
                None => t.msgs_delivered += 1,
                Some(why) => *t.msgs_failed.entry(why).or_default() += 1,
            }
        } else if answered.contains(&rid) {
            t.msgs_answered_twice += 1;
        }
    }

    /// Counts a frame a device read, and acks a message the moment it arrives.
    async fn device_saw(
        received: &mut HashSet<String>,
        tally: &Mutex<Tally>,
        raw: &mut Raw,
        m: &ServerMsg,
    ) {
        if let ServerMsg::MessageReceived {
            call, msg, body, ..
        } = m
        {
            if let Body::Text(text) = body
                && text.starts_with('w')
                && !received.insert(text.clone())
            {
                tally
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .msgs_received_twice += 1;
            }
            let _ = raw
                .try_send(&ClientMsg::MessageAck {
                    call: call.clone(),
                    msg: *msg,
                })
                .await;
        }
    }

    async fn run(mut self) {
        let mut caller: Option<Raw> = None;
        let mut devices: [Option<Raw>; 2] = [None, None];
        let mut round = 0u64;
        while !self.stop.load(Ordering::Relaxed) {
            if caller.is_none() {
                caller = sign_in(&self.caller, &self.stop).await;
            }
            for (i, d) in devices.iter_mut().enumerate() {
                if d.is_none() {
                    *d = sign_in(&self.devices[i], &self.stop).await;
                }
            }
            let (Some(c), [Some(d0), Some(d1)]) = (caller.as_mut(), &mut devices) else {
                break;
            };
            round += 1;
            let start = Instant::now();
            let outcome = self.round(round, c, d0, d1).await;
            // Whatever happened, the caller waits for the answer of every message it sent.
            let connected = self.settle(c).await;
            let end = Instant::now();
            self.tally().rounds.push(Round {
                worker: self.id,
                start,
                end,
                failed: outcome.clone().err(),
            });
            if outcome.is_err() || !connected {
                // Start afresh: a client whose call went wrong signs in again (its node
                // ends what it held when the connection closes).
                caller = None;
                devices = [None, None];
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
        for raw in [caller, devices[0].take(), devices[1].take()]
            .into_iter()
            .flatten()
        {
            let mut raw = raw;
            let _ = raw.try_send(&ClientMsg::Bye { rid: None }).await;
        }
    }

    /// Reads the caller until `pred` matches, counting every frame.
    async fn caller_until(
        &mut self,
        c: &mut Raw,
        deadline: Instant,
        what: &str,
        pred: impl Fn(&ServerMsg) -> Option<Result<String, String>>,
    ) -> Result<String, String> {
        loop {
            match c.try_next(deadline).await {
                Ok(Some(m)) => {
                    self.caller_saw(&m);
                    if let Some(r) = pred(&m) {
                        return r;
                    }
                }
                Ok(None) => return Err(format!("caller: no {what} in time")),
                Err(_) => return Err(format!("caller: connection ended awaiting {what}")),
            }
        }
    }

    async fn round(
        &mut self,
        round: u64,
        c: &mut Raw,
        d0: &mut Raw,
        d1: &mut Raw,
    ) -> Result<(), String> {
        let tag = format!("w{}r{round}", self.id);
        let callee = self.devices[0].user.clone();
        let set_up = Instant::now() + Duration::from_millis(2 * NODE_TIMEOUT_MS + 8000);
        self.tally().calls_placed += 1;
        let rid = c.rid();
        c.try_send(&ClientMsg::CallEstablish {
            rid,
            to: callee,
            conversation: None,
            toast: Some(legs::text_toast(&tag)),
            sdp: offer(),
        })
        .await
        .map_err(|_| "caller: cannot send".to_owned())?;
        let call = self
            .caller_until(c, set_up, "call_created", |m| match m {
                ServerMsg::CallCreated { rid: r, call, .. } if *r == rid => Some(Ok(call.clone())),
                ServerMsg::Error { rid: r, code, .. } if *r == rid => {
                    Some(Err(format!("call_establish: {code:?}")))
                }
                _ => None,
            })
            .await?;
        // Both devices ring; each clicks accept the moment it does. Meanwhile the caller
        // watches its call: once it has ended before it was established (its forks lost), a
        // device that has not rung stops waiting, and once it is established, one that has not
        // rung within another second (its fork lost; a real device never knew of it) stops
        // too, so the round ends then, not at the devices' deadline. A device that has rung
        // still gets its accept's answer: a double accept would still be seen.
        let (given_up, give_up) = tokio::sync::watch::channel(None);
        let (rings, rec1, established) = {
            let (received, tally) = (&mut self.received, &self.tally);
            let (pending, answered) = (&mut self.pending, &mut self.answered);
            let mut rec1 = received.clone();
            let rings = async {
                tokio::join!(
                    ring(d0, &tag, set_up, give_up.clone(), received, tally),
                    ring(d1, &tag, set_up, give_up.clone(), &mut rec1, tally)
                )
            };
            let outcome = async {
                let outcome = loop {
                    let m = match c.try_next(set_up).await {
                        Ok(Some(m)) => m,
                        Ok(None) => break Err("caller: no established in time".to_owned()),
                        Err(_) => {
                            break Err("caller: connection ended awaiting established".to_owned());
                        }
                    };
                    Self::note_answer(pending, answered, tally, &m);
                    match m {
                        ServerMsg::CallState {
                            call: cl,
                            state: CallState::Established,
                            ..
                        } if cl == call => break Ok(()),
                        ServerMsg::CallState {
                            call: cl,
                            state: CallState::Terminated,
                            reason,
                            ..
                        } if cl == call => {
                            break Err(format!(
                                "call ended before established: {}",
                                reason.map_or(String::new(), |r| format!("{} {}", r.code, r.text))
                            ));
                        }
                        _ => {}
                    }
                };
                let grace = if outcome.is_ok() {
                    Duration::from_secs(1)
                } else {
                    Duration::ZERO
                };
                given_up.send_replace(Some(Instant::now() + grace));
                outcome
            };
            let (rings, established) = tokio::join!(rings, outcome);
            (rings, rec1, established)
        };
        let (r0, r1) = rings;
        self.received.extend(rec1);
        let wins: Vec<String> = [&r0, &r1]
            .iter()
            .filter_map(|r| match r {
                Ring::Won(call) => Some(call.clone()),
                _ => None,
            })
            .collect();
        {
            let mut t = self.tally();
            if !wins.is_empty() {
                t.calls_accepted += 1;
            }
            if wins.len() > 1 {
                t.calls_double_accepted += 1;
            }
        }
        let why_not = |r: &Ring| match r {
            Ring::Other(w) => w.clone(),
            Ring::Lost => "lost".to_owned(),
            Ring::Won(_) => "won".to_owned(),
        };
        established.map_err(|e| format!("{e} (devices: {}, {})", why_not(&r0), why_not(&r1)))?;
        let (winner, leg) = match (r0, r1) {
            (Ring::Won(leg), _) => (d0, leg),
            (_, Ring::Won(leg)) => (d1, leg),
            _ => return Err("established, but no device's accept answered ok".to_owned()),
        };
        // Messages: sent back to back; the winner acks each the moment it arrives.
        const MESSAGES: usize = 4;
        for i in 0..MESSAGES {
            let text = format!("{tag}m{i}");
            let rid = c.rid();
            c.try_send(&ClientMsg::Message {
                rid,
                call: call.clone(),
                content_type: "text/plain".into(),
                body: Body::Text(text.clone()),
            })
            .await
            .map_err(|_| "caller: cannot send".to_owned())?;
            if let Some(r) = rid {
                self.pending.insert(r, Instant::now() + ANSWER_DEADLINE);
            }
            self.tally().msgs_sent += 1;
        }
        let answers_by = Instant::now() + ANSWER_DEADLINE;
        let (received, tally) = (&mut self.received, &self.tally);
        let reading = async {
            let mut got = 0;
            while got < MESSAGES {
                match winner.try_next(answers_by).await {
                    Ok(Some(m)) => {
                        if matches!(&m, ServerMsg::MessageReceived { call: cl, body: Body::Text(t), toast: None, .. } if *cl == leg && t.starts_with(&tag))
                        {
                            got += 1;
                        }
                        Self::device_saw(received, tally, winner, &m).await;
                    }
                    _ => break,
                }
            }
            got
        };
        let got = reading.await;
        // The caller's answers (settled by `settle` too; here to see they were delivered).
        while !self.pending.is_empty() {
            match c.try_next(answers_by).await {
                Ok(Some(m)) => self.caller_saw(&m),
                _ => break,
            }
        }
        let delivered_all = got == MESSAGES;
        let reply = c
            .try_request(
                ClientMsg::CallTerminate {
                    rid: None,
                    call: call.clone(),
                },
                Instant::now() + Duration::from_millis(2 * NODE_TIMEOUT_MS + 5000),
            )
            .await
            .map_err(|e| {
                format!(
                    "terminate: {}",
                    e.split(':').next_back().unwrap_or("").trim()
                )
            })?;
        if !matches!(reply, ServerMsg::Ok { .. }) {
            return Err(format!("terminate answered {reply:?}"));
        }
        if !delivered_all {
            return Err(format!("{got} of {MESSAGES} messages reached the device"));
        }
        Ok(())
    }

    /// Reads the caller until every message it sent has its answer, or its deadline passed
    /// (counted unanswered), or the connection ended (counted cut short). Whether the
    /// connection still stands.
    async fn settle(&mut self, c: &mut Raw) -> bool {
        while let Some(deadline) = self.pending.values().max().copied() {
            match c.try_next(deadline).await {
                Ok(Some(m)) => self.caller_saw(&m),
                Ok(None) => {
                    let late: Vec<u32> = self
                        .pending
                        .iter()
                        .filter(|(_, d)| **d <= Instant::now())
                        .map(|(r, _)| *r)
                        .collect();
                    for r in late {
                        self.pending.remove(&r);
                        self.tally().msgs_unanswered += 1;
                    }
                }
                Err(_) => {
                    let n = self.pending.len() as u64;
                    self.pending.clear();
                    self.tally().msgs_cut_short += n;
                    return false;
                }
            }
        }
        true
    }
}

/// A device's part of a round: waits for the ring tagged `tag`, accepts the moment it comes,
/// and reads the answer.
async fn ring(
    d: &mut Raw,
    tag: &str,
    deadline: Instant,
    mut give_up: tokio::sync::watch::Receiver<Option<Instant>>,
    received: &mut HashSet<String>,
    tally: &Mutex<Tally>,
) -> Ring {
    let leg = loop {
        let stop_waiting = async {
            let at = match give_up.wait_for(Option::is_some).await {
                Ok(at) => at.unwrap_or(deadline),
                Err(_) => deadline,
            };
            tokio::time::sleep_until(at.min(deadline)).await;
        };
        let next = tokio::select! {
            next = d.try_next(deadline) => next,
            () = stop_waiting => return Ring::Other("stopped waiting".to_owned()),
        };
        match next {
            Ok(Some(ServerMsg::CallIncoming {
                call,
                toast:
                    Some(Toast {
                        body: Body::Text(t),
                        ..
                    }),
                ..
            })) if t == tag => break call,
            Ok(Some(m)) => Worker::device_saw(received, tally, d, &m).await,
            Ok(None) => return Ring::Other("never rang".to_owned()),
            Err(_) => return Ring::Other("connection ended".to_owned()),
        }
    };
    let rid = d.rid();
    if d.try_send(&ClientMsg::CallAccept {
        rid,
        call: leg.clone(),
        sdp: answer(),
    })
    .await
    .is_err()
    {
        return Ring::Other("cannot accept".to_owned());
    }
    loop {
        match d.try_next(deadline).await {
            Ok(Some(ServerMsg::Ok { rid: r })) if r == rid => return Ring::Won(leg),
            Ok(Some(ServerMsg::Error { rid: r, code, .. })) if r == rid => {
                return match code {
                    ErrorCode::AnsweredElsewhere => Ring::Lost,
                    other => Ring::Other(format!("accept: {other:?}")),
                };
            }
            Ok(Some(m)) => Worker::device_saw(received, tally, d, &m).await,
            Ok(None) => return Ring::Other("accept unanswered".to_owned()),
            Err(_) => return Ring::Other("connection ended".to_owned()),
        }
    }
}

/// A presence event a watcher saw: when, on which node, about whose sentinel, what.
#[derive(Debug, Clone)]
pub struct Seen {
    pub at: Instant,
    pub watcher: String,
    pub sentinel: String,
    pub availability: Availability,
}

/// The sentinel user signed in on `node` only.
pub fn sentinel(node: &str) -> String {
    format!("sip:sentinel-{node}@example.com")
}

/// The load on a [`FaultCluster`]: the workers and the watchers, until [`Load::stop`].
pub struct Load {
    stop: Arc<AtomicBool>,
    pub tally: Arc<Mutex<Tally>>,
    pub seen: Arc<Mutex<Vec<Seen>>>,
    tasks: tokio::task::JoinSet<()>,
}

impl Load {
    /// Starts three workers (caller on node i, the callee's devices on the two others),
    /// a sentinel on each node, and a watcher on each node subscribed to every sentinel;
    /// returns once every worker has completed a round and every watcher sees every sentinel.
    pub async fn start(cluster: &FaultCluster) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let tally = Arc::new(Mutex::new(Tally::default()));
        let seen = Arc::new(Mutex::new(Vec::new()));
        let mut tasks = tokio::task::JoinSet::new();
        let place = |node: &str, user: String, device: &str| Place {
            netns: cluster.net.netns_path(&clients_of(node)),
            node: cluster.node_addr(node),
            user,
            device: device.to_owned(),
        };
        for node in NODES {
            let p = place(node, sentinel(node), "sentinel");
            let stop = stop.clone();
            tasks.spawn(async move {
                // Signed in again whenever its node closes the connection (a restart).
                while let Some(mut raw) = sign_in(&p, &stop).await {
                    while !stop.load(Ordering::Relaxed) {
                        if raw
                            .try_next(Instant::now() + Duration::from_millis(200))
                            .await
                            .is_err()
                        {
                            break;
                        }
                    }
                    if stop.load(Ordering::Relaxed) {
                        let _ = raw.try_send(&ClientMsg::Bye { rid: None }).await;
                        break;
                    }
                }
            });
        }
        for (i, node) in NODES.iter().enumerate() {
            let w = Worker {
                id: i,
                caller: place(node, format!("sip:caller-{i}@example.com"), "desk"),
                devices: [1, 2].map(|k| {
                    let on = NODES[(i + k) % NODES.len()];
                    place(
                        on,
                        format!("sip:callee-{i}@example.com"),
                        &format!("dev-{on}"),
                    )
                }),
                tally: tally.clone(),
                stop: stop.clone(),
                pending: HashMap::new(),
                answered: HashSet::new(),
                received: HashSet::new(),
            };
            tasks.spawn(w.run());
            let p = place(node, format!("sip:watcher-{node}@example.com"), "watch");
            let (stop, seen, watcher) = (stop.clone(), seen.clone(), node.to_string());
            tasks.spawn(async move {
                while let Some(mut raw) = sign_in(&p, &stop).await {
                    let users = NODES.iter().map(|n| sentinel(n)).collect();
                    if raw
                        .try_send(&ClientMsg::Subscribe { rid: None, users })
                        .await
                        .is_err()
                    {
                        continue;
                    }
                    while !stop.load(Ordering::Relaxed) {
                        match raw
                            .try_next(Instant::now() + Duration::from_millis(200))
                            .await
                        {
                            Ok(Some(ServerMsg::Presence {
                                user, availability, ..
                            })) => seen.lock().unwrap_or_else(|p| p.into_inner()).push(Seen {
                                at: Instant::now(),
                                watcher: watcher.clone(),
                                sentinel: user,
                                availability,
                            }),
                            Ok(_) => {}
                            Err(_) => break,
                        }
                    }
                    if stop.load(Ordering::Relaxed) {
                        let _ = raw.try_send(&ClientMsg::Bye { rid: None }).await;
                        break;
                    }
                }
            });
        }
        let load = Load {
            stop,
            tally,
            seen,
            tasks,
        };
        let warm = Instant::now();
        load.wait_for(
            Duration::from_secs(60),
            "every worker's first round and every sentinel seen",
            |t, s| {
                t.all_working_after(warm).is_some()
                    && NODES.iter().all(|w| {
                        NODES.iter().all(|n| {
                            latest(s, w, &sentinel(n), Instant::now())
                                == Some(Availability::Available)
                        })
                    })
            },
        )
        .await;
        load
    }

    /// Polls (every 50 ms, at most `limit`) until `done` holds of the tally and the presence
    /// seen so far; panics with `what` and the tally otherwise.
    pub async fn wait_for(
        &self,
        limit: Duration,
        what: &str,
        done: impl Fn(&Tally, &[Seen]) -> bool,
    ) {
        let deadline = Instant::now() + limit;
        loop {
            {
                let t = self.tally.lock().unwrap_or_else(|p| p.into_inner());
                let s = self.seen.lock().unwrap_or_else(|p| p.into_inner());
                if done(&t, &s) {
                    return;
                }
                assert!(
                    Instant::now() < deadline,
                    "{what}: not within {limit:?}; {}",
                    t.summary()
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The presence events seen so far.
    pub fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Stops the clients (each settles its messages first, then says `bye`) and returns the
    /// tally.
    pub async fn stop(mut self) -> Tally {
        self.stop.store(true, Ordering::Relaxed);
        let deadline = Instant::now() + ANSWER_DEADLINE + Duration::from_secs(30);
        while tokio::time::timeout_at(deadline, self.tasks.join_next())
            .await
            .expect("the load stops within its answer deadline")
            .is_some()
        {}
        self.tally.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

/// What `watcher` last saw of `user` up to `at`.
pub fn latest(seen: &[Seen], watcher: &str, user: &str, at: Instant) -> Option<Availability> {
    seen.iter()
        .rfind(|s| s.watcher == watcher && s.sentinel == user && s.at <= at)
        .map(|s| s.availability)
}

/// The first time after `since` that `watcher` saw `user` as `availability`.
pub fn first_seen(
    seen: &[Seen],
    watcher: &str,
    user: &str,
    availability: Availability,
    since: Instant,
) -> Option<Instant> {
    seen.iter()
        .find(|s| {
            s.watcher == watcher
                && s.sentinel == user
                && s.at >= since
                && s.availability == availability
        })
        .map(|s| s.at)
}
