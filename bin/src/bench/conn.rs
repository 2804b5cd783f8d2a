//! A bench connection: raw frames over TCP (or TLS), or over the WebSocket listener, signed
//! in, with reads and batched writes under the bench's control (no client-library machinery
//! between the load and the socket).

use anyhow::{Context as _, bail};
use bytes::BytesMut;
use confab_protocol::{ClientMsg, FrameCodec, ServerMsg, decode_server};
use futures::{FutureExt, SinkExt, StreamExt};
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
}

/// What the frames travel on.
enum Wire {
    /// Length-prefixed frames on the client port.
    Stream(Framed<BenchStream, FrameCodec>),
    /// One frame per binary message on the WebSocket listener.
    WebSocket(Box<WsWire>),
}

impl Wire {
    async fn next(&mut self) -> Option<anyhow::Result<BytesMut>> {
        match self {
            Wire::Stream(f) => f.next().await.map(|r| r.map_err(Into::into)),
            Wire::WebSocket(w) => w.next().await,
        }
    }
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
        let wire = match &t.websocket {
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
        };
        let mut conn = Conn {
            wire,
            endpoint: String::new(),
        };
        conn.send(&ClientMsg::Hello {
            resume: None,
            rid: Some(0),
            version: 1,
            user: user.to_owned(),
            token: token.to_owned(),
            device: device.to_owned(),
            agent: Some("confab-bench".into()),
        })
        .await?;
        match conn.recv().await? {
            ServerMsg::Welcome { endpoint, .. } => conn.endpoint = endpoint,
            other => bail!("sign-in of {user} refused: {other:?}"),
        }
        Ok(conn)
    }

    /// Writes and flushes one message.
    pub async fn send(&mut self, msg: &ClientMsg) -> anyhow::Result<()> {
        self.feed(msg).await?;
        self.flush().await
    }

    /// Queues a message; it goes out with the next [`Conn::flush`]. Encoded straight into the
    /// write buffer by the protocol's hand-written path for `message` and `message_ack` (serde
    /// for the rest); every scenario flushes after each batch, so the buffer stays small.
    pub async fn feed(&mut self, msg: &ClientMsg) -> anyhow::Result<()> {
        let buf = match &mut self.wire {
            Wire::Stream(f) => f.write_buffer_mut(),
            Wire::WebSocket(w) => w.write_buffer_mut(),
        };
        confab_protocol::hot::encode_client_frame(msg, buf).context("encode")
    }

    pub async fn flush(&mut self) -> anyhow::Result<()> {
        match &mut self.wire {
            Wire::Stream(f) => SinkExt::<&ClientMsg>::flush(f).await.context("flush"),
            Wire::WebSocket(w) => w.flush().await,
        }
    }

    /// The next message from the node.
    pub async fn recv(&mut self) -> anyhow::Result<ServerMsg> {
        match self.wire.next().await {
            Some(Ok(frame)) => Ok(decode_server(&frame)?),
            Some(Err(e)) => Err(e),
            None => bail!("connection closed by the node"),
        }
    }

    /// The next message from the node whose `type` is one of `types`; the others are skipped
    /// without being decoded (the load generator should spend its cores on load, not on
    /// decoding frames it ignores).
    pub async fn recv_only(&mut self, types: &[&str]) -> anyhow::Result<ServerMsg> {
        loop {
            let frame = match self.wire.next().await {
                Some(Ok(frame)) => frame,
                Some(Err(e)) => return Err(e),
                None => bail!("connection closed by the node"),
            };
            if confab_protocol::peek::peek_type(&frame).is_some_and(|t| types.contains(&t)) {
                return Ok(decode_server(&frame)?);
            }
        }
    }

    /// A message that is already buffered or readable without waiting, if any.
    pub fn try_recv(&mut self) -> Option<anyhow::Result<ServerMsg>> {
        match self.wire.next().now_or_never() {
            Some(Some(Ok(frame))) => Some(decode_server(&frame).map_err(Into::into)),
            Some(Some(Err(e))) => Some(Err(e)),
            Some(None) => Some(Err(anyhow::anyhow!("connection closed by the node"))),
            None => None,
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
