//! The fork arbiter: one per call to a user (and one per transfer or forward target). It offers
//! the call to every endpoint of the user, then serialises everything that can decide the call
//! (accepts, declines, lost endpoints, forwards, the caller cancelling, the toast timeout) and
//! declares exactly one outcome. Being an actor is the whole answer to the seed's warning about
//! a lock around AutoAcceptNeeded: every decision is one message handled at a time.

use actix::prelude::*;
use confab_protocol::sdp::Negotiated;
use confab_protocol::{Reason, Remote, Toast};
use std::sync::Arc;
use std::sync::atomic::AtomicU32;
use std::time::Duration;

use crate::call::leg::{CallLeg, LegInit, LegMsg};
use crate::call::offer::CallOffer;
use crate::context::Ctx;
use crate::endpoint::{EndpointMsg, ForkOffer, RemoteFork};
use crate::fork::{Action, ForkDecision, ForkState, Timers};
use crate::link::EndpointElsewhere;
use crate::metrics as m;
use crate::presence::RankEndpoints;
use crate::route::{EndpointRef, EventSink, LegOwner};

/// What a call is and where its outcome goes.
pub struct ForkTarget {
    pub ctx: Ctx,
    /// The leg that placed the call: the caller's, or a transferee's.
    pub caller: Addr<CallLeg>,
    /// The calling user and endpoint (that endpoint is never forked to).
    pub from: Remote,
    /// Normalised URI of the user called.
    pub to: String,
    pub offer: CallOffer,
    pub toast: Option<Toast>,
    pub counter: Arc<AtomicU32>,
}

#[derive(Message)]
#[rtype(result = "()")]
pub enum ArbiterMsg {
    /// An endpoint created its leg for a fork.
    ForkReady {
        call: String,
        leg: Addr<CallLeg>,
    },
    /// Cluster: the endpoint on another node adopted the leg this arbiter created for it.
    ForkAdopted {
        call: String,
    },
    /// A fork could not be offered or its endpoint went away.
    ForkLost {
        call: String,
    },
    AcceptRequest {
        call: String,
        sdp: String,
        negotiated: Negotiated,
    },
    Declined {
        call: String,
        /// The fork's own reason (its code is the decline's) (503 "Server shutting down" when its endpoint's node stops):
        /// the caller gets it when this decline is the final answer.
        reason: Reason,
    },
    ForwardRequest {
        call: String,
        to: String,
    },
    /// The caller terminated (or was lost) while the forks rang; `reason` is what the forks see
    /// (487 for a cancel, 408 for a lost caller, 503 on shutdown).
    CallerCancel {
        reason: Reason,
    },
}

/// A fork's leg as the arbiter holds it: the decision ([`ForkDecision`]) knows where each fork
/// stands; this knows where to send what it decides.
struct ForkLeg {
    call: String,
    leg: Option<Addr<CallLeg>>,
    /// Cluster: the leg this arbiter created for an endpoint on another node, until adopted.
    created: Option<Addr<CallLeg>>,
    /// Set when the call was decided before this fork's leg existed.
    cancel_when_ready: Option<(Reason, bool)>,
}

pub struct ForkArbiter {
    t: ForkTarget,
    decision: ForkDecision,
    legs: Vec<ForkLeg>,
    timer: Option<SpawnHandle>,
    /// Cluster: this arbiter's id in the node's registry, once it forked to another node.
    registered: Option<String>,
}

impl ForkArbiter {
    pub fn new(t: ForkTarget) -> Self {
        // The fork settings as they are when the call comes: a reload applies to new calls.
        let timers = Timers::from(&t.ctx.live().fork);
        ForkArbiter {
            t,
            decision: ForkDecision::new(timers),
            legs: Vec::new(),
            timer: None,
            registered: None,
        }
    }

