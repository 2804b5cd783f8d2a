//! The bounded queue of frames towards one client, and the task that writes it to the socket.
//!
//! Every actor that talks to a client (its endpoint, its call legs, presence) holds a clone of
//! the [`Outbox`]. Pushing never blocks: a client that stops reading fills its queue and is
//! disconnected as a slow consumer instead of growing the node's memory. The writer takes the
//! whole queue at once and writes it as one batch.
//!
//! The queue is a `VecDeque` behind a mutex rather than a channel because a channel allocates
//! its first block of slots up front, which for an idle endpoint is most of its memory; the
//! deque allocates only when something is queued.
//!
//! A resumable session's outbox (docs/protocol.md §3 "Resuming") outlives its connection: the
//! writer numbers and keeps what it sends ([`kept`]), a lost connection only detaches the
//! writer (the endpoint is held, and what is pushed meanwhile waits in the queue), and a resume
//! attaches a new writer that first sends the new `welcome` and the frames the client missed.

mod kept;
pub use kept::CountError;
use kept::Kept;

use bytes::{Bytes, BytesMut};
use confab_protocol::ServerMsg;
use confab_protocol::hot::encode_server_frame;
use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Poll, Waker};
use std::time::Duration;
use tokio::io::{AsyncWrite, AsyncWriteExt};
use tokio::time::Sleep;
use tokio_util::either::Either;
use tokio_util::sync::CancellationToken;

use crate::endpoint::{Endpoint, OutboxClosed};
use crate::metrics as m;
use actix::WeakAddr;

/// A frame waiting in the queue: a message the writer encodes, or (cluster) a frame another
/// node encoded already, passed on byte for byte instead of decoded and encoded again.
enum Queued {
    Msg(ServerMsg),
    /// A frame's body, without its length prefix.
    Encoded(Bytes),
}

struct Queue {
    frames: VecDeque<Queued>,
    /// Approximate bytes of `frames` (see [`approx_size`]); at most `max_bytes`. A `u32`, like
    /// the bounds, so that the shared state fits the allocator's 128-byte class.
    bytes: u32,
    /// The writer has taken its last batch: nothing pushed now would ever be written.
    sealed: bool,
    /// A resumable session's numbering, kept frames and writer. Boxed: most sessions are not.
    resumable: Option<Box<Resumable>>,
    /// The idle writer, waiting for work (see [`Shared::poll_work`]); or the writer in the
    /// middle of a write, waiting for the close too (see [`Shared::poll_closed`]; a push then
    /// wakes it for nothing, which costs a poll of its write). A waker kept under the
    /// queue's lock rather than a `Notify`: the writer's wait on a `Notify` kept its 64-byte
    /// `Notified` in the writer's task, which every idle connection paid for; and whoever
    /// gives the writer work (a push, the close, a detach or a resume) holds this lock anyway.
    /// Only one writer at a time can wait here: a replaced writer is woken by the resume that
    /// replaces it (which takes its waker), and finds itself detached before it could wait again.
    waiter: Option<Waker>,
    /// The endpoint to tell when the outbox closes (see [`Outbox::tell_on_close`]). A weak
    /// address: 8 bytes here, where a future waiting for the close cost every endpoint a boxed
    /// future of 88 bytes; and it keeps no endpoint alive.
    endpoint: Option<WeakAddr<Endpoint>>,
    /// The task the endpoint's actor runs in, to wake when something the actor waits for is
    /// ready (see [`Outbox::actor_waker`]).
    task: Option<Waker>,
}

/// The writer side of a resumable session.
struct Resumable {
    kept: Kept,
    /// Which writer may take frames now (each attach takes the next number; a detach too, so
    /// that no writer matches while the endpoint is held).
    writer: u64,
    /// Cancelled when that writer is detached, or by the writer when its socket fails.
    link: CancellationToken,
    /// What the attached writer sends before anything queued: a resume's `welcome` and the
    /// frames the client missed.
    preface: Option<Bytes>,
}

struct Shared {
    queue: Mutex<Queue>,
    /// Closing: flush what is queued, then close. Set once, never cleared.
    closing: AtomicBool,
    /// Dropped as a slow consumer: stop writing at once, even in the middle of a write.
    /// (A flag, not a second token: a token costs an allocation per connection.)
    aborted: AtomicBool,
    /// In frames; a `u32` (saturated) so that the shared state fits the allocator's smaller
    /// size class.
    capacity: u32,
    /// In bytes; a `u32` (saturated) too.
    max_bytes: u32,
    /// Something the endpoint's actor waits for is ready: set by the actor's waker (see
    /// [`Outbox::actor_waker`]), taken by the task before it polls the actor.
    actor_woken: AtomicBool,
}

/// Sending side of a client's queue. Cheap to clone.
#[derive(Clone)]
pub struct Outbox {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for Outbox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Outbox")
            .field("closed", &self.shared.closing.load(Ordering::Acquire))
            .finish()
    }
}

/// Receiving side, owned by the writer.
pub struct OutboxReceiver {
    shared: Arc<Shared>,
    /// On a resumable session: which writer this is, and its link (see [`Resumable`]).
    link: Option<(u64, CancellationToken)>,
}

/// The attached writer of a resumable session, as its endpoint watches it.
#[derive(Clone)]
pub struct WriterLink {
    pub writer: u64,
    /// Cancelled when the writer's socket fails (or the writer is detached).
    pub lost: CancellationToken,
}

