//! A direct link's socket: dialing another node and accepting its dial, each side's half of
//! the handshake (`handshake.rs`, inside TLS with link TLS: `tls.rs`), and the loops that then
//! write (dialer) and read (acceptor) one envelope payload per length-prefixed frame.

use bytes::Bytes;
use futures::{SinkExt, StreamExt};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;
use tokio::io::AsyncReadExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::codec::{FramedWrite, LengthDelimitedCodec};
use tokio_util::either::Either;

use super::handshake::{self, Hello, Proof, Reply, Role};
use super::tls::{self, LinkStream};
use super::{
    Accepted, FromLink, HANDSHAKE_MAX_FRAME, HANDSHAKE_TIMEOUT, Links, MAX_FRAME, Out, OutLink,
    WRITER_QUEUE, lock,
};
use confab_actors::metrics as m;

/// Dials `node` (run `epoch`) at `addr` and, handshaken, runs the link's writer.
pub(super) async fn dial(links: Arc<Links>, node: String, epoch: u64, addr: String, id: u64) {
    let run = links.epoch.load(Ordering::Relaxed);
    let made = tokio::time::timeout(
        HANDSHAKE_TIMEOUT,
        dial_handshake(&links, (&node, epoch), &addr, (run, id)),
    )
    .await
    .unwrap_or_else(|_| Err("the handshake timed out".to_owned()));
    match made {
        Ok(stream) => {
            tracing::info!(%node, %addr, link = id, "direct link to node up");
            metrics::counter!(m::CLUSTER_DIRECT_LINK_EVENTS, "event" => "up").increment(1);
            let (tx, rx) = mpsc::channel(WRITER_QUEUE);
            links.dialed(&node, epoch, Some(OutLink { id, run, tx }));
            let since = Instant::now();
            write_loop(&links, &node, id, stream, rx).await;
            links.link_ended(&node, since.elapsed());
        }
        Err(why) => {
            metrics::counter!(m::CLUSTER_DIRECT_LINK_EVENTS, "event" => "dial_failed").increment(1);
            links.failed_dials.fetch_add(1, Ordering::Relaxed);
            if links.dialed(&node, epoch, None) {
                tracing::warn!(%node, %addr, %why, "cannot open a direct link; envelopes go over NATS (dialing again with back-off; further failures at debug)");
            } else {
                tracing::debug!(%node, %addr, %why, "cannot open a direct link");
            }
        }
    }
}

type Framed = tokio_util::codec::Framed<LinkStream, LengthDelimitedCodec>;

/// The handshake's codec: small frames only, until the other side has proved the secret
/// (then [`MAX_FRAME`]).
fn codec() -> LengthDelimitedCodec {
    LengthDelimitedCodec::builder()
        .max_frame_length(HANDSHAKE_MAX_FRAME)
        .new_codec()
}

/// A link's socket: no Nagle (a lone envelope is a message someone waits for), keep-alive
/// probes (an idle link to a vanished node ends), and writes unacknowledged for
/// `write_timeout` fail (a link into a black hole ends instead of stalling for minutes).
fn tune(stream: &TcpStream, write_timeout: Duration) {
    let _ = stream.set_nodelay(true);
    let sock = socket2::SockRef::from(stream);
    let keepalive = socket2::TcpKeepalive::new()
        .with_time(Duration::from_secs(10))
        .with_interval(Duration::from_secs(2))
        .with_retries(3);
    let _ = sock.set_tcp_keepalive(&keepalive);
    #[cfg(target_os = "linux")]
    let _ = sock.set_tcp_user_timeout(Some(write_timeout));
    #[cfg(not(target_os = "linux"))]
    let _ = write_timeout;
}

async fn send_msg<T: serde::Serialize>(framed: &mut Framed, msg: &T) -> Result<(), String> {
    let bytes = rmp_serde::to_vec_named(msg).map_err(|e| e.to_string())?;
    framed
        .send(Bytes::from(bytes))
        .await
        .map_err(|e| e.to_string())
}

async fn read_msg<T: serde::de::DeserializeOwned>(framed: &mut Framed) -> Result<T, String> {
    let frame = framed
        .next()
        .await
        .ok_or("the other node closed the link")?
        .map_err(|e| match framed.read_buffer().get(..2) {
            // A TLS record (handshake, alert) read as a frame's length: too long a frame. The
            // nodes do not agree on link TLS; say so rather than just "frame size too big".
            Some([0x15 | 0x16, 0x03]) if matches!(framed.get_ref(), Either::Left(_)) => {
                "the other node speaks TLS: it uses link TLS (cluster.link_tls_*), this one does not"
                    .to_owned()
            }
            _ => e.to_string(),
        })?;
    rmp_serde::from_slice(&frame).map_err(|e| format!("unreadable handshake: {e}"))
}

