//! One client connection: the socket (with its TLS handshake when the port has `[tls]`), the
//! codec or the WebSocket upgrade, the writer (alone, or in the endpoint's task:
//! `connection_task.rs`) and the `hello` handshake.
//! It knows nothing of calls: once the client is signed in, its frames go to a new
//! [`Endpoint`] actor on this worker thread.

use actix::prelude::*;
use confab_protocol::uri::normalize_user_uri;
use confab_protocol::{
    ClientMsg, DecodeError, FrameCodec, FrameError, PROTOCOL_VERSION, ResumeAsk, ServerMsg,
    decode_client,
};
use futures::StreamExt;
use std::time::Duration;
use tokio::io::AsyncWrite;
use tokio::net::TcpStream;
use tokio::sync::OwnedSemaphorePermit;
use tokio_util::codec::FramedRead;
use tokio_util::either::Either;

use crate::address_limits::{AddressRefusal, AddressSlot};
use crate::connection_task::{ConnectionPermit, SignedIn, WriterTask};
use crate::context::Ctx;
use crate::directory::EndpointEntry;
use crate::endpoint::{Attach, Endpoint, Frames, Resume, ResumeState, grant, new_token};
use crate::link::{Link, RelayAsk};
use crate::metrics as m;
use crate::outbox::{Outbox, OutboxReceiver, outbox};
use crate::presence::PresenceMsg;
use crate::refusal::Refusal;
use crate::refusal::ResumeRefusal;
use crate::route::EndpointRef;
use crate::transport;
use confab_protocol::proxy::ProxyHeader;
use std::sync::Arc;

/// Read buffer of a signed-in connection once it has read (the codec's adaptive buffer goes
/// back to it when quiet): most frames are small and an idle endpoint should cost little; the
/// codec grows it for a larger frame. A connection starts after its `hello` with no buffer at
/// all (see [`Conn::serve`]).
const READ_BUFFER: usize = 128;

/// Most a busy connection's read buffer grows to (the codec's adaptive buffer), so one read
/// takes a batch of frames rather than one; it goes back to [`READ_BUFFER`] when quiet.
const BUSY_READ_BUFFER: usize = 8192;

/// Read buffer for the `hello`, which carries a token and rarely fits in [`READ_BUFFER`]: one
/// read instead of three per sign-in. Released once the hello is read.
const HELLO_BUFFER: usize = 512;

/// Longest `device` name accepted.
const MAX_DEVICE_LEN: usize = 128;

struct Hello {
    rid: Option<u32>,
    user: String,
    device: String,
    resume: Option<Box<ResumeAsk>>,
}

/// Why the handshake failed: what to tell the client before closing.
/// A sign-in refused, with the `rid` of its `hello` when it had one.
struct SignInRefused {
    rid: Option<u32>,
    why: Refusal,
}

impl SignInRefused {
    fn new(rid: Option<u32>, why: Refusal) -> Self {
        SignInRefused { rid, why }
    }
}

