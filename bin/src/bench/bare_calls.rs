//! `bare-server --calls`: the least a server can do for the `calls` scenario, as a yardstick
//! for the node's forked calls.
//!
//! It answers the scenario's `call_establish`, `call_accept` and `call_terminate` with exactly
//! the frames the node sends, grouped into the same socket writes (one write per client per
//! step; BENCHMARKS.md lists them), so the kernel and the load generator do the same work as
//! against the node. What it leaves out is the node's own: no token check, no SDP negotiation
//! (the callee's answer is passed through), no state machine, no actors, no presence, no
//! limits; a call is an entry in one map behind one lock, shared by the worker threads. It
//! knows nothing beyond the scenario's happy path: any other request is ignored, and a call
//! whose client leaves stays in the map (the server lives for one run).

use bytes::{Bytes, BytesMut};
use confab_protocol::{
    CallState, ClientMsg, Direction, FrameCodec, Reason, Remote, ServerMsg, decode_client,
};
use futures::StreamExt;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio::net::tcp::OwnedWriteHalf;
use tokio::sync::mpsc;
use tokio_util::codec::FramedRead;

/// What one connection is sent: whole groups of frames, each written with one `write`.
type Outbox = mpsc::UnboundedSender<Bytes>;

/// The connections and calls of one bare server, shared by its threads.
#[derive(Default)]
pub struct Router {
    state: Mutex<State>,
    next_id: AtomicU64,
}

#[derive(Default)]
struct State {
    /// Signed-in connections by user.
    users: HashMap<String, Vec<Device>>,
    /// Calls by the caller's call id.
    calls: HashMap<String, Call>,
    /// A device's leg id → its call's id.
    legs: HashMap<String, String>,
}

#[derive(Clone)]
struct Device {
    endpoint: String,
    out: Outbox,
}

struct Call {
    caller: Device,
    caller_user: String,
    conversation: String,
    callee: String,
    /// Each device's leg: (its call id, its conversation, the device).
    legs: Vec<(String, String, Device)>,
    /// The leg that accepted.
    accepted: Option<usize>,
}

impl Router {
    fn state(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock would be a bug in this file; the yardstick carries on.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// An id as long as the node's (`node-a.1c9649e7.c17e`), so the frames are the same size.
    fn id(&self, kind: char) -> String {
        let n = self.next_id.fetch_add(1, Ordering::Relaxed);
        format!("bare-a.00000000.{kind}{n:x}")
    }
}

/// One connection after its hello: routes the scenario's requests until the client closes it.
pub async fn serve_connection(
    router: Arc<Router>,
    frames: FramedRead<TcpStream, FrameCodec>,
    user: String,
    welcome: Bytes,
) {
    let endpoint = router.id('e');
    let parts = frames.into_parts();
    let (read, write) = parts.io.into_split();
    let (out, rx) = mpsc::unbounded_channel();
    if out.send(welcome).is_err() {
        return;
    }
    tokio::spawn(write_out(write, rx));
    let me = Device {
        endpoint: endpoint.clone(),
        out,
    };
    router
        .state()
        .users
        .entry(user.clone())
        .or_default()
        .push(me.clone());
    let mut frames = FramedRead::new(read, parts.codec);
    frames.read_buffer_mut().extend_from_slice(&parts.read_buf);
    while let Some(Ok(frame)) = frames.next().await {
        match decode_client(&frame) {
            Ok(ClientMsg::CallEstablish { rid, to, sdp, .. }) => {
                router.establish(&me, &user, rid, to, sdp)
            }
            Ok(ClientMsg::CallAccept { rid, call, sdp }) => router.accept(rid, &call, sdp),
            Ok(ClientMsg::CallTerminate { rid, call }) => router.terminate(rid, &call),
            _ => {}
        }
    }
    let mut state = router.state();
    if let Some(devices) = state.users.get_mut(&user) {
        devices.retain(|d| d.endpoint != endpoint);
    }
}

/// Writes each group as it comes, and whatever else is queued by then with it.
async fn write_out(mut write: OwnedWriteHalf, mut rx: mpsc::UnboundedReceiver<Bytes>) {
    let mut buf = BytesMut::new();
    while let Some(group) = rx.recv().await {
        buf.extend_from_slice(&group);
        while let Ok(more) = rx.try_recv() {
            buf.extend_from_slice(&more);
        }
        if write.write_all(&buf).await.is_err() {
            return;
        }
        buf.clear();
    }
}

/// One socket write's worth of frames.
fn group(msgs: &[ServerMsg]) -> Bytes {
    let mut buf = BytesMut::new();
    for m in msgs {
        if let Err(e) = confab_protocol::hot::encode_server_frame(m, &mut buf) {
            eprintln!("bare-server: cannot encode a frame: {e}");
        }
    }
    buf.freeze()
}

fn state(
    call: &str,
    conversation: &str,
    direction: Direction,
    state: CallState,
    previous: CallState,
    reason: Option<(u16, &str)>,
) -> ServerMsg {
    ServerMsg::CallState {
        call: call.to_owned(),
        conversation: conversation.to_owned(),
        direction,
        state,
        previous,
        reason: reason.map(|(code, text)| Reason::new(code, text)),
    }
}

/// `terminating` then `terminated`, as one group.
fn ended(
    call: &str,
    conversation: &str,
    direction: Direction,
    from: CallState,
    why: &str,
) -> [ServerMsg; 2] {
    [
        state(
            call,
            conversation,
            direction,
            CallState::Terminating,
            from,
            Some((200, why)),
        ),
        state(
            call,
            conversation,
            direction,
            CallState::Terminated,
            CallState::Terminating,
            Some((200, why)),
        ),
    ]
}

impl Router {
    /// The toast to every device of `to`, then the caller's `call_created`, establishing and
    /// ringing (the node's order).
    fn establish(
        &self,
        caller: &Device,
        caller_user: &str,
        rid: Option<u32>,
        to: String,
        sdp: String,
    ) {
        let call = self.id('c');
        let conversation = self.id('v');
        let mut state = self.state();
        let devices = state.users.get(&to).cloned().unwrap_or_default();
        let mut legs = Vec::with_capacity(devices.len());
        for d in devices {
            let (leg, conv) = (self.id('c'), self.id('v'));
            let _ = d.out.send(group(&[ServerMsg::CallIncoming {
                call: leg.clone(),
                conversation: conv.clone(),
                from: caller_user.to_owned(),
                toast: None,
                sdp: sdp.clone(),
                immediate_auto_accept: false,
            }]));
            state.legs.insert(leg.clone(), call.clone());
            legs.push((leg, conv, d));
        }
        let out = Direction::Outbound;
        let _ = caller.out.send(group(&[
            ServerMsg::CallCreated {
                rid,
                call: call.clone(),
                conversation: conversation.clone(),
            },
            state_msg(
                &call,
                &conversation,
                out,
                CallState::Establishing,
                CallState::Idle,
            ),
            ServerMsg::CallRinging { call: call.clone() },
            state_msg(
                &call,
                &conversation,
                out,
                CallState::Establishing,
                CallState::Establishing,
            ),
        ]));
        state.calls.insert(
            call,
            Call {
                caller: caller.clone(),
                caller_user: caller_user.to_owned(),
                conversation,
                callee: to,
                legs,
                accepted: None,
            },
        );
    }

