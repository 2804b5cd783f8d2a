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
use crate::ids::IdSet;
use crate::link::EndpointElsewhere;
use crate::metrics as m;
use crate::presence::RankEndpoints;
use crate::reasons;
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
        code: u16,
        /// The fork's own reason (503 "Server shutting down" when its endpoint's node stops):
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

#[derive(PartialEq, Eq)]
enum ForkState {
    /// Offered; the endpoint has not created its leg yet.
    Offered,
    Ringing,
    /// Gone with a final code (a decline's, or 480 for a lost fork).
    Gone(u16),
}

struct Fork {
    endpoint: String,
    call: String,
    leg: Option<Addr<CallLeg>>,
    /// Cluster: the leg this arbiter created for an endpoint on another node, until adopted.
    created: Option<Addr<CallLeg>>,
    state: ForkState,
    /// Set when the call was decided before this fork's leg existed.
    cancel_when_ready: Option<(Reason, bool)>,
    /// Why it declined, when it did.
    declined: Option<Reason>,
    /// The target this fork rang (the arbiter's `hops` when it was offered): after a forward,
    /// the old target's forks no longer count towards the caller's final answer.
    generation: u32,
}

pub struct ForkArbiter {
    t: ForkTarget,
    forks: Vec<Fork>,
    immediate: bool,
    decided: bool,
    hops: u32,
    timer: Option<SpawnHandle>,
    auto_phase: bool,
    tried: IdSet<String>,
    ranking: Vec<String>,
    auto_current: Option<String>,
    /// Cluster: this arbiter's id in the node's registry, once it forked to another node.
    registered: Option<String>,
    /// The fork settings as they were when the call came: a reload applies to new calls only.
    settings: crate::settings::Fork,
}

impl ForkArbiter {
    pub fn new(t: ForkTarget) -> Self {
        let settings = t.ctx.live().fork.clone();
        ForkArbiter {
            settings,
            t,
            forks: Vec::new(),
            immediate: false,
            decided: false,
            hops: 0,
            timer: None,
            auto_phase: false,
            tried: IdSet::default(),
            ranking: Vec::new(),
            auto_current: None,
            registered: None,
        }
    }

    fn settings(&self) -> &crate::settings::Fork {
        &self.settings
    }

