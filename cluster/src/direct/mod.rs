//! Direct links between nodes: envelopes for another node over one TCP connection of this
//! node's own instead of through nats-server (`cluster.link_listen`, off by default).
//! Heartbeats, the directory and the markers below still go over NATS; a node without a link to
//! another, or whose link failed, sends over NATS as before. Why: nats-server spent about a
//! fifth of the CPU a cross-node message costs, and every envelope took two more hops
//! (docs/architecture.md §12).
//!
//! - **Discovery**: a node with links says in its heartbeat where it listens
//!   (`cluster.link_advertise`); another node that hears it dials it, one link per direction
//!   and pair of nodes (the dialer is the only one that sends), and dials again with back-off
//!   after a failure.
//! - **Who may connect**: both sides prove they hold `cluster.link_secret` (`handshake.rs`).
//!   With link TLS (`tls.rs`) that runs inside TLS 1.3, each side's certificate checked by the
//!   other against the cluster's CA and the node id. A dial from a run declared dead is
//!   refused; a link up stays (see [`Links::node_lost`]).
//! - **Order**: one sender's envelopes for one node keep their order across the switch from
//!   NATS to a link and back, by markers on NATS (`order.rs`). The switches are decided in
//!   [`LinkedTransport::publish`], which only the publisher task calls, one envelope after
//!   another.
//! - **Faults**: a link whose writer falls behind for a quarter of `node_timeout` (the
//!   publisher never waits longer for it: heartbeats share the publisher), that cannot write
//!   for `node_timeout` (TCP_USER_TIMEOUT), or whose other end closed, ends; what it still
//!   held is lost, as NATS may lose envelopes, and answered the same way (a message's 408).
//!   A link in use never ends without its `Closed` marker: the marker is owed, and goes before
//!   anything else for that node. Core NATS may still lose that marker; so, once a link to a
//!   node's run has been opened, every envelope for that run going over NATS carries this
//!   node's sender tag, which closes the link there as the lost marker would (`order.rs`,
//!   rule 8).

pub mod handshake;
pub mod order;
mod socket;
mod tls;
mod transport;

pub use tls::LinkTls;
pub use transport::LinkedTransport;

use bytes::Bytes;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::{mpsc, oneshot};
use tokio::task::AbortHandle;
use tokio::time::Instant;

use confab_actors::metrics as m;
use order::Marker;
use socket::{accept_loop, dial};

/// The largest frame a link carries: a batch holds at most 256 KiB of envelopes plus one, and
/// the largest single envelopes (a relayed session's frames, an admin answer) stay below what
/// NATS itself takes (1 MiB by default). A link takes more than NATS would; nothing sends more.
const MAX_FRAME: usize = 8 * 1024 * 1024;
/// Payloads waiting for a link's writer: when full, the publisher waits a quarter of
/// `node_timeout` at most, then gives the link up.
const WRITER_QUEUE: usize = 256;
/// What a link may hold for its `Open` marker (`order.rs`, rule 5), besides the time
/// (`node_timeout`).
const HOLD_PAYLOADS: usize = 4096;
const HOLD_BYTES: usize = 16 * 1024 * 1024;
/// Payloads read from the links and not yet taken by the inbox; past this the readers wait.
const INBOX_QUEUE: usize = 4096;
/// Handshakes under way at once; a connection past this is closed at once (a node has one
/// link from each other node, so only someone knocking reaches it).
const MAX_HANDSHAKES: usize = 64;
/// The largest handshake frame: nothing is read in quantity before the other side's proof.
const HANDSHAKE_MAX_FRAME: usize = 4096;
/// How long a handshake may take, each side.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);
/// Back-off between dials of a node, doubling up to the most; back to the first only after a
/// link lived [`STEADY_LINK`] (a link that keeps failing at once is not redialed at once).
const FIRST_BACKOFF: Duration = Duration::from_millis(250);
const MOST_BACKOFF: Duration = Duration::from_secs(10);
const STEADY_LINK: Duration = Duration::from_secs(10);
/// A refused handshake or a failed dial is logged at `warn` at most this often (then `debug`):
/// a misconfigured node, or someone knocking, must not fill the log.
const WARN_EVERY: Duration = Duration::from_secs(60);