/// Serves one accepted connection until it closes. `permit` is the connection's slot under
/// `server.max_connections`, held until the socket is closed.
pub async fn run(
    mut stream: TcpStream,
    peer: std::net::SocketAddr,
    ctx: Ctx,
    permit: (OwnedSemaphorePermit, Option<AddressSlot>),
    listener: Listener,
) {
    if crate::node::LISTENER_NODELAY_INHERITED {
        // Set on the listener by `node::bind`, where every accepted stream comes from.
        debug_assert!(
            stream.nodelay().unwrap_or(true),
            "listener without TCP_NODELAY"
        );
    } else {
        let _ = stream.set_nodelay(true);
    }
    // One deadline for the PROXY header, the TLS handshake and the hello together.
    let deadline =
        tokio::time::Instant::now() + Duration::from_millis(ctx.settings.server.hello_timeout_ms);
    let (permit, address_slot) = permit;
    let (peer, address_slot) = match address_slot {
        Some(slot) => (peer, slot),
        None => {
            let trusted = &ctx.proxy_trusted_from;
            if !trusted.is_empty()
                && !trusted
                    .iter()
                    .any(|n| n.contains(&peer.ip().to_canonical()))
            {
                tracing::info!(%peer, "a PROXY header from a peer not in server.proxy_trusted_from; closing");
                metrics::counter!(m::CONNECTIONS_REJECTED, "reason" => "proxy_untrusted")
                    .increment(1);
                return;
            }
            let (peer, from_header) =
                match tokio::time::timeout_at(deadline, read_proxy_header(&mut stream)).await {
                    Ok(Ok(ProxyHeader::Proxied { source, .. })) => (source, true),
                    Ok(Ok(ProxyHeader::Local)) => (peer, false),
                    Ok(Err(why)) => {
                        tracing::info!(%peer, %why, "bad PROXY header; closing");
                        metrics::counter!(m::CONNECTIONS_REJECTED, "reason" => "proxy_header")
                            .increment(1);
                        return;
                    }
                    Err(_) => {
                        tracing::info!(%peer, "no PROXY header in time; closing");
                        metrics::counter!(m::CONNECTIONS_REJECTED, "reason" => "proxy_header")
                            .increment(1);
                        return;
                    }
                };
            match ctx
                .address_limits
                .admit(peer.ip(), from_header, tokio::time::Instant::now())
            {
                Ok(slot) => (peer, slot),
                Err(why) => {
                    refused_for_address(peer, why);
                    return;
                }
            }
        }
    };
    let permit = (permit, address_slot);
    let (stream, stale_certificate): (transport::ClientStream, _) = match &ctx.tls {
        None => (Either::Left(stream), None),
        Some(tls) => match tokio::time::timeout_at(
            deadline.min(
                tokio::time::Instant::now()
                    + Duration::from_millis(ctx.settings.server.tls_handshake_timeout_ms),
            ),
            tls.accept(stream),
        )
        .await
        {
            Ok(Ok(accepted)) => {
                let result = match &accepted.stale_certificate {
                    None => "ok",
                    Some(why) => {
                        tracing::info!(%peer, reason = %why, "TLS session resumed with a client certificate that no longer verifies; refusing its hello");
                        "failed"
                    }
                };
                metrics::counter!(m::TLS_HANDSHAKES, "result" => result).increment(1);
                (Either::Right(accepted.stream), accepted.stale_certificate)
            }
            Ok(Err(e)) => {
                tracing::info!(%peer, error = %e, "TLS handshake failed; closing");
                tls_refused();
                return;
            }
            Err(_) => {
                tracing::info!(%peer, "no TLS handshake in time; closing");
                tls_refused();
                return;
            }
        },
    };
    let conn = Conn {
        ctx,
        peer,
        deadline,
        stale_certificate,
    };
    match listener {
        Listener::Clients => {
            let (rd, wr) = transport::split(stream);
            let codec = FrameCodec::new(
                conn.ctx
                    .settings
                    .server
                    .max_hello_frame
                    .min(conn.ctx.settings.server.max_frame) as usize,
            )
            .with_adaptive_buffer(READ_BUFFER, BUSY_READ_BUFFER);
            let frames = Frames::Stream(FramedRead::with_capacity(rd, codec, HELLO_BUFFER));
            conn.serve(frames, wr, permit).await;
        }
        Listener::WebSocket => {
            // Boxed: the upgrade's state (its read buffer) would otherwise be part of every
            // TCP sign-in's future too.
            let upgraded = tokio::time::timeout_at(
                deadline,
                Box::pin(crate::websocket::accept(
                    stream,
                    &conn.ctx,
                    peer,
                    conn.stale_certificate.is_some(),
                )),
            )
            .await;
            match upgraded {
                Ok(Some((frames, wr))) => conn.serve(Frames::WebSocket(frames), wr, permit).await,
                Ok(None) => {}
                Err(_) => {
                    tracing::info!(%peer, "no WebSocket upgrade in time; closing");
                    metrics::counter!(m::CONNECTIONS_REJECTED, "reason" => "hello_timeout")
                        .increment(1);
                }
            }
        }
    }
}

