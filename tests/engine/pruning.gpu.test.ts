/**
 * Serving with a KV budget: requests are pruned as they grow, every block comes back, and
 * tokens sampled before a request's first pruning equal the exact (unpruned) run.
 */
import { ok, strictEqual } from "node:assert/strict";
import { openModel } from "../../src/engine/model/open_model.ts";
import { inferenceEngine } from "../helpers/engine.ts";
import { gpuTest } from "../helpers/gpu.ts";

const MODEL_DIR = new URL("../../models/stories260K/", import.meta.url).pathname;

Deno.test({
  name: "serving with a KV budget prunes each request and matches the exact run " +
    "until its first pruning",
  ...gpuTest,
}, async () => {
  const source = await openModel(MODEL_DIR);
  const prompts = [[1], [1, 403, 407, 261, 378], [1, 317, 263, 377]];
  const run = async (kvBudget: number) => {
    const engine = await inferenceEngine(source, {
      maxSeqs: 4,
      maxContext: 160,
      maxTokensPerStep: 32,
      kvBudget,
    });
    const outputs = await Promise.all(
      prompts.map((prompt) =>
        engine.generate({
          prompt,
          maxTokens: 150,
          sampling: { temperature: 0, topK: 0, topP: 1, seed: 0 },
          ignoreEos: true,
        })
      ),
    );
    engine.blockManager.checkIntegrity();
    ok(engine.blockManager.stats().used === 0, "every block is released after the requests finish");
    await engine.close();
    return outputs;
  };
  const exact = await run(0);
  const pruned = await run(64);
  pruned.forEach((out, i) => {
    ok(out.evictedTokens > 0, `request ${i} was pruned`);
    // Tokens sampled before the KV first reached the budget see the full cache.
    const unpruned = 64 - prompts[i].length;
    strictEqual(
      out.tokens.slice(0, unpruned).join(","),
      exact[i].tokens.slice(0, unpruned).join(","),
    );
  });
});
