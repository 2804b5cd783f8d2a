//! A cluster of nodes over NATS (design §3).
//!
//! - **Routing**: every node subscribes to `confab.node.<id>`; an [`Envelope`] addressed to an
//!   actor on another node is published there. Publishing goes through one task and one NATS
//!   connection per node, so envelopes from one node to another arrive in the order sent.
//!   Received envelopes are delivered through local registries (endpoints, legs whose endpoint
//!   is remote, arbiters with remote forks). In `routing.rs`, bounded by `quota.rs`.
//! - **Directory**: the JetStream KV bucket `confab-endpoints`, one record per endpoint, written
//!   only by its owning node; every node keeps a cache fed by one watch (initial values, then
//!   changes), which also feeds the presence shards with the other nodes' endpoints. In
//!   `records.rs` (the cache), `writes.rs` (the writes) and `directory.rs` (the node's seam).
//! - **Liveness**: heartbeats on `confab.nodes.heartbeat` every `node_timeout / 3`; a node
//!   unheard for `node_timeout` is dead: every survivor drops its records and ends what
//!   referenced it, and the living node with the smallest id deletes its records from the KV.
//!   In `membership.rs`.
//! - **Transports**: routing and liveness send only through a [`transport::Transport`]
//!   (core NATS in production; a [`memory::MemoryNetwork`] for tests without NATS), and the
//!   directory lives behind a bucket seam (`kv.rs`: the JetStream KV bucket, or the memory
//!   network's). Tests that lose envelopes wrap the transport in a
//!   [`transport::LossyTransport`] ([`ClusterJoin::lossy`]); production code has no loss hook.
//!
//! This file holds the [`Cluster`] itself: its state, joining, and the hooks the tests use.

mod admin;
mod batch;
mod bucket;
pub mod direct;
pub use direct::DirectLinks;
pub mod directory;
mod events;
mod hot;
mod kv;
mod link;
mod membership;
pub mod memory;
mod quota;
mod records;
mod relay;
mod resend;
mod routing;
mod signin;
pub mod transport;
pub mod wire;
mod writes;

use actix::Addr;
use bytes::Bytes;
use confab_protocol::{ServerMsg, decode_server};
use dashmap::DashMap;
use futures::StreamExt;
use kv::{Bucket, NatsBucket};
use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use thiserror::Error;
use tokio::sync::mpsc;
use tokio::time::Instant;

