//! The [`Transport`] over core NATS: one client (one connection) per node, whose connection
//! state follows the client's events.

use bytes::Bytes;
use futures::StreamExt;
use std::any::Any;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use super::{Messages, Transport, TransportError, TransportFuture};

/// Core NATS, over one client.
pub struct NatsTransport {
    client: async_nats::Client,
    /// The client's connection state, from its events.
    connected: Arc<AtomicBool>,
}

impl NatsTransport {
    /// `connected` is kept up to date by the client's event callback.
    pub fn new(client: async_nats::Client, connected: Arc<AtomicBool>) -> Self {
        NatsTransport { client, connected }
    }
}

impl Transport for NatsTransport {
    fn publish(
        &self,
        subject: String,
        payload: Bytes,
    ) -> TransportFuture<'_, Result<(), TransportError>> {
        Box::pin(async move {
            self.client
                .publish(subject, payload)
                .await
                .map_err(|e| TransportError::Publish(e.to_string()))
        })
    }

    fn flush(&self) -> TransportFuture<'_, ()> {
        Box::pin(async move {
            let _ = self.client.flush().await;
        })
    }

    fn subscribe(&self, subject: String) -> TransportFuture<'_, Result<Messages, TransportError>> {
        Box::pin(async move {
            let sub = self
                .client
                .subscribe(subject)
                .await
                .map_err(|e| TransportError::Subscribe(e.to_string()))?;
            Ok(Box::pin(sub.map(|msg| msg.payload)) as Messages)
        })
    }

    fn connected(&self) -> bool {
        self.connected.load(Ordering::Relaxed)
    }

    fn as_any(self: Arc<Self>) -> Arc<dyn Any + Send + Sync> {
        self
    }
}
