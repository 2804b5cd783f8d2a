//! The endpoint actor: one signed-in device of one user. It reads the client's frames (after
//! the session's handshake), answers what concerns the endpoint itself (ping, bye, presence),
//! creates call legs and conversations, and hands each call request to the leg it names. It
//! owns the identity: a request can only reach calls and conversations this endpoint holds.
//! What it keeps for calls whose legs live on another node is in `remote.rs`.

use actix::prelude::*;
use bytes::BytesMut;
use confab_protocol::uri::normalize_user_uri;
use confab_protocol::{
    Body, ClientMsg, DecodeError, Direction, ErrorCode, FrameError, Reason, Remote, ServerMsg,
    Toast, decode_client,
};
use std::collections::{HashSet, VecDeque};
use std::sync::Arc;
use std::sync::atomic::AtomicU32;
use std::time::Duration;
use tokio::time::Instant;

use crate::arbiter::{ArbiterMsg, ForkArbiter};
use crate::call::conversation::{Conversation, ConversationMsg};
use crate::call::leg::{CallLeg, LegInit, LegMsg, TerminateCause};
use crate::call::offer::CallOffer;
use crate::context::Ctx;
use crate::ids::IdMap;
use crate::link::Link;
use crate::metrics as m;
use crate::outbox::Outbox;
use crate::presence::PresenceMsg;
use crate::ratelimit::{Rate, TokenBucket};
use crate::reasons;
use crate::route::{EventSink, LegOwner, LegRef, REQUESTS_WAITING_FOR_NODE};

mod remote;
use remote::{RemoteCall, RequestKind, WaitingRequest};
pub use remote::{RemoteFork, RemoteForkGuard};

/// How long `bye` waits for calls on other nodes to report their end.
const REMOTE_END_WAIT: Duration = Duration::from_secs(2);

/// A fork of a call offered to this endpoint by an arbiter. If it is dropped unhandled (the
/// endpoint is gone), the arbiter hears that the fork is lost, so it never waits for it.
pub struct ForkOffer {
    arbiter: Addr<ForkArbiter>,
    call: String,
    conversation: String,
    from: String,
    offer: CallOffer,
    toast: Option<Toast>,
    immediate: bool,
    counter: Arc<AtomicU32>,
    handled: bool,
}

impl ForkOffer {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        arbiter: Addr<ForkArbiter>,
        call: String,
        conversation: String,
        from: String,
        offer: CallOffer,
        toast: Option<Toast>,
        immediate: bool,
        counter: Arc<AtomicU32>,
    ) -> Self {
        ForkOffer {
            arbiter,
            call,
            conversation,
            from,
            offer,
            toast,
            immediate,
            counter,
            handled: false,
        }
    }
}

impl Drop for ForkOffer {
    fn drop(&mut self) {
        if !self.handled {
            self.arbiter.do_send(ArbiterMsg::ForkLost {
                call: std::mem::take(&mut self.call),
            });
        }
    }
}

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
}

/// What a finished call id still answers to, so a late request gets the right error.
const REMEMBERED_ENDED_CALLS: usize = 64;

pub struct Endpoint {
    ctx: Ctx,
    id: String,
    user: String,
    outbox: Outbox,
    calls: IdMap<String, (LegRef, String)>,
    /// Cluster: calls of this endpoint whose legs live on other nodes.
    remote_calls: IdMap<String, RemoteCall>,
    /// Ending cleanly and waiting for remote legs to report their end.
    closing: bool,
    ended: VecDeque<(String, bool)>,
    conversations: IdMap<String, (Addr<Conversation>, usize)>,
    subscriptions: HashSet<String>,
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
    let l = &ctx.settings.limits;
    Rate::new(l.requests_per_second, l.request_burst)
}

/// `limits.presence_updates_per_second` and `presence_update_burst`.
fn presence_rate(ctx: &Ctx) -> Rate {
    let l = &ctx.settings.limits;
    Rate::new(l.presence_updates_per_second, l.presence_update_burst)
}

/// The client's frames after the `hello`, read by this actor.
pub type Frames =
    tokio_util::codec::FramedRead<crate::transport::ClientReader, confab_protocol::FrameCodec>;

