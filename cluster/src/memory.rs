//! A cluster in one process, without NATS: a [`MemoryNetwork`] that several nodes join (for
//! tests), carrying their envelopes and heartbeats ([`MemoryTransport`]) and holding their
//! directory (`MemoryBucket`) with the same contract as core NATS and the JetStream KV
//! bucket: at-most-once delivery in order from one publisher to one subscriber, and changes
//! numbered by one revision counter, read and watched in revision order.

use bytes::Bytes;
use futures::StreamExt;
use std::any::Any;
use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use tokio::sync::mpsc;

use crate::kv::{Bucket, BucketError, Change, ChangeOp, Changes};
use crate::transport::{Messages, Transport, TransportError, TransportFuture};
use crate::writes::WriteError;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    match m.lock() {
        Ok(g) => g,
        Err(p) => p.into_inner(),
    }
}

/// The nodes' meeting place: subjects with their subscribers, and the directory. Cloned, it
/// is the same network.
#[derive(Clone, Default)]
pub struct MemoryNetwork {
    subjects: Arc<Mutex<HashMap<String, Vec<mpsc::UnboundedSender<Bytes>>>>>,
    bucket: Arc<MemoryBucket>,
}

impl std::fmt::Debug for MemoryNetwork {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemoryNetwork").finish_non_exhaustive()
    }
}

impl MemoryNetwork {
    pub fn new() -> Self {
        MemoryNetwork::default()
    }

    /// A node's way onto the network.
    pub fn transport(&self) -> MemoryTransport {
        MemoryTransport {
            network: self.clone(),
        }
    }

    /// The directory every node of the network shares.
    pub(crate) fn bucket(&self) -> Arc<MemoryBucket> {
        self.bucket.clone()
    }
}

/// A node's [`Transport`] over a [`MemoryNetwork`]: a publish hands the payload to every
/// subscriber of its subject at once (a subscriber gone, its node stopped, is dropped).
pub struct MemoryTransport {
    network: MemoryNetwork,
}

impl Transport for MemoryTransport {
    fn publish(
        &self,
        subject: String,
        payload: Bytes,
    ) -> TransportFuture<'_, Result<(), TransportError>> {
        let mut subjects = lock(&self.network.subjects);
        if let Some(subscribers) = subjects.get_mut(&subject) {
            subscribers.retain(|s| s.send(payload.clone()).is_ok());
        }
        Box::pin(std::future::ready(Ok(())))
    }

    fn flush(&self) -> TransportFuture<'_, ()> {
        // Delivered on publish: nothing waits.
        Box::pin(std::future::ready(()))
    }

    fn subscribe(&self, subject: String) -> TransportFuture<'_, Result<Messages, TransportError>> {
        let (tx, rx) = mpsc::unbounded_channel();
        lock(&self.network.subjects)
            .entry(subject)
            .or_default()
            .push(tx);
        Box::pin(std::future::ready(Ok(receiving(rx))))
    }

    fn connected(&self) -> bool {
        true
    }

    fn as_any(self: Arc<Self>) -> Arc<dyn Any + Send + Sync> {
        self
    }
}

/// What `rx` receives, as a stream.
fn receiving<T: Send + 'static>(
    mut rx: mpsc::UnboundedReceiver<T>,
) -> std::pin::Pin<Box<dyn futures::Stream<Item = T> + Send>> {
    Box::pin(futures::stream::poll_fn(move |cx| rx.poll_recv(cx)))
}

/// The directory of a [`MemoryNetwork`]: the last change of each key, and the watchers.
#[derive(Default)]
pub(crate) struct MemoryBucket {
    state: Mutex<BucketState>,
}

#[derive(Default)]
struct BucketState {
    /// The last change's revision.
    revision: u64,
    /// Each key's last change (a delete included), as JetStream keeps one per subject.
    last: HashMap<String, Change>,
    watchers: Vec<mpsc::UnboundedSender<Result<Change, BucketError>>>,
}

impl BucketState {
    /// Makes the next change of `key` and tells every watcher.
    fn change(&mut self, key: &str, op: ChangeOp, value: Bytes) -> u64 {
        self.revision += 1;
        let change = Change {
            key: key.to_owned(),
            op,
            value,
            revision: self.revision,
            delta: 0,
        };
        self.watchers.retain(|w| w.send(Ok(change.clone())).is_ok());
        self.last.insert(key.to_owned(), change);
        self.revision
    }

    /// A new watcher's receiving end.
    fn watcher(&mut self) -> mpsc::UnboundedReceiver<Result<Change, BucketError>> {
        let (tx, rx) = mpsc::unbounded_channel();
        self.watchers.push(tx);
        rx
    }
}

/// Keys as the JetStream KV takes them: not empty, of letters, digits and `-_/=.`, with no
/// empty token between dots.
fn valid_key(key: &str) -> bool {
    !key.is_empty()
        && !key.starts_with('.')
        && !key.ends_with('.')
        && !key.contains("..")
        && key
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_/=.".contains(&b))
}

impl MemoryBucket {
    fn state(&self) -> MutexGuard<'_, BucketState> {
        lock(&self.state)
    }
}

