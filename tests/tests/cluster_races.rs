//! Races across the nodes of a cluster (issue 25). This file owns the tests in which clients
//! act the moment a reply arrives, as real clients do, and never wait for the directory to
//! converge first: each test loops over a cross-node path (up to [`ITERATIONS`] times, within
//! [`BUDGET`]), counts the iterations that went wrong and fails with that count and the first
//! few failures. The paths: a presence sequence published on one node and watched from the
//! other; calls to a device welcomed on the other node a moment ago (its user's only one, or a
//! second that must also ring); subscribing to a user just signed in elsewhere; forward and
//! transfer to such a user; `endpoints_per_user` raced on two nodes; the auto-accept of a
//! device that published `active` just before the call. Last, a seeded property test: random
//! rapid changes on three nodes, after which every watcher must hold the true presence within
//! [`SETTLE`], and every call placed after a welcome must ring.
//!
//! Whether a watcher's presence is its last word is told without waiting for quiet: a sign-in
//! on the node that wrote the last change (a *fence*) reaches another node only after every
//! record that node wrote before it; a *probe* subscribing after the fence shows gets the
//! node's settled state, and a `ping` of the watcher then comes back behind every presence it
//! was sent. (This leans on each node writing its directory records in order, one at a time,
//! as `cluster::writes` does, and on the bucket's watch delivering them in that order.)
//!
//! The tests of this file run one at a time (they share [`SERIAL`]): the bounds they check
//! are about the nodes, not about a machine shared with the other tests of the file.

use confab_actors::{RunningNode, Settings};
use confab_protocol::*;
use confab_tests::*;
use futures::stream::{FuturesUnordered, StreamExt};
use std::collections::HashMap;
use std::time::Duration;
use tokio::time::Instant;

/// Iterations of each race test, at most.
const ITERATIONS: usize = 150;
/// Wall time a race test's loop may take: it stops early when this is spent (a failing
/// iteration waits for its deadlines, so many failures mean fewer iterations).
const BUDGET: Duration = Duration::from_secs(15);
/// How long after the last answer a change made on one node may take to show on another.
const CONVERGE: Duration = Duration::from_secs(1);
/// The property test's bound: every watcher holds the true presence this soon after the last
/// change's answer.
const SETTLE: Duration = Duration::from_millis(100);

/// One test of this file at a time.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

const NODE_IDS: [&str; 3] = ["node-a", "node-b", "node-c"];

/// Nodes on one nats-server. Dropped in field order: the nodes leave before the server goes.
struct Cluster {
    nodes: Vec<RunningNode>,
    _nats: NatsServer,
}

fn cluster(n: usize, tweak: impl Fn(&mut Settings)) -> Cluster {
    let nats = NatsServer::start();
    let nodes = NODE_IDS[..n]
        .iter()
        .map(|id| start_cluster_node(&nats, id, &tweak))
        .collect();
    Cluster { nodes, _nats: nats }
}

/// Fork timers that never fire within a test.
fn quiet(s: &mut Settings) {
    s.fork.toast_timeout_ms = 60_000;
    s.fork.auto_accept_grace_ms = 60_000;
}

/// The iterations of one race test and those that failed.
struct Tally {
    test: &'static str,
    runs: usize,
    failures: Vec<(usize, String)>,
    started: std::time::Instant,
    /// What a test counts besides failures, to show its race did happen (printed).
    noted: Option<(&'static str, usize)>,
}

impl Tally {
    fn new(test: &'static str) -> Tally {
        Tally {
            test,
            runs: 0,
            failures: Vec::new(),
            started: std::time::Instant::now(),
            noted: None,
        }
    }

    /// Counts one more `what`.
    fn note(&mut self, what: &'static str) {
        self.noted.get_or_insert((what, 0)).1 += 1;
    }

    fn go_on(&self) -> bool {
        self.runs < ITERATIONS && self.started.elapsed() < BUDGET
    }

    fn record(&mut self, outcome: Result<(), String>) {
        if let Err(e) = outcome {
            self.failures.push((self.runs, e));
        }
        self.runs += 1;
    }

