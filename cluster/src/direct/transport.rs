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

use super::order::{self, InboxOrder, LinkVerdict};
use super::{Forget, FromLink, Links, Out, Route, lock};
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

    /// One envelope for `node`, as [`Links::route`] decides; at most two rounds (a link that
    /// fails under it sends it over NATS after the link's `Closed` marker).
    async fn send(
        &self,
        node: &str,
        subject: String,
        payload: Bytes,
    ) -> Result<(), TransportError> {
        let mut payload = payload;
        loop {
            match self.links.route(node) {
                Route::Nats { tag } => {
                    return self.inner.publish(subject, with_tag(tag, payload)).await;
                }
                Route::Closed { id, marker, tag } => {
                    // Owed until published: a failure here leaves it owed for the next one.
                    self.inner.publish(subject.clone(), marker).await?;
                    self.links.closed_sent(node, id);
                    return self.inner.publish(subject, with_tag(tag, payload)).await;
                }
                Route::Link { id, tx, open } => {
                    if let Some(open) = open
                        && let Err(e) = self.inner.publish(subject.clone(), open).await
                    {
                        self.links.unopen(node, id);
                        return Err(e);
                    }
                    match self.to_link(&tx, payload).await {
                        Ok(()) => return Ok(()),
                        Err(back) => {
                            self.links.failed(node, id);
                            payload = back;
                        }
                    }
                }
            }
        }
    }

    /// Queues `payload` for a link's writer. A full queue is waited for a quarter of
    /// `node_timeout` at most: the publisher also sends the heartbeats and every other node's
    /// envelopes, and must not stall behind one link. The payload comes back when the link
    /// ended or stalled.
    async fn to_link(&self, tx: &mpsc::Sender<Out>, payload: Bytes) -> Result<(), Bytes> {
        match tx.try_send(Out::Payload(payload)) {
            Ok(()) => Ok(()),
            Err(mpsc::error::TrySendError::Closed(Out::Payload(p))) => Err(p),
            Err(mpsc::error::TrySendError::Full(Out::Payload(p))) => {
                match tokio::time::timeout(self.links.stall(), tx.reserve()).await {
                    Ok(Ok(permit)) => {
                        permit.send(Out::Payload(p));
                        Ok(())
                    }
                    Ok(Err(_)) => Err(p),
                    Err(_) => {
                        tracing::warn!(
                            stalled_ms = self.links.stall().as_millis() as u64,
                            "a direct link's writer fell behind; giving it up for NATS"
                        );
                        metrics::counter!(m::CLUSTER_DIRECT_LINK_EVENTS, "event" => "stalled")
                            .increment(1);
                        Err(p)
                    }
                }
            }
            // Only payloads are tried here.
            Err(_) => Ok(()),
        }
    }
}

