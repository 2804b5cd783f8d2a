//! A token bucket per connection: `rate` requests per second sustained, `burst` at once.
//! Pure arithmetic on instants the caller passes, so it is tested without a clock. The rate and
//! burst are node settings, passed in at each take rather than kept in every bucket: an
//! endpoint holds two buckets, and every byte of an endpoint counts ×250k per GiB.

use std::sync::OnceLock;
use tokio::time::Instant;

/// A rate and a burst, as the settings give them.
#[derive(Debug, Clone, Copy)]
pub struct Rate {
    per_second: f64,
    burst: f64,
}

impl Rate {
    pub fn new(per_second: u32, burst: u32) -> Self {
        Rate {
            per_second: f64::from(per_second.max(1)),
            burst: f64::from(burst.max(1)),
        }
    }
}

/// 16 bytes: the time of the last take is kept in whole milliseconds since a process-wide
/// origin rather than as an `Instant` (16 bytes alone). Whole milliseconds lose nothing over
/// time: each take refills for the milliseconds that passed since the last counted one.
#[derive(Debug)]
pub struct TokenBucket {
    tokens: f64,
    last_ms: u64,
}

/// The origin of [`TokenBucket::last_ms`]: the first instant any bucket was given.
static ORIGIN: OnceLock<Instant> = OnceLock::new();

fn millis(now: Instant) -> u64 {
    let origin = *ORIGIN.get_or_init(|| now);
    u64::try_from(now.saturating_duration_since(origin).as_millis()).unwrap_or(u64::MAX)
}

impl TokenBucket {
    /// A bucket holding `rate`'s whole burst.
    pub fn full(rate: Rate, now: Instant) -> Self {
        TokenBucket {
            tokens: rate.burst,
            last_ms: millis(now),
        }
    }

    /// Whether the bucket would be full at `now` (refilled since its last take).
    pub fn is_full(&self, rate: Rate, now: Instant) -> bool {
        let elapsed_ms = millis(now).saturating_sub(self.last_ms);
        self.tokens + elapsed_ms as f64 * rate.per_second / 1000.0 >= rate.burst
    }

    /// Takes one token if there is one, refilling at `rate` since the last take.
    pub fn try_take(&mut self, rate: Rate, now: Instant) -> bool {
        let now_ms = millis(now);
        let elapsed_ms = now_ms.saturating_sub(self.last_ms);
        if elapsed_ms > 0 {
            self.last_ms = now_ms;
            self.tokens =
                (self.tokens + elapsed_ms as f64 * rate.per_second / 1000.0).min(rate.burst);
        }
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    /// The tests share one process, hence one origin: each starts from it, so none of their
    /// instants falls before it (which would count as the origin itself).
    fn origin() -> Instant {
        *ORIGIN.get_or_init(Instant::now)
    }

    #[test]
    fn a_bucket_is_small() {
        assert_eq!(std::mem::size_of::<TokenBucket>(), 16);
    }

    #[test]
    fn fractions_of_a_millisecond_add_up() {
        let t0 = origin();
        let rate = Rate::new(1000, 1);
        let mut b = TokenBucket::full(rate, t0);
        assert!(b.try_take(rate, t0));
        // One token a millisecond, asked for every 0.25 ms over 10 ms: about ten granted.
        let granted = (1..=40)
            .filter(|i| b.try_take(rate, t0 + Duration::from_micros(250 * i)))
            .count();
        assert!((9..=11).contains(&granted), "{granted}");
    }

    #[test]
    fn burst_then_sustained_rate() {
        let t0 = origin();
        let rate = Rate::new(10, 3);
        let mut b = TokenBucket::full(rate, t0);
        assert!(b.try_take(rate, t0) && b.try_take(rate, t0) && b.try_take(rate, t0));
        assert!(!b.try_take(rate, t0), "burst exhausted");
        assert!(
            b.try_take(rate, t0 + Duration::from_millis(100)),
            "one token per 100 ms"
        );
        assert!(!b.try_take(rate, t0 + Duration::from_millis(100)));
        // Long idle refills only up to the burst.
        let later = t0 + Duration::from_secs(60);
        assert!((0..3).all(|_| b.try_take(rate, later)));
        assert!(!b.try_take(rate, later));
    }
}
