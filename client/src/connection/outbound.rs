//! The send path's bookkeeping: which link's writer takes the next frame, and on a resumable
//! session the count of the frames sent (the `hello` is 0) and each frame kept until the node's
//! `seen` covers it. Numbering, keeping and queueing happen under one lock, so the numbers are
//! the order of the frames on the wire and a resume can send again exactly those the node did
//! not read, in order.

use std::collections::VecDeque;
use std::sync::Mutex;

use bytes::Bytes;
use thiserror::Error;
use tokio::sync::mpsc;

use crate::sync::lock;

/// Frames kept before the library asks the node (with a `ping`) for a `seen`, so that a busy
/// session does not keep a heartbeat's worth of frames.
const PING_AFTER_KEPT: usize = 512;

#[derive(Default)]
pub(super) struct Outbound {
    inner: Mutex<State>,
}

#[derive(Default)]
struct State {
    /// The current link's writer queue; `None` while there is no link.
    link: Option<mpsc::UnboundedSender<Bytes>>,
    /// On a resumable session: what was sent and not yet acknowledged.
    kept: Option<Kept>,
}

#[derive(Default)]
struct Kept {
    /// The number of the last frame sent.
    sent: u64,
    /// (number, frame), oldest first.
    frames: VecDeque<(u64, Bytes)>,
    /// Frames sent since the last ping, which brings the node's `seen`.
    since_ping: usize,
}

/// Why a frame was not taken.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Refused {
    /// No link, and the session is not resumable: nothing will ever send it.
    NoLink,
}

/// The node's `welcome.resume.seen` cannot be honoured.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub(super) enum ResendError {
    #[error("the node read up to frame {read}, but only {sent} were sent")]
    Ahead { read: u64, sent: u64 },
    #[error("the node read up to frame {read}, but frame {first} is the oldest still kept")]
    Behind { read: u64, first: u64 },
}

impl Outbound {
    /// From now on frames are counted and kept (the `hello` was number 0).
    pub(super) fn start_counting(&self) {
        lock(&self.inner).kept = Some(Kept::default());
    }

    /// Whether frames are counted (the session is resumable).
    pub(super) fn counting(&self) -> bool {
        lock(&self.inner).kept.is_some()
    }

    /// Counts, keeps and queues `frame`. `Ok(true)` asks the caller to send a `ping` soon: the
    /// frames kept since the last one have piled up.
    pub(super) fn send(&self, frame: Bytes) -> Result<bool, Refused> {
        let mut state = lock(&self.inner);
        let State { link, kept } = &mut *state;
        let Some(kept) = kept else {
            let link = link.as_ref().ok_or(Refused::NoLink)?;
            return link
                .send(frame)
                .map(|()| false)
                .map_err(|_| Refused::NoLink);
        };
        kept.sent += 1;
        kept.since_ping += 1;
        kept.frames.push_back((kept.sent, frame.clone()));
        if let Some(link) = link {
            // A writer that is gone means the link is failing; the frame is kept and goes out
            // again with the resume.
            let _ = link.send(frame);
        }
        let ping = kept.since_ping >= PING_AFTER_KEPT;
        if ping {
            kept.since_ping = 0;
        }
        Ok(ping)
    }

    /// A ping is being sent: the count towards the next extra one starts again.
    pub(super) fn pinged(&self) {
        if let Some(kept) = lock(&self.inner).kept.as_mut() {
            kept.since_ping = 0;
        }
    }

    /// The node read our frames up to `upto`: they need not be kept.
    pub(super) fn acked(&self, upto: u64) {
        if let Some(kept) = lock(&self.inner).kept.as_mut() {
            while kept.frames.front().is_some_and(|(n, _)| *n <= upto) {
                kept.frames.pop_front();
            }
        }
    }

    /// The number of the last frame sent (0 while only the `hello` was).
    pub(super) fn sent(&self) -> u64 {
        lock(&self.inner).kept.as_ref().map_or(0, |k| k.sent)
    }

