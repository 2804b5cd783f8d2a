//! The fork decision as pure code (docs/protocol.md §5 "Forking, step by step"): which fork
//! wins, what every other fork and the caller hear, when the toast runs out, who is asked to
//! auto-accept and in what order. No actor, clock or address here: [`ForkDecision`] takes the
//! call's inputs one at a time (offers, a fork ready or lost, accepts, declines, forwards, the
//! caller cancelling, the timer, a ranking) and answers each with the [`Action`]s to carry out,
//! in order. The fork arbiter (`arbiter.rs`) feeds it and carries out its answers; the rules
//! and their tests live here, one test per rule.
//!
//! Forks are named by their index, in the order they were offered (the arbiter keeps its legs in
//! the same order), and the answers are handed back for reuse ([`ForkDecision::recycle`]): a
//! forked call is the node's hot path, and names and fresh vectors cost allocations on it.

use confab_protocol::Reason;
use std::collections::HashSet;
use std::time::Duration;

use crate::reasons;

/// The timers and the forward limit of one call (`[fork]`, as they were when it came).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timers {
    pub toast: Duration,
    pub grace: Duration,
    pub max_forwards: u32,
}

impl From<&crate::settings::Fork> for Timers {
    fn from(s: &crate::settings::Fork) -> Timers {
        Timers {
            toast: Duration::from_millis(s.toast_timeout_ms),
            grace: Duration::from_millis(s.auto_accept_grace_ms),
            max_forwards: s.max_forwards,
        }
    }
}

/// Why a call was decided (`confab_fork_decisions_total{cause}`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cause {
    /// The user had no endpoint to offer the call to.
    NoEndpoints,
    /// The only endpoint accepted.
    Immediate,
    /// A fork was clicked before the toast ran out.
    Click,
    /// A fork accepted after the toast ran out (asked to, or clicked late).
    Timeout,
    /// Declined: a 6xx, the last fork gone, or too many forwards.
    Declined,
    /// Nobody accepted and nobody is left to ask.
    Unanswered,
    /// The caller cancelled.
    Cancelled,
}

impl Cause {
    /// Every cause, in declaration order (for the metrics' cached handles).
    pub const ALL: [Cause; 7] = [
        Cause::NoEndpoints,
        Cause::Immediate,
        Cause::Click,
        Cause::Timeout,
        Cause::Declined,
        Cause::Unanswered,
        Cause::Cancelled,
    ];

    pub fn label(self) -> &'static str {
        match self {
            Cause::NoEndpoints => "no_endpoints",
            Cause::Immediate => "immediate",
            Cause::Click => "click",
            Cause::Timeout => "timeout",
            Cause::Declined => "declined",
            Cause::Unanswered => "unanswered",
            Cause::Cancelled => "cancelled",
        }
    }
}

/// What the arbiter does, in the order given.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Offer the call to the endpoint of this fork, the `fork`th offered (`immediate`: it is
    /// the only one).
    Offer { fork: usize, immediate: bool },
    /// Tell the caller the call rings.
    Ringing,
    /// (Re)arm the call's one timer; when it fires, feed [`ForkDecision::timer`].
    StartTimer(Duration),
    /// Ask presence for the target's ranking now; feed it to [`ForkDecision::ranked`] with
    /// this round.
    Rank { round: u32 },
    /// Send `auto_accept_needed` to this fork.
    AskToAccept { fork: usize },
    /// This fork won: connect its leg with the caller's (the winner first).
    Connect { fork: usize },
    /// This fork's accept lost (the call was decided, or the fork is gone).
    RefuseAccept { fork: usize },
    /// End this fork with `reason`; `elsewhere` when another fork won.
    Cancel {
        fork: usize,
        reason: Reason,
        elsewhere: bool,
    },
    /// The caller's leg ends with `reason`.
    FailCaller(Reason),
    /// The caller hears the call moved to `to`; then offer it to `to`'s endpoints.
    Forward { to: String },
    /// The call is decided; count it.
    Decided(Cause),
}

/// Where a fork stands, as the decision sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ForkState {
    /// Offered; its endpoint has not made its leg yet.
    Offered,
    Ringing,
    /// Gone with a final code (a decline's, 200 for the winner, 480 for a lost fork, or the
    /// code it was cancelled with).
    Gone(u16),
}

