/**
 * Soak: 3,000 decode steps through the engine's public API with no gap over 2 s between two
 * consecutive tokens of a request. Dawn under Deno used to stall for seconds to minutes at random
 * (see src/engine/gpu/dawn_event_pump.ts); this runs on whichever backend MACE_BACKEND selects,
 * and scripts/test.sh runs it on both. One request at a time, so every step is one decode; the
 * bundled model's 512-token context holds a request of 501 tokens (500 decode steps after the
 * prefill's token).
 */
import assert from "node:assert/strict";
import { MaceEngine } from "../../src/host/mace_engine.ts";
import { gpuTest, testBackend } from "../helpers/gpu.ts";

const REQUESTS = 6;
const TOKENS = 501;
const MAX_GAP_MS = 2000;

Deno.test({
  name: `${REQUESTS * (TOKENS - 1)} decode steps with no gap over ${MAX_GAP_MS} ms between tokens`,
  ...gpuTest,
}, async () => {
  const engine = await MaceEngine.create({ backend: testBackend(), policy: "inference-only" });
  const gaps: number[] = [];
  let longest = { ms: 0, request: -1, token: -1 };
  const start = performance.now();
  try {
    for (let r = 0; r < REQUESTS; r++) {
      let last: number | null = null;
      let count = 0;
      const result = await engine.generate(
        { prompt: [1], maxTokens: TOKENS, ignoreEos: true },
        () => {
          const now = performance.now();
          if (last !== null) {
            const gap = now - last;
            gaps.push(gap);
            if (gap > longest.ms) longest = { ms: gap, request: r, token: count };
          }
          last = now;
          count++;
        },
      );
      assert.equal(result.tokens.length, TOKENS, `request ${r}: tokens`);
      assert.equal(count, TOKENS, `request ${r}: onToken calls`);
    }
  } finally {
    await engine.close();
  }
  const sorted = [...gaps].sort((a, b) => a - b);
  console.log(
    `${gaps.length} decode gaps in ${((performance.now() - start) / 1000).toFixed(1)} s: ` +
      `median ${sorted[sorted.length >> 1].toFixed(1)} ms, ` +
      `p99 ${sorted[Math.floor(sorted.length * 0.99)].toFixed(1)} ms, ` +
      `longest ${longest.ms.toFixed(1)} ms (request ${longest.request}, token ${longest.token})`,
  );
  assert.equal(gaps.length, REQUESTS * (TOKENS - 1));
  assert.ok(
    longest.ms < MAX_GAP_MS,
    `a ${longest.ms.toFixed(0)} ms gap (request ${longest.request}, token ${longest.token})`,
  );
});