use confab_actors::arbiter::{ArbiterMsg, ForkArbiter};
use confab_actors::call::leg::{CallLeg, LegMsg};
use confab_actors::directory::WeakLocalDirectory;
use confab_actors::endpoint::{Endpoint, EndpointMsg, RemoteFork};
use confab_actors::metrics as m;
use confab_actors::presence::rank::Publication;
use confab_actors::presence::{PresenceMsg, PresenceShards};
use confab_actors::settings;
pub use link::{ClusterJoin, lossy, of, spawn_node, spawn_node_with};
use membership::{heartbeat_loop, liveness_loop};
use quota::EnvelopeQuota;
use records::{record_put, watch_loop};
pub use resend::RESEND_ATTEMPTS;
pub use routing::BoundedEnvelope;
use routing::{inbox_loop, node_subject, publish_loop};
pub use transport::Lose;
use transport::{LossyTransport, NatsTransport, Transport, TransportError};
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
    #[error("cannot listen for direct links on {listen}: {reason}")]
    LinkListen { listen: String, reason: String },
    #[error("direct links' TLS: {0}")]
    LinkTls(#[from] confab_actors::tls::TlsError),
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

/// The nodes (by inbox subject) whose heartbeats say they read batches (`batch.rs`): read by
/// every sender as it queues an envelope.
pub(crate) struct BatchingNodes {
    subjects: std::sync::RwLock<std::collections::HashSet<String>>,
    /// `cluster.batch_envelopes`: this node batches at all.
    enabled: bool,
}

impl BatchingNodes {
    fn new(enabled: bool) -> Self {
        BatchingNodes {
            subjects: Default::default(),
            enabled,
        }
    }

    pub(crate) fn takes(&self, subject: &str) -> bool {
        self.enabled && self.subjects.read().is_ok_and(|s| s.contains(subject))
    }

    fn note(&self, node: &str, batches: bool) {
        let subject = routing::node_subject(node);
        if !self.enabled || self.takes(&subject) == batches {
            return;
        }
        if let Ok(mut s) = self.subjects.write() {
            if batches {
                s.insert(subject);
            } else {
                s.remove(&subject);
            }
        }
    }
}

struct NodeSeen {
    epoch: u64,
    last: Instant,
    /// Its heartbeats say it acknowledges numbered state events (`events.rs`).
    acks_events: bool,
    /// What its heartbeats say of answering `DirectorySync` (`signin.rs`); `None` until one
    /// is heard (a node known from its records only).
    syncs_directory: Option<bool>,
}

/// This node's membership in the cluster.
pub struct Cluster {
    pub node_id: String,
    /// This run's epoch (its start time in unix ms); a rejoin takes a new one.
    epoch: AtomicU64,
    pub timeout: Duration,
    /// The directory's bucket (`kv.rs`).
    kv: Arc<dyn Bucket>,
    outbound: Arc<batch::Outbound>,
    /// Bounds the envelopes clients' requests drive, waiting in `outbound`, by count and bytes
    /// (`cluster.max_queued_envelopes`, `cluster.max_queued_bytes`).
    quota: Arc<EnvelopeQuota>,
    kv_tx: mpsc::UnboundedSender<KvOp>,
    /// Endpoints signed in here, by id (for envelopes addressed to them).
    /// Keyed by the endpoint's shared id (see `EndpointEntry::id`).
    pub endpoints: DashMap<Arc<str>, Addr<Endpoint>>,
    /// Sessions resumed through this node and held on another (`relay.rs`), by relay id.
    relays: DashMap<u64, relay::Relay>,
    next_relay: AtomicU64,
    /// Which nodes take batched envelopes (`batch.rs`).
    batching: BatchingNodes,
    /// Legs on this node whose endpoint is on another node: call id → (that node, leg).
    pub legs: DashMap<String, (String, Addr<CallLeg>)>,
    /// Arbiters on this node with forks on other nodes.
    pub arbiters: DashMap<String, Addr<ForkArbiter>>,
    /// This node's own records, by endpoint id (compact: see [`records::OwnRecord`]).
    own: DashMap<Arc<str>, records::OwnRecord>,
    /// This node's endpoints, by user: the node's directory of its own (`directory.rs`),
    /// which also answers for the cluster-wide `endpoints_per_user` (a list of ids by user of
    /// the cluster's own cost every endpoint about 180 bytes more). Its addresses are weak:
    /// `endpoints` keeps a strong one of each.
    pub(crate) local: WeakLocalDirectory,
    /// `limits.endpoints_per_user`, held across the cluster (see [`Cluster::enforce_limit`]).
    endpoints_per_user: usize,
    /// Other nodes' endpoints, by user.
    remote: DashMap<String, Vec<RemoteEndpoint>>,
    /// Endpoints in `remote` (all users).
    remote_len: AtomicUsize,
    /// How envelopes and heartbeats reach the other nodes (`transport/`).
    transport: Arc<dyn Transport>,
    /// Direct links to the other nodes (`direct/`), when `cluster.link_listen` is set.
    links: Option<Arc<direct::Links>>,
    /// The links' TLS (`cluster.link_tls_*`), read again on reload; shared with `links`.
    link_tls: Option<direct::LinkTls>,
    nodes: Mutex<HashMap<String, NodeSeen>>,
    /// What this node hears from NATS, its own heartbeat included (`membership.rs`): while it
    /// hears nothing it is the one cut off, and declares nobody dead.
    hearing: Mutex<membership::Hearing>,
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
    /// Tests: while true the watch holds back other nodes' changes (see
    /// [`Cluster::hold_watch`]).
    watch_held: tokio::sync::watch::Sender<bool>,
    /// `EndpointLost`s sent for endpoints gone from here whose leg, on another node, has not
    /// answered with its end yet: sent again until it does (see `resend.rs`).
    unanswered_lost: Mutex<HashMap<String, resend::UnansweredLost>>,
    /// The state events of legs here, by call, that their endpoint's node has not acknowledged
    /// yet: sent again until it does (see `events.rs`).
    unseen_events: Mutex<HashMap<String, events::UnseenEvents>>,
    /// State events sent again (for tests; the metric counts them too).
    events_resent: AtomicU64,
    /// While [`Cluster::load`] runs: the keys the watch deleted meanwhile, with the revision.
    loading: Mutex<Option<HashMap<String, u64>>>,
    /// Set once the graceful leave has started: no record is written after its deletes.
    leaving: AtomicBool,
    /// Set while this node's directory writes fail (see `writes.rs`).
    writes_failing: Arc<AtomicBool>,
    /// Set while the directory watch is broken and being made again (see `records.rs`).
    watch_failing: AtomicBool,
    /// Told by the watch guard that the watch has stopped delivering (see `records.rs`)...
    watch_stalled: tokio::sync::Notify,
    /// ... below this revision, which the bucket had reached a round earlier.
    stalled_below: AtomicU64,
    /// The last revision the read that came with the current watch covered: the watch's
    /// changes at or below it are skipped (see `records.rs`).
    watch_read_upto: AtomicU64,
    /// The highest directory revision this node's watch (or load) has applied.
    applied_revision: tokio::sync::watch::Sender<u64>,
    /// Sign-ins here waiting for the other nodes to have read their record (`signin.rs`).
    sign_in_syncs: Mutex<HashMap<u64, signin::Waiting>>,
    /// Numbers [`Cluster::sign_in_syncs`].
    next_sync: AtomicU64,
    /// `cluster.sign_in_sync_timeout_ms`.
    sign_in_timeout: Duration,
    /// The admin API's questions to the other nodes (`admin.rs`).
    admin: admin::AdminState,
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
        join: ClusterJoin,
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
            join,
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
        join: ClusterJoin,
        rt: tokio::runtime::Handle,
        stop: tokio::sync::oneshot::Sender<()>,
    ) -> Result<Arc<Cluster>, ClusterError> {
        // Before NATS: a link certificate that does not load stops the node at once.
        let link_tls = direct::LinkTls::from_settings(&cfg)?;
        let (mut transport, kv): (Arc<dyn Transport>, Arc<dyn Bucket>) = match join.memory_network()
        {
            Some(network) => (Arc::new(network.transport()), network.bucket()),
            None => {
                let (client, connected) = connect_nats(&cfg, &node_id).await?;
                let js = async_nats::jetstream::new(client.clone());
                let kv = bucket::open(&js, cfg.kv_replicas, bucket::servers(&client)).await?;
                (
                    Arc::new(NatsTransport::new(client, connected)),
                    Arc::new(NatsBucket(kv)),
                )
            }
        };
        // The start time: a later run of a node has a larger epoch, so a record of an earlier
        // run is recognised as stale whatever order things arrive in.
        let epoch = wire::unix_ms().max(1);
        let timeout = Duration::from_millis(
            cfg.node_timeout_ms
                .unwrap_or(confab_actors::settings::DEFAULT_NODE_TIMEOUT_MS)
                .max(confab_actors::settings::MIN_NODE_TIMEOUT_MS),
        );
        let links = if cfg.link_listen.is_empty() {
            None
        } else {
            let settings = direct::LinkSettings {
                listen: cfg.link_listen.clone(),
                // Empty: the address bound (see `Links::start`).
                advertise: cfg.link_advertise.clone(),
                secret: cfg.link_secret.clone(),
                node_timeout: timeout,
                tls: link_tls.clone(),
            };
            let links = direct::Links::start(node_id.clone(), epoch, settings)
                .await
                .map_err(|e| ClusterError::LinkListen {
                    listen: cfg.link_listen.clone(),
                    reason: e.to_string(),
                })?;
            transport = Arc::new(direct::LinkedTransport::new(transport, links.clone()));
            Some(links)
        };
        if join.is_lossy() {
            transport = Arc::new(LossyTransport::new(transport));
        }
        let subscribe_err = |e: TransportError| ClusterError::Subscribe(e.to_string());
        let inbox = transport
            .subscribe(node_subject(&node_id))
            .await
            .map_err(subscribe_err)?;
        let beats = transport
            .subscribe(HEARTBEAT_SUBJECT.to_owned())
            .await
            .map_err(subscribe_err)?;
        // Changes from now on; the values already there are read below, before any change is
        // applied (a value read twice is applied twice, which is harmless).
        let watch = kv
            .watch()
            .await
            .map_err(|e| ClusterError::Kv(e.to_string()))?;
        let quota = Arc::new(EnvelopeQuota::new(
            cfg.max_queued_envelopes,
            cfg.max_queued_bytes,
        ));
        let outbound = Arc::new(batch::Outbound::new(quota.clone()));
        let batching = BatchingNodes::new(cfg.batch_envelopes);
        let (kv_tx, kv_rx) = mpsc::unbounded_channel();
        let cluster = Arc::new(Cluster {
            node_id,
            epoch: AtomicU64::new(epoch),
            timeout,
            kv: kv.clone(),
            outbound: outbound.clone(),
            quota: quota.clone(),
            kv_tx,
            endpoints: DashMap::new(),
            relays: DashMap::new(),
            next_relay: AtomicU64::new(1),
            batching,
            legs: DashMap::new(),
            arbiters: DashMap::new(),
            own: DashMap::new(),
            local: WeakLocalDirectory::default(),
            endpoints_per_user,
            remote: DashMap::new(),
            remote_len: AtomicUsize::new(0),
            transport: transport.clone(),
            // Without links there is nothing for their certificates to do.
            link_tls: links.as_ref().and(link_tls),
            links,
            nodes: Mutex::new(HashMap::new()),
            hearing: Mutex::new(membership::Hearing::new(Instant::now())),
            dead: Mutex::new(HashMap::new()),
            presence,
            rt: rt.clone(),
            stop: Mutex::new(Some(stop)),
            told: Mutex::new(HashMap::new()),
            reload: Mutex::new(None),
            muted_until: Mutex::new(None),
            clock_set_back_ms: AtomicU64::new(0),
            watch_held: tokio::sync::watch::Sender::new(false),
            unanswered_lost: Mutex::new(HashMap::new()),
            unseen_events: Mutex::new(HashMap::new()),
            events_resent: AtomicU64::new(0),
            loading: Mutex::new(None),
            leaving: AtomicBool::new(false),
            writes_failing: Arc::new(AtomicBool::new(false)),
            watch_failing: AtomicBool::new(false),
            watch_stalled: tokio::sync::Notify::new(),
            stalled_below: AtomicU64::new(0),
            watch_read_upto: AtomicU64::new(0),
            applied_revision: tokio::sync::watch::Sender::new(0),
            sign_in_syncs: Mutex::new(HashMap::new()),
            next_sync: AtomicU64::new(1),
            sign_in_timeout: Duration::from_millis(cfg.sign_in_sync_timeout_ms),
            admin: admin::AdminState::default(),
        });
        let url = match join.memory_network() {
            Some(_) => "memory".to_owned(),
            None => shown_url(&cfg.nats_url),
        };
        tracing::info!(node = %cluster.node_id, epoch, %url, "joined the cluster");
        // The values already there are applied before the node accepts anyone.
        let read_upto = cluster.load().await?;
        cluster.watch_read_upto.store(read_upto, Ordering::Relaxed);
        rt.spawn(publish_loop(transport, outbound, quota));
        rt.spawn(writes::write_loop(
            kv.clone(),
            kv_rx,
            cluster.writes_failing.clone(),
        ));
        rt.spawn(inbox_loop(cluster.clone(), inbox));
        rt.spawn(heartbeat_loop(cluster.clone(), beats));
        rt.spawn(watch_loop(cluster.clone(), watch));
        rt.spawn(records::watch_guard_loop(cluster.clone()));
        rt.spawn(liveness_loop(cluster.clone()));
        metrics::gauge!(m::CLUSTER_NODES).set(1.0);
        metrics::gauge!(m::CLUSTER_DIRECTORY_WRITES_PENDING).set(0.0);
        for direction in ["in", "out"] {
            metrics::counter!(m::CLUSTER_ENVELOPES, "direction" => direction).increment(0);
        }
        metrics::counter!(m::CLUSTER_ENVELOPES_DROPPED).increment(0);
        metrics::counter!(m::CLUSTER_BATCHED_ENVELOPES).increment(0);
        metrics::gauge!(m::CLUSTER_DIRECTORY_DEGRADED).set(0.0);
        for why in ["directory", "node"] {
            metrics::counter!(m::CLUSTER_SIGN_IN_SYNC_FAILURES, "why" => why).increment(0);
        }
        for kind in ["event", "leg_ended", "endpoint_lost"] {
            metrics::counter!(m::CLUSTER_ENVELOPES_RESENT, "kind" => kind).increment(0);
        }
        cluster.directory_gauge();
        Ok(cluster)
    }

    /// Shutdown: legs here whose endpoint is on another node end as on a single node (503
    /// "Server shutting down"); the legs whose endpoint is here are ended by their endpoint.
    pub fn end_remote_legs(&self) {
        for entry in self.legs.iter() {
            entry.value().1.do_send(LegMsg::Terminate {
                rid: None,
                cause: confab_actors::call::leg::TerminateCause::Shutdown,
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

    /// True while the transport reaches the others (the NATS client is connected); a node
    /// that lost NATS is degraded (its `/health` answers 503).
    pub fn nats_connected(&self) -> bool {
        self.transport.connected()
    }

    /// For tests: the envelopes (and their bytes) that hold a place in the bound of what waits
    /// for other nodes now (`quota.rs`); 0 once everything queued was handed to NATS.
    pub fn envelopes_waiting(&self) -> (usize, usize) {
        self.quota.waiting()
    }

    /// This node's direct links now (all zero without `cluster.link_listen`).
    pub fn direct_links(&self) -> DirectLinks {
        self.links.as_ref().map(|l| l.stats()).unwrap_or_default()
    }

    /// Where this node takes direct links (its heartbeat's `link`), when it does.
    pub fn direct_link_address(&self) -> Option<String> {
        self.links.as_ref().map(|l| l.advertise().to_owned())
    }

    /// Ends every direct link of this node, both ways, as a failing network would (tests);
    /// the next heartbeats dial them again. How many there were.
    pub fn cut_direct_links(&self) -> usize {
        self.links.as_ref().map_or(0, |l| l.cut_all())
    }

    /// For tests' hooks: the transport this node sends through.
    pub fn transport(&self) -> Arc<dyn Transport> {
        self.transport.clone()
    }

    /// True while the directory works for this node: its writes land and its watch receives.
    /// While not, other nodes may not learn of sign-ins here (and sign-ins are refused once
    /// `cluster.sign_in_sync_timeout_ms` passes), so `/health` says degraded.
    pub fn directory_healthy(&self) -> bool {
        let healthy = !self.writes_failing.load(Ordering::Relaxed)
            && !self.watch_failing.load(Ordering::Relaxed);
        metrics::gauge!(m::CLUSTER_DIRECTORY_DEGRADED).set(if healthy { 0.0 } else { 1.0 });
        healthy
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

    /// For tests: stops sending heartbeats for `d`, so the other nodes declare this one dead
    /// while it still runs (a node cut off from the others).
    pub fn mute_heartbeats(&self, d: Duration) {
        *lock(&self.muted_until) = Some(Instant::now() + d);
    }

    /// For tests: while `held`, this node's watch applies none of the other nodes' changes
    /// (they wait, in order, and are applied once released), only its own: two nodes held at
    /// once each miss the other's sign-ins, as two sign-ins within the directory's
    /// propagation time do. (A sign-in on either then waits out `sign_in_sync_timeout_ms` for
    /// the other, which cannot say it has read the record; and this node counts the revisions
    /// of its own records as applied though it holds back older ones: a test hook, not a
    /// state the node is ever in.)
    pub fn hold_watch(&self, held: bool) {
        self.watch_held.send_replace(held);
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
}

/// Connects to the NATS servers of `cfg.nats_url`; the flag follows the connection's state
/// from the client's events.
async fn connect_nats(
    cfg: &settings::Cluster,
    node_id: &str,
) -> Result<(async_nats::Client, Arc<AtomicBool>), ClusterError> {
    let urls: Vec<async_nats::ServerAddr> = cfg
        .nats_url
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| {
            s.parse()
                .map_err(|e: std::io::Error| ClusterError::Connect {
                    url: shown_url(s),
                    reason: e.to_string(),
                })
        })
        .collect::<Result<_, _>>()?;
    let connect_err = |reason: String| ClusterError::Connect {
        url: shown_url(&cfg.nats_url),
        reason,
    };
    let connected = Arc::new(AtomicBool::new(false));
    let events = connected.clone();
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
    set_nats_connected(&connected, true);
    Ok((client, connected))
}

/// `nats_url` as logs and errors show it: passwords and tokens redacted.
fn shown_url(urls: &str) -> String {
    urls.split(',')
        .map(|u| confab_actors::settings::redact_url_password(u.trim(), "<redacted>"))
        .collect::<Vec<_>>()
        .join(",")
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
}
