//! The low-level connection to a node: one TCP stream, framed with [`FrameCodec`], driven by a
//! reader task, a writer task and a heartbeat task. It matches replies to requests by `rid` and
//! hands every event (a frame without `rid`) to an [`Events`] stream, in arrival order. It knows
//! nothing of calls or presence; [`crate::Endpoint`] builds those on top.
//!
//! Frames are encoded by the caller, not the writer: a message that cannot be encoded, or that
//! exceeds the node's `max_frame` (which would make the node drop the whole connection), is
//! refused to that caller alone, before anything is queued.

mod heartbeat;
mod pending;
mod reader;
mod tls;
mod writer;

pub use tls::ClientTls;

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use confab_protocol::codec::LEN_PREFIX;
use confab_protocol::hot::encode_client_frame;
use confab_protocol::{ClientMsg, FrameCodec, FrameError, PROTOCOL_VERSION, ServerMsg};
use futures::Stream;
use tokio::net::{TcpStream, ToSocketAddrs};
use tokio::sync::{mpsc, oneshot};
use tokio_util::codec::{BytesCodec, FramedRead, FramedWrite};
use tokio_util::sync::CancellationToken;

use crate::error::ClientError;
use pending::{Completion, Pending};

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
}

/// Knobs of the connection; the defaults suit almost everyone.
#[derive(Debug, Clone)]
pub struct ConnectionOptions {
    /// Largest frame body accepted from the node.
    pub max_frame: usize,
    /// How long to wait for the TCP connect plus the `welcome`.
    pub handshake_timeout: Duration,
    /// Whether to ping every `heartbeat_ms` (and give up on a node silent for three periods).
    /// Only tests that want to watch the node's timeout turn this off.
    pub heartbeat: bool,
    /// TLS to the node (a node with `[tls]`); `None`: plain TCP.
    pub tls: Option<ClientTls>,
}

impl Default for ConnectionOptions {
    fn default() -> Self {
        ConnectionOptions {
            max_frame: DEFAULT_CLIENT_MAX_FRAME,
            handshake_timeout: Duration::from_secs(10),
            heartbeat: true,
            tls: None,
        }
    }
}

/// A handle to one connection to a node; cheap to clone. The connection closes when
/// [`Connection::close`] is called, when the node closes it, or when every handle is dropped.
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

/// The events the node pushes (frames without `rid`), in the order they arrived. The stream
/// ends when the connection does.
#[derive(Debug)]
pub struct Events {
    rx: mpsc::UnboundedReceiver<ServerMsg>,
}

impl Events {
    /// The next event, or `None` once the connection has ended.
    pub async fn recv(&mut self) -> Option<ServerMsg> {
        self.rx.recv().await
    }
}

impl Stream for Events {
    type Item = ServerMsg;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<ServerMsg>> {
        self.rx.poll_recv(cx)
    }
}

