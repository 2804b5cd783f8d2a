//! The table of requests waiting for their reply, keyed by `rid`. It hands out the ids, so an id
//! is never reused while its request is outstanding, and it fails every waiter exactly once when
//! the connection ends.

use std::collections::HashMap;
use std::sync::Mutex;

use confab_protocol::ServerMsg;

use crate::error::ClientError;
use crate::sync::lock;

/// What to do with a request's outcome. It runs on the reader task, so it must not block.
pub(super) type Completion = Box<dyn FnOnce(Result<ServerMsg, ClientError>) + Send>;

#[derive(Default)]
pub(super) struct Pending {
    inner: Mutex<Inner>,
}

#[derive(Default)]
struct Inner {
    next: u32,
    waiting: HashMap<u32, Completion>,
    closed: bool,
}

impl Pending {
    /// Registers a waiter and returns its fresh `rid`; `None` once the connection has ended,
    /// because nobody would ever complete it.
    pub(super) fn register(&self, completion: Completion) -> Option<u32> {
        let mut inner = lock(&self.inner);
        if inner.closed {
            return None;
        }
        // Wrapping is fine: after 2^32 requests the old ids are long answered; the loop only
        // skips ids that are still outstanding.
        let rid = loop {
            inner.next = inner.next.wrapping_add(1);
            if !inner.waiting.contains_key(&inner.next) {
                break inner.next;
            }
        };
        inner.waiting.insert(rid, completion);
        Some(rid)
    }

    /// Completes the waiter of `rid`; false when no request with that id is outstanding.
    pub(super) fn complete(&self, rid: u32, result: Result<ServerMsg, ClientError>) -> bool {
        // Run the completion outside the lock: it may take other locks (call registration).
        let completion = lock(&self.inner).waiting.remove(&rid);
        match completion {
            Some(completion) => {
                completion(result);
                true
            }
            None => false,
        }
    }

    /// Forgets `rid` without completing it (its frame was never sent).
    pub(super) fn forget(&self, rid: u32) {
        lock(&self.inner).waiting.remove(&rid);
    }

    /// Fails every outstanding request with `error()` and refuses new ones.
    pub(super) fn close(&self, error: impl Fn() -> ClientError) {
        let drained: Vec<Completion> = {
            let mut inner = lock(&self.inner);
            inner.closed = true;
            inner.waiting.drain().map(|(_, c)| c).collect()
        };
        for completion in drained {
            completion(Err(error()));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};

    fn counting(counter: &Arc<AtomicUsize>) -> Completion {
        let counter = Arc::clone(counter);
        Box::new(move |_| {
            counter.fetch_add(1, Ordering::SeqCst);
        })
    }

    #[test]
    fn ids_are_unique_and_completed_once() {
        let pending = Pending::default();
        let hits = Arc::new(AtomicUsize::new(0));
        let a = pending.register(counting(&hits)).expect("open");
        let b = pending.register(counting(&hits)).expect("open");
        assert_ne!(a, b);
        assert!(pending.complete(a, Ok(ServerMsg::Ok { rid: Some(a) })));
        assert!(!pending.complete(a, Ok(ServerMsg::Ok { rid: Some(a) })));
        assert_eq!(hits.load(Ordering::SeqCst), 1);
    }

    #[test]
    fn close_fails_waiters_and_refuses_new_ones() {
        let pending = Pending::default();
        let hits = Arc::new(AtomicUsize::new(0));
        pending.register(counting(&hits)).expect("open");
        pending.close(|| ClientError::Closed);
        assert_eq!(hits.load(Ordering::SeqCst), 1);
        assert!(pending.register(counting(&hits)).is_none());
    }

    #[test]
    fn wrapping_skips_outstanding_ids() {
        let pending = Pending::default();
        let first = pending.register(Box::new(|_| {})).expect("open");
        lock(&pending.inner).next = first.wrapping_sub(1);
        let second = pending.register(Box::new(|_| {})).expect("open");
        assert_ne!(first, second);
    }
}