    /// Prints the count (shown with `--nocapture`) and fails on any failure.
    fn finish(self) {
        let summary = format!(
            "{}: {} of {} iterations failed, in {:.1?}",
            self.test,
            self.failures.len(),
            self.runs,
            self.started.elapsed()
        );
        eprintln!("{summary}");
        if let Some((what, n)) = self.noted {
            eprintln!("  ({n} iterations {what})");
        }
        for (i, e) in &self.failures {
            eprintln!("  iteration {i}: {e}");
        }
        let first: Vec<String> = self
            .failures
            .iter()
            .take(5)
            .map(|(i, e)| format!("  iteration {i}: {e}"))
            .collect();
        assert!(
            self.failures.is_empty(),
            "{summary}; the first ones:\n{}",
            first.join("\n")
        );
    }
}

fn until(d: Duration) -> Instant {
    Instant::now() + d
}

fn user(name: &str, i: usize) -> String {
    format!("sip:{name}{i}@example.com")
}

/// One client on each node, user `name` with the node's index, signed in on `device`.
async fn one_per_node(nodes: &[RunningNode], name: &str, device: &str) -> Vec<Raw> {
    let mut clients = Vec::new();
    for (n, node) in nodes.iter().enumerate() {
        clients.push(Raw::sign_in(node.addr, &user(name, n), device).await);
    }
    clients
}

fn subscribe(users: &[&str]) -> ClientMsg {
    ClientMsg::Subscribe {
        rid: None,
        users: users.iter().map(|u| (*u).to_owned()).collect(),
    }
}

fn unsubscribe(users: &[&str]) -> ClientMsg {
    ClientMsg::Unsubscribe {
        rid: None,
        users: users.iter().map(|u| (*u).to_owned()).collect(),
    }
}

fn device_state(activity: Activity) -> ClientMsg {
    ClientMsg::DeviceState {
        rid: None,
        activity,
        idle_ms: None,
    }
}

fn set_status(status: Option<Status>) -> ClientMsg {
    ClientMsg::SetStatus { rid: None, status }
}

/// Sends `msg`; its answer must be `ok`.
async fn ok_to(raw: &mut Raw, msg: ClientMsg) -> Result<(), String> {
    let what = format!("{msg:?}");
    match raw.try_request(msg, until(EVENT_TIMEOUT)).await? {
        ServerMsg::Ok { .. } => Ok(()),
        other => Err(format!("{} answered {other:?} to {what}", raw.user)),
    }
}

/// `call_establish` to `to`, a toast when `toast` is given; the caller's call id.
async fn place_call(raw: &mut Raw, to: &str, toast: Option<&str>) -> Result<String, String> {
    let msg = ClientMsg::CallEstablish {
        rid: None,
        to: to.to_owned(),
        conversation: None,
        toast: toast.map(legs::text_toast),
        sdp: offer(),
    };
    match raw.try_request(msg, until(EVENT_TIMEOUT)).await? {
        ServerMsg::CallCreated { call, .. } => Ok(call),
        other => Err(format!("{}: call_establish to {to}: {other:?}", raw.user)),
    }
}

fn toast_is(toast: &Option<Toast>, tag: &str) -> bool {
    matches!(toast, Some(Toast { body: Body::Text(t), .. }) if t == tag)
}

/// The `call_incoming` on `raw` by `deadline` (with the toast `tag`, when given, so a
/// long-lived device never takes a call of an earlier iteration for this one): its call and
/// `immediate_auto_accept`.
async fn rung(
    raw: &mut Raw,
    deadline: Instant,
    tag: Option<&str>,
) -> Result<(String, bool), String> {
    let m = raw
        .try_recv_until(deadline, |m| {
            matches!(m, ServerMsg::CallIncoming { toast, .. }
                if tag.is_none_or(|tag| toast_is(toast, tag)))
        })
        .await
        .map_err(|e| format!("no call_incoming: {e}"))?;
    match m {
        ServerMsg::CallIncoming {
            call,
            immediate_auto_accept,
            ..
        } => Ok((call, immediate_auto_accept)),
        _ => unreachable!(),
    }
}

/// The next `call_state` of `call` on `raw` matching `pred` (state, previous).
async fn call_state(
    raw: &mut Raw,
    call: &str,
    deadline: Instant,
    pred: impl Fn(CallState, CallState) -> bool,
) -> Result<(CallState, Option<Reason>), String> {
    let m = raw
        .try_recv_until(deadline, |m| {
            matches!(m, ServerMsg::CallState { call: c, state, previous, .. }
                if c == call && pred(*state, *previous))
        })
        .await?;
    match m {
        ServerMsg::CallState { state, reason, .. } => Ok((state, reason)),
        _ => unreachable!(),
    }
}

async fn reached(raw: &mut Raw, call: &str, want: CallState) -> Result<Option<Reason>, String> {
    call_state(raw, call, until(EVENT_TIMEOUT), |s, _| s == want)
        .await
        .map(|(_, reason)| reason)
        .map_err(|e| format!("{call} never {want:?}: {e}"))
}

/// Completes only when `call` ends on `raw` (never on its deadline): the other arm of a race
/// with an event that must come instead.
async fn ends(raw: &mut Raw, call: &str) -> Option<Reason> {
    match reached(raw, call, CallState::Terminated).await {
        Ok(reason) => reason,
        Err(_) => std::future::pending().await,
    }
}

async fn ended_with(raw: &mut Raw, call: &str, code: u16, text: &str) -> Result<(), String> {
    let reason = reached(raw, call, CallState::Terminated).await?;
    if reason == Some(Reason::new(code, text)) {
        Ok(())
    } else {
        Err(format!(
            "{} ({}): {call} ended with {reason:?}, expected {code} {text}",
            raw.user, raw.endpoint
        ))
    }
}

async fn accept(raw: &mut Raw, call: &str) -> Result<(), String> {
    let msg = ClientMsg::CallAccept {
        rid: None,
        call: call.to_owned(),
        sdp: answer(),
    };
    ok_to(raw, msg).await
}

async fn terminate(raw: &mut Raw, call: &str) -> Result<(), String> {
    let msg = ClientMsg::CallTerminate {
        rid: None,
        call: call.to_owned(),
    };
    ok_to(raw, msg).await
}

/// The remote endpoint named by the `call_established` of `call` on `raw`.
async fn established_with(raw: &mut Raw, call: &str) -> Result<String, String> {
    let m = raw
        .try_recv_until(until(EVENT_TIMEOUT), |m| {
            matches!(m, ServerMsg::CallEstablished { call: c, .. } if c == call)
                || matches!(m, ServerMsg::CallState { call: c, state: CallState::Terminated, .. } if c == call)
        })
        .await?;
    match m {
        ServerMsg::CallEstablished { remote, .. } => Ok(remote.endpoint),
        other => Err(format!("{}: {call} ended instead: {other:?}", raw.user)),
    }
}

/// The `presence` events one connection received, by user, in order.
#[derive(Default)]
struct Seen(HashMap<String, Vec<Availability>>);

impl Seen {
    fn note(&mut self, m: &ServerMsg) {
        if let ServerMsg::Presence {
            user, availability, ..
        } = m
        {
            self.0.entry(user.clone()).or_default().push(*availability);
        }
    }

    fn history(&self, user: &str) -> &[Availability] {
        self.0.get(user).map_or(&[], Vec::as_slice)
    }