impl Endpoint {
    pub fn new(ctx: Ctx, id: String, user: String, outbox: Outbox) -> Self {
        let now = Instant::now();
        let bucket = TokenBucket::full(request_rate(&ctx), now);
        let presence_bucket = TokenBucket::full(presence_rate(&ctx), now);
        Endpoint {
            ctx,
            id,
            user,
            outbox,
            calls: IdMap::default(),
            remote_calls: IdMap::default(),
            closing: false,
            ended: VecDeque::new(),
            conversations: IdMap::default(),
            subscriptions: HashSet::new(),
            last_rx: Instant::now(),
            end_state: EndState::Running,
            answer_sweep_armed: false,
            events_seen_armed: false,
            bucket,
            presence_bucket,
        }
    }

    fn push(&self, msg: ServerMsg) {
        self.outbox.push(msg);
    }

    /// Set once the endpoint is ending: nothing more is read or started.
    fn ending(&self) -> bool {
        self.end_state != EndState::Running
    }

    /// A call request for a leg on another node that was not sent: too many requests already
    /// wait for that node (`cluster.max_queued_envelopes` or `max_queued_bytes`). The client
    /// may try again.
    fn not_sent(&self, rid: Option<u32>) {
        self.error(rid, ErrorCode::Overloaded, REQUESTS_WAITING_FOR_NODE);
    }

    /// Sends a call request (`msg`, whose `rid` is `rid`) to the leg held under `call`, or
    /// answers that there is none. For a leg on another node the request waits here for its
    /// answer (see [`RemoteCall::requests`]); one that cannot be sent (too many requests wait
    /// for that node) is refused at once.
    fn send_call_request(
        &mut self,
        call: &str,
        rid: Option<u32>,
        msg: LegMsg,
        ctx: &mut Context<Self>,
    ) {
        let kind = match msg {
            LegMsg::Terminate { .. } => RequestKind::Terminate,
            LegMsg::Accept { .. } => RequestKind::Accept,
            _ => RequestKind::Other,
        };
        let waiting = || WaitingRequest {
            rid,
            sent: Instant::now(),
            kind,
        };
        match self.send_awaiting_answer(call, msg, |r| &mut r.requests, waiting, ctx) {
            Some(true) => {}
            Some(false) => self.not_sent(rid),
            // Not held: `leg` answers `unknown_call`, or `invalid_state` for a call just over.
            None => drop(self.leg(rid, call)),
        }
    }

    /// Sends `msg` to the leg this endpoint holds under `call`. For a leg on another node,
    /// `entry()` first joins the `waiting` list of what awaits an answer from that node (the
    /// deadline sweep armed), and leaves it again if the message could not be sent. Whether
    /// it was sent, or `None` when this endpoint holds no such call.
    fn send_awaiting_answer<T>(
        &mut self,
        call: &str,
        msg: LegMsg,
        waiting: fn(&mut RemoteCall) -> &mut VecDeque<T>,
        entry: impl FnOnce() -> T,
        ctx: &mut Context<Self>,
    ) -> Option<bool> {
        let (leg, _) = self.calls.get(call)?;
        let remote = match self.remote_calls.get_mut(call) {
            Some(r) => {
                waiting(r).push_back(entry());
                true
            }
            None => false,
        };
        if !leg.do_send(msg) {
            if let Some(r) = self.remote_calls.get_mut(call) {
                waiting(r).pop_back();
            }
            return Some(false);
        }
        if remote && !self.answer_sweep_armed {
            self.arm_answer_sweep(self.remote_answer_timeout(), ctx);
        }
        Some(true)
    }

    /// A `message` answered here rather than by its leg: its one `message_failed`, counted.
    fn fail_message(&self, rid: Option<u32>, call: String, code: u16, text: &str) {
        m::message_failed(code);
        self.push(ServerMsg::MessageFailed {
            rid,
            call,
            msg: None,
            code,
            text: text.to_owned(),
        });
    }

    fn error(&self, rid: Option<u32>, code: ErrorCode, text: &str) {
        self.push(ServerMsg::error(rid, code, text));
    }

    fn local(&self) -> Remote {
        Remote {
            user: self.user.clone(),
            endpoint: self.id.clone(),
        }
    }

    /// The leg this endpoint holds under `call`, or the error reply for a call it does not hold.
    fn leg(&self, rid: Option<u32>, call: &str) -> Option<LegRef> {
        if let Some((leg, _)) = self.calls.get(call) {
            return Some(leg.clone());
        }
        if self.ended.iter().any(|(c, _)| c == call) {
            self.error(rid, ErrorCode::InvalidState, "the call is over");
        } else {
            self.error(rid, ErrorCode::UnknownCall, "no such call");
        }
        None
    }

