#!/usr/bin/env python3
"""Writes the seed inputs of the fuzz corpora (run from fuzz/: python3 seeds/make_seeds.py).

The seeds are one well-formed example of every message of the contract (both directions),
a few malformed ones, frame streams built from them, and IM offers/answers. libFuzzer mutates
from there; the corpora under corpus/<target>/ grow beyond these seeds."""
import hashlib
import os
import struct

import msgpack

OFFER = ("v=0\r\no=- 0 0 IN IP4 0.0.0.0\r\ns=-\r\nc=IN IP4 0.0.0.0\r\nt=0 0\r\n"
         "m=message 5060 sip null\r\na=accept-types:text/plain\r\n")
OFFER_MSRP = ("v=0\r\no=alice 2890844526 2890844527 IN IP4 host.example.com\r\ns=-\r\n"
              "c=IN IP4 host.example.com\r\nt=0 0\r\nm=audio 49170 RTP/AVP 0\r\n"
              "m=message 7394 TCP/MSRP *\r\na=accept-types:text/* application/json;v=1\r\n"
              "a=max-size:4096\r\na=path:msrp://host.example.com:7394/2s93i93idj;tcp\r\n")
ANSWER = ("v=0\r\no=- 0 0 IN IP4 0.0.0.0\r\ns=-\r\nc=IN IP4 0.0.0.0\r\nt=0 0\r\n"
          "m=message 5060 sip null\r\na=accept-types:text/plain\r\na=max-size:1000\r\n")
REMOTE = {"user": "sip:bob@example.com", "endpoint": "node-a-e1"}
REASON = {"code": 486, "text": "Busy Here"}

CLIENT = [
    {"type": "hello", "rid": 1, "version": 1, "user": "sip:alice@example.com",
     "token": "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJzaXA6YWxpY2VAZXhhbXBsZS5jb20ifQ.sig",
     "device": "laptop", "agent": "fuzz"},
    {"type": "ping", "rid": 7}, {"type": "ping"}, {"type": "bye", "rid": 2},
    {"type": "device_state", "rid": 3, "activity": "active", "idle_ms": 1200},
    {"type": "set_status", "rid": 4, "status": None},
    {"type": "set_status", "status": "do_not_disturb"},
    {"type": "subscribe", "rid": 5, "users": ["sip:bob@example.com", "SIP:carol@EXAMPLE.com"]},
    {"type": "unsubscribe", "users": []},
    {"type": "call_establish", "rid": 6, "to": "sip:bob@example.com", "conversation": "v1",
     "toast": {"content_type": "text/plain", "body": "hi"}, "sdp": OFFER},
    {"type": "call_accept", "rid": 8, "call": "c1", "sdp": ANSWER},
    {"type": "call_decline", "call": "c1", "code": 603},
    {"type": "call_forward", "call": "c1", "to": "sip:carol@example.com"},
    {"type": "call_transfer", "rid": 9, "call": "c1", "to": "sip:carol@example.com"},
    {"type": "call_terminate", "rid": 10, "call": "c1"},
    {"type": "conversation_terminate", "conversation": "v1"},
    {"type": "message", "rid": 11, "call": "c1", "content_type": "text/plain", "body": "hello"},
    {"type": "message", "call": "c1", "content_type": "image/png", "body": b"\x89PNG"},
    {"type": "message_ack", "call": "c1", "msg": 2},
    {"type": "composing", "call": "c1", "active": True},
]
SERVER = [
    {"type": "welcome", "rid": 1, "endpoint": "node-a-e1", "node": "node-a",
     "heartbeat_ms": 15000, "max_frame": 65536},
    {"type": "error", "rid": 2, "code": "rate_limited", "message": "slow down"},
    {"type": "ok"}, {"type": "pong", "rid": 3},
    {"type": "shutdown", "reason": "Server shutting down", "reconnect_after_ms": 5000},
    {"type": "presence", "user": "sip:alice@example.com", "availability": "busy_inactive",
     "most_active": "node-a-e1", "status": None,
     "endpoints": [{"endpoint": "node-a-e1", "device": "laptop", "activity": "unknown",
                    "idle_ms": None, "rank": 1}]},
    {"type": "call_created", "rid": 4, "call": "c1", "conversation": "v1"},
    {"type": "call_state", "call": "c1", "conversation": "v1", "direction": "inbound",
     "state": "terminated", "previous": "terminating", "reason": REASON},
    {"type": "call_incoming", "call": "c2", "conversation": "v2", "from": "sip:a@b",
     "toast": {"content_type": "application/octet-stream", "body": b"\x00"}, "sdp": OFFER,
     "immediate_auto_accept": False},
    {"type": "call_ringing", "call": "c1"},
    {"type": "call_established", "call": "c1", "sdp": ANSWER, "remote": REMOTE},
    {"type": "auto_accept_needed", "call": "c1"},
    {"type": "call_forwarded", "call": "c1", "to": "sip:carol@example.com"},
    {"type": "call_transferred", "call": "c1", "remote": REMOTE},
    {"type": "message_delivered", "rid": 5, "call": "c1", "msg": 2},
    {"type": "message_failed", "call": "c1", "msg": 3, "code": 408, "text": "Request Timeout"},
    {"type": "message_received", "call": "c1", "msg": 1, "from": "sip:a@b",
     "content_type": "text/plain", "body": "hi", "toast": True},
    {"type": "remote_composing", "call": "c1", "active": False},
]
BAD = [
    msgpack.packb(["ping", 5]), msgpack.packb({"rid": 5}), msgpack.packb({"type": 3}),
    msgpack.packb({"type": "nope", "rid": 9}), msgpack.packb({"type": "ping"}) + b"\xc0",
    msgpack.packb({"type": "ping", "rid": -1}), msgpack.packb({"type": "ping", "rid": 2**40}),
    msgpack.packb({"type": "call_decline", "call": 1}), b"\xc1", b"\xdf\xff\xff\xff\xff",
    msgpack.packb({"type": "ping", "x": [[[[[[[[]]]]]]]]}),
    msgpack.packb({"type": "ping", "x": msgpack.ExtType(1, b"ab")}),
    msgpack.packb({b"type": b"ping"}, use_bin_type=True),
]