#[derive(Debug)]
struct Entry {
    endpoint: String,
    state: ForkState,
    /// Why it declined, when it did: the caller gets this reason if its code is the best.
    declined: Option<Reason>,
    /// The round (target) it rang in: after a forward, the old target's forks no longer count
    /// towards the caller's final answer.
    round: u32,
}

/// Where the call is in its timeline.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Phase {
    /// The forks ring; the toast timer runs.
    Toast,
    /// The toast ran out; the ranking is on its way.
    Ranking,
    /// `auto_accept_needed` went to this endpoint; the grace timer runs.
    Asking(Option<String>),
}

/// One call's fork decision.
#[derive(Debug)]
pub struct ForkDecision {
    timers: Timers,
    forks: Vec<Entry>,
    /// The current round: 0, then one more per forward.
    round: u32,
    immediate: bool,
    decided: Option<Cause>,
    phase: Phase,
    ranking: Vec<String>,
    tried: HashSet<String>,
    /// The answer being built, and its buffer once handed back.
    out: Vec<Action>,
}

impl ForkDecision {
    pub fn new(timers: Timers) -> ForkDecision {
        ForkDecision {
            timers,
            forks: Vec::new(),
            round: 0,
            immediate: false,
            decided: None,
            phase: Phase::Toast,
            ranking: Vec::new(),
            tried: HashSet::new(),
            out: Vec::new(),
        }
    }

    /// Hands an answer's vector back, so that the next answer needs no allocation.
    pub fn recycle(&mut self, mut actions: Vec<Action>) {
        actions.clear();
        if actions.capacity() > self.out.capacity() {
            self.out = actions;
        }
    }

    /// A fresh answer, in the recycled buffer.
    fn answer(&mut self) -> Vec<Action> {
        std::mem::take(&mut self.out)
    }

    /// The endpoint of the `fork`th fork.
    pub fn endpoint(&self, fork: usize) -> Option<&str> {
        self.forks.get(fork).map(|e| e.endpoint.as_str())
    }

    pub fn decided(&self) -> Option<Cause> {
        self.decided
    }

    /// Whether the current round rings a single endpoint (`immediate_auto_accept`).
    pub fn immediate(&self) -> bool {
        self.immediate
    }

    pub fn state(&self, fork: usize) -> Option<&ForkState> {
        self.forks.get(fork).map(|e| &e.state)
    }

    /// The fork `call` while the call is undecided and the fork not gone: only such a fork's
    /// decline or forward counts.
    fn live_fork(&mut self, fork: usize) -> Option<&mut Entry> {
        if self.decided.is_some() {
            return None;
        }
        self.forks
            .get_mut(fork)
            .filter(|e| !matches!(e.state, ForkState::Gone(_)))
    }

    fn decide(&mut self, cause: Cause, out: &mut Vec<Action>) {
        self.decided = Some(cause);
        out.push(Action::Decided(cause));
    }

    /// Rule 2: the call goes to every endpoint of the target the arbiter found (the calling
    /// endpoint already left out); they become the next forks, in this order. None: the caller ends with 480 and
    /// hears no ringing. One: it is offered with `immediate_auto_accept` and the timer is the
    /// toast plus the grace. More: each rings with a toast for `toast` (rule 3: the caller
    /// hears `ringing` after the offers).
    pub fn offer(&mut self, endpoints: impl ExactSizeIterator<Item = String>) -> Vec<Action> {
        let mut out = self.answer();
        if self.decided.is_some() {
            return out;
        }
        if endpoints.len() == 0 {
            self.decide(Cause::NoEndpoints, &mut out);
            out.push(Action::FailCaller(reasons::temporarily_unavailable()));
            return out;
        }
        self.immediate = endpoints.len() == 1;
        for endpoint in endpoints {
            out.push(Action::Offer {
                fork: self.forks.len(),
                immediate: self.immediate,
            });
            self.forks.push(Entry {
                endpoint,
                state: ForkState::Offered,
                declined: None,
                round: self.round,
            });
        }
        out.push(Action::Ringing);
        let t = self.timers;
        out.push(Action::StartTimer(if self.immediate {
            t.toast + t.grace
        } else {
            t.toast
        }));
        out
    }

    /// A fork's leg exists: an offered fork now rings. (One already cancelled stays gone; the
    /// arbiter hands its leg the cancel it kept.)
    pub fn ready(&mut self, fork: usize) {
        if let Some(e) = self.forks.get_mut(fork)
            && e.state == ForkState::Offered
        {
            e.state = ForkState::Ringing;
        }
    }

