//! Checks each `call_state` event against the shared state machine
//! ([`confab_protocol::state::transition`]): the node's `previous` must be the state this
//! library tracked, and the step must be a legal transition of the seed's tables. Pure, so it
//! is tested edge by edge without a socket.

use confab_protocol::state::{CallEvent, CallState, Direction, transition};
use thiserror::Error;

/// Why a reported transition does not fit what this library knew about the call.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
pub(crate) enum TrackError {
    /// The node's `previous` is not the state this library last saw.
    #[error("the node moved the call from {previous:?}, but it was {tracked:?} here")]
    Diverged {
        tracked: CallState,
        previous: CallState,
    },
    /// No event of the state machine leads from `previous` to `next`.
    #[error("{previous:?} -> {next:?} is not a legal {direction:?} transition")]
    Illegal {
        direction: Direction,
        previous: CallState,
        next: CallState,
    },
}

/// The event that explains `previous -> next`, after checking `previous` against `tracked`.
///
/// The wire does not name the event, only the two states; the first event of the table that
/// makes the step is returned, which is enough to prove the step legal.
pub(crate) fn check(
    direction: Direction,
    tracked: CallState,
    previous: CallState,
    next: CallState,
) -> Result<CallEvent, TrackError> {
    if tracked != previous {
        return Err(TrackError::Diverged { tracked, previous });
    }
    CallEvent::ALL
        .into_iter()
        .find(|&event| transition(direction, previous, event) == Ok(next))
        .ok_or(TrackError::Illegal {
            direction,
            previous,
            next,
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use CallState as S;
    use Direction::{Inbound, Outbound};

    #[test]
    fn accepts_the_outbound_life_of_a_call() {
        let steps = [
            (S::Idle, S::Establishing),
            (S::Establishing, S::Establishing),
            (S::Establishing, S::Established),
            (S::Established, S::Transferring),
            (S::Transferring, S::Established),
            (S::Established, S::Terminating),
            (S::Terminating, S::Terminated),
        ];
        for (previous, next) in steps {
            assert!(
                check(Outbound, previous, previous, next).is_ok(),
                "{previous:?} -> {next:?}"
            );
        }
    }

    #[test]
    fn accepts_the_inbound_life_of_a_call() {
        for (previous, next) in [
            (S::Incoming, S::Establishing),
            (S::Establishing, S::Established),
            (S::Established, S::Terminating),
            (S::Terminating, S::Terminated),
            (S::Incoming, S::Terminating),
        ] {
            assert!(check(Inbound, previous, previous, next).is_ok());
        }
    }

    #[test]
    fn rejects_a_divergent_previous_state() {
        assert_eq!(
            check(Outbound, S::Idle, S::Establishing, S::Established),
            Err(TrackError::Diverged {
                tracked: S::Idle,
                previous: S::Establishing
            })
        );
    }

    #[test]
    fn rejects_illegal_steps() {
        for (direction, previous, next) in [
            (Outbound, S::Idle, S::Established),
            (Outbound, S::Terminated, S::Establishing),
            (Inbound, S::Incoming, S::Established),
            (Inbound, S::Incoming, S::Incoming),
            (Outbound, S::Establishing, S::Transferring),
        ] {
            assert!(matches!(
                check(direction, previous, previous, next),
                Err(TrackError::Illegal { .. })
            ));
        }
    }
}
