//! Which nodes are alive, and in which run: heartbeats, the node timeout (held back while this
//! node hears nothing from NATS, not even its own heartbeat: then it is the one cut off),
//! ending what a dead node's run was part of (and purging its records), rejoining as a new run
//! after being declared dead or stale, and the graceful leave.

use super::*;

impl Cluster {
    /// The wall clock in unix ms (see [`Cluster::restart_with_clock_set_back`]).
    pub(super) fn now_ms(&self) -> u64 {
        wire::unix_ms().saturating_sub(self.clock_set_back_ms.load(Ordering::Relaxed))
    }

    /// The others declared this run dead (it was cut off longer than `node_timeout`), or heard
    /// it with an epoch below a later run of its id (its clock was set back across a restart):
    /// they have ended every call involving it. It does the same on its side, then comes back
    /// as a new run, above both its own last run and `above`, the latest the asker knows.
    pub(super) fn rejoin(self: &Arc<Self>, above: u64) {
        let new = next_epoch(self.now_ms(), self.epoch(), above);
        tracing::warn!(node = %self.node_id, old = self.epoch(), new, "this node was declared dead or stale by the others; rejoining as a new run");
        self.start_run(new);
    }

    /// Starts run `new` of this node: a new epoch, every call involving another node ended,
    /// its records written again, the others' records read again.
    pub(super) fn start_run(self: &Arc<Self>, new: u64) {
        self.epoch.store(new, Ordering::Relaxed);
        if let Some(links) = &self.links {
            links.new_run(new);
        }
        for entry in self.legs.iter() {
            entry.value().1.do_send(LegMsg::NodeLost);
        }
        for entry in self.endpoints.iter() {
            entry.value().do_send(EndpointMsg::NodeLost { node: None });
        }
        self.forget_unanswered(None);
        self.forget_events_to(None);
        self.end_relays_to(None);
        let cached: Vec<(String, String)> = self
            .remote
            .iter()
            .flat_map(|e| {
                let user = e.key().clone();
                e.value()
                    .iter()
                    .map(move |r| (user.clone(), r.id.clone()))
                    .collect::<Vec<_>>()
            })
            .collect();
        for (user, endpoint) in cached {
            self.forget(&user, &endpoint);
        }
        lock(&self.nodes).clear();
        // What this node declared dead stays dead: when NATS itself was away, every node
        // declared every other dead and purged its records, and each must still tell the
        // others to rejoin when it hears their old runs, or their records would stay purged.
        // Re-stamped in place: each shard stays locked while its records are queued, so an
        // endpoint ending meanwhile queues its delete after this put, never before it (a put
        // after the delete would leave a record of an endpoint that no longer exists).
        for mut e in self.own.iter_mut() {
            e.value_mut().epoch = new;
            if let Some(put) = record_put(e.key(), &e.value().to_record(&self.node_id)) {
                let _ = self.kv_tx.send(put);
            }
        }
        self.heartbeat(false);
        if let Some(earlier) = lock(&self.reload).take() {
            earlier.abort();
        }
        let me = self.clone();
        let reload = self.rt.spawn(async move {
            // Without the reload this node would not know the others' endpoints until they
            // change, so it is tried again while NATS is unsteady.
            for attempt in 1..=RELOAD_ATTEMPTS {
                match me.load().await {
                    Ok(_) => return,
                    Err(e) => {
                        tracing::warn!(error = %e, attempt, "cannot reload the directory after rejoining");
                        tokio::time::sleep(Duration::from_secs(1)).await;
                    }
                }
            }
            tracing::error!("gave up reloading the directory after rejoining; other nodes' endpoints appear as they change");
        });
        *lock(&self.reload) = Some(reload);
    }

    /// Whether `node` is to be asked to rejoin now: the first time one of its runs needs it,
    /// then at most once per `node_timeout`.
    pub(super) fn first_ask_in_a_while(&self, node: &str) -> bool {
        let now = Instant::now();
        let mut told = lock(&self.told);
        told.retain(|_, at| now.duration_since(*at) < self.timeout);
        match told.entry(node.to_owned()) {
            std::collections::hash_map::Entry::Occupied(_) => false,
            std::collections::hash_map::Entry::Vacant(v) => {
                v.insert(now);
                true
            }
        }
    }

