//! An endpoint's resumable session (docs/protocol.md §3 "Resuming"): its token, the count of
//! the client's frames, the hold while its connection is gone, and taking it back on a new
//! connection. The outbox keeps and numbers what the node sends (`outbox/kept.rs`); this file
//! decides when the session is held, resumed or over.

use actix::prelude::*;
use base64::Engine as _;
use confab_protocol::{ResumeGrant, ServerMsg};
use sha2::{Digest, Sha256};
use std::collections::VecDeque;
use std::sync::Mutex;
use std::time::Duration;
use subtle::ConstantTimeEq;
use tokio::time::Instant;

use super::{Endpoint, Frames};
use crate::metrics as m;
use crate::outbox::{CountError, OutboxReceiver, WriterLink};
use crate::refusal::ResumeRefusal;

/// A resume token's SHA-256: all the node keeps of it.
pub type TokenHash = [u8; 32];

/// A fresh resume token (128 random bits, base64url without padding) and its hash.
pub fn new_token() -> (String, TokenHash) {
    let bytes: [u8; 16] = rand::random();
    let token = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes);
    let hash = hash_token(&token);
    (token, hash)
}

pub fn hash_token(token: &str) -> TokenHash {
    Sha256::digest(token.as_bytes()).into()
}

/// What `welcome.resume` tells the client of its session.
pub fn grant(ctx: &crate::context::Ctx, token: String, seen: Option<u64>) -> Box<ResumeGrant> {
    let s = &ctx.settings.session;
    Box::new(ResumeGrant {
        token,
        window_ms: s.resume_window_ms,
        max_unseen_frames: u32::try_from(s.max_unseen_frames).unwrap_or(u32::MAX),
        max_unseen_bytes: s.max_unseen_bytes as u64,
        seen,
    })
}

/// An endpoint's resumable session.
pub struct ResumeState {
    token: TokenHash,
    /// The token the last resume spent: a second resume with it is refused as such, unless
    /// nothing was read from the connection that spent it (its `welcome` may never have reached
    /// the client, which then knows only this token).
    previous: Option<TokenHash>,
    /// `received` when the last resume took the session back.
    received_at_resume: u64,
    /// The client's frames read since its `hello` (the next one read is `received + 1`).
    pub(super) received: u64,
    /// The attached writer (the connection's sending side).
    link: WriterLink,
    /// The connection's receiving side, while there is one.
    attached: Option<Attached>,
    /// The number of the connection now (the first is 0; each resume takes the next).
    connection: u32,
    /// The number of the hold under way, if the connection is gone.
    held: Option<u64>,
    holds: u64,
}

impl ResumeState {
    pub fn new(token: TokenHash, link: WriterLink) -> Self {
        ResumeState {
            token,
            previous: None,
            received_at_resume: 0,
            received: 0,
            link,
            attached: None,
            connection: 0,
            held: None,
            holds: 0,
        }
    }
}

/// Sessions whose resume window ended lately (their endpoint and token hash), so that a
/// resume that comes too late is told so rather than "unknown". Bounded: the oldest go.
#[derive(Default)]
pub struct ExpiredSessions(Mutex<VecDeque<(String, TokenHash)>>);

/// How many expired sessions are remembered.
const EXPIRED_REMEMBERED: usize = 4096;

impl ExpiredSessions {
    fn add(&self, endpoint: &str, token: TokenHash) {
        let Ok(mut list) = self.0.lock() else { return };
        if list.len() >= EXPIRED_REMEMBERED {
            list.pop_front();
        }
        list.push_back((endpoint.to_owned(), token));
    }

    /// Whether `token` resumed `endpoint` until its window ended.
    pub fn expired(&self, endpoint: &str, token: &str) -> bool {
        let hash = hash_token(token);
        let Ok(list) = self.0.lock() else {
            return false;
        };
        list.iter()
            .any(|(e, h)| e == endpoint && bool::from(h.ct_eq(&hash)))
    }
}

/// Where an endpoint reads its client's frames from.
enum Attached {
    /// A connection to this node.
    Stream(SpawnHandle),
    /// A connection to another node, relayed (`relay.rs`): frames come as
    /// [`super::EndpointMsg::Relayed`], batch `next_seq` next.
    Relay {
        node: String,
        relay: u64,
        next_seq: u64,
    },
}

/// The connection a resume comes on.
pub enum Attach {
    /// A connection to this node: its frames.
    Socket {
        frames: Frames,
        peer: std::net::SocketAddr,
    },
    /// A connection to node `node`, relayed as its relay `relay`.
    Relay { node: String, relay: u64 },
}

/// A new connection takes a held (or still attached) session back.
#[derive(Message)]
#[rtype(result = "Result<OutboxReceiver, ResumeRefusal>")]
pub struct Resume {
    pub rid: Option<u32>,
    /// The user the `hello`'s token was checked for.
    pub user: String,
    pub token: String,
    /// The node's frames the client read.
    pub seen: u64,
    /// The frames the client sent.
    pub sent: u64,
    pub conn: Attach,
}

