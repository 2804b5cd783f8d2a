/**
 * The web client's page logic: signs in with confab.js to the node that served the page,
 * shows the contact's aggregated presence, a toast with Accept/Decline for each call offered,
 * the chat of the current call with delivery ticks and the typing indicator, and why a call
 * ended ("Call completed elsewhere"). It publishes `active` on input and `inactive`/`away`
 * when the tab is idle or hidden, so the node's choice of device follows the person.
 */
import { ConfabClient } from "./confab.js";

const $ = (id) => document.getElementById(id);
const params = new URLSearchParams(location.search);
/** No input for this long (ms): `inactive` (`?idle=` overrides, for demos and tests). */
const IDLE_AFTER_MS = Number(params.get("idle") ?? 60_000);
/** An `active` publication is repeated at most this often while input goes on. */
const ACTIVE_REFRESH_MS = 1_000;
/** `composing` is refreshed this often while typing, and cleared after this long without. */
const COMPOSING_REFRESH_MS = 5_000;
const COMPOSING_IDLE_MS = 3_000;

let client = null;
let contact = "";
/** The call shown in the chat. */
let current = null;
const activity = { published: null, at: 0, lastInput: Date.now(), seq: 0 };
const composing = { active: false, sentAt: 0, timer: null };

for (const key of ["user", "device", "contact"]) {
  if (params.has(key)) $("signin").elements[key].value = params.get(key);
}

$("signin").addEventListener("submit", async (e) => {
  e.preventDefault();
  const f = e.target.elements;
  contact = f.contact.value.trim();
  const scheme = location.protocol === "https:" ? "wss" : "ws";
  client = new ConfabClient({
    url: `${scheme}://${location.host}/confab`,
    user: f.user.value.trim(),
    token: f.token.value.trim(),
    device: f.device.value.trim() || `browser-${Math.random().toString(36).slice(2, 6)}`,
  });
  window.confab = client;
  wire(client);
  try {
    await client.connect();
  } catch (err) {
    $("signin-error").textContent = `Sign-in failed: ${err.message}`;
    return;
  }
  $("signin").hidden = true;
  $("app").hidden = false;
  $("me").textContent = `${client.user} on ${client.device} (${client.endpoint})`;
  $("me").dataset.endpoint = client.endpoint;
  setConnection("online");
  $("contact-name").textContent = contact || "(no contact)";
  if (contact) await client.watch(contact).catch((err) => notice(`Cannot watch ${contact}: ${err.message}`));
  input();
});

/** Subscribes the page to the client's events. */
function wire(c) {
  c.on("presence", (p) => {
    if (p.user !== contact) return;
    const el = $("presence");
    el.textContent = p.availability.replaceAll("_", " ");
    el.className = `presence ${p.availability}`;
  });
  c.on("incoming", (call) => {
    if (!call.immediateAutoAccept) showToast(call);
  });
  c.on("auto_accept_needed", () => notice("Nobody clicked: this device was the most active, accepting"));
  c.on("call", (call) => {
    if (call.state === "established") {
      removeToast(call.id);
      openChat(call);
    }
    if (call.id === current?.id) $("call-state").textContent = call.state;
    if (call.state === "terminated") {
      removeToast(call.id);
      const why = call.reason ? `${call.reason.code} ${call.reason.text}` : "ended";
      notice(`Call with ${call.remoteUser ?? "?"} ended: ${why}`);
      if (call.id === current?.id) $("typing").hidden = true;
    }
  });
  c.on("message", (m) => {
    if (m.call !== current?.id) openChat(c.calls.get(m.call) ?? { id: m.call, remoteUser: m.from });
    addMessage(m.text, { from: m.from, toast: m.toast });
  });
  c.on("composing", (m) => {
    if (m.call !== current?.id) return;
    $("typing").hidden = !m.active;
    $("typing").textContent = `${current.remoteUser} is typing…`;
  });
  c.on("shutdown", (m) => notice(`Node going away: ${m.reason}`));
  c.on("kicked", (m) => notice(`Signed out by an operator: ${m.reason}`));
  c.on("closed", ({ code, reason }) => {
    setConnection("signed out");
    notice(`Connection closed (${code}${reason ? ` ${reason}` : ""})`);
  });
}

function setConnection(text) {
  $("connection").textContent = text;
  $("connection").classList.toggle("online", text === "online");
}

function notice(text) {
  const li = document.createElement("li");
  li.textContent = `${new Date().toLocaleTimeString()} ${text}`;
  $("notices").prepend(li);
}

// --- toasts ---------------------------------------------------------------------------

