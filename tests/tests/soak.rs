//! Hardening, part 3: a soak with faults. Thirty clients (twenty users, ten of them on two
//! devices, so calls fork) call and message each other at random for a few seconds while some
//! misbehave: five drop their TCP connection abruptly mid-call, three send garbage frames (two
//! of them until the node closes them), two stop reading (and sending, like a hung app: the node
//! drops them after three silent heartbeats of a second). At the end:
//! - every `message` sent by a client that stayed connected had exactly one answer,
//!   `message_delivered` or `message_failed`, and nothing answered a message twice;
//! - after every client has said `bye` (or was dropped), the node's gauges of endpoints, call
//!   legs, fork arbiters and connections return to zero;
//! - the test process's resident memory (the node runs in it) is back near where it was.
//!
//! This is the only test of its binary: the metrics recorder is process-wide and a node
//! resets the gauges when it starts, so no other node may run beside this one.

mod scrape;

use confab_protocol::*;
use confab_tests::*;
use rmpv::Value;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

const CLIENTS: usize = 30;
const USERS: usize = 20;
/// How long clients act before the end phase.
const ACTIVE: Duration = Duration::from_secs(6);
const ACK_TIMEOUT_MS: u64 = 1500;
/// Short, so a client that stops reading and sending is dropped for silence during the soak.
const HEARTBEAT_MS: u64 = 1000;

/// What a client does wrong, if anything.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fault {
    None,
    /// Drops its TCP connection without a `bye`, preferably while in an established call.
    Drops,
    /// Sends garbage frames among its requests; with `close`, ends with one the node must
    /// close the connection for (zero-length or over max_frame).
    Garbage {
        close: Option<u8>,
    },
    /// Stops reading (and sending) after a while; its socket stays open until the end.
    StopsReading,
}

/// xorshift64*: reproducible randomness without a dependency.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
    fn chance(&mut self, percent: u64) -> bool {
        self.next() % 100 < percent
    }
}

fn user(i: usize) -> String {
    format!("sip:user{i}@example.com")
}

/// Totals over every client, for the final report and sanity floors.
#[derive(Default)]
struct Totals {
    sent: AtomicU64,
    delivered: AtomicU64,
    failed: AtomicU64,
    established: AtomicU64,
    garbage_answered: AtomicU64,
    dropped_mid_call: AtomicU64,
}

#[derive(Debug)]
struct Call {
    established: bool,
}

struct Client {
    c: Raw,
    name: String,
    rng: Rng,
    fault: Fault,
    calls: HashMap<String, Call>,
    /// Messages sent and not yet answered: rid -> call.
    outstanding: HashMap<u32, String>,
    /// Every message rid ever sent, to catch a second answer.
    answered: HashSet<u32>,
    message_rids: HashSet<u32>,
    /// Garbage frames sent (each answered by an error without rid).
    garbage: u64,
    garbage_errors: u64,
    failures: BTreeMap<u16, u64>,
    delivered: u64,
    totals: Arc<Totals>,
}

impl Client {
    fn check_reply_error(&mut self, rid: Option<u32>, code: ErrorCode, message: &str) {
        match rid {
            None => {
                assert!(
                    matches!(self.fault, Fault::Garbage { .. }),
                    "{}: error without rid: {code:?} {message}",
                    self.name
                );
                assert!(
                    matches!(code, ErrorCode::BadFrame | ErrorCode::UnknownType),
                    "{}: {code:?}",
                    self.name
                );
                self.garbage_errors += 1;
                self.totals.garbage_answered.fetch_add(1, Ordering::Relaxed);
            }
            Some(rid) => {
                assert!(
                    !self.message_rids.contains(&rid),
                    "{}: a message was answered with error {code:?}",
                    self.name
                );
                assert!(
                    matches!(
                        code,
                        ErrorCode::UnknownCall
                            | ErrorCode::InvalidState
                            | ErrorCode::AnsweredElsewhere
                            | ErrorCode::UnknownConversation
                    ),
                    "{}: unexpected error {code:?}: {message}",
                    self.name
                );
            }
        }
    }

