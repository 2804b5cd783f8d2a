//! The task a connection's writing side runs in: alone ([`WriterTask`], before a sign-in or
//! after a resume), or beside its endpoint's actor in one task ([`SignedIn`]).
//!
//! Why one task for both: every idle signed-in connection paid for two tokio tasks, the
//! endpoint's and its writer's, and tokio lays each task out in 128-byte steps with about
//! 100 bytes of its own (a writer's task was 256 bytes for a future of about 100). Polled from
//! the endpoint's task, the writer costs only its own state, boxed (docs/benchmarks-log.md,
//! seventeenth session). The writer stays a future of its own inside the task, not an item of
//! the actor's context: actix stops polling a context's items while the actor waits on a
//! `ctx.wait` (a status change waits for the directory), and the client's frames must keep
//! flowing meanwhile; and the writer outlives the actor, to flush the last frames after the
//! endpoint has stopped.

use actix::dev::ContextFut;
use std::pin::Pin;
use std::task::{Context, Poll, ready};
use tokio::io::AsyncWrite;
use tokio::sync::OwnedSemaphorePermit;

use crate::address_limits::AddressSlot;
use crate::endpoint::Endpoint;
use crate::metrics as m;
use crate::outbox::{Outbox, OutboxReceiver, WriteLoop, write_loop};

/// A connection's slot under `server.max_connections`, and its address's: held until the
/// socket is closed, which is when the writer ends.
pub type ConnectionPermit = (OwnedSemaphorePermit, AddressSlot);

/// Writes what an outbox queues until the socket is closed, then gives back the connection's
/// slots (and counts the connection gone).
pub struct WriterTask<W> {
    write: WriteLoop<W>,
    permit: ConnectionPermit,
}

impl<W> WriterTask<W>
where
    W: AsyncWrite + Unpin + Send + 'static,
{
    pub fn new(rx: OutboxReceiver, wr: W, permit: ConnectionPermit) -> Self {
        WriterTask {
            write: write_loop(rx, wr),
            permit,
        }
    }

    /// Runs it as a task of its own.
    pub fn spawn(self) {
        actix_rt::spawn(self);
    }
}

impl<W> Future for WriterTask<W>
where
    W: AsyncWrite + Unpin + Send + 'static,
{
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        ready!(Pin::new(&mut self.write).poll(cx));
        connection_closed();
        Poll::Ready(())
    }
}

/// A signed-in connection's endpoint and writer, polled together in one task until both are
/// done. The writer is polled at every wake-up of the task (with nothing to do it looks at its
/// queue under the lock, and waits again). The actor is polled only when something it waits
/// for woke it (its waker, [`Outbox::actor_waker`], says so): polling it costs a look at its
/// mailbox, its frame stream and its timers, and the writer wakes the task at least four
/// times per batch it writes (a push, then its coalescing rounds), which polling the actor each
/// time cost about 7% more instructions per forked call.
pub struct SignedIn<W> {
    actor: Option<ContextFut<Endpoint, actix::Context<Endpoint>>>,
    /// Boxed: inline, the writer would move every endpoint's task into tokio's next 128-byte
    /// step (see the test below). Kept until the task ends, for its outbox.
    writer: Box<WriteLoop<W>>,
    /// The writer's outbox, whose shared state carries the actor's wake-ups.
    outbox: Outbox,
    /// Given back when the writer ends: `None` once it has.
    permit: Option<ConnectionPermit>,
}

impl<W> SignedIn<W>
where
    W: AsyncWrite + Unpin + Send + 'static,
{
    /// Starts `endpoint` in `ctx` and `writer` (which writes what `outbox` queues) in one task
    /// on this worker.
    pub fn spawn(
        ctx: actix::Context<Endpoint>,
        endpoint: Endpoint,
        writer: WriterTask<W>,
        outbox: Outbox,
    ) {
        let WriterTask { write, permit } = writer;
        actix_rt::spawn(SignedIn {
            actor: Some(ctx.into_future(endpoint)),
            writer: Box::new(write),
            outbox,
            permit: Some(permit),
        });
    }
}

impl<W> Future for SignedIn<W>
where
    W: AsyncWrite + Unpin + Send + 'static,
{
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let this = &mut *self;
        let writing = this.permit.is_some();
        if let Some(actor) = &mut this.actor {
            let outbox = &this.outbox;
            let done = if !writing {
                // The writer is done: every wake-up is the actor's (its wakers registered
                // before still wake the task, through the outbox).
                Pin::new(actor).poll(cx).is_ready()
            } else if outbox.take_actor_wake() {
                let waker = outbox.actor_waker(cx.waker());
                Pin::new(actor)
                    .poll(&mut Context::from_waker(&waker))
                    .is_ready()
            } else {
                false
            };
            if done {
                // The actor is stopped: its state goes now, though the writer may still flush.
                this.actor = None;
            }
        }
        if writing && Pin::new(&mut *this.writer).poll(cx).is_ready() {
            this.permit = None;
            connection_closed();
        }
        if this.actor.is_none() && this.permit.is_none() {
            this.outbox.forget_task();
            Poll::Ready(())
        } else {
            Poll::Pending
        }
    }
}

/// The connection's socket is closed (its writer ended).
fn connection_closed() {
    metrics::gauge!(m::CONNECTIONS).decrement(1.0);
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A signed-in connection's task is paid by every idle endpoint, in tokio's 128-byte
    /// steps: the endpoint's future and the writer's box together must stay where the
    /// endpoint's future alone was (640 bytes with the task's own ~100; at 536 bytes of
    /// future it moves to 768).
    #[test]
    fn a_signed_in_connection_stays_in_its_size_class() {
        for size in [
            std::mem::size_of::<SignedIn<crate::transport::ClientWriter>>(),
            std::mem::size_of::<SignedIn<crate::websocket::WsWriter>>(),
        ] {
            assert!(
                size <= 536,
                "a signed-in connection's future takes {size} bytes"
            );
        }
    }
}