/// What the writer takes from the queue.
enum Taken {
    Nothing,
    Frames(BytesMut),
    /// A resumable session's frames, encoded (and numbered) under the queue's lock.
    Encoded(Bytes),
    /// This writer is no longer the session's (detached, or the session overflowed).
    Detached,
}

/// A queue of at most `capacity` frames and about `max_bytes` bytes.
pub fn outbox(capacity: usize, max_bytes: usize) -> (Outbox, OutboxReceiver) {
    let shared = Arc::new(Shared {
        queue: Mutex::new(Queue {
            frames: VecDeque::new(),
            bytes: 0,
            sealed: false,
            resumable: None,
            waiter: None,
            endpoint: None,
            task: None,
        }),
        closing: AtomicBool::new(false),
        aborted: AtomicBool::new(false),
        capacity: u32::try_from(capacity).unwrap_or(u32::MAX),
        max_bytes: u32::try_from(max_bytes).unwrap_or(u32::MAX),
        // The actor is polled once before anything wakes it.
        actor_woken: AtomicBool::new(true),
    });
    (
        Outbox {
            shared: shared.clone(),
        },
        OutboxReceiver { shared, link: None },
    )
}

impl Shared {
    fn lock(&self) -> std::sync::MutexGuard<'_, Queue> {
        match self.queue.lock() {
            Ok(q) => q,
            Err(poisoned) => poisoned.into_inner(),
        }
    }

    /// The writer's next batch. A resumable session's frames are encoded under the lock, so
    /// that their numbers and the bytes a resume replays always agree.
    fn take_batch(&self, link: Option<u64>) -> Taken {
        let mut q = self.lock();
        let Queue {
            frames,
            bytes,
            resumable,
            ..
        } = &mut *q;
        let Some(r) = resumable.as_deref_mut() else {
            if frames.is_empty() {
                return Taken::Nothing;
            }
            let (batch, approx) = (std::mem::take(frames), std::mem::take(bytes) as usize);
            drop(q);
            return Taken::Frames(encode_all(batch, approx));
        };
        if link != Some(r.writer) {
            return Taken::Detached;
        }
        if let Some(preface) = r.preface.take() {
            return Taken::Encoded(preface);
        }
        if frames.is_empty() {
            return Taken::Nothing;
        }
        let approx = std::mem::take(bytes) as usize;
        let mut buf = BytesMut::with_capacity(approx);
        let mut ends = Vec::with_capacity(frames.len());
        for frame in frames.drain(..) {
            encode_queued(&frame, &mut buf);
            ends.push(buf.len());
        }
        let buf = buf.freeze();
        if r.kept.keep(&buf, &ends).is_err() {
            drop(q);
            metrics::counter!(m::SLOW_CONSUMERS).increment(1);
            m::limit_tripped("max_unseen_frames");
            tracing::warn!(
                "client left too many frames unacknowledged; disconnecting it as a slow consumer"
            );
            self.aborted.store(true, Ordering::SeqCst);
            self.close();
            return Taken::Detached;
        }
        Taken::Encoded(buf)
    }

    /// The writer's last take: what is still queued, and no push is accepted after it (a push
    /// that passed the `closing` check just before the close would otherwise be lost while
    /// reporting success).
    fn seal(&self) -> (VecDeque<Queued>, usize) {
        let mut q = self.lock();
        q.sealed = true;
        (
            std::mem::take(&mut q.frames),
            std::mem::take(&mut q.bytes) as usize,
        )
    }

    /// Ready once the outbox is closing, for the writer `link` in the middle of a write;
    /// otherwise its waker is left where the close finds it (the queue's one waker slot, which
    /// an idle writer uses: a writing one is not idle). A writer that is no longer the
    /// session's leaves nothing: it would take the slot from the writer that replaced it, and
    /// its own end comes from its link. Not a `Notify` beside the flag: that took 32 bytes of
    /// every connection's shared state, and put it in the allocator's next size class.
    fn poll_closed(&self, link: Option<u64>, cx: &mut std::task::Context<'_>) -> Poll<()> {
        if self.closing.load(Ordering::Acquire) {
            return Poll::Ready(());
        }
        let mut q = self.lock();
        // Read again under the lock: a close that set the flag after it takes the waker under
        // the same lock (see `close`).
        if self.closing.load(Ordering::Acquire) {
            return Poll::Ready(());
        }
        if q.resumable
            .as_deref()
            .is_some_and(|r| link != Some(r.writer))
        {
            return Poll::Pending;
        }
        if !q.waiter.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
            q.waiter = Some(cx.waker().clone());
        }
        Poll::Pending
    }

    fn close(&self) {
        self.closing.store(true, Ordering::Release);
        // Wakes an idle writer, or one in the middle of a write (`poll_closed`). The flag is
        // set before the lock is taken, so a writer that looks at the queue after this sees it,
        // and one that looked before left its waker; the same holds for the endpoint's
        // registration (`tell_on_close`).
        let (waiter, endpoint) = {
            let mut q = self.lock();
            (q.waiter.take(), q.endpoint.take())
        };
        if let Some(w) = waiter {
            w.wake();
        }
        if let Some(endpoint) = endpoint.and_then(|e| e.upgrade()) {
            endpoint.do_send(OutboxClosed);
        }
    }

    /// Ready when the writer `link` has something to do: frames or a preface to write, the
    /// close, or learning that it was detached. Otherwise its waker is left for whoever gives
    /// it work, checked and left under the one lock so that no wake-up is lost.
    fn poll_work(&self, link: Option<u64>, cx: &mut std::task::Context<'_>) -> Poll<()> {
        let mut q = self.lock();
        let detached_or_preface = q
            .resumable
            .as_deref()
            .is_some_and(|r| link != Some(r.writer) || r.preface.is_some());
        if !q.frames.is_empty() || detached_or_preface || self.closing.load(Ordering::Acquire) {
            return Poll::Ready(());
        }
        if !q.waiter.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
            q.waiter = Some(cx.waker().clone());
        }
        Poll::Pending
    }
}

