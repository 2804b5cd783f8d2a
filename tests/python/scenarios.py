#!/usr/bin/env python3
"""Mission scenarios driven by the Python reference client (``confab_client.py``).

Usage: ``python3 scenarios.py HOST:PORT SECRET SCENARIO``

Runs one scenario against a running node. Exit status:

* 0: the node behaved as the contract (``protocol.md``, version 1) says;
* 1: a contract deviation (a wrong field, a missing or unexpected frame, a closed connection);
  the message names the rule, and every client's frames are printed to stderr;
* 2: bad usage; 3: the ``msgpack`` package is missing; 4: a bug in this script.

Every check compares exact fields. Timeouts are safety nets (5 s per frame); nothing sleeps.
"""

from __future__ import annotations

import os
import sys
import traceback
from typing import Any, Callable, Dict, List, Optional

try:
    import msgpack  # noqa: F401  (imported by confab_client; checked here for a clear message)
except ImportError:
    print("the Python package 'msgpack' is missing: run `pip install msgpack`", file=sys.stderr)
    sys.exit(3)

import confab_client
from confab_client import DEFAULT_SDP, Client, Frame, ProtocolError, Timeout

ALICE = "sip:alice@example.com"
BOB = "sip:bob@example.com"
TOAST = "hi bob, got a minute?"
TEXT = "hello bob"
ELSEWHERE = {"code": 200, "text": "Call completed elsewhere"}

# Legal call_state transitions (contract section 4: the seed's outbound rules 1-10, inbound 1-9).
OUTBOUND = {
    ("idle", "establishing"), ("establishing", "establishing"),
    ("establishing", "terminating"), ("establishing", "established"),
    ("established", "transferring"), ("transferring", "established"),
    ("established", "terminating"), ("idle", "terminating"),
    ("transferring", "terminating"), ("terminating", "terminated"),
}
INBOUND = {
    ("incoming", "establishing"), ("establishing", "terminating"),
    ("establishing", "established"), ("established", "transferring"),
    ("transferring", "established"), ("established", "terminating"),
    ("incoming", "terminating"), ("transferring", "terminating"),
    ("terminating", "terminated"),
}


class Deviation(AssertionError):
    """The node did not do what the contract says."""


def expect(cond: bool, what: str) -> None:
    if not cond:
        raise Deviation(what)


def expect_frame(frame: Frame, type_: str, what: str, **fields: Any) -> Frame:
    """``frame`` has type ``type_`` and exactly these values for these fields."""
    expect(frame.get("type") == type_, f"{what}: expected `{type_}`, got {frame!r}")
    for key, want in fields.items():
        expect(key in frame, f"{what}: `{type_}` lacks field `{key}`: {frame!r}")
        expect(frame[key] == want,
               f"{what}: `{type_}.{key}` is {frame[key]!r}, expected {want!r}: {frame!r}")
    return frame


def expect_str(frame: Frame, key: str, what: str) -> str:
    value = frame.get(key)
    expect(isinstance(value, str) and value != "",
           f"{what}: `{frame.get('type')}.{key}` should be a non-empty string: {frame!r}")
    return value


def wait(client: Client, what: str, pred: Callable[[Frame], bool]) -> Frame:
    """The next frame matching ``pred`` on ``client``; a timeout is a deviation."""
    try:
        return client.next_event(pred)
    except Timeout:
        raise Deviation(f"{client.name}: {what} never arrived "
                        f"(waited {client.timeout:.0f} s)") from None


def of_type(type_: str, call: Optional[str] = None) -> Callable[[Frame], bool]:
    return lambda f: f.get("type") == type_ and (call is None or f.get("call") == call)


def on_leg(call: str, types: tuple = ("call_state", "call_established",
                                       "message_received")) -> Callable[[Frame], bool]:
    return lambda f: f.get("call") == call and f.get("type") in types


