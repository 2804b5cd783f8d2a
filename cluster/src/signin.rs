//! What "signed in" means in a cluster: the cluster knows you.
//!
//! Before a new endpoint's `welcome`, its directory record must have landed in the bucket and
//! every other live node must have read it, so that a call, a subscription, a transfer or a
//! forward made on any node the moment the client holds its welcome finds the endpoint (the
//! other nodes learn of records through their watch, which is fast but not instant).
//!
//! 1. The sign-in's node flushes its directory writes; the flush answers with the highest
//!    revision its puts have landed at, which covers the new record.
//! 2. It waits until its own watch has applied revision `upto`. The watch applies the bucket's
//!    changes in revision order, and a record makes its node known, so this node now knows
//!    every node that has an endpoint signed in before this one (a node without endpoints has
//!    nobody who could call, watch or transfer; its first sign-in does the same).
//! 3. It sends `DirectorySync { upto }` to every other node it knows (but one whose heartbeat
//!    says it is of an older build, which would not answer); each answers
//!    `DirectorySynced` once its own watch has applied revision `upto`, and with it the record.
//!    Two sign-ins that cross on two nodes each see the other: the later record's node has
//!    applied the earlier one in step 2, and asks the earlier one's node in step 3.
//! 4. The welcome goes out when every asked node has answered. A record that has not landed
//!    within `cluster.sign_in_sync_timeout_ms` refuses the sign-in (the directory cannot be
//!    written: NATS or JetStream away); a node that has not answered by then is logged and
//!    counted, and the welcome goes out (a node that cannot answer for that long is being
//!    declared dead).

use std::collections::HashSet;

use super::*;

/// The most a `set_status` waits for the directory, before its stamp and before its `ok`.
const STATUS_WAIT: Duration = Duration::from_millis(500);

/// A sign-in waiting for the other nodes' `DirectorySynced`.
pub(super) struct Waiting {
    /// The nodes that have not answered yet.
    nodes: HashSet<String>,
    done: tokio::sync::oneshot::Sender<()>,
}

/// Why a sign-in cannot be announced to the cluster.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum SignInError {
    #[error("the cluster directory cannot be written now; sign in again, or on another node")]
    DirectoryUnavailable,
}

impl Cluster {
    /// Waits until the endpoint just registered here is known to the directory bucket and to
    /// every other node that answers `DirectorySync` (see the module's comment).
    pub async fn settle_sign_in(self: &Arc<Self>) -> Result<(), SignInError> {
        let deadline = Instant::now() + self.sign_in_timeout;
        let (flushed_tx, flushed_rx) = tokio::sync::oneshot::channel();
        if self.kv_tx.send(KvOp::Flush(flushed_tx)).is_err() {
            return Err(SignInError::DirectoryUnavailable);
        }
        let upto = match tokio::time::timeout_at(deadline, flushed_rx).await {
            Ok(Ok(revision)) => revision,
            Ok(Err(_)) | Err(_) => {
                metrics::counter!(m::CLUSTER_SIGN_IN_SYNC_FAILURES, "why" => "directory")
                    .increment(1);
                return Err(SignInError::DirectoryUnavailable);
            }
        };
        // This node's own watch first: once it has applied `upto`, this node knows every node
        // with an endpoint whose record came before (records are applied in revision order,
        // and a record makes its node known), so none of them is missed below.
        let mut applied = self.applied_revision.subscribe();
        if !matches!(
            tokio::time::timeout_at(deadline, applied.wait_for(|r| *r >= upto)).await,
            Ok(Ok(_))
        ) {
            metrics::counter!(m::CLUSTER_SIGN_IN_SYNC_FAILURES, "why" => "directory").increment(1);
            return Err(SignInError::DirectoryUnavailable);
        }
        let peers: HashSet<String> = lock(&self.nodes)
            .iter()
            .filter(|(_, seen)| seen.syncs_directory != Some(false))
            .map(|(node, _)| node.clone())
            .collect();
        tracing::debug!(
            upto,
            ?peers,
            "sign-in: record landed; asking the other nodes"
        );
        if peers.is_empty() {
            return Ok(());
        }
        let token = self.next_sync.fetch_add(1, Ordering::Relaxed);
        let (done_tx, done_rx) = tokio::sync::oneshot::channel();
        lock(&self.sign_in_syncs).insert(
            token,
            Waiting {
                nodes: peers.clone(),
                done: done_tx,
            },
        );
        let ask = Envelope::DirectorySync {
            from_node: self.node_id.clone(),
            token,
            upto,
        };
        for node in &peers {
            self.send(node, &ask);
        }
        // A node declared dead between the list above and the insert was not struck off by
        // `node_lost`: strike it off now.
        let gone: Vec<String> = {
            let nodes = lock(&self.nodes);
            peers
                .iter()
                .filter(|n| !nodes.contains_key(*n))
                .cloned()
                .collect()
        };
        for node in gone {
            self.directory_synced(&node, token);
        }
        if tokio::time::timeout_at(deadline, done_rx).await.is_err() {
            let silent: Vec<String> = lock(&self.sign_in_syncs)
                .remove(&token)
                .map(|w| w.nodes.into_iter().collect())
                .unwrap_or_default();
            tracing::warn!(
                ?silent,
                "a sign-in's welcome went out before these nodes said they had read its record"
            );
            metrics::counter!(m::CLUSTER_SIGN_IN_SYNC_FAILURES, "why" => "node").increment(1);
        }
        Ok(())
    }

