//! `messages`: P caller/callee pairs in established calls; each caller keeps at most W messages
//! unacknowledged; each callee acks every message at once. Reports acked messages per second and
//! the send → `message_delivered` latency. With `resumable`, both sides ask for resumable
//! sessions and count, acknowledge and keep frames as docs/protocol.md §3 asks, so the rate can
//! be compared with plain sessions (issue 21).

use anyhow::{Context as _, bail};
use confab_protocol::sdp::build_offer;
use confab_protocol::{Body, ClientMsg, ServerMsg};
use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;
use tokio::time::Instant;

use super::conn::{Conn, Target};
use super::report::{Report, histogram, record};
use super::{Progress, run_id};

pub struct Params {
    pub pairs: usize,
    pub window: usize,
    /// Total messages per second to offer across all pairs; `None` = as fast as acks allow.
    pub rate: Option<f64>,
    pub size: usize,
    pub duration: Duration,
    /// Both sides on resumable sessions (`hello.resume:{}`).
    pub resumable: bool,
}

struct PairResult {
    delivered: u64,
    failed: u64,
    unanswered: u64,
    latency: hdrhistogram::Histogram<u64>,
}

/// `callee` is where the callees sign in (another node of a cluster: every message crosses
/// nodes); the callers sign in at `t`.
pub async fn run(
    t: &Target,
    callee: &Target,
    p: &Params,
    progress: &Progress,
) -> anyhow::Result<Report> {
    let run = run_id();
    let mut pairs = Vec::with_capacity(p.pairs);
    for i in 0..p.pairs {
        pairs.push(
            setup_pair(t, callee, &run, i, p.resumable)
                .await
                .with_context(|| format!("setting up pair {i}"))?,
        );
    }
    let delivered_live = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let end = start + p.duration;
    let body = "x".repeat(p.size);
    let mut tasks = Vec::new();
    for (caller, call, callee) in pairs {
        tokio::spawn(ack_all(callee));
        tasks.push(tokio::spawn(drive(
            caller,
            call,
            body.clone(),
            p.window,
            p.rate.map(|total| total / p.pairs.max(1) as f64),
            end,
            delivered_live.clone(),
        )));
    }
    progress.run_for(p.duration, delivered_live.clone()).await;
    let mut total = PairResult {
        delivered: 0,
        failed: 0,
        unanswered: 0,
        latency: histogram(),
    };
    for task in tasks {
        let r = task.await??;
        total.delivered += r.delivered;
        total.failed += r.failed;
        total.unanswered += r.unanswered;
        total.latency.add(&r.latency)?;
    }
    let secs = p.duration.as_secs_f64();
    Ok(
        Report::new("messages", total.delivered as f64 / secs, total.latency)
            .with("pairs", p.pairs)
            .with("cross_node", t.server != callee.server)
            .with("resumable", p.resumable)
            .with("window", p.window)
            .with(
                "offered_rate",
                p.rate.map_or(serde_json::Value::Null, |r| r.into()),
            )
            .with("size", p.size)
            .with("duration_s", secs)
            .with("delivered", total.delivered)
            .with("failed", total.failed)
            .with("unanswered", total.unanswered),
    )
}

