//! A cluster of nodes over NATS (design §3).
//!
//! - **Routing**: every node subscribes to `confab.node.<id>`; an [`Envelope`] addressed to an
//!   actor on another node is published there. Publishing goes through one task and one NATS
//!   connection per node, so envelopes from one node to another arrive in the order sent.
//!   Received envelopes are delivered through local registries (endpoints, legs whose endpoint
//!   is remote, arbiters with remote forks).
//! - **Directory**: the JetStream KV bucket `confab-endpoints`, one record per endpoint, written
//!   only by its owning node; every node keeps a cache fed by one watch (initial values, then
//!   changes), which also feeds the presence shards with the other nodes' endpoints.
//! - **Liveness**: heartbeats on `confab.nodes.heartbeat` every `node_timeout / 3`; a node
//!   unheard for `node_timeout` is dead: every survivor drops its records and ends what
//!   referenced it, and the living node with the smallest id deletes its records from the KV.

pub mod directory;
mod quota;
pub mod wire;
mod writes;

use actix::Addr;
use async_nats::jetstream::kv;
use bytes::Bytes;
use confab_protocol::{ServerMsg, decode_server};
use dashmap::DashMap;
use futures::StreamExt;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use thiserror::Error;
use tokio::sync::mpsc;
use tokio::time::Instant;

use crate::arbiter::{ArbiterMsg, ForkArbiter};
use crate::call::leg::{CallLeg, LegMsg};
use crate::endpoint::{Endpoint, EndpointMsg, RemoteFork};
use crate::metrics as m;
use crate::presence::rank::Publication;
use crate::presence::{PresenceMsg, PresenceShards};
use crate::settings;
use quota::EnvelopeQuota;
use wire::{Envelope, Heartbeat, Record, WireLegMsg};
use writes::KvOp;

pub const BUCKET: &str = "confab-endpoints";
/// How long loading the directory waits for its next record before it gives up (a healthy
/// NATS sends them back to back).
const LOAD_STALL: Duration = Duration::from_secs(5);
/// Attempts at reloading the directory after a rejoin.
const RELOAD_ATTEMPTS: u32 = 5;
pub const HEARTBEAT_SUBJECT: &str = "confab.nodes.heartbeat";

#[derive(Debug, Error)]
pub enum ClusterError {
    #[error("cannot connect to NATS at {url}: {reason}")]
    Connect { url: String, reason: String },
    #[error("cannot open the JetStream KV bucket {BUCKET}: {0}")]
    Kv(String),
    #[error("cannot subscribe: {0}")]
    Subscribe(String),
    #[error("cannot start the NATS runtime: {0}")]
    Runtime(String),
}

/// A remote endpoint as the cache knows it.
#[derive(Debug, Clone)]
pub struct RemoteEndpoint {
    pub id: String,
    pub record: Record,
    /// The KV revision the record was read at: a purge deletes only that revision, never a
    /// record its owner has written since (a rejoin).
    pub revision: u64,
}

/// What the publisher task sends, in order.
enum Outgoing {
    Publish(String, Bytes),
    /// An envelope a client's requests drove: it holds a place in [`Cluster::quota`] until the
    /// client has taken it.
    Bounded(String, Bytes),
    /// Answered once everything queued before it was handed to the client.
    Flush(tokio::sync::oneshot::Sender<()>),
}

struct NodeSeen {
    epoch: u64,
    last: Instant,
}

/// This node's membership in the cluster.
pub struct Cluster {
    pub node_id: String,
    /// This run's epoch (its start time in unix ms); a rejoin takes a new one.
    epoch: AtomicU64,
    pub timeout: Duration,
    kv: kv::Store,
    publish_tx: mpsc::UnboundedSender<Outgoing>,
    /// Bounds the envelopes clients' requests drive, waiting in `publish_tx`, by count and bytes
    /// (`cluster.max_queued_envelopes`, `cluster.max_queued_bytes`).
    quota: Arc<EnvelopeQuota>,
    kv_tx: mpsc::UnboundedSender<KvOp>,
    /// Endpoints signed in here, by id (for envelopes addressed to them).
    pub endpoints: DashMap<String, Addr<Endpoint>>,
    /// Legs on this node whose endpoint is on another node: call id → (that node, leg).
    pub legs: DashMap<String, (String, Addr<CallLeg>)>,
    /// Arbiters on this node with forks on other nodes.
    pub arbiters: DashMap<String, Addr<ForkArbiter>>,
    /// This node's own records, by endpoint id.
    own: DashMap<String, Record>,
    /// This node's own endpoint ids, by user (for the cluster-wide `endpoints_per_user`).
    own_by_user: DashMap<String, Vec<String>>,
    /// `limits.endpoints_per_user`, held across the cluster (see [`Cluster::enforce_limit`]).
    endpoints_per_user: usize,
    /// Other nodes' endpoints, by user.
    remote: DashMap<String, Vec<RemoteEndpoint>>,
    /// Endpoints in `remote` (all users).
    remote_len: AtomicUsize,
    /// The NATS client's connection state, from its events.
    nats_connected: Arc<AtomicBool>,
    nodes: Mutex<HashMap<String, NodeSeen>>,
    /// The latest run of each node declared dead: its records and those of earlier runs are
    /// ignored. One entry per node id, so it stays small however often nodes come and go.
    dead: Mutex<HashMap<String, u64>>,
    presence: PresenceShards,
    rt: tokio::runtime::Handle,
    stop: Mutex<Option<tokio::sync::oneshot::Sender<()>>>,
    /// Other nodes whose run (dead, or older than one known) was told to rejoin, and when: a
    /// node is asked again only after `node_timeout`, whichever run is heard, in case the one
    /// `Rejoin` envelope (core NATS, at most once) was lost, and so that a node that cannot
    /// rejoin above the run asked about (an older version, which ignores `above`) is not asked
    /// at the pace of NATS round trips.
    told: Mutex<HashMap<String, Instant>>,
    /// The reload a rejoin started; a later rejoin stops it before starting its own, so two
    /// never share [`Cluster::loading`].
    reload: Mutex<Option<tokio::task::JoinHandle<()>>>,
    /// Tests: heartbeats are not sent until then (a node cut off from the others).
    muted_until: Mutex<Option<Instant>>,
    /// Tests: how far this node's wall clock is set back (see
    /// [`Cluster::restart_with_clock_set_back`]).
    clock_set_back_ms: AtomicU64,
    /// Tests: this many bounded envelopes are still to be lost (see
    /// [`Cluster::lose_bounded_envelopes`]).
    lose_bounded: AtomicUsize,
    /// Tests: the next `ForkAdopted` envelope is lost (see [`Cluster::lose_next_fork_adopted`]).
    lose_fork_adopted: AtomicBool,
    /// While [`Cluster::load`] runs: the keys the watch deleted meanwhile, with the revision.
    loading: Mutex<Option<HashMap<String, u64>>>,
    /// Set once the graceful leave has started: no record is written after its deletes.
    leaving: AtomicBool,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    match m.lock() {
        Ok(g) => g,
        Err(p) => p.into_inner(),
    }
}

