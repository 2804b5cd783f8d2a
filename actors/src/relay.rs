//! Sessions resumed through another node (docs/protocol.md §3 "Resuming"). A client whose
//! session is held on node A may resume on node B: B checks its `hello` as a sign-in, then asks
//! A (through the cluster's [`Link`]) to take the session back through B. From then on B only
//! carries bytes: the client's frames go to A's endpoint, and what A's writer would write to a
//! socket comes back to B's client. The endpoint, its calls and its legs stay where they are:
//! nothing moves between nodes, at the cost of one hop per frame for the rest of that
//! connection.
//!
//! On B, [`relay_session`] serves the client's connection; on A, the endpoint's writer writes
//! into a [`RelayWriter`].

use bytes::Bytes;
use confab_protocol::hot::encode_server_frame;
use futures::StreamExt;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncWrite, AsyncWriteExt};

use crate::endpoint::Frames;
use crate::link::{Link, RelayAsk, RelayDown};
use crate::metrics as m;
use crate::refusal::{Refusal, ResumeRefusal};

/// How long a closing relayed connection may take to flush its last bytes.
const FLUSH_DEADLINE: Duration = Duration::from_secs(2);

/// Most client frames sent to the holding node in one envelope.
const FRAMES_PER_ENVELOPE: usize = 64;

/// On the holding node: the socket of a session resumed through another node. Each write goes
/// to that node as one numbered envelope; dropping it (the session detached) ends the relay,
/// and the other node closes its client's connection.
pub struct RelayWriter {
    link: Arc<dyn Link>,
    node: String,
    relay: u64,
    seq: u64,
    ended: bool,
}

impl RelayWriter {
    pub fn new(link: Arc<dyn Link>, node: String, relay: u64) -> Self {
        RelayWriter {
            link,
            node,
            relay,
            seq: 0,
            ended: false,
        }
    }

    fn end(&mut self) {
        if !self.ended {
            self.ended = true;
            self.link.relay_down_end(&self.node, self.relay);
        }
    }
}

impl AsyncWrite for RelayWriter {
    fn poll_write(
        self: Pin<&mut Self>,
        _: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        this.seq += 1;
        let sent = !this.ended
            && this.link.relay_down(
                &this.node,
                this.relay,
                this.seq,
                Bytes::copy_from_slice(buf),
            );
        Poll::Ready(if sent {
            Ok(buf.len())
        } else {
            // Over the bound of what waits for that node, or the node is gone: the session is
            // held, as when a socket fails.
            Err(io::Error::new(
                io::ErrorKind::BrokenPipe,
                "the relaying node cannot be reached",
            ))
        })
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.get_mut().end();
        Poll::Ready(Ok(()))
    }
}

impl Drop for RelayWriter {
    fn drop(&mut self) {
        self.end();
    }
}

/// On the client's node: carries a resumed session between the client's connection (`frames`,
/// `wr`) and the node that holds it, until either side ends. A holding node that does not
/// answer within two `cluster.node_timeout_ms`, or is declared dead first, gets the client a
/// `resume_refused` "the node holding the session is gone".
pub async fn relay_session<W: AsyncWrite + Unpin>(
    link: Arc<dyn Link>,
    node: String,
    ask: RelayAsk,
    frames: Frames,
    mut wr: W,
) {
    let endpoint = ask.endpoint.clone();
    let rid = ask.rid;
    let Some((relay, mut down)) = link.open_relay(&node, ask) else {
        refuse_gone(&mut wr, rid).await;
        return;
    };
    tracing::debug!(%node, %endpoint, relay, "relaying a resume to the node holding the session");
    let first_within = link.node_timeout() * 2;
    let downstream = async {
        let mut wrote = false;
        loop {
            let next = if wrote {
                down.recv().await
            } else {
                tokio::time::timeout(first_within, down.recv())
                    .await
                    .ok()
                    .flatten()
            };
            match next {
                Some(RelayDown::Bytes(b)) => {
                    wrote = true;
                    if wr.write_all(&b).await.is_err() || wr.flush().await.is_err() {
                        return;
                    }
                }
                Some(RelayDown::End) | None => {
                    if !wrote {
                        refuse_gone(&mut wr, rid).await;
                    } else {
                        let _ = tokio::time::timeout(FLUSH_DEADLINE, wr.shutdown()).await;
                    }
                    return;
                }
            }
        }
    };
    let upstream = async {
        let mut seq = 0;
        let mut batches = frames.ready_chunks(FRAMES_PER_ENVELOPE);
        while let Some(batch) = batches.next().await {
            let mut bodies = Vec::with_capacity(batch.len());
            let mut broken = false;
            for item in batch {
                match item {
                    Ok(frame) => bodies.push(frame.freeze()),
                    Err(_) => {
                        broken = true;
                        break;
                    }
                }
            }
            if !bodies.is_empty() {
                seq += 1;
                if !link.relay_up(&node, &endpoint, relay, seq, bodies) {
                    return;
                }
            }
            if broken {
                return;
            }
        }
    };
    tokio::select! {
        () = downstream => {}
        () = upstream => {}
    }
    link.relay_up_end(&node, &endpoint, relay);
    link.close_relay(relay);
}

/// Tells the client the node holding its session is gone, and closes.
async fn refuse_gone<W: AsyncWrite + Unpin>(wr: &mut W, rid: Option<u32>) {
    let why = ResumeRefusal::NodeGone;
    metrics::counter!(m::RESUMES, "result" => why.label()).increment(1);
    let mut buf = bytes::BytesMut::new();
    if encode_server_frame(&Refusal::Resume(why).reply(rid), &mut buf).is_ok() {
        let _ = tokio::time::timeout(FLUSH_DEADLINE, async {
            let _ = wr.write_all(&buf).await;
            let _ = wr.shutdown().await;
        })
        .await;
    }
}
