//! A test client of a resumable session (docs/protocol.md §3 "Resuming"), written from the
//! contract alone: it counts the node's frames and its own, acknowledges with `seen`, keeps
//! what it sent until the node's `seen` covers it, and resumes on a new connection. Tests use
//! it to check that each frame arrives exactly once across real link failures.

use confab_protocol::*;
use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::time::Duration;

use crate::wire::Wire;
use crate::{EVENT_TIMEOUT, Raw, seed_from_env, token};

pub struct Resumable {
    wire: Wire,
    pub user: String,
    pub device: String,
    pub endpoint: String,
    pub resume_token: String,
    /// The number of the last node frame decoded (`welcome` = 0).
    pub seen: u64,
    /// The number of the last frame sent (`hello` = 0).
    pub sent: u64,
    /// Frames sent and not yet covered by the node's `seen`: (number, frame).
    unacked: VecDeque<(u64, ClientMsg)>,
    next_rid: u32,
    /// Frames decoded since the last `seen` sent.
    since_ack: u64,
    pub max_unseen_frames: u64,
}

/// What became of a resume.
#[derive(Debug)]
pub enum Resumed {
    /// Taken back: the welcome's `resume.seen` (the node had read the client's frames up to it).
    Ok(u64),
    /// Refused: the node's answer.
    Refused(ServerMsg),
}

impl Resumable {
    /// Signs in with `resume:{}` at `addr`.
    pub async fn sign_in(addr: SocketAddr, user: &str, device: &str) -> Resumable {
        let mut wire = Wire::tcp(addr).await;
        wire.send(&ClientMsg::Hello {
            rid: Some(1),
            version: 1,
            user: user.to_owned(),
            token: token(user),
            device: device.to_owned(),
            agent: None,
            resume: Some(Box::default()),
        })
        .await
        .expect("send hello");
        let welcome = next(&mut wire).await.expect("welcome");
        let ServerMsg::Welcome {
            endpoint,
            resume: Some(grant),
            ..
        } = welcome
        else {
            panic!("expected a resumable welcome, got {welcome:?}");
        };
        Resumable {
            wire,
            user: confab_protocol::uri::normalize_user_uri(user).expect("a SIP URI"),
            device: device.to_owned(),
            endpoint,
            resume_token: grant.token,
            seen: 0,
            sent: 0,
            unacked: VecDeque::new(),
            next_rid: 1,
            since_ack: 0,
            max_unseen_frames: u64::from(grant.max_unseen_frames),
        }
    }

    pub fn rid(&mut self) -> Option<u32> {
        self.next_rid += 1;
        Some(self.next_rid)
    }

    /// Sends `msg`, counting and keeping it. A send on a dead link is not an error: the frame
    /// is kept and goes again on the resume.
    pub async fn send(&mut self, msg: ClientMsg) {
        self.sent += 1;
        self.unacked.push_back((self.sent, msg.clone()));
        let _ = self.wire.send(&msg).await;
    }

    /// The next frame from the node that is not the node's `seen` (which this client handles
    /// itself), or `None` once the connection has ended. Panics after [`EVENT_TIMEOUT`].
    pub async fn recv(&mut self) -> Option<ServerMsg> {
        self.recv_within(EVENT_TIMEOUT).await
    }

    pub async fn recv_within(&mut self, limit: Duration) -> Option<ServerMsg> {
        loop {
            let msg = match tokio::time::timeout(limit, next(&mut self.wire)).await {
                Ok(msg) => msg?,
                Err(_) => panic!("{}: no frame within {limit:?}", self.user),
            };
            self.seen += 1;
            self.since_ack += 1;
            if self.since_ack >= self.max_unseen_frames / 4 {
                self.ack().await;
            }
            if let ServerMsg::Seen { upto } = msg {
                while self.unacked.front().is_some_and(|(n, _)| *n <= upto) {
                    self.unacked.pop_front();
                }
                continue;
            }
            return Some(msg);
        }
    }

    /// Accepts the incoming `call` and waits until it is established; panics on an error, or
    /// on the call offered a second time.
    pub async fn accept(&mut self, call: &str) {
        let rid = self.rid();
        self.send(ClientMsg::CallAccept {
            rid,
            call: call.to_owned(),
            sdp: crate::answer(),
        })
        .await;
        loop {
            match self.recv().await.expect("the link is up") {
                ServerMsg::CallEstablished { call: c, .. } if c == call => return,
                ServerMsg::CallIncoming { call: c, .. } if c == call => {
                    panic!("{call} was offered twice")
                }
                ServerMsg::Error { message, .. } => panic!("accepting {call}: {message}"),
                _ => {}
            }
        }
    }

    /// Sends `seen` for every frame decoded so far.
    pub async fn ack(&mut self) {
        self.since_ack = 0;
        let upto = self.seen;
        self.send(ClientMsg::Seen { upto }).await;
    }

    /// Frames sent that the node has not acknowledged yet.
    pub fn unacked(&self) -> usize {
        self.unacked.len()
    }

    /// Connects to `addr` and resumes: on success sends again what the node had not read.
    pub async fn resume(&mut self, addr: SocketAddr) -> Resumed {
        let seen = self.seen;
        self.resume_with(addr, seen).await
    }

