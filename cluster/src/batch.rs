//! What waits for the publisher, batched per destination node as it is queued (issue #23).
//!
//! Every envelope, heartbeat and flush a node sends goes through one [`Outbound`] queue, in the
//! order queued; the publisher task (`routing.rs`) takes everything queued each time it wakes.
//! Envelopes for a node that understands batches are written, as they are queued, into that
//! node's open batch (`Envelope::Batch`, MessagePack exactly as serde writes it): the batch goes
//! out where its first envelope was queued, and holds one node's envelopes in queue order, which
//! is the order the contract relies on between two nodes (a call's events, resends). Nothing
//! waits for a batch to fill: a lone envelope goes alone (not wrapped), at once.
//!
//! Why at queue time, on the sender's thread: before, each envelope was its own allocation,
//! crossed to the publisher's thread through a channel, and was grouped and copied into a batch
//! there. Per cross-node message those hand-offs, the subject's formatting and the frees on
//! another thread were about a tenth of each node's work (a perf profile of both nodes); here an
//! envelope costs one copy into its batch under a short lock, and the publisher takes whole
//! batches.

use bytes::{Buf, BufMut, Bytes, BytesMut};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use tokio::sync::{Notify, oneshot};

use crate::quota::EnvelopeQuota;

/// Most bytes of envelopes in one batch (far below NATS's default 1 MB payload limit).
pub(crate) const MAX_BATCH_BYTES: usize = 256 * 1024;

/// `{"Batch": {"envelopes": [` as serde writes `Envelope::Batch`, before the array's length.
const BATCH_HEAD: &[u8] = b"\x81\xa5Batch\x81\xa9envelopes";

/// Room kept before a batch's envelopes for its head and the longest array length (5 bytes), so
/// that closing a batch writes in place instead of copying the envelopes.
const HEAD_ROOM: usize = BATCH_HEAD.len() + 5;

/// What a batch's buffer grows to at its second envelope: under load batches hold tens of
/// envelopes, and growing the buffer from one envelope's size, copying it each time, was 3% of
/// a node's work.
const BATCH_CAPACITY: usize = 16 * 1024;

/// One thing to publish, in queue order.
#[derive(Debug)]
pub(crate) enum Item {
    /// A payload that goes alone: to a node that does not take batches, or not an envelope.
    One {
        subject: String,
        payload: Bytes,
        bounded: Places,
    },
    /// A node's envelopes, one message.
    Batch(Batch),
    /// Answered once everything queued before it was handed to the transport.
    Flush(oneshot::Sender<()>),
}

/// The places in the quota of envelopes waiting (`quota.rs`) that an item holds: given back
/// once it is handed to the transport.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Places {
    pub envelopes: usize,
    pub bytes: usize,
}

impl Places {
    fn of(len: usize, bounded: bool) -> Places {
        if bounded {
            Places {
                envelopes: 1,
                bytes: len,
            }
        } else {
            Places::default()
        }
    }

    fn add(&mut self, other: Places) {
        self.envelopes += other.envelopes;
        self.bytes += other.bytes;
    }
}

/// One node's envelopes: written as MessagePack bins after room for the batch's head.
#[derive(Debug)]
pub(crate) struct Batch {
    pub subject: String,
    buf: BytesMut,
    /// Where the first envelope's bytes start (after its bin header), for a batch of one.
    first: usize,
    count: usize,
    /// Bytes of the envelopes themselves (what [`MAX_BATCH_BYTES`] bounds).
    size: usize,
    pub bounded: Places,
}

impl Batch {
    fn new(subject: &str, payload: &[u8], bounded: Places) -> Batch {
        let mut buf = BytesMut::with_capacity(HEAD_ROOM + payload.len() + 5);
        buf.put_bytes(0, HEAD_ROOM);
        let mut batch = Batch {
            subject: subject.to_owned(),
            buf,
            first: 0,
            count: 0,
            size: 0,
            bounded: Places::default(),
        };
        batch.append(payload, bounded);
        batch.first = batch.buf.len() - payload.len();
        batch
    }

    fn append(&mut self, payload: &[u8], bounded: Places) {
        if self.count == 1 {
            self.buf.reserve(BATCH_CAPACITY.max(payload.len() + 5));
        }
        let mut w = (&mut self.buf).writer();
        // Writing to memory cannot fail.
        let _ = rmp::encode::write_bin_len(&mut w, payload.len() as u32);
        self.buf.extend_from_slice(payload);
        self.count += 1;
        self.size += payload.len();
        self.bounded.add(bounded);
    }

    /// How many envelopes it holds.
    pub fn len(&self) -> usize {
        self.count
    }