def check_transitions(client: Client) -> None:
    """Every call_state on ``client`` continues its leg's previous state along a legal rule."""
    states: Dict[str, str] = {}
    for f in client.log:
        if f.get("type") == "call_incoming":
            states[f["call"]] = "incoming"
        if f.get("type") != "call_state":
            continue
        call, direction = f.get("call"), f.get("direction")
        prev, state = f.get("previous"), f.get("state")
        first = "idle" if direction == "outbound" else "incoming"
        expect(direction in ("outbound", "inbound"), f"{client.name}: bad direction in {f!r}")
        expect(prev == states.get(call, first),
               f"{client.name}: call_state out of order, leg was "
               f"{states.get(call, first)!r}: {f!r}")
        legal = OUTBOUND if direction == "outbound" else INBOUND
        expect((prev, state) in legal, f"{client.name}: illegal transition {f!r}")
        if state in ("terminating", "terminated"):
            expect(isinstance(f.get("reason"), dict), f"{client.name}: no reason in {f!r}")
        states[call] = state


# ----- building blocks -------------------------------------------------------------------------


class Scenario:
    def __init__(self, host: str, port: int, secret: str, tls_ca: Optional[str] = None) -> None:
        self.host, self.port, self.secret, self.tls_ca = host, port, secret, tls_ca
        self.clients: List[Client] = []

    def sign_in(self, name: str, user: str, device: str) -> Client:
        c = Client(self.host, self.port, name=name, tls_ca=self.tls_ca)
        self.clients.append(c)
        try:
            welcome = c.hello(user, self.secret, device)
        except ProtocolError as e:
            raise Deviation(f"{name}: hello failed: {e}") from None
        expect_frame(welcome, "welcome", f"{name} hello", rid=1)
        expect_str(welcome, "endpoint", name)
        expect_str(welcome, "node", name)
        for key in ("heartbeat_ms", "max_frame"):
            expect(isinstance(welcome.get(key), int) and welcome[key] > 0,
                   f"{name}: welcome.{key} should be a positive integer: {welcome!r}")
        return c

    def call_bob(self, alice: Client, toast: str) -> tuple:
        """Alice calls bob with a toast; returns (call, conversation) of her leg."""
        created = alice.call_establish(BOB, toast=toast)
        expect_frame(created, "call_created", "alice call_establish")
        call = expect_str(created, "call", "alice call_created")
        conv = expect_str(created, "conversation", "alice call_created")
        expect(not any(f.get("call") == call for f in alice.pending),
               f"alice: events of her leg came before `call_created` (a reply precedes the "
               f"events its request causes): {list(alice.pending)!r}")
        return call, conv

    def incoming(self, bob: Client, alice_call: str, toast: str) -> tuple:
        """A fork of alice's call reaches ``bob``; returns (call, conversation) of his leg."""
        inc = wait(bob, "call_incoming", of_type("call_incoming"))
        # `from` is a Python keyword, so it is checked apart from the keyword arguments.
        expect_frame(inc, "call_incoming", bob.name, immediate_auto_accept=False,
                     toast={"content_type": "text/plain", "body": toast}, sdp=DEFAULT_SDP)
        expect(inc.get("from") == ALICE,
               f"{bob.name}: call_incoming.from is {inc.get('from')!r}, expected {ALICE!r}")
        call = expect_str(inc, "call", bob.name)
        conv = expect_str(inc, "conversation", bob.name)
        expect(call != alice_call, f"{bob.name}: the callee leg reuses the caller's call id")
        return call, conv

    def accept_and_establish(self, bob: Client, call: str, conv: str, alice: Client,
                             toast: str) -> None:
        """``bob`` accepts ``call``: ok, then incoming→establishing→established,
        call_established, and the toast as msg 1."""
        ok = bob.call_accept(call)
        expect_frame(ok, "ok", f"{bob.name} call_accept")
        expect(not any(f.get("type") == "call_state" and f.get("call") == call
                       for f in bob.pending),
               f"{bob.name}: call_state came before the `ok` to call_accept: "
               f"{list(bob.pending)!r}")
        leg = on_leg(call)
        s1 = wait(bob, "call_state incoming→establishing", leg)
        expect_frame(s1, "call_state", f"{bob.name} leg, 1st event", call=call,
                     conversation=conv, direction="inbound", previous="incoming",
                     state="establishing")
        s2 = wait(bob, "call_state establishing→established", leg)
        expect_frame(s2, "call_state", f"{bob.name} leg, 2nd event", call=call,
                     conversation=conv, direction="inbound", previous="establishing",
                     state="established")
        est = wait(bob, "call_established", leg)
        expect_frame(est, "call_established", f"{bob.name} leg, 3rd event", call=call,
                     sdp=DEFAULT_SDP, remote={"user": ALICE, "endpoint": alice.endpoint})
        got = wait(bob, "the toast", leg)
        expect_frame(got, "message_received", f"{bob.name} leg, 4th event (the toast)",
                     call=call, msg=1, content_type="text/plain", body=toast, toast=True)
        expect(got.get("from") == ALICE,
               f"{bob.name}: toast from {got.get('from')!r}, expected {ALICE!r}")
        bob.message_ack(call, 1)  # allowed and ignored

    def completed_elsewhere(self, bob: Client, call: str, conv: str) -> None:
        """``bob``'s losing fork: incoming→terminating→terminated, 200 Call completed elsewhere."""
        leg = on_leg(call, ("call_state",))
        t1 = wait(bob, "call_state incoming→terminating", leg)
        expect_frame(t1, "call_state", f"{bob.name} losing fork", call=call, conversation=conv,
                     direction="inbound", previous="incoming", state="terminating",
                     reason=ELSEWHERE)
        t2 = wait(bob, "call_state terminating→terminated", leg)
        expect_frame(t2, "call_state", f"{bob.name} losing fork", call=call, conversation=conv,
                     direction="inbound", previous="terminating", state="terminated",
                     reason=ELSEWHERE)

    def caller_established(self, alice: Client, call: str, conv: str, winner: Client) -> None:
        """Alice's leg: idle→establishing, call_ringing with establishing→establishing,
        establishing→established, call_established with bob's winning endpoint."""
        leg = on_leg(call, ("call_state", "call_ringing", "call_established"))
        first = wait(alice, "call_state idle→establishing", leg)
        expect_frame(first, "call_state", "alice leg, 1st event", call=call, conversation=conv,
                     direction="outbound", previous="idle", state="establishing")
        ringing = rings = 0
        while True:
            f = wait(alice, "call_state establishing→established", leg)
            if f.get("type") == "call_ringing":
                expect_frame(f, "call_ringing", "alice", call=call)
                ringing += 1
                continue
            expect_frame(f, "call_state", "alice leg", call=call, conversation=conv,
                         direction="outbound", previous="establishing")
            if f["state"] == "establishing":
                rings += 1
                continue
            expect_frame(f, "call_state", "alice leg", state="established")
            break
        expect(ringing >= 1, "alice: no call_ringing before established")
        expect(rings >= 1, "alice: no call_state establishing→establishing (outbound rule 2) "
                           "before established")
        est = wait(alice, "call_established", leg)
        expect_frame(est, "call_established", "alice", call=call, sdp=DEFAULT_SDP,
                     remote={"user": BOB, "endpoint": winner.endpoint})

    def finish(self) -> None:
        for c in self.clients:
            check_transitions(c)


