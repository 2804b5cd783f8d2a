//! The cluster directory: this node's endpoints in a [`WeakLocalDirectory`] (with weak
//! addresses of their actors: the cluster's `endpoints` keeps the strong ones) and in the KV
//! bucket (for the other nodes), and the other nodes' endpoints from the cache the KV watch
//! keeps.

use confab_protocol::{Activity, Status};
use std::sync::Arc;

use super::Cluster;
use super::records::OwnRecord;
use super::wire::{PublicationRecord, unix_ms};
use confab_actors::directory::{
    Directory, DirectoryError, EndpointEntry, Settled, WeakLocalDirectory,
};
use confab_actors::route::EndpointRef;

pub struct NatsDirectory {
    cluster: Arc<Cluster>,
}

impl NatsDirectory {
    pub fn new(cluster: Arc<Cluster>) -> Self {
        NatsDirectory { cluster }
    }

    /// This node's own endpoints (kept by the cluster, which ranks them for the limit).
    fn local(&self) -> &WeakLocalDirectory {
        &self.cluster.local
    }
}

impl Directory for NatsDirectory {
    fn register(&self, entry: EndpointEntry, max_per_user: usize) -> Result<(), DirectoryError> {
        let remote = self.cluster.remote_count(&entry.user);
        let EndpointRef::Local(addr) = &entry.addr else {
            return Err(DirectoryError::TooManyEndpoints);
        };
        let addr = addr.clone();
        let (id, user, device) = (entry.id.clone(), entry.user.clone(), entry.device.clone());
        self.local()
            .register(entry, max_per_user.saturating_sub(remote))?;
        self.cluster.endpoints.insert(id.clone(), addr);
        self.cluster.put_own(
            id,
            OwnRecord {
                user: user.clone(),
                device,
                // Stamped by `put_own`.
                epoch: 0,
                connected_unix_ms: unix_ms(),
                set: None,
            },
        );
        // Another node's endpoint of this user may have arrived since `remote_count` above.
        self.cluster.enforce_limit(&user);
        Ok(())
    }

    fn settle(&self) -> Settled {
        let cluster = self.cluster.clone();
        Box::pin(async move {
            cluster
                .settle_sign_in()
                .await
                .map_err(|_| DirectoryError::Unavailable)
        })
    }

    fn status_barrier(&self) -> Settled {
        let cluster = self.cluster.clone();
        Box::pin(async move {
            cluster.status_barrier().await;
            Ok(())
        })
    }

    fn status_landed(&self) -> Settled {
        let cluster = self.cluster.clone();
        Box::pin(async move {
            cluster.status_landed().await;
            Ok(())
        })
    }

    fn unregister(&self, user: &str, endpoint: &str) {
        self.local().unregister(user, endpoint);
        self.cluster.endpoints.remove(endpoint);
        self.cluster.delete_own(user, endpoint);
    }

    fn endpoints_of(&self, user: &str) -> Vec<EndpointEntry> {
        let mut out: Vec<(u64, EndpointEntry)> = self
            .local()
            .endpoints_of(user)
            .into_iter()
            .map(|e| (0, e))
            .collect();
        for r in self.cluster.remote_endpoints_of(user) {
            out.push((
                r.record.connected_unix_ms,
                EndpointEntry {
                    id: Arc::from(r.id.as_str()),
                    user: Arc::from(r.record.user.as_str()),
                    device: r.record.device.clone(),
                    addr: EndpointRef::Remote {
                        node: r.record.node.clone(),
                        id: r.id,
                    },
                },
            ));
        }
        out.into_iter().map(|(_, e)| e).collect()
    }

    fn all(&self) -> Vec<EndpointEntry> {
        self.local().all()
    }

    fn len(&self) -> usize {
        self.local().len()
    }

    fn published(&self, endpoint: &str, activity: Activity, idle_ms: u64) {
        let stamp_unix_ms = unix_ms();
        self.cluster.update_own(endpoint, |r| {
            r.publication = Some(PublicationRecord {
                activity,
                idle_ms,
                stamp_unix_ms,
            });
        });
    }

    fn status_set(&self, endpoint: &str, status: Option<Status>, at_unix_ms: u64) {
        self.cluster.update_own(endpoint, |r| {
            r.status = status;
            r.status_set_unix_ms = Some(at_unix_ms);
        });
    }
}
