"""Interop peer for confab's protocol tests: an independent MessagePack implementation
(Python's `msgpack`) reads frames Rust built and builds frames Rust must read.

  python3 interop.py echo   < frames   > frames   decode every frame, check it, re-encode it
  python3 interop.py build             > frames   client frames written by hand here
"""
import struct
import sys

import msgpack


def read_frames(data):
    frames, pos = [], 0
    while pos < len(data):
        (n,) = struct.unpack(">I", data[pos : pos + 4])
        frames.append(data[pos + 4 : pos + 4 + n])
        pos += 4 + n
    return frames


def frame(obj):
    body = msgpack.packb(obj, use_bin_type=True)
    return struct.pack(">I", len(body)) + body


def echo():
    out = bytearray()
    for body in read_frames(sys.stdin.buffer.read()):
        obj = msgpack.unpackb(body, raw=False)
        assert isinstance(obj, dict), f"frame is not a map: {obj!r}"
        assert all(isinstance(k, str) for k in obj), f"non-string key in {obj!r}"
        assert isinstance(obj["type"], str)
        if "body" in obj:
            want = str if obj["content_type"].lower().startswith("text/") else bytes
            assert isinstance(obj["body"], want), f"body kind wrong in {obj!r}"
        out += frame(obj)
    sys.stdout.buffer.write(bytes(out))


def build():
    msgs = [
        {"type": "hello", "rid": 1, "version": 1, "user": "sip:alice@example.com",
         "token": "t.o.k", "device": "laptop", "agent": "py/1.0"},
        {"type": "ping"},
        {"type": "device_state", "rid": 2, "activity": "inactive", "idle_ms": 60000},
        {"type": "set_status", "rid": 3, "status": None},
        {"type": "subscribe", "rid": 4, "users": ["sip:bob@example.com"]},
        {"type": "call_establish", "rid": 5, "to": "sip:bob@example.com",
         "toast": {"content_type": "text/plain", "body": "hi"},
         "sdp": "v=0\r\n", "unknown_extra": [1, 2, {"x": None}]},
        {"type": "message", "rid": 4294967295, "call": "c-1",
         "content_type": "application/octet-stream", "body": b"\x00\xff"},
        {"type": "message_ack", "call": "c-1", "msg": 2},
        {"type": "call_decline", "call": "c-2", "code": 603},
        {"type": "composing", "call": "c-1", "active": True},
    ]
    sys.stdout.buffer.write(b"".join(frame(m) for m in msgs))


if __name__ == "__main__":
    {"echo": echo, "build": build}[sys.argv[1]]()
