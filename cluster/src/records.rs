//! The directory's records: this node's own (written to the KV bucket, one per endpoint), the
//! cache of the other nodes' (fed by the initial load and then by the watch, and passed on to
//! presence), and the cluster-wide `endpoints_per_user` checked against both.

use super::*;
use crate::kv::{Change, ChangeOp, Changes};

impl Cluster {
    /// Reads every record of the bucket into the cache. During a rejoin the watch runs
    /// meanwhile: a record it deletes after the load read it must not come back from the load.
    /// Returns the last sequence it read up to (see [`Cluster::load_keys`]).
    pub(super) async fn load(&self) -> Result<u64, ClusterError> {
        *lock(&self.loading) = Some(HashMap::new());
        let result = self.load_keys(LOAD_STALL).await;
        *lock(&self.loading) = None;
        result
    }

    /// Reads the last record of every key through a last-per-subject consumer (values
    /// included, one pass). It stops at the first record at or past the stream's last sequence
    /// as read before: every older record has been delivered by then (they come in sequence
    /// order), and anything newer reaches the watch, which was already running. async-nats's
    /// `keys()` ends on the consumer's pending count instead, which never reaches 0 when a
    /// record counted at the start is replaced meanwhile (history 1), so it could hang while
    /// other nodes write.
    /// Returns the last sequence it read up to: every record at or below it has been applied.
    pub(super) async fn load_keys(&self, stall: Duration) -> Result<u64, ClusterError> {
        let kv_err = |e: &dyn std::fmt::Display| ClusterError::Kv(e.to_string());
        let stalled = || ClusterError::Kv(format!("no answer within {stall:?}"));
        let last = tokio::time::timeout(stall, self.kv.last_revision())
            .await
            .map_err(|_| stalled())?
            .map_err(|e| kv_err(&e))?;
        if last == 0 {
            return Ok(0);
        }
        let mut records = tokio::time::timeout(stall, self.kv.read_all())
            .await
            .map_err(|_| stalled())?
            .map_err(|e| kv_err(&e))?;
        loop {
            let next = tokio::time::timeout(stall, records.next())
                .await
                .map_err(|_| ClusterError::Kv(format!("no record within {stall:?}")))?;
            let e = match next {
                Some(Ok(e)) => e,
                Some(Err(e)) => return Err(kv_err(&e)),
                None => return Ok(last),
            };
            let deleted_since = lock(&self.loading)
                .as_ref()
                .and_then(|d| d.get(&e.key).copied())
                .is_some_and(|deleted| deleted > e.revision);
            if !deleted_since {
                self.apply(&e.key, e.op, &e.value, e.revision);
            }
            self.applied(e.revision);
            if e.revision >= last || e.delta == 0 {
                return Ok(last);
            }
        }
    }

    /// Writes (creates or replaces) this node's record of `endpoint`, stamped with this run's
    /// epoch.
    pub(crate) fn put_own(&self, endpoint: Arc<str>, mut record: OwnRecord) {
        // The entry stays locked from the epoch's stamp until the put is queued, as in the
        // rejoin's re-stamp: either this sees the rejoin's new epoch, or the rejoin waits and
        // queues its re-stamped put after this one. And the record is in `own` before its put
        // is queued, so the watch never shows this node a record of its own it does not know.
        let entry = self.own.entry(endpoint);
        // Checked under the entry's lock: the leave sets the flag before it collects `own`,
        // so a put either sees it or is collected and deleted after its put.
        if self.leaving.load(Ordering::SeqCst) {
            return;
        }
        let added = matches!(entry, dashmap::Entry::Vacant(_));
        record.epoch = self.epoch();
        let Some(put) = record_put(entry.key(), &record.to_record(&self.node_id)) else {
            return;
        };
        let stored = entry.insert(record);
        let _ = self.kv_tx.send(put);
        drop(stored);
        if added {
            self.directory_gauge();
        }
    }

