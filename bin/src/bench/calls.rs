//! `calls`: C callers each calling their own user who is signed in on K devices. Device 0
//! accepts by click as soon as the toast arrives (`--accept click`), or every device accepts when
//! told `auto_accept_needed` (`--accept timeout`, for a node configured with a short toast
//! timeout). Reports established calls per second and establish → `call_established` latency.
//! With `--callee-server` the devices sign in on another node of a cluster, so every fork
//! crosses nodes.

use anyhow::{Context as _, bail};
use confab_protocol::sdp::build_offer;
use confab_protocol::{CallState, ClientMsg, ServerMsg};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;
use tokio::time::Instant;

use super::conn::{Conn, Target};
use super::report::{Report, histogram, record};
use super::{Progress, run_id};

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Accept {
    Click,
    Timeout,
}

pub struct Params {
    pub callers: usize,
    pub devices: usize,
    pub accept: Accept,
    pub duration: Duration,
}

/// `callee_t` is where the callees' devices sign in (another node of a cluster: every call's
/// forks cross nodes).
pub async fn run(
    t: &Target,
    callee_t: &Target,
    p: &Params,
    progress: &Progress,
) -> anyhow::Result<Report> {
    let run = run_id();
    let done = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let end = start + p.duration;
    let mut tasks = Vec::new();
    let mut devices = Vec::new();
    for i in 0..p.callers {
        let callee = format!("sip:callee{i}-{run}@bench.invalid");
        for d in 0..p.devices {
            let conn = Conn::sign_in(callee_t, &callee, &format!("dev{d}"), None).await?;
            devices.push(tokio::spawn(answer(conn, d == 0, p.accept)));
        }
        let caller = Conn::sign_in(
            t,
            &format!("sip:caller{i}-{run}@bench.invalid"),
            "bench",
            None,
        )
        .await?;
        tasks.push((caller, callee));
    }
    let cross_node = t.server != callee_t.server;
    if cross_node {
        for (caller, callee) in &mut tasks {
            reach(caller, callee).await?;
        }
    }
    let start = Instant::now();
    let end = end.max(start + p.duration);
    let handles: Vec<_> = tasks
        .into_iter()
        .map(|(caller, callee)| tokio::spawn(call_repeatedly(caller, callee, end, done.clone())))
        .collect();
    progress.run_for(p.duration, done.clone()).await;
    let mut latency = histogram();
    let (mut ok, mut failed) = (0u64, 0u64);
    for h in handles {
        let (l, o, f) = h.await??;
        latency.add(&l)?;
        ok += o;
        failed += f;
    }
    for d in devices {
        d.abort();
    }
    Ok(
        Report::new("calls", ok as f64 / p.duration.as_secs_f64(), latency)
            .with("callers", p.callers)
            .with("devices_per_user", p.devices)
            .with("cross_node", cross_node)
            .with("established", ok)
            .with("failed", failed),
    )
}

/// A callee device: accepts by click (device 0) or when asked to auto-accept.
async fn answer(mut conn: Conn, clicker: bool, accept: Accept) -> anyhow::Result<()> {
    let wanted: &[&str] = match (clicker, accept) {
        (true, Accept::Click) => &["call_incoming"],
        (false, Accept::Click) => &[],
        (_, Accept::Timeout) => &["auto_accept_needed"],
    };
    if wanted.is_empty() {
        // Has nothing to answer, but reads everything (skipping it), as a client must.
        loop {
            conn.recv_only(&[]).await?;
        }
    }
    loop {
        let call = match conn.recv_only(wanted).await? {
            ServerMsg::CallIncoming { call, .. } if clicker && accept == Accept::Click => call,
            ServerMsg::AutoAcceptNeeded { call } if accept == Accept::Timeout => call,
            _ => continue,
        };
        conn.send(&ClientMsg::CallAccept {
            rid: None,
            call,
            sdp: build_offer(&["text/plain"], None),
        })
        .await?;
    }
}

/// What ends a call's setup for the caller.
const OUTCOME: &[&str] = &["call_established", "call_state"];

async fn call_repeatedly(
    mut caller: Conn,
    callee: String,
    end: Instant,
    done: Arc<AtomicU64>,
) -> anyhow::Result<(hdrhistogram::Histogram<u64>, u64, u64)> {
    let mut latency = histogram();
    let (mut ok, mut failed) = (0, 0);
    let offer = build_offer(&["text/plain"], None);
    let mut rid = 0u32;
    while Instant::now() < end {
        let t0 = Instant::now();
        if one_call(&mut caller, &callee, &offer, &mut rid).await? {
            if Instant::now() <= end {
                ok += 1;
                done.fetch_add(1, Ordering::Relaxed);
                record(&mut latency, t0.elapsed());
            }
        } else {
            failed += 1;
        }
    }
    Ok((latency, ok, failed))
}

/// Calls `callee` until a call is established (then hung up): with the callees on another
/// node, a callee reaches the caller's node through the cluster directory a moment after it
/// signs in, and until then its calls end 480 at once. Done before the timed run.
async fn reach(caller: &mut Conn, callee: &str) -> anyhow::Result<()> {
    let offer = build_offer(&["text/plain"], None);
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut rid = 1u32 << 31;
    while !one_call(caller, callee, &offer, &mut rid).await? {
        if Instant::now() >= deadline {
            bail!("{callee} never reachable from the caller's node");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(())
}

/// One forked call to `callee`, hung up once established: true when it was established.
async fn one_call(
    caller: &mut Conn,
    callee: &str,
    offer: &str,
    rid: &mut u32,
) -> anyhow::Result<bool> {
    *rid = rid.wrapping_add(2);
    let rid = *rid;
    caller
        .send(&ClientMsg::CallEstablish {
            rid: Some(rid),
            to: callee.to_owned(),
            conversation: None,
            toast: None,
            sdp: offer.to_owned(),
        })
        .await?;
    let created = caller
        .recv_until_only(
            Duration::from_secs(30),
            &["call_created"],
            |m| matches!(m, ServerMsg::CallCreated { rid: Some(r), .. } if *r == rid),
        )
        .await?;
    let ServerMsg::CallCreated { call, .. } = created else {
        return Ok(false);
    };
    let outcome = caller
        .recv_until_only(Duration::from_secs(60), OUTCOME, |m| match m {
            ServerMsg::CallEstablished { call: c, .. } => *c == call,
            ServerMsg::CallState {
                call: c,
                state: CallState::Terminated,
                ..
            } => *c == call,
            _ => false,
        })
        .await
        .context("call outcome")?;
    if !matches!(outcome, ServerMsg::CallEstablished { .. }) {
        return Ok(false);
    }
    caller
        .send(&ClientMsg::CallTerminate {
            rid: Some(rid + 1),
            call: call.clone(),
        })
        .await?;
    caller
        .recv_until_only(Duration::from_secs(30), &["call_state"], |m| matches!(m, ServerMsg::CallState { call: c, state: CallState::Terminated, .. } if *c == call))
        .await?;
    Ok(true)
}