/// Which listener a connection came in on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Listener {
    /// The client port: length-prefixed frames on TCP or TLS.
    Clients,
    /// `[server.websocket]`: an HTTP upgrade, then one frame per binary message.
    WebSocket,
}

/// A connection ready for its `hello`, whichever listener it came from.
struct Conn {
    ctx: Ctx,
    peer: std::net::SocketAddr,
    /// When the hello must have arrived.
    deadline: tokio::time::Instant,
    /// Why the client certificate of its resumed TLS session no longer verifies, if it does
    /// not (`tls::Accepted`): its `hello` is refused.
    stale_certificate: Option<String>,
}

impl Conn {
    /// Reads the `hello` from `frames`, then starts the writer on `wr` and hands a
    /// signed-in client to its endpoint (a new one, or the held one a resume takes back).
    async fn serve<W>(self, mut frames: Frames, wr: W, permit: (OwnedSemaphorePermit, AddressSlot))
    where
        W: AsyncWrite + Unpin + Send + 'static,
    {
        let Conn {
            ctx,
            peer,
            deadline,
            stale_certificate,
        } = self;
        let (outbox, mut rx) = {
            let live = ctx.live();
            outbox(live.limits.outbound_queue, live.limits.outbound_queue_bytes)
        };
        let writer = Writer {
            wr,
            permit: ConnectionPermit::open(permit),
        };
        let hello = match tokio::time::timeout_at(
            deadline,
            handshake(&mut frames, &ctx, stale_certificate),
        )
        .await
        {
            Ok(Ok(hello)) => hello,
            Ok(Err(refusal)) => {
                let code = refusal.why.code();
                tracing::info!(%peer, code = code.as_str(), reason = %refusal.why.text(), "connection refused at sign-in");
                metrics::counter!(m::CONNECTIONS_REJECTED, "reason" => code.as_str()).increment(1);
                outbox.push(refusal.why.reply(refusal.rid));
                outbox.close();
                writer.start(rx);
                return;
            }
            Err(_) => {
                tracing::info!(%peer, "no hello in time; closing");
                metrics::counter!(m::CONNECTIONS_REJECTED, "reason" => "hello_timeout")
                    .increment(1);
                outbox.close();
                writer.start(rx);
                return;
            }
        };
        frames.set_max_frame(ctx.settings.server.max_frame as usize);
        // Released: many clients send nothing for a long while after signing in, and the
        // reader's first read then takes the smallest buffer (8 bytes), which the codec grows
        // to the first frame it reads (one read more for that frame). A client that sent more
        // than the hello keeps its bytes (and the larger buffer).
        frames.shrink_read_buffer(0);
        let mut hello = hello;
        let ask = hello.resume.take();
        if let Some(ask) = ask.as_deref()
            && let Some(endpoint) = &ask.endpoint
        {
            let where_held = find_held(&ctx, &hello.user, endpoint);
            if let Held::Elsewhere(node) = &where_held
                && let Some(link) = ctx.link.clone()
            {
                let node = node.clone();
                // Held on another node: carried there through this one (`relay.rs`).
                let ask = RelayAsk {
                    endpoint: endpoint.clone(),
                    user: hello.user.clone(),
                    rid: hello.rid,
                    token: ask.token.clone().unwrap_or_default(),
                    seen: ask.seen,
                    sent: ask.sent,
                };
                writer.relay(link, node, ask, frames);
                return;
            }
            let resume = Resume {
                rid: hello.rid,
                user: hello.user.clone(),
                token: ask.token.clone().unwrap_or_default(),
                seen: ask.seen,
                sent: ask.sent,
                conn: Attach::Socket { frames, peer },
            };
            match take_back(&ctx, where_held, endpoint, resume).await {
                Ok(resumed) => {
                    metrics::counter!(m::RESUMES, "result" => "ok").increment(1);
                    writer.start(resumed);
                }
                Err(why) => {
                    tracing::info!(%peer, user = %hello.user, %endpoint, result = why.label(), "resume refused");
                    metrics::counter!(m::RESUMES, "result" => why.label()).increment(1);
                    outbox.push(Refusal::Resume(why).reply(hello.rid));
                    outbox.close();
                    writer.start(rx);
                }
            }
            return;
        }
        let window = ctx.settings.session.resume_window_ms;
        let resumable = (ask.is_some() && window > 0).then(|| {
            let (token, hash) = new_token();
            let s = &ctx.settings.session;
            let link = outbox.make_resumable(&mut rx, s.max_unseen_frames, s.max_unseen_bytes);
            (token, ResumeState::new(hash, link))
        });
        let writer = writer.task(rx);
        start_endpoint(ctx, hello, outbox, frames, peer, resumable, writer).await;
    }
}