/// The waker of the endpoint's actor (see [`Outbox::actor_waker`]).
impl std::task::Wake for Shared {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    /// Takes the queue's lock: nothing may wake the actor while holding it (a link is
    /// cancelled, the endpoint told of the close, after the lock is let go).
    fn wake_by_ref(self: &Arc<Self>) {
        self.actor_woken.store(true, Ordering::Release);
        // Cloned under the lock, woken outside it: the wake may run the task's scheduling.
        let task = self.lock().task.clone();
        if let Some(task) = task {
            task.wake();
        }
    }
}

impl Outbox {
    /// Queues `msg`. A full queue closes the connection (slow consumer) and returns false; so
    /// does a connection that is already closing.
    pub fn push(&self, msg: ServerMsg) -> bool {
        let size = approx_size(&msg);
        self.enqueue(Queued::Msg(msg), size)
    }

    /// Queues a frame encoded elsewhere (its body, without the length prefix), as [`push`]
    /// queues a message: a cluster node passes on another node's `message_received` this way.
    ///
    /// [`push`]: Outbox::push
    pub fn push_encoded(&self, body: Bytes) -> bool {
        let size = body.len() + confab_protocol::codec::LEN_PREFIX;
        self.enqueue(Queued::Encoded(body), size)
    }

    fn enqueue(&self, frame: Queued, size: usize) -> bool {
        let s = &*self.shared;
        if s.closing.load(Ordering::Acquire) {
            return false;
        }
        let waiter = {
            let Ok(mut q) = s.queue.lock() else {
                return false;
            };
            if q.sealed {
                return false;
            }
            let capacity = s.capacity as usize;
            if q.frames.len() >= capacity || q.bytes as usize + size > s.max_bytes as usize {
                let by_bytes = q.frames.len() < capacity;
                drop(q);
                metrics::counter!(m::SLOW_CONSUMERS).increment(1);
                if by_bytes {
                    m::limit_tripped("outbound_queue_bytes");
                }
                tracing::warn!("client stopped reading; disconnecting it as a slow consumer");
                s.aborted.store(true, Ordering::SeqCst);
                s.close();
                return false;
            }
            // Fits: `bytes + size` is at most `max_bytes`, a `u32`.
            q.bytes = q
                .bytes
                .saturating_add(u32::try_from(size).unwrap_or(u32::MAX));
            q.frames.push_back(frame);
            // An idle writer leaves its waker only while the queue is empty and it empties the
            // whole queue each time it wakes, so only the first frame of a batch finds one; a
            // writer blocked in the middle of a write (a client reading slowly) leaves it again
            // at each poll, so each push wakes it for one look (see `Queue::waiter`).
            q.waiter.take()
        };
        if let Some(w) = waiter {
            w.wake();
        }
        true
    }

    /// Asks the writer to flush what is queued and close the socket.
    pub fn close(&self) {
        self.shared.close();
    }

    /// Has `endpoint` sent [`OutboxClosed`] once the outbox closes, for whatever reason (at
    /// once if it is closed already). One endpoint at a time: a later call replaces it.
    pub fn tell_on_close(&self, endpoint: WeakAddr<Endpoint>) {
        let s = &*self.shared;
        let mut q = s.lock();
        // Read under the lock: a close that set the flag after this read takes the address
        // from the queue under the same lock (see `Shared::close`).
        if s.closing.load(Ordering::Acquire) {
            drop(q);
            if let Some(endpoint) = endpoint.upgrade() {
                endpoint.do_send(OutboxClosed);
            }
            return;
        }
        q.endpoint = Some(endpoint);
    }

    /// Makes the session resumable, before its writer starts and its `welcome` is queued (the
    /// welcome is frame 0). Returns the first writer's receiver side and its link.
    pub fn make_resumable(
        &self,
        rx: &mut OutboxReceiver,
        max_frames: usize,
        max_bytes: usize,
    ) -> WriterLink {
        let link = CancellationToken::new();
        self.shared.lock().resumable = Some(Box::new(Resumable {
            kept: Kept::new(max_frames, max_bytes),
            writer: 1,
            link: link.clone(),
            preface: None,
        }));
        rx.link = Some((1, link.clone()));
        WriterLink {
            writer: 1,
            lost: link,
        }
    }

    /// Whether `link` is still the session's writer (not detached nor replaced; it may have
    /// failed).
    pub fn is_current(&self, link: &WriterLink) -> bool {
        self.shared
            .lock()
            .resumable
            .as_ref()
            .is_some_and(|r| r.writer == link.writer)
    }

