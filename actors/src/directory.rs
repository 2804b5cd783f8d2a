//! Who is signed in where. The directory is one of the two seams (with routing through the
//! endpoint reference it returns) that know whether a cluster exists: alone, it is this
//! in-process map; a cluster implementation can back the same trait with a replicated store.

use actix::{Addr, WeakAddr};
use dashmap::DashMap;
use std::sync::Arc;
use thiserror::Error;

use confab_protocol::{Activity, Status};

use crate::endpoint::Endpoint;
use crate::route::EndpointRef;

/// One signed-in endpoint as other actors see it.
#[derive(Clone, Debug)]
pub struct EndpointEntry {
    /// Shared, as `user` is.
    pub id: Arc<str>,
    /// Shared: the endpoint, the directory and presence each keep the user (and a cluster
    /// node's record of the endpoint too), and one copy of the URI serves them all.
    pub user: Arc<str>,
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

/// The single-node directory (and a cluster node's own endpoints): this node's endpoints only,
/// each an actor here. `A` is how it keeps their addresses (see [`KeptAddr`]): strong alone,
/// weak on a cluster node ([`WeakLocalDirectory`]).
pub struct LocalDirectory<A: KeptAddr = Addr<Endpoint>> {
    by_user: DashMap<Arc<str>, Vec<Kept<A>>>,
}

/// A directory of this node's endpoints for a node that keeps a strong address of each
/// elsewhere (a cluster node's endpoints by id): see [`KeptAddr`].
pub type WeakLocalDirectory = LocalDirectory<WeakAddr<Endpoint>>;

impl<A: KeptAddr> Default for LocalDirectory<A> {
    fn default() -> Self {
        LocalDirectory {
            by_user: DashMap::default(),
        }
    }
}

impl<A: KeptAddr> LocalDirectory<A> {
    /// How many endpoints `user` has here.
    pub fn count_of(&self, user: &str) -> usize {
        self.by_user.get(user).map_or(0, |l| l.len())
    }

    /// The ids of `user`'s endpoints here, in sign-in order.
    pub fn ids_of(&self, user: &str) -> Vec<String> {
        self.by_user
            .get(user)
            .map(|l| l.iter().map(|e| e.id.to_string()).collect())
            .unwrap_or_default()
    }
}

/// What the directory keeps of an endpoint: not an [`EndpointEntry`], which took twice the
/// memory per idle endpoint. The user is the map's key (and the id shared with the endpoint).
struct Kept<A> {
    id: Arc<str>,
    device: String,
    addr: A,
}

/// An endpoint's address as the directory keeps it.
///
/// A strong `Addr` allocates 72 bytes of its own (every strong sender of an actix mailbox has
/// its own parking state), so where another strong one is kept (a cluster node's endpoints by
/// id) the directory keeps a weak one: a lookup makes a strong one anyway, as cloning the kept
/// one did, so no lookup costs more. Alone, the directory's is the endpoint's only lasting
/// strong address and stays strong: actix wakes an actor whenever its last strong sender is
/// dropped, and without one every lookup's address and every call leg's, once dropped, woke the
/// endpoint for nothing (about 4% more instructions per forked call under callgrind).
pub trait KeptAddr: Send + Sync + 'static {
    fn keep(addr: Addr<Endpoint>) -> Self;
    /// A strong address, unless the actor has gone.
    fn strong(&self) -> Option<Addr<Endpoint>>;
}

impl KeptAddr for Addr<Endpoint> {
    fn keep(addr: Addr<Endpoint>) -> Self {
        addr
    }
    fn strong(&self) -> Option<Addr<Endpoint>> {
        Some(self.clone())
    }
}

impl KeptAddr for WeakAddr<Endpoint> {
    fn keep(addr: Addr<Endpoint>) -> Self {
        addr.downgrade()
    }
    fn strong(&self) -> Option<Addr<Endpoint>> {
        self.upgrade()
    }
}

impl<A: KeptAddr> Kept<A> {
    /// The entry others see; `None` once the actor has gone (it unregisters as it stops, so
    /// only a lookup racing its last moments sees that).
    fn entry(&self, user: &Arc<str>) -> Option<EndpointEntry> {
        Some(EndpointEntry {
            id: self.id.clone(),
            user: user.clone(),
            device: self.device.clone(),
            addr: EndpointRef::Local(self.addr.strong()?),
        })
    }
}

