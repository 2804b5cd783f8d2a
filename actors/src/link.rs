//! The engine's seam to actors on other nodes. The engine names what it needs from a cluster
//! here and nothing else: how an actor here reaches an actor elsewhere (a leg's events and end
//! to its endpoint, an endpoint's requests and loss to its leg, a fork offered to an endpoint
//! and its answer), which actors here other nodes may address (legs and arbiters), the resend
//! timing, and joining and leaving. Alone, a node has no [`Link`] and every reference is
//! local (`route.rs`).
//!
//! The cluster (crate `confab-cluster`) implements [`Join`] and [`Link`] and depends on this
//! crate, never the other way round: how envelopes travel, how the directory is replicated and
//! how nodes learn of each other's death stay behind these two traits.

use actix::Addr;
use confab_protocol::{Reason, ServerMsg};
use std::any::Any;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::Duration;

use crate::admin;
use crate::arbiter::ForkArbiter;
use crate::call::leg::{CallLeg, LegMsg};
use crate::directory::Directory;
use crate::endpoint::RemoteFork;
use crate::presence::PresenceShards;
use crate::settings::Settings;

/// A boxed future the link hands back (its own work may run on its own runtime).
pub type LinkFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Why a node could not join its cluster (the link's own error, as text and source).
pub type JoinError = Box<dyn std::error::Error + Send + Sync>;

/// What joining a cluster gives the node.
pub struct Joined {
    /// This node's id in the cluster (unique among the nodes).
    pub node_id: String,
    /// The directory every node reads: who is signed in where.
    pub directory: Arc<dyn Directory>,
    pub link: Arc<dyn Link>,
}

/// How a node joins its cluster, given to `spawn_node_with` by whoever built the node (the
/// binary, or a test) when the settings have a `[cluster]` section.
pub trait Join: Send + Sync + 'static {
    /// Joins as `node_id`, feeding the other nodes' endpoints to `presence`. Runs once, before
    /// the node takes any client.
    fn join(
        &self,
        settings: &Settings,
        node_id: String,
        presence: PresenceShards,
    ) -> LinkFuture<'static, Result<Joined, JoinError>>;
}

/// An envelope that holds its place among what waits for another node, ready to go: taken
/// before a fork's leg exists, so a fork that cannot be offered is lost at once and no leg is
/// left behind. Dropped unsent, it gives its place back.
pub trait Reserved: Send {
    fn send(self: Box<Self>);
}

/// The other nodes' answers to an admin query, and the nodes that did not answer in time.
#[derive(Debug, Default)]
pub struct NodeAnswers {
    pub answers: Vec<admin::Answer>,
    pub missing: Vec<String>,
}

/// How this node answers an admin query from another node (`admin::answer_here`); None once
/// the node has stopped (the asker then counts it as not answering).
pub type AdminAnswerer =
    Arc<dyn Fn(admin::Query) -> LinkFuture<'static, Option<admin::Answer>> + Send + Sync>;

/// An endpoint on another node, as a leg here addresses it.
#[derive(Clone, Debug)]
pub struct EndpointElsewhere {
    pub node: String,
    pub endpoint: String,
}

/// A resume that reached this node for a session held on another (docs/protocol.md §3
/// "Resuming"): the holding node checks it as its own resume and, if it takes the session back,
/// carries on through this node (`relay.rs`).
#[derive(Clone, Debug)]
pub struct RelayAsk {
    pub endpoint: String,
    pub user: String,
    pub rid: Option<u32>,
    pub token: String,
    pub seen: u64,
    pub sent: u64,
}

/// What the holding node sends a relayed session's client.
#[derive(Debug)]
pub enum RelayDown {
    /// Frames, as the writer writes them to a socket (length-prefixed).
    Bytes(bytes::Bytes),
    /// The holding node detached the session (or is gone): close the client's connection.
    End,
}

/// The receiving end of a relay: what comes for its client from the holding node.
pub type RelayDownRx = tokio::sync::mpsc::UnboundedReceiver<RelayDown>;

/// What a leg tells its endpoint on another node when the call ends.
#[derive(Clone, Debug)]
pub struct LegEnd {
    pub call: String,
    pub conversation: String,
    /// Another fork won the call.
    pub elsewhere: bool,
    /// The end's reason, for an endpoint whose copy of the leg's last events was lost.
    pub reason: Option<Reason>,
}