    /// The other devices' toasts come down, the caller is established, then the device.
    fn accept(&self, rid: Option<u32>, leg: &str, sdp: String) {
        let mut state = self.state();
        let Some(call_id) = state.legs.get(leg).cloned() else {
            return;
        };
        let Some(call) = state.calls.get_mut(&call_id) else {
            return;
        };
        if call.accepted.is_some() {
            return;
        }
        let Some(won) = call.legs.iter().position(|(l, _, _)| l == leg) else {
            return;
        };
        call.accepted = Some(won);
        let inbound = Direction::Inbound;
        for (i, (l, conv, d)) in call.legs.iter().enumerate() {
            if i != won {
                let why = "Call completed elsewhere";
                let _ = d
                    .out
                    .send(group(&ended(l, conv, inbound, CallState::Incoming, why)));
            }
        }
        let (l, conv, device) = &call.legs[won];
        let _ = call.caller.out.send(group(&[
            state_msg(
                &call_id,
                &call.conversation,
                Direction::Outbound,
                CallState::Established,
                CallState::Establishing,
            ),
            ServerMsg::CallEstablished {
                call: call_id.clone(),
                sdp: sdp.clone(),
                remote: Remote {
                    user: call.callee.clone(),
                    endpoint: device.endpoint.clone(),
                },
            },
        ]));
        let _ = device.out.send(group(&[
            ServerMsg::Ok { rid },
            state_msg(
                l,
                conv,
                inbound,
                CallState::Establishing,
                CallState::Incoming,
            ),
            state_msg(
                l,
                conv,
                inbound,
                CallState::Established,
                CallState::Establishing,
            ),
            ServerMsg::CallEstablished {
                call: l.clone(),
                sdp,
                remote: Remote {
                    user: call.caller_user.clone(),
                    endpoint: call.caller.endpoint.clone(),
                },
            },
        ]));
        let lost: Vec<String> = (call.legs.iter().enumerate())
            .filter(|(i, _)| *i != won)
            .map(|(_, (l, _, _))| l.clone())
            .collect();
        for l in lost {
            state.legs.remove(&l);
        }
    }

    /// The caller hangs up: its `ok` and end, then the device's end.
    fn terminate(&self, rid: Option<u32>, call_id: &str) {
        let mut state = self.state();
        let Some(call) = state.calls.remove(call_id) else {
            return;
        };
        let mut caller = vec![ServerMsg::Ok { rid }];
        caller.extend(ended(
            call_id,
            &call.conversation,
            Direction::Outbound,
            CallState::Established,
            "Terminated locally",
        ));
        let _ = call.caller.out.send(group(&caller));
        if let Some((l, conv, device)) = call.accepted.map(|i| &call.legs[i]) {
            let why = "Terminated remotely";
            let from = CallState::Established;
            let _ = device
                .out
                .send(group(&ended(l, conv, Direction::Inbound, from, why)));
            state.legs.remove(l);
        }
    }
}

fn state_msg(
    call: &str,
    conversation: &str,
    direction: Direction,
    now: CallState,
    previous: CallState,
) -> ServerMsg {
    state(call, conversation, direction, now, previous, None)
}
