//! Presence as the application sees it: [`PresenceUpdate`] (one `presence` event) and
//! [`PresenceStream`] (the updates about the users of one `subscribe`). The router matches
//! events to streams by normalised user URI, since the node echoes the normalised form.

use std::collections::HashSet;
use std::sync::Mutex;

use confab_protocol::uri::normalize_user_uri;
use confab_protocol::{Availability, EndpointPresence, Status};
use tokio::sync::mpsc;

use crate::queue::public_stream;
use crate::sync::lock;

/// One `presence` event: a watched user's aggregated presence.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PresenceUpdate {
    /// The user, in normalised form.
    pub user: String,
    /// What everyone watching sees.
    pub availability: Availability,
    /// The most active endpoint (only when the user is this endpoint's own user).
    pub most_active: Option<String>,
    /// Every endpoint of the user, ranked (own user only).
    pub endpoints: Option<Vec<EndpointPresence>>,
    /// The manual status: `None` when not sent (other users), `Some(None)` when cleared.
    pub status: Option<Option<Status>>,
}

public_stream! {
    /// Presence updates for the users of one [`crate::Endpoint::subscribe`]: one per user at
    /// once, then one per change. Ends when the connection does, or when every one of its
    /// users has been unsubscribed.
    PresenceStream => PresenceUpdate
}

/// The user URI as the node will echo it; a string that is not a SIP URI is left alone (the
/// node refuses it anyway).
pub(crate) fn normalize(user: &str) -> String {
    normalize_user_uri(user).unwrap_or_else(|_| user.to_owned())
}

struct Watch {
    id: u64,
    users: HashSet<String>,
    tx: mpsc::UnboundedSender<PresenceUpdate>,
}

#[derive(Default)]
pub(crate) struct PresenceRouter {
    inner: Mutex<RouterInner>,
}

#[derive(Default)]
struct RouterInner {
    next_id: u64,
    watches: Vec<Watch>,
    closed: bool,
}

impl PresenceRouter {
    /// Registers interest in `users` (normalised) before the `subscribe` is sent, because the
    /// node's first updates follow its `ok` at once.
    pub(crate) fn add(
        &self,
        users: HashSet<String>,
    ) -> (u64, mpsc::UnboundedReceiver<PresenceUpdate>) {
        let (tx, rx) = mpsc::unbounded_channel();
        let mut inner = lock(&self.inner);
        inner.next_id += 1;
        let id = inner.next_id;
        if !inner.closed {
            inner.watches.push(Watch { id, users, tx });
        }
        (id, rx)
    }

    pub(crate) fn remove(&self, id: u64) {
        lock(&self.inner).watches.retain(|w| w.id != id);
    }

    /// The node no longer sends updates about `users` to this endpoint.
    pub(crate) fn remove_users(&self, users: &HashSet<String>) {
        let mut inner = lock(&self.inner);
        for watch in &mut inner.watches {
            watch.users.retain(|u| !users.contains(u));
        }
        inner.watches.retain(|w| !w.users.is_empty());
    }

    pub(crate) fn route(&self, update: &PresenceUpdate) {
        let mut inner = lock(&self.inner);
        let mut delivered = false;
        // Dropped streams are pruned here rather than on drop, which needs no back-reference.
        inner.watches.retain(|w| {
            if !w.users.contains(&update.user) {
                return !w.tx.is_closed();
            }
            delivered = true;
            w.tx.send(update.clone()).is_ok()
        });
        if !delivered {
            tracing::debug!(user = %update.user, "presence for a user nobody watches; dropped");
        }
    }

    pub(crate) fn close(&self) {
        let mut inner = lock(&self.inner);
        inner.closed = true;
        inner.watches.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn update(user: &str) -> PresenceUpdate {
        PresenceUpdate {
            user: user.to_owned(),
            availability: Availability::Available,
            most_active: None,
            endpoints: None,
            status: None,
        }
    }

    #[test]
    fn routes_by_normalised_user_and_forgets_unsubscribed_ones() {
        let router = PresenceRouter::default();
        let users: HashSet<String> = [normalize("SIP:bob@Example.COM")].into();
        let (_, mut rx) = router.add(users.clone());
        router.route(&update("sip:bob@example.com"));
        router.route(&update("sip:carol@example.com"));
        assert_eq!(
            rx.try_recv().map(|u| u.user).as_deref(),
            Ok("sip:bob@example.com")
        );
        assert!(rx.try_recv().is_err());
        router.remove_users(&users);
        assert!(rx.try_recv().is_err(), "stream ended, nothing queued");
        assert!(rx.is_closed());
    }
}
