//! How an endpoint ends: cleanly (`bye`, a shutdown, over `endpoints_per_user`: every call
//! terminates and its events go out before the socket closes), or lost (the connection is
//! gone: the remote parties see 408).

use actix::prelude::*;
use confab_protocol::ServerMsg;
use std::time::Duration;

use super::{EndState, Endpoint};
use crate::call::leg::{LegMsg, TerminateCause};
use crate::metrics as m;
use crate::reasons;
use crate::refusal::Refusal;
use crate::route::LegRef;

/// How long `bye` waits for calls on other nodes to report their end.
const REMOTE_END_WAIT: Duration = Duration::from_secs(2);

impl Endpoint {
    /// `bye` or shutdown: every call terminates (its events go out first), then the socket
    /// closes.
    pub(super) fn end_cleanly(&mut self, ctx: &mut Context<Self>, cause: TerminateCause) {
        if self.ending() {
            return;
        }
        self.end_state = if cause == TerminateCause::Shutdown {
            EndState::ShuttingDown
        } else {
            EndState::Ending
        };
        let mut local = Vec::new();
        for (leg, _) in self.book.calls.values() {
            match leg {
                LegRef::Local(a) => local.push(a.clone()),
                remote => {
                    remote.do_send(LegMsg::Terminate { rid: None, cause });
                }
            }
        }
        let done = futures::future::join_all(
            local
                .into_iter()
                .map(move |leg| leg.send(LegMsg::Terminate { rid: None, cause })),
        );
        // Spawned, not waited on (`ctx.wait` would stop the frame stream): the endpoint keeps
        // reading its client meanwhile, so a request sent after `bye` is still answered
        // (`refuse_while_ending`) until the socket closes.
        ctx.spawn(done.into_actor(self).map(|_, act, ctx| {
            if act
                .book
                .calls
                .values()
                .any(|(l, _)| l.remote_node().is_some())
            {
                // Legs on other nodes report their end through the network; wait for them
                // (their events go out first), within a deadline.
                act.closing = true;
                ctx.run_later(REMOTE_END_WAIT, |act, ctx| {
                    // Messages and requests to legs that never reported their end still get
                    // their answer.
                    for (call, r) in std::mem::take(&mut act.book.remote_calls) {
                        act.answer_all_waiting(&call, r, 481, reasons::CALL_DOES_NOT_EXIST, false);
                    }
                    act.outbox.close();
                    ctx.stop();
                });
                return;
            }
            act.outbox.close();
            ctx.stop();
        }));
    }

    /// The connection is gone or unusable: remote parties see 408.
    pub(super) fn lost(&mut self, ctx: &mut Context<Self>) {
        self.end_state = EndState::Ending;
        self.outbox.close();
        ctx.stop();
    }

    /// The node is shutting down: the client hears it before any of its calls end.
    pub(super) fn shutdown_notice(&self) {
        let s = &self.ctx.settings.server;
        self.push(ServerMsg::Shutdown {
            reason: "Server shutting down".to_owned(),
            reconnect_after_ms: s.reconnect_after_ms,
        });
    }

    /// An operator ended the session (admin API): the client hears why, then it ends as on
    /// `bye`. An endpoint already ending just ends.
    pub(super) fn kicked(&mut self, reason: String, ctx: &mut Context<Self>) {
        if self.ending() {
            return;
        }
        metrics::counter!(m::SESSIONS_KICKED).increment(1);
        self.push(ServerMsg::Kicked { reason });
        self.end_cleanly(ctx, TerminateCause::Bye);
    }

    /// Cluster: this endpoint ranks beyond `endpoints_per_user` across the nodes: the client
    /// is told, then it ends as on `bye`. Sent again for each later record of the user until
    /// this endpoint is gone.
    pub(super) fn over_limit(&mut self, ctx: &mut Context<Self>) {
        if self.ending() {
            return;
        }
        metrics::counter!(m::CONNECTIONS_REJECTED, "reason" => "endpoints_per_user").increment(1);
        self.refuse(None, Refusal::OverEndpointsAcrossCluster);
        self.end_cleanly(ctx, TerminateCause::Bye);
    }
}
