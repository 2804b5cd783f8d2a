//! The client connection's byte stream, whatever carries it: the engine's own names for the two
//! halves of a plain TCP or a TLS connection, so the session, the endpoint's frame reader and
//! the writer task are written once for both. `tokio_util`'s `Either` does the dispatch (one
//! match per read or write, no allocation per connection).

use tokio::io::{ReadHalf, WriteHalf};
use tokio::net::TcpStream;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio_rustls::server::TlsStream;
use tokio_util::either::Either;

/// The reading half of a client connection: plain TCP, or TLS.
pub type ClientReader = Either<OwnedReadHalf, ReadHalf<TlsStream<TcpStream>>>;

/// The writing half of a client connection: plain TCP, or TLS.
pub type ClientWriter = Either<OwnedWriteHalf, WriteHalf<TlsStream<TcpStream>>>;

/// Splits a plain TCP connection.
pub fn split_tcp(stream: TcpStream) -> (ClientReader, ClientWriter) {
    let (r, w) = stream.into_split();
    (Either::Left(r), Either::Left(w))
}

/// Splits a TLS connection (its halves share the TLS state behind a lock of tokio's).
pub fn split_tls(stream: TlsStream<TcpStream>) -> (ClientReader, ClientWriter) {
    let (r, w) = tokio::io::split(stream);
    (Either::Right(r), Either::Right(w))
}