impl Cluster {
    /// Connects to NATS, opens the bucket, cleans this node's stale records, loads the cache and
    /// starts the routing, watch and liveness tasks. The NATS client and those tasks run on a
    /// runtime of their own (thread `confab-nats`), apart from the actors' workers.
    pub async fn start(
        cfg: &settings::Cluster,
        node_id: String,
        presence: PresenceShards,
        endpoints_per_user: usize,
    ) -> Result<Arc<Cluster>, ClusterError> {
        let (handle_tx, handle_rx) = tokio::sync::oneshot::channel();
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        std::thread::Builder::new()
            .name("confab-nats".into())
            .spawn(move || {
                let rt = match tokio::runtime::Builder::new_multi_thread()
                    .worker_threads(1)
                    .thread_name("confab-nats")
                    .enable_all()
                    .build()
                {
                    Ok(rt) => rt,
                    Err(e) => {
                        let _ = handle_tx.send(Err(e.to_string()));
                        return;
                    }
                };
                let _ = handle_tx.send(Ok(rt.handle().clone()));
                rt.block_on(async {
                    let _ = stop_rx.await;
                });
                rt.shutdown_timeout(Duration::from_millis(100));
            })
            .map_err(|e| ClusterError::Runtime(e.to_string()))?;
        let rt = handle_rx
            .await
            .map_err(|e| ClusterError::Runtime(e.to_string()))?
            .map_err(ClusterError::Runtime)?;
        let cfg = cfg.clone();
        rt.spawn(Self::start_inner(
            cfg,
            node_id,
            presence,
            endpoints_per_user,
            rt.clone(),
            stop_tx,
        ))
        .await
        .map_err(|e| ClusterError::Runtime(e.to_string()))?
    }

    async fn start_inner(
        cfg: settings::Cluster,
        node_id: String,
        presence: PresenceShards,
        endpoints_per_user: usize,
        rt: tokio::runtime::Handle,
        stop: tokio::sync::oneshot::Sender<()>,
    ) -> Result<Arc<Cluster>, ClusterError> {
        let urls: Vec<async_nats::ServerAddr> = cfg
            .nats_url
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(|s| {
                s.parse()
                    .map_err(|e: std::io::Error| ClusterError::Connect {
                        url: s.to_owned(),
                        reason: e.to_string(),
                    })
            })
            .collect::<Result<_, _>>()?;
        let connect_err = |reason: String| ClusterError::Connect {
            url: cfg.nats_url.clone(),
            reason,
        };
        let nats_connected = Arc::new(AtomicBool::new(false));
        let events = nats_connected.clone();
        let client = tokio::time::timeout(
            Duration::from_millis(cfg.connect_timeout_ms),
            async_nats::ConnectOptions::new()
                .name(format!("confab-{node_id}"))
                .reconnect_delay_callback(reconnect_delay)
                .event_callback(move |event| {
                    let events = events.clone();
                    async move { nats_event(&events, event) }
                })
                .connect(urls),
        )
        .await
        .map_err(|_| connect_err("timed out".to_owned()))?
        .map_err(|e| connect_err(e.to_string()))?;
        // Connected now (the event may come later than this).
        set_nats_connected(&nats_connected, true);
        let js = async_nats::jetstream::new(client.clone());
        let kv = match js.get_key_value(BUCKET).await {
            Ok(kv) => kv,
            Err(_) => match js
                .create_key_value(kv::Config {
                    bucket: BUCKET.to_owned(),
                    history: 1,
                    ..Default::default()
                })
                .await
            {
                Ok(kv) => kv,
                // Another node may have created it meanwhile.
                Err(e) => js
                    .get_key_value(BUCKET)
                    .await
                    .map_err(|_| ClusterError::Kv(e.to_string()))?,
            },
        };
        let inbox = client
            .subscribe(node_subject(&node_id))
            .await
            .map_err(|e| ClusterError::Subscribe(e.to_string()))?;
        let beats = client
            .subscribe(HEARTBEAT_SUBJECT)
            .await
            .map_err(|e| ClusterError::Subscribe(e.to_string()))?;
        // Changes from now on; the values already there are read below, before any change is
        // applied (a value read twice is applied twice, which is harmless).
        let watch = kv
            .watch_all()
            .await
            .map_err(|e| ClusterError::Kv(e.to_string()))?;
        let (publish_tx, publish_rx) = mpsc::unbounded_channel();
        let quota = Arc::new(EnvelopeQuota::new(
            cfg.max_queued_envelopes,
            cfg.max_queued_bytes,
        ));
        let (kv_tx, kv_rx) = mpsc::unbounded_channel();
        // The start time: a later run of a node has a larger epoch, so a record of an earlier
        // run is recognised as stale whatever order things arrive in.
        let epoch = wire::unix_ms().max(1);
        let cluster = Arc::new(Cluster {
            node_id,
            epoch: AtomicU64::new(epoch),
            timeout: Duration::from_millis(
                cfg.node_timeout_ms
                    .unwrap_or(3000)
                    .max(crate::settings::MIN_NODE_TIMEOUT_MS),
            ),
            kv: kv.clone(),
            publish_tx,
            quota: quota.clone(),
            kv_tx,
            endpoints: DashMap::new(),
            legs: DashMap::new(),
            arbiters: DashMap::new(),
            own: DashMap::new(),
            own_by_user: DashMap::new(),
            endpoints_per_user,
            remote: DashMap::new(),
            remote_len: AtomicUsize::new(0),
            nats_connected,
            nodes: Mutex::new(HashMap::new()),
            dead: Mutex::new(HashMap::new()),
            presence,
            rt: rt.clone(),
            stop: Mutex::new(Some(stop)),
            told: Mutex::new(HashMap::new()),
            reload: Mutex::new(None),
            muted_until: Mutex::new(None),
            clock_set_back_ms: AtomicU64::new(0),
            lose_bounded: AtomicUsize::new(0),
            lose_fork_adopted: AtomicBool::new(false),
            loading: Mutex::new(None),
            leaving: AtomicBool::new(false),
        });
        tracing::info!(node = %cluster.node_id, epoch, url = %cfg.nats_url, "joined the cluster");
        // The values already there are applied before the node accepts anyone.
        cluster.load().await?;
        rt.spawn(publish_loop(client.clone(), publish_rx, quota));
        rt.spawn(writes::write_loop(kv.clone(), kv_rx));
        rt.spawn(inbox_loop(cluster.clone(), inbox));
        rt.spawn(heartbeat_loop(cluster.clone(), beats));
        rt.spawn(watch_loop(cluster.clone(), watch));
        rt.spawn(liveness_loop(cluster.clone()));
        metrics::gauge!(m::CLUSTER_NODES).set(1.0);
        metrics::gauge!(m::CLUSTER_DIRECTORY_WRITES_PENDING).set(0.0);
        for direction in ["in", "out"] {
            metrics::counter!(m::CLUSTER_ENVELOPES, "direction" => direction).increment(0);
        }
        metrics::counter!(m::CLUSTER_ENVELOPES_DROPPED).increment(0);
        cluster.directory_gauge();
        Ok(cluster)
    }