    fn answer(&mut self, rid: Option<u32>, what: &str) {
        let rid = rid.unwrap_or_else(|| panic!("{}: {what} without rid", self.name));
        assert!(
            self.answered.insert(rid),
            "{}: message rid {rid} answered twice (again {what})",
            self.name
        );
        assert!(
            self.outstanding.remove(&rid).is_some(),
            "{}: {what} for rid {rid}, which is no message of ours",
            self.name
        );
    }

    /// Handles one frame from the node.
    async fn on_frame(&mut self, m: ServerMsg) {
        match m {
            ServerMsg::CallCreated { call, .. } => {
                self.calls.insert(call, Call { established: false });
            }
            ServerMsg::CallIncoming { call, .. } => {
                self.calls.insert(call.clone(), Call { established: false });
                // Mostly accept at once; sometimes decline; sometimes let it ring (the arbiter
                // then asks for an auto-accept, or gives up).
                match self.rng.below(10) {
                    0 => {
                        let code = if self.rng.chance(30) { 603 } else { 486 };
                        let rid = self.c.rid();
                        self.c
                            .send(&ClientMsg::CallDecline {
                                rid,
                                call,
                                code: Some(code),
                            })
                            .await;
                    }
                    1 => {}
                    _ => self.accept(call).await,
                }
            }
            // Most auto-accept requests are honoured.
            ServerMsg::AutoAcceptNeeded { call } if self.rng.chance(80) => {
                self.accept(call).await;
            }
            ServerMsg::CallState { call, state, .. } => match state {
                CallState::Established => {
                    if let Some(c) = self.calls.get_mut(&call) {
                        if !c.established {
                            self.totals.established.fetch_add(1, Ordering::Relaxed);
                        }
                        c.established = true;
                    }
                }
                CallState::Terminated => {
                    self.calls.remove(&call);
                }
                _ => {}
            },
            // A few acks are withheld: their senders see 408 (or 481 if the call ends).
            ServerMsg::MessageReceived { call, msg, .. } if self.rng.chance(95) => {
                self.c.send(&ClientMsg::MessageAck { call, msg }).await;
            }
            ServerMsg::MessageDelivered { rid, .. } => {
                self.answer(rid, "message_delivered");
                self.delivered += 1;
                self.totals.delivered.fetch_add(1, Ordering::Relaxed);
            }
            ServerMsg::MessageFailed { rid, code, .. } => {
                self.answer(rid, "message_failed");
                *self.failures.entry(code).or_default() += 1;
                self.totals.failed.fetch_add(1, Ordering::Relaxed);
            }
            ServerMsg::Error { rid, code, message } => self.check_reply_error(rid, code, &message),
            ServerMsg::Welcome { .. } | ServerMsg::Shutdown { .. } => {
                panic!("{}: unexpected {m:?}", self.name)
            }
            _ => {}
        }
    }

    async fn accept(&mut self, call: String) {
        let rid = self.c.rid();
        self.c
            .send(&ClientMsg::CallAccept {
                rid,
                call,
                sdp: answer(),
            })
            .await;
    }