impl Bucket for MemoryBucket {
    fn put<'a>(
        &'a self,
        key: &'a str,
        value: Bytes,
    ) -> TransportFuture<'a, Result<u64, WriteError>> {
        let landed = if valid_key(key) {
            Ok(self.state().change(key, ChangeOp::Put, value))
        } else {
            Err(WriteError::Permanent(format!("invalid key {key:?}")))
        };
        Box::pin(std::future::ready(landed))
    }

    fn delete<'a>(
        &'a self,
        key: &'a str,
        revision: Option<u64>,
    ) -> TransportFuture<'a, Result<(), WriteError>> {
        let done = if valid_key(key) {
            let mut state = self.state();
            let at = state.last.get(key).map(|c| c.revision);
            // At another revision: a newer write is there, nothing to do.
            if revision.is_none_or(|r| at == Some(r)) {
                state.change(key, ChangeOp::Delete, Bytes::new());
            }
            Ok(())
        } else {
            Err(WriteError::Permanent(format!("invalid key {key:?}")))
        };
        Box::pin(std::future::ready(done))
    }

    fn last_revision(&self) -> TransportFuture<'_, Result<u64, BucketError>> {
        Box::pin(std::future::ready(Ok(self.state().revision)))
    }

    fn watch(&self) -> TransportFuture<'_, Result<Changes, BucketError>> {
        let rx = self.state().watcher();
        Box::pin(std::future::ready(Ok(receiving(rx))))
    }

    fn read_all(&self) -> TransportFuture<'_, Result<Changes, BucketError>> {
        let mut state = self.state();
        let mut last: Vec<Change> = state.last.values().cloned().collect();
        last.sort_by_key(|c| c.revision);
        let count = last.len() as u64;
        for (i, c) in last.iter_mut().enumerate() {
            c.delta = count - 1 - i as u64;
        }
        // Registered under the same lock: no change falls between the read and the watch.
        let rx = state.watcher();
        drop(state);
        let read = futures::stream::iter(last.into_iter().map(Ok)).chain(receiving(rx));
        Box::pin(std::future::ready(Ok(Box::pin(read) as Changes)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bytes(s: &'static str) -> Bytes {
        Bytes::from_static(s.as_bytes())
    }

    #[tokio::test]
    async fn a_read_gives_each_keys_last_change_in_revision_order_then_the_changes() {
        let bucket = MemoryBucket::default();
        assert_eq!(bucket.put("a", bytes("1")).await.ok(), Some(1));
        assert_eq!(bucket.put("b", bytes("1")).await.ok(), Some(2));
        assert_eq!(bucket.put("a", bytes("2")).await.ok(), Some(3));
        assert!(bucket.delete("b", None).await.is_ok());
        assert_eq!(bucket.last_revision().await.ok(), Some(4));
        let Ok(mut read) = bucket.read_all().await else {
            panic!("no read");
        };
        let mut seen = Vec::new();
        for _ in 0..2 {
            let Some(Ok(c)) = read.next().await else {
                panic!("the read ended early");
            };
            seen.push((c.key, c.op, c.revision, c.delta));
        }
        assert_eq!(
            seen,
            [
                ("a".to_owned(), ChangeOp::Put, 3, 1),
                ("b".to_owned(), ChangeOp::Delete, 4, 0)
            ]
        );
        assert!(bucket.put("c", bytes("1")).await.is_ok());
        let Some(Ok(c)) = read.next().await else {
            panic!("the read did not go on with the changes");
        };
        assert_eq!((c.key.as_str(), c.revision), ("c", 5));
    }

    #[tokio::test]
    async fn a_delete_of_one_revision_leaves_a_newer_write() {
        let bucket = MemoryBucket::default();
        let Ok(first) = bucket.put("k", bytes("1")).await else {
            panic!("put refused");
        };
        assert!(bucket.put("k", bytes("2")).await.is_ok());
        assert!(bucket.delete("k", Some(first)).await.is_ok());
        assert_eq!(
            bucket.last_revision().await.ok(),
            Some(2),
            "nothing deleted"
        );
        assert!(bucket.delete("k", Some(2)).await.is_ok());
        assert_eq!(bucket.last_revision().await.ok(), Some(3));
        assert!(matches!(
            bucket.put("bad key", bytes("1")).await,
            Err(WriteError::Permanent(_))
        ));
    }

    #[tokio::test]
    async fn a_publish_reaches_every_subscriber_of_its_subject_in_order() {
        let network = MemoryNetwork::new();
        let (one, two) = (network.transport(), network.transport());
        let (Ok(mut first), Ok(mut second)) = (
            one.subscribe("s".to_owned()).await,
            two.subscribe("s".to_owned()).await,
        ) else {
            panic!("cannot subscribe");
        };
        for payload in ["1", "2"] {
            assert!(two.publish("s".to_owned(), bytes(payload)).await.is_ok());
        }
        assert!(one.publish("other".to_owned(), bytes("x")).await.is_ok());
        for sub in [&mut first, &mut second] {
            assert_eq!(sub.next().await, Some(bytes("1")));
            assert_eq!(sub.next().await, Some(bytes("2")));
        }
    }
}
