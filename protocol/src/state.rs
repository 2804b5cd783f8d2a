//! The pure call state machine of UCMA's `InstantMessagingCall`.
//!
//! This module owns the call states, the events that drive them and the one
//! table of legal transitions. It holds no call data and performs no I/O, so
//! the server and the client library can both run it and are guaranteed to
//! agree on what a call may do next.

use serde::{Deserialize, Serialize};

/// Where an IM call is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CallState {
    /// An outbound call that has not been established yet.
    Idle,
    /// An inbound call that has not been accepted, declined or forwarded yet.
    Incoming,
    Establishing,
    Established,
    Transferring,
    Terminating,
    Terminated,
}

impl CallState {
    pub const ALL: [CallState; 7] = [
        CallState::Idle,
        CallState::Incoming,
        CallState::Establishing,
        CallState::Established,
        CallState::Transferring,
        CallState::Terminating,
        CallState::Terminated,
    ];

    /// The name used on the wire; must stay identical to the serde name so
    /// logs, metrics labels and messages can be correlated.
    pub fn as_str(self) -> &'static str {
        match self {
            CallState::Idle => "idle",
            CallState::Incoming => "incoming",
            CallState::Establishing => "establishing",
            CallState::Established => "established",
            CallState::Transferring => "transferring",
            CallState::Terminating => "terminating",
            CallState::Terminated => "terminated",
        }
    }

    /// Whether no event can ever leave this state.
    pub fn is_final(self) -> bool {
        matches!(self, CallState::Terminated)
    }
}

/// Which side created the call; the two directions have different tables.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Direction {
    Outbound,
    Inbound,
}

impl Direction {
    /// The name used on the wire (the serde name).
    pub fn as_str(self) -> &'static str {
        match self {
            Direction::Outbound => "outbound",
            Direction::Inbound => "inbound",
        }
    }

    /// Outbound calls start `Idle`, inbound calls start `Incoming`.
    pub fn initial_state(self) -> CallState {
        match self {
            Direction::Outbound => CallState::Idle,
            Direction::Inbound => CallState::Incoming,
        }
    }
}

/// Something that happens to a call, either an application action or a
/// notification from the remote side.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CallEvent {
    /// Outbound: the application calls `BeginEstablish`.
    Establish,
    /// A ringing notification from the remote side.
    Ringing,
    /// Inbound: the application calls `BeginEstablish`/`BeginAccept` on the
    /// incoming call.
    Accept,
    /// `EndEstablish` completed, or the accept succeeded.
    Established,
    /// `BeginEstablish` failed (outbound) or the call was not accepted
    /// (inbound).
    EstablishFailed,
    /// Inbound: the application declines.
    Decline,
    /// Inbound: the application forwards.
    Forward,
    /// Inbound: the remote side cancels its call request.
    RemoteCancel,
    /// The application calls `BeginTransfer`.
    Transfer,
    TransferFailed,
    TransferSucceeded,
    /// The application calls `BeginTerminate` on the call.
    Terminate,
    /// The remote side terminates the call.
    RemoteTerminate,
    /// The application calls `BeginTerminate` on the conversation, which
    /// takes all of its calls down with it.
    ConversationTerminate,
    /// `EndTerminate` completes.
    TerminateCompleted,
}

impl CallEvent {
    pub const ALL: [CallEvent; 15] = [
        CallEvent::Establish,
        CallEvent::Ringing,
        CallEvent::Accept,
        CallEvent::Established,
        CallEvent::EstablishFailed,
        CallEvent::Decline,
        CallEvent::Forward,
        CallEvent::RemoteCancel,
        CallEvent::Transfer,
        CallEvent::TransferFailed,
        CallEvent::TransferSucceeded,
        CallEvent::Terminate,
        CallEvent::RemoteTerminate,
        CallEvent::ConversationTerminate,
        CallEvent::TerminateCompleted,
    ];
}

/// An event that the table does not allow in the call's current state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("{event:?} is not allowed on a {direction:?} call in state {state:?}")]
pub struct TransitionError {
    pub direction: Direction,
    pub state: CallState,
    pub event: CallEvent,
}

/// The state a call moves to when `event` happens in `state`.
///
/// Derived from the same table as [`rule`], so the two cannot disagree.
pub fn transition(
    direction: Direction,
    state: CallState,
    event: CallEvent,
) -> Result<CallState, TransitionError> {
    lookup(direction, state, event)
        .map(|(_, next)| next)
        .ok_or(TransitionError {
            direction,
            state,
            event,
        })
}

