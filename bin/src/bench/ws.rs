//! A bench connection over the node's WebSocket listener (`confab-bench --websocket`): the
//! same frames, one binary message each. The scenarios write length-prefixed frames into the
//! write buffer as on TCP; a flush sends each as one message, so every scenario measures
//! either transport unchanged.

use anyhow::Context as _;
use bytes::{Buf, BytesMut};
use futures::{SinkExt, StreamExt};
use std::net::SocketAddr;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;

use super::stream::BenchStream;

/// The length prefix of a frame in the write buffer.
const PREFIX: usize = 4;

pub struct WsWire {
    socket: WebSocketStream<BenchStream>,
    /// Frames queued by the scenario, length-prefixed, until the next flush.
    write_buf: BytesMut,
}

impl WsWire {
    /// Upgrades `stream` (already connected to `server`) to a WebSocket on `path`.
    pub async fn upgrade(
        stream: BenchStream,
        server: SocketAddr,
        path: &str,
    ) -> anyhow::Result<WsWire> {
        let request = format!("ws://{server}{path}").into_client_request()?;
        // A small read buffer, as the TCP connections have: the idle scenario holds thousands.
        // Messages gather until the flush that ends each batch, as on TCP.
        let config = WebSocketConfig::default()
            .read_buffer_size(4096)
            .write_buffer_size(64 * 1024);
        let (socket, _) =
            tokio_tungstenite::client_async_with_config(request, stream, Some(config))
                .await
                .context("WebSocket upgrade")?;
        Ok(WsWire {
            socket,
            write_buf: BytesMut::with_capacity(512),
        })
    }

    pub fn write_buffer_mut(&mut self) -> &mut BytesMut {
        &mut self.write_buf
    }

    /// Sends every queued frame as one binary message each, then flushes.
    pub async fn flush(&mut self) -> anyhow::Result<()> {
        while self.write_buf.len() >= PREFIX {
            let len = u32::from_be_bytes([
                self.write_buf[0],
                self.write_buf[1],
                self.write_buf[2],
                self.write_buf[3],
            ]) as usize;
            let mut frame = self.write_buf.split_to(PREFIX + len);
            frame.advance(PREFIX);
            self.socket.feed(Message::Binary(frame.freeze())).await?;
        }
        self.socket.flush().await.context("flush")
    }

    /// The next frame from the node (control messages skipped), `None` once closed.
    pub async fn next(&mut self) -> Option<anyhow::Result<BytesMut>> {
        loop {
            match self.socket.next().await? {
                Ok(Message::Binary(b)) => return Some(Ok(BytesMut::from(b))),
                Ok(Message::Close(frame)) => {
                    return Some(Err(anyhow::anyhow!("closed by the node: {frame:?}")));
                }
                Ok(Message::Text(_)) => return Some(Err(anyhow::anyhow!("a text message"))),
                Ok(_) => {}
                Err(e) => return Some(Err(e.into())),
            }
        }
    }
}