    /// The connection is gone: the writer stops (its socket is dropped), what is pushed from
    /// now on waits in the queue for a resume.
    pub fn detach(&self) {
        let mut q = self.shared.lock();
        let link = q.resumable.as_deref_mut().map(|r| {
            r.writer += 1;
            r.preface = None;
            r.link.clone()
        });
        // An idle writer waits for work alone: woken, it finds itself detached and stops.
        let waiter = q.waiter.take();
        drop(q);
        // Cancelled outside the lock, as every wake-up is: the endpoint's actor may wait on the
        // link with the waker that takes this lock (`actor_waker`).
        if let Some(link) = link {
            link.cancel();
        }
        if let Some(w) = waiter {
            w.wake();
        }
    }

    /// The client acknowledged the frames up to `upto`.
    pub fn client_saw(&self, upto: u64) -> Result<(), CountError> {
        match self.shared.lock().resumable.as_deref_mut() {
            Some(r) => r.kept.saw(upto),
            None => Ok(()),
        }
    }

    /// A resume where the client read the frames up to `seen`: detaches the writer in place
    /// and attaches a new one that sends `welcome`, then every kept frame after `seen`, then
    /// what is queued. `None` when the session is not resumable.
    pub fn resume(
        &self,
        seen: u64,
        welcome: &ServerMsg,
    ) -> Option<Result<(OutboxReceiver, WriterLink), CountError>> {
        let mut q = self.shared.lock();
        let r = q.resumable.as_deref_mut()?;
        let replay = match r.kept.replay_after(seen) {
            Ok(replay) => replay,
            Err(e) => return Some(Err(e)),
        };
        let mut preface = BytesMut::new();
        if let Err(e) = encode_server_frame(welcome, &mut preface) {
            tracing::error!(error = %e, "could not encode a welcome");
        }
        for frame in &replay {
            preface.extend_from_slice(frame);
        }
        let old_link = std::mem::replace(&mut r.link, CancellationToken::new());
        r.writer += 1;
        r.preface = Some(preface.freeze());
        let link = WriterLink {
            writer: r.writer,
            lost: r.link.clone(),
        };
        // Wakes the old writer if it is idle, so it finds itself detached and stops (a new
        // writer looks at the queue before it first waits, so it needs no wake-up). Its waker
        // is taken here, under the lock that detaches it: the new writer's cannot be.
        let waiter = q.waiter.take();
        drop(q);
        // Outside the lock (see `detach`).
        old_link.cancel();
        if let Some(w) = waiter {
            w.wake();
        }
        Some(Ok((
            OutboxReceiver {
                shared: self.shared.clone(),
                link: Some((link.writer, link.lost.clone())),
            },
            link,
        )))
    }

    /// The waker the endpoint's actor is polled with when it shares its task with this
    /// outbox's writer (`connection_task.rs`): it notes that the actor has something to do,
    /// then wakes `task`, so that the task's wake-ups for the writer alone (a push, a coalescing
    /// round) do not poll the actor too. A clone of this outbox's shared state, not a new
    /// allocation: every idle connection would pay for one.
    pub fn actor_waker(&self, task: &Waker) -> Waker {
        {
            let mut q = self.shared.lock();
            if !q.task.as_ref().is_some_and(|t| t.will_wake(task)) {
                q.task = Some(task.clone());
            }
        }
        Waker::from(self.shared.clone())
    }

    /// Whether the actor's waker was woken since the last call (the actor must be polled).
    pub fn take_actor_wake(&self) -> bool {
        self.shared.actor_woken.swap(false, Ordering::AcqRel)
    }

    /// The task is done (or dropped): it is not woken again, and the shared state, which
    /// outlives it in the clones other actors hold, keeps none of its wakers (and so not its
    /// memory): the actor's, nor the writer's if it was left in the waiter slot.
    pub fn forget_task(&self) {
        let (task, waiter) = {
            let mut q = self.shared.lock();
            let task = q.task.take();
            let same = task
                .as_ref()
                .zip(q.waiter.as_ref())
                .is_some_and(|(t, w)| w.will_wake(t));
            (task, if same { q.waiter.take() } else { None })
        };
        // Dropped outside the lock: the last waker of a task frees it.
        drop((task, waiter));
    }

    /// Frames sent and kept for a resume now (0 when the session is not resumable).
    pub fn kept_frames(&self) -> usize {
        self.shared
            .lock()
            .resumable
            .as_ref()
            .map_or(0, |r| r.kept.len())
    }
}

/// How long a closing connection may take to flush its last frames.
const FLUSH_DEADLINE: Duration = Duration::from_secs(2);

/// Completes when the timer, if there is one, fires.
async fn expired(timer: &mut Option<Pin<Box<Sleep>>>) {
    match timer {
        Some(t) => t.as_mut().await,
        None => std::future::pending().await,
    }
}

/// Completes when `link` is cancelled; never without one.
async fn unlinked(link: &Option<(u64, CancellationToken)>) {
    match link {
        Some((_, l)) => l.cancelled().await,
        None => std::future::pending().await,
    }
}

/// Writes queued frames until the outbox is closed, then flushes and shuts the socket down.
/// A resumable session's writer instead just stops when it is detached, and when its socket
/// fails it says so through its link (the endpoint is then held) rather than closing.
pub fn write_loop<W>(out: OutboxReceiver, sock: W) -> WriteLoop<W>
where
    W: AsyncWrite + Unpin + Send + 'static,
{
    WriteLoop {
        state: State::Idle {
            out,
            sock,
            rounds: 0,
        },
    }
}