    /// Its subject and the message to publish: the lone envelope as it is, or the whole batch,
    /// byte for byte what [`crate::wire::encode_batch`] writes for the same envelopes.
    ///
    /// The transport may hold a payload a while (the NATS client keeps up to 2,048 while NATS
    /// is away), and the quota counts only its bytes, so a payload never keeps much more memory
    /// alive than its length: a lone envelope is copied out, and so is a batch whose buffer grew
    /// far past what it holds.
    pub fn into_message(mut self) -> (String, Bytes) {
        let subject = std::mem::take(&mut self.subject);
        (subject, self.into_payload())
    }

    fn into_payload(mut self) -> Bytes {
        if self.count == 1 {
            return Bytes::copy_from_slice(&self.buf[self.first..]);
        }
        let mut head = [0u8; HEAD_ROOM];
        let mut w = &mut head[..];
        w.put_slice(BATCH_HEAD);
        let _ = rmp::encode::write_array_len(&mut w, self.count as u32);
        let head_len = HEAD_ROOM - w.len();
        let start = HEAD_ROOM - head_len;
        self.buf[start..HEAD_ROOM].copy_from_slice(&head[..head_len]);
        self.buf.advance(start);
        if self.buf.capacity() > 2 * self.buf.len() + 1024 {
            return Bytes::copy_from_slice(&self.buf);
        }
        self.buf.freeze()
    }
}

/// The items waiting, and the batch still open to each node.
#[derive(Debug, Default)]
pub(crate) struct Queue {
    items: Vec<Item>,
    /// Subject and index in `items` of each open batch.
    open: Vec<(String, usize)>,
}

impl Queue {
    /// Queues `payload` to go alone, after everything queued so far. It closes its subject's
    /// open batch: whatever comes after it goes after it (a node whose heartbeat stops and
    /// starts again saying `batches` may get both kinds in a row).
    pub fn push_one(&mut self, subject: String, payload: Bytes, bounded: bool) {
        self.open.retain(|(s, _)| *s != subject);
        self.items.push(Item::One {
            bounded: Places::of(payload.len(), bounded),
            subject,
            payload,
        });
    }

    /// Queues `payload` for `subject` in that subject's open batch if it fits, else as a new
    /// batch after everything queued so far.
    pub fn push_batched(&mut self, subject: &str, payload: &[u8], bounded: bool) {
        let places = Places::of(payload.len(), bounded);
        if let Some(pos) = self.open.iter().position(|(s, _)| s == subject) {
            let at = self.open[pos].1;
            if let Some(Item::Batch(batch)) = self.items.get_mut(at)
                && batch.size + payload.len() <= MAX_BATCH_BYTES
            {
                batch.append(payload, places);
                return;
            }
            // Full: the next envelopes start another batch, later in the order, so everything
            // before it stays before it.
            self.open.swap_remove(pos);
        }
        self.open.push((subject.to_owned(), self.items.len()));
        self.items
            .push(Item::Batch(Batch::new(subject, payload, places)));
    }

    /// Queues a flush: nothing queued after it joins a batch queued before it.
    pub fn push_flush(&mut self, done: oneshot::Sender<()>) {
        self.open.clear();
        self.items.push(Item::Flush(done));
    }

    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }

    /// Everything queued, in order; the queue starts afresh.
    pub fn take(&mut self) -> Vec<Item> {
        self.open.clear();
        std::mem::take(&mut self.items)
    }
}

/// The queue shared by every thread that sends and the publisher that takes from it.
pub(crate) struct Outbound {
    queue: Mutex<Shared>,
    ready: Notify,
    quota: Arc<EnvelopeQuota>,
}

struct Shared {
    queue: Queue,
    /// Set once the publisher has stopped (its runtime is shutting down): nothing is queued.
    closed: bool,
}

impl Outbound {
    pub fn new(quota: Arc<EnvelopeQuota>) -> Self {
        Outbound {
            queue: Mutex::new(Shared {
                queue: Queue::default(),
                closed: false,
            }),
            ready: Notify::new(),
            quota,
        }
    }

    /// Queues a payload in `subject`'s batch (see [`Queue::push_batched`]), or alone when
    /// `subject` does not take batches; false once the publisher has stopped.
    pub fn push(&self, subject: &str, payload: &[u8], batches: bool, bounded: bool) -> bool {
        if batches {
            self.with_queue(|q| q.push_batched(subject, payload, bounded))
        } else {
            let (subject, payload) = (subject.to_owned(), Bytes::copy_from_slice(payload));
            self.with_queue(|q| q.push_one(subject, payload, bounded))
        }
    }

    /// Queues a flush; false once the publisher has stopped.
    pub fn push_flush(&self, done: oneshot::Sender<()>) -> bool {
        self.with_queue(|q| q.push_flush(done))
    }

