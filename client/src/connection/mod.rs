//! The low-level connection to a node: links (TCP or TLS, framed with
//! [`confab_protocol::FrameCodec`]), each driven by a reader, a writer and a heartbeat task,
//! and a supervisor that ends the connection when its link ends, or on a resumable session
//! reconnects and resumes it (docs/protocol.md §3 "Resuming"). It matches replies to requests
//! by `rid` and hands every event (a frame without `rid`) to an [`Events`] stream, in arrival
//! order, with the link's own news ([`LinkEvent`]) in that order too. It knows nothing of
//! calls or presence; [`crate::Endpoint`] builds those on top.
//!
//! Frames are encoded by the caller, not the writer: a message that cannot be encoded, or that
//! exceeds the node's `max_frame` (which would make the node drop the whole connection), is
//! refused to that caller alone, before anything is queued.

mod dial;
mod heartbeat;
mod outbound;
mod pending;
mod reader;
mod received;
mod reconnect;
mod supervisor;
mod tls;
mod writer;

pub use reconnect::{LinkEvent, Reconnect};
pub use tls::ClientTls;

use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::BytesMut;
use confab_protocol::codec::LEN_PREFIX;
use confab_protocol::hot::encode_client_frame;
use confab_protocol::{ClientMsg, FrameError, PROTOCOL_VERSION, ResumeAsk, ServerMsg};
use futures::Stream;
use tokio::net::ToSocketAddrs;
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use crate::error::ClientError;
use crate::sync::lock;
use dial::Dialer;
use outbound::Outbound;
use pending::{Completion, Pending};
use received::Received;

/// Largest frame this client accepts from the node by default. Larger than the node's own
/// default `max_frame` on purpose: a `message_received` wraps a body the node accepted within
/// its limit in extra fields (`from`, `call`, ...), so it can legitimately exceed that limit.
pub const DEFAULT_CLIENT_MAX_FRAME: usize = 1024 * 1024;

/// The `hello` parameters: who signs in, with which token, from which device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hello {
    /// The user's SIP URI, e.g. `sip:alice@example.com`.
    pub user: String,
    /// A JWT (HS256) whose `sub` is `user`; see [`crate::token::mint`].
    pub token: String,
    /// A name for this device, shown to the user's other endpoints.
    pub device: String,
    /// Optional free-form client name and version.
    pub agent: Option<String>,
}

impl Hello {
    /// A `hello` for `user` on `device`, with this library as the agent.
    pub fn new(
        user: impl Into<String>,
        token: impl Into<String>,
        device: impl Into<String>,
    ) -> Self {
        Hello {
            user: user.into(),
            token: token.into(),
            device: device.into(),
            agent: Some(concat!("confab-client/", env!("CARGO_PKG_VERSION")).to_owned()),
        }
    }
}

/// What the node said in its `welcome`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Welcome {
    /// The node-assigned id of this endpoint.
    pub endpoint: String,
    /// The id of the node that holds this connection.
    pub node: String,
    /// How often this client must ping; the node drops it after three silent periods.
    pub heartbeat_ms: u64,
    /// The largest frame body the node accepts from this client.
    pub max_frame: u32,
    /// On a resumable session, how long the node holds it after the link drops; `None` when
    /// the session is not resumable (not asked for, or the node has resumes off).
    pub resume_window_ms: Option<u64>,
}

/// Knobs of the connection; the defaults suit almost everyone.
#[derive(Debug, Clone)]
pub struct ConnectionOptions {
    /// Largest frame body accepted from the node.
    pub max_frame: usize,
    /// How long to wait for the TCP connect plus the `welcome` (each resume attempt too).
    pub handshake_timeout: Duration,
    /// Whether to ping every `heartbeat_ms` (and give up on a node silent for three periods).
    /// Only tests that want to watch the node's timeout turn this off.
    pub heartbeat: bool,
    /// TLS to the node (a node with `[tls]`); `None`: plain TCP.
    pub tls: Option<ClientTls>,
    /// Ask for a resumable session and resume it when the link drops (see [`Reconnect`]);
    /// `None` (the default): a dropped link ends the connection.
    pub resume: Option<Reconnect>,
}