/// Which numbered rule of the seed a legal transition is (e.g. `Some(3)` for
/// outbound `Establishing --Terminate-->`), for tests and docs; `None` if the
/// transition is illegal.
///
/// Outbound:
/// 1. `Idle --Establish--> Establishing`: the application begins establishing.
/// 2. `Establishing --Ringing--> Establishing`: the remote side rings.
/// 3. `Establishing --EstablishFailed | Terminate | ConversationTerminate-->
///    Terminating`: establishing failed or was abandoned.
/// 4. `Establishing --Established--> Established`: establishing completed.
/// 5. `Established --Transfer--> Transferring`: the application begins a transfer.
/// 6. `Transferring --TransferFailed--> Established`: the call survives a failed transfer.
/// 7. `Established --Terminate | RemoteTerminate | ConversationTerminate-->
///    Terminating`: either side ends an established call.
/// 8. `Idle --Terminate | ConversationTerminate--> Terminating`: ended before it began.
/// 9. `Transferring --Terminate | TransferSucceeded | ConversationTerminate-->
///    Terminating`: ended during a transfer, or the transfer replaced it.
/// 10. `Terminating --TerminateCompleted--> Terminated`: termination completed.
///
/// Inbound:
/// 1. `Incoming --Accept--> Establishing`: the application accepts.
/// 2. `Establishing --EstablishFailed | Terminate | ConversationTerminate-->
///    Terminating`: accepting failed or was abandoned.
/// 3. `Establishing --Established--> Established`: accepting succeeded.
/// 4. `Established --Transfer--> Transferring`: the application begins a transfer.
/// 5. `Transferring --TransferFailed--> Established`: the call survives a failed transfer.
/// 6. `Established --Terminate | RemoteTerminate | ConversationTerminate-->
///    Terminating`: either side ends an established call.
/// 7. `Incoming --Decline | Forward | Terminate | ConversationTerminate |
///    RemoteCancel--> Terminating`: the offer is refused, redirected or withdrawn.
/// 8. `Transferring --Terminate | TransferSucceeded | ConversationTerminate-->
///    Terminating`: ended during a transfer, or the transfer replaced it.
/// 9. `Terminating --TerminateCompleted--> Terminated`: termination completed.
pub fn rule(direction: Direction, state: CallState, event: CallEvent) -> Option<u8> {
    lookup(direction, state, event).map(|(number, _)| number)
}

/// The single transition table: the seed's rule number and the next state.
/// Both public functions read only this, so adding a rule in one place is
/// all it takes.
fn lookup(direction: Direction, state: CallState, event: CallEvent) -> Option<(u8, CallState)> {
    use CallEvent as E;
    use CallState as S;
    use Direction::{Inbound as In, Outbound as Out};

    let found = match (direction, state, event) {
        (Out, S::Idle, E::Establish) => (1, S::Establishing),
        (Out, S::Establishing, E::Ringing) => (2, S::Establishing),
        (Out, S::Establishing, E::EstablishFailed | E::Terminate | E::ConversationTerminate) => {
            (3, S::Terminating)
        }
        (Out, S::Establishing, E::Established) => (4, S::Established),
        (Out, S::Established, E::Transfer) => (5, S::Transferring),
        (Out, S::Transferring, E::TransferFailed) => (6, S::Established),
        (Out, S::Established, E::Terminate | E::RemoteTerminate | E::ConversationTerminate) => {
            (7, S::Terminating)
        }
        (Out, S::Idle, E::Terminate | E::ConversationTerminate) => (8, S::Terminating),
        (Out, S::Transferring, E::Terminate | E::TransferSucceeded | E::ConversationTerminate) => {
            (9, S::Terminating)
        }
        (Out, S::Terminating, E::TerminateCompleted) => (10, S::Terminated),

        (In, S::Incoming, E::Accept) => (1, S::Establishing),
        (In, S::Establishing, E::EstablishFailed | E::Terminate | E::ConversationTerminate) => {
            (2, S::Terminating)
        }
        (In, S::Establishing, E::Established) => (3, S::Established),
        (In, S::Established, E::Transfer) => (4, S::Transferring),
        (In, S::Transferring, E::TransferFailed) => (5, S::Established),
        (In, S::Established, E::Terminate | E::RemoteTerminate | E::ConversationTerminate) => {
            (6, S::Terminating)
        }
        (
            In,
            S::Incoming,
            E::Decline | E::Forward | E::Terminate | E::ConversationTerminate | E::RemoteCancel,
        ) => (7, S::Terminating),
        (In, S::Transferring, E::Terminate | E::TransferSucceeded | E::ConversationTerminate) => {
            (8, S::Terminating)
        }
        (In, S::Terminating, E::TerminateCompleted) => (9, S::Terminated),

        _ => return None,
    };
    Some(found)
}