/// Everything the engine asks of the cluster once joined. Every method is cheap and never
/// blocks an actor: sending queues, and the answers come back as actor messages.
pub trait Link: Send + Sync + 'static {
    /// This node's id.
    fn node_id(&self) -> &str;
    /// This run's epoch: a later run of a node has a larger one.
    fn epoch(&self) -> u64;
    /// How long a node may be unheard before the others declare it dead.
    fn node_timeout(&self) -> Duration;
    /// How often a leg's unanswered end, or an endpoint's unanswered loss, is sent again.
    fn resend_interval(&self) -> Duration;
    /// How many times it is sent again before giving up.
    fn resend_attempts(&self) -> u32;

    // A leg here whose endpoint is on another node.

    /// Makes the leg reachable from its endpoint's node, by call id.
    fn register_leg(&self, call: &str, node: &str, leg: Addr<CallLeg>);
    /// The leg has stopped: forget it and whatever it still had to resend.
    fn forget_leg(&self, call: &str);
    /// One of the leg's events for its endpoint (`numbered`: the leg's count of state events);
    /// false when it was not sent (over the bound of what waits for that node).
    fn send_event(
        &self,
        to: &EndpointElsewhere,
        call: &str,
        msg: &ServerMsg,
        numbered: &AtomicU64,
    ) -> bool;
    /// The leg's end, sent again by the leg until its endpoint releases it.
    fn leg_ended(&self, to: &EndpointElsewhere, end: LegEnd);

    // An endpoint here whose leg is on another node.

    /// One of the messages an endpoint sends its leg; false when it was not sent (a client's
    /// request over the bound of what waits for that node: the endpoint answers it itself).
    fn send_to_leg(&self, node: &str, call: &str, endpoint: &str, msg: LegMsg) -> bool;
    /// The endpoint has forgotten its ended leg: the leg may stop.
    fn release_leg(&self, call: String, endpoint: String);
    /// The endpoint passed on the leg's state events up to `upto`.
    fn events_seen(&self, node: &str, call: &str, upto: u64);
    /// The endpoint took the fork an arbiter on another node offered it.
    fn fork_adopted(&self, leg_node: &str, arbiter: String, call: String);
    /// The endpoint could not take that fork (it is gone, ending, or full).
    fn fork_lost(&self, leg_node: &str, arbiter: String, call: String);

    // An arbiter here with forks on other nodes.

    /// Makes the arbiter reachable from its forks' nodes as `id`.
    fn register_arbiter(&self, id: &str, arbiter: Addr<ForkArbiter>);
    fn forget_arbiter(&self, id: &str);
    /// Reserves the offer of `fork` to `endpoint` on `node`; None when too much already waits
    /// for other nodes.
    fn reserve_fork(
        &self,
        node: &str,
        endpoint: &str,
        fork: RemoteFork,
    ) -> Option<Box<dyn Reserved + '_>>;

    // Sessions resumed through another node (`relay.rs`). On the client's node:

    /// Asks `node` to take the session `ask` back through this node: the relay's id here, and
    /// what that node sends the client. None when the cluster is stopping.
    fn open_relay(&self, node: &str, ask: RelayAsk) -> Option<(u64, RelayDownRx)>;
    /// The client's frames (MessagePack bodies), batch `seq` (from 1) of relay `relay`, for
    /// `endpoint` on `node`; false when not sent (over the bound of what waits for `node`).
    fn relay_up(
        &self,
        node: &str,
        endpoint: &str,
        relay: u64,
        seq: u64,
        frames: Vec<bytes::Bytes>,
    ) -> bool;
    /// The relayed client's connection has ended.
    fn relay_up_end(&self, node: &str, endpoint: &str, relay: u64);
    /// The relay has ended here: forget it.
    fn close_relay(&self, relay: u64);
    /// Reads again the files the cluster's settings name (SIGHUP, `POST /admin/reload`):
    /// each as its name in the reload's report and what came of it (`Ok(true)` read again,
    /// `Ok(false)` nothing to read, `Err` why the old one stays).
    fn reload_files(&self) -> Vec<(&'static str, Result<bool, String>)> {
        Vec::new()
    }
    /// Whether `node` is alive as far as this node knows (a resume for a session held on a
    /// node that is gone is refused as such).
    fn node_alive(&self, node: &str) -> bool;

    // On the node that holds the session:

    /// Bytes `seq` (from 1) for the client of relay `relay` on `node`; false when not sent.
    fn relay_down(&self, node: &str, relay: u64, seq: u64, bytes: bytes::Bytes) -> bool;
    /// The session left relay `relay` on `node` (detached, resumed elsewhere, or over).
    fn relay_down_end(&self, node: &str, relay: u64);

    // The admin API.

    /// Asks every other node it knows of `query`; resolves with their answers once all have
    /// answered, or at `timeout` with the silent ones named.
    fn ask_other_nodes(
        &self,
        query: &admin::Query,
        timeout: Duration,
    ) -> LinkFuture<'_, NodeAnswers>;
    /// Other nodes' admin queries are answered through `answerer` (set once the node runs).
    fn answer_admin_with(&self, answerer: AdminAnswerer);

    // The node.

    /// True while this node can take sign-ins as far as the cluster goes (its connection and
    /// its directory work); false makes `/readyz` and `/health` say degraded.
    fn healthy(&self) -> bool;
    /// Shutdown: every leg here whose endpoint is elsewhere ends as on a single node.
    fn end_remote_legs(&self);
    /// Shutdown: resolves once no leg here serves an endpoint elsewhere, at most `deadline`.
    fn remote_legs_gone(&self, deadline: Duration) -> LinkFuture<'_, ()>;
    /// Graceful leave: this node's endpoints are forgotten everywhere, then the link stops.
    fn leave(self: Arc<Self>) -> LinkFuture<'static, ()>;
    /// The implementation itself, for its own tests' hooks.
    fn as_any(self: Arc<Self>) -> Arc<dyn Any + Send + Sync>;
}
