//! The endpoint actor: one signed-in device of one user. It reads the client's frames (after
//! the session's handshake), answers what concerns the endpoint itself (ping, bye, presence),
//! creates call legs and conversations, and hands each call request to the leg it names. It
//! owns the identity: a request can only reach calls and conversations this endpoint holds.
//!
//! This file holds the actor's state, its start and stop, and the messages other actors send
//! it. Its jobs are one file each: `frames.rs` reads the client's frames and dispatches them,
//! `calls.rs` its calls (placing, forks offered, requests to legs, ends), `flow.rs` messages
//! and composing, `presence.rs` device state, status and subscriptions, `lifecycle.rs` its
//! ending (`bye`, lost, shutdown, over the limit), and `remote.rs` what it keeps for calls
//! whose legs live on another node. What each refusal answers is `refusal.rs`'s.

use actix::prelude::*;
use confab_protocol::{Reason, Remote, ServerMsg};
use std::collections::HashSet;
use tokio::time::Instant;

use crate::call::leg::{LegMsg, TerminateCause};
use crate::context::Ctx;
use crate::metrics as m;
use crate::outbox::Outbox;
use crate::presence::PresenceMsg;
use crate::ratelimit::{Rate, TokenBucket};
use crate::refusal::Refusal;

mod book;
mod calls;
mod flow;
mod frames;
mod lifecycle;
mod presence;
mod remote;
mod resume;
use book::LazyBook;
pub use calls::ForkOffer;
pub use frames::{Frames, TaggedFrames, tagged};
pub use remote::{RemoteFork, RemoteForkGuard};
pub use resume::{Attach, ExpiredSessions, Resume, ResumeState, grant, new_token};

#[derive(Message)]
#[rtype(result = "()")]
pub enum EndpointMsg {
    Fork(ForkOffer),
    /// Cluster: adopt a fork whose leg lives on another node.
    Adopt(RemoteFork, RemoteForkGuard),
    /// Cluster: an event of a leg on another node, for this endpoint's client; `call` names
    /// the leg's call when the event answers a call request.
    RemoteEvent {
        msg: ServerMsg,
        call: Option<String>,
        /// A state event's number within its leg's (`cluster/src/events.rs`).
        seq: Option<u64>,
    },
    /// Cluster: a `message_received` of a leg on another node, as that node encoded it (the
    /// frame's body): passed on to the client byte for byte, as [`EndpointMsg::RemoteEvent`]
    /// would pass on the decoded message.
    RemoteFrame {
        call: String,
        frame: bytes::Bytes,
    },
    /// Cluster: run `.1` of node `.0` died, with every earlier run (`None`: this node was cut
    /// off from every other); calls whose legs lived there end.
    NodeLost {
        node: Option<(String, u64)>,
    },
    LegEnded {
        call: String,
        conversation: String,
        elsewhere: bool,
        /// Cluster: why a leg on another node ended (see [`Endpoint::end_mirrored_call`]).
        reason: Option<Reason>,
    },
    /// The node is shutting down: tell the client (sent to every endpoint before any call
    /// ends, so each client hears `shutdown` before its calls' events).
    ShutdownNotice,
    /// The node is shutting down: end every call, then close.
    Shutdown,
    /// Cluster: the user has more than `endpoints_per_user` endpoints across the nodes (two
    /// sign-ins raced on two nodes) and this one ranks beyond the limit: tell the client, end
    /// its calls as `bye` would, then close.
    OverLimit,
    /// An operator ended the session (admin API): tell the client `reason`, end its calls as
    /// `bye` would, then close.
    Kick {
        reason: String,
    },
    /// The node is draining (admin API): tell the client to reconnect elsewhere; its calls go
    /// on until it leaves or the drain's deadline.
    DrainNotice {
        reason: String,
    },
    /// Cluster: the client's frames, from the node a resumed session is relayed through
    /// (`relay.rs`): batch `seq` of relay `relay` of node `from`.
    Relayed {
        from: String,
        relay: u64,
        seq: u64,
        frames: Vec<bytes::Bytes>,
    },
    /// Cluster: that relayed connection ended.
    RelayEnded {
        from: String,
        relay: u64,
    },
}

/// What the admin API lists of an endpoint's session.
#[derive(Message)]
#[rtype(result = "Described")]
pub struct Describe;

/// An endpoint's answer to [`Describe`].
pub struct Described {
    pub remote_addr: std::net::SocketAddr,
    pub since_unix_ms: u64,
    /// Calls it holds now.
    pub calls: usize,
    /// Signing out, lost or shutting down.
    pub ending: bool,
    /// Its connection is gone and the session is held for a resume.
    pub held: bool,
}

/// What a finished call id still answers to, so a late request gets the right error.
pub(super) const REMEMBERED_ENDED_CALLS: usize = 64;

