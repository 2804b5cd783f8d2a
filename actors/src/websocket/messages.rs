//! A WebSocket's binary messages as the engine's frames: [`WsFrames`] reads one frame's
//! MessagePack map per binary message (the same stream of frames the TCP codec gives the
//! endpoint), and [`WsWriter`] is the byte sink the outbox's writer task writes length-prefixed
//! frames to, sending each frame as one binary message. What ends a connection for a reason of
//! its own (a text message, a message over the limit) is closed with its close code.

use bytes::{Buf, BytesMut};
use confab_protocol::FrameError;
use futures::stream::{SplitSink, SplitStream};
use futures::{Sink, Stream};
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU16, Ordering};
use std::task::{Context, Poll, ready};
use tokio::io::AsyncWrite;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::error::{CapacityError, Error as WsError};
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::{Bytes, Message};

use crate::metrics as m;
use crate::transport::ClientStream;

/// The close codes the node sends (RFC 6455 §7.4.1).
pub mod close {
    /// The session ended (`bye`, a refusal, `shutdown`, a kick): the reason is in the frames
    /// sent before.
    pub const NORMAL: u16 = 1000;
    /// A WebSocket protocol error (bad masking, a broken frame).
    pub const PROTOCOL: u16 = 1002;
    /// A text message: confab frames are binary.
    pub const UNSUPPORTED_DATA: u16 = 1003;
    /// An empty binary message (the zero-length frame).
    pub const INVALID_PAYLOAD: u16 = 1007;
    /// A message longer than `server.max_frame` (`server.max_hello_frame` before sign-in).
    pub const TOO_BIG: u16 = 1009;
}

type Socket = WebSocketStream<ClientStream>;

/// The close code the reading half chose for the writing half to send.
#[derive(Clone, Default)]
struct CloseCodeCell(Arc<AtomicU16>);

impl CloseCodeCell {
    fn set(&self, code: u16) {
        self.0.store(code, Ordering::Relaxed);
    }
    fn get(&self) -> u16 {
        match self.0.load(Ordering::Relaxed) {
            0 => close::NORMAL,
            code => code,
        }
    }
}

/// Splits an upgraded WebSocket into the endpoint's frames and the writer task's sink.
/// `max_frame` bounds a message until [`WsFrames::set_max_frame`] changes it.
pub fn split(socket: Socket, max_frame: usize) -> (WsFrames, WsWriter) {
    use futures::StreamExt;
    let (sink, stream) = socket.split();
    let code = CloseCodeCell::default();
    (
        WsFrames {
            inner: stream,
            max: max_frame,
            code: code.clone(),
            done: false,
        },
        WsWriter {
            sink,
            pending: BytesMut::new(),
            code,
            close_sent: false,
        },
    )
}

/// The client's frames, one per binary message.
pub struct WsFrames {
    inner: SplitStream<Socket>,
    max: usize,
    code: CloseCodeCell,
    done: bool,
}

impl WsFrames {
    /// The longest message accepted from now on (the hello's limit, then `max_frame`).
    pub fn set_max_frame(&mut self, max: usize) {
        self.max = max;
    }

    /// Ends the stream with `err`, the connection to be closed with `code`.
    fn refuse(&mut self, code: u16, reason: &'static str, err: FrameError) -> Poll<Option<Item>> {
        metrics::counter!(m::WEBSOCKET_REJECTIONS, "reason" => reason).increment(1);
        self.code.set(code);
        self.done = true;
        Poll::Ready(Some(Err(err)))
    }
}

type Item = Result<BytesMut, FrameError>;

