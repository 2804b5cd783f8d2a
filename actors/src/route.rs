//! Location-transparent references: the router half of the seam (design §1). On a single node
//! every reference is `Local` and holds an actix address, exactly as before the cluster
//! existed. In a cluster, the few references that may cross nodes (a leg's endpoint, an
//! endpoint's leg, a directory entry's endpoint) can be `Remote`: they name a node and an id,
//! and sending through them goes through the node's [`Link`] (`link.rs`).
//!
//! Every call's legs, its fork arbiter and its message counter live on one node (the caller's);
//! only endpoint ↔ leg traffic crosses nodes.

use actix::Addr;
use confab_protocol::{Reason, ServerMsg};
use std::sync::Arc;
use std::sync::atomic::AtomicU64;

use crate::call::leg::{CallLeg, LegMsg};
use crate::endpoint::{Endpoint, EndpointMsg};
use crate::link::{EndpointElsewhere, LegEnd, Link};
use crate::outbox::Outbox;

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
        link: Arc<dyn Link>,
        to: EndpointElsewhere,
        /// The call of the leg whose events these are.
        call: String,
        /// How many state events the leg has numbered (the cluster's `events.rs`).
        numbered: Arc<AtomicU64>,
    },
}

impl EventSink {
    /// False when an event for another node was not sent (over the bound of
    /// [`Link::send_event`]); a local outbox takes everything (it has its own limits).
    pub fn push(&self, msg: ServerMsg) -> bool {
        match self {
            EventSink::Local(o) => {
                o.push(msg);
                true
            }
            EventSink::Remote {
                link,
                to,
                call,
                numbered,
            } => link.send_event(to, call, &msg, numbered),
        }
    }
}

/// A leg's endpoint: the actor here, or an endpoint on another node.
#[derive(Clone)]
pub enum LegOwner {
    Local(Addr<Endpoint>),
    Remote {
        link: Arc<dyn Link>,
        to: EndpointElsewhere,
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
            LegOwner::Remote { link, to } => link.leg_ended(
                to,
                LegEnd {
                    call,
                    conversation,
                    elsewhere,
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
            LegOwner::Remote { link, .. } => Some(link.resend_interval()),
        }
    }

    /// The node holding the endpoint, when it is not this one.
    pub fn remote_node(&self) -> Option<&str> {
        match self {
            LegOwner::Local(_) => None,
            LegOwner::Remote { to, .. } => Some(&to.node),
        }
    }
}

/// An endpoint's leg: the actor here, or a leg on the node where its call lives.
#[derive(Clone)]
pub enum LegRef {
    Local(Addr<CallLeg>),
    Remote {
        link: Arc<dyn Link>,
        node: String,
        call: String,
        /// The endpoint holding this reference (so the leg's node can answer it).
        endpoint: String,
    },
}

impl LegRef {
    /// Sends one of the messages an endpoint sends its leg. Other messages never cross nodes.
    /// False when it was not sent: a client's request for a leg on another node over the
    /// bound of what waits for that node ([`Link::send_to_leg`]); the caller answers it
    /// itself.
    pub fn do_send(&self, msg: LegMsg) -> bool {
        match self {
            LegRef::Local(a) => {
                a.do_send(msg);
                true
            }
            LegRef::Remote {
                link,
                node,
                call,
                endpoint,
            } => link.send_to_leg(node, call, endpoint, msg),
        }
    }

    pub fn remote_node(&self) -> Option<&str> {
        match self {
            LegRef::Local(_) => None,
            LegRef::Remote { node, .. } => Some(node),
        }
    }
}