    /// Updates this node's record of `endpoint` in place and writes it.
    pub(crate) fn update_own(&self, endpoint: &str, f: impl FnOnce(&mut OwnSet)) {
        let Some((id, mut r)) = self
            .own
            .get(endpoint)
            .map(|r| (r.key().clone(), r.value().clone()))
        else {
            return;
        };
        f(r.set.get_or_insert_default());
        self.put_own(id, r);
    }

    pub fn delete_own(&self, user: &str, endpoint: &str) {
        if self.own.remove(endpoint).is_some() {
            self.directory_gauge();
        }
        let _ = self
            .kv_tx
            .send(KvOp::Delete(wire::record_key(user, endpoint), None));
    }

    /// Other nodes' endpoints of `user`.
    pub fn remote_endpoints_of(&self, user: &str) -> Vec<RemoteEndpoint> {
        self.remote.get(user).map(|l| l.clone()).unwrap_or_default()
    }

    pub fn remote_count(&self, user: &str) -> usize {
        self.remote.get(user).map_or(0, |l| l.len())
    }

    /// Applies one KV change (the entry at `revision`) to the cache and to presence.
    pub(super) fn apply(&self, key: &str, op: ChangeOp, value: &[u8], revision: u64) {
        let Some((user, endpoint)) = wire::parse_key(key) else {
            return;
        };
        match op {
            ChangeOp::Put => {
                let record: Record = match rmp_serde::from_slice(value) {
                    Ok(r) => r,
                    Err(e) => {
                        tracing::warn!(%key, error = %e, "ignoring an unreadable directory record");
                        return;
                    }
                };
                if record.node == self.node_id {
                    // Endpoints of an earlier run are never this run's (ids carry the run).
                    if record.epoch < self.epoch() && !self.own.contains_key(endpoint.as_str()) {
                        // Left over from an earlier run of this node.
                        // Unconditional: only this node writes its keys, and it has no such
                        // endpoint any more.
                        tracing::info!(%key, "deleting a stale record of this node");
                        let _ = self.kv_tx.send(KvOp::Delete(key.to_owned(), None));
                    }
                    return;
                }
                if !self.saw_node(&record.node, record.epoch, false) {
                    // Left over from a dead or earlier run of that node.
                    if self.is_purger() {
                        let _ = self
                            .kv_tx
                            .send(KvOp::Delete(key.to_owned(), Some(revision)));
                    }
                    return;
                }
                let user_key = user.clone();
                if let Some(at) = record.status_set_unix_ms {
                    self.presence.observe_status(at);
                }
                let upsert = PresenceMsg::Upsert {
                    user: user.clone(),
                    endpoint: endpoint.clone(),
                    device: record.device.clone(),
                    publication: record.publication.map(|p| to_publication(&p)),
                    status: record.status_set_unix_ms.map(|at| (record.status, at)),
                };
                let added = {
                    let mut list = self.remote.entry(user).or_default();
                    match list.iter_mut().find(|e| e.id == endpoint) {
                        // A rejoin's reload can read a key after the watch applied a newer
                        // revision of it.
                        Some(e) if e.revision > revision => return,
                        Some(e) => {
                            e.record = record;
                            e.revision = revision;
                            false
                        }
                        None => {
                            // A first `push` would take room for four records: one, then
                            // doubling when full (amortised for a user with many devices).
                            let len = list.len();
                            if len == list.capacity() {
                                list.reserve_exact(len.max(1));
                            }
                            list.push(RemoteEndpoint {
                                id: endpoint,
                                record,
                                revision,
                            });
                            true
                        }
                    }
                };
                tracing::debug!(%key, revision, "directory: remote record applied");
                self.presence.send(upsert);
                if added {
                    self.remote_len.fetch_add(1, Ordering::Relaxed);
                    self.directory_gauge();
                    self.enforce_limit(&user_key);
                }
            }
            ChangeOp::Delete => {
                if let Some(deleted) = lock(&self.loading).as_mut() {
                    deleted.insert(key.to_owned(), revision);
                }
                let newer_cached = self.remote.get(&user).is_some_and(|list| {
                    list.iter()
                        .any(|e| e.id == endpoint && e.revision > revision)
                });
                if !newer_cached {
                    self.forget(&user, &endpoint);
                }
            }
        }
    }