/// `cluster.link_*`, checked.
#[derive(Clone)]
pub struct LinkSettings {
    pub listen: String,
    /// What the heartbeat tells the others to dial.
    pub advertise: String,
    pub secret: String,
    /// `cluster.node_timeout_ms`: how long a write may go unacknowledged before the link ends,
    /// and how long a link's envelopes may wait for its `Open` marker.
    pub node_timeout: Duration,
    /// `cluster.link_tls_*`, loaded; none: links in the clear.
    pub tls: Option<LinkTls>,
}

/// A node's direct links, as tests and operators see them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DirectLinks {
    /// Dialed by this node and up.
    pub out: usize,
    /// Accepted from other nodes and up.
    pub accepted: usize,
    /// Payloads (a batch of envelopes, or one) written to dialed links since the start.
    pub written: u64,
    /// Payloads read from accepted links since the start.
    pub read: u64,
    /// Dials of other nodes that did not make a link (unreachable, refused, a proof that failed).
    pub failed_dials: u64,
    /// Links other nodes dialed that this node refused.
    pub refused: u64,
}

/// What a link's writer is given.
enum Out {
    Payload(Bytes),
    /// Answered once everything before it is written.
    Flush(oneshot::Sender<()>),
}

/// A dialed, handshaken link.
struct OutLink {
    id: u64,
    /// This node's run when it dialed (its markers name it).
    run: u64,
    tx: mpsc::Sender<Out>,
}

enum PeerState {
    /// No link; dial again from `retry_at`.
    Idle {
        retry_at: Instant,
    },
    Dialing,
    /// Handshaken; its `Open` marker not sent yet.
    Ready(OutLink),
    /// Its `Open` marker sent: this node's envelopes for the peer go over it.
    Open(OutLink),
    /// Link `id` of run `run` was in use and is over; its `Closed` marker goes before anything
    /// else for the peer, then the peer is idle until `retry_at`.
    Owed {
        id: u64,
        run: u64,
        retry_at: Instant,
    },
}

impl PeerState {
    /// The link (if any) goes; one in use leaves its `Closed` marker owed.
    fn retire(&mut self, retry_at: Instant) {
        *self = match std::mem::replace(self, PeerState::Dialing) {
            PeerState::Open(l) => PeerState::Owed {
                id: l.id,
                run: l.run,
                retry_at,
            },
            owed @ PeerState::Owed { .. } => owed,
            _ => PeerState::Idle { retry_at },
        };
    }
}

/// Another node this one links to, as its heartbeat described it.
struct Peer {
    epoch: u64,
    addr: String,
    state: PeerState,
    backoff: Duration,
    /// Failed dials in a row (the first is logged at `warn`).
    failures: u32,
    /// The sender tag (`order.rs`, rule 8) put before each envelope for this run of the peer
    /// that goes over NATS, naming the run of the last link opened to it. Set when a link to
    /// this run is first opened: from then on the peer may hold one of this node's links open
    /// (its `Closed` marker may be lost), and it took a link of this handshake version, so it
    /// reads tags. None before, so that a node without links, or a build that does not read
    /// tags, never gets one; back to None with the peer's next run.
    tag: Option<Bytes>,
}

/// A payload read from an accepted link, for the inbox.
struct FromLink {
    from: String,
    /// The dialer's run.
    run: u64,
    link: u64,
    payload: Bytes,
}

/// What the inbox must forget: runs of a node up to this one, declared dead.
struct Forget(String, u64);

/// A reader of an accepted link.
struct Accepted {
    /// The dialer's run.
    run: u64,
    reader: AbortHandle,
}

