//! `idle`: E endpoints sign in and stay idle. Reports the sign-in rate and the node's resident
//! memory per endpoint (from /proc of the node's process). Connections can be spread over
//! several 127.0.0.x source addresses so E is not bounded by one address's ephemeral ports.

use anyhow::{Context as _, bail};
use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;
use tokio::time::Instant;

use super::conn::{Conn, Target, mint};
use super::report::{Report, histogram, record};
use super::{Progress, run_id};

pub struct Params {
    pub endpoints: usize,
    pub concurrency: usize,
    pub sources: u8,
    pub node_pid: Option<u32>,
    pub hold: Duration,
}

pub async fn run(t: &Target, p: &Params, progress: &Progress) -> anyhow::Result<Report> {
    let limit = rlimit::increase_nofile_limit(u64::MAX).unwrap_or(0);
    if (limit as usize) < p.endpoints + 64 {
        eprintln!(
            "warning: this process may open {limit} files; {} endpoints may not fit",
            p.endpoints
        );
    }
    let pid = match p.node_pid {
        Some(pid) => pid,
        None => find_node_pid().context("cannot find the confab-node process; pass --node-pid")?,
    };
    let rss_before = rss_kib(pid)?;
    let run = run_id();
    let signed = Arc::new(AtomicU64::new(0));
    // Users and their tokens are made before the clock starts: a client brings a token it got
    // from its identity provider, and minting is not the node's sign-in work.
    let users: Arc<Vec<(String, String)>> = Arc::new(
        (0..p.endpoints)
            .map(|i| {
                let user = format!("sip:idle{i}-{run}@bench.invalid");
                let token = mint(t, &user);
                (user, token)
            })
            .collect(),
    );
    let start = Instant::now();
    let sources = p.sources.max(1);
    let ticker = progress.spawn_counter(p.endpoints as u64, signed.clone());
    // Tasks, not one stream of futures: the sign-ins then spread over the runtime's threads
    // instead of all being polled by the one thread that drives the scenario.
    let next = Arc::new(AtomicUsize::new(0));
    let signers: Vec<_> = (0..p.concurrency.clamp(1, p.endpoints.max(1)))
        .map(|_| {
            let (t, users, signed, next) = (t.clone(), users.clone(), signed.clone(), next.clone());
            let sources = sources as usize;
            tokio::spawn(async move {
                let mut done = Vec::new();
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    let Some((user, token)) = users.get(i) else {
                        return done;
                    };
                    let source = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 1 + (i % sources) as u8));
                    let t0 = Instant::now();
                    let r = Conn::sign_in_with(&t, user, token, "idle", Some(source)).await;
                    if r.is_ok() {
                        signed.fetch_add(1, Ordering::Relaxed);
                    }
                    done.push(r.map(|c| (c, t0.elapsed())));
                }
            })
        })
        .collect();
    let mut results: Vec<anyhow::Result<(Conn, Duration)>> = Vec::with_capacity(p.endpoints);
    for s in signers {
        results.extend(s.await.context("a sign-in task failed")?);
    }
    let elapsed = start.elapsed();
    ticker.abort();
    let mut latency = histogram();
    let mut conns = Vec::new();
    let mut failed = 0u64;
    for r in results {
        match r {
            Ok((c, d)) => {
                record(&mut latency, d);
                conns.push(c);
            }
            Err(_) => failed += 1,
        }
    }
    if conns.is_empty() {
        bail!("no endpoint could sign in");
    }
    // Let the node settle (allocator, actor start-up) before reading its memory.
    tokio::time::sleep(p.hold).await;
    let rss_after = rss_kib(pid)?;
    let per_endpoint = (rss_after.saturating_sub(rss_before)) as f64 * 1024.0 / conns.len() as f64;
    let n = conns.len();
    drop(conns);
    Ok(
        Report::new("idle", n as f64 / elapsed.as_secs_f64(), latency)
            .with("endpoints", n)
            .with("failed", failed)
            .with("signin_per_s", (n as f64 / elapsed.as_secs_f64()).round())
            .with("node_rss_before_kib", rss_before)
            .with("node_rss_after_kib", rss_after)
            .with("bytes_per_endpoint", per_endpoint.round()),
    )
}

fn rss_kib(pid: u32) -> anyhow::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("reading /proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .context("no VmRSS in /proc status")
}

fn find_node_pid() -> Option<u32> {
    std::fs::read_dir("/proc").ok()?.flatten().find_map(|e| {
        let pid: u32 = e.file_name().to_str()?.parse().ok()?;
        let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).ok()?;
        (comm.trim() == "confab-node").then_some(pid)
    })
}
