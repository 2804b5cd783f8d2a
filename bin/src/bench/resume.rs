//! `resume`: P pairs in established calls, Alice on a resumable session, Bob on a plain one.
//! Each round Alice closes her socket, Bob sends a message, and Alice reconnects at once and
//! resumes (on the node that holds her session, or on another node of the cluster, relayed,
//! with `--resume-on`). Reports the time from the drop to that `message_received` arriving on
//! the new connection (issue 21's resume latency), and checks that every round's message
//! arrived exactly once and was answered `message_delivered`.

use anyhow::{Context as _, bail};
use confab_protocol::sdp::build_offer;
use confab_protocol::{Body, ClientMsg, ServerMsg};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;
use tokio::time::Instant;

use super::conn::{Conn, Target};
use super::report::{Report, histogram, record};
use super::{Progress, run_id};

pub struct Params {
    pub pairs: usize,
    pub rounds: usize,
    /// A pause between a pair's rounds (the message of one round is delivered before the
    /// next round starts in any case).
    pub pause: Duration,
}

/// How long a round may take before it counts as lost: far above any resume, far below the
/// node's resume window (30 s), so a stuck round is reported rather than waited out.
const ROUND_TIMEOUT: Duration = Duration::from_secs(10);

/// The rid of the ping after the last round (no other request of Alice's uses it).
const LAST_PING: u32 = u32::MAX;

#[derive(Default)]
struct Counts {
    rounds: u64,
    /// Messages that arrived a second time (a body of a round already received).
    duplicates: u64,
    /// Messages answered `message_failed` to Bob.
    failed: u64,
    /// Alice's frames the node had not read before a drop, sent again after the resume.
    resent: u64,
    /// Resumes whose `welcome.node` was not the node Alice signed in on.
    moved: u64,
}

struct PairResult {
    counts: Counts,
    latency: hdrhistogram::Histogram<u64>,
    /// Why the pair stopped early, if it did.
    error: Option<String>,
}

/// Alice and Bob sign in at `t`; Alice resumes at `resume_on` (`t` on one node).
pub async fn run(
    t: &Target,
    resume_on: &Target,
    p: &Params,
    progress: &Progress,
) -> anyhow::Result<Report> {
    let run = run_id();
    let mut pairs = Vec::with_capacity(p.pairs);
    for i in 0..p.pairs {
        pairs.push(
            setup_pair(t, &run, i)
                .await
                .with_context(|| format!("setting up pair {i}"))?,
        );
    }
    let done = Arc::new(AtomicU64::new(0));
    let counter = progress.spawn_counter((p.pairs * p.rounds) as u64, done.clone());
    let start = Instant::now();
    let mut tasks = Vec::new();
    for pair in pairs {
        tasks.push(tokio::spawn(rounds(
            pair,
            resume_on.clone(),
            p.rounds,
            p.pause,
            done.clone(),
        )));
    }
    let mut total = Counts::default();
    let mut latency = histogram();
    let mut errors = Vec::new();
    for task in tasks {
        let r = task.await?;
        total.rounds += r.counts.rounds;
        total.duplicates += r.counts.duplicates;
        total.failed += r.counts.failed;
        total.resent += r.counts.resent;
        total.moved += r.counts.moved;
        latency.add(&r.latency)?;
        errors.extend(r.error);
    }
    let secs = start.elapsed().as_secs_f64();
    counter.abort();
    let wanted = (p.pairs * p.rounds) as u64;
    Ok(
        Report::new("resume", total.rounds as f64 / secs.max(1e-9), latency)
            .with("pairs", p.pairs)
            .with("rounds_per_pair", p.rounds)
            .with("cross_node", t.server != resume_on.server)
            .with("pause_ms", p.pause.as_millis() as u64)
            .with("resumed", total.rounds)
            .with("missing", wanted - total.rounds)
            .with("duplicates", total.duplicates)
            .with("failed", total.failed)
            .with("resent_frames", total.resent)
            .with("holding_node_changed", total.moved)
            .with("pairs_stopped", errors.len())
            .with(
                "first_error",
                errors
                    .first()
                    .map_or(serde_json::Value::Null, |e| e.clone().into()),
            ),
    )
}

struct Pair {
    alice: Conn,
    /// Alice's leg of the call, on which she acks.
    alice_call: String,
    bob: Conn,
    /// Bob's leg, on which he sends.
    bob_call: String,
    /// `welcome.node` of Alice's sign-in: the node that holds her session.
    node: String,
}

