//! Location-transparent references: the router half of the seam (design §1). On a single node
//! every reference is `Local` and holds an actix address, exactly as before the cluster
//! existed. In a cluster, the few references that may cross nodes (a leg's endpoint, an
//! endpoint's leg, a directory entry's endpoint) can be `Remote`: they name a node and an id,
//! and sending through them publishes an envelope to that node (see [`crate::cluster`]).
//!
//! Every call's legs, its fork arbiter and its message counter live on one node (the caller's);
//! only endpoint ↔ leg traffic crosses nodes.

use actix::Addr;
use confab_protocol::{Reason, ServerMsg};
use std::sync::Arc;
use std::sync::atomic::AtomicU64;

use crate::call::leg::{CallLeg, LegMsg, TerminateCause};
use crate::cluster::Cluster;
use crate::cluster::wire::{Envelope, WireLegMsg};
use crate::endpoint::{Endpoint, EndpointMsg};
use crate::outbox::Outbox;

/// The text of a `message_failed` 503 or an `error{overloaded}` for a request not sent because
/// `cluster.max_queued_envelopes` (or `max_queued_bytes`) already wait for the NATS client
/// (docs/protocol.md §6, §9 p).
pub const REQUESTS_WAITING_FOR_NODE: &str = "Too many requests waiting for another node";

/// Where a directory entry's endpoint is.
#[derive(Clone)]
pub enum EndpointRef {
    Local(Addr<Endpoint>),
    Remote { node: String, id: String },
}

impl std::fmt::Debug for EndpointRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            EndpointRef::Local(_) => f.write_str("Local"),
            EndpointRef::Remote { node, id } => write!(f, "Remote({node}/{id})"),
        }
    }
}

impl EndpointRef {
    /// The local actor, if the endpoint is on this node.
    pub fn local(&self) -> Option<&Addr<Endpoint>> {
        match self {
            EndpointRef::Local(a) => Some(a),
            EndpointRef::Remote { .. } => None,
        }
    }
}

/// Where a leg's events go: its endpoint's outbox here, or the endpoint's node.
#[derive(Clone)]
pub enum EventSink {
    Local(Outbox),
    Remote {
        cluster: Arc<Cluster>,
        node: String,
        endpoint: String,
        /// The call of the leg whose events these are.
        call: String,
        /// How many state events the leg has numbered (`cluster/events.rs`).
        numbered: Arc<AtomicU64>,
    },
}

impl EventSink {
    /// False when an event for another node was not sent (over the bound of
    /// `Cluster::send_event`); a local outbox takes everything (it has its own limits).
    pub fn push(&self, msg: ServerMsg) -> bool {
        match self {
            EventSink::Local(o) => {
                o.push(msg);
                true
            }
            EventSink::Remote {
                cluster,
                node,
                endpoint,
                call,
                numbered,
            } => cluster.send_event(node, endpoint, call, &msg, numbered),
        }
    }
}

/// A leg's endpoint: the actor here, or an endpoint on another node.
#[derive(Clone)]
pub enum LegOwner {
    Local(Addr<Endpoint>),
    Remote {
        cluster: Arc<Cluster>,
        node: String,
        endpoint: String,
    },
}

impl LegOwner {
    /// False once a local endpoint has stopped. A remote one is presumed alive: its node
    /// answers for it (a `Release` when it is gone, a node loss when the node dies).
    pub fn connected(&self) -> bool {
        match self {
            LegOwner::Local(a) => a.connected(),
            LegOwner::Remote { .. } => true,
        }
    }

    /// Tells the endpoint that its leg `call` ended, and why (`reason`, for an endpoint on
    /// another node, whose copy of the leg's last events may have been lost on the way).
    pub fn leg_ended(
        &self,
        call: String,
        conversation: String,
        elsewhere: bool,
        reason: Option<Reason>,
    ) {
        match self {
            LegOwner::Local(a) => a.do_send(EndpointMsg::LegEnded {
                call,
                conversation,
                elsewhere,
                reason: None,
            }),
            LegOwner::Remote {
                cluster,
                node,
                endpoint,
            } => cluster.send(
                node,
                &Envelope::LegEnded {
                    endpoint: endpoint.clone(),
                    call,
                    conversation,
                    elsewhere,
                    from_node: cluster.node_id.clone(),
                    from_epoch: cluster.epoch(),
                    reason,
                },
            ),
        }
    }

    /// How often an unanswered end is sent again: for an endpoint on another node, whose
    /// `Release` may be lost on the way, or the end itself.
    pub fn resend_interval(&self) -> Option<std::time::Duration> {
        match self {
            LegOwner::Local(_) => None,
            LegOwner::Remote { cluster, .. } => Some(cluster.resend_interval()),
        }
    }

    /// The node holding the endpoint, when it is not this one.
    pub fn remote_node(&self) -> Option<&str> {
        match self {
            LegOwner::Local(_) => None,
            LegOwner::Remote { node, .. } => Some(node),
        }
    }
}

/// An endpoint's leg: the actor here, or a leg on the node where its call lives.
#[derive(Clone)]
pub enum LegRef {
    Local(Addr<CallLeg>),
    Remote {
        cluster: Arc<Cluster>,
        node: String,
        call: String,
        /// The endpoint holding this reference (so the leg's node can answer it).
        endpoint: String,
    },
}

impl LegRef {
    /// Sends one of the messages an endpoint sends its leg. Other messages never cross nodes.
    /// False when it was not sent: a client's request for a leg on another node over
    /// `cluster.max_queued_envelopes` or `max_queued_bytes` (see `cluster::quota`); the caller
    /// answers it itself.
    pub fn do_send(&self, msg: LegMsg) -> bool {
        match self {
            LegRef::Local(a) => {
                a.do_send(msg);
                true
            }
            LegRef::Remote {
                cluster,
                node,
                call,
                endpoint,
            } => {
                if matches!(msg, LegMsg::EndpointLost) {
                    // Sent again until the leg's end answers it.
                    cluster.endpoint_lost(node, call, endpoint);
                    return true;
                }
                let Some(wire) = WireLegMsg::from_leg_msg(msg) else {
                    // A bug, not a refusal: no client request maps here, so nobody waits for
                    // an answer to it.
                    tracing::error!(%call, "a leg message that cannot cross nodes was dropped");
                    return true;
                };
                // What a client's requests drive is bounded; what the node sends on its own
                // (a sign-out's hang-up, a lost endpoint, a release) must not be lost.
                let bounded = matches!(
                    wire,
                    WireLegMsg::Message { .. }
                        | WireLegMsg::Ack { .. }
                        | WireLegMsg::Composing { .. }
                        | WireLegMsg::Accept { .. }
                        | WireLegMsg::Decline { .. }
                        | WireLegMsg::Forward { .. }
                        | WireLegMsg::Transfer { .. }
                        | WireLegMsg::Terminate {
                            cause: TerminateCause::Call,
                            ..
                        }
                );
                let env = Envelope::Leg {
                    call: call.clone(),
                    reply_node: cluster.node_id.clone(),
                    reply_endpoint: endpoint.clone(),
                    msg: wire,
                };
                if bounded {
                    cluster.send_bounded(node, &env)
                } else {
                    cluster.send(node, &env);
                    true
                }
            }
        }
    }

    pub fn remote_node(&self) -> Option<&str> {
        match self {
            LegRef::Local(_) => None,
            LegRef::Remote { node, .. } => Some(node),
        }
    }
}
