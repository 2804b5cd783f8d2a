//! The reconnect policy of a resumable session ([`Reconnect`]) and what the library tells the
//! application about its link ([`LinkEvent`]). The backoff is pure (a function of the attempt
//! number and a jitter draw), so its bounds are tested without a socket or a clock.

use std::time::Duration;

/// Opt-in resumable session (docs/protocol.md §3 "Resuming"): the library asks the node to
/// hold the session when the link drops, and on a lost link (socket closed or failed, or the
/// node silent for three heartbeats) reconnects to the same address and resumes, with every
/// frame of both sides delivered once. Attempts are spaced by a jittered exponential backoff
/// and stop when the node's resume window has passed. Even the first attempt waits a little
/// (between half of `first_delay` and all of it): when a node's network fails, its clients do
/// not all come back in the same instant, and a node that saw a closed link end has handled
/// that end before the resume arrives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reconnect {
    /// The delay before the first attempt (jittered); each later one doubles it, up to
    /// `max_delay`.
    pub first_delay: Duration,
    /// The longest delay between two attempts.
    pub max_delay: Duration,
}

impl Default for Reconnect {
    fn default() -> Self {
        Reconnect {
            first_delay: Duration::from_millis(100),
            max_delay: Duration::from_secs(5),
        }
    }
}

impl Reconnect {
    /// The pause before attempt `attempt` (1 is the first). `jitter` in [0, 1) picks a point
    /// in the upper half of the doubled delay, so that many clients cut at once do not come
    /// back in lockstep.
    pub(crate) fn delay(&self, attempt: u32, jitter: f64) -> Duration {
        let doublings = attempt.saturating_sub(1).min(30);
        let full = self
            .first_delay
            .saturating_mul(1u32 << doublings)
            .min(self.max_delay);
        full.mul_f64(0.5 + 0.5 * jitter.clamp(0.0, 1.0))
    }
}

/// What happened to the link of a resumable session, in order with the node's frames: a
/// `Resumed` comes before the first frame of the new link, a `Lost` after the last one.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum LinkEvent {
    /// The link failed; the library is reconnecting and will resume the session. Requests,
    /// calls and sends go on: what is sent now is kept and goes out once resumed.
    Reconnecting {
        /// Why the link was given up, for humans.
        error: String,
    },
    /// The session was taken back on a new link; nothing was lost or repeated.
    Resumed {
        /// Connection attempts this took.
        attempts: u32,
        /// Frames of this client that the node had not read and that were sent again.
        resent: usize,
    },
    /// The session could not be resumed (refused, or the window passed): it is over. Pending
    /// requests fail with [`crate::ClientError::SessionLost`] and calls end locally with 408,
    /// as the node ends them for their remote parties.
    Lost {
        /// Why, for humans (the node's refusal, or the window passing).
        reason: String,
    },
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_double_from_the_first_up_to_the_bound() {
        let policy = Reconnect {
            first_delay: Duration::from_millis(100),
            max_delay: Duration::from_millis(1000),
        };
        // jitter 1.0 (clamped) is the full delay, 0.0 half of it.
        assert_eq!(policy.delay(1, 1.0), Duration::from_millis(100));
        assert_eq!(policy.delay(1, 0.0), Duration::from_millis(50));
        assert_eq!(policy.delay(2, 1.0), Duration::from_millis(200));
        assert_eq!(policy.delay(3, 0.0), Duration::from_millis(200));
        assert_eq!(policy.delay(20, 1.0), Duration::from_millis(1000));
        assert_eq!(policy.delay(u32::MAX, 0.0), Duration::from_millis(500));
    }

    #[test]
    fn jitter_stays_within_the_upper_half() {
        let policy = Reconnect::default();
        for i in 0..100 {
            let jitter = f64::from(i) / 100.0;
            let d = policy.delay(2, jitter);
            assert!(d >= Duration::from_millis(100) && d <= Duration::from_millis(200));
        }
    }
}
