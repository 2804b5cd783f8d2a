//! The client connection, whatever carries it: the engine's own names for the two halves of a
//! plain TCP or a TLS connection, so the session, the endpoint's frame reader and the writer
//! task are written once for both; and [`Frames`], the frames read from either listener (a
//! byte stream cut by the length prefix, or a WebSocket's binary messages). `tokio_util`'s
//! `Either` and the enum do the dispatch (one match per read or write, no allocation per
//! connection or frame).

use bytes::BytesMut;
use confab_protocol::{FrameCodec, FrameError};
use futures::Stream;
use std::pin::Pin;
use std::task::{Context, Poll};
use tokio::io::{AsyncRead, AsyncWrite, ReadHalf, WriteHalf};
use tokio::net::TcpStream;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio_rustls::server::TlsStream;
use tokio_util::codec::FramedRead;
use tokio_util::either::Either;

use crate::websocket::WsFrames;

/// A whole client connection, before it is split: plain TCP, or TLS.
pub type ClientStream = Either<TcpStream, TlsStream<TcpStream>>;

/// The reading half of a client connection: plain TCP, or TLS.
pub type ClientReader = Either<OwnedReadHalf, ReadHalf<TlsStream<TcpStream>>>;

/// The writing half of a client connection: plain TCP, or TLS.
pub type ClientWriter = Either<OwnedWriteHalf, WriteHalf<TlsStream<TcpStream>>>;

/// Splits a client connection (a TLS one's halves share the TLS state behind a lock of
/// tokio's; a plain one's are independent). Any TCP-or-TLS stream splits so (the cluster's
/// direct links too).
pub fn split<T: AsyncRead + AsyncWrite>(
    stream: Either<TcpStream, T>,
) -> (
    Either<OwnedReadHalf, ReadHalf<T>>,
    Either<OwnedWriteHalf, WriteHalf<T>>,
) {
    match stream {
        Either::Left(tcp) => {
            let (r, w) = tcp.into_split();
            (Either::Left(r), Either::Left(w))
        }
        Either::Right(tls) => {
            let (r, w) = tokio::io::split(tls);
            (Either::Right(r), Either::Right(w))
        }
    }
}

/// The client's frames, as the endpoint reads them.
pub enum Frames {
    /// The client port: length-prefixed frames on a byte stream.
    Stream(FramedRead<ClientReader, FrameCodec>),
    /// The WebSocket listener: one frame per binary message.
    WebSocket(WsFrames),
}

impl Frames {
    /// The longest frame accepted from now on (the hello's limit, then `server.max_frame`).
    pub fn set_max_frame(&mut self, max: usize) {
        match self {
            Frames::Stream(f) => f.decoder_mut().set_max_frame(max),
            Frames::WebSocket(w) => w.set_max_frame(max),
        }
    }

    /// After the hello: a byte stream's read buffer goes back to `capacity` (0: no buffer until
    /// the next read) unless the client already sent more (it keeps its bytes then).
    pub fn shrink_read_buffer(&mut self, capacity: usize) {
        if let Frames::Stream(f) = self
            && f.read_buffer().is_empty()
        {
            *f.read_buffer_mut() = BytesMut::with_capacity(capacity);
        }
    }
}

impl Stream for Frames {
    type Item = Result<BytesMut, FrameError>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        match self.get_mut() {
            Frames::Stream(f) => Pin::new(f).poll_next(cx),
            Frames::WebSocket(w) => Pin::new(w).poll_next(cx),
        }
    }
}
