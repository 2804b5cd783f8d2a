//! Micro-benchmarks of the pure per-event rules of the node: presence ranking, effective
//! activity and aggregation (run on every presence change), the fork arbiter's final answer,
//! the per-connection token bucket (run on every inbound frame), and the sign-in token check
//! (run on every `hello`).
//!
//! Run with `cargo bench -p confab-actors --bench ranking`. Measurement windows are short on
//! purpose; treat the numbers as indicative.

use confab_actors::auth::Verifier;
use confab_actors::presence::rank::{self, Publication, Thresholds};
use confab_actors::ratelimit::{Rate, TokenBucket};
use confab_actors::reasons;
use confab_protocol::{Activity, EffectiveActivity, Status};
use criterion::{BatchSize, Criterion, Throughput, black_box, criterion_group, criterion_main};
use std::time::Duration;
use tokio::time::Instant;

/// The node's defaults (`presence.inactive_after_ms`, `presence.away_after_ms`).
const T: Thresholds = Thresholds {
    inactive_after: Duration::from_secs(300),
    away_after: Duration::from_secs(1200),
};

fn configure<'a>(
    c: &'a mut Criterion,
    name: &str,
) -> criterion::BenchmarkGroup<'a, criterion::measurement::WallTime> {
    let mut group = c.benchmark_group(name);
    group
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(2))
        .sample_size(30);
    group
}

/// Endpoint ids and publications covering every ranking branch: fresh and extrapolated
/// activity, never published, equal last input (ties on publication time) and identical
/// publications (ties on the id). All stamps are at most 2000 s before `now`.
fn endpoints(n: usize, t0: Instant) -> (Vec<String>, Vec<Option<Publication>>) {
    let ids = (0..n).map(|i| format!("node-1.5f3a9c21.e{i:x}")).collect();
    let publications = (0..n)
        .map(|i| {
            let at = |secs: u64, activity, idle_s: u64| {
                Some(Publication {
                    activity,
                    stamp: t0 + Duration::from_secs(secs),
                    idle_ms: idle_s * 1000,
                })
            };
            let k = i as u64;
            match i % 7 {
                0 => at(1990 - k, Activity::Active, k % 5),
                1 => at(1000, Activity::Active, 30), // idle > 300 s: inactive
                2 => at(1995, Activity::Inactive, 0),
                3 => at(1999, Activity::Away, 0),
                4 => None,
                5 => at(1980, Activity::Active, 10), // same last input as 6, older stamp
                _ => at(1985, Activity::Active, 15),
            }
        })
        .collect();
    (ids, publications)
}

/// A deterministic shuffle, so sorting starts from the same unsorted order every run.
fn shuffle<T>(items: &mut [T]) {
    let mut state: u64 = 0x9e37_79b9_7f4a_7c15;
    for i in (1..items.len()).rev() {
        state = state
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        let j = (state >> 33) as usize % (i + 1);
        items.swap(i, j);
    }
}

