//! The heartbeat check of a node's endpoints: one sweep task per node, every
//! `server.heartbeat_ms`, asks each live endpoint to look at when its client last sent a frame
//! (a client silent for three heartbeats is dropped as lost).
//!
//! One timer per node rather than one per endpoint: an actix interval is a boxed item in the
//! endpoint's context with a tokio timer inside, about 150 bytes per idle endpoint, where a
//! slot here is 8. The endpoints are held weakly, so the sweep keeps none of them alive, and
//! each gives its slot back when it stops.

use actix::WeakAddr;
use actix::prelude::*;
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use crate::endpoint::{Endpoint, HeartbeatDue};

/// Every endpoint of a node, as the heartbeat sweep sees them.
pub struct Heartbeats {
    period: Duration,
    slots: Mutex<Slots>,
}

#[derive(Default)]
struct Slots {
    endpoints: Vec<Option<WeakAddr<Endpoint>>>,
    /// Slots given back, taken again before the list grows.
    free: Vec<u32>,
    /// The sweep task runs (started by the first endpoint, on its worker).
    sweeping: bool,
}

impl Heartbeats {
    pub fn new(period: Duration) -> Arc<Self> {
        Arc::new(Heartbeats {
            period,
            slots: Mutex::default(),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Slots> {
        match self.slots.lock() {
            Ok(s) => s,
            Err(poisoned) => poisoned.into_inner(),
        }
    }

    /// Adds an endpoint to the sweep; returns its slot, for [`Heartbeats::leave`]. Must be
    /// called on an actix worker (the first call starts the sweep there).
    pub fn join(self: &Arc<Self>, endpoint: WeakAddr<Endpoint>) -> u32 {
        let mut s = self.lock();
        if !s.sweeping && !self.period.is_zero() {
            s.sweeping = true;
            actix_rt::spawn(sweep(Arc::downgrade(self), self.period));
        }
        match s.free.pop() {
            Some(slot) => {
                s.endpoints[slot as usize] = Some(endpoint);
                slot
            }
            None => {
                s.endpoints.push(Some(endpoint));
                // More than u32::MAX endpoints on one node cannot sign in (file descriptors).
                u32::try_from(s.endpoints.len() - 1).unwrap_or(u32::MAX)
            }
        }
    }

    /// Takes an endpoint out of the sweep.
    pub fn leave(&self, slot: u32) {
        let mut s = self.lock();
        if let Some(e) = s.endpoints.get_mut(slot as usize)
            && e.take().is_some()
        {
            s.free.push(slot);
        }
    }
}

/// Heartbeat checks sent before the sweep lets its worker's other tasks run.
const SENDS_PER_YIELD: usize = 1024;

/// Every `period`, a [`HeartbeatDue`] to each endpoint, until the node's [`Heartbeats`] is
/// gone.
async fn sweep(heartbeats: Weak<Heartbeats>, period: Duration) {
    let mut tick = tokio::time::interval(period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // The first tick is at once. Ticks are the node's, so an endpoint's first check comes
    // within a period of its joining; dropping a client takes three silent periods, so the
    // phase does not matter.
    tick.tick().await;
    loop {
        tick.tick().await;
        let Some(heartbeats) = heartbeats.upgrade() else {
            return;
        };
        // Taken out of the lock first: sign-ins wait on it, and a send can take a while on a
        // node with many endpoints.
        let due: Vec<Addr<Endpoint>> = heartbeats
            .lock()
            .endpoints
            .iter()
            .flatten()
            .filter_map(WeakAddr::upgrade)
            .collect();
        drop(heartbeats);
        for (i, endpoint) in due.into_iter().enumerate() {
            endpoint.do_send(HeartbeatDue);
            // Tens of thousands of sends in one poll would hold this worker's other tasks
            // (its clients' frames) for milliseconds.
            if i % SENDS_PER_YIELD == SENDS_PER_YIELD - 1 {
                tokio::task::yield_now().await;
            }
        }
    }
}