    fn lock(&self) -> MutexGuard<'_, Shared> {
        // A push or a take cannot leave the queue half changed, so a panic elsewhere while
        // it was held leaves nothing to repair.
        self.queue.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn with_queue(&self, f: impl FnOnce(&mut Queue)) -> bool {
        let mut shared = self.lock();
        if shared.closed {
            return false;
        }
        let was_empty = shared.queue.is_empty();
        f(&mut shared.queue);
        drop(shared);
        // The publisher takes everything each time, so it needs waking only when the queue
        // was empty; a wake-up while it works is kept for its next wait (a `Notify` permit).
        if was_empty {
            self.ready.notify_one();
        }
        true
    }

    /// The publisher's side: waits until something is queued and takes all of it. What it
    /// has not handed over when it is dropped gives its quota places back.
    pub async fn next(&self) -> Taken<'_> {
        loop {
            let items = self.lock().queue.take();
            if !items.is_empty() {
                return Taken {
                    items: items.into_iter(),
                    quota: &self.quota,
                };
            }
            self.ready.notified().await;
        }
    }

    /// The publisher has stopped: what is queued will not go (its places are given back, its
    /// flushes answered by their senders' timeouts), and later pushes are refused, so that
    /// their senders answer for them.
    pub fn close(&self) {
        let items = {
            let mut shared = self.lock();
            shared.closed = true;
            shared.queue.take()
        };
        drop(Taken {
            items: items.into_iter(),
            quota: &self.quota,
        });
    }
}

/// Items taken by the publisher, handed over one by one.
pub(crate) struct Taken<'a> {
    items: std::vec::IntoIter<Item>,
    quota: &'a EnvelopeQuota,
}

impl Iterator for Taken<'_> {
    type Item = Item;

    fn next(&mut self) -> Option<Item> {
        self.items.next()
    }
}

