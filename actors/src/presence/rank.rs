//! The pure rules of presence: an endpoint's effective activity from its last publication and
//! the node's clock, the deterministic "most active endpoint" ranking, and the aggregation of a
//! user's availability. Pure functions of their inputs, so every node computes the same answer.

use confab_protocol::{Activity, Availability, EffectiveActivity, Status};
use std::cmp::Ordering;
use std::time::Duration;
use tokio::time::Instant;

/// A `device_state` publication, stamped with the node's clock on arrival.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Publication {
    pub activity: Activity,
    pub stamp: Instant,
    pub idle_ms: u64,
}

impl Publication {
    /// How long the device has been idle at `now` (last input = stamp − idle_ms).
    pub fn idle_at(&self, now: Instant) -> Duration {
        now.saturating_duration_since(self.stamp) + Duration::from_millis(self.idle_ms)
    }
}

/// When an endpoint's last input becomes old enough to count as inactive, then away.
#[derive(Debug, Clone, Copy)]
pub struct Thresholds {
    pub inactive_after: Duration,
    pub away_after: Duration,
}

/// The activity the node shows for an endpoint at `now`.
pub fn effective(p: Option<&Publication>, now: Instant, t: Thresholds) -> EffectiveActivity {
    let Some(p) = p else {
        return EffectiveActivity::Unknown;
    };
    let idle = p.idle_at(now);
    let published = EffectiveActivity::from(p.activity);
    if idle >= t.away_after {
        EffectiveActivity::Away
    } else if idle >= t.inactive_after {
        published.max(EffectiveActivity::Inactive)
    } else {
        published
    }
}

/// The next instant at which `effective` would change for this publication, if any.
pub fn next_crossing(p: &Publication, now: Instant, t: Thresholds) -> Option<Instant> {
    let idle = p.idle_at(now);
    [t.inactive_after, t.away_after]
        .into_iter()
        .filter(|th| *th > idle)
        .map(|th| now + (th - idle))
        .min()
}

/// Compares two endpoints for the ranking: lower is more active. Ties break on the latest last
/// input, then the latest publication, then the endpoint id (ascending bytes).
pub fn compare(
    a: (&str, Option<&Publication>),
    b: (&str, Option<&Publication>),
    now: Instant,
    t: Thresholds,
) -> Ordering {
    let key = |(_, p): (&str, Option<&Publication>)| {
        (
            effective(p, now, t),
            p.map(|p| p.idle_at(now)),
            p.map(|p| std::cmp::Reverse(p.stamp)),
        )
    };
    let (ea, ia, sa) = key(a);
    let (eb, ib, sb) = key(b);
    ea.cmp(&eb)
        // A known idle time beats an unknown one; a shorter one beats a longer one.
        .then_with(|| match (ia, ib) {
            (Some(x), Some(y)) => x.cmp(&y),
            (Some(_), None) => Ordering::Less,
            (None, Some(_)) => Ordering::Greater,
            (None, None) => Ordering::Equal,
        })
        .then_with(|| match (sa, sb) {
            (Some(x), Some(y)) => x.cmp(&y),
            (Some(_), None) => Ordering::Less,
            (None, Some(_)) => Ordering::Greater,
            (None, None) => Ordering::Equal,
        })
        .then_with(|| a.0.as_bytes().cmp(b.0.as_bytes()))
}