    /// Before a `set_status` is stamped: waits until this node has applied every change that
    /// had landed in the bucket (its last sequence, read now), so the hybrid clock has seen
    /// every status a client has already had its `ok` for, on any node, and stamps above it.
    /// Bounded by [`STATUS_WAIT`]; skipped while the directory is degraded (the change is
    /// then ordered by the clocks alone).
    pub async fn status_barrier(&self) {
        if !self.nats_connected() || !self.directory_healthy() {
            return;
        }
        let caught_up = async {
            let last = self.kv.last_revision().await.ok()?;
            let mut applied = self.applied_revision.subscribe();
            applied.wait_for(|r| *r >= last).await.ok().map(|_| ())
        };
        if tokio::time::timeout(STATUS_WAIT, caught_up).await.is_err() {
            tracing::debug!("a status change was stamped before this node caught up");
        }
    }

    /// After a `set_status` is written: waits until the write has landed and this node has
    /// applied it, so that its `ok` means every later change anywhere is ordered after it.
    /// Bounded by [`STATUS_WAIT`] (a change that has not landed by then lands later).
    pub async fn status_landed(&self) {
        if !self.nats_connected() || !self.directory_healthy() {
            return;
        }
        let landed = async {
            let (flushed_tx, flushed_rx) = tokio::sync::oneshot::channel();
            self.kv_tx.send(KvOp::Flush(flushed_tx)).ok()?;
            let upto = flushed_rx.await.ok()?;
            let mut applied = self.applied_revision.subscribe();
            applied.wait_for(|r| *r >= upto).await.ok().map(|_| ())
        };
        let _ = tokio::time::timeout(STATUS_WAIT, landed).await;
    }

    /// What `node`'s latest heartbeat says of answering `DirectorySync`.
    pub(super) fn note_syncs_directory(&self, node: &str, syncs: bool) {
        if let Some(seen) = lock(&self.nodes).get_mut(node) {
            seen.syncs_directory = Some(syncs);
        }
    }

    /// Notes that the watch (or a load) has applied the bucket's change at `revision`.
    pub(super) fn applied(&self, revision: u64) {
        self.applied_revision.send_if_modified(|applied| {
            let newer = revision > *applied;
            if newer {
                *applied = revision;
            }
            newer
        });
    }

    /// `DirectorySync`: answers `from_node` once this node has applied revision `upto`. If the
    /// watch has not got there within the sign-in's own deadline, no answer: the sign-in has
    /// stopped waiting by then.
    pub(super) fn answer_directory_sync(
        self: &Arc<Self>,
        from_node: String,
        token: u64,
        upto: u64,
    ) {
        let reply = Envelope::DirectorySynced {
            from_node: self.node_id.clone(),
            token,
        };
        tracing::debug!(%from_node, upto, applied = *self.applied_revision.borrow(), "directory sync asked");
        if *self.applied_revision.borrow() >= upto {
            self.send(&from_node, &reply);
            return;
        }
        let cluster = self.clone();
        let mut applied = self.applied_revision.subscribe();
        self.rt.spawn(async move {
            let reached = applied.wait_for(|r| *r >= upto);
            if let Ok(Ok(_)) = tokio::time::timeout(cluster.sign_in_timeout, reached).await {
                cluster.send(&from_node, &reply);
            }
        });
    }

    /// `DirectorySynced`: `node` has read the record of the sign-in waiting as `token`.
    pub(super) fn directory_synced(&self, node: &str, token: u64) {
        let mut syncs = lock(&self.sign_in_syncs);
        let Some(waiting) = syncs.get_mut(&token) else {
            return;
        };
        waiting.nodes.remove(node);
        if waiting.nodes.is_empty()
            && let Some(waiting) = syncs.remove(&token)
        {
            let _ = waiting.done.send(());
        }
    }
}
