//! Presence: device-state publications in, aggregated presence out.
//!
//! Users are spread over a fixed set of [`PresenceShard`] actors by a hash of the user URI, so
//! one user's state is always owned by one actor (every change is one message handled at a
//! time) and there is no actor lifecycle to race against when a user signs in and out.

pub mod rank;
pub mod stamp;

use actix::prelude::*;
use confab_protocol::{Activity, EffectiveActivity, EndpointPresence, ServerMsg, Status};
use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;

use crate::metrics as m;
use crate::outbox::Outbox;
use rank::{Publication, Thresholds};
use stamp::{StatusClock, StatusStamp};

/// Addresses of every shard; cheap to clone.
#[derive(Clone)]
pub struct PresenceShards {
    shards: Vec<Addr<PresenceShard>>,
    /// Stamps this node's `set_status` changes (see [`stamp`]).
    clock: Arc<StatusClock>,
}

impl PresenceShards {
    /// Starts `n` shards, one on each of the given arbiters in turn.
    pub fn start(arbiters: &[actix::ArbiterHandle], t: Thresholds) -> Self {
        let shards = arbiters
            .iter()
            .map(|a| PresenceShard::start_in_arbiter(a, move |_| PresenceShard::new(t)))
            .collect();
        PresenceShards {
            shards,
            clock: Arc::new(StatusClock::default()),
        }
    }

    /// The stamp of a `set_status` made now on this node.
    pub fn stamp_status(&self) -> u64 {
        self.clock.tick(stamp::unix_ms())
    }

    /// Notes the stamp of a status set on another node, so that this node's later changes
    /// are stamped above it.
    pub fn observe_status(&self, at_ms: u64) {
        self.clock.observe(at_ms);
    }

    pub fn for_user(&self, user: &str) -> &Addr<PresenceShard> {
        let mut h = std::collections::hash_map::DefaultHasher::new();
        user.hash(&mut h);
        &self.shards[(h.finish() as usize) % self.shards.len()]
    }

    pub fn send(&self, msg: PresenceMsg) {
        self.for_user(msg.user()).do_send(msg);
    }
}

/// Everything presence is told. `user` is always the normalised URI the message is about.
#[derive(Message)]
#[rtype(result = "()")]
pub enum PresenceMsg {
    Joined {
        /// The endpoint's own copy, which becomes the shard's key for a user new to it.
        user: Arc<str>,
        /// The endpoint's own copy of its id, kept in the user's list.
        endpoint: Arc<str>,
        device: String,
    },
    Left {
        user: String,
        endpoint: String,
    },
    Publish {
        user: String,
        endpoint: String,
        activity: Activity,
        idle_ms: u64,
    },
    SetStatus {
        user: String,
        endpoint: String,
        status: Option<Status>,
        /// The `set_status`'s stamp from [`PresenceShards::stamp_status`].
        at_unix_ms: u64,
    },
    /// Cluster: an endpoint on another node, as its directory record says (added or changed).
    Upsert {
        user: String,
        endpoint: String,
        device: String,
        publication: Option<Publication>,
        /// The manual status that endpoint set last, with its stamp.
        status: Option<(Option<Status>, u64)>,
    },
    Subscribe {
        user: String,
        subscriber: String,
        outbox: Outbox,
        same_user: bool,
    },
    Unsubscribe {
        user: String,
        subscriber: String,
    },
}

impl PresenceMsg {
    fn user(&self) -> &str {
        match self {
            PresenceMsg::Joined { user, .. } => user,
            PresenceMsg::Left { user, .. }
            | PresenceMsg::Publish { user, .. }
            | PresenceMsg::SetStatus { user, .. }
            | PresenceMsg::Upsert { user, .. }
            | PresenceMsg::Subscribe { user, .. }
            | PresenceMsg::Unsubscribe { user, .. } => user,
        }
    }
}

/// The user's endpoint ids, most active first, at the moment the message is handled.
#[derive(Message)]
#[rtype(result = "Vec<String>")]
pub struct RankEndpoints {
    pub user: String,
}

/// The user's full presence view (the one the user's own devices get: every endpoint with its
/// effective activity, idle time and rank, as the arbiter ranks them), at the moment the
/// message is handled; None for a user with no endpoint. For the admin API.
#[derive(Message)]
#[rtype(result = "Option<ServerMsg>")]
pub struct UserView {
    pub user: String,
}

struct EndpointState {
    device: String,
    /// Boxed: an endpoint that never published (most idle ones) then costs 8 bytes here,
    /// and each of a user's endpoints 48 bytes in its list instead of 72 (the allocator's
    /// 80-byte class).
    publication: Option<Box<Publication>>,
}