    /// One random action.
    async fn act(&mut self) {
        let established: Vec<String> = self
            .calls
            .iter()
            .filter(|(_, c)| c.established)
            .map(|(id, _)| id.clone())
            .collect();
        let roll = self.rng.below(100);
        if roll < 12 && self.calls.len() < 4 {
            // Call a random user (possibly one's own other device).
            let to = user(self.rng.below(USERS));
            let toast = self.rng.chance(30).then(|| Toast {
                content_type: "text/plain".into(),
                body: Body::Text("ring ring".into()),
            });
            let rid = self.c.rid();
            self.c
                .send(&ClientMsg::CallEstablish {
                    rid,
                    to,
                    conversation: None,
                    toast,
                    sdp: offer(),
                })
                .await;
        } else if roll < 70 && !self.calls.is_empty() {
            // A message on a call, established or not (a ringing one fails 481).
            let ids: Vec<&String> = if established.is_empty() || self.rng.chance(5) {
                self.calls.keys().collect()
            } else {
                established.iter().collect()
            };
            let call = ids[self.rng.below(ids.len())].clone();
            let rid = self.c.rid().expect("a rid");
            let max = if self.rng.chance(5) { 8000 } else { 200 };
            let len = 1 + self.rng.below(max);
            self.c
                .send(&ClientMsg::Message {
                    rid: Some(rid),
                    call: call.clone(),
                    content_type: "text/plain".into(),
                    body: Body::Text("m".repeat(len)),
                })
                .await;
            self.outstanding.insert(rid, call);
            self.message_rids.insert(rid);
            self.totals.sent.fetch_add(1, Ordering::Relaxed);
        } else if roll < 75 && !established.is_empty() {
            let call = established[self.rng.below(established.len())].clone();
            let active = self.rng.chance(60);
            self.c.send(&ClientMsg::Composing { call, active }).await;
        } else if roll < 82 && !self.calls.is_empty() {
            let ids: Vec<String> = self.calls.keys().cloned().collect();
            let call = ids[self.rng.below(ids.len())].clone();
            let rid = self.c.rid();
            self.c.send(&ClientMsg::CallTerminate { rid, call }).await;
        } else if roll < 86 {
            let activity =
                [Activity::Active, Activity::Inactive, Activity::Away][self.rng.below(3)];
            let rid = self.c.rid();
            self.c
                .send(&ClientMsg::DeviceState {
                    rid,
                    activity,
                    idle_ms: None,
                })
                .await;
        } else if roll < 90 && matches!(self.fault, Fault::Garbage { .. }) {
            self.send_garbage().await;
        }
    }

    async fn send_garbage(&mut self) {
        let map = |entries: &[(&str, Value)]| {
            let v = Value::Map(
                entries
                    .iter()
                    .map(|(k, v)| (Value::from(*k), v.clone()))
                    .collect(),
            );
            let mut buf = Vec::new();
            rmpv::encode::write_value(&mut buf, &v).expect("encode");
            buf
        };
        let garbage: [Vec<u8>; 6] = [
            vec![0xc1, 0xc1, 0xc1],
            vec![0x93, 1, 2, 3],
            map(&[("type", Value::from("teleport"))]),
            map(&[("type", Value::from("message")), ("call", Value::from(7))]),
            map(&[
                ("type", Value::from("message_ack")),
                ("call", Value::from("x")),
                ("msg", Value::from(-1)),
            ]),
            (0..64)
                .map(|_| self.rng.next() as u8)
                .chain([0xc1])
                .collect(),
        ];
        let g = &garbage[self.rng.below(garbage.len())];
        // Random bytes may happen to start a valid map; the 0xc1 (never valid) byte at the
        // end of the last one keeps it malformed whatever came before.
        let mut framed = (g.len() as u32).to_be_bytes().to_vec();
        framed.extend_from_slice(g);
        self.c.send_bytes(&framed).await;
        self.garbage += 1;
    }

    /// Pings when nothing was sent for a while, as a real client does every heartbeat.
    async fn keepalive(&mut self, last_ping: &mut Instant) {
        if last_ping.elapsed() >= Duration::from_millis(HEARTBEAT_MS / 3) {
            let rid = self.c.rid();
            self.c.send(&ClientMsg::Ping { rid }).await;
            *last_ping = Instant::now();
        }
    }

    /// The next frame within `within`, or `None`.
    async fn poll(&mut self, within: Duration) -> Option<ServerMsg> {
        tokio::time::timeout(within, self.c.recv()).await.ok()
    }
}