    /// Shutdown: legs here whose endpoint is on another node end as on a single node (503
    /// "Server shutting down"); the legs whose endpoint is here are ended by their endpoint.
    pub fn end_remote_legs(&self) {
        for entry in self.legs.iter() {
            entry.value().1.do_send(LegMsg::Terminate {
                rid: None,
                cause: crate::call::leg::TerminateCause::Shutdown,
            });
        }
    }

    /// Shutdown: waits until no leg here serves an endpoint elsewhere (each lingers until its
    /// endpoint released it), at most `deadline`.
    pub async fn remote_legs_gone(&self, deadline: Duration) {
        let _ = tokio::time::timeout(deadline, async {
            while !self.legs.is_empty() {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
        .await;
    }

    /// True while the NATS client is connected; a node that lost NATS is degraded (its
    /// `/health` answers 503).
    pub fn nats_connected(&self) -> bool {
        self.nats_connected.load(Ordering::Relaxed)
    }

    /// Directory records this node knows: its own and its cache of the other nodes'.
    pub fn directory_len(&self) -> usize {
        self.own.len() + self.remote_len.load(Ordering::Relaxed)
    }

    fn directory_gauge(&self) {
        metrics::gauge!(m::CLUSTER_DIRECTORY_ENDPOINTS).set(self.directory_len() as f64);
    }

    /// This run's epoch.
    pub fn epoch(&self) -> u64 {
        self.epoch.load(Ordering::Relaxed)
    }

    /// Reads every record of the bucket into the cache. During a rejoin the watch runs
    /// meanwhile: a record it deletes after the load read it must not come back from the load.
    async fn load(&self) -> Result<(), ClusterError> {
        *lock(&self.loading) = Some(HashMap::new());
        let result = self.load_keys().await;
        *lock(&self.loading) = None;
        result
    }

    /// Reads the last record of every key through a last-per-subject consumer (values
    /// included, one pass). It stops at the first record at or past the stream's last sequence
    /// as read before: every older record has been delivered by then (they come in sequence
    /// order), and anything newer reaches the watch, which was already running. async-nats's
    /// `keys()` ends on the consumer's pending count instead, which never reaches 0 when a
    /// record counted at the start is replaced meanwhile (history 1), so it could hang while
    /// other nodes write.
    async fn load_keys(&self) -> Result<(), ClusterError> {
        let kv_err = |e: &dyn std::fmt::Display| ClusterError::Kv(e.to_string());
        let last = self
            .kv
            .stream
            .get_info()
            .await
            .map_err(|e| kv_err(&e))?
            .state
            .last_sequence;
        if last == 0 {
            return Ok(());
        }
        let mut records = self
            .kv
            .watch_with_history(">")
            .await
            .map_err(|e| kv_err(&e))?;
        loop {
            let next = tokio::time::timeout(LOAD_STALL, records.next())
                .await
                .map_err(|_| ClusterError::Kv(format!("no record within {LOAD_STALL:?}")))?;
            let e = match next {
                Some(Ok(e)) => e,
                Some(Err(e)) => return Err(kv_err(&e)),
                None => return Ok(()),
            };
            let deleted_since = lock(&self.loading)
                .as_ref()
                .and_then(|d| d.get(&e.key).copied())
                .is_some_and(|deleted| deleted > e.revision);
            if !deleted_since {
                self.apply(&e.key, e.operation, &e.value, e.revision);
            }
            if e.revision >= last || e.delta == 0 {
                return Ok(());
            }
        }
    }

    /// For tests: stops sending heartbeats for `d`, so the other nodes declare this one dead
    /// while it still runs (a node cut off from the others).
    pub fn mute_heartbeats(&self, d: Duration) {
        *lock(&self.muted_until) = Some(Instant::now() + d);
    }

    /// For tests: `n` places of `cluster.max_queued_envelopes` are held, as by envelopes stuck
    /// behind a NATS outage, until [`Cluster::free_envelope_places`] gives them back.
    pub fn occupy_envelope_places(&self, n: usize) {
        self.quota.occupy(n);
    }

    /// For tests: gives back places held by [`Cluster::occupy_envelope_places`].
    pub fn free_envelope_places(&self, n: usize) {
        self.quota.free(n);
    }

    /// For tests: the next `n` bounded envelopes (see [`quota`]) are lost on the way, as core
    /// NATS may lose them, though the sender believes them sent.
    pub fn lose_bounded_envelopes(&self, n: usize) {
        self.lose_bounded.store(n, Ordering::SeqCst);
    }

    /// For tests: the next `ForkAdopted` envelope this node sends is lost on the way, as core
    /// NATS may lose it.
    pub fn lose_next_fork_adopted(&self) {
        self.lose_fork_adopted.store(true, Ordering::SeqCst);
    }

    /// For tests: this node's wall clock is set back by `d`, and it starts a new run as a
    /// restarted process would, taking the clock's time as its epoch (below its last run's, so
    /// the others count it as stale, or as dead once they have declared the last run dead).
    /// Returns the new run's epoch.
    pub fn restart_with_clock_set_back(self: &Arc<Self>, d: Duration) -> u64 {
        self.clock_set_back_ms
            .store(d.as_millis() as u64, Ordering::SeqCst);
        let epoch = self.now_ms().max(1);
        self.start_run(epoch);
        epoch
    }

    /// The wall clock in unix ms (see [`Cluster::restart_with_clock_set_back`]).
    fn now_ms(&self) -> u64 {
        wire::unix_ms().saturating_sub(self.clock_set_back_ms.load(Ordering::Relaxed))
    }

    /// The others declared this run dead (it was cut off longer than `node_timeout`), or heard
    /// it with an epoch below a later run of its id (its clock was set back across a restart):
    /// they have ended every call involving it. It does the same on its side, then comes back
    /// as a new run, above both its own last run and `above`, the latest the asker knows.
    fn rejoin(self: &Arc<Self>, above: u64) {
        let new = next_epoch(self.now_ms(), self.epoch(), above);
        tracing::warn!(node = %self.node_id, old = self.epoch(), new, "this node was declared dead or stale by the others; rejoining as a new run");
        self.start_run(new);
    }

    /// Starts run `new` of this node: a new epoch, every call involving another node ended,
    /// its records written again, the others' records read again.
    fn start_run(self: &Arc<Self>, new: u64) {
        self.epoch.store(new, Ordering::Relaxed);
        for entry in self.legs.iter() {
            entry.value().1.do_send(LegMsg::NodeLost);
        }
        for entry in self.endpoints.iter() {
            entry.value().do_send(EndpointMsg::NodeLost { node: None });
        }
        let cached: Vec<(String, String)> = self
            .remote
            .iter()
            .flat_map(|e| {
                let user = e.key().clone();
                e.value()
                    .iter()
                    .map(move |r| (user.clone(), r.id.clone()))
                    .collect::<Vec<_>>()
            })
            .collect();
        for (user, endpoint) in cached {
            self.forget(&user, &endpoint);
        }
        lock(&self.nodes).clear();
        // What this node declared dead stays dead: when NATS itself was away, every node
        // declared every other dead and purged its records, and each must still tell the
        // others to rejoin when it hears their old runs, or their records would stay purged.
        // Re-stamped in place: each shard stays locked while its records are queued, so an
        // endpoint ending meanwhile queues its delete after this put, never before it (a put
        // after the delete would leave a record of an endpoint that no longer exists).
        for mut e in self.own.iter_mut() {
            e.value_mut().epoch = new;
            if let Some(put) = record_put(e.key(), e.value()) {
                let _ = self.kv_tx.send(put);
            }
        }
        self.heartbeat(false);
        if let Some(earlier) = lock(&self.reload).take() {
            earlier.abort();
        }
        let me = self.clone();
        let reload = self.rt.spawn(async move {
            // Without the reload this node would not know the others' endpoints until they
            // change, so it is tried again while NATS is unsteady.
            for attempt in 1..=RELOAD_ATTEMPTS {
                match me.load().await {
                    Ok(()) => return,
                    Err(e) => {
                        tracing::warn!(error = %e, attempt, "cannot reload the directory after rejoining");
                        tokio::time::sleep(Duration::from_secs(1)).await;
                    }
                }
            }
            tracing::error!("gave up reloading the directory after rejoining; other nodes' endpoints appear as they change");
        });
        *lock(&self.reload) = Some(reload);
    }

    /// Publishes an envelope to `node`.
    pub fn send(&self, node: &str, env: &Envelope) {
        if matches!(env, Envelope::ForkAdopted { .. })
            && self.lose_fork_adopted.swap(false, Ordering::SeqCst)
        {
            return;
        }
        if let Some(payload) = encode(env) {
            self.publish(Outgoing::Publish(node_subject(node), payload));
        }
    }

    /// Publishes an envelope a client's requests drive (see [`quota`]) to `node`, unless
    /// `cluster.max_queued_envelopes` (or `max_queued_bytes`) already wait; false when it was
    /// not sent, and the caller answers for it.
    pub fn send_bounded(&self, node: &str, env: &Envelope) -> bool {
        self.reserve_bounded(node, env)
            .is_some_and(BoundedEnvelope::send)
    }

    /// Tests ([`Cluster::lose_bounded_envelopes`]): whether the envelope about to go is lost.
    fn lose_this_bounded(&self) -> bool {
        self.lose_bounded.load(Ordering::Relaxed) > 0
            && self
                .lose_bounded
                .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                .is_ok()
    }

    /// Takes the place of a bounded envelope without sending it yet, for a sender that must
    /// set things up only once it knows the envelope will go (a fork's leg); None when the
    /// bound is reached. Dropped unsent, it gives its place back.
    pub fn reserve_bounded(&self, node: &str, env: &Envelope) -> Option<BoundedEnvelope<'_>> {
        let payload = encode(env)?;
        if !self.quota.take(payload.len()) {
            return None;
        }
        Some(BoundedEnvelope {
            cluster: self,
            subject: node_subject(node),
            payload: Some(payload),
        })
    }

    /// Queues `out` for the publisher; false once it has stopped (the node is leaving, and
    /// ends the calls itself).
    fn publish(&self, out: Outgoing) -> bool {
        if self.publish_tx.send(out).is_err() {
            return false;
        }
        metrics::counter!(m::CLUSTER_ENVELOPES, "direction" => "out").increment(1);
        true
    }

    /// A leg's event for an endpoint on `node`; false when it was not sent. A
    /// `message_received` (not a toast, which is part of the call's set-up) and a
    /// `remote_composing{active:true}` are driven by the other client's flow: over the bound
    /// they are not sent (the sender's leg answers the message with 408 after the ack timeout;
    /// the leg keeps the notice off). Everything else, the `active:false` that ends a notice
    /// included, is never dropped here.
    ///
    /// `call` is the call of the leg that sends it; it travels with an answer to a call
    /// request (see [`Envelope::Event`]).
    pub fn send_event(&self, node: &str, endpoint: &str, call: &str, msg: &ServerMsg) -> bool {
        let frame = match rmp_serde::to_vec_named(msg) {
            Ok(frame) => frame,
            Err(e) => {
                tracing::error!(error = %e, "cannot encode an event");
                return false;
            }
        };
        let answers_request = matches!(msg, ServerMsg::Ok { .. } | ServerMsg::Error { .. });
        let env = Envelope::Event {
            endpoint: endpoint.to_owned(),
            frame,
            call: answers_request.then(|| call.to_owned()),
            from_node: self.node_id.clone(),
            from_epoch: self.epoch(),
        };
        if matches!(
            msg,
            ServerMsg::MessageReceived { toast: None, .. }
                | ServerMsg::RemoteComposing { active: true, .. }
        ) {
            self.send_bounded(node, &env)
        } else {
            self.send(node, &env);
            true
        }
    }

    // ---- directory records ------------------------------------------------------------------

    /// Writes (creates or replaces) this node's record of `endpoint`, stamped with this run's
    /// epoch.
    pub fn put_own(&self, endpoint: &str, mut record: Record) {
        let user = record.user.clone();
        // The entry stays locked from the epoch's stamp until the put is queued, as in the
        // rejoin's re-stamp: either this sees the rejoin's new epoch, or the rejoin waits and
        // queues its re-stamped put after this one. And the record is in `own` before its put
        // is queued, so the watch never shows this node a record of its own it does not know.
        let entry = self.own.entry(endpoint.to_owned());
        // Checked under the entry's lock: the leave sets the flag before it collects `own`,
        // so a put either sees it or is collected and deleted after its put.
        if self.leaving.load(Ordering::SeqCst) {
            return;
        }
        let added = matches!(entry, dashmap::Entry::Vacant(_));
        record.epoch = self.epoch();
        let Some(put) = record_put(endpoint, &record) else {
            return;
        };
        let stored = entry.insert(record);
        let _ = self.kv_tx.send(put);
        drop(stored);
        if added {
            self.own_by_user
                .entry(user)
                .or_default()
                .push(endpoint.to_owned());
            self.directory_gauge();
        }
    }

    /// Updates this node's record of `endpoint` in place and writes it.
    pub fn update_own(&self, endpoint: &str, f: impl FnOnce(&mut Record)) {
        let Some(mut r) = self.own.get(endpoint).map(|r| r.clone()) else {
            return;
        };
        f(&mut r);
        self.put_own(endpoint, r);
    }

    pub fn delete_own(&self, user: &str, endpoint: &str) {
        if self.own.remove(endpoint).is_some() {
            self.own_by_user.remove_if_mut(user, |_, ids| {
                ids.retain(|id| id != endpoint);
                ids.is_empty()
            });
            self.directory_gauge();
        }
        let _ = self
            .kv_tx
            .send(KvOp::Delete(wire::record_key(user, endpoint), None));
    }

    /// Other nodes' endpoints of `user`.
    pub fn remote_endpoints_of(&self, user: &str) -> Vec<RemoteEndpoint> {
        self.remote.get(user).map(|l| l.clone()).unwrap_or_default()
    }

    pub fn remote_count(&self, user: &str) -> usize {
        self.remote.get(user).map_or(0, |l| l.len())
    }

    /// Whether `node` is to be asked to rejoin now: the first time one of its runs needs it,
    /// then at most once per `node_timeout`.
    fn first_ask_in_a_while(&self, node: &str) -> bool {
        let now = Instant::now();
        let mut told = lock(&self.told);
        told.retain(|_, at| now.duration_since(*at) < self.timeout);
        match told.entry(node.to_owned()) {
            std::collections::hash_map::Entry::Occupied(_) => false,
            std::collections::hash_map::Entry::Vacant(v) => {
                v.insert(now);
                true
            }
        }
    }

    /// The latest run of `node` known here, alive or declared dead (0: none).
    fn latest_run(&self, node: &str) -> u64 {
        let dead = lock(&self.dead).get(node).copied().unwrap_or(0);
        let seen = lock(&self.nodes).get(node).map_or(0, |n| n.epoch);
        dead.max(seen)
    }

    /// True when `node`'s run `epoch` was declared dead, or a later run of it is known dead.
    fn is_dead(&self, node: &str, epoch: u64) -> bool {
        lock(&self.dead).get(node).is_some_and(|e| *e >= epoch)
    }

    /// The living node with the smallest id cleans the KV for everyone.
    fn is_purger(&self) -> bool {
        let nodes = lock(&self.nodes);
        nodes.keys().all(|n| *n > self.node_id)
    }

    /// Applies one KV change (the entry at `revision`) to the cache and to presence.
    fn apply(&self, key: &str, op: kv::Operation, value: &[u8], revision: u64) {
        let Some((user, endpoint)) = wire::parse_key(key) else {
            return;
        };
        match op {
            kv::Operation::Put => {
                let record: Record = match rmp_serde::from_slice(value) {
                    Ok(r) => r,
                    Err(e) => {
                        tracing::warn!(%key, error = %e, "ignoring an unreadable directory record");
                        return;
                    }
                };
                if record.node == self.node_id {
                    // Endpoints of an earlier run are never this run's (ids carry the run).
                    if record.epoch < self.epoch() && !self.own.contains_key(&endpoint) {
                        // Left over from an earlier run of this node.
                        // Unconditional: only this node writes its keys, and it has no such
                        // endpoint any more.
                        tracing::info!(%key, "deleting a stale record of this node");
                        let _ = self.kv_tx.send(KvOp::Delete(key.to_owned(), None));
                    }
                    return;
                }
                if !self.saw_node(&record.node, record.epoch, false) {
                    // Left over from a dead or earlier run of that node.
                    if self.is_purger() {
                        let _ = self
                            .kv_tx
                            .send(KvOp::Delete(key.to_owned(), Some(revision)));
                    }
                    return;
                }
                let user_key = user.clone();
                let upsert = PresenceMsg::Upsert {
                    user: user.clone(),
                    endpoint: endpoint.clone(),
                    device: record.device.clone(),
                    publication: record.publication.map(|p| to_publication(&p)),
                    status: record.status_set_unix_ms.map(|at| (record.status, at)),
                };
                let added = {
                    let mut list = self.remote.entry(user).or_default();
                    match list.iter_mut().find(|e| e.id == endpoint) {
                        // A rejoin's reload can read a key after the watch applied a newer
                        // revision of it.
                        Some(e) if e.revision > revision => return,
                        Some(e) => {
                            e.record = record;
                            e.revision = revision;
                            false
                        }
                        None => {
                            list.push(RemoteEndpoint {
                                id: endpoint,
                                record,
                                revision,
                            });
                            true
                        }
                    }
                };
                self.presence.send(upsert);
                if added {
                    self.remote_len.fetch_add(1, Ordering::Relaxed);
                    self.directory_gauge();
                    self.enforce_limit(&user_key);
                }
            }
            kv::Operation::Delete | kv::Operation::Purge => {
                if let Some(deleted) = lock(&self.loading).as_mut() {
                    deleted.insert(key.to_owned(), revision);
                }
                let newer_cached = self.remote.get(&user).is_some_and(|list| {
                    list.iter()
                        .any(|e| e.id == endpoint && e.revision > revision)
                });
                if !newer_cached {
                    self.forget(&user, &endpoint);
                }
            }
        }
    }

    /// Holds `endpoints_per_user` across the cluster. Each node checks a sign-in against what
    /// it has seen, so two sign-ins of one user on two nodes within the KV's propagation time
    /// can both pass. This runs after every sign-in here and whenever another node's endpoint
    /// of `user` appears in the cache (so one of the two racing nodes sees both): every node
    /// ranks all the user's endpoints the same way (sign-in time by the nodes' clocks, then
    /// id) and signs out its own that rank beyond the limit. The ranking depends only on the
    /// records, so the nodes agree on which to keep without talking to each other.
    ///
    /// Only an endpoint that signed in less than `node_timeout` ago is signed out: a race is
    /// that recent. A record that shows up later than that (a node rejoining after a
    /// partition, a record left behind by a failed delete) must not sign out a session that
    /// has been running for a while; it only blocks new sign-ins until it is cleaned up.
    pub(crate) fn enforce_limit(&self, user: &str) {
        // Counted before anything is copied: this runs for every sign-in.
        let own_count = self.own_by_user.get(user).map_or(0, |ids| ids.len());
        if own_count == 0 || own_count + self.remote_count(user) <= self.endpoints_per_user {
            return;
        }
        let own: Vec<String> = self
            .own_by_user
            .get(user)
            .map(|ids| ids.clone())
            .unwrap_or_default();
        let remote = self.remote_endpoints_of(user);
        let mut ranked: Vec<(u64, String, bool)> = remote
            .into_iter()
            .map(|r| (r.record.connected_unix_ms, r.id, false))
            .collect();
        ranked.extend(own.into_iter().filter_map(|id| {
            let at = self.own.get(&id)?.connected_unix_ms;
            Some((at, id, true))
        }));
        ranked.sort();
        let race_window = u64::try_from(self.timeout.as_millis()).unwrap_or(u64::MAX);
        let fresh_since = wire::unix_ms().saturating_sub(race_window);
        for (at, id, mine) in ranked.into_iter().skip(self.endpoints_per_user) {
            if !mine {
                continue;
            }
            if at < fresh_since {
                tracing::warn!(%user, endpoint = %id, "over endpoints_per_user across the cluster, but this endpoint signed in before the race window: kept");
                continue;
            }
            if let Some(addr) = self.endpoints.get(&id) {
                tracing::info!(%user, endpoint = %id, "over endpoints_per_user across the cluster: signing out this node's newest");
                addr.do_send(EndpointMsg::OverLimit);
            }
        }
    }

    /// Drops a remote endpoint from the cache and from presence.
    fn forget(&self, user: &str, endpoint: &str) {
        let mut removed = false;
        self.remote.remove_if_mut(user, |_, list| {
            let before = list.len();
            list.retain(|e| e.id != endpoint);
            removed = list.len() != before;
            list.is_empty()
        });
        if removed {
            self.remote_len.fetch_sub(1, Ordering::Relaxed);
            self.directory_gauge();
            self.presence.send(PresenceMsg::Left {
                user: user.to_owned(),
                endpoint: endpoint.to_owned(),
            });
        }
    }

    // ---- liveness ---------------------------------------------------------------------------

    /// Notes that `node` (in `epoch`) is alive. A later epoch means the node restarted: what
    /// referenced its previous run is ended first. Returns false for a run that is older than
    /// the one known, or dead: its records are stale.
    fn saw_node(&self, node: &str, epoch: u64, heartbeat: bool) -> bool {
        if node == self.node_id {
            return true;
        }
        let restarted = {
            let mut nodes = lock(&self.nodes);
            match nodes.get_mut(node) {
                Some(seen) if seen.epoch == epoch => {
                    if heartbeat {
                        seen.last = Instant::now();
                    }
                    None
                }
                Some(seen) if epoch < seen.epoch => return false,
                Some(seen) => {
                    let old = seen.epoch;
                    seen.epoch = epoch;
                    seen.last = Instant::now();
                    Some(old)
                }
                None => {
                    if self.is_dead(node, epoch) {
                        return false;
                    }
                    nodes.insert(
                        node.to_owned(),
                        NodeSeen {
                            epoch,
                            last: Instant::now(),
                        },
                    );
                    metrics::gauge!(m::CLUSTER_NODES).set((nodes.len() + 1) as f64);
                    tracing::info!(%node, "node joined the cluster");
                    None
                }
            }
        };
        if let Some(old) = restarted {
            tracing::warn!(%node, "node restarted; ending what referenced its previous run");
            self.node_lost(node, old, true);
        }
        true
    }

    /// Declares `node` (in `epoch`) dead and ends everything on this node that referenced it.
    fn node_lost(&self, node: &str, epoch: u64, purge: bool) {
        let mut dead = lock(&self.dead);
        let latest = dead.entry(node.to_owned()).or_insert(epoch);
        *latest = (*latest).max(epoch);
        drop(dead);
        // Drop its endpoints from the cache and presence at once.
        let mut gone: Vec<(String, String, u64)> = Vec::new();
        for entry in self.remote.iter() {
            for e in entry.value() {
                if e.record.node == node && e.record.epoch <= epoch {
                    gone.push((entry.key().clone(), e.id.clone(), e.revision));
                }
            }
        }
        for (user, endpoint, _) in &gone {
            self.forget(user, endpoint);
        }
        // The smallest living node id cleans the KV for everyone.
        if purge && self.is_purger() {
            tracing::info!(%node, records = gone.len(), "purging the dead node's records");
            for (user, endpoint, revision) in &gone {
                let _ = self.kv_tx.send(KvOp::Delete(
                    wire::record_key(user, endpoint),
                    Some(*revision),
                ));
            }
        }
        // Legs here whose endpoint was there.
        for entry in self.legs.iter() {
            if entry.value().0 == node {
                entry.value().1.do_send(LegMsg::NodeLost);
            }
        }
        // Endpoints here whose calls live there.
        for entry in self.endpoints.iter() {
            entry.value().do_send(EndpointMsg::NodeLost {
                node: Some(node.to_owned()),
            });
        }
    }

    fn check_liveness(&self) {
        let now = Instant::now();
        let dead: Vec<(String, u64)> = {
            let mut nodes = lock(&self.nodes);
            let dead: Vec<_> = nodes
                .iter()
                .filter(|(_, s)| now.duration_since(s.last) > self.timeout)
                .map(|(n, s)| (n.clone(), s.epoch))
                .collect();
            for (n, _) in &dead {
                nodes.remove(n);
            }
            metrics::gauge!(m::CLUSTER_NODES).set((nodes.len() + 1) as f64);
            dead
        };
        for (node, epoch) in dead {
            tracing::warn!(%node, timeout_ms = self.timeout.as_millis() as u64, "node unheard for node_timeout; declaring it dead");
            self.node_lost(&node, epoch, true);
        }
    }

    fn heartbeat(&self, leaving: bool) {
        if !leaving
            && let Some(until) = *lock(&self.muted_until)
            && Instant::now() < until
        {
            return;
        }
        // While NATS is away a heartbeat would only wait in the client's buffer, with every
        // other one of the outage, and all go out stale on reconnect; the next tick sends a
        // fresh one.
        if !leaving && !self.nats_connected() {
            return;
        }
        let hb = Heartbeat {
            node: self.node_id.clone(),
            epoch: self.epoch(),
            leaving,
        };
        if let Ok(bytes) = rmp_serde::to_vec_named(&hb) {
            let _ = self.publish_tx.send(Outgoing::Publish(
                HEARTBEAT_SUBJECT.to_owned(),
                Bytes::from(bytes),
            ));
        }
    }

    /// Graceful leave: this node's records are deleted at once and the others are told; then
    /// the NATS runtime stops.
    pub async fn leave(self: &Arc<Self>) {
        let me = self.clone();
        let _ = self.rt.spawn(async move { me.leave_inner().await }).await;
        if let Some(stop) = lock(&self.stop).take() {
            let _ = stop.send(());
        }
    }

    async fn leave_inner(&self) {
        self.leaving.store(true, Ordering::SeqCst);
        // Queued behind the writes still waiting, so none of those can land after them and
        // bring a record back.
        let keys: Vec<String> = self
            .own
            .iter()
            .map(|e| wire::record_key(&e.value().user, e.key()))
            .collect();
        self.own.clear();
        self.own_by_user.clear();
        self.directory_gauge();
        for key in keys {
            let _ = self.kv_tx.send(KvOp::Delete(key, None));
        }
        // Bounded: with NATS away the node still stops (the others purge its records once
        // they find it dead).
        let (done_tx, done_rx) = tokio::sync::oneshot::channel();
        if self.kv_tx.send(KvOp::Flush(done_tx)).is_ok() {
            let _ = tokio::time::timeout(Duration::from_secs(3), done_rx).await;
        }
        self.heartbeat(true);
        // Everything queued goes out before the runtime stops.
        let (done_tx, done_rx) = tokio::sync::oneshot::channel();
        if self.publish_tx.send(Outgoing::Flush(done_tx)).is_ok() {
            let _ = tokio::time::timeout(Duration::from_secs(2), done_rx).await;
        }
    }

    // ---- incoming envelopes -----------------------------------------------------------------

    fn route(self: &Arc<Self>, env: Envelope) {
        metrics::counter!(m::CLUSTER_ENVELOPES, "direction" => "in").increment(1);
        match env {
            Envelope::Event {
                endpoint,
                frame,
                call,
                from_node,
                from_epoch,
            } => {
                if self.is_dead(&from_node, from_epoch) {
                    tracing::debug!(node = %from_node, "dropping an event from a run declared dead");
                    return;
                }
                let Some(ep) = self.endpoints.get(&endpoint).map(|e| e.clone()) else {
                    return;
                };
                match decode_server(&frame) {
                    Ok(msg) => ep.do_send(EndpointMsg::RemoteEvent { msg, call }),
                    Err(e) => tracing::warn!(error = %e, "dropping an unreadable remote event"),
                }
            }
            Envelope::LegEnded {
                endpoint,
                call,
                conversation,
                elsewhere,
                from_node,
                from_epoch,
            } if !self.is_dead(&from_node, from_epoch) => {
                match self.endpoints.get(&endpoint).map(|e| e.clone()) {
                    Some(ep) => ep.do_send(EndpointMsg::LegEnded {
                        call,
                        conversation,
                        elsewhere,
                    }),
                    // Nobody here holds it any more: release the leg.
                    None => self.release_leg(call, endpoint),
                }
            }
            Envelope::LegEnded { from_node, .. } => {
                tracing::debug!(node = %from_node, "dropping a leg end from a run declared dead");
            }
            Envelope::Adopt {
                endpoint,
                leg_node,
                arbiter,
                call,
                conversation,
                from,
                offer,
                toast,
                immediate,
            } => {
                let fork = RemoteFork {
                    leg_node: leg_node.clone(),
                    arbiter: arbiter.clone(),
                    call: call.clone(),
                    conversation,
                    from,
                    offer,
                    toast,
                    immediate,
                };
                match self.endpoints.get(&endpoint).map(|e| e.clone()) {
                    Some(ep) => {
                        let guard = crate::endpoint::RemoteForkGuard::new(self.clone(), &fork);
                        ep.do_send(EndpointMsg::Adopt(fork, guard));
                    }
                    None => self.send(&leg_node, &Envelope::ForkLost { arbiter, call }),
                }
            }
            Envelope::Leg {
                call,
                reply_node,
                reply_endpoint,
                msg,
            } => match self.legs.get(&call).map(|e| e.value().1.clone()) {
                Some(leg) => leg.do_send(msg.into_leg_msg()),
                None => self.leg_missing(&call, &reply_node, &reply_endpoint, msg),
            },
            Envelope::ForkAdopted { arbiter, call } => {
                if let Some(a) = self.arbiters.get(&arbiter).map(|a| a.clone()) {
                    a.do_send(ArbiterMsg::ForkAdopted { call });
                }
            }
            Envelope::ForkLost { arbiter, call } => {
                if let Some(a) = self.arbiters.get(&arbiter).map(|a| a.clone()) {
                    a.do_send(ArbiterMsg::ForkLost { call });
                }
            }
            Envelope::Rejoin { epoch, above } => {
                if epoch == self.epoch() {
                    self.rejoin(above);
                }
            }
        }
    }

    /// The node of a leg, from its id (ids start with their node's id).
    /// Tells the leg of `call` on another node that `endpoint` here does not hold it (any
    /// more), so it can stop: without a holder nothing else would release it.
    pub fn release_leg(&self, call: String, endpoint: String) {
        if let Some(node) = self.leg_node_hint(&call).filter(|n| *n != self.node_id) {
            self.send(
                &node,
                &Envelope::Leg {
                    call,
                    reply_node: self.node_id.clone(),
                    reply_endpoint: endpoint,
                    msg: WireLegMsg::Release,
                },
            );
        }
    }

    fn leg_node_hint(&self, call: &str) -> Option<String> {
        call.split_once('.').map(|(n, _)| n.to_owned())
    }

    /// A request for a leg that is gone: the one answer it is owed.
    fn leg_missing(&self, call: &str, node: &str, endpoint: &str, msg: WireLegMsg) {
        let reply = match msg {
            WireLegMsg::Message { rid, .. } => ServerMsg::MessageFailed {
                rid,
                call: call.to_owned(),
                msg: None,
                code: 481,
                text: crate::reasons::CALL_DOES_NOT_EXIST.to_owned(),
            },
            WireLegMsg::Terminate {
                rid,
                cause: crate::call::leg::TerminateCause::Call,
            } => ServerMsg::Ok { rid },
            WireLegMsg::Accept { rid, .. }
            | WireLegMsg::Decline { rid, .. }
            | WireLegMsg::Forward { rid, .. }
            | WireLegMsg::Transfer { rid, .. } => ServerMsg::error(
                rid,
                confab_protocol::ErrorCode::InvalidState,
                "the call is over",
            ),
            _ => return,
        };
        self.send_event(node, endpoint, call, &reply);
    }
}

/// A new run's epoch: the wall clock's time, but above the run it replaces and above `above`,
/// the latest run of this id another node knows (the clock may have been set back).
fn next_epoch(now_ms: u64, old: u64, above: u64) -> u64 {
    now_ms
        .max(old.saturating_add(1))
        .max(above.saturating_add(1))
}

/// The pause before reconnect attempt `attempts` (1-based): none, then 10 ms doubling up to
/// 1 s. The client's default grows to 4 s, so a node could come back seconds after NATS and
/// after the other nodes, and every second degraded counts: calls across nodes fail, and past
/// `node_timeout` the others declare it dead. One attempt a second per node costs NATS nothing.
fn reconnect_delay(attempts: usize) -> Duration {
    let doublings = u32::try_from(attempts.saturating_sub(2))
        .unwrap_or(u32::MAX)
        .min(7);
    if attempts <= 1 {
        Duration::ZERO
    } else {
        Duration::from_millis((10u64 << doublings).min(1000))
    }
}

/// Follows the NATS client's connection state into [`Cluster::nats_connected`] and the
/// `confab_cluster_nats_connected` gauge.
fn nats_event(connected: &AtomicBool, event: async_nats::Event) {
    match event {
        async_nats::Event::Connected => {
            tracing::info!("connected to NATS");
            set_nats_connected(connected, true);
        }
        async_nats::Event::Disconnected => {
            tracing::warn!("disconnected from NATS; this node is degraded until it reconnects");
            set_nats_connected(connected, false);
        }
        async_nats::Event::Closed => set_nats_connected(connected, false),
        other => tracing::warn!(event = %other, "NATS client event"),
    }
}

fn set_nats_connected(connected: &AtomicBool, up: bool) {
    connected.store(up, Ordering::Relaxed);
    metrics::gauge!(m::CLUSTER_NATS_CONNECTED).set(if up { 1.0 } else { 0.0 });
}

/// The KV put of this node's record of `endpoint`; `None` (logged) if it cannot be encoded.
fn record_put(endpoint: &str, record: &Record) -> Option<KvOp> {
    match rmp_serde::to_vec_named(record) {
        Ok(bytes) => Some(KvOp::Put(
            wire::record_key(&record.user, endpoint),
            Bytes::from(bytes),
        )),
        Err(e) => {
            tracing::error!(error = %e, "cannot encode a directory record");
            None
        }
    }
}

/// A publication stamped with another node's wall clock, on this node's monotonic clock.
fn to_publication(p: &wire::PublicationRecord) -> Publication {
    let age = Duration::from_millis(wire::unix_ms().saturating_sub(p.stamp_unix_ms));
    let now = Instant::now();
    Publication {
        activity: p.activity,
        stamp: now.checked_sub(age).unwrap_or(now),
        idle_ms: p.idle_ms,
    }
}

/// An envelope holding its place in [`Cluster::quota`], ready to go (see
/// [`Cluster::reserve_bounded`]).
pub struct BoundedEnvelope<'a> {
    cluster: &'a Cluster,
    subject: String,
    /// Taken when sent; still here on drop means unsent, and the place is given back.
    payload: Option<Bytes>,
}

impl BoundedEnvelope<'_> {
    /// Queues it; false if the publisher has stopped.
    pub fn send(mut self) -> bool {
        let Some(payload) = self.payload.take() else {
            return false;
        };
        let len = payload.len();
        if self.cluster.lose_this_bounded() {
            // Lost on the way, as core NATS may lose it: the sender believes it sent.
            self.cluster.quota.release(len);
            return true;
        }
        let sent = self.cluster.publish(Outgoing::Bounded(
            std::mem::take(&mut self.subject),
            payload,
        ));
        if !sent {
            self.cluster.quota.release(len);
        }
        sent
    }
}