    /// The latest run of `node` known here, alive or declared dead (0: none).
    pub(super) fn latest_run(&self, node: &str) -> u64 {
        let dead = lock(&self.dead).get(node).copied().unwrap_or(0);
        let seen = lock(&self.nodes).get(node).map_or(0, |n| n.epoch);
        dead.max(seen)
    }

    /// True when `node`'s run `epoch` was declared dead, or a later run of it is known dead.
    pub(super) fn is_dead(&self, node: &str, epoch: u64) -> bool {
        lock(&self.dead).get(node).is_some_and(|e| *e >= epoch)
    }

    /// The living node with the smallest id cleans the KV for everyone.
    pub(super) fn is_purger(&self) -> bool {
        let nodes = lock(&self.nodes);
        nodes.keys().all(|n| *n > self.node_id)
    }

    /// Notes that `node` (in `epoch`) is alive. A later epoch means the node restarted: what
    /// referenced its previous run is ended first. Returns false for a run that is older than
    /// the one known, or dead: its records are stale.
    pub(super) fn saw_node(&self, node: &str, epoch: u64, heartbeat: bool) -> bool {
        if node == self.node_id {
            return true;
        }
        let restarted = {
            let mut nodes = lock(&self.nodes);
            match nodes.get_mut(node) {
                Some(seen) if seen.epoch == epoch => {
                    if heartbeat {
                        seen.last = Instant::now();
                    }
                    None
                }
                Some(seen) if epoch < seen.epoch => return false,
                Some(seen) => {
                    let old = seen.epoch;
                    seen.epoch = epoch;
                    seen.last = Instant::now();
                    // The new run may be another build: its heartbeat says.
                    seen.acks_events = false;
                    seen.syncs_directory = None;
                    Some(old)
                }
                None => {
                    if self.is_dead(node, epoch) {
                        return false;
                    }
                    nodes.insert(
                        node.to_owned(),
                        NodeSeen {
                            epoch,
                            last: Instant::now(),
                            acks_events: false,
                            syncs_directory: None,
                        },
                    );
                    metrics::gauge!(m::CLUSTER_NODES).set((nodes.len() + 1) as f64);
                    tracing::info!(%node, "node joined the cluster");
                    None
                }
            }
        };
        if let Some(old) = restarted {
            tracing::warn!(%node, "node restarted; ending what referenced its previous run");
            self.node_lost(node, old, true);
        }
        true
    }

    /// Declares `node` (in `epoch`) dead and ends everything on this node that referenced it.
    pub(super) fn node_lost(&self, node: &str, epoch: u64, purge: bool) {
        let mut dead = lock(&self.dead);
        let latest = dead.entry(node.to_owned()).or_insert(epoch);
        *latest = (*latest).max(epoch);
        drop(dead);
        if let Some(links) = &self.links {
            links.node_lost(node, epoch);
        }
        // Drop its endpoints from the cache and presence at once.
        let mut gone: Vec<(String, String, u64)> = Vec::new();
        for entry in self.remote.iter() {
            for e in entry.value() {
                if e.record.node == node && e.record.epoch <= epoch {
                    gone.push((entry.key().clone(), e.id.clone(), e.revision));
                }
            }
        }
        for (user, endpoint, _) in &gone {
            self.forget(user, endpoint);
        }
        // Sign-ins here stop waiting for its word that it read their record.
        let synced: Vec<u64> = lock(&self.sign_in_syncs).keys().copied().collect();
        for token in synced {
            self.directory_synced(node, token);
        }
        // The smallest living node id cleans the KV for everyone.
        if purge && self.is_purger() {
            tracing::info!(%node, records = gone.len(), "purging the dead node's records");
            for (user, endpoint, revision) in &gone {
                let _ = self.kv_tx.send(KvOp::Delete(
                    wire::record_key(user, endpoint),
                    Some(*revision),
                ));
            }
        }
        // Legs here whose endpoint was there.
        for entry in self.legs.iter() {
            if entry.value().0 == node {
                entry.value().1.do_send(LegMsg::NodeLost);
            }
        }
        self.forget_unanswered(Some(node));
        self.forget_events_to(Some(node));
        self.end_relays_to(Some(node));
        // Endpoints here whose calls live there.
        for entry in self.endpoints.iter() {
            entry.value().do_send(EndpointMsg::NodeLost {
                node: Some((node.to_owned(), epoch)),
            });
        }
    }

