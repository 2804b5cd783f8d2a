/**
 * The browser half of tests/tests/browser.rs: Debian's headless Chromium, driven by
 * playwright-core (no browser download), with Bob signed in to the web client on two tabs.
 * The Rust test places the calls; the two talk over stdin/stdout, one line per step:
 *
 *   → ready <endpoint of tab 1> <endpoint of tab 2>   both tabs signed in, Alice seen available
 *   ← called                                          Alice called with a toast
 *   → accepted                                        toast on both, Accept clicked in tab 1,
 *                                                     the toast message shown there, gone from tab 2
 *   ← sent                                            Alice sent a message on the call
 *   → replied                                         tab 1 showed it and replied (typing, ✓✓)
 *   ← ended                                           Alice hung up
 *   → input-on-2                                      input on tab 2 published `active`
 *   ← called                                          Alice called again; nobody clicks
 *   → timeout-picked-2                                the timeout gave the call to tab 2
 *   ← hide                                            Alice watches Bob's presence
 *   → hidden                                          both tabs hidden: each published `away`
 *   ← idle
 *   → inactive                                        a third tab, left alone past its idle
 *                                                     time, published `inactive`
 *
 * Environment: CONFAB_PAGE_URL (the node's page), CONFAB_TOKEN_BOB, CONFAB_SCREENSHOTS (a
 * folder), CHROMIUM (default /usr/bin/chromium). Each step saves screenshots there.
 */
import { chromium } from "playwright-core";
import { createInterface } from "node:readline";
import { mkdirSync } from "node:fs";
import { join } from "node:path";

const PAGE = process.env.CONFAB_PAGE_URL;
const TOKEN = process.env.CONFAB_TOKEN_BOB;
const SHOTS = process.env.CONFAB_SCREENSHOTS;
const BOB = "sip:bob@example.com";
const ALICE = "sip:alice@example.com";
/** Longest wait for anything the page shows (a safety net, not pacing). */
const STEP = 15_000;

const lines = createInterface({ input: process.stdin })[Symbol.asyncIterator]();
async function expectLine(want) {
  const { value, done } = await lines.next();
  if (done || value.trim() !== want) throw new Error(`expected "${want}" from the test, got ${done ? "EOF" : `"${value}"`}`);
}
const say = (line) => process.stdout.write(`${line}\n`);

let shot = 0;
async function screenshot(page, name) {
  shot += 1;
  await page.screenshot({ path: join(SHOTS, `${String(shot).padStart(2, "0")}-${name}.png`), fullPage: true });
}

async function signIn(page, device, idleMs = 600_000) {
  await page.goto(`${PAGE}?user=${encodeURIComponent(BOB)}&device=${device}&contact=${encodeURIComponent(ALICE)}&idle=${idleMs}`);
  await page.getByTestId("signin").locator('input[name="token"]').fill(TOKEN);
  await page.getByTestId("signin-button").click();
  await page.getByTestId("connection").filter({ hasText: "online" }).waitFor({ timeout: STEP });
  await page.getByTestId("presence").filter({ hasText: "available" }).waitFor({ timeout: STEP });
  return page.getByTestId("me").getAttribute("data-endpoint");
}

/** Waits until the page's last publication the node accepted is `what` (and a new one). */
async function published(page, what, before) {
  await page.waitForFunction(
    ([w, b]) => {
      const p = document.body.dataset.published ?? "";
      return p !== b && p.startsWith(`${w}:`);
    },
    [what, before],
    { timeout: STEP },
  );
}

/**
 * Hides the tab as the browser does when the person switches away. Headless Chromium keeps
 * every tab visible, so the page's view of its visibility is set and the event fired.
 */
async function hide(page) {
  await page.evaluate(() => {
    Object.defineProperty(document, "hidden", { configurable: true, get: () => true });
    Object.defineProperty(document, "visibilityState", { configurable: true, get: () => "hidden" });
    document.dispatchEvent(new Event("visibilitychange"));
  });
}

/** The toast for the call from Alice, visible with its text. */
function toast(page, text) {
  return page.getByTestId("toast").filter({ hasText: text });
}

