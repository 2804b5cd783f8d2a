//! A delaying TCP relay: the fault harness's stand-in for `tc netem delay`, which this
//! machine's kernel lacks (no `sch_netem`). It listens in one host's namespace and, for each
//! connection, connects to its target from that same host, then forwards every chunk read
//! from either side after a fixed delay, in order.
//!
//! What it models is a slow path: every byte arrives `delay` later, each way, and the order is
//! kept. It does not model a lossy one: TCP's retransmissions, window and congestion control
//! run on each half separately, over an undelayed local hop, so the sender never sees the
//! extra round trip in its RTT estimate. (Packet loss is an nftables rule, see
//! [`crate::netns::Net::loss`], and it applies to the relay's outer connection as to any
//! other.)

use crate::netns::Net;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::task::JoinSet;

/// A running relay; dropping it stops it and closes every connection it carries.
pub struct Relay {
    pub addr: SocketAddr,
    tasks: JoinSet<()>,
}

impl Relay {
    /// Listens on `listen` in `host` and relays each connection to `target` (connected from
    /// `host`), holding every chunk for `delay_ms` (read as each chunk arrives, so a test can
    /// slow a running link and speed it up again) each way.
    pub async fn start(
        net: &Net,
        host: &str,
        listen: SocketAddr,
        target: SocketAddr,
        delay_ms: Arc<AtomicU64>,
    ) -> Relay {
        let listener = net
            .listen(host, listen)
            .await
            .unwrap_or_else(|e| panic!("relay cannot listen on {listen} in {host}: {e}"));
        let addr = listener.local_addr().expect("a bound relay");
        let netns = net.netns_path(host);
        let mut tasks = JoinSet::new();
        tasks.spawn(async move {
            let mut conns = JoinSet::new();
            while let Ok((inner, _)) = listener.accept().await {
                let netns = netns.clone();
                let delay = delay_ms.clone();
                conns.spawn(async move {
                    // The outer connection is made from the host's namespace too.
                    let outer =
                        crate::netns::connect_from(netns, target, Duration::from_secs(5)).await;
                    let Ok(outer) = outer else { return };
                    let _ = inner.set_nodelay(true);
                    let (ir, iw) = inner.into_split();
                    let (or, ow) = outer.into_split();
                    tokio::join!(pipe(ir, ow, delay.clone()), pipe(or, iw, delay));
                });
            }
        });
        Relay { addr, tasks }
    }

    /// Stops the relay and drops every connection it carries.
    pub fn stop(&mut self) {
        self.tasks.abort_all();
    }
}

/// Copies `from` to `to`, each chunk written the delay after it was read, in order. The reader
/// runs ahead (a chunk read at t goes out at t + delay whatever came before it), so the
/// delay adds to the path once, not once per chunk.
async fn pipe(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    delay_ms: Arc<AtomicU64>,
) {
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<(tokio::time::Instant, Vec<u8>)>();
    let reader = async move {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            match from.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    let delay = Duration::from_millis(delay_ms.load(Ordering::Relaxed));
                    let due = tokio::time::Instant::now() + delay;
                    if tx.send((due, buf[..n].to_vec())).is_err() {
                        break;
                    }
                }
            }
        }
    };
    let writer = async move {
        while let Some((due, chunk)) = rx.recv().await {
            tokio::time::sleep_until(due).await;
            if to.write_all(&chunk).await.is_err() {
                break;
            }
        }
        let _ = to.shutdown().await;
    };
    tokio::join!(reader, writer);
}