    /// Holds `call` (its `leg`) in `conversation`: a new conversation's actor starts with the
    /// call already in it, so the common case (one call per conversation) sends it nothing.
    fn add_call(&mut self, call: String, leg: LegRef, conversation: String) {
        match self.conversations.get_mut(&conversation) {
            Some((conv, count)) => {
                *count += 1;
                conv.do_send(ConversationMsg::Add {
                    call: call.clone(),
                    leg: leg.clone(),
                });
            }
            None => {
                let conv = Conversation::with(call.clone(), leg.clone()).start();
                self.conversations.insert(conversation.clone(), (conv, 1));
            }
        }
        self.calls.insert(call, (leg, conversation));
    }

    fn handle_frame(&mut self, msg: ClientMsg, ctx: &mut Context<Self>) {
        let rid = msg.rid();
        match msg {
            ClientMsg::Hello { .. } => {
                self.error(rid, ErrorCode::InvalidState, "already signed in")
            }
            ClientMsg::Ping { rid } => self.push(ServerMsg::Pong { rid }),
            ClientMsg::Bye { rid } => {
                self.push(ServerMsg::Ok { rid });
                self.end_cleanly(ctx, TerminateCause::Bye);
            }
            ClientMsg::DeviceState { rid, .. } | ClientMsg::SetStatus { rid, .. }
                if !self
                    .presence_bucket
                    .try_take(presence_rate(&self.ctx), self.last_rx) =>
            {
                m::limit_tripped("presence_updates_per_second");
                self.error(
                    rid,
                    ErrorCode::RateLimited,
                    "presence changes faster than limits.presence_updates_per_second; slow down",
                );
            }
            ClientMsg::DeviceState {
                rid,
                activity,
                idle_ms,
            } => {
                self.push(ServerMsg::Ok { rid });
                self.ctx.presence.send(PresenceMsg::Publish {
                    user: self.user.clone(),
                    endpoint: self.id.clone(),
                    activity,
                    idle_ms: idle_ms.unwrap_or(0),
                });
                self.ctx
                    .directory
                    .published(&self.id, activity, idle_ms.unwrap_or(0));
            }
            ClientMsg::SetStatus { rid, status } => self.set_status(rid, status, ctx),
            ClientMsg::Subscribe { rid, users } => self.subscribe(rid, users),
            ClientMsg::Unsubscribe { rid, users } => {
                let Some(users) = self.normalize_all(rid, &users) else {
                    return;
                };
                self.push(ServerMsg::Ok { rid });
                for user in users {
                    if self.subscriptions.remove(&user) {
                        self.ctx.presence.send(PresenceMsg::Unsubscribe {
                            user,
                            subscriber: self.id.clone(),
                        });
                    }
                }
            }
            ClientMsg::CallEstablish {
                rid,
                to,
                conversation,
                toast,
                sdp,
            } => self.establish(rid, to, conversation, toast, sdp, ctx),
            ClientMsg::CallAccept { rid, call, sdp } => {
                if self.calls.contains_key(&call) {
                    self.send_call_request(&call, rid, LegMsg::Accept { rid, sdp }, ctx);
                } else if self
                    .ended
                    .iter()
                    .any(|(c, elsewhere)| *c == call && *elsewhere)
                {
                    self.error(
                        rid,
                        ErrorCode::AnsweredElsewhere,
                        "another endpoint answered",
                    );
                } else {
                    self.leg(rid, &call);
                }
            }
            ClientMsg::CallDecline { rid, call, code } => {
                let code = code.unwrap_or(486);
                if !(400..=699).contains(&code) {
                    return self.error(rid, ErrorCode::BadFrame, "decline code must be 400-699");
                }
                self.send_call_request(&call, rid, LegMsg::Decline { rid, code }, ctx);
            }
            ClientMsg::CallForward { rid, call, to } => {
                let Ok(to) = normalize_user_uri(&to) else {
                    return self.error(rid, ErrorCode::BadFrame, "`to` is not a SIP URI");
                };
                self.send_call_request(&call, rid, LegMsg::Forward { rid, to }, ctx);
            }
            ClientMsg::CallTransfer { rid, call, to } => {
                let Ok(to) = normalize_user_uri(&to) else {
                    return self.error(rid, ErrorCode::BadFrame, "`to` is not a SIP URI");
                };
                self.send_call_request(&call, rid, LegMsg::Transfer { rid, to }, ctx);
            }
            ClientMsg::CallTerminate { rid, call } => {
                if self.calls.contains_key(&call) {
                    let terminate = LegMsg::Terminate {
                        rid,
                        cause: TerminateCause::Call,
                    };
                    self.send_call_request(&call, rid, terminate, ctx);
                } else if self.ended.iter().any(|(c, _)| *c == call) {
                    // Terminating a call that already ended is not an error.
                    self.push(ServerMsg::Ok { rid });
                } else {
                    self.error(rid, ErrorCode::UnknownCall, "no such call");
                }
            }
            ClientMsg::ConversationTerminate { rid, conversation } => {
                match self.conversations.get(&conversation) {
                    Some((conv, _)) => {
                        self.push(ServerMsg::Ok { rid });
                        conv.do_send(ConversationMsg::Terminate);
                    }
                    None => self.error(rid, ErrorCode::UnknownConversation, "no such conversation"),
                }
            }
            ClientMsg::Message {
                rid,
                call,
                content_type,
                body,
            } => {
                if let Err(why) = self.check_content(&content_type, &body) {
                    return self.error(rid, ErrorCode::BadFrame, why);
                }
                let msg = LegMsg::Message {
                    rid,
                    content_type,
                    body,
                };
                let entry = || (rid, Instant::now());
                match self.send_awaiting_answer(&call, msg, |r| &mut r.messages, entry, ctx) {
                    Some(true) => {}
                    // Over the bound for the leg's node: not sent, so answered here rather
                    // than left to the deadline.
                    Some(false) => self.fail_message(rid, call, 503, REQUESTS_WAITING_FOR_NODE),
                    None => self.fail_message(rid, call, 481, reasons::CALL_DOES_NOT_EXIST),
                }
            }
            ClientMsg::MessageAck { call, msg } => {
                if let Some((leg, _)) = self.calls.get(&call) {
                    leg.do_send(LegMsg::Ack { msg });
                }
            }
            ClientMsg::Composing { call, active } => {
                if let Some((leg, _)) = self.calls.get(&call) {
                    leg.do_send(LegMsg::Composing { active });
                }
            }
        }
    }