impl Drop for BoundedEnvelope<'_> {
    fn drop(&mut self) {
        if let Some(payload) = self.payload.take() {
            self.cluster.quota.release(payload.len());
        }
    }
}

fn node_subject(node: &str) -> String {
    format!("confab.node.{node}")
}

fn encode(env: &Envelope) -> Option<Bytes> {
    match rmp_serde::to_vec_named(env) {
        Ok(bytes) => Some(Bytes::from(bytes)),
        Err(e) => {
            tracing::error!(error = %e, "cannot encode an envelope");
            None
        }
    }
}

async fn publish_loop(
    client: async_nats::Client,
    mut rx: mpsc::UnboundedReceiver<Outgoing>,
    quota: Arc<EnvelopeQuota>,
) {
    while let Some(out) = rx.recv().await {
        match out {
            Outgoing::Publish(subject, payload) => {
                if let Err(e) = client.publish(subject, payload).await {
                    tracing::warn!(error = %e, "cannot publish to NATS");
                }
            }
            Outgoing::Bounded(subject, payload) => {
                let len = payload.len();
                if let Err(e) = client.publish(subject, payload).await {
                    tracing::warn!(error = %e, "cannot publish to NATS");
                }
                quota.release(len);
            }
            Outgoing::Flush(done) => {
                let _ = tokio::time::timeout(Duration::from_secs(1), client.flush()).await;
                let _ = done.send(());
            }
        }
    }
}

