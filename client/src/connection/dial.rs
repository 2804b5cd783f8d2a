//! Opening a link to the node: TCP (and TLS when asked) to the addresses resolved once at
//! sign-in, framed both ways, and the `hello` → first-frame handshake. Shared by the first
//! sign-in and every resume, so both open links the same way.

use std::net::SocketAddr;

use bytes::BytesMut;
use confab_protocol::hot::encode_client_frame;
use confab_protocol::{ClientMsg, FrameCodec, ServerMsg, decode_server};
use futures::{SinkExt, StreamExt};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpStream, ToSocketAddrs};
use tokio::time::Instant;
use tokio_util::codec::{BytesCodec, FramedRead, FramedWrite};

use super::ClientTls;
use crate::error::ClientError;

pub(super) type ReadHalf = Box<dyn AsyncRead + Unpin + Send>;
pub(super) type WriteHalf = Box<dyn AsyncWrite + Unpin + Send>;

/// One link's two framed halves.
pub(super) struct Link {
    pub(super) read: FramedRead<ReadHalf, FrameCodec>,
    pub(super) write: FramedWrite<WriteHalf, BytesCodec>,
}

/// Where and how to open links.
#[derive(Clone)]
pub(super) struct Dialer {
    addrs: Vec<SocketAddr>,
    tls: Option<ClientTls>,
    max_frame: usize,
}

impl Dialer {
    /// Resolves `addr` once; later links (resumes) go to the same addresses.
    pub(super) async fn resolve(
        addr: impl ToSocketAddrs,
        tls: Option<ClientTls>,
        max_frame: usize,
    ) -> Result<Dialer, ClientError> {
        let addrs: Vec<SocketAddr> = tokio::net::lookup_host(addr).await?.collect();
        if addrs.is_empty() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                "the node's address resolved to nothing",
            )
            .into());
        }
        Ok(Dialer {
            addrs,
            tls,
            max_frame,
        })
    }

    /// Opens a link by `deadline`.
    pub(super) async fn open(&self, deadline: Instant) -> Result<Link, ClientError> {
        let stream = tokio::time::timeout_at(deadline, TcpStream::connect(&self.addrs[..]))
            .await
            .map_err(|_| ClientError::Timeout("the TCP connection"))??;
        // Frames are small and latency matters more than packet count; the writer batches.
        stream.set_nodelay(true)?;
        let (read, write): (ReadHalf, WriteHalf) = match &self.tls {
            None => {
                let (r, w) = stream.into_split();
                (Box::new(r), Box::new(w))
            }
            Some(tls) => {
                let peer = stream.peer_addr()?.ip();
                let stream = tokio::time::timeout_at(deadline, tls.connect(stream, peer))
                    .await
                    .map_err(|_| ClientError::Timeout("the TLS handshake"))??;
                let (r, w) = tokio::io::split(stream);
                (Box::new(r), Box::new(w))
            }
        };
        Ok(Link {
            read: FramedRead::new(read, FrameCodec::new(self.max_frame)),
            write: FramedWrite::new(write, BytesCodec::new()),
        })
    }
}

impl Link {
    /// Sends `hello` and returns the node's first frame (a `welcome`, or the `error` it closes
    /// after) by `deadline`. Frames after it stay buffered in `read` for the reader task.
    pub(super) async fn handshake(
        &mut self,
        hello: &ClientMsg,
        deadline: Instant,
    ) -> Result<ServerMsg, ClientError> {
        let mut buf = BytesMut::with_capacity(256);
        encode_client_frame(hello, &mut buf)?;
        let exchange = async {
            self.write.send(buf.freeze()).await?;
            match self.read.next().await {
                None => Err(ClientError::Closed),
                Some(Err(e)) => Err(ClientError::Protocol(format!(
                    "unreadable answer to hello: {e}"
                ))),
                Some(Ok(body)) => decode_server(&body)
                    .map_err(|e| ClientError::Protocol(format!("unreadable answer to hello: {e}"))),
            }
        };
        tokio::time::timeout_at(deadline, exchange)
            .await
            .map_err(|_| ClientError::Timeout("the welcome"))?
    }
}
