//! [`LinkedTransport`]: the [`Transport`] the cluster sends through when links are on. It
//! carries out the publisher's switches between NATS and a link (markers first, `order.rs`)
//! and reads this node's inbox from NATS and its accepted links together, in order.

use bytes::Bytes;
use futures::{Stream, StreamExt};
use std::any::Any;
use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use tokio::sync::mpsc;

use super::order::{InboxOrder, LinkVerdict};
use super::{FromLink, HOLD, Links, Out, Route, lock};
use crate::routing::NODE_SUBJECT_PREFIX;
use crate::transport::{Messages, Transport, TransportError, TransportFuture};
use confab_actors::metrics as m;

/// A [`Transport`] that sends other nodes' envelopes over direct links where it can and over
/// `inner` otherwise, and reads this node's inbox from both in order (see the module's doc).
pub struct LinkedTransport {
    inner: Arc<dyn Transport>,
    links: Arc<Links>,
    /// This node's inbox subject: its subscription takes the links' payloads too.
    inbox: String,
}

impl LinkedTransport {
    pub fn new(inner: Arc<dyn Transport>, links: Arc<Links>) -> Self {
        let inbox = [NODE_SUBJECT_PREFIX, &links.me].concat();
        LinkedTransport {
            inner,
            links,
            inbox,
        }
    }

    async fn send(
        &self,
        node: &str,
        subject: String,
        payload: Bytes,
    ) -> Result<(), TransportError> {
        match self.links.route(node) {
            Route::Nats => self.inner.publish(subject, payload).await,
            Route::Closed(marker) => {
                self.inner.publish(subject.clone(), marker).await?;
                self.inner.publish(subject, payload).await
            }
            Route::Link { id, tx, open } => {
                if let Some(open) = open
                    && let Err(e) = self.inner.publish(subject.clone(), open).await
                {
                    self.links.unopen(node, id);
                    return Err(e);
                }
                match tx.send(Out::Payload(payload)).await {
                    Ok(()) => Ok(()),
                    Err(mpsc::error::SendError(Out::Payload(payload))) => {
                        // The link ended under it: this one goes over NATS, after the marker.
                        if let Some(closed) = self.links.failed(node, id) {
                            self.inner.publish(subject.clone(), closed).await?;
                        }
                        self.inner.publish(subject, payload).await
                    }
                    Err(_) => Ok(()),
                }
            }
        }
    }
}

impl Transport for LinkedTransport {
    fn publish(
        &self,
        subject: String,
        payload: Bytes,
    ) -> TransportFuture<'_, Result<(), TransportError>> {
        Box::pin(async move {
            match subject.strip_prefix(NODE_SUBJECT_PREFIX) {
                Some(node) => {
                    let node = node.to_owned();
                    self.send(&node, subject, payload).await
                }
                None => self.inner.publish(subject, payload).await,
            }
        })
    }

    fn flush(&self) -> TransportFuture<'_, ()> {
        Box::pin(async move {
            self.links.flush().await;
            self.inner.flush().await;
        })
    }

    fn subscribe(&self, subject: String) -> TransportFuture<'_, Result<Messages, TransportError>> {
        Box::pin(async move {
            let nats = self.inner.subscribe(subject.clone()).await?;
            if subject != self.inbox {
                return Ok(nats);
            }
            let Some((links, forgotten)) = lock(&self.links.inbox).take() else {
                return Err(TransportError::Subscribe(
                    "the inbox is subscribed once".to_owned(),
                ));
            };
            Ok(Box::pin(Inbox {
                nats,
                links,
                forgotten,
                owner: self.links.clone(),
                order: InboxOrder::new(HOLD),
                ready: VecDeque::new(),
            }) as Messages)
        })
    }

    fn connected(&self) -> bool {
        self.inner.connected()
    }

    fn as_any(self: Arc<Self>) -> Arc<dyn Any + Send + Sync> {
        self
    }
}

/// This node's inbox: its NATS subscription and its accepted links, in order (`order.rs`).
struct Inbox {
    nats: Messages,
    links: mpsc::Receiver<FromLink>,
    forgotten: mpsc::UnboundedReceiver<String>,
    owner: Arc<Links>,
    order: InboxOrder,
    ready: VecDeque<Bytes>,
}

impl Inbox {
    fn take_link_item(&mut self, item: FromLink) {
        let FromLink {
            from,
            link,
            payload,
        } = item;
        metrics::counter!(m::CLUSTER_DIRECT_PAYLOADS, "direction" => "in").increment(1);
        match self.order.link(&from, link, payload, &mut self.ready) {
            LinkVerdict::Delivered | LinkVerdict::Held => {}
            LinkVerdict::Dropped => {
                metrics::counter!(m::CLUSTER_DIRECT_LINK_EVENTS, "event" => "late_dropped")
                    .increment(1);
            }
            LinkVerdict::Overflow => {
                tracing::warn!(node = %from, link, "a direct link's envelopes waited too long for its marker over NATS; closing it");
                metrics::counter!(m::CLUSTER_DIRECT_LINK_EVENTS, "event" => "overflow")
                    .increment(1);
                if let Some(reader) = lock(&self.owner.accepted).remove(&(from, link)) {
                    reader.abort();
                }
            }
        }
    }
}

impl Stream for Inbox {
    type Item = Bytes;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Bytes>> {
        let this = &mut *self;
        loop {
            if let Some(p) = this.ready.pop_front() {
                return Poll::Ready(Some(p));
            }
            // A node declared dead is forgotten before anything else is read.
            while let Poll::Ready(Some(node)) = this.forgotten.poll_recv(cx) {
                this.order.forget(&node);
            }
            let mut progressed = false;
            match this.nats.poll_next_unpin(cx) {
                Poll::Ready(Some(p)) => {
                    this.order.nats(p, &mut this.ready);
                    progressed = true;
                }
                Poll::Ready(None) => return Poll::Ready(None),
                Poll::Pending => {}
            }
            if let Poll::Ready(Some(item)) = this.links.poll_recv(cx) {
                this.take_link_item(item);
                progressed = true;
            }
            if !progressed {
                return Poll::Pending;
            }
        }
    }
}