pub struct Endpoint {
    ctx: Ctx,
    /// Shared with the directory and presence (see `EndpointEntry::id`).
    id: std::sync::Arc<str>,
    /// Shared with the directory and presence (see `EndpointEntry::user`).
    user: std::sync::Arc<str>,
    outbox: Outbox,
    /// Its calls and conversations (`book.rs`), made on its first call.
    book: LazyBook,
    /// Ending cleanly and waiting for remote legs to report their end.
    closing: bool,
    /// The users whose presence it watches. Boxed and made on the first `subscribe`: most
    /// endpoints watch nobody, and inline the set's 48 bytes put every endpoint's task into
    /// the allocator's next size class (128 bytes more per idle endpoint).
    #[allow(
        clippy::box_collection,
        reason = "the box keeps the set's header out of the endpoint's task"
    )]
    subscriptions: Option<Box<HashSet<String>>>,
    last_rx: Instant,
    /// Whether, and why, the endpoint is ending (then nothing more is read or started).
    end_state: EndState,
    /// Cluster: a sweep of `remote_calls`' unanswered messages is scheduled.
    answer_sweep_armed: bool,
    /// Cluster: an `EventsSeen` for the state events passed on is scheduled.
    events_seen_armed: bool,
    bucket: TokenBucket,
    /// `limits.presence_updates_per_second`: presence changes fan out to every watcher.
    presence_bucket: TokenBucket,
    /// The client's address (after a trusted PROXY header) and when it signed in, for the
    /// admin API's session list. Boxed: read only by an operator, while inline these 40 bytes
    /// moved every endpoint's task into the allocator's next size class (~200 B more per idle
    /// endpoint, BENCHMARKS.md).
    session: Box<(std::net::SocketAddr, u64)>,
    /// A resumable session's state (`resume.rs`). Boxed: most sessions are not resumable.
    resume: Option<Box<ResumeState>>,
    /// Its place in the node's heartbeat sweep (`heartbeat.rs`), once started.
    heartbeat_slot: u32,
}

/// Whether, and why, an endpoint is ending.
#[derive(Clone, Copy, PartialEq, Eq)]
enum EndState {
    Running,
    /// `bye`, a lost connection, or over `endpoints_per_user`.
    Ending,
    /// The node shuts down: a fork offered now is declined with 503 "Server shutting down"
    /// (as a ringing one is), not lost as for an endpoint that has gone.
    ShuttingDown,
}

/// `limits.requests_per_second` and `request_burst`.
fn request_rate(ctx: &Ctx) -> Rate {
    let live = ctx.live();
    Rate::new(live.limits.requests_per_second, live.limits.request_burst)
}

/// `limits.presence_updates_per_second` and `presence_update_burst`.
fn presence_rate(ctx: &Ctx) -> Rate {
    let live = ctx.live();
    Rate::new(
        live.limits.presence_updates_per_second,
        live.limits.presence_update_burst,
    )
}

impl Endpoint {
    pub fn new(
        ctx: Ctx,
        id: std::sync::Arc<str>,
        user: std::sync::Arc<str>,
        outbox: Outbox,
        peer: std::net::SocketAddr,
    ) -> Self {
        let now = Instant::now();
        let bucket = TokenBucket::full(request_rate(&ctx), now);
        let presence_bucket = TokenBucket::full(presence_rate(&ctx), now);
        Endpoint {
            ctx,
            id,
            user,
            outbox,
            book: LazyBook::default(),
            closing: false,
            subscriptions: None,
            last_rx: Instant::now(),
            end_state: EndState::Running,
            answer_sweep_armed: false,
            events_seen_armed: false,
            bucket,
            presence_bucket,
            session: Box::new((peer, crate::presence::stamp::unix_ms())),
            resume: None,
            heartbeat_slot: u32::MAX,
        }
    }

    fn push(&self, msg: ServerMsg) {
        self.outbox.push(msg);
    }

    /// Set once the endpoint is ending: nothing more is read or started.
    fn ending(&self) -> bool {
        self.end_state != EndState::Running
    }

    /// Answers the request `rid` with the error its refusal gets.
    fn refuse(&self, rid: Option<u32>, why: Refusal) {
        self.push(why.reply(rid));
    }

    fn local(&self) -> Remote {
        Remote {
            user: self.user.to_string(),
            endpoint: self.id.to_string(),
        }
    }
}