    /// Rule 4: the first accept of a ringing fork wins; every other fork ends with 200 "Call
    /// completed elsewhere". An accept after the decision, or on a fork that is gone, loses.
    pub fn accept(&mut self, fork: usize) -> Vec<Action> {
        let mut out = self.answer();
        let Some(e) = self.forks.get(fork) else {
            return out;
        };
        if self.decided.is_some() || e.state != ForkState::Ringing {
            out.push(Action::RefuseAccept { fork });
            return out;
        }
        let cause = if self.immediate {
            Cause::Immediate
        } else if self.phase == Phase::Toast {
            Cause::Click
        } else {
            Cause::Timeout
        };
        self.decide(cause, &mut out);
        if let Some(e) = self.forks.get_mut(fork) {
            e.state = ForkState::Gone(200);
        }
        out.push(Action::Connect { fork });
        self.cancel_all(Some(fork), reasons::completed_elsewhere(), true, &mut out);
        out
    }

    /// Rule 7: a 4xx/5xx decline removes only that fork; a 6xx ends the call (the other forks
    /// end with 603 "Declined elsewhere", the caller with the 6xx). A decline after the
    /// decision, or of a fork that is gone, changes nothing.
    pub fn decline(&mut self, fork: usize, reason: Reason) -> Vec<Action> {
        let mut out = self.answer();
        let Some(e) = self.live_fork(fork) else {
            return out;
        };
        e.state = ForkState::Gone(reason.code);
        e.declined = Some(reason.clone());
        if reason.code >= 600 {
            self.decide(Cause::Declined, &mut out);
            self.cancel_all(Some(fork), reasons::declined_elsewhere(), false, &mut out);
            out.push(Action::FailCaller(reason));
        } else {
            self.after_fork_gone(fork, &mut out);
        }
        out
    }

    /// Rule 7: a lost fork (its endpoint went, or it could not be offered) counts as a 480
    /// decline.
    pub fn lost(&mut self, fork: usize) -> Vec<Action> {
        let mut out = self.answer();
        let decided = self.decided.is_some();
        let Some(e) = self.forks.get_mut(fork) else {
            return out;
        };
        let was_gone = matches!(e.state, ForkState::Gone(_));
        e.state = ForkState::Gone(480);
        if !was_gone && !decided {
            self.after_fork_gone(fork, &mut out);
        }
        out
    }

    /// Rule 9 and "Forward": every fork ends with 302, the caller hears of the move, and the
    /// call is offered to the new target in a new round (its toast timer starts again). More
    /// than `max_forwards` forwards end the call with 483 for the caller.
    pub fn forward(&mut self, fork: usize, to: &str) -> Vec<Action> {
        let mut out = self.answer();
        let Some(e) = self.live_fork(fork) else {
            return out;
        };
        e.state = ForkState::Gone(302);
        self.cancel_all(Some(fork), reasons::moved_temporarily(), false, &mut out);
        self.round += 1;
        if self.round > self.timers.max_forwards {
            self.decide(Cause::Declined, &mut out);
            out.push(Action::FailCaller(reasons::too_many_hops()));
            return out;
        }
        self.phase = Phase::Toast;
        self.tried.clear();
        self.ranking.clear();
        out.push(Action::Forward { to: to.to_owned() });
        out
    }

    /// Rule 8: the caller cancelled (or was lost): every fork ends with `reason` (487, or 408
    /// / 503 for a lost caller), and the caller's leg gets 487 as its last word.
    pub fn caller_cancelled(&mut self, reason: Reason) -> Vec<Action> {
        let mut out = self.answer();
        if self.decided.is_some() {
            return out;
        }
        self.decide(Cause::Cancelled, &mut out);
        self.cancel_all(None, reason, false, &mut out);
        out.push(Action::FailCaller(reasons::request_terminated()));
        out
    }

    /// The timer ran out. Rule 6: a single endpoint that has not accepted after toast plus
    /// grace: 480 for everyone. Rule 5: with several, the toast ran out: rank the endpoints
    /// now. While asking: the asked endpoint's grace ran out: ask the next.
    pub fn timer(&mut self) -> Vec<Action> {
        let mut out = self.answer();
        if self.decided.is_some() {
            return out;
        }
        match self.phase {
            Phase::Toast if self.immediate => self.give_up(&mut out),
            Phase::Toast => {
                self.phase = Phase::Ranking;
                out.push(Action::Rank { round: self.round });
            }
            Phase::Ranking => {}
            Phase::Asking(_) => self.ask_next(&mut out),
        }
        out
    }