    /// Holds `endpoints_per_user` across the cluster. Each node checks a sign-in against what
    /// it has seen, so two sign-ins of one user on two nodes within the KV's propagation time
    /// can both pass. This runs after every sign-in here and whenever another node's endpoint
    /// of `user` appears in the cache (so one of the two racing nodes sees both): every node
    /// ranks all the user's endpoints the same way (sign-in time by the nodes' clocks, then
    /// id) and signs out its own that rank beyond the limit. The ranking depends only on the
    /// records, so the nodes agree on which to keep without talking to each other.
    ///
    /// Only an endpoint that signed in less than `node_timeout` ago is signed out: a race is
    /// that recent. A record that shows up later than that (a node rejoining after a
    /// partition, a record left behind by a failed delete) must not sign out a session that
    /// has been running for a while; it only blocks new sign-ins until it is cleaned up.
    pub(crate) fn enforce_limit(&self, user: &str) {
        // A node that is leaving has deleted its records: it signs nobody out.
        if self.leaving.load(Ordering::SeqCst) {
            return;
        }
        // Counted before anything is copied: this runs for every sign-in.
        let own_count = self.local.count_of(user);
        if own_count == 0 || own_count + self.remote_count(user) <= self.endpoints_per_user {
            return;
        }
        // Only endpoints with a record here are ranked (`own`, below).
        let own = self.local.ids_of(user);
        let remote = self.remote_endpoints_of(user);
        let mut ranked: Vec<(u64, String, bool)> = remote
            .into_iter()
            .map(|r| (r.record.connected_unix_ms, r.id, false))
            .collect();
        ranked.extend(own.into_iter().filter_map(|id| {
            let at = self.own.get(id.as_str())?.connected_unix_ms;
            Some((at, id, true))
        }));
        ranked.sort();
        let race_window = u64::try_from(self.timeout.as_millis()).unwrap_or(u64::MAX);
        let fresh_since = wire::unix_ms().saturating_sub(race_window);
        for (at, id, mine) in ranked.into_iter().skip(self.endpoints_per_user) {
            if !mine {
                continue;
            }
            if at < fresh_since {
                tracing::warn!(%user, endpoint = %id, "over endpoints_per_user across the cluster, but this endpoint signed in before the race window: kept");
                continue;
            }
            if let Some(addr) = self.endpoints.get(id.as_str()) {
                tracing::info!(%user, endpoint = %id, "over endpoints_per_user across the cluster: signing out this node's newest");
                addr.do_send(EndpointMsg::OverLimit);
            }
        }
    }

    /// Drops a remote endpoint from the cache and from presence.
    pub(super) fn forget(&self, user: &str, endpoint: &str) {
        let mut removed = false;
        self.remote.remove_if_mut(user, |_, list| {
            let before = list.len();
            list.retain(|e| e.id != endpoint);
            removed = list.len() != before;
            list.is_empty()
        });
        if removed {
            self.remote_len.fetch_sub(1, Ordering::Relaxed);
            self.directory_gauge();
            self.presence.send(PresenceMsg::Left {
                user: user.to_owned(),
                endpoint: endpoint.to_owned(),
            });
        }
    }
}

/// The KV put of this node's record of `endpoint`; `None` (logged) if it cannot be encoded.
pub(super) fn record_put(endpoint: &str, record: &Record) -> Option<KvOp> {
    match rmp_serde::to_vec_named(record) {
        Ok(bytes) => Some(KvOp::Put(
            wire::record_key(&record.user, endpoint),
            Bytes::from(bytes),
        )),
        Err(e) => {
            tracing::error!(error = %e, "cannot encode a directory record");
            None
        }
    }
}

/// This node's record of one of its endpoints as `own` keeps it: the wire's [`Record`] less
/// the node (this node's id, the same in every one), with what most endpoints never set
/// boxed. Every idle endpoint of a cluster node pays for its slot in `own`'s table (with the
/// table's spare room, about 1.7 slots): 72 bytes here where the whole record took 136.
#[derive(Clone)]
pub(crate) struct OwnRecord {
    /// Shared with the endpoint, the local directory and presence.
    pub user: Arc<str>,
    pub device: String,
    pub epoch: u64,
    pub connected_unix_ms: u64,
    /// The device state and the manual status, once the endpoint published or set either.
    pub set: Option<Box<OwnSet>>,
}

