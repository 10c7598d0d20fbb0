/** The Dawn readback pacer: one slow step (a pipeline compile) must not stretch later sleeps. */
import assert from "node:assert/strict";
import { ReadbackPacer } from "../../src/engine/gpu/readback_pacer.ts";

async function sleptMs(pacer: ReadbackPacer, tokens: number): Promise<number> {
  const start = performance.now();
  await pacer.beforeWait(tokens, start);
  return performance.now() - start;
}

Deno.test("the pacer sleeps 80% of the fastest recent step, not a one-off slow one", async () => {
  const pacer = new ReadbackPacer(true);
  assert.ok(await sleptMs(pacer, 16) < 50, "no sleep before any step was measured");
  pacer.record(16, 2000); // first use: compile
  pacer.record(16, 20);
  pacer.record(16, 25);
  const slept = await sleptMs(pacer, 16);
  // 0.8 * 20 ms = 16 ms; the 2 s outlier would have meant 1.6 s. Timers run late on a busy host.
  assert.ok(slept >= 15 && slept < 500, `slept ${slept} ms`);
  assert.ok(await sleptMs(pacer, 1024) < 50, "another step size has its own (empty) history");
  assert.ok(await sleptMs(new ReadbackPacer(false), 16) < 50, "disabled: never sleeps");
});