    fn normalize_all(&self, rid: Option<u32>, users: &[String]) -> Option<Vec<String>> {
        let mut out = Vec::with_capacity(users.len());
        for u in users {
            match normalize_user_uri(u) {
                Ok(u) => out.push(u),
                Err(_) => {
                    self.error(rid, ErrorCode::BadFrame, "`users` must hold SIP URIs");
                    return None;
                }
            }
        }
        Some(out)
    }

    /// `set_status`. In a cluster its order against other devices' changes must be the order
    /// their clients saw (docs/protocol.md §9 q): the stamp is taken once this node has caught
    /// up with the directory, and the `ok` once the change has landed there. The endpoint
    /// handles nothing else meanwhile (a millisecond or two; at most twice 500 ms), so its
    /// own changes stay in the order sent. Alone, both waits are nothing.
    fn set_status(
        &mut self,
        rid: Option<u32>,
        status: Option<confab_protocol::Status>,
        ctx: &mut Context<Self>,
    ) {
        let barrier = self.ctx.directory.status_barrier();
        ctx.wait(
            fut::wrap_future::<_, Self>(barrier)
                .then(move |_, act, _| {
                    let at_unix_ms = act.ctx.presence.stamp_status();
                    act.ctx.presence.send(PresenceMsg::SetStatus {
                        user: act.user.clone(),
                        endpoint: act.id.clone(),
                        status,
                        at_unix_ms,
                    });
                    act.ctx.directory.status_set(&act.id, status, at_unix_ms);
                    fut::wrap_future(act.ctx.directory.status_landed())
                })
                .map(move |_, act, _| act.push(ServerMsg::Ok { rid })),
        );
    }

