//! A bench connection: raw frames over TCP (or TLS), or over the WebSocket listener, signed
//! in, with reads and batched writes under the bench's control (no client-library machinery
//! between the load and the socket).
//!
//! A connection may be a **resumable session** (docs/protocol.md §3 "Resuming"): it then
//! counts the node's frames and its own, acknowledges with `seen`, keeps what it sent until the
//! node's `seen` covers it, and can drop its socket and resume on a new one (`resume` and
//! `messages --resumable` measure what that costs).

use anyhow::{Context as _, bail};
use bytes::{Buf as _, BytesMut};
use confab_protocol::{ClientMsg, FrameCodec, ResumeAsk, ServerMsg, decode_server};
use futures::{FutureExt, SinkExt, StreamExt};
use std::collections::VecDeque;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;
use tokio::net::{TcpSocket, TcpStream};
use tokio_util::codec::{Framed, FramedParts};

use super::stream::{BenchStream, connect_tls};
use super::ws::WsWire;

/// First size of a connection's read and write buffers.
const CONN_BUFFER: usize = 512;

pub struct Conn {
    wire: Wire,
    pub endpoint: String,
    /// `welcome.node` of the sign-in.
    pub node: String,
    /// The counts and kept frames of a resumable session; `None` (one check per frame) on the
    /// plain sessions every other scenario measures. Boxed: the idle scenario holds 19,000
    /// connections.
    session: Option<Box<Session>>,
}

/// What the frames travel on.
enum Wire {
    /// Length-prefixed frames on the client port.
    Stream(Framed<BenchStream, FrameCodec>),
    /// One frame per binary message on the WebSocket listener.
    WebSocket(Box<WsWire>),
    /// A resumable session between its dropped socket and its resume: frames written now are
    /// only kept (they go out with the resume), and nothing can be read.
    Closed(BytesMut),
}

impl Wire {
    async fn next(&mut self) -> Option<anyhow::Result<BytesMut>> {
        match self {
            Wire::Stream(f) => f.next().await.map(|r| r.map_err(Into::into)),
            Wire::WebSocket(w) => w.next().await,
            Wire::Closed(_) => None,
        }
    }

    fn write_buffer_mut(&mut self) -> &mut BytesMut {
        match self {
            Wire::Stream(f) => f.write_buffer_mut(),
            Wire::WebSocket(w) => w.write_buffer_mut(),
            Wire::Closed(buf) => buf,
        }
    }

    async fn flush(&mut self) -> anyhow::Result<()> {
        match self {
            Wire::Stream(f) => SinkExt::<&ClientMsg>::flush(f).await.context("flush"),
            Wire::WebSocket(w) => w.flush().await,
            Wire::Closed(buf) => {
                // Kept by the session; the resume sends them.
                buf.clear();
                Ok(())
            }
        }
    }
}

/// A resumable session's side of docs/protocol.md §3 "Resuming".
struct Session {
    /// What a resuming `hello` repeats.
    user: String,
    jwt: String,
    device: String,
    /// The resume token of the last `welcome` (each resume spends it and gets a new one).
    token: String,
    /// The number of the last node frame decoded whole (`welcome` = 0).
    read: u64,
    /// Frames and body bytes decoded since the last `seen` went out.
    read_since_seen: u64,
    bytes_since_seen: u64,
    /// A `seen` every this many frames or bytes: a quarter of the welcome's bounds.
    seen_every: u64,
    seen_every_bytes: u64,
    /// A `seen` was written by a read and waits for a flush.
    flush_owed: bool,
    /// The number of the last frame written (`hello` = 0).
    sent: u64,
    /// The frames after the last one the node's `seen` covered, length-prefixed exactly as
    /// written, in order: frame `sent - kept_lens.len() + 1` first. One buffer, not a
    /// buffer per frame: keeping is a copy, and a resume sends it whole.
    kept: BytesMut,
    kept_lens: VecDeque<usize>,
    /// Frames written since the last `ping`; a `ping` brings the node's `seen`, which is what
    /// lets kept frames go, so one goes every `seen_every` frames.
    since_ping: u64,
}