    /// [`Resumable::resume`] claiming to have read the node's frames up to `seen`.
    pub async fn resume_with(&mut self, addr: SocketAddr, seen: u64) -> Resumed {
        let mut wire = Wire::tcp(addr).await;
        wire.send(&ClientMsg::Hello {
            rid: Some(1),
            version: 1,
            user: self.user.clone(),
            token: token(&self.user),
            device: self.device.clone(),
            agent: None,
            resume: Some(Box::new(ResumeAsk {
                endpoint: Some(self.endpoint.clone()),
                token: Some(self.resume_token.clone()),
                seen,
                sent: self.sent,
            })),
        })
        .await
        .expect("send hello");
        let answer = next(&mut wire).await.expect("an answer to the resume");
        let ServerMsg::Welcome {
            resume: Some(grant),
            ..
        } = answer
        else {
            return Resumed::Refused(answer);
        };
        let node_read = grant
            .seen
            .expect("a resumed welcome says what the node read");
        self.wire = wire;
        self.resume_token = grant.token;
        while self.unacked.front().is_some_and(|(n, _)| *n <= node_read) {
            self.unacked.pop_front();
        }
        // The frames the node did not read go again, in order, keeping their numbers.
        for (_, msg) in self.unacked.clone() {
            let _ = self.wire.send(&msg).await;
        }
        Resumed::Ok(node_read)
    }
}

async fn next(wire: &mut Wire) -> Option<ServerMsg> {
    match wire.next().await? {
        Ok(frame) => Some(decode_server(&frame).expect("a frame the contract knows")),
        Err(_) => None,
    }
}

/// A text message `m<n>` on `call`, with rid `n`.
pub fn text(call: &str, n: u32) -> ClientMsg {
    ClientMsg::Message {
        rid: Some(n),
        call: call.to_owned(),
        content_type: "text/plain".to_owned(),
        body: Body::Text(format!("m{n}")),
    }
}

/// A body as text (a binary one as its bytes' debug form).
pub fn body_text(b: &Body) -> String {
    match b {
        Body::Text(t) => t.clone(),
        Body::Binary(b) => format!("{b:?}"),
    }
}

/// Each side of an established call sends `n` messages (Bob `m1`..., Alice `m10001`...), at
/// most 8 unanswered at a time, acking what it receives, while Alice's link is cut at random
/// (`cut`, about once in `one_in` of her turns, seeded by `CONFAB_RESUME_SEED`) and she resumes
/// at `resume_at()` each time her link ends. Asserts that each side received every message
/// exactly once and in order, and that every message got exactly one answer, `delivered`.
/// Returns how many cuts were made.
#[allow(clippy::too_many_arguments)]
pub async fn exchange_through_cuts(
    alice: &mut Resumable,
    alice_call: &str,
    mut bob: Raw,
    bob_call: &str,
    n: u32,
    one_in: u64,
    mut cut: impl FnMut(),
    mut resume_at: impl FnMut() -> SocketAddr,
) -> u32 {
    let mut rng = seed_from_env("CONFAB_RESUME_SEED").max(1);
    // Shown with a failure's output: the same cuts again with CONFAB_RESUME_SEED.
    eprintln!("exchange_through_cuts: CONFAB_RESUME_SEED={rng}");
    let bob_call = bob_call.to_owned();
    let bob_task = tokio::spawn(async move {
        let (mut answers, mut got, mut sent) = (HashMap::new(), Vec::new(), 0);
        while answers.len() < n as usize || got.len() < n as usize {
            if sent < n && sent < answers.len() as u32 + 8 {
                sent += 1;
                bob.send(&text(&bob_call, sent)).await;
                continue;
            }
            match bob.recv().await {
                ServerMsg::MessageDelivered { rid: Some(r), .. } => {
                    assert!(answers.insert(r, ()).is_none(), "Bob's {r} answered twice");
                }
                ServerMsg::MessageFailed {
                    rid, code, text, ..
                } => panic!("Bob's {rid:?} failed {code} {text}"),
                ServerMsg::MessageReceived {
                    msg, body, call, ..
                } => {
                    got.push(body_text(&body));
                    bob.send(&ClientMsg::MessageAck { call, msg }).await;
                }
                _ => {}
            }
        }
        got
    });
    let (mut got, mut answers, mut sent, mut cuts) = (Vec::new(), HashMap::new(), 0u32, 0);
    while got.len() < n as usize || answers.len() < n as usize {
        if sent < n && sent < answers.len() as u32 + 8 {
            sent += 1;
            alice.send(text(alice_call, 10_000 + sent)).await;
        }
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        if rng.is_multiple_of(one_in) {
            cut();
            cuts += 1;
        }
        match alice.recv().await {
            None => {
                let Resumed::Ok(_) = alice.resume(resume_at()).await else {
                    panic!("resume refused after {cuts} cuts")
                };
            }
            Some(ServerMsg::MessageReceived { msg, body, .. }) => {
                got.push(body_text(&body));
                let call = alice_call.to_owned();
                alice.send(ClientMsg::MessageAck { call, msg }).await;
            }
            Some(ServerMsg::MessageDelivered { rid: Some(r), .. }) => {
                assert!(
                    answers.insert(r, ()).is_none(),
                    "Alice's {r} answered twice"
                );
            }
            Some(ServerMsg::MessageFailed {
                rid, code, text, ..
            }) => panic!("Alice's {rid:?} failed {code} {text}"),
            Some(_) => {}
        }
    }
    let want: Vec<String> = (1..=n).map(|i| format!("m{i}")).collect();
    assert_eq!(got, want, "Alice got every message once, in order");
    let want: Vec<String> = (1..=n).map(|i| format!("m{}", 10_000 + i)).collect();
    assert_eq!(
        bob_task.await.expect("Bob's side"),
        want,
        "Bob got every message once, in order"
    );
    cuts
}
