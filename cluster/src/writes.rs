//! This node's writes to the directory bucket (the records of its own endpoints).
//!
//! One task makes them, one at a time, in the order they were queued. A write that fails (NATS
//! away, JetStream not answering yet after a restart) is never given up: it is retried with a
//! growing pause until it lands. While it waits, a newer write of the same key replaces it, so
//! every key ends at its last write and the book holds at most one write per key, whatever the
//! length of the outage.

use crate::kv::Bucket;
use bytes::Bytes;
use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;
use tokio::sync::{mpsc, oneshot};

use confab_actors::metrics as m;

/// What the node asks of the write task.
pub(super) enum KvOp {
    Put(String, Bytes),
    /// A delete; with a revision, only of the record at that revision (a purge of another
    /// node's record, which its owner may have written again since).
    Delete(String, Option<u64>),
    /// Answered once every write queued before it has landed (or been replaced by a later
    /// write of its key that has landed), with the highest revision a put of this task has
    /// landed at so far: a node whose watch has applied that revision has seen those writes.
    Flush(oneshot::Sender<u64>),
}

/// Why a write did not land.
#[derive(Debug, thiserror::Error)]
pub(crate) enum WriteError {
    /// NATS away, JetStream not answering, a timeout: worth another attempt.
    #[error("{0}")]
    Transient(String),
    /// The write itself is wrong (an invalid key): no attempt can succeed.
    #[error("{0}")]
    Permanent(String),
}

/// Where the writes go: the directory's [`Bucket`], or a stand-in in the tests.
pub(super) trait DirectoryStore: Send + Sync + 'static {
    /// Puts `value` at `key`; the revision it landed at.
    fn put(&self, key: &str, value: Bytes) -> impl Future<Output = Result<u64, WriteError>> + Send;
    /// Deletes `key`; with `revision`, only if the record is still at it (if not, a newer
    /// write is there and nothing is to be done: that is a success).
    fn delete(
        &self,
        key: &str,
        revision: Option<u64>,
    ) -> impl Future<Output = Result<(), WriteError>> + Send;
}

impl DirectoryStore for Arc<dyn Bucket> {
    async fn put(&self, key: &str, value: Bytes) -> Result<u64, WriteError> {
        Bucket::put(&**self, key, value).await
    }

    async fn delete(&self, key: &str, revision: Option<u64>) -> Result<(), WriteError> {
        Bucket::delete(&**self, key, revision).await
    }
}

#[derive(Clone)]
enum Write {
    Put(Bytes),
    Delete(Option<u64>),
}

/// A write waiting in the book.
struct Waiting {
    /// Numbers the key's latest write, to tell whether it was replaced while in flight.
    version: u64,
    write: Write,
}

/// The writes not yet landed: the last one of each key, each key at the place its first
/// waiting write was queued.
#[derive(Default)]
struct Book {
    /// Numbers every op in queue order.
    seq: u64,
    /// (seq, key): the keys with a write waiting, in the order their first waiting write was
    /// queued; one entry per key.
    queue: VecDeque<(u64, String)>,
    waiting: HashMap<String, Waiting>,
    flushes: Vec<(u64, oneshot::Sender<u64>)>,
    /// The highest revision a put has landed at.
    landed_revision: u64,
}

impl Book {
    fn add(&mut self, op: KvOp) {
        self.seq += 1;
        let (key, write) = match op {
            KvOp::Put(key, value) => (key, Write::Put(value)),
            KvOp::Delete(key, revision) => (key, Write::Delete(revision)),
            KvOp::Flush(done) => {
                self.flushes.push((self.seq, done));
                return;
            }
        };
        match self.waiting.get_mut(&key) {
            // Replaced in place: the key keeps its place, so a flush queued after the first
            // write still waits for the key's last one.
            Some(w) => {
                // A delete of one revision only says that revision is stale; it must not
                // replace an unconditional write of the key, which would then not happen.
                let weaker = matches!(write, Write::Delete(Some(_)))
                    && !matches!(w.write, Write::Delete(Some(_)));
                if !weaker {
                    *w = Waiting {
                        version: self.seq,
                        write,
                    };
                }
            }
            None => {
                self.waiting.insert(
                    key.clone(),
                    Waiting {
                        version: self.seq,
                        write,
                    },
                );
                self.queue.push_back((self.seq, key));
            }
        }
    }

