//! The client connection's byte stream, whatever carries it: the engine's own types for the
//! two halves of a plain TCP or a TLS connection, so the session, the endpoint's frame reader
//! and the writer task are written once for both. An enum rather than a boxed trait object:
//! one match per read or write, no allocation per connection.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf, ReadHalf, WriteHalf};
use tokio::net::TcpStream;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio_rustls::server::TlsStream;

/// The reading half of a client connection.
pub enum ClientReader {
    Tcp(OwnedReadHalf),
    Tls(ReadHalf<TlsStream<TcpStream>>),
}

/// The writing half of a client connection.
pub enum ClientWriter {
    Tcp(OwnedWriteHalf),
    Tls(WriteHalf<TlsStream<TcpStream>>),
}

/// Splits a plain TCP connection.
pub fn split_tcp(stream: TcpStream) -> (ClientReader, ClientWriter) {
    let (r, w) = stream.into_split();
    (ClientReader::Tcp(r), ClientWriter::Tcp(w))
}

/// Splits a TLS connection (its halves share the TLS state behind a lock of tokio's).
pub fn split_tls(stream: TlsStream<TcpStream>) -> (ClientReader, ClientWriter) {
    let (r, w) = tokio::io::split(stream);
    (ClientReader::Tls(r), ClientWriter::Tls(w))
}

impl AsyncRead for ClientReader {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            ClientReader::Tcp(r) => Pin::new(r).poll_read(cx, buf),
            ClientReader::Tls(r) => Pin::new(r).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for ClientWriter {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            ClientWriter::Tcp(w) => Pin::new(w).poll_write(cx, buf),
            ClientWriter::Tls(w) => Pin::new(w).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            ClientWriter::Tcp(w) => Pin::new(w).poll_write_vectored(cx, bufs),
            ClientWriter::Tls(w) => Pin::new(w).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            ClientWriter::Tcp(w) => w.is_write_vectored(),
            ClientWriter::Tls(w) => w.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            ClientWriter::Tcp(w) => Pin::new(w).poll_flush(cx),
            ClientWriter::Tls(w) => Pin::new(w).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            ClientWriter::Tcp(w) => Pin::new(w).poll_shutdown(cx),
            ClientWriter::Tls(w) => Pin::new(w).poll_shutdown(cx),
        }
    }
}