/// What an endpoint of this node published or set (see [`OwnRecord`]).
#[derive(Clone, Default)]
pub(crate) struct OwnSet {
    pub publication: Option<wire::PublicationRecord>,
    pub status: Option<confab_protocol::Status>,
    pub status_set_unix_ms: Option<u64>,
}

impl OwnRecord {
    /// The record as the bucket holds it, of this node `node`.
    pub fn to_record(&self, node: &str) -> Record {
        let set = self.set.as_deref();
        Record {
            node: node.to_owned(),
            epoch: self.epoch,
            user: self.user.to_string(),
            device: self.device.clone(),
            publication: set.and_then(|s| s.publication),
            status: set.and_then(|s| s.status),
            status_set_unix_ms: set.and_then(|s| s.status_set_unix_ms),
            connected_unix_ms: self.connected_unix_ms,
        }
    }
}

/// A publication stamped with another node's wall clock, on this node's monotonic clock.
pub(super) fn to_publication(p: &wire::PublicationRecord) -> Publication {
    let age = Duration::from_millis(wire::unix_ms().saturating_sub(p.stamp_unix_ms));
    let now = Instant::now();
    Publication {
        activity: p.activity,
        stamp: now.checked_sub(age).unwrap_or(now),
        idle_ms: p.idle_ms,
    }
}

/// Applies the directory's changes as the watch delivers them. A watch that fails (its
/// consumer lived on a NATS server that went away: "missed idle heartbeat"), ends, or stalls
/// (see [`watch_guard_loop`]) is made again, and the records are read afresh so that nothing
/// changed meanwhile is missed; until then the directory counts as degraded.
pub(super) async fn watch_loop(cluster: Arc<Cluster>, mut watch: Changes) {
    // Tests only (`Cluster::hold_watch`): other nodes' changes held back, in order.
    let mut held_back: VecDeque<Change> = VecDeque::new();
    let mut held = cluster.watch_held.subscribe();
    loop {
        if !*held.borrow() {
            while let Some(e) = held_back.pop_front() {
                cluster.apply_entry(&e);
            }
        }
        let next = tokio::select! {
            next = watch.next() => next,
            _ = held.changed() => continue,
            () = cluster.watch_stalled.notified() => {
                // A permit left from before the last renewal is stale.
                if *cluster.applied_revision.borrow()
                    < cluster.stalled_below.load(Ordering::Relaxed)
                {
                    tracing::warn!("the directory watch has stalled behind the bucket; watching again");
                    cluster.renew_watch(&mut watch).await;
                }
                continue;
            }
        };
        match next {
            Some(Ok(e)) => {
                if e.revision <= cluster.watch_read_upto.load(Ordering::Relaxed) {
                    // The read that came with this watch applied this key's last record.
                    continue;
                }
                if *held.borrow() && !cluster.is_own_key(&e.key) {
                    held_back.push_back(e);
                    continue;
                }
                cluster.apply_entry(&e);
                continue;
            }
            Some(Err(e)) => tracing::warn!(error = %e, "directory watch error; watching again"),
            None => tracing::warn!("the directory watch ended; watching again"),
        }
        cluster.renew_watch(&mut watch).await;
    }
}

/// How long reading the records again after a watch failed waits for the next record.
const RENEW_STALL: Duration = Duration::from_secs(1);

