//! The heartbeat task: pings every `heartbeat_ms` as the contract asks, and closes the
//! connection when the node has been silent for three periods (the rule the node applies to
//! clients, mirrored), since the node answers each ping with a pong.

use std::sync::Arc;
use std::time::Duration;

use confab_protocol::ClientMsg;
use tokio::time::{Instant, MissedTickBehavior, interval_at};

use super::Shared;

/// Periods of silence after which the node is presumed gone.
const SILENT_PERIODS: u32 = 3;

pub(super) async fn run(shared: Arc<Shared>, period: Duration) {
    let mut ticks = interval_at(Instant::now() + period, period);
    ticks.set_missed_tick_behavior(MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            biased;
            () = shared.cancel.cancelled() => return,
            _ = ticks.tick() => {}
        }
        let silence = shared.silence();
        if silence > period * SILENT_PERIODS {
            tracing::warn!(
                silent_ms = silence.as_millis(),
                "the node stopped answering; closing"
            );
            shared.cancel.cancel();
            return;
        }
        // No rid: the pong needs no matching, only its arrival counts.
        if shared.send(&ClientMsg::Ping { rid: None }).is_err() {
            return;
        }
    }
}
