/**
 * The discrete-event simulator: deterministic for a seed, and the MACE properties the issue asks
 * for, checked after every iteration of randomized runs (seeded Poisson workloads).
 */
import assert from "node:assert/strict";
import { simulate, type SimulatedIteration } from "../../src/scheduler/sim/simulator.ts";
import { poissonWorkload } from "../../src/scheduler/sim/workload.ts";
import { POLICY_NAMES, policyOptions } from "../../src/scheduler/mace/policy.ts";
import type { CostProfile } from "../../src/scheduler/cost_model.ts";
import { TEST_PROFILE } from "./test_profile.ts";

/** The round-number profile with attention cost and a pool of 512 blocks of 4 tokens. */
const PROFILE: CostProfile = {
  ...TEST_PROFILE,
  coefficients: { ...TEST_PROFILE.coefficients, prefillTokens: 0.05, attentionKPairs: 0.02 },
  memory: { ...TEST_PROFILE.memory, kvBlocks: 512 },
};

function workload(seed: number, rate = 6, retrainRate = 0.3) {
  const lengths = Array.from(
    { length: 50 },
    (_, i) => ({ promptTokens: 8 + ((i * 37) % 180), outputTokens: 4 + ((i * 13) % 60) }),
  );
  return poissonWorkload({ rate, durationS: 20, lengths, retrainRate, seed });
}

Deno.test("the same seed gives the same run; another seed another", () => {
  const run = (seed: number) =>
    JSON.stringify(
      simulate({ policy: policyOptions("mace"), profile: PROFILE, workload: workload(seed), seed })
        .summary,
    );
  assert.equal(run(1), run(1));
  assert.notEqual(run(1), run(2));
});

Deno.test("every policy serves every request, keeping block and queue invariants", () => {
  for (const name of POLICY_NAMES) {
    const arrivals = workload(3);
    const r = simulate({
      policy: policyOptions(name, { periodMs: 5000 }),
      profile: PROFILE,
      workload: arrivals,
      seed: 3,
      checkInvariants: true,
    });
    assert.equal(r.summary.requests.finished, arrivals.length, name);
    const feedback = arrivals.filter((a) => a.feedback).length;
    assert.equal(r.summary.feedbackReceived, feedback, name);
    if (name === "inference-only") assert.equal(r.summary.finetune.pairsTrained, 0);
    else assert.ok(r.summary.finetune.pairsTrained > 0, `${name} trains`);
  }
});

Deno.test("mace properties hold at every iteration of randomized runs", () => {
  for (let seed = 10; seed < 16; seed++) {
    const deltaFtMs = 300 + 200 * (seed % 3);
    const policy = policyOptions("mace", {
      tbtSloMs: 60 + 10 * (seed % 4),
      deltaFtMs,
      tauMem: 0.5 + 0.1 * (seed % 4),
    });
    const iterations: SimulatedIteration[] = [];
    const r = simulate({
      policy,
      profile: PROFILE,
      workload: workload(seed, 4 + (seed % 5), 0.5),
      seed,
      noise: 0,
      online: false,
      checkInvariants: true,
      onIteration: (it) => iterations.push(it),
    });
    const blockBytes = PROFILE.memory.kvBytesPerToken * PROFILE.memory.blockSize;
    let longest = 0;
    for (const it of iterations) {
      longest = Math.max(longest, it.endMs - it.startMs);
      // With exact predictions, a plan whose mandatory part meets the earliest TBT deadline
      // meets it.
      if (it.deadlineMs !== null && it.startMs + it.mandatoryMs <= it.deadlineMs) {
        assert.ok(
          it.endMs <= it.deadlineMs + 1e-6,
          `seed ${seed}: iteration ends ${it.endMs} after deadline ${it.deadlineMs}`,
        );
      }
      // Prefill goes in only under τ_mem (decodes may each have grown by one block).
      if (it.prefillTokens > 0 && it.decodeSeqs > 0) {
        assert.ok(
          it.kvUsedBytes + it.finetuneBytes <=
            policy.tauMem * it.memoryBytes + it.decodeSeqs * blockBytes + 1e-6,
          `seed ${seed}: memory ${it.kvUsedBytes + it.finetuneBytes} over τ_mem`,
        );
      }
    }
    assert.ok(
      r.maxFinetuneWaitMs <= deltaFtMs + longest + 1e-6,
      `seed ${seed}: waited ${r.maxFinetuneWaitMs}`,
    );
    assert.ok(r.summary.finetune.pairsTrained > 0);
  }
});