impl Default for ConnectionOptions {
    fn default() -> Self {
        ConnectionOptions {
            max_frame: DEFAULT_CLIENT_MAX_FRAME,
            handshake_timeout: Duration::from_secs(10),
            heartbeat: true,
            tls: None,
            resume: None,
        }
    }
}

/// A handle to one connection to a node; cheap to clone. The connection closes when
/// [`Connection::close`] is called, when the node closes it (or, on a resumable session, when
/// it cannot be resumed), or when every handle is dropped.
#[derive(Clone)]
pub struct Connection {
    shared: Arc<Shared>,
    // Only user handles hold the guard (the tasks hold `shared`), so dropping the last handle
    // closes the connection instead of leaking its tasks.
    _guard: Arc<CloseOnDrop>,
}

impl std::fmt::Debug for Connection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Connection")
            .field("closed", &self.is_closed())
            .finish_non_exhaustive()
    }
}

/// One item of the [`Events`] stream: an event the node pushed, or (on a resumable session)
/// news of the link, in order with them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Inbound {
    /// A frame without `rid` from the node.
    Frame(ServerMsg),
    /// The link dropped, was resumed, or the session was lost.
    Link(LinkEvent),
}

/// The events the node pushes (frames without `rid`), in the order they arrived. The stream
/// ends when the connection does.
#[derive(Debug)]
pub struct Events {
    rx: mpsc::UnboundedReceiver<Inbound>,
}

impl Events {
    /// The next event, or `None` once the connection has ended. Link news is skipped; see
    /// [`Events::recv_inbound`].
    pub async fn recv(&mut self) -> Option<ServerMsg> {
        loop {
            if let Inbound::Frame(msg) = self.rx.recv().await? {
                return Some(msg);
            }
        }
    }

    /// The next event or link news, or `None` once the connection has ended.
    pub async fn recv_inbound(&mut self) -> Option<Inbound> {
        self.rx.recv().await
    }
}

impl Stream for Events {
    type Item = ServerMsg;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<ServerMsg>> {
        loop {
            match self.rx.poll_recv(cx) {
                Poll::Ready(Some(Inbound::Link(_))) => {}
                Poll::Ready(Some(Inbound::Frame(msg))) => return Poll::Ready(Some(msg)),
                Poll::Ready(None) => return Poll::Ready(None),
                Poll::Pending => return Poll::Pending,
            }
        }
    }
}

/// State shared by the handles and the tasks; it outlives every link of a resumable session.
struct Shared {
    // The send path never waits: the endpoint's dispatcher sends acks from the event path,
    // and a bounded queue could stall it while the node, in turn, waits for us to read.
    // Callers bound their own in-flight work (a flow's `send` waits for its delivery).
    outbound: Outbound,
    received: Received,
    pending: Pending,
    /// Cancelled to stop every task of the connection, for good.
    cancel: CancellationToken,
    /// Cancelled once the connection has ended and every frame was delivered.
    done: CancellationToken,
    /// The node's `max_frame` for what we send (the default until the `welcome` says).
    max_out_frame: AtomicUsize,
    started: Instant,
    /// Milliseconds after `started` when the node last sent a frame.
    last_heard_ms: AtomicU64,
    /// The rid of our `bye`, once sent: its `ok` means the link's end is the session's end.
    bye_rid: Mutex<Option<u32>>,
    /// The node is ending the session (`bye` answered, `kicked`, `shutdown`): a link that
    /// drops now ends the connection, it is not resumed.
    ending: AtomicBool,
    /// Why the current link failed, as first noticed (read, write or heartbeat).
    link_error: Mutex<Option<String>>,
}

