//! `bare-server --calls`: the least a server can do for the `calls` scenario, as a yardstick
//! for the node's forked calls.
//!
//! It answers the scenario's `call_establish`, `call_accept` and `call_terminate` with the
//! frames the node sends, in the order each client sees them and grouped as the node groups
//! them per step (one group per client per step; the node's outbox may coalesce more under
//! load, BENCHMARKS.md gives both servers' writes per call), so the kernel and the load
//! generator do about the same work as against the node. What it leaves out is the node's
//! own: no token check, no SDP negotiation (the callee's answer is passed through), no state
//! machine, no actors, no presence, no limits; a call is an entry in one map behind one lock,
//! shared by the worker threads and held only for the map operations. It
//! knows nothing beyond the scenario's happy path: any other request is ignored, and a call
//! whose client leaves stays in the map (the server lives for one run).
//!
//! It also routes the `messages` scenario's flow, as the yardstick for its rate and latency:
//! a `message` becomes the accepting device's `message_received`, its `message_ack` the
//! caller's `message_delivered`, each one write (the node's outbox may coalesce more).

use bytes::{Bytes, BytesMut};
use confab_protocol::{
    Body, CallState, ClientMsg, Direction, FrameCodec, Reason, Remote, ServerMsg, decode_client,
};
use futures::StreamExt;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
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

#[derive(Clone)]
struct Call {
    caller: Device,
    caller_user: String,
    conversation: String,
    callee: String,
    /// The caller's offer, which the accepting device's `call_established` carries.
    offer: String,
    /// Each device's leg: (its call id, its conversation, the device).
    legs: Vec<(String, String, Device)>,
    /// The leg that accepted.
    accepted: Option<usize>,
    /// Set once the set-up's frames (the caller's and every toast) are queued; they are sent
    /// outside the lock, and an accept waits for them (see [`Router::accept`]).
    set_up: Arc<AtomicBool>,
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
            Ok(ClientMsg::CallAccept { rid, call, sdp }) => router.accept(rid, &call, sdp).await,
            Ok(ClientMsg::CallTerminate { rid, call }) => router.terminate(rid, &call),
            Ok(ClientMsg::Message {
                rid,
                call,
                content_type,
                body,
            }) => router.message(rid, &call, content_type, body),
            Ok(ClientMsg::MessageAck { call, msg }) => router.message_ack(&call, msg),
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

/// What an accept comes to (see [`Router::decide`]).
#[expect(
    clippy::large_enum_variant,
    reason = "returned once per accept and taken apart at once, never stored"
)]
enum Decision {
    Won((String, Call, usize)),
    NotYet,
    None,
}