struct Subscriber {
    outbox: Outbox,
    same_user: bool,
    /// What this subscriber last saw, with `idle_ms` blanked: ticking idle time is no change.
    last_seen: Option<ServerMsg>,
}

/// A user's endpoints. A user has a handful at most, and a map would cost more memory per
/// signed-in user than the whole list: a plain vector, searched by id.
#[derive(Default)]
struct Endpoints(Vec<(Arc<str>, EndpointState)>);

impl Endpoints {
    fn insert(&mut self, id: Arc<str>, state: EndpointState) {
        match self.get_mut(&id) {
            Some(e) => *e = state,
            None => {
                self.0.reserve_exact(1);
                self.0.push((id, state));
            }
        }
    }
    fn remove(&mut self, id: &str) {
        self.0.retain(|(e, _)| &**e != id);
    }
    fn get(&self, id: &str) -> Option<&EndpointState> {
        self.0.iter().find(|(e, _)| &**e == id).map(|(_, s)| s)
    }
    fn get_mut(&mut self, id: &str) -> Option<&mut EndpointState> {
        self.0.iter_mut().find(|(e, _)| &**e == id).map(|(_, s)| s)
    }
    fn iter(&self) -> impl Iterator<Item = (&Arc<str>, &EndpointState)> {
        self.0.iter().map(|(e, s)| (e, s))
    }
    fn values(&self) -> impl Iterator<Item = &EndpointState> {
        self.0.iter().map(|(_, s)| s)
    }
    fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

#[derive(Default)]
struct UserState {
    endpoints: Endpoints,
    /// The manual status, once one was set. Boxed: most users never set one, and inline it
    /// and its stamp took 40 of the slot's bytes, which (see `watchers`) cost nearly twice
    /// that per signed-in user.
    status: Option<Box<ManualStatus>>,
    /// Who watches the user, if anyone. Boxed and made on the first subscription: most users
    /// have no watcher, and this shard's table holds a slot per signed-in user (with the
    /// table's spare room, about 1.7 slots each), so every byte here costs nearly two per
    /// endpoint.
    watchers: Option<Box<Watchers>>,
}

/// A user's manual status and when it was set.
struct ManualStatus {
    status: Option<Status>,
    /// When and by which endpoint it was set: a change applies only if its stamp supersedes
    /// this one (see [`stamp`]).
    at: StatusStamp,
}

/// A user's watchers and the timer that tells them of threshold crossings (which exists only
/// while there is someone to tell).
#[derive(Default)]
struct Watchers {
    subscribers: HashMap<String, Subscriber>,
    timer: Option<SpawnHandle>,
}

impl UserState {
    /// A status change, applied only if it is later than the one in place (a change from
    /// another node can arrive after a later one made here, or two within one millisecond).
    fn apply_status(&mut self, status: Option<Status>, stamp: StatusStamp) {
        match &mut self.status {
            // No status yet stands for the default stamp, as it did when the stamp was inline.
            None if stamp.supersedes(&StatusStamp::default()) => {
                self.status = Some(Box::new(ManualStatus { status, at: stamp }));
            }
            Some(current) if stamp.supersedes(&current.at) => {
                **current = ManualStatus { status, at: stamp };
            }
            _ => {}
        }
    }

    /// The manual status in force.
    fn status(&self) -> Option<Status> {
        self.status.as_ref().and_then(|s| s.status)
    }
}

pub struct PresenceShard {
    /// Keyed by the user's shared URI (see `EndpointEntry::user`).
    users: HashMap<Arc<str>, UserState>,
    thresholds: Thresholds,
}

impl Actor for PresenceShard {
    type Context = Context<Self>;
}

impl PresenceShard {
    fn new(thresholds: Thresholds) -> Self {
        PresenceShard {
            users: HashMap::new(),
            thresholds,
        }
    }

    /// Endpoint ids ranked, most active first, with their effective activity.
    fn ranked(&self, state: &UserState, now: Instant) -> Vec<(String, EffectiveActivity)> {
        let mut eps: Vec<(&str, Option<&Publication>)> = state
            .endpoints
            .iter()
            .map(|(id, e)| (&**id, e.publication.as_deref()))
            .collect();
        eps.sort_by(|a, b| rank::compare(*a, *b, now, self.thresholds));
        eps.into_iter()
            .map(|(id, p)| (id.to_owned(), rank::effective(p, now, self.thresholds)))
            .collect()
    }