/// The writer's future (see [`write_loop`]), run in its endpoint's task or alone.
///
/// It lives as long as its connection, so its size is paid by every idle one: it is written
/// by hand rather than as an `async fn`, whose state machine kept its arguments twice and its
/// wait's future beside them (176 bytes, and the task a 128-byte class larger). Idle, it holds
/// the receiver and the socket and nothing else; a batch's write and the final flush, each
/// with timers and several futures in flight, run in a boxed future of their own that owns the
/// two while it runs and hands them back (one allocation per batch written, as before).
pub struct WriteLoop<W> {
    state: State<W>,
}

/// What a batch's write or the final flush hands back: the receiver and the socket to go on
/// with, or `None` when the writer is done.
type Busy<W> = Pin<Box<dyn Future<Output = Option<(OutboxReceiver, W)>> + Send>>;

enum State<W> {
    /// Waiting for work; or, woken, letting the worker run its other tasks `rounds` more times
    /// before taking the queue (see [`COALESCE_ROUNDS`]).
    Idle {
        out: OutboxReceiver,
        sock: W,
        rounds: u8,
    },
    Busy(Busy<W>),
    Done,
}

impl<W> Future for WriteLoop<W>
where
    W: AsyncWrite + Unpin + Send + 'static,
{
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> Poll<()> {
        let state = &mut self.get_mut().state;
        loop {
            match state {
                State::Done => return Poll::Ready(()),
                State::Busy(busy) => {
                    let Poll::Ready(next) = busy.as_mut().poll(cx) else {
                        return Poll::Pending;
                    };
                    *state = match next {
                        Some((out, sock)) => State::Idle {
                            out,
                            sock,
                            rounds: 0,
                        },
                        None => State::Done,
                    };
                }
                State::Idle { rounds, out, .. } if *rounds > 0 => {
                    // A closing writer flushes at once.
                    if out.shared.closing.load(Ordering::Acquire) {
                        *rounds = 0;
                        continue;
                    }
                    *rounds -= 1;
                    // One round of `tokio::task::yield_now`: its first poll has the scheduler
                    // wake this task after the others ready now (and after the I/O driver's
                    // next turn), and returns pending; nothing of it needs keeping.
                    let round = std::pin::pin!(tokio::task::yield_now());
                    if round.poll(cx).is_pending() {
                        return Poll::Pending;
                    }
                }
                State::Idle { out, .. } => {
                    let s = &*out.shared;
                    let link = out.link.as_ref().map(|(w, _)| *w);
                    let buf = match s.take_batch(link) {
                        Taken::Detached => {
                            *state = State::Done;
                            return Poll::Ready(());
                        }
                        Taken::Frames(buf) => Either::Left(buf),
                        Taken::Encoded(buf) => Either::Right(buf),
                        Taken::Nothing if s.closing.load(Ordering::Acquire) => {
                            let State::Idle { out, sock, .. } =
                                std::mem::replace(state, State::Done)
                            else {
                                unreachable!("matched as idle above");
                            };
                            if !out.shared.aborted.load(Ordering::SeqCst) {
                                *state = State::Busy(Box::pin(finish(out, sock)));
                            } else {
                                out.shared.seal();
                            }
                            continue;
                        }
                        Taken::Nothing => {
                            // One wait for every reason to wake: a push, the close, a detach
                            // and a resume each wake the waker `poll_work` leaves (a detached
                            // writer learns it from `take_batch`). No break on the close once
                            // woken: a writer replaced by a resume learns it only from
                            // `take_batch`, and breaking would have it flush the queue to its
                            // old socket. The current writer drains the queue, then finishes
                            // above.
                            let ready = s.poll_work(link, cx).is_ready();
                            // Woken (or work came in meanwhile), the writer coalesces before it
                            // takes the queue: the rounds are set before the task sleeps, or the
                            // poll after the wake would take the queue at once.
                            if let State::Idle { rounds, .. } = state {
                                *rounds = COALESCE_ROUNDS;
                            }
                            if !ready {
                                return Poll::Pending;
                            }
                            continue;
                        }
                    };
                    let State::Idle { out, sock, .. } = std::mem::replace(state, State::Done)
                    else {
                        unreachable!("matched as idle above");
                    };
                    *state = State::Busy(Box::pin(batch(out, sock, buf)));
                }
            }
        }
    }
}

/// Writes one batch; hands the receiver and the socket back unless the writer is done.
async fn batch<W: AsyncWrite + Unpin>(
    out: OutboxReceiver,
    mut sock: W,
    buf: Either<BytesMut, Bytes>,
) -> Option<(OutboxReceiver, W)> {
    let s = &*out.shared;
    match write_batch(s, &out.link, &mut sock, buf).await {
        Written::Done => Some((out, sock)),
        Written::Unlinked => None,
        Written::Failed => {
            if let Some((_, link)) = &out.link
                && !s.closing.load(Ordering::Acquire)
            {
                // The socket failed: the endpoint holds the session for a resume.
                link.cancel();
                return None;
            }
            s.close();
            s.seal();
            None
        }
    }
}