struct CloseOnDrop(CancellationToken);

impl Drop for CloseOnDrop {
    fn drop(&mut self) {
        self.0.cancel();
    }
}

/// A hook run on the reader task with a request's reply, before any later frame is read.
type ReplyHook = Box<dyn FnOnce(&ServerMsg) + Send>;

impl Connection {
    /// Connects to `addr`, says `hello` and waits for the `welcome`.
    ///
    /// An `error` reply (`unauthorized`, `unsupported_version`, ...) is returned as
    /// [`ClientError::Server`]; the node closes the connection after it.
    pub async fn connect(
        addr: impl ToSocketAddrs,
        hello: Hello,
    ) -> Result<(Connection, Welcome, Events), ClientError> {
        Self::connect_with(addr, hello, ConnectionOptions::default()).await
    }

    /// [`Connection::connect`] with explicit options.
    pub async fn connect_with(
        addr: impl ToSocketAddrs,
        hello: Hello,
        options: ConnectionOptions,
    ) -> Result<(Connection, Welcome, Events), ClientError> {
        let deadline = tokio::time::Instant::now() + options.handshake_timeout;
        let dialer = tokio::time::timeout_at(
            deadline,
            Dialer::resolve(addr, options.tls.clone(), options.max_frame),
        )
        .await
        .map_err(|_| ClientError::Timeout("the TCP connection"))??;
        let mut link = dialer.open(deadline).await?;
        let ask = options.resume.as_ref().map(|_| Box::default());
        let reply = link.handshake(&hello_msg(&hello, ask), deadline).await?;
        let (welcome, grant) = match reply {
            ServerMsg::Welcome {
                endpoint,
                node,
                heartbeat_ms,
                max_frame,
                resume,
                ..
            } => {
                let welcome = Welcome {
                    endpoint,
                    node,
                    heartbeat_ms,
                    max_frame,
                    resume_window_ms: resume.as_ref().map(|g| g.window_ms),
                };
                (welcome, resume)
            }
            ServerMsg::Error { code, message, .. } => {
                return Err(ClientError::Server { code, message });
            }
            other => {
                return Err(ClientError::Protocol(format!(
                    "expected welcome, got {other:?}"
                )));
            }
        };
        let cancel = CancellationToken::new();
        let shared = Arc::new(Shared {
            outbound: Outbound::default(),
            received: Received::default(),
            pending: Pending::default(),
            cancel: cancel.clone(),
            done: CancellationToken::new(),
            max_out_frame: AtomicUsize::new(confab_protocol::DEFAULT_MAX_FRAME),
            started: Instant::now(),
            last_heard_ms: AtomicU64::new(0),
            bye_rid: Mutex::new(None),
            ending: AtomicBool::new(false),
            link_error: Mutex::new(None),
        });
        shared.set_max_out_frame(welcome.max_frame);
        let (event_tx, event_rx) = mpsc::unbounded_channel();
        let heartbeat = options
            .heartbeat
            .then_some(welcome.heartbeat_ms)
            .filter(|&ms| ms > 0)
            .map(Duration::from_millis);
        let resume = match (options.resume, grant) {
            (Some(policy), Some(grant)) => {
                // The hello was frame 0 of ours and the welcome frame 0 of the node's.
                shared.outbound.start_counting();
                shared
                    .received
                    .acknowledge_every(grant.max_unseen_frames, grant.max_unseen_bytes);
                Some(supervisor::Resumable {
                    policy,
                    dialer,
                    hello,
                    endpoint: welcome.endpoint.clone(),
                    grant: *grant,
                    handshake_timeout: options.handshake_timeout,
                    heartbeat: options.heartbeat,
                })
            }
            (Some(_), None) => {
                tracing::info!("the node does not hold sessions; a dropped link will end this one");
                None
            }
            (None, _) => None,
        };
        let (out_tx, out_rx) = mpsc::unbounded_channel();
        shared.outbound.attach(out_tx);
        let first = supervisor::start_link(&shared, link, out_rx, heartbeat, &event_tx);
        tokio::spawn(supervisor::run(
            Arc::clone(&shared),
            first,
            resume,
            event_tx,
        ));
        tracing::debug!(endpoint = %welcome.endpoint, node = %welcome.node, "signed in");
        let connection = Connection {
            shared,
            _guard: Arc::new(CloseOnDrop(cancel)),
        };
        Ok((connection, welcome, Events { rx: event_rx }))
    }