    /// The oldest key's write with its version, left in the book until [`Book::landed`].
    fn next(&self) -> Option<(u64, String, Write)> {
        let (_, key) = self.queue.front()?;
        let w = self.waiting.get(key)?;
        Some((w.version, key.clone(), w.write.clone()))
    }

    /// The write `version` of `key` (the front of the queue) has landed, or cannot ever land.
    /// If the key was written again meanwhile, that write stays at the front, next to go.
    fn landed(&mut self, version: u64, key: &str) {
        if self.waiting.get(key).is_some_and(|w| w.version == version) {
            self.waiting.remove(key);
            self.queue.pop_front();
        }
    }

    /// Answers the flushes that no write still waiting was queued before.
    fn answer_flushes(&mut self) {
        let oldest = self.queue.front().map(|(seq, _)| *seq);
        let (ready, waiting) = std::mem::take(&mut self.flushes)
            .into_iter()
            .partition(|(seq, _)| oldest.is_none_or(|o| o > *seq));
        self.flushes = waiting;
        for (_, done) in ready {
            let _ = done.send(self.landed_revision);
        }
    }

    fn is_idle(&self) -> bool {
        self.waiting.is_empty() && self.flushes.is_empty()
    }

    fn pending(&self) -> usize {
        self.waiting.len()
    }
}

/// How long one attempt waits for JetStream's acknowledgement. The client's own request
/// timeout is 5 s, and a request sent just as the connection broke may never be answered: the
/// writes queued behind it would wait that long after NATS is back. A healthy NATS answers in
/// milliseconds; an attempt that times out but lands later is harmless, since the retry writes
/// the same value over the same connection, behind it.
const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(1);

/// The pause before the next attempt after `failures` failures in a row: 100 ms, doubling up
/// to 1 s: a restarted NATS, or the bucket's new leader after a NATS server died (JetStream
/// takes some 6 s to elect it), is found within a second of being back, while sign-ins wait.
fn backoff(failures: u32) -> Duration {
    Duration::from_millis(
        100u64
            .saturating_mul(1 << failures.saturating_sub(1).min(5))
            .min(1000),
    )
}