async fn inbox_loop(cluster: Arc<Cluster>, mut sub: async_nats::Subscriber) {
    while let Some(msg) = sub.next().await {
        match rmp_serde::from_slice::<Envelope>(&msg.payload) {
            Ok(env) => cluster.route(env),
            Err(e) => tracing::warn!(error = %e, "dropping an unreadable envelope"),
        }
    }
    tracing::error!("the NATS inbox subscription ended");
}

async fn heartbeat_loop(cluster: Arc<Cluster>, mut sub: async_nats::Subscriber) {
    while let Some(msg) = sub.next().await {
        let Ok(hb) = rmp_serde::from_slice::<Heartbeat>(&msg.payload) else {
            continue;
        };
        if hb.node == cluster.node_id {
            continue;
        }
        if hb.leaving {
            let known = lock(&cluster.nodes).remove(&hb.node).is_some();
            if known {
                tracing::info!(node = %hb.node, "node left the cluster");
                cluster.node_lost(&hb.node, hb.epoch, true);
            }
            continue;
        }
        if !cluster.saw_node(&hb.node, hb.epoch, true) && cluster.first_ask_in_a_while(&hb.node) {
            // A run we declared dead is alive after all (it was cut off), or a run older than
            // one we know is heard (its node restarted with its clock set back): it must come
            // back as a new run above every run of its id known here, since every call
            // involving those has ended here (or will, when the new run is heard).
            let above = cluster.latest_run(&hb.node);
            tracing::warn!(node = %hb.node, epoch = hb.epoch, above, "heard a run of a node declared dead or replaced; asking it to rejoin");
            cluster.send(
                &hb.node,
                &Envelope::Rejoin {
                    epoch: hb.epoch,
                    above,
                },
            );
        }
    }
}

