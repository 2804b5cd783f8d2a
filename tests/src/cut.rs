//! A TCP relay between test clients and a node that can fail the link for real: `cut` closes
//! every connection it carries at once (both sides see the socket end, mid-frame if a frame
//! was under way), and `black_hole` stops carrying bytes while keeping the sockets open, as a
//! dead mobile link does (only a heartbeat notices). New connections are carried as usual.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

/// What happens to the connections carried now when the link fails.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Failure {
    Close,
    BlackHole,
}

/// A carried connection: cancelled to fail it, the way set first.
type Link = (CancellationToken, Arc<Mutex<Option<Failure>>>);

pub struct CutProxy {
    pub addr: SocketAddr,
    /// One token per carried connection, with how it should fail.
    links: Arc<Mutex<Vec<Link>>>,
    stop: CancellationToken,
}

impl CutProxy {
    /// Listens on an ephemeral loopback port and carries each connection to `target`.
    pub async fn start(target: SocketAddr) -> CutProxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let links: Arc<Mutex<Vec<_>>> = Arc::default();
        let stop = CancellationToken::new();
        let (l, s) = (links.clone(), stop.clone());
        tokio::spawn(async move {
            loop {
                let accepted = tokio::select! {
                    a = listener.accept() => a,
                    () = s.cancelled() => return,
                };
                let Ok((client, _)) = accepted else { continue };
                let Ok(node) = TcpStream::connect(target).await else {
                    continue;
                };
                let _ = client.set_nodelay(true);
                let _ = node.set_nodelay(true);
                let token = CancellationToken::new();
                let failure = Arc::new(Mutex::new(None));
                l.lock()
                    .expect("lock")
                    .push((token.clone(), failure.clone()));
                tokio::spawn(carry(client, node, token, failure));
            }
        });
        CutProxy { addr, links, stop }
    }

    fn fail_all(&self, how: Failure) {
        for (token, failure) in self.links.lock().expect("lock").drain(..) {
            *failure.lock().expect("lock") = Some(how);
            token.cancel();
        }
    }

    /// Closes every connection carried now, both ways.
    pub fn cut(&self) {
        self.fail_all(Failure::Close);
    }

    /// Stops carrying bytes on every connection carried now; their sockets stay open.
    pub fn black_hole(&self) {
        self.fail_all(Failure::BlackHole);
    }
}

impl Drop for CutProxy {
    fn drop(&mut self) {
        self.stop.cancel();
        self.cut();
    }
}

async fn carry(
    client: TcpStream,
    node: TcpStream,
    token: CancellationToken,
    failure: Arc<Mutex<Option<Failure>>>,
) {
    let (mut cr, mut cw) = client.into_split();
    let (mut nr, mut nw) = node.into_split();
    let up = async {
        let mut buf = vec![0u8; 16 * 1024];
        loop {
            let n = cr.read(&mut buf).await.unwrap_or(0);
            if n == 0 || nw.write_all(&buf[..n]).await.is_err() {
                return;
            }
        }
    };
    let down = async {
        let mut buf = vec![0u8; 16 * 1024];
        loop {
            let n = nr.read(&mut buf).await.unwrap_or(0);
            if n == 0 || cw.write_all(&buf[..n]).await.is_err() {
                return;
            }
        }
    };
    tokio::select! {
        () = up => {}
        () = down => {}
        () = token.cancelled() => {}
    }
    let how = *failure.lock().expect("lock");
    if how == Some(Failure::BlackHole) {
        // Keep both sockets open and silent until the test ends.
        let _hold = (cr, cw, nr, nw);
        std::future::pending::<()>().await;
    }
}