    /// Offers the call to every endpoint of `self.t.to` except the calling one.
    fn fork(&mut self, ctx: &mut Context<Self>) {
        let entries: Vec<_> = self
            .t
            .ctx
            .directory
            .endpoints_of(&self.t.to)
            .into_iter()
            .filter(|e| *e.id != *self.t.from.endpoint)
            .collect();
        let actions = self
            .decision
            .offer(entries.iter().map(|e| e.id.to_string()));
        let mut entries = entries.into_iter();
        for action in &actions {
            let Action::Offer { fork, immediate } = *action else {
                continue;
            };
            let Some(entry) = entries.next() else { break };
            // The decision's forks and `self.legs` share their indices.
            debug_assert_eq!(fork, self.legs.len());
            let call = self.t.ctx.ids.mint('c');
            let created = match &entry.addr {
                EndpointRef::Local(addr) => {
                    addr.do_send(EndpointMsg::Fork(ForkOffer::new(
                        ctx.address(),
                        call.clone(),
                        self.t.ctx.ids.mint('v'),
                        self.t.from.user.clone(),
                        self.t.offer.clone(),
                        self.t.toast.clone(),
                        immediate,
                        self.t.counter.clone(),
                    )));
                    None
                }
                EndpointRef::Remote { node, id } => {
                    self.fork_remote(ctx, &call, node, id, &entry.user, immediate)
                }
            };
            self.legs.push(ForkLeg {
                call,
                leg: None,
                created,
                cancel_when_ready: None,
            });
        }
        self.carry_out(actions, None, ctx);
        self.maybe_stop(ctx);
    }

    /// Cluster: the call stays on this node, so the fork's leg is created here, with its events
    /// going to the endpoint's node; that endpoint adopts it (`ForkAdopted`) or is gone
    /// (`ForkLost`).
    fn fork_remote(
        &mut self,
        ctx: &mut Context<Self>,
        call: &str,
        node: &str,
        endpoint: &str,
        user: &str,
        immediate: bool,
    ) -> Option<Addr<CallLeg>> {
        let link = self.t.ctx.link.clone()?;
        let me = match &self.registered {
            Some(id) => id.clone(),
            None => {
                let id = self.t.ctx.ids.mint('a');
                link.register_arbiter(&id, ctx.address());
                self.registered = Some(id.clone());
                id
            }
        };
        let conversation = self.t.ctx.ids.mint('v');
        let fork = RemoteFork {
            leg_node: link.node_id().to_owned(),
            arbiter: me,
            call: call.to_owned(),
            conversation: conversation.clone(),
            from: self.t.from.user.clone(),
            offer: self.t.offer.sdp().to_owned(),
            toast: self.t.toast.clone(),
            immediate,
            leg_epoch: Some(link.epoch()),
        };
        // A caller's calls drive these, so they share the bound on what waits for other nodes.
        // Its place is taken before the leg exists: a fork that cannot be offered is lost, as
        // if the endpoint had gone, and no leg is left to report an end nobody heard of.
        let Some(adopt) = link.reserve_fork(node, endpoint, fork) else {
            ctx.address().do_send(ArbiterMsg::ForkLost {
                call: call.to_owned(),
            });
            return None;
        };
        let leg = CallLeg::new(LegInit {
            ctx: self.t.ctx.clone(),
            id: call.to_owned(),
            conversation,
            direction: confab_protocol::Direction::Inbound,
            outbox: EventSink::Remote {
                link: link.clone(),
                to: EndpointElsewhere {
                    node: node.to_owned(),
                    endpoint: endpoint.to_owned(),
                },
                call: call.to_owned(),
                numbered: Default::default(),
            },
            endpoint: LegOwner::Remote {
                link: link.clone(),
                to: EndpointElsewhere {
                    node: node.to_owned(),
                    endpoint: endpoint.to_owned(),
                },
            },
            local: Remote {
                user: user.to_owned(),
                endpoint: endpoint.to_owned(),
            },
            offer: self.t.offer.clone(),
            toast: self.t.toast.clone(),
            to: String::new(),
            arbiter: Some(ctx.address()),
            counter: self.t.counter.clone(),
        })
        .start();
        // Registered before the endpoint can hear of it (the leg's `started` may run later), so
        // the endpoint's first request finds it.
        link.register_leg(call, node, leg.clone());
        adopt.send();
        // The link may lose the `ForkAdopted` (core NATS delivers at most once). A fork heard of neither way
        // within twice the node timeout (an envelope that late means the nodes are losing each
        // other anyway) counts as adopted: its leg then rings and is cancelled like any other,
        // so the device's toast is taken down when the call is decided, instead of ringing for
        // good. (Had the `Adopt` itself been lost, the device never rang and the leg's events
        // find no call there.)
        let call = call.to_owned();
        ctx.run_later(2 * link.node_timeout(), move |act, ctx| {
            if act.leg_mut(&call).is_some_and(|f| f.created.is_some()) {
                tracing::info!(%call, "no word of a fork's adoption from its node; counting it adopted");
                Handler::handle(act, ArbiterMsg::ForkAdopted { call }, ctx);
            }
        });
        Some(leg)
    }