impl Endpoint {
    /// Makes this endpoint's session resumable; `stream` is its connection's frames.
    pub fn resumable(&mut self, mut state: ResumeState, stream: SpawnHandle) {
        state.attached = Some(Attached::Stream(stream));
        self.resume = Some(Box::new(state));
    }

    /// Watches the attached writer: a socket that fails to write holds the session.
    pub(super) fn watch_writer(&self, ctx: &mut Context<Self>) {
        let Some(r) = self.resume.as_deref() else {
            return;
        };
        let link = r.link.clone();
        let lost = link.lost.clone();
        ctx.spawn(async move { lost.cancelled().await }.into_actor(self).map(
            move |(), act, ctx| {
                // Only the writer still attached: a detached or replaced one (a hold, a
                // resume) is cancelled too, and must not end its successor.
                let attached = act
                    .resume
                    .as_deref()
                    .is_some_and(|r| r.link.writer == link.writer && act.outbox.is_current(&link));
                if attached {
                    act.connection_lost("write failed", ctx);
                }
            },
        ));
    }

    /// The client's connection is gone (closed, failed, or silent for three heartbeats): a
    /// resumable session is held for `session.resume_window_ms`, any other ends as lost.
    pub(super) fn connection_lost(&mut self, why: &'static str, ctx: &mut Context<Self>) {
        if self.ending() {
            return;
        }
        let window = self.ctx.settings.session.resume_window_ms;
        let Some(r) = self.resume.as_deref_mut().filter(|_| window > 0) else {
            return self.lost(ctx);
        };
        if r.held.is_some() {
            return;
        }
        if let Some(Attached::Stream(stream)) = r.attached.take() {
            ctx.cancel_future(stream);
        }
        self.outbox.detach();
        r.holds += 1;
        let hold = r.holds;
        r.held = Some(hold);
        metrics::gauge!(m::SESSIONS_HELD).increment(1.0);
        tracing::info!(endpoint = %self.id, why, window_ms = window, unseen = self.outbox.kept_frames(), "connection lost; holding the session for a resume");
        ctx.run_later(Duration::from_millis(window), move |act, ctx| {
            let Some(r) = act.resume.as_deref_mut() else {
                return;
            };
            if r.held != Some(hold) || act.end_state != super::EndState::Running {
                return;
            }
            r.held = None;
            act.ctx.expired_sessions.add(&act.id, r.token);
            metrics::gauge!(m::SESSIONS_HELD).decrement(1.0);
            metrics::counter!(m::SESSION_HOLDS, "end" => "expired").increment(1);
            tracing::info!(endpoint = %act.id, "resume window over; ending the endpoint as lost");
            act.lost(ctx);
        });
    }

    /// The endpoint stops: a hold under way ends with it.
    pub(super) fn end_hold(&mut self) {
        if let Some(r) = self.resume.as_deref_mut()
            && r.held.take().is_some()
        {
            metrics::gauge!(m::SESSIONS_HELD).decrement(1.0);
            metrics::counter!(m::SESSION_HOLDS, "end" => "ended").increment(1);
        }
    }

    /// Whether frames tagged `conn` come from the connection the endpoint reads now (always,
    /// for a session that is not resumable: it has one).
    pub(super) fn is_current_connection(&self, conn: u32) -> bool {
        self.resume
            .as_deref()
            .is_none_or(|r| r.connection == conn && matches!(r.attached, Some(Attached::Stream(_))))
    }

    /// Whether the connection is gone and the session held.
    pub(super) fn held(&self) -> bool {
        self.resume.as_deref().is_some_and(|r| r.held.is_some())
    }

    /// Counts one client frame read (on a resumable session).
    pub(super) fn count_received(&mut self) {
        if let Some(r) = self.resume.as_deref_mut() {
            r.received += 1;
        }
    }

    /// On a resumable session the `pong` is followed by `seen`: what the node has read.
    pub(super) fn push_seen(&self) {
        if let Some(r) = self.resume.as_deref() {
            self.push(ServerMsg::Seen { upto: r.received });
        }
    }

    /// The client acknowledged the node's frames up to `upto`.
    pub(super) fn client_saw(&mut self, upto: u64) {
        use crate::refusal::Refusal;
        if self.resume.is_none() {
            return self.refuse(None, Refusal::NotResumable);
        }
        if self.outbox.client_saw(upto).is_err() {
            self.refuse(None, Refusal::SeenAhead);
        }
    }

