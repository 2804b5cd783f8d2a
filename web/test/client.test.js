/**
 * Unit tests of confab.js against a WebSocket double: what the library sends for each call of
 * its API, and the events and promise results each frame of the node gives.
 */
import { test } from "node:test";
import assert from "node:assert/strict";
import { ConfabClient, ConfabError, TEXT_SDP } from "../confab.js";
import { FakeSocket } from "./fake-socket.js";

const BOB = "sip:bob@example.com";
const ALICE = "sip:alice@example.com";

/** A client signed in to the fake node; returns it and its socket. */
async function signedIn(options = {}) {
  const client = new ConfabClient({
    url: "ws://node/confab",
    user: BOB,
    token: "t",
    device: "tab",
    WebSocket: FakeSocket,
    ...options,
  });
  const connecting = client.connect();
  await new Promise((r) => setTimeout(r, 0));
  const socket = FakeSocket.last;
  const hello = await socket.sent_of("hello");
  assert.deepEqual(
    { type: hello.type, version: hello.version, user: hello.user, token: hello.token, device: hello.device },
    { type: "hello", version: 1, user: BOB, token: "t", device: "tab" },
  );
  socket.play({ type: "welcome", rid: hello.rid, endpoint: "e1", node: "n", heartbeat_ms: 60000, max_frame: 65536 });
  const welcome = await connecting;
  assert.equal(welcome.endpoint, "e1");
  return { client, socket };
}

test("signs in with hello, asks for the confab.v1 subprotocol, and learns its endpoint", async () => {
  const { client, socket } = await signedIn();
  assert.equal(socket.protocol, "confab.v1");
  assert.equal(client.endpoint, "e1");
  client.close();
});

test("a refused request rejects with the node's code", async () => {
  const { client, socket } = await signedIn();
  const watching = client.watch(ALICE);
  const sub = await socket.sent_of("subscribe");
  assert.deepEqual(sub.users, [ALICE]);
  socket.play({ type: "error", rid: sub.rid, code: "forbidden", message: "too many" });
  await assert.rejects(watching, (e) => e instanceof ConfabError && e.code === "forbidden");
  client.close();
});

test("publishes device state and reports watched presence", async () => {
  const { client, socket } = await signedIn();
  const publishing = client.publish("active", 0);
  const ds = await socket.sent_of("device_state");
  assert.equal(ds.activity, "active");
  assert.equal(ds.idle_ms, 0);
  socket.play({ type: "ok", rid: ds.rid });
  await publishing;
  const seen = client.next("presence");
  socket.play({ type: "presence", user: ALICE, availability: "busy", most_active: "e9" });
  assert.equal((await seen).availability, "busy");
  assert.equal(client.presence.get(ALICE).availability, "busy");
  client.close();
});

test("an incoming call with a toast is an event; accept and decline send their requests", async () => {
  const { client, socket } = await signedIn();
  const incoming = client.next("incoming");
  socket.play({
    type: "call_incoming", call: "c1", conversation: "v1", from: ALICE,
    toast: { content_type: "text/plain", body: "lunch?" }, sdp: TEXT_SDP, immediate_auto_accept: false,
  });
  const call = await incoming;
  assert.deepEqual([call.id, call.state, call.toast, call.remoteUser], ["c1", "incoming", "lunch?", ALICE]);
  assert.equal(socket.sent.filter((f) => f.type === "call_accept").length, 0, "a toast waits for a click");
  client.accept("c1").catch(() => {});
  const accept = await socket.sent_of("call_accept");
  assert.equal(accept.call, "c1");
  assert.match(accept.sdp, /m=message/);
  client.decline("c2", 486).catch(() => {});
  const decline = await socket.sent_of("call_decline");
  assert.deepEqual([decline.call, decline.code], ["c2", 486]);
  const ended = client.next("call", (c) => c.state === "terminated");
  socket.play({
    type: "call_state", call: "c1", conversation: "v1", direction: "inbound", state: "terminated",
    previous: "terminating", reason: { code: 200, text: "Call completed elsewhere" },
  });
  assert.equal((await ended).reason.text, "Call completed elsewhere");
  client.close();
});

test("a single device and auto_accept_needed accept at once", async () => {
  const { client, socket } = await signedIn();
  socket.play({ type: "call_incoming", call: "c1", conversation: "v", from: ALICE, sdp: TEXT_SDP, immediate_auto_accept: true });
  assert.equal((await socket.sent_of("call_accept")).call, "c1");
  const asked = client.next("auto_accept_needed");
  socket.play({ type: "auto_accept_needed", call: "c2" });
  assert.equal((await asked).id, "c2");
  assert.equal((await socket.sent_of("call_accept")).call, "c2");
  client.close();
});

test("calls, sends with a delivery result, is told of composing, acks what it receives", async () => {
  const { client, socket } = await signedIn();
  const calling = client.call(ALICE, { toast: "hi" });
  const est = await socket.sent_of("call_establish");
  assert.deepEqual([est.to, est.toast.body], [ALICE, "hi"]);
  socket.play({ type: "call_created", rid: est.rid, call: "c1", conversation: "v1" });
  const call = await calling;
  assert.deepEqual([call.id, call.direction, call.state], ["c1", "outbound", "establishing"]);

  const sending = client.sendMessage("c1", "hello");
  const msg = await socket.sent_of("message");
  assert.deepEqual([msg.call, msg.content_type, msg.body], ["c1", "text/plain", "hello"]);
  socket.play({ type: "message_delivered", rid: msg.rid, call: "c1", msg: 1 });
  assert.deepEqual(await sending, { result: "delivered", msg: 1 });

  const failing = client.sendMessage("c1", "again");
  const msg2 = await socket.sent_of("message");
  socket.play({ type: "message_failed", rid: msg2.rid, call: "c1", msg: 2, code: 408, text: "Request Timeout" });
  assert.deepEqual(await failing, { result: "failed", code: 408, text: "Request Timeout", msg: 2 });

  const typing = client.next("composing");
  socket.play({ type: "remote_composing", call: "c1", active: true });
  assert.equal((await typing).active, true);
  client.composing("c1", true);
  assert.equal((await socket.sent_of("composing")).active, true);

  const got = client.next("message");
  socket.play({ type: "message_received", call: "c1", msg: 7, from: ALICE, content_type: "text/plain", body: "yo" });
  assert.equal((await got).text, "yo");
  const ack = await socket.sent_of("message_ack");
  assert.deepEqual([ack.call, ack.msg], ["c1", 7]);

  client.terminate("c1").catch(() => {});
  assert.equal((await socket.sent_of("call_terminate")).call, "c1");
  client.close();
});

test("a close is an event and fails what was waiting", async () => {
  const { client, socket } = await signedIn();
  const waiting = client.request({ type: "ping" });
  const closed = client.next("closed");
  socket.close(1003, "binary messages only");
  assert.deepEqual(await closed, { code: 1003, reason: "binary messages only" });
  await assert.rejects(waiting, /closed \(1003\)/);
});