/// This node's direct links: the ones it dialed (by node) and the ones it accepted.
pub struct Links {
    me: String,
    epoch: AtomicU64,
    key: ring::hmac::Key,
    settings: LinkSettings,
    peers: Mutex<HashMap<String, Peer>>,
    /// Readers of accepted links, by (node, link).
    accepted: Mutex<HashMap<(String, u64), Accepted>>,
    /// The latest run of each node declared dead (its links are refused).
    dead: Mutex<HashMap<String, u64>>,
    /// Payloads read from accepted links, for the inbox: bounded, so that a slow inbox holds
    /// the links' readers back (and through TCP their senders) instead of growing memory.
    received: mpsc::Sender<FromLink>,
    /// What the inbox must forget (apart, so that a full `received` never holds one up).
    forgotten: mpsc::UnboundedSender<Forget>,
    /// Payloads written to dialed links, and read from accepted ones, since the start.
    written: AtomicU64,
    read: AtomicU64,
    failed_dials: AtomicU64,
    refused: AtomicU64,
    /// When a refusal was last logged at `warn`.
    refusal_warned: Mutex<Option<Instant>>,
    /// Taken by the inbox's subscription.
    inbox: Mutex<Option<(mpsc::Receiver<FromLink>, mpsc::UnboundedReceiver<Forget>)>>,
    /// Handshakes under way, bounded by [`MAX_HANDSHAKES`].
    handshakes: Arc<tokio::sync::Semaphore>,
    next_link: AtomicU64,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// What the publisher does with one envelope for a node.
enum Route {
    /// Over NATS, after `tag` when given.
    Nats { tag: Option<Bytes> },
    /// Over the link; first the `Open` marker on NATS when given.
    Link {
        id: u64,
        tx: mpsc::Sender<Out>,
        open: Option<Bytes>,
    },
    /// Over NATS after link `id`'s `Closed` marker (owed until published), after `tag`.
    Closed {
        id: u64,
        marker: Bytes,
        tag: Option<Bytes>,
    },
}

impl Links {
    /// Listens on `settings.listen` and starts accepting links (on the current runtime).
    pub async fn start(
        me: String,
        epoch: u64,
        settings: LinkSettings,
    ) -> Result<Arc<Links>, std::io::Error> {
        let mut settings = settings;
        let listener = TcpListener::bind(&settings.listen).await?;
        // Port 0 (tests): the others dial the port the system chose.
        if settings.advertise.is_empty() || settings.advertise.ends_with(":0") {
            settings.advertise = listener.local_addr()?.to_string();
        }
        let (received, inbox) = mpsc::channel(INBOX_QUEUE);
        let (forgotten, forget_rx) = mpsc::unbounded_channel();
        let links = Arc::new(Links {
            me,
            epoch: AtomicU64::new(epoch),
            key: handshake::key(&settings.secret),
            settings,
            peers: Mutex::new(HashMap::new()),
            accepted: Mutex::new(HashMap::new()),
            dead: Mutex::new(HashMap::new()),
            received,
            forgotten,
            written: AtomicU64::new(0),
            read: AtomicU64::new(0),
            failed_dials: AtomicU64::new(0),
            refused: AtomicU64::new(0),
            refusal_warned: Mutex::new(None),
            inbox: Mutex::new(Some((inbox, forget_rx))),
            handshakes: Arc::new(tokio::sync::Semaphore::new(MAX_HANDSHAKES)),
            next_link: AtomicU64::new(rand::random::<u32>() as u64),
        });
        tracing::info!(listen = %links.settings.listen, advertise = %links.settings.advertise, tls = links.settings.tls.is_some(), "direct links to other nodes on");
        for direction in ["in", "out"] {
            metrics::gauge!(m::CLUSTER_DIRECT_LINKS, "direction" => direction).set(0.0);
            metrics::counter!(m::CLUSTER_DIRECT_PAYLOADS, "direction" => direction).increment(0);
        }
        for event in [
            "up",
            "down",
            "dial_failed",
            "refused",
            "overflow",
            "late_dropped",
            "stalled",
        ] {
            metrics::counter!(m::CLUSTER_DIRECT_LINK_EVENTS, "event" => event).increment(0);
        }
        tokio::spawn(accept_loop(links.clone(), listener));
        Ok(links)
    }