#[cfg(test)]
mod tests {
    use super::*;
    use CallEvent as E;
    use CallState as S;
    use Direction::{Inbound as In, Outbound as Out};
    use std::collections::HashSet;

    /// Checks that every listed event moves `from` to `to` and is attributed
    /// to rule `number`.
    fn assert_rule(
        direction: Direction,
        number: u8,
        from: CallState,
        events: &[CallEvent],
        to: CallState,
    ) {
        for &event in events {
            assert_eq!(
                transition(direction, from, event),
                Ok(to),
                "{direction:?} {from:?} --{event:?}-->"
            );
            assert_eq!(
                rule(direction, from, event),
                Some(number),
                "{direction:?} {from:?} --{event:?}-->"
            );
        }
    }

    #[test]
    fn outbound_rule_01_idle_to_establishing_on_begin_establish() {
        assert_rule(Out, 1, S::Idle, &[E::Establish], S::Establishing);
    }

    #[test]
    fn outbound_rule_02_establishing_stays_establishing_on_ringing() {
        assert_rule(Out, 2, S::Establishing, &[E::Ringing], S::Establishing);
    }

    #[test]
    fn outbound_rule_03_establishing_to_terminating_on_failure_or_terminate() {
        assert_rule(
            Out,
            3,
            S::Establishing,
            &[E::EstablishFailed, E::Terminate, E::ConversationTerminate],
            S::Terminating,
        );
    }

    #[test]
    fn outbound_rule_04_establishing_to_established_on_end_establish() {
        assert_rule(Out, 4, S::Establishing, &[E::Established], S::Established);
    }

    #[test]
    fn outbound_rule_05_established_to_transferring_on_begin_transfer() {
        assert_rule(Out, 5, S::Established, &[E::Transfer], S::Transferring);
    }

    #[test]
    fn outbound_rule_06_transferring_to_established_on_transfer_failed() {
        assert_rule(
            Out,
            6,
            S::Transferring,
            &[E::TransferFailed],
            S::Established,
        );
    }

    #[test]
    fn outbound_rule_07_established_to_terminating_on_terminate() {
        assert_rule(
            Out,
            7,
            S::Established,
            &[E::Terminate, E::RemoteTerminate, E::ConversationTerminate],
            S::Terminating,
        );
    }

    #[test]
    fn outbound_rule_08_idle_to_terminating_on_terminate() {
        assert_rule(
            Out,
            8,
            S::Idle,
            &[E::Terminate, E::ConversationTerminate],
            S::Terminating,
        );
    }

    #[test]
    fn outbound_rule_09_transferring_to_terminating_on_terminate_or_transfer_succeeded() {
        assert_rule(
            Out,
            9,
            S::Transferring,
            &[E::Terminate, E::TransferSucceeded, E::ConversationTerminate],
            S::Terminating,
        );
    }

    #[test]
    fn outbound_rule_10_terminating_to_terminated_on_terminate_completed() {
        assert_rule(
            Out,
            10,
            S::Terminating,
            &[E::TerminateCompleted],
            S::Terminated,
        );
    }

    #[test]
    fn inbound_rule_01_incoming_to_establishing_on_accept() {
        assert_rule(In, 1, S::Incoming, &[E::Accept], S::Establishing);
    }

    #[test]
    fn inbound_rule_02_establishing_to_terminating_on_failure_or_terminate() {
        assert_rule(
            In,
            2,
            S::Establishing,
            &[E::EstablishFailed, E::Terminate, E::ConversationTerminate],
            S::Terminating,
        );
    }

    #[test]
    fn inbound_rule_03_establishing_to_established_on_accept_succeeded() {
        assert_rule(In, 3, S::Establishing, &[E::Established], S::Established);
    }

    #[test]
    fn inbound_rule_04_established_to_transferring_on_begin_transfer() {
        assert_rule(In, 4, S::Established, &[E::Transfer], S::Transferring);
    }

