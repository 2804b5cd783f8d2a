/**
 * confab.js — the JavaScript client library of confab, over the node's WebSocket listener
 * (docs/protocol.md §1 "WebSocket"): one binary message per frame, each a MessagePack map.
 * It owns a device's session: sign-in, heartbeats, requests and their replies (by `rid`),
 * presence (publish and watch), IM calls (establish, accept, decline, terminate, with the
 * state of each), and the flow (messages with their delivery result, acks, composing).
 * Every state change is an event (`client.on(type, fn)`). An ES module for browsers (through
 * an import map for `@msgpack/msgpack`) and Node (pass `WebSocket` from the `ws` package).
 */
import { encode, decode } from "@msgpack/msgpack";

/** The protocol version this library speaks (`hello.version`). */
export const PROTOCOL_VERSION = 1;

/** The SDP every call of this library offers and answers: plain-text messages. */
export const TEXT_SDP =
  "v=0\r\no=- 0 0 IN IP4 0.0.0.0\r\ns=-\r\nc=IN IP4 0.0.0.0\r\nt=0 0\r\n" +
  "m=message 5060 sip null\r\na=accept-types:text/plain\r\n";

/** A request the node refused (`error`), or a message it could not deliver. */
export class ConfabError extends Error {
  constructor(code, message, reply) {
    super(`${code}: ${message}`);
    this.code = code;
    this.reply = reply;
  }
}