    /// What this node's heartbeat tells the others to dial.
    pub fn advertise(&self) -> &str {
        &self.settings.advertise
    }

    /// The order rules' bounds on what a link holds for its `Open` marker.
    fn hold_limit(&self) -> order::HoldLimit {
        order::HoldLimit {
            payloads: HOLD_PAYLOADS,
            bytes: HOLD_BYTES,
            time: self.settings.node_timeout,
        }
    }

    /// How long the publisher waits for a link's full queue before giving the link up.
    fn stall(&self) -> Duration {
        self.settings.node_timeout / 4
    }

    /// This node starts run `epoch` (a rejoin): later dials name it. The links up stay, as
    /// this node's NATS connection does: what goes over them is the same stream of envelopes,
    /// and each envelope says which run sent it where that matters.
    pub fn new_run(&self, epoch: u64) {
        self.epoch.store(epoch, Ordering::Relaxed);
    }

    /// A heartbeat of `node`'s run `epoch`, which listens for links at `addr` (None: it takes
    /// none): dials it unless a link is up, being made, or waiting out a back-off.
    pub fn heard(self: &Arc<Self>, node: &str, epoch: u64, addr: Option<&str>) {
        if node == self.me || self.is_dead(node, epoch) {
            return;
        }
        let Some(addr) = addr else {
            // A run that takes no links (restarted without them, or an older build): forget
            // the peer, its sender tag with it, which that run could not read. An owed
            // `Closed` goes too: the run it was for is gone, and this one reads no markers.
            let mut peers = lock(&self.peers);
            if peers.get(node).is_some_and(|p| p.epoch != epoch) {
                peers.remove(node);
            }
            return;
        };
        let now = Instant::now();
        let mut peers = lock(&self.peers);
        let peer = peers.entry(node.to_owned()).or_insert_with(|| Peer {
            epoch,
            addr: addr.to_owned(),
            state: PeerState::Idle { retry_at: now },
            backoff: FIRST_BACKOFF,
            failures: 0,
            tag: None,
        });
        if peer.epoch != epoch {
            // A new run holds none of this node's links, and may be a build that does not
            // read tags.
            peer.tag = None;
        }
        if peer.epoch != epoch || peer.addr != addr {
            // Another run, or it moved: whatever link there was is not to it (one in use owes
            // its `Closed`, which the new run takes as a link it never knew).
            peer.epoch = epoch;
            peer.addr = addr.to_owned();
            peer.backoff = FIRST_BACKOFF;
            peer.state.retire(now);
        }
        let due = match &peer.state {
            PeerState::Idle { retry_at } => now >= *retry_at,
            PeerState::Dialing | PeerState::Owed { .. } => false,
            // A link never used whose writer ended is dialed again; one in use waits for the
            // publisher, who owes its `Closed` marker and sends it when it next sends there.
            PeerState::Ready(l) => l.tx.is_closed(),
            PeerState::Open(_) => false,
        };
        if !due {
            return;
        }
        peer.state = PeerState::Dialing;
        let link = self.next_link.fetch_add(1, Ordering::Relaxed);
        drop(peers);
        tokio::spawn(dial(
            self.clone(),
            node.to_owned(),
            epoch,
            addr.to_owned(),
            link,
        ));
    }

    /// `node`'s run `epoch` (and every earlier run) was declared dead: later dials from those
    /// runs are refused. The links up stay, as NATS would go on delivering what that run sends:
    /// a run declared dead may still be running (cut off, or silent), and what it sent last (a
    /// fork the others refuse, say) must still arrive to be answered; routing drops what a dead
    /// run sends where that matters, whichever way it came. A link from a dead run ends with
    /// its socket; the inbox then forgets its order state.
    pub fn node_lost(&self, node: &str, epoch: u64) {
        {
            let mut dead = lock(&self.dead);
            let latest = dead.entry(node.to_owned()).or_insert(epoch);
            *latest = (*latest).max(epoch);
        }
        let linked = lock(&self.accepted)
            .iter()
            .any(|((from, _), a)| from == node && a.run <= epoch);
        if !linked {
            let _ = self.forgotten.send(Forget(node.to_owned(), epoch));
        }
    }