    /// The full view (for the user's own endpoints) and the public one, at `now`.
    fn views(&self, user: &str, state: &UserState, now: Instant) -> (ServerMsg, ServerMsg) {
        let ranked = self.ranked(state, now);
        let availability = rank::aggregate(state.status(), ranked.first().map(|(_, a)| *a));
        let endpoints = ranked
            .iter()
            .enumerate()
            .filter_map(|(i, (id, activity))| {
                let e = state.endpoints.get(id)?;
                Some(EndpointPresence {
                    endpoint: id.clone(),
                    device: e.device.clone(),
                    activity: *activity,
                    idle_ms: e
                        .publication
                        .as_deref()
                        .map(|p| p.idle_at(now).as_millis().min(u64::MAX as u128) as u64),
                    rank: i as u32 + 1,
                })
            })
            .collect();
        let full = ServerMsg::Presence {
            user: user.to_owned(),
            availability,
            most_active: ranked.first().map(|(id, _)| id.clone()),
            endpoints: Some(endpoints),
            status: Some(state.status()),
        };
        let public = ServerMsg::Presence {
            user: user.to_owned(),
            availability,
            most_active: None,
            endpoints: None,
            status: None,
        };
        (full, public)
    }

    /// Sends each subscriber of `user` what changed for it, then re-arms the threshold timer.
    fn notify(&mut self, user: &str, ctx: &mut Context<Self>) {
        let now = Instant::now();
        let Some(state) = self.users.get_mut(user) else {
            return;
        };
        // Nobody to tell: no views to build, and no threshold timer (it exists only to tell
        // subscribers of a crossing; a new subscription comes through here and arms it). Most
        // users have no watcher, and every sign-in and sign-out passes here.
        if state
            .watchers
            .as_ref()
            .is_none_or(|w| w.subscribers.is_empty())
        {
            if let Some(h) = state.watchers.take().and_then(|w| w.timer) {
                ctx.cancel_future(h);
            }
            return;
        }
        let Some(state) = self.users.get(user) else {
            return;
        };
        let (full, public) = self.views(user, state, now);
        let next = state
            .endpoints
            .values()
            .filter_map(|e| e.publication.as_deref())
            .filter_map(|p| rank::next_crossing(p, now, self.thresholds))
            .min();
        let Some(state) = self
            .users
            .get_mut(user)
            .and_then(|s| s.watchers.as_deref_mut())
        else {
            return;
        };
        for sub in state.subscribers.values_mut() {
            let view = if sub.same_user { &full } else { &public };
            let blanked = without_idle(view);
            if sub.last_seen.as_ref() != Some(&blanked) {
                sub.outbox.push(view.clone());
                metrics::counter!(m::PRESENCE_NOTIFICATIONS).increment(1);
                sub.last_seen = Some(blanked);
            }
        }
        if let Some(h) = state.timer.take() {
            ctx.cancel_future(h);
        }
        if let Some(at) = next {
            let user = user.to_owned();
            // A millisecond of slack so the crossing has happened when the timer fires.
            let delay = at.saturating_duration_since(now) + Duration::from_millis(1);
            state.timer = Some(ctx.run_later(delay, move |act, ctx| {
                if let Some(w) = act
                    .users
                    .get_mut(user.as_str())
                    .and_then(|s| s.watchers.as_deref_mut())
                {
                    w.timer = None;
                }
                act.notify(&user, ctx);
            }));
        }
    }

    fn forget_if_idle(&mut self, user: &str, ctx: &mut Context<Self>) {
        if let Some(state) = self.users.get(user)
            && state.endpoints.is_empty()
            && state
                .watchers
                .as_ref()
                .is_none_or(|w| w.subscribers.is_empty())
            && let Some(state) = self.users.remove(user)
            && let Some(h) = state.watchers.and_then(|w| w.timer)
        {
            ctx.cancel_future(h);
        }
    }
}

fn without_idle(msg: &ServerMsg) -> ServerMsg {
    let mut msg = msg.clone();
    if let ServerMsg::Presence {
        endpoints: Some(eps),
        ..
    } = &mut msg
    {
        for e in eps {
            e.idle_ms = e.idle_ms.map(|_| 0);
        }
    }
    msg
}

impl Handler<PresenceMsg> for PresenceShard {
    type Result = ();