impl Drop for Taken<'_> {
    fn drop(&mut self) {
        for item in self.items.by_ref() {
            let places = match item {
                Item::One { bounded, .. } => bounded,
                Item::Batch(b) => b.bounded,
                Item::Flush(_) => continue,
            };
            if places.envelopes > 0 {
                self.quota.release_many(places.envelopes, places.bytes);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn push(q: &mut Queue, subject: &str, payload: &[u8], batches: bool, bounded: bool) {
        if batches {
            q.push_batched(subject, payload, bounded);
        } else {
            q.push_one(subject.into(), Bytes::copy_from_slice(payload), bounded);
        }
    }

    fn outbound(limit: usize) -> (Outbound, Arc<EnvelopeQuota>) {
        let quota = Arc::new(EnvelopeQuota::new(limit, 1 << 20));
        (Outbound::new(quota.clone()), quota)
    }

    fn payloads(items: impl IntoIterator<Item = Item>) -> Vec<(String, Bytes)> {
        items
            .into_iter()
            .filter_map(|i| match i {
                Item::One {
                    subject, payload, ..
                } => Some((subject, payload)),
                Item::Batch(b) => Some(b.into_message()),
                Item::Flush(_) => None,
            })
            .collect()
    }

    fn batch_of(list: &[&[u8]]) -> Bytes {
        let list: Vec<Bytes> = list.iter().map(|b| Bytes::copy_from_slice(b)).collect();
        crate::wire::encode_batch(&list)
    }

    #[test]
    fn a_lone_envelope_goes_alone() {
        let mut q = Queue::default();
        push(&mut q, "a", b"1", true, false);
        assert_eq!(payloads(q.take()), [("a".into(), Bytes::from_static(b"1"))]);
    }

    #[test]
    fn one_nodes_envelopes_go_together_in_queue_order() {
        let mut q = Queue::default();
        for (s, b) in [("a", b"1"), ("b", b"x"), ("a", b"2"), ("a", b"3")] {
            push(&mut q, s, b, true, false);
        }
        assert_eq!(
            payloads(q.take()),
            [
                ("a".into(), batch_of(&[b"1", b"2", b"3"])),
                ("b".into(), Bytes::from_static(b"x")),
            ]
        );
    }

    #[test]
    fn a_batch_is_byte_for_byte_what_serde_writes() {
        // Array lengths of each MessagePack width, and bins of each width.
        for n in [2usize, 15, 16, 300] {
            let bodies: Vec<Vec<u8>> = (0..n).map(|i| vec![i as u8; i % 3 * 200]).collect();
            let mut q = Queue::default();
            for b in &bodies {
                push(&mut q, "a", b, true, false);
            }
            let refs: Vec<&[u8]> = bodies.iter().map(|b| &b[..]).collect();
            let want = batch_of(&refs);
            let serde = rmp_serde::to_vec_named(&crate::wire::Envelope::Batch {
                envelopes: bodies
                    .iter()
                    .cloned()
                    .map(serde_bytes::ByteBuf::from)
                    .collect(),
            })
            .expect("encodes");
            assert_eq!(want[..], serde[..], "encode_batch is serde's bytes");
            assert_eq!(payloads(q.take()), [("a".into(), want)], "{n} envelopes");
        }
    }

    #[test]
    fn a_node_that_does_not_batch_gets_each_envelope_alone_in_order() {
        let mut q = Queue::default();
        push(&mut q, "old", b"1", false, false);
        push(&mut q, "old", b"2", false, false);
        assert_eq!(
            payloads(q.take()),
            [
                ("old".into(), Bytes::from_static(b"1")),
                ("old".into(), Bytes::from_static(b"2")),
            ]
        );
    }

    #[test]
    fn a_full_batch_starts_another_after_it() {
        let mut q = Queue::default();
        push(&mut q, "a", &vec![0u8; MAX_BATCH_BYTES - 1], true, false);
        push(&mut q, "a", b"12", true, false);
        push(&mut q, "a", b"3", true, false);
        let out = payloads(q.take());
        assert_eq!(
            out.len(),
            2,
            "the second envelope does not fit the first batch"
        );
        assert_eq!(out[1].1, batch_of(&[b"12", b"3"]));
    }

    #[test]
    fn nothing_after_a_flush_joins_a_batch_before_it() {
        let mut q = Queue::default();
        push(&mut q, "a", b"1", true, false);
        q.push_flush(oneshot::channel().0);
        push(&mut q, "a", b"2", true, false);
        let items = q.take();
        assert_eq!(items.len(), 3);
        assert!(matches!(items[1], Item::Flush(_)));
        assert_eq!(
            payloads(items),
            [
                ("a".into(), Bytes::from_static(b"1")),
                ("a".into(), Bytes::from_static(b"2")),
            ]
        );
    }

    /// The quota counts envelopes as well as bytes: a batch gives back one place per bounded
    /// envelope in it (a batch giving back one place for many leaked the count, and the node
    /// then refused every bounded envelope: 1% of the rate in the first measurement).
    #[test]
    fn a_batch_holds_the_places_of_its_bounded_envelopes() {
        let mut q = Queue::default();
        push(&mut q, "a", b"123", true, true);
        push(&mut q, "a", b"45", true, false);
        push(&mut q, "a", b"6", true, true);
        push(&mut q, "old", b"78", false, true);
        let items = q.take();
        let Item::Batch(b) = &items[0] else {
            panic!("a batch first")
        };
        assert_eq!(
            b.bounded,
            Places {
                envelopes: 2,
                bytes: 4
            }
        );
        let Item::One { bounded, .. } = &items[1] else {
            panic!("then one alone")
        };
        assert_eq!(
            *bounded,
            Places {
                envelopes: 1,
                bytes: 2
            }
        );
    }

    #[test]
    fn an_envelope_that_goes_alone_closes_its_subjects_batch() {
        // The node stopped saying `batches` and started again while these waited.
        let mut q = Queue::default();
        push(&mut q, "a", b"1", true, false);
        push(&mut q, "a", b"2", false, false);
        push(&mut q, "a", b"3", true, false);
        assert_eq!(
            payloads(q.take()),
            [
                ("a".into(), Bytes::from_static(b"1")),
                ("a".into(), Bytes::from_static(b"2")),
                ("a".into(), Bytes::from_static(b"3")),
            ],
            "3 does not overtake 2 in 1's batch"
        );
    }

    #[tokio::test]
    async fn the_publisher_is_woken_for_what_is_queued_while_it_works() {
        let (out, _) = outbound(10);
        assert!(out.push("a", b"1", true, false));
        assert_eq!(out.next().await.count(), 1);
        // Queued after the take, before the publisher waits again: not lost.
        assert!(out.push("a", b"2", true, false));
        assert_eq!(
            payloads(out.next().await),
            [("a".into(), Bytes::from_static(b"2"))]
        );
    }

    #[tokio::test]
    async fn places_come_back_when_the_publisher_stops_with_envelopes_taken_or_queued() {
        let (out, quota) = outbound(10);
        for _ in 0..3 {
            assert!(quota.take(5));
            assert!(out.push("a", b"12345", false, true));
        }
        let mut taken = out.next().await;
        assert!(
            taken.next().is_some(),
            "one handed over (its place is the caller's to give back)"
        );
        drop(taken);
        assert_eq!(
            quota.waiting(),
            (1, 5),
            "the two not handed over gave their places back"
        );
        assert!(quota.take(5));
        assert!(out.push("b", b"67890", true, true));
        out.close();
        assert_eq!(
            quota.waiting(),
            (1, 5),
            "what was queued gave its place back"
        );
        assert!(!out.push("a", b"3", true, false), "refused once stopped");
    }
}