    #[test]
    fn inbound_rule_05_transferring_to_established_on_transfer_failed() {
        assert_rule(In, 5, S::Transferring, &[E::TransferFailed], S::Established);
    }

    #[test]
    fn inbound_rule_06_established_to_terminating_on_terminate() {
        assert_rule(
            In,
            6,
            S::Established,
            &[E::Terminate, E::RemoteTerminate, E::ConversationTerminate],
            S::Terminating,
        );
    }

    #[test]
    fn inbound_rule_07_incoming_to_terminating_on_decline_forward_cancel_or_terminate() {
        assert_rule(
            In,
            7,
            S::Incoming,
            &[
                E::Decline,
                E::Forward,
                E::Terminate,
                E::ConversationTerminate,
                E::RemoteCancel,
            ],
            S::Terminating,
        );
    }

    #[test]
    fn inbound_rule_08_transferring_to_terminating_on_terminate_or_transfer_succeeded() {
        assert_rule(
            In,
            8,
            S::Transferring,
            &[E::Terminate, E::TransferSucceeded, E::ConversationTerminate],
            S::Terminating,
        );
    }

    #[test]
    fn inbound_rule_09_terminating_to_terminated_on_terminate_completed() {
        assert_rule(
            In,
            9,
            S::Terminating,
            &[E::TerminateCompleted],
            S::Terminated,
        );
    }

    /// Written out by hand from the seed rather than derived from `rule`, so
    /// a mistake in the table cannot also hide in the expectation. One row
    /// per line keeps it checkable against the seed at a glance.
    #[rustfmt::skip]
    const LEGAL: [(Direction, CallState, CallEvent, CallState, u8); 36] = [
        (Out, S::Idle, E::Establish, S::Establishing, 1),
        (Out, S::Establishing, E::Ringing, S::Establishing, 2),
        (Out, S::Establishing, E::EstablishFailed, S::Terminating, 3),
        (Out, S::Establishing, E::Terminate, S::Terminating, 3),
        (Out, S::Establishing, E::ConversationTerminate, S::Terminating, 3),
        (Out, S::Establishing, E::Established, S::Established, 4),
        (Out, S::Established, E::Transfer, S::Transferring, 5),
        (Out, S::Transferring, E::TransferFailed, S::Established, 6),
        (Out, S::Established, E::Terminate, S::Terminating, 7),
        (Out, S::Established, E::RemoteTerminate, S::Terminating, 7),
        (Out, S::Established, E::ConversationTerminate, S::Terminating, 7),
        (Out, S::Idle, E::Terminate, S::Terminating, 8),
        (Out, S::Idle, E::ConversationTerminate, S::Terminating, 8),
        (Out, S::Transferring, E::Terminate, S::Terminating, 9),
        (Out, S::Transferring, E::TransferSucceeded, S::Terminating, 9),
        (Out, S::Transferring, E::ConversationTerminate, S::Terminating, 9),
        (Out, S::Terminating, E::TerminateCompleted, S::Terminated, 10),
        (In, S::Incoming, E::Accept, S::Establishing, 1),
        (In, S::Establishing, E::EstablishFailed, S::Terminating, 2),
        (In, S::Establishing, E::Terminate, S::Terminating, 2),
        (In, S::Establishing, E::ConversationTerminate, S::Terminating, 2),
        (In, S::Establishing, E::Established, S::Established, 3),
        (In, S::Established, E::Transfer, S::Transferring, 4),
        (In, S::Transferring, E::TransferFailed, S::Established, 5),
        (In, S::Established, E::Terminate, S::Terminating, 6),
        (In, S::Established, E::RemoteTerminate, S::Terminating, 6),
        (In, S::Established, E::ConversationTerminate, S::Terminating, 6),
        (In, S::Incoming, E::Decline, S::Terminating, 7),
        (In, S::Incoming, E::Forward, S::Terminating, 7),
        (In, S::Incoming, E::Terminate, S::Terminating, 7),
        (In, S::Incoming, E::ConversationTerminate, S::Terminating, 7),
        (In, S::Incoming, E::RemoteCancel, S::Terminating, 7),
        (In, S::Transferring, E::Terminate, S::Terminating, 8),
        (In, S::Transferring, E::TransferSucceeded, S::Terminating, 8),
        (In, S::Transferring, E::ConversationTerminate, S::Terminating, 8),
        (In, S::Terminating, E::TerminateCompleted, S::Terminated, 9),
    ];