impl Actor for Endpoint {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        // Enough room for a burst of events without blocking the actor on its own mailbox.
        ctx.set_mailbox_capacity(256);
        m::hot().endpoints.increment(1.0);
        // The node's sweep sends `HeartbeatDue` every heartbeat (a timer of the endpoint's own
        // would cost each idle endpoint about 150 bytes).
        let me = ctx.address().downgrade();
        self.heartbeat_slot = self.ctx.heartbeats.join(me.clone());
        // A slow consumer (or a failed write) closes the outbox: the endpoint ends with it.
        self.outbox.tell_on_close(me);
        self.watch_writer(ctx);
    }

    fn stopped(&mut self, _: &mut Context<Self>) {
        m::hot().endpoints.decrement(1.0);
        self.ctx.heartbeats.leave(self.heartbeat_slot);
        self.end_hold();
        for (leg, _) in self.book.calls.values() {
            leg.do_send(LegMsg::EndpointLost);
        }
        for user in self.subscriptions.take().into_iter().flat_map(|s| *s) {
            self.ctx.presence.send(PresenceMsg::Unsubscribe {
                user,
                subscriber: self.id.to_string(),
            });
        }
        self.ctx.directory.unregister(&self.user, &self.id);
        self.ctx.presence.send(PresenceMsg::Left {
            user: self.user.to_string(),
            endpoint: self.id.to_string(),
        });
        self.outbox.close();
    }
}

impl Handler<EndpointMsg> for Endpoint {
    type Result = ();

    fn handle(&mut self, msg: EndpointMsg, ctx: &mut Context<Self>) {
        match msg {
            EndpointMsg::Fork(offer) => self.adopt_fork(offer, ctx),
            EndpointMsg::Adopt(fork, mut guard) => {
                // From here the fork is answered: adopted, or refused with its own ForkLost.
                guard.disarm();
                self.adopt_remote(fork);
            }
            EndpointMsg::RemoteEvent { msg, call, seq } => self.remote_event(msg, call, seq, ctx),
            EndpointMsg::RemoteFrame { call, frame } => self.remote_frame(&call, frame),
            EndpointMsg::NodeLost { node } => {
                let lost = node.as_ref().map(|(n, _)| n.as_str());
                self.relay_ended(lost, None, ctx);
                self.node_lost(node.as_ref().map(|(n, e)| (n.as_str(), *e)), ctx)
            }
            EndpointMsg::Relayed {
                from,
                relay,
                seq,
                frames,
            } => self.relayed(&from, relay, seq, frames, ctx),
            EndpointMsg::RelayEnded { from, relay } => {
                self.relay_ended(Some(&from), Some(relay), ctx)
            }
            EndpointMsg::LegEnded {
                call,
                conversation,
                elsewhere,
                reason,
            } => {
                if let Some(reason) = reason {
                    self.end_mirrored_call(&call, reason);
                }
                self.leg_ended(call, conversation, elsewhere, ctx)
            }
            EndpointMsg::ShutdownNotice => self.shutdown_notice(),
            EndpointMsg::Shutdown => self.end_cleanly(ctx, TerminateCause::Shutdown),
            EndpointMsg::OverLimit => self.over_limit(ctx),
            EndpointMsg::Kick { reason } => self.kicked(reason, ctx),
            EndpointMsg::DrainNotice { reason } => self.push(ServerMsg::Shutdown {
                reason,
                reconnect_after_ms: self.ctx.settings.server.reconnect_after_ms,
            }),
        }
    }
}

/// The endpoint's outbox closed (`Outbox::tell_on_close`): a slow consumer, a failed write, or
/// the endpoint's own close. A message from whoever closes it rather than a future the
/// endpoint keeps waiting on the close: that future cost every endpoint 88 bytes.
#[derive(Message)]
#[rtype(result = "()")]
pub struct OutboxClosed;

impl Handler<OutboxClosed> for Endpoint {
    type Result = ();

    fn handle(&mut self, _: OutboxClosed, ctx: &mut Context<Self>) {
        if !self.ending() {
            self.lost(ctx);
        }
    }
}

/// A heartbeat has passed (the node's sweep, `heartbeat.rs`): drop a client silent for three.
#[derive(Message)]
#[rtype(result = "()")]
pub struct HeartbeatDue;

impl Handler<HeartbeatDue> for Endpoint {
    type Result = ();

    fn handle(&mut self, _: HeartbeatDue, ctx: &mut Context<Self>) {
        // An ending endpoint has its own deadline; dropping it as lost would drop the final
        // events of its calls on other nodes. A held one has its resume window.
        let hb = self.ctx.settings.heartbeat();
        if !self.ending() && !self.held() && self.last_rx.elapsed() > hb * 3 {
            tracing::info!(endpoint = %self.id, "no frame for 3 heartbeats; dropping the connection");
            m::limit_tripped("heartbeat_timeout");
            self.connection_lost("no heartbeat", ctx);
        }
    }
}

impl Handler<Describe> for Endpoint {
    type Result = MessageResult<Describe>;

    fn handle(&mut self, _: Describe, _: &mut Context<Self>) -> Self::Result {
        MessageResult(Described {
            remote_addr: self.session.0,
            since_unix_ms: self.session.1,
            calls: self.book.calls.len(),
            ending: self.ending(),
            held: self.held(),
        })
    }
}