function showToast(call) {
  const div = document.createElement("div");
  div.className = "toast";
  div.dataset.testid = "toast";
  div.dataset.call = call.id;
  const title = document.createElement("strong");
  title.textContent = `${call.remoteUser} is calling`;
  const text = document.createElement("p");
  text.textContent = call.toast ?? "";
  const accept = document.createElement("button");
  accept.textContent = "Accept";
  accept.dataset.testid = "toast-accept";
  accept.onclick = () => client.accept(call.id).catch((e) => notice(`Accept failed: ${e.message}`));
  const decline = document.createElement("button");
  decline.textContent = "Decline";
  decline.dataset.testid = "toast-decline";
  decline.onclick = () => {
    removeToast(call.id);
    client.decline(call.id, 486).catch((e) => notice(`Decline failed: ${e.message}`));
  };
  div.append(title, text, accept, decline);
  $("toasts").append(div);
}

function removeToast(id) {
  document.querySelector(`.toast[data-call="${CSS.escape(id)}"]`)?.remove();
}

// --- chat -----------------------------------------------------------------------------

function openChat(call) {
  if (current?.id === call.id) return;
  current = call;
  $("messages").replaceChildren();
  $("chat").hidden = false;
  $("chat-with").textContent = call.remoteUser ?? "";
  $("call-state").textContent = call.state ?? "";
  $("typing").hidden = true;
}

/** Adds a message to the chat; returns its tick element for our own. */
function addMessage(text, { from, mine = false, toast = false } = {}) {
  const li = document.createElement("li");
  li.dataset.testid = mine ? "message-mine" : "message";
  li.className = mine ? "mine" : "";
  li.textContent = text;
  if (toast) {
    const label = document.createElement("small");
    label.className = "label";
    label.textContent = "toast";
    li.prepend(label);
  }
  if (from) li.title = from;
  let tick = null;
  if (mine) {
    tick = document.createElement("span");
    tick.className = "tick";
    tick.dataset.testid = "tick";
    tick.textContent = "✓";
    tick.title = "sent";
    li.append(tick);
  }
  $("messages").append(li);
  return tick;
}

$("chat-button").addEventListener("click", async () => {
  if (!contact) return;
  try {
    openChat(await client.call(contact));
  } catch (e) {
    notice(`Call failed: ${e.message}`);
  }
});

$("hangup").addEventListener("click", () => {
  if (current) client.terminate(current.id).catch((e) => notice(`Hang-up failed: ${e.message}`));
});

$("composer").addEventListener("submit", async (e) => {
  e.preventDefault();
  const text = $("text").value;
  if (!text || !current) return;
  $("text").value = "";
  stopComposing(false);
  const tick = addMessage(text, { mine: true });
  const result = await client.sendMessage(current.id, text).catch((err) => ({
    result: "failed",
    code: "",
    text: err.message,
  }));
  if (result.result === "delivered") {
    tick.textContent = "✓✓";
    tick.title = "delivered";
    tick.dataset.state = "delivered";
  } else {
    tick.textContent = `✗ ${result.code} ${result.text}`;
    tick.className = "tick failed";
    tick.dataset.state = "failed";
  }
});

$("text").addEventListener("input", () => {
  if (!current) return;
  const now = Date.now();
  if (!composing.active || now - composing.sentAt > COMPOSING_REFRESH_MS) {
    client.composing(current.id, true);
    composing.active = true;
    composing.sentAt = now;
  }
  clearTimeout(composing.timer);
  composing.timer = setTimeout(() => stopComposing(true), COMPOSING_IDLE_MS);
});

/** Ends `composing`; `tell` = false when a message is sent (the node clears it then). */
function stopComposing(tell) {
  clearTimeout(composing.timer);
  if (composing.active && tell && current) client.composing(current.id, false);
  composing.active = false;
}

// --- where the person is ---------------------------------------------------------------

/** Publishes `what` unless it is what the node already has (and `active` was just sent). */
function publish(what, idleMs) {
  if (!client?.endpoint) return;
  const now = Date.now();
  if (what === activity.published && (what !== "active" || now - activity.at < ACTIVE_REFRESH_MS)) {
    return;
  }
  activity.published = what;
  activity.at = now;
  client
    .publish(what, idleMs)
    .then(() => {
      activity.seq += 1;
      document.body.dataset.published = `${what}:${activity.seq}`;
    })
    .catch(() => {});
}

function input() {
  activity.lastInput = Date.now();
  if (!document.hidden) publish("active", 0);
}

for (const type of ["pointerdown", "keydown", "mousemove", "wheel", "touchstart", "focus"]) {
  window.addEventListener(type, input, { passive: true, capture: true });
}

document.addEventListener("visibilitychange", () => {
  const idle = Date.now() - activity.lastInput;
  if (document.hidden) publish("away", idle);
  else publish(idle < IDLE_AFTER_MS ? "active" : "inactive", idle);
});

setInterval(() => {
  const idle = Date.now() - activity.lastInput;
  if (document.hidden) publish("away", idle);
  else if (idle >= IDLE_AFTER_MS) publish("inactive", idle);
}, Math.min(5_000, IDLE_AFTER_MS));