# ----- scenarios -------------------------------------------------------------------------------


def fork_click(s: Scenario) -> None:
    alice = s.sign_in("alice", ALICE, "laptop")
    bob1 = s.sign_in("bob1", BOB, "desk")
    bob2 = s.sign_in("bob2", BOB, "phone")
    expect(bob1.endpoint != bob2.endpoint, "bob's two devices got the same endpoint id")

    a_call, a_conv = s.call_bob(alice, TOAST)
    c1, conv1 = s.incoming(bob1, a_call, TOAST)
    c2, conv2 = s.incoming(bob2, a_call, TOAST)
    expect(c1 != c2, "bob's two forks share a call id")

    # Device 1 clicks the toast: it wins, device 2's fork ends.
    s.accept_and_establish(bob1, c1, conv1, alice, TOAST)
    s.completed_elsewhere(bob2, c2, conv2)
    late = bob2.call_accept(c2)
    expect_frame(late, "error", "bob2 accepting after bob1 won", code="answered_elsewhere")
    s.caller_established(alice, a_call, a_conv, bob1)

    # Alice writes; bob's device 1 gets msg 2 and acks; alice learns it was delivered.
    rid = alice.message(a_call, TEXT)
    got = wait(bob1, "alice's message", on_leg(c1, ("message_received",)))
    expect_frame(got, "message_received", "bob1", call=c1, msg=2, content_type="text/plain",
                 body=TEXT)
    expect(got.get("from") == ALICE, f"bob1: message from {got.get('from')!r}, not {ALICE!r}")
    expect(got.get("toast") in (None, False), f"bob1: a plain message flagged as toast: {got!r}")
    bob1.message_ack(c1, 2)
    try:
        delivered = alice.wait_reply(rid)
    except Timeout:
        raise Deviation("alice: no answer to her message after bob acked it") from None
    expect_frame(delivered, "message_delivered", "alice message", rid=rid, call=a_call, msg=2)
    stray = [f for f in alice.log
             if f.get("type") == "message_delivered" and f is not delivered]
    expect(not stray, f"alice: message_delivered she did not ask for (the toast?): {stray!r}")

    # Alice hangs up; everyone leaves.
    expect_frame(alice.call_terminate(a_call), "ok", "alice call_terminate")
    end = wait(bob1, "call_state terminated", of_type("call_state", c1))
    while end.get("state") != "terminated":
        expect_frame(end, "call_state", "bob1 after hang-up", state="terminating",
                     reason={"code": 200, "text": "Terminated remotely"})
        end = wait(bob1, "call_state terminated", of_type("call_state", c1))
    expect_frame(end, "call_state", "bob1 after hang-up",
                 reason={"code": 200, "text": "Terminated remotely"})
    for c in (alice, bob1, bob2):
        expect_frame(c.bye(), "ok", f"{c.name} bye")
    s.finish()


