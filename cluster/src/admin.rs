//! The admin API's questions across the cluster: an `AdminQuery` to every node this one knows,
//! each answering with `AdminAnswer` through the engine's answerer; the asker waits for all of
//! them, or names the silent ones at its timeout. Queries and answers are the engine's
//! `admin::Query` and `admin::Answer`, MessagePack inside the envelope.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use confab_actors::admin::{Answer, Query};
use confab_actors::link::{AdminAnswerer, NodeAnswers};
use tokio::sync::mpsc;

use crate::wire::Envelope;
use crate::{Cluster, lock};

/// The admin side of a [`Cluster`]: questions waiting for answers, and how to answer.
#[derive(Default)]
pub(crate) struct AdminState {
    next: AtomicU64,
    waiting: Mutex<HashMap<u64, mpsc::UnboundedSender<(String, Answer)>>>,
    answerer: Mutex<Option<AdminAnswerer>>,
}

impl Cluster {
    /// Asks every other node this one knows of `query`, for at most `timeout`.
    pub(crate) async fn ask_other_nodes(&self, query: &Query, timeout: Duration) -> NodeAnswers {
        let mut silent: HashSet<String> = lock(&self.nodes).keys().cloned().collect();
        silent.remove(&self.node_id);
        if silent.is_empty() {
            return NodeAnswers::default();
        }
        let Ok(query) = rmp_serde::to_vec_named(query) else {
            tracing::error!("cannot encode an admin query");
            return NodeAnswers {
                answers: Vec::new(),
                missing: silent.into_iter().collect(),
            };
        };
        let token = self.admin.next.fetch_add(1, Ordering::Relaxed);
        let (tx, mut rx) = mpsc::unbounded_channel();
        lock(&self.admin.waiting).insert(token, tx);
        let ask = Envelope::AdminQuery {
            from_node: self.node_id.clone(),
            token,
            query,
        };
        for node in &silent {
            self.send(node, &ask);
        }
        let mut answers = Vec::new();
        let _ = tokio::time::timeout(timeout, async {
            while let Some((node, answer)) = rx.recv().await {
                if silent.remove(&node) {
                    answers.push(answer);
                }
                if silent.is_empty() {
                    return;
                }
            }
        })
        .await;
        lock(&self.admin.waiting).remove(&token);
        NodeAnswers {
            answers,
            missing: silent.into_iter().collect(),
        }
    }

    pub(crate) fn set_admin_answerer(&self, answerer: AdminAnswerer) {
        *lock(&self.admin.answerer) = Some(answerer);
    }

    /// `AdminQuery` from `from_node`: answered through the engine, off the inbox.
    pub(crate) fn answer_admin_query(
        self: &Arc<Self>,
        from_node: String,
        token: u64,
        query: &[u8],
    ) {
        let query: Query = match rmp_serde::from_slice(query) {
            Ok(q) => q,
            Err(e) => {
                tracing::warn!(node = %from_node, error = %e, "dropping an unreadable admin query");
                return;
            }
        };
        let Some(answerer) = lock(&self.admin.answerer).clone() else {
            return;
        };
        let cluster = self.clone();
        self.rt.spawn(async move {
            let Some(answer) = answerer(query).await else {
                return;
            };
            match rmp_serde::to_vec_named(&answer) {
                Ok(answer) => cluster.send(
                    &from_node,
                    &Envelope::AdminAnswer {
                        from_node: cluster.node_id.clone(),
                        token,
                        answer,
                    },
                ),
                Err(e) => tracing::error!(error = %e, "cannot encode an admin answer"),
            }
        });
    }

    /// `AdminAnswer` `token` from `from_node`.
    pub(crate) fn admin_answered(&self, from_node: String, token: u64, answer: &[u8]) {
        let Some(tx) = lock(&self.admin.waiting).get(&token).cloned() else {
            return;
        };
        match rmp_serde::from_slice::<Answer>(answer) {
            Ok(a) => {
                let _ = tx.send((from_node, a));
            }
            Err(e) => {
                tracing::warn!(node = %from_node, error = %e, "dropping an unreadable admin answer")
            }
        }
    }
}
