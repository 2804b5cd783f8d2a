/**
 * A WebSocket double for the library's unit tests: it records what the client sends (decoded)
 * and lets a test play the node's frames, with no network.
 */
import { encode, decode } from "@msgpack/msgpack";

export class FakeSocket {
  static last = null;

  constructor(url, protocol) {
    this.url = url;
    this.protocol = protocol;
    this.sent = [];
    this.waiters = [];
    FakeSocket.last = this;
    queueMicrotask(() => this.onopen?.({}));
  }

  send(bytes) {
    const frame = decode(bytes);
    this.sent.push(frame);
    for (const w of this.waiters.splice(0)) w();
  }

  /** Resolves with the next frame the client sends of `type`. */
  async sent_of(type) {
    for (;;) {
      const i = this.sent.findIndex((f) => f.type === type);
      if (i >= 0) return this.sent.splice(i, 1)[0];
      await new Promise((r) => this.waiters.push(r));
    }
  }

  /** Plays a frame from the node. */
  play(frame) {
    const bytes = encode(frame);
    this.onmessage?.({ data: bytes.buffer.slice(bytes.byteOffset, bytes.byteOffset + bytes.byteLength) });
  }

  close(code = 1000, reason = "") {
    this.onclose?.({ code, reason });
  }
}