    /// Sends `msg` as a request with a fresh `rid` and waits for the reply carrying that rid.
    ///
    /// An `error` reply becomes [`ClientError::Server`]; every other reply (`ok`, `pong`,
    /// `call_created`, `message_delivered`, `message_failed`, ...) is returned as is. A
    /// `message` is answered only once its outcome is known, which may take up to the node's
    /// `ack_timeout`. Dropping the future abandons the wait, not the request. On a resumable
    /// session a request outlives a dropped link: its reply comes after the resume.
    pub async fn request(&self, msg: ClientMsg) -> Result<ServerMsg, ClientError> {
        self.shared.request(msg, None).await
    }

    /// Like [`Connection::request`], but first runs `on_reply` on the reader task with the
    /// reply, before any later frame is read. Use it to register state that the events caused
    /// by the request will need: the node sends those right after the reply.
    pub async fn request_then(
        &self,
        msg: ClientMsg,
        on_reply: impl FnOnce(&ServerMsg) + Send + 'static,
    ) -> Result<ServerMsg, ClientError> {
        self.shared.request(msg, Some(Box::new(on_reply))).await
    }

    /// Sends `msg` without waiting for anything (`message_ack`, `composing`, or a request whose
    /// reply does not matter: it will be dropped). Returns once the frame is queued.
    pub fn send(&self, msg: ClientMsg) -> Result<(), ClientError> {
        self.shared.send(&msg)
    }

    /// Closes the connection at once, without `bye`: outstanding requests fail with
    /// [`ClientError::Closed`] and the node sees the endpoint as lost (a resumable session is
    /// held by the node until its window passes).
    pub fn close(&self) {
        self.shared.cancel.cancel();
    }

    /// Whether the connection has ended or is ending (not while a resumable session is only
    /// reconnecting).
    pub fn is_closed(&self) -> bool {
        self.shared.cancel.is_cancelled()
    }

    /// Waits until the connection has ended and every frame received before that has been
    /// handed to the [`Events`] stream or to its request.
    pub async fn closed(&self) {
        self.shared.done.cancelled().await;
    }

    /// Frames this client sent that the node has not acknowledged yet (0 on a session that is
    /// not resumable): what a resume would send again.
    pub fn unacknowledged(&self) -> usize {
        self.shared.outbound.kept()
    }
}

impl Shared {
    async fn request(
        &self,
        mut msg: ClientMsg,
        hook: Option<ReplyHook>,
    ) -> Result<ServerMsg, ClientError> {
        if msg.rid_mut().is_none() {
            return Err(ClientError::NotARequest(msg.type_name()));
        }
        let (tx, rx) = oneshot::channel();
        let completion: Completion = Box::new(move |result| {
            if let (Some(hook), Ok(reply)) = (hook, &result) {
                hook(reply);
            }
            // The requester may have stopped waiting; that is its right.
            let _ = tx.send(result);
        });
        let rid = self
            .pending
            .register(completion)
            .ok_or(ClientError::Closed)?;
        if let Some(slot) = msg.rid_mut() {
            *slot = Some(rid);
        }
        if matches!(msg, ClientMsg::Bye { .. }) {
            *lock(&self.bye_rid) = Some(rid);
        }
        if let Err(e) = self.send(&msg) {
            self.pending.forget(rid);
            return Err(e);
        }
        match rx.await.map_err(|_| ClientError::Closed)?? {
            ServerMsg::Error { code, message, .. } => Err(ClientError::Server { code, message }),
            reply => Ok(reply),
        }
    }

