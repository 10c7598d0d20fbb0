/**
 * Scheduling decisions of the CoScheduler on scripted scenarios (exact plans) with a round-number
 * cost profile, so every expected chunk size can be worked out by hand.
 */
import assert from "node:assert/strict";
import { GREEDY } from "../../src/engine/step.ts";
import { BatchScheduler } from "../../src/scheduler/batch_scheduler.ts";
import { BlockManager } from "../../src/scheduler/block_manager.ts";
import { CostModel } from "../../src/scheduler/cost_model.ts";
import { CoScheduler, type Iteration } from "../../src/scheduler/mace/co_scheduler.ts";
import { type PolicyOptions, policyOptions } from "../../src/scheduler/mace/policy.ts";
import { MetricsRecorder } from "../../src/scheduler/metrics.ts";
import { TEST_PROFILE } from "./test_profile.ts";

function setup(name: string, overrides: Partial<PolicyOptions> = {}) {
  const blockManager = new BlockManager({
    numBlocks: 256,
    blockSize: 4,
    enablePrefixCaching: true,
  });
  const batch = new BatchScheduler({
    blockManager,
    maxTokensPerStep: 512,
    maxSeqsPerStep: 8,
    maxContext: 256,
  });
  const metrics = new MetricsRecorder(0);
  const policy = policyOptions(name, {
    tbtSloMs: 50,
    ttftSloMs: 500,
    latencyMargin: 1,
    ...overrides,
  });
  const cost = new CostModel(TEST_PROFILE, { online: false });
  const scheduler = new CoScheduler<null>({
    policy,
    batch,
    cost,
    numLayers: TEST_PROFILE.numLayers,
    memoryBytes: cost.kvBytes(256) + 1000,
    metrics,
  });
  let clock = 0;
  const run = (it: Iteration<null>) => {
    clock += it.predictedMs;
    const sampled = it.step?.plan.sequences.map((s) => (s.sample ? 7 : -1)) ?? [];
    return scheduler.complete(it, {
      result: it.step ? { sampled, gpuMs: it.predictedMs } : null,
      ms: it.predictedMs,
    }, clock);
  };
  const add = (id: number, promptLength: number, maxTokens: number) =>
    scheduler.addRequest({
      id,
      prompt: Array.from({ length: promptLength }, (_, i) => 100 * id + i + 1),
      maxTokens,
      sampling: GREEDY,
      eosIds: [],
    }, clock);
  return {
    scheduler,
    batch,
    metrics,
    run,
    add,
    now: () => clock,
    setNow: (t: number) => (clock = t),
  };
}

/** [seqId, tokens computed, sample] of each sequence of an iteration's serving step. */
function plan(it: Iteration<null> | null) {
  return it?.step?.plan.sequences.map((s) => [s.seqId, s.tokens.length, s.sample]) ?? [];
}

Deno.test("mace sizes a prefill chunk to the TBT budget left by the running decode", () => {
  const s = setup("mace");
  s.add(0, 8, 5);
  // Nothing decodes yet: the budget is one TBT SLO (50 ms): 10 + 0.2·8 ms fits the whole prompt.
  const first = s.scheduler.schedule(s.now())!;
  assert.deepEqual(plan(first), [[0, 8, true]]);
  assert.equal(first.predictedMs, 10 + 0.2 * 8);
  s.run(first);
  s.add(1, 200, 3);
  // Request 0 decodes (deadline: its first token + 50 ms = the whole budget); the decode costs
  // 10 + 1 ms, leaving 39 ms = 195 prefill tokens of request 1 at 0.2 ms each.
  const second = s.scheduler.schedule(s.now())!;
  assert.deepEqual(plan(second), [[0, 1, true], [1, 195, false]]);
  assert.ok(Math.abs(second.predictedMs - 50) < 1e-9);
  s.run(second);
  // Then the last 5 prompt tokens, and request 1 samples its first token.
  assert.deepEqual(plan(s.scheduler.schedule(s.now())), [[0, 1, true], [1, 5, true]]);
});

Deno.test("fcfs takes the whole prompt in one step and blows the TBT budget", () => {
  const s = setup("fcfs");
  s.add(0, 8, 5);
  s.run(s.scheduler.schedule(s.now())!);
  s.add(1, 200, 3);
  const it = s.scheduler.schedule(s.now())!;
  assert.deepEqual(plan(it), [[0, 1, true], [1, 200, true]]);
  assert.ok(it.predictedMs > 50);
});