    /// Rule 5: the ranking of the target's endpoints at the moment the toast ran out, most
    /// active first. One of an earlier round (the call was forwarded meanwhile) is ignored.
    pub fn ranked(&mut self, ranking: Vec<String>, round: u32) -> Vec<Action> {
        let mut out = self.answer();
        if self.decided.is_some() || round != self.round || self.phase != Phase::Ranking {
            return out;
        }
        self.ranking = ranking;
        self.ask_next(&mut out);
        out
    }

    /// Rule 5: `auto_accept_needed` to the most active endpoint not asked yet that still
    /// rings, with the grace timer; nobody left: 480 for everyone.
    fn ask_next(&mut self, out: &mut Vec<Action>) {
        let next = self.ranking.iter().find_map(|ep| {
            if self.tried.contains(ep) {
                return None;
            }
            self.forks
                .iter()
                .position(|f| &f.endpoint == ep && f.state == ForkState::Ringing)
                .map(|fork| (ep.clone(), fork))
        });
        let Some((endpoint, fork)) = next else {
            self.phase = Phase::Asking(None);
            return self.give_up(out);
        };
        self.tried.insert(endpoint.clone());
        self.phase = Phase::Asking(Some(endpoint));
        out.push(Action::AskToAccept { fork });
        out.push(Action::StartTimer(self.timers.grace));
    }

    /// Nobody accepted and nobody is left to ask: 480 to every fork and to the caller.
    fn give_up(&mut self, out: &mut Vec<Action>) {
        self.decide(Cause::Unanswered, out);
        self.cancel_all(None, reasons::temporarily_unavailable(), false, out);
        out.push(Action::FailCaller(reasons::temporarily_unavailable()));
    }

    /// Rule 7's end: when the round's last fork is gone, the caller gets the best final answer
    /// (RFC 3261 §16.7; a fork's own reason when it declined with that code). Rule 5: when the
    /// endpoint asked to auto-accept declined or was lost, the next one is asked at once.
    fn after_fork_gone(&mut self, fork: usize, out: &mut Vec<Action>) {
        let round: Vec<&Entry> = self
            .forks
            .iter()
            .filter(|f| f.round == self.round)
            .collect();
        if round.iter().all(|f| matches!(f.state, ForkState::Gone(_))) {
            let codes: Vec<u16> = round
                .iter()
                .filter_map(|f| match f.state {
                    ForkState::Gone(c) => Some(c),
                    _ => None,
                })
                .collect();
            let best = reasons::best_final(&codes);
            let reason = round
                .iter()
                .find_map(|f| f.declined.as_ref().filter(|r| r.code == best.code))
                .cloned()
                .unwrap_or(best);
            self.decide(Cause::Declined, out);
            out.push(Action::FailCaller(reason));
            return;
        }
        let asked = match &self.phase {
            Phase::Asking(Some(endpoint)) => self
                .forks
                .get(fork)
                .is_some_and(|f| &f.endpoint == endpoint),
            _ => false,
        };
        if asked {
            self.ask_next(out);
        }
    }