    fn send(&self, msg: &ClientMsg) -> Result<(), ClientError> {
        if self.cancel.is_cancelled() {
            return Err(ClientError::Closed);
        }
        if matches!(msg, ClientMsg::Ping { .. }) && self.outbound.counting() {
            // The contract asks for a `seen` with every ping, the application's too.
            self.received.seen_sent();
            self.send(&ClientMsg::Seen {
                upto: self.received.last(),
            })?;
            self.outbound.pinged();
        }
        let mut buf = BytesMut::with_capacity(128);
        encode_client_frame(msg, &mut buf)?;
        let len = buf.len() - LEN_PREFIX;
        let max = self.max_out_frame.load(Ordering::Relaxed);
        if len > max {
            return Err(FrameError::TooLarge { len, max }.into());
        }
        let ping_due = self
            .outbound
            .send(buf.freeze())
            .map_err(|_| ClientError::Closed)?;
        if ping_due {
            // Many frames kept: a ping brings the node's `seen`, which lets them go.
            self.ping()?;
        }
        Ok(())
    }

    /// The heartbeat's `ping` (no rid: only its arrival counts); on a resumable session `send`
    /// puts a `seen` for every node frame read before it.
    fn ping(&self) -> Result<(), ClientError> {
        self.send(&ClientMsg::Ping { rid: None })
    }

    /// Called by the reader after each frame: a `seen` when enough frames were read.
    fn acknowledge_if_due(&self) {
        if self.received.seen_due() {
            let seen = ClientMsg::Seen {
                upto: self.received.last(),
            };
            if let Err(e) = self.send(&seen) {
                tracing::debug!(error = %e, "could not acknowledge the node's frames");
            }
        }
    }

    /// A reply arrived: the `ok` to our `bye` means the node is ending the session.
    fn note_reply(&self, rid: u32, reply: &ServerMsg) {
        if matches!(reply, ServerMsg::Ok { .. }) && *lock(&self.bye_rid) == Some(rid) {
            self.session_ending();
        }
    }

    /// Notes why the link failed; the first reason noticed is the one reported.
    fn link_failed(&self, why: String) {
        lock(&self.link_error).get_or_insert(why);
    }

    fn take_link_error(&self) -> Option<String> {
        lock(&self.link_error).take()
    }

    fn set_max_out_frame(&self, max_frame: u32) {
        let max = usize::try_from(max_frame).unwrap_or(usize::MAX);
        self.max_out_frame.store(max, Ordering::Relaxed);
    }

    fn session_ending(&self) {
        self.ending.store(true, Ordering::Relaxed);
    }

    fn is_ending(&self) -> bool {
        self.ending.load(Ordering::Relaxed)
    }

    /// Notes that the node just sent something (for the heartbeat's liveness check).
    fn heard(&self) {
        let ms = u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.last_heard_ms.store(ms, Ordering::Relaxed);
    }

    /// How long the node has been silent.
    fn silence(&self) -> Duration {
        let last = Duration::from_millis(self.last_heard_ms.load(Ordering::Relaxed));
        self.started.elapsed().saturating_sub(last)
    }
}

/// The `hello`; `resume` asks for a resumable session (`{}`) or takes one back.
fn hello_msg(hello: &Hello, resume: Option<Box<ResumeAsk>>) -> ClientMsg {
    ClientMsg::Hello {
        resume,
        // The reply is read by the handshake, never matched; any rid does.
        rid: Some(0),
        version: PROTOCOL_VERSION,
        user: hello.user.clone(),
        token: hello.token.clone(),
        device: hello.device.clone(),
        agent: hello.agent.clone(),
    }
}