impl Router {
    /// The caller's `call_created`, establishing and ringing, and the toast to every device of
    /// `to`. Ids are minted and frames encoded outside the lock, which guards only the maps,
    /// so the worker threads do not take turns; the call is in the map before any device can
    /// accept it.
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
        let devices = self.state().users.get(&to).cloned().unwrap_or_default();
        let legs: Vec<(String, String, Device)> = devices
            .into_iter()
            .map(|d| (self.id('c'), self.id('v'), d))
            .collect();
        let toasts: Vec<(Outbox, Bytes)> = legs
            .iter()
            .map(|(leg, conv, d)| {
                let toast = group(&[ServerMsg::CallIncoming {
                    call: leg.clone(),
                    conversation: conv.clone(),
                    from: caller_user.to_owned(),
                    toast: None,
                    sdp: sdp.clone(),
                    immediate_auto_accept: false,
                }]);
                (d.out.clone(), toast)
            })
            .collect();
        let out = Direction::Outbound;
        let created = group(&[
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
        ]);
        let set_up = Arc::new(AtomicBool::new(false));
        {
            let mut state = self.state();
            for (leg, _, _) in &legs {
                state.legs.insert(leg.clone(), call.clone());
            }
            state.calls.insert(
                call,
                Call {
                    caller: caller.clone(),
                    caller_user: caller_user.to_owned(),
                    conversation,
                    callee: to,
                    offer: sdp,
                    legs,
                    accepted: None,
                    set_up: set_up.clone(),
                },
            );
        }
        // The caller's frames first: an accept (which needs a toast) must not put the caller's
        // `call_established` ahead of its `call_created`.
        let _ = caller.out.send(created);
        for (device, toast) in toasts {
            let _ = device.send(toast);
        }
        set_up.store(true, Ordering::Release);
    }

    /// The caller's `message`: a `message_received` to the device that accepted, numbered
    /// with the caller's `rid` (the node numbers them per call; here the `rid` is the number,
    /// so the ack needs no map). A message before the accept, or without a `rid`, is dropped.
    fn message(&self, rid: Option<u32>, call: &str, content_type: String, body: Body) {
        let Some(msg) = rid else { return };
        let (leg, device, from) = {
            let state = self.state();
            let Some(c) = state.calls.get(call) else {
                return;
            };
            let Some((leg, _, device)) = c.accepted.and_then(|i| c.legs.get(i)) else {
                return;
            };
            (leg.clone(), device.out.clone(), c.caller_user.clone())
        };
        let _ = device.send(group(&[ServerMsg::MessageReceived {
            call: leg,
            msg,
            from,
            content_type,
            body,
            toast: None,
        }]));
    }

    /// The device's `message_ack`: the caller's `message_delivered`.
    fn message_ack(&self, leg: &str, msg: u32) {
        let (call, caller) = {
            let state = self.state();
            let Some(call) = state.legs.get(leg) else {
                return;
            };
            let Some(c) = state.calls.get(call) else {
                return;
            };
            (call.clone(), c.caller.out.clone())
        };
        let _ = caller.send(group(&[ServerMsg::MessageDelivered {
            rid: Some(msg),
            call,
            msg,
        }]));
    }

    /// The first accept wins: the other devices' toasts come down, the device is established,
    /// then the caller. The lock covers the decision; frames are encoded and sent after it.
    /// An accept that overtakes its call's set-up (the device clicked before the set-up had
    /// queued every toast) waits for it, so no device's toast can come down before it went up.
    async fn accept(&self, rid: Option<u32>, leg: &str, answer: String) {
        let (call_id, call, won) = loop {
            match self.decide(leg) {
                Decision::Won(won) => break won,
                Decision::NotYet => tokio::task::yield_now().await,
                Decision::None => return,
            }
        };
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
        // The device's frames before the caller's: the caller may hang up as soon as it has
        // its `call_established`, and that end must reach the device after these.
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
                sdp: call.offer.clone(),
                remote: Remote {
                    user: call.caller_user.clone(),
                    endpoint: call.caller.endpoint.clone(),
                },
            },
        ]));
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
                sdp: answer,
                remote: Remote {
                    user: call.callee.clone(),
                    endpoint: device.endpoint.clone(),
                },
            },
        ]));
    }

    /// Under the lock: whether the accept of `leg` wins its call (with what its frames need:
    /// the call's id, a copy of the call, the winning leg's index), must wait for the call's
    /// set-up to finish queueing its toasts, or is not for a call still ringing.
    fn decide(&self, leg: &str) -> Decision {
        let mut state = self.state();
        let Some(call_id) = state.legs.get(leg).cloned() else {
            return Decision::None;
        };
        let Some(call) = state.calls.get_mut(&call_id) else {
            return Decision::None;
        };
        if !call.set_up.load(Ordering::Acquire) {
            // The set-up's thread is still queueing the toasts (microseconds).
            return Decision::NotYet;
        }
        let Some(won) = call.legs.iter().position(|(l, _, _)| l == leg) else {
            return Decision::None;
        };
        if call.accepted.is_some() {
            return Decision::None;
        }
        call.accepted = Some(won);
        let call = call.clone();
        for (i, (l, _, _)) in call.legs.iter().enumerate() {
            if i != won {
                state.legs.remove(l);
            }
        }
        Decision::Won((call_id, call, won))
    }

    /// The caller hangs up: its `ok` and end, then the device's end.
    fn terminate(&self, rid: Option<u32>, call_id: &str) {
        let call = {
            let mut state = self.state();
            let Some(call) = state.calls.remove(call_id) else {
                return;
            };
            if let Some((l, _, _)) = call.accepted.map(|i| &call.legs[i]) {
                state.legs.remove(l);
            }
            call
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
