//! Two small channels the public streams are built from.
//!
//! [`SharedQueue`] buffers items from the moment its owner exists, so nothing is lost between
//! the node's event and the application asking for a stream; every stream taken from it drains
//! the same queue (each item goes to exactly one of them). [`ReplayLog`] is for the few, small
//! histories (call state changes) where every subscriber should see everything from the start.

use std::sync::{Arc, Mutex};

use futures::StreamExt;
use futures::stream::BoxStream;
use tokio::sync::mpsc;

use crate::sync::lock;

/// Why [`SharedQueue::push`] did not take an item.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum PushError {
    /// The consumers are `capacity` items behind.
    Full,
    /// The queue was closed; it will never take items again.
    Closed,
}

/// A bounded multi-consumer queue; see the module doc.
pub(crate) struct SharedQueue<T> {
    tx: Mutex<Option<mpsc::Sender<T>>>,
    rx: Arc<tokio::sync::Mutex<mpsc::Receiver<T>>>,
}

impl<T: Send + 'static> SharedQueue<T> {
    pub(crate) fn new(capacity: usize) -> Self {
        let (tx, rx) = mpsc::channel(capacity.max(1));
        SharedQueue {
            tx: Mutex::new(Some(tx)),
            rx: Arc::new(tokio::sync::Mutex::new(rx)),
        }
    }

    /// Adds an item without waiting: the caller is the event dispatcher, which must never
    /// block on a slow application.
    pub(crate) fn push(&self, item: T) -> Result<(), PushError> {
        let guard = lock(&self.tx);
        let tx = guard.as_ref().ok_or(PushError::Closed)?;
        tx.try_send(item).map_err(|e| match e {
            mpsc::error::TrySendError::Full(_) => PushError::Full,
            mpsc::error::TrySendError::Closed(_) => PushError::Closed,
        })
    }

    /// No more items; streams end once they have drained what is queued.
    pub(crate) fn close(&self) {
        lock(&self.tx).take();
    }

    /// A stream over the queue.
    pub(crate) fn stream(&self) -> BoxStream<'static, T> {
        futures::stream::unfold(Arc::clone(&self.rx), |rx| async move {
            let item = rx.lock().await.recv().await;
            item.map(|item| (item, rx))
        })
        .boxed()
    }
}

/// A history that every subscriber receives in full, then live; see the module doc.
pub(crate) struct ReplayLog<T> {
    inner: Mutex<LogInner<T>>,
}

struct LogInner<T> {
    history: Vec<T>,
    subscribers: Vec<mpsc::UnboundedSender<T>>,
    closed: bool,
}

impl<T: Clone> ReplayLog<T> {
    pub(crate) fn new() -> Self {
        ReplayLog {
            inner: Mutex::new(LogInner {
                history: Vec::new(),
                subscribers: Vec::new(),
                closed: false,
            }),
        }
    }

    /// Appends an entry and hands it to every live subscriber.
    pub(crate) fn push(&self, item: T) {
        let mut inner = lock(&self.inner);
        if inner.closed {
            return;
        }
        inner
            .subscribers
            .retain(|subscriber| subscriber.send(item.clone()).is_ok());
        inner.history.push(item);
    }

    /// Every entry so far, then every later one until the log closes.
    pub(crate) fn subscribe(&self) -> mpsc::UnboundedReceiver<T> {
        self.subscribe_inner(true)
    }

    /// Only the entries pushed after this call.
    pub(crate) fn subscribe_from_now(&self) -> mpsc::UnboundedReceiver<T> {
        self.subscribe_inner(false)
    }

    fn subscribe_inner(&self, replay: bool) -> mpsc::UnboundedReceiver<T> {
        let (tx, rx) = mpsc::unbounded_channel();
        // Under the lock, so no entry is both replayed and delivered live, or neither.
        let mut inner = lock(&self.inner);
        if replay {
            for item in &inner.history {
                // Cannot fail: `rx` is alive right here.
                let _ = tx.send(item.clone());
            }
        }
        if !inner.closed {
            inner.subscribers.push(tx);
        }
        rx
    }

    /// Ends every subscription (after what it has already received).
    pub(crate) fn close(&self) {
        let mut inner = lock(&self.inner);
        inner.closed = true;
        inner.subscribers.clear();
    }
}

/// Adapts an unbounded receiver to a boxed stream.
pub(crate) fn receiver_stream<T: Send + 'static>(
    rx: mpsc::UnboundedReceiver<T>,
) -> BoxStream<'static, T> {
    tokio_stream::wrappers::UnboundedReceiverStream::new(rx).boxed()
}

/// Declares a public stream type over a boxed stream, with an inherent `recv` so that the
/// common case needs no trait import.
macro_rules! public_stream {
    ($(#[$doc:meta])* $name:ident => $item:ty) => {
        $(#[$doc])*
        pub struct $name {
            inner: futures::stream::BoxStream<'static, $item>,
        }

        impl $name {
            #[allow(dead_code, reason = "not every stream type is built from every source")]
            pub(crate) fn new(inner: futures::stream::BoxStream<'static, $item>) -> Self {
                $name { inner }
            }

            /// The next item, or `None` once the stream has ended.
            pub async fn recv(&mut self) -> Option<$item> {
                futures::StreamExt::next(&mut self.inner).await
            }
        }

        impl futures::Stream for $name {
            type Item = $item;

            fn poll_next(
                mut self: std::pin::Pin<&mut Self>,
                cx: &mut std::task::Context<'_>,
            ) -> std::task::Poll<Option<$item>> {
                self.inner.as_mut().poll_next(cx)
            }
        }

        impl std::fmt::Debug for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.debug_struct(stringify!($name)).finish_non_exhaustive()
            }
        }
    };
}
pub(crate) use public_stream;

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn queue_buffers_before_any_stream_and_ends_after_close() {
        let queue = SharedQueue::new(2);
        queue.push(1).expect("room");
        queue.push(2).expect("room");
        assert_eq!(queue.push(3), Err(PushError::Full));
        queue.close();
        assert_eq!(queue.push(4), Err(PushError::Closed));
        let items: Vec<i32> = queue.stream().collect().await;
        assert_eq!(items, vec![1, 2]);
    }

    #[tokio::test]
    async fn replay_log_replays_then_goes_live() {
        let log = ReplayLog::new();
        log.push(1);
        let mut all = log.subscribe();
        let mut fresh = log.subscribe_from_now();
        log.push(2);
        log.close();
        log.push(3);
        assert_eq!(all.recv().await, Some(1));
        assert_eq!(all.recv().await, Some(2));
        assert_eq!(all.recv().await, None);
        assert_eq!(fresh.recv().await, Some(2));
        assert_eq!(fresh.recv().await, None);
        let mut late = log.subscribe();
        assert_eq!(late.recv().await, Some(1));
        assert_eq!(late.recv().await, Some(2));
        assert_eq!(late.recv().await, None);
    }
}
