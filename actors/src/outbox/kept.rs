//! What a resumable session's outbox keeps (docs/protocol.md §3 "Resuming"): the numbering of
//! the frames the writer sends (the `welcome` is frame 0, the first frame after it is 1), the
//! encoded frames the client has not yet acknowledged with `seen`, bounded, and what a resume
//! replays. Plain bookkeeping with no I/O; the outbox calls it under its queue's lock, so the
//! numbers it hands out always match the bytes a resume sends again.

use bytes::Bytes;
use std::collections::VecDeque;

/// The unseen frames passed `session.max_unseen_frames` or `max_unseen_bytes`: the client is
/// a slow consumer.
#[derive(Debug, PartialEq, Eq)]
pub struct Overflow;

/// Why a client's count of the frames it read cannot be taken.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CountError {
    /// It says it read a frame the node never sent.
    Ahead,
    /// It says it read less than it already acknowledged: what it missed is no longer kept.
    Behind,
}

/// The frames of one resumable session that the client has not acknowledged yet.
#[derive(Debug)]
pub struct Kept {
    /// The number the next frame the writer takes gets.
    next: u64,
    /// Frames numbered `next - frames.len()` to `next - 1`, each its own encoded bytes.
    frames: VecDeque<Bytes>,
    bytes: usize,
    max_frames: usize,
    max_bytes: usize,
}

impl Kept {
    /// Nothing sent yet: the next frame is the `welcome`, number 0.
    pub fn new(max_frames: usize, max_bytes: usize) -> Self {
        Kept {
            next: 0,
            frames: VecDeque::new(),
            bytes: 0,
            max_frames,
            max_bytes,
        }
    }

    /// The number of the last frame sent (0: only the `welcome`, or nothing yet).
    pub fn last_sent(&self) -> u64 {
        self.next.saturating_sub(1)
    }

    /// Frames kept now (sent, not yet acknowledged).
    pub fn len(&self) -> usize {
        self.frames.len()
    }

    /// Numbers the frames of one written batch, `buf` cut at `ends` (the end offset of each
    /// frame), and keeps them. Frame 0, the `welcome`, is numbered but not kept: a resume
    /// answers with a welcome of its own. Past a bound, nothing is kept and the session is
    /// over (the frames are still numbered: nothing will be replayed anyway).
    pub fn keep(&mut self, buf: &Bytes, ends: &[usize]) -> Result<(), Overflow> {
        let mut start = 0;
        for &end in ends {
            if self.next > 0 {
                self.frames.push_back(buf.slice(start..end));
                self.bytes += end - start;
            }
            self.next += 1;
            start = end;
        }
        if self.frames.len() > self.max_frames || self.bytes > self.max_bytes {
            self.frames.clear();
            self.bytes = 0;
            return Err(Overflow);
        }
        Ok(())
    }

    /// The client read every frame up to `upto`: they need not be kept. A count below what is
    /// already forgotten is an old acknowledgement and changes nothing.
    pub fn saw(&mut self, upto: u64) -> Result<(), CountError> {
        if upto > self.last_sent() {
            return Err(CountError::Ahead);
        }
        let first = self.next - self.frames.len() as u64;
        let forget = upto.saturating_add(1).saturating_sub(first);
        for _ in 0..forget.min(self.frames.len() as u64) {
            if let Some(f) = self.frames.pop_front() {
                self.bytes -= f.len();
            }
        }
        Ok(())
    }