/// A connection's sending side, until its writer starts.
struct Writer<W> {
    wr: W,
    /// The connection's slot under `server.max_connections` (and its address's), held until
    /// the socket is closed.
    permit: ConnectionPermit,
}

impl<W: AsyncWrite + Unpin + Send + 'static> Writer<W> {
    /// Carries a session resumed through this node to `node`, which holds it (`relay.rs`).
    fn relay(self, link: Arc<dyn Link>, node: String, ask: RelayAsk, frames: Frames) {
        let Writer { wr, permit } = self;
        actix_rt::spawn(async move {
            crate::relay::relay_session(link, node, ask, frames, wr).await;
            drop(permit);
        });
    }

    /// Starts the task that writes what `rx`'s outbox queues.
    fn start(self, rx: OutboxReceiver) {
        self.task(rx).spawn();
    }

    /// The writer for what `rx`'s outbox queues, to run beside its endpoint or alone.
    fn task(self, rx: OutboxReceiver) -> WriterTask<W> {
        WriterTask::new(rx, self.wr, self.permit)
    }
}

/// Where a session a `hello` resumes is held.
enum Held {
    Here(actix::Addr<Endpoint>),
    /// On that node of the cluster.
    Elsewhere(String),
    /// Not in the directory: the session ended (or never was the user's); `Some(node)` when
    /// its id names another node, which this node does not know alive.
    Nowhere {
        gone_node: bool,
    },
}

/// Finds the user's endpoint `endpoint`. Only the user's own endpoints are looked at: another
/// user's is "nowhere", as one that never existed.
fn find_held(ctx: &Ctx, user: &str, endpoint: &str) -> Held {
    let entry = ctx
        .directory
        .endpoints_of(user)
        .into_iter()
        .find(|e| &*e.id == endpoint);
    tracing::debug!(%user, %endpoint, found = ?entry.as_ref().map(|e| &e.addr), "looking up a session to resume");
    match entry.map(|e| e.addr) {
        Some(EndpointRef::Local(addr)) => Held::Here(addr),
        Some(EndpointRef::Remote { node, .. }) => Held::Elsewhere(node),
        None => {
            // An endpoint id is `<node>.<run>.e<n>` (`ids.rs`).
            let node = endpoint.rsplitn(3, '.').nth(2);
            let gone_node = match (&ctx.link, node) {
                (Some(link), Some(node)) => node != ctx.node_id && !link.node_alive(node),
                _ => false,
            };
            Held::Nowhere { gone_node }
        }
    }
}

/// Asks the endpoint holding the session here to take `resume`'s connection.
async fn take_back(
    ctx: &Ctx,
    held: Held,
    endpoint: &str,
    resume: Resume,
) -> Result<OutboxReceiver, ResumeRefusal> {
    match held {
        Held::Here(addr) => addr
            .send(resume)
            .await
            .unwrap_or(Err(ResumeRefusal::Unknown)),
        // Only without a cluster link, which cannot happen for a remote entry.
        Held::Elsewhere(_) => Err(ResumeRefusal::NodeGone),
        Held::Nowhere { gone_node: true } => Err(ResumeRefusal::NodeGone),
        Held::Nowhere { .. } if ctx.expired_sessions.expired(endpoint, &resume.token) => {
            Err(ResumeRefusal::WindowOver)
        }
        Held::Nowhere { .. } => Err(ResumeRefusal::Unknown),
    }
}

