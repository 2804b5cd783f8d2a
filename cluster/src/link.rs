//! The engine's [`Link`] and [`Join`], carried out over the cluster's transport: each request of the engine
//! becomes the envelope that carries it (`wire.rs`), bounded or not, and the registries the
//! inbox (`routing.rs`) delivers through.

use bytes::Bytes;
use confab_actors::link::{RelayAsk, RelayDownRx};
use std::any::Any;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::Duration;

use actix::Addr;
use confab_actors::admin;
use confab_actors::arbiter::ForkArbiter;
use confab_actors::call::leg::{CallLeg, LegMsg};
use confab_actors::directory::Directory;
use confab_actors::endpoint::RemoteFork;
use confab_actors::link::{
    AdminAnswerer, EndpointElsewhere, Join, JoinError, Joined, LegEnd, Link, LinkFuture,
    NodeAnswers, Reserved,
};
use confab_actors::presence::PresenceShards;
use confab_actors::settings::Settings;
use confab_protocol::ServerMsg;

use crate::directory::NatsDirectory;
use crate::memory::MemoryNetwork;
use crate::routing::BoundedEnvelope;
use crate::transport::LossyTransport;
use crate::wire::{Envelope, WireLegMsg};
use crate::{Cluster, RESEND_ATTEMPTS};

/// Joins the cluster of the settings' `[cluster]` section over NATS, or (tests) over a
/// [`MemoryNetwork`]; tests may also have the transport lose envelopes
/// ([`ClusterJoin::lossy`]).
#[derive(Debug, Clone, Default)]
pub struct ClusterJoin {
    /// None: NATS, at the settings' `cluster.nats_url`.
    memory: Option<MemoryNetwork>,
    lossy: bool,
}

impl ClusterJoin {
    /// Over NATS, as in production.
    pub fn nats() -> Self {
        ClusterJoin::default()
    }

    /// Tests: over `network`, with the nodes of this process that joined it; no NATS (the
    /// settings' `cluster.nats_url` is not used).
    pub fn memory(network: &MemoryNetwork) -> Self {
        ClusterJoin {
            memory: Some(network.clone()),
            lossy: false,
        }
    }

    pub(crate) fn memory_network(&self) -> Option<&MemoryNetwork> {
        self.memory.as_ref()
    }

    /// Tests: the transport is wrapped in a [`LossyTransport`], which [`lossy`] finds.
    pub fn lossy(mut self) -> Self {
        self.lossy = true;
        self
    }

    pub(crate) fn is_lossy(&self) -> bool {
        self.lossy
    }
}

impl Join for ClusterJoin {
    fn join(
        &self,
        settings: &Settings,
        node_id: String,
        presence: PresenceShards,
    ) -> LinkFuture<'static, Result<Joined, JoinError>> {
        let cfg = settings.cluster.clone();
        let endpoints_per_user = settings.limits.endpoints_per_user;
        let join = self.clone();
        Box::pin(async move {
            let cfg = cfg.ok_or("the settings have no [cluster] section")?;
            let cluster = Cluster::start(&cfg, node_id, presence, endpoints_per_user, join).await?;
            Ok(Joined {
                node_id: cluster.node_id.clone(),
                directory: Arc::new(NatsDirectory::new(cluster.clone())) as Arc<dyn Directory>,
                link: cluster as Arc<dyn Link>,
            })
        })
    }
}

impl Reserved for BoundedEnvelope<'_> {
    fn send(self: Box<Self>) {
        BoundedEnvelope::send(*self);
    }
}

impl Link for Cluster {
    fn node_id(&self) -> &str {
        &self.node_id
    }

    fn open_relay(&self, node: &str, ask: RelayAsk) -> Option<(u64, RelayDownRx)> {
        Cluster::open_relay(self, node, ask)
    }

    fn relay_up(
        &self,
        node: &str,
        endpoint: &str,
        relay: u64,
        seq: u64,
        frames: Vec<Bytes>,
    ) -> bool {
        Cluster::relay_up(self, node, endpoint, relay, seq, frames)
    }

    fn relay_up_end(&self, node: &str, endpoint: &str, relay: u64) {
        Cluster::relay_up_end(self, node, endpoint, relay);
    }

    fn close_relay(&self, relay: u64) {
        Cluster::close_relay(self, relay);
    }

    fn reload_files(&self) -> Vec<(&'static str, Result<bool, String>)> {
        match &self.link_tls {
            Some(tls) => vec![(
                "link_tls",
                tls.reload().map(|()| true).map_err(|e| e.to_string()),
            )],
            None => Vec::new(),
        }
    }

    fn node_alive(&self, node: &str) -> bool {
        Cluster::node_alive(self, node)
    }

    fn relay_down(&self, node: &str, relay: u64, seq: u64, bytes: Bytes) -> bool {
        self.send_bounded(
            node,
            &Envelope::RelayOut {
                relay,
                seq,
                bytes: bytes.to_vec(),
            },
        )
    }

    fn relay_down_end(&self, node: &str, relay: u64) {
        self.send(node, &Envelope::RelayOutEnd { relay });
    }

    fn epoch(&self) -> u64 {
        Cluster::epoch(self)
    }

    fn node_timeout(&self) -> Duration {
        self.timeout
    }

    fn resend_interval(&self) -> Duration {
        Cluster::resend_interval(self)
    }

    fn resend_attempts(&self) -> u32 {
        RESEND_ATTEMPTS
    }

    fn register_leg(&self, call: &str, node: &str, leg: Addr<CallLeg>) {
        self.legs.insert(call.to_owned(), (node.to_owned(), leg));
    }

    fn forget_leg(&self, call: &str) {
        self.legs.remove(call);
        self.forget_events(call);
    }