    fn subscribe(&mut self, rid: Option<u32>, users: Vec<String>) {
        let Some(users) = self.normalize_all(rid, &users) else {
            return;
        };
        let limit = self.ctx.settings.limits.subscriptions_per_endpoint;
        let new = users
            .iter()
            .filter(|u| !self.subscriptions.contains(*u))
            .collect::<HashSet<_>>()
            .len();
        if self.subscriptions.len() + new > limit {
            m::limit_tripped("subscriptions_per_endpoint");
            return self.error(rid, ErrorCode::Forbidden, "subscription limit reached");
        }
        self.push(ServerMsg::Ok { rid });
        for user in users {
            self.subscriptions.insert(user.clone());
            let same_user = user == self.user;
            self.ctx.presence.send(PresenceMsg::Subscribe {
                user,
                subscriber: self.id.clone(),
                outbox: self.outbox.clone(),
                same_user,
            });
        }
    }

    fn establish(
        &mut self,
        rid: Option<u32>,
        to: String,
        conversation: Option<String>,
        toast: Option<Toast>,
        sdp: String,
        ctx: &mut Context<Self>,
    ) {
        let Ok(to) = normalize_user_uri(&to) else {
            return self.error(rid, ErrorCode::BadFrame, "`to` is not a SIP URI");
        };
        if let Some(t) = &toast
            && let Err(why) = self.check_content(&t.content_type, &t.body)
        {
            return self.error(rid, ErrorCode::BadFrame, why);
        }
        if self.calls.len() >= self.ctx.settings.limits.calls_per_endpoint {
            m::limit_tripped("calls_per_endpoint");
            return self.error(
                rid,
                ErrorCode::Overloaded,
                "too many calls on this endpoint",
            );
        }
        let conversation = match conversation {
            Some(c) if self.conversations.contains_key(&c) => c,
            Some(_) => {
                return self.error(rid, ErrorCode::UnknownConversation, "no such conversation");
            }
            // Started with the call, in `add_call`.
            None => self.ctx.ids.mint('v'),
        };
        let call = self.ctx.ids.mint('c');
        // The reply goes out before the leg exists, so it precedes the leg's first event.
        self.push(ServerMsg::CallCreated {
            rid,
            call: call.clone(),
            conversation: conversation.clone(),
        });
        let counter = Arc::new(AtomicU32::new(u32::from(toast.is_some())));
        let leg = CallLeg::new(LegInit {
            ctx: self.ctx.clone(),
            id: call.clone(),
            conversation: conversation.clone(),
            direction: Direction::Outbound,
            outbox: EventSink::Local(self.outbox.clone()),
            endpoint: LegOwner::Local(ctx.address()),
            local: self.local(),
            offer: CallOffer::unparsed(sdp),
            toast,
            to,
            arbiter: None,
            counter,
        })
        .start();
        self.add_call(call, LegRef::Local(leg), conversation);
    }

    fn adopt_fork(&mut self, mut offer: ForkOffer, ctx: &mut Context<Self>) {
        // Dropping the offer (returning early) tells the arbiter this fork is lost.
        if self.ending() {
            if self.end_state == EndState::ShuttingDown {
                offer.handled = true;
                offer.arbiter.do_send(ArbiterMsg::Declined {
                    call: offer.call.clone(),
                    code: 503,
                    reason: reasons::shutting_down(),
                });
            }
            return;
        }
        if self.calls.len() >= self.ctx.settings.limits.calls_per_endpoint {
            m::limit_tripped("calls_per_endpoint");
            return;
        }
        offer.handled = true;
        let leg = CallLeg::new(LegInit {
            ctx: self.ctx.clone(),
            id: offer.call.clone(),
            conversation: offer.conversation.clone(),
            direction: Direction::Inbound,
            outbox: EventSink::Local(self.outbox.clone()),
            endpoint: LegOwner::Local(ctx.address()),
            local: self.local(),
            offer: offer.offer.clone(),
            toast: offer.toast.clone(),
            to: String::new(),
            arbiter: Some(offer.arbiter.clone()),
            counter: offer.counter.clone(),
        })
        .start();
        self.push(ServerMsg::CallIncoming {
            call: offer.call.clone(),
            conversation: offer.conversation.clone(),
            from: offer.from.clone(),
            toast: offer.toast.clone(),
            sdp: offer.offer.sdp().to_owned(),
            immediate_auto_accept: offer.immediate,
        });
        offer.arbiter.do_send(ArbiterMsg::ForkReady {
            call: offer.call.clone(),
            leg: leg.clone(),
        });
        self.add_call(
            offer.call.clone(),
            LegRef::Local(leg),
            offer.conversation.clone(),
        );
    }