/// The dialer's half: hello, the acceptor's challenge, this node's proof first, then the
/// acceptor's (see `handshake.rs`).
async fn dial_handshake(
    links: &Links,
    (node, epoch): (&str, u64),
    addr: &str,
    (run, id): (u64, u64),
) -> Result<Framed, String> {
    let stream = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
    // On the TCP socket, before TLS wraps it.
    tune(&stream, links.settings.node_timeout);
    let stream = match &links.settings.tls {
        Some(tls) => tls.dial(node, stream).await?,
        None => Either::Left(stream),
    };
    let mut framed = Framed::new(stream, codec());
    let hello = Hello {
        version: handshake::VERSION,
        from: links.me.clone(),
        from_epoch: run,
        to: node.to_owned(),
        to_epoch: epoch,
        link: id,
        nonce: handshake::nonce(),
    };
    send_msg(&mut framed, &hello).await?;
    let their_nonce = match read_msg::<Reply>(&mut framed).await? {
        Reply::Challenge { nonce } => nonce,
        Reply::Refused { why } => return Err(format!("refused: {why}")),
        Reply::Welcome { .. } => return Err("a welcome before the proof".to_owned()),
    };
    let proof = handshake::prove(&links.key, Role::Dialer, &hello, &their_nonce);
    send_msg(&mut framed, &Proof { proof }).await?;
    match read_msg::<Reply>(&mut framed).await? {
        Reply::Welcome { proof }
            if handshake::verify(&links.key, Role::Acceptor, &hello, &their_nonce, &proof) =>
        {
            Ok(framed)
        }
        Reply::Welcome { .. } => Err("the other node does not hold cluster.link_secret".to_owned()),
        Reply::Refused { why } => Err(format!("refused: {why}")),
        Reply::Challenge { .. } => Err("a second challenge".to_owned()),
    }
}

/// Writes what the publisher gives link `id`, as it comes (what has piled up meanwhile in one
/// write), until the socket fails, the other end closes it, or the publisher lets it go.
async fn write_loop(
    links: &Links,
    node: &str,
    id: u64,
    framed: Framed,
    mut rx: mpsc::Receiver<Out>,
) {
    let parts = framed.into_parts();
    let (mut rd, wr) = confab_actors::transport::split(parts.io);
    let mut codec = codec();
    codec.set_max_frame_length(MAX_FRAME);
    let mut wr = FramedWrite::new(wr, codec);
    let mut probe = [0u8; 1];
    let why = loop {
        let first = tokio::select! {
            out = rx.recv() => out,
            // The acceptor sends nothing after its welcome: a read that ends is the link's end.
            _ = rd.read(&mut probe) => break "closed by the other node".to_owned(),
        };
        let Some(first) = first else {
            break "no longer used".to_owned();
        };
        let mut next = Some(first);
        let mut flushes = Vec::new();
        let mut payloads = 0u64;
        let mut failed = None;
        while let Some(out) = next.take() {
            match out {
                Out::Payload(p) => {
                    payloads += 1;
                    if let Err(e) = wr.feed(p).await {
                        failed = Some(e.to_string());
                        break;
                    }
                }
                Out::Flush(done) => flushes.push(done),
            }
            // Bounded, so that a busy link still reads the other end's close now and then.
            if payloads < 64 {
                next = rx.try_recv().ok();
            }
        }
        if let Some(why) = failed {
            break why;
        }
        if let Err(e) = SinkExt::<Bytes>::flush(&mut wr).await {
            break e.to_string();
        }
        metrics::counter!(m::CLUSTER_DIRECT_PAYLOADS, "direction" => "out").increment(payloads);
        links.written.fetch_add(payloads, Ordering::Relaxed);
        for done in flushes {
            let _ = done.send(());
        }
    };
    drop(rx);
    tracing::info!(%node, link = id, %why, "direct link to node ended; envelopes go over NATS");
    metrics::counter!(m::CLUSTER_DIRECT_LINK_EVENTS, "event" => "down").increment(1);
}