    /// Ends every fork still alive (but `except`) with `reason`.
    fn cancel_all(
        &mut self,
        except: Option<usize>,
        reason: Reason,
        elsewhere: bool,
        out: &mut Vec<Action>,
    ) {
        for (fork, f) in self.forks.iter_mut().enumerate() {
            if Some(fork) == except || matches!(f.state, ForkState::Gone(_)) {
                continue;
            }
            f.state = ForkState::Gone(reason.code);
            out.push(Action::Cancel {
                fork,
                reason: reason.clone(),
                elsewhere,
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TIMERS: Timers = Timers {
        toast: Duration::from_secs(10),
        grace: Duration::from_secs(5),
        max_forwards: 2,
    };

    /// Forks are named by letter in the order offered: `a` is fork 0, `b` fork 1, ...
    const A: usize = 0;
    const B: usize = 1;
    const C: usize = 2;
    const D: usize = 3;

    fn offers(endpoints: &[&str]) -> std::vec::IntoIter<String> {
        endpoints
            .iter()
            .map(|e| e.to_string())
            .collect::<Vec<_>>()
            .into_iter()
    }

    /// A call ringing on `endpoints`, every leg ready.
    fn ringing(endpoints: &[&str]) -> ForkDecision {
        let mut d = ForkDecision::new(TIMERS);
        d.offer(offers(endpoints));
        for fork in 0..endpoints.len() {
            d.ready(fork);
        }
        d
    }

    fn cancel(fork: usize, reason: Reason, elsewhere: bool) -> Action {
        Action::Cancel {
            fork,
            reason,
            elsewhere,
        }
    }

    fn ask(fork: usize) -> Action {
        Action::AskToAccept { fork }
    }

    /// Rule 2, none: the caller ends with 480 and hears no ringing.
    #[test]
    fn no_endpoint_fails_the_caller_with_480_without_ringing() {
        let mut d = ForkDecision::new(TIMERS);
        assert_eq!(
            d.offer(Vec::new().into_iter()),
            [
                Action::Decided(Cause::NoEndpoints),
                Action::FailCaller(reasons::temporarily_unavailable())
            ]
        );
    }

    /// Rule 2, exactly one: offered with `immediate_auto_accept`, timer toast + grace.
    #[test]
    fn one_endpoint_is_offered_immediate_with_toast_plus_grace() {
        let mut d = ForkDecision::new(TIMERS);
        assert_eq!(
            d.offer(offers(&["a"])),
            [
                Action::Offer {
                    fork: A,
                    immediate: true
                },
                Action::Ringing,
                Action::StartTimer(Duration::from_secs(15)),
            ]
        );
    }

    /// Rules 2 and 3, two or more: each offered with a toast, then the caller hears ringing,
    /// and the toast timer starts.
    #[test]
    fn several_endpoints_each_ring_with_the_toast_timer() {
        let mut d = ForkDecision::new(TIMERS);
        let out = d.offer(offers(&["a", "b"]));
        assert_eq!(
            out,
            [
                Action::Offer {
                    fork: A,
                    immediate: false
                },
                Action::Offer {
                    fork: B,
                    immediate: false
                },
                Action::Ringing,
                Action::StartTimer(Duration::from_secs(10)),
            ]
        );
    }

    /// Rule 4: the first accept wins, the others end with 200 "Call completed elsewhere", and a
    /// later accept loses.
    #[test]
    fn first_accept_wins_and_the_others_end_completed_elsewhere() {
        let mut d = ringing(&["a", "b", "c"]);
        assert_eq!(
            d.accept(B),
            [
                Action::Decided(Cause::Click),
                Action::Connect { fork: B },
                cancel(A, reasons::completed_elsewhere(), true),
                cancel(C, reasons::completed_elsewhere(), true),
            ]
        );
        assert_eq!(d.accept(A), [Action::RefuseAccept { fork: A }]);
    }

    /// Rule 4: a fork whose leg is not ready yet cannot win; its accept loses.
    #[test]
    fn an_accept_of_a_fork_not_ringing_loses() {
        let mut d = ForkDecision::new(TIMERS);
        d.offer(offers(&["a", "b"]));
        assert_eq!(d.accept(A), [Action::RefuseAccept { fork: A }]);
        assert_eq!(d.decided(), None);
    }

    /// Rule 5: the toast ran out: rank now, then ask the most active endpoint that still rings,
    /// with the grace timer.
    #[test]
    fn toast_timeout_asks_the_most_active_ringing_endpoint() {
        let mut d = ringing(&["a", "b", "c"]);
        d.decline(C, reasons::declined(486));
        assert_eq!(d.timer(), [Action::Rank { round: 0 }]);
        assert_eq!(
            d.ranked(vec!["c".into(), "b".into(), "a".into()], 0),
            [ask(B), Action::StartTimer(TIMERS.grace)],
            "c declined, so b, the next most active, is asked"
        );
    }

    /// Rule 5: no accept within the grace: the next in the ranking is asked.
    #[test]
    fn grace_timeout_asks_the_next() {
        let mut d = ringing(&["a", "b"]);
        d.timer();
        d.ranked(vec!["b".into(), "a".into()], 0);
        assert_eq!(d.timer(), [ask(A), Action::StartTimer(TIMERS.grace)]);
    }

    /// Rule 5: the asked endpoint declines or is lost: the next is asked at once.
    #[test]
    fn asked_endpoint_declining_or_lost_passes_at_once() {
        let mut d = ringing(&["a", "b", "c"]);
        d.timer();
        d.ranked(vec!["a".into(), "b".into(), "c".into()], 0);
        assert_eq!(
            d.decline(A, reasons::declined(486)),
            [ask(B), Action::StartTimer(TIMERS.grace)]
        );
        assert_eq!(d.lost(B), [ask(C), Action::StartTimer(TIMERS.grace)]);
    }

    /// Rule 5: a fork that was not asked leaving does not move the asking on.
    #[test]
    fn another_fork_leaving_while_one_is_asked_asks_nobody_new() {
        let mut d = ringing(&["a", "b", "c"]);
        d.timer();
        d.ranked(vec!["a".into(), "b".into(), "c".into()], 0);
        assert_eq!(d.decline(C, reasons::declined(486)), []);
    }

    /// Rule 5: every fork may still be clicked while others are asked; it wins as a timeout.
    #[test]
    fn a_click_during_auto_accept_wins_as_a_timeout() {
        let mut d = ringing(&["a", "b"]);
        d.timer();
        d.ranked(vec!["a".into(), "b".into()], 0);
        let out = d.accept(B);
        assert_eq!(out[0], Action::Decided(Cause::Timeout));
        assert!(out.contains(&cancel(A, reasons::completed_elsewhere(), true)));
    }

    /// Rule 5: nobody left to ask: the caller and every fork end with 480.
    #[test]
    fn nobody_left_to_ask_ends_everyone_with_480() {
        let mut d = ringing(&["a", "b"]);
        d.timer();
        d.ranked(vec!["a".into()], 0);
        assert_eq!(
            d.timer(),
            [
                Action::Decided(Cause::Unanswered),
                cancel(A, reasons::temporarily_unavailable(), false),
                cancel(B, reasons::temporarily_unavailable(), false),
                Action::FailCaller(reasons::temporarily_unavailable()),
            ],
            "b is not in the ranking (it signed out and in again): it is not asked"
        );
    }

    /// Rule 6: one endpoint not accepting after toast + grace: 480 for it and the caller, never
    /// `auto_accept_needed`.
    #[test]
    fn one_endpoint_unanswered_ends_with_480_without_asking() {
        let mut d = ringing(&["a"]);
        assert_eq!(
            d.timer(),
            [
                Action::Decided(Cause::Unanswered),
                cancel(A, reasons::temporarily_unavailable(), false),
                Action::FailCaller(reasons::temporarily_unavailable()),
            ]
        );
    }

    /// Rule 6: the only endpoint accepting wins as immediate.
    #[test]
    fn the_only_endpoint_accepting_wins_as_immediate() {
        let mut d = ringing(&["a"]);
        assert_eq!(d.accept(A)[0], Action::Decided(Cause::Immediate));
    }

    /// Rule 7: a 4xx/5xx decline removes only that fork.
    #[test]
    fn a_4xx_decline_removes_only_that_fork() {
        let mut d = ringing(&["a", "b"]);
        assert_eq!(d.decline(A, reasons::declined(486)), []);
        assert_eq!(d.decided(), None);
        assert_eq!(d.state(B), Some(&ForkState::Ringing));
    }

    /// Rule 7: a 6xx ends the call: the other forks end with 603 "Declined elsewhere", the
    /// caller with the 6xx.
    #[test]
    fn a_6xx_decline_ends_the_call_everywhere() {
        let mut d = ringing(&["a", "b", "c"]);
        let six = reasons::declined(603);
        assert_eq!(
            d.decline(A, six.clone()),
            [
                Action::Decided(Cause::Declined),
                cancel(B, reasons::declined_elsewhere(), false),
                cancel(C, reasons::declined_elsewhere(), false),
                Action::FailCaller(six),
            ]
        );
    }

    /// Rule 7: the last fork gone: the caller gets the best final code, a decline beating a
    /// lost fork's 480, with the declining fork's own reason.
    #[test]
    fn the_last_fork_gone_gives_the_caller_the_best_final_answer() {
        let mut d = ringing(&["a", "b", "c"]);
        let shutdown = Reason {
            code: 503,
            text: "Server shutting down".into(),
        };
        assert_eq!(d.lost(A), []);
        assert_eq!(d.decline(B, shutdown.clone()), []);
        assert_eq!(
            d.decline(C, reasons::declined(486)),
            [
                Action::Decided(Cause::Declined),
                Action::FailCaller(reasons::declined(486))
            ]
        );
        let mut d = ringing(&["a", "b"]);
        d.lost(A);
        assert_eq!(
            d.decline(B, shutdown.clone()),
            [
                Action::Decided(Cause::Declined),
                Action::FailCaller(reasons::temporarily_unavailable())
            ],
            "480 and 503: the lowest class wins"
        );
        let mut d = ringing(&["a", "b"]);
        d.decline(A, shutdown.clone());
        assert_eq!(
            d.decline(B, shutdown.clone()),
            [
                Action::Decided(Cause::Declined),
                Action::FailCaller(shutdown)
            ],
            "a 503 of a shutdown keeps its own text"
        );
    }

    /// Rule 8: the caller cancels: every fork ends with the caller's reason, the caller's leg
    /// gets 487; a later accept loses.
    #[test]
    fn the_caller_cancelling_ends_every_fork() {
        let mut d = ringing(&["a", "b"]);
        let lost = Reason {
            code: 408,
            text: "Remote endpoint lost".into(),
        };
        assert_eq!(
            d.caller_cancelled(lost.clone()),
            [
                Action::Decided(Cause::Cancelled),
                cancel(A, lost.clone(), false),
                cancel(B, lost, false),
                Action::FailCaller(reasons::request_terminated()),
            ]
        );
        assert_eq!(d.accept(A), [Action::RefuseAccept { fork: A }]);
    }

    /// Rule 9: a forward ends every fork with 302 and starts a new round for the new target,
    /// whose toast timer starts again.
    #[test]
    fn a_forward_ends_the_forks_with_302_and_rings_the_new_target() {
        let mut d = ringing(&["a", "b"]);
        assert_eq!(
            d.forward(A, "sip:carol@example.com"),
            [
                cancel(B, reasons::moved_temporarily(), false),
                Action::Forward {
                    to: "sip:carol@example.com".into()
                },
            ]
        );
        assert_eq!(
            d.offer(offers(&["c", "d"])).last(),
            Some(&Action::StartTimer(TIMERS.toast))
        );
        // The old round's forks no longer count: the new ones decide the caller's answer.
        d.ready(C);
        d.ready(D);
        assert_eq!(d.decline(C, reasons::declined(486)), []);
        assert_eq!(
            d.decline(D, reasons::declined(486)),
            [
                Action::Decided(Cause::Declined),
                Action::FailCaller(reasons::declined(486))
            ]
        );
    }

    /// Forward: more than `max_forwards` forwards end the call with 483 for the caller.
    #[test]
    fn too_many_forwards_end_with_483() {
        let mut d = ringing(&["a"]);
        d.forward(A, "sip:b@example.com");
        d.offer(offers(&["b"]));
        d.ready(B);
        d.forward(B, "sip:c@example.com");
        d.offer(offers(&["c"]));
        d.ready(C);
        assert_eq!(
            d.forward(C, "sip:d@example.com"),
            [
                Action::Decided(Cause::Declined),
                Action::FailCaller(reasons::too_many_hops())
            ]
        );
    }

    /// Forward: a ranking asked for before a forward (of the old target) is ignored.
    #[test]
    fn a_ranking_of_the_old_target_is_ignored_after_a_forward() {
        let mut d = ringing(&["a", "b"]);
        assert_eq!(d.timer(), [Action::Rank { round: 0 }]);
        d.forward(A, "sip:carol@example.com");
        d.offer(offers(&["c", "d"]));
        d.ready(C);
        assert_eq!(d.ranked(vec!["c".into()], 0), []);
    }

    /// After the decision nothing changes it: declines, losses, forwards and timers are
    /// ignored.
    #[test]
    fn nothing_changes_a_decided_call() {
        let mut d = ringing(&["a", "b", "c"]);
        d.accept(A);
        assert_eq!(d.decline(B, reasons::declined(603)), []);
        assert_eq!(d.lost(C), []);
        assert_eq!(d.forward(B, "sip:x@example.com"), []);
        assert_eq!(d.timer(), []);
        assert_eq!(d.caller_cancelled(reasons::request_terminated()), []);
        assert_eq!(d.decided(), Some(Cause::Click));
    }
}
