//! Calls as one connection sees them: [`Leg`] names an endpoint's leg of a call, and the
//! helpers here place, ring, accept and end legs while asserting every frame exactly. The call
//! tests and the fork tests check the same frames for these steps, so the expectations live
//! here once and a change to the contract is made in one place.
//!
//! The caller's offer is a parameter wherever it is echoed back, because test files choose
//! their own: the call tests make it differ from [`answer`] so every `sdp` field shows whose
//! description it carries.

use crate::{Raw, answer, expect, request_ok, send_request, start_node};
use confab_actors::RunningNode;
use confab_protocol::*;

/// The reason of a leg ended by its own endpoint's request.
pub const TERMINATED_LOCALLY: (u16, &str) = (200, "Terminated locally");
/// The reason of a leg ended because the other side's endpoint ended the call.
pub const TERMINATED_REMOTELY: (u16, &str) = (200, "Terminated remotely");

/// A node whose fork timers never fire within a test: for rules that must not depend on them.
pub fn quiet_node() -> RunningNode {
    start_node(|s| {
        s.fork.toast_timeout_ms = 60_000;
        s.fork.auto_accept_grace_ms = 60_000;
    })
}

/// One endpoint's leg of a call, as its own connection names it.
#[derive(Clone, Debug)]
pub struct Leg {
    pub call: String,
    pub conversation: String,
    pub direction: Direction,
}

impl Leg {
    pub fn state(
        &self,
        state: CallState,
        previous: CallState,
        reason: Option<Reason>,
    ) -> ServerMsg {
        ServerMsg::CallState {
            call: self.call.clone(),
            conversation: self.conversation.clone(),
            direction: self.direction,
            state,
            previous,
            reason,
        }
    }

    /// `from` → terminating → terminated, both with `reason`.
    pub fn end(&self, from: CallState, (code, text): (u16, &str)) -> Vec<ServerMsg> {
        let r = Some(Reason::new(code, text));
        vec![
            self.state(CallState::Terminating, from, r.clone()),
            self.state(CallState::Terminated, CallState::Terminating, r),
        ]
    }
}

/// How the other side of a call names `raw` in `call_established` and `call_transferred`.
pub fn remote_of(raw: &Raw) -> Remote {
    Remote {
        user: raw.user.clone(),
        endpoint: raw.endpoint.clone(),
    }
}

pub fn text_toast(text: &str) -> Toast {
    Toast {
        content_type: "text/plain".into(),
        body: Body::Text(text.into()),
    }
}

pub fn terminate(leg: &Leg) -> ClientMsg {
    ClientMsg::CallTerminate {
        rid: None,
        call: leg.call.clone(),
    }
}

/// The next `want.len()` frames on `raw` must be exactly `want`, in this order.
pub async fn expect_seq(raw: &mut Raw, want: Vec<ServerMsg>) {
    for w in want {
        expect(raw, w).await;
    }
}

/// The next `want.len()` frames on `raw` must be exactly `want`, in any order. Used only for
/// events whose relative order the contract does not fix.
async fn expect_any_order(raw: &mut Raw, mut want: Vec<ServerMsg>) {
    while !want.is_empty() {
        let got = raw.recv().await;
        let Some(i) = want.iter().position(|w| *w == got) else {
            panic!(
                "{} ({}): unexpected {got:?}; still expecting {want:?}",
                raw.user, raw.endpoint
            );
        };
        want.remove(i);
    }
}

/// The next frames on `raw` must be `leg`'s [`Leg::end`].
pub async fn expect_end(raw: &mut Raw, leg: &Leg, from: CallState, reason: (u16, &str)) {
    expect_seq(raw, leg.end(from, reason)).await;
}

