//! Who is signed in where. The directory is one of the two seams (with routing through the
//! endpoint reference it returns) that know whether a cluster exists: alone, it is this
//! in-process map; a cluster implementation can back the same trait with a replicated store.

use dashmap::DashMap;
use thiserror::Error;

use confab_protocol::{Activity, Status};

use crate::route::EndpointRef;

/// One signed-in endpoint as other actors see it.
#[derive(Clone, Debug)]
pub struct EndpointEntry {
    pub id: String,
    pub user: String,
    pub device: String,
    pub addr: EndpointRef,
}

#[derive(Debug, Clone, Error, PartialEq, Eq)]
pub enum DirectoryError {
    #[error("too many endpoints signed in for this user")]
    TooManyEndpoints,
    /// A cluster directory could not make the endpoint known to the other nodes in time.
    #[error("the cluster directory cannot be written now; sign in again, or on another node")]
    Unavailable,
}

/// What [`Directory::settle`] returns: resolves once a new endpoint is known everywhere.
pub type Settled = std::pin::Pin<Box<dyn Future<Output = Result<(), DirectoryError>> + Send>>;

pub trait Directory: Send + Sync + 'static {
    /// Adds an endpoint, refusing it when its user already has `max_per_user`.
    fn register(&self, entry: EndpointEntry, max_per_user: usize) -> Result<(), DirectoryError>;
    fn unregister(&self, user: &str, endpoint: &str);
    /// Resolves once the endpoint just registered can be reached from wherever this directory
    /// is read (every node of a cluster): its `welcome` waits for this. Alone, at once.
    fn settle(&self) -> Settled {
        Box::pin(std::future::ready(Ok(())))
    }
    /// Resolves once this node has applied every directory change that had landed when it was
    /// called, so that a status change stamped next is stamped above every change a client
    /// was already told of (see `presence/stamp.rs`). Alone, at once.
    fn status_barrier(&self) -> Settled {
        Box::pin(std::future::ready(Ok(())))
    }
    /// Resolves once the writes made so far have landed and this node has applied them: the
    /// `ok` of a `set_status` waits for it. Alone, at once.
    fn status_landed(&self) -> Settled {
        Box::pin(std::future::ready(Ok(())))
    }
    /// The user's endpoints, in sign-in order.
    fn endpoints_of(&self, user: &str) -> Vec<EndpointEntry>;
    /// Every endpoint on this node (for shutdown).
    fn all(&self) -> Vec<EndpointEntry>;
    fn len(&self) -> usize;
    /// The endpoint published its device state (a cluster directory records it for the
    /// other nodes; the local presence shard is told directly).
    fn published(&self, _endpoint: &str, _activity: Activity, _idle_ms: u64) {}
    /// The endpoint set the manual status, at `at_unix_ms`.
    fn status_set(&self, _endpoint: &str, _status: Option<Status>, _at_unix_ms: u64) {}
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The single-node directory.
#[derive(Default)]
pub struct LocalDirectory {
    by_user: DashMap<String, Vec<EndpointEntry>>,
}

impl Directory for LocalDirectory {
    fn register(&self, entry: EndpointEntry, max_per_user: usize) -> Result<(), DirectoryError> {
        let mut list = self.by_user.entry(entry.user.clone()).or_default();
        if list.len() >= max_per_user {
            return Err(DirectoryError::TooManyEndpoints);
        }
        // Most users have one device: do not pay for four.
        list.reserve_exact(1);
        list.push(entry);
        Ok(())
    }

    fn unregister(&self, user: &str, endpoint: &str) {
        self.by_user.remove_if_mut(user, |_, list| {
            list.retain(|e| e.id != endpoint);
            list.is_empty()
        });
    }

    fn endpoints_of(&self, user: &str) -> Vec<EndpointEntry> {
        self.by_user
            .get(user)
            .map(|l| l.clone())
            .unwrap_or_default()
    }

    fn all(&self) -> Vec<EndpointEntry> {
        self.by_user
            .iter()
            .flat_map(|l| l.value().clone())
            .collect()
    }

    fn len(&self) -> usize {
        self.by_user.iter().map(|l| l.len()).sum()
    }
}
