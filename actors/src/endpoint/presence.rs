//! An endpoint's presence: publishing its device state and the user's status, and the
//! subscriptions to other users' presence, under `limits.presence_updates_per_second`.

use actix::prelude::*;
use confab_protocol::uri::normalize_user_uri;
use confab_protocol::{Activity, ServerMsg};
use std::collections::HashSet;

use super::{Endpoint, presence_rate};
use crate::metrics as m;
use crate::presence::PresenceMsg;
use crate::refusal::Refusal;

impl Endpoint {
    /// Whether a presence change fits `limits.presence_updates_per_second`; refused if not.
    pub(super) fn presence_allowed(&mut self, rid: Option<u32>) -> bool {
        if self
            .presence_bucket
            .try_take(presence_rate(&self.ctx), self.last_rx)
        {
            return true;
        }
        m::limit_tripped("presence_updates_per_second");
        self.refuse(rid, Refusal::PresenceTooFast);
        false
    }

    /// `device_state`: to the presence shard here and, in a cluster, to the directory.
    pub(super) fn device_state(
        &mut self,
        rid: Option<u32>,
        activity: Activity,
        idle_ms: Option<u64>,
    ) {
        if !self.presence_allowed(rid) {
            return;
        }
        self.push(ServerMsg::Ok { rid });
        self.ctx.presence.send(PresenceMsg::Publish {
            user: self.user.to_string(),
            endpoint: self.id.to_string(),
            activity,
            idle_ms: idle_ms.unwrap_or(0),
        });
        self.ctx
            .directory
            .published(&self.id, activity, idle_ms.unwrap_or(0));
    }

    pub(super) fn unsubscribe(&mut self, rid: Option<u32>, users: Vec<String>) {
        let Some(users) = self.normalize_all(rid, &users) else {
            return;
        };
        self.push(ServerMsg::Ok { rid });
        for user in users {
            if self.subscriptions.as_mut().is_some_and(|s| s.remove(&user)) {
                self.ctx.presence.send(PresenceMsg::Unsubscribe {
                    user,
                    subscriber: self.id.to_string(),
                });
            }
        }
    }

    pub(super) fn normalize_all(&self, rid: Option<u32>, users: &[String]) -> Option<Vec<String>> {
        let mut out = Vec::with_capacity(users.len());
        for u in users {
            match normalize_user_uri(u) {
                Ok(u) => out.push(u),
                Err(_) => {
                    self.refuse(rid, Refusal::UsersNotSipUris);
                    return None;
                }
            }
        }
        Some(out)
    }

    /// `set_status`. In a cluster its order against other devices' changes must be the order
    /// their clients saw (docs/protocol.md §9 q): the stamp is taken once this node has caught
    /// up with the directory, and the `ok` once the change has landed there. The endpoint
    /// handles nothing else meanwhile (a millisecond or two; at most twice 500 ms), so its
    /// own changes stay in the order sent. Alone, both waits are nothing.
    pub(super) fn set_status(
        &mut self,
        rid: Option<u32>,
        status: Option<confab_protocol::Status>,
        ctx: &mut Context<Self>,
    ) {
        if !self.presence_allowed(rid) {
            return;
        }
        let barrier = self.ctx.directory.status_barrier();
        ctx.wait(
            fut::wrap_future::<_, Self>(barrier)
                .then(move |_, act, _| {
                    let at_unix_ms = act.ctx.presence.stamp_status();
                    act.ctx.presence.send(PresenceMsg::SetStatus {
                        user: act.user.to_string(),
                        endpoint: act.id.to_string(),
                        status,
                        at_unix_ms,
                    });
                    act.ctx.directory.status_set(&act.id, status, at_unix_ms);
                    fut::wrap_future(act.ctx.directory.status_landed())
                })
                .map(move |_, act, _| act.push(ServerMsg::Ok { rid })),
        );
    }

    pub(super) fn subscribe(&mut self, rid: Option<u32>, users: Vec<String>) {
        let Some(users) = self.normalize_all(rid, &users) else {
            return;
        };
        let limit = self.ctx.live().limits.subscriptions_per_endpoint;
        let watched = self.subscriptions.as_deref();
        let new = users
            .iter()
            .filter(|u| !watched.is_some_and(|s| s.contains(*u)))
            .collect::<HashSet<_>>()
            .len();
        if watched.map_or(0, HashSet::len) + new > limit {
            m::limit_tripped("subscriptions_per_endpoint");
            return self.refuse(rid, Refusal::SubscriptionLimit);
        }
        self.push(ServerMsg::Ok { rid });
        for user in users {
            self.subscriptions
                .get_or_insert_default()
                .insert(user.clone());
            let same_user = *user == *self.user;
            self.ctx.presence.send(PresenceMsg::Subscribe {
                user,
                subscriber: self.id.to_string(),
                outbox: self.outbox.clone(),
                same_user,
            });
        }
    }
}