/// Notices a watch that has stopped delivering while the bucket moves on (its consumer's
/// server died: the client library only notices after ten seconds without a heartbeat). Once
/// per `node_timeout / 3`, it reads the bucket's last revision; if the watch has not applied
/// the one read a round earlier, it is stalled.
pub(super) async fn watch_guard_loop(cluster: Arc<Cluster>) {
    let mut tick = tokio::time::interval(cluster.timeout / 3);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_seen: Option<u64> = None;
    loop {
        tick.tick().await;
        if cluster.watch_failing.load(Ordering::Relaxed) || *cluster.watch_held.borrow() {
            last_seen = None;
            continue;
        }
        if let Some(last) = last_seen
            && *cluster.applied_revision.borrow() < last
        {
            cluster.stalled_below.store(last, Ordering::Relaxed);
            cluster.watch_stalled.notify_one();
            last_seen = None;
            continue;
        }
        last_seen = tokio::time::timeout(cluster.timeout / 3, cluster.kv.last_revision())
            .await
            .ok()
            .and_then(Result::ok);
        // The watch gets a whole round from the read on.
        tick.reset();
    }
}

impl Cluster {
    /// Applies one change the watch delivered and notes its revision applied.
    fn apply_entry(&self, e: &Change) {
        self.apply(&e.key, e.op, &e.value, e.revision);
        self.applied(e.revision);
    }

    /// Whether `key` is the record of an endpoint of this node (ids start with the node's).
    fn is_own_key(&self, key: &str) -> bool {
        wire::parse_key(key).is_some_and(|(_, endpoint)| {
            endpoint
                .strip_prefix(self.node_id.as_str())
                .is_some_and(|rest| rest.starts_with('.'))
        })
    }

    /// Replaces `watch` with a new one and reads every record again, retried until both
    /// work. The new watch's changes wait (in order) while the records are read; those the
    /// read covered are skipped (`watch_read_upto`), so a record the read saw deleted cannot
    /// come back from an older change the watch delivers late.
    async fn renew_watch(&self, watch: &mut Changes) {
        self.watch_failing.store(true, Ordering::Relaxed);
        let mut failures = 0u32;
        loop {
            // Each step bounded by a second: JetStream may place the new consumer on the
            // server that died until it counts that server out, and then never answers; the
            // next attempt may be placed elsewhere.
            let renewed = match tokio::time::timeout(RENEW_STALL, self.kv.watch()).await {
                Ok(Ok(w)) => self.load_keys(RENEW_STALL).await.map(|last| (w, last)),
                Ok(Err(e)) => Err(ClusterError::Kv(e.to_string())),
                Err(_) => Err(ClusterError::Kv(format!("no watch within {RENEW_STALL:?}"))),
            };
            match renewed {
                Ok((w, last)) => {
                    *watch = w;
                    self.watch_read_upto.store(last, Ordering::Relaxed);
                    tracing::info!(failures, "directory watch made again");
                    break;
                }
                Err(e) => {
                    failures = failures.saturating_add(1);
                    if failures == 1 || failures.is_multiple_of(10) {
                        tracing::warn!(error = %e, failures, "cannot watch the directory yet");
                    } else {
                        tracing::debug!(error = %e, failures, "cannot watch the directory yet");
                    }
                    let pause = 50u64.saturating_mul(1 << failures.min(4)).min(500);
                    tokio::time::sleep(Duration::from_millis(pause)).await;
                }
            }
        }
        self.watch_failing.store(false, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every idle endpoint of a cluster node pays for its slot in `own` (see [`OwnRecord`]).
    #[test]
    fn an_own_record_is_small_and_gives_back_the_record() {
        assert!(std::mem::size_of::<OwnRecord>() <= 72);
        let own = OwnRecord {
            user: Arc::from("sip:a@x"),
            device: "d".into(),
            epoch: 7,
            connected_unix_ms: 3,
            set: Some(Box::new(OwnSet {
                publication: None,
                status: Some(confab_protocol::Status::Busy),
                status_set_unix_ms: Some(5),
            })),
        };
        let record = Record {
            node: "n1".into(),
            epoch: 7,
            user: "sip:a@x".into(),
            device: "d".into(),
            publication: None,
            status: Some(confab_protocol::Status::Busy),
            status_set_unix_ms: Some(5),
            connected_unix_ms: 3,
        };
        assert_eq!(
            rmp_serde::to_vec_named(&own.to_record("n1")).ok(),
            rmp_serde::to_vec_named(&record).ok()
        );
    }
}