impl Session {
    /// The number of the oldest kept frame, or `sent + 1` when none is kept.
    fn first_kept(&self) -> u64 {
        self.sent + 1 - self.kept_lens.len() as u64
    }

    /// The node read our frames up to `upto`: they need not be kept.
    fn acked(&mut self, upto: u64) {
        while !self.kept_lens.is_empty() && self.first_kept() <= upto {
            if let Some(len) = self.kept_lens.pop_front() {
                self.kept.advance(len);
            }
        }
    }
}

/// What became of one resume.
pub struct Resumed {
    /// The node's `welcome.node`: the node that holds the session (not the one reached, when
    /// relayed).
    pub node: String,
    /// Frames of ours the node had not read, sent again.
    pub resent: usize,
}

/// Where and how to sign in.
#[derive(Clone)]
pub struct Target {
    pub server: SocketAddr,
    pub secret: String,
    /// TLS to a node with `[tls]` (`--ca`); `None`: plain TCP.
    pub tls: Option<std::sync::Arc<rustls::ClientConfig>>,
    /// `server` is a WebSocket listener: upgrade on this path first (`--websocket`).
    pub websocket: Option<String>,
}

impl Conn {
    /// Connects (from `source` when given) and signs in as `user` on `device`.
    pub async fn sign_in(
        t: &Target,
        user: &str,
        device: &str,
        source: Option<IpAddr>,
    ) -> anyhow::Result<Conn> {
        let token = mint(t, user);
        Conn::sign_in_with(t, user, &token, device, source).await
    }

    /// [`Conn::sign_in`] with a token minted beforehand.
    pub async fn sign_in_with(
        t: &Target,
        user: &str,
        token: &str,
        device: &str,
        source: Option<IpAddr>,
    ) -> anyhow::Result<Conn> {
        Conn::hello(t, user, token, device, source, false).await
    }

    /// Signs in as `user` on `device` asking for a resumable session (`hello.resume:{}`).
    pub async fn sign_in_resumable(t: &Target, user: &str, device: &str) -> anyhow::Result<Conn> {
        let token = mint(t, user);
        Conn::hello(t, user, &token, device, None, true).await
    }

    async fn hello(
        t: &Target,
        user: &str,
        token: &str,
        device: &str,
        source: Option<IpAddr>,
        resumable: bool,
    ) -> anyhow::Result<Conn> {
        let mut conn = Conn {
            wire: connect(t, source).await?,
            endpoint: String::new(),
            node: String::new(),
            session: None,
        };
        conn.send(&ClientMsg::Hello {
            resume: resumable.then(Box::default),
            rid: Some(0),
            version: 1,
            user: user.to_owned(),
            token: token.to_owned(),
            device: device.to_owned(),
            agent: Some("confab-bench".into()),
        })
        .await?;
        let grant = match conn.recv().await? {
            ServerMsg::Welcome {
                endpoint,
                node,
                resume,
                ..
            } => {
                conn.endpoint = endpoint;
                conn.node = node;
                resume
            }
            other => bail!("sign-in of {user} refused: {other:?}"),
        };
        if resumable {
            let Some(grant) = grant else {
                bail!("the node does not hold sessions (session.resume_window_ms = 0)");
            };
            // The hello was our frame 0 and the welcome the node's: counting starts here.
            conn.session = Some(Box::new(Session {
                user: user.to_owned(),
                jwt: token.to_owned(),
                device: device.to_owned(),
                token: grant.token,
                read: 0,
                read_since_seen: 0,
                bytes_since_seen: 0,
                seen_every: (u64::from(grant.max_unseen_frames) / 4).max(1),
                seen_every_bytes: (grant.max_unseen_bytes / 4).max(1),
                flush_owed: false,
                sent: 0,
                kept: BytesMut::new(),
                kept_lens: VecDeque::new(),
                since_ping: 0,
            }));
        }
        Ok(conn)
    }