/** A tiny event emitter (Node and browsers alike). */
class Emitter {
  #handlers = new Map();
  on(type, fn) {
    if (!this.#handlers.has(type)) this.#handlers.set(type, new Set());
    this.#handlers.get(type).add(fn);
    return () => this.off(type, fn);
  }
  off(type, fn) {
    this.#handlers.get(type)?.delete(fn);
  }
  /** Resolves with the next event of `type` that `pred` accepts. */
  next(type, pred = () => true) {
    return new Promise((resolve) => {
      const off = this.on(type, (e) => {
        if (pred(e)) {
          off();
          resolve(e);
        }
      });
    });
  }
  emit(type, detail) {
    for (const fn of [...(this.#handlers.get(type) ?? [])]) fn(detail);
    for (const fn of [...(this.#handlers.get("*") ?? [])]) fn({ type, detail });
  }
}

/**
 * One device of one user, signed in to a node.
 *
 * Events: `welcome`, `presence` (a watched user's aggregated presence), `incoming` (a call
 * offered to this device, with its toast), `call` (any change of a call: state, remote,
 * ringing), `auto_accept_needed`, `message` (received; acked automatically), `composing`
 * (the other side typing), `delivered` / `failed` (a message sent), `shutdown`, `kicked`,
 * `closed` ({code, reason} of the WebSocket), `frame` (every frame, raw).
 */
export class ConfabClient extends Emitter {
  /**
   * @param {object} o
   * @param {string} o.url `ws://host:port/confab`
   * @param {string} o.user the SIP URI signing in
   * @param {string} o.token its JWT
   * @param {string} o.device this device's name
   * @param {boolean} [o.autoAccept=true] accept when the node says so (one device, or the
   *   toast timed out and this device was chosen)
   * @param {Function} [o.WebSocket] the WebSocket class (default: the global one)
   */
  constructor({ url, user, token, device, autoAccept = true, WebSocket: WS, agent }) {
    super();
    this.url = url;
    this.user = user;
    this.token = token;
    this.device = device;
    this.agent = agent ?? "confab.js";
    this.autoAccept = autoAccept;
    this.WebSocket = WS ?? globalThis.WebSocket;
    /** call id → the call's state as this device sees it */
    this.calls = new Map();
    /** user → last `presence` event */
    this.presence = new Map();
    this.endpoint = null;
    this.socket = null;
    this.#rid = 0;
    this.#pending = new Map();
    this.#heartbeat = null;
  }

  #rid;
  #pending;
  #heartbeat;

  /** Opens the WebSocket and signs in; resolves with the `welcome`. */
  async connect() {
    const socket = new this.WebSocket(this.url, "confab.v1");
    socket.binaryType = "arraybuffer";
    this.socket = socket;
    await new Promise((resolve, reject) => {
      socket.onopen = resolve;
      socket.onerror = () => reject(new Error(`cannot connect to ${this.url}`));
      socket.onclose = (e) =>
        reject(new Error(`closed before open: ${e.code} ${e.reason ?? ""}`));
    });
    socket.onmessage = (e) => this.#receive(e.data);
    socket.onclose = (e) => this.#closed(e.code, e.reason);
    socket.onerror = () => {};
    const welcome = await this.request({
      type: "hello",
      version: PROTOCOL_VERSION,
      user: this.user,
      token: this.token,
      device: this.device,
      agent: this.agent,
    });
    this.endpoint = welcome.endpoint;
    this.#heartbeat = setInterval(
      () => this.request({ type: "ping" }).catch(() => {}),
      welcome.heartbeat_ms,
    );
    this.emit("welcome", welcome);
    return welcome;
  }

  /** Sends a frame with no reply (`message_ack`, `composing`). */
  send(frame) {
    this.socket.send(encode(frame, { ignoreUndefined: true }));
  }

  /**
   * Sends a request with a fresh `rid`; resolves with its reply, rejects with a
   * {@link ConfabError} on `error` (or `message_failed`).
   */
  request(frame) {
    const rid = ++this.#rid;
    return new Promise((resolve, reject) => {
      this.#pending.set(rid, { resolve, reject });
      try {
        this.send({ ...frame, rid });
      } catch (e) {
        this.#pending.delete(rid);
        reject(e);
      }
    });
  }

  // --- presence -----------------------------------------------------------------------

  /** Publishes this device's activity (`active`, `inactive`, `away`). */
  publish(activity, idleMs) {
    return this.request({ type: "device_state", activity, idle_ms: idleMs });
  }

  /** Sets (or with `null` clears) the user's manual status. */
  setStatus(status) {
    return this.request({ type: "set_status", status });
  }

  /** Watches users' aggregated presence (`presence` events). */
  watch(...users) {
    return this.request({ type: "subscribe", users });
  }

  unwatch(...users) {
    return this.request({ type: "unsubscribe", users });
  }

  // --- calls ----------------------------------------------------------------------------

  /** Calls `to`, with an optional toast text; resolves with the call (state `establishing`). */
  async call(to, { toast, conversation } = {}) {
    const reply = await this.request({
      type: "call_establish",
      to,
      conversation,
      toast: toast === undefined ? undefined : { content_type: "text/plain", body: toast },
      sdp: TEXT_SDP,
    });
    return this.#track(reply.call, {
      conversation: reply.conversation,
      direction: "outbound",
      remoteUser: to,
    });
  }

  /** Accepts a call offered to this device. */
  accept(call) {
    return this.request({ type: "call_accept", call, sdp: TEXT_SDP });
  }

  /** Declines a call offered to this device (`code`: 486 busy, 603 decline everywhere, ...). */
  decline(call, code) {
    return this.request({ type: "call_decline", call, code });
  }

  /** Hangs up a call. */
  terminate(call) {
    return this.request({ type: "call_terminate", call });
  }

  // --- the flow -------------------------------------------------------------------------

  /**
   * Sends a text message on an established call; resolves with `{result: "delivered", msg}`
   * once the other device has acknowledged it, or `{result: "failed", code, text}`.
   */
  async sendMessage(call, text, contentType = "text/plain") {
    try {
      const reply = await this.request({ type: "message", call, content_type: contentType, body: text });
      return { result: "delivered", msg: reply.msg };
    } catch (e) {
      if (e instanceof ConfabError && e.reply?.type === "message_failed") {
        return { result: "failed", code: e.reply.code, text: e.reply.text, msg: e.reply.msg };
      }
      throw e;
    }
  }

  /** Says whether the user is typing on `call` (refresh every 5 s while typing). */
  composing(call, active) {
    this.send({ type: "composing", call, active });
  }

  /** Signs out: every call ends, then the node closes the WebSocket. */
  async bye() {
    const reply = await this.request({ type: "bye" });
    this.#stopHeartbeat();
    return reply;
  }

  /** Closes the WebSocket without `bye` (the node sees a lost connection). */
  close() {
    this.#stopHeartbeat();
    this.socket?.close();
  }

  // --- receiving ------------------------------------------------------------------------

  #receive(data) {
    if (typeof data === "string") {
      this.emit("error", new Error("the node sent a text message"));
      return;
    }
    let m;
    try {
      m = decode(new Uint8Array(data));
    } catch (e) {
      this.emit("error", e);
      return;
    }
    this.emit("frame", m);
    this.#settle(m);
    this.#event(m);
  }

  /** A reply settles the request with its `rid`. */
  #settle(m) {
    if (m.rid === undefined || m.rid === null) return;
    const waiting = this.#pending.get(m.rid);
    if (!waiting) return;
    this.#pending.delete(m.rid);
    if (m.type === "error") waiting.reject(new ConfabError(m.code, m.message, m));
    else if (m.type === "message_failed") waiting.reject(new ConfabError(m.code, m.text, m));
    else waiting.resolve(m);
  }

  #event(m) {
    switch (m.type) {
      case "presence":
        this.presence.set(m.user, m);
        this.emit("presence", m);
        break;
      case "call_incoming": {
        const call = this.#track(m.call, {
          conversation: m.conversation,
          direction: "inbound",
          remoteUser: m.from,
          state: "incoming",
          toast: m.toast ? textOf(m.toast.body) : undefined,
          immediateAutoAccept: m.immediate_auto_accept,
        });
        this.emit("incoming", call);
        if (m.immediate_auto_accept && this.autoAccept) this.accept(m.call).catch(() => {});
        break;
      }
      case "call_state":
        this.#update(m.call, {
          conversation: m.conversation,
          direction: m.direction,
          state: m.state,
          previous: m.previous,
          reason: m.reason,
        });
        break;
      case "call_ringing":
        this.#update(m.call, { ringing: true });
        break;
      case "call_established":
        this.#update(m.call, { remote: m.remote });
        break;
      case "call_forwarded":
        this.#update(m.call, { forwardedTo: m.to });
        break;
      case "call_transferred":
        this.#update(m.call, { remote: m.remote });
        break;
      case "auto_accept_needed":
        this.emit("auto_accept_needed", this.calls.get(m.call) ?? { id: m.call });
        if (this.autoAccept) this.accept(m.call).catch(() => {});
        break;
      case "message_received":
        this.send({ type: "message_ack", call: m.call, msg: m.msg });
        this.emit("message", {
          call: m.call,
          msg: m.msg,
          from: m.from,
          contentType: m.content_type,
          text: textOf(m.body),
          toast: m.toast === true,
        });
        break;
      case "remote_composing":
        this.emit("composing", { call: m.call, active: m.active });
        break;
      case "message_delivered":
        this.emit("delivered", { call: m.call, msg: m.msg });
        break;
      case "message_failed":
        this.emit("failed", { call: m.call, msg: m.msg, code: m.code, text: m.text });
        break;
      case "shutdown":
        this.emit("shutdown", m);
        break;
      case "kicked":
        this.emit("kicked", m);
        break;
      default:
        break;
    }
  }

  #track(id, fields) {
    const call = { id, state: "establishing", ...this.calls.get(id), ...fields };
    this.calls.set(id, call);
    this.emit("call", call);
    return call;
  }

  #update(id, fields) {
    return this.#track(id, fields);
  }

  #closed(code, reason) {
    this.#stopHeartbeat();
    for (const { reject } of this.#pending.values()) {
      reject(new Error(`connection closed (${code})`));
    }
    this.#pending.clear();
    this.emit("closed", { code, reason });
  }

  #stopHeartbeat() {
    if (this.#heartbeat) clearInterval(this.#heartbeat);
    this.#heartbeat = null;
  }
}

/** A message body as text (`str` for text/*, `bin` otherwise). */
function textOf(body) {
  if (typeof body === "string") return body;
  if (body instanceof Uint8Array) return new TextDecoder().decode(body);
  return String(body ?? "");
}