/// State shared by the handles and the tasks.
struct Shared {
    // Unbounded on purpose: the endpoint's dispatcher sends acks from the event path, and a
    // bounded queue could stall it while the node, in turn, waits for us to read. Callers bound
    // their own in-flight work (a flow's `send` waits for its delivery).
    out: mpsc::UnboundedSender<Bytes>,
    pending: Pending,
    /// Cancelled to stop every task of the connection.
    cancel: CancellationToken,
    /// Cancelled by the reader once it has delivered its last frame and failed the waiters.
    done: CancellationToken,
    /// The node's `max_frame` for what we send (the default until the `welcome` says).
    max_out_frame: AtomicUsize,
    started: Instant,
    /// Milliseconds after `started` when the node last sent a frame.
    last_heard_ms: AtomicU64,
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
        let stream = tokio::time::timeout_at(deadline, TcpStream::connect(addr))
            .await
            .map_err(|_| ClientError::Timeout("the TCP connection"))??;
        // Frames are small and latency matters more than packet count; the writer batches.
        stream.set_nodelay(true)?;
        let (connection, events) = match &options.tls {
            None => {
                let (r, w) = stream.into_split();
                Self::start(r, w, &options)
            }
            Some(tls) => {
                let peer = stream.peer_addr()?.ip();
                let stream = tokio::time::timeout_at(deadline, tls.connect(stream, peer))
                    .await
                    .map_err(|_| ClientError::Timeout("the TLS handshake"))??;
                let (r, w) = tokio::io::split(stream);
                Self::start(r, w, &options)
            }
        };
        let reply = tokio::time::timeout_at(deadline, connection.request(hello_msg(hello))).await;
        let welcome = match reply {
            Ok(Ok(ServerMsg::Welcome {
                endpoint,
                node,
                heartbeat_ms,
                max_frame,
                ..
            })) => Welcome {
                endpoint,
                node,
                heartbeat_ms,
                max_frame,
            },
            Ok(Ok(other)) => {
                connection.close();
                return Err(ClientError::Protocol(format!(
                    "expected welcome, got {other:?}"
                )));
            }
            Ok(Err(e)) => {
                connection.close();
                return Err(e);
            }
            Err(_) => {
                connection.close();
                return Err(ClientError::Timeout("the welcome"));
            }
        };
        let max_out = usize::try_from(welcome.max_frame).unwrap_or(usize::MAX);
        connection
            .shared
            .max_out_frame
            .store(max_out, Ordering::Relaxed);
        if options.heartbeat && welcome.heartbeat_ms > 0 {
            let period = Duration::from_millis(welcome.heartbeat_ms);
            tokio::spawn(heartbeat::run(Arc::clone(&connection.shared), period));
        }
        tracing::debug!(endpoint = %welcome.endpoint, node = %welcome.node, "signed in");
        Ok((connection, welcome, events))
    }

    fn start<R, W>(read_half: R, write_half: W, options: &ConnectionOptions) -> (Connection, Events)
    where
        R: tokio::io::AsyncRead + Unpin + Send + 'static,
        W: tokio::io::AsyncWrite + Unpin + Send + 'static,
    {
        let (out_tx, out_rx) = mpsc::unbounded_channel();
        let (event_tx, event_rx) = mpsc::unbounded_channel();
        let cancel = CancellationToken::new();
        let shared = Arc::new(Shared {
            out: out_tx,
            pending: Pending::default(),
            cancel: cancel.clone(),
            done: CancellationToken::new(),
            max_out_frame: AtomicUsize::new(confab_protocol::DEFAULT_MAX_FRAME),
            started: Instant::now(),
            last_heard_ms: AtomicU64::new(0),
        });
        tokio::spawn(writer::run(
            FramedWrite::new(write_half, BytesCodec::new()),
            out_rx,
            cancel.clone(),
        ));
        tokio::spawn(reader::run(
            FramedRead::new(read_half, FrameCodec::new(options.max_frame)),
            Arc::clone(&shared),
            event_tx,
        ));
        let connection = Connection {
            shared,
            _guard: Arc::new(CloseOnDrop(cancel)),
        };
        (connection, Events { rx: event_rx })
    }

    /// Sends `msg` as a request with a fresh `rid` and waits for the reply carrying that rid.
    ///
    /// An `error` reply becomes [`ClientError::Server`]; every other reply (`ok`, `pong`,
    /// `call_created`, `message_delivered`, `message_failed`, ...) is returned as is. A
    /// `message` is answered only once its outcome is known, which may take up to the node's
    /// `ack_timeout`. Dropping the future abandons the wait, not the request.
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
    /// [`ClientError::Closed`] and the node sees the endpoint as lost.
    pub fn close(&self) {
        self.shared.cancel.cancel();
    }

    /// Whether the connection has ended or is ending.
    pub fn is_closed(&self) -> bool {
        self.shared.cancel.is_cancelled()
    }

    /// Waits until the connection has ended and every frame received before that has been
    /// handed to the [`Events`] stream or to its request.
    pub async fn closed(&self) {
        self.shared.done.cancelled().await;
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
        let mut buf = BytesMut::with_capacity(128);
        encode_client_frame(msg, &mut buf)?;
        let len = buf.len() - LEN_PREFIX;
        let max = self.max_out_frame.load(Ordering::Relaxed);
        if len > max {
            return Err(FrameError::TooLarge { len, max }.into());
        }
        self.out.send(buf.freeze()).map_err(|_| ClientError::Closed)
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

fn hello_msg(hello: Hello) -> ClientMsg {
    ClientMsg::Hello {
        resume: None,
        rid: None,
        version: PROTOCOL_VERSION,
        user: hello.user,
        token: hello.token,
        device: hello.device,
        agent: hello.agent,
    }
}