    /// Closes the socket at once, without `bye` (the node holds a resumable session). Frames
    /// written until [`Conn::resume`] are kept and go out with it.
    pub fn drop_link(&mut self) {
        self.wire = Wire::Closed(BytesMut::new());
    }

    /// Connects to `t` and resumes the session (docs/protocol.md §3 "Resuming"): the resuming
    /// `hello` and its `welcome` are not counted; then the frames the node had not read go
    /// again, in order, and counting carries on. The node's frames we had not read follow on
    /// the new connection by themselves.
    pub async fn resume(&mut self, t: &Target) -> anyhow::Result<Resumed> {
        let Some(s) = self.session.as_mut() else {
            bail!("not a resumable session");
        };
        let mut wire = connect(t, None).await?;
        let hello = ClientMsg::Hello {
            rid: Some(0),
            version: 1,
            user: s.user.clone(),
            token: s.jwt.clone(),
            device: s.device.clone(),
            agent: Some("confab-bench".into()),
            resume: Some(Box::new(ResumeAsk {
                endpoint: Some(self.endpoint.clone()),
                token: Some(s.token.clone()),
                seen: s.read,
                sent: s.sent,
            })),
        };
        confab_protocol::hot::encode_client_frame(&hello, wire.write_buffer_mut())
            .context("encode")?;
        wire.flush().await?;
        let answer = match wire.next().await {
            Some(Ok(frame)) => decode_server(&frame)?,
            Some(Err(e)) => return Err(e),
            None => bail!("connection closed by the node before it answered the resume"),
        };
        let (node, grant) = match answer {
            ServerMsg::Welcome {
                node,
                endpoint,
                resume: Some(grant),
                ..
            } if endpoint == self.endpoint => (node, grant),
            ServerMsg::Error { code, message, .. } => {
                bail!("resume refused: {} \"{message}\"", code.as_str())
            }
            other => bail!("a resume answered with {other:?}"),
        };
        let Some(node_read) = grant.seen else {
            bail!("a resumed welcome without resume.seen");
        };
        if node_read > s.sent {
            bail!(
                "the node read up to our frame {node_read}, but we sent {}",
                s.sent
            );
        }
        if node_read + 1 < s.first_kept() {
            bail!(
                "the node read up to our frame {node_read}, but {} is the oldest kept",
                s.first_kept()
            );
        }
        s.token = grant.token;
        s.acked(node_read);
        let resent = s.kept_lens.len();
        // Every kept frame after what the node read, as written the first time: their numbers
        // are where they were.
        wire.write_buffer_mut().extend_from_slice(&s.kept);
        wire.flush().await?;
        self.wire = wire;
        Ok(Resumed { node, resent })
    }

    /// Writes and flushes one message.
    pub async fn send(&mut self, msg: &ClientMsg) -> anyhow::Result<()> {
        self.feed(msg).await?;
        self.flush().await
    }

    /// Queues a message; it goes out with the next [`Conn::flush`]. Encoded straight into the
    /// write buffer by the protocol's hand-written path for `message` and `message_ack` (serde
    /// for the rest); every scenario flushes after each batch, so the buffer stays small. On a
    /// resumable session the frame is counted and kept, and every `seen_every` frames a `seen`
    /// and a `ping` follow it (the node answers the ping with its `seen`).
    pub async fn feed(&mut self, msg: &ClientMsg) -> anyhow::Result<()> {
        let Some(s) = self.session.as_deref() else {
            return self.write(msg);
        };
        let ping = matches!(msg, ClientMsg::Ping { .. });
        let upto = s.read;
        if ping {
            // The contract asks for a `seen` with every ping.
            self.write_seen(upto)?;
        }
        self.write(msg)?;
        if !ping
            && self
                .session
                .as_deref()
                .is_some_and(|s| s.since_ping >= s.seen_every)
        {
            // A ping (without rid: the scenarios skip its pong) brings the node's `seen`.
            self.write_seen(upto)?;
            self.write(&ClientMsg::Ping { rid: None })?;
            if let Some(s) = self.session.as_deref_mut() {
                s.since_ping = 0;
            }
        } else if ping && let Some(s) = self.session.as_deref_mut() {
            s.since_ping = 0;
        }
        Ok(())
    }