/// Runs one client; returns its stream if it must be kept open (a non-reader) until the end.
async fn run_client(
    addr: std::net::SocketAddr,
    index: usize,
    fault: Fault,
    seed: u64,
    totals: Arc<Totals>,
) -> Option<Raw> {
    let u = index % USERS;
    let device = if index < USERS { "laptop" } else { "phone" };
    let c = Raw::sign_in(addr, &user(u), device).await;
    let mut cl = Client {
        c,
        name: format!("client{index}({fault:?})"),
        rng: Rng(seed ^ (index as u64 + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1),
        fault,
        calls: HashMap::new(),
        outstanding: HashMap::new(),
        answered: HashSet::new(),
        message_rids: HashSet::new(),
        garbage: 0,
        garbage_errors: 0,
        failures: BTreeMap::new(),
        delivered: 0,
        totals,
    };
    // Watch a few users' presence.
    let users = (0..3).map(|_| user(cl.rng.below(USERS))).collect();
    let rid = cl.c.rid();
    cl.c.send(&ClientMsg::Subscribe { rid, users }).await;

    let start = Instant::now();
    // When a faulty client misbehaves for good.
    let fault_at = start + Duration::from_millis(1000 + cl.rng.below(3500) as u64);
    let mut next_act = start;
    let mut last_ping = start;
    loop {
        let now = Instant::now();
        if now >= start + ACTIVE {
            break;
        }
        if now >= fault_at {
            match fault {
                Fault::Drops
                    if cl.calls.values().any(|c| c.established)
                        || now >= fault_at + Duration::from_secs(1) =>
                {
                    // Abrupt: the socket is dropped with whatever is queued either way.
                    if cl.calls.values().any(|c| c.established) {
                        cl.totals.dropped_mid_call.fetch_add(1, Ordering::Relaxed);
                    }
                    return None;
                }
                Fault::StopsReading => return Some(cl.c),
                Fault::Garbage { close: Some(kind) } => {
                    let bytes: Vec<u8> = if kind == 0 {
                        vec![0, 0, 0, 0]
                    } else {
                        u32::MAX.to_be_bytes().to_vec()
                    };
                    cl.c.send_bytes(&bytes).await;
                    // Whatever was in flight, then the error, then the close.
                    let frames = cl.c.expect_closed().await;
                    let want = if kind == 0 {
                        ErrorCode::BadFrame
                    } else {
                        ErrorCode::FrameTooLarge
                    };
                    assert!(
                        matches!(frames.last(), Some(ServerMsg::Error { rid: None, code, .. }) if *code == want),
                        "{}: {:?}",
                        cl.name,
                        frames.last()
                    );
                    return None;
                }
                _ => {}
            }
        }
        cl.keepalive(&mut last_ping).await;
        if now >= next_act {
            cl.act().await;
            next_act = now + Duration::from_millis(10 + cl.rng.below(40) as u64);
        }
        let wait = next_act.saturating_duration_since(Instant::now());
        if let Some(m) = cl.poll(wait.max(Duration::from_millis(1))).await {
            cl.on_frame(m).await;
        }
    }

    // End phase: stop acting, keep answering (accepts, acks) until every message is answered,
    // then `bye`, reading everything up to the close.
    let deadline = Instant::now() + Duration::from_millis(ACK_TIMEOUT_MS + 3000);
    while !cl.outstanding.is_empty() && Instant::now() < deadline {
        cl.keepalive(&mut last_ping).await;
        if let Some(m) = cl.poll(Duration::from_millis(50)).await {
            cl.on_frame(m).await;
        }
    }
    let rid = cl.c.rid();
    cl.c.send(&ClientMsg::Bye { rid }).await;
    // Nothing more is sent after the bye: only the answers still on their way are counted.
    for m in cl.c.expect_closed().await {
        match m {
            ServerMsg::MessageDelivered { rid, .. } => cl.answer(rid, "message_delivered"),
            ServerMsg::MessageFailed { rid, .. } => cl.answer(rid, "message_failed"),
            ServerMsg::Error { rid, code, message } => cl.check_reply_error(rid, code, &message),
            _ => {}
        }
    }
    assert!(
        cl.outstanding.is_empty(),
        "{}: messages never answered: {:?}",
        cl.name,
        cl.outstanding
    );
    if let Fault::Garbage { .. } = fault {
        assert_eq!(
            cl.garbage, cl.garbage_errors,
            "{}: garbage unanswered",
            cl.name
        );
    }
    None
}

/// Resident set size of this process, in KiB.
fn rss_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

const GAUGES: [&str; 4] = [
    "confab_endpoints",
    "confab_calls",
    "confab_fork_arbiters",
    "confab_connections",
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn soak_with_faults_leaves_nothing_behind() {
    let node = start_node(|s| {
        s.flow.ack_timeout_ms = ACK_TIMEOUT_MS;
        s.server.heartbeat_ms = HEARTBEAT_MS;
        s.limits.outbound_queue = 128;
    });
    let m0 = scrape::scrape(node.metrics_addr);
    for g in GAUGES {
        assert_eq!(m0.get(g, &[]), 0.0, "{g} before the soak");
    }
    let rss_before = rss_kib();
    let seed = seed_from_env("SOAK_SEED");
    eprintln!("soak seed {seed} (SOAK_SEED={seed} to replay the same choices)");

    // Clients 0..20 are each user's laptop, 20..30 the phones of users 0..10.
    let fault = |i: usize| match i {
        3 | 8 | 13 | 21 | 26 => Fault::Drops,
        5 => Fault::Garbage { close: Some(0) },
        11 => Fault::Garbage { close: Some(1) },
        17 => Fault::Garbage { close: None },
        2 | 24 => Fault::StopsReading,
        _ => Fault::None,
    };
    let totals = Arc::new(Totals::default());
    let tasks: Vec<_> = (0..CLIENTS)
        .map(|i| tokio::spawn(run_client(node.addr, i, fault(i), seed, totals.clone())))
        .collect();
    let mut kept_open = Vec::new();
    for (i, t) in tasks.into_iter().enumerate() {
        match t.await {
            Ok(Some(raw)) => kept_open.push(raw),
            Ok(None) => {}
            Err(e) => panic!("client {i} failed: {e}"),
        }
    }
    // The non-readers go last, still without reading.
    drop(kept_open);

    let t = &totals;
    let (sent, delivered, failed) = (
        t.sent.load(Ordering::Relaxed),
        t.delivered.load(Ordering::Relaxed),
        t.failed.load(Ordering::Relaxed),
    );
    eprintln!(
        "soak: {sent} messages sent, {delivered} delivered, {failed} failed; {} legs established; {} garbage frames answered; {} of 5 dropped mid-call",
        t.established.load(Ordering::Relaxed),
        t.garbage_answered.load(Ordering::Relaxed),
        t.dropped_mid_call.load(Ordering::Relaxed)
    );
    // The soak did exercise the node.
    assert!(delivered >= 200, "only {delivered} messages delivered");
    assert!(t.established.load(Ordering::Relaxed) >= 30);

    // Every endpoint, call leg, fork arbiter and connection goes away.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let m = scrape::scrape(node.metrics_addr);
        let left: Vec<(&str, f64)> = GAUGES
            .iter()
            .map(|g| (*g, m.get(g, &[])))
            .filter(|(_, v)| *v != 0.0)
            .collect();
        if left.is_empty() {
            eprintln!(
                "soak: slow consumers dropped {}, frames rejected {:?}",
                m.get("confab_slow_consumers_total", &[]),
                ["bad_frame", "unknown_type", "frame_too_large"]
                    .map(|r| m.get("confab_frames_rejected_total", &[("reason", r)]))
            );
            break;
        }
        assert!(
            Instant::now() < deadline,
            "left behind after the soak: {left:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // Memory: the allocator keeps some of what it used, so the bound is generous; a leak of
    // per-call or per-endpoint state over thousands of calls and messages would exceed it.
    let rss_after = rss_kib();
    eprintln!("soak: RSS {rss_before} KiB before, {rss_after} KiB after");
    if rss_before > 0 {
        assert!(
            rss_after < rss_before + 32 * 1024,
            "RSS grew from {rss_before} KiB to {rss_after} KiB"
        );
    }
}