impl Stream for WsFrames {
    type Item = Item;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Item>> {
        let this = self.get_mut();
        loop {
            if this.done {
                return Poll::Ready(None);
            }
            let msg = match ready!(Pin::new(&mut this.inner).poll_next(cx)) {
                None => return Poll::Ready(None),
                Some(msg) => msg,
            };
            match msg {
                Ok(Message::Binary(b)) if b.is_empty() => {
                    return this.refuse(close::INVALID_PAYLOAD, "empty", FrameError::Empty);
                }
                Ok(Message::Binary(b)) if b.len() > this.max => {
                    let (len, max) = (b.len(), this.max);
                    return this.refuse(
                        close::TOO_BIG,
                        "too_large",
                        FrameError::TooLarge { len, max },
                    );
                }
                Ok(Message::Binary(b)) => return Poll::Ready(Some(Ok(BytesMut::from(b)))),
                Ok(Message::Text(_)) => {
                    let err = io::Error::new(io::ErrorKind::InvalidData, "a text message");
                    return this.refuse(close::UNSUPPORTED_DATA, "text_message", err.into());
                }
                // Pings are answered by the WebSocket layer; a close ends the stream next.
                Ok(Message::Ping(_) | Message::Pong(_) | Message::Close(_) | Message::Frame(_)) => {
                }
                Err(WsError::Capacity(CapacityError::MessageTooLong { size, .. })) => {
                    let max = this.max;
                    return this.refuse(
                        close::TOO_BIG,
                        "too_large",
                        FrameError::TooLarge { len: size, max },
                    );
                }
                Err(WsError::Protocol(e)) => {
                    return this.refuse(
                        close::PROTOCOL,
                        "protocol",
                        io::Error::new(io::ErrorKind::InvalidData, e).into(),
                    );
                }
                Err(WsError::ConnectionClosed | WsError::AlreadyClosed) => {
                    this.done = true;
                    return Poll::Ready(None);
                }
                Err(e) => {
                    this.done = true;
                    return Poll::Ready(Some(Err(io::Error::other(e).into())));
                }
            }
        }
    }
}

/// The writer task's socket: takes the outbox's length-prefixed frames and sends each as one
/// binary message; shutting it down sends the close frame.
pub struct WsWriter {
    sink: SplitSink<Socket, Message>,
    /// Bytes written and not yet sent as messages (whole frames: the writer task writes only
    /// whole frames).
    pending: BytesMut,
    code: CloseCodeCell,
    close_sent: bool,
}

/// The length prefix of the outbox's frames.
const PREFIX: usize = 4;

impl WsWriter {
    /// The first whole frame in `pending`, without its prefix.
    fn next_frame(&mut self) -> Option<Bytes> {
        let prefix: [u8; PREFIX] = self.pending.get(..PREFIX)?.try_into().ok()?;
        let len = u32::from_be_bytes(prefix) as usize;
        if self.pending.len() < PREFIX + len {
            return None;
        }
        let mut frame = self.pending.split_to(PREFIX + len);
        frame.advance(PREFIX);
        Some(frame.freeze())
    }

    fn poll_send_pending(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while self.pending.len() >= PREFIX {
            ready!(Pin::new(&mut self.sink).poll_ready(cx)).map_err(io::Error::other)?;
            let Some(frame) = self.next_frame() else {
                break;
            };
            Pin::new(&mut self.sink)
                .start_send(Message::Binary(frame))
                .map_err(io::Error::other)?;
        }
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for WsWriter {
    fn poll_write(
        self: Pin<&mut Self>,
        _: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        // The outbox bounds what one batch holds; the messages go out on flush.
        self.get_mut().pending.extend_from_slice(buf);
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(this.poll_send_pending(cx))?;
        Pin::new(&mut this.sink)
            .poll_flush(cx)
            .map_err(io::Error::other)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(this.poll_send_pending(cx))?;
        if !this.close_sent {
            ready!(Pin::new(&mut this.sink).poll_ready(cx)).map_err(io::Error::other)?;
            let frame = CloseFrame {
                code: CloseCode::from(this.code.get()),
                reason: close_reason(this.code.get()).into(),
            };
            this.close_sent = true;
            Pin::new(&mut this.sink)
                .start_send(Message::Close(Some(frame)))
                .map_err(io::Error::other)?;
        }
        // The client may already have closed its side: the close is then done.
        match ready!(Pin::new(&mut this.sink).poll_close(cx)) {
            Ok(()) | Err(WsError::ConnectionClosed | WsError::AlreadyClosed) => Poll::Ready(Ok(())),
            Err(e) => Poll::Ready(Err(io::Error::other(e))),
        }
    }
}

/// The close frame's reason text for each code the node sends.
fn close_reason(code: u16) -> &'static str {
    match code {
        close::UNSUPPORTED_DATA => "binary messages only",
        close::TOO_BIG => "message over the frame limit",
        close::INVALID_PAYLOAD => "empty message",
        close::PROTOCOL => "protocol error",
        _ => "",
    }
}