    /// Encodes `msg` into the write buffer; on a resumable session counts and keeps it.
    fn write(&mut self, msg: &ClientMsg) -> anyhow::Result<()> {
        let buf = self.wire.write_buffer_mut();
        let start = buf.len();
        confab_protocol::hot::encode_client_frame(msg, buf).context("encode")?;
        if let Some(s) = self.session.as_deref_mut() {
            s.sent += 1;
            s.since_ping += 1;
            s.kept.extend_from_slice(&buf[start..]);
            s.kept_lens.push_back(buf.len() - start);
        }
        Ok(())
    }

    fn write_seen(&mut self, upto: u64) -> anyhow::Result<()> {
        self.write(&ClientMsg::Seen { upto })?;
        if let Some(s) = self.session.as_deref_mut() {
            s.read_since_seen = 0;
            s.bytes_since_seen = 0;
        }
        Ok(())
    }

    pub async fn flush(&mut self) -> anyhow::Result<()> {
        self.wire.flush().await?;
        if let Some(s) = self.session.as_deref_mut() {
            s.flush_owed = false;
        }
        Ok(())
    }

    /// On a resumable session: counts a node frame just decoded whole, takes in the node's
    /// `seen`, and writes our `seen` when one is due (it goes with the next flush, at the
    /// latest before the next read waits). `false`: the frame was the node's `seen`, which
    /// the scenarios never see.
    fn counted(&mut self, frame: &[u8]) -> anyhow::Result<bool> {
        let Some(s) = self.session.as_deref_mut() else {
            return Ok(true);
        };
        s.read += 1;
        s.read_since_seen += 1;
        s.bytes_since_seen += frame.len() as u64;
        let mine = confab_protocol::peek::peek_type(frame) != Some("seen");
        if !mine && let ServerMsg::Seen { upto } = decode_server(frame)? {
            s.acked(upto);
        }
        if s.read_since_seen >= s.seen_every || s.bytes_since_seen >= s.seen_every_bytes {
            let upto = s.read;
            s.flush_owed = true;
            self.write_seen(upto)?;
        }
        Ok(mine)
    }

    /// The next frame for the scenario, counted.
    async fn frame(&mut self) -> anyhow::Result<BytesMut> {
        loop {
            if self.session.as_ref().is_some_and(|s| s.flush_owed) {
                self.flush().await?;
            }
            let frame = match self.wire.next().await {
                Some(Ok(frame)) => frame,
                Some(Err(e)) => return Err(e),
                None => bail!("connection closed by the node"),
            };
            if self.counted(&frame)? {
                return Ok(frame);
            }
        }
    }

    /// The next message from the node.
    pub async fn recv(&mut self) -> anyhow::Result<ServerMsg> {
        let frame = self.frame().await?;
        Ok(decode_server(&frame)?)
    }

    /// The next message from the node whose `type` is one of `types`; the others are skipped
    /// without being decoded (the load generator should spend its cores on load, not on
    /// decoding frames it ignores).
    pub async fn recv_only(&mut self, types: &[&str]) -> anyhow::Result<ServerMsg> {
        loop {
            let frame = self.frame().await?;
            if confab_protocol::peek::peek_type(&frame).is_some_and(|t| types.contains(&t)) {
                return Ok(decode_server(&frame)?);
            }
        }
    }