async function main() {
  mkdirSync(SHOTS, { recursive: true });
  const browser = await chromium.launch({
    executablePath: process.env.CHROMIUM ?? "/usr/bin/chromium",
    args: ["--no-sandbox", "--disable-dev-shm-usage"],
  });
  try {
    const context = await browser.newContext({ viewport: { width: 900, height: 700 } });
    const tab1 = await context.newPage();
    const tab2 = await context.newPage();
    for (const [i, tab] of [tab1, tab2].entries()) {
      tab.on("pageerror", (e) => process.stderr.write(`tab ${i + 1} page error: ${e}\n`));
    }
    const e1 = await signIn(tab1, "tab-1");
    const e2 = await signIn(tab2, "tab-2");
    await screenshot(tab1, "tab1-signed-in");
    await screenshot(tab2, "tab2-signed-in");
    say(`ready ${e1} ${e2}`);

    // A click: both tabs show the toast, tab 1 accepts.
    await expectLine("called");
    await toast(tab1, "lunch?").waitFor({ timeout: STEP });
    await toast(tab2, "lunch?").waitFor({ timeout: STEP });
    await screenshot(tab1, "tab1-toast");
    await screenshot(tab2, "tab2-toast");
    await tab1.bringToFront();
    await toast(tab1, "lunch?").getByTestId("toast-accept").click();
    await tab1.getByTestId("message").filter({ hasText: "lunch?" }).waitFor({ timeout: STEP });
    await toast(tab1, "lunch?").waitFor({ state: "detached", timeout: STEP });
    await toast(tab2, "lunch?").waitFor({ state: "detached", timeout: STEP });
    await tab2.getByTestId("notices").filter({ hasText: "Call completed elsewhere" }).waitFor({ timeout: STEP });
    await screenshot(tab1, "tab1-accepted");
    await screenshot(tab2, "tab2-completed-elsewhere");
    say("accepted");

    // The chat: Alice's message arrives, Bob types (Alice sees composing) and replies.
    await expectLine("sent");
    await tab1.getByTestId("message").filter({ hasText: "free at noon?" }).waitFor({ timeout: STEP });
    await tab1.getByTestId("text").pressSequentially("yes, see you", { delay: 20 });
    await tab1.getByTestId("send").click();
    await tab1.getByTestId("tick").and(tab1.locator('[data-state="delivered"]')).waitFor({ timeout: STEP });
    await screenshot(tab1, "tab1-chat-delivered");
    say("replied");
    await expectLine("ended");
    await tab1.getByTestId("call-state").filter({ hasText: "terminated" }).waitFor({ timeout: STEP });

    // The timeout: input on tab 2 last, so the node hands it the next call.
    const before = await tab2.evaluate(() => document.body.dataset.published ?? "");
    await tab2.bringToFront();
    await tab2.mouse.move(200, 200);
    await tab2.mouse.move(240, 260);
    await tab2.keyboard.press("Shift");
    await tab2.waitForFunction(
      (b) => (document.body.dataset.published ?? "") !== b && document.body.dataset.published.startsWith("active:"),
      before,
      { timeout: STEP },
    );
    say("input-on-2");
    await expectLine("called");
    await toast(tab1, "still there?").waitFor({ timeout: STEP });
    await toast(tab2, "still there?").waitFor({ timeout: STEP });
    await screenshot(tab1, "tab1-second-toast");
    await screenshot(tab2, "tab2-second-toast");
    await tab2.getByTestId("message").filter({ hasText: "still there?" }).waitFor({ timeout: STEP });
    await toast(tab2, "still there?").waitFor({ state: "detached", timeout: STEP });
    await toast(tab1, "still there?").waitFor({ state: "detached", timeout: STEP });
    await screenshot(tab2, "tab2-picked-by-timeout");
    await screenshot(tab1, "tab1-completed-elsewhere");
    say("timeout-picked-2");

    // Where the person is: hidden tabs publish `away`, a tab left alone `inactive`.
    await expectLine("hide");
    for (const tab of [tab1, tab2]) {
      const before = await tab.evaluate(() => document.body.dataset.published ?? "");
      await hide(tab);
      await published(tab, "away", before);
    }
    await screenshot(tab2, "tab2-hidden-away");
    say("hidden");
    await expectLine("idle");
    const tab3 = await context.newPage();
    tab3.on("pageerror", (e) => process.stderr.write(`tab 3 page error: ${e}\n`));
    await signIn(tab3, "tab-3", 1_000);
    await published(tab3, "inactive", "");
    await screenshot(tab3, "tab3-idle-inactive");
    say("inactive");
  } finally {
    await browser.close();
  }
}

main().then(
  () => process.exit(0),
  (e) => {
    process.stderr.write(`browser test failed: ${e.stack ?? e}\n`);
    process.exit(1);
  },
);