def timeout_most_active(s: Scenario) -> None:
    alice = s.sign_in("alice", ALICE, "laptop")
    bob_a = s.sign_in("bobA", BOB, "desk")
    bob_b = s.sign_in("bobB", BOB, "phone")
    expect_frame(bob_a.device_state("away"), "ok", "bobA device_state away")
    expect_frame(bob_b.device_state("active"), "ok", "bobB device_state active")

    a_call, a_conv = s.call_bob(alice, TOAST)
    ca, conv_a = s.incoming(bob_a, a_call, TOAST)
    cb, conv_b = s.incoming(bob_b, a_call, TOAST)

    # Nobody clicks: after toast_timeout the arbiter picks the most active device, B.
    need = wait(bob_b, "auto_accept_needed", of_type("auto_accept_needed"))
    expect_frame(need, "auto_accept_needed", "bobB (active, the most active endpoint)", call=cb)
    s.accept_and_establish(bob_b, cb, conv_b, alice, TOAST)
    s.completed_elsewhere(bob_a, ca, conv_a)
    wrong = [f for f in bob_a.log if f.get("type") == "auto_accept_needed"]
    expect(not wrong, f"bobA (away) got auto_accept_needed although bobB (active) ranks "
                      f"first and accepted: {wrong!r}")
    s.caller_established(alice, a_call, a_conv, bob_b)
    for c in (alice, bob_a, bob_b):
        expect_frame(c.bye(), "ok", f"{c.name} bye")
    s.finish()