    fn send_event(
        &self,
        to: &EndpointElsewhere,
        call: &str,
        msg: &ServerMsg,
        numbered: &AtomicU64,
    ) -> bool {
        Cluster::send_event(self, &to.node, &to.endpoint, call, msg, numbered)
    }

    fn leg_ended(&self, to: &EndpointElsewhere, end: LegEnd) {
        self.send(
            &to.node,
            &Envelope::LegEnded {
                endpoint: to.endpoint.clone(),
                call: end.call,
                conversation: end.conversation,
                elsewhere: end.elsewhere,
                from_node: self.node_id.clone(),
                from_epoch: self.epoch(),
                reason: end.reason,
            },
        );
    }

    fn send_to_leg(&self, node: &str, call: &str, endpoint: &str, msg: LegMsg) -> bool {
        if matches!(msg, LegMsg::EndpointLost) {
            // Sent again until the leg's end answers it.
            self.endpoint_lost(node, call, endpoint);
            return true;
        }
        let Some(wire) = WireLegMsg::from_leg_msg(msg) else {
            // A bug, not a refusal: no client request maps here, so nobody waits for an
            // answer to it.
            tracing::error!(%call, "a leg message that cannot cross nodes was dropped");
            return true;
        };
        crate::routing::SCRATCH.with_borrow_mut(|scratch| {
            let payload = &mut scratch.payload;
            payload.clear();
            if !crate::hot::write_leg(payload, call, &self.node_id, endpoint, &wire) {
                tracing::error!(%call, "cannot encode a leg message");
                // As when it could not be queued: a client's request gets its answer here.
                return !wire.is_bounded();
            }
            self.send_encoded(node, payload, wire.is_bounded()) || !wire.is_bounded()
        })
    }

    fn release_leg(&self, call: String, endpoint: String) {
        Cluster::release_leg(self, call, endpoint);
    }

    fn events_seen(&self, node: &str, call: &str, upto: u64) {
        self.send(
            node,
            &Envelope::EventsSeen {
                call: call.to_owned(),
                upto,
            },
        );
    }

    fn fork_adopted(&self, leg_node: &str, arbiter: String, call: String) {
        self.send(leg_node, &Envelope::ForkAdopted { arbiter, call });
    }

    fn fork_lost(&self, leg_node: &str, arbiter: String, call: String) {
        self.send(leg_node, &Envelope::ForkLost { arbiter, call });
    }

    fn register_arbiter(&self, id: &str, arbiter: Addr<ForkArbiter>) {
        self.arbiters.insert(id.to_owned(), arbiter);
    }

    fn forget_arbiter(&self, id: &str) {
        self.arbiters.remove(id);
    }

    fn reserve_fork(
        &self,
        node: &str,
        endpoint: &str,
        fork: RemoteFork,
    ) -> Option<Box<dyn Reserved + '_>> {
        let adopt = Envelope::Adopt {
            endpoint: endpoint.to_owned(),
            leg_node: fork.leg_node,
            arbiter: fork.arbiter,
            call: fork.call,
            conversation: fork.conversation,
            from: fork.from,
            offer: fork.offer,
            toast: fork.toast,
            immediate: fork.immediate,
            from_epoch: fork.leg_epoch,
        };
        let reserved = self.reserve_bounded(node, &adopt)?;
        Some(Box::new(reserved))
    }

    fn ask_other_nodes(
        &self,
        query: &admin::Query,
        timeout: Duration,
    ) -> LinkFuture<'_, NodeAnswers> {
        let query = query.clone();
        Box::pin(async move { Cluster::ask_other_nodes(self, &query, timeout).await })
    }

    fn answer_admin_with(&self, answerer: AdminAnswerer) {
        self.set_admin_answerer(answerer);
    }

    fn healthy(&self) -> bool {
        self.nats_connected() && self.directory_healthy()
    }

    fn end_remote_legs(&self) {
        Cluster::end_remote_legs(self);
    }

    fn remote_legs_gone(&self, deadline: Duration) -> LinkFuture<'_, ()> {
        Box::pin(Cluster::remote_legs_gone(self, deadline))
    }

    fn leave(self: Arc<Self>) -> LinkFuture<'static, ()> {
        Box::pin(async move { Cluster::leave(&self).await })
    }

    fn as_any(self: Arc<Self>) -> Arc<dyn Any + Send + Sync> {
        self
    }
}

/// The cluster a node joined, for tests' hooks: None for a node alone.
pub fn of(node: &confab_actors::RunningNode) -> Option<Arc<Cluster>> {
    node.link()?.clone().as_any().downcast::<Cluster>().ok()
}

/// For tests' hooks: the [`LossyTransport`] of a node started with [`ClusterJoin::lossy`].
pub fn lossy(node: &confab_actors::RunningNode) -> Option<Arc<LossyTransport>> {
    of(node)?
        .transport()
        .as_any()
        .downcast::<LossyTransport>()
        .ok()
}

/// Starts a node, joining the cluster of its `[cluster]` section over NATS when it has one.
pub fn spawn_node(
    settings: Settings,
) -> Result<confab_actors::RunningNode, confab_actors::NodeError> {
    spawn_node_with(settings, ClusterJoin::nats())
}

/// Starts a node, joining the cluster of its `[cluster]` section (if it has one) as `join`
/// says.
pub fn spawn_node_with(
    settings: Settings,
    join: ClusterJoin,
) -> Result<confab_actors::RunningNode, confab_actors::NodeError> {
    let join = settings
        .cluster
        .is_some()
        .then(|| Arc::new(join) as Arc<dyn Join>);
    confab_actors::node::spawn_node_with(settings, join)
}