    /// Offers the call to every endpoint of `self.t.to` except the calling one.
    fn fork(&mut self, ctx: &mut Context<Self>) {
        let entries: Vec<_> = self
            .t
            .ctx
            .directory
            .endpoints_of(&self.t.to)
            .into_iter()
            .filter(|e| e.id != self.t.from.endpoint)
            .collect();
        if entries.is_empty() {
            self.decide("no_endpoints");
            self.t.caller.do_send(LegMsg::Failed {
                reason: reasons::temporarily_unavailable(),
            });
            self.maybe_stop(ctx);
            return;
        }
        self.immediate = entries.len() == 1;
        for entry in entries {
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
                        self.immediate,
                        self.t.counter.clone(),
                    )));
                    None
                }
                EndpointRef::Remote { node, id } => {
                    self.fork_remote(ctx, &call, node, id, &entry.user)
                }
            };
            self.forks.push(Fork {
                endpoint: entry.id.clone(),
                call,
                leg: None,
                created,
                state: ForkState::Offered,
                cancel_when_ready: None,
                declined: None,
                generation: self.hops,
            });
        }
        self.t.caller.do_send(LegMsg::Ringing);
        let toast = Duration::from_millis(self.settings().toast_timeout_ms);
        let grace = Duration::from_millis(self.settings().auto_accept_grace_ms);
        self.set_timer(
            ctx,
            if self.immediate { toast + grace } else { toast },
            |act, ctx| {
                if act.immediate {
                    act.give_up(ctx);
                } else {
                    act.start_auto_accept(ctx);
                }
            },
        );
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
            immediate: self.immediate,
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
            if act.fork_mut(&call).is_some_and(|f| f.created.is_some()) {
                tracing::info!(%call, "no word of a fork's adoption from its node; counting it adopted");
                Handler::handle(act, ArbiterMsg::ForkAdopted { call }, ctx);
            }
        });
        Some(leg)
    }

    fn set_timer(
        &mut self,
        ctx: &mut Context<Self>,
        after: Duration,
        f: impl FnOnce(&mut Self, &mut Context<Self>) + 'static,
    ) {
        if let Some(h) = self.timer.take() {
            ctx.cancel_future(h);
        }
        self.timer = Some(ctx.run_later(after, move |act, ctx| {
            act.timer = None;
            if !act.decided {
                f(act, ctx);
            }
        }));
    }

    fn decide(&mut self, cause: &'static str) {
        self.decided = true;
        metrics::counter!(m::FORK_DECISIONS, "cause" => cause).increment(1);
    }

    fn fork_mut(&mut self, call: &str) -> Option<&mut Fork> {
        self.forks.iter_mut().find(|f| f.call == call)
    }

    /// Ends every fork still alive with `reason`.
    fn cancel_others(&mut self, except: Option<&str>, reason: Reason, elsewhere: bool) {
        for f in &mut self.forks {
            if Some(f.call.as_str()) == except || matches!(f.state, ForkState::Gone(_)) {
                continue;
            }
            // Cluster: a leg made here for an endpoint on another node whose adoption has not
            // been heard of (its `ForkAdopted` may have been lost on the way) is cancelled now,
            // not when it counts as adopted (2 x node_timeout): had the endpoint adopted it,
            // its device's toast comes down at once; had it not, the leg's events find no call
            // there, and its end is released all the same (`Cluster::release_leg`).
            if f.leg.is_none() {
                f.leg = f.created.take();
            }
            match &f.leg {
                Some(leg) => leg.do_send(LegMsg::Cancel {
                    reason: reason.clone(),
                    elsewhere,
                }),
                None => f.cancel_when_ready = Some((reason.clone(), elsewhere)),
            }
            f.state = ForkState::Gone(reason.code);
        }
    }

    /// Stops once decided and every offered fork has reported (so none rings forever).
    fn maybe_stop(&mut self, ctx: &mut Context<Self>) {
        if self.decided
            && self.forks.iter().all(|f| {
                f.leg.is_some() || f.cancel_when_ready.is_none() && f.state != ForkState::Offered
            })
        {
            ctx.stop();
        }
    }

    /// No accept and nobody left to ask: 480 to the caller and to every fork.
    fn give_up(&mut self, ctx: &mut Context<Self>) {
        self.decide("unanswered");
        self.cancel_others(None, reasons::temporarily_unavailable(), false);
        self.t.caller.do_send(LegMsg::Failed {
            reason: reasons::temporarily_unavailable(),
        });
        self.maybe_stop(ctx);
    }

    /// After a fork left: when none is left, the caller gets the best final answer.
    fn after_fork_gone(&mut self, call: &str, ctx: &mut Context<Self>) {
        let current = self.hops;
        if self
            .forks
            .iter()
            .filter(|f| f.generation == current)
            .all(|f| matches!(f.state, ForkState::Gone(_)))
        {
            let codes: Vec<u16> = self
                .forks
                .iter()
                .filter(|f| f.generation == current)
                .filter_map(|f| match f.state {
                    ForkState::Gone(c) => Some(c),
                    _ => None,
                })
                .collect();
            // The best code, with the reason of a fork that declined with it (a shutdown's 503
            // says so), else the code's usual text.
            let best = reasons::best_final(&codes);
            let reason = self
                .forks
                .iter()
                .filter(|f| f.generation == current)
                .find_map(|f| f.declined.as_ref().filter(|r| r.code == best.code))
                .cloned()
                .unwrap_or(best);
            self.decide("declined");
            self.t.caller.do_send(LegMsg::Failed { reason });
            self.maybe_stop(ctx);
            return;
        }
        let was_current = self
            .forks
            .iter()
            .any(|f| f.call == call && self.auto_current.as_deref() == Some(f.endpoint.as_str()));
        if self.auto_phase && was_current {
            self.auto_accept_next(ctx);
        }
    }

    fn start_auto_accept(&mut self, ctx: &mut Context<Self>) {
        self.auto_phase = true;
        let shard = self.t.ctx.presence.for_user(&self.t.to).clone();
        let user = self.t.to.clone();
        // A forward handled while the ranking is on its way retargets the call and restarts
        // its toast timer: this ranking (of the old target) then no longer applies.
        let hops = self.hops;
        ctx.spawn(
            async move { shard.send(RankEndpoints { user }).await.unwrap_or_default() }
                .into_actor(self)
                .map(move |ranking, act, ctx| {
                    if act.decided || act.hops != hops || !act.auto_phase {
                        return;
                    }
                    act.ranking = ranking;
                    act.auto_accept_next(ctx);
                }),
        );
    }

    /// Sends `auto_accept_needed` to the most active endpoint not yet asked that still rings.
    fn auto_accept_next(&mut self, ctx: &mut Context<Self>) {
        let next = self.ranking.iter().find_map(|ep| {
            if self.tried.contains(ep) {
                return None;
            }
            self.forks
                .iter()
                .find(|f| &f.endpoint == ep && f.state == ForkState::Ringing)
                .and_then(|f| f.leg.clone().map(|leg| (ep.clone(), leg)))
        });
        let Some((endpoint, leg)) = next else {
            self.auto_current = None;
            return self.give_up(ctx);
        };
        self.tried.insert(endpoint.clone());
        self.auto_current = Some(endpoint);
        leg.do_send(LegMsg::AutoAcceptNeeded);
        let grace = Duration::from_millis(self.settings().auto_accept_grace_ms);
        self.set_timer(ctx, grace, |act, ctx| act.auto_accept_next(ctx));
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
                let Some(f) = self.fork_mut(&call) else {
                    return;
                };
                f.leg = Some(leg.clone());
                if let Some((reason, elsewhere)) = f.cancel_when_ready.take() {
                    leg.do_send(LegMsg::Cancel { reason, elsewhere });
                } else if f.state == ForkState::Offered {
                    f.state = ForkState::Ringing;
                }
                self.maybe_stop(ctx);
            }
            ArbiterMsg::ForkAdopted { call } => {
                let leg = self.fork_mut(&call).and_then(|f| f.created.take());
                if let Some(leg) = leg {
                    Handler::handle(self, ArbiterMsg::ForkReady { call, leg }, ctx);
                }
            }
            ArbiterMsg::ForkLost { call } => {
                let Some(f) = self.fork_mut(&call) else {
                    return;
                };
                // Nobody adopted the leg made for this fork: whether it was still waiting for
                // word of its adoption (`created`), or had been counted adopted for want of that
                // word (2 x node_timeout) and the refusal came later still.
                if let Some(leg) = f.created.take().or_else(|| f.leg.clone()) {
                    leg.do_send(LegMsg::EndpointLost);
                }
                f.cancel_when_ready = None;
                if matches!(f.state, ForkState::Gone(_)) {
                    // Already cancelled; it only had to report.
                    f.state = ForkState::Gone(480);
                    return self.maybe_stop(ctx);
                }
                f.state = ForkState::Gone(480);
                if !self.decided {
                    self.after_fork_gone(&call, ctx);
                }
                self.maybe_stop(ctx);
            }
            ArbiterMsg::AcceptRequest {
                call,
                sdp,
                negotiated,
            } => {
                // Cluster: an accept comes from the fork's own leg, so its endpoint has adopted
                // it even if the `ForkAdopted` envelope was lost on the way (core NATS delivers
                // at most once). Without this the accept would wait for an answer forever.
                if let Some(leg) = self.fork_mut(&call).and_then(|f| f.created.take()) {
                    Handler::handle(
                        self,
                        ArbiterMsg::ForkReady {
                            call: call.clone(),
                            leg,
                        },
                        ctx,
                    );
                }
                let Some(f) = self.forks.iter().find(|f| f.call == call) else {
                    return;
                };
                let Some(leg) = f.leg.clone() else { return };
                if self.decided || f.state != ForkState::Ringing {
                    leg.do_send(LegMsg::AcceptRefused);
                    return;
                }
                let endpoint = f.endpoint.clone();
                self.decide(if self.immediate {
                    "immediate"
                } else if self.auto_phase {
                    "timeout"
                } else {
                    "click"
                });
                if let Some(fm) = self.fork_mut(&call) {
                    fm.state = ForkState::Gone(200);
                }
                // The winner first: a message the caller sends once established must find the
                // winner's leg established too.
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
                self.cancel_others(Some(&call), reasons::completed_elsewhere(), true);
                self.maybe_stop(ctx);
            }
            ArbiterMsg::Declined { call, code, reason } => {
                let decided = self.decided;
                let Some(f) = self.fork_mut(&call) else {
                    return;
                };
                if matches!(f.state, ForkState::Gone(_)) || decided {
                    return;
                }
                f.state = ForkState::Gone(code);
                f.declined = Some(reason.clone());
                if code >= 600 {
                    self.decide("declined");
                    self.cancel_others(Some(&call), reasons::declined_elsewhere(), false);
                    self.t.caller.do_send(LegMsg::Failed { reason });
                    self.maybe_stop(ctx);
                } else {
                    self.after_fork_gone(&call, ctx);
                }
            }
            ArbiterMsg::ForwardRequest { call, to } => {
                let decided = self.decided;
                let Some(f) = self.fork_mut(&call) else {
                    return;
                };
                if matches!(f.state, ForkState::Gone(_)) || decided {
                    return;
                }
                f.state = ForkState::Gone(302);
                self.cancel_others(Some(&call), reasons::moved_temporarily(), false);
                self.hops += 1;
                if self.hops > self.settings().max_forwards {
                    self.decide("declined");
                    self.t.caller.do_send(LegMsg::Failed {
                        reason: reasons::too_many_hops(),
                    });
                    return self.maybe_stop(ctx);
                }
                self.t.caller.do_send(LegMsg::Forwarded { to: to.clone() });
                // Forks of the old target that are not ready yet keep their cancel; they still
                // report to this arbiter, which now rings the new target.
                self.forks
                    .retain(|f| f.state == ForkState::Offered || f.cancel_when_ready.is_some());
                self.t.to = to;
                self.auto_phase = false;
                self.tried.clear();
                self.auto_current = None;
                self.fork(ctx);
            }
            ArbiterMsg::CallerCancel { reason } => {
                if self.decided {
                    return;
                }
                self.decide("cancelled");
                self.cancel_others(None, reason, false);
                // The caller's leg waits for our last word before it goes away.
                self.t.caller.do_send(LegMsg::Failed {
                    reason: reasons::request_terminated(),
                });
                self.maybe_stop(ctx);
            }
        }
    }
}