/// Signs a caller in at `t` and a callee at `callee`, and establishes a call between them.
async fn setup_pair(
    t: &Target,
    callee_t: &Target,
    run: &str,
    i: usize,
    resumable: bool,
) -> anyhow::Result<(Conn, String, Conn)> {
    let a = format!("sip:a{i}-{run}@bench.invalid");
    let b = format!("sip:b{i}-{run}@bench.invalid");
    let (mut caller, mut callee) = if resumable {
        (
            Conn::sign_in_resumable(t, &a, "bench").await?,
            Conn::sign_in_resumable(callee_t, &b, "bench").await?,
        )
    } else {
        (
            Conn::sign_in(t, &a, "bench", None).await?,
            Conn::sign_in(callee_t, &b, "bench", None).await?,
        )
    };
    // On another node the callee reaches the caller's node through the cluster directory a
    // moment later: until then the call ends 480 at once, and is tried again.
    let deadline = Instant::now() + Duration::from_secs(10);
    for attempt in 1u32.. {
        caller
            .send(&ClientMsg::CallEstablish {
                rid: Some(attempt),
                to: b.clone(),
                conversation: None,
                toast: None,
                sdp: build_offer(&["text/plain"], None),
            })
            .await?;
        let m = caller
            .recv_until(deadline - Instant::now(), |m| {
                matches!(
                    m,
                    ServerMsg::CallRinging { .. }
                        | ServerMsg::CallState {
                            state: confab_protocol::CallState::Terminated,
                            ..
                        }
                )
            })
            .await?;
        if matches!(m, ServerMsg::CallRinging { .. }) {
            break;
        }
        if Instant::now() >= deadline {
            bail!("{b} never reachable from the caller's node");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let wait = Duration::from_secs(10);
    let ServerMsg::CallIncoming { call: incoming, .. } = callee
        .recv_until(wait, |m| matches!(m, ServerMsg::CallIncoming { .. }))
        .await?
    else {
        bail!("no call_incoming")
    };
    callee
        .send(&ClientMsg::CallAccept {
            rid: Some(2),
            call: incoming,
            sdp: build_offer(&["text/plain"], None),
        })
        .await?;
    let ServerMsg::CallEstablished { call, .. } = caller
        .recv_until(wait, |m| matches!(m, ServerMsg::CallEstablished { .. }))
        .await?
    else {
        bail!("no call_established")
    };
    Ok((caller, call, callee))
}

/// The callee: acks every message as soon as it is read, one write per batch read.
async fn ack_all(mut callee: Conn) -> anyhow::Result<()> {
    loop {
        let mut next = Some(callee.recv().await?);
        while let Some(m) = next.take() {
            if let ServerMsg::MessageReceived { call, msg, .. } = m {
                callee.feed(&ClientMsg::MessageAck { call, msg }).await?;
            }
            next = callee.try_recv().transpose()?;
        }
        callee.flush().await?;
    }
}

/// The caller: keeps at most `window` messages in flight until `end` (at most `rate` per
/// second when paced), then waits for the stragglers.
async fn drive(
    mut caller: Conn,
    call: String,
    body: String,
    window: usize,
    rate: Option<f64>,
    end: Instant,
    live: Arc<AtomicU64>,
) -> anyhow::Result<PairResult> {
    let mut r = PairResult {
        delivered: 0,
        failed: 0,
        unanswered: 0,
        latency: histogram(),
    };
    let mut sent_at: VecDeque<(u32, Instant)> = VecDeque::with_capacity(window);
    let mut rid: u32 = 100;
    let mut sent: u64 = 0;
    let start = Instant::now();
    let message = |rid: u32| ClientMsg::Message {
        rid: Some(rid),
        call: call.clone(),
        content_type: "text/plain".into(),
        body: Body::Text(body.clone()),
    };
    // How many messages the pacing allows by `now`, and when the next one is due.
    let allowed = |now: Instant| match rate {
        Some(rate) => ((now - start).as_secs_f64() * rate) as u64 + 1,
        None => u64::MAX,
    };
    let next_due = |sent: u64| match rate {
        Some(rate) => start + Duration::from_secs_f64(sent as f64 / rate),
        None => end,
    };
    let drain_deadline = end + Duration::from_secs(10);
    loop {
        let now = Instant::now();
        let mut fed = false;
        while now < end && sent_at.len() < window && sent < allowed(now) {
            rid += 1;
            sent += 1;
            caller.feed(&message(rid)).await?;
            sent_at.push_back((rid, Instant::now()));
            fed = true;
        }
        if fed {
            caller.flush().await?;
        }
        if sent_at.is_empty() && now >= end {
            break;
        }
        let wake = if sent_at.len() < window && now < end {
            next_due(sent).min(end)
        } else {
            drain_deadline
        };
        let first = tokio::select! {
            m = caller.recv() => m?,
            _ = tokio::time::sleep_until(wake) => {
                if Instant::now() >= drain_deadline {
                    break;
                }
                continue;
            }
        };
        let mut next = Some(first);
        while let Some(m) = next.take() {
            let (answered, ok) = match m {
                ServerMsg::MessageDelivered { rid: Some(x), .. } => (x, true),
                ServerMsg::MessageFailed { rid: Some(x), .. } => (x, false),
                _ => {
                    next = caller.try_recv().transpose()?;
                    continue;
                }
            };
            let now = Instant::now();
            let sent = sent_at
                .iter()
                .position(|(x, _)| *x == answered)
                .and_then(|pos| sent_at.remove(pos));
            if let Some((_, t0)) = sent
                && now <= end
            {
                if ok {
                    r.delivered += 1;
                    live.fetch_add(1, Ordering::Relaxed);
                    record(&mut r.latency, now - t0);
                } else {
                    r.failed += 1;
                }
            }
            next = caller.try_recv().transpose()?;
        }
    }
    r.unanswered = sent_at.len() as u64;
    Ok(r)
}