impl<A: KeptAddr> Directory for LocalDirectory<A> {
    /// Refuses (as over the limit) an endpoint that is not an actor of this node: this
    /// directory holds none other.
    fn register(&self, entry: EndpointEntry, max_per_user: usize) -> Result<(), DirectoryError> {
        let EndpointEntry {
            id,
            user,
            device,
            addr,
        } = entry;
        let EndpointRef::Local(addr) = addr else {
            return Err(DirectoryError::TooManyEndpoints);
        };
        let mut list = self.by_user.entry(user).or_default();
        if list.len() >= max_per_user {
            return Err(DirectoryError::TooManyEndpoints);
        }
        // Most users have one device: do not pay for four.
        list.reserve_exact(1);
        list.push(Kept {
            id,
            device,
            addr: A::keep(addr),
        });
        Ok(())
    }

    fn unregister(&self, user: &str, endpoint: &str) {
        self.by_user.remove_if_mut(user, |_, list| {
            list.retain(|e| &*e.id != endpoint);
            list.is_empty()
        });
    }

    fn endpoints_of(&self, user: &str) -> Vec<EndpointEntry> {
        self.by_user
            .get(user)
            .map(|l| l.iter().filter_map(|e| e.entry(l.key())).collect())
            .unwrap_or_default()
    }

    fn all(&self) -> Vec<EndpointEntry> {
        self.by_user
            .iter()
            .flat_map(|l| {
                l.value()
                    .iter()
                    .filter_map(|e| e.entry(l.key()))
                    .collect::<Vec<_>>()
            })
            .collect()
    }

    fn len(&self) -> usize {
        self.by_user.iter().map(|l| l.len()).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every idle endpoint pays for this record (a `Vec` of one: the allocator's 64-byte
    /// class alone, 48 on a cluster node); the whole `EndpointEntry` it replaced took 120.
    #[test]
    fn a_kept_endpoint_is_small() {
        assert!(std::mem::size_of::<Kept<Addr<Endpoint>>>() <= 64);
        assert!(std::mem::size_of::<Kept<WeakAddr<Endpoint>>>() <= 48);
    }

    #[test]
    fn a_weak_directory_finds_an_endpoint_while_alive_and_does_not_keep_it_alive() {
        use actix::AsyncContext as _;
        let dir = WeakLocalDirectory::default();
        // A `Context` never run: its address is upgradable while the context exists.
        let ctx = actix::Context::<Endpoint>::new();
        let entry = EndpointEntry {
            id: "e1".into(),
            user: "sip:a@x".into(),
            device: "d".into(),
            addr: EndpointRef::Local(ctx.address()),
        };
        dir.register(entry, 4).expect("registers");
        let found = dir.endpoints_of("sip:a@x");
        assert_eq!(found.len(), 1);
        assert_eq!((&*found[0].id, &*found[0].user), ("e1", "sip:a@x"));
        assert!(found[0].addr.local().is_some());
        drop(found);
        assert_eq!(dir.all().len(), 1);
        // The actor gone (its mailbox dropped with its context): it is no longer listed,
        // though still kept until it unregisters.
        drop(ctx);
        assert!(dir.endpoints_of("sip:a@x").is_empty());
        assert_eq!(dir.len(), 1);
        dir.unregister("sip:a@x", "e1");
        assert!(dir.is_empty());
    }

    #[test]
    fn a_lone_directory_keeps_a_strong_address() {
        use actix::AsyncContext as _;
        let dir: LocalDirectory = LocalDirectory::default();
        let ctx = actix::Context::<Endpoint>::new();
        let addr = ctx.address();
        let entry = EndpointEntry {
            id: "e1".into(),
            user: "sip:a@x".into(),
            device: "d".into(),
            addr: EndpointRef::Local(addr.clone()),
        };
        dir.register(entry, 4).expect("registers");
        drop(addr);
        // The directory's sender keeps the mailbox connected: dropping a lookup's address
        // is not its last sender's drop (which would wake the actor).
        let found = dir.endpoints_of("sip:a@x");
        assert!(found[0].addr.local().is_some_and(|a| a.connected()));
    }
}