    /// Frames kept for a resume (sent, not yet covered by the node's `seen`).
    pub(super) fn kept(&self) -> usize {
        lock(&self.inner)
            .kept
            .as_ref()
            .map_or(0, |k| k.frames.len())
    }

    /// The first link's writer.
    pub(super) fn attach(&self, link: mpsc::UnboundedSender<Bytes>) {
        lock(&self.inner).link = Some(link);
    }

    /// The link is gone: frames sent from now on are only kept (or refused, if not resumable).
    pub(super) fn detach(&self) {
        lock(&self.inner).link = None;
    }

    /// A resumed link: the node read our frames up to `read`; the later ones go on `link`
    /// again, in order and under the lock, before any new frame. Returns how many.
    pub(super) fn resume(
        &self,
        link: mpsc::UnboundedSender<Bytes>,
        read: u64,
    ) -> Result<usize, ResendError> {
        let mut state = lock(&self.inner);
        let kept = state.kept.get_or_insert_with(Kept::default);
        if read > kept.sent {
            return Err(ResendError::Ahead {
                read,
                sent: kept.sent,
            });
        }
        while kept.frames.front().is_some_and(|(n, _)| *n <= read) {
            kept.frames.pop_front();
        }
        // The node must read on from the frame after `read`, which has to be still here.
        let first = kept.frames.front().map_or(kept.sent + 1, |(n, _)| *n);
        if first != read + 1 {
            return Err(ResendError::Behind { read, first });
        }
        for (_, frame) in &kept.frames {
            let _ = link.send(frame.clone());
        }
        let resent = kept.frames.len();
        state.link = Some(link);
        Ok(resent)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(n: u8) -> Bytes {
        Bytes::from(vec![n])
    }

    #[test]
    fn without_counting_frames_pass_through_and_need_a_link() {
        let out = Outbound::default();
        assert_eq!(out.send(frame(1)), Err(Refused::NoLink));
        let (tx, mut rx) = mpsc::unbounded_channel();
        out.attach(tx);
        assert_eq!(out.send(frame(2)), Ok(false));
        assert_eq!(rx.try_recv().ok(), Some(frame(2)));
        assert_eq!(out.kept(), 0);
    }

    #[test]
    fn counted_frames_are_kept_until_acked_and_resent_in_order() {
        let out = Outbound::default();
        out.start_counting();
        let (tx, _rx) = mpsc::unbounded_channel();
        out.attach(tx);
        for n in 1..=5 {
            out.send(frame(n)).expect("kept");
        }
        out.acked(2);
        assert_eq!(out.kept(), 3);
        out.detach();
        // Sent while there is no link: kept, numbered 6.
        out.send(frame(6)).expect("kept");
        assert_eq!(out.sent(), 6);
        let (tx, mut rx) = mpsc::unbounded_channel();
        assert_eq!(out.resume(tx, 4), Ok(2));
        assert_eq!(rx.try_recv().ok(), Some(frame(5)));
        assert_eq!(rx.try_recv().ok(), Some(frame(6)));
        out.send(frame(7)).expect("kept");
        assert_eq!(rx.try_recv().ok(), Some(frame(7)));
    }

    #[test]
    fn a_resume_the_frames_kept_cannot_honour_is_refused() {
        let out = Outbound::default();
        out.start_counting();
        for n in 1..=4 {
            out.send(frame(n)).expect("kept");
        }
        out.acked(3);
        let (tx, _rx) = mpsc::unbounded_channel();
        assert_eq!(
            out.resume(tx.clone(), 5),
            Err(ResendError::Ahead { read: 5, sent: 4 })
        );
        assert_eq!(
            out.resume(tx, 1),
            Err(ResendError::Behind { read: 1, first: 4 })
        );
    }

    #[test]
    fn many_kept_frames_ask_for_a_ping_once() {
        let out = Outbound::default();
        out.start_counting();
        let asks = (0..PING_AFTER_KEPT * 2)
            .filter(|&n| out.send(frame(n as u8)) == Ok(true))
            .count();
        assert_eq!(asks, 2);
    }
}