    pub(super) fn check_liveness(&self) {
        let now = Instant::now();
        let hearing = *lock(&self.hearing);
        let (dead, cut_off): (Vec<(String, u64)>, Option<usize>) = {
            let mut nodes = lock(&self.nodes);
            let (dead, cut_off) = match unheard_too_long(
                now,
                self.timeout,
                &hearing,
                nodes.iter().map(|(n, s)| (n.as_str(), s.last)),
            ) {
                Unheard::Dead(dead) => (dead.into_iter().map(str::to_owned).collect(), None),
                Unheard::CutOff { overdue } => (Vec::new(), Some(overdue)),
            };
            let dead: Vec<(String, u64)> = dead
                .into_iter()
                .filter_map(|n: String| nodes.remove(&n).map(|s| (n, s.epoch)))
                .collect();
            metrics::gauge!(m::CLUSTER_NODES).set((nodes.len() + 1) as f64);
            (dead, cut_off)
        };
        if let Some(overdue) = cut_off
            && overdue > 0
            && lock(&self.hearing).first_warning()
        {
            tracing::warn!(
                unheard_ms = now.saturating_duration_since(hearing.last).as_millis() as u64,
                overdue,
                "this node hears nothing from NATS, not even its own heartbeat: it is the one cut off, so it declares nobody dead"
            );
        }
        for (node, epoch) in dead {
            tracing::warn!(%node, timeout_ms = self.timeout.as_millis() as u64, "node unheard for node_timeout; declaring it dead");
            self.node_lost(&node, epoch, true);
        }
    }

    pub(super) fn heartbeat(&self, leaving: bool) {
        if !leaving
            && let Some(until) = *lock(&self.muted_until)
            && Instant::now() < until
        {
            return;
        }
        // While NATS is away a heartbeat would only wait in the client's buffer, with every
        // other one of the outage, and all go out stale on reconnect; the next tick sends a
        // fresh one.
        if !leaving && !self.nats_connected() {
            return;
        }
        let hb = Heartbeat {
            node: self.node_id.clone(),
            epoch: self.epoch(),
            leaving,
            acks_events: true,
            syncs_directory: true,
            batches: self.batching.enabled,
            link: self.links.as_ref().map(|l| l.advertise().to_owned()),
        };
        if let Ok(bytes) = rmp_serde::to_vec_named(&hb) {
            let _ = self.outbound.push(HEARTBEAT_SUBJECT, &bytes, false, false);
        }
    }

    /// Graceful leave: this node's records are deleted at once and the others are told; then
    /// the NATS runtime stops.
    pub async fn leave(self: &Arc<Self>) {
        let me = self.clone();
        let _ = self.rt.spawn(async move { me.leave_inner().await }).await;
        if let Some(stop) = lock(&self.stop).take() {
            let _ = stop.send(());
        }
    }

    pub(super) async fn leave_inner(&self) {
        self.leaving.store(true, Ordering::SeqCst);
        // Queued behind the writes still waiting, so none of those can land after them and
        // bring a record back.
        let keys: Vec<String> = self
            .own
            .iter()
            .map(|e| wire::record_key(&e.value().user, e.key()))
            .collect();
        self.own.clear();
        self.directory_gauge();
        for key in keys {
            let _ = self.kv_tx.send(KvOp::Delete(key, None));
        }
        // Bounded: with NATS away the node still stops (the others purge its records once
        // they find it dead).
        let (done_tx, done_rx) = tokio::sync::oneshot::channel();
        if self.kv_tx.send(KvOp::Flush(done_tx)).is_ok() {
            let _ = tokio::time::timeout(Duration::from_secs(3), done_rx).await;
        }
        self.heartbeat(true);
        // Everything queued goes out before the runtime stops.
        let (done_tx, done_rx) = tokio::sync::oneshot::channel();
        if self.outbound.push_flush(done_tx) {
            let _ = tokio::time::timeout(Duration::from_secs(2), done_rx).await;
        }
    }
}

