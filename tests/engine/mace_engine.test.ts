/**
 * MaceEngine in-process on the bundled model (Deno's WebGPU only, like the worker test: not a
 * *.gpu.test.ts): feedback pairs are trained while requests are served, the adapter is published
 * after each optimizer step and new requests run on the newest version; the first step's losses
 * are exactly the fresh adapter's ln 2; bad feedback is rejected whole and loses nothing queued;
 * a closed engine refuses work with its own error class.
 */
import assert from "node:assert/strict";
import { EngineClosedError, InvalidRequestError } from "../../src/engine/errors.ts";
import { openModelWithTokenizer } from "../../src/engine/load.ts";
import { MaceEngine } from "../../src/host/mace_engine.ts";
import type { FeedbackPair } from "../../src/host/engine_api.ts";

const MODEL_DIR = new URL("../../models/stories260K/", import.meta.url).pathname;

Deno.test({
  name: "MaceEngine trains feedback while serving, publishes each step, serves the newest version",
  sanitizeResources: false,
  sanitizeOps: false,
}, async () => {
  const { tokenizer } = await openModelWithTokenizer(MODEL_DIR);
  const eos = 2;
  const pair = (prompt: string, chosen: string, rejected: string): FeedbackPair => ({
    prompt: tokenizer.encode(prompt, { addSpecialTokens: true }),
    chosen: [...tokenizer.encode(chosen, { addSpecialTokens: false }), eos],
    rejected: [...tokenizer.encode(rejected, { addSpecialTokens: false }), eos],
  });
  const pairs = [
    pair(
      "Once upon a time, there was a little girl named Lily.",
      " She went to the park.",
      " She stayed in bed.",
    ),
    pair("Tom had a red ball.", " He played with his friend.", " He lost it and cried."),
  ];
  const engine = await MaceEngine.create({
    backend: "wgpu",
    finetune: { pairsPerStep: 2, publishEvery: 1 },
  });
  try {
    const before = await engine.generate({ prompt: [1], maxTokens: 8 });
    assert.equal(before.adapterId, undefined, "nothing published yet: the base model serves");

    // Bad feedback rejects the whole call and queues nothing.
    const tooLong = { ...pairs[0], chosen: new Array(300).fill(5) };
    await assert.rejects(engine.submitFeedback([pairs[1], tooLong]), InvalidRequestError);
    await assert.rejects(
      engine.submitFeedback([{ ...pairs[0], rejected: [9999] }]),
      InvalidRequestError,
    );

    const receipt = await engine.submitFeedback(pairs);
    assert.deepEqual(receipt, { accepted: 2, untrained: 2 });
    // Serve while the step trains.
    const during = await engine.generate({ prompt: [1], maxTokens: 40 });
    assert.equal(during.tokens.length > 0, true);
    const deadline = performance.now() + 90_000;
    let metrics = await engine.metrics();
    // The step counts when its optimizer slice ends; the adapter is read back and published after.
    while (metrics.publishedAdapter === null && performance.now() < deadline) {
      await new Promise((resolve) => setTimeout(resolve, 200));
      metrics = await engine.metrics();
    }
    assert.equal(metrics.optimizerSteps, 1);
    assert.equal(metrics.publishedAdapter, "mace@1");
    const ft = metrics.summary.finetune;
    assert.equal(ft.pairsTrained, 2);
    assert.equal(metrics.summary.staleness.current, 0);
    // A fresh LoRA adapter has B = 0: policy = reference, so every first-step loss is ln 2.
    assert.ok(Math.abs(ft.meanDpoLoss! - Math.LN2) < 1e-4, `mean DPO loss ${ft.meanDpoLoss}`);
    assert.ok(metrics.prediction.steps > 0);

    const adapters = await engine.adapters();
    assert.deepEqual(adapters.map((a) => [a.id, a.newest]), [["mace@1", true]]);
    const after = await engine.generate({ prompt: [1], maxTokens: 8 });
    assert.equal(after.adapterId, "mace@1", "new requests run on the newest published version");
  } finally {
    await engine.close();
  }
  await assert.rejects(engine.generate({ prompt: [1], maxTokens: 4 }), EngineClosedError);
  await assert.rejects(engine.submitFeedback(pairs), EngineClosedError);
});