async fn watch_loop(cluster: Arc<Cluster>, mut watch: kv::Watch) {
    while let Some(entry) = watch.next().await {
        match entry {
            Ok(e) => cluster.apply(&e.key, e.operation, &e.value, e.revision),
            Err(e) => tracing::warn!(error = %e, "directory watch error"),
        }
    }
    tracing::error!("the directory watch ended");
}

async fn liveness_loop(cluster: Arc<Cluster>) {
    let mut tick = tokio::time::interval(cluster.timeout / 3);
    loop {
        tick.tick().await;
        cluster.heartbeat(false);
        cluster.check_liveness();
    }
}

impl std::fmt::Debug for Cluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cluster")
            .field("node_id", &self.node_id)
            .field("epoch", &self.epoch())
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reconnecting_starts_at_once_and_never_waits_over_a_second() {
        let pauses: Vec<u128> = (1..=12).map(|a| reconnect_delay(a).as_millis()).collect();
        assert_eq!(
            pauses,
            [0, 10, 20, 40, 80, 160, 320, 640, 1000, 1000, 1000, 1000]
        );
    }

    #[test]
    fn a_new_run_is_above_the_last_one_and_every_run_another_node_knows_whatever_the_clock() {
        assert_eq!(
            next_epoch(5_000, 1_000, 2_000),
            5_000,
            "the clock, normally"
        );
        assert_eq!(
            next_epoch(5_000, 5_000, 0),
            5_001,
            "a rejoin in the same ms"
        );
        assert_eq!(
            next_epoch(1_000, 1_000, 9_000),
            9_001,
            "a clock set back below a run the others know"
        );
    }
}