def write(target, data):
    name = hashlib.sha1(data).hexdigest()
    os.makedirs(os.path.join("corpus", target), exist_ok=True)
    with open(os.path.join("corpus", target, name), "wb") as f:
        f.write(data)


def frame(body):
    return struct.pack(">I", len(body)) + body


bodies = [msgpack.packb(m, use_bin_type=True) for m in CLIENT + SERVER] + BAD
for b in bodies:
    write("message_decode", b)
# frame_decode: [max_frame pick, chunk seed, stream...]
write("frame_decode", bytes([255, 1]) + b"".join(frame(b) for b in bodies[:8]))
write("frame_decode", bytes([0, 7]) + frame(bodies[0]) + b"\x00\x00\x00\x00")
write("frame_decode", bytes([0, 3]) + b"\xff\xff\xff\xff")
write("frame_decode", bytes([1, 9]) + frame(b"\x80" * 300) + frame(b"\x81"))
write("frame_decode", bytes([2, 2]) + frame(bodies[5])[:7])
for b in bodies[:6]:
    write("frame_decode", bytes([40, len(b) % 251]) + frame(b))
# sdp_parse: [split pick, offer+answer]
for offer, answer in [(OFFER, ANSWER), (OFFER_MSRP, ANSWER), (OFFER, OFFER_MSRP),
                      (OFFER_MSRP, "text/plain image/png *"), ("v=0\n", "m=message 0 sip null")]:
    data = (offer + answer).encode()
    pick = min(255, len(offer.encode()) * 256 // len(data) + 1)
    write("sdp_parse", bytes([pick]) + data)
# proxy_v2: PROXY protocol v2 headers (signature, version/command, family, length, rest)
PROXY_SIG = b"\r\n\r\n\x00\r\nQUIT\n"
V4 = bytes([203, 0, 113, 7, 192, 0, 2, 1]) + struct.pack(">HH", 40000, 5070)
V6 = (bytes.fromhex("20010db8000000000000000000000007")
      + bytes.fromhex("20010db8000000000000000000000001") + struct.pack(">HH", 40000, 5070))
write("proxy_v2", PROXY_SIG + bytes([0x21, 0x11]) + struct.pack(">H", len(V4)) + V4)
write("proxy_v2", PROXY_SIG + bytes([0x21, 0x21]) + struct.pack(">H", len(V6)) + V6)
write("proxy_v2", PROXY_SIG + bytes([0x20, 0x00]) + struct.pack(">H", 0))