    /// A link accepted from `node`'s run `run` ended: if that run was declared dead, the inbox
    /// forgets it (nothing more will come from it over a link).
    fn accepted_ended(&self, node: &str, run: u64) {
        if self.is_dead(node, run) {
            let _ = self.forgotten.send(Forget(node.to_owned(), run));
        }
    }

    fn is_dead(&self, node: &str, epoch: u64) -> bool {
        lock(&self.dead).get(node).is_some_and(|e| *e >= epoch)
    }

    /// Ends every link, both ways (tests: a link failing under load).
    pub fn cut_all(&self) -> usize {
        let mut n = 0;
        for peer in lock(&self.peers).values_mut() {
            // The writer ends with its last sender; the publisher then finds the link
            // closed and sends the `Closed` marker.
            if let PeerState::Ready(l) | PeerState::Open(l) = &mut peer.state {
                n += 1;
                let (tx, _) = mpsc::channel(1);
                l.tx = tx;
            }
        }
        for (_, a) in lock(&self.accepted).drain() {
            a.reader.abort();
            n += 1;
        }
        self.gauge_in();
        n
    }

    /// What the links carried so far, and how many are up now.
    pub fn stats(&self) -> DirectLinks {
        let (out, accepted) = self.count();
        DirectLinks {
            out,
            accepted,
            written: self.written.load(Ordering::Relaxed),
            read: self.read.load(Ordering::Relaxed),
            failed_dials: self.failed_dials.load(Ordering::Relaxed),
            refused: self.refused.load(Ordering::Relaxed),
        }
    }

    /// Links up now, (dialed, accepted).
    fn count(&self) -> (usize, usize) {
        let out = lock(&self.peers)
            .values()
            .filter(|p| match &p.state {
                PeerState::Ready(l) | PeerState::Open(l) => !l.tx.is_closed(),
                _ => false,
            })
            .count();
        (out, lock(&self.accepted).len())
    }

    fn gauge_out(&self) {
        let (out, _) = self.count();
        metrics::gauge!(m::CLUSTER_DIRECT_LINKS, "direction" => "out").set(out as f64);
    }

    fn gauge_in(&self) {
        let n = lock(&self.accepted).len();
        metrics::gauge!(m::CLUSTER_DIRECT_LINKS, "direction" => "in").set(n as f64);
    }

    /// Decides how the next envelope for `node` goes (see the module's doc).
    fn route(&self, node: &str) -> Route {
        let mut peers = lock(&self.peers);
        let Some(peer) = peers.get_mut(node) else {
            return Route::Nats { tag: None };
        };
        // A link whose writer ended: one in use owes its `Closed`, one never used just goes.
        if let PeerState::Open(l) | PeerState::Ready(l) = &peer.state
            && l.tx.is_closed()
        {
            peer.state.retire(Instant::now() + peer.backoff);
        }
        match &peer.state {
            PeerState::Owed { id, run, .. } => Route::Closed {
                id: *id,
                marker: self.marker_closed(*run, *id),
                tag: peer.tag.clone(),
            },
            PeerState::Open(l) => Route::Link {
                id: l.id,
                tx: l.tx.clone(),
                open: None,
            },
            PeerState::Ready(_) => {
                let PeerState::Ready(l) = std::mem::replace(&mut peer.state, PeerState::Dialing)
                else {
                    return Route::Nats { tag: None };
                };
                let route = Route::Link {
                    id: l.id,
                    tx: l.tx.clone(),
                    open: Some(
                        Marker::Open {
                            from: self.me.clone(),
                            run: l.run,
                            link: l.id,
                        }
                        .encode(),
                    ),
                };
                // Set now, kept if the `Open` cannot be published: tagging an envelope for a
                // run that reads tags is never wrong.
                peer.tag = order::sender_tag(&self.me, l.run);
                peer.state = PeerState::Open(l);
                route
            }
            PeerState::Idle { .. } | PeerState::Dialing => Route::Nats {
                tag: peer.tag.clone(),
            },
        }
    }