/// `call_establish` with `sdp`: the reply first, then idle → establishing.
pub async fn place_call_with(
    caller: &mut Raw,
    to: &str,
    conversation: Option<&str>,
    toast: Option<&str>,
    sdp: String,
) -> Leg {
    let rid = send_request(
        caller,
        ClientMsg::CallEstablish {
            rid: None,
            to: to.to_owned(),
            conversation: conversation.map(str::to_owned),
            toast: toast.map(text_toast),
            sdp,
        },
    )
    .await;
    let leg = match caller.recv().await {
        ServerMsg::CallCreated {
            rid: r,
            call,
            conversation,
        } if r == rid => Leg {
            call,
            conversation,
            direction: Direction::Outbound,
        },
        other => panic!("expected call_created before any call_state, got {other:?}"),
    };
    expect(
        caller,
        leg.state(CallState::Establishing, CallState::Idle, None),
    )
    .await;
    leg
}

/// The first `call_ringing`, with its establishing → establishing (outbound rule 2).
pub async fn expect_first_ringing(caller: &mut Raw, leg: &Leg) {
    expect_any_order(
        caller,
        vec![
            ServerMsg::CallRinging {
                call: leg.call.clone(),
            },
            leg.state(CallState::Establishing, CallState::Establishing, None),
        ],
    )
    .await;
}

/// The next frame must be `call_incoming` from the user `from` carrying `offer` and the toast
/// `toast_text`.
pub async fn expect_incoming(
    callee: &mut Raw,
    from: &str,
    toast_text: Option<&str>,
    offer: &str,
    immediate: bool,
) -> Leg {
    match callee.recv().await {
        ServerMsg::CallIncoming {
            call,
            conversation,
            from: f,
            toast,
            sdp,
            immediate_auto_accept,
        } => {
            assert_eq!(f, from, "call_incoming.from");
            assert_eq!(toast, toast_text.map(text_toast), "call_incoming.toast");
            assert_eq!(sdp, offer, "call_incoming.sdp is the caller's offer");
            assert_eq!(
                immediate_auto_accept, immediate,
                "call_incoming.immediate_auto_accept on {}",
                callee.endpoint
            );
            Leg {
                call,
                conversation,
                direction: Direction::Inbound,
            }
        }
        other => panic!("{}: expected call_incoming, got {other:?}", callee.endpoint),
    }
}

/// What follows the `ok` to a winning `call_accept`: incoming → establishing → established
/// with `call_established{sdp: offer, remote: caller}`.
pub async fn expect_callee_established(callee: &mut Raw, leg: &Leg, offer: &str, caller: Remote) {
    expect(
        callee,
        leg.state(CallState::Establishing, CallState::Incoming, None),
    )
    .await;
    expect_any_order(
        callee,
        vec![
            leg.state(CallState::Established, CallState::Establishing, None),
            ServerMsg::CallEstablished {
                call: leg.call.clone(),
                sdp: offer.to_owned(),
                remote: caller,
            },
        ],
    )
    .await;
}

/// `call_accept` with [`answer`] that wins: `ok` first, then
/// [`expect_callee_established`], then the toast (msg 1) when there is one.
pub async fn accept_and_win(
    callee: &mut Raw,
    leg: &Leg,
    offer: &str,
    caller: &Remote,
    toast_text: Option<&str>,
) {
    request_ok(
        callee,
        ClientMsg::CallAccept {
            rid: None,
            call: leg.call.clone(),
            sdp: answer(),
        },
    )
    .await;
    expect_callee_established(callee, leg, offer, caller.clone()).await;
    if let Some(text) = toast_text {
        expect(
            callee,
            ServerMsg::MessageReceived {
                call: leg.call.clone(),
                msg: 1,
                from: caller.user.clone(),
                content_type: "text/plain".into(),
                body: Body::Text(text.into()),
                toast: Some(true),
            },
        )
        .await;
    }
}

/// The caller's establishing → established with `call_established{sdp: answer, remote}`.
pub async fn expect_caller_established(caller: &mut Raw, leg: &Leg, remote: Remote) {
    expect_any_order(
        caller,
        vec![
            leg.state(CallState::Established, CallState::Establishing, None),
            ServerMsg::CallEstablished {
                call: leg.call.clone(),
                sdp: answer(),
                remote,
            },
        ],
    )
    .await;
}
