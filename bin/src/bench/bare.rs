//! `bare-server`: the least a server can do for a sign-in, as a yardstick for the node's.
//!
//! It listens exactly as the node does (one `SO_REUSEPORT` listener per thread, `TCP_NODELAY`
//! inherited, the node's backlog, through [`confab_actors::node::bind_listeners`]), and for each
//! connection reads one frame with the node's codec and first buffer size, answers a fixed
//! `welcome`, and holds the connection until the client closes it. No token is checked and no
//! actor, directory entry or presence is made. `idle` run against it therefore measures what
//! the kernel and the load generator cost on this machine at that moment; the node's sign-in
//! rate as a share of this one is the part of the gap that the node's own work explains, and it
//! does not move with the machine's speed the way either rate alone does (BENCHMARKS.md).
//!
//! With `--calls` each connection also routes the `calls` scenario's requests, as the least a
//! server can do for a forked call, and the `messages` scenario's ([`super::bare_calls`]).

use anyhow::Context as _;
use bytes::Bytes;
use confab_protocol::{ClientMsg, FrameCodec, ServerMsg};
use futures::StreamExt;
use std::io::Write as _;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_util::codec::FramedRead;

use super::bare_calls::{Router, serve_connection};

/// The node's first read buffer for a connection (its hello buffer).
const HELLO_BUFFER: usize = 512;
/// The node's read buffer for a signed-in, idle connection.
const IDLE_BUFFER: usize = 128;
/// Largest first frame read; a hello with a token is a few hundred bytes.
const MAX_FRAME: usize = 64 * 1024;

/// Serves until the process is killed. Prints the address it listens on, on one line of
/// stdout, once it accepts connections (so a script or test can pass `--listen` port 0).
pub fn serve(listen: SocketAddr, workers: Option<usize>, calls: bool) -> anyhow::Result<()> {
    let workers = workers
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
        .max(1);
    let backlog = confab_actors::Settings::default().server.listen_backlog;
    let (listeners, _claim) = confab_actors::node::bind_listeners(listen, backlog, workers)
        .with_context(|| format!("cannot listen on {listen}"))?;
    let addr = listeners
        .first()
        .context("no listener")?
        .local_addr()
        .context("the listener's address")?;
    let welcome = welcome_frame()?;
    let router = calls.then(|| Arc::new(Router::default()));
    let threads = listeners
        .into_iter()
        .map(|listener| {
            let welcome = welcome.clone();
            let router = router.clone();
            std::thread::Builder::new()
                .name("bare-server".into())
                .spawn(move || accept_on(listener, welcome, router))
                .context("starting a server thread")
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let mut out = std::io::stdout();
    writeln!(out, "{addr}")?;
    out.flush()?;
    for t in threads {
        match t.join() {
            Ok(r) => r?,
            Err(_) => anyhow::bail!("a server thread panicked"),
        }
    }
    Ok(())
}

/// One thread's accept loop, on its own single-threaded runtime like a node worker.
fn accept_on(
    listener: std::net::TcpListener,
    welcome: Bytes,
    router: Option<Arc<Router>>,
) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async move {
        let listener = tokio::net::TcpListener::from_std(listener)?;
        loop {
            match listener.accept().await {
                Ok((stream, _)) => match &router {
                    None => {
                        tokio::spawn(hold(stream, welcome.clone()));
                    }
                    Some(router) => {
                        tokio::spawn(route(stream, welcome.clone(), router.clone()));
                    }
                },
                Err(e) => {
                    // EMFILE and friends: back off briefly instead of spinning, as the node does.
                    eprintln!("bare-server: accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
    })
}

/// One connection: a frame in, the `welcome` out, then held open until the client closes it.
async fn hold(stream: TcpStream, welcome: Bytes) {
    let mut frames = FramedRead::with_capacity(stream, FrameCodec::new(MAX_FRAME), HELLO_BUFFER);
    if !matches!(frames.next().await, Some(Ok(_))) {
        return;
    }
    let mut stream = frames.into_inner();
    if stream.write_all(&welcome).await.is_err() {
        return;
    }
    let mut buf = [0u8; IDLE_BUFFER];
    while matches!(stream.read(&mut buf).await, Ok(n) if n > 0) {}
}

/// `--calls`: a hello in, then the connection routes calls for its user.
async fn route(stream: TcpStream, welcome: Bytes, router: Arc<Router>) {
    let mut frames = FramedRead::with_capacity(stream, FrameCodec::new(MAX_FRAME), HELLO_BUFFER);
    let Some(Ok(hello)) = frames.next().await else {
        return;
    };
    if let Ok(ClientMsg::Hello { user, .. }) = confab_protocol::decode_client(&hello) {
        serve_connection(router, frames, user, welcome).await;
    }
}

/// The same `welcome` for everyone: the bench's `idle` only checks that it is one, and echoes
/// of the hello's `rid` are the bench's fixed 0.
fn welcome_frame() -> anyhow::Result<Bytes> {
    let msg = ServerMsg::Welcome {
        resume: None,
        rid: Some(0),
        endpoint: "bare.0".into(),
        node: "bare".into(),
        heartbeat_ms: 15_000,
        max_frame: MAX_FRAME as u32,
    };
    Ok(confab_protocol::codec::frame_bytes(&msg)?.freeze())
}