/// Alice (resumable) calls Bob (plain), Bob accepts.
async fn setup_pair(t: &Target, run: &str, i: usize) -> anyhow::Result<Pair> {
    let a = format!("sip:ra{i}-{run}@bench.invalid");
    let b = format!("sip:rb{i}-{run}@bench.invalid");
    let mut alice = Conn::sign_in_resumable(t, &a, "bench").await?;
    let mut bob = Conn::sign_in(t, &b, "bench", None).await?;
    let wait = Duration::from_secs(10);
    alice
        .send(&ClientMsg::CallEstablish {
            rid: Some(1),
            to: b.clone(),
            conversation: None,
            toast: None,
            sdp: build_offer(&["text/plain"], None),
        })
        .await?;
    let ServerMsg::CallIncoming { call: bob_call, .. } = bob
        .recv_until(wait, |m| matches!(m, ServerMsg::CallIncoming { .. }))
        .await?
    else {
        bail!("no call_incoming")
    };
    bob.send(&ClientMsg::CallAccept {
        rid: Some(2),
        call: bob_call.clone(),
        sdp: build_offer(&["text/plain"], None),
    })
    .await?;
    let ServerMsg::CallEstablished {
        call: alice_call, ..
    } = alice
        .recv_until(wait, |m| matches!(m, ServerMsg::CallEstablished { .. }))
        .await?
    else {
        bail!("no call_established")
    };
    let node = alice.node.clone();
    Ok(Pair {
        alice,
        alice_call,
        bob,
        bob_call,
        node,
    })
}

/// Runs a pair's rounds; an error stops the pair and is reported with what it had measured.
async fn rounds(
    mut pair: Pair,
    resume_on: Target,
    rounds: usize,
    pause: Duration,
    done: Arc<AtomicU64>,
) -> PairResult {
    let mut r = PairResult {
        counts: Counts::default(),
        latency: histogram(),
        error: None,
    };
    let mut outcome = Ok(());
    for round in 0..rounds {
        if round > 0 && !pause.is_zero() {
            tokio::time::sleep(pause).await;
        }
        outcome = tokio::time::timeout(
            ROUND_TIMEOUT,
            one_round(&mut pair, &resume_on, round, &mut r),
        )
        .await
        .unwrap_or_else(|_| Err(anyhow::anyhow!("round {round} took over {ROUND_TIMEOUT:?}")));
        if outcome.is_err() {
            break;
        }
        done.fetch_add(1, Ordering::Relaxed);
    }
    if outcome.is_ok() {
        outcome = tokio::time::timeout(ROUND_TIMEOUT, no_duplicates_left(&mut pair, &mut r))
            .await
            .unwrap_or_else(|_| Err(anyhow::anyhow!("no pong after the last round")));
    }
    r.error = outcome.err().map(|e| format!("{e:#}"));
    r
}

/// Drop, send, resume, receive: one sample.
async fn one_round(
    pair: &mut Pair,
    resume_on: &Target,
    round: usize,
    r: &mut PairResult,
) -> anyhow::Result<()> {
    let body = format!("round {round}");
    let rid = u32::try_from(round + 100).context("too many rounds")?;
    let t0 = Instant::now();
    pair.alice.drop_link();
    pair.bob
        .send(&ClientMsg::Message {
            rid: Some(rid),
            call: pair.bob_call.clone(),
            content_type: "text/plain".into(),
            body: Body::Text(body.clone()),
        })
        .await?;
    let resumed = pair
        .alice
        .resume(resume_on)
        .await
        .with_context(|| format!("resume in round {round}"))?;
    r.counts.resent += resumed.resent as u64;
    if resumed.node != pair.node {
        r.counts.moved += 1;
    }
    // Every frame up to this round's message: one of an earlier round is a duplicate.
    loop {
        let ServerMsg::MessageReceived {
            call,
            msg,
            body: got,
            ..
        } = pair
            .alice
            .recv_only(&["message_received"])
            .await
            .with_context(|| format!("waiting for the message of round {round}"))?
        else {
            continue;
        };
        if call != pair.alice_call {
            bail!("a message on a call that is not the pair's: {call}");
        }
        if got != Body::Text(body.clone()) {
            r.counts.duplicates += 1;
            continue;
        }
        record(&mut r.latency, t0.elapsed());
        pair.alice
            .send(&ClientMsg::MessageAck { call, msg })
            .await?;
        break;
    }
    match pair
        .bob
        .recv_until_only(
            ROUND_TIMEOUT,
            &["message_delivered", "message_failed"],
            |m| m.reply_rid() == Some(rid),
        )
        .await?
    {
        ServerMsg::MessageDelivered { .. } => {}
        _ => r.counts.failed += 1,
    }
    r.counts.rounds += 1;
    Ok(())
}

/// After the last round: a `ping` and its `pong`; a `message_received` before the pong is a
/// duplicate (the node sends in order, so any replay comes before it).
async fn no_duplicates_left(pair: &mut Pair, r: &mut PairResult) -> anyhow::Result<()> {
    pair.alice
        .send(&ClientMsg::Ping {
            rid: Some(LAST_PING),
        })
        .await?;
    loop {
        match pair.alice.recv_only(&["message_received", "pong"]).await? {
            ServerMsg::Pong {
                rid: Some(LAST_PING),
            } => return Ok(()),
            ServerMsg::MessageReceived { .. } => r.counts.duplicates += 1,
            _ => {}
        }
    }
}
