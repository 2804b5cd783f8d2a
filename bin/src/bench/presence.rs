//! `presence`: W watchers (each a different user) subscribe to one user whose device alternates
//! between `active` and `away`. Reports publication → notification latency at every watcher.
//! The node allows one connection `limits.presence_updates_per_second` changes (a burst of
//! `presence_update_burst`); a change refused for it is made again after a pause and counted
//! as `rate_limited`.

use anyhow::bail;
use confab_protocol::{Activity, Availability, ClientMsg, ErrorCode, ServerMsg};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;
use tokio::sync::mpsc;
use tokio::time::Instant;

use super::conn::{Conn, Target};
use super::report::{Report, histogram, record};
use super::{Progress, run_id};

/// How long the publisher waits after a change the node refused for its presence rate limit.
const RATE_LIMITED_PAUSE: Duration = Duration::from_millis(20);

pub struct Params {
    pub watchers: usize,
    pub changes: usize,
}

pub async fn run(t: &Target, p: &Params, progress: &Progress) -> anyhow::Result<Report> {
    let run = run_id();
    let watched = format!("sip:watched-{run}@bench.invalid");
    let mut publisher = Conn::sign_in(t, &watched, "desk", None).await?;
    let (tx, mut rx) = mpsc::unbounded_channel::<(Availability, Instant)>();
    for i in 0..p.watchers {
        let mut w =
            Conn::sign_in(t, &format!("sip:watcher{i}-{run}@bench.invalid"), "w", None).await?;
        w.send(&ClientMsg::Subscribe {
            rid: Some(1),
            users: vec![watched.clone()],
        })
        .await?;
        // The snapshot.
        w.recv_until(Duration::from_secs(10), |m| {
            matches!(m, ServerMsg::Presence { .. })
        })
        .await?;
        let tx = tx.clone();
        tokio::spawn(async move {
            while let Ok(m) = w.recv().await {
                if let ServerMsg::Presence { availability, .. } = m {
                    let _ = tx.send((availability, Instant::now()));
                }
            }
        });
    }
    let notified = Arc::new(AtomicU64::new(0));
    let ticker = progress.spawn_counter((p.changes * p.watchers) as u64, notified.clone());
    let mut latency = histogram();
    let mut missed = 0u64;
    let mut rate_limited = 0u64;
    let start = Instant::now();
    for i in 0..p.changes {
        let (activity, expect) = if i % 2 == 0 {
            (Activity::Away, Availability::Away)
        } else {
            (Activity::Active, Availability::Available)
        };
        let t0 = loop {
            let t0 = Instant::now();
            publisher
                .send(&ClientMsg::DeviceState {
                    rid: None,
                    activity,
                    idle_ms: None,
                })
                .await?;
            let answer = publisher
                .recv_until(Duration::from_secs(5), |m| {
                    matches!(m, ServerMsg::Ok { .. } | ServerMsg::Error { .. })
                })
                .await?;
            match answer {
                ServerMsg::Ok { .. } => break t0,
                // Over the node's `limits.presence_updates_per_second`: the change was not
                // made; wait for a token and make it again (counted, and not timed).
                ServerMsg::Error {
                    code: ErrorCode::RateLimited,
                    ..
                } => {
                    rate_limited += 1;
                    tokio::time::sleep(RATE_LIMITED_PAUSE).await;
                }
                other => bail!("device_state refused: {other:?}"),
            }
        };
        let mut got = 0;
        while got < p.watchers {
            match tokio::time::timeout(Duration::from_secs(5), rx.recv()).await {
                Ok(Some((a, at))) if a == expect => {
                    got += 1;
                    notified.fetch_add(1, Ordering::Relaxed);
                    record(&mut latency, at - t0);
                }
                Ok(Some(_)) => {}
                Ok(None) => bail!("watchers gone"),
                Err(_) => {
                    missed += (p.watchers - got) as u64;
                    break;
                }
            }
        }
    }
    ticker.abort();
    let n = latency.len();
    Ok(Report::new(
        "presence",
        n as f64 / start.elapsed().as_secs_f64(),
        latency,
    )
    .with("watchers", p.watchers)
    .with("changes", p.changes)
    .with("missed", missed)
    .with("rate_limited", rate_limited))
}