/// What this node has heard from NATS lately: any heartbeat, its own included (core NATS sends
/// a client what it publishes on a subject it subscribes to). A node that hears nothing at
/// all, not even itself, is the one cut off (or NATS is away): the others' silence then says
/// nothing about them, and declaring them dead would end their calls with it and, once this
/// node is back, make each of them rejoin (architecture §13).
#[derive(Debug, Clone, Copy)]
pub(super) struct Hearing {
    /// When the last heartbeat came.
    last: Instant,
    /// When hearing came back after the last lapse (or the node started): another node's
    /// silence before then is not held against it, since this node could not have heard it.
    since: Instant,
    /// Whether the current lapse has been logged.
    warned: bool,
}

impl Hearing {
    pub(super) fn new(now: Instant) -> Self {
        Hearing {
            last: now,
            since: now,
            warned: false,
        }
    }

    /// A heartbeat came at `now`. After a lapse the others' timers start again from `now`;
    /// returns how long nothing came, then.
    pub(super) fn heard(&mut self, now: Instant, timeout: Duration) -> Option<Duration> {
        let lapse = self.lapsed(now, timeout).then(|| now - self.last);
        if lapse.is_some() {
            self.since = now;
            self.warned = false;
        }
        self.last = now;
        lapse
    }

    /// Whether nothing has come for longer than [`lapse`]`(timeout)`.
    pub(super) fn lapsed(&self, now: Instant, timeout: Duration) -> bool {
        now.saturating_duration_since(self.last) > lapse(timeout)
    }

    /// True the first time it is asked in a lapse (to log the lapse once).
    fn first_warning(&mut self) -> bool {
        !std::mem::replace(&mut self.warned, true)
    }
}

/// How long a node may hear nothing at all (its own heartbeat included) before it counts itself
/// cut off: half `node_timeout`. Heartbeats go out every third of it, so a node that hears
/// only itself (every other node dead) has its echo late by a sixth of `node_timeout` before
/// it does; with any other node alive, every heartbeat of that one would have to be late too.
/// A false lapse (an echo that late under load) only delays this node's verdict on a node
/// that died: its silence counts again from the moment hearing came back, so such a death is
/// declared at most `node_timeout` after the lapse ends, and the others declare it on time.
pub(super) fn lapse(timeout: Duration) -> Duration {
    timeout / 2
}

/// The verdict of one liveness check.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Unheard<'a> {
    /// This node hears NATS: these nodes were silent longer than `node_timeout` while it did.
    Dead(Vec<&'a str>),
    /// This node hears nothing: nobody is declared dead; `overdue` nodes would have been.
    CutOff { overdue: usize },
}

/// Who this node declares dead at `now`, given when it last heard each other node and what it
/// heard from NATS at all: a node unheard for `node_timeout` while this one heard NATS, its
/// silence counted from when this node's hearing last came back; nobody while this node hears
/// nothing (it is the one cut off).
pub(super) fn unheard_too_long<'a>(
    now: Instant,
    timeout: Duration,
    hearing: &Hearing,
    nodes: impl IntoIterator<Item = (&'a str, Instant)>,
) -> Unheard<'a> {
    let overdue = nodes
        .into_iter()
        .filter(|(_, last)| now.saturating_duration_since((*last).max(hearing.since)) > timeout)
        .map(|(node, _)| node);
    if hearing.lapsed(now, timeout) {
        Unheard::CutOff {
            overdue: overdue.count(),
        }
    } else {
        Unheard::Dead(overdue.collect())
    }
}

