/**
 * confab.js against a real node over real WebSockets (the `ws` package in Node): run by the
 * Rust test `tests/tests/browser.rs`, which starts the node and passes its URL and two tokens
 * (CONFAB_WS_URL, CONFAB_TOKEN_ALICE, CONFAB_TOKEN_BOB); skipped when they are not set.
 */
import { test } from "node:test";
import assert from "node:assert/strict";
import WebSocket from "ws";
import { ConfabClient } from "../confab.js";

const URL = process.env.CONFAB_WS_URL;
const ALICE = "sip:alice@example.com";
const BOB = "sip:bob@example.com";
const live = { skip: URL ? false : "CONFAB_WS_URL is not set (tests/tests/browser.rs sets it)" };

function client(user, token, device, options = {}) {
  return new ConfabClient({ url: URL, user, token, device, WebSocket, ...options });
}

test("two devices: presence, a call accepted at once, a delivered message, composing, hang-up", live, async () => {
  const alice = client(ALICE, process.env.CONFAB_TOKEN_ALICE, "laptop");
  const bob = client(BOB, process.env.CONFAB_TOKEN_BOB, "tab");
  await alice.connect();
  await bob.connect();

  const available = alice.next("presence", (p) => p.user === BOB && p.availability === "available");
  await alice.watch(BOB);
  await bob.publish("active", 0);
  await available;

  // Every wait is registered before what it waits for can happen: Bob accepts at once, so
  // his side may be established before Alice's `call` resolves.
  const incoming = bob.next("incoming");
  const established = alice.next("call", (c) => c.state === "established");
  const bobEstablished = bob.next("call", (c) => c.state === "established");
  const call = await alice.call(BOB);
  const bobCall = await incoming;
  assert.equal(bobCall.remoteUser, ALICE);
  assert.equal(bobCall.immediateAutoAccept, true);
  await established;
  assert.equal((await bobEstablished).id, bobCall.id);

  const typing = bob.next("composing", (c) => c.active);
  alice.composing(call.id, true);
  await typing;
  const received = bob.next("message");
  assert.deepEqual((await alice.sendMessage(call.id, "hello from node")).result, "delivered");
  assert.equal((await received).text, "hello from node");

  const ended = bob.next("call", (c) => c.id === bobCall.id && c.state === "terminated");
  await alice.terminate(call.id);
  assert.equal((await ended).reason.code, 200);

  const closed = bob.next("closed");
  await bob.bye();
  assert.equal((await closed).code, 1000);
  alice.close();
});

test("a declined call ends on the caller's side with the callee's code", live, async () => {
  const alice = client(ALICE, process.env.CONFAB_TOKEN_ALICE, "laptop");
  const bob = client(BOB, process.env.CONFAB_TOKEN_BOB, "tab", { autoAccept: false });
  await alice.connect();
  await bob.connect();
  const incoming = bob.next("incoming");
  const call = await alice.call(BOB, { toast: "busy?" });
  const bobCall = await incoming;
  assert.equal(bobCall.toast, "busy?");
  const ended = alice.next("call", (c) => c.id === call.id && c.state === "terminated");
  await bob.decline(bobCall.id, 486);
  assert.equal((await ended).reason.code, 486);
  alice.close();
  bob.close();
});