/// Closing: what was queued before the close (an error, a `shutdown`, the last call events)
/// still goes out, within a deadline so a client that stopped reading cannot hold us.
async fn finish<W: AsyncWrite + Unpin>(
    out: OutboxReceiver,
    mut sock: W,
) -> Option<(OutboxReceiver, W)> {
    let (batch, bytes) = out.shared.seal();
    let buf = encode_all(batch, bytes);
    let _ = tokio::time::timeout(FLUSH_DEADLINE, async {
        let _ = sock.write_all(&buf).await;
        let _ = sock.shutdown().await;
    })
    .await;
    None
}

/// How a batch's write ended.
enum Written {
    Done,
    /// The socket failed, the write was aborted (slow consumer), or a graceful close's
    /// deadline passed before the write finished.
    Failed,
    /// The writer was detached from its resumable session: it stops at once.
    Unlinked,
}

/// Writes one batch (see [`write_loop`]).
async fn write_batch<W: AsyncWrite + Unpin>(
    s: &Shared,
    link: &Option<(u64, CancellationToken)>,
    sock: &mut W,
    buf: Either<BytesMut, Bytes>,
) -> Written {
    let buf: &[u8] = match &buf {
        Either::Left(b) => b,
        Either::Right(b) => b,
    };
    let link_id = link.as_ref().map(|(w, _)| *w);
    // A client that stopped reading blocks this write for good: the abort (slow consumer)
    // ends it, and dropping the socket frees the connection's slot.
    //
    // The flush matters for TLS: rustls takes the bytes into its buffer and may leave
    // ciphertext there when the socket would block, until something flushes it. On plain TCP
    // it does nothing.
    let mut write = std::pin::pin!(async {
        sock.write_all(buf).await?;
        sock.flush().await
    });
    // Armed by a graceful close: the write in progress gets FLUSH_DEADLINE to finish, like the
    // final flush, so a client that stopped reading cannot hold the socket. Boxed and made only
    // then: most writes are never interrupted.
    let mut flush_by: Option<Pin<Box<Sleep>>> = None;
    loop {
        let closing = flush_by.is_some();
        tokio::select! {
            r = &mut write => {
                return if r.is_ok() { Written::Done } else { Written::Failed };
            }
            () = std::future::poll_fn(|cx| s.poll_closed(link_id, cx)), if !closing => {
                if s.aborted.load(Ordering::SeqCst) {
                    return Written::Failed;
                }
                // A graceful close: finish this write, then flush the rest below.
                flush_by = Some(Box::pin(tokio::time::sleep(FLUSH_DEADLINE)));
            }
            () = expired(&mut flush_by), if closing => return Written::Failed,
            () = unlinked(link), if !closing => return Written::Unlinked,
        }
    }
}

/// Scheduler rounds the writer waits, once woken, before it takes the queue: the worker runs
/// its other ready tasks a few times before the write, so that what they produce for this
/// client in the meantime (the rest of a call's events: its `call_state`s, `call_ringing`, the
/// answer to a request) shares one write. On an idle worker the run queue is empty and the
/// rounds pass at once. Measured with the `calls` scenario: 11.3 `sendto` per forked call
/// without them, 8.5 with them, and calls per second up by about a tenth.
const COALESCE_ROUNDS: u8 = 3;

/// Roughly what a message costs queued: a fixed part (the tag, ids, numbers) plus every string
/// whose length a client can choose (bodies, SDPs, content types, URIs, echoed text). Exact
/// sizes would need encoding; the bound only has to stop a queue from growing without limit,
/// and it must count every such string, or a peer could fill the queue far past
/// `limits.outbound_queue_bytes` with frames it counts as small (a long `content_type` on a
/// one-byte message).
fn approx_size(msg: &ServerMsg) -> usize {
    const BASE: usize = 160;
    let remote = |r: &confab_protocol::Remote| r.user.len() + r.endpoint.len();
    BASE + match msg {
        ServerMsg::MessageReceived {
            from,
            content_type,
            body,
            ..
        } => from.len() + content_type.len() + body.len(),
        ServerMsg::CallIncoming {
            from, toast, sdp, ..
        } => {
            from.len()
                + sdp.len()
                + toast
                    .as_ref()
                    .map_or(0, |t| t.content_type.len() + t.body.len())
        }
        ServerMsg::CallEstablished { sdp, remote: r, .. } => sdp.len() + remote(r),
        ServerMsg::CallTransferred { remote: r, .. } => remote(r),
        ServerMsg::CallForwarded { to, .. } => to.len(),
        ServerMsg::Error { message, .. } => message.len(),
        ServerMsg::MessageFailed { text, .. } => text.len(),
        ServerMsg::Presence {
            user,
            most_active,
            endpoints,
            ..
        } => {
            user.len()
                + most_active.as_ref().map_or(0, String::len)
                + endpoints.as_ref().map_or(0, |e| {
                    e.iter()
                        .map(|p| p.endpoint.len() + p.device.len() + 32)
                        .sum()
                })
        }
        _ => 0,
    }
}

/// Encodes `batch` into one buffer, sized from the queue's estimate (`approx_size` errs high)
/// so it is not reallocated and copied as it fills.
fn encode_all(batch: VecDeque<Queued>, approx_bytes: usize) -> BytesMut {
    let mut buf = BytesMut::with_capacity(approx_bytes);
    for frame in &batch {
        encode_queued(frame, &mut buf);
    }
    buf
}