/// A new run's epoch: the wall clock's time, but above the run it replaces and above `above`,
/// the latest run of this id another node knows (the clock may have been set back).
pub(super) fn next_epoch(now_ms: u64, old: u64, above: u64) -> u64 {
    now_ms
        .max(old.saturating_add(1))
        .max(above.saturating_add(1))
}

pub(super) async fn heartbeat_loop(cluster: Arc<Cluster>, mut beats: transport::Messages) {
    while let Some(payload) = beats.next().await {
        let Ok(hb) = rmp_serde::from_slice::<Heartbeat>(&payload) else {
            continue;
        };
        // Any heartbeat, this node's own echo included, shows that it hears NATS; its own is
        // what shows it when every other node is really gone.
        let lapse = lock(&cluster.hearing).heard(Instant::now(), cluster.timeout);
        if let Some(lapse) = lapse {
            tracing::info!(
                unheard_ms = lapse.as_millis() as u64,
                "this node hears NATS again; the other nodes' liveness timers start again"
            );
        }
        if hb.node == cluster.node_id {
            continue;
        }
        if hb.leaving {
            let known = lock(&cluster.nodes).remove(&hb.node).is_some();
            if known {
                tracing::info!(node = %hb.node, "node left the cluster");
                cluster.node_lost(&hb.node, hb.epoch, true);
            }
            continue;
        }
        let known = cluster.saw_node(&hb.node, hb.epoch, true);
        if known {
            cluster.note_acks_events(&hb.node, hb.acks_events);
            cluster.note_syncs_directory(&hb.node, hb.syncs_directory);
            cluster.batching.note(&hb.node, hb.batches);
            if let Some(links) = &cluster.links {
                links.heard(&hb.node, hb.epoch, hb.link.as_deref());
            }
        }
        if !known && cluster.first_ask_in_a_while(&hb.node) {
            // A run we declared dead is alive after all (it was cut off), or a run older than
            // one we know is heard (its node restarted with its clock set back): it must come
            // back as a new run above every run of its id known here, since every call
            // involving those has ended here (or will, when the new run is heard).
            let above = cluster.latest_run(&hb.node);
            tracing::warn!(node = %hb.node, epoch = hb.epoch, above, "heard a run of a node declared dead or replaced; asking it to rejoin");
            cluster.send(
                &hb.node,
                &Envelope::Rejoin {
                    epoch: hb.epoch,
                    above,
                },
            );
        }
    }
}

