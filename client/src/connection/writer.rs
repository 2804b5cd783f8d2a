//! The writer task of one link: the only place that writes to its socket. It drains the
//! link's queue of encoded frames and flushes once per burst, so a busy endpoint costs one
//! syscall per burst instead of one per frame.

use bytes::Bytes;
use futures::SinkExt;
use tokio::sync::mpsc;
use tokio_util::codec::{BytesCodec, FramedWrite};
use tokio_util::sync::CancellationToken;

use std::sync::Arc;

use super::Shared;
use super::dial::WriteHalf;

/// Most frames written before a flush, so one producer cannot delay the flush indefinitely.
const MAX_BURST: usize = 256;

pub(super) async fn run(
    mut sink: FramedWrite<WriteHalf, BytesCodec>,
    mut queue: mpsc::UnboundedReceiver<Bytes>,
    link: CancellationToken,
    shared: Arc<Shared>,
) {
    loop {
        let first = tokio::select! {
            biased;
            () = link.cancelled() => break,
            frame = queue.recv() => match frame {
                Some(frame) => frame,
                None => break,
            },
        };
        let burst = async {
            sink.feed(first).await?;
            for _ in 1..MAX_BURST {
                match queue.try_recv() {
                    Ok(frame) => sink.feed(frame).await?,
                    Err(_) => break,
                }
            }
            SinkExt::<Bytes>::flush(&mut sink).await?;
            Ok::<(), std::io::Error>(())
        };
        // A node that stops reading must not keep this task (and the socket) alive after close.
        let written = tokio::select! {
            biased;
            () = link.cancelled() => break,
            written = burst => written,
        };
        if let Err(e) = written {
            tracing::warn!(error = %e, "connection failed while writing");
            shared.link_failed(format!("writing failed: {e}"));
            break;
        }
    }
    // Either way the link cannot send any more, so the whole of it ends (and, on a resumable
    // session, is resumed: what was queued here is kept and goes out again).
    link.cancel();
}