/// `payload` after `tag` when there is one (`order.rs`, rule 8): a copy, paid only by what goes
/// over NATS to a node this one has opened a link to (while that link is down).
fn with_tag(tag: Option<Bytes>, payload: Bytes) -> Bytes {
    match tag {
        Some(tag) => order::tagged(&tag, &payload),
        None => payload,
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
                order: InboxOrder::new(self.links.hold_limit()),
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
    forgotten: mpsc::UnboundedReceiver<Forget>,
    owner: Arc<Links>,
    order: InboxOrder,
    ready: VecDeque<Bytes>,
}

impl Inbox {
    fn take_link_item(&mut self, item: FromLink) {
        let FromLink {
            from,
            run,
            link,
            payload,
        } = item;
        metrics::counter!(m::CLUSTER_DIRECT_PAYLOADS, "direction" => "in").increment(1);
        let now = tokio::time::Instant::now();
        match self
            .order
            .link((&from, run), link, payload, now, &mut self.ready)
        {
            LinkVerdict::Delivered | LinkVerdict::Held => {}
            LinkVerdict::Dropped => {
                metrics::counter!(m::CLUSTER_DIRECT_LINK_EVENTS, "event" => "late_dropped")
                    .increment(1);
            }
            LinkVerdict::Overflow => {
                tracing::warn!(node = %from, link, "a direct link's envelopes waited too long (or too many) for its marker over NATS; closing it");
                metrics::counter!(m::CLUSTER_DIRECT_LINK_EVENTS, "event" => "overflow")
                    .increment(1);
                if let Some(a) = lock(&self.owner.accepted).remove(&(from, link)) {
                    a.reader.abort();
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
            while let Poll::Ready(Some(Forget(node, run))) = this.forgotten.poll_recv(cx) {
                this.order.forget(&node, run);
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::direct::LinkSettings;
    use crate::direct::order::{Marker, untag};
    use crate::memory::{MemoryNetwork, MemoryTransport};
    use std::sync::Mutex;
    use std::time::Duration;

    /// Core NATS losing every `Closed` marker (a slow-consumer drop on the receiver), and
    /// keeping what it carried, for the test to look at.
    struct LosesClosed {
        inner: MemoryTransport,
        sent: Mutex<Vec<Bytes>>,
    }

    impl Transport for LosesClosed {
        fn publish(
            &self,
            subject: String,
            payload: Bytes,
        ) -> TransportFuture<'_, Result<(), TransportError>> {
            if let Some(Marker::Closed { .. }) = Marker::decode(&payload) {
                return Box::pin(std::future::ready(Ok(())));
            }
            lock(&self.sent).push(payload.clone());
            self.inner.publish(subject, payload)
        }

        fn flush(&self) -> TransportFuture<'_, ()> {
            self.inner.flush()
        }

        fn subscribe(
            &self,
            subject: String,
        ) -> TransportFuture<'_, Result<Messages, TransportError>> {
            self.inner.subscribe(subject)
        }

        fn connected(&self) -> bool {
            true
        }

        fn as_any(self: Arc<Self>) -> Arc<dyn Any + Send + Sync> {
            self
        }
    }

    fn settings() -> LinkSettings {
        LinkSettings {
            listen: "127.0.0.1:0".into(),
            advertise: String::new(),
            secret: "a secret of sixteen bytes or more".into(),
            node_timeout: Duration::from_secs(5),
            tls: None,
        }
    }

    async fn until(what: &str, done: impl Fn() -> bool) {
        for _ in 0..500 {
            if done() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("{what}: not within 5 s");
    }

    fn b(s: &str) -> Bytes {
        Bytes::copy_from_slice(s.as_bytes())
    }

    /// The hole rule 8 closes, end to end: node a sends four envelopes over its link to b, the
    /// link ends, its `Closed` is lost, and a sends a fifth over NATS, which b reads before the
    /// link's last two (the inbox takes one NATS payload and one link payload a turn, and b's
    /// NATS holds `e0, Open, e5`). Without the tag b delivered `e0, e1, e2, e5, e3, e4`.
    #[tokio::test]
    async fn with_a_closed_marker_lost_a_late_link_payload_never_follows_a_later_nats_envelope() {
        let net = MemoryNetwork::new();
        let a = Links::start("a".into(), 10, settings()).await.expect("a");
        let bn = Links::start("b".into(), 20, settings()).await.expect("b");
        let a_nats = Arc::new(LosesClosed {
            inner: net.transport(),
            sent: Mutex::new(Vec::new()),
        });
        let a_side = LinkedTransport::new(a_nats.clone(), a.clone());
        let b_side = LinkedTransport::new(Arc::new(net.transport()), bn.clone());
        let mut inbox = b_side
            .subscribe("confab.node.b".into())
            .await
            .expect("b's inbox");
        let to_b = || "confab.node.b".to_owned();

        // Before any link to b: over NATS, untagged.
        a_side.publish(to_b(), b("e0")).await.expect("e0");
        a.heard("b", 20, Some(bn.advertise()));
        until("a's link to b", || a.stats().out == 1).await;
        for e in ["e1", "e2", "e3", "e4"] {
            a_side.publish(to_b(), b(e)).await.expect("over the link");
        }
        a_side.flush().await;
        // All read off the link by b, not yet by its inbox.
        until("b reads the link", || bn.stats().read == 4).await;
        a.cut_all();
        // The link is found ended: its `Closed` (lost), then e5 over NATS, tagged.
        a_side.publish(to_b(), b("e5")).await.expect("e5");

        let mut got = Vec::new();
        while let Ok(Some(p)) = tokio::time::timeout(Duration::from_millis(300), inbox.next()).await
        {
            got.push(p);
        }
        assert_eq!(
            got,
            vec![b("e0"), b("e1"), b("e2"), b("e5")],
            "e3 and e4 are lost, not late"
        );

        let sent = lock(&a_nats.sent).clone();
        assert_eq!(sent.len(), 3, "e0, Open, e5: {sent:?}");
        assert_eq!(sent[0], b("e0"), "no tag before a link was opened");
        assert!(matches!(
            Marker::decode(&sent[1]),
            Some(Marker::Open { .. })
        ));
        assert_eq!(untag(&sent[2]), Some((("a", 10), 13)));
        assert_eq!(&sent[2][13..], b"e5");

        // b's next run takes no links: a forgets it, and tags nothing for it.
        a.heard("b", 21, None);
        assert!(matches!(a.route("b"), Route::Nats { tag: None }));
    }
}
