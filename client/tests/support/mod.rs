//! A scripted fake node for testing the client library without the real one: it accepts TCP
//! connections on 127.0.0.1:0, decodes what the client sends with the protocol crate (so a
//! frame the real node would refuse fails the test), and writes whatever `ServerMsg` the test
//! scripts. Every wait has a timeout, only as a safety net against a hung test.

#![allow(
    dead_code,
    reason = "each test file uses a different part of the fake node"
)]

use std::net::SocketAddr;
use std::time::Duration;

use confab_client::{AutoAcceptPolicy, Endpoint, EndpointOptions, Hello};
use confab_protocol::{ClientMsg, FrameCodec, ServerMsg, decode_client};
use futures::{SinkExt, StreamExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::codec::Framed;

/// How long any single expected step may take before the test fails.
pub const STEP: Duration = Duration::from_secs(5);

/// A heartbeat long enough that no ping interleaves with a scripted exchange.
pub const QUIET_HEARTBEAT_MS: u64 = 600_000;

pub const ALICE: &str = "sip:alice@example.com";
pub const BOB: &str = "sip:bob@example.com";

/// Awaits `future`, failing the test if it takes longer than [`STEP`].
pub async fn step<T>(what: &str, future: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(STEP, future)
        .await
        .unwrap_or_else(|_| panic!("timed out waiting for {what}"))
}

pub struct FakeNode {
    listener: TcpListener,
}

impl FakeNode {
    pub async fn start() -> FakeNode {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        FakeNode { listener }
    }

    pub fn addr(&self) -> SocketAddr {
        self.listener.local_addr().expect("local addr")
    }

    pub async fn accept(&self) -> Peer {
        let (stream, _) = step("a client connection", self.listener.accept())
            .await
            .expect("accept");
        Peer {
            framed: Framed::new(stream, FrameCodec::default()),
        }
    }

    /// Connects an endpoint for `user` and plays the node's side of the handshake.
    pub async fn endpoint(&self, user: &str, policy: AutoAcceptPolicy) -> (Endpoint, Peer) {
        let options = EndpointOptions {
            auto_accept: policy,
            ..EndpointOptions::default()
        };
        let hello = Hello::new(user, "token", "laptop");
        let connect = Endpoint::connect_with(self.addr(), hello, options);
        let serve = async {
            let mut peer = self.accept().await;
            peer.welcome("ep-1", QUIET_HEARTBEAT_MS).await;
            peer
        };
        let (endpoint, peer) = tokio::join!(connect, serve);
        (endpoint.expect("endpoint connects"), peer)
    }
}

/// The node's side of one connection.
pub struct Peer {
    framed: Framed<TcpStream, FrameCodec>,
}

impl Peer {
    /// The next frame from the client, decoded as the node would.
    pub async fn recv(&mut self) -> ClientMsg {
        let frame = step("a frame from the client", self.framed.next())
            .await
            .expect("the client closed the connection")
            .expect("a well-framed message");
        decode_client(&frame).expect("a frame the node can decode")
    }

    /// The next frame that is not a heartbeat ping.
    pub async fn recv_no_ping(&mut self) -> ClientMsg {
        loop {
            match self.recv().await {
                ClientMsg::Ping { .. } => {}
                other => return other,
            }
        }
    }

    pub async fn send(&mut self, msg: ServerMsg) {
        self.framed.send(&msg).await.expect("write to the client");
    }

    /// Several messages in one write, so the client reads them back to back.
    pub async fn send_all(&mut self, msgs: Vec<ServerMsg>) {
        for msg in &msgs {
            self.framed.feed(msg).await.expect("write to the client");
        }
        SinkExt::<&ServerMsg>::flush(&mut self.framed)
            .await
            .expect("flush to the client");
    }

    pub async fn send_raw(&mut self, bytes: &[u8]) {
        use tokio::io::AsyncWriteExt;
        self.framed
            .get_mut()
            .write_all(bytes)
            .await
            .expect("write raw bytes");
    }

    /// Expects the `hello` and answers `welcome`.
    pub async fn welcome(&mut self, endpoint: &str, heartbeat_ms: u64) -> ClientMsg {
        let hello = self.recv().await;
        let ClientMsg::Hello { rid, .. } = &hello else {
            panic!("expected hello, got {hello:?}");
        };
        self.send(ServerMsg::Welcome {
            resume: None,
            rid: *rid,
            endpoint: endpoint.to_owned(),
            node: "node-test".to_owned(),
            heartbeat_ms,
            max_frame: 65536,
        })
        .await;
        hello
    }

    /// Expects the client to have closed the connection (after at most pings).
    pub async fn expect_eof(&mut self) {
        loop {
            match step("the client closing", self.framed.next()).await {
                None => return,
                Some(Err(e)) => panic!("framing error instead of a clean close: {e}"),
                Some(Ok(frame)) => match decode_client(&frame) {
                    Ok(ClientMsg::Ping { .. }) => {}
                    other => panic!("expected the connection to close, got {other:?}"),
                },
            }
        }
    }

    /// Closes the node's side of the connection.
    pub fn close(self) {
        drop(self);
    }
}

/// The `rid` of a request, which every request from the library carries.
pub fn rid(msg: &ClientMsg) -> Option<u32> {
    let rid = msg.rid();
    assert!(rid.is_some(), "{} without rid", msg.type_name());
    rid
}