    /// Forgets an ended leg (and releases it), remembering its id for late requests.
    fn leg_ended(
        &mut self,
        call: String,
        conversation: String,
        elsewhere: bool,
        ctx: &mut Context<Self>,
    ) {
        let held = self.calls.remove(&call);
        let was_held = held.is_some();
        match held {
            Some((leg, _))
                if leg.remote_node().is_none() || self.remote_calls.contains_key(&call) =>
            {
                leg.do_send(LegMsg::Release);
            }
            Some(_) => {}
            // Cluster: a leg made for this endpoint that it never held (the `Adopt` offering
            // it was lost on the way) still needs its release, or it would stay for good.
            None => {
                if let Some(link) = &self.ctx.link {
                    link.release_leg(call.clone(), self.id.clone());
                }
            }
        }
        if let Some(r) = self.remote_calls.remove(&call) {
            // The leg answered every message and request it had before it reported its end (in
            // order, on one connection): one still waiting was lost on the way, or crossed the
            // end.
            self.answer_all_waiting(&call, r, 481, reasons::CALL_DOES_NOT_EXIST, elsewhere);
        }
        // A leg on another node reports its end again until released (`cluster/src/resend.rs`):
        // one call is remembered once, or its repeats would push other calls out.
        if was_held || !self.ended.iter().any(|(c, _)| *c == call) {
            self.ended.push_back((call.clone(), elsewhere));
            if self.ended.len() > REMEMBERED_ENDED_CALLS {
                self.ended.pop_front();
            }
        }
        // Only a call held until now leaves its conversation: a second report of the same end
        // (a node loss, then the leg's own late `LegEnded`) must not end a conversation that
        // still holds other calls.
        if was_held && let Some((conv, count)) = self.conversations.get_mut(&conversation) {
            *count = count.saturating_sub(1);
            if *count == 0 {
                // Its last call: dropping the only address stops the actor (actix stops an
                // actor whose addresses are all gone), so it needs no message.
                self.conversations.remove(&conversation);
            } else {
                conv.do_send(ConversationMsg::Remove { call });
            }
        }
        if self.closing && !self.calls.values().any(|(l, _)| l.remote_node().is_some()) {
            self.closing = false;
            self.outbox.close();
            ctx.stop();
        }
    }

    /// `bye` or shutdown: every call terminates (its events go out first), then the socket
    /// closes.
    fn end_cleanly(&mut self, ctx: &mut Context<Self>, cause: TerminateCause) {
        if self.ending() {
            return;
        }
        self.end_state = if cause == TerminateCause::Shutdown {
            EndState::ShuttingDown
        } else {
            EndState::Ending
        };
        let mut local = Vec::new();
        for (leg, _) in self.calls.values() {
            match leg {
                LegRef::Local(a) => local.push(a.clone()),
                remote => {
                    remote.do_send(LegMsg::Terminate { rid: None, cause });
                }
            }
        }
        let done = futures::future::join_all(
            local
                .into_iter()
                .map(move |leg| leg.send(LegMsg::Terminate { rid: None, cause })),
        );
        // Spawned, not waited on (`ctx.wait` would stop the frame stream): the endpoint keeps
        // reading its client meanwhile, so a request sent after `bye` is still answered
        // (`refuse_while_ending`) until the socket closes.
        ctx.spawn(done.into_actor(self).map(|_, act, ctx| {
            if act.calls.values().any(|(l, _)| l.remote_node().is_some()) {
                // Legs on other nodes report their end through the network; wait for them
                // (their events go out first), within a deadline.
                act.closing = true;
                ctx.run_later(REMOTE_END_WAIT, |act, ctx| {
                    // Messages and requests to legs that never reported their end still get
                    // their answer.
                    for (call, r) in std::mem::take(&mut act.remote_calls) {
                        act.answer_all_waiting(&call, r, 481, reasons::CALL_DOES_NOT_EXIST, false);
                    }
                    act.outbox.close();
                    ctx.stop();
                });
                return;
            }
            act.outbox.close();
            ctx.stop();
        }));
    }

    /// The connection is gone or unusable: remote parties see 408.
    fn lost(&mut self, ctx: &mut Context<Self>) {
        self.end_state = EndState::Ending;
        self.outbox.close();
        ctx.stop();
    }

