"""A reference confab client in Python, written from the wire contract alone.

confab's wire contract (``/work/shared/protocol.md``, "confab wire protocol, version 1") says
that any client, in any language, can drive a node. This module is the proof: it was written
from that document only, with no Rust code and no generated bindings, using nothing but the
Python standard library and the ``msgpack`` package (``pip install msgpack``).

What it implements, section by section:

* Framing (section 1): a frame is a 4-byte big-endian length ``N`` followed by ``N`` bytes holding
  exactly one MessagePack map with string keys. We encode with ``use_bin_type=True`` (so Python
  ``str`` is a MessagePack str and ``bytes`` a bin) and decode with ``raw=False``.
* Session (section 2): an HS256 JWT minted with ``hmac``/``hashlib``/``base64`` (``sub`` = the
  user, ``exp`` = now + 1 h) and ``hello``, which must be the first frame.
* Requests: every request gets a fresh ``rid``; :meth:`Client.request` sends it and reads until the
  frame echoing that ``rid`` arrives. Anything else read meanwhile (events, replies to other
  requests) is buffered, in arrival order, for :meth:`Client.next_event`.
* Helpers for ``device_state`` (section 3), ``call_establish`` / ``call_accept`` (section 4) and
  ``message`` / ``message_ack`` (section 5).
* Resumable sessions (section 3, "Resuming"): ``hello(..., resumable=True)`` asks with
  ``resume: {}``; from the ``welcome`` on, the client counts the node's frames it decodes and its
  own frames, keeps its own until the node's ``seen`` covers them, and :meth:`Client.resume`
  takes the session back on a new connection, sending again what the node had not read.

The client is synchronous and deliberately small. It does not judge the node: it returns what
the node sent and leaves assertions to its caller (see ``scenarios.py``). Timeouts are safety
nets (nothing waits for a fixed time), and running out of one raises :class:`Timeout`.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import socket
import ssl
import struct
import time
from collections import deque
from typing import Any, Callable, Deque, Dict, List, Optional

import msgpack

Frame = Dict[str, Any]

#: Upper bound on waiting for any single frame; a safety net, never a pacing device.
DEFAULT_TIMEOUT = 5.0

#: A minimal IM offer: one ``message`` m-line accepting ``text/plain`` (section 4, SDP).
DEFAULT_SDP = (
    "v=0\r\n"
    "o=- 0 0 IN IP4 0.0.0.0\r\n"
    "s=-\r\n"
    "c=IN IP4 0.0.0.0\r\n"
    "t=0 0\r\n"
    "m=message 5060 sip null\r\n"
    "a=accept-types:text/plain\r\n"
)

#: Upper bound we accept for an incoming frame before the node has told us its ``max_frame``.
CLIENT_MAX_FRAME = 1 << 20


class ProtocolError(Exception):
    """The node sent something this client cannot read as a contract frame, or closed."""


class Timeout(ProtocolError):
    """No matching frame arrived within the timeout."""


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def mint_token(user: str, secret: str, ttl_s: int = 3600) -> str:
    """An HS256 JWT whose ``sub`` is ``user`` and whose ``exp`` is ``ttl_s`` from now."""
    header = {"alg": "HS256", "typ": "JWT"}
    claims = {"sub": user, "exp": int(time.time()) + ttl_s}
    signing_input = ".".join(
        _b64url(json.dumps(part, separators=(",", ":")).encode("utf-8"))
        for part in (header, claims)
    )
    signature = hmac.new(
        secret.encode("utf-8"), signing_input.encode("ascii"), hashlib.sha256
    ).digest()
    return f"{signing_input}.{_b64url(signature)}"


def encode_frame(msg: Frame) -> bytes:
    """One frame: 4-byte big-endian length, then the MessagePack map."""
    body = msgpack.packb(msg, use_bin_type=True)
    return struct.pack(">I", len(body)) + body


class Client:
    """One TCP connection = one endpoint (one device of one user)."""

    def __init__(self, host: str, port: int, name: str = "client",
                 timeout: float = DEFAULT_TIMEOUT, tls_ca: Optional[str] = None) -> None:
        """With `tls_ca` (a PEM file), speaks TLS to a node with [tls], trusting that CA and
        checking the certificate against `host`."""
        self.name = name
        self.timeout = timeout
        sock = socket.create_connection((host, port), timeout=timeout)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if tls_ca is not None:
            context = ssl.create_default_context(cafile=tls_ca)
            context.minimum_version = ssl.TLSVersion.TLSv1_2
            sock = context.wrap_socket(sock, server_hostname=host)
        self.sock = sock
        self._rx = bytearray()
        #: Frames read but not yet consumed by request()/next_event(), oldest first.
        self.pending: Deque[Frame] = deque()
        #: Every frame received on this connection, in arrival order (for diagnostics).
        self.log: List[Frame] = []
        self._next_rid = 0
        self.user: Optional[str] = None
        self.endpoint: Optional[str] = None
        self.welcome: Optional[Frame] = None
        self.host, self.port, self.tls_ca = host, port, tls_ca
        #: Resumable sessions: counting starts at the welcome (frame 0 of each side).
        self.counting = False
        self.seen = 0  # the number of the last node frame decoded
        self.sent = 0  # the number of the last frame sent
        self.kept: Deque[tuple] = deque()  # (number, frame) not yet covered by the node's seen
        self.resume_token: Optional[str] = None

    # ----- framing -----------------------------------------------------------------------

    def send(self, msg: Frame) -> None:
        if self.counting:
            self.sent += 1
            self.kept.append((self.sent, msg))
        try:
            self.sock.sendall(encode_frame(msg))
        except OSError:
            if not self.counting:
                raise
            # A dead link: the frame is kept and goes again on the resume.

    def _read_exact(self, n: int, deadline: float) -> bytes:
        while len(self._rx) < n:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise Timeout(f"{self.name}: no frame within {self.timeout:.1f} s")
            self.sock.settimeout(remaining)
            try:
                chunk = self.sock.recv(65536)
            except socket.timeout:
                raise Timeout(f"{self.name}: no frame within {self.timeout:.1f} s") from None
            if not chunk:
                raise ProtocolError(f"{self.name}: the node closed the connection")
            self._rx += chunk
        out = bytes(self._rx[:n])
        del self._rx[:n]
        return out

    def recv_frame(self, timeout: Optional[float] = None) -> Frame:
        """Reads the next frame from the socket (bypassing the buffer) and logs it."""
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        (length,) = struct.unpack(">I", self._read_exact(4, deadline))
        if length == 0 or length > CLIENT_MAX_FRAME:
            raise ProtocolError(f"{self.name}: frame length {length} out of range")
        body = self._read_exact(length, deadline)
        try:
            frame = msgpack.unpackb(body, raw=False)
        except Exception as e:  # msgpack raises several exception types
            raise ProtocolError(f"{self.name}: undecodable frame {body!r}: {e}") from None
        if not isinstance(frame, dict) or not isinstance(frame.get("type"), str):
            raise ProtocolError(f"{self.name}: frame is not a map with a string 'type': {frame!r}")
        self.log.append(frame)
        if self.counting:
            self.seen += 1
            if frame["type"] == "seen":
                while self.kept and self.kept[0][0] <= frame["upto"]:
                    self.kept.popleft()
        return frame

    # ----- requests and events --------------------------------------------------------------

    def new_rid(self) -> int:
        self._next_rid += 1
        return self._next_rid

    def request(self, msg: Frame, timeout: Optional[float] = None) -> Frame:
        """Sends ``msg`` with a fresh ``rid`` and returns the first frame echoing it.

        Frames read before the reply stay buffered for :meth:`next_event`.
        """
        rid = self.new_rid()
        self.send({**msg, "rid": rid})
        return self.wait_reply(rid, timeout)

    def wait_reply(self, rid: int, timeout: Optional[float] = None) -> Frame:
        """The frame echoing ``rid``: from the buffer if it already came, else from the wire."""
        return self.next_event(lambda f: f.get("rid") == rid, timeout)

    def next_event(self, pred: Optional[Callable[[Frame], bool]] = None,
                   timeout: Optional[float] = None) -> Frame:
        """The oldest frame (buffered first, then from the wire) for which ``pred`` holds.

        Frames that do not match stay buffered, in order, for later calls.
        """
        pred = pred or (lambda _f: True)
        for i, f in enumerate(self.pending):
            if pred(f):
                del self.pending[i]
                return f
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise Timeout(f"{self.name}: no matching frame within the timeout")
            f = self.recv_frame(remaining)
            if pred(f):
                return f
            self.pending.append(f)

    # ----- session ------------------------------------------------------------------------

    def hello(self, user: str, secret: str, device: str,
              agent: str = "confab-python/1", resumable: bool = False) -> Frame:
        """Signs in as ``user`` on ``device``; returns ``welcome`` or raises with the error.
        With ``resumable``, asks for a resumable session and starts counting."""
        hello: Frame = {
            "type": "hello",
            "version": 1,
            "user": user,
            "token": mint_token(user, secret),
            "device": device,
            "agent": agent,
        }
        if resumable:
            hello["resume"] = {}
        reply = self.request(hello)
        if reply.get("type") != "welcome":
            raise ProtocolError(f"{self.name}: hello answered {reply!r}")
        self.user = user
        self.endpoint = reply.get("endpoint")
        self.welcome = reply
        self.secret = secret
        if resumable and isinstance(reply.get("resume"), dict):
            self.resume_token = reply["resume"]["token"]
            self.counting = True
        return reply

    def drop(self) -> None:
        """The link fails: the socket closes without a ``bye``."""
        self.close()

    def acknowledge(self) -> None:
        """``seen`` for every node frame decoded so far (no reply)."""
        self.send({"type": "seen", "upto": self.seen})

    def resume(self, token: Optional[str] = None) -> Frame:
        """Takes the session back on a new connection (with ``token``, or the one held). On
        ``welcome`` sends again, in order, its frames the node had not read; returns the
        ``welcome``, or the ``error`` the node answered (the new connection is then closed)."""
        sock = socket.create_connection((self.host, self.port), timeout=self.timeout)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if self.tls_ca is not None:
            context = ssl.create_default_context(cafile=self.tls_ca)
            sock = context.wrap_socket(sock, server_hostname=self.host)
        self.close()
        self.sock, self._rx = sock, bytearray()
        counting, self.counting = self.counting, False  # the hello and welcome are not counted
        self.send({
            "type": "hello", "rid": self.new_rid(), "version": 1, "user": self.user,
            "token": mint_token(self.user, self.secret), "device": "resumed",
            "resume": {"endpoint": self.endpoint, "token": token or self.resume_token,
                       "seen": self.seen, "sent": self.sent},
        })
        reply = self.recv_frame()
        self.counting = counting
        if reply.get("type") != "welcome":
            return reply
        self.resume_token = reply["resume"]["token"]
        while self.kept and self.kept[0][0] <= reply["resume"]["seen"]:
            self.kept.popleft()
        for _, frame in list(self.kept):
            self.sock.sendall(encode_frame(frame))
        return reply

    def ping(self) -> Frame:
        return self.request({"type": "ping"})

    def bye(self) -> Frame:
        return self.request({"type": "bye"})

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass

    # ----- presence -------------------------------------------------------------------------

    def device_state(self, activity: str, idle_ms: Optional[int] = None) -> Frame:
        msg: Frame = {"type": "device_state", "activity": activity}
        if idle_ms is not None:
            msg["idle_ms"] = idle_ms
        return self.request(msg)

    # ----- calls ---------------------------------------------------------------------------

    def call_establish(self, to: str, toast: Optional[str] = None,
                       sdp: str = DEFAULT_SDP, conversation: Optional[str] = None,
                       toast_type: str = "text/plain") -> Frame:
        """``call_establish``; returns ``call_created`` (or the ``error``)."""
        msg: Frame = {"type": "call_establish", "to": to, "sdp": sdp}
        if toast is not None:
            msg["toast"] = {"content_type": toast_type, "body": toast}
        if conversation is not None:
            msg["conversation"] = conversation
        return self.request(msg)

    def call_accept(self, call: str, sdp: str = DEFAULT_SDP) -> Frame:
        """``call_accept``; returns ``ok`` (or the ``error``)."""
        return self.request({"type": "call_accept", "call": call, "sdp": sdp})

    def call_terminate(self, call: str) -> Frame:
        return self.request({"type": "call_terminate", "call": call})

    # ----- messages ------------------------------------------------------------------------

    def message(self, call: str, body: Any, content_type: str = "text/plain") -> int:
        """Sends a ``message`` and returns its ``rid``, without waiting.

        The answer (``message_delivered`` / ``message_failed``) comes only once the remote has
        acked, which may need the remote to act first; collect it with :meth:`wait_reply`.
        """
        rid = self.new_rid()
        self.send({"type": "message", "rid": rid, "call": call,
                   "content_type": content_type, "body": body})
        return rid

    def message_ack(self, call: str, msg: int) -> None:
        """``message_ack`` has no reply."""
        self.send({"type": "message_ack", "call": call, "msg": msg})