Deno.test("mace runs slices on an idle GPU, and beside decodes once they waited enough", () => {
  const s = setup("mace", { deltaFtMs: 1000 });
  s.scheduler.addFeedback([{ id: 0, tokens: 40, payload: null }], 0);
  // Idle GPU: the slice runs alone (reference of the one pair, layer 0 of 2: 5 + 0.05·40/2 = 6 ms).
  const idle = s.scheduler.schedule(0)!;
  assert.equal(idle.step, null);
  assert.deepEqual(idle.finetune?.slice, { kind: "reference", pair: 0, fromLayer: 0, toLayer: 1 });
  assert.equal(idle.predictedMs, 5 + 0.05 * 40 / 2);
  s.run(idle);
  const servedAt = s.now();
  // Then request 0 decodes, 11 ms an iteration against a 50 ms TBT budget: 39 ms of slack. The
  // next slice (6 ms) may use the share (waited / δ_ft)² of it: it goes in once
  // (1 - share) · 39 <= 39 - 6, i.e. after waiting 1000 · sqrt(6 / 39) = 392.2 ms.
  s.add(0, 8, 60);
  let joinedAt = -1;
  while (joinedAt < 0) {
    const it = s.scheduler.schedule(s.now())!;
    assert.ok(it.step, "request 0 is served every iteration");
    if (it.finetune) {
      assert.deepEqual(it.finetune.slice, { kind: "reference", pair: 0, fromLayer: 1, toLayer: 2 });
      assert.ok(!it.forcedFinetune);
      joinedAt = s.now();
    }
    s.run(it);
  }
  const threshold = 1000 * Math.sqrt(6 / 39);
  assert.ok(
    joinedAt - servedAt >= threshold && joinedAt - servedAt < threshold + 11.2,
    `joined after ${joinedAt - servedAt} ms`,
  );
});

Deno.test("δ_ft forces a slice in once fine-tuning has waited that long", () => {
  const s = setup("mace", { deltaFtMs: 100 });
  s.add(0, 8, 40);
  s.run(s.scheduler.schedule(0)!);
  s.scheduler.addFeedback([{ id: 0, tokens: 40, payload: null }], s.now());
  const fedAt = s.now();
  // Request 0 decodes every iteration and two long prompts always wait: prefill chunks fill
  // every budget, so the slice never fits by itself.
  let forcedAt = -1;
  for (let i = 0; i < 40 && forcedAt < 0; i++) {
    while (s.batch.numWaiting < 2) s.add(10 + s.batch.numWaiting + 2 * i, 240, 1);
    const it = s.scheduler.schedule(s.now())!;
    assert.ok(it.predictedMs <= 50 + 1e-9 || it.forcedFinetune, "a full budget unless forced");
    if (it.finetune) {
      assert.ok(it.forcedFinetune, "the slice only goes in when forced");
      forcedAt = s.now();
    }
    s.run(it);
  }
  assert.ok(forcedAt >= fedAt + 100, `forced at ${forcedAt}, fed at ${fedAt}`);
  assert.ok(forcedAt < fedAt + 100 + 50, "within one iteration of δ_ft");
});

Deno.test("synchronous stops serving while its job runs; periodic shares the GPU", () => {
  for (const name of ["synchronous", "periodic"]) {
    const s = setup(name, { periodMs: 100, pairsPerStep: 2 });
    s.scheduler.addFeedback([{ id: 0, tokens: 20, payload: null }, {
      id: 1,
      tokens: 20,
      payload: null,
    }], 0);
    s.add(0, 8, 50);
    // Before the period ends: serving only.
    const before = s.scheduler.schedule(0)!;
    assert.equal(before.finetune, null);
    s.run(before);
    s.setNow(100);
    const at = s.scheduler.schedule(100)!;
    assert.deepEqual(at.finetune?.slice, { kind: "reference", pair: 0, fromLayer: 0, toLayer: 1 });
    if (name === "synchronous") assert.equal(at.step, null);
    else assert.deepEqual(plan(at), [[0, 1, true]]);
  }
});

Deno.test("inference-only never trains; DPO-loss priority takes the highest-loss pairs", () => {
  const only = setup("inference-only");
  only.scheduler.addFeedback([{ id: 0, tokens: 20, payload: null }], 0);
  assert.equal(only.scheduler.schedule(0), null);
  assert.equal(only.scheduler.hasWork(0), false);

  const s = setup("mace", {
    pairsPerStep: 1,
    maxTrainings: 3,
    retrainAboveLoss: 0.1,
    agingPerS: 0,
  });
  s.scheduler.addFeedback([0, 1, 2].map((id) => ({ id, tokens: 20, payload: null })), 0);
  // Train pair 0 once (it is first among equals): its measured loss is then 1.5, above ln 2.
  for (;;) {
    const it = s.scheduler.schedule(s.now())!;
    const kind = it.finetune!.slice.kind;
    s.setNow(s.now() + it.predictedMs);
    const losses = kind === "optimizer" ? [1.5] : undefined;
    s.scheduler.complete(it, { result: null, ms: it.predictedMs, losses }, s.now());
    if (kind === "optimizer") break;
  }
  const next = s.scheduler.schedule(s.now())!;
  assert.equal(
    next.finetune!.pairs[0].item.id,
    0,
    "the pair with loss 1.5 beats the fresh ones (ln 2)",
  );
});