pub(super) async fn liveness_loop(cluster: Arc<Cluster>) {
    let mut tick = tokio::time::interval(cluster.timeout / 3);
    loop {
        tick.tick().await;
        cluster.heartbeat(false);
        cluster.check_liveness();
        cluster.resend_unanswered();
        cluster.resend_unseen_events();
        // Keeps `confab_cluster_directory_degraded` current between `/health` probes.
        cluster.directory_healthy();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_new_run_is_above_the_last_one_and_every_run_another_node_knows_whatever_the_clock() {
        assert_eq!(
            next_epoch(5_000, 1_000, 2_000),
            5_000,
            "the clock, normally"
        );
        assert_eq!(
            next_epoch(5_000, 5_000, 0),
            5_001,
            "a rejoin in the same ms"
        );
        assert_eq!(
            next_epoch(1_000, 1_000, 9_000),
            9_001,
            "a clock set back below a run the others know"
        );
    }

    const T: Duration = Duration::from_millis(3000);

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    /// A node that has heard a heartbeat every third of the timeout since `start`, up to
    /// `until`.
    fn hearing_until(start: Instant, until: Instant) -> Hearing {
        let mut hearing = Hearing::new(start);
        keep_hearing(&mut hearing, start, until);
        hearing
    }

    /// Heartbeats every third of the timeout after `from`, up to `until`.
    fn keep_hearing(hearing: &mut Hearing, from: Instant, until: Instant) {
        let mut at = from;
        while at + T / 3 <= until {
            at += T / 3;
            assert_eq!(hearing.heard(at, T), None, "no lapse while heartbeats come");
        }
    }

    #[test]
    fn a_node_unheard_for_the_timeout_while_this_one_hears_nats_is_dead() {
        let start = Instant::now();
        let now = start + ms(10_000);
        let hearing = hearing_until(start, now);
        let nodes = [("b", now - T - ms(1)), ("c", now - T + ms(1))];
        assert_eq!(
            unheard_too_long(now, T, &hearing, nodes),
            Unheard::Dead(vec!["b"])
        );
    }

    #[test]
    fn a_node_that_hears_nothing_not_even_itself_declares_nobody_dead() {
        let start = Instant::now();
        let cut = start + ms(10_000);
        let hearing = hearing_until(start, cut);
        let now = cut + 4 * T;
        let nodes = [("b", cut - ms(100)), ("c", cut - ms(900))];
        assert_eq!(
            unheard_too_long(now, T, &hearing, nodes),
            Unheard::CutOff { overdue: 2 },
            "every other node unheard for longer than the timeout, and none declared dead"
        );
    }

    #[test]
    fn once_this_node_hears_nats_again_the_others_timers_start_again() {
        let start = Instant::now();
        let cut = start + ms(10_000);
        let mut hearing = hearing_until(start, cut);
        let back = cut + 2 * T;
        // Its own heartbeat (or any other) comes back first: the lapse ends.
        let unheard = back - hearing.last;
        assert_eq!(hearing.heard(back, T), Some(unheard));
        keep_hearing(&mut hearing, back, back + 2 * T);
        let nodes = [("b", cut - ms(100)), ("c", cut - ms(900))];
        assert_eq!(
            unheard_too_long(back + T - ms(1), T, &hearing, nodes),
            Unheard::Dead(vec![]),
            "their silence during the cut is not held against them"
        );
        // b beat again after the heal; c died meanwhile: its silence counts from the heal.
        let nodes = [("b", back + T / 3), ("c", cut - ms(900))];
        assert_eq!(
            unheard_too_long(back + T + ms(1), T, &hearing, nodes),
            Unheard::Dead(vec!["c"])
        );
    }

    #[test]
    fn an_echo_late_by_less_than_the_lapse_hides_no_death() {
        let start = Instant::now();
        let last = start + ms(10_000);
        let mut hearing = hearing_until(start, last);
        // Under load its own heartbeat, the only one left to hear (b died), comes back half
        // a heartbeat late: no lapse, so b's silence is counted whole.
        let late = last + T / 3 + T / 6;
        assert_eq!(hearing.heard(late, T), None);
        let b_died = last - ms(500);
        let now = b_died + T + ms(1);
        assert_eq!(
            unheard_too_long(now, T, &hearing, [("b", b_died)]),
            Unheard::Dead(vec!["b"])
        );
    }

    #[test]
    fn an_echo_late_beyond_the_lapse_delays_a_death_by_at_most_the_timeout_after_it() {
        let start = Instant::now();
        let last = start + ms(10_000);
        let mut hearing = hearing_until(start, last);
        let b_died = last - ms(500);
        // Its own heartbeat, the only one left to hear, is late by more than the lapse: b is
        // not declared dead while this node hears nothing...
        let b_overdue = b_died + T + ms(1);
        assert!(b_overdue - last > lapse(T));
        assert_eq!(
            unheard_too_long(b_overdue, T, &hearing, [("b", b_died)]),
            Unheard::CutOff { overdue: 1 }
        );
        // ... and one timeout after hearing came back, it is.
        let back = b_overdue + ms(100);
        assert!(hearing.heard(back, T).is_some());
        keep_hearing(&mut hearing, back, back + 2 * T);
        let b = [("b", b_died)];
        assert_eq!(
            unheard_too_long(back + T, T, &hearing, b),
            Unheard::Dead(vec![])
        );
        assert_eq!(
            unheard_too_long(back + T + ms(1), T, &hearing, b),
            Unheard::Dead(vec!["b"])
        );
    }
}