    /// A resume where the client read up to `seen`: forgets what it read and returns the
    /// frames after it, in order, to send again. They stay kept until acknowledged.
    pub fn replay_after(&mut self, seen: u64) -> Result<Vec<Bytes>, CountError> {
        let first = self.next - self.frames.len() as u64;
        if seen > self.last_sent() {
            return Err(CountError::Ahead);
        }
        // Frame `first` is the oldest kept; a client that read less than `first - 1` misses
        // frames already forgotten (frame 0, the welcome, is never replayed).
        if seen.saturating_add(1) < first {
            return Err(CountError::Behind);
        }
        self.saw(seen)?;
        Ok(self.frames.iter().cloned().collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One batch of `n` one-byte frames holding 1, 2, ... (mod 256) from `from`.
    fn batch(from: u8, n: u8) -> (Bytes, Vec<usize>) {
        let buf: Vec<u8> = (0..n).map(|i| from.wrapping_add(i)).collect();
        let ends = (1..=usize::from(n)).collect();
        (Bytes::from(buf), ends)
    }

    fn kept_with(frames: u8) -> Kept {
        let mut k = Kept::new(100, 1000);
        // The welcome (frame 0), then `frames` frames holding their own numbers.
        let (b, e) = batch(0, frames + 1);
        k.keep(&b, &e).expect("within bounds");
        k
    }

    #[test]
    fn the_welcome_is_frame_zero_and_is_not_kept() {
        let k = kept_with(0);
        assert_eq!(k.last_sent(), 0);
        assert_eq!(k.len(), 0);
    }

    #[test]
    fn frames_after_the_welcome_are_numbered_from_one_across_batches() {
        let mut k = kept_with(3);
        let (b, e) = batch(4, 2);
        k.keep(&b, &e).expect("within bounds");
        assert_eq!(k.last_sent(), 5);
        let replay = k.replay_after(0).expect("nothing read yet is valid");
        let numbers: Vec<u8> = replay.iter().map(|f| f[0]).collect();
        assert_eq!(numbers, [1, 2, 3, 4, 5]);
    }

    #[test]
    fn seen_forgets_what_the_client_read() {
        let mut k = kept_with(5);
        k.saw(3).expect("sent");
        assert_eq!(k.len(), 2);
        let replay = k.replay_after(3).expect("valid");
        assert_eq!(replay.iter().map(|f| f[0]).collect::<Vec<_>>(), [4, 5]);
    }

    #[test]
    fn an_old_seen_changes_nothing() {
        let mut k = kept_with(5);
        k.saw(4).expect("sent");
        k.saw(2).expect("an old acknowledgement is no error");
        assert_eq!(k.len(), 1);
    }

    #[test]
    fn seen_ahead_of_what_was_sent_is_refused() {
        let mut k = kept_with(2);
        assert_eq!(k.saw(3), Err(CountError::Ahead));
        assert_eq!(k.replay_after(3), Err(CountError::Ahead));
        assert_eq!(k.len(), 2, "a refused count forgets nothing");
    }

    #[test]
    fn a_resume_behind_what_was_acknowledged_is_refused() {
        let mut k = kept_with(5);
        k.saw(4).expect("sent");
        assert_eq!(k.replay_after(2), Err(CountError::Behind));
        assert!(
            k.replay_after(4).is_ok(),
            "exactly the acknowledged count is fine"
        );
    }

    #[test]
    fn a_resume_that_read_everything_replays_nothing() {
        let mut k = kept_with(3);
        assert!(k.replay_after(3).expect("valid").is_empty());
    }

    #[test]
    fn replayed_frames_stay_kept_until_seen() {
        let mut k = kept_with(3);
        k.replay_after(1).expect("valid");
        assert_eq!(k.len(), 2);
        assert_eq!(k.replay_after(1).expect("a second resume").len(), 2);
    }

    #[test]
    fn passing_the_frame_bound_overflows() {
        let mut k = Kept::new(3, 1000);
        let (b, e) = batch(0, 4);
        assert!(k.keep(&b, &e).is_ok(), "welcome + 3 kept");
        let (b, e) = batch(4, 1);
        assert_eq!(k.keep(&b, &e), Err(Overflow));
    }

    #[test]
    fn passing_the_byte_bound_overflows() {
        let mut k = Kept::new(100, 10);
        let (b, e) = batch(0, 11);
        assert!(k.keep(&b, &e).is_ok(), "welcome + 10 bytes kept");
        let (b, e) = batch(11, 1);
        assert_eq!(k.keep(&b, &e), Err(Overflow));
    }
}