/// Appends one queued frame, with its length prefix, to `buf`.
fn encode_queued(frame: &Queued, buf: &mut BytesMut) {
    match frame {
        Queued::Msg(msg) => {
            if let Err(e) = encode_server_frame(msg, buf) {
                // Our own messages always encode; if one ever does not, say so instead of dying.
                tracing::error!(error = %e, "could not encode a frame for a client");
            }
        }
        Queued::Encoded(body) => {
            // The other node's frame passed the codec's size limit there; a body over
            // u32::MAX cannot have come through an envelope.
            let Ok(len) = u32::try_from(body.len()) else {
                tracing::error!("dropping a passed-on frame too long to send");
                return;
            };
            buf.reserve(confab_protocol::codec::LEN_PREFIX + body.len());
            buf.extend_from_slice(&len.to_be_bytes());
            buf.extend_from_slice(body);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use confab_protocol::Body;

    fn big_message(bytes: usize) -> ServerMsg {
        ServerMsg::MessageReceived {
            call: "c".into(),
            msg: 1,
            from: "sip:a@example.com".into(),
            content_type: "text/plain".into(),
            body: Body::Text("x".repeat(bytes)),
            toast: None,
        }
    }

    /// Every string a client can make long counts toward the queue's byte bound: each of
    /// these messages, with 10 kB in every such string, is counted at least at its encoded size.
    #[test]
    fn the_size_estimate_covers_every_string_a_client_chooses() {
        use confab_protocol::{Availability, ErrorCode, Remote, Toast};
        let long = "x".repeat(10_000);
        let remote = Remote {
            user: long.clone(),
            endpoint: long.clone(),
        };
        let messages = [
            ServerMsg::MessageReceived {
                call: "c".into(),
                msg: 1,
                from: long.clone(),
                content_type: long.clone(),
                body: Body::Text(long.clone()),
                toast: Some(true),
            },
            ServerMsg::CallIncoming {
                call: "c".into(),
                conversation: "v".into(),
                from: long.clone(),
                toast: Some(Toast {
                    content_type: long.clone(),
                    body: Body::Text(long.clone()),
                }),
                sdp: long.clone(),
                immediate_auto_accept: false,
            },
            ServerMsg::CallEstablished {
                call: "c".into(),
                sdp: long.clone(),
                remote: remote.clone(),
            },
            ServerMsg::CallTransferred {
                call: "c".into(),
                remote,
            },
            ServerMsg::CallForwarded {
                call: "c".into(),
                to: long.clone(),
            },
            ServerMsg::error(Some(1), ErrorCode::UnknownType, &long),
            ServerMsg::MessageFailed {
                rid: Some(1),
                call: "c".into(),
                msg: None,
                code: 415,
                text: long.clone(),
            },
            ServerMsg::Presence {
                user: long.clone(),
                availability: Availability::Available,
                most_active: Some(long.clone()),
                endpoints: None,
                status: None,
            },
        ];
        for msg in &messages {
            let mut buf = BytesMut::new();
            encode_server_frame(msg, &mut buf).expect("encodes");
            assert!(
                approx_size(msg) >= buf.len(),
                "{} counted {} for {} encoded bytes",
                &format!("{msg:?}")[..40],
                approx_size(msg),
                buf.len()
            );
        }
    }

    /// The writer's future is paid by every idle connection: it holds the receiver and the
    /// socket, nothing more (a regression here moves every connection's task into the
    /// allocator's next 128-byte class).
    #[test]
    fn an_idle_writer_holds_little() {
        let size = std::mem::size_of::<WriteLoop<crate::transport::ClientWriter>>();
        assert!(size <= 64, "the writer's future takes {size} bytes");
    }

    /// Every connection pays for the shared state, with the `Arc`'s two counts (16 bytes): at
    /// 112 bytes or less it takes the allocator's 128-byte class, where a `Notify` for the
    /// close (32 bytes more) put it in 160.
    #[test]
    fn the_shared_state_stays_in_its_size_class() {
        let size = std::mem::size_of::<Shared>();
        assert!(size <= 112, "the outbox's shared state takes {size} bytes");
    }

    #[tokio::test]
    async fn a_push_after_the_writers_last_take_reports_failure() {
        let (outbox, rx) = outbox(16, 1 << 20);
        assert!(outbox.push(ServerMsg::Ok { rid: Some(1) }));
        // The writer's last take, as at the end of a close; `closing` is not even set yet.
        let (last, _) = rx.shared.seal();
        assert_eq!(last.len(), 1);
        assert!(!outbox.push(ServerMsg::Ok { rid: Some(2) }));
    }

    /// A socket that counts the writes it is asked for.
    struct CountingSocket(std::sync::Arc<std::sync::atomic::AtomicUsize>);

    impl AsyncWrite for CountingSocket {
        fn poll_write(
            self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
            buf: &[u8],
        ) -> std::task::Poll<std::io::Result<usize>> {
            self.0.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            std::task::Poll::Ready(Ok(buf.len()))
        }

        fn poll_flush(
            self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
        ) -> std::task::Poll<std::io::Result<()>> {
            std::task::Poll::Ready(Ok(()))
        }

        fn poll_shutdown(
            self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
        ) -> std::task::Poll<std::io::Result<()>> {
            std::task::Poll::Ready(Ok(()))
        }
    }

    /// A writer woken from its sleep lets the worker run a few rounds before it takes the
    /// queue, so frames its other tasks queue meanwhile go in the same write (a forked call's
    /// frames to one device: 9.6 writes per call with this, 11.6 without, when a first version
    /// of the hand-written writer lost it).
    #[tokio::test(flavor = "current_thread")]
    async fn a_woken_writer_coalesces_what_comes_in_its_rounds() {
        let writes = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let (outbox, rx) = outbox(16, 1 << 20);
        let writer = tokio::spawn(write_loop(rx, CountingSocket(writes.clone())));
        // The writer runs and goes to sleep on the empty queue.
        tokio::task::yield_now().await;
        assert!(outbox.push(ServerMsg::Ok { rid: Some(1) }));
        // One round later, another frame: the writer, woken by the first, is still waiting.
        tokio::task::yield_now().await;
        assert!(outbox.push(ServerMsg::Ok { rid: Some(2) }));
        for _ in 0..10 {
            tokio::task::yield_now().await;
        }
        assert_eq!(
            writes.load(std::sync::atomic::Ordering::SeqCst),
            1,
            "both frames went in one write"
        );
        outbox.close();
        writer.await.expect("the writer ends");
    }

    /// A client that stopped reading must not hold a closing connection (and its slot) for
    /// good: the write under way gets the flush deadline, like the final flush.
    #[tokio::test(start_paused = true)]
    async fn a_graceful_close_ends_even_if_the_client_never_reads() {
        let (outbox, rx) = outbox(16, 1 << 20);
        // A peer that never reads: 64 bytes of buffer, then every write blocks.
        let (sock, _peer) = tokio::io::duplex(64);
        let writer = tokio::spawn(write_loop(rx, sock));
        assert!(outbox.push(big_message(10_000)));
        // Let the writer start its write and block on it.
        for _ in 0..10 {
            tokio::task::yield_now().await;
        }
        assert!(!writer.is_finished());
        outbox.close();
        let started = tokio::time::Instant::now();
        tokio::time::timeout(FLUSH_DEADLINE * 3, writer)
            .await
            .expect("the writer gives up within the flush deadline")
            .expect("the writer does not panic");
        assert!(started.elapsed() >= FLUSH_DEADLINE);
    }

    /// A writer replaced by a resume in the middle of a write must not take the waker slot
    /// from the writer that replaced it: the new one would then sleep through every push.
    /// (The old writer is polled once more after the new one went idle, which the scheduler
    /// may do in either order; its `select!` polls its branches in a random order, so the
    /// scenario is repeated.)
    #[tokio::test(flavor = "current_thread")]
    async fn a_replaced_writer_leaves_the_new_writer_its_wake_ups() {
        for _ in 0..32 {
            let (outbox, mut rx) = outbox(16, 1 << 20);
            outbox.make_resumable(&mut rx, 64, 1 << 20);
            // The first writer blocks in the middle of a write to a client that stopped reading.
            let (sock, _peer) = tokio::io::duplex(64);
            let mut old = Box::pin(write_loop(rx, sock));
            assert!(outbox.push(big_message(10_000)));
            for _ in 0..4 {
                assert!(futures::poll!(&mut old).is_pending());
            }
            let Some(Ok((rx, _link))) = outbox.resume(0, &ServerMsg::Ok { rid: None }) else {
                panic!("the session resumes");
            };
            let writes = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
            let new = tokio::spawn(write_loop(rx, CountingSocket(writes.clone())));
            for _ in 0..10 {
                tokio::task::yield_now().await;
            }
            let before = writes.load(std::sync::atomic::Ordering::SeqCst);
            // The old writer, polled after the new one went idle, ends.
            let _ = futures::poll!(&mut old);
            assert!(outbox.push(ServerMsg::Ok { rid: Some(1) }));
            for _ in 0..10 {
                tokio::task::yield_now().await;
            }
            assert!(
                writes.load(std::sync::atomic::Ordering::SeqCst) > before,
                "the new writer was woken by the push"
            );
            outbox.close();
            new.await.expect("the new writer ends");
        }
    }

    /// The endpoint's actor waits on its writer's link with the waker `actor_waker` gives,
    /// which takes the queue's lock: a detach or a resume that cancelled the link under that
    /// lock hung the endpoint's worker for good (a resumed session's tests caught it).
    #[test]
    fn cancelling_a_writers_link_wakes_the_actor_without_holding_the_lock() {
        let (done_tx, done_rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let (outbox, mut rx) = outbox(16, 1 << 20);
            let link = outbox.make_resumable(&mut rx, 64, 1 << 20);
            let task = std::task::Waker::noop();
            let waker = outbox.actor_waker(task);
            let mut cx = std::task::Context::from_waker(&waker);
            let mut lost = Box::pin(link.lost.cancelled_owned());
            assert!(lost.as_mut().poll(&mut cx).is_pending());
            let _ = outbox.take_actor_wake();
            outbox.detach();
            assert!(outbox.take_actor_wake(), "the detach woke the actor");
            let mut lost = Box::pin(
                match outbox.resume(0, &ServerMsg::Ok { rid: None }) {
                    Some(Ok((_, link))) => link,
                    _ => panic!("the session resumes"),
                }
                .lost
                .cancelled_owned(),
            );
            assert!(lost.as_mut().poll(&mut cx).is_pending());
            assert!(outbox.resume(0, &ServerMsg::Ok { rid: None }).is_some());
            assert!(outbox.take_actor_wake(), "the resume woke the actor");
            let _ = done_tx.send(());
        });
        done_rx
            .recv_timeout(Duration::from_secs(10))
            .expect("neither the detach nor the resume hangs");
    }
}