fn bench_rank(c: &mut Criterion) {
    let mut group = configure(c, "rank");
    let t0 = Instant::now();
    let now = t0 + Duration::from_secs(2000);

    for n in [3usize, 10, 32] {
        let (ids, publications) = endpoints(n, t0);
        let mut unsorted: Vec<(&str, Option<&Publication>)> = ids
            .iter()
            .map(String::as_str)
            .zip(publications.iter().map(Option::as_ref))
            .collect();
        shuffle(&mut unsorted);
        group.throughput(Throughput::Elements(n as u64));
        // As `PresenceShard::ranked` does it: a fresh Vec of borrowed endpoints, sorted.
        group.bench_function(format!("sort_by_compare/{n}"), |b| {
            b.iter_batched_ref(
                || unsorted.clone(),
                |eps| {
                    eps.sort_by(|a, b| rank::compare(*a, *b, black_box(now), black_box(T)));
                    black_box(eps.first().map(|e| e.0));
                },
                BatchSize::SmallInput,
            )
        });
    }

    let (_, publications) = endpoints(32, t0);
    group.throughput(Throughput::Elements(publications.len() as u64));
    group.bench_function("effective/mixed_32", |b| {
        b.iter(|| {
            for p in &publications {
                black_box(rank::effective(
                    black_box(p.as_ref()),
                    black_box(now),
                    black_box(T),
                ));
            }
        })
    });

    let statuses = [
        None,
        Some(Status::Available),
        Some(Status::Busy),
        Some(Status::DoNotDisturb),
        Some(Status::BeRightBack),
        Some(Status::Away),
        Some(Status::AppearOffline),
    ];
    let activities = [
        None,
        Some(EffectiveActivity::Active),
        Some(EffectiveActivity::Inactive),
        Some(EffectiveActivity::Unknown),
        Some(EffectiveActivity::Away),
    ];
    group.throughput(Throughput::Elements(
        (statuses.len() * activities.len()) as u64,
    ));
    group.bench_function("aggregate/all_35_combinations", |b| {
        b.iter(|| {
            for &status in &statuses {
                for &top in &activities {
                    black_box(rank::aggregate(black_box(status), black_box(top)));
                }
            }
        })
    });
    group.finish();
}

fn bench_reasons(c: &mut Criterion) {
    let mut group = configure(c, "reasons");
    group.throughput(Throughput::Elements(1));
    for (name, codes, expected) in [
        ("best_final/0_forks", &[][..], 480),
        ("best_final/2_forks_480", &[480, 480][..], 480),
        ("best_final/3_forks_480_486_603", &[480, 486, 603][..], 603),
        (
            "best_final/8_forks_mixed",
            &[480, 486, 480, 500, 480, 486, 404, 480][..],
            486,
        ),
    ] {
        assert_eq!(reasons::best_final(codes).code, expected);
        group.bench_function(name, |b| b.iter(|| reasons::best_final(black_box(codes))));
    }
    group.finish();
}

fn bench_ratelimit(c: &mut Criterion) {
    let mut group = configure(c, "ratelimit");
    group.throughput(Throughput::Elements(1));
    let t0 = Instant::now();

    // Refilled between every call: the common case of a well-behaved client.
    let rate = Rate::new(1_000_000, 100);
    let mut bucket = TokenBucket::full(rate, t0);
    let mut now = t0;
    group.bench_function("try_take/allowed", |b| {
        b.iter(|| {
            now += Duration::from_millis(1);
            assert!(bucket.try_take(rate, black_box(now)));
        })
    });

    // Exhausted and not refilling: a client flooding within one instant.
    let rate = Rate::new(1, 1);
    let mut bucket = TokenBucket::full(rate, t0);
    assert!(bucket.try_take(rate, t0));
    group.bench_function("try_take/limited", |b| {
        b.iter(|| {
            assert!(!bucket.try_take(rate, black_box(t0)));
        })
    });
    group.finish();
}

/// The token check of a sign-in (HS256 signature, expiry, subject against the claimed user),
/// with a token shaped like the bench's and the CLI's.
fn bench_signin(c: &mut Criterion) {
    #[derive(serde::Serialize)]
    struct Claims<'a> {
        sub: &'a str,
        exp: u64,
    }
    let mut group = configure(c, "signin");
    group.throughput(Throughput::Elements(1));
    let user = "sip:idle1234-5f3a9c@bench.invalid";
    let token = jsonwebtoken::encode(
        &jsonwebtoken::Header::default(),
        &Claims {
            sub: user,
            exp: jsonwebtoken::get_current_timestamp() + 3600,
        },
        &jsonwebtoken::EncodingKey::from_secret(b"change-me"),
    )
    .expect("a token");
    let verifier = Verifier::new("change-me", 5);
    group.bench_function("verify_token", |b| {
        b.iter(|| verifier.verify(black_box(&token), black_box(user)))
    });
    group.finish();
}

criterion_group!(
    benches,
    bench_rank,
    bench_reasons,
    bench_ratelimit,
    bench_signin
);
criterion_main!(benches);