    fn set_timer(&mut self, ctx: &mut Context<Self>, after: Duration) {
        if let Some(h) = self.timer.take() {
            ctx.cancel_future(h);
        }
        self.timer = Some(ctx.run_later(after, move |act, ctx| {
            act.timer = None;
            let actions = act.decision.timer();
            act.carry_out(actions, None, ctx);
            act.maybe_stop(ctx);
        }));
    }

    /// The index of the fork whose leg is `call` (the decision's name for it).
    fn fork_of(&self, call: &str) -> Option<usize> {
        self.legs.iter().position(|f| f.call == call)
    }

    fn leg_mut(&mut self, call: &str) -> Option<&mut ForkLeg> {
        self.legs.iter_mut().find(|f| f.call == call)
    }

    fn leg_of(&self, fork: usize) -> Option<Addr<CallLeg>> {
        self.legs.get(fork).and_then(|f| f.leg.clone())
    }

    /// Carries out the decision's answer, in order. `answer` is the winning accept's SDP, for
    /// a `Connect`.
    fn carry_out(
        &mut self,
        actions: Vec<Action>,
        mut answer: Option<(String, Negotiated)>,
        ctx: &mut Context<Self>,
    ) {
        let mut actions = actions;
        for action in actions.drain(..) {
            match action {
                // Only a new round offers, and `fork` has made those.
                Action::Offer { .. } => {}
                Action::Ringing => self.t.caller.do_send(LegMsg::Ringing),
                Action::StartTimer(after) => self.set_timer(ctx, after),
                Action::Rank { round } => self.rank(round, ctx),
                Action::AskToAccept { fork } => {
                    if let Some(leg) = self.leg_of(fork) {
                        leg.do_send(LegMsg::AutoAcceptNeeded);
                    }
                }
                Action::Connect { fork } => {
                    let (Some(leg), Some(endpoint), Some((sdp, negotiated))) = (
                        self.leg_of(fork),
                        self.decision.endpoint(fork).map(str::to_owned),
                        answer.take(),
                    ) else {
                        continue;
                    };
                    // The winner first: a message the caller sends once established must find
                    // the winner's leg established too.
                    leg.do_send(LegMsg::Won {
                        peer: self.t.caller.clone(),
                        remote: self.t.from.clone(),
                    });
                    self.t.caller.do_send(LegMsg::Answered {
                        peer: leg,
                        remote: Remote {
                            user: self.t.to.clone(),
                            endpoint,
                        },
                        sdp,
                        negotiated,
                    });
                }
                Action::RefuseAccept { fork } => {
                    if let Some(leg) = self.leg_of(fork) {
                        leg.do_send(LegMsg::AcceptRefused);
                    }
                }
                Action::Cancel {
                    fork,
                    reason,
                    elsewhere,
                } => self.cancel(fork, reason, elsewhere),
                Action::FailCaller(reason) => self.t.caller.do_send(LegMsg::Failed { reason }),
                Action::Forward { to } => {
                    self.t.caller.do_send(LegMsg::Forwarded { to: to.clone() });
                    self.t.to = to;
                    self.fork(ctx);
                }
                Action::Decided(cause) => m::hot().decided(cause),
            }
        }
        self.decision.recycle(actions);
    }

    /// Ends a fork's leg, or keeps the cancel for when its leg is ready.
    fn cancel(&mut self, fork: usize, reason: Reason, elsewhere: bool) {
        let Some(f) = self.legs.get_mut(fork) else {
            return;
        };
        // Cluster: a leg made here for an endpoint on another node whose adoption has not been
        // heard of (its `ForkAdopted` may have been lost on the way) is cancelled now, not when
        // it counts as adopted (2 x node_timeout): had the endpoint adopted it, its device's
        // toast comes down at once; had it not, the leg's events find no call there, and its
        // end is released all the same (the link's `release_leg`).
        if f.leg.is_none() {
            f.leg = f.created.take();
        }
        match &f.leg {
            Some(leg) => leg.do_send(LegMsg::Cancel { reason, elsewhere }),
            None => f.cancel_when_ready = Some((reason, elsewhere)),
        }
    }

