//! What a test client's frames travel on: the client port's length-prefixed TCP stream, or a
//! WebSocket (one binary message per frame), behind one `send` and `next` so [`crate::Raw`]
//! drives either the same way.

use bytes::BytesMut;
use confab_protocol::FrameCodec;
use futures::{SinkExt, StreamExt};
use std::net::SocketAddr;
use tokio::net::TcpStream;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_util::codec::Framed;

pub enum Wire {
    Tcp(Framed<TcpStream, FrameCodec>),
    Ws {
        socket: Box<WebSocketStream<TcpStream>>,
        /// The close code the node sent, once it has closed.
        closed_with: Option<u16>,
    },
}

impl Wire {
    pub async fn tcp(addr: SocketAddr) -> Wire {
        let stream = TcpStream::connect(addr).await.expect("connect");
        Wire::Tcp(Framed::new(stream, FrameCodec::new(1 << 20)))
    }

    /// Upgrades a connection to `ws://addr{path}`, with `origin` as a browser would send it.
    pub async fn websocket(
        addr: SocketAddr,
        path: &str,
        origin: Option<&str>,
    ) -> Result<Wire, tokio_tungstenite::tungstenite::Error> {
        let stream = TcpStream::connect(addr).await.expect("connect");
        let mut request = format!("ws://{addr}{path}").into_client_request()?;
        if let Some(o) = origin {
            request
                .headers_mut()
                .insert("Origin", HeaderValue::from_str(o).expect("an origin"));
        }
        let (socket, _) = tokio_tungstenite::client_async(request, stream).await?;
        Ok(Wire::Ws {
            socket: Box::new(socket),
            closed_with: None,
        })
    }

    pub async fn send<T: serde::Serialize>(&mut self, msg: &T) -> Result<(), String> {
        match self {
            Wire::Tcp(f) => f.send(msg).await.map_err(|e| e.to_string()),
            Wire::Ws { socket, .. } => {
                let body = rmp_serde::to_vec_named(msg).map_err(|e| e.to_string())?;
                socket
                    .send(Message::binary(body))
                    .await
                    .map_err(|e| e.to_string())
            }
        }
    }

    /// Sends a WebSocket message as it is (a test of what the node refuses).
    pub async fn send_message(&mut self, msg: Message) {
        match self {
            Wire::Tcp(_) => panic!("not a WebSocket"),
            Wire::Ws { socket, .. } => socket.send(msg).await.expect("send"),
        }
    }

    /// The next frame, or `None` once the connection has ended.
    pub async fn next(&mut self) -> Option<Result<BytesMut, String>> {
        match self {
            Wire::Tcp(f) => f.next().await.map(|r| r.map_err(|e| e.to_string())),
            Wire::Ws {
                socket,
                closed_with,
            } => loop {
                match socket.next().await? {
                    Ok(Message::Binary(b)) => return Some(Ok(BytesMut::from(&b[..]))),
                    Ok(Message::Close(frame)) => {
                        *closed_with = frame.map(|f| u16::from(f.code));
                    }
                    Ok(Message::Text(t)) => return Some(Err(format!("a text message: {t}"))),
                    Ok(_) => {}
                    Err(e) => return Some(Err(e.to_string())),
                }
            },
        }
    }

    /// The close code the node sent (WebSocket only), once it has closed.
    pub fn closed_with(&self) -> Option<u16> {
        match self {
            Wire::Tcp(_) => None,
            Wire::Ws { closed_with, .. } => *closed_with,
        }
    }

    pub fn tcp_stream(&mut self) -> &mut TcpStream {
        match self {
            Wire::Tcp(f) => f.get_mut(),
            Wire::Ws { socket, .. } => socket.get_mut(),
        }
    }

    pub fn local_addr(&self) -> SocketAddr {
        let stream = match self {
            Wire::Tcp(f) => f.get_ref(),
            Wire::Ws { socket, .. } => socket.get_ref(),
        };
        stream.local_addr().expect("local address")
    }
}