/// Counts (and logs at debug) a connection refused for its address's limits.
pub(crate) fn refused_for_address(peer: std::net::SocketAddr, why: AddressRefusal) {
    tracing::debug!(%peer, limit = why.label(), "connection refused for its address");
    metrics::counter!(m::CONNECTIONS_REJECTED, "reason" => why.label()).increment(1);
    m::limit_tripped(why.label());
}

/// Why a PROXY header was not taken.
#[derive(Debug, thiserror::Error)]
enum ProxyReadError {
    #[error("{0}")]
    Header(#[from] confab_protocol::proxy::ProxyError),
    #[error("connection ended in the PROXY header: {0}")]
    Io(#[from] std::io::Error),
}

/// Reads exactly the PROXY v2 header, leaving what follows (TLS or the hello) unread.
async fn read_proxy_header(stream: &mut TcpStream) -> Result<ProxyHeader, ProxyReadError> {
    use confab_protocol::proxy;
    use tokio::io::AsyncReadExt;
    let mut fixed = [0u8; proxy::FIXED_LEN];
    stream.read_exact(&mut fixed).await?;
    let mut rest = vec![0u8; proxy::rest_len(&fixed)?];
    stream.read_exact(&mut rest).await?;
    Ok(proxy::parse(&fixed, &rest)?)
}

/// Counts a connection closed for a failed or missing TLS handshake.
fn tls_refused() {
    metrics::counter!(m::TLS_HANDSHAKES, "result" => "failed").increment(1);
    metrics::counter!(m::CONNECTIONS_REJECTED, "reason" => "tls").increment(1);
}

async fn handshake(
    frames: &mut Frames,
    ctx: &Ctx,
    stale_certificate: Option<String>,
) -> Result<Hello, SignInRefused> {
    let frame = match frames.next().await {
        Some(Ok(frame)) => frame,
        Some(Err(FrameError::Empty)) => {
            return Err(SignInRefused::new(None, Refusal::ZeroLengthFrame));
        }
        Some(Err(FrameError::TooLarge { len, max })) => {
            return Err(SignInRefused::new(
                None,
                Refusal::FrameTooLarge { len, max },
            ));
        }
        Some(Err(_)) | None => {
            return Err(SignInRefused::new(None, Refusal::ClosedBeforeHello));
        }
    };
    let (rid, version, user, token, device, resume) = match decode_client(&frame) {
        Ok(ClientMsg::Hello {
            rid,
            version,
            user,
            token,
            device,
            resume,
            ..
        }) => (rid, version, user, token, device, resume),
        Err(e @ DecodeError::BadFrame { .. }) if e.type_name() == Some("hello") => {
            return Err(SignInRefused::new(e.rid(), Refusal::MalformedHello));
        }
        Ok(other) => {
            return Err(SignInRefused::new(other.rid(), Refusal::HelloFirst));
        }
        Err(e) => {
            return Err(SignInRefused::new(e.rid(), Refusal::HelloFirst));
        }
    };
    if version != PROTOCOL_VERSION {
        return Err(SignInRefused::new(rid, Refusal::UnsupportedVersion));
    }
    if device.is_empty() || device.len() > MAX_DEVICE_LEN {
        return Err(SignInRefused::new(rid, Refusal::BadDevice));
    }
    let Ok(user) = normalize_user_uri(&user) else {
        return Err(SignInRefused::new(rid, Refusal::UserNotSipUri));
    };
    if let Some(why) = stale_certificate {
        return Err(SignInRefused::new(
            rid,
            Refusal::StaleClientCertificate(why),
        ));
    }
    if let Err(why) = ctx.verifier.verify(&token, &user) {
        tracing::debug!(%user, %why, "token refused");
        metrics::counter!(m::TOKENS_REFUSED, "check" => why.label()).increment(1);
        return Err(SignInRefused::new(
            rid,
            Refusal::InvalidToken(why.to_string()),
        ));
    }
    if ctx.is_draining() {
        return Err(SignInRefused::new(rid, Refusal::ShuttingDown));
    }
    Ok(Hello {
        rid,
        user,
        device,
        resume,
    })
}

async fn start_endpoint<W>(
    ctx: Ctx,
    hello: Hello,
    outbox: Outbox,
    frames: Frames,
    peer: std::net::SocketAddr,
    resumable: Option<(String, ResumeState)>,
    writer: WriterTask<W>,
) where
    W: AsyncWrite + Unpin + Send + 'static,
{
    // Shared, as the user is: the endpoint, the directory and presence (and a cluster node's
    // maps of its endpoints) each keep the id.
    let id: Arc<str> = Arc::from(ctx.ids.mint('e'));
    let actor_ctx = Context::<Endpoint>::new();
    let user: Arc<str> = Arc::from(hello.user.as_str());
    let entry = EndpointEntry {
        id: id.clone(),
        user: user.clone(),
        device: hello.device.clone(),
        addr: crate::route::EndpointRef::Local(actor_ctx.address()),
    };
    if let Err(e) = ctx
        .directory
        .register(entry, ctx.settings.limits.endpoints_per_user)
    {
        tracing::info!(user = %hello.user, error = %e, "sign-in refused");
        metrics::counter!(m::CONNECTIONS_REJECTED, "reason" => "endpoints_per_user").increment(1);
        outbox.push(Refusal::Directory(e).reply(hello.rid));
        outbox.close();
        writer.spawn();
        return;
    }
    // A shutdown that began after the handshake's check took its list of endpoints before this
    // one registered: refuse it, or it would never hear `shutdown`.
    if ctx.is_draining() {
        ctx.directory.unregister(&hello.user, &id);
        outbox.push(Refusal::ShuttingDown.reply(hello.rid));
        outbox.close();
        writer.spawn();
        return;
    }
    // In a cluster, the welcome means every node can reach the endpoint. Meanwhile what is
    // addressed to it waits in its mailbox, and is handled after the welcome.
    if let Err(e) = ctx.directory.settle().await {
        tracing::warn!(user = %hello.user, error = %e, "sign-in refused");
        metrics::counter!(m::CONNECTIONS_REJECTED, "reason" => "directory_unavailable")
            .increment(1);
        ctx.directory.unregister(&hello.user, &id);
        outbox.push(Refusal::Directory(e).reply(hello.rid));
        outbox.close();
        writer.spawn();
        return;
    }
    metrics::counter!(m::SIGNINS).increment(1);
    // Presence hears of the endpoint before the client hears `welcome`, so a subscription made
    // after the welcome already counts it.
    ctx.presence.send(PresenceMsg::Joined {
        user: user.clone(),
        endpoint: id.clone(),
        device: hello.device.clone(),
    });
    let (token, state) = resumable.unzip();
    outbox.push(ServerMsg::Welcome {
        rid: hello.rid,
        endpoint: id.to_string(),
        node: ctx.node_id.clone(),
        heartbeat_ms: ctx.settings.server.heartbeat_ms,
        max_frame: ctx.settings.server.max_frame,
        resume: token.map(|t| grant(&ctx, t, None)),
    });
    let mut actor_ctx = actor_ctx;
    let stream = actor_ctx.add_stream(crate::endpoint::tagged(frames, 0));
    let mut endpoint = Endpoint::new(ctx, id, user, outbox.clone(), peer);
    if let Some(state) = state {
        endpoint.resumable(state, stream);
    }
    SignedIn::spawn(actor_ctx, endpoint, writer, outbox);
}