pub(super) async fn accept_loop(links: Arc<Links>, listener: TcpListener) {
    loop {
        match listener.accept().await {
            Ok((stream, peer)) => {
                let Ok(slot) = links.handshakes.clone().try_acquire_owned() else {
                    if links.refusal() {
                        tracing::warn!(%peer, "too many direct-link handshakes at once; closing this one (further refusals within a minute at debug)");
                    }
                    continue;
                };
                tune(&stream, links.settings.node_timeout);
                let links = links.clone();
                tokio::spawn(async move {
                    let made =
                        tokio::time::timeout(HANDSHAKE_TIMEOUT, accept_handshake(&links, stream))
                            .await
                            .unwrap_or_else(|_| Err("the handshake timed out".to_owned()));
                    drop(slot);
                    match made {
                        Ok((framed, hello)) => read_link(links, framed, hello).await,
                        Err(why) => {
                            if links.refusal() {
                                tracing::warn!(%peer, %why, "refused a direct link (further refusals within a minute at debug)");
                            } else {
                                tracing::debug!(%peer, %why, "refused a direct link");
                            }
                        }
                    }
                });
            }
            Err(e) => {
                // Out of file descriptors, most likely: wait instead of spinning.
                tracing::warn!(error = %e, "cannot accept a direct link");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

/// The acceptor's half: it proves nothing before the dialer has. With link TLS the TLS
/// handshake comes first, in the same time and handshake slot.
async fn accept_handshake(links: &Links, stream: TcpStream) -> Result<(Framed, Hello), String> {
    let stream = match &links.settings.tls {
        Some(tls) => tls.accept(stream).await?,
        None => Either::Left(stream),
    };
    let mut framed = Framed::new(stream, codec());
    let hello: Hello = read_msg(&mut framed).await?;
    let epoch = links.epoch.load(Ordering::Relaxed);
    let refusal = if hello.version != handshake::VERSION {
        Some(format!(
            "link version {} (this node: {})",
            hello.version,
            handshake::VERSION
        ))
    } else if hello.to != links.me || hello.to_epoch != epoch {
        // Not said which run this is: a stranger learns nothing.
        Some("not the node and run dialed".to_owned())
    } else if let Err(why) = tls::names(framed.get_ref(), &hello.from) {
        Some(why)
    } else if links.is_dead(&hello.from, hello.from_epoch) {
        Some("that run was declared dead".to_owned())
    } else if hello.nonce.len() != handshake::NONCE_LEN {
        Some("bad nonce".to_owned())
    } else {
        None
    };
    if let Some(why) = refusal {
        let _ = send_msg(&mut framed, &Reply::Refused { why: why.clone() }).await;
        return Err(format!("from {}: {why}", hello.from));
    }
    let nonce = handshake::nonce();
    send_msg(
        &mut framed,
        &Reply::Challenge {
            nonce: nonce.clone(),
        },
    )
    .await?;
    let Proof { proof } = read_msg(&mut framed).await?;
    if !handshake::verify(&links.key, Role::Dialer, &hello, &nonce, &proof) {
        let why = "it does not hold cluster.link_secret".to_owned();
        let _ = send_msg(&mut framed, &Reply::Refused { why: why.clone() }).await;
        return Err(format!("from {}: {why}", hello.from));
    }
    let proof = handshake::prove(&links.key, Role::Acceptor, &hello, &nonce);
    send_msg(&mut framed, &Reply::Welcome { proof }).await?;
    Ok((framed, hello))
}

/// Reads the link `hello` opened until it ends, passing each payload to the inbox.
async fn read_link(links: Arc<Links>, mut framed: Framed, hello: Hello) {
    let (from, run, link) = (hello.from, hello.from_epoch, hello.link);
    framed.codec_mut().set_max_frame_length(MAX_FRAME);
    let tx = links.received.clone();
    let counts = links.clone();
    let from2 = from.clone();
    let reader = tokio::spawn(async move {
        while let Some(frame) = framed.next().await {
            let Ok(frame) = frame else { break };
            counts.read.fetch_add(1, Ordering::Relaxed);
            let item = FromLink {
                from: from2.clone(),
                run,
                link,
                payload: frame.freeze(),
            };
            if tx.send(item).await.is_err() {
                break;
            }
        }
    });
    let key = (from.clone(), link);
    {
        let mut accepted = lock(&links.accepted);
        // Checked again under the lock `node_lost` takes: a run declared dead during the
        // handshake gets no link.
        if links.is_dead(&from, run) {
            reader.abort();
            return;
        }
        accepted.insert(
            key.clone(),
            Accepted {
                run,
                reader: reader.abort_handle(),
            },
        );
    }
    links.gauge_in();
    tracing::info!(node = %from, link, "direct link from node up");
    let _ = reader.await;
    lock(&links.accepted).remove(&key);
    links.accepted_ended(&from, run);
    links.gauge_in();
    tracing::info!(node = %from, link, "direct link from node ended");
}