def resume(s: Scenario) -> None:
    """Section 3, "Resuming": alice asks for a resumable session, is in a call from bob, drops
    her connection while bob's messages come, resumes: every message arrives once, in order,
    each is delivered once; forged and spent tokens are refused with their reasons."""
    alice = Client(s.host, s.port, name="alice", tls_ca=s.tls_ca)
    s.clients.append(alice)
    welcome = alice.hello(ALICE, s.secret, "phone", resumable=True)
    grant = welcome.get("resume")
    expect(isinstance(grant, dict), f"alice: a resumable welcome has `resume`: {welcome!r}")
    for key in ("window_ms", "max_unseen_frames", "max_unseen_bytes"):
        expect(isinstance(grant.get(key), int) and grant[key] > 0,
               f"alice: welcome.resume.{key} should be a positive integer: {grant!r}")
    expect(isinstance(grant.get("token"), str) and grant["token"], f"alice: no token: {grant!r}")
    bob = s.sign_in("bob", BOB, "desk")
    created = bob.call_establish(ALICE)
    bob_call = expect_str(created, "call", "bob call_created")
    inc = wait(alice, "call_incoming", of_type("call_incoming"))
    call = expect_str(inc, "call", "alice")
    expect_frame(alice.call_accept(call), "ok", "alice call_accept")
    wait(alice, "call_established", of_type("call_established", call))
    wait(bob, "call_established", of_type("call_established", bob_call))

    def receive(n: int) -> List[str]:
        got = []
        while len(got) < n:
            f = wait(alice, "message_received", of_type("message_received", call))
            got.append(f["body"])
            alice.message_ack(call, f["msg"])
        return got

    rids = [bob.message(bob_call, "m1")]
    got = receive(1)
    alice.drop()
    rids += [bob.message(bob_call, f"m{n}") for n in (2, 3)]
    resumed = alice.resume()
    expect_frame(resumed, "welcome", "alice resume", endpoint=alice.endpoint)
    expect(isinstance(resumed["resume"].get("seen"), int),
           f"alice: a resumed welcome says what the node read: {resumed!r}")
    got += receive(2)
    expect(got == ["m1", "m2", "m3"], f"alice got {got!r}, not m1, m2, m3 once each")
    for rid in rids:
        expect_frame(bob.wait_reply(rid), "message_delivered", f"bob's message {rid}")
    # After a pong on a resumable session, the node says what it has read.
    expect_frame(alice.ping(), "pong", "alice ping")
    seen = wait(alice, "seen after pong", of_type("seen"))
    expect(isinstance(seen.get("upto"), int) and seen["upto"] <= alice.sent,
           f"alice: the node's seen {seen!r} is past the {alice.sent} frames she sent")
    # Nothing came twice.
    expect(not any(f.get("type") == "message_received" for f in alice.pending),
           f"alice: a message came twice: {list(alice.pending)!r}")
    # A forged token, and the spent one, are refused with their reasons.
    spent = welcome["resume"]["token"]
    for token, reason in (("Zm9yZ2Vk", "unknown or expired session"),
                          (spent, "the session was already resumed with this token")):
        probe = Client(s.host, s.port, name="probe", tls_ca=s.tls_ca)
        s.clients.append(probe)
        probe.user, probe.secret, probe.endpoint = ALICE, s.secret, alice.endpoint
        probe.seen, probe.sent = alice.seen, alice.sent
        answer = probe.resume(token)
        expect_frame(answer, "error", f"a resume with {token!r}", code="resume_refused",
                     message=reason)


SCENARIOS = {
    "fork_click": fork_click,
    "timeout_most_active": timeout_most_active,
    "resume": resume,
}


def dump(clients: List[Client]) -> None:
    for c in clients:
        print(f"--- frames received by {c.name} (endpoint {c.endpoint}):", file=sys.stderr)
        for f in c.log:
            print(f"    {f!r}", file=sys.stderr)


def main(argv: List[str]) -> int:
    if len(argv) != 4 or argv[3] not in SCENARIOS or ":" not in argv[1]:
        print(f"usage: {argv[0]} HOST:PORT SECRET {{{'|'.join(SCENARIOS)}}}", file=sys.stderr)
        return 2
    host, _, port = argv[1].rpartition(":")
    name = argv[3]
    # CONFAB_CA: speak TLS, trusting that CA (a node with [tls]).
    s = Scenario(host.strip("[]"), int(port), argv[2], os.environ.get("CONFAB_CA"))
    try:
        SCENARIOS[name](s)
    except (Deviation, ProtocolError) as e:
        print(f"CONTRACT DEVIATION in scenario {name}: {e}", file=sys.stderr)
        dump(s.clients)
        return 1
    except Exception:
        print(f"scenario {name}: the script itself failed:", file=sys.stderr)
        traceback.print_exc()
        dump(s.clients)
        return 4
    finally:
        for c in s.clients:
            c.close()
    print(f"scenario {name}: ok (client {confab_client.__name__}, "
          f"{sum(len(c.log) for c in s.clients)} frames checked)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