/// Makes the writes queued on `rx`; ends when `rx` is closed and every write has landed.
/// `failing` is set from a write's failure until a write lands again.
pub(super) async fn write_loop(
    store: impl DirectoryStore,
    mut rx: mpsc::UnboundedReceiver<KvOp>,
    failing: Arc<AtomicBool>,
) {
    let mut book = Book::default();
    let mut failures: u32 = 0;
    let mut closed = false;
    loop {
        if book.is_idle() {
            if closed {
                return;
            }
            match rx.recv().await {
                Some(op) => book.add(op),
                None => return,
            }
        }
        loop {
            match rx.try_recv() {
                Ok(op) => book.add(op),
                Err(mpsc::error::TryRecvError::Empty) => break,
                Err(mpsc::error::TryRecvError::Disconnected) => {
                    closed = true;
                    break;
                }
            }
        }
        book.answer_flushes();
        metrics::gauge!(m::CLUSTER_DIRECTORY_WRITES_PENDING).set(book.pending() as f64);
        let Some((version, key, write)) = book.next() else {
            continue;
        };
        let attempt = async {
            match write {
                Write::Put(value) => store.put(&key, value).await.map(Some),
                Write::Delete(revision) => store.delete(&key, revision).await.map(|()| None),
            }
        };
        let result = tokio::time::timeout(ATTEMPT_TIMEOUT, attempt)
            .await
            .unwrap_or_else(|_| Err(WriteError::Transient("no acknowledgement".to_owned())));
        match result {
            Ok(revision) => {
                if failures > 0 {
                    tracing::info!(failures, "directory writes land again");
                }
                failures = 0;
                failing.store(false, Ordering::Relaxed);
                if let Some(revision) = revision {
                    book.landed_revision = book.landed_revision.max(revision);
                }
                book.landed(version, &key);
            }
            Err(WriteError::Permanent(e)) => {
                tracing::error!(error = %e, %key, "directory write refused; dropping it");
                book.landed(version, &key);
            }
            Err(WriteError::Transient(e)) => {
                failures = failures.saturating_add(1);
                failing.store(true, Ordering::Relaxed);
                // The first failure of a streak, then one line in ten: an outage of minutes
                // must not flood the log.
                if failures == 1 || failures.is_multiple_of(10) {
                    tracing::warn!(
                        error = %e,
                        failures,
                        pending = book.pending(),
                        "directory write failed; it is kept and retried until it lands"
                    );
                }
                tokio::time::sleep(backoff(failures)).await;
            }
        }
        if book.is_idle() {
            // Set here too: the next turn may wait a long while for work.
            metrics::gauge!(m::CLUSTER_DIRECTORY_WRITES_PENDING).set(0.0);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;
    use std::sync::atomic::AtomicU32;

    /// A write that landed: the key, and the value put (`None`: deleted).
    type Landed = (String, Option<Bytes>);

    /// A bucket that fails every write while `down`, and records the writes that land.
    #[derive(Clone, Default)]
    struct FakeStore {
        down: Arc<AtomicBool>,
        attempts: Arc<AtomicU32>,
        landed: Arc<Mutex<Vec<Landed>>>,
    }

    impl FakeStore {
        /// The write's revision (one per landed write, from 1).
        fn write(&self, key: &str, value: Option<Bytes>) -> Result<u64, WriteError> {
            self.attempts.fetch_add(1, Ordering::Relaxed);
            if key.is_empty() {
                return Err(WriteError::Permanent("invalid key".to_owned()));
            }
            if self.down.load(Ordering::Relaxed) {
                return Err(WriteError::Transient("no responders".to_owned()));
            }
            let mut landed = self
                .landed
                .lock()
                .map_err(|e| WriteError::Transient(e.to_string()))?;
            landed.push((key.to_owned(), value));
            Ok(landed.len() as u64)
        }

        fn landed(&self) -> Vec<Landed> {
            self.landed.lock().map(|l| l.clone()).unwrap_or_default()
        }
    }

    impl DirectoryStore for FakeStore {
        async fn put(&self, key: &str, value: Bytes) -> Result<u64, WriteError> {
            self.write(key, Some(value))
        }

        async fn delete(&self, key: &str, _revision: Option<u64>) -> Result<(), WriteError> {
            self.write(key, None).map(|_| ())
        }
    }

    /// A write task over a fake bucket that starts up or down.
    fn writer(up: bool) -> (FakeStore, mpsc::UnboundedSender<KvOp>) {
        let store = FakeStore::default();
        store.down.store(!up, Ordering::Relaxed);
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(write_loop(store.clone(), rx, Arc::default()));
        (store, tx)
    }

    fn put(key: &str, value: &'static str) -> KvOp {
        KvOp::Put(key.to_owned(), Bytes::from_static(value.as_bytes()))
    }

    async fn flushed(tx: &mpsc::UnboundedSender<KvOp>) {
        let (done_tx, done_rx) = oneshot::channel();
        assert!(tx.send(KvOp::Flush(done_tx)).is_ok());
        assert!(done_rx.await.is_ok(), "the write task ended");
    }

    #[tokio::test(start_paused = true)]
    async fn a_write_is_retried_through_an_outage_of_any_length() {
        let (store, tx) = writer(false);
        assert!(tx.send(put("k", "v")).is_ok());

        // Two minutes of paused time: far more attempts than any fixed budget would allow.
        tokio::time::sleep(Duration::from_secs(120)).await;
        assert!(store.attempts.load(Ordering::Relaxed) > 50);
        assert!(store.landed().is_empty());

        store.down.store(false, Ordering::Relaxed);
        flushed(&tx).await;
        assert_eq!(
            store.landed(),
            vec![("k".to_owned(), Some(Bytes::from_static(b"v")))]
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_newer_write_of_a_key_replaces_the_one_still_waiting() {
        let (store, tx) = writer(false);
        assert!(tx.send(put("alice", "laptop")).is_ok());
        assert!(tx.send(put("bob", "desk")).is_ok());
        tokio::time::sleep(Duration::from_secs(5)).await;
        // Alice's endpoint ends during the outage: her put must not land after the delete.
        assert!(tx.send(KvOp::Delete("alice".to_owned(), None)).is_ok());
        assert!(tx.send(put("bob", "desk, away")).is_ok());
        tokio::time::sleep(Duration::from_secs(5)).await;

        store.down.store(false, Ordering::Relaxed);
        flushed(&tx).await;
        assert_eq!(
            store.landed(),
            vec![
                ("alice".to_owned(), None),
                ("bob".to_owned(), Some(Bytes::from_static(b"desk, away"))),
            ]
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_flush_waits_for_the_writes_before_it_and_no_others() {
        let (store, tx) = writer(false);
        assert!(tx.send(put("a", "1")).is_ok());
        let (done_tx, mut done_rx) = oneshot::channel();
        assert!(tx.send(KvOp::Flush(done_tx)).is_ok());
        tokio::time::sleep(Duration::from_secs(10)).await;
        assert!(
            done_rx.try_recv().is_err(),
            "answered before its write landed"
        );

        store.down.store(false, Ordering::Relaxed);
        assert!(done_rx.await.is_ok());
        assert_eq!(store.landed().len(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn writes_of_different_keys_land_in_the_order_queued() {
        let (store, tx) = writer(true);
        for key in ["c", "a", "b"] {
            assert!(tx.send(put(key, "x")).is_ok());
        }
        flushed(&tx).await;
        assert!(tx.send(KvOp::Delete("c".to_owned(), None)).is_ok());
        flushed(&tx).await;
        let keys: Vec<(String, bool)> = store
            .landed()
            .into_iter()
            .map(|(k, v)| (k, v.is_some()))
            .collect();
        assert_eq!(
            keys,
            [("c", true), ("a", true), ("b", true), ("c", false)]
                .map(|(k, put)| (k.to_owned(), put))
        );
    }

    #[test]
    fn a_key_rewritten_many_times_holds_one_place() {
        let mut book = Book::default();
        for i in 0..10_000 {
            book.add(KvOp::Put(format!("k{}", i % 3), Bytes::new()));
        }
        assert_eq!(book.pending(), 3);
        assert_eq!(book.queue.len(), 3);
    }

    #[test]
    fn a_delete_of_one_revision_never_replaces_an_unconditional_write() {
        let mut book = Book::default();
        book.add(KvOp::Delete("k".to_owned(), None));
        book.add(KvOp::Delete("k".to_owned(), Some(7)));
        assert!(matches!(book.next(), Some((_, _, Write::Delete(None)))));
        book.add(put("k", "v"));
        book.add(KvOp::Delete("k".to_owned(), Some(8)));
        assert!(matches!(book.next(), Some((_, _, Write::Put(_)))));
        // Between two conditional deletes the later one wins, like any other write.
        book.add(KvOp::Delete("j".to_owned(), Some(1)));
        book.add(KvOp::Delete("j".to_owned(), Some(2)));
        assert!(matches!(
            book.waiting.get("j").map(|w| &w.write),
            Some(Write::Delete(Some(2)))
        ));
    }

    #[tokio::test(start_paused = true)]
    async fn a_flush_waits_for_a_key_written_again_after_it() {
        let (store, tx) = writer(false);
        assert!(tx.send(put("a", "1")).is_ok());
        let (done_tx, mut done_rx) = oneshot::channel();
        assert!(tx.send(KvOp::Flush(done_tx)).is_ok());
        assert!(tx.send(KvOp::Delete("a".to_owned(), None)).is_ok());
        tokio::time::sleep(Duration::from_secs(10)).await;
        assert!(done_rx.try_recv().is_err(), "answered with `a` not written");

        store.down.store(false, Ordering::Relaxed);
        assert!(done_rx.await.is_ok());
        assert_eq!(store.landed(), vec![("a".to_owned(), None)]);
    }

    #[tokio::test(start_paused = true)]
    async fn a_write_that_can_never_land_is_dropped_and_blocks_nothing() {
        let (store, tx) = writer(true);
        assert!(tx.send(put("", "bad")).is_ok());
        assert!(tx.send(put("b", "x")).is_ok());
        flushed(&tx).await;
        assert_eq!(
            store.landed(),
            vec![("b".to_owned(), Some(Bytes::from_static(b"x")))]
        );
        assert_eq!(store.attempts.load(Ordering::Relaxed), 2);
    }

    /// A bucket that never answers the first attempt (a request lost with the connection).
    struct SilentOnce {
        inner: FakeStore,
        silent: AtomicBool,
    }

    impl DirectoryStore for SilentOnce {
        async fn put(&self, key: &str, value: Bytes) -> Result<u64, WriteError> {
            if self.silent.swap(false, Ordering::Relaxed) {
                std::future::pending::<()>().await;
            }
            self.inner.write(key, Some(value))
        }

        async fn delete(&self, key: &str, _revision: Option<u64>) -> Result<(), WriteError> {
            self.inner.write(key, None).map(|_| ())
        }
    }

    #[tokio::test(start_paused = true)]
    async fn an_attempt_never_answered_is_given_up_and_retried() {
        let inner = FakeStore::default();
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(write_loop(
            SilentOnce {
                inner: inner.clone(),
                silent: AtomicBool::new(true),
            },
            rx,
            Arc::default(),
        ));
        let started = tokio::time::Instant::now();
        assert!(tx.send(put("k", "v")).is_ok());
        flushed(&tx).await;
        assert_eq!(inner.landed().len(), 1);
        assert!(started.elapsed() < Duration::from_secs(2));
    }

    #[test]
    fn the_pause_grows_to_two_seconds() {
        let pauses: Vec<u128> = (1..=8).map(|f| backoff(f).as_millis()).collect();
        assert_eq!(pauses, [100, 200, 400, 800, 1000, 1000, 1000, 1000]);
    }

    #[tokio::test(start_paused = true)]
    async fn a_flush_answers_with_the_revision_the_writes_before_it_landed_at() {
        let (_store, tx) = writer(true);
        assert!(tx.send(put("a", "1")).is_ok());
        assert!(tx.send(put("b", "1")).is_ok());
        let (done_tx, done_rx) = oneshot::channel();
        assert!(tx.send(KvOp::Flush(done_tx)).is_ok());
        assert_eq!(done_rx.await.ok(), Some(2));
    }

    #[tokio::test(start_paused = true)]
    async fn failing_is_set_while_writes_fail_and_cleared_when_one_lands() {
        let store = FakeStore::default();
        store.down.store(true, Ordering::Relaxed);
        let failing = Arc::new(AtomicBool::new(false));
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(write_loop(store.clone(), rx, failing.clone()));
        assert!(tx.send(put("a", "1")).is_ok());
        while store.attempts.load(Ordering::Relaxed) == 0 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(failing.load(Ordering::Relaxed));
        store.down.store(false, Ordering::Relaxed);
        flushed(&tx).await;
        assert!(!failing.load(Ordering::Relaxed));
    }
}
