/**
 * Runs on wgpu only (a plain .test.ts): its 1,000 single-token steps, each reading logits back,
 * take minutes on Dawn's SwiftShader; the pruning kernels themselves are tested on both
 * backends (tests/kernels/attention_mass, kv_compact) and so is serving with a KV budget
 * (pruning.gpu.test.ts).
 *
 * KV pruning on the bundled model: teacher-forced log-likelihood of a 256-token
 * text the model itself sampled, with the KV cache held to a 50% budget.
 * Heavy hitters (sinks + window + highest attention mass) must lose less
 * log-likelihood than sinks + a recency window of the same size, the pruned runs
 * must hold at most the budget's blocks, and a budget the text never reaches
 * must give exactly the unpruned result.
 */
import { ok, strictEqual } from "node:assert/strict";
import { openModel } from "../../src/engine/model/open_model.ts";
import { ModelRunner } from "../../src/engine/runner/model_runner.ts";
import { scoreWithPruning } from "../../src/host/pruning_eval.ts";
import { inferenceEngine } from "../helpers/engine.ts";
import { gpuTest, testContext } from "../helpers/gpu.ts";

const MODEL_DIR = new URL("../../models/stories260K/", import.meta.url).pathname;
const LENGTH = 256;
const BUDGET = 128;

Deno.test({
  name: "H2O pruning at a 50% KV budget beats sinks + window and frees blocks",
  ...gpuTest,
}, async () => {
  const ctx = await testContext();
  const source = await openModel(MODEL_DIR);
  const engine = await inferenceEngine(source, {
    maxSeqs: 1,
    maxContext: LENGTH,
    maxTokensPerStep: 16,
  });
  const sampled = await engine.generate({
    prompt: [source.config.bosTokenId!],
    maxTokens: LENGTH - 1,
    sampling: { temperature: 1, topK: 0, topP: 1, seed: 7 },
    ignoreEos: true,
  });
  await engine.close();
  const text = [...sampled.promptTokens, ...sampled.tokens];
  strictEqual(text.length, LENGTH);

  const runner = await ModelRunner.create(ctx, source, {
    maxSeqs: 1,
    maxContext: LENGTH,
    maxTokens: 16,
  });
  const h2o = { sinks: 4, window: 60, heavyHitters: true };
  const full = await scoreWithPruning(runner, text, 0, h2o);
  const neverReached = await scoreWithPruning(runner, text, LENGTH + 16, h2o);
  const heavy = await scoreWithPruning(runner, text, BUDGET, h2o);
  const window = await scoreWithPruning(runner, text, BUDGET, {
    sinks: 4,
    window: 0,
    heavyHitters: false,
  });
  runner.destroy();

  strictEqual(neverReached.logLikelihood, full.logLikelihood);
  strictEqual(neverReached.pruneEvents, 0);
  for (const run of [heavy, window]) {
    ok(run.pruneEvents > 0 && run.evictedTokens > 0);
    ok(
      run.peakBlocks <= BUDGET / 16 + 1,
      `peak ${run.peakBlocks} blocks for a ${BUDGET}-token budget`,
    );
  }
  strictEqual(full.peakBlocks, LENGTH / 16);
  const loss = (r: typeof full) => full.logLikelihood - r.logLikelihood;
  const change = (r: typeof full) => (r.logLikelihood - full.logLikelihood).toFixed(2);
  console.log(
    `log-likelihood of ${full.tokensScored} tokens: full ${full.logLikelihood.toFixed(2)}, ` +
      `H2O ${heavy.logLikelihood.toFixed(2)} (change ${change(heavy)}), ` +
      `sinks+window ${window.logLikelihood.toFixed(2)} (change ${change(window)}); ` +
      `peak blocks ${full.peakBlocks} -> ${heavy.peakBlocks}`,
  );
  ok(
    loss(heavy) < loss(window),
    "heavy hitters must lose less log-likelihood than a recency window",
  );
});