    fn last(&self, user: &str) -> Option<Availability> {
        self.history(user).last().copied()
    }
}

/// Reads `raw`, noting its presence events in `seen`, until `done(seen)`; an error at the
/// deadline.
async fn read_until(
    raw: &mut Raw,
    seen: &mut Seen,
    deadline: Instant,
    done: impl Fn(&Seen) -> bool,
) -> Result<(), String> {
    while !done(seen) {
        let m = raw.try_recv_until(deadline, |_| true).await?;
        seen.note(&m);
    }
    Ok(())
}

/// Pings `raw` and reads (noting presence) up to its `pong`: every frame queued for the
/// connection before the ping arrived has then been read.
async fn ping_through(raw: &mut Raw, seen: &mut Seen) -> Result<(), String> {
    let rid = raw.rid();
    raw.send(&ClientMsg::Ping { rid }).await;
    let deadline = until(EVENT_TIMEOUT);
    loop {
        let m = raw.try_recv_until(deadline, |_| true).await?;
        if matches!(m, ServerMsg::Pong { rid: r } if r == rid) {
            return Ok(());
        }
        seen.note(&m);
    }
}

/// `probe` subscribes to `users` it never watched before: the first presence of each is the
/// state of the probe's node at that moment.
async fn node_presence(
    probe: &mut Raw,
    users: &[&str],
) -> Result<HashMap<String, Availability>, String> {
    ok_to(probe, subscribe(users)).await?;
    let mut seen = Seen::default();
    read_until(probe, &mut seen, until(EVENT_TIMEOUT), |s| {
        users.iter().all(|u| s.last(u).is_some())
    })
    .await?;
    Ok(users
        .iter()
        .map(|u| ((*u).to_owned(), seen.history(u)[0]))
        .collect())
}

// ---------------------------------------------------------------------------------------------
// a. A presence sequence published on one node, watched from the other.

/// Bob, alone on `bob_node`, sends device_state active, set_status busy, appear_offline, null,
/// each as soon as the previous answer comes: the watcher (on the other node) must see
/// `available` within [`CONVERGE`], and that must be its last word.
async fn presence_sequence(
    nodes: &[RunningNode],
    watcher: &mut Raw,
    probe: &mut Raw,
    bob_node: usize,
    i: usize,
) -> Result<(), String> {
    let bob = user("bob-a", i);
    let fence = user("fence-a", i);
    let mut seen = Seen::default();
    ok_to(watcher, subscribe(&[&bob, &fence])).await?;
    let mut device = Raw::sign_in(nodes[bob_node].addr, &bob, "desk").await;
    for msg in [
        device_state(Activity::Active),
        set_status(Some(Status::Busy)),
        set_status(Some(Status::AppearOffline)),
        set_status(None),
    ] {
        ok_to(&mut device, msg).await?;
    }
    let answered = Instant::now();
    // The bound as a client sees it: an `available` within it (perhaps a stale one, from
    // before `busy`: whether it is the last word is told below).
    let within = read_until(watcher, &mut seen, answered + CONVERGE, |s| {
        s.history(&bob).contains(&Availability::Available)
    })
    .await;
    let mut fence_device = Raw::sign_in(nodes[bob_node].addr, &fence, "fence").await;
    let fenced = read_until(watcher, &mut seen, until(CONVERGE), |s| {
        s.last(&fence) == Some(Availability::Available)
    })
    .await;
    let node_state = node_presence(probe, &[&bob]).await?[&bob];
    ping_through(watcher, &mut seen).await?;

    let mut problems = Vec::new();
    if let Err(e) = &within {
        problems.push(format!(
            "no `available` within {CONVERGE:?} of the last answer ({e})"
        ));
    }
    if let Err(e) = fenced {
        problems.push(format!(
            "the watcher never saw a sign-in made on Bob's node after his last change ({e})"
        ));
    }
    if node_state != Availability::Available {
        problems.push(format!("the watcher's node holds {node_state:?}"));
    }
    let held = seen.last(&bob);
    if held != Some(Availability::Available) {
        problems.push(format!("the watcher's last presence says {held:?}"));
    }
    if within.is_ok() && !problems.is_empty() {
        problems.push("(an `available` did come in time, but was not the last word)".to_owned());
    }
    ok_to(watcher, unsubscribe(&[&bob, &fence])).await?;
    ok_to(probe, unsubscribe(&[&bob])).await?;
    ok_to(&mut device, ClientMsg::Bye { rid: None }).await?;
    ok_to(&mut fence_device, ClientMsg::Bye { rid: None }).await?;
    if problems.is_empty() {
        Ok(())
    } else {
        Err(format!(
            "Bob on {}, watched from the other node, which got {:?}: {}",
            NODE_IDS[bob_node],
            seen.history(&bob),
            problems.join("; ")
        ))
    }
}

#[tokio::test]
async fn a_status_sequence_on_one_node_ends_available_for_a_watcher_on_the_other() {
    let _serial = SERIAL.lock().await;
    let c = cluster(2, |_| {});
    let mut watchers = Vec::new();
    let mut probes = Vec::new();
    for (n, node) in c.nodes.iter().enumerate() {
        watchers.push(Raw::sign_in(node.addr, &user("alice-a", n), "laptop").await);
        probes.push(Raw::sign_in(node.addr, &user("probe-a", n), "probe").await);
    }
    let mut tally = Tally::new("presence sequence across nodes");
    while tally.go_on() {
        let i = tally.runs;
        let w = i % 2;
        let outcome = presence_sequence(&c.nodes, &mut watchers[w], &mut probes[w], 1 - w, i).await;
        tally.record(outcome);
    }
    tally.finish();
}

// ---------------------------------------------------------------------------------------------
// b. A call to a user whose only device was welcomed on the other node a moment ago.

async fn call_a_fresh_device(
    nodes: &[RunningNode],
    caller: &mut Raw,
    callee_node: usize,
    i: usize,
) -> Result<(), String> {
    let bob = user("bob-b", i);
    let mut device = Raw::sign_in(nodes[callee_node].addr, &bob, "phone").await;
    let call = place_call(caller, &bob, None).await?;
    let (incoming, immediate) = tokio::select! {
        r = rung(&mut device, until(CONVERGE), None) => r?,
        reason = ends(caller, &call) => {
            return Err(format!(
                "the call from {} ended with {reason:?}; Bob's device, welcomed on {} before \
                 it was placed, never rang",
                NODE_IDS[1 - callee_node], NODE_IDS[callee_node]
            ));
        }
    };
    if !immediate {
        return Err("Bob's only device rang without immediate_auto_accept".to_owned());
    }
    accept(&mut device, &incoming).await?;
    let remote = established_with(caller, &call).await?;
    if remote != device.endpoint {
        return Err(format!(
            "established with {remote}, not {}",
            device.endpoint
        ));
    }
    terminate(caller, &call).await?;
    ended_with(&mut device, &incoming, 200, "Terminated remotely").await?;
    ok_to(&mut device, ClientMsg::Bye { rid: None }).await
}

#[tokio::test]
async fn a_call_right_after_the_callees_only_device_is_welcomed_on_another_node_rings_it() {
    let _serial = SERIAL.lock().await;
    let c = cluster(2, |_| {});
    let mut callers = one_per_node(&c.nodes, "alice-b", "laptop").await;
    let mut tally = Tally::new("call to a device just welcomed on the other node");
    while tally.go_on() {
        let i = tally.runs;
        let from = i % 2;
        let outcome = call_a_fresh_device(&c.nodes, &mut callers[from], 1 - from, i).await;
        tally.record(outcome);
    }
    tally.finish();
}

// ---------------------------------------------------------------------------------------------
// c. A second device welcomed on the other node a moment before a call: both ring.

async fn call_with_a_fresh_second_device(
    nodes: &[RunningNode],
    caller: &mut Raw,
    first_node: usize,
    second_node: usize,
    i: usize,
) -> Result<(), String> {
    let bob = user("bob-c", i);
    let mut first = Raw::sign_in(nodes[first_node].addr, &bob, "desk").await;
    let mut second = Raw::sign_in(nodes[second_node].addr, &bob, "phone").await;
    let call = place_call(caller, &bob, Some("knock")).await?;
    let placement = format!(
        "first device on {}, second on {}",
        NODE_IDS[first_node], NODE_IDS[second_node]
    );
    let (on_first, on_second) = tokio::select! {
        both = both_ring(&mut first, &mut second) => both.map_err(|e| format!("{placement}: {e}"))?,
        reason = ends(caller, &call) => {
            return Err(format!("{placement}: the call ended with {reason:?} before both devices rang"));
        }
    };
    accept(&mut second, &on_second).await?;
    let remote = established_with(caller, &call).await?;
    if remote != second.endpoint {
        return Err(format!("established with {remote}, not the second device"));
    }
    ended_with(&mut first, &on_first, 200, "Call completed elsewhere").await?;
    terminate(caller, &call).await?;
    ended_with(&mut second, &on_second, 200, "Terminated remotely").await?;
    ok_to(&mut first, ClientMsg::Bye { rid: None }).await?;
    ok_to(&mut second, ClientMsg::Bye { rid: None }).await
}

/// Both devices ring without `immediate_auto_accept` (within [`CONVERGE`]): their calls. A
/// device that rings with it tells at once that the other was not forked.
async fn both_ring(first: &mut Raw, second: &mut Raw) -> Result<(String, String), String> {
    use futures::future::{Either, select};
    let a = std::pin::pin!(rung(first, until(CONVERGE), None));
    let b = std::pin::pin!(rung(second, until(CONVERGE), None));
    let (which, (call, immediate), other) = match select(a, b).await {
        Either::Left((r, other)) => ("first", r?, Either::Left(other)),
        Either::Right((r, other)) => ("second", r?, Either::Right(other)),
    };
    if immediate {
        return Err(format!(
            "the {which} device rang with immediate_auto_accept: the other was not forked"
        ));
    }
    let (other_call, other_immediate) = match other {
        Either::Left(b) => b.await,
        Either::Right(a) => a.await,
    }
    .map_err(|e| format!("the {which} device rang, the other never did: {e}"))?;
    if other_immediate {
        return Err("immediate_auto_accept on one of two forks".to_owned());
    }
    Ok(match which {
        "first" => (call, other_call),
        _ => (other_call, call),
    })
}

#[tokio::test]
async fn a_second_device_welcomed_on_another_node_just_before_a_call_rings_too() {
    let _serial = SERIAL.lock().await;
    let c = cluster(2, quiet);
    let mut callers = one_per_node(&c.nodes, "alice-c", "laptop").await;
    let mut tally = Tally::new("call forked to a second device just welcomed elsewhere");
    while tally.go_on() {
        let i = tally.runs;
        let from = i % 2;
        // The first device sits on either node; the second on the node the caller is not on.
        let first_node = (i / 2) % 2;
        let outcome =
            call_with_a_fresh_second_device(&c.nodes, &mut callers[from], first_node, 1 - from, i)
                .await;
        tally.record(outcome);
    }
    tally.finish();
}

// ---------------------------------------------------------------------------------------------
// d. Subscribing to a user just signed in on another node.

async fn subscribe_to_a_fresh_user(
    nodes: &[RunningNode],
    watcher: &mut Raw,
    bob_node: usize,
    i: usize,
) -> Result<(), String> {
    let bob = user("bob-d", i);
    let mut device = Raw::sign_in(nodes[bob_node].addr, &bob, "desk").await;
    ok_to(watcher, subscribe(&[&bob])).await?;
    let subscribed = Instant::now();
    let mut seen = Seen::default();
    read_until(watcher, &mut seen, until(EVENT_TIMEOUT), |s| {
        s.last(&bob).is_some()
    })
    .await?;
    let first = seen.history(&bob)[0];
    let outcome = if first == Availability::Available {
        Ok(())
    } else {
        let caught_up = read_until(watcher, &mut seen, subscribed + CONVERGE, |s| {
            s.last(&bob) == Some(Availability::Available)
        })
        .await;
        Err(format!(
            "the first presence of a user signed in on {} says {first:?}; {}",
            NODE_IDS[bob_node],
            match caught_up {
                Ok(()) => format!("`available` came after {:?}", subscribed.elapsed()),
                Err(_) => format!("no `available` within {CONVERGE:?}"),
            }
        ))
    };
    ok_to(watcher, unsubscribe(&[&bob])).await?;
    ok_to(&mut device, ClientMsg::Bye { rid: None }).await?;
    outcome
}

#[tokio::test]
async fn the_first_presence_of_a_user_just_signed_in_on_another_node_counts_the_device() {
    let _serial = SERIAL.lock().await;
    let c = cluster(2, |_| {});
    let mut watchers = one_per_node(&c.nodes, "alice-d", "laptop").await;
    let mut tally = Tally::new("first presence of a user just signed in elsewhere");
    while tally.go_on() {
        let i = tally.runs;
        let w = i % 2;
        let outcome = subscribe_to_a_fresh_user(&c.nodes, &mut watchers[w], 1 - w, i).await;
        tally.record(outcome);
    }
    tally.finish();
}

// ---------------------------------------------------------------------------------------------
// e. Forward and transfer to a user just signed in on another node.

/// Alice and Bob on each node, one device each, seen everywhere before the loop starts.
async fn alices_and_bobs(c: &Cluster, tag: &str) -> (Vec<Raw>, Vec<Raw>) {
    let (mut alices, mut bobs) = (Vec::new(), Vec::new());
    for (n, node) in c.nodes.iter().enumerate() {
        alices.push(Raw::sign_in(node.addr, &user(&format!("alice-{tag}"), n), "laptop").await);
        bobs.push(Raw::sign_in(node.addr, &user(&format!("bob-{tag}"), n), "desk").await);
    }
    for node in &c.nodes {
        for b in &bobs {
            wait_for_endpoints(node, &b.user, 1).await;
        }
    }
    (alices, bobs)
}

async fn forward_to_a_fresh_user(
    nodes: &[RunningNode],
    alice: &mut Raw,
    bob: &mut Raw,
    carol_node: usize,
    i: usize,
) -> Result<(), String> {
    let tag = format!("forward {i}");
    let carol = user("carol-e", i);
    let to = bob.user.clone();
    let call = place_call(alice, &to, Some(&tag)).await?;
    let (on_bob, _) = rung(bob, until(EVENT_TIMEOUT), Some(&tag)).await?;
    let mut device = Raw::sign_in(nodes[carol_node].addr, &carol, "phone").await;
    let forward = ClientMsg::CallForward {
        rid: None,
        call: on_bob.clone(),
        to: carol.clone(),
    };
    ok_to(bob, forward).await?;
    let (on_carol, _) = tokio::select! {
        r = rung(&mut device, until(CONVERGE), Some(&tag)) => r?,
        reason = ends(alice, &call) => {
            return Err(format!(
                "forwarded to a user welcomed on {} just before, the call ended with {reason:?}",
                NODE_IDS[carol_node]
            ));
        }
    };
    ended_with(bob, &on_bob, 302, "Moved Temporarily").await?;
    accept(&mut device, &on_carol).await?;
    let remote = established_with(alice, &call).await?;
    if remote != device.endpoint {
        return Err(format!("established with {remote}, not Carol's device"));
    }
    terminate(alice, &call).await?;
    ended_with(&mut device, &on_carol, 200, "Terminated remotely").await?;
    ok_to(&mut device, ClientMsg::Bye { rid: None }).await
}

#[tokio::test]
async fn a_forward_to_a_user_just_signed_in_on_another_node_rings_there() {
    let _serial = SERIAL.lock().await;
    let c = cluster(2, quiet);
    let (mut alices, mut bobs) = alices_and_bobs(&c, "ef").await;
    let mut tally = Tally::new("forward to a user just signed in elsewhere");
    while tally.go_on() {
        let i = tally.runs;
        // The caller's node, Bob's, and Carol's: never the caller's, whose call re-targets.
        let (from, to) = (i % 2, (i / 2) % 2);
        let outcome =
            forward_to_a_fresh_user(&c.nodes, &mut alices[from], &mut bobs[to], 1 - from, i).await;
        tally.record(outcome);
    }
    tally.finish();
}

async fn transfer_to_a_fresh_user(
    nodes: &[RunningNode],
    alice: &mut Raw,
    bob: &mut Raw,
    carol_node: usize,
    i: usize,
) -> Result<(), String> {
    let tag = format!("transfer {i}");
    let carol = user("carol-t", i);
    let to = bob.user.clone();
    let call = place_call(alice, &to, Some(&tag)).await?;
    let (on_bob, _) = rung(bob, until(EVENT_TIMEOUT), Some(&tag)).await?;
    accept(bob, &on_bob).await?;
    reached(bob, &on_bob, CallState::Established).await?;
    reached(alice, &call, CallState::Established).await?;
    let mut device = Raw::sign_in(nodes[carol_node].addr, &carol, "phone").await;
    let transfer = ClientMsg::CallTransfer {
        rid: None,
        call: on_bob.clone(),
        to: carol.clone(),
    };
    ok_to(bob, transfer).await?;
    // The transfer call carries no toast: Carol's device is new, so any call is this one.
    let (on_carol, _) = tokio::select! {
        r = rung(&mut device, until(CONVERGE), None) => r?,
        failed = call_state(bob, &on_bob, until(CONVERGE), |s, p| {
            p == CallState::Transferring && s == CallState::Established
        }) => {
            return Err(format!(
                "the transfer to a user welcomed on {} just before failed: {:?}",
                NODE_IDS[carol_node],
                failed.map(|(_, reason)| reason)
            ));
        }
    };
    accept(&mut device, &on_carol).await?;
    let m = alice
        .try_recv_until(
            until(EVENT_TIMEOUT),
            |m| matches!(m, ServerMsg::CallTransferred { call: c, .. } if *c == call),
        )
        .await?;
    if !matches!(&m, ServerMsg::CallTransferred { remote, .. } if remote.endpoint == device.endpoint)
    {
        return Err(format!("Alice was transferred elsewhere: {m:?}"));
    }
    ended_with(bob, &on_bob, 202, "Transferred").await?;
    terminate(alice, &call).await?;
    ended_with(&mut device, &on_carol, 200, "Terminated remotely").await?;
    ok_to(&mut device, ClientMsg::Bye { rid: None }).await
}

#[tokio::test]
async fn a_transfer_to_a_user_just_signed_in_on_another_node_reaches_them() {
    let _serial = SERIAL.lock().await;
    let c = cluster(2, quiet);
    let (mut alices, mut bobs) = alices_and_bobs(&c, "et").await;
    let mut tally = Tally::new("transfer to a user just signed in elsewhere");
    let mut i = 0;
    while tally.go_on() {
        // Every placement of caller, transferor and target but all three on one node.
        let (from, to, target) = (i % 2, (i / 2) % 2, (i / 4) % 2);
        i += 1;
        if from == to && to == target {
            continue;
        }
        let run = tally.runs;
        let outcome =
            transfer_to_a_fresh_user(&c.nodes, &mut alices[from], &mut bobs[to], target, run).await;
        tally.record(outcome);
    }
    tally.finish();
}

// ---------------------------------------------------------------------------------------------
// f. endpoints_per_user raced on two nodes.

const LIMIT: usize = 2;

/// Waits (at most [`CONVERGE`]) until every node lists exactly `want` for `user`.
async fn directories_hold(
    nodes: &[RunningNode],
    user: &str,
    want: &[String],
) -> Result<(), String> {
    let mut want = want.to_vec();
    want.sort();
    let deadline = until(CONVERGE);
    loop {
        let now: Vec<Vec<String>> = nodes
            .iter()
            .map(|n| {
                let mut e = n.endpoints_of(user);
                e.sort();
                e
            })
            .collect();
        if now.iter().all(|e| *e == want) {
            return Ok(());
        }
        if Instant::now() >= deadline {
            return Err(format!(
                "after {CONVERGE:?} the directories list {now:?}, expected {want:?}"
            ));
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Whether more than [`LIMIT`] sign-ins were welcomed (the race happened), or what failed.
async fn sign_in_over_the_limit(nodes: &[RunningNode], i: usize) -> Result<bool, String> {
    let name = user("dora-f", i);
    let hellos = (0..=LIMIT).map(|k| {
        let addr = nodes[(i + k) % 2].addr;
        let device = format!("d{k}");
        let name = &name;
        async move { Raw::try_sign_in(addr, name, &device).await }
    });
    let mut welcomed = Vec::new();
    for outcome in futures::future::join_all(hellos).await {
        match outcome {
            Ok(raw) => welcomed.push(raw),
            Err(ServerMsg::Error {
                code: ErrorCode::Forbidden,
                ..
            }) => {}
            Err(other) => return Err(format!("a hello got {other:?}")),
        }
    }
    let extra = welcomed.len().saturating_sub(LIMIT);
    // Those ranked beyond the limit get `forbidden` without a rid, then the close.
    let mut kicked = Vec::new();
    if extra > 0 {
        let deadline = until(CONVERGE);
        let mut waits: FuturesUnordered<_> = welcomed
            .iter_mut()
            .enumerate()
            .map(|(j, raw)| async move {
                let got = raw
                    .try_recv_until(deadline, |m| matches!(m, ServerMsg::Error { .. }))
                    .await;
                (j, got)
            })
            .collect();
        while kicked.len() < extra {
            match waits.next().await {
                Some((j, Ok(m))) => kicked.push((j, m)),
                Some((_, Err(_))) => {}
                None => break,
            }
        }
    }
    let welcomed_n = welcomed.len();
    for (_, m) in &kicked {
        if !matches!(
            m,
            ServerMsg::Error {
                rid: None,
                code: ErrorCode::Forbidden,
                ..
            }
        ) {
            return Err(format!("signed out with {m:?}"));
        }
    }
    if kicked.len() < extra {
        return Err(format!(
            "{welcomed_n} of {} sign-ins welcomed with a limit of {LIMIT}, and only {} \
             signed out within {CONVERGE:?}",
            LIMIT + 1,
            kicked.len()
        ));
    }
    let mut survivors: Vec<Raw> = welcomed
        .into_iter()
        .enumerate()
        .filter(|(j, _)| !kicked.iter().any(|(k, _)| k == j))
        .map(|(_, raw)| raw)
        .collect();
    for raw in &mut survivors {
        let reply = raw
            .try_request(ClientMsg::Ping { rid: None }, until(EVENT_TIMEOUT))
            .await
            .map_err(|e| format!("a device kept within the limit: {e}"))?;
        if !matches!(reply, ServerMsg::Pong { .. }) {
            return Err(format!("a device kept within the limit got {reply:?}"));
        }
    }
    let ids: Vec<String> = survivors.iter().map(|r| r.endpoint.clone()).collect();
    directories_hold(nodes, &name, &ids).await?;
    for raw in &mut survivors {
        ok_to(raw, ClientMsg::Bye { rid: None }).await?;
    }
    Ok(extra > 0)
}

#[tokio::test]
async fn sign_ins_over_endpoints_per_user_raced_on_two_nodes_end_within_the_limit() {
    let _serial = SERIAL.lock().await;
    let c = cluster(2, |s| s.limits.endpoints_per_user = LIMIT);
    let mut tally = Tally::new("endpoints_per_user raced on two nodes");
    while tally.go_on() {
        let outcome = sign_in_over_the_limit(&c.nodes, tally.runs).await;
        if outcome == Ok(true) {
            tally.note("welcomed more than the limit, so the nodes had to sign one out");
        }
        tally.record(outcome.map(|_| ()));
    }
    tally.finish();
}

// ---------------------------------------------------------------------------------------------
// g. The auto-accept goes to the device that published `active` just before the call.

const LANES: usize = 5;

/// One caller and one user with a device on each node; lanes run side by side, as each
/// iteration waits for the toast timeout.
struct Lane {
    alice: Raw,
    bob: String,
    devices: [Raw; 2],
    index: usize,
}

impl Lane {
    async fn iteration(&mut self, k: usize) -> Result<(), String> {
        let tag = format!("lane {} call {k}", self.index);
        let active = (k + self.index) % 2;
        ok_to(&mut self.devices[active], device_state(Activity::Active)).await?;
        let call = place_call(&mut self.alice, &self.bob, Some(&tag)).await?;
        let [d0, d1] = &mut self.devices;
        let (r0, r1) = tokio::join!(
            rung(d0, until(CONVERGE), Some(&tag)),
            rung(d1, until(CONVERGE), Some(&tag))
        );
        let legs = [r0?.0, r1?.0];
        // The toast times out (300 ms) and the arbiter asks the most active device.
        let asked = |leg: &str| {
            let leg = leg.to_owned();
            move |m: &ServerMsg| matches!(m, ServerMsg::AutoAcceptNeeded { call } if *call == leg)
        };
        let deadline = until(EVENT_TIMEOUT);
        let chosen = tokio::select! {
            r = d0.try_recv_until(deadline, asked(&legs[0])) => r.map(|_| 0),
            r = d1.try_recv_until(deadline, asked(&legs[1])) => r.map(|_| 1),
        }?;
        accept(&mut self.devices[chosen], &legs[chosen]).await?;
        reached(&mut self.alice, &call, CallState::Established).await?;
        terminate(&mut self.alice, &call).await?;
        reached(&mut self.alice, &call, CallState::Terminated).await?;
        if chosen == active {
            Ok(())
        } else {
            Err(format!(
                "the device on {} published `active` just before the call from {}, but the \
                 device on {} was asked to auto-accept",
                NODE_IDS[active],
                NODE_IDS[self.index % 2],
                NODE_IDS[chosen]
            ))
        }
    }
}

#[tokio::test]
async fn the_auto_accept_goes_to_the_device_that_just_published_active_on_either_node() {
    let _serial = SERIAL.lock().await;
    // The tests' fork timers: a 300 ms toast, a 300 ms grace.
    let c = cluster(2, |_| {});
    let mut lanes = Vec::new();
    for j in 0..LANES {
        let bob = user("bob-g", j);
        let alice = Raw::sign_in(c.nodes[j % 2].addr, &user("alice-g", j), "laptop").await;
        let devices = [
            Raw::sign_in(c.nodes[0].addr, &bob, "desk").await,
            Raw::sign_in(c.nodes[1].addr, &bob, "phone").await,
        ];
        lanes.push(Lane {
            alice,
            bob,
            devices,
            index: j,
        });
    }
    for node in &c.nodes {
        for lane in &lanes {
            wait_for_endpoints(node, &lane.bob, 2).await;
        }
    }
    let mut tally = Tally::new("auto-accept to the device just made active");
    let mut k = 0;
    while tally.go_on() {
        let outcomes =
            futures::future::join_all(lanes.iter_mut().map(|lane| lane.iteration(k))).await;
        for outcome in outcomes {
            tally.record(outcome);
        }
        k += 1;
    }
    tally.finish();
}

// ---------------------------------------------------------------------------------------------
// Property: random rapid changes on three nodes converge everywhere, and calls ring.

const USERS: usize = 4;
/// Device slots per user; slot `s` of user `u` lives on node `(u + s) % 3`.
const SLOTS: usize = 3;
const ROUNDS: usize = 8;
const OPS_PER_ROUND: usize = 40;

/// A small seeded generator (xorshift64*), so a failing run can be replayed.
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: usize) -> usize {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        (self.0.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 33) as usize % n
    }
}

struct Slot {
    node: usize,
    raw: Option<Raw>,
    /// What the device published last; `None` while it never did.
    activity: Option<Activity>,
}

struct Person {
    name: String,
    slots: Vec<Slot>,
    status: Option<Status>,
}

/// Rank of an effective activity: active < inactive < unknown < away (section 4).
fn activity_rank(a: Option<Activity>) -> u8 {
    match a {
        Some(Activity::Active) => 0,
        Some(Activity::Inactive) => 1,
        None => 2,
        Some(Activity::Away) => 3,
    }
}

/// The aggregated availability the contract gives `p` (section 4, "Aggregation").
fn truth(p: &Person) -> Availability {
    let best = p
        .slots
        .iter()
        .filter(|s| s.raw.is_some())
        .map(|s| activity_rank(s.activity))
        .min();
    let Some(best) = best else {
        return Availability::Offline;
    };
    match p.status {
        Some(Status::AppearOffline) => Availability::Offline,
        Some(Status::Busy) if best == 1 || best == 3 => Availability::BusyInactive,
        Some(Status::Busy) => Availability::Busy,
        Some(Status::DoNotDisturb) => Availability::DoNotDisturb,
        Some(Status::BeRightBack) => Availability::BeRightBack,
        Some(Status::Away) => Availability::Away,
        Some(Status::Available) => Availability::Available,
        None => match best {
            1 => Availability::Inactive,
            3 => Availability::Away,
            _ => Availability::Available,
        },
    }
}

const STATUSES: [Option<Status>; 7] = [
    None,
    Some(Status::Available),
    Some(Status::Busy),
    Some(Status::DoNotDisturb),
    Some(Status::BeRightBack),
    Some(Status::Away),
    Some(Status::AppearOffline),
];
const ACTIVITIES: [Activity; 3] = [Activity::Active, Activity::Inactive, Activity::Away];

/// What the property test counts.
#[derive(Default)]
struct Findings {
    ops: usize,
    calls: usize,
    checks: usize,
    failures: Vec<String>,
}

/// One random change; a sign-in is followed at once by a call from another node.
async fn random_op(
    rng: &mut Rng,
    nodes: &[RunningNode],
    people: &mut [Person],
    callers: &mut [Raw],
    f: &mut Findings,
) -> Result<(), String> {
    let u = rng.below(USERS);
    let s = rng.below(SLOTS);
    let p = &mut people[u];
    let slot = &mut p.slots[s];
    f.ops += 1;
    let Some(raw) = slot.raw.as_mut() else {
        let mut raw = Raw::sign_in(nodes[slot.node].addr, &p.name, &format!("slot{s}")).await;
        slot.activity = None;
        if rng.below(2) == 0 {
            // A call placed from another node right after the welcome must ring the device.
            let from = (slot.node + 1 + rng.below(2)) % 3;
            let tag = format!("op {}", f.ops);
            f.calls += 1;
            let call = place_call(&mut callers[from], &p.name, Some(&tag)).await?;
            let caller = &mut callers[from];
            let (rang, ended) = tokio::select! {
                r = rung(&mut raw, until(CONVERGE), Some(&tag)) => (r.map(|_| ()), false),
                reason = ends(caller, &call) => {
                    (Err(format!("the call ended with {reason:?}")), true)
                }
            };
            if let Err(e) = rang {
                f.failures.push(format!(
                    "a call from {} right after a welcome on {} did not ring it: {e}",
                    NODE_IDS[from], NODE_IDS[slot.node]
                ));
            }
            if !ended {
                terminate(caller, &call).await?;
                reached(caller, &call, CallState::Terminated).await?;
            }
        }
        slot.raw = Some(raw);
        return Ok(());
    };
    match rng.below(10) {
        0..=3 => {
            let status = STATUSES[rng.below(STATUSES.len())];
            ok_to(raw, set_status(status)).await?;
            p.status = status;
        }
        4..=7 => {
            let activity = ACTIVITIES[rng.below(ACTIVITIES.len())];
            ok_to(raw, device_state(activity)).await?;
            slot.activity = Some(activity);
        }
        _ => {
            ok_to(raw, ClientMsg::Bye { rid: None }).await?;
            slot.raw = None;
            if p.slots.iter().all(|s| s.raw.is_none()) {
                p.status = None;
            }
        }
    }
    Ok(())
}

/// After a round: each watcher must hold the truth within [`SETTLE`] of the last answer, and
/// that must be its last word (fences, probes and pings, as the file's doc says).
async fn check_round(
    nodes: &[RunningNode],
    people: &[Person],
    watchers: &mut [(Raw, Seen)],
    round: usize,
    f: &mut Findings,
) -> Result<(), String> {
    let answered = Instant::now();
    let want: HashMap<String, Availability> =
        people.iter().map(|p| (p.name.clone(), truth(p))).collect();
    let holds = |s: &Seen| want.iter().all(|(u, a)| s.last(u) == Some(*a));
    let settled = futures::future::join_all(
        watchers
            .iter_mut()
            .map(|(raw, seen)| read_until(raw, seen, answered + SETTLE, holds)),
    )
    .await;
    for (n, outcome) in settled.into_iter().enumerate() {
        f.checks += 1;
        if outcome.is_err() {
            let wrong: Vec<String> = want
                .iter()
                .filter(|(u, a)| watchers[n].1.last(u) != Some(**a))
                .map(|(u, a)| format!("{u}: {:?}, truly {a:?}", watchers[n].1.last(u)))
                .collect();
            f.failures.push(format!(
                "round {round}: the watcher on {} after {SETTLE:?}: {}",
                NODE_IDS[n],
                wrong.join(", ")
            ));
        }
    }

    // The last word: a fence signed in on every node, seen by a new probe on every node.
    let fences: Vec<String> = (0..nodes.len())
        .map(|n| format!("sip:fence-p{round}-{n}@example.com"))
        .collect();
    let mut fence_devices = Vec::new();
    for (n, node) in nodes.iter().enumerate() {
        fence_devices.push(Raw::sign_in(node.addr, &fences[n], "fence").await);
    }
    let names: Vec<&str> = people.iter().map(|p| p.name.as_str()).collect();
    for (n, node) in nodes.iter().enumerate() {
        let mut probe = Raw::sign_in(
            node.addr,
            &format!("sip:probe-p{round}-{n}@example.com"),
            "p",
        )
        .await;
        let fence_names: Vec<&str> = fences.iter().map(String::as_str).collect();
        ok_to(&mut probe, subscribe(&fence_names)).await?;
        let mut seen = Seen::default();
        let fenced = read_until(&mut probe, &mut seen, until(CONVERGE), |s| {
            fence_names
                .iter()
                .all(|u| s.last(u) == Some(Availability::Available))
        })
        .await;
        if let Err(e) = fenced {
            f.failures.push(format!(
                "round {round}: {} never showed every node's fence: {e}",
                NODE_IDS[n]
            ));
            continue;
        }
        let state = node_presence(&mut probe, &names).await?;
        let (raw, seen) = &mut watchers[n];
        ping_through(raw, seen).await?;
        for (u, a) in &want {
            f.checks += 1;
            let (node_has, held) = (state[u], seen.last(u));
            if node_has != *a || held != Some(*a) {
                f.failures.push(format!(
                    "round {round}: {u} is {a:?}, but {} holds {node_has:?} and its watcher \
                     was last told {held:?}",
                    NODE_IDS[n]
                ));
            }
        }
        ok_to(&mut probe, ClientMsg::Bye { rid: None }).await?;
    }
    for mut fence in fence_devices {
        ok_to(&mut fence, ClientMsg::Bye { rid: None }).await?;
    }
    Ok(())
}

#[tokio::test]
async fn random_rapid_changes_on_three_nodes_converge_for_every_watcher_and_calls_ring() {
    let _serial = SERIAL.lock().await;
    let seed = seed_from_env("RACES_SEED") | 1;
    eprintln!("property seed {seed} (RACES_SEED={seed} replays the same choices)");
    let mut rng = Rng(seed);
    let c = cluster(3, quiet);
    let mut people: Vec<Person> = (0..USERS)
        .map(|u| Person {
            name: user("pat-p", u),
            slots: (0..SLOTS)
                .map(|s| Slot {
                    node: (u + s) % 3,
                    raw: None,
                    activity: None,
                })
                .collect(),
            status: None,
        })
        .collect();
    let names: Vec<String> = people.iter().map(|p| p.name.clone()).collect();
    let names: Vec<&str> = names.iter().map(String::as_str).collect();
    let mut watchers = Vec::new();
    let mut callers = Vec::new();
    for (n, node) in c.nodes.iter().enumerate() {
        let mut watcher = Raw::sign_in(node.addr, &user("watcher-p", n), "w").await;
        ok_to(&mut watcher, subscribe(&names))
            .await
            .expect("the watcher subscribes");
        watchers.push((watcher, Seen::default()));
        callers.push(Raw::sign_in(node.addr, &user("caller-p", n), "c").await);
    }
    let started = std::time::Instant::now();
    let mut f = Findings::default();
    let mut rounds = 0;
    while rounds < ROUNDS && started.elapsed() < BUDGET {
        for _ in 0..OPS_PER_ROUND {
            random_op(&mut rng, &c.nodes, &mut people, &mut callers, &mut f)
                .await
                .unwrap_or_else(|e| panic!("seed {seed}: a request failed: {e}"));
        }
        check_round(&c.nodes, &people, &mut watchers, rounds, &mut f)
            .await
            .unwrap_or_else(|e| panic!("seed {seed}: a check's request failed: {e}"));
        rounds += 1;
    }
    let summary = format!(
        "property (seed {seed}): {} failures in {rounds} rounds of {OPS_PER_ROUND} changes \
         ({} calls after a welcome, {} presence checks), in {:.1?}",
        f.failures.len(),
        f.calls,
        f.checks,
        started.elapsed()
    );
    eprintln!("{summary}");
    for e in &f.failures {
        eprintln!("  {e}");
    }
    assert!(
        f.failures.is_empty(),
        "{summary}; the first ones:\n  {}",
        f.failures
            .iter()
            .take(8)
            .cloned()
            .collect::<Vec<_>>()
            .join("\n  ")
    );
}
