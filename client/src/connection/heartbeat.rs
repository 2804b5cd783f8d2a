//! The heartbeat task of one link: pings every `heartbeat_ms` as the contract asks (with a
//! `seen` before it on a resumable session), and gives up the link when the node has been
//! silent for three periods (the rule the node applies to clients, mirrored), since the node
//! answers each ping with a pong. A black-holed link is noticed only here.

use std::sync::Arc;
use std::time::Duration;

use tokio::time::{Instant, MissedTickBehavior, interval_at};
use tokio_util::sync::CancellationToken;

use super::Shared;

/// Periods of silence after which the node is presumed gone.
const SILENT_PERIODS: u32 = 3;

pub(super) async fn run(shared: Arc<Shared>, period: Duration, link: CancellationToken) {
    let mut ticks = interval_at(Instant::now() + period, period);
    ticks.set_missed_tick_behavior(MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            biased;
            () = link.cancelled() => return,
            _ = ticks.tick() => {}
        }
        let silence = shared.silence();
        if silence > period * SILENT_PERIODS {
            tracing::warn!(
                silent_ms = silence.as_millis(),
                "the node stopped answering; giving up the link"
            );
            shared.link_failed(format!(
                "the node was silent for {} ms (heartbeat {} ms)",
                silence.as_millis(),
                period.as_millis()
            ));
            link.cancel();
            return;
        }
        if shared.ping().is_err() {
            return;
        }
    }
}
