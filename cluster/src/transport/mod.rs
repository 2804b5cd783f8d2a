//! The transport seam: how the cluster's envelopes and heartbeats travel between nodes.
//!
//! The cluster publishes payloads (encoded [`Envelope`](crate::wire::Envelope)s and
//! heartbeats) to subjects (`confab.node.<id>` for one node, [`HEARTBEAT_SUBJECT`] for every
//! node) and subscribes to its own inbox and to the heartbeats; it sends only through a
//! [`Transport`]. Delivery is at most once, and in order from one publisher to one subscriber.
//!
//! - [`NatsTransport`]: core NATS, one connection per node (`nats.rs`).
//! - [`MemoryTransport`](crate::memory::MemoryTransport): nodes in one process, over a
//!   [`MemoryNetwork`](crate::memory::MemoryNetwork) (tests, no NATS).
//! - [`LossyTransport`]: wraps any transport and loses the envelopes a test armed it to lose,
//!   as core NATS may lose them (`lossy.rs`); production never wraps its transport.
//!
//! [`HEARTBEAT_SUBJECT`]: crate::HEARTBEAT_SUBJECT

mod lossy;
mod nats;

use bytes::Bytes;
use futures::Stream;
use std::any::Any;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use thiserror::Error;

pub use lossy::{Lose, LossyTransport};
pub use nats::NatsTransport;

/// What a transport's calls return.
pub type TransportFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// The payloads published on a subscribed subject, in the order published (per publisher).
pub type Messages = Pin<Box<dyn Stream<Item = Bytes> + Send>>;

#[derive(Debug, Error)]
pub enum TransportError {
    #[error("cannot publish: {0}")]
    Publish(String),
    #[error("cannot subscribe: {0}")]
    Subscribe(String),
}

/// How the cluster reaches the other nodes (see the module's doc).
pub trait Transport: Send + Sync + 'static {
    /// Publishes `payload` on `subject`; resolves once the transport has taken it (it may wait
    /// while the transport's own buffer is full), not once it has arrived: delivery is at most
    /// once.
    fn publish(
        &self,
        subject: String,
        payload: Bytes,
    ) -> TransportFuture<'_, Result<(), TransportError>>;

    /// Resolves once everything published before has left this node (or cannot).
    fn flush(&self) -> TransportFuture<'_, ()>;

    /// The payloads published on `subject` from now on.
    fn subscribe(&self, subject: String) -> TransportFuture<'_, Result<Messages, TransportError>>;

    /// Whether the transport reaches the others now; a node that does not is degraded.
    fn connected(&self) -> bool;

    /// For tests' hooks: the transport itself, to downcast (see [`crate::lossy`]).
    fn as_any(self: Arc<Self>) -> Arc<dyn Any + Send + Sync>;
}