    /// Link `id` to `node` cannot take the publisher's envelope (ended, or stalled): it goes,
    /// owing its `Closed` marker.
    fn failed(&self, node: &str, id: u64) {
        let mut peers = lock(&self.peers);
        if let Some(peer) = peers.get_mut(node)
            && let PeerState::Open(l) = &peer.state
            && l.id == id
        {
            peer.state.retire(Instant::now() + peer.backoff);
        }
    }

    /// Link `id`'s `Closed` marker is published: nothing is owed any more.
    fn closed_sent(&self, node: &str, id: u64) {
        let mut peers = lock(&self.peers);
        if let Some(peer) = peers.get_mut(node)
            && let PeerState::Owed {
                id: owed, retry_at, ..
            } = peer.state
            && owed == id
        {
            peer.state = PeerState::Idle { retry_at };
        }
    }

    /// The `Open` marker of link `id` could not be published: the link is not used yet.
    fn unopen(&self, node: &str, id: u64) {
        let mut peers = lock(&self.peers);
        if let Some(peer) = peers.get_mut(node)
            && let PeerState::Open(l) = &peer.state
            && l.id == id
        {
            let PeerState::Open(l) = std::mem::replace(&mut peer.state, PeerState::Dialing) else {
                return;
            };
            peer.state = PeerState::Ready(l);
        }
    }

    fn marker_closed(&self, run: u64, link: u64) -> Bytes {
        Marker::Closed {
            from: self.me.clone(),
            run,
            link,
        }
        .encode()
    }

    /// A dial of `node` (run `epoch`) ended: with a link, or not (and why). Whether to log the
    /// failure at `warn` (the first of a streak).
    fn dialed(&self, node: &str, epoch: u64, link: Option<OutLink>) -> bool {
        let mut peers = lock(&self.peers);
        let Some(peer) = peers.get_mut(node).filter(|p| p.epoch == epoch) else {
            return false;
        };
        if !matches!(peer.state, PeerState::Dialing) {
            return false;
        }
        let warn = match link {
            Some(l) => {
                peer.failures = 0;
                peer.state = PeerState::Ready(l);
                false
            }
            None => {
                peer.failures += 1;
                peer.state = PeerState::Idle {
                    retry_at: Instant::now() + peer.backoff,
                };
                peer.backoff = (peer.backoff * 2).min(MOST_BACKOFF);
                peer.failures == 1
            }
        };
        drop(peers);
        self.gauge_out();
        warn
    }

    /// A dialed link to `node` ended after `lived`: a link that lived long resets the back-off.
    fn link_ended(&self, node: &str, lived: Duration) {
        let mut peers = lock(&self.peers);
        if let Some(peer) = peers.get_mut(node) {
            if lived >= STEADY_LINK {
                peer.backoff = FIRST_BACKOFF;
            } else {
                peer.backoff = (peer.backoff * 2).min(MOST_BACKOFF);
            }
        }
        drop(peers);
        self.gauge_out();
    }

    /// Counts a refused handshake; whether to log it at `warn` (at most every [`WARN_EVERY`]).
    fn refusal(&self) -> bool {
        self.refused.fetch_add(1, Ordering::Relaxed);
        metrics::counter!(m::CLUSTER_DIRECT_LINK_EVENTS, "event" => "refused").increment(1);
        let mut last = lock(&self.refusal_warned);
        let now = Instant::now();
        let warn = last.is_none_or(|at| now.duration_since(at) >= WARN_EVERY);
        if warn {
            *last = Some(now);
        }
        warn
    }

    /// Everything given to the open links so far is written (or they failed).
    async fn flush(&self) {
        let txs: Vec<mpsc::Sender<Out>> = lock(&self.peers)
            .values()
            .filter_map(|p| match &p.state {
                PeerState::Open(l) => Some(l.tx.clone()),
                _ => None,
            })
            .collect();
        for tx in txs {
            let (done, wait) = oneshot::channel();
            if tx.send(Out::Flush(done)).await.is_ok() {
                let _ = wait.await;
            }
        }
    }
}
