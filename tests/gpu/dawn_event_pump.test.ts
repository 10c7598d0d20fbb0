/**
 * The Dawn event pump's schedule and its filter (no GPU): a wait with no history spins two ticks,
 * then backs off to an eighth of the time waited (1 to 16 ms); a wait on an object that waited
 * before sleeps through 90% of its fastest recent wait first; the next tick serves the most
 * urgent wait. Only nameless native functions queued without arguments count as Dawn's ticks,
 * and every other setImmediate call behaves as before once the pump is installed.
 */
import assert from "node:assert/strict";
import {
  installDawnEventPump,
  isDawnTick,
  pumpStats,
  tickDelay,
  WaitBook,
} from "../../src/engine/gpu/dawn_event_pump.ts";

Deno.test("tick delays: two at once, then an eighth of the wait, within 1..16 ms", () => {
  assert.equal(tickDelay(0, 0), 0);
  assert.equal(tickDelay(1, 50), 0, "the second tick still runs at once");
  assert.equal(tickDelay(2, 0.1), 1, "never below a timer's resolution");
  assert.equal(tickDelay(5, 40), 5);
  assert.equal(tickDelay(9, 1000), 16, "never above 16 ms");
  // A wait costs about 12 ticks for 10 ms, 32 for 100 ms, 89 for 1 s (spinning: thousands).
  const ticksFor = (ms: number) => {
    let waited = 0, ticks = 0;
    while (waited < ms) waited += tickDelay(ticks++, waited);
    return ticks;
  };
  assert.deepEqual([10, 100, 1000].map(ticksFor), [12, 32, 89]);
});

Deno.test("a wait on an object that waited before sleeps through 90% of its fastest wait", () => {
  const book = new WaitBook();
  const buffer = {}, other = {};
  assert.equal(book.nextDelay(0), null, "nothing pending");
  // No history: two ticks at once, then the backoff.
  const first = book.begin(buffer, "mapAsync", 0);
  assert.deepEqual([book.nextDelay(0), book.nextDelay(0), book.nextDelay(0)], [0, 0, 1]);
  book.end(buffer, "mapAsync", first, 12);
  const second = book.begin(buffer, "mapAsync", 100);
  book.end(buffer, "mapAsync", second, 110); // fastest: 10 ms
  // History: no tick until 9 ms in, then polls on the timer, none at once.
  book.begin(buffer, "mapAsync", 200);
  assert.equal(book.nextDelay(200), 9);
  assert.deepEqual([book.nextDelay(209), book.nextDelay(210)], [1.125, 1.25]);
  // Another object's new wait is more urgent: it gets the next tick at once.
  book.begin(other, "mapAsync", 211);
  assert.equal(book.nextDelay(211), 0);
  assert.equal(book.pending.size, 2);
});

Deno.test("only nameless native functions queued without arguments are Dawn's ticks", () => {
  assert.equal(isDawnTick(() => {}, []), false, "an arrow function");
  assert.equal(isDawnTick(function () {}, []), false, "a function expression");
  assert.equal(isDawnTick((() => {}).bind(null), []), false, "bound: named 'bound '");
  assert.equal(isDawnTick(Math.max, []), false, "a built-in has a name");
  assert.equal(isDawnTick("code", []), false);
});

Deno.test("other setImmediate calls pass through the installed pump unchanged", async () => {
  installDawnEventPump({});
  installDawnEventPump({}); // idempotent: wraps once
  const before = pumpStats.ticks;
  const order: string[] = [];
  await new Promise<void>((resolve) => {
    setImmediate((a: string, b: string) => order.push(a + b), "x", "y");
    const handle = setImmediate(() => order.push("cleared"));
    clearImmediate(handle);
    setImmediate(() => {
      order.push("last");
      resolve();
    });
  });
  assert.deepEqual(order, ["xy", "last"]);
  assert.equal(pumpStats.ticks, before, "none of them counted as Dawn's");
});