    #[test]
    fn exactly_the_listed_transitions_are_legal() {
        let keys: HashSet<_> = LEGAL.iter().map(|&(d, s, e, _, _)| (d, s, e)).collect();
        assert_eq!(keys.len(), LEGAL.len(), "duplicate entry in LEGAL");

        let mut legal_seen = 0;
        for direction in [Out, In] {
            for state in CallState::ALL {
                for event in CallEvent::ALL {
                    let expected = LEGAL
                        .iter()
                        .find(|&&(d, s, e, _, _)| (d, s, e) == (direction, state, event));
                    let got = transition(direction, state, event);
                    match expected {
                        Some(&(_, _, _, to, number)) => {
                            legal_seen += 1;
                            assert_eq!(got, Ok(to), "{direction:?} {state:?} --{event:?}-->");
                            assert_eq!(rule(direction, state, event), Some(number));
                        }
                        None => {
                            assert_eq!(
                                got,
                                Err(TransitionError {
                                    direction,
                                    state,
                                    event
                                }),
                                "{direction:?} {state:?} --{event:?}--> should be illegal"
                            );
                            assert_eq!(rule(direction, state, event), None);
                        }
                    }
                }
            }
        }
        assert_eq!(legal_seen, LEGAL.len());
    }

    #[test]
    fn terminated_is_final() {
        for state in CallState::ALL {
            assert_eq!(state.is_final(), state == S::Terminated, "{state:?}");
        }
        for direction in [Out, In] {
            for event in CallEvent::ALL {
                assert!(transition(direction, S::Terminated, event).is_err());
                assert_eq!(rule(direction, S::Terminated, event), None);
            }
        }
    }

    #[test]
    fn initial_states() {
        assert_eq!(Out.initial_state(), S::Idle);
        assert_eq!(In.initial_state(), S::Incoming);
    }

    /// The exhaustive test trusts `ALL`; a match here stops compiling when a
    /// variant is added, so `ALL` cannot silently fall behind.
    #[test]
    fn all_lists_every_variant_once_in_declaration_order() {
        for (i, state) in CallState::ALL.into_iter().enumerate() {
            let index = match state {
                S::Idle => 0,
                S::Incoming => 1,
                S::Establishing => 2,
                S::Established => 3,
                S::Transferring => 4,
                S::Terminating => 5,
                S::Terminated => 6,
            };
            assert_eq!(index, i);
        }
        for (i, event) in CallEvent::ALL.into_iter().enumerate() {
            let index = match event {
                E::Establish => 0,
                E::Ringing => 1,
                E::Accept => 2,
                E::Established => 3,
                E::EstablishFailed => 4,
                E::Decline => 5,
                E::Forward => 6,
                E::RemoteCancel => 7,
                E::Transfer => 8,
                E::TransferFailed => 9,
                E::TransferSucceeded => 10,
                E::Terminate => 11,
                E::RemoteTerminate => 12,
                E::ConversationTerminate => 13,
                E::TerminateCompleted => 14,
            };
            assert_eq!(index, i);
        }
    }

    #[test]
    fn as_str_matches_serde_names() -> Result<(), Box<dyn std::error::Error>> {
        let expected = [
            "idle",
            "incoming",
            "establishing",
            "established",
            "transferring",
            "terminating",
            "terminated",
        ];
        for (state, name) in CallState::ALL.into_iter().zip(expected) {
            assert_eq!(state.as_str(), name);
            let encoded: String = rmp_serde::from_slice(&rmp_serde::to_vec(&state)?)?;
            assert_eq!(encoded, name);
            let decoded: CallState = rmp_serde::from_slice(&rmp_serde::to_vec(name)?)?;
            assert_eq!(decoded, state);
        }
        for (direction, name) in [(Out, "outbound"), (In, "inbound")] {
            let encoded: String = rmp_serde::from_slice(&rmp_serde::to_vec(&direction)?)?;
            assert_eq!(encoded, name);
        }
        Ok(())
    }

    #[test]
    fn error_message_names_direction_state_and_event() {
        let err = transition(In, S::Idle, E::Establish);
        assert_eq!(
            err.map_err(|e| e.to_string()),
            Err("Establish is not allowed on a Inbound call in state Idle".to_owned())
        );
    }
}
