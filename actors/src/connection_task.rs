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
use std::task::{Context, Poll};
use tokio::io::AsyncWrite;
use tokio::sync::OwnedSemaphorePermit;

use crate::address_limits::AddressSlot;
use crate::endpoint::Endpoint;
use crate::metrics as m;
use crate::outbox::{Outbox, OutboxReceiver, WriteLoop, write_loop};

/// A connection's slot under `server.max_connections`, and its address's, counted in the
/// `confab_connections` gauge: held until the socket is closed, which is when the writer ends
/// (or the task holding it is dropped). The gauge goes down when the permit is dropped, so
/// every way a connection ends counts it once.
pub struct ConnectionPermit {
    _slots: (OwnedSemaphorePermit, AddressSlot),
}

impl ConnectionPermit {
    /// Counts the connection open.
    pub fn open(slots: (OwnedSemaphorePermit, AddressSlot)) -> Self {
        metrics::gauge!(m::CONNECTIONS).increment(1.0);
        ConnectionPermit { _slots: slots }
    }
}

impl Drop for ConnectionPermit {
    fn drop(&mut self) {
        metrics::gauge!(m::CONNECTIONS).decrement(1.0);
    }
}

/// Writes what an outbox queues until the socket is closed; the connection's permit goes with
/// it.
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
        Pin::new(&mut self.write).poll(cx)
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
        }
        if this.actor.is_none() && this.permit.is_none() {
            Poll::Ready(())
        } else {
            Poll::Pending
        }
    }
}

/// Dropped finished, or not (a panic in one of the endpoint's handlers, the runtime's
/// shutdown): either way the outbox's shared state, which other actors' clones keep alive,
/// must not keep this task's waker (and so its memory). The actor's drop stops it (actix runs
/// `stopped`); the writer's drops the socket without its last flush; the permit's counts the
/// connection closed.
impl<W> Drop for SignedIn<W> {
    fn drop(&mut self) {
        self.outbox.forget_task();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A signed-in connection's task is paid by every idle endpoint, in tokio's 128-byte
    /// steps: tokio 1.54's task is its header (32 bytes), scheduler and id (16), the future's
    /// stage (8 more than the future) and its trailer (48), so a future of 536 bytes makes
    /// 640, and 544 would make 768 (128 bytes more per endpoint). With `--cfg tokio_unstable`
    /// the core has 8 bytes more and this bound would be 8 too high.
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
