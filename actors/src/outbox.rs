//! The bounded queue of frames towards one client, and the task that writes it to the socket.
//!
//! Every actor that talks to a client (its endpoint, its call legs, presence) holds a clone of
//! the [`Outbox`]. Pushing never blocks: a client that stops reading fills its queue and is
//! disconnected as a slow consumer instead of growing the node's memory. The writer batches
//! whatever is queued into one socket write.

use bytes::BytesMut;
use confab_protocol::ServerMsg;
use confab_protocol::codec::encode_frame;
use std::time::Duration;
use tokio::io::{AsyncWrite, AsyncWriteExt};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::metrics as m;

/// Sending side of a client's queue. Cheap to clone.
#[derive(Clone, Debug)]
pub struct Outbox {
    tx: mpsc::Sender<ServerMsg>,
    closed: CancellationToken,
}

/// Receiving side, owned by the writer task.
pub struct OutboxReceiver {
    rx: mpsc::Receiver<ServerMsg>,
    closed: CancellationToken,
}

/// A queue of `capacity` frames.
pub fn outbox(capacity: usize) -> (Outbox, OutboxReceiver) {
    let (tx, rx) = mpsc::channel(capacity);
    let closed = CancellationToken::new();
    (
        Outbox {
            tx,
            closed: closed.clone(),
        },
        OutboxReceiver { rx, closed },
    )
}

impl Outbox {
    /// Queues `msg`. A full queue closes the connection (slow consumer) and returns false.
    pub fn push(&self, msg: ServerMsg) -> bool {
        match self.tx.try_send(msg) {
            Ok(()) => true,
            Err(mpsc::error::TrySendError::Full(_)) => {
                if !self.closed.is_cancelled() {
                    metrics::counter!(m::SLOW_CONSUMERS).increment(1);
                    tracing::warn!("client stopped reading; disconnecting it as a slow consumer");
                    self.closed.cancel();
                }
                false
            }
            Err(mpsc::error::TrySendError::Closed(_)) => false,
        }
    }

    /// Asks the writer to flush what is queued and close the socket.
    pub fn close(&self) {
        self.closed.cancel();
    }

    /// Completes once the connection is closing, for whatever reason.
    pub fn closed(&self) -> CancellationToken {
        self.closed.clone()
    }
}

/// Largest batch written in one go; bounds the writer's buffer.
const BATCH_BYTES: usize = 64 * 1024;
/// How long a closing connection may take to flush its last frames.
const FLUSH_DEADLINE: Duration = Duration::from_secs(2);

/// Writes queued frames until the outbox is closed, then flushes and shuts the socket down.
pub async fn write_loop<W: AsyncWrite + Unpin>(mut out: OutboxReceiver, mut sock: W) {
    let mut buf = BytesMut::with_capacity(4096);
    loop {
        let first = tokio::select! {
            biased;
            msg = out.rx.recv() => msg,
            () = out.closed.cancelled() => None,
        };
        let Some(first) = first else { break };
        encode_into(&first, &mut buf);
        while buf.len() < BATCH_BYTES {
            match out.rx.try_recv() {
                Ok(msg) => encode_into(&msg, &mut buf),
                Err(_) => break,
            }
        }
        if sock.write_all(&buf).await.is_err() {
            out.closed.cancel();
            return;
        }
        buf.clear();
    }
    // Closing: what was queued before the close (an error, a `shutdown`, the last call events)
    // still goes out, within a deadline so a client that stopped reading cannot hold us.
    out.rx.close();
    while let Ok(msg) = out.rx.try_recv() {
        encode_into(&msg, &mut buf);
    }
    let _ = tokio::time::timeout(FLUSH_DEADLINE, async {
        let _ = sock.write_all(&buf).await;
        let _ = sock.shutdown().await;
    })
    .await;
}

fn encode_into(msg: &ServerMsg, buf: &mut BytesMut) {
    if let Err(e) = encode_frame(msg, buf) {
        // Our own messages always encode; if one ever does not, say so instead of dying.
        tracing::error!(error = %e, "could not encode a frame for a client");
    }
}