    fn handle(&mut self, msg: PresenceMsg, ctx: &mut Context<Self>) {
        let user = msg.user().to_owned();
        match msg {
            PresenceMsg::Joined {
                user: shared,
                endpoint,
                device,
            } => {
                self.users.entry(shared).or_default().endpoints.insert(
                    endpoint,
                    EndpointState {
                        device,
                        publication: None,
                    },
                );
            }
            PresenceMsg::Left { endpoint, .. } => {
                if let Some(state) = self.users.get_mut(user.as_str()) {
                    state.endpoints.remove(&endpoint);
                    if state.endpoints.is_empty() {
                        // The manual status belongs to a signed-in user.
                        state.status = None;
                    }
                }
            }
            PresenceMsg::Publish {
                endpoint,
                activity,
                idle_ms,
                ..
            } => {
                metrics::counter!(m::PRESENCE_PUBLICATIONS).increment(1);
                if let Some(e) = self
                    .users
                    .get_mut(user.as_str())
                    .and_then(|s| s.endpoints.get_mut(&endpoint))
                {
                    let publication = Publication {
                        activity,
                        stamp: Instant::now(),
                        idle_ms,
                    };
                    // In place once the endpoint has published: one allocation per endpoint.
                    match &mut e.publication {
                        Some(p) => **p = publication,
                        None => e.publication = Some(Box::new(publication)),
                    }
                }
            }
            PresenceMsg::SetStatus {
                endpoint,
                status,
                at_unix_ms,
                ..
            } => {
                if let Some(state) = self.users.get_mut(user.as_str()) {
                    state.apply_status(status, StatusStamp::new(at_unix_ms, endpoint));
                }
            }
            PresenceMsg::Upsert {
                endpoint,
                device,
                publication,
                status,
                ..
            } => {
                let state = self.users.entry(Arc::from(user.as_str())).or_default();
                let endpoint_id = endpoint.clone();
                state.endpoints.insert(
                    Arc::from(endpoint),
                    EndpointState {
                        device,
                        publication: publication.map(Box::new),
                    },
                );
                if let Some((status, at)) = status {
                    let stamp = StatusStamp::new(at, endpoint_id);
                    state.apply_status(status, stamp);
                }
            }
            PresenceMsg::Subscribe {
                subscriber,
                outbox,
                same_user,
                ..
            } => {
                // A (re-)subscription always gets the current state at once.
                self.users
                    .entry(Arc::from(user.as_str()))
                    .or_default()
                    .watchers
                    .get_or_insert_default()
                    .subscribers
                    .insert(
                        subscriber,
                        Subscriber {
                            outbox,
                            same_user,
                            last_seen: None,
                        },
                    );
            }
            PresenceMsg::Unsubscribe { subscriber, .. } => {
                if let Some(w) = self
                    .users
                    .get_mut(user.as_str())
                    .and_then(|s| s.watchers.as_deref_mut())
                {
                    w.subscribers.remove(&subscriber);
                }
            }
        }
        self.notify(&user, ctx);
        self.forget_if_idle(&user, ctx);
    }
}

impl Handler<UserView> for PresenceShard {
    type Result = Option<ServerMsg>;

    fn handle(&mut self, msg: UserView, _: &mut Context<Self>) -> Option<ServerMsg> {
        let state = self.users.get(msg.user.as_str())?;
        if state.endpoints.is_empty() {
            return None;
        }
        Some(self.views(&msg.user, state, Instant::now()).0)
    }
}

impl Handler<RankEndpoints> for PresenceShard {
    type Result = Vec<String>;

    fn handle(&mut self, msg: RankEndpoints, _: &mut Context<Self>) -> Vec<String> {
        match self.users.get(msg.user.as_str()) {
            Some(state) => self
                .ranked(state, Instant::now())
                .into_iter()
                .map(|(id, _)| id)
                .collect(),
            None => Vec::new(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The shard's table holds a slot per signed-in user (about 1.7 with its spare room):
    /// what is not in most users' state stays out of the slot.
    #[test]
    fn a_users_slot_is_small() {
        assert!(std::mem::size_of::<UserState>() <= 40);
        // An endpoint in its user's list: the 48-byte class, not 80.
        assert!(std::mem::size_of::<(Arc<str>, EndpointState)>() <= 48);
    }

    #[test]
    fn a_status_applies_only_over_an_earlier_stamp() {
        let mut state = UserState::default();
        assert_eq!(state.status(), None);
        state.apply_status(Some(Status::Busy), StatusStamp::new(5, "e2"));
        assert_eq!(state.status(), Some(Status::Busy));
        state.apply_status(Some(Status::Away), StatusStamp::new(5, "e1"));
        assert_eq!(state.status(), Some(Status::Busy), "an earlier stamp loses");
        state.apply_status(None, StatusStamp::new(6, "e1"));
        assert_eq!(state.status(), None, "a later stamp clears it");
        assert!(state.status.is_some(), "its stamp is kept");
        state.apply_status(Some(Status::Away), StatusStamp::new(6, "e1"));
        assert_eq!(state.status(), None, "the same stamp again is no change");
    }
}