    /// A message that is already buffered or readable without waiting, if any. A `seen` it
    /// makes due goes with the caller's next flush.
    pub fn try_recv(&mut self) -> Option<anyhow::Result<ServerMsg>> {
        loop {
            let frame = match self.wire.next().now_or_never()? {
                Some(Ok(frame)) => frame,
                Some(Err(e)) => return Some(Err(e)),
                None => return Some(Err(anyhow::anyhow!("connection closed by the node"))),
            };
            match self.counted(&frame) {
                Ok(true) => return Some(decode_server(&frame).map_err(Into::into)),
                Ok(false) => {}
                Err(e) => return Some(Err(e)),
            }
        }
    }

    /// Reads until `pred` matches, within `timeout`.
    pub async fn recv_until(
        &mut self,
        timeout: Duration,
        pred: impl Fn(&ServerMsg) -> bool,
    ) -> anyhow::Result<ServerMsg> {
        self.recv_until_only(timeout, &[], pred).await
    }

    /// [`Conn::recv_until`] looking only at messages whose `type` is in `types` (all when empty).
    pub async fn recv_until_only(
        &mut self,
        timeout: Duration,
        types: &[&str],
        pred: impl Fn(&ServerMsg) -> bool,
    ) -> anyhow::Result<ServerMsg> {
        tokio::time::timeout(timeout, async {
            loop {
                let m = if types.is_empty() {
                    self.recv().await?
                } else {
                    self.recv_only(types).await?
                };
                if pred(&m) {
                    return Ok(m);
                }
            }
        })
        .await
        .context("timed out waiting for the node")?
    }
}

/// A new connection to `t` (from `source` when given), ready for the `hello`.
async fn connect(t: &Target, source: Option<IpAddr>) -> anyhow::Result<Wire> {
    let stream = match source {
        Some(ip) => {
            let sock = if t.server.is_ipv4() {
                TcpSocket::new_v4()?
            } else {
                TcpSocket::new_v6()?
            };
            bind_address_only(&sock);
            sock.bind(SocketAddr::new(ip, 0))?;
            sock.connect(t.server).await?
        }
        None => TcpStream::connect(t.server).await?,
    };
    stream.set_nodelay(true)?;
    let stream = match &t.tls {
        None => tokio_util::either::Either::Left(stream),
        Some(config) => connect_tls(config, stream, t.server.ip()).await?,
    };
    Ok(match &t.websocket {
        Some(path) => Wire::WebSocket(Box::new(WsWire::upgrade(stream, t.server, path).await?)),
        None => {
            // Small buffers that grow on demand: tokio-util's 8 KiB defaults, times 19,000
            // idle connections, made page faults a tenth of the bench's time in the `idle`
            // scenario.
            let mut parts = FramedParts::new::<&ClientMsg>(stream, FrameCodec::new(1 << 20));
            parts.read_buf = BytesMut::with_capacity(CONN_BUFFER);
            parts.write_buf = BytesMut::with_capacity(CONN_BUFFER);
            Wire::Stream(Framed::from_parts(parts))
        }
    })
}

/// A token for `user`, valid for an hour.
pub fn mint(t: &Target, user: &str) -> String {
    confab_client::token::mint(user, &t.secret, Duration::from_secs(3600))
}

/// Lets the kernel pick the source port at connect time rather than at bind time. Binding to
/// port 0 searches the whole ephemeral range for a port free on that address, which at 19,000
/// connections took most of the bench's CPU (a profile showed 70% of its samples in the
/// kernel's bind-conflict check); deferred, any port whose 4-tuple is unique will do.
#[cfg(target_os = "linux")]
fn bind_address_only(sock: &TcpSocket) {
    use nix::sys::socket::{setsockopt, sockopt::IpBindAddressNoPort};
    // Only an optimisation: without it, bind still works, just more slowly.
    let _ = setsockopt(sock, IpBindAddressNoPort, &true);
}

#[cfg(not(target_os = "linux"))]
fn bind_address_only(_: &TcpSocket) {}