    /// A message's or a toast's content type and body, as the frame carries them: the body's
    /// kind must match the type, and the type fit `flow.max_content_type_bytes` (it travels
    /// with the body to the receiver, but is not counted in `flow.max_message_bytes`).
    fn check_content(&self, content_type: &str, body: &Body) -> Result<(), &'static str> {
        let why = if content_type.len() > self.ctx.settings.flow.max_content_type_bytes {
            "content_type is longer than flow.max_content_type_bytes"
        } else if !body.matches_content_type(content_type) {
            "body must be str for text/* content types and bin otherwise"
        } else {
            return Ok(());
        };
        metrics::counter!(m::FRAMES_REJECTED, "reason" => "bad_frame").increment(1);
        Err(why)
    }

    /// Answers a request that arrives after `bye` or a shutdown began: a `message` fails with
    /// 503, other requests get `invalid_state`, acks and composing are ignored.
    fn refuse_while_ending(&mut self, msg: ClientMsg) {
        self.refuse(
            msg,
            "Endpoint is signing out",
            ErrorCode::InvalidState,
            "the endpoint is signing out",
        );
    }

    /// Refuses a request over the connection's rate, in the form its type is answered in: a
    /// `message` still gets its one `message_failed`, `composing` gets nothing.
    fn rate_limited(&mut self, msg: ClientMsg) {
        metrics::counter!(m::FRAMES_REJECTED, "reason" => "rate_limited").increment(1);
        self.refuse(
            msg,
            "Too many requests; slow down",
            ErrorCode::RateLimited,
            "too many requests; slow down",
        );
    }

    /// A request refused unread, answered in the form its type is answered in: a `message` gets
    /// `message_failed` 503 with `reason`, an ack or composing nothing (they have no answer),
    /// any other request `error{code}`.
    fn refuse(&mut self, msg: ClientMsg, reason: &str, code: ErrorCode, text: &str) {
        match msg {
            ClientMsg::Message { rid, call, .. } => self.fail_message(rid, call, 503, reason),
            ClientMsg::MessageAck { .. } | ClientMsg::Composing { .. } => {}
            other => self.error(other.rid(), code, text),
        }
    }

    fn reject_frame(&mut self, e: &DecodeError) {
        let reason = match e {
            DecodeError::UnknownType { .. } => "unknown_type",
            DecodeError::BadFrame { .. } => "bad_frame",
        };
        metrics::counter!(m::FRAMES_REJECTED, "reason" => reason).increment(1);
        let text = match e {
            DecodeError::UnknownType { ty, .. } => format!("unknown message type {ty:?}"),
            DecodeError::BadFrame { detail, .. } => detail.clone(),
        };
        self.error(e.rid(), e.code(), &clip(&text));
    }
}

/// How much of a frame-error text is sent back (docs/protocol.md, "Frame errors"): the text
/// may quote the frame (its unknown `type`, serde's "unknown variant `…`"), and a client must
/// not get a large error for a small cost, nor fill its own queue with its echoes.
const MAX_ERROR_TEXT: usize = 200;

/// `text` cut to [`MAX_ERROR_TEXT`] bytes at a character boundary, ending in `…` when cut.
fn clip(text: &str) -> std::borrow::Cow<'_, str> {
    if text.len() <= MAX_ERROR_TEXT {
        return text.into();
    }
    let mut end = MAX_ERROR_TEXT;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &text[..end]).into()
}