    /// Rule 5's ranking, of the user the call rings now, fed back to the decision.
    fn rank(&mut self, round: u32, ctx: &mut Context<Self>) {
        let shard = self.t.ctx.presence.for_user(&self.t.to).clone();
        let user = self.t.to.clone();
        ctx.spawn(
            async move { shard.send(RankEndpoints { user }).await.unwrap_or_default() }
                .into_actor(self)
                .map(move |ranking, act, ctx| {
                    let actions = act.decision.ranked(ranking, round);
                    act.carry_out(actions, None, ctx);
                    act.maybe_stop(ctx);
                }),
        );
    }

    /// Stops once decided and every offered fork has reported (so none rings forever).
    fn maybe_stop(&mut self, ctx: &mut Context<Self>) {
        if self.decision.decided().is_some()
            && self.legs.iter().enumerate().all(|(fork, f)| {
                f.leg.is_some()
                    || f.cancel_when_ready.is_none()
                        && self.decision.state(fork) != Some(&ForkState::Offered)
            })
        {
            ctx.stop();
        }
    }
}

impl Actor for ForkArbiter {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        m::hot().arbiters.increment(1.0);
        self.fork(ctx);
    }

    fn stopped(&mut self, _: &mut Context<Self>) {
        m::hot().arbiters.decrement(1.0);
        if let (Some(id), Some(link)) = (&self.registered, &self.t.ctx.link) {
            link.forget_arbiter(id);
        }
    }
}

impl Handler<ArbiterMsg> for ForkArbiter {
    type Result = ();

    fn handle(&mut self, msg: ArbiterMsg, ctx: &mut Context<Self>) {
        match msg {
            ArbiterMsg::ForkReady { call, leg } => {
                let Some(f) = self.leg_mut(&call) else {
                    return;
                };
                f.leg = Some(leg.clone());
                if let Some((reason, elsewhere)) = f.cancel_when_ready.take() {
                    leg.do_send(LegMsg::Cancel { reason, elsewhere });
                }
                if let Some(fork) = self.fork_of(&call) {
                    self.decision.ready(fork);
                }
            }
            ArbiterMsg::ForkAdopted { call } => {
                let leg = self.leg_mut(&call).and_then(|f| f.created.take());
                if let Some(leg) = leg {
                    Handler::handle(self, ArbiterMsg::ForkReady { call, leg }, ctx);
                }
            }
            ArbiterMsg::ForkLost { call } => {
                let Some(f) = self.leg_mut(&call) else {
                    return;
                };
                // Nobody adopted the leg made for this fork: whether it was still waiting for
                // word of its adoption (`created`), or had been counted adopted for want of that
                // word (2 x node_timeout) and the refusal came later still.
                if let Some(leg) = f.created.take().or_else(|| f.leg.clone()) {
                    leg.do_send(LegMsg::EndpointLost);
                }
                f.cancel_when_ready = None;
                if let Some(fork) = self.fork_of(&call) {
                    let actions = self.decision.lost(fork);
                    self.carry_out(actions, None, ctx);
                }
            }
            ArbiterMsg::AcceptRequest {
                call,
                sdp,
                negotiated,
            } => {
                // Cluster: an accept comes from the fork's own leg, so its endpoint has adopted
                // it even if the `ForkAdopted` envelope was lost on the way (core NATS delivers
                // at most once). Without this the accept would wait for an answer forever.
                if let Some(leg) = self.leg_mut(&call).and_then(|f| f.created.take()) {
                    Handler::handle(
                        self,
                        ArbiterMsg::ForkReady {
                            call: call.clone(),
                            leg,
                        },
                        ctx,
                    );
                }
                let Some(fork) = self.fork_of(&call).filter(|&f| self.leg_of(f).is_some()) else {
                    return;
                };
                let actions = self.decision.accept(fork);
                self.carry_out(actions, Some((sdp, negotiated)), ctx);
            }
            ArbiterMsg::Declined { call, reason } => {
                if let Some(fork) = self.fork_of(&call) {
                    let actions = self.decision.decline(fork, reason);
                    self.carry_out(actions, None, ctx);
                }
            }
            ArbiterMsg::ForwardRequest { call, to } => {
                if let Some(fork) = self.fork_of(&call) {
                    let actions = self.decision.forward(fork, &to);
                    self.carry_out(actions, None, ctx);
                }
            }
            ArbiterMsg::CallerCancel { reason } => {
                let actions = self.decision.caller_cancelled(reason);
                self.carry_out(actions, None, ctx);
            }
        }
        self.maybe_stop(ctx);
    }
}