    fn take_back(
        &mut self,
        msg: Resume,
        ctx: &mut Context<Self>,
    ) -> Result<OutboxReceiver, ResumeRefusal> {
        if self.ending() || *msg.user != *self.user {
            return Err(ResumeRefusal::Unknown);
        }
        let Some(r) = self.resume.as_deref() else {
            return Err(ResumeRefusal::Unknown);
        };
        let hash = hash_token(&msg.token);
        let current = bool::from(hash.ct_eq(&r.token));
        let spent = !current && r.previous.is_some_and(|p| bool::from(p.ct_eq(&hash)));
        // A spent token still works while the connection that spent it has read nothing:
        // that resume's welcome may have been lost with its connection.
        let retried = spent && r.received == r.received_at_resume;
        if !current && !retried {
            return Err(if spent {
                ResumeRefusal::AlreadyResumed
            } else {
                ResumeRefusal::Unknown
            });
        }
        if msg.sent < r.received {
            return Err(ResumeRefusal::SentBehind);
        }
        let (token, new_hash) = new_token();
        let welcome = ServerMsg::Welcome {
            rid: msg.rid,
            endpoint: self.id.to_string(),
            node: self.ctx.node_id.clone(),
            heartbeat_ms: self.ctx.settings.server.heartbeat_ms,
            max_frame: self.ctx.settings.server.max_frame,
            resume: Some(grant(&self.ctx, token, Some(r.received))),
        };
        let (rx, link) = match self.outbox.resume(msg.seen, &welcome) {
            None => return Err(ResumeRefusal::Unknown),
            Some(Err(CountError::Ahead)) => return Err(ResumeRefusal::SeenAhead),
            Some(Err(CountError::Behind)) => return Err(ResumeRefusal::SeenBehind),
            Some(Ok(attached)) => attached,
        };
        // From here the old connection, if it was still there, is gone: its writer was
        // detached by the resume, and nothing more is read from it.
        let Some(r) = self.resume.as_deref_mut() else {
            return Err(ResumeRefusal::Unknown);
        };
        if let Some(Attached::Stream(stream)) = r.attached.take() {
            ctx.cancel_future(stream);
        }
        if current {
            r.previous = Some(r.token);
        }
        r.token = new_hash;
        r.received_at_resume = r.received;
        r.link = link;
        if r.held.take().is_some() {
            metrics::gauge!(m::SESSIONS_HELD).decrement(1.0);
            metrics::counter!(m::SESSION_HOLDS, "end" => "resumed").increment(1);
        }
        r.connection += 1;
        let relayed = match msg.conn {
            Attach::Socket { frames, peer } => {
                let stream = ctx.add_stream(super::frames::tagged(frames, r.connection));
                r.attached = Some(Attached::Stream(stream));
                self.session.0 = peer;
                None
            }
            Attach::Relay { node, relay } => {
                r.attached = Some(Attached::Relay {
                    node: node.clone(),
                    relay,
                    next_seq: 1,
                });
                Some(node)
            }
        };
        self.watch_writer(ctx);
        self.last_rx = Instant::now();
        tracing::info!(endpoint = %self.id, seen = msg.seen, through = ?relayed, "session resumed");
        Ok(rx)
    }
}

impl Endpoint {
    /// Client frames relayed from another node: read as if from a socket, if they come from
    /// the relay the session is attached to, in order (a batch missing means frames were lost
    /// between the nodes: the connection is treated as lost, and the client resumes again).
    pub(super) fn relayed(
        &mut self,
        from: &str,
        relay: u64,
        seq: u64,
        frames: Vec<bytes::Bytes>,
        ctx: &mut Context<Self>,
    ) {
        let Some(r) = self.resume.as_deref_mut() else {
            return;
        };
        let Some(Attached::Relay {
            node,
            relay: current,
            next_seq,
        }) = &mut r.attached
        else {
            return;
        };
        if node != from || *current != relay {
            return;
        }
        if *next_seq != seq {
            tracing::warn!(endpoint = %self.id, relay, seq, expected = *next_seq, "relayed frames lost between the nodes");
            return self.connection_lost("relayed frames lost", ctx);
        }
        *next_seq += 1;
        for frame in frames {
            self.frame_read(Ok(bytes::BytesMut::from(frame)), ctx);
            if self.held() {
                return;
            }
        }
    }

    /// The relayed connection ended on its node, or that node is gone (`node: None`: this
    /// node is cut off from every other).
    pub(super) fn relay_ended(
        &mut self,
        from: Option<&str>,
        relay: Option<u64>,
        ctx: &mut Context<Self>,
    ) {
        let current = self.resume.as_deref().and_then(|r| match &r.attached {
            Some(Attached::Relay {
                node, relay: id, ..
            }) => Some((node.clone(), *id)),
            _ => None,
        });
        let Some((node, id)) = current else {
            return;
        };
        if from.is_none_or(|f| f == node) && relay.is_none_or(|r| r == id) {
            self.connection_lost("relayed connection ended", ctx);
        }
    }
}

impl Handler<Resume> for Endpoint {
    type Result = Result<OutboxReceiver, ResumeRefusal>;

    fn handle(&mut self, msg: Resume, ctx: &mut Context<Self>) -> Self::Result {
        self.take_back(msg, ctx)
    }
}