impl Actor for Endpoint {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        // Enough room for a burst of events without blocking the actor on its own mailbox.
        ctx.set_mailbox_capacity(256);
        m::hot().endpoints.increment(1.0);
        let hb = self.ctx.settings.heartbeat();
        ctx.run_interval(hb, move |act, ctx| {
            // An ending endpoint has its own deadline; dropping it as lost would drop the final
            // events of its calls on other nodes.
            if !act.ending() && act.last_rx.elapsed() > hb * 3 {
                tracing::info!(endpoint = %act.id, "no frame for 3 heartbeats; dropping the endpoint");
                m::limit_tripped("heartbeat_timeout");
                act.lost(ctx);
            }
        });
        // A slow consumer (or a failed write) closes the outbox: the endpoint ends with it.
        let closed = self.outbox.closed();
        ctx.spawn(
            async move { closed.cancelled().await }
                .into_actor(self)
                .map(|(), act, ctx| {
                    if !act.ending() {
                        act.lost(ctx);
                    }
                }),
        );
    }

    fn stopped(&mut self, _: &mut Context<Self>) {
        m::hot().endpoints.decrement(1.0);
        for (leg, _) in self.calls.values() {
            leg.do_send(LegMsg::EndpointLost);
        }
        for user in self.subscriptions.drain() {
            self.ctx.presence.send(PresenceMsg::Unsubscribe {
                user,
                subscriber: self.id.clone(),
            });
        }
        self.ctx.directory.unregister(&self.user, &self.id);
        self.ctx.presence.send(PresenceMsg::Left {
            user: self.user.clone(),
            endpoint: self.id.clone(),
        });
        self.outbox.close();
    }
}

impl StreamHandler<Result<BytesMut, FrameError>> for Endpoint {
    fn handle(&mut self, item: Result<BytesMut, FrameError>, ctx: &mut Context<Self>) {
        if self.ending() {
            // Still answered while the socket is open: a `message` always gets its one answer,
            // a malformed frame its error. (A framing error needs no answer now: the socket is
            // closing anyway.)
            if let Ok(frame) = item {
                match decode_client(&frame) {
                    Ok(msg) => self.refuse_while_ending(msg),
                    Err(e) => self.reject_frame(&e),
                }
            }
            return;
        }
        self.last_rx = Instant::now();
        match item {
            Ok(frame) => match decode_client(&frame) {
                // Acks answer the node's own events; refusing them would only fail the sender.
                Ok(msg @ ClientMsg::MessageAck { .. }) => self.handle_frame(msg, ctx),
                Ok(msg) if !self.bucket.try_take(request_rate(&self.ctx), self.last_rx) => {
                    self.rate_limited(msg)
                }
                Ok(msg) => self.handle_frame(msg, ctx),
                // Malformed frames cost a token too, or garbage would be a way past the limit.
                Err(e) if !self.bucket.try_take(request_rate(&self.ctx), self.last_rx) => {
                    metrics::counter!(m::FRAMES_REJECTED, "reason" => "rate_limited").increment(1);
                    self.error(
                        e.rid(),
                        ErrorCode::RateLimited,
                        "too many requests; slow down",
                    );
                }
                Err(e) => self.reject_frame(&e),
            },
            Err(FrameError::Empty) => {
                metrics::counter!(m::FRAMES_REJECTED, "reason" => "bad_frame").increment(1);
                self.error(None, ErrorCode::BadFrame, "zero-length frame");
                self.lost(ctx);
            }
            Err(FrameError::TooLarge { len, max }) => {
                metrics::counter!(m::FRAMES_REJECTED, "reason" => "frame_too_large").increment(1);
                self.error(
                    None,
                    ErrorCode::FrameTooLarge,
                    &format!("frame of {len} bytes exceeds {max}"),
                );
                self.lost(ctx);
            }
            Err(e) => {
                tracing::debug!(endpoint = %self.id, error = %e, "connection read failed");
                self.lost(ctx);
            }
        }
    }

    fn finished(&mut self, ctx: &mut Context<Self>) {
        if !self.ending() {
            self.lost(ctx);
        }
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
            EndpointMsg::NodeLost { node } => {
                self.node_lost(node.as_ref().map(|(n, e)| (n.as_str(), *e)), ctx)
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
            EndpointMsg::ShutdownNotice => {
                let s = &self.ctx.settings.server;
                self.push(ServerMsg::Shutdown {
                    reason: "Server shutting down".to_owned(),
                    reconnect_after_ms: s.reconnect_after_ms,
                });
            }
            EndpointMsg::Shutdown => self.end_cleanly(ctx, TerminateCause::Shutdown),
            // Sent again for each later record of the user until this endpoint is gone.
            EndpointMsg::OverLimit if self.ending() => {}
            EndpointMsg::OverLimit => {
                metrics::counter!(m::CONNECTIONS_REJECTED, "reason" => "endpoints_per_user")
                    .increment(1);
                self.error(
                    None,
                    ErrorCode::Forbidden,
                    "too many endpoints signed in for this user (across the cluster)",
                );
                self.end_cleanly(ctx, TerminateCause::Bye);
            }
        }
    }
}