/// The availability watchers see, from the manual status and the most active endpoint's
/// effective activity (`None` when the user has no endpoint).
pub fn aggregate(status: Option<Status>, most_active: Option<EffectiveActivity>) -> Availability {
    let Some(top) = most_active else {
        return Availability::Offline;
    };
    match status {
        Some(Status::AppearOffline) => Availability::Offline,
        Some(Status::Busy)
            if matches!(top, EffectiveActivity::Inactive | EffectiveActivity::Away) =>
        {
            Availability::BusyInactive
        }
        Some(Status::Busy) => Availability::Busy,
        Some(Status::DoNotDisturb) => Availability::DoNotDisturb,
        Some(Status::BeRightBack) => Availability::BeRightBack,
        Some(Status::Away) => Availability::Away,
        Some(Status::Available) => Availability::Available,
        None => match top {
            EffectiveActivity::Active | EffectiveActivity::Unknown => Availability::Available,
            EffectiveActivity::Inactive => Availability::Inactive,
            EffectiveActivity::Away => Availability::Away,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const T: Thresholds = Thresholds {
        inactive_after: Duration::from_secs(300),
        away_after: Duration::from_secs(1200),
    };

    fn publ(activity: Activity, stamp: Instant, idle_s: u64) -> Publication {
        Publication {
            activity,
            stamp,
            idle_ms: idle_s * 1000,
        }
    }

    #[test]
    fn idle_extrapolation_crosses_thresholds() {
        let t0 = Instant::now();
        let p = publ(Activity::Active, t0, 0);
        assert_eq!(effective(Some(&p), t0, T), EffectiveActivity::Active);
        assert_eq!(
            effective(Some(&p), t0 + Duration::from_secs(300), T),
            EffectiveActivity::Inactive
        );
        assert_eq!(
            effective(Some(&p), t0 + Duration::from_secs(1200), T),
            EffectiveActivity::Away
        );
        assert_eq!(
            next_crossing(&p, t0, T),
            Some(t0 + Duration::from_secs(300))
        );
        let away = publ(Activity::Away, t0, 400);
        assert_eq!(effective(Some(&away), t0, T), EffectiveActivity::Away);
        assert_eq!(effective(None, t0, T), EffectiveActivity::Unknown);
    }

    #[test]
    fn ranking_order_activity_then_last_input_then_publication_then_id() {
        let t0 = Instant::now();
        let now = t0 + Duration::from_secs(10);
        let active_old = publ(Activity::Active, t0, 5); // idle 15 s
        let active_new = publ(Activity::Active, t0 + Duration::from_secs(5), 0); // idle 5 s
        let inactive = publ(Activity::Inactive, now, 0);
        let away = publ(Activity::Away, now, 0);
        let mut eps = [
            ("e-away", Some(&away)),
            ("e-unknown", None),
            ("e-inactive", Some(&inactive)),
            ("e-old", Some(&active_old)),
            ("e-new", Some(&active_new)),
        ];
        eps.sort_by(|a, b| compare(*a, *b, now, T));
        let ids: Vec<&str> = eps.iter().map(|e| e.0).collect();
        assert_eq!(ids, ["e-new", "e-old", "e-inactive", "e-unknown", "e-away"]);
    }

    #[test]
    fn ties_break_on_publication_then_id() {
        let t0 = Instant::now();
        let now = t0 + Duration::from_secs(10);
        // Same last input (t0), published at different times.
        let early = publ(Activity::Active, t0, 0);
        let late = publ(Activity::Active, t0 + Duration::from_secs(4), 4);
        assert_eq!(
            compare(("a", Some(&early)), ("b", Some(&late)), now, T),
            Ordering::Greater
        );
        assert_eq!(compare(("a", None), ("b", None), now, T), Ordering::Less);
    }

    #[test]
    fn aggregation_rules() {
        use Availability as A;
        use EffectiveActivity as E;
        assert_eq!(aggregate(Some(Status::Busy), None), A::Offline);
        assert_eq!(aggregate(None, Some(E::Unknown)), A::Available);
        assert_eq!(aggregate(None, Some(E::Inactive)), A::Inactive);
        assert_eq!(aggregate(None, Some(E::Away)), A::Away);
        assert_eq!(
            aggregate(Some(Status::AppearOffline), Some(E::Active)),
            A::Offline
        );
        assert_eq!(
            aggregate(Some(Status::Busy), Some(E::Inactive)),
            A::BusyInactive
        );
        assert_eq!(
            aggregate(Some(Status::Busy), Some(E::Away)),
            A::BusyInactive
        );
        assert_eq!(aggregate(Some(Status::Busy), Some(E::Active)), A::Busy);
        assert_eq!(
            aggregate(Some(Status::Available), Some(E::Away)),
            A::Available
        );
        assert_eq!(
            aggregate(Some(Status::BeRightBack), Some(E::Active)),
            A::BeRightBack
        );
    }
}
