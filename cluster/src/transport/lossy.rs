//! Tests' envelope loss: a [`Transport`] wrapper that loses the envelopes a test armed it to
//! lose, as core NATS may lose them though the sender believes them sent. It reads the
//! envelopes it is given as the network would see them (encoded), so the cluster's own code
//! holds no test hook on the path an envelope takes; a node gets one only when a test starts
//! it with [`ClusterJoin::lossy`](crate::ClusterJoin::lossy).

use bytes::Bytes;
use confab_protocol::{ServerMsg, decode_server};
use std::any::Any;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use super::{Messages, Transport, TransportError, TransportFuture};
use crate::routing::{NODE_SUBJECT_PREFIX, is_bounded_event};
use crate::wire::{Envelope, WireLegMsg};

/// Kinds of envelope [`LossyTransport::lose_next`] can lose.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lose {
    /// A fork's word to its arbiter that its endpoint took it.
    ForkAdopted,
    /// A leg's word to its endpoint that the call ended.
    LegEnded,
    /// An endpoint's word to its leg that it is gone.
    EndpointLost,
    /// An endpoint's word to its ended leg that it has forgotten it.
    Release,
    /// A leg's answer to its client's `message` (`message_delivered` or `message_failed`).
    MessageAnswer,
    /// A leg's `call_state` event for its client.
    CallState,
    /// An endpoint's node's word to a leg's node that it passed the leg's state events on.
    EventsSeen,
}

/// A transport that loses what it was armed to lose and passes everything else on.
pub struct LossyTransport {
    inner: Arc<dyn Transport>,
    armed: Mutex<Armed>,
    /// Whether anything is armed (read on every publish, so the lock is not); written under
    /// the lock only.
    any_armed: AtomicBool,
}

/// What is still to be lost.
#[derive(Default)]
struct Armed {
    /// This many bounded envelopes (see `quota.rs`).
    bounded: usize,
    /// One envelope of each kind listed.
    next: Vec<Lose>,
}

impl LossyTransport {
    pub fn new(inner: Arc<dyn Transport>) -> Self {
        LossyTransport {
            inner,
            armed: Mutex::new(Armed::default()),
            any_armed: AtomicBool::new(false),
        }
    }

    /// The next `n` bounded envelopes (those a client's requests drive, see `quota.rs`) are
    /// lost on the way.
    pub fn lose_bounded_envelopes(&self, n: usize) {
        self.arm(|a| a.bounded = n);
    }

    /// The next envelope of kind `kind` is lost on the way (called twice, the next two are).
    pub fn lose_next(&self, kind: Lose) {
        self.arm(|a| a.next.push(kind));
    }

    /// How many of the envelopes [`LossyTransport::lose_next`] was asked to lose have not been
    /// published yet (0: all were lost).
    pub fn lose_pending(&self) -> usize {
        self.armed().next.len()
    }

    fn armed(&self) -> std::sync::MutexGuard<'_, Armed> {
        match self.armed.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        }
    }

    /// Changes what is armed, and notes whether anything still is.
    fn arm<T>(&self, f: impl FnOnce(&mut Armed) -> T) -> T {
        let mut armed = self.armed();
        let out = f(&mut armed);
        self.any_armed.store(
            armed.bounded > 0 || !armed.next.is_empty(),
            Ordering::SeqCst,
        );
        out
    }

    /// Whether the payload published on `subject` is to be lost (and, if so, counts it).
    fn loses(&self, subject: &str, payload: &[u8]) -> bool {
        if !self.any_armed.load(Ordering::SeqCst) || !subject.starts_with(NODE_SUBJECT_PREFIX) {
            return false;
        }
        let Ok(env) = rmp_serde::from_slice::<Envelope>(payload) else {
            return false;
        };
        let bounded = is_bounded(&env);
        let kind = kind_of(&env);
        self.arm(|armed| {
            if bounded {
                let lost = armed.bounded > 0;
                armed.bounded = armed.bounded.saturating_sub(1);
                lost
            } else {
                let found = kind.and_then(|kind| armed.next.iter().position(|k| *k == kind));
                found.map(|i| armed.next.remove(i)).is_some()
            }
        })
    }
}

/// Whether `env` is one the cluster sends bounded: a client's request for a leg, an offered
/// fork, or a message or composing notice for a client (see `routing.rs` and `link.rs`).
fn is_bounded(env: &Envelope) -> bool {
    match env {
        Envelope::Adopt { .. } => true,
        Envelope::Leg { msg, .. } => msg.is_bounded(),
        Envelope::Event {
            frame, seq: None, ..
        } => decode_server(frame).is_ok_and(|msg| is_bounded_event(&msg)),
        _ => false,
    }
}

/// The [`Lose`] kind of `env`, if it has one.
fn kind_of(env: &Envelope) -> Option<Lose> {
    Some(match env {
        Envelope::ForkAdopted { .. } => Lose::ForkAdopted,
        Envelope::LegEnded { .. } => Lose::LegEnded,
        Envelope::Leg {
            msg: WireLegMsg::EndpointLost,
            ..
        } => Lose::EndpointLost,
        Envelope::Leg {
            msg: WireLegMsg::Release,
            ..
        } => Lose::Release,
        Envelope::EventsSeen { .. } => Lose::EventsSeen,
        Envelope::Event { frame, .. } => match decode_server(frame).ok()? {
            ServerMsg::MessageDelivered { .. } | ServerMsg::MessageFailed { .. } => {
                Lose::MessageAnswer
            }
            ServerMsg::CallState { .. } => Lose::CallState,
            _ => return None,
        },
        _ => return None,
    })
}

impl LossyTransport {
    /// A batch (`batch.rs`) loses the envelopes in it that are armed, one by one, as if each
    /// had gone alone: what is left goes on as a batch, in order.
    fn batch_without_lost(&self, subject: &str, payload: &Bytes) -> Option<Option<Bytes>> {
        if !self.any_armed.load(Ordering::SeqCst) {
            return None;
        }
        let Ok(Envelope::Batch { envelopes }) = rmp_serde::from_slice::<Envelope>(payload) else {
            return None;
        };
        let kept: Vec<Bytes> = envelopes
            .into_iter()
            .map(|e| Bytes::from(e.into_vec()))
            .filter(|e| !self.loses(subject, e))
            .collect();
        Some((!kept.is_empty()).then(|| crate::wire::encode_batch(&kept)))
    }
}

impl Transport for LossyTransport {
    fn publish(
        &self,
        subject: String,
        payload: Bytes,
    ) -> TransportFuture<'_, Result<(), TransportError>> {
        let payload = match self.batch_without_lost(&subject, &payload) {
            Some(Some(rest)) => rest,
            // Every envelope of the batch lost.
            Some(None) => return Box::pin(std::future::ready(Ok(()))),
            None if self.loses(&subject, &payload) => {
                // Lost on the way: the sender believes it sent.
                return Box::pin(std::future::ready(Ok(())));
            }
            None => payload,
        };
        self.inner.publish(subject, payload)
    }

    fn flush(&self) -> TransportFuture<'_, ()> {
        self.inner.flush()
    }

    fn subscribe(&self, subject: String) -> TransportFuture<'_, Result<Messages, TransportError>> {
        self.inner.subscribe(subject)
    }

    fn connected(&self) -> bool {
        self.inner.connected()
    }

    fn as_any(self: Arc<Self>) -> Arc<dyn Any + Send + Sync> {
        self
    }
}
